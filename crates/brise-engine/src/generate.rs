//! Text generation for one sequence: prompt processing with prefix reuse, sampling,
//! streaming UTF-8 text, stop strings, max tokens and the context limit.

use crate::json::{JsonMatcher, Schema};
use crate::sampler::{Sampler, SamplingParams};
use brise_kernels::pool::ThreadPool;
use brise_model::forward::{ForwardState, LogitsWanted, SeqBatch};
use brise_model::kv::KvCache;
use brise_model::tokenizer::Tokenizer;
use brise_model::{LoraAdapter, Model, ModelError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// llama.cpp's default physical batch: prompts are processed in chunks of this many
/// tokens, which also fixes which kernels each chunk uses.
pub const DEFAULT_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    #[error("the request took longer than its timeout")]
    Timeout,
}

/// One conversation's cache and the tokens it holds.
pub struct Session {
    pub cache: KvCache,
    pub tokens: Vec<u32>,
    /// `LoraAdapter::id` of the adapter the cache was computed with.
    lora_id: Option<u64>,
}

impl Session {
    pub fn new(model: &Model, n_ctx: usize) -> Session {
        Session {
            cache: KvCache::new(&model.cfg, n_ctx),
            tokens: Vec::new(),
            lora_id: None,
        }
    }

    pub fn n_ctx(&self) -> usize {
        self.cache.n_ctx()
    }

    pub fn clear(&mut self) {
        self.cache.truncate(0);
        self.tokens.clear();
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    /// `None`: until end of sequence or a full context.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub n_batch: usize,
    /// Constrain the output to JSON matching this schema.
    pub json: Option<Arc<Schema>>,
    /// Report each generated token's log probability, with this many alternatives.
    pub logprobs: Option<usize>,
    /// End-of-generation tokens are not sampled before this many tokens.
    pub min_tokens: usize,
    /// The LoRA adapter (version) this request runs with; `None` for the base model.
    pub lora: Option<Arc<LoraAdapter>>,
    /// Control tokens written into the output as their text (as llama.cpp's preserved
    /// tokens), such as Mistral's `[TOOL_CALLS]`; other control tokens write nothing.
    pub preserve: Vec<u32>,
    /// Tokens the output starts with, as given (while the constraint allows them): a
    /// forced tool call opens with its format's own token (`[TOOL_CALLS]`,
    /// `<tool_call>`), which a byte-level constraint could also match spelled out in
    /// ordinary tokens.
    pub prefix: Vec<u32>,
    /// End a generation stuck in a loop (`None`: never).
    pub repetition_stop: Option<RepetitionStop>,
    /// Whom the request is for (the server's tenant): the scheduler shares slots fairly
    /// between tenants. Empty: nobody in particular.
    pub tenant: String,
}

/// Ends a generation whose last tokens are one cycle of `period` tokens (1 to
/// `max_period`) repeated: at least `min_repeats` times and over at least `min_span`
/// tokens. Small models at low temperature fall into such loops and would otherwise
/// fill their whole budget with them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepetitionStop {
    pub min_span: usize,
    pub min_repeats: usize,
    pub max_period: usize,
}

impl Default for RepetitionStop {
    /// 64 tokens and 4 cycles: 64 times one token, 16 times a 4-token phrase, 4 times a
    /// sentence of up to 256 tokens. Ordinary text and code do not repeat a cycle
    /// verbatim like that; a table of zeros may, which is why a request's own
    /// `max_tokens` turns this off.
    fn default() -> Self {
        RepetitionStop {
            min_span: 64,
            min_repeats: 4,
            max_period: 256,
        }
    }
}

/// [`RepetitionStop`]'s state: for each period p, how many of the last tokens equal the
/// token p before them. O(max_period) per token, no rescans.
struct RepeatTracker {
    rule: RepetitionStop,
    runs: Vec<u32>,
}

impl RepeatTracker {
    fn new(rule: RepetitionStop) -> RepeatTracker {
        RepeatTracker {
            rule,
            runs: vec![0; rule.max_period + 1],
        }
    }

    /// After `tokens`' last token was added: the (period, repeats) of a loop, if any.
    fn push(&mut self, tokens: &[u32]) -> Option<(usize, usize)> {
        let n = tokens.len().checked_sub(1)?;
        let last = tokens[n];
        let mut hit = None;
        for p in 1..=self.rule.max_period.min(n) {
            let r = &mut self.runs[p];
            if tokens[n - p] == last {
                *r += 1;
            } else {
                *r = 0;
            }
            // The last `run + p` tokens have period p.
            let span = *r as usize + p;
            if hit.is_none() && span >= self.rule.min_span.max(self.rule.min_repeats * p) {
                hit = Some((p, span / p));
            }
        }
        hit
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            sampling: SamplingParams::default(),
            max_tokens: None,
            stop: Vec::new(),
            n_batch: DEFAULT_BATCH,
            json: None,
            logprobs: None,
            min_tokens: 0,
            lora: None,
            preserve: Vec::new(),
            prefix: Vec::new(),
            repetition_stop: None,
            tenant: String::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// [`RepetitionStop`]: the last `period × repeats` tokens are one cycle of `period`
    /// tokens repeated.
    Repetition { period: u32, repeats: u32 },
    /// The context is full.
    ContextFull,
    /// The caller stopped it.
    Cancelled,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::Cancelled => "stop",
            FinishReason::Length | FinishReason::ContextFull | FinishReason::Repetition { .. } => {
                "length"
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub n_prompt: usize,
    /// Prompt tokens found in the cache and not processed again.
    pub n_cached: usize,
    pub prompt_time: Duration,
    pub gen_time: Duration,
    /// Time from the call to the first generated token.
    pub first_token_time: Duration,
}

impl Generation {
    pub fn prompt_tps(&self) -> f64 {
        (self.n_prompt - self.n_cached) as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    pub fn gen_tps(&self) -> f64 {
        self.tokens.len() as f64 / self.gen_time.as_secs_f64().max(1e-9)
    }
}

/// Turns token bytes into complete UTF-8 text, holding back incomplete sequences.
#[derive(Default)]
pub struct Utf8Stream {
    buf: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.buf.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.buf) {
                Ok(s) => {
                    out.push_str(s);
                    self.buf.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.buf[..good]).expect("valid prefix"));
                    match e.error_len() {
                        None => {
                            self.buf.drain(..good);
                            return out;
                        }
                        Some(n) => {
                            out.push('\u{FFFD}');
                            self.buf.drain(..good + n);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left at the end (an incomplete sequence becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        s
    }
}

/// Holds back text that may be the start of a stop string.
struct StopScan<'a> {
    stops: &'a [String],
    pending: String,
}

impl StopScan<'_> {
    /// Returns (text safe to emit, whether a stop string was hit).
    fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(i) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..i].to_string();
            self.pending.clear();
            return (out, true);
        }
        let mut hold = 0;
        for s in self.stops {
            for l in (1..s.len().min(self.pending.len() + 1)).rev() {
                if s.is_char_boundary(l) && self.pending.ends_with(&s[..l]) {
                    hold = hold.max(l);
                    break;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }
}

/// A generated token's log probability under the model (log-softmax of the raw logits,
/// before penalties, temperature and truncation), and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    pub fn of(logits: &[f32], token: u32, n_top: usize) -> TokenLogprob {
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let lse = max
            + logits
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let lp = |t: u32| (logits[t as usize] as f64 - lse) as f32;
        let mut top: Vec<(u32, f32)> = Vec::new();
        if n_top > 0 {
            let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
            let k = n_top.min(idx.len());
            let by = |a: &u32, b: &u32| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            };
            idx.select_nth_unstable_by(k - 1, by);
            idx.truncate(k);
            idx.sort_unstable_by(by);
            top = idx.into_iter().map(|t| (t, lp(t))).collect();
        }
        TokenLogprob {
            token,
            logprob: lp(token),
            top,
        }
    }
}

/// What one sampling step did.
#[derive(Debug)]
pub enum Step {
    /// `token` was generated (feed it next); `text` is ready to stream.
    Token {
        token: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Generation ended; `text` is what was still held back and is now final.
    Finish { reason: FinishReason, text: String },
}

/// The per-sequence side of generation: sampling, UTF-8 assembly, stop strings and
/// `max_tokens`. `Generator` and the batching scheduler share it.
pub struct Decoder {
    sampler: Sampler,
    utf8: Utf8Stream,
    stops: Vec<String>,
    pending: String,
    max_tokens: Option<usize>,
    /// Generated tokens (the end-of-generation token is not one of them).
    pub tokens: Vec<u32>,
    /// Text streamed so far.
    pub text: String,
    done: bool,
    json: Option<JsonMatcher>,
    masked: Vec<f32>,
    logprobs: Option<usize>,
    min_tokens: usize,
    preserve: Vec<u32>,
    prefix: Vec<u32>,
    repeats: Option<RepeatTracker>,
}

impl Decoder {
    pub fn new(opts: &GenerateOptions) -> Decoder {
        Decoder {
            sampler: Sampler::new(opts.sampling.clone()),
            utf8: Utf8Stream::default(),
            stops: opts.stop.clone(),
            pending: String::new(),
            max_tokens: opts.max_tokens,
            tokens: Vec::new(),
            text: String::new(),
            done: false,
            json: opts.json.clone().map(JsonMatcher::new),
            masked: Vec::new(),
            logprobs: opts.logprobs,
            min_tokens: opts.min_tokens,
            preserve: opts.preserve.clone(),
            prefix: opts.prefix.clone(),
            repeats: opts.repetition_stop.map(RepeatTracker::new),
        }
    }

    /// The bytes `tok` adds to the output.
    fn piece(preserve: &[u32], tk: &Tokenizer, tok: u32) -> Vec<u8> {
        tk.token_to_piece(tok, preserve.contains(&tok))
    }

    /// Whether the constraint (if any) lets `tok` come next.
    fn allowed(json: &JsonMatcher, preserve: &[u32], tk: &Tokenizer, tok: u32) -> bool {
        if tk.is_eog(tok) {
            json.is_complete()
        } else {
            json.allows(&Self::piece(preserve, tk, tok))
        }
    }

    /// Samples, constrained: like llama.cpp's grammar sampling, the unconstrained choice
    /// is kept when the constraint allows it, otherwise every disallowed token is masked
    /// and the sampler draws again.
    fn sample(&mut self, tk: &Tokenizer, logits: &[f32], history: &[u32]) -> Option<u32> {
        if let Some(&t) = self.prefix.get(self.tokens.len())
            && self
                .json
                .as_ref()
                .is_none_or(|j| Self::allowed(j, &self.preserve, tk, t))
        {
            return Some(t);
        }
        // min_tokens holds back the end, unless a finished constrained value allows
        // nothing else (the constraint wins: its output stays valid).
        let constraint_done = self.json.as_ref().is_some_and(|j| !j.can_continue());
        if self.tokens.len() < self.min_tokens && !constraint_done {
            let mut l = logits.to_vec();
            for e in tk.eog_ids() {
                if let Some(x) = l.get_mut(e as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
            return self.sample_constrained(tk, &l, history);
        }
        self.sample_constrained(tk, logits, history)
    }

    fn sample_constrained(
        &mut self,
        tk: &Tokenizer,
        logits: &[f32],
        history: &[u32],
    ) -> Option<u32> {
        let tok = self.sampler.sample(logits, history);
        let Some(json) = &self.json else {
            return Some(tok);
        };
        if Self::allowed(json, &self.preserve, tk, tok) {
            return Some(tok);
        }
        self.masked.clear();
        self.masked.extend_from_slice(logits);
        let mut any = false;
        for (id, l) in self.masked.iter_mut().enumerate() {
            if l.is_finite() && Self::allowed(json, &self.preserve, tk, id as u32) {
                any = true;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if !any {
            return None;
        }
        let t = self.sampler.sample(&self.masked, history);
        Some(t)
    }

    /// Samples the next token from `logits` (the last position's), given the sequence's
    /// tokens so far (for penalties).
    pub fn next(&mut self, tk: &Tokenizer, logits: &[f32], history: &[u32]) -> Step {
        if self.max_tokens.is_some_and(|m| self.tokens.len() >= m) {
            let text = self.finish(FinishReason::Length);
            return Step::Finish {
                reason: FinishReason::Length,
                text,
            };
        }
        let Some(tok) = self.sample(tk, logits, history) else {
            // No token fits the constraint (cannot happen with a satisfiable schema).
            let text = self.finish(FinishReason::Stop);
            return Step::Finish {
                reason: FinishReason::Stop,
                text,
            };
        };
        if let Some(j) = &mut self.json
            && !tk.is_eog(tok)
        {
            j.advance(&Self::piece(&self.preserve, tk, tok));
        }
        if tk.is_eog(tok) {
            let text = self.finish(FinishReason::Stop);
            return Step::Finish {
                reason: FinishReason::Stop,
                text,
            };
        }
        self.tokens.push(tok);
        let piece = self.utf8.push(&Self::piece(&self.preserve, tk, tok));
        let mut scan = StopScan {
            stops: &self.stops,
            pending: std::mem::take(&mut self.pending),
        };
        let (emit, hit) = scan.push(&piece);
        self.pending = scan.pending;
        self.text.push_str(&emit);
        if hit {
            self.done = true;
            return Step::Finish {
                reason: FinishReason::Stop,
                text: emit,
            };
        }
        if let Some((period, repeats)) = self.repeats.as_mut().and_then(|r| r.push(&self.tokens)) {
            let reason = FinishReason::Repetition {
                period: period as u32,
                repeats: repeats as u32,
            };
            let tail = self.finish(reason);
            return Step::Finish {
                reason,
                text: emit + &tail,
            };
        }
        Step::Token {
            token: tok,
            text: emit,
            logprob: self.logprobs.map(|n| TokenLogprob::of(logits, tok, n)),
        }
    }

    /// Ends the generation for `reason`, returning held-back text that is now final
    /// (none after a stop string or a cancellation).
    pub fn finish(&mut self, reason: FinishReason) -> String {
        if self.done {
            return String::new();
        }
        self.done = true;
        if reason == FinishReason::Cancelled {
            return String::new();
        }
        let rest = self.utf8.finish();
        let mut scan = StopScan {
            stops: &self.stops,
            pending: std::mem::take(&mut self.pending),
        };
        let (emit, _) = scan.push(&rest);
        let tail = emit + &scan.pending;
        self.text.push_str(&tail);
        tail
    }
}

/// Refuses an adapter made for another model shape.
pub fn check_lora(model: &Model, lora: Option<&LoraAdapter>) -> Result<(), EngineError> {
    match lora {
        Some(a) if !a.fits(&model.cfg) => Err(EngineError::InvalidParam(format!(
            "the LoRA adapter does not fit {} (made for a model of another shape)",
            model.name
        ))),
        _ => Ok(()),
    }
}

/// Runs generations on one model with one thread pool.
pub struct Generator<'m> {
    pub model: &'m Model,
    pub pool: ThreadPool,
    st: ForwardState,
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m Model, n_threads: usize) -> Generator<'m> {
        Generator {
            model,
            pool: ThreadPool::new(n_threads),
            st: ForwardState::default(),
        }
    }

    /// Processes `tokens` into the session (prompt or continuation), in chunks of
    /// `n_batch`. Leaves the last token's logits in the forward state.
    fn feed(
        &mut self,
        s: &mut Session,
        tokens: &[u32],
        n_batch: usize,
        lora: Option<&LoraAdapter>,
    ) {
        let fwd = self.model.forward();
        let chunks: Vec<&[u32]> = tokens.chunks(n_batch.max(1)).collect();
        for (i, c) in chunks.iter().enumerate() {
            let logits = if i + 1 == chunks.len() {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            fwd.run(
                &self.pool,
                &mut self.st,
                &mut [SeqBatch {
                    cache: &mut s.cache,
                    tokens: c,
                    logits,
                    lora,
                }],
            );
            s.tokens.extend_from_slice(c);
        }
    }

    /// Generates a continuation of `prompt` (which replaces whatever the session held,
    /// reusing the longest common prefix from its cache). `on_text` receives text as it
    /// is produced and returns `false` to stop.
    pub fn generate(
        &mut self,
        s: &mut Session,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, EngineError> {
        opts.sampling
            .validate()
            .map_err(EngineError::InvalidParam)?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidParam("the prompt is empty".into()));
        }
        let n_ctx = s.n_ctx();
        if prompt.len() > n_ctx {
            return Err(ModelError::ContextOverflow {
                n_prompt: prompt.len(),
                n_ctx,
            }
            .into());
        }
        if let Some(&bad) = prompt
            .iter()
            .find(|&&t| t as usize >= self.model.cfg.n_vocab)
        {
            return Err(EngineError::InvalidParam(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        let lora = opts.lora.as_deref();
        check_lora(self.model, lora)?;
        let start = Instant::now();
        // Reuse the cached prefix, but always recompute the last prompt token: its
        // logits start the generation. KV computed under another adapter is not reused.
        let lora_id = lora.map(LoraAdapter::id);
        let common = if s.lora_id == lora_id {
            s.tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(prompt.len() - 1)
        } else {
            0
        };
        s.lora_id = lora_id;
        s.cache.truncate(common);
        s.tokens.truncate(common);
        self.feed(s, &prompt[common..], opts.n_batch, lora);
        let prompt_time = start.elapsed();

        let mut dec = Decoder::new(opts);
        let mut first_token_time = Duration::ZERO;
        let gen_start = Instant::now();
        let tk = &self.model.tokenizer;
        let finish = loop {
            let step = dec.next(tk, &self.st.logits, &s.tokens);
            if first_token_time.is_zero() {
                first_token_time = start.elapsed();
            }
            match step {
                Step::Finish { reason, text } => {
                    if !text.is_empty() {
                        on_text(&text);
                    }
                    break reason;
                }
                Step::Token { token, text, .. } => {
                    if !text.is_empty() && !on_text(&text) {
                        dec.finish(FinishReason::Cancelled);
                        break FinishReason::Cancelled;
                    }
                    if s.cache.len() + 1 > n_ctx {
                        let text = dec.finish(FinishReason::ContextFull);
                        if !text.is_empty() {
                            on_text(&text);
                        }
                        break FinishReason::ContextFull;
                    }
                    self.feed(s, &[token], opts.n_batch, lora);
                }
            }
        };
        let text = std::mem::take(&mut dec.text);
        let out = std::mem::take(&mut dec.tokens);
        Ok(Generation {
            text,
            n_prompt: prompt.len(),
            n_cached: common,
            tokens: out,
            finish,
            prompt_time,
            gen_time: gen_start.elapsed(),
            first_token_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stream_holds_partial_sequences() {
        let mut u = Utf8Stream::default();
        let e = "é😀".as_bytes();
        assert_eq!(u.push(&e[..1]), "");
        assert_eq!(u.push(&e[1..3]), "é");
        assert_eq!(u.push(&e[3..]), "😀");
        assert_eq!(u.push(&[0xff, b'a']), "\u{FFFD}a");
        assert_eq!(u.push(&[0xe2, 0x82]), "");
        assert_eq!(u.finish(), "\u{FFFD}");
    }

    #[test]
    fn stop_strings_hold_back_prefixes() {
        let stops = vec!["</end>".to_string(), "STOP".to_string()];
        let mut s = StopScan {
            stops: &stops,
            pending: String::new(),
        };
        assert_eq!(s.push("hello </"), ("hello ".to_string(), false));
        assert_eq!(s.push("en"), (String::new(), false));
        assert_eq!(s.push("x"), ("</enx".to_string(), false));
        assert_eq!(s.push(" ST"), (" ".to_string(), false));
        assert_eq!(s.push("OP and more"), (String::new(), true));
    }

    /// Feeds `tokens` one by one; the index (and loop) of the first stop.
    fn first_stop(rule: RepetitionStop, tokens: &[u32]) -> Option<(usize, (usize, usize))> {
        let mut t = RepeatTracker::new(rule);
        (1..=tokens.len()).find_map(|n| t.push(&tokens[..n]).map(|hit| (n, hit)))
    }

    #[test]
    fn repetition_stop_needs_the_span_and_the_repeats() {
        let rule = RepetitionStop::default();
        // One token 64 times: stops at the 64th.
        assert_eq!(first_stop(rule, &[7; 100]), Some((64, (1, 64))));
        assert_eq!(first_stop(rule, &[7; 63]), None);
        // A 4-token phrase after an unrelated start: 16 cycles = 64 tokens.
        let mut v: Vec<u32> = (100..130).collect();
        for _ in 0..20 {
            v.extend([1, 2, 3, 4]);
        }
        assert_eq!(first_stop(rule, &v), Some((30 + 64, (4, 16))));
        // A 40-token sentence: 4 cycles (160 tokens), not 64 tokens' worth.
        let sentence: Vec<u32> = (1000..1040).collect();
        let v: Vec<u32> = sentence.iter().cycle().take(200).copied().collect();
        assert_eq!(first_stop(rule, &v), Some((160, (40, 4))));
        assert_eq!(first_stop(rule, &v[..159]), None);
        // Numbered items (1. x 2. x ...) are no exact cycle.
        let v: Vec<u32> = (0..200u32).flat_map(|i| [500 + i, 9, 9, 8]).collect();
        assert_eq!(first_stop(rule, &v), None);
        // A cycle longer than max_period never stops.
        let long: Vec<u32> = (0..300).collect();
        let v: Vec<u32> = long.iter().cycle().take(1500).copied().collect();
        assert_eq!(first_stop(rule, &v), None);
    }
}
