//! Sandbox start and session start.
//!
//! 1. Sandbox start: request to a command run and reaped, through the `local` provider
//!    (bubblewrap with the read-only system binds, hidden `/etc` files, workspace and home
//!    binds, the sandbox's cgroup joined, output captured), beside plain `bwrap --ro-bind / /
//!    --unshare-all` running the same `true`, interleaved in the same run.
//! 2. Session create → first event: a prepared session (its clone done once, outside the
//!    measurement) gets follow-up messages; each is timed from the call to the `started` event
//!    being readable in the log (sandbox prepared, execution running), excluding model time.
//!    Each waits for the previous execution to end.

use std::time::{Duration, Instant};

use kilocloud_agent::ids::{SandboxPolicy, home_path, new_session_id, sandbox_id, workspace_path};
use kilocloud_agent::sandbox::{ExecRequest, LocalSandbox, SandboxConfig, SandboxProvider};
use kilocloud_agent::{Caller, EventFilter, FollowUp, PrepareRequest};
use kilocloud_test_support::fake_openai::Reply;
use kilocloud_test_support::git_server::GitServer;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Args;
use crate::report::{histogram, p50_p99};
use crate::stack::AgentStack;

/// Runs both measurements; returns the report section.
pub async fn run(args: &Args) -> anyhow::Result<String> {
    let mut out = String::from("\n## Sandbox start and session start\n\n");
    out += &sandbox_start(if args.quick { 50 } else { 500 }).await?;
    out +=
        "\n| backend | session create → first event p50 | p99 | executions |\n|---|---|---|---|\n";
    for postgres in [false, true] {
        let n = if args.quick { 20 } else { 200 };
        let (p50, p99) = first_event(postgres, n).await?;
        out += &format!(
            "| {} | {p50:.1} ms | {p99:.1} ms | {n} |\n",
            if postgres { "PostgreSQL" } else { "SQLite" }
        );
    }
    Ok(out)
}

async fn sandbox_start(n: usize) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let local = LocalSandbox::new(&SandboxConfig::default(), dir.path().to_path_buf());
    local.check().await?;
    let (user, session) = (Uuid::new_v4(), new_session_id());
    let id = sandbox_id(None, user, None, SandboxPolicy::Shared, &session);
    let mount = local
        .prepare(
            &id,
            &workspace_path(None, user, &session),
            &home_path(&session),
        )
        .await?;
    let cancel = CancellationToken::new();
    let (mut ours, mut plain) = (histogram(), histogram());
    for i in 0..n + 20 {
        let t = Instant::now();
        let out = local
            .exec(
                &mount,
                ExecRequest::shell("true", Duration::from_secs(10), 1024),
                &cancel,
            )
            .await?;
        let ours_us = t.elapsed().as_micros() as u64;
        anyhow::ensure!(
            out.success(),
            "sandboxed `true` failed: {}",
            out.combined_text()
        );
        let t = Instant::now();
        let status = tokio::process::Command::new("bwrap")
            .args([
                "--ro-bind",
                "/",
                "/",
                "--unshare-all",
                "--die-with-parent",
                "--",
                "sh",
                "-c",
                "true",
            ])
            .status()
            .await?;
        let plain_us = t.elapsed().as_micros() as u64;
        anyhow::ensure!(status.success(), "plain bwrap failed");
        // The first 20 of each warm the page cache.
        if i >= 20 {
            ours.record(ours_us)?;
            plain.record(plain_us)?;
        }
    }
    let ((o50, o99), (p50, p99)) = (p50_p99(&ours), p50_p99(&plain));
    Ok(format!(
        "Sandbox start, request to `sh -c true` run and reaped, {n} runs each, interleaved \
         (cgroups: {}):\n\n\
         | path | p50 | p99 |\n|---|---|---|\n\
         | plain `bwrap --ro-bind / / --unshare-all` | {p50:.2} ms | {p99:.2} ms |\n\
         | `local` provider (kilocloud) | {o50:.2} ms | {o99:.2} ms |\n\
         | ratio ours / plain | {:.2}× | {:.2}× |\n",
        if local.has_cgroups() { "yes" } else { "no" },
        o50 / p50,
        o99 / p99
    ))
}

async fn first_event(postgres: bool, n: usize) -> anyhow::Result<(f64, f64)> {
    let stack = AgentStack::start(postgres, |_| {}, |_, _, _, state| state).await?;
    let AgentStack {
        agents,
        upstream,
        user,
        ..
    } = &stack;
    let git = GitServer::start("bench-token").await;
    let repo = git.create_repo("bench", &[("README.md", "# bench\n")]);
    let caller = Caller {
        user: user.id,
        org: None,
        bot: None,
    };
    let prepared = agents
        .prepare(
            caller,
            PrepareRequest {
                git_url: Some(repo),
                git_token: Some("bench-token".into()),
                prompt: "say done".into(),
                ..PrepareRequest::default()
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("prepare: {e}"))?;
    let session = prepared.session_id;
    let key = format!("{}:{session}", user.id);
    let mut h = histogram();
    let mut signal = agents.event_signal();
    for i in 0..n + 5 {
        upstream.push(Reply::text("done", 5, 1));
        let t = Instant::now();
        let started = if i == 0 {
            agents.initiate(caller, &session).await
        } else {
            let msg = FollowUp {
                prompt: "again".into(),
                ..FollowUp::default()
            };
            agents.send(caller, &session, msg).await
        }
        .map_err(|e| anyhow::anyhow!("start: {e}"))?;
        let filter = EventFilter {
            execution_ids: vec![started.execution_id.clone()],
            event_types: Vec::new(),
        };
        let mut first = None;
        loop {
            signal.borrow_and_update();
            let (events, _) = agents.events(&key, &session, 0, &filter, 1 << 20).await?;
            if first.is_none() && events.iter().any(|e| e.stream_event_type == "started") {
                first = Some(t.elapsed());
            }
            let done = events.iter().any(|e| {
                matches!(
                    e.stream_event_type.as_str(),
                    "complete" | "error" | "interrupted"
                )
            });
            if done {
                break;
            }
            tokio::time::timeout(Duration::from_secs(30), signal.changed()).await??;
        }
        if i >= 5 {
            h.record(first.expect("a started event").as_micros() as u64)?;
        }
    }
    Ok(p50_p99(&h))
}
