//! KiCI end to end on the real binary, on SQLite and PostgreSQL: a workflow written in YAML
//! is compiled by `kilocloud ci compile`; a signed push webhook reaches the server (through
//! the GitHub App ingress), the lock file is read at the pushed commit through the fake
//! GitHub contents API, two real `kilocloud ci agent` processes run the jobs (a build, then
//! a 3-value matrix that needs it) in bubblewrap sandboxes on a clone from a real git
//! server, logs stream back, check runs go queued → in_progress → success on the fake GitHub,
//! and the run succeeds. Then: a job whose labels no agent has waits with its reason and is
//! cancelled; a running job is cancelled; an agent SIGKILLed mid-job leaves its job
//! recovering, then failed when the recovery window ends; a corrupt lock file is recorded as
//! a failed run; a generic webhook source (created with the CLI) runs its workflow when a
//! signed delivery arrives and refuses a bad signature; `ci logs --follow` streams a running
//! job live; an agent whose server is gone answers 503 on /ready and drains on SIGUSR1.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Node, Store, cli_as as cli};
use kilocloud_test_support::fake_github::{APP_PRIVATE_KEY_PEM, FakeGitHub};
use kilocloud_test_support::git_server::GitServer;
use serde_json::{Value, json};

const TOKEN: &str = "ghs_ci_token";
const SECRET: &str = "ci-webhook-secret";
const REPO: &str = "octo/app";
const LOCK: &str = ".kici/kici.lock.json";

const WORKFLOWS: &str = r#"
name: ci
on:
  - push: { branches: [main, "feature-*"] }
jobs:
  build:
    runsOn: linux-test
    run: |
      test -f src/lib.rs
      echo "built $(wc -l < src/lib.rs) lines at $KICI_SHA"
  test:
    runsOn: [linux-test]
    needs: [build]
    matrix: [a, b, c]
    steps:
      - name: check
        run: |
          echo "matrix=$MATRIX_VALUE"
          sleep 0.3
"#;

const GPU: &str = r#"
name: gpu
on:
  - push: { branches: ["feature-*"] }
jobs:
  train:
    runsOn: gpu-a100
    run: echo never
"#;

const SLOW: &str = r#"
name: slow
on:
  - push: { branches: ["slow*"] }
jobs:
  wait:
    runsOn: linux-test
    steps:
      - run: echo started; sleep 60
"#;

const RELEASE: &str = r#"
name: release
on:
  - genericWebhook: { source: deploys, events: [published] }
jobs:
  publish:
    runsOn: linux-test
    run: echo "released $KICI_EVENT"
"#;

/// An agent process.
struct Agent {
    child: Child,
    health: String,
}

impl Agent {
    fn start(store: &Store, node: &Node, token: &str, id: &str) -> Agent {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(store.dir().join(format!("{id}.log"))).unwrap();
        let work = store.dir().join(id);
        let child = Command::new(common::bin())
            .args([
                "ci",
                "agent",
                "--server",
                &node.base,
                "--labels",
                "linux-test",
            ])
            .args(["--agent-id", id, "--work-dir", work.to_str().unwrap()])
            .args(["--health-listen", &format!("127.0.0.1:{port}")])
            .args(["--allow-http-git", "--allow-private-git-hosts"])
            .args(store.args())
            .envs(store.env())
            .env("KILOCLOUD_CI_AGENT_TOKEN", token)
            .env("KILOCLOUD_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn the agent");
        Agent {
            child,
            health: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Compiles `workflows` (file name, YAML) with the CLI; returns the lock file's text.
async fn compile(store: &Store, creds: &str, name: &str, workflows: &[(&str, &str)]) -> String {
    let dir = store.dir().join(name).join(".kici");
    std::fs::create_dir_all(dir.join("workflows")).unwrap();
    for (file, text) in workflows {
        std::fs::write(dir.join("workflows").join(file), text).unwrap();
    }
    let kici = dir.to_str().unwrap().to_owned();
    let (ok, _, err) = cli(store, creds, &["ci", "compile", "--kici-dir", &kici]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        store,
        creds,
        &["ci", "compile", "--kici-dir", &kici, "--check"],
    )
    .await;
    assert!(ok && err.contains("up to date"), "{err}");
    std::fs::read_to_string(dir.join("kici.lock.json")).unwrap()
}

/// Pushes branch `branch` (from main) with one change; the lock file `lock` is served at the
/// new commit. Returns the signed push delivery body and the commit.
fn push(git: &GitServer, github: &FakeGitHub, branch: &str, lock: &str) -> (Vec<u8>, String) {
    let (before, head, _) = git.push_branch(
        REPO,
        "main",
        branch,
        &[(
            "src/lib.rs",
            "pub fn one() -> u32 {\n    1\n}\n// changed\n",
        )],
    );
    github.add_file("octo", "app", &head, LOCK, lock);
    let body = serde_json::to_vec(&json!({
        "ref": format!("refs/heads/{branch}"),
        "before": before,
        "after": head,
        "created": true,
        "deleted": false,
        "commits": [{"id": head, "added": [], "modified": ["src/lib.rs"], "removed": []}],
        "repository": {"full_name": REPO, "name": "app", "owner": {"login": "octo"},
            "clone_url": format!("{}/{REPO}.git", git.base_url)},
        "installation": {"id": 77},
        "sender": {"login": "octo", "id": 1},
    }))
    .unwrap();
    (body, head)
}

async fn post_push(node: &Node, delivery: &str, body: &[u8]) -> Value {
    node.github_webhook(SECRET, "push", delivery, body).await
}

async fn runs(store: &Store, creds: &str) -> Vec<Value> {
    let (ok, out, err) = cli(store, creds, &["ci", "runs", "--json"]).await;
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["runs"].as_array().cloned().unwrap_or_default()
}

async fn run_of(store: &Store, creds: &str, sha: &str, workflow: &str) -> Option<Value> {
    runs(store, creds)
        .await
        .into_iter()
        .find(|r| r["sha"] == sha && r["workflow"] == workflow)
}

async fn show(store: &Store, creds: &str, id: &str) -> Value {
    let (ok, out, err) = cli(store, creds, &["ci", "show", id, "--json"]).await;
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

async fn wait_run(node: &Node, store: &Store, creds: &str, sha: &str, workflow: &str) -> Value {
    node.wait_until("the run is created", Duration::from_secs(60), || async {
        run_of(store, creds, sha, workflow).await.is_some()
    })
    .await;
    run_of(store, creds, sha, workflow).await.unwrap()
}

async fn wait_status(node: &Node, store: &Store, creds: &str, id: &str, status: &str) -> Value {
    node.wait_until(
        &format!("run {id} is {status}"),
        Duration::from_secs(120),
        || async { show(store, creds, id).await["run"]["status"] == status },
    )
    .await;
    show(store, creds, id).await
}

async fn done_when(store: Store) {
    let git = GitServer::start(TOKEN).await;
    git.create_repo(REPO, &[("src/lib.rs", "pub fn one() -> u32 {\n    1\n}\n")]);
    let github = FakeGitHub::start(9002).await;
    github.set_fixed_token(Some(TOKEN.into()));
    github.add_installation(77, "octo", "User");
    let key_path = store.dir().join("app.pem");
    std::fs::write(&key_path, APP_PRIVATE_KEY_PEM).unwrap();
    let config = store.dir().join("ci.toml");
    std::fs::write(
        &config,
        format!(
            r#"[github]
app_id = 9002
private_key_path = "{key}"
webhook_secrets = ["{SECRET}"]
api_url = "{api}"

[ci]
recovery_window_ms = 2000
"#,
            key = key_path.display(),
            api = github.base_url,
        ),
    )
    .unwrap();
    let config_arg = config.to_str().unwrap().to_owned();
    let node = Node::start_with(&store, "node.log", &["--config", &config_arg]);
    let (_, creds) = common::admin_login(&store, &node, "node.log").await;
    let (ok, _, err) = cli(&store, &creds, &["github", "claim", "77"]).await;
    assert!(ok, "{err}");

    let (ok, token, err) = cli(&store, &creds, &["ci", "agent-token", "ci-test"]).await;
    assert!(ok && token.trim().starts_with("kat_"), "{token}{err}");
    let token = token.trim().to_owned();
    let mut agents = vec![
        Agent::start(&store, &node, &token, "agent-a"),
        Agent::start(&store, &node, &token, "agent-b"),
    ];
    node.wait_until("both agents register", Duration::from_secs(60), || async {
        let (ok, out, _) = cli(&store, &creds, &["ci", "agents", "--json"]).await;
        ok && serde_json::from_str::<Value>(&out).unwrap()["agents"]
            .as_array()
            .is_some_and(|a| a.iter().filter(|a| a["connected"] == true).count() == 2)
    })
    .await;
    let ready = reqwest::get(format!("{}/ready", agents[0].health))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // A push → the lock read at the commit → build, then the matrix on both agents.
    let lock = compile(
        &store,
        &creds,
        "repo",
        &[("ci.yml", WORKFLOWS), ("gpu.yml", GPU)],
    )
    .await;
    let (first_push, sha) = push(&git, &github, "feature-1", &lock);
    let delivery = post_push(&node, "push-1", &first_push).await;
    assert!(
        delivery["outcome"].as_str().unwrap().contains("ci: queued"),
        "{delivery}"
    );
    let run = wait_run(&node, &store, &creds, &sha, "ci").await;
    let id = run["id"].as_str().unwrap().to_owned();
    let done = wait_status(&node, &store, &creds, &id, "success").await;
    let jobs = done["jobs"].as_array().unwrap();
    let names: Vec<&str> = jobs.iter().map(|j| j["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["build", "test (a)", "test (b)", "test (c)"]);
    assert!(jobs.iter().all(|j| j["status"] == "success"), "{done}");
    let used: std::collections::BTreeSet<&str> = jobs
        .iter()
        .map(|j| j["agentId"].as_str().unwrap())
        .collect();
    assert_eq!(used.len(), 2, "the matrix ran on both agents: {done}");
    let build_end = jobs[0]["completedAt"].as_i64().unwrap();
    assert!(
        jobs[1..]
            .iter()
            .all(|j| j["startedAt"].as_i64().unwrap() >= build_end),
        "test waited for build"
    );
    let (ok, out, err) = cli(&store, &creds, &["ci", "logs", &id]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("[build] built 4 lines at {sha}")),
        "{out}"
    );
    for value in ["a", "b", "c"] {
        assert!(
            out.contains(&format!("[test ({value})] matrix={value}")),
            "{out}"
        );
    }
    let (ok, _, err) = cli(&store, &creds, &["ci", "logs", &id, "--follow"]).await;
    assert!(ok && err.contains("success"), "{err}");
    // One check run per job, queued → in progress → success.
    let checks: Vec<Value> = github
        .check_runs()
        .into_iter()
        .filter(|c| c["head_sha"] == sha && c["name"].as_str().unwrap().starts_with("kici/ci/"))
        .collect();
    assert_eq!(checks.len(), 4, "{checks:?}");
    node.wait_until("check runs complete", Duration::from_secs(60), || async {
        checks.iter().all(|c| {
            github
                .check_run_history(c["id"].as_u64().unwrap())
                .last()
                .map(String::as_str)
                == Some("completed:success")
        })
    })
    .await;
    for c in &checks {
        let history = github.check_run_history(c["id"].as_u64().unwrap());
        assert_eq!(
            history.first().map(String::as_str),
            Some("queued"),
            "{history:?}"
        );
        assert!(history.iter().any(|s| s == "in_progress"), "{history:?}");
    }
    let metrics = reqwest::get(format!("{}/metrics", agents[0].health))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("kici_agent_jobs_succeeded_total"),
        "{metrics}"
    );

    // The gpu workflow matched too: its job waits, saying why; cancelling ends it.
    let gpu = run_of(&store, &creds, &sha, "gpu")
        .await
        .expect("the gpu run");
    let gpu_id = gpu["id"].as_str().unwrap().to_owned();
    node.wait_until(
        "the gpu job says why it waits",
        Duration::from_secs(60),
        || async {
            show(&store, &creds, &gpu_id).await["jobs"][0]["waitingReason"]
                .as_str()
                .is_some_and(|r| r.contains("no registered agent") && r.contains("gpu-a100"))
        },
    )
    .await;
    let (ok, _, err) = cli(&store, &creds, &["ci", "cancel", &gpu_id]).await;
    assert!(ok, "{err}");
    let cancelled = wait_status(&node, &store, &creds, &gpu_id, "cancelled").await;
    assert_eq!(cancelled["jobs"][0]["status"], "cancelled");
    let (ok, _, err) = cli(&store, &creds, &["ci", "cancel", &gpu_id]).await;
    assert!(!ok && err.contains("409"), "{err}");

    // A running job is cancelled.
    let lock = compile(&store, &creds, "slow", &[("slow.yml", SLOW)]).await;
    let (body, slow_sha) = push(&git, &github, "slow", &lock);
    post_push(&node, "push-slow", &body).await;
    let slow = wait_run(&node, &store, &creds, &slow_sha, "slow").await;
    let slow_id = slow["id"].as_str().unwrap().to_owned();
    // Followed live from the start: the line arrives while the job runs.
    let follow = tokio::process::Command::new(common::bin())
        .args(["ci", "logs", &slow_id, "--follow"])
        .args(store.args())
        .envs(store.env())
        .env("KILOCLOUD_CREDENTIALS", &creds)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    node.wait_until("the slow job prints", Duration::from_secs(60), || async {
        let (_, out, _) = cli(&store, &creds, &["ci", "logs", &slow_id]).await;
        out.contains("started")
    })
    .await;
    let (ok, _, err) = cli(&store, &creds, &["ci", "cancel", &slow_id]).await;
    assert!(ok, "{err}");
    let cancelled = wait_status(&node, &store, &creds, &slow_id, "cancelled").await;
    assert_eq!(cancelled["jobs"][0]["status"], "cancelled", "{cancelled}");
    let followed = tokio::time::timeout(Duration::from_secs(60), follow.wait_with_output())
        .await
        .expect("the follower ends with the run")
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&followed.stdout),
        String::from_utf8_lossy(&followed.stderr),
    );
    assert!(
        !followed.status.success() && err.contains("ended cancelled"),
        "{err}"
    );
    assert!(out.contains("[wait] started"), "{out}");

    // An agent killed mid-job: the job recovers for the window, then fails.
    let (body, kill_sha) = push(&git, &github, "slow-2", &lock);
    post_push(&node, "push-kill", &body).await;
    let kill = wait_run(&node, &store, &creds, &kill_sha, "slow").await;
    let kill_id = kill["id"].as_str().unwrap().to_owned();
    node.wait_until("the job runs", Duration::from_secs(60), || async {
        show(&store, &creds, &kill_id).await["jobs"][0]["status"] == "running"
    })
    .await;
    let holder = show(&store, &creds, &kill_id).await["jobs"][0]["agentId"]
        .as_str()
        .unwrap()
        .to_owned();
    let index = usize::from(holder == "agent-b");
    agents[index].child.kill().unwrap();
    agents[index].child.wait().unwrap();
    let failed = wait_status(&node, &store, &creds, &kill_id, "failed").await;
    let job = &failed["jobs"][0];
    assert_eq!(job["status"], "failed");
    assert!(
        job["error"].as_str().unwrap().contains("recovery window"),
        "{job}"
    );
    agents.remove(index);

    // A corrupt lock file is a failed run that says so.
    let (body, bad_sha) = push(&git, &github, "feature-bad", "{\"schemaVersion\": 28}");
    post_push(&node, "push-bad", &body).await;
    let bad = wait_run(&node, &store, &creds, &bad_sha, "(lock file)").await;
    assert_eq!(bad["status"], "failed");
    assert!(
        bad["failureReason"]
            .as_str()
            .unwrap()
            .starts_with("lockfile_corrupt"),
        "{bad}"
    );

    // A redelivery of the first push creates nothing new (dedup at the ingress).
    let before = runs(&store, &creds).await.len();
    let again = post_push(&node, "push-1", &first_push).await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(runs(&store, &creds).await.len(), before);

    // A generic webhook source runs the workflow its trigger names, at the branch's tip.
    let main_sha: String = serde_json::from_slice::<Value>(&first_push).unwrap()["before"]
        .as_str()
        .unwrap()
        .to_owned();
    github.add_branch("octo", "app", "main", &main_sha);
    let lock = compile(&store, &creds, "release", &[("release.yml", RELEASE)]).await;
    github.add_file("octo", "app", &main_sha, LOCK, &lock);
    let clone_url = format!("{}/{REPO}.git", git.base_url);
    let (ok, secret, err) = cli(
        &store,
        &creds,
        &[
            "ci",
            "source",
            "create",
            "deploys",
            "--repo",
            REPO,
            "--clone-url",
            &clone_url,
        ],
    )
    .await;
    assert!(ok && err.contains("/api/ci/webhooks/"), "{err}");
    let path = err
        .split_whitespace()
        .find(|w| w.starts_with("/api/ci/webhooks/"))
        .unwrap()
        .to_owned();
    let body = br#"{"version": "2.0.0"}"#;
    let deliver = |signature: String| {
        node.http
            .post(node.url(&path))
            .header("x-signature-256", signature)
            .header("x-event-type", "published")
            .header("x-idempotency-key", "release-2.0.0")
            .body(body.to_vec())
            .send()
    };
    let refused = deliver("sha256=00".into()).await.unwrap();
    assert_eq!(refused.status(), 401);
    let signed = kilocloud_automation::github::sign(secret.trim().as_bytes(), body);
    let accepted = deliver(signed.clone()).await.unwrap();
    assert_eq!(accepted.status(), 202);
    let outcome: Value = accepted.json().await.unwrap();
    let release_id = outcome["runs"][0].as_str().unwrap().to_owned();
    wait_status(&node, &store, &creds, &release_id, "success").await;
    let (ok, out, _) = cli(&store, &creds, &["ci", "logs", &release_id]).await;
    assert!(ok && out.contains("released generic_webhook"), "{out}");
    let duplicate = deliver(signed).await.unwrap();
    assert_eq!(duplicate.status(), 200);

    // The server goes away: the agent is not ready; SIGUSR1 drains it (idle) and it exits 0.
    let mut node = node;
    assert!(node.sigterm().success());
    let health = agents[0].health.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ready = reqwest::get(format!("{health}/ready")).await.unwrap();
        if ready.status() == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent stays ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = nix::unistd::Pid::from_raw(agents[0].child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = agents[0].child.try_wait().unwrap() {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "the agent drains");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ci_from_push_to_green_check_runs_on_sqlite() {
    done_when(Store::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ci_from_push_to_green_check_runs_on_postgres() {
    done_when(Store::postgres().await).await;
}
