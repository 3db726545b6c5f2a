//! KiCI dispatch (issue 18: webhook → job started on an idle agent, p99 ≤ 50 ms excluding
//! the clone; 1,000 queued jobs drained by 8 agents).
//!
//! The orchestrator runs in process on each backend with the fake GitHub API serving the
//! lock file (the installation token and the lock are cached after the first delivery, as
//! in production). Agents speak the protocol through `Ci`'s connection API — the calls the
//! WebSocket handler makes — so the numbers are the orchestrator's: no socket, no sandbox,
//! no clone. `dispatch latency` is from handing a push delivery to the pipeline (what the
//! GitHub ingress does after verifying and deduplicating it) to the agent receiving
//! `job.dispatch`; the agent then reports the job done before the next delivery. `drain`
//! creates 4 runs of a 250-job matrix (1,000 jobs) with 8 agents of one slot each, every
//! agent reporting success as soon as it receives a job; `gap` is, per job, the time from
//! an agent's success report to its next dispatch (the orchestrator's overhead between jobs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kilocloud_automation::GitHubApp;
use kilocloud_automation::webhook::{DeliverySink, InboundDelivery};
use kilocloud_ci::protocol::{FromAgent, ReportedJobState, ToAgent};
use kilocloud_ci::{AgentHandle, Ci, CiConfig, RunSource};
use kilocloud_identity::envelope::{MasterKey, MasterKeys};
use kilocloud_identity::{Identity, IdentityConfig, Owner};
use kilocloud_kici::workflow::{WorkflowSource, compile, to_lock_json};
use kilocloud_test_support::fake_github::{APP_PRIVATE_KEY_PEM, FakeGitHub};
use serde_json::json;

use crate::report::{histogram, p50_p99, rate};
use crate::{Args, Backend};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// Runs both measurements on both backends; returns the report section.
pub async fn run(args: &Args) -> anyhow::Result<String> {
    let (deliveries, jobs_per_run) = if args.quick { (30, 25) } else { (300, 250) };
    // `KILOCLOUD_BENCH_CI_JOBS_PER_RUN` changes the matrix width (4 runs of it are drained).
    let jobs_per_run = std::env::var("KILOCLOUD_BENCH_CI_JOBS_PER_RUN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(jobs_per_run);
    let mut out = String::from(
        "\n## KiCI dispatch\n\n\
         | backend | webhook → job.dispatch p50 | p99 | deliveries | jobs drained by 8 agents | \
         drain time | jobs/s | gap p50 | gap p99 |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for postgres in [false, true] {
        out += &measure(postgres, deliveries, jobs_per_run).await?;
    }
    Ok(out)
}

struct Bench {
    ci: Ci,
    owner: Owner,
    _github: FakeGitHub,
    _backend: Backend,
}

async fn setup(postgres: bool) -> anyhow::Result<Bench> {
    let backend = Backend::open(postgres).await?;
    let sub = &backend.substrate;
    let github = FakeGitHub::start(4343).await;
    github.set_fixed_token(Some("ghs_bench".into()));
    github.add_installation(9, "bench", "Organization");
    let lock = compile(&[WorkflowSource {
        file: ".kici/workflows/ci.yml".into(),
        text: "name: ci\non: [{push: {}}]\njobs:\n  j: { runsOn: linux, run: 'true' }\n".into(),
    }])?;
    github.add_file(
        "bench",
        "app",
        SHA,
        ".kici/kici.lock.json",
        &to_lock_json(&lock),
    );
    let identity = Identity::new(
        sub,
        IdentityConfig {
            jwt_secret: b"bench-ci-jwt-secret-0123456789abcdef".to_vec(),
            master_keys: MasterKeys::new(MasterKey::generate().0, vec![]),
            internal_api_secret: None,
        },
    );
    let app = GitHubApp::new(
        &kilocloud_automation::GitHubConfig {
            app_id: 4343,
            private_key: APP_PRIVATE_KEY_PEM.into(),
            webhook_secrets: vec!["unused".into()],
            api_url: github.base_url.clone(),
            ..kilocloud_automation::GitHubConfig::default()
        },
        sub,
        &identity,
    )
    .map_err(anyhow::Error::msg)?;
    let ci = Ci::new(sub, identity, app, CiConfig::default());
    ci.start();
    Ok(Bench {
        ci,
        owner: Owner::Org(uuid::Uuid::new_v4()),
        _github: github,
        _backend: backend,
    })
}

async fn agent(b: &Bench, id: &str) -> anyhow::Result<AgentHandle> {
    let (handle, _) =
        b.ci.register(
            b.owner,
            FromAgent::Register {
                agent_id: id.into(),
                labels: vec!["linux".into()],
                max_concurrency: 1,
                in_flight_jobs: Vec::new(),
                hostname: "bench".into(),
                version: "0".into(),
                protocol_version: 1,
            },
        )
        .await?;
    Ok(handle)
}

/// Waits for the agent's next dispatch (wake-ups, then a take), or `None` once `stop` says
/// so. A take is never abandoned half way: what it hands over is the agent's.
async fn next_job(
    ci: &Ci,
    agent: &AgentHandle,
    stop: impl Fn() -> bool,
) -> anyhow::Result<Option<kilocloud_ci::protocol::JobRef>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for msg in ci.take(agent).await? {
            if let ToAgent::JobDispatch { job, .. } = msg {
                return Ok(Some(job));
            }
        }
        if stop() {
            return Ok(None);
        }
        anyhow::ensure!(Instant::now() < deadline, "no job came");
        let _ = tokio::time::timeout(Duration::from_millis(200), agent.woken()).await;
    }
}

async fn finish(
    ci: &Ci,
    agent: &AgentHandle,
    job: &kilocloud_ci::protocol::JobRef,
) -> anyhow::Result<()> {
    for state in [ReportedJobState::Running, ReportedJobState::Success] {
        ci.agent_message(
            agent,
            FromAgent::JobStatus {
                job: job.clone(),
                state,
                error: None,
            },
        )
        .await?;
    }
    Ok(())
}

async fn measure(postgres: bool, deliveries: usize, jobs_per_run: usize) -> anyhow::Result<String> {
    let b = setup(postgres).await?;
    let name = if postgres { "PostgreSQL" } else { "SQLite" };
    // Webhook → job.dispatch on an idle agent.
    let idle = agent(&b, "idle").await?;
    let mut latency = histogram();
    for i in 0..deliveries + 5 {
        let delivery = InboundDelivery {
            delivery: format!("bench-{i}"),
            event: "push".into(),
            owner: b.owner,
            user: uuid::Uuid::nil(),
            installation_id: 9,
            payload: json!({
                "ref": "refs/heads/main", "after": SHA, "before": "0".repeat(40),
                "repository": {"full_name": "bench/app", "clone_url": "https://git.invalid/bench/app.git"},
                "installation": {"id": 9}, "sender": {"id": 1}, "commits": [],
            }),
        };
        let start = Instant::now();
        b.ci.deliver(&delivery).await.map_err(anyhow::Error::msg)?;
        let job = next_job(&b.ci, &idle, || false)
            .await?
            .expect("never stopped");
        let took = start.elapsed();
        // The first deliveries warm the token and lock caches.
        if i >= 5 {
            latency.record(took.as_micros() as u64)?;
        }
        finish(&b.ci, &idle, &job).await?;
    }
    b.ci.disconnect(&idle).await?;
    let (l50, l99) = p50_p99(&latency);

    // 1,000 queued jobs, 8 agents.
    let text = format!(
        "name: wide\njobs:\n  j:\n    runsOn: linux\n    matrix: {{ n: [{}] }}\n    run: 'true'\n",
        (0..jobs_per_run)
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let wide = compile(&[WorkflowSource {
        file: ".kici/workflows/wide.yml".into(),
        text,
    }])?
    .workflows
    .remove(0);
    let total = jobs_per_run * 4;
    let start = Instant::now();
    for r in 0..4 {
        let source = RunSource {
            repo: "bench/app".into(),
            clone_url: "https://git.invalid/bench/app.git".into(),
            git_ref: "refs/heads/main".into(),
            sha: SHA.into(),
            event: "push".into(),
            delivery: format!("drain-{r}"),
            installation_id: None,
            rerun_of: None,
        };
        b.ci.start_run(b.owner, &wide, &source, json!([])).await?;
    }
    let gaps = Arc::new(std::sync::Mutex::new(histogram()));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for a in 0..8 {
        let handle = agent(&b, &format!("drain-{a}")).await?;
        let (ci, gaps, done) = (b.ci.clone(), gaps.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut last: Option<Instant> = None;
            loop {
                let stop = || done.load(std::sync::atomic::Ordering::SeqCst) >= total;
                let Some(job) = next_job(&ci, &handle, stop).await? else {
                    return anyhow::Ok(());
                };
                if let Some(t) = last {
                    gaps.lock()
                        .unwrap()
                        .record(t.elapsed().as_micros() as u64)?;
                }
                finish(&ci, &handle, &job).await?;
                last = Some(Instant::now());
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed();
    let (g50, g99) = p50_p99(&gaps.lock().unwrap());
    Ok(format!(
        "| {name} | {l50:.2} ms | {l99:.2} ms | {deliveries} | {total} | {:.2} s | {:.0} | {g50:.2} ms | {g99:.2} ms |\n",
        elapsed.as_secs_f64(),
        rate(total as u64, elapsed)
    ))
}
