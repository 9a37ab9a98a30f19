//! Usage over time and feedback by model version, for the console's dashboard: one
//! tenant's requests, tokens and latency per time bucket, and the feedback on its
//! answers grouped by model and adapter.
//!
//! Portable SQL (SQLite and PostgreSQL): buckets are integer arithmetic on the BIGINT
//! millisecond column (`created_at_ms / $1 * $1`, integer division on both), sums are
//! cast to BIGINT, and grouping uses the column list, never a date function.

use crate::{Ledger, LedgerError, Result};
use serde::Serialize;
use sqlx::Row;

/// Buckets in one answer at most: enough for a minute-by-minute day.
pub const MAX_BUCKETS: i64 = 1500;

/// One time bucket `[start_ms, start_ms + bucket_ms)`. Empty buckets are present with
/// zeros, so a series has one entry per bucket of the window.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct UsageBucket {
    pub start_ms: i64,
    pub requests: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Mean and maximum end-to-end latency of the bucket's requests (null when empty).
    pub latency_ms_avg: Option<f64>,
    pub latency_ms_max: Option<f64>,
    /// Mean time to first token (null when empty or not measured).
    pub ttft_ms_avg: Option<f64>,
}

/// The feedback on one model version's answers of the window. Each feedback item
/// counts once per version, whenever it was given.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct VersionFeedback {
    pub model: String,
    /// The adapter version; `None` is the base model.
    pub adapter: Option<String>,
    pub completions: i64,
    /// Completions with at least one feedback item.
    pub with_feedback: i64,
    /// Thumbs up, or 4–5 stars.
    pub good: i64,
    /// Thumbs down, or 2 stars.
    pub bad: i64,
    pub corrections: i64,
    /// Pairwise choices: this version's answer preferred, rejected, or judged a tie.
    pub wins: i64,
    pub losses: i64,
    pub ties: i64,
    /// with_feedback ÷ completions (null without completions).
    pub feedback_rate: Option<f64>,
    /// good ÷ (good + bad) (null without ratings).
    pub good_rate: Option<f64>,
    /// (wins + ties/2) ÷ (wins + losses + ties) (null without choices).
    pub win_rate: Option<f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Usage {
    pub tenant: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub bucket_ms: i64,
    pub series: Vec<UsageBucket>,
    pub feedback: Vec<VersionFeedback>,
}

fn ratio(num: f64, den: i64) -> Option<f64> {
    (den > 0).then(|| num / den as f64)
}

impl Ledger {
    /// `tenant`'s usage in `[from_ms, to_ms)`, in buckets of `bucket_ms` aligned to
    /// multiples of `bucket_ms` since the epoch (the first bucket may start before
    /// `from_ms`; it holds only records from `from_ms` on).
    pub async fn usage(
        &self,
        tenant: &str,
        from_ms: i64,
        to_ms: i64,
        bucket_ms: i64,
    ) -> Result<Usage> {
        if bucket_ms <= 0 {
            return Err(LedgerError::Invalid("the bucket must be positive".into()));
        }
        if to_ms <= from_ms {
            return Err(LedgerError::Invalid("the window is empty".into()));
        }
        let first = from_ms.div_euclid(bucket_ms) * bucket_ms;
        let n = (to_ms - 1 - first).div_euclid(bucket_ms) + 1;
        if n > MAX_BUCKETS {
            return Err(LedgerError::Invalid(format!(
                "{n} buckets: at most {MAX_BUCKETS} per query (use a larger bucket)"
            )));
        }
        let rows = sqlx::query(
            "SELECT (created_at_ms / $1) * $1 AS bucket, COUNT(*) AS requests, \
             COUNT(CASE WHEN status = 'error' THEN 1 END) AS errors, \
             CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS prompt_tokens, \
             CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS completion_tokens, \
             AVG(latency_ms) AS latency_avg, MAX(latency_ms) AS latency_max, AVG(ttft_ms) AS ttft_avg \
             FROM completions WHERE tenant = $2 AND created_at_ms >= $3 AND created_at_ms < $4 \
             GROUP BY 1 ORDER BY 1",
        )
        .bind(bucket_ms)
        .bind(tenant)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut series: Vec<UsageBucket> = (0..n)
            .map(|i| UsageBucket {
                start_ms: first + i * bucket_ms,
                ..Default::default()
            })
            .collect();
        for r in rows {
            let start: i64 = r.try_get("bucket")?;
            let i = (start - first) / bucket_ms;
            let Some(b) = usize::try_from(i).ok().and_then(|i| series.get_mut(i)) else {
                continue;
            };
            b.requests = r.try_get("requests")?;
            b.errors = r.try_get("errors")?;
            b.prompt_tokens = r.try_get("prompt_tokens")?;
            b.completion_tokens = r.try_get("completion_tokens")?;
            b.latency_ms_avg = r.try_get("latency_avg")?;
            b.latency_ms_max = r.try_get("latency_max")?;
            b.ttft_ms_avg = r.try_get("ttft_avg")?;
        }
        let feedback = self.feedback_by_version(tenant, from_ms, to_ms).await?;
        Ok(Usage {
            tenant: tenant.to_string(),
            from_ms,
            to_ms,
            bucket_ms,
            series,
            feedback,
        })
    }

    /// Feedback items given since `since_ms` (every tenant), by the model of the
    /// completion they are about: which models have new feedback to learn from.
    pub async fn feedback_counts(&self, since_ms: i64) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT c.model AS model, COUNT(f.id) AS n FROM feedback f \
             JOIN completions c ON c.id = f.completion_id \
             WHERE f.created_at_ms >= $1 GROUP BY c.model ORDER BY c.model",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get("model")?, r.try_get("n")?)))
            .collect()
    }

    /// Feedback on `tenant`'s completions of `[from_ms, to_ms)`, by model and adapter.
    /// A pairwise choice or a tie involves two completions, so it joins on either side.
    pub async fn feedback_by_version(
        &self,
        tenant: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<VersionFeedback>> {
        // The base model (no adapter) first on both backends: they sort NULLs apart.
        let rows = sqlx::query(
            "SELECT c.model AS model, c.adapter AS adapter, COUNT(DISTINCT c.id) AS completions, \
             COUNT(DISTINCT CASE WHEN f.id IS NOT NULL THEN c.id END) AS with_feedback, \
             COUNT(DISTINCT CASE WHEN f.kind = 'rating' AND f.rating IN (1, 4, 5) THEN f.id END) AS good, \
             COUNT(DISTINCT CASE WHEN f.kind = 'rating' AND f.rating IN (-1, 2) THEN f.id END) AS bad, \
             COUNT(DISTINCT CASE WHEN f.correction IS NOT NULL THEN f.id END) AS corrections, \
             COUNT(DISTINCT CASE WHEN f.kind = 'preference' AND f.completion_id = c.id THEN f.id END) AS wins, \
             COUNT(DISTINCT CASE WHEN f.kind = 'preference' AND f.rejected_id = c.id THEN f.id END) AS losses, \
             COUNT(DISTINCT CASE WHEN f.kind = 'tie' THEN f.id END) AS ties \
             FROM completions c LEFT JOIN feedback f \
             ON (f.completion_id = c.id OR f.rejected_id = c.id) AND f.tenant = c.tenant \
             WHERE c.tenant = $1 AND c.created_at_ms >= $2 AND c.created_at_ms < $3 \
             GROUP BY c.model, c.adapter \
             ORDER BY c.model, CASE WHEN c.adapter IS NULL THEN 0 ELSE 1 END, c.adapter",
        )
        .bind(tenant)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let mut v = VersionFeedback {
                    model: r.try_get("model")?,
                    adapter: r.try_get("adapter")?,
                    completions: r.try_get("completions")?,
                    with_feedback: r.try_get("with_feedback")?,
                    good: r.try_get("good")?,
                    bad: r.try_get("bad")?,
                    corrections: r.try_get("corrections")?,
                    wins: r.try_get("wins")?,
                    losses: r.try_get("losses")?,
                    ties: r.try_get("ties")?,
                    ..Default::default()
                };
                v.feedback_rate = ratio(v.with_feedback as f64, v.completions);
                v.good_rate = ratio(v.good as f64, v.good + v.bad);
                v.win_rate = ratio(
                    v.wins as f64 + v.ties as f64 / 2.0,
                    v.wins + v.losses + v.ties,
                );
                Ok(v)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::{CompletionRecord, Feedback};
    use serde_json::json;

    fn rec(id: &str, tenant: &str, at: i64, adapter: Option<&str>) -> CompletionRecord {
        CompletionRecord {
            id: id.into(),
            created_at_ms: at,
            tenant: tenant.into(),
            subject: None,
            model: "m".into(),
            model_sha256: None,
            adapter: adapter.map(str::to_string),
            endpoint: "/v1/chat/completions".into(),
            params: json!({}),
            messages: json!([{"role": "user", "content": "hi"}]),
            output: json!([{"text": "hello", "finish_reason": "stop"}]),
            prompt_tokens: 10,
            completion_tokens: 5,
            ttft_ms: Some(2.0),
            latency_ms: 100.0,
            status: "ok".into(),
            error: None,
            training_consent: true,
            content_level: "full".into(),
        }
    }

    fn fb(
        tenant: &str,
        id: &str,
        kind: &str,
        rating: Option<i64>,
        other: Option<&str>,
    ) -> Feedback {
        Feedback {
            id: String::new(),
            created_at_ms: 0,
            tenant: tenant.into(),
            completion_id: id.into(),
            kind: kind.into(),
            rating,
            correction: (rating == Some(-1)).then(|| "better".to_string()),
            comment: None,
            tags: vec![],
            rejected_id: other.map(str::to_string),
        }
    }

    #[tokio::test]
    async fn buckets_versions_and_tenants() {
        for db in crate::testdb::all().await {
            let l = db.open().await;
            let min = 60_000;
            let t0 = 1_000 * min; // a bucket boundary
            for (id, at, adapter) in [
                ("a", t0 + 5, None),
                ("b", t0 + min - 1, None),
                ("c", t0 + 2 * min, Some("v1")),
                ("d", t0 + 2 * min + 7, None),
                ("late", t0 + 3 * min, None), // at to_ms: outside
            ] {
                l.record(rec(id, "acme", at, adapter)).await.unwrap();
            }
            let mut slow = rec("err", "acme", t0 + 30, None);
            slow.status = "error".into();
            slow.latency_ms = 400.0;
            slow.ttft_ms = None;
            l.record(slow).await.unwrap();
            l.record(rec("other", "globex", t0 + 10, None))
                .await
                .unwrap();
            l.add_feedback(fb("acme", "a", "rating", Some(1), None))
                .await
                .unwrap();
            l.add_feedback(fb("acme", "b", "rating", Some(-1), None))
                .await
                .unwrap();
            l.add_feedback(fb("acme", "c", "preference", None, Some("d")))
                .await
                .unwrap();
            l.add_feedback(fb("acme", "a", "tie", None, Some("d")))
                .await
                .unwrap();
            l.add_feedback(fb("globex", "other", "rating", Some(1), None))
                .await
                .unwrap();

            // Every tenant's feedback counts for its completion's model.
            assert_eq!(l.feedback_counts(0).await.unwrap(), [("m".to_string(), 5)]);
            let later = crate::now_ms() + 60_000;
            assert!(l.feedback_counts(later).await.unwrap().is_empty());

            let u = l.usage("acme", t0, t0 + 3 * min, min).await.unwrap();
            assert_eq!(u.series.len(), 3);
            let s: Vec<_> = u
                .series
                .iter()
                .map(|b| (b.start_ms - t0, b.requests, b.errors, b.prompt_tokens))
                .collect();
            assert_eq!(s, [(0, 3, 1, 30), (min, 0, 0, 0), (2 * min, 2, 0, 20)]);
            assert_eq!(u.series[0].latency_ms_avg, Some(200.0));
            assert_eq!(u.series[0].latency_ms_max, Some(400.0));
            assert_eq!(u.series[0].ttft_ms_avg, Some(2.0));
            assert_eq!(u.series[1].latency_ms_avg, None);

            let base = &u.feedback[0];
            assert_eq!(base.adapter, None);
            assert_eq!(
                (
                    base.completions,
                    base.with_feedback,
                    base.good,
                    base.bad,
                    base.corrections
                ),
                (4, 3, 1, 1, 1)
            );
            assert_eq!((base.wins, base.losses, base.ties), (0, 1, 1));
            assert_eq!(base.feedback_rate, Some(0.75));
            assert_eq!(base.good_rate, Some(0.5));
            assert_eq!(base.win_rate, Some(0.25));
            let v1 = &u.feedback[1];
            assert_eq!(v1.adapter.as_deref(), Some("v1"));
            assert_eq!((v1.completions, v1.wins, v1.losses, v1.ties), (1, 1, 0, 0));
            assert_eq!((v1.good_rate, v1.win_rate), (None, Some(1.0)));

            // Another tenant sees only its own.
            let g = l.usage("globex", t0, t0 + 3 * min, min).await.unwrap();
            assert_eq!(g.series.iter().map(|b| b.requests).sum::<i64>(), 1);
            assert_eq!((g.feedback.len(), g.feedback[0].good), (1, 1));
            assert!(
                l.usage("nobody", t0, t0 + min, min)
                    .await
                    .unwrap()
                    .feedback
                    .is_empty()
            );

            // Unaligned windows: the first bucket starts at the boundary before from_ms.
            let u = l
                .usage("acme", t0 + 10, t0 + 2 * min + 1, min)
                .await
                .unwrap();
            assert_eq!(u.series[0].start_ms, t0);
            assert_eq!(
                u.series.iter().map(|b| b.requests).collect::<Vec<_>>(),
                [2, 0, 1]
            );
            assert!(l.usage("acme", t0, t0, min).await.is_err());
            assert!(l.usage("acme", t0, t0 + min, 0).await.is_err());
            assert!(l.usage("acme", 0, t0, 1).await.is_err(), "too many buckets");
            db.drop_db(l).await;
        }
    }
}
