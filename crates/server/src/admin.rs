//! The substrate admin API under `/api/admin`, for site administrators: a site administrator's
//! JWT or API key, or the static `admin_token` setting (break-glass, compared in constant
//! time). Documented in `docs/http-api.md`.

use axum::Router;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::{get, post};
use kilocloud_substrate::{ActorSnapshot, DeadLetter, QueueStats};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::auth::SiteAdmin;
use crate::error::{ApiError, Json, Query};
use crate::probe::{ProbeActor, ProbeCall};

/// Proof that the caller is a site administrator or carried the static admin token. Handlers
/// that take it cannot be reached otherwise.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(expected) = &state.admin_token_sha256 {
            let presented = parts
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            // Hash both sides so the comparison is constant-time regardless of length.
            if let Some(p) = presented
                && bool::from(
                    Sha256::digest(p.as_bytes())
                        .as_slice()
                        .ct_eq(expected.as_slice()),
                )
            {
                return Ok(Admin);
            }
        }
        SiteAdmin::from_request_parts(parts, state)
            .await
            .map(|_| Admin)
    }
}

/// Routes of the admin API.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/queues", get(list_queues))
        .route("/queues/{queue}/messages", post(send_message))
        .route(
            "/queues/{queue}/dlq",
            get(list_dead_letters).delete(delete_dead_letters),
        )
        .route("/queues/{queue}/replay", post(replay))
        .route("/actors/{actor_type}/{key}", get(show_actor))
        .route("/credits", post(crate::api::gateway::grant))
        .route("/probe/{key}", post(probe_record))
        .route("/probe/{key}/alarm", post(probe_alarm))
}

async fn list_queues(
    _: Admin,
    State(s): State<AppState>,
) -> Result<Json<Vec<QueueStats>>, ApiError> {
    Ok(Json(s.substrate.queues().stats().await?))
}

#[derive(Deserialize)]
struct SendQuery {
    #[serde(default)]
    delay_ms: u64,
}

async fn send_message(
    _: Admin,
    State(s): State<AppState>,
    Path(queue): Path<String>,
    Query(q): Query<SendQuery>,
    Json(body): Json<serde_json::Value>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let id = s.substrate.queues().send(&queue, &body, q.delay_ms).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "id": id }))))
}

#[derive(Deserialize)]
struct DlqQuery {
    #[serde(default)]
    after: i64,
    #[serde(default = "default_limit")]
    limit: u32,
}

fn default_limit() -> u32 {
    100
}

async fn list_dead_letters(
    _: Admin,
    State(s): State<AppState>,
    Path(queue): Path<String>,
    Query(q): Query<DlqQuery>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    if q.limit == 0 || q.limit > 1000 {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    Ok(Json(
        s.substrate
            .queues()
            .dead_letters(&queue, q.after, q.limit)
            .await?,
    ))
}

#[derive(Deserialize, Default)]
struct ReplayBody {
    ids: Option<Vec<i64>>,
}

/// The dead-letter ids a replay or delete names: `None` (all) for an empty body or one without
/// `ids`, else `{"ids": [...]}`. Errors: 400 `invalid_json`.
fn selected_ids(body: &[u8]) -> Result<Option<Vec<i64>>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    Ok(serde_json::from_slice::<ReplayBody>(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))?
        .ids)
}

async fn replay(
    _: Admin,
    State(s): State<AppState>,
    Path(queue): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ids = selected_ids(&body)?;
    let n = s.substrate.queues().replay(&queue, ids.as_deref()).await?;
    Ok(Json(serde_json::json!({ "replayed": n })))
}

/// `DELETE /api/admin/queues/{queue}/dlq`: deletes the named dead letters, or all of them (a
/// purge) for an empty body. Unknown queue: 404.
async fn delete_dead_letters(
    _: Admin,
    State(s): State<AppState>,
    Path(queue): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ids = selected_ids(&body)?;
    let n = s
        .substrate
        .queues()
        .delete_dead_letters(&queue, ids.as_deref())
        .await?;
    Ok(Json(serde_json::json!({ "deleted": n })))
}

/// `GET /api/admin/actors/{type}/{key}`. Identity's actor types are refused: their storage holds
/// credential hashes, peppers and encrypted secrets, which no API shows (operators with database
/// access have `kilocloud actor show`).
async fn show_actor(
    _: Admin,
    State(s): State<AppState>,
    Path((actor_type, key)): Path<(String, String)>,
) -> Result<Json<ActorSnapshot>, ApiError> {
    if !s.substrate.actors().types().contains(&actor_type.as_str()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("actor type not found: {actor_type}"),
        ));
    }
    if kilocloud_identity::ACTOR_TYPES.contains(&actor_type.as_str()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "sensitive_actor_type",
            format!("actors of type `{actor_type}` hold credentials and are not shown over HTTP"),
        ));
    }
    Ok(Json(s.substrate.actor_snapshot(&actor_type, &key).await?))
}

#[derive(Deserialize)]
struct RecordBody {
    token: String,
}

async fn probe_record(
    _: Admin,
    State(s): State<AppState>,
    Path(key): Path<String>,
    Json(body): Json<RecordBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let count = s
        .substrate
        .actors()
        .call::<ProbeActor>(&key, ProbeCall::Record(body.token))
        .await?;
    Ok(Json(serde_json::json!({ "count": count })))
}

#[derive(Deserialize)]
struct AlarmBody {
    at_ms: i64,
}

async fn probe_alarm(
    _: Admin,
    State(s): State<AppState>,
    Path(key): Path<String>,
    Json(body): Json<AlarmBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.substrate
        .actors()
        .call::<ProbeActor>(&key, ProbeCall::SetAlarm(body.at_ms))
        .await?;
    Ok(Json(serde_json::json!({ "alarm_at_ms": body.at_ms })))
}
