//! Continuous batching: many sequences share each forward pass.
//!
//! One engine thread owns the model's thread pool and a fixed set of KV-cache slots.
//! Each step it admits queued requests into free slots, then runs one forward pass over
//! every active sequence: prompt chunks of up to `n_batch` tokens in all (so a long
//! prompt delays the others by one chunk at a time, never by the whole prompt, and short
//! prompts arriving together share a step) plus one token for each sequence that is
//! generating.
//!
//! Batch invariance: the forward pass picks each row's kernels from what *its own*
//! sequence contributes to the step, and prompts are always cut into chunks of `n_batch`
//! starting at position 0 (as `brise run` and llama.cpp cut them), so a sequence's tokens
//! do not depend on what else is in the batch. The prefix cache keeps this: a slot's
//! cached positions are reused only up to the end of the last whole chunk, which is
//! exactly what a cold run would have computed there.

use crate::generate::{
    Decoder, EngineError, FinishReason, GenerateOptions, Step, TokenLogprob, check_lora,
};
use brise_kernels::pool::ThreadPool;
use brise_model::forward::{ForwardState, LogitsWanted, SeqBatch};
use brise_model::kv::KvCache;
use brise_model::{Model, ModelError};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub n_threads: usize,
    /// KV-cache slots: sequences decoded together.
    pub n_slots: usize,
    /// Context of each slot, in tokens.
    pub n_ctx_slot: usize,
    /// Prompt chunk size (llama.cpp's physical batch).
    pub n_batch: usize,
    /// Requests waiting for a slot before `submit` refuses more.
    pub queue_capacity: usize,
    /// Slots one tenant (`GenerateOptions::tenant`) may hold at once; 0: no limit.
    pub tenant_slots: usize,
}

/// What the engine reports about one request, in order: `Token`s, then one `Done` or
/// `Error`.
#[derive(Debug)]
pub enum Event {
    /// A generated token and the text it completes (may be empty while UTF-8 bytes or a
    /// possible stop string are held back).
    Token {
        token: u32,
        text: String,
        /// With `GenerateOptions::logprobs`.
        logprob: Option<TokenLogprob>,
    },
    Done(Outcome),
    Error(EngineError),
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub finish: FinishReason,
    /// Text still held back at the end (already final), not sent as a `Token`.
    pub tail: String,
    pub n_prompt: usize,
    /// Prompt tokens reused from the prefix cache.
    pub n_cached: usize,
    pub n_gen: usize,
    /// From admission to the end of prompt processing.
    pub prompt_time: Duration,
    /// From admission to the end.
    pub total_time: Duration,
}

/// Receives the events of one request; returns `false` when nobody listens any more,
/// which cancels the request.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

pub struct Request {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    /// Set by the caller to stop the request (e.g. its client went away).
    pub cancel: Arc<AtomicBool>,
    /// Past this instant the request ends with a timeout error.
    pub deadline: Option<Instant>,
    pub sink: Sink,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("the engine is shutting down")]
    ShuttingDown,
}

/// Live figures for metrics.
#[derive(Default)]
pub struct Stats {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    /// Tokens in the last forward pass.
    pub batch_tokens: AtomicUsize,
    /// Sequences in the last forward pass.
    pub batch_seqs: AtomicUsize,
    pub kv_used: AtomicUsize,
    pub kv_total: AtomicUsize,
    pub steps: AtomicU64,
    pub prompt_tokens_cached: AtomicU64,
    /// Requests waiting for a slot, per tenant (tenants with none are removed).
    pub queued_by_tenant: Mutex<std::collections::BTreeMap<String, usize>>,
    /// Per tenant: how long its requests waited between submission and leaving the
    /// queue (for a slot, or gone or timed out while waiting).
    pub waits_by_tenant: Mutex<std::collections::BTreeMap<String, Waits>>,
}

/// Queue waiting times of one tenant's requests.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Waits {
    pub count: u64,
    pub seconds_sum: f64,
    pub seconds_max: f64,
}

impl Stats {
    /// A request of `tenant` left the queue after waiting `wait`.
    fn dequeued(&self, tenant: &str, wait: Duration) {
        self.queue_change(tenant, false);
        let mut m = self
            .waits_by_tenant
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let w = m.entry(tenant.to_string()).or_default();
        let secs = wait.as_secs_f64();
        w.count += 1;
        w.seconds_sum += secs;
        w.seconds_max = w.seconds_max.max(secs);
    }

    fn queue_change(&self, tenant: &str, up: bool) {
        let mut m = self
            .queued_by_tenant
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if up {
            *m.entry(tenant.to_string()).or_default() += 1;
            self.queued.fetch_add(1, Ordering::SeqCst);
        } else {
            if let Some(n) = m.get_mut(tenant) {
                *n -= 1;
                if *n == 0 {
                    m.remove(tenant);
                }
            }
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A request and when it was submitted.
type Queued = (Instant, Request);

pub struct Scheduler {
    tx: Mutex<Option<SyncSender<Queued>>>,
    stats: Arc<Stats>,
    cfg: SchedulerConfig,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Scheduler {
    pub fn start(model: Arc<Model>, cfg: SchedulerConfig) -> Scheduler {
        let (tx, rx) = mpsc::sync_channel(cfg.queue_capacity.max(1));
        let stats = Arc::new(Stats::default());
        stats
            .kv_total
            .store(cfg.n_slots * cfg.n_ctx_slot, Ordering::Relaxed);
        let st = stats.clone();
        let c = cfg.clone();
        let thread = std::thread::Builder::new()
            .name("brise-engine".into())
            .spawn(move || Engine::new(model, c, st).run(rx))
            .expect("spawn the engine thread");
        Scheduler {
            tx: Mutex::new(Some(tx)),
            stats,
            cfg,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Queues a request; refuses when the queue is full, never blocks.
    pub fn submit(&self, r: Request) -> Result<(), SubmitError> {
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let tx = guard.as_ref().ok_or(SubmitError::ShuttingDown)?;
        // The engine moves requests out of the channel into its own queue (to admit
        // them fairly), so the bound is kept here.
        if self.stats.queued.load(Ordering::SeqCst) >= self.cfg.queue_capacity.max(1) {
            return Err(SubmitError::QueueFull(self.cfg.queue_capacity));
        }
        let tenant = r.opts.tenant.clone();
        self.stats.queue_change(&tenant, true);
        match tx.try_send((Instant::now(), r)) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stats.queue_change(&tenant, false);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull(self.cfg.queue_capacity),
                    TrySendError::Disconnected(_) => SubmitError::ShuttingDown,
                })
            }
        }
    }

    /// Stops accepting requests, lets queued and running ones finish, and waits for the
    /// engine thread.
    pub fn shutdown(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Slot {
    cache: KvCache,
    /// Tokens whose keys and values the cache holds.
    tokens: Vec<u32>,
    /// Leading positions computed in whole prompt chunks from position 0: what a cold
    /// run computes bit for bit, so they can be reused.
    exact: usize,
    /// `LoraAdapter::id` of the adapter the cache was computed with: the prefix cache
    /// is keyed by it too.
    lora_id: Option<u64>,
    seq: Option<Seq>,
}

struct Seq {
    req: Request,
    dec: Decoder,
    /// Tokens still to feed: the rest of the prompt, or the last generated token.
    pending: Vec<u32>,
    /// Prompt tokens not yet processed (a prefix of `pending` while > 0).
    prompt_left: usize,
    n_prompt: usize,
    n_cached: usize,
    admitted: Instant,
    prompt_time: Duration,
}

struct Engine {
    model: Arc<Model>,
    cfg: SchedulerConfig,
    stats: Arc<Stats>,
    pool: ThreadPool,
    st: ForwardState,
    slots: Vec<Slot>,
    /// Slot indices in admission order, for fair prompt processing.
    order: VecDeque<usize>,
    /// Requests taken from the channel, waiting for a slot, in arrival order.
    pending: VecDeque<Queued>,
}

impl Engine {
    fn new(model: Arc<Model>, cfg: SchedulerConfig, stats: Arc<Stats>) -> Engine {
        let slots = (0..cfg.n_slots.max(1))
            .map(|_| Slot {
                cache: KvCache::new(&model.cfg, cfg.n_ctx_slot),
                tokens: Vec::new(),
                exact: 0,
                lora_id: None,
                seq: None,
            })
            .collect();
        Engine {
            pool: ThreadPool::new(cfg.n_threads.max(1)),
            st: ForwardState::default(),
            model,
            cfg,
            stats,
            slots,
            order: VecDeque::new(),
            pending: VecDeque::new(),
        }
    }

    fn run(mut self, rx: Receiver<Queued>) {
        let mut open = true;
        loop {
            open = self.admit(&rx, open);
            if self.order.is_empty() {
                if !open && self.pending.is_empty() {
                    return;
                }
                continue;
            }
            self.step();
        }
    }

    /// Moves queued requests into free slots, fairly between tenants: a free slot goes
    /// to the oldest request of the tenant holding the fewest slots (and below
    /// `tenant_slots`), so one tenant's many choices or long prompts do not make
    /// another's short request wait for all of them. Blocks while nothing is running
    /// or waiting.
    fn admit(&mut self, rx: &Receiver<Queued>, mut open: bool) -> bool {
        while open {
            let r = if self.order.is_empty() && self.pending.is_empty() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(r) => r,
                    Err(RecvTimeoutError::Timeout) => return open,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(r) => r,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            self.pending.push_back(r);
        }
        // Gone or out of time while waiting: no slot.
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            let r = &self.pending[i].1;
            let cancelled = r.cancel.load(Ordering::Relaxed);
            if cancelled || r.deadline.is_some_and(|d| now >= d) {
                let (t0, mut r) = self.pending.remove(i).expect("in range");
                self.stats
                    .dequeued(&r.opts.tenant, now.saturating_duration_since(t0));
                if !cancelled {
                    (r.sink)(Event::Error(EngineError::Timeout));
                }
            } else {
                i += 1;
            }
        }
        while self.slots.iter().any(|s| s.seq.is_none()) {
            let Some(i) = self.pick() else { break };
            let (t0, r) = self.pending.remove(i).expect("picked from the queue");
            self.stats.dequeued(&r.opts.tenant, t0.elapsed());
            self.start(r);
        }
        open
    }

    /// The waiting request that gets the next free slot.
    fn pick(&self) -> Option<usize> {
        let held = |t: &str| {
            self.slots
                .iter()
                .filter(|s| s.seq.as_ref().is_some_and(|q| q.req.opts.tenant == t))
                .count()
        };
        let cap = self.cfg.tenant_slots;
        let mut best: Option<(usize, usize)> = None;
        for (i, (_, r)) in self.pending.iter().enumerate() {
            let h = held(&r.opts.tenant);
            if cap > 0 && h >= cap {
                continue;
            }
            if best.is_none_or(|(_, bh)| h < bh) {
                best = Some((i, h));
            }
        }
        best.map(|(i, _)| i)
    }

    fn start(&mut self, mut r: Request) {
        if r.cancel.load(Ordering::Relaxed) {
            return;
        }
        // Timed out while queued: never takes a slot.
        if r.deadline.is_some_and(|d| Instant::now() >= d) {
            (r.sink)(Event::Error(EngineError::Timeout));
            return;
        }
        if let Err(e) = self.check(&r) {
            (r.sink)(Event::Error(e));
            return;
        }
        // The free slot whose exactly reusable prefix is longest.
        let nb = self.cfg.n_batch.max(1);
        let lora_id = r.opts.lora.as_ref().map(|a| a.id());
        let reusable = |s: &Slot| {
            if s.lora_id != lora_id {
                return 0;
            }
            let common = s
                .tokens
                .iter()
                .zip(&r.prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(s.exact)
                .min(r.prompt.len() - 1);
            common / nb * nb
        };
        let (idx, reuse) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.seq.is_none())
            .map(|(i, s)| (i, reusable(s)))
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .expect("admit checks for a free slot");
        let slot = &mut self.slots[idx];
        slot.cache.truncate(reuse);
        slot.tokens.truncate(reuse);
        slot.exact = slot.exact.min(reuse);
        slot.lora_id = lora_id;
        self.stats
            .prompt_tokens_cached
            .fetch_add(reuse as u64, Ordering::Relaxed);
        let pending = r.prompt[reuse..].to_vec();
        slot.seq = Some(Seq {
            dec: Decoder::new(&r.opts),
            prompt_left: pending.len(),
            pending,
            n_prompt: r.prompt.len(),
            n_cached: reuse,
            admitted: Instant::now(),
            prompt_time: Duration::ZERO,
            req: r,
        });
        self.order.push_back(idx);
        self.stats.active.store(self.order.len(), Ordering::Relaxed);
    }

    fn check(&self, r: &Request) -> Result<(), EngineError> {
        r.opts
            .sampling
            .validate()
            .map_err(EngineError::InvalidParam)?;
        if r.prompt.is_empty() {
            return Err(EngineError::InvalidParam("the prompt is empty".into()));
        }
        check_lora(&self.model, r.opts.lora.as_deref())?;
        let n_ctx = self.cfg.n_ctx_slot;
        let need = r
            .prompt
            .len()
            .saturating_add(r.opts.max_tokens.unwrap_or(0));
        if r.prompt.len() > n_ctx || need > n_ctx {
            return Err(ModelError::ContextOverflow {
                n_prompt: need,
                n_ctx,
            }
            .into());
        }
        if let Some(&bad) = r
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.model.cfg.n_vocab)
        {
            return Err(EngineError::InvalidParam(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        Ok(())
    }

    /// One forward pass over every active sequence, then one sampling step for each
    /// sequence whose logits came out.
    fn step(&mut self) {
        let now = Instant::now();
        // Drop cancelled and timed-out sequences before spending compute on them.
        for &i in self.order.clone().iter() {
            let seq = self.slots[i].seq.as_ref().expect("ordered slots are busy");
            if seq.req.cancel.load(Ordering::Relaxed) {
                self.finish(i, FinishReason::Cancelled);
            } else if seq.req.deadline.is_some_and(|d| now >= d) {
                self.fail(i, EngineError::Timeout);
            }
        }
        if self.order.is_empty() {
            return;
        }
        let nb = self.cfg.n_batch.max(1);
        // Which slots take part, and how many tokens each feeds.
        let mut plan: Vec<(usize, usize, bool)> = Vec::new();
        // Prompt chunks share a budget of n_batch tokens per step (the first always
        // fits), so short prompts arriving together are processed together while a
        // long one still delays generating sequences by one chunk at most.
        let mut prefill = 0;
        for &i in &self.order {
            let seq = self.slots[i].seq.as_ref().expect("busy");
            if seq.prompt_left > 0 {
                // Chunks start at multiples of n_batch, as a cold run cuts them, and
                // are never shortened to fit the budget (that would change kernels).
                let pos = self.slots[i].cache.len();
                let n = (nb - pos % nb).min(seq.prompt_left);
                if prefill > 0 && prefill + n > nb {
                    continue;
                }
                prefill += n;
                plan.push((i, n, n == seq.prompt_left));
            } else {
                plan.push((i, 1, true));
            }
        }
        let mut batch: Vec<SeqBatch> = Vec::with_capacity(plan.len());
        let mut n_tokens = 0;
        // Disjoint mutable borrows of the planned slots.
        let mut slot_refs: Vec<Option<&mut Slot>> = self.slots.iter_mut().map(Some).collect();
        for &(i, n, last) in &plan {
            let slot = slot_refs[i].take().expect("each slot planned once");
            let seq = slot.seq.as_ref().expect("busy");
            n_tokens += n;
            batch.push(SeqBatch {
                cache: &mut slot.cache,
                tokens: &seq.pending[..n],
                logits: if last {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                },
                lora: seq.req.opts.lora.as_deref(),
            });
        }
        self.model
            .forward()
            .run(&self.pool, &mut self.st, &mut batch);
        drop(batch);
        self.stats.batch_tokens.store(n_tokens, Ordering::Relaxed);
        self.stats.batch_seqs.store(plan.len(), Ordering::Relaxed);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);

        let n_vocab = self.model.cfg.n_vocab;
        let mut row = 0;
        for &(i, n, last) in &plan {
            let slot = &mut self.slots[i];
            let seq = slot.seq.as_mut().expect("busy");
            let fed: Vec<u32> = seq.pending.drain(..n).collect();
            slot.tokens.extend_from_slice(&fed);
            if seq.prompt_left > 0 {
                seq.prompt_left -= n;
                // Whole chunks from a chunk boundary are exact.
                let len = slot.tokens.len();
                if slot.exact + n == len && (n == nb || len.is_multiple_of(nb)) {
                    slot.exact = len;
                }
                if seq.prompt_left == 0 {
                    seq.prompt_time = seq.admitted.elapsed();
                }
            }
            if !last {
                continue;
            }
            let logits = &self.st.logits[row * n_vocab..(row + 1) * n_vocab];
            row += 1;
            // A client gone or a deadline passed during the forward pass: no sampling
            // (constrained sampling may cost more than the pass), the slot is freed now.
            if seq.req.cancel.load(Ordering::Relaxed) {
                self.finish(i, FinishReason::Cancelled);
                continue;
            }
            if seq.req.deadline.is_some_and(|d| Instant::now() >= d) {
                self.fail(i, EngineError::Timeout);
                continue;
            }
            let step = seq.dec.next(&self.model.tokenizer, logits, &slot.tokens);
            match step {
                Step::Finish { reason, text } => self.finish_with(i, reason, Some(text)),
                Step::Token {
                    token,
                    text,
                    logprob,
                } => {
                    if !(seq.req.sink)(Event::Token {
                        token,
                        text,
                        logprob,
                    }) {
                        self.finish(i, FinishReason::Cancelled);
                    } else if slot.cache.len() + 1 > slot.cache.n_ctx() {
                        self.finish(i, FinishReason::ContextFull);
                    } else {
                        seq.pending.push(token);
                    }
                }
            }
        }
        let used: usize = self.slots.iter().map(|s| s.cache.len()).sum();
        self.stats.kv_used.store(used, Ordering::Relaxed);
    }

    fn release(&mut self, i: usize) -> Option<Seq> {
        let seq = self.slots[i].seq.take();
        self.order.retain(|&j| j != i);
        self.stats.active.store(self.order.len(), Ordering::Relaxed);
        seq
    }

    fn finish(&mut self, i: usize, reason: FinishReason) {
        self.finish_with(i, reason, None)
    }

    /// Ends slot `i`'s sequence; `tail` is the final text when the decoder already ended.
    fn finish_with(&mut self, i: usize, reason: FinishReason, tail: Option<String>) {
        let Some(mut seq) = self.release(i) else {
            return;
        };
        let tail = tail.unwrap_or_else(|| seq.dec.finish(reason));
        let prompt_time = if seq.prompt_left == 0 {
            seq.prompt_time
        } else {
            seq.admitted.elapsed()
        };
        (seq.req.sink)(Event::Done(Outcome {
            finish: reason,
            tail,
            n_prompt: seq.n_prompt,
            n_cached: seq.n_cached,
            n_gen: seq.dec.tokens.len(),
            prompt_time,
            total_time: seq.admitted.elapsed(),
        }));
    }

    fn fail(&mut self, i: usize, e: EngineError) {
        if let Some(mut seq) = self.release(i) {
            (seq.req.sink)(Event::Error(e));
        }
    }
}
