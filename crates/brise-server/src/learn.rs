//! `brise serve --learn`: the server trains by itself. Every `check_every`, for each
//! served model, it counts the feedback given since that model's last training run;
//! at `after` items it queues a fine-tuning job of its own (`jobs.rs`) that builds the
//! dataset from the ledger (consent, objections, redaction and retention applied),
//! trains a fresh adapter against the version serving now, and registers it: promoted
//! when the gate passes, rejected otherwise. The registry poller then swaps the
//! promotion in. Its jobs are listed, with their loss curves, like any other; the job
//! runner runs one job at a time at a lower CPU priority than serving.

use crate::AppState;
use brise_ledger::Ledger;
use brise_ledger::jobs::{NewJob, SYSTEM_TENANT};
use brise_train::data::Method;
use brise_train::trainer::TrainConfig;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub const ACTOR: &str = "brise serve --learn";

#[derive(Clone, Debug)]
pub struct LearnConfig {
    /// Train once this many feedback items arrived since the model's last run.
    pub after: i64,
    pub check_every: Duration,
    /// `None`: auto (see `LedgerQuery::method`).
    pub method: Option<Method>,
    pub train: TrainConfig,
}

/// When the model's last training run started: its newest version or its newest
/// `--learn` job, whichever is later (0: never).
async fn last_run(l: &Ledger, model: &str) -> brise_ledger::Result<(i64, bool)> {
    let v = l
        .adapters(Some(model))
        .await?
        .iter()
        .map(|v| v.created_at_ms)
        .max()
        .unwrap_or(0);
    // At most one of the servers' own jobs per model is unfinished (a unique index), and
    // then it is the newest one.
    let (newest, _) = l
        .jobs_page(Some(SYSTEM_TENANT), Some(model), None, None, 0, 1)
        .await?;
    let busy = newest.first().is_some_and(|j| !j.status.finished());
    let j = newest.first().map_or(0, |j| j.created_at_ms);
    Ok((v.max(j), busy))
}

pub async fn run(state: Arc<AppState>, l: Ledger, cfg: LearnConfig) {
    let mut since: HashMap<String, i64> = HashMap::new();
    loop {
        tokio::time::sleep(cfg.check_every).await;
        if state.shutting_down.load(Ordering::Relaxed) {
            return;
        }
        let Some(models) = state.models.get() else {
            continue;
        };
        for m in models {
            let (from, busy) = match last_run(&l, &m.id).await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("brise: --learn: reading the registry: {e}");
                    continue;
                }
            };
            if busy {
                continue;
            }
            let from = since.get(&m.id).copied().unwrap_or(0).max(from);
            let n = match l.feedback_counts(from).await {
                Ok(c) => c
                    .into_iter()
                    .find(|(id, _)| *id == m.id)
                    .map_or(0, |(_, n)| n),
                Err(e) => {
                    eprintln!("brise: --learn: counting feedback: {e}");
                    continue;
                }
            };
            if n < cfg.after {
                continue;
            }
            let mut train = cfg.train.clone();
            if let Some(mm) = cfg.method {
                train.method = mm;
            }
            let job = l
                .create_job(NewJob {
                    tenant: SYSTEM_TENANT.into(),
                    model: m.id.clone(),
                    source: "ledger".into(),
                    training_file: None,
                    validation_file: None,
                    method: cfg.method.map_or("auto", |m| m.name()).into(),
                    config: serde_json::to_value(&train).expect("plain data"),
                    request: json!({"trigger": format!("{n} new feedback items"), "after": cfg.after}),
                    dialect: "openai".into(),
                    suffix: None,
                    promote: true,
                    created_by: ACTOR.into(),
                })
                .await;
            since.insert(m.id.clone(), brise_ledger::now_ms());
            match job {
                Ok(j) => {
                    eprintln!(
                        "brise: --learn: {n} new feedback items for {}; queued {}",
                        m.id, j.id
                    );
                    let _ = l
                        .job_event(
                            &j.id,
                            "info",
                            "message",
                            &format!("Queued by --learn: {n} new feedback items"),
                            None,
                        )
                        .await;
                    state.jobs_changed.notify_one();
                }
                Err(e) => eprintln!("brise: --learn: {}: queueing a job: {e}", m.id),
            }
        }
    }
}
