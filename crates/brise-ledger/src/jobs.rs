//! Files uploaded for fine-tuning and the fine-tuning jobs that train on them (the
//! `/v1/files` and `/v1/fine_tuning/jobs` APIs, and `brise serve --learn`'s own runs).
//!
//! - **A file** belongs to the tenant that uploaded it; its content (UTF-8 JSONL) is kept
//!   in the ledger so that any server sharing the ledger can train on it. Deleting it
//!   clears the content and keeps the row (jobs name their files).
//! - **A job** is `queued` when created, `running` once a server claims it (one atomic
//!   update, so two servers sharing a ledger never run the same job), then `succeeded`,
//!   `failed` or `cancelled`. A cancel of a queued job is immediate; a running job's
//!   runner sees `cancel_requested` between steps and stops. Jobs of the server itself
//!   (`--learn`) have the tenant [`SYSTEM_TENANT`] and train on the ledger's feedback.
//! - **Events** are numbered per job (1, 2, …): messages, and a metrics event per
//!   optimizer step (step, loss, learning rate, tokens/s), which is what loss curves
//!   read.

use crate::{Ledger, LedgerError, Result, int_value, now_ms, parse_json};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::Row;

/// The tenant of the jobs a server starts by itself (`brise serve --learn`).
pub const SYSTEM_TENANT: &str = "";

/// A file as listed (its content is read separately).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FileInfo {
    pub id: String,
    pub tenant: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub sha256: String,
    /// Non-blank lines.
    pub lines: i64,
    pub created_at_ms: i64,
    pub deleted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Result<JobStatus> {
        Ok(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            _ => return Err(LedgerError::Invalid(format!("unknown job status {s:?}"))),
        })
    }

    pub fn finished(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// What a job is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub struct NewJob {
    pub tenant: String,
    pub model: String,
    /// `files` (train on `training_file`) or `ledger` (on the ledger's feedback).
    pub source: String,
    pub training_file: Option<String>,
    pub validation_file: Option<String>,
    /// `sft`, `dpo`, `kto` or `auto`.
    pub method: String,
    /// The trainer's configuration, as JSON.
    pub config: Value,
    /// The request as the client gave it.
    pub request: Value,
    /// `openai` or `mistral`: how the job's objects are shaped.
    pub dialect: String,
    pub suffix: Option<String>,
    pub promote: bool,
    pub created_by: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Job {
    pub id: String,
    pub tenant: String,
    pub model: String,
    pub source: String,
    pub training_file: Option<String>,
    pub validation_file: Option<String>,
    pub method: String,
    pub config: Value,
    pub request: Value,
    pub dialect: String,
    pub suffix: Option<String>,
    pub promote: bool,
    pub created_by: String,
    pub status: JobStatus,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub runner: Option<String>,
    pub cancel_requested: bool,
    pub error: Option<String>,
    pub adapter_version: Option<String>,
    pub trained_tokens: Option<i64>,
    pub metrics: Option<Value>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct JobEvent {
    pub job_id: String,
    pub seq: i64,
    pub created_at_ms: i64,
    /// `info`, `warn` or `error`.
    pub level: String,
    /// `message` or `metrics`.
    pub kind: String,
    pub message: String,
    pub data: Option<Value>,
}

/// How a running job ended.
#[derive(Clone, Debug, PartialEq)]
pub struct JobEnd {
    pub status: JobStatus,
    pub error: Option<String>,
    pub adapter_version: Option<String>,
    pub trained_tokens: Option<i64>,
    pub metrics: Option<Value>,
}

const FILE_COLUMNS: &str = "id, tenant, filename, purpose, bytes, sha256, lines, created_at_ms, \
     CASE WHEN content IS NULL THEN 1 ELSE 0 END AS deleted";

const JOB_COLUMNS: &str = "id, tenant, model, source, training_file, validation_file, method, config, request, \
     dialect, suffix, promote, created_by, status, created_at_ms, started_at_ms, finished_at_ms, runner, \
     cancel_requested, error, adapter_version, trained_tokens, metrics";

fn file_from_row(r: &sqlx::any::AnyRow) -> Result<FileInfo> {
    Ok(FileInfo {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        filename: r.try_get("filename")?,
        purpose: r.try_get("purpose")?,
        bytes: r.try_get("bytes")?,
        sha256: r.try_get("sha256")?,
        lines: r.try_get("lines")?,
        created_at_ms: r.try_get("created_at_ms")?,
        deleted: int_value(r, "deleted")? != 0,
    })
}

fn job_from_row(r: &sqlx::any::AnyRow) -> Result<Job> {
    let status: String = r.try_get("status")?;
    Ok(Job {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        model: r.try_get("model")?,
        source: r.try_get("source")?,
        training_file: r.try_get("training_file")?,
        validation_file: r.try_get("validation_file")?,
        method: r.try_get("method")?,
        config: parse_json(r.try_get::<&str, _>("config")?),
        request: parse_json(r.try_get::<&str, _>("request")?),
        dialect: r.try_get("dialect")?,
        suffix: r.try_get("suffix")?,
        promote: int_value(r, "promote")? != 0,
        created_by: r.try_get("created_by")?,
        status: JobStatus::parse(&status)?,
        created_at_ms: r.try_get("created_at_ms")?,
        started_at_ms: r.try_get("started_at_ms")?,
        finished_at_ms: r.try_get("finished_at_ms")?,
        runner: r.try_get("runner")?,
        cancel_requested: int_value(r, "cancel_requested")? != 0,
        error: r.try_get("error")?,
        adapter_version: r.try_get("adapter_version")?,
        trained_tokens: r.try_get("trained_tokens")?,
        metrics: r.try_get::<Option<&str>, _>("metrics")?.map(parse_json),
    })
}

fn event_from_row(r: &sqlx::any::AnyRow) -> Result<JobEvent> {
    Ok(JobEvent {
        job_id: r.try_get("job_id")?,
        seq: r.try_get("seq")?,
        created_at_ms: r.try_get("created_at_ms")?,
        level: r.try_get("level")?,
        kind: r.try_get("kind")?,
        message: r.try_get("message")?,
        data: r.try_get::<Option<&str>, _>("data")?.map(parse_json),
    })
}

fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..24]
    )
}

impl Ledger {
    /// Keeps an uploaded file (UTF-8 text) for `tenant`.
    pub async fn add_file(
        &self,
        tenant: &str,
        filename: &str,
        purpose: &str,
        content: &str,
    ) -> Result<FileInfo> {
        let f = FileInfo {
            id: new_id("file"),
            tenant: tenant.into(),
            filename: filename.into(),
            purpose: purpose.into(),
            bytes: content.len() as i64,
            sha256: Sha256::digest(content.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            lines: content.lines().filter(|l| !l.trim().is_empty()).count() as i64,
            created_at_ms: now_ms(),
            deleted: false,
        };
        sqlx::query(
            "INSERT INTO files (id, tenant, filename, purpose, bytes, sha256, lines, created_at_ms, content) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&f.id)
        .bind(&f.tenant)
        .bind(&f.filename)
        .bind(&f.purpose)
        .bind(f.bytes)
        .bind(&f.sha256)
        .bind(f.lines)
        .bind(f.created_at_ms)
        .bind(content)
        .execute(&self.pool)
        .await?;
        Ok(f)
    }

    /// A tenant's file (another tenant's is `None`, as an unknown one).
    pub async fn file(&self, tenant: &str, id: &str) -> Result<Option<FileInfo>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE id = $1 AND tenant = $2"
        )))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(file_from_row).transpose()
    }

    /// A tenant's file's content (`None`: unknown, another tenant's, or deleted).
    pub async fn file_content(&self, tenant: &str, id: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT content FROM files WHERE id = $1 AND tenant = $2")
                .bind(id)
                .bind(tenant)
                .fetch_optional(&self.pool)
                .await?
                .flatten(),
        )
    }

    /// A tenant's files not deleted, newest first.
    pub async fn files(&self, tenant: &str, purpose: Option<&str>) -> Result<Vec<FileInfo>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE tenant = $1 AND content IS NOT NULL \
             AND ($2 = '' OR purpose = $2) ORDER BY created_at_ms DESC, id"
        )))
        .bind(tenant)
        .bind(purpose.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(file_from_row).collect()
    }

    /// Clears a tenant's file's content; `false` when there was no such file.
    pub async fn delete_file(&self, tenant: &str, id: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE files SET content = NULL WHERE id = $1 AND tenant = $2 AND content IS NOT NULL",
        )
        .bind(id)
        .bind(tenant)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Queues a job. A job of the servers' own for a model that has one queued or
    /// running already is refused ([`LedgerError::Invalid`]).
    /// A tenant's jobs queued or running.
    pub async fn active_jobs(&self, tenant: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM fine_tuning_jobs WHERE tenant = $1 AND status IN ('queued', 'running')",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn create_job(&self, j: NewJob) -> Result<Job> {
        let id = new_id("ftjob");
        let r = sqlx::query(
            "INSERT INTO fine_tuning_jobs (id, tenant, model, source, training_file, validation_file, method, \
             config, request, dialect, suffix, promote, created_by, status, created_at_ms, cancel_requested) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'queued', $14, 0)",
        )
        .bind(&id)
        .bind(&j.tenant)
        .bind(&j.model)
        .bind(&j.source)
        .bind(&j.training_file)
        .bind(&j.validation_file)
        .bind(&j.method)
        .bind(j.config.to_string())
        .bind(j.request.to_string())
        .bind(&j.dialect)
        .bind(&j.suffix)
        .bind(i64::from(j.promote))
        .bind(&j.created_by)
        .bind(now_ms())
        .execute(&self.pool)
        .await;
        match r {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(LedgerError::Invalid(format!(
                    "a job of the server's own for {} is already queued or running",
                    j.model
                )));
            }
            r => r?,
        };
        self.job_event(&id, "info", "message", "Created the fine-tuning job", None)
            .await?;
        self.job(None, &id)
            .await?
            .ok_or_else(|| LedgerError::Invalid(format!("job {id} vanished")))
    }

    /// A job; with `tenant`, only if it is that tenant's or the server's own.
    pub async fn job(&self, tenant: Option<&str>, id: &str) -> Result<Option<Job>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM fine_tuning_jobs WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let j = row.as_ref().map(job_from_row).transpose()?;
        Ok(j.filter(|j| tenant.is_none_or(|t| j.tenant == t || j.tenant == SYSTEM_TENANT)))
    }

    /// A page of jobs, newest first, with the number matching: a tenant's and the
    /// server's own (all with `None`), of `model` and in `status` when given, after the
    /// job `after` (a cursor) or past `offset` of them.
    #[allow(clippy::too_many_arguments)]
    pub async fn jobs_page(
        &self,
        tenant: Option<&str>,
        model: Option<&str>,
        status: Option<JobStatus>,
        after: Option<&str>,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<Job>, i64)> {
        let before = match after {
            Some(a) => match self.job(tenant, a).await? {
                Some(j) => Some((j.created_at_ms, j.id)),
                None => return Err(LedgerError::Invalid(format!("no fine-tuning job {a}"))),
            },
            None => None,
        };
        let (t_ms, t_id) = before.unwrap_or((i64::MAX, String::new()));
        let filter = "($1 = 0 OR tenant = $2 OR tenant = $3) AND ($4 = '' OR model = $4) AND ($5 = '' OR status = $5)";
        let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM fine_tuning_jobs WHERE {filter}"
        )))
        .bind(i64::from(tenant.is_some()))
        .bind(tenant.unwrap_or(""))
        .bind(SYSTEM_TENANT)
        .bind(model.unwrap_or(""))
        .bind(status.map_or("", |s| s.name()))
        .fetch_one(&self.pool)
        .await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM fine_tuning_jobs WHERE {filter} \
             AND (created_at_ms < $6 OR (created_at_ms = $6 AND id < $7) OR $8 = 0) \
             ORDER BY created_at_ms DESC, id DESC LIMIT $9 OFFSET $10"
        )))
        .bind(i64::from(tenant.is_some()))
        .bind(tenant.unwrap_or(""))
        .bind(SYSTEM_TENANT)
        .bind(model.unwrap_or(""))
        .bind(status.map_or("", |s| s.name()))
        .bind(t_ms)
        .bind(&t_id)
        .bind(i64::from(after.is_some()))
        .bind(limit.clamp(1, 1000))
        .bind(offset.max(0))
        .fetch_all(&self.pool)
        .await?;
        Ok((rows.iter().map(job_from_row).collect::<Result<_>>()?, total))
    }

    /// A job's events in `seq` order, ascending from after `from` or descending from
    /// before it (`None`: from the start or the end), at most `limit`.
    pub async fn job_events_page(
        &self,
        job_id: &str,
        from: Option<i64>,
        descending: bool,
        limit: i64,
    ) -> Result<Vec<JobEvent>> {
        let sql = if descending {
            "SELECT job_id, seq, created_at_ms, level, kind, message, data FROM fine_tuning_events \
             WHERE job_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
        } else {
            "SELECT job_id, seq, created_at_ms, level, kind, message, data FROM fine_tuning_events \
             WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        };
        let from = from.unwrap_or(if descending { i64::MAX } else { 0 });
        let rows = sqlx::query(sql)
            .bind(job_id)
            .bind(from)
            .bind(limit.clamp(1, 100_000))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// Claims the oldest queued job of one of `models` for `runner`; `None` when there
    /// is none. Atomic: of several servers sharing the ledger, one gets each job.
    pub async fn claim_job(&self, runner: &str, models: &[String]) -> Result<Option<Job>> {
        loop {
            let queued: Vec<(String, String)> = sqlx::query_as(
                "SELECT id, model FROM fine_tuning_jobs WHERE status = 'queued' \
                 ORDER BY created_at_ms, id LIMIT 500",
            )
            .fetch_all(&self.pool)
            .await?;
            let Some((id, _)) = queued.into_iter().find(|(_, m)| models.contains(m)) else {
                return Ok(None);
            };
            let now = now_ms();
            let r = sqlx::query(
                "UPDATE fine_tuning_jobs SET status = 'running', runner = $1, started_at_ms = $2, \
                 heartbeat_ms = $2 WHERE id = $3 AND status = 'queued'",
            )
            .bind(runner)
            .bind(now)
            .bind(&id)
            .execute(&self.pool)
            .await?;
            if r.rows_affected() == 1 {
                self.job_event(&id, "info", "message", "Fine-tuning job started", None)
                    .await?;
                return self.job(None, &id).await;
            }
            // Another server took it, or it was cancelled: look again.
        }
    }

    /// The running job's runner is alive (its lease, see [`Ledger::fail_stale_jobs`]).
    pub async fn touch_job(&self, id: &str) -> Result<()> {
        sqlx::query(
            "UPDATE fine_tuning_jobs SET heartbeat_ms = $1 WHERE id = $2 AND status = 'running'",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Fails the running jobs whose runner gave no sign of life since `before_ms` (a
    /// server that died, whatever its name): any server may call it. Returns their ids.
    pub async fn fail_stale_jobs(&self, before_ms: i64) -> Result<Vec<String>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM fine_tuning_jobs WHERE status = 'running' AND heartbeat_ms < $1",
        )
        .bind(before_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut failed = Vec::new();
        for id in ids {
            let r = sqlx::query(
                "UPDATE fine_tuning_jobs SET status = 'failed', finished_at_ms = $1, error = $2 \
                 WHERE id = $3 AND status = 'running' AND heartbeat_ms < $4",
            )
            .bind(now_ms())
            .bind("the server running the job stopped answering")
            .bind(&id)
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
            if r.rows_affected() == 1 {
                self.job_event(
                    &id,
                    "error",
                    "message",
                    "The server running the job stopped answering",
                    None,
                )
                .await?;
                failed.push(id);
            }
        }
        Ok(failed)
    }

    /// The job that trained a registry version, if one did.
    pub async fn job_for_version(&self, version: &str) -> Result<Option<Job>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM fine_tuning_jobs WHERE adapter_version = $1"
        )))
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// The tenants whose fine-tuning jobs trained each version (the server's own jobs
    /// are left out: their versions are everyone's).
    pub async fn version_owners(&self) -> Result<std::collections::HashMap<String, String>> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT adapter_version, tenant FROM fine_tuning_jobs \
             WHERE adapter_version IS NOT NULL AND tenant <> ''",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Appends an event to a job.
    pub async fn job_event(
        &self,
        job_id: &str,
        level: &str,
        kind: &str,
        message: &str,
        data: Option<Value>,
    ) -> Result<i64> {
        let data = data.map(|d| d.to_string());
        let mut last = None;
        // Two writers (the runner, a cancel) may race for a number: retry.
        for _ in 0..20 {
            let seq: i64 = sqlx::query_scalar(
                "SELECT CAST(COALESCE(MAX(seq), 0) AS BIGINT) FROM fine_tuning_events WHERE job_id = $1",
            )
            .bind(job_id)
            .fetch_one(&self.pool)
            .await?;
            let r = sqlx::query(
                "INSERT INTO fine_tuning_events (job_id, seq, created_at_ms, level, kind, message, data) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(job_id)
            .bind(seq + 1)
            .bind(now_ms())
            .bind(level)
            .bind(kind)
            .bind(message)
            .bind(&data)
            .execute(&self.pool)
            .await;
            match r {
                Ok(_) => return Ok(seq + 1),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried").into())
    }

    /// Cancels a job: a queued one at once, a running one at its next step (its
    /// runner ends it). A finished job is returned unchanged.
    pub async fn cancel_job(&self, tenant: Option<&str>, id: &str, actor: &str) -> Result<Job> {
        let Some(j) = self.job(tenant, id).await? else {
            return Err(LedgerError::Invalid(format!("no fine-tuning job {id}")));
        };
        if j.status.finished() {
            return Ok(j);
        }
        let r = sqlx::query(
            "UPDATE fine_tuning_jobs SET status = 'cancelled', finished_at_ms = $1, cancel_requested = 1 \
             WHERE id = $2 AND status = 'queued'",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 1 {
            self.job_event(
                id,
                "info",
                "message",
                &format!("Cancelled by {actor}"),
                None,
            )
            .await?;
        } else if sqlx::query(
            "UPDATE fine_tuning_jobs SET cancel_requested = 1 WHERE id = $1 AND status = 'running'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1
        {
            self.job_event(
                id,
                "info",
                "message",
                &format!("Cancellation requested by {actor}; stopping at the next step"),
                None,
            )
            .await?;
        }
        self.job(None, id)
            .await?
            .ok_or_else(|| LedgerError::Invalid(format!("job {id} vanished")))
    }

    /// Whether a cancel was asked for the job.
    pub async fn job_cancel_requested(&self, id: &str) -> Result<bool> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT cancel_requested FROM fine_tuning_jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(v.unwrap_or(1) != 0)
    }

    /// The method a running job trains with, once known (an `auto` job's is known when
    /// its dataset is built), with the trainer's configuration that goes with it.
    pub async fn set_job_method(&self, id: &str, method: &str, config: &Value) -> Result<()> {
        sqlx::query(
            "UPDATE fine_tuning_jobs SET method = $1, config = $2 WHERE id = $3 AND status = 'running'",
        )
        .bind(method)
        .bind(config.to_string())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The running job's latest metrics (the dashboard and `GET` show them).
    pub async fn set_job_metrics(
        &self,
        id: &str,
        metrics: &Value,
        trained_tokens: i64,
    ) -> Result<()> {
        sqlx::query("UPDATE fine_tuning_jobs SET metrics = $1, trained_tokens = $2 WHERE id = $3")
            .bind(metrics.to_string())
            .bind(trained_tokens)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ends a running job (one already ended, by a stale lease say, stays as it is).
    pub async fn finish_job(&self, id: &str, end: JobEnd) -> Result<()> {
        sqlx::query(
            "UPDATE fine_tuning_jobs SET status = $1, finished_at_ms = $2, error = $3, adapter_version = $4, \
             trained_tokens = COALESCE($5, trained_tokens), metrics = COALESCE($6, metrics) \
             WHERE id = $7 AND status = 'running'",
        )
        .bind(end.status.name())
        .bind(now_ms())
        .bind(&end.error)
        .bind(&end.adapter_version)
        .bind(end.trained_tokens)
        .bind(end.metrics.map(|m| m.to_string()))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Fails the jobs `runner` left running (it stopped without finishing them):
    /// called when a server starts. Returns their ids.
    pub async fn fail_interrupted_jobs(&self, runner: &str) -> Result<Vec<String>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM fine_tuning_jobs WHERE status = 'running' AND runner = $1",
        )
        .bind(runner)
        .fetch_all(&self.pool)
        .await?;
        for id in &ids {
            self.finish_job(
                id,
                JobEnd {
                    status: JobStatus::Failed,
                    error: Some("the server running the job stopped before it finished".into()),
                    adapter_version: None,
                    trained_tokens: None,
                    metrics: None,
                },
            )
            .await?;
            self.job_event(
                id,
                "error",
                "message",
                "The server running the job stopped before it finished",
                None,
            )
            .await?;
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdb;
    use serde_json::json;

    fn new_job(tenant: &str, model: &str) -> NewJob {
        NewJob {
            tenant: tenant.into(),
            model: model.into(),
            source: "files".into(),
            training_file: Some("file-x".into()),
            validation_file: None,
            method: "sft".into(),
            config: json!({"learning_rate": 1e-4}),
            request: json!({"model": model}),
            dialect: "openai".into(),
            suffix: None,
            promote: false,
            created_by: "t".into(),
        }
    }

    #[tokio::test]
    async fn files_are_per_tenant_and_deletable() {
        for db in testdb::all().await {
            let l = db.open().await;
            let f = l
                .add_file("a", "x.jsonl", "fine-tune", "{}\n\n{}\n")
                .await
                .unwrap();
            assert_eq!((f.bytes, f.lines), (7, 2));
            assert!(l.file("b", &f.id).await.unwrap().is_none());
            assert_eq!(
                l.file_content("a", &f.id).await.unwrap().as_deref(),
                Some("{}\n\n{}\n")
            );
            assert_eq!(l.files("a", None).await.unwrap().len(), 1);
            assert_eq!(l.files("a", Some("batch")).await.unwrap().len(), 0);
            assert!(!l.delete_file("b", &f.id).await.unwrap());
            assert!(l.delete_file("a", &f.id).await.unwrap());
            assert!(l.file_content("a", &f.id).await.unwrap().is_none());
            assert!(l.file("a", &f.id).await.unwrap().unwrap().deleted);
            assert!(l.files("a", None).await.unwrap().is_empty());
            db.drop_db(l).await;
        }
    }

    #[tokio::test]
    async fn jobs_are_claimed_once_and_cancel() {
        for db in testdb::all().await {
            let l = db.open().await;
            let j1 = l.create_job(new_job("a", "m")).await.unwrap();
            let j2 = l.create_job(new_job("b", "m")).await.unwrap();
            let j3 = l.create_job(new_job("a", "other")).await.unwrap();
            assert_eq!(j1.status, JobStatus::Queued);
            // Tenants see their own jobs.
            assert!(l.job(Some("b"), &j1.id).await.unwrap().is_none());
            let mine: Vec<String> = l
                .jobs_page(Some("a"), None, None, None, 0, 10)
                .await
                .unwrap()
                .0
                .into_iter()
                .map(|j| j.id)
                .collect();
            assert_eq!(mine.len(), 2);
            assert!(mine.contains(&j1.id) && mine.contains(&j3.id));
            assert_eq!(
                l.jobs_page(None, None, None, None, 0, 10)
                    .await
                    .unwrap()
                    .0
                    .len(),
                3
            );
            // Paging: after the newest, the rest.
            let (all, _) = l.jobs_page(None, None, None, None, 0, 10).await.unwrap();
            let (rest, _) = l
                .jobs_page(None, None, None, Some(&all[0].id), 0, 10)
                .await
                .unwrap();
            assert_eq!(rest.len(), 2);
            assert_eq!(rest[0].id, all[1].id);
            // Oldest first, only served models.
            let c = l.claim_job("r1", &["m".into()]).await.unwrap().unwrap();
            assert_eq!(
                (c.id.as_str(), c.status),
                (j1.id.as_str(), JobStatus::Running)
            );
            assert_eq!(c.runner.as_deref(), Some("r1"));
            // A queued job cancels at once and cannot be claimed.
            let x = l.cancel_job(Some("b"), &j2.id, "b").await.unwrap();
            assert_eq!(x.status, JobStatus::Cancelled);
            assert!(l.claim_job("r2", &["m".into()]).await.unwrap().is_none());
            // A running one is asked to stop.
            assert!(!l.job_cancel_requested(&j1.id).await.unwrap());
            let y = l.cancel_job(None, &j1.id, "admin").await.unwrap();
            assert_eq!(y.status, JobStatus::Running);
            assert!(l.job_cancel_requested(&j1.id).await.unwrap());
            l.finish_job(
                &j1.id,
                JobEnd {
                    status: JobStatus::Cancelled,
                    error: None,
                    adapter_version: None,
                    trained_tokens: Some(10),
                    metrics: Some(json!({"step": 1})),
                },
            )
            .await
            .unwrap();
            let z = l.job(None, &j1.id).await.unwrap().unwrap();
            assert_eq!(
                (z.status, z.trained_tokens),
                (JobStatus::Cancelled, Some(10))
            );
            let ev = l.job_events_page(&j1.id, None, false, 100).await.unwrap();
            let seqs: Vec<i64> = ev.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, vec![1, 2, 3]);
            assert!(ev[2].message.contains("Cancellation requested by admin"));
            assert_eq!(
                l.job_events_page(&j1.id, Some(2), false, 100)
                    .await
                    .unwrap()
                    .len(),
                1
            );
            db.drop_db(l).await;
        }
    }

    #[tokio::test]
    async fn a_restart_fails_the_jobs_it_left_running() {
        for db in testdb::all().await {
            let l = db.open().await;
            let j = l.create_job(new_job("a", "m")).await.unwrap();
            l.claim_job("host:8080", &["m".into()])
                .await
                .unwrap()
                .unwrap();
            assert!(l.fail_interrupted_jobs("other:1").await.unwrap().is_empty());
            assert_eq!(
                l.fail_interrupted_jobs("host:8080").await.unwrap(),
                vec![j.id.clone()]
            );
            let j = l.job(None, &j.id).await.unwrap().unwrap();
            assert_eq!(j.status, JobStatus::Failed);
            assert!(j.error.unwrap().contains("stopped before it finished"));
            db.drop_db(l).await;
        }
    }

    #[tokio::test]
    async fn leases_pages_and_one_learn_job_per_model() {
        for db in testdb::all().await {
            let l = db.open().await;
            // A stale lease fails the job, whoever ran it; a fresh one does not.
            let j = l.create_job(new_job("a", "m")).await.unwrap();
            l.claim_job("gone:1", &["m".into()]).await.unwrap().unwrap();
            assert!(
                l.fail_stale_jobs(now_ms() - 60_000)
                    .await
                    .unwrap()
                    .is_empty()
            );
            l.touch_job(&j.id).await.unwrap();
            assert_eq!(
                l.fail_stale_jobs(now_ms() + 1).await.unwrap(),
                vec![j.id.clone()]
            );
            let f = l.job(None, &j.id).await.unwrap().unwrap();
            assert_eq!(f.status, JobStatus::Failed);
            // The runner coming back later cannot overwrite that, nor can a cancel.
            let end = JobEnd {
                status: JobStatus::Succeeded,
                error: None,
                adapter_version: Some("v".into()),
                trained_tokens: None,
                metrics: None,
            };
            l.finish_job(&j.id, end).await.unwrap();
            assert_eq!(
                l.job(None, &j.id).await.unwrap().unwrap().status,
                JobStatus::Failed
            );
            let n_events = l
                .job_events_page(&j.id, None, false, 100)
                .await
                .unwrap()
                .len();
            l.cancel_job(None, &j.id, "x").await.unwrap();
            assert_eq!(
                l.job_events_page(&j.id, None, false, 100)
                    .await
                    .unwrap()
                    .len(),
                n_events
            );

            // One job of the servers' own queued or running per model.
            let mut sys = new_job(SYSTEM_TENANT, "m");
            sys.source = "ledger".into();
            let s1 = l.create_job(sys.clone()).await.unwrap();
            assert!(l.create_job(sys.clone()).await.is_err());
            let mut other = sys.clone();
            other.model = "m2".into();
            l.create_job(other).await.unwrap();
            l.cancel_job(None, &s1.id, "x").await.unwrap();
            l.create_job(sys).await.unwrap();

            // Pages: filters and totals in SQL, cursors, offsets.
            let (page, total) = l
                .jobs_page(None, Some("m"), None, None, 0, 2)
                .await
                .unwrap();
            assert_eq!((page.len(), total), (2, 3));
            let (rest, _) = l
                .jobs_page(None, Some("m"), None, Some(&page[1].id), 0, 10)
                .await
                .unwrap();
            assert_eq!(rest.len(), 1);
            let (skip, _) = l
                .jobs_page(None, Some("m"), None, None, 2, 10)
                .await
                .unwrap();
            assert_eq!(skip[0].id, rest[0].id);
            let (q, total) = l
                .jobs_page(Some("zz"), None, Some(JobStatus::Queued), None, 0, 10)
                .await
                .unwrap();
            assert_eq!(
                (q.len() as i64, total),
                (2, 2),
                "the servers' own queued jobs"
            );
            // Event pages, both ways.
            for _ in 0..5 {
                l.job_event(&j.id, "info", "metrics", "s", None)
                    .await
                    .unwrap();
            }
            let all = l.job_events_page(&j.id, None, false, 1000).await.unwrap();
            let desc = l.job_events_page(&j.id, None, true, 3).await.unwrap();
            assert_eq!(desc.iter().map(|e| e.seq).collect::<Vec<_>>(), {
                let n = all.len() as i64;
                vec![n, n - 1, n - 2]
            });
            let older = l
                .job_events_page(&j.id, Some(desc[2].seq), true, 100)
                .await
                .unwrap();
            assert_eq!(older.len(), all.len() - 3);
            let asc = l.job_events_page(&j.id, Some(2), false, 2).await.unwrap();
            assert_eq!(asc.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4]);
            db.drop_db(l).await;
        }
    }

    #[tokio::test]
    async fn system_jobs_are_visible_to_tenants() {
        for db in testdb::all().await {
            let l = db.open().await;
            let mut n = new_job(SYSTEM_TENANT, "m");
            n.source = "ledger".into();
            let j = l.create_job(n).await.unwrap();
            assert!(l.job(Some("a"), &j.id).await.unwrap().is_some());
            assert_eq!(
                l.jobs_page(Some("a"), None, None, None, 0, 10)
                    .await
                    .unwrap()
                    .0
                    .len(),
                1
            );
            db.drop_db(l).await;
        }
    }
}
