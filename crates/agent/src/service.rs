//! The Cloud Agent service ([`Agents`]): prepare, initiate, follow-up, interrupt, read, list,
//! export and delete sessions for an owner; the event log reads behind the live stream; the
//! per-owner session index.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kilocloud_identity::Identity;
use kilocloud_identity::envelope::Envelope;
use kilocloud_substrate::{Actor, ActorContext, QueueConfig, Substrate};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::git::{GitConfig, GitError};
use crate::harness::{HarnessConfig, HarnessError};
use crate::ids;
use crate::sandbox::{ExecRequest, SandboxConfig, SandboxError, SandboxProvider, SessionMount};
use crate::session::{
    CALLBACK_QUEUE, ExecStatus, Execution, Mode, Refusal, SESSION_ACTOR, SealedCallback,
    SessionActor, SessionCall, SessionMeta, SessionReply, StoredEvent, WorkspaceJanitor,
};

/// `agent`: the Cloud Agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Sandboxes.
    pub sandbox: SandboxConfig,
    /// Git.
    pub git: GitConfig,
    /// The agent harness.
    pub harness: HarnessConfig,
    /// Model of sessions that name none. Default `kilo/auto`.
    pub default_model: String,
    /// Base URL the agent reaches this server's gateway at. Default empty: the address the
    /// server listens on.
    pub gateway_url: String,
    /// Lifetime of the gateway credential minted for each execution, s. Default 86,400.
    pub credential_ttl_s: i64,
    /// Heartbeat period of running executions, ms. Default 30,000 (reference).
    pub heartbeat_interval_ms: u64,
    /// Timeout of one setup command, ms. Default 120,000 (reference).
    pub setup_timeout_ms: u64,
    /// Allows callback targets on loopback, private or link-local addresses. Default false.
    pub allow_private_callbacks: bool,
    /// Most executions running at once on one node; a start beyond it is refused with
    /// [`AgentError::Busy`] ([`BusyScope::Node`]). `0`: no bound. Default 8.
    pub max_executions_per_node: u32,
    /// Most executions running at once for one owner (a user, or an organization with all its
    /// members), across nodes; a start beyond it is refused with [`AgentError::Busy`]
    /// ([`BusyScope::Owner`]). `0`: no bound. Default 20 (code review runs up to 20 per owner).
    pub max_executions_per_owner: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            sandbox: SandboxConfig::default(),
            git: GitConfig::default(),
            harness: HarnessConfig::default(),
            default_model: "kilo/auto".into(),
            gateway_url: String::new(),
            credential_ttl_s: 86_400,
            heartbeat_interval_ms: 30_000,
            setup_timeout_ms: 120_000,
            allow_private_callbacks: false,
            max_executions_per_node: 8,
            max_executions_per_owner: 20,
        }
    }
}

/// Limits of prepare input (reference §3 "Limits").
pub mod limits {
    /// Longest prompt, characters.
    pub const PROMPT_CHARS: usize = 100_000;
    /// Most environment variables.
    pub const ENV_VARS: usize = 50;
    /// Longest environment variable name or value, characters.
    pub const ENV_CHARS: usize = 256;
    /// Most secrets.
    pub const SECRETS: usize = 50;
    /// Longest secret name, characters.
    pub const SECRET_NAME_CHARS: usize = 128;
    /// Most setup commands.
    pub const SETUP_COMMANDS: usize = 20;
    /// Longest setup command, characters.
    pub const SETUP_COMMAND_CHARS: usize = 500;
    /// Most callback headers.
    pub const CALLBACK_HEADERS: usize = 20;
}

/// Environment names the platform sets and users cannot.
const RESERVED_ENV: &[&str] = &[
    "HOME",
    "PATH",
    "TMPDIR",
    "SESSION_ID",
    "SESSION_HOME",
    "KILO_PLATFORM",
    "KILOCODE_FEATURE",
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
];

/// The caller a session call acts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The user.
    pub user: Uuid,
    /// The organization scope (`X-KiloCode-OrganizationId`), if any.
    pub org: Option<Uuid>,
    /// The bot the credential acts as, if any.
    pub bot: Option<Uuid>,
}

impl Caller {
    fn owner(&self) -> String {
        match self.org {
            Some(org) => format!("org:{org}"),
            None => format!("user:{}", self.user),
        }
    }
}

/// Where terminal transitions are POSTed. `Debug` shows the headers' names only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallbackTarget {
    /// http(s) URL.
    pub url: String,
    /// Headers sent with it (stored encrypted).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

impl std::fmt::Debug for CallbackTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackTarget")
            .field("url", &self.url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Body of `POST /api/sessions` (prepare). `Debug` shows the secrets' names only, and
/// neither the git token nor the callback's headers.
#[derive(Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrepareRequest {
    /// `owner/repo` on GitHub (exactly one of this and `gitUrl`).
    pub github_repo: Option<String>,
    /// An https clone URL without credentials.
    pub git_url: Option<String>,
    /// A token for clone and push, sent as an HTTP header; stored encrypted.
    pub git_token: Option<String>,
    /// An existing remote branch to work on; default: a new `session/<id>`.
    pub upstream_branch: Option<String>,
    /// Environment of the agent's commands (≤ 50; names and values ≤ 256 characters).
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// Secret environment (≤ 50; names ≤ 128 characters); stored encrypted, shown as a count.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// Commands run once after the clone (≤ 20 of ≤ 500 characters, 120 s each); the first
    /// failure fails the prepare.
    #[serde(default)]
    pub setup_commands: Vec<String>,
    /// Default mode.
    pub mode: Option<Mode>,
    /// Default model; default `agent.default_model`.
    pub model: Option<String>,
    /// The first prompt (1–100,000 characters).
    pub prompt: String,
    /// Commit and push to the branch when an execution completes.
    #[serde(default)]
    pub auto_commit: bool,
    /// Where terminal transitions are reported.
    pub callback_target: Option<CallbackTarget>,
    /// In-process subscriber to terminal transitions (services only; not part of the API).
    #[serde(skip)]
    #[schema(ignore)]
    pub notify: Option<crate::session::CompletionNotice>,
}

impl std::fmt::Debug for PrepareRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrepareRequest")
            .field("github_repo", &self.github_repo)
            .field("git_url", &self.git_url)
            .field("git_token", &self.git_token.as_ref().map(|_| "***"))
            .field("upstream_branch", &self.upstream_branch)
            .field("env_vars", &self.env_vars)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("setup_commands", &self.setup_commands)
            .field("mode", &self.mode)
            .field("model", &self.model)
            .field("prompt", &self.prompt)
            .field("auto_commit", &self.auto_commit)
            .field("callback_target", &self.callback_target)
            .field("notify", &self.notify)
            .finish()
    }
}

/// Body of `POST /api/sessions/{id}/messages` (follow-up).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FollowUp {
    /// The message (1–100,000 characters).
    pub prompt: String,
    /// Mode; default the session's.
    pub mode: Option<Mode>,
    /// Model; default the session's.
    pub model: Option<String>,
    /// Commit and push at completion; default the session's.
    pub auto_commit: Option<bool>,
}

/// Answer of prepare.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Prepared {
    /// `agent_<uuid>`.
    pub session_id: String,
    /// The sandbox the session runs in.
    pub sandbox_id: String,
    /// The branch the agent works on.
    pub branch: String,
    /// Workspace path inside the sandbox.
    pub workspace_path: String,
}

/// Answer of initiate and follow-up (the reference's ack).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    /// Session id.
    pub session_id: String,
    /// The new execution.
    pub execution_id: String,
    /// Always `started`.
    pub status: String,
    /// Path of the WebSocket stream (add `?ticket=…`).
    pub stream_url: String,
}

/// A session as its owner sees it: secrets only as a count.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    /// Session id.
    pub session_id: String,
    /// Creating user.
    pub user_id: Uuid,
    /// Owning organization.
    pub org_id: Option<Uuid>,
    /// Clone URL.
    pub repo: String,
    /// Working branch.
    pub branch: String,
    /// Branch reported by the last completed execution.
    pub last_branch: Option<String>,
    /// Default mode.
    pub mode: Mode,
    /// Default model.
    pub model: String,
    /// First prompt.
    pub prompt: String,
    /// Auto-commit default.
    pub auto_commit: bool,
    /// Environment variables.
    pub env_vars: BTreeMap<String, String>,
    /// Number of secrets.
    pub secret_count: usize,
    /// Whether a git token is stored.
    pub has_git_token: bool,
    /// Setup commands.
    pub setup_commands: Vec<String>,
    /// Callback URL (headers are not shown).
    pub callback_url: Option<String>,
    /// Sandbox id.
    pub sandbox_id: String,
    /// Workspace path inside the sandbox.
    pub workspace_path: String,
    /// Prepare time, ms.
    pub prepared_at: i64,
    /// First execution, ms.
    pub initiated_at: Option<i64>,
    /// The active execution, if any.
    pub active_execution_id: Option<String>,
    /// Executions, oldest first.
    pub executions: Vec<Execution>,
}

/// One line of the session list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionSummary {
    /// Session id.
    pub session_id: String,
    /// Creating user.
    pub user_id: Uuid,
    /// Clone URL.
    pub repo: String,
    /// The first 100 characters of the first prompt.
    pub title: String,
    /// Prepare time, ms.
    pub created_at: i64,
}

/// An event as streamed and listed: `{eventId, executionId, sessionId, streamEventType,
/// timestamp (RFC 3339), data}` (reference §3 frame).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventFrame {
    /// Position in the session's log, from 1.
    pub event_id: u64,
    /// Execution.
    pub execution_id: String,
    /// Session.
    pub session_id: String,
    /// `started`, `output`, `agent`, `status`, `heartbeat`, `error`, `interrupted`,
    /// `complete`.
    pub stream_event_type: String,
    /// RFC 3339 time.
    pub timestamp: String,
    /// Payload.
    pub data: Value,
}

impl EventFrame {
    /// Whether the frame ends its execution: `complete`, `interrupted`, or a fatal `error`.
    pub fn is_terminal(&self) -> bool {
        match self.stream_event_type.as_str() {
            "complete" | "interrupted" => true,
            "error" => self.data["fatal"] == true,
            _ => false,
        }
    }
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only these executions (empty: all).
    pub execution_ids: Vec<String>,
    /// Only these types (empty: all).
    pub event_types: Vec<String>,
}

impl EventFilter {
    fn matches(&self, e: &StoredEvent) -> bool {
        (self.execution_ids.is_empty() || self.execution_ids.contains(&e.e))
            && (self.event_types.is_empty() || self.event_types.contains(&e.t))
    }
}

/// A session's export: its metadata view and its compacted history items.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionExport {
    /// The session.
    pub session: SessionView,
    /// History items by id (`message/<n>`: the conversation), compacted: the latest value of
    /// each.
    pub items: BTreeMap<String, Value>,
    /// Events in the log.
    pub event_count: u64,
}

/// A Cloud Agent failure, mapped to HTTP by the server.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad input (400).
    #[error("{0}")]
    Invalid(String),
    /// Unknown session, or another owner's (404).
    #[error("session not found")]
    NotFound,
    /// A conflicting state (409); `active` names the execution in progress.
    #[error("{message}")]
    Conflict {
        /// What conflicts.
        message: String,
        /// The active execution, when that is the conflict.
        active: Option<String>,
    },
    /// A setup command failed (422).
    #[error("{0}")]
    SetupFailed(String),
    /// The repository does not exist, or the token cannot see it (422).
    #[error("{0}")]
    RepositoryNotFound(String),
    /// The `upstreamBranch` does not exist in the repository (422).
    #[error("{0}")]
    BranchNotFound(String),
    /// The model is unknown to the gateway (404), or `allowed` is false: the organization's
    /// policy does not allow it (404).
    #[error("{message}")]
    ModelNotFound {
        /// What is wrong with the model.
        message: String,
        /// Whether the model exists but the organization's policy forbids it.
        not_allowed: bool,
    },
    /// Infrastructure (sandbox, clone) failed (503); `retryable` says whether a retry may work.
    #[error("{message}")]
    Unavailable {
        /// What failed and, when not retryable, how to fix it.
        message: String,
        /// Whether the client should retry.
        retryable: bool,
    },
    /// A bound on concurrent executions is reached; nothing was started. The owner's bound is
    /// the caller's to wait for (429), the node's is the server's (503); both may pass later.
    #[error("{message}")]
    Busy {
        /// Which bound, and its value.
        message: String,
        /// The owner's bound or the node's.
        scope: BusyScope,
    },
    /// Anything else (500).
    #[error("{0}")]
    Internal(String),
    /// A substrate failure (overload: 503 with `Retry-After`; storage: 500).
    #[error(transparent)]
    Substrate(#[from] kilocloud_substrate::Error),
}

/// The slots one execution holds: a permit of the node's bound and the owner's slot. The
/// runner releases them once the work is over, just before the terminal event is recorded,
/// so whoever sees the end can start another.
pub(crate) struct Slots {
    node: Option<tokio::sync::OwnedSemaphorePermit>,
    owner: String,
    execution_id: String,
}

impl Slots {
    /// Gives both back. A failure to release the owner's slot is only logged: the next
    /// acquire drops slots whose execution has ended.
    pub(crate) async fn release(self, agents: &Agents) {
        drop(self.node);
        if agents.inner.config.max_executions_per_owner == 0 {
            return;
        }
        let call = IndexCall::Release(self.execution_id.clone());
        if let Err(e) = agents
            .inner
            .sub
            .actors()
            .call::<IndexActor>(&self.owner, call)
            .await
        {
            tracing::warn!(execution = %self.execution_id, error = %e, "cannot release an execution slot; the next start reclaims it");
        }
    }
}

/// The gateway's models, as a session's prepare and follow-ups check them before anything is
/// created (the server implements it over its catalog and organizations' policies).
#[async_trait::async_trait]
pub trait ModelCatalog: Send + Sync + 'static {
    /// Whether `model` can serve a session of `org` (an organization's, or a user's when
    /// `None`) in `mode`, as the gateway would route a request with `x-kilocode-mode`.
    ///
    /// Errors: [`AgentError::ModelNotFound`] for an unknown or disallowed model; a
    /// substrate failure reading the policy.
    async fn check(&self, org: Option<Uuid>, model: &str, mode: Mode) -> Result<(), AgentError>;
}

/// Which bound on concurrent executions refused a start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusyScope {
    /// `agent.max_executions_per_owner`.
    Owner,
    /// `agent.max_executions_per_node`.
    Node,
}

impl From<SandboxError> for AgentError {
    fn from(e: SandboxError) -> Self {
        let retryable = matches!(e, SandboxError::Io(_));
        AgentError::Unavailable {
            message: e.to_string(),
            retryable,
        }
    }
}

impl From<Refusal> for AgentError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::NotFound => AgentError::NotFound,
            Refusal::InProgress(active) => AgentError::Conflict {
                message: format!("an execution is in progress: {active}"),
                active: Some(active),
            },
            other => AgentError::Conflict {
                message: other.to_string(),
                active: None,
            },
        }
    }
}

/// The Cloud Agent service. Cheap to clone.
#[derive(Clone)]
pub struct Agents {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) sub: Substrate,
    pub(crate) identity: Identity,
    pub(crate) config: AgentConfig,
    pub(crate) sandbox: Arc<dyn SandboxProvider>,
    gateway_url: OnceLock<String>,
    models: OnceLock<Arc<dyn ModelCatalog>>,
    pub(crate) http: reqwest::Client,
    /// Executions running on this node: execution id → (session id, interrupt token).
    running: Mutex<HashMap<String, (String, CancellationToken)>>,
    /// One permit per execution this node may run (`max_executions_per_node`); `None`: no
    /// bound.
    node_slots: Option<Arc<tokio::sync::Semaphore>>,
    tasks: TaskTracker,
    pub(crate) shutting_down: CancellationToken,
    /// Bumped after every recorded batch of events: wakes local streams.
    pub(crate) events_written: tokio::sync::watch::Sender<u64>,
}

struct Janitor {
    sandbox: Arc<dyn SandboxProvider>,
}

#[async_trait::async_trait]
impl WorkspaceJanitor for Janitor {
    async fn remove_workspace(&self, meta: &SessionMeta) {
        match self
            .sandbox
            .prepare(&meta.sandbox_id, &meta.workspace_path, &meta.home_path)
            .await
        {
            Ok(mount) => {
                if let Err(e) = self.sandbox.remove(&mount).await {
                    tracing::warn!(session = %meta.session_id, error = %e, "cannot remove the workspace of an idle session");
                }
            }
            Err(e) => {
                tracing::warn!(session = %meta.session_id, error = %e, "cannot reach the workspace of an idle session")
            }
        }
    }
}

impl Agents {
    /// Registers the session and index actors and the callback queue on `sub` (before
    /// [`Substrate::start`]), with sandboxes under `sandbox_root` unless the config names a
    /// root. Call [`Agents::start`] after the substrate started.
    ///
    /// Errors: [`AgentError::Unavailable`] when the configured provider is refused (the
    /// `process` provider without `allow_unsandboxed`).
    pub fn new(
        sub: &Substrate,
        identity: Identity,
        config: AgentConfig,
        sandbox_root: PathBuf,
    ) -> Result<Self, AgentError> {
        let root = if config.sandbox.root.as_os_str().is_empty() {
            sandbox_root
        } else {
            config.sandbox.root.clone()
        };
        let sandbox = crate::sandbox::provider(&config.sandbox, root)?;
        Ok(Self::with_sandbox(sub, identity, config, sandbox))
    }

    /// As [`Agents::new`] with a given provider.
    pub fn with_sandbox(
        sub: &Substrate,
        identity: Identity,
        config: AgentConfig,
        sandbox: Arc<dyn SandboxProvider>,
    ) -> Self {
        sub.actors().register(SessionActor {
            substrate: sub.clone(),
            janitor: Arc::new(Janitor {
                sandbox: sandbox.clone(),
            }),
        });
        sub.actors().register(IndexActor { sub: sub.clone() });
        let queue = QueueConfig {
            max_attempts: 5,
            retry_base_ms: 60_000,
            visibility_timeout_ms: 60_000,
            batch_size: 5,
            ..QueueConfig::new(CALLBACK_QUEUE)
        };
        sub.queues()
            .declare(queue)
            .expect("the callback queue's settings are valid");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client builds");
        let node_slots = (config.max_executions_per_node > 0).then(|| {
            Arc::new(tokio::sync::Semaphore::new(
                config.max_executions_per_node as usize,
            ))
        });
        Self {
            inner: Arc::new(Inner {
                sub: sub.clone(),
                identity,
                node_slots,
                config,
                sandbox,
                gateway_url: OnceLock::new(),
                models: OnceLock::new(),
                http,
                running: Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
                shutting_down: CancellationToken::new(),
                events_written: tokio::sync::watch::channel(0).0,
            }),
        }
    }

    /// Starts the callback consumer (after [`Substrate::start`]).
    pub fn start(&self) {
        let consumer = crate::callback::CallbackConsumer::new(
            self.inner.identity.clone(),
            self.inner.config.allow_private_callbacks,
        );
        self.inner
            .sub
            .start_consumer(CALLBACK_QUEUE, Arc::new(consumer));
    }

    /// Sets the base URL of this server (for the agent's gateway calls) unless
    /// `agent.gateway_url` is configured. Only the first call counts.
    pub fn set_server_url(&self, url: &str) {
        let _ = self.inner.gateway_url.set(url.to_owned());
    }

    /// Sets the catalog that prepare and follow-ups check models against. Only the first call
    /// counts; without one, models are checked at the first model call.
    pub fn set_model_catalog(&self, models: Arc<dyn ModelCatalog>) {
        let _ = self.inner.models.set(models);
    }

    async fn check_model_exists(
        &self,
        org: Option<Uuid>,
        model: &str,
        mode: Mode,
    ) -> Result<(), AgentError> {
        match self.inner.models.get() {
            Some(models) => models.check(org, model, mode).await,
            None => Ok(()),
        }
    }

    pub(crate) fn gateway_url(&self) -> String {
        if !self.inner.config.gateway_url.is_empty() {
            return self.inner.config.gateway_url.clone();
        }
        self.inner
            .gateway_url
            .get()
            .cloned()
            .unwrap_or_else(|| "http://127.0.0.1:8787".into())
    }

    /// The sandbox provider.
    pub fn sandbox(&self) -> &Arc<dyn SandboxProvider> {
        &self.inner.sandbox
    }

    /// A receiver that changes whenever this node records events (for live streams).
    pub fn event_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.events_written.subscribe()
    }

    /// Begins shutdown: refuses new executions, interrupts those running on this node, and
    /// ends live streams. Idempotent.
    pub fn stop(&self) {
        self.inner.shutting_down.cancel();
    }

    /// Completes when [`Agents::stop`] has been called.
    pub async fn stopped(&self) {
        self.inner.shutting_down.cancelled().await;
    }

    /// [`Agents::stop`], then waits (at most `grace`) for the interrupted executions to record
    /// their end. Returns whether all did.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.stop();
        self.inner.tasks.close();
        tokio::time::timeout(grace, self.inner.tasks.wait())
            .await
            .is_ok()
    }

    pub(crate) async fn call(
        &self,
        key: &str,
        call: SessionCall,
    ) -> kilocloud_substrate::Result<Result<SessionReply, Refusal>> {
        self.inner
            .sub
            .actors()
            .call::<SessionActor>(key, call)
            .await
    }

    /// Prepares a session: validates the input, creates the workspace and home in the
    /// sandbox, clones the repository onto the working branch, runs the setup commands, and
    /// stores the session (reference §3 "prepareSession flow").
    ///
    /// Errors: [`AgentError::Invalid`] for input out of bounds; [`AgentError::ModelNotFound`]
    /// for a model the gateway cannot serve (checked before anything is created);
    /// [`AgentError::RepositoryNotFound`] and [`AgentError::BranchNotFound`] when the remote
    /// lacks them; [`AgentError::Unavailable`] when the sandbox or the clone fails otherwise
    /// (retryable) or the sandbox cannot work here (not retryable; the message says how to fix
    /// it); [`AgentError::SetupFailed`] when a setup command fails.
    pub async fn prepare(
        &self,
        caller: Caller,
        req: PrepareRequest,
    ) -> Result<Prepared, AgentError> {
        let inner = &self.inner;
        validate(&req, &inner.config)?;
        let model = req
            .model
            .clone()
            .unwrap_or_else(|| inner.config.default_model.clone());
        self.check_model_exists(caller.org, &model, req.mode.unwrap_or_default())
            .await?;
        let repo = inner
            .config
            .git
            .remote_url(req.github_repo.as_deref(), req.git_url.as_deref())
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        let session_id = ids::new_session_id();
        let sandbox_id = ids::sandbox_id(
            caller.org,
            caller.user,
            caller.bot,
            inner.config.sandbox.policy,
            &session_id,
        );
        let (branch, upstream) = match &req.upstream_branch {
            Some(b) => (b.clone(), true),
            None => (ids::session_branch(&session_id), false),
        };
        let workspace = ids::workspace_path(caller.org, caller.user, &session_id);
        let home = ids::home_path(&session_id);
        inner.sandbox.check().await?;
        let mount = inner
            .sandbox
            .prepare(&sandbox_id, &workspace, &home)
            .await?;
        let result = self
            .prepare_workspace(&mount, &repo, &req, &branch, upstream)
            .await;
        if let Err(e) = result {
            if let Err(cleanup) = inner.sandbox.remove(&mount).await {
                tracing::warn!(session = %session_id, error = %cleanup, "cannot clean up after a failed prepare");
            }
            return Err(e);
        }
        let owner = caller.owner();
        let seal = |name: &str, value: &[u8]| {
            inner
                .identity
                .seal(value, &SessionMeta::seal_context(&owner, &session_id, name))
        };
        let callback = req.callback_target.as_ref().map(|t| SealedCallback {
            url: t.url.clone(),
            headers: (!t.headers.is_empty()).then(|| {
                seal(
                    "callbackHeaders",
                    &serde_json::to_vec(&t.headers).expect("a map serializes"),
                )
            }),
        });
        let meta = SessionMeta {
            session_id: session_id.clone(),
            user_id: caller.user,
            org_id: caller.org,
            bot_id: caller.bot,
            repo: repo.clone(),
            git_token: req
                .git_token
                .as_deref()
                .map(|t| seal("gitToken", t.as_bytes())),
            branch: branch.clone(),
            upstream_branch: upstream,
            env_vars: req.env_vars.clone(),
            secrets: req
                .secrets
                .iter()
                .map(|(k, v)| (k.clone(), seal(&format!("secret/{k}"), v.as_bytes())))
                .collect(),
            setup_commands: req.setup_commands.clone(),
            mode: req.mode.unwrap_or_default(),
            model,
            prompt: req.prompt.clone(),
            auto_commit: req.auto_commit,
            callback,
            notify: req.notify.clone(),
            sandbox_id: sandbox_id.clone(),
            workspace_path: workspace.clone(),
            home_path: home,
            prepared_at: inner.sub.clock().now_ms(),
            initiated_at: None,
            last_branch: None,
        };
        let summary = SessionSummary {
            session_id: session_id.clone(),
            user_id: caller.user,
            repo,
            title: req.prompt.chars().take(100).collect(),
            created_at: meta.prepared_at,
        };
        // The index entry first: a crash before the session commits leaves an entry that
        // reads as absent, never a session that cannot be listed.
        inner
            .sub
            .actors()
            .call::<IndexActor>(&owner, IndexCall::Add(summary))
            .await?;
        let key = ids::actor_key(caller.user, &session_id);
        self.call(&key, SessionCall::Prepare(Box::new(meta)))
            .await??;
        Ok(Prepared {
            session_id,
            sandbox_id,
            branch,
            workspace_path: workspace,
        })
    }

    async fn prepare_workspace(
        &self,
        mount: &SessionMount,
        repo: &str,
        req: &PrepareRequest,
        branch: &str,
        upstream: bool,
    ) -> Result<(), AgentError> {
        let inner = &self.inner;
        inner
            .config
            .git
            .clone(
                repo,
                req.git_token.as_deref(),
                &mount.host_workspace,
                branch,
                upstream,
            )
            .await
            .map_err(|e| match e {
                GitError::BadRemote(m) => AgentError::Invalid(m),
                GitError::RepositoryNotFound => AgentError::RepositoryNotFound(format!(
                    "repository {repo} does not exist, or the token cannot read it"
                )),
                GitError::BranchNotFound => AgentError::BranchNotFound(format!(
                    "upstreamBranch `{branch}` does not exist in {repo}"
                )),
                other => AgentError::Unavailable {
                    message: format!("cannot clone the repository: {other}"),
                    retryable: true,
                },
            })?;
        inner.sandbox.adopt_host_writes(mount).await?;
        let env: Vec<(String, String)> = req
            .env_vars
            .iter()
            .chain(req.secrets.iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for command in &req.setup_commands {
            let request = ExecRequest {
                env: env.clone(),
                ..ExecRequest::shell(
                    command,
                    Duration::from_millis(inner.config.setup_timeout_ms),
                    16 * 1024,
                )
            };
            let out = inner
                .sandbox
                .exec(mount, request, &CancellationToken::new())
                .await?;
            if !out.success() {
                let text = out.combined_text();
                let tail: String = text
                    .chars()
                    .rev()
                    .take(2000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                return Err(AgentError::SetupFailed(format!(
                    "setup command `{command}` failed: {tail}"
                )));
            }
        }
        Ok(())
    }

    /// Finds the caller's session: its actor key and metadata. Another owner's session, or a
    /// session of the same user in another scope, is [`AgentError::NotFound`].
    pub async fn locate(
        &self,
        caller: Caller,
        session_id: &str,
    ) -> Result<(String, SessionMeta), AgentError> {
        if !ids::is_session_id(session_id) {
            return Err(AgentError::NotFound);
        }
        let inner = &self.inner;
        let mut user = caller.user;
        if caller.org.is_some() {
            // Any member of the organization may reach its sessions: the index says whose.
            let entry: Option<SessionSummary> = inner
                .sub
                .actor_read(INDEX_ACTOR, &caller.owner(), &format!("s/{session_id}"))
                .await?;
            user = entry.ok_or(AgentError::NotFound)?.user_id;
        }
        let key = ids::actor_key(user, session_id);
        let meta: SessionMeta = inner
            .sub
            .actor_read(SESSION_ACTOR, &key, "meta")
            .await?
            .ok_or(AgentError::NotFound)?;
        if meta.org_id != caller.org {
            return Err(AgentError::NotFound);
        }
        Ok((key, meta))
    }

    /// Starts the session's first execution with its prepared prompt, mode and model.
    ///
    /// Errors: [`AgentError::NotFound`]; [`AgentError::Conflict`] when already initiated or
    /// an execution is active (with its id); [`AgentError::Unavailable`] when the sandbox
    /// cannot work here.
    pub async fn initiate(&self, caller: Caller, session_id: &str) -> Result<Started, AgentError> {
        let (key, meta) = self.locate(caller, session_id).await?;
        let exec = self.new_execution(&meta, false, meta.prompt.clone(), None, None, None);
        self.launch(key, meta, exec).await
    }

    /// Starts a follow-up execution that continues the conversation.
    ///
    /// Errors: as [`Agents::initiate`], plus [`AgentError::Invalid`] for an empty or too
    /// long prompt, [`AgentError::ModelNotFound`] for a model or mode the gateway cannot
    /// serve, and [`AgentError::Conflict`] before initiate.
    pub async fn send(
        &self,
        caller: Caller,
        session_id: &str,
        msg: FollowUp,
    ) -> Result<Started, AgentError> {
        check_prompt(&msg.prompt)?;
        if let Some(model) = &msg.model {
            check_model(model)?;
        }
        let (key, meta) = self.locate(caller, session_id).await?;
        if msg.model.is_some() || msg.mode.is_some() {
            let model = msg.model.as_deref().unwrap_or(&meta.model);
            self.check_model_exists(meta.org_id, model, msg.mode.unwrap_or(meta.mode))
                .await?;
        }
        let exec = self.new_execution(
            &meta,
            true,
            msg.prompt,
            msg.mode,
            msg.model,
            msg.auto_commit,
        );
        self.launch(key, meta, exec).await
    }

    fn new_execution(
        &self,
        meta: &SessionMeta,
        followup: bool,
        prompt: String,
        mode: Option<Mode>,
        model: Option<String>,
        auto_commit: Option<bool>,
    ) -> Execution {
        Execution {
            execution_id: ids::new_execution_id(),
            status: ExecStatus::Pending,
            followup,
            prompt,
            mode: mode.unwrap_or(meta.mode),
            model: model.unwrap_or_else(|| meta.model.clone()),
            auto_commit: auto_commit.unwrap_or(meta.auto_commit),
            created_at: self.inner.sub.clock().now_ms(),
            started_at: None,
            completed_at: None,
            last_heartbeat: None,
            error: None,
            exit_code: None,
            summary: None,
        }
    }

    async fn launch(
        &self,
        key: String,
        meta: SessionMeta,
        exec: Execution,
    ) -> Result<Started, AgentError> {
        let inner = &self.inner;
        if inner.shutting_down.is_cancelled() {
            return Err(AgentError::Unavailable {
                message: "the server is shutting down".into(),
                retryable: true,
            });
        }
        inner.sandbox.check().await?;
        let execution_id = exec.execution_id.clone();
        let node_slot = match &inner.node_slots {
            None => None,
            Some(slots) => Some(slots.clone().try_acquire_owned().map_err(|_| {
                AgentError::Busy {
                    message: format!(
                        "this node already runs {} executions (agent.max_executions_per_node); \
                         retry shortly",
                        inner.config.max_executions_per_node
                    ),
                    scope: BusyScope::Node,
                }
            })?),
        };
        let owner = meta.owner();
        self.acquire_owner_slot(&owner, &key, &execution_id).await?;
        let slots = Slots {
            node: node_slot,
            owner,
            execution_id: execution_id.clone(),
        };
        let refused: Option<AgentError> = match self
            .call(&key, SessionCall::Start(Box::new(exec.clone())))
            .await
        {
            Ok(Ok(_)) => None,
            Ok(Err(refusal)) => Some(refusal.into()),
            Err(e) => Some(e.into()),
        };
        if let Some(e) = refused {
            slots.release(self).await;
            return Err(e);
        }
        let cancel = CancellationToken::new();
        inner.running.lock().expect("running map").insert(
            execution_id.clone(),
            (meta.session_id.clone(), cancel.clone()),
        );
        let agents = self.clone();
        let session_id = meta.session_id.clone();
        inner.tasks.spawn(async move {
            let id = exec.execution_id.clone();
            crate::runner::run(agents.clone(), meta, exec, cancel, slots).await;
            agents
                .inner
                .running
                .lock()
                .expect("running map")
                .remove(&id);
        });
        Ok(Started {
            stream_url: format!("/api/sessions/{session_id}/stream"),
            session_id,
            execution_id,
            status: "started".into(),
        })
    }

    /// Takes one of the owner's execution slots for `execution_id` (of the session at actor key
    /// `session_key`) unless `max_executions_per_owner` are taken.
    ///
    /// Errors: [`AgentError::Busy`] ([`BusyScope::Owner`]) at the bound; substrate failures.
    async fn acquire_owner_slot(
        &self,
        owner: &str,
        session_key: &str,
        execution_id: &str,
    ) -> Result<(), AgentError> {
        let max = self.inner.config.max_executions_per_owner;
        if max == 0 {
            return Ok(());
        }
        let slot = RunSlot {
            session_key: session_key.to_owned(),
            since: self.inner.sub.clock().now_ms(),
        };
        let call = IndexCall::Acquire {
            execution_id: execution_id.to_owned(),
            slot,
            max,
        };
        match self
            .inner
            .sub
            .actors()
            .call::<IndexActor>(owner, call)
            .await?
        {
            true => Ok(()),
            false => Err(AgentError::Busy {
                message: format!(
                    "{max} executions of this owner are already running \
                     (agent.max_executions_per_owner); wait for one to end or interrupt one"
                ),
                scope: BusyScope::Owner,
            }),
        }
    }

    /// Asks the active execution to stop: at once when it runs on this node, within a second
    /// on another. Returns its id.
    ///
    /// Errors: [`AgentError::NotFound`]; [`AgentError::Conflict`] when nothing is running.
    pub async fn interrupt(&self, caller: Caller, session_id: &str) -> Result<String, AgentError> {
        let (key, _) = self.locate(caller, session_id).await?;
        match self.call(&key, SessionCall::Interrupt).await?? {
            SessionReply::Interrupting(id) => {
                if let Some((_, token)) = self.inner.running.lock().expect("running map").get(&id) {
                    token.cancel();
                }
                Ok(id)
            }
            other => Err(AgentError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// The session with its executions; secrets as a count.
    pub async fn get(&self, caller: Caller, session_id: &str) -> Result<SessionView, AgentError> {
        let (key, _) = self.locate(caller, session_id).await?;
        self.view(&key).await
    }

    /// Reads executions, then the active id, then the metadata: a transition commits all three
    /// together, so a terminal execution is never shown beside stale metadata.
    async fn view(&self, key: &str) -> Result<SessionView, AgentError> {
        let sub = &self.inner.sub;
        let mut executions: Vec<Execution> = sub
            .actor_scan::<Execution>(SESSION_ACTOR, key, "exec/", "", u32::MAX)
            .await?
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        executions.sort_by_key(|e| e.created_at);
        let active: Option<String> = sub.actor_read(SESSION_ACTOR, key, "active").await?;
        let meta: SessionMeta = sub
            .actor_read(SESSION_ACTOR, key, "meta")
            .await?
            .ok_or(AgentError::NotFound)?;
        Ok(SessionView {
            session_id: meta.session_id,
            user_id: meta.user_id,
            org_id: meta.org_id,
            repo: meta.repo,
            branch: meta.branch,
            last_branch: meta.last_branch,
            mode: meta.mode,
            model: meta.model,
            prompt: meta.prompt,
            auto_commit: meta.auto_commit,
            env_vars: meta.env_vars,
            secret_count: meta.secrets.len(),
            has_git_token: meta.git_token.is_some(),
            setup_commands: meta.setup_commands,
            callback_url: meta.callback.map(|c| c.url),
            sandbox_id: meta.sandbox_id,
            workspace_path: meta.workspace_path,
            prepared_at: meta.prepared_at,
            initiated_at: meta.initiated_at,
            active_execution_id: active,
            executions,
        })
    }

    /// The caller's sessions (the organization's, in an organization scope), newest first.
    pub async fn list(&self, caller: Caller) -> Result<Vec<SessionSummary>, AgentError> {
        let sub = &self.inner.sub;
        let entries = sub
            .actor_scan::<SessionSummary>(INDEX_ACTOR, &caller.owner(), "s/", "", u32::MAX)
            .await?;
        let mut sessions = Vec::with_capacity(entries.len());
        for (_, entry) in entries {
            // An entry whose session never committed (or was deleted) reads as absent.
            let key = ids::actor_key(entry.user_id, &entry.session_id);
            if sub
                .actor_read::<Value>(SESSION_ACTOR, &key, "meta")
                .await?
                .is_some()
            {
                sessions.push(entry);
            }
        }
        sessions.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        Ok(sessions)
    }

    /// Deletes the session: stops its execution on this node, removes its state, its
    /// workspace and home, and its index entry.
    pub async fn delete(&self, caller: Caller, session_id: &str) -> Result<(), AgentError> {
        let (key, _) = self.locate(caller, session_id).await?;
        let reply = self.call(&key, SessionCall::Delete).await??;
        if let SessionReply::Deleted(Some(meta)) = reply {
            // A runner on another node finds the session gone at its next event and stops.
            for (session, token) in self.inner.running.lock().expect("running map").values() {
                if session == session_id {
                    token.cancel();
                }
            }
            Janitor {
                sandbox: self.inner.sandbox.clone(),
            }
            .remove_workspace(&meta)
            .await;
        }
        self.inner
            .sub
            .actors()
            .call::<IndexActor>(&caller.owner(), IndexCall::Remove(session_id.to_owned()))
            .await?;
        Ok(())
    }

    /// Events of the session after `after`, matching `filter`, at most `max_bytes` of JSON
    /// (at least one event when any is left). Returns the events and the last id read (to
    /// continue from, even when the filter dropped them).
    pub async fn events(
        &self,
        key: &str,
        session_id: &str,
        after: u64,
        filter: &EventFilter,
        max_bytes: usize,
    ) -> Result<(Vec<EventFrame>, u64), AgentError> {
        const PAGE: u32 = 256;
        let mut frames = Vec::new();
        let mut bytes = 0usize;
        let mut cursor = after;
        loop {
            let from = if cursor == 0 {
                String::new()
            } else {
                crate::session::event_key(cursor)
            };
            let page = self
                .inner
                .sub
                .actor_scan::<StoredEvent>(SESSION_ACTOR, key, "ev/", &from, PAGE)
                .await?;
            let full = page.len() == PAGE as usize;
            for (k, e) in page {
                let id = crate::session::event_id(&k).unwrap_or(cursor);
                if filter.matches(&e) {
                    let frame = frame(session_id, id, e);
                    let size = serde_json::to_vec(&frame).map(|v| v.len()).unwrap_or(0);
                    if !frames.is_empty() && bytes + size > max_bytes {
                        return Ok((frames, cursor));
                    }
                    bytes += size;
                    frames.push(frame);
                }
                cursor = id;
            }
            if !full {
                return Ok((frames, cursor));
            }
        }
    }

    /// The session and its compacted history.
    pub async fn export(
        &self,
        caller: Caller,
        session_id: &str,
    ) -> Result<SessionExport, AgentError> {
        let (key, _) = self.locate(caller, session_id).await?;
        let sub = &self.inner.sub;
        let items = sub
            .actor_scan::<Value>(SESSION_ACTOR, &key, "item/", "", u32::MAX)
            .await?
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("item/").to_owned(), v))
            .collect();
        let next: u64 = sub
            .actor_read(SESSION_ACTOR, &key, "next_event")
            .await?
            .unwrap_or(1);
        Ok(SessionExport {
            session: self.view(&key).await?,
            items,
            event_count: next - 1,
        })
    }

    /// Opens one of the session's sealed values.
    pub(crate) fn open_secret(
        &self,
        meta: &SessionMeta,
        name: &str,
        sealed: Option<&Envelope>,
    ) -> Result<Option<String>, HarnessError> {
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let context = SessionMeta::seal_context(&meta.owner(), &meta.session_id, name);
        let bytes = self
            .inner
            .identity
            .open(sealed, &context)
            .map_err(|e| HarnessError(format!("cannot decrypt the session's {name}: {e}")))?;
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// The mask of the session's secret values (its secrets and git token). A value that
    /// cannot be opened is left out: the execution fails on it anyway when it builds the
    /// environment.
    pub(crate) fn secret_mask(&self, meta: &SessionMeta) -> crate::mask::SecretMask {
        let mut values = Vec::new();
        for (name, sealed) in &meta.secrets {
            if let Ok(Some(v)) = self.open_secret(meta, &format!("secret/{name}"), Some(sealed)) {
                values.push(v);
            }
        }
        if let Ok(Some(token)) = self.open_secret(meta, "gitToken", meta.git_token.as_ref()) {
            values.push(token);
        }
        crate::mask::SecretMask::new(values)
    }

    /// The environment of the session's commands: user variables and secrets, then the
    /// reserved values, which win.
    pub(crate) fn session_env(
        &self,
        meta: &SessionMeta,
    ) -> Result<Vec<(String, String)>, HarnessError> {
        let mut env: BTreeMap<String, String> = meta.env_vars.clone();
        for (name, sealed) in &meta.secrets {
            if let Some(value) = self.open_secret(meta, &format!("secret/{name}"), Some(sealed))? {
                env.insert(name.clone(), value);
            }
        }
        env.insert("SESSION_ID".into(), meta.session_id.clone());
        env.insert("SESSION_HOME".into(), meta.home_path.clone());
        env.insert("KILO_PLATFORM".into(), "cloud-agent".into());
        env.insert("KILOCODE_FEATURE".into(), "cloud-agent".into());
        Ok(env.into_iter().collect())
    }
}

fn frame(session_id: &str, id: u64, e: StoredEvent) -> EventFrame {
    let timestamp = chrono::DateTime::from_timestamp_millis(e.ts)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    EventFrame {
        event_id: id,
        execution_id: e.e,
        session_id: session_id.to_owned(),
        stream_event_type: e.t,
        timestamp,
        data: e.d,
    }
}

fn check_prompt(prompt: &str) -> Result<(), AgentError> {
    let chars = prompt.chars().count();
    if prompt.trim().is_empty() || chars > limits::PROMPT_CHARS {
        return Err(AgentError::Invalid(format!(
            "prompt must be 1–{} characters (got {chars})",
            limits::PROMPT_CHARS
        )));
    }
    Ok(())
}

fn check_model(model: &str) -> Result<(), AgentError> {
    if model.is_empty() || model.len() > 200 || model.chars().any(char::is_whitespace) {
        return Err(AgentError::Invalid(
            "model must be a model id such as `kilo/auto`".into(),
        ));
    }
    Ok(())
}

fn env_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn validate(req: &PrepareRequest, config: &AgentConfig) -> Result<(), AgentError> {
    let bad = |m: String| Err(AgentError::Invalid(m));
    check_prompt(&req.prompt)?;
    if let Some(model) = &req.model {
        check_model(model)?;
    }
    if req.env_vars.len() > limits::ENV_VARS {
        return bad(format!("at most {} envVars", limits::ENV_VARS));
    }
    if req.secrets.len() > limits::SECRETS {
        return bad(format!("at most {} secrets", limits::SECRETS));
    }
    for (name, value) in &req.env_vars {
        if !env_name_ok(name)
            || name.len() > limits::ENV_CHARS
            || value.chars().count() > limits::ENV_CHARS
        {
            return bad(format!(
                "envVars `{name}`: names are [A-Za-z_][A-Za-z0-9_]*, names and values at most {} characters",
                limits::ENV_CHARS
            ));
        }
    }
    for name in req.secrets.keys() {
        if !env_name_ok(name) || name.len() > limits::SECRET_NAME_CHARS {
            return bad(format!(
                "secrets `{name}`: names are [A-Za-z_][A-Za-z0-9_]* of at most {} characters",
                limits::SECRET_NAME_CHARS
            ));
        }
        if req.env_vars.contains_key(name) {
            return bad(format!("`{name}` is both an envVar and a secret"));
        }
    }
    for name in req.env_vars.keys().chain(req.secrets.keys()) {
        if RESERVED_ENV.contains(&name.as_str()) {
            return bad(format!(
                "`{name}` is set by the platform and cannot be overridden"
            ));
        }
    }
    if req.setup_commands.len() > limits::SETUP_COMMANDS {
        return bad(format!("at most {} setupCommands", limits::SETUP_COMMANDS));
    }
    if let Some(c) = req
        .setup_commands
        .iter()
        .find(|c| c.trim().is_empty() || c.chars().count() > limits::SETUP_COMMAND_CHARS)
    {
        return bad(format!(
            "setup command `{}…` must be 1–{} characters",
            c.chars().take(40).collect::<String>(),
            limits::SETUP_COMMAND_CHARS
        ));
    }
    if let Some(branch) = &req.upstream_branch
        && !ids::valid_branch(branch)
    {
        return bad(format!(
            "upstreamBranch `{branch}` is not a valid branch name"
        ));
    }
    if let Some(token) = &req.git_token
        && (token.is_empty() || token.len() > 4096 || token.chars().any(char::is_control))
    {
        return bad("gitToken must be 1–4096 printable characters".into());
    }
    if let Some(target) = &req.callback_target {
        let url = url::Url::parse(&target.url)
            .map_err(|e| AgentError::Invalid(format!("callbackTarget.url: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return bad("callbackTarget.url must be http or https".into());
        }
        if !config.allow_private_callbacks && kilocloud_identity::net::private_url(&target.url) {
            return bad(
                "callbackTarget.url must not point at a loopback, private or link-local \
                 address (the operator can allow them with agent.allow_private_callbacks)"
                    .into(),
            );
        }
        if target.headers.len() > limits::CALLBACK_HEADERS {
            return bad(format!(
                "at most {} callback headers",
                limits::CALLBACK_HEADERS
            ));
        }
        for (name, value) in &target.headers {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                || reqwest::header::HeaderValue::from_str(value).is_err()
            {
                return bad(format!(
                    "callback header `{name}` is not a valid HTTP header"
                ));
            }
        }
    }
    Ok(())
}

/// Removes everything inside `dir`, keeping `dir`.
pub(crate) async fn empty_dir(dir: &Path) -> std::io::Result<()> {
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        let path = entry.path();
        if entry.file_type().await?.is_dir() {
            tokio::fs::remove_dir_all(&path).await?;
        } else {
            tokio::fs::remove_file(&path).await?;
        }
    }
    Ok(())
}

/// The per-owner index of sessions (`agent_index`, key `user:<id>` or `org:<id>`), entries
/// `s/<sessionId>` ([`SessionSummary`]), and the owner's execution slots `run/<executionId>`
/// ([`RunSlot`]). Both are supersets: an entry whose session is gone reads as absent, and a
/// slot whose execution has ended (its release was lost with its node) is dropped by the next
/// acquire.
pub const INDEX_ACTOR: &str = "agent_index";

/// A slot acquired before an execution's start commits may see no execution for this long,
/// ms; after it, a slot without an execution is dropped.
const SLOT_START_GRACE_MS: i64 = 60_000;

/// One of an owner's execution slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSlot {
    /// The session's actor key (`<userId>:<sessionId>`), where the execution's state is.
    pub session_key: String,
    /// When the slot was taken, ms.
    pub since: i64,
}

/// Calls of the index actor.
#[derive(Debug)]
pub enum IndexCall {
    /// Adds a session.
    Add(SessionSummary),
    /// Removes a session.
    Remove(String),
    /// Takes a slot for an execution when fewer than `max` are held by executions still
    /// pending or running; replies whether it did.
    Acquire {
        /// The execution.
        execution_id: String,
        /// Its slot.
        slot: RunSlot,
        /// The owner's bound.
        max: u32,
    },
    /// Gives an execution's slot back.
    Release(String),
}

struct IndexActor {
    /// For lock-free reads of the executions slots belong to.
    sub: Substrate,
}

impl Actor for IndexActor {
    const TYPE: &'static str = INDEX_ACTOR;
    type Call = IndexCall;
    /// Acquire: whether the slot was taken; the others: true.
    type Reply = bool;

    async fn call(
        &self,
        ctx: &mut ActorContext,
        call: IndexCall,
    ) -> kilocloud_substrate::Result<bool> {
        match call {
            IndexCall::Add(entry) => ctx.put(&format!("s/{}", entry.session_id), &entry)?,
            IndexCall::Remove(id) => ctx.delete(&format!("s/{id}")),
            IndexCall::Release(id) => ctx.delete(&format!("run/{id}")),
            IndexCall::Acquire {
                execution_id,
                slot,
                max,
            } => {
                let now = ctx.now_ms();
                let mut held = 0u32;
                for (key, taken) in ctx.list::<RunSlot>("run/").await? {
                    let id = key.trim_start_matches("run/");
                    // A point read of committed state: never a call, so no actor waits for
                    // another.
                    let exec: Option<Execution> = self
                        .sub
                        .actor_read(SESSION_ACTOR, &taken.session_key, &format!("exec/{id}"))
                        .await?;
                    let live = match exec {
                        Some(e) => !e.status.is_terminal(),
                        None => now - taken.since < SLOT_START_GRACE_MS,
                    };
                    if live {
                        held += 1;
                    } else {
                        ctx.delete(&key);
                    }
                }
                if held >= max {
                    return Ok(false);
                }
                ctx.put(&format!("run/{execution_id}"), &slot)?;
            }
        }
        Ok(true)
    }
}
