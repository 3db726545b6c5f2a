//! KiloClaw: per-owner assistant runtimes (reference kilo-cloud.md §2 and §13).
//!
//! An owner (a user or an organization) has instances; each instance is one runtime — a
//! machine with a volume as its home — on a compute provider ([`provider`]): `local`
//! (sandboxed processes, [`local`]) or `fly` (Fly Machines, [`fly`]). The instance actor
//! ([`instance`]) is the authority over its lifecycle and reconciles it with the provider on
//! an alarm; the owner's app actor ([`app`]) holds the app and its env key; the registry
//! ([`registry`]) lists instances and lets a lost instance be restored; access codes
//! ([`access`]) let a browser in without a bearer token. [`Claw`] is the service the HTTP
//! routes, the proxy and the CLI use. The built-in runtime ([`runtime`]) is what the local
//! provider runs by default.

pub mod access;
pub mod app;
pub mod crypto;
pub mod fly;
pub mod ids;
pub mod instance;
pub mod local;
pub mod provider;
pub mod registry;
pub mod runtime;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use kilocloud_identity::model::Initiator;
use kilocloud_identity::{Identity, owner::Owner};
use kilocloud_substrate::{Actor as _, Substrate, UnixMs};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::access::{AccessActor, AccessCall, AccessReply};
use crate::app::AppActor;
use crate::ids::SandboxId;
use crate::instance::{
    ConfigPatch, InstanceActor, InstanceCall, InstanceConfig, InstanceIdentity, InstanceReply,
    InstanceState, ModelEntry, Status,
};
use crate::provider::{ComputeProvider, CpuKind, Guest, ProviderError};
use crate::registry::{InstanceRow, ROW_PREFIX, RegistryActor, RegistryCall};

/// Lifetime of the model-gateway key minted for an instance, s (reference: a 30-day JWT).
pub const API_KEY_TTL_S: i64 = 30 * 24 * 3600;
/// The access cookie's name.
pub const ACCESS_COOKIE: &str = "kiloclaw-auth";
/// The access cookie's lifetime, s (reference: 24 h).
pub const ACCESS_COOKIE_TTL_S: i64 = 24 * 3600;

/// Which compute provider runs instances (`claw.provider`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Sandboxed processes on this host.
    #[default]
    Local,
    /// Fly Machines.
    Fly,
}

/// Reconciliation alarm cadence, ms (reference: 5 min running, 1 min destroying, 30 min
/// otherwise, plus 0–60 s of jitter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlarmCadence {
    /// While running.
    pub running_ms: i64,
    /// While destroying (retrying deletes).
    pub destroying_ms: i64,
    /// Provisioned or stopped.
    pub idle_ms: i64,
    /// Random extra delay, 0..=this.
    pub jitter_ms: i64,
    /// After a failed restart of a running instance's machine that was found down, the
    /// next attempt comes this soon (no jitter). Default 10 000.
    pub restart_retry_ms: i64,
}

impl Default for AlarmCadence {
    fn default() -> Self {
        Self {
            running_ms: 5 * 60_000,
            destroying_ms: 60_000,
            idle_ms: 30 * 60_000,
            jitter_ms: 60_000,
            restart_retry_ms: 10_000,
        }
    }
}

/// `[claw]`: KiloClaw settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClawConfig {
    /// Serve KiloClaw. Default true.
    pub enabled: bool,
    /// The provider. Default `local`.
    pub provider: ProviderKind,
    /// Fly Machines settings (provider `fly`).
    pub fly: fly::FlyConfig,
    /// The `local` provider's runtime argv; empty (default) runs the built-in runtime. Any
    /// command that listens on port 18789 inside the sandbox works (e.g. an OpenClaw
    /// gateway installed on the host).
    pub runtime_command: Vec<String>,
    /// HMAC key of gateway tokens (all nodes must agree). The binary derives it from the
    /// master key when `claw.gateway_token_secret` is unset; [`Claw::new`] refuses an empty
    /// one.
    pub gateway_token_secret: kilocloud_identity::secret::Secret,
    /// App name prefix: `acct` (production) or `dev`.
    pub app_prefix: String,
    /// Regions to place volumes in, in order. Empty: `local` for the local provider,
    /// `dfw, yyz, cdg` for Fly.
    pub regions: Vec<String>,
    /// Volume size, GB. Default 10.
    pub volume_size_gb: u32,
    /// Default machine size.
    pub guest: Guest,
    /// Reconciliation cadence.
    pub alarm: AlarmCadence,
    /// Longest wait for a machine to start or stop, ms. Default 60 000 (Fly's cap).
    pub startup_timeout_ms: u64,
    /// The model gateway's base URL as Fly machines reach it (e.g.
    /// `https://cloud.example.com/api/openrouter/`). The local provider forwards this server
    /// into each sandbox instead.
    pub api_base_url: String,
    /// Most active instances per owner. Default 10.
    pub max_instances_per_owner: u32,
    /// Status reads check a running machine live at most this often, ms. Default 30 000.
    pub live_check_ms: i64,
    /// Mark the access cookie `Secure` (the server is reached over HTTPS). Default false.
    pub secure_cookie: bool,
}

impl Default for ClawConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            provider: ProviderKind::Local,
            fly: fly::FlyConfig::default(),
            runtime_command: Vec::new(),
            gateway_token_secret: kilocloud_identity::secret::Secret::default(),
            app_prefix: "acct".into(),
            regions: Vec::new(),
            volume_size_gb: 10,
            guest: Guest::default(),
            alarm: AlarmCadence::default(),
            startup_timeout_ms: 60_000,
            api_base_url: String::new(),
            max_instances_per_owner: 10,
            live_check_ms: 30_000,
            secure_cookie: false,
        }
    }
}

impl ClawConfig {
    /// The regions in effect.
    pub fn effective_regions(&self) -> Vec<String> {
        if !self.regions.is_empty() {
            return self.regions.clone();
        }
        match self.provider {
            ProviderKind::Local => vec!["local".into()],
            ProviderKind::Fly => ["dfw", "yyz", "cdg"].map(String::from).to_vec(),
        }
    }
}

/// Why a KiloClaw operation failed. Each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ClawError {
    /// No such instance for this caller (404; also another owner's instance).
    #[error("instance not found")]
    NotFound,
    /// The instance has no machine or state yet (404 "not provisioned").
    #[error("the instance is not provisioned")]
    NotProvisioned,
    /// The operation conflicts with the instance's state (409), e.g. destroying.
    #[error("{0}")]
    Conflict(String),
    /// Bad input (400).
    #[error("{0}")]
    Invalid(String),
    /// A limit was reached (429).
    #[error("{0}")]
    Limit(String),
    /// The compute provider failed (502; 503 when it gave no answer).
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// Identity (sealing, minting keys).
    #[error(transparent)]
    Identity(#[from] kilocloud_identity::Error),
    /// The store.
    #[error(transparent)]
    Substrate(#[from] kilocloud_substrate::Error),
}

/// Result of a KiloClaw operation.
pub type Result<T, E = ClawError> = std::result::Result<T, E>;

/// What actors and the service share.
pub(crate) struct Shared {
    pub(crate) sub: Substrate,
    pub(crate) identity: Identity,
    pub(crate) provider: Arc<dyn ComputeProvider>,
    pub(crate) config: ClawConfig,
    pub(crate) gateway_secret: Vec<u8>,
    /// `KILOCODE_API_BASE_URL` given to runtimes.
    pub(crate) api_base_url: String,
    /// Live machine states seen by status reads: key → (when, state). Memory only (the
    /// alarm owns persistence, reference §13.5).
    live: Mutex<HashMap<String, (UnixMs, String)>>,
}

/// An instance as the API shows it. Never holds secret values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceView {
    /// Instance id (a legacy instance: its user id).
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// Sandbox id.
    pub sandbox_id: String,
    /// Owner key.
    pub owner: String,
    /// The user it is for.
    pub user_id: Uuid,
    /// `provisioned`, `running`, `stopped`, `destroying`; `destroyed` once gone.
    pub status: String,
    /// The machine's state at the last live check (at most every 30 s), while running.
    pub machine_state: Option<String>,
    /// Provider kind.
    pub provider: String,
    /// Region.
    pub region: Option<String>,
    /// Machine id.
    pub machine_id: Option<String>,
    /// Volume id.
    pub volume_id: Option<String>,
    /// Env variable names (values are never shown).
    pub env_vars: Vec<String>,
    /// Number of secrets.
    pub secret_count: usize,
    /// Number of channels configured.
    pub channel_count: usize,
    /// Default model.
    pub default_model: Option<String>,
    /// Created, ms since epoch.
    pub created_at: UnixMs,
    /// ms since epoch.
    pub last_started_at: Option<UnixMs>,
    /// ms since epoch.
    pub last_stopped_at: Option<UnixMs>,
    /// The path the proxy serves it at: `/i/<id>/`.
    pub path: String,
}

/// What creating an instance takes (user API and platform provision). `Debug` shows the
/// secrets' names only.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateInstance {
    /// Display name (1–64 chars). Default `claw`.
    pub name: String,
    /// Plain env variables.
    pub env_vars: BTreeMap<String, String>,
    /// Secret env variables, plaintext in the request, sealed at once.
    pub secrets: BTreeMap<String, String>,
    /// Default model, `kilocode/<provider>/<model>`.
    pub default_model: Option<String>,
    /// Models offered.
    pub models: Vec<ModelEntry>,
    /// Preferred region.
    pub region: Option<String>,
    /// Machine size.
    pub machine_size: Option<Guest>,
    /// Start the runtime after provisioning. Default true through the user API.
    pub start: Option<bool>,
}

impl std::fmt::Debug for CreateInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateInstance")
            .field("name", &self.name)
            .field("env_vars", &self.env_vars)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("default_model", &self.default_model)
            .field("models", &self.models)
            .field("region", &self.region)
            .field("machine_size", &self.machine_size)
            .field("start", &self.start)
            .finish()
    }
}

/// Which instance a call is about, after the caller's right to it was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRef {
    /// The actor key (instance id, or user id for a legacy instance).
    pub key: String,
    /// Its registry row.
    pub row: InstanceRow,
}

/// The KiloClaw service. Cheap to clone.
#[derive(Clone)]
pub struct Claw {
    inner: Arc<Shared>,
}

impl Claw {
    /// Registers KiloClaw's actors on `sub` (before [`Substrate::start`]). `api_base_url` is
    /// the model gateway's base URL as runtimes see it.
    ///
    /// Panics when `config.gateway_token_secret` is empty (every gateway token would be
    /// derivable by anyone).
    pub fn new(
        sub: &Substrate,
        identity: Identity,
        config: ClawConfig,
        provider: Arc<dyn ComputeProvider>,
        api_base_url: String,
    ) -> Self {
        assert!(
            !config.gateway_token_secret.is_empty(),
            "claw.gateway_token_secret must not be empty"
        );
        let inner = Arc::new(Shared {
            sub: sub.clone(),
            identity,
            provider,
            gateway_secret: config.gateway_token_secret.expose().as_bytes().to_vec(),
            config,
            api_base_url,
            live: Mutex::new(HashMap::new()),
        });
        sub.actors().register(InstanceActor {
            shared: inner.clone(),
        });
        sub.actors().register(AppActor {
            shared: inner.clone(),
        });
        sub.actors().register(RegistryActor);
        sub.actors().register(AccessActor);
        Self { inner }
    }

    /// The settings in effect.
    pub fn config(&self) -> &ClawConfig {
        &self.inner.config
    }

    /// The provider.
    pub fn provider(&self) -> &Arc<dyn ComputeProvider> {
        &self.inner.provider
    }

    /// The gateway token of a sandbox (derived, never stored).
    pub fn gateway_token(&self, sandbox_id: &str) -> String {
        crypto::gateway_token(&self.inner.gateway_secret, sandbox_id)
    }

    fn now(&self) -> UnixMs {
        self.inner.sub.clock().now_ms()
    }

    async fn call(&self, key: &str, call: InstanceCall) -> Result<InstanceReply> {
        self.inner
            .sub
            .actors()
            .call::<InstanceActor>(key, call)
            .await?
    }

    async fn registry(&self, owner: &str, call: RegistryCall) -> Result<()> {
        self.inner
            .sub
            .actors()
            .call::<RegistryActor>(owner, call)
            .await?
    }

    /// The committed state of an instance actor (lock-free; empty when it has none).
    pub async fn state(&self, key: &str) -> Result<InstanceState> {
        Ok(self
            .inner
            .sub
            .actor_read(InstanceActor::TYPE, key, "state")
            .await?
            .unwrap_or_default())
    }

    /// The registry row of `id` in `owner`'s registry, if the instance is active or still
    /// being destroyed (so callers see `destroying`, and the proxy answers 409, until the
    /// provider confirmed every delete).
    async fn row(&self, owner: &str, id: Uuid) -> Result<Option<InstanceRow>> {
        let row: Option<InstanceRow> = self
            .inner
            .sub
            .actor_read(RegistryActor::TYPE, owner, &format!("{ROW_PREFIX}{id}"))
            .await?;
        match row {
            Some(r) if r.destroyed_at.is_some() => Ok(self.visible(r).await?),
            other => Ok(other),
        }
    }

    /// A soft-deleted row stays visible while its instance is destroying.
    async fn visible(&self, row: InstanceRow) -> Result<Option<InstanceRow>> {
        let state = self.state(&row.id.to_string()).await?;
        Ok((state.status == Some(Status::Destroying)).then_some(row))
    }

    /// Finds an instance `owner` has, else [`ClawError::NotFound`] (also for another
    /// owner's instance: existence is not revealed).
    pub async fn find(&self, owner: Owner, id: Uuid) -> Result<InstanceRef> {
        let row = self
            .row(&owner.to_string(), id)
            .await?
            .ok_or(ClawError::NotFound)?;
        Ok(InstanceRef {
            key: id.to_string(),
            row,
        })
    }

    /// Finds an instance `user` may use: theirs, or their organization's. Used by the proxy
    /// and the access gateway. Errors: [`ClawError::NotFound`] otherwise.
    pub async fn find_for_user(&self, user: Uuid, id: Uuid) -> Result<InstanceRef> {
        if let Ok(found) = self.find(Owner::User(user), id).await {
            return Ok(found);
        }
        let state = self.state(&id.to_string()).await?;
        let org = match state.org_id {
            Some(org) => org,
            None => self
                .org_of_row(user, id)
                .await?
                .ok_or(ClawError::NotFound)?,
        };
        if self.inner.identity.org_role(org, user).await?.is_none() {
            return Err(ClawError::NotFound);
        }
        self.find(Owner::Org(org), id).await
    }

    /// An organization of `user` whose registry holds `id` (for an instance whose actor
    /// state was lost).
    async fn org_of_row(&self, user: Uuid, id: Uuid) -> Result<Option<Uuid>> {
        for m in self.inner.identity.orgs_of(user).await? {
            if self
                .row(&Owner::Org(m.org.id).to_string(), id)
                .await?
                .is_some()
            {
                return Ok(Some(m.org.id));
            }
        }
        Ok(None)
    }

    /// Creates an instance for `owner` on behalf of `user` (who must already be allowed to
    /// act for `owner`): registry row first, then provision (app, volume), a 30-day gateway
    /// key for the runtime, then start unless `start: false`. A failed provision marks the
    /// row destroyed and destroys what was created.
    ///
    /// Errors: [`ClawError::Invalid`] for bad names or env, or a `machine_size` beyond
    /// `claw.guest` (only the platform routes size machines beyond it);
    /// [`ClawError::Limit`] beyond `max_instances_per_owner`; provider errors.
    pub async fn create(
        &self,
        owner: Owner,
        user: Uuid,
        request: CreateInstance,
        by: &Initiator,
    ) -> Result<InstanceView> {
        if let Some(size) = &request.machine_size {
            let max = &self.inner.config.guest;
            let bigger_kind =
                size.cpu_kind == CpuKind::Performance && max.cpu_kind == CpuKind::Shared;
            if size.cpus == 0
                || size.memory_mb == 0
                || size.cpus > max.cpus
                || size.memory_mb > max.memory_mb
                || bigger_kind
            {
                return Err(ClawError::Invalid(format!(
                    "machineSize: at most {} {:?} vCPUs and {} MB (claw.guest); larger machines \
                     are set through the platform API",
                    max.cpus, max.cpu_kind, max.memory_mb
                )));
            }
        }
        self.provision_instance(owner, user, Uuid::new_v4(), request, by)
            .await
    }

    /// Provisions the legacy per-user instance (actor key = user id, sandbox id = base64url
    /// of the user id), or re-provisions it.
    pub async fn provision_legacy(
        &self,
        user: Uuid,
        request: CreateInstance,
        by: &Initiator,
    ) -> Result<InstanceView> {
        self.provision_instance(Owner::User(user), user, user, request, by)
            .await
    }

    /// Creates instance `id` for `owner` on behalf of `user`, or re-provisions it (new
    /// configuration, status kept) when `owner` already has it. `id == user` is the
    /// user's legacy instance. See [`Claw::create`].
    pub async fn provision_instance(
        &self,
        owner: Owner,
        user: Uuid,
        id: Uuid,
        request: CreateInstance,
        by: &Initiator,
    ) -> Result<InstanceView> {
        let sandbox_id = if id == user {
            SandboxId::for_user(&user.to_string()).map_err(ClawError::Invalid)?
        } else {
            SandboxId::for_instance(id)
        };
        let name = if request.name.is_empty() {
            "claw".to_owned()
        } else {
            request.name.clone()
        };
        if name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(ClawError::Invalid("name: 1–64 printable characters".into()));
        }
        let org = match owner {
            Owner::Org(o) => Some(o),
            Owner::User(_) => None,
        };
        let owner_key = owner.to_string();
        let key = id.to_string();
        let current = self.state(&key).await?;
        if current.status.is_some() && current.owner != owner_key {
            return Err(ClawError::Conflict(
                "the instance belongs to another owner".into(),
            ));
        }
        let config = self
            .instance_config(&sandbox_id, user, org, &request, by)
            .await?;
        let exists = self.row(&owner_key, id).await?.is_some();
        let row = InstanceRow {
            id,
            owner: owner_key.clone(),
            user_id: user,
            org_id: org,
            sandbox_id: sandbox_id.clone(),
            name: name.clone(),
            created_at: self.now(),
            destroyed_at: None,
        };
        if !exists {
            let limit = self.inner.config.max_instances_per_owner;
            self.registry(
                &owner_key,
                RegistryCall::Insert {
                    row: row.clone(),
                    limit,
                },
            )
            .await?;
        }
        let who = InstanceIdentity {
            instance_id: (id != user).then_some(id),
            owner: owner_key.clone(),
            user_id: user,
            org_id: org,
            sandbox_id,
            name,
            app_name: ids::app_name(&self.inner.config.app_prefix, &owner_key),
        };
        let provisioned = self
            .call(&key, InstanceCall::Provision(who, Box::new(config)))
            .await;
        if let Err(e) = provisioned {
            if !exists && matches!(e, ClawError::Conflict(_)) {
                // Refused before anything was created (another owner's instance, raced in
                // since the check above): only the row added here goes.
                let _ = self.registry(&owner_key, RegistryCall::Remove { id }).await;
            } else if !exists {
                tracing::warn!(instance = %id, error = %e, "provision failed: destroying what was created");
                let _ = self
                    .registry(
                        &owner_key,
                        RegistryCall::SetDestroyed {
                            id,
                            at: Some(self.now()),
                        },
                    )
                    .await;
                let _ = self.call(&key, InstanceCall::Destroy).await;
            }
            return Err(e);
        }
        if request.start.unwrap_or(true) {
            self.call(&key, InstanceCall::Start).await?;
        }
        self.view(&InstanceRef { key, row }).await
    }

    /// The configuration of a new or re-provisioned instance: checks env names, seals the
    /// secrets, mints the runtime's gateway key (a 30-day JWT for `user`, pinned to `org`).
    async fn instance_config(
        &self,
        sandbox_id: &str,
        user: Uuid,
        org: Option<Uuid>,
        request: &CreateInstance,
        by: &Initiator,
    ) -> Result<InstanceConfig> {
        for name in request.env_vars.keys().chain(request.secrets.keys()) {
            crypto::check_user_env_name(name).map_err(ClawError::Invalid)?;
        }
        if let Some(model) = &request.default_model {
            check_model(model)?;
        }
        let identity = &self.inner.identity;
        let seal = |name: &str, value: &str| {
            identity.seal(
                value.as_bytes(),
                &instance::secret_context(sandbox_id, name),
            )
        };
        let (key, exp) = identity
            .issue_jwt(user, org, None, API_KEY_TTL_S, by)
            .await?;
        Ok(InstanceConfig {
            env_vars: request.env_vars.clone(),
            encrypted_secrets: request
                .secrets
                .iter()
                .map(|(k, v)| (k.clone(), seal(k, v)))
                .collect(),
            kilocode_api_key: Some(seal("KILOCODE_API_KEY", &key)),
            kilocode_api_key_expires_at: Some(exp.saturating_mul(1000)),
            kilocode_default_model: request.default_model.clone(),
            kilocode_models: request.models.clone(),
            channels: Default::default(),
            machine_size: request.machine_size,
            region: request.region.clone(),
        })
    }

    /// Seals a channel token or other value for `sandbox_id`'s configuration.
    pub fn seal(
        &self,
        sandbox_id: &str,
        name: &str,
        value: &str,
    ) -> kilocloud_identity::envelope::Envelope {
        self.inner.identity.seal(
            value.as_bytes(),
            &instance::secret_context(sandbox_id, name),
        )
    }

    /// Instances of `owner` (active, or still being destroyed), newest first.
    pub async fn list(&self, owner: Owner) -> Result<Vec<InstanceView>> {
        let rows: Vec<(String, InstanceRow)> = self
            .inner
            .sub
            .actor_scan(
                RegistryActor::TYPE,
                &owner.to_string(),
                ROW_PREFIX,
                "",
                1000,
            )
            .await?;
        let mut out = Vec::new();
        for (_, row) in rows {
            let row = match row.destroyed_at {
                None => row,
                Some(_) => match self.visible(row).await? {
                    Some(row) => row,
                    None => continue,
                },
            };
            let found = InstanceRef {
                key: row.id.to_string(),
                row,
            };
            out.push(self.view(&found).await?);
        }
        out.sort_by_key(|v| std::cmp::Reverse(v.created_at));
        Ok(out)
    }

    /// The instance's view, with a live machine check at most every `live_check_ms` while
    /// running (its result is kept in memory only).
    pub async fn view(&self, found: &InstanceRef) -> Result<InstanceView> {
        let state = self.state(&found.key).await?;
        let machine_state = match (&state.status, &state.machine_id) {
            (Some(Status::Running), Some(machine)) => {
                Some(self.live_state(&found.key, &state, machine).await)
            }
            _ => None,
        };
        let row = &found.row;
        Ok(InstanceView {
            id: row.id,
            name: if state.name.is_empty() {
                row.name.clone()
            } else {
                state.name.clone()
            },
            sandbox_id: row.sandbox_id.clone(),
            owner: row.owner.clone(),
            user_id: row.user_id,
            status: match state.status {
                Some(s) => serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                None if row.destroyed_at.is_some() => "destroyed".into(),
                None => "unknown".into(),
            },
            machine_state,
            provider: self.inner.provider.kind().into(),
            region: state.region.clone(),
            machine_id: state.machine_id.clone(),
            volume_id: state.volume_id.clone(),
            env_vars: state.config.env_vars.keys().cloned().collect(),
            secret_count: state.config.encrypted_secrets.len(),
            channel_count: state.config.channels.count(),
            default_model: state.config.kilocode_default_model.clone(),
            created_at: row.created_at,
            last_started_at: state.last_started_at,
            last_stopped_at: state.last_stopped_at,
            path: format!("/i/{}/", row.id),
        })
    }

    async fn live_state(&self, key: &str, state: &InstanceState, machine: &str) -> String {
        let now = self.now();
        if let Some((at, seen)) = self.inner.live.lock().unwrap().get(key).cloned()
            && now - at < self.inner.config.live_check_ms
        {
            return seen;
        }
        let seen = match self
            .inner
            .provider
            .get_machine(&state.app_name, machine)
            .await
        {
            Ok(m) => m.state,
            Err(e) if e.is_not_found() => "destroyed".into(),
            Err(_) => "unknown".into(),
        };
        self.inner
            .live
            .lock()
            .unwrap()
            .insert(key.to_owned(), (now, seen.clone()));
        seen
    }

    /// Starts the instance; an instance whose actor state was lost is first restored from
    /// its registry row (its configuration is not: provision again).
    pub async fn start(&self, found: &InstanceRef) -> Result<InstanceView> {
        if self.state(&found.key).await?.status.is_none() {
            let row = &found.row;
            let who = InstanceIdentity {
                instance_id: (row.id != row.user_id).then_some(row.id),
                owner: row.owner.clone(),
                user_id: row.user_id,
                org_id: row.org_id,
                sandbox_id: row.sandbox_id.clone(),
                name: row.name.clone(),
                app_name: ids::app_name(&self.inner.config.app_prefix, &row.owner),
            };
            self.call(&found.key, InstanceCall::Restore(who)).await?;
        }
        self.call(&found.key, InstanceCall::Start).await?;
        self.view(found).await
    }

    /// Starts the instance again after its runtime on `machine` did not answer (the proxy's
    /// one restart), unless it was stopped or moved to another machine since. Returns the
    /// state afterwards.
    pub async fn recover(&self, found: &InstanceRef, machine: &str) -> Result<InstanceState> {
        match self
            .call(&found.key, InstanceCall::Recover(machine.to_owned()))
            .await?
        {
            InstanceReply::State(state) => Ok(*state),
            _ => Err(ClawError::Invalid("unexpected reply".into())),
        }
    }

    /// Reconciles at once the instance whose runtime `down` reports gone: when it still runs
    /// on that machine, its alarm is moved to now, and the alarm restarts it. A report of an
    /// unknown sandbox, or of a machine the instance no longer uses, changes nothing.
    ///
    /// Errors: the actor call's (e.g. `Overloaded`); the next regular alarm still finds it.
    pub async fn machine_down(&self, down: &provider::MachineDown) -> Result<()> {
        let key = match ids::SandboxId::parse(&down.sandbox_id) {
            Ok(ids::SandboxId::Instance(id)) => id.to_string(),
            Ok(ids::SandboxId::Legacy(user)) => user,
            Err(e) => {
                tracing::warn!(machine = %down.machine_id, error = %e, "a machine without a sandbox id went down");
                return Ok(());
            }
        };
        self.call(&key, InstanceCall::MachineDown(down.machine_id.clone()))
            .await
            .map(drop)
    }

    /// Starts the task that hands the provider's reports of machines gone down
    /// ([`ComputeProvider::take_down_reports`]) to [`Claw::machine_down`]; it ends when the
    /// provider does. Call once, after the substrate started; `None` for a provider without
    /// reports (or when they were taken already).
    pub fn watch_machines(&self) -> Option<tokio::task::JoinHandle<()>> {
        let mut reports = self.inner.provider.take_down_reports()?;
        let claw = self.clone();
        Some(tokio::spawn(async move {
            while let Some(down) = reports.recv().await {
                if let Err(e) = claw.machine_down(&down).await {
                    tracing::warn!(machine = %down.machine_id, error = %e, "cannot reconcile a machine gone down now; its next alarm will");
                }
            }
        }))
    }

    /// Stops the instance.
    pub async fn stop(&self, found: &InstanceRef) -> Result<InstanceView> {
        self.call(&found.key, InstanceCall::Stop).await?;
        self.view(found).await
    }

    /// Restarts a running instance with a rebuilt env and config.
    pub async fn restart(&self, found: &InstanceRef) -> Result<InstanceView> {
        self.call(&found.key, InstanceCall::Restart).await?;
        self.view(found).await
    }

    /// Destroys the instance: the registry row is soft-deleted first (and restored if the
    /// destroy call fails), then the two-phase destroy runs; what the provider refuses now
    /// is retried every minute by the instance's alarm. Returns whether everything is gone.
    pub async fn destroy(&self, found: &InstanceRef) -> Result<bool> {
        let (owner, id) = (found.row.owner.clone(), found.row.id);
        self.registry(
            &owner,
            RegistryCall::SetDestroyed {
                id,
                at: Some(self.now()),
            },
        )
        .await?;
        match self.call(&found.key, InstanceCall::Destroy).await {
            Ok(InstanceReply::Destroyed { complete }) => {
                self.inner.live.lock().unwrap().remove(&found.key);
                Ok(complete)
            }
            Ok(_) => Ok(false),
            Err(e) => {
                let _ = self
                    .registry(&owner, RegistryCall::SetDestroyed { id, at: None })
                    .await;
                Err(e)
            }
        }
    }

    /// Runs the runtime's doctor in the machine: `openclaw doctor --fix --non-interactive`
    /// on Fly, the built-in runtime's `claw-runtime doctor` locally; at most 60 s.
    pub async fn doctor(&self, found: &InstanceRef) -> Result<provider::ExecOutput> {
        let argv: Vec<String> = match self.inner.config.provider {
            ProviderKind::Fly => ["openclaw", "doctor", "--fix", "--non-interactive"]
                .map(String::from)
                .to_vec(),
            ProviderKind::Local if self.inner.config.runtime_command.is_empty() => {
                ["claw-runtime", "doctor"].map(String::from).to_vec()
            }
            ProviderKind::Local => {
                return Err(ClawError::Invalid(
                    "doctor needs the built-in runtime or Fly's OpenClaw image".into(),
                ));
            }
        };
        match self.call(&found.key, InstanceCall::Exec(argv)).await? {
            InstanceReply::Exec(out) => Ok(out),
            _ => Err(ClawError::Invalid("unexpected reply".into())),
        }
    }

    /// Applies a configuration patch (effective at the next start or restart).
    pub async fn configure(&self, found: &InstanceRef, patch: ConfigPatch) -> Result<InstanceView> {
        self.call(&found.key, InstanceCall::Configure(Box::new(patch)))
            .await?;
        self.view(found).await
    }

    /// Issues an access code for `user` (expiring their previous one); returns the code
    /// (10 chars, no dash) and its expiry, ms since epoch.
    pub async fn issue_access_code(&self, user: Uuid) -> Result<(String, UnixMs)> {
        match self
            .inner
            .sub
            .actors()
            .call::<AccessActor>(&user.to_string(), AccessCall::Issue)
            .await?
        {
            AccessReply::Issued { code, expires_at } => Ok((code, expires_at)),
            AccessReply::Redeemed(_) => Err(ClawError::Invalid("unexpected reply".into())),
        }
    }

    /// Redeems `user`'s access code (typed input: case, dashes and spaces do not matter).
    /// On success returns a 24-hour JWT for the access cookie.
    ///
    /// Errors: [`ClawError::Invalid`] for a wrong, used or expired code.
    pub async fn redeem_access_code(
        &self,
        user: Uuid,
        input: &str,
        by: &Initiator,
    ) -> Result<String> {
        let code = crypto::normalize_access_code(input);
        let reply = self
            .inner
            .sub
            .actors()
            .call::<AccessActor>(&user.to_string(), AccessCall::Redeem(code))
            .await?;
        if reply != AccessReply::Redeemed(true) {
            return Err(ClawError::Invalid(
                "the access code is wrong, used or expired".into(),
            ));
        }
        let (token, _) = self
            .inner
            .identity
            .issue_jwt(user, None, None, ACCESS_COOKIE_TTL_S, by)
            .await?;
        Ok(token)
    }
}

/// Checks that a default model reads `kilocode/<provider>/<model>`.
///
/// Errors: [`ClawError::Invalid`] otherwise.
pub fn check_model(model: &str) -> Result<()> {
    let parts: Vec<&str> = model.splitn(3, '/').collect();
    match parts.as_slice() {
        ["kilocode", p, m] if !p.is_empty() && !m.is_empty() => Ok(()),
        _ => Err(ClawError::Invalid(format!(
            "default model `{model}` must read kilocode/<provider>/<model>"
        ))),
    }
}

/// The built-in runtime's entry point, run inside the machine (`kilocloud claw-runtime`):
/// decrypts the `KILOCLAW_ENC_*` variables with `KILOCLAW_ENV_KEY` (failing closed when the
/// key is missing), then serves on `0.0.0.0:18789`. With `doctor`, checks the same and
/// prints a report instead.
///
/// Errors: what stops it from starting (also the doctor's failed checks).
pub async fn run_runtime(doctor: bool) -> std::result::Result<(), String> {
    let vars: BTreeMap<String, String> = std::env::vars().collect();
    let vars = crypto::open_env(vars)?;
    let config = runtime::RuntimeConfig::from_env(&vars)?;
    if doctor {
        let probe = config.home.join(".kiloclaw");
        std::fs::create_dir_all(&probe).map_err(|e| format!("home not writable: {e}"))?;
        println!("env: decrypted, gateway token and API key present");
        println!("home: {} writable", config.home.display());
        println!("model gateway: {}", config.api_base_url);
        println!("default model: {}", config.default_model);
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", provider::RUNTIME_PORT))
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", provider::RUNTIME_PORT))?;
    runtime::serve(listener, config)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_models_need_the_kilocode_shape() {
        assert!(check_model("kilocode/anthropic/claude-opus-4.5").is_ok());
        assert!(check_model("anthropic/claude").is_err());
        assert!(check_model("kilocode//m").is_err());
    }
}
