//! The automation "done when" path on the real binary, on SQLite and PostgreSQL: with the
//! GitHub App configured against the fake GitHub API, `kilocloud github claim` records the
//! installation; a signed `pull_request` webhook leads, with no manual step, to a review with an
//! inline comment posted through the GitHub API (the server's own queue consumers, a real
//! bubblewrap sandbox, a real git server); `kilocloud trigger create --cron` starts a session
//! at its scheduled second. After a restart both still work: the next pull request is
//! reviewed and the schedule fires again.

mod common;

use common::{Node, Store, cli_as as cli};
use kilocloud_test_support::fake_github::{APP_PRIVATE_KEY_PEM, FakeGitHub, FakePull};
use kilocloud_test_support::fake_openai::{FakeOpenAi, Reply};
use kilocloud_test_support::git_server::GitServer;
use serde_json::{Value, json};
use std::time::Duration;

const TOKEN: &str = "ghs_automation_cli_token";
const SECRET: &str = "webhook-secret-cli";
const REPO: &str = "Codertocat/Hello-World";

/// Pushes branch `branch` changing `src/lib.rs`, records pull request `number` on the fake
/// GitHub, and returns its signed `pull_request.opened` delivery body.
fn open_pull(git: &GitServer, github: &FakeGitHub, number: u64, branch: &str) -> Vec<u8> {
    let (_, head, diff) = git.push_branch(
        REPO,
        "main",
        branch,
        &[(
            "src/lib.rs",
            "pub fn one() -> u32 {\n    1\n}\n\npub fn half(x: u32) -> u32 {\n    x / 0\n}\n",
        )],
    );
    github.add_pull(
        "Codertocat",
        "Hello-World",
        FakePull {
            number,
            title: format!("Add half #{number}"),
            head_sha: head.clone(),
            head_ref: branch.into(),
            base_ref: "main".into(),
            diff,
            ..FakePull::default()
        },
    );
    serde_json::to_vec(&json!({
        "action": "opened",
        "number": number,
        "pull_request": {"number": number, "title": format!("Add half #{number}"), "draft": false,
            "head": {"sha": head, "ref": branch}, "base": {"ref": "main"}},
        "repository": {"full_name": REPO, "name": "Hello-World", "owner": {"login": "Codertocat"}},
        "installation": {"id": 77},
        "sender": {"login": "Codertocat"},
    }))
    .unwrap()
}

async fn post_webhook(node: &Node, delivery: &str, body: &[u8]) -> Value {
    node.github_webhook(SECRET, "pull_request", delivery, body)
        .await
}

fn findings() -> Reply {
    Reply::text(
        &json!({"summary": "Division by zero.", "comments": [
            {"path": "src/lib.rs", "line": 6, "body": "`x / 0` always panics."}]})
        .to_string(),
        100,
        20,
    )
}

async fn wait_for_review(node: &Node, github: &FakeGitHub, count: usize) {
    node.wait_until("the review is posted", Duration::from_secs(120), || async {
        github.reviews().len() >= count
    })
    .await;
}

/// The scheduled trigger's requests with a session, via the CLI.
async fn fired(store: &Store, creds: &str) -> Vec<Value> {
    let (ok, out, err) = cli(store, creds, &["trigger", "requests", "tick", "--json"]).await;
    assert!(ok, "{err}");
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    list.into_iter()
        .filter(|r| r["sessionId"].is_string())
        .collect()
}

async fn done_when(store: Store) {
    let upstream = FakeOpenAi::start().await;
    let git = GitServer::start(TOKEN).await;
    git.create_repo(REPO, &[("src/lib.rs", "pub fn one() -> u32 {\n    1\n}\n")]);
    let github = FakeGitHub::start(9001).await;
    github.set_fixed_token(Some(TOKEN.into()));
    github.add_installation(77, "Codertocat", "User");

    let key_path = store.dir().join("app.pem");
    std::fs::write(&key_path, APP_PRIVATE_KEY_PEM).unwrap();
    let config = common::agent_config(
        &store,
        &upstream.base_url,
        &format!(
            r#"[agent.git]
allow_http = true
allow_private_hosts = true
github_base = "{git}"

[github]
app_id = 9001
private_key_path = "{key}"
webhook_secrets = ["{SECRET}"]
api_url = "{api}"
"#,
            git = git.base_url,
            key = key_path.display(),
            api = github.base_url,
        ),
    );
    let config_arg = config.to_str().unwrap().to_owned();
    let node = Node::start_with(&store, "node.log", &["--config", &config_arg]);
    let (admin_key, creds) = common::admin_login(&store, &node, "node.log").await;
    let (ok, _, err) = cli(&store, &creds, &["github", "claim", "77"]).await;
    assert!(
        ok && err.contains("Claimed installation 77 on Codertocat"),
        "{err}"
    );

    // A signed pull_request webhook → a review on the pull request, no manual step.
    upstream.push(findings());
    let body = open_pull(&git, &github, 1, "half");
    let delivery = post_webhook(&node, "cli-1", &body).await;
    assert!(
        delivery["outcome"].as_str().unwrap().contains("queued"),
        "{delivery}"
    );
    wait_for_review(&node, &github, 1).await;
    let review = &github.reviews()[0];
    assert_eq!(review.number, 1);
    assert_eq!(review.body["comments"][0]["line"], 6);
    let (ok, out, _) = cli(&store, &creds, &["review", "list"]).await;
    assert!(ok && out.contains("Codertocat/Hello-World#1"), "{out}");

    // A scheduled trigger starts a session at its second.
    let (ok, out, err) = cli(
        &store,
        &creds,
        &[
            "trigger",
            "create",
            "tick",
            "--repo",
            REPO,
            "--prompt",
            "Tick {{ timestamp }}",
            "--mode",
            "ask",
            "--cron",
            "*/2 * * * * *",
        ],
    )
    .await;
    assert!(ok && out.contains("schedule"), "{out}\n{err}");
    node.wait_until("the schedule fires", Duration::from_secs(60), || async {
        !fired(&store, &creds).await.is_empty()
    })
    .await;
    let first = fired(&store, &creds).await;
    assert_eq!(first[0]["method"], "SCHEDULE");
    assert_eq!(
        first[0]["receivedAt"].as_i64().unwrap() % 2000,
        0,
        "fired for its scheduled second"
    );

    // Restart: the installation, the settings and the schedule are still there.
    let mut node = node;
    assert!(node.sigterm().success());
    let node = Node::start_with(&store, "node2.log", &["--config", &config_arg]);
    common::login(&store, &node, &admin_key, &creds).await;
    let before = fired(&store, &creds).await.len();
    node.wait_until(
        "the schedule fires after the restart",
        Duration::from_secs(60),
        || async { fired(&store, &creds).await.len() > before },
    )
    .await;
    let (ok, _, err) = cli(&store, &creds, &["trigger", "delete", "tick"]).await;
    assert!(ok, "{err}");
    // (The reviewer answers with the fake's default reply this time: a summary-only review.)
    let body = open_pull(&git, &github, 2, "half-again");
    post_webhook(&node, "cli-2", &body).await;
    wait_for_review(&node, &github, 2).await;
    assert!(github.reviews().iter().any(|r| r.number == 2));
    // Secrets never reached the logs.
    for log in ["node.log", "node2.log"] {
        let text = std::fs::read_to_string(store.dir().join(log)).unwrap();
        assert!(!text.contains(TOKEN) && !text.contains(SECRET), "{log}");
    }
}

#[tokio::test]
async fn done_when_sqlite() {
    done_when(Store::sqlite().await).await;
}

#[tokio::test]
async fn done_when_postgres() {
    done_when(Store::postgres().await).await;
}
