//! The backward pass of the one forward ([`Forward::run_taped`]), for LoRA training.
//!
//! The forward records a [`Tape`]: per layer, the residual stream entering the layer and
//! entering the FFN, the queries and the f16-rounded keys and values (as the KV cache
//! holds them), the attention probabilities, the attention output, and the gate and up
//! activations. [`Forward::backward`] then walks the layers in reverse and produces the
//! gradient of every LoRA matrix. The base stays frozen and quantized: the input
//! gradients through the base projections come from `matmul_backward_input`, which
//! dequantizes W a block of rows at a time. The norms' inputs are kept and their outputs
//! recomputed, which costs a few row operations and saves two activations per layer.
//!
//! The gradient is that of the function the forward computed, up to the roundings the
//! forward makes on the way (activations quantized for the integer kernels, K/V and
//! probabilities rounded to f16), whose derivatives are taken as the identity.

use crate::config::ModelConfig;
use crate::forward::{Forward, SeqBatch};
use crate::lora::{LoraAdapter, LoraMatrix, Proj};
use crate::weights::Weight;
use brise_kernels::attn::{self, HeadRows};
use brise_kernels::lora;
use brise_kernels::matmul::{GradScratch, matmul_backward_input, matmul_backward_input_sum};
use brise_kernels::ops;
use brise_kernels::pool::{ThreadPool, split_range};

/// What one layer's backward needs, `rows ×` width each, in batch row order.
#[derive(Default)]
pub(crate) struct LayerTape {
    pub(crate) x_in: Vec<f32>,
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    /// Head-major: head `h`'s probabilities of row `i` at `h · p_total + p_off[i]`.
    pub(crate) probs: Vec<f32>,
    pub(crate) n_probs: usize,
    pub(crate) attn: Vec<f32>,
    pub(crate) x_mid: Vec<f32>,
    pub(crate) gate: Vec<f32>,
    pub(crate) up: Vec<f32>,
    /// Per projection, each adapted row's `t = scale · A x` (rank values).
    pub(crate) lora_t: [Vec<f32>; 7],
}

/// The activations of one taped forward (see the module's documentation). Reused across
/// steps: buffers keep their capacity.
#[derive(Default)]
pub struct Tape {
    /// Per row: first attended position (positions are row offsets in the sequence).
    pub(crate) lo: Vec<usize>,
    /// Per sequence: its first row and whether its rows used the adapter.
    pub(crate) seqs: Vec<(usize, usize, bool)>,
    pub(crate) want: Vec<bool>,
    pub(crate) p_off: Vec<usize>,
    pub(crate) p_total: usize,
    pub(crate) rope: Vec<f32>,
    pub(crate) layers: Vec<LayerTape>,
    pub(crate) x_out: Vec<f32>,
    pub(crate) adapter: Option<u64>,
}

impl Tape {
    pub fn new() -> Tape {
        Tape::default()
    }

    /// Rows of the recorded batch.
    pub fn rows(&self) -> usize {
        self.lo.len()
    }

    /// Rows whose logits the forward returned (so `dlogits` has this many rows).
    pub fn n_out(&self) -> usize {
        self.want.iter().filter(|w| **w).count()
    }

    pub(crate) fn begin(
        &mut self,
        cfg: &ModelConfig,
        batch: &[SeqBatch],
        lo: &[usize],
        want: &[bool],
    ) {
        self.lo.clear();
        self.lo.extend_from_slice(lo);
        self.want.clear();
        self.want.extend_from_slice(want);
        self.seqs.clear();
        self.adapter = None;
        let mut start = 0;
        for sb in batch {
            assert!(
                sb.cache.is_empty(),
                "a taped batch starts every sequence at an empty cache"
            );
            if let Some(a) = sb.lora {
                assert!(
                    self.adapter.is_none_or(|id| id == a.id()),
                    "a taped batch trains one adapter"
                );
                self.adapter = Some(a.id());
            }
            self.seqs
                .push((start, start + sb.tokens.len(), sb.lora.is_some()));
            start += sb.tokens.len();
        }
        self.p_off.clear();
        let mut total = 0;
        for (i, &l) in lo.iter().enumerate() {
            let (s0, _, _) = self.seqs[self.seq_of(i)];
            self.p_off.push(total);
            total += i - s0 + 1 - l;
        }
        self.p_total = total;
        self.rope.clear();
        self.x_out.clear();
        self.layers.resize_with(cfg.n_layer, Default::default);
        for lt in &mut self.layers {
            lt.x_in.clear();
            lt.q.clear();
            lt.k.clear();
            lt.v.clear();
            lt.probs.clear();
            lt.n_probs = cfg.n_head * total;
            lt.attn.clear();
            lt.x_mid.clear();
            lt.gate.clear();
            lt.up.clear();
            for t in &mut lt.lora_t {
                t.clear();
            }
        }
    }

    fn seq_of(&self, row: usize) -> usize {
        self.seqs
            .iter()
            .position(|&(a, b, _)| row >= a && row < b)
            .expect("row in a sequence")
    }

    pub(crate) fn layer(&mut self, li: usize) -> &mut LayerTape {
        &mut self.layers[li]
    }
}

pub type GradPair = (Vec<f32>, Vec<f32>);

/// Gradients of one adapter's matrices, in its compute layout: `da` is `r × k` like A,
/// `dbt` is `r × n` like the stored Bᵀ.
pub struct LoraGrads {
    /// `layers[l][p as usize]`: (dA, dBᵀ) of each matrix the adapter has.
    pub layers: Vec<[Option<GradPair>; 7]>,
}

impl LoraGrads {
    /// Zero gradients shaped like `ad`'s matrices.
    pub fn zeros_like(ad: &LoraAdapter, n_layer: usize) -> LoraGrads {
        let layers = (0..n_layer)
            .map(|l| {
                Proj::ALL.map(|p| {
                    ad.matrix(l, p)
                        .map(|m| (vec![0f32; m.a.len()], vec![0f32; m.bt.len()]))
                })
            })
            .collect();
        LoraGrads { layers }
    }

    pub fn zero(&mut self) {
        for (a, b) in self.layers.iter_mut().flatten().flatten() {
            a.fill(0.0);
            b.fill(0.0);
        }
    }

    /// Every gradient buffer, in a fixed order (layer, projection, A then Bᵀ).
    pub fn slices(&self) -> Vec<&[f32]> {
        let mut out = Vec::new();
        for (a, b) in self.layers.iter().flatten().flatten() {
            out.push(a.as_slice());
            out.push(b.as_slice());
        }
        out
    }

    pub fn slices_mut(&mut self) -> Vec<&mut [f32]> {
        let mut out = Vec::new();
        for (a, b) in self.layers.iter_mut().flatten().flatten() {
            out.push(a.as_mut_slice());
            out.push(b.as_mut_slice());
        }
        out
    }
}

/// Reusable buffers of the backward.
#[derive(Default)]
pub struct BackwardState {
    dx: Vec<f32>,
    xn: Vec<f32>,
    dxn: Vec<f32>,
    tmp: Vec<f32>,
    act: Vec<f32>,
    dact: Vec<f32>,
    dgate: Vec<f32>,
    dup: Vec<f32>,
    dattn: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dq_h: Vec<f32>,
    dk_h: Vec<f32>,
    dv_h: Vec<f32>,
    t: Vec<f32>,
    dt: Vec<f32>,
    heads: Vec<attn::HeadScratch>,
    grad: GradScratch,
}

/// Runs `f(lo, hi)` on contiguous row ranges, one per thread of the pool.
fn par_rows(pool: &ThreadPool, r: usize, f: impl Fn(usize, usize) + Sync) {
    let nt = pool.n_threads();
    pool.run(|t| {
        let (lo, hi) = (r * t / nt, r * (t + 1) / nt);
        if hi > lo {
            f(lo, hi)
        }
    });
}

/// Rows `lo..hi` (of `width` values) of the buffer `p` points to.
///
/// # Safety
/// The rows must be in bounds and used by this caller alone while the slice lives.
unsafe fn rows_mut<'a>(p: SyncMut, lo: usize, hi: usize, width: usize) -> &'a mut [f32] {
    // SAFETY: as the caller promises.
    unsafe { std::slice::from_raw_parts_mut(p.get().add(lo * width), (hi - lo) * width) }
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

#[derive(Clone, Copy)]
struct SyncMut(*mut f32);
// SAFETY: shared between the pool's threads, each writing a disjoint range while the
// owning borrow is held by the dispatching call.
unsafe impl Send for SyncMut {}
unsafe impl Sync for SyncMut {}
impl SyncMut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl Forward<'_> {
    /// `dx[..rows·k] = dy · W` through the frozen, quantized base matrix `w`.
    fn base_grad(
        &self,
        pool: &ThreadPool,
        g: &mut GradScratch,
        w: &Weight,
        dy: &[f32],
        rows: usize,
        dx: &mut [f32],
    ) {
        matmul_backward_input(pool, &w.as_ref(), dy, rows, g, dx);
    }

    /// Backward of the adapter on projection `p` of layer `li` over the adapted rows:
    /// adds its input gradient into `dx` and its parameter gradients into `grads`.
    /// With `t = scale · A x` and `dt = scale · Bᵀ dy` per row: `dX += dt A`,
    /// `dBᵀ += tᵀ dY` and `dA += dtᵀ X`. One parallel section: the per-row products on
    /// each thread's rows (with the forward's kernels, so `t` has the forward's bits),
    /// then, after the pool's barrier, the parameter products on each thread's rank
    /// rows, summed over the rows in increasing order, so no sum depends on the thread
    /// count.
    #[allow(clippy::too_many_arguments)]
    fn lora_grad(
        &self,
        pool: &ThreadPool,
        bs: &mut BackwardState,
        tape: &Tape,
        ad: &LoraAdapter,
        grads: &mut LoraGrads,
        li: usize,
        p: Proj,
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
    ) {
        let Some(m) = ad.matrix(li, p) else {
            return;
        };
        let Some((da, dbt)) = grads.layers[li][p as usize].as_mut() else {
            return;
        };
        let LoraMatrix { a, bt, k, n } = m;
        let (k, n) = (*k, *n);
        let rank = ad.rank();
        let scale = ad.scale();
        let nt = pool.n_threads();
        let isa = self.kern.isa();
        for &(r0, r1, adapted) in &tape.seqs {
            if !adapted || r1 == r0 {
                continue;
            }
            let rows = r1 - r0;
            for v in [&mut bs.t, &mut bs.dt] {
                grow(v, rows * rank);
            }
            // `t` as the forward computed it, when the tape kept it (else recomputed
            // with the forward's kernel, so the same bits).
            let tt = &tape.layers[li].lora_t[p as usize];
            let taped = (tt.len() >= r1 * rank).then(|| &tt[r0 * rank..r1 * rank]);
            let (xs, dys) = (&x[r0 * k..r1 * k], &dy[r0 * n..r1 * n]);
            let (tp, dtp) = (SyncMut(bs.t.as_mut_ptr()), SyncMut(bs.dt.as_mut_ptr()));
            let dxp = SyncMut(dx[r0 * k..r1 * k].as_mut_ptr());
            let (dap, dbp) = (SyncMut(da.as_mut_ptr()), SyncMut(dbt.as_mut_ptr()));
            pool.run(|th| {
                let (lo, hi) = (rows * th / nt, rows * (th + 1) / nt);
                if hi > lo {
                    // SAFETY: rows lo..hi of t and dt (rows · rank values, grown above)
                    // and of this span of dx belong to this thread alone.
                    let (t, dt, dxr) = unsafe {
                        (
                            rows_mut(tp, lo, hi, rank),
                            rows_mut(dtp, lo, hi, rank),
                            rows_mut(dxp, lo, hi, k),
                        )
                    };
                    let mm = hi - lo;
                    if taped.is_none() {
                        lora::lora_down_rows(isa, a, k, rank, scale, &xs[lo * k..], mm, t);
                    }
                    lora::lora_down_rows(isa, bt, n, rank, scale, &dys[lo * n..], mm, dt);
                    lora::lora_up_rows(isa, a, k, rank, dt, dxr, mm);
                }
                pool.barrier();
                // SAFETY: every thread's rows of t and dt are written (the barrier) and
                // only read now.
                let (t, dt) = unsafe {
                    (
                        taped.unwrap_or_else(|| std::slice::from_raw_parts(tp.get(), rows * rank)),
                        std::slice::from_raw_parts(dtp.get(), rows * rank),
                    )
                };
                let cols = |w: usize| split_range(w, nt, th, 16);
                // SAFETY: dBᵀ and dA hold rank · n and rank · k values, and this thread's
                // columns of them are its alone.
                unsafe {
                    lora::lora_params_cols(isa, t, rank, dys, n, rows, cols(n), dbp.get());
                    lora::lora_params_cols(isa, dt, rank, xs, k, rows, cols(k), dap.get());
                }
            });
        }
    }

    /// Backward of a taped forward: given `dlogits`, the loss gradient for the rows whose
    /// logits the forward returned (`tape.n_out() × n_vocab`, batch order), adds the
    /// gradient of every matrix of `lora` (the adapter the taped batch used) into
    /// `grads`. Rows of sequences without the adapter contribute nothing.
    pub fn backward(
        &self,
        pool: &ThreadPool,
        tape: &Tape,
        dlogits: &[f32],
        lora: &LoraAdapter,
        grads: &mut LoraGrads,
        bs: &mut BackwardState,
    ) {
        assert_eq!(
            tape.adapter,
            Some(lora.id()),
            "backward of the adapter the tape was recorded with"
        );
        let cfg = self.cfg;
        let r = tape.rows();
        let (e, hd, nf) = (cfg.n_embd, cfg.head_dim, cfg.n_ff);
        let (nh, nkv) = (cfg.n_head, cfg.n_head_kv);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let n_out = tape.n_out();
        assert!(dlogits.len() >= n_out * cfg.n_vocab);
        for v in [&mut bs.dx, &mut bs.xn, &mut bs.dxn, &mut bs.tmp] {
            grow(v, r * e.max(qd));
        }
        for v in [&mut bs.act, &mut bs.dact, &mut bs.dgate, &mut bs.dup] {
            grow(v, r * nf);
        }
        for v in [
            &mut bs.dattn,
            &mut bs.dq,
            &mut bs.dq_h,
            &mut bs.dk_h,
            &mut bs.dv_h,
        ] {
            grow(v, r * qd);
        }
        grow(&mut bs.dk, r * kvd);
        grow(&mut bs.dv, r * kvd);

        // The output norm and matrix.
        self.base_grad(
            pool,
            &mut bs.grad,
            &self.w.output,
            dlogits,
            n_out,
            &mut bs.tmp,
        );
        bs.dx[..r * e].fill(0.0);
        let mut j = 0;
        for (i, w) in tape.want.iter().enumerate() {
            if *w {
                ops::rms_norm_backward(
                    &tape.x_out[i * e..(i + 1) * e],
                    &self.w.output_norm,
                    cfg.rms_eps,
                    &bs.tmp[j * e..(j + 1) * e],
                    &mut bs.dx[i * e..(i + 1) * e],
                );
                j += 1;
            }
        }

        for li in (0..cfg.n_layer).rev() {
            let lw = &self.w.layers[li];
            let lt = &tape.layers[li];

            // FFN: x_out = x_mid + down(swiglu(gate(xn2), up(xn2))), xn2 = norm(x_mid).
            {
                let out = SyncMut(bs.act.as_mut_ptr());
                par_rows(pool, r, |lo, hi| {
                    // SAFETY: rows lo..hi of act (r · nf values, grown above) are this
                    // thread's alone.
                    let o = unsafe { rows_mut(out, lo, hi, nf) };
                    ops::swiglu(&lt.gate[lo * nf..hi * nf], &lt.up[lo * nf..hi * nf], o);
                });
            }
            let mut dact = std::mem::take(&mut bs.dact);
            self.base_grad(pool, &mut bs.grad, &lw.w_down, &bs.dx, r, &mut dact);
            let (act, dx) = (std::mem::take(&mut bs.act), std::mem::take(&mut bs.dx));
            self.lora_grad(
                pool,
                bs,
                tape,
                lora,
                grads,
                li,
                Proj::Down,
                &act,
                &dx,
                &mut dact,
            );
            (bs.act, bs.dx) = (act, dx);
            {
                let (dg, du) = (SyncMut(bs.dgate.as_mut_ptr()), SyncMut(bs.dup.as_mut_ptr()));
                let dact = &dact;
                par_rows(pool, r, |lo, hi| {
                    let rr = lo * nf..hi * nf;
                    // SAFETY: rows lo..hi of dgate and dup (r · nf values each) are this
                    // thread's alone.
                    let (g, u) = unsafe { (rows_mut(dg, lo, hi, nf), rows_mut(du, lo, hi, nf)) };
                    ops::swiglu_backward(&lt.gate[rr.clone()], &lt.up[rr.clone()], &dact[rr], g, u);
                });
            }
            bs.dact = dact;
            self.norm_rows(pool, &lt.x_mid, &lw.ffn_norm, r, &mut bs.xn);
            let mut dxn = std::mem::take(&mut bs.dxn);
            matmul_backward_input_sum(
                pool,
                &[(lw.w_gate.as_ref(), &bs.dgate), (lw.w_up.as_ref(), &bs.dup)],
                r,
                &mut bs.grad,
                &mut bs.tmp,
                &mut dxn,
            );
            let (xn, dgate, dup) = (
                std::mem::take(&mut bs.xn),
                std::mem::take(&mut bs.dgate),
                std::mem::take(&mut bs.dup),
            );
            for (p, dy) in [(Proj::Gate, &dgate), (Proj::Up, &dup)] {
                self.lora_grad(pool, bs, tape, lora, grads, li, p, &xn, dy, &mut dxn);
            }
            (bs.xn, bs.dgate, bs.dup) = (xn, dgate, dup);
            self.norm_backward_add(pool, &lt.x_mid, &lw.ffn_norm, r, &dxn, bs);
            bs.dxn = dxn;

            // Attention: x_mid = x_in + o(attention(q, k, v)), q/k/v from xn1 = norm(x_in).
            let mut dattn = std::mem::take(&mut bs.dattn);
            self.base_grad(pool, &mut bs.grad, &lw.wo, &bs.dx, r, &mut dattn);
            let dx = std::mem::take(&mut bs.dx);
            self.lora_grad(
                pool,
                bs,
                tape,
                lora,
                grads,
                li,
                Proj::O,
                &lt.attn,
                &dx,
                &mut dattn,
            );
            bs.dx = dx;
            self.attention_backward(pool, tape, li, &dattn, bs);
            bs.dattn = dattn;
            self.norm_rows(pool, &lt.x_in, &lw.attn_norm, r, &mut bs.xn);
            let mut dxn = std::mem::take(&mut bs.dxn);
            matmul_backward_input_sum(
                pool,
                &[
                    (lw.wq.as_ref(), &bs.dq),
                    (lw.wk.as_ref(), &bs.dk),
                    (lw.wv.as_ref(), &bs.dv),
                ],
                r,
                &mut bs.grad,
                &mut bs.tmp,
                &mut dxn,
            );
            let (xn, dq, dk, dv) = (
                std::mem::take(&mut bs.xn),
                std::mem::take(&mut bs.dq),
                std::mem::take(&mut bs.dk),
                std::mem::take(&mut bs.dv),
            );
            for (p, dy) in [(Proj::Q, &dq), (Proj::K, &dk), (Proj::V, &dv)] {
                self.lora_grad(pool, bs, tape, lora, grads, li, p, &xn, dy, &mut dxn);
            }
            (bs.xn, bs.dq, bs.dk, bs.dv) = (xn, dq, dk, dv);
            self.norm_backward_add(pool, &lt.x_in, &lw.attn_norm, r, &dxn, bs);
            bs.dxn = dxn;
        }
    }

    fn norm_rows(&self, pool: &ThreadPool, x: &[f32], w: &[f32], r: usize, out: &mut [f32]) {
        let e = self.cfg.n_embd;
        assert!(out.len() >= r * e);
        let op = SyncMut(out.as_mut_ptr());
        par_rows(pool, r, |lo, hi| {
            // SAFETY: rows lo..hi of out (asserted in bounds) are this thread's alone.
            let o = unsafe { rows_mut(op, lo, hi, e) };
            ops::rms_norm_rows(&x[lo * e..hi * e], w, self.cfg.rms_eps, o);
        });
    }

    /// `bs.dx += ∂norm(x)/∂x · dxn`, each thread for its rows.
    fn norm_backward_add(
        &self,
        pool: &ThreadPool,
        x: &[f32],
        w: &[f32],
        r: usize,
        dxn: &[f32],
        bs: &mut BackwardState,
    ) {
        let e = self.cfg.n_embd;
        assert!(bs.dx.len() >= r * e);
        let dp = SyncMut(bs.dx.as_mut_ptr());
        par_rows(pool, r, |lo, hi| {
            // SAFETY: rows lo..hi of dx (asserted in bounds) are this thread's.
            let d = unsafe { rows_mut(dp, lo, hi, e) };
            let rows = lo * e..hi * e;
            ops::rms_norm_backward_add_rows(&x[rows.clone()], w, self.cfg.rms_eps, &dxn[rows], d);
        });
    }

    /// dq, dk, dv (rows × width, in `bs`) from the attention output's gradient.
    fn attention_backward(
        &self,
        pool: &ThreadPool,
        tape: &Tape,
        li: usize,
        dattn: &[f32],
        bs: &mut BackwardState,
    ) {
        let cfg = self.cfg;
        let r = tape.rows();
        let hd = cfg.head_dim;
        let (nh, nkv) = (cfg.n_head, cfg.n_head_kv);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let group = nh / nkv;
        let lt = &tape.layers[li];
        let scale = 1.0 / (hd as f32).sqrt();
        let nt = pool.n_threads();
        bs.heads.resize_with(nt, Default::default);
        bs.dk_h[..r * qd].fill(0.0);
        bs.dv_h[..r * qd].fill(0.0);
        let (dqp, dkp, dvp) = (
            SyncMut(bs.dq_h.as_mut_ptr()),
            SyncMut(bs.dk_h.as_mut_ptr()),
            SyncMut(bs.dv_h.as_mut_ptr()),
        );
        let dps = std::sync::Mutex::new(std::mem::take(&mut bs.heads));
        let work: Vec<(usize, usize, usize)> = tape
            .seqs
            .iter()
            .flat_map(|&(r0, r1, _)| (0..nh).map(move |h| (r0, r1, h)))
            .filter(|&(r0, r1, _)| r1 > r0)
            .collect();
        let (dqo, dko, dvo) = (
            SyncMut(bs.dq.as_mut_ptr()),
            SyncMut(bs.dk.as_mut_ptr()),
            SyncMut(bs.dv.as_mut_ptr()),
        );
        pool.run(|th| {
            let mut hs = std::mem::take(&mut dps.lock().unwrap_or_else(|e| e.into_inner())[th]);
            for &(r0, r1, h) in work.iter().skip(th).step_by(nt) {
                let kvh = h / group;
                let rows = r1 - r0;
                let hr = HeadRows {
                    hd,
                    scale,
                    lo: &tape.lo[r0..r1],
                    p_off: &tape.p_off[r0..r1],
                    probs: &lt.probs[h * tape.p_total..(h + 1) * tape.p_total],
                    q: (&lt.q[r0 * qd + h * hd..], qd),
                    k: (&lt.k[r0 * kvd + kvh * hd..], kvd),
                    v: (&lt.v[r0 * kvd + kvh * hd..], kvd),
                    dout: (&dattn[r0 * qd + h * hd..], qd),
                };
                let off = h * r * hd + r0 * hd;
                // SAFETY: (sequence, head) owns rows r0..r1 of head h's block in each of
                // the three head-major buffers (r · qd values, grown by the caller).
                let (dq, dk, dv) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(dqp.get().add(off), rows * hd),
                        std::slice::from_raw_parts_mut(dkp.get().add(off), rows * hd),
                        std::slice::from_raw_parts_mut(dvp.get().add(off), rows * hd),
                    )
                };
                attn::attention_backward_head_fast(&hr, (dq, hd), dk, dv, &mut hs);
            }
            dps.lock().unwrap_or_else(|e| e.into_inner())[th] = hs;
            // Then each thread's rows: dq, and dk, dv summed over each KV head's query
            // heads, back in row layout, then RoPE's backward.
            pool.barrier();
            // SAFETY: every head's writes are done (the barrier); the head-major buffers
            // are only read now, and rows lo..hi of dq, dk and dv are this thread's.
            let (lo, hi) = (r * th / nt, r * (th + 1) / nt);
            let (dqh, dkh, dvh, dq, dk, dv) = unsafe {
                (
                    std::slice::from_raw_parts(dqp.get(), r * qd),
                    std::slice::from_raw_parts(dkp.get(), r * qd),
                    std::slice::from_raw_parts(dvp.get(), r * qd),
                    rows_mut(dqo, lo, hi, qd),
                    rows_mut(dko, lo, hi, kvd),
                    rows_mut(dvo, lo, hi, kvd),
                )
            };
            for i in lo..hi {
                let (qi, ki) = ((i - lo) * qd, (i - lo) * kvd);
                for h in 0..nh {
                    let src = &dqh[h * r * hd + i * hd..h * r * hd + (i + 1) * hd];
                    dq[qi + h * hd..qi + (h + 1) * hd].copy_from_slice(src);
                }
                for g in 0..nkv {
                    let dk = &mut dk[ki + g * hd..ki + (g + 1) * hd];
                    let dv = &mut dv[ki + g * hd..ki + (g + 1) * hd];
                    dk.fill(0.0);
                    dv.fill(0.0);
                    for h in g * group..(g + 1) * group {
                        let o = h * r * hd + i * hd;
                        ops::add_assign(dk, &dkh[o..o + hd]);
                        ops::add_assign(dv, &dvh[o..o + hd]);
                    }
                }
                let rc = &tape.rope[i * cfg.n_rot..(i + 1) * cfg.n_rot];
                for h in 0..nh {
                    let d = &mut dq[qi + h * hd..qi + (h + 1) * hd];
                    ops::rope_backward(cfg.rope_style, d, cfg.n_rot, rc);
                }
                for h in 0..nkv {
                    let d = &mut dk[ki + h * hd..ki + (h + 1) * hd];
                    ops::rope_backward(cfg.rope_style, d, cfg.n_rot, rc);
                }
            }
        });
        bs.heads = dps.into_inner().unwrap_or_else(|e| e.into_inner());
    }
}
