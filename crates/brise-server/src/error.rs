//! One error type for every route, rendered in OpenAI's shape
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u64>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 naming the parameter.
    pub fn param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn unsupported(param: &str, what: &str) -> ApiError {
        ApiError {
            code: Some("unsupported_parameter"),
            ..ApiError::param(
                param,
                format!("{param}: {what} is not supported by brise yet"),
            )
        }
    }

    pub fn unknown_param(param: &str) -> ApiError {
        ApiError {
            code: Some("unknown_parameter"),
            ..ApiError::param(
                param,
                format!("Unrecognized request argument supplied: {param}"),
            )
        }
    }

    pub fn model_not_found(model: &str, available: &[String]) -> ApiError {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "The model `{model}` does not exist; this server has {}",
                    available.join(", ")
                ),
            )
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Incorrect or missing API key: send `Authorization: Bearer KEY`",
            )
        }
    }

    pub fn overloaded(msg: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            code: Some("server_overloaded"),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", msg)
        }
    }

    /// 429 for a tenant over `--rate-limit` or `--rate-limit-tokens`, in OpenAI's shape
    /// (type `requests` or `tokens`, code `rate_limit_exceeded`), with the whole seconds
    /// until a request is allowed again.
    pub fn rate_limited(r: crate::ratelimit::Refused) -> ApiError {
        let secs = r.wait.as_secs_f64().ceil().max(1.0) as u64;
        let what = match r.limit {
            crate::ratelimit::Limit::Requests => "requests per minute (RPM)",
            crate::ratelimit::Limit::Tokens => "tokens per minute (TPM)",
        };
        ApiError {
            retry_after: Some(secs),
            code: Some("rate_limit_exceeded"),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                r.limit.name(),
                format!(
                    "Rate limit reached for {what}: limit {}. Please try again in {secs}s.",
                    r.per_minute
                ),
            )
        }
    }

    pub fn internal(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg)
    }

    /// Mistral-only routes answer invalid parameters as FastAPI does: 422 with
    /// `{"detail": [{"loc", "msg", "type"}]}`.
    pub fn mistral_validation(self) -> Response {
        if self.status != StatusCode::BAD_REQUEST {
            return self.into_response();
        }
        let loc: Vec<serde_json::Value> = std::iter::once(json!("body"))
            .chain(self.param.iter().map(|p| json!(p)))
            .collect();
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"detail": [{
                "loc": loc,
                "msg": self.message,
                "type": self.code.unwrap_or("value_error"),
            }]})),
        )
            .into_response()
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// A ledger failure the route does not map itself is the server's fault.
impl From<brise_ledger::LedgerError> for ApiError {
    fn from(e: brise_ledger::LedgerError) -> ApiError {
        use brise_ledger::LedgerError as L;
        match e {
            L::UnknownAdapter(_) => ApiError {
                code: Some("adapter_not_found"),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    e.to_string(),
                )
            },
            L::AdapterRefused(_) => ApiError {
                code: Some("adapter_refused"),
                ..ApiError::new(StatusCode::CONFLICT, "invalid_request_error", e.to_string())
            },
            _ => ApiError::internal(e.to_string()),
        }
    }
}

impl From<brise_engine::EngineError> for ApiError {
    fn from(e: brise_engine::EngineError) -> ApiError {
        use brise_engine::EngineError as E;
        match e {
            E::InvalidParam(m) => ApiError::bad_request(m),
            E::Timeout => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "the request took longer than the server's --timeout",
            ),
            E::Model(m @ brise_model::ModelError::ContextOverflow { .. }) => {
                ApiError::param("messages", m.to_string())
            }
            E::Model(m) => ApiError::internal(m.to_string()),
        }
    }
}
