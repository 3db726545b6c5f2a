//! The official Kilo Code CLI (`@kilocode/cli` 7.7.7 from npm, installed by `scripts/test`
//! and named by `KILOCLOUD_TEST_KILO`) against a real `kilocloud serve`: `kilo auth login -p
//! kilo` shows a device code from our server, a signed-in user approves it with `kilocloud
//! login approve`, the CLI logs in, and `kilo profile --json` reads the account back.

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

#[tokio::test]
async fn kilo_device_login_sqlite() {
    device_login(Store::sqlite().await).await;
}

#[tokio::test]
async fn kilo_device_login_postgres() {
    device_login(Store::postgres().await).await;
}
