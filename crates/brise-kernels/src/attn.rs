//! Attention arithmetic in llama.cpp's exact order (its CPU backend without flash
//! attention, f16 KV cache): Q rounded to f16 and dotted with each key; scores scaled and
//! soft-maxed over 16-wide chunks with ggml's `expf`; probabilities rounded to f16 and
//! dotted with each row of the transposed value cache.
//!
//! llama.cpp takes two paths for those f16 dot products: `ggml_vec_dot_f16` (four 16-lane
//! accumulators over 64-element steps) when a step has one token, and llamafile's
//! `tinyBLAS` (one 16-lane accumulator) when it has more. [`DotOrder`] names them; each
//! kernel reproduces the lane assignment, the FMA order and the horizontal-sum tree, so
//! the results are bit-identical.

use crate::lora;
use crate::ops::expf;
use half::f16;

/// Which of llama.cpp's f16 dot products a step uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DotOrder {
    /// `ggml_vec_dot_f16`: a single-token step.
    Vec,
    /// llamafile `tinyBLAS<16, __m512>`: a multi-token step (length a multiple of 16).
    Tiny,
}

#[inline(always)]
fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
}

/// GCC's `_mm512_reduce_add_ps`: halves, quarters, then pairs.
#[inline(always)]
pub fn reduce16(a: &[f32; 16]) -> f32 {
    let mut t3 = [0f32; 8];
    for i in 0..8 {
        t3[i] = a[8 + i] + a[i];
    }
    let mut t6 = [0f32; 4];
    for i in 0..4 {
        t6[i] = t3[4 + i] + t3[i];
    }
    let t80 = t6[0] + t6[2];
    let t81 = t6[1] + t6[3];
    t80 + t81
}

/// Scalar `ggml_vec_dot_f16` over elements `[start, end)` of f16 rows `x` and `y`
/// (element index = absolute position, which fixes its lane), where the full row
/// length `n` decides which tail elements fall outside the 64-wide steps. Elements
/// outside `[start, end)` count as zero products.
pub fn dot_f16_vec_ref(x: &[u8], y: &[u8], start: usize, end: usize, n: usize) -> f32 {
    let np = n & !63;
    let mut acc = [[0f32; 16]; 4];
    let simd_end = end.min(np);
    for i in start..simd_end.max(start) {
        let (j, l) = ((i % 64) / 16, i % 16);
        acc[j][l] = h(x, i).mul_add(h(y, i), acc[j][l]);
    }
    for l in 0..16 {
        acc[0][l] += acc[2][l];
        acc[1][l] += acc[3][l];
    }
    for l in 0..16 {
        acc[0][l] += acc[1][l];
    }
    let mut sum = reduce16(&acc[0]) as f64;
    for i in np.max(start)..end {
        sum += (h(x, i) * h(y, i)) as f64;
    }
    sum as f32
}

/// Scalar llamafile tinyBLAS f16 dot (16 lanes, element i in lane i % 16) over
/// `[start, end)`; the row length must be a multiple of 16.
pub fn dot_f16_tiny_ref(x: &[u8], y: &[u8], start: usize, end: usize) -> f32 {
    let mut acc = [0f32; 16];
    for i in start..end {
        acc[i % 16] = h(x, i).mul_add(h(y, i), acc[i % 16]);
    }
    reduce16(&acc)
}

/// The f16 dot product of `x` and `y` over `[start, end)` in `order`, SIMD when the
/// CPU has AVX-512 (bit-identical to the scalar references).
pub fn dot_f16(order: DotOrder, x: &[u8], y: &[u8], start: usize, end: usize, n: usize) -> f32 {
    assert!(end <= n && x.len() >= 2 * end && y.len() >= 2 * end);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is present (checked) and both rows hold `end` elements.
        return unsafe {
            match order {
                DotOrder::Vec => x86::dot_f16_vec(x.as_ptr(), y.as_ptr(), start, end, n),
                DotOrder::Tiny => x86::dot_f16_tiny(x.as_ptr(), y.as_ptr(), start, end),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2, F16C and FMA are present (checked) and both rows hold `end`
        // elements (asserted above).
        return unsafe {
            match order {
                DotOrder::Vec => avx2::dot_f16_vec(x.as_ptr(), y.as_ptr(), start, end, n),
                DotOrder::Tiny => avx2::dot_f16_tiny(x.as_ptr(), y.as_ptr(), start, end),
            }
        };
    }
    match order {
        DotOrder::Vec => dot_f16_vec_ref(x, y, start, end, n),
        DotOrder::Tiny => dot_f16_tiny_ref(x, y, start, end),
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    crate::cpu::has_avx512()
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("f16c")
        && std::arch::is_x86_feature_detected!("fma")
}

/// The f16 dots on AVX2 (CPUs without AVX-512): each 16-lane accumulator of llama.cpp's
/// AVX-512 order as two 8-lane halves, the same FMAs per lane and the same reduce tree,
/// so the bits equal the scalar references' (and the AVX-512 kernels').
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::reduce16;
    use core::arch::x86_64::*;

    /// 16 f16 lanes from `p` as two halves, zero outside `[start, end)` relative to
    /// element `base`.
    ///
    /// # Safety
    ///
    /// The CPU has AVX and F16C; `p` is readable at every f16 index in `[start, end)` that
    /// is also in `[base, base + 16)` (the only ones read).
    #[inline(always)]
    unsafe fn load16(p: *const u8, base: usize, start: usize, end: usize) -> (__m256, __m256) {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            if base >= start && base + 16 <= end {
                let lo = _mm_loadu_si128(p.add(2 * base) as *const __m128i);
                let hi = _mm_loadu_si128(p.add(2 * base + 16) as *const __m128i);
                return (_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi));
            }
            let mut t = [0u16; 16];
            let ph = p as *const u16;
            for (l, v) in t.iter_mut().enumerate() {
                if base + l >= start && base + l < end {
                    *v = ph.add(base + l).read_unaligned();
                }
            }
            let lo = _mm_loadu_si128(t.as_ptr() as *const __m128i);
            let hi = _mm_loadu_si128(t.as_ptr().add(8) as *const __m128i);
            (_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi))
        }
    }

    /// # Safety
    ///
    /// The CPU has AVX (register stores into a local array only).
    #[inline(always)]
    unsafe fn lanes(a: (__m256, __m256)) -> [f32; 16] {
        let mut out = [0f32; 16];
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), a.0);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), a.1);
        }
        out
    }

    /// # Safety
    /// AVX2, F16C and FMA are present; `x` and `y` hold at least `end` f16 values.
    #[target_feature(enable = "avx2,f16c,fma")]
    pub unsafe fn dot_f16_tiny(x: *const u8, y: *const u8, start: usize, end: usize) -> f32 {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = start / 16 * 16;
            while i < end {
                let (x0, x1) = load16(x, i, start, end);
                let (y0, y1) = load16(y, i, start, end);
                a0 = _mm256_fmadd_ps(x0, y0, a0);
                a1 = _mm256_fmadd_ps(x1, y1, a1);
                i += 16;
            }
            reduce16(&lanes((a0, a1)))
        }
    }

    /// # Safety
    /// As [`dot_f16_tiny`], with `end <= n`.
    #[target_feature(enable = "avx2,f16c,fma")]
    pub unsafe fn dot_f16_vec(
        x: *const u8,
        y: *const u8,
        start: usize,
        end: usize,
        n: usize,
    ) -> f32 {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let np = n & !63;
            let mut acc = [(_mm256_setzero_ps(), _mm256_setzero_ps()); 4];
            let simd_end = end.min(np);
            let mut i = start / 64 * 64;
            while i < simd_end {
                for (j, a) in acc.iter_mut().enumerate() {
                    let b = i + 16 * j;
                    let (x0, x1) = load16(x, b, start, simd_end);
                    let (y0, y1) = load16(y, b, start, simd_end);
                    a.0 = _mm256_fmadd_ps(x0, y0, a.0);
                    a.1 = _mm256_fmadd_ps(x1, y1, a.1);
                }
                i += 64;
            }
            let add = |p: (__m256, __m256), q: (__m256, __m256)| {
                (_mm256_add_ps(p.0, q.0), _mm256_add_ps(p.1, q.1))
            };
            acc[0] = add(acc[0], acc[2]);
            acc[1] = add(acc[1], acc[3]);
            acc[0] = add(acc[0], acc[1]);
            let mut sum = reduce16(&lanes(acc[0])) as f64;
            let (xh, yh) = (x as *const u16, y as *const u16);
            for i in np.max(start)..end {
                let a = half::f16::from_bits(xh.add(i).read_unaligned()).to_f32();
                let b = half::f16::from_bits(yh.add(i).read_unaligned()).to_f32();
                sum += (a * b) as f64;
            }
            sum as f32
        }
    }
}

/// ggml's soft_max over a row of `n_kv` scores of which only `[lo, hi)` are unmasked:
/// 16-wide chunks of `expf(s − max)` summed by the reduce tree into an f64, a scalar
/// tail with libm `expf` when `n_kv` is not a multiple of 16, then scaled by
/// `(f32)(1/sum)`. Writes probabilities for `[lo, hi)` into `p[lo..hi]`.
pub fn softmax_masked(s: &[f32], lo: usize, hi: usize, n_kv: usize, p: &mut [f32]) {
    assert!(hi <= s.len() && hi <= p.len() && lo < hi && hi <= n_kv);
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: AVX-512F/FMA present (checked); indices checked above and masked loads
        // and stores touch only [lo, hi).
        return unsafe { x86b::softmax_masked(s, lo, hi, n_kv, p) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: FMA and AVX2 are present (checked); the body only indexes slices.
        return unsafe { softmax_masked_fma(s, lo, hi, n_kv, p) };
    }
    softmax_masked_body(s, lo, hi, n_kv, p)
}

/// # Safety
///
/// The CPU has FMA and AVX2; the body is safe code (slices, bounds-checked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn softmax_masked_fma(s: &[f32], lo: usize, hi: usize, n_kv: usize, p: &mut [f32]) {
    softmax_masked_body(s, lo, hi, n_kv, p)
}

#[inline(always)]
fn softmax_masked_body(s: &[f32], lo: usize, hi: usize, n_kv: usize, p: &mut [f32]) {
    let max = s[lo..hi].iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let tail = n_kv - n_kv % 16;
    let mut sum = 0f64;
    let mut c = lo / 16 * 16;
    while c < hi.min(tail) {
        let mut lanes = [0f32; 16];
        for (l, v) in lanes.iter_mut().enumerate() {
            let i = c + l;
            if i >= lo && i < hi {
                *v = expf(s[i] - max);
                p[i] = *v;
            }
        }
        sum += reduce16(&lanes) as f64;
        c += 16;
    }
    for i in tail.max(lo)..hi {
        let v = (s[i] - max).exp();
        p[i] = v;
        sum += v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in &mut p[lo..hi] {
        *v *= inv;
    }
}

/// The number of KV cells llama.cpp attends over for a cache of `n_ctx` cells holding
/// `len` positions: padded to 256.
pub fn llama_n_kv(len: usize, n_ctx: usize) -> usize {
    n_ctx.min(256.max(len.div_ceil(256) * 256))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    /// # Safety
    ///
    /// The CPU has AVX-512F and DQ (register arithmetic only).
    #[inline(always)]
    unsafe fn reduce(v: __m512) -> f32 {
        // Same tree as GCC's _mm512_reduce_add_ps.
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let hi = _mm512_extractf32x8_ps::<1>(v);
            let lo = _mm512_castps512_ps256(v);
            let t3 = _mm256_add_ps(hi, lo);
            let t6 = _mm_add_ps(_mm256_extractf128_ps::<1>(t3), _mm256_castps256_ps128(t3));
            let t7 = _mm_shuffle_ps::<0b01_00_11_10>(t6, t6);
            let t8 = _mm_add_ps(t6, t7);
            _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_movehdup_ps(t8))
        }
    }

    /// 16 f16 lanes from `p`, zero outside `[start, end)` relative to element `base`.
    ///
    /// # Safety
    ///
    /// The CPU has AVX-512F/BW/VL and F16C; `p` is readable at every f16 index in
    /// `[start, end)` that is also in `[base, base + 16)` (other lanes are masked off, not read).
    #[inline(always)]
    unsafe fn load16(p: *const u8, base: usize, start: usize, end: usize) -> __m512 {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            if base >= start && base + 16 <= end {
                return _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * base) as *const __m256i));
            }
            let mut m: u16 = 0;
            for l in 0..16 {
                if base + l >= start && base + l < end {
                    m |= 1 << l;
                }
            }
            let v = _mm256_maskz_loadu_epi16(m, p.add(2 * base) as *const i16);
            _mm512_cvtph_ps(v)
        }
    }

    /// # Safety
    ///
    /// The CPU has AVX-512F/BW/VL/DQ, F16C and FMA; `x` and `y` hold at least `end` f16 values,
    /// and `end <= n`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub unsafe fn dot_f16_vec(
        x: *const u8,
        y: *const u8,
        start: usize,
        end: usize,
        n: usize,
    ) -> f32 {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let np = n & !63;
            let mut acc = [_mm512_setzero_ps(); 4];
            let simd_end = end.min(np);
            let mut i = start / 64 * 64;
            while i < simd_end {
                for (j, a) in acc.iter_mut().enumerate() {
                    let b = i + 16 * j;
                    let xv = load16(x, b, start, simd_end);
                    let yv = load16(y, b, start, simd_end);
                    *a = _mm512_fmadd_ps(xv, yv, *a);
                }
                i += 64;
            }
            acc[0] = _mm512_add_ps(acc[0], acc[2]);
            acc[1] = _mm512_add_ps(acc[1], acc[3]);
            acc[0] = _mm512_add_ps(acc[0], acc[1]);
            let mut sum = reduce(acc[0]) as f64;
            let (xh, yh) = (x as *const u16, y as *const u16);
            for i in np.max(start)..end {
                let a = half::f16::from_bits(xh.add(i).read_unaligned()).to_f32();
                let b = half::f16::from_bits(yh.add(i).read_unaligned()).to_f32();
                sum += (a * b) as f64;
            }
            sum as f32
        }
    }

    /// # Safety
    ///
    /// The CPU has AVX-512F/BW/VL/DQ, F16C and FMA; `x` and `y` hold at least `end` f16 values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub unsafe fn dot_f16_tiny(x: *const u8, y: *const u8, start: usize, end: usize) -> f32 {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let mut acc = _mm512_setzero_ps();
            let mut i = start / 16 * 16;
            while i < end {
                acc = _mm512_fmadd_ps(load16(x, i, start, end), load16(y, i, start, end), acc);
                i += 16;
            }
            reduce(acc)
        }
    }
}

/// [`block16`]'s kernels on AVX2: the 16 keys (or value dimensions) as two 8-wide
/// halves, each of llama.cpp's lanes (and, in the Vec order, its four groups) a separate
/// accumulator in memory, so every output takes the FMAs of the scalar reference in
/// its order, then the same reduce tree. No allocation (the references transpose).
#[cfg(target_arch = "x86_64")]
mod avx2b {
    use super::{DotOrder, reduce16};
    use core::arch::x86_64::*;

    /// `out[i] = dot(order)` over positions `[lo, hi)` of `rows` (row `j` at
    /// `base + j · stride` bytes, 16 f16 values, the i-th being output i's) with `s[j]`;
    /// `n` is the full length that decides the Vec order's 64-wide steps.
    ///
    /// # Safety
    /// AVX2, F16C and FMA are present; rows `lo..hi` are readable 32 bytes each and `s`
    /// has `hi` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,f16c,fma")]
    pub unsafe fn block(
        order: DotOrder,
        base: *const u8,
        stride: usize,
        s: &[f32],
        lo: usize,
        hi: usize,
        n: usize,
        out: &mut [f32; 16],
    ) {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let z = _mm256_setzero_ps();
            let mut acc = [[(z, z); 16]; 4];
            let simd_end = match order {
                DotOrder::Tiny => hi,
                DotOrder::Vec => hi.min(n & !63),
            };
            for j in lo..simd_end.max(lo) {
                let g = match order {
                    DotOrder::Tiny => 0,
                    DotOrder::Vec => (j % 64) / 16,
                };
                let r = base.add(j * stride);
                let v0 = _mm256_cvtph_ps(_mm_loadu_si128(r as *const __m128i));
                let v1 = _mm256_cvtph_ps(_mm_loadu_si128(r.add(16) as *const __m128i));
                let sj = _mm256_set1_ps(s[j]);
                let a = &mut acc[g][j % 16];
                a.0 = _mm256_fmadd_ps(v0, sj, a.0);
                a.1 = _mm256_fmadd_ps(v1, sj, a.1);
            }
            if order == DotOrder::Vec {
                for l in 0..16 {
                    let add = |p: (__m256, __m256), q: (__m256, __m256)| {
                        (_mm256_add_ps(p.0, q.0), _mm256_add_ps(p.1, q.1))
                    };
                    acc[0][l] = add(acc[0][l], acc[2][l]);
                    acc[1][l] = add(acc[1][l], acc[3][l]);
                    acc[0][l] = add(acc[0][l], acc[1][l]);
                }
            }
            // lanes[l][i]: lane l of output i.
            let mut lanes = [[0f32; 16]; 16];
            for (l, a) in acc[0].iter().enumerate() {
                _mm256_storeu_ps(lanes[l].as_mut_ptr(), a.0);
                _mm256_storeu_ps(lanes[l].as_mut_ptr().add(8), a.1);
            }
            for (i, o) in out.iter_mut().enumerate() {
                let mut by_lane = [0f32; 16];
                for (l, v) in by_lane.iter_mut().enumerate() {
                    *v = lanes[l][i];
                }
                let r = reduce16(&by_lane);
                *o = match order {
                    DotOrder::Tiny => r,
                    DotOrder::Vec => {
                        let mut sum = r as f64;
                        let rh = |j: usize| {
                            let p = base.add(j * stride + 2 * i) as *const u16;
                            half::f16::from_bits(p.read_unaligned()).to_f32()
                        };
                        for j in (n & !63).max(lo)..hi {
                            sum += (rh(j) * s[j]) as f64;
                        }
                        sum as f32
                    }
                };
            }
        }
    }
}

/// One head of one sequence for [`attention_backward_head`]: the rows are positions
/// `0..lo.len()` of a cache that started empty, row `i` attends `lo[i]..=i`, and its
/// probabilities (the forward's softmax output, before any f16 rounding) are
/// `probs[p_off[i]..p_off[i] + i + 1 - lo[i]]`. Row `i`'s vectors start at `i · stride`
/// in `q`, `k`, `v` and `dout` (each its own stride), `hd` values each.
pub struct HeadRows<'a> {
    pub hd: usize,
    pub scale: f32,
    pub lo: &'a [usize],
    pub p_off: &'a [usize],
    pub probs: &'a [f32],
    pub q: (&'a [f32], usize),
    pub k: (&'a [f32], usize),
    pub v: (&'a [f32], usize),
    pub dout: (&'a [f32], usize),
}

/// Backward of softmax attention for one head: with `s_ij = scale · q_i·k_j`,
/// `p_i = softmax(s_i)` and `out_i = Σ_j p_ij v_j`, writes `dq` (row `i` at
/// `i · dq_stride`) and adds into `dk` and `dv` (`rows × hd`, contiguous). `dp` is
/// scratch. Sums over `j` run in increasing order, in f32; the dot products are
/// `lora::dot`'s (the same bits on every ISA).
pub fn attention_backward_head(
    isa: crate::cpu::Isa,
    h: &HeadRows,
    dq: (&mut [f32], usize),
    dk: &mut [f32],
    dv: &mut [f32],
    dp: &mut Vec<f32>,
) {
    let hd = h.hd;
    let rows = h.lo.len();
    let (dq, dqs) = dq;
    fn vec(b: (&[f32], usize), i: usize, hd: usize) -> &[f32] {
        &b.0[i * b.1..i * b.1 + hd]
    }
    for i in 0..rows {
        let lo = h.lo[i];
        let n = i + 1 - lo;
        let p = &h.probs[h.p_off[i]..h.p_off[i] + n];
        let dout = vec(h.dout, i, hd);
        dp.clear();
        dp.resize(n, 0.0);
        for (jj, d) in dp.iter_mut().enumerate() {
            let vj = vec(h.v, lo + jj, hd);
            *d = lora::dot(isa, dout, vj);
            lora::axpy(
                isa,
                &mut dv[(lo + jj) * hd..(lo + jj + 1) * hd],
                p[jj],
                dout,
            );
        }
        let dot = lora::dot(isa, p, dp);
        let qi = vec(h.q, i, hd);
        let dqi = &mut dq[i * dqs..i * dqs + hd];
        dqi.fill(0.0);
        for jj in 0..n {
            let ds = p[jj] * (dp[jj] - dot) * h.scale;
            lora::axpy(isa, dqi, ds, vec(h.k, lo + jj, hd));
            lora::axpy(isa, &mut dk[(lo + jj) * hd..(lo + jj + 1) * hd], ds, qi);
        }
    }
}

/// Buffers of [`attention_backward_head_dense`] and [`attention_backward_head_bf16`].
#[derive(Default)]
pub struct HeadScratch {
    q: Vec<f32>,
    k: Vec<f32>,
    vt: Vec<f32>,
    dout: Vec<f32>,
    p: Vec<f32>,
    pt: Vec<f32>,
    ds: Vec<f32>,
    dst: Vec<f32>,
    /// The bf16 path's dP (f32), bf16 operands and f32 product.
    dp: Vec<f32>,
    a16: Vec<u16>,
    b16: Vec<u16>,
    c: Vec<f32>,
}

/// Whether [`attention_backward_head_fast`] takes the bf16 path for `rows` positions.
pub fn backward_uses_bf16(rows: usize) -> bool {
    crate::amx::available() && rows >= 32
}

/// [`attention_backward_head_bf16`] when bf16 products run here (`amx::available`) and
/// the sequence fills whole 32-row blocks, else [`attention_backward_head_dense`].
pub fn attention_backward_head_fast(
    h: &HeadRows,
    dq: (&mut [f32], usize),
    dk: &mut [f32],
    dv: &mut [f32],
    sc: &mut HeadScratch,
) {
    if backward_uses_bf16(h.lo.len()) {
        attention_backward_head_bf16(h, dq, dk, dv, sc)
    } else {
        attention_backward_head_dense(h, dq, dk, dv, sc)
    }
}

/// [`attention_backward_head_dense`] with three of its four products in bf16 (`amx::gemm`: AMX tiles or AVX512-BF16)
/// (inputs rounded to bf16, sums in f32, as the base matrices' `dx` already is):
/// `dQ = s·dS·K`, and `dKᵀ = s·Qᵀ·dS`, `dVᵀ = dOᵀ·P` so that the two `rows × rows`
/// matrices are always the right-hand operand and never need transposing. `dP = dO·Vᵀ`
/// stays f32 (`gemm_acc`). The caller
/// checked [`backward_uses_bf16`].
pub fn attention_backward_head_bf16(
    h: &HeadRows,
    dq: (&mut [f32], usize),
    dk: &mut [f32],
    dv: &mut [f32],
    sc: &mut HeadScratch,
) {
    use crate::amx::{self, pad32};
    assert!(amx::available(), "the caller checks backward_uses_bf16");
    let hd = h.hd;
    let r = h.lo.len();
    let hp = pad32(hd);
    let gather = |src: (&[f32], usize), out: &mut Vec<f32>| {
        out.clear();
        for i in 0..r {
            out.extend_from_slice(&src.0[i * src.1..i * src.1 + hd]);
        }
    };
    gather(h.k, &mut sc.k);
    gather(h.dout, &mut sc.dout);
    // Qᵀ, Vᵀ and dOᵀ (hd × r): the left operands of dKᵀ and dVᵀ, the right one of dP.
    // In bands of 16 rows: a band's source rows stay in L1 while each of its columns is
    // written as one run of 16 (row by row, every write was a different cache line).
    let transpose = |src: (&[f32], usize), out: &mut Vec<f32>| {
        out.clear();
        out.resize(hd * r, 0.0);
        for i0 in (0..r).step_by(16) {
            let i1 = (i0 + 16).min(r);
            for d in 0..hd {
                for (i, o) in (i0..i1).zip(&mut out[d * r + i0..d * r + i1]) {
                    *o = src.0[i * src.1 + d];
                }
            }
        }
    };
    transpose(h.q, &mut sc.q);
    transpose(h.v, &mut sc.vt);
    transpose(h.dout, &mut sc.pt);
    // P (r × r), each row written whole: zeros outside the row's window.
    if sc.p.len() < r * r {
        sc.p.resize(r * r, 0.0);
    }
    for i in 0..r {
        let lo = h.lo[i];
        let row = &mut sc.p[i * r..(i + 1) * r];
        row[..lo].fill(0.0);
        row[lo..=i].copy_from_slice(&h.probs[h.p_off[i]..h.p_off[i] + i + 1 - lo]);
        row[i + 1..].fill(0.0);
    }
    // C (m × n, rows of pad32(n)) = A[:, c0..c0 + g] (m rows of lda) · B, B's row j
    // being b[j·ldb + bc0..][..n].
    #[allow(clippy::too_many_arguments)]
    fn prod(
        sc: &mut HeadScratch,
        a: &[f32],
        lda: usize,
        c0: usize,
        m: usize,
        g: usize,
        (b, ldb, bc0): (&[f32], usize, usize),
        n: usize,
    ) {
        let (mp, gp, np) = (pad32(m), pad32(g), pad32(n));
        sc.a16.clear();
        sc.a16.resize(mp * gp, 0);
        amx::pack_a(&mut sc.a16, a, lda, c0, g, m);
        sc.b16.clear();
        sc.b16.resize(amx::b_len(g, np), 0);
        // An odd g's last pair takes a zero row.
        let zero = vec![0f32; if g % 2 == 1 { n } else { 0 }];
        let row = |j: usize| &b[j * ldb + bc0..j * ldb + bc0 + n];
        for j in (0..g).step_by(2) {
            let r1 = if j + 1 < g { row(j + 1) } else { &zero[..] };
            amx::pack_b_pair(&mut sc.b16, g, n, j, row(j), r1);
        }
        if sc.c.len() < mp * np {
            sc.c.resize(mp * np, 0.0);
        }
        // SAFETY: bf16 products are available (asserted by the caller); A is mp × gp
        // bf16, B the pair layout of g rows and np columns, C mp × np, as `gemm` requires.
        unsafe { amx::gemm(&mut sc.c, mp, np, &sc.a16, &sc.b16, g, false) };
    }
    // P, dS and so dP's useful part are zero above the diagonal (causal): every product
    // runs in chunks of rows (or columns) with its sum cut at the diagonal, about 10/16
    // of the square's work at four chunks. The skipped terms are exact zeros.
    let chunk = pad32(r.div_ceil(4)).max(32);
    let chunks: Vec<(usize, usize)> = (0..r)
        .step_by(chunk)
        .map(|c0| (c0, (c0 + chunk).min(r)))
        .collect();
    // dP = dO · Vᵀ, then dS = s · P ∘ (dP − rowsum(P ∘ dP)) in place (r × r).
    let dout = std::mem::take(&mut sc.dout);
    let vt = std::mem::take(&mut sc.vt);
    // dP in f32: dS takes the difference dP − rowsum(P ∘ dP), which would amplify
    // bf16's rounding of dO and V (with dP on tiles the learning scenario's held-out
    // share fell from 90% to 80%). Rows i0..i1 need columns below i1 only.
    if sc.dp.len() < r * r {
        sc.dp.resize(r * r, 0.0);
    }
    for &(i0, i1) in &chunks {
        let (m, w) = (i1 - i0, i1);
        sc.dst.clear();
        for d in 0..hd {
            sc.dst.extend_from_slice(&vt[d * r..d * r + w]);
        }
        sc.c.clear();
        sc.c.resize(m * w, 0.0);
        crate::matmul::gemm_acc(&mut sc.c, m, w, &dout[i0 * hd..], hd, 0, hd, &sc.dst);
        for ii in 0..m {
            sc.dp[(i0 + ii) * r..(i0 + ii) * r + w].copy_from_slice(&sc.c[ii * w..(ii + 1) * w]);
        }
    }
    if sc.ds.len() < r * r {
        sc.ds.resize(r * r, 0.0);
    }
    // Only the window [lo, i] of a row has P ≠ 0, so only it has dS ≠ 0.
    // Both bf16 kernels imply AVX2 and FMA (`amx::kernel`).
    let isa = crate::cpu::Isa::Avx2;
    for i in 0..r {
        let lo = h.lo[i];
        let (p, dp) = (
            &sc.p[i * r + lo..=i * r + i],
            &sc.dp[i * r + lo..=i * r + i],
        );
        let dot = lora::dot(isa, p, dp);
        let row = &mut sc.ds[i * r..(i + 1) * r];
        row[..lo].fill(0.0);
        for ((d, pv), dpv) in row[lo..=i].iter_mut().zip(p).zip(dp) {
            *d = pv * (*dpv - dot) * h.scale;
        }
        row[i + 1..].fill(0.0);
    }
    let (dq, dqs) = dq;
    let (ds, k) = (std::mem::take(&mut sc.ds), std::mem::take(&mut sc.k));
    // dQ rows i0..i1 = dS[i0..i1, ..i1] · K[..i1].
    for &(i0, i1) in &chunks {
        prod(sc, &ds[i0 * r..], r, 0, i1 - i0, i1, (&k, hd, 0), hd);
        for ii in 0..i1 - i0 {
            let i = i0 + ii;
            dq[i * dqs..i * dqs + hd].copy_from_slice(&sc.c[ii * hp..ii * hp + hd]);
        }
    }
    // dKᵀ = Qᵀ · dS and dVᵀ = dOᵀ · P (hd × r), added into dk and dv transposed back;
    // columns j0..j1 sum over the rows from j0 on.
    let (qt, dot, p) = (
        std::mem::take(&mut sc.q),
        std::mem::take(&mut sc.pt),
        std::mem::take(&mut sc.p),
    );
    for (a, b, out) in [(&qt, &ds, &mut *dk), (&dot, &p, &mut *dv)] {
        for &(j0, j1) in &chunks {
            let w = j1 - j0;
            prod(sc, a, r, j0, hd, r - j0, (&b[j0 * r..], r, j0), w);
            let wp = pad32(w);
            // Back to rows, in bands of 16 as the transposes above.
            for b0 in (0..w).step_by(16) {
                let b1 = (b0 + 16).min(w);
                for d in 0..hd {
                    for (jj, c) in (b0..b1).zip(&sc.c[d * wp + b0..d * wp + b1]) {
                        out[(j0 + jj) * hd + d] += c;
                    }
                }
            }
        }
    }
    (sc.q, sc.pt, sc.p, sc.ds, sc.k, sc.dout, sc.vt) = (qt, dot, p, ds, k, dout, vt);
}

/// [`attention_backward_head`] as dense products (`gemm_acc`) over the sequence's
/// `rows × rows` score matrix, masked entries zero: `dP = dO·Vᵀ`, `dS = P ∘ (dP − rowsum)`,
/// `dQ = s·dS·K`, `dK = s·dSᵀ·Q`, `dV = Pᵀ·dO`. It does twice the causal work but at
/// matrix-product speed; the per-row version is its reference.
pub fn attention_backward_head_dense(
    h: &HeadRows,
    dq: (&mut [f32], usize),
    dk: &mut [f32],
    dv: &mut [f32],
    sc: &mut HeadScratch,
) {
    use crate::matmul::gemm_acc;
    let hd = h.hd;
    let r = h.lo.len();
    let gather = |src: (&[f32], usize), out: &mut Vec<f32>| {
        out.clear();
        for i in 0..r {
            out.extend_from_slice(&src.0[i * src.1..i * src.1 + hd]);
        }
    };
    gather(h.q, &mut sc.q);
    gather(h.k, &mut sc.k);
    gather(h.dout, &mut sc.dout);
    sc.vt.clear();
    sc.vt.resize(hd * r, 0.0);
    for i in 0..r {
        for d in 0..hd {
            sc.vt[d * r + i] = h.v.0[i * h.v.1 + d];
        }
    }
    sc.p.clear();
    sc.p.resize(r * r, 0.0);
    for i in 0..r {
        let lo = h.lo[i];
        sc.p[i * r + lo..i * r + i + 1]
            .copy_from_slice(&h.probs[h.p_off[i]..h.p_off[i] + i + 1 - lo]);
    }
    // dP, then dS in place.
    sc.ds.clear();
    sc.ds.resize(r * r, 0.0);
    gemm_acc(&mut sc.ds, r, r, &sc.dout, hd, 0, hd, &sc.vt);
    for i in 0..r {
        let (p, ds) = (&sc.p[i * r..(i + 1) * r], &mut sc.ds[i * r..(i + 1) * r]);
        let dot: f32 = p.iter().zip(ds.iter()).map(|(a, b)| a * b).sum();
        for (d, pv) in ds.iter_mut().zip(p) {
            *d = pv * (*d - dot) * h.scale;
        }
    }
    let (dq, dqs) = dq;
    let mut tmp = vec![0f32; r * hd];
    gemm_acc(&mut tmp, r, hd, &sc.ds, r, 0, r, &sc.k);
    for i in 0..r {
        dq[i * dqs..i * dqs + hd].copy_from_slice(&tmp[i * hd..(i + 1) * hd]);
    }
    sc.dst.clear();
    sc.dst.resize(r * r, 0.0);
    sc.pt.clear();
    sc.pt.resize(r * r, 0.0);
    for i in 0..r {
        for j in 0..r {
            sc.dst[j * r + i] = sc.ds[i * r + j];
            sc.pt[j * r + i] = sc.p[i * r + j];
        }
    }
    gemm_acc(dk, r, hd, &sc.dst, r, 0, r, &sc.q);
    gemm_acc(dv, r, hd, &sc.pt, r, 0, r, &sc.dout);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seed: u32, n: usize) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .flat_map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                f16::from_f32(((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 4.0).to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn simd_orders_equal_scalar_bitwise() {
        for n in [16usize, 64, 80, 256, 300, 512] {
            let (x, y) = (row(1, n), row(2, n));
            for (start, end) in [(0, n), (3, n), (17, n - 5), (n / 2, n / 2 + 1), (0, 1)] {
                let a = dot_f16_vec_ref(&x, &y, start, end, n);
                let b = dot_f16(DotOrder::Vec, &x, &y, start, end, n);
                assert_eq!(a.to_bits(), b.to_bits(), "vec n={n} [{start},{end})");
                if n % 16 == 0 {
                    let a = dot_f16_tiny_ref(&x, &y, start, end);
                    let b = dot_f16(DotOrder::Tiny, &x, &y, start, end, n);
                    assert_eq!(a.to_bits(), b.to_bits(), "tiny n={n} [{start},{end})");
                }
                // The AVX2 kernels, also where AVX-512 would be picked first.
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    // SAFETY: AVX2, F16C and FMA checked; both rows hold n elements.
                    let v = unsafe { avx2::dot_f16_vec(x.as_ptr(), y.as_ptr(), start, end, n) };
                    assert_eq!(a.to_bits(), v.to_bits(), "AVX2 vec n={n} [{start},{end})");
                    if n % 16 == 0 {
                        let r = dot_f16_tiny_ref(&x, &y, start, end);
                        // SAFETY: as above.
                        let t = unsafe { avx2::dot_f16_tiny(x.as_ptr(), y.as_ptr(), start, end) };
                        assert_eq!(r.to_bits(), t.to_bits(), "AVX2 tiny n={n} [{start},{end})");
                    }
                } else {
                    eprintln!("NOTE: no AVX2+F16C+FMA here: the AVX2 f16 dots are not tested");
                }
            }
        }
    }

    #[test]
    fn orders_agree_with_plain_sum() {
        let n = 256;
        let (x, y) = (row(5, n), row(6, n));
        let exact: f64 = (0..n).map(|i| h(&x, i) as f64 * h(&y, i) as f64).sum();
        for o in [DotOrder::Vec, DotOrder::Tiny] {
            let v = dot_f16(o, &x, &y, 0, n, n) as f64;
            assert!((v - exact).abs() < 1e-3, "{o:?}: {v} vs {exact}");
        }
    }

    #[test]
    fn softmax_masked_normalizes() {
        let s: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut p = vec![0f32; 300];
        softmax_masked(&s, 20, 290, 300, &mut p);
        let total: f32 = p[20..290].iter().sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(p[..20].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn simd_softmax_equals_scalar_bitwise() {
        let s: Vec<f32> = (0..600)
            .map(|i| (i as f32 * 0.731).sin() * 9.0 - (i % 7) as f32)
            .collect();
        for (lo, hi, n_kv) in [
            (0, 600, 768),
            (13, 587, 600),
            (0, 1, 256),
            (100, 101, 512),
            (5, 300, 300),
        ] {
            let mut a = vec![0f32; 600];
            let mut b = vec![0f32; 600];
            softmax_masked(&s, lo, hi, n_kv, &mut a);
            softmax_masked_body(&s, lo, hi, n_kv, &mut b);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "[{lo},{hi}) {n_kv}"
            );
        }
    }

    #[test]
    fn n_kv_padding() {
        assert_eq!(llama_n_kv(5, 1024), 256);
        assert_eq!(llama_n_kv(256, 1024), 256);
        assert_eq!(llama_n_kv(257, 1024), 512);
        assert_eq!(llama_n_kv(5, 100), 100);
    }
}

/// Attention kernels over 16 keys (or 16 value dimensions) at once: the same per-element
/// arithmetic as [`dot_f16`] (lanes, FMA chains and reduction tree are applied
/// element-wise across registers), vectorised across keys or dimensions instead of
/// within one dot product.
pub mod block16 {
    use super::DotOrder;

    /// Scores of 16 keys: `kt` is a transposed key block (`hd` rows of 16 f16 keys),
    /// `q` the query already rounded to f16 (given as f32 values, so the kernel does not
    /// convert it again for every block). Supports head sizes that are multiples of 64
    /// (`DotOrder::Vec`) or of 16 (`DotOrder::Tiny`); see [`supported`].
    pub fn kq(order: DotOrder, kt: &[u8], q: &[f32], hd: usize, out: &mut [f32; 16]) {
        assert!(supported(order, hd) && kt.len() >= hd * 32 && q.len() >= hd);
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx512() {
            // SAFETY: AVX-512F is present (checked); sizes checked above.
            return unsafe { super::x86b::kq(order, kt.as_ptr(), q.as_ptr(), hd, out) };
        }
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2() {
            // SAFETY: AVX2, F16C and FMA are present (checked); hd rows of 16 keys (32
            // bytes each) are in kt and hd values in q (asserted above).
            return unsafe { super::avx2b::block(order, kt.as_ptr(), 32, q, 0, hd, hd, out) };
        }
        kq_ref(order, kt, q, hd, out)
    }

    /// [`kq`] in the tinyBLAS order for several query heads that share the key block
    /// (one KV group): `qs[h]` is head h's query rounded to f16 (as f32 values), and
    /// `outs[h]` gets its 16 scores. Each key row is converted once for all heads; each
    /// head's arithmetic is [`kq`]'s, so the bits are the same.
    pub fn kq_heads(kt: &[u8], qs: &[&[f32]], hd: usize, outs: &mut [[f32; 16]]) {
        assert!(supported(DotOrder::Tiny, hd) && kt.len() >= hd * 32);
        assert!(qs.len() == outs.len() && qs.iter().all(|q| q.len() >= hd));
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx512() {
            for (qc, oc) in qs.chunks(4).zip(outs.chunks_mut(4)) {
                // SAFETY: AVX-512F is present (checked); sizes checked above.
                unsafe {
                    match qc.len() {
                        4 => super::x86b::kq_heads::<4>(kt.as_ptr(), qc, hd, oc),
                        3 => super::x86b::kq_heads::<3>(kt.as_ptr(), qc, hd, oc),
                        2 => super::x86b::kq_heads::<2>(kt.as_ptr(), qc, hd, oc),
                        _ => super::x86b::kq_heads::<1>(kt.as_ptr(), qc, hd, oc),
                    }
                }
            }
            return;
        }
        for (q, o) in qs.iter().zip(outs.iter_mut()) {
            kq(DotOrder::Tiny, kt, q, hd, o);
        }
    }

    pub fn supported(order: DotOrder, hd: usize) -> bool {
        match order {
            DotOrder::Vec => hd.is_multiple_of(64) && hd > 0,
            DotOrder::Tiny => hd.is_multiple_of(16) && hd > 0,
        }
    }

    fn h(b: &[u8], i: usize) -> f32 {
        half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
    }

    pub fn kq_ref(order: DotOrder, kt: &[u8], q: &[f32], hd: usize, out: &mut [f32; 16]) {
        let q: Vec<u8> = q[..hd]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let q = &q[..];
        for (key, o) in out.iter_mut().enumerate() {
            let k: Vec<u8> = (0..hd)
                .flat_map(|d| [kt[(d * 16 + key) * 2], kt[(d * 16 + key) * 2 + 1]])
                .collect();
            *o = match order {
                DotOrder::Vec => super::dot_f16_vec_ref(&k, q, 0, hd, hd),
                DotOrder::Tiny => super::dot_f16_tiny_ref(&k, q, 0, hd),
            };
            let _ = h;
        }
    }

    /// 16 output dimensions `d0..d0+16` of the probability-weighted sum of values:
    /// `v` holds positions as rows of `hd` f16 values, `p` the probabilities by position
    /// already rounded to f16 (as f32 values); positions outside `[lo, hi)` count as
    /// zero; `n_kv` is llama.cpp's padded length (it decides which positions
    /// `DotOrder::Vec` adds in f64).
    #[allow(clippy::too_many_arguments)]
    pub fn kqv(
        order: DotOrder,
        v: &[u8],
        hd: usize,
        d0: usize,
        p: &[f32],
        lo: usize,
        hi: usize,
        n_kv: usize,
        out: &mut [f32; 16],
    ) {
        assert!(d0 + 16 <= hd && v.len() >= hi * hd * 2 && p.len() >= hi && hi <= n_kv);
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx512() {
            // SAFETY: AVX-512F is present (checked); sizes checked above.
            return unsafe {
                super::x86b::kqv(order, v.as_ptr(), hd, d0, p.as_ptr(), lo, hi, n_kv, out)
            };
        }
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2() {
            // SAFETY: AVX2, F16C and FMA are present (checked); rows j < hi of hd values
            // hold the 16 at d0 (d0 + 16 <= hd), and p has hi values (asserted above).
            return unsafe {
                super::avx2b::block(order, v.as_ptr().add(2 * d0), 2 * hd, p, lo, hi, n_kv, out)
            };
        }
        kqv_ref(order, v, hd, d0, p, lo, hi, n_kv, out)
    }

    /// [`kqv`] in the tinyBLAS order for several query heads that share the value rows
    /// (one KV group): `ps[h]` and `outs[h]` are head h's probabilities and outputs.
    /// Each value row is converted from f16 once for all heads; each head's arithmetic
    /// is [`kqv`]'s, so the bits are the same.
    #[allow(clippy::too_many_arguments)]
    pub fn kqv_heads(
        v: &[u8],
        hd: usize,
        d0: usize,
        ps: &[&[f32]],
        lo: usize,
        hi: usize,
        n_kv: usize,
        outs: &mut [[f32; 16]],
    ) {
        assert!(d0 + 16 <= hd && v.len() >= hi * hd * 2 && hi <= n_kv);
        assert!(ps.len() == outs.len() && ps.iter().all(|p| p.len() >= hi));
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx512() {
            for (pc, oc) in ps.chunks(4).zip(outs.chunks_mut(4)) {
                // SAFETY: AVX-512F is present (checked); sizes checked above.
                unsafe {
                    match pc.len() {
                        4 => super::x86b::kqv_heads::<4>(v.as_ptr(), hd, d0, pc, lo, hi, oc),
                        3 => super::x86b::kqv_heads::<3>(v.as_ptr(), hd, d0, pc, lo, hi, oc),
                        2 => super::x86b::kqv_heads::<2>(v.as_ptr(), hd, d0, pc, lo, hi, oc),
                        _ => super::x86b::kqv_heads::<1>(v.as_ptr(), hd, d0, pc, lo, hi, oc),
                    }
                }
            }
            return;
        }
        for (p, o) in ps.iter().zip(outs.iter_mut()) {
            kqv(DotOrder::Tiny, v, hd, d0, p, lo, hi, n_kv, o);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn kqv_ref(
        order: DotOrder,
        v: &[u8],
        hd: usize,
        d0: usize,
        p: &[f32],
        lo: usize,
        hi: usize,
        n_kv: usize,
        out: &mut [f32; 16],
    ) {
        let p: Vec<u8> = p[..hi]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let p = &p[..];
        for (i, o) in out.iter_mut().enumerate() {
            let col: Vec<u8> = (0..hi)
                .flat_map(|j| [v[(j * hd + d0 + i) * 2], v[(j * hd + d0 + i) * 2 + 1]])
                .collect();
            *o = match order {
                DotOrder::Vec => super::dot_f16_vec_ref(&col, p, lo, hi, n_kv),
                DotOrder::Tiny => super::dot_f16_tiny_ref(&col, p, lo, hi),
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86b {
    use super::DotOrder;
    use core::arch::x86_64::*;

    /// ggml's AVX-512 `ggml_v_expf`, the same operations as `ops::expf`.
    ///
    /// # Safety
    ///
    /// The CPU has AVX-512F and FMA (register arithmetic only).
    #[inline(always)]
    pub(crate) unsafe fn expf(x: __m512) -> __m512 {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let r = _mm512_set1_ps(f32::from_bits(0x4b40_0000));
            let z = _mm512_fmadd_ps(x, _mm512_set1_ps(f32::from_bits(0x3fb8_aa3b)), r);
            let n = _mm512_sub_ps(z, r);
            let b = _mm512_fnmadd_ps(
                n,
                _mm512_set1_ps(f32::from_bits(0x35bf_be8e)),
                _mm512_fnmadd_ps(n, _mm512_set1_ps(f32::from_bits(0x3f31_7200)), x),
            );
            let d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
            let u = _mm512_mul_ps(b, b);
            let j = _mm512_fmadd_ps(
                _mm512_fmadd_ps(
                    _mm512_fmadd_ps(
                        _mm512_set1_ps(f32::from_bits(0x3c07_2010)),
                        b,
                        _mm512_set1_ps(f32::from_bits(0x3d2b_9f17)),
                    ),
                    u,
                    _mm512_fmadd_ps(
                        _mm512_set1_ps(f32::from_bits(0x3e2a_af33)),
                        b,
                        _mm512_set1_ps(f32::from_bits(0x3eff_fedb)),
                    ),
                ),
                u,
                _mm512_fmadd_ps(
                    _mm512_set1_ps(f32::from_bits(0x3f7f_fff6)),
                    b,
                    _mm512_set1_ps(1.0),
                ),
            );
            let res = _mm512_scalef_ps(j, n);
            if d == 0 {
                return res;
            }
            let alt = _mm512_mask_blend_ps(
                _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, _mm512_setzero_ps()),
                _mm512_set1_ps(f32::INFINITY),
                _mm512_setzero_ps(),
            );
            _mm512_mask_blend_ps(d, res, alt)
        }
    }

    /// # Safety
    ///
    /// The CPU has AVX-512F/BW/VL/DQ, F16C and FMA; `lo < hi <= n_kv`, and `s` and `p`
    /// hold at least `hi` values (the masked loads and stores touch only `[lo, hi)`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub unsafe fn softmax_masked(s: &[f32], lo: usize, hi: usize, n_kv: usize, p: &mut [f32]) {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let max = s[lo..hi].iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
            let mv = _mm512_set1_ps(max);
            let tail = n_kv - n_kv % 16;
            let mut sum = 0f64;
            let mut c = lo / 16 * 16;
            let end = hi.min(tail);
            while c < end {
                let mut m: u16 = 0;
                for l in 0..16 {
                    if c + l >= lo && c + l < hi {
                        m |= 1 << l;
                    }
                }
                let x = _mm512_maskz_loadu_ps(m, s.as_ptr().add(c));
                let e = _mm512_maskz_mov_ps(m, expf(_mm512_sub_ps(x, mv)));
                _mm512_mask_storeu_ps(p.as_mut_ptr().add(c), m, e);
                let mut a = [0f32; 16];
                _mm512_storeu_ps(a.as_mut_ptr(), e);
                sum += super::reduce16(&a) as f64;
                c += 16;
            }
            for i in tail.max(lo)..hi {
                let v = (s[i] - max).exp();
                p[i] = v;
                sum += v as f64;
            }
            let inv = (1.0 / sum) as f32;
            for v in &mut p[lo..hi] {
                *v *= inv;
            }
        }
    }

    /// [`super::block16::kq_heads`] for `H` heads: per lane slot l, each head's chain
    /// over dimensions ≡ l (mod 16) in increasing order (the accumulator `acc[d % 16]` of
    /// the one-head kernel), each key row converted once for the H heads.
    ///
    /// # Safety
    ///
    /// AVX-512F, F16C and FMA; `kt` holds `hd` rows of 16 f16 keys, `hd` is a
    /// multiple of 16, every `qs[h]` holds `hd` values, `qs` and `outs` hold `H` entries.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub unsafe fn kq_heads<const H: usize>(
        kt: *const u8,
        qs: &[&[f32]],
        hd: usize,
        outs: &mut [[f32; 16]],
    ) {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let q: [*const f32; H] = std::array::from_fn(|h| qs[h].as_ptr());
            // Every slot of every head is written below: no zeroing (a memset per call).
            let mut t = [[std::mem::MaybeUninit::<__m512>::uninit(); 16]; H];
            for l in 0..16 {
                let mut s = [_mm512_setzero_ps(); H];
                for i in (0..hd).step_by(16) {
                    let x = h16(kt.add((i + l) * 32));
                    for h in 0..H {
                        s[h] = _mm512_fmadd_ps(x, hq(q[h], i + l), s[h]);
                    }
                }
                for h in 0..H {
                    t[h][l].write(s[h]);
                }
            }
            for h in 0..H {
                // SAFETY: all 16 slots of head h were written in the loop above.
                let th: [__m512; 16] = std::array::from_fn(|l| t[h][l].assume_init());
                _mm512_storeu_ps(outs[h].as_mut_ptr(), tree(&th));
            }
        }
    }

    /// [`super::block16::kqv_heads`] for `H` heads: per lane slot l, each head's chain
    /// over positions ≡ l (mod 16) in increasing order (the accumulator `acc[j % 16]` of
    /// the one-head kernel), each value row converted once for the H heads.
    ///
    /// # Safety
    ///
    /// AVX-512F, F16C and FMA; `v` holds `hi` rows of `hd` f16 values, `d0 + 16
    /// ≤ hd`, every `ps[h]` holds `hi` values, `ps` and `outs` hold `H` entries.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub unsafe fn kqv_heads<const H: usize>(
        v: *const u8,
        hd: usize,
        d0: usize,
        ps: &[&[f32]],
        lo: usize,
        hi: usize,
        outs: &mut [[f32; 16]],
    ) {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let p: [*const f32; H] = std::array::from_fn(|h| ps[h].as_ptr());
            // Every slot of every head is written below: no zeroing (a memset per call).
            let mut t = [[std::mem::MaybeUninit::<__m512>::uninit(); 16]; H];
            for l in 0..16 {
                let mut s = [_mm512_setzero_ps(); H];
                let mut j = lo - lo % 16 + l;
                if j < lo {
                    j += 16;
                }
                while j < hi {
                    let x = h16(v.add((j * hd + d0) * 2));
                    for h in 0..H {
                        s[h] = _mm512_fmadd_ps(x, _mm512_set1_ps(*p[h].add(j)), s[h]);
                    }
                    j += 16;
                }
                for h in 0..H {
                    t[h][l].write(s[h]);
                }
            }
            for h in 0..H {
                // SAFETY: all 16 slots of head h were written in the loop above.
                let th: [__m512; 16] = std::array::from_fn(|l| t[h][l].assume_init());
                _mm512_storeu_ps(outs[h].as_mut_ptr(), tree(&th));
            }
        }
    }

    /// # Safety
    ///
    /// The CPU has AVX-512F (register arithmetic only).
    #[inline(always)]
    unsafe fn tree(a: &[__m512; 16]) -> __m512 {
        // GCC's _mm512_reduce_add_ps tree, element-wise.
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let mut t3 = [_mm512_setzero_ps(); 8];
            for i in 0..8 {
                t3[i] = _mm512_add_ps(a[8 + i], a[i]);
            }
            let mut t6 = [_mm512_setzero_ps(); 4];
            for i in 0..4 {
                t6[i] = _mm512_add_ps(t3[4 + i], t3[i]);
            }
            _mm512_add_ps(_mm512_add_ps(t6[0], t6[2]), _mm512_add_ps(t6[1], t6[3]))
        }
    }

    /// # Safety
    ///
    /// The CPU has AVX-512F and F16C; `p` is readable for 32 bytes (16 f16 values).
    #[inline(always)]
    unsafe fn h16(p: *const u8) -> __m512 {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }

    /// # Safety
    ///
    /// The CPU has AVX-512F; `q` is readable at index `d`.
    #[inline(always)]
    unsafe fn hq(q: *const f32, d: usize) -> __m512 {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe { _mm512_set1_ps(*q.add(d)) }
    }

    /// # Safety
    ///
    /// The CPU has AVX-512F/BW/VL/DQ, F16C and FMA; `hd` is a multiple of 16 (of 64 for
    /// `DotOrder::Vec`), `kt` holds `hd` rows of 16 f16 keys (32 bytes each) and `q` holds `hd` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub unsafe fn kq(
        order: DotOrder,
        kt: *const u8,
        q: *const f32,
        hd: usize,
        out: &mut [f32; 16],
    ) {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let key = |d: usize| h16(kt.add(d * 32));
            let r = match order {
                DotOrder::Tiny => {
                    // acc[d % 16] in increasing d, with constant indices so the 16
                    // accumulators stay in registers (hd is a multiple of 16).
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for i in (0..hd).step_by(16) {
                        for (l, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_fmadd_ps(key(i + l), hq(q, i + l), *a);
                        }
                    }
                    tree(&acc)
                }
                DotOrder::Vec => {
                    // sum[j][l] chains over 64-element steps; then (s0+s2)+(s1+s3) per lane.
                    let mut t = [_mm512_setzero_ps(); 16];
                    for (l, tl) in t.iter_mut().enumerate() {
                        let mut s = [_mm512_setzero_ps(); 4];
                        for i in (0..hd).step_by(64) {
                            for (j, sj) in s.iter_mut().enumerate() {
                                let d = i + 16 * j + l;
                                *sj = _mm512_fmadd_ps(key(d), hq(q, d), *sj);
                            }
                        }
                        *tl = _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3]));
                    }
                    tree(&t)
                }
            };
            _mm512_storeu_ps(out.as_mut_ptr(), r);
        }
    }

    /// # Safety
    ///
    /// The CPU has AVX-512F/BW/VL/DQ, F16C and FMA; `d0 + 16 <= hd`, `hi <= n_kv`, `v`
    /// holds `hi` rows of `hd` f16 values and `p` holds `hi` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub unsafe fn kqv(
        order: DotOrder,
        v: *const u8,
        hd: usize,
        d0: usize,
        p: *const f32,
        lo: usize,
        hi: usize,
        n_kv: usize,
        out: &mut [f32; 16],
    ) {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let val = |j: usize| h16(v.add((j * hd + d0) * 2));
            let pr = |j: usize| _mm512_set1_ps(*p.add(j));
            match order {
                DotOrder::Tiny => {
                    // acc[j % 16] in increasing j over [lo, hi), block by block with
                    // constant indices so the 16 accumulators stay in registers; only
                    // the first and last blocks check the window.
                    let mut acc = [_mm512_setzero_ps(); 16];
                    if lo < hi {
                        let (b0, b1) = (lo / 16, (hi - 1) / 16);
                        let edge = |acc: &mut [__m512; 16], b: usize| {
                            for (l, a) in acc.iter_mut().enumerate() {
                                let j = 16 * b + l;
                                if j >= lo && j < hi {
                                    *a = _mm512_fmadd_ps(val(j), pr(j), *a);
                                }
                            }
                        };
                        edge(&mut acc, b0);
                        for b in b0 + 1..b1 {
                            for (l, a) in acc.iter_mut().enumerate() {
                                let j = 16 * b + l;
                                *a = _mm512_fmadd_ps(val(j), pr(j), *a);
                            }
                        }
                        if b1 > b0 {
                            edge(&mut acc, b1);
                        }
                    }
                    _mm512_storeu_ps(out.as_mut_ptr(), tree(&acc));
                }
                DotOrder::Vec => {
                    let np = n_kv & !63;
                    let end = hi.min(np);
                    let mut t = [_mm512_setzero_ps(); 16];
                    for (l, tl) in t.iter_mut().enumerate() {
                        let mut s = [_mm512_setzero_ps(); 4];
                        for (jj, sj) in s.iter_mut().enumerate() {
                            let slot = 16 * jj + l;
                            // Positions ≡ slot (mod 64) in [lo, end), in increasing order.
                            let mut j = if lo <= slot {
                                slot
                            } else {
                                slot + (lo - slot).div_ceil(64) * 64
                            };
                            while j < end {
                                *sj = _mm512_fmadd_ps(val(j), pr(j), *sj);
                                j += 64;
                            }
                        }
                        *tl = _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3]));
                    }
                    let r = tree(&t);
                    let mut sum = [0f64; 16];
                    let mut rv = [0f32; 16];
                    _mm512_storeu_ps(rv.as_mut_ptr(), r);
                    for (s, x) in sum.iter_mut().zip(rv) {
                        *s = x as f64;
                    }
                    // The tail beyond the 64-wide steps is summed in f64, position by position.
                    if hi > np {
                        let mut vals = [0f32; 16];
                        for j in np.max(lo)..hi {
                            let pj = *p.add(j);
                            _mm512_storeu_ps(vals.as_mut_ptr(), val(j));
                            for (s, x) in sum.iter_mut().zip(vals) {
                                *s += (x * pj) as f64;
                            }
                        }
                    }
                    for (o, s) in out.iter_mut().zip(sum) {
                        *o = s as f32;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod block16_tests {
    use super::*;

    fn rnd(seed: u32, n: usize) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .flat_map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                f16::from_f32(((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 3.0).to_le_bytes()
            })
            .collect()
    }

    fn as_f32(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    }

    #[test]
    fn kq_blocks_equal_per_key_dots_bitwise() {
        for (order, hd) in [
            (DotOrder::Tiny, 64),
            (DotOrder::Tiny, 32),
            (DotOrder::Vec, 64),
            (DotOrder::Vec, 128),
        ] {
            let kt = rnd(3, hd * 16);
            let q = as_f32(&rnd(4, hd));
            let mut a = [0f32; 16];
            let mut b = [0f32; 16];
            block16::kq(order, &kt, &q, hd, &mut a);
            block16::kq_ref(order, &kt, &q, hd, &mut b);
            assert_eq!(
                a.map(f32::to_bits),
                b.map(f32::to_bits),
                "{order:?} hd={hd}"
            );
            // The AVX2 kernel too, where AVX-512 would be picked first.
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                let mut c = [0f32; 16];
                // SAFETY: AVX2, F16C and FMA checked; kt holds hd rows of 32 bytes.
                unsafe { avx2b::block(order, kt.as_ptr(), 32, &q, 0, hd, hd, &mut c) };
                assert_eq!(c.map(f32::to_bits), b.map(f32::to_bits), "AVX2 {order:?}");
            }
        }
    }

    #[test]
    fn kq_heads_equal_one_head_kernels_bitwise() {
        for hd in [32, 64, 128] {
            for heads in [1, 3, 4, 7] {
                let kt = rnd(21, hd * 16);
                let qs: Vec<Vec<f32>> = (0..heads)
                    .map(|h| as_f32(&rnd(30 + h as u32, hd)))
                    .collect();
                let refs: Vec<&[f32]> = qs.iter().map(|q| &q[..]).collect();
                let mut got = vec![[0f32; 16]; heads];
                block16::kq_heads(&kt, &refs, hd, &mut got);
                for (h, g) in got.iter().enumerate() {
                    let mut want = [0f32; 16];
                    block16::kq_ref(DotOrder::Tiny, &kt, &qs[h], hd, &mut want);
                    assert_eq!(
                        g.map(f32::to_bits),
                        want.map(f32::to_bits),
                        "hd {hd}, {heads} heads, head {h}"
                    );
                }
            }
        }
    }

    #[test]
    fn kqv_heads_equal_one_head_kernels_bitwise() {
        let hd = 64;
        for heads in [1, 3, 4, 7] {
            for (lo, hi, n_kv) in [(0, 5, 256), (0, 256, 256), (17, 200, 256), (33, 34, 64)] {
                let v = rnd(11, n_kv * hd);
                let ps: Vec<Vec<f32>> = (0..heads)
                    .map(|h| {
                        let mut p = as_f32(&rnd(12 + h as u32, n_kv));
                        for (j, x) in p.iter_mut().enumerate() {
                            if j < lo || j >= hi {
                                *x = f32::NAN; // outside the window: never read
                            }
                        }
                        p
                    })
                    .collect();
                let refs: Vec<&[f32]> = ps.iter().map(|p| &p[..]).collect();
                for d0 in [0, 16, 48] {
                    let mut got = vec![[0f32; 16]; heads];
                    block16::kqv_heads(&v, hd, d0, &refs, lo, hi, n_kv, &mut got);
                    for (h, g) in got.iter().enumerate() {
                        let mut want = [0f32; 16];
                        block16::kqv_ref(
                            DotOrder::Tiny,
                            &v,
                            hd,
                            d0,
                            &ps[h],
                            lo,
                            hi,
                            n_kv,
                            &mut want,
                        );
                        assert_eq!(
                            g.map(f32::to_bits),
                            want.map(f32::to_bits),
                            "{heads} heads, head {h}, [{lo},{hi}) d0={d0}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn kqv_blocks_equal_per_dim_dots_bitwise() {
        let hd = 64;
        for order in [DotOrder::Tiny, DotOrder::Vec] {
            for (lo, hi, n_kv) in [
                (0, 5, 256),
                (0, 300, 512),
                (17, 200, 256),
                (100, 290, 300),
                (0, 1, 256),
            ] {
                let v = rnd(5, n_kv * hd);
                let mut p = as_f32(&rnd(6, n_kv));
                for (j, x) in p.iter_mut().enumerate() {
                    if j < lo || j >= hi {
                        *x = f32::NAN; // garbage outside the window must not matter
                    }
                }
                if order == DotOrder::Tiny && n_kv % 16 != 0 {
                    continue;
                }
                for d0 in [0, 16, 48] {
                    let mut a = [0f32; 16];
                    let mut b = [0f32; 16];
                    block16::kqv(order, &v, hd, d0, &p, lo, hi, n_kv, &mut a);
                    block16::kqv_ref(order, &v, hd, d0, &p, lo, hi, n_kv, &mut b);
                    assert_eq!(
                        a.map(f32::to_bits),
                        b.map(f32::to_bits),
                        "{order:?} [{lo},{hi}) n_kv={n_kv} d0={d0}"
                    );
                    #[cfg(target_arch = "x86_64")]
                    if has_avx2() {
                        let mut c = [0f32; 16];
                        // SAFETY: AVX2, F16C and FMA checked; rows < hi hold hd values.
                        unsafe {
                            avx2b::block(
                                order,
                                v.as_ptr().add(2 * d0),
                                2 * hd,
                                &p,
                                lo,
                                hi,
                                n_kv,
                                &mut c,
                            )
                        };
                        assert_eq!(c.map(f32::to_bits), b.map(f32::to_bits), "AVX2 {order:?}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod backward_tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Σ w · out for causal attention over `rows` rows with window `win`, in f64.
    fn objective(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        w: &[f32],
        hd: usize,
        win: usize,
        sc: f64,
    ) -> f64 {
        let rows = q.len() / hd;
        let mut f = 0f64;
        for i in 0..rows {
            let lo = (i + 1).saturating_sub(win);
            let s: Vec<f64> = (lo..=i)
                .map(|j| {
                    sc * (0..hd)
                        .map(|d| q[i * hd + d] as f64 * k[j * hd + d] as f64)
                        .sum::<f64>()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for (jj, j) in (lo..=i).enumerate() {
                let p = (s[jj] - m).exp() / z;
                for d in 0..hd {
                    f += w[i * hd + d] as f64 * p * v[j * hd + d] as f64;
                }
            }
        }
        f
    }

    /// Each row's window start, probabilities' offsets and causal softmax probabilities
    /// over a window of `win` keys, as a taped forward stores them.
    fn window_probs(
        q: &[f32],
        k: &[f32],
        rows: usize,
        hd: usize,
        win: usize,
        scale: f32,
    ) -> (Vec<usize>, Vec<usize>, Vec<f32>) {
        let lo: Vec<usize> = (0..rows).map(|i| (i + 1).saturating_sub(win)).collect();
        let (mut p_off, mut probs) = (Vec::new(), Vec::new());
        for i in 0..rows {
            p_off.push(probs.len());
            let mut p: Vec<f32> = (lo[i]..=i)
                .map(|j| scale * (0..hd).map(|d| q[i * hd + d] * k[j * hd + d]).sum::<f32>())
                .collect();
            crate::ops::softmax(&mut p);
            probs.extend(p);
        }
        (lo, p_off, probs)
    }

    /// The bf16 path against the f32 one: each gradient within 1e-2 of it in relative
    /// L2 (its inputs are rounded to bf16, 2^-9 relative each).
    fn check_bf16_close(h: &HeadRows, rows: usize, want: (&[f32], &[f32], &[f32])) {
        if !crate::amx::available() {
            crate::skipped(
                "no bf16 kernel on this CPU (neither AMX nor AVX512-BF16): the attention \
                 backward's bf16 path was not checked against the f32 one",
            );
            return;
        }
        let hd = h.hd;
        let (mut dq, mut dk, mut dv) = (
            vec![f32::NAN; rows * hd],
            vec![0f32; rows * hd],
            vec![0f32; rows * hd],
        );
        attention_backward_head_bf16(
            h,
            (&mut dq, hd),
            &mut dk,
            &mut dv,
            &mut HeadScratch::default(),
        );
        for (name, got, want) in [
            ("dq", &dq, want.0),
            ("dk", &dk, want.1),
            ("dv", &dv, want.2),
        ] {
            let err: f64 = got
                .iter()
                .zip(want)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
            let rel = (err / norm).sqrt();
            assert!(
                rel < 1e-2,
                "bf16 {name}, {rows} rows: relative L2 error {rel}"
            );
        }
    }

    /// A long head (the bf16 path's sizes: several 32-row tiles, padding) against the
    /// f32 dense path.
    #[test]
    fn bf16_backward_tracks_the_f32_one() {
        for (rows, hd, win) in [
            (80, 64, usize::MAX),
            (256, 64, usize::MAX),
            (45, 48, 20),
            (300, 64, 100),
        ] {
            let scale = 1.0 / (hd as f32).sqrt();
            let q: Vec<f32> = data(rows * hd, 5).iter().map(|x| x * 2.0).collect();
            let k: Vec<f32> = data(rows * hd, 6).iter().map(|x| x * 2.0).collect();
            let v = data(rows * hd, 7);
            let w = data(rows * hd, 8);
            let (lo, p_off, probs) = window_probs(&q, &k, rows, hd, win, scale);
            let h = HeadRows {
                hd,
                scale,
                lo: &lo,
                p_off: &p_off,
                probs: &probs,
                q: (&q, hd),
                k: (&k, hd),
                v: (&v, hd),
                dout: (&w, hd),
            };
            let (mut dq, mut dk, mut dv) = (
                vec![0f32; rows * hd],
                vec![0f32; rows * hd],
                vec![0f32; rows * hd],
            );
            attention_backward_head_dense(
                &h,
                (&mut dq, hd),
                &mut dk,
                &mut dv,
                &mut HeadScratch::default(),
            );
            check_bf16_close(&h, rows, (&dq, &dk, &dv));
        }
    }

    #[test]
    fn matches_finite_differences_with_and_without_a_window() {
        let (rows, hd) = (7, 6);
        let scale = 1.0 / (hd as f32).sqrt();
        let q: Vec<f32> = data(rows * hd, 1).iter().map(|x| x * 3.0).collect();
        let k: Vec<f32> = data(rows * hd, 2).iter().map(|x| x * 3.0).collect();
        let v = data(rows * hd, 3);
        let w = data(rows * hd, 4);
        for win in [usize::MAX, 3] {
            let (lo, p_off, probs) = window_probs(&q, &k, rows, hd, win, scale);
            let h = HeadRows {
                hd,
                scale,
                lo: &lo,
                p_off: &p_off,
                probs: &probs,
                q: (&q, hd),
                k: (&k, hd),
                v: (&v, hd),
                dout: (&w, hd),
            };
            let mut grads = Vec::new();
            for isa in crate::cpu::Isa::supported() {
                let (mut dq, mut dk, mut dv) = (
                    vec![0f32; rows * hd],
                    vec![0f32; rows * hd],
                    vec![0f32; rows * hd],
                );
                attention_backward_head(isa, &h, (&mut dq, hd), &mut dk, &mut dv, &mut Vec::new());
                grads.push((isa, dq, dk, dv));
            }
            {
                let (mut dq, mut dk, mut dv) = (
                    vec![0f32; rows * hd],
                    vec![0f32; rows * hd],
                    vec![0f32; rows * hd],
                );
                attention_backward_head_dense(
                    &h,
                    (&mut dq, hd),
                    &mut dk,
                    &mut dv,
                    &mut HeadScratch::default(),
                );
                let (_, q0, k0, v0) = &grads[0];
                for (a, b) in [(&dq, q0), (&dk, k0), (&dv, v0)] {
                    for (x, y) in a.iter().zip(b) {
                        assert!(
                            (x - y).abs() <= 1e-5 + 1e-5 * y.abs(),
                            "dense path: {x} vs {y}"
                        );
                    }
                }
            }
            let (_, dq, dk, dv) = &grads[0];
            check_bf16_close(&h, rows, (dq, dk, dv));
            for (isa, a, b, c) in &grads[1..] {
                assert!(
                    a == dq && b == dk && c == dv,
                    "{isa} differs from the scalar path"
                );
            }
            let eps = 1e-3f32;
            for (which, g) in [(0, dq), (1, dk), (2, dv)] {
                for idx in 0..rows * hd {
                    let mut t = [q.clone(), k.clone(), v.clone()];
                    t[which][idx] += eps;
                    let fp = objective(&t[0], &t[1], &t[2], &w, hd, win, scale as f64);
                    t[which][idx] -= 2.0 * eps;
                    let fm = objective(&t[0], &t[1], &t[2], &w, hd, win, scale as f64);
                    let want = (fp - fm) / (2.0 * eps as f64);
                    assert!(
                        (g[idx] as f64 - want).abs() < 1e-4 + 1e-3 * want.abs(),
                        "window {win}, grad {which}[{idx}]: {} vs finite difference {want}",
                        g[idx]
                    );
                }
            }
        }
    }
}
