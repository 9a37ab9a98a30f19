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
        GgmlType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(36)) {
                quantize_q8_block(vec_dot_ty == GgmlType::Q8_1, xb, ob);
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
