//! What the server writes to the ledger for each completion: who asked (tenant,
//! subject), what (model, endpoint, parameters, prompt), what came back, how long it
//! took, and whether the data may be used for training.

use crate::error::ApiError;
use crate::request::GenParams;
use crate::{AppState, ServedModel, Tenant};
use axum::http::HeaderMap;
use brise_ledger::{CompletionRecord, Ledger};
use serde_json::{Map, Value};
use std::time::Instant;

/// A completion's record, filled in when the request arrives and finished when its
/// answer is complete.
pub struct Recorder {
    ledger: Option<Ledger>,
    base: CompletionRecord,
    /// The request's own training choice; `None` takes the tenant's default.
    training: Option<bool>,
    start: Instant,
}

impl Recorder {
    pub fn new(
        s: &AppState,
        m: &ServedModel,
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
                adapter: None,
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
            start: Instant::now(),
        })
    }

    /// The record's training consent: the request's choice, else its tenant's default.
    async fn consent(&self, l: &Ledger) -> Result<bool, brise_ledger::LedgerError> {
        match self.training {
            Some(c) => Ok(c),
            None => l.tenant_training_default(&self.base.tenant).await,
        }
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
        let Some(l) = &self.ledger else {
            return Ok(());
        };
        let training_consent = self.consent(l).await.map_err(|e| {
            tracing::error!("ledger: {e}");
            ApiError::internal(format!("the answer could not be recorded: {e}"))
        })?;
        let rec = CompletionRecord {
            id: id.into(),
            training_consent,
            output,
            prompt_tokens: prompt_tokens as i64,
            completion_tokens: completion_tokens as i64,
            ttft_ms: first_token.map(|t| (t - self.start).as_secs_f64() * 1e3),
            latency_ms: self.start.elapsed().as_secs_f64() * 1e3,
            ..self.base.clone()
        };
        l.record(rec).await.map_err(|e| {
            tracing::error!("ledger: {e}");
            ApiError::internal(format!("the answer could not be recorded: {e}"))
        })
    }

    /// Records a request that failed after it was accepted.
    pub async fn error(&self, id: &str, e: &ApiError) {
        let Some(l) = &self.ledger else {
            return;
        };
        // A failed lookup of the default withholds consent: never assume it.
        let training_consent = self.consent(l).await.unwrap_or(false);
        let rec = CompletionRecord {
            id: id.into(),
            training_consent,
            output: Value::Array(vec![]),
            latency_ms: self.start.elapsed().as_secs_f64() * 1e3,
            status: "error".into(),
            error: Some(e.message.clone()),
            ..self.base.clone()
        };
        if let Err(err) = l.record(rec).await {
            tracing::error!("ledger: {err}");
        }
    }
}
