//! `brise eval`: the evaluation gate on a dataset file or the ledger's feedback.

use crate::{ledger, registry, run};
use anyhow::{Context, Result, bail};
use brise_ledger::export::Format;
use brise_model::{LoraAdapter, Model};
use brise_train::data::{self, Dataset, Example, LedgerQuery, LoadOptions, Method};
use brise_train::eval::{GateConfig, Scorer, Version, evaluate};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The base model: a .gguf file, a model directory, or a model name
    #[arg(long, default_value = registry::DEFAULT_MODEL)]
    pub model: String,
    /// The candidate: a LoRA adapter directory (PEFT format) [default: the base model]
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The version to beat: an adapter directory [default: the base model]
    #[arg(long, value_name = "DIR")]
    pub against: Option<PathBuf>,
    /// A JSONL dataset (with --format); without it, the ledger's feedback
    #[arg(long, requires = "format")]
    pub data: Option<PathBuf>,
    /// The dataset's format: openai-sft, openai-dpo, mistral-sft, trl-sft, trl-dpo, trl-kto
    #[arg(long)]
    pub format: Option<Format>,
    /// Ledger feedback on completions of this model id (as `brise serve` recorded it)
    /// [default: the id --model was served under]
    #[arg(long)]
    pub ledger_model: Option<String>,
    /// Ledger feedback given at or after this time: unix seconds, or YYYY-MM-DD (UTC)
    #[arg(long)]
    pub since: Option<String>,
    /// sft, dpo or kto for ledger data [default: auto — DPO with pairs, else KTO with thumbs-down, else SFT]
    #[arg(long, value_parser = data::parse_method)]
    pub method: Option<Method>,
    /// The ledger: a SQLite file or a postgres:// URL [default: $BRISE_HOME/ledger.sqlite]
    #[arg(long, env = "BRISE_LEDGER")]
    pub ledger: Option<String>,
    /// Evaluate on every example instead of the held-out split (for a validation file)
    #[arg(long)]
    pub all: bool,
    /// The share of groups (subjects, else prompts) held out
    #[arg(long, default_value_t = data::DEFAULT_HELD_OUT)]
    pub held_out: f64,
    /// Gate thresholds as JSON (GateConfig; fields left out keep their defaults)
    #[arg(long, value_name = "FILE")]
    pub gate: Option<PathBuf>,
    /// Also write the report as JSON here
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

fn load_adapter(dir: &Path, model: &Model) -> Result<LoraAdapter> {
    LoraAdapter::load(dir, &model.cfg)
        .with_context(|| format!("loading the LoRA adapter {}", dir.display()))
}

/// Prints the report as Markdown; exits with status 3 when the gate fails.
pub fn eval(a: EvalArgs) -> Result<()> {
    let gate: GateConfig = match &a.gate {
        Some(p) => serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("{}: not a gate configuration", p.display()))?,
        None => GateConfig::default(),
    };
    gate.validate()?;
    // Ledger data: the model's feedback, found by whatever names it (a name, a path,
    // the id it was served under, a version id).
    let ledger = match a.data {
        None => Some(ledger::open(a.ledger.as_deref())?),
        Some(_) => None,
    };
    let found = match &ledger {
        Some((rt, l)) => crate::which::find(rt, Some(l), &a.model)?,
        None => crate::which::LedgerModel {
            id: String::new(),
            path: registry::ensure_local(registry::resolve(&a.model)?)?,
        },
    };
    let path = found.path.clone();
    let model = Model::load(&path, run::kernels(None)?)
        .with_context(|| format!("loading {}", path.display()))?;
    let cand = a
        .adapter
        .as_deref()
        .map(|d| load_adapter(d, &model))
        .transpose()?;
    let cur = a
        .against
        .as_deref()
        .map(|d| load_adapter(d, &model))
        .transpose()?;
    let opts = LoadOptions::default();
    let ds = match (&a.data, a.format) {
        (Some(p), Some(f)) => Dataset::from_jsonl(p, f, &model, &opts)?,
        (Some(_), None) => bail!("--data needs --format"),
        (None, _) => {
            let (rt, l) = ledger.as_ref().expect("opened above without --data");
            let q = LedgerQuery {
                model: Some(a.ledger_model.clone().unwrap_or_else(|| found.id.clone())),
                since_ms: a
                    .since
                    .as_deref()
                    .map(|s| {
                        brise_ledger::export::parse_since(s)
                            .map_err(|e| anyhow::anyhow!("--since {e}"))
                    })
                    .transpose()?,
                method: a.method,
                actor: "cli:eval".into(),
            };
            rt.block_on(Dataset::from_ledger(l, &model, &q, &opts))?
        }
    };
    for s in &ds.skipped {
        eprintln!("skipped {}: {}", s.at, s.reason);
    }
    let held: Vec<&Example> = if a.all {
        ds.examples.iter().collect()
    } else {
        let split = ds.split(a.held_out)?;
        eprintln!(
            "{} examples ({} rows, {} skipped): {} held out, {} for training, {} excluded (their prompt is held out)",
            ds.examples.len(),
            ds.rows,
            ds.skipped.len(),
            split.held_out.len(),
            split.train.len(),
            split.excluded.len()
        );
        split.held_out.iter().map(|&i| &ds.examples[i]).collect()
    };
    let name = |d: &Option<PathBuf>| {
        d.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "base".into())
    };
    let (cand_name, cur_name) = (name(&a.adapter), name(&a.against));
    let mut scorer = Scorer::new(&model, a.threads.unwrap_or_else(run::default_threads));
    let mut report = evaluate(
        &mut scorer,
        Version {
            name: &cand_name,
            adapter: cand.as_ref(),
        },
        Version {
            name: &cur_name,
            adapter: cur.as_ref(),
        },
        &held,
        &gate,
    )?;
    report.held_out.source = Some(ds.source.clone());
    report.held_out.snapshot_sha256 = Some(ds.snapshot_sha256.clone());
    if let Some(p) = &a.json {
        std::fs::write(p, report.to_json()).with_context(|| format!("writing {}", p.display()))?;
    }
    print!("{}", report.to_markdown());
    if !report.passed {
        std::process::exit(3);
    }
    Ok(())
}
