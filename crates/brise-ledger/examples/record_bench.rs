//! What recording adds to a request: the time `Ledger::record` takes to return (the
//! server awaits it before answering), sequentially and with concurrent writers.
//! `cargo run --release -p brise-ledger --example record_bench -- [N] [postgres://…/db]`
//! (without a URL, a fresh SQLite file in the temporary directory).
use brise_ledger::{CompletionRecord, Ledger, now_ms};
use serde_json::json;
use std::time::Instant;

/// Ids unique per run, so a reused database takes them.
static RUN: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| uuid::Uuid::new_v4().simple().to_string());

fn rec(id: String) -> CompletionRecord {
    CompletionRecord {
        id: format!("{}-{id}", *RUN),
        created_at_ms: now_ms(),
        tenant: "default".into(),
        subject: Some("alice".into()),
        model: "smollm2:135m".into(),
        model_sha256: None,
        adapter: None,
        endpoint: "/v1/chat/completions".into(),
        params: json!({"model": "smollm2", "temperature": 0.7, "max_tokens": 128}),
        messages: json!([{"role": "user", "content": "Why is the sky blue? ".repeat(10)}]),
        output: json!([{"text": "Because of Rayleigh scattering. ".repeat(20), "finish_reason": "stop"}]),
        prompt_tokens: 120,
        completion_tokens: 128,
        ttft_ms: Some(30.0),
        latency_ms: 600.0,
        status: "ok".into(),
        error: None,
        training_consent: true,
        content_level: "full".into(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("N"))
        .unwrap_or(2000);
    let dir = std::env::temp_dir().join(format!("brise-record-bench-{}", uuid::Uuid::new_v4()));
    let spec = std::env::args()
        .nth(2)
        .unwrap_or_else(|| dir.join("ledger.sqlite").display().to_string());
    let l = Ledger::open(&spec).await.expect("open");
    println!("backend: {:?}", l.backend());
    let mut seq = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        l.record(rec(format!("s{i}"))).await.expect("record");
        seq.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "sequential: median {:.3} ms per record ({n} records)",
        median(seq)
    );
    for conc in [8usize, 32] {
        let t0 = Instant::now();
        let mut hs = Vec::new();
        for c in 0..conc {
            let l = l.clone();
            hs.push(tokio::spawn(async move {
                let mut v = Vec::new();
                for i in 0..n / conc {
                    let t = Instant::now();
                    l.record(rec(format!("c{conc}-{c}-{i}")))
                        .await
                        .expect("record");
                    v.push(t.elapsed().as_secs_f64() * 1e3);
                }
                v
            }));
        }
        let mut all = Vec::new();
        for h in hs {
            all.extend(h.await.expect("task"));
        }
        let total = all.len();
        println!(
            "{conc} concurrent writers: median {:.3} ms per record, {:.0} records/s",
            median(all),
            total as f64 / t0.elapsed().as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
