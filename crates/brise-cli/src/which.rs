//! Which model a ledger's feedback belongs to, and where its file is: `brise train`
//! and `brise eval` take a model as a known name, a path, the id completions were
//! recorded under, or an adapter version id, and find the others through the ledger's
//! record of what each server served (`served_models`).

use crate::registry;
use anyhow::{Result, bail};
use brise_ledger::Ledger;
use brise_ledger::models::ServedModelRow;
use std::path::{Path, PathBuf};

/// A model as the ledger knows it.
#[derive(Clone, Debug)]
pub struct LedgerModel {
    /// The id its completions (and adapter versions) are recorded under.
    pub id: String,
    /// Its file or directory here (pulled first when it is a known model).
    pub path: PathBuf,
}

fn canonical(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

fn moved(id: &str, rows: &[&ServedModelRow]) -> anyhow::Error {
    let was: Vec<String> = rows
        .iter()
        .map(|r| match &r.sha256 {
            Some(s) => format!("{} (sha256 {})", r.path, &s[..s.len().min(12)]),
            None => r.path.clone(),
        })
        .collect();
    anyhow::anyhow!(
        "model {id:?} was served from {}, which is not there any more: pass --model with the file's new path (it is recognised by its sha256)",
        was.join(", ")
    )
}

/// The model a ledger id names: its recorded file, else a known model of that name.
pub fn by_id(rt: &tokio::runtime::Runtime, l: &Ledger, id: &str) -> Result<LedgerModel> {
    let served = rt.block_on(l.served_models())?;
    let rows: Vec<&ServedModelRow> = served.iter().filter(|r| r.id == id).collect();
    if let Some(r) = rows.iter().find(|r| Path::new(&r.path).exists()) {
        return Ok(LedgerModel {
            id: id.to_string(),
            path: PathBuf::from(&r.path),
        });
    }
    if !rows.is_empty() {
        // Served from a file that is gone: the same model pulled here will do (the same
        // bytes), but nothing is fetched behind the user's back.
        let local = rows
            .iter()
            .find_map(|r| r.known_name.as_deref())
            .and_then(registry::find_known)
            .map(|k| registry::models_dir().join(k.file))
            .filter(|p| p.exists());
        return match local {
            Some(path) => Ok(LedgerModel {
                id: id.to_string(),
                path,
            }),
            None => Err(moved(id, &rows)),
        };
    }
    if let Some(k) = registry::find_known(id) {
        let path = registry::ensure_local(registry::Resolved::Known(
            k,
            registry::models_dir().join(k.file),
        ))?;
        return Ok(LedgerModel {
            id: id.to_string(),
            path,
        });
    }
    bail!(
        "no model {id:?}: not a file or directory, not a known name, and no server recorded it in this ledger; `brise ledger stats` lists the models with completions"
    )
}

/// What `arg` (a known name, a path, a recorded id, or an adapter version id) names,
/// with the id its feedback is under in `ledger` when there is one.
pub fn find(
    rt: &tokio::runtime::Runtime,
    ledger: Option<&Ledger>,
    arg: &str,
) -> Result<LedgerModel> {
    let resolved = registry::resolve(arg);
    let Some(l) = ledger else {
        let r = resolved?;
        let (id, _) = registry::model_id(arg, &r);
        return Ok(LedgerModel {
            id,
            path: registry::ensure_local(r)?,
        });
    };
    let r = match resolved {
        Ok(r) => r,
        Err(e) => {
            // A version id names its model.
            if let Ok(Some(v)) = rt.block_on(l.adapter(arg)) {
                return by_id(rt, l, &v.model);
            }
            return by_id(rt, l, arg).map_err(|e2| {
                if e2.to_string().contains("not there any more") {
                    e2
                } else {
                    e
                }
            });
        }
    };
    let (default_id, _) = registry::model_id(arg, &r);
    let path = registry::ensure_local(r)?;
    let here = canonical(&path);
    let served = rt.block_on(l.served_models())?;
    let mut ids: Vec<&str> = served
        .iter()
        .filter(|r| r.path == here)
        .map(|r| r.id.as_str())
        .collect();
    if ids.is_empty() && served.iter().any(|r| r.sha256.is_some()) {
        // Moved or copied since it was served: the same bytes.
        let sha = brise_ledger::models::fingerprint(&path)?;
        ids = served
            .iter()
            .filter(|r| r.sha256.as_deref() == Some(sha.as_str()))
            .map(|r| r.id.as_str())
            .collect();
    }
    ids.sort();
    ids.dedup();
    let id = match ids.len() {
        0 => default_id.clone(),
        1 => ids[0].to_string(),
        _ => {
            // Served under several ids: the one with the most feedback.
            let counts = rt.block_on(l.feedback_counts(0))?;
            let n = |id: &str| counts.iter().find(|(m, _)| m == id).map_or(0, |c| c.1);
            ids.iter()
                .max_by_key(|i| (n(i), std::cmp::Reverse(**i)))
                .expect("two or more")
                .to_string()
        }
    };
    if id != default_id {
        eprintln!("{arg}: served and recorded in the ledger as {id:?}");
    }
    Ok(LedgerModel { id, path })
}
