//! One learning run, as `brise train`, `brise serve --learn` and the fine-tuning jobs
//! API all do it: freeze the held-out split, train a fresh adapter on the rest, evaluate
//! it against the current version with the gate, and write the adapter with its reports.
//! Registering (and promoting) the result is the caller's: it owns the ledger.

use crate::data::Seq;
use crate::data::{Dataset, Example};
use crate::eval::{
    GENERAL_TEXT, GateConfig, GateReport, Scorer, Version, evaluate, metrics, score_examples,
    text_nll, text_windows,
};
use crate::trainer::{EpochAction, StepReport, TrainConfig, TrainSummary, Trainer, init_adapter};
use brise_model::{LoraAdapter, Model};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

pub struct RunSpec<'a> {
    pub model: &'a Model,
    pub data: &'a Dataset,
    pub train: TrainConfig,
    pub gate: GateConfig,
    pub held_out_fraction: f64,
    /// The version serving now (its name and adapter), or the base.
    pub current: Option<(&'a str, &'a LoraAdapter)>,
    /// Where the adapter and its reports go (created).
    pub out_dir: PathBuf,
    pub threads: usize,
    /// Set to stop between steps (the run then ends with an error saying so).
    pub cancel: Option<&'a AtomicBool>,
    /// Checkpoint into this directory every this many steps; and continue from the
    /// checkpoint found there (same data, same configuration) instead of starting anew.
    pub checkpoint: Option<(PathBuf, u64)>,
    /// Evaluate on these examples (a validation file) instead of a held-out split of
    /// `data`; all of `data` is then trained on.
    pub validation: Option<&'a Dataset>,
}

/// The record of a run, kept next to the adapter as `run.json`.
#[derive(Clone, Debug, Serialize)]
pub struct RunOutcome {
    pub adapter_dir: PathBuf,
    pub method: String,
    pub train_examples: usize,
    pub held_out_examples: usize,
    /// Trained-side examples left out because their prompt is held out elsewhere.
    pub excluded_examples: usize,
    pub summary: TrainSummary,
    pub report: GateReport,
    pub config: TrainConfig,
    pub dataset_sha256: String,
    /// Record and feedback ids of the training examples (lineage).
    pub record_ids: Vec<String>,
    pub feedback_ids: Vec<String>,
    /// The held-out loss after each epoch but the last, when early stopping is on.
    pub early_stopping: Option<EarlyStopping>,
    /// Runs started again at a lower learning rate because every epoch of the run
    /// before left the perplexity bound (an automatic learning rate only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retries: Vec<Retry>,
}

/// A run given up for a lower learning rate.
#[derive(Clone, Debug, Serialize)]
pub struct Retry {
    pub learning_rate: f64,
    pub steps: u64,
    pub early_stopping: EarlyStopping,
}

/// How many times a run whose every epoch forgot too much starts again at half the
/// learning rate. Twice: 3e-4 → 1.5e-4 → 7.5e-5, a quarter, covers the 135M to 1.5B
/// models brise ships; more would mostly spend time on a rule the data cannot meet.
const LR_RETRIES: usize = 2;

/// What early stopping saw: the held-out loss (mean NLL per token of the preferred
/// answers, the gate's `nll`) after each epoch but the last, and the general text's
/// perplexity after every epoch (the last too), against the gate's bound.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EarlyStopping {
    pub patience: usize,
    /// (epoch, loss), epochs counted from 0.
    pub epoch_losses: Vec<(usize, f64)>,
    /// (epoch, perplexity of the general text).
    #[serde(default)]
    pub epoch_ppl: Vec<(usize, f64)>,
    /// The highest perplexity the gate accepts: the lower of the base's and the current
    /// version's, raised by the gate's `ppl_max_increase`.
    #[serde(default)]
    pub ppl_limit: Option<f64>,
    /// The epoch whose adapter was kept, when it is not the last one trained.
    pub kept_epoch: Option<usize>,
    /// Why the run stopped or kept an earlier epoch, in a sentence.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Early stopping's decisions, apart from the scoring: after each epoch, whether to go
/// on and whether this epoch is the best so far; at the end, which epoch to keep. The
/// best epoch is the one with the lowest held-out loss among those within the gate's
/// perplexity bound. The bound is checked because a larger model can keep lowering the
/// held-out loss while it forgets general text (Qwen2.5-Coder-0.5B: +53% perplexity with
/// the held-out loss still falling), and the gate would then refuse the whole run.
struct Rule {
    patience: usize,
    best: Option<(usize, f64)>,
    since_best: usize,
    /// An epoch left the perplexity bound.
    left_bound: bool,
    log: EarlyStopping,
}

impl Rule {
    fn new(patience: usize, ppl_limit: Option<f64>) -> Rule {
        Rule {
            patience,
            best: None,
            since_best: 0,
            left_bound: false,
            log: EarlyStopping {
                patience,
                ppl_limit,
                ..EarlyStopping::default()
            },
        }
    }

    /// Logs `ppl` for `epoch`; whether it is within the bound (true without one).
    fn within(&mut self, epoch: usize, ppl: Option<f64>) -> bool {
        let Some(p) = ppl else { return true };
        self.log.epoch_ppl.push((epoch, p));
        self.log.ppl_limit.is_none_or(|l| p <= l)
    }

    /// Whether every epoch measured was above the bound: nothing this run trained
    /// can pass the gate.
    fn forgot_at_once(&self) -> bool {
        self.left_bound && self.best.is_none()
    }

    fn out_of_bound(&mut self, epoch: usize) {
        self.left_bound = true;
        let ppl = self.log.epoch_ppl.last().map_or(f64::NAN, |p| p.1);
        self.log.reason = Some(format!(
            "after epoch {} the general text's perplexity was {ppl:.3}, above the gate's bound of {:.3}",
            epoch + 1,
            self.log.ppl_limit.unwrap_or(f64::NAN)
        ));
    }

    /// After an epoch that is not the last, given its perplexity and (when within the
    /// bound) its held-out loss: what to do, and whether it is the best epoch so far.
    fn after_epoch(
        &mut self,
        epoch: usize,
        ppl: Option<f64>,
        loss: Option<f64>,
    ) -> (EpochAction, bool) {
        if !self.within(epoch, ppl) {
            // Training further only forgets more: stop, keeping the best epoch within
            // the bound (or this one, the least trained, when there is none).
            self.out_of_bound(epoch);
            return (EpochAction::Stop, false);
        }
        let Some(loss) = loss else {
            return (EpochAction::Continue, false);
        };
        self.log.epoch_losses.push((epoch, loss));
        if self.best.is_none_or(|(_, b)| loss < b) {
            self.best = Some((epoch, loss));
            self.since_best = 0;
            return (EpochAction::Continue, true);
        }
        self.since_best += 1;
        if self.since_best >= self.patience {
            self.log.reason = Some(format!(
                "the held-out loss did not improve for {} epochs",
                self.patience
            ));
            return (EpochAction::Stop, false);
        }
        (EpochAction::Continue, false)
    }

    /// Once training has ended: the epoch to keep instead of the last one trained
    /// (`last`, of perplexity `ppl`, measured only when the run was not stopped early),
    /// or `None` to keep the last.
    fn at_end(&mut self, stopped_early: bool, last: usize, ppl: Option<f64>) -> Option<usize> {
        if !stopped_early {
            if self.within(last, ppl) {
                return None;
            }
            self.out_of_bound(last);
        }
        let kept = self.best.map(|(e, _)| e);
        self.log.kept_epoch = kept;
        kept
    }
}

/// Scores what [`Rule`] decides on between epochs and keeps the best epoch's adapter,
/// so a run ends with it rather than with an overfitted last epoch.
struct Stopper<'a> {
    held: Vec<&'a Example>,
    /// The general text's windows, scored exactly as the gate scores them, so an epoch
    /// within the bound passes the gate's perplexity check.
    windows: Vec<Seq>,
    rule: Rule,
    best: Option<LoraAdapter>,
}

impl<'a> Stopper<'a> {
    fn new(
        scorer: &mut Scorer,
        held: &[&'a Example],
        patience: usize,
        gate: &GateConfig,
        current: Option<&LoraAdapter>,
    ) -> Result<Option<Stopper<'a>>, String> {
        let held: Vec<&Example> = held
            .iter()
            .copied()
            .filter(|e| e.item.preferred().is_some())
            .collect();
        if patience == 0 || held.is_empty() {
            return Ok(None);
        }
        let model = scorer.model();
        let window = gate.ppl_window.min(model.cfg.n_ctx_train.max(2));
        let windows = text_windows(model, GENERAL_TEXT, window).map_err(|e| e.to_string())?;
        let mut st = Stopper {
            held,
            windows,
            rule: Rule::new(patience, None),
            best: None,
        };
        // The gate's bound: the lower of the base's and the current version's.
        let mut reference = st.ppl(scorer, None)?;
        if let Some(c) = current {
            reference = match (reference, st.ppl(scorer, Some(c))?) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        st.rule.log.ppl_limit = reference.map(|r| r * (1.0 + gate.ppl_max_increase));
        Ok(Some(st))
    }

    /// A fresh start for another run on the same data, keeping the bound; the log of
    /// the run so far.
    fn restart(&mut self) -> EarlyStopping {
        let fresh = Rule::new(self.rule.patience, self.rule.log.ppl_limit);
        self.best = None;
        std::mem::replace(&mut self.rule, fresh).log
    }

    fn ppl(
        &self,
        scorer: &mut Scorer,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Option<f64>, String> {
        if self.windows.is_empty() {
            return Ok(None);
        }
        let (nll, n) = text_nll(scorer, adapter, &self.windows).map_err(|e| e.to_string())?;
        Ok(Some((nll / n.max(1) as f64).exp()))
    }

    fn epoch(
        &mut self,
        scorer: &mut Scorer,
        epoch: usize,
        adapter: &LoraAdapter,
    ) -> Result<EpochAction, String> {
        let ppl = self.ppl(scorer, Some(adapter))?;
        let within = ppl.is_none_or(|p| self.rule.log.ppl_limit.is_none_or(|l| p <= l));
        // Out of bound, the loss does not matter: the run stops here.
        let loss = if within {
            let scores =
                score_examples(scorer, Some(adapter), &self.held).map_err(|e| e.to_string())?;
            metrics(&scores, &[], None).nll
        } else {
            None
        };
        let (action, best) = self.rule.after_epoch(epoch, ppl, loss);
        if best {
            self.best = Some(adapter.clone());
        }
        Ok(action)
    }

    /// The adapter to keep instead of `trained` (the last epoch's, `last`), if any.
    fn finish(
        &mut self,
        scorer: &mut Scorer,
        stopped_early: bool,
        last: usize,
        trained: &LoraAdapter,
    ) -> Result<Option<LoraAdapter>, String> {
        let ppl = if stopped_early {
            None
        } else {
            self.ppl(scorer, Some(trained))?
        };
        Ok(match self.rule.at_end(stopped_early, last, ppl) {
            Some(_) => self.best.take(),
            None => None,
        })
    }
}

fn ids(ex: &[&Example]) -> (Vec<String>, Vec<String>) {
    let mut r = std::collections::BTreeSet::new();
    let mut f = std::collections::BTreeSet::new();
    for e in ex {
        r.extend(e.record_ids.iter().cloned());
        f.extend(e.feedback_ids.iter().cloned());
    }
    (r.into_iter().collect(), f.into_iter().collect())
}

fn write(path: &Path, data: &str) -> Result<(), String> {
    std::fs::write(path, data).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs the whole thing; `on_step` sees each optimizer step.
pub fn run(spec: RunSpec, on_step: &mut dyn FnMut(&StepReport)) -> Result<RunOutcome, String> {
    let mut train = spec.train.clone();
    train.method = spec.data.method;
    let ex = &spec.data.examples;
    let (train_ex, held, excluded): (Vec<&Example>, Vec<&Example>, usize) = match spec.validation {
        Some(v) => {
            if v.method != spec.data.method {
                return Err(format!(
                    "the validation data is for {}, the training data for {}",
                    v.method.name(),
                    spec.data.method.name()
                ));
            }
            (ex.iter().collect(), v.examples.iter().collect(), 0)
        }
        None => {
            let split = spec
                .data
                .split(spec.held_out_fraction)
                .map_err(|e| e.to_string())?;
            (
                split.train.iter().map(|&i| &ex[i]).collect(),
                split.held_out.iter().map(|&i| &ex[i]).collect(),
                split.excluded.len(),
            )
        }
    };
    if train_ex.is_empty() {
        return Err(format!(
            "nothing to train on: {} examples, {} held out, {} excluded",
            ex.len(),
            held.len(),
            excluded
        ));
    }
    let items: Vec<_> = train_ex.iter().map(|e| e.item.clone()).collect();
    let lr_auto = train.auto.iter().any(|a| a == "learning_rate");
    train.fit_to_data(items.len());
    let mut scorer = Scorer::new(spec.model, spec.threads);
    let mut stopper = Stopper::new(
        &mut scorer,
        &held,
        train.early_stopping_patience,
        &spec.gate,
        spec.current.map(|c| c.1),
    )?;
    let cancelled = || spec.cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    let mut retries = Vec::new();
    let (summary, candidate, early_stopping) = loop {
        let mut tr = match &spec.checkpoint {
            Some((dir, _)) if dir.join("trainer_state.json").exists() => {
                let tr = Trainer::resume(spec.model, dir, spec.threads)?;
                if tr.cfg != train {
                    let (a, b) = (
                        serde_json::to_value(&tr.cfg).expect("plain data"),
                        serde_json::to_value(&train).expect("plain data"),
                    );
                    let differ: Vec<String> = a
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                        .map(|(k, v)| format!("{k} {v} (now {})", b[k.as_str()]))
                        .collect();
                    return Err(format!(
                        "{}: the checkpoint was made with another configuration: {}; use the same options, or another --checkpoint directory",
                        dir.display(),
                        differ.join(", ")
                    ));
                }
                tr
            }
            _ => {
                let adapter = init_adapter(spec.model, &train)?;
                Trainer::new(spec.model, train.clone(), adapter, spec.threads)?
            }
        };
        tr.checkpoint = spec.checkpoint.clone();
        let mut last_epoch = 0;
        let summary = tr.train_with(
            &items,
            &mut |r| {
                on_step(r);
                !spec.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
            },
            &mut |epoch, adapter| {
                last_epoch = epoch + 1;
                match stopper.as_mut() {
                    Some(st) => st.epoch(&mut scorer, epoch, adapter),
                    None => Ok(EpochAction::Continue),
                }
            },
        )?;
        if summary.stopped || cancelled() {
            return Err("cancelled".into());
        }
        let mut candidate = tr.adapter;
        // The hook runs after every epoch but the last: the last is the one after it.
        let last = if summary.stopped_early {
            last_epoch.saturating_sub(1)
        } else {
            last_epoch
        };
        let Some(st) = stopper.as_mut() else {
            break (summary, candidate, None);
        };
        if let Some(best) = st.finish(&mut scorer, summary.stopped_early, last, &candidate)? {
            candidate = best;
        }
        // Every epoch forgot too much: the step was too large for this model (larger
        // models move further per step), so start again at half the rate. Not when
        // the user chose the rate, nor across checkpoints (their configuration is fixed).
        if st.rule.forgot_at_once()
            && lr_auto
            && spec.checkpoint.is_none()
            && retries.len() < LR_RETRIES
        {
            retries.push(Retry {
                learning_rate: train.learning_rate,
                steps: summary.steps,
                early_stopping: st.restart(),
            });
            train.learning_rate /= 2.0;
            continue;
        }
        let log = st.restart();
        break (summary, candidate, Some(log));
    };
    let (cur_name, cur_ad) = match spec.current {
        Some((n, a)) => (n, Some(a)),
        None => ("base", None),
    };
    let report = evaluate(
        &mut scorer,
        Version {
            name: "candidate",
            adapter: Some(&candidate),
        },
        Version {
            name: cur_name,
            adapter: cur_ad,
        },
        &held,
        &spec.gate,
    )
    .map_err(|e| e.to_string())?;
    // A cancel during the evaluation: nothing is written or registered.
    if cancelled() {
        return Err("cancelled".into());
    }
    // Trained on people's data: readable by its owner only.
    let mut dirs = std::fs::DirBuilder::new();
    dirs.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut dirs, 0o700);
    dirs.create(&spec.out_dir)
        .map_err(|e| format!("{}: {e}", spec.out_dir.display()))?;
    candidate.save(&spec.out_dir).map_err(|e| e.to_string())?;
    let (record_ids, feedback_ids) = ids(&train_ex);
    let out = RunOutcome {
        adapter_dir: spec.out_dir.clone(),
        method: train.method.name().into(),
        train_examples: train_ex.len(),
        held_out_examples: held.len(),
        excluded_examples: excluded,
        summary,
        report,
        config: train,
        dataset_sha256: spec.data.snapshot_sha256.clone(),
        record_ids,
        feedback_ids,
        early_stopping,
        retries,
    };
    write(&spec.out_dir.join("eval.json"), &out.report.to_json())?;
    write(&spec.out_dir.join("eval.md"), &out.report.to_markdown())?;
    write(
        &spec.out_dir.join("run.json"),
        &serde_json::to_string_pretty(&out).expect("plain data"),
    )?;
    Ok(out)
}

/// How a learning run registers its result.
pub struct LearnOptions {
    pub train: TrainConfig,
    pub gate: GateConfig,
    pub held_out_fraction: f64,
    pub threads: usize,
    /// Promote when the gate passes (else the version stays a candidate).
    pub promote: bool,
    /// Who the registry and the audit log name.
    pub actor: String,
    pub out_dir: PathBuf,
    /// As [`RunSpec::checkpoint`].
    pub checkpoint: Option<(PathBuf, u64)>,
}

/// What `learn` trains and evaluates on.
pub struct LearnData<'a> {
    pub train: &'a Dataset,
    /// As [`RunSpec::validation`].
    pub validation: Option<&'a Dataset>,
}

/// A registered run.
pub struct Learned {
    pub version: brise_ledger::adapters::AdapterVersion,
    pub promoted: bool,
    pub outcome: RunOutcome,
}

fn method_of(m: crate::data::Method) -> brise_ledger::adapters::TrainMethod {
    use brise_ledger::adapters::TrainMethod;
    match m {
        crate::data::Method::Sft => TrainMethod::Sft,
        crate::data::Method::Dpo => TrainMethod::Dpo,
        crate::data::Method::Kto => TrainMethod::Kto,
    }
}

/// The whole loop for `model_id` (the served model's id): trains on `data` against the
/// version serving now, registers the result with its lineage and report, and promotes
/// it when the gate passes (or rejects it, saying why). CPU-bound: call it off an async
/// runtime's worker threads (`spawn_blocking` + `Handle::block_on`).
pub async fn learn(
    ledger: &brise_ledger::Ledger,
    model: &Model,
    model_id: &str,
    data: LearnData<'_>,
    opts: LearnOptions,
    cancel: Option<&AtomicBool>,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<Learned, String> {
    let e = |e: brise_ledger::LedgerError| e.to_string();
    let current = ledger.current_adapter(model_id).await.map_err(e)?;
    let cur_ad = match &current {
        Some(v) => Some(
            LoraAdapter::load(Path::new(&v.path), &model.cfg)
                .map_err(|err| format!("the serving version {}: {err}", v.id))?,
        ),
        None => None,
    };
    let out = run(
        RunSpec {
            model,
            data: data.train,
            train: opts.train,
            gate: opts.gate,
            held_out_fraction: opts.held_out_fraction,
            current: current
                .as_ref()
                .zip(cur_ad.as_ref())
                .map(|(v, a)| (v.id.as_str(), a)),
            out_dir: opts.out_dir,
            threads: opts.threads,
            cancel,
            checkpoint: opts.checkpoint,
            validation: data.validation,
        },
        on_step,
    )?;
    let path = std::fs::canonicalize(&out.adapter_dir)
        .map_err(|err| format!("{}: {err}", out.adapter_dir.display()))?;
    let report: serde_json::Value =
        serde_json::from_str(&out.report.to_json()).expect("the report is JSON");
    let v = ledger
        .register_adapter(brise_ledger::adapters::NewAdapterVersion {
            model: model_id.into(),
            path: path.display().to_string(),
            parent: current.as_ref().map(|v| v.id.clone()),
            created_by: opts.actor.clone(),
            method: method_of(data.train.method),
            config: serde_json::to_value(&out.config).expect("plain data"),
            dataset_sha256: Some(out.dataset_sha256.clone()),
            record_ids: out.record_ids.clone(),
            feedback_ids: out.feedback_ids.clone(),
            eval_report: Some(report),
        })
        .await
        .map_err(e)?;
    let mut promoted = false;
    if !out.report.passed {
        ledger
            .reject_adapter(&v.id, &opts.actor, Some(&out.report.summary))
            .await
            .map_err(e)?;
    } else if opts.promote {
        ledger
            .promote_adapter(&v.id, &opts.actor)
            .await
            .map_err(e)?;
        promoted = true;
    }
    let version = ledger.adapter(&v.id).await.map_err(e)?.unwrap_or(v);
    Ok(Learned {
        version,
        promoted,
        outcome: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_epoch_is_the_lowest_loss_within_the_bound() {
        let mut r = Rule::new(2, Some(10.0));
        assert_eq!(
            r.after_epoch(0, Some(9.0), Some(2.0)),
            (EpochAction::Continue, true)
        );
        assert_eq!(
            r.after_epoch(1, Some(9.5), Some(1.0)),
            (EpochAction::Continue, true)
        );
        // Out of bound: stop at once, whatever the loss; keep epoch 1.
        assert_eq!(
            r.after_epoch(2, Some(10.5), Some(0.5)),
            (EpochAction::Stop, false)
        );
        assert_eq!(r.at_end(true, 2, None), Some(1));
        assert!(r.log.reason.as_deref().unwrap().contains("after epoch 3"));
        assert_eq!(r.log.epoch_losses, vec![(0, 2.0), (1, 1.0)]);
        assert_eq!(r.log.epoch_ppl.len(), 3);
    }

    #[test]
    fn a_last_epoch_out_of_bound_gives_way_to_the_best_within() {
        let mut r = Rule::new(2, Some(10.0));
        r.after_epoch(0, Some(9.0), Some(2.0));
        r.after_epoch(1, Some(9.9), Some(1.5));
        assert_eq!(r.at_end(false, 2, Some(10.1)), Some(1));
        assert_eq!(r.log.kept_epoch, Some(1));
        assert!(r.log.reason.as_deref().unwrap().contains("perplexity"));
        // Within: the last epoch stays.
        let mut r = Rule::new(2, Some(10.0));
        r.after_epoch(0, Some(9.0), Some(2.0));
        assert_eq!(r.at_end(false, 1, Some(9.9)), None);
        assert_eq!((r.log.kept_epoch, r.log.reason), (None, None));
    }

    #[test]
    fn patience_counts_epochs_without_a_better_loss() {
        let mut r = Rule::new(2, None);
        assert_eq!(r.after_epoch(0, None, Some(1.0)).0, EpochAction::Continue);
        assert_eq!(r.after_epoch(1, None, Some(1.1)).0, EpochAction::Continue);
        assert_eq!(r.after_epoch(2, None, Some(1.2)).0, EpochAction::Stop);
        assert_eq!(r.at_end(true, 2, None), Some(0));
        assert!(
            r.log
                .reason
                .as_deref()
                .unwrap()
                .contains("did not improve for 2")
        );
    }

    #[test]
    fn the_first_epoch_out_of_bound_is_kept_for_want_of_another() {
        let mut r = Rule::new(2, Some(10.0));
        assert!(!r.forgot_at_once());
        assert_eq!(r.after_epoch(0, Some(11.0), None).0, EpochAction::Stop);
        assert_eq!(r.at_end(true, 0, None), None);
        assert!(r.log.reason.is_some());
        // Nothing within the bound: the run asks for a lower learning rate.
        assert!(r.forgot_at_once());
        // One epoch within, then out: the within one is kept, no retry.
        let mut r = Rule::new(2, Some(10.0));
        r.after_epoch(0, Some(9.0), Some(1.0));
        r.after_epoch(1, Some(11.0), None);
        assert_eq!(r.at_end(true, 1, None), Some(0));
        assert!(!r.forgot_at_once());
        // A single epoch, out of bound at the end: a retry too.
        let mut r = Rule::new(2, Some(10.0));
        assert_eq!(r.at_end(false, 0, Some(10.5)), None);
        assert!(r.forgot_at_once());
    }
}
