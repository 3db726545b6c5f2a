//! Sandbox providers behind one trait ([`SandboxProvider`]): `local` runs every command in a
//! fresh bubblewrap namespace sandbox (read-only system, the session's workspace and home
//! writable, private `/tmp`, no network, all capabilities dropped, a cgroup per sandbox for
//! memory and process count, a wall-clock limit per command); `process` runs commands as plain
//! child processes and is refused unless `agent.sandbox.allow_unsandboxed` is set.
//!
//! A sandbox here is a directory and a cgroup, not a long-lived process: its sessions share
//! its limits (memory, processes) and its directory, but each command sees only its own
//! session's workspace and home, so one session never reads another's files even when they
//! share a sandbox. The workspace's `.git` is mounted read-only inside (as Codex does): the
//! agent edits files, the platform commits them with a git that reads no agent-written config
//! or hooks.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Which provider runs sessions' commands (`agent.sandbox.provider`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// bubblewrap namespaces with cgroup limits (Linux).
    #[default]
    Local,
    /// Plain child processes: no isolation at all; needs `allow_unsandboxed = true`.
    Process,
}

/// `agent.sandbox`: provider, sharing policy and limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// The provider. Default `local`.
    pub provider: ProviderKind,
    /// Allows the `process` provider (no isolation). Default false.
    pub allow_unsandboxed: bool,
    /// One sandbox per owner and user (`shared`, default) or per session (`per-session`).
    pub policy: crate::ids::SandboxPolicy,
    /// Host directory holding the sandboxes. Default empty: `<data_dir>/sandboxes`.
    pub root: PathBuf,
    /// The bubblewrap executable. Default `bwrap` (found on `PATH`).
    pub bwrap: PathBuf,
    /// Memory of one sandbox (all its processes), bytes. Default 2 GiB.
    pub memory_limit_bytes: u64,
    /// Processes and threads of one sandbox. Default 512.
    pub pids_limit: u32,
    /// The host user id sandboxed commands run as when the server runs as root (bubblewrap
    /// is started as this user, so the sandbox's uid 1000 is this uid outside, never root).
    /// Must not be 0. A server that is not root runs them as itself. Default 65534
    /// (`nobody`); a uid no other process uses is better still.
    pub host_uid: u32,
    /// The host group id to go with [`SandboxConfig::host_uid`]. Default 65534 (`nogroup`).
    pub host_gid: u32,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            provider: ProviderKind::Local,
            allow_unsandboxed: false,
            policy: crate::ids::SandboxPolicy::Shared,
            root: PathBuf::new(),
            bwrap: PathBuf::from("bwrap"),
            memory_limit_bytes: 2 << 30,
            pids_limit: 512,
            host_uid: 65534,
            host_gid: 65534,
        }
    }
}

/// Why a sandbox could not run a command.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The provider cannot work on this machine; the message says how to fix it.
    #[error("sandbox unavailable: {0}")]
    Unavailable(String),
    /// Starting or talking to the sandbox failed (I/O); may work on a retry.
    #[error("sandbox failure: {0}")]
    Io(#[from] std::io::Error),
}

/// One session's directories: on the host, and as the sandboxed command sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionMount {
    /// The sandbox these belong to.
    pub sandbox_id: String,
    /// Workspace directory on the host.
    pub host_workspace: PathBuf,
    /// Home directory on the host.
    pub host_home: PathBuf,
    /// Workspace path inside the sandbox (`/workspace/<owner>/sessions/<sid>` under `local`).
    pub workspace: String,
    /// Home path inside the sandbox (`/home/<sid>` under `local`).
    pub home: String,
}

/// One command to run.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Program and arguments (the program is looked up on the sandbox's `PATH`).
    pub argv: Vec<String>,
    /// Environment besides `PATH`, `HOME` and `TMPDIR`, which the sandbox sets.
    pub env: Vec<(String, String)>,
    /// Bytes written to the command's standard input (then closed); `None`: empty input.
    pub stdin: Option<Vec<u8>>,
    /// Working directory inside the sandbox; `None`: the workspace.
    pub cwd: Option<String>,
    /// Wall-clock limit; the command and everything it started are killed after it.
    pub timeout: Duration,
    /// Most bytes kept of each of stdout and stderr; the rest is read and dropped.
    pub output_cap: usize,
    /// A server on the host (the model gateway) the command may reach, at
    /// [`SandboxProvider::forwarded_url`]; nothing else is reachable.
    pub forward: Option<std::net::SocketAddr>,
    /// Host paths mounted read-only at the given paths inside (a `local` sandbox; the
    /// `process` provider runs on the host and ignores them).
    pub ro_binds: Vec<(PathBuf, String)>,
}

impl ExecRequest {
    /// `sh -c <script>` with the given limits and no extra environment.
    pub fn shell(script: &str, timeout: Duration, output_cap: usize) -> Self {
        Self {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: Vec::new(),
            stdin: None,
            cwd: None,
            timeout,
            output_cap,
            forward: None,
            ro_binds: Vec::new(),
        }
    }
}

/// What a command did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecOutput {
    /// Exit status; `None` when killed by a signal (then `signal` is set).
    pub exit_code: Option<i32>,
    /// The signal that ended it, if any (9 after a timeout, an interrupt or the OOM killer).
    pub signal: Option<i32>,
    /// Standard output, at most `output_cap` bytes.
    #[serde(skip)]
    pub stdout: Vec<u8>,
    /// Standard error, at most `output_cap` bytes.
    #[serde(skip)]
    pub stderr: Vec<u8>,
    /// Whether output beyond `output_cap` was dropped.
    pub truncated: bool,
    /// Whether the wall-clock limit killed it.
    pub timed_out: bool,
    /// Whether an interrupt killed it.
    pub cancelled: bool,
    /// Run time, ms.
    pub duration_ms: u64,
}

impl ExecOutput {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// Stdout then stderr as lossy UTF-8, with a note when cut, killed or timed out.
    pub fn combined_text(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.stdout).into_owned();
        if !self.stderr.is_empty() {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&String::from_utf8_lossy(&self.stderr));
        }
        if self.truncated {
            text.push_str("\n[output truncated]");
        }
        if self.timed_out {
            text.push_str("\n[killed: time limit reached]");
        } else if let Some(signal) = self.signal {
            text.push_str(&format!("\n[killed by signal {signal}]"));
        }
        text
    }
}

/// Runs sessions' commands in sandboxes.
#[async_trait]
pub trait SandboxProvider: Send + Sync + 'static {
    /// `local` or `process`.
    fn kind(&self) -> &'static str;

    /// Checks that the provider can work here. Errors: [`SandboxError::Unavailable`] saying
    /// what to install or configure.
    async fn check(&self) -> Result<(), SandboxError>;

    /// Creates (idempotently) the sandbox and the session's workspace and home, returning
    /// their paths. `workspace` and `home` are the paths inside the sandbox
    /// ([`crate::ids::workspace_path`], [`crate::ids::home_path`]).
    async fn prepare(
        &self,
        sandbox_id: &str,
        workspace: &str,
        home: &str,
    ) -> Result<SessionMount, SandboxError>;

    /// Runs one command for the session of `mount`; `cancel` kills it early.
    async fn exec(
        &self,
        mount: &SessionMount,
        request: ExecRequest,
        cancel: &CancellationToken,
    ) -> Result<ExecOutput, SandboxError>;

    /// Removes the session's workspace and home (and the sandbox when it has no other
    /// session). Missing directories are not an error.
    async fn remove(&self, mount: &SessionMount) -> Result<(), SandboxError>;

    /// After the host wrote into the session's workspace or home (a clone, a checkout):
    /// gives what it wrote to the sandbox's user, so commands inside can change it. The
    /// workspace's `.git` stays the host's. Default: nothing to do.
    ///
    /// Errors: [`SandboxError::Io`].
    async fn adopt_host_writes(&self, mount: &SessionMount) -> Result<(), SandboxError> {
        let _ = mount;
        Ok(())
    }

    /// The URL at which a command whose request sets `forward` reaches `url` (a server on the
    /// host at that address): the same URL without a network namespace; under `local`, the
    /// same path on `127.0.0.1:`[`FORWARD_PORT`] inside the sandbox's own loopback.
    fn forwarded_url(&self, url: &url::Url) -> url::Url;
}

/// The port inside a `local` sandbox where a forwarded host server is reachable.
pub const FORWARD_PORT: u16 = 8787;

/// The provider `config` names, with sandboxes under `root`.
///
/// Errors: [`SandboxError::Unavailable`] for `process` without `allow_unsandboxed`.
pub fn provider(
    config: &SandboxConfig,
    root: PathBuf,
) -> Result<std::sync::Arc<dyn SandboxProvider>, SandboxError> {
    Ok(match config.provider {
        ProviderKind::Local => std::sync::Arc::new(LocalSandbox::new(config, root)),
        ProviderKind::Process if config.allow_unsandboxed => {
            std::sync::Arc::new(ProcessSandbox { root })
        }
        ProviderKind::Process => {
            return Err(SandboxError::Unavailable(
                "the `process` provider runs agents without any isolation; set \
                 agent.sandbox.allow_unsandboxed = true to accept that, or use `local`"
                    .into(),
            ));
        }
    })
}

const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Files of the host's `/etc` replaced by an empty file inside (credentials, host keys).
const HIDDEN_ETC_FILES: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/security/opasswd",
];

/// Directories of the host's `/etc` replaced by an empty directory inside.
const HIDDEN_ETC_DIRS: &[&str] = &["/etc/ssl/private", "/etc/sudoers.d", "/etc/kilocloud"];

/// bubblewrap namespace sandboxes with one cgroup per sandbox.
pub struct LocalSandbox {
    bwrap: PathBuf,
    root: PathBuf,
    memory_limit_bytes: u64,
    pids_limit: u32,
    cgroups: Option<Cgroups>,
    /// The read-only system part of every command line, computed once.
    system_args: Vec<OsString>,
    /// The host uid and gid bubblewrap is started as (the server is root), else `None`
    /// (bubblewrap runs as the server's own unprivileged user).
    identity: Option<(u32, u32)>,
    /// The seccomp programs every command runs under ([`crate::seccomp::programs`]).
    seccomp: Vec<Vec<u8>>,
}

impl LocalSandbox {
    /// A provider keeping sandboxes under `root`.
    pub fn new(config: &SandboxConfig, root: PathBuf) -> Self {
        let cgroups = Cgroups::detect();
        if cgroups.is_none() {
            tracing::warn!(
                "no writable cgroup (v1 pids+memory, or v2 with both controllers delegated): \
                 sandboxes fall back to per-process address-space limits and have no process \
                 limit"
            );
        }
        Self {
            bwrap: config.bwrap.clone(),
            root,
            memory_limit_bytes: config.memory_limit_bytes,
            pids_limit: config.pids_limit,
            cgroups,
            system_args: system_args(),
            identity: nix::unistd::geteuid()
                .is_root()
                .then_some((config.host_uid, config.host_gid)),
            seccomp: crate::seccomp::programs(),
        }
    }

    /// The host uid and gid sandboxed commands run as when the server is root; `None` when
    /// they run as the server's own user.
    pub fn host_identity(&self) -> Option<(u32, u32)> {
        self.identity
    }

    /// Gives `dir` and everything under it (except a top-level `.git`, which host-side git
    /// owns and the sandbox sees read-only) to the sandbox's host user, so a command inside
    /// can write what the host wrote there (a clone, a volume made by the server). Entries
    /// already owned by it are left alone; symbolic links are changed themselves, never
    /// followed. No-op when sandboxes run as the server's own user.
    ///
    /// Errors: [`SandboxError::Io`] when an entry cannot be changed.
    pub fn hand_over(&self, dir: &Path) -> Result<(), SandboxError> {
        hand_over(self.identity, dir)
    }

    /// Whether sandboxes get a cgroup (memory and process limits); otherwise only an
    /// address-space limit per process.
    pub fn has_cgroups(&self) -> bool {
        self.cgroups.is_some()
    }

    fn not_installed(&self) -> SandboxError {
        SandboxError::Unavailable(format!(
            "bubblewrap (`{}`) is not installed: install it (Debian/Ubuntu: `apt-get install \
             bubblewrap`; Fedora: `dnf install bubblewrap`) or set agent.sandbox.bwrap to its \
             path",
            self.bwrap.display()
        ))
    }

    /// Maps "bwrap not found" to [`SandboxError::Unavailable`] saying what to install.
    fn installed<T>(&self, result: Result<T, SandboxError>) -> Result<T, SandboxError> {
        match result {
            Err(SandboxError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(self.not_installed())
            }
            other => other,
        }
    }

    /// The bubblewrap command running `request` for `mount`, confined to the sandbox's
    /// cgroup, with `bridge`'s pipes and the request's `ro_binds` added. Returns
    /// the command and the files it reads at start (the open `cgroup.procs` files, the
    /// environment options and the seccomp programs), to keep open until it is spawned.
    ///
    /// Every `--setenv` (the session's secrets among them) reaches bubblewrap through a
    /// memory file it reads with `--args`, never its argv, which any local user can read in
    /// `ps`. When the server is root, bubblewrap starts as the configured host user.
    fn command(
        &self,
        mount: &SessionMount,
        request: &ExecRequest,
        bridge: Option<&Bridge>,
    ) -> Result<(tokio::process::Command, Vec<std::fs::File>), SandboxError> {
        let mut command = tokio::process::Command::new(&self.bwrap);
        // bubblewrap itself gets an empty environment: `--clearenv` clears only the final
        // command's, while bubblewrap's own processes (its pid 1 inside the namespace) keep
        // what they inherited, readable at `/proc/1/environ` inside.
        command.env_clear();
        // With a bridge, bubblewrap reports the sandbox's pid on one pipe and waits on
        // another until the forward listens inside the sandbox's network namespace.
        let mut inherit = Vec::new();
        if let Some(bridge) = bridge {
            command.args([
                "--info-fd".to_owned(),
                bridge.info_w.as_raw_fd().to_string(),
                "--block-fd".to_owned(),
                bridge.block_r.as_raw_fd().to_string(),
            ]);
            inherit.extend([bridge.info_w.as_raw_fd(), bridge.block_r.as_raw_fd()]);
        }
        let mut keep = Vec::new();
        for program in &self.seccomp {
            let file = memory_file("kilocloud-seccomp", program)?;
            command.args(["--add-seccomp-fd".to_owned(), raw_fd(&file).to_string()]);
            inherit.push(raw_fd(&file));
            keep.push(file);
        }
        let env = memory_file(
            "kilocloud-sandbox-env",
            &nul_separated(env_args(mount, request)),
        )?;
        inherit.push(raw_fd(&env));
        command.args(self.args(mount, request, raw_fd(&env)));
        keep.push(env);
        let joins = match &self.cgroups {
            Some(cgroups) => cgroups.open_procs(&mount.sandbox_id)?,
            None => Vec::new(),
        };
        let memory = (self.cgroups.is_none()).then_some(self.memory_limit_bytes);
        if let Some((uid, gid)) = self.identity {
            command.uid(uid).gid(gid);
        }
        confine(
            &mut command,
            joins.iter().map(raw_fd).collect(),
            inherit,
            memory,
        );
        keep.extend(joins);
        Ok((command, keep))
    }

    /// Creates (idempotently) the cgroup of `sandbox_id` with the configured limits, for
    /// sandboxes whose directories the caller manages itself (no [`SandboxProvider::prepare`]).
    ///
    /// Errors: [`SandboxError::Io`] when the cgroup cannot be set up.
    pub fn ensure_limits(&self, sandbox_id: &str) -> Result<(), SandboxError> {
        if let Some(cgroups) = &self.cgroups {
            cgroups.ensure(sandbox_id, self.memory_limit_bytes, self.pids_limit)?;
        }
        Ok(())
    }

    /// Gives `dir` itself (not its contents) to the sandbox's host user.
    fn hand_over_top(&self, dir: &Path) -> Result<(), SandboxError> {
        if let Some((uid, gid)) = self.identity {
            std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// Removes the cgroup of `sandbox_id` (after its last process ended).
    pub fn release_limits(&self, sandbox_id: &str) {
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove(sandbox_id);
        }
    }

    /// Starts `request.argv` as a long-running service in the sandbox of `mount` (its
    /// `timeout`, `stdin` and `output_cap` are ignored): its own network namespace, where
    /// `request.forward` (if any) is reachable at `127.0.0.1:`[`FORWARD_PORT`], and the
    /// request's `ro_binds` mounted. Output goes to `log`.
    /// The service runs until [`SandboxedService::stop`] or until it is dropped.
    ///
    /// Errors: [`SandboxError::Unavailable`] without bubblewrap; [`SandboxError::Io`].
    pub async fn spawn(
        &self,
        mount: &SessionMount,
        request: &ExecRequest,
        log: std::fs::File,
    ) -> Result<SandboxedService, SandboxError> {
        let bridge = Bridge::new(request.forward)?;
        let (mut command, joins) = self.command(mount, request, Some(&bridge))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        let child = self.installed(command.spawn().map_err(SandboxError::from))?;
        drop(joins);
        let group = child.id();
        let service = match bridge.open().await {
            Ok((pid, forward)) => {
                // One task owns the child and reaps it: exits are observed as they happen
                // (see [`SandboxedService::exited`]), without holding the service.
                let (tx, exited) = tokio::sync::watch::channel(false);
                let mut child = child;
                tokio::spawn(async move {
                    let _ = child.wait().await;
                    let _ = tx.send(true);
                });
                SandboxedService {
                    exited,
                    group,
                    pid,
                    _forward: AbortOnDrop(forward),
                }
            }
            Err(e) => {
                if let Some(group) = group {
                    kill_group(group);
                }
                return Err(SandboxError::Io(e));
            }
        };
        Ok(service)
    }

    /// bubblewrap's argv: namespaces, identity, mounts, then `--args env_fd` (the
    /// environment, [`env_args`]) and the command.
    fn args(&self, mount: &SessionMount, request: &ExecRequest, env_fd: i32) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "--die-with-parent",
            "--new-session",
            "--unshare-all",
            // A user namespace always (bubblewrap never runs as root here), and none inside
            // it: the sandbox cannot make a namespace where it holds capabilities.
            "--unshare-user",
            "--disable-userns",
            "--cap-drop",
            "ALL",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--hostname",
            "sandbox",
            "--clearenv",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.extend(self.system_args.iter().cloned());
        let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
            args.extend(items.iter().map(|i| i.as_ref().to_owned()));
        };
        push(&[&"--proc", &"/proc", &"--dev", &"/dev", &"--tmpfs", &"/tmp"]);
        push(&[&"--bind", &mount.host_workspace, &mount.workspace]);
        let git = mount.host_workspace.join(".git");
        if git.is_dir() {
            push(&[&"--ro-bind", &git, &format!("{}/.git", mount.workspace)]);
        }
        push(&[&"--bind", &mount.host_home, &mount.home]);
        for (host, inside) in &request.ro_binds {
            push(&[&"--ro-bind", host, inside]);
        }
        // The root is bubblewrap's tmpfs holding the mount points: read-only too.
        push(&[&"--remount-ro", &"/"]);
        let cwd = request.cwd.as_deref().unwrap_or(&mount.workspace);
        push(&[&"--chdir", &cwd]);
        // After `--clearenv`: bubblewrap applies its options in order.
        push(&[&"--args", &env_fd.to_string()]);
        push(&[&"--"]);
        args.extend(request.argv.iter().map(OsString::from));
        args
    }
}

/// The `--setenv` options of `request` for `mount`: `PATH`, `HOME`, `TMPDIR`, `LANG`, then
/// the request's own variables.
fn env_args(mount: &SessionMount, request: &ExecRequest) -> Vec<String> {
    let fixed = [
        ("PATH", SANDBOX_PATH),
        ("HOME", mount.home.as_str()),
        ("TMPDIR", "/tmp"),
        ("LANG", "C.UTF-8"),
    ];
    fixed
        .into_iter()
        .chain(request.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .flat_map(|(k, v)| ["--setenv".to_owned(), k.to_owned(), v.to_owned()])
        .collect()
}

/// `args` as bubblewrap's `--args` reads them: each followed by a NUL.
fn nul_separated(args: Vec<String>) -> Vec<u8> {
    let mut out = Vec::new();
    for arg in args {
        out.extend_from_slice(arg.as_bytes());
        out.push(0);
    }
    out
}

/// An anonymous memory file (close-on-exec) holding `bytes`, positioned at its start: how
/// bubblewrap is handed what must not be on its command line.
fn memory_file(name: &str, bytes: &[u8]) -> std::io::Result<std::fs::File> {
    use std::io::{Seek as _, Write as _};
    let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    file.seek(std::io::SeekFrom::Start(0))?;
    Ok(file)
}

/// [`LocalSandbox::hand_over`] for the host user `identity` (`None`: nothing to do).
fn hand_over(identity: Option<(u32, u32)>, dir: &Path) -> Result<(), SandboxError> {
    let Some((uid, gid)) = identity else {
        return Ok(());
    };
    use std::os::unix::fs::MetadataExt as _;
    let walk = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .filter_entry(|e| !(e.depth() == 1 && e.file_name() == ".git"));
    for entry in walk {
        let entry = entry.map_err(std::io::Error::other)?;
        let meta = entry.metadata().map_err(std::io::Error::other)?;
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// `--ro-bind` (or `--symlink` for merged-/usr links) of the system directories, and the
/// hidden parts of `/etc`.
fn system_args() -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    for dir in [
        "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
    ] {
        let path = Path::new(dir);
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(path) {
                    args.extend(["--symlink".into(), target.into(), dir.into()]);
                }
            }
            Ok(m) if m.is_dir() => args.extend(["--ro-bind".into(), dir.into(), dir.into()]),
            _ => {}
        }
    }
    let mut hidden_files: Vec<PathBuf> = HIDDEN_ETC_FILES.iter().map(PathBuf::from).collect();
    // SSH host private keys.
    if let Ok(entries) = std::fs::read_dir("/etc/ssh") {
        hidden_files.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with("_key")),
        );
    }
    for file in hidden_files {
        if file.exists() {
            args.extend(["--ro-bind".into(), "/dev/null".into(), file.into()]);
        }
    }
    for dir in HIDDEN_ETC_DIRS {
        if Path::new(dir).is_dir() {
            args.extend(["--tmpfs".into(), (*dir).into()]);
        }
    }
    args
}

#[async_trait]
impl SandboxProvider for LocalSandbox {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn check(&self) -> Result<(), SandboxError> {
        if self.identity.is_some_and(|(uid, _)| uid == 0) {
            return Err(SandboxError::Unavailable(
                "agent.sandbox.host_uid is 0: sandboxes must not run as root on the host; \
                 set an unprivileged uid (default 65534)"
                    .into(),
            ));
        }
        let mut probe = tokio::process::Command::new(&self.bwrap);
        probe
            .env_clear()
            .args([
                "--unshare-all",
                "--unshare-user",
                "--disable-userns",
                "--ro-bind",
                "/",
                "/",
                "--",
                "true",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = self.identity {
            probe.uid(uid).gid(gid);
        }
        let probe = probe.output().await;
        match probe {
            Ok(out) if out.status.success() => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(self.not_installed()),
            Err(e) => Err(SandboxError::Unavailable(format!(
                "cannot run bubblewrap (`{}`): {e}",
                self.bwrap.display()
            ))),
            Ok(out) => Err(SandboxError::Unavailable(format!(
                "bubblewrap cannot create namespaces here ({}): enable unprivileged user \
                 namespaces (`sysctl -w kernel.unprivileged_userns_clone=1`, or on Ubuntu \
                 24.04+ `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`), or run \
                 kilocloud as root",
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
        }
    }

    async fn prepare(
        &self,
        sandbox_id: &str,
        workspace: &str,
        home: &str,
    ) -> Result<SessionMount, SandboxError> {
        let (host_workspace, host_home) =
            session_dirs(&self.root, sandbox_id, workspace, home).await?;
        let mount = SessionMount {
            sandbox_id: sandbox_id.to_owned(),
            host_workspace,
            host_home,
            workspace: workspace.to_owned(),
            home: home.to_owned(),
        };
        // The sandbox user (uid 1000 inside) is the configured host user outside (or the
        // server's own user): it owns the session's directories.
        self.hand_over_top(&mount.host_workspace)?;
        self.hand_over_top(&mount.host_home)?;
        if let Some(cgroups) = &self.cgroups {
            cgroups.ensure(sandbox_id, self.memory_limit_bytes, self.pids_limit)?;
        }
        Ok(mount)
    }

    async fn exec(
        &self,
        mount: &SessionMount,
        request: ExecRequest,
        cancel: &CancellationToken,
    ) -> Result<ExecOutput, SandboxError> {
        let bridge = match request.forward {
            Some(target) => Some(Bridge::new(Some(target))?),
            None => None,
        };
        let (command, joins) = self.command(mount, &request, bridge.as_ref())?;
        let result = run(command, request, cancel, bridge).await;
        drop(joins);
        self.installed(result)
    }

    async fn adopt_host_writes(&self, mount: &SessionMount) -> Result<(), SandboxError> {
        let (workspace, home) = (mount.host_workspace.clone(), mount.host_home.clone());
        let this = (self.identity, workspace, home);
        tokio::task::spawn_blocking(move || {
            let (identity, workspace, home) = this;
            hand_over(identity, &workspace)?;
            hand_over(identity, &home)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    fn forwarded_url(&self, url: &url::Url) -> url::Url {
        let mut inside = url.clone();
        let _ = inside.set_scheme("http");
        let _ = inside.set_host(Some("127.0.0.1"));
        let _ = inside.set_port(Some(FORWARD_PORT));
        inside
    }

    async fn remove(&self, mount: &SessionMount) -> Result<(), SandboxError> {
        remove_dir(&mount.host_workspace).await?;
        remove_dir(&mount.host_home).await?;
        let base = self.root.join(&mount.sandbox_id);
        if !has_sessions(&base) {
            remove_dir(&base).await?;
            if let Some(cgroups) = &self.cgroups {
                cgroups.remove(&mount.sandbox_id);
            }
        }
        Ok(())
    }
}

/// Creates (idempotently) a session's workspace and home under `root/<sandbox_id>`, at the
/// host paths mirroring `workspace` and `home` (paths inside the sandbox); returns them.
async fn session_dirs(
    root: &Path,
    sandbox_id: &str,
    workspace: &str,
    home: &str,
) -> std::io::Result<(PathBuf, PathBuf)> {
    let base = root.join(sandbox_id);
    let host_workspace = base.join(workspace.trim_start_matches('/'));
    let host_home = base.join(home.trim_start_matches('/'));
    tokio::fs::create_dir_all(&host_workspace).await?;
    tokio::fs::create_dir_all(&host_home).await?;
    Ok((host_workspace, host_home))
}

/// Whether any `sessions/*` directory remains under the sandbox directory `base`.
fn has_sessions(base: &Path) -> bool {
    walkdir::WalkDir::new(base.join("workspace"))
        .max_depth(4)
        .into_iter()
        .flatten()
        .any(|e| {
            e.depth() > 0
                && e.path()
                    .parent()
                    .is_some_and(|p| p.file_name().is_some_and(|n| n == "sessions"))
        })
}

async fn remove_dir(path: &Path) -> Result<(), SandboxError> {
    match tokio::fs::remove_dir_all(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

fn raw_fd(file: &std::fs::File) -> i32 {
    file.as_raw_fd()
}

/// A forward of one host address into a sandbox's network namespace: the pipes bubblewrap
/// reports on and waits on, opened close-on-exec (only the sandbox's bubblewrap inherits them,
/// see [`confine`]).
struct Bridge {
    target: Option<std::net::SocketAddr>,
    info_r: OwnedFd,
    info_w: OwnedFd,
    block_r: OwnedFd,
    block_w: OwnedFd,
}

impl Bridge {
    fn new(target: Option<std::net::SocketAddr>) -> std::io::Result<Self> {
        let (info_r, info_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (block_r, block_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(Self {
            target,
            info_r,
            info_w,
            block_r,
            block_w,
        })
    }

    /// After bubblewrap started: reads the sandbox's pid, binds `127.0.0.1:FORWARD_PORT` in
    /// its network namespace when there is a target, lets the command start, and returns the
    /// pid and the task forwarding each connection to the target.
    async fn open(self) -> std::io::Result<(i32, tokio::task::JoinHandle<()>)> {
        let Bridge {
            target,
            info_r,
            info_w,
            block_r,
            block_w,
        } = self;
        drop((info_w, block_r));
        let (pid, listener) = tokio::task::spawn_blocking(
            move || -> std::io::Result<(i32, Option<std::net::TcpListener>)> {
                let mut info = std::fs::File::from(info_r);
                let mut text = Vec::new();
                let pid = loop {
                    let mut buf = [0u8; 1024];
                    let n = std::io::Read::read(&mut info, &mut buf)?;
                    if n == 0 {
                        return Err(std::io::Error::other(
                            "bubblewrap exited before reporting its pid",
                        ));
                    }
                    text.extend_from_slice(&buf[..n]);
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) {
                        break v["child-pid"]
                            .as_i64()
                            .ok_or_else(|| std::io::Error::other("no child-pid from bubblewrap"))?
                            as i32;
                    }
                };
                if target.is_none() {
                    return Ok((pid, None));
                }
                let listener = in_netns(pid, || {
                    let listener = bind_loopback(FORWARD_PORT)?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })?;
                Ok((pid, Some(listener)))
            },
        )
        .await
        .map_err(std::io::Error::other)??;
        nix::unistd::write(&block_w, b"x")?;
        let (Some(listener), Some(target)) = (listener, target) else {
            return Ok((pid, tokio::spawn(async {})));
        };
        let listener = tokio::net::TcpListener::from_std(listener)?;
        Ok((
            pid,
            tokio::spawn(async move {
                while let Ok((mut inside, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        if let Ok(mut host) = tokio::net::TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut inside, &mut host).await;
                        }
                    });
                }
            }),
        ))
    }
}

/// Binds `127.0.0.1:port` in the calling thread's network namespace. bubblewrap's child brings
/// the sandbox's loopback up after it has reported its pid, so right after that the address
/// may not exist yet (`EADDRNOTAVAIL`): retried every millisecond for up to a second.
fn bind_loopback(port: u16) -> std::io::Result<std::net::TcpListener> {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrNotAvailable
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            other => return other,
        }
    }
}

/// Runs `f` on a thread of its own inside the network namespace of process `pid`: setns
/// changes only the calling thread's namespace, so the thread ends right after; sockets it
/// created stay in that namespace.
fn in_netns<T: Send + 'static>(
    pid: i32,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let netns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        f()
    })
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
}

/// A long-running command in a sandbox ([`LocalSandbox::spawn`]): its process group is
/// killed when this is dropped.
pub struct SandboxedService {
    /// Turns true once bubblewrap (and so the command) has exited and was reaped.
    exited: tokio::sync::watch::Receiver<bool>,
    /// bubblewrap's pid, its process group's id.
    group: Option<u32>,
    /// The sandboxed command's pid (in the host's pid namespace).
    pid: i32,
    _forward: AbortOnDrop,
}

impl SandboxedService {
    /// bubblewrap's pid on the host (`None` once it was reaped).
    pub fn bwrap_pid(&self) -> Option<u32> {
        self.group
    }

    /// The sandboxed command's pid on the host.
    pub fn command_pid(&self) -> i32 {
        self.pid
    }

    /// Whether the service has exited (crashed, or stopped on its own).
    pub fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }

    /// Resolves when the service has exited, however it ended; usable without holding the
    /// service (a watcher of crashes).
    pub fn exited(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut exited = self.exited.clone();
        async move {
            let _ = exited.wait_for(|done| *done).await;
        }
    }

    /// A handle that opens connections inside the service's network namespace, usable
    /// without holding the service.
    pub fn connector(&self) -> NamespaceConnector {
        NamespaceConnector { pid: self.pid }
    }

    /// Stops the service: SIGTERM to its process group, SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if self.has_exited() {
            self.group = None;
            return;
        }
        if let Some(group) = self.group {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(group as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(grace, self.exited()).await.is_err() {
            if let Some(group) = self.group {
                kill_group(group);
            }
            self.exited().await;
        }
        // Reaped: its group id may be reused, so the drop must not signal it.
        self.group = None;
    }
}

/// Opens TCP connections inside a [`SandboxedService`]'s network namespace.
#[derive(Debug, Clone, Copy)]
pub struct NamespaceConnector {
    pid: i32,
}

impl NamespaceConnector {
    /// Connects to `127.0.0.1:port` inside the namespace, which nothing outside can
    /// otherwise reach.
    ///
    /// Errors: the connection's (refused while the service is not listening yet), or the
    /// namespace being gone with the service.
    pub async fn connect(self, port: u16) -> std::io::Result<tokio::net::TcpStream> {
        let pid = self.pid;
        let stream = tokio::task::spawn_blocking(move || {
            in_netns(pid, move || {
                std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                    Duration::from_secs(5),
                )
            })
        })
        .await
        .map_err(std::io::Error::other)??;
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        tokio::net::TcpStream::from_std(stream)
    }
}

impl Drop for SandboxedService {
    fn drop(&mut self) {
        if let Some(group) = self.group
            && !self.has_exited()
        {
            kill_group(group);
        }
    }
}

/// Between fork and exec of `command`: joins the cgroups whose `cgroup.procs` are open as
/// `joins` (writing "0" moves the writing process), so everything the sandbox starts is
/// counted there from its first instruction; or, without cgroups, caps the address space at
/// `memory` bytes. Clears close-on-exec on `inherit` (the bridge's pipes) so bubblewrap gets
/// them and no other child does. Also disables core dumps.
#[allow(unsafe_code)]
fn confine(
    command: &mut tokio::process::Command,
    joins: Vec<i32>,
    inherit: Vec<i32>,
    memory: Option<u64>,
) {
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // functions may be called: it calls only write(2) and fcntl(2) on descriptors opened by
    // the parent (kept open by the caller until spawn returns) and setrlimit(2); it allocates
    // nothing.
    unsafe {
        command.pre_exec(move || {
            for fd in &joins {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for fd in &inherit {
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            if let Some(bytes) = memory {
                let cap = libc::rlimit {
                    rlim_cur: bytes,
                    rlim_max: bytes,
                };
                libc::setrlimit(libc::RLIMIT_AS, &cap);
            }
            Ok(())
        });
    }
}

/// Spawns `command` in its own process group, feeds stdin, collects capped output, and kills
/// the group on timeout or cancellation.
async fn run(
    mut command: tokio::process::Command,
    request: ExecRequest,
    cancel: &CancellationToken,
    bridge: Option<Bridge>,
) -> Result<ExecOutput, SandboxError> {
    command
        .stdin(if request.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = command.spawn()?;
    let pid = child.id();
    let _forwarding = match bridge {
        None => None,
        Some(bridge) => match bridge.open().await {
            Ok((_, task)) => Some(AbortOnDrop(task)),
            Err(e) => {
                if let Some(pid) = pid {
                    kill_group(pid);
                }
                return Err(SandboxError::Io(e));
            }
        },
    };
    if let (Some(input), Some(mut stdin)) = (request.stdin, child.stdin.take()) {
        // A command that does not read its input must not block us: write in the background.
        tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
        });
    }
    let cap = request.output_cap;
    let stdout = tokio::spawn(read_capped(child.stdout.take(), cap));
    let stderr = tokio::spawn(read_capped(child.stderr.take(), cap));
    let mut out = ExecOutput::default();
    let status = tokio::select! {
        status = child.wait() => Some(status?),
        () = tokio::time::sleep(request.timeout) => { out.timed_out = true; None }
        () = cancel.cancelled() => { out.cancelled = true; None }
    };
    let status = match status {
        Some(status) => status,
        None => {
            if let Some(pid) = pid {
                kill_group(pid);
            }
            child.kill().await.ok();
            child.wait().await?
        }
    };
    // Readers end when every holder of the pipes has exited; a daemonized grandchild still
    // holding them would keep them open, so they get a short grace after the command.
    let grace = Duration::from_millis(200);
    let (so, st) = (
        tokio::time::timeout(grace, stdout).await,
        tokio::time::timeout(grace, stderr).await,
    );
    let (so, sot) = so.ok().and_then(|r| r.ok()).unwrap_or_default();
    let (se, set) = st.ok().and_then(|r| r.ok()).unwrap_or_default();
    use std::os::unix::process::ExitStatusExt;
    out.exit_code = status.code();
    out.signal = status.signal();
    out.stdout = so;
    out.stderr = se;
    out.truncated = sot || set;
    out.duration_ms = started.elapsed().as_millis() as u64;
    Ok(out)
}

/// Aborts a task when dropped (the forward of one command).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn kill_group(pid: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

async fn read_capped<R: AsyncRead + Unpin>(reader: Option<R>, cap: usize) -> (Vec<u8>, bool) {
    let Some(mut reader) = reader else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = [0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
    (kept, truncated)
}

/// The cgroup controllers sandboxes are confined with.
enum Cgroups {
    /// cgroup v1: separate `pids` and `memory` hierarchies; the paths are our own cgroups'
    /// `kilocloud` children.
    V1 { pids: PathBuf, memory: PathBuf },
    /// cgroup v2: one hierarchy; our delegated `kilocloud` cgroup.
    V2 { base: PathBuf },
}

impl Cgroups {
    /// The writable cgroup parents for sandboxes, if this process may create cgroups.
    fn detect() -> Option<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path_of = |controller: &str| {
            own.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == controller)
                    .then(|| path.trim_start_matches('/').to_owned())
            })
        };
        let root = Path::new("/sys/fs/cgroup");
        let cgroups = if root.join("cgroup.controllers").exists() {
            let own = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))?
                .trim_start_matches('/');
            let base = root.join(own).join("kilocloud");
            std::fs::create_dir_all(&base).ok()?;
            std::fs::write(base.join("cgroup.subtree_control"), "+pids +memory").ok()?;
            Cgroups::V2 { base }
        } else {
            let pids = root.join("pids").join(path_of("pids")?).join("kilocloud");
            let memory = root
                .join("memory")
                .join(path_of("memory")?)
                .join("kilocloud");
            std::fs::create_dir_all(&pids).ok()?;
            std::fs::create_dir_all(&memory).ok()?;
            Cgroups::V1 { pids, memory }
        };
        Some(cgroups)
    }

    fn dirs(&self, sandbox_id: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V1 { pids, memory } => vec![pids.join(sandbox_id), memory.join(sandbox_id)],
            Cgroups::V2 { base } => vec![base.join(sandbox_id)],
        }
    }

    /// Creates the sandbox's cgroup(s) with the limits (idempotent).
    fn ensure(&self, sandbox_id: &str, memory: u64, pids: u32) -> std::io::Result<()> {
        let dirs = self.dirs(sandbox_id);
        for dir in &dirs {
            std::fs::create_dir_all(dir)?;
        }
        match self {
            Cgroups::V1 { .. } => {
                std::fs::write(dirs[0].join("pids.max"), pids.to_string())?;
                std::fs::write(dirs[1].join("memory.limit_in_bytes"), memory.to_string())?;
                // No swap beyond the limit where the kernel accounts swap.
                let memsw = dirs[1].join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    let _ = std::fs::write(memsw, memory.to_string());
                }
            }
            Cgroups::V2 { .. } => {
                std::fs::write(dirs[0].join("pids.max"), pids.to_string())?;
                std::fs::write(dirs[0].join("memory.max"), memory.to_string())?;
                let _ = std::fs::write(dirs[0].join("memory.swap.max"), "0");
            }
        }
        Ok(())
    }

    /// `cgroup.procs` of the sandbox's cgroup(s), open for writing.
    fn open_procs(&self, sandbox_id: &str) -> std::io::Result<Vec<std::fs::File>> {
        self.dirs(sandbox_id)
            .iter()
            .map(|d| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
            })
            .collect()
    }

    /// Removes the sandbox's cgroup(s); fails quietly while processes remain.
    fn remove(&self, sandbox_id: &str) {
        for dir in self.dirs(sandbox_id) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// No isolation: commands run as children of the server with the session's directories as
/// their working directory and home. For development only.
pub struct ProcessSandbox {
    root: PathBuf,
}

#[async_trait]
impl SandboxProvider for ProcessSandbox {
    fn kind(&self) -> &'static str {
        "process"
    }

    async fn check(&self) -> Result<(), SandboxError> {
        Ok(())
    }

    async fn prepare(
        &self,
        sandbox_id: &str,
        workspace: &str,
        home: &str,
    ) -> Result<SessionMount, SandboxError> {
        let (host_workspace, host_home) =
            session_dirs(&self.root, sandbox_id, workspace, home).await?;
        Ok(SessionMount {
            sandbox_id: sandbox_id.to_owned(),
            workspace: host_workspace.to_string_lossy().into_owned(),
            home: host_home.to_string_lossy().into_owned(),
            host_workspace,
            host_home,
        })
    }

    async fn exec(
        &self,
        mount: &SessionMount,
        request: ExecRequest,
        cancel: &CancellationToken,
    ) -> Result<ExecOutput, SandboxError> {
        let Some((program, args)) = request.argv.split_first() else {
            return Err(SandboxError::Io(std::io::Error::other("empty command")));
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .env_clear()
            .env("PATH", SANDBOX_PATH)
            .env("HOME", &mount.home)
            .env("TMPDIR", std::env::temp_dir())
            .envs(request.env.iter().map(|(k, v)| (k, v)))
            .current_dir(request.cwd.as_deref().unwrap_or(&mount.workspace));
        run(command, request, cancel, None).await
    }

    async fn remove(&self, mount: &SessionMount) -> Result<(), SandboxError> {
        remove_dir(&mount.host_workspace).await?;
        remove_dir(&mount.host_home).await
    }

    fn forwarded_url(&self, url: &url::Url) -> url::Url {
        url.clone()
    }
}
