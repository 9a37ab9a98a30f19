//! Scalar dequantization of every weight format. These mirror the `gguf` Python package's
//! numpy formulas operation by operation (same products, same order, no fused
//! multiply-add), so the results are bit-identical to `gguf.quants.dequantize`.

use crate::ggml_type::{GgmlType, QK_K};
use half::{bf16, f16};

#[inline]
pub(crate) fn f16_at(b: &[u8], o: usize) -> f32 {
    f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

/// Unpacks the 6-bit scales and mins of Q4_K/Q5_K (8 sub-blocks each).
#[inline]
pub(crate) fn k4_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 0x3f;
        mn[j] = s[j + 4] & 0x3f;
        sc[j + 4] = (s[j + 8] & 0x0f) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

/// Unpacks the 16 signed 6-bit scales of Q3_K.
#[inline]
pub(crate) fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let lo = if i < 8 { s[i] & 0x0f } else { s[i - 8] >> 4 };
        let hi = (s[8 + (i % 4)] >> (2 * (i / 4))) & 0x03;
        *o = ((lo | (hi << 4)) as i8).wrapping_sub(32);
    }
    out
}

/// Dequantizes `out.len()` elements stored as `ty` in `src` (whole blocks).
///
/// Panics if the lengths disagree; callers validate shapes when a file is opened.
pub fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: AVX2 and F16C are present (checked).
        return unsafe { dequantize_row_avx2(ty, src, out) };
    }
    dequantize_row_body(ty, src, out)
}

/// [`dequantize_row`] compiled for AVX2, which vectorizes its loops: the same IEEE
/// operations (Rust never fuses a multiply and an add), so the same bits, several
/// times faster (the f32 forward dequantizes every weight of every product).
///
/// # Safety
///
/// The CPU has AVX2 and F16C; the body is safe code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn dequantize_row_avx2(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let whole = out.len().is_multiple_of(bs) && src.len() == out.len() / bs * ts;
    match ty {
        // The K-quants of Q4_K_M models, whose nibble loops the compiler leaves scalar.
        GgmlType::Q4K | GgmlType::Q6K if whole => {
            for (b, y) in src.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
                // SAFETY: AVX2 is present (this function's contract); one whole block.
                unsafe {
                    if ty == GgmlType::Q4K {
                        q4k_block_avx2(b, y)
                    } else {
                        q6k_block_avx2(b, y)
                    }
                }
            }
        }
        _ => dequantize_row_body(ty, src, out),
    }
}

/// One Q4_K block, as [`dequantize_block`] computes it (`d·sc` and `dmin·m` rounded,
/// then a multiply and a subtract: the same bits), 8 values a step.
///
/// # Safety
///
/// The CPU has AVX2; `b` holds a block (144 bytes) and `y` 256 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn q4k_block_avx2(b: &[u8], y: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(b.len() >= 144 && y.len() >= QK_K);
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = k4_scales_mins(&b[4..16]);
    let (qs, yp) = (b[16..144].as_ptr(), y.as_mut_ptr());
    let low = _mm_set1_epi8(0x0f);
    for j in 0..8 {
        let dj = _mm256_set1_ps(d * sc[j] as f32);
        let mj = _mm256_set1_ps(dmin * mn[j] as f32);
        let (c, shift) = (j / 2, _mm_cvtsi32_si128(4 * (j as i32 % 2)));
        for l in (0..32).step_by(8) {
            // SAFETY: bytes c·32 + l.. + 8 ≤ 128 of qs and values j·32 + l.. + 8 ≤ 256
            // of y (asserted above).
            unsafe {
                let q = _mm_loadl_epi64(qs.add(c * 32 + l) as *const __m128i);
                let q = _mm_and_si128(_mm_srl_epi16(q, shift), low);
                let qf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
                let v = _mm256_sub_ps(_mm256_mul_ps(dj, qf), mj);
                _mm256_storeu_ps(yp.add(j * 32 + l), v);
            }
        }
    }
}

/// One Q6_K block, as [`dequantize_block`] computes it (`d·scale` rounded, then times
/// the quant: the same bits), 8 values a step.
///
/// # Safety
///
/// The CPU has AVX2; `b` holds a block (210 bytes) and `y` 256 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn q6k_block_avx2(b: &[u8], y: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(b.len() >= 210 && y.len() >= QK_K);
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    let (ql, qh, yp) = (b.as_ptr(), b[128..].as_ptr(), y.as_mut_ptr());
    let (low, two, bias) = (_mm_set1_epi8(0x0f), _mm_set1_epi8(0x03), _mm_set1_epi8(32));
    for h in 0..2 {
        for s in 0..4 {
            let lo_shift = _mm_cvtsi32_si128(4 * (s as i32 / 2));
            let hi_shift = _mm_cvtsi32_si128(2 * s as i32);
            for l in (0..32).step_by(8) {
                let dl = _mm256_set1_ps(d * (scales[h * 8 + s * 2 + l / 16] as i8) as f32);
                // SAFETY: bytes h·64 + 32·(s % 2) + l.. + 8 ≤ 128 of ql, h·32 + l.. + 8 ≤ 64
                // of qh (at 128..192), values h·128 + 32·s + l.. + 8 ≤ 256 of y.
                unsafe {
                    let lo = _mm_loadl_epi64(ql.add(h * 64 + 32 * (s % 2) + l) as *const __m128i);
                    let lo = _mm_and_si128(_mm_srl_epi16(lo, lo_shift), low);
                    let hi = _mm_loadl_epi64(qh.add(h * 32 + l) as *const __m128i);
                    let hi = _mm_and_si128(_mm_srl_epi16(hi, hi_shift), two);
                    let q = _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16::<4>(hi)), bias);
                    let qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                    _mm256_storeu_ps(yp.add(h * 128 + 32 * s + l), _mm256_mul_ps(dl, qf));
                }
            }
        }
    }
}

#[inline(always)]
fn dequantize_row_body(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let n = out.len();
    let bs = ty.block_size();
    assert!(
        n.is_multiple_of(bs),
        "{n} elements is not a whole number of {ty} blocks"
    );
    let ts = ty.type_size();
    assert_eq!(
        src.len(),
        n / bs * ts,
        "{ty}: byte length does not match {n} elements"
    );
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            for (b, o) in src.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
                dequantize_block(ty, b, o);
            }
        }
    }
}

#[inline(always)]
fn dequantize_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = d * ((qs[j] & 0x0f) as i32 - 8) as f32;
                y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
            }
        }
        GgmlType::Q4_1 => {
            let d = f16_at(b, 0);
            let m = f16_at(b, 2);
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = d * (qs[j] & 0x0f) as f32 + m;
                y[j + 16] = d * (qs[j] >> 4) as f32 + m;
            }
        }
        GgmlType::Q5_0 => {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            for j in 0..16 {
                let x0 = (qs[j] & 0x0f) as i32 | ((((qh >> j) & 1) << 4) as i32);
                let x1 = (qs[j] >> 4) as i32 | ((((qh >> (j + 16)) & 1) << 4) as i32);
                y[j] = d * (x0 - 16) as f32;
                y[j + 16] = d * (x1 - 16) as f32;
            }
        }
        GgmlType::Q5_1 => {
            let d = f16_at(b, 0);
            let m = f16_at(b, 2);
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let qs = &b[8..24];
            for j in 0..16 {
                let x0 = (qs[j] & 0x0f) as u32 | (((qh >> j) & 1) << 4);
                let x1 = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
                y[j] = d * x0 as f32 + m;
                y[j + 16] = d * x1 as f32 + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
        GgmlType::Q8_1 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = (b[4 + j] as i8) as f32 * d;
            }
        }
        GgmlType::Q2K => {
            let scales = &b[0..16];
            let qs = &b[16..80];
            let d = f16_at(b, 80);
            let dmin = f16_at(b, 82);
            for (e, v) in y.iter_mut().enumerate().take(QK_K) {
                let g = e / 16;
                let dl = d * (scales[g] & 0x0f) as f32;
                let ml = dmin * (scales[g] >> 4) as f32;
                let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
                let q = (qs[h * 32 + l] >> (2 * s)) & 3;
                *v = dl * q as f32 - ml;
            }
        }
        GgmlType::Q3K => {
            let hmask = &b[0..32];
            let qs = &b[32..96];
            let sc = q3k_scales(&b[96..108]);
            let d = f16_at(b, 108);
            for (e, v) in y.iter_mut().enumerate().take(QK_K) {
                let dl = d * sc[e / 16] as f32;
                let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
                let ql = ((qs[h * 32 + l] >> (2 * s)) & 3) as i32;
                let hb = ((hmask[l] >> (e / 32)) & 1) ^ 1;
                let q = ql - ((hb as i32) << 2);
                *v = dl * q as f32;
            }
        }
        GgmlType::Q4K => {
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let (sc, mn) = k4_scales_mins(&b[4..16]);
            let qs = &b[16..144];
            for j in 0..8 {
                let dj = d * sc[j] as f32;
                let mj = dmin * mn[j] as f32;
                let (c, shift) = (j / 2, 4 * (j % 2));
                for l in 0..32 {
                    let q = (qs[c * 32 + l] >> shift) & 0x0f;
                    y[j * 32 + l] = dj * q as f32 - mj;
                }
            }
        }
        GgmlType::Q5K => {
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let (sc, mn) = k4_scales_mins(&b[4..16]);
            let qh = &b[16..48];
            let qs = &b[48..176];
            for j in 0..8 {
                let dj = d * sc[j] as f32;
                let mj = dmin * mn[j] as f32;
                let (c, shift) = (j / 2, 4 * (j % 2));
                for l in 0..32 {
                    let q = ((qs[c * 32 + l] >> shift) & 0x0f) | (((qh[l] >> j) & 1) << 4);
                    y[j * 32 + l] = dj * q as f32 - mj;
                }
            }
        }
        GgmlType::Q6K => {
            let ql = &b[0..128];
            let qh = &b[128..192];
            let scales = &b[192..208];
            let d = f16_at(b, 208);
            // Per half of 128: element 32·s + l takes ql's low (s even) or high nibble
            // at l (s < 2) or 32 + l, and bits 2s..2s+2 of qh at l.
            for h in 0..2 {
                let (ql, qh, y) = (&ql[h * 64..], &qh[h * 32..], &mut y[h * 128..]);
                for s in 0..4 {
                    let lo = &ql[32 * (s % 2)..32 * (s % 2) + 32];
                    for l in 0..32 {
                        let lo = (lo[l] >> (4 * (s / 2))) & 0x0f;
                        let hi = (qh[l] >> (2 * s)) & 0x03;
                        let q = ((lo | (hi << 4)) as i8).wrapping_sub(32);
                        let dl = d * (scales[h * 8 + s * 2 + l / 16] as i8) as f32;
                        y[32 * s + l] = dl * q as f32;
                    }
                }
            }
        }
        GgmlType::Q8K => {
            let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            for j in 0..QK_K {
                y[j] = d * (b[4 + j] as i8) as f32;
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("handled per element"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 build of the dequantization gives the portable build's bits (random
    /// bytes: NaN and infinite scales included, compared as bits).
    #[test]
    fn avx2_build_gives_the_same_bits() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            let mut s = 0x9e37_79b9_7f4a_7c15u64;
            for ty in GgmlType::ALL {
                let k = 512;
                let Some(rb) = ty.row_bytes(k) else { continue };
                let src: Vec<u8> = (0..rb)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        s as u8
                    })
                    .collect();
                let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
                dequantize_row_body(ty, &src, &mut a);
                // SAFETY: AVX2 and F16C checked above.
                unsafe { dequantize_row_avx2(ty, &src, &mut b) };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(bits(&a) == bits(&b), "{ty}");
            }
            return;
        }
        crate::skipped("no AVX2+F16C: the AVX2 build of the dequantization was not tested");
    }
}
