//! The one error type of the HTTP API, rendered everywhere as
//! `{"error":{"code":"...","message":"..."}}` with the matching status.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kilocloud_substrate::Error as SubstrateError;

/// An API error: HTTP status, stable machine-readable `code`, human `message`, and for 503/429 an
/// optional `Retry-After` in seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code clients branch on (`not_found`, `overloaded`, ...).
    pub code: &'static str,
    /// Human-readable explanation; never contains secrets.
    pub message: String,
    /// Seconds for the `Retry-After` header.
    pub retry_after_secs: Option<u64>,
    /// More fields of the error object (an object's entries are added beside `code` and
    /// `message`), e.g. the gateway's 402 `{title, balance}`.
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
            details: None,
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 426 `websocket_required`: a plain request to a WebSocket route.
    pub fn websocket_required() -> Self {
        Self::new(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_required",
            "this route is a WebSocket; connect with a WebSocket client",
        )
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = serde_json::json!({"code": self.code, "message": self.message});
        if let (Some(serde_json::Value::Object(more)), Some(error)) =
            (self.details, error.as_object_mut())
        {
            error.extend(more);
        }
        let body = serde_json::json!({ "error": error });
        let mut res = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

impl From<SubstrateError> for ApiError {
    fn from(e: SubstrateError) -> Self {
        let message = e.to_string();
        match e {
            SubstrateError::Overloaded { retry_after, .. } => Self {
                retry_after_secs: Some(retry_after.as_secs().max(1)),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
            },
            SubstrateError::ShuttingDown => Self {
                retry_after_secs: Some(1),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            },
            SubstrateError::MessageTooLarge { .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "message_too_large", message)
            }
            SubstrateError::DelayTooLong { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "delay_too_long", message)
            }
            SubstrateError::NotFound { .. } => Self::not_found(message),
            SubstrateError::Invalid { .. } => Self::bad_request(message),
            SubstrateError::Serde(_) | SubstrateError::Internal(_) => {
                // Request bodies are decoded by extractors; a serde error here means stored data
                // did not decode.
                tracing::error!(error = %message, "internal error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "internal error; see the server log",
                )
            }
            SubstrateError::Handler(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "handler_failed", message)
            }
            SubstrateError::Storage(_)
            | SubstrateError::SchemaTooNew { .. }
            | SubstrateError::DataDirLocked { .. } => {
                tracing::error!(error = %message, "storage failure");
                Self {
                    retry_after_secs: Some(1),
                    ..Self::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "storage_unavailable",
                        "the store is unavailable; retry later",
                    )
                }
            }
        }
    }
}

impl From<kilocloud_identity::Error> for ApiError {
    fn from(e: kilocloud_identity::Error) -> Self {
        use kilocloud_identity::Error as E;
        let message = e.to_string();
        match e {
            E::Auth(a) => Self::new(StatusCode::UNAUTHORIZED, a.code(), message),
            E::Forbidden { code, .. } => Self::new(StatusCode::FORBIDDEN, code, message),
            E::NotFound { .. } => Self::not_found(message),
            E::Conflict { code, .. } => Self::new(StatusCode::CONFLICT, code, message),
            E::Invalid(_) => Self::bad_request(message),
            E::Crypto(_) => {
                tracing::error!(error = %message, "secret decryption failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "internal error; see the server log",
                )
            }
            E::Substrate(e) => e.into(),
        }
    }
}

/// Reads a whole request body of at most `limit` bytes.
///
/// Errors: 413 `payload_too_large` beyond `limit`; 400 `body_unreadable` when the client's body
/// broke off.
pub async fn read_body(body: axum::body::Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is over the limit of {limit} bytes"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "body_unreadable",
                format!("the request body could not be read: {e}"),
            )
        }
    })
}

/// Middleware: an error response that is not already JSON (axum's own rejections, such as a
/// body over [`axum::extract::DefaultBodyLimit`] or an unparsable path, answer in plain text)
/// is rewritten into the API's error format, with the same status and its text as `message`.
pub async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let plain = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|t| t.starts_with("text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return res;
    }
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let message = match String::from_utf8_lossy(&text).trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        t => t.to_owned(),
    };
    let mut out = ApiError::new(status, status_code_name(status), message).into_response();
    for name in [header::RETRY_AFTER, header::ALLOW, header::WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// The error `code` of a bare status, for errors raised outside our handlers.
fn status_code_name(status: StatusCode) -> &'static str {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        s if s.is_server_error() => "internal_error",
        _ => "bad_request",
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "invalid_json",
        };
        Self::new(status, code, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_query", r.body_text())
    }
}

/// `axum::extract::Query` whose rejections render as [`ApiError`] (`400 invalid_query`).
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// `axum::Json` whose rejections render as [`ApiError`].
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
