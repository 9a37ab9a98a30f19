//! The training loop: LoRA on a frozen, quantized base, on the CPU.
//!
//! Each optimizer step takes `batch_size` items. Their sequences run through the
//! engine's own forward with a tape ([`Forward::run_taped`]), packed into forward
//! batches of up to `batch_tokens` rows, then back through [`Forward::backward`]; the
//! gradients accumulate over the whole batch before clipping and AdamW. The reference
//! log-probabilities DPO and KTO need come from the same forward with the adapter off,
//! so no second model copy exists.

pub use crate::data::Method;
use crate::data::{Item, Seq};
use crate::loss::{self, KtoConfig, PairLogps};
use crate::optim::{
    AdamWConfig, AdamWState, adamw_step, clip_factor_of, cosine_with_warmup, sum_squares,
};
use brise_kernels::ops;
use brise_kernels::pool::ThreadPool;
use brise_model::Model;
use brise_model::forward::{BackwardState, ForwardState, LogitsWanted, LoraGrads, SeqBatch, Tape};
use brise_model::kv::KvCache;
use brise_model::lora::{LoraAdapter, LoraConfig, PeftMatrix, Proj};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// Hyperparameters of a run. Defaults follow TRL and PEFT where they have one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub method: Method,
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    /// PEFT module names (`q_proj`, …, `down_proj`).
    pub targets: Vec<String>,
    pub learning_rate: f64,
    pub epochs: usize,
    /// Stop after this many optimizer steps, if set (otherwise `epochs` decide).
    pub max_steps: Option<u64>,
    /// Items per optimizer step (gradients accumulate over them).
    pub batch_size: usize,
    pub warmup_ratio: f64,
    pub max_grad_norm: f32,
    pub weight_decay: f32,
    pub seed: u64,
    /// DPO's and KTO's β.
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
    /// Longest sequence (prompt + completion) trained on; longer completions are cut
    /// and counted in the summary.
    pub max_len: usize,
    /// Rows per forward batch.
    pub batch_tokens: usize,
    /// DPO only: weight of an NLL term on the chosen answers (TRL's `rpo_alpha`), so the
    /// preferred answer is learned as a demonstration, not only ranked. 0: plain DPO.
    pub rpo_alpha: f64,
    /// The hyperparameters left to [`TrainConfig::fit_to_data`] (`epochs`, `batch_size`,
    /// `learning_rate`, `rpo_alpha`): they are derived from the training set when a
    /// run starts, and the run's record keeps the values used.
    pub auto: Vec<String>,
    /// Stop when the held-out loss has not improved on its best for this many epochs in
    /// a row, and keep the best epoch's adapter. 0: off (every epoch runs).
    pub early_stopping_patience: usize,
}

/// The hyperparameters [`TrainConfig::fit_to_data`] can derive.
pub const AUTO_FIELDS: [&str; 4] = ["epochs", "batch_size", "learning_rate", "rpo_alpha"];

/// Optimizer steps a small feedback set is trained for by default (see `fit_to_data`).
pub const AUTO_TARGET_STEPS: usize = 32;
/// Learning rate of the data-fitted defaults (LoRA r16, alpha 32).
pub const AUTO_LEARNING_RATE: f64 = 3e-4;
/// Early-stopping patience of the data-fitted defaults: two epochs without a better
/// held-out loss. One would stop on a single noisy epoch of a small held-out split.
pub const AUTO_PATIENCE: usize = 2;

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: Method::Sft,
            rank: 16,
            alpha: 32.0,
            use_rslora: false,
            targets: Proj::ALL
                .iter()
                .map(|p| p.peft_name().to_string())
                .collect(),
            learning_rate: 2e-4,
            epochs: 1,
            max_steps: None,
            batch_size: 8,
            warmup_ratio: 0.1,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            seed: 42,
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            max_len: 1024,
            batch_tokens: 1024,
            rpo_alpha: 0.0,
            auto: vec![],
            early_stopping_patience: 0,
        }
    }
}

impl TrainConfig {
    fn projs(&self) -> Result<Vec<Proj>, String> {
        self.targets
            .iter()
            .map(|t| {
                Proj::ALL
                    .into_iter()
                    .find(|p| p.peft_name() == t)
                    .ok_or_else(|| format!("unknown target module {t:?} (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"))
            })
            .collect()
    }

    /// Sets the hyperparameters named in `auto` from the size of the training set
    /// (`n_items` examples), so that 20 to 500 feedback items are neither under- nor
    /// over-trained: batches of about an eighth of the set (2 to 8), enough epochs for
    /// about [`AUTO_TARGET_STEPS`] optimizer steps (2 to 8 epochs), learning rate
    /// [`AUTO_LEARNING_RATE`], and for DPO an NLL term on the chosen answers of weight 1
    /// (TRL's `rpo_alpha`). docs/ARCHITECTURE.md ("Defaults that fit the data") has the
    /// sweep behind the numbers. Clears `auto`.
    pub fn fit_to_data(&mut self, n_items: usize) {
        let auto = std::mem::take(&mut self.auto);
        let is = |f: &str| auto.iter().any(|a| a == f);
        let n = n_items.max(1);
        if is("batch_size") {
            self.batch_size = ((n + 4) / 8).clamp(2, 8);
        }
        if is("epochs") {
            let per_epoch = n.div_ceil(self.batch_size.max(1));
            self.epochs = AUTO_TARGET_STEPS.div_ceil(per_epoch).clamp(2, 8);
        }
        if is("learning_rate") {
            self.learning_rate = AUTO_LEARNING_RATE;
        }
        if is("rpo_alpha") {
            self.rpo_alpha = if self.method == Method::Dpo { 1.0 } else { 0.0 };
        }
    }

    /// Marks `field` as set by the user (no longer derived from the data).
    pub fn set_explicit(&mut self, field: &str) {
        self.auto.retain(|a| a != field);
    }

    /// Defaults whose `epochs`, `batch_size`, `learning_rate` and `rpo_alpha` are fitted
    /// to the data ([`TrainConfig::fit_to_data`]): what `brise train`, `--learn` and
    /// the fine-tuning jobs use unless told otherwise.
    pub fn fitted() -> TrainConfig {
        TrainConfig {
            learning_rate: AUTO_LEARNING_RATE,
            auto: AUTO_FIELDS.iter().map(|s| s.to_string()).collect(),
            early_stopping_patience: AUTO_PATIENCE,
            ..TrainConfig::default()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(bad) = self
            .auto
            .iter()
            .find(|a| !AUTO_FIELDS.contains(&a.as_str()))
        {
            return Err(format!(
                "{bad:?} cannot be auto (only {})",
                AUTO_FIELDS.join(", ")
            ));
        }
        if !(self.rpo_alpha.is_finite() && (0.0..=100.0).contains(&self.rpo_alpha)) {
            return Err(format!(
                "rpo_alpha {} must be between 0 and 100",
                self.rpo_alpha
            ));
        }
        if self.rank == 0 {
            return Err("rank must be at least 1".into());
        }
        if self.batch_size == 0 || self.batch_tokens == 0 || self.max_len < 2 {
            return Err("batch_size, batch_tokens and max_len must be positive".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(format!(
                "learning_rate {} must be positive",
                self.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err("warmup_ratio must be in [0, 1)".into());
        }
        if self.projs()?.is_empty() {
            return Err("no target modules".into());
        }
        Ok(())
    }
}

/// What a step did, for progress bars and job events.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f32,
    /// Tokens (prompt and completion) through forward and backward in this step.
    pub tokens: usize,
    pub tokens_per_s: f64,
    /// DPO: pairs the policy ranks right; KTO: items on the right side of the
    /// reference point.
    pub correct: usize,
    pub items: usize,
}

/// The end of a run.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub items: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    /// Sequences whose completion was cut at `max_len`.
    pub truncated: usize,
    pub stopped: bool,
    /// The run ended before its last epoch because the epoch hook said so.
    pub stopped_early: bool,
}

/// What the epoch hook of [`Trainer::train_with`] tells the trainer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochAction {
    Continue,
    Stop,
}

/// splitmix64: a seeded, platform-independent generator for init and shuffling.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A fresh adapter as PEFT initialises one: A uniform in ±1/√in (Kaiming-uniform with
/// a = √5), B zero, so the adapted model starts equal to the base.
pub fn init_adapter(model: &Model, cfg: &TrainConfig) -> Result<LoraAdapter, String> {
    cfg.validate()?;
    let projs = cfg.projs()?;
    let mut rng = Rng(cfg.seed);
    let mut mats = Vec::new();
    for layer in 0..model.cfg.n_layer {
        for &p in &projs {
            let (k, n) = p.dims(&model.cfg);
            let bound = 1.0 / (k as f32).sqrt();
            let a = (0..cfg.rank * k).map(|_| rng.unit() * bound).collect();
            mats.push(PeftMatrix {
                layer,
                proj: p,
                a,
                b: vec![0.0; n * cfg.rank],
            });
        }
    }
    let lc = LoraConfig {
        r: cfg.rank,
        lora_alpha: cfg.alpha,
        use_rslora: cfg.use_rslora,
        lora_dropout: 0.0,
        base_model_name_or_path: Some(model.name.clone()),
    };
    LoraAdapter::from_peft(lc, mats, &model.cfg).map_err(|e| e.to_string())
}

/// One sequence of a forward batch: its tokens (all but the last) and completion
/// targets.
struct Row<'a> {
    tokens: &'a [u32],
    targets: &'a [u32],
    from: usize,
}

fn row_of(s: &Seq, max_len: usize, buf: &mut Vec<u32>) -> (usize, bool) {
    buf.clear();
    buf.extend_from_slice(&s.prompt);
    buf.extend_from_slice(&s.completion);
    let cut = buf.len() > max_len;
    buf.truncate(max_len);
    (s.prompt.len(), cut)
}

pub struct Trainer<'m> {
    model: &'m Model,
    pub cfg: TrainConfig,
    pool: ThreadPool,
    /// The adapter being trained.
    pub adapter: LoraAdapter,
    /// The gradient `loss_and_grads` left; `step` applies it and clears it to zeros.
    pub grads: LoraGrads,
    opt: Vec<AdamWState>,
    adamw: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
    st: ForwardState,
    tape: Tape,
    bs: BackwardState,
    dlogits: Vec<f32>,
    /// KV caches kept from the last forward batch: a fresh one per sequence and step
    /// would fault in megabytes of zeroed pages on the dispatching thread each time.
    caches: Vec<KvCache>,
    /// The gradients are all zero (the last optimizer step cleared them).
    grads_clear: bool,
    truncated: usize,
    /// Save a checkpoint into this directory every this many steps (and at the end).
    pub checkpoint: Option<(std::path::PathBuf, u64)>,
    /// Run the forward's matrix products in f32 ([`Kernels::with_fast`]) rather than in
    /// llama.cpp's arithmetic, which training does not need (on by default). Losses are
    /// then not bit-equal to the inference forward's (the gate's scorer keeps that one).
    ///
    /// [`Kernels::with_fast`]: brise_kernels::quant::Kernels::with_fast
    pub fast_forward: bool,
}

impl<'m> Trainer<'m> {
    /// A trainer for `adapter` (a fresh one from [`init_adapter`], or one to continue).
    pub fn new(
        model: &'m Model,
        cfg: TrainConfig,
        adapter: LoraAdapter,
        threads: usize,
    ) -> Result<Trainer<'m>, String> {
        cfg.validate()?;
        if !adapter.fits(&model.cfg) {
            return Err("the adapter was made for another model shape".into());
        }
        let grads = LoraGrads::zeros_like(&adapter, model.cfg.n_layer);
        let n_buf = grads.slices().len();
        Ok(Trainer {
            model,
            adamw: AdamWConfig {
                weight_decay: cfg.weight_decay,
                ..AdamWConfig::default()
            },
            cfg,
            pool: ThreadPool::new(threads.max(1)),
            adapter,
            grads,
            opt: vec![AdamWState::default(); n_buf],
            step: 0,
            st: ForwardState::default(),
            tape: Tape::new(),
            bs: BackwardState::default(),
            dlogits: Vec::new(),
            caches: Vec::new(),
            grads_clear: true,
            truncated: 0,
            checkpoint: None,
            fast_forward: true,
        })
    }

    /// Sum of completion log-probabilities of each sequence, with the adapter or
    /// without. With `coefs`, also runs the backward with those ∂loss/∂logp values
    /// (adds into `self.grads`). Sequences are packed into forward batches.
    /// Forward batches never split a group of `unit` consecutive sequences, so a
    /// coefficient can depend on its group's logps (a DPO pair's two sequences).
    fn logps(
        &mut self,
        seqs: &[&Seq],
        unit: usize,
        adapted: bool,
        coefs: Option<&CoefFn>,
    ) -> Vec<f64> {
        let mut out = Vec::with_capacity(seqs.len());
        let mut i = 0;
        let mut bufs: Vec<Vec<u32>> = Vec::new();
        while i < seqs.len() {
            // A forward batch: as many whole sequences as fit in batch_tokens (≥ 1).
            let mut j = i;
            let mut rows = 0;
            while j < seqs.len() {
                let g = unit.min(seqs.len() - j);
                let l: usize = seqs[j..j + g]
                    .iter()
                    .map(|s| s.len().min(self.cfg.max_len))
                    .sum();
                if j > i && rows + l > self.cfg.batch_tokens {
                    break;
                }
                rows += l;
                j += g;
            }
            bufs.resize_with(j - i, Vec::new);
            let mut meta = Vec::new();
            for (b, s) in bufs.iter_mut().zip(&seqs[i..j]) {
                let (p, cut) = row_of(s, self.cfg.max_len, b);
                if cut && coefs.is_some() {
                    self.truncated += 1;
                }
                meta.push(p);
            }
            let batch_rows: Vec<Row> = bufs
                .iter()
                .zip(&meta)
                .map(|(b, &p)| {
                    let from = p.max(1) - 1;
                    Row {
                        tokens: &b[..b.len() - 1],
                        targets: &b[from + 1..],
                        from,
                    }
                })
                .collect();
            let logps = self.run_batch(&batch_rows, adapted, coefs.map(|c| (c, i)));
            out.extend(logps);
            i = j;
        }
        out
    }

    fn run_batch(
        &mut self,
        rows: &[Row],
        adapted: bool,
        coefs: Option<(&CoefFn, usize)>,
    ) -> Vec<f64> {
        let cfg = &self.model.cfg;
        let v = cfg.n_vocab;
        let mut caches = std::mem::take(&mut self.caches);
        caches.truncate(rows.len());
        for (i, r) in rows.iter().enumerate() {
            // Padded as the gate's scorer and a served slot pad theirs: the padded
            // length picks the attention's arithmetic, so losses match the gate's.
            let n_ctx = r.tokens.len().max(1).div_ceil(256) * 256;
            match caches.get_mut(i) {
                // Positions past the new tokens are never read, so old contents are fine.
                Some(c) if c.n_ctx() == n_ctx => c.truncate(0),
                Some(c) => *c = KvCache::new(cfg, n_ctx),
                None => caches.push(KvCache::new(cfg, n_ctx)),
            }
        }
        let lora = adapted.then_some(&self.adapter);
        let mut batch: Vec<SeqBatch> = caches
            .iter_mut()
            .zip(rows)
            .map(|(c, r)| SeqBatch {
                cache: c,
                tokens: r.tokens,
                logits: LogitsWanted::From(r.from),
                lora,
            })
            .collect();
        let mut fwd = self.model.forward();
        fwd.kern = fwd.kern.with_fast(self.fast_forward);
        let taped = coefs.is_some();
        fwd.run_taped(
            &self.pool,
            &mut self.st,
            &mut batch,
            taped.then_some(&mut self.tape),
        );
        // Per row: the target's NLL from the row's log-sum-exp, rows split over the
        // pool's threads; then, for a taped pass, each sequence's coefficient and the
        // scaled `softmax − onehot` in a second parallel pass.
        let targets: Vec<u32> = rows
            .iter()
            .flat_map(|r| r.targets.iter().copied())
            .collect();
        let off = targets.len();
        let mut lses = vec![ops::LogSumExp { max: 0.0, sum: 1.0 }; off];
        let nt = self.pool.n_threads();
        {
            let logits = &self.st.logits;
            let lp = SyncPtr(lses.as_mut_ptr());
            self.pool.run(|th| {
                for j in (th..off).step_by(nt) {
                    let l = ops::log_sum_exp(&logits[j * v..(j + 1) * v]);
                    // SAFETY: element j of lses is this thread's alone.
                    unsafe { *lp.get().add(j) = l };
                }
            });
        }
        let logits = &self.st.logits;
        let mut o = 0;
        let logps: Vec<f64> = rows
            .iter()
            .map(|r| {
                let n = r.targets.len();
                let lp = (o..o + n)
                    .map(|j| logits[j * v + targets[j] as usize] as f64 - lses[j].value())
                    .sum::<f64>();
                o += n;
                lp
            })
            .collect();
        if let Some((coef, first)) = coefs {
            // ∂loss/∂z = c · ∂logp/∂z = −c · (softmax − onehot).
            let cs = coef(first, &logps);
            let scales: Vec<f32> = rows
                .iter()
                .zip(&cs)
                .flat_map(|(r, c)| std::iter::repeat_n(-*c as f32, r.targets.len()))
                .collect();
            self.dlogits.resize(off * v, 0.0);
            let dlp = SyncPtr(self.dlogits.as_mut_ptr());
            let (targets, lses, scales) = (&targets, &lses, &scales);
            self.pool.run(|th| {
                for j in (th..off).step_by(nt) {
                    // SAFETY: row j of dlogits (off · v values, sized above) belongs
                    // to this thread alone.
                    let dz = unsafe { std::slice::from_raw_parts_mut(dlp.get().add(j * v), v) };
                    let z = &logits[j * v..(j + 1) * v];
                    ops::softmax_grad(z, &lses[j], targets[j] as usize, scales[j], dz);
                }
            });
            fwd.backward(
                &self.pool,
                &self.tape,
                &self.dlogits[..off * v],
                &self.adapter,
                &mut self.grads,
                &mut self.bs,
            );
        }
        drop(batch);
        self.caches = caches;
        logps
    }

    /// The loss of `batch` and its gradient, left in `self.grads` (zeroed first).
    /// Returns (loss, tokens, correct).
    pub fn loss_and_grads(&mut self, batch: &[&Item]) -> Result<(f64, usize, usize), String> {
        if !self.grads_clear {
            self.grads.zero();
        }
        self.grads_clear = false;
        let method = self.cfg.method;
        if let Some(bad) = batch.iter().find(|it| it.method() != method) {
            return Err(format!(
                "{} training got a {} item",
                method.name(),
                match bad {
                    Item::Sft(_) => "SFT",
                    Item::Pref { .. } => "preference",
                    Item::Kto { .. } => "KTO",
                }
            ));
        }
        let mut tokens = 0;
        match method {
            Method::Sft => {
                let seqs: Vec<&Seq> = batch
                    .iter()
                    .map(|it| match it {
                        Item::Sft(s) => s,
                        _ => unreachable!("checked above"),
                    })
                    .collect();
                let lens: Vec<usize> = seqs
                    .iter()
                    .map(|s| {
                        let l = s.len().min(self.cfg.max_len);
                        l - s.prompt.len().max(1).min(l)
                    })
                    .collect();
                tokens += seqs
                    .iter()
                    .map(|s| s.len().min(self.cfg.max_len))
                    .sum::<usize>();
                let (_, c) = loss::sft(&vec![0.0; seqs.len()], &lens);
                let coef = c.first().copied().unwrap_or(0.0);
                let f = move |_: usize, lp: &[f64]| vec![coef; lp.len()];
                let logps = self.logps(&seqs, 1, true, Some(&f));
                Ok((loss::sft(&logps, &lens).0, tokens, 0))
            }
            Method::Dpo => {
                let mut seqs: Vec<&Seq> = Vec::new();
                for it in batch {
                    if let Item::Pref { chosen, rejected } = it {
                        seqs.push(chosen);
                        seqs.push(rejected);
                    }
                }
                tokens += seqs
                    .iter()
                    .map(|s| s.len().min(self.cfg.max_len))
                    .sum::<usize>();
                let refs = self.logps(&seqs, 2, false, None);
                let beta = self.cfg.beta;
                let n = batch.len();
                // RPO: the chosen answers' mean token NLL over the batch, weighted.
                let chosen_tokens: usize = seqs
                    .iter()
                    .step_by(2)
                    .map(|s| {
                        let l = s.len().min(self.cfg.max_len);
                        l - s.prompt.len().max(1).min(l)
                    })
                    .sum();
                let rpo = self.cfg.rpo_alpha / chosen_tokens.max(1) as f64;
                let pair = |first: usize, pol: &[f64], k: usize| PairLogps {
                    chosen: pol[2 * k],
                    rejected: pol[2 * k + 1],
                    ref_chosen: refs[first + 2 * k],
                    ref_rejected: refs[first + 2 * k + 1],
                };
                // A forward batch holds whole pairs (first is even): each pair's
                // coefficients need both of its logps. The mean is over the whole batch.
                let f = |first: usize, pol: &[f64]| {
                    let pairs: Vec<PairLogps> =
                        (0..pol.len() / 2).map(|k| pair(first, pol, k)).collect();
                    let (_, c, _) = loss::dpo(&pairs, beta);
                    let scale = pairs.len() as f64 / n as f64;
                    c.iter()
                        .flat_map(|(a, b)| [a * scale - rpo, b * scale])
                        .collect()
                };
                let pol = self.logps(&seqs, 2, true, Some(&f));
                let pairs: Vec<PairLogps> = (0..n).map(|k| pair(0, &pol, k)).collect();
                let (l, _, right) = loss::dpo(&pairs, beta);
                let nll: f64 = -pairs.iter().map(|p| p.chosen).sum::<f64>();
                Ok((l + rpo * nll, tokens, right))
            }
            Method::Kto => {
                let mut seqs: Vec<&Seq> = Vec::new();
                let mut good = Vec::new();
                for it in batch {
                    if let Item::Kto { seq, desirable } = it {
                        seqs.push(seq);
                        good.push(*desirable);
                    }
                }
                // Mismatched pairs for the KL estimate: item i's prompt with item
                // i−1's completion (TRL rotates the batch's completions by one).
                let n = seqs.len();
                let kl_seqs: Vec<Seq> = (0..n)
                    .map(|i| Seq {
                        prompt: seqs[i].prompt.clone(),
                        completion: seqs[(i + n - 1) % n].completion.clone(),
                    })
                    .collect();
                let kl_refs: Vec<&Seq> = kl_seqs.iter().collect();
                let kl_pol = self.logps(&kl_refs, 1, true, None);
                let kl_ref = self.logps(&kl_refs, 1, false, None);
                let kl_pairs: Vec<(f64, f64)> =
                    kl_pol.iter().zip(&kl_ref).map(|(a, b)| (*a, *b)).collect();
                let kl = loss::kto_kl(&kl_pairs);
                let refs = self.logps(&seqs, 1, false, None);
                tokens += seqs
                    .iter()
                    .map(|s| s.len().min(self.cfg.max_len))
                    .sum::<usize>();
                let kcfg = KtoConfig {
                    beta: self.cfg.beta,
                    desirable_weight: self.cfg.desirable_weight,
                    undesirable_weight: self.cfg.undesirable_weight,
                };
                // Each item's coefficient needs only its own logp (KL is a constant);
                // kto() averages over what it is given, so rescale to the batch.
                let f = |first: usize, pol: &[f64]| {
                    let its: Vec<(f64, f64, bool)> = (0..pol.len())
                        .map(|k| (pol[k], refs[first + k], good[first + k]))
                        .collect();
                    let scale = its.len() as f64 / n as f64;
                    loss::kto(&its, kl, &kcfg)
                        .1
                        .iter()
                        .map(|c| c * scale)
                        .collect()
                };
                let pol = self.logps(&seqs, 1, true, Some(&f));
                let items: Vec<(f64, f64, bool)> =
                    (0..n).map(|k| (pol[k], refs[k], good[k])).collect();
                let (l, _) = loss::kto(&items, kl, &kcfg);
                let right = items
                    .iter()
                    .filter(|(p, r, g)| if *g { p - r > kl } else { p - r < kl })
                    .count();
                Ok((l, tokens, right))
            }
        }
    }

    /// One optimizer step on `batch` at learning-rate multiplier `lr_mult`.
    pub fn step(&mut self, batch: &[&Item], total_steps: u64) -> Result<StepReport, String> {
        let t0 = Instant::now();
        let (l, tokens, correct) = self.loss_and_grads(batch)?;
        if !l.is_finite() {
            return Err(format!("the loss is {l} at step {}", self.step + 1));
        }
        // The optimizer over the pool's threads, a tensor at a time: each tensor's sum
        // of squares (then their total in tensor order, as `clip_factor`), then its
        // update, after which its gradient is cleared for the next step while in cache.
        let nt = self.pool.n_threads();
        let sums: Vec<std::sync::Mutex<f64>> = {
            let gs = self.grads.slices();
            let out: Vec<std::sync::Mutex<f64>> =
                gs.iter().map(|_| std::sync::Mutex::new(0.0)).collect();
            self.pool.run(|th| {
                for i in (th..gs.len()).step_by(nt) {
                    *out[i].lock().unwrap_or_else(|e| e.into_inner()) = sum_squares(gs[i]);
                }
            });
            out
        };
        let sums: Vec<f64> = sums
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let (norm, clip) = clip_factor_of(&sums, self.cfg.max_grad_norm);
        let warmup = (self.cfg.warmup_ratio * total_steps as f64).ceil() as u64;
        let lr = self.cfg.learning_rate * cosine_with_warmup(self.step, warmup, total_steps);
        self.step += 1;
        let t = self.step;
        let adamw = self.adamw;
        let jobs: Vec<std::sync::Mutex<OptJob>> = self
            .grads
            .slices_mut()
            .into_iter()
            .zip(adapter_params(&mut self.adapter))
            .zip(&mut self.opt)
            .map(|((g, p), st)| std::sync::Mutex::new((g, p, st)))
            .collect();
        self.pool.run(|th| {
            for job in jobs.iter().skip(th).step_by(nt) {
                let mut job = job.lock().unwrap_or_else(|e| e.into_inner());
                let (g, p, st) = &mut *job;
                if clip < 1.0 {
                    for v in g.iter_mut() {
                        *v *= clip;
                    }
                }
                adamw_step(&adamw, st, t, lr as f32, p, g);
                g.fill(0.0);
            }
        });
        drop(jobs);
        self.grads_clear = true;
        let secs = t0.elapsed().as_secs_f64();
        Ok(StepReport {
            step: self.step,
            total_steps,
            epoch: 0,
            loss: l,
            learning_rate: lr,
            grad_norm: norm,
            tokens,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            correct,
            items: batch.len(),
        })
    }

    /// Trains on `items` for the configured epochs (or `max_steps`), in a seeded order.
    /// `on_step` sees every step and may stop the run by returning false.
    pub fn train(
        &mut self,
        items: &[Item],
        on_step: &mut dyn FnMut(&StepReport) -> bool,
    ) -> Result<TrainSummary, String> {
        self.train_with(items, on_step, &mut |_, _| Ok(EpochAction::Continue))
    }

    /// [`Trainer::train`], with `on_epoch(epoch, adapter)` called after each epoch that
    /// took a step in this process and is not the last (early stopping's hook).
    pub fn train_with(
        &mut self,
        items: &[Item],
        on_step: &mut dyn FnMut(&StepReport) -> bool,
        on_epoch: &mut dyn FnMut(usize, &LoraAdapter) -> Result<EpochAction, String>,
    ) -> Result<TrainSummary, String> {
        let items: Vec<&Item> = items
            .iter()
            .filter(|it| it.method() == self.cfg.method)
            .collect();
        if items.is_empty() {
            return Err(format!("no {} items to train on", self.cfg.method.name()));
        }
        let per_epoch = items.len().div_ceil(self.cfg.batch_size) as u64;
        let total = self
            .cfg
            .max_steps
            .unwrap_or(per_epoch * self.cfg.epochs as u64)
            .max(1);
        let t0 = Instant::now();
        let mut sum = TrainSummary {
            steps: 0,
            items: 0,
            tokens: 0,
            seconds: 0.0,
            tokens_per_s: 0.0,
            first_loss: None,
            last_loss: None,
            truncated: 0,
            stopped: false,
            stopped_early: false,
        };
        let mut global = 0u64;
        'outer: for epoch in 0.. {
            let mut stepped = false;
            let mut order: Vec<usize> = (0..items.len()).collect();
            let mut rng = Rng(self.cfg.seed ^ (epoch as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            for chunk in order.chunks(self.cfg.batch_size) {
                if global >= total {
                    break 'outer;
                }
                global += 1;
                if global <= self.step {
                    // Resumed: this step was taken before the checkpoint.
                    continue;
                }
                let batch: Vec<&Item> = chunk.iter().map(|&i| items[i]).collect();
                stepped = true;
                let mut rep = self.step(&batch, total)?;
                rep.epoch = epoch;
                sum.steps += 1;
                sum.items += batch.len();
                sum.tokens += rep.tokens;
                sum.first_loss.get_or_insert(rep.loss);
                sum.last_loss = Some(rep.loss);
                if let Some((dir, every)) = &self.checkpoint
                    && (self.step.is_multiple_of(*every.max(&1)) || self.step == total)
                {
                    self.save_checkpoint(dir)?;
                }
                if !on_step(&rep) {
                    sum.stopped = true;
                    break 'outer;
                }
            }
            if global >= total {
                break;
            }
            if stepped && on_epoch(epoch, &self.adapter)? == EpochAction::Stop {
                sum.stopped_early = true;
                break;
            }
        }
        sum.seconds = t0.elapsed().as_secs_f64();
        sum.tokens_per_s = sum.tokens as f64 / sum.seconds.max(1e-9);
        sum.truncated = self.truncated;
        Ok(sum)
    }

    /// Saves the adapter (PEFT format), the optimizer state and the step under `dir`.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<(), String> {
        self.adapter
            .save(&dir.join("adapter"))
            .map_err(|e| e.to_string())?;
        let mut bufs: Vec<(String, Vec<u8>, usize)> = Vec::new();
        for (i, st) in self.opt.iter().enumerate() {
            for (name, v) in [("m", &st.m), ("v", &st.v)] {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                bufs.push((format!("{name}.{i}"), bytes, v.len()));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
            .iter()
            .map(|(n, b, len)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], b)
                        .map_err(|e| e.to_string())?;
                Ok((n.clone(), view))
            })
            .collect::<Result<_, String>>()?;
        let st = safetensors::serialize(views, None).map_err(|e| e.to_string())?;
        let io = |e: std::io::Error| format!("{}: {e}", dir.display());
        std::fs::write(dir.join("optimizer.safetensors"), st).map_err(io)?;
        let state = serde_json::json!({"step": self.step, "config": self.cfg});
        std::fs::write(
            dir.join("trainer_state.json"),
            serde_json::to_string_pretty(&state).expect("plain data"),
        )
        .map_err(io)?;
        Ok(())
    }

    /// Continues from a checkpoint written by [`Trainer::save_checkpoint`].
    pub fn resume(model: &'m Model, dir: &Path, threads: usize) -> Result<Trainer<'m>, String> {
        let io = |e: std::io::Error| format!("{}: {e}", dir.display());
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("trainer_state.json")).map_err(io)?)
                .map_err(|e| format!("{}: trainer_state.json: {e}", dir.display()))?;
        let cfg: TrainConfig = serde_json::from_value(state["config"].clone())
            .map_err(|e| format!("trainer_state.json config: {e}"))?;
        let step = state["step"]
            .as_u64()
            .ok_or("trainer_state.json has no step")?;
        let adapter =
            LoraAdapter::load(&dir.join("adapter"), &model.cfg).map_err(|e| e.to_string())?;
        let mut tr = Trainer::new(model, cfg, adapter, threads)?;
        let bytes = std::fs::read(dir.join("optimizer.safetensors")).map_err(io)?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| format!("optimizer.safetensors: {e}"))?;
        for (i, o) in tr.opt.iter_mut().enumerate() {
            for (name, dst) in [("m", &mut o.m), ("v", &mut o.v)] {
                let t = st
                    .tensor(&format!("{name}.{i}"))
                    .map_err(|e| format!("optimizer.safetensors: {e}"))?;
                *dst = t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
            }
        }
        tr.step = step;
        Ok(tr)
    }
}

/// A pointer the pool's threads write disjoint elements through.
struct SyncPtr<T>(*mut T);
impl<T> Clone for SyncPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SyncPtr<T> {}
// SAFETY: each thread writes only its own rows while the owning borrow is held by the
// dispatching call.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// ∂loss/∂logp of each sequence of a forward batch, given the index of its first
/// sequence in the pass and the batch's logps.
type CoefFn<'a> = dyn Fn(usize, &[f64]) -> Vec<f64> + 'a;

/// One tensor's share of an optimizer step: its gradient, parameters and state.
type OptJob<'a> = (&'a mut [f32], &'a mut [f32], &'a mut AdamWState);

/// The adapter's parameter buffers in [`LoraGrads::slices`] order.
fn adapter_params(ad: &mut LoraAdapter) -> Vec<&mut [f32]> {
    let mut out = Vec::new();
    for (_, _, m) in ad.matrices_mut() {
        out.push(m.a.as_mut_slice());
        out.push(m.bt.as_mut_slice());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fitted(n: usize, method: Method) -> TrainConfig {
        let mut c = TrainConfig {
            method,
            ..TrainConfig::fitted()
        };
        c.fit_to_data(n);
        c
    }

    #[test]
    fn defaults_fit_the_data() {
        // (items, batch size, epochs): about 32 steps, 2 to 8 epochs, batches of 2 to 8.
        for (n, b, e) in [(16, 2, 4), (32, 4, 4), (40, 5, 4), (100, 8, 3), (500, 8, 2)] {
            let c = fitted(n, Method::Sft);
            assert_eq!((c.batch_size, c.epochs), (b, e), "{n} items");
            assert!(c.auto.is_empty());
            assert_eq!(c.learning_rate, AUTO_LEARNING_RATE);
            assert_eq!(c.rpo_alpha, 0.0);
        }
        assert_eq!(fitted(40, Method::Dpo).rpo_alpha, 1.0);
        // What the user set stays.
        let mut c = TrainConfig::fitted();
        c.epochs = 1;
        c.set_explicit("epochs");
        c.fit_to_data(40);
        assert_eq!(c.epochs, 1);
        // A plain config has nothing auto.
        let mut c = TrainConfig::default();
        c.fit_to_data(40);
        assert_eq!(c, TrainConfig::default());
        let bad = TrainConfig {
            auto: vec!["rank".into()],
            ..TrainConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("cannot be auto"));
    }
}
