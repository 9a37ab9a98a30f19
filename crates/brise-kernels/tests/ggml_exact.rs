//! Bit equality of `quant::ggml_exact` with outputs of ggml's own CPU matrix products.
//!
//! Fixtures: `tests/fixtures/matmul/` (`scripts/ref/gen_matmul_exact.py`). Each case is a
//! ggml `MUL_MAT` of a weight matrix (quantized by ggml) with the first `n` rows of a
//! shared f32 activation pool. The activations are quantized here with brise's own
//! quantizer; every output element must equal ggml's bit for bit.

use brise_kernels::GgmlType;
use brise_kernels::quant::ggml_exact::{Path, ggml_dot, ggml_path, ggml_path_shaped, is_modeled};
use brise_kernels::quant::{act_row_bytes, quantize_act_row};
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/matmul")
}

struct Weight {
    ty: GgmlType,
    rows: usize,
    k: usize,
    row_bytes: usize,
    offset: usize,
}

struct Case {
    ty: GgmlType,
    weight: usize,
    w_rows: usize,
    k: usize,
    n: usize,
    repack: bool,
    out_offset: usize,
    equal_single: Vec<bool>,
}

/// A MUL_MAT captured inside llama.cpp's forward pass of the real Qwen2.5-Coder model.
struct ModelCase {
    ty: GgmlType,
    tensor: String,
    w_rows: usize,
    stored_rows: usize,
    k: usize,
    n: usize,
    repack: bool,
    row_bytes: usize,
    w_offset: usize,
    x_offset: usize,
    out_offset: usize,
}

struct Fixtures {
    bin: Vec<u8>,
    model_cases: Vec<ModelCase>,
    pool_k: usize,
    pool_offset: usize,
    weights: Vec<Weight>,
    cases: Vec<Case>,
}

fn load() -> Fixtures {
    let dir = fixture_dir();
    let text = std::fs::read_to_string(dir.join("cases.txt")).expect("cases.txt");
    let bin = std::fs::read(dir.join("matmul.bin")).expect("matmul.bin");
    let mut f = Fixtures {
        bin,
        pool_k: 0,
        pool_offset: 0,
        weights: Vec::new(),
        cases: Vec::new(),
        model_cases: Vec::new(),
    };
    let ty = |s: &str| GgmlType::from_name(s).unwrap_or_else(|| panic!("type {s}"));
    let num = |s: &str| s.parse::<usize>().unwrap();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w[0] {
            "pool" => {
                f.pool_k = num(w[2]);
                f.pool_offset = num(w[3]);
            }
            "weight" => {
                assert_eq!(num(w[1]), f.weights.len());
                f.weights.push(Weight {
                    ty: ty(w[2]),
                    rows: num(w[3]),
                    k: num(w[4]),
                    row_bytes: num(w[5]),
                    offset: num(w[6]),
                });
            }
            "case" => f.cases.push(Case {
                ty: ty(w[1]),
                weight: num(w[2]),
                w_rows: num(w[3]),
                k: num(w[4]),
                n: num(w[5]),
                repack: w[6] == "1",
                out_offset: num(w[7]),
                equal_single: w[8].chars().map(|c| c == 'T').collect(),
            }),
            "mcase" => f.model_cases.push(ModelCase {
                ty: ty(w[1]),
                tensor: w[2].to_string(),
                w_rows: num(w[3]),
                stored_rows: num(w[4]),
                k: num(w[5]),
                n: num(w[6]),
                repack: w[7] == "1",
                row_bytes: num(w[8]),
                w_offset: num(w[9]),
                x_offset: num(w[10]),
                out_offset: num(w[11]),
            }),
            other => panic!("unknown record {other}"),
        }
    }
    f
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Runs every case of `filter`; returns (elements checked, mismatch descriptions).
fn run(filter: impl Fn(&Case) -> bool) -> (usize, Vec<String>) {
    let f = load();
    let mut checked = 0;
    let mut bad = Vec::new();
    for c in f.cases.iter().filter(|c| filter(c)) {
        let w = &f.weights[c.weight];
        assert_eq!((w.ty, w.rows, w.k), (c.ty, c.w_rows, c.k));
        assert_eq!(w.row_bytes, c.ty.row_bytes(c.k).unwrap());
        let vt = c.ty.vec_dot_type();
        let arb = act_row_bytes(vt, c.k);
        let expected = f32s(&f.bin[c.out_offset..c.out_offset + 4 * c.n * c.w_rows]);
        let mut mism = 0;
        let mut first = None;
        for j in 0..c.n {
            let xo = f.pool_offset + 4 * j * f.pool_k;
            let x = f32s(&f.bin[xo..xo + 4 * c.k]);
            let mut act = vec![0u8; arb];
            quantize_act_row(vt, &x, &mut act);
            let path = ggml_path_shaped(c.ty, c.w_rows, c.k, c.n, j);
            assert_eq!(
                c.repack,
                matches!(path, Path::RepackGemv | Path::RepackGemm),
                "{} rows={} n={}: repack flag vs path {path:?}",
                c.ty,
                c.w_rows,
                c.n
            );
            assert!(is_modeled(path, c.ty), "{path:?} {}", c.ty);
            // The fixture records whether ggml gave the same row as a one-row run; the
            // path model must agree (same path => same value, by construction of the model).
            let single = ggml_path_shaped(c.ty, c.w_rows, c.k, 1, 0);
            for r in 0..c.w_rows {
                let wr = &f.bin[w.offset + r * w.row_bytes..w.offset + (r + 1) * w.row_bytes];
                let got = ggml_dot(path, c.ty, c.k, wr, &act);
                let want = expected[j * c.w_rows + r];
                checked += 1;
                if got.to_bits() != want.to_bits() {
                    mism += 1;
                    first.get_or_insert(format!("j={j} r={r} got {got:e} want {want:e}"));
                }
                if c.equal_single[j] {
                    let one = ggml_dot(single, c.ty, c.k, wr, &act);
                    assert_eq!(one.to_bits(), want.to_bits(), "single-row path {single:?}");
                }
            }
        }
        if mism > 0 {
            bad.push(format!(
                "{} rows={} k={} n={} repack={}: {mism}/{} differ (first: {})",
                c.ty,
                c.w_rows,
                c.k,
                c.n,
                c.repack,
                c.n * c.w_rows,
                first.unwrap()
            ));
        }
    }
    (checked, bad)
}

fn check(types: &[GgmlType]) {
    let (checked, bad) = run(|c| types.contains(&c.ty));
    assert!(checked > 0, "no fixture for {types:?}");
    assert!(bad.is_empty(), "mismatches:\n{}", bad.join("\n"));
}

#[test]
fn q5_0_q8_0_q4_0_vec_dot_and_tinyblas() {
    check(&[GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_0]);
}

#[test]
fn q4_1_q5_1_vec_dot() {
    check(&[GgmlType::Q4_1, GgmlType::Q5_1]);
}

#[test]
fn q6_k_vec_dot_and_tiled() {
    check(&[GgmlType::Q6K]);
}

#[test]
fn q4_k_vec_dot_tiled_and_repack() {
    check(&[GgmlType::Q4K]);
}

#[test]
fn q2_k_q3_k_q5_k() {
    check(&[GgmlType::Q2K, GgmlType::Q3K, GgmlType::Q5K]);
}

#[test]
fn f16_vec_dot_and_tinyblas() {
    check(&[GgmlType::F16]);
}

/// llama.cpp's own outputs in a real forward pass (Q5_0 attn_q, Q6_K and repacked Q4_K
/// ffn_down of Qwen2.5-Coder), for decode (n = 1) and small prompt ubatches.
#[test]
fn real_model_mul_mats() {
    let f = load();
    assert_eq!(f.model_cases.len(), 5);
    let mut bad = Vec::new();
    for c in &f.model_cases {
        assert_eq!(c.row_bytes, c.ty.row_bytes(c.k).unwrap());
        let vt = c.ty.vec_dot_type();
        let expected = f32s(&f.bin[c.out_offset..c.out_offset + 4 * c.n * c.stored_rows]);
        for j in 0..c.n {
            let xo = c.x_offset + 4 * j * c.k;
            let x = f32s(&f.bin[xo..xo + 4 * c.k]);
            let mut act = vec![0u8; act_row_bytes(vt, c.k)];
            quantize_act_row(vt, &x, &mut act);
            let path = ggml_path_shaped(c.ty, c.w_rows, c.k, c.n, j);
            assert_eq!(
                c.repack,
                matches!(path, Path::RepackGemv | Path::RepackGemm)
            );
            assert_eq!(
                path,
                ggml_path(c.ty, c.n, j),
                "real shapes take the default paths"
            );
            for r in 0..c.stored_rows {
                let wr = &f.bin[c.w_offset + r * c.row_bytes..c.w_offset + (r + 1) * c.row_bytes];
                let got = ggml_dot(path, c.ty, c.k, wr, &act);
                let want = expected[j * c.stored_rows + r];
                if got.to_bits() != want.to_bits() {
                    bad.push(format!(
                        "{} ({}) n={} j={j} r={r} {path:?}: got {got:e} want {want:e}",
                        c.tensor, c.ty, c.n
                    ));
                }
            }
        }
    }
    assert!(bad.is_empty(), "mismatches:\n{}", bad.join("\n"));
}

#[test]
fn every_fixture_case_is_covered() {
    let f = load();
    assert_eq!(f.cases.len(), 71);
    for c in &f.cases {
        assert_eq!(c.equal_single.len(), c.n);
    }
}

#[test]
fn path_table() {
    use GgmlType::*;
    // decode: vec_dot for everything not repacked
    for ty in [F16, Q4_1, Q5_0, Q5_1, Q8_0, Q3K, Q5K, Q6K] {
        assert_eq!(ggml_path(ty, 1, 0), Path::VecDot, "{ty}");
    }
    for ty in [Q4_0, Q4K, Q2K] {
        assert_eq!(ggml_path(ty, 1, 0), Path::RepackGemv, "{ty}");
        assert_eq!(ggml_path(ty, 3, 2), Path::RepackGemv, "{ty}");
        assert_eq!(ggml_path(ty, 5, 3), Path::RepackGemm, "{ty}");
        assert_eq!(ggml_path(ty, 5, 4), Path::RepackGemv, "{ty}");
        assert_eq!(ggml_path(ty, 19, 15), Path::RepackGemm, "{ty}");
        assert_eq!(ggml_path(ty, 19, 16), Path::RepackGemv, "{ty}");
    }
    for n in [2, 3, 8, 19] {
        assert_eq!(ggml_path(Q5_0, n, 0), Path::TinyBlasQ0);
        assert_eq!(ggml_path(Q8_0, n, n - 1), Path::TinyBlasQ0);
        assert_eq!(ggml_path(Q4_1, n, 0), Path::VecDot);
        assert_eq!(ggml_path(F16, n, 1), Path::TinyBlasF16);
    }
    for ty in [Q3K, Q5K, Q6K] {
        assert_eq!(ggml_path(ty, 7, 6), Path::VecDot, "{ty}");
        assert_eq!(ggml_path(ty, 8, 0), Path::Tiled, "{ty}");
    }
    // shapes that leave the fast paths
    assert_eq!(ggml_path_shaped(Q4K, 20, 1024, 9, 0), Path::Tiled);
    assert_eq!(ggml_path_shaped(Q4K, 20, 1024, 7, 0), Path::VecDot);
    assert_eq!(ggml_path_shaped(Q4_0, 20, 1024, 3, 0), Path::TinyBlasQ0);
    assert_eq!(ggml_path_shaped(F16, 24, 1000, 3, 0), Path::VecDot);
    assert_eq!(ggml_path_shaped(F16, 22, 1024, 3, 0), Path::VecDot);
}
