//! The sandbox escape suite: what a session's commands run in the `local` provider
//! (bubblewrap) must not be able to reach, and limits that must hold without hurting the host.
//! Two sessions of two different owners are prepared, as sessions are; every probe runs as
//! the agent's `run_command` tool runs it.

use std::time::Duration;

use kilocloud_agent::ids::{SandboxPolicy, home_path, sandbox_id, workspace_path};
use kilocloud_agent::sandbox::{
    ExecOutput, ExecRequest, LocalSandbox, SandboxConfig, SandboxProvider, SessionMount,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Env {
    _dir: tempfile::TempDir,
    sandbox: LocalSandbox,
    a: SessionMount,
    b: SessionMount,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let config = SandboxConfig {
        memory_limit_bytes: 256 << 20,
        pids_limit: 64,
        ..SandboxConfig::default()
    };
    let sandbox = LocalSandbox::new(&config, dir.path().join("sandboxes"));
    sandbox.check().await.expect("bubblewrap works here");
    let mut mounts = Vec::new();
    for _ in 0..2 {
        let (user, session) = (Uuid::new_v4(), kilocloud_agent::ids::new_session_id());
        let id = sandbox_id(None, user, None, SandboxPolicy::Shared, &session);
        let mount = sandbox
            .prepare(
                &id,
                &workspace_path(None, user, &session),
                &home_path(&session),
            )
            .await
            .unwrap();
        std::fs::write(mount.host_workspace.join("secret.txt"), "session secret\n").unwrap();
        mounts.push(mount);
    }
    let b = mounts.pop().unwrap();
    let a = mounts.pop().unwrap();
    Env {
        _dir: dir,
        sandbox,
        a,
        b,
    }
}

impl Env {
    async fn sh(&self, script: &str, timeout: Duration) -> ExecOutput {
        self.sandbox
            .exec(
                &self.a,
                ExecRequest::shell(script, timeout, 64 * 1024),
                &CancellationToken::new(),
            )
            .await
            .unwrap()
    }
}

fn text(out: &ExecOutput) -> String {
    out.combined_text()
}

#[tokio::test]
async fn commands_run_in_the_workspace_with_their_own_home() {
    let env = env().await;
    let out = env
        .sh(
            "pwd; echo $HOME; cat secret.txt; echo hi > made.txt; id -u",
            Duration::from_secs(10),
        )
        .await;
    assert!(out.success(), "{}", text(&out));
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines[0], env.a.workspace);
    assert_eq!(lines[1], env.a.home);
    assert_eq!(lines[2], "session secret");
    assert_eq!(lines[3], "1000");
    assert_eq!(
        std::fs::read_to_string(env.a.host_workspace.join("made.txt")).unwrap(),
        "hi\n"
    );
}

#[tokio::test]
async fn the_hosts_secrets_are_not_readable() {
    let env = env().await;
    for path in ["/root", "/etc/shadow", "/etc/gshadow", "/proc/1/environ"] {
        let out = env
            .sh(
                &format!("cat {path} 2>&1 || ls -la {path} 2>&1; test -s {path} && test -r {path} && ls {path}/* 2>/dev/null | head -1 | grep . && echo READABLE"),
                Duration::from_secs(10),
            )
            .await;
        let text = text(&out);
        assert!(!text.contains("READABLE"), "{path}: {text}");
        assert!(
            !text.contains("root:x:") && !text.contains("root:*"),
            "{path}: {text}"
        );
    }
    // The host's /root exists and holds files; inside, there is no /root at all.
    let out = env.sh("ls /root", Duration::from_secs(10)).await;
    assert!(!out.success(), "{}", text(&out));
    // /etc/shadow yields nothing inside (a device node on a nodev mount).
    let out = env
        .sh(
            "cat /etc/shadow 2>/dev/null | wc -c",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
}

#[tokio::test]
async fn another_sessions_workspace_is_not_reachable() {
    let env = env().await;
    let script = format!(
        "cat {}/secret.txt; ls {}; ls /workspace; find / -name secret.txt -not -path '/proc/*' 2>/dev/null",
        env.b.workspace, env.b.home
    );
    let out = env.sh(&script, Duration::from_secs(20)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The only secret.txt visible is the session's own.
    let found: Vec<&str> = stdout
        .lines()
        .filter(|l| l.ends_with("secret.txt"))
        .collect();
    assert_eq!(found, vec![format!("{}/secret.txt", env.a.workspace)]);
    assert!(!stdout.contains(&env.b.workspace));
}

#[tokio::test]
async fn no_network_at_all() {
    let env = env().await;
    // A listener on the host's loopback that the sandbox must not reach.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "cat /sys/class/net/*/operstate 2>/dev/null | tr '\\n' ' '; ls /sys/class/net; \
         (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo CONNECTED-LOOPBACK; \
         (exec 3<>/dev/tcp/1.1.1.1/80) 2>/dev/null && echo CONNECTED-REMOTE; \
         getent hosts example.com && echo RESOLVED; true"
    );
    let out = env
        .sandbox
        .exec(
            &env.a,
            ExecRequest {
                argv: vec!["bash".into(), "-c".into(), script],
                ..ExecRequest::shell("", Duration::from_secs(10), 4096)
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    let text = text(&out);
    assert!(!text.contains("CONNECTED"), "{text}");
    assert!(!text.contains("RESOLVED"), "{text}");
    // Only the namespace's own loopback exists.
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .all(|w| w == "lo" || w == "unknown" || w == "down"),
        "{text}"
    );
    // Nothing arrived at the host's listener: its backlog is empty now that the command ended.
    let listener = listener.into_std().unwrap();
    let accepted = listener.accept();
    assert_eq!(
        accepted.map(drop).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
}

#[tokio::test]
async fn writing_outside_the_workspace_fails() {
    let env = env().await;
    for target in [
        "/usr/evil",
        "/etc/evil",
        "/evil",
        "/workspace/evil",
        "/home/evil",
    ] {
        let out = env
            .sh(&format!("echo x > {target}"), Duration::from_secs(10))
            .await;
        assert!(!out.success(), "{target} was writable");
    }
    // The repository metadata is read-only inside, so hooks and config cannot be planted.
    std::fs::create_dir_all(env.a.host_workspace.join(".git/hooks")).unwrap();
    let out = env
        .sh(
            "echo 'touch /tmp/pwned' > .git/hooks/pre-commit",
            Duration::from_secs(10),
        )
        .await;
    assert!(!out.success(), "{}", text(&out));
    // /tmp is private: what a command leaves there is gone for the next one and the host.
    let marker = format!("kilocloud-escape-{}", Uuid::new_v4());
    env.sh(&format!("touch /tmp/{marker}"), Duration::from_secs(10))
        .await;
    assert!(!std::path::Path::new("/tmp").join(&marker).exists());
    // No capability survives: mounting or changing ownership is refused.
    let out = env
        .sh(
            "mount -t tmpfs none /mnt 2>&1 || chown 0 secret.txt",
            Duration::from_secs(10),
        )
        .await;
    assert!(!out.success(), "{}", text(&out));
}

#[tokio::test]
async fn a_fork_bomb_is_contained_and_killed_at_the_time_limit() {
    let env = env().await;
    // Without a writable cgroup there is no process limit at all: that is a failure of this
    // machine's setup, never a pass.
    assert!(
        env.sandbox.has_cgroups(),
        "no writable cgroup (v1 pids+memory, or v2 with both controllers delegated): the \
         process limit cannot be enforced here"
    );
    let out = env
        .sh(
            // `exec`: waiting needs no fork, so the shell outlives the bomb whatever the pids
            // limit leaves it.
            "bomb() { bomb | bomb & }; bomb; exec sleep 60",
            Duration::from_secs(3),
        )
        .await;
    assert!(out.timed_out, "{}", text(&out));
    // The host still forks, and a fresh command in the same sandbox runs once the bomb is
    // gone.
    let out = env.sh("echo alive", Duration::from_secs(10)).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alive");
}

#[tokio::test]
async fn a_memory_bomb_is_killed() {
    let env = env().await;
    // 1 GiB in a shell variable, four times the sandbox's 256 MiB.
    let out = env
        .sh(
            "x=$(head -c 1073741824 /dev/zero | tr '\\0' a); echo survived ${#x}",
            Duration::from_secs(60),
        )
        .await;
    assert!(!String::from_utf8_lossy(&out.stdout).contains("survived"));
    let out = env.sh("echo alive", Duration::from_secs(10)).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alive");
}

#[tokio::test]
async fn output_is_capped_and_interrupts_kill() {
    let env = env().await;
    let out = env
        .sandbox
        .exec(
            &env.a,
            ExecRequest::shell("head -c 100000 /dev/zero", Duration::from_secs(10), 1000),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), 1000);
    assert!(out.truncated);
    let cancel = CancellationToken::new();
    let canceller = cancel.clone();
    let run = env.sandbox.exec(
        &env.a,
        ExecRequest::shell("sleep 30", Duration::from_secs(60), 1000),
        &cancel,
    );
    canceller.cancel();
    let out = run.await.unwrap();
    assert!(out.cancelled && !out.success());
}

#[tokio::test]
async fn removal_deletes_the_session_directories() {
    let env = env().await;
    env.sandbox.remove(&env.a).await.unwrap();
    assert!(!env.a.host_workspace.exists());
    assert!(!env.a.host_home.exists());
    assert!(env.b.host_workspace.exists());
}

#[tokio::test]
async fn only_the_forwarded_server_is_reachable() {
    let env = env().await;
    // The gateway stand-in on the host's loopback, and another host service.
    let gateway = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (gateway_addr, other_port) = (
        gateway.local_addr().unwrap(),
        other.local_addr().unwrap().port(),
    );
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = gateway.accept().await {
            let mut buf = [0u8; 5];
            let _ = s.read_exact(&mut buf).await;
            let _ = s.write_all(b"pong\n").await;
        }
    });
    let url = url::Url::parse(&format!("http://{gateway_addr}/api/gateway/v1")).unwrap();
    let inside = env.sandbox.forwarded_url(&url);
    assert_eq!(inside.as_str(), "http://127.0.0.1:8787/api/gateway/v1");
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/8787 && echo ping >&3 && head -1 <&3; \
         (exec 4<>/dev/tcp/127.0.0.1/{other_port}) 2>/dev/null && echo REACHED-OTHER; \
         (exec 5<>/dev/tcp/1.1.1.1/80) 2>/dev/null && echo REACHED-REMOTE; true"
    );
    let out = env
        .sandbox
        .exec(
            &env.a,
            ExecRequest {
                argv: vec!["bash".into(), "-c".into(), script],
                forward: Some(gateway_addr),
                ..ExecRequest::shell("", Duration::from_secs(10), 4096)
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    let text = text(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "pong",
        "{text}"
    );
    assert!(!text.contains("REACHED"), "{text}");
}

/// The server's environment (master key, JWT secret, provider keys) never reaches a sandbox:
/// not through the command's own environment, nor through bubblewrap's processes (its pid 1
/// inside the namespace), and no host process is visible in the sandbox's `/proc`.
#[tokio::test]
async fn the_servers_environment_and_processes_are_not_visible() {
    let marker = format!("kilocloud-marker-{}", Uuid::new_v4());
    // SAFETY: set before the sandbox starts any process, on the test's only runtime thread
    // (`#[tokio::test]` is single-threaded); nothing reads the environment concurrently.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("KILOCLOUD_MASTER_KEY", &marker)
    };
    let env = env().await;
    let out = env
        .sh(
            "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; echo ---; \
             ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '; echo; echo $$",
            Duration::from_secs(10),
        )
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.success(), "{}", text(&out));
    assert!(!stdout.contains(&marker), "{stdout}");
    let (environ, rest) = stdout.split_once("---\n").unwrap();
    // Only the sandbox's own variables (set explicitly) appear.
    for line in environ.lines().filter(|l| !l.is_empty()) {
        let name = line.split('=').next().unwrap();
        assert!(
            [
                "PATH", "HOME", "TMPDIR", "LANG", "PWD", "SHLVL", "_", "OLDPWD"
            ]
            .contains(&name),
            "unexpected variable inside: {line}"
        );
    }
    // A fresh /proc of a private pid namespace: bubblewrap's pid 1, the shell and its
    // children; the host's processes (this test among them) are absent.
    let mut lines = rest.lines();
    let pids: Vec<u32> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let shell: u32 = lines.next().unwrap().trim().parse().unwrap();
    assert!(pids.contains(&1) && pids.contains(&shell), "{pids:?}");
    assert!(!pids.contains(&std::process::id()), "{pids:?}");
    // The pipeline's few processes, numbered from 1 in the new namespace.
    assert!(pids.len() <= 8 && pids.iter().all(|p| *p < 32), "{pids:?}");
}

/// The sandbox's user is an unprivileged user on the host, never root: what it creates
/// belongs to that user, it cannot set the set-user-id or set-group-id bit, the workspace is
/// mounted `nosuid,nodev`, and it cannot make a user namespace of its own.
#[tokio::test]
async fn the_sandbox_user_is_not_root_on_the_host_and_makes_no_setuid_files() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let env = env().await;
    let out = env
        .sh(
            "cp /bin/sh ./suid; chmod 4755 ./suid && echo CHMOD-SUID; \
             chmod g+s ./suid && echo CHMOD-SGID; \
             install -m 4755 /bin/sh ./suid2 && echo INSTALL-SUID; \
             grep \" $PWD \" /proc/self/mountinfo",
            Duration::from_secs(10),
        )
        .await;
    let text = text(&out);
    assert!(
        !text.contains("CHMOD-") && !text.contains("INSTALL-"),
        "{text}"
    );
    let mountinfo = String::from_utf8_lossy(&out.stdout);
    let options = mountinfo.split_whitespace().nth(5).unwrap_or_default();
    assert!(
        options.split(',').any(|o| o == "nosuid") && options.split(',').any(|o| o == "nodev"),
        "{mountinfo}"
    );
    let made = std::fs::metadata(env.a.host_workspace.join("suid")).unwrap();
    assert_eq!(
        made.permissions().mode() & 0o6000,
        0,
        "setuid bit on the host"
    );
    match env.sandbox.host_identity() {
        // The server is root: the sandbox's files are the configured user's (65534).
        Some((uid, gid)) => assert_eq!((made.uid(), made.gid()), (uid, gid)),
        None => assert_eq!(made.uid(), nix::unistd::geteuid().as_raw()),
    }
    assert_ne!(made.uid(), 0, "a file made inside is root's on the host");
    // No nested user namespace, so no namespace where the sandbox holds capabilities.
    let out = env
        .sh("unshare -U true && echo UNSHARED", Duration::from_secs(10))
        .await;
    assert!(!text_of(&out).contains("UNSHARED"), "{}", text_of(&out));
}

fn text_of(out: &ExecOutput) -> String {
    out.combined_text()
}

/// The seccomp filter refuses with EPERM what an unconfined process may call: the kernel's
/// keyrings (`keyctl`), `ptrace` (here `PTRACE_TRACEME`, which needs no privilege) and
/// `unshare`, while ordinary work goes on (processes, threads).
#[tokio::test]
async fn the_seccomp_filter_refuses_what_it_forbids() {
    let env = env().await;
    let script = format!(
        "import ctypes, os, threading\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         def call(nr, *args):\n\
         \x20   r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])\n\
         \x20   return r if r >= 0 else -ctypes.get_errno()\n\
         print('keyctl', call({keyctl}, 0, -3, 0))\n\
         print('ptrace', call({ptrace}, 0, 0, 0, 0))\n\
         print('unshare', call({unshare}, 0x10000000))\n\
         t = threading.Thread(target=lambda: None); t.start(); t.join()\n\
         pid = os.fork()\n\
         if pid == 0: os._exit(7)\n\
         print('child', os.waitpid(pid, 0)[1] >> 8)\n",
        keyctl = libc::SYS_keyctl,
        ptrace = libc::SYS_ptrace,
        unshare = libc::SYS_unshare,
    );
    let out = env
        .sandbox
        .exec(
            &env.a,
            ExecRequest {
                argv: vec!["python3".into(), "-c".into(), script],
                ..ExecRequest::shell("", Duration::from_secs(20), 4096)
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let eperm = format!("-{}", libc::EPERM);
    let result = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {name} in {}", text(&out)))
    };
    for name in ["keyctl", "ptrace", "unshare"] {
        assert_eq!(result(name), eperm, "{name}: {}", text(&out));
    }
    assert_eq!(result("child"), "7", "{}", text(&out));
}

/// Secrets given to a sandboxed command (KiloClaw's env key, a session's secrets) are never
/// on a command line: not bubblewrap's, which any local user reads in `ps`, nor the
/// command's; the command still gets them in its environment.
#[tokio::test]
async fn secrets_are_not_on_any_command_line() {
    use std::os::unix::fs::PermissionsExt as _;
    let env = env().await;
    let secret = format!("kilocloud-secret-{}", Uuid::new_v4());
    // The command reports through a FIFO: reading it returns once the command has written.
    let fifo = env.a.host_workspace.join("seen");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o666)).unwrap();
    let request = ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "printf '%s' \"$SESSION_SECRET\" > seen; exec sleep 60".into(),
        ],
        env: vec![("SESSION_SECRET".into(), secret.clone())],
        ..ExecRequest::shell("", Duration::from_secs(60), 0)
    };
    let log = std::fs::File::create(env._dir.path().join("service.log")).unwrap();
    let service = env.sandbox.spawn(&env.a, &request, log).await.unwrap();
    let seen = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || std::fs::read_to_string(fifo)),
    )
    .await
    .expect("the command never wrote")
    .unwrap()
    .unwrap();
    // The command got the value in its environment.
    assert_eq!(seen, secret);
    let bwrap = service.bwrap_pid().unwrap();
    for pid in [bwrap as i32, service.command_pid()] {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(!cmdline.is_empty());
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!cmdline.contains(&secret), "pid {pid}: {cmdline}");
    }
    // bubblewrap's own environment is empty, so it holds no secret either.
    let environ = std::fs::read(format!("/proc/{bwrap}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains(&secret));
    service.stop(Duration::from_secs(1)).await;
}
