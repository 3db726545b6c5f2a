//! Running one execution: prepare the sandbox (cloning again on a cold start), start the
//! harness with a gateway credential of the session's owner, send heartbeats, honour
//! interrupts, commit and push at the end when asked, and record the terminal event. The
//! reference splits this between the worker's orchestrator and the in-sandbox wrapper; here it
//! is one task on the node that accepted the execution.

use std::time::Duration;

use kilocloud_identity::model::Initiator;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::Agents;
use crate::harness::{GatewayAccess, HarnessError, HarnessKind, Outcome, Turn};
use crate::mask::SecretMask;
use crate::session::{Execution, NewEvent, Refusal, SessionCall, SessionMeta, SessionReply};

/// Why events could not be recorded: the harness must stop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stopped {
    /// The execution ended meanwhile (the reaper failed it, or the session was deleted).
    #[error("the execution is no longer active")]
    NotActive,
    /// Storage failed.
    #[error("cannot record events: {0}")]
    Storage(String),
}

/// Appends one execution's events to its session, with the session's secret values masked.
pub struct Emitter {
    pub(crate) agents: Agents,
    pub(crate) key: String,
    pub(crate) execution_id: String,
    pub(crate) mask: SecretMask,
}

impl Emitter {
    /// The session's secret values, for masking text before it is cut or sent to the model.
    pub fn mask(&self) -> &SecretMask {
        &self.mask
    }

    /// Records one event. Errors: [`Stopped`] when the execution is over or storage fails.
    pub async fn emit(&self, kind: &str, data: Value) -> Result<(), Stopped> {
        self.record(vec![NewEvent::new(kind, data)], Vec::new())
            .await
            .map(drop)
    }

    /// Records events and history items in one call, secret values masked in both; returns
    /// the status after them.
    pub async fn record(
        &self,
        mut events: Vec<NewEvent>,
        mut items: Vec<(String, Value)>,
    ) -> Result<crate::session::ExecStatus, Stopped> {
        for event in &mut events {
            self.mask.value(&mut event.data);
        }
        for (_, item) in &mut items {
            self.mask.value(item);
        }
        let call = SessionCall::Ingest {
            execution_id: self.execution_id.clone(),
            events,
            items,
        };
        match self.agents.call(&self.key, call).await {
            Ok(Ok(SessionReply::Ingested { status, .. })) => {
                self.agents.inner.events_written.send_modify(|n| *n += 1);
                Ok(status)
            }
            Ok(Err(Refusal::NotActive(_) | Refusal::NotFound)) => Err(Stopped::NotActive),
            Ok(Ok(other)) => Err(Stopped::Storage(format!("unexpected reply {other:?}"))),
            Ok(Err(other)) => Err(Stopped::Storage(other.to_string())),
            Err(e) => Err(Stopped::Storage(e.to_string())),
        }
    }
}

/// Runs `exec` of the session `meta` to its end, releasing its `slots` just before the
/// terminal event. Never returns an error: every failure becomes the execution's fatal
/// `error` event.
pub(crate) async fn run(
    agents: Agents,
    meta: SessionMeta,
    exec: Execution,
    cancel: CancellationToken,
    slots: crate::service::Slots,
) {
    let key = crate::ids::actor_key(meta.user_id, &meta.session_id);
    let emitter = Emitter {
        agents: agents.clone(),
        key: key.clone(),
        execution_id: exec.execution_id.clone(),
        mask: agents.secret_mask(&meta),
    };
    let watchdog = tokio::spawn(watch(
        agents.clone(),
        key,
        exec.execution_id.clone(),
        cancel.clone(),
    ));
    let outcome = execute(&agents, &meta, &exec, &emitter, &cancel).await;
    let last = match outcome {
        Ok(Outcome::Finished { summary, exit_code }) => {
            match finish(&agents, &meta, &exec, &emitter).await {
                Ok(branch) => NewEvent::new(
                    "complete",
                    json!({"exitCode": exit_code, "currentBranch": branch, "summary": summary}),
                ),
                Err(e) => NewEvent::new("error", json!({"error": e.0, "fatal": true})),
            }
        }
        Ok(Outcome::Interrupted) => {
            let reason = if agents.inner.shutting_down.is_cancelled() {
                "the server is shutting down"
            } else {
                "User interrupted"
            };
            NewEvent::new("interrupted", json!({"reason": reason}))
        }
        Err(e) => NewEvent::new("error", json!({"error": e.0, "fatal": true})),
    };
    // The work is over: free the execution's slots before its end is visible.
    slots.release(&agents).await;
    if let Err(e) = emitter.record(vec![last], Vec::new()).await
        && e != Stopped::NotActive
    {
        tracing::error!(execution = %exec.execution_id, error = %e, "cannot record the end of an execution; the reaper will fail it");
    }
    watchdog.abort();
}

/// Heartbeats every `heartbeat_interval_ms`, and cancels the execution when its interrupt is
/// requested (possibly through another node) or the server shuts down.
async fn watch(agents: Agents, key: String, execution_id: String, cancel: CancellationToken) {
    let heartbeat = Duration::from_millis(agents.inner.config.heartbeat_interval_ms);
    let mut last_beat = tokio::time::Instant::now();
    let emitter = Emitter {
        agents: agents.clone(),
        key: key.clone(),
        execution_id: execution_id.clone(),
        mask: SecretMask::default(),
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = agents.inner.shutting_down.cancelled() => { cancel.cancel(); return; }
        }
        let asked = agents
            .inner
            .sub
            .actor_read::<String>(crate::session::SESSION_ACTOR, &key, "interrupt")
            .await;
        if asked.ok().flatten().as_deref() == Some(execution_id.as_str()) {
            cancel.cancel();
            return;
        }
        if last_beat.elapsed() >= heartbeat {
            last_beat = tokio::time::Instant::now();
            if emitter.emit("heartbeat", json!({})).await == Err(Stopped::NotActive) {
                cancel.cancel();
                return;
            }
        }
    }
}

async fn execute(
    agents: &Agents,
    meta: &SessionMeta,
    exec: &Execution,
    emitter: &Emitter,
    cancel: &CancellationToken,
) -> Result<Outcome, HarnessError> {
    let inner = &agents.inner;
    let mount = inner
        .sandbox
        .prepare(&meta.sandbox_id, &meta.workspace_path, &meta.home_path)
        .await
        .map_err(|e| HarnessError(format!("cannot prepare the sandbox: {e}")))?;
    if !mount.host_workspace.join(".git").exists() {
        // A cold start: this node has no copy of the workspace (another node prepared it, or
        // it was cleaned up). Clone again, on the pushed branch if it exists.
        emitter
            .emit(
                "status",
                json!({"message": "cold start: cloning the repository again"}),
            )
            .await?;
        let token = agents.open_secret(meta, "gitToken", meta.git_token.as_ref())?;
        let git = &inner.config.git;
        let existing = git
            .clone(
                &meta.repo,
                token.as_deref(),
                &mount.host_workspace,
                &meta.branch,
                true,
            )
            .await;
        if existing.is_err() {
            crate::service::empty_dir(&mount.host_workspace)
                .await
                .map_err(|e| HarnessError(format!("cannot reset the workspace: {e}")))?;
            git.clone(
                &meta.repo,
                token.as_deref(),
                &mount.host_workspace,
                &meta.branch,
                false,
            )
            .await
            .map_err(|e| HarnessError(format!("cannot clone the repository again: {e}")))?;
        }
        inner
            .sandbox
            .adopt_host_writes(&mount)
            .await
            .map_err(|e| HarnessError(format!("cannot hand the workspace over: {e}")))?;
    }
    emitter
        .emit(
            "started",
            json!({"executionId": exec.execution_id, "mode": exec.mode, "model": exec.model,
                   "branch": meta.branch, "followup": exec.followup}),
        )
        .await?;
    let (token, _) = inner
        .identity
        .issue_jwt(
            meta.user_id,
            meta.org_id,
            meta.bot_id,
            inner.config.credential_ttl_s,
            &Initiator {
                user: meta.user_id,
                request_id: None,
            },
        )
        .await
        .map_err(|e| HarnessError(format!("cannot issue a gateway credential: {e}")))?;
    let host_url = format!(
        "{}/api/gateway/v1",
        agents.gateway_url().trim_end_matches('/')
    );
    let gateway = match inner.config.harness.kind {
        // The built-in agent runs in the server and calls the gateway directly.
        HarnessKind::Builtin => GatewayAccess {
            base_url: host_url,
            token: token.clone().into(),
            org: meta.org_id,
            forward: None,
        },
        // The external CLIs run in the sandbox: only the gateway is forwarded in.
        HarnessKind::External | HarnessKind::Kilo => {
            let url = url::Url::parse(&host_url)
                .map_err(|e| HarnessError(format!("agent.gateway_url is not a URL: {e}")))?;
            let addr = tokio::net::lookup_host((
                url.host_str().unwrap_or("127.0.0.1"),
                url.port_or_known_default().unwrap_or(80),
            ))
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| HarnessError(format!("cannot resolve the gateway at {host_url}")))?;
            GatewayAccess {
                base_url: inner.sandbox.forwarded_url(&url).to_string(),
                token: token.clone().into(),
                org: meta.org_id,
                forward: Some(addr),
            }
        }
    };
    let env = agents.session_env(meta)?;
    let history: Vec<Value> = inner
        .sub
        .actor_scan::<Value>(
            crate::session::SESSION_ACTOR,
            &emitter.key,
            "item/message/",
            "",
            u32::MAX,
        )
        .await
        .map_err(|e| HarnessError(format!("cannot read the session history: {e}")))?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let seen = history.len();
    let turn = Turn {
        sandbox: inner.sandbox.as_ref(),
        mount: &mount,
        env: &env,
        cancel,
        emit: emitter,
        config: &inner.config.harness,
        gateway: &gateway,
        session_id: &meta.session_id,
        mode: exec.mode,
        model: &exec.model,
        prompt: &exec.prompt,
        history,
        http: &inner.http,
    };
    let (outcome, added) = match inner.config.harness.kind {
        HarnessKind::Builtin => crate::harness::run_builtin(turn).await,
        HarnessKind::External => crate::harness::run_external(turn).await,
        HarnessKind::Kilo => crate::harness::run_kilo(turn).await,
    };
    let items: Vec<(String, Value)> = added
        .into_iter()
        .enumerate()
        .map(|(i, m)| (format!("message/{:08}", seen + i), m))
        .collect();
    if !items.is_empty() {
        emitter.record(Vec::new(), items).await?;
    }
    outcome
}

/// After the agent finished: commit and push when asked. Returns the branch the work is on.
async fn finish(
    agents: &Agents,
    meta: &SessionMeta,
    exec: &Execution,
    emitter: &Emitter,
) -> Result<Option<String>, HarnessError> {
    let inner = &agents.inner;
    let git = &inner.config.git;
    let dir = inner
        .sandbox
        .prepare(&meta.sandbox_id, &meta.workspace_path, &meta.home_path)
        .await
        .map_err(|e| HarnessError(format!("cannot reach the workspace: {e}")))?
        .host_workspace;
    let branch = git.current_branch(&dir).await;
    if !exec.auto_commit {
        return Ok(branch);
    }
    let Some(branch) = branch else {
        emitter
            .emit(
                "status",
                json!({"message": "auto-commit skipped: detached HEAD"}),
            )
            .await?;
        return Ok(None);
    };
    if branch == "main" || branch == "master" {
        emitter
            .emit(
                "status",
                json!({"message": format!("auto-commit skipped: never pushes to {branch}")}),
            )
            .await?;
        return Ok(Some(branch));
    }
    let first_line = exec.prompt.lines().next().unwrap_or_default();
    let subject: String = first_line.chars().take(72).collect();
    let message = format!("{subject}\n\nKilo Cloud Agent session {}", meta.session_id);
    let outcome = git
        .commit_all(&dir, &message)
        .await
        .map_err(|e| HarnessError(format!("auto-commit failed: {e}")))?;
    if !outcome.left_out.is_empty() {
        emitter
            .emit(
                "status",
                json!({"message": format!(
                    "auto-commit left out {} file(s) matching agent.git.never_commit: {}",
                    outcome.left_out.len(),
                    outcome.left_out.join(", ")
                ), "leftOut": outcome.left_out}),
            )
            .await?;
    }
    if !outcome.committed {
        emitter
            .emit(
                "status",
                json!({"message": "auto-commit skipped: no changes"}),
            )
            .await?;
        return Ok(Some(branch));
    }
    emitter
        .emit(
            "status",
            json!({"message": format!("committed; pushing {branch}")}),
        )
        .await?;
    let token = agents.open_secret(meta, "gitToken", meta.git_token.as_ref())?;
    git.push(&dir, &meta.repo, token.as_deref(), &branch)
        .await
        .map_err(|e| HarnessError(format!("auto-commit push failed: {e}")))?;
    emitter
        .emit("status", json!({"message": format!("pushed {branch}")}))
        .await?;
    Ok(Some(branch))
}
