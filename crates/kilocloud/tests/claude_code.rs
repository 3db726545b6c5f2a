//! Claude Code (`@anthropic-ai/claude-code` from npm, pinned, installed by `scripts/test` and
//! named by `KILOCLOUD_TEST_CLAUDE`) against a real `kilocloud serve` whose only model is
//! served by an OpenAI-compatible provider (the fake): `claude -p` with
//! `ANTHROPIC_BASE_URL=<server>/api/gateway` and a `kc_` key speaks the Messages API to us,
//! its model ids are mapped by `gateway.model_aliases`, the request is translated to Chat
//! Completions and back, the reply is printed, and the owner is charged.

mod common;

use std::time::Duration;

use common::{Node, Store};
use kilocloud_test_support::fake_openai::{FakeOpenAi, Reply};
use serde_json::Value;

/// The `claude` executable; the test fails loudly without it (as the SDK tests do).
fn claude() -> String {
    std::env::var("KILOCLOUD_TEST_CLAUDE").expect(
        "KILOCLOUD_TEST_CLAUDE must name Claude Code's `claude` (scripts/test installs \
         @anthropic-ai/claude-code into target/claude-code)",
    )
}

async fn claude_print(store: Store) {
    let upstream = FakeOpenAi::start().await;
    let config = store.dir().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\n[gateway.model_aliases]\n\"claude-*\" = \"vendor/paid\"\n\
             [[gateway.providers]]\nid = \"fake\"\nkind = \"openai-compatible\"\n\
             base_url = \"{}\"\napi_key = \"upstream-key\"\n[[gateway.providers.models]]\n\
             id = \"vendor/paid\"\ncontext_length = 200000\ninput_price = 3.0\noutput_price = 15.0\n",
            upstream.base_url
        ),
    )
    .unwrap();
    let node = Node::start_with(&store, "node.log", &["--config", config.to_str().unwrap()]);
    let (key, _) = common::admin_login(&store, &node, "node.log").await;
    let balance = || async {
        let (_, b) = node.get_as(&key, "/api/profile/balance").await;
        b["balanceMicrodollars"].as_i64().expect("a balance")
    };
    let before = balance().await;
    // Claude Code may make side requests (a title, a quota probe) before the answer: every
    // one gets the same reply.
    for _ in 0..8 {
        upstream.push(Reply::text("The answer is forty-two.", 900, 9));
    }
    let home = store.dir().join("claude-home");
    std::fs::create_dir_all(&home).unwrap();
    let base = node.url("/api/gateway");
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(claude())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("CLAUDE_CONFIG_DIR", home.join(".claude"))
            .env("ANTHROPIC_BASE_URL", base.trim_end_matches('/'))
            .env("ANTHROPIC_API_KEY", &key)
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("DISABLE_AUTOUPDATER", "1")
            .env("DISABLE_TELEMETRY", "1")
            .env("DISABLE_ERROR_REPORTING", "1")
            .args([
                "-p",
                "What is the answer?",
                "--output-format",
                "json",
                "--max-turns",
                "1",
            ])
            .current_dir(store.dir())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("claude -p finishes (a guard against hangs)")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(store.dir().join("node.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "claude failed\nstdout: {stdout}\nstderr: {stderr}\nserver log tail: {}",
        log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    let result: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("claude's JSON result ({e}): {stdout}\nstderr: {stderr}");
    });
    assert_eq!(result["is_error"], false, "{result}");
    assert!(
        result["result"]
            .as_str()
            .is_some_and(|r| r.contains("forty-two")),
        "{result}"
    );
    // The Messages request went out as Chat Completions: with Claude Code's system prompt
    // and tools, to the aliased model.
    let sent = upstream.requests();
    let answer = sent
        .iter()
        .find(|r| r.body["tools"].as_array().is_some_and(|t| !t.is_empty()))
        .unwrap_or_else(|| panic!("a request with Claude Code's tools: {sent:?}"));
    assert_eq!(answer.body["model"], "vendor/paid");
    assert_eq!(answer.body["messages"][0]["role"], "system");
    assert_eq!(answer.body["stream_options"]["include_usage"], true);
    // Charged: each request 900 × 3 + 9 × 15 = 2,835 µ$, once recorded.
    let usage = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (_, usage) = node.get_as(&key, "/api/usage").await;
            let rows = usage["usage"].as_array().cloned().unwrap_or_default();
            if rows.len() >= sent.len() {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every request is recorded (a guard against hangs)");
    assert!(
        usage.iter().all(|r| r["model"] == "vendor/paid"
            && r["requestedModel"].as_str().unwrap().starts_with("claude-")
            && r["costMicrodollars"] == 2_835),
        "{usage:?}"
    );
    assert_eq!(balance().await, before - 2_835 * usage.len() as i64);
}

#[tokio::test]
async fn claude_code_sqlite() {
    claude_print(Store::sqlite().await).await;
}

#[tokio::test]
async fn claude_code_postgres() {
    claude_print(Store::postgres().await).await;
}
