//! x86-64 SIMD dot products (AVX2 and AVX-512 VNNI), one weight row against one
//! activation row. The integer part of each block is exact (same sums as the scalar
//! reference); only the float accumulation order differs.
//!
//! Every function here is `unsafe` for the same two reasons: it must only run on a CPU
//! with the ISA its wrapper's `#[target_feature]` names (guaranteed by `cpu::Isa`
//! detection before the kernel table is built), and its raw pointers must cover `k`
//! elements of the weight row and of the activation row (checked by the safe wrapper
//! `crate::quant::dot`).

use super::dequant::{k4_scales_mins, q3k_scales};
use crate::ggml_type::GgmlType;
use core::arch::x86_64::*;
use half::f16;

/// The 8-bit dot-product instruction a kernel is built on.
pub(crate) trait I8Dot {
    /// acc[i] += Σ_{j<4} u[4i+j]·s[4i+j], with u unsigned and s signed bytes. With AVX2,
    /// adjacent products must not exceed i16 range in sum (|u| ≤ 128 or so).
    ///
    /// # Safety
    ///
    /// The CPU has the instruction: AVX2 for [`Avx2`], AVX-512 VNNI and VL for [`Vnni`]
    /// (register arithmetic only).
    unsafe fn dot_us(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
}

pub(crate) struct Avx2;
pub(crate) struct Vnni;

impl I8Dot for Avx2 {
    /// # Safety
    ///
    /// The CPU has AVX2.
    #[inline(always)]
    unsafe fn dot_us(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let p16 = _mm256_maddubs_epi16(u, s);
            _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
        }
    }
}

impl I8Dot for Vnni {
    /// # Safety
    ///
    /// The CPU has AVX-512 VNNI and VL.
    #[inline(always)]
    unsafe fn dot_us(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe { _mm256_dpbusd_epi32(acc, u, s) }
    }
}

/// Signed × signed bytes through the sign trick: Σ q·y = Σ |q|·(sign(q)·y).
///
/// # Safety
///
/// The CPU has AVX2 and `D`'s instruction (register arithmetic only).
#[inline(always)]
unsafe fn dot_ss<D: I8Dot>(acc: __m256i, q: __m256i, y: __m256i) -> __m256i {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe { D::dot_us(acc, _mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q)) }
}

/// # Safety
///
/// The CPU has AVX (register arithmetic only).
#[inline(always)]
unsafe fn hsum_ps(v: __m256) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// An f16 scale through F16C (the `half` crate's portable conversion costs more than a
/// whole block's SIMD work). Every caller runs with F16C enabled.
///
/// # Safety
///
/// The CPU has F16C; `p` is readable for 2 bytes.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (p as *const u16).read_unaligned() as i32,
        )))
    }
}

/// # Safety
///
/// The CPU has AVX; `p` is readable for 32 bytes.
#[inline(always)]
unsafe fn loadu(p: *const u8) -> __m256i {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

/// 16 packed bytes of nibbles → 32 bytes: low nibbles first, then high nibbles.
///
/// # Safety
///
/// The CPU has AVX2; `p` is readable for 16 bytes.
#[inline(always)]
unsafe fn nibbles_32(p: *const u8) -> __m256i {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let v = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(v, m);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
        _mm256_set_m128i(hi, lo)
    }
}

/// 0xFF in byte i where bit i of `x` is set.
///
/// # Safety
///
/// The CPU has AVX2 (register arithmetic only).
#[inline(always)]
unsafe fn bits_to_bytes(x: u32) -> __m256i {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let v = _mm256_set1_epi32(x as i32);
        let shuf = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bytes = _mm256_shuffle_epi8(v, shuf);
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit)
    }
}

/// Signed 32 values of a legacy block, and whether it carries a min (`m`) term.
///
/// # Safety
///
/// The CPU has AVX2; `ty` is a legacy type and `x` a whole block of it.
#[inline(always)]
unsafe fn legacy_q(ty: GgmlType, x: *const u8) -> __m256i {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        match ty {
            GgmlType::Q4_0 => _mm256_sub_epi8(nibbles_32(x.add(2)), _mm256_set1_epi8(8)),
            GgmlType::Q4_1 => nibbles_32(x.add(4)),
            GgmlType::Q5_0 => {
                let qh = (x.add(2) as *const u32).read_unaligned();
                let hb = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
                let q = _mm256_or_si256(nibbles_32(x.add(6)), hb);
                _mm256_sub_epi8(q, _mm256_set1_epi8(16))
            }
            GgmlType::Q5_1 => {
                let qh = (x.add(4) as *const u32).read_unaligned();
                let hb = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
                _mm256_or_si256(nibbles_32(x.add(8)), hb)
            }
            GgmlType::Q8_0 => loadu(x.add(2)),
            _ => unreachable!(),
        }
    }
}

/// # Safety
///
/// The CPU has AVX2, FMA, F16C and `D`'s instruction; `k` is a multiple of 32, `w` holds `k / 32`
/// blocks of the legacy `ty` and `a` `k / 32` activation blocks of 36 bytes.
#[inline(always)]
unsafe fn dot_legacy<D: I8Dot>(ty: GgmlType, k: usize, w: *const u8, a: *const u8) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let ts = ty.type_size();
        let with_min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        for i in 0..k / 32 {
            let x = w.add(i * ts);
            let y = a.add(i * 36);
            let q = legacy_q(ty, x);
            let yv = loadu(y.add(4));
            let p = if with_min {
                D::dot_us(_mm256_setzero_si256(), q, yv)
            } else {
                dot_ss::<D>(_mm256_setzero_si256(), q, yv)
            };
            let dd = _mm256_set1_ps(f16_at(x) * f16_at(y));
            acc = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(p), acc);
            if with_min {
                summs += f16_at(x.add(2)) * f16_at(y.add(2));
            }
        }
        hsum_ps(acc) + summs
    }
}

/// The j-th chunk of 32 quant values of a K-quant block, as signed bytes.
///
/// # Safety
///
/// The CPU has AVX2; `x` is a whole block of the K-quant `ty` and `j < 8`.
#[inline(always)]
unsafe fn kquant_chunk(ty: GgmlType, x: *const u8, j: usize) -> __m256i {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let m4 = _mm256_set1_epi8(0x0f);
        let m2 = _mm256_set1_epi8(0x03);
        match ty {
            GgmlType::Q2K => {
                let (h, s) = (j / 4, j % 4);
                let v = loadu(x.add(16 + h * 32));
                _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * s as i32)), m2)
            }
            GgmlType::Q3K => {
                let (h, s) = (j / 4, j % 4);
                let v = loadu(x.add(32 + h * 32));
                let ql = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * s as i32)), m2);
                let hm = loadu(x);
                let hb = _mm256_and_si256(
                    _mm256_srl_epi16(hm, _mm_cvtsi32_si128(j as i32)),
                    _mm256_set1_epi8(1),
                );
                let q = _mm256_or_si256(ql, _mm256_slli_epi16(hb, 2));
                _mm256_sub_epi8(q, _mm256_set1_epi8(4))
            }
            GgmlType::Q4K => {
                let v = loadu(x.add(16 + (j / 2) * 32));
                if j.is_multiple_of(2) {
                    _mm256_and_si256(v, m4)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), m4)
                }
            }
            GgmlType::Q5K => {
                let v = loadu(x.add(48 + (j / 2) * 32));
                let lo = if j.is_multiple_of(2) {
                    _mm256_and_si256(v, m4)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), m4)
                };
                let qh = loadu(x.add(16));
                let hb = _mm256_and_si256(
                    _mm256_srl_epi16(qh, _mm_cvtsi32_si128(j as i32)),
                    _mm256_set1_epi8(1),
                );
                _mm256_or_si256(lo, _mm256_slli_epi16(hb, 4))
            }
            GgmlType::Q6K => {
                let (h, c) = (j / 4, j % 4);
                let ql = loadu(x.add(h * 64 + (c % 2) * 32));
                let lo = if c < 2 {
                    _mm256_and_si256(ql, m4)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4)
                };
                let qh = loadu(x.add(128 + h * 32));
                let hi =
                    _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c as i32)), m2);
                // Unsigned 0..63: the −32 offset is applied through the block sums, as
                // ggml does (the grouping of that correction decides the float result).
                _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4))
            }
            _ => unreachable!(),
        }
    }
}

/// Per-16 scales and mins of a K-quant block, and its (d, dmin).
///
/// # Safety
///
/// The CPU has F16C; `x` is a whole block of the K-quant `ty`.
#[inline(always)]
unsafe fn kquant_scales(ty: GgmlType, x: *const u8) -> ([i32; 16], [i32; 16], f32, f32) {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let mut sc = [0i32; 16];
        let mut mn = [0i32; 16];
        let (d, dmin) = match ty {
            GgmlType::Q2K => {
                for g in 0..16 {
                    let b = *x.add(g);
                    sc[g] = (b & 0x0f) as i32;
                    mn[g] = (b >> 4) as i32;
                }
                (f16_at(x.add(80)), f16_at(x.add(82)))
            }
            GgmlType::Q3K => {
                let s = q3k_scales(core::slice::from_raw_parts(x.add(96), 12));
                for g in 0..16 {
                    sc[g] = s[g] as i32;
                }
                (f16_at(x.add(108)), 0.0)
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let (s, m) = k4_scales_mins(core::slice::from_raw_parts(x.add(4), 12));
                for g in 0..16 {
                    sc[g] = s[g / 2] as i32;
                    mn[g] = m[g / 2] as i32;
                }
                (f16_at(x), f16_at(x.add(2)))
            }
            GgmlType::Q6K => {
                for g in 0..16 {
                    sc[g] = *x.add(192 + g) as i8 as i32;
                }
                (f16_at(x.add(208)), 0.0)
            }
            _ => unreachable!(),
        };
        (sc, mn, d, dmin)
    }
}

/// The scaled lanes of chunk `j` (elements 32j..32j+32) of a K-quant block: lane L holds
/// Σ sc[e/16]·code[e]·aq[e] over e = 32j+4L..32j+4L+4, codes as `kquant_chunk` gives them.
///
/// # Safety
///
/// The CPU has AVX2 and `D`'s instruction; `x` is a whole block of the K-quant `ty`,
/// `y` a whole Q8_K activation block (292 bytes) and `j < 8`.
#[inline(always)]
unsafe fn kquant_chunk_lanes<D: I8Dot>(
    ty: GgmlType,
    x: *const u8,
    y: *const u8,
    j: usize,
    sc: &[i32; 16],
) -> __m256i {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let q = kquant_chunk(ty, x, j);
        let yv = loadu(y.add(4 + 32 * j));
        let p = if ty == GgmlType::Q3K {
            dot_ss::<D>(_mm256_setzero_si256(), q, yv)
        } else {
            D::dot_us(_mm256_setzero_si256(), q, yv)
        };
        let (s0, s1) = (sc[2 * j], sc[2 * j + 1]);
        _mm256_mullo_epi32(p, _mm256_setr_epi32(s0, s0, s0, s0, s1, s1, s1, s1))
    }
}

/// lane L = Σ_j chunk-lanes: Σ over e with (e % 32) / 4 == L of sc·code·aq.
///
/// # Safety
///
/// As [`kquant_chunk_lanes`], for all 8 chunks.
#[inline(always)]
unsafe fn kquant_block_lanes<D: I8Dot>(
    ty: GgmlType,
    x: *const u8,
    y: *const u8,
    sc: &[i32; 16],
) -> __m256i {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let mut isum = _mm256_setzero_si256();
        for j in 0..8 {
            isum = _mm256_add_epi32(isum, kquant_chunk_lanes::<D>(ty, x, y, j, sc));
        }
        isum
    }
}

/// # Safety
///
/// The CPU has AVX2 (register arithmetic only).
#[inline(always)]
unsafe fn hsum_epi32(v: __m256i) -> i32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01));
        _mm_cvtsi128_si32(s)
    }
}

/// # Safety
///
/// `y` is a whole Q8_K activation block (292 bytes) and `g < 16`.
#[inline(always)]
unsafe fn bsum(y: *const u8, g: usize) -> i32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe { (y.add(260 + 2 * g) as *const i16).read_unaligned() as i32 }
}

/// ggml's `vec_dot_<k>_q8_K` (AVX2 branch), float order included; see
/// `ggml_exact::vec_dot_q*_k` for the formulas this reproduces.
///
/// # Safety
///
/// The CPU has AVX2, FMA, F16C and `D`'s instruction; `k` is a multiple of 256, `w` holds `k / 256`
/// blocks of the K-quant `ty` and `a` `k / 256` Q8_K activation blocks (292 bytes each).
#[inline(always)]
unsafe fn dot_kquant<D: I8Dot>(ty: GgmlType, k: usize, w: *const u8, a: *const u8) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let ts = ty.type_size();
        let mut acc = _mm256_setzero_ps();
        let mut accm = [0f32; 4];
        let mut summs = 0f32;
        for i in 0..k / 256 {
            let x = w.add(i * ts);
            let y = a.add(i * 292);
            let dy = (y as *const f32).read_unaligned();
            let (sc, mn, dx, dminx) = kquant_scales(ty, x);
            let d = dy * dx;
            let dmin = -dy * dminx;
            let mut lanes = kquant_block_lanes::<D>(ty, x, y, &sc);
            match ty {
                GgmlType::Q6K => {
                    let corr: [i32; 8] = core::array::from_fn(|l| {
                        32 * (bsum(y, 2 * l) * sc[2 * l] + bsum(y, 2 * l + 1) * sc[2 * l + 1])
                    });
                    lanes = _mm256_sub_epi32(
                        lanes,
                        _mm256_loadu_si256(corr.as_ptr() as *const __m256i),
                    );
                }
                GgmlType::Q2K => {
                    let m: [i32; 8] = core::array::from_fn(|l| {
                        mn[2 * l] * bsum(y, 2 * l) + mn[2 * l + 1] * bsum(y, 2 * l + 1)
                    });
                    let mv = _mm256_cvtepi32_ps(_mm256_loadu_si256(m.as_ptr() as *const __m256i));
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(dmin), mv, acc);
                }
                GgmlType::Q4K => {
                    for l in 0..4 {
                        let s0 = bsum(y, 4 * l) + bsum(y, 4 * l + 1);
                        let s1 = bsum(y, 4 * l + 2) + bsum(y, 4 * l + 3);
                        let prod = mn[4 * l] * s0 + mn[4 * l + 2] * s1;
                        accm[l] = dmin.mul_add(prod as f32, accm[l]);
                    }
                }
                GgmlType::Q5K => {
                    let msum: i32 = (0..8)
                        .map(|s| mn[2 * s] * (bsum(y, 2 * s) + bsum(y, 2 * s + 1)))
                        .sum();
                    summs = dmin.mul_add(msum as f32, summs);
                }
                _ => {}
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lanes), acc);
        }
        let r = hsum_ps(acc);
        match ty {
            GgmlType::Q4K => r + ((accm[0] + accm[2]) + (accm[1] + accm[3])),
            GgmlType::Q5K => r + summs,
            _ => r,
        }
    }
}

/// The tiled K-quant matmul's element (`ggml_exact::tiled_kquant`).
///
/// # Safety
///
/// The CPU has AVX2, FMA, F16C and `D`'s instruction; `k` is a multiple of 256, `w` holds `k / 256`
/// blocks of the K-quant `ty` and `a` `k / 256` Q8_K activation blocks (292 bytes each).
#[inline(always)]
unsafe fn dot_tiled<D: I8Dot>(ty: GgmlType, k: usize, w: *const u8, a: *const u8) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let ts = ty.type_size();
        let has_min = matches!(ty, GgmlType::Q2K | GgmlType::Q4K | GgmlType::Q5K);
        let mut buf = 0f32;
        for i in 0..k / 256 {
            let x = w.add(i * ts);
            let y = a.add(i * 292);
            let dy = (y as *const f32).read_unaligned();
            let (sc, mn, d0, dmin0) = kquant_scales(ty, x);
            let mut s1 = hsum_epi32(kquant_block_lanes::<D>(ty, x, y, &sc));
            if ty == GgmlType::Q6K {
                s1 -= 32 * (0..16).map(|g| sc[g] * bsum(y, g)).sum::<i32>();
            }
            let mut r = s1 as f32 * d0;
            if has_min {
                let s2: i32 = (0..16).map(|g| mn[g] * bsum(y, g)).sum();
                r = (-dmin0).mul_add(s2 as f32, r);
            }
            buf = r.mul_add(dy, buf);
        }
        buf
    }
}

/// Repacked Q4_K / Q2_K GEMV and GEMM elements (`ggml_exact::repack_kquant`): one FMA
/// per group of `group` elements.
///
/// # Safety
///
/// The CPU has AVX2, FMA, F16C and `D`'s instruction; `group` is a multiple of 32 dividing 256;
/// `k` is a multiple of 256, `w` holds `k / 256`
/// blocks of the K-quant `ty` and `a` `k / 256` Q8_K activation blocks (292 bytes each).
#[inline(always)]
unsafe fn dot_repack_kquant<D: I8Dot>(
    ty: GgmlType,
    group: usize,
    k: usize,
    w: *const u8,
    a: *const u8,
) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let ts = ty.type_size();
        let mut acc = 0f32;
        let mut accm = 0f32;
        for i in 0..k / 256 {
            let x = w.add(i * ts);
            let y = a.add(i * 292);
            let dy = (y as *const f32).read_unaligned();
            let (sc, mn, dx, dminx) = kquant_scales(ty, x);
            let ds = dx * dy;
            let dm = dminx * dy;
            let chunks = group / 32;
            for g in 0..256 / group {
                let mut v = _mm256_setzero_si256();
                for j in g * chunks..(g + 1) * chunks {
                    v = _mm256_add_epi32(v, kquant_chunk_lanes::<D>(ty, x, y, j, &sc));
                }
                let isum = hsum_epi32(v);
                let im: i32 = (g * group / 16..(g + 1) * group / 16)
                    .map(|s| mn[s] * bsum(y, s))
                    .sum();
                acc = (isum as f32).mul_add(ds, acc);
                accm = (im as f32).mul_add(dm, accm);
            }
        }
        acc - accm
    }
}

/// Repacked Q4_0 (`ggml_exact::repack_q4_0`): one FMA per block of the block's sum.
///
/// # Safety
///
/// The CPU has AVX2, FMA, F16C and `D`'s instruction; `k` is a multiple of 32, `w` holds `k / 32`
/// Q4_0 blocks (18 bytes each) and `a` `k / 32` activation blocks of 36 bytes.
#[inline(always)]
unsafe fn dot_repack_q4_0<D: I8Dot>(k: usize, w: *const u8, a: *const u8) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let mut acc = 0f32;
        for i in 0..k / 32 {
            let x = w.add(i * 18);
            let y = a.add(i * 36);
            let p = dot_ss::<D>(
                _mm256_setzero_si256(),
                legacy_q(GgmlType::Q4_0, x),
                loadu(y.add(4)),
            );
            acc = (hsum_epi32(p) as f32).mul_add(f16_at(x) * f16_at(y), acc);
        }
        acc
    }
}

/// # Safety
///
/// The CPU has AVX2, FMA and F16C; `w` and `a` each hold `k` f16 values.
#[inline(always)]
unsafe fn dot_f16_avx2(k: usize, w: *const u8, a: *const u8) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let (w, a) = (w as *const u16, a as *const u16);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= k {
            let x0 = _mm256_cvtph_ps(_mm_loadu_si128(w.add(i) as *const __m128i));
            let y0 = _mm256_cvtph_ps(_mm_loadu_si128(a.add(i) as *const __m128i));
            let x1 = _mm256_cvtph_ps(_mm_loadu_si128(w.add(i + 8) as *const __m128i));
            let y1 = _mm256_cvtph_ps(_mm_loadu_si128(a.add(i + 8) as *const __m128i));
            acc0 = _mm256_fmadd_ps(x0, y0, acc0);
            acc1 = _mm256_fmadd_ps(x1, y1, acc1);
            i += 16;
        }
        let mut s = hsum_ps(_mm256_add_ps(acc0, acc1));
        while i < k {
            s += f16::from_bits(w.add(i).read_unaligned()).to_f32()
                * f16::from_bits(a.add(i).read_unaligned()).to_f32();
            i += 1;
        }
        s
    }
}

/// # Safety
///
/// The CPU has AVX2; `p` is readable for 8 values (16 bytes).
#[inline(always)]
unsafe fn bf16x8(p: *const u16) -> __m256 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
    }
}

/// # Safety
///
/// The CPU has AVX2 and FMA; `w` and `a` each hold `k` bf16 values.
#[inline(always)]
unsafe fn dot_bf16_avx2(k: usize, w: *const u8, a: *const u8) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let (w, a) = (w as *const u16, a as *const u16);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= k {
            acc0 = _mm256_fmadd_ps(bf16x8(w.add(i)), bf16x8(a.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(bf16x8(w.add(i + 8)), bf16x8(a.add(i + 8)), acc1);
            i += 16;
        }
        let mut s = hsum_ps(_mm256_add_ps(acc0, acc1));
        while i < k {
            let x = f32::from_bits((w.add(i).read_unaligned() as u32) << 16);
            let y = f32::from_bits((a.add(i).read_unaligned() as u32) << 16);
            s += x * y;
            i += 1;
        }
        s
    }
}

/// # Safety
///
/// The CPU has AVX2 and FMA; `w` and `a` each hold `k` f32 values.
#[inline(always)]
unsafe fn dot_f32_avx2(k: usize, w: *const u8, a: *const u8) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let (w, a) = (w as *const f32, a as *const f32);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= k {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w.add(i)), _mm256_loadu_ps(a.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(w.add(i + 8)),
                _mm256_loadu_ps(a.add(i + 8)),
                acc1,
            );
            i += 16;
        }
        let mut s = hsum_ps(_mm256_add_ps(acc0, acc1));
        while i < k {
            s += w.add(i).read_unaligned() * a.add(i).read_unaligned();
            i += 1;
        }
        s
    }
}

/// # Safety
///
/// The CPU has AVX2, FMA, F16C and `D`'s instruction; `w` is a row of `k` elements of
/// the weight type `ty` (`k` a multiple of its block size) and `a` the activation row
/// `crate::quant::dot` pairs with it (F32, F16, BF16: `k` values of that type; legacy:
/// 36-byte blocks of 32; K-quants: Q8_K blocks).
#[inline(always)]
unsafe fn dot_any<D: I8Dot>(ty: GgmlType, k: usize, w: *const u8, a: *const u8) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        match ty {
            GgmlType::F32 => dot_f32_avx2(k, w, a),
            GgmlType::F16 => dot_f16_avx2(k, w, a),
            GgmlType::BF16 => dot_bf16_avx2(k, w, a),
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                dot_legacy::<D>(ty, k, w, a)
            }
            GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
                dot_kquant::<D>(ty, k, w, a)
            }
            GgmlType::Q8_1 | GgmlType::Q8K => unreachable!("not a weight type"),
        }
    }
}

/// The kernels of llama.cpp's batched and repacked paths.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ExactPath {
    Tiled,
    RepackKquant { group: usize },
    RepackQ4_0,
}

/// # Safety
///
/// As [`dot_any`] for the K-quant (`RepackQ4_0`: Q4_0) rows the path `p` takes.
#[inline(always)]
unsafe fn dot_exact<D: I8Dot>(
    p: ExactPath,
    ty: GgmlType,
    k: usize,
    w: *const u8,
    a: *const u8,
) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        match p {
            ExactPath::Tiled => dot_tiled::<D>(ty, k, w, a),
            ExactPath::RepackKquant { group } => dot_repack_kquant::<D>(ty, group, k, w, a),
            ExactPath::RepackQ4_0 => dot_repack_q4_0::<D>(k, w, a),
        }
    }
}

/// # Safety
///
/// The CPU has AVX2, FMA and F16C; the rows as [`dot_exact`] needs them.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_exact_avx2(
    p: ExactPath,
    ty: GgmlType,
    k: usize,
    w: *const u8,
    a: *const u8,
) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe { dot_exact::<Avx2>(p, ty, k, w, a) }
}

/// # Safety
///
/// The CPU has AVX2, FMA, F16C and AVX-512F/BW/VL/VNNI; the rows as [`dot_exact`]
/// needs them.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn dot_exact_avx512vnni(
    p: ExactPath,
    ty: GgmlType,
    k: usize,
    w: *const u8,
    a: *const u8,
) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe { dot_exact::<Vnni>(p, ty, k, w, a) }
}

/// AVX2 + FMA + F16C kernels.
///
/// # Safety
///
/// The CPU has AVX2, FMA and F16C; the rows as [`dot_any`] needs them.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_avx2(ty: GgmlType, k: usize, w: *const u8, a: *const u8) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe { dot_any::<Avx2>(ty, k, w, a) }
}

/// AVX-512 VNNI kernels (256-bit `vpdpbusd`; the GEMV is bound by memory, not width).
///
/// # Safety
///
/// The CPU has AVX2, FMA, F16C and AVX-512F/BW/VL/VNNI; the rows as [`dot_any`] needs
/// them.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn dot_avx512vnni(ty: GgmlType, k: usize, w: *const u8, a: *const u8) -> f32 {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe { dot_any::<Vnni>(ty, k, w, a) }
}

/// Activation scales of a legacy-format activation row as f32: (d, s) per block, s = 0
/// for Q8_0. Computed once per row of the activation instead of once per weight row.
///
/// # Safety
/// The CPU has F16C; `a` points at `nb` (capped at `out.len()`) activation blocks of
/// 36 bytes.
#[inline(always)]
unsafe fn act_scales(
    a: *const u8,
    nb: usize,
    with_min: bool,
    out: &mut [std::mem::MaybeUninit<[f32; 2]>],
) -> &[[f32; 2]] {
    let nb = nb.min(out.len());
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        for (b, o) in out.iter_mut().enumerate().take(nb) {
            let y = a.add(b * 36);
            o.write([f16_at(y), if with_min { f16_at(y.add(2)) } else { 0.0 }]);
        }
        // SAFETY: the first nb entries were written just above.
        std::slice::from_raw_parts(out.as_ptr().cast::<[f32; 2]>(), nb)
    }
}

/// Two weight rows against one activation row in ggml's vec_dot order (per row: lanes,
/// FMAs and the final sum exactly as [`dot_legacy`]), sharing the activation loads.
///
/// # Safety
///
/// As [`dot_legacy`] for both `w0` and `w1`; `sc` holds `k / 32` entries.
#[inline(always)]
unsafe fn dot_legacy_x2<D: I8Dot>(
    ty: GgmlType,
    k: usize,
    w0: *const u8,
    w1: *const u8,
    a: *const u8,
    sc: &[[f32; 2]],
) -> (f32, f32) {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        let ts = ty.type_size();
        let with_min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let (mut m0, mut m1) = (0f32, 0f32);
        for i in 0..k / 32 {
            let (x0, x1) = (w0.add(i * ts), w1.add(i * ts));
            let yv = loadu(a.add(i * 36 + 4));
            let (q0, q1) = (legacy_q(ty, x0), legacy_q(ty, x1));
            let (p0, p1) = if with_min {
                (
                    D::dot_us(_mm256_setzero_si256(), q0, yv),
                    D::dot_us(_mm256_setzero_si256(), q1, yv),
                )
            } else {
                (
                    dot_ss::<D>(_mm256_setzero_si256(), q0, yv),
                    dot_ss::<D>(_mm256_setzero_si256(), q1, yv),
                )
            };
            let [dy, sy] = sc[i];
            acc0 = _mm256_fmadd_ps(
                _mm256_set1_ps(f16_at(x0) * dy),
                _mm256_cvtepi32_ps(p0),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                _mm256_set1_ps(f16_at(x1) * dy),
                _mm256_cvtepi32_ps(p1),
                acc1,
            );
            if with_min {
                m0 += f16_at(x0.add(2)) * sy;
                m1 += f16_at(x1.add(2)) * sy;
            }
        }
        (hsum_ps(acc0) + m0, hsum_ps(acc1) + m1)
    }
}

/// What a run of rows computes: the plain dot product of the type (ggml's vec_dot
/// order), or one of the exact batched/repacked orders.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RowKind {
    Plain,
    Exact(ExactPath),
}

/// `out[r] = dot(w row r, a)` for `n` rows `stride` bytes apart. The type and path are
/// matched once, so each loop is monomorphized with its kernel inlined.
///
/// # Safety
///
/// The CPU has AVX2, FMA, F16C and `D`'s instruction; `w` holds `n` rows `stride` bytes apart, each
/// as [`dot_any`] (for `RowKind::Plain`) or [`dot_exact`] needs it, `a` the matching
/// activation row, and `out` is writable for `n` floats.
#[inline(always)]
unsafe fn rows<D: I8Dot>(
    kind: RowKind,
    ty: GgmlType,
    k: usize,
    w: *const u8,
    stride: usize,
    n: usize,
    a: *const u8,
    out: *mut f32,
) {
    macro_rules! each {
        ($t:expr, $f:expr) => {{
            let t = $t;
            for r in 0..n {
                *out.add(r) = $f(t, w.add(r * stride));
            }
        }};
    }
    // Legacy formats: activation scales converted once, rows two at a time.
    macro_rules! legacy {
        ($t:expr) => {{
            let t = $t;
            let nb = k / 32;
            // Not zeroed: this runs once per 16 weight rows and activation row, and
            // clearing 4 KB each time cost more than the scales themselves.
            let mut buf = [std::mem::MaybeUninit::<[f32; 2]>::uninit(); 512];
            if nb > buf.len() {
                each!(t, |t, x| dot_legacy::<D>(t, k, x, a))
            } else {
                let sc = act_scales(a, nb, matches!(t, Q4_1 | Q5_1), &mut buf);
                let mut r = 0;
                while r + 2 <= n {
                    let (v0, v1) =
                        dot_legacy_x2::<D>(t, k, w.add(r * stride), w.add((r + 1) * stride), a, sc);
                    *out.add(r) = v0;
                    *out.add(r + 1) = v1;
                    r += 2;
                }
                if r < n {
                    *out.add(r) = dot_legacy::<D>(t, k, w.add(r * stride), a);
                }
            }
        }};
    }
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe {
        use GgmlType::*;
        match kind {
            RowKind::Plain => match ty {
                Q4_0 => legacy!(Q4_0),
                Q4_1 => legacy!(Q4_1),
                Q5_0 => legacy!(Q5_0),
                Q5_1 => legacy!(Q5_1),
                Q8_0 => legacy!(Q8_0),
                Q2K => each!(Q2K, |t, x| dot_kquant::<D>(t, k, x, a)),
                Q3K => each!(Q3K, |t, x| dot_kquant::<D>(t, k, x, a)),
                Q4K => each!(Q4K, |t, x| dot_kquant::<D>(t, k, x, a)),
                Q5K => each!(Q5K, |t, x| dot_kquant::<D>(t, k, x, a)),
                Q6K => each!(Q6K, |t, x| dot_kquant::<D>(t, k, x, a)),
                other => each!(other, |t, x| dot_any::<D>(t, k, x, a)),
            },
            RowKind::Exact(ExactPath::Tiled) => match ty {
                Q6K => each!(Q6K, |t, x| dot_tiled::<D>(t, k, x, a)),
                Q4K => each!(Q4K, |t, x| dot_tiled::<D>(t, k, x, a)),
                other => each!(other, |t, x| dot_tiled::<D>(t, k, x, a)),
            },
            RowKind::Exact(ExactPath::RepackKquant { group }) => match (ty, group) {
                (Q4K, 256) => each!(Q4K, |t, x| dot_repack_kquant::<D>(t, 256, k, x, a)),
                (Q4K, 64) => each!(Q4K, |t, x| dot_repack_kquant::<D>(t, 64, k, x, a)),
                (other, g) => each!(other, |t, x| dot_repack_kquant::<D>(t, g, k, x, a)),
            },
            RowKind::Exact(ExactPath::RepackQ4_0) => {
                each!(Q4_0, |_t, x| dot_repack_q4_0::<D>(k, x, a))
            }
        }
    }
}

/// # Safety
///
/// The CPU has AVX2, FMA and F16C; the rows as [`rows`] needs them.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_avx2(
    kind: RowKind,
    ty: GgmlType,
    k: usize,
    w: *const u8,
    stride: usize,
    n: usize,
    a: *const u8,
    out: *mut f32,
) {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe { rows::<Avx2>(kind, ty, k, w, stride, n, a, out) }
}

/// # Safety
///
/// The CPU has AVX2, FMA, F16C and AVX-512F/BW/VL/VNNI; the rows as [`rows`] needs them.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn rows_avx512vnni(
    kind: RowKind,
    ty: GgmlType,
    k: usize,
    w: *const u8,
    stride: usize,
    n: usize,
    a: *const u8,
    out: *mut f32,
) {
    // SAFETY: within this function's `# Safety` contract (its CPU features, and the
    // extents of the memory it is given).
    unsafe { rows::<Vnni>(kind, ty, k, w, stride, n, a, out) }
}
