//! The low-rank products of a LoRA adapter, in f32: `t = scale · A x` (rank dot
//! products over the input width) and `y += Bᵀ-rows · t` (rank axpys over the output
//! width). With rank ≪ width this costs `rank · (in + out)` per row, a few percent of
//! the base matrix product.
//!
//! The AVX2 kernels and their scalar twins do the same float operations in the same
//! order (16 FMA lanes, a fixed horizontal-sum tree, per-element FMA chains), so results
//! are bit-identical on every ISA and the tests compare them exactly.

use crate::cpu::Isa;

/// Lanes of the dot product: two 8-wide accumulators.
const LANES: usize = 16;

/// `a · x` with 16 FMA lanes, summed as the AVX2 kernel sums them, then the tail.
pub fn dot_ref(a: &[f32], x: &[f32]) -> f32 {
    assert_eq!(a.len(), x.len());
    let body = a.len() / LANES * LANES;
    let mut acc = [0f32; LANES];
    for i in (0..body).step_by(LANES) {
        for l in 0..LANES {
            acc[l] = a[i + l].mul_add(x[i + l], acc[l]);
        }
    }
    let mut s8 = [0f32; 8];
    for l in 0..8 {
        s8[l] = acc[l] + acc[l + 8];
    }
    let mut s4 = [0f32; 4];
    for l in 0..4 {
        s4[l] = s8[l] + s8[l + 4];
    }
    let mut s = (s4[0] + s4[2]) + (s4[1] + s4[3]);
    for i in body..a.len() {
        s = a[i].mul_add(x[i], s);
    }
    s
}

/// `y[o] += Σ_j t[j] · bt[j·n + o]`, one FMA per (j, o) in increasing `j`.
pub fn axpy_rows_ref(bt: &[f32], n: usize, t: &[f32], y: &mut [f32]) {
    assert!(bt.len() >= t.len() * n && y.len() >= n);
    for (o, yo) in y[..n].iter_mut().enumerate() {
        let mut v = *yo;
        for (j, &tj) in t.iter().enumerate() {
            v = tj.mul_add(bt[j * n + o], v);
        }
        *yo = v;
    }
}

/// `t[j] = scale · (a[j·k..(j+1)·k] · x)` for every row `j` of `a` (`t.len()` rows).
pub fn lora_down(isa: Isa, a: &[f32], k: usize, x: &[f32], scale: f32, t: &mut [f32]) {
    assert!(a.len() >= t.len() * k && x.len() >= k);
    for (j, tj) in t.iter_mut().enumerate() {
        let row = &a[j * k..(j + 1) * k];
        *tj = scale * dot(isa, row, &x[..k]);
    }
}

/// `y += B t` with B stored transposed (`bt`: rank rows of the output width `n`).
pub fn lora_up(isa: Isa, bt: &[f32], n: usize, t: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        assert!(bt.len() >= t.len() * n && y.len() >= n);
        // SAFETY: an `Isa` of Avx2 or above is only used on CPUs that have AVX2 and FMA
        // (the caller got it from detection); lengths are checked above.
        return unsafe { x86::axpy_rows(bt, n, t, y) };
    }
    let _ = isa;
    axpy_rows_ref(bt, n, t, y)
}

/// [`lora_down_rows`] then [`lora_up_rows`]: `y_i += B (scale · A x_i)` for `m` rows,
/// `x` of `m × k`, `y` of `m × n` and `t` room for `m × rank` values (`rank` = the rows
/// of `a`), with the bits of [`lora_down`] and [`lora_up`] row by row.
#[allow(clippy::too_many_arguments)]
pub fn lora_rows(
    isa: Isa,
    a: &[f32],
    bt: &[f32],
    (k, n): (usize, usize),
    rank: usize,
    scale: f32,
    x: &[f32],
    y: &mut [f32],
    m: usize,
    t: &mut [f32],
) {
    lora_down_rows(isa, a, k, rank, scale, x, m, t);
    lora_up_rows(isa, bt, n, rank, t, y, m);
}

/// `t[i·rank + j] = scale · (a_j · x_i)` for `m` rows `x_i` of `k` values and the `rank`
/// rows `a_j`: [`lora_down`] row by row, with its bits. The AVX-512 path shares each row
/// of `a` between four rows of `x` and keeps sixteen dot products in flight, where the
/// one-row path waits on one FMA chain at a time.
#[allow(clippy::too_many_arguments)]
pub fn lora_down_rows(
    isa: Isa,
    a: &[f32],
    k: usize,
    rank: usize,
    scale: f32,
    x: &[f32],
    m: usize,
    t: &mut [f32],
) {
    assert!(a.len() >= rank * k && x.len() >= m * k && t.len() >= m * rank);
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Vnni {
        // SAFETY: an `Isa` of Avx512Vnni is only used on CPUs with AVX-512F (the caller
        // got it from detection); the lengths are asserted above.
        return unsafe { x86::down_rows(a, k, rank, scale, x, m, t) };
    }
    for i in 0..m {
        lora_down(
            isa,
            a,
            k,
            &x[i * k..(i + 1) * k],
            scale,
            &mut t[i * rank..(i + 1) * rank],
        );
    }
}

/// `y_i += Σ_j t[i·rank + j] · bt_j` for `m` rows `y_i` of `n` values and the `rank`
/// rows `bt_j`: [`lora_up`] row by row, with its bits (each element's FMA chain in
/// increasing `j`).
pub fn lora_up_rows(
    isa: Isa,
    bt: &[f32],
    n: usize,
    rank: usize,
    t: &[f32],
    y: &mut [f32],
    m: usize,
) {
    assert!(bt.len() >= rank * n && y.len() >= m * n && t.len() >= m * rank);
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Vnni {
        // SAFETY: as in `lora_down_rows`.
        return unsafe { x86::up_rows(bt, n, rank, t, y, m) };
    }
    for i in 0..m {
        lora_up(
            isa,
            bt,
            n,
            &t[i * rank..(i + 1) * rank],
            &mut y[i * n..(i + 1) * n],
        );
    }
}

/// A parameter gradient of LoRA over `m` rows, on the output columns `cols`:
/// `out[j·n + o] += Σ_i t[i·rank + j] · y[i·n + o]` for every rank row `j`, each
/// element's FMA chain in increasing `i` (so the result does not depend on how the
/// columns are split). With `t` the rows' `A x` and `y` their `dy` this is `dBᵀ`; with
/// `t` their `Bᵀ dy` and `y` their `x`, `dA`. `t` stays in its row layout: the AVX-512
/// path keeps sixteen rank rows of a 16-column block in registers and reads `y` once.
#[allow(clippy::too_many_arguments)]
pub fn lora_params(
    isa: Isa,
    t: &[f32],
    rank: usize,
    y: &[f32],
    n: usize,
    m: usize,
    cols: std::ops::Range<usize>,
    out: &mut [f32],
) {
    assert!(out.len() >= rank * n);
    // SAFETY: `out` is borrowed mutably for the call and holds rank · n values.
    unsafe { lora_params_cols(isa, t, rank, y, n, m, cols, out.as_mut_ptr()) }
}

/// [`lora_params`] writing through a pointer, so that threads can each take their own
/// columns of one output.
///
/// # Safety
/// `out` points to `rank · n` values, and while the call runs no one else reads or
/// writes the columns `cols` of them.
#[allow(clippy::too_many_arguments)]
pub unsafe fn lora_params_cols(
    isa: Isa,
    t: &[f32],
    rank: usize,
    y: &[f32],
    n: usize,
    m: usize,
    cols: std::ops::Range<usize>,
    out: *mut f32,
) {
    assert!(t.len() >= m * rank && y.len() >= m * n && cols.end <= n);
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Vnni {
        // SAFETY: as in `lora_down_rows`; the lengths are asserted above and `out` is
        // the caller's promise.
        return unsafe { x86::params(t, rank, y, n, m, cols, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: the ISA level says AVX2 and FMA are present; lengths as below.
        return unsafe { params_avx2(t, rank, y, n, m, cols, out) };
    }
    let _ = isa;
    for j in 0..rank {
        for o in cols.clone() {
            // SAFETY: element (j, o) is inside out and in this call's columns.
            unsafe {
                let p = out.add(j * n + o);
                let mut v = *p;
                for i in 0..m {
                    v = t[i * rank + j].mul_add(y[i * n + o], v);
                }
                *p = v;
            }
        }
    }
}

/// [`lora_params_cols`] on AVX2: the same FMAs per element in the same order (rows `i`
/// increasing), with the columns innermost so the compiler vectorizes them.
///
/// # Safety
/// AVX2 and FMA are present; as [`lora_params_cols`] for the rest.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn params_avx2(
    t: &[f32],
    rank: usize,
    y: &[f32],
    n: usize,
    m: usize,
    cols: std::ops::Range<usize>,
    out: *mut f32,
) {
    let w = cols.end - cols.start;
    for j in 0..rank {
        // SAFETY: row j's columns `cols` are inside out and this call's alone.
        let row = unsafe { std::slice::from_raw_parts_mut(out.add(j * n + cols.start), w) };
        for i in 0..m {
            let tj = t[i * rank + j];
            let yi = &y[i * n + cols.start..i * n + cols.end];
            for (o, v) in row.iter_mut().zip(yi) {
                *o = tj.mul_add(*v, *o);
            }
        }
    }
}

/// `y += a · x`, elementwise (one FMA per element, as [`lora_up`] with one row).
pub fn axpy(isa: Isa, y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len();
    lora_up(isa, &x[..n], n, &[a], y);
}

/// `a · x` in [`dot_ref`]'s order, on every ISA.
pub fn dot(isa: Isa, a: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        assert_eq!(a.len(), x.len());
        // SAFETY: as in `lora_up`; both slices have the same length.
        return unsafe { x86::dot(a, x) };
    }
    let _ = isa;
    dot_ref(a, x)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// # Safety
    ///
    /// The CPU has AVX2 and FMA; `a` and `x` have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], x: &[f32]) -> f32 {
        let n = a.len();
        let body = n / LANES * LANES;
        let (pa, px) = (a.as_ptr(), x.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i < body {
            // SAFETY: i + 16 ≤ body ≤ n for both slices.
            unsafe {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(px.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8)),
                    _mm256_loadu_ps(px.add(i + 8)),
                    acc1,
                );
            }
            i += LANES;
        }
        let s8 = _mm256_add_ps(acc0, acc1);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        // (s0 + s2, s1 + s3), then their sum: the scalar twin's tree.
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        let mut s = _mm_cvtss_f32(s1);
        for j in body..n {
            s = a[j].mul_add(x[j], s);
        }
        s
    }

    /// [`super::lora_down_rows`] on AVX-512: 16 FMA lanes are one register, so each dot
    /// product's lanes, tree and tail are the AVX2 kernel's.
    ///
    /// # Safety
    ///
    /// The CPU has AVX-512F/BW/VL/DQ and FMA; `a` holds `rank · k` values, `x` `m · k` and
    /// `t` `m · rank`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    pub unsafe fn down_rows(
        a: &[f32],
        k: usize,
        rank: usize,
        scale: f32,
        x: &[f32],
        m: usize,
        t: &mut [f32],
    ) {
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(4);
            // SAFETY: rows i..i + rows are within x and t (the caller asserted m rows).
            unsafe {
                match rows {
                    4 => down::<4>(a, k, rank, scale, x, i, t),
                    3 => down::<3>(a, k, rank, scale, x, i, t),
                    2 => down::<2>(a, k, rank, scale, x, i, t),
                    _ => down::<1>(a, k, rank, scale, x, i, t),
                }
            }
            i += rows;
        }
    }

    /// [`super::lora_up_rows`] on AVX-512: each output element's FMA chain runs in
    /// increasing rank, as in `axpy_rows`.
    ///
    /// # Safety
    ///
    /// The CPU has AVX-512F/BW/VL/DQ and FMA; `bt` holds `rank · n` values, `y` `m · n` and
    /// `t` `m · rank`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    pub unsafe fn up_rows(bt: &[f32], n: usize, rank: usize, t: &[f32], y: &mut [f32], m: usize) {
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(4);
            // SAFETY: rows i..i + rows are within y and t (the caller asserted m rows).
            unsafe {
                match rows {
                    4 => up::<4>(bt, n, rank, t, y, i),
                    3 => up::<3>(bt, n, rank, t, y, i),
                    2 => up::<2>(bt, n, rank, t, y, i),
                    _ => up::<1>(bt, n, rank, t, y, i),
                }
            }
            i += rows;
        }
    }

    /// [`super::lora_params`] on AVX-512: rank rows in blocks of up to 16, each
    /// 16-column block's sums in registers over all `m` rows.
    ///
    /// # Safety
    ///
    /// The CPU has AVX-512F/BW/VL/DQ and FMA; `t` holds `m · rank` values, `y` `m · n`,
    /// `cols.end <= n`, and `out` is writable for `rank · n` values, the columns `cols` of
    /// every row this call's alone.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    pub unsafe fn params(
        t: &[f32],
        rank: usize,
        y: &[f32],
        n: usize,
        m: usize,
        cols: std::ops::Range<usize>,
        po: *mut f32,
    ) {
        let mut j0 = 0;
        while j0 < rank {
            let js = match rank - j0 {
                16.. => 16,
                8.. => 8,
                4.. => 4,
                _ => 1,
            };
            // SAFETY: as the caller promised, for rank rows j0..j0 + js.
            unsafe {
                match js {
                    16 => params_block::<16>(t, rank, y, n, m, cols.clone(), po, j0),
                    8 => params_block::<8>(t, rank, y, n, m, cols.clone(), po, j0),
                    4 => params_block::<4>(t, rank, y, n, m, cols.clone(), po, j0),
                    _ => params_block::<1>(t, rank, y, n, m, cols.clone(), po, j0),
                }
            }
            j0 += js;
        }
    }

    /// Rank rows `j0..j0 + R` of [`params`], their sums in `R` registers.
    ///
    /// # Safety
    ///
    /// As [`params`], with rank rows `j0..j0 + R` below `rank`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn params_block<const R: usize>(
        t: &[f32],
        rank: usize,
        y: &[f32],
        n: usize,
        m: usize,
        cols: std::ops::Range<usize>,
        po: *mut f32,
        j0: usize,
    ) {
        let (pt, py) = (t.as_ptr(), y.as_ptr());
        let mut o = cols.start;
        while o < cols.end {
            let w = (cols.end - o).min(16);
            let mask = ((1u32 << w) - 1) as u16;
            // SAFETY: the masked lanes stay below cols.end ≤ n in every row of y and
            // out; rows j0..j0 + R of out and m rows of t and y exist (asserted).
            unsafe {
                let mut acc: [__m512; R] = std::array::from_fn(|jj| {
                    _mm512_maskz_loadu_ps(mask, po.add((j0 + jj) * n + o))
                });
                for i in 0..m {
                    let yv = _mm512_maskz_loadu_ps(mask, py.add(i * n + o));
                    let ti = pt.add(i * rank + j0);
                    for (jj, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(*ti.add(jj)), yv, *a);
                    }
                }
                for (jj, a) in acc.iter().enumerate() {
                    _mm512_mask_storeu_ps(po.add((j0 + jj) * n + o), mask, *a);
                }
            }
            o += 16;
        }
    }

    /// `t[i + r][j] = scale · a_j · x_{i + r}` for `R` rows, four rank rows at a time.
    ///
    /// # Safety
    ///
    /// As [`down_rows`], with rows `i..i + R` below `m` (`x` and `t` hold them).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    unsafe fn down<const R: usize>(
        a: &[f32],
        k: usize,
        rank: usize,
        scale: f32,
        x: &[f32],
        i: usize,
        t: &mut [f32],
    ) {
        let body = k / LANES * LANES;
        let px = x.as_ptr();
        let mut j0 = 0;
        while j0 < rank {
            let js = (rank - j0).min(4);
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            let mut c = 0;
            while c < body {
                // SAFETY: c + 16 ≤ body ≤ k, rows j0..j0 + js of a and i..i + R of x exist.
                unsafe {
                    let xs: [__m512; R] =
                        std::array::from_fn(|r| _mm512_loadu_ps(px.add((i + r) * k + c)));
                    for jj in 0..js {
                        let av = _mm512_loadu_ps(a.as_ptr().add((j0 + jj) * k + c));
                        for r in 0..R {
                            acc[r][jj] = _mm512_fmadd_ps(av, xs[r], acc[r][jj]);
                        }
                    }
                }
                c += LANES;
            }
            for (r, accr) in acc.iter().enumerate() {
                for (jj, v) in accr.iter().enumerate().take(js) {
                    let s8 = _mm256_add_ps(
                        _mm512_castps512_ps256(*v),
                        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*v))),
                    );
                    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
                    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
                    let mut s = _mm_cvtss_f32(s1);
                    let (ar, xr) = (&a[(j0 + jj) * k..], &x[(i + r) * k..]);
                    for c in body..k {
                        s = ar[c].mul_add(xr[c], s);
                    }
                    t[(i + r) * rank + j0 + jj] = scale * s;
                }
            }
            j0 += js;
        }
    }

    /// `y[i + r] += Σ_j t[i + r][j] · bt_j` for `R` rows, 32 outputs at a time.
    ///
    /// # Safety
    ///
    /// As [`up_rows`], with rows `i..i + R` below `m` (`t` and `y` hold them).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    unsafe fn up<const R: usize>(
        bt: &[f32],
        n: usize,
        rank: usize,
        t: &[f32],
        y: &mut [f32],
        i: usize,
    ) {
        let (pb, py, pt) = (bt.as_ptr(), y.as_mut_ptr(), t.as_ptr());
        let mut o = 0;
        while o < n {
            let w0 = (n - o).min(16);
            let w1 = (n - o).saturating_sub(16).min(16);
            let (m0, m1) = (((1u32 << w0) - 1) as u16, ((1u32 << w1) - 1) as u16);
            // SAFETY: masked lanes stay below n in every row of y and bt; rows i..i + R
            // of y and t and the rank rows of bt exist.
            unsafe {
                let mut v0: [__m512; R] =
                    std::array::from_fn(|r| _mm512_maskz_loadu_ps(m0, py.add((i + r) * n + o)));
                let mut v1: [__m512; R] = std::array::from_fn(|r| {
                    _mm512_maskz_loadu_ps(m1, py.add((i + r) * n + o + 16))
                });
                for j in 0..rank {
                    let b0 = _mm512_maskz_loadu_ps(m0, pb.add(j * n + o));
                    let b1 = _mm512_maskz_loadu_ps(m1, pb.add(j * n + o + 16));
                    for r in 0..R {
                        let tv = _mm512_set1_ps(*pt.add((i + r) * rank + j));
                        v0[r] = _mm512_fmadd_ps(tv, b0, v0[r]);
                        v1[r] = _mm512_fmadd_ps(tv, b1, v1[r]);
                    }
                }
                for r in 0..R {
                    _mm512_mask_storeu_ps(py.add((i + r) * n + o), m0, v0[r]);
                    _mm512_mask_storeu_ps(py.add((i + r) * n + o + 16), m1, v1[r]);
                }
            }
            o += 32;
        }
    }

    /// # Safety
    ///
    /// The CPU has AVX2 and FMA; `bt` holds `t.len() · n` values and `y` at least `n`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_rows(bt: &[f32], n: usize, t: &[f32], y: &mut [f32]) {
        let body = n / 8 * 8;
        let (pb, py) = (bt.as_ptr(), y.as_mut_ptr());
        let mut o = 0;
        while o < body {
            // SAFETY: o + 8 ≤ n ≤ y.len(), and j·n + o + 8 ≤ t.len()·n ≤ bt.len().
            unsafe {
                let mut v = _mm256_loadu_ps(py.add(o));
                for (j, &tj) in t.iter().enumerate() {
                    v = _mm256_fmadd_ps(_mm256_set1_ps(tj), _mm256_loadu_ps(pb.add(j * n + o)), v);
                }
                _mm256_storeu_ps(py.add(o), v);
            }
            o += 8;
        }
        for o in body..n {
            let mut v = y[o];
            for (j, &tj) in t.iter().enumerate() {
                v = tj.mul_add(bt[j * n + o], v);
            }
            y[o] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift) for test data of varied magnitude.
    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                u * if s & 3 == 0 { 100.0 } else { 1.0 }
            })
            .collect()
    }

    /// f(A, B, x) = Σ_o w_o · y_o with y = y0 + scale · B (A x), in f64.
    #[allow(clippy::too_many_arguments)]
    fn lora_objective(
        a: &[f32],
        bt: &[f32],
        x: &[f32],
        w: &[f32],
        (k, n, r): (usize, usize, usize),
        scale: f32,
        m: usize,
    ) -> f64 {
        let mut f = 0f64;
        for i in 0..m {
            for o in 0..n {
                let mut y = 0f64;
                for j in 0..r {
                    let t: f64 = (0..k)
                        .map(|c| a[j * k + c] as f64 * x[i * k + c] as f64)
                        .sum();
                    y += scale as f64 * t * bt[j * n + o] as f64;
                }
                f += w[i * n + o] as f64 * y;
            }
        }
        f
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (m, k, n, r, scale) = (3, 19, 13, 4, 0.75f32);
        let a: Vec<f32> = data(r * k, 21).iter().map(|v| v * 0.1).collect();
        let bt: Vec<f32> = data(r * n, 22).iter().map(|v| v * 0.1).collect();
        let x: Vec<f32> = data(m * k, 23).iter().map(|v| v * 0.1).collect();
        let w: Vec<f32> = data(m * n, 24).iter().map(|v| v * 0.1).collect();
        for isa in Isa::supported() {
            // As the trainer's backward runs them: t = s·A x, dt = s·Bᵀ dy, dX += dt A,
            // then dBᵀ += tᵀ dY and dA += dtᵀ X, each split over two "threads" (row
            // ranges, then column ranges) to check the split does not matter.
            let (mut t, mut dt) = (vec![0f32; m * r], vec![0f32; m * r]);
            let mut dx = vec![0f32; m * k];
            for rows in [0..1, 1..m] {
                let mm = rows.len();
                let (t, dt) = (
                    &mut t[rows.start * r..rows.end * r],
                    &mut dt[rows.start * r..rows.end * r],
                );
                lora_down_rows(isa, &a, k, r, scale, &x[rows.start * k..], mm, t);
                lora_down_rows(isa, &bt, n, r, scale, &w[rows.start * n..], mm, dt);
                lora_up_rows(isa, &a, k, r, dt, &mut dx[rows.start * k..rows.end * k], mm);
            }
            let (mut da, mut dbt) = (vec![0f32; r * k], vec![0f32; r * n]);
            for (lo, hi) in [(0, 16), (16, usize::MAX)] {
                lora_params(isa, &t, r, &w, n, m, lo.min(n)..hi.min(n), &mut dbt);
                lora_params(isa, &dt, r, &x, k, m, lo.min(k)..hi.min(k), &mut da);
            }
            let h = 1e-2f32;
            let fd = |which: u8, idx: usize| {
                let (mut ap, mut bp, mut xp) = (a.clone(), bt.clone(), x.clone());
                let (mut am, mut bm, mut xm) = (a.clone(), bt.clone(), x.clone());
                match which {
                    0 => (ap[idx] += h, am[idx] -= h),
                    1 => (bp[idx] += h, bm[idx] -= h),
                    _ => (xp[idx] += h, xm[idx] -= h),
                };
                let fp = lora_objective(&ap, &bp, &xp, &w, (k, n, r), scale, m);
                let fm = lora_objective(&am, &bm, &xm, &w, (k, n, r), scale, m);
                (fp - fm) / (2.0 * h as f64)
            };
            for (which, g) in [(0u8, &da), (1, &dbt), (2, &dx)] {
                for (idx, &gv) in g.iter().enumerate() {
                    let want = fd(which, idx);
                    assert!(
                        (gv as f64 - want).abs() <= 1e-4 + 1e-3 * want.abs(),
                        "{isa} grad {which}[{idx}]: {gv} vs finite difference {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_matches_scalar_twin_bitwise() {
        for isa in Isa::supported() {
            for k in [0, 1, 7, 15, 16, 17, 31, 32, 33, 100, 576, 1537] {
                for (r, n) in [(1, 1), (3, 7), (4, 8), (8, 9), (5, 33), (8, 576)] {
                    let a = data(r * k, 1 + k as u64);
                    let x = data(k, 2 + r as u64);
                    let mut t = vec![0f32; r];
                    let mut t_ref = vec![0f32; r];
                    lora_down(isa, &a, k, &x, 1.7, &mut t);
                    for j in 0..r {
                        t_ref[j] = 1.7 * dot_ref(&a[j * k..(j + 1) * k], &x);
                    }
                    assert_eq!(bits(&t), bits(&t_ref), "{isa} down k={k} r={r}");
                    let bt = data(r * n, 3 + n as u64);
                    let mut y = data(n, 4);
                    let mut y_ref = y.clone();
                    lora_up(isa, &bt, n, &t, &mut y);
                    axpy_rows_ref(&bt, n, &t, &mut y_ref);
                    assert_eq!(bits(&y), bits(&y_ref), "{isa} up n={n} r={r}");
                }
            }
        }
    }

    #[test]
    fn rows_equal_row_by_row_bitwise() {
        for isa in Isa::supported() {
            for (k, n) in [
                (1, 1),
                (15, 17),
                (16, 32),
                (33, 47),
                (576, 192),
                (100, 1536),
            ] {
                for rank in [1, 3, 4, 5, 16] {
                    for m in [1, 2, 3, 4, 5, 9] {
                        let a = data(rank * k, 31 + k as u64);
                        let bt = data(rank * n, 32 + n as u64);
                        let x = data(m * k, 33 + m as u64);
                        let y0 = data(m * n, 34);
                        let (mut y, mut t) = (y0.clone(), vec![0f32; m * rank]);
                        lora_rows(isa, &a, &bt, (k, n), rank, 0.3, &x, &mut y, m, &mut t);
                        let mut want = y0.clone();
                        let mut tr = vec![0f32; rank];
                        for i in 0..m {
                            lora_down(Isa::Scalar, &a, k, &x[i * k..(i + 1) * k], 0.3, &mut tr);
                            lora_up(Isa::Scalar, &bt, n, &tr, &mut want[i * n..(i + 1) * n]);
                        }
                        assert_eq!(bits(&y), bits(&want), "{isa} k={k} n={n} r={rank} m={m}");
                    }
                }
            }
        }
    }

    #[test]
    fn params_equal_their_scalar_model_bitwise() {
        for isa in Isa::supported() {
            for (rank, n, m) in [(1, 5, 3), (4, 17, 9), (16, 576, 40), (20, 33, 7)] {
                let t = data(m * rank, 41);
                let y = data(m * n, 42);
                let out0 = data(rank * n, 43);
                let mut got = out0.clone();
                // Two column ranges, as two threads would take them.
                let cut = n / 2 / 16 * 16;
                lora_params(isa, &t, rank, &y, n, m, 0..cut, &mut got);
                lora_params(isa, &t, rank, &y, n, m, cut..n, &mut got);
                let mut want = out0.clone();
                for j in 0..rank {
                    for o in 0..n {
                        for i in 0..m {
                            want[j * n + o] =
                                t[i * rank + j].mul_add(y[i * n + o], want[j * n + o]);
                        }
                    }
                }
                assert_eq!(bits(&got), bits(&want), "{isa} rank {rank} n {n} m {m}");
            }
        }
    }

    #[test]
    fn scalar_twin_computes_the_product() {
        let (r, k, n) = (3, 37, 11);
        let a = data(r * k, 9);
        let x = data(k, 10);
        let bt = data(r * n, 11);
        let y0 = data(n, 12);
        let mut t = vec![0f32; r];
        lora_down(Isa::Scalar, &a, k, &x, 0.5, &mut t);
        let mut y = y0.clone();
        lora_up(Isa::Scalar, &bt, n, &t, &mut y);
        for o in 0..n {
            let mut want = y0[o] as f64;
            for j in 0..r {
                let tj: f64 = (0..k).map(|i| a[j * k + i] as f64 * x[i] as f64).sum();
                want += 0.5 * tj * bt[j * n + o] as f64;
            }
            assert!(
                (y[o] as f64 - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{o}: {} vs {want}",
                y[o]
            );
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
