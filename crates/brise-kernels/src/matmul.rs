//! Matrix products of weights in any block format with f32 activations.

use crate::ggml_type::GgmlType;
use crate::kpacked::{KMode, KPacked};
use crate::packed::{ActPrep, GROUP, Packed};
use crate::pool::{ThreadPool, split_range};
use crate::quant::ggml_exact::ggml_path_shaped;
use crate::quant::{Kernels, act_row_bytes, quantize_act_row};

/// Where an activation row sits in its sequence's step: row `idx` of `n` rows. llama.cpp
/// picks kernels by the number of rows of a matrix product (and, for repacked weights,
/// by the row's index), so brise picks the same kernel per row from its own sequence's
/// step, which also keeps a sequence's result independent of what else is batched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowStep {
    pub n: usize,
    pub idx: usize,
}

impl RowStep {
    pub const SINGLE: RowStep = RowStep { n: 1, idx: 0 };

    /// The steps of `m` rows that all belong to one step.
    pub fn all(m: usize) -> impl Iterator<Item = RowStep> {
        (0..m).map(move |idx| RowStep { n: m, idx })
    }
}

/// A weight matrix of `n` rows of `k` elements in format `ty` (row-major, as GGUF and
/// safetensors store `[out, in]` weights).
#[derive(Clone, Copy)]
pub struct WeightRef<'a> {
    pub ty: GgmlType,
    pub n: usize,
    pub k: usize,
    pub data: &'a [u8],
    /// The same matrix in lanes16 layout, when it was repacked at load for AVX-512.
    pub packed: Option<&'a Packed>,
    /// The same matrix in kq16 layout (Q4_K, Q6_K), when repacked at load.
    pub kpacked: Option<&'a KPacked>,
}

impl<'a> WeightRef<'a> {
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.k).expect("validated at load")
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Row `r` dequantized into `out` (`k` values), from whichever layout holds it.
    /// `tmp` holds a row's bytes when the matrix is repacked.
    pub fn dequantize_row(&self, r: usize, tmp: &mut Vec<u8>, out: &mut [f32]) {
        match (self.packed, self.kpacked) {
            (Some(p), _) => p.dequantize_row(r, tmp, out),
            (_, Some(p)) => p.dequantize_row(r, out),
            _ => crate::quant::dequantize_row(self.ty, self.row(r), out),
        }
    }
}

/// Buffers of [`matmul_backward_input`], reused across calls.
#[derive(Default)]
pub struct GradScratch {
    /// Per thread: its partial `dx`, a block of dequantized weight rows, a row's bytes.
    per_thread: Vec<(Vec<f32>, Vec<f32>, Vec<u8>)>,
    /// The bf16 path's: W's slab in tile layout (shared), and per thread its rows of
    /// `dy` in bf16 and of `dx` in f32.
    amx_b: Vec<u16>,
    amx_rows: Vec<(Vec<u16>, Vec<f32>)>,
}

/// W's rows per slab of the bf16 path (its tile layout is 2 bytes a value: 1.2 MB for
/// 576 columns).
const AMX_SLAB: usize = 1024;

/// Whether [`matmul_backward_input`] takes the bf16 path (AMX or AVX512-BF16) for these
/// sizes.
pub fn backward_input_uses_bf16(m: usize, n: usize) -> bool {
    crate::amx::available() && m >= 16 && n >= 64
}

/// Weight rows dequantized together by the backward (a panel of f32 that stays in
/// cache while every row of `dx` takes its rank-1 updates).
const GRAD_ROWS: usize = 64;

/// Backward of [`matmul`] with respect to its input: `dx (m × k) = dy (m × n) · W`.
///
/// W stays quantized (QLoRA-style): each thread dequantizes its share of W's rows, a
/// block at a time, into f32 scratch, and accumulates into its own partial `dx`; the
/// partials are then summed in thread order, so the result is deterministic for a
/// given thread count. With bf16 products ([`backward_input_uses_bf16`]) it runs on
/// them instead (`amx.rs`: AMX tiles or AVX512-BF16): W's rows are dequantized slab by slab into the tile layout,
/// shared by the threads, and each thread computes its own rows of `dx` (also
/// deterministic).
pub fn matmul_backward_input(
    pool: &ThreadPool,
    w: &WeightRef,
    dy: &[f32],
    m: usize,
    scratch: &mut GradScratch,
    dx: &mut [f32],
) {
    let (n, k) = (w.n, w.k);
    assert!(
        dy.len() >= m * n && dx.len() >= m * k,
        "caller sizes the buffers"
    );
    if backward_input_uses_bf16(m, n) {
        return backward_input_bf16(pool, &[(*w, dy)], m, scratch, dx);
    }
    backward_input_f32(pool, w, dy, m, scratch, dx)
}

/// `dx[..m·k] = Σ_i dy_i · W_i` for matrices of one input width `k` (Q, K and V, or
/// gate and up, which read the same normed rows): in bf16 one product whose slabs run
/// over the matrices in turn, accumulating in its tiles; otherwise each product then
/// the sum, in order. `tmp` holds a product for that sum.
pub fn matmul_backward_input_sum(
    pool: &ThreadPool,
    parts: &[(WeightRef, &[f32])],
    m: usize,
    scratch: &mut GradScratch,
    tmp: &mut [f32],
    dx: &mut [f32],
) {
    let Some(((w0, _), _)) = parts.split_first() else {
        return;
    };
    let k = w0.k;
    for (w, dy) in parts {
        assert!(w.k == k && dy.len() >= m * w.n && dx.len() >= m * k && tmp.len() >= m * k);
    }
    if parts.iter().all(|(w, _)| backward_input_uses_bf16(m, w.n)) {
        return backward_input_bf16(pool, parts, m, scratch, dx);
    }
    for (i, (w, dy)) in parts.iter().enumerate() {
        if i == 0 {
            matmul_backward_input(pool, w, dy, m, scratch, dx);
        } else {
            matmul_backward_input(pool, w, dy, m, scratch, tmp);
            for (o, v) in dx[..m * k].iter_mut().zip(&tmp[..m * k]) {
                *o += *v;
            }
        }
    }
}

/// The f32 path of [`matmul_backward_input`] (every CPU; the reference for the bf16 one).
pub fn backward_input_f32(
    pool: &ThreadPool,
    w: &WeightRef,
    dy: &[f32],
    m: usize,
    scratch: &mut GradScratch,
    dx: &mut [f32],
) {
    let (n, k) = (w.n, w.k);
    let nt = pool.n_threads();
    scratch.per_thread.resize_with(nt, Default::default);
    for (acc, wblk, _) in scratch.per_thread.iter_mut() {
        acc.clear();
        acc.resize(m * k, 0.0);
        wblk.resize(GRAD_ROWS * k, 0.0);
    }
    let parts = SyncParts(scratch.per_thread.as_mut_ptr());
    let per = n.div_ceil(nt);
    pool.run(|t| {
        // SAFETY: thread t alone uses element t of `per_thread` (sized to nt above).
        let (acc, wblk, tmp) = unsafe { &mut *parts.get().add(t) };
        let (lo, hi) = (t * per, ((t + 1) * per).min(n));
        let mut r0 = lo;
        while r0 < hi {
            let g = GRAD_ROWS.min(hi - r0);
            for j in 0..g {
                w.dequantize_row(r0 + j, tmp, &mut wblk[j * k..(j + 1) * k]);
            }
            panel(acc, m, k, dy, n, r0, g, &wblk[..g * k]);
            r0 += g;
        }
    });
    dx[..m * k].fill(0.0);
    for (acc, _, _) in &scratch.per_thread {
        for (o, v) in dx[..m * k].iter_mut().zip(acc) {
            *o += *v;
        }
    }
}

/// `dx = Σ dy_i · W_i` in bf16 (`amx::gemm`): slabs of up to [`AMX_SLAB`] rows of each matrix in turn,
/// the first starting the tiles from zero and the rest accumulating.
fn backward_input_bf16(
    pool: &ThreadPool,
    parts: &[(WeightRef, &[f32])],
    m: usize,
    scratch: &mut GradScratch,
    dx: &mut [f32],
) {
    use crate::amx;
    let k = parts[0].0.k;
    let n_max = parts.iter().map(|(w, _)| w.n).max().unwrap_or(0);
    let (mp, kp) = (amx::pad32(m), amx::pad32(k));
    let nt = pool.n_threads();
    // Thread t's rows of dx: whole 32-row blocks.
    let rows = |t: usize| split_range(mp, nt, t, 32);
    // Rows whose C can be dx itself: k is a whole number of tiles and the block real.
    let direct = |t: usize| k == kp && rows(t).end <= m;
    scratch.amx_rows.resize_with(nt, Default::default);
    scratch.per_thread.resize_with(nt, Default::default);
    for (t, (a, c)) in scratch.amx_rows.iter_mut().enumerate() {
        let r = rows(t).len();
        grow_to(a, r * amx::pad32(AMX_SLAB.min(n_max)));
        if !direct(t) {
            grow_to(c, r * kp);
        }
    }
    for (_, wblk, _) in scratch.per_thread.iter_mut() {
        wblk.resize(2 * k, 0.0);
    }
    // B starts on a cache line: its 64-byte pair rows are then whole lines, stored by
    // the packing and loaded by the product without splits.
    grow_to(&mut scratch.amx_b, amx::b_len(AMX_SLAB.min(n_max), kp) + 32);
    let skip = scratch.amx_b.as_ptr().align_offset(64).min(32);
    let per = SyncParts(scratch.per_thread.as_mut_ptr());
    let bptr = SyncU16(scratch.amx_b[skip..].as_mut_ptr());
    let blen = scratch.amx_b.len() - skip;
    let mine = SyncRows(scratch.amx_rows.as_mut_ptr());
    let dxp = SyncPtr(dx.as_mut_ptr());
    let slabs: Vec<(usize, usize)> = parts
        .iter()
        .enumerate()
        .flat_map(|(i, (w, _))| (0..w.n).step_by(AMX_SLAB).map(move |r0| (i, r0)))
        .collect();
    for (si, &(pi, r0)) in slabs.iter().enumerate() {
        let (w, dy) = (&parts[pi].0, parts[pi].1);
        let n = w.n;
        let g = AMX_SLAB.min(n - r0);
        let gp = amx::pad32(g);
        let (first, last) = (si == 0, si + 1 == slabs.len());
        // W's rows r0..r0+g into the shared tile layout, the threads taking row ranges;
        // then, after the barrier, each thread's rows of the product.
        pool.run(|t| {
            // SAFETY: thread t alone uses element t of `per_thread`; the rows j of this
            // thread's range write only their own (kb, p, e) slots of B, disjoint from
            // every other thread's, and `blen` is B's length.
            let (_, wblk, tmp) = unsafe { &mut *per.get().add(t) };
            {
                // SAFETY: as above: this thread writes only its own slots of B (`blen`
                // values long).
                let b = unsafe { std::slice::from_raw_parts_mut(bptr.get(), blen) };
                for j in split_range(gp, nt, t, 2).step_by(2) {
                    if j + 1 < g && w.packed.is_some_and(|p| p.pack_bf16_pair(r0 + j, b, g, j)) {
                        continue;
                    }
                    let (w0, w1) = wblk.split_at_mut(k);
                    for (row, dst) in [(j, &mut w0[..]), (j + 1, &mut w1[..k])] {
                        if row < g {
                            w.dequantize_row(r0 + row, tmp, dst);
                        } else {
                            dst.fill(0.0);
                        }
                    }
                    amx::pack_b_pair(b, g, k, j, w0, &w1[..k]);
                }
            }
            pool.barrier();
            // SAFETY: thread t alone uses element t of `amx_rows` and rows rr of dx; B
            // is only read now (every thread's writes are behind the barrier).
            let (a, c) = unsafe { &mut *mine.get().add(t) };
            // SAFETY: as above: B has `blen` values and nobody writes it any more.
            let b = unsafe { std::slice::from_raw_parts(bptr.get(), blen) };
            let rr = rows(t);
            if rr.is_empty() {
                return;
            }
            let real = rr.start.min(m)..rr.end.min(m);
            let ap = &mut a[..rr.len() * gp];
            if !real.is_empty() {
                amx::pack_a(ap, &dy[real.start * n..], n, r0, g, real.len());
            }
            ap[real.len() * gp..].fill(0);
            let cr = if direct(t) {
                // SAFETY: rows rr (all below m) of dx are this thread's alone.
                unsafe { std::slice::from_raw_parts_mut(dxp.get().add(rr.start * k), rr.len() * k) }
            } else {
                &mut c[..rr.len() * kp]
            };
            // SAFETY: bf16 products are available (the caller checked); A has rr.len() rows of gp,
            // B the layout of g rows and kp columns, C rr.len() × kp; the first slab
            // starts C from zero.
            unsafe { amx::gemm(cr, rr.len(), kp, ap, b, g, !first) };
            if last && !direct(t) {
                for i in real {
                    let o = (i - rr.start) * kp;
                    // SAFETY: row i (below m) of dx is this thread's alone.
                    let d = unsafe { std::slice::from_raw_parts_mut(dxp.get().add(i * k), k) };
                    d.copy_from_slice(&c[o..o + k]);
                }
            }
        });
    }
}

/// Grows `v` to at least `n` elements, leaving what it holds: for buffers every use
/// overwrites, so a call does not pay to zero them.
fn grow_to<T: Default + Clone>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

#[derive(Clone, Copy)]
struct SyncU16(*mut u16);
// SAFETY: as `SyncPtr`: threads write disjoint elements, then only read.
unsafe impl Send for SyncU16 {}
unsafe impl Sync for SyncU16 {}
impl SyncU16 {
    fn get(self) -> *mut u16 {
        self.0
    }
}

#[derive(Clone, Copy)]
struct SyncRows(*mut (Vec<u16>, Vec<f32>));
// SAFETY: as `SyncParts`: each thread takes its own element.
unsafe impl Send for SyncRows {}
unsafe impl Sync for SyncRows {}
impl SyncRows {
    fn get(self) -> *mut (Vec<u16>, Vec<f32>) {
        self.0
    }
}

/// `acc (m × k) += a[:, c0..c0+g] · b (g × k)` in f32, for `a` with rows of `lda`
/// values: the dense product the backward pass is made of. Each element takes its g FMAs
/// in increasing order on every path (the tiled AVX-512 kernel and [`panel_rows`] give
/// the same bits).
#[allow(clippy::too_many_arguments)]
pub fn gemm_acc(
    acc: &mut [f32],
    m: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    c0: usize,
    g: usize,
    b: &[f32],
) {
    panel(acc, m, k, a, lda, c0, g, b)
}

/// `acc (m × k) += dy[:, r0..r0+g] · panel (g × k)`. Each element takes its g FMAs in
/// increasing row order on every path, so the tiled AVX-512 kernel and the row-by-row
/// one give the same bits.
#[allow(clippy::too_many_arguments)]
fn panel(
    acc: &mut [f32],
    m: usize,
    k: usize,
    dy: &[f32],
    n: usize,
    r0: usize,
    g: usize,
    w: &[f32],
) {
    assert!(acc.len() >= m * k && w.len() >= g * k && (m == 0 || dy.len() >= (m - 1) * n + r0 + g));
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: AVX-512F is present (checked); the bounds are asserted above and the
        // kernel's masked loads and stores stay inside them.
        return unsafe { panel_x86::panel(acc, m, k, dy, n, r0, g, w) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present (checked); the bounds are asserted above and
        // the kernel's masked loads and stores stay inside them.
        return unsafe { panel_avx2::panel(acc, m, k, dy, n, r0, g, w) };
    }
    panel_rows(acc, m, k, dy, n, r0, g, w)
}

/// [`panel`] on AVX2 (CPUs without AVX-512, such as AMD Zen 2/3 and most desktop Intel
/// parts): tiles of up to 6 rows × 16 columns (12 accumulators of the 16 registers),
/// each element's FMAs in increasing row order, so the bits equal [`panel_rows`]'.
#[cfg(target_arch = "x86_64")]
pub mod panel_avx2 {
    use std::arch::x86_64::*;

    const MR: usize = 6;

    /// # Safety
    /// The CPU has AVX2 and FMA; `acc` holds m rows of k, `dy` m rows of n with columns
    /// r0..r0+g inside them, and `w` g rows of k.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel(
        acc: &mut [f32],
        m: usize,
        k: usize,
        dy: &[f32],
        n: usize,
        r0: usize,
        g: usize,
        w: &[f32],
    ) {
        assert!(
            acc.len() >= m * k && w.len() >= g * k && (m == 0 || dy.len() >= (m - 1) * n + r0 + g)
        );
        let mut i0 = 0;
        while i0 < m {
            let mr = MR.min(m - i0);
            let mut c0 = 0;
            while c0 < k {
                let cw = 16.min(k - c0);
                let lane = |base: usize| {
                    let on = |j: usize| if base + j < cw { -1i32 } else { 0 };
                    _mm256_setr_epi32(on(0), on(1), on(2), on(3), on(4), on(5), on(6), on(7))
                };
                let t = Tile {
                    k,
                    n,
                    i0,
                    c0,
                    m0: lane(0),
                    m1: lane(8),
                    full: cw == 16,
                    r0,
                    g,
                };
                // SAFETY: rows i0..i0+mr < m and columns c0..c0+cw ≤ k (masked) of acc,
                // dy's rows i0.. at columns r0..r0+g and w's g rows: all inside the
                // bounds asserted above.
                unsafe {
                    match mr {
                        6 => tile::<6>(acc, dy, w, &t),
                        5 => tile::<5>(acc, dy, w, &t),
                        4 => tile::<4>(acc, dy, w, &t),
                        3 => tile::<3>(acc, dy, w, &t),
                        2 => tile::<2>(acc, dy, w, &t),
                        _ => tile::<1>(acc, dy, w, &t),
                    }
                }
                c0 += 16;
            }
            i0 += MR;
        }
    }

    struct Tile {
        k: usize,
        n: usize,
        i0: usize,
        c0: usize,
        m0: __m256i,
        m1: __m256i,
        /// All 16 columns are in: plain loads and stores (masked stores are slow on
        /// AMD's cores, and the bits are the same).
        full: bool,
        r0: usize,
        g: usize,
    }

    /// # Safety
    ///
    /// The CPU has AVX2 and FMA; rows `t.i0..t.i0 + R` of `acc` (rows of `t.k`) and of `dy`
    /// (rows of `t.n`, columns `t.r0..t.r0 + t.g`) exist, `w` holds `t.g` rows of `t.k`, and
    /// the lane masks `t.m0`, `t.m1` enable only columns below `t.k`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(acc: &mut [f32], dy: &[f32], w: &[f32], t: &Tile) {
        let pa = acc.as_mut_ptr();
        let (pd, pw) = (dy.as_ptr(), w.as_ptr());
        let mut a0 = [_mm256_setzero_ps(); R];
        let mut a1 = [_mm256_setzero_ps(); R];
        // SAFETY (whole body): offsets stay in the caller's bounds; the lane masks keep
        // loads and stores inside row length k (a masked-off lane is not accessed).
        unsafe {
            let load = |p: *const f32, m: __m256i| {
                if t.full {
                    _mm256_loadu_ps(p)
                } else {
                    _mm256_maskload_ps(p, m)
                }
            };
            for r in 0..R {
                let o = (t.i0 + r) * t.k + t.c0;
                a0[r] = load(pa.add(o), t.m0);
                a1[r] = load(pa.add(o + 8), t.m1);
            }
            for p in 0..t.g {
                let wo = p * t.k + t.c0;
                let b0 = load(pw.add(wo), t.m0);
                let b1 = load(pw.add(wo + 8), t.m1);
                for r in 0..R {
                    let s = _mm256_set1_ps(*pd.add((t.i0 + r) * t.n + t.r0 + p));
                    a0[r] = _mm256_fmadd_ps(s, b0, a0[r]);
                    a1[r] = _mm256_fmadd_ps(s, b1, a1[r]);
                }
            }
            for r in 0..R {
                let o = (t.i0 + r) * t.k + t.c0;
                if t.full {
                    _mm256_storeu_ps(pa.add(o), a0[r]);
                    _mm256_storeu_ps(pa.add(o + 8), a1[r]);
                } else {
                    _mm256_maskstore_ps(pa.add(o), t.m0, a0[r]);
                    _mm256_maskstore_ps(pa.add(o + 8), t.m1, a1[r]);
                }
            }
        }
    }
}

/// The scalar twin of the tiled panel kernel: one row of `acc` at a time.
#[allow(clippy::too_many_arguments)]
pub fn panel_rows(
    acc: &mut [f32],
    m: usize,
    k: usize,
    dy: &[f32],
    n: usize,
    r0: usize,
    g: usize,
    w: &[f32],
) {
    for i in 0..m {
        let a = &mut acc[i * k..(i + 1) * k];
        let d = &dy[i * n + r0..i * n + r0 + g];
        axpy_rows(a, d, &w[..g * k], k);
    }
}

#[cfg(target_arch = "x86_64")]
mod panel_x86 {
    use std::arch::x86_64::*;

    /// Rows of `acc` per tile: 8 rows × 32 columns is 16 accumulators.
    const MR: usize = 8;

    /// # Safety
    ///
    /// The CPU has AVX-512F and FMA; `acc` holds `m` rows of `k`, `dy` `m` rows of `n` with
    /// columns `r0..r0 + g` inside them, and `w` `g` rows of `k`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn panel(
        acc: &mut [f32],
        m: usize,
        k: usize,
        dy: &[f32],
        n: usize,
        r0: usize,
        g: usize,
        w: &[f32],
    ) {
        let mut i0 = 0;
        while i0 < m {
            let mr = MR.min(m - i0);
            let mut c0 = 0;
            while c0 < k {
                let cw = 32.min(k - c0);
                let m0: __mmask16 = if cw >= 16 {
                    0xffff
                } else {
                    (1u32 << cw) as u16 - 1
                };
                let m1: __mmask16 = if cw >= 32 {
                    0xffff
                } else if cw > 16 {
                    (1u32 << (cw - 16)) as u16 - 1
                } else {
                    0
                };
                let t = Tile {
                    k,
                    n,
                    i0,
                    c0,
                    m0,
                    m1,
                    r0,
                    g,
                };
                // SAFETY: rows i0..i0+mr < m and columns c0..c0+cw ≤ k (masked) of acc,
                // dy's rows i0.. at columns r0..r0+g and w's g rows: all inside the
                // bounds the caller asserted.
                unsafe {
                    match mr {
                        8 => tile::<8>(acc, dy, w, &t),
                        7 => tile::<7>(acc, dy, w, &t),
                        6 => tile::<6>(acc, dy, w, &t),
                        5 => tile::<5>(acc, dy, w, &t),
                        4 => tile::<4>(acc, dy, w, &t),
                        3 => tile::<3>(acc, dy, w, &t),
                        2 => tile::<2>(acc, dy, w, &t),
                        _ => tile::<1>(acc, dy, w, &t),
                    }
                }
                c0 += 32;
            }
            i0 += MR;
        }
    }

    struct Tile {
        k: usize,
        n: usize,
        i0: usize,
        c0: usize,
        m0: __mmask16,
        m1: __mmask16,
        r0: usize,
        g: usize,
    }

    /// # Safety
    ///
    /// The CPU has AVX-512F and FMA; rows `t.i0..t.i0 + R` of `acc` (rows of `t.k`) and of
    /// `dy` (rows of `t.n`, columns `t.r0..t.r0 + t.g`) exist, `w` holds `t.g` rows of `t.k`,
    /// and the masks `t.m0`, `t.m1` enable only columns below `t.k`.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn tile<const R: usize>(acc: &mut [f32], dy: &[f32], w: &[f32], t: &Tile) {
        let pa = acc.as_mut_ptr();
        let (pd, pw) = (dy.as_ptr(), w.as_ptr());
        let mut a0 = [_mm512_setzero_ps(); R];
        let mut a1 = [_mm512_setzero_ps(); R];
        // SAFETY (whole body): offsets stay in the caller's bounds; the column masks
        // keep loads and stores inside row length k.
        unsafe {
            for r in 0..R {
                let o = (t.i0 + r) * t.k + t.c0;
                a0[r] = _mm512_maskz_loadu_ps(t.m0, pa.add(o));
                a1[r] = _mm512_maskz_loadu_ps(t.m1, pa.add(o + 16));
            }
            for p in 0..t.g {
                let wo = p * t.k + t.c0;
                let b0 = _mm512_maskz_loadu_ps(t.m0, pw.add(wo));
                let b1 = _mm512_maskz_loadu_ps(t.m1, pw.add(wo + 16));
                for r in 0..R {
                    let s = _mm512_set1_ps(*pd.add((t.i0 + r) * t.n + t.r0 + p));
                    a0[r] = _mm512_fmadd_ps(s, b0, a0[r]);
                    a1[r] = _mm512_fmadd_ps(s, b1, a1[r]);
                }
            }
            for r in 0..R {
                let o = (t.i0 + r) * t.k + t.c0;
                _mm512_mask_storeu_ps(pa.add(o), t.m0, a0[r]);
                _mm512_mask_storeu_ps(pa.add(o + 16), t.m1, a1[r]);
            }
        }
    }
}

/// out += Σ_j d[j] · rows[j], rows of length `k`.
#[inline]
fn axpy_rows(out: &mut [f32], d: &[f32], rows: &[f32], k: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: FMA and AVX2 are present (checked).
        return unsafe { axpy_rows_fma(out, d, rows, k) };
    }
    axpy_rows_body(out, d, rows, k)
}

/// # Safety
///
/// The CPU has FMA and AVX2; the body is safe code (slices, bounds-checked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn axpy_rows_fma(out: &mut [f32], d: &[f32], rows: &[f32], k: usize) {
    axpy_rows_body(out, d, rows, k)
}

#[inline(always)]
fn axpy_rows_body(out: &mut [f32], d: &[f32], rows: &[f32], k: usize) {
    for (c, o) in out.iter_mut().enumerate() {
        let mut s = *o;
        for (j, dj) in d.iter().enumerate() {
            s = dj.mul_add(rows[j * k + c], s);
        }
        *o = s;
    }
}

#[derive(Clone, Copy)]
struct SyncParts(*mut (Vec<f32>, Vec<f32>, Vec<u8>));
// SAFETY: as `SyncPtr`: each thread takes its own element.
unsafe impl Send for SyncParts {}
unsafe impl Sync for SyncParts {}
impl SyncParts {
    fn get(self) -> *mut (Vec<f32>, Vec<f32>, Vec<u8>) {
        self.0
    }
}

/// A raw pointer that may cross threads; each thread writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: used only to write disjoint output elements from the pool's threads while the
// owning `&mut [f32]` is borrowed by the dispatching call.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Reusable buffers of the matmul, so the hot loop allocates nothing.
#[derive(Default)]
pub struct MatmulScratch {
    act: Vec<u8>,
    paths: Vec<crate::quant::ggml_exact::Path>,
    preps: Vec<ActPrep>,
    /// The f32 path's, one per thread.
    fast: Vec<FastBufs>,
    /// A batch that mixes f32 and exact rows: each kind's rows gathered (inputs, then
    /// outputs) and the exact rows' steps.
    split_x: Vec<f32>,
    split_out: Vec<f32>,
    split_steps: Vec<RowStep>,
}

/// One thread's buffers of [`matmul_f32`]: a block of dequantized weight rows, the same
/// transposed, the block's output tile and a row's bytes.
#[derive(Default)]
struct FastBufs {
    rows: Vec<f32>,
    bt: Vec<f32>,
    acc: Vec<f32>,
    tmp: Vec<u8>,
}

#[derive(Clone, Copy)]
struct SyncFast(*mut FastBufs);
// SAFETY: as `SyncParts`: each thread takes its own element.
unsafe impl Send for SyncFast {}
unsafe impl Sync for SyncFast {}
impl SyncFast {
    fn get(self) -> *mut FastBufs {
        self.0
    }
}

/// Weight rows per block of the f32 path: one 16-column tile of the AVX2 kernel, whose
/// weight strip then stays in L1 while every activation row passes over it (measured on
/// Zen 3 at m = 128: 16 rows ran at 37-38 GMAC/s, 32 at 32-35, 64 at 30-32).
const FAST_NB: usize = 16;
/// Inputs per k-block of the f32 path: a block's strip of weights (FAST_KC × FAST_NB
/// f32, 32 KB) fits L1. Measured flat from 256 to 1024 on Zen 3.
const FAST_KC: usize = 512;

/// With [`Kernels::fast`], rows whose own sequence step has at least this many rows take
/// [`matmul_f32`]; shorter steps (decode, short prompts), where dequantizing every
/// weight to f32 costs more than it saves, keep the exact kernels. Measured on Zen 3
/// (Q4_K and Q6_K, 8960 × 1536 both ways, one thread): the two tie at 8 rows and f32
/// wins from 12 (15-19 GMAC/s against 8-15).
pub const FAST_MIN_STEP: usize = 12;

/// `out (m × n) = x (m × k) · Wᵀ` in f32: each thread dequantizes blocks of its share of
/// W's rows, transposes them and runs the f32 tile kernel ([`gemm_acc`]) over all `m`
/// rows. Every output element takes its `k` FMAs in increasing order from zero whatever
/// the batch, the tile or the thread split, so a row's result depends on that row alone.
pub fn matmul_f32(
    pool: &ThreadPool,
    w: &WeightRef,
    x: &[f32],
    m: usize,
    scratch: &mut MatmulScratch,
    out: &mut [f32],
) {
    let (n, k) = (w.n, w.k);
    assert!(
        x.len() >= m * k && out.len() >= m * n,
        "caller sizes the buffers"
    );
    if m == 0 || n == 0 {
        return;
    }
    let nt = pool.n_threads();
    scratch.fast.resize_with(nt, Default::default);
    for b in scratch.fast.iter_mut() {
        grow_to(&mut b.rows, FAST_NB * k);
        grow_to(&mut b.bt, FAST_NB * k);
        grow_to(&mut b.acc, m * FAST_NB);
    }
    let bufs = SyncFast(scratch.fast.as_mut_ptr());
    let outp = SyncPtr(out.as_mut_ptr());
    pool.run(|t| {
        // SAFETY: thread t alone uses element t of `fast` (sized to nt above).
        let b = unsafe { &mut *bufs.get().add(t) };
        let rows = split_range(n, nt, t, FAST_NB);
        let mut r0 = rows.start;
        while r0 < rows.end {
            let nb = FAST_NB.min(rows.end - r0);
            for j in 0..nb {
                w.dequantize_row(r0 + j, &mut b.tmp, &mut b.rows[j * k..(j + 1) * k]);
            }
            transpose(&b.rows[..nb * k], nb, k, &mut b.bt[..k * nb]);
            let acc = &mut b.acc[..m * nb];
            acc.fill(0.0);
            let mut c0 = 0;
            while c0 < k {
                let g = FAST_KC.min(k - c0);
                panel(acc, m, nb, x, k, c0, g, &b.bt[c0 * nb..(c0 + g) * nb]);
                c0 += g;
            }
            for i in 0..m {
                // SAFETY: columns r0..r0+nb of every row are this thread's alone (rows
                // are split), and i·n + r0 + nb ≤ m·n ≤ out.len().
                let o = unsafe { std::slice::from_raw_parts_mut(outp.get().add(i * n + r0), nb) };
                o.copy_from_slice(&acc[i * nb..(i + 1) * nb]);
            }
            r0 += nb;
        }
    });
}

/// `dst (k × nb) = srcᵀ` for `src` of `nb` rows of `k`: 8 × 8 blocks in AVX2 registers
/// where the CPU has it (a scalar transpose costs as much as the dequantization).
fn transpose(src: &[f32], nb: usize, k: usize, dst: &mut [f32]) {
    assert!(src.len() >= nb * k && dst.len() >= nb * k);
    let (nb8, k8) = (nb / 8 * 8, k / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    let done = std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let done = false;
    if done {
        #[cfg(target_arch = "x86_64")]
        for j0 in (0..nb8).step_by(8) {
            for p0 in (0..k8).step_by(8) {
                // SAFETY: AVX2 is present (checked); rows j0..j0+8 ≤ nb of src at columns
                // p0..p0+8 ≤ k, and rows p0..p0+8 of dst at columns j0..j0+8 ≤ nb, are
                // inside the slices (asserted above).
                unsafe {
                    transpose8_avx2(
                        src.as_ptr().add(j0 * k + p0),
                        k,
                        dst.as_mut_ptr().add(p0 * nb + j0),
                        nb,
                    )
                };
            }
        }
    }
    let (jd, pd) = if done { (nb8, k8) } else { (0, 0) };
    // What the 8 × 8 blocks leave: the last rows, then the last columns.
    for j in jd..nb {
        for p in 0..k {
            dst[p * nb + j] = src[j * k + p];
        }
    }
    for j in 0..jd {
        for p in pd..k {
            dst[p * nb + j] = src[j * k + p];
        }
    }
}

/// Writes the transpose of the 8 × 8 block at `src` (rows `lds` apart) at `dst` (rows
/// `ldd` apart).
///
/// # Safety
///
/// The CPU has AVX2; 8 rows of 8 floats are readable at `src` and writable at `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose8_avx2(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the 8 rows at src and dst are in bounds (the caller's contract).
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * lds)));
        // Pairs of rows interleaved, then quads: s[c] holds columns c and c + 4 of
        // rows 0-3 (and of rows 4-7 for s[c + 4]) in its two halves.
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let s = [
            _mm256_shuffle_ps::<0x44>(t0, t2),
            _mm256_shuffle_ps::<0xee>(t0, t2),
            _mm256_shuffle_ps::<0x44>(t1, t3),
            _mm256_shuffle_ps::<0xee>(t1, t3),
            _mm256_shuffle_ps::<0x44>(t4, t6),
            _mm256_shuffle_ps::<0xee>(t4, t6),
            _mm256_shuffle_ps::<0x44>(t5, t7),
            _mm256_shuffle_ps::<0xee>(t5, t7),
        ];
        for c in 0..4 {
            let lo = _mm256_permute2f128_ps::<0x20>(s[c], s[c + 4]);
            let hi = _mm256_permute2f128_ps::<0x31>(s[c], s[c + 4]);
            _mm256_storeu_ps(dst.add(c * ldd), lo);
            _mm256_storeu_ps(dst.add((c + 4) * ldd), hi);
        }
    }
}

/// The fast kernels' product: rows of steps of at least [`FAST_MIN_STEP`] rows on
/// [`matmul_f32`], the others on the exact kernels, each kind gathered when a batch
/// mixes them.
#[allow(clippy::too_many_arguments)]
fn matmul_fast_steps(
    pool: &ThreadPool,
    kern: Kernels,
    w: &WeightRef,
    x: &[f32],
    m: usize,
    steps: &[RowStep],
    scratch: &mut MatmulScratch,
    out: &mut [f32],
) {
    let (n, k) = (w.n, w.k);
    let fast = |s: &RowStep| s.n >= FAST_MIN_STEP;
    if steps.iter().all(fast) {
        return matmul_f32(pool, w, x, m, scratch, out);
    }
    let (mut xs, mut outs, mut st) = (
        std::mem::take(&mut scratch.split_x),
        std::mem::take(&mut scratch.split_out),
        std::mem::take(&mut scratch.split_steps),
    );
    xs.clear();
    st.clear();
    for (i, _) in steps.iter().enumerate().filter(|(_, s)| fast(s)) {
        xs.extend_from_slice(&x[i * k..(i + 1) * k]);
    }
    let nf = xs.len() / k.max(1);
    for (i, s) in steps.iter().enumerate().filter(|(_, s)| !fast(s)) {
        xs.extend_from_slice(&x[i * k..(i + 1) * k]);
        st.push(*s);
    }
    grow_to(&mut outs, m * n);
    let (xf, xe) = xs.split_at(nf * k);
    let (of, oe) = outs[..m * n].split_at_mut(nf * n);
    matmul_f32(pool, w, xf, nf, scratch, of);
    let exact = kern.with_fast(false);
    matmul(pool, exact, w, xe, m - nf, &st, scratch, oe);
    let (mut f, mut e) = (0, nf);
    for (i, s) in steps.iter().enumerate() {
        let src = if fast(s) { &mut f } else { &mut e };
        out[i * n..(i + 1) * n].copy_from_slice(&outs[*src * n..(*src + 1) * n]);
        *src += 1;
    }
    scratch.split_x = xs;
    scratch.split_out = outs;
    scratch.split_steps = st;
}

/// The activation rows of a matrix product.
pub enum Acts<'a> {
    Rows(&'a [f32]),
    /// Rows made inside the product's parallel section: each thread calls
    /// `make(rows, out)` for its own rows (`out` holds exactly those rows of the buffer)
    /// and quantizes them, so the step that feeds a product (a norm, SwiGLU) needs no
    /// parallel section, or serial pass, of its own. The buffer holds the rows after.
    Make(&'a mut [f32], MakeRows<'a>),
}

pub type MakeRows<'a> = &'a (dyn Fn(std::ops::Range<usize>, &mut [f32]) + Sync);

impl<'a> Acts<'a> {
    /// The rows, made now (split over the pool) by a path that has no section to make
    /// them in.
    fn into_rows(self, pool: &ThreadPool, m: usize, k: usize) -> &'a [f32] {
        match self {
            Acts::Rows(x) => x,
            Acts::Make(x, make) => {
                assert_eq!(x.len(), m * k, "activation shape");
                if m < 2 || pool.n_threads() == 1 {
                    make(0..m, x);
                } else {
                    let xp = SyncPtr(x.as_mut_ptr());
                    let nt = pool.n_threads();
                    pool.run(|t| {
                        let r = split_range(m, nt, t, 1);
                        // SAFETY: the threads' row ranges are disjoint and inside `x`,
                        // whose borrow this call holds.
                        let xs = unsafe {
                            std::slice::from_raw_parts_mut(xp.get().add(r.start * k), r.len() * k)
                        };
                        make(r, xs);
                    });
                }
                x
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Acts::Rows(x) => x.len(),
            Acts::Make(x, _) => x.len(),
        }
    }
}

/// The activations as the threads of one section see them: each makes (if asked) and
/// quantizes its own rows, then a barrier, then all read every row.
#[derive(Clone, Copy)]
struct SectionActs<'a> {
    x: SyncPtr,
    make: Option<MakeRows<'a>>,
    k: usize,
}

impl<'a> SectionActs<'a> {
    fn new(acts: &'a mut Acts, k: usize) -> SectionActs<'a> {
        match acts {
            // Only read through this pointer.
            Acts::Rows(x) => SectionActs {
                x: SyncPtr(x.as_ptr() as *mut f32),
                make: None,
                k,
            },
            Acts::Make(x, make) => SectionActs {
                x: SyncPtr(x.as_mut_ptr()),
                make: Some(*make),
                k,
            },
        }
    }

    /// Makes rows `r` (when asked) and returns them.
    ///
    /// # Safety
    /// The threads of a section pass disjoint ranges inside the buffer, and nobody
    /// reads those rows before the section's barrier.
    unsafe fn rows(&self, r: std::ops::Range<usize>) -> &[f32] {
        let k = self.k;
        // SAFETY: per the contract, these rows belong to this thread until the barrier.
        unsafe {
            if let Some(make) = self.make {
                let xs = std::slice::from_raw_parts_mut(self.x.get().add(r.start * k), r.len() * k);
                make(r.clone(), xs);
            }
            std::slice::from_raw_parts(self.x.get().add(r.start * k), r.len() * k)
        }
    }
}

/// Weight rows per cache block: small enough to stay in L2 across activation rows.
const ROW_BLOCK: usize = 16;

/// `out[i·n + r] = Σ_j x[i·k + j] · W[r, j]` for `m` activation rows.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    pool: &ThreadPool,
    kern: Kernels,
    w: &WeightRef,
    x: &[f32],
    m: usize,
    steps: &[RowStep],
    scratch: &mut MatmulScratch,
    out: &mut [f32],
) {
    matmul_acts(pool, kern, w, Acts::Rows(x), m, steps, scratch, out)
}

/// [`matmul`] of activation rows that may be made in its own parallel section.
#[allow(clippy::too_many_arguments)]
pub fn matmul_acts(
    pool: &ThreadPool,
    kern: Kernels,
    w: &WeightRef,
    acts: Acts,
    m: usize,
    steps: &[RowStep],
    scratch: &mut MatmulScratch,
    out: &mut [f32],
) {
    let (n, k) = (w.n, w.k);
    assert_eq!(acts.len(), m * k, "activation shape");
    assert_eq!(steps.len(), m, "one step per activation row");
    assert_eq!(out.len(), m * n, "output shape");
    if kern.fast() && steps.iter().any(|s| s.n >= FAST_MIN_STEP) {
        let x = acts.into_rows(pool, m, k);
        return matmul_fast_steps(pool, kern, w, x, m, steps, scratch, out);
    }
    if let Some(p) = w.packed
        && kern.isa() == crate::Isa::Avx512Vnni
    {
        return matmul_packed_many(pool, &[p], acts, m, scratch, &mut [out]);
    }
    if let Some(p) = w.kpacked
        && kern.isa() == crate::Isa::Avx512Vnni
    {
        return matmul_kpacked(pool, p, acts, m, steps, scratch, out);
    }
    let x = acts.into_rows(pool, m, k);
    let MatmulScratch {
        act: act_buf,
        paths,
        ..
    } = scratch;
    paths.clear();
    paths.extend(
        steps
            .iter()
            .map(|s| ggml_path_shaped(w.ty, n, k, s.n, s.idx)),
    );
    let paths = &paths[..];
    assert_eq!(out.len(), m * n, "output shape");
    assert!(w.data.len() >= n * w.row_bytes(), "weight data too short");
    let vt = w.ty.vec_dot_type();
    let arb = act_row_bytes(vt, k);
    act_buf.resize(m * arb, 0);
    if m == 1 {
        quantize_act_row(vt, x, act_buf);
    } else {
        let acts = SyncBytes(act_buf.as_mut_ptr());
        let nt = pool.n_threads();
        pool.run(|t| {
            for i in split_range(m, nt, t, 1) {
                // SAFETY: rows are disjoint between threads; the buffer has m·arb bytes.
                let dst = unsafe { std::slice::from_raw_parts_mut(acts.get().add(i * arb), arb) };
                quantize_act_row(vt, &x[i * k..(i + 1) * k], dst);
            }
        });
    }
    let act = &act_buf[..];
    let rb = w.row_bytes();
    let outp = SyncPtr(out.as_mut_ptr());
    let nt = pool.n_threads();
    pool.run(|t| {
        let rows = split_range(n, nt, t, ROW_BLOCK);
        // Decode: one pass over this thread's rows. Batches: blocks of rows that stay in
        // cache while every activation row passes over them.
        let block = if m == 1 { rows.len().max(1) } else { ROW_BLOCK };
        let mut r0 = rows.start;
        while r0 < rows.end {
            let r1 = (r0 + block).min(rows.end);
            for i in 0..m {
                let a = &act[i * arb..(i + 1) * arb];
                // SAFETY: (i, r) pairs are disjoint between threads (rows are split), and
                // i·n + r1 ≤ m·n = out.len().
                let o =
                    unsafe { std::slice::from_raw_parts_mut(outp.get().add(i * n + r0), r1 - r0) };
                kern.dot_rows(paths[i], w.ty, k, &w.data[r0 * rb..r1 * rb], a, o);
            }
            r0 = r1;
        }
    });
}

#[derive(Clone, Copy)]
struct SyncPreps(*mut ActPrep);
// SAFETY: as `SyncPtr`: each thread touches its own elements.
unsafe impl Send for SyncPreps {}
unsafe impl Sync for SyncPreps {}
impl SyncPreps {
    fn get(self) -> *mut ActPrep {
        self.0
    }
}

/// The AVX-512 path over lanes16 weights, for several matrices of one type and row
/// length over the same activations (Q, K and V; gate and up). Every row's arithmetic
/// is ggml's vec_dot order (or, for Q4_0 with a multiple of 8 rows, the repacked order
/// llama.cpp uses), whatever the batch, so no per-row path is needed. One parallel
/// section: each thread makes, quantizes and preps its share of the activation rows,
/// then, after a barrier, multiplies its share of every matrix's row groups by all.
fn matmul_packed_many(
    pool: &ThreadPool,
    ws: &[&Packed],
    mut acts: Acts,
    m: usize,
    scratch: &mut MatmulScratch,
    outs: &mut [&mut [f32]],
) {
    let (ty, k) = (ws[0].ty, ws[0].k);
    assert!(ws.iter().all(|w| w.ty == ty && w.k == k));
    let vt = ty.vec_dot_type();
    let arb = act_row_bytes(vt, k);
    let nb = k / 32;
    scratch.act.resize(m * arb, 0);
    if scratch.preps.len() < m {
        scratch.preps.resize_with(m, ActPrep::default);
    }
    let ap = SyncBytes(scratch.act.as_mut_ptr());
    let pp = SyncPreps(scratch.preps.as_mut_ptr());
    let sa = SectionActs::new(&mut acts, k);
    // The full groups of every matrix, numbered consecutively.
    let fulls: Vec<usize> = ws.iter().map(|w| w.n / GROUP).collect();
    let total: usize = fulls.iter().sum();
    let outps: Vec<SyncPtr> = outs.iter_mut().map(|o| SyncPtr(o.as_mut_ptr())).collect();
    let nt = pool.n_threads();
    pool.run(|t| {
        let mine = split_range(m, nt, t, 1);
        // SAFETY: the threads' row ranges are disjoint, and nobody reads rows, their
        // quantized bytes or their preps before the barrier below.
        let x = unsafe { sa.rows(mine.clone()) };
        for (j, i) in mine.enumerate() {
            // SAFETY: as above; the buffers hold m rows.
            let a = unsafe { std::slice::from_raw_parts_mut(ap.get().add(i * arb), arb) };
            quantize_act_row(vt, &x[j * k..(j + 1) * k], a);
            // SAFETY: row i's prep is this thread's alone (rows are split), and preps has m.
            unsafe { &mut *pp.get().add(i) }.build(ty, a, nb);
        }
        pool.barrier();
        // SAFETY: every row was written before the barrier; from here on all only read.
        let (act, preps) = unsafe {
            (
                std::slice::from_raw_parts(ap.get(), m * arb),
                std::slice::from_raw_parts(pp.get(), m),
            )
        };
        let mut tmp = [0f32; 4 * GROUP];
        let mine = split_range(total, nt, t, 1);
        let mut base = 0;
        for (wi, w) in ws.iter().enumerate() {
            let (lo, hi) = (mine.start.max(base), mine.end.min(base + fulls[wi]));
            if lo < hi {
                let block_sum = w.ty == GgmlType::Q4_0 && w.n.is_multiple_of(8);
                // SAFETY: AVX-512 VNNI is present (callers check the kernels' ISA); each
                // packed matrix holds its groups of `nb` tiles; activations and preps cover
                // m rows; threads write disjoint groups of 16 outputs per row.
                unsafe {
                    crate::packed::x86::matmul_groups(
                        w.ty,
                        block_sum,
                        w.data.as_ptr(),
                        nb,
                        lo - base..hi - base,
                        0,
                        act.as_ptr(),
                        arb,
                        preps,
                        outps[wi].get(),
                        w.n,
                        &mut tmp,
                    );
                }
            }
            base += fulls[wi];
        }
    });
    let (act, preps) = (&scratch.act[..], &scratch.preps[..m]);
    // Last, partial groups: into a buffer, keeping the real rows.
    for (wi, w) in ws.iter().enumerate() {
        let (groups, full) = (w.groups(), fulls[wi]);
        if groups > full {
            let n = w.n;
            let block_sum = w.ty == GgmlType::Q4_0 && n.is_multiple_of(8);
            let mut buf = vec![0f32; m * GROUP];
            // SAFETY: as above, one group, written into `buf` (m rows of 16).
            unsafe {
                crate::packed::x86::matmul_groups(
                    w.ty,
                    block_sum,
                    w.data.as_ptr(),
                    nb,
                    full..groups,
                    full,
                    act.as_ptr(),
                    arb,
                    preps,
                    buf.as_mut_ptr(),
                    GROUP,
                    &mut [0f32; 4 * GROUP],
                );
            }
            for i in 0..m {
                for r in full * GROUP..n {
                    outs[wi][i * n + r] = buf[i * GROUP + (r - full * GROUP)];
                }
            }
        }
    }
}

/// `outs[j] = x · ws[j]ᵀ` for matrices sharing their input. Uses one quantization and
/// one parallel section when all are lanes16 matrices of one type (AVX-512), otherwise
/// one [`matmul`] each.
pub fn matmul_many(
    pool: &ThreadPool,
    kern: Kernels,
    ws: &[WeightRef],
    x: &[f32],
    m: usize,
    steps: &[RowStep],
    scratch: &mut MatmulScratch,
    outs: &mut [&mut [f32]],
) {
    matmul_many_acts(pool, kern, ws, Acts::Rows(x), m, steps, scratch, outs)
}

/// [`matmul_many`] of activation rows that may be made in its parallel section.
#[allow(clippy::too_many_arguments)]
pub fn matmul_many_acts(
    pool: &ThreadPool,
    kern: Kernels,
    ws: &[WeightRef],
    acts: Acts,
    m: usize,
    steps: &[RowStep],
    scratch: &mut MatmulScratch,
    outs: &mut [&mut [f32]],
) {
    assert_eq!(ws.len(), outs.len());
    let packed: Option<Vec<&Packed>> = ws.iter().map(|w| w.packed).collect();
    if let Some(ps) = packed
        && kern.isa() == crate::Isa::Avx512Vnni
        && ps.iter().all(|p| p.ty == ps[0].ty && p.k == ps[0].k)
    {
        for (w, o) in ws.iter().zip(outs.iter()) {
            assert_eq!(acts.len(), m * w.k);
            assert_eq!(o.len(), m * w.n);
        }
        return matmul_packed_many(pool, &ps, acts, m, scratch, outs);
    }
    match acts {
        Acts::Rows(x) => {
            for (w, o) in ws.iter().zip(outs.iter_mut()) {
                matmul(pool, kern, w, x, m, steps, scratch, o);
            }
        }
        // The first product makes the rows in its section; the others read them.
        Acts::Make(x, make) => {
            let (w0, o0) = (&ws[0], &mut *outs[0]);
            matmul_acts(
                pool,
                kern,
                w0,
                Acts::Make(&mut *x, make),
                m,
                steps,
                scratch,
                o0,
            );
            for (w, o) in ws.iter().zip(outs.iter_mut()).skip(1) {
                matmul(pool, kern, w, x, m, steps, scratch, o);
            }
        }
    }
}

/// The AVX-512 path over kq16 weights, each activation row on llama.cpp's kernel for it.
fn matmul_kpacked(
    pool: &ThreadPool,
    w: &KPacked,
    mut acts: Acts,
    m: usize,
    steps: &[RowStep],
    scratch: &mut MatmulScratch,
    out: &mut [f32],
) {
    let (n, k) = (w.n, w.k);
    let arb = act_row_bytes(GgmlType::Q8K, k);
    let nb = w.blocks();
    let MatmulScratch { act, .. } = scratch;
    act.resize(m * arb, 0);
    let ap = SyncBytes(act.as_mut_ptr());
    let sa = SectionActs::new(&mut acts, k);
    use crate::quant::ggml_exact::Path as P;
    let modes: Vec<KMode> = steps
        .iter()
        .map(|s| match ggml_path_shaped(w.ty, n, k, s.n, s.idx) {
            P::VecDot => KMode::VecDot,
            P::Tiled => KMode::Tiled,
            P::RepackGemv => KMode::Repack { group: 256 },
            P::RepackGemm => KMode::Repack { group: 64 },
            p => unreachable!("{p:?} for {}", w.ty),
        })
        .collect();
    let groups = w.groups();
    let full = n / crate::kpacked::GROUP;
    let outp = SyncPtr(out.as_mut_ptr());
    let nt = pool.n_threads();
    pool.run(|t| {
        // As in `matmul_packed_many`: this thread's activation rows, then a barrier.
        let mine = split_range(m, nt, t, 1);
        // SAFETY: the threads' row ranges are disjoint; nobody reads them before the
        // barrier.
        let x = unsafe { sa.rows(mine.clone()) };
        for (j, i) in mine.enumerate() {
            // SAFETY: as above; the buffer holds m rows.
            let a = unsafe { std::slice::from_raw_parts_mut(ap.get().add(i * arb), arb) };
            quantize_act_row(GgmlType::Q8K, &x[j * k..(j + 1) * k], a);
        }
        pool.barrier();
        // SAFETY: all rows were written before the barrier; from here on all only read.
        let act = unsafe { std::slice::from_raw_parts(ap.get(), m * arb) };
        let gr = split_range(full, nt, t, 1);
        // SAFETY: AVX-512 VNNI is present (checked by the caller via the kernels' ISA);
        // the packed matrix and activations cover every group and row; threads write
        // disjoint groups.
        unsafe {
            crate::kpacked::x86::matmul_groups(
                w.ty,
                &modes,
                w.data.as_ptr(),
                nb,
                gr,
                0,
                act.as_ptr(),
                arb,
                outp.get(),
                n,
            )
        };
    });
    let act = &act[..];
    if groups > full {
        let g = crate::kpacked::GROUP;
        let mut buf = vec![0f32; m * g];
        // SAFETY: as above, for the last partial group into `buf`.
        unsafe {
            crate::kpacked::x86::matmul_groups(
                w.ty,
                &modes,
                w.data.as_ptr(),
                nb,
                full..groups,
                full,
                act.as_ptr(),
                arb,
                buf.as_mut_ptr(),
                g,
            )
        };
        for i in 0..m {
            for r in full * g..n {
                out[i * n + r] = buf[i * g + (r - full * g)];
            }
        }
    }
}

#[derive(Clone, Copy)]
struct SyncBytes(*mut u8);
// SAFETY: as `SyncPtr`, for the activation rows quantized in parallel.
unsafe impl Send for SyncBytes {}
unsafe impl Sync for SyncBytes {}
impl SyncBytes {
    fn get(self) -> *mut u8 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;

    /// Random weight bytes with sane f16 scales, for formats whose blocks start with
    /// an f16 scale (and, for Q4_1, an f16 minimum).
    fn weights(ty: GgmlType, n: usize, k: usize, seed: usize) -> Vec<u8> {
        let mut data = vec![0u8; n * ty.row_bytes(k).unwrap()];
        for (i, b) in data.iter_mut().enumerate() {
            *b = ((i * 7 + seed * 31) % 251) as u8;
        }
        let bs = ty.type_size();
        let nhalf = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q4K) {
            2
        } else {
            1
        };
        for (bi, blk) in data.chunks_exact_mut(bs).enumerate() {
            for h in 0..nhalf {
                let v = 0.01 + (bi % 5) as f32 * 0.003 - h as f32 * 0.02;
                blk[2 * h..2 * h + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
        }
        data
    }

    #[test]
    fn backward_panel_kernel_matches_its_scalar_twin_bitwise() {
        let mut s = 7u64;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        };
        for (m, k, g, n, r0) in [
            (1, 1, 1, 1, 0),
            (3, 17, 5, 9, 2),
            (8, 32, 64, 70, 6),
            (13, 576, 64, 200, 100),
            (9, 47, 3, 3, 0),
            (17, 100, 33, 40, 7),
        ] {
            let dy = rnd(m * n);
            let w = rnd(g * k);
            let acc0 = rnd(m * k);
            let (mut a, mut b) = (acc0.clone(), acc0.clone());
            panel(&mut a, m, k, &dy, n, r0, g, &w);
            panel_rows(&mut b, m, k, &dy, n, r0, g, &w);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&a) == bits(&b), "m={m} k={k} g={g}");
            // The AVX2 kernel too, wherever it can run (panel picks AVX-512 first).
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                let mut c = acc0.clone();
                // SAFETY: AVX2 and FMA checked; the sizes are the ones panel_rows takes.
                unsafe { super::panel_avx2::panel(&mut c, m, k, &dy, n, r0, g, &w) };
                assert!(bits(&c) == bits(&b), "AVX2: m={m} k={k} g={g}");
            } else {
                eprintln!("NOTE: no AVX2+FMA here: the AVX2 panel kernel is not tested");
            }
        }
    }

    #[test]
    fn backward_input_matches_dense_transpose() {
        for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
            let (n, k) = (44, 128);
            let data = weights(ty, n, k, 3);
            let packed = crate::packed::Packed::pack(ty, n, k, &data);
            check_backward(ty, n, k, 5, &data, Some(&packed), None);
        }
        // A K-quant, repacked for its AVX-512 kernels.
        let (ty, n, k) = (GgmlType::Q4K, 48, 256);
        let data = weights(ty, n, k, 5);
        let kp = crate::kpacked::KPacked::pack(ty, n, k, &data);
        check_backward(ty, n, k, 3, &data, None, Some(&kp));
    }

    /// dx = dy·W against the dequantized matrix transposed, in f64, with the matrix in
    /// its plain and its repacked layout and several thread counts.
    fn check_backward(
        ty: GgmlType,
        n: usize,
        k: usize,
        m: usize,
        data: &[u8],
        packed: Option<&crate::packed::Packed>,
        kpacked: Option<&crate::kpacked::KPacked>,
    ) {
        let dy: Vec<f32> = (0..m * n)
            .map(|i| ((i * 29 % 23) as f32 - 11.0) * 0.05)
            .collect();
        let rb = ty.row_bytes(k).unwrap();
        let mut wf = vec![0f32; n * k];
        for r in 0..n {
            dequantize_row(ty, &data[r * rb..(r + 1) * rb], &mut wf[r * k..(r + 1) * k]);
        }
        let mut want = vec![0f64; m * k];
        for i in 0..m {
            for r in 0..n {
                for j in 0..k {
                    want[i * k + j] += dy[i * n + r] as f64 * wf[r * k + j] as f64;
                }
            }
        }
        for (threads, repacked) in [(1, false), (2, false), (3, true), (2, true)] {
            let w = WeightRef {
                ty,
                n,
                k,
                data: if repacked { &[] } else { data },
                packed: packed.filter(|_| repacked),
                kpacked: kpacked.filter(|_| repacked),
            };
            let pool = ThreadPool::new(threads);
            let mut dx = vec![f32::NAN; m * k];
            backward_input_f32(&pool, &w, &dy, m, &mut GradScratch::default(), &mut dx);
            for (a, b) in dx.iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{ty:?}, {threads} threads, repacked {repacked}: {a} vs {b}"
                );
            }
        }
    }

    /// The bf16 path: against float64 of the same bf16-rounded inputs, across a slab
    /// boundary (n > AMX_SLAB), with padded m and k, for several thread counts and a
    /// reused scratch.
    #[test]
    fn backward_input_bf16_matches_its_bf16_reference() {
        for (ty, m) in [
            (GgmlType::Q4_1, 45),
            (GgmlType::Q8_0, 64),
            (GgmlType::Q4_1, 96),
        ] {
            check_backward_bf16(ty, m);
        }
    }

    fn check_backward_bf16(ty: GgmlType, m: usize) {
        let (n, k) = (AMX_SLAB + 76, 96);
        if !backward_input_uses_bf16(m, n) {
            crate::skipped(&format!(
                "no bf16 kernel on this CPU (neither AMX nor AVX512-BF16): \
                 backward_input_bf16_matches_its_bf16_reference did not run ({ty:?}, m {m})"
            ));
            return;
        }
        let data = weights(ty, n, k, 9);
        let packed = Packed::pack(ty, n, k, &data);
        let rb = ty.row_bytes(k).unwrap();
        let dy: Vec<f32> = (0..m * n)
            .map(|i| ((i * 29 % 23) as f32 - 11.0) * 0.0371)
            .collect();
        let r = |x: f32| f64::from(crate::amx::bf16_to_f32(crate::amx::bf16(x)));
        let mut wf = vec![0f32; n * k];
        for row in 0..n {
            dequantize_row(
                ty,
                &data[row * rb..(row + 1) * rb],
                &mut wf[row * k..(row + 1) * k],
            );
        }
        let (mut want, mut mag) = (vec![0f64; m * k], vec![0f64; m * k]);
        for i in 0..m {
            for row in 0..n {
                let d = r(dy[i * n + row]);
                for j in 0..k {
                    let t = d * r(wf[row * k + j]);
                    want[i * k + j] += t;
                    mag[i * k + j] += t.abs();
                }
            }
        }
        let mut scratch = GradScratch::default();
        for (threads, repacked) in [(1, false), (2, true), (3, false), (2, false), (1, true)] {
            let w = WeightRef {
                ty,
                n,
                k,
                data: if repacked { &[] } else { &data },
                packed: repacked.then_some(&packed),
                kpacked: None,
            };
            let pool = ThreadPool::new(threads);
            let mut dx = vec![f32::NAN; m * k];
            matmul_backward_input(&pool, &w, &dy, m, &mut scratch, &mut dx);
            for (i, (a, (b, g))) in dx.iter().zip(want.iter().zip(&mag)).enumerate() {
                assert!(
                    (*a as f64 - b).abs() <= 1e-6 * g + 1e-30,
                    "{ty} m {m}, {threads} threads, repacked {repacked} at {i}: {a} vs {b}"
                );
            }
        }
    }

    /// The sum of products (in bf16 one product over every matrix's slabs) against the
    /// products one by one and their sum, with a slab boundary and repacked matrices.
    #[test]
    fn backward_input_sum_equals_the_sum_of_products() {
        let (k, m) = (96, 40);
        let shapes = [
            (GgmlType::Q4_1, 1100),
            (GgmlType::Q8_0, 64),
            (GgmlType::Q4_1, 200),
        ];
        let data: Vec<Vec<u8>> = shapes.iter().map(|&(ty, n)| weights(ty, n, k, n)).collect();
        let packed: Vec<Packed> = shapes
            .iter()
            .zip(&data)
            .map(|(&(ty, n), d)| Packed::pack(ty, n, k, d))
            .collect();
        let dys: Vec<Vec<f32>> = shapes
            .iter()
            .map(|&(_, n)| {
                (0..m * n)
                    .map(|i| ((i * 17 % 29) as f32 - 14.0) * 0.02)
                    .collect()
            })
            .collect();
        let parts: Vec<(WeightRef, &[f32])> = shapes
            .iter()
            .zip(&packed)
            .zip(&dys)
            .map(|((&(ty, n), p), dy)| {
                let w = WeightRef {
                    ty,
                    n,
                    k,
                    data: &[],
                    packed: Some(p),
                    kpacked: None,
                };
                (w, &dy[..])
            })
            .collect();
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            let mut scratch = GradScratch::default();
            let mut want = vec![0f32; m * k];
            let mut one = vec![0f32; m * k];
            for (w, dy) in &parts {
                matmul_backward_input(&pool, w, dy, m, &mut scratch, &mut one);
                for (a, b) in want.iter_mut().zip(&one) {
                    *a += *b;
                }
            }
            let (mut got, mut tmp) = (vec![f32::NAN; m * k], vec![0f32; m * k]);
            matmul_backward_input_sum(&pool, &parts, m, &mut scratch, &mut tmp, &mut got);
            let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-3 * scale,
                    "{threads} threads at {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn rows_made_in_the_section_equal_rows_made_before() {
        use crate::Isa;
        // A norm-like row function: elementwise on the source, so each row is known.
        let f = |i: usize, c: usize| ((i * 31 + c * 7) % 23) as f32 * 0.13 - 1.4;
        let cases = [
            (GgmlType::Q4_1, 48, 256),
            (GgmlType::Q8_0, 40, 256),
            (GgmlType::Q4K, 32, 512),
            (GgmlType::Q6K, 32, 512),
        ];
        for (ty, n, k) in cases {
            let (d0, d1) = (weights(ty, n, k, 1), weights(ty, n, k, 2));
            let pack = |d: &[u8]| crate::packed::packable(ty).then(|| Packed::pack(ty, n, k, d));
            let kpack = |d: &[u8]| crate::kpacked::packable(ty).then(|| KPacked::pack(ty, n, k, d));
            let (p0, p1, kp0, kp1) = (pack(&d0), pack(&d1), kpack(&d0), kpack(&d1));
            for isa in Isa::ALL {
                let Some(kern) = Kernels::new(isa) else {
                    crate::skipped(&format!(
                        "no {isa:?} on this CPU: matmul::tests did not test its kernels ({ty:?})"
                    ));
                    continue;
                };
                let avx512 = isa == Isa::Avx512Vnni;
                let ws = [(&d0, &p0, &kp0), (&d1, &p1, &kp1)].map(|(d, p, kp)| WeightRef {
                    ty,
                    n,
                    k,
                    data: d,
                    packed: p.as_ref().filter(|_| avx512),
                    kpacked: kp.as_ref().filter(|_| avx512),
                });
                for m in [1usize, 3, 8, 13] {
                    let x: Vec<f32> = (0..m * k).map(|j| f(j / k, j % k)).collect();
                    let steps: Vec<RowStep> = RowStep::all(m).collect();
                    for threads in [1, 2] {
                        let pool = ThreadPool::new(threads);
                        let mut sc = MatmulScratch::default();
                        let (mut a0, mut a1) = (vec![0f32; m * n], vec![0f32; m * n]);
                        matmul_many(
                            &pool,
                            kern,
                            &ws,
                            &x,
                            m,
                            &steps,
                            &mut sc,
                            &mut [&mut a0, &mut a1],
                        );
                        let make = |rs: std::ops::Range<usize>, out: &mut [f32]| {
                            assert_eq!(out.len(), rs.len() * k);
                            for (j, i) in rs.enumerate() {
                                for c in 0..k {
                                    out[j * k + c] = f(i, c);
                                }
                            }
                        };
                        let mut buf = vec![f32::NAN; m * k];
                        let (mut b0, mut b1) = (vec![0f32; m * n], vec![0f32; m * n]);
                        let outs: &mut [&mut [f32]] = &mut [&mut b0, &mut b1];
                        matmul_many_acts(
                            &pool,
                            kern,
                            &ws,
                            Acts::Make(&mut buf, &make),
                            m,
                            &steps,
                            &mut sc,
                            outs,
                        );
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        let what = format!("{ty} {isa:?} m={m} threads={threads}");
                        assert!(bits(&buf) == bits(&x), "made rows, {what}");
                        assert!(bits(&b0) == bits(&a0), "first product, {what}");
                        assert!(bits(&b1) == bits(&a1), "second product, {what}");
                        let mut buf = vec![f32::NAN; m * k];
                        let mut c0 = vec![0f32; m * n];
                        matmul_acts(
                            &pool,
                            kern,
                            &ws[0],
                            Acts::Make(&mut buf, &make),
                            m,
                            &steps,
                            &mut sc,
                            &mut c0,
                        );
                        assert!(bits(&c0) == bits(&a0), "one product, {what}");
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_matches_row_dots() {
        let (n, k, m) = (40, 256, 3);
        let ty = GgmlType::Q8_0;
        let mut data = vec![0u8; n * ty.row_bytes(k).unwrap()];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        for blk in data.chunks_exact_mut(34) {
            blk[0..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        }
        let w = WeightRef {
            ty,
            n,
            k,
            data: &data,
            packed: None,
            kpacked: None,
        };
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1)
            .collect();
        for threads in 1..=3 {
            let pool = ThreadPool::new(threads);
            let mut out = vec![0f32; m * n];
            let steps: Vec<RowStep> = RowStep::all(m).collect();
            matmul(
                &pool,
                Kernels::best(),
                &w,
                &x,
                m,
                &steps,
                &mut MatmulScratch::default(),
                &mut out,
            );
            for i in 0..m {
                for r in 0..n {
                    let mut wf = vec![0f32; k];
                    dequantize_row(ty, w.row(r), &mut wf);
                    let want: f32 = wf
                        .iter()
                        .zip(&x[i * k..(i + 1) * k])
                        .map(|(a, b)| a * b)
                        .sum();
                    assert!((out[i * n + r] - want).abs() < 0.05 * want.abs().max(1.0));
                }
            }
        }
    }
}
