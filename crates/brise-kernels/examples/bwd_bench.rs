//! Wall time of the training backward's product through a frozen base matrix,
//! `dx = dy · W` (`matmul_backward_input`), for a random Q4_1 or Q8_0 matrix repacked as
//! the model loads it, in bf16 when the CPU has AMX or AVX512-BF16 (`BRISE_NO_AMX=1`
//! for AVX512-BF16 on an AMX CPU, `BRISE_NO_BF16=1` for f32).
//!
//!   cargo run --release -p brise-kernels --example bwd_bench -- [Q4_1|Q8_0] [n] [k] [m] [threads]

use brise_kernels::GgmlType;
use brise_kernels::matmul::{GradScratch, WeightRef, matmul_backward_input};
use brise_kernels::packed::Packed;
use brise_kernels::pool::ThreadPool;
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let ty = match a.first().map(String::as_str).unwrap_or("Q4_1") {
        "Q8_0" => GgmlType::Q8_0,
        _ => GgmlType::Q4_1,
    };
    let num = |i: usize, d: usize| a.get(i).map_or(d, |v| v.parse().unwrap());
    let (n, k, m, threads) = (num(1, 1536), num(2, 576), num(3, 256), num(4, 2));
    let mut s = 7u64;
    let mut byte = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u8
    };
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let mut data = vec![0u8; n * k / bs * ts];
    for blk in data.chunks_exact_mut(ts) {
        for b in blk.iter_mut() {
            *b = byte();
        }
        // Small positive f16 scales (and min, for Q4_1): 2^-7 with random low bits.
        blk[1] = 0x20;
        if ty == GgmlType::Q4_1 {
            blk[3] = 0x20;
        }
    }
    let packed = Packed::pack(ty, n, k, &data);
    let w = WeightRef {
        ty,
        n,
        k,
        data: &data,
        packed: Some(&packed),
        kpacked: None,
    };
    let dy: Vec<f32> = (0..m * n).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    let mut dx = vec![0f32; m * k];
    let pool = ThreadPool::new(threads);
    let mut g = GradScratch::default();
    matmul_backward_input(&pool, &w, &dy, m, &mut g, &mut dx);
    let reps = (2e10 / (m * n * k) as f64).clamp(3.0, 200.0) as usize;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        for _ in 0..reps {
            matmul_backward_input(&pool, &w, &dy, m, &mut g, &mut dx);
        }
        best = best.min(t0.elapsed().as_secs_f64() / reps as f64);
    }
    println!(
        "{ty} {n}x{k}, {m} rows, {threads} threads: {:.3} ms a product, {:.1} GMAC/s (best of 5 x {reps})",
        best * 1e3,
        (m * n * k) as f64 / best / 1e9
    );
}
