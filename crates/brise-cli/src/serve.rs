//! `brise serve`: the OpenAI- and Mistral-compatible HTTP server.

use crate::registry;
use crate::run::{default_threads, kernels};
use anyhow::{Context, Result, bail};
use brise_engine::SamplingParams;
use brise_engine::scheduler::SchedulerConfig;
use brise_kernels::Isa;
use brise_model::Model;
use brise_model::lora::LoraAdapter;
use brise_server::{ApiKey, ServedModel, ServerConfig};
use clap::Args;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `--max-tokens`' default (see its help).
pub const DEFAULT_MAX_TOKENS: usize = 2048;

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  brise serve smollm2\n  brise serve smollm2 qwen2.5-coder --port 8080 --parallel 8\n  brise serve model.gguf --host 0.0.0.0 --api-key-file keys.txt\n\n\
Clients: any OpenAI or Mistral SDK with base URL http://HOST:PORT/v1 (Mistral: server_url http://HOST:PORT)."
)]
pub struct ServeArgs {
    /// Models to serve (.gguf files, model directories or names); requests pick one by `model`
    #[arg(default_value = registry::DEFAULT_MODEL, num_args = 1..)]
    pub models: Vec<String>,
    /// A LoRA adapter (a PEFT directory) to serve as NAME on the first model it fits;
    /// requests pick it with `model` = "MODEL:NAME" or `"adapter": "NAME"` (repeatable)
    #[arg(long = "lora", value_name = "NAME=DIR", value_parser = parse_lora)]
    pub lora: Vec<(String, PathBuf)>,
    /// Address to listen on (0.0.0.0 for every interface)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Threads per model (default: the number of CPU cores)
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Total context in tokens, shared by the --parallel slots as llama-server does
    /// [default: --parallel × min(4096, the model's training context)]
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// Sequences decoded together (KV-cache slots) per model
    #[arg(short = 'p', long = "parallel", default_value_t = 4)]
    pub parallel: usize,
    /// Prompt chunk in tokens (llama.cpp's batch; 512 keeps outputs identical to llama.cpp's)
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    pub batch_size: usize,
    /// Tokens generated for a request that sets no max_tokens, at most a slot's context
    /// (llama-server's -n). 2048 is a long answer (about 1500 words) that still ends
    /// within a few minutes on a CPU; such requests also stop when their output loops
    /// (docs/API.md). 0: the rest of the slot's context
    #[arg(short = 'n', long = "max-tokens", default_value_t = DEFAULT_MAX_TOKENS)]
    pub max_tokens: usize,
    /// Requests that may wait for a slot before the server answers 503
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// An API key clients must send as `Authorization: Bearer KEY` (repeatable). `TENANT=KEY`
    /// names the key's tenant; a plain KEY is tenant "default"
    #[arg(long = "api-key", env = "BRISE_API_KEY", hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (`TENANT=KEY` or `KEY`; # comments): keeps them
    /// off the command line, which every local user can read
    #[arg(long, env = "BRISE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Per-request time limit in seconds
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// After SIGTERM: seconds to let requests in flight finish
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Slots one tenant may hold at once (0: no limit). Whatever it is, a freed slot goes
    /// to the waiting request of the tenant holding the fewest slots
    #[arg(long, default_value_t = 0)]
    pub tenant_slots: usize,
    /// Requests per minute each tenant (all its API keys together) may make; more are
    /// answered 429 with Retry-After. A tenant may use a whole minute's worth at once,
    /// then gets one more every 60/N seconds. 0: no limit
    #[arg(long, value_name = "PER_MINUTE", default_value_t = 0)]
    pub rate_limit: u32,
    /// Prompt + completion tokens each tenant (API key's tenant) may use per minute;
    /// charged when an answer ends, so a long answer may take a tenant below zero, and
    /// its next requests get 429 with Retry-After until the allowance refills. 0: no limit
    #[arg(long, value_name = "PER_MINUTE", default_value_t = 0)]
    pub rate_limit_tokens: u32,
    /// Connections open at once (more wait until one closes); lowered to what the
    /// limit on open files allows
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers, and may stay idle
    /// between requests, before it is closed
    #[arg(long, default_value_t = 30.0)]
    pub header_timeout: f64,
    /// Largest request body in bytes
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body: usize,
    /// Restrict kernels to a CPU level: scalar, avx2, avx512-vnni
    #[arg(long)]
    pub cpu: Option<Isa>,
    /// Where to record every completion and its feedback: a SQLite file, a PostgreSQL
    /// URL (postgres://user:password@host:port/db, created if missing; for several
    /// replicas sharing one ledger), or `off` [default: $BRISE_HOME/ledger.sqlite]
    #[arg(long, env = "BRISE_LEDGER")]
    pub ledger: Option<String>,
    /// The key of the admin routes (erasure, objections, subject export, audit log,
    /// adapter registry); without it they answer 403
    #[arg(long, env = "BRISE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// A file holding the admin key (its first line): keeps the key off the command
    /// line, which every local user can read
    #[arg(long, env = "BRISE_ADMIN_KEY_FILE", value_name = "FILE")]
    pub admin_key_file: Option<PathBuf>,
    /// Seconds between looks at the ledger's adapter registry: when a model's promoted
    /// version changes (`brise adapters promote|rollback`, or another server's admin
    /// API), it is loaded and swapped in for the model's plain name; requests in flight
    /// finish on their version. 0: only at start and after promotions through this
    /// server's own admin API
    #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
    pub adapter_poll: f64,
    /// Learn by itself: once --learn-after new feedback items have arrived for a model,
    /// train an adapter from the ledger in the background (at a lower CPU priority),
    /// evaluate it on held-out feedback, and promote it when the gate passes
    #[arg(long)]
    pub learn: bool,
    /// With --learn: new feedback items that start a training run
    #[arg(long, default_value_t = 50)]
    pub learn_after: i64,
    /// With --learn: seconds between looks at the ledger for new feedback
    #[arg(long, default_value_t = 10.0)]
    pub learn_check: f64,
    /// With --learn: sft, dpo, kto, or auto (DPO when users chose between two answers,
    /// else SFT when there are corrections, else KTO when there are thumbs-down, else
    /// SFT)
    #[arg(long, default_value = "auto")]
    pub learn_method: String,
    /// The learning rate of --learn's runs, and of fine-tuning jobs that give none
    /// (OpenAI's learning_rate_multiplier multiplies it) [default: 3e-4]
    #[arg(long)]
    pub learn_lr: Option<f64>,
    /// Epochs over the dataset (--learn, and jobs' default n_epochs) [default: fitted
    /// to the data: about 32 optimizer steps, 2 to 8 epochs]
    #[arg(long)]
    pub learn_epochs: Option<usize>,
    /// Examples per optimizer step (--learn, and jobs' default batch_size) [default:
    /// fitted to the data: an eighth of the examples, 2 to 8]
    #[arg(long)]
    pub learn_batch_size: Option<usize>,
    /// LoRA rank, alpha twice it (--learn, and jobs' default lora_rank)
    #[arg(long, default_value_t = 16)]
    pub learn_rank: usize,
    /// Threads training uses (--learn and fine-tuning jobs, one run at a time); the
    /// default leaves the rest to serving
    #[arg(long, default_value_t = 1)]
    pub learn_threads: usize,
    /// Where trained versions are written (--learn and fine-tuning jobs)
    /// [default: $BRISE_HOME/adapters]
    #[arg(long)]
    pub learn_dir: Option<std::path::PathBuf>,
}

fn train_setup(a: &ServeArgs) -> Result<brise_server::jobs::TrainSetup> {
    let mut defaults = brise_train::trainer::TrainConfig {
        rank: a.learn_rank,
        alpha: 2.0 * a.learn_rank as f64,
        ..brise_train::trainer::TrainConfig::fitted()
    };
    if let Some(lr) = a.learn_lr {
        defaults.learning_rate = lr;
        defaults.set_explicit("learning_rate");
    }
    if let Some(e) = a.learn_epochs {
        defaults.epochs = e;
        defaults.set_explicit("epochs");
    }
    if let Some(b) = a.learn_batch_size {
        defaults.batch_size = b;
        defaults.set_explicit("batch_size");
    }
    defaults.validate().map_err(anyhow::Error::msg)?;
    Ok(brise_server::jobs::TrainSetup {
        threads: a.learn_threads.max(1),
        adapters_dir: a
            .learn_dir
            .clone()
            .unwrap_or_else(|| registry::brise_home().join("adapters")),
        gate: Default::default(),
        held_out: brise_train::data::DEFAULT_HELD_OUT,
        defaults,
    })
}

fn learn_config(a: &ServeArgs) -> Result<Option<brise_server::learn::LearnConfig>> {
    if !a.learn {
        return Ok(None);
    }
    if ledger_spec(a.ledger.as_deref()).is_none() {
        bail!("--learn learns from the ledger: it cannot run with --ledger off");
    }
    if a.learn_after < 1 || !(a.learn_check.is_finite() && a.learn_check > 0.0) {
        bail!("--learn-after must be at least 1 and --learn-check positive");
    }
    let method = match a.learn_method.as_str() {
        "auto" => None,
        m => Some(
            m.parse::<brise_train::data::Method>()
                .map_err(anyhow::Error::msg)?,
        ),
    };
    Ok(Some(brise_server::learn::LearnConfig {
        after: a.learn_after,
        check_every: Duration::from_secs_f64(a.learn_check),
        method,
        train: train_setup(a)?.defaults,
    }))
}

/// `--ledger`: a SQLite path, a PostgreSQL URL, `off`, or the default under $BRISE_HOME.
fn header_timeout(secs: f64) -> Result<Duration> {
    if !(secs.is_finite() && secs > 0.0 && secs <= 3600.0) {
        bail!("--header-timeout must be more than 0 and at most 3600 seconds, not {secs}");
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn ledger_spec(arg: Option<&str>) -> Option<String> {
    match arg {
        Some("off") => None,
        Some(p) if brise_ledger::is_postgres_url(p) => Some(p.to_string()),
        Some(p) => Some(p.strip_prefix("sqlite://").unwrap_or(p).to_string()),
        None => Some(
            registry::brise_home()
                .join("ledger.sqlite")
                .display()
                .to_string(),
        ),
    }
}

/// `--lora NAME=DIR`.
fn parse_lora(s: &str) -> std::result::Result<(String, PathBuf), String> {
    let (name, dir) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: give NAME=DIR"))?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(format!(
            "adapter name {name:?}: use letters, digits, '_', '.' or '-'"
        ));
    }
    if name == brise_server::BASE {
        return Err(format!(
            "adapter name {name:?} is reserved: MODEL:{name} is the model without an adapter"
        ));
    }
    if dir.is_empty() {
        return Err(format!("{s:?}: the directory is empty"));
    }
    Ok((name.to_string(), PathBuf::from(dir)))
}

/// `--admin-key`, `--admin-key-file` (or their environment variables): one of them.
fn admin_key(a: &ServeArgs) -> Result<Option<String>> {
    let from_arg = a.admin_key.clone().filter(|k| !k.is_empty());
    let Some(f) = &a.admin_key_file else {
        return Ok(from_arg);
    };
    if from_arg.is_some() {
        bail!(
            "both --admin-key (or BRISE_ADMIN_KEY) and --admin-key-file (or BRISE_ADMIN_KEY_FILE) \
             are set: give one"
        );
    }
    let text = std::fs::read_to_string(f)
        .with_context(|| format!("reading the admin key file {}", f.display()))?;
    match text.lines().next().map(str::trim) {
        Some(k) if !k.is_empty() => Ok(Some(k.to_string())),
        _ => bail!("the admin key file {} is empty", f.display()),
    }
}

fn parse_key(s: &str) -> Result<ApiKey> {
    let s = s.trim();
    if s.is_empty() {
        bail!("an API key is empty");
    }
    if let Some((tenant, key)) = s.split_once('=')
        && !tenant.is_empty()
        && !key.is_empty()
        && !key.starts_with('=')
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Ok(ApiKey {
            key: key.to_string(),
            tenant: tenant.to_string(),
        });
    }
    Ok(ApiKey {
        key: s.to_string(),
        tenant: "default".into(),
    })
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let mut keys: Vec<ApiKey> = a
        .api_keys
        .iter()
        .map(|k| parse_key(k))
        .collect::<Result<_>>()?;
    if let Some(f) = &a.api_key_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading the API key file {}", f.display()))?;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            keys.push(parse_key(line)?);
        }
        if keys.is_empty() {
            bail!("{} holds no API key", f.display());
        }
    }
    let admin_key = admin_key(&a)?;
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    if !a.adapter_poll.is_finite() || !(0.0..=86_400.0).contains(&a.adapter_poll) {
        bail!("--adapter-poll must be between 0 and 86400 seconds");
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    // Resolve (and pull) before binding, so a typo fails at once.
    let mut paths = Vec::new();
    for m in &a.models {
        let r = registry::resolve(m)?;
        let (id, aliases) = registry::model_id(m, &r);
        paths.push((id, aliases, registry::ensure_local(r)?));
    }
    let kern = kernels(a.cpu)?;
    let threads = a.threads.unwrap_or_else(default_threads).max(1);
    let cfg = ServerConfig {
        addr: SocketAddr::new(a.host, a.port),
        api_keys: keys,
        max_body_bytes: a.max_body,
        request_timeout: Duration::from_secs(a.timeout.max(1)),
        shutdown_timeout: Duration::from_secs(a.shutdown_timeout),
        max_connections: a.max_connections,
        rate_limit: a.rate_limit,
        rate_limit_tokens: a.rate_limit_tokens,
        header_timeout: header_timeout(a.header_timeout)?,
        ledger: ledger_spec(a.ledger.as_deref()),
        admin_key,
        adapter_poll: (a.adapter_poll > 0.0).then(|| Duration::from_secs_f64(a.adapter_poll)),
        learn: learn_config(&a)?,
        train: train_setup(&a)?,
    };
    let (parallel, ctx, nb, queue) = (a.parallel, a.ctx_size, a.batch_size, a.queue);
    let max_tokens = a.max_tokens;
    let tenant_slots = a.tenant_slots;
    let loras = a.lora.clone();
    let load = move || -> Result<Vec<ServedModel>> {
        let mut out = Vec::new();
        for (id, aliases, path) in paths {
            let t0 = std::time::Instant::now();
            let model =
                Model::load(&path, kern).with_context(|| format!("loading {}", path.display()))?;
            let per_slot = match ctx {
                Some(c) => c / parallel,
                None => model.cfg.n_ctx_train.min(4096),
            };
            if per_slot == 0 {
                bail!(
                    "--ctx-size {} is too small for --parallel {parallel}",
                    ctx.unwrap_or(0)
                );
            }
            let known = registry::known_by_path(&path);
            let rec = known.map(|m| m.recommended).unwrap_or_default();
            let base = SamplingParams::default();
            let defaults = SamplingParams {
                temperature: rec.temperature.unwrap_or(base.temperature),
                top_k: rec.top_k.unwrap_or(base.top_k),
                top_p: rec.top_p.unwrap_or(base.top_p),
                repeat_penalty: rec.repeat_penalty.unwrap_or(base.repeat_penalty),
                ..base
            };
            eprintln!(
                "brise: loaded {id} ({}, {} ISA) in {:.0} ms: {parallel} slots of {per_slot} tokens, {threads} threads",
                model.cfg.arch.name(),
                model.kern.isa(),
                t0.elapsed().as_secs_f64() * 1e3
            );
            let sched = SchedulerConfig {
                n_threads: threads,
                n_slots: parallel,
                n_ctx_slot: per_slot,
                n_batch: nb,
                queue_capacity: queue,
                tenant_slots,
            };
            let mut sm = ServedModel::new(id, aliases, Arc::new(model), sched, defaults);
            sm.max_tokens = (max_tokens > 0).then(|| max_tokens.min(per_slot));
            // Known models were verified by sha256 when pulled.
            sm.sha256 = known.map(|m| m.sha256.to_string());
            sm.known_name = known.map(|m| m.name.to_string());
            out.push(sm);
        }
        for (name, dir) in &loras {
            if out
                .iter()
                .any(|m| m.adapters.iter().any(|a| &a.name == name))
            {
                bail!("--lora {name}: two adapters have that name");
            }
            let mut errors = Vec::new();
            let mut placed = false;
            for m in out.iter_mut() {
                match LoraAdapter::load(dir, &m.model.cfg) {
                    Ok(ad) => {
                        eprintln!(
                            "brise: adapter {name} ({}, rank {}) on {}: model \"{}:{name}\"",
                            dir.display(),
                            ad.rank(),
                            m.id,
                            m.id
                        );
                        m.adapters.push(Arc::new(brise_server::ServedAdapter {
                            owner: None,
                            name: name.clone(),
                            lora: Arc::new(ad),
                            version: None,
                        }));
                        placed = true;
                        break;
                    }
                    Err(e) => errors.push(format!("{}: {e}", m.id)),
                }
            }
            if !placed {
                bail!(
                    "--lora {name}={}: fits none of the models ({})",
                    dir.display(),
                    errors.join("; ")
                );
            }
        }
        Ok(out)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(brise_server::serve(cfg, load))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_tenants() {
        let k = parse_key("acme=sk-123").unwrap();
        assert_eq!((k.tenant.as_str(), k.key.as_str()), ("acme", "sk-123"));
        let k = parse_key("sk-abc==").unwrap();
        assert_eq!((k.tenant.as_str(), k.key.as_str()), ("default", "sk-abc=="));
        assert!(parse_key("  ").is_err());
    }
}
