//! brise's HTTP server: the OpenAI and Mistral APIs over the engine's continuous-batching
//! scheduler. Knows nothing of kernels: models arrive loaded.

mod console;
pub mod error;
pub mod jobs;
pub mod learn;
pub mod metrics;
mod ollama;
pub mod ratelimit;
mod record;
pub mod request;
mod routes;
pub mod versions;

use brise_engine::SamplingParams;
use brise_engine::scheduler::{Scheduler, SchedulerConfig};
use brise_model::Model;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
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
    /// Tokens generated for a request that sets no `max_tokens` (`brise serve
    /// --max-tokens`; at most the slot's context). Such requests also stop when their
    /// output loops ([`brise_engine::RepetitionStop`]). `None`: the rest of the context.
    pub max_tokens: Option<usize>,
    pub created: u64,
    pub metrics: metrics::ModelMetrics,
    /// sha256 of the model file, when known (recorded with each completion).
    pub sha256: Option<String>,
    /// `brise pull`'s name for the file, when it is a known model.
    pub known_name: Option<String>,
    /// LoRA adapters served on this model by name (`--lora NAME=DIR`): a request names
    /// one with `model` = `id:name` or the `adapter` field.
    pub adapters: Vec<Arc<ServedAdapter>>,
    /// The registry's promoted version (`None`: the base model), served for the plain
    /// model name and as `id:VERSION-ID`. Swapped whole by the registry poller
    /// (`versions.rs`); a request takes the `Arc` once, so requests in flight finish on
    /// the version they started with.
    pub promoted: RwLock<Option<Arc<ServedAdapter>>>,
    /// Other registry versions (candidates, retired ones, fine-tuning jobs' results),
    /// loaded when a request first names one by id; the newest [`VERSIONS_KEPT`] stay.
    pub versions: RwLock<Vec<Arc<ServedAdapter>>>,
    /// Serializes loading versions by id (concurrent first requests load once), and
    /// remembers the ones that failed, and when, so they are not retried on every request.
    pub version_loads:
        tokio::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, String)>>,
}

/// Registry versions besides the promoted one kept loaded per model.
pub const VERSIONS_KEPT: usize = 8;

/// A LoRA adapter offered on a model.
pub struct ServedAdapter {
    /// The name requests use: `--lora`'s NAME, or the registry version's id.
    pub name: String,
    pub lora: Arc<brise_model::lora::LoraAdapter>,
    /// The registry's record of it, for a promoted version (`None`: a `--lora` adapter).
    pub version: Option<brise_ledger::adapters::AdapterVersion>,
    /// The tenant whose fine-tuning job trained it: only that tenant is served it by id
    /// (`None`: everyone, as for `--lora` adapters and promoted versions).
    pub owner: Option<String>,
}

/// The name that addresses a model without any adapter (`MODEL:base`, `"adapter": "base"`).
pub const BASE: &str = "base";

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
            max_tokens: None,
            created: unix_now(),
            metrics: Default::default(),
            sha256: None,
            known_name: None,
            adapters: Vec::new(),
            promoted: RwLock::new(None),
            versions: RwLock::new(Vec::new()),
            version_loads: Default::default(),
        }
    }

    /// The promoted version now (`None`: the plain name serves the base model).
    pub fn promoted(&self) -> Option<Arc<ServedAdapter>> {
        self.promoted
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Swaps the promoted version: requests from now on get `a`; those in flight keep
    /// what they had.
    pub fn set_promoted(&self, a: Option<Arc<ServedAdapter>>) {
        *self.promoted.write().unwrap_or_else(|e| e.into_inner()) = a;
    }

    /// A `--lora` adapter by name, else a registry version by its id (the promoted
    /// one, or one loaded by [`versions::preload`]).
    pub fn adapter_named(&self, name: &str) -> Option<Arc<ServedAdapter>> {
        if let Some(a) = self.adapters.iter().find(|a| a.name == name) {
            return Some(a.clone());
        }
        if let Some(a) = self.promoted().filter(|a| a.name == name) {
            return Some(a);
        }
        self.versions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|a| a.name == name)
            .cloned()
    }

    /// Keeps a registry version loaded (the oldest one loaded goes past
    /// [`VERSIONS_KEPT`]; requests using it keep their `Arc`).
    pub fn keep_version(&self, a: Arc<ServedAdapter>) {
        let mut v = self.versions.write().unwrap_or_else(|e| e.into_inner());
        v.retain(|x| x.name != a.name);
        v.push(a);
        if v.len() > VERSIONS_KEPT {
            v.remove(0);
        }
    }

    /// Whether `name` addresses something on this model: `base` or an adapter.
    pub fn knows(&self, name: &str) -> bool {
        name == BASE || self.adapter_named(name).is_some()
    }

    /// The names a request may use, for error messages.
    pub fn adapter_names(&self) -> Vec<String> {
        let mut v = vec![BASE.to_string()];
        v.extend(self.adapters.iter().map(|a| a.name.clone()));
        v.extend(self.promoted().map(|a| a.name.clone()));
        v
    }

    /// The adapter name a request gives explicitly, in its `model` (`id:name`) or its
    /// `adapter` field (`base` included); `Err` when the two disagree.
    pub fn named_adapter<'a>(
        &self,
        model: &'a str,
        field: Option<&'a str>,
    ) -> Result<Option<&'a str>, String> {
        let by_model = if model == self.id || self.aliases.iter().any(|a| a == model) {
            None
        } else {
            model.rsplit_once(':').map(|(_, a)| a)
        };
        match (by_model, field) {
            (Some(a), Some(b)) if a != b => Err(format!(
                "model names adapter {a:?} but adapter is {b:?}: give one"
            )),
            (a, b) => Ok(a.or(b)),
        }
    }

    /// The adapter a request gets, resolved once per request: the one it names, none
    /// for `base`, and the promoted version (if any) when it names none. `Err` names
    /// the problem (an unknown adapter, or two that disagree).
    pub fn adapter_for(
        &self,
        model: &str,
        field: Option<&str>,
    ) -> Result<Option<Arc<ServedAdapter>>, String> {
        match self.named_adapter(model, field)? {
            None => Ok(self.promoted()),
            Some(BASE) => Ok(None),
            Some(name) => self.adapter_named(name).map(Some).ok_or_else(|| {
                format!(
                    "model {} has no adapter {name:?} (it has: {})",
                    self.id,
                    self.adapter_names().join(", ")
                )
            }),
        }
    }

    /// The name responses report: the model's id, with `:adapter` when one is used (so
    /// an answer for the plain name says which promoted version gave it).
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
    /// Connections open at once; more wait in the kernel's backlog until one closes.
    pub max_connections: usize,
    /// How long a connection may take to send a request's headers, and how long it may
    /// stay idle between requests, before it is closed.
    pub header_timeout: Duration,
    /// Requests per minute each tenant may make (`--rate-limit`); 0: no limit.
    pub rate_limit: u32,
    /// Prompt + completion tokens per minute each tenant may use
    /// (`--rate-limit-tokens`); 0: no limit.
    pub rate_limit_tokens: u32,
    /// The key of the admin routes (`/v1/admin/…`); `None` turns them off.
    pub admin_key: Option<String>,
    /// How often to look for a newly promoted adapter version in the ledger's registry
    /// (`None`: only at start and after a promotion through this server's API).
    pub adapter_poll: Option<Duration>,
    /// `--learn`: train by itself from new feedback (needs the ledger).
    pub learn: Option<learn::LearnConfig>,
    /// How training runs (fine-tuning jobs and `--learn`'s).
    pub train: jobs::TrainSetup,
}

pub struct AppState {
    pub cfg: ServerConfig,
    pub models: OnceLock<Vec<ServedModel>>,
    pub metrics: metrics::Metrics,
    pub rate_limiter: Arc<ratelimit::RateLimiter>,
    pub shutting_down: AtomicBool,
    pub ledger: Option<brise_ledger::Ledger>,
    /// Serializes the swaps of promoted versions (the poller's and the admin routes'),
    /// and remembers versions that failed to load (and when) so they are retried slowly.
    pub registry_sync: tokio::sync::Mutex<versions::SyncState>,
    /// Wakes the poller (after a promotion or rollback through this server).
    pub registry_changed: tokio::sync::Notify,
    /// Wakes the job runner (a job was queued).
    pub jobs_changed: tokio::sync::Notify,
}

impl AppState {
    pub fn models(&self) -> &[ServedModel] {
        self.models.get().map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// The model a request's `model` names: a model's id or alias, `id:adapter` for one
    /// of its adapters (or its promoted version), or `id:base`.
    pub fn find(&self, name: &str) -> Option<&ServedModel> {
        let by_name = |n: &str| {
            self.models()
                .iter()
                .find(|m| m.id == n || m.aliases.iter().any(|a| a == n))
        };
        by_name(name).or_else(|| {
            let (base, adapter) = name.rsplit_once(':')?;
            by_name(base).filter(|m| m.knows(adapter))
        })
    }
}

/// Records in the ledger which file each model is served from (so `brise train
/// --from-ledger` finds it), then, for files whose sha256 is not known yet, hashes them
/// in the background and records that too.
fn record_models(l: &brise_ledger::Ledger, models: &[ServedModel]) {
    let rt = tokio::runtime::Handle::current();
    let mut todo = Vec::new();
    for m in models {
        let path = std::fs::canonicalize(&m.model.path).unwrap_or_else(|_| m.model.path.clone());
        let p = path.display().to_string();
        let r = rt.block_on(l.record_served_model(
            &m.id,
            &p,
            m.sha256.as_deref(),
            m.known_name.as_deref(),
        ));
        if let Err(e) = r {
            eprintln!("brise: recording {} in the ledger: {e}", m.id);
        }
        if m.sha256.is_none() {
            todo.push((m.id.clone(), path, p));
        }
    }
    if todo.is_empty() {
        return;
    }
    let l = l.clone();
    rt.spawn(async move {
        for (id, path, p) in todo {
            let fp =
                tokio::task::spawn_blocking(move || brise_ledger::models::fingerprint(&path)).await;
            match fp {
                Ok(Ok(sha)) => {
                    if let Err(e) = l.record_served_model(&id, &p, Some(&sha), None).await {
                        eprintln!("brise: recording {id}'s sha256: {e}");
                    }
                }
                Ok(Err(e)) => eprintln!("brise: hashing {p}: {e}"),
                Err(e) => eprintln!("brise: hashing {p}: {e}"),
            }
        }
    });
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
        rate_limiter: Arc::new(ratelimit::RateLimiter::new(
            cfg.rate_limit,
            cfg.rate_limit_tokens,
        )),
        cfg,
        models: OnceLock::new(),
        metrics: Default::default(),
        shutting_down: AtomicBool::new(false),
        ledger,
        registry_sync: Default::default(),
        registry_changed: Default::default(),
        jobs_changed: Default::default(),
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
    if let Some(l) = state.ledger.clone() {
        tokio::spawn(versions::poll(state.clone(), l, state.cfg.adapter_poll));
    }
    let runner = state
        .ledger
        .clone()
        .map(|l| tokio::spawn(jobs::run(state.clone(), l, jobs::runner_id(addr))));
    if let (Some(l), Some(lc)) = (state.ledger.clone(), state.cfg.learn.clone()) {
        tokio::spawn(learn::run(state.clone(), l, lc));
    }
    eprintln!("brise: listening on http://{addr} (loading models)");

    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::channel::<anyhow::Error>(1);
    let st = state.clone();
    tokio::task::spawn_blocking(move || match load() {
        Ok(models) => {
            let names: Vec<String> = models.iter().map(|m| m.id.clone()).collect();
            if let Some(l) = &st.ledger {
                // The promoted versions are in service before the server says it is
                // ready, so the plain names never answer with a stale version.
                let rt = tokio::runtime::Handle::current();
                rt.block_on(async {
                    let mut g = st.registry_sync.lock().await;
                    versions::sync(&models, l, &mut g).await;
                });
            }
            if let Some(l) = &st.ledger {
                record_models(l, &models);
            }
            let _ = st.models.set(models);
            eprintln!(
                "brise: ready: {} at http://{addr}/v1; the web console is at http://{addr}/",
                names.join(", ")
            );
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
    let max_conns = fd_budget(state.cfg.max_connections);
    accept_loop(listener, app, max_conns, state.cfg.header_timeout, shutdown).await;
    // A job training now stops at its next step and records why (the shutdown deadline
    // above still applies).
    if let Some(r) = runner {
        state.jobs_changed.notify_one();
        let _ = r.await;
    }
    for m in state.models() {
        m.sched.shutdown();
    }
    eprintln!("brise: stopped");
    Ok(())
}

/// Connections the process can hold: raises the soft limit on open files to the hard
/// one, and keeps 256 descriptors for models, the ledger and adapters, so that a flood of
/// connections cannot take the descriptors the server needs (or stop `/health`).
fn fd_budget(want: usize) -> usize {
    const RESERVE: usize = 256;
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit struct through a valid, exclusive pointer.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                // SAFETY: setrlimit reads one rlimit struct through a valid pointer.
                if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                    lim.rlim_cur = lim.rlim_max;
                }
            }
            let room = (lim.rlim_cur as usize).saturating_sub(RESERVE).max(16);
            if want > room {
                eprintln!(
                    "brise: --max-connections {want} lowered to {room}: the limit on open \
                     files is {} (ulimit -n)",
                    lim.rlim_cur
                );
                return room;
            }
        }
    }
    want.max(1)
}

/// Accepts connections while fewer than `max_conns` are open, and serves each over
/// HTTP/1.1 with a header-read timeout (which also closes connections idle between
/// requests). On `shutdown`: stops accepting, closes idle connections, lets requests in
/// flight finish, and returns when every connection is closed.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    max_conns: usize,
    header_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_conns));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors (or a connection reset before it was accepted):
                    // wait a little rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = b.serve_connection(
                hyper_util::rt::TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(app),
            );
            let mut conn = std::pin::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    r = stop.wait_for(|s| *s), if !stopping => {
                        stopping = true;
                        if r.is_ok() {
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit until it closes.
    let _ = slots.acquire_many(max_conns as u32).await;
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
