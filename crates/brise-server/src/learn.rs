//! `brise serve --learn`: the server trains by itself. Every `check_every`, for each
//! served model, it counts the feedback given since that model's last training run;
//! at `after` items it builds the dataset from the ledger (consent, objections,
//! redaction and retention applied), trains a fresh adapter against the version
//! serving now, and registers it: promoted when the gate passes, rejected otherwise.
//! The registry poller then swaps the promotion in. One run at a time, on its own
//! threads at a lower CPU priority than serving.

use crate::AppState;
use brise_ledger::Ledger;
use brise_train::data::{Dataset, LedgerQuery, LoadOptions, Method};
use brise_train::eval::GateConfig;
use brise_train::pipeline::{LearnOptions, learn};
use brise_train::trainer::TrainConfig;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct LearnConfig {
    /// Train once this many feedback items arrived since the model's last run.
    pub after: i64,
    pub check_every: Duration,
    /// `None`: auto (see `LedgerQuery::method`).
    pub method: Option<Method>,
    pub train: TrainConfig,
    pub gate: GateConfig,
    pub held_out: f64,
    pub threads: usize,
    /// Versions go to `adapters_dir/MODEL/vTIME/`.
    pub adapters_dir: PathBuf,
}

fn safe(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Lowers the calling thread's CPU priority; threads it starts inherit it.
fn lower_priority() {
    // SAFETY: setpriority takes plain integers; on Linux, PRIO_PROCESS with who = 0
    // names the calling thread. A failure only leaves the priority as it was.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
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
            // Since the newest version of this model (any status), else everything.
            let from = match since.get(&m.id) {
                Some(t) => *t,
                None => match l.adapters(Some(&m.id)).await {
                    Ok(vs) => vs.iter().map(|v| v.created_at_ms).max().unwrap_or(0),
                    Err(e) => {
                        eprintln!("brise: --learn: reading the registry: {e}");
                        continue;
                    }
                },
            };
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
            let started = brise_ledger::now_ms();
            eprintln!(
                "brise: --learn: {n} new feedback items for {}; training",
                m.id
            );
            let (model, id, l2, c) = (m.model.clone(), m.id.clone(), l.clone(), cfg.clone());
            let h = tokio::runtime::Handle::current();
            let res = tokio::task::spawn_blocking(move || {
                lower_priority();
                h.block_on(async {
                    let data = Dataset::from_ledger(
                        &l2,
                        &model,
                        &LedgerQuery {
                            model: Some(id.clone()),
                            since_ms: None,
                            method: c.method,
                            actor: "brise serve --learn".into(),
                        },
                        &LoadOptions::default(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    if data.examples.is_empty() {
                        return Err(format!("no usable examples ({})", data.source));
                    }
                    let opts = LearnOptions {
                        train: c.train.clone(),
                        gate: c.gate.clone(),
                        held_out_fraction: c.held_out,
                        threads: c.threads,
                        promote: true,
                        actor: "brise serve --learn".into(),
                        out_dir: c
                            .adapters_dir
                            .join(safe(&id))
                            .join(format!("v{}", brise_ledger::now_ms())),
                        checkpoint: None,
                    };
                    let mut last = 0u64;
                    learn(&l2, &model, &id, &data, opts, None, &mut |r| {
                        if r.step == r.total_steps || r.step >= last + 10 {
                            last = r.step;
                            eprintln!(
                                "brise: --learn: {id}: step {}/{}, loss {:.4}, {:.0} tokens/s",
                                r.step, r.total_steps, r.loss, r.tokens_per_s
                            );
                        }
                    })
                    .await
                })
            })
            .await;
            since.insert(m.id.clone(), started);
            match res {
                Ok(Ok(done)) => {
                    eprintln!(
                        "brise: --learn: {} version {}: {} ({})",
                        m.id,
                        done.version.id,
                        if done.promoted {
                            "promoted"
                        } else {
                            "not promoted"
                        },
                        done.outcome.report.summary
                    );
                    state.registry_changed.notify_one();
                }
                Ok(Err(e)) => eprintln!("brise: --learn: {}: {e}", m.id),
                Err(e) => eprintln!("brise: --learn: {}: the training task failed: {e}", m.id),
            }
        }
    }
}
