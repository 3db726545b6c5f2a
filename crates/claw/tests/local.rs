//! The `local` provider watches the runtimes it starts (real bubblewrap sandboxes): one that
//! exits on its own is reported down at once, one stopped on purpose is not, and a provider
//! created over the records of a server that died (SIGKILL) reports every machine that was
//! meant to run, so [`kilocloud_claw::Claw::watch_machines`] restarts them within seconds.

use std::collections::BTreeMap;
use std::time::Duration;

use kilocloud_agent::sandbox::{LocalSandbox, SandboxConfig};
use kilocloud_claw::local::LocalProvider;
use kilocloud_claw::provider::{
    ComputeProvider, Guest, MOUNT_PATH, MachineDown, MachineSpec, Mount, VolumeSpec,
};

const APP: &str = "acct-local-test";
const SANDBOX: &str = "ki_0123456789abcdef0123456789abcdef";

/// A runtime that listens on the runtime port and exits with status 3 once something is
/// written to `/root/clawd/crash` (a FIFO the test writes to).
fn provider(root: &std::path::Path) -> LocalProvider {
    let sandbox = LocalSandbox::new(&SandboxConfig::default(), root.join("sandboxes"));
    let command = [
        "sh",
        "-c",
        "python3 -m http.server 18789 --bind 127.0.0.1 >/dev/null 2>&1 & \
         read x < /root/clawd/crash; exit 3",
    ]
    .map(String::from)
    .to_vec();
    LocalProvider::new(root.to_owned(), sandbox, command, None).unwrap()
}

fn spec(volume: &str) -> MachineSpec {
    MachineSpec {
        name: SANDBOX.into(),
        region: "local".into(),
        env: BTreeMap::new(),
        guest: Guest::default(),
        mounts: vec![Mount {
            volume: volume.into(),
            path: MOUNT_PATH.into(),
        }],
        metadata: BTreeMap::from([("kiloclaw_sandbox_id".to_owned(), SANDBOX.to_owned())]),
        min_secrets_version: None,
    }
}

/// Creates a volume holding the crash FIFO; returns its id.
async fn volume(p: &LocalProvider, root: &std::path::Path) -> String {
    let v = p
        .create_volume(
            APP,
            &VolumeSpec {
                name: "kiloclaw_test".into(),
                size_gb: 1,
                region: "local".into(),
                compute: Guest::default(),
                source_volume_id: None,
            },
        )
        .await
        .unwrap();
    let clawd = root.join("volumes").join(&v.id).join("clawd");
    std::fs::create_dir_all(&clawd).unwrap();
    nix::unistd::mkfifo(
        &clawd.join("crash"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    v.id
}

/// Writes to the machine's crash FIFO (returns once the runtime has read it).
async fn crash(root: &std::path::Path, volume: &str) {
    let fifo = root
        .join("volumes")
        .join(volume)
        .join("clawd")
        .join("crash");
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || std::fs::write(fifo, "x\n")),
    )
    .await
    .expect("the runtime never read its FIFO")
    .unwrap()
    .unwrap();
}

async fn next_report(
    reports: &mut tokio::sync::mpsc::UnboundedReceiver<MachineDown>,
) -> MachineDown {
    tokio::time::timeout(Duration::from_secs(30), reports.recv())
        .await
        .expect("no report within 30 s")
        .expect("the provider is alive")
}

#[tokio::test]
async fn runtimes_that_go_down_are_reported_and_stops_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("claw");
    let p = provider(&root);
    let mut reports = p.take_down_reports().expect("the local provider reports");
    assert!(p.take_down_reports().is_none(), "taken once");
    p.create_app(APP).await.unwrap();

    // A crash is reported, with what names the instance.
    let crashing = volume(&p, &root).await;
    let m = p.create_machine(APP, &spec(&crashing)).await.unwrap();
    assert_eq!(m.state, "started");
    crash(&root, &crashing).await;
    let down = next_report(&mut reports).await;
    assert_eq!(
        down,
        MachineDown {
            app: APP.into(),
            machine_id: m.id.clone(),
            sandbox_id: SANDBOX.into(),
        }
    );
    assert_eq!(p.get_machine(APP, &m.id).await.unwrap().state, "stopped");

    // A stop on purpose is not: the next report is another machine's crash, which came
    // after the stop had ended.
    p.start_machine(APP, &m.id).await.unwrap();
    p.stop_machine(APP, &m.id).await.unwrap();
    let other = volume(&p, &root).await;
    let n = p.create_machine(APP, &spec(&other)).await.unwrap();
    crash(&root, &other).await;
    assert_eq!(
        next_report(&mut reports).await.machine_id,
        n.id,
        "the stop was reported"
    );
    p.delete_machine(APP, &n.id).await.unwrap();

    // The server dies with a machine meant to run (recorded `started`): a provider made over
    // the same records reports it at once.
    p.start_machine(APP, &m.id).await.unwrap();
    drop(p);
    let after = provider(&root);
    let mut reports = after.take_down_reports().unwrap();
    assert_eq!(next_report(&mut reports).await.machine_id, m.id);
    assert_eq!(
        after.get_machine(APP, &m.id).await.unwrap().state,
        "stopped"
    );
}
