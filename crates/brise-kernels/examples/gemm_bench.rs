//! Throughput of the f32 backward product `gemm_acc` on one thread, in GFLOP/s of CPU
//! time (user time, so other work on a shared machine does not count against it).
//!
//!   cargo run --release -p brise-kernels --example gemm_bench -- [m] [k] [g]

use brise_kernels::matmul::gemm_acc;

fn cpu_seconds() -> f64 {
    // /proc/self/stat fields 14 and 15: utime and stime in clock ticks (100 Hz).
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let (m, k, g) = (
        *a.first().unwrap_or(&256),
        *a.get(1).unwrap_or(&576),
        *a.get(2).unwrap_or(&64),
    );
    let dy: Vec<f32> = (0..m * g).map(|i| (i % 7) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..g * k).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut acc = vec![0f32; m * k];
    let reps = (4e9 / (2.0 * (m * k * g) as f64)).max(1.0) as usize;
    let t0 = cpu_seconds();
    let w0 = std::time::Instant::now();
    for _ in 0..reps {
        gemm_acc(&mut acc, m, k, &dy, g, 0, g, &w);
    }
    let cpu = cpu_seconds() - t0;
    let flops = 2.0 * (m * k * g * reps) as f64;
    println!(
        "m {m} k {k} g {g}: {:.1} GFLOP/s of CPU time ({:.1} wall), checksum {}",
        flops / cpu / 1e9,
        flops / w0.elapsed().as_secs_f64() / 1e9,
        acc[0]
    );
}
