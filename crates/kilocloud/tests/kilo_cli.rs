//! The official Kilo Code CLI (`@kilocode/cli` 7.7.7 from npm, installed by `scripts/test`
//! and named by `KILOCLOUD_TEST_KILO`) against a real `kilocloud serve`: `kilo auth login -p
//! kilo` shows a device code from our server, a signed-in user approves it with `kilocloud
//! login approve`, the CLI logs in, and `kilo profile --json` reads the account back; and
//! `kilo run --model kilo/<id>` with an API key answers through our gateway (the fake
//! provider behind it) and is charged; the session it runs is ingested by our server
//! (`KILO_SESSION_INGEST_URL`), shared (`--share`), imported from the share into a fresh home
//! (`kilo import https://app.kilo.ai/s/<token>`) and deleted (`kilo session delete`); and
//! `kilo remote` shows up in the connections of its owner.

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

/// `kilo` with its home (and every XDG directory) under `home`, talking to `api_url` for
/// everything (the Kilo API, session ingest, models.dev; contract §1's safe settings), with
/// telemetry, auto-update and the slow first snapshot off.
fn kilo_command(home: &std::path::Path, api_url: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(kilo());
    cmd.env("HOME", home)
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .env("KILO_API_URL", api_url)
        .env("KILO_SESSION_INGEST_URL", api_url)
        .env("KILO_MODELS_URL", api_url)
        .env("CLOUD_AGENT_NEXT_BASE_URL", api_url)
        .env("KILO_WEB_APP_URL", api_url)
        .env("KILO_TELEMETRY_LEVEL", "off")
        .env("KILO_DISABLE_AUTOUPDATE", "1")
        .env("KILO_CONFIG_CONTENT", r#"{"snapshot":false}"#)
        .env_remove("KILO_API_KEY")
        .env_remove("KILO_DISABLE_SESSION_INGEST")
        .stdin(std::process::Stdio::null());
    cmd
}

/// Runs `cmd` to its end (a deadline of 180 s guards against hangs): (success, stdout,
/// stderr).
async fn finish(cmd: &mut tokio::process::Command, what: &str) -> (bool, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} finishes (a guard against hangs)"))
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A new home `name` for `kilo` in the test's folder, and `node`'s base URL.
fn kilo_home(store: &Store, node: &Node, name: &str) -> (std::path::PathBuf, String) {
    let home = store.dir().join(name);
    std::fs::create_dir_all(&home).unwrap();
    (home, node.url("").trim_end_matches('/').to_owned())
}

/// Polls `probe` until it returns `Some` (a deadline of `secs` guards against hangs).
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    secs: u64,
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} (a guard against hangs)"))
}

/// A server whose gateway serves `vendor/paid` from a fake provider with `replies` queued,
/// the administrator's API key and the `kilocloud` credentials file logged in with it.
async fn gateway_node(
    store: &Store,
    replies: &[&str],
) -> (
    Node,
    String,
    String,
    kilocloud_test_support::fake_openai::FakeOpenAi,
) {
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
    let node = Node::start_with(store, "node.log", &["--config", config.to_str().unwrap()]);
    let (key, creds) = common::admin_login(store, &node, "node.log").await;
    for text in replies {
        upstream.push(Reply::text(text, 120, 8));
    }
    (node, key, creds, upstream)
}

async fn device_login(store: Store) {
    let node = Node::start(&store, "node.log");
    let (_, creds) = common::admin_login(&store, &node, "node.log").await;
    let (home, api_url) = kilo_home(&store, &node, "kilo-home");
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
    let (node, key, _, upstream) = gateway_node(&store, &["The answer is forty-two."; 4]).await;
    let (home, api_url) = kilo_home(&store, &node, "kilo-home");
    let (ok, stdout, stderr) = finish(
        kilo_command(&home, &api_url)
            .env("KILO_API_KEY", &key)
            .args(["run", "--model", "kilo/vendor/paid", "What is the answer?"])
            .current_dir(store.dir()),
        "kilo run",
    )
    .await;
    assert!(
        ok && stdout.contains("forty-two"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let sent = upstream.requests();
    assert!(
        !sent.is_empty(),
        "the CLI's request reached the provider through us"
    );
    assert_eq!(sent[0].body["model"], "vendor/paid");
    // Charged to the key's owner (recorded just after the response: wait for the row).
    let row = until(30, "the request is recorded", || async {
        let (_, usage) = node.get_as(&key, "/api/usage").await;
        usage["usage"].as_array()?.first().cloned()
    })
    .await;
    assert_eq!(row["model"], "vendor/paid", "{row}");
    assert!(row["costMicrodollars"].as_i64().unwrap() > 0, "{row}");
}

/// `kilo run --share` ingests its session into our server: it shows in our listing (and in
/// `kilocloud session list`) with the user's and the assistant's messages; the share URL it
/// prints is imported by `kilo import` in a fresh home (fetched from our server); `kilo
/// session delete` deletes it from our server too.
async fn session_ingest(store: Store) {
    let (node, key, creds, _upstream) = gateway_node(&store, &["Hi from the fake model."; 4]).await;
    let (home, api_url) = kilo_home(&store, &node, "kilo-home");
    let (ok, stdout, stderr) = finish(
        kilo_command(&home, &api_url)
            .env("KILO_API_KEY", &key)
            .args(["run", "--share", "--model", "kilo/vendor/paid", "say hi"])
            .current_dir(store.dir()),
        "kilo run --share",
    )
    .await;
    assert!(
        ok && stdout.contains("Hi from the fake model"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let share_url = format!("{stdout}\n{stderr}")
        .split_whitespace()
        .find(|w| w.starts_with("https://app.kilo.ai/s/"))
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_owned()
        })
        .unwrap_or_else(|| panic!("kilo run --share prints the share URL: {stdout}{stderr}"));
    let token = share_url
        .trim_start_matches("https://app.kilo.ai/s/")
        .to_owned();

    // The session is in our listing with both messages (the CLI drains its queue before
    // it exits; a poll still guards against ordering between its last flushes).
    let (session_id, export) = until(60, "the session is ingested with its reply", || async {
        let (_, list) = node.get_as(&key, "/api/session").await;
        let id = list["sessions"][0]["sessionId"].as_str()?.to_owned();
        let (_, export) = node
            .get_as(&key, &format!("/api/session/{id}/export"))
            .await;
        let replied = export["messages"].as_array()?.iter().any(|m| {
            m["info"]["role"] == "assistant"
                && m["parts"].as_array().is_some_and(|parts| {
                    parts.iter().any(|p| {
                        p["text"]
                            .as_str()
                            .is_some_and(|t| t.contains("Hi from the fake model"))
                    })
                })
        });
        replied.then_some((id, export))
    })
    .await;
    assert!(session_id.starts_with("ses_"), "{session_id}");
    assert_eq!(export["info"]["id"], session_id.as_str(), "{export}");
    let roles: Vec<&str> = export["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["info"]["role"].as_str())
        .collect();
    assert_eq!(roles, ["user", "assistant"], "{export}");
    let (_, summary) = node
        .get_as(&key, &format!("/api/session/{session_id}"))
        .await;
    assert_eq!(summary["shareToken"], token.as_str(), "{summary}");
    assert_eq!(summary["platform"], "cli", "{summary}");

    // `kilocloud session list` shows it as a CLI session.
    let (ok, listed, err) = common::cli_as(&store, &creds, &["session", "list"]).await;
    assert!(ok, "{err}");
    let row = listed
        .lines()
        .find(|l| l.contains(&session_id))
        .unwrap_or_else(|| panic!("the CLI session is listed: {listed}"));
    assert!(row.contains("cli"), "{row}");

    // `kilo import` of the share URL, in a fresh home with no credentials.
    let (fresh, _) = kilo_home(&store, &node, "kilo-import-home");
    let (ok, out, err) = finish(
        kilo_command(&fresh, &api_url)
            .args(["import", &share_url])
            .current_dir(store.dir()),
        "kilo import",
    )
    .await;
    let text = format!("{out}{err}");
    // (`kilo import` exits 0 on a failed fetch too; its output says which.)
    assert!(
        ok && text.contains(&format!("Imported session: {session_id}")),
        "kilo import: {text}"
    );
    let sessions = kilo_command(&fresh, &api_url)
        .args(["session", "list", "--all", "--format", "json"])
        .current_dir(store.dir())
        .output()
        .await
        .unwrap();
    let sessions = String::from_utf8_lossy(&sessions.stdout);
    assert!(
        sessions.contains(&session_id),
        "the imported session is in the fresh home: {sessions} ({text})"
    );

    // `kilo session delete` deletes it here too.
    let (ok, _, err) = finish(
        kilo_command(&home, &api_url)
            .env("KILO_API_KEY", &key)
            .args(["session", "delete", &session_id])
            .current_dir(store.dir()),
        "kilo session delete",
    )
    .await;
    assert!(ok, "kilo session delete: {err}");
    until(60, "the session is deleted from the server", || async {
        let (status, _) = node
            .get_as(&key, &format!("/api/session/{session_id}"))
            .await;
        (status == 404).then_some(())
    })
    .await;
    let (status, _) = node.get_as("", &format!("/session/{token}")).await;
    assert_eq!(status, 404, "the share is gone with the session");
}

/// `kilo remote` connects to our server's WebSocket with its credential and heartbeats: it
/// appears in its owner's connections until it is stopped.
async fn remote(store: Store) {
    let node = Node::start(&store, "node.log");
    let (key, _) = common::admin_login(&store, &node, "node.log").await;
    let (home, api_url) = kilo_home(&store, &node, "kilo-home");
    let mut child = kilo_command(&home, &api_url)
        .env("KILO_API_KEY", &key)
        .arg("remote")
        .current_dir(store.dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run kilo remote");
    let connection = until(90, "kilo remote heartbeats", || async {
        let (_, list) = node.get_as(&key, "/api/user/cli/connections").await;
        let first = list["connections"].as_array()?.first()?.clone();
        (first["heartbeats"].as_u64()? >= 1).then_some(first)
    })
    .await;
    assert_eq!(connection["protocolVersion"], "7.7.7", "{connection}");
    assert!(
        connection["instance"]["name"].is_string(),
        "the heartbeat names its instance: {connection}"
    );
    // SIGTERM: `kilo` is a Node wrapper that forwards it to the CLI binary (a SIGKILL
    // would leave the binary running).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().expect("running") as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("kilo remote exits on SIGTERM (a guard against hangs)")
        .unwrap();
    until(60, "the connection goes away with the process", || async {
        let (_, list) = node.get_as(&key, "/api/user/cli/connections").await;
        list["connections"].as_array()?.is_empty().then_some(())
    })
    .await;
}

/// `kilo cloud start --stream`, then `kilo cloud result`: the CLI's tRPC calls start a Cloud
/// Agent session on `acme/app` (cloned from the test git server as our GitHub), its stream
/// ticket opens `/stream`, the events print until `complete`, the agent's change is pushed,
/// and the result names the summary; `kilo cloud send` runs a follow-up on the same session.
async fn cloud(store: Store) {
    use kilocloud_test_support::fake_openai::{FakeOpenAi, Reply};
    use kilocloud_test_support::git_server::GitServer;
    let upstream = FakeOpenAi::start().await;
    let git = GitServer::start_public().await;
    git.create_repo("acme/app", &[("hello.txt", "hello\n")]);
    let config = common::agent_config(
        &store,
        &upstream.base_url,
        &format!(
            "[agent.git]\ngithub_base = \"{}\"\nallow_http = true\nallow_private_hosts = true",
            git.base_url
        ),
    );
    let node = Node::start_with(&store, "node.log", &["--config", config.to_str().unwrap()]);
    let (key, _) = common::admin_login(&store, &node, "node.log").await;
    let tool = |name: &str, args: Value| Reply::ToolCall {
        name: name.into(),
        arguments: args.to_string(),
    };
    upstream.push(tool(
        "write_file",
        serde_json::json!({"path": "hello.txt", "content": "hello from kilo cloud\n"}),
    ));
    upstream.push(tool(
        "finish",
        serde_json::json!({"summary": "Updated the greeting"}),
    ));
    let (home, api_url) = kilo_home(&store, &node, "kilo-cloud");
    let lines = cloud_start(&home, &api_url, &key, &["--prompt", "Update the greeting"]).await;
    let started = lines
        .iter()
        .find(|l| l["cloudAgentSessionId"].is_string() && l["messageId"].is_string())
        .unwrap_or_else(|| panic!("a start result: {lines:?}"));
    let session = started["cloudAgentSessionId"].as_str().unwrap().to_owned();
    let message = started["messageId"].as_str().unwrap().to_owned();
    assert!(session.starts_with("agent_"), "{started}");
    assert!(
        lines.iter().any(|l| l["streamEventType"] == "complete"),
        "the stream printed the events to the end: {lines:?}"
    );
    assert_eq!(
        git.file_at("acme/app", &format!("session/{session}"), "hello.txt")
            .as_deref(),
        Some("hello from kilo cloud\n"),
        "the agent's change was pushed"
    );
    let result = cloud_result(&home, &api_url, &key, &session, &message).await;
    assert_eq!(result["status"], "completed", "{result}");
    assert_eq!(
        result["assistant"]["text"], "Updated the greeting",
        "{result}"
    );

    // A follow-up on the same session.
    upstream.push(tool(
        "finish",
        serde_json::json!({"summary": "Nothing else to do"}),
    ));
    let (ok, out, err) = finish(
        kilo_command(&home, &api_url)
            .env("KILO_API_KEY", &key)
            .args([
                "cloud",
                "send",
                "--session-id",
                &session,
                "--prompt",
                "Anything else?",
            ]),
        "kilo cloud send",
    )
    .await;
    assert!(ok, "kilo cloud send failed\nstdout: {out}\nstderr: {err}");
    let sent: Value = serde_json::from_str(out.lines().next().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(sent["cloudAgentSessionId"], session.as_str(), "{sent}");
    let followup = sent["messageId"].as_str().expect("a message id").to_owned();
    let text = until(60, "the follow-up completes", || {
        let (home, api_url, key, session, followup) = (
            home.clone(),
            api_url.clone(),
            key.clone(),
            session.clone(),
            followup.clone(),
        );
        async move {
            let result = cloud_result(&home, &api_url, &key, &session, &followup).await;
            (result["status"] == "completed").then(|| result["assistant"]["text"].clone())
        }
    })
    .await;
    assert_eq!(text, "Nothing else to do");

    // For an organization (`--org-id`): the session is the organization's, and the calls
    // that name no organization still find it.
    let (status, org) = {
        let res = node
            .http
            .post(node.url("/api/orgs"))
            .bearer_auth(&key)
            .json(&serde_json::json!({"name": "Acme"}))
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 201, "{org}");
    let org = org["id"].as_str().expect("an organization id").to_owned();
    let granted = node
        .http
        .post(node.url("/api/admin/credits"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"owner": format!("org:{org}"), "amountMicrodollars": 1_000_000, "note": "test"}))
        .send()
        .await
        .unwrap();
    assert!(granted.status().is_success());
    upstream.push(tool(
        "finish",
        serde_json::json!({"summary": "Done for Acme"}),
    ));
    let lines = cloud_start(
        &home,
        &api_url,
        &key,
        &["--prompt", "Work for Acme", "--org-id", &org],
    )
    .await;
    let started = lines
        .iter()
        .find(|l| l["messageId"].is_string())
        .unwrap_or_else(|| panic!("a start result: {lines:?}"));
    let org_session = started["cloudAgentSessionId"].as_str().unwrap().to_owned();
    let (_, listed) = node.get_for(&key, Some(&org), "/api/sessions").await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["sessionId"] == org_session.as_str()),
        "the organization's sessions: {listed}"
    );
    let message = started["messageId"].as_str().unwrap();
    let result = cloud_result(&home, &api_url, &key, &org_session, message).await;
    assert_eq!(result["assistant"]["text"], "Done for Acme", "{result}");
}

/// `kilo cloud start --repo acme/app --model kilo/vendor/paid --stream` with `args`, which
/// must succeed: the JSON lines it printed (the start result, then the events).
async fn cloud_start(
    home: &std::path::Path,
    api_url: &str,
    key: &str,
    args: &[&str],
) -> Vec<Value> {
    let (ok, out, err) = finish(
        kilo_command(home, api_url)
            .env("KILO_API_KEY", key)
            .args([
                "cloud",
                "start",
                "--repo",
                "acme/app",
                "--model",
                "kilo/vendor/paid",
                "--stream",
            ])
            .args(args),
        "kilo cloud start",
    )
    .await;
    assert!(
        ok,
        "kilo cloud start {args:?} failed\nstdout: {out}\nstderr: {err}"
    );
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `kilo cloud result` for `message` of `session`: its JSON (the CLI exits 2 while the
/// message is queued or running, so only its output counts).
async fn cloud_result(
    home: &std::path::Path,
    api_url: &str,
    key: &str,
    session: &str,
    message: &str,
) -> Value {
    let (_, out, err) = finish(
        kilo_command(home, api_url).env("KILO_API_KEY", key).args([
            "cloud",
            "result",
            "--session-id",
            session,
            "--message-id",
            message,
        ]),
        "kilo cloud result",
    )
    .await;
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("kilo cloud result ({e})\nstdout: {out}\nstderr: {err}"))
}

/// A test module per scenario, `<scenario>::sqlite` and `<scenario>::postgres`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::Store::sqlite().await).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(super::Store::postgres().await).await
            }
        }
    )*};
}

on_both_stores!(
    cloud,
    session_ingest,
    remote,
    run_through_the_gateway,
    device_login
);
