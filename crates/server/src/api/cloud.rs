//! The Kilo Code CLI's `kilo cloud` (contract §6): the tRPC procedures it calls on
//! `CLOUD_AGENT_NEXT_BASE_URL` (`POST /trpc/start`, `POST /trpc/send`, `GET
//! /trpc/getMessageResult`), the stream ticket it asks `KILO_WEB_APP_URL` for (`POST
//! /api/cloud-agent-next/sessions/stream-ticket`), and the `/stream` WebSocket, all served
//! by our Cloud Agent sessions (`api/sessions.rs`). Point both variables at this server.
//!
//! Every answer is exactly `{"result":{"data":…}}` (the CLI is strict), echoing the CLI's
//! `messageId` and `cloudAgentSessionId`. The CLI's message ids name executions: one
//! `kilo_cloud_message` actor per session, keyed `<owner>/<sessionId>`, keeps `m/<messageId>` →
//! execution id, bound right after the execution starts.
//!
//! Organizations: the CLI names one in `start`'s `options.kilocodeOrganizationId` (and in the
//! stream ticket's `organizationId`), not in a header, and in no other call. So `start` acts
//! for that organization (the caller must be a member: else 403 `not_a_member`), and the
//! other calls find a session its creator started for an organization they still belong to,
//! as the `X-KiloCode-OrganizationId` header would.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use kilocloud_agent::session::{ExecStatus, Mode};
use kilocloud_agent::{Caller, FollowUp, PrepareRequest};
use kilocloud_identity::Owner;
use kilocloud_substrate::{Actor, ActorContext, Result as SubResult};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;

use super::ErrorBody;
use super::sessions::{
    Ending, EventQuery, agents, caller, creator_scope, open_stream, with_installation_token,
};
use crate::auth::OwnerScope;
use crate::{ApiError, AppState, Json};

/// Actor type of the message-id bindings.
pub const MESSAGE_ACTOR: &str = "kilo_cloud_message";

/// Binds a CLI message id to the execution it started.
pub(crate) struct MessageActor;

/// `m/<message_id>` → `execution_id`, in the session's binding actor.
pub(crate) struct Bind {
    message_id: String,
    execution_id: String,
}

impl Actor for MessageActor {
    const TYPE: &'static str = MESSAGE_ACTOR;
    type Call = Bind;
    type Reply = ();

    async fn call(&self, ctx: &mut ActorContext, call: Bind) -> SubResult<()> {
        ctx.put(&format!("m/{}", call.message_id), &call.execution_id)
    }
}

/// A tRPC answer: `{"result":{"data": data}}`.
fn trpc(data: Value) -> Json<Value> {
    Json(json!({"result": {"data": data}}))
}

/// The CLI's message: `{prompt, id}`.
#[derive(Deserialize)]
struct Message {
    prompt: String,
    id: String,
}

/// Checks a message as the CLI makes it: `id` is `msg_` + 12 hex digits + 14 base-62
/// characters, the prompt 1–100,000 characters. Errors: 400 `invalid_request`.
fn check_message(m: &Message) -> Result<(), ApiError> {
    let rest = m.id.strip_prefix("msg_").unwrap_or("");
    let ok = rest.len() == 26
        && rest[..12].bytes().all(|b| b.is_ascii_hexdigit())
        && rest[12..].bytes().all(|b| b.is_ascii_alphanumeric());
    if !ok {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "message.id must be msg_ followed by 12 hex digits and 14 letters or digits",
        ));
    }
    let n = m.prompt.chars().count();
    if n == 0 || n > 100_000 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "message.prompt must be 1 to 100,000 characters",
        ));
    }
    Ok(())
}

fn parse<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    serde_json::from_value(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))
}

/// The repository of a `start`, as the CLI sends it (contract §6 step 4).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Repository {
    Github {
        repo: String,
        branch: Option<String>,
    },
    Gitlab {
        url: String,
        branch: Option<String>,
    },
    Git {
        url: String,
        branch: Option<String>,
    },
}

#[derive(Deserialize)]
struct Agent {
    mode: Option<String>,
    model: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartOptions {
    kilocode_organization_id: Option<uuid::Uuid>,
}

#[derive(Deserialize)]
struct Start {
    message: Message,
    agent: Option<Agent>,
    repository: Repository,
    options: Option<StartOptions>,
}

/// The owner a caller acts for.
fn owner_of(caller: &Caller) -> Owner {
    caller.org.map_or(Owner::User(caller.user), Owner::Org)
}

/// `scope`'s caller, acting for `org` when it names one and the scope is personal.
///
/// Errors: 403 `not_a_member` when the caller is not a member of `org`.
async fn acting_for(
    s: &AppState,
    scope: &OwnerScope,
    org: Option<uuid::Uuid>,
) -> Result<Caller, ApiError> {
    let mut caller = caller(scope);
    if let (Some(org), None) = (org, caller.org) {
        if s.identity.org_role(org, caller.user).await?.is_none() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "not_a_member",
                "you are not a member of this organization",
            ));
        }
        caller.org = Some(org);
    }
    Ok(caller)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Send {
    cloud_agent_session_id: String,
    message: Message,
}

async fn bind(
    s: &AppState,
    caller: &Caller,
    session_id: &str,
    message_id: &str,
    execution_id: &str,
) -> Result<(), ApiError> {
    let key = format!("{}/{session_id}", owner_of(caller));
    s.substrate
        .actors()
        .call::<MessageActor>(
            &key,
            Bind {
                message_id: message_id.to_owned(),
                execution_id: execution_id.to_owned(),
            },
        )
        .await?;
    Ok(())
}

/// `POST /trpc/start`: prepares a Cloud Agent session on the repository (cloning it, a GitHub
/// one with the owner's GitHub App installation token when there is one, as `POST
/// /api/sessions` does) and starts its first execution with the message. Body: `{message: {prompt, id}, agent?: {mode,
/// model}, repository: {type: github, repo} | {type: git|gitlab, url}, options?}` (the raw
/// input, no `json` wrapper). Answer: `{cloudAgentSessionId, kiloSessionId, messageId,
/// delivery: "started"}`.
///
/// Errors: 400 `invalid_request` (a malformed input, an unknown mode); as `POST
/// /api/sessions` and `initiate` otherwise (404 unknown model, 422 a missing repository).
#[utoipa::path(post, path = "/trpc/start", tag = "sessions",
    request_body(content = Object, description = "the Kilo CLI's start input"),
    responses((status = 200, description = "`{result: {data: {cloudAgentSessionId, kiloSessionId, messageId, delivery}}}`"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn start(
    State(s): State<AppState>,
    scope: OwnerScope,
    Json(body): Json<Value>,
) -> Result<Json<Value>, ApiError> {
    let agents = agents(&s)?;
    let start: Start = parse(body)?;
    check_message(&start.message)?;
    let org = start.options.and_then(|o| o.kilocode_organization_id);
    let caller = acting_for(&s, &scope, org).await?;
    let (agent_mode, model) = start.agent.map(|a| (a.mode, a.model)).unwrap_or_default();
    let mode = agent_mode
        .map(|m| {
            serde_json::from_value::<Mode>(Value::String(m.clone())).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("unknown mode `{m}`"),
                )
            })
        })
        .transpose()?;
    let mut prepare = PrepareRequest {
        mode,
        // The CLI names catalog models `kilo/<id>` in its own catalog, but sends the id.
        model: model.map(|m| m.strip_prefix("kilo/").map(str::to_owned).unwrap_or(m)),
        prompt: start.message.prompt.clone(),
        auto_commit: true,
        ..PrepareRequest::default()
    };
    match start.repository {
        Repository::Github { repo, branch } => {
            prepare.github_repo = Some(repo);
            prepare.upstream_branch = branch;
        }
        Repository::Gitlab { url, branch } | Repository::Git { url, branch } => {
            prepare.git_url = Some(url);
            prepare.upstream_branch = branch;
        }
    }
    with_installation_token(&s, owner_of(&caller), &mut prepare).await?;
    let prepared = agents.prepare(caller, prepare).await?;
    let started = agents.initiate(caller, &prepared.session_id).await?;
    bind(
        &s,
        &caller,
        &started.session_id,
        &start.message.id,
        &started.execution_id,
    )
    .await?;
    Ok(trpc(json!({
        "cloudAgentSessionId": started.session_id,
        "kiloSessionId": started.session_id,
        "messageId": start.message.id,
        "delivery": "started",
    })))
}

/// `POST /trpc/send`: a follow-up message on the session (a new execution). Body:
/// `{cloudAgentSessionId, message: {prompt, id}}`. Answer: `{cloudAgentSessionId, status:
/// "started", streamUrl, messageId, delivery}`; `streamUrl` is this server's `/stream` for
/// that execution with a fresh single-use ticket (60 s).
///
/// Errors: 400 `invalid_request`; 404 `session_not_found`; 409 `execution_in_progress`.
#[utoipa::path(post, path = "/trpc/send", tag = "sessions",
    request_body(content = Object, description = "`{cloudAgentSessionId, message: {prompt, id}}`"),
    responses((status = 200, description = "`{result: {data: {cloudAgentSessionId, status, streamUrl, messageId, delivery}}}`"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn send(
    State(s): State<AppState>,
    scope: OwnerScope,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Json<Value>, ApiError> {
    let agents = agents(&s)?;
    let send: Send = parse(body)?;
    check_message(&send.message)?;
    let id = send.cloud_agent_session_id;
    let caller = creator_scope(&s, caller(&scope), &id).await?;
    let started = agents
        .send(
            caller,
            &id,
            FollowUp {
                prompt: send.message.prompt,
                ..FollowUp::default()
            },
        )
        .await?;
    bind(&s, &caller, &id, &send.message.id, &started.execution_id).await?;
    let (ticket, _) = s
        .identity
        .issue_ticket(scope.auth.principal.user, &format!("session:{id}"))
        .await?;
    let origin = ws_origin(&headers);
    let mut stream_url = format!(
        "{origin}/stream?cloudAgentSessionId={id}&ticket={ticket}&executionIds={}",
        started.execution_id
    );
    if let Some(org) = caller.org {
        stream_url += &format!("&organizationId={org}");
    }
    Ok(trpc(json!({
        "cloudAgentSessionId": id,
        "status": "started",
        "streamUrl": stream_url,
        "messageId": send.message.id,
        "delivery": "started",
    })))
}

/// `ws://<Host>` (`wss://` behind a proxy that says `X-Forwarded-Proto: https`).
fn ws_origin(headers: &HeaderMap) -> String {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let tls = headers
        .get("x-forwarded-proto")
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    format!("{}://{host}", if tls { "wss" } else { "ws" })
}

/// Query of `getMessageResult`: `input`, URL-encoded JSON `{cloudAgentSessionId, messageId}`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResultQuery {
    /// `{"cloudAgentSessionId": …, "messageId": …}`.
    pub input: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResultInput {
    cloud_agent_session_id: String,
    message_id: String,
}

/// `GET /trpc/getMessageResult?input=…`: where the execution a message started stands:
/// `{cloudAgentSessionId, messageId, status: queued|running|completed|failed|interrupted,
/// createdAt, queuedAt, acceptedAt?, terminalAt? (ms since epoch), completionSource?,
/// failure?: {message, retryable: false}, assistant?: {messageId, text}}` (the agent's
/// summary, once completed). The CLI's schema rules hold: `acceptedAt` only once running,
/// `terminalAt` and `completionSource` only when terminal, `failure` only when failed or
/// interrupted, `assistant` only when completed.
///
/// Errors: 400 `invalid_request`; 404 `message_not_found` (a message this owner never sent
/// on that session) or `session_not_found`.
#[utoipa::path(get, path = "/trpc/getMessageResult", tag = "sessions", params(ResultQuery),
    responses((status = 200, description = "`{result: {data: {cloudAgentSessionId, messageId, status, …}}}`"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_message_result(
    State(s): State<AppState>,
    scope: OwnerScope,
    Query(q): Query<ResultQuery>,
) -> Result<Json<Value>, ApiError> {
    let agents = agents(&s)?;
    let input: ResultInput =
        parse(serde_json::from_str(&q.input).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
        })?)?;
    let (session, message) = (&input.cloud_agent_session_id, &input.message_id);
    let caller = creator_scope(&s, caller(&scope), session).await?;
    let view = agents.get(caller, session).await?;
    let key = format!("{}/{session}", owner_of(&caller));
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "message_not_found",
            "no such message on this session",
        )
    };
    let execution_id: String = s
        .substrate
        .actor_read(MESSAGE_ACTOR, &key, &format!("m/{message}"))
        .await?
        .ok_or_else(not_found)?;
    let exec = view
        .executions
        .iter()
        .find(|e| e.execution_id == execution_id)
        .ok_or_else(not_found)?;
    let status = match exec.status {
        ExecStatus::Pending => "queued",
        ExecStatus::Running => "running",
        ExecStatus::Completed => "completed",
        ExecStatus::Failed => "failed",
        ExecStatus::Interrupted => "interrupted",
    };
    let mut data = json!({
        "cloudAgentSessionId": session,
        "messageId": message,
        "status": status,
        "createdAt": exec.created_at,
        "queuedAt": exec.created_at,
    });
    if let (Some(at), false) = (exec.started_at, exec.status == ExecStatus::Pending) {
        data["acceptedAt"] = at.into();
    }
    if exec.status.is_terminal() {
        data["terminalAt"] = exec.completed_at.unwrap_or(exec.created_at).into();
        data["completionSource"] = "agent".into();
    }
    if matches!(exec.status, ExecStatus::Failed | ExecStatus::Interrupted) {
        let message = exec.error.clone().unwrap_or_else(|| status.to_owned());
        let message: String = message.chars().take(4096).collect();
        data["failure"] = json!({"message": message, "retryable": false});
    }
    if exec.status == ExecStatus::Completed {
        data["assistant"] =
            json!({"messageId": message, "text": exec.summary.clone().unwrap_or_default()});
    }
    Ok(trpc(data))
}

/// Body of the stream-ticket route.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamTicketRequest {
    /// The session to stream.
    pub cloud_agent_session_id: String,
    /// Its organization, when acting for one (the `X-KiloCode-OrganizationId` header works
    /// too).
    pub organization_id: Option<uuid::Uuid>,
}

/// `POST /api/cloud-agent-next/sessions/stream-ticket`: a single-use ticket (60 s) for the
/// session's `/stream`: `{ticket, expiresAt}` (ms since epoch).
///
/// Errors: 404 `session_not_found` (not the caller's, or not in the scope acted for).
#[utoipa::path(post, path = "/api/cloud-agent-next/sessions/stream-ticket", tag = "sessions",
    request_body = StreamTicketRequest,
    responses((status = 200, description = "`{ticket, expiresAt}`"), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn stream_ticket(
    State(s): State<AppState>,
    scope: OwnerScope,
    Json(body): Json<StreamTicketRequest>,
) -> Result<Json<Value>, ApiError> {
    let agents = agents(&s)?;
    let id = body.cloud_agent_session_id;
    let caller = match body.organization_id {
        Some(org) => acting_for(&s, &scope, Some(org)).await?,
        None => creator_scope(&s, caller(&scope), &id).await?,
    };
    agents.locate(caller, &id).await?;
    let (ticket, expires_at) = s
        .identity
        .issue_ticket(scope.auth.principal.user, &format!("session:{id}"))
        .await?;
    Ok(Json(json!({"ticket": ticket, "expiresAt": expires_at})))
}

/// Query of `/stream`.
#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// The session.
    pub cloud_agent_session_id: String,
    /// A ticket from the stream-ticket route (single use).
    pub ticket: Option<String>,
    /// Only these executions' events (comma-separated), as `send`'s `streamUrl` asks.
    pub execution_ids: Option<String>,
    /// The session's organization.
    pub organization_id: Option<uuid::Uuid>,
}

/// `GET /stream?cloudAgentSessionId=…&ticket=…`: the session's event stream
/// (`/api/sessions/{id}/stream`), one JSON text frame an event, each with its
/// `streamEventType`; the CLI prints each. The server closes it (1000) after the first frame
/// that ends an execution (`complete`, `interrupted`, a fatal `error`), so a failed task ends
/// the CLI's stream at once rather than at its 30 s idle timeout.
#[utoipa::path(get, path = "/stream", tag = "sessions", params(StreamQuery),
    responses((status = 101, description = "WebSocket of event frames"), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 426, body = ErrorBody)))]
pub async fn stream(
    State(s): State<AppState>,
    Query(q): Query<StreamQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let query = EventQuery {
        ticket: q.ticket,
        organization_id: q.organization_id,
        execution_ids: q.execution_ids,
        ..EventQuery::default()
    };
    open_stream(
        s,
        q.cloud_agent_session_id,
        query,
        upgrade,
        Ending::AtTerminal,
    )
    .await
}
