//! The fast f32 matrix product (training's forward): against a scalar twin bit for bit
//! and against f64 within the float error bound, for several weight types and odd
//! shapes; thread counts and batch composition do not change a row's bits; the flag off
//! leaves the exact kernels' results as they were.

use brise_kernels::matmul::{
    Acts, FAST_MIN_STEP, MatmulScratch, RowStep, WeightRef, matmul, matmul_acts, matmul_f32,
};
use brise_kernels::pool::ThreadPool;
use brise_kernels::quant::ggml_exact::ggml_path_shaped;
use brise_kernels::quant::{Kernels, act_row_bytes, dequantize_row, quantize_act_row};
use brise_kernels::{GgmlType, Isa};
use half::f16;

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
        (0..6).map(|_| self.unit()).sum::<f32>() - 3.0
    }
}

/// Offsets of the f16 scale fields of each block format (as in tests/quant.rs).
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

/// `n` random rows of `k` elements of `ty`: random quant bits, finite scales.
fn random_matrix(rng: &mut Rng, ty: GgmlType, n: usize, k: usize) -> Vec<u8> {
    let len = n * ty.row_bytes(k).unwrap();
    let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
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

fn wref(ty: GgmlType, n: usize, k: usize, data: &[u8]) -> WeightRef<'_> {
    WeightRef {
        ty,
        n,
        k,
        data,
        packed: None,
        kpacked: None,
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn dequantized(w: &WeightRef) -> Vec<f32> {
    let mut wf = vec![0f32; w.n * w.k];
    for r in 0..w.n {
        dequantize_row(w.ty, w.row(r), &mut wf[r * w.k..(r + 1) * w.k]);
    }
    wf
}

/// The scalar twin: each element's k FMAs in increasing order from zero.
fn twin(wf: &[f32], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for r in 0..n {
            let mut s = 0f32;
            for j in 0..k {
                s = x[i * k + j].mul_add(wf[r * k + j], s);
            }
            out[i * n + r] = s;
        }
    }
    out
}

const TYPES: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

#[test]
fn f32_path_matches_its_scalar_twin_and_f64() {
    let mut rng = Rng(0x2545f4914f6cdd1d);
    // n not a multiple of the block of 16 rows; k within one k-block, across two, and
    // (F32 only) not a multiple of 8.
    for ty in TYPES {
        let mut shapes = vec![(37usize, 256usize), (21, 768), (16, 1024)];
        if ty == GgmlType::F32 {
            shapes.push((9, 100));
        }
        for (n, k) in shapes {
            let data = random_matrix(&mut rng, ty, n, k);
            let w = wref(ty, n, k, &data);
            let wf = dequantized(&w);
            for m in [1usize, 5, 17] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let want = twin(&wf, n, k, &x, m);
                let mut sc = MatmulScratch::default();
                for threads in [1, 2, 3] {
                    let pool = ThreadPool::new(threads);
                    let mut out = vec![f32::NAN; m * n];
                    matmul_f32(&pool, &w, &x, m, &mut sc, &mut out);
                    let what = format!("{ty} {n}x{k} m={m} threads={threads}");
                    assert!(bits(&out) == bits(&want), "twin: {what}");
                    for i in 0..m {
                        for r in 0..n {
                            let (mut e, mut mag) = (0f64, 0f64);
                            for j in 0..k {
                                let t = x[i * k + j] as f64 * wf[r * k + j] as f64;
                                e += t;
                                mag += t.abs();
                            }
                            let got = out[i * n + r] as f64;
                            // The bound of k rounded f32 additions: k·2⁻²⁴ of Σ|terms|.
                            let tol = k as f64 * f64::powi(2.0, -24) * mag + 1e-30;
                            assert!((got - e).abs() <= tol, "{what} ({i}, {r}): {got} vs {e}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn a_rows_result_does_not_depend_on_the_batch() {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let (ty, n, k) = (GgmlType::Q4K, 50, 512);
    let data = random_matrix(&mut rng, ty, n, k);
    let w = wref(ty, n, k, &data);
    let m = 23;
    let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
    let pool = ThreadPool::new(2);
    let mut sc = MatmulScratch::default();
    let mut all = vec![0f32; m * n];
    matmul_f32(&pool, &w, &x, m, &mut sc, &mut all);
    for i in [0, 6, 11, 22] {
        let mut one = vec![0f32; n];
        matmul_f32(&pool, &w, &x[i * k..(i + 1) * k], 1, &mut sc, &mut one);
        assert!(bits(&one) == bits(&all[i * n..(i + 1) * n]), "row {i}");
    }
    // The first 7 rows alone (a partial tile of the 6-row kernel, then one row).
    let mut part = vec![0f32; 7 * n];
    matmul_f32(&pool, &w, &x[..7 * k], 7, &mut sc, &mut part);
    assert!(bits(&part) == bits(&all[..7 * n]));
}

/// A batch of two sequences, one with a long step (the f32 path) and one with a short
/// one (the exact kernels), interleaved: each row equals its sequence computed alone.
#[test]
fn fast_kernels_pick_the_path_by_each_rows_own_step() {
    let mut rng = Rng(0xdeadbeefcafef00d);
    let long = FAST_MIN_STEP + 3;
    let short = 3;
    for ty in [GgmlType::Q4K, GgmlType::Q8_0, GgmlType::Q6K] {
        let (n, k) = (40, 256);
        let data = random_matrix(&mut rng, ty, n, k);
        let w = wref(ty, n, k, &data);
        let m = long + short;
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
        // Rows 0, 5 and 10 are the short sequence's.
        let short_rows = [0usize, 5, 10];
        let mut steps = Vec::new();
        let (mut li, mut si) = (0, 0);
        for i in 0..m {
            if short_rows.contains(&i) {
                steps.push(RowStep { n: short, idx: si });
                si += 1;
            } else {
                steps.push(RowStep { n: long, idx: li });
                li += 1;
            }
        }
        let gather = |rows: &[usize]| -> Vec<f32> {
            rows.iter()
                .flat_map(|&i| x[i * k..(i + 1) * k].iter().copied())
                .collect()
        };
        let long_rows: Vec<usize> = (0..m).filter(|i| !short_rows.contains(i)).collect();
        for isa in Isa::supported() {
            let kern = Kernels::new(isa).unwrap();
            let fast = kern.with_fast(true);
            for threads in [1, 2] {
                let pool = ThreadPool::new(threads);
                let mut sc = MatmulScratch::default();
                let mut out = vec![f32::NAN; m * n];
                matmul(&pool, fast, &w, &x, m, &steps, &mut sc, &mut out);
                let (xs, xl) = (gather(&short_rows), gather(&long_rows));
                let mut os = vec![0f32; short * n];
                let ss: Vec<RowStep> = RowStep::all(short).collect();
                matmul(&pool, kern, &w, &xs, short, &ss, &mut sc, &mut os);
                let mut ol = vec![0f32; long * n];
                if fast.fast() {
                    matmul_f32(&pool, &w, &xl, long, &mut sc, &mut ol);
                } else {
                    let sl: Vec<RowStep> = RowStep::all(long).collect();
                    matmul(&pool, kern, &w, &xl, long, &sl, &mut sc, &mut ol);
                }
                let what = format!("{ty} {isa:?} threads={threads}");
                for (j, &i) in short_rows.iter().enumerate() {
                    let got = &out[i * n..(i + 1) * n];
                    assert!(
                        bits(got) == bits(&os[j * n..(j + 1) * n]),
                        "short {i}: {what}"
                    );
                }
                for (j, &i) in long_rows.iter().enumerate() {
                    let got = &out[i * n..(i + 1) * n];
                    assert!(
                        bits(got) == bits(&ol[j * n..(j + 1) * n]),
                        "long {i}: {what}"
                    );
                }
                // Rows made in the section: the same bits.
                let make = |rs: std::ops::Range<usize>, o: &mut [f32]| {
                    o.copy_from_slice(&x[rs.start * k..rs.end * k]);
                };
                let mut buf = vec![f32::NAN; m * k];
                let mut made = vec![f32::NAN; m * n];
                let acts = Acts::Make(&mut buf, &make);
                matmul_acts(&pool, fast, &w, acts, m, &steps, &mut sc, &mut made);
                assert!(bits(&made) == bits(&out), "made rows: {what}");
            }
        }
    }
}

/// The flag off: every row on its exact kernel (llama.cpp's arithmetic for its step),
/// as before the fast path existed. On AVX-512 VNNI the flag changes nothing.
#[test]
fn the_flag_off_keeps_the_exact_kernels() {
    let mut rng = Rng(0x1234567887654321);
    let (n, k) = (48, 512);
    let m = FAST_MIN_STEP + 4;
    for ty in [GgmlType::Q4K, GgmlType::Q8_0, GgmlType::Q4_1] {
        let data = random_matrix(&mut rng, ty, n, k);
        let w = wref(ty, n, k, &data);
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
        let steps: Vec<RowStep> = RowStep::all(m).collect();
        let vt = ty.vec_dot_type();
        let arb = act_row_bytes(vt, k);
        for isa in Isa::supported() {
            let kern = Kernels::new(isa).unwrap();
            assert!(!kern.fast());
            assert_eq!(kern.with_fast(true).fast(), isa < Isa::Avx512Vnni);
            let pool = ThreadPool::new(2);
            let mut sc = MatmulScratch::default();
            let mut out = vec![f32::NAN; m * n];
            let off = kern.with_fast(true).with_fast(false);
            matmul(&pool, off, &w, &x, m, &steps, &mut sc, &mut out);
            let mut a = vec![0u8; arb];
            for (i, s) in steps.iter().enumerate() {
                quantize_act_row(vt, &x[i * k..(i + 1) * k], &mut a);
                let path = ggml_path_shaped(ty, n, k, s.n, s.idx);
                for r in 0..n {
                    let want = kern.dot_path(path, ty, k, w.row(r), &a);
                    assert_eq!(
                        out[i * n + r].to_bits(),
                        want.to_bits(),
                        "{ty} {isa:?} ({i}, {r})"
                    );
                }
            }
        }
    }
}
