//! `/api/bots`: service identities of the owner acted for, used by automations. A JWT issued
//! with `botId` acts as the bot (and is revoked when the bot is deleted).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use kilocloud_identity::model::BotView;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ErrorBody;
use crate::auth::{Admin, Member, RequireRole};
use crate::{ApiError, AppState, Json};

/// Body of `POST /api/bots`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBot {
    /// Name, 1–100 characters.
    pub name: String,
}

/// `POST /api/bots` (admins).
#[utoipa::path(post, path = "/api/bots", tag = "bots", request_body = CreateBot,
    params(("X-KiloCode-OrganizationId" = Option<Uuid>, Header, description = "Act for this organization (admins)")),
    responses((status = 201, body = BotView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_bot(
    State(s): State<AppState>,
    RequireRole(scope, ..): RequireRole<Admin>,
    Json(body): Json<CreateBot>,
) -> Result<(StatusCode, Json<BotView>), ApiError> {
    let bot = s
        .identity
        .create_bot(scope.owner(), &body.name, &scope.auth.initiator())
        .await?;
    Ok((StatusCode::CREATED, Json(bot)))
}

/// Bots of an owner.
#[derive(Serialize, ToSchema)]
pub struct BotList {
    /// The bots.
    pub bots: Vec<BotView>,
}

/// `GET /api/bots` (members).
#[utoipa::path(get, path = "/api/bots", tag = "bots",
    params(("X-KiloCode-OrganizationId" = Option<Uuid>, Header, description = "Act for this organization")),
    responses((status = 200, body = BotList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_bots(
    State(s): State<AppState>,
    RequireRole(scope, ..): RequireRole<Member>,
) -> Result<Json<BotList>, ApiError> {
    Ok(Json(BotList {
        bots: s.identity.list_bots(scope.owner()).await?,
    }))
}

/// `DELETE /api/bots/{id}` (admins).
#[utoipa::path(delete, path = "/api/bots/{id}", tag = "bots",
    params(("id" = Uuid, Path, description = "Bot id"),
        ("X-KiloCode-OrganizationId" = Option<Uuid>, Header, description = "Act for this organization (admins)")),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_bot(
    State(s): State<AppState>,
    RequireRole(scope, ..): RequireRole<Admin>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = kilocloud_identity::owner::parse_uuid(&id)
        .ok_or_else(|| ApiError::not_found("bot not found"))?;
    s.identity
        .delete_bot(scope.owner(), id, &scope.auth.initiator())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
