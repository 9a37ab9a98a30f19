//! Hot swap of promoted adapter versions: the server follows the ledger's registry.
//!
//! At start (before `/health` says ok) and then every `--adapter-poll` seconds, or at
//! once after a promotion or rollback through this server's admin routes, each served
//! model's promoted version is read from the registry. When it changed, the new
//! version's PEFT directory is loaded off the async runtime (`spawn_blocking`) and put
//! in `ServedModel::promoted` with one pointer swap; a rollback to the base model swaps
//! in `None`. Requests take that `Arc` once, when they arrive, so requests in flight
//! finish on the version they started with. A version that fails to load is logged and
//! retried every [`RETRY_FAILED`], and the version serving before stays in service: a
//! bad directory never takes the server down nor leaves a model without an answer.

use crate::{AppState, ServedAdapter, ServedModel};
use brise_ledger::Ledger;
use brise_ledger::adapters::AdapterVersion;
use brise_model::lora::LoraAdapter;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a version that failed to load waits before the next try.
pub const RETRY_FAILED: Duration = Duration::from_secs(30);

/// What the swaps remember between polls.
#[derive(Default)]
pub struct SyncState {
    /// Versions that failed to load, and when they last did.
    failed: HashMap<String, Instant>,
    /// Registry read errors already logged, per model (logged again once it recovers).
    read_failed: HashMap<String, String>,
}

fn serving(m: &ServedModel) -> String {
    m.promoted()
        .map(|a| a.name.clone())
        .unwrap_or_else(|| "the base model".into())
}

fn warn_tainted(m: &ServedModel, v: &AdapterVersion) {
    if let Some(t) = &v.tainted {
        eprintln!(
            "brise: WARNING: {} serves {} for its plain name, which was trained on erased data ({}): \
             roll it back (brise adapters rollback --model {}) or promote a clean version",
            m.id, v.id, t.reason, m.id
        );
    }
}

/// Loads a version's PEFT directory for `m` off the async runtime.
pub async fn load(m: &ServedModel, v: &AdapterVersion) -> Result<Arc<ServedAdapter>, String> {
    let model = m.model.clone();
    let path = PathBuf::from(&v.path);
    let lora = tokio::task::spawn_blocking(move || LoraAdapter::load(&path, &model.cfg))
        .await
        .map_err(|e| format!("the loading task failed: {e}"))?
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(ServedAdapter {
        name: v.id.clone(),
        lora: Arc::new(lora),
        version: Some(v.clone()),
        owner: None,
    }))
}

/// Puts `want` (the registry's promoted version of `m`, `None`: the base model) in
/// service if it is not already, with the weights of `preloaded` when that is the same
/// version. Returns an error message when it cannot be loaded (the version serving
/// before stays).
pub async fn install(
    m: &ServedModel,
    want: Option<&AdapterVersion>,
    st: &mut SyncState,
    preloaded: Option<&ServedAdapter>,
) -> Result<(), String> {
    let have = m.promoted();
    match (want, have) {
        (None, None) => Ok(()),
        (None, Some(h)) => {
            m.set_promoted(None);
            eprintln!(
                "brise: {}: {} retired; serving the base model",
                m.id, h.name
            );
            Ok(())
        }
        (Some(v), Some(h)) if h.name == v.id => {
            // The same version: refresh what the registry says of it (a taint, say),
            // keeping the loaded weights.
            if h.version.as_ref() != Some(v) {
                if v.tainted.is_some() && h.version.as_ref().is_some_and(|x| x.tainted.is_none()) {
                    warn_tainted(m, v);
                }
                m.set_promoted(Some(Arc::new(ServedAdapter {
                    name: h.name.clone(),
                    lora: h.lora.clone(),
                    version: Some(v.clone()),
                    owner: None,
                })));
            }
            Ok(())
        }
        (Some(v), _) => {
            if st
                .failed
                .get(&v.id)
                .is_some_and(|t| t.elapsed() < RETRY_FAILED)
            {
                return Err(format!("{} failed to load less than 30 s ago", v.id));
            }
            let loaded = match preloaded.filter(|p| p.name == v.id) {
                Some(p) => Ok(Arc::new(ServedAdapter {
                    name: v.id.clone(),
                    lora: p.lora.clone(),
                    version: Some(v.clone()),
                    owner: None,
                })),
                None => load(m, v).await,
            };
            match loaded {
                Ok(a) => {
                    st.failed.remove(&v.id);
                    let before = serving(m);
                    m.set_promoted(Some(a));
                    eprintln!(
                        "brise: {}: now serving {} (version {}, promoted by {}) instead of {before}",
                        m.id,
                        v.id,
                        v.version,
                        v.promoted_by.as_deref().unwrap_or("?")
                    );
                    warn_tainted(m, v);
                    Ok(())
                }
                Err(e) => {
                    st.failed.insert(v.id.clone(), Instant::now());
                    let msg = format!(
                        "cannot load promoted version {} from {}: {e}; still serving {}",
                        v.id,
                        v.path,
                        serving(m)
                    );
                    eprintln!("brise: {}: {msg}", m.id);
                    Err(msg)
                }
            }
        }
    }
}

/// Brings every model's promoted version in line with the registry.
pub async fn sync(models: &[ServedModel], l: &Ledger, st: &mut SyncState) {
    for m in models {
        let want = match l.current_adapter(&m.id).await {
            Ok(v) => {
                if st.read_failed.remove(&m.id).is_some() {
                    eprintln!("brise: {}: reading the adapter registry works again", m.id);
                }
                v
            }
            Err(e) => {
                let e = e.to_string();
                if st.read_failed.get(&m.id) != Some(&e) {
                    eprintln!(
                        "brise: {}: cannot read the adapter registry: {e}; still serving {}",
                        m.id,
                        serving(m)
                    );
                    st.read_failed.insert(m.id.clone(), e);
                }
                continue;
            }
        };
        let _ = install(m, want.as_ref(), st, None).await;
        // Versions served by id stop being served once trained on erased data.
        let loaded: Vec<String> = m
            .versions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|a| a.name.clone())
            .collect();
        for id in loaded {
            let drop = match l.adapter(&id).await {
                Ok(Some(v)) => v.tainted.is_some(),
                Ok(None) => true,
                Err(_) => false,
            };
            if drop {
                m.versions
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|a| a.name != id);
                eprintln!(
                    "brise: {}: {id} is no longer served by id: it was trained on erased data",
                    m.id
                );
            }
        }
    }
}

/// Follows the registry until the process ends: every `every`, or when woken.
pub async fn poll(state: Arc<AppState>, l: Ledger, every: Option<Duration>) {
    loop {
        match every {
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = state.registry_changed.notified() => {}
                }
            }
            None => state.registry_changed.notified().await,
        }
        let Some(models) = state.models.get() else {
            continue;
        };
        let mut st = state.registry_sync.lock().await;
        sync(models, &l, &mut st).await;
    }
}

/// Loads the registry version a request names by id (`MODEL:VERSION-ID`, or the
/// `adapter` field) when it is not loaded yet, so that candidates and fine-tuning jobs'
/// results are served before (or without) a promotion. Versions trained on erased data
/// are not served this way. Names that are no version are left for the usual "no such
/// model/adapter" errors.
pub async fn preload(
    s: &AppState,
    tenant: &str,
    model: &str,
    field: Option<&str>,
) -> Result<(), crate::error::ApiError> {
    let Some(l) = &s.ledger else {
        return Ok(());
    };
    // Another tenant's fine-tuned version is answered as an unknown model.
    let not_found = || {
        crate::error::ApiError::model_not_found(
            model,
            &s.models().iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        )
    };
    let (m, name) = match s.find(model) {
        Some(m) => match m.named_adapter(model, field) {
            Ok(Some(n)) => (m, n.to_string()),
            _ => return Ok(()),
        },
        None => {
            let Some((base, name)) = model.rsplit_once(':') else {
                return Ok(());
            };
            let Some(m) = s
                .models()
                .iter()
                .find(|m| m.id == base || m.aliases.iter().any(|a| a == base))
            else {
                return Ok(());
            };
            (m, name.to_string())
        }
    };
    if name == crate::BASE {
        return Ok(());
    }
    let known = |m: &crate::ServedModel| {
        m.adapter_named(&name).map(|a| match &a.owner {
            Some(o) if o != tenant => Err(not_found()),
            _ => Ok(()),
        })
    };
    if let Some(r) = known(m) {
        return r;
    }
    // One load at a time per model: a request that waited finds the version loaded.
    let mut loads = m.version_loads.lock().await;
    if let Some(r) = known(m) {
        return r;
    }
    if let Some((at, e)) = loads.get(&name)
        && at.elapsed() < RETRY_FAILED
    {
        // What failed (with the server's paths) is in the log, not in the answer.
        let _ = e;
        return Err(crate::error::ApiError::internal(format!(
            "cannot load version {name}: it failed {} s ago (the server's log says why); \
             it is retried 30 s after a failure",
            at.elapsed().as_secs()
        )));
    }
    let v = match l.adapter(&name).await {
        Ok(Some(v)) if v.model == m.id => v,
        Ok(_) => return Ok(()),
        Err(e) => {
            return Err(crate::error::ApiError::internal(format!(
                "reading the adapter registry: {e}"
            )));
        }
    };
    if let Some(t) = &v.tainted {
        return Err(crate::error::ApiError::param(
            "model",
            format!(
                "version {} was trained on erased data ({}) and is not served by id",
                v.id, t.reason
            ),
        ));
    }
    let owner = match l.job_for_version(&v.id).await {
        Ok(j) => j
            .map(|j| j.tenant)
            .filter(|t| t != brise_ledger::jobs::SYSTEM_TENANT),
        Err(e) => {
            return Err(crate::error::ApiError::internal(format!(
                "reading the fine-tuning jobs: {e}"
            )));
        }
    };
    if owner.as_ref().is_some_and(|o| o != tenant) {
        return Err(not_found());
    }
    let a = match load(m, &v).await {
        Ok(a) => {
            loads.remove(&name);
            a
        }
        Err(e) => {
            // The paths and the loader's message go to the log only: a tenant naming a
            // broken version learns nothing about the server's files.
            eprintln!("brise: cannot load version {} from {}: {e}", v.id, v.path);
            loads.insert(name.clone(), (Instant::now(), e));
            return Err(crate::error::ApiError::internal(format!(
                "cannot load version {}: it is registered but does not load (the server's \
                 log says why)",
                v.id
            )));
        }
    };
    m.keep_version(Arc::new(ServedAdapter {
        name: a.name.clone(),
        lora: a.lora.clone(),
        version: a.version.clone(),
        owner,
    }));
    Ok(())
}
