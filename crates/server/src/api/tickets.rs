//! `/api/tickets`: single-use, 60-second tickets that let a browser open a WebSocket or stream
//! for one resource without putting a long-lived token in a URL; and the internal route other
//! platform components use to redeem them.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::ErrorBody;
use crate::auth::{Internal, PersonalAuth};
use crate::{ApiError, AppState, Json};

/// Body of `POST /api/tickets`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TicketRequest {
    /// The one resource the ticket opens, e.g. `session:agent_…`; 1–512 characters.
    pub resource: String,
}

/// An issued ticket.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ticket {
    /// `kt_…`, usable once.
    pub ticket: String,
    /// Expiry, ms since epoch (60 s after issue).
    pub expires_at_ms: i64,
}

/// `POST /api/tickets`: a ticket for the caller and one resource (personal credentials only).
#[utoipa::path(post, path = "/api/tickets", tag = "tickets", request_body = TicketRequest,
    responses((status = 201, body = Ticket), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn issue_ticket(
    State(s): State<AppState>,
    PersonalAuth(auth): PersonalAuth,
    Json(body): Json<TicketRequest>,
) -> Result<(StatusCode, Json<Ticket>), ApiError> {
    let (ticket, expires_at_ms) = s
        .identity
        .issue_ticket(auth.principal.user, &body.resource)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(Ticket {
            ticket,
            expires_at_ms,
        }),
    ))
}

/// Body of `POST /api/internal/tickets/redeem`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RedeemTicket {
    /// The ticket.
    pub ticket: String,
    /// The resource being opened; must be the one the ticket was issued for.
    pub resource: String,
}

/// The user a redeemed ticket was issued to.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Redeemed {
    /// User id.
    pub user_id: Uuid,
}

/// `POST /api/internal/tickets/redeem` (internal secret): consumes a ticket. A second use, an
/// expired ticket or another resource → 401.
#[utoipa::path(post, path = "/api/internal/tickets/redeem", tag = "tickets", request_body = RedeemTicket,
    responses((status = 200, body = Redeemed), (status = 401, body = ErrorBody)),
    security(("internal" = [])))]
pub async fn redeem_ticket(
    State(s): State<AppState>,
    _: Internal,
    Json(body): Json<RedeemTicket>,
) -> Result<Json<Redeemed>, ApiError> {
    let user_id = s
        .identity
        .redeem_ticket(&body.ticket, &body.resource)
        .await?;
    Ok(Json(Redeemed { user_id }))
}
