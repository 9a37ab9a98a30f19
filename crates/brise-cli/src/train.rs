//! `brise train`: LoRA training from the ledger's feedback or a dataset file, then the
//! evaluation gate, then (when it passes) promotion.

use crate::{registry, which};
use anyhow::{Context, Result, bail};
use brise_kernels::quant::Kernels;
use brise_ledger::Ledger;
use brise_ledger::export::Format;
use brise_model::Model;
use brise_train::data::{DEFAULT_HELD_OUT, Dataset, LedgerQuery, LoadOptions, Method};
use brise_train::eval::GateConfig;
use brise_train::pipeline::{LearnOptions, RunOutcome, RunSpec};
use brise_train::trainer::TrainConfig;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  brise train --from-ledger --model smollm2:135m      learn from the feedback brise serve recorded
  brise train --from-ledger                           every model with feedback
  brise train --model smollm2:135m --data pairs.jsonl --format trl-dpo

The run freezes a held-out split (by subject, else by prompt), trains a fresh adapter on
the rest, and evaluates it against the current version: held-out NLL on preferred
answers must fall, preference accuracy must rise, and perplexity on a fixed general
text must not rise more than 5%. The adapter and its reports (eval.md, eval.json,
run.json) go to $BRISE_HOME/adapters/MODEL/VERSION/.")]
pub struct TrainArgs {
    /// The model to train for (a name, .gguf file or directory). With --from-ledger and
    /// no --model: every model with feedback in the ledger
    #[arg(long)]
    pub model: Option<String>,
    /// Build the dataset from the ledger's feedback (consent, objections, redaction and
    /// retention applied)
    #[arg(long, conflicts_with = "data")]
    pub from_ledger: bool,
    /// A JSONL dataset (an export of brise's, or TRL/OpenAI/Mistral data)
    #[arg(long, requires = "format")]
    pub data: Option<PathBuf>,
    /// Format of --data: trl-sft, trl-dpo, trl-kto, openai-sft, openai-dpo, mistral-sft
    #[arg(long)]
    pub format: Option<String>,
    /// sft, dpo, kto, or auto (with --from-ledger: DPO when users chose between two
    /// answers, else SFT when there are corrections, else KTO when there are
    /// thumbs-down, else SFT)
    #[arg(long, default_value = "auto")]
    pub method: String,
    /// The ledger: a SQLite file or a postgres:// URL [default: $BRISE_HOME/ledger.sqlite]
    #[arg(long)]
    pub ledger: Option<String>,
    /// Only feedback on completions since this time (unix seconds or YYYY-MM-DD)
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// LoRA alpha [default: 2 × rank]
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Learning rate [default: 3e-4]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Epochs over the training split [default: fitted to the data: about 32
    /// optimizer steps, 2 to 8 epochs]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many optimizer steps
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Examples per optimizer step [default: fitted to the data: an eighth of the
    /// examples, 2 to 8]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// DPO: weight of an NLL term on the chosen answers (TRL's rpo_alpha) [default: 1
    /// when --method auto chose DPO, else 0]
    #[arg(long)]
    pub rpo_alpha: Option<f64>,
    /// Stop when the held-out loss has not improved for this many epochs in a row, and
    /// keep the best epoch's adapter; 0 runs every epoch
    #[arg(long, default_value_t = brise_train::trainer::AUTO_PATIENCE)]
    pub early_stopping_patience: usize,
    /// DPO's and KTO's beta
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Share of examples held out for the gate
    #[arg(long, default_value_t = DEFAULT_HELD_OUT)]
    pub held_out: f64,
    /// The gate's perplexity limit: the largest rise allowed on the general text
    #[arg(long, default_value_t = 0.05)]
    pub max_ppl_increase: f64,
    /// Train and evaluate, but do not promote even when the gate passes
    #[arg(long)]
    pub no_promote: bool,
    /// Worker threads [default: all cores]
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Print the run as JSON instead of the Markdown report
    #[arg(long)]
    pub json: bool,
    /// Save a checkpoint (adapter, optimizer state, step) into DIR every N steps and at
    /// the end; run the same command again to continue an interrupted run from it
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// With --checkpoint: steps between checkpoints
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: u64,
}

/// The run's configuration: what the flags set, the rest fitted to the data
/// ([`TrainConfig::fit_to_data`]). `auto_method`: --method auto chose `method`.
pub fn train_config(a: &TrainArgs, method: Method, auto_method: bool) -> TrainConfig {
    let mut c = TrainConfig {
        method,
        rank: a.rank,
        alpha: a.alpha.unwrap_or(2.0 * a.rank as f64),
        max_steps: a.max_steps,
        beta: a.beta,
        seed: a.seed,
        early_stopping_patience: a.early_stopping_patience,
        ..TrainConfig::fitted()
    };
    if let Some(lr) = a.lr {
        c.learning_rate = lr;
        c.set_explicit("learning_rate");
    }
    if let Some(e) = a.epochs {
        c.epochs = e;
        c.set_explicit("epochs");
    }
    if let Some(b) = a.batch_size {
        c.batch_size = b;
        c.set_explicit("batch_size");
    }
    match a.rpo_alpha {
        Some(r) => {
            c.rpo_alpha = r;
            c.set_explicit("rpo_alpha");
        }
        // An explicit --method dpo is TRL's plain DPO.
        None if !auto_method => c.set_explicit("rpo_alpha"),
        None => {}
    }
    c
}

/// Where a new version of `model_id`'s adapter goes.
pub fn version_dir(model_id: &str) -> PathBuf {
    let safe: String = model_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let stamp = chrono_stamp();
    crate::registry::brise_home()
        .join("adapters")
        .join(safe)
        .join(stamp)
}

fn chrono_stamp() -> String {
    let ms = brise_ledger::now_ms();
    format!("v{ms}")
}

pub fn progress_bar(total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "training {bar:30} {pos}/{len} steps  loss {msg}  [{elapsed_precise}<{eta_precise}]",
        )
        .expect("a valid template"),
    );
    pb
}

pub fn train(a: TrainArgs) -> Result<()> {
    if !a.from_ledger && a.data.is_none() {
        bail!("give --from-ledger, or --data FILE --format F");
    }
    if !(0.0..1.0).contains(&a.held_out) {
        bail!("--held-out must be in [0, 1)");
    }
    let method = match a.method.as_str() {
        "auto" => None,
        m => Some(m.parse::<Method>().map_err(anyhow::Error::msg)?),
    };
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // The ledger: needed for --from-ledger; with --data it is where the version is
    // registered, when there is one.
    let ledger = match crate::serve::ledger_spec(a.ledger.as_deref()) {
        Some(spec)
            if a.from_ledger
                || a.ledger.is_some()
                || brise_ledger::is_postgres_url(&spec)
                || std::path::Path::new(&spec).exists() =>
        {
            Some(
                rt.block_on(Ledger::open(&spec))
                    .with_context(|| format!("opening {}", brise_ledger::redact_url(&spec)))?,
            )
        }
        _ if a.from_ledger => bail!("--ledger off: --from-ledger needs a ledger"),
        _ => None,
    };
    let since_ms = a
        .since
        .as_deref()
        .map(brise_ledger::export::parse_since)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let models: Vec<which::LedgerModel> = match (&a.model, &ledger) {
        (Some(m), l) => vec![which::find(&rt, l.as_ref(), m)?],
        (None, Some(l)) => {
            let counts = rt.block_on(l.feedback_counts(since_ms.unwrap_or(0)))?;
            if counts.is_empty() {
                bail!("the ledger has no feedback to learn from");
            }
            counts
                .into_iter()
                .map(|(m, _)| which::by_id(&rt, l, &m))
                .collect::<Result<_>>()?
        }
        (None, None) => vec![which::find(&rt, None, registry::DEFAULT_MODEL)?],
    };
    for which::LedgerModel { id, path } in models {
        let model = Model::load(&path, Kernels::best())
            .with_context(|| format!("loading {}", path.display()))?;
        let opts = LoadOptions::default();
        let data = match (&ledger, &a.data) {
            (Some(l), None) => rt.block_on(Dataset::from_ledger(
                l,
                &model,
                &LedgerQuery {
                    model: Some(id.clone()),
                    since_ms,
                    method,
                    actor: "brise train".into(),
                },
                &opts,
            ))?,
            (_, Some(file)) => {
                let f: Format = a
                    .format
                    .as_deref()
                    .unwrap_or_default()
                    .parse()
                    .map_err(anyhow::Error::msg)?;
                let mut d = Dataset::from_jsonl(file, f, &model, &opts)?;
                if let Some(m) = method
                    && m != d.method
                {
                    bail!(
                        "{} holds {} data; --method {} does not fit it",
                        file.display(),
                        d.method.name(),
                        m.name()
                    );
                }
                d.method = method.unwrap_or(d.method);
                d
            }
            (None, None) => unreachable!("checked above"),
        };
        for s in &data.skipped {
            eprintln!("skipped {}: {}", s.at, s.reason);
        }
        if data.examples.is_empty() {
            eprintln!(
                "{id}: no usable examples ({}); nothing to train",
                data.source
            );
            continue;
        }
        eprintln!(
            "{id}: {} {} examples from {}",
            data.examples.len(),
            data.method.name(),
            data.source
        );
        let out = run_one(&model, &id, &data, &a, threads, ledger.as_ref(), &rt)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!("{}", out.report.to_markdown());
            println!("adapter: {}", out.adapter_dir.display());
        }
    }
    Ok(())
}

fn run_one(
    model: &Model,
    id: &str,
    data: &Dataset,
    a: &TrainArgs,
    threads: usize,
    ledger: Option<&Ledger>,
    rt: &tokio::runtime::Runtime,
) -> Result<RunOutcome> {
    let cfg = train_config(a, data.method, a.method == "auto");
    let gate = GateConfig {
        ppl_max_increase: a.max_ppl_increase,
        ..GateConfig::default()
    };
    let out_dir = version_dir(id);
    let pb = progress_bar(0);
    let mut on_step = |r: &brise_train::trainer::StepReport| {
        pb.set_length(r.total_steps);
        pb.set_position(r.step);
        pb.set_message(format!("{:.4}  {:.0} tok/s", r.loss, r.tokens_per_s));
    };
    let (out, version) = match ledger {
        Some(l) => {
            let opts = LearnOptions {
                train: cfg,
                gate,
                held_out_fraction: a.held_out,
                threads,
                promote: !a.no_promote,
                actor: "brise train".into(),
                out_dir,
                checkpoint: a.checkpoint.clone().map(|d| (d, a.checkpoint_every)),
            };
            let res = rt.block_on(brise_train::pipeline::learn(
                l,
                model,
                id,
                brise_train::pipeline::LearnData {
                    train: data,
                    validation: None,
                },
                opts,
                None,
                &mut on_step,
            ));
            pb.finish_and_clear();
            let learned = res.map_err(anyhow::Error::msg)?;
            let v = &learned.version;
            let what = if learned.promoted {
                "promoted: a running brise serve picks it up within its --adapter-poll".to_string()
            } else if learned.outcome.report.passed {
                "a candidate (--no-promote); `brise adapters promote` serves it".to_string()
            } else {
                "rejected by the gate".to_string()
            };
            (
                learned.outcome,
                Some(format!("version {} of {}: {what}", v.id, v.model)),
            )
        }
        None => {
            let res = brise_train::pipeline::run(
                RunSpec {
                    model,
                    data,
                    train: cfg,
                    gate,
                    held_out_fraction: a.held_out,
                    current: None,
                    out_dir,
                    threads,
                    cancel: None,
                    checkpoint: a.checkpoint.clone().map(|d| (d, a.checkpoint_every)),
                    validation: None,
                },
                &mut on_step,
            );
            pb.finish_and_clear();
            (res.map_err(anyhow::Error::msg)?, None)
        }
    };
    if out.summary.steps == 0 {
        eprintln!("nothing left to train: the checkpoint had taken every step");
    } else {
        eprintln!(
            "trained {} steps on {} examples ({} held out) in {:.1} s, {:.0} tokens/s; loss {:.4} -> {:.4}",
            out.summary.steps,
            out.train_examples,
            out.held_out_examples,
            out.summary.seconds,
            out.summary.tokens_per_s,
            out.summary.first_loss.unwrap_or(f64::NAN),
            out.summary.last_loss.unwrap_or(f64::NAN),
        );
    }
    for r in &out.retries {
        eprintln!(
            "learning rate {:.2e}: every epoch raised the general perplexity above the gate's bound ({} steps, {}); trained again at half the rate",
            r.learning_rate,
            r.steps,
            r.early_stopping.reason.as_deref().unwrap_or("")
        );
    }
    if let Some(es) = &out.early_stopping {
        let per_epoch: Vec<String> = es
            .epoch_ppl
            .iter()
            .map(|(e, p)| {
                let loss = es.epoch_losses.iter().find(|(le, _)| le == e);
                match loss {
                    Some((_, l)) => format!("{}: loss {l:.4}, ppl {p:.3}", e + 1),
                    None => format!("{}: ppl {p:.3}", e + 1),
                }
            })
            .collect();
        if !per_epoch.is_empty() {
            eprintln!(
                "epochs (held-out loss, general perplexity; the gate accepts up to {:.3}): {}",
                es.ppl_limit.unwrap_or(f64::NAN),
                per_epoch.join("; ")
            );
        }
        if let Some(reason) = &es.reason {
            match es.kept_epoch {
                Some(kept) => eprintln!("stopped: {reason}; kept epoch {}", kept + 1),
                None => eprintln!("stopped: {reason}"),
            }
        }
    }
    if out.summary.truncated > 0 {
        eprintln!(
            "note: {} sequences were longer than {} tokens and were cut",
            out.summary.truncated, out.config.max_len
        );
    }
    match version {
        Some(v) => eprintln!("{v}"),
        None => eprintln!(
            "no ledger here: the adapter is not registered (`brise adapters register` does it)"
        ),
    }
    Ok(out)
}
