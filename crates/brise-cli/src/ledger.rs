//! `brise ledger`: read the record of completions and feedback.

use crate::serve::ledger_spec;
use anyhow::{Context, Result, bail};
use brise_ledger::Ledger;
use clap::Subcommand;
use std::path::Path;

#[derive(Subcommand, Debug)]
pub enum LedgerCmd {
    /// Print a completion's record with its feedback as JSON (exit 1 when there is no such record)
    Show {
        /// The response id a client got (chatcmpl-…, cmpl-…, fim-…)
        id: String,
        /// The ledger: a SQLite file or a postgres:// URL [default: $BRISE_HOME/ledger.sqlite]
        #[arg(long, env = "BRISE_LEDGER")]
        ledger: Option<String>,
    },
    /// Print the audit log of admin actions; --verify checks its hash chain
    Audit {
        #[arg(long)]
        verify: bool,
        #[arg(long, env = "BRISE_LEDGER")]
        ledger: Option<String>,
    },
    /// Write all of a subject's records and feedback as JSONL (a GDPR access request)
    ExportSubject {
        #[arg(long)]
        subject: String,
        /// Only this tenant's records
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, env = "BRISE_LEDGER")]
        ledger: Option<String>,
    },
    /// Record a subject's standing objection to training use (their data leaves every export)
    Object {
        #[arg(long)]
        subject: String,
        /// Only in this tenant [default: every tenant]
        #[arg(long, default_value = "*")]
        tenant: String,
        #[arg(long, env = "BRISE_LEDGER")]
        ledger: Option<String>,
    },
    /// Show or set a tenant's policy for requests that say nothing themselves: their
    /// training consent (deny makes the tenant opt-in) and how much content is kept
    Tenant {
        #[arg(long)]
        tenant: String,
        /// Training consent of requests without an X-Brise-Training header
        #[arg(long, value_parser = ["allow", "deny"])]
        training: Option<String>,
        /// The most content kept: full, redacted (PII replaced) or metadata (no prompt or answer)
        #[arg(long)]
        content_level: Option<brise_ledger::governance::ContentLevel>,
        #[arg(long, env = "BRISE_LEDGER")]
        ledger: Option<String>,
    },
    /// Show or set the retention windows (days; 0 keeps data until erased), then purge
    Retention {
        #[arg(long)]
        records_days: Option<i64>,
        #[arg(long)]
        feedback_days: Option<i64>,
        #[arg(long, env = "BRISE_LEDGER")]
        ledger: Option<String>,
    },
    /// Put a legal hold on a subject's data (kept past retention), or --release it
    Hold {
        #[arg(long)]
        subject: String,
        /// Only in this tenant [default: every tenant]
        #[arg(long, default_value = "*")]
        tenant: String,
        #[arg(long)]
        release: bool,
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

pub(crate) fn open(arg: Option<&str>) -> Result<(tokio::runtime::Runtime, Ledger)> {
    open_ledger(arg, false)
}

/// Opens the ledger `--ledger` names; a SQLite file that does not exist is an error
/// unless `create`.
pub(crate) fn open_ledger(
    arg: Option<&str>,
    create: bool,
) -> Result<(tokio::runtime::Runtime, Ledger)> {
    let Some(spec) = ledger_spec(arg) else {
        bail!("--ledger off: there is no ledger to read");
    };
    let shown = brise_ledger::redact_url(&spec);
    if !create && !brise_ledger::is_postgres_url(&spec) && !Path::new(&spec).exists() {
        bail!("no ledger at {shown} (brise serve creates it)");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let l = rt
        .block_on(Ledger::open(&spec))
        .with_context(|| format!("opening {shown}"))?;
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
        LedgerCmd::Audit { verify, ledger } => {
            let (rt, l) = open(ledger.as_deref())?;
            for e in rt.block_on(l.audit_entries())? {
                println!("{}", serde_json::to_string(&e)?);
            }
            if verify {
                match rt.block_on(l.verify_audit())? {
                    Ok(n) => eprintln!("audit log verified: {n} entries, chain intact"),
                    Err(seq) => bail!("the audit log's hash chain breaks at entry {seq}"),
                }
            }
            Ok(())
        }
        LedgerCmd::ExportSubject {
            subject,
            tenant,
            out,
            ledger,
        } => {
            let (rt, l) = open(ledger.as_deref())?;
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(&out)
                    .with_context(|| format!("creating {}", out.display()))?,
            );
            let n = rt.block_on(l.export_subject("cli", tenant.as_deref(), &subject, &mut f))?;
            std::io::Write::flush(&mut f)?;
            eprintln!("{n} records of {subject} to {}", out.display());
            Ok(())
        }
        LedgerCmd::Object {
            subject,
            tenant,
            ledger,
        } => {
            let (rt, l) = open(ledger.as_deref())?;
            rt.block_on(l.object("cli", &tenant, &subject))?;
            eprintln!(
                "{subject} (tenant {tenant}) objects to training use: left out of every export"
            );
            Ok(())
        }
        LedgerCmd::Tenant {
            tenant,
            training,
            content_level,
            ledger,
        } => {
            let (rt, l) = open(ledger.as_deref())?;
            let p = if training.is_some() || content_level.is_some() {
                rt.block_on(l.set_tenant_policy(
                    "cli",
                    &tenant,
                    training.map(|t| t == "allow"),
                    content_level,
                ))?
            } else {
                rt.block_on(l.tenant_policy(&tenant))?
            };
            println!(
                "{}",
                serde_json::json!({"tenant": tenant, "training": if p.training_allow { "allow" } else { "deny" }, "content_level": p.content_level})
            );
            Ok(())
        }
        LedgerCmd::Retention {
            records_days,
            feedback_days,
            ledger,
        } => {
            let (rt, l) = open(ledger.as_deref())?;
            let mut r = rt.block_on(l.retention())?;
            if records_days.is_some() || feedback_days.is_some() {
                let keep = |d: Option<i64>, old: Option<i64>| match d {
                    Some(0) => None,
                    Some(d) => Some(d),
                    None => old,
                };
                r = brise_ledger::retention::Retention {
                    records_days: keep(records_days, r.records_days),
                    feedback_days: keep(feedback_days, r.feedback_days),
                };
                rt.block_on(l.set_retention("cli", r))?;
            }
            let rep = rt.block_on(l.purge("cli", brise_ledger::now_ms()))?;
            println!(
                "{}",
                serde_json::to_string(&serde_json::json!({"retention": r, "purged": rep}))?
            );
            Ok(())
        }
        LedgerCmd::Hold {
            subject,
            tenant,
            release,
            ledger,
        } => {
            let (rt, l) = open(ledger.as_deref())?;
            rt.block_on(l.hold("cli", &tenant, &subject, !release))?;
            eprintln!(
                "legal hold on {subject} (tenant {tenant}) {}",
                if release { "released" } else { "set" }
            );
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
                "completions        {:>10}  ({} errors, {} cancelled by their client)",
                s.completions, s.errors, s.cancelled
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
            for m in &s.by_model {
                println!("{:<28} {:>11} {:>9}", m.model, m.completions, m.feedback);
            }
            Ok(())
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// openai-sft, openai-dpo, mistral-sft, trl-sft, trl-dpo or trl-kto
    #[arg(long)]
    pub format: brise_ledger::export::Format,
    /// Where to write the JSONL rows
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Only feedback given at or after this time: unix seconds, or YYYY-MM-DD (UTC)
    #[arg(long)]
    pub since: Option<String>,
    /// Only completions of this model id
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, env = "BRISE_LEDGER")]
    pub ledger: Option<String>,
}

fn parse_since(s: &str) -> Result<i64> {
    brise_ledger::export::parse_since(s).map_err(|e| anyhow::anyhow!("--since {e}"))
}

pub fn export(a: ExportArgs) -> Result<()> {
    let (rt, l) = open(a.ledger.as_deref())?;
    let filter = brise_ledger::export::ExportFilter {
        since_ms: a.since.as_deref().map(parse_since).transpose()?,
        model: a.model.clone(),
    };
    let tmp = a.out.with_extension("partial");
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    );
    let rep = rt.block_on(l.export("cli", a.format, &filter, &mut f))?;
    std::io::Write::flush(&mut f)?;
    drop(f);
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "{} rows to {} from {} feedback items ({} without training consent, {} not chats, {} with no row in this format)",
        rep.rows,
        a.out.display(),
        rep.feedback_seen,
        rep.skipped_no_consent,
        rep.skipped_not_chat,
        rep.not_applicable
    );
    println!("{}", serde_json::to_string(&rep)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn since_dates() {
        assert_eq!(super::parse_since("1970-01-02").unwrap(), 86_400_000);
        assert_eq!(super::parse_since("2026-12-01").unwrap(), 1_796_083_200_000);
        assert_eq!(super::parse_since("1796083200").unwrap(), 1_796_083_200_000);
        assert!(super::parse_since("2026-13-01").is_err());
        assert!(super::parse_since("yesterday").is_err());
    }
}

#[derive(clap::Args, Debug)]
pub struct EraseArgs {
    /// The data subject whose records and feedback are erased
    #[arg(long)]
    pub subject: String,
    /// Only this tenant's records [default: every tenant's]
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long, env = "BRISE_LEDGER")]
    pub ledger: Option<String>,
}

/// `brise erase`: deletes a subject's records and feedback, prints the receipt.
pub fn erase(a: EraseArgs) -> Result<()> {
    let (rt, l) = open(a.ledger.as_deref())?;
    let r = rt.block_on(l.erase_subject("cli", a.tenant.as_deref(), &a.subject))?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    for v in &r.adapters_tainted {
        eprintln!(
            "warning: adapter version {} of {} was trained on the erased data: it is marked tainted and will not be promoted",
            v.id, v.model
        );
        if v.status == brise_ledger::adapters::AdapterStatus::Promoted {
            eprintln!(
                "WARNING: {} IS SERVING {} NOW. Roll it back (brise adapters rollback --model {}) or promote a version trained without the erased data.",
                v.id, v.model, v.model
            );
        }
    }
    Ok(())
}
