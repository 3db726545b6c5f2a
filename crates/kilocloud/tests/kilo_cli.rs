//! The official Kilo Code CLI (`@kilocode/cli` 7.7.7 from npm, installed by `scripts/test`
//! and named by `KILOCLOUD_TEST_KILO`) against a real `kilocloud serve`: `kilo auth login -p
//! kilo` shows a device code from our server, a signed-in user approves it with `kilocloud
//! login approve`, the CLI logs in, and `kilo profile --json` reads the account back; and
//! `kilo run --model kilo/<id>` with an API key answers through our gateway (the fake
//! provider behind it) and is charged.

mod common;

use std::time::Duration;

use common::{Node, Store};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

/// The `kilo` executable; the test fails loudly without it (as the SDK tests do).
fn kilo() -> String {
    std::env::var("KILOCLOUD_TEST_KILO").expect(
        "KILOCLOUD_TEST_KILO must name the Kilo CLI's `kilo` (scripts/test installs \
         @kilocode/cli@7.7.7 into target/kilo-cli)",
    )
}

/// `kilo` with its home (and every XDG directory) under `home`, talking to `api_url`.
fn kilo_command(home: &std::path::Path, api_url: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(kilo());
    cmd.env("HOME", home)
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .env("KILO_API_URL", api_url)
        .env_remove("KILO_API_KEY")
        .stdin(std::process::Stdio::null());
    cmd
}

async fn device_login(store: Store) {
    let node = Node::start(&store, "node.log");
    let (_, creds) = common::admin_login(&store, &node, "node.log").await;
    let home = store.dir().join("kilo-home");
    std::fs::create_dir_all(&home).unwrap();
    let api_url = node.url("").trim_end_matches('/').to_owned();
    let mut login = kilo_command(&home, &api_url)
        .args(["auth", "login", "-p", "kilo"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run kilo");
    // The code is printed with the verification URL (`…/device-auth?code=XXXX-XXXX`), on
    // stdout or stderr.
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    for pipe in [
        Box::new(login.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(login.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(pipe).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = tx.send(line);
            }
        });
    }
    let code = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.recv().await {
            if let Some(rest) = line.split("device-auth?code=").nth(1) {
                return rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect::<String>();
            }
        }
        panic!("kilo exited without showing a code");
    })
    .await
    .expect("kilo shows a device code (a guard against hangs)");
    assert_eq!(code.len(), 9, "{code}");
    let (ok, out, err) = common::cli_as(&store, &creds, &["login", "approve", &code]).await;
    assert!(ok && out.contains("approved"), "{out}{err}");
    let status = tokio::time::timeout(Duration::from_secs(60), login.wait())
        .await
        .expect("kilo finishes its login once approved (a guard against hangs)")
        .unwrap();
    assert!(status.success(), "kilo auth login failed");
    let auth = std::fs::read_to_string(home.join(".local/share/kilo/auth.json")).unwrap();
    let auth: Value = serde_json::from_str(&auth).unwrap();
    assert_eq!(auth["kilo"]["type"], "oauth", "{auth}");

    let profile = kilo_command(&home, &api_url)
        .args(["profile", "--json"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&profile.stdout);
    let json_start = text.find('{').unwrap_or_else(|| panic!("no JSON: {text}"));
    let profile: Value = serde_json::from_str(&text[json_start..]).unwrap();
    assert_eq!(
        (profile["email"].as_str(), profile["team"].as_str()),
        (Some("admin@localhost"), Some("Personal")),
        "{profile}"
    );
}

/// `kilo run --model kilo/<id>` with an API key: the CLI's chat request goes through our
/// gateway to the fake provider, the reply is printed, and the owner is charged.
async fn run_through_the_gateway(store: Store) {
    use kilocloud_test_support::fake_openai::{FakeOpenAi, Reply};
    let upstream = FakeOpenAi::start().await;
    let config = store.dir().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\n[[gateway.providers]]\nid = \"fake\"\nkind = \"openai-compatible\"\n\
             base_url = \"{}\"\napi_key = \"upstream-key\"\n[[gateway.providers.models]]\n\
             id = \"vendor/paid\"\ncontext_length = 100000\ninput_price = 3.0\noutput_price = 15.0\n",
            upstream.base_url
        ),
    )
    .unwrap();
    let node = Node::start_with(&store, "node.log", &["--config", config.to_str().unwrap()]);
    let (key, _) = common::admin_login(&store, &node, "node.log").await;
    for _ in 0..4 {
        upstream.push(Reply::text("The answer is forty-two.", 120, 8));
    }
    let home = store.dir().join("kilo-home");
    std::fs::create_dir_all(&home).unwrap();
    let api_url = node.url("").trim_end_matches('/').to_owned();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        kilo_command(&home, &api_url)
            .env("KILO_API_KEY", &key)
            .args(["run", "--model", "kilo/vendor/paid", "What is the answer?"])
            .current_dir(store.dir())
            .output(),
    )
    .await
    .expect("kilo run finishes (a guard against hangs)")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("forty-two"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let sent = upstream.requests();
    assert!(
        !sent.is_empty(),
        "the CLI's request reached the provider through us"
    );
    assert_eq!(sent[0].body["model"], "vendor/paid");
    // Charged to the key's owner (recorded just after the response: wait for the row).
    let row = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let usage: Value = node
                .http
                .get(node.url("/api/usage"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if let Some(row) = usage["usage"].as_array().and_then(|rows| rows.first()) {
                return row.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the request is recorded (a guard against hangs)");
    assert_eq!(row["model"], "vendor/paid", "{row}");
    assert!(row["costMicrodollars"].as_i64().unwrap() > 0, "{row}");
}

#[tokio::test]
async fn kilo_run_sqlite() {
    run_through_the_gateway(Store::sqlite().await).await;
}

#[tokio::test]
async fn kilo_run_postgres() {
    run_through_the_gateway(Store::postgres().await).await;
}

#[tokio::test]
async fn kilo_device_login_sqlite() {
    device_login(Store::sqlite().await).await;
}

#[tokio::test]
async fn kilo_device_login_postgres() {
    device_login(Store::postgres().await).await;
}
