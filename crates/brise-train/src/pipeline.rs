//! One learning run, as `brise train`, `brise serve --learn` and the fine-tuning jobs
//! API all do it: freeze the held-out split, train a fresh adapter on the rest, evaluate
//! it against the current version with the gate, and write the adapter with its reports.
//! Registering (and promoting) the result is the caller's: it owns the ledger.

use crate::data::{Dataset, Example};
use crate::eval::{GateConfig, GateReport, Scorer, Version, evaluate, metrics, score_examples};
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
}

/// What early stopping saw: the held-out loss (mean NLL per token of the preferred
/// answers, the gate's `nll`) after each epoch but the last.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EarlyStopping {
    pub patience: usize,
    /// (epoch, loss), epochs counted from 0.
    pub epoch_losses: Vec<(usize, f64)>,
    /// The epoch whose adapter was kept, when the run stopped early.
    pub kept_epoch: Option<usize>,
}

/// Tracks the held-out loss between epochs and says when to stop; keeps the best
/// epoch's adapter so a stopped run ends with it, not with the overfitted last one.
struct Stopper<'a> {
    held: Vec<&'a Example>,
    patience: usize,
    best: Option<(usize, f64, LoraAdapter)>,
    since_best: usize,
    log: EarlyStopping,
}

impl<'a> Stopper<'a> {
    fn new(held: &[&'a Example], patience: usize) -> Option<Stopper<'a>> {
        let held: Vec<&Example> = held
            .iter()
            .copied()
            .filter(|e| e.item.preferred().is_some())
            .collect();
        (patience > 0 && !held.is_empty()).then(|| Stopper {
            held,
            patience,
            best: None,
            since_best: 0,
            log: EarlyStopping {
                patience,
                ..EarlyStopping::default()
            },
        })
    }

    fn epoch(
        &mut self,
        scorer: &mut Scorer,
        epoch: usize,
        adapter: &LoraAdapter,
    ) -> Result<EpochAction, String> {
        let scores =
            score_examples(scorer, Some(adapter), &self.held).map_err(|e| e.to_string())?;
        let Some(loss) = metrics(&scores, &[], None).nll else {
            return Ok(EpochAction::Continue);
        };
        self.log.epoch_losses.push((epoch, loss));
        if self.best.as_ref().is_none_or(|(_, b, _)| loss < *b) {
            self.best = Some((epoch, loss, adapter.clone()));
            self.since_best = 0;
            return Ok(EpochAction::Continue);
        }
        self.since_best += 1;
        Ok(if self.since_best >= self.patience {
            EpochAction::Stop
        } else {
            EpochAction::Continue
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
    train.fit_to_data(items.len());
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
    let mut scorer = Scorer::new(spec.model, spec.threads);
    let mut stopper = Stopper::new(&held, train.early_stopping_patience);
    let summary = tr.train_with(
        &items,
        &mut |r| {
            on_step(r);
            !spec.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
        },
        &mut |epoch, adapter| match stopper.as_mut() {
            Some(st) => st.epoch(&mut scorer, epoch, adapter),
            None => Ok(EpochAction::Continue),
        },
    )?;
    let cancelled = || spec.cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    if summary.stopped || cancelled() {
        return Err("cancelled".into());
    }
    let mut candidate = tr.adapter;
    let early_stopping = stopper.map(|mut st| {
        if summary.stopped_early
            && let Some((epoch, _, best)) = st.best.take()
        {
            candidate = best;
            st.log.kept_epoch = Some(epoch);
        }
        st.log
    });
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
