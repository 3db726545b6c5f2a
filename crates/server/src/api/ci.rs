//! KiCI routes (see `docs/ci.md`): agent tokens, the agent WebSocket `/api/ci/agent`, runs,
//! jobs and logs (paged, and live over `/api/ci/runs/{id}/logs/stream`), cancel and rerun.
//! Every route is owner-scoped: another owner's run answers 404.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kilocloud_ci::protocol::{
    CLOSE_HEARTBEAT_TIMEOUT, CLOSE_INVALID_MESSAGE, CLOSE_REGISTER_TIMEOUT, FromAgent,
    MAX_FRAME_BYTES,
};
use kilocloud_ci::sources::SourceSpec;
use kilocloud_ci::{AgentHandle, Ci, CiError};
use kilocloud_identity::Owner;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;

use super::ErrorBody;
use crate::auth::{Admin, Member, OwnerScope, RequireRole};
use crate::{ApiError, AppState, Json};

/// How long an agent may take to send `agent.register` (§10: 10 s).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Silence after which an agent's socket is closed with 4004 (§11: 180 s).
const SILENCE_LIMIT: Duration = Duration::from_secs(180);
/// How often a connection asks the pool for work it was not woken for (another node's
/// enqueue), and a log stream re-reads for changes made on other nodes.
const POLL: Duration = Duration::from_secs(1);

impl From<CiError> for ApiError {
    fn from(e: CiError) -> Self {
        let message = e.to_string();
        match e {
            CiError::Invalid(_) => ApiError::bad_request(message),
            CiError::NotFound(_) => ApiError::not_found(message),
            CiError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            CiError::Disabled(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "ci_disabled", message)
            }
            CiError::Unauthorized(_) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid_signature", message)
            }
            CiError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
            }
            CiError::Substrate(e) => e.into(),
        }
    }
}

fn ci(s: &AppState) -> Result<&Ci, ApiError> {
    s.ci.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ci_disabled",
            "KiCI is not enabled on this server",
        )
    })
}

/// Body of `POST /api/ci/agent-tokens`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateAgentToken {
    /// A name to tell tokens apart (1–100 characters).
    pub name: String,
}

/// `POST /api/ci/agent-tokens`: mints an agent token (`kat_<64 hex>`), shown once. Owner
/// administrators only.
#[utoipa::path(post, path = "/api/ci/agent-tokens", tag = "ci", request_body = CreateAgentToken,
    responses((status = 201, body = Object), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_agent_token(
    State(s): State<AppState>,
    role: RequireRole<Admin>,
    Json(body): Json<CreateAgentToken>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let created = ci(&s)?
        .create_agent_token(role.scope().owner(), &body.name)
        .await?;
    Ok((StatusCode::CREATED, Json(json!(created))))
}

/// `GET /api/ci/agents`: the owner's agents and the jobs waiting for one (with why).
#[utoipa::path(get, path = "/api/ci/agents", tag = "ci",
    responses((status = 200, body = Object), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn agents(State(s): State<AppState>, scope: OwnerScope) -> Result<Json<Value>, ApiError> {
    let (agents, queue) = ci(&s)?.pool(scope.owner()).await?;
    Ok(Json(json!({"agents": agents, "queue": queue})))
}

/// `POST /api/ci/sources`: registers a generic webhook source bound to a repository branch
/// (the owner's GitHub App installation reads its lock file). Replies `{source, secret}`;
/// the secret is shown once. Owner administrators only.
#[utoipa::path(post, path = "/api/ci/sources", tag = "ci", request_body = SourceSpec,
    responses((status = 201, body = Object), (status = 400, body = ErrorBody),
        (status = 404, description = "no installation on the repository's account", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_source(
    State(s): State<AppState>,
    role: RequireRole<Admin>,
    Json(spec): Json<SourceSpec>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let ci = ci(&s)?;
    let owner = role.scope().owner();
    let automation = s.automation.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "automation_disabled",
            "the GitHub App is not configured on this server",
        )
    })?;
    let (installation, _) = automation.token_for_repo(owner, &spec.repo).await?;
    let (source, secret) = ci.create_source(owner, installation, spec).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"source": source, "secret": secret})),
    ))
}

/// `GET /api/ci/sources`: the owner's generic webhook sources (without secrets).
#[utoipa::path(get, path = "/api/ci/sources", tag = "ci",
    responses((status = 200, body = Object), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn sources(
    State(s): State<AppState>,
    scope: OwnerScope,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"sources": ci(&s)?.sources(scope.owner()).await?}),
    ))
}

/// `POST /api/ci/webhooks/{id}`: a delivery to a generic source, authenticated by its
/// signature or key (no bearer credential). 202 with the runs started, 200 for a duplicate,
/// 401 for a bad signature (nothing stored), 404 for an unknown source, 413 over the
/// source's limit.
#[utoipa::path(post, path = "/api/ci/webhooks/{id}", tag = "ci",
    params(("id" = String, Path, description = "Source id"),
        ("x-signature-256" = Option<String>, Header, description = "sha256=<hex HMAC-SHA256 of the body> (hmac-sha256 sources)"),
        ("x-event-type" = Option<String>, Header), ("x-idempotency-key" = Option<String>, Header)),
    request_body(content = String, description = "Any body (JSON is parsed for triggers)"),
    responses((status = 202, body = Object), (status = 200, description = "duplicate", body = Object),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn generic_webhook(
    State(s): State<AppState>,
    Path(id): Path<String>,
    request: axum::extract::Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let ci = ci(&s)?.clone();
    let (parts, body) = request.into_parts();
    let body = crate::error::read_body(body, kilocloud_ci::sources::MAX_SOURCE_PAYLOAD).await?;
    let headers = parts.headers.clone();
    let header = move |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let outcome = crate::auth::limited_webhook(&parts, &s, async {
        Ok(ci.generic_webhook(&id, header, &body).await?)
    })
    .await?;
    let status = if outcome.duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(json!(outcome))))
}

/// Query of `GET /api/ci/runs`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct RunsQuery {
    /// At most this many (1–200, default 20).
    pub limit: Option<u32>,
    /// The `next` cursor of a previous page.
    pub after: Option<String>,
}

/// `GET /api/ci/runs`: the owner's runs, newest first (`{runs, next}`).
#[utoipa::path(get, path = "/api/ci/runs", tag = "ci", params(RunsQuery),
    responses((status = 200, body = Object), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn runs(
    State(s): State<AppState>,
    scope: OwnerScope,
    Query(q): Query<RunsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(20);
    let page = ci(&s)?
        .runs(scope.owner(), limit, q.after.as_deref().unwrap_or(""))
        .await?;
    let next = (page.len() as u32 == limit.clamp(1, 200))
        .then(|| page.last().map(|(c, _)| c.clone()))
        .flatten();
    let runs: Vec<Value> = page.into_iter().map(|(_, r)| run_json(&r)).collect();
    Ok(Json(json!({"runs": runs, "next": next})))
}

/// A run without its stored workflow (`workflowLock` is internal).
fn run_json(run: &kilocloud_ci::run::RunRecord) -> Value {
    let mut v = json!(run);
    if let Some(o) = v.as_object_mut() {
        o.remove("workflowLock");
    }
    v
}

/// `GET /api/ci/runs/{id}`: a run with its jobs and steps (`{run, jobs}`).
#[utoipa::path(get, path = "/api/ci/runs/{id}", tag = "ci",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn run(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (run, jobs) = ci(&s)?.run(scope.owner(), &id).await?;
    Ok(Json(json!({"run": run_json(&run), "jobs": jobs})))
}

/// Query of the log routes.
#[derive(Debug, Deserialize, IntoParams)]
pub struct LogsQuery {
    /// Chunks after this seq (exclusive); from the start without it.
    pub after: Option<u64>,
    /// At most this many chunks (1–1000, default 500).
    pub limit: Option<u32>,
}

/// `GET /api/ci/runs/{id}/jobs/{job}/logs`: a job's log chunks in order (`{chunks, done}`;
/// `done` once the job ended and every chunk was returned).
#[utoipa::path(get, path = "/api/ci/runs/{id}/jobs/{job}/logs", tag = "ci",
    params(("id" = String, Path, description = "Run id"), ("job" = String, Path, description = "Job id"), LogsQuery),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn job_logs(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path((id, job)): Path<(String, String)>,
    Query(q): Query<LogsQuery>,
) -> Result<Json<Value>, ApiError> {
    let ci = ci(&s)?;
    let (_, jobs) = ci.run(scope.owner(), &id).await?;
    let ended = jobs
        .iter()
        .find(|j| j.id == job)
        .is_some_and(|j| j.status.is_terminal());
    let limit = q.limit.unwrap_or(500);
    let chunks = ci.logs(scope.owner(), &id, &job, q.after, limit).await?;
    let done = ended && (chunks.len() as u32) < limit.clamp(1, 1000);
    Ok(Json(json!({"chunks": chunks, "done": done})))
}

/// `POST /api/ci/runs/{id}/cancel`: cancels a run (a second request forces). 409 for a run
/// that already ended.
#[utoipa::path(post, path = "/api/ci/runs/{id}/cancel", tag = "ci",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel(
    State(s): State<AppState>,
    role: RequireRole<Member>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let run = ci(&s)?
        .cancel(role.scope().owner(), &id, "cancelled by a user")
        .await?;
    Ok(Json(json!({"run": run_json(&run)})))
}

/// `POST /api/ci/runs/{id}/rerun`: runs the workflow again on the same commit as a new run.
#[utoipa::path(post, path = "/api/ci/runs/{id}/rerun", tag = "ci",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 201, body = Object), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rerun(
    State(s): State<AppState>,
    role: RequireRole<Member>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let run = ci(&s)?.rerun(role.scope().owner(), &id).await?;
    Ok((StatusCode::CREATED, Json(json!({"run": run_json(&run)}))))
}

/// `GET /api/ci/runs/{id}/logs/stream`: a WebSocket of a run's progress: every log chunk so
/// far and then as it arrives (`{"type": "log", "jobId", "chunk"}`), job status changes
/// (`{"type": "job", "id", "name", "status"}`), and finally `{"type": "run", "status"}`, after
/// which the server closes with 1000.
#[utoipa::path(get, path = "/api/ci/runs/{id}/logs/stream", tag = "ci",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 101, description = "WebSocket of log chunks and statuses"),
        (status = 404, body = ErrorBody), (status = 426, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn log_stream(
    State(s): State<AppState>,
    scope: OwnerScope,
    Path(id): Path<String>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ci = ci(&s)?.clone();
    let Ok(upgrade) = upgrade else {
        return Err(ApiError::websocket_required());
    };
    let owner = scope.owner();
    ci.run(owner, &id).await?;
    Ok(upgrade
        .on_upgrade(move |socket| follow(socket, ci, owner, id))
        .into_response())
}

async fn follow(mut socket: WebSocket, ci: Ci, owner: Owner, run_id: String) {
    let mut sent: std::collections::HashMap<String, (Option<u64>, Option<String>)> =
        std::collections::HashMap::new();
    loop {
        let Ok((run, jobs)) = ci.run(owner, &run_id).await else {
            return;
        };
        for job in &jobs {
            let entry = sent.entry(job.id.clone()).or_default();
            loop {
                let Ok(chunks) = ci.logs(owner, &run_id, &job.id, entry.0, 500).await else {
                    return;
                };
                if chunks.is_empty() {
                    break;
                }
                for chunk in chunks {
                    entry.0 = Some(chunk.seq);
                    let frame =
                        json!({"type": "log", "jobId": job.id, "job": job.name, "chunk": chunk});
                    if socket
                        .send(Message::Text(frame.to_string().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            let status = kilocloud_ci::run::status_name(job.status);
            if entry.1.as_deref() != Some(&status) {
                entry.1 = Some(status.clone());
                let frame = json!({"type": "job", "id": job.id, "name": job.name, "status": status,
                    "error": job.error});
                if socket
                    .send(Message::Text(frame.to_string().into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        if run.completed_at.is_some() {
            let frame =
                json!({"type": "run", "status": run.status, "failureReason": run.failure_reason});
            let _ = socket.send(Message::Text(frame.to_string().into())).await;
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code: 1000,
                    reason: "the run ended".into(),
                })))
                .await;
            return;
        }
        tokio::select! {
            _ = ci.changed(owner, &run_id, POLL) => {}
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// `GET /api/ci/agent`: the agent WebSocket (protocol in `kilocloud_ci::protocol`). The
/// agent token goes in `Authorization: Bearer kat_…`; an unknown token is 401 before the
/// upgrade, so an agent can tell a refused token from a network failure.
#[utoipa::path(get, path = "/api/ci/agent", tag = "ci",
    responses((status = 101, description = "WebSocket: agent.register first, then jobs"),
        (status = 401, body = ErrorBody), (status = 426, body = ErrorBody)))]
pub async fn agent_socket(
    State(s): State<AppState>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ci = ci(&s)?.clone();
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let Some(owner) = ci.authenticate_agent(token.trim()).await? else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_agent_token",
            "the agent token is missing, unknown or revoked",
        ));
    };
    let Ok(upgrade) = upgrade else {
        return Err(ApiError::websocket_required());
    };
    Ok(upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| serve_agent(socket, ci, owner))
        .into_response())
}

use super::close_socket as close;

async fn serve_agent(mut socket: WebSocket, ci: Ci, owner: Owner) {
    let first = match tokio::time::timeout(REGISTER_TIMEOUT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<FromAgent>(&text),
        Ok(_) => return,
        Err(_) => return close(&mut socket, CLOSE_REGISTER_TIMEOUT, "no agent.register").await,
    };
    let first = match first {
        Ok(f) => f,
        Err(e) => {
            return close(
                &mut socket,
                CLOSE_INVALID_MESSAGE,
                &format!("not a message: {e}"),
            )
            .await;
        }
    };
    let (handle, ack) = match ci.register(owner, first).await {
        Ok(ok) => ok,
        Err(e) => return close(&mut socket, CLOSE_INVALID_MESSAGE, &e.to_string()).await,
    };
    let ack = serde_json::to_string(&ack).expect("messages serialize");
    if socket.send(Message::Text(ack.into())).await.is_ok() {
        agent_loop(&mut socket, &ci, &handle).await;
    }
    if let Err(e) = ci.disconnect(&handle).await {
        tracing::warn!(error = %e, agent = %handle.agent_id, "cannot record an agent's disconnect");
    }
}

async fn agent_loop(socket: &mut WebSocket, ci: &Ci, handle: &AgentHandle) {
    let mut poll = tokio::time::interval(POLL);
    let mut last_frame = tokio::time::Instant::now();
    loop {
        tokio::select! {
            incoming = socket.recv() => {
                last_frame = tokio::time::Instant::now();
                let text = match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(_)) => continue,
                };
                let msg = match serde_json::from_str::<FromAgent>(&text) {
                    Ok(m) => m,
                    Err(e) => {
                        return close(socket, CLOSE_INVALID_MESSAGE, &format!("not a message: {e}")).await;
                    }
                };
                if let Err(e) = ci.agent_message(handle, msg).await {
                    tracing::warn!(error = %e, agent = %handle.agent_id, "agent message failed");
                    if matches!(e, CiError::Invalid(_)) {
                        return close(socket, CLOSE_INVALID_MESSAGE, &e.to_string()).await;
                    }
                }
            }
            _ = handle.woken() => {
                if !send_work(socket, ci, handle).await {
                    return;
                }
            }
            _ = poll.tick() => {
                if last_frame.elapsed() > SILENCE_LIMIT {
                    return close(socket, CLOSE_HEARTBEAT_TIMEOUT, "no frame for 180 s").await;
                }
                if !send_work(socket, ci, handle).await {
                    return;
                }
            }
        }
    }
}

async fn send_work(socket: &mut WebSocket, ci: &Ci, handle: &AgentHandle) -> bool {
    let work = match ci.take(handle).await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, agent = %handle.agent_id, "cannot take work");
            return true;
        }
    };
    for msg in work {
        let text = serde_json::to_string(&msg).expect("messages serialize");
        if socket.send(Message::Text(text.into())).await.is_err() {
            return false;
        }
    }
    true
}
