//! Harness for tests that run real `kilocloud serve` processes.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Where a test's server processes keep their data.
pub enum Store {
    Sqlite(tempfile::TempDir),
    Postgres(kilocloud_test_support::PgDatabase, tempfile::TempDir),
}

impl Store {
    pub async fn sqlite() -> Self {
        Store::Sqlite(kilocloud_test_support::temp_dir())
    }

    pub async fn postgres() -> Self {
        Store::Postgres(
            kilocloud_test_support::PgDatabase::create().await,
            kilocloud_test_support::temp_dir(),
        )
    }

    pub fn args(&self) -> Vec<String> {
        match self {
            Store::Sqlite(dir) => vec!["--data-dir".into(), dir.path().display().to_string()],
            Store::Postgres(db, dir) => vec![
                "--data-dir".into(),
                dir.path().display().to_string(),
                "--database-url".into(),
                db.url.clone(),
            ],
        }
    }

    /// Environment every process on this store needs: PostgreSQL nodes must share the JWT
    /// secret and master key (SQLite generates them into the data directory).
    pub fn env(&self) -> Vec<(&'static str, &'static str)> {
        match self {
            Store::Sqlite(_) => vec![],
            Store::Postgres(..) => vec![
                (
                    "KILOCLOUD_JWT_SECRET",
                    "test-jwt-secret-shared-by-all-nodes",
                ),
                (
                    "KILOCLOUD_MASTER_KEY",
                    "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
                ),
            ],
        }
    }

    pub fn dir(&self) -> &Path {
        match self {
            Store::Sqlite(d) | Store::Postgres(_, d) => d.path(),
        }
    }
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kilocloud"))
}

/// A running `kilocloud serve`.
pub struct Node {
    pub child: Child,
    pub base: String,
    pub http: reqwest::Client,
}

impl Node {
    /// Starts `kilocloud serve --listen 127.0.0.1:0` and waits for its "listening" line.
    pub fn start(store: &Store, log: &str) -> Node {
        Self::start_with(store, log, &[])
    }

    /// As [`Node::start`], with extra command-line arguments (e.g. `--config FILE`).
    pub fn start_with(store: &Store, log: &str, extra: &[&str]) -> Node {
        let log_file = std::fs::File::create(store.dir().join(log)).expect("log file");
        let mut child = Command::new(bin())
            .args(extra)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(store.args())
            .envs(store.env())
            .env("KILOCLOUD_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("KILOCLOUD_LOG_LEVEL", "info")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn kilocloud");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read listening line");
        let base = line
            .trim()
            .strip_prefix("kilocloud listening on ")
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!(
                    "server did not start; stdout: {line:?}; see {log} in {}",
                    store.dir().display()
                )
            })
            .to_owned();
        Node {
            child,
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    /// A client for `base` that does not own a process (for worker tasks).
    pub fn detached(http: reqwest::Client, base: String) -> Client {
        Client { http, base }
    }

    pub fn sigkill(&mut self) {
        send_signal(self.child.id(), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for exit; returns the exit status.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        send_signal(self.child.id(), nix::sys::signal::Signal::SIGTERM);
        self.child.wait().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
    }

    pub async fn get_json(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// GET `path` with `key` as the bearer (none when empty): status and JSON body (`null`
    /// when not JSON).
    pub async fn get_as(&self, key: &str, path: &str) -> (u16, Value) {
        self.get_for(key, None, path).await
    }

    /// [`Node::get_as`], acting for organization `org` (`X-KiloCode-OrganizationId`) if given.
    pub async fn get_for(&self, key: &str, org: Option<&str>, path: &str) -> (u16, Value) {
        let mut req = self.http.get(self.url(path));
        if !key.is_empty() {
            req = req.bearer_auth(key);
        }
        if let Some(org) = org {
            req = req.header("x-kilocode-organizationid", org);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub async fn actor(&self, key: &str) -> Value {
        self.get_json(&format!("/api/admin/actors/probe/{key}"))
            .await
    }

    pub async fn queue(&self, name: &str) -> Value {
        let all = self.get_json("/api/admin/queues").await;
        all.as_array()
            .unwrap()
            .iter()
            .find(|q| q["queue"] == name)
            .cloned()
            .unwrap_or(json!({"ready": 0, "delayed": 0, "in_flight": 0, "dead": 0}))
    }

    pub async fn dead_letters(&self, queue: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .get_json(&format!(
                    "/api/admin/queues/{queue}/dlq?after={after}&limit=1000"
                ))
                .await;
            let page = page.as_array().unwrap().clone();
            if page.is_empty() {
                return out;
            }
            after = page.last().unwrap()["id"].as_i64().unwrap();
            out.extend(page);
        }
    }

    /// Posts a GitHub webhook delivery of `event` signed with `secret`; asserts 200 and
    /// returns the delivery record.
    pub async fn github_webhook(
        &self,
        secret: &str,
        event: &str,
        delivery: &str,
        body: &[u8],
    ) -> Value {
        let res = self
            .http
            .post(self.url("/api/github/webhook"))
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .header(
                "x-hub-signature-256",
                kilocloud_automation::github::sign(secret.as_bytes(), body),
            )
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json().await.unwrap()
    }

    /// Polls `check` until it returns true, failing after `limit` (a guard against hangs, not a
    /// timing assertion).
    pub async fn wait_until<F, Fut>(&self, what: &str, limit: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "gave up waiting: {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send_signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("kill");
}

/// Runs the CLI with `args` on `store`; returns (success, stdout, stderr).
pub fn cli(store: &Store, args: &[&str]) -> (bool, String, String) {
    cli_with(store, args, &[], None)
}

/// Runs the CLI with `args` on `store`, extra environment `env` and `stdin`; returns
/// (success, stdout, stderr).
pub fn cli_with(
    store: &Store,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&str>,
) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(bin())
        .args(args)
        .args(store.args())
        .envs(store.env())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kilocloud");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().expect("run kilocloud");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An HTTP client for a node, without the process.
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    pub async fn post(&self, path: &str, body: Value) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
    }
}

/// Runs the CLI as the holder of the credentials file `creds` without blocking the runtime
/// (fakes served on it keep answering); returns (success, stdout, stderr).
pub async fn cli_as(store: &Store, creds: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(bin())
        .args(args)
        .args(store.args())
        .envs(store.env())
        .env("KILOCLOUD_CREDENTIALS", creds)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run kilocloud");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `[gateway]` and `[agent]` configuration of a node whose model provider is the fake
/// OpenAI upstream at `upstream` (model `vendor/paid`) and whose agent may clone over http
/// from loopback; `extra` is appended.
pub fn agent_config(store: &Store, upstream: &str, extra: &str) -> PathBuf {
    let path = store.dir().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[gateway]
[[gateway.providers]]
id = "fake"
kind = "openai-compatible"
base_url = "{upstream}"
api_key = "upstream-key"
[[gateway.providers.models]]
id = "vendor/paid"
input_price = 3.0
output_price = 15.0

[agent]
default_model = "vendor/paid"
{extra}
"#
        ),
    )
    .expect("write the config");
    path
}

/// The administrator of a freshly started `node` (its key read from `log`), granted $5 of
/// credit and logged in through the CLI into a credentials file; returns (key, credentials
/// file).
pub async fn admin_login(store: &Store, node: &Node, log: &str) -> (String, String) {
    let text = std::fs::read_to_string(store.dir().join(log)).expect("node log");
    let key = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("kc_"))
        .expect("bootstrap key")
        .to_owned();
    let me: Value = node
        .http
        .get(node.url("/api/users/me"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let owner = format!("user:{}", me["user"]["id"].as_str().unwrap());
    let granted = node
        .http
        .post(node.url("/api/admin/credits"))
        .bearer_auth(&key)
        .json(&json!({"owner": owner, "amountMicrodollars": 5_000_000, "note": "test credit"}))
        .send()
        .await
        .unwrap();
    assert_eq!(granted.status(), 200);
    let creds = store.dir().join("credentials.json").display().to_string();
    login(store, node, &key, &creds).await;
    (key, creds)
}

/// Logs the CLI in to `node` with `key` (again after a restart: the port changes).
pub async fn login(store: &Store, node: &Node, key: &str, creds: &str) {
    let (ok, _, err) = cli_as(
        store,
        creds,
        &["login", "--url", &node.url(""), "--token", key],
    )
    .await;
    assert!(ok, "{err}");
}
