//! Scalar, bit-exact models of the float arithmetic of llama.cpp's CPU matrix products.
//!
//! Reference build: llama-cpp-python 0.3.36 (vendored llama.cpp), GCC 12.2, x86-64 with
//! AVX-512 F/BW/DQ/VL + VNNI + VBMI, FMA, F16C, `GGML_NATIVE=OFF`, AMX off,
//! `GGML_LLAMAFILE=1`, CPU_REPACK buffers on. All paths below are in
//! `ggml/src/ggml-cpu/`.
//!
//! Every output element `out[j][r] = W[r,:] · x[j,:]` of a ggml `MUL_MAT` is computed
//! by exactly one kernel (see [`ggml_path`]). For each kernel, the integer part (sums of
//! weight codes times activation codes, scales and mins) is exact, so only its *grouping*
//! matters where ggml converts partial integer sums to f32 (the SIMD "lanes"). The float
//! part is reproduced operation by operation, with `f32::mul_add` wherever the compiled
//! code uses an FMA (explicit intrinsics, or GCC's `-ffp-contract=fast` contraction of a
//! product feeding an add, checked in the disassembly and by the fixtures).
//!
//! None of the kernels' per-element arithmetic depends on the thread count, the chunking
//! or the position of the element in a tile; it depends only on the weight type, on the
//! path, and (for the repacked Q4_K/Q2_K/Q4_0) on whether the activation row is one of a
//! group of four handled by the GEMM or a leftover handled by the GEMV.
//!
//! Inputs: a weight row of `k` elements in GGUF layout and one activation row in brise's
//! activation format for `wty.vec_dot_type()` (see [`super::quantize_act_row`]): brise's
//! 36-byte Q8_0 blocks `{d, isum, qs}`, ggml's Q8_1 `{d, s, qs}`, ggml's Q8_K
//! `{d: f32, qs[256], bsums[16]}`, or plain f16. The repack GEMM's activations come from
//! `ggml_quantize_mat_q8_K_4x8` / `ggml_quantize_mat_q8_0_4x8` (four rows interleaved);
//! their codes and scales equal the row-wise quantizers' (`quantize_row_q8_K_ref`,
//! `quantize_row_q8_0`) except that Q8_K's 4x8 variant picks the sign of the scale
//! differently when `+amax` and `-amax` both occur in a block, which flips the signs of
//! `d` and of all codes of that block together and leaves every product unchanged. So the
//! row-wise activation rows serve every path.

use super::dequant::f16_at;
use super::dot_ref::{kquant_d, kquant_values, legacy_values};
use crate::ggml_type::{GgmlType, QK_K};
use half::f16;

/// The kernel llama.cpp runs for one output element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// `ggml_vec_dot_<w>_<act>` (`arch/x86/quants.c`, `vec.cpp` for F16), called by
    /// `ggml_compute_forward_mul_mat_one_chunk` (`ggml-cpu.c`).
    VecDot,
    /// llamafile `tinyBLAS_Q0_AVX` (`llamafile/sgemm.cpp`), Q4_0/Q5_0/Q8_0 weights with at
    /// least two activation rows. Its per-element arithmetic equals [`Path::VecDot`]'s.
    TinyBlasQ0,
    /// llamafile `tinyBLAS<16, __m512, __m512, ggml_fp16_t, ggml_fp16_t, float>`.
    TinyBlasF16,
    /// The tiled K-quant matmul (`tiled/tiled.cpp`, VNNI microkernel in
    /// `tiled/tiled-kernel.cpp`), K-quants with at least eight activation rows.
    Tiled,
    /// Repacked weights (`repack.cpp` + `arch/x86/repack.cpp`), GEMV kernel.
    RepackGemv,
    /// Repacked weights, GEMM kernel (activation rows in groups of four).
    RepackGemm,
}

/// Which kernel llama.cpp uses for activation row `row_index_in_step` of a `MUL_MAT` with
/// `n_rows_in_step` activation rows (tokens of the ubatch), assuming a weight matrix whose
/// row count is a multiple of 8, whose row length is a multiple of 16, and that lives in
/// llama.cpp's CPU_REPACK buffer when its type is repackable (true for every matrix of the
/// test models; see [`ggml_path_shaped`] for the general rule).
pub fn ggml_path(wty: GgmlType, n_rows_in_step: usize, row_index_in_step: usize) -> Path {
    ggml_path_shaped(wty, 8, 16, n_rows_in_step, row_index_in_step)
}

/// [`ggml_path`] for a weight of `w_rows` rows of `k` elements (a weight in the CPU_REPACK
/// buffer type, as llama.cpp's loader places every repackable matrix).
///
/// The dispatch, in order:
/// 1. `ggml_compute_forward` (`ggml-cpu.c`) first asks `ggml_cpu_extra_compute_forward`
///    (`traits.cpp`): a weight in the CPU_REPACK buffer with a repack layout
///    (`ggml_repack_get_optimal_repack_type`, `repack.cpp`: on x86 Q4_0 8x8 and Q4_K 8x8
///    with AVX2, Q2_K 8x8 with AVX-512, IQ4_NL/MXFP4 8x8, each only if `w_rows % 8 == 0`) runs
///    `tensor_traits::forward_mul_mat`: rows `0 .. n - n % 4` go through `gemm` (if
///    `n > 3`), the remaining `n % 4` rows through `gemv` (`forward_mul_mat_one_chunk`).
///    The activation is quantized per plane, so the grouping uses the row index.
/// 2. `ggml_compute_forward_mul_mat` calls `ggml_compute_forward_mul_mat_tiled`
///    (`tiled/tiled.cpp`): Q2_K..Q6_K (and IQ types) with `n >= 8`
///    (`ggml_tiled_min_batch`) and no repack layout.
/// 3. `llamafile_sgemm` (`llamafile/sgemm.cpp`), only for `n >= 2`: Q4_0/Q5_0/Q8_0 (and
///    IQ4_NL) always (tinyBLAS_Q0_AVX); F16 if `k % 16 == 0 && w_rows % 4 == 0`
///    (`tinyBLAS::matmul`), else it returns false.
/// 4. Otherwise `vec_dot` for every element (Q4_1 and Q5_1 always).
pub fn ggml_path_shaped(
    wty: GgmlType,
    w_rows: usize,
    k: usize,
    n_rows_in_step: usize,
    row_index_in_step: usize,
) -> Path {
    use GgmlType::*;
    let n = n_rows_in_step;
    let repack = match wty {
        Q4_0 | Q4K | Q2K => w_rows.is_multiple_of(8),
        _ => false,
    };
    if repack {
        return if n > 3 && row_index_in_step < n - n % 4 {
            Path::RepackGemm
        } else {
            Path::RepackGemv
        };
    }
    match wty {
        Q2K | Q3K | Q4K | Q5K | Q6K if n >= 8 => Path::Tiled,
        Q4_0 | Q5_0 | Q8_0 if n >= 2 => Path::TinyBlasQ0,
        F16 if n >= 2 && k.is_multiple_of(16) && w_rows.is_multiple_of(4) => Path::TinyBlasF16,
        _ => Path::VecDot,
    }
}

/// Whether [`ggml_dot`] models `path` for weights of type `wty`.
pub fn is_modeled(path: Path, wty: GgmlType) -> bool {
    use GgmlType::*;
    match path {
        Path::VecDot => matches!(
            wty,
            F16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
        ),
        Path::TinyBlasQ0 => matches!(wty, Q4_0 | Q5_0 | Q8_0),
        Path::TinyBlasF16 => wty == F16,
        Path::Tiled => matches!(wty, Q2K | Q3K | Q4K | Q5K | Q6K),
        Path::RepackGemv | Path::RepackGemm => matches!(wty, Q4_0 | Q4K | Q2K),
    }
}

/// One output element as llama.cpp computes it on `path`: weight row `w` (`k` elements of
/// `wty`, GGUF layout) times activation row `a` (brise's format for `wty.vec_dot_type()`).
///
/// Panics if `!is_modeled(path, wty)` or a row is too short.
pub fn ggml_dot(path: Path, wty: GgmlType, k: usize, w: &[u8], a: &[u8]) -> f32 {
    use GgmlType::*;
    match (path, wty) {
        (Path::VecDot | Path::TinyBlasQ0, Q4_0 | Q5_0 | Q8_0) | (Path::VecDot, Q4_1 | Q5_1) => {
            vec_dot_legacy(wty, k, w, a)
        }
        (Path::VecDot, Q2K) => vec_dot_q2_k(k, w, a),
        (Path::VecDot, Q3K) => vec_dot_q3_k(k, w, a),
        (Path::VecDot, Q4K) => vec_dot_q4_k(k, w, a),
        (Path::VecDot, Q5K) => vec_dot_q5_k(k, w, a),
        (Path::VecDot, Q6K) => vec_dot_q6_k(k, w, a),
        (Path::VecDot, F16) => vec_dot_f16(k, w, a),
        (Path::TinyBlasF16, F16) => tinyblas_f16(k, w, a),
        (Path::Tiled, Q2K | Q3K | Q4K | Q5K | Q6K) => tiled_kquant(wty, k, w, a),
        (Path::RepackGemv, Q4_0) => repack_q4_0(k, w, a),
        (Path::RepackGemm, Q4_0) => repack_q4_0(k, w, a),
        (Path::RepackGemv, Q4K | Q2K) => repack_kquant(wty, false, k, w, a),
        (Path::RepackGemm, Q4K | Q2K) => repack_kquant(wty, true, k, w, a),
        _ => panic!("{path:?} is not modeled for {wty}"),
    }
}

// ------------------------------------------------------------------------------ helpers

#[inline]
fn f32_at(b: &[u8], o: usize) -> f32 {
    f32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

#[inline]
fn i16_at(b: &[u8], o: usize) -> i32 {
    i16::from_le_bytes([b[o], b[o + 1]]) as i32
}

/// `hsum_float_8` (`arch/x86/quants.c`) and llamafile's `hsum(__m256)`: high 128 + low
/// 128, then `[0]+[2]`, `[1]+[3]`, then the two.
#[inline]
pub fn hsum_float_8(a: [f32; 8]) -> f32 {
    let t = [a[4] + a[0], a[5] + a[1], a[6] + a[2], a[7] + a[3]];
    (t[0] + t[2]) + (t[1] + t[3])
}

/// The 4-lane tail of `hsum_float_8` (`movehl` + `add_ss(movehdup)`).
#[inline]
fn hsum_float_4(t: [f32; 4]) -> f32 {
    (t[0] + t[2]) + (t[1] + t[3])
}

/// GCC 12's `_mm512_reduce_add_ps`: high 256 + low 256, high 128 + low 128, then
/// `[0]+[2]`, `[1]+[3]`, then the two.
#[inline]
pub fn reduce_add_ps_512(a: [f32; 16]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|i| a[8 + i] + a[i]);
    hsum_float_4([h[4] + h[0], h[5] + h[1], h[6] + h[2], h[7] + h[3]])
}

/// The eight int32 lanes of a 32-byte `dpbusd`/`maddubs`+`madd` product: lane `L` sums the
/// products of bytes `4L .. 4L+4`.
#[inline]
fn lanes8(q: &[i32], a: &[u8]) -> [i32; 8] {
    std::array::from_fn(|l| {
        (0..4)
            .map(|i| q[4 * l + i] * (a[4 * l + i] as i8 as i32))
            .sum()
    })
}

/// Q8_K activation block: (d, qs as i32, bsums).
#[inline]
fn q8k_block(y: &[u8]) -> (f32, [i32; QK_K], [i32; 16]) {
    let qs = std::array::from_fn(|i| y[4 + i] as i8 as i32);
    let bs = std::array::from_fn(|g| i16_at(y, 260 + 2 * g));
    (f32_at(y, 0), qs, bs)
}

fn blocks<'a>(
    wty: GgmlType,
    k: usize,
    w: &'a [u8],
    a: &'a [u8],
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
    let (bk, ab) = match wty.vec_dot_type() {
        GgmlType::Q8K => (QK_K, 292),
        _ => (32, 36),
    };
    assert!(
        k.is_multiple_of(bk),
        "k = {k} is not a whole number of blocks"
    );
    let nb = k / bk;
    let ts = wty.type_size();
    assert!(w.len() >= nb * ts && a.len() >= nb * ab, "row too short");
    w.chunks_exact(ts).zip(a.chunks_exact(ab)).take(nb)
}

// ------------------------------------------------------------------------------ vec_dot

/// `ggml_vec_dot_{q4_0,q5_0,q8_0}_q8_0` and `ggml_vec_dot_{q4_1,q5_1}_q8_1` (AVX2 branch
/// of `arch/x86/quants.c`; `mul_sum_i8_pairs_float` / `mul_sum_us8_pairs_float` are one
/// `vpdpbusd` with AVX-512 VNNI). Also the exact element arithmetic of `tinyBLAS_Q0_AVX`
/// (`gemm<RM,RN>`, `gemm4xN`, `gemmMx4`: the same lanes, `madd` = FMA with
/// `d_w·d_a`, and `hsum(__m256)` = `hsum_float_8`).
///
/// ```text
/// acc[0..8] = 0; summs = 0
/// per block: d = f16(w.d) * f16(a.d)
///            acc[L] = fma(d, f32(Σ_{i<4} wq[4L+i]·aq[4L+i]), acc[L])
///            (Q4_1/Q5_1) summs = summs + f16(w.m) * f16(a.s)
/// result = hsum_float_8(acc) (+ summs)
/// ```
///
/// The product of two f16 values is exact in f32, so whether GCC contracts
/// `summs += m * s` into an FMA (it does contract elsewhere in this file, see
/// [`vec_dot_q5_k`]) cannot change the result.
pub fn vec_dot_legacy(wty: GgmlType, k: usize, w: &[u8], a: &[u8]) -> f32 {
    let has_min = matches!(wty, GgmlType::Q4_1 | GgmlType::Q5_1);
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (x, y) in blocks(wty, k, w, a) {
        let q = legacy_values(wty, x);
        let lanes = lanes8(&q, &y[4..36]);
        let d = f16_at(x, 0) * f16_at(y, 0);
        for l in 0..8 {
            acc[l] = d.mul_add(lanes[l] as f32, acc[l]);
        }
        if has_min {
            summs += f16_at(x, 2) * f16_at(y, 2);
        }
    }
    if has_min {
        hsum_float_8(acc) + summs
    } else {
        hsum_float_8(acc)
    }
}

/// `ggml_vec_dot_q6_K_q8_K` (AVX2 branch). The codes enter unsigned (0..63); the `-32`
/// offset is subtracted per lane as `32·(bsums[2L]·sc[2L] + bsums[2L+1]·sc[2L+1])`, a
/// different grouping than the products, so the lane values matter.
///
/// ```text
/// per block: d = a.d * f16(w.d)
///   lane[L] = Σ_{e: (e%32)/4 == L} sc[e/16]·code[e]·aq[e] − 32·(bs[2L]·sc[2L] + bs[2L+1]·sc[2L+1])
///   acc[L] = fma(d, f32(lane[L]), acc[L])
/// result = hsum_float_8(acc)
/// ```
pub fn vec_dot_q6_k(k: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in blocks(GgmlType::Q6K, k, w, a) {
        let (v, sc, _) = kquant_values(GgmlType::Q6K, x);
        let (dy, aq, bs) = q8k_block(y);
        let d = dy * f16_at(x, 208);
        let mut lanes = [0i32; 8];
        for e in 0..QK_K {
            lanes[(e % 32) / 4] += sc[e / 16] * (v[e] + 32) * aq[e];
        }
        for l in 0..8 {
            let sub = 32 * (bs[2 * l] * sc[2 * l] + bs[2 * l + 1] * sc[2 * l + 1]);
            acc[l] = d.mul_add((lanes[l] - sub) as f32, acc[l]);
        }
    }
    hsum_float_8(acc)
}

/// Lanes of a K-quant block dot with codes `q` and per-16 scales `sc`:
/// `lane[L] = Σ_{e: (e%32)/4 == L} sc[e/16]·q[e]·aq[e]`.
#[inline]
fn kquant_lanes(q: &[i32; QK_K], sc: &[i32; 16], aq: &[i32; QK_K]) -> [i32; 8] {
    let mut lanes = [0i32; 8];
    for e in 0..QK_K {
        lanes[(e % 32) / 4] += sc[e / 16] * q[e] * aq[e];
    }
    lanes
}

/// `ggml_vec_dot_q4_K_q8_K` (AVX2 branch).
///
/// ```text
/// per block: d = a.d * f16(w.d); dmin = (-a.d) * f16(w.dmin)
///   acc[L]  = fma(d, f32(Σ_{(e%32)/4==L} sc[e/32]·q[e]·aq[e]), acc[L])          (8 lanes)
///   S[s] = bs[2s] + bs[2s+1]
///   accm[l] = fma(dmin, f32(m[2l]·S[2l] + m[2l+1]·S[2l+1]), accm[l])           (4 lanes)
/// result = hsum_float_8(acc) + ((accm[0]+accm[2]) + (accm[1]+accm[3]))
/// ```
pub fn vec_dot_q4_k(k: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    let mut accm = [0f32; 4];
    for (x, y) in blocks(GgmlType::Q4K, k, w, a) {
        let (q, sc, mn) = kquant_values(GgmlType::Q4K, x);
        let (dy, aq, bs) = q8k_block(y);
        let (dx, dminx) = kquant_d(GgmlType::Q4K, x);
        let d = dy * dx;
        let dmin = -dy * dminx;
        let lanes = kquant_lanes(&q, &sc, &aq);
        for l in 0..8 {
            acc[l] = d.mul_add(lanes[l] as f32, acc[l]);
        }
        for l in 0..4 {
            // mn is per 16 elements: sub-block s (32 elements) has mn[2s].
            let s0 = bs[4 * l] + bs[4 * l + 1];
            let s1 = bs[4 * l + 2] + bs[4 * l + 3];
            let prod = mn[4 * l] * s0 + mn[4 * l + 2] * s1;
            accm[l] = dmin.mul_add(prod as f32, accm[l]);
        }
    }
    hsum_float_8(acc) + hsum_float_4(accm)
}

/// `ggml_vec_dot_q5_K_q8_K` (AVX2 branch).
///
/// ```text
/// per block: d = a.d * f16(w.d); dmin = (-a.d) * f16(w.dmin)
///   acc[L] = fma(d, f32(Σ_{(e%32)/4==L} sc[e/32]·q[e]·aq[e]), acc[L])
///   summs  = fma(dmin, f32(Σ_s m[s]·(bs[2s]+bs[2s+1])), summs)   (GCC contracts `summs += dmin * x`)
/// result = hsum_float_8(acc) + summs
/// ```
pub fn vec_dot_q5_k(k: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (x, y) in blocks(GgmlType::Q5K, k, w, a) {
        let (q, sc, mn) = kquant_values(GgmlType::Q5K, x);
        let (dy, aq, bs) = q8k_block(y);
        let (dx, dminx) = kquant_d(GgmlType::Q5K, x);
        let d = dy * dx;
        let dmin = -dy * dminx;
        let lanes = kquant_lanes(&q, &sc, &aq);
        for l in 0..8 {
            acc[l] = d.mul_add(lanes[l] as f32, acc[l]);
        }
        let msum: i32 = (0..8)
            .map(|s| mn[2 * s] * (bs[2 * s] + bs[2 * s + 1]))
            .sum();
        summs = dmin.mul_add(msum as f32, summs);
    }
    hsum_float_8(acc) + summs
}

/// `ggml_vec_dot_q3_K_q8_K` (AVX2 branch). Codes are signed (`low2 − 4·!hbit`).
///
/// ```text
/// per block: d = a.d * f16(w.d)
///   acc[L] = fma(d, f32(Σ_{(e%32)/4==L} sc[e/16]·q[e]·aq[e]), acc[L])
/// result = hsum_float_8(acc)
/// ```
pub fn vec_dot_q3_k(k: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in blocks(GgmlType::Q3K, k, w, a) {
        let (q, sc, _) = kquant_values(GgmlType::Q3K, x);
        let (dy, aq, _) = q8k_block(y);
        let d = dy * kquant_d(GgmlType::Q3K, x).0;
        let lanes = kquant_lanes(&q, &sc, &aq);
        for l in 0..8 {
            acc[l] = d.mul_add(lanes[l] as f32, acc[l]);
        }
    }
    hsum_float_8(acc)
}

/// `ggml_vec_dot_q2_K_q8_K` (AVX2 branch). The mins enter first, into the same lanes.
///
/// ```text
/// per block: d = a.d * f16(w.d); dmin = (-a.d) * f16(w.dmin)
///   acc[L] = fma(dmin, f32(m[2L]·bs[2L] + m[2L+1]·bs[2L+1]), acc[L])
///   acc[L] = fma(d, f32(Σ_{(e%32)/4==L} sc[e/16]·q[e]·aq[e]), acc[L])
/// result = hsum_float_8(acc)
/// ```
pub fn vec_dot_q2_k(k: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in blocks(GgmlType::Q2K, k, w, a) {
        let (q, sc, mn) = kquant_values(GgmlType::Q2K, x);
        let (dy, aq, bs) = q8k_block(y);
        let (dx, dminx) = kquant_d(GgmlType::Q2K, x);
        let d = dy * dx;
        let dmin = -dy * dminx;
        for l in 0..8 {
            let prod = mn[2 * l] * bs[2 * l] + mn[2 * l + 1] * bs[2 * l + 1];
            acc[l] = dmin.mul_add(prod as f32, acc[l]);
        }
        let lanes = kquant_lanes(&q, &sc, &aq);
        for l in 0..8 {
            acc[l] = d.mul_add(lanes[l] as f32, acc[l]);
        }
    }
    hsum_float_8(acc)
}

#[inline]
fn f16s(b: &[u8], k: usize) -> impl Iterator<Item = f32> + '_ {
    assert!(b.len() >= 2 * k, "row too short");
    b.chunks_exact(2)
        .take(k)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
}

/// `ggml_vec_dot_f16` (`vec.cpp`, AVX-512 `GGML_F16_DOT_*` macros of `simd-mappings.h`:
/// 4 accumulators of 16 lanes, `GGML_F32x16_REDUCE`, f64 tail).
///
/// ```text
/// np = k & !63
/// sum[j][l] = fma(w[i+16j+l], a[i+16j+l], sum[j][l])        for i in (0..np).step_by(64), j < 4
/// s0 = (sum[0] + sum[2]) + (sum[1] + sum[3])                (lane-wise, in that order)
/// r: f64 = reduce_add_ps_512(s0)
/// r += f64(w[i] * a[i])                                     for i in np..k  (f32 product)
/// result = f32(r)
/// ```
pub fn vec_dot_f16(k: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: Vec<f32> = f16s(w, k).collect();
    let y: Vec<f32> = f16s(a, k).collect();
    let np = k & !63;
    let mut sum = [[0f32; 16]; 4];
    for i in (0..np).step_by(64) {
        for (j, s) in sum.iter_mut().enumerate() {
            for (l, v) in s.iter_mut().enumerate() {
                let e = i + 16 * j + l;
                *v = x[e].mul_add(y[e], *v);
            }
        }
    }
    let s0: [f32; 16] = std::array::from_fn(|l| {
        let a02 = sum[0][l] + sum[2][l];
        let a13 = sum[1][l] + sum[3][l];
        a02 + a13
    });
    let mut r = reduce_add_ps_512(s0) as f64;
    for e in np..k {
        r += (x[e] * y[e]) as f64;
    }
    r as f32
}

/// llamafile `tinyBLAS<16, __m512, __m512, ggml_fp16_t, ggml_fp16_t, float>::gemm_bloc`
/// (`llamafile/sgemm.cpp`). Taken only if `k % 16 == 0`; the tile shape (`RM`, `RN`,
/// `BM`) changes nothing per element.
///
/// ```text
/// c[l] = fma(w[i+l], a[i+l], c[l])   for i in (0..k).step_by(16), l < 16
/// result = reduce_add_ps_512(c)
/// ```
pub fn tinyblas_f16(k: usize, w: &[u8], a: &[u8]) -> f32 {
    assert!(k.is_multiple_of(16), "tinyBLAS F16 needs k % 16 == 0");
    let x: Vec<f32> = f16s(w, k).collect();
    let y: Vec<f32> = f16s(a, k).collect();
    let mut c = [0f32; 16];
    for i in (0..k).step_by(16) {
        for (l, v) in c.iter_mut().enumerate() {
            *v = x[i + l].mul_add(y[i + l], *v);
        }
    }
    reduce_add_ps_512(c)
}

// ------------------------------------------------------------------------------ tiled

/// The tiled K-quant matmul (`tiled/tiled.cpp` driver, `tiled_run_micro_vnni_8x16` in
/// `tiled/tiled-kernel.cpp`). Per 256-element K block, all integer: `s1 = Σ_s sc[s]·(raw[s]
/// − BIAS·bsum[s])` over the format's sub-blocks (BIAS 32 for Q6_K's unsigned codes, 4
/// for Q3_K, 0 otherwise: `s1 = Σ_e sc·value·aq`) and `s2 = Σ_s m[s]·bsum[s]`. The window
/// accumulator `buf` starts at 0 and takes the K blocks in order (narrow and standard
/// paths alike); `buf += r·d1` is contracted by GCC into one FMA.
///
/// ```text
/// buf = 0
/// per block: r = f32(s1) * f16(w.d)
///            (Q4_K/Q5_K/Q2_K) r = fma(-f16(w.dmin), f32(s2), r)      (vfnmadd)
///            buf = fma(r, a.d, buf)
/// result = buf
/// ```
pub fn tiled_kquant(wty: GgmlType, k: usize, w: &[u8], a: &[u8]) -> f32 {
    assert!(matches!(
        wty,
        GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K
    ));
    let has_min = matches!(wty, GgmlType::Q2K | GgmlType::Q4K | GgmlType::Q5K);
    let mut buf = 0f32;
    for (x, y) in blocks(wty, k, w, a) {
        let (q, sc, mn) = kquant_values(wty, x);
        let (dy, aq, bs) = q8k_block(y);
        let (d0, dmin0) = kquant_d(wty, x);
        let s1: i32 = (0..QK_K).map(|e| sc[e / 16] * q[e] * aq[e]).sum();
        let mut r = s1 as f32 * d0;
        if has_min {
            // Per-16 mins and bsums: the 32-wide sub-blocks of Q4_K/Q5_K have equal mins
            // on both halves, so this equals Σ_s m[s]·(bs[2s]+bs[2s+1]).
            let s2: i32 = (0..16).map(|g| mn[g] * bs[g]).sum();
            r = (-dmin0).mul_add(s2 as f32, r);
        }
        buf = r.mul_add(dy, buf);
    }
    buf
}

// ------------------------------------------------------------------------------ repack

/// Repacked Q4_K 8x8 (`ggml_gemv_q4_K_8x8_q8_K`, `ggml_gemm_q4_K_8x8_q8_K`) and Q2_K 8x8
/// (`ggml_gemv_q2_K_8x8_q8_K`, `ggml_gemm_q2_K_8x8_q8_K`) in `arch/x86/repack.cpp`. One
/// f32 lane per output element, no horizontal sum. The GEMV folds a whole 256 block into
/// one FMA; the GEMM (all its AVX-512/AVX2, 16-row/4-row variants) folds each `sb` group:
/// 64 elements (two 32-sub-blocks) for Q4_K, 128 elements (eight 16-sub-blocks) for Q2_K.
///
/// ```text
/// acc = 0; accm = 0
/// per block: ds = f16(w.d) * a.d; dm = f16(w.dmin) * a.d
///   per group G (whole block for the GEMV):
///     acc  = fma(f32(Σ_{e∈G} sc·q[e]·aq[e]), ds, acc)
///     accm = fma(f32(Σ_{s∈G} m[s]·bsum[s]), dm, accm)
/// result = acc − accm
/// ```
pub fn repack_kquant(wty: GgmlType, gemm: bool, k: usize, w: &[u8], a: &[u8]) -> f32 {
    assert!(matches!(wty, GgmlType::Q4K | GgmlType::Q2K));
    let group = match (gemm, wty) {
        (false, _) => QK_K,
        (true, GgmlType::Q4K) => 64,
        _ => 128,
    };
    let mut acc = 0f32;
    let mut accm = 0f32;
    for (x, y) in blocks(wty, k, w, a) {
        let (q, sc, mn) = kquant_values(wty, x);
        let (dy, aq, bs) = q8k_block(y);
        let (dx, dminx) = kquant_d(wty, x);
        let ds = dx * dy;
        let dm = dminx * dy;
        for g0 in (0..QK_K).step_by(group) {
            let i: i32 = (g0..g0 + group).map(|e| sc[e / 16] * q[e] * aq[e]).sum();
            let im: i32 = (g0 / 16..(g0 + group) / 16).map(|g| mn[g] * bs[g]).sum();
            acc = (i as f32).mul_add(ds, acc);
            accm = (im as f32).mul_add(dm, accm);
        }
    }
    acc - accm
}

/// Repacked Q4_0 8x8 (`gemv_q4_b32_8x8_q8_0_lut_avx` / `gemm_q4_b32_8x8_q8_0_lut_avx` in
/// `arch/x86/repack.cpp`): one f32 lane per output element.
///
/// ```text
/// acc = 0
/// per block: acc = fma(f32(Σ_e q[e]·aq[e]), f16(w.d) * f16(a.d), acc)
/// ```
pub fn repack_q4_0(k: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0f32;
    for (x, y) in blocks(GgmlType::Q4_0, k, w, a) {
        let q = legacy_values(GgmlType::Q4_0, x);
        let i: i32 = (0..32).map(|e| q[e] * (y[4 + e] as i8 as i32)).sum();
        acc = (i as f32).mul_add(f16_at(x, 0) * f16_at(y, 0), acc);
    }
    acc
}
