//! Element-wise and row operations of the forward pass. Their float arithmetic follows
//! ggml's CPU backend (f64 sums in RMSNorm and softmax, the same polynomial `exp`), so
//! brise's activations track llama.cpp's closely.
//!
//! Each op's backward (for LoRA training) sits right after its forward: given the
//! forward's inputs and the gradient of the loss with respect to its output, it writes
//! the gradient with respect to its input. Only inputs get gradients: the base model's
//! weights (norm scales included) stay frozen. Tests check every backward against
//! central finite differences of the forward.

/// ggml's vectorised `expf` (`ggml_v_expf`, AVX-512 flavour), evaluated lane by lane.
/// Using it everywhere keeps SiLU and softmax bit-identical between brise's scalar and
/// SIMD paths and close to llama.cpp's. Maximum error is about 1.5 ulp.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3f31_7200), x), // 0x1.62e4p-1
    );
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010)
        .mul_add(b, f32::from_bits(0x3d2b_9f17))
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)),
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0));
    // vscalefps: j·2^n rounded once; 2^n built from its f64 bits (|n| ≤ 192 here).
    let nc = n.clamp(-192.0, 192.0) as i64;
    let res = (j as f64 * f64::from_bits(((nc + 1023) as u64) << 52)) as f32;
    let alt = if n <= 0.0 { 0.0 } else { f32::INFINITY };
    if n.abs() > 192.0 {
        alt
    } else if n.is_nan() {
        n
    } else {
        res
    }
}

/// SiLU as ggml computes it: x / (1 + e^(−x)).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf(-x))
}

#[inline(always)]
fn swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(*g) * *u;
    }
}

/// out[i] = silu(gate[i]) · up[i]  (SwiGLU).
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: AVX-512F is present (checked).
        return unsafe { swiglu_avx512(gate, up, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: FMA and AVX2 are present (checked).
        return unsafe { swiglu_fma(gate, up, out) };
    }
    swiglu_body(gate, up, out)
}

/// # Safety
///
/// The CPU has FMA and AVX2; the body is safe code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn swiglu_fma(gate: &[f32], up: &[f32], out: &mut [f32]) {
    swiglu_body(gate, up, out)
}

/// ggml's AVX-512 SwiGLU (`ggml_v_silu`: x / (1 + e^(0 − x)), times up), 16 values at a
/// time: the same operations as [`silu`] lane by lane (`expf` is its vector twin), so the
/// same bits, without the scalar path's emulation of `vscalefps` through f64.
///
/// # Safety
///
/// The CPU has AVX-512F/BW/VL/DQ, F16C and FMA (the caller checks AVX-512F, which
/// every CPU but Xeon Phi pairs with the rest); the body bounds its loads and stores by
/// the slices' lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
unsafe fn swiglu_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len().min(gate.len()).min(up.len());
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 ≤ n, inside all three slices.
        unsafe {
            let g = _mm512_loadu_ps(gate.as_ptr().add(i));
            let e = crate::attn::x86b::expf(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            let u = _mm512_loadu_ps(up.as_ptr().add(i));
            _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_mul_ps(s, u));
        }
        i += 16;
    }
    swiglu_body(&gate[i..n], &up[i..n], &mut out[i..n]);
}

/// Backward of [`swiglu`]: dgate = dout·up·silu'(gate), dup = dout·silu(gate), with
/// silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
pub fn swiglu_backward(gate: &[f32], up: &[f32], dout: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: AVX-512F is present (checked).
        return unsafe { swiglu_backward_avx512(gate, up, dout, dgate, dup) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: FMA and AVX2 are present (checked).
        return unsafe { swiglu_backward_fma(gate, up, dout, dgate, dup) };
    }
    swiglu_backward_body(gate, up, dout, dgate, dup)
}

/// # Safety
///
/// The CPU has FMA and AVX2; the body is safe code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn swiglu_backward_fma(
    gate: &[f32],
    up: &[f32],
    dout: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) {
    swiglu_backward_body(gate, up, dout, dgate, dup)
}

/// [`swiglu_backward_body`] 16 values at a time, in the same operations and order.
///
/// # Safety
///
/// The CPU has AVX-512F/BW/VL/DQ, F16C and FMA (the caller checks AVX-512F, as for
/// `swiglu_avx512`); the body asserts the slices' lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
unsafe fn swiglu_backward_avx512(
    gate: &[f32],
    up: &[f32],
    dout: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = dout.len();
    assert!(gate.len() >= n && up.len() >= n && dgate.len() >= n && dup.len() >= n);
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 ≤ n, inside all five slices (asserted).
        unsafe {
            let one = _mm512_set1_ps(1.0);
            let g = _mm512_loadu_ps(gate.as_ptr().add(i));
            let e = crate::attn::x86b::expf(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let sig = _mm512_div_ps(one, _mm512_add_ps(one, e));
            let d = _mm512_loadu_ps(dout.as_ptr().add(i));
            let u = _mm512_loadu_ps(up.as_ptr().add(i));
            let t = _mm512_add_ps(one, _mm512_mul_ps(g, _mm512_sub_ps(one, sig)));
            let dg = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(d, u), sig), t);
            _mm512_storeu_ps(dgate.as_mut_ptr().add(i), dg);
            _mm512_storeu_ps(
                dup.as_mut_ptr().add(i),
                _mm512_mul_ps(_mm512_mul_ps(d, g), sig),
            );
        }
        i += 16;
    }
    swiglu_backward_body(
        &gate[i..n],
        &up[i..n],
        &dout[i..n],
        &mut dgate[i..n],
        &mut dup[i..n],
    );
}

#[inline(always)]
fn swiglu_backward_body(
    gate: &[f32],
    up: &[f32],
    dout: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) {
    for i in 0..dout.len() {
        let g = gate[i];
        let sig = 1.0 / (1.0 + expf(-g));
        dgate[i] = dout[i] * up[i] * sig * (1.0 + g * (1.0 - sig));
        dup[i] = dout[i] * g * sig;
    }
}

/// RMSNorm with weight: out = x · (1/√(mean(x²) + eps)) · w, sum of squares in f64.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f64 = x.iter().map(|v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, v), wi) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * wi;
    }
}

/// [`rms_norm`] of each of the `x.len() / w.len()` rows of `x`. Each row's sum is the
/// same sequential f64 sum, but up to eight rows' sums advance together, so the adds of
/// different rows overlap instead of waiting on one another (a row alone is a chain of
/// dependent adds).
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let e = w.len();
    let rows = x.len() / e;
    assert!(out.len() >= rows * e);
    let mut r0 = 0;
    while r0 < rows {
        let left = rows - r0;
        let (x, out) = (&x[r0 * e..], &mut out[r0 * e..]);
        r0 += if left >= 8 {
            rms_norm_chunk::<8>(x, w, eps, out)
        } else if left >= 4 {
            rms_norm_chunk::<4>(x, w, eps, out)
        } else if left >= 2 {
            rms_norm_chunk::<2>(x, w, eps, out)
        } else {
            rms_norm_chunk::<1>(x, w, eps, out)
        };
    }
}

fn rms_norm_chunk<const R: usize>(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> usize {
    let e = w.len();
    let mut sums = [0f64; R];
    for i in 0..e {
        for (j, s) in sums.iter_mut().enumerate() {
            let v = x[j * e + i];
            *s += (v * v) as f64;
        }
    }
    for (j, sum) in sums.iter().enumerate() {
        let mean = (sum / e as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, v), wi) in out[j * e..(j + 1) * e]
            .iter_mut()
            .zip(&x[j * e..(j + 1) * e])
            .zip(w)
        {
            *o = v * scale * wi;
        }
    }
    R
}

/// Backward of [`rms_norm`] with respect to `x` (the weight is frozen): with
/// r = 1/√(mean(x²) + eps), dx_j = r·w_j·dy_j − x_j·r³/n·Σ_i dy_i·w_i·x_i.
pub fn rms_norm_backward(x: &[f32], w: &[f32], eps: f32, dout: &[f32], dx: &mut [f32]) {
    let n = x.len() as f64;
    let sum: f64 = x.iter().map(|v| (*v as f64) * (*v as f64)).sum();
    let r = 1.0 / (sum / n + eps as f64).sqrt();
    let dot: f64 = (0..x.len())
        .map(|i| dout[i] as f64 * w[i] as f64 * x[i] as f64)
        .sum();
    let c = dot * r * r * r / n;
    for j in 0..x.len() {
        dx[j] = (r * w[j] as f64 * dout[j] as f64 - x[j] as f64 * c) as f32;
    }
}

/// `dx += ` [`rms_norm_backward`] of each of the `x.len() / w.len()` rows, with its bits:
/// the rows' sequential f64 sums advance up to eight at a time, as
/// in [`rms_norm_rows`].
pub fn rms_norm_backward_add_rows(x: &[f32], w: &[f32], eps: f32, dout: &[f32], dx: &mut [f32]) {
    let e = w.len();
    let rows = x.len() / e;
    assert!(dout.len() >= rows * e && dx.len() >= rows * e);
    let mut r0 = 0;
    while r0 < rows {
        let left = rows - r0;
        let (x, dout, dx) = (&x[r0 * e..], &dout[r0 * e..], &mut dx[r0 * e..]);
        r0 += if left >= 8 {
            norm_backward_chunk::<8>(x, w, eps, dout, dx)
        } else if left >= 4 {
            norm_backward_chunk::<4>(x, w, eps, dout, dx)
        } else if left >= 2 {
            norm_backward_chunk::<2>(x, w, eps, dout, dx)
        } else {
            norm_backward_chunk::<1>(x, w, eps, dout, dx)
        };
    }
}

fn norm_backward_chunk<const R: usize>(
    x: &[f32],
    w: &[f32],
    eps: f32,
    dout: &[f32],
    dx: &mut [f32],
) -> usize {
    let e = w.len();
    let n = e as f64;
    let (mut sums, mut dots) = ([0f64; R], [0f64; R]);
    for i in 0..e {
        for j in 0..R {
            let v = x[j * e + i] as f64;
            sums[j] += v * v;
            dots[j] += dout[j * e + i] as f64 * w[i] as f64 * v;
        }
    }
    for j in 0..R {
        let r = 1.0 / (sums[j] / n + eps as f64).sqrt();
        let c = dots[j] * r * r * r / n;
        let (x, dout, dx) = (
            &x[j * e..(j + 1) * e],
            &dout[j * e..(j + 1) * e],
            &mut dx[j * e..(j + 1) * e],
        );
        for i in 0..e {
            dx[i] += (r * w[i] as f64 * dout[i] as f64 - x[i] as f64 * c) as f32;
        }
    }
    R
}

/// In-place x += y.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += *b;
    }
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): ggml's NORMAL mode, used by GGUF `llama` (whose
    /// converter permutes Q/K rows to match).
    Normal,
    /// Halves (i, i + d/2): NEOX mode, used by Qwen2 and by Hugging Face checkpoints.
    Neox,
}

/// Precomputed cos/sin for one position, ggml-style: θ_i = p·base^(−2i/d) with the powers
/// accumulated by repeated multiplication in f32, exactly as `ggml_rope_cache_init` does.
pub fn rope_cache(pos: usize, n_rot: usize, freq_base: f32, freq_scale: f32, cache: &mut [f32]) {
    let theta_scale = freq_base.powf(-2.0 / n_rot as f32);
    let mut theta = pos as f32;
    for i in (0..n_rot).step_by(2) {
        let t = freq_scale * theta;
        cache[i] = t.cos();
        cache[i + 1] = t.sin();
        theta *= theta_scale;
    }
}

/// Rotates one head vector in place with a cache from [`rope_cache`].
pub fn rope_apply(style: RopeStyle, x: &mut [f32], n_rot: usize, cache: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: FMA and AVX2 are present (checked).
        return unsafe { rope_apply_fma(style, x, n_rot, cache) };
    }
    rope_apply_body(style, x, n_rot, cache)
}

/// # Safety
///
/// The CPU has FMA and AVX2; the body is safe code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn rope_apply_fma(style: RopeStyle, x: &mut [f32], n_rot: usize, cache: &[f32]) {
    rope_apply_body(style, x, n_rot, cache)
}

#[inline(always)]
fn rope_apply_body(style: RopeStyle, x: &mut [f32], n_rot: usize, cache: &[f32]) {
    let (stride, offset) = match style {
        RopeStyle::Normal => (2, 1),
        RopeStyle::Neox => (1, n_rot / 2),
    };
    for i in (0..n_rot).step_by(2) {
        let (c, s) = (cache[i], cache[i + 1]);
        let ic = i / 2 * stride;
        let x0 = x[ic];
        let x1 = x[ic + offset];
        // GCC contracts ggml's `x0*cos - x1*sin` into fma(x0, cos, -(x1*sin)); so do we.
        x[ic] = x0.mul_add(c, -(x1 * s));
        x[ic + offset] = x0.mul_add(s, x1 * c);
    }
}

/// Backward of [`rope_apply`], in place: the gradient rotates by −θ (the transpose of
/// each 2×2 rotation).
pub fn rope_backward(style: RopeStyle, d: &mut [f32], n_rot: usize, cache: &[f32]) {
    let (stride, offset) = match style {
        RopeStyle::Normal => (2, 1),
        RopeStyle::Neox => (1, n_rot / 2),
    };
    for i in (0..n_rot).step_by(2) {
        let (c, s) = (cache[i], cache[i + 1]);
        let ic = i / 2 * stride;
        let (d0, d1) = (d[ic], d[ic + offset]);
        d[ic] = d0 * c + d1 * s;
        d[ic + offset] = d1 * c - d0 * s;
    }
}

/// Softmax in place, ggml-style: e^(x−max) with [`expf`], sum in f64, scaled by 1/sum.
/// Entries of −∞ (masked) become 0.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let mut sum = 0f64;
    for v in x.iter_mut() {
        *v = expf(*v - max);
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Backward of [`softmax`]: given its output `p` and `dp`, ds_i = p_i·(dp_i − Σ_j p_j·dp_j).
pub fn softmax_backward(p: &[f32], dp: &[f32], ds: &mut [f32]) {
    let dot: f64 = p.iter().zip(dp).map(|(a, b)| *a as f64 * *b as f64).sum();
    for i in 0..p.len() {
        ds[i] = p[i] * (dp[i] - dot as f32);
    }
}

/// A row's `log Σ exp(z)` as its parts: the max and `Σ expf(z − max)` in f64.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogSumExp {
    pub max: f32,
    pub sum: f64,
}

impl LogSumExp {
    pub fn value(&self) -> f64 {
        self.max as f64 + self.sum.ln()
    }
}

/// `log Σ exp(z)` of a row of logits: [`expf`] of `z − max`, summed in f64 in 16 lanes
/// (lane `l` takes the entries `≡ l mod 16`, in order) and then by a fixed tree, so the
/// AVX-512 path and this scalar one give the same bits.
pub fn log_sum_exp(z: &[f32]) -> LogSumExp {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: AVX-512F is present (checked).
        return unsafe { log_sum_exp_avx512(z) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present (checked).
        return unsafe { log_sum_exp_fma(z) };
    }
    log_sum_exp_ref(z)
}

/// [`log_sum_exp_ref`] compiled with FMA, so `expf`'s `mul_add`s are instructions rather
/// than libm calls (the same correctly rounded results, so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn log_sum_exp_fma(z: &[f32]) -> LogSumExp {
    log_sum_exp_body(z)
}

/// The scalar model of [`log_sum_exp`].
pub fn log_sum_exp_ref(z: &[f32]) -> LogSumExp {
    log_sum_exp_body(z)
}

#[inline(always)]
fn log_sum_exp_body(z: &[f32]) -> LogSumExp {
    let max = z.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let mut acc = [0f64; 16];
    for (i, v) in z.iter().enumerate() {
        acc[i % 16] += expf(*v - max) as f64;
    }
    LogSumExp {
        max,
        sum: reduce16_f64(&acc),
    }
}

/// 16 f64 lanes summed as the AVX-512 path sums its two 8-lane accumulators.
fn reduce16_f64(a: &[f64; 16]) -> f64 {
    let mut s8 = [0f64; 8];
    for l in 0..8 {
        s8[l] = a[l] + a[l + 8];
    }
    let s4: [f64; 4] = std::array::from_fn(|l| s8[l] + s8[l + 4]);
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// # Safety
///
/// The CPU has AVX-512F/BW/VL/DQ, F16C and FMA (the caller checks AVX-512F, as for
/// `swiglu_avx512`); the body's loads stay inside `z` (its tail's are masked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
unsafe fn log_sum_exp_avx512(z: &[f32]) -> LogSumExp {
    use std::arch::x86_64::*;
    let n = z.len();
    let body = n / 16 * 16;
    let tail: u16 = ((1u32 << (n - body)) - 1) as u16;
    // SAFETY: loads of 16 stay below `body`; the tail's loads are masked to `n`.
    unsafe {
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < body {
            m = _mm512_max_ps(m, _mm512_loadu_ps(z.as_ptr().add(i)));
            i += 16;
        }
        let last = _mm512_mask_loadu_ps(
            _mm512_set1_ps(f32::NEG_INFINITY),
            tail,
            z.as_ptr().add(body),
        );
        let max = _mm512_reduce_max_ps(_mm512_max_ps(m, last));
        let mv = _mm512_set1_ps(max);
        let (mut lo, mut hi) = (_mm512_setzero_pd(), _mm512_setzero_pd());
        let mut add = |e: __m512| {
            lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
            hi = _mm512_add_pd(
                hi,
                _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(e),
                ))),
            );
        };
        let mut i = 0;
        while i < body {
            add(crate::attn::x86b::expf(_mm512_sub_ps(
                _mm512_loadu_ps(z.as_ptr().add(i)),
                mv,
            )));
            i += 16;
        }
        if tail != 0 {
            let x = _mm512_maskz_loadu_ps(tail, z.as_ptr().add(body));
            add(_mm512_maskz_mov_ps(
                tail,
                crate::attn::x86b::expf(_mm512_sub_ps(x, mv)),
            ));
        }
        let mut acc = [0f64; 16];
        _mm512_storeu_pd(acc.as_mut_ptr(), lo);
        _mm512_storeu_pd(acc.as_mut_ptr().add(8), hi);
        LogSumExp {
            max,
            sum: reduce16_f64(&acc),
        }
    }
}

/// `dz = scale · (softmax(z) − onehot(target))`, the softmax as `expf(z − max)` times
/// `scale / sum` rounded once to f32 (`lse` is the row's [`log_sum_exp`]).
pub fn softmax_grad(z: &[f32], lse: &LogSumExp, target: usize, scale: f32, dz: &mut [f32]) {
    let n = z.len().min(dz.len());
    let k = (scale as f64 / lse.sum) as f32;
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: AVX-512F is present (checked); `n` is within both slices.
        done = unsafe { softmax_grad_avx512(&z[..n], lse.max, k, &mut dz[..n]) };
    }
    #[cfg(target_arch = "x86_64")]
    if done < n
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: AVX2 and FMA are present (checked).
        unsafe { softmax_grad_fma(&z[done..n], lse.max, k, &mut dz[done..n]) };
        done = n;
    }
    softmax_grad_body(&z[done..n], lse.max, k, &mut dz[done..n]);
    dz[target] -= scale;
}

#[inline(always)]
fn softmax_grad_body(z: &[f32], max: f32, k: f32, dz: &mut [f32]) {
    for (d, v) in dz.iter_mut().zip(z) {
        *d = expf(*v - max) * k;
    }
}

/// [`softmax_grad_body`] compiled with FMA (see [`log_sum_exp_fma`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_grad_fma(z: &[f32], max: f32, k: f32, dz: &mut [f32]) {
    softmax_grad_body(z, max, k, dz)
}

/// The 16-wide body of [`softmax_grad`]; returns how many entries it wrote.
///
/// # Safety
///
/// The CPU has AVX-512F/BW/VL/DQ, F16C and FMA (the caller checks AVX-512F, as for
/// `swiglu_avx512`); `dz` holds at least `z.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
unsafe fn softmax_grad_avx512(z: &[f32], max: f32, k: f32, dz: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let body = z.len() / 16 * 16;
    let (mv, kv) = (_mm512_set1_ps(max), _mm512_set1_ps(k));
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 ≤ body ≤ both lengths.
        unsafe {
            let e = crate::attn::x86b::expf(_mm512_sub_ps(_mm512_loadu_ps(z.as_ptr().add(i)), mv));
            _mm512_storeu_ps(dz.as_mut_ptr().add(i), _mm512_mul_ps(e, kv));
        }
        i += 16;
    }
    body
}

/// Cross-entropy of one row of logits against `target`: returns −log softmax(z)[t], and
/// writes its gradient times `scale` into `dz` (softmax(z) − onehot(t), scaled).
pub fn cross_entropy(z: &[f32], target: usize, scale: f32, dz: &mut [f32]) -> f32 {
    let lse = log_sum_exp(z);
    softmax_grad(z, &lse, target, scale, dz);
    (lse.value() - z[target] as f64) as f32
}

/// log softmax(z)[t], in f64 (DPO and KTO compare sums of these).
pub fn log_prob(z: &[f32], target: usize) -> f64 {
    z[target] as f64 - log_sum_exp(z).value()
}

/// Rounds f32 values to f16 (round to nearest even) into little-endian bytes.
pub fn f32_to_f16_bytes(x: &[f32], out: &mut [u8]) {
    let n = x.len().min(out.len() / 2);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: F16C (with its AVX) is present (checked); `n` is within both slices.
        done = unsafe { f32_to_f16_f16c(&x[..n], &mut out[..2 * n]) };
    }
    for (o, v) in out[2 * done..2 * n].chunks_exact_mut(2).zip(&x[done..n]) {
        o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
    }
}

/// `out[i]` = the f16 at bytes `2i..2i+2` of `h` (little-endian), exactly.
pub fn f16_bytes_to_f32(h: &[u8], out: &mut [f32]) {
    let n = out.len().min(h.len() / 2);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: F16C (with its AVX) is present (checked); `n` is within both slices.
        done = unsafe { f16_to_f32_f16c(&h[..2 * n], &mut out[..n]) };
    }
    for (o, c) in out[done..n]
        .iter_mut()
        .zip(h[2 * done..2 * n].chunks_exact(2))
    {
        *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

/// # Safety
///
/// The CPU has AVX and F16C; `h` holds 2 bytes per value of `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(h: &[u8], out: &mut [f32]) -> usize {
    use core::arch::x86_64::*;
    let n = out.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 ≤ n ≤ out.len(), and h holds 2 bytes per value of out.
        unsafe {
            let v = _mm_loadu_si128(h.as_ptr().add(2 * i) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(v));
        }
    }
    n
}

/// Eight values at a time with `vcvtps2ph` (round to nearest even, as `half` does);
/// returns how many it converted (a multiple of 8).
///
/// # Safety
///
/// The CPU has AVX and F16C; `out` holds 2 bytes per value of `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f32_to_f16_f16c(x: &[f32], out: &mut [u8]) -> usize {
    use core::arch::x86_64::*;
    let n = x.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 ≤ n ≤ x.len(), and out holds 2 bytes per value of x.
        unsafe {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(out.as_mut_ptr().add(2 * i) as *mut __m128i, h);
        }
    }
    n
}

/// out += a · v, with `v` f16 little-endian bytes.
pub fn axpy_f16(out: &mut [f32], a: f32, v: &[u8]) {
    for (o, c) in out.iter_mut().zip(v.chunks_exact(2)) {
        *o += a * half::f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

/// Asks the CPU to bring `data` into cache (a hint: it changes no result).
pub fn prefetch(data: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        for o in (0..data.len()).step_by(64) {
            // SAFETY: prefetching never faults or writes, and the address is in `data`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(o) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_rows_equals_rms_norm_bitwise() {
        let e = 576;
        for rows in [1usize, 2, 3, 4, 5, 6, 7, 8, 9, 15, 17] {
            let x: Vec<f32> = (0..rows * e)
                .map(|i| ((i as f32) * 0.37).sin() * 3.0)
                .collect();
            let w: Vec<f32> = (0..e).map(|i| 1.0 + (i as f32 * 0.01).cos()).collect();
            let mut got = vec![0f32; rows * e];
            rms_norm_rows(&x, &w, 1e-5, &mut got);
            for r in 0..rows {
                let mut want = vec![0f32; e];
                rms_norm(&x[r * e..(r + 1) * e], &w, 1e-5, &mut want);
                for (a, b) in got[r * e..(r + 1) * e].iter().zip(&want) {
                    assert_eq!(a.to_bits(), b.to_bits(), "rows={rows} row {r}");
                }
            }
        }
    }

    #[test]
    fn f16_conversion_equals_half_bitwise() {
        let mut x: Vec<f32> = (0..4099)
            .map(|i| ((i as f32) * 0.731).sin() * 10f32.powi(i % 13 - 8))
            .collect();
        x.extend([
            0.0,
            -0.0,
            65504.0,
            65520.0,
            1e9,
            -1e9,
            5.96e-8,
            2.9e-8,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.000_488_3,
            1.000_976_6,
        ]);
        let mut got = vec![0u8; 2 * x.len()];
        f32_to_f16_bytes(&x, &mut got);
        for (i, v) in x.iter().enumerate() {
            let want = half::f16::from_f32(*v).to_le_bytes();
            assert_eq!(&got[2 * i..2 * i + 2], &want, "{v}");
        }
        // And back, for every f16 bit pattern but NaNs (whose payloads both keep).
        let all: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        let mut back = vec![0f32; 1 << 16];
        f16_bytes_to_f32(&all, &mut back);
        for (b, v) in back.iter().enumerate() {
            let want = half::f16::from_bits(b as u16).to_f32();
            if !want.is_nan() {
                assert_eq!(v.to_bits(), want.to_bits(), "{b:#x}");
            } else {
                assert!(v.is_nan());
            }
        }
    }

    #[test]
    fn expf_tracks_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (expf(x), x.exp());
            assert!(((a - b) / b).abs() < 4e-7, "x={x}: {a} vs {b}");
            x += 0.0137;
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(0.0), 1.0);
    }

    #[test]
    fn softmax_sums_to_one_and_masks() {
        let mut v = vec![1.0, 2.0, f32::NEG_INFINITY, 0.5];
        softmax(&mut v);
        assert_eq!(v[2], 0.0);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(v[1] > v[0] && v[0] > v[3]);
    }

    #[test]
    fn rope_styles_agree_up_to_layout() {
        let n = 8;
        let mut cache = vec![0f32; n];
        rope_cache(7, n, 10000.0, 1.0, &mut cache);
        let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.3 - 1.0).collect();
        // NEOX on [a0..a3, b0..b3] equals NORMAL on [a0, b0, a1, b1, ...].
        let mut neox = x.clone();
        rope_apply(RopeStyle::Neox, &mut neox, n, &cache);
        let mut inter: Vec<f32> = (0..n)
            .map(|i| {
                if i % 2 == 0 {
                    x[i / 2]
                } else {
                    x[n / 2 + i / 2]
                }
            })
            .collect();
        rope_apply(RopeStyle::Normal, &mut inter, n, &cache);
        for i in 0..n / 2 {
            assert_eq!(neox[i], inter[2 * i]);
            assert_eq!(neox[n / 2 + i], inter[2 * i + 1]);
        }
        // Position 0 is the identity.
        rope_cache(0, n, 10000.0, 1.0, &mut cache);
        let mut y = x.clone();
        rope_apply(RopeStyle::Normal, &mut y, n, &cache);
        assert_eq!(y, x);
    }

    /// A deterministic pseudo-random sequence in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect()
    }

    /// Checks an analytic input gradient against central differences of
    /// L(x) = Σ c_i·f(x)_i, computed in f64 from the f32 forward.
    fn check_grad(x: &[f32], c: &[f32], f: &dyn Fn(&[f32]) -> Vec<f32>, grad: &[f32], tol: f64) {
        let loss =
            |x: &[f32]| -> f64 { f(x).iter().zip(c).map(|(a, b)| *a as f64 * *b as f64).sum() };
        for j in 0..x.len() {
            let h = 1e-2f32 * x[j].abs().max(0.1);
            let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
            xp[j] += h;
            xm[j] -= h;
            let fd = (loss(&xp) - loss(&xm)) / ((xp[j] - xm[j]) as f64);
            let g = grad[j] as f64;
            assert!(
                (fd - g).abs() <= tol * (1.0 + fd.abs().max(g.abs())),
                "d/dx[{j}]: analytic {g}, finite differences {fd}"
            );
        }
    }

    #[test]
    fn swiglu_simd_equals_its_scalar_model_bitwise() {
        let mut g: Vec<f32> = (0..40_000)
            .map(|i| {
                let t = (i as f32 * 0.618_034).fract();
                (t - 0.5) * [0.01f32, 1.0, 8.0, 30.0, 120.0, 400.0][i % 6]
            })
            .collect();
        g.extend([
            0.0,
            -0.0,
            87.0,
            -87.0,
            104.0,
            -104.0,
            1e-40,
            -1e-40,
            f32::MAX,
            f32::MIN,
        ]);
        g.extend([f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE, 3.0]);
        let u: Vec<f32> = (0..g.len())
            .map(|i| 1.0 + (i as f32 * 0.37).sin())
            .collect();
        let mut got = vec![0f32; g.len()];
        swiglu(&g, &u, &mut got);
        let mut want = vec![0f32; g.len()];
        swiglu_body(&g, &u, &mut want);
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        for i in 0..g.len() {
            assert!(
                same(got[i], want[i]),
                "gate {} up {}: {} vs {}",
                g[i],
                u[i],
                got[i],
                want[i]
            );
        }
        let d: Vec<f32> = (0..g.len()).map(|i| (i as f32 * 0.11).cos()).collect();
        let n = g.len();
        let (mut dg, mut du, mut wg, mut wu) =
            (vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        swiglu_backward(&g, &u, &d, &mut dg, &mut du);
        swiglu_backward_body(&g, &u, &d, &mut wg, &mut wu);
        for i in 0..n {
            assert!(
                same(dg[i], wg[i]) && same(du[i], wu[i]),
                "backward at gate {}",
                g[i]
            );
        }
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let n = 40;
        let (gate, up, c) = (noise(n, 1), noise(n, 2), noise(n, 3));
        let gate: Vec<f32> = gate.iter().map(|g| g * 4.0).collect();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        swiglu_backward(&gate, &up, &c, &mut dg, &mut du);
        let f_g = |g: &[f32]| {
            let mut o = vec![0f32; n];
            swiglu(g, &up, &mut o);
            o
        };
        check_grad(&gate, &c, &f_g, &dg, 2e-3);
        let f_u = |u: &[f32]| {
            let mut o = vec![0f32; n];
            swiglu(&gate, u, &mut o);
            o
        };
        check_grad(&up, &c, &f_u, &du, 2e-3);
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let n = 48;
        let (x, c) = (noise(n, 4), noise(n, 5));
        let w: Vec<f32> = noise(n, 6).iter().map(|v| 1.0 + 0.5 * v).collect();
        let mut dx = vec![0f32; n];
        rms_norm_backward(&x, &w, 1e-5, &c, &mut dx);
        let f = |x: &[f32]| {
            let mut o = vec![0f32; n];
            rms_norm(x, &w, 1e-5, &mut o);
            o
        };
        check_grad(&x, &c, &f, &dx, 2e-3);
    }

    #[test]
    fn rope_backward_matches_finite_differences() {
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            let n = 16;
            let mut cache = vec![0f32; n];
            rope_cache(37, n, 10000.0, 1.0, &mut cache);
            let (x, c) = (noise(n, 7), noise(n, 8));
            let mut d = c.clone();
            rope_backward(style, &mut d, n, &cache);
            let f = |x: &[f32]| {
                let mut y = x.to_vec();
                rope_apply(style, &mut y, n, &cache);
                y
            };
            check_grad(&x, &c, &f, &d, 2e-3);
        }
    }

    #[test]
    fn softmax_backward_matches_finite_differences() {
        let n = 24;
        let (x, c) = (noise(n, 9), noise(n, 10));
        let x: Vec<f32> = x.iter().map(|v| v * 3.0).collect();
        let mut p = x.clone();
        softmax(&mut p);
        let mut ds = vec![0f32; n];
        softmax_backward(&p, &c, &mut ds);
        let f = |x: &[f32]| {
            let mut y = x.to_vec();
            softmax(&mut y);
            y
        };
        check_grad(&x, &c, &f, &ds, 5e-3);
    }

    #[test]
    fn norm_backward_rows_equal_row_by_row_bitwise() {
        let e = 96;
        for rows in [1usize, 2, 3, 5, 8, 9, 17] {
            let x = noise(rows * e, 3);
            let dout = noise(rows * e, 4);
            let w: Vec<f32> = noise(e, 5).iter().map(|v| 1.0 + v).collect();
            let d0 = noise(rows * e, 6);
            let mut got = d0.clone();
            rms_norm_backward_add_rows(&x, &w, 1e-5, &dout, &mut got);
            let mut want = d0.clone();
            let mut t = vec![0f32; e];
            for i in 0..rows {
                let r = i * e..(i + 1) * e;
                rms_norm_backward(&x[r.clone()], &w, 1e-5, &dout[r.clone()], &mut t);
                add_assign(&mut want[r], &t);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{rows} rows");
        }
    }

    #[test]
    fn log_sum_exp_paths_agree_bitwise_and_track_f64() {
        for n in [1usize, 2, 15, 16, 17, 31, 100, 1000, 49152] {
            let z: Vec<f32> = noise(n, n as u64 + 3).iter().map(|v| v * 12.0).collect();
            let (a, b) = (log_sum_exp(&z), log_sum_exp_ref(&z));
            assert_eq!(a.max.to_bits(), b.max.to_bits(), "n={n}");
            assert_eq!(a.sum.to_bits(), b.sum.to_bits(), "n={n}");
            let m = z.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v as f64));
            let exact = m + z.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln();
            assert!(
                (a.value() - exact).abs() < 1e-6 * exact.abs().max(1.0),
                "n={n}: {} vs {exact}",
                a.value()
            );
            let t = n / 2;
            let mut dz = vec![0f32; n];
            softmax_grad(&z, &a, t, -0.25, &mut dz);
            for (i, (d, v)) in dz.iter().zip(&z).enumerate() {
                let p = (*v as f64 - exact).exp();
                let want = -0.25 * (p - if i == t { 1.0 } else { 0.0 });
                assert!(
                    (*d as f64 - want).abs() < 1e-6,
                    "n={n} i={i}: {d} vs {want}"
                );
                let scalar =
                    expf(*v - a.max) * (-0.25f64 / a.sum) as f32 - if i == t { -0.25 } else { 0.0 };
                assert_eq!(d.to_bits(), scalar.to_bits(), "n={n} i={i}");
            }
        }
    }

    #[test]
    fn cross_entropy_gradient_and_value() {
        let n = 30;
        let z: Vec<f32> = noise(n, 11).iter().map(|v| v * 5.0).collect();
        let mut dz = vec![0f32; n];
        let l = cross_entropy(&z, 7, 0.5, &mut dz);
        assert!((l as f64 + log_prob(&z, 7)).abs() < 1e-6);
        // The loss against softmax: −log p_t.
        let mut p = z.clone();
        softmax(&mut p);
        assert!((l + p[7].ln()).abs() < 1e-5);
        let f = |z: &[f32]| {
            let mut d = vec![0f32; n];
            vec![cross_entropy(z, 7, 1.0, &mut d)]
        };
        check_grad(&z, &[0.5], &f, &dz, 2e-3);
    }

    #[test]
    fn rms_norm_unit_rms() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) * 0.1).collect();
        let w = vec![1.0f32; 64];
        let mut o = vec![0f32; 64];
        rms_norm(&x, &w, 1e-6, &mut o);
        let ms: f32 = o.iter().map(|v| v * v).sum::<f32>() / 64.0;
        assert!((ms - 1.0).abs() < 1e-4);
    }
}
