//! The Cloud Agent "done when" path on the real binary, on SQLite and PostgreSQL:
//! `kilocloud session create --repo <local repo URL> --prompt …` runs the built-in agent in a
//! bubblewrap sandbox through the gateway (the fake OpenAI upstream scripted to read, edit,
//! run a command and finish), streams its events to the terminal, commits to
//! `session/<id>` on a real git server, and the server delivers the callback. Then `list`,
//! `show`, `send`, `watch` and `delete`.

mod common;

use std::sync::{Arc, Mutex};

use common::{Node, Store, cli_as as cli};
use kilocloud_test_support::fake_openai::{FakeOpenAi, Reply};
use kilocloud_test_support::git_server::GitServer;
use serde_json::{Value, json};

const TOKEN: &str = "ghs_cli_test_token";

fn tool(name: &str, args: Value) -> Reply {
    Reply::ToolCall {
        name: name.into(),
        arguments: args.to_string(),
    }
}

async fn done_when(store: Store) {
    let upstream = FakeOpenAi::start().await;
    let git = GitServer::start(TOKEN).await;
    let repo = git.create_repo("app", &[("hello.txt", "hello world\n")]);
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let config = common::agent_config(
        &store,
        &upstream.base_url,
        "allow_private_callbacks = true\n[agent.git]\nallow_http = true\nallow_private_hosts = true",
    );
    let node = Node::start_with(&store, "node.log", &["--config", config.to_str().unwrap()]);
    let (_, creds) = common::admin_login(&store, &node, "node.log").await;

    for reply in [
        tool("list_files", json!({})),
        tool("read_file", json!({"path": "hello.txt"})),
        tool(
            "write_file",
            json!({"path": "hello.txt", "content": "hello from the agent\n"}),
        ),
        tool("run_command", json!({"command": "cat hello.txt"})),
        tool("finish", json!({"summary": "Rewrote the greeting"})),
    ] {
        upstream.push(reply);
    }
    let (ok, out, err) = cli(
        &store,
        &creds,
        &[
            "session",
            "create",
            "--repo",
            &repo,
            "--token",
            TOKEN,
            "--prompt",
            "Rewrite the greeting",
            "--auto-commit",
            "--callback-url",
            &hook,
        ],
    )
    .await;
    assert!(ok, "session create failed:\n{out}\n{err}");
    // The events, as the terminal shows them.
    for expected in [
        "▶ started",
        "→ list_files",
        "→ read_file",
        "→ write_file",
        "→ run_command",
        "│ hello from the agent",
        "→ finish",
        "pushed session/agent_",
        "✔ completed on branch session/agent_",
        "Rewrote the greeting",
    ] {
        assert!(
            out.contains(expected),
            "missing {expected:?} in:\n{out}\n{err}"
        );
    }
    let session = err
        .lines()
        .find_map(|l| l.strip_prefix("Session "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the session id is printed")
        .to_owned();
    let branch = format!("session/{session}");
    assert_eq!(
        git.file_at("app", &branch, "hello.txt").unwrap(),
        "hello from the agent\n"
    );

    // The callback arrives (the server's consumer delivers it right away).
    node.wait_until("the callback", std::time::Duration::from_secs(30), || {
        let received = received.clone();
        async move { !received.lock().unwrap().is_empty() }
    })
    .await;
    let callback = received.lock().unwrap()[0].clone();
    assert_eq!(callback["sessionId"], session.as_str());
    assert_eq!(callback["status"], "completed");
    assert_eq!(callback["lastSeenBranch"], branch.as_str());

    let (ok, out, _) = cli(&store, &creds, &["session", "list"]).await;
    assert!(
        ok && out.contains(&session) && out.contains("Rewrite the greeting"),
        "{out}"
    );
    let (ok, out, _) = cli(&store, &creds, &["session", "show", &session, "--json"]).await;
    assert!(ok, "{out}");
    let view: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(view["executions"][0]["status"], "completed");
    assert_eq!(view["hasGitToken"], true);
    assert!(!out.contains(TOKEN));

    // A follow-up, then watching the whole log again.
    upstream.push(Reply::text("The greeting is already rewritten.", 10, 5));
    let (ok, out, err) = cli(
        &store,
        &creds,
        &["session", "send", &session, "--prompt", "Check it"],
    )
    .await;
    assert!(
        ok && out.contains("The greeting is already rewritten."),
        "{out}\n{err}"
    );
    let (ok, out, _) = cli(&store, &creds, &["session", "watch", &session]).await;
    assert!(
        ok && out.contains("→ write_file") && out.contains("already rewritten"),
        "{out}"
    );

    let (ok, _, err) = cli(&store, &creds, &["session", "delete", &session]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&store, &creds, &["session", "show", &session]).await;
    assert!(!ok && err.contains("404"), "{err}");
    // The token never reached the server's log.
    let log = std::fs::read_to_string(store.dir().join("node.log")).unwrap();
    assert!(!log.contains(TOKEN));
}

#[tokio::test]
async fn done_when_sqlite() {
    done_when(Store::sqlite().await).await;
}

#[tokio::test]
async fn done_when_postgres() {
    done_when(Store::postgres().await).await;
}
