//! `/api/sessions`: Cloud Agent sessions (reference §3). Owner-scoped: a user's own sessions,
//! or an organization's with `X-KiloCode-OrganizationId`; another owner's session is 404. The
//! live stream is a WebSocket opened with a single-use ticket (`POST /api/tickets` with
//! resource `session:<id>`), replaying the log after `fromId` in batches of at most 1 MiB and
//! then following it live.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kilocloud_agent::{
    AgentError, Agents, BusyScope, Caller, EventFilter, EventFrame, FollowUp, PrepareRequest,
    Prepared, SessionExport, SessionSummary, SessionView, Started,
};
use kilocloud_identity::Owner;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::ErrorBody;
use crate::auth::OwnerScope;
use crate::{ApiError, AppState, Json};

/// The gateway's catalog and organizations' policies as the Cloud Agent checks a session's
/// model: the route the gateway would take (an organization's custom model, or the catalog
/// with `kilo/auto` resolved for the mode), then the organization's allow-list, as
/// `api/gateway.rs` does for each request.
pub struct GatewayModels(pub std::sync::Arc<super::gateway::GatewayState>);

#[async_trait::async_trait]
impl kilocloud_agent::ModelCatalog for GatewayModels {
    async fn check(
        &self,
        org: Option<Uuid>,
        model: &str,
        mode: kilocloud_agent::session::Mode,
    ) -> Result<(), AgentError> {
        let g = &self.0;
        let policy = match org {
            Some(org) => Some(g.policies.get(org).await.map_err(|e| {
                AgentError::Internal(format!("cannot read the organization's policy: {e}"))
            })?),
            None => None,
        };
        if policy
            .as_ref()
            .is_some_and(|p| p.custom_model(model).is_some())
        {
            return Ok(());
        }
        let Some(route) = g.catalog.route(model, Some(mode.as_str())) else {
            return Err(AgentError::ModelNotFound {
                message: format!("model `{model}` does not exist"),
                not_allowed: false,
            });
        };
        if let Some(policy) = &policy
            && !policy.allows(route.resolved)
        {
            return Err(AgentError::ModelNotFound {
                message: format!(
                    "model `{}` is not allowed by this organization's policy",
                    route.resolved
                ),
                not_allowed: true,
            });
        }
        Ok(())
    }
}

/// Most bytes of events sent per replay batch (reference: 1 MiB).
pub const REPLAY_BATCH_BYTES: usize = 1 << 20;

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        let message = e.to_string();
        match e {
            AgentError::Invalid(_) => ApiError::bad_request(message),
            AgentError::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "session_not_found", message)
            }
            AgentError::Conflict { active, .. } => {
                let code = if active.is_some() {
                    "execution_in_progress"
                } else {
                    "conflict"
                };
                ApiError {
                    details: active.map(|a| serde_json::json!({"activeExecutionId": a})),
                    ..ApiError::new(StatusCode::CONFLICT, code, message)
                }
            }
            AgentError::RepositoryNotFound(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "repository_not_found",
                message,
            ),
            AgentError::BranchNotFound(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "branch_not_found",
                message,
            ),
            AgentError::ModelNotFound { not_allowed, .. } => ApiError::new(
                StatusCode::NOT_FOUND,
                if not_allowed {
                    "model_not_allowed"
                } else {
                    "model_not_found"
                },
                message,
            ),
            AgentError::SetupFailed(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "setup_command_failed",
                message,
            ),
            AgentError::Unavailable { retryable, .. } => ApiError {
                details: Some(serde_json::json!({"retryable": retryable})),
                retry_after_secs: retryable.then_some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "sandbox_unavailable",
                    message,
                )
            },
            AgentError::Busy {
                scope: BusyScope::Owner,
                ..
            } => ApiError {
                retry_after_secs: Some(5),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_executions",
                    message,
                )
            },
            AgentError::Busy {
                scope: BusyScope::Node,
                ..
            } => ApiError {
                details: Some(serde_json::json!({"retryable": true})),
                retry_after_secs: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "node_at_capacity", message)
            },
            AgentError::Internal(_) => {
                tracing::error!(error = %message, "cloud agent failure");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
            }
            AgentError::Substrate(e) => e.into(),
        }
    }
}

/// The Cloud Agent, or 503 `agent_disabled`.
pub(crate) fn agents(s: &AppState) -> Result<&Agents, ApiError> {
    s.agents.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "agent_disabled",
            "the Cloud Agent is not enabled on this server",
        )
    })
}

/// The Cloud Agent caller of an owner scope.
pub(crate) fn caller(scope: &OwnerScope) -> Caller {
    Caller {
        user: scope.auth.principal.user,
        org: match scope.owner() {
            Owner::Org(org) => Some(org),
            Owner::User(_) => None,
        },
        bot: scope.auth.principal.bot,
    }
}

/// A GitHub repository without a token is cloned with `owner`'s GitHub App installation
/// token when the owner has an installation there (reference §9), else anonymously: sets
/// `body.git_token` in the first case.
///
/// Errors: the token service's failures other than "no installation".
pub(crate) async fn with_installation_token(
    s: &AppState,
    owner: Owner,
    body: &mut PrepareRequest,
) -> Result<(), ApiError> {
    if let (Some(repo), None, Some(automation)) =
        (&body.github_repo, &body.git_token, &s.automation)
        && automation.github().is_some()
    {
        match automation.token_for_repo(owner, repo).await {
            Ok((_, token)) => body.git_token = Some(token.token),
            Err(kilocloud_automation::AutomationError::NotFound(_))
            | Err(kilocloud_automation::AutomationError::Invalid(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `POST /api/sessions`: prepares a session: clones the repository into a new workspace on
/// `session/<id>` (or `upstreamBranch`) and runs the setup commands. Then `initiate` it.
#[utoipa::path(post, path = "/api/sessions", tag = "sessions", request_body = PrepareRequest,
    responses((status = 201, body = Prepared), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 422, description = "a setup command failed", body = ErrorBody),
        (status = 503, description = "sandbox or clone failure; `retryable` says whether to retry", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn prepare(
    State(s): State<AppState>,
    scope: OwnerScope,
    Json(mut body): Json<PrepareRequest>,
) -> Result<(StatusCode, Json<Prepared>), ApiError> {
    let agents = agents(&s)?;
    with_installation_token(&s, scope.owner(), &mut body).await?;
    let prepared = agents.prepare(caller(&scope), body).await?;
    Ok((StatusCode::CREATED, Json(prepared)))
}

/// `GET /api/sessions`: the caller's sessions (the organization's in an organization scope),
/// newest first.
#[utoipa::path(get, path = "/api/sessions", tag = "sessions",
    responses((status = 200, body = Vec<SessionSummary>), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(s): State<AppState>,
    scope: OwnerScope,
) -> Result<Json<Vec<SessionSummary>>, ApiError> {
    Ok(Json(agents(&s)?.list(caller(&scope)).await?))
}

/// `GET /api/sessions/{id}`: the session and its executions; secrets only as a count.
#[utoipa::path(get, path = "/api/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "Session id, agent_<uuid>")),
    responses((status = 200, body = SessionView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_session(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    Ok(Json(agents(&s)?.get(caller(&scope), &id).await?))
}

/// `DELETE /api/sessions/{id}`: stops the session's execution and deletes its state,
/// workspace and history.
#[utoipa::path(delete, path = "/api/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_session(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    agents(&s)?.delete(caller(&scope), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/sessions/{id}/initiate`: starts the first execution with the prepared prompt.
/// 409 `execution_in_progress` (with `activeExecutionId`) while one runs.
#[utoipa::path(post, path = "/api/sessions/{id}/initiate", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses((status = 202, body = Started), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn initiate(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Started>), ApiError> {
    let started = agents(&s)?.initiate(caller(&scope), &id).await?;
    Ok((StatusCode::ACCEPTED, Json(started)))
}

/// `POST /api/sessions/{id}/messages`: a follow-up message, run as a new execution that
/// continues the conversation. 409 while another runs.
#[utoipa::path(post, path = "/api/sessions/{id}/messages", tag = "sessions", request_body = FollowUp,
    params(("id" = String, Path, description = "Session id")),
    responses((status = 202, body = Started), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn send_message(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
    Json(body): Json<FollowUp>,
) -> Result<(StatusCode, Json<Started>), ApiError> {
    let started = agents(&s)?.send(caller(&scope), &id, body).await?;
    Ok((StatusCode::ACCEPTED, Json(started)))
}

/// Answer of `interrupt`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Interrupting {
    /// The execution asked to stop.
    pub execution_id: String,
}

/// `POST /api/sessions/{id}/interrupt`: stops the active execution (it ends `interrupted`).
/// 409 when nothing runs.
#[utoipa::path(post, path = "/api/sessions/{id}/interrupt", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses((status = 202, body = Interrupting), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn interrupt(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Interrupting>), ApiError> {
    let execution_id = agents(&s)?.interrupt(caller(&scope), &id).await?;
    Ok((StatusCode::ACCEPTED, Json(Interrupting { execution_id })))
}

/// `GET /api/sessions/{id}/export`: the session and its compacted history.
#[utoipa::path(get, path = "/api/sessions/{id}/export", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses((status = 200, body = SessionExport), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn export(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
) -> Result<Json<SessionExport>, ApiError> {
    Ok(Json(agents(&s)?.export(caller(&scope), &id).await?))
}

/// Query of the event routes.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Events after this id (default 0: from the start).
    #[serde(default)]
    pub from_id: u64,
    /// Comma-separated execution ids to keep.
    pub execution_ids: Option<String>,
    /// Comma-separated event types to keep.
    pub event_types: Option<String>,
    /// The stream's ticket (WebSocket only).
    pub ticket: Option<String>,
    /// The organization of the session, for a member other than its creator (WebSocket only).
    pub organization_id: Option<Uuid>,
}

impl EventQuery {
    fn filter(&self) -> EventFilter {
        let split = |v: &Option<String>| {
            v.as_deref()
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        EventFilter {
            execution_ids: split(&self.execution_ids),
            event_types: split(&self.event_types),
        }
    }
}

/// A page of events.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventPage {
    /// Events, oldest first (at most about 1 MiB).
    pub events: Vec<EventFrame>,
    /// Pass as `fromId` for the next page.
    pub next_from_id: u64,
}

/// `GET /api/sessions/{id}/events`: the event log after `fromId`, filtered, one page of at
/// most 1 MiB (the stream's replay, for clients without WebSockets).
#[utoipa::path(get, path = "/api/sessions/{id}/events", tag = "sessions", params(("id" = String, Path, description = "Session id"), EventQuery),
    responses((status = 200, body = EventPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
    Query(q): Query<EventQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let agents = agents(&s)?;
    let (key, _) = agents.locate(caller(&scope), &id).await?;
    let (events, next_from_id) = agents
        .events(&key, &id, q.from_id, &q.filter(), REPLAY_BATCH_BYTES)
        .await?;
    Ok(Json(EventPage {
        events,
        next_from_id,
    }))
}

/// `GET /api/sessions/{id}/stream?ticket=…[&fromId&executionIds&eventTypes&organizationId]`:
/// the WebSocket event stream. Each message is one event frame (JSON text). A plain request
/// is refused with 426; a missing, used or expired ticket with 401.
#[utoipa::path(get, path = "/api/sessions/{id}/stream", tag = "sessions", params(("id" = String, Path, description = "Session id"), EventQuery),
    responses((status = 101, description = "WebSocket of event frames"), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 426, body = ErrorBody)))]
pub async fn stream(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EventQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    open_stream(s, id, q, upgrade, Ending::Follow).await
}

/// How a stream ends besides the client going away.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// It follows the session for as long as the client stays.
    Follow,
    /// It closes (1000) after the first frame that ends an execution, as the Kilo CLI's
    /// `kilo cloud --stream` expects (`api/cloud.rs`).
    AtTerminal,
}

/// `caller` in a personal scope, acting instead for the organization it started `session`
/// for, while it is still a member (clients such as `kilo cloud` name the organization only
/// when they start a session). Any other caller as it is.
pub(crate) async fn creator_scope(
    s: &AppState,
    caller: Caller,
    session: &str,
) -> Result<Caller, ApiError> {
    if caller.org.is_some() || !kilocloud_agent::ids::is_session_id(session) {
        return Ok(caller);
    }
    let key = kilocloud_agent::ids::actor_key(caller.user, session);
    let meta: Option<kilocloud_agent::session::SessionMeta> = s
        .substrate
        .actor_read(kilocloud_agent::session::SESSION_ACTOR, &key, "meta")
        .await?;
    match meta.and_then(|m| m.org_id) {
        Some(org) if s.identity.org_role(org, caller.user).await?.is_some() => Ok(Caller {
            org: Some(org),
            ..caller
        }),
        _ => Ok(caller),
    }
}

/// The event stream of session `id` for the ticket in `q` (see [`stream`]).
pub(crate) async fn open_stream(
    s: AppState,
    id: String,
    q: EventQuery,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    ending: Ending,
) -> Result<Response, ApiError> {
    let Ok(upgrade) = upgrade else {
        return Err(ApiError::websocket_required());
    };
    let agents = agents(&s)?.clone();
    let ticket = q
        .ticket
        .as_deref()
        .ok_or_else(|| ApiError::unauthorized("a ticket is required (POST /api/tickets)"))?;
    let user = s
        .identity
        .redeem_ticket(ticket, &format!("session:{id}"))
        .await?;
    if let Some(org) = q.organization_id
        && s.identity.org_role(org, user).await?.is_none()
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "session_not_found",
            "session not found",
        ));
    }
    let caller = Caller {
        user,
        org: q.organization_id,
        bot: None,
    };
    let caller = match ending {
        // `kilo cloud`'s stream URL names no organization.
        Ending::AtTerminal => creator_scope(&s, caller, &id).await?,
        Ending::Follow => caller,
    };
    let (key, _) = agents.locate(caller, &id).await?;
    let filter = q.filter();
    let from = q.from_id;
    Ok(upgrade
        .on_upgrade(move |socket| follow(socket, agents, key, id, from, filter, ending))
        .into_response())
}

/// Replays then follows the log until the client goes away. A node wakes its streams when it
/// records events; events recorded by another node arrive within a second.
async fn follow(
    mut socket: WebSocket,
    agents: Agents,
    key: String,
    session_id: String,
    mut cursor: u64,
    filter: EventFilter,
    ending: Ending,
) {
    let mut signal = agents.event_signal();
    loop {
        signal.borrow_and_update();
        let (frames, next) = match agents
            .events(&key, &session_id, cursor, &filter, REPLAY_BATCH_BYTES)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(session = %session_id, error = %e, "stream read failed");
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        };
        let caught_up = next == cursor;
        cursor = next;
        for frame in frames {
            let text = serde_json::to_string(&frame).expect("a frame serializes");
            if socket.send(Message::Text(text.into())).await.is_err() {
                return;
            }
            if ending == Ending::AtTerminal && frame.is_terminal() {
                let _ = socket
                    .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                        code: axum::extract::ws::close_code::NORMAL,
                        reason: "execution ended".into(),
                    })))
                    .await;
                return;
            }
        }
        if !caught_up {
            continue;
        }
        tokio::select! {
            _ = signal.changed() => {}
            () = agents.stopped() => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                // Client messages are ignored (reference).
                Some(Ok(_)) => {}
            },
        }
    }
}
