//! The `local` compute provider: Fly's model on one host. A machine is a bubblewrap-sandboxed
//! process running the runtime command in a network namespace of its own (nothing on the
//! host, not even loopback services such as the database, is reachable from inside; the
//! model gateway is forwarded in at `127.0.0.1:8787`); a volume is a directory mounted as its
//! `/root`; an app is a secret store. The proxy reaches a runtime through a socket opened
//! inside its namespace ([`SandboxedService::connect`]).
//!
//! Records (apps, secrets, volumes, machines) persist in `<root>/state.json` (mode 0600: it
//! holds the apps' env keys, as Fly's secret store does); processes do not survive the
//! server: after a restart a machine recorded `started` reports `stopped` until started
//! again, which is what the reconciliation and the proxy's restart-and-retry expect of a
//! crashed machine. The provider watches each runtime it started: one that exits without
//! being stopped, and every machine recorded `started` when the provider is created (its
//! process died with the previous server), is reported at once
//! ([`ComputeProvider::take_down_reports`]) so the instance is restarted within seconds.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kilocloud_agent::sandbox::{
    ExecRequest, LocalSandbox, SandboxProvider, SandboxedService, SessionMount,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::crypto::ENV_KEY_SECRET;
use crate::instance::META_SANDBOX;
use crate::provider::{
    ComputeProvider, ExecOutput, MOUNT_PATH, Machine, MachineDown, MachineSpec, ProviderError,
    ProviderResult, RUNTIME_PORT, UpstreamIo, UpstreamTarget, Volume, VolumeSpec,
};

/// Where the kilocloud binary appears inside a machine, for the built-in runtime.
pub const RUNTIME_EXE: &str = "/run/kilocloud/kilocloud";
/// How long a stopping runtime gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Longest output kept from an exec, bytes.
const EXEC_OUTPUT_CAP: usize = 1 << 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppRecord {
    secrets: BTreeMap<String, String>,
    secrets_version: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct VolumeRecord {
    app: String,
    volume: Volume,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MachineRecord {
    app: String,
    spec: MachineSpec,
    /// `created`, `started` or `stopped` as last commanded.
    state: String,
    instance_id: String,
    updated_at: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Records {
    apps: BTreeMap<String, AppRecord>,
    volumes: BTreeMap<String, VolumeRecord>,
    machines: BTreeMap<String, MachineRecord>,
}

/// The `local` provider.
pub struct LocalProvider {
    root: PathBuf,
    sandbox: LocalSandbox,
    /// The runtime's argv inside the machine.
    command: Vec<String>,
    /// Host paths mounted read-only into machines (the kilocloud binary).
    ro_binds: Vec<(PathBuf, String)>,
    /// The host address forwarded into each machine at `127.0.0.1:8787` (the model gateway).
    forward: Option<SocketAddr>,
    records: Mutex<Records>,
    running: Arc<tokio::sync::Mutex<HashMap<String, SandboxedService>>>,
    /// Where runtimes that went down are reported, and the receiving end until taken.
    down: tokio::sync::mpsc::UnboundedSender<MachineDown>,
    down_reports: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<MachineDown>>>,
}

fn err(operation: &str, status: u16, body: impl Into<String>) -> ProviderError {
    ProviderError::new(operation, status, body)
}

fn io_err(operation: &str, e: impl std::fmt::Display) -> ProviderError {
    err(operation, 500, e.to_string())
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..14].to_owned()
}

impl LocalProvider {
    /// A provider keeping records and volumes under `root`, running machines with
    /// `sandbox`. `command` empty runs the built-in runtime (this binary's `claw-runtime`,
    /// mounted at [`RUNTIME_EXE`]); `forward` is the server address runtimes reach the
    /// model gateway at.
    ///
    /// Errors: the records file exists but cannot be read.
    pub fn new(
        root: PathBuf,
        sandbox: LocalSandbox,
        command: Vec<String>,
        forward: Option<SocketAddr>,
    ) -> Result<Self, String> {
        let (command, ro_binds) = if command.is_empty() {
            let exe = std::env::current_exe()
                .map_err(|e| format!("cannot find this executable for the runtime: {e}"))?;
            (
                vec![RUNTIME_EXE.to_owned(), "claw-runtime".to_owned()],
                vec![(exe, RUNTIME_EXE.to_owned())],
            )
        } else {
            (command, Vec::new())
        };
        let records = match std::fs::read(root.join("state.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: {e}", root.join("state.json").display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Records::default(),
            Err(e) => return Err(format!("{}: {e}", root.join("state.json").display())),
        };
        let (down, down_reports) = tokio::sync::mpsc::unbounded_channel();
        // Nothing runs yet: every machine meant to run lost its process with the previous
        // server.
        for (id, m) in records
            .machines
            .iter()
            .filter(|(_, m)| m.state == "started")
        {
            let _ = down.send(down_report(id, m));
        }
        Ok(Self {
            root,
            sandbox,
            command,
            ro_binds,
            forward,
            records: Mutex::new(records),
            running: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
            down,
            down_reports: Mutex::new(Some(down_reports)),
        })
    }

    fn volume_dir(&self, id: &str) -> PathBuf {
        self.root.join("volumes").join(id)
    }

    /// Machine `id` with `volume` as its `/root` and `/root/clawd` as its workspace.
    fn mount(&self, id: &str, volume: &str) -> SessionMount {
        let host_home = self.volume_dir(volume);
        SessionMount {
            sandbox_id: format!("claw-{id}"),
            host_workspace: host_home.join("clawd"),
            host_home,
            workspace: format!("{MOUNT_PATH}/clawd"),
            home: MOUNT_PATH.to_owned(),
        }
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.root.join("logs").join(format!("{id}.log"))
    }

    /// Applies `f` to the records and saves them (atomically: a temp file renamed over).
    fn update<T>(
        &self,
        operation: &str,
        f: impl FnOnce(&mut Records) -> ProviderResult<T>,
    ) -> ProviderResult<T> {
        let mut records = self.records.lock().unwrap();
        let mut next = records.clone();
        let out = f(&mut next)?;
        save(&self.root, &next).map_err(|e| io_err(operation, e))?;
        *records = next;
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&Records) -> T) -> T {
        f(&self.records.lock().unwrap())
    }

    fn machine_record(
        &self,
        app: &str,
        id: &str,
        operation: &str,
    ) -> ProviderResult<MachineRecord> {
        self.read(|r| r.machines.get(id).filter(|m| m.app == app).cloned())
            .ok_or_else(|| err(operation, 404, "machine not found"))
    }

    /// The machine as reported: a `started` record whose process is gone is `stopped`.
    async fn report(&self, id: &str, record: &MachineRecord) -> Machine {
        let mut state = record.state.clone();
        if state == "started" {
            let running = self.running.lock().await;
            let alive = running.get(id).is_some_and(|s| !s.has_exited());
            if !alive {
                state = "stopped".into();
            }
        }
        Machine {
            id: id.to_owned(),
            state,
            region: record.spec.region.clone(),
            instance_id: record.instance_id.clone(),
            mounts: record.spec.mounts.clone(),
            metadata: record.spec.metadata.clone(),
            updated_at: record.updated_at.clone(),
        }
    }

    /// Starts the machine's process (replacing a previous one).
    async fn launch(&self, app: &str, id: &str, spec: &MachineSpec) -> ProviderResult<()> {
        let op = "start machine";
        let volume = spec
            .mounts
            .iter()
            .find(|m| m.path == MOUNT_PATH)
            .ok_or_else(|| err(op, 400, "no volume mounted at /root"))?;
        if !self.volume_dir(&volume.volume).is_dir() {
            return Err(err(op, 400, format!("volume {} not found", volume.volume)));
        }
        let (secrets, version) = self.read(|r| {
            r.apps
                .get(app)
                .map(|a| (a.secrets.clone(), a.secrets_version))
                .unwrap_or_default()
        });
        if spec.min_secrets_version.is_some_and(|v| v > version) {
            return Err(err(op, 400, "min_secrets_version not met"));
        }
        let mount = self.mount(id, &volume.volume);
        std::fs::create_dir_all(&mount.host_workspace).map_err(|e| io_err(op, e))?;
        self.hand_over_volume(&mount.host_home)
            .map_err(|e| io_err(op, e))?;
        let mut env: Vec<(String, String)> = spec.env.clone().into_iter().collect();
        env.extend(secrets);
        let request = ExecRequest {
            argv: self.command.clone(),
            env,
            stdin: None,
            cwd: Some(MOUNT_PATH.to_owned()),
            timeout: Duration::MAX,
            output_cap: 0,
            forward: self.forward,
            ro_binds: self.ro_binds.clone(),
        };
        let log_path = self.log_path(id);
        std::fs::create_dir_all(log_path.parent().expect("logs dir")).map_err(|e| io_err(op, e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io_err(op, e))?;
        self.stop_process(id).await;
        self.sandbox
            .ensure_limits(&mount.sandbox_id)
            .map_err(|e| io_err(op, e))?;
        let service = self
            .sandbox
            .spawn(&mount, &request, log)
            .await
            .map_err(|e| io_err(op, e))?;
        self.watch(app, id, spec, &service);
        self.running.lock().await.insert(id.to_owned(), service);
        Ok(())
    }

    /// Reports `service` as down when it exits while it is still the machine's process
    /// (a stop or a relaunch removes it from `running` first, so those are not reported).
    fn watch(&self, app: &str, id: &str, spec: &MachineSpec, service: &SandboxedService) {
        let exited = service.exited();
        let pid = service.command_pid();
        let running = self.running.clone();
        let down = self.down.clone();
        let report = MachineDown {
            app: app.to_owned(),
            machine_id: id.to_owned(),
            sandbox_id: spec.metadata.get(META_SANDBOX).cloned().unwrap_or_default(),
        };
        tokio::spawn(async move {
            exited.await;
            let current = running
                .lock()
                .await
                .get(&report.machine_id)
                .map(SandboxedService::command_pid);
            if current == Some(pid) {
                tracing::warn!(machine = %report.machine_id, "the runtime exited on its own");
                let _ = down.send(report);
            }
        });
    }

    /// Gives a volume to the sandbox's host user: all of it when its top directory is not
    /// the user's yet (a new volume, or one written before sandboxes had their own user),
    /// else only its workspace directory, since everything the runtime writes is its own.
    fn hand_over_volume(&self, dir: &Path) -> Result<(), kilocloud_agent::sandbox::SandboxError> {
        use std::os::unix::fs::MetadataExt as _;
        let Some((uid, gid)) = self.sandbox.host_identity() else {
            return Ok(());
        };
        let meta = std::fs::metadata(dir)?;
        if meta.uid() != uid || meta.gid() != gid {
            return self.sandbox.hand_over(dir);
        }
        self.sandbox.hand_over(&dir.join("clawd"))
    }

    async fn stop_process(&self, id: &str) {
        let service = self.running.lock().await.remove(id);
        if let Some(service) = service {
            service.stop(STOP_GRACE).await;
        }
    }

    fn set_state(&self, id: &str, state: &str, op: &str) -> ProviderResult<()> {
        self.update(op, |r| {
            let m = r
                .machines
                .get_mut(id)
                .ok_or_else(|| err(op, 404, "machine not found"))?;
            m.state = state.to_owned();
            m.updated_at = now_rfc3339();
            Ok(())
        })
    }

    /// Attaches the `/root` volume of `spec` to `id`, detaching any other volume of it.
    fn attach(
        r: &mut Records,
        app: &str,
        id: &str,
        spec: &MachineSpec,
        op: &str,
    ) -> ProviderResult<()> {
        for m in &spec.mounts {
            let v = r
                .volumes
                .get(&m.volume)
                .filter(|v| v.app == app)
                .ok_or_else(|| err(op, 400, format!("volume {} not found", m.volume)))?;
            if v.volume
                .attached_machine_id
                .as_deref()
                .is_some_and(|a| a != id)
            {
                return Err(err(op, 409, "volume is attached to another machine"));
            }
        }
        detach(r, id);
        for m in &spec.mounts {
            if let Some(v) = r.volumes.get_mut(&m.volume) {
                v.volume.attached_machine_id = Some(id.to_owned());
            }
        }
        Ok(())
    }

    /// Waits for the runtime to accept connections, or for its process to die.
    async fn wait_listening(&self, id: &str, timeout: Duration) -> ProviderResult<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let connector = {
                let mut running = self.running.lock().await;
                let Some(service) = running.get_mut(id) else {
                    return Err(err("wait machine", 408, "machine is not running"));
                };
                if service.has_exited() {
                    return Err(err(
                        "wait machine",
                        408,
                        format!("the runtime exited; see {}", self.log_path(id).display()),
                    ));
                }
                service.connector()
            };
            if connector.connect(RUNTIME_PORT).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(err("wait machine", 408, "deadline_exceeded"));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// The report of machine `id` (recorded as `m`) gone down.
fn down_report(id: &str, m: &MachineRecord) -> MachineDown {
    MachineDown {
        app: m.app.clone(),
        machine_id: id.to_owned(),
        sandbox_id: m
            .spec
            .metadata
            .get(META_SANDBOX)
            .cloned()
            .unwrap_or_default(),
    }
}

/// Detaches whatever volume machine `id` has.
fn detach(r: &mut Records, id: &str) {
    for v in r.volumes.values_mut() {
        if v.volume.attached_machine_id.as_deref() == Some(id) {
            v.volume.attached_machine_id = None;
        }
    }
}

/// Removes machine `id`'s record and detaches its volume.
fn forget_machine(r: &mut Records, id: &str) {
    r.machines.remove(id);
    detach(r, id);
}

fn save(root: &Path, records: &Records) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(root)?;
    let tmp = root.join("state.json.tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(records).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(tmp, root.join("state.json"))
}

#[async_trait]
impl ComputeProvider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn app_exists(&self, app: &str) -> ProviderResult<bool> {
        Ok(self.read(|r| r.apps.contains_key(app)))
    }

    async fn create_app(&self, app: &str) -> ProviderResult<()> {
        self.update("create app", |r| {
            if r.apps.contains_key(app) {
                return Err(err("create app", 409, "app already exists"));
            }
            r.apps.insert(app.to_owned(), AppRecord::default());
            Ok(())
        })
    }

    async fn delete_app(&self, app: &str) -> ProviderResult<()> {
        let machines: Vec<String> = self.read(|r| {
            r.machines
                .iter()
                .filter(|(_, m)| m.app == app)
                .map(|(id, _)| id.clone())
                .collect()
        });
        for id in machines {
            self.delete_machine(app, &id).await?;
        }
        let volumes: Vec<String> = self.read(|r| {
            r.volumes
                .iter()
                .filter(|(_, v)| v.app == app)
                .map(|(id, _)| id.clone())
                .collect()
        });
        for id in volumes {
            self.delete_volume(app, &id).await?;
        }
        self.update("delete app", |r| {
            r.apps
                .remove(app)
                .map(|_| ())
                .ok_or_else(|| err("delete app", 404, "app not found"))
        })
    }

    async fn allocate_ip(&self, app: &str, _kind: &str) -> ProviderResult<()> {
        // Machines are reached through their namespace, never by address.
        match self.app_exists(app).await? {
            true => Ok(()),
            false => Err(err("allocate ip", 404, "app not found")),
        }
    }

    async fn set_secret(&self, app: &str, name: &str, value: &str) -> ProviderResult<u64> {
        let op = "set secret";
        if name != ENV_KEY_SECRET && !crate::crypto::is_env_name(name) {
            return Err(err(op, 400, "a secret name is an env name"));
        }
        self.update(op, |r| {
            let a = r
                .apps
                .get_mut(app)
                .ok_or_else(|| err(op, 404, "app not found"))?;
            a.secrets.insert(name.to_owned(), value.to_owned());
            a.secrets_version += 1;
            Ok(a.secrets_version)
        })
    }

    async fn create_volume(&self, app: &str, spec: &VolumeSpec) -> ProviderResult<Volume> {
        let op = "create volume";
        if !self.app_exists(app).await? {
            return Err(err(op, 404, "app not found"));
        }
        let id = format!("vol_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let dir = self.volume_dir(&id);
        match &spec.source_volume_id {
            Some(source) => {
                let from = self.volume_dir(source);
                if !self.read(|r| r.volumes.contains_key(source)) || !from.is_dir() {
                    return Err(err(op, 404, "source volume not found"));
                }
                let out = tokio::process::Command::new("cp")
                    .arg("-a")
                    .arg(&from)
                    .arg(&dir)
                    .output()
                    .await
                    .map_err(|e| io_err(op, e))?;
                if !out.status.success() {
                    return Err(io_err(op, String::from_utf8_lossy(&out.stderr)));
                }
            }
            None => tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|e| io_err(op, e))?,
        }
        let volume = Volume {
            id: id.clone(),
            name: spec.name.clone(),
            region: spec.region.clone(),
            state: "created".into(),
            attached_machine_id: None,
        };
        self.update(op, |r| {
            r.volumes.insert(
                id,
                VolumeRecord {
                    app: app.to_owned(),
                    volume: volume.clone(),
                },
            );
            Ok(())
        })?;
        Ok(volume)
    }

    async fn get_volume(&self, app: &str, id: &str) -> ProviderResult<Volume> {
        self.read(|r| {
            r.volumes
                .get(id)
                .filter(|v| v.app == app)
                .map(|v| v.volume.clone())
        })
        .ok_or_else(|| err("get volume", 404, "volume not found"))
    }

    async fn delete_volume(&self, app: &str, id: &str) -> ProviderResult<()> {
        let op = "delete volume";
        self.update(op, |r| {
            let v = r
                .volumes
                .get(id)
                .filter(|v| v.app == app)
                .ok_or_else(|| err(op, 404, "volume not found"))?;
            if v.volume.attached_machine_id.is_some() {
                return Err(err(op, 412, "volume is attached to a machine"));
            }
            r.volumes.remove(id);
            Ok(())
        })?;
        match tokio::fs::remove_dir_all(self.volume_dir(id)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(op, e)),
            _ => Ok(()),
        }
    }

    async fn create_machine(&self, app: &str, spec: &MachineSpec) -> ProviderResult<Machine> {
        let op = "create machine";
        let id = short_id();
        let record = MachineRecord {
            app: app.to_owned(),
            spec: spec.clone(),
            state: "created".into(),
            instance_id: short_id().to_uppercase(),
            updated_at: now_rfc3339(),
        };
        self.update(op, |r| {
            if !r.apps.contains_key(app) {
                return Err(err(op, 404, "app not found"));
            }
            Self::attach(r, app, &id, spec, op)?;
            r.machines.insert(id.clone(), record.clone());
            Ok(())
        })?;
        if let Err(e) = self.launch(app, &id, spec).await {
            // Create is all or nothing: a machine that did not start is removed, so the
            // caller (who never learnt its id) can create again with the same volume.
            self.update(op, |r| {
                forget_machine(r, &id);
                Ok(())
            })?;
            return Err(e);
        }
        self.set_state(&id, "started", op)?;
        let record = self.machine_record(app, &id, op)?;
        Ok(self.report(&id, &record).await)
    }

    async fn get_machine(&self, app: &str, id: &str) -> ProviderResult<Machine> {
        let record = self.machine_record(app, id, "get machine")?;
        Ok(self.report(id, &record).await)
    }

    async fn update_machine(
        &self,
        app: &str,
        id: &str,
        spec: &MachineSpec,
    ) -> ProviderResult<Machine> {
        let op = "update machine";
        self.update(op, |r| {
            if r.machines.get(id).is_none_or(|m| m.app != app) {
                return Err(err(op, 404, "machine not found"));
            }
            Self::attach(r, app, id, spec, op)?;
            let m = r.machines.get_mut(id).expect("checked");
            m.spec = spec.clone();
            m.instance_id = short_id().to_uppercase();
            m.updated_at = now_rfc3339();
            Ok(())
        })?;
        self.launch(app, id, spec).await?;
        self.set_state(id, "started", op)?;
        self.get_machine(app, id).await
    }

    async fn start_machine(&self, app: &str, id: &str) -> ProviderResult<()> {
        let record = self.machine_record(app, id, "start machine")?;
        self.launch(app, id, &record.spec).await?;
        self.set_state(id, "started", "start machine")
    }

    async fn stop_machine(&self, app: &str, id: &str) -> ProviderResult<()> {
        self.machine_record(app, id, "stop machine")?;
        self.stop_process(id).await;
        self.set_state(id, "stopped", "stop machine")
    }

    async fn delete_machine(&self, app: &str, id: &str) -> ProviderResult<()> {
        let op = "delete machine";
        self.machine_record(app, id, op)?;
        self.stop_process(id).await;
        self.update(op, |r| {
            forget_machine(r, id);
            Ok(())
        })?;
        self.sandbox.release_limits(&format!("claw-{id}"));
        let _ = tokio::fs::remove_file(self.log_path(id)).await;
        Ok(())
    }

    async fn wait_machine(
        &self,
        app: &str,
        id: &str,
        state: &str,
        _instance_id: Option<&str>,
        timeout: Duration,
    ) -> ProviderResult<()> {
        let op = "wait machine";
        let machine = match self.get_machine(app, id).await {
            Err(e) if e.is_not_found() && state == "destroyed" => return Ok(()),
            other => other?,
        };
        match (state, machine.state.as_str()) {
            ("started", "started") => {
                self.wait_listening(id, timeout.min(Duration::from_secs(60)))
                    .await
            }
            (wanted, actual) if wanted == actual => Ok(()),
            _ => Err(err(op, 408, "deadline_exceeded")),
        }
    }

    async fn list_machines(
        &self,
        app: &str,
        filter: Option<(&str, &str)>,
    ) -> ProviderResult<Vec<Machine>> {
        let records: Vec<(String, MachineRecord)> = self.read(|r| {
            r.machines
                .iter()
                .filter(|(_, m)| m.app == app)
                .filter(|(_, m)| {
                    filter.is_none_or(|(k, v)| m.spec.metadata.get(k).is_some_and(|x| x == v))
                })
                .map(|(id, m)| (id.clone(), m.clone()))
                .collect()
        });
        let mut out = Vec::with_capacity(records.len());
        for (id, record) in records {
            out.push(self.report(&id, &record).await);
        }
        Ok(out)
    }

    async fn exec(
        &self,
        app: &str,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> ProviderResult<ExecOutput> {
        let op = "exec";
        let machine = self.get_machine(app, id).await?;
        if machine.state != "started" {
            return Err(err(op, 412, "machine is not started"));
        }
        let record = self.machine_record(app, id, op)?;
        let volume = record
            .spec
            .mounts
            .first()
            .ok_or_else(|| err(op, 400, "no volume"))?;
        let mount = self.mount(id, &volume.volume);
        let argv = match argv.first().map(String::as_str) {
            // The built-in runtime's commands run the same binary.
            Some("claw-runtime") if !self.ro_binds.is_empty() => {
                std::iter::once(RUNTIME_EXE.to_owned())
                    .chain(argv.iter().cloned())
                    .collect()
            }
            _ => argv.to_vec(),
        };
        let (secrets, _) = self.read(|r| {
            r.apps
                .get(app)
                .map(|a| (a.secrets.clone(), a.secrets_version))
                .unwrap_or_default()
        });
        let mut env: Vec<(String, String)> = record.spec.env.clone().into_iter().collect();
        env.extend(secrets);
        let request = ExecRequest {
            argv,
            env,
            stdin: None,
            cwd: Some(MOUNT_PATH.to_owned()),
            timeout,
            output_cap: EXEC_OUTPUT_CAP,
            forward: self.forward,
            ro_binds: self.ro_binds.clone(),
        };
        let out = self
            .sandbox
            .exec(&mount, request, &CancellationToken::new())
            .await
            .map_err(|e| io_err(op, e))?;
        Ok(ExecOutput {
            exit_code: out.exit_code.unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn take_down_reports(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<MachineDown>> {
        self.down_reports.lock().unwrap().take()
    }

    fn upstream(&self, _app: &str, _id: &str) -> UpstreamTarget {
        UpstreamTarget {
            host: format!("127.0.0.1:{RUNTIME_PORT}"),
            headers: Vec::new(),
        }
    }

    async fn dial(&self, _app: &str, id: &str) -> ProviderResult<Box<dyn UpstreamIo>> {
        let connector = self
            .running
            .lock()
            .await
            .get(id)
            .map(SandboxedService::connector)
            .ok_or_else(|| err("dial", 0, "machine is not running"))?;
        let stream = connector
            .connect(RUNTIME_PORT)
            .await
            .map_err(|e| err("dial", 0, e.to_string()))?;
        Ok(Box::new(stream))
    }
}
