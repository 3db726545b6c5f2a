//! `/api/tokens`: API keys of the owner acted for (admins of an organization), and user JWTs.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use kilocloud_identity::model::ApiKeyView;
use kilocloud_identity::{DEFAULT_TOKEN_TTL_S, Owner};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::ErrorBody;
use crate::auth::{Admin, Member, PersonalRole, RequireRole};
use crate::{ApiError, AppState, Json};

/// Body of `POST /api/tokens`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateKey {
    /// Name, 1–100 characters.
    pub name: String,
    /// Expiry, ms since epoch; default: never.
    pub expires_at_ms: Option<i64>,
}

/// A new API key: the key itself is shown only here.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedKey {
    /// `kc_…`; store it now.
    pub key: String,
    /// Its record.
    pub api_key: ApiKeyView,
}

/// `POST /api/tokens`: creates an API key for the owner acted for, with a personal credential.
/// An organization's key acts as its creator within that organization, and stops working if
/// they leave it. A key never outlives the credential that created it: without `expiresAtMs`
/// it gets that credential's expiry, and a later one is refused.
#[utoipa::path(post, path = "/api/tokens", tag = "tokens", request_body = CreateKey,
    params(("X-KiloCode-OrganizationId" = Option<Uuid>, Header, description = "Act for this organization (admins)")),
    responses((status = 201, body = CreatedKey), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_key(
    State(s): State<AppState>,
    PersonalRole(scope, ..): PersonalRole<Admin>,
    Json(body): Json<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let expires_at_ms = match (body.expires_at_ms, scope.auth.principal.expires_at_ms) {
        (Some(wanted), Some(limit)) if wanted > limit => {
            return Err(ApiError::bad_request(
                "expiresAtMs cannot be later than the expiry of the credential creating the key",
            ));
        }
        (None, limit) => limit,
        (wanted, _) => wanted,
    };
    let (key, api_key) = s
        .identity
        .create_api_key(
            scope.owner(),
            &body.name,
            expires_at_ms,
            &scope.auth.initiator(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(CreatedKey { key, api_key })))
}

/// API keys of an owner.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyList {
    /// Keys, newest first, revoked ones included.
    pub api_keys: Vec<ApiKeyView>,
}

/// `GET /api/tokens`: API keys of the owner acted for (never the keys themselves).
#[utoipa::path(get, path = "/api/tokens", tag = "tokens",
    params(("X-KiloCode-OrganizationId" = Option<Uuid>, Header, description = "Act for this organization (admins)")),
    responses((status = 200, body = KeyList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_keys(
    State(s): State<AppState>,
    RequireRole(scope, ..): RequireRole<Admin>,
) -> Result<Json<KeyList>, ApiError> {
    Ok(Json(KeyList {
        api_keys: s.identity.list_api_keys(scope.owner()).await?,
    }))
}

/// `DELETE /api/tokens/{id}`: revokes an API key; it fails from the next request on.
#[utoipa::path(delete, path = "/api/tokens/{id}", tag = "tokens",
    params(("id" = Uuid, Path, description = "API key id"),
        ("X-KiloCode-OrganizationId" = Option<Uuid>, Header, description = "Act for this organization (admins)")),
    responses((status = 200, body = ApiKeyView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_key(
    State(s): State<AppState>,
    RequireRole(scope, ..): RequireRole<Admin>,
    Path(id): Path<String>,
) -> Result<Json<ApiKeyView>, ApiError> {
    let id = kilocloud_identity::owner::parse_uuid(&id)
        .ok_or_else(|| ApiError::not_found("API key not found"))?;
    Ok(Json(
        s.identity
            .revoke_api_key(scope.owner(), id, &scope.auth.initiator())
            .await?,
    ))
}

/// Body of `POST /api/tokens/jwt`.
#[derive(Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssueJwt {
    /// Lifetime, s: 1 to 5 years. Default 30 days. Capped at the expiry of the credential
    /// asking for it.
    pub expires_in_seconds: Option<i64>,
    /// Act as this bot of the owner acted for.
    pub bot_id: Option<Uuid>,
}

/// An issued JWT.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuedJwt {
    /// The token (HS256, version 3).
    pub token: String,
    /// Expiry, s since epoch.
    pub expires_at: i64,
}

/// `POST /api/tokens/jwt`: a user JWT for the caller, pinned to the organization acted for,
/// with a personal credential. It expires no later than that credential; rotating the pepper
/// revokes it.
#[utoipa::path(post, path = "/api/tokens/jwt", tag = "tokens", request_body = IssueJwt,
    params(("X-KiloCode-OrganizationId" = Option<Uuid>, Header, description = "Pin the token to this organization")),
    responses((status = 201, body = IssuedJwt), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn issue_jwt(
    State(s): State<AppState>,
    PersonalRole(scope, ..): PersonalRole<Member>,
    Json(body): Json<IssueJwt>,
) -> Result<(StatusCode, Json<IssuedJwt>), ApiError> {
    let org = match scope.owner() {
        Owner::Org(id) => Some(id),
        Owner::User(_) => None,
    };
    let mut ttl_s = body.expires_in_seconds.unwrap_or(DEFAULT_TOKEN_TTL_S);
    if let Some(limit_ms) = scope.auth.principal.expires_at_ms {
        let left_s = (limit_ms - s.substrate.clock().now_ms()).div_euclid(1000);
        ttl_s = ttl_s.min(left_s.max(1));
    }
    let (token, expires_at) = s
        .identity
        .issue_jwt(
            scope.auth.principal.user,
            org,
            body.bot_id,
            ttl_s,
            &scope.auth.initiator(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(IssuedJwt { token, expires_at })))
}
