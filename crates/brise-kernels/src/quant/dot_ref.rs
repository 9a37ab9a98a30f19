//! Scalar reference dot products: one weight row against one activation row in the
//! weight type's activation format. Integer sums are exact; the float combination per
//! block is the one ggml uses. SIMD kernels are tested against these.

use super::dequant::{f16_at, k4_scales_mins, q3k_scales};
use crate::ggml_type::{GgmlType, QK_K};
use half::{bf16, f16};

#[inline]
fn i8s(a: &[u8]) -> impl Iterator<Item = i32> + '_ {
    a.iter().map(|&b| b as i8 as i32)
}

#[inline]
fn i16_at(b: &[u8], o: usize) -> i32 {
    i16::from_le_bytes([b[o], b[o + 1]]) as i32
}

/// Dot product of a `wty` row of `k` elements with an activation row of `k` elements.
pub fn dot_ref(wty: GgmlType, k: usize, w: &[u8], a: &[u8]) -> f32 {
    match wty {
        GgmlType::F32 => {
            let mut s = 0f64;
            for (x, y) in w.chunks_exact(4).zip(a.chunks_exact(4)).take(k) {
                let x = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                let y = f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
                s += (x * y) as f64;
            }
            s as f32
        }
        GgmlType::F16 => {
            let mut s = 0f64;
            for (x, y) in w.chunks_exact(2).zip(a.chunks_exact(2)).take(k) {
                let x = f16::from_le_bytes([x[0], x[1]]).to_f32();
                let y = f16::from_le_bytes([y[0], y[1]]).to_f32();
                s += (x * y) as f64;
            }
            s as f32
        }
        GgmlType::BF16 => {
            let mut s = 0f64;
            for (x, y) in w.chunks_exact(2).zip(a.chunks_exact(2)).take(k) {
                let x = bf16::from_le_bytes([x[0], x[1]]).to_f32();
                let y = bf16::from_le_bytes([y[0], y[1]]).to_f32();
                s += (x * y) as f64;
            }
            s as f32
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
            let ts = wty.type_size();
            let mut sumf = 0f32;
            for (x, y) in w.chunks_exact(ts).zip(a.chunks_exact(36)).take(k / 32) {
                let q = legacy_values(wty, x);
                let isum: i32 = q.iter().zip(i8s(&y[4..36])).map(|(a, b)| a * b).sum();
                sumf += (f16_at(x, 0) * f16_at(y, 0)) * isum as f32;
            }
            sumf
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let ts = wty.type_size();
            let mut sumf = 0f32;
            for (x, y) in w.chunks_exact(ts).zip(a.chunks_exact(36)).take(k / 32) {
                let q = legacy_values(wty, x);
                let isum: i32 = q.iter().zip(i8s(&y[4..36])).map(|(a, b)| a * b).sum();
                sumf += (f16_at(x, 0) * f16_at(y, 0)) * isum as f32 + f16_at(x, 2) * f16_at(y, 2);
            }
            sumf
        }
        GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
            let ts = wty.type_size();
            let mut sumf = 0f32;
            for (x, y) in w.chunks_exact(ts).zip(a.chunks_exact(292)).take(k / QK_K) {
                sumf += kquant_block_dot(wty, x, y);
            }
            sumf
        }
        GgmlType::Q8_1 | GgmlType::Q8K => panic!("{wty} is not a weight format"),
    }
}

/// The integer quant values of a legacy 32-element block (offset removed for the
/// symmetric formats).
pub(crate) fn legacy_values(ty: GgmlType, x: &[u8]) -> [i32; 32] {
    let mut q = [0i32; 32];
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (qs, off) = if ty == GgmlType::Q4_0 {
                (&x[2..18], 8)
            } else {
                (&x[4..20], 0)
            };
            for j in 0..16 {
                q[j] = (qs[j] & 0x0f) as i32 - off;
                q[j + 16] = (qs[j] >> 4) as i32 - off;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (h, off) = if ty == GgmlType::Q5_0 {
                (2, 16)
            } else {
                (4, 0)
            };
            let qh = u32::from_le_bytes([x[h], x[h + 1], x[h + 2], x[h + 3]]);
            let qs = &x[h + 4..h + 20];
            for j in 0..16 {
                q[j] = ((qs[j] & 0x0f) as u32 | (((qh >> j) & 1) << 4)) as i32 - off;
                q[j + 16] = ((qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4)) as i32 - off;
            }
        }
        GgmlType::Q8_0 => {
            for (o, v) in q.iter_mut().zip(i8s(&x[2..34])) {
                *o = v;
            }
        }
        _ => unreachable!(),
    }
    q
}

/// The integer quant values of a K-quant block and their per-16 scales (and mins).
/// Returns (q[256], scale per 16 elements, min per 16 elements).
pub(crate) fn kquant_values(ty: GgmlType, x: &[u8]) -> ([i32; 256], [i32; 16], [i32; 16]) {
    let mut q = [0i32; 256];
    let mut sc = [0i32; 16];
    let mut mn = [0i32; 16];
    match ty {
        GgmlType::Q2K => {
            for g in 0..16 {
                sc[g] = (x[g] & 0x0f) as i32;
                mn[g] = (x[g] >> 4) as i32;
            }
            for (e, v) in q.iter_mut().enumerate() {
                let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
                *v = ((x[16 + h * 32 + l] >> (2 * s)) & 3) as i32;
            }
        }
        GgmlType::Q3K => {
            let s = q3k_scales(&x[96..108]);
            for g in 0..16 {
                sc[g] = s[g] as i32;
            }
            for (e, v) in q.iter_mut().enumerate() {
                let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
                let ql = ((x[32 + h * 32 + l] >> (2 * s)) & 3) as i32;
                let hb = ((x[l] >> (e / 32)) & 1) ^ 1;
                *v = ql - ((hb as i32) << 2);
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (s, m) = k4_scales_mins(&x[4..16]);
            for g in 0..16 {
                sc[g] = s[g / 2] as i32;
                mn[g] = m[g / 2] as i32;
            }
            let q5 = ty == GgmlType::Q5K;
            let qs = if q5 { &x[48..176] } else { &x[16..144] };
            for j in 0..8 {
                let (c, shift) = (j / 2, 4 * (j % 2));
                for l in 0..32 {
                    let mut v = ((qs[c * 32 + l] >> shift) & 0x0f) as i32;
                    if q5 {
                        v |= (((x[16 + l] >> j) & 1) as i32) << 4;
                    }
                    q[j * 32 + l] = v;
                }
            }
        }
        GgmlType::Q6K => {
            for g in 0..16 {
                sc[g] = x[192 + g] as i8 as i32;
            }
            for (e, v) in q.iter_mut().enumerate() {
                let (h, r) = (e / 128, e % 128);
                let lo = (x[h * 64 + r % 64] >> (4 * (r / 64))) & 0x0f;
                let hi = (x[128 + h * 32 + r % 32] >> (2 * (r / 32))) & 0x03;
                *v = (lo | (hi << 4)) as i32 - 32;
            }
        }
        _ => unreachable!(),
    }
    (q, sc, mn)
}

/// (d, dmin) of a K-quant block; dmin is 0 for the symmetric formats.
pub(crate) fn kquant_d(ty: GgmlType, x: &[u8]) -> (f32, f32) {
    match ty {
        GgmlType::Q2K => (f16_at(x, 80), f16_at(x, 82)),
        GgmlType::Q3K => (f16_at(x, 108), 0.0),
        GgmlType::Q4K | GgmlType::Q5K => (f16_at(x, 0), f16_at(x, 2)),
        GgmlType::Q6K => (f16_at(x, 208), 0.0),
        _ => unreachable!(),
    }
}

fn kquant_block_dot(ty: GgmlType, x: &[u8], y: &[u8]) -> f32 {
    let (q, sc, mn) = kquant_values(ty, x);
    let (d, dmin) = kquant_d(ty, x);
    let dy = f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
    let yq = &y[4..260];
    let mut isum = 0i32;
    let mut msum = 0i32;
    for g in 0..16 {
        let s: i32 = (0..16)
            .map(|i| q[g * 16 + i] * (yq[g * 16 + i] as i8 as i32))
            .sum();
        isum += sc[g] * s;
        msum += mn[g] * i16_at(y, 260 + 2 * g);
    }
    // Same grouping as ggml: (d_w · d_y) · Σ scale·(q·y) − (dmin_w · d_y) · Σ min·bsum.
    (dy * d) * isum as f32 - (dy * dmin) * msum as f32
}
