//! brise's HTTP server: the OpenAI and Mistral APIs over the engine's continuous-batching
//! scheduler. Knows nothing of kernels: models arrive loaded.

mod console;
pub mod error;
pub mod metrics;
mod record;
pub mod request;
mod routes;

use brise_engine::SamplingParams;
use brise_engine::scheduler::{Scheduler, SchedulerConfig};
use brise_model::Model;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A model as the server offers it.
pub struct ServedModel {
    /// The name clients put in `model`.
    pub id: String,
    /// Other names accepted for it.
    pub aliases: Vec<String>,
    pub model: Arc<Model>,
    pub sched: Scheduler,
    /// Sampling defaults for parameters a request leaves out (the model authors'
    /// recommendations, else llama.cpp's).
    pub defaults: SamplingParams,
    pub created: u64,
    pub metrics: metrics::ModelMetrics,
    /// sha256 of the model file, when known (recorded with each completion).
    pub sha256: Option<String>,
    /// LoRA adapters served on this model: a request names one with `model` =
    /// `id:name` or the `adapter` field.
    pub adapters: Vec<ServedAdapter>,
}

/// A LoRA adapter offered on a model.
pub struct ServedAdapter {
    pub name: String,
    pub lora: Arc<brise_model::lora::LoraAdapter>,
}

impl ServedModel {
    pub fn new(
        id: String,
        aliases: Vec<String>,
        model: Arc<Model>,
        sched_cfg: SchedulerConfig,
        defaults: SamplingParams,
    ) -> ServedModel {
        let sched = Scheduler::start(model.clone(), sched_cfg);
        ServedModel {
            id,
            aliases,
            model,
            sched,
            defaults,
            created: unix_now(),
            metrics: Default::default(),
            sha256: None,
            adapters: Vec::new(),
        }
    }

    /// The adapter a request asks for, from its `model` (`id:name`) and `adapter`
    /// fields; `Err` names the problem (an unknown adapter, or two that disagree).
    pub fn adapter_for(
        &self,
        model: &str,
        field: Option<&str>,
    ) -> Result<Option<&ServedAdapter>, String> {
        let by_model = if model == self.id || self.aliases.iter().any(|a| a == model) {
            None
        } else {
            model.rsplit_once(':').map(|(_, a)| a)
        };
        let name = match (by_model, field) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "model names adapter {a:?} but adapter is {b:?}: give one"
                ));
            }
            (a, b) => a.or(b),
        };
        let Some(name) = name else { return Ok(None) };
        match self.adapters.iter().find(|a| a.name == name) {
            Some(a) => Ok(Some(a)),
            None => Err(format!(
                "model {} has no adapter {name:?} (it has: {})",
                self.id,
                if self.adapters.is_empty() {
                    "none".to_string()
                } else {
                    self.adapters
                        .iter()
                        .map(|a| a.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )),
        }
    }

    /// The name responses report: the model's id, with `:adapter` when one is used.
    pub fn served_name(&self, adapter: Option<&ServedAdapter>) -> String {
        match adapter {
            Some(a) => format!("{}:{}", self.id, a.name),
            None => self.id.clone(),
        }
    }

    pub fn n_ctx(&self) -> usize {
        self.sched.config().n_ctx_slot
    }
}

/// The tenant of a request: the one its API key names ("default" without keys). Set on
/// every authenticated request's extensions, for the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant(pub String);

/// An API key and the tenant it names.
#[derive(Clone, Debug)]
pub struct ApiKey {
    pub key: String,
    pub tenant: String,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub api_keys: Vec<ApiKey>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// After SIGTERM/SIGINT: how long requests in flight may take to finish.
    pub shutdown_timeout: Duration,
    /// The ledger: a SQLite path or a `postgres://` URL; `None` records nothing.
    pub ledger: Option<String>,
    /// The key of the admin routes (`/v1/admin/…`); `None` turns them off.
    pub admin_key: Option<String>,
}

pub struct AppState {
    pub cfg: ServerConfig,
    pub models: OnceLock<Vec<ServedModel>>,
    pub metrics: metrics::Metrics,
    pub shutting_down: AtomicBool,
    pub ledger: Option<brise_ledger::Ledger>,
}

impl AppState {
    pub fn models(&self) -> &[ServedModel] {
        self.models.get().map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// The model a request's `model` names: a model's id or alias, or `id:adapter` for
    /// one of its adapters.
    pub fn find(&self, name: &str) -> Option<&ServedModel> {
        let by_name = |n: &str| {
            self.models()
                .iter()
                .find(|m| m.id == n || m.aliases.iter().any(|a| a == n))
        };
        by_name(name).or_else(|| {
            let (base, adapter) = name.rsplit_once(':')?;
            by_name(base).filter(|m| m.adapters.iter().any(|a| a.name == adapter))
        })
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Binds, then loads the models with `load` (answering `/health` with 503 meanwhile),
/// serves until SIGTERM or SIGINT, lets requests in flight finish (up to the shutdown
/// timeout), and stops the engines.
pub async fn serve<F>(cfg: ServerConfig, load: F) -> anyhow::Result<()>
where
    F: FnOnce() -> anyhow::Result<Vec<ServedModel>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.addr))?;
    let addr = listener.local_addr()?;
    let ledger = match &cfg.ledger {
        Some(p) => Some(brise_ledger::Ledger::open(p).await.map_err(|e| {
            anyhow::anyhow!("opening the ledger {}: {e}", brise_ledger::redact_url(p))
        })?),
        None => None,
    };
    if let Some(p) = &cfg.ledger {
        eprintln!("brise: recording to {}", brise_ledger::redact_url(p));
    }
    let state = Arc::new(AppState {
        cfg,
        models: OnceLock::new(),
        metrics: Default::default(),
        shutting_down: AtomicBool::new(false),
        ledger,
    });
    let app = routes::router(state.clone());
    if let Some(l) = state.ledger.clone() {
        // Retention: purge what is past its window now, then every ten minutes.
        tokio::spawn(async move {
            loop {
                match l.purge("retention", brise_ledger::now_ms()).await {
                    Ok(r) if r.completions + r.feedback > 0 => eprintln!(
                        "brise: retention purged {} records and {} feedback items",
                        r.completions, r.feedback
                    ),
                    Ok(_) => {}
                    Err(e) => eprintln!("brise: retention purge failed: {e}"),
                }
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
        });
    }
    eprintln!("brise: listening on http://{addr} (loading models)");

    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::channel::<anyhow::Error>(1);
    let st = state.clone();
    tokio::task::spawn_blocking(move || match load() {
        Ok(models) => {
            let names: Vec<String> = models.iter().map(|m| m.id.clone()).collect();
            let _ = st.models.set(models);
            eprintln!("brise: ready: {} at http://{addr}/v1", names.join(", "));
        }
        Err(e) => {
            let _ = fail_tx.blocking_send(e);
        }
    });

    let st = state.clone();
    let shutdown = async move {
        tokio::select! {
            _ = signal() => {}
            Some(e) = fail_rx.recv() => {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        }
        st.shutting_down.store(true, Ordering::SeqCst);
        eprintln!(
            "brise: shutting down: finishing requests in flight (up to {} s)",
            st.cfg.shutdown_timeout.as_secs()
        );
        let deadline = st.cfg.shutdown_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            eprintln!("brise: shutdown deadline passed; exiting with requests unfinished");
            std::process::exit(2);
        });
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    for m in state.models() {
        m.sched.shutdown();
    }
    eprintln!("brise: stopped");
    Ok(())
}

async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
