//! Prometheus metrics in the text exposition format. A handful of counters and two
//! histograms do not justify a metrics framework; the format is written here.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds in seconds.
const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
];

pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            inner: Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                g.0[i] += 1;
            }
        }
        g.1 += v;
        g.2 += 1;
    }

    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in self.bounds.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}", g.0[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", g.2);
        let l = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{l} {}", g.1);
        let _ = writeln!(out, "{name}_count{l} {}", g.2);
    }
}

/// Per served model.
pub struct ModelMetrics {
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
}

impl Default for ModelMetrics {
    fn default() -> Self {
        ModelMetrics {
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    /// (route, status) → count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Metrics {
    pub fn count_request(&self, route: &str, status: u16) {
        let mut g = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *g.entry((route.to_string(), status)).or_default() += 1;
    }

    pub fn render_requests(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP brise_requests_total HTTP requests by route and status.\n# TYPE brise_requests_total counter"
        );
        let g = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        for ((route, status), n) in g.iter() {
            let _ = writeln!(
                out,
                "brise_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
    }
}

pub fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family's header.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub fn render_model(m: &ModelMetrics, model: &str, out: &mut String, fam: &str) {
    let l = format!("model=\"{}\"", escape(model));
    match fam {
        "prompt" => {
            let _ = writeln!(
                out,
                "brise_prompt_tokens_total{{{l}}} {}",
                m.prompt_tokens.load(Ordering::Relaxed)
            );
        }
        "gen" => {
            let _ = writeln!(
                out,
                "brise_generated_tokens_total{{{l}}} {}",
                m.generated_tokens.load(Ordering::Relaxed)
            );
        }
        "ttft" => m.ttft.render("brise_time_to_first_token_seconds", &l, out),
        "itl" => m.itl.render("brise_inter_token_latency_seconds", &l, out),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut s = String::new();
        h.render("x", "", &mut s);
        assert!(s.contains("x_bucket{le=\"0.1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"1\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_sum 5.55\n"), "{s}");
        assert!(s.contains("x_count 3\n"), "{s}");
    }
}
