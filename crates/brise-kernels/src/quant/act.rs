//! Quantization of activations into the format a weight type's dot product consumes.
//!
//! The values equal ggml's x86 path (`quantize_row_q8_0` / `_q8_1` with round-half-even,
//! `quantize_row_q8_K_ref`), so the integer sums brise computes are the ones llama.cpp
//! computes. The byte layouts are brise's own:
//!
//! - Q8_0 activations: 36-byte blocks `{d: f16, isum: i16, qs: [i8; 32]}`; `isum` (the sum
//!   of `qs`) lets unsigned-times-signed instructions (VNNI, AMX) handle signed weights.
//! - Q8_1 activations: ggml's 36-byte blocks `{d: f16, s: f16, qs: [i8; 32]}` with
//!   `s = f16(d * sum(qs))`.
//! - Q8_K activations: ggml's 292-byte blocks `{d: f32, qs: [i8; 256], bsums: [i16; 16]}`.
//! - F16 / BF16 / F32: plain little-endian rows.

use crate::ggml_type::{GgmlType, QK_K};
use half::{bf16, f16};

/// Bytes of one activation row of `k` elements converted for dot products of `ty` weights.
pub fn act_row_bytes(vec_dot_ty: GgmlType, k: usize) -> usize {
    match vec_dot_ty {
        GgmlType::F32 => 4 * k,
        GgmlType::F16 | GgmlType::BF16 => 2 * k,
        GgmlType::Q8_0 | GgmlType::Q8_1 => k / 32 * 36,
        GgmlType::Q8K => k / QK_K * 292,
        other => panic!("{other} is not an activation format"),
    }
}

/// Converts one row of f32 activations into `vec_dot_ty`'s activation format.
pub fn quantize_act_row(vec_dot_ty: GgmlType, x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(out.len(), act_row_bytes(vec_dot_ty, x.len()));
    match vec_dot_ty {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => crate::ops::f32_to_f16_bytes(x, out),
        GgmlType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            let q8_1 = vec_dot_ty == GgmlType::Q8_1;
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512bw") {
                // SAFETY: AVX-512 F/BW are present (checked); the loop hands it whole
                // 32-value blocks and their 36-byte outputs.
                for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(36)) {
                    // SAFETY: as above.
                    unsafe { x86::quantize_q8_block(q8_1, xb, ob) };
                }
                return;
            }
            for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(36)) {
                quantize_q8_block(q8_1, xb, ob);
            }
        }
        GgmlType::Q8K => {
            for (xb, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(292)) {
                quantize_q8k_block(xb, ob);
            }
        }
        other => panic!("{other} is not an activation format"),
    }
}

fn quantize_q8_block(q8_1: bool, x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (j, v) in x.iter().enumerate() {
        // x86 ggml rounds with _MM_ROUND_NEAREST (ties to even); values are within ±127,
        // where the 1.5·2^23 trick is exact (and, unlike rintf, vectorizes).
        let q = nearest_int(v * id);
        let q = q.clamp(-128, 127);
        sum += q;
        out[4 + j] = q as i8 as u8;
    }
    out[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    if q8_1 {
        out[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
    } else {
        out[2..4].copy_from_slice(&(sum as i16).to_le_bytes());
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! [`super::quantize_q8_block`] on AVX-512: the same operations on each value (the
    //! multiply, then the 1.5·2^23 add, then the bit trick), so the same bytes.
    use core::arch::x86_64::*;
    use half::f16;

    /// # Safety
    ///
    /// The CPU has AVX-512 F and BW; `x` holds 32 values and `out` 36 bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_q8_block(q8_1: bool, x: &[f32], out: &mut [u8]) {
        assert!(x.len() >= 32 && out.len() >= 36);
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let a = _mm512_loadu_ps(x.as_ptr());
            let b = _mm512_loadu_ps(x.as_ptr().add(16));
            // max(|v|, acc) keeps acc where |v| is NaN, as f32::max does.
            let m = _mm512_max_ps(
                _mm512_abs_ps(b),
                _mm512_max_ps(_mm512_abs_ps(a), _mm512_setzero_ps()),
            );
            let amax = _mm512_reduce_max_ps(m);
            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let idv = _mm512_set1_ps(id);
            let magic = _mm512_set1_ps(12582912.0);
            let q = |v: __m512| {
                let t = _mm512_add_ps(_mm512_mul_ps(v, idv), magic);
                let i = _mm512_sub_epi32(
                    _mm512_and_si512(_mm512_castps_si512(t), _mm512_set1_epi32(0x007f_ffff)),
                    _mm512_set1_epi32(0x0040_0000),
                );
                _mm512_min_epi32(
                    _mm512_max_epi32(i, _mm512_set1_epi32(-128)),
                    _mm512_set1_epi32(127),
                )
            };
            let (qa, qb) = (q(a), q(b));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
            _mm_storeu_si128(
                out.as_mut_ptr().add(4) as *mut __m128i,
                _mm512_cvtepi32_epi8(qa),
            );
            _mm_storeu_si128(
                out.as_mut_ptr().add(20) as *mut __m128i,
                _mm512_cvtepi32_epi8(qb),
            );
            out[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            if q8_1 {
                out[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
            } else {
                out[2..4].copy_from_slice(&(sum as i16).to_le_bytes());
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    #[test]
    fn avx512_q8_blocks_equal_the_scalar_ones() {
        if !std::arch::is_x86_feature_detected!("avx512bw") {
            crate::skipped("no AVX-512BW on this CPU: avx512_q8_blocks_equal_the_scalar_ones");
            return;
        }
        let mut seed = 11u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for case in 0..400 {
            let scale = [1e-3f32, 0.5, 3.0, 1e4][case % 4];
            let mut x: Vec<f32> = (0..32).map(|_| rnd() * scale).collect();
            match case % 7 {
                // All zero; one value only; exact halves after scaling (ties to even).
                1 => x.iter_mut().for_each(|v| *v = 0.0),
                2 => {
                    x.iter_mut().for_each(|v| *v = 0.0);
                    x[case % 32] = -scale;
                }
                3 => {
                    for (j, v) in x.iter_mut().enumerate() {
                        *v = (j as f32 - 15.5) * 127.0 / 16.0 / 127.0 * 8.0;
                    }
                }
                4 => x[case % 32] = f32::NAN,
                _ => {}
            }
            for q8_1 in [false, true] {
                let (mut want, mut got) = ([0u8; 36], [0u8; 36]);
                super::quantize_q8_block(q8_1, &x, &mut want);
                // SAFETY: AVX-512 BW is present (checked above); sizes are 32 and 36.
                unsafe { super::x86::quantize_q8_block(q8_1, &x, &mut got) };
                assert_eq!(got, want, "case {case} q8_1={q8_1}: {x:?}");
            }
        }
    }
}

/// ggml's `nearest_int`: round half to even through the 1.5·2^23 trick.
#[inline]
fn nearest_int(v: f32) -> i32 {
    let val = v + 12582912.0;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn quantize_q8k_block(x: &[f32], out: &mut [u8]) {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        out.fill(0);
        return;
    }
    let iscale = -127.0 / max;
    for (j, &v) in x.iter().enumerate() {
        let q = nearest_int(iscale * v).min(127);
        out[4 + j] = q as i8 as u8;
    }
    for g in 0..16 {
        let s: i32 = (0..16).map(|i| out[4 + g * 16 + i] as i8 as i32).sum();
        out[260 + 2 * g..262 + 2 * g].copy_from_slice(&(s as i16).to_le_bytes());
    }
    out[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}
