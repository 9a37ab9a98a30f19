//! Training throughput: SFT steps of LoRA on a model, sequences of a given length, with
//! the loss on every token but the first. Prints tokens/s (forward + backward +
//! optimizer) and peak resident memory.
//!
//!   cargo run --release -p brise-train --example train_bench -- MODEL.gguf [seq_len] [steps] [rank] [threads] [--warmup]
//!
//! With `--warmup` the first step is not timed, and the last line is JSON
//! (`tokens_per_s`, `peak_rss_mb`) for bench/train_compare.py.

use brise_kernels::quant::Kernels;
use brise_model::Model;
use brise_train::data::{Item, Seq};
use brise_train::trainer::{Method, TrainConfig, Trainer, init_adapter};
use std::time::Instant;

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let path = a
        .get(1)
        .expect("usage: train_bench MODEL.gguf [seq_len] [steps] [rank] [threads]");
    let len: usize = a.get(2).map_or(256, |v| v.parse().unwrap());
    let steps: u64 = a.get(3).map_or(4, |v| v.parse().unwrap());
    let rank: usize = a.get(4).map_or(16, |v| v.parse().unwrap());
    let threads: usize = a.get(5).map_or(2, |v| v.parse().unwrap());
    let m = Model::load(std::path::Path::new(path), Kernels::best()).unwrap();
    let mut s = 12345u64;
    let mut tok = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) % m.cfg.n_vocab as u64) as u32
    };
    let items: Vec<Item> = (0..steps)
        .map(|_| {
            let ids: Vec<u32> = (0..len).map(|_| tok()).collect();
            Item::Sft(Seq {
                prompt: ids[..1].to_vec(),
                completion: ids[1..].to_vec(),
            })
        })
        .collect();
    let cfg = TrainConfig {
        method: Method::Sft,
        rank,
        alpha: 2.0 * rank as f64,
        batch_size: 1,
        max_steps: Some(steps),
        batch_tokens: len,
        max_len: len,
        ..TrainConfig::default()
    };
    let ad = init_adapter(&m, &cfg).unwrap();
    let mut tr = Trainer::new(&m, cfg, ad, threads).unwrap();
    let warmup = a.iter().any(|x| x == "--warmup");
    let mut t0 = Instant::now();
    let mut per = Vec::new();
    tr.train(&items, &mut |r| {
        per.push(r.tokens_per_s);
        eprintln!(
            "step {}: loss {:.4}, {:.1} tokens/s",
            r.step, r.loss, r.tokens_per_s
        );
        if warmup && r.step == 1 {
            t0 = Instant::now();
        }
        true
    })
    .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let timed = if warmup { steps - 1 } else { steps };
    per.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if warmup {
        println!(
            "{{\"tokens_per_s\": {}, \"peak_rss_mb\": {}}}",
            (timed as usize * len) as f64 / secs,
            peak_rss_mb()
        );
        return;
    }
    println!(
        "brise: {} steps of {len} tokens, rank {rank}, {threads} threads: {:.1} tokens/s overall, median step {:.1} tokens/s, peak RSS {:.0} MB",
        steps,
        (steps as usize * len) as f64 / secs,
        per[per.len() / 2],
        peak_rss_mb()
    );
}
