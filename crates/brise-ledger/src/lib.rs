//! The ledger: a durable record of every completion and the feedback users give on it.
//!
//! Writes go through one group-commit writer: each record waits for the transaction that
//! holds it to commit (so once a client has its answer, the record is on disk), while
//! records that arrive together share one commit (so recording stays cheap under load).
//! SQLite in WAL mode is the embedded default; PostgreSQL serves several replicas. Both
//! go through sqlx's `Any` driver, so every query is written once, in portable SQL:
//! `$N` placeholders, BIGINT columns, casts around aggregates, and booleans read as
//! integers (the `Any` driver cannot decode SQLite's BOOLEAN columns).

pub mod adapters;
pub mod export;
pub mod governance;
pub mod jobs;
pub mod models;
pub mod retention;
pub mod usage;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::MigrateDatabase;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Row};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("ledger migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("no completion {0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "completion {0} is recorded without its content (content level metadata): a correction or comment on it would not be kept"
    )]
    ContentNotKept(String),
    #[error("the ledger writer has stopped")]
    Closed,
    #[error("no adapter version {0}")]
    UnknownAdapter(String),
    /// A registry operation that the versions' state forbids (promoting a tainted or
    /// rejected version, rolling back a base model, …).
    #[error("{0}")]
    AdapterRefused(String),
}

pub type Result<T> = std::result::Result<T, LedgerError>;

/// One completion as recorded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CompletionRecord {
    /// The response `id` the client got.
    pub id: String,
    pub created_at_ms: i64,
    pub tenant: String,
    pub subject: Option<String>,
    pub model: String,
    pub model_sha256: Option<String>,
    pub adapter: Option<String>,
    pub endpoint: String,
    pub params: Value,
    pub messages: Value,
    /// A list of choices: `{"text", "tool_calls"?, "finish_reason"}`.
    pub output: Value,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub ttft_ms: Option<f64>,
    pub latency_ms: f64,
    pub status: String,
    pub error: Option<String>,
    pub training_consent: bool,
    pub content_level: String,
}

/// Feedback on a completion: a rating (thumbs -1/+1, or 1..5) with an optional
/// correction, comment and tags; or a pairwise preference (`completion_id` preferred
/// over `rejected_id`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Feedback {
    pub id: String,
    pub created_at_ms: i64,
    pub tenant: String,
    pub completion_id: String,
    pub kind: String,
    pub rating: Option<i64>,
    pub correction: Option<String>,
    pub comment: Option<String>,
    pub tags: Vec<String>,
    pub rejected_id: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Stats {
    pub completions: i64,
    pub errors: i64,
    /// Streams whose client disconnected before the end.
    pub cancelled: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub feedback: i64,
    pub thumbs_up: i64,
    pub thumbs_down: i64,
    pub corrections: i64,
    pub preferences: i64,
    pub by_model: Vec<ModelStats>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelStats {
    pub model: String,
    pub completions: i64,
    /// Feedback items on its completions.
    pub feedback: i64,
}

struct WriteJob {
    rec: Box<CompletionRecord>,
    done: oneshot::Sender<Result<()>>,
}

#[derive(Clone)]
pub struct Ledger {
    pool: AnyPool,
    backend: Backend,
    writer: mpsc::Sender<WriteJob>,
    /// The per-ledger secret that keys the subject hashes of the audit log.
    audit_key: std::sync::Arc<Vec<u8>>,
}

/// Creates `dir` (and its parents) readable by its owner only, where they are missing.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// Creates the file at `path` with mode 0600 if it does not exist.
fn private_file(path: &Path) -> std::io::Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    match o.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn json_text(v: &Value) -> String {
    v.to_string()
}

fn parse_json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or(Value::Null)
}

/// Which database holds the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The columns of `completions`, in the shape `record_from_row` reads.
pub(crate) const COMPLETION_COLUMNS: &str = "id, created_at_ms, tenant, subject, model, model_sha256, adapter, endpoint, \
     params, messages, output, prompt_tokens, completion_tokens, ttft_ms, latency_ms, status, error, \
     CASE WHEN training_consent THEN 1 ELSE 0 END AS training_consent, content_level";

pub(crate) fn record_from_row(r: &sqlx::any::AnyRow) -> Result<CompletionRecord> {
    Ok(CompletionRecord {
        id: r.try_get("id")?,
        created_at_ms: r.try_get("created_at_ms")?,
        tenant: r.try_get("tenant")?,
        subject: r.try_get("subject")?,
        model: r.try_get("model")?,
        model_sha256: r.try_get("model_sha256")?,
        adapter: r.try_get("adapter")?,
        endpoint: r.try_get("endpoint")?,
        params: parse_json(r.try_get::<&str, _>("params")?),
        messages: parse_json(r.try_get::<&str, _>("messages")?),
        output: parse_json(r.try_get::<&str, _>("output")?),
        prompt_tokens: r.try_get("prompt_tokens")?,
        completion_tokens: r.try_get("completion_tokens")?,
        ttft_ms: r.try_get("ttft_ms")?,
        latency_ms: r.try_get("latency_ms")?,
        status: r.try_get("status")?,
        error: r.try_get("error")?,
        training_consent: int_value(r, "training_consent")? != 0,
        content_level: r.try_get("content_level")?,
    })
}

/// An integer column, whichever width the backend returns it in.
fn int_value(r: &sqlx::any::AnyRow, col: &str) -> Result<i64> {
    match r.try_get::<i64, _>(col) {
        Ok(v) => Ok(v),
        Err(_) => Ok(r.try_get::<i32, _>(col)? as i64),
    }
}

/// True for the URLs that name a PostgreSQL database.
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// The URL with any password replaced, for messages and logs.
pub fn redact_url(s: &str) -> String {
    match (s.find("://"), s.rfind('@')) {
        (Some(a), Some(b)) if b > a => {
            let creds = &s[a + 3..b];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &s[..a + 3], &creds[..c], &s[b..]),
                None => s.to_string(),
            }
        }
        _ => s.to_string(),
    }
}

/// Records arriving while a commit runs join the next one, up to this many.
const MAX_GROUP: usize = 256;

impl Ledger {
    /// Opens the ledger named by `spec`: a `postgres://` URL, or a path to a SQLite
    /// file. Creates the file or database if needed, and migrates it.
    pub async fn open(spec: &str) -> Result<Ledger> {
        if is_postgres_url(spec) {
            Ledger::open_postgres(spec).await
        } else {
            Ledger::open_sqlite(Path::new(spec)).await
        }
    }

    /// Opens (creating it if needed) the SQLite ledger at `path`, and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Ledger> {
        sqlx::any::install_default_drivers();
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            private_dir(dir).map_err(|e| {
                LedgerError::Invalid(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        // Created readable by its owner only; SQLite gives its -wal and -shm files the
        // database file's mode.
        private_file(path)
            .map_err(|e| LedgerError::Invalid(format!("cannot create {}: {e}", path.display())))?;
        let sqlite = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL with NORMAL survives a killed process (commits are in the OS's hands);
            // FULL would add an fsync per commit for power loss.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        // The Any driver connects through a URL, which carries none of these settings:
        // apply them on every new connection.
        let url = sqlite.to_url_lossy();
        let opts = AnyConnectOptions::from_str(url.as_str())?;
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    for pragma in [
                        "PRAGMA journal_mode = WAL",
                        "PRAGMA synchronous = NORMAL",
                        "PRAGMA foreign_keys = ON",
                        "PRAGMA busy_timeout = 10000",
                        // Deleted content is overwritten with zeros, not left in free
                        // pages (erasure, retention).
                        "PRAGMA secure_delete = ON",
                    ] {
                        sqlx::query(pragma).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await?;
        Ledger::start(pool, Backend::Sqlite).await
    }

    /// Opens the PostgreSQL database at `url`, creating it when the role may, and
    /// migrates it. Several servers may share it: every write is a short transaction.
    pub async fn open_postgres(url: &str) -> Result<Ledger> {
        sqlx::any::install_default_drivers();
        let shown = redact_url(url);
        let exists = sqlx::Postgres::database_exists(url)
            .await
            .map_err(|e| LedgerError::Invalid(format!("cannot reach {shown}: {e}")))?;
        if !exists {
            sqlx::Postgres::create_database(url).await.map_err(|e| {
                LedgerError::Invalid(format!("{shown} does not exist and cannot be created: {e}"))
            })?;
        }
        let opts = AnyConnectOptions::from_str(url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| LedgerError::Invalid(format!("cannot connect to {shown}: {e}")))?;
        Ledger::start(pool, Backend::Postgres).await
    }

    async fn start(pool: AnyPool, backend: Backend) -> Result<Ledger> {
        sqlx::migrate!("./migrations").run(&pool).await?;
        // The first server or CLI to open the ledger makes its audit key; the others
        // read it (ON CONFLICT: two opening at once agree on one).
        let fresh = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ('audit_subject_key', $1) ON CONFLICT (key) DO NOTHING",
        )
        .bind(&fresh)
        .execute(&pool)
        .await?;
        let key: String =
            sqlx::query_scalar("SELECT value FROM settings WHERE key = 'audit_subject_key'")
                .fetch_one(&pool)
                .await?;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(writer(pool.clone(), rx));
        Ok(Ledger {
            pool,
            backend,
            writer: tx,
            audit_key: std::sync::Arc::new(key.into_bytes()),
        })
    }

    /// After deleting content (erasure, retention purge): on SQLite, moves the WAL into
    /// the database file and truncates it, so the deleted text (zeroed by
    /// `secure_delete` in the database pages) is not left in older WAL frames either.
    /// Readers in the middle of a transaction can hold it back, so it retries for a
    /// while; `Err` when it could not finish.
    /// On PostgreSQL, starts a `VACUUM` of the two tables in the background: it removes
    /// the dead rows and their index entries so their space is reused (and overwritten)
    /// sooner; it does not zero anything (docs/DATA.md says what that means).
    pub(crate) async fn scrub(&self) -> Result<()> {
        if self.backend != Backend::Sqlite {
            let pool = self.pool.clone();
            tokio::spawn(async move {
                if let Err(e) = sqlx::query("VACUUM completions, feedback")
                    .execute(&pool)
                    .await
                {
                    eprintln!("brise: VACUUM after a deletion failed: {e}");
                }
            });
            return Ok(());
        }
        for attempt in 0..20 {
            let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&self.pool)
                .await?;
            if busy == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10 << attempt.min(5))).await;
        }
        Err(LedgerError::Invalid(
            "the deletion is committed, but readers kept the WAL file from being truncated: \
             the deleted text may stay in ledger.sqlite-wal until the next checkpoint"
                .into(),
        ))
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Waits for every connection to close.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Records a completion; returns once it is committed.
    pub async fn record(&self, rec: CompletionRecord) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.writer
            .send(WriteJob {
                rec: Box::new(rec),
                done,
            })
            .await
            .map_err(|_| LedgerError::Closed)?;
        wait.await.map_err(|_| LedgerError::Closed)?
    }

    /// A completion, if it exists and (with `tenant`) belongs to that tenant.
    pub async fn get(&self, id: &str, tenant: Option<&str>) -> Result<Option<CompletionRecord>> {
        // Safe: a constant column list, no input.
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COMPLETION_COLUMNS} FROM completions WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else {
            return Ok(None);
        };
        let rec = record_from_row(&r)?;
        if tenant.is_some_and(|t| t != rec.tenant) {
            return Ok(None);
        }
        Ok(Some(rec))
    }

    /// Adds feedback after checking that its completions exist and belong to `tenant`
    /// (another tenant's completion is reported as missing, never as forbidden).
    pub async fn add_feedback(&self, mut fb: Feedback) -> Result<Feedback> {
        let mut prompts = Vec::new();
        let mut level = governance::ContentLevel::Full;
        for id in std::iter::once(&fb.completion_id).chain(fb.rejected_id.iter()) {
            match self.get(id, Some(&fb.tenant)).await? {
                None => return Err(LedgerError::NotFound(id.clone())),
                Some(r) => {
                    level = level.max(r.content_level.parse().unwrap_or(level));
                    prompts.push(r.messages);
                }
            }
        }
        // Feedback text is content too: kept at its completion's level.
        match level {
            governance::ContentLevel::Full => {}
            governance::ContentLevel::Redacted => {
                let mut n = governance::Redactions::default();
                fb.correction = fb.correction.map(|c| governance::redact(&c, &mut n));
                fb.comment = fb.comment.map(|c| governance::redact(&c, &mut n));
            }
            governance::ContentLevel::Metadata => {
                if fb.correction.is_some() || fb.comment.is_some() {
                    return Err(LedgerError::ContentNotKept(fb.completion_id.clone()));
                }
            }
        }
        // A choice between answers to different prompts is no preference at all.
        if prompts.len() == 2 && prompts[0] != prompts[1] {
            return Err(LedgerError::Invalid(
                "preferred and rejected answer different prompts".into(),
            ));
        }
        if fb.id.is_empty() {
            fb.id = format!("fb-{}", uuid::Uuid::new_v4().simple());
        }
        sqlx::query(
            "INSERT INTO feedback (id, created_at_ms, tenant, completion_id, kind, rating, correction, comment, tags, rejected_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&fb.id)
        .bind(fb.created_at_ms)
        .bind(&fb.tenant)
        .bind(&fb.completion_id)
        .bind(&fb.kind)
        .bind(fb.rating)
        .bind(&fb.correction)
        .bind(&fb.comment)
        .bind(serde_json::to_string(&fb.tags).unwrap_or_else(|_| "[]".into()))
        .bind(&fb.rejected_id)
        .execute(&self.pool)
        .await?;
        Ok(fb)
    }

    /// Feedback on a completion (as the preferred or the rejected answer), oldest first.
    pub async fn feedback_for(
        &self,
        completion_id: &str,
        tenant: Option<&str>,
    ) -> Result<Vec<Feedback>> {
        let rows = sqlx::query(
            "SELECT * FROM feedback WHERE (completion_id = $1 OR rejected_id = $1) ORDER BY created_at_ms, id",
        )
        .bind(completion_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let t: String = r.try_get("tenant")?;
            if tenant.is_some_and(|x| x != t) {
                continue;
            }
            let tags: Option<String> = r.try_get("tags")?;
            out.push(Feedback {
                id: r.try_get("id")?,
                created_at_ms: r.try_get("created_at_ms")?,
                tenant: t,
                completion_id: r.try_get("completion_id")?,
                kind: r.try_get("kind")?,
                rating: r.try_get("rating")?,
                correction: r.try_get("correction")?,
                comment: r.try_get("comment")?,
                tags: tags
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or_default(),
                rejected_id: r.try_get("rejected_id")?,
            });
        }
        Ok(out)
    }

    pub async fn stats(&self) -> Result<Stats> {
        let one = |sql: &'static str| {
            let pool = self.pool.clone();
            async move {
                let v: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await?;
                Ok::<i64, LedgerError>(v)
            }
        };
        let by_model = sqlx::query(
            "SELECT c.model AS model, COUNT(DISTINCT c.id) AS n, COUNT(f.id) AS nf \
             FROM completions c LEFT JOIN feedback f ON f.completion_id = c.id \
             GROUP BY c.model ORDER BY c.model",
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| {
            Ok(ModelStats {
                model: r.try_get("model")?,
                completions: r.try_get("n")?,
                feedback: r.try_get("nf")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        Ok(Stats {
            completions: one("SELECT COUNT(*) FROM completions").await?,
            errors: one("SELECT COUNT(*) FROM completions WHERE status = 'error'").await?,
            cancelled: one("SELECT COUNT(*) FROM completions WHERE status = 'cancelled'").await?,
            prompt_tokens: one("SELECT CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) FROM completions").await?,
            completion_tokens: one("SELECT CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) FROM completions")
                .await?,
            feedback: one("SELECT COUNT(*) FROM feedback").await?,
            thumbs_up: one("SELECT COUNT(*) FROM feedback WHERE kind = 'rating' AND (rating = 1 AND correction IS NULL)")
                .await?,
            thumbs_down: one("SELECT COUNT(*) FROM feedback WHERE kind = 'rating' AND rating = -1").await?,
            corrections: one("SELECT COUNT(*) FROM feedback WHERE correction IS NOT NULL").await?,
            preferences: one("SELECT COUNT(*) FROM feedback WHERE kind = 'preference'").await?,
            by_model,
        })
    }
}

/// Deletes completions with all feedback that refers to them (as the rated or preferred
/// answer, or as the rejected one); returns the number of feedback rows deleted. Shared
/// by erasure and retention.
pub(crate) async fn delete_completions(tx: &mut AnyConnection, ids: &[String]) -> Result<u64> {
    let mut feedback = 0;
    for id in ids {
        feedback +=
            sqlx::query("DELETE FROM feedback WHERE completion_id = $1 OR rejected_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        sqlx::query("DELETE FROM completions WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    Ok(feedback)
}

const INSERT_COMPLETION: &str = "INSERT INTO completions (id, created_at_ms, tenant, subject, model, model_sha256, adapter, endpoint, \
     params, messages, output, prompt_tokens, completion_tokens, ttft_ms, latency_ms, status, error, \
     training_consent, content_level) VALUES ";
const COMPLETION_FIELDS: usize = 19;

/// Inserts records with one statement: one round trip, which is what a networked
/// database charges for.
async fn insert(tx: &mut AnyConnection, recs: &[&CompletionRecord]) -> Result<()> {
    let mut sql = String::from(INSERT_COMPLETION);
    for i in 0..recs.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for j in 0..COMPLETION_FIELDS {
            if j > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", i * COMPLETION_FIELDS + j + 1));
        }
        sql.push(')');
    }
    // Safe: placeholders only; every value is bound.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for r in recs {
        q = q
            .bind(&r.id)
            .bind(r.created_at_ms)
            .bind(&r.tenant)
            .bind(&r.subject)
            .bind(&r.model)
            .bind(&r.model_sha256)
            .bind(&r.adapter)
            .bind(&r.endpoint)
            .bind(json_text(&r.params))
            .bind(json_text(&r.messages))
            .bind(json_text(&r.output))
            .bind(r.prompt_tokens)
            .bind(r.completion_tokens)
            .bind(r.ttft_ms)
            .bind(r.latency_ms)
            .bind(&r.status)
            .bind(&r.error)
            .bind(r.training_consent)
            .bind(&r.content_level);
    }
    q.execute(&mut *tx).await?;
    Ok(())
}

/// Group commit: takes every job waiting, writes them in one transaction, then answers
/// each. A record that fails alone (e.g. a duplicate id) is retried by itself so the
/// others still commit.
async fn writer(pool: AnyPool, mut rx: mpsc::Receiver<WriteJob>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let batch = async {
            let mut tx = pool.begin().await?;
            let recs: Vec<&CompletionRecord> = jobs.iter().map(|j| &*j.rec).collect();
            insert(&mut tx, &recs).await?;
            tx.commit().await?;
            Ok::<(), LedgerError>(())
        };
        match batch.await {
            Ok(()) => {
                for j in jobs {
                    let _ = j.done.send(Ok(()));
                }
            }
            Err(_) => {
                for j in jobs {
                    let r = async {
                        let mut c = pool.acquire().await?;
                        insert(&mut c, &[&*j.rec]).await
                    }
                    .await;
                    let _ = j.done.send(r);
                }
            }
        }
    }
}

/// Test databases: every ledger test runs on SQLite and, when `BRISE_TEST_POSTGRES` names
/// a server (`scripts/postgres.sh start` prints one), on a fresh PostgreSQL database too.
/// `BRISE_REQUIRE_POSTGRES=1` (set by scripts/test.sh) makes a missing server a failure.
#[cfg(test)]
pub(crate) mod testdb {
    use super::*;

    pub struct TestDb {
        pub spec: String,
        dir: Option<std::path::PathBuf>,
        pg: Option<(String, String)>,
    }

    pub async fn all() -> Vec<TestDb> {
        let dir = std::env::temp_dir().join(format!("brise-ledger-{}", uuid::Uuid::new_v4()));
        let mut v = vec![TestDb {
            spec: dir.join("ledger.sqlite").display().to_string(),
            dir: Some(dir),
            pg: None,
        }];
        match std::env::var("BRISE_TEST_POSTGRES") {
            Ok(base) if !base.is_empty() => {
                let base = base.trim_end_matches('/').to_string();
                let name = format!("brise_t_{}", uuid::Uuid::new_v4().simple());
                v.push(TestDb {
                    spec: format!("{base}/{name}"),
                    dir: None,
                    pg: Some((base, name)),
                });
            }
            _ => assert!(
                std::env::var("BRISE_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "BRISE_REQUIRE_POSTGRES=1 but BRISE_TEST_POSTGRES names no server"
            ),
        }
        v
    }

    impl TestDb {
        pub async fn open(&self) -> Ledger {
            Ledger::open(&self.spec).await.unwrap()
        }

        pub async fn drop_db(self, l: Ledger) {
            l.close().await;
            drop(l);
            if let Some(d) = self.dir {
                let _ = std::fs::remove_dir_all(d);
            }
            if let Some((base, name)) = self.pg {
                let mut c =
                    <sqlx::PgConnection as sqlx::Connection>::connect(&format!("{base}/postgres"))
                        .await
                        .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut c)
                .await
                .unwrap();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testdb;
    use super::*;
    use serde_json::json;

    pub(crate) fn rec(id: &str, tenant: &str) -> CompletionRecord {
        CompletionRecord {
            id: id.into(),
            created_at_ms: now_ms(),
            tenant: tenant.into(),
            subject: Some("alice".into()),
            model: "m".into(),
            model_sha256: None,
            adapter: None,
            endpoint: "/v1/chat/completions".into(),
            params: json!({"temperature": 0}),
            messages: json!([{"role": "user", "content": "hi"}]),
            output: json!([{"text": "hello", "finish_reason": "stop"}]),
            prompt_tokens: 3,
            completion_tokens: 1,
            ttft_ms: Some(5.0),
            latency_ms: 9.0,
            status: "ok".into(),
            error: None,
            training_consent: true,
            content_level: "full".into(),
        }
    }

    pub(crate) fn fb(id: &str, tenant: &str, rating: i64) -> Feedback {
        Feedback {
            id: String::new(),
            created_at_ms: now_ms(),
            tenant: tenant.into(),
            completion_id: id.into(),
            kind: "rating".into(),
            rating: Some(rating),
            correction: None,
            comment: None,
            tags: vec![],
            rejected_id: None,
        }
    }

    #[tokio::test]
    async fn records_feedback_and_tenant_isolation() {
        for db in testdb::all().await {
            let l = db.open().await;
            if l.backend() == Backend::Sqlite {
                // The settings the Any driver's URL cannot carry are in force.
                let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                    .fetch_one(&l.pool)
                    .await
                    .unwrap();
                assert_eq!(mode, "wal");
                let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
                    .fetch_one(&l.pool)
                    .await
                    .unwrap();
                assert_eq!(fk, 1);
            }
            // Concurrent records share commits and all land.
            let mut hs = Vec::new();
            for i in 0..50 {
                let l = l.clone();
                hs.push(tokio::spawn(async move {
                    l.record(rec(&format!("c{i}"), "acme")).await
                }));
            }
            for h in hs {
                h.await.unwrap().unwrap();
            }
            assert_eq!(
                l.get("c7", None).await.unwrap().unwrap(),
                rec_like(&l, "c7").await
            );
            assert!(l.get("c7", Some("other")).await.unwrap().is_none());
            // Duplicate ids fail alone.
            assert!(l.record(rec("c7", "acme")).await.is_err());
            l.record(rec("c99", "acme")).await.unwrap();

            let f = l.add_feedback(fb("c1", "acme", -1)).await.unwrap();
            assert!(f.id.starts_with("fb-"));
            assert!(matches!(
                l.add_feedback(fb("c1", "other", 1)).await,
                Err(LedgerError::NotFound(_))
            ));
            assert!(matches!(
                l.add_feedback(fb("nope", "acme", 1)).await,
                Err(LedgerError::NotFound(_))
            ));
            assert_eq!(l.feedback_for("c1", Some("acme")).await.unwrap(), vec![f]);
            assert!(
                l.feedback_for("c1", Some("other"))
                    .await
                    .unwrap()
                    .is_empty()
            );
            let s = l.stats().await.unwrap();
            assert_eq!((s.completions, s.feedback, s.thumbs_down), (51, 1, 1));
            // Reopening finds everything (and migrations are idempotent).
            drop(l);
            let l = db.open().await;
            assert_eq!(l.stats().await.unwrap().completions, 51);
            db.drop_db(l).await;
        }
    }

    #[tokio::test]
    async fn erasure_audit_chain_and_objections() {
        for db in testdb::all().await {
            let l = db.open().await;
            for (i, s) in ["alice", "alice", "bob"].iter().enumerate() {
                let mut r = rec(&format!("c{i}"), "acme");
                r.subject = Some(s.to_string());
                l.record(r).await.unwrap();
            }
            l.add_feedback(fb("c0", "acme", 1)).await.unwrap();
            // Bob's feedback pairs his answer with one of Alice's: erasing Alice removes it.
            let mut pair = fb("c2", "acme", 1);
            pair.kind = "preference".into();
            pair.rating = None;
            pair.rejected_id = Some("c1".into());
            l.add_feedback(pair).await.unwrap();
            let r = l.erase_subject("admin", None, "alice").await.unwrap();
            assert_eq!((r.completions_erased, r.feedback_erased), (2, 2));
            assert!(l.get("c0", None).await.unwrap().is_none());
            assert!(l.get("c2", None).await.unwrap().is_some());
            assert!(l.feedback_for("c2", None).await.unwrap().is_empty());
            l.object("admin", "acme", "bob").await.unwrap();
            assert!(l.has_objected("acme", Some("bob")).await.unwrap());
            assert!(!l.has_objected("other", Some("bob")).await.unwrap());
            assert_eq!(l.verify_audit().await.unwrap(), Ok(2));
            let e = l.audit_entries().await.unwrap();
            assert_eq!(e[0].action, "erase_subject");
            assert_eq!(e[1].prev_hash, e[0].hash);
            // Tampering with any entry breaks the chain at that entry.
            sqlx::query("UPDATE audit_log SET details = '{}' WHERE seq = 1")
                .execute(&l.pool)
                .await
                .unwrap();
            assert_eq!(l.verify_audit().await.unwrap(), Err(1));
            db.drop_db(l).await;
        }
    }

    /// Issue 21: after an erasure and a retention purge, the erased and expired text is
    /// in neither the database file nor its WAL, the audit log keeps a keyed hash of the
    /// subject instead of its id, and the files are readable by their owner only.
    #[tokio::test]
    async fn erased_text_leaves_the_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("brise-scrub-{}", uuid::Uuid::new_v4()));
        let path = dir.join("home").join("ledger.sqlite");
        let l = Ledger::open(path.to_str().unwrap()).await.unwrap();
        let erased = format!("ERASED-{}", uuid::Uuid::new_v4().simple());
        let expired = format!("EXPIRED-{}", uuid::Uuid::new_v4().simple());
        let subject = format!("carol-{}", uuid::Uuid::new_v4().simple());
        let day = 86_400_000;
        for i in 0..40 {
            let mut r = rec(&format!("e{i}"), "acme");
            r.subject = Some(subject.clone());
            r.messages = json!([{"role": "user", "content": format!("{erased} question {i}")}]);
            r.output = json!([{"text": format!("{erased} answer {i}"), "finish_reason": "stop"}]);
            l.record(r).await.unwrap();
            let mut r = rec(&format!("x{i}"), "acme");
            r.subject = Some("dave".into());
            r.created_at_ms = now_ms() - 10 * day;
            r.messages = json!([{"role": "user", "content": format!("{expired} question {i}")}]);
            l.record(r).await.unwrap();
            l.record(rec(&format!("k{i}"), "acme")).await.unwrap();
        }
        let mut f = fb("e1", "acme", -1);
        f.correction = Some(format!("{erased} correction"));
        l.add_feedback(f).await.unwrap();
        l.export_subject("admin", Some("acme"), &subject, &mut Vec::new())
            .await
            .unwrap();
        let files = || -> Vec<u8> {
            let mut all = std::fs::read(&path).unwrap();
            if let Ok(w) = std::fs::read(path.with_extension("sqlite-wal")) {
                all.extend(w);
            }
            all
        };
        let has =
            |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
        // The check can fail: the text is there before.
        assert!(has(&files(), &erased) && has(&files(), &expired));
        l.erase_subject("admin", None, &subject).await.unwrap();
        l.set_retention(
            "admin",
            crate::retention::Retention {
                records_days: Some(7),
                feedback_days: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(
            l.purge("retention", now_ms()).await.unwrap().completions,
            40
        );
        let bytes = files();
        assert!(!has(&bytes, &erased), "erased text left in the files");
        assert!(!has(&bytes, &expired), "expired text left in the files");
        assert!(
            !has(&bytes, &subject),
            "the erased subject's id left in the files"
        );
        let e = l.audit_entries().await.unwrap();
        let erase = e.iter().find(|e| e.action == "erase_subject").unwrap();
        assert_eq!(
            erase.details["subject_hmac"],
            json!(l.subject_ref(&subject))
        );
        assert!(erase.details.get("subject").is_none());
        assert_ne!(l.subject_ref(&subject), l.subject_ref("dave"));
        assert_eq!(l.verify_audit().await.unwrap(), Ok(e.len()));
        // Owner-only files, and the directory it made.
        for p in [
            path.clone(),
            path.with_extension("sqlite-wal"),
            path.with_extension("sqlite-shm"),
        ] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        let mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let secure: i64 = sqlx::query_scalar("PRAGMA secure_delete")
            .fetch_one(&l.pool)
            .await
            .unwrap();
        assert_eq!(secure, 1);
        l.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        let mac =
            crate::governance::hmac_sha256_for_tests(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let long = crate::governance::hmac_sha256_for_tests(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        let hex: String = long.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[tokio::test]
    async fn retention_purges_all_but_held() {
        for db in testdb::all().await {
            use crate::retention::Retention;
            let l = db.open().await;
            let day = 86_400_000;
            let now = now_ms();
            for (id, subject, age) in [
                ("old-a", "alice", 10),
                ("old-b", "bob", 10),
                ("new-a", "alice", 1),
            ] {
                let mut r = rec(id, "acme");
                r.subject = Some(subject.into());
                r.created_at_ms = now - age * day;
                l.record(r).await.unwrap();
            }
            let mut f = fb("new-a", "acme", 1);
            f.created_at_ms = now - 5 * day;
            l.add_feedback(f).await.unwrap();
            // No windows: nothing goes.
            assert_eq!(l.purge("t", now).await.unwrap(), Default::default());
            l.set_retention(
                "admin",
                Retention {
                    records_days: Some(7),
                    feedback_days: Some(3),
                },
            )
            .await
            .unwrap();
            l.hold("admin", "acme", "bob", true).await.unwrap();
            let rep = l.purge("retention", now).await.unwrap();
            assert_eq!((rep.completions, rep.feedback, rep.held), (1, 1, 1));
            assert!(l.get("old-a", None).await.unwrap().is_none());
            assert!(l.get("old-b", None).await.unwrap().is_some(), "held");
            assert!(l.get("new-a", None).await.unwrap().is_some());
            assert!(l.feedback_for("new-a", None).await.unwrap().is_empty());
            l.hold("admin", "acme", "bob", false).await.unwrap();
            assert_eq!(l.purge("retention", now).await.unwrap().completions, 1);
            let actions: Vec<String> = l
                .audit_entries()
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.action)
                .collect();
            assert_eq!(
                actions,
                [
                    "set_retention",
                    "legal_hold",
                    "purge",
                    "legal_hold_released",
                    "purge"
                ]
            );
            assert!(
                l.set_retention(
                    "a",
                    Retention {
                        records_days: Some(0),
                        feedback_days: None
                    }
                )
                .await
                .is_err()
            );
            db.drop_db(l).await;
        }
    }

    #[tokio::test]
    async fn tenant_policy_content_levels_and_audited_exports() {
        use crate::export::{ExportFilter, Format};
        for db in testdb::all().await {
            let l = db.open().await;
            use crate::governance::ContentLevel;
            let p = l.tenant_policy("acme").await.unwrap();
            assert!(p.training_allow && p.content_level == ContentLevel::Full);
            l.set_tenant_policy("admin", "acme", Some(false), None)
                .await
                .unwrap();
            let p = l
                .set_tenant_policy("admin", "acme", None, Some(ContentLevel::Redacted))
                .await
                .unwrap();
            // Each field keeps its value when the other changes.
            assert!(!p.training_allow && p.content_level == ContentLevel::Redacted);
            assert_eq!(l.tenant_policy("acme").await.unwrap(), p);
            assert!(l.tenant_policy("other").await.unwrap().training_allow);
            assert!(
                l.set_tenant_policy("a", "", Some(false), None)
                    .await
                    .is_err()
            );
            // Feedback text is kept at its completion's content level.
            let mut r = rec("m1", "acme");
            r.content_level = "metadata".into();
            l.record(r).await.unwrap();
            let mut f = fb("m1", "acme", -1);
            f.correction = Some("Better.".into());
            assert!(matches!(
                l.add_feedback(f).await,
                Err(LedgerError::ContentNotKept(_))
            ));
            l.add_feedback(fb("m1", "acme", -1)).await.unwrap();
            let mut r = rec("r1", "acme");
            r.content_level = "redacted".into();
            l.record(r).await.unwrap();
            let mut f = fb("r1", "acme", -1);
            f.correction = Some("Mail bob@example.com.".into());
            let got = l.add_feedback(f).await.unwrap();
            assert_eq!(got.correction.as_deref(), Some("Mail [EMAIL]."));

            l.record(rec("c1", "acme")).await.unwrap();
            let mut f = fb("c1", "acme", 1);
            f.correction = Some("Better.".into());
            l.add_feedback(f).await.unwrap();
            let mut out = Vec::new();
            let filter = ExportFilter {
                since_ms: None,
                model: Some("m".into()),
            };
            let rep = l
                .export("tester", Format::TrlSft, &filter, &mut out)
                .await
                .unwrap();
            // The corrections of c1 and r1; m1's thumbs down has no SFT row.
            assert_eq!((rep.rows, rep.not_applicable), (2, 1));
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("Mail [EMAIL].") && !text.contains("bob@"));
            let e = l.audit_entries().await.unwrap();
            let actions: Vec<&str> = e.iter().map(|e| e.action.as_str()).collect();
            assert_eq!(
                actions,
                ["tenant_policy", "tenant_policy", "training_export"]
            );
            let last = e.last().unwrap();
            assert_eq!(last.actor, "tester");
            let d = &last.details;
            assert_eq!(
                (&d["format"], &d["model"], &d["report"]["rows"]),
                (&json!("trl-sft"), &json!("m"), &json!(2))
            );
            assert_eq!(l.verify_audit().await.unwrap(), Ok(3));
            db.drop_db(l).await;
        }
    }

    #[tokio::test]
    async fn training_rows_carry_ids_and_equal_the_export() {
        use crate::export::{ExportFilter, Format};
        for db in testdb::all().await {
            let l = db.open().await;
            for (id, subject) in [("a", "alice"), ("b", "bob"), ("c", "carol")] {
                let mut r = rec(id, "acme");
                r.subject = Some(subject.into());
                l.record(r).await.unwrap();
            }
            let mut f = fb("a", "acme", -1);
            f.correction = Some("Better.".into());
            let corr = l.add_feedback(f).await.unwrap();
            let mut pair = fb("b", "acme", 1);
            // Rows come in feedback order.
            pair.created_at_ms = corr.created_at_ms + 1;
            pair.kind = "preference".into();
            pair.rating = None;
            pair.rejected_id = Some("c".into());
            let pair = l.add_feedback(pair).await.unwrap();
            let filter = ExportFilter::default();
            let formats = [Format::TrlSft, Format::TrlDpo, Format::TrlKto];
            let (rows, rep) = l.training_rows("t", &formats, &filter).await.unwrap();
            // The correction: SFT, DPO and a KTO thumbs down; the choice: DPO.
            assert_eq!((rep.rows, rep.feedback_seen), (4, 2));
            let ids: Vec<(Format, &str, Vec<&str>, Option<&str>)> = rows
                .iter()
                .map(|r| {
                    (
                        r.format,
                        r.feedback_id.as_str(),
                        r.record_ids.iter().map(String::as_str).collect(),
                        r.subject.as_deref(),
                    )
                })
                .collect();
            assert_eq!(
                ids,
                [
                    (Format::TrlSft, corr.id.as_str(), vec!["a"], Some("alice")),
                    (Format::TrlDpo, corr.id.as_str(), vec!["a"], Some("alice")),
                    (Format::TrlKto, corr.id.as_str(), vec!["a"], Some("alice")),
                    (
                        Format::TrlDpo,
                        pair.id.as_str(),
                        vec!["b", "c"],
                        Some("bob")
                    ),
                ]
            );
            // The rows are the export's, byte for byte.
            let mut out = Vec::new();
            l.export("t", Format::TrlDpo, &filter, &mut out)
                .await
                .unwrap();
            let dpo: String = rows
                .iter()
                .filter(|r| r.format == Format::TrlDpo)
                .map(|r| format!("{}\n", r.row))
                .collect();
            assert_eq!(String::from_utf8(out).unwrap(), dpo);
            let e = l.audit_entries().await.unwrap();
            assert_eq!(
                e[0].details["formats"],
                json!(["trl-sft", "trl-dpo", "trl-kto"])
            );
            db.drop_db(l).await;
        }
    }

    async fn rec_like(l: &Ledger, id: &str) -> CompletionRecord {
        let got = l.get(id, None).await.unwrap().unwrap();
        CompletionRecord {
            created_at_ms: got.created_at_ms,
            ..rec(id, "acme")
        }
    }
}
