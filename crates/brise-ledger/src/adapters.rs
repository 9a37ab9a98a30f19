//! The registry of adapter versions: every LoRA adapter trained for (or brought to) a
//! served model, with its lineage, and which one the model serves.
//!
//! - **A version** is immutable once registered: its PEFT directory, the version that
//!   was serving when it was trained (`parent`; `None`: the base model), the method,
//!   hyperparameters, dataset hash, the completion records and feedback items it was
//!   trained on (kept one id per row in `adapter_training_data`, so erasure finds the
//!   versions by a join), and its eval report. Ids are readable: `smollm2-135m-v3` is
//!   the third version of `smollm2:135m`.
//! - **Status**: `candidate` when registered; `promoted` (served for the model's plain
//!   name; at most one per model, enforced by a unique index); `retired` (was promoted,
//!   then replaced or rolled back; may be promoted again); `rejected` (by the eval gate
//!   or an operator; never promoted).
//! - **Promotion history**: `promote` pushes a version on the model's history, and
//!   `rollback` pops the current one and re-promotes the version that served before it
//!   (skipping versions rejected or tainted since), or goes back to the base model when
//!   there is none. So `promote v1, promote v2, promote v3, rollback, rollback` serves
//!   v1; one more rollback serves the base. Every promotion and rollback is in the
//!   hash-chained audit log.
//! - **Erasure** marks every version trained on an erased record or feedback item as
//!   `tainted` (with when and why; the receipt lists them). A tainted version cannot be
//!   promoted. A tainted version that is serving keeps serving (the server and `brise
//!   erase` say so loudly): switching by itself could put an older version, or the base,
//!   in front of users without anyone deciding it; the operator rolls back or promotes a
//!   clean version. A version registered with ids no longer in the ledger is tainted at
//!   once, for the same reason.
//!
//! The queries are portable SQL, as in the rest of the ledger.

use crate::{Ledger, LedgerError, Result, int_value, now_ms, parse_json};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Row;
use std::collections::BTreeSet;

/// How a version was trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainMethod {
    Sft,
    Dpo,
    Kto,
    /// Trained elsewhere by a method brise does not name.
    Other,
}

impl TrainMethod {
    pub fn name(self) -> &'static str {
        match self {
            TrainMethod::Sft => "sft",
            TrainMethod::Dpo => "dpo",
            TrainMethod::Kto => "kto",
            TrainMethod::Other => "other",
        }
    }
}

impl std::str::FromStr for TrainMethod {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sft" => Ok(TrainMethod::Sft),
            "dpo" => Ok(TrainMethod::Dpo),
            "kto" => Ok(TrainMethod::Kto),
            "other" => Ok(TrainMethod::Other),
            _ => Err(format!("{s:?}: one of sft, dpo, kto, other")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterStatus {
    Candidate,
    Promoted,
    Retired,
    Rejected,
}

impl AdapterStatus {
    pub fn name(self) -> &'static str {
        match self {
            AdapterStatus::Candidate => "candidate",
            AdapterStatus::Promoted => "promoted",
            AdapterStatus::Retired => "retired",
            AdapterStatus::Rejected => "rejected",
        }
    }

    fn parse(s: &str) -> Result<AdapterStatus> {
        Ok(match s {
            "candidate" => AdapterStatus::Candidate,
            "promoted" => AdapterStatus::Promoted,
            "retired" => AdapterStatus::Retired,
            "rejected" => AdapterStatus::Rejected,
            _ => {
                return Err(LedgerError::Invalid(format!(
                    "unknown adapter status {s:?}"
                )));
            }
        })
    }
}

/// What a trainer (or `brise adapters register`) knows of a new version.
#[derive(Clone, Debug, PartialEq)]
pub struct NewAdapterVersion {
    /// The served model's id (`smollm2:135m`).
    pub model: String,
    /// The PEFT directory (`adapter_config.json`, `adapter_model.safetensors`); kept as
    /// given, so give an absolute path.
    pub path: String,
    /// The version serving when it was trained (`None`: the base model). Must be a
    /// version of the same model.
    pub parent: Option<String>,
    pub created_by: String,
    pub method: TrainMethod,
    /// Hyperparameters, as JSON.
    pub config: Value,
    /// sha256 (64 hex digits) of the dataset snapshot it was trained on.
    pub dataset_sha256: Option<String>,
    /// Completion ids and feedback ids of the training data (duplicates are ignored).
    pub record_ids: Vec<String>,
    pub feedback_ids: Vec<String>,
    /// The eval gate's report, if evaluated before registering (else
    /// [`Ledger::set_eval_report`]).
    pub eval_report: Option<Value>,
}

/// Erased data in a version's training set.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Taint {
    pub at_ms: i64,
    pub reason: String,
}

/// A registered version.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AdapterVersion {
    pub id: String,
    pub model: String,
    /// 1, 2, … per model.
    pub version: i64,
    pub path: String,
    pub parent: Option<String>,
    pub created_at_ms: i64,
    pub created_by: String,
    pub method: TrainMethod,
    pub config: Value,
    pub dataset_sha256: Option<String>,
    /// How many completion records and feedback items it was trained on
    /// ([`Ledger::adapter_training_data`] lists them).
    pub records: i64,
    pub feedback: i64,
    pub eval_report: Option<Value>,
    pub status: AdapterStatus,
    /// Why it was rejected.
    pub status_reason: Option<String>,
    /// Who promoted it last, and when (kept once it is retired).
    pub promoted_by: Option<String>,
    pub promoted_at_ms: Option<i64>,
    pub tainted: Option<Taint>,
}

/// A change of the version a model serves (`None`: the base model).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Promotion {
    pub model: String,
    pub from: Option<String>,
    pub to: Option<String>,
    /// The audit entry's sequence number (`None` when nothing changed).
    pub audit_seq: Option<i64>,
}

/// One promotion or rollback of a model.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HistoryEntry {
    pub model: String,
    pub seq: i64,
    pub at_ms: i64,
    pub actor: String,
    /// `promote` or `rollback`.
    pub action: String,
    /// The version serving after it (`None`: the base model).
    pub version: Option<String>,
}

/// A version marked by an erasure.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TaintedVersion {
    pub id: String,
    pub model: String,
    /// `promoted`: it is serving now, trained on erased data.
    pub status: AdapterStatus,
}

const COLUMNS: &str = "v.id, v.model, v.version, v.path, v.parent_id, v.created_at_ms, v.created_by, v.method, \
     v.config, v.dataset_sha256, v.eval_report, v.status, v.status_reason, v.promoted_by, v.promoted_at_ms, \
     v.tainted_at_ms, v.tainted_reason, \
     (SELECT COUNT(*) FROM adapter_training_data d WHERE d.version_id = v.id AND d.kind = 'record') AS n_records, \
     (SELECT COUNT(*) FROM adapter_training_data d WHERE d.version_id = v.id AND d.kind = 'feedback') AS n_feedback";

/// Tries of a registry write that raced another one (each retry reads afresh).
const RETRIES: u32 = 20;

/// A short, jittered wait before retrying a write that raced another one.
async fn backoff(attempt: u32) {
    let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0] % 8);
    let ms = 2 * u64::from(attempt.min(10) + 1) + jitter;
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

/// Ids per statement where a statement binds a list (far below both backends' limits).
const CHUNK: usize = 300;

fn version_from_row(r: &sqlx::any::AnyRow) -> Result<AdapterVersion> {
    let method: String = r.try_get("method")?;
    let status: String = r.try_get("status")?;
    let tainted_at: Option<i64> = r.try_get("tainted_at_ms")?;
    let tainted_reason: Option<String> = r.try_get("tainted_reason")?;
    Ok(AdapterVersion {
        id: r.try_get("id")?,
        model: r.try_get("model")?,
        version: int_value(r, "version")?,
        path: r.try_get("path")?,
        parent: r.try_get("parent_id")?,
        created_at_ms: r.try_get("created_at_ms")?,
        created_by: r.try_get("created_by")?,
        method: method.parse().map_err(LedgerError::Invalid)?,
        config: parse_json(r.try_get::<&str, _>("config")?),
        dataset_sha256: r.try_get("dataset_sha256")?,
        records: int_value(r, "n_records")?,
        feedback: int_value(r, "n_feedback")?,
        eval_report: r.try_get::<Option<&str>, _>("eval_report")?.map(parse_json),
        status: AdapterStatus::parse(&status)?,
        status_reason: r.try_get("status_reason")?,
        promoted_by: r.try_get("promoted_by")?,
        promoted_at_ms: r.try_get("promoted_at_ms")?,
        tainted: tainted_at.map(|at_ms| Taint {
            at_ms,
            reason: tainted_reason.unwrap_or_default(),
        }),
    })
}

/// The readable prefix of a model's version ids: `smollm2:135m` → `smollm2-135m`.
pub fn id_prefix(model: &str) -> String {
    let mut s = String::new();
    for c in model.chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('-') {
            s.push('-');
        }
    }
    let s = s.trim_matches('-');
    if s.is_empty() {
        "adapter".into()
    } else {
        s.to_string()
    }
}

fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn refused(msg: impl Into<String>) -> LedgerError {
    LedgerError::AdapterRefused(msg.into())
}

/// The model's versions in service order, from the history: a promotion pushes its
/// version, a rollback pops down to the version it re-promoted (or empties the stack:
/// the base model).
fn replay(history: &[HistoryEntry]) -> Vec<String> {
    let mut stack: Vec<String> = Vec::new();
    for h in history {
        match (h.action.as_str(), &h.version) {
            ("promote", Some(v)) => stack.push(v.clone()),
            ("rollback", None) => stack.clear(),
            ("rollback", Some(v)) => {
                while stack.last().is_some_and(|t| t != v) {
                    stack.pop();
                }
                if stack.is_empty() {
                    stack.push(v.clone());
                }
            }
            _ => {}
        }
    }
    stack
}

impl Ledger {
    /// Registers a new version of `v.model` as a `candidate` and returns it. Its id is
    /// `PREFIX-vN` ([`id_prefix`] of the model, N its number for the model). The parent
    /// must be a version of the same model. Audited (`adapter_register`).
    ///
    /// Training ids no longer in the ledger (erased or purged while it trained) taint
    /// the version at once.
    pub async fn register_adapter(&self, v: NewAdapterVersion) -> Result<AdapterVersion> {
        if v.model.is_empty() {
            return Err(LedgerError::Invalid("the model is empty".into()));
        }
        if v.path.is_empty() {
            return Err(LedgerError::Invalid("the adapter path is empty".into()));
        }
        if let Some(h) = &v.dataset_sha256
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(LedgerError::Invalid(format!(
                "dataset_sha256 {h:?} is not 64 hex digits"
            )));
        }
        if let Some(p) = &v.parent {
            match self.adapter(p).await? {
                None => return Err(LedgerError::UnknownAdapter(p.clone())),
                Some(pv) if pv.model != v.model => {
                    return Err(LedgerError::Invalid(format!(
                        "parent {p} is a version of {}, not of {}",
                        pv.model, v.model
                    )));
                }
                Some(_) => {}
            }
        }
        let records: BTreeSet<&String> = v.record_ids.iter().collect();
        let feedback: BTreeSet<&String> = v.feedback_ids.iter().collect();
        let prefix = id_prefix(&v.model);
        let mut last_err = None;
        let mut id = None;
        // Two registrations may take the same number (or two models the same prefix):
        // the unique keys refuse the second, which tries again on a fresh read.
        for attempt in 0..RETRIES {
            match self.register_once(&v, &prefix, &records, &feedback).await {
                Ok(i) => {
                    id = Some(i);
                    break;
                }
                Err(e) => {
                    last_err = Some(e);
                    backoff(attempt).await;
                }
            }
        }
        let Some(id) = id else {
            return Err(last_err.expect("at least one attempt"));
        };
        // After the commit, so that an erasure running meanwhile either sees these ids
        // (and taints the version) or has deleted the records before this check.
        let gone_r = self
            .missing(
                "completions",
                &records.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            )
            .await?;
        let gone_f = self
            .missing(
                "feedback",
                &feedback.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            )
            .await?;
        if gone_r + gone_f > 0 {
            sqlx::query(
                "UPDATE adapter_versions SET tainted_at_ms = $1, tainted_reason = $2 WHERE id = $3 AND tainted_at_ms IS NULL",
            )
            .bind(now_ms())
            .bind(format!(
                "trained on {gone_r} records and {gone_f} feedback items that were not in the ledger when it was registered (erased, purged or never recorded)"
            ))
            .bind(&id)
            .execute(&self.pool)
            .await?;
        }
        let out = self
            .adapter(&id)
            .await?
            .ok_or_else(|| LedgerError::UnknownAdapter(id.clone()))?;
        self.audit(
            &v.created_by,
            "adapter_register",
            json!({"id": out.id, "model": out.model, "version": out.version, "path": out.path,
                   "parent": out.parent, "method": out.method, "dataset_sha256": out.dataset_sha256,
                   "records": out.records, "feedback": out.feedback, "tainted": out.tainted}),
        )
        .await?;
        Ok(out)
    }

    async fn register_once(
        &self,
        v: &NewAdapterVersion,
        prefix: &str,
        records: &BTreeSet<&String>,
        feedback: &BTreeSet<&String>,
    ) -> Result<String> {
        let mut tx = self.pool.begin().await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(MAX(version), 0) AS BIGINT) FROM adapter_versions WHERE model = $1",
        )
        .bind(&v.model)
        .fetch_one(&mut *tx)
        .await?;
        let number = n + 1;
        let mut id = format!("{prefix}-v{number}");
        let holder: Option<String> =
            sqlx::query_scalar("SELECT model FROM adapter_versions WHERE id = $1")
                .bind(&id)
                .fetch_optional(&mut *tx)
                .await?;
        if holder.is_some_and(|m| m != v.model) {
            // Another model with the same prefix holds this id.
            id = format!("{id}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
        }
        sqlx::query(
            "INSERT INTO adapter_versions (id, model, version, path, parent_id, created_at_ms, created_by, method, \
             config, dataset_sha256, eval_report, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'candidate')",
        )
        .bind(&id)
        .bind(&v.model)
        .bind(number)
        .bind(&v.path)
        .bind(&v.parent)
        .bind(now_ms())
        .bind(&v.created_by)
        .bind(v.method.name())
        .bind(v.config.to_string())
        .bind(v.dataset_sha256.as_ref().map(|h| h.to_ascii_lowercase()))
        .bind(v.eval_report.as_ref().map(Value::to_string))
        .execute(&mut *tx)
        .await?;
        for (kind, ids) in [("record", records), ("feedback", feedback)] {
            let ids: Vec<&String> = ids.iter().copied().collect();
            for chunk in ids.chunks(CHUNK) {
                let values: Vec<String> = (0..chunk.len())
                    .map(|i| format!("($1, ${}, ${})", 2 * i + 2, 2 * i + 3))
                    .collect();
                // Safe: placeholders only; every value is bound.
                let sql = format!(
                    "INSERT INTO adapter_training_data (version_id, kind, item_id) VALUES {}",
                    values.join(", ")
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(&id);
                for item in chunk {
                    q = q.bind(kind).bind(item.as_str());
                }
                q.execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(id)
    }

    /// How many of `ids` are not in `table` (`completions` or `feedback`).
    async fn missing(&self, table: &'static str, ids: &[&str]) -> Result<usize> {
        let mut found = 0;
        for chunk in ids.chunks(CHUNK) {
            // Safe: a constant table name and placeholders; every value is bound.
            let sql = format!(
                "SELECT COUNT(*) FROM {table} WHERE id IN ({})",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(*id);
            }
            found += q.fetch_one(&self.pool).await? as usize;
        }
        Ok(ids.len() - found)
    }

    /// One version.
    pub async fn adapter(&self, id: &str) -> Result<Option<AdapterVersion>> {
        // Safe: a constant column list, no input.
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM adapter_versions v WHERE v.id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(version_from_row).transpose()
    }

    /// The versions of a model (or of every model), by model and version number.
    pub async fn adapters(&self, model: Option<&str>) -> Result<Vec<AdapterVersion>> {
        let q = match model {
            // Safe: a constant column list, no input.
            Some(m) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM adapter_versions v WHERE v.model = $1 ORDER BY v.model, v.version"
            )))
            .bind(m.to_string()),
            None => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM adapter_versions v ORDER BY v.model, v.version"
            ))),
        };
        q.fetch_all(&self.pool)
            .await?
            .iter()
            .map(version_from_row)
            .collect()
    }

    /// The version a model serves for its plain name (`None`: the base model).
    pub async fn current_adapter(&self, model: &str) -> Result<Option<AdapterVersion>> {
        // Safe: a constant column list, no input.
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM adapter_versions v WHERE v.model = $1 AND v.status = 'promoted'"
        )))
        .bind(model)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(version_from_row).transpose()
    }

    /// A version and its ancestors: `[id, parent, grandparent, …]`, ending at the one
    /// trained from the base model.
    pub async fn adapter_lineage(&self, id: &str) -> Result<Vec<AdapterVersion>> {
        let mut out: Vec<AdapterVersion> = Vec::new();
        let mut next = Some(id.to_string());
        while let Some(i) = next {
            if out.iter().any(|v| v.id == i) || out.len() > 10_000 {
                break;
            }
            let v = self
                .adapter(&i)
                .await?
                .ok_or_else(|| LedgerError::UnknownAdapter(i.clone()))?;
            next = v.parent.clone();
            out.push(v);
        }
        Ok(out)
    }

    /// The completion ids and feedback ids a version was trained on, sorted.
    pub async fn adapter_training_data(&self, id: &str) -> Result<(Vec<String>, Vec<String>)> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT kind, item_id FROM adapter_training_data WHERE version_id = $1 ORDER BY kind, item_id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let (mut r, mut f) = (Vec::new(), Vec::new());
        for (kind, item) in rows {
            if kind == "record" {
                r.push(item);
            } else {
                f.push(item);
            }
        }
        Ok((r, f))
    }

    /// The promotions and rollbacks of a model, oldest first.
    pub async fn adapter_history(&self, model: &str) -> Result<Vec<HistoryEntry>> {
        let rows: Vec<(String, i64, i64, String, String, Option<String>)> = sqlx::query_as(
            "SELECT model, seq, at_ms, actor, action, version_id FROM adapter_history WHERE model = $1 ORDER BY seq",
        )
        .bind(model)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(model, seq, at_ms, actor, action, version)| HistoryEntry {
                model,
                seq,
                at_ms,
                actor,
                action,
                version,
            })
            .collect())
    }

    /// Sets a candidate's eval report (for a trainer that registers before it
    /// evaluates).
    pub async fn set_eval_report(&self, id: &str, report: &Value) -> Result<AdapterVersion> {
        let v = self
            .adapter(id)
            .await?
            .ok_or_else(|| LedgerError::UnknownAdapter(id.into()))?;
        if v.status != AdapterStatus::Candidate {
            return Err(refused(format!(
                "{id} is {}: only a candidate's eval report can be set",
                v.status.name()
            )));
        }
        sqlx::query("UPDATE adapter_versions SET eval_report = $1 WHERE id = $2")
            .bind(report.to_string())
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.adapter(id)
            .await?
            .ok_or_else(|| LedgerError::UnknownAdapter(id.into()))
    }

    /// Makes `id` the version its model serves; the one serving before becomes
    /// `retired`. Refused for tainted and rejected versions; promoting the version
    /// already serving changes nothing. Audited (`adapter_promote`).
    pub async fn promote_adapter(&self, id: &str, actor: &str) -> Result<Promotion> {
        let mut last_err = None;
        for attempt in 0..RETRIES {
            match self.promote_once(id, actor).await {
                Ok(Some(p)) => {
                    let seq = self
                        .audit(
                            actor,
                            "adapter_promote",
                            json!({"model": p.model, "from": p.from, "to": p.to}),
                        )
                        .await?;
                    return Ok(Promotion {
                        audit_seq: Some(seq),
                        ..p
                    });
                }
                Ok(None) => {
                    let v = self
                        .adapter(id)
                        .await?
                        .ok_or_else(|| LedgerError::UnknownAdapter(id.into()))?;
                    return Ok(Promotion {
                        model: v.model,
                        from: Some(id.into()),
                        to: Some(id.into()),
                        audit_seq: None,
                    });
                }
                Err(e @ (LedgerError::UnknownAdapter(_) | LedgerError::AdapterRefused(_))) => {
                    return Err(e);
                }
                Err(e) => {
                    last_err = Some(e);
                    backoff(attempt).await;
                }
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    /// One try at a promotion: `None` when the version already serves.
    async fn promote_once(&self, id: &str, actor: &str) -> Result<Option<Promotion>> {
        let v = self
            .adapter(id)
            .await?
            .ok_or_else(|| LedgerError::UnknownAdapter(id.into()))?;
        if let Some(t) = &v.tainted {
            return Err(refused(format!(
                "{id} cannot be promoted: it was trained on erased data ({})",
                t.reason
            )));
        }
        match v.status {
            AdapterStatus::Promoted => return Ok(None),
            AdapterStatus::Rejected => {
                return Err(refused(format!(
                    "{id} cannot be promoted: it was rejected{}; register its directory again to give it another chance",
                    v.status_reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                )));
            }
            AdapterStatus::Candidate | AdapterStatus::Retired => {}
        }
        let from = self.current_adapter(&v.model).await?.map(|c| c.id);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE adapter_versions SET status = 'retired' WHERE model = $1 AND status = 'promoted'",
        )
        .bind(&v.model)
        .execute(&mut *tx)
        .await?;
        let now = now_ms();
        // The conditions hold against a taint or rejection committed since the read.
        let n = sqlx::query(
            "UPDATE adapter_versions SET status = 'promoted', promoted_by = $1, promoted_at_ms = $2 \
             WHERE id = $3 AND status IN ('candidate', 'retired') AND tainted_at_ms IS NULL",
        )
        .bind(actor)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n != 1 {
            return Err(LedgerError::Invalid(format!(
                "{id} changed while it was promoted"
            )));
        }
        self.push_history(&mut tx, &v.model, now, actor, "promote", Some(id))
            .await?;
        tx.commit().await?;
        Ok(Some(Promotion {
            model: v.model,
            from,
            to: Some(id.into()),
            audit_seq: None,
        }))
    }

    async fn push_history(
        &self,
        tx: &mut sqlx::AnyConnection,
        model: &str,
        at: i64,
        actor: &str,
        action: &str,
        version: Option<&str>,
    ) -> Result<()> {
        let seq: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(MAX(seq), 0) AS BIGINT) FROM adapter_history WHERE model = $1",
        )
        .bind(model)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO adapter_history (model, seq, at_ms, actor, action, version_id) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(model)
        .bind(seq + 1)
        .bind(at)
        .bind(actor)
        .bind(action)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// Takes the model's current version out of service (it becomes `retired`) and
    /// re-promotes the version that served before it, skipping versions rejected or
    /// tainted since; with none, the model serves its base. Refused when the model
    /// already serves its base. Audited (`adapter_rollback`).
    pub async fn rollback_adapter(&self, model: &str, actor: &str) -> Result<Promotion> {
        let mut last_err = None;
        for attempt in 0..RETRIES {
            match self.rollback_once(model, actor).await {
                Ok(p) => {
                    let seq = self
                        .audit(
                            actor,
                            "adapter_rollback",
                            json!({"model": p.model, "from": p.from, "to": p.to}),
                        )
                        .await?;
                    return Ok(Promotion {
                        audit_seq: Some(seq),
                        ..p
                    });
                }
                Err(e @ (LedgerError::UnknownAdapter(_) | LedgerError::AdapterRefused(_))) => {
                    return Err(e);
                }
                Err(e) => {
                    last_err = Some(e);
                    backoff(attempt).await;
                }
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    async fn rollback_once(&self, model: &str, actor: &str) -> Result<Promotion> {
        let Some(cur) = self.current_adapter(model).await? else {
            return Err(refused(format!(
                "{model} serves its base model: there is nothing to roll back"
            )));
        };
        let mut stack = replay(&self.adapter_history(model).await?);
        let mut to = None;
        while let Some(v) = stack.pop() {
            if v == cur.id {
                continue;
            }
            let ok = self.adapter(&v).await?.is_some_and(|x| {
                x.tainted.is_none() && x.status != AdapterStatus::Rejected && x.model == model
            });
            if ok {
                to = Some(v);
                break;
            }
        }
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE adapter_versions SET status = 'retired' WHERE id = $1 AND status = 'promoted'",
        )
        .bind(&cur.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n != 1 {
            return Err(LedgerError::Invalid(format!(
                "{model}'s current version changed during the rollback"
            )));
        }
        let now = now_ms();
        if let Some(t) = &to {
            let n = sqlx::query(
                "UPDATE adapter_versions SET status = 'promoted', promoted_by = $1, promoted_at_ms = $2 \
                 WHERE id = $3 AND status <> 'rejected' AND tainted_at_ms IS NULL",
            )
            .bind(actor)
            .bind(now)
            .bind(t)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n != 1 {
                return Err(LedgerError::Invalid(format!(
                    "{t} changed during the rollback"
                )));
            }
        }
        self.push_history(&mut tx, model, now, actor, "rollback", to.as_deref())
            .await?;
        tx.commit().await?;
        Ok(Promotion {
            model: model.into(),
            from: Some(cur.id),
            to,
            audit_seq: None,
        })
    }

    /// Marks a version `rejected` (by the eval gate or an operator): it will never be
    /// promoted, nor rolled back to. The version serving must be rolled back first.
    /// Audited (`adapter_reject`).
    pub async fn reject_adapter(
        &self,
        id: &str,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<AdapterVersion> {
        let v = self
            .adapter(id)
            .await?
            .ok_or_else(|| LedgerError::UnknownAdapter(id.into()))?;
        match v.status {
            AdapterStatus::Promoted => {
                return Err(refused(format!(
                    "{id} is serving: roll it back before rejecting it"
                )));
            }
            AdapterStatus::Rejected => return Ok(v),
            AdapterStatus::Candidate | AdapterStatus::Retired => {}
        }
        let n = sqlx::query(
            "UPDATE adapter_versions SET status = 'rejected', status_reason = $1 WHERE id = $2 AND status <> 'promoted'",
        )
        .bind(reason)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n != 1 {
            return Err(refused(format!(
                "{id} was promoted meanwhile: roll it back before rejecting it"
            )));
        }
        self.audit(
            actor,
            "adapter_reject",
            json!({"id": id, "model": v.model, "reason": reason}),
        )
        .await?;
        self.adapter(id)
            .await?
            .ok_or_else(|| LedgerError::UnknownAdapter(id.into()))
    }

    /// Marks every version trained on any of `record_ids` or `feedback_ids` as tainted
    /// (those marked before keep their first reason), and returns them all.
    pub(crate) async fn taint_trained_on(
        &self,
        record_ids: &[String],
        feedback_ids: &[String],
        reason: &str,
    ) -> Result<Vec<TaintedVersion>> {
        let mut versions = BTreeSet::new();
        for (kind, ids) in [("record", record_ids), ("feedback", feedback_ids)] {
            for chunk in ids.chunks(CHUNK) {
                // Safe: placeholders only; every value is bound.
                let sql = format!(
                    "SELECT DISTINCT version_id FROM adapter_training_data WHERE kind = $1 AND item_id IN ({})",
                    placeholders(2, chunk.len())
                );
                let mut q = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)).bind(kind);
                for id in chunk {
                    q = q.bind(id.as_str());
                }
                versions.extend(q.fetch_all(&self.pool).await?);
            }
        }
        let now = now_ms();
        let mut out = Vec::new();
        for id in versions {
            sqlx::query(
                "UPDATE adapter_versions SET tainted_at_ms = $1, tainted_reason = $2 WHERE id = $3 AND tainted_at_ms IS NULL",
            )
            .bind(now)
            .bind(reason)
            .bind(&id)
            .execute(&self.pool)
            .await?;
            if let Some(v) = self.adapter(&id).await? {
                out.push(TaintedVersion {
                    id: v.id,
                    model: v.model,
                    status: v.status,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdb;
    use crate::tests::rec;

    fn new(model: &str, parent: Option<&str>, records: &[&str]) -> NewAdapterVersion {
        NewAdapterVersion {
            model: model.into(),
            path: "/adapters/x".into(),
            parent: parent.map(str::to_string),
            created_by: "trainer".into(),
            method: TrainMethod::Dpo,
            config: json!({"r": 8, "lr": 1e-4}),
            dataset_sha256: Some("ab".repeat(32)),
            record_ids: records.iter().map(|s| s.to_string()).collect(),
            feedback_ids: vec![],
            eval_report: Some(json!({"passed": true, "nll_delta": -0.1})),
        }
    }

    #[test]
    fn id_prefixes_are_readable() {
        assert_eq!(id_prefix("smollm2:135m"), "smollm2-135m");
        assert_eq!(
            id_prefix("SmolLM2-135M-Instruct.Q4_1"),
            "smollm2-135m-instruct-q4-1"
        );
        assert_eq!(id_prefix("::"), "adapter");
    }

    #[tokio::test]
    async fn register_promote_rollback() {
        for db in testdb::all().await {
            let l = db.open().await;
            for id in ["c1", "c2"] {
                l.record(rec(id, "acme")).await.unwrap();
            }
            assert!(l.current_adapter("m").await.unwrap().is_none());
            let v1 = l.register_adapter(new("m", None, &["c1"])).await.unwrap();
            assert_eq!((v1.id.as_str(), v1.version), ("m-v1", 1));
            assert_eq!(v1.status, AdapterStatus::Candidate);
            assert_eq!((v1.records, v1.feedback), (1, 0));
            assert_eq!(v1.method, TrainMethod::Dpo);
            assert_eq!(
                v1.eval_report,
                Some(json!({"passed": true, "nll_delta": -0.1}))
            );
            assert!(v1.tainted.is_none());
            // Duplicate ids count once; the parent must exist and be of the same model.
            let mut n = new("m", Some("m-v1"), &["c1", "c2", "c2"]);
            n.feedback_ids = vec![];
            let v2 = l.register_adapter(n).await.unwrap();
            assert_eq!((v2.id.as_str(), v2.records), ("m-v2", 2));
            assert!(matches!(
                l.register_adapter(new("m", Some("nope"), &[])).await,
                Err(LedgerError::UnknownAdapter(_))
            ));
            let other = l.register_adapter(new("o:1", None, &[])).await.unwrap();
            assert_eq!(other.id, "o-1-v1");
            assert!(matches!(
                l.register_adapter(new("m", Some("o-1-v1"), &[])).await,
                Err(LedgerError::Invalid(_))
            ));
            let mut bad = new("m", None, &[]);
            bad.dataset_sha256 = Some("xyz".into());
            assert!(l.register_adapter(bad).await.is_err());
            let v3 = l
                .register_adapter(new("m", Some("m-v2"), &[]))
                .await
                .unwrap();
            let lineage: Vec<String> = l
                .adapter_lineage(&v3.id)
                .await
                .unwrap()
                .into_iter()
                .map(|v| v.id)
                .collect();
            assert_eq!(lineage, ["m-v3", "m-v2", "m-v1"]);
            assert_eq!(
                l.adapter_training_data("m-v2").await.unwrap(),
                (vec!["c1".to_string(), "c2".to_string()], vec![])
            );

            // Exactly one promoted per model; the one before retires.
            let p = l.promote_adapter("m-v1", "alice").await.unwrap();
            assert_eq!((p.from, p.to.as_deref()), (None, Some("m-v1")));
            assert!(p.audit_seq.is_some());
            l.promote_adapter("m-v2", "bob").await.unwrap();
            let p = l.promote_adapter("m-v3", "bob").await.unwrap();
            assert_eq!(
                (p.from.as_deref(), p.to.as_deref()),
                (Some("m-v2"), Some("m-v3"))
            );
            let again = l.promote_adapter("m-v3", "bob").await.unwrap();
            assert_eq!(
                again.audit_seq, None,
                "promoting the current one is a no-op"
            );
            let status = |vs: Vec<AdapterVersion>| -> Vec<(String, AdapterStatus)> {
                vs.into_iter().map(|v| (v.id, v.status)).collect()
            };
            use AdapterStatus::*;
            assert_eq!(
                status(l.adapters(Some("m")).await.unwrap()),
                [
                    ("m-v1".into(), Retired),
                    ("m-v2".into(), Retired),
                    ("m-v3".into(), Promoted)
                ]
            );
            assert_eq!(l.adapters(None).await.unwrap().len(), 4);
            let cur = l.current_adapter("m").await.unwrap().unwrap();
            assert_eq!(
                (cur.id.as_str(), cur.promoted_by.as_deref()),
                ("m-v3", Some("bob"))
            );
            assert!(l.current_adapter("o:1").await.unwrap().is_none());

            // A rejected version is skipped by a rollback, and is never promoted.
            l.reject_adapter("m-v2", "gate", Some("NLL rose"))
                .await
                .unwrap();
            assert!(matches!(
                l.promote_adapter("m-v2", "x").await,
                Err(LedgerError::AdapterRefused(m)) if m.contains("rejected (NLL rose)")
            ));
            assert!(matches!(
                l.reject_adapter("m-v3", "x", None).await,
                Err(LedgerError::AdapterRefused(_))
            ));
            let r = l.rollback_adapter("m", "carol").await.unwrap();
            assert_eq!(
                (r.from.as_deref(), r.to.as_deref()),
                (Some("m-v3"), Some("m-v1"))
            );
            assert_eq!(
                status(l.adapters(Some("m")).await.unwrap()),
                [
                    ("m-v1".into(), Promoted),
                    ("m-v2".into(), Rejected),
                    ("m-v3".into(), Retired)
                ]
            );
            // Promote v3 again, roll back: v1 (the one serving before it) again.
            l.promote_adapter("m-v3", "bob").await.unwrap();
            let r = l.rollback_adapter("m", "carol").await.unwrap();
            assert_eq!(r.to.as_deref(), Some("m-v1"));
            // Then back to the base, then nothing left to roll back.
            let r = l.rollback_adapter("m", "carol").await.unwrap();
            assert_eq!((r.from.as_deref(), r.to), (Some("m-v1"), None));
            assert!(l.current_adapter("m").await.unwrap().is_none());
            assert!(matches!(
                l.rollback_adapter("m", "carol").await,
                Err(LedgerError::AdapterRefused(_))
            ));
            assert!(matches!(
                l.promote_adapter("nope", "x").await,
                Err(LedgerError::UnknownAdapter(_))
            ));
            let h: Vec<(String, Option<String>)> = l
                .adapter_history("m")
                .await
                .unwrap()
                .into_iter()
                .map(|h| (h.action, h.version))
                .collect();
            let s = |x: &str| Some(x.to_string());
            assert_eq!(
                h,
                [
                    ("promote".into(), s("m-v1")),
                    ("promote".into(), s("m-v2")),
                    ("promote".into(), s("m-v3")),
                    ("rollback".into(), s("m-v1")),
                    ("promote".into(), s("m-v3")),
                    ("rollback".into(), s("m-v1")),
                    ("rollback".into(), None),
                ]
            );
            // Every change is in the audit chain.
            let actions: Vec<String> = l
                .audit_entries()
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.action)
                .filter(|a| a != "adapter_register")
                .collect();
            assert_eq!(
                actions,
                [
                    "adapter_promote",
                    "adapter_promote",
                    "adapter_promote",
                    "adapter_reject",
                    "adapter_rollback",
                    "adapter_promote",
                    "adapter_rollback",
                    "adapter_rollback"
                ]
            );
            assert!(l.verify_audit().await.unwrap().is_ok());

            // Eval reports can be set on candidates only.
            let v4 = l.register_adapter(new("m", None, &[])).await.unwrap();
            let got = l
                .set_eval_report(&v4.id, &json!({"passed": false}))
                .await
                .unwrap();
            assert_eq!(got.eval_report, Some(json!({"passed": false})));
            assert!(l.set_eval_report("m-v1", &json!({})).await.is_err());
            db.drop_db(l).await;
        }
    }

    #[tokio::test]
    async fn erasure_taints_versions_trained_on_erased_data() {
        for db in testdb::all().await {
            let l = db.open().await;
            for (id, subject) in [("a1", "alice"), ("a2", "alice"), ("b1", "bob")] {
                let mut r = rec(id, "acme");
                r.subject = Some(subject.into());
                l.record(r).await.unwrap();
            }
            // Bob's feedback on his own answer; a pairwise choice of Bob's answer over
            // one of Alice's is erased with her.
            let fb_bob = l
                .add_feedback(crate::tests::fb("b1", "acme", 1))
                .await
                .unwrap();
            let mut pair = crate::tests::fb("b1", "acme", 1);
            pair.kind = "preference".into();
            pair.rating = None;
            pair.rejected_id = Some("a2".into());
            let pair = l.add_feedback(pair).await.unwrap();
            // v1: trained on Bob's record only; v2: on Alice's a1; v3: on the pair
            // (feedback id only); v4: on Bob's feedback only.
            let v1 = l.register_adapter(new("m", None, &["b1"])).await.unwrap();
            let v2 = l
                .register_adapter(new("m", Some(&v1.id), &["a1", "b1"]))
                .await
                .unwrap();
            let mut n3 = new("m", None, &[]);
            n3.feedback_ids = vec![pair.id.clone()];
            let v3 = l.register_adapter(n3).await.unwrap();
            let mut n4 = new("m", None, &[]);
            n4.feedback_ids = vec![fb_bob.id.clone()];
            let v4 = l.register_adapter(n4).await.unwrap();
            l.promote_adapter(&v1.id, "op").await.unwrap();
            l.promote_adapter(&v2.id, "op").await.unwrap();

            let r = l.erase_subject("admin", None, "alice").await.unwrap();
            assert_eq!((r.completions_erased, r.feedback_erased), (2, 1));
            let mut marked: Vec<(String, AdapterStatus)> = r
                .adapters_tainted
                .iter()
                .map(|t| (t.id.clone(), t.status))
                .collect();
            marked.sort();
            assert_eq!(
                marked,
                [
                    (v2.id.clone(), AdapterStatus::Promoted),
                    (v3.id.clone(), AdapterStatus::Candidate)
                ]
            );
            let t = l.adapter(&v2.id).await.unwrap().unwrap().tainted.unwrap();
            assert!(t.reason.contains(&r.receipt_id), "{}", t.reason);
            assert!(l.adapter(&v1.id).await.unwrap().unwrap().tainted.is_none());
            assert!(l.adapter(&v4.id).await.unwrap().unwrap().tainted.is_none());
            // The erasure's audit entry names them.
            let e = l.audit_entries().await.unwrap();
            let last = e.iter().rfind(|e| e.action == "erase_subject").unwrap();
            assert_eq!(
                last.details["adapters_tainted"].as_array().unwrap().len(),
                2
            );

            // A tainted version keeps serving until someone acts, but is never
            // promoted (again) and never rolled back to.
            assert_eq!(l.current_adapter("m").await.unwrap().unwrap().id, v2.id);
            assert!(matches!(
                l.promote_adapter(&v3.id, "op").await,
                Err(LedgerError::AdapterRefused(m)) if m.contains("erased data")
            ));
            l.promote_adapter(&v4.id, "op").await.unwrap();
            let back = l.rollback_adapter("m", "op").await.unwrap();
            assert_eq!(back.to.as_deref(), Some(v1.id.as_str()), "v2 is skipped");

            // A second erasure touching the same version keeps its first reason.
            let mut more = rec("a3", "acme");
            more.subject = Some("alice".into());
            l.record(more).await.unwrap();
            let v5 = l.register_adapter(new("m", None, &["a3"])).await.unwrap();
            assert!(v5.tainted.is_none());
            let r2 = l.erase_subject("admin", None, "alice").await.unwrap();
            assert_eq!(r2.adapters_tainted.len(), 1);
            assert_eq!(l.adapter(&v2.id).await.unwrap().unwrap().tainted, Some(t));

            // Registering with ids no longer in the ledger taints at once.
            let late = l
                .register_adapter(new("m", None, &["a1", "b1"]))
                .await
                .unwrap();
            assert!(
                late.tainted
                    .as_ref()
                    .is_some_and(|t| t.reason.contains("1 records")),
                "{late:?}"
            );
            assert!(l.promote_adapter(&late.id, "op").await.is_err());
            db.drop_db(l).await;
        }
    }

    #[tokio::test]
    async fn concurrent_registrations_and_promotions() {
        for db in testdb::all().await {
            let l = db.open().await;
            let mut hs = Vec::new();
            for _ in 0..8 {
                let l = l.clone();
                hs.push(tokio::spawn(async move {
                    l.register_adapter(new("m", None, &[])).await
                }));
            }
            let mut ids = Vec::new();
            for h in hs {
                ids.push(h.await.unwrap().unwrap().id);
            }
            ids.sort();
            let want: Vec<String> = (1..=8).map(|i| format!("m-v{i}")).collect();
            let mut want_sorted = want.clone();
            want_sorted.sort();
            assert_eq!(ids, want_sorted, "one number each");
            let mut hs = Vec::new();
            for id in want {
                let l = l.clone();
                hs.push(tokio::spawn(
                    async move { l.promote_adapter(&id, "op").await },
                ));
            }
            for h in hs {
                h.await.unwrap().unwrap();
            }
            let vs = l.adapters(Some("m")).await.unwrap();
            let promoted: Vec<&AdapterVersion> = vs
                .iter()
                .filter(|v| v.status == AdapterStatus::Promoted)
                .collect();
            assert_eq!(promoted.len(), 1);
            assert!(vs.iter().all(|v| v.status != AdapterStatus::Candidate));
            let stack = replay(&l.adapter_history("m").await.unwrap());
            assert_eq!(stack.len(), 8);
            assert_eq!(stack.last(), Some(&promoted[0].id), "history agrees");
            db.drop_db(l).await;
        }
    }

    #[test]
    fn replay_is_a_stack() {
        let h = |action: &str, v: Option<&str>| HistoryEntry {
            model: "m".into(),
            seq: 0,
            at_ms: 0,
            actor: "a".into(),
            action: action.into(),
            version: v.map(str::to_string),
        };
        let hist = [
            h("promote", Some("1")),
            h("promote", Some("2")),
            h("promote", Some("3")),
            h("rollback", Some("1")),
            h("promote", Some("4")),
        ];
        assert_eq!(replay(&hist), ["1", "4"]);
        assert!(replay(&[h("promote", Some("1")), h("rollback", None)]).is_empty());
    }
}
