//! KiCI's orchestrator as a service, on SQLite and PostgreSQL, with agents speaking the
//! protocol through [`Ci`]'s connection API (the WebSocket and the sandboxes are covered end
//! to end in the `kilocloud` crate's `ci.rs`): `needs` gating with `when` and skip cascades,
//! matrices, label matching with `runsOnPick`, FIFO order, held jobs that say why, cancel
//! (queued, graceful, forced), the recovery window after a disconnect (reclaimed, lost,
//! restarted without the job), refused dispatches, and the pipeline against the fake GitHub
//! (lock cache by ref, corrupt locks recorded and never cached, missing locks).

use std::sync::Arc;
use std::time::Duration;

use kilocloud_automation::GitHubApp;
use kilocloud_automation::webhook::InboundDelivery;
use kilocloud_ci::protocol::{FromAgent, JobRef, ReportedJobState, ToAgent};
use kilocloud_ci::run::JobRecord;
use kilocloud_ci::{AgentHandle, Ci, CiConfig, RunSource};
use kilocloud_identity::envelope::{MasterKey, MasterKeys};
use kilocloud_identity::{Identity, IdentityConfig, Owner};
use kilocloud_kici::JobStatus;
use kilocloud_kici::lock::LockWorkflow;
use kilocloud_kici::workflow::{WorkflowSource, compile, to_lock_json};
use kilocloud_substrate::{ManualClock, Substrate};
use kilocloud_test_support::fake_github::{APP_PRIVATE_KEY_PEM, FakeGitHub};
use kilocloud_test_support::{TestStore, on_both_backends};
use serde_json::json;
use uuid::Uuid;

/// 2027-01-01T00:00:00Z.
const T0: i64 = 1_798_761_600_000;
const RECOVERY_MS: u64 = 120_000;

struct Env {
    _store: TestStore,
    sub: Substrate,
    ci: Ci,
    clock: Arc<ManualClock>,
    owner: Owner,
    github: Option<FakeGitHub>,
}

async fn env(postgres: bool, with_github: bool) -> Env {
    let store = TestStore::new(postgres).await;
    let clock = Arc::new(ManualClock::new(T0));
    let sub = store.open(clock.clone()).await;
    let identity = Identity::new(
        &sub,
        IdentityConfig {
            jwt_secret: b"ci-orchestrator-test-jwt-secret-0123".to_vec(),
            master_keys: MasterKeys::new(MasterKey::generate().0, vec![]),
            internal_api_secret: None,
        },
    );
    let (github, app) = if with_github {
        let fake = FakeGitHub::start(4242).await;
        fake.set_fixed_token(Some("ghs_ci".into()));
        fake.add_installation(7, "octo", "User");
        let config = kilocloud_automation::GitHubConfig {
            app_id: 4242,
            private_key: APP_PRIVATE_KEY_PEM.into(),
            webhook_secrets: vec!["s".into()],
            api_url: fake.base_url.clone(),
            ..kilocloud_automation::GitHubConfig::default()
        };
        let app = GitHubApp::new(&config, &sub, &identity).unwrap();
        (Some(fake), app)
    } else {
        (None, None)
    };
    let ci = Ci::new(
        &sub,
        identity,
        app,
        CiConfig {
            recovery_window_ms: RECOVERY_MS,
            ..CiConfig::default()
        },
    );
    sub.start().await.unwrap();
    ci.start();
    Env {
        _store: store,
        sub,
        ci,
        clock,
        owner: Owner::User(Uuid::new_v4()),
        github,
    }
}

fn workflow(yaml: &str) -> LockWorkflow {
    compile(&[WorkflowSource {
        file: ".kici/workflows/w.yml".into(),
        text: yaml.into(),
    }])
    .unwrap()
    .workflows
    .remove(0)
}

fn source(delivery: &str) -> RunSource {
    RunSource {
        repo: "octo/app".into(),
        clone_url: "https://git.invalid/octo/app.git".into(),
        git_ref: "refs/heads/main".into(),
        sha: "0123456789abcdef0123456789abcdef01234567".into(),
        event: "push".into(),
        delivery: delivery.into(),
        installation_id: None,
        rerun_of: None,
    }
}

impl Env {
    async fn start(&self, yaml: &str, delivery: &str) -> String {
        self.ci
            .start_run(self.owner, &workflow(yaml), &source(delivery), json!([]))
            .await
            .unwrap()
            .id
    }

    async fn agent(&self, id: &str, labels: &[&str], in_flight: Vec<JobRef>) -> AgentHandle {
        let (handle, ack) = self
            .ci
            .register(
                self.owner,
                FromAgent::Register {
                    agent_id: id.into(),
                    labels: labels.iter().map(|l| l.to_string()).collect(),
                    max_concurrency: 1,
                    in_flight_jobs: in_flight,
                    hostname: "test".into(),
                    version: "0".into(),
                    protocol_version: 1,
                },
            )
            .await
            .unwrap();
        assert!(matches!(ack, ToAgent::RegisterAck { .. }));
        handle
    }

    /// The next message for `agent`: waits for its wake-up (a guard of 20 s against hangs).
    async fn next(&self, agent: &AgentHandle) -> ToAgent {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut work = self.ci.take(agent).await.unwrap();
            if !work.is_empty() {
                assert_eq!(work.len(), 1, "one job at a time: {work:?}");
                return work.remove(0);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "no work came for {}", agent.agent_id);
            let _ = tokio::time::timeout(left, agent.woken()).await;
        }
    }

    /// The next dispatch for `agent`: (job, its name).
    async fn dispatch(&self, agent: &AgentHandle) -> (JobRef, String) {
        match self.next(agent).await {
            ToAgent::JobDispatch {
                job, job_config, ..
            } => (job, job_config.name),
            other => panic!("expected a dispatch, got {other:?}"),
        }
    }

    /// Nothing is sent to `agent` now.
    async fn idle(&self, agent: &AgentHandle) {
        assert!(self.ci.take(agent).await.unwrap().is_empty());
    }

    async fn report(&self, agent: &AgentHandle, job: &JobRef, state: ReportedJobState) {
        self.ci
            .agent_message(
                agent,
                FromAgent::JobStatus {
                    job: job.clone(),
                    state,
                    error: (state == ReportedJobState::Failed).then(|| "exit 1".into()),
                },
            )
            .await
            .unwrap();
    }

    async fn run_and_finish(
        &self,
        agent: &AgentHandle,
        state: ReportedJobState,
    ) -> (JobRef, String) {
        let (job, name) = self.dispatch(agent).await;
        self.report(agent, &job, ReportedJobState::Running).await;
        self.report(agent, &job, state).await;
        (job, name)
    }

    async fn jobs(&self, run: &str) -> Vec<JobRecord> {
        self.ci.run(self.owner, run).await.unwrap().1
    }

    async fn status(&self, run: &str) -> String {
        let (run, _) = self.ci.run(self.owner, run).await.unwrap();
        serde_json::to_value(run.status)
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Polls until `check` holds (a guard of 20 s against hangs, not a timing assertion).
    async fn eventually<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "gave up waiting: {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn status_of(jobs: &[JobRecord], name: &str) -> JobStatus {
    jobs.iter()
        .find(|j| j.name == name)
        .unwrap_or_else(|| panic!("no job {name}"))
        .status
}

const DAG: &str = r#"
name: dag
jobs:
  build: { runsOn: linux, run: make }
  test:
    runsOn: linux
    needs: [build]
    matrix: [x, y]
    run: make test
  deploy: { runsOn: linux, needs: [test], run: make deploy }
  report: { runsOn: linux, needs: [{ name: test, when: always }], run: make report }
  cleanup: { runsOn: linux, needs: [deploy], run: make clean }
"#;

/// Downstream jobs wait for every matrix child; a failure skips `on-success` dependents at
/// once (cascading) and runs `always` ones after every child ended; the run fails.
async fn needs_gate_and_skip_cascades(pg: bool) {
    let e = env(pg, false).await;
    let agent = e.agent("a", &["linux"], vec![]).await;
    let run = e.start(DAG, "d1").await;
    let (_, name) = e.run_and_finish(&agent, ReportedJobState::Success).await;
    assert_eq!(name, "build");
    let (_, first) = e.run_and_finish(&agent, ReportedJobState::Failed).await;
    assert_eq!(first, "test (x)");
    // A failed upstream skips its on-success dependents at once (§8: failure propagation),
    // while `always` still waits for test (y).
    let jobs = e.jobs(&run).await;
    assert_eq!(status_of(&jobs, "deploy"), JobStatus::Skipped);
    assert_eq!(status_of(&jobs, "report"), JobStatus::Pending);
    let (_, second) = e.run_and_finish(&agent, ReportedJobState::Success).await;
    assert_eq!(second, "test (y)");
    let (_, last) = e.run_and_finish(&agent, ReportedJobState::Success).await;
    assert_eq!(last, "report", "always runs after a failure");
    let jobs = e.jobs(&run).await;
    assert_eq!(status_of(&jobs, "deploy"), JobStatus::Skipped);
    assert_eq!(
        status_of(&jobs, "cleanup"),
        JobStatus::Skipped,
        "the skip cascades"
    );
    let deploy = jobs.iter().find(|j| j.name == "deploy").unwrap();
    assert!(
        deploy.error.as_deref().unwrap().contains("test (x)"),
        "{:?}",
        deploy.error
    );
    assert_eq!(e.status(&run).await, "failed");
    e.idle(&agent).await;
    // Starting the same delivery again creates nothing new.
    assert_eq!(e.start(DAG, "d1").await, run);
    assert_eq!(e.ci.runs(e.owner, 10, "").await.unwrap().len(), 1);
}

/// Labels decide who runs a job; `deterministic` takes the lowest free agent id; a job no
/// agent can run says so; a busy match says it waits for a free agent; FIFO across runs.
async fn labels_pick_fifo_and_held_jobs(pg: bool) {
    let e = env(pg, false).await;
    let b = e.agent("b-agent", &["linux"], vec![]).await;
    let a = e.agent("a-agent", &["linux", "gpu"], vec![]).await;
    let one = "name: one\njobs:\n  j: { runsOn: linux, run: t }\n";
    let r1 = e.start(one, "f1").await;
    let (j1, _) = e.dispatch(&a).await;
    assert_eq!(j1.run_id, r1, "the lowest free agent id");
    let nogpu =
        "name: nogpu\njobs:\n  j: { runsOn: { labels: [linux], exclude: [gpu] }, run: t }\n";
    let r2 = e.start(nogpu, "f2").await;
    let (j2, _) = e.dispatch(&b).await;
    assert_eq!(j2.run_id, r2);
    // Both busy: two more runs wait, in order.
    let r3 = e.start(one, "f3").await;
    let r4 = e.start(one, "f4").await;
    let arm = "name: arm\njobs:\n  j: { runsOn: [linux, arm64], run: t }\n";
    let r5 = e.start(arm, "f5").await;
    e.eventually("the arm job says why it waits", || async {
        e.jobs(&r5).await[0]
            .waiting_reason
            .as_deref()
            .is_some_and(|r| r.contains("no registered agent") && r.contains("arm64"))
    })
    .await;
    e.eventually("the queued job waits for a free agent", || async {
        e.jobs(&r3).await[0].waiting_reason.as_deref()
            == Some("waiting for a free agent with its labels")
    })
    .await;
    e.report(&b, &j2, ReportedJobState::Running).await;
    e.report(&b, &j2, ReportedJobState::Success).await;
    let (j3, _) = e.dispatch(&b).await;
    assert_eq!(j3.run_id, r3, "FIFO");
    e.report(&a, &j1, ReportedJobState::Running).await;
    e.report(&a, &j1, ReportedJobState::Success).await;
    let (j4, _) = e.dispatch(&a).await;
    assert_eq!(j4.run_id, r4, "FIFO");
    // An agent that has arm64 registers: the held job goes to it.
    let arm_agent = e.agent("arm", &["linux", "arm64"], vec![]).await;
    let (j5, _) = e.dispatch(&arm_agent).await;
    assert_eq!(j5.run_id, r5);
    let (agents, queue) = e.ci.pool(e.owner).await.unwrap();
    assert_eq!(agents.len(), 3);
    assert!(queue.is_empty(), "{queue:?}");
}

/// Cancel: waiting jobs end cancelled at once; a running job is told to stop and ends
/// cancelled when its agent says so; a second cancel forces; an ended run refuses.
async fn cancel_queued_running_and_forced(pg: bool) {
    let e = env(pg, false).await;
    let agent = e.agent("a", &["linux"], vec![]).await;
    let two = "name: two\njobs:\n  first: { runsOn: linux, run: t }\n  second: { runsOn: linux, needs: [first], run: t }\n";
    let run = e.start(two, "c1").await;
    let (job, _) = e.dispatch(&agent).await;
    e.report(&agent, &job, ReportedJobState::Running).await;
    e.ci.cancel(e.owner, &run, "cancelled by a user")
        .await
        .unwrap();
    let jobs = e.jobs(&run).await;
    assert_eq!(status_of(&jobs, "first"), JobStatus::Cancelling);
    assert_eq!(
        status_of(&jobs, "second"),
        JobStatus::Cancelled,
        "pending jobs cancel at once"
    );
    match e.next(&agent).await {
        ToAgent::JobCancel { job: j, force, .. } => {
            assert_eq!(j, job);
            assert!(!force);
        }
        other => panic!("expected a cancel, got {other:?}"),
    }
    e.report(&agent, &job, ReportedJobState::Cancelled).await;
    assert_eq!(e.status(&run).await, "cancelled");
    let again = e.ci.cancel(e.owner, &run, "again").await.unwrap_err();
    assert!(again.to_string().contains("already ended"), "{again}");

    // A queued job never dispatched: cancelled, and the agent is never sent it.
    let busy = e
        .start("name: busy\njobs:\n  j: { runsOn: linux, run: t }\n", "c2")
        .await;
    let (held, _) = e.dispatch(&agent).await;
    let queued = e
        .start("name: q\njobs:\n  j: { runsOn: linux, run: t }\n", "c3")
        .await;
    e.ci.cancel(e.owner, &queued, "no").await.unwrap();
    assert_eq!(e.status(&queued).await, "cancelled");
    // Forced: a second cancel ends the running job without waiting for the agent.
    e.report(&agent, &held, ReportedJobState::Running).await;
    e.ci.cancel(e.owner, &busy, "stop").await.unwrap();
    e.ci.cancel(e.owner, &busy, "stop now").await.unwrap();
    assert_eq!(status_of(&e.jobs(&busy).await, "j"), JobStatus::Cancelled);
    assert_eq!(e.status(&busy).await, "cancelled");
    // Another owner sees none of it.
    let stranger = Owner::User(Uuid::new_v4());
    assert!(e.ci.run(stranger, &busy).await.is_err());
    assert!(e.ci.cancel(stranger, &busy, "x").await.is_err());
}

/// A disconnected agent's running job recovers; coming back with it resumes it; coming
/// back without it fails it; not coming back fails it when the window ends.
async fn recovery_window(pg: bool) {
    let e = env(pg, false).await;
    let one = "name: one\njobs:\n  j: { runsOn: linux, run: t }\n";
    let agent = e.agent("a", &["linux"], vec![]).await;
    let run = e.start(one, "r1").await;
    let (job, _) = e.dispatch(&agent).await;
    e.report(&agent, &job, ReportedJobState::Running).await;
    e.ci.disconnect(&agent).await.unwrap();
    assert_eq!(e.jobs(&run).await[0].status, JobStatus::Recovering);
    let agent = e.agent("a", &["linux"], vec![job.clone()]).await;
    assert_eq!(
        e.jobs(&run).await[0].status,
        JobStatus::Running,
        "reclaimed"
    );
    e.report(&agent, &job, ReportedJobState::Success).await;
    assert_eq!(e.status(&run).await, "success");

    // Restarted without the job: failed at once.
    let run = e.start(one, "r2").await;
    let (job, _) = e.dispatch(&agent).await;
    e.report(&agent, &job, ReportedJobState::Running).await;
    e.ci.disconnect(&agent).await.unwrap();
    let agent = e.agent("a", &["linux"], vec![]).await;
    let j = &e.jobs(&run).await[0];
    assert_eq!(j.status, JobStatus::Failed);
    assert!(
        j.error
            .as_deref()
            .unwrap()
            .contains("restarted without the job")
    );

    // Never back: failed when the window ends (the clock is the substrate's).
    let run = e.start(one, "r3").await;
    let (job, _) = e.dispatch(&agent).await;
    e.report(&agent, &job, ReportedJobState::Running).await;
    e.ci.disconnect(&agent).await.unwrap();
    e.clock.advance(RECOVERY_MS as i64 - 1);
    assert_eq!(e.jobs(&run).await[0].status, JobStatus::Recovering);
    e.clock.advance(2);
    e.eventually("the job fails after the window", || async {
        e.jobs(&run).await[0].status == JobStatus::Failed
    })
    .await;
    let j = &e.jobs(&run).await[0];
    assert!(
        j.error.as_deref().unwrap().contains("recovery window"),
        "{:?}",
        j.error
    );
    assert_eq!(e.status(&run).await, "failed");
    // A late report from the old connection changes nothing.
    e.report(&agent, &job, ReportedJobState::Success).await;
    assert_eq!(e.jobs(&run).await[0].status, JobStatus::Failed);
    let _ = &e.sub;
}

/// A refused dispatch goes back to the queue's front and to the next free agent.
async fn rejected_dispatch_is_requeued(pg: bool) {
    let e = env(pg, false).await;
    let busy = e.agent("a", &["linux"], vec![]).await;
    let run = e
        .start("name: one\njobs:\n  j: { runsOn: linux, run: t }\n", "x1")
        .await;
    let (job, _) = e.dispatch(&busy).await;
    e.ci.agent_message(
        &busy,
        FromAgent::JobReject {
            job: job.clone(),
            reason: "draining".into(),
        },
    )
    .await
    .unwrap();
    let other = e.agent("b", &["linux"], vec![]).await;
    let (again, _) = e.dispatch(&other).await;
    assert_eq!(again, job);
    e.report(&other, &again, ReportedJobState::Running).await;
    e.report(&other, &again, ReportedJobState::Success).await;
    let j = &e.jobs(&run).await[0];
    assert_eq!(
        (j.status, j.agent_id.as_deref()),
        (JobStatus::Success, Some("b"))
    );
}

fn push_delivery(e: &Env, delivery: &str, sha: &str) -> InboundDelivery {
    InboundDelivery {
        delivery: delivery.into(),
        event: "push".into(),
        owner: e.owner,
        user: Uuid::new_v4(),
        installation_id: 7,
        payload: json!({
            "ref": "refs/heads/main", "after": sha, "before": "0".repeat(40),
            "repository": {"full_name": "octo/app", "clone_url": "https://git.invalid/octo/app.git"},
            "installation": {"id": 7}, "sender": {"id": 1}, "commits": [],
        }),
    }
}

/// The pipeline against the fake GitHub: the lock read once per ref (cached), a missing lock
/// starts nothing, a corrupt one is a failed run and is read again next time.
async fn pipeline_reads_and_caches_the_lock(pg: bool) {
    let e = env(pg, true).await;
    let github = e.github.as_ref().unwrap();
    let lock = compile(&[WorkflowSource {
        file: ".kici/workflows/ci.yml".into(),
        text: "name: ci\non: [{push: {branches: [main]}}]\njobs:\n  j: { runsOn: linux, run: t }\n"
            .into(),
    }])
    .unwrap();
    let sha = "a".repeat(40);
    github.add_file(
        "octo",
        "app",
        &sha,
        ".kici/kici.lock.json",
        &to_lock_json(&lock),
    );
    let out =
        e.ci.process_delivery(&push_delivery(&e, "p1", &sha))
            .await
            .unwrap();
    assert!(out.starts_with("runs "), "{out}");
    let out =
        e.ci.process_delivery(&push_delivery(&e, "p2", &sha))
            .await
            .unwrap();
    assert!(out.starts_with("runs "), "{out}");
    assert_eq!(
        github.content_fetches(),
        1,
        "the second read came from the cache"
    );
    let runs = e.ci.runs(e.owner, 10, "").await.unwrap();
    assert_eq!(runs.len(), 2);
    assert!(
        runs.iter()
            .all(|(_, r)| r.sha == sha && r.workflow == "ci" && r.git_ref == "refs/heads/main")
    );
    // The same delivery again (a queue redelivery) creates nothing.
    e.ci.process_delivery(&push_delivery(&e, "p1", &sha))
        .await
        .unwrap();
    assert_eq!(e.ci.runs(e.owner, 10, "").await.unwrap().len(), 2);

    let missing = "b".repeat(40);
    let out =
        e.ci.process_delivery(&push_delivery(&e, "p3", &missing))
            .await
            .unwrap();
    assert!(out.starts_with("lockfile_missing"), "{out}");

    let bad = "c".repeat(40);
    github.add_file("octo", "app", &bad, ".kici/kici.lock.json", "{\"schemaVersion\": 29, \"workflows\": [{\"name\": \"w\", \"jobs\": [{\"_type\": \"static\", \"name\": \"j\", \"runsOn\": [\"linux\"], \"steps\": []}]}]}");
    let before = github.content_fetches();
    for delivery in ["p4", "p5"] {
        let out =
            e.ci.process_delivery(&push_delivery(&e, delivery, &bad))
                .await
                .unwrap();
        assert!(out.starts_with("lockfile_corrupt"), "{out}");
    }
    assert_eq!(
        github.content_fetches(),
        before + 2,
        "a corrupt lock is never cached"
    );
    let corrupt: Vec<_> =
        e.ci.runs(e.owner, 10, "")
            .await
            .unwrap()
            .into_iter()
            .filter(|(_, r)| r.sha == bad)
            .collect();
    assert_eq!(corrupt.len(), 2);
    let reason = corrupt[0].1.failure_reason.clone().unwrap();
    assert!(
        reason.starts_with("lockfile_corrupt") && reason.contains("LabelMatcher"),
        "{reason}"
    );
}

/// Workflow concurrency groups: without cancelInProgress a newer run waits for the older
/// one; with it the older run is cancelled as superseded. Job-level groups let one job of
/// the group run at a time across runs and agents.
async fn concurrency_groups(pg: bool) {
    let e = env(pg, false).await;
    let a = e.agent("a", &["linux"], vec![]).await;
    let b = e.agent("b", &["linux"], vec![]).await;
    let queue = "name: deploy\nconcurrency: { group: \"deploy-${branch}\", cancelInProgress: false }\njobs:\n  j: { runsOn: linux, run: t }\n";
    let first = e.start(queue, "g1").await;
    let (j1, _) = e.dispatch(&a).await;
    assert_eq!(j1.run_id, first);
    let second = e.start(queue, "g2").await;
    let held = e.jobs(&second).await;
    assert_eq!(held[0].status, JobStatus::Pending);
    assert!(
        held[0]
            .waiting_reason
            .as_deref()
            .unwrap()
            .contains("deploy-main"),
        "{held:?}"
    );
    e.idle(&b).await;
    e.report(&a, &j1, ReportedJobState::Running).await;
    e.report(&a, &j1, ReportedJobState::Success).await;
    let (j2, _) = e.dispatch(&a).await;
    assert_eq!(j2.run_id, second, "released when the first run ended");
    e.report(&a, &j2, ReportedJobState::Running).await;
    e.report(&a, &j2, ReportedJobState::Success).await;

    let cancel = "name: preview\nconcurrency: { group: \"preview-${branch}\" }\njobs:\n  j: { runsOn: linux, run: t }\n";
    let old = e.start(cancel, "g3").await;
    let (jo, _) = e.dispatch(&a).await;
    assert_eq!(jo.run_id, old);
    e.report(&a, &jo, ReportedJobState::Running).await;
    let new = e.start(cancel, "g4").await;
    let old_jobs = e.jobs(&old).await;
    assert_eq!(old_jobs[0].status, JobStatus::Cancelling);
    assert!(
        old_jobs[0]
            .error
            .as_deref()
            .unwrap()
            .contains(&format!("superseded by run {new}"))
    );
    let (jn, _) = e.dispatch(&b).await;
    assert_eq!(jn.run_id, new, "the newer run starts at once");
    assert!(matches!(e.next(&a).await, ToAgent::JobCancel { .. }));
    e.report(&a, &jo, ReportedJobState::Cancelled).await;
    assert_eq!(e.status(&old).await, "cancelled");
    e.report(&b, &jn, ReportedJobState::Running).await;
    e.report(&b, &jn, ReportedJobState::Success).await;

    let db = "name: migrate\njobs:\n  j: { runsOn: linux, concurrencyGroup: db, run: t }\n";
    let m1 = e.start(db, "g5").await;
    let m2 = e.start(db, "g6").await;
    let (jm, _) = e.dispatch(&a).await;
    assert_eq!(jm.run_id, m1);
    e.eventually("the second migration waits for the group", || async {
        e.jobs(&m2).await[0].waiting_reason.as_deref() == Some("waiting for concurrency group db")
    })
    .await;
    e.idle(&b).await;
    e.report(&a, &jm, ReportedJobState::Running).await;
    e.report(&a, &jm, ReportedJobState::Success).await;
    let (jm2, _) = e.dispatch(&a).await;
    assert_eq!(jm2.run_id, m2);
}

/// A running job whose agent goes silent (a hung agent, its socket still open) is
/// `timed_out_stale` after the threshold: the run fails and the agent is told to kill it.
async fn silent_jobs_time_out_stale(pg: bool) {
    let e = env(pg, false).await;
    let agent = e.agent("a", &["linux"], vec![]).await;
    let run = e
        .start("name: one\njobs:\n  j: { runsOn: linux, run: t }\n", "s1")
        .await;
    let (job, _) = e.dispatch(&agent).await;
    e.report(&agent, &job, ReportedJobState::Running).await;
    e.clock.advance(60_000);
    e.ci.agent_message(&agent, FromAgent::JobHeartbeat { job: job.clone() })
        .await
        .unwrap();
    e.clock.advance(119_000);
    assert_eq!(
        e.jobs(&run).await[0].status,
        JobStatus::Running,
        "the heartbeat counted"
    );
    e.clock.advance(2_000);
    e.eventually("the job times out stale", || async {
        e.jobs(&run).await[0].status == JobStatus::TimedOutStale
    })
    .await;
    assert_eq!(e.status(&run).await, "failed");
    match e.next(&agent).await {
        ToAgent::JobCancel { job: j, force, .. } => assert!(j == job && force),
        other => panic!("expected a forced cancel, got {other:?}"),
    }
    // Its slot is free again.
    let next = e
        .start("name: two\njobs:\n  j: { runsOn: linux, run: t }\n", "s2")
        .await;
    let (j2, _) = e.dispatch(&agent).await;
    assert_eq!(j2.run_id, next);
}

/// A rerun is a new run of the stored workflow on the same commit; the workflow deadline
/// cancels a run that outlives it and says why.
async fn rerun_and_workflow_timeout(pg: bool) {
    let e = env(pg, false).await;
    let agent = e.agent("a", &["linux"], vec![]).await;
    let timed = "name: timed\ntimeout: 5000\njobs:\n  j: { runsOn: linux, run: t }\n";
    let run = e.start(timed, "t1").await;
    let refused = e.ci.rerun(e.owner, &run).await.unwrap_err();
    assert!(refused.to_string().contains("has not ended"), "{refused}");
    let (job, _) = e.dispatch(&agent).await;
    e.report(&agent, &job, ReportedJobState::Running).await;
    e.clock.advance(5_001);
    e.eventually("the deadline cancels the run", || async {
        e.jobs(&run).await[0].status == JobStatus::Cancelling
    })
    .await;
    assert!(matches!(e.next(&agent).await, ToAgent::JobCancel { .. }));
    e.report(&agent, &job, ReportedJobState::Cancelled).await;
    let (record, _) = e.ci.run(e.owner, &run).await.unwrap();
    assert_eq!(record.failure_reason.as_deref(), Some("workflow_timeout"));
    assert_eq!(e.status(&run).await, "cancelled");
    let again = e.ci.rerun(e.owner, &run).await.unwrap();
    assert_ne!(again.id, run);
    assert_eq!(
        (again.rerun_of.as_deref(), again.sha.as_str()),
        (Some(run.as_str()), record.sha.as_str())
    );
    let (j2, name) = e.dispatch(&agent).await;
    assert_eq!(
        (j2.run_id.as_str(), name.as_str()),
        (again.id.as_str(), "j")
    );
}

/// Generic webhook sources: a signed delivery runs the workflows whose genericWebhook trigger
/// names the source (and event), at the branch's tip; a bad signature or key is refused with
/// nothing stored; a repeated idempotency key is a duplicate; limits hold.
async fn generic_webhooks(pg: bool) {
    use kilocloud_ci::CiError;
    use kilocloud_ci::sources::SourceSpec;
    let e = env(pg, true).await;
    let github = e.github.as_ref().unwrap();
    let sha = "d".repeat(40);
    github.add_branch("octo", "app", "main", &sha);
    let lock = compile(&[WorkflowSource {
        file: ".kici/workflows/deploy.yml".into(),
        text: "name: deploy\non: [{genericWebhook: {source: releases, events: [published]}}]\njobs:\n  j: { runsOn: linux, run: t }\n".into(),
    }])
    .unwrap();
    github.add_file(
        "octo",
        "app",
        &sha,
        ".kici/kici.lock.json",
        &to_lock_json(&lock),
    );
    let spec = |name: &str, method: Option<&str>| SourceSpec {
        name: name.into(),
        repo: "octo/app".into(),
        branch: None,
        clone_url: None,
        method: method.map(str::to_owned),
        header: None,
        dedup_window_seconds: None,
        max_payload_bytes: Some(1024),
    };
    let (source, secret) =
        e.ci.create_source(e.owner, 7, spec("releases", None))
            .await
            .unwrap();
    assert_eq!(source.path, format!("/api/ci/webhooks/{}", source.id));
    assert!(
        e.ci.sources(e.owner)
            .await
            .unwrap()
            .iter()
            .any(|s| s.id == source.id)
    );
    let body = br#"{"version": "1.2.3"}"#;
    let signed = kilocloud_automation::github::sign(secret.as_bytes(), body);
    let headers = |sig: Option<String>, key: &str, event: &str| {
        let (key, event) = (key.to_owned(), event.to_owned());
        move |name: &str| match name {
            "x-signature-256" => sig.clone(),
            "x-idempotency-key" => Some(key.clone()),
            "x-event-type" => Some(event.clone()),
            _ => None,
        }
    };
    let bad =
        e.ci.generic_webhook(
            &source.id,
            headers(Some("sha256=00".into()), "k1", "published"),
            body,
        )
        .await
        .unwrap_err();
    assert!(matches!(bad, CiError::Unauthorized(_)), "{bad}");
    assert!(
        e.ci.runs(e.owner, 10, "").await.unwrap().is_empty(),
        "nothing stored"
    );
    let ok =
        e.ci.generic_webhook(
            &source.id,
            headers(Some(signed.clone()), "k1", "published"),
            body,
        )
        .await
        .unwrap();
    assert!(!ok.duplicate && ok.runs.len() == 1, "{ok:?}");
    let (run, _) = e.ci.run(e.owner, &ok.runs[0]).await.unwrap();
    assert_eq!(
        (run.sha.as_str(), run.event.as_str(), run.git_ref.as_str()),
        (sha.as_str(), "generic_webhook", "refs/heads/main")
    );
    let again =
        e.ci.generic_webhook(
            &source.id,
            headers(Some(signed.clone()), "k1", "published"),
            body,
        )
        .await
        .unwrap();
    assert!(again.duplicate && again.runs.is_empty());
    let other =
        e.ci.generic_webhook(
            &source.id,
            headers(Some(signed.clone()), "k2", "drafted"),
            body,
        )
        .await
        .unwrap();
    assert_eq!(other.outcome, "no workflow matched");
    let big = vec![b'x'; 2048];
    let too_large =
        e.ci.generic_webhook(
            &source.id,
            headers(Some(signed.clone()), "k3", "published"),
            &big,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(too_large, CiError::TooLarge { limit: 1024, .. }),
        "{too_large}"
    );
    assert!(matches!(
        e.ci.generic_webhook("nope", headers(None, "k", ""), body)
            .await
            .unwrap_err(),
        CiError::NotFound(_)
    ));
    // An api-key source.
    let (keyed, key) =
        e.ci.create_source(e.owner, 7, spec("releases", Some("api-key")))
            .await
            .unwrap();
    let bearer = |value: String| {
        move |name: &str| match name {
            "authorization" => Some(value.clone()),
            "x-event-type" => Some("published".to_owned()),
            _ => None,
        }
    };
    let wrong =
        e.ci.generic_webhook(&keyed.id, bearer("Bearer kws_wrong".into()), body)
            .await;
    assert!(matches!(wrong, Err(CiError::Unauthorized(_))));
    let right =
        e.ci.generic_webhook(&keyed.id, bearer(format!("Bearer {key}")), body)
            .await
            .unwrap();
    assert_eq!(right.runs.len(), 1, "{right:?}");
    let invalid =
        e.ci.create_source(e.owner, 7, spec("Bad Name", None))
            .await
            .unwrap_err();
    assert!(matches!(invalid, CiError::Invalid(_)));
}

/// A pull request's changed files are read through the API only when a trigger filters on
/// paths, and decide the match.
async fn pull_request_paths(pg: bool) {
    use kilocloud_test_support::fake_github::FakePull;
    let e = env(pg, true).await;
    let github = e.github.as_ref().unwrap();
    let head = "e".repeat(40);
    let lock = compile(&[WorkflowSource {
        file: ".kici/workflows/docs.yml".into(),
        text: "name: docs\non: [{pr: {paths: [\"docs/**\"]}}]\njobs:\n  j: { runsOn: linux, run: t }\n".into(),
    }])
    .unwrap();
    github.add_file(
        "octo",
        "app",
        &head,
        ".kici/kici.lock.json",
        &to_lock_json(&lock),
    );
    let diff = |path: &str| {
        format!("diff --git a/{path} b/{path}\n--- a/{path}\n+++ b/{path}\n@@ -1 +1 @@\n-a\n+b\n")
    };
    for (number, path) in [(1, "docs/guide.md"), (2, "src/lib.rs")] {
        github.add_pull(
            "octo",
            "app",
            FakePull {
                number,
                head_sha: head.clone(),
                head_ref: format!("b{number}"),
                base_ref: "main".into(),
                diff: diff(path),
                ..FakePull::default()
            },
        );
    }
    let delivery = |number: u64| InboundDelivery {
        delivery: format!("pr-{number}"),
        event: "pull_request".into(),
        owner: e.owner,
        user: Uuid::new_v4(),
        installation_id: 7,
        payload: json!({
            "action": "opened", "number": number,
            "pull_request": {"number": number, "head": {"sha": head, "ref": format!("b{number}"),
                "repo": {"full_name": "octo/app"}}, "base": {"ref": "main", "repo": {"full_name": "octo/app"}}},
            "repository": {"full_name": "octo/app"}, "installation": {"id": 7}, "sender": {"id": 1},
        }),
    };
    let docs = e.ci.process_delivery(&delivery(1)).await.unwrap();
    assert!(docs.starts_with("runs "), "{docs}");
    let code = e.ci.process_delivery(&delivery(2)).await.unwrap();
    assert_eq!(code, "no workflow matched");
    let runs = e.ci.runs(e.owner, 10, "").await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].1.git_ref, "refs/pull/1/head");
}

on_both_backends!(
    pull_request_paths,
    generic_webhooks,
    rerun_and_workflow_timeout,
    concurrency_groups,
    silent_jobs_time_out_stale,
    needs_gate_and_skip_cascades,
    labels_pick_fifo_and_held_jobs,
    cancel_queued_running_and_forced,
    recovery_window,
    rejected_dispatch_is_requeued,
    pipeline_reads_and_caches_the_lock,
);
