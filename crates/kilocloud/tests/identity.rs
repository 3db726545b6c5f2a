//! The identity "done when" path on the real binary, on SQLite and PostgreSQL: the bootstrap
//! administrator logs in with the CLI, creates a user, an organization and a member, creates
//! and revokes an API key, stores a secret, and finds it all in the audit log; no secret
//! reaches the server's log. Then the master key is rotated with the CLI.

mod common;

use common::{Node, Store, cli_with};
use serde_json::Value;

const SECRET_VALUE: &str = "sk-cli-secret-value-8c1e";

/// The account CLI as the holder of `creds` (a credentials file path).
fn account(store: &Store, creds: &str, args: &[&str], stdin: Option<&str>) -> String {
    let (ok, out, err) = cli_with(store, args, &[("KILOCLOUD_CREDENTIALS", creds)], stdin);
    assert!(ok, "kilocloud {args:?} failed: {err}");
    out
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The API key the server printed on first start (plain text on stderr, not a log line).
fn bootstrap_key(log: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.trim_start().starts_with("kc_"))
        .unwrap_or_else(|| panic!("no bootstrap key printed:\n{log}"));
    line.trim().to_owned()
}

/// The server's structured log lines (the bootstrap banner is not one of them).
fn log_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.starts_with('{')).collect()
}

async fn done_when(store: Store) {
    let mut node = Node::start(&store, "node.log");
    let dir = store.dir().to_owned();
    let read_log = || std::fs::read_to_string(dir.join("node.log")).unwrap();
    let admin_key = bootstrap_key(&read_log());
    let admin_creds = dir.join("admin-credentials.json").display().to_string();
    let bob_creds = dir.join("bob-credentials.json").display().to_string();
    let a = |args: &[&str]| account(&store, &admin_creds, args, None);

    let out = a(&["login", "--url", &node.url(""), "--token", &admin_key]);
    assert!(
        out.contains("logged in") && out.contains("admin@localhost"),
        "{out}"
    );
    let mode = std::fs::metadata(&admin_creds).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let me = json(&a(&["whoami", "--json"]));
    assert_eq!(
        (me["user"]["isAdmin"].as_bool(), me["credential"].as_str()),
        (Some(true), Some("api_key"))
    );

    let bob = json(&a(&[
        "user",
        "create",
        "--email",
        "bob@example.com",
        "--name",
        "Bob",
        "--json",
    ]));
    let bob_key = bob["apiKey"].as_str().unwrap().to_owned();
    let org = json(&a(&["org", "create", "Acme", "--json"]));
    let org_id = org["id"].as_str().unwrap().to_owned();
    let added = json(&a(&[
        "org",
        "add-member",
        &org_id,
        "bob@example.com",
        "--role",
        "admin",
        "--json",
    ]));
    assert_eq!(added["role"], "admin");
    let table = a(&["org", "members", &org_id]);
    assert!(
        table.contains("bob@example.com") && table.contains("owner"),
        "{table}"
    );

    let created = json(&a(&[
        "token", "create", "deploy", "--org", &org_id, "--json",
    ]));
    let key = created["key"].as_str().unwrap().to_owned();
    let key_id = created["apiKey"]["id"].as_str().unwrap().to_owned();
    assert!(a(&["token", "list", "--org", &org_id]).contains("deploy"));
    let revoked = json(&a(&[
        "token", "revoke", &key_id, "--org", &org_id, "--json",
    ]));
    assert!(revoked["revokedAtMs"].is_i64());
    let status = reqwest::Client::new()
        .get(node.url("/api/users/me"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 401, "a revoked key is refused");

    let out = account(
        &store,
        &admin_creds,
        &["secret", "set", "OPENAI_KEY", "--org", &org_id],
        Some(SECRET_VALUE),
    );
    assert!(out.contains("OPENAI_KEY"));
    let list = a(&["secret", "list", "--org", &org_id, "--json"]);
    assert_eq!(json(&list)["count"], 1);
    assert!(!list.contains(SECRET_VALUE));

    let audit = json(&a(&["audit", "--org", &org_id, "--json"]));
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "secret.written",
            "token.revoked",
            "token.created",
            "member.added",
            "member.added",
            "org.created"
        ]
    );

    // Credit for the organization's model use, granted by the administrator.
    let out = a(&[
        "credits",
        "grant",
        &format!("org:{org_id}"),
        "--usd",
        "5",
        "--note",
        "trial",
    ]);
    assert!(out.contains("balance is now $5.000000"), "{out}");
    let out = a(&["credits", "balance", "--org", &org_id]);
    assert_eq!(out.trim(), "$5.000000");
    let usage = json(&a(&["usage", "--org", &org_id, "--json"]));
    assert_eq!(usage["usage"], serde_json::json!([]));

    // Bob logs in with his key and sees the organization.
    let out = account(
        &store,
        &bob_creds,
        &["login", "--url", &node.url(""), "--token", "-"],
        Some(&bob_key),
    );
    assert!(out.contains("bob@example.com"), "{out}");
    let orgs = json(&account(
        &store,
        &bob_creds,
        &["org", "list", "--json"],
        None,
    ));
    assert_eq!(orgs["organizations"][0]["role"], "admin");
    let (ok, _, err) = cli_with(
        &store,
        &["user", "create", "--email", "x@example.com"],
        &[("KILOCLOUD_CREDENTIALS", &bob_creds)],
        None,
    );
    assert!(!ok && err.contains("403 admin_required"), "{err}");

    // A second init is refused (SQLite: the running server holds the store).
    let (ok, _, err) = cli_with(&store, &["admin", "init"], &[], None);
    assert!(!ok, "{err}");
    assert!(
        err.contains("already initialized") || err.contains("stop the server first"),
        "{err}"
    );

    // A device login (the Kilo CLI's `kilo auth login`): a code, approved with this CLI.
    let started = node
        .http
        .post(node.url("/api/device-auth/codes"))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 200);
    let started: Value = started.json().await.unwrap();
    let code = started["code"].as_str().unwrap().to_owned();
    let poll = || {
        node.http
            .get(node.url(&format!("/api/device-auth/codes/{code}")))
            .send()
    };
    assert_eq!(poll().await.unwrap().status(), 202);
    let out = a(&["login", "approve", &code]);
    assert!(out.contains("approved"), "{out}");
    let approved: Value = poll().await.unwrap().json().await.unwrap();
    assert_eq!(approved["userEmail"], "admin@localhost", "{approved}");
    let device_token = approved["token"].as_str().unwrap().to_owned();
    let me = node
        .http
        .get(node.url("/api/users/me"))
        .bearer_auth(&device_token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200, "the device's token works");

    // The server's log never saw a secret.
    node.sigterm();
    let log = read_log();
    for line in log_lines(&log) {
        for secret in [SECRET_VALUE, &admin_key, &bob_key, &key, &device_token] {
            assert!(!line.contains(secret), "secret in the log: {line}");
        }
    }

    // A lost administrator key is replaced from the database side.
    let (ok, _, err) = cli_with(&store, &["admin", "issue-key"], &[], None);
    assert!(ok, "{err}");
    let recovered = bootstrap_key(&err);
    assert!(recovered.starts_with("kc_") && recovered != admin_key);

    // Rotate the master key: the new key wraps every data key; the old one must be given.
    let new_key = cli_with(&store, &["admin", "generate-key"], &[], None)
        .1
        .trim()
        .to_owned();
    let old_key = match &store {
        Store::Postgres(..) => store
            .env()
            .into_iter()
            .find(|(k, _)| *k == "KILOCLOUD_MASTER_KEY")
            .unwrap()
            .1
            .to_owned(),
        Store::Sqlite(_) => {
            let text = std::fs::read_to_string(dir.join("secrets.toml")).unwrap();
            let generated: toml::Table = toml::from_str(&text).unwrap();
            generated["master_key"].as_str().unwrap().to_owned()
        }
    };
    let rotate =
        |env: &[(&str, &str)]| cli_with(&store, &["admin", "rotate-master-key"], env, None);
    let (ok, _, err) = rotate(&[("KILOCLOUD_MASTER_KEY", &new_key)]);
    assert!(
        !ok && err.contains("is not configured"),
        "without the old key the data keys cannot be opened: {err}"
    );
    let (ok, out, err) = rotate(&[
        ("KILOCLOUD_MASTER_KEY", &new_key),
        ("KILOCLOUD_PREVIOUS_MASTER_KEYS", &old_key),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("re-wrapped 1 secret(s)"), "{out}");
    let (ok, out, _) = rotate(&[("KILOCLOUD_MASTER_KEY", &new_key)]);
    assert!(
        ok && out.contains("re-wrapped 0 secret(s)") && out.contains("1 were already current"),
        "{out}"
    );
}

#[tokio::test]
async fn done_when_sqlite() {
    done_when(Store::sqlite().await).await;
}

#[tokio::test]
async fn done_when_postgres() {
    done_when(Store::postgres().await).await;
}
