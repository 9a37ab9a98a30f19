//! GDPR and AI Act duties over the ledger: erasure by subject (with a receipt), subject
//! export, standing objections to training use, PII redaction for training exports, and
//! an append-only, hash-chained audit log of every admin action.

use crate::{Ledger, LedgerError, Result, now_ms};
use regex::Regex;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::sync::OnceLock;

/// The proof of an erasure.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ErasureReceipt {
    pub receipt_id: String,
    pub at_ms: i64,
    pub tenant: Option<String>,
    pub subject: String,
    pub completions_erased: u64,
    pub feedback_erased: u64,
    /// Sequence number of the audit entry that records it.
    pub audit_seq: i64,
    /// The adapter versions trained on any of the erased records or feedback items,
    /// now marked tainted (a `promoted` one is serving: roll it back or promote a clean
    /// version).
    pub adapters_tainted: Vec<crate::adapters::TaintedVersion>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AuditEntry {
    pub seq: i64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub details: Value,
    pub prev_hash: String,
    pub hash: String,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn entry_hash(
    prev: &str,
    seq: i64,
    at_ms: i64,
    actor: &str,
    action: &str,
    details: &str,
) -> String {
    let mut h = Sha256::new();
    for part in [
        prev,
        &seq.to_string(),
        &at_ms.to_string(),
        actor,
        action,
        details,
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |x: u8| k.map(|b| b ^ x);
    let mut inner = Sha256::new();
    inner.update(pad(0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    let mut out = [0u8; 32];
    out.copy_from_slice(&outer.finalize());
    out
}

#[cfg(test)]
pub(crate) fn hmac_sha256_for_tests(key: &[u8], msg: &[u8]) -> [u8; 32] {
    hmac_sha256(key, msg)
}

impl Ledger {
    /// What the audit log keeps of a subject: an HMAC-SHA256 of its id under the
    /// ledger's own secret, so the log never names a person (an erased one included),
    /// yet whoever holds the ledger can check whether an entry is about a given id, and
    /// entries about one subject match each other.
    pub fn subject_ref(&self, subject: &str) -> String {
        let mac = hmac_sha256(&self.audit_key, subject.as_bytes());
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        format!("hmac-sha256:{hex}")
    }

    /// Appends an audit entry chained to the previous one; returns its sequence number.
    pub async fn audit(&self, actor: &str, action: &str, details: Value) -> Result<i64> {
        // Another write may commit between reading the chain's end and appending to it
        // (SQLite: a stale snapshot; PostgreSQL: the same seq twice): retry on a fresh read.
        let mut last_err = None;
        for attempt in 0..5 {
            match self.audit_once(actor, action, &details).await {
                Ok(seq) => return Ok(seq),
                Err(e) => {
                    last_err = Some(e);
                    tokio::time::sleep(std::time::Duration::from_millis(5 << attempt)).await;
                }
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    async fn audit_once(&self, actor: &str, action: &str, details: &Value) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let last: Option<(i64, String)> =
            sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
        let (seq, prev) = match last {
            Some((s, h)) => (s + 1, h),
            None => (1, GENESIS.to_string()),
        };
        let at = now_ms();
        let d = details.to_string();
        let hash = entry_hash(&prev, seq, at, actor, action, &d);
        sqlx::query(
            "INSERT INTO audit_log (seq, at_ms, actor, action, details, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(seq)
        .bind(at)
        .bind(actor)
        .bind(action)
        .bind(&d)
        .bind(&prev)
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(seq)
    }

    pub async fn audit_entries(&self) -> Result<Vec<AuditEntry>> {
        let rows: Vec<(i64, i64, String, String, String, String, String)> = sqlx::query_as(
            "SELECT seq, at_ms, actor, action, details, prev_hash, hash FROM audit_log ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(seq, at_ms, actor, action, details, prev_hash, hash)| AuditEntry {
                    seq,
                    at_ms,
                    actor,
                    action,
                    details: serde_json::from_str(&details).unwrap_or(Value::Null),
                    prev_hash,
                    hash,
                },
            )
            .collect())
    }

    /// Checks the chain: every entry's hash, and its link to the one before. Returns the
    /// number of entries, or the first sequence number where the chain breaks.
    pub async fn verify_audit(&self) -> Result<std::result::Result<usize, i64>> {
        let rows: Vec<(i64, i64, String, String, String, String, String)> = sqlx::query_as(
            "SELECT seq, at_ms, actor, action, details, prev_hash, hash FROM audit_log ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut prev = GENESIS.to_string();
        for (i, (seq, at, actor, action, details, prev_hash, hash)) in rows.iter().enumerate() {
            if *seq != i as i64 + 1
                || *prev_hash != prev
                || entry_hash(prev_hash, *seq, *at, actor, action, details) != *hash
            {
                return Ok(Err(*seq));
            }
            prev = hash.clone();
        }
        Ok(Ok(rows.len()))
    }

    /// Erases a subject's completions and all feedback on them (in any tenant, or in
    /// one), audits it, and returns the receipt.
    pub async fn erase_subject(
        &self,
        actor: &str,
        tenant: Option<&str>,
        subject: &str,
    ) -> Result<ErasureReceipt> {
        if subject.is_empty() {
            return Err(LedgerError::Invalid("the subject is empty".into()));
        }
        let mut tx = self.pool.begin().await?;
        let ids: Vec<String> = match tenant {
            Some(t) => {
                sqlx::query_scalar("SELECT id FROM completions WHERE subject = $1 AND tenant = $2")
                    .bind(subject)
                    .bind(t)
                    .fetch_all(&mut *tx)
                    .await?
            }
            None => {
                sqlx::query_scalar("SELECT id FROM completions WHERE subject = $1")
                    .bind(subject)
                    .fetch_all(&mut *tx)
                    .await?
            }
        };
        // Every feedback item that goes with them (on either side of a pair), for the
        // adapter versions trained on it.
        let mut feedback_ids: Vec<String> = Vec::new();
        for id in &ids {
            let f: Vec<String> = sqlx::query_scalar(
                "SELECT id FROM feedback WHERE completion_id = $1 OR rejected_id = $1",
            )
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
            feedback_ids.extend(f);
        }
        feedback_ids.sort();
        feedback_ids.dedup();
        let feedback = crate::delete_completions(&mut tx, &ids).await?;
        tx.commit().await?;
        self.scrub().await?;
        let receipt_id = format!("erasure-{}", uuid::Uuid::new_v4().simple());
        // After the commit: a version registered meanwhile either is seen here or finds
        // its ids gone when it checks them (`register_adapter`).
        let tainted = self
            .taint_trained_on(
                &ids,
                &feedback_ids,
                &format!("trained on data erased by {receipt_id}"),
            )
            .await?;
        let seq = self
            .audit(
                actor,
                "erase_subject",
                json!({"receipt_id": receipt_id, "tenant": tenant, "subject_hmac": self.subject_ref(subject),
                       "completions_erased": ids.len(), "feedback_erased": feedback,
                       "adapters_tainted": tainted}),
            )
            .await?;
        Ok(ErasureReceipt {
            receipt_id,
            at_ms: now_ms(),
            tenant: tenant.map(str::to_string),
            subject: subject.into(),
            completions_erased: ids.len() as u64,
            feedback_erased: feedback,
            audit_seq: seq,
            adapters_tainted: tainted,
        })
    }

    /// Writes every record of a subject, each with its feedback, as JSONL; audited.
    pub async fn export_subject(
        &self,
        actor: &str,
        tenant: Option<&str>,
        subject: &str,
        out: &mut (dyn Write + Send),
    ) -> Result<usize> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM completions WHERE subject = $1 ORDER BY created_at_ms, id",
        )
        .bind(subject)
        .fetch_all(&self.pool)
        .await?;
        let mut n = 0;
        for id in ids {
            let Some(rec) = self.get(&id, tenant).await? else {
                continue;
            };
            let fb = self.feedback_for(&id, tenant).await?;
            let mut v = serde_json::to_value(&rec).unwrap_or(Value::Null);
            v["feedback"] = serde_json::to_value(&fb).unwrap_or(Value::Null);
            writeln!(out, "{v}")
                .map_err(|e| LedgerError::Invalid(format!("writing the export: {e}")))?;
            n += 1;
        }
        self.audit(
            actor,
            "export_subject",
            json!({"tenant": tenant, "subject_hmac": self.subject_ref(subject), "records": n}),
        )
        .await?;
        Ok(n)
    }

    /// Records a standing objection to training use by a subject (audited).
    pub async fn object(&self, actor: &str, tenant: &str, subject: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO objections (tenant, subject, at_ms) VALUES ($1, $2, $3) ON CONFLICT (tenant, subject) DO NOTHING",
        )
        .bind(tenant)
        .bind(subject)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        self.audit(
            actor,
            "objection",
            json!({"tenant": tenant, "subject_hmac": self.subject_ref(subject)}),
        )
        .await?;
        Ok(())
    }

    /// A tenant's policy for the requests that say nothing themselves.
    pub async fn tenant_policy(&self, tenant: &str) -> Result<TenantPolicy> {
        let get = |k: String| async move {
            let v: Option<String> = sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                .bind(k)
                .fetch_optional(&self.pool)
                .await?;
            Ok::<_, LedgerError>(v)
        };
        let training = get(format!("tenant.{tenant}.training")).await?;
        let content = get(format!("tenant.{tenant}.content_level")).await?;
        Ok(TenantPolicy {
            training_allow: training.as_deref() != Some("deny"),
            content_level: content
                .and_then(|c| c.parse().ok())
                .unwrap_or(ContentLevel::Full),
        })
    }

    /// Changes a tenant's policy (fields left `None` keep their value); audited.
    /// Applies to requests recorded from now on.
    pub async fn set_tenant_policy(
        &self,
        actor: &str,
        tenant: &str,
        training_allow: Option<bool>,
        content_level: Option<ContentLevel>,
    ) -> Result<TenantPolicy> {
        if tenant.is_empty() {
            return Err(LedgerError::Invalid("the tenant is empty".into()));
        }
        let mut tx = self.pool.begin().await?;
        let sets = [
            (
                format!("tenant.{tenant}.training"),
                training_allow.map(|a| if a { "allow" } else { "deny" }),
            ),
            (
                format!("tenant.{tenant}.content_level"),
                content_level.map(ContentLevel::name),
            ),
        ];
        for (key, value) in &sets {
            let Some(v) = value else { continue };
            sqlx::query("DELETE FROM settings WHERE key = $1")
                .bind(key)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2)")
                .bind(key)
                .bind(*v)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let p = self.tenant_policy(tenant).await?;
        self.audit(
            actor,
            "tenant_policy",
            json!({"tenant": tenant, "policy": p}),
        )
        .await?;
        Ok(p)
    }

    pub async fn has_objected(&self, tenant: &str, subject: Option<&str>) -> Result<bool> {
        let Some(s) = subject else {
            return Ok(false);
        };
        // An objection with tenant '*' covers the subject in every tenant.
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM objections WHERE (tenant = $1 OR tenant = '*') AND subject = $2",
        )
        .bind(tenant)
        .bind(s)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }
}

/// How much of a completion's content the ledger keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentLevel {
    /// Prompt and answer as they were.
    Full,
    /// Prompt and answer with PII replaced by typed placeholders.
    Redacted,
    /// No prompt or answer: who, when, which model, parameters, usage and timing.
    Metadata,
}

impl ContentLevel {
    pub fn name(self) -> &'static str {
        match self {
            ContentLevel::Full => "full",
            ContentLevel::Redacted => "redacted",
            ContentLevel::Metadata => "metadata",
        }
    }
}

impl std::str::FromStr for ContentLevel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "full" => Ok(ContentLevel::Full),
            "redacted" => Ok(ContentLevel::Redacted),
            "metadata" => Ok(ContentLevel::Metadata),
            _ => Err(format!("{s:?}: one of full, redacted, metadata")),
        }
    }
}

/// What a tenant's requests get when they say nothing themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TenantPolicy {
    /// Training consent of requests without `X-Brise-Training` (true unless set to deny).
    pub training_allow: bool,
    /// The most content kept of its requests; a request may ask for less, never more.
    pub content_level: ContentLevel,
}

/// Counts of replaced PII, by kind.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Redactions {
    pub email: usize,
    pub iban: usize,
    pub card: usize,
    pub phone: usize,
}

fn luhn(digits: &str) -> bool {
    let d: Vec<u32> = digits.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&d.len()) {
        return false;
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 1 {
                if x * 2 > 9 { x * 2 - 9 } else { x * 2 }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Replaces emails, IBANs, card numbers (Luhn-valid) and phone numbers with typed
/// placeholders (`[EMAIL]`, `[IBAN]`, `[CARD]`, `[PHONE]`), counting each.
pub fn redact(text: &str, counts: &mut Redactions) -> String {
    static RE: OnceLock<[Regex; 4]> = OnceLock::new();
    let [email, iban, card, phone] = RE.get_or_init(|| {
        [
            Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
                .expect("email re"),
            Regex::new(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
                .expect("iban re"),
            Regex::new(r"\b(?:\d[ -]?){12,18}\d\b").expect("card re"),
            Regex::new(r"\+?\(?\d[\d ().-]{7,}\d").expect("phone re"),
        ]
    });
    let s = email.replace_all(text, |_: &regex::Captures| {
        counts.email += 1;
        "[EMAIL]"
    });
    let s = iban.replace_all(&s, |_: &regex::Captures| {
        counts.iban += 1;
        "[IBAN]"
    });
    let s = card.replace_all(&s, |c: &regex::Captures| {
        if luhn(&c[0]) {
            counts.card += 1;
            "[CARD]".to_string()
        } else {
            c[0].to_string()
        }
    });
    let s = phone.replace_all(&s, |c: &regex::Captures| {
        // 9 to 15 digits (E.164's maximum), so dates, times and card-like numbers stay.
        let n = c[0].chars().filter(|ch| ch.is_ascii_digit()).count();
        if (9..=15).contains(&n) {
            counts.phone += 1;
            "[PHONE]".to_string()
        } else {
            c[0].to_string()
        }
    });
    s.into_owned()
}

/// Redacts every string inside a JSON value.
pub fn redact_json(v: &Value, counts: &mut Redactions) -> Value {
    match v {
        Value::String(s) => Value::String(redact(s, counts)),
        Value::Array(a) => Value::Array(a.iter().map(|x| redact_json(x, counts)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), redact_json(x, counts)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_each_kind() {
        let mut c = Redactions::default();
        let out = redact(
            "Mail jane.doe+x@example.co.uk or call +33 6 12 34 56 78; IBAN FR76 3000 6000 0112 3456 7890 189; \
             card 4111 1111 1111 1111, not 4111 1111 1111 1112; meet on 2026-12-01 at 10:30, room 42.",
            &mut c,
        );
        assert_eq!(
            out,
            "Mail [EMAIL] or call [PHONE]; IBAN [IBAN]; card [CARD], not 4111 1111 1111 1112; meet on 2026-12-01 at 10:30, room 42."
        );
        assert_eq!(
            c,
            Redactions {
                email: 1,
                iban: 1,
                card: 1,
                phone: 1
            }
        );
    }
}
