//! The KiCI agent, `kilocloud ci agent` (reference `kici.md` §10): dials the orchestrator's
//! WebSocket (`/api/ci/agent`, the agent token as a bearer header), registers its id, labels
//! and concurrency, and runs the jobs it is sent, each in its own bubblewrap sandbox: the
//! repository is cloned on the host with the dispatch's token in an HTTP header (never in a
//! URL or on argv) and checked out at the commit; each step runs as
//! `bash --noprofile --norc -e -o pipefail` inside; its output goes to a file the agent
//! tails, streamed as `log.chunk` batches of at most 50 lines or 100 ms, at most
//! `maxLogSizeBytes` per step (then one truncation line).
//!
//! Reports queue in one outbox that survives reconnects (at most 5,000 messages, the oldest
//! dropped first and counted in a warning): a job keeps running while the socket
//! is down and its end is reported when the agent is back, within the orchestrator's
//! recovery window. Reconnects back off `min(1 s × 1.5^n × (1 + U[0, 0.5]), 60 s)`; a
//! refused token stops the agent. `/health`, `/ready` (503 while disconnected) and
//! `/metrics` are served on `health_listen`.
//!
//! Shutdown: `shutdown` waits up to `shutdown_grace` (10 s) for running jobs, then cancels
//! them; `drain` (SIGUSR1) refuses new jobs (`job.reject draining`), waits until idle, and
//! returns.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use kilocloud_agent::git::GitConfig;
use kilocloud_agent::sandbox::{ExecRequest, SandboxConfig, SandboxProvider, SessionMount};
use kilocloud_kici::lock::{LockStep, LockStepEntry};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};
use tokio_util::sync::CancellationToken;

use crate::protocol::{
    FromAgent, JobRef, JobSpec, MAX_FRAME_BYTES, PROTOCOL_VERSION, ReportedJobState, StepState,
    ToAgent,
};

/// Reports kept while disconnected (`EventBuffer`, 5,000).
pub const OUTBOX_CAPACITY: usize = 5_000;
/// Lines per `log.chunk` (flush at 50 lines or 100 ms).
pub const LOG_BATCH_LINES: usize = 50;
/// Default step time limit (`KICI_DEFAULT_STEP_TIMEOUT_MS`, 30 min).
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Connection heartbeat interval (30 s).
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// Job heartbeat interval (`KICI_JOB_HEARTBEAT_INTERVAL_MS`, 60 s).
pub const JOB_HEARTBEAT: Duration = Duration::from_secs(60);
/// How long registration may take before the agent reconnects.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of one agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The orchestrator's base URL (`http://host:port`); the agent dials `/api/ci/agent`.
    pub server: url::Url,
    /// The agent token (`kat_…`).
    pub token: String,
    /// Stable across restarts (jobs are reclaimed by it).
    pub agent_id: String,
    /// User labels (not `kici:`); [`system_labels`] are added.
    pub labels: Vec<String>,
    /// Jobs at once (default 1).
    pub max_concurrency: u32,
    /// Where sandboxes live.
    pub work_dir: PathBuf,
    /// `/health`, `/ready` and `/metrics`; `None`: not served.
    pub health_listen: Option<SocketAddr>,
    /// The sandbox provider and limits.
    pub sandbox: SandboxConfig,
    /// Clone settings.
    pub git: GitConfig,
    /// How long shutdown waits for running jobs (10 s).
    pub shutdown_grace: Duration,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The orchestrator refused the token: reconnecting cannot help.
    #[error("the orchestrator refused the agent token: {0}")]
    Unauthorized(String),
    /// Bad settings.
    #[error("{0}")]
    Config(String),
    /// The sandbox provider cannot run here.
    #[error(transparent)]
    Sandbox(#[from] kilocloud_agent::sandbox::SandboxError),
    /// The health listener could not bind.
    #[error("health listener: {0}")]
    Io(#[from] std::io::Error),
}

/// The labels an agent sets itself (§10): `kici:os:linux`, `kici:arch:<arch>` (x86_64 as
/// `x64` and `amd64`, aarch64 as `arm64`), `kici:host:<hostname>`.
pub fn system_labels() -> Vec<String> {
    let mut labels = vec![format!("kici:os:{}", std::env::consts::OS)];
    match std::env::consts::ARCH {
        "x86_64" => labels.extend(["kici:arch:x64".into(), "kici:arch:amd64".into()]),
        "aarch64" => labels.push("kici:arch:arm64".into()),
        other => labels.push(format!("kici:arch:{other}")),
    }
    labels.push(format!("kici:host:{}", hostname()));
    labels
}

/// This machine's host name (`/proc/sys/kernel/hostname`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// Reports waiting to be sent, kept across reconnects.
#[derive(Default)]
struct Outbox {
    queue: Mutex<(VecDeque<FromAgent>, u64)>,
    ready: Notify,
}

impl Outbox {
    fn push(&self, msg: FromAgent) {
        let mut q = self.queue.lock().expect("outbox");
        if q.0.len() >= OUTBOX_CAPACITY {
            q.0.pop_front();
            q.1 += 1;
        }
        q.0.push_back(msg);
        drop(q);
        self.ready.notify_one();
    }

    /// Everything queued, and how many were dropped since the last take.
    fn take(&self) -> (Vec<FromAgent>, u64) {
        let mut q = self.queue.lock().expect("outbox");
        let dropped = std::mem::take(&mut q.1);
        (q.0.drain(..).collect(), dropped)
    }

    /// Puts back what could not be sent, in front.
    fn unshift(&self, msgs: Vec<FromAgent>) {
        let mut q = self.queue.lock().expect("outbox");
        for m in msgs.into_iter().rev() {
            q.0.push_front(m);
        }
    }
}

#[derive(Default)]
struct Counters {
    started: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    reconnects: AtomicU64,
}

struct Shared {
    config: AgentConfig,
    labels: Vec<String>,
    sandbox: Arc<dyn SandboxProvider>,
    outbox: Outbox,
    jobs: Mutex<HashMap<JobRef, CancellationToken>>,
    idle: Notify,
    connected: AtomicBool,
    draining: AtomicBool,
    counters: Counters,
}

/// Runs the agent until `shutdown` (graceful) or `drain` (after the last job) fires.
///
/// Errors: [`AgentError::Unauthorized`] when the token is refused; [`AgentError::Config`]
/// for a user label starting with `kici:`; [`AgentError::Sandbox`] when bubblewrap cannot
/// run; [`AgentError::Io`] when the health address cannot be bound.
pub async fn run(
    config: AgentConfig,
    shutdown: CancellationToken,
    drain: CancellationToken,
) -> Result<(), AgentError> {
    if let Some(bad) = config.labels.iter().find(|l| l.starts_with("kici:")) {
        return Err(AgentError::Config(format!(
            "label {bad:?}: labels starting with kici: are set by the agent, not by users"
        )));
    }
    let sandbox =
        kilocloud_agent::sandbox::provider(&config.sandbox, config.work_dir.join("sandboxes"))?;
    sandbox.check().await?;
    let mut labels = config.labels.clone();
    labels.extend(system_labels());
    labels.sort();
    labels.dedup();
    let shared = Arc::new(Shared {
        labels,
        sandbox,
        outbox: Outbox::default(),
        jobs: Mutex::new(HashMap::new()),
        idle: Notify::new(),
        connected: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        counters: Counters::default(),
        config,
    });
    if let Some(addr) = shared.config.health_listen {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(address = %listener.local_addr()?, "agent health endpoints");
        let app = health_router(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }
    let stop = CancellationToken::new();
    let connection = tokio::spawn(connect_loop(shared.clone(), stop.clone()));
    tokio::select! {
        _ = shutdown.cancelled() => {
            shared.draining.store(true, Ordering::SeqCst);
            if !wait_idle(&shared, Some(shared.config.shutdown_grace)).await {
                tracing::warn!("shutdown: cancelling jobs still running");
                for token in shared.jobs.lock().expect("jobs").values() {
                    token.cancel();
                }
                wait_idle(&shared, Some(Duration::from_secs(5))).await;
            }
        }
        _ = drain.cancelled() => {
            tracing::info!("draining: no new jobs; waiting for running ones");
            shared.draining.store(true, Ordering::SeqCst);
            wait_idle(&shared, None).await;
        }
        result = connection => {
            return match result {
                Ok(r) => r,
                Err(e) => Err(AgentError::Config(format!("connection task failed: {e}"))),
            };
        }
    }
    // Let the last reports go out.
    let deadline = Instant::now() + Duration::from_secs(5);
    while shared.connected.load(Ordering::SeqCst)
        && !shared.outbox.queue.lock().expect("outbox").0.is_empty()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    Ok(())
}

/// Waits until no job runs; `false` when `limit` passed first.
async fn wait_idle(shared: &Shared, limit: Option<Duration>) -> bool {
    let idle = async {
        loop {
            let notified = shared.idle.notified();
            if shared.jobs.lock().expect("jobs").is_empty() {
                return;
            }
            notified.await;
        }
    };
    match limit {
        Some(limit) => tokio::time::timeout(limit, idle).await.is_ok(),
        None => {
            idle.await;
            true
        }
    }
}

fn health_router(shared: Arc<Shared>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    let ready = shared.clone();
    let metrics = shared;
    axum::Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/ready",
            get(move || async move {
                if ready.connected.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not connected to the orchestrator",
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move { render_metrics(&metrics) }),
        )
}

/// The agent's metrics in the Prometheus text format.
fn render_metrics(s: &Shared) -> String {
    let c = &s.counters;
    let running = s.jobs.lock().expect("jobs").len();
    let mut out = String::new();
    let mut line = |name: &str, kind: &str, help: &str, value: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    line(
        "kici_agent_connected",
        "gauge",
        "1 while registered with the orchestrator",
        u64::from(s.connected.load(Ordering::SeqCst)),
    );
    line(
        "kici_agent_jobs_running",
        "gauge",
        "Jobs running now",
        running as u64,
    );
    line(
        "kici_agent_jobs_started_total",
        "counter",
        "Jobs started",
        c.started.load(Ordering::Relaxed),
    );
    line(
        "kici_agent_jobs_succeeded_total",
        "counter",
        "Jobs that succeeded",
        c.succeeded.load(Ordering::Relaxed),
    );
    line(
        "kici_agent_jobs_failed_total",
        "counter",
        "Jobs that failed",
        c.failed.load(Ordering::Relaxed),
    );
    line(
        "kici_agent_jobs_cancelled_total",
        "counter",
        "Jobs cancelled",
        c.cancelled.load(Ordering::Relaxed),
    );
    line(
        "kici_agent_reconnects_total",
        "counter",
        "Connections opened after the first",
        c.reconnects.load(Ordering::Relaxed),
    );
    out
}

/// The reconnect delay before attempt `n` (from 0).
pub fn backoff(attempt: u32) -> Duration {
    let jitter: f64 = 1.0 + rand::random::<f64>() * 0.5;
    let ms = 1000.0 * 1.5f64.powi(attempt.min(30) as i32) * jitter;
    Duration::from_millis(ms.min(60_000.0) as u64)
}

async fn connect_loop(shared: Arc<Shared>, stop: CancellationToken) -> Result<(), AgentError> {
    let mut attempt = 0u32;
    let mut first = true;
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        match session(&shared, &stop, &mut attempt, first).await {
            Ok(()) => {}
            Err(SessionEnd::Unauthorized(m)) => return Err(AgentError::Unauthorized(m)),
            Err(SessionEnd::Lost(m)) => tracing::warn!(reason = %m, "orchestrator connection lost"),
        }
        first = false;
        shared.connected.store(false, Ordering::SeqCst);
        let delay = backoff(attempt);
        attempt += 1;
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

enum SessionEnd {
    Unauthorized(String),
    Lost(String),
}

fn agent_url(server: &url::Url) -> String {
    let mut url = server.clone();
    let scheme = if server.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    let _ = url.set_scheme(scheme);
    url.set_path("/api/ci/agent");
    url.to_string()
}

async fn session(
    shared: &Arc<Shared>,
    stop: &CancellationToken,
    attempt: &mut u32,
    first: bool,
) -> Result<(), SessionEnd> {
    let lost = |e: &dyn std::fmt::Display| SessionEnd::Lost(e.to_string());
    let mut request = agent_url(&shared.config.server)
        .into_client_request()
        .map_err(|e| lost(&e))?;
    let bearer = format!("Bearer {}", shared.config.token);
    request.headers_mut().insert(
        "authorization",
        bearer.parse().map_err(|_| {
            SessionEnd::Unauthorized("the token is not a valid header value".into())
        })?,
    );
    let ws_config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    let (mut ws, _) =
        match tokio_tungstenite::connect_async_with_config(request, Some(ws_config), true).await {
            Ok(ok) => ok,
            Err(tungstenite::Error::Http(response)) if response.status() == 401 => {
                let body = response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(SessionEnd::Unauthorized(body));
            }
            Err(e) => return Err(lost(&e)),
        };
    let in_flight: Vec<JobRef> = shared.jobs.lock().expect("jobs").keys().cloned().collect();
    let register = FromAgent::Register {
        agent_id: shared.config.agent_id.clone(),
        labels: shared.labels.clone(),
        max_concurrency: shared.config.max_concurrency.max(1),
        in_flight_jobs: in_flight,
        hostname: hostname(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol_version: PROTOCOL_VERSION,
    };
    send(&mut ws, &register).await.map_err(|e| lost(&e))?;
    let ack = tokio::time::timeout(REGISTER_TIMEOUT, ws.next())
        .await
        .map_err(|_| lost(&"no register.ack in time"))?;
    match ack {
        Some(Ok(Message::Text(text))) => match serde_json::from_str::<ToAgent>(&text) {
            Ok(ToAgent::RegisterAck { .. }) => {}
            Ok(ToAgent::Error { code, message }) => {
                return Err(lost(&format!("registration refused: {code}: {message}")));
            }
            _ => return Err(lost(&"expected register.ack")),
        },
        Some(Ok(Message::Close(frame))) => {
            let reason = frame
                .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                .unwrap_or_default();
            if reason.starts_with(&crate::protocol::CLOSE_AUTH_FAILED.to_string()) {
                return Err(SessionEnd::Unauthorized(reason));
            }
            return Err(lost(&format!("closed during registration: {reason}")));
        }
        other => return Err(lost(&format!("registration failed: {other:?}"))),
    }
    *attempt = 0;
    if !first {
        shared.counters.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    shared.connected.store(true, Ordering::SeqCst);
    tracing::info!(agent = %shared.config.agent_id, labels = ?shared.labels, "registered");
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = ws.close(None).await;
                return Ok(());
            }
            frame = ws.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Binary(_))) => continue,
                    Some(Ok(Message::Close(f))) => return Err(lost(&format!("closed: {f:?}"))),
                    Some(Err(e)) => return Err(lost(&e)),
                    None => return Err(lost(&"the connection ended")),
                };
                match serde_json::from_str::<ToAgent>(&text) {
                    Ok(msg) => on_message(shared, msg),
                    Err(e) => tracing::warn!(error = %e, "unreadable frame ignored"),
                }
            }
            _ = shared.outbox.ready.notified() => {
                let (msgs, dropped) = shared.outbox.take();
                if dropped > 0 {
                    tracing::warn!(dropped, "reports dropped while disconnected (outbox full)");
                }
                for (i, msg) in msgs.iter().enumerate() {
                    if let Err(e) = send(&mut ws, msg).await {
                        shared.outbox.unshift(msgs[i..].to_vec());
                        return Err(lost(&e));
                    }
                }
            }
            _ = heartbeat.tick() => {
                let beat = FromAgent::Heartbeat { timestamp: chrono::Utc::now().timestamp_millis() };
                send(&mut ws, &beat).await.map_err(|e| lost(&e))?;
            }
        }
    }
}

async fn send<S>(ws: &mut S, msg: &FromAgent) -> Result<(), tungstenite::Error>
where
    S: futures::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let text = serde_json::to_string(msg).expect("messages serialize");
    ws.send(Message::text(text)).await
}

fn on_message(shared: &Arc<Shared>, msg: ToAgent) {
    match msg {
        ToAgent::JobDispatch {
            job,
            repo_url,
            git_ref,
            sha,
            job_config,
            token,
            max_log_size_bytes,
            ..
        } => {
            let refuse = if shared.draining.load(Ordering::SeqCst) {
                Some("draining")
            } else if shared.jobs.lock().expect("jobs").len()
                >= shared.config.max_concurrency.max(1) as usize
            {
                Some("busy")
            } else {
                None
            };
            if let Some(reason) = refuse {
                shared.outbox.push(FromAgent::JobReject {
                    job,
                    reason: reason.into(),
                });
                return;
            }
            let cancel = CancellationToken::new();
            shared
                .jobs
                .lock()
                .expect("jobs")
                .insert(job.clone(), cancel.clone());
            shared.outbox.push(FromAgent::JobAck { job: job.clone() });
            let shared = shared.clone();
            let work = Job {
                job,
                repo_url,
                git_ref,
                sha,
                spec: *job_config,
                token,
                max_log_bytes: max_log_size_bytes,
                cancel,
            };
            tokio::spawn(async move {
                let job = work.job.clone();
                run_job(&shared, work).await;
                shared.jobs.lock().expect("jobs").remove(&job);
                shared.idle.notify_waiters();
            });
        }
        ToAgent::JobCancel { job, reason, force } => {
            tracing::info!(job = %job.job_id, %reason, force, "cancel");
            if let Some(token) = shared.jobs.lock().expect("jobs").get(&job) {
                token.cancel();
            }
        }
        ToAgent::Error { code, message } => tracing::warn!(%code, %message, "orchestrator error"),
        ToAgent::RegisterAck { .. } => {}
    }
}

/// One dispatched job.
struct Job {
    job: JobRef,
    repo_url: String,
    git_ref: String,
    sha: String,
    spec: JobSpec,
    token: Option<String>,
    max_log_bytes: u64,
    cancel: CancellationToken,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Passed,
    Failed,
    Cancelled,
}

async fn run_job(shared: &Arc<Shared>, job: Job) {
    shared.counters.started.fetch_add(1, Ordering::Relaxed);
    let report = |state, error: Option<String>| FromAgent::JobStatus {
        job: job.job.clone(),
        state,
        error,
    };
    shared.outbox.push(report(ReportedJobState::Running, None));
    // The job deadline cancels like a user would, but reports a failure.
    let timed_out = Arc::new(AtomicBool::new(false));
    if let Some(ms) = job.spec.timeout_ms {
        let (cancel, flag) = (job.cancel.clone(), timed_out.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {
                    flag.store(true, Ordering::SeqCst);
                    cancel.cancel();
                }
            }
        });
    }
    let heartbeat = {
        let (cancel, shared, job_ref) = (job.cancel.clone(), shared.clone(), job.job.clone());
        let done = CancellationToken::new();
        let stop = done.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(JOB_HEARTBEAT);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => shared.outbox.push(FromAgent::JobHeartbeat { job: job_ref.clone() }),
                }
            }
        });
        done
    };
    let outcome = execute(shared, &job).await;
    heartbeat.cancel();
    let (state, error) = match outcome {
        Ok(Ended::Passed) => (ReportedJobState::Success, None),
        Ok(Ended::Cancelled) if timed_out.load(Ordering::SeqCst) => (
            ReportedJobState::Failed,
            Some(format!(
                "job_timeout: the job ran over its {} ms limit",
                job.spec.timeout_ms.unwrap_or_default()
            )),
        ),
        Ok(Ended::Cancelled) => (ReportedJobState::Cancelled, Some("cancelled".into())),
        Ok(Ended::Failed) => (ReportedJobState::Failed, Some("a step failed".into())),
        Err(e) => (ReportedJobState::Failed, Some(e)),
    };
    let counter = match state {
        ReportedJobState::Success => &shared.counters.succeeded,
        ReportedJobState::Cancelled => &shared.counters.cancelled,
        _ => &shared.counters.failed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    shared.outbox.push(report(state, error));
}

/// Prepares the sandbox, clones, runs the steps; removes the sandbox in any case.
async fn execute(shared: &Arc<Shared>, job: &Job) -> Result<Ended, String> {
    let sandbox_id = format!("ci-{}", job.job.job_id);
    let mount = shared
        .sandbox
        .prepare(&sandbox_id, "/workspace", "/home/runner")
        .await
        .map_err(|e| format!("sandbox: {e}"))?;
    let result = async {
        if job.spec.checkout {
            let clone = shared.config.git.clone_at(
                &job.repo_url,
                job.token.as_deref(),
                &mount.host_workspace,
                &job.git_ref,
                &job.sha,
            );
            tokio::select! {
                r = clone => r.map_err(|e| format!("clone: {e}"))?,
                _ = job.cancel.cancelled() => return Ok(Ended::Cancelled),
            }
        }
        tokio::fs::create_dir_all(mount.host_home.join(".kici"))
            .await
            .map_err(|e| format!("sandbox: {e}"))?;
        shared
            .sandbox
            .adopt_host_writes(&mount)
            .await
            .map_err(|e| format!("sandbox: {e}"))?;
        run_steps(shared, job, &mount).await
    }
    .await;
    if let Err(e) = shared.sandbox.remove(&mount).await {
        tracing::warn!(error = %e, sandbox = %sandbox_id, "cannot remove a job's sandbox");
    }
    result
}

async fn run_steps(shared: &Arc<Shared>, job: &Job, mount: &SessionMount) -> Result<Ended, String> {
    let mut index = 0u32;
    let mut failed = false;
    for entry in &job.spec.steps {
        let (children, fail_fast, parallel): (Vec<&LockStep>, bool, bool) = match entry {
            LockStepEntry::Step(s) => (vec![s], true, false),
            LockStepEntry::Parallel(g) => (g.children.iter().collect(), g.fail_fast, true),
        };
        let first = index;
        index += children.len() as u32;
        if failed || job.cancel.is_cancelled() {
            for (i, step) in children.iter().enumerate() {
                step_status(
                    shared,
                    job,
                    first + i as u32,
                    step,
                    StepState::Skipped,
                    None,
                    None,
                    None,
                );
            }
            continue;
        }
        let group_cancel = job.cancel.child_token();
        let runs = children.iter().enumerate().map(|(i, step)| {
            let cancel = group_cancel.clone();
            async move {
                let ended = run_step(shared, job, mount, first + i as u32, step, &cancel).await;
                if ended == Ended::Failed && !step.continue_on_error && parallel && fail_fast {
                    cancel.cancel();
                }
                (ended, step.continue_on_error)
            }
        });
        let results = futures::future::join_all(runs).await;
        if job.cancel.is_cancelled() {
            return Ok(Ended::Cancelled);
        }
        if results
            .iter()
            .any(|(e, continue_on_error)| *e != Ended::Passed && !continue_on_error)
        {
            failed = true;
        }
    }
    Ok(if job.cancel.is_cancelled() {
        Ended::Cancelled
    } else if failed {
        Ended::Failed
    } else {
        Ended::Passed
    })
}

#[allow(clippy::too_many_arguments)]
fn step_status(
    shared: &Shared,
    job: &Job,
    index: u32,
    step: &LockStep,
    state: StepState,
    exit_code: Option<i32>,
    duration_ms: Option<u64>,
    error: Option<String>,
) {
    shared.outbox.push(FromAgent::StepStatus {
        job: job.job.clone(),
        step_index: index,
        step_name: step.name.clone(),
        state,
        exit_code,
        duration_ms,
        error,
    });
}

/// Runs one step (with its retries), streaming its output.
async fn run_step(
    shared: &Arc<Shared>,
    job: &Job,
    mount: &SessionMount,
    index: u32,
    step: &LockStep,
    cancel: &CancellationToken,
) -> Ended {
    let Some(script) = step.run.as_deref() else {
        step_status(
            shared,
            job,
            index,
            step,
            StepState::Failed,
            None,
            None,
            Some("the step has no `run` script (TypeScript steps need the SDK runtime)".into()),
        );
        return Ended::Failed;
    };
    if cancel.is_cancelled() {
        step_status(
            shared,
            job,
            index,
            step,
            StepState::Skipped,
            None,
            None,
            None,
        );
        return Ended::Cancelled;
    }
    step_status(
        shared,
        job,
        index,
        step,
        StepState::Running,
        None,
        None,
        None,
    );
    let attempts = step
        .extra
        .get("retry")
        .and_then(|r| r["maxAttempts"].as_u64())
        .unwrap_or(1)
        .clamp(1, 10) as u32;
    let timeout = step
        .timeout
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_STEP_TIMEOUT);
    let log_name = format!("step-{index}.log");
    let host_log = mount.host_home.join(".kici").join(&log_name);
    let inner_log = format!("{}/.kici/{log_name}", mount.home);
    let mut streamer = LogStreamer::new(
        shared.clone(),
        job.job.clone(),
        index as i32,
        job.max_log_bytes,
    );
    let started = Instant::now();
    let mut last = None;
    for attempt in 1..=attempts {
        if attempt > 1 {
            let delay = Duration::from_millis((1000u64 << (attempt - 2).min(5)).min(30_000));
            streamer.line(format!(
                "[kici] attempt {attempt} of {attempts} in {} ms",
                delay.as_millis()
            ));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => break,
            }
        }
        let wrapped = format!("exec >>{inner_log} 2>&1\n{script}\n");
        let request = ExecRequest {
            argv: [
                "bash",
                "--noprofile",
                "--norc",
                "-e",
                "-o",
                "pipefail",
                "-c",
                &wrapped,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            env: job
                .spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            stdin: None,
            cwd: None,
            timeout,
            output_cap: 64 << 10,
            forward: None,
            ro_binds: Vec::new(),
        };
        let exec = shared.sandbox.exec(mount, request, cancel);
        tokio::pin!(exec);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let output = loop {
            tokio::select! {
                out = &mut exec => break out,
                _ = tick.tick() => streamer.pump(&host_log).await,
            }
        };
        streamer.pump(&host_log).await;
        streamer.finish_line();
        match output {
            Ok(out) => {
                // Output the shell printed before the redirect took effect (a missing bash).
                let early = out.combined_text();
                if !out.success() && !early.trim().is_empty() && early.len() < 4096 {
                    for l in early.lines() {
                        streamer.line(l.to_owned());
                    }
                }
                let passed = out.success();
                last = Some(out);
                if passed || cancel.is_cancelled() {
                    break;
                }
            }
            Err(e) => {
                streamer.line(format!("[kici] the sandbox failed: {e}"));
                last = None;
                break;
            }
        }
    }
    streamer.flush();
    let duration = Some(started.elapsed().as_millis() as u64);
    let (state, ended, error) = match &last {
        _ if cancel.is_cancelled() => (StepState::Cancelled, Ended::Cancelled, None),
        Some(out) if out.success() => (StepState::Success, Ended::Passed, None),
        Some(out) if out.timed_out => (
            StepState::Failed,
            Ended::Failed,
            Some(format!("timed out after {} ms", timeout.as_millis())),
        ),
        Some(out) => (
            StepState::Failed,
            Ended::Failed,
            Some(match (out.exit_code, out.signal) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => "failed".into(),
            }),
        ),
        None => (
            StepState::Failed,
            Ended::Failed,
            Some("the sandbox failed".into()),
        ),
    };
    let exit_code = last.as_ref().and_then(|o| o.exit_code);
    step_status(shared, job, index, step, state, exit_code, duration, error);
    ended
}

/// Tails one step's log file into `log.chunk` reports.
struct LogStreamer {
    shared: Arc<Shared>,
    job: JobRef,
    step: i32,
    cap: u64,
    sent_bytes: u64,
    truncated: bool,
    offset: u64,
    partial: Vec<u8>,
    batch: Vec<String>,
    batch_started: Option<Instant>,
}

impl LogStreamer {
    fn new(shared: Arc<Shared>, job: JobRef, step: i32, cap: u64) -> Self {
        Self {
            shared,
            job,
            step,
            cap,
            sent_bytes: 0,
            truncated: false,
            offset: 0,
            partial: Vec::new(),
            batch: Vec::new(),
            batch_started: None,
        }
    }

    /// Reads what the file gained since the last call.
    async fn pump(&mut self, path: &std::path::Path) {
        let Ok(mut file) = tokio::fs::File::open(path).await else {
            return;
        };
        if file
            .seek(std::io::SeekFrom::Start(self.offset))
            .await
            .is_err()
        {
            return;
        }
        let mut buf = Vec::new();
        if let Ok(n) = file.read_to_end(&mut buf).await {
            self.offset += n as u64;
        }
        for &b in &buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
                self.line(line);
            } else {
                self.partial.push(b);
            }
        }
        if self
            .batch_started
            .is_some_and(|t| t.elapsed() >= Duration::from_millis(100))
        {
            self.flush();
        }
    }

    /// Ends an unterminated last line.
    fn finish_line(&mut self) {
        if !self.partial.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
            self.line(line);
        }
    }

    fn line(&mut self, line: String) {
        if self.truncated {
            return;
        }
        self.sent_bytes += line.len() as u64 + 1;
        if self.sent_bytes > self.cap {
            self.truncated = true;
            self.batch.push(format!(
                "[kici] log truncated: this step's output passed {} bytes",
                self.cap
            ));
            self.flush();
            return;
        }
        self.batch.push(line);
        self.batch_started.get_or_insert_with(Instant::now);
        if self.batch.len() >= LOG_BATCH_LINES {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.batch_started = None;
        if self.batch.is_empty() {
            return;
        }
        self.shared.outbox.push(FromAgent::LogChunk {
            job: self.job.clone(),
            step_index: self.step,
            lines: std::mem::take(&mut self.batch),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_half_with_jitter_and_caps_at_a_minute() {
        for attempt in 0..40 {
            let d = backoff(attempt).as_millis() as f64;
            let base = (1000.0 * 1.5f64.powi(attempt as i32)).min(60_000.0);
            assert!(
                d >= base.min(60_000.0) - 1.0 || d == 60_000.0,
                "{attempt}: {d}"
            );
            assert!(d <= (base * 1.5).min(60_000.0) + 1.0, "{attempt}: {d}");
        }
        assert_eq!(backoff(30).as_millis(), 60_000);
    }

    #[test]
    fn system_labels_name_os_arch_and_host() {
        let labels = system_labels();
        assert!(labels.contains(&format!("kici:os:{}", std::env::consts::OS)));
        assert!(labels.iter().any(|l| l.starts_with("kici:arch:")));
        assert!(labels.contains(&format!("kici:host:{}", hostname())));
    }

    #[test]
    fn the_outbox_keeps_the_newest_reports_and_counts_drops() {
        let outbox = Outbox::default();
        for i in 0..OUTBOX_CAPACITY + 3 {
            outbox.push(FromAgent::Heartbeat {
                timestamp: i as i64,
            });
        }
        let (msgs, dropped) = outbox.take();
        assert_eq!((msgs.len(), dropped), (OUTBOX_CAPACITY, 3));
        assert_eq!(msgs[0], FromAgent::Heartbeat { timestamp: 3 });
        outbox.unshift(msgs[..2].to_vec());
        assert_eq!(outbox.take().0.len(), 2);
    }
}
