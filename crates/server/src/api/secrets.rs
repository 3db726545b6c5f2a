//! `/api/secrets`: named secrets of the owner acted for, encrypted at rest. Responses carry
//! names, counts and times, never values.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use kilocloud_identity::model::SecretMeta;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ErrorBody;
use crate::auth::{Admin, Member, RequireRole};
use crate::{ApiError, AppState, Json};

/// The owner's secrets.
#[derive(Serialize, ToSchema)]
pub struct SecretList {
    /// Number of secrets.
    pub count: usize,
    /// Names and times, by name.
    pub secrets: Vec<SecretMeta>,
}

/// `GET /api/secrets` (members): names and times of the owner's secrets.
#[utoipa::path(get, path = "/api/secrets", tag = "secrets",
    params(("X-KiloCode-OrganizationId" = Option<Uuid>, Header, description = "Act for this organization")),
    responses((status = 200, body = SecretList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_secrets(
    State(s): State<AppState>,
    RequireRole(scope, ..): RequireRole<Member>,
) -> Result<Json<SecretList>, ApiError> {
    let secrets = s.identity.list_secrets(scope.owner()).await?;
    Ok(Json(SecretList {
        count: secrets.len(),
        secrets,
    }))
}

/// Body of `PUT /api/secrets/{name}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretValue {
    /// The value, at most 64 KiB.
    pub value: String,
}

/// `PUT /api/secrets/{name}` (admins): creates or replaces a secret.
#[utoipa::path(put, path = "/api/secrets/{name}", tag = "secrets", request_body = SecretValue,
    params(("name" = String, Path, description = "Secret name: a letter or `_`, then letters, digits, `_`, `.`, `-`"),
        ("X-KiloCode-OrganizationId" = Option<Uuid>, Header, description = "Act for this organization (admins)")),
    responses((status = 200, body = SecretMeta), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_secret(
    State(s): State<AppState>,
    RequireRole(scope, ..): RequireRole<Admin>,
    Path(name): Path<String>,
    Json(body): Json<SecretValue>,
) -> Result<Json<SecretMeta>, ApiError> {
    Ok(Json(
        s.identity
            .put_secret(
                scope.owner(),
                &name,
                body.value.as_bytes(),
                &scope.auth.initiator(),
            )
            .await?,
    ))
}

/// `DELETE /api/secrets/{name}` (admins).
#[utoipa::path(delete, path = "/api/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name"),
        ("X-KiloCode-OrganizationId" = Option<Uuid>, Header, description = "Act for this organization (admins)")),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_secret(
    State(s): State<AppState>,
    RequireRole(scope, ..): RequireRole<Admin>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.identity
        .delete_secret(scope.owner(), &name, &scope.auth.initiator())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
