//! `/api/session`: session ingest for the Kilo Code CLI (contract §2b, §5; reference §10),
//! served at the CLI's `KILO_SESSION_INGEST_URL` (this server's origin). Owner-scoped like
//! every route (another owner's session is 404 `session_not_found`); `GET /session/{shareId}`
//! is the public share fetch `kilo import` uses, without credentials.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kilocloud_ingest::{CliSession, IngestError, IngestOutcome, MAX_INGEST_BODY_BYTES};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::ErrorBody;
use crate::auth::OwnerScope;
use crate::error::{Query, read_body};
use crate::{ApiError, AppState, Json};

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        let message = e.to_string();
        match e {
            IngestError::Invalid(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
            }
            IngestError::TooManyItems { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "too_many_items", message)
            }
            IngestError::NotFound { what: "share" } => {
                ApiError::new(StatusCode::NOT_FOUND, "share_not_found", message)
            }
            IngestError::NotFound { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "session_not_found", message)
            }
            IngestError::Substrate(e) => e.into(),
        }
    }
}

/// Body of `POST /api/session`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateSession {
    /// The CLI's session id (`ses_…`): 1–100 characters of `[A-Za-z0-9_-]`.
    pub session_id: String,
}

/// Answer of `POST /api/session`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedSession {
    /// The session id (as sent).
    pub id: String,
    /// Where to post items: `/api/session/{id}/ingest`.
    pub ingest_path: String,
}

/// `POST /api/session`: registers a CLI session for the owner acted for; idempotent.
#[utoipa::path(post, path = "/api/session", tag = "cli-sessions", request_body = CreateSession,
    responses((status = 200, body = CreatedSession), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(s): State<AppState>,
    scope: OwnerScope,
    Json(body): Json<CreateSession>,
) -> Result<Json<CreatedSession>, ApiError> {
    let session = s.ingest.create(scope.owner(), &body.session_id).await?;
    Ok(Json(CreatedSession {
        ingest_path: format!("/api/session/{}/ingest", session.session_id),
        id: session.session_id,
    }))
}

/// Query of `GET /api/session`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Most sessions, 1–500. Default 100.
    pub limit: Option<usize>,
    /// The `next` of the previous page.
    pub after: Option<String>,
}

/// A page of CLI sessions.
#[derive(Serialize, ToSchema)]
pub struct SessionPage {
    /// The sessions, most recently updated first within the page (pages follow id order).
    pub sessions: Vec<CliSession>,
    /// Cursor of the next page (`?after=`), when there may be more.
    pub next: Option<String>,
}

/// `GET /api/session`: the owner's CLI sessions.
#[utoipa::path(get, path = "/api/session", tag = "cli-sessions", params(ListQuery),
    responses((status = 200, body = SessionPage), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(s): State<AppState>,
    scope: OwnerScope,
    Query(q): Query<ListQuery>,
) -> Result<Json<SessionPage>, ApiError> {
    let limit = match q.limit.unwrap_or(100) {
        n @ 1..=kilocloud_ingest::MAX_LIST_LIMIT => n,
        _ => return Err(ApiError::bad_request("limit must be 1 to 500")),
    };
    let (sessions, next) = s
        .ingest
        .list(scope.owner(), q.after.as_deref().unwrap_or(""), limit)
        .await?;
    Ok(Json(SessionPage { sessions, next }))
}

/// `GET /api/session/{id}`: one CLI session's summary.
#[utoipa::path(get, path = "/api/session/{id}", tag = "cli-sessions",
    params(("id" = String, Path, description = "Session id, ses_…")),
    responses((status = 200, body = CliSession), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
) -> Result<Json<CliSession>, ApiError> {
    Ok(Json(s.ingest.get(scope.owner(), &id).await?))
}

/// `DELETE /api/session/{id}`: deletes the session, its items and its share.
#[utoipa::path(delete, path = "/api/session/{id}", tag = "cli-sessions",
    params(("id" = String, Path, description = "Session id")),
    responses((status = 200, description = "`{success: true}`"), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    s.ingest.delete(scope.owner(), &id).await?;
    Ok(Json(serde_json::json!({"success": true})))
}

/// Query of the ingest route.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct IngestQuery {
    /// Ingest protocol version (the CLI 7.7.7 sends 2). Default 0.
    pub v: Option<u32>,
}

/// `POST /api/session/{id}/ingest?v=2`: stores items `{data:[{type, data},…]}`, compacted
/// by key (`message:<id>`, `part:<id>`, one per other type; a later version replaces an
/// earlier one). Body at most 8 MiB (413 `payload_too_large`), at most 2,000 items (400
/// `too_many_items`); an item over 2 MiB is dropped and named in `dropped`.
#[utoipa::path(post, path = "/api/session/{id}/ingest", tag = "cli-sessions", params(
        ("id" = String, Path, description = "Session id"), IngestQuery),
    request_body(content = Object, description = "`{data:[{type, data}, …]}`"),
    responses((status = 200, body = IngestOutcome),
        (status = 400, description = "malformed JSON or item (`invalid_request`), `too_many_items`", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn ingest(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
    Query(q): Query<IngestQuery>,
    body: Body,
) -> Result<Json<IngestOutcome>, ApiError> {
    let body = read_body(body, MAX_INGEST_BODY_BYTES).await?;
    Ok(Json(
        s.ingest
            .ingest(scope.owner(), &id, q.v.unwrap_or(0), &body)
            .await?,
    ))
}

/// Answer of the share route.
#[derive(Serialize, ToSchema)]
pub struct Shared {
    /// The share token: anyone holding it reads the session at `GET /session/{token}`
    /// (`kilo import https://app.kilo.ai/s/<token>`). A random UUID; the same while shared.
    pub share_token: String,
}

/// `POST /api/session/{id}/share`: shares the session (idempotent).
#[utoipa::path(post, path = "/api/session/{id}/share", tag = "cli-sessions",
    params(("id" = String, Path, description = "Session id")),
    responses((status = 200, body = Shared), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn share(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
) -> Result<Json<Shared>, ApiError> {
    Ok(Json(Shared {
        share_token: s.ingest.share(scope.owner(), &id).await?,
    }))
}

/// `POST /api/session/{id}/unshare`: the share token stops working (a no-op when unshared).
#[utoipa::path(post, path = "/api/session/{id}/unshare", tag = "cli-sessions",
    params(("id" = String, Path, description = "Session id")),
    responses((status = 200, description = "`{success: true}`"), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn unshare(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    s.ingest.unshare(scope.owner(), &id).await?;
    Ok(Json(serde_json::json!({"success": true})))
}

/// Body of the title route.
#[derive(Deserialize, ToSchema)]
pub struct SetTitle {
    /// The title (cut to 500 characters).
    pub title: String,
    /// Whether the model wrote it. Default false.
    #[serde(default)]
    pub generated: bool,
}

/// `POST /api/session/{id}/title`: sets the session's title.
#[utoipa::path(post, path = "/api/session/{id}/title", tag = "cli-sessions", request_body = SetTitle,
    params(("id" = String, Path, description = "Session id")),
    responses((status = 200, description = "`{success: true}`"), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn title(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
    Json(body): Json<SetTitle>,
) -> Result<Json<Value>, ApiError> {
    s.ingest
        .set_title(scope.owner(), &id, &body.title, body.generated)
        .await?;
    Ok(Json(serde_json::json!({"success": true})))
}

/// `GET /api/session/{id}/export`: the session as `kilo export` prints it:
/// `{info, messages:[{info, parts:[…]}]}`, messages and parts in id (time) order.
#[utoipa::path(get, path = "/api/session/{id}/export", tag = "cli-sessions",
    params(("id" = String, Path, description = "Session id")),
    responses((status = 200, description = "`{info, messages:[{info, parts}]}`"),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn export(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.ingest.export(scope.owner(), &id).await?))
}

/// `GET /session/{shareId}`: a shared session's export, without credentials (the token is
/// the capability). 404 `share_not_found` when unknown or unshared.
#[utoipa::path(get, path = "/session/{shareId}", tag = "cli-sessions",
    params(("shareId" = String, Path, description = "The share token")),
    responses((status = 200, description = "`{info, messages:[{info, parts}]}`"),
        (status = 404, body = ErrorBody)))]
pub async fn shared(
    State(s): State<AppState>,
    Path(share_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.ingest.shared_export(&share_id).await?))
}
