//! The forward pass of the Llama family for a batch of tokens from one or more sequences.

use crate::config::ModelConfig;
use crate::kv::KvCache;
use crate::lora::{LoraAdapter, Proj};
use crate::weights::{LayerWeights, ModelWeights, Weight};
use brise_kernels::attn::{self, DotOrder, block16};
use brise_kernels::matmul::{Acts, MatmulScratch, RowStep, matmul, matmul_acts, matmul_many_acts};
use brise_kernels::ops;
use brise_kernels::pool::ThreadPool;
use brise_kernels::quant::Kernels;

pub use crate::backward::{BackwardState, LoraGrads, Tape};

/// One sequence's part of a batch: its cache, the new tokens (appended at the cache's
/// current length), whether to return logits for every new token or only the last, and
/// the LoRA adapter its projections use, if any.
pub struct SeqBatch<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub logits: LogitsWanted,
    /// Must fit the model (`LoraAdapter::fits`); callers check.
    pub lora: Option<&'a LoraAdapter>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    Last,
    All,
    /// The rows from this index of the sequence's new tokens on (training: the
    /// completion's, skipping the prompt's output matrix product).
    From(usize),
}

/// A debugging hook: (tensor name, layer, values).
pub type TraceFn = Box<dyn FnMut(&str, usize, &[f32]) + Send>;

/// Reusable activations of the forward pass; grows to the largest batch seen.
#[derive(Default)]
pub struct ForwardState {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    tmp: Vec<f32>,
    scores: Vec<f32>,
    probs: Vec<f32>,
    qh16: Vec<u8>,
    /// Per thread, the scores then probabilities of each query head of a KV group, and
    /// the heads' queries rounded to f16.
    probs_h: Vec<f32>,
    q_h: Vec<f32>,
    rope: Vec<f32>,
    sel: Vec<f32>,
    mm: MatmulScratch,
    /// Logits of the rows that asked for them, in batch order, `n_vocab` each.
    pub logits: Vec<f32>,
    /// Debugging: called with (name, layer, rows × width values) at named points of
    /// the graph, named as llama.cpp names its tensors.
    pub trace: Option<TraceFn>,
}

fn trace(
    st: &mut ForwardState,
    name: &str,
    layer: usize,
    which: fn(&ForwardState) -> &[f32],
    n: usize,
) {
    if let Some(mut t) = st.trace.take() {
        t(name, layer, &which(st)[..n]);
        st.trace = Some(t);
    }
}

/// Appends `src` to the tape buffer `dst` (rounded through f16 when `f16`, as the cache
/// holds keys and values), the pool's threads each copying a range: a taped step copies
/// tens of MB.
fn tape_extend(pool: &ThreadPool, dst: &mut Vec<f32>, src: &[f32], f16: bool) {
    let (old, n) = (dst.len(), src.len());
    dst.reserve(n);
    let p = SyncMut(dst.as_mut_ptr());
    let nt = pool.n_threads();
    pool.run(|t| {
        let r = brise_kernels::pool::split_range(n, nt, t, 16);
        // SAFETY: dst has room for old + n values (reserved above); this thread alone
        // writes values old + r of it, which are initialized here before set_len.
        let out = unsafe { std::slice::from_raw_parts_mut(p.get().add(old + r.start), r.len()) };
        let src = &src[r];
        if f16 {
            let mut buf = [0u8; 512];
            for (o, s) in out.chunks_mut(256).zip(src.chunks(256)) {
                ops::f32_to_f16_bytes(s, &mut buf[..2 * s.len()]);
                ops::f16_bytes_to_f32(&buf[..2 * s.len()], o);
            }
        } else {
            out.copy_from_slice(src);
        }
    });
    // SAFETY: every value old..old + n was written above (the ranges cover 0..n).
    unsafe { dst.set_len(old + n) };
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// Per-row facts of the batch.
struct Row {
    seq: usize,
    pos: usize,
    /// Tokens its sequence contributes to this batch: llama.cpp's kernels differ
    /// between single-token and multi-token steps, and brise mirrors them per sequence.
    step: usize,
    /// KV cells llama.cpp would attend over in this step.
    n_kv: usize,
    /// Position of its sequence's first token in this step.
    first: usize,
}

/// Where the attention writes a taped forward's probabilities: the buffer, each row's
/// offset, and one head's size.
type TapeProbs<'a> = (SyncMut<f32>, (&'a [usize], usize));

struct SyncMut<T>(*mut T);
// By hand: the derive would require `T: Copy`, and only the pointer is copied.
impl<T> Clone for SyncMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SyncMut<T> {}
// SAFETY: shared between the pool's threads, each writing disjoint elements while the
// owning borrow is held by the dispatching call.
unsafe impl<T> Send for SyncMut<T> {}
unsafe impl<T> Sync for SyncMut<T> {}
impl<T> SyncMut<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

pub struct Forward<'m> {
    pub cfg: &'m ModelConfig,
    pub w: &'m ModelWeights,
    pub kern: Kernels,
}

impl Forward<'_> {
    #[allow(clippy::too_many_arguments)]
    fn mm(
        &self,
        pool: &ThreadPool,
        st_mm: &mut MatmulScratch,
        w: &Weight,
        x: &[f32],
        rows: usize,
        steps: &[RowStep],
        out: &mut [f32],
    ) {
        matmul(
            pool,
            self.kern,
            &w.as_ref(),
            &x[..rows * w.k],
            rows,
            steps,
            st_mm,
            &mut out[..rows * w.n],
        );
    }

    /// Adds each adapted sequence's `scale · B (A x)` to its rows of projection `p`'s
    /// output `y` (input `x`). Rows of sequences without an adapter are not touched, so
    /// they stay bit-identical to a run without LoRA; each row is computed by one thread
    /// in a fixed order, so results do not depend on the thread count.
    #[allow(clippy::too_many_arguments)]
    fn lora(
        &self,
        pool: &ThreadPool,
        spans: &[(std::ops::Range<usize>, &LoraAdapter)],
        li: usize,
        p: Proj,
        x: &[f32],
        y: &mut [f32],
        t_out: Option<&mut Vec<f32>>,
    ) {
        if spans.is_empty() {
            return;
        }
        let (k, n) = p.dims(self.cfg);
        let isa = self.kern.isa();
        let rank = spans.iter().map(|(_, a)| a.rank()).max().unwrap_or(0);
        let total: usize = spans.iter().map(|(r, _)| r.len()).sum();
        let end = spans.iter().map(|(r, _)| r.end).max().unwrap_or(0);
        assert!(x.len() >= end * k && y.len() >= end * n);
        let yp = SyncMut(y.as_mut_ptr());
        // A taped forward keeps each adapted row's `t = scale · A x` (rank values, at the
        // row's batch index), which the backward needs again.
        let tp = t_out.map(|v| {
            v.resize(end * rank, 0.0);
            SyncMut(v.as_mut_ptr())
        });
        // Thread t takes the adapted rows total·t/nt.. of the spans laid end to end.
        let work = |t: usize, nt: usize| {
            let (lo, hi) = (total * t / nt, total * (t + 1) / nt);
            let mut tbuf = vec![0f32; (hi - lo) * rank];
            let mut idx = 0;
            for (range, ad) in spans {
                let (s0, s1) = (idx.max(lo), (idx + range.len()).min(hi));
                if s1 > s0 {
                    let i0 = range.start + s0 - idx;
                    let rows = s1 - s0;
                    // SAFETY: rows i0..i0 + rows of y (in bounds, asserted above) are
                    // written by this thread alone while `y`'s borrow is held by this call.
                    let yr =
                        unsafe { std::slice::from_raw_parts_mut(yp.get().add(i0 * n), rows * n) };
                    let xr = &x[i0 * k..(i0 + rows) * k];
                    ad.apply_rows(isa, li, p, xr, yr, rows, &mut tbuf);
                    if let Some(tp) = tp {
                        let w = rows * ad.rank();
                        // SAFETY: rows i0..i0 + rows of the tape's t (end · rank values,
                        // sized above; one adapter, so its rank is `rank`) are this
                        // thread's alone.
                        let dst =
                            unsafe { std::slice::from_raw_parts_mut(tp.get().add(i0 * rank), w) };
                        dst.copy_from_slice(&tbuf[..w]);
                    }
                }
                idx += range.len();
            }
        };
        // Decoding steps are small: waking the pool would cost more than the work.
        if total * rank * (k + n) < 1 << 20 {
            work(0, 1);
        } else {
            let nt = pool.n_threads();
            pool.run(|t| work(t, nt));
        }
    }

    /// Runs the batch, appends its keys and values to the caches, and leaves logits in
    /// `st.logits` for the rows that asked for them. Callers check room in each cache.
    pub fn run(&self, pool: &ThreadPool, st: &mut ForwardState, batch: &mut [SeqBatch]) {
        self.run_taped(pool, st, batch, None)
    }

    /// [`Forward::run`], recording in `tape` what [`Forward::backward`] needs. A taped
    /// batch starts every sequence at an empty cache, and its adapted sequences all use
    /// the one adapter being trained.
    pub fn run_taped(
        &self,
        pool: &ThreadPool,
        st: &mut ForwardState,
        batch: &mut [SeqBatch],
        mut tape: Option<&mut Tape>,
    ) {
        let cfg = self.cfg;
        let (e, hd) = (cfg.n_embd, cfg.head_dim);
        let (nh, nkv) = (cfg.n_head, cfg.n_head_kv);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let mut rows = Vec::new();
        let mut want = Vec::new();
        let mut tokens = Vec::new();
        for (s, sb) in batch.iter().enumerate() {
            assert!(
                sb.cache.len() + sb.tokens.len() <= sb.cache.n_ctx(),
                "caller checks room"
            );
            for (i, &t) in sb.tokens.iter().enumerate() {
                let n_kv = attn::llama_n_kv(sb.cache.len() + sb.tokens.len(), sb.cache.n_ctx());
                rows.push(Row {
                    seq: s,
                    pos: sb.cache.len() + i,
                    step: sb.tokens.len(),
                    n_kv,
                    first: sb.cache.len(),
                });
                tokens.push(t);
                want.push(match sb.logits {
                    LogitsWanted::All => true,
                    LogitsWanted::Last => i + 1 == sb.tokens.len(),
                    LogitsWanted::None => false,
                    LogitsWanted::From(f) => i >= f,
                });
            }
        }
        let r = rows.len();
        // Rows of each adapted sequence (a sequence's rows are contiguous).
        let mut spans = Vec::new();
        let mut start = 0;
        for sb in batch.iter() {
            let end = start + sb.tokens.len();
            if let Some(ad) = sb.lora
                && end > start
            {
                assert!(
                    ad.fits(cfg),
                    "callers check that the adapter fits the model"
                );
                spans.push((start..end, ad));
            }
            start = end;
        }
        let steps: Vec<RowStep> = rows
            .iter()
            .map(|row| RowStep {
                n: row.step,
                idx: row.pos - row.first,
            })
            .collect();
        if let Some(t) = tape.as_deref_mut() {
            let lo: Vec<usize> = rows
                .iter()
                .map(|row| match cfg.sliding_window {
                    Some(w) => (row.pos + 1).saturating_sub(w),
                    None => 0,
                })
                .collect();
            t.begin(cfg, batch, &lo, &want);
        }
        if r == 0 {
            st.logits.clear();
            return;
        }
        grow(&mut st.x, r * e);
        grow(&mut st.xn, r * e);
        grow(&mut st.q, r * qd);
        grow(&mut st.k, r * kvd);
        grow(&mut st.v, r * kvd);
        grow(&mut st.attn, r * qd);
        grow(&mut st.gate, r * cfg.n_ff);
        grow(&mut st.up, r * cfg.n_ff);
        grow(&mut st.tmp, r * e.max(cfg.n_ff));
        grow(&mut st.rope, r * cfg.n_rot);

        for (i, &t) in tokens.iter().enumerate() {
            self.w
                .tok_embd
                .dequantize_row_into(t as usize, &mut st.x[i * e..(i + 1) * e]);
        }
        for (i, row) in rows.iter().enumerate() {
            ops::rope_cache(
                row.pos,
                cfg.n_rot,
                cfg.rope_base,
                cfg.rope_freq_scale,
                &mut st.rope[i * cfg.n_rot..(i + 1) * cfg.n_rot],
            );
            if let Some(ff) = &self.w.rope_freqs {
                // Llama 3.1 divides each θ_i by a frequency factor.
                let c = &mut st.rope[i * cfg.n_rot..(i + 1) * cfg.n_rot];
                let theta_scale = cfg.rope_base.powf(-2.0 / cfg.n_rot as f32);
                let mut theta = row.pos as f32;
                for j in 0..cfg.n_rot / 2 {
                    let t = cfg.rope_freq_scale * (theta / ff[j]);
                    c[2 * j] = t.cos();
                    c[2 * j + 1] = t.sin();
                    theta *= theta_scale;
                }
            }
        }

        let scale = 1.0 / (hd as f32).sqrt();
        // At least head_dim: the attention reuses a thread's probability row for its query.
        let max_ctx = batch
            .iter()
            .map(|b| b.cache.n_ctx())
            .max()
            .unwrap_or(0)
            .max(hd);
        let nt = pool.n_threads();
        grow(&mut st.scores, nt * max_ctx);
        grow(&mut st.probs, nt * max_ctx);
        grow(&mut st.probs_h, nt * (cfg.n_head / cfg.n_head_kv) * max_ctx);
        grow(&mut st.q_h, nt * cfg.n_head / cfg.n_head_kv * hd);
        if st.qh16.len() < nt * (hd + max_ctx) * 2 {
            st.qh16.resize(nt * (hd + max_ctx) * 2, 0);
        }

        if let Some(t) = tape.as_deref_mut() {
            t.rope.extend_from_slice(&st.rope[..r * cfg.n_rot]);
        }
        // Decoding (one row per sequence, so each cache has one writer): the biases,
        // RoPE and the cache writes run in the attention's parallel section. Adapters,
        // tapes and traces need the values in between, so they keep the serial steps.
        let fuse_rope = tape.is_none()
            && spans.is_empty()
            && st.trace.is_none()
            && rows.iter().all(|row| row.step == 1);
        for (li, lw) in self.w.layers.iter().enumerate() {
            let mut lt = tape.as_deref_mut().map(|t| t.layer(li));
            if let Some(lt) = lt.as_deref_mut() {
                tape_extend(pool, &mut lt.x_in, &st.x[..r * e], false);
            }
            // Q, K and V share their input: one norm and quantization, in the products'
            // one parallel section.
            let (x, eps) = (&st.x, cfg.rms_eps);
            let norm = |rs: std::ops::Range<usize>, out: &mut [f32]| {
                ops::rms_norm_rows(&x[rs.start * e..rs.end * e], &lw.attn_norm, eps, out)
            };
            matmul_many_acts(
                pool,
                self.kern,
                &[lw.wq.as_ref(), lw.wk.as_ref(), lw.wv.as_ref()],
                Acts::Make(&mut st.xn[..r * e], &norm),
                r,
                &steps,
                &mut st.mm,
                &mut [
                    &mut st.q[..r * qd],
                    &mut st.k[..r * kvd],
                    &mut st.v[..r * kvd],
                ],
            );
            trace(st, "attn_norm", li, |s| &s.xn, r * e);
            if !fuse_rope {
                for i in 0..r {
                    self.add_qkv_bias(lw, &mut st.q, &mut st.k, &mut st.v, i, 0..nkv);
                }
                // PEFT adds the adapter after the base layer's bias.
                self.lora(
                    pool,
                    &spans,
                    li,
                    Proj::Q,
                    &st.xn,
                    &mut st.q,
                    lt.as_deref_mut().map(|l| &mut l.lora_t[Proj::Q as usize]),
                );
                self.lora(
                    pool,
                    &spans,
                    li,
                    Proj::K,
                    &st.xn,
                    &mut st.k,
                    lt.as_deref_mut().map(|l| &mut l.lora_t[Proj::K as usize]),
                );
                self.lora(
                    pool,
                    &spans,
                    li,
                    Proj::V,
                    &st.xn,
                    &mut st.v,
                    lt.as_deref_mut().map(|l| &mut l.lora_t[Proj::V as usize]),
                );
                for (i, row) in rows.iter().enumerate() {
                    let rc = &st.rope[i * cfg.n_rot..(i + 1) * cfg.n_rot];
                    let cache = &mut *batch[row.seq].cache;
                    let (q, k, v) = (&mut st.q, &mut st.k, &st.v);
                    self.rope_and_store(q, k, v, i, row.pos, li, rc, cache, 0..nkv);
                }
            }
            trace(st, "Qcur", li, |s| &s.q, r * qd);
            trace(st, "Kcur", li, |s| &s.k, r * kvd);
            if let Some(lt) = lt.as_deref_mut() {
                tape_extend(pool, &mut lt.q, &st.q[..r * qd], false);
                // As the cache holds them: the attention saw f16 keys and values.
                tape_extend(pool, &mut lt.k, &st.k[..r * kvd], true);
                tape_extend(pool, &mut lt.v, &st.v[..r * kvd], true);
            }
            let probs_out = lt.map(|lt| {
                lt.probs.resize(lt.n_probs, 0.0);
                SyncMut(lt.probs.as_mut_ptr())
            });
            let tape_probs = tape.as_deref().map(|t| (t.p_off.as_slice(), t.p_total));
            self.attention(
                pool,
                st,
                batch,
                &rows,
                li,
                scale,
                max_ctx,
                probs_out.zip(tape_probs),
                fuse_rope.then_some(lw),
            );
            trace(st, "kqv_out", li, |s| &s.attn, r * qd);
            let mut lt = tape.as_deref_mut().map(|t| t.layer(li));
            if let Some(lt) = lt.as_deref_mut() {
                tape_extend(pool, &mut lt.attn, &st.attn[..r * qd], false);
            }
            self.mm(pool, &mut st.mm, &lw.wo, &st.attn, r, &steps, &mut st.tmp);
            self.lora(
                pool,
                &spans,
                li,
                Proj::O,
                &st.attn,
                &mut st.tmp,
                lt.as_deref_mut().map(|l| &mut l.lora_t[Proj::O as usize]),
            );
            ops::add_assign(&mut st.x[..r * e], &st.tmp[..r * e]);
            trace(st, "ffn_inp", li, |s| &s.x, r * e);
            if let Some(lt) = lt.as_deref_mut() {
                tape_extend(pool, &mut lt.x_mid, &st.x[..r * e], false);
            }

            let (x, eps) = (&st.x, cfg.rms_eps);
            let norm = |rs: std::ops::Range<usize>, out: &mut [f32]| {
                ops::rms_norm_rows(&x[rs.start * e..rs.end * e], &lw.ffn_norm, eps, out)
            };
            matmul_many_acts(
                pool,
                self.kern,
                &[lw.w_gate.as_ref(), lw.w_up.as_ref()],
                Acts::Make(&mut st.xn[..r * e], &norm),
                r,
                &steps,
                &mut st.mm,
                &mut [&mut st.gate[..r * cfg.n_ff], &mut st.up[..r * cfg.n_ff]],
            );
            self.lora(
                pool,
                &spans,
                li,
                Proj::Gate,
                &st.xn,
                &mut st.gate,
                lt.as_deref_mut()
                    .map(|l| &mut l.lora_t[Proj::Gate as usize]),
            );
            self.lora(
                pool,
                &spans,
                li,
                Proj::Up,
                &st.xn,
                &mut st.up,
                lt.as_deref_mut().map(|l| &mut l.lora_t[Proj::Up as usize]),
            );
            let nf = cfg.n_ff;
            if let Some(lt) = lt {
                tape_extend(pool, &mut lt.gate, &st.gate[..r * nf], false);
                tape_extend(pool, &mut lt.up, &st.up[..r * nf], false);
            }
            // SwiGLU into `gate`, made in the down product's section; its output goes
            // to `xn`, free since the gate and up products read it.
            std::mem::swap(&mut st.tmp, &mut st.gate);
            let (g, u) = (&st.tmp, &st.up);
            let swiglu = |rs: std::ops::Range<usize>, out: &mut [f32]| {
                let span = rs.start * nf..rs.end * nf;
                ops::swiglu(&g[span.clone()], &u[span], out)
            };
            matmul_acts(
                pool,
                self.kern,
                &lw.w_down.as_ref(),
                Acts::Make(&mut st.gate[..r * nf], &swiglu),
                r,
                &steps,
                &mut st.mm,
                &mut st.xn[..r * e],
            );
            trace(st, "ffn_swiglu", li, |s| &s.gate, r * nf);
            let t_down = tape
                .as_deref_mut()
                .map(|t| &mut t.layer(li).lora_t[Proj::Down as usize]);
            self.lora(pool, &spans, li, Proj::Down, &st.gate, &mut st.xn, t_down);
            trace(st, "ffn_out", li, |s| &s.xn, r * e);
            ops::add_assign(&mut st.x[..r * e], &st.xn[..r * e]);
            trace(st, "l_out", li, |s| &s.x, r * e);
        }
        for sb in batch.iter_mut() {
            sb.cache.advance(sb.tokens.len());
        }
        if let Some(t) = tape {
            tape_extend(pool, &mut t.x_out, &st.x[..r * e], false);
        }

        let n_out = want.iter().filter(|w| **w).count();
        // llama.cpp multiplies only the rows that want logits: each sequence's outputs form
        // the step for the output matrix.
        let mut out_steps = Vec::with_capacity(n_out);
        for (s, sb) in batch.iter().enumerate() {
            let k = rows
                .iter()
                .zip(&want)
                .filter(|(row, w)| row.seq == s && **w)
                .count();
            out_steps.extend(RowStep::all(k));
            let _ = sb;
        }
        grow(&mut st.sel, n_out * e);
        let mut j = 0;
        for (i, w) in want.iter().enumerate() {
            if *w {
                ops::rms_norm(
                    &st.x[i * e..(i + 1) * e],
                    &self.w.output_norm,
                    cfg.rms_eps,
                    &mut st.sel[j * e..(j + 1) * e],
                );
                j += 1;
            }
        }
        st.logits.resize(n_out * cfg.n_vocab, 0.0);
        if n_out > 0 {
            let out = &self.w.output;
            matmul(
                pool,
                self.kern,
                &out.as_ref(),
                &st.sel[..n_out * e],
                n_out,
                &out_steps,
                &mut st.mm,
                &mut st.logits,
            );
        }
    }

    /// (head size, Q row width, K/V row width, query heads per KV head).
    fn head_dims(&self) -> (usize, usize, usize, usize) {
        let c = self.cfg;
        let hd = c.head_dim;
        (hd, c.n_head * hd, c.n_head_kv * hd, c.n_head / c.n_head_kv)
    }

    /// Adds Q, K and V's biases (Qwen2 has them) to row `i`'s heads of the KV heads
    /// `kvh` and their query heads.
    #[allow(clippy::too_many_arguments)]
    fn add_qkv_bias(
        &self,
        lw: &LayerWeights,
        q: &mut [f32],
        k: &mut [f32],
        v: &mut [f32],
        i: usize,
        kvh: std::ops::Range<usize>,
    ) {
        let (hd, qd, kvd, g) = self.head_dims();
        let (qs, ks) = (
            kvh.start * g * hd..kvh.end * g * hd,
            kvh.start * hd..kvh.end * hd,
        );
        if let Some(b) = &lw.bq {
            ops::add_assign(&mut q[i * qd..(i + 1) * qd][qs.clone()], &b[qs]);
        }
        if let Some(b) = &lw.bk {
            ops::add_assign(&mut k[i * kvd..(i + 1) * kvd][ks.clone()], &b[ks.clone()]);
        }
        if let Some(b) = &lw.bv {
            ops::add_assign(&mut v[i * kvd..(i + 1) * kvd][ks.clone()], &b[ks]);
        }
    }

    /// RoPE on row `i`'s KV heads `kvh` and their query heads (cos/sin `rc`), and those
    /// keys and values into `cache` at `pos`.
    #[allow(clippy::too_many_arguments)]
    fn rope_and_store(
        &self,
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        i: usize,
        pos: usize,
        li: usize,
        rc: &[f32],
        cache: &mut KvCache,
        kvh: std::ops::Range<usize>,
    ) {
        let cfg = self.cfg;
        let (hd, qd, kvd, g) = self.head_dims();
        for h in kvh.start * g..kvh.end * g {
            let qh = &mut q[i * qd + h * hd..i * qd + (h + 1) * hd];
            ops::rope_apply(cfg.rope_style, qh, cfg.n_rot, rc);
        }
        for h in kvh {
            let kh = &mut k[i * kvd + h * hd..i * kvd + (h + 1) * hd];
            ops::rope_apply(cfg.rope_style, kh, cfg.n_rot, rc);
            cache.set_k(li, h, pos, kh);
            cache.set_v(li, h, pos, &v[i * kvd + h * hd..i * kvd + (h + 1) * hd]);
        }
    }

    /// Causal (and sliding-window) attention of every row and head over its sequence's
    /// cache, in llama.cpp's arithmetic (see `brise_kernels::attn`). With `fused`
    /// (decoding rows, one per sequence), first each thread adds the biases, applies RoPE
    /// and stores keys and values for its rows ([`Forward::rope_and_store`]), and a
    /// barrier separates that from the attention.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        pool: &ThreadPool,
        st: &mut ForwardState,
        batch: &mut [SeqBatch],
        rows: &[Row],
        li: usize,
        scale: f32,
        max_ctx: usize,
        // The tape's probabilities: its buffer, each row's offset, and one head's size.
        tape_probs: Option<TapeProbs>,
        fused: Option<&LayerWeights>,
    ) {
        let cfg = self.cfg;
        let hd = cfg.head_dim;
        let (nh, nkv) = (cfg.n_head, cfg.n_head_kv);
        let qd = nh * hd;
        let group = nh / nkv;
        // One work item is a row and a KV head with all its query heads: the keys and
        // values are read from memory once, by one core, and reused from its cache.
        // With fewer items than that keeps the threads busy (one sequence's decode),
        // items are single heads.
        let per = if rows.len() * nkv >= 4 * pool.n_threads() {
            group
        } else {
            1
        };
        let work = rows.len() * nh / per;
        let r = rows.len();
        let kvd = nkv * hd;
        if fused.is_some() {
            assert!(rows.iter().all(|row| row.step == 1), "one row per sequence");
            assert!(st.q.len() >= r * qd && st.k.len() >= r * kvd && st.v.len() >= r * kvd);
            assert!(st.rope.len() >= r * cfg.n_rot);
        }
        let (qp, kp, vp) = (
            SyncMut(st.q.as_mut_ptr()),
            SyncMut(st.k.as_mut_ptr()),
            SyncMut(st.v.as_mut_ptr()),
        );
        let rope = &st.rope;
        let bp = SyncMut(batch.as_mut_ptr());
        let attn = SyncMut(st.attn.as_mut_ptr());
        let scores = SyncMut(st.scores.as_mut_ptr());
        let probs = SyncMut(st.probs.as_mut_ptr());
        let qh16 = SyncMut(st.qh16.as_mut_ptr());
        let probs_h = SyncMut(st.probs_h.as_mut_ptr());
        let q_h = SyncMut(st.q_h.as_mut_ptr());
        let nt = pool.n_threads();
        pool.run(|t| {
            // SAFETY: as for the buffers below: this thread's slices (sized by the caller).
            let (ph, qh) = unsafe {
                (
                    std::slice::from_raw_parts_mut(
                        probs_h.get().add(t * group * max_ctx),
                        group * max_ctx,
                    ),
                    std::slice::from_raw_parts_mut(q_h.get().add(t * group * hd), group * hd),
                )
            };
            // SAFETY: each thread uses its own slice of the score, probability and q16
            // buffers (sized by the caller) and writes disjoint (row, head) outputs.
            let sc =
                unsafe { std::slice::from_raw_parts_mut(scores.get().add(t * max_ctx), max_ctx) };
            let pr =
                unsafe { std::slice::from_raw_parts_mut(probs.get().add(t * max_ctx), max_ctx) };
            let q16 = unsafe {
                std::slice::from_raw_parts_mut(
                    qh16.get().add(t * (hd + max_ctx) * 2),
                    (hd + max_ctx) * 2,
                )
            };
            let (q16, p16) = q16.split_at_mut(hd * 2);
            // Items of whole KV groups do their own heads' step just before their
            // attention (a decoding row reads only its own sequence's cache); single
            // heads need every head of the row done first.
            let prep = |i: usize, kvh: std::ops::Range<usize>| {
                let lw = fused.expect("fused");
                // SAFETY: these heads of row i's q, k and v, and their cells of its
                // sequence's cache (no other row has that sequence), are written by this
                // thread alone, and read by nobody before (the item itself, or everyone
                // after the barrier). Sizes asserted above.
                // Row i alone (as row 0 of one-row slices): other threads hold theirs.
                let (q, k, v, cache) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(qp.get().add(i * qd), qd),
                        std::slice::from_raw_parts_mut(kp.get().add(i * kvd), kvd),
                        std::slice::from_raw_parts_mut(vp.get().add(i * kvd), kvd),
                        &mut *(*bp.get().add(rows[i].seq)).cache,
                    )
                };
                self.add_qkv_bias(lw, q, k, v, 0, kvh.clone());
                let rc = &rope[i * cfg.n_rot..(i + 1) * cfg.n_rot];
                self.rope_and_store(q, k, v, 0, rows[i].pos, li, rc, cache, kvh);
            };
            if fused.is_some() && per == 1 {
                for i in brise_kernels::pool::split_range(r, nt, t, 1) {
                    prep(i, 0..nkv);
                }
                pool.barrier();
            }
            // Interleaved: later rows attend to more positions, so contiguous ranges
            // would leave one thread with most of the work.
            for wi in (t..work).step_by(nt) {
                let (i, h0) = (wi / (nh / per), wi % (nh / per) * per);
                let kvh = h0 / group;
                let row = &rows[i];
                if fused.is_some() && per > 1 {
                    prep(i, kvh..kvh + 1);
                }
                // SAFETY: from here on this row's q and its sequence's cache are only read
                // (prepared by this item above, or by everyone before the barrier); the
                // batch outlives this call.
                let (q, cache) = unsafe {
                    (
                        std::slice::from_raw_parts(qp.get().add(i * qd) as *const f32, qd),
                        &*(*bp.get().add(row.seq)).cache,
                    )
                };
                let lo = match cfg.sliding_window {
                    Some(w) => (row.pos + 1).saturating_sub(w),
                    None => 0,
                };
                let hi = row.pos + 1;
                // Decode reads each sequence's keys and values once per layer, in an order
                // the hardware prefetcher does not follow: ask for all of it up front.
                if row.step == 1 && per > 1 {
                    for kb in lo / 16..hi.div_ceil(16) {
                        ops::prefetch(cache.k_block(li, kvh, kb));
                    }
                    ops::prefetch(&cache.v_rows(li, kvh)[lo * hd * 2..hi * hd * 2]);
                }
                // A whole KV group in tinyBLAS order: the heads' scores come from one
                // pass over the key blocks, and their value sums from one pass over the
                // value rows after the loop (each converted from f16 once for all heads).
                let together = per > 1
                    && row.step >= 2
                    && row.n_kv.is_multiple_of(16)
                    && hd.is_multiple_of(16);
                if together {
                    for (hh, qf) in qh.chunks_mut(hd).take(per).enumerate() {
                        let h = h0 + hh;
                        ops::f32_to_f16_bytes(&q[h * hd..(h + 1) * hd], q16);
                        ops::f16_bytes_to_f32(q16, qf);
                    }
                    let qs: Vec<&[f32]> = qh.chunks(hd).take(per).collect();
                    let mut s16 = vec![[0f32; 16]; per];
                    for kb in lo / 16..hi.div_ceil(16) {
                        block16::kq_heads(cache.k_block(li, kvh, kb), &qs, hd, &mut s16);
                        for (hh, s) in s16.iter().enumerate() {
                            for (j, v) in s.iter().enumerate() {
                                let pos = kb * 16 + j;
                                if pos >= lo && pos < hi {
                                    ph[hh * max_ctx + pos] = v * scale;
                                }
                            }
                        }
                    }
                }
                for h in h0..h0 + per {
                    let kq_order =
                        if row.step >= 2 && hd.is_multiple_of(16) && row.n_kv.is_multiple_of(4) {
                            DotOrder::Tiny
                        } else {
                            DotOrder::Vec
                        };
                    let kqv_order =
                        if row.step >= 2 && row.n_kv.is_multiple_of(16) && hd.is_multiple_of(4) {
                            DotOrder::Tiny
                        } else {
                            DotOrder::Vec
                        };
                    let sc = if together {
                        // This head's scores (its probabilities replace them below).
                        &mut ph[(h - h0) * max_ctx..(h - h0 + 1) * max_ctx]
                    } else {
                        &mut *sc
                    };
                    if !together {
                        ops::f32_to_f16_bytes(&q[h * hd..(h + 1) * hd], q16);
                        if block16::supported(kq_order, hd) {
                            let qf = &mut pr[..hd];
                            ops::f16_bytes_to_f32(q16, qf);
                            let mut s16 = [0f32; 16];
                            for kb in lo / 16..hi.div_ceil(16) {
                                let blk = cache.k_block(li, kvh, kb);
                                block16::kq(kq_order, blk, qf, hd, &mut s16);
                                for (j, v) in s16.iter().enumerate() {
                                    let pos = kb * 16 + j;
                                    if pos >= lo && pos < hi {
                                        sc[pos] = v * scale;
                                    }
                                }
                            }
                        } else {
                            let mut krow = vec![0u8; hd * 2];
                            for pos in lo..hi {
                                cache.k_row(li, kvh, pos, &mut krow);
                                sc[pos] = attn::dot_f16(kq_order, &krow, q16, 0, hd, hd) * scale;
                            }
                        }
                    }
                    attn::softmax_masked(sc, lo, hi, row.n_kv, pr);
                    if let Some((buf, (p_off, total))) = tape_probs {
                        // SAFETY: (row i, head h) owns these hi − lo values of the tape's
                        // buffer (sized to nh · total by the caller); no other work item
                        // writes them.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                buf.get().add(h * total + p_off[i]),
                                hi - lo,
                            )
                        };
                        dst.copy_from_slice(&pr[lo..hi]);
                    }
                    ops::f32_to_f16_bytes(&pr[lo..hi], &mut p16[lo * 2..hi * 2]);
                    // SAFETY: this (row, head) output belongs to this thread alone.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(attn.get().add(i * qd + h * hd), hd)
                    };
                    let vr = cache.v_rows(li, kvh);
                    if together {
                        let p = &mut ph[(h - h0) * max_ctx..(h - h0 + 1) * max_ctx];
                        ops::f16_bytes_to_f32(&p16[lo * 2..hi * 2], &mut p[lo..hi]);
                    } else if hd.is_multiple_of(16) {
                        // The probabilities as f32 values of their f16 rounding.
                        ops::f16_bytes_to_f32(&p16[lo * 2..hi * 2], &mut pr[lo..hi]);
                        let mut o16 = [0f32; 16];
                        for d0 in (0..hd).step_by(16) {
                            block16::kqv(kqv_order, vr, hd, d0, pr, lo, hi, row.n_kv, &mut o16);
                            out[d0..d0 + 16].copy_from_slice(&o16);
                        }
                    } else {
                        for (d, o) in out.iter_mut().enumerate() {
                            let col: Vec<u8> = (0..hi)
                                .flat_map(|j| [vr[(j * hd + d) * 2], vr[(j * hd + d) * 2 + 1]])
                                .collect();
                            *o = attn::dot_f16(kqv_order, &col, p16, lo, hi, row.n_kv.max(hi));
                        }
                    }
                }
                if together {
                    let ps: Vec<&[f32]> = ph.chunks(max_ctx).take(per).collect();
                    let mut o16 = vec![[0f32; 16]; per];
                    let vr = cache.v_rows(li, kvh);
                    for d0 in (0..hd).step_by(16) {
                        block16::kqv_heads(vr, hd, d0, &ps, lo, hi, row.n_kv, &mut o16);
                        for (hh, o) in o16.iter().enumerate() {
                            let at = i * qd + (h0 + hh) * hd + d0;
                            // SAFETY: this (row, head) output belongs to this thread alone.
                            let out =
                                unsafe { std::slice::from_raw_parts_mut(attn.get().add(at), 16) };
                            out.copy_from_slice(o);
                        }
                    }
                }
            }
        });
    }
}
