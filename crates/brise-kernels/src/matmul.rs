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
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "activation shape");
    assert_eq!(steps.len(), m, "one step per activation row");
    assert_eq!(out.len(), m * n, "output shape");
    if let Some(p) = w.packed
        && kern.isa() == crate::Isa::Avx512Vnni
    {
        return matmul_packed(pool, p, x, m, scratch, out);
    }
    if let Some(p) = w.kpacked
        && kern.isa() == crate::Isa::Avx512Vnni
    {
        return matmul_kpacked(pool, p, x, m, steps, scratch, out);
    }
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

/// Quantizes the activation rows for lanes16 weights of type `ty` (in parallel when
/// there are many) and builds their per-block prep.
fn prepare_packed_acts(
    pool: &ThreadPool,
    ty: GgmlType,
    k: usize,
    x: &[f32],
    m: usize,
    scratch: &mut MatmulScratch,
) -> usize {
    let vt = ty.vec_dot_type();
    let arb = act_row_bytes(vt, k);
    let nb = k / 32;
    let MatmulScratch { act, preps, .. } = scratch;
    act.resize(m * arb, 0);
    if preps.len() < m {
        preps.resize_with(m, ActPrep::default);
    }
    if m < 8 {
        for i in 0..m {
            quantize_act_row(vt, &x[i * k..(i + 1) * k], &mut act[i * arb..(i + 1) * arb]);
            preps[i].build(ty, &act[i * arb..(i + 1) * arb], nb);
        }
    } else {
        let ap = SyncBytes(act.as_mut_ptr());
        let pp = SyncPreps(preps.as_mut_ptr());
        let nt = pool.n_threads();
        pool.run(|t| {
            for i in split_range(m, nt, t, 1) {
                // SAFETY: each thread owns activation rows (and their preps) i of its range;
                // the buffers hold m rows.
                let a = unsafe { std::slice::from_raw_parts_mut(ap.get().add(i * arb), arb) };
                quantize_act_row(vt, &x[i * k..(i + 1) * k], a);
                unsafe { &mut *pp.get().add(i) }.build(ty, a, nb);
            }
        });
    }
    arb
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

/// The AVX-512 path over lanes16 weights. Every row's arithmetic is ggml's vec_dot order
/// (or, for Q4_0 with a multiple of 8 rows, the repacked order llama.cpp uses), whatever
/// the batch, so no per-row path is needed.
fn matmul_packed(
    pool: &ThreadPool,
    w: &Packed,
    x: &[f32],
    m: usize,
    scratch: &mut MatmulScratch,
    out: &mut [f32],
) {
    let mut outs = [out];
    matmul_packed_many(pool, &[w], x, m, scratch, &mut outs);
}

/// Several lanes16 matrices of one type and row length over the same activations (Q, K
/// and V; gate and up): the activations are quantized once and one parallel section
/// covers all the matrices' row groups.
fn matmul_packed_many(
    pool: &ThreadPool,
    ws: &[&Packed],
    x: &[f32],
    m: usize,
    scratch: &mut MatmulScratch,
    outs: &mut [&mut [f32]],
) {
    let (ty, k) = (ws[0].ty, ws[0].k);
    assert!(ws.iter().all(|w| w.ty == ty && w.k == k));
    let arb = prepare_packed_acts(pool, ty, k, x, m, scratch);
    let nb = k / 32;
    let (act, preps) = (&scratch.act[..], &scratch.preps[..m]);
    // The full groups of every matrix, numbered consecutively.
    let fulls: Vec<usize> = ws.iter().map(|w| w.n / GROUP).collect();
    let total: usize = fulls.iter().sum();
    let outps: Vec<SyncPtr> = outs.iter_mut().map(|o| SyncPtr(o.as_mut_ptr())).collect();
    let nt = pool.n_threads();
    pool.run(|t| {
        let mut tmp = [0f32; 2 * GROUP];
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
                    &mut [0f32; 2 * GROUP],
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
    assert_eq!(ws.len(), outs.len());
    let packed: Option<Vec<&Packed>> = ws.iter().map(|w| w.packed).collect();
    if let Some(ps) = packed
        && kern.isa() == crate::Isa::Avx512Vnni
        && ps.iter().all(|p| p.ty == ps[0].ty && p.k == ps[0].k)
    {
        for (w, o) in ws.iter().zip(outs.iter()) {
            assert_eq!(x.len(), m * w.k);
            assert_eq!(o.len(), m * w.n);
        }
        return matmul_packed_many(pool, &ps, x, m, scratch, outs);
    }
    for (w, o) in ws.iter().zip(outs.iter_mut()) {
        matmul(pool, kern, w, x, m, steps, scratch, o);
    }
}

/// The AVX-512 path over kq16 weights, each activation row on llama.cpp's kernel for it.
fn matmul_kpacked(
    pool: &ThreadPool,
    w: &KPacked,
    x: &[f32],
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
    for i in 0..m {
        quantize_act_row(
            GgmlType::Q8K,
            &x[i * k..(i + 1) * k],
            &mut act[i * arb..(i + 1) * arb],
        );
    }
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
    let act = &act[..];
    let nt = pool.n_threads();
    pool.run(|t| {
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
