//! The web console: a single-page app at `/` whose files are embedded in the binary
//! (no separate server, works offline), and `GET /v1/usage`, the dashboard's read route.
//!
//! The page loads nothing from other origins: its libraries (marked, DOMPurify,
//! Chart.js) are vendored in `console/vendor/` by `scripts/console-vendor.sh`, and a
//! strict Content-Security-Policy allows only this server's own scripts, styles and API.

use crate::error::{ApiError, ApiResult};
use crate::{AppState, Tenant};
use axum::Router;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// Scripts, styles, fetches and images from this origin only; no inline code, no
/// frames, no plugins. DOMPurify-cleaned Markdown may hold images: `data:` or same
/// origin only, so a rendered answer cannot make the browser call out.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; font-src 'self'; manifest-src 'self'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    body: &'static [u8],
    mime: &'static str,
}

macro_rules! asset {
    ($name:literal, $mime:expr) => {
        Asset {
            name: $name,
            body: include_bytes!(concat!("../console/", $name)),
            mime: $mime,
        }
    };
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";
const TEXT: &str = "text/plain; charset=utf-8";

/// Every file the console serves. Vendored files carry their version in the name, so
/// they may be cached for good; the console's own files are revalidated (ETag).
static ASSETS: &[Asset] = &[
    asset!("index.html", HTML),
    asset!("app.js", JS),
    asset!("app.css", CSS),
    asset!("icon.svg", SVG),
    asset!("vendor/marked-18.2.1.umd.js", JS),
    asset!("vendor/purify-3.4.18.min.js", JS),
    asset!("vendor/chart-4.6.1.umd.min.js", JS),
    asset!("vendor/LICENSE-marked.txt", TEXT),
    asset!("vendor/LICENSE-dompurify.txt", TEXT),
    asset!("vendor/LICENSE-chartjs.txt", TEXT),
];

/// FNV-1a over the bytes: a stable validator for the ETag (not a security hash).
fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn etags() -> &'static [String] {
    static E: OnceLock<Vec<String>> = OnceLock::new();
    E.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| format!("\"{:016x}\"", fnv1a(a.body)))
            .collect()
    })
}

/// The page and its files; no key needed (the page asks for one when the API does).
pub fn assets() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/",
            get(|h: HeaderMap| async move { serve("index.html", &h) }),
        )
        .route(
            "/console/{*file}",
            get(|Path(f): Path<String>, h: HeaderMap| async move { serve(&f, &h) }),
        )
}

/// Routes behind the API-key check, merged before it.
pub fn api() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/usage", get(usage))
        .route("/v1/adapters", get(versions))
}

/// `GET /v1/adapters`: the registry's versions of the served models, read-only, for the
/// dashboard's lineage and eval reports: each version without its path on the server,
/// and per model the version serving now and the promotion history. Changing them
/// takes the admin routes.
async fn versions(
    State(s): State<Arc<AppState>>,
    Extension(tenant): Extension<Tenant>,
) -> ApiResult<Response> {
    let Some(l) = &s.ledger else {
        return Ok(
            axum::Json(serde_json::json!({"object": "list", "data": [], "models": []}))
                .into_response(),
        );
    };
    let err =
        |e: brise_ledger::LedgerError| ApiError::internal(format!("the adapter registry: {e}"));
    let (mut data, mut models) = (Vec::new(), Vec::new());
    // Versions trained by another tenant's fine-tuning job are that tenant's.
    let owners = l.version_owners().await.map_err(err)?;
    for m in s.models() {
        for v in l.adapters(Some(&m.id)).await.map_err(err)? {
            if owners.get(&v.id).is_some_and(|o| *o != tenant.0) {
                continue;
            }
            let mut j = serde_json::to_value(&v).map_err(|e| ApiError::internal(e.to_string()))?;
            if let Some(o) = j.as_object_mut() {
                o.remove("path");
            }
            j["object"] = "adapter.version".into();
            data.push(j);
        }
        models.push(serde_json::json!({
            "model": m.id,
            "serving": m.promoted().map(|a| a.name.clone()),
            "history": l.adapter_history(&m.id).await.map_err(err)?,
        }));
    }
    Ok(
        axum::Json(serde_json::json!({"object": "list", "data": data, "models": models}))
            .into_response(),
    )
}

fn serve(name: &str, req: &HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|a| a.name == name) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the console has no file {name:?}"),
        )
        .into_response();
    };
    let a = &ASSETS[i];
    let etag = &etags()[i];
    let cache = if a.name.starts_with("vendor/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut r = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, a.mime)], a.body).into_response()
    };
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    r
}

/// Bucket sizes the default picks from (seconds): the smallest giving ≤ 120 buckets.
const NICE_BUCKETS: [i64; 9] = [60, 300, 600, 900, 1800, 3600, 10_800, 21_600, 86_400];
/// The longest window: a year and a day.
const MAX_WINDOW_S: i64 = 366 * 86_400;

fn int_param(q: &HashMap<String, String>, k: &str) -> ApiResult<Option<i64>> {
    q.get(k)
        .map(|v| {
            v.parse::<i64>().map_err(|_| {
                ApiError::param(
                    k,
                    format!("{k} must be a whole number of seconds, not {v:?}"),
                )
            })
        })
        .transpose()
}

/// `GET /v1/usage?window=S&bucket=S`: the caller's tenant's requests, tokens and latency
/// per bucket over the last `window` seconds (default a day), and feedback by model and
/// adapter version on the answers of that window.
async fn usage(
    State(s): State<Arc<AppState>>,
    Extension(tenant): Extension<Tenant>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let l = s.ledger.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "invalid_request_error",
            "this server runs without a ledger (--ledger off), so it has no usage to show",
        )
    })?;
    if let Some(k) = q
        .keys()
        .find(|k| !matches!(k.as_str(), "window" | "bucket"))
    {
        return Err(ApiError::unknown_param(k));
    }
    let window = int_param(&q, "window")?.unwrap_or(86_400);
    if !(60..=MAX_WINDOW_S).contains(&window) {
        return Err(ApiError::param(
            "window",
            format!("window = {window}: it must be 60 to {MAX_WINDOW_S} seconds"),
        ));
    }
    let bucket = match int_param(&q, "bucket")? {
        Some(b) if b < 1 => {
            return Err(ApiError::param(
                "bucket",
                format!("bucket = {b}: it must be at least 1 second"),
            ));
        }
        Some(b) => b,
        None => NICE_BUCKETS
            .into_iter()
            .find(|b| window / b <= 120)
            .unwrap_or(86_400),
    };
    let to_ms = brise_ledger::now_ms() + 1;
    let from_ms = to_ms - window * 1000;
    let u = l
        .usage(&tenant.0, from_ms, to_ms, bucket * 1000)
        .await
        .map_err(|e| match e {
            brise_ledger::LedgerError::Invalid(m) => ApiError::param("bucket", m),
            e => ApiError::internal(e.to_string()),
        })?;
    let mut v = serde_json::to_value(&u).map_err(|e| ApiError::internal(e.to_string()))?;
    v["object"] = "usage".into();
    Ok(axum::Json(v).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_embedded_with_its_type() {
        for a in ASSETS {
            assert!(!a.body.is_empty(), "{} is empty", a.name);
            let ext = a.name.rsplit('.').next().unwrap_or("");
            let want = match ext {
                "html" => HTML,
                "js" => JS,
                "css" => CSS,
                "svg" => SVG,
                "txt" => TEXT,
                _ => panic!("{}: no content type for .{ext}", a.name),
            };
            assert_eq!(a.mime, want, "{}", a.name);
        }
    }

    /// The vendored files are the pinned upstream bytes (sums written by
    /// scripts/console-vendor.sh after it checked the packages' integrity).
    #[test]
    fn vendored_files_match_their_recorded_sums() {
        use sha2::{Digest, Sha256};
        let sums = include_str!("../console/vendor/SHA256SUMS");
        let mut checked = 0;
        for line in sums.lines().filter(|l| !l.trim().is_empty()) {
            let (sum, name) = line.split_once("  ").expect("`SUM  NAME` lines");
            let a = ASSETS
                .iter()
                .find(|a| a.name == format!("vendor/{name}"))
                .unwrap_or_else(|| panic!("{name} is in SHA256SUMS but not served"));
            let got: String = Sha256::digest(a.body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(got, sum, "{name} differs from the vendored upstream file");
            checked += 1;
        }
        let vendored = ASSETS
            .iter()
            .filter(|a| a.name.starts_with("vendor/"))
            .count();
        assert_eq!(checked, vendored, "every vendored file has a sum");
    }

    #[test]
    fn index_references_only_served_files() {
        let html = std::str::from_utf8(ASSETS[0].body).unwrap();
        for part in html
            .split(['"', '\''])
            .filter(|p| p.starts_with("/console/"))
        {
            let name = part.trim_start_matches("/console/");
            assert!(
                ASSETS.iter().any(|a| a.name == name),
                "index.html refers to {part}, which is not served"
            );
        }
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no external URLs"
        );
    }
}
