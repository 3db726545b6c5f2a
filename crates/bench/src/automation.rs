//! Webhook → session started (DESIGN.md §6: p99 ≤ 50 ms excluding sandbox and clone).
//!
//! A webhook trigger on a repository of a claimed GitHub App installation (the fake GitHub API
//! mints the token, a real git server serves the clone, the `local` bubblewrap provider runs
//! the sandbox) is called over HTTP, one request at a time; the server's own queue consumer
//! delivers it. For each request: `total` runs from the POST to the session's execution being
//! created (initiate done); `prepare` is the delivery's prepare step (installation token, clone,
//! sandbox workspace), from the delivery's start to the session's `preparedAt`; the target
//! applies to `total − prepare`. Times are wall-clock milliseconds read from the records, so
//! they carry ±1 ms of rounding. Each request waits for the previous session to end.

use std::time::Duration;

use kilocloud_agent::Caller;
use kilocloud_automation::{Automation, AutomationConfig, GitHubConfig};
use kilocloud_identity::Owner;
use kilocloud_substrate::{Clock, SystemClock};
use kilocloud_test_support::fake_github::{APP_PRIVATE_KEY_PEM, FakeGitHub};
use kilocloud_test_support::git_server::GitServer;
use serde_json::json;

use crate::Args;
use crate::report::{histogram, p50_p99};
use crate::stack::AgentStack;

/// Runs the measurement on both backends; returns the report section.
pub async fn run(args: &Args) -> anyhow::Result<String> {
    let n = if args.quick { 10 } else { 100 };
    let mut out = String::from(
        "\n## Webhook → session started\n\n\
         An unauthenticated webhook trigger (`POST /hooks/…` → queue `webhook-delivery` → render → \
         installation token → prepare → initiate), one request at a time, each session run to \
         its end before the next request. `total` is POST → execution created; `prepare` is \
         the token, clone and sandbox workspace; the target (p99 ≤ 50 ms) is for `total − \
         prepare`.\n\n\
         | backend | total p50 | total p99 | prepare p50 | total − prepare p50 | total − prepare p99 | requests |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for postgres in [false, true] {
        out += &measure(postgres, n).await?;
    }
    Ok(out)
}

async fn measure(postgres: bool, n: usize) -> anyhow::Result<String> {
    let git = GitServer::start("bench-gh-token").await;
    git.create_repo("acme/app", &[("README.md", "# app\n")]);
    let github = FakeGitHub::start(31337).await;
    github.set_fixed_token(Some("bench-gh-token".into()));
    github.add_installation(5, "acme", "Organization");
    let config = AutomationConfig {
        github: GitHubConfig {
            app_id: 31337,
            private_key: APP_PRIVATE_KEY_PEM.into(),
            webhook_secrets: vec!["unused".into()],
            api_url: github.base_url.clone(),
            ..GitHubConfig::default()
        },
        ..AutomationConfig::default()
    };
    let git_base = git.base_url.clone();
    let mut automation = None;
    let stack = AgentStack::start(
        postgres,
        |c| c.git.github_base = git_base,
        |sub, identity, agents, state| {
            let a = Automation::new(sub, identity.clone(), agents.clone(), config)
                .expect("automation config is valid");
            a.start();
            automation = Some(a.clone());
            state.with_automation(a)
        },
    )
    .await?;
    let automation = automation.expect("built");
    let owner = Owner::User(stack.user.id);
    automation
        .claim_installation(owner, stack.user.id, true, 5)
        .await
        .map_err(|e| anyhow::anyhow!("claim: {e}"))?;
    automation
        .create_trigger(
            owner,
            stack.user.id,
            serde_json::from_value(json!({
                "id": "bench",
                "destination": {"type": "cloud_agent", "githubRepo": "acme/app", "mode": "ask",
                    "promptTemplate": "Handle {{ payload.n }}"},
                "activation": {"type": "webhook"},
            }))?,
        )
        .await
        .map_err(|e| anyhow::anyhow!("trigger: {e}"))?;
    let caller = Caller {
        user: stack.user.id,
        org: None,
        bot: None,
    };
    let http = reqwest::Client::new();
    let url = format!("{}/hooks/user/{}/bench", stack.base, stack.user.id);
    let (mut total, mut prepare, mut rest) = (histogram(), histogram(), histogram());
    let mut signal = stack.agents.event_signal();
    for i in 0..n + 3 {
        let t0 = SystemClock.now_ms();
        let res = http
            .post(&url)
            .header("content-type", "application/json")
            .body(json!({"n": i}).to_string())
            .send()
            .await?;
        anyhow::ensure!(res.status() == 202, "webhook answered {}", res.status());
        let id = res.json::<serde_json::Value>().await?["requestId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        // Until the session's execution exists, then until the request is settled.
        let (created, prepared, started) = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                signal.borrow_and_update();
                let r = automation
                    .trigger_request(owner, "bench", &id)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if let Some(session) = &r.session_id
                    && let Ok(view) = stack.agents.get(caller, session).await
                    && let Some(exec) = view.executions.first()
                    && !matches!(
                        r.status,
                        kilocloud_automation::triggers::RequestStatus::Captured
                            | kilocloud_automation::triggers::RequestStatus::Inprogress
                    )
                {
                    return anyhow::Ok((
                        exec.created_at,
                        view.prepared_at,
                        r.started_at.unwrap_or(r.received_at),
                    ));
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), signal.changed()).await;
            }
        })
        .await??;
        if i >= 3 {
            let t = (created - t0).max(0) as u64;
            let p = (prepared - started).max(0) as u64;
            total.record(t * 1000)?;
            prepare.record(p * 1000)?;
            rest.record(t.saturating_sub(p) * 1000)?;
        }
    }
    let ((t50, t99), (p50, _), (r50, r99)) = (p50_p99(&total), p50_p99(&prepare), p50_p99(&rest));
    Ok(format!(
        "| {} | {t50:.0} ms | {t99:.0} ms | {p50:.0} ms | {r50:.0} ms | {r99:.0} ms | {n} |\n",
        stack.backend.name
    ))
}
