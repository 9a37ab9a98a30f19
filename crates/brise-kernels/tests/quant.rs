//! SIMD dot products against the scalar reference, and the reference against
//! dequantization, on random blocks of every weight format.

use brise_kernels::quant::{Kernels, act_row_bytes, dequantize_row, dot_ref, quantize_act_row};
use brise_kernels::{GgmlType, Isa};
use half::{bf16, f16};

/// Says on the real stderr (past the harness's capture of passing tests' output) what
/// this CPU could not test, so a run without a feature cannot look like a full pass.
fn skipped(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {what}");
}

/// The ISA levels to test here, saying loudly which ones this CPU lacks.
fn supported_isas(test: &str) -> Vec<Isa> {
    let v = Isa::supported();
    for isa in Isa::ALL.into_iter().filter(|i| !v.contains(i)) {
        skipped(&format!(
            "no {} on this CPU: {test} did not test it",
            isa.name()
        ));
    }
    v
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        // Sum of uniforms: close enough to normal for test data.
        (0..6).map(|_| self.unit()).sum::<f32>() - 3.0
    }
}

const WEIGHT_TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Offsets of the f16 scale fields of each block format.
fn scale_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        _ => &[],
    }
}

/// A random row of `k` elements of `ty`: random quant bits, finite scales.
fn random_row(rng: &mut Rng, ty: GgmlType, k: usize) -> Vec<u8> {
    let n = ty.row_bytes(k).unwrap();
    let mut b: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
    match ty {
        GgmlType::F32 => {
            for c in b.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.normal().to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in b.chunks_exact_mut(2) {
                c.copy_from_slice(&f16::from_f32(rng.normal()).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for c in b.chunks_exact_mut(2) {
                c.copy_from_slice(&bf16::from_f32(rng.normal()).to_le_bytes());
            }
        }
        _ => {
            for blk in b.chunks_exact_mut(ty.type_size()) {
                for &o in scale_fields(ty) {
                    let v =
                        (rng.unit() * 0.05 + 0.001) * if rng.next() & 1 == 0 { 1.0 } else { -1.0 };
                    blk[o..o + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
                }
            }
        }
    }
    b
}

fn quantized_acts(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let vt = ty.vec_dot_type();
    let mut a = vec![0u8; act_row_bytes(vt, x.len())];
    quantize_act_row(vt, x, &mut a);
    a
}

#[test]
fn simd_dot_matches_scalar_reference() {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    for isa in supported_isas("simd_dot_matches_scalar_reference") {
        let kern = Kernels::new(isa).unwrap();
        for ty in WEIGHT_TYPES {
            for &k in &[256usize, 512, 1536, 4864] {
                if k % ty.block_size() != 0 {
                    continue;
                }
                for _ in 0..8 {
                    let w = random_row(&mut rng, ty, k);
                    let x: Vec<f32> = (0..k).map(|_| rng.normal()).collect();
                    let a = quantized_acts(ty, &x);
                    let want = dot_ref(ty, k, &w, &a);
                    let got = kern.dot(ty, k, &w, &a);
                    // Bound the float reordering error by the sum of |terms|.
                    let mut wf = vec![0f32; k];
                    dequantize_row(ty, &w, &mut wf);
                    let mag: f32 = wf.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                    let tol = 2e-5 * mag + 1e-6;
                    assert!(
                        (got - want).abs() <= tol,
                        "{isa} {ty} k={k}: simd {got} vs ref {want} (tol {tol})"
                    );
                }
            }
        }
    }
}

#[test]
fn reference_dot_equals_dot_of_dequantized_rows() {
    let mut rng = Rng(12345);
    for ty in WEIGHT_TYPES {
        let k = 512;
        for _ in 0..4 {
            let w = random_row(&mut rng, ty, k);
            let x: Vec<f32> = (0..k).map(|_| rng.normal()).collect();
            let a = quantized_acts(ty, &x);
            let vt = ty.vec_dot_type();
            // Dequantize the activation: Q8 formats store d (and sums) differently, so do
            // it by hand from the block layout.
            let xa: Vec<f32> = match vt {
                GgmlType::Q8_0 | GgmlType::Q8_1 => a
                    .chunks_exact(36)
                    .flat_map(|b| {
                        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                        b[4..36]
                            .iter()
                            .map(move |&q| q as i8 as f32 * d)
                            .collect::<Vec<_>>()
                    })
                    .collect(),
                GgmlType::Q8K => a
                    .chunks_exact(292)
                    .flat_map(|b| {
                        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        b[4..260]
                            .iter()
                            .map(move |&q| q as i8 as f32 * d)
                            .collect::<Vec<_>>()
                    })
                    .collect(),
                GgmlType::F16 => a
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                GgmlType::BF16 => a
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                _ => x.clone(),
            };
            let mut wf = vec![0f32; k];
            dequantize_row(ty, &w, &mut wf);
            let want: f64 = wf.iter().zip(&xa).map(|(a, b)| *a as f64 * *b as f64).sum();
            let mag: f64 = wf
                .iter()
                .zip(&xa)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let got = dot_ref(ty, k, &w, &a) as f64;
            // Q8_1 stores its block sum as f16, so Q4_1/Q5_1 carry that rounding.
            let tol = if vt == GgmlType::Q8_1 {
                2e-3 * mag
            } else {
                1e-5 * mag
            } + 1e-6;
            assert!(
                (got - want).abs() <= tol,
                "{ty}: ref {got} vs dequantized {want}"
            );
        }
    }
}

#[test]
fn activation_quantization_is_within_half_a_step() {
    let mut rng = Rng(777);
    let x: Vec<f32> = (0..512).map(|_| rng.normal() * 3.0).collect();
    for vt in [GgmlType::Q8_0, GgmlType::Q8_1] {
        let mut a = vec![0u8; act_row_bytes(vt, x.len())];
        quantize_act_row(vt, &x, &mut a);
        for (b, xs) in a.chunks_exact(36).zip(x.chunks_exact(32)) {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let mut sum = 0;
            for (q, v) in b[4..].iter().zip(xs) {
                let q = *q as i8 as i32;
                sum += q;
                assert!((q as f32 * d - v).abs() <= d * 0.5 + 1e-6);
            }
            if vt == GgmlType::Q8_0 {
                assert_eq!(i16::from_le_bytes([b[2], b[3]]) as i32, sum);
            } else {
                let s = f16::from_le_bytes([b[2], b[3]]).to_f32();
                assert_eq!(s, f16::from_f32(d * sum as f32).to_f32());
            }
        }
    }
    let mut a = vec![0u8; act_row_bytes(GgmlType::Q8K, x.len())];
    quantize_act_row(GgmlType::Q8K, &x, &mut a);
    for (b, xs) in a.chunks_exact(292).zip(x.chunks_exact(256)) {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for g in 0..16 {
            let s: i32 = b[4 + 16 * g..4 + 16 * g + 16]
                .iter()
                .map(|q| *q as i8 as i32)
                .sum();
            assert_eq!(
                i16::from_le_bytes([b[260 + 2 * g], b[261 + 2 * g]]) as i32,
                s
            );
        }
        for (q, v) in b[4..260].iter().zip(xs) {
            assert!((*q as i8 as f32 * d - v).abs() <= d.abs() * 0.5 + 1e-6);
        }
    }
}

#[test]
fn zero_block_quantizes_to_zero() {
    let x = vec![0f32; 256];
    for vt in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8K] {
        let mut a = vec![0xffu8; act_row_bytes(vt, 256)];
        quantize_act_row(vt, &x, &mut a);
        assert!(a.iter().all(|b| *b == 0), "{vt}");
    }
}

#[test]
fn simd_paths_are_bit_identical_to_the_ggml_models() {
    use brise_kernels::quant::ggml_exact::{Path, ggml_dot, is_modeled};
    let paths = [
        Path::VecDot,
        Path::TinyBlasQ0,
        Path::TinyBlasF16,
        Path::Tiled,
        Path::RepackGemv,
        Path::RepackGemm,
    ];
    let mut rng = Rng(4242);
    let mut checked = 0;
    // Scalar's dot_path is the model itself: comparing it would test nothing.
    for isa in supported_isas("simd_paths_are_bit_identical_to_the_ggml_models")
        .into_iter()
        .filter(|i| *i != Isa::Scalar)
    {
        let kern = Kernels::new(isa).unwrap();
        for ty in WEIGHT_TYPES {
            for path in paths {
                if !is_modeled(path, ty) {
                    continue;
                }
                for &k in &[256usize, 1024] {
                    for _ in 0..6 {
                        let w = random_row(&mut rng, ty, k);
                        let x: Vec<f32> = (0..k).map(|_| rng.normal()).collect();
                        let a = quantized_acts(ty, &x);
                        let want = ggml_dot(path, ty, k, &w, &a);
                        let got = kern.dot_path(path, ty, k, &w, &a);
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{isa} {ty} {path:?} k={k}: {got} vs {want}"
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 100);
}

#[test]
fn packed_matmul_is_bit_identical_to_the_ggml_models() {
    use brise_kernels::matmul::{MatmulScratch, RowStep, WeightRef, matmul};
    use brise_kernels::packed::Packed;
    use brise_kernels::pool::ThreadPool;
    use brise_kernels::quant::ggml_exact::{ggml_dot, ggml_path_shaped};
    let Some(kern) = Kernels::new(Isa::Avx512Vnni) else {
        return skipped("no AVX-512 VNNI on this CPU: the packed matmul kernels were not tested");
    };
    let mut rng = Rng(99);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ] {
        for &(n, k, m) in &[
            (48usize, 256usize, 1usize),
            (40, 512, 3),
            (16, 96, 5),
            (72, 1024, 2),
            (35, 64, 4),
            // The kernel takes activation rows 4, then 2, then 1 at a time, in chunks of 64.
            (40, 256, 7),
            (32, 128, 9),
            (16, 64, 70),
        ] {
            let w: Vec<u8> = (0..n).flat_map(|_| random_row(&mut rng, ty, k)).collect();
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal() * 2.0).collect();
            let packed = Packed::pack(ty, n, k, &w);
            for threads in [1, 2] {
                let pool = ThreadPool::new(threads);
                let steps: Vec<RowStep> = RowStep::all(m).collect();
                let wr = WeightRef {
                    ty,
                    n,
                    k,
                    data: &w,
                    packed: Some(&packed),
                    kpacked: None,
                };
                let mut out = vec![0f32; m * n];
                matmul(
                    &pool,
                    kern,
                    &wr,
                    &x,
                    m,
                    &steps,
                    &mut MatmulScratch::default(),
                    &mut out,
                );
                let rb = ty.row_bytes(k).unwrap();
                for i in 0..m {
                    let a = quantized_acts(ty, &x[i * k..(i + 1) * k]);
                    for r in 0..n {
                        let path = ggml_path_shaped(ty, n, k, m, i);
                        let want = ggml_dot(path, ty, k, &w[r * rb..(r + 1) * rb], &a);
                        assert_eq!(
                            out[i * n + r].to_bits(),
                            want.to_bits(),
                            "{ty} n={n} k={k} m={m} row {r} act {i}: {} vs {want}",
                            out[i * n + r]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn kpacked_matmul_is_bit_identical_to_the_ggml_models() {
    use brise_kernels::kpacked::KPacked;
    use brise_kernels::matmul::{MatmulScratch, RowStep, WeightRef, matmul};
    use brise_kernels::pool::ThreadPool;
    use brise_kernels::quant::ggml_exact::{ggml_dot, ggml_path_shaped};
    let Some(kern) = Kernels::new(Isa::Avx512Vnni) else {
        return skipped("no AVX-512 VNNI on this CPU: the packed matmul kernels were not tested");
    };
    let mut rng = Rng(7);
    for ty in [GgmlType::Q6K, GgmlType::Q4K] {
        // Step sizes that take every path: 1 (vec_dot / GEMV), 5 (vec_dot; GEMM + GEMV
        // leftovers), 9 (tiled; GEMM + a GEMV leftover).
        for &(n, k, m) in &[
            (32usize, 512usize, 1usize),
            (40, 256, 5),
            (16, 768, 9),
            (24, 256, 2),
        ] {
            let w: Vec<u8> = (0..n).flat_map(|_| random_row(&mut rng, ty, k)).collect();
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal() * 2.0).collect();
            let kp = KPacked::pack(ty, n, k, &w);
            for threads in [1, 2] {
                let pool = ThreadPool::new(threads);
                let steps: Vec<RowStep> = RowStep::all(m).collect();
                let wr = WeightRef {
                    ty,
                    n,
                    k,
                    data: &w,
                    packed: None,
                    kpacked: Some(&kp),
                };
                let mut out = vec![0f32; m * n];
                matmul(
                    &pool,
                    kern,
                    &wr,
                    &x,
                    m,
                    &steps,
                    &mut MatmulScratch::default(),
                    &mut out,
                );
                let rb = ty.row_bytes(k).unwrap();
                for i in 0..m {
                    let a = quantized_acts(ty, &x[i * k..(i + 1) * k]);
                    for r in 0..n {
                        let path = ggml_path_shaped(ty, n, k, m, i);
                        let want = ggml_dot(path, ty, k, &w[r * rb..(r + 1) * rb], &a);
                        assert_eq!(
                            out[i * n + r].to_bits(),
                            want.to_bits(),
                            "{ty} {path:?} n={n} k={k} m={m} row {r} act {i}"
                        );
                    }
                }
            }
        }
    }
}
