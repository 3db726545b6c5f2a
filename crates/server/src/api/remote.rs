//! `kilo remote` (contract §5): the CLI holds a WebSocket at
//! `GET /api/user/cli?token=<credential>&connectionId=<uuid>` and sends a heartbeat about
//! every 10 s (answered `{type:"heartbeat_ack"}`) and `event` messages of its sessions; we
//! keep its presence (instance, sessions, last event per session) in this node's memory
//! ([`kilocloud_ingest::presence`]), readable at `GET /api/user/cli/connections`.
//!
//! A bad credential is refused after the upgrade with close code 4401 (the CLI treats it as
//! permanent, where a refused upgrade would be retried forever); too many connections with
//! 1013 (try again later). No extension is negotiated (no permessage-deflate).

use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kilocloud_ingest::presence::{Connection, Registration};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::ErrorBody;
use crate::auth::{OwnerScope, QueryToken};
use crate::error::Query;
use crate::{ApiError, AppState, Json};

/// A socket that sends nothing for this long is closed (1001); the CLI reconnects.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest message accepted from the CLI, bytes (1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Query of the `kilo remote` socket.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct SocketQuery {
    /// The credential (a user JWT or `kc_` API key).
    pub token: Option<String>,
    /// The CLI's connection id (a UUID).
    pub connection_id: Option<String>,
}

/// `GET /api/user/cli?token=…&connectionId=…`: the `kilo remote` WebSocket. A plain request
/// is 426 `websocket_required`; a missing or non-UUID `connectionId` is 400 before the
/// upgrade; a bad credential closes the socket with 4401 right after it.
#[utoipa::path(get, path = "/api/user/cli", tag = "cli-sessions", params(SocketQuery),
    responses((status = 101, description = "WebSocket: heartbeats and events in, `heartbeat_ack` out"),
        (status = 400, body = ErrorBody), (status = 426, body = ErrorBody)))]
pub async fn socket(
    State(s): State<AppState>,
    Query(q): Query<SocketQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    auth: Result<QueryToken, ApiError>,
) -> Result<Response, ApiError> {
    let Ok(upgrade) = upgrade else {
        return Err(ApiError::websocket_required());
    };
    let connection_id = q
        .connection_id
        .as_deref()
        .and_then(|c| uuid::Uuid::parse_str(c).ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "connectionId must be a UUID",
            )
        })?
        .to_string();
    let upgrade = upgrade.max_message_size(MAX_MESSAGE_BYTES);
    let scope = match auth {
        Ok(QueryToken(scope)) => scope,
        Err(e) => {
            let reason = e.message.clone();
            return Ok(upgrade
                .on_upgrade(move |socket| close(socket, 4401, reason))
                .into_response());
        }
    };
    let registration = match s.ingest.presence().connect(scope.owner(), &connection_id) {
        Ok(r) => r,
        Err(e) => {
            let reason = e.to_string();
            return Ok(upgrade
                .on_upgrade(move |socket| close(socket, 1013, reason))
                .into_response());
        }
    };
    Ok(upgrade
        .on_upgrade(move |socket| serve(socket, registration))
        .into_response())
}

async fn close(mut socket: WebSocket, code: u16, reason: String) {
    super::close_socket(&mut socket, code, &reason).await;
}

/// Reads the CLI's messages until it goes away or idles past [`IDLE_TIMEOUT`].
async fn serve(mut socket: WebSocket, registration: Registration) {
    loop {
        let message = match tokio::time::timeout(IDLE_TIMEOUT, socket.recv()).await {
            Err(_) => return close(socket, 1001, "idle".into()).await,
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return,
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(_))) => continue,
        };
        let Ok(message) = serde_json::from_str::<Value>(&message) else {
            tracing::debug!("kilo remote sent a message that is not JSON");
            continue;
        };
        match message["type"].as_str() {
            Some("heartbeat") => {
                registration.heartbeat(&message);
                let ack = json!({"type": "heartbeat_ack"}).to_string();
                if socket.send(Message::Text(ack.into())).await.is_err() {
                    return;
                }
            }
            Some("event") => {
                registration.event(&message);
            }
            // Answers to commands: we send none yet.
            _ => {}
        }
    }
}

/// The owner's `kilo remote` connections on this node.
#[derive(Serialize, ToSchema)]
pub struct Connections {
    /// By connection id.
    pub connections: Vec<Connection>,
}

/// `GET /api/user/cli/connections`: the `kilo remote` instances of the owner acted for that
/// are connected to this node, with their last heartbeat and the last event per session.
#[utoipa::path(get, path = "/api/user/cli/connections", tag = "cli-sessions",
    responses((status = 200, body = Connections), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn connections(
    State(s): State<AppState>,
    scope: OwnerScope,
) -> Result<Json<Connections>, ApiError> {
    Ok(Json(Connections {
        connections: s.ingest.presence().list(scope.owner()),
    }))
}
