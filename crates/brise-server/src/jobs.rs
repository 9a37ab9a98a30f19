//! Files and fine-tuning jobs, shaped like OpenAI's and Mistral's APIs, and the runner
//! that trains them one at a time.
//!
//! - `POST /v1/files` (multipart: `file`, `purpose` = `fine-tune`) keeps a JSONL file in
//!   the ledger; `GET /v1/files[/{id}[/content]]`, `DELETE /v1/files/{id}`.
//! - `POST /v1/fine_tuning/jobs` queues a job. OpenAI's request (`training_file`,
//!   `validation_file`, `hyperparameters` or `method`) gets OpenAI-shaped answers;
//!   Mistral's (`training_files: [{file_id, weight}]`, `validation_files`) Mistral-shaped
//!   ones, for that job from then on. The file is parsed at once, so a bad row is a 400
//!   naming it, not a failed job later.
//! - `GET /v1/fine_tuning/jobs[/{id}]`, `GET …/{id}/events` (messages and a metrics event
//!   per optimizer step), `POST …/{id}/cancel`.
//! - The runner claims queued jobs of the models this server serves (several servers may
//!   share a ledger), and runs each like `brise train`: the pipeline's split or the
//!   validation file, the gate against the version serving now, registration in the
//!   adapter registry with lineage. A job's result is a registry version, served at once
//!   by id as `fine_tuned_model` = `MODEL:VERSION-ID`; promotion is an admin's decision
//!   (`/v1/admin/adapters/{id}/promote`), except for `--learn`'s own jobs, which promote
//!   when the gate passes. Training runs on its own threads at a lower CPU priority.

use crate::error::{ApiError, ApiResult};
use crate::{AppState, Tenant};
use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Extension, Multipart, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use brise_ledger::Ledger;
use brise_ledger::jobs::{FileInfo, Job, JobEnd, JobEvent, JobStatus, NewJob, SYSTEM_TENANT};
use brise_model::Model;
use brise_train::data::{Dataset, LedgerQuery, LoadOptions, Method, detect_format};
use brise_train::eval::GateConfig;
use brise_train::pipeline::{LearnData, LearnOptions, learn};
use brise_train::trainer::{StepReport, TrainConfig};
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

type St = State<Arc<AppState>>;

/// How this server trains (jobs and `--learn`).
#[derive(Clone, Debug)]
pub struct TrainSetup {
    pub threads: usize,
    /// Versions go to `adapters_dir/MODEL/vTIME/`.
    pub adapters_dir: PathBuf,
    pub gate: GateConfig,
    pub held_out: f64,
    /// Hyperparameters a job leaves out.
    pub defaults: TrainConfig,
}

impl Default for TrainSetup {
    fn default() -> Self {
        TrainSetup {
            threads: 1,
            adapters_dir: PathBuf::from("adapters"),
            gate: GateConfig::default(),
            held_out: brise_train::data::DEFAULT_HELD_OUT,
            defaults: TrainConfig::default(),
        }
    }
}

fn ledger(s: &AppState) -> ApiResult<&Ledger> {
    s.ledger.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "invalid_request_error",
            "this server runs without a ledger (--ledger off): it keeps no files and runs no fine-tuning jobs",
        )
    })
}

fn db(e: brise_ledger::LedgerError) -> ApiError {
    ApiError::internal(format!("ledger: {e}"))
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError {
        code: Some("not_found"),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("No such {what}: {id}"),
        )
    }
}

// ---------------------------------------------------------------- files

fn file_json(f: &FileInfo) -> Value {
    // The union of OpenAI's FileObject and Mistral's file schema.
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at_ms / 1000,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": null,
        "expires_at": null,
        "sample_type": "instruct",
        "source": "upload",
        "num_lines": f.lines,
        "mimetype": "application/jsonl",
        "signature": f.sha256,
    })
}

/// A multipart read error: 413 when the body went over `--max-body` (wherever the limit
/// hit: between fields or inside one), else a 400.
fn upload_error(e: axum::extract::multipart::MultipartError, what: &str) -> ApiError {
    let mut too_large = e.status() == StatusCode::PAYLOAD_TOO_LARGE;
    let mut src: Option<&dyn std::error::Error> = Some(&e);
    while let Some(x) = src {
        too_large |= x.to_string().contains("length limit exceeded");
        src = x.source();
    }
    if too_large {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "the upload is larger than the server's limit (--max-body)",
        )
    } else {
        ApiError::bad_request(format!("could not read {what}: {e}"))
    }
}

pub async fn upload_file(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    mp: Result<Multipart, MultipartRejection>,
) -> ApiResult<Response> {
    let l = ledger(&s)?;
    let mut mp = mp.map_err(|e| {
        ApiError::bad_request(format!(
            "a file upload is multipart/form-data with the fields file and purpose: {e}"
        ))
    })?;
    let (mut file, mut purpose): (Option<(String, Bytes)>, Option<String>) = (None, None);
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(upload_error(e, "the upload")),
        };
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "file" => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                let data = field
                    .bytes()
                    .await
                    .map_err(|e| upload_error(e, "the file"))?;
                file = Some((filename, data));
            }
            "purpose" => {
                purpose = Some(field.text().await.map_err(|e| upload_error(e, "purpose"))?);
            }
            // Mistral's: files never expire here and are the tenant's own.
            "expiry" | "visibility" => {
                let v = field.text().await.unwrap_or_default();
                if !(v.is_empty() || (name == "visibility" && v == "workspace")) {
                    return Err(ApiError::unsupported(&name, &format!("{name} {v:?}")));
                }
            }
            other => return Err(ApiError::unknown_param(other)),
        }
    }
    let (filename, data) =
        file.ok_or_else(|| ApiError::param("file", "the field file is missing"))?;
    // Mistral's SDK may leave purpose out; fine-tune is the only one brise keeps.
    let purpose = purpose.unwrap_or_else(|| "fine-tune".into());
    if purpose != "fine-tune" {
        return Err(ApiError::param(
            "purpose",
            format!("purpose {purpose:?}: brise keeps files for fine-tune only"),
        ));
    }
    let text = String::from_utf8(data.to_vec())
        .map_err(|_| ApiError::param("file", "the file is not UTF-8 text (JSONL)"))?;
    if let Some((i, e)) = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .find_map(|(i, l)| serde_json::from_str::<Value>(l).err().map(|e| (i, e)))
    {
        return Err(ApiError::param(
            "file",
            format!("{filename}: line {} is not JSON: {e}", i + 1),
        ));
    }
    if text.lines().all(|l| l.trim().is_empty()) {
        return Err(ApiError::param("file", format!("{filename} is empty")));
    }
    let f = l
        .add_file(&tenant.0, &filename, &purpose, &text)
        .await
        .map_err(db)?;
    Ok(axum::Json(file_json(&f)).into_response())
}

pub async fn list_files(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> ApiResult<Response> {
    let l = ledger(&s)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("the query string: {e}")))?;
    let (mut purpose, mut after, mut limit, mut page, mut page_size, mut search) =
        (None, None, None, None, None, None);
    // Mistral's filters; every file here is an uploaded instruct JSONL file.
    let (mut sample_types, mut sources, mut mimetypes) = (vec![], vec![], vec![]);
    let n = |k: &str, v: &str| {
        v.parse::<usize>()
            .map_err(|_| ApiError::param(k, format!("{k} must be a whole number")))
    };
    for (k, v) in &pairs {
        match k.as_str() {
            "purpose" => purpose = Some(v.clone()),
            "after" => after = Some(v.clone()),
            "limit" => limit = Some(n(k, v)?),
            "page" => page = Some(n(k, v)?),
            "page_size" => page_size = Some(n(k, v)?.max(1)),
            "search" => search = Some(v.clone()),
            "order" if v == "desc" => {}
            "order" => {
                return Err(ApiError::unsupported(
                    k,
                    &format!("order {v:?} (newest first only)"),
                ));
            }
            "include_total" => {}
            "sample_type" => sample_types.push(v.clone()),
            "source" => sources.push(v.clone()),
            "mimetypes" => mimetypes.push(v.clone()),
            other => return Err(ApiError::unknown_param(other)),
        }
    }
    let mut files = l.files(&tenant.0, purpose.as_deref()).await.map_err(db)?;
    let keep = (sample_types.is_empty() || sample_types.iter().any(|t| t == "instruct"))
        && (sources.is_empty() || sources.iter().any(|t| t == "upload"))
        && (mimetypes.is_empty() || mimetypes.iter().any(|t| t == "application/jsonl"));
    if !keep {
        files.clear();
    }
    if let Some(q) = &search {
        files.retain(|f| f.filename.contains(q.as_str()) || f.id == *q);
    }
    if let Some(a) = &after {
        match files.iter().position(|f| &f.id == a) {
            Some(i) => {
                files.drain(..=i);
            }
            None => return Err(ApiError::param("after", format!("no file {a}"))),
        }
    }
    let total = files.len();
    if let Some(size) = page_size.or(page.map(|_| 100)) {
        files = files
            .into_iter()
            .skip(page.unwrap_or(0) * size)
            .take(size)
            .collect();
    }
    let limit = limit.unwrap_or(10_000);
    let has_more = files.len() > limit;
    files.truncate(limit);
    Ok(axum::Json(json!({
        "object": "list",
        "data": files.iter().map(file_json).collect::<Vec<_>>(),
        "has_more": has_more,
        "total": total,
    }))
    .into_response())
}

async fn own_file(s: &AppState, tenant: &str, id: &str) -> ApiResult<FileInfo> {
    match ledger(s)?.file(tenant, id).await.map_err(db)? {
        Some(f) if !f.deleted => Ok(f),
        _ => Err(not_found("file", id)),
    }
}

pub async fn get_file(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(file_json(&own_file(&s, &tenant.0, &id).await?)).into_response())
}

pub async fn file_content(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let l = ledger(&s)?;
    let text = l
        .file_content(&tenant.0, &id)
        .await
        .map_err(db)?
        .ok_or_else(|| not_found("file", &id))?;
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], text).into_response())
}

pub async fn delete_file(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let l = ledger(&s)?;
    if !l.delete_file(&tenant.0, &id).await.map_err(db)? {
        return Err(not_found("file", &id));
    }
    let _ = l
        .audit(
            &format!("tenant {}", tenant.0),
            "file_deleted",
            json!({"file": id}),
        )
        .await;
    Ok(axum::Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
}

// ---------------------------------------------------------------- creating a job

/// What a create request asks for, in brise's terms.
struct JobRequest {
    dialect: &'static str,
    model: String,
    training_file: String,
    validation_file: Option<String>,
    method: Option<Method>,
    cfg: TrainConfig,
    suffix: Option<String>,
}

fn as_obj<'a>(v: &'a Value, name: &str) -> ApiResult<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| ApiError::param(name, format!("{name} must be an object")))
}

fn as_str(v: &Value, name: &str) -> ApiResult<String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| ApiError::param(name, format!("{name} must be a string")))
}

/// A number, or `None` for `"auto"` (OpenAI's default marker).
fn num(v: &Value, name: &str, min: f64, max: f64) -> ApiResult<Option<f64>> {
    if v.as_str() == Some("auto") || v.is_null() {
        return Ok(None);
    }
    match v.as_f64() {
        Some(x) if x.is_finite() && x >= min && x <= max => Ok(Some(x)),
        _ => Err(ApiError::param(
            name,
            format!("{name} must be a number from {min} to {max} (or \"auto\"), not {v}"),
        )),
    }
}

fn int(v: &Value, name: &str, min: f64, max: f64) -> ApiResult<Option<usize>> {
    match num(v, name, min, max)? {
        Some(x) if x.fract() != 0.0 => Err(ApiError::param(
            name,
            format!("{name} must be a whole number, not {x}"),
        )),
        x => Ok(x.map(|x| x as usize)),
    }
}

/// What a hyperparameter sets, whatever its name: two names of one setting in one
/// request are refused rather than one silently winning.
fn setting(k: &str) -> &str {
    match k {
        "n_epochs" | "epochs" => "epochs",
        "learning_rate_multiplier" | "learning_rate" => "learning_rate",
        "lora_rank" | "lora_r" => "lora_rank",
        k => k,
    }
}

/// Hard limits on a fine-tuning job: its memory grows with the rank, the sequence length
/// and the batch, its time with the steps. A value over one is a 400 naming it.
pub const MAX_EPOCHS: usize = 20;
pub const MAX_STEPS: u64 = 10_000;
pub const MAX_RANK: usize = 64;
pub const MAX_ALPHA: f64 = 1024.0;
pub const MAX_SEQ_LEN: usize = 4096;
pub const MAX_BATCH: usize = 64;
/// Jobs one tenant may have queued or running at once (more: 429).
pub const MAX_ACTIVE_JOBS: i64 = 2;

/// Applies hyperparameters (OpenAI's, Mistral's, or brise's own names) to `cfg`;
/// `seen` holds the settings given so far in the request (and under which name).
fn hyperparameters(
    h: &Map<String, Value>,
    cfg: &mut TrainConfig,
    base_lr: f64,
    prefix: &str,
    seen: &mut std::collections::HashMap<String, String>,
) -> ApiResult<()> {
    // The rank sets alpha to twice it: an explicit lora_alpha comes after.
    let mut keys: Vec<(&String, &Value)> = h.iter().collect();
    keys.sort_by_key(|(k, _)| k.as_str() == "lora_alpha");
    for (k, v) in keys {
        let name = format!("{prefix}{k}");
        let n = name.as_str();
        if let Some(first) = seen.insert(setting(k).to_string(), name.clone()) {
            return Err(ApiError::param(
                n,
                format!("{n} and {first} set the same thing: give one"),
            ));
        }
        match k.as_str() {
            "n_epochs" | "epochs" => {
                if let Some(e) = int(v, n, 1.0, MAX_EPOCHS as f64)? {
                    cfg.epochs = e;
                    cfg.set_explicit("epochs");
                }
            }
            "batch_size" => {
                if let Some(b) = int(v, n, 1.0, MAX_BATCH as f64)? {
                    cfg.batch_size = b;
                    cfg.set_explicit("batch_size");
                }
            }
            "learning_rate_multiplier" => {
                if let Some(m) = num(v, n, 1e-6, 100.0)? {
                    cfg.learning_rate = base_lr * m;
                    cfg.set_explicit("learning_rate");
                }
            }
            "learning_rate" => {
                if let Some(x) = num(v, n, 1e-9, 1.0)? {
                    cfg.learning_rate = x;
                    cfg.set_explicit("learning_rate");
                }
            }
            "training_steps" => cfg.max_steps = int(v, n, 1.0, MAX_STEPS as f64)?.map(|x| x as u64),
            "weight_decay" => {
                if let Some(x) = num(v, n, 0.0, 10.0)? {
                    cfg.weight_decay = x as f32;
                }
            }
            "warmup_fraction" => {
                if let Some(x) = num(v, n, 0.0, 1.0)? {
                    cfg.warmup_ratio = x;
                }
            }
            "seq_len" => {
                if let Some(x) = int(v, n, 16.0, MAX_SEQ_LEN as f64)? {
                    cfg.max_len = x;
                }
            }
            "beta" => {
                if let Some(x) = num(v, n, 1e-6, 100.0)? {
                    cfg.beta = x;
                }
            }
            "lora_rank" | "lora_r" => {
                if let Some(r) = int(v, n, 1.0, MAX_RANK as f64)? {
                    cfg.rank = r;
                    cfg.alpha = 2.0 * r as f64;
                }
            }
            "lora_alpha" => {
                if let Some(a) = num(v, n, 1e-3, MAX_ALPHA)? {
                    cfg.alpha = a;
                }
            }
            "fim_ratio" if num(v, n, 0.0, 1.0)?.unwrap_or(0.0) == 0.0 => {}
            "fim_ratio" => return Err(ApiError::unsupported(n, "training on FIM examples")),
            _ => {
                return Err(ApiError {
                    code: Some("unknown_parameter"),
                    ..ApiError::param(
                        n,
                        format!(
                            "unknown hyperparameter {k:?}: brise takes n_epochs/epochs, batch_size, \
                             learning_rate_multiplier, learning_rate, training_steps, weight_decay, \
                             warmup_fraction, seq_len, beta, lora_rank, lora_alpha"
                        ),
                    )
                });
            }
        }
    }
    Ok(())
}

fn parse_job_request(body: &Value, defaults: &TrainConfig) -> ApiResult<JobRequest> {
    let o = as_obj(body, "body")?;
    let mistral = o.contains_key("training_files");
    let mut cfg = defaults.clone();
    let base_lr = defaults.learning_rate;
    let mut r = JobRequest {
        dialect: if mistral { "mistral" } else { "openai" },
        model: String::new(),
        training_file: String::new(),
        validation_file: None,
        method: None,
        cfg: TrainConfig::default(),
        suffix: None,
    };
    let mut model = None;
    let mut seen = std::collections::HashMap::new();
    for (k, v) in o {
        match k.as_str() {
            "model" => model = Some(as_str(v, "model")?),
            "training_file" if !mistral => r.training_file = as_str(v, k)?,
            "validation_file" if !mistral && !v.is_null() => {
                r.validation_file = Some(as_str(v, k)?)
            }
            "validation_file" if v.is_null() => {}
            "training_files" => {
                let a = v
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| ApiError::param(k, "training_files must be a non-empty list"))?;
                if a.len() > 1 {
                    return Err(ApiError::unsupported(
                        k,
                        "training on more than one file in a job (concatenate them)",
                    ));
                }
                r.training_file = match &a[0] {
                    Value::String(s) => s.clone(),
                    Value::Object(f) => {
                        if let Some(w) = f.get("weight")
                            && w.as_f64() != Some(1.0)
                        {
                            return Err(ApiError::unsupported(
                                "training_files.weight",
                                "a weight other than 1",
                            ));
                        }
                        if let Some(extra) = f.keys().find(|k| *k != "file_id" && *k != "weight") {
                            return Err(ApiError::unknown_param(&format!(
                                "training_files.{extra}"
                            )));
                        }
                        as_str(
                            f.get("file_id").unwrap_or(&Value::Null),
                            "training_files.file_id",
                        )?
                    }
                    _ => {
                        return Err(ApiError::param(
                            k,
                            "each training file is {\"file_id\": …, \"weight\": 1}",
                        ));
                    }
                };
            }
            "validation_files" if mistral => {
                let a = v
                    .as_array()
                    .ok_or_else(|| ApiError::param(k, "validation_files must be a list"))?;
                if a.len() > 1 {
                    return Err(ApiError::unsupported(k, "more than one validation file"));
                }
                r.validation_file = a.first().map(|v| as_str(v, k)).transpose()?;
            }
            "hyperparameters" => hyperparameters(
                as_obj(v, k)?,
                &mut cfg,
                base_lr,
                "hyperparameters.",
                &mut seen,
            )?,
            "method" => {
                let m = as_obj(v, k)?;
                let ty = as_str(m.get("type").unwrap_or(&Value::Null), "method.type")?;
                r.method = Some(match ty.as_str() {
                    "supervised" | "sft" => Method::Sft,
                    "dpo" => Method::Dpo,
                    "kto" => Method::Kto,
                    other => {
                        return Err(ApiError::unsupported(
                            "method.type",
                            &format!("the method {other:?} (brise trains supervised, dpo and kto)"),
                        ));
                    }
                });
                for (mk, mv) in m {
                    if mk == "type" {
                        continue;
                    }
                    if mk != ty.as_str() && !(ty == "sft" && mk == "supervised") {
                        return Err(ApiError::param(
                            &format!("method.{mk}"),
                            format!("method.{mk} does not go with method.type {ty:?}"),
                        ));
                    }
                    let sub = as_obj(mv, &format!("method.{mk}"))?;
                    for (hk, hv) in sub {
                        if hk != "hyperparameters" {
                            return Err(ApiError::unknown_param(&format!("method.{mk}.{hk}")));
                        }
                        hyperparameters(
                            as_obj(hv, &format!("method.{mk}.hyperparameters"))?,
                            &mut cfg,
                            base_lr,
                            &format!("method.{mk}.hyperparameters."),
                            &mut seen,
                        )?;
                    }
                }
            }
            "suffix" if !v.is_null() => {
                let sfx = as_str(v, k)?;
                if sfx.is_empty()
                    || sfx.len() > 64
                    || !sfx
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(ApiError::param(
                        k,
                        "suffix must be 1 to 64 letters, digits, - or _",
                    ));
                }
                r.suffix = Some(sfx);
            }
            "seed" if !v.is_null() => {
                cfg.seed = v
                    .as_u64()
                    .ok_or_else(|| ApiError::param(k, "seed must be a whole number"))?;
            }
            "metadata" if !v.is_null() => {
                let m = as_obj(v, k)?;
                let ok = m.len() <= 16
                    && m.iter().all(|(mk, mv)| {
                        mk.len() <= 64 && mv.as_str().is_some_and(|s| s.len() <= 512)
                    });
                if !ok {
                    return Err(ApiError::param(
                        k,
                        "metadata is at most 16 keys (up to 64 characters) with string values (up to 512)",
                    ));
                }
            }
            "suffix" | "seed" | "metadata" => {}
            "integrations" | "repositories"
                if v.as_array().is_some_and(|a| a.is_empty()) || v.is_null() => {}
            "integrations" | "repositories" => {
                return Err(ApiError::unsupported(
                    k,
                    &format!("{k} (brise reports to no outside service)"),
                ));
            }
            "auto_start" if v.as_bool() != Some(false) => {}
            "auto_start" => {
                return Err(ApiError::unsupported(
                    k,
                    "auto_start false (jobs start when created)",
                ));
            }
            "job_type" if v.as_str() == Some("completion") || v.is_null() => {}
            "job_type" => return Err(ApiError::unsupported(k, &format!("job_type {v}"))),
            "invalid_sample_skip_percentage" if v.as_f64() == Some(0.0) => {}
            "invalid_sample_skip_percentage" => {
                return Err(ApiError::unsupported(
                    k,
                    "skipping invalid samples (a bad row is an error)",
                ));
            }
            _ => return Err(ApiError::unknown_param(k)),
        }
    }
    r.model = model.ok_or_else(|| ApiError::param("model", "you must provide a model"))?;
    if r.training_file.is_empty() {
        return Err(ApiError::param(
            if mistral {
                "training_files"
            } else {
                "training_file"
            },
            "you must provide a training file",
        ));
    }
    r.cfg = cfg;
    Ok(r)
}

/// Parses a file of the tenant's as a dataset (off the runtime: it tokenizes).
async fn file_dataset(
    l: &Ledger,
    tenant: &str,
    id: &str,
    model: Arc<Model>,
    param: &'static str,
) -> ApiResult<Dataset> {
    let text = l
        .file_content(tenant, id)
        .await
        .map_err(db)?
        .ok_or_else(|| ApiError::param(param, format!("no file {id} (or it was deleted)")))?;
    let name = id.to_string();
    tokio::task::spawn_blocking(move || {
        let format = detect_format(&text).map_err(|e| format!("{name}: {e}"))?;
        Dataset::from_reader(
            std::io::Cursor::new(text.as_bytes()),
            &name,
            format,
            &model,
            &LoadOptions::default(),
        )
        .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| ApiError::internal(format!("the parsing task failed: {e}")))?
    .map_err(|e| ApiError::param(param, e))
}

pub async fn create_job(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return ApiError::bad_request(format!("the body is not JSON: {e}")).into_response();
        }
    };
    let mistral = v.get("training_files").is_some();
    match create_job_inner(&s, &tenant, v).await {
        Ok(r) => r,
        Err(e) if mistral => e.mistral_validation(),
        Err(e) => e.into_response(),
    }
}

async fn create_job_inner(s: &AppState, tenant: &Tenant, body: Value) -> ApiResult<Response> {
    let l = ledger(s)?;
    crate::routes::ready(s)?;
    let defaults = &s.cfg.train.defaults;
    let r = parse_job_request(&body, defaults)?;
    let active = l.active_jobs(&tenant.0).await.map_err(db)?;
    if active >= MAX_ACTIVE_JOBS {
        return Err(ApiError {
            code: Some("job_quota_exceeded"),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                format!(
                    "this tenant has {active} fine-tuning jobs queued or running, the most it \
                     may have ({MAX_ACTIVE_JOBS}): wait for one to finish, or cancel one"
                ),
            )
        });
    }
    let m = s
        .models()
        .iter()
        .find(|m| m.id == r.model || m.aliases.contains(&r.model))
        .ok_or_else(|| {
            ApiError::model_not_found(
                &r.model,
                &s.models().iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
            )
        })?;
    let tparam = if r.dialect == "mistral" {
        "training_files"
    } else {
        "training_file"
    };
    let vparam = if r.dialect == "mistral" {
        "validation_files"
    } else {
        "validation_file"
    };
    let train = file_dataset(l, &tenant.0, &r.training_file, m.model.clone(), tparam).await?;
    if train.examples.is_empty() {
        return Err(ApiError::param(
            tparam,
            format!(
                "{}: no usable examples ({} rows, {} skipped{})",
                r.training_file,
                train.rows,
                train.skipped.len(),
                train
                    .skipped
                    .first()
                    .map(|k| format!(": {} {}", k.at, k.reason))
                    .unwrap_or_default()
            ),
        ));
    }
    if let Some(want) = r.method
        && want != train.method
    {
        return Err(ApiError::param(
            "method.type",
            format!(
                "the training file holds {} data, not {}",
                train.method.name(),
                want.name()
            ),
        ));
    }
    if let Some(vf) = &r.validation_file {
        let val = file_dataset(l, &tenant.0, vf, m.model.clone(), vparam).await?;
        if val.method != train.method || val.examples.is_empty() {
            return Err(ApiError::param(
                vparam,
                format!(
                    "{vf}: {} usable {} examples; the training file is {}",
                    val.examples.len(),
                    val.method.name(),
                    train.method.name()
                ),
            ));
        }
    }
    let mut cfg = r.cfg.clone();
    cfg.method = train.method;
    // Steps the epochs make (before the held-out split takes its share), when no
    // training_steps limit says fewer.
    let steps = (cfg.epochs as u64)
        .saturating_mul((train.examples.len() as u64).div_ceil(cfg.batch_size.max(1) as u64));
    if cfg.max_steps.is_none_or(|m| m > MAX_STEPS) && steps > MAX_STEPS {
        let at = if r.dialect == "mistral" {
            "hyperparameters.epochs"
        } else {
            "hyperparameters.n_epochs"
        };
        return Err(ApiError::param(
            at,
            format!(
                "{} epochs of {} examples in batches of {} make {steps} steps, over the limit of \
                 {MAX_STEPS}: give fewer epochs, a larger batch_size, or training_steps",
                cfg.epochs,
                train.examples.len(),
                cfg.batch_size
            ),
        ));
    }
    let job = l
        .create_job(NewJob {
            tenant: tenant.0.clone(),
            model: m.id.clone(),
            source: "files".into(),
            training_file: Some(r.training_file.clone()),
            validation_file: r.validation_file.clone(),
            method: train.method.name().into(),
            config: serde_json::to_value(&cfg).expect("plain data"),
            request: body,
            dialect: r.dialect.into(),
            suffix: r.suffix.clone(),
            promote: false,
            created_by: format!("tenant {}", tenant.0),
        })
        .await
        .map_err(db)?;
    let _ = l
        .job_event(
            &job.id,
            "info",
            "message",
            &format!(
                "Validated {}: {} {} examples from {} rows{}",
                r.training_file,
                train.examples.len(),
                train.method.name(),
                train.rows,
                if train.skipped.is_empty() {
                    String::new()
                } else {
                    format!(", {} skipped", train.skipped.len())
                }
            ),
            None,
        )
        .await;
    s.jobs_changed.notify_one();
    let j = l.job(None, &job.id).await.map_err(db)?.unwrap_or(job);
    Ok(axum::Json(job_json(l, &j, false).await?).into_response())
}

// ---------------------------------------------------------------- reading jobs

fn secs(ms: Option<i64>) -> Value {
    json!(ms.map(|t| t / 1000))
}

fn fine_tuned_model(j: &Job) -> Option<String> {
    j.adapter_version
        .as_ref()
        .map(|v| format!("{}:{v}", j.model))
}

fn event_id(e: &JobEvent) -> String {
    format!(
        "ftevent-{}-{}",
        e.seq,
        e.job_id.trim_start_matches("ftjob-")
    )
}

fn openai_status(j: &Job) -> &'static str {
    match j.status {
        JobStatus::Queued => "queued",
        JobStatus::Running => "running",
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
    }
}

fn mistral_status(j: &Job) -> &'static str {
    match j.status {
        JobStatus::Queued => "QUEUED",
        JobStatus::Running if j.cancel_requested => "CANCELLATION_REQUESTED",
        JobStatus::Running => "RUNNING",
        JobStatus::Succeeded => "SUCCESS",
        JobStatus::Failed => "FAILED",
        JobStatus::Cancelled => "CANCELLED",
    }
}

/// A job as its dialect shows it, plus brise's own fields under `brise`. `detail`
/// adds Mistral's events and checkpoints.
pub async fn job_json(l: &Ledger, j: &Job, detail: bool) -> ApiResult<Value> {
    // Hyperparameters still to be fitted to the data show as "auto", as OpenAI's do.
    let mut shown = j.config.clone();
    if let Some(auto) = j.config["auto"].as_array() {
        for f in auto.iter().filter_map(Value::as_str) {
            if shown.get(f).is_some() {
                shown[f] = json!("auto");
            }
        }
    }
    let c = &shown;
    // Until an `auto` job has built its dataset, its method is not known: the trainer's
    // configuration holds a placeholder, not shown.
    let mut config = j.config.clone();
    if j.method == "auto"
        && let Some(o) = config.as_object_mut()
    {
        o.insert("method".into(), json!("auto"));
    }
    let brise = json!({
        "source": j.source,
        "method": j.method,
        "adapter_version": j.adapter_version,
        "promote": j.promote,
        "created_by": j.created_by,
        "config": config,
        "metrics": j.metrics,
        "started_at": secs(j.started_at_ms),
        "cancel_requested": j.cancel_requested,
    });
    let error = j
        .error
        .as_ref()
        .map(|e| json!({"code": "training_failed", "message": e, "param": null}));
    if j.dialect == "mistral" {
        let mut v = json!({
            "id": j.id,
            "object": "job",
            "auto_start": true,
            "job_type": "completion",
            "model": j.model,
            "status": mistral_status(j),
            "created_at": j.created_at_ms / 1000,
            "modified_at": j.finished_at_ms.or(j.started_at_ms).unwrap_or(j.created_at_ms) / 1000,
            "training_files": j.training_file.iter().collect::<Vec<_>>(),
            "validation_files": j.validation_file.iter().collect::<Vec<_>>(),
            "fine_tuned_model": fine_tuned_model(j),
            "suffix": j.suffix,
            "integrations": [],
            "repositories": [],
            "trained_tokens": j.trained_tokens,
            "metadata": null,
            "hyperparameters": {
                "training_steps": c["max_steps"],
                "learning_rate": c["learning_rate"],
                "weight_decay": c["weight_decay"],
                "warmup_fraction": c["warmup_ratio"],
                "epochs": c["epochs"],
                "seq_len": c["max_len"],
            },
            "error": error,
            "brise": brise,
        });
        if detail {
            let ev = l
                .job_events_page(&j.id, None, false, 100_000)
                .await
                .map_err(db)?;
            v["events"] = json!(ev
                .iter()
                .filter(|e| e.kind == "message")
                .map(|e| json!({"name": "status-updated", "data": {"message": e.message, "level": e.level}, "created_at": e.created_at_ms / 1000}))
                .collect::<Vec<_>>());
            v["checkpoints"] = json!(ev
                .iter()
                .filter(|e| e.kind == "metrics")
                .filter_map(|e| e.data.as_ref())
                .map(|d| json!({"metrics": {"train_loss": d["train_loss"], "valid_loss": null, "valid_mean_token_accuracy": null}, "step_number": d["step"], "created_at": null}))
                .collect::<Vec<_>>());
        }
        return Ok(v);
    }
    let method = match j.method.as_str() {
        "dpo" => {
            json!({"type": "dpo", "dpo": {"hyperparameters": {"beta": c["beta"], "n_epochs": c["epochs"], "batch_size": c["batch_size"], "learning_rate_multiplier": null}}})
        }
        "kto" => json!({"type": "kto"}),
        "sft" => {
            json!({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": c["epochs"], "batch_size": c["batch_size"], "learning_rate_multiplier": null}}})
        }
        // `auto` before its dataset is built: not known yet (`brise.method` says auto).
        _ => Value::Null,
    };
    Ok(json!({
        "id": j.id,
        "object": "fine_tuning.job",
        "created_at": j.created_at_ms / 1000,
        "error": error,
        "fine_tuned_model": fine_tuned_model(j),
        "finished_at": secs(j.finished_at_ms),
        "hyperparameters": {
            "n_epochs": c["epochs"],
            "batch_size": c["batch_size"],
            "learning_rate_multiplier": null,
        },
        "method": method,
        "model": j.model,
        "organization_id": if j.tenant == SYSTEM_TENANT { "brise" } else { j.tenant.as_str() },
        "result_files": [],
        "seed": c["seed"],
        "status": openai_status(j),
        "trained_tokens": j.trained_tokens,
        "training_file": j.training_file.clone().unwrap_or_else(|| "ledger".into()),
        "validation_file": j.validation_file,
        "estimated_finish": null,
        "integrations": [],
        "metadata": j.request.get("metadata").cloned().unwrap_or(Value::Null),
        "user_provided_suffix": j.suffix,
        "brise": brise,
    }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    after: Option<String>,
    limit: Option<i64>,
    page: Option<i64>,
    page_size: Option<i64>,
    model: Option<String>,
    status: Option<String>,
    metadata: Option<String>,
}

fn query_err(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::bad_request(e.body_text())
}

async fn list_jobs_for(s: &AppState, tenant: Option<&str>, q: JobsQuery) -> ApiResult<Response> {
    let l = ledger(s)?;
    let mistral = q.page.is_some() || q.page_size.is_some();
    if q.metadata.is_some() {
        return Err(ApiError::unsupported(
            "metadata",
            "filtering jobs by metadata",
        ));
    }
    let (limit, offset) = if mistral {
        let size = q.page_size.unwrap_or(100).clamp(1, 1000);
        (size, q.page.unwrap_or(0).max(0) * size)
    } else {
        (q.limit.unwrap_or(20).clamp(1, 1000), 0)
    };
    let status = match q.status.as_deref() {
        None => None,
        Some(st) => Some(match st.to_ascii_lowercase().as_str() {
            "queued" => JobStatus::Queued,
            "running" | "started" | "cancellation_requested" => JobStatus::Running,
            "succeeded" | "success" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            _ => {
                return Err(ApiError::param(
                    "status",
                    format!(
                        "status {st:?}: one of queued, running, succeeded, failed, cancelled (or Mistral's names)"
                    ),
                ));
            }
        }),
    };
    let (page, total) = l
        .jobs_page(
            tenant,
            q.model.as_deref(),
            status,
            q.after.as_deref(),
            offset,
            limit + 1,
        )
        .await
        .map_err(|e| match e {
            brise_ledger::LedgerError::Invalid(m) => ApiError::param("after", m),
            e => db(e),
        })?;
    let has_more = page.len() > limit as usize;
    let mut data = Vec::new();
    for j in page.into_iter().take(limit as usize) {
        let mut j = j;
        j.dialect = if mistral { "mistral" } else { "openai" }.into();
        data.push(job_json(l, &j, false).await?);
    }
    Ok(
        axum::Json(json!({"object": "list", "data": data, "has_more": has_more, "total": total}))
            .into_response(),
    )
}

pub async fn list_jobs(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    q: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(query_err)?;
    list_jobs_for(&s, Some(&tenant.0), q).await
}

pub async fn admin_list_jobs(
    State(s): St,
    q: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(query_err)?;
    list_jobs_for(&s, None, q).await
}

async fn job_of(s: &AppState, tenant: Option<&str>, id: &str) -> ApiResult<Job> {
    ledger(s)?
        .job(tenant, id)
        .await
        .map_err(db)?
        .ok_or_else(|| not_found("fine-tuning job", id))
}

pub async fn get_job(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let j = job_of(&s, Some(&tenant.0), &id).await?;
    Ok(axum::Json(job_json(ledger(&s)?, &j, true).await?).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    after: Option<String>,
    limit: Option<i64>,
    /// brise's: `asc` lists oldest first (loss curves read it so).
    order: Option<String>,
}

pub async fn job_events(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(query_err)?;
    let j = job_of(&s, Some(&tenant.0), &id).await?;
    events_of(&s, &j, q).await
}

pub async fn admin_job_events(
    State(s): St,
    Path(id): Path<String>,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(query_err)?;
    let j = job_of(&s, None, &id).await?;
    events_of(&s, &j, q).await
}

async fn events_of(s: &AppState, j: &Job, q: EventsQuery) -> ApiResult<Response> {
    let l = ledger(s)?;
    let asc = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(o) => {
            return Err(ApiError::param(
                "order",
                format!("order {o:?}: asc or desc"),
            ));
        }
    };
    let from = match &q.after {
        None => None,
        Some(a) => {
            let bad = || ApiError::param("after", format!("no event {a} in job {}", j.id));
            let rest = a.strip_prefix("ftevent-").ok_or_else(bad)?;
            let (seq, job) = rest.split_once('-').ok_or_else(bad)?;
            if job != j.id.trim_start_matches("ftjob-") {
                return Err(bad());
            }
            Some(seq.parse::<i64>().map_err(|_| bad())?)
        }
    };
    let limit = q
        .limit
        .unwrap_or(if asc { 100_000 } else { 20 })
        .clamp(1, 100_000);
    let mut ev = l
        .job_events_page(&j.id, from, !asc, limit + 1)
        .await
        .map_err(db)?;
    let has_more = ev.len() > limit as usize;
    ev.truncate(limit as usize);
    let data: Vec<Value> = ev
        .iter()
        .map(|e| {
            json!({
                "id": event_id(e),
                "object": "fine_tuning.job.event",
                "created_at": e.created_at_ms / 1000,
                "level": e.level,
                "message": e.message,
                "type": e.kind,
                "data": e.data,
            })
        })
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data, "has_more": has_more})).into_response())
}

pub async fn cancel_job(
    State(s): St,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let l = ledger(&s)?;
    let j = job_of(&s, Some(&tenant.0), &id).await?;
    if j.tenant == SYSTEM_TENANT && tenant.0 != SYSTEM_TENANT {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            format!(
                "{id} is the server's own (--learn) job: cancel it with the admin key (POST /v1/admin/fine_tuning/jobs/{id}/cancel)"
            ),
        ));
    }
    let j = l
        .cancel_job(Some(&tenant.0), &id, &format!("tenant {}", tenant.0))
        .await
        .map_err(db)?;
    Ok(axum::Json(job_json(l, &j, true).await?).into_response())
}

pub async fn admin_cancel_job(State(s): St, Path(id): Path<String>) -> ApiResult<Response> {
    let l = ledger(&s)?;
    job_of(&s, None, &id).await?;
    let j = l.cancel_job(None, &id, "admin").await.map_err(db)?;
    Ok(axum::Json(job_json(l, &j, true).await?).into_response())
}

// ---------------------------------------------------------------- the runner

/// Lowers the calling thread's CPU priority; threads it starts inherit it.
pub(crate) fn lower_priority() {
    // SAFETY: setpriority takes plain integers; on Linux, PRIO_PROCESS with who = 0
    // names the calling thread. A failure only leaves the priority as it was.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

fn safe(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// This server's name in the jobs it runs: host and the port it listens on.
pub fn runner_id(addr: std::net::SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", addr.port())
}

/// A running job's runner renews its lease this often; a lease this old is a dead runner's.
const HEARTBEAT: Duration = Duration::from_secs(5);
const LEASE: Duration = Duration::from_secs(60);

/// Runs queued jobs of the served models, one at a time, until shutdown (a job running
/// then stops at its next step and is marked failed, saying why).
pub async fn run(state: Arc<AppState>, l: Ledger, runner: String) {
    match l.fail_interrupted_jobs(&runner).await {
        Ok(ids) if !ids.is_empty() => eprintln!(
            "brise: jobs: {} left running by an earlier run of this server marked failed: {}",
            ids.len(),
            ids.join(", ")
        ),
        Ok(_) => {}
        Err(e) => eprintln!("brise: jobs: reading the ledger: {e}"),
    }
    let mut stale_check = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = state.jobs_changed.notified() => {}
        }
        if state.shutting_down.load(Ordering::Relaxed) {
            return;
        }
        if stale_check.elapsed() >= LEASE / 2 {
            stale_check = std::time::Instant::now();
            let before = brise_ledger::now_ms() - LEASE.as_millis() as i64;
            match l.fail_stale_jobs(before).await {
                Ok(ids) if !ids.is_empty() => eprintln!(
                    "brise: jobs: {} whose server stopped answering marked failed: {}",
                    ids.len(),
                    ids.join(", ")
                ),
                Ok(_) => {}
                Err(e) => eprintln!("brise: jobs: checking leases: {e}"),
            }
        }
        let ids: Vec<String> = state.models().iter().map(|m| m.id.clone()).collect();
        if ids.is_empty() {
            continue;
        }
        let job = match l.claim_job(&runner, &ids).await {
            Ok(Some(j)) => j,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("brise: jobs: claiming a job: {e}");
                continue;
            }
        };
        execute(&state, &l, job).await;
    }
}

async fn event(l: &Ledger, id: &str, level: &str, msg: &str) {
    if let Err(e) = l.job_event(id, level, "message", msg, None).await {
        eprintln!("brise: jobs: {id}: writing an event: {e}");
    }
}

async fn execute(state: &Arc<AppState>, l: &Ledger, job: Job) {
    let id = job.id.clone();
    eprintln!("brise: jobs: {id}: training {} ({})", job.model, job.method);
    let outcome = train_job(state, l, &job).await;
    let end = match outcome {
        Ok((version, promoted, summary, passed, tokens)) => {
            event(l, &id, "info", &format!("Evaluation: {summary}")).await;
            let fm = format!("{}:{version}", job.model);
            event(
                l,
                &id,
                "info",
                &format!(
                    "New fine-tuned model created: {fm} ({})",
                    if promoted {
                        "promoted: the model's plain name serves it now"
                    } else if passed {
                        "a candidate: served by that name; an admin may promote it"
                    } else {
                        "rejected by the evaluation gate; still served by that name for comparison"
                    }
                ),
            )
            .await;
            event(l, &id, "info", "The job has successfully completed").await;
            eprintln!("brise: jobs: {id}: done: {fm}: {summary}");
            if promoted {
                state.registry_changed.notify_one();
            }
            JobEnd {
                status: JobStatus::Succeeded,
                error: None,
                adapter_version: Some(version),
                trained_tokens: Some(tokens),
                metrics: None,
            }
        }
        Err(e) if e == "cancelled" && state.shutting_down.load(Ordering::Relaxed) => {
            let e = "the server shut down before the job finished".to_string();
            event(l, &id, "error", &format!("The job failed: {e}")).await;
            JobEnd {
                status: JobStatus::Failed,
                error: Some(e),
                adapter_version: None,
                trained_tokens: None,
                metrics: None,
            }
        }
        Err(e) if e == "cancelled" => {
            event(l, &id, "info", "The job was cancelled").await;
            eprintln!("brise: jobs: {id}: cancelled");
            JobEnd {
                status: JobStatus::Cancelled,
                error: None,
                adapter_version: None,
                trained_tokens: None,
                metrics: None,
            }
        }
        Err(e) => {
            event(l, &id, "error", &format!("The job failed: {e}")).await;
            eprintln!("brise: jobs: {id}: failed: {e}");
            JobEnd {
                status: JobStatus::Failed,
                error: Some(e),
                adapter_version: None,
                trained_tokens: None,
                metrics: None,
            }
        }
    };
    if let Err(e) = l.finish_job(&id, end).await {
        eprintln!("brise: jobs: {id}: recording its end: {e}");
    }
}

type Trained = (String, bool, String, bool, i64);

async fn train_job(state: &Arc<AppState>, l: &Ledger, job: &Job) -> Result<Trained, String> {
    let m = state
        .models()
        .iter()
        .find(|m| m.id == job.model)
        .ok_or_else(|| format!("this server no longer serves {}", job.model))?;
    let model = m.model.clone();
    let setup = state.cfg.train.clone();
    let mut cfg: TrainConfig = serde_json::from_value(job.config.clone())
        .map_err(|e| format!("the job's configuration: {e}"))?;
    // A DPO asked for by name (or by a file's format) is TRL's plain DPO; auto's, from
    // the ledger, adds the NLL term on the chosen answers.
    if job.method != "auto" || job.source != "ledger" {
        cfg.set_explicit("rpo_alpha");
    }
    let (train, validation) = if job.source == "ledger" {
        let method = match job.method.as_str() {
            "auto" => None,
            m => Some(brise_train::data::parse_method(m)?),
        };
        let d = Dataset::from_ledger(
            l,
            &model,
            &LedgerQuery {
                model: Some(job.model.clone()),
                since_ms: None,
                method,
                actor: job.created_by.clone(),
            },
            &LoadOptions::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
        (d, None)
    } else {
        let tf = job.training_file.as_deref().unwrap_or_default();
        let t = file_dataset(l, &job.tenant, tf, model.clone(), "training_file")
            .await
            .map_err(|e| e.message)?;
        let v = match &job.validation_file {
            Some(vf) => Some(
                file_dataset(l, &job.tenant, vf, model.clone(), "validation_file")
                    .await
                    .map_err(|e| e.message)?,
            ),
            None => None,
        };
        (t, v)
    };
    if train.examples.is_empty() {
        return Err(format!("no usable examples ({})", train.source));
    }
    cfg.method = train.method;
    // An `auto` job's method is known only now: the job reports it from here on.
    if job.method != train.method.name() {
        let config = serde_json::to_value(&cfg).map_err(|e| e.to_string())?;
        l.set_job_method(&job.id, train.method.name(), &config)
            .await
            .map_err(|e| format!("recording the job's method: {e}"))?;
    }
    event(
        l,
        &job.id,
        "info",
        &format!(
            "Training on {} {} examples ({}){}",
            train.examples.len(),
            train.method.name(),
            train.source,
            match &validation {
                Some(v) => format!(
                    ", evaluating on {} from the validation file",
                    v.examples.len()
                ),
                None => format!(", {:.0}% held out for evaluation", setup.held_out * 100.0),
            }
        ),
    )
    .await;

    let cancel = Arc::new(AtomicBool::new(false));
    // Cancellation (through the API, possibly on another server) and shutdown stop the
    // trainer between steps.
    let watch = {
        let (l, id, c, st) = (l.clone(), job.id.clone(), cancel.clone(), state.clone());
        tokio::spawn(async move {
            let mut beat = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if st.shutting_down.load(Ordering::Relaxed)
                    || l.job_cancel_requested(&id).await.unwrap_or(false)
                {
                    c.store(true, Ordering::Relaxed);
                }
                if beat.elapsed() >= HEARTBEAT {
                    beat = std::time::Instant::now();
                    let _ = l.touch_job(&id).await;
                }
            }
        })
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<StepReport>();
    let writer = {
        let (l, id) = (l.clone(), job.id.clone());
        tokio::spawn(async move {
            let mut tokens = 0i64;
            while let Some(r) = rx.recv().await {
                tokens += r.tokens as i64;
                let mut data = json!({
                    "step": r.step,
                    "total_steps": r.total_steps,
                    "epoch": r.epoch,
                    "train_loss": r.loss,
                    "learning_rate": r.learning_rate,
                    "grad_norm": r.grad_norm,
                    "tokens_per_s": r.tokens_per_s,
                    "trained_tokens": tokens,
                });
                if r.items > 0 && r.correct > 0 {
                    data["train_accuracy"] = json!(r.correct as f64 / r.items as f64);
                }
                let msg = format!(
                    "Step {}/{}: training loss={:.4}",
                    r.step, r.total_steps, r.loss
                );
                let _ = l
                    .job_event(&id, "info", "metrics", &msg, Some(data.clone()))
                    .await;
                let _ = l.set_job_metrics(&id, &data, tokens).await;
            }
            tokens
        })
    };
    let opts = LearnOptions {
        train: cfg,
        gate: setup.gate.clone(),
        held_out_fraction: setup.held_out,
        threads: setup.threads.max(1),
        promote: job.promote,
        actor: if job.source == "ledger" {
            job.created_by.clone()
        } else {
            format!("fine-tuning job {}", job.id)
        },
        out_dir: setup.adapters_dir.join(safe(&job.model)).join(format!(
            "v{}-{}",
            brise_ledger::now_ms(),
            safe(job.id.get(6..14).unwrap_or(&job.id))
        )),
        checkpoint: None,
    };
    let (l2, model_id, c2) = (l.clone(), job.model.clone(), cancel.clone());
    let h = tokio::runtime::Handle::current();
    let res = tokio::task::spawn_blocking(move || {
        lower_priority();
        h.block_on(async {
            let mut on_step = |r: &StepReport| {
                let _ = tx.send(r.clone());
            };
            learn(
                &l2,
                &model,
                &model_id,
                LearnData {
                    train: &train,
                    validation: validation.as_ref(),
                },
                opts,
                Some(&c2),
                &mut on_step,
            )
            .await
        })
    })
    .await;
    watch.abort();
    let tokens = writer.await.unwrap_or(0);
    let learned = res.map_err(|e| format!("the training task failed: {e}"))??;
    let mut summary = learned.outcome.report.summary.clone();
    if let Some(first) = learned.outcome.retries.first() {
        summary.push_str(&format!(
            " (trained {} more time(s) at half the learning rate, from {:.2e} to {:.2e}: every epoch had raised the general perplexity above the gate's bound)",
            learned.outcome.retries.len(),
            first.learning_rate,
            learned.outcome.config.learning_rate
        ));
    }
    if let Some(es) = &learned.outcome.early_stopping
        && let Some(kept) = es.kept_epoch
    {
        summary.push_str(&format!(
            " (kept epoch {}: {})",
            kept + 1,
            es.reason.as_deref().unwrap_or("the best held-out loss")
        ));
    }
    Ok((
        learned.version.id.clone(),
        learned.promoted,
        summary,
        learned.outcome.report.passed,
        tokens,
    ))
}
