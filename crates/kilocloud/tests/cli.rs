//! The `kilocloud` command line: configuration layering and errors, migrate, version, and the
//! operator commands (`queue list|dlq|replay`, `actor show`) against a database a server wrote.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Node, Store, bin};
use serde_json::{Value, json};

fn run(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(bin());
    cmd.current_dir(dir).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_layers_file_env_and_flags() {
    let dir = kilocloud_test_support::temp_dir();
    std::fs::write(
        dir.path().join("kilocloud.toml"),
        "listen = \"127.0.0.1:9000\"\nadmin_token = \"s3cret\"\n[substrate]\nactor_max_backlog = 5\n",
    )
    .unwrap();
    // File found in the working directory; env overrides the file; flags override env.
    let (ok, out, err) = run(
        dir.path(),
        &[
            "config",
            "show",
            "--database-url",
            "postgres://u:pw@db.example/kc",
        ],
        &[
            ("KILOCLOUD_LISTEN", "127.0.0.1:9100"),
            ("KILOCLOUD_SUBSTRATE__QUEUE_POLL_MS", "99"),
        ],
    );
    assert!(ok, "{err}");
    let shown: toml::Value = toml::from_str(&out).unwrap();
    assert_eq!(shown["listen"].as_str(), Some("127.0.0.1:9100"));
    assert_eq!(
        shown["substrate"]["actor_max_backlog"].as_integer(),
        Some(5)
    );
    assert_eq!(shown["substrate"]["queue_poll_ms"].as_integer(), Some(99));
    assert_eq!(
        shown["admin_token"].as_str(),
        Some("***"),
        "secrets are redacted"
    );
    assert_eq!(
        shown["database_url"].as_str(),
        Some("postgres://u:***@db.example/kc")
    );
    assert!(!out.contains("s3cret") && !out.contains(":pw@"));
}

/// `config show` redacts every secret setting, nested ones (GitHub, KiloClaw, Fly, gateway
/// providers, S3) included; unset secrets stay empty.
#[test]
fn config_show_redacts_every_secret() {
    let dir = kilocloud_test_support::temp_dir();
    let file = dir.path().join("secrets.toml");
    std::fs::write(
        &file,
        r#"
admin_token = "sec-admin-token"
jwt_secret = "sec-jwt-secret"
master_key = "sec-master-key"
previous_master_keys = "sec-previous-1,sec-previous-2"
database_url = "postgres://kc:sec-db-password@db.example/kc"
blobs = {kind = "s3", bucket = "b", access_key_id = "AKIA", secret_access_key = "sec-s3-key"}
[[gateway.providers]]
id = "p"
kind = "openai-compatible"
base_url = "https://llm.example/v1"
api_key = "sec-provider-key"
[github]
private_key = "sec-github-pem"
webhook_secrets = ["sec-webhook-1", "sec-webhook-2"]
[claw]
gateway_token_secret = "sec-claw-gateway"
[claw.fly]
api_token = "sec-fly-token"
"#,
    )
    .unwrap();
    let (ok, out, err) = run(
        dir.path(),
        &["--config", file.to_str().unwrap(), "config", "show"],
        &[("KILOCLOUD_INTERNAL_API_SECRET", "sec-internal-from-env")],
    );
    assert!(ok, "{err}");
    assert!(!out.contains("sec-"), "a secret shows:\n{out}");
    let shown: toml::Value = toml::from_str(&out).unwrap();
    for value in [
        &shown["admin_token"],
        &shown["internal_api_secret"],
        &shown["github"]["private_key"],
        &shown["github"]["webhook_secrets"][1],
        &shown["claw"]["gateway_token_secret"],
        &shown["claw"]["fly"]["api_token"],
        &shown["gateway"]["providers"][0]["api_key"],
    ] {
        assert_eq!(value.as_str(), Some("***"), "{out}");
    }
    assert_eq!(
        shown["database_url"].as_str(),
        Some("postgres://kc:***@db.example/kc")
    );
}

#[test]
fn malformed_config_names_file_key_and_expectation() {
    let dir = kilocloud_test_support::temp_dir();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[substrate]\nactor_max_backlog = \"many\"\n").unwrap();
    let (ok, _, err) = run(
        dir.path(),
        &["--config", file.to_str().unwrap(), "config", "show"],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("substrate.actor_max_backlog"), "{err}");
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("expected"), "{err}");
    std::fs::write(&file, "listn = \"typo\"\n").unwrap();
    let (ok, _, err) = run(
        dir.path(),
        &["--config", file.to_str().unwrap(), "config", "show"],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("unknown field") && err.contains("listn"),
        "{err}"
    );
    let (ok, _, err) = run(dir.path(), &["--config", "missing.toml", "version"], &[]);
    assert!(!ok);
    assert!(err.contains("missing.toml"), "{err}");
}

#[test]
fn unknown_arguments_print_usage() {
    let dir = kilocloud_test_support::temp_dir();
    let (ok, _, err) = run(dir.path(), &["serve", "--bogus"], &[]);
    assert!(!ok);
    assert!(
        err.contains("unexpected argument '--bogus'") && err.contains("Usage:"),
        "{err}"
    );
    let (ok, out, _) = run(dir.path(), &["version"], &[]);
    assert!(ok);
    assert!(
        out.starts_with("kilocloud ") && out.contains("schema version 3"),
        "{out}"
    );
}

#[test]
fn unreachable_database_exits_nonzero_with_redacted_url() {
    let dir = kilocloud_test_support::temp_dir();
    let (ok, _, err) = run(
        dir.path(),
        &[
            "migrate",
            "--database-url",
            "postgres://kc:hunter2@127.0.0.1:1/kc",
        ],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("postgres://kc:***@127.0.0.1:1/kc"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

async fn operator_commands(store: Store) {
    let (ok, out, err) = common::cli(&store, &["migrate"]);
    assert!(ok, "{err}");
    assert!(out.contains("schema version 3"), "{out}");
    let mut node = Node::start(&store, "server.log");
    for (token, fail) in [("ok1", false), ("bad1", true), ("bad2", true)] {
        let r = node
            .post(
                "/api/admin/queues/probe/messages",
                json!({"key": "cli", "token": token, "fail": fail}),
            )
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
    }
    node.wait_until(
        "both failures dead-lettered",
        Duration::from_secs(60),
        || async { node.queue("probe").await["dead"] == 2 },
    )
    .await;
    assert!(node.sigterm().success(), "graceful shutdown exits 0");

    let (ok, out, err) = common::cli(&store, &["queue", "list"]);
    assert!(ok, "{err}");
    let line = out.lines().find(|l| l.starts_with("probe")).expect(&out);
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[4], "2", "DEAD column: {out}");

    let (ok, out, _) = common::cli(&store, &["queue", "dlq", "probe", "--json"]);
    assert!(ok);
    let dead: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(dead.len(), 2);
    assert!(
        dead.iter()
            .all(|d| d["attempts"] == 3
                && d["last_error"].as_str().unwrap().contains("asked to fail"))
    );
    let first_id = dead[0]["id"].to_string();

    let (ok, out, _) = common::cli(&store, &["queue", "replay", "probe", "--id", &first_id]);
    assert!(ok);
    assert_eq!(out.trim(), "replayed 1 message(s) to probe");
    let (_, out, _) = common::cli(&store, &["queue", "list", "--json"]);
    let stats: Vec<Value> = serde_json::from_str(&out).unwrap();
    let probe = stats.iter().find(|s| s["queue"] == "probe").unwrap();
    assert_eq!(
        (probe["ready"].as_i64(), probe["dead"].as_i64()),
        (Some(1), Some(1))
    );

    let (ok, out, _) = common::cli(&store, &["actor", "show", "probe", "cli"]);
    assert!(ok);
    let snap: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(snap["storage"]["t/ok1"], true);
    assert_eq!(snap["storage"]["count"], 1);

    let (ok, _, err) = common::cli(&store, &["queue", "dlq", "probe", "--limit", "0"]);
    assert!(!ok);
    assert!(err.contains("--limit"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_operator_commands() {
    operator_commands(Store::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_operator_commands() {
    operator_commands(Store::postgres().await).await;
}

/// What `serve` keeps in its data directory is the server's alone: the directory is 0700
/// (0711 when the server is root and sandboxes kept under it run as their own unprivileged
/// user, which must pass through it; it can neither list nor read), the database and
/// `secrets.toml` are 0600 and the blob directory 0700, even when the directory was made
/// beforehand with the usual 0755.
#[tokio::test]
async fn the_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let store = Store::sqlite().await;
    let dir = store.dir().to_owned();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut node = Node::start(&store, "modes.log");
    let ready = node.http.get(node.url("/ready")).send().await.unwrap();
    assert!(ready.status().is_success());
    let mode = |name: &str| {
        std::fs::metadata(dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode()
            & 0o7777
    };
    let expected = if nix::unistd::geteuid().is_root() {
        0o711
    } else {
        0o700
    };
    assert_eq!(mode(""), expected, "data directory");
    assert_eq!(mode("kilocloud.db"), 0o600);
    if dir.join("kilocloud.db-wal").exists() {
        assert_eq!(mode("kilocloud.db-wal"), 0o600);
    }
    assert_eq!(mode("secrets.toml"), 0o600);
    assert_eq!(mode("blobs"), 0o700);
    assert!(node.sigterm().success());
}
