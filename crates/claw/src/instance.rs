//! The instance actor (`claw_instance`, keyed by instance id; a legacy instance by its user
//! id): the operational authority over one runtime, following the reference's
//! `KiloClawInstance` (kilo-cloud.md §2 "Lifecycle methods and state machine", "Alarm /
//! reconciliation", "Restore from Postgres"; §13.3–13.5).
//!
//! ```text
//! (none) --provision--> provisioned --start--> running --stop--> stopped --start--> running
//! any(not destroying) --destroy--> destroying --(machine and volume deletes confirmed)--> (none)
//! running --alarm: machine stopped/created--> restarted (running); 5 failed restarts, or a 404--> stopped
//! provisioned/stopped --alarm: provider says started--> running
//! ```
//!
//! Unlike the reference, which only marks a running instance stopped after 5 observations
//! (25 min) and leaves it down, a runtime found down while the instance should run is
//! restarted by the alarm that finds it; a failed restart is retried after
//! [`crate::AlarmCadence::restart_retry_ms`] (10 s), and only 5 failures in a row mark it
//! stopped. A provider that watches its machines (`local`) reports a runtime that went down
//! ([`InstanceCall::MachineDown`]), which moves the alarm to now.
//!
//! Provider calls run inside the actor's call, one operation at a time per instance, but
//! without its database session ([`ActorContext::suspend_while`]: on PostgreSQL its
//! connection and lock go back while the provider answers); an
//! external effect is persisted with [`ActorContext::checkpoint`] before the next is awaited
//! (the machine id right after create, pending-destroy ids before deleting), so a crash or
//! an error never loses track of a machine or volume, and nothing is created twice after a
//! transient error: only a 404 allows re-creation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kilocloud_identity::envelope::Envelope;
use kilocloud_substrate::{Actor, ActorContext, AlarmInfo, Result, UnixMs};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ClawError;
use crate::app::{AppActor, AppCall};
use crate::crypto;
use crate::provider::{Guest, MOUNT_PATH, Machine, MachineSpec, Mount, ProviderError, VolumeSpec};

/// Storage key of the state.
const STATE: &str = "state";
/// Consecutive failed restarts of a running instance whose machine is down before it is
/// marked stopped (the reference's self-heal threshold, 5, counted over restarts).
pub const SELF_HEAL_THRESHOLD: u32 = 5;
/// Metadata recovery is attempted at most this often, ms (reference: 30 min).
pub const METADATA_RECOVERY_COOLDOWN_MS: i64 = 30 * 60 * 1000;
/// Metadata key naming the instance's user.
pub const META_USER: &str = "kiloclaw_user_id";
/// Metadata key naming the instance's owner (`user:<uuid>` / `org:<uuid>`).
pub const META_OWNER: &str = "kiloclaw_owner";
/// Metadata key naming the instance's sandbox.
pub const META_SANDBOX: &str = "kiloclaw_sandbox_id";
/// Env names whose values are always sent encrypted (reference §2, "sensitive set").
const SENSITIVE: &[&str] = &[
    "KILOCODE_API_KEY",
    "OPENCLAW_GATEWAY_TOKEN",
    "TELEGRAM_BOT_TOKEN",
    "DISCORD_BOT_TOKEN",
    "SLACK_BOT_TOKEN",
    "SLACK_APP_TOKEN",
];

/// Lifecycle status; no status means the instance does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Has a volume, no machine started yet.
    Provisioned,
    /// The machine runs (as far as the last observation knows).
    Running,
    /// The machine is stopped (or gone).
    Stopped,
    /// Being destroyed: pending deletes are retried every minute; the proxy answers 409.
    Destroying,
}

/// Messaging channel tokens, each sealed with the master key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Channels {
    /// Telegram bot token.
    pub telegram_bot_token: Option<Envelope>,
    /// Discord bot token.
    pub discord_bot_token: Option<Envelope>,
    /// Slack bot token.
    pub slack_bot_token: Option<Envelope>,
    /// Slack app token.
    pub slack_app_token: Option<Envelope>,
}

impl Channels {
    fn entries(&self) -> [(&'static str, &Option<Envelope>); 4] {
        [
            ("TELEGRAM_BOT_TOKEN", &self.telegram_bot_token),
            ("DISCORD_BOT_TOKEN", &self.discord_bot_token),
            ("SLACK_BOT_TOKEN", &self.slack_bot_token),
            ("SLACK_APP_TOKEN", &self.slack_app_token),
        ]
    }

    /// How many channels are configured.
    pub fn count(&self) -> usize {
        self.entries().iter().filter(|(_, v)| v.is_some()).count()
    }
}

/// A model offered to the runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// Model id, e.g. `kilocode/anthropic/claude-sonnet-4.5`.
    pub id: String,
    /// Display name.
    pub name: String,
}

/// An instance's configuration. Secret values are sealed with the master key (context
/// `claw/<sandbox id>/<name>`), opened only to build the machine's env.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct InstanceConfig {
    /// Plain env variables.
    pub env_vars: BTreeMap<String, String>,
    /// Secret env variables (win over `env_vars`), sealed.
    pub encrypted_secrets: BTreeMap<String, Envelope>,
    /// The runtime's key for the model gateway, sealed.
    pub kilocode_api_key: Option<Envelope>,
    /// When that key expires, ms since epoch.
    pub kilocode_api_key_expires_at: Option<i64>,
    /// Default model (`kilocode/<provider>/<model>`).
    pub kilocode_default_model: Option<String>,
    /// Models offered.
    pub kilocode_models: Vec<ModelEntry>,
    /// Channel tokens.
    pub channels: Channels,
    /// Machine size; default [`ClawConfig::guest`].
    pub machine_size: Option<Guest>,
    /// Preferred region; default the configured list.
    pub region: Option<String>,
}

/// Everything the actor persists (one storage key). Every field has a default, so state
/// written by an older version loads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct InstanceState {
    /// Instance id (a legacy instance has none: its key is the user id).
    pub instance_id: Option<Uuid>,
    /// Owner key (`user:<uuid>` or `org:<uuid>`).
    pub owner: String,
    /// The user it was created for.
    pub user_id: Option<Uuid>,
    /// The owning organization, if any.
    pub org_id: Option<Uuid>,
    /// Sandbox id (`ki_…` or legacy base64url).
    pub sandbox_id: String,
    /// Display name.
    pub name: String,
    /// Status; `None` = does not exist.
    pub status: Option<Status>,
    /// Configuration.
    pub config: InstanceConfig,
    /// ms since epoch.
    pub provisioned_at: Option<UnixMs>,
    /// ms since epoch.
    pub last_started_at: Option<UnixMs>,
    /// ms since epoch.
    pub last_stopped_at: Option<UnixMs>,
    /// The owner's app.
    pub app_name: String,
    /// Machine id.
    pub machine_id: Option<String>,
    /// Volume id.
    pub volume_id: Option<String>,
    /// Region of the volume (and so of the machine).
    pub region: Option<String>,
    /// Consecutive failed restarts of the machine found down while running.
    pub health_check_fail_count: u32,
    /// Machine still to delete (two-phase destroy).
    pub pending_destroy_machine_id: Option<String>,
    /// Volume still to delete (two-phase destroy).
    pub pending_destroy_volume_id: Option<String>,
    /// Last metadata recovery attempt, ms since epoch.
    pub last_metadata_recovery_at: Option<UnixMs>,
}

/// Who an instance is: what provision and restore record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceIdentity {
    /// Instance id; `None` for a legacy per-user instance.
    pub instance_id: Option<Uuid>,
    /// Owner key.
    pub owner: String,
    /// The user it is for.
    pub user_id: Uuid,
    /// The owning organization.
    pub org_id: Option<Uuid>,
    /// Sandbox id.
    pub sandbox_id: String,
    /// Display name.
    pub name: String,
    /// The owner's app.
    pub app_name: String,
}

/// A call on an instance.
#[derive(Debug)]
pub enum InstanceCall {
    /// Creates the instance (app, volume) or rewrites its configuration; refused while
    /// destroying. Re-provisioning keeps the status.
    Provision(InstanceIdentity, Box<InstanceConfig>),
    /// Rebuilds an instance whose state was lost from its registry row, then looks for its
    /// machine and volume by metadata. The configuration is not recovered.
    Restore(InstanceIdentity),
    /// Starts (creating the machine when needed).
    Start,
    /// Starts the instance again because its runtime on this machine did not answer, only
    /// while it is still running on that machine: a stop or a replacement since then wins
    /// (the reply's state shows which).
    Recover(String),
    /// Stops the machine.
    Stop,
    /// Stops, rebuilds the env and config, and starts again. Only when running.
    Restart,
    /// Two-phase destroy; replies whether everything is already gone.
    Destroy,
    /// Replaces parts of the configuration (the change applies at the next start).
    Configure(Box<ConfigPatch>),
    /// Runs a command in the machine. Only when running.
    Exec(Vec<String>),
    /// The provider saw the runtime on this machine go down: when the instance is running
    /// on it, its reconciliation alarm is moved to now (which restarts it). Otherwise
    /// nothing happens, and nothing is written.
    MachineDown(String),
}

/// A configuration change: `None` leaves a field alone; `Some(None)` clears it.
#[derive(Debug, Default)]
pub struct ConfigPatch {
    /// API key (sealed) and its expiry.
    pub kilocode_api_key: Option<Option<(Envelope, Option<i64>)>>,
    /// Default model.
    pub kilocode_default_model: Option<Option<String>>,
    /// Models offered.
    pub kilocode_models: Option<Vec<ModelEntry>>,
    /// Channel tokens by env name (`TELEGRAM_BOT_TOKEN`, ...): sealed value or `None` to
    /// delete (merge semantics).
    pub channels: BTreeMap<String, Option<Envelope>>,
}

/// A call's reply.
#[derive(Debug, Clone, PartialEq)]
pub enum InstanceReply {
    /// The state after the call.
    State(Box<InstanceState>),
    /// Destroy: whether the machine and volume are both confirmed gone.
    Destroyed {
        /// Both deletes confirmed; the actor is empty.
        complete: bool,
    },
    /// Exec output.
    Exec(crate::provider::ExecOutput),
}

/// The actor type.
pub struct InstanceActor {
    pub(crate) shared: Arc<crate::Shared>,
}

type Outcome = std::result::Result<InstanceReply, ClawError>;

impl Actor for InstanceActor {
    const TYPE: &'static str = "claw_instance";
    const SUSPENDS: bool = true;
    type Call = InstanceCall;
    type Reply = Outcome;

    async fn call(&self, ctx: &mut ActorContext, call: InstanceCall) -> Result<Outcome> {
        let mut state: InstanceState = ctx.get(STATE).await?.unwrap_or_default();
        if let InstanceCall::MachineDown(machine) = &call {
            if state.status == Some(Status::Running)
                && state.machine_id.as_deref() == Some(machine.as_str())
            {
                tracing::warn!(sandbox = %state.sandbox_id, %machine, "the runtime went down: reconciling now");
                ctx.set_alarm(ctx.now_ms());
            }
            return Ok(Ok(InstanceReply::State(Box::new(state))));
        }
        let mut op = Op {
            ctx,
            s: &self.shared,
        };
        let result = match call {
            InstanceCall::Provision(who, config) => op.provision(&mut state, who, *config).await,
            InstanceCall::Restore(who) => op.restore(&mut state, who).await,
            InstanceCall::Start => op.start(&mut state).await,
            InstanceCall::Recover(machine) => match state.status {
                Some(Status::Running) if state.machine_id.as_deref() == Some(&machine) => {
                    op.start(&mut state).await
                }
                _ => Ok(()),
            },
            InstanceCall::Stop => op.stop(&mut state).await,
            InstanceCall::Restart => op.restart(&mut state).await,
            InstanceCall::Destroy => return op.destroy(&mut state).await.map(Ok),
            InstanceCall::Configure(patch) => op.configure(&mut state, *patch),
            InstanceCall::Exec(argv) => return op.exec(&state, argv).await,
            InstanceCall::MachineDown(_) => unreachable!("answered above"),
        };
        match result {
            Ok(()) => {
                op.save(&state)?;
                Ok(Ok(InstanceReply::State(Box::new(state))))
            }
            Err(ClawError::Substrate(e)) => Err(e),
            Err(e) => {
                // Keep what was checkpointed (ids of things that exist), drop the rest.
                op.ctx.rollback();
                Ok(Err(e))
            }
        }
    }

    async fn alarm(&self, ctx: &mut ActorContext, _alarm: AlarmInfo) -> Result<()> {
        let mut state: InstanceState = ctx.get(STATE).await?.unwrap_or_default();
        let Some(status) = state.status else {
            return Ok(());
        };
        let mut op = Op {
            ctx,
            s: &self.shared,
        };
        if status == Status::Destroying {
            op.finish_destroy(&mut state).await?;
            return Ok(());
        }
        if let Err(e) = op.reconcile(&mut state).await {
            if let ClawError::Substrate(e) = e {
                return Err(e);
            }
            tracing::warn!(sandbox = %state.sandbox_id, error = %e, "reconciliation failed; retried at the next alarm");
        }
        op.save(&state)?;
        op.schedule(&state);
        Ok(())
    }
}

/// Runs a provider call (an HTTP API taking up to minutes, or a wait for a machine) without
/// holding the actor's database session ([`ActorContext::suspend_while`]), so many slow
/// lifecycle calls at once cannot exhaust the pool and make other actors `Overloaded`. What
/// the call buffered so far is committed first.
async fn outside<T>(
    ctx: &mut ActorContext,
    work: impl Future<Output = std::result::Result<T, ProviderError>>,
) -> Result<std::result::Result<T, ProviderError>> {
    ctx.suspend_while(work).await
}

/// One operation on one instance: the context and the shared dependencies.
struct Op<'a> {
    ctx: &'a mut ActorContext,
    s: &'a crate::Shared,
}

type OpResult<T = ()> = std::result::Result<T, ClawError>;

fn provider_err(e: ProviderError) -> ClawError {
    ClawError::Provider(e)
}

impl Op<'_> {
    fn save(&mut self, state: &InstanceState) -> Result<()> {
        self.ctx.put(STATE, state)
    }

    /// Persists `state` now, before the next provider call is awaited.
    async fn persist(&mut self, state: &InstanceState) -> OpResult {
        self.save(state)?;
        self.ctx.checkpoint().await?;
        Ok(())
    }

    /// The next alarm: 5 min running, 1 min destroying, 30 min otherwise, plus 0–60 s of
    /// jitter (all configurable); 10 s, without jitter, after a failed restart of a running
    /// instance's machine.
    fn schedule(&mut self, state: &InstanceState) {
        let c = &self.s.config.alarm;
        if state.status == Some(Status::Running) && state.health_check_fail_count > 0 {
            self.ctx.set_alarm(self.ctx.now_ms() + c.restart_retry_ms);
            return;
        }
        let base = match state.status {
            None => return,
            Some(Status::Running) => c.running_ms,
            Some(Status::Destroying) => c.destroying_ms,
            Some(_) => c.idle_ms,
        };
        let jitter = if c.jitter_ms > 0 {
            rand::rng().random_range(0..=c.jitter_ms)
        } else {
            0
        };
        self.ctx.set_alarm(self.ctx.now_ms() + base + jitter);
    }

    fn guest(&self, state: &InstanceState) -> Guest {
        state.config.machine_size.unwrap_or(self.s.config.guest)
    }

    /// Regions to try, in order: the instance's, else the configured list.
    fn regions(&self, state: &InstanceState) -> Vec<String> {
        let mut regions = self.s.config.effective_regions();
        if let Some(r) = state.config.region.clone() {
            regions.retain(|x| *x != r);
            regions.insert(0, r);
        }
        regions
    }

    fn refuse_destroying(state: &InstanceState) -> OpResult {
        if state.status == Some(Status::Destroying) {
            return Err(ClawError::Conflict(
                "the instance is being destroyed".into(),
            ));
        }
        Ok(())
    }

    fn require_exists(state: &InstanceState) -> OpResult {
        if state.status.is_none() {
            return Err(ClawError::NotProvisioned);
        }
        Ok(())
    }

    async fn provision(
        &mut self,
        state: &mut InstanceState,
        who: InstanceIdentity,
        config: InstanceConfig,
    ) -> OpResult {
        Self::refuse_destroying(state)?;
        let is_new = state.status.is_none();
        if is_new {
            *state = InstanceState::default();
            adopt_identity(state, who);
            state.config = config;
            self.ensure_app(state).await?;
            self.create_volume(state, None).await?;
            let now = self.ctx.now_ms();
            state.provisioned_at = Some(now);
            state.status = Some(Status::Provisioned);
            self.schedule(state);
        } else {
            if who.owner != state.owner {
                return Err(ClawError::Conflict(
                    "the instance belongs to another owner".into(),
                ));
            }
            state.name = who.name;
            state.config = config;
        }
        Ok(())
    }

    async fn restore(&mut self, state: &mut InstanceState, who: InstanceIdentity) -> OpResult {
        if state.status.is_some() {
            return Ok(());
        }
        // Checked inside the call: a destroy soft-deletes the row before its own call on this
        // actor, so a restore that raced it either sees the row gone or runs before that
        // destroy, which then removes what it restored.
        let id = who.instance_id.unwrap_or(who.user_id);
        let row: Option<crate::registry::InstanceRow> = self
            .s
            .sub
            .actor_read(
                crate::registry::RegistryActor::TYPE,
                &who.owner,
                &format!("{}{id}", crate::registry::ROW_PREFIX),
            )
            .await?;
        if row.is_none_or(|r| r.destroyed_at.is_some()) {
            return Err(ClawError::NotFound);
        }
        *state = InstanceState::default();
        adopt_identity(state, who);
        state.status = Some(Status::Provisioned);
        tracing::warn!(sandbox = %state.sandbox_id,
            "instance state was lost: restored from the registry; its configuration must be provisioned again");
        self.recover_by_metadata(state).await?;
        self.schedule(state);
        Ok(())
    }

    /// The app's env key and secrets version (creating the app on first use).
    async fn ensure_app(&mut self, state: &InstanceState) -> OpResult<crate::app::AppKeys> {
        let call = AppCall::Ensure {
            owner: state.owner.clone(),
        };
        // Waiting on another actor (which waits on the provider) is outside work too.
        let actors = self.s.sub.actors().clone();
        self.ctx
            .suspend_while(async move { actors.call::<AppActor>(&state.app_name, call).await })
            .await??
    }

    /// Creates a volume, walking the regions (a capacity error moves on to the next), and
    /// persists its id and region. With `source`, forks that volume's data.
    async fn create_volume(
        &mut self,
        state: &mut InstanceState,
        source: Option<String>,
    ) -> OpResult {
        let regions = self.regions(state);
        self.create_volume_in(state, source, regions).await
    }

    /// Creates the volume in the first of `regions` with capacity.
    async fn create_volume_in(
        &mut self,
        state: &mut InstanceState,
        source: Option<String>,
        regions: Vec<String>,
    ) -> OpResult {
        let mut last = None;
        for region in regions {
            let spec = VolumeSpec {
                name: crate::ids::volume_name(&state.sandbox_id),
                size_gb: self.s.config.volume_size_gb,
                region: region.clone(),
                compute: self.guest(state),
                source_volume_id: source.clone(),
            };
            match outside(
                self.ctx,
                self.s.provider.create_volume(&state.app_name, &spec),
            )
            .await?
            {
                Ok(v) => {
                    state.volume_id = Some(v.id);
                    state.region = Some(v.region);
                    return self.persist(state).await;
                }
                Err(e) if e.is_capacity() => {
                    tracing::warn!(sandbox = %state.sandbox_id, %region, "no capacity for a volume; trying the next region");
                    last = Some(e);
                }
                Err(e) => return Err(provider_err(e)),
            }
        }
        Err(last.map(provider_err).unwrap_or_else(|| {
            ClawError::Invalid("no region configured (claw.regions is empty)".into())
        }))
    }

    async fn start(&mut self, state: &mut InstanceState) -> OpResult {
        Self::refuse_destroying(state)?;
        Self::require_exists(state)?;
        self.ensure_volume(state).await?;
        if state.status == Some(Status::Running)
            && let Some(id) = state.machine_id.clone()
        {
            match outside(self.ctx, self.s.provider.get_machine(&state.app_name, &id)).await? {
                Ok(m) if m.state == "started" => {
                    self.repair_mount(state, &m).await?;
                    return self.mark_running(state);
                }
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(provider_err(e)),
            }
        }
        let spec = self.machine_spec(state).await?;
        match self.launch(state, &spec).await {
            Err(ClawError::Provider(e)) if e.is_capacity() => {
                self.recover_capacity(state, e).await?;
                let spec = self.machine_spec(state).await?;
                self.launch(state, &spec).await?;
            }
            other => other?,
        }
        self.mark_running(state)
    }

    fn mark_running(&mut self, state: &mut InstanceState) -> OpResult {
        state.status = Some(Status::Running);
        state.last_started_at = Some(self.ctx.now_ms());
        state.health_check_fail_count = 0;
        self.schedule(state);
        Ok(())
    }

    /// Makes sure the volume exists: none → create; a 404 → create anew (the old data is
    /// gone); a region mismatch updates the region.
    async fn ensure_volume(&mut self, state: &mut InstanceState) -> OpResult {
        let Some(id) = state.volume_id.clone() else {
            return self.create_volume(state, None).await;
        };
        if state.machine_id.is_some() {
            return Ok(());
        }
        match outside(self.ctx, self.s.provider.get_volume(&state.app_name, &id)).await? {
            Ok(v) => {
                if state.region.as_deref() != Some(v.region.as_str()) {
                    state.region = Some(v.region);
                }
                Ok(())
            }
            Err(e) if e.is_not_found() => {
                tracing::error!(sandbox = %state.sandbox_id, volume = %id, "volume is gone: data loss; creating a new one");
                state.volume_id = None;
                self.create_volume(state, None).await
            }
            Err(e) => Err(provider_err(e)),
        }
    }

    /// Brings the machine up with `spec`: updates a stopped one, waits for a starting one,
    /// creates one when there is none (or it is gone), persisting its id before waiting.
    async fn launch(&mut self, state: &mut InstanceState, spec: &MachineSpec) -> OpResult {
        let app = state.app_name.clone();
        if let Some(id) = state.machine_id.clone() {
            match outside(self.ctx, self.s.provider.get_machine(&app, &id)).await? {
                Ok(m) => {
                    let instance = match m.state.as_str() {
                        "stopped" | "created" => {
                            let m =
                                outside(self.ctx, self.s.provider.update_machine(&app, &id, spec))
                                    .await?
                                    .map_err(provider_err)?;
                            Some(m.instance_id)
                        }
                        "started" => return Ok(()),
                        _ => None,
                    };
                    return self.wait(&app, &id, "started", instance.as_deref()).await;
                }
                Err(e) if e.is_not_found() => {
                    state.machine_id = None;
                    self.persist(state).await?;
                }
                // Never create a duplicate on a transient failure.
                Err(e) => return Err(provider_err(e)),
            }
        }
        let m = outside(self.ctx, self.s.provider.create_machine(&app, spec))
            .await?
            .map_err(provider_err)?;
        state.machine_id = Some(m.id.clone());
        state.region = Some(m.region.clone());
        self.persist(state).await?;
        self.wait(&app, &m.id, "started", Some(&m.instance_id))
            .await
    }

    async fn wait(
        &mut self,
        app: &str,
        id: &str,
        wanted: &str,
        instance: Option<&str>,
    ) -> OpResult {
        let timeout = Duration::from_millis(self.s.config.startup_timeout_ms);
        outside(
            self.ctx,
            self.s
                .provider
                .wait_machine(app, id, wanted, instance, timeout),
        )
        .await?
        .map_err(provider_err)
    }

    /// A capacity error: destroy the machine, fork the stranded volume when it holds user
    /// data (the instance has started before) or recreate it, and move the failed region to
    /// the end of the list. The old volume is deleted afterwards, best effort.
    async fn recover_capacity(
        &mut self,
        state: &mut InstanceState,
        cause: ProviderError,
    ) -> OpResult {
        let app = state.app_name.clone();
        tracing::warn!(sandbox = %state.sandbox_id, error = %cause, "capacity error: replacing the stranded volume");
        if let Some(id) = state.machine_id.clone() {
            match outside(self.ctx, self.s.provider.delete_machine(&app, &id)).await? {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(provider_err(e)),
            }
            state.machine_id = None;
            self.persist(state).await?;
        }
        // The failed region goes to the end of the list for this attempt (reference §2).
        let mut regions = self.regions(state);
        if let Some(region) = state.region.clone() {
            regions.retain(|r| *r != region);
            regions.push(region);
            state.config.region = regions.first().cloned();
        }
        let old = state.volume_id.take();
        let source = old.clone().filter(|_| state.last_started_at.is_some());
        if source.is_none()
            && let Some(old) = &old
        {
            match outside(self.ctx, self.s.provider.delete_volume(&app, old)).await? {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(provider_err(e)),
            }
        }
        self.create_volume_in(state, source.clone(), regions)
            .await?;
        if let Some(old) = source
            && let Err(e) = outside(self.ctx, self.s.provider.delete_volume(&app, &old)).await?
            && !e.is_not_found()
        {
            tracing::warn!(sandbox = %state.sandbox_id, volume = %old, error = %e, "could not delete the forked-from volume");
        }
        Ok(())
    }

    async fn stop(&mut self, state: &mut InstanceState) -> OpResult {
        Self::require_exists(state)?;
        if matches!(
            state.status,
            Some(Status::Stopped | Status::Provisioned | Status::Destroying)
        ) {
            return Ok(());
        }
        self.stop_machine(state).await?;
        state.status = Some(Status::Stopped);
        state.last_stopped_at = Some(self.ctx.now_ms());
        Ok(())
    }

    async fn stop_machine(&mut self, state: &InstanceState) -> OpResult {
        let Some(id) = state.machine_id.clone() else {
            return Ok(());
        };
        let app = &state.app_name;
        match outside(self.ctx, self.s.provider.stop_machine(app, &id)).await? {
            Ok(()) => {}
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(provider_err(e)),
        }
        let instance = match outside(self.ctx, self.s.provider.get_machine(app, &id)).await? {
            Ok(m) => Some(m.instance_id),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(provider_err(e)),
        };
        match self.wait(app, &id, "stopped", instance.as_deref()).await {
            Err(ClawError::Provider(e)) if e.is_not_found() => Ok(()),
            other => other,
        }
    }

    async fn restart(&mut self, state: &mut InstanceState) -> OpResult {
        Self::refuse_destroying(state)?;
        if state.status != Some(Status::Running) {
            return Err(ClawError::Conflict(
                "only a running instance restarts".into(),
            ));
        }
        self.stop_machine(state).await?;
        let spec = self.machine_spec(state).await?;
        if let Some(id) = state.machine_id.clone() {
            match outside(
                self.ctx,
                self.s.provider.update_machine(&state.app_name, &id, &spec),
            )
            .await?
            {
                Ok(m) => {
                    self.wait(&state.app_name, &id, "started", Some(&m.instance_id))
                        .await?
                }
                Err(e) if e.is_not_found() => {
                    state.machine_id = None;
                    self.launch(state, &spec).await?;
                }
                Err(e) => return Err(provider_err(e)),
            }
        } else {
            self.launch(state, &spec).await?;
        }
        self.mark_running(state)
    }

    /// Phase 1 persists the pending ids and `destroying`; phase 2 runs the deletes.
    async fn destroy(&mut self, state: &mut InstanceState) -> Result<InstanceReply> {
        // A provision interrupted after creating its volume leaves an id without a status:
        // that volume is destroyed too.
        if state.status.is_none() && state.volume_id.is_none() && state.machine_id.is_none() {
            self.ctx.delete_all();
            return Ok(InstanceReply::Destroyed { complete: true });
        }
        if state.status != Some(Status::Destroying) {
            state.pending_destroy_machine_id = state.machine_id.take();
            state.pending_destroy_volume_id = state.volume_id.take();
            state.status = Some(Status::Destroying);
            self.save(state)?;
            self.ctx.checkpoint().await?;
        }
        let complete = self.finish_destroy(state).await?;
        Ok(InstanceReply::Destroyed { complete })
    }

    /// Deletes the pending machine, then the volume, clearing each id on success or 404.
    /// When both are clear the actor is wiped (storage and alarm); otherwise the alarm
    /// retries. Never recreates anything.
    async fn finish_destroy(&mut self, state: &mut InstanceState) -> Result<bool> {
        let app = state.app_name.clone();
        if let Some(id) = state.pending_destroy_machine_id.clone() {
            match outside(self.ctx, self.s.provider.delete_machine(&app, &id)).await? {
                Ok(()) => state.pending_destroy_machine_id = None,
                Err(e) if e.is_not_found() => state.pending_destroy_machine_id = None,
                Err(e) => {
                    tracing::warn!(sandbox = %state.sandbox_id, machine = %id, error = %e, "machine delete failed; retried by the alarm")
                }
            }
        }
        if state.pending_destroy_machine_id.is_none()
            && let Some(id) = state.pending_destroy_volume_id.clone()
        {
            match outside(self.ctx, self.s.provider.delete_volume(&app, &id)).await? {
                Ok(()) => state.pending_destroy_volume_id = None,
                Err(e) if e.is_not_found() => state.pending_destroy_volume_id = None,
                Err(e) => {
                    tracing::warn!(sandbox = %state.sandbox_id, volume = %id, error = %e, "volume delete failed; retried by the alarm")
                }
            }
        }
        if state.pending_destroy_machine_id.is_none() && state.pending_destroy_volume_id.is_none() {
            self.ctx.delete_all();
            return Ok(true);
        }
        self.save(state)?;
        self.schedule(state);
        Ok(false)
    }

    fn configure(&mut self, state: &mut InstanceState, patch: ConfigPatch) -> OpResult {
        Self::require_exists(state)?;
        Self::refuse_destroying(state)?;
        let c = &mut state.config;
        if let Some(key) = patch.kilocode_api_key {
            (c.kilocode_api_key, c.kilocode_api_key_expires_at) = match key {
                Some((k, exp)) => (Some(k), exp),
                None => (None, None),
            };
        }
        if let Some(m) = patch.kilocode_default_model {
            c.kilocode_default_model = m;
        }
        if let Some(m) = patch.kilocode_models {
            c.kilocode_models = m;
        }
        for (name, value) in patch.channels {
            let slot = match name.as_str() {
                "TELEGRAM_BOT_TOKEN" => &mut c.channels.telegram_bot_token,
                "DISCORD_BOT_TOKEN" => &mut c.channels.discord_bot_token,
                "SLACK_BOT_TOKEN" => &mut c.channels.slack_bot_token,
                "SLACK_APP_TOKEN" => &mut c.channels.slack_app_token,
                other => return Err(ClawError::Invalid(format!("unknown channel `{other}`"))),
            };
            *slot = value;
        }
        Ok(())
    }

    async fn exec(&mut self, state: &InstanceState, argv: Vec<String>) -> Result<Outcome> {
        if state.status != Some(Status::Running) {
            return Ok(Err(ClawError::Conflict(
                "the instance is not running".into(),
            )));
        }
        let Some(id) = &state.machine_id else {
            return Ok(Err(ClawError::NotProvisioned));
        };
        let timeout = Duration::from_millis(self.s.config.startup_timeout_ms);
        Ok(outside(
            self.ctx,
            self.s.provider.exec(&state.app_name, id, &argv, timeout),
        )
        .await?
        .map(InstanceReply::Exec)
        .map_err(provider_err))
    }

    /// The machine's env in layers (reference §2 "Environment built for the machine"):
    /// platform; user variables overlaid by decrypted secrets; the API key and model
    /// settings; channel tokens; then the reserved gateway token and auto-approval. Every
    /// sensitive value is encrypted with the app's env key.
    async fn machine_spec(&mut self, state: &InstanceState) -> OpResult<MachineSpec> {
        let keys = self.ensure_app(state).await?;
        let open = |name: &str, sealed: &Envelope| -> OpResult<String> {
            let plain = self
                .s
                .identity
                .open(sealed, &secret_context(&state.sandbox_id, name))
                .map_err(|e| ClawError::Invalid(format!("secret `{name}` does not open: {e}")))?;
            String::from_utf8(plain)
                .map_err(|_| ClawError::Invalid(format!("secret `{name}` is not UTF-8")))
        };
        let c = &state.config;
        let mut plain = BTreeMap::from([("KILOCODE_FEATURE".to_owned(), "kilo-claw".to_owned())]);
        if !self.s.api_base_url.is_empty() {
            plain.insert("KILOCODE_API_BASE_URL".into(), self.s.api_base_url.clone());
        }
        plain.extend(c.env_vars.clone());
        let mut sensitive = BTreeMap::new();
        for (name, sealed) in &c.encrypted_secrets {
            plain.remove(name);
            sensitive.insert(name.clone(), open(name, sealed)?);
        }
        if let Some(key) = &c.kilocode_api_key {
            sensitive.insert("KILOCODE_API_KEY".into(), open("KILOCODE_API_KEY", key)?);
        }
        if let Some(model) = &c.kilocode_default_model {
            plain.insert("KILOCODE_DEFAULT_MODEL".into(), model.clone());
        }
        if !c.kilocode_models.is_empty() {
            let json = serde_json::to_string(&c.kilocode_models).unwrap_or_default();
            plain.insert("KILOCODE_MODELS_JSON".into(), json);
        }
        for (name, sealed) in c.channels.entries() {
            if let Some(sealed) = sealed {
                sensitive.insert(name.to_owned(), open(name, sealed)?);
            }
        }
        for name in SENSITIVE {
            if let Some(v) = plain.remove(*name) {
                sensitive.entry((*name).to_owned()).or_insert(v);
            }
        }
        sensitive.insert(
            "OPENCLAW_GATEWAY_TOKEN".into(),
            crypto::gateway_token(&self.s.gateway_secret, &state.sandbox_id),
        );
        plain.insert("AUTO_APPROVE_DEVICES".into(), "true".into());
        let env = crypto::seal_env(&keys.env_key, plain, &sensitive).map_err(ClawError::Invalid)?;
        let volume = state
            .volume_id
            .clone()
            .ok_or_else(|| ClawError::Invalid("the instance has no volume".into()))?;
        Ok(MachineSpec {
            name: state.sandbox_id.clone(),
            region: state
                .region
                .clone()
                .or_else(|| self.regions(state).first().cloned())
                .unwrap_or_default(),
            env,
            guest: self.guest(state),
            mounts: vec![Mount {
                volume,
                path: MOUNT_PATH.into(),
            }],
            metadata: BTreeMap::from([
                (
                    META_USER.to_owned(),
                    state.user_id.map(|u| u.to_string()).unwrap_or_default(),
                ),
                (META_SANDBOX.to_owned(), state.sandbox_id.clone()),
                (META_OWNER.to_owned(), state.owner.clone()),
            ]),
            min_secrets_version: Some(keys.secrets_version),
        })
    }

    /// A started machine without the volume at `/root` is stopped, updated with the right
    /// mount and started again.
    async fn repair_mount(&mut self, state: &mut InstanceState, m: &Machine) -> OpResult {
        let Some(volume) = state.volume_id.clone() else {
            return Ok(());
        };
        if m.mounts
            .iter()
            .any(|x| x.volume == volume && x.path == MOUNT_PATH)
        {
            return Ok(());
        }
        tracing::warn!(sandbox = %state.sandbox_id, machine = %m.id, "mount drift: repairing");
        self.stop_machine(state).await?;
        let spec = self.machine_spec(state).await?;
        let updated = outside(
            self.ctx,
            self.s
                .provider
                .update_machine(&state.app_name, &m.id, &spec),
        )
        .await?
        .map_err(provider_err)?;
        self.wait(
            &state.app_name,
            &m.id,
            "started",
            Some(&updated.instance_id),
        )
        .await
    }

    /// Finds the instance's machine by metadata (`kiloclaw_sandbox_id`), skipping destroyed
    /// ones, ranking started > starting > stopped > created > stopping > replacing, newest
    /// update first; adopts its id, region and (when confirmed to exist) its `/root` volume.
    async fn recover_by_metadata(&mut self, state: &mut InstanceState) -> OpResult {
        state.last_metadata_recovery_at = Some(self.ctx.now_ms());
        let found = outside(
            self.ctx,
            self.s
                .provider
                .list_machines(&state.app_name, Some((META_SANDBOX, &state.sandbox_id))),
        )
        .await?
        .map_err(provider_err)?;
        let mut candidates: Vec<Machine> = found
            .into_iter()
            .filter(|m| state_rank(&m.state).is_some())
            .collect();
        if candidates.len() > 1 {
            tracing::warn!(sandbox = %state.sandbox_id, count = candidates.len(), "several machines carry this sandbox's metadata; adopting the best");
        }
        candidates.sort_by(|a, b| {
            state_rank(&a.state)
                .cmp(&state_rank(&b.state))
                .then_with(|| b.updated_at.cmp(&a.updated_at))
        });
        let Some(m) = candidates.into_iter().next() else {
            return Ok(());
        };
        tracing::info!(sandbox = %state.sandbox_id, machine = %m.id, state = %m.state, "recovered the machine by metadata");
        state.machine_id = Some(m.id.clone());
        state.region = Some(m.region.clone());
        match m.state.as_str() {
            "started" => state.status = Some(Status::Running),
            "stopped" | "created" => state.status = Some(Status::Stopped),
            _ => {}
        }
        if state.volume_id.is_none()
            && let Some(mount) = m.mounts.iter().find(|x| x.path == MOUNT_PATH)
        {
            match outside(
                self.ctx,
                self.s.provider.get_volume(&state.app_name, &mount.volume),
            )
            .await?
            {
                Ok(v) => state.volume_id = Some(v.id),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(provider_err(e)),
            }
        }
        Ok(())
    }

    /// Brings a running instance's machine that is down up again with a fresh spec (what
    /// `start` does for a stopped instance); ids it learns are checkpointed as in `launch`.
    async fn relaunch(&mut self, state: &mut InstanceState) -> OpResult {
        let spec = self.machine_spec(state).await?;
        self.launch(state, &spec).await
    }

    /// The alarm's pass: the machine first, then the volume (reference §2 "Alarm").
    async fn reconcile(&mut self, state: &mut InstanceState) -> OpResult {
        let app = state.app_name.clone();
        match state.machine_id.clone() {
            None => {
                let due = state
                    .last_metadata_recovery_at
                    .is_none_or(|t| self.ctx.now_ms() - t >= METADATA_RECOVERY_COOLDOWN_MS);
                if due {
                    self.recover_by_metadata(state).await?;
                }
            }
            Some(id) => match outside(self.ctx, self.s.provider.get_machine(&app, &id)).await? {
                Err(e) if e.is_not_found() => {
                    tracing::warn!(sandbox = %state.sandbox_id, machine = %id, "machine is gone");
                    state.machine_id = None;
                    if state.status == Some(Status::Running) {
                        state.status = Some(Status::Stopped);
                        state.last_stopped_at = Some(self.ctx.now_ms());
                    }
                    state.health_check_fail_count = 0;
                }
                Err(e) => return Err(provider_err(e)),
                Ok(m) => match m.state.as_str() {
                    "started" => {
                        state.health_check_fail_count = 0;
                        if state.status != Some(Status::Running) {
                            state.status = Some(Status::Running);
                        }
                        self.repair_mount(state, &m).await?;
                    }
                    "stopped" | "created" if state.status == Some(Status::Running) => {
                        tracing::warn!(sandbox = %state.sandbox_id, machine = %id, "the runtime is down while the instance should run: restarting it");
                        match self.relaunch(state).await {
                            Ok(()) => {
                                state.health_check_fail_count = 0;
                                state.last_started_at = Some(self.ctx.now_ms());
                            }
                            Err(ClawError::Substrate(e)) => return Err(ClawError::Substrate(e)),
                            Err(e) => {
                                state.health_check_fail_count += 1;
                                tracing::warn!(sandbox = %state.sandbox_id, error = %e, attempt = state.health_check_fail_count, "restart failed");
                                if state.health_check_fail_count >= SELF_HEAL_THRESHOLD {
                                    tracing::warn!(sandbox = %state.sandbox_id, "{SELF_HEAL_THRESHOLD} restarts failed: marking stopped");
                                    state.status = Some(Status::Stopped);
                                    state.last_stopped_at = Some(self.ctx.now_ms());
                                    state.health_check_fail_count = 0;
                                }
                            }
                        }
                    }
                    _ => {}
                },
            },
        }
        match state.volume_id.clone() {
            None => self.create_volume(state, None).await?,
            Some(id) => match outside(self.ctx, self.s.provider.get_volume(&app, &id)).await? {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {
                    tracing::error!(sandbox = %state.sandbox_id, volume = %id, "volume is gone: data loss; creating a new one");
                    state.volume_id = None;
                    self.create_volume(state, None).await?;
                }
                Err(e) => return Err(provider_err(e)),
            },
        }
        Ok(())
    }
}

fn adopt_identity(state: &mut InstanceState, who: InstanceIdentity) {
    state.instance_id = who.instance_id;
    state.owner = who.owner;
    state.user_id = Some(who.user_id);
    state.org_id = who.org_id;
    state.sandbox_id = who.sandbox_id;
    state.name = who.name;
    state.app_name = who.app_name;
}

/// Rank of a machine state for metadata recovery (lower is better); `None` for machines
/// being destroyed or gone.
fn state_rank(state: &str) -> Option<u8> {
    Some(match state {
        "started" => 0,
        "starting" => 1,
        "stopped" => 2,
        "created" => 3,
        "stopping" => 4,
        "replacing" => 5,
        "destroying" | "destroyed" => return None,
        _ => 6,
    })
}

/// The envelope context of an instance's secret `name`.
pub fn secret_context(sandbox_id: &str, name: &str) -> String {
    format!("claw/{sandbox_id}/{name}")
}
