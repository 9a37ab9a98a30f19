// Micro-benchmark: GEMV throughput of one weight type (rows × k), single matrix, repeated.
use brise_kernels::GgmlType;
use brise_kernels::matmul::{MatmulScratch, RowStep, WeightRef, matmul};
use brise_kernels::pool::ThreadPool;
use brise_kernels::quant::Kernels;
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
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
    // Sane f16 scales.
    for blk in data.chunks_exact_mut(ty.type_size()) {
        blk[0] = 0x00;
        blk[1] = 0x20;
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
    let iters = (20000 / copies.max(1) / m).max(20);
    let t = Instant::now();
    for it in 0..iters {
        let c = it % copies;
        let w = WeightRef {
            ty,
            n,
            k,
            data: &data[c * n * rb..(c + 1) * n * rb],
            packed: packed[c].as_ref(),
            kpacked: None,
        };
        matmul(&pool, Kernels::best(), &w, &x, m, &steps, &mut sc, &mut out);
    }
    let dt = t.elapsed().as_secs_f64();
    let bytes = (n * rb * iters) as f64;
    println!(
        "{ty} {n}x{k} m={m} threads={threads}: {:.1} us/call, {:.2} GB/s of weights, {:.1} GMAC/s",
        dt / iters as f64 * 1e6,
        bytes / dt / 1e9,
        (n * k * m * iters) as f64 / dt / 1e9
    );
}
