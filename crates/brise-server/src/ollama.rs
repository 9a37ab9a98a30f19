//! Ollama's API (`/api/chat`, `/api/generate`, `/api/tags`, `/api/show`, `/api/ps`,
//! `/api/version`), so that the `ollama` clients and the tools that speak only Ollama
//! work against `brise serve`.
//!
//! This is a dialect, not a second server: a request is translated to the OpenAI body
//! `/v1/chat/completions` (or `/v1/completions` for `raw` and `suffix`) takes, and run
//! through the same function ([`routes::chat_request`], [`routes::completions_request`]),
//! so validation, adapters and versions, tenants and keys, limits, deadlines, the ledger
//! record (under the Ollama route's name) and its id are theirs. The request always
//! streams internally (with usage): the server-sent events are read back here and
//! turned into Ollama's NDJSON lines, or gathered into one answer when the client asked
//! for `stream: false`. Every error of these routes has Ollama's shape
//! `{"error": "message"}` with the status brise chose.

use crate::error::{ApiError, ApiResult};
use crate::routes;
use crate::{AppState, ServedModel, Tenant};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type St = State<Arc<AppState>>;

/// The header carrying the ledger id of an answer (what `POST /v1/feedback` takes as
/// `completion_id`): Ollama's answers have no id field of their own.
pub const COMPLETION_ID_HEADER: &str = "x-brise-completion-id";

pub fn router(state: Arc<AppState>) -> Router<Arc<AppState>> {
    let generation = Router::new()
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
        .layer(middleware::map_response(routes::ai_marker));
    Router::new()
        .merge(generation)
        .route("/api/tags", get(tags))
        .route("/api/show", post(show))
        .route("/api/ps", get(ps))
        .route("/api/version", get(version))
        .route("/api/{*rest}", any(unsupported))
        .route_layer(middleware::from_fn_with_state(state, routes::auth))
        .layer(middleware::map_response(ollama_errors))
}

/// Rewrites every error of these routes (the handlers', and auth's, rate limits', body
/// limits') from OpenAI's `{"error": {"message", …}}` to Ollama's `{"error": "…"}`.
async fn ollama_errors(r: Response) -> Response {
    if r.status().is_success() {
        return r;
    }
    let (mut parts, body) = r.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| match v.get("error") {
            Some(Value::Object(e)) => e.get("message").and_then(|m| m.as_str()).map(String::from),
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(json!({ "error": message }).to_string()))
}

async fn unsupported(req: Request) -> ApiError {
    let path = req.uri().path().to_string();
    // Ollama routes brise knows of but does not serve: 501, not "no such route".
    const KNOWN: &[&str] = &[
        "/api/pull",
        "/api/push",
        "/api/create",
        "/api/copy",
        "/api/delete",
        "/api/embed",
        "/api/embeddings",
    ];
    let served = "brise serves /api/chat, /api/generate, /api/tags, /api/show, /api/ps and \
                  /api/version";
    if KNOWN.contains(&path.as_str()) || path.starts_with("/api/blobs/") {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "invalid_request_error",
            format!(
                "{path} is not implemented by brise ({served}; models are fetched with `brise pull`)"
            ),
        )
    } else {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no route {} {path} ({served})", req.method()),
        )
    }
}

// ---- time

/// RFC 3339 in UTC with nanoseconds, as Ollama writes `created_at`.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

fn now() -> String {
    rfc3339(SystemTime::now())
}

// ---- requests

/// A request translated to the OpenAI body brise's own routes take.
#[derive(Debug)]
struct Translated {
    /// The OpenAI body (always streamed, with usage).
    body: Map<String, Value>,
    /// `/api/chat` (or `/api/generate` through the chat template): chat-completion
    /// events; else text-completion events.
    chat: bool,
    /// The client's `stream` (Ollama's default: true).
    stream: bool,
    num_ctx: Option<u64>,
    /// The model's name as the client wrote it (`x:latest`), for errors.
    requested: String,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

fn unknown(at: &str) -> ApiError {
    ApiError {
        code: Some("unknown_parameter"),
        ..ApiError::param(at, format!("unknown field {at}: brise does not know it"))
    }
}

fn not_supported(at: &str, what: &str) -> ApiError {
    ApiError {
        code: Some("unsupported_parameter"),
        ..ApiError::param(at, format!("{at}: {what}"))
    }
}

fn type_error(at: &str, want: &str) -> ApiError {
    ApiError::param(at, format!("{at} must be {want}"))
}

/// `name:latest` is `name` (Ollama's default tag); other names pass as they are.
fn served_name(name: &str) -> &str {
    name.strip_suffix(":latest").unwrap_or(name)
}

/// The model's name as written, and as served.
fn take_model(o: &mut Map<String, Value>, key: &str) -> ApiResult<(String, String)> {
    match o.remove(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok((s.clone(), served_name(&s).to_string())),
        None | Some(Value::Null) => Err(ApiError::param("model", "model is required")),
        Some(_) => Err(type_error("model", "a non-empty string")),
    }
}

fn take_bool(o: &mut Map<String, Value>, k: &str) -> ApiResult<Option<bool>> {
    match o.remove(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(_) => Err(type_error(k, "a boolean")),
    }
}

fn take_string(o: &mut Map<String, Value>, k: &str) -> ApiResult<Option<String>> {
    match o.remove(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(type_error(k, "a string")),
    }
}

/// Fields every generation request may carry that change nothing here: `keep_alive`
/// (brise keeps its models loaded), and `think` when off (brise's models do not think).
fn common(o: &mut Map<String, Value>, out: &mut Map<String, Value>) -> ApiResult<bool> {
    match o.remove("keep_alive") {
        None | Some(Value::Null | Value::String(_) | Value::Number(_)) => {}
        Some(_) => {
            return Err(type_error(
                "keep_alive",
                "a duration or a number of seconds",
            ));
        }
    }
    match o.remove("think") {
        None | Some(Value::Null | Value::Bool(false)) => {}
        Some(_) => {
            return Err(not_supported(
                "think",
                "thinking is not supported: brise's models have no thinking mode",
            ));
        }
    }
    if let Some(f) = o.remove("format") {
        format(f, out)?;
    }
    let logprobs = take_bool(o, "logprobs")?.unwrap_or(false);
    if let Some(n) = o.remove("top_logprobs").filter(|v| !v.is_null()) {
        if !logprobs {
            return Err(ApiError::param(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ));
        }
        out.insert("top_logprobs".into(), n);
    }
    if logprobs {
        out.insert("logprobs".into(), json!(true));
    }
    for k in ["images"] {
        match o.remove(k) {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => {
                return Err(not_supported(
                    k,
                    "images are not supported: brise's models read text only",
                ));
            }
        }
    }
    Ok(take_bool(o, "stream")?.unwrap_or(true))
}

/// `format`: `"json"` (any JSON value the model writes as an object), or a JSON Schema
/// object (the output is constrained to it), as brise's `response_format`.
fn format(f: Value, out: &mut Map<String, Value>) -> ApiResult<()> {
    let rf = match f {
        Value::Null => return Ok(()),
        Value::String(s) if s.is_empty() => return Ok(()),
        Value::String(s) if s == "json" => json!({"type": "json_object"}),
        Value::Object(schema) => json!({
            "type": "json_schema",
            "json_schema": {"name": "ollama_format", "schema": schema},
        }),
        other => {
            return Err(ApiError::param(
                "format",
                format!("format must be \"json\" or a JSON Schema object, not {other}"),
            ));
        }
    };
    out.insert("response_format".into(), rf);
    Ok(())
}

/// Options brise accepts and that change nothing: where and how the model runs (brise
/// decides that at start: threads, memory mapping, batches), or what only matters when
/// a context is shifted (brise never shifts one: a prompt that does not fit is a 400).
const NO_EFFECT: &[&str] = &[
    "numa",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mmap",
    "use_mlock",
    "embedding_only",
    "num_thread",
    "num_keep",
];

/// The penalty window brise (and llama.cpp, and Ollama by default) uses.
const PENALTY_LAST_N: i64 = 64;

/// Maps Ollama's `options` onto the OpenAI body; returns `num_ctx` for the caller to
/// check against the model's context. An option brise does not know, or cannot honour,
/// is a 400 naming it.
fn options(opts: Value, out: &mut Map<String, Value>) -> ApiResult<Option<u64>> {
    let o = match opts {
        Value::Null => return Ok(None),
        Value::Object(o) => o,
        _ => return Err(type_error("options", "an object")),
    };
    let mut unknown_opts = Vec::new();
    let mut num_ctx = None;
    let mirostat_on = o
        .get("mirostat")
        .is_some_and(|v| !v.is_null() && v.as_i64() != Some(0));
    for (k, v) in o {
        if v.is_null() {
            continue;
        }
        let at = format!("options.{k}");
        let num = |v: &Value| v.as_f64().ok_or_else(|| type_error(&at, "a number"));
        let int = |v: &Value| v.as_i64().ok_or_else(|| type_error(&at, "an integer"));
        match k.as_str() {
            "temperature" | "top_p" | "min_p" | "presence_penalty" | "frequency_penalty"
            | "repeat_penalty" => {
                num(&v)?;
                out.insert(k, v);
            }
            "top_k" => {
                int(&v)?;
                out.insert(k, v);
            }
            // Ollama's -1 is "a random seed", as leaving it out.
            "seed" => {
                if int(&v)? != -1 {
                    out.insert(k, v);
                }
            }
            "num_predict" => match int(&v)? {
                // -1: until the end (-2: until the context is full): brise's default
                // limit, and its loop check, apply.
                -1 | -2 => {}
                n if n >= 1 => {
                    out.insert("max_tokens".into(), json!(n));
                }
                n => {
                    return Err(ApiError::param(
                        &at,
                        format!("{at} = {n}: it must be ≥ 1, or -1 (no limit of its own)"),
                    ));
                }
            },
            "stop" => match &v {
                Value::String(_) => {
                    out.insert(k, json!([v]));
                }
                Value::Array(a) if a.iter().all(|s| s.is_string()) => {
                    out.insert(k, v);
                }
                _ => return Err(type_error(&at, "a list of strings")),
            },
            "num_ctx" => {
                num_ctx = Some(
                    v.as_u64()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| type_error(&at, "a positive integer"))?,
                );
            }
            "repeat_last_n" => {
                if int(&v)? != PENALTY_LAST_N {
                    return Err(not_supported(
                        &at,
                        &format!(
                            "brise's penalties look at the last {PENALTY_LAST_N} tokens (Ollama's \
                             default); another window is not supported"
                        ),
                    ));
                }
            }
            "typical_p" | "tfs_z" => {
                if num(&v)? != 1.0 {
                    return Err(not_supported(
                        &at,
                        &format!("{k} sampling is not supported (only 1, which disables it)"),
                    ));
                }
            }
            "mirostat" => {
                if int(&v)? != 0 {
                    return Err(not_supported(
                        &at,
                        "mirostat sampling is not supported (only 0, which disables it)",
                    ));
                }
            }
            // Mirostat's settings, which do nothing while mirostat is off.
            "mirostat_tau" | "mirostat_eta" if !mirostat_on => {
                num(&v)?;
            }
            "penalize_newline" => {
                if v != Value::Bool(false) {
                    return Err(not_supported(
                        &at,
                        "penalizing newlines is not supported (only false)",
                    ));
                }
            }
            _ if NO_EFFECT.contains(&k.as_str()) => {}
            _ => unknown_opts.push(k),
        }
    }
    if !unknown_opts.is_empty() {
        let first = format!("options.{}", unknown_opts[0]);
        return Err(ApiError {
            code: Some("unknown_parameter"),
            ..ApiError::param(
                &first,
                format!(
                    "unknown option{} {}: brise does not know {} (docs/API.md, \"Ollama\", lists \
                     the options it maps and those it accepts without effect)",
                    if unknown_opts.len() > 1 { "s" } else { "" },
                    unknown_opts.join(", "),
                    if unknown_opts.len() > 1 { "them" } else { "it" },
                ),
            )
        });
    }
    Ok(num_ctx)
}

/// Ollama's messages as OpenAI's: `images` refused, `tool_name` is the tool message's
/// `name`, `tool_calls` (arguments as objects) pass to the chat template as they are.
fn messages(v: Value) -> ApiResult<Vec<Value>> {
    let Value::Array(list) = v else {
        return Err(type_error("messages", "a list"));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.into_iter().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(mut m) = m else {
            return Err(type_error(&at, "an object"));
        };
        let mut msg = Map::new();
        match m.remove("role") {
            Some(r @ Value::String(_)) => {
                msg.insert("role".into(), r);
            }
            _ => return Err(type_error(&format!("{at}.role"), "a string")),
        }
        // The ollama client leaves out empty fields: no content is empty content.
        match m.remove("content") {
            None | Some(Value::Null) => {
                msg.insert("content".into(), json!(""));
            }
            Some(c @ Value::String(_)) => {
                msg.insert("content".into(), c);
            }
            Some(_) => return Err(type_error(&format!("{at}.content"), "a string")),
        }
        match m.remove("images") {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => {
                return Err(not_supported(
                    &format!("{at}.images"),
                    "images are not supported: brise's models read text only",
                ));
            }
        }
        match m.remove("thinking") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(_) => {
                return Err(not_supported(
                    &format!("{at}.thinking"),
                    "thinking is not supported: brise's models have no thinking mode",
                ));
            }
        }
        if let Some(n) = m.remove("tool_name").filter(|v| !v.is_null()) {
            msg.insert("name".into(), n);
        }
        for k in ["tool_calls", "name", "tool_call_id"] {
            if let Some(v) = m.remove(k).filter(|v| !v.is_null()) {
                msg.insert(k.into(), v);
            }
        }
        if let Some(k) = m.keys().find(|k| !m[*k].is_null()) {
            return Err(unknown(&format!("{at}.{k}")));
        }
        out.push(Value::Object(msg));
    }
    Ok(out)
}

fn no_unknown(o: &Map<String, Value>) -> ApiResult<()> {
    match o.iter().find(|(_, v)| !v.is_null()) {
        Some((k, _)) => Err(unknown(k)),
        None => Ok(()),
    }
}

fn base_body(model: String) -> Map<String, Value> {
    let mut b = Map::new();
    b.insert("model".into(), json!(model));
    b.insert("stream".into(), json!(true));
    b.insert("stream_options".into(), json!({"include_usage": true}));
    b
}

/// `POST /api/chat`'s body as a chat completion's.
fn translate_chat(body: &[u8]) -> ApiResult<Translated> {
    let mut o = parse_object(body)?;
    let (requested, served) = take_model(&mut o, "model")?;
    let mut out = base_body(served);
    let stream = common(&mut o, &mut out)?;
    let num_ctx = options(o.remove("options").unwrap_or(Value::Null), &mut out)?;
    let msgs = messages(o.remove("messages").unwrap_or(json!([])))?;
    out.insert("messages".into(), Value::Array(msgs));
    match o.remove("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(t)) if t.is_empty() => {}
        Some(t @ Value::Array(_)) => {
            out.insert("tools".into(), t);
        }
        Some(_) => return Err(type_error("tools", "a list")),
    }
    no_unknown(&o)?;
    Ok(Translated {
        body: out,
        chat: true,
        stream,
        num_ctx,
        requested,
    })
}

/// `POST /api/generate`'s body: through the chat template (`system` and `prompt` as a
/// conversation), or raw (`raw: true`: the prompt as it is), or fill in the middle
/// (`suffix`).
fn translate_generate(body: &[u8]) -> ApiResult<Translated> {
    let mut o = parse_object(body)?;
    let (requested, served) = take_model(&mut o, "model")?;
    let mut out = base_body(served);
    let stream = common(&mut o, &mut out)?;
    let num_ctx = options(o.remove("options").unwrap_or(Value::Null), &mut out)?;
    let prompt = take_string(&mut o, "prompt")?.unwrap_or_default();
    let system = take_string(&mut o, "system")?.filter(|s| !s.is_empty());
    let suffix = take_string(&mut o, "suffix")?.filter(|s| !s.is_empty());
    let raw = take_bool(&mut o, "raw")?.unwrap_or(false);
    if take_string(&mut o, "template")?.is_some_and(|t| !t.is_empty()) {
        return Err(not_supported(
            "template",
            "a template of the request's own is not supported: brise renders the model's chat \
             template (use raw: true to send a prompt already formatted)",
        ));
    }
    match o.remove("context") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => {
            return Err(not_supported(
                "context",
                "context (the tokens of an earlier answer) is not supported: send the \
                 conversation to /api/chat instead",
            ));
        }
    }
    no_unknown(&o)?;
    let chat = !raw && suffix.is_none();
    if chat {
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(json!({"role": "system", "content": s}));
        }
        msgs.push(json!({"role": "user", "content": prompt}));
        out.insert("messages".into(), Value::Array(msgs));
    } else {
        if system.is_some() {
            return Err(ApiError::param(
                "system",
                if raw {
                    "system with raw: true: a raw prompt is sent as it is, with no template to put \
                     a system prompt in"
                } else {
                    "system with suffix: fill-in-the-middle prompts have no system prompt"
                },
            ));
        }
        if out.contains_key("logprobs") {
            return Err(not_supported(
                "logprobs",
                "logprobs with raw or suffix are not supported yet (they are through the chat \
                 template)",
            ));
        }
        out.insert("prompt".into(), json!(prompt));
        if let Some(s) = suffix {
            out.insert("suffix".into(), json!(s));
        }
    }
    Ok(Translated {
        body: out,
        chat,
        stream,
        num_ctx,
        requested,
    })
}

fn parse_object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(bad("the request body must be a JSON object")),
        Err(e) => Err(bad(format!("could not parse the JSON body: {e}"))),
    }
}

/// Whether the generate request only asks to load the model (no prompt, no suffix):
/// Ollama answers `done_reason: "load"` at once.
fn is_load_only(t: &Translated) -> bool {
    if t.chat {
        let msgs = t.body.get("messages").and_then(|m| m.as_array());
        let only_user_empty =
            msgs.is_some_and(|m| m.len() == 1 && m[0]["role"] == "user" && m[0]["content"] == "");
        msgs.is_none_or(|m| m.is_empty()) || only_user_empty
    } else {
        t.body.get("prompt").is_some_and(|p| p == "") && !t.body.contains_key("suffix")
    }
}

/// An error from brise's routes, in the names the Ollama client used.
fn rename(mut e: ApiError, model: &str) -> ApiError {
    if e.code == Some("model_not_found") {
        e.message = format!("model \"{model}\" not found");
        return e;
    }
    const OPTIONS: &[(&str, &str)] = &[
        ("max_tokens", "options.num_predict"),
        ("temperature", "options.temperature"),
        ("top_p", "options.top_p"),
        ("top_k", "options.top_k"),
        ("min_p", "options.min_p"),
        ("seed", "options.seed"),
        ("stop", "options.stop"),
        ("repeat_penalty", "options.repeat_penalty"),
        ("presence_penalty", "options.presence_penalty"),
        ("frequency_penalty", "options.frequency_penalty"),
    ];
    if let Some(p) = e.param.clone() {
        if let Some((_, o)) = OPTIONS.iter().find(|(k, _)| *k == p) {
            e.message = format!("{o}: {}", e.message.replace("max_tokens", "num_predict"));
            e.param = Some(o.to_string());
        } else if let Some(rest) = p.strip_prefix("response_format") {
            e.message = format!("format{rest}: {}", e.message);
        }
    }
    e
}

// ---- answers

/// Reads back the server-sent events of brise's streaming routes.
struct SseReader {
    body: axum::body::BodyDataStream,
    buf: Vec<u8>,
}

impl SseReader {
    fn new(r: Response) -> SseReader {
        SseReader {
            body: r.into_body().into_data_stream(),
            buf: Vec::new(),
        }
    }

    /// The next event's data as JSON; `None` at `[DONE]` or the end of the stream.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let text = String::from_utf8_lossy(&frame);
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                let data = data.join("\n");
                if data == "[DONE]" {
                    return None;
                }
                return Some(serde_json::from_str(&data).unwrap_or_else(|e| {
                    json!({"error": {"message": format!("unreadable event from the engine: {e}")}})
                }));
            }
            match self.body.next().await {
                Some(Ok(b)) => self.buf.extend_from_slice(&b),
                Some(Err(e)) => {
                    return Some(
                        json!({"error": {"message": format!("the answer broke off: {e}")}}),
                    );
                }
                None => return None,
            }
        }
    }
}

/// Times and counts of one answer, for the final line.
#[derive(Debug, Clone, Default)]
struct Stats {
    total: Duration,
    /// Until the first token (the prompt's evaluation, queueing included).
    prompt_eval: Duration,
    /// From the first token to the last.
    eval: Duration,
    prompt_eval_count: u64,
    eval_count: u64,
}

/// Ollama's `done_reason` for OpenAI's `finish_reason`: a tool call is a `stop`.
fn done_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "length",
        _ => "stop",
    }
}

/// The last line of an answer (`done: true`), with `message` (chat) or `response`
/// (generate) holding `text`: empty when streamed, the whole answer otherwise.
fn final_line(chat: bool, model: &str, text: &str, finish: Option<&str>, st: &Stats) -> Value {
    let ns = |d: Duration| d.as_nanos().min(u64::MAX as u128) as u64;
    let mut v = json!({
        "model": model,
        "created_at": now(),
        "done": true,
        "done_reason": done_reason(finish),
        "total_duration": ns(st.total),
        // Models are loaded when the server starts.
        "load_duration": 0,
        "prompt_eval_count": st.prompt_eval_count,
        "prompt_eval_duration": ns(st.prompt_eval),
        "eval_count": st.eval_count,
        // Never 0: clients divide by it for tokens per second.
        "eval_duration": ns(st.eval).max(1),
    });
    if chat {
        v["message"] = json!({"role": "assistant", "content": text});
    } else {
        v["response"] = json!(text);
    }
    v
}

/// OpenAI's tool calls (`arguments` as JSON text) as Ollama's (an object).
fn tool_calls(calls: &[Value]) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let f = &c["function"];
            let args = match &f["arguments"] {
                Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| json!(s)),
                other => other.clone(),
            };
            json!({
                "id": c["id"],
                "function": {"index": i, "name": f["name"], "arguments": args},
            })
        })
        .collect()
}

/// The events of one answer, turned into Ollama's lines.
struct Turn {
    /// `message` lines (chat) or `response` lines (generate).
    message: bool,
    /// Chat-completion events (else text-completion ones).
    chat_events: bool,
    model: String,
    start: Instant,
    first: Option<Instant>,
    text: String,
    tool_calls: Vec<Value>,
    logprobs: Vec<Value>,
    finish: Option<String>,
    done: bool,
}

impl Turn {
    fn line(&self, text: &str, calls: &[Value], logprobs: &[Value]) -> Value {
        let mut v = json!({"model": self.model, "created_at": now(), "done": false});
        if self.message {
            v["message"] = json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                v["message"]["tool_calls"] = json!(tool_calls(calls));
            }
        } else {
            v["response"] = json!(text);
        }
        if !logprobs.is_empty() {
            v["logprobs"] = json!(logprobs);
        }
        v
    }

    /// One event; returns the lines to stream (the final one included).
    fn event(&mut self, ev: Value) -> Vec<Value> {
        if self.done {
            return Vec::new();
        }
        if let Some(e) = ev.get("error") {
            self.done = true;
            let msg = e
                .get("message")
                .and_then(|m| m.as_str())
                .map(String::from)
                .unwrap_or_else(|| e.to_string());
            return vec![json!({ "error": msg })];
        }
        if let Some(m) = ev.get("model").and_then(|m| m.as_str()) {
            self.model = m.to_string();
        }
        let choice = ev.pointer("/choices/0");
        let Some(c) = choice else {
            // The usage event: the answer is complete (and recorded).
            let Some(u) = ev.get("usage").filter(|u| !u.is_null()) else {
                return Vec::new();
            };
            self.done = true;
            let end = Instant::now();
            let first = self.first.unwrap_or(end);
            let st = Stats {
                total: end - self.start,
                prompt_eval: first - self.start,
                eval: end - first,
                prompt_eval_count: u["prompt_tokens"].as_u64().unwrap_or(0),
                eval_count: u["completion_tokens"].as_u64().unwrap_or(0),
            };
            return vec![final_line(
                self.message,
                &self.model,
                "",
                self.finish.as_deref(),
                &st,
            )];
        };
        let (text, calls, lps) = if self.chat_events {
            let d = &c["delta"];
            (
                d["content"].as_str().unwrap_or("").to_string(),
                d["tool_calls"].as_array().cloned().unwrap_or_default(),
                c.pointer("/logprobs/content")
                    .and_then(|l| l.as_array())
                    .cloned()
                    .unwrap_or_default(),
            )
        } else {
            (
                c["text"].as_str().unwrap_or("").to_string(),
                Vec::new(),
                Vec::new(),
            )
        };
        if let Some(f) = c["finish_reason"].as_str() {
            self.finish = Some(f.to_string());
        }
        if text.is_empty() && calls.is_empty() && lps.is_empty() {
            if self.finish.is_some() && self.first.is_none() {
                self.first = Some(Instant::now());
            }
            return Vec::new();
        }
        if self.first.is_none() {
            self.first = Some(Instant::now());
        }
        self.text.push_str(&text);
        self.tool_calls.extend(calls.iter().cloned());
        self.logprobs.extend(lps.iter().cloned());
        vec![self.line(&text, &calls, &lps)]
    }
}

/// Runs a translated request through brise's own route and answers in Ollama's shape.
async fn run(
    s: &Arc<AppState>,
    tenant: &Tenant,
    headers: &HeaderMap,
    t: Translated,
    message: bool,
    endpoint: &str,
) -> ApiResult<Response> {
    let model = t.body["model"].as_str().unwrap_or_default().to_string();
    if let Some(n) = t.num_ctx
        && let Some(m) = s.find(&model)
        && n > m.n_ctx() as u64
    {
        return Err(ApiError::param(
            "options.num_ctx",
            format!(
                "options.num_ctx = {n} is more than {}'s context per request on this server ({} \
                 tokens: brise serve's -c divided by --parallel)",
                m.id,
                m.n_ctx()
            ),
        ));
    }
    let start = Instant::now();
    let body = serde_json::to_vec(&t.body).unwrap_or_default();
    let r = if t.chat {
        routes::chat_request(s, tenant, headers, &body, endpoint).await
    } else {
        routes::completions_request(s, tenant, headers, &body, endpoint).await
    }
    .map_err(|e| rename(e, &t.requested))?;
    let mut reader = SseReader::new(r);
    let mut turn = Turn {
        message,
        chat_events: t.chat,
        model: model.clone(),
        start,
        first: None,
        text: String::new(),
        tool_calls: Vec::new(),
        logprobs: Vec::new(),
        finish: None,
        done: false,
    };
    // The first event carries the record's id, which goes in a header.
    let first = reader.next().await;
    let id = first
        .as_ref()
        .and_then(|e| e.get("id"))
        .and_then(|i| i.as_str())
        .map(String::from);
    let with_id = |mut r: Response| {
        if let Some(v) = id.as_deref().and_then(|i| HeaderValue::from_str(i).ok()) {
            r.headers_mut().insert(COMPLETION_ID_HEADER, v);
        }
        r
    };
    if !t.stream {
        let mut last = None;
        let mut ev = first;
        while let Some(e) = ev {
            for line in turn.event(e) {
                last = Some(line);
            }
            if turn.done {
                break;
            }
            ev = reader.next().await;
        }
        let finished = last
            .as_ref()
            .is_some_and(|l| l.get("done") == Some(&json!(true)));
        let mut last = match last {
            Some(l) if finished => l,
            other => {
                let msg = other
                    .as_ref()
                    .and_then(|l| l.get("error"))
                    .and_then(|e| e.as_str())
                    .unwrap_or("the engine stopped before the answer was complete")
                    .to_string();
                let status = if msg.contains("--timeout") {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                return Err(ApiError::new(status, "server_error", msg));
            }
        };
        if message {
            last["message"]["content"] = json!(turn.text);
            if !turn.tool_calls.is_empty() {
                last["message"]["tool_calls"] = json!(tool_calls(&turn.tool_calls));
            }
        } else {
            last["response"] = json!(turn.text);
        }
        if !turn.logprobs.is_empty() {
            last["logprobs"] = json!(turn.logprobs);
        }
        return Ok(with_id(axum::Json(last).into_response()));
    }
    struct St2 {
        reader: SseReader,
        turn: Turn,
        pending: Option<Value>,
    }
    let st = St2 {
        reader,
        turn,
        pending: first,
    };
    let lines = futures_util::stream::unfold(st, |mut st| async move {
        if st.turn.done {
            return None;
        }
        let ev = match st.pending.take() {
            Some(e) => Some(e),
            None => st.reader.next().await,
        };
        let lines = match ev {
            Some(e) => st.turn.event(e),
            None => {
                st.turn.done = true;
                vec![json!({"error": "the engine stopped before the answer was complete"})]
            }
        };
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(l.to_string().as_bytes());
            out.push(b'\n');
        }
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(out)), st))
    })
    .filter(|b| futures_util::future::ready(!matches!(b, Ok(b) if b.is_empty())));
    let mut r = Response::new(Body::from_stream(lines));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(with_id(r))
}

/// The answer to a request that only loads the model (Ollama's way to preload one).
fn loaded(s: &AppState, t: &Translated, message: bool) -> ApiResult<Response> {
    let m = find(s, &t.requested)?;
    let mut v = json!({
        "model": m.id,
        "created_at": now(),
        "done": true,
        "done_reason": "load",
    });
    if message {
        v["message"] = json!({"role": "assistant", "content": ""});
    } else {
        v["response"] = json!("");
    }
    Ok(axum::Json(v).into_response())
}

async fn chat(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = routes::body_bytes(body)?;
    let t = translate_chat(&body)?;
    if t.body["messages"].as_array().is_some_and(|m| m.is_empty()) {
        return loaded(&s, &t, true);
    }
    run(&s, &tenant, &headers, t, true, "/api/chat").await
}

async fn generate(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = routes::body_bytes(body)?;
    let t = translate_generate(&body)?;
    if is_load_only(&t) {
        return loaded(&s, &t, false);
    }
    run(&s, &tenant, &headers, t, false, "/api/generate").await
}

// ---- models

fn find<'a>(s: &'a AppState, name: &str) -> ApiResult<&'a ServedModel> {
    routes::ready(s)?;
    s.find(served_name(name)).ok_or_else(|| ApiError {
        code: Some("model_not_found"),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("model \"{name}\" not found"),
        )
    })
}

/// "134.52M", "1.54B": Ollama's parameter_size.
fn parameter_size(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else {
        format!("{n}")
    }
}

/// The file's quantization as its name says it (`Q4_K_M`, `Q8_0`, `F16`), else the
/// type of the first layer's attention weights.
fn quantization(m: &ServedModel) -> String {
    let name = m
        .model
        .path
        .file_name()
        .map(|f| f.to_string_lossy().to_uppercase())
        .unwrap_or_default();
    let stem = name.strip_suffix(".GGUF").unwrap_or(&name);
    let tag = stem.rsplit(['.', '-']).find(|p| {
        let b = p.as_bytes();
        (b.len() >= 2 && (b[0] == b'Q' || b[0] == b'F') && b[1].is_ascii_digit())
            || p.starts_with("IQ")
            || *p == "BF16"
    });
    match tag {
        Some(t) => t.to_string(),
        None => m
            .model
            .weights
            .layers
            .first()
            .map(|l| l.wq.ty.name().to_string())
            .unwrap_or_default(),
    }
}

fn details(m: &ServedModel) -> Value {
    let family = m.model.cfg.arch.name();
    json!({
        "parent_model": "",
        "format": match m.model.format {
            brise_model::model::ModelFormat::Gguf => "gguf",
            brise_model::model::ModelFormat::Safetensors => "safetensors",
        },
        "family": family,
        "families": [family],
        "parameter_size": parameter_size(m.model.n_params()),
        "quantization_level": quantization(m),
    })
}

/// The model's size on disk, and when its file last changed.
fn file_info(m: &ServedModel) -> (u64, SystemTime) {
    let p = &m.model.path;
    let created = UNIX_EPOCH + Duration::from_secs(m.created);
    match std::fs::metadata(p) {
        Ok(md) if md.is_file() => (md.len(), md.modified().unwrap_or(created)),
        Ok(md) => {
            let size = std::fs::read_dir(p)
                .map(|d| {
                    d.filter_map(|e| e.ok()?.metadata().ok())
                        .filter(|m| m.is_file())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            (size, md.modified().unwrap_or(created))
        }
        Err(_) => (0, created),
    }
}

fn model_entry(m: &ServedModel) -> Value {
    let (size, modified) = file_info(m);
    json!({
        "name": m.id,
        "model": m.id,
        "modified_at": rfc3339(modified),
        "size": size,
        "digest": m.sha256,
        "details": details(m),
    })
}

async fn tags(State(s): St) -> ApiResult<Response> {
    let models = routes::ready(&s)?;
    let list: Vec<Value> = models.iter().map(model_entry).collect();
    Ok(axum::Json(json!({ "models": list })).into_response())
}

async fn ps(State(s): St) -> ApiResult<Response> {
    let models = routes::ready(&s)?;
    let list: Vec<Value> = models
        .iter()
        .map(|m| {
            let mut e = model_entry(m);
            if let Some(o) = e.as_object_mut() {
                o.remove("modified_at");
            }
            // Loaded for the server's lifetime, on the CPU.
            e["size_vram"] = json!(0);
            e["context_length"] = json!(m.n_ctx());
            e
        })
        .collect();
    Ok(axum::Json(json!({ "models": list })).into_response())
}

async fn version() -> Response {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

/// `parameters` as a Modelfile writes them: the sampling defaults brise applies.
fn parameters(m: &ServedModel) -> String {
    let d = &m.defaults;
    let mut p = format!(
        "temperature {}\ntop_k {}\ntop_p {}\nmin_p {}\nrepeat_penalty {}\nrepeat_last_n {}",
        d.temperature, d.top_k, d.top_p, d.min_p, d.repeat_penalty, d.penalty_last_n
    );
    if let Some(n) = m.max_tokens {
        p.push_str(&format!("\nnum_predict {n}"));
    }
    p.push_str(&format!("\nnum_ctx {}", m.n_ctx()));
    p
}

async fn show(State(s): St, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let body = routes::body_bytes(body)?;
    let mut o = parse_object(&body)?;
    // `name` is the older clients' spelling.
    let name = match (o.remove("model"), o.remove("name")) {
        (Some(Value::String(m)), _) | (None | Some(Value::Null), Some(Value::String(m))) => m,
        _ => return Err(ApiError::param("model", "model is required")),
    };
    take_bool(&mut o, "verbose")?;
    no_unknown(&o)?;
    let m = find(&s, &name)?;
    let c = &m.model.cfg;
    let arch = c.arch.name();
    let mut info = Map::new();
    info.insert("general.architecture".into(), json!(arch));
    info.insert("general.name".into(), json!(m.model.name));
    info.insert("general.parameter_count".into(), json!(m.model.n_params()));
    for (k, v) in [
        ("context_length", json!(c.n_ctx_train)),
        ("embedding_length", json!(c.n_embd)),
        ("block_count", json!(c.n_layer)),
        ("feed_forward_length", json!(c.n_ff)),
        ("attention.head_count", json!(c.n_head)),
        ("attention.head_count_kv", json!(c.n_head_kv)),
        ("attention.layer_norm_rms_epsilon", json!(c.rms_eps)),
        ("rope.freq_base", json!(c.rope_base)),
        ("vocab_size", json!(c.n_vocab)),
    ] {
        info.insert(format!("{arch}.{k}"), v);
    }
    let template = m.model.chat_template.as_ref().map(|t| t.source.clone());
    let mut caps = vec!["completion"];
    if m.model
        .chat_template
        .as_ref()
        .is_some_and(|t| t.tool_format().is_some())
    {
        caps.push("tools");
    }
    if m.model.fim_tokens().is_some() {
        caps.push("insert");
    }
    let (_, modified) = file_info(m);
    Ok(axum::Json(json!({
        "license": "",
        // brise has no Modelfiles: the model is served from its file as it is.
        "modelfile": format!("# served by brise from {}\n", m.id),
        "parameters": parameters(m),
        // A Jinja chat template (Hugging Face's), not a Go template as Ollama's own.
        "template": template.unwrap_or_default(),
        "details": details(m),
        "model_info": info,
        "capabilities": caps,
        "modified_at": rfc3339(modified),
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: Value) -> ApiResult<(Map<String, Value>, Option<u64>)> {
        let mut out = Map::new();
        let n = options(v, &mut out)?;
        Ok((out, n))
    }

    #[test]
    fn options_map_to_brise_sampling() {
        let (out, n) = opts(json!({
            "temperature": 0, "top_p": 0.9, "top_k": 20, "min_p": 0.1, "seed": 7,
            "num_predict": 8, "stop": ["\n\n"], "repeat_penalty": 1.1,
            "presence_penalty": 0.5, "frequency_penalty": 0.25, "num_ctx": 2048,
        }))
        .unwrap();
        assert_eq!(
            Value::Object(out),
            json!({
                "temperature": 0, "top_p": 0.9, "top_k": 20, "min_p": 0.1, "seed": 7,
                "max_tokens": 8, "stop": ["\n\n"], "repeat_penalty": 1.1,
                "presence_penalty": 0.5, "frequency_penalty": 0.25,
            })
        );
        assert_eq!(n, Some(2048));
        // -1 (no limit, a random seed): brise's own defaults.
        let (out, _) = opts(json!({"num_predict": -1, "seed": -1, "stop": "x"})).unwrap();
        assert_eq!(Value::Object(out), json!({"stop": ["x"]}));
    }

    #[test]
    fn options_without_effect_are_accepted_unknown_ones_are_400s() {
        let (out, _) = opts(json!({
            "num_thread": 2, "num_gpu": 0, "use_mmap": true, "num_keep": 4,
            "repeat_last_n": 64, "typical_p": 1.0, "mirostat": 0, "mirostat_tau": 5.0,
            "penalize_newline": false,
        }))
        .unwrap();
        assert!(out.is_empty(), "{out:?}");
        let e = opts(json!({"temperature": 0.1, "bogus": 1, "other": 2})).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("bogus, other"), "{}", e.message);
        for bad in [
            json!({"mirostat": 2}),
            json!({"mirostat": 1, "mirostat_tau": 5.0}),
            json!({"repeat_last_n": 32}),
            json!({"typical_p": 0.5}),
            json!({"num_predict": 0}),
            json!({"num_ctx": -1}),
            json!({"temperature": "hot"}),
            json!({"stop": [1]}),
        ] {
            let e = opts(bad.clone()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(e.param.is_some_and(|p| p.starts_with("options.")), "{bad}");
        }
    }

    #[test]
    fn chat_and_generate_translate_to_openai_bodies() {
        let t = translate_chat(
            br#"{"model":"smollm2:latest","messages":[{"role":"user","content":"Hi"},
                {"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":{"a":1}}}]},
                {"role":"tool","content":"2","tool_name":"f"}],
                "format":"json","options":{"num_predict":4},"tools":[],"keep_alive":"5m"}"#,
        )
        .unwrap();
        assert!(t.stream && t.chat);
        assert_eq!(t.body["model"], "smollm2");
        assert_eq!(t.body["max_tokens"], 4);
        assert_eq!(t.body["response_format"], json!({"type": "json_object"}));
        assert_eq!(t.body["messages"][1]["content"], "");
        assert_eq!(t.body["messages"][2]["name"], "f");
        assert!(!t.body.contains_key("tools"));
        for (body, param) in [
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x","images":["aGk="]}]}"#,
                "messages[0].images",
            ),
            (r#"{"model":"m","messages":[],"nope":1}"#, "nope"),
            (r#"{"model":"m","messages":[],"think":true}"#, "think"),
            (r#"{"model":"m","messages":[],"format":"yaml"}"#, "format"),
        ] {
            let e = translate_chat(body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
        let g = translate_generate(
            br#"{"model":"m","prompt":"Hi","system":"Be brief","stream":false}"#,
        )
        .unwrap();
        assert!(g.chat && !g.stream);
        assert_eq!(
            g.body["messages"],
            json!([{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}])
        );
        let raw = translate_generate(br#"{"model":"m","prompt":"def f(","raw":true}"#).unwrap();
        assert!(!raw.chat && raw.body["prompt"] == "def f(");
        let fim = translate_generate(br#"{"model":"m","prompt":"a","suffix":"b"}"#).unwrap();
        assert!(!fim.chat && fim.body["suffix"] == "b");
        for (body, param) in [
            (r#"{"model":"m","prompt":"x","context":[1,2]}"#, "context"),
            (
                r#"{"model":"m","prompt":"x","raw":true,"system":"s"}"#,
                "system",
            ),
            (
                r#"{"model":"m","prompt":"x","template":"{{ .Prompt }}"}"#,
                "template",
            ),
            (r#"{"model":"m","prompt":"x","images":["aGk="]}"#, "images"),
        ] {
            let e = translate_generate(body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
        assert!(is_load_only(
            &translate_generate(br#"{"model":"m"}"#).unwrap()
        ));
    }

    #[test]
    fn final_line_has_ollamas_fields_in_nanoseconds() {
        let st = Stats {
            total: Duration::from_millis(1500),
            prompt_eval: Duration::from_millis(200),
            eval: Duration::from_millis(1300),
            prompt_eval_count: 12,
            eval_count: 8,
        };
        let l = final_line(true, "smollm2:135m", "", Some("length"), &st);
        assert_eq!(l["done"], true);
        assert_eq!(l["done_reason"], "length");
        assert_eq!(l["total_duration"], 1_500_000_000u64);
        assert_eq!(l["load_duration"], 0);
        assert_eq!(l["prompt_eval_count"], 12);
        assert_eq!(l["prompt_eval_duration"], 200_000_000u64);
        assert_eq!(l["eval_count"], 8);
        assert_eq!(l["eval_duration"], 1_300_000_000u64);
        assert_eq!(l["message"], json!({"role": "assistant", "content": ""}));
        assert!(l["created_at"].as_str().unwrap().ends_with('Z'));
        let g = final_line(false, "m", "text", Some("tool_calls"), &Stats::default());
        assert_eq!(g["done_reason"], "stop");
        assert_eq!(g["response"], "text");
        assert!(g.get("message").is_none());
        assert_eq!(g["eval_duration"], 1, "never 0");
    }

    #[test]
    fn events_become_lines_and_tool_call_arguments_objects() {
        let mut t = Turn {
            message: true,
            chat_events: true,
            model: "m".into(),
            start: Instant::now(),
            first: None,
            text: String::new(),
            tool_calls: Vec::new(),
            logprobs: Vec::new(),
            finish: None,
            done: false,
        };
        let role = json!({"id": "chatcmpl-1", "model": "m:v1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]});
        assert!(t.event(role).is_empty());
        let l = t.event(json!({"choices": [{"delta": {"content": "Hel"}, "finish_reason": null}]}));
        assert_eq!(l[0]["message"]["content"], "Hel");
        assert_eq!(l[0]["model"], "m:v1");
        assert_eq!(l[0]["done"], false);
        let l = t.event(json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}, "finish_reason": null}]}));
        assert_eq!(
            l[0]["message"]["tool_calls"][0]["function"]["arguments"],
            json!({"a": 1})
        );
        assert!(
            t.event(json!({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}))
                .is_empty()
        );
        let l =
            t.event(json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}));
        assert_eq!(l[0]["done"], true);
        assert_eq!(l[0]["done_reason"], "stop");
        assert_eq!(l[0]["eval_count"], 3);
        assert!(t.done);
        let mut e = Turn { done: false, ..t };
        let l = e.event(json!({"error": {"message": "boom", "type": "server_error"}}));
        assert_eq!(l, vec![json!({"error": "boom"})]);
    }

    #[test]
    fn names_and_times() {
        assert_eq!(served_name("qwen2.5-coder:latest"), "qwen2.5-coder");
        assert_eq!(served_name("smollm2:135m"), "smollm2:135m");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::new(1_709_251_199, 5)),
            "2024-02-29T23:59:59.000000005Z"
        );
        assert_eq!(parameter_size(134_515_008), "134.52M");
        assert_eq!(parameter_size(1_543_714_304), "1.54B");
        let e = rename(
            ApiError::param("max_tokens", "max_tokens = 9999 is too many"),
            "m",
        );
        assert_eq!(
            e.message,
            "options.num_predict: num_predict = 9999 is too many"
        );
        let e = rename(ApiError::model_not_found("x", &[]), "x:1b");
        assert_eq!(e.message, "model \"x:1b\" not found");
    }
}
