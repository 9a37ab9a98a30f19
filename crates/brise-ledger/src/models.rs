//! Which model file answered: every server records the models it serves (their id,
//! path, sha256 and known name), so that training and evaluation can find the file of
//! a model the ledger only knows by id.

use crate::{Ledger, LedgerError, Result, now_ms};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use std::io::Read;
use std::path::Path;

/// One (id, path) a server has served.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServedModelRow {
    pub id: String,
    pub path: String,
    pub sha256: Option<String>,
    pub known_name: Option<String>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(p: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(h.finalize()))
}

/// The sha256 of a model: of the file's bytes for a GGUF file; for a directory (a
/// Hugging Face model), of the lines `SHA256  NAME\n` of its regular files, sorted by
/// name (as `sha256sum` prints them), so a renamed or moved copy has the same value.
pub fn fingerprint(path: &Path) -> std::io::Result<String> {
    if !path.is_dir() {
        return sha256_file(path);
    }
    let mut files: Vec<_> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut h = Sha256::new();
    for name in files {
        let d = sha256_file(&path.join(&name))?;
        h.update(format!("{d}  {name}\n").as_bytes());
    }
    Ok(hex(h.finalize()))
}

fn row(r: sqlx::any::AnyRow) -> Result<ServedModelRow> {
    Ok(ServedModelRow {
        id: r.try_get("id")?,
        path: r.try_get("path")?,
        sha256: r.try_get("sha256")?,
        known_name: r.try_get("known_name")?,
        first_seen_ms: r.try_get("first_seen_ms")?,
        last_seen_ms: r.try_get("last_seen_ms")?,
    })
}

impl Ledger {
    /// Records that `id` is served from `path` (now), with its sha256 when known; a
    /// later call with the sha256 fills it in, one without keeps the one recorded.
    pub async fn record_served_model(
        &self,
        id: &str,
        path: &str,
        sha256: Option<&str>,
        known_name: Option<&str>,
    ) -> Result<()> {
        if id.is_empty() || path.is_empty() {
            return Err(LedgerError::Invalid(
                "a served model needs an id and a path".into(),
            ));
        }
        let now = now_ms();
        sqlx::query(
            "INSERT INTO served_models (id, path, sha256, known_name, first_seen_ms, last_seen_ms) \
             VALUES ($1, $2, $3, $4, $5, $5) \
             ON CONFLICT (id, path) DO UPDATE SET last_seen_ms = $5, \
             sha256 = COALESCE($3, served_models.sha256), \
             known_name = COALESCE($4, served_models.known_name)",
        )
        .bind(id)
        .bind(path)
        .bind(sha256)
        .bind(known_name)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every model served, the most recently seen first.
    pub async fn served_models(&self) -> Result<Vec<ServedModelRow>> {
        let rows = sqlx::query(
            "SELECT id, path, sha256, known_name, first_seen_ms, last_seen_ms FROM served_models \
             ORDER BY last_seen_ms DESC, id, path",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(row).collect()
    }
}
