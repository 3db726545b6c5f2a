//! The session actor (`agent_session`, key `<userId>:<sessionId>`): metadata, executions and
//! their state machine, the ordered event log, the compacted history, and the reaper alarm.
//! Reference system §3 ("CloudAgentSession DO", "Session lifecycle", "Ingest and stream",
//! "Alarm (reaper)").
//!
//! Storage keys: `meta` ([`SessionMeta`]), `exec/<executionId>` ([`Execution`]), `active`
//! (the active execution id), `interrupt` (the execution asked to stop), `next_event` (u64),
//! `ev/<id, 16 digits>` ([`StoredEvent`]), `item/<itemId>` (history items, upserted: the
//! compaction of session ingest), `last_activity` (ms).

use std::collections::BTreeMap;

use kilocloud_identity::envelope::Envelope;
use kilocloud_substrate::{Actor, ActorContext, AlarmInfo, Substrate};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

/// The actor type.
pub const SESSION_ACTOR: &str = "agent_session";
/// The reaper runs this often, ms (reference `REAPER_INTERVAL_MS`).
pub const REAPER_INTERVAL_MS: i64 = 5 * 60_000;
/// A running execution without a heartbeat for this long fails, ms (`STALE_THRESHOLD_MS`).
pub const STALE_THRESHOLD_MS: i64 = 10 * 60_000;
/// A pending execution that has not started after this long fails, ms
/// (`PENDING_START_TIMEOUT_MS`).
pub const PENDING_START_TIMEOUT_MS: i64 = 5 * 60_000;
/// A session idle this long is deleted with its workspace, ms (90 days).
pub const IDLE_SESSION_MS: i64 = 90 * 24 * 3_600_000;
/// The queue that delivers callbacks.
pub const CALLBACK_QUEUE: &str = "agent-callbacks";

/// The agent's mode (reference modes; architect, ask and plan only read, the others write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Read and plan; no edits, no commands.
    Plan,
    /// Edit and run commands.
    #[default]
    Code,
    /// As `code`.
    Build,
    /// As `code`.
    Orchestrator,
    /// As `plan`.
    Architect,
    /// As `plan`.
    Ask,
}

impl Mode {
    /// Whether this mode may write files and run commands.
    pub fn writes(self) -> bool {
        matches!(self, Mode::Code | Mode::Build | Mode::Orchestrator)
    }

    /// The mode's name (the gateway's `x-kilocode-mode`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Plan => "plan",
            Mode::Code => "code",
            Mode::Build => "build",
            Mode::Orchestrator => "orchestrator",
            Mode::Architect => "architect",
            Mode::Ask => "ask",
        }
    }
}

/// Where a session's terminal transitions are reported; headers sealed at rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SealedCallback {
    /// POST target.
    pub url: String,
    /// The headers as a sealed JSON object (they often carry credentials).
    pub headers: Option<Envelope>,
}

/// A session's metadata, written once by prepare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionMeta {
    /// `agent_<uuid>`.
    pub session_id: String,
    /// The user who created it (part of the actor key).
    pub user_id: Uuid,
    /// The organization that owns it, if any.
    pub org_id: Option<Uuid>,
    /// The bot it acts as, if any.
    pub bot_id: Option<Uuid>,
    /// The clone URL, without credentials.
    pub repo: String,
    /// The git token, sealed.
    pub git_token: Option<Envelope>,
    /// The branch the agent works on.
    pub branch: String,
    /// Whether `branch` was given as an existing upstream branch.
    pub upstream_branch: bool,
    /// Environment variables of the agent's commands.
    pub env_vars: BTreeMap<String, String>,
    /// Secret environment variables, each sealed.
    pub secrets: BTreeMap<String, Envelope>,
    /// Commands run once at prepare.
    pub setup_commands: Vec<String>,
    /// Default mode of executions.
    pub mode: Mode,
    /// Default model of executions.
    pub model: String,
    /// The first prompt.
    pub prompt: String,
    /// Commit and push at completion.
    pub auto_commit: bool,
    /// Callback target.
    pub callback: Option<SealedCallback>,
    /// In-process subscriber to terminal transitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<CompletionNotice>,
    /// The sandbox the session runs in.
    pub sandbox_id: String,
    /// Workspace path inside the sandbox.
    pub workspace_path: String,
    /// Home path inside the sandbox.
    pub home_path: String,
    /// Prepare time, ms.
    pub prepared_at: i64,
    /// First execution's start, ms.
    pub initiated_at: Option<i64>,
    /// The branch the last completed execution reported.
    pub last_branch: Option<String>,
}

impl SessionMeta {
    /// The seal context of one of the session's secrets: `<owner>/agent/<sid>/<name>`.
    pub fn seal_context(owner: &str, session_id: &str, name: &str) -> String {
        format!("{owner}/agent/{session_id}/{name}")
    }

    /// The owner string of the session (`org:<id>` or `user:<id>`).
    pub fn owner(&self) -> String {
        match self.org_id {
            Some(org) => format!("org:{org}"),
            None => format!("user:{}", self.user_id),
        }
    }
}

/// An execution's status. `pending → running | failed | interrupted`, `running → completed |
/// failed | interrupted`; the terminal states have no outgoing edges (reference §3, plus
/// `pending → interrupted` so an interrupt while the sandbox starts ends it at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExecStatus {
    /// Accepted; the sandbox and harness are starting.
    Pending,
    /// The agent is working.
    Running,
    /// Finished normally.
    Completed,
    /// Failed (harness error, sandbox failure, no heartbeat, never started).
    Failed,
    /// Stopped by an interrupt.
    Interrupted,
}

impl ExecStatus {
    /// Whether no transition leaves this status.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            ExecStatus::Completed | ExecStatus::Failed | ExecStatus::Interrupted
        )
    }

    /// Whether the state machine allows `self → to`.
    pub fn allows(self, to: ExecStatus) -> bool {
        use ExecStatus::*;
        matches!(
            (self, to),
            (Pending, Running | Failed | Interrupted) | (Running, Completed | Failed | Interrupted)
        )
    }
}

/// One execution (one prompt run to its end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Execution {
    /// `exec_<uuid>`.
    pub execution_id: String,
    /// Status.
    pub status: ExecStatus,
    /// Whether it is the session's first (initiate) or a follow-up.
    pub followup: bool,
    /// The prompt.
    pub prompt: String,
    /// Mode.
    pub mode: Mode,
    /// Model id.
    pub model: String,
    /// Commit and push at completion.
    pub auto_commit: bool,
    /// Creation, ms.
    pub created_at: i64,
    /// `running` since, ms.
    pub started_at: Option<i64>,
    /// Terminal since, ms.
    pub completed_at: Option<i64>,
    /// Last sign of life, ms.
    pub last_heartbeat: Option<i64>,
    /// Why it failed or was interrupted.
    pub error: Option<String>,
    /// The harness's exit code, when completed.
    pub exit_code: Option<i32>,
    /// The agent's final summary, when completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

/// An event as stored under `ev/<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Execution id.
    pub e: String,
    /// Event type.
    pub t: String,
    /// Time, ms.
    pub ts: i64,
    /// Payload.
    pub d: Value,
}

/// An event appended by a harness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// `started`, `output`, `agent`, `status`, `heartbeat`, `error`, `interrupted`,
    /// `complete`.
    pub kind: String,
    /// Payload.
    pub data: Value,
}

impl NewEvent {
    /// An event of `kind` with `data`.
    pub fn new(kind: &str, data: Value) -> Self {
        Self {
            kind: kind.to_owned(),
            data,
        }
    }
}

/// The storage key of event `id`.
pub fn event_key(id: u64) -> String {
    format!("ev/{id:016}")
}

/// The event id of a storage key made by [`event_key`].
pub fn event_id(key: &str) -> Option<u64> {
    key.strip_prefix("ev/")?.parse().ok()
}

/// A message for the callback queue: the target and the payload, headers still sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallbackJob {
    /// The target.
    pub target: SealedCallback,
    /// Context the headers were sealed with.
    pub seal_context: String,
    /// What is POSTed.
    pub payload: CallbackPayload,
}

/// The body POSTed to a callback target (reference §3 "Callback queue").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallbackPayload {
    /// Session id.
    pub session_id: String,
    /// Execution id.
    pub execution_id: String,
    /// `completed`, `failed` or `interrupted`.
    pub status: ExecStatus,
    /// Why it failed or was interrupted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// The branch the agent left its work on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen_branch: Option<String>,
    /// The agent's final summary (its last message), when completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

/// Most bytes of the summary carried by a callback or completion notice (queue messages are
/// at most 128 KiB); a longer summary is cut on a character boundary.
pub const MAX_NOTIFIED_SUMMARY_BYTES: usize = 64 * 1024;

fn capped_summary(summary: &str) -> String {
    let mut end = summary.len().min(MAX_NOTIFIED_SUMMARY_BYTES);
    while !summary.is_char_boundary(end) {
        end -= 1;
    }
    summary[..end].to_owned()
}

/// An in-process subscriber to a session's terminal transitions: the [`CompletionMessage`]
/// is sent to `queue` in the same actor call as the transition (at least once), so services
/// built on sessions (triggers, reviews) learn of the end without an HTTP round trip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionNotice {
    /// A declared queue.
    pub queue: String,
    /// Opaque to the session; given back in the message.
    pub context: Value,
}

/// What a [`CompletionNotice`] sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionMessage {
    /// The notice's context.
    pub context: Value,
    /// The transition, as a callback would get it.
    pub payload: CallbackPayload,
}

/// Calls of the session actor.
#[derive(Debug)]
pub enum SessionCall {
    /// Stores the metadata of a new session and arms the reaper.
    Prepare(Box<SessionMeta>),
    /// Adds a pending execution and makes it active.
    Start(Box<Execution>),
    /// Appends a harness's events and history items, applying the state machine
    /// (`started` → running, `complete` → completed, `interrupted` → interrupted, fatal
    /// `error` → failed).
    Ingest {
        /// The execution the events belong to.
        execution_id: String,
        /// Events, in order.
        events: Vec<NewEvent>,
        /// History items to upsert (`item id`, value).
        items: Vec<(String, Value)>,
    },
    /// Asks the active execution to stop.
    Interrupt,
    /// Deletes everything.
    Delete,
}

/// Refusals of the session actor (nothing was written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No such session.
    #[error("session not found")]
    NotFound,
    /// Prepare of a session that exists.
    #[error("session already prepared")]
    AlreadyPrepared,
    /// Initiate of a session already initiated.
    #[error("session already initiated; send a follow-up message instead")]
    AlreadyInitiated,
    /// Follow-up before initiate.
    #[error("session not initiated yet; initiate it first")]
    NotInitiated,
    /// Another execution is active.
    #[error("an execution is in progress: {0}")]
    InProgress(String),
    /// Events for an execution that is unknown or already over.
    #[error("execution {0} is not pending or running")]
    NotActive(String),
    /// Interrupt with nothing running.
    #[error("no execution is in progress")]
    Idle,
}

/// Replies of the session actor.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionReply {
    /// Prepare, Start: done.
    Done,
    /// Ingest: the ids given to the events, and the status after them.
    Ingested {
        /// Event ids, in order.
        ids: Vec<u64>,
        /// The execution's status after the events.
        status: ExecStatus,
    },
    /// Interrupt: the execution asked to stop.
    Interrupting(String),
    /// Delete: the metadata that was deleted (for removing the workspace).
    Deleted(Option<Box<SessionMeta>>),
}

/// What the reaper does with a session's sandbox directories.
#[async_trait::async_trait]
pub trait WorkspaceJanitor: Send + Sync + 'static {
    /// Removes the workspace and home of a session deleted for idleness.
    async fn remove_workspace(&self, meta: &SessionMeta);
}

/// The session actor.
pub struct SessionActor {
    /// For enqueueing callbacks.
    pub substrate: Substrate,
    /// Removes workspaces of idle sessions.
    pub janitor: std::sync::Arc<dyn WorkspaceJanitor>,
}

type Reply = std::result::Result<SessionReply, Refusal>;

impl Actor for SessionActor {
    const TYPE: &'static str = SESSION_ACTOR;
    type Call = SessionCall;
    type Reply = Reply;

    async fn call(
        &self,
        ctx: &mut ActorContext,
        call: SessionCall,
    ) -> kilocloud_substrate::Result<Reply> {
        let now = ctx.now_ms();
        if !matches!(call, SessionCall::Prepare(_)) && ctx.get::<Value>("meta").await?.is_none() {
            return Ok(Err(Refusal::NotFound));
        }
        let reply = match call {
            SessionCall::Prepare(meta) => {
                if ctx.get::<Value>("meta").await?.is_some() {
                    return Ok(Err(Refusal::AlreadyPrepared));
                }
                ctx.put("meta", &meta)?;
                ctx.put("next_event", &1u64)?;
                ctx.put("last_activity", &now)?;
                ctx.set_alarm(now + REAPER_INTERVAL_MS);
                SessionReply::Done
            }
            SessionCall::Start(exec) => {
                if let Some(active) = ctx.get::<String>("active").await? {
                    return Ok(Err(Refusal::InProgress(active)));
                }
                let mut meta: SessionMeta = ctx.get("meta").await?.expect("checked above");
                match (exec.followup, meta.initiated_at) {
                    (false, Some(_)) => return Ok(Err(Refusal::AlreadyInitiated)),
                    (true, None) => return Ok(Err(Refusal::NotInitiated)),
                    (false, None) => {
                        meta.initiated_at = Some(now);
                        ctx.put("meta", &meta)?;
                    }
                    (true, Some(_)) => {}
                }
                ctx.put("active", &exec.execution_id)?;
                ctx.put(&format!("exec/{}", exec.execution_id), &exec)?;
                ctx.put("last_activity", &now)?;
                if ctx.alarm().await?.is_none() {
                    ctx.set_alarm(now + REAPER_INTERVAL_MS);
                }
                SessionReply::Done
            }
            SessionCall::Ingest {
                execution_id,
                events,
                items,
            } => return self.ingest(ctx, now, &execution_id, events, items).await,
            SessionCall::Interrupt => {
                let Some(active) = ctx.get::<String>("active").await? else {
                    return Ok(Err(Refusal::Idle));
                };
                ctx.put("interrupt", &active)?;
                SessionReply::Interrupting(active)
            }
            SessionCall::Delete => {
                let meta: Option<SessionMeta> = ctx.get("meta").await?;
                ctx.delete_all();
                SessionReply::Deleted(meta.map(Box::new))
            }
        };
        Ok(Ok(reply))
    }

    async fn alarm(
        &self,
        ctx: &mut ActorContext,
        _alarm: AlarmInfo,
    ) -> kilocloud_substrate::Result<()> {
        let now = ctx.now_ms();
        let Some(meta) = ctx.get::<SessionMeta>("meta").await? else {
            return Ok(());
        };
        let last_activity: i64 = ctx.get("last_activity").await?.unwrap_or(meta.prepared_at);
        let active: Option<String> = ctx.get("active").await?;
        if now - last_activity >= IDLE_SESSION_MS && active.is_none() {
            tracing::info!(session = %meta.session_id, "deleting a session idle for 90 days");
            self.janitor.remove_workspace(&meta).await;
            ctx.delete_all();
            return Ok(());
        }
        if let Some(active) = active {
            match ctx.get::<Execution>(&format!("exec/{active}")).await? {
                None => {
                    tracing::warn!(session = %meta.session_id, %active, "clearing an orphaned active execution id");
                    ctx.delete("active");
                    ctx.delete("interrupt");
                }
                Some(exec) => {
                    let verdict = match exec.status {
                        ExecStatus::Running => {
                            let seen = exec
                                .last_heartbeat
                                .or(exec.started_at)
                                .unwrap_or(exec.created_at);
                            (now - seen >= STALE_THRESHOLD_MS).then_some("no heartbeat")
                        }
                        ExecStatus::Pending => (now - exec.created_at >= PENDING_START_TIMEOUT_MS)
                            .then_some("the sandbox never started the execution"),
                        _ => {
                            // Terminal but still marked active: an orphan.
                            ctx.delete("active");
                            None
                        }
                    };
                    if let Some(reason) = verdict {
                        let error = NewEvent::new(
                            "error",
                            serde_json::json!({"error": reason, "fatal": true}),
                        );
                        self.apply(ctx, now, &meta, exec, vec![error], Vec::new())
                            .await?;
                    }
                }
            }
        }
        ctx.set_alarm(now + REAPER_INTERVAL_MS);
        Ok(())
    }
}

impl SessionActor {
    async fn ingest(
        &self,
        ctx: &mut ActorContext,
        now: i64,
        execution_id: &str,
        events: Vec<NewEvent>,
        items: Vec<(String, Value)>,
    ) -> kilocloud_substrate::Result<Reply> {
        let Some(exec) = ctx
            .get::<Execution>(&format!("exec/{execution_id}"))
            .await?
        else {
            return Ok(Err(Refusal::NotActive(execution_id.to_owned())));
        };
        if exec.status.is_terminal() {
            return Ok(Err(Refusal::NotActive(execution_id.to_owned())));
        }
        let meta: SessionMeta = ctx.get("meta").await?.expect("checked by the caller");
        let (ids, status) = self.apply(ctx, now, &meta, exec, events, items).await?;
        Ok(Ok(SessionReply::Ingested { ids, status }))
    }

    /// Appends `events` for `exec` and applies the transitions they carry; on a terminal
    /// transition clears the active id and the interrupt request and enqueues the callback.
    async fn apply(
        &self,
        ctx: &mut ActorContext,
        now: i64,
        meta: &SessionMeta,
        mut exec: Execution,
        events: Vec<NewEvent>,
        items: Vec<(String, Value)>,
    ) -> kilocloud_substrate::Result<(Vec<u64>, ExecStatus)> {
        let mut next: u64 = ctx.get("next_event").await?.unwrap_or(1);
        let mut ids = Vec::with_capacity(events.len());
        let mut branch = None;
        for event in events {
            if exec.status.is_terminal() {
                break;
            }
            let to = match event.kind.as_str() {
                "started" => Some(ExecStatus::Running),
                "complete" => {
                    branch = event.data["currentBranch"].as_str().map(str::to_owned);
                    exec.exit_code = event.data["exitCode"].as_i64().map(|c| c as i32);
                    exec.summary = event.data["summary"].as_str().map(str::to_owned);
                    Some(ExecStatus::Completed)
                }
                "interrupted" => {
                    exec.error = Some(
                        event.data["reason"]
                            .as_str()
                            .unwrap_or("User interrupted")
                            .to_owned(),
                    );
                    Some(ExecStatus::Interrupted)
                }
                "error" if event.data["fatal"].as_bool() == Some(true) => {
                    exec.error = Some(event.data["error"].as_str().unwrap_or("failed").to_owned());
                    Some(ExecStatus::Failed)
                }
                _ => None,
            };
            if let Some(to) = to
                && exec.status.allows(to)
            {
                exec.status = to;
                if to == ExecStatus::Running {
                    exec.started_at = Some(now);
                }
                if to.is_terminal() {
                    exec.completed_at = Some(now);
                }
            }
            exec.last_heartbeat = Some(now);
            let stored = StoredEvent {
                e: exec.execution_id.clone(),
                t: event.kind,
                ts: now,
                d: event.data,
            };
            ctx.put(&event_key(next), &stored)?;
            ids.push(next);
            next += 1;
        }
        for (id, value) in items {
            ctx.put(&format!("item/{id}"), &value)?;
        }
        ctx.put("next_event", &next)?;
        ctx.put("last_activity", &now)?;
        ctx.put(&format!("exec/{}", exec.execution_id), &exec)?;
        if exec.status.is_terminal() {
            if ctx.get::<String>("active").await?.as_deref() == Some(exec.execution_id.as_str()) {
                ctx.delete("active");
            }
            ctx.delete("interrupt");
            let mut meta = meta.clone();
            if exec.status == ExecStatus::Completed && branch.is_some() {
                meta.last_branch = branch;
                ctx.put("meta", &meta)?;
            }
            let payload = CallbackPayload {
                session_id: meta.session_id.clone(),
                execution_id: exec.execution_id.clone(),
                status: exec.status,
                error_message: exec.error.clone(),
                last_seen_branch: meta.last_branch.clone(),
                summary: exec.summary.as_deref().map(capped_summary),
            };
            // Both are sent before this call commits: if the commit then fails, the transition
            // is retried and they are sent again (receivers get at-least-once anyway); sent
            // after, a crash in between would lose them.
            if let Some(notice) = &meta.notify {
                let message = CompletionMessage {
                    context: notice.context.clone(),
                    payload: payload.clone(),
                };
                self.substrate
                    .queues()
                    .send(&notice.queue, &message, 0)
                    .await?;
            }
            if let Some(target) = &meta.callback {
                let job = CallbackJob {
                    target: target.clone(),
                    seal_context: SessionMeta::seal_context(
                        &meta.owner(),
                        &meta.session_id,
                        "callbackHeaders",
                    ),
                    payload,
                };
                self.substrate
                    .queues()
                    .send(CALLBACK_QUEUE, &job, 0)
                    .await?;
            }
        }
        Ok((ids, exec.status))
    }
}

#[cfg(test)]
mod tests {
    use super::ExecStatus::*;

    #[test]
    fn notified_summaries_fit_a_queue_message() {
        let long = "é".repeat(super::MAX_NOTIFIED_SUMMARY_BYTES);
        let capped = super::capped_summary(&long);
        assert!(capped.len() <= super::MAX_NOTIFIED_SUMMARY_BYTES);
        assert!(capped.len() > super::MAX_NOTIFIED_SUMMARY_BYTES - 2);
        assert_eq!(super::capped_summary("short"), "short");
    }

    #[test]
    fn the_state_machine_has_no_exits_from_terminal_states() {
        let all = [Pending, Running, Completed, Failed, Interrupted];
        for from in all {
            for to in all {
                let allowed = from.allows(to);
                if from.is_terminal() {
                    assert!(!allowed, "{from:?} -> {to:?}");
                }
            }
        }
        assert!(Pending.allows(Running) && Pending.allows(Failed));
        assert!(Running.allows(Completed) && Running.allows(Failed) && Running.allows(Interrupted));
        assert!(!Pending.allows(Completed) && !Running.allows(Pending));
    }
}
