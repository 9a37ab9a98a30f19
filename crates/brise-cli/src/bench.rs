//! `brise bench`: prompt-processing and generation throughput, shaped like llama-bench
//! so one script can read both (same flags, same JSON fields).

use crate::registry;
use crate::run::kernels;
use anyhow::{Context, Result, bail};
use brise_kernels::Isa;
use brise_kernels::pool::ThreadPool;
use brise_model::Model;
use brise_model::forward::{ForwardState, LogitsWanted, SeqBatch};
use brise_model::kv::KvCache;
use clap::Args;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Models (comma-separated or repeated): .gguf paths, directories or names
    #[arg(short = 'm', long = "model", value_delimiter = ',', required = true)]
    pub models: Vec<String>,
    /// Thread counts to test
    #[arg(
        short = 't',
        long = "threads",
        value_delimiter = ',',
        default_value = "2"
    )]
    pub threads: Vec<usize>,
    /// Prompt lengths to test (0 skips the prompt test)
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Generation lengths to test (0 skips the generation test)
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Repetitions of each test
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub reps: usize,
    /// Physical batch for prompt processing (llama.cpp's n_ubatch)
    #[arg(long = "ubatch-size", default_value_t = 512)]
    pub ubatch: usize,
    /// Output format: md or json
    #[arg(short = 'o', long = "output", default_value = "md")]
    pub output: String,
    /// Restrict kernels to a CPU level: scalar, avx2, avx512-vnni
    #[arg(long)]
    pub cpu: Option<Isa>,
}

struct Row {
    model_filename: String,
    model_type: String,
    model_size: u64,
    model_n_params: u64,
    isa: String,
    n_threads: usize,
    n_prompt: usize,
    n_gen: usize,
    n_ubatch: usize,
    samples_ns: Vec<u64>,
}

impl Row {
    fn n_tokens(&self) -> usize {
        self.n_prompt + self.n_gen
    }
    fn ts(&self) -> Vec<f64> {
        self.samples_ns
            .iter()
            .map(|&ns| self.n_tokens() as f64 * 1e9 / ns as f64)
            .collect()
    }
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, sd)
}

/// Deterministic stand-in tokens (the content does not change the work).
fn tokens(n: usize, n_vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % n_vocab as u64) as u32
        })
        .collect()
}

/// Peak resident set size of this process so far (VmHWM), in bytes.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.output != "md" && a.output != "json" {
        bail!("--output must be md or json, not {:?}", a.output);
    }
    if a.reps == 0 {
        bail!("--repetitions must be at least 1");
    }
    let kern = kernels(a.cpu)?;
    let mut rows = Vec::new();
    for m in &a.models {
        let path = registry::ensure_local(registry::resolve(m)?)?;
        let model =
            Model::load(&path, kern).with_context(|| format!("loading {}", path.display()))?;
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let n_params = model.n_params();
        let fname = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let fwd = model.forward();
        for &t in &a.threads {
            let pool = ThreadPool::new(t.max(1));
            let mut st = ForwardState::default();
            let mut tests: Vec<(usize, usize)> = Vec::new();
            tests.extend(a.n_prompt.iter().filter(|&&p| p > 0).map(|&p| (p, 0)));
            tests.extend(a.n_gen.iter().filter(|&&n| n > 0).map(|&n| (0, n)));
            for (np, ng) in tests {
                let n_ctx = (np + ng).max(1);
                let mut cache = KvCache::new(&model.cfg, n_ctx);
                let mut samples = Vec::new();
                // One warm-up run, then the measured ones.
                for rep in 0..=a.reps {
                    cache.truncate(0);
                    let toks = tokens(np.max(ng), model.cfg.n_vocab, rep as u64 + 1);
                    let t0 = Instant::now();
                    if np > 0 {
                        for chunk in toks[..np].chunks(a.ubatch.max(1)) {
                            fwd.run(
                                &pool,
                                &mut st,
                                &mut [SeqBatch {
                                    cache: &mut cache,
                                    tokens: chunk,
                                    logits: LogitsWanted::Last,
                                    lora: None,
                                }],
                            );
                        }
                    } else {
                        for tok in &toks[..ng] {
                            fwd.run(
                                &pool,
                                &mut st,
                                &mut [SeqBatch {
                                    cache: &mut cache,
                                    tokens: std::slice::from_ref(tok),
                                    logits: LogitsWanted::Last,
                                    lora: None,
                                }],
                            );
                        }
                    }
                    let ns = t0.elapsed().as_nanos() as u64;
                    if rep > 0 {
                        samples.push(ns);
                    }
                }
                let row = Row {
                    model_filename: fname.clone(),
                    model_type: format!("{} {}", model.cfg.arch.name(), model.weights.tok_embd.ty),
                    model_size: size,
                    model_n_params: n_params,
                    isa: kern.isa().to_string(),
                    n_threads: t,
                    n_prompt: np,
                    n_gen: ng,
                    n_ubatch: a.ubatch,
                    samples_ns: samples,
                };
                if a.output == "md" {
                    if rows.is_empty() {
                        println!("| model | size | isa | threads | test | t/s |");
                        println!("| --- | ---: | --- | ---: | ---: | ---: |");
                    }
                    let (m, sd) = mean_sd(&row.ts());
                    let test = if np > 0 {
                        format!("pp{np}")
                    } else {
                        format!("tg{ng}")
                    };
                    println!(
                        "| {} | {:.1} MiB | {} | {} | {test} | {m:.2} ± {sd:.2} |",
                        row.model_filename,
                        row.model_size as f64 / (1 << 20) as f64,
                        row.isa,
                        t
                    );
                }
                rows.push(row);
            }
        }
    }
    if a.output == "json" {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let ts = r.ts();
                let (avg_ts, stddev_ts) = mean_sd(&ts);
                let ns: Vec<f64> = r.samples_ns.iter().map(|&x| x as f64).collect();
                let (avg_ns, stddev_ns) = mean_sd(&ns);
                serde_json::json!({
                    "build_commit": option_env!("BRISE_COMMIT").unwrap_or("unknown"),
                    "cpu_info": r.isa,
                    "model_filename": r.model_filename,
                    "model_type": r.model_type,
                    "model_size": r.model_size,
                    "model_n_params": r.model_n_params,
                    "n_batch": r.n_ubatch,
                    "n_ubatch": r.n_ubatch,
                    "n_threads": r.n_threads,
                    "n_prompt": r.n_prompt,
                    "n_gen": r.n_gen,
                    "avg_ns": avg_ns as u64,
                    "stddev_ns": stddev_ns as u64,
                    "avg_ts": avg_ts,
                    "stddev_ts": stddev_ts,
                    "samples_ns": r.samples_ns,
                    "samples_ts": ts,
                    "peak_rss_bytes": peak_rss(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}
