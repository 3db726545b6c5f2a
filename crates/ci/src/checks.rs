//! Check runs (reference `kici.md` §7.3 step 11, §20): one GitHub check run per job, named
//! `kici/<workflow>/job/<job>`, that follows the job: `queued` while it waits, `in_progress`
//! once it runs, then `completed` with the conclusion of its status (`timed_out_stale` is
//! `timed_out`). The run actor sends a [`crate::CheckMessage`] whenever a job's check status
//! changes, before its call commits; the consumer reads the committed job without a call
//! (never queueing behind the run's agents) and, when the version it was sent for is not
//! committed yet, waits for that call with a barrier call on the run, then reads again (a
//! call that rolled back leaves nothing to post). It hands the job to the `kici_check` actor of that job, which creates
//! the check run once and then updates it, never going back to an older job version. GitHub
//! failures retry through the queue.

use kilocloud_automation::GitHubApp;
use kilocloud_kici::JobStatus;
use kilocloud_substrate::{Actor, ActorContext, Consumer, Delivery, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::run::{JobRecord, RUN_ACTOR, RunCall, RunRecord, status_name};
use crate::{CheckMessage, Ci};

/// Actor type of a job's check run (key `<owner>/<run>/<job>`).
pub const CHECK_ACTOR: &str = "kici_check";

/// The GitHub check-run status of a job status: `queued`, `in_progress` or `completed`.
pub fn check_status(s: JobStatus) -> &'static str {
    match s {
        JobStatus::Pending | JobStatus::Queued | JobStatus::Recovering => "queued",
        JobStatus::Running | JobStatus::Cancelling => "in_progress",
        _ => "completed",
    }
}

/// The conclusion of a terminal job status.
pub fn conclusion(s: JobStatus) -> Option<&'static str> {
    Some(match s {
        JobStatus::Success => "success",
        JobStatus::Failed => "failure",
        JobStatus::Cancelled => "cancelled",
        JobStatus::Skipped => "skipped",
        JobStatus::TimedOutStale => "timed_out",
        JobStatus::DriftDropped => "neutral",
        _ => return None,
    })
}

/// What a check run is synced to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckSync {
    repo: String,
    installation_id: u64,
    version: u64,
    body: Value,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CheckState {
    id: Option<u64>,
    version: u64,
    status: String,
}

/// The check-run actor of one job.
pub struct CheckActor {
    pub(crate) github: Option<GitHubApp>,
}

impl Actor for CheckActor {
    const TYPE: &'static str = CHECK_ACTOR;
    const SUSPENDS: bool = true;
    type Call = CheckSync;
    type Reply = ();

    async fn call(&self, ctx: &mut ActorContext, sync: CheckSync) -> Result<()> {
        let Some(github) = &self.github else {
            return Ok(());
        };
        let mut state: CheckState = ctx.get("state").await?.unwrap_or_default();
        let status = sync.body["status"].as_str().unwrap_or_default().to_owned();
        if sync.version <= state.version || (state.id.is_some() && status == state.status) {
            return Ok(());
        }
        let (github, repo) = (github.clone(), sync.repo.clone());
        let (id, body, installation) = (state.id, sync.body.clone(), sync.installation_id);
        let created = ctx
            .suspend_while(async move {
                let token = github.installation_token(installation).await?;
                match id {
                    Some(id) => github
                        .update_check_run(&token, &repo, id, &body)
                        .await
                        .map(|()| id),
                    None => github.create_check_run(&token, &repo, &body).await,
                }
            })
            .await?
            .map_err(|e| kilocloud_substrate::Error::Handler(format!("check run: {e}")))?;
        state = CheckState {
            id: Some(created),
            version: sync.version,
            status,
        };
        ctx.put("state", &state)
    }
}

/// Handles [`crate::CHECKS_QUEUE`].
pub(crate) struct CheckConsumer(pub(crate) Ci);

#[async_trait::async_trait]
impl Consumer for CheckConsumer {
    async fn handle(&self, delivery: &Delivery) -> Result<()> {
        let msg: CheckMessage = delivery.body()?;
        let ci = &self.0;
        if ci.github().is_none() {
            return Ok(());
        }
        let key = format!("{}/{}", msg.owner, msg.job.run_id);
        let sub = ci.sub();
        let read = || async {
            let job: Option<JobRecord> = sub
                .actor_read(RUN_ACTOR, &key, &format!("job/{}", msg.job.job_id))
                .await?;
            let run: Option<RunRecord> = sub.actor_read(RUN_ACTOR, &key, "run").await?;
            Ok::<_, kilocloud_substrate::Error>(run.zip(job.filter(|j| j.version >= msg.version)))
        };
        let found = match read().await? {
            Some(found) => Some(found),
            None => {
                // Sent before its call committed: wait for the call (a barrier on the run's
                // actor), then read again; still older means the call rolled back.
                sub.actors()
                    .call::<crate::run::RunActor>(&key, RunCall::Barrier)
                    .await?;
                read().await?
            }
        };
        let Some((run, job)) = found else {
            tracing::debug!(job = %msg.job.job_id, "check update of a call that did not commit");
            return Ok(());
        };
        let actors = sub.actors();
        let Some(installation_id) = run.installation_id else {
            return Ok(());
        };
        let sync = CheckSync {
            repo: run.repo.clone(),
            installation_id,
            version: msg.version,
            body: body(ci, &run, &job, msg.status),
        };
        actors
            .call::<CheckActor>(&format!("{key}/{}", job.id), sync)
            .await
    }
}

/// RFC 3339 (UTC, seconds) of ms since epoch, as the checks API takes it.
fn rfc3339(ms: i64) -> Value {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .into()
}

/// The check-run request body of a job as it was when its status was `status`.
fn body(ci: &Ci, run: &RunRecord, job: &JobRecord, status: JobStatus) -> Value {
    let shown = status;
    let status = check_status(shown);
    let mut body = json!({
        "name": format!("kici/{}/job/{}", run.workflow, job.name),
        "head_sha": run.sha,
        "external_id": job.id,
        "status": status,
    });
    if !ci.config().public_url.is_empty() {
        body["details_url"] = format!(
            "{}/api/ci/runs/{}",
            ci.config().public_url.trim_end_matches('/'),
            run.id
        )
        .into();
    }
    if let Some(at) = job.started_at.filter(|_| status != "queued") {
        body["started_at"] = rfc3339(at);
    }
    let summary = match (&job.error, &job.waiting_reason) {
        (Some(e), _) => e.clone(),
        (None, Some(w)) => w.clone(),
        _ => format!("{} step(s) reported", job.steps.len()),
    };
    body["output"] = json!({
        "title": format!("{} {}", job.name, status_name(shown)),
        "summary": summary,
    });
    if let Some(c) = conclusion(shown) {
        body["conclusion"] = c.into();
        if let Some(at) = job.completed_at {
            body["completed_at"] = rfc3339(at);
        }
    }
    body
}
