//! `brise adapters`: the registry of adapter versions in the ledger (list, show,
//! register, promote, rollback, reject). A running `brise serve` on the same ledger
//! follows promotions and rollbacks by itself (`--adapter-poll`).

use crate::ledger::open_ledger;
use crate::registry;
use anyhow::{Context, Result, bail};
use brise_ledger::adapters::{AdapterStatus, AdapterVersion, NewAdapterVersion, TrainMethod};
use brise_model::Model;
use brise_model::lora::{CONFIG_FILE, LoraAdapter, WEIGHTS_FILE};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum AdaptersCmd {
    /// List the adapter versions of every model (or of one), with their status
    #[command(after_help = "Example:\n  brise adapters list --model smollm2")]
    List {
        /// Only this model's versions (its id or alias: smollm2, smollm2:135m)
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Show a version: status, who promoted it and when, whether it was trained on erased
    /// data, its lineage (parent chain), dataset hash, how many records and feedback items
    /// it was trained on, its hyperparameters and its eval report
    Show {
        /// A version id (smollm2-135m-v3)
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Register a PEFT adapter directory as a new candidate version of a model (for
    /// adapters trained elsewhere, or by hand); prints the new version's id
    #[command(
        after_help = "The directory is checked: against the model when it is on this machine \
(LoraAdapter::load), else its adapter_config.json and weights file.\n\nExample:\n  \
brise adapters register --model smollm2 --path ./my-adapter --method sft --config @hparams.json"
    )]
    Register(RegisterArgs),
    /// Make a version the one its model serves (the version serving before is retired).
    /// Refused for versions trained on erased data, and for rejected ones
    #[command(
        after_help = "A running `brise serve` on this ledger swaps it in within --adapter-poll \
seconds (default 2); requests in flight finish on the version they started with."
    )]
    Promote {
        id: String,
        /// Who promotes it (recorded in the registry and the audit log) [default: $USER]
        #[arg(long)]
        actor: Option<String>,
        /// Do not check that the directory loads before promoting it
        #[arg(long)]
        no_check: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Take a model's current version out of service and re-promote the one that served
    /// before it (skipping versions rejected or trained on erased data since), or go back
    /// to the base model when there is none
    Rollback {
        /// The model (its id or alias)
        #[arg(long)]
        model: String,
        /// Who rolls back [default: $USER]
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Mark a version rejected: it is never promoted, nor rolled back to
    Reject {
        id: String,
        /// Why (kept with the version)
        #[arg(long)]
        reason: Option<String>,
        /// Who rejects it [default: $USER]
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args, Debug)]
pub struct Common {
    /// The ledger: a SQLite file or a postgres:// URL [default: $BRISE_HOME/ledger.sqlite]
    #[arg(long, env = "BRISE_LEDGER")]
    ledger: Option<String>,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// The model it adapts (its id or alias; a .gguf path names the model by file stem,
    /// as `brise serve` does)
    #[arg(long)]
    model: String,
    /// The PEFT directory (adapter_config.json, adapter_model.safetensors)
    #[arg(long)]
    path: PathBuf,
    /// The version that was serving when it was trained [default: none, the base model]
    #[arg(long)]
    parent: Option<String>,
    /// How it was trained: sft, dpo, kto, or other
    #[arg(long)]
    method: TrainMethod,
    /// Hyperparameters: JSON, or @FILE [default: the adapter's adapter_config.json]
    #[arg(long)]
    config: Option<String>,
    /// sha256 of the dataset snapshot it was trained on (64 hex digits)
    #[arg(long)]
    dataset_sha256: Option<String>,
    /// Completion ids it was trained on (repeatable, or comma-separated); erasing one
    /// marks the version tainted
    #[arg(long = "record", value_name = "ID", value_delimiter = ',')]
    records: Vec<String>,
    /// A file of completion ids, one per line
    #[arg(long, value_name = "FILE")]
    records_file: Option<PathBuf>,
    /// Feedback ids it was trained on (repeatable, or comma-separated)
    #[arg(long = "feedback", value_name = "ID", value_delimiter = ',')]
    feedback: Vec<String>,
    /// A file of feedback ids, one per line
    #[arg(long, value_name = "FILE")]
    feedback_file: Option<PathBuf>,
    /// The eval report: JSON, or @FILE
    #[arg(long)]
    eval_report: Option<String>,
    /// Who registers it [default: $USER]
    #[arg(long)]
    created_by: Option<String>,
    /// Check only that adapter_config.json parses, even when the model is here
    #[arg(long)]
    no_check: bool,
    #[command(flatten)]
    common: Common,
}

fn actor(a: Option<String>) -> String {
    a.filter(|s| !s.is_empty())
        .or_else(|| std::env::var("USER").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "cli".into())
}

/// The id `brise serve` gives a model argument (a known model's name, else the file
/// stem), and its file when it is on this machine.
fn model_id(arg: &str) -> (String, Option<PathBuf>) {
    match registry::resolve(arg) {
        Ok(registry::Resolved::Known(k, p)) => (k.name.to_string(), p.exists().then_some(p)),
        Ok(registry::Resolved::Path(p)) => (
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| arg.to_string()),
            Some(p),
        ),
        Err(_) => (arg.to_string(), None),
    }
}

/// JSON given inline or as @FILE.
fn json_arg(flag: &str, s: &str) -> Result<Value> {
    let text = match s.strip_prefix('@') {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("{flag}: reading {f}"))?,
        None => s.to_string(),
    };
    serde_json::from_str(&text).with_context(|| format!("{flag}: not JSON"))
}

fn ids_file(p: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// Checks that `dir` holds an adapter for the model: loads it against the model when
/// the model is on this machine (and `full`), else parses adapter_config.json. Returns
/// the config's JSON and what was checked.
fn check_dir(dir: &Path, model_file: Option<&Path>, full: bool) -> Result<(Value, String)> {
    let cpath = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cpath)
        .with_context(|| format!("{} is not a PEFT adapter directory", dir.display()))?;
    let cfg: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", cpath.display()))?;
    if cfg.get("peft_type").and_then(Value::as_str) != Some("LORA") {
        bail!("{}: peft_type is not \"LORA\"", cpath.display());
    }
    if !dir.join(WEIGHTS_FILE).is_file() {
        bail!("{}: no {WEIGHTS_FILE}", dir.display());
    }
    match model_file.filter(|_| full) {
        Some(mf) => {
            let model = Model::load(mf, crate::run::kernels(None)?)
                .with_context(|| format!("loading {} to check the adapter", mf.display()))?;
            let ad = LoraAdapter::load(dir, &model.cfg)
                .with_context(|| format!("{} does not load on {}", dir.display(), mf.display()))?;
            Ok((
                cfg,
                format!(
                    "loads on {} (rank {}, {} modules)",
                    model.name,
                    ad.rank(),
                    ad.targets().len()
                ),
            ))
        }
        None => Ok((
            cfg,
            "adapter_config.json parses (not loaded: the model is not on this machine)".into(),
        )),
    }
}

/// UTC `YYYY-MM-DD HH:MM:SS` of a unix time in milliseconds.
fn when(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn status_text(v: &AdapterVersion) -> String {
    let mut s = v.status.name().to_string();
    match v.status {
        AdapterStatus::Promoted | AdapterStatus::Retired => {
            if let (Some(by), Some(at)) = (&v.promoted_by, v.promoted_at_ms) {
                let verb = if v.status == AdapterStatus::Promoted {
                    "promoted"
                } else {
                    "last promoted"
                };
                s += &format!(" ({verb} by {by}, {})", when(at));
            }
        }
        AdapterStatus::Rejected => {
            if let Some(r) = &v.status_reason {
                s += &format!(" ({r})");
            }
        }
        AdapterStatus::Candidate => {}
    }
    s
}

/// The scalar entries of an eval report, one level deep: `key: value`.
fn report_summary(r: &Value) -> Vec<String> {
    let scalar = |v: &Value| match v {
        Value::Object(_) => None,
        Value::Array(a) => Some(format!("[{} items]", a.len())),
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    };
    let mut out = Vec::new();
    match r {
        Value::Object(o) => {
            for (k, v) in o {
                match v {
                    Value::Object(inner) => {
                        for (k2, v2) in inner {
                            if let Some(s) = scalar(v2) {
                                out.push(format!("{k}.{k2}: {s}"));
                            }
                        }
                    }
                    v => out.extend(scalar(v).map(|s| format!("{k}: {s}"))),
                }
            }
        }
        other => out.extend(scalar(other)),
    }
    out
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn run(c: AdaptersCmd) -> Result<()> {
    match c {
        AdaptersCmd::List { model, common } => {
            let (rt, l) = open_ledger(common.ledger.as_deref(), false)?;
            let model = model.map(|m| model_id(&m).0);
            let vs = rt.block_on(l.adapters(model.as_deref()))?;
            if common.json {
                return print_json(&json!(vs));
            }
            if vs.is_empty() {
                eprintln!(
                    "no adapter versions{}",
                    model.map(|m| format!(" of {m}")).unwrap_or_default()
                );
                return Ok(());
            }
            println!(
                "{:<26} {:<16} {:>4}  {:<10} {:<8} {:<26} {:>8} {:>8}  CREATED",
                "ID", "MODEL", "VER", "STATUS", "TAINTED", "PARENT", "RECORDS", "FEEDBACK"
            );
            for v in &vs {
                println!(
                    "{:<26} {:<16} {:>4}  {:<10} {:<8} {:<26} {:>8} {:>8}  {}",
                    v.id,
                    v.model,
                    v.version,
                    v.status.name(),
                    if v.tainted.is_some() { "YES" } else { "no" },
                    v.parent.as_deref().unwrap_or("base"),
                    v.records,
                    v.feedback,
                    when(v.created_at_ms)
                );
            }
            Ok(())
        }
        AdaptersCmd::Show { id, common } => {
            let (rt, l) = open_ledger(common.ledger.as_deref(), false)?;
            let Some(v) = rt.block_on(l.adapter(&id))? else {
                bail!("no adapter version {id} in the ledger (brise adapters list shows them)");
            };
            let lineage = rt.block_on(l.adapter_lineage(&id))?;
            let (records, feedback) = rt.block_on(l.adapter_training_data(&id))?;
            let history: Vec<_> = rt
                .block_on(l.adapter_history(&v.model))?
                .into_iter()
                .filter(|h| h.version.as_deref() == Some(id.as_str()))
                .collect();
            if common.json {
                let mut j = json!(v);
                j["lineage"] = json!(lineage
                    .iter()
                    .map(|x| json!({"id": x.id, "version": x.version, "status": x.status, "tainted": x.tainted.is_some()}))
                    .collect::<Vec<_>>());
                j["history"] = json!(history);
                j["record_ids"] = json!(records);
                j["feedback_ids"] = json!(feedback);
                return print_json(&j);
            }
            println!("{} ({} version {})", v.id, v.model, v.version);
            println!("status       {}", status_text(&v));
            match &v.tainted {
                Some(t) => println!(
                    "tainted      YES, since {}: {}{}",
                    when(t.at_ms),
                    t.reason,
                    if v.status == AdapterStatus::Promoted {
                        " (IT IS SERVING: roll it back or promote a clean version)"
                    } else {
                        ""
                    }
                ),
                None => println!("tainted      no"),
            }
            let chain: Vec<String> = lineage
                .iter()
                .map(|x| format!("{} ({})", x.id, x.status.name()))
                .chain(std::iter::once("base".to_string()))
                .collect();
            println!("lineage      {}", chain.join(" <- "));
            println!("path         {}", v.path);
            println!("method       {}", v.method.name());
            println!("created      {} by {}", when(v.created_at_ms), v.created_by);
            println!(
                "dataset      {}",
                v.dataset_sha256
                    .as_deref()
                    .map(|h| format!("sha256 {h}"))
                    .unwrap_or_else(|| "(no hash recorded)".into())
            );
            println!(
                "trained on   {} records, {} feedback items",
                v.records, v.feedback
            );
            println!("config       {}", v.config);
            match &v.eval_report {
                None => println!("eval report  (none)"),
                Some(r) => {
                    let lines = report_summary(r);
                    println!("eval report  {}", lines.first().map_or("{}", |s| s));
                    for line in lines.iter().skip(1) {
                        println!("             {line}");
                    }
                }
            }
            for h in &history {
                println!(
                    "history      {} {} by {}",
                    when(h.at_ms),
                    if h.action == "promote" {
                        "promoted"
                    } else {
                        "re-promoted by a rollback"
                    },
                    h.actor
                );
            }
            Ok(())
        }
        AdaptersCmd::Register(a) => register(a),
        AdaptersCmd::Promote {
            id,
            actor: who,
            no_check,
            common,
        } => {
            let (rt, l) = open_ledger(common.ledger.as_deref(), false)?;
            let Some(v) = rt.block_on(l.adapter(&id))? else {
                bail!("no adapter version {id} in the ledger (brise adapters list shows them)");
            };
            if !no_check && v.status != AdapterStatus::Promoted && v.tainted.is_none() {
                let (_, file) = model_id(&v.model);
                check_dir(Path::new(&v.path), file.as_deref(), true)
                    .with_context(|| format!("{id} is not promoted"))?;
            }
            let p = rt.block_on(l.promote_adapter(&id, &actor(who)))?;
            if common.json {
                return print_json(&json!(p));
            }
            if p.audit_seq.is_none() {
                eprintln!("{id} is already the version {} serves", p.model);
            } else {
                eprintln!(
                    "{}: promoted {id} (was: {}); a running brise serve on this ledger swaps it in within its --adapter-poll seconds",
                    p.model,
                    p.from.as_deref().unwrap_or("the base model")
                );
            }
            Ok(())
        }
        AdaptersCmd::Rollback {
            model,
            actor: who,
            common,
        } => {
            let (rt, l) = open_ledger(common.ledger.as_deref(), false)?;
            let model = model_id(&model).0;
            let p = rt.block_on(l.rollback_adapter(&model, &actor(who)))?;
            if common.json {
                return print_json(&json!(p));
            }
            eprintln!(
                "{model}: rolled back from {} to {}",
                p.from.as_deref().unwrap_or("the base model"),
                p.to.as_deref().unwrap_or("the base model")
            );
            Ok(())
        }
        AdaptersCmd::Reject {
            id,
            reason,
            actor: who,
            common,
        } => {
            let (rt, l) = open_ledger(common.ledger.as_deref(), false)?;
            let v = rt.block_on(l.reject_adapter(&id, &actor(who), reason.as_deref()))?;
            if common.json {
                return print_json(&json!(v));
            }
            eprintln!("{id}: {}", status_text(&v));
            Ok(())
        }
    }
}

fn register(a: RegisterArgs) -> Result<()> {
    let (model, file) = model_id(&a.model);
    let dir =
        std::fs::canonicalize(&a.path).with_context(|| format!("--path {}", a.path.display()))?;
    if !dir.is_dir() {
        bail!("--path {}: not a directory", dir.display());
    }
    let (adapter_config, checked) = check_dir(&dir, file.as_deref(), !a.no_check)?;
    let config = match &a.config {
        Some(c) => json_arg("--config", c)?,
        None => adapter_config,
    };
    let eval_report = a
        .eval_report
        .as_deref()
        .map(|r| json_arg("--eval-report", r))
        .transpose()?;
    let mut record_ids = a.records.clone();
    if let Some(f) = &a.records_file {
        record_ids.extend(ids_file(f)?);
    }
    let mut feedback_ids = a.feedback.clone();
    if let Some(f) = &a.feedback_file {
        feedback_ids.extend(ids_file(f)?);
    }
    let (rt, l) = open_ledger(a.common.ledger.as_deref(), true)?;
    let v = rt.block_on(l.register_adapter(NewAdapterVersion {
        model,
        path: dir.display().to_string(),
        parent: a.parent.clone(),
        created_by: actor(a.created_by.clone()),
        method: a.method,
        config,
        dataset_sha256: a.dataset_sha256.clone(),
        record_ids,
        feedback_ids,
        eval_report,
    }))?;
    eprintln!(
        "registered {} ({} version {}, candidate): {checked}",
        v.id, v.model, v.version
    );
    if let Some(t) = &v.tainted {
        eprintln!(
            "warning: {} is tainted and cannot be promoted: {}",
            v.id, t.reason
        );
    }
    if a.common.json {
        return print_json(&json!(v));
    }
    println!("{}", v.id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(when(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(when(1_796_083_200_000), "2026-12-01 00:00:00 UTC");
        assert_eq!(when(951_782_400_000 + 3_723_000), "2000-02-29 01:02:03 UTC");
    }

    #[test]
    fn report_summaries() {
        let r = json!({"passed": true, "nll": {"before": 1.5, "after": 1.25}, "notes": "ok", "items": [1, 2]});
        let mut got = report_summary(&r);
        got.sort();
        assert_eq!(
            got,
            [
                "items: [2 items]",
                "nll.after: 1.25",
                "nll.before: 1.5",
                "notes: ok",
                "passed: true",
            ]
        );
    }
}
