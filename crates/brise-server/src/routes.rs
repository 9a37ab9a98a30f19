//! Routes and handlers.

use crate::error::{ApiError, ApiResult};
use crate::metrics;
use crate::record::Recorder;
use crate::request::{self, GenParams, PromptInput, Tool, ToolChoice};
use crate::{AppState, ServedAdapter, ServedModel, Tenant};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use brise_engine::json::{Schema, SeqPart};
use brise_engine::scheduler::{Event, Request as EngineRequest, SubmitError};
use brise_engine::{FinishReason, GenerateOptions, RepetitionStop, SamplingParams, TokenLogprob};
use brise_model::chat::{ToolCall, ToolFormat};
use brise_model::tokenizer::Tokenizer;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

type St = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> Router {
    let generation = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/fim/completions", post(fim))
        .route("/v1/compare", post(compare))
        .layer(middleware::map_response(ai_marker));
    Router::new()
        .merge(generation)
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/feedback", post(post_feedback).get(get_feedback))
        .route(
            "/v1/files",
            post(crate::jobs::upload_file).get(crate::jobs::list_files),
        )
        .route(
            "/v1/files/{id}",
            get(crate::jobs::get_file).delete(crate::jobs::delete_file),
        )
        .route("/v1/files/{id}/content", get(crate::jobs::file_content))
        .route(
            "/v1/fine_tuning/jobs",
            post(crate::jobs::create_job).get(crate::jobs::list_jobs),
        )
        .route("/v1/fine_tuning/jobs/{id}", get(crate::jobs::get_job))
        .route(
            "/v1/fine_tuning/jobs/{id}/events",
            get(crate::jobs::job_events),
        )
        .route(
            "/v1/fine_tuning/jobs/{id}/cancel",
            post(crate::jobs::cancel_job),
        )
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics_text))
        .merge(crate::console::api())
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_declared_oversize,
        ))
        // Ollama's API (`/api/…`): its own errors' shape, the same auth (ollama.rs).
        .merge(crate::ollama::router(state.clone()))
        .route("/health", get(health))
        .merge(crate::console::assets())
        .merge(
            Router::new()
                .route("/v1/admin/erase", post(admin_erase))
                .route("/v1/admin/objections", post(admin_object))
                .route(
                    "/v1/admin/subjects/{subject}/export",
                    get(admin_export_subject),
                )
                .route("/v1/admin/audit", get(admin_audit))
                .route(
                    "/v1/admin/retention",
                    get(admin_get_retention).post(admin_set_retention),
                )
                .route("/v1/admin/holds", post(admin_hold))
                .route("/v1/admin/stats", get(admin_stats))
                .route("/v1/admin/export", get(admin_export))
                .route(
                    "/v1/admin/tenants/{tenant}",
                    get(admin_get_tenant).post(admin_set_tenant),
                )
                .route("/v1/admin/adapters", get(admin_adapters))
                .route("/v1/admin/adapters/rollback", post(admin_rollback))
                .route("/v1/admin/adapters/{id}", get(admin_adapter))
                .route("/v1/admin/adapters/{id}/promote", post(admin_promote))
                .route("/v1/admin/adapters/{id}/reject", post(admin_reject))
                .route(
                    "/v1/admin/fine_tuning/jobs",
                    get(crate::jobs::admin_list_jobs),
                )
                .route(
                    "/v1/admin/fine_tuning/jobs/{id}/events",
                    get(crate::jobs::admin_job_events),
                )
                .route(
                    "/v1/admin/fine_tuning/jobs/{id}/cancel",
                    post(crate::jobs::admin_cancel_job),
                )
                .route_layer(middleware::from_fn_with_state(state.clone(), admin_auth)),
        )
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .with_state(state)
}

/// Bodies of up to this many times `--max-body` are read and dropped before their 413.
const DRAIN_FACTOR: u64 = 4;

/// A request whose declared length is over `--max-body` gets its 413 here, before any
/// handler, after reading and dropping what the client sends (up to [`DRAIN_FACTOR`]
/// times the limit, for at most 10 s). A server that answers and closes with unread
/// bytes in its receive buffer makes the kernel reset the connection, and a client still
/// sending then loses the 413 to "server disconnected" (seen with 9 MB uploads over an
/// 8 MB limit). Bodies without a declared length keep the extractors' limit.
async fn refuse_declared_oversize(State(s): St, req: Request, next: Next) -> Response {
    let limit = s.cfg.max_body_bytes as u64;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let Some(n) = declared.filter(|n| *n > limit) else {
        return next.run(req).await;
    };
    if n <= limit.saturating_mul(DRAIN_FACTOR) {
        use futures_util::StreamExt;
        let mut body = req.into_body().into_data_stream();
        let drain = async { while let Some(Ok(_)) = body.next().await {} };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), drain).await;
    }
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        format!("the request body ({n} bytes) is larger than the server's limit (--max-body {limit} bytes)"),
    )
    .into_response()
}

/// AI Act Art. 50: generated content is marked as such, machine-readably.
pub(crate) async fn ai_marker(mut r: Response) -> Response {
    r.headers_mut()
        .insert("x-brise-ai-generated", HeaderValue::from_static("true"));
    r
}

async fn count(State(s): St, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().replace("{*id}", "{id}"))
        .unwrap_or_else(|| "other".into());
    let r = next.run(req).await;
    s.metrics.count_request(&route, r.status().as_u16());
    r
}

pub(crate) async fn auth(State(s): St, req: Request, next: Next) -> Response {
    if s.cfg.api_keys.is_empty() {
        return limited(&s, "default", req, next).await;
    }
    let given = bearer(req.headers());
    // Every key is compared, in constant time, whichever matches.
    let found = given.and_then(|g| {
        s.cfg.api_keys.iter().fold(
            None,
            |found, k| if key_eq(&k.key, g) { Some(k) } else { found },
        )
    });
    match found {
        Some(k) => limited(&s, &k.tenant, req, next).await,
        None => ApiError::unauthorized().into_response(),
    }
}

/// Runs an authenticated request as `tenant`'s, unless the tenant is over its rate
/// limit (a 429 with Retry-After, before any work is done).
async fn limited(s: &AppState, tenant: &str, mut req: Request, next: Next) -> Response {
    if let Err(r) = s.rate_limiter.check(tenant, Instant::now()) {
        return ApiError::rate_limited(r).into_response();
    }
    req.extensions_mut().insert(Tenant(tenant.to_string()));
    next.run(req).await
}

/// Admin routes take the admin key (`--admin-key`), never a tenant's key.
async fn admin_auth(State(s): St, req: Request, next: Next) -> Response {
    let Some(want) = &s.cfg.admin_key else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            "admin routes are off: start the server with --admin-key",
        )
        .into_response();
    };
    if !bearer(req.headers()).is_some_and(|g| key_eq(want, g)) {
        return ApiError::unauthorized().into_response();
    }
    next.run(req).await
}

/// The token of `Authorization: Bearer TOKEN`. The scheme is case-insensitive (RFC
/// 7235), for tenant and admin keys alike.
pub(crate) fn bearer(h: &axum::http::HeaderMap) -> Option<&str> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether two keys are equal, in a time that does not depend on where they differ:
/// their SHA-256 digests (32 bytes whatever the keys' lengths) are compared without an
/// early exit.
pub(crate) fn key_eq(a: &str, b: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (x, y) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    let diff = x.iter().zip(y.iter()).fold(0u8, |d, (p, q)| d | (p ^ q));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod auth_tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_keys_compare_whole() {
        let mut h = axum::http::HeaderMap::new();
        for (v, want) in [
            ("Bearer k1", Some("k1")),
            ("bearer k1", Some("k1")),
            ("BEARER  k1 ", Some("k1")),
            ("Basic k1", None),
            ("Bearer", None),
            ("Bearer ", None),
            ("Bearerk1", None),
        ] {
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            assert_eq!(bearer(&h), want, "{v:?}");
        }
        assert!(key_eq("sekret-a", "sekret-a"));
        for other in ["sekret-b", "sekret-", "sekret-aa", "", "Sekret-a"] {
            assert!(!key_eq("sekret-a", other), "{other:?}");
        }
    }
}

async fn admin_erase(State(s): St, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    let l = ledger(&s)?;
    let mut f = request::Fields::parse(&body)?;
    let subject = f
        .string("subject")?
        .filter(|x| !x.is_empty())
        .ok_or_else(|| ApiError::param("subject", "you must provide the subject to erase"))?;
    let tenant = f.string("tenant")?;
    f.finish()?;
    let r = l
        .erase_subject("admin-api", tenant.as_deref(), &subject)
        .await?;
    for v in r
        .adapters_tainted
        .iter()
        .filter(|v| v.status == brise_ledger::adapters::AdapterStatus::Promoted)
    {
        eprintln!(
            "brise: WARNING: erasure {} erased data that {} (serving {}) was trained on; \
             roll it back or promote a clean version",
            r.receipt_id, v.id, v.model
        );
    }
    // The served versions' records (their taint) are refreshed at once.
    s.registry_changed.notify_one();
    Ok(axum::Json(serde_json::to_value(&r).unwrap_or(Value::Null)).into_response())
}

async fn admin_object(State(s): St, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    let l = ledger(&s)?;
    let mut f = request::Fields::parse(&body)?;
    let subject = f
        .string("subject")?
        .filter(|x| !x.is_empty())
        .ok_or_else(|| ApiError::param("subject", "you must provide the subject"))?;
    // Without a tenant: the subject in every tenant.
    let tenant = f.string("tenant")?.unwrap_or_else(|| "*".into());
    f.finish()?;
    l.object("admin-api", &tenant, &subject).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"object": "objection", "tenant": tenant, "subject": subject})),
    )
        .into_response())
}

async fn admin_export_subject(State(s): St, Path(subject): Path<String>) -> ApiResult<Response> {
    let l = ledger(&s)?;
    let mut out = Vec::new();
    l.export_subject("admin-api", None, &subject, &mut out)
        .await?;
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response())
}

async fn admin_get_retention(State(s): St) -> ApiResult<Response> {
    let l = ledger(&s)?;
    let r = l.retention().await?;
    Ok(axum::Json(json!(r)).into_response())
}

/// `{"records_days": N|0|null, "feedback_days": …}`: 0 or null keeps that kind until
/// erased; a field left out keeps its current window.
async fn admin_set_retention(
    State(s): St,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    let l = ledger(&s)?;
    let old = l.retention().await?;
    let mut f = request::Fields::parse(&body)?;
    let max = brise_ledger::retention::MAX_DAYS;
    let mut days = |k: &str, old: Option<i64>| -> ApiResult<Option<i64>> {
        let present = f.has(k);
        match f.u64(k)? {
            None if present => Ok(None),
            None => Ok(old),
            Some(0) => Ok(None),
            Some(d) if d as i64 > max || d > i64::MAX as u64 => Err(ApiError::param(
                k,
                format!("{k} = {d}: at most {max} days (0 or null: keep until erased)"),
            )),
            Some(d) => Ok(Some(d as i64)),
        }
    };
    let r = brise_ledger::retention::Retention {
        records_days: days("records_days", old.records_days)?,
        feedback_days: days("feedback_days", old.feedback_days)?,
    };
    f.finish()?;
    l.set_retention("admin-api", r).await?;
    let rep = l.purge("retention", brise_ledger::now_ms()).await?;
    Ok(axum::Json(json!({"retention": r, "purged": rep})).into_response())
}

/// `{"subject", "tenant"?, "hold": true|false}`
async fn admin_hold(State(s): St, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    let l = ledger(&s)?;
    let mut f = request::Fields::parse(&body)?;
    let subject = f
        .string("subject")?
        .filter(|x| !x.is_empty())
        .ok_or_else(|| ApiError::param("subject", "you must provide the subject"))?;
    let tenant = f.string("tenant")?.unwrap_or_else(|| "*".into());
    let on = f.bool("hold")?.unwrap_or(true);
    f.finish()?;
    l.hold("admin-api", &tenant, &subject, on).await?;
    Ok(axum::Json(json!({"tenant": tenant, "subject": subject, "hold": on})).into_response())
}

async fn admin_stats(State(s): St) -> ApiResult<Response> {
    let l = ledger(&s)?;
    let st = l.stats().await?;
    Ok(axum::Json(json!(st)).into_response())
}

/// `?format=F[&since=unix-seconds|YYYY-MM-DD][&model=M]`: the training export as JSONL,
/// its report (counts, redactions) in the `X-Brise-Export-Report` header. Audited.
async fn admin_export(
    State(s): St,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> ApiResult<Response> {
    let l = ledger(&s)?;
    if let Some(k) = q
        .keys()
        .find(|k| !["format", "since", "model"].contains(&k.as_str()))
    {
        return Err(ApiError::unknown_param(k));
    }
    let format: brise_ledger::export::Format = q
        .get("format")
        .ok_or_else(|| ApiError::param("format", "you must provide format"))?
        .parse()
        .map_err(|e: String| ApiError::param("format", e))?;
    let since_ms = q
        .get("since")
        .map(|v| brise_ledger::export::parse_since(v))
        .transpose()
        .map_err(|e| ApiError::param("since", format!("since {e}")))?;
    let filter = brise_ledger::export::ExportFilter {
        since_ms,
        model: q.get("model").cloned(),
    };
    let mut out = Vec::new();
    let rep = l.export("admin-api", format, &filter, &mut out).await?;
    let report = serde_json::to_string(&rep).unwrap_or_default();
    let mut r = ([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response();
    if let Ok(v) = HeaderValue::from_str(&report) {
        r.headers_mut().insert("x-brise-export-report", v);
    }
    Ok(r)
}

fn policy_json(tenant: &str, p: &brise_ledger::governance::TenantPolicy) -> Value {
    json!({
        "tenant": tenant,
        "training": if p.training_allow { "allow" } else { "deny" },
        "content_level": p.content_level,
    })
}

async fn admin_get_tenant(State(s): St, Path(tenant): Path<String>) -> ApiResult<Response> {
    let l = ledger(&s)?;
    let p = l.tenant_policy(&tenant).await?;
    Ok(axum::Json(policy_json(&tenant, &p)).into_response())
}

/// `{"training"?: "allow"|"deny", "content_level"?: "full"|"redacted"|"metadata"}`: what
/// the tenant's requests get when they say nothing themselves.
async fn admin_set_tenant(
    State(s): St,
    Path(tenant): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    let l = ledger(&s)?;
    let mut f = request::Fields::parse(&body)?;
    let training = match f.string("training")?.as_deref() {
        None => None,
        Some("allow") => Some(true),
        Some("deny") => Some(false),
        Some(v) => {
            return Err(ApiError::param(
                "training",
                format!("training is {v:?}: \"allow\" or \"deny\""),
            ));
        }
    };
    let level = f
        .string("content_level")?
        .map(|v| v.parse())
        .transpose()
        .map_err(|e: String| ApiError::param("content_level", format!("content_level is {e}")))?;
    f.finish()?;
    if training.is_none() && level.is_none() {
        return Err(ApiError::param(
            "training",
            "give training and/or content_level",
        ));
    }
    let p = l
        .set_tenant_policy("admin-api", &tenant, training, level)
        .await?;
    Ok(axum::Json(policy_json(&tenant, &p)).into_response())
}

async fn admin_audit(State(s): St) -> ApiResult<Response> {
    let l = ledger(&s)?;
    let entries = l.audit_entries().await?;
    let verified = l.verify_audit().await?;
    Ok(axum::Json(json!({
        "object": "list",
        "data": entries,
        "chain_intact": verified.is_ok(),
        "broken_at": verified.err(),
    }))
    .into_response())
}

/// A registry version as the admin routes show it.
fn version_json(v: &brise_ledger::adapters::AdapterVersion) -> Value {
    let mut j = json!(v);
    j["object"] = json!("adapter.version");
    j
}

/// A body that may be empty (no fields).
fn fields_or_empty(body: &[u8]) -> ApiResult<request::Fields> {
    if body.iter().all(u8::is_ascii_whitespace) {
        request::Fields::parse(b"{}")
    } else {
        request::Fields::parse(body)
    }
}

/// `GET /v1/admin/adapters[?model=M]`: the registry's versions.
async fn admin_adapters(
    State(s): St,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> ApiResult<Response> {
    let l = ledger(&s)?;
    if let Some(k) = q.keys().find(|k| k.as_str() != "model") {
        return Err(ApiError::unknown_param(k));
    }
    let vs = l.adapters(q.get("model").map(String::as_str)).await?;
    Ok(axum::Json(json!({
        "object": "list",
        "data": vs.iter().map(version_json).collect::<Vec<_>>(),
    }))
    .into_response())
}

/// `GET /v1/admin/adapters/{id}`: one version, its lineage (its id, its parent's, …)
/// and its model's promotion history.
async fn admin_adapter(State(s): St, Path(id): Path<String>) -> ApiResult<Response> {
    let l = ledger(&s)?;
    let v = l
        .adapter(&id)
        .await?
        .ok_or(brise_ledger::LedgerError::UnknownAdapter(id.clone()))?;
    let lineage: Vec<String> = l
        .adapter_lineage(&id)
        .await?
        .into_iter()
        .map(|v| v.id)
        .collect();
    let mut j = version_json(&v);
    j["lineage"] = json!(lineage);
    j["history"] = json!(l.adapter_history(&v.model).await?);
    Ok(axum::Json(j).into_response())
}

/// What a served model serves for its plain name after a registry change.
fn serving_json(s: &AppState, model: &str) -> Value {
    match s.models().iter().find(|m| m.id == model) {
        Some(m) => json!(
            m.promoted()
                .map(|a| a.name.clone())
                .unwrap_or_else(|| crate::BASE.into())
        ),
        None => Value::Null,
    }
}

/// `POST /v1/admin/adapters/{id}/promote`: makes the version the one its model serves.
/// When this server serves the model, the version must load first (else a 409 and
/// nothing changes), and it is in service when the answer comes; other servers sharing
/// the ledger pick it up at their next poll.
async fn admin_promote(
    State(s): St,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    fields_or_empty(&body)?.finish()?;
    let l = ledger(&s)?;
    let v = l
        .adapter(&id)
        .await?
        .ok_or(brise_ledger::LedgerError::UnknownAdapter(id.clone()))?;
    let served = s.models().iter().find(|m| m.id == v.model);
    let mut g = s.registry_sync.lock().await;
    let mut loaded = None;
    if let Some(m) = served
        && v.status != brise_ledger::adapters::AdapterStatus::Promoted
        && v.tainted.is_none()
        && v.status != brise_ledger::adapters::AdapterStatus::Rejected
    {
        // Loaded before the registry changes, so a directory that does not load is
        // refused instead of promoted.
        loaded = Some(crate::versions::load(m, &v).await.map_err(|e| {
            ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                format!("{id} does not load on {}: {e}", m.id),
            )
        })?);
    }
    let p = l.promote_adapter(&id, "admin-api").await?;
    if let Some(m) = served {
        let now = l.current_adapter(&m.id).await?;
        let _ = crate::versions::install(m, now.as_ref(), &mut g, loaded.as_deref()).await;
    }
    drop(g);
    s.registry_changed.notify_one();
    Ok(axum::Json(json!({
        "object": "adapter.promotion",
        "model": p.model,
        "from": p.from,
        "to": p.to,
        "audit_seq": p.audit_seq,
        "serving": serving_json(&s, &p.model),
    }))
    .into_response())
}

/// `POST /v1/admin/adapters/rollback {"model"}`: back to the version that served before
/// the current one (or to the base model).
async fn admin_rollback(State(s): St, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    let l = ledger(&s)?;
    let mut f = request::Fields::parse(&body)?;
    let model = f
        .string("model")?
        .filter(|x| !x.is_empty())
        .ok_or_else(|| ApiError::param("model", "you must provide the model to roll back"))?;
    f.finish()?;
    // A served model's alias names it too.
    let model = s.find(&model).map(|m| m.id.clone()).unwrap_or(model);
    let mut g = s.registry_sync.lock().await;
    let p = l.rollback_adapter(&model, "admin-api").await?;
    let mut warning = None;
    if let Some(m) = s.models().iter().find(|m| m.id == model) {
        let now = l.current_adapter(&m.id).await?;
        warning = crate::versions::install(m, now.as_ref(), &mut g, None)
            .await
            .err();
    }
    drop(g);
    s.registry_changed.notify_one();
    Ok(axum::Json(json!({
        "object": "adapter.rollback",
        "model": p.model,
        "from": p.from,
        "to": p.to,
        "audit_seq": p.audit_seq,
        "serving": serving_json(&s, &p.model),
        "warning": warning,
    }))
    .into_response())
}

/// `POST /v1/admin/adapters/{id}/reject {"reason"?}`: the version is never promoted.
async fn admin_reject(
    State(s): St,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    let l = ledger(&s)?;
    let mut f = fields_or_empty(&body)?;
    let reason = f.string("reason")?;
    f.finish()?;
    let v = l
        .reject_adapter(&id, "admin-api", reason.as_deref())
        .await?;
    Ok(axum::Json(version_json(&v)).into_response())
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

async fn health(State(s): St) -> Response {
    if s.models.get().is_none() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response();
    }
    axum::Json(json!({"status": "ok"})).into_response()
}

pub(crate) fn body_bytes(b: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    b.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "the request body is larger than the server's limit (--max-body)",
            )
        } else {
            ApiError::bad_request(format!("could not read the request body: {e}"))
        }
    })
}

pub(crate) fn ready(s: &AppState) -> ApiResult<&[ServedModel]> {
    if s.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::overloaded("the server is shutting down"));
    }
    match s.models.get() {
        Some(m) => Ok(m),
        None => Err(ApiError::overloaded(
            "the server is still loading its models",
        )),
    }
}

fn find<'a>(s: &'a AppState, name: &str) -> ApiResult<&'a ServedModel> {
    let models = ready(s)?;
    s.find(name).ok_or_else(|| {
        ApiError::model_not_found(
            name,
            &models.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        )
    })
}

fn n_vocab_of(s: &AppState) -> impl Fn(&str) -> usize + '_ {
    |name| {
        s.find(name)
            .map(|m| m.model.cfg.n_vocab)
            .unwrap_or(usize::MAX)
    }
}

fn model_card(m: &ServedModel) -> Value {
    json!({
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": "brise",
        "type": "base",
        "name": m.model.name,
        // A model served by path answers to that path too, but the server's file
        // system is nobody's business: paths are not listed.
        "aliases": m.aliases.iter().filter(|a| !a.contains(['/', '\\'])).collect::<Vec<_>>(),
        "max_context_length": m.n_ctx(),
        "capabilities": {
            "completion_chat": m.model.chat_template.is_some(),
            "completion_fim": m.model.fim_tokens().is_some(),
            "function_calling": m.model.chat_template.as_ref().is_some_and(|t| t.tool_format().is_some()),
            "fine_tuning": false,
            "vision": false,
            "classification": false,
        },
        "default_model_temperature": m.defaults.temperature,
        // What a request that sets no max_tokens gets (null: the rest of the context).
        "brise": {
            "default_max_tokens": m.max_tokens,
            "repetition_stop": {
                "min_span": RepetitionStop::default().min_span,
                "min_repeats": RepetitionStop::default().min_repeats,
                "max_period": RepetitionStop::default().max_period,
            },
        },
        // The registry's version served for this name (null: the base model itself).
        "current_version": m.promoted().map(|a| a.name.clone()),
    })
}

/// A registry version not loaded yet, as `adapter_card` shows a loaded one.
fn version_card(m: &ServedModel, v: &brise_ledger::adapters::AdapterVersion) -> Value {
    let mut c = model_card(m);
    c["id"] = json!(format!("{}:{}", m.id, v.id));
    c["parent"] = json!(m.id);
    c["root"] = json!(m.id);
    c["created"] = json!(v.created_at_ms / 1000);
    if let Some(o) = c.as_object_mut() {
        o.remove("current_version");
    }
    c["adapter"] = json!({
        "name": v.id,
        "rank": v.config.get("rank"),
        "version": v.version,
        "parent": v.parent,
        "method": v.method,
        "status": v.status,
        "promoted_at": v.promoted_at_ms.map(|t| t / 1000),
        "tainted": false,
    });
    c
}

/// An adapter as a model of its own (`id:name`), as vLLM lists LoRA modules.
fn adapter_card(m: &ServedModel, a: &ServedAdapter) -> Value {
    let mut c = model_card(m);
    c["id"] = json!(m.served_name(Some(a)));
    c["parent"] = json!(m.id);
    c["root"] = json!(m.id);
    c["adapter"] = json!({"name": a.name, "rank": a.lora.rank()});
    if let Some(o) = c.as_object_mut() {
        o.remove("current_version");
    }
    if let Some(v) = &a.version {
        // A registry version: its number and lineage (`parent` above is the model it
        // adapts, as vLLM lists LoRA modules; `adapter.parent` the version it was
        // trained from, null for the base model).
        c["adapter"]["version"] = json!(v.version);
        c["adapter"]["parent"] = json!(v.parent);
        c["adapter"]["method"] = json!(v.method);
        c["adapter"]["status"] = json!(v.status);
        c["adapter"]["promoted_at"] = json!(v.promoted_at_ms.map(|t| t / 1000));
        c["adapter"]["tainted"] = json!(v.tainted.is_some());
    }
    c
}

async fn list_models(State(s): St, Extension(tenant): Extension<Tenant>) -> ApiResult<Response> {
    let models = ready(&s)?;
    let mut data = Vec::new();
    // Versions trained by another tenant's fine-tuning job are that tenant's.
    let owners = match &s.ledger {
        Some(l) => l
            .version_owners()
            .await
            .map_err(|e| ApiError::internal(format!("reading the fine-tuning jobs: {e}")))?,
        None => Default::default(),
    };
    for m in models {
        data.push(model_card(m));
        data.extend(m.adapters.iter().map(|a| adapter_card(m, a)));
        let promoted = m.promoted();
        data.extend(promoted.as_ref().map(|a| adapter_card(m, a)));
        // The registry's other versions a request may name by id (loaded on first use):
        // candidates (fine-tuning jobs' results among them) and retired versions.
        if let Some(l) = &s.ledger {
            let versions = l
                .adapters(Some(&m.id))
                .await
                .map_err(|e| ApiError::internal(format!("reading the adapter registry: {e}")))?;
            for v in versions.iter().rev() {
                use brise_ledger::adapters::AdapterStatus;
                // A fine-tuning job's result is the tenant's model whatever the gate
                // said (the gate decides promotion, not whether it can be called).
                let job_result = owners.contains_key(&v.id);
                let listed =
                    (matches!(v.status, AdapterStatus::Candidate | AdapterStatus::Retired)
                        || (job_result && matches!(v.status, AdapterStatus::Rejected)))
                        && v.tainted.is_none()
                        && owners.get(&v.id).is_none_or(|o| *o == tenant.0)
                        && promoted.as_ref().is_none_or(|p| p.name != v.id);
                if listed {
                    data.push(version_card(m, v));
                }
            }
        }
    }
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn get_model(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    ready(&s)?;
    crate::versions::preload(&s, &tenant.0, &id, None).await?;
    let m = find(&s, &id)?;
    // `MODEL:NAME` is the adapter's card; the plain name (and `MODEL:base`) the model's.
    let named = m.named_adapter(&id, None).ok().flatten();
    let card = match named
        .filter(|n| *n != crate::BASE)
        .and_then(|n| m.adapter_named(n))
    {
        Some(a) => adapter_card(m, &a),
        None => model_card(m),
    };
    Ok(axum::Json(card).into_response())
}

/// The LoRA adapter a request gets (by `model` = `id:name` or `adapter`; else the
/// promoted version, if any). Resolved once per request: the version it starts with is
/// the one it finishes with, whatever is promoted meanwhile.
/// The served model and adapter a request names (`model`, `adapter`), loading a
/// registry version on its first use.
async fn model_and_adapter<'a>(
    s: &'a AppState,
    tenant: &Tenant,
    p: &GenParams,
) -> ApiResult<(&'a ServedModel, Option<Arc<ServedAdapter>>)> {
    crate::versions::preload(s, &tenant.0, &p.model, p.adapter.as_deref()).await?;
    let m = find(s, &p.model)?;
    Ok((m, adapter_of(m, p)?))
}

fn adapter_of(m: &ServedModel, p: &GenParams) -> ApiResult<Option<Arc<ServedAdapter>>> {
    m.adapter_for(&p.model, p.adapter.as_deref())
        .map_err(|e| ApiError::param("adapter", e))
}

/// The sampling and stopping options of one choice.
fn options(
    m: &ServedModel,
    p: &GenParams,
    ad: Option<&ServedAdapter>,
    n_prompt: usize,
    choice: usize,
    json: Option<Arc<Schema>>,
) -> ApiResult<GenerateOptions> {
    let d = &m.defaults;
    let n_ctx = m.n_ctx();
    let max_tokens = match p.max_tokens {
        Some(x) => x,
        // The server's default, cut to what the context has left.
        None => {
            let rest = n_ctx.saturating_sub(n_prompt);
            m.max_tokens.map_or(rest, |d| d.min(rest))
        }
    };
    if p.min_tokens > max_tokens {
        return Err(ApiError::param(
            "min_tokens",
            format!(
                "min_tokens = {} is more than max_tokens = {max_tokens}{}",
                p.min_tokens,
                if p.max_tokens.is_none() {
                    " (the server's default for requests without max_tokens, or what the \
                     context has left)"
                } else {
                    ""
                }
            ),
        ));
    }
    if n_prompt.saturating_add(max_tokens) > n_ctx || max_tokens == 0 {
        return Err(ApiError::param(
            if p.max_tokens.is_some() {
                "max_tokens"
            } else {
                "messages"
            },
            format!(
                "This model's maximum context length is {n_ctx} tokens. However, you requested \
                 {} tokens ({n_prompt} in the prompt, {max_tokens} for the completion). Please \
                 shorten the prompt or lower max_tokens.",
                n_prompt.saturating_add(max_tokens)
            ),
        ));
    }
    let sampling = sampling(d, p, choice);
    sampling.validate().map_err(ApiError::bad_request)?;
    Ok(GenerateOptions {
        sampling,
        max_tokens: Some(max_tokens),
        stop: p.stop.clone(),
        json,
        logprobs: p.logprobs,
        min_tokens: p.min_tokens,
        lora: ad.map(|a| a.lora.clone()),
        // A client that sets its own budget gets exactly what it asked for.
        repetition_stop: p.max_tokens.is_none().then(RepetitionStop::default),
        ..Default::default()
    })
}

/// A request's sampling parameters: what it sets, else the model's defaults `d`.
fn sampling(d: &SamplingParams, p: &GenParams, choice: usize) -> SamplingParams {
    let temperature = p.temperature.unwrap_or(d.temperature);
    // Greedy means greedy: the model's recommended penalties are for sampling, so a
    // temperature-0 request gets only the penalties it sets itself.
    let neutral = SamplingParams::default();
    let d = if temperature == 0.0 {
        SamplingParams {
            repeat_penalty: neutral.repeat_penalty,
            presence_penalty: neutral.presence_penalty,
            frequency_penalty: neutral.frequency_penalty,
            ..d.clone()
        }
    } else {
        d.clone()
    };
    SamplingParams {
        temperature,
        top_k: p.top_k.unwrap_or(d.top_k),
        top_p: p.top_p.unwrap_or(d.top_p),
        min_p: p.min_p.unwrap_or(d.min_p),
        repeat_penalty: p.repeat_penalty.unwrap_or(d.repeat_penalty),
        presence_penalty: p.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: p.frequency_penalty.unwrap_or(d.frequency_penalty),
        penalty_last_n: d.penalty_last_n,
        logit_bias: p.logit_bias.clone(),
        // Each choice of a seeded request draws its own reproducible stream.
        seed: p.seed.map(|s| s.wrapping_add(choice as u64)),
    }
}

/// brise's note on a choice that ended for a reason the client did not set: a loop cut
/// short, or the server's default `max_tokens` (`defaulted`: the request set none).
/// Sent as the choice's `brise` field; `None` for every other ending.
fn finish_note(c: &ChoiceState, defaulted: bool) -> Option<Value> {
    match c.finish? {
        FinishReason::Repetition { period, repeats } => Some(json!({
            "stop": "repetition",
            "period": period,
            "repeats": repeats,
            "message": format!(
                "stopped: the last {} tokens repeat one cycle of {period} tokens {repeats} times; \
                 set max_tokens to turn this check off",
                period * repeats
            ),
        })),
        FinishReason::Length if defaulted => Some(json!({
            "stop": "default_max_tokens",
            "max_tokens": c.n_gen,
            "message": format!(
                "stopped after {} tokens: the limit of requests that set no max_tokens (the \
                 server's --max-tokens, or what the context had left); set max_tokens for more",
                c.n_gen
            ),
        })),
        _ => None,
    }
}

/// Cancels the engine requests when dropped: the client went away or the response is
/// complete (then it is a no-op).
struct CancelOnDrop(Vec<Arc<AtomicBool>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        for c in &self.0 {
            c.store(true, Ordering::Relaxed);
        }
    }
}

struct Running {
    rx: UnboundedReceiver<(usize, Event)>,
    _cancel: CancelOnDrop,
    start: Instant,
}

/// Submits one engine request per (prompt, choice).
fn submit(
    s: &AppState,
    m: &ServedModel,
    tenant: &str,
    jobs: Vec<(Vec<u32>, GenerateOptions)>,
) -> ApiResult<Running> {
    let (tx, rx) = unbounded_channel();
    let mut cancels = Vec::new();
    let deadline = Instant::now() + s.cfg.request_timeout;
    for (i, (prompt, mut opts)) in jobs.into_iter().enumerate() {
        opts.tenant = tenant.to_string();
        let cancel = Arc::new(AtomicBool::new(false));
        cancels.push(cancel.clone());
        let tx = tx.clone();
        m.metrics
            .prompt_tokens
            .fetch_add(prompt.len() as u64, Ordering::Relaxed);
        let r = EngineRequest {
            prompt,
            opts,
            cancel,
            deadline: Some(deadline),
            sink: Box::new(move |ev| tx.send((i, ev)).is_ok()),
        };
        if let Err(e) = m.sched.submit(r) {
            // Choices already queued are cancelled by the guard.
            drop(CancelOnDrop(cancels));
            return Err(match e {
                SubmitError::QueueFull(_) => ApiError::overloaded(format!(
                    "{e}; retry later (the server runs {} sequences at once)",
                    m.sched.config().n_slots
                )),
                SubmitError::ShuttingDown => ApiError::overloaded("the server is shutting down"),
            });
        }
    }
    Ok(Running {
        rx,
        _cancel: CancelOnDrop(cancels),
        start: Instant::now(),
    })
}

#[derive(Default, Clone)]
struct ChoiceState {
    text: String,
    n_gen: usize,
    n_prompt: usize,
    finish: Option<FinishReason>,
    last_token: Option<Instant>,
    first_token: Option<Instant>,
    /// Log probabilities of every token, and those not streamed yet.
    lps: Vec<TokenLogprob>,
    pending: Vec<TokenLogprob>,
    /// With tools, streaming: bytes of `text` sent as content, and whether a tool call
    /// has opened (the rest is held for parsing).
    sent: usize,
    in_call: bool,
}

/// A new call id in the format's shape: OpenAI's `call_…`, or Mistral's 9 letters and
/// digits (its chat templates refuse any other id when the call comes back in the
/// history).
fn new_call_id(tf: ToolFormat) -> String {
    match tf {
        ToolFormat::Hermes => format!("call_{}", uuid::Uuid::new_v4().simple()),
        ToolFormat::Mistral => {
            const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
            let mut r = uuid::Uuid::new_v4().as_u128();
            (0..9)
                .map(|_| {
                    let c = ALNUM[(r % 62) as usize] as char;
                    r /= 62;
                    c
                })
                .collect()
        }
    }
}

/// OpenAI's `tool_calls`: arguments as JSON text; the model's own id when it wrote a
/// valid one.
fn tool_calls_json(tf: ToolFormat, calls: &[ToolCall]) -> Vec<Value> {
    calls
        .iter()
        .map(|c| {
            let id = match (&c.id, tf) {
                (Some(id), ToolFormat::Mistral) if brise_model::chat::is_mistral_call_id(id) => {
                    id.clone()
                }
                _ => new_call_id(tf),
            };
            json!({
                "id": id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments.to_string()},
            })
        })
        .collect()
}

/// The constraint of a forced call: `<tool_call>\n{"name": one of the tools,
/// "arguments": that tool's parameters}\n</tool_call>`.
fn forced_call(tf: ToolFormat, tools: &[Tool], choice: &ToolChoice) -> ApiResult<Arc<Schema>> {
    let mut alts = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        if let ToolChoice::Named(n) = choice
            && n != &t.name
        {
            continue;
        }
        let args = Schema::compile(&t.parameters).map_err(|e| ApiError {
            code: Some("unsupported_schema"),
            ..ApiError::param(
                &format!("tools[{i}].function.parameters"),
                format!("brise cannot enforce this schema for a required call: {e}"),
            )
        })?;
        alts.push(Arc::new(Schema::Object {
            props: vec![
                (
                    "name".into(),
                    Arc::new(Schema::literals(vec![
                        serde_json::to_vec(&t.name).unwrap_or_default(),
                    ])),
                ),
                ("arguments".into(), Arc::new(args)),
            ],
            required: vec!["name".into(), "arguments".into()],
            additional: None,
        }));
    }
    let (open, close) = tf.wrap();
    Ok(Arc::new(Schema::Seq(vec![
        SeqPart::Raw(open.as_bytes().to_vec()),
        SeqPart::Json(Arc::new(Schema::AnyOf(alts))),
        SeqPart::Raw(close.as_bytes().to_vec()),
    ])))
}

fn piece(tk: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let b = tk.token_to_piece(id, true);
    (String::from_utf8_lossy(&b).into_owned(), b)
}

/// Chat's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal"}`.
fn chat_logprobs(tk: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let (t, b) = piece(tk, id);
        json!({"token": t, "logprob": lp, "bytes": b})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(l.token, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Legacy completions' `logprobs`: parallel lists, offsets in characters from `offset`.
fn completion_logprobs(tk: &Tokenizer, lps: &[TokenLogprob], offset: usize) -> Value {
    let (mut tokens, mut lp, mut top, mut offs) = (vec![], vec![], vec![], vec![]);
    // Offsets count characters of the text as decoded (tokens may split a character).
    let mut bytes: Vec<u8> = Vec::new();
    for l in lps {
        let (t, _) = piece(tk, l.token);
        offs.push(offset + String::from_utf8_lossy(&bytes).chars().count());
        bytes.extend(tk.token_to_piece(l.token, false));
        tokens.push(t);
        lp.push(l.logprob);
        let m: serde_json::Map<String, Value> = l
            .top
            .iter()
            .map(|&(id, p)| (piece(tk, id).0, json!(p)))
            .collect();
        top.push(Value::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": lp, "top_logprobs": top, "text_offset": offs})
}

/// Updates a choice with an engine event; returns the text to stream and whether the
/// choice just finished. Records latency metrics.
fn apply(
    m: &ServedModel,
    start: Instant,
    c: &mut ChoiceState,
    ev: Event,
) -> ApiResult<(String, bool)> {
    match ev {
        Event::Token { text, logprob, .. } => {
            if let Some(l) = logprob {
                c.lps.push(l.clone());
                c.pending.push(l);
            }
            let now = Instant::now();
            match c.last_token {
                None => {
                    c.first_token = Some(now);
                    m.metrics.ttft.observe((now - start).as_secs_f64())
                }
                Some(t) => m.metrics.itl.observe((now - t).as_secs_f64()),
            }
            c.last_token = Some(now);
            c.n_gen += 1;
            c.text.push_str(&text);
            Ok((text, false))
        }
        Event::Done(o) => {
            c.text.push_str(&o.tail);
            c.n_gen = o.n_gen;
            c.n_prompt = o.n_prompt;
            c.finish = Some(o.finish);
            m.metrics
                .generated_tokens
                .fetch_add(o.n_gen as u64, Ordering::Relaxed);
            Ok((o.tail, true))
        }
        Event::Error(e) => Err(e.into()),
    }
}

fn finish_reason(f: Option<FinishReason>) -> &'static str {
    f.map(|f| f.as_openai()).unwrap_or("stop")
}

/// Waits for every choice to finish.
async fn collect(m: &ServedModel, mut run: Running, n: usize) -> ApiResult<Vec<ChoiceState>> {
    let mut choices = vec![ChoiceState::default(); n];
    let mut left = n;
    while left > 0 {
        let Some((i, ev)) = run.rx.recv().await else {
            return Err(ApiError::internal(
                "the engine stopped before the answer was complete",
            ));
        };
        if apply(m, run.start, &mut choices[i], ev)?.1 {
            left -= 1;
        }
    }
    Ok(choices)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

async fn chat(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    chat_request(&s, &tenant, &headers, &body, "/v1/chat/completions").await
}

/// A chat completion of an OpenAI-shaped `body`, recorded in the ledger under
/// `endpoint` (the route the client called: other dialects, such as Ollama's
/// `/api/chat`, translate their requests to this body and their answers from it).
pub(crate) async fn chat_request(
    s: &Arc<AppState>,
    tenant: &Tenant,
    headers: &HeaderMap,
    body: &[u8],
    endpoint: &str,
) -> ApiResult<Response> {
    ready(s)?;
    let req = request::parse_chat(body, n_vocab_of(s))?;
    let (m, ad) = model_and_adapter(s, tenant, &req.params).await?;
    let rec = Recorder::new(
        s,
        m,
        ad.as_deref(),
        endpoint,
        headers,
        tenant,
        body,
        &req.params,
    )?;
    if m.model.chat_template.is_none() {
        return Err(ApiError::param(
            "model",
            format!("{} has no chat template; use /v1/completions", m.id),
        ));
    }
    let tf = if !req.tools.is_empty() && req.tool_choice != ToolChoice::None {
        let f = m.model.chat_template.as_ref().and_then(|t| t.tool_format());
        Some(f.ok_or_else(|| {
            ApiError::param(
                "tools",
                format!(
                    "{}'s chat template does not render tools (capabilities.function_calling is false)",
                    m.id
                ),
            )
        })?)
    } else {
        None
    };
    let tools_json = tf.map(|_| Value::Array(req.tools.iter().map(|t| t.raw.clone()).collect()));
    let prompt = m
        .model
        .encode_chat_tools(&req.messages, true, tools_json.as_ref())
        .map_err(|e| ApiError::param("messages", e.to_string()))?;
    let constraint = match (tf, &req.tool_choice) {
        (Some(f), ToolChoice::Required | ToolChoice::Named(_)) => {
            Some(forced_call(f, &req.tools, &req.tool_choice)?)
        }
        _ => req.json.clone(),
    };
    // A forced call opens with the format's own token, as the model was taught.
    let forced = matches!(req.tool_choice, ToolChoice::Required | ToolChoice::Named(_));
    let prefix: Vec<u32> = match tf {
        Some(f) if forced => m.model.tokenizer.token_id(f.open()).into_iter().collect(),
        _ => Vec::new(),
    };
    chat_like(
        s,
        m,
        &req.params,
        ad,
        prompt,
        constraint,
        "chatcmpl",
        tf,
        prefix,
        rec,
    )
    .await
}

/// Runs `p.n` choices of `prompt` and answers in chat-completion shape (chat and
/// Mistral's FIM), streaming or not.
async fn chat_like(
    s: &Arc<AppState>,
    m: &ServedModel,
    p: &GenParams,
    ad: Option<Arc<ServedAdapter>>,
    prompt: Vec<u32>,
    json: Option<Arc<Schema>>,
    id_prefix: &str,
    tools: Option<ToolFormat>,
    prefix: Vec<u32>,
    rec: Recorder,
) -> ApiResult<Response> {
    // The format's control tokens stay in the text, where the calls are parsed.
    let tk = &m.model.tokenizer;
    let preserve: Vec<u32> = tools
        .map(|tf| tf.preserved())
        .unwrap_or_default()
        .iter()
        .filter_map(|t| tk.token_id(t))
        .collect();
    let jobs = (0..p.n)
        .map(|c| {
            let mut o = options(m, p, ad.as_deref(), prompt.len(), c, json.clone())?;
            o.preserve = preserve.clone();
            o.prefix = prefix.clone();
            Ok((prompt.clone(), o))
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let run = submit(s, m, rec.tenant(), jobs)?;
    let id = new_id(id_prefix);
    let created = crate::unix_now();
    if p.stream {
        return Ok(stream(
            s.clone(),
            m.id.clone(),
            m.served_name(ad.as_deref()),
            id,
            created,
            run,
            p.n,
            p.n,
            p.include_usage,
            p.logprobs.is_some(),
            p.max_tokens.is_none(),
            true,
            tools,
            rec,
        )
        .into_response());
    }
    let choices = match collect(m, run, p.n).await {
        Ok(c) => c,
        Err(e) => {
            rec.error(&id, &e).await;
            return Err(e);
        }
    };
    let completion: usize = choices.iter().map(|c| c.n_gen).sum();
    let mut recorded = Vec::new();
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let parsed = tools
                .and_then(|tf| tf.parse(&c.text))
                .filter(|(_, calls)| !calls.is_empty());
            let (message, finish) = match parsed {
                Some((content, calls)) => (
                    json!({
                        "role": "assistant",
                        "content": if content.is_empty() { Value::Null } else { json!(content) },
                        "tool_calls": tool_calls_json(tools.expect("parsed with a format"), &calls),
                    }),
                    "tool_calls",
                ),
                None => (
                    json!({"role": "assistant", "content": c.text}),
                    finish_reason(c.finish),
                ),
            };
            recorded.push(json!({
                "text": c.text,
                "tool_calls": message.get("tool_calls"),
                "finish_reason": finish,
            }));
            let mut v = json!({
                "index": i,
                "message": message,
                "logprobs": if p.logprobs.is_some() {
                    chat_logprobs(&m.model.tokenizer, &c.lps)
                } else {
                    Value::Null
                },
                "finish_reason": finish,
            });
            if let Some(note) = finish_note(c, p.max_tokens.is_none()) {
                v["brise"] = note;
            }
            v
        })
        .collect();
    let first = choices.iter().filter_map(|c| c.first_token).min();
    rec.ok(&id, Value::Array(recorded), prompt.len(), completion, first)
        .await?;
    Ok(axum::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": m.served_name(ad.as_deref()),
        "choices": out,
        "usage": usage(prompt.len(), completion),
    }))
    .into_response())
}

/// Mistral's `POST /v1/fim/completions`: `prompt` (the code before) and `suffix` (the
/// code after), answered in chat-completion shape. Invalid parameters are 422s with
/// FastAPI's `detail` list, as Mistral answers them.
async fn fim(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match fim_inner(&s, &tenant, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.mistral_validation().into_response(),
    }
}

async fn fim_inner(
    s: &Arc<AppState>,
    tenant: &Tenant,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    ready(s)?;
    let req = request::parse_fim(&body, n_vocab_of(s))?;
    let (m, ad) = model_and_adapter(s, tenant, &req.params).await?;
    let rec = Recorder::new(
        s,
        m,
        ad.as_deref(),
        "/v1/fim/completions",
        headers,
        tenant,
        &body,
        &req.params,
    )?;
    let prompt = m.model.encode_fim(&req.prompt, &req.suffix).map_err(|_| {
        ApiError::param(
            "model",
            format!(
                "{} has no fill-in-the-middle tokens; capabilities.completion_fim is false",
                m.id
            ),
        )
    })?;
    chat_like(
        s,
        m,
        &req.params,
        ad,
        prompt,
        None,
        "fim",
        None,
        Vec::new(),
        rec,
    )
    .await
}

async fn completions(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    completions_request(&s, &tenant, &headers, &body, "/v1/completions").await
}

/// A text completion of an OpenAI-shaped `body`, recorded under `endpoint` (as
/// [`chat_request`]).
pub(crate) async fn completions_request(
    s: &Arc<AppState>,
    tenant: &Tenant,
    headers: &HeaderMap,
    body: &[u8],
    endpoint: &str,
) -> ApiResult<Response> {
    ready(s)?;
    let req = request::parse_completion(body, n_vocab_of(s))?;
    let (m, ad) = model_and_adapter(s, tenant, &req.params).await?;
    let rec = Recorder::new(
        s,
        m,
        ad.as_deref(),
        endpoint,
        headers,
        tenant,
        body,
        &req.params,
    )?;
    let p = &req.params;
    let tk = &m.model.tokenizer;
    let mut prompts = Vec::new();
    for pi in &req.prompts {
        let (ids, text) = match pi {
            PromptInput::Text(t) if req.suffix.is_some() => (
                m.model
                    .encode_fim(t, req.suffix.as_deref().unwrap_or(""))
                    .map_err(|_| {
                        ApiError::param(
                            "suffix",
                            format!("{} has no fill-in-the-middle tokens for `suffix`", m.id),
                        )
                    })?,
                t.clone(),
            ),
            PromptInput::Tokens(_) if req.suffix.is_some() => {
                return Err(ApiError::param("suffix", "suffix needs a text prompt"));
            }
            // As `brise run --raw`: BOS if the model wants it, special-token text kept as text.
            PromptInput::Text(t) => (
                tk.encode(t, true, false)
                    .map_err(|e| ApiError::param("prompt", e.to_string()))?,
                t.clone(),
            ),
            PromptInput::Tokens(ids) => (ids.clone(), tk.decode(ids, false)),
        };
        if ids.is_empty() {
            return Err(ApiError::param("prompt", "the prompt has no tokens"));
        }
        prompts.push((ids, text));
    }
    let mut jobs = Vec::new();
    for (ids, _) in &prompts {
        for c in 0..p.n {
            jobs.push((
                ids.clone(),
                options(m, p, ad.as_deref(), ids.len(), c, None)?,
            ));
        }
    }
    let n_jobs = jobs.len();
    let run = submit(s, m, &tenant.0, jobs)?;
    let id = new_id("cmpl");
    let created = crate::unix_now();
    if p.stream {
        if req.echo {
            return Err(ApiError::unsupported("echo", "echo with stream"));
        }
        return Ok(stream(
            s.clone(),
            m.id.clone(),
            m.served_name(ad.as_deref()),
            id,
            created,
            run,
            n_jobs,
            p.n,
            p.include_usage,
            p.logprobs.is_some(),
            p.max_tokens.is_none(),
            false,
            None,
            rec,
        )
        .into_response());
    }
    let choices = match collect(m, run, n_jobs).await {
        Ok(c) => c,
        Err(e) => {
            rec.error(&id, &e).await;
            return Err(e);
        }
    };
    let prompt_tokens: usize = prompts.iter().map(|(ids, _)| ids.len()).sum();
    let completion: usize = choices.iter().map(|c| c.n_gen).sum();
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let text = if req.echo {
                format!("{}{}", prompts[i / p.n].1, c.text)
            } else {
                c.text.clone()
            };
            let offset = if req.echo {
                prompts[i / p.n].1.chars().count()
            } else {
                0
            };
            let mut v = json!({
                "index": i,
                "text": text,
                "logprobs": if p.logprobs.is_some() {
                    completion_logprobs(&m.model.tokenizer, &c.lps, offset)
                } else {
                    Value::Null
                },
                "finish_reason": finish_reason(c.finish),
            });
            if let Some(note) = finish_note(c, p.max_tokens.is_none()) {
                v["brise"] = note;
            }
            v
        })
        .collect();
    let recorded: Vec<Value> = choices
        .iter()
        .map(|c| json!({"text": c.text, "finish_reason": finish_reason(c.finish)}))
        .collect();
    let first = choices.iter().filter_map(|c| c.first_token).min();
    rec.ok(
        &id,
        Value::Array(recorded),
        prompt_tokens,
        completion,
        first,
    )
    .await?;
    Ok(axum::Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": m.served_name(ad.as_deref()),
        "choices": out,
        "usage": usage(prompt_tokens, completion),
    }))
    .into_response())
}

/// Server-sent events: chunks as the engine produces text, a finish chunk per choice,
/// the usage chunk if asked, then `[DONE]`. An engine error becomes a final error event.
#[allow(clippy::too_many_arguments)]
fn stream(
    s: Arc<AppState>,
    model_id: String,
    model: String,
    id: String,
    created: u64,
    run: Running,
    n: usize,
    n_per_prompt: usize,
    include_usage: bool,
    logprobs: bool,
    defaulted: bool,
    chat: bool,
    tools: Option<ToolFormat>,
    rec: Recorder,
) -> impl IntoResponse {
    struct S {
        s: Arc<AppState>,
        /// The served model's id (`model` is the name reported, adapter included).
        model_id: String,
        model: String,
        id: String,
        created: u64,
        run: Running,
        choices: Vec<ChoiceState>,
        left: usize,
        include_usage: bool,
        logprobs: bool,
        /// The request set no max_tokens (see `finish_note`).
        defaulted: bool,
        n_per_prompt: usize,
        chat: bool,
        tools: Option<ToolFormat>,
        rec: Recorder,
        /// What the ledger records of each choice.
        recorded: Vec<Value>,
        started: bool,
        done: bool,
    }
    impl Drop for S {
        /// The client went away mid-stream (or the server is stopping): record what it got.
        fn drop(&mut self) {
            if self.done {
                return;
            }
            let output: Value = self
                .choices
                .iter()
                .zip(&self.recorded)
                .map(|(c, r)| {
                    if r.is_null() {
                        json!({"text": c.text, "finish_reason": null})
                    } else {
                        r.clone()
                    }
                })
                .collect();
            let prompt: usize = self
                .choices
                .iter()
                .step_by(self.n_per_prompt)
                .map(|c| c.n_prompt)
                .sum();
            let n_gen: usize = self.choices.iter().map(|c| c.n_gen).sum();
            let first = self.choices.iter().filter_map(|c| c.first_token).min();
            let (rec, id) = (self.rec.clone(), self.id.clone());
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move { rec.cancelled(&id, output, prompt, n_gen, first).await });
            }
        }
    }
    impl S {
        fn chunk(&self, choices: Value, usage: Option<Value>) -> SseEvent {
            let mut v = json!({
                "id": self.id,
                "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
                "created": self.created,
                "model": self.model,
                "choices": choices,
            });
            if self.include_usage {
                v["usage"] = usage.unwrap_or(Value::Null);
            }
            SseEvent::default().data(v.to_string())
        }
        /// The logprobs of choice `i` not streamed yet.
        fn take_lps(&mut self, m: &ServedModel, i: usize) -> Value {
            let lps = std::mem::take(&mut self.choices[i].pending);
            if !self.logprobs || lps.is_empty() {
                return Value::Null;
            }
            if self.chat {
                chat_logprobs(&m.model.tokenizer, &lps)
            } else {
                let done: usize = self.choices[i].text.chars().count();
                completion_logprobs(&m.model.tokenizer, &lps, done)
            }
        }
        fn choice(
            &self,
            i: usize,
            text: Option<&str>,
            role: bool,
            finish: Option<&str>,
            lp: Value,
        ) -> Value {
            if self.chat {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}])
            } else {
                json!([{"index": i, "text": text.unwrap_or(""), "logprobs": lp, "finish_reason": finish}])
            }
        }
    }
    let st = S {
        s,
        model_id,
        model,
        id,
        created,
        run,
        choices: vec![ChoiceState::default(); n],
        left: n,
        include_usage,
        logprobs,
        defaulted,
        n_per_prompt: n_per_prompt.max(1),
        chat,
        tools,
        rec,
        recorded: vec![Value::Null; n],
        started: false,
        done: false,
    };
    let events = futures_util::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let mut out = Vec::new();
        if !st.started {
            st.started = true;
            if st.chat {
                for i in 0..st.choices.len() {
                    out.push(st.chunk(st.choice(i, Some(""), true, None, Value::Null), None));
                }
                return Some((out, st));
            }
        }
        let app = st.s.clone();
        let m = app.models().iter().find(|m| m.id == st.model_id)?;
        match st.run.rx.recv().await {
            None => {
                st.done = true;
                let e = ApiError::internal("the engine stopped before the answer was complete");
                st.rec.error(&st.id, &e).await;
                out.push(SseEvent::default().data(e.body().to_string()));
                out.push(SseEvent::default().data("[DONE]"));
            }
            Some((i, ev)) => match apply(m, st.run.start, &mut st.choices[i], ev) {
                Err(e) => {
                    st.done = true;
                    st.rec.error(&st.id, &e).await;
                    out.push(SseEvent::default().data(e.body().to_string()));
                    out.push(SseEvent::default().data("[DONE]"));
                }
                Ok((text, finished)) => {
                    let text = match st.tools {
                        // Content streams until a tool call opens; the call is sent whole
                        // at the end, as OpenAI's `delta.tool_calls`.
                        Some(tf) => {
                            let c = &mut st.choices[i];
                            let mut emit = String::new();
                            if !c.in_call {
                                let t = &c.text[c.sent..];
                                if let Some(j) = t.find(tf.open()) {
                                    emit = t[..j].to_string();
                                    c.in_call = true;
                                } else if finished {
                                    emit = t.to_string();
                                } else {
                                    let hold = (1..tf.open().len())
                                        .rev()
                                        .find(|&k| t.ends_with(&tf.open()[..k]))
                                        .unwrap_or(0);
                                    emit = t[..t.len() - hold].to_string();
                                }
                                c.sent += emit.len();
                            }
                            emit
                        }
                        None => text,
                    };
                    if !text.is_empty() {
                        // Offsets count the text before this chunk.
                        let full = std::mem::take(&mut st.choices[i].text);
                        let before = if st.tools.is_some() {
                            st.choices[i].sent - text.len()
                        } else {
                            full.len() - text.len()
                        };
                        st.choices[i].text = full[..before].to_string();
                        let lp = st.take_lps(m, i);
                        st.choices[i].text = full;
                        out.push(st.chunk(st.choice(i, Some(&text), false, None, lp), None));
                    }
                    let mut tool_finish = false;
                    let mut tool_calls = Value::Null;
                    if finished
                        && let Some(tf) = st.tools
                        && st.choices[i].in_call
                    {
                        let c = &st.choices[i];
                        match tf.parse(&c.text) {
                            Some((_, calls)) if !calls.is_empty() => {
                                let mut tc = tool_calls_json(tf, &calls);
                                for (k, call) in tc.iter_mut().enumerate() {
                                    call["index"] = json!(k);
                                }
                                tool_calls = Value::Array(tc.clone());
                                let delta = json!({"tool_calls": tc});
                                out.push(st.chunk(
                                    json!([{"index": i, "delta": delta, "logprobs": null, "finish_reason": null}]),
                                    None,
                                ));
                                tool_finish = true;
                            }
                            // Not a well-formed call after all: it is content.
                            _ => {
                                let rest = c.text[c.sent..].to_string();
                                out.push(st.chunk(st.choice(i, Some(&rest), false, None, Value::Null), None));
                            }
                        }
                    }
                    if finished {
                        let f = if tool_finish {
                            "tool_calls"
                        } else {
                            finish_reason(st.choices[i].finish)
                        };
                        let lp = st.take_lps(m, i);
                        let mut last = st.choice(i, None, false, Some(f), lp);
                        if let Some(note) = finish_note(&st.choices[i], st.defaulted) {
                            last[0]["brise"] = note;
                        }
                        out.push(st.chunk(last, None));
                        st.recorded[i] = json!({
                            "text": st.choices[i].text,
                            "tool_calls": tool_calls,
                            "finish_reason": f,
                        });
                        st.left -= 1;
                        if st.left == 0 {
                            st.done = true;
                            // Committed before the client sees the end of its answer.
                            let prompt: usize = st
                                .choices
                                .iter()
                                .step_by(st.n_per_prompt)
                                .map(|c| c.n_prompt)
                                .sum();
                            let n_gen: usize = st.choices.iter().map(|c| c.n_gen).sum();
                            let first = st.choices.iter().filter_map(|c| c.first_token).min();
                            let output = Value::Array(std::mem::take(&mut st.recorded));
                            if let Err(e) = st.rec.ok(&st.id, output, prompt, n_gen, first).await {
                                out.push(SseEvent::default().data(e.body().to_string()));
                                out.push(SseEvent::default().data("[DONE]"));
                                return Some((out, st));
                            }
                            if st.include_usage {
                                // Each prompt counts once, whatever its `n`.
                                let prompt = st
                                    .choices
                                    .iter()
                                    .step_by(st.n_per_prompt)
                                    .map(|c| c.n_prompt)
                                    .sum();
                                let n_gen = st.choices.iter().map(|c| c.n_gen).sum();
                                out.push(st.chunk(json!([]), Some(usage(prompt, n_gen))));
                            }
                            out.push(SseEvent::default().data("[DONE]"));
                        }
                    }
                }
            },
        }
        Some((out, st))
    })
    .flat_map(|v| futures_util::stream::iter(v.into_iter().map(Ok::<_, std::convert::Infallible>)));
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// `POST /v1/compare`: two candidate answers to one chat request, each recorded under
/// its own id, in random order, for a side-by-side choice sent back as
/// `POST /v1/feedback {"preferred", "rejected"}`. Until adapters exist both come from
/// the served model, sampled with different seeds.
async fn compare(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    ready(&s)?;
    ledger(&s)?;
    // `versions` is compare's own field; the rest is a chat request.
    let mut f = request::Fields::parse(&body)?;
    let versions = f.remove("versions");
    let chat_body = f.to_body();
    let req = request::parse_chat(&chat_body, n_vocab_of(&s))?;
    let m = find(&s, &req.params.model)?;
    let p = &req.params;
    if p.adapter.is_some() || m.named_adapter(&p.model, None).ok().flatten().is_some() {
        return Err(ApiError::param(
            "adapter",
            "a comparison names its versions in `versions` (e.g. [\"base\", \"NAME\"]), not in model or adapter",
        ));
    }
    // Each candidate's version: "base" (no adapter) or one of the model's adapters (the
    // promoted version included). Without `versions`: twice the version the plain name
    // serves.
    let current = m
        .promoted()
        .map(|a| a.name.clone())
        .unwrap_or_else(|| crate::BASE.into());
    let versions: Vec<String> = match versions {
        None => vec![current.clone(), current],
        Some(Value::Array(v)) if v.len() == 2 && v.iter().all(Value::is_string) => v
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_string())
            .collect(),
        Some(_) => {
            return Err(ApiError::param(
                "versions",
                "versions must be a list of two names: \"base\" or an adapter of the model",
            ));
        }
    };
    let mut loras = Vec::new();
    for v in &versions {
        if v == "base" {
            loras.push(None);
            continue;
        }
        crate::versions::preload(&s, &tenant.0, &m.id, Some(v)).await?;
        match m.adapter_named(v) {
            Some(a) => loras.push(Some(a)),
            None => {
                return Err(ApiError::param(
                    "versions",
                    format!(
                        "model {} has no version {v:?} (it has: {})",
                        m.id,
                        m.adapter_names().join(", ")
                    ),
                ));
            }
        }
    }
    if p.stream || p.n != 1 || !req.tools.is_empty() || p.logprobs.is_some() {
        return Err(ApiError::param(
            if p.stream {
                "stream"
            } else if p.n != 1 {
                "n"
            } else if p.logprobs.is_some() {
                "logprobs"
            } else {
                "tools"
            },
            "a comparison takes one non-streamed chat request without tools or logprobs",
        ));
    }
    let temperature = p.temperature.unwrap_or(m.defaults.temperature);
    if temperature <= 0.0 && versions[0] == versions[1] {
        return Err(ApiError::param(
            "temperature",
            "both candidates come from one model version, so they need sampling (temperature > 0)",
        ));
    }
    let prompt = m
        .model
        .encode_chat(&req.messages, true)
        .map_err(|e| ApiError::param("messages", e.to_string()))?;
    let base_seed = p
        .seed
        .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let jobs = (0..2)
        .map(|c| {
            let mut o = options(m, p, loras[c].as_deref(), prompt.len(), c, req.json.clone())?;
            o.sampling.seed = Some(base_seed.wrapping_add(c as u64));
            Ok((prompt.clone(), o))
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let rec = Recorder::new(&s, m, None, "/v1/compare", &headers, &tenant, &body, p)?;
    let run = submit(&s, m, &tenant.0, jobs)?;
    let choices = match collect(m, run, 2).await {
        Ok(c) => c,
        Err(e) => {
            rec.error(&new_id("chatcmpl"), &e).await;
            return Err(e);
        }
    };
    let mut cands = Vec::new();
    for (k, c) in choices.iter().enumerate() {
        let id = new_id("chatcmpl");
        let finish = finish_reason(c.finish);
        rec.for_adapter(loras[k].as_ref().map(|a| a.name.clone()))
            .ok(
                &id,
                json!([{"text": c.text, "finish_reason": finish}]),
                prompt.len(),
                c.n_gen,
                c.first_token,
            )
            .await?;
        let mut cand = json!({
            "id": id,
            "version": versions[k],
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": finish,
            "usage": usage(prompt.len(), c.n_gen),
        });
        if let Some(note) = finish_note(c, p.max_tokens.is_none()) {
            cand["brise"] = note;
        }
        cands.push(cand);
    }
    // Blind: the order says nothing about which is which.
    if uuid::Uuid::new_v4().as_bytes()[0] & 1 == 1 {
        cands.swap(0, 1);
    }
    Ok(axum::Json(json!({
        "object": "comparison",
        "model": m.id,
        "created": crate::unix_now(),
        "candidates": cands,
    }))
    .into_response())
}

fn ledger(s: &AppState) -> ApiResult<&brise_ledger::Ledger> {
    s.ledger.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "invalid_request_error",
            "this server runs without a ledger (--ledger off), so it keeps no feedback",
        )
    })
}

fn feedback_json(f: &brise_ledger::Feedback) -> Value {
    json!({
        "id": f.id,
        "object": "feedback",
        "created": f.created_at_ms / 1000,
        "completion_id": f.completion_id,
        "kind": f.kind,
        "rating": f.rating,
        "correction": f.correction,
        "comment": f.comment,
        "tags": f.tags,
        "preferred": if f.kind == "preference" { json!(f.completion_id) } else { Value::Null },
        "rejected": if f.kind == "preference" { json!(f.rejected_id) } else { Value::Null },
        "tie": if f.kind == "tie" { json!([f.completion_id, f.rejected_id]) } else { Value::Null },
    })
}

fn not_found_completion(id: &str) -> ApiError {
    ApiError {
        param: Some("completion_id".into()),
        code: Some("completion_not_found"),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no completion {id:?} for this API key"),
        )
    }
}

/// `POST /v1/feedback`: a rating (thumbs -1/+1 or 1..5) with an optional correction,
/// comment and tags, or a pairwise choice `{"preferred", "rejected"}`.
async fn post_feedback(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    let l = ledger(&s)?;
    let mut f = request::Fields::parse(&body)?;
    let completion_id = f.string("completion_id")?;
    let preferred = f.string("preferred")?;
    let rejected = f.string("rejected")?;
    let rating = f.i64("rating")?;
    let correction = f.string("correction")?;
    let comment = f.string("comment")?;
    let tags = match f.take("tags") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|t| match t {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::param("tags", "tags must be a list of strings")),
            })
            .collect::<ApiResult<_>>()?,
        Some(_) => return Err(ApiError::param("tags", "tags must be a list of strings")),
    };
    // A tie: `{"tie": [a, b]}`, two answers to one prompt judged equally good.
    let tie = match f.take("tie") {
        None => None,
        Some(Value::Array(a)) => match a.as_slice() {
            [Value::String(x), Value::String(y)] if x != y => Some((x.clone(), y.clone())),
            [Value::String(_), Value::String(_)] => {
                return Err(ApiError::param(
                    "tie",
                    "a tie needs two different completions",
                ));
            }
            _ => {
                return Err(ApiError::param(
                    "tie",
                    "tie must be a list of two completion ids",
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::param(
                "tie",
                "tie must be a list of two completion ids",
            ));
        }
    };
    f.finish()?;
    let (kind, id, rejected_id) = match (completion_id, preferred, rejected, tie) {
        (None, None, None, Some((a, b))) => {
            if rating.is_some() || correction.is_some() {
                return Err(ApiError::param(
                    "rating",
                    "a tie takes no rating or correction",
                ));
            }
            // Stored like a choice: the second answer in `rejected_id`, kind "tie".
            ("tie", a, Some(b))
        }
        (_, _, _, Some(_)) => {
            return Err(ApiError::param(
                "tie",
                "give tie alone, without completion_id, preferred or rejected",
            ));
        }
        (Some(id), None, None, None) => {
            if let Some(r) = rating
                && !matches!(r, -1 | 1..=5)
            {
                return Err(ApiError::param(
                    "rating",
                    format!("rating = {r}: it must be -1 or +1 (thumbs), or 1..5"),
                ));
            }
            if rating.is_none() && correction.is_none() && comment.is_none() {
                return Err(ApiError::param(
                    "rating",
                    "feedback needs a rating, a correction or a comment",
                ));
            }
            if correction.as_deref().is_some_and(|c| c.trim().is_empty()) {
                return Err(ApiError::param("correction", "the correction is empty"));
            }
            ("rating", id, None)
        }
        (None, Some(p), Some(r), None) => {
            if rating.is_some() || correction.is_some() {
                return Err(ApiError::param(
                    "rating",
                    "a pairwise choice takes no rating or correction",
                ));
            }
            if p == r {
                return Err(ApiError::param(
                    "rejected",
                    "preferred and rejected are the same completion",
                ));
            }
            ("preference", p, Some(r))
        }
        (None, Some(_), None, None) => {
            return Err(ApiError::param(
                "rejected",
                "a pairwise choice needs rejected",
            ));
        }
        (None, None, Some(_), None) => {
            return Err(ApiError::param(
                "preferred",
                "a pairwise choice needs preferred",
            ));
        }
        (None, None, None, None) => {
            return Err(ApiError::param(
                "completion_id",
                "you must provide completion_id (or preferred and rejected, or tie)",
            ));
        }
        (Some(_), _, _, None) => {
            return Err(ApiError::param(
                "completion_id",
                "give completion_id, or preferred and rejected, not both",
            ));
        }
    };
    let fb = brise_ledger::Feedback {
        id: String::new(),
        created_at_ms: brise_ledger::now_ms(),
        tenant: tenant.0.clone(),
        completion_id: id,
        kind: kind.into(),
        rating,
        correction,
        comment,
        tags,
        rejected_id,
    };
    match l.add_feedback(fb).await {
        Ok(f) => Ok((StatusCode::CREATED, axum::Json(feedback_json(&f))).into_response()),
        Err(brise_ledger::LedgerError::NotFound(id)) => Err(not_found_completion(&id)),
        Err(brise_ledger::LedgerError::Invalid(_)) if kind == "tie" => Err(ApiError::param(
            "tie",
            "the two answers of a tie answer different prompts",
        )),
        Err(brise_ledger::LedgerError::Invalid(m)) => Err(ApiError::param("rejected", m)),
        Err(e @ brise_ledger::LedgerError::ContentNotKept(_)) => {
            Err(ApiError::param("correction", e.to_string()))
        }
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

/// `GET /v1/feedback?completion_id=…`
async fn get_feedback(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> ApiResult<Response> {
    let l = ledger(&s)?;
    if let Some(k) = q.keys().find(|k| *k != "completion_id") {
        return Err(ApiError::unknown_param(k));
    }
    let id = q
        .get("completion_id")
        .ok_or_else(|| ApiError::param("completion_id", "you must provide completion_id"))?;
    let rec = l.get(id, Some(&tenant.0)).await?;
    if rec.is_none() {
        return Err(not_found_completion(id));
    }
    let items = l.feedback_for(id, Some(&tenant.0)).await?;
    let data: Vec<Value> = items.iter().map(feedback_json).collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn tokenize(State(s): St, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    let mut f = request::Fields::parse(&body)?;
    let m = match f.string("model")? {
        Some(name) => find(&s, &name)?,
        None => ready(&s)?
            .first()
            .ok_or_else(|| ApiError::internal("no model loaded"))?,
    };
    let content = f
        .string("content")?
        .ok_or_else(|| ApiError::param("content", "you must provide content"))?;
    let add_special = f.bool("add_special")?.unwrap_or(false);
    let parse_special = f.bool("parse_special")?.unwrap_or(false);
    let with_pieces = f.bool("with_pieces")?.unwrap_or(false);
    f.finish()?;
    let tk = &m.model.tokenizer;
    let ids = tk
        .encode(&content, add_special, parse_special)
        .map_err(|e| ApiError::param("content", e.to_string()))?;
    let tokens: Vec<Value> = if with_pieces {
        ids.iter()
            .map(|&id| {
                json!({"id": id, "piece": String::from_utf8_lossy(&tk.token_to_piece(id, true))})
            })
            .collect()
    } else {
        ids.iter().map(|&id| json!(id)).collect()
    };
    Ok(axum::Json(json!({"tokens": tokens})).into_response())
}

async fn detokenize(State(s): St, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let body = body_bytes(body)?;
    let mut f = request::Fields::parse(&body)?;
    let m = match f.string("model")? {
        Some(name) => find(&s, &name)?,
        None => ready(&s)?
            .first()
            .ok_or_else(|| ApiError::internal("no model loaded"))?,
    };
    let nv = m.model.cfg.n_vocab;
    let ids: Vec<u32> = match f.take("tokens") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_u64()
                    .filter(|&t| (t as usize) < nv)
                    .map(|t| t as u32)
                    .ok_or_else(|| {
                        ApiError::param("tokens", format!("{t} is not a token id of this model"))
                    })
            })
            .collect::<ApiResult<_>>()?,
        _ => {
            return Err(ApiError::param(
                "tokens",
                "tokens must be a list of token ids",
            ));
        }
    };
    f.finish()?;
    Ok(axum::Json(json!({"content": m.model.tokenizer.decode(&ids, false)})).into_response())
}

async fn metrics_text(State(s): St) -> Response {
    let mut out = String::new();
    s.metrics.render_requests(&mut out);
    let models = s.models();
    for (fam, name, kind, help) in [
        (
            "prompt",
            "brise_prompt_tokens_total",
            "counter",
            "Prompt tokens of accepted requests.",
        ),
        (
            "gen",
            "brise_generated_tokens_total",
            "counter",
            "Generated tokens.",
        ),
        (
            "ttft",
            "brise_time_to_first_token_seconds",
            "histogram",
            "Time from request to first token.",
        ),
        (
            "itl",
            "brise_inter_token_latency_seconds",
            "histogram",
            "Time between tokens of a stream.",
        ),
    ] {
        metrics::header(&mut out, name, kind, help);
        for m in models {
            metrics::render_model(&m.metrics, &m.id, &mut out, fam);
        }
    }
    type Gauge = fn(&ServedModel) -> f64;
    let gauges: [(&str, &str, Gauge); 4] = [
        ("brise_queue_depth", "Requests waiting for a slot.", |m| {
            m.sched.stats().queued.load(Ordering::Relaxed) as f64
        }),
        (
            "brise_active_sequences",
            "Sequences holding a KV slot.",
            |m| m.sched.stats().active.load(Ordering::Relaxed) as f64,
        ),
        (
            "brise_batch_size",
            "Sequences in the last forward pass.",
            |m| m.sched.stats().batch_seqs.load(Ordering::Relaxed) as f64,
        ),
        (
            "brise_kv_cache_usage_ratio",
            "Share of KV-cache cells in use.",
            |m| {
                let st = m.sched.stats();
                st.kv_used.load(Ordering::Relaxed) as f64
                    / st.kv_total.load(Ordering::Relaxed).max(1) as f64
            },
        ),
    ];
    for (name, help, f) in gauges {
        metrics::header(&mut out, name, "gauge", help);
        for m in models {
            let _ = writeln!(
                out,
                "{name}{{model=\"{}\"}} {}",
                metrics::escape(&m.id),
                f(m)
            );
        }
    }
    metrics::header(
        &mut out,
        "brise_tenant_queue_depth",
        "gauge",
        "Requests waiting for a slot, per tenant (tenants with none waiting are left out).",
    );
    for m in models {
        let q = m
            .sched
            .stats()
            .queued_by_tenant
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (t, n) in q {
            let _ = writeln!(
                out,
                "brise_tenant_queue_depth{{model=\"{}\",tenant=\"{}\"}} {n}",
                metrics::escape(&m.id),
                metrics::escape(&t)
            );
        }
    }
    // Waiting time per tenant: a sum and a count (their ratio is the mean wait), and the
    // longest wait so far.
    let waits: Vec<(&str, Vec<(String, brise_engine::scheduler::Waits)>)> = models
        .iter()
        .map(|m| {
            let w = m
                .sched
                .stats()
                .waits_by_tenant
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(t, w)| (t.clone(), *w))
                .collect();
            (m.id.as_str(), w)
        })
        .collect();
    type WaitField = fn(&brise_engine::scheduler::Waits) -> String;
    let fields: [(&str, &str, &str, WaitField); 3] = [
        (
            "brise_tenant_queue_wait_seconds_sum",
            "counter",
            "Seconds the tenant's requests waited in the queue, summed (over the count: the mean wait).",
            |w| w.seconds_sum.to_string(),
        ),
        (
            "brise_tenant_queue_wait_seconds_count",
            "counter",
            "Requests of the tenant that left the queue (for a slot, or gone or timed out while waiting).",
            |w| w.count.to_string(),
        ),
        (
            "brise_tenant_queue_wait_seconds_max",
            "gauge",
            "The longest a request of the tenant waited in the queue since the server started.",
            |w| w.seconds_max.to_string(),
        ),
    ];
    for (name, kind, help, f) in fields {
        metrics::header(&mut out, name, kind, help);
        for (model, ws) in &waits {
            for (t, w) in ws {
                let _ = writeln!(
                    out,
                    "{name}{{model=\"{}\",tenant=\"{}\"}} {}",
                    metrics::escape(model),
                    metrics::escape(t),
                    f(w)
                );
            }
        }
    }
    metrics::header(
        &mut out,
        "brise_rate_limited_total",
        "counter",
        "Requests refused with 429, per tenant and limit (requests: --rate-limit, tokens: --rate-limit-tokens).",
    );
    for (t, l, n) in s.rate_limiter.refused() {
        let _ = writeln!(
            out,
            "brise_rate_limited_total{{tenant=\"{}\",limit=\"{}\"}} {n}",
            metrics::escape(&t),
            l.name()
        );
    }
    metrics::header(
        &mut out,
        "brise_batch_tokens",
        "gauge",
        "Tokens in the last forward pass.",
    );
    for m in models {
        let _ = writeln!(
            out,
            "brise_batch_tokens{{model=\"{}\"}} {}",
            metrics::escape(&m.id),
            m.sched.stats().batch_tokens.load(Ordering::Relaxed)
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-Coder's recommendations (the known-models table): sampling with a penalty.
    fn qwen_defaults() -> SamplingParams {
        SamplingParams {
            temperature: 0.7,
            top_k: 20,
            top_p: 0.8,
            repeat_penalty: 1.05,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_requests_get_no_default_penalty() {
        let d = qwen_defaults();
        let greedy = GenParams {
            temperature: Some(0.0),
            ..Default::default()
        };
        let s = sampling(&d, &greedy, 0);
        assert_eq!((s.temperature, s.repeat_penalty), (0.0, 1.0));
        // A penalty the request sets itself stays.
        let asked = GenParams {
            repeat_penalty: Some(1.3),
            ..greedy.clone()
        };
        assert_eq!(sampling(&d, &asked, 0).repeat_penalty, 1.3);
        // Sampling requests get the model's recommendation for what they leave out.
        let s = sampling(&d, &GenParams::default(), 0);
        assert_eq!((s.temperature, s.repeat_penalty, s.top_k), (0.7, 1.05, 20));
        let warm = GenParams {
            temperature: Some(0.5),
            ..Default::default()
        };
        assert_eq!(sampling(&d, &warm, 0).repeat_penalty, 1.05);
    }

    fn ended(finish: FinishReason, n_gen: usize) -> ChoiceState {
        ChoiceState {
            finish: Some(finish),
            n_gen,
            ..Default::default()
        }
    }

    #[test]
    fn notes_say_why_a_choice_was_cut() {
        let rep = FinishReason::Repetition {
            period: 2,
            repeats: 32,
        };
        let n = finish_note(&ended(rep, 70), true).unwrap();
        assert_eq!(
            (n["stop"].as_str(), n["period"].as_u64()),
            (Some("repetition"), Some(2))
        );
        let n = finish_note(&ended(FinishReason::Length, 16), true).unwrap();
        assert_eq!(
            (n["stop"].as_str(), n["max_tokens"].as_u64()),
            (Some("default_max_tokens"), Some(16))
        );
        // The client's own max_tokens, and ordinary ends, need no note.
        assert!(finish_note(&ended(FinishReason::Length, 16), false).is_none());
        assert!(finish_note(&ended(FinishReason::Stop, 16), true).is_none());
    }
}
