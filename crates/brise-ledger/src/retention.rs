//! Retention windows per kind of data (completion records, feedback), automatic purge,
//! and legal holds that keep a subject's data past its window. Every change and every
//! purge that deletes something is audited.

use crate::{Ledger, Result, now_ms};
use serde::Serialize;
use serde_json::json;

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Retention {
    /// Days completion records are kept (`None`: until erased).
    pub records_days: Option<i64>,
    /// Days feedback is kept.
    pub feedback_days: Option<i64>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PurgeReport {
    pub completions: u64,
    pub feedback: u64,
    /// Records past their window kept for a legal hold.
    pub held: u64,
}

const DAY_MS: i64 = 86_400_000;
/// The longest window accepted (100 years), far from any overflow.
pub const MAX_DAYS: i64 = 36_500;

impl Ledger {
    pub async fn retention(&self) -> Result<Retention> {
        let get = |k: &'static str| async move {
            let v: Option<String> = sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                .bind(k)
                .fetch_optional(&self.pool)
                .await?;
            Ok::<_, crate::LedgerError>(v.and_then(|v| v.parse().ok()))
        };
        Ok(Retention {
            records_days: get("retention.records_days").await?,
            feedback_days: get("retention.feedback_days").await?,
        })
    }

    /// Sets the retention windows (audited).
    pub async fn set_retention(&self, actor: &str, r: Retention) -> Result<()> {
        for (k, v) in [
            ("retention.records_days", r.records_days),
            ("retention.feedback_days", r.feedback_days),
        ] {
            if v.is_some_and(|d| !(1..=MAX_DAYS).contains(&d)) {
                return Err(crate::LedgerError::Invalid(format!(
                    "{k} must be between 1 and {MAX_DAYS} days"
                )));
            }
            sqlx::query("DELETE FROM settings WHERE key = $1")
                .bind(k)
                .execute(&self.pool)
                .await?;
            if let Some(d) = v {
                sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2)")
                    .bind(k)
                    .bind(d.to_string())
                    .execute(&self.pool)
                    .await?;
            }
        }
        self.audit(actor, "set_retention", json!(r)).await?;
        Ok(())
    }

    /// Puts a legal hold on a subject's data (or lifts it), audited.
    pub async fn hold(&self, actor: &str, tenant: &str, subject: &str, on: bool) -> Result<()> {
        if on {
            sqlx::query(
                "INSERT INTO legal_holds (tenant, subject, at_ms) VALUES ($1, $2, $3) ON CONFLICT (tenant, subject) DO NOTHING",
            )
            .bind(tenant)
            .bind(subject)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        } else {
            sqlx::query("DELETE FROM legal_holds WHERE tenant = $1 AND subject = $2")
                .bind(tenant)
                .bind(subject)
                .execute(&self.pool)
                .await?;
        }
        self.audit(
            actor,
            if on {
                "legal_hold"
            } else {
                "legal_hold_released"
            },
            json!({"tenant": tenant, "subject_hmac": self.subject_ref(subject)}),
        )
        .await?;
        Ok(())
    }

    /// Deletes what is past its retention window at `now_ms`, except data under a legal
    /// hold. Audited when it deletes anything.
    pub async fn purge(&self, actor: &str, now: i64) -> Result<PurgeReport> {
        let r = self.retention().await?;
        let mut rep = PurgeReport::default();
        // A hold with tenant '*' covers the subject in every tenant.
        let held = "EXISTS (SELECT 1 FROM legal_holds h WHERE (h.tenant = c.tenant OR h.tenant = '*') AND h.subject = c.subject)";
        if let Some(d) = r.feedback_days {
            let sql = format!(
                "DELETE FROM feedback WHERE created_at_ms < $1 AND NOT EXISTS (SELECT 1 FROM completions c WHERE c.id = feedback.completion_id AND {held})"
            );
            rep.feedback = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(now.saturating_sub(d.min(MAX_DAYS) * DAY_MS))
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        if let Some(d) = r.records_days {
            let cutoff = now.saturating_sub(d.min(MAX_DAYS) * DAY_MS);
            let mut tx = self.pool.begin().await?;
            let sel =
                format!("SELECT c.id FROM completions c WHERE c.created_at_ms < $1 AND NOT {held}");
            let ids: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sel))
                .bind(cutoff)
                .fetch_all(&mut *tx)
                .await?;
            let cnt =
                format!("SELECT COUNT(*) FROM completions c WHERE c.created_at_ms < $1 AND {held}");
            let n_held: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(cnt))
                .bind(cutoff)
                .fetch_one(&mut *tx)
                .await?;
            rep.held = n_held as u64;
            rep.feedback += crate::delete_completions(&mut tx, &ids).await?;
            tx.commit().await?;
            rep.completions = ids.len() as u64;
        }
        if rep.completions > 0 || rep.feedback > 0 {
            self.scrub().await?;
            self.audit(actor, "purge", json!({"retention": r, "report": rep}))
                .await?;
        }
        Ok(rep)
    }
}
