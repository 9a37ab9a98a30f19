//! What the server writes to the ledger for each completion: who asked (tenant,
//! subject), what (model, endpoint, parameters, prompt), what came back, how long it
//! took, and whether the data may be used for training.

use crate::error::ApiError;
use crate::request::GenParams;
use crate::{AppState, ServedAdapter, ServedModel, Tenant};
use axum::http::HeaderMap;
use brise_ledger::governance::{ContentLevel, Redactions, redact_json};
use brise_ledger::{CompletionRecord, Ledger};
use serde_json::{Map, Value};
use std::time::Instant;

/// A completion's record, filled in when the request arrives and finished when its
/// answer is complete.
#[derive(Clone)]
pub struct Recorder {
    ledger: Option<Ledger>,
    base: CompletionRecord,
    /// The request's own training choice; `None` takes the tenant's default.
    training: Option<bool>,
    /// The content level the request asked for; the tenant's may lower it further.
    level: ContentLevel,
    start: Instant,
    /// Charged the tokens an answer used (`--rate-limit-tokens`).
    limiter: std::sync::Arc<crate::ratelimit::RateLimiter>,
}

impl Recorder {
    /// The tenant the completion is recorded for.
    pub fn tenant(&self) -> &str {
        &self.base.tenant
    }

    pub fn new(
        s: &AppState,
        m: &ServedModel,
        adapter: Option<&ServedAdapter>,
        endpoint: &str,
        headers: &HeaderMap,
        tenant: &Tenant,
        body: &[u8],
        p: &GenParams,
    ) -> Result<Recorder, ApiError> {
        let (user, metadata) = (p.user.as_deref(), p.metadata.as_ref());
        let header = |k: &str| {
            headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let meta_str = |k: &str| {
            metadata
                .and_then(|m| m.get(k))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        // Subject: the header, else OpenAI's `user`, else Mistral-style metadata.
        let subject = header("x-brise-subject")
            .map(str::to_string)
            .or_else(|| user.map(str::to_string))
            .or_else(|| meta_str("subject"))
            .or_else(|| meta_str("user_id"));
        let by_header = match header("x-brise-training") {
            None => None,
            Some(v) if v.eq_ignore_ascii_case("deny") => Some(false),
            Some(v) if v.eq_ignore_ascii_case("allow") => Some(true),
            Some(v) => {
                return Err(ApiError::param(
                    "X-Brise-Training",
                    format!("header X-Brise-Training is {v:?}: use allow or deny"),
                ));
            }
        };
        let level = match header("x-brise-content-level") {
            None => ContentLevel::Full,
            Some(v) => v.to_ascii_lowercase().parse().map_err(|e| {
                ApiError::param(
                    "X-Brise-Content-Level",
                    format!("header X-Brise-Content-Level is {e}"),
                )
            })?,
        };
        let by_metadata = match metadata.and_then(|m| m.get("training_opt_out")) {
            None => None,
            Some(Value::Bool(b)) => Some(!b),
            Some(_) => {
                return Err(ApiError::param(
                    "metadata.training_opt_out",
                    "metadata.training_opt_out must be a boolean",
                ));
            }
        };
        // An opt-out anywhere wins.
        let training = match (by_header, by_metadata) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), _) | (_, Some(true)) => Some(true),
            (None, None) => None,
        };
        let mut params: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let mut messages = Value::Null;
        if let Value::Object(o) = &mut params {
            if let Some(msgs) = o.remove("messages") {
                messages = msgs;
            } else {
                let mut p = Map::new();
                for k in ["prompt", "suffix"] {
                    if let Some(v) = o.remove(k) {
                        p.insert(k.into(), v);
                    }
                }
                messages = Value::Object(p);
            }
        }
        Ok(Recorder {
            ledger: s.ledger.clone(),
            base: CompletionRecord {
                id: String::new(),
                created_at_ms: brise_ledger::now_ms(),
                tenant: tenant.0.clone(),
                subject,
                model: m.id.clone(),
                model_sha256: m.sha256.clone(),
                // The version that answers: a `--lora` name or a registry version's id.
                adapter: adapter.map(|a| a.name.clone()),
                endpoint: endpoint.into(),
                params,
                messages,
                output: Value::Null,
                prompt_tokens: 0,
                completion_tokens: 0,
                ttft_ms: None,
                latency_ms: 0.0,
                status: "ok".into(),
                error: None,
                training_consent: training != Some(false),
                content_level: "full".into(),
            },
            training,
            level,
            start: Instant::now(),
            limiter: s.rate_limiter.clone(),
        })
    }

    /// The same request's record for an answer from another version (compare).
    pub fn for_adapter(&self, adapter: Option<String>) -> Recorder {
        let mut r = self.clone();
        r.base.adapter = adapter;
        r
    }

    /// The record as it is kept: training consent from the request, else its tenant's
    /// default; content at the lower of the request's and the tenant's levels.
    async fn finish(
        &self,
        l: &Ledger,
        mut rec: CompletionRecord,
    ) -> Result<CompletionRecord, brise_ledger::LedgerError> {
        let policy = l.tenant_policy(&rec.tenant).await?;
        rec.training_consent = self.training.unwrap_or(policy.training_allow);
        let level = self.level.max(policy.content_level);
        rec.content_level = level.name().into();
        match level {
            ContentLevel::Full => {}
            ContentLevel::Redacted => {
                let mut n = Redactions::default();
                rec.messages = redact_json(&rec.messages, &mut n);
                rec.output = redact_json(&rec.output, &mut n);
            }
            ContentLevel::Metadata => {
                rec.messages = Value::Null;
                // Each choice keeps how it ended, not what it said.
                rec.output = match &rec.output {
                    Value::Array(cs) => cs
                        .iter()
                        .map(|c| serde_json::json!({"finish_reason": c.get("finish_reason")}))
                        .collect(),
                    _ => Value::Null,
                };
            }
        }
        Ok(rec)
    }

    /// Charges the tenant's token bucket for an answer's tokens.
    fn charge(&self, tokens: usize) {
        self.limiter
            .spend(&self.base.tenant, tokens, Instant::now());
    }

    /// The record of an answer (complete or not) as the client got it.
    fn answered(
        &self,
        id: &str,
        output: Value,
        prompt_tokens: usize,
        completion_tokens: usize,
        first_token: Option<Instant>,
    ) -> CompletionRecord {
        CompletionRecord {
            id: id.into(),
            output,
            prompt_tokens: prompt_tokens as i64,
            completion_tokens: completion_tokens as i64,
            ttft_ms: first_token.map(|t| (t - self.start).as_secs_f64() * 1e3),
            latency_ms: self.start.elapsed().as_secs_f64() * 1e3,
            ..self.base.clone()
        }
    }

    /// Applies the tenant's policy to a record and commits it.
    async fn commit(
        &self,
        l: &Ledger,
        rec: CompletionRecord,
    ) -> Result<(), brise_ledger::LedgerError> {
        let rec = self.finish(l, rec).await?;
        l.record(rec).await
    }

    /// Commits the record of a complete answer. A client never gets an answer the
    /// ledger failed to record: the failure is the response.
    pub async fn ok(
        &self,
        id: &str,
        output: Value,
        prompt_tokens: usize,
        completion_tokens: usize,
        first_token: Option<Instant>,
    ) -> Result<(), ApiError> {
        self.charge(prompt_tokens + completion_tokens);
        let Some(l) = &self.ledger else {
            return Ok(());
        };
        let rec = self.answered(id, output, prompt_tokens, completion_tokens, first_token);
        self.commit(l, rec).await.map_err(|e| {
            tracing::error!("ledger: {e}");
            ApiError::internal(format!("the answer could not be recorded: {e}"))
        })
    }

    /// Records a stream whose client went away before the end: what it was sent so far,
    /// with status `cancelled`. The client never had the whole answer, but it used the
    /// model, and the ledger records every use.
    pub async fn cancelled(
        &self,
        id: &str,
        output: Value,
        prompt_tokens: usize,
        completion_tokens: usize,
        first_token: Option<Instant>,
    ) {
        self.charge(prompt_tokens + completion_tokens);
        let Some(l) = &self.ledger else {
            return;
        };
        let rec = CompletionRecord {
            status: "cancelled".into(),
            error: Some("the client disconnected before the answer was complete".into()),
            ..self.answered(id, output, prompt_tokens, completion_tokens, first_token)
        };
        if let Err(e) = self.commit(l, rec).await {
            tracing::error!("ledger: {e}");
        }
    }

    /// Records a request that failed after it was accepted.
    pub async fn error(&self, id: &str, e: &ApiError) {
        let Some(l) = &self.ledger else {
            return;
        };
        let rec = CompletionRecord {
            id: id.into(),
            output: Value::Array(vec![]),
            latency_ms: self.start.elapsed().as_secs_f64() * 1e3,
            status: "error".into(),
            error: Some(e.message.clone()),
            ..self.base.clone()
        };
        let rec = match self.finish(l, rec.clone()).await {
            Ok(r) => r,
            // Without the tenant's policy, keep the least: no content, no consent.
            Err(err) => {
                tracing::error!("ledger: {err}");
                CompletionRecord {
                    messages: Value::Null,
                    training_consent: false,
                    content_level: ContentLevel::Metadata.name().into(),
                    ..rec
                }
            }
        };
        if let Err(err) = l.record(rec).await {
            tracing::error!("ledger: {err}");
        }
    }
}
