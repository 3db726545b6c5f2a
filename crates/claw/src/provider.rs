//! Compute providers behind one trait ([`ComputeProvider`]): apps (a private network and a
//! secret store per owner), machines (one runtime each), volumes (its persistent home),
//! exec, wait, and listing by metadata. The vocabulary and the error rules are the Fly
//! Machines API's (reference kilo-cloud.md §2 "Fly Machines API calls used"): `fly` speaks it
//! over HTTP, `local` implements it with sandboxed processes and directories, and the
//! instance actor drives both the same way.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

/// Where a machine mounts its volume (reference: the volume is the runtime's `/root`).
pub const MOUNT_PATH: &str = "/root";
/// The port the runtime listens on inside its machine (reference: OpenClaw's 18789).
pub const RUNTIME_PORT: u16 = 18789;

/// A provider call that failed: the HTTP status and body as the provider answered, or
/// status 0 for a transport failure (no answer at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{operation}: {}", describe(*status, body))]
pub struct ProviderError {
    /// What was being done, e.g. `create machine`.
    pub operation: String,
    /// HTTP status, 0 when there was no answer.
    pub status: u16,
    /// The answer's body (or the transport error).
    pub body: String,
}

fn describe(status: u16, body: &str) -> String {
    match status {
        0 => format!("no answer ({body})"),
        s => format!("status {s}: {body}"),
    }
}

impl ProviderError {
    /// An error for `operation` with `status` and `body`.
    pub fn new(operation: impl Into<String>, status: u16, body: impl Into<String>) -> Self {
        Self {
            operation: operation.into(),
            status,
            body: body.into(),
        }
    }

    /// The resource does not exist (404): the only answer that allows re-creation (reference
    /// §13.3) and that clears a pending-destroy id.
    pub fn is_not_found(&self) -> bool {
        self.status == 404
    }

    /// Fly's capacity error: 409 or 412 **and** a body saying "insufficient resources" or
    /// "insufficient memory". Any other 409/412 is not capacity (reference §2).
    pub fn is_capacity(&self) -> bool {
        let body = self.body.to_ascii_lowercase();
        matches!(self.status, 409 | 412)
            && (body.contains("insufficient resources") || body.contains("insufficient memory"))
    }

    /// The resource already exists (409 without the capacity marker).
    pub fn is_conflict(&self) -> bool {
        self.status == 409 && !self.is_capacity()
    }
}

/// Result of a provider call.
pub type ProviderResult<T> = Result<T, ProviderError>;

/// CPU class of a guest (Fly `cpu_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CpuKind {
    /// Shared vCPUs.
    #[default]
    Shared,
    /// Dedicated vCPUs.
    Performance,
}

/// A machine's size (Fly `guest`). Default: shared, 2 vCPU, 4096 MB (reference §2 constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guest {
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MB.
    pub memory_mb: u32,
    /// CPU class.
    pub cpu_kind: CpuKind,
}

impl Default for Guest {
    fn default() -> Self {
        Self {
            cpus: 2,
            memory_mb: 4096,
            cpu_kind: CpuKind::Shared,
        }
    }
}

/// A volume mounted into a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Volume id.
    pub volume: String,
    /// Path inside the machine.
    pub path: String,
}

/// What a machine runs: everything `create` and `update` send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    /// Machine name (the sandbox id).
    pub name: String,
    /// Region to place it in.
    pub region: String,
    /// Environment of the runtime (sensitive values already `enc:v1:` encrypted under
    /// `KILOCLAW_ENC_<NAME>`).
    pub env: BTreeMap<String, String>,
    /// Size.
    pub guest: Guest,
    /// Mounts (one: the volume at [`MOUNT_PATH`]).
    pub mounts: Vec<Mount>,
    /// Metadata (`kiloclaw_user_id`, `kiloclaw_sandbox_id`, ...); no key starts with `fly_`.
    pub metadata: BTreeMap<String, String>,
    /// The app secrets version the machine must boot with (Fly `min_secrets_version`).
    pub min_secrets_version: Option<u64>,
}

/// A machine as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// Machine id.
    pub id: String,
    /// Fly state: `created`, `starting`, `started`, `stopping`, `stopped`, `suspended`,
    /// `replacing`, `destroying`, `destroyed`.
    pub state: String,
    /// Region.
    pub region: String,
    /// Id of the machine's current run (changes on every update), for `wait`.
    pub instance_id: String,
    /// Mounts.
    pub mounts: Vec<Mount>,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
    /// Last change, RFC 3339 (sorts as text).
    pub updated_at: String,
}

/// What `create volume` sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// Volume name (`kiloclaw_<sandbox id>`, see [`crate::ids::volume_name`]).
    pub name: String,
    /// Size, GB.
    pub size_gb: u32,
    /// Region.
    pub region: String,
    /// Compute hint: the guest the volume will be mounted into.
    pub compute: Guest,
    /// Fork this volume's data instead of starting empty.
    pub source_volume_id: Option<String>,
}

/// A volume as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Volume id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Region.
    pub region: String,
    /// State, e.g. `created`.
    pub state: String,
    /// The machine it is attached to.
    pub attached_machine_id: Option<String>,
}

/// Output of a command run in a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// Exit code (-1 when killed).
    pub exit_code: i32,
    /// Standard output, lossily UTF-8.
    pub stdout: String,
    /// Standard error, lossily UTF-8.
    pub stderr: String,
}

/// A byte stream to a machine's runtime port: TCP, TLS, or a socket in a sandbox's network
/// namespace.
pub trait UpstreamIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> UpstreamIo for T {}

/// How the proxy reaches a machine's runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// `Host` header to send.
    pub host: String,
    /// Extra headers (Fly: `fly-force-instance-id: <machine id>`).
    pub headers: Vec<(String, String)>,
}

/// A compute provider. Every method maps to one provider call; none retries (the instance
/// actor decides, per the reference's rules). `app` names the owner's app; machine and
/// volume ids are the provider's.
#[async_trait]
pub trait ComputeProvider: Send + Sync + 'static {
    /// `local` or `fly`.
    fn kind(&self) -> &'static str;

    /// Whether the app exists.
    async fn app_exists(&self, app: &str) -> ProviderResult<bool>;
    /// Creates the app (its private network). Errors: a conflict ([`ProviderError::is_conflict`])
    /// when it exists.
    async fn create_app(&self, app: &str) -> ProviderResult<()>;
    /// Deletes the app with everything in it (account deletion only).
    async fn delete_app(&self, app: &str) -> ProviderResult<()>;
    /// Allocates an address of `kind` (`v6` or `shared_v4`); already allocated is success.
    async fn allocate_ip(&self, app: &str, kind: &str) -> ProviderResult<()>;
    /// Sets an app secret; returns the app's new secrets version.
    async fn set_secret(&self, app: &str, name: &str, value: &str) -> ProviderResult<u64>;

    /// Creates a volume.
    async fn create_volume(&self, app: &str, spec: &VolumeSpec) -> ProviderResult<Volume>;
    /// Reads a volume. Errors: 404 when it does not exist.
    async fn get_volume(&self, app: &str, id: &str) -> ProviderResult<Volume>;
    /// Deletes a volume. Errors: 404 when it does not exist.
    async fn delete_volume(&self, app: &str, id: &str) -> ProviderResult<()>;

    /// Creates and launches a machine.
    async fn create_machine(&self, app: &str, spec: &MachineSpec) -> ProviderResult<Machine>;
    /// Reads a machine. Errors: 404 when it does not exist.
    async fn get_machine(&self, app: &str, id: &str) -> ProviderResult<Machine>;
    /// Replaces a machine's configuration and (re)launches it.
    async fn update_machine(
        &self,
        app: &str,
        id: &str,
        spec: &MachineSpec,
    ) -> ProviderResult<Machine>;
    /// Starts a stopped machine.
    async fn start_machine(&self, app: &str, id: &str) -> ProviderResult<()>;
    /// Stops a machine.
    async fn stop_machine(&self, app: &str, id: &str) -> ProviderResult<()>;
    /// Destroys a machine (`force=true`). Errors: 404 when it does not exist.
    async fn delete_machine(&self, app: &str, id: &str) -> ProviderResult<()>;
    /// Waits until the machine is in `state` (`started`, `stopped`, `suspended`,
    /// `destroyed`), at most `timeout` (Fly caps it at 60 s). Errors: 408 on timeout.
    async fn wait_machine(
        &self,
        app: &str,
        id: &str,
        state: &str,
        instance_id: Option<&str>,
        timeout: Duration,
    ) -> ProviderResult<()>;
    /// Machines of the app; with `filter = Some((key, value))`, those whose metadata has
    /// `key = value`.
    async fn list_machines(
        &self,
        app: &str,
        filter: Option<(&str, &str)>,
    ) -> ProviderResult<Vec<Machine>>;
    /// Runs `argv` in a started machine, at most `timeout`.
    async fn exec(
        &self,
        app: &str,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> ProviderResult<ExecOutput>;

    /// How to address the machine's runtime through a stream from [`ComputeProvider::dial`].
    fn upstream(&self, app: &str, id: &str) -> UpstreamTarget;
    /// Opens a stream to the machine's runtime port ([`RUNTIME_PORT`]).
    async fn dial(&self, app: &str, id: &str) -> ProviderResult<Box<dyn UpstreamIo>>;

    /// The provider's reports of machines whose runtime went down without being asked to
    /// (a crash, or a server restart that took the process with it), for [`crate::Claw`] to
    /// reconcile at once instead of at the next alarm. Taken once; `None` for providers that
    /// cannot watch their machines (Fly: the alarm's observation finds them).
    fn take_down_reports(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<MachineDown>> {
        None
    }
}

/// A machine whose runtime went down while it was meant to run
/// ([`ComputeProvider::take_down_reports`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineDown {
    /// The machine's app.
    pub app: String,
    /// The machine.
    pub machine_id: String,
    /// Its `kiloclaw_sandbox_id` metadata: which instance it is.
    pub sandbox_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_needs_the_status_and_the_body_marker() {
        let e = |s, b: &str| ProviderError::new("create machine", s, b);
        assert!(e(412, "insufficient resources available").is_capacity());
        assert!(e(409, "Insufficient Memory on host").is_capacity());
        assert!(!e(412, "min_secrets_version not met").is_capacity());
        assert!(!e(503, "insufficient resources").is_capacity());
        assert!(e(409, "app already exists").is_conflict());
        assert!(!e(409, "insufficient memory").is_conflict());
        assert!(e(404, "").is_not_found());
    }
}
