//! `brise ledger`: read the record of completions and feedback.

use crate::serve::ledger_path;
use anyhow::{Context, Result, bail};
use brise_ledger::Ledger;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum LedgerCmd {
    /// Print a completion's record with its feedback as JSON (exit 1 when there is no such record)
    Show {
        /// The response id a client got (chatcmpl-…, cmpl-…, fim-…)
        id: String,
        /// The ledger file [default: $BRISE_HOME/ledger.sqlite]
        #[arg(long, env = "BRISE_LEDGER")]
        ledger: Option<String>,
    },
    /// Counts of completions, tokens and feedback, overall and by model
    Stats {
        #[arg(long, env = "BRISE_LEDGER")]
        ledger: Option<String>,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

fn open(arg: Option<&str>) -> Result<(tokio::runtime::Runtime, Ledger)> {
    let Some(path) = ledger_path(arg) else {
        bail!("--ledger off: there is no ledger to read");
    };
    if !path.exists() {
        bail!("no ledger at {} (brise serve creates it)", path.display());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let l = rt
        .block_on(Ledger::open_sqlite(&path))
        .with_context(|| format!("opening {}", path.display()))?;
    Ok((rt, l))
}

pub fn run(c: LedgerCmd) -> Result<()> {
    match c {
        LedgerCmd::Show { id, ledger } => {
            let (rt, l) = open(ledger.as_deref())?;
            let rec = rt.block_on(l.get(&id, None))?;
            let Some(rec) = rec else {
                bail!("no completion {id} in the ledger");
            };
            let fb = rt.block_on(l.feedback_for(&id, None))?;
            let mut v = serde_json::to_value(&rec)?;
            v["feedback"] = serde_json::to_value(&fb)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        LedgerCmd::Stats { ledger, json } => {
            let (rt, l) = open(ledger.as_deref())?;
            let s = rt.block_on(l.stats())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            let rate = |n: i64| {
                if s.completions == 0 {
                    0.0
                } else {
                    100.0 * n as f64 / s.completions as f64
                }
            };
            println!(
                "completions        {:>10}  ({} errors)",
                s.completions, s.errors
            );
            println!("prompt tokens      {:>10}", s.prompt_tokens);
            println!("completion tokens  {:>10}", s.completion_tokens);
            println!(
                "feedback           {:>10}  ({:.1}% of completions)",
                s.feedback,
                rate(s.feedback)
            );
            println!("  thumbs up        {:>10}", s.thumbs_up);
            println!("  thumbs down      {:>10}", s.thumbs_down);
            println!("  corrections      {:>10}", s.corrections);
            println!("  pairwise choices {:>10}", s.preferences);
            println!("\n{:<28} {:>11} {:>9}", "MODEL", "COMPLETIONS", "FEEDBACK");
            for (m, n, f) in &s.by_model {
                println!("{m:<28} {n:>11} {f:>9}");
            }
            Ok(())
        }
    }
}
