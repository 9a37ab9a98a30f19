// Micro-benchmark: GEMV throughput of one weight type (rows × k), single matrix, repeated.
//
//   cargo run --release -p brise-kernels --example mmbench -- TYPE n k threads [copies] [m] [--fast]
//
// ITERS=n: calls timed (the best call's rate is the one least disturbed by other load).
// `--fast`: the f32 path (`matmul_f32`, which `Kernels::with_fast` takes for steps of
// at least FAST_MIN_STEP rows), at any m, to find where it overtakes the exact kernels.
use brise_kernels::GgmlType;
use brise_kernels::matmul::{MatmulScratch, RowStep, WeightRef, matmul, matmul_f32};
use brise_kernels::pool::ThreadPool;
use brise_kernels::quant::Kernels;
use std::time::Instant;

fn main() {
    let all: Vec<String> = std::env::args().collect();
    let fast = all.iter().any(|s| s == "--fast");
    let a: Vec<String> = all.into_iter().filter(|s| s != "--fast").collect();
    let ty = GgmlType::from_name(&a[1]).unwrap();
    let n: usize = a[2].parse().unwrap();
    let k: usize = a[3].parse().unwrap();
    let threads: usize = a[4].parse().unwrap();
    let copies: usize = a.get(5).map(|s| s.parse().unwrap()).unwrap_or(1);
    // Activation rows per call (1: GEMV, the decode of one sequence).
    let m: usize = a.get(6).map(|s| s.parse().unwrap()).unwrap_or(1);
    let rb = ty.row_bytes(k).unwrap();
    let mut data = vec![0u8; n * rb * copies];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 13) as u8;
    }
    // Sane f16 scales (and mins, for Q4_K and Q5_K).
    for blk in data.chunks_exact_mut(ty.type_size()) {
        blk[0] = 0x00;
        blk[1] = 0x20;
        if matches!(ty, GgmlType::Q4K | GgmlType::Q5K) {
            blk[2] = 0x00;
            blk[3] = 0x20;
        }
    }
    let pool = ThreadPool::new(threads);
    let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut out = vec![0f32; m * n];
    let steps: Vec<RowStep> = RowStep::all(m).collect();
    let mut sc = MatmulScratch::default();
    let packed: Vec<_> = (0..copies)
        .map(|c| {
            (brise_kernels::packed::packable(ty) && std::env::var_os("NOPACK").is_none()).then(
                || {
                    brise_kernels::packed::Packed::pack(
                        ty,
                        n,
                        k,
                        &data[c * n * rb..(c + 1) * n * rb],
                    )
                },
            )
        })
        .collect();
    let kern = Kernels::best();
    // ITERS=n overrides the count (large matrices at large m take minutes otherwise).
    let iters = std::env::var("ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or((20000 / copies.max(1) / m).max(20));
    let t = Instant::now();
    let mut best = f64::INFINITY;
    for it in 0..iters {
        let t1 = Instant::now();
        let c = it % copies;
        let w = WeightRef {
            ty,
            n,
            k,
            data: &data[c * n * rb..(c + 1) * n * rb],
            packed: packed[c].as_ref(),
            kpacked: None,
        };
        if fast {
            matmul_f32(&pool, &w, &x, m, &mut sc, &mut out);
        } else {
            matmul(&pool, kern, &w, &x, m, &steps, &mut sc, &mut out);
        }
        best = best.min(t1.elapsed().as_secs_f64());
    }
    let dt = t.elapsed().as_secs_f64();
    let bytes = (n * rb * iters) as f64;
    println!(
        "{ty} {n}x{k} m={m} threads={threads} fast={}: {:.1} us/call, {:.2} GB/s of weights, {:.1} GMAC/s (best call {:.1})",
        fast,
        dt / iters as f64 * 1e6,
        bytes / dt / 1e9,
        (n * k * m * iters) as f64 / dt / 1e9,
        (n * k * m) as f64 / best / 1e9
    );
}
