//! Throughput of LoRA's row kernels on one thread, for a projection's shapes.
//!
//!   cargo run --release -p brise-kernels --example lora_bench -- [k] [n] [rows] [rank]

use brise_kernels::Isa;
use brise_kernels::lora::{lora_down_rows, lora_params, lora_up_rows};
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let (k, n, m, rank) = (
        *a.first().unwrap_or(&576),
        *a.get(1).unwrap_or(&1536),
        *a.get(2).unwrap_or(&128),
        *a.get(3).unwrap_or(&16),
    );
    let isa = Isa::detect();
    let f = |len: usize, s: usize| -> Vec<f32> {
        (0..len).map(|i| ((i * 7 + s) % 13) as f32 * 0.01).collect()
    };
    let (am, bt, x, dy) = (f(rank * k, 1), f(rank * n, 2), f(m * k, 3), f(m * n, 4));
    let (mut t, mut y, mut out) = (
        vec![0f32; m * rank],
        vec![0f32; m * n],
        vec![0f32; rank * n],
    );
    let time = |name: &str, macs: usize, run: &mut dyn FnMut()| {
        run();
        let reps = (2e9 / macs as f64).max(3.0) as usize;
        let t0 = Instant::now();
        for _ in 0..reps {
            run();
        }
        let s = t0.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{name:>28}: {:8.1} us, {:5.1} GMAC/s",
            s * 1e6,
            macs as f64 / s / 1e9
        );
    };
    time("down (t = A x, over k)", m * rank * k, &mut || {
        lora_down_rows(isa, &am, k, rank, 0.5, &x, m, &mut t)
    });
    time("down (dt = Bᵀ dy, over n)", m * rank * n, &mut || {
        lora_down_rows(isa, &bt, n, rank, 0.5, &dy, m, &mut t)
    });
    time("up (y += B t, over n)", m * rank * n, &mut || {
        lora_up_rows(isa, &bt, n, rank, &t, &mut y, m)
    });
    time("params (dBᵀ += tᵀ dy)", m * rank * n, &mut || {
        lora_params(isa, &t, rank, &dy, n, m, 0..n, &mut out)
    });
}
