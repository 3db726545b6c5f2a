//! `/api/device-auth`: device authorization as the Kilo Code CLI's `kilo auth login` speaks it
//! (contract §3): `POST /codes` → `{code, verificationUrl, expiresIn}`; `GET /codes/{code}`
//! → 202 pending, 403 denied, 410 expired, 200 `{status: "approved", token, userEmail}` once;
//! approved or denied by a signed-in user (`kilocloud login approve CODE`, or the routes
//! below); `GET /device-auth` is the page `verificationUrl` opens.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use kilocloud_identity::device::{DEVICE_CODE_TTL_S, DevicePoll};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use super::ErrorBody;
use crate::auth::{ClientIp, PersonalAuth};
use crate::{ApiError, AppState, Json};

/// A new device code.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCode {
    /// `XXXX-XXXX`, shown to the user.
    pub code: String,
    /// The page that tells the user how to approve it.
    pub verification_url: String,
    /// Seconds the code stays valid (600).
    pub expires_in: i64,
}

/// `POST /api/device-auth/codes`: starts a device authorization. No credentials. At most
/// 10 codes per minute per client address.
///
/// Errors: 429 `too_many_pending` (with `Retry-After`).
#[utoipa::path(post, path = "/api/device-auth/codes", tag = "users",
    responses((status = 200, body = DeviceCode), (status = 429, body = ErrorBody)))]
pub async fn create_code(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
) -> Result<Json<DeviceCode>, ApiError> {
    if let Err(not_until) = s.device_codes.check_key(&ip) {
        use governor::clock::Clock as _;
        let wait = not_until.wait_time_from(s.device_codes.clock().now());
        return Err(ApiError {
            retry_after_secs: Some(wait.as_secs().max(1)),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_pending",
                "Too many pending authorization requests from this address; retry later",
            )
        });
    }
    let code = s.identity.device_start().await?;
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1:8787");
    let scheme = if s.claw_cookie_secure {
        "https"
    } else {
        "http"
    };
    Ok(Json(DeviceCode {
        verification_url: format!("{scheme}://{host}/device-auth?code={code}"),
        code,
        expires_in: DEVICE_CODE_TTL_S,
    }))
}

/// `GET /api/device-auth/codes/{code}`: polled by the device. 202 `{status: "pending"}`;
/// 200 `{status: "approved", token, userEmail}` once (the token is a user JWT valid 365 days);
/// 403 `device_denied`; 410 `device_code_expired` (expired, picked up, or never issued).
#[utoipa::path(get, path = "/api/device-auth/codes/{code}", tag = "users",
    params(("code" = String, Path, description = "The device code")),
    responses((status = 200, description = "approved: `{status, token, userEmail}`"),
        (status = 202, description = "pending"), (status = 403, body = ErrorBody), (status = 410, body = ErrorBody)))]
pub async fn poll_code(State(s): State<AppState>, Path(code): Path<String>) -> Response {
    let result = match s.identity.device_poll(&code).await {
        Ok(r) => r,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match result {
        DevicePoll::Pending => {
            (StatusCode::ACCEPTED, Json(json!({"status": "pending"}))).into_response()
        }
        DevicePoll::Approved { token, email } => {
            Json(json!({"status": "approved", "token": token, "userEmail": email})).into_response()
        }
        DevicePoll::Denied => ApiError::new(
            StatusCode::FORBIDDEN,
            "device_denied",
            "the user denied this device",
        )
        .into_response(),
        DevicePoll::Expired => ApiError::new(
            StatusCode::GONE,
            "device_code_expired",
            "this code expired or was used; start again",
        )
        .into_response(),
    }
}

/// `POST /api/device-auth/codes/{code}/approve` (a personal credential): the device's next
/// poll gets a new JWT of the caller. 404 when the code is unknown, expired or decided.
#[utoipa::path(post, path = "/api/device-auth/codes/{code}/approve", tag = "users",
    params(("code" = String, Path, description = "The device code")),
    responses((status = 200, description = "`{status: \"approved\"}`"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn approve_code(
    State(s): State<AppState>,
    PersonalAuth(auth): PersonalAuth,
    Path(code): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.identity
        .device_approve(&code, &auth.principal, &auth.initiator())
        .await?;
    Ok(Json(json!({"status": "approved"})))
}

/// `POST /api/device-auth/codes/{code}/deny` (a personal credential). 404 when the code is
/// unknown, expired or decided.
#[utoipa::path(post, path = "/api/device-auth/codes/{code}/deny", tag = "users",
    params(("code" = String, Path, description = "The device code")),
    responses((status = 200, description = "`{status: \"denied\"}`"), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn deny_code(
    State(s): State<AppState>,
    PersonalAuth(_): PersonalAuth,
    Path(code): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.identity.device_deny(&code).await?;
    Ok(Json(json!({"status": "denied"})))
}

/// `GET /device-auth?code=…`: the page a device's `verificationUrl` opens: how to approve.
pub async fn page(
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let code: String = q
        .get("code")
        .map(|c| {
            c.chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(16)
                .collect()
        })
        .unwrap_or_default();
    let mut res = Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Approve a device</title></head>\
         <body><h1>Approve a device</h1><p>A device asks to sign in as you with the code \
         <strong><code>{code}</code></strong> (valid 10 minutes).</p><p>If you started it, \
         approve it from a signed-in terminal:</p><pre>kilocloud login approve {code}</pre>\
         <p>or refuse it with <code>kilocloud login deny {code}</code>.</p></body></html>"
    ))
    .into_response();
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    res
}
