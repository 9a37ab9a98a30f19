//! The evaluation gate: a trained version is promoted only when it beats the current one
//! on held-out feedback without forgetting general text.
//!
//! Every number comes from the inference forward pass (`Forward::run`, all logits, a
//! fresh cache per sequence), so the gate measures the model that will be served:
//!
//! - **NLL**: mean negative log-likelihood per token of the held-out answers users
//!   preferred or corrected to (SFT answers, DPO chosen, KTO desirable). Must fall.
//! - **Preference accuracy**: the share of held-out DPO pairs whose chosen answer is
//!   more likely (summed log-probability) than the rejected one. Must rise, or stay at
//!   1.0 when already perfect (it cannot rise further).
//! - **KTO accuracy**: the share of held-out KTO examples a version moves the right way
//!   from the base model: a desirable answer more likely than under the base, an
//!   undesirable one less likely. The base scores 0 by definition (it moves nothing).
//!   Must rise, as preference accuracy, and reach `kto_min_accuracy`.
//! - **Perplexity** on [`GENERAL_TEXT`] (plain English prose kept in the repo, in
//!   windows of the model's tokens): must not rise more than `ppl_max_increase` over
//!   the current version, nor over the base (so promotions cannot drift by 5% each).
//!
//! A metric without data (no pairs held out, say) is skipped and the report says so.
//! The gate passes when no check fails, at least one feedback metric (NLL, preference or
//! KTO accuracy) passes, and the perplexity check passes.

use crate::behaviour::{Behaviour, REPEAT_CHRF};
use crate::data::{Example, Item, Seq};
use brise_kernels::ops;
use brise_kernels::pool::ThreadPool;
use brise_model::forward::{ForwardState, LogitsWanted, SeqBatch};
use brise_model::kv::KvCache;
use brise_model::{LoraAdapter, Model, ModelError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The general text perplexity is measured on (crates/brise-train/data/general.txt):
/// hand-written prose on everyday topics, in no domain users are likely to teach, so a
/// rise means the adapter changed the model beyond what the feedback asked for.
pub const GENERAL_TEXT: &str = include_str!("../data/general.txt");

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

pub type Result<T> = std::result::Result<T, EvalError>;

/// Runs sequences through the model, one at a time, each on a fresh cache.
pub struct Scorer<'m> {
    model: &'m Model,
    pool: ThreadPool,
    st: ForwardState,
}

impl<'m> Scorer<'m> {
    pub fn new(model: &'m Model, n_threads: usize) -> Scorer<'m> {
        Scorer {
            model,
            pool: ThreadPool::new(n_threads.max(1)),
            st: ForwardState::default(),
        }
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// log p(token | everything before it) for each completion token, in f64
    /// (`brise_kernels::ops::log_prob` of the logits one position earlier).
    pub fn token_logprobs(&mut self, adapter: Option<&LoraAdapter>, seq: &Seq) -> Result<Vec<f64>> {
        let cfg = &self.model.cfg;
        if seq.prompt.is_empty() {
            return Err(EvalError::Invalid(
                "a sequence needs at least one prompt token to predict its first completion token"
                    .into(),
            ));
        }
        if let Some(&t) = seq
            .prompt
            .iter()
            .chain(&seq.completion)
            .find(|&&t| t as usize >= cfg.n_vocab)
        {
            return Err(EvalError::Invalid(format!(
                "token {t} is outside the vocabulary of {} ({} tokens)",
                self.model.name, cfg.n_vocab
            )));
        }
        if let Some(a) = adapter
            && !a.fits(cfg)
        {
            return Err(EvalError::Invalid(format!(
                "the adapter does not fit {} (other shapes or Q/K layout)",
                self.model.name
            )));
        }
        if seq.completion.is_empty() {
            return Ok(vec![]);
        }
        let tokens = seq.tokens();
        // Sized as llama.cpp pads the KV length (256s), which is what a served slot
        // gives: the padded length picks the attention's arithmetic, so this scores
        // the sequence exactly as serving computes it.
        let mut cache = KvCache::new(cfg, tokens.len().div_ceil(256) * 256);
        self.model.forward().run(
            &self.pool,
            &mut self.st,
            &mut [SeqBatch {
                cache: &mut cache,
                tokens: &tokens,
                logits: LogitsWanted::All,
                lora: adapter,
            }],
        );
        let nv = cfg.n_vocab;
        let p = seq.prompt.len();
        Ok(seq
            .completion
            .iter()
            .enumerate()
            .map(|(j, &t)| {
                let row = p - 1 + j;
                ops::log_prob(&self.st.logits[row * nv..(row + 1) * nv], t as usize)
            })
            .collect())
    }

    /// Greedy generation (argmax, as `temperature: 0` serves) of at most `max_new`
    /// tokens after `prompt`, stopping after an end-of-generation token (kept).
    pub fn generate(
        &mut self,
        adapter: Option<&LoraAdapter>,
        prompt: &[u32],
        max_new: usize,
    ) -> Result<Vec<u32>> {
        let cfg = &self.model.cfg;
        if prompt.is_empty() {
            return Err(EvalError::Invalid("generation needs a prompt".into()));
        }
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= cfg.n_vocab) {
            return Err(EvalError::Invalid(format!(
                "token {t} is outside the vocabulary of {} ({} tokens)",
                self.model.name, cfg.n_vocab
            )));
        }
        let max_new = max_new.min(cfg.n_ctx_train.saturating_sub(prompt.len()));
        let mut cache = KvCache::new(cfg, (prompt.len() + max_new).div_ceil(256) * 256);
        let nv = cfg.n_vocab;
        let mut out = Vec::new();
        let mut next: Vec<u32> = prompt.to_vec();
        while out.len() < max_new {
            self.model.forward().run(
                &self.pool,
                &mut self.st,
                &mut [SeqBatch {
                    cache: &mut cache,
                    tokens: &next,
                    logits: LogitsWanted::Last,
                    lora: adapter,
                }],
            );
            let row = &self.st.logits[..nv];
            let mut best = 0;
            for (i, &x) in row.iter().enumerate() {
                if x > row[best] {
                    best = i;
                }
            }
            let t = best as u32;
            out.push(t);
            if self.model.tokenizer.is_eog(t) {
                break;
            }
            next = vec![t];
        }
        Ok(out)
    }

    /// The sum of the completion's token log-probabilities.
    pub fn score(&mut self, adapter: Option<&LoraAdapter>, seq: &Seq) -> Result<f64> {
        Ok(self.token_logprobs(adapter, seq)?.iter().sum())
    }
}

/// `text` tokenized once and cut into windows of at most `window` tokens, each scored
/// from its start: after BOS when the model uses one (every token is predicted), else
/// after the window's first token.
pub fn text_windows(model: &Model, text: &str, window: usize) -> Result<Vec<Seq>> {
    if window < 2 {
        return Err(EvalError::Invalid(format!(
            "a perplexity window needs at least 2 tokens, not {window}"
        )));
    }
    let tk = &model.tokenizer;
    let ids = tk.encode(text, false, false)?;
    let bos = tk.bos.filter(|_| tk.add_bos);
    let per = window - usize::from(bos.is_some());
    Ok(ids
        .chunks(per)
        .filter_map(|c| match bos {
            Some(b) => Some(Seq {
                prompt: vec![b],
                completion: c.to_vec(),
            }),
            None if c.len() >= 2 => Some(Seq {
                prompt: c[..1].to_vec(),
                completion: c[1..].to_vec(),
            }),
            None => None,
        })
        .collect())
}

/// One version's log-probabilities on one held-out example.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ExampleScore {
    Sft {
        logp: f64,
        tokens: usize,
    },
    Pref {
        chosen: f64,
        chosen_tokens: usize,
        rejected: f64,
    },
    Kto {
        logp: f64,
        tokens: usize,
        desirable: bool,
    },
}

pub fn score_examples(
    s: &mut Scorer,
    adapter: Option<&LoraAdapter>,
    examples: &[&Example],
) -> Result<Vec<ExampleScore>> {
    examples
        .iter()
        .map(|e| {
            Ok(match &e.item {
                Item::Sft(seq) => ExampleScore::Sft {
                    logp: s.score(adapter, seq)?,
                    tokens: seq.completion.len(),
                },
                Item::Pref { chosen, rejected } => ExampleScore::Pref {
                    chosen: s.score(adapter, chosen)?,
                    chosen_tokens: chosen.completion.len(),
                    rejected: s.score(adapter, rejected)?,
                },
                Item::Kto { seq, desirable } => ExampleScore::Kto {
                    logp: s.score(adapter, seq)?,
                    tokens: seq.completion.len(),
                    desirable: *desirable,
                },
            })
        })
        .collect()
}

/// Summed NLL and token count over the windows.
pub fn text_nll(
    s: &mut Scorer,
    adapter: Option<&LoraAdapter>,
    windows: &[Seq],
) -> Result<(f64, usize)> {
    let mut nll = 0.0;
    let mut n = 0;
    for w in windows {
        nll -= s.score(adapter, w)?;
        n += w.completion.len();
    }
    Ok((nll, n))
}

/// What one version scores. `None`: no data for that metric.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Mean NLL per token of the held-out preferred answers.
    pub nll: Option<f64>,
    pub nll_tokens: usize,
    pub nll_answers: usize,
    pub pref_accuracy: Option<f64>,
    pub pref_pairs: usize,
    /// Relative to the base; the base itself scores 0.
    pub kto_accuracy: Option<f64>,
    pub kto_examples: usize,
    /// exp(mean NLL per token) on the general text.
    pub ppl: Option<f64>,
    pub ppl_tokens: usize,
}

/// Metrics from one version's scores, `base` the base model's on the same examples (in
/// the same order), `text` the general text's (summed NLL, tokens).
pub fn metrics(
    scores: &[ExampleScore],
    base: &[ExampleScore],
    text: Option<(f64, usize)>,
) -> Metrics {
    let mut m = Metrics::default();
    let (mut nll, mut pairs_right, mut kto_right) = (0.0, 0, 0);
    for (i, s) in scores.iter().enumerate() {
        match *s {
            ExampleScore::Sft { logp, tokens } => {
                nll -= logp;
                m.nll_tokens += tokens;
                m.nll_answers += 1;
            }
            ExampleScore::Pref {
                chosen,
                chosen_tokens,
                rejected,
            } => {
                nll -= chosen;
                m.nll_tokens += chosen_tokens;
                m.nll_answers += 1;
                m.pref_pairs += 1;
                // A tie is not a preference.
                pairs_right += usize::from(chosen > rejected);
            }
            ExampleScore::Kto {
                logp,
                tokens,
                desirable,
            } => {
                if desirable {
                    nll -= logp;
                    m.nll_tokens += tokens;
                    m.nll_answers += 1;
                }
                m.kto_examples += 1;
                if let Some(ExampleScore::Kto { logp: b, .. }) = base.get(i) {
                    let right = if desirable { logp > *b } else { logp < *b };
                    kto_right += usize::from(right);
                }
            }
        }
    }
    if m.nll_tokens > 0 {
        m.nll = Some(nll / m.nll_tokens as f64);
    }
    if m.pref_pairs > 0 {
        m.pref_accuracy = Some(pairs_right as f64 / m.pref_pairs as f64);
    }
    if m.kto_examples > 0 {
        m.kto_accuracy = Some(kto_right as f64 / m.kto_examples as f64);
    }
    if let Some((sum, n)) = text
        && n > 0
    {
        m.ppl = Some((sum / n as f64).exp());
        m.ppl_tokens = n;
    }
    m
}

/// The default of [`GateConfig::chrf_min_gain`] (see docs/ARCHITECTURE.md, "The gate").
pub const DEFAULT_CHRF_MIN_GAIN: f64 = 5.0;

/// The gate's thresholds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    /// NLL must fall by more than this fraction of the current version's (0: any fall).
    pub nll_min_improvement: f64,
    /// Preference and KTO accuracy must rise by more than this (absolute; 0: any rise),
    /// unless both versions are at 1.0.
    pub accuracy_min_gain: f64,
    /// KTO accuracy must also reach this (most examples moved the right way).
    pub kto_min_accuracy: f64,
    /// Perplexity may rise at most this fraction over the current version and the base.
    pub ppl_max_increase: f64,
    /// Tokens per perplexity window (capped at the model's training context).
    pub ppl_window: usize,
    /// Generate on the held-out prompts and require the answers to change the way users
    /// asked ([`crate::behaviour`]). Off: the likelihood checks alone decide.
    pub behaviour: bool,
    /// The candidate's mean chrF to the held-out corrected answers must exceed the
    /// current version's by at least this many points (of 100), and its answers must be
    /// closer on more than half of the prompts.
    pub chrf_min_gain: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            nll_min_improvement: 0.0,
            accuracy_min_gain: 0.0,
            kto_min_accuracy: 0.5,
            ppl_max_increase: 0.05,
            ppl_window: 256,
            behaviour: true,
            chrf_min_gain: DEFAULT_CHRF_MIN_GAIN,
        }
    }
}

impl GateConfig {
    pub fn validate(&self) -> Result<()> {
        let frac = |name: &str, v: f64| {
            if v.is_finite() && (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(EvalError::Invalid(format!(
                    "{name} must be at least 0 and below 1, not {v}"
                )))
            }
        };
        frac("nll_min_improvement", self.nll_min_improvement)?;
        frac("accuracy_min_gain", self.accuracy_min_gain)?;
        frac("kto_min_accuracy", self.kto_min_accuracy)?;
        if !(self.ppl_max_increase.is_finite() && self.ppl_max_increase >= 0.0) {
            return Err(EvalError::Invalid(format!(
                "ppl_max_increase must be a fraction of at least 0, not {}",
                self.ppl_max_increase
            )));
        }
        if !(self.chrf_min_gain.is_finite() && (0.0..100.0).contains(&self.chrf_min_gain)) {
            return Err(EvalError::Invalid(format!(
                "chrf_min_gain must be at least 0 and below 100 points, not {}",
                self.chrf_min_gain
            )));
        }
        if self.ppl_window < 2 {
            return Err(EvalError::Invalid(format!(
                "ppl_window must be at least 2 tokens, not {}",
                self.ppl_window
            )));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Skipped,
}

/// One rule of the gate, applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// `nll`, `pref_accuracy`, `kto_accuracy`, `ppl`, `ppl_vs_base`.
    pub metric: String,
    pub candidate: Option<f64>,
    pub reference: Option<f64>,
    /// Which version `reference` is: `current` or `base`.
    pub against: String,
    pub rule: String,
    pub outcome: Outcome,
    pub why: String,
}

fn pct(new: f64, old: f64) -> String {
    if old == 0.0 {
        return "n/a".into();
    }
    format!("{:+.2}%", (new / old - 1.0) * 100.0)
}

fn accuracy_check(
    metric: &str,
    cand: Option<f64>,
    cur: Option<f64>,
    cfg: &GateConfig,
    floor: Option<f64>,
) -> Check {
    let rule = match floor {
        Some(f) => format!(
            "must rise by more than {} (or stay at 1.0), and reach {f}",
            cfg.accuracy_min_gain
        ),
        None => format!(
            "must rise by more than {} (or stay at 1.0)",
            cfg.accuracy_min_gain
        ),
    };
    let (outcome, why) = match (cand, cur) {
        (Some(c), Some(r)) => {
            let perfect = c >= 1.0 && r >= 1.0;
            let rose = c - r > cfg.accuracy_min_gain;
            let below = floor.filter(|f| c < *f);
            match (perfect || rose, below) {
                (true, None) if perfect => (Outcome::Pass, "both at 1.0: nothing to gain".into()),
                (true, None) => (Outcome::Pass, format!("{r:.3} → {c:.3}")),
                (true, Some(f)) => (
                    Outcome::Fail,
                    format!("{r:.3} → {c:.3}, below the floor of {f}"),
                ),
                (false, _) => (
                    Outcome::Fail,
                    format!(
                        "{r:.3} → {c:.3}: did not rise by more than {}",
                        cfg.accuracy_min_gain
                    ),
                ),
            }
        }
        _ => (
            Outcome::Skipped,
            match metric {
                "pref_accuracy" => "no held-out preference pairs".to_string(),
                _ => "no held-out KTO examples".to_string(),
            },
        ),
    };
    Check {
        metric: metric.into(),
        candidate: cand,
        reference: cur,
        against: "current".into(),
        rule,
        outcome,
        why,
    }
}

fn ppl_check(
    metric: &str,
    against: &str,
    cand: Option<f64>,
    r: Option<f64>,
    cfg: &GateConfig,
) -> Check {
    let limit = cfg.ppl_max_increase;
    let (outcome, why) = match (cand, r) {
        (Some(c), Some(r)) if c <= r * (1.0 + limit) => {
            (Outcome::Pass, format!("{r:.4} → {c:.4} ({})", pct(c, r)))
        }
        (Some(c), Some(r)) => (
            Outcome::Fail,
            format!(
                "{r:.4} → {c:.4} ({}), more than +{:.1}%",
                pct(c, r),
                limit * 100.0
            ),
        ),
        _ => (Outcome::Skipped, "no general text was scored".into()),
    };
    Check {
        metric: metric.into(),
        candidate: cand,
        reference: r,
        against: against.into(),
        rule: format!("may rise at most {:.1}% over the {against}", limit * 100.0),
        outcome,
        why,
    }
}

/// The gate's decision on metric values: (passed, the checks, a one-line summary).
/// `base` is the base model's metrics when the current version is an adapter (`None`
/// when the current version is the base).
pub fn decide(
    cfg: &GateConfig,
    cand: &Metrics,
    cur: &Metrics,
    base: Option<&Metrics>,
) -> (bool, Vec<Check>, String) {
    let mut checks = Vec::new();
    let floor = cfg.nll_min_improvement;
    checks.push(match (cand.nll, cur.nll) {
        (Some(c), Some(r)) => {
            let ok = c < r * (1.0 - floor);
            Check {
                metric: "nll".into(),
                candidate: Some(c),
                reference: Some(r),
                against: "current".into(),
                rule: format!("must fall by more than {:.1}%", floor * 100.0),
                outcome: if ok { Outcome::Pass } else { Outcome::Fail },
                why: format!(
                    "{r:.4} → {c:.4} ({}){}",
                    pct(c, r),
                    if ok { "" } else { ": did not fall enough" }
                ),
            }
        }
        _ => Check {
            metric: "nll".into(),
            candidate: cand.nll,
            reference: cur.nll,
            against: "current".into(),
            rule: format!("must fall by more than {:.1}%", floor * 100.0),
            outcome: Outcome::Skipped,
            why: "no held-out preferred or corrected answers".into(),
        },
    });
    checks.push(accuracy_check(
        "pref_accuracy",
        cand.pref_accuracy,
        cur.pref_accuracy,
        cfg,
        None,
    ));
    checks.push(accuracy_check(
        "kto_accuracy",
        cand.kto_accuracy,
        cur.kto_accuracy,
        cfg,
        Some(cfg.kto_min_accuracy),
    ));
    checks.push(ppl_check("ppl", "current", cand.ppl, cur.ppl, cfg));
    if let Some(b) = base {
        checks.push(ppl_check("ppl_vs_base", "base", cand.ppl, b.ppl, cfg));
    }
    let failed: Vec<&Check> = checks
        .iter()
        .filter(|c| c.outcome == Outcome::Fail)
        .collect();
    let feedback_pass = checks[..3].iter().any(|c| c.outcome == Outcome::Pass);
    let ppl_pass = checks[3].outcome == Outcome::Pass;
    let passed = failed.is_empty() && feedback_pass && ppl_pass;
    let summary = if passed {
        "passed: better on held-out feedback, general text within bounds".to_string()
    } else if !failed.is_empty() {
        let names: Vec<String> = failed
            .iter()
            .map(|c| format!("{} ({})", c.metric, c.why))
            .collect();
        format!("failed: {}", names.join("; "))
    } else if !feedback_pass {
        "failed: no held-out feedback to show an improvement on".to_string()
    } else {
        "failed: perplexity on the general text was not measured".to_string()
    };
    (passed, checks, summary)
}

/// The gate's decision with the behavioural checks: [`decide`]'s checks, then
/// `chrf` (closeness to held-out corrections), `pair_wins` and `repeats`. It passes when
/// no check fails, perplexity passes, and at least one behavioural check passes; when
/// every behavioural check is skipped (nothing held out to compare answers with, or
/// neither version repeats a thumbed-down answer), [`decide`]'s rule stands and the
/// summary says so.
pub fn decide_with_behaviour(
    cfg: &GateConfig,
    cand: &Metrics,
    cur: &Metrics,
    base: Option<&Metrics>,
    b: &Behaviour,
) -> (bool, Vec<Check>, String) {
    let (likely_pass, mut checks, likely_summary) = decide(cfg, cand, cur, base);
    let first = checks.len();
    let check = |metric: &str, c, r, rule: String, outcome, why: String| Check {
        metric: metric.into(),
        candidate: c,
        reference: r,
        against: "current".into(),
        rule,
        outcome,
        why,
    };
    checks.push(match (b.candidate_chrf, b.current_chrf, b.candidate_win_rate) {
        (Some(c), Some(r), Some(w)) => {
            let ok = c - r >= cfg.chrf_min_gain && w > 0.5;
            check(
                "chrf",
                Some(c),
                Some(r),
                format!(
                    "mean closeness to the held-out corrections (chrF to them minus chrF to what they replaced) must rise by at least {} points, closer on more than half of the prompts",
                    cfg.chrf_min_gain
                ),
                if ok { Outcome::Pass } else { Outcome::Fail },
                format!(
                    "{r:.1} → {c:.1} ({:+.1} points), closer on {:.0}% of {} prompts",
                    c - r,
                    w * 100.0,
                    b.references
                ),
            )
        }
        _ => check(
            "chrf",
            None,
            None,
            "mean chrF to the held-out corrections must rise".into(),
            Outcome::Skipped,
            "no held-out corrected or preferred answers".into(),
        ),
    });
    checks.push(match b.pair_win_rate {
        Some(w) => check(
            "pair_wins",
            Some(w),
            None,
            "the candidate's answers must lean towards the chosen answer more than the current version's on more than half of the held-out pairs".into(),
            if w > 0.5 { Outcome::Pass } else { Outcome::Fail },
            format!("{:.0}% of {} pairs", w * 100.0, b.pairs),
        ),
        None => check(
            "pair_wins",
            None,
            None,
            "win more than half of the held-out pairs".into(),
            Outcome::Skipped,
            "no held-out pairwise choices".into(),
        ),
    });
    let (c, r) = (b.candidate_repeats, b.current_repeats);
    checks.push(if b.rejected == 0 {
        check(
            "repeats",
            None,
            None,
            "must repeat fewer thumbed-down answers".into(),
            Outcome::Skipped,
            "no held-out thumbed-down answers".into(),
        )
    } else {
        let (outcome, why) = if c < r {
            (Outcome::Pass, format!("{r} → {c} of {}", b.rejected))
        } else if c > r || c > 0 {
            (
                Outcome::Fail,
                format!("{r} → {c} of {}: not fewer", b.rejected),
            )
        } else {
            (
                Outcome::Skipped,
                format!("neither version repeats any of the {}", b.rejected),
            )
        };
        check(
            "repeats",
            Some(c as f64),
            Some(r as f64),
            format!(
                "must repeat fewer of the held-out thumbed-down answers (chrF ≥ {REPEAT_CHRF})"
            ),
            outcome,
            why,
        )
    });
    let beh = &checks[first..];
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| c.outcome == Outcome::Fail)
        .map(|c| format!("{} ({})", c.metric, c.why))
        .collect();
    let any_beh = beh.iter().any(|c| c.outcome == Outcome::Pass);
    let all_skipped = beh.iter().all(|c| c.outcome == Outcome::Skipped);
    if all_skipped {
        let summary = format!(
            "{likely_summary} (no behavioural check applied: nothing held out to compare answers with)"
        );
        return (likely_pass, checks, summary);
    }
    let ppl_pass = checks
        .iter()
        .find(|c| c.metric == "ppl")
        .is_some_and(|c| c.outcome == Outcome::Pass);
    let passed = failed.is_empty() && any_beh && ppl_pass;
    let summary = if passed {
        "passed: answers on held-out prompts moved towards the feedback, general text within bounds"
            .to_string()
    } else if !failed.is_empty() {
        format!("failed: {}", failed.join("; "))
    } else {
        likely_summary
    };
    (passed, checks, summary)
}

/// A version as the gate sees it.
#[derive(Clone, Copy, Debug)]
pub struct Version<'a> {
    pub name: &'a str,
    /// `None`: the base model.
    pub adapter: Option<&'a LoraAdapter>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionReport {
    pub name: String,
    pub metrics: Metrics,
}

/// What the held-out set was.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldOut {
    pub examples: usize,
    pub sft: usize,
    pub pairs: usize,
    pub kto: usize,
    /// The dataset they were drawn from (source, snapshot sha256), when known.
    pub source: Option<String>,
    pub snapshot_sha256: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    pub passed: bool,
    pub summary: String,
    pub model: String,
    pub candidate: VersionReport,
    pub current: VersionReport,
    /// The base model's metrics, when the current version is an adapter.
    pub base: Option<VersionReport>,
    pub checks: Vec<Check>,
    pub config: GateConfig,
    pub held_out: HeldOut,
    pub general_text_sha256: String,
    pub seconds: f64,
    /// The answers both versions gave on held-out prompts, scored (when
    /// [`GateConfig::behaviour`] is on).
    #[serde(default)]
    pub behaviour: Option<Behaviour>,
}

/// Scores the candidate, the current version and (when the current one is an adapter)
/// the base on the held-out examples and the general text, and applies the gate.
pub fn evaluate(
    s: &mut Scorer,
    candidate: Version,
    current: Version,
    held_out: &[&Example],
    cfg: &GateConfig,
) -> Result<GateReport> {
    cfg.validate()?;
    let t0 = std::time::Instant::now();
    let model = s.model();
    let window = cfg.ppl_window.min(model.cfg.n_ctx_train.max(2));
    let windows = text_windows(model, GENERAL_TEXT, window)?;
    let run =
        |s: &mut Scorer, ad: Option<&LoraAdapter>| -> Result<(Vec<ExampleScore>, (f64, usize))> {
            Ok((score_examples(s, ad, held_out)?, text_nll(s, ad, &windows)?))
        };
    // The base is always needed: it is KTO's reference and perplexity's anchor.
    let base = run(s, None)?;
    let cur = match current.adapter {
        None => base.clone(),
        Some(a) => run(s, Some(a))?,
    };
    let cand = match candidate.adapter {
        None => base.clone(),
        Some(a) => run(s, Some(a))?,
    };
    let cand_m = metrics(&cand.0, &base.0, Some(cand.1));
    let cur_m = metrics(&cur.0, &base.0, Some(cur.1));
    let base_m = current
        .adapter
        .map(|_| metrics(&base.0, &base.0, Some(base.1)));
    let beh = if cfg.behaviour {
        Some(crate::behaviour::compare(
            s,
            candidate.adapter,
            current.adapter,
            held_out,
        )?)
    } else {
        None
    };
    let (passed, checks, summary) = match &beh {
        Some(b) => decide_with_behaviour(cfg, &cand_m, &cur_m, base_m.as_ref(), b),
        None => decide(cfg, &cand_m, &cur_m, base_m.as_ref()),
    };
    let mut ho = HeldOut {
        examples: held_out.len(),
        ..Default::default()
    };
    for e in held_out {
        match e.item {
            Item::Sft(_) => ho.sft += 1,
            Item::Pref { .. } => ho.pairs += 1,
            Item::Kto { .. } => ho.kto += 1,
        }
    }
    Ok(GateReport {
        passed,
        summary,
        model: model.name.clone(),
        candidate: VersionReport {
            name: candidate.name.into(),
            metrics: cand_m,
        },
        current: VersionReport {
            name: current.name.into(),
            metrics: cur_m,
        },
        base: base_m.map(|m| VersionReport {
            name: "base".into(),
            metrics: m,
        }),
        checks,
        config: cfg.clone(),
        held_out: ho,
        general_text_sha256: Sha256::digest(GENERAL_TEXT.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        seconds: t0.elapsed().as_secs_f64(),
        behaviour: beh,
    })
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

impl GateReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serializes")
    }

    /// The report for people: every metric for each version, each rule and its outcome.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        s += &format!(
            "# Evaluation gate: {verdict}\n\nCandidate `{}` against current `{}` on {}.\n\n{}\n\n",
            self.candidate.name, self.current.name, self.model, self.summary
        );
        let h = &self.held_out;
        s += &format!(
            "Held out: {} examples ({} SFT answers, {} preference pairs, {} KTO examples)",
            h.examples, h.sft, h.pairs, h.kto
        );
        if let Some(src) = &h.source {
            s += &format!(" from {src}");
        }
        if let Some(sha) = &h.snapshot_sha256 {
            s += &format!(" (snapshot sha256 `{sha}`)");
        }
        s += ".\n\n";
        let mut versions = vec![("candidate", &self.candidate), ("current", &self.current)];
        if let Some(b) = &self.base {
            versions.push(("base", b));
        }
        s += "| metric |";
        for (role, v) in &versions {
            s += &format!(" {role} `{}` |", v.name);
        }
        s += "\n|---|";
        s += &"---:|".repeat(versions.len());
        s += "\n";
        type Cell = fn(&Metrics) -> String;
        let rows: [(&str, Cell); 4] = [
            ("NLL per token, held-out preferred answers", |m| {
                format!("{} ({} tokens)", num(m.nll, 4), m.nll_tokens)
            }),
            ("preference accuracy, held-out pairs", |m| {
                format!("{} ({} pairs)", num(m.pref_accuracy, 3), m.pref_pairs)
            }),
            ("KTO accuracy vs the base", |m| {
                format!("{} ({} examples)", num(m.kto_accuracy, 3), m.kto_examples)
            }),
            ("perplexity, general text", |m| {
                format!("{} ({} tokens)", num(m.ppl, 4), m.ppl_tokens)
            }),
        ];
        for (name, f) in rows {
            s += &format!("| {name} |");
            for (_, v) in &versions {
                s += &format!(" {} |", f(&v.metrics));
            }
            s += "\n";
        }
        s += "\n| check | against | rule | result | why |\n|---|---|---|---|---|\n";
        for c in &self.checks {
            let r = match c.outcome {
                Outcome::Pass => "pass",
                Outcome::Fail => "**fail**",
                Outcome::Skipped => "skipped",
            };
            s += &format!(
                "| {} | {} | {} | {r} | {} |\n",
                c.metric, c.against, c.rule, c.why
            );
        }
        if let Some(b) = &self.behaviour {
            s += &b.to_markdown(&self.candidate.name, &self.current.name);
        }
        s += &format!(
            "\nGeneral text sha256 `{}`; evaluated in {:.1} s.\n",
            self.general_text_sha256, self.seconds
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(nll: Option<f64>, pref: Option<f64>, kto: Option<f64>, ppl: Option<f64>) -> Metrics {
        Metrics {
            nll,
            pref_accuracy: pref,
            kto_accuracy: kto,
            ppl,
            ..Default::default()
        }
    }

    fn outcome(checks: &[Check], metric: &str) -> Outcome {
        checks.iter().find(|c| c.metric == metric).unwrap().outcome
    }

    fn beh(refs: usize, chrf: (f64, f64), wins: f64) -> Behaviour {
        Behaviour {
            references: refs,
            current_chrf: (refs > 0).then_some(chrf.0),
            candidate_chrf: (refs > 0).then_some(chrf.1),
            candidate_win_rate: (refs > 0).then_some(wins),
            ..Default::default()
        }
    }

    #[test]
    fn behaviour_decides_over_likelihoods() {
        let cfg = GateConfig::default();
        let cur = m(Some(2.0), None, None, Some(10.0));
        // NLL halved but the answers did not move: refused (the issue's −50% NLL case).
        let better = m(Some(1.0), None, None, Some(10.2));
        let (ok, checks, summary) =
            decide_with_behaviour(&cfg, &better, &cur, None, &beh(10, (30.0, 31.0), 0.6));
        assert!(!ok, "{summary}");
        assert_eq!(outcome(&checks, "nll"), Outcome::Pass);
        assert_eq!(outcome(&checks, "chrf"), Outcome::Fail);
        // Closer by more than the margin on most prompts: passes.
        let (ok, checks, summary) =
            decide_with_behaviour(&cfg, &better, &cur, None, &beh(10, (30.0, 60.0), 0.9));
        assert!(ok, "{summary}");
        assert_eq!(outcome(&checks, "chrf"), Outcome::Pass);
        // A big mean gain from a few prompts while most got worse: refused.
        let (ok, _, _) =
            decide_with_behaviour(&cfg, &better, &cur, None, &beh(10, (30.0, 60.0), 0.4));
        assert!(!ok);
        // Perplexity still bounds it.
        let worse_text = m(Some(1.0), None, None, Some(10.6));
        let (ok, checks, _) =
            decide_with_behaviour(&cfg, &worse_text, &cur, None, &beh(10, (30.0, 60.0), 0.9));
        assert!(!ok && outcome(&checks, "ppl") == Outcome::Fail);
        // Thumbed-down answers said again: fewer passes, as many fails.
        let kto = Behaviour {
            rejected: 4,
            current_repeats: 3,
            candidate_repeats: 1,
            ..Default::default()
        };
        let (cand, cur_k) = (
            m(None, None, Some(0.75), Some(10.0)),
            m(None, None, Some(0.0), Some(10.0)),
        );
        assert!(decide_with_behaviour(&cfg, &cand, &cur_k, None, &kto).0);
        let same = Behaviour {
            candidate_repeats: 3,
            ..kto.clone()
        };
        let (ok, checks, _) = decide_with_behaviour(&cfg, &cand, &cur_k, None, &same);
        assert!(!ok && outcome(&checks, "repeats") == Outcome::Fail);
        // Nothing to generate against: the likelihood rule stands, and says so.
        let none = Behaviour {
            rejected: 2,
            ..Default::default()
        };
        let (ok, _, summary) = decide_with_behaviour(&cfg, &cand, &cur_k, None, &none);
        assert!(ok && summary.contains("no behavioural check"), "{summary}");
    }

    #[test]
    fn gate_decisions() {
        let cfg = GateConfig::default();
        let cur = m(Some(2.0), Some(0.5), None, Some(10.0));
        // Better everywhere, perplexity +4%: passes; KTO has no data and is skipped.
        let (ok, checks, _) = decide(
            &cfg,
            &m(Some(1.5), Some(0.75), None, Some(10.4)),
            &cur,
            None,
        );
        assert!(ok);
        assert_eq!(outcome(&checks, "kto_accuracy"), Outcome::Skipped);
        assert!(checks.iter().all(|c| c.metric != "ppl_vs_base"));
        // Perplexity +6%: fails, whatever else improved.
        let (ok, checks, summary) = decide(
            &cfg,
            &m(Some(1.5), Some(0.75), None, Some(10.6)),
            &cur,
            None,
        );
        assert!(!ok && outcome(&checks, "ppl") == Outcome::Fail, "{summary}");
        assert!(summary.contains("ppl"), "{summary}");
        // NLL equal: not an improvement.
        let (ok, checks, _) = decide(
            &cfg,
            &m(Some(2.0), Some(0.75), None, Some(10.0)),
            &cur,
            None,
        );
        assert!(!ok && outcome(&checks, "nll") == Outcome::Fail);
        // Accuracy equal below 1.0 fails; both at 1.0 passes.
        let (ok, _, _) = decide(&cfg, &m(Some(1.5), Some(0.5), None, Some(10.0)), &cur, None);
        assert!(!ok);
        let perfect = m(Some(2.0), Some(1.0), None, Some(10.0));
        let (ok, checks, _) = decide(
            &cfg,
            &m(Some(1.9), Some(1.0), None, Some(10.0)),
            &perfect,
            None,
        );
        assert!(ok && outcome(&checks, "pref_accuracy") == Outcome::Pass);
        // No feedback metric at all: cannot pass, and says why.
        let bare = m(None, None, None, Some(10.0));
        let (ok, checks, summary) = decide(&cfg, &bare, &bare, None);
        assert!(!ok && outcome(&checks, "nll") == Outcome::Skipped);
        assert!(summary.contains("no held-out feedback"), "{summary}");
        // No perplexity: cannot rule out forgetting.
        let (ok, _, summary) = decide(
            &cfg,
            &m(Some(1.0), None, None, None),
            &m(Some(2.0), None, None, None),
            None,
        );
        assert!(!ok && summary.contains("perplexity"), "{summary}");
    }

    #[test]
    fn kto_floor_base_drift_and_thresholds() {
        let cfg = GateConfig::default();
        let cur = m(None, None, Some(0.0), Some(10.0));
        // KTO rises from the base's 0 but stays below the 0.5 floor.
        let (ok, checks, _) = decide(&cfg, &m(None, None, Some(0.4), Some(10.0)), &cur, None);
        assert!(!ok && outcome(&checks, "kto_accuracy") == Outcome::Fail);
        let (ok, _, _) = decide(&cfg, &m(None, None, Some(0.6), Some(10.0)), &cur, None);
        assert!(ok);
        // Within 5% of the current adapter but 8% above the base: fails on drift.
        let base = m(None, None, Some(0.0), Some(10.0));
        let cur = m(None, None, Some(0.6), Some(10.4));
        let cand = m(None, None, Some(0.8), Some(10.8));
        let (ok, checks, _) = decide(&cfg, &cand, &cur, Some(&base));
        assert_eq!(outcome(&checks, "ppl"), Outcome::Pass);
        assert_eq!(outcome(&checks, "ppl_vs_base"), Outcome::Fail);
        assert!(!ok);
        // Thresholds are the config's.
        let strict = GateConfig {
            nll_min_improvement: 0.3,
            ppl_max_increase: 0.01,
            ..GateConfig::default()
        };
        let cur = m(Some(2.0), None, None, Some(10.0));
        let cand = m(Some(1.5), None, None, Some(10.2));
        assert!(decide(&GateConfig::default(), &cand, &cur, None).0);
        let (ok, checks, _) = decide(&strict, &cand, &cur, None);
        assert!(!ok);
        assert_eq!(outcome(&checks, "nll"), Outcome::Fail);
        assert_eq!(outcome(&checks, "ppl"), Outcome::Fail);
        // The config reads from JSON with defaults for what is left out, and refuses
        // unknown fields and bad values.
        let c: GateConfig = serde_json::from_str(r#"{"ppl_max_increase": 0.1}"#).unwrap();
        assert_eq!(c.ppl_max_increase, 0.1);
        assert_eq!(c.kto_min_accuracy, 0.5);
        assert!(serde_json::from_str::<GateConfig>(r#"{"ppl_max": 0.1}"#).is_err());
        assert!(
            GateConfig {
                ppl_window: 1,
                ..GateConfig::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            GateConfig {
                nll_min_improvement: 1.5,
                ..GateConfig::default()
            }
            .validate()
            .is_err()
        );
        assert!(GateConfig::default().validate().is_ok());
    }

    #[test]
    fn metrics_from_scores() {
        let base = [
            ExampleScore::Sft {
                logp: -6.0,
                tokens: 3,
            },
            ExampleScore::Pref {
                chosen: -4.0,
                chosen_tokens: 2,
                rejected: -3.0,
            },
            ExampleScore::Pref {
                chosen: -2.0,
                chosen_tokens: 2,
                rejected: -2.0,
            },
            ExampleScore::Kto {
                logp: -5.0,
                tokens: 5,
                desirable: true,
            },
            ExampleScore::Kto {
                logp: -5.0,
                tokens: 5,
                desirable: false,
            },
        ];
        let v = [
            ExampleScore::Sft {
                logp: -3.0,
                tokens: 3,
            },
            ExampleScore::Pref {
                chosen: -2.0,
                chosen_tokens: 2,
                rejected: -3.0,
            },
            ExampleScore::Pref {
                chosen: -2.0,
                chosen_tokens: 2,
                rejected: -2.0,
            },
            ExampleScore::Kto {
                logp: -4.0,
                tokens: 5,
                desirable: true,
            },
            ExampleScore::Kto {
                logp: -4.0,
                tokens: 5,
                desirable: false,
            },
        ];
        let got = metrics(&v, &base, Some((20.0_f64.ln() * 10.0, 10)));
        // NLL over the SFT answer, both chosen answers and the desirable KTO answer.
        assert_eq!((got.nll_tokens, got.nll_answers), (12, 4));
        assert!((got.nll.unwrap() - 11.0 / 12.0).abs() < 1e-12);
        // One pair right, one tie (not right).
        assert_eq!(got.pref_accuracy, Some(0.5));
        // The desirable answer rose (right), the undesirable one rose too (wrong).
        assert_eq!(got.kto_accuracy, Some(0.5));
        assert!((got.ppl.unwrap() - 20.0).abs() < 1e-9);
        // The base against itself moves nothing.
        assert_eq!(metrics(&base, &base, None).kto_accuracy, Some(0.0));
        assert_eq!(metrics(&[], &[], None), Metrics::default());
    }
}
