//! The `kici_run` actor, one per run (key `<owner>/<run id>`): the run, its jobs and steps,
//! the `needs` gating and the logs. It is the single writer of a run's state, so a job's
//! transitions (the pure [`kilocloud_kici::transition`]) and the run's aggregation never
//! race. What must happen next leaves the call as queue messages sent before it commits (an
//! outbox): `kici-dispatch` for each job that became ready, `kici-checks` for each job whose
//! check run must follow. Their consumers read through calls on this actor, so they see the
//! committed state or nothing.
//!
//! Storage: `run` ([`RunRecord`], with a [`JobSummary`] per job), `job/<id>` ([`JobRecord`]),
//! `log/<job id>/<seq, 10 digits>` ([`LogChunk`]), `logseq/<job id>` (the next seq). The
//! alarm is the workflow deadline (`timeout`, §11).

use std::collections::{BTreeMap, HashSet};

use kilocloud_kici::lock::LabelMatcher;
use kilocloud_kici::{JobEvent, JobState, JobStatus, RunStatus, aggregate, transition};
use kilocloud_substrate::{Actor, ActorContext, AlarmInfo, Result, Substrate, UnixMs};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::checks::check_status;
use crate::protocol::{FromAgent, JobRef, JobSpec, ReportedJobState, StepState};
use crate::{CHECKS_QUEUE, DISPATCH_QUEUE, DispatchMessage};

/// Actor type of a run.
pub const RUN_ACTOR: &str = "kici_run";

/// A run: one workflow matched by one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    /// UUID v7.
    pub id: String,
    /// `user:<id>` or `org:<id>`.
    pub owner: String,
    /// The workflow's name.
    pub workflow: String,
    /// `owner/name` on the provider.
    pub repo: String,
    /// `github`.
    pub provider: String,
    /// `refs/heads/main`, `refs/pull/7/head`, `refs/tags/v1`.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit.
    pub sha: String,
    /// The normalised event type (`push`, `pull_request`, …).
    pub event: String,
    /// The delivery that started it (`X-GitHub-Delivery`), or `rerun:<run id>`.
    pub delivery: String,
    /// The GitHub App installation (clone tokens, check runs).
    pub installation_id: Option<u64>,
    /// HTTPS clone URL.
    pub clone_url: String,
    /// Its status (§5).
    pub status: RunStatus,
    /// ms since epoch.
    pub created_at: UnixMs,
    /// When the first job started.
    pub started_at: Option<UnixMs>,
    /// When it ended.
    pub completed_at: Option<UnixMs>,
    /// Why it failed without running (`lockfile_corrupt: …`), or `workflow_timeout`.
    pub failure_reason: Option<String>,
    /// The trigger decision trace (§4).
    pub trace: Value,
    /// Whole-run deadline, ms after creation.
    pub timeout_ms: Option<u64>,
    /// The run this one re-runs.
    pub rerun_of: Option<String>,
    /// A cancel was asked (a second one forces).
    pub cancel_requested: bool,
    /// The workflow as locked (what a rerun runs again).
    pub workflow_lock: Value,
    /// The workflow's concurrency group, rendered for this run (one run per group at once).
    #[serde(default)]
    pub concurrency_group: Option<String>,
    /// Waiting for an older run of its group to end: no job is queued meanwhile.
    #[serde(default)]
    pub group_held: bool,
    /// Its jobs, in lock order (matrix children in expansion order).
    pub jobs: Vec<JobSummary>,
}

/// A job as its run sees it: enough to gate `needs` and aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSummary {
    /// UUID.
    pub id: String,
    /// Display name.
    pub name: String,
    /// The lock job's name (matrix children share it).
    pub base_name: String,
    /// Its status.
    pub status: JobStatus,
    /// What it waits for.
    pub needs: Vec<NeedEdge>,
}

/// One `needs` edge (`execution_job_needs`): every job named `upstream` must end with a status
/// in `run_on`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NeedEdge {
    /// The upstream lock job's name.
    pub upstream: String,
    /// Allowed upstream statuses (`["success"]` by default).
    pub run_on: Vec<JobStatus>,
}

/// A job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRecord {
    /// UUID.
    pub id: String,
    /// Display name.
    pub name: String,
    /// The lock job's name.
    pub base_name: String,
    /// State machine state.
    pub state: JobState,
    /// Persisted status (the state, or `timed_out_stale`).
    pub status: JobStatus,
    /// Labels an agent must match (each matcher some label).
    pub runs_on: Vec<LabelMatcher>,
    /// Labels an agent must not have.
    pub exclude: Vec<LabelMatcher>,
    /// `deterministic` or `any`.
    pub pick: String,
    /// At most one job of this group runs at once (per owner).
    #[serde(default)]
    pub concurrency_group: Option<String>,
    /// What the agent runs.
    pub spec: JobSpec,
    /// The agent it was given to.
    pub agent_id: Option<String>,
    /// When it became ready.
    pub queued_at: Option<UnixMs>,
    /// When it started running.
    pub started_at: Option<UnixMs>,
    /// When it ended.
    pub completed_at: Option<UnixMs>,
    /// Why it failed, was cancelled or skipped.
    pub error: Option<String>,
    /// Why it is not dispatched yet (no agent with its labels, …).
    pub waiting_reason: Option<String>,
    /// Steps reported so far.
    pub steps: Vec<StepRecord>,
    /// Bumped on every change (check runs apply only newer versions).
    pub version: u64,
    /// The last sign of life from its agent.
    pub last_heartbeat_at: Option<UnixMs>,
}

/// A step's reported state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    /// Flat index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// State.
    pub state: StepState,
    /// Exit status.
    pub exit_code: Option<i32>,
    /// Run time, ms.
    pub duration_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// Lines of one step, as stored and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogChunk {
    /// Order within the job, from 0.
    pub seq: u64,
    /// The step (−1 before the first).
    pub step_index: i32,
    /// The lines.
    pub lines: Vec<String>,
    /// When stored, ms since epoch.
    pub at: UnixMs,
}

/// What the dispatcher needs of a ready job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadyJob {
    /// The job.
    pub job: JobRef,
    /// Labels an agent must match.
    pub runs_on: Vec<LabelMatcher>,
    /// Labels an agent must not have.
    pub exclude: Vec<LabelMatcher>,
    /// `deterministic` or `any`.
    pub pick: String,
    /// When it became ready (FIFO order).
    pub queued_at: UnixMs,
    /// Its concurrency group.
    #[serde(default)]
    pub group: Option<String>,
}

/// What an agent is sent for a job given to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dispatch {
    /// The run's repository, ref and commit.
    pub repo: String,
    /// Clone URL.
    pub clone_url: String,
    /// Ref.
    pub git_ref: String,
    /// Commit.
    pub sha: String,
    /// Installation for the clone token.
    pub installation_id: Option<u64>,
    /// What to run.
    pub spec: JobSpec,
}

/// Calls of [`RunActor`].
#[derive(Debug)]
pub enum RunCall {
    /// Stores a new run (idempotent: an existing run is returned as it is), queues its root
    /// jobs and arms the workflow deadline.
    Create(Box<RunRecord>, Vec<JobRecord>),
    /// The dispatch entries of those of the jobs that still wait for an agent.
    Ready(Vec<String>),
    /// Why queued jobs are not dispatched yet: (job, reason).
    Waiting(Vec<(String, String)>),
    /// The job was given to `agent`: what to send it, or `None` when the job no longer
    /// wants to run (cancelled meanwhile).
    Assign {
        /// The job.
        job_id: String,
        /// The agent.
        agent_id: String,
    },
    /// The job's agent refused it: it waits for another (its dispatch entry replied).
    Unassign(String),
    /// A report from the job's agent (`job.status`, `step.status`, `job.heartbeat`).
    Report(String, FromAgent),
    /// Appends log lines of a job; the seq given.
    Log {
        /// The job.
        job_id: String,
        /// The step.
        step_index: i32,
        /// The lines.
        lines: Vec<String>,
    },
    /// Cancels the run: pending and queued jobs end `cancelled`, running ones are told to
    /// stop (`force`: end `cancelled` at once). Replies the jobs to stop on agents.
    Cancel {
        /// Skip the grace.
        force: bool,
        /// Why (`cancelled by <user>`, `workflow_timeout`).
        reason: String,
    },
    /// The jobs' agent went away: running jobs become `recovering`.
    Recovering(Vec<String>),
    /// The jobs' agent came back with them: `recovering` jobs run again.
    Reclaimed(Vec<String>),
    /// The jobs' agent did not come back in time, or came back without them: they fail.
    Lost(Vec<String>, String),
    /// The older run of its concurrency group ended: queue its jobs.
    Release,
    /// Nothing: returns once the calls before it ended (their writes committed or not).
    Barrier,
}

/// Replies of [`RunActor`].
#[derive(Debug)]
pub enum RunReply {
    /// The run (of `Create`).
    Run(Option<Box<RunRecord>>),
    /// A ready job's dispatch entry (of `Unassign`).
    Ready(Option<ReadyJob>),
    /// Dispatch entries (of `Ready`).
    ReadyJobs(Vec<ReadyJob>),
    /// What to send an agent.
    Dispatch(Option<Box<Dispatch>>),
    /// Jobs to stop on agents: (agent, job).
    Stop(Vec<(String, JobRef)>),
    /// Done.
    Done,
}

/// The run actor.
pub struct RunActor {
    pub(crate) sub: Substrate,
    /// A running job without a sign of life this long is `timed_out_stale`, ms
    /// ([`crate::CiConfig::stale_after_ms`]).
    pub(crate) stale_ms: u64,
}

fn job_key(id: &str) -> String {
    format!("job/{id}")
}

impl RunActor {
    async fn load(ctx: &mut ActorContext) -> Result<Option<RunRecord>> {
        ctx.get("run").await
    }

    async fn job(ctx: &mut ActorContext, id: &str) -> Result<Option<JobRecord>> {
        ctx.get(&job_key(id)).await
    }

    /// Writes a changed job, its summary, and asks for its check run to follow.
    async fn save_job(
        &self,
        ctx: &mut ActorContext,
        run: &mut RunRecord,
        job: &mut JobRecord,
    ) -> Result<()> {
        job.version += 1;
        ctx.put(&job_key(&job.id), job)?;
        let mut before = None;
        if let Some(s) = run.jobs.iter_mut().find(|s| s.id == job.id) {
            before = Some(s.status);
            s.status = job.status;
        }
        // The check run follows the check status only (queued, in progress, completed);
        // step reports do not post.
        let first = job.version == 1;
        if !first && before.map(check_status) == Some(check_status(job.status)) {
            return Ok(());
        }
        let msg = crate::CheckMessage {
            owner: run.owner.clone(),
            job: JobRef {
                run_id: run.id.clone(),
                job_id: job.id.clone(),
            },
            version: job.version,
            status: job.status,
        };
        self.sub.queues().send(CHECKS_QUEUE, &msg, 0).await?;
        Ok(())
    }

    /// Applies `event` to a job; `false` (nothing written) when the state refuses it.
    async fn apply(
        &self,
        ctx: &mut ActorContext,
        run: &mut RunRecord,
        job: &mut JobRecord,
        event: JobEvent,
        error: Option<String>,
    ) -> Result<bool> {
        let Ok(next) = transition(job.state, event) else {
            tracing::debug!(job = %job.id, state = ?job.state, ?event, "transition refused");
            return Ok(false);
        };
        let now = ctx.now_ms();
        job.state = next;
        job.status = next.into();
        match next {
            JobState::Queued => {
                job.queued_at = Some(now);
            }
            JobState::Running => {
                job.started_at.get_or_insert(now);
                job.last_heartbeat_at = Some(now);
                job.waiting_reason = None;
                run.started_at.get_or_insert(now);
                // The stale scan looks at it by then at the latest.
                let due = now + self.stale_ms as i64;
                if ctx.alarm().await?.is_none_or(|at| at > due) {
                    ctx.set_alarm(due);
                }
            }
            s if s.is_terminal() => {
                job.completed_at = Some(now);
                job.waiting_reason = None;
            }
            _ => {}
        }
        if error.is_some() {
            job.error = error;
        }
        self.save_job(ctx, run, job).await?;
        Ok(true)
    }

    /// After a job ended: queue downstream jobs whose needs are all met, skip (cascading)
    /// those with an upstream outside their edge's `runOn`, aggregate the run.
    async fn settle(&self, ctx: &mut ActorContext, run: &mut RunRecord) -> Result<()> {
        let mut ready = Vec::new();
        loop {
            let mut changed = false;
            let pending: Vec<JobSummary> = run
                .jobs
                .iter()
                .filter(|j| j.status == JobStatus::Pending)
                .cloned()
                .collect();
            for summary in pending {
                if run.group_held && !run.cancel_requested {
                    break;
                }
                let verdict = needs_verdict(&summary, &run.jobs);
                let event = match verdict {
                    Verdict::Wait => continue,
                    Verdict::Ready => JobEvent::Enqueue,
                    Verdict::Skip(_) => JobEvent::Skip,
                };
                let Some(mut job) = Self::job(ctx, &summary.id).await? else {
                    continue;
                };
                let reason = match verdict {
                    Verdict::Skip(r) => Some(r),
                    _ => None,
                };
                // A cancelled run queues nothing more: its waiting jobs are cancelled.
                let event = if run.cancel_requested {
                    JobEvent::Cancel
                } else {
                    event
                };
                if self.apply(ctx, run, &mut job, event, reason).await? {
                    changed = true;
                    if job.state == JobState::Queued {
                        ready.push(job.id.clone());
                    }
                }
            }
            if !changed {
                break;
            }
        }
        if !ready.is_empty() {
            // One notice for all: a 250-job matrix is one message, one pool call.
            let msg = DispatchMessage::Ready {
                owner: run.owner.clone(),
                run_id: run.id.clone(),
                jobs: ready,
            };
            self.sub.queues().send(DISPATCH_QUEUE, &msg, 0).await?;
        }
        let status = aggregate(run.jobs.iter().map(|j| j.status));
        let now = ctx.now_ms();
        if run.status != status && !is_final(run.status) {
            run.status = status;
            if is_final(status) {
                run.completed_at = Some(now);
                ctx.delete_alarm();
                if let Some(group) = &run.concurrency_group {
                    let msg = DispatchMessage::GroupLeft {
                        owner: run.owner.clone(),
                        group: group.clone(),
                        run_id: run.id.clone(),
                    };
                    self.sub.queues().send(DISPATCH_QUEUE, &msg, 0).await?;
                }
            }
        }
        ctx.put("run", run)?;
        Ok(())
    }
}

/// The dispatch entry of a queued job.
fn ready_of(run_id: &str, job: &JobRecord) -> ReadyJob {
    ReadyJob {
        job: JobRef {
            run_id: run_id.to_owned(),
            job_id: job.id.clone(),
        },
        runs_on: job.runs_on.clone(),
        exclude: job.exclude.clone(),
        pick: job.pick.clone(),
        queued_at: job.queued_at.unwrap_or_default(),
        group: job.concurrency_group.clone(),
    }
}

fn is_final(s: RunStatus) -> bool {
    matches!(
        s,
        RunStatus::Success | RunStatus::Failed | RunStatus::Cancelled
    )
}

enum Verdict {
    Wait,
    Ready,
    Skip(String),
}

fn needs_verdict(job: &JobSummary, all: &[JobSummary]) -> Verdict {
    for edge in &job.needs {
        for upstream in all.iter().filter(|j| j.base_name == edge.upstream) {
            if !upstream.status.is_terminal() {
                return Verdict::Wait;
            }
            if !edge.run_on.contains(&upstream.status) {
                return Verdict::Skip(format!(
                    "needs `{}`, which ended {}",
                    upstream.name,
                    status_name(upstream.status)
                ));
            }
        }
    }
    Verdict::Ready
}

/// A status as its wire name (`timed_out_stale`).
pub fn status_name(s: JobStatus) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl Actor for RunActor {
    const TYPE: &'static str = RUN_ACTOR;
    type Call = RunCall;
    type Reply = RunReply;

    async fn call(&self, ctx: &mut ActorContext, call: RunCall) -> Result<RunReply> {
        match call {
            RunCall::Create(run, jobs) => {
                if let Some(existing) = Self::load(ctx).await? {
                    return Ok(RunReply::Run(Some(Box::new(existing))));
                }
                let mut run = *run;
                for mut job in jobs {
                    job.version = 0;
                    self.save_job(ctx, &mut run, &mut job).await?;
                }
                if let Some(ms) = run.timeout_ms {
                    ctx.set_alarm(run.created_at + ms as i64);
                }
                self.settle(ctx, &mut run).await?;
                Ok(RunReply::Run(Some(Box::new(run))))
            }
            RunCall::Ready(job_ids) => {
                let run_id = ctx.key().rsplit('/').next().unwrap_or_default().to_owned();
                let mut ready = Vec::new();
                for id in job_ids {
                    if let Some(job) = Self::job(ctx, &id).await?
                        && job.state == JobState::Queued
                        && job.agent_id.is_none()
                    {
                        ready.push(ready_of(&run_id, &job));
                    }
                }
                Ok(RunReply::ReadyJobs(ready))
            }
            RunCall::Waiting(reasons) => {
                let Some(mut run) = Self::load(ctx).await? else {
                    return Ok(RunReply::Done);
                };
                for (job_id, reason) in reasons {
                    let Some(mut job) = Self::job(ctx, &job_id).await? else {
                        continue;
                    };
                    if job.state == JobState::Queued
                        && job.agent_id.is_none()
                        && job.waiting_reason.as_deref() != Some(&reason)
                    {
                        job.waiting_reason = Some(reason);
                        self.save_job(ctx, &mut run, &mut job).await?;
                    }
                }
                ctx.put("run", &run)?;
                Ok(RunReply::Done)
            }
            RunCall::Assign { job_id, agent_id } => {
                let (Some(mut run), Some(mut job)) =
                    (Self::load(ctx).await?, Self::job(ctx, &job_id).await?)
                else {
                    return Ok(RunReply::Dispatch(None));
                };
                if job.state != JobState::Queued
                    || job.agent_id.as_ref().is_some_and(|a| a != &agent_id)
                {
                    return Ok(RunReply::Dispatch(None));
                }
                job.agent_id = Some(agent_id);
                job.waiting_reason = None;
                self.save_job(ctx, &mut run, &mut job).await?;
                ctx.put("run", &run)?;
                Ok(RunReply::Dispatch(Some(Box::new(Dispatch {
                    repo: run.repo.clone(),
                    clone_url: run.clone_url.clone(),
                    git_ref: run.git_ref.clone(),
                    sha: run.sha.clone(),
                    installation_id: run.installation_id,
                    spec: job.spec.clone(),
                }))))
            }
            RunCall::Unassign(job_id) => {
                let (Some(mut run), Some(mut job)) =
                    (Self::load(ctx).await?, Self::job(ctx, &job_id).await?)
                else {
                    return Ok(RunReply::Ready(None));
                };
                if job.state != JobState::Queued || job.agent_id.is_none() {
                    return Ok(RunReply::Ready(None));
                }
                job.agent_id = None;
                self.save_job(ctx, &mut run, &mut job).await?;
                ctx.put("run", &run)?;
                Ok(RunReply::Ready(Some(ready_of(&run.id, &job))))
            }
            RunCall::Report(agent_id, report) => {
                self.report(ctx, &agent_id, report).await?;
                Ok(RunReply::Done)
            }
            RunCall::Log {
                job_id,
                step_index,
                lines,
            } => {
                let seq_key = format!("logseq/{job_id}");
                let seq: u64 = ctx.get(&seq_key).await?.unwrap_or(0);
                let chunk = LogChunk {
                    seq,
                    step_index,
                    lines,
                    at: ctx.now_ms(),
                };
                ctx.put(&format!("log/{job_id}/{seq:010}"), &chunk)?;
                ctx.put(&seq_key, &(seq + 1))?;
                Ok(RunReply::Done)
            }
            RunCall::Cancel { force, reason } => {
                let Some(mut run) = Self::load(ctx).await? else {
                    return Ok(RunReply::Stop(Vec::new()));
                };
                let forced = force || run.cancel_requested;
                run.cancel_requested = true;
                let mut stop = Vec::new();
                for summary in run.jobs.clone() {
                    if summary.status.is_terminal() {
                        continue;
                    }
                    let Some(mut job) = Self::job(ctx, &summary.id).await? else {
                        continue;
                    };
                    let event = match job.state {
                        JobState::Running if !forced => JobEvent::CancelGraceful,
                        JobState::Cancelling => JobEvent::CancelForce,
                        _ => JobEvent::Cancel,
                    };
                    let agent = job.agent_id.clone();
                    if self
                        .apply(ctx, &mut run, &mut job, event, Some(reason.clone()))
                        .await?
                        && let Some(agent) = agent
                    {
                        stop.push((
                            agent,
                            JobRef {
                                run_id: run.id.clone(),
                                job_id: job.id.clone(),
                            },
                        ));
                    }
                }
                if reason == "workflow_timeout" {
                    run.failure_reason = Some(reason);
                }
                self.settle(ctx, &mut run).await?;
                Ok(RunReply::Stop(stop))
            }
            RunCall::Recovering(jobs) => {
                self.each(ctx, &jobs, JobEvent::Recover, None).await?;
                Ok(RunReply::Done)
            }
            RunCall::Reclaimed(jobs) => {
                self.each(ctx, &jobs, JobEvent::Start, None).await?;
                Ok(RunReply::Done)
            }
            RunCall::Lost(jobs, reason) => {
                self.each(ctx, &jobs, JobEvent::Fail, Some(reason)).await?;
                Ok(RunReply::Done)
            }
            RunCall::Barrier => Ok(RunReply::Done),
            RunCall::Release => {
                if let Some(mut run) = Self::load(ctx).await?
                    && run.group_held
                {
                    run.group_held = false;
                    self.settle(ctx, &mut run).await?;
                }
                Ok(RunReply::Done)
            }
        }
    }

    /// The workflow deadline (cancel with `workflow_timeout`, through the service, which
    /// also stops agents) and the stale scan (§11 tier 1): a running job whose agent sent
    /// nothing for `stale_ms` is `timed_out_stale`, its slot freed and its agent told to kill
    /// it. Re-armed at the next of both.
    async fn alarm(&self, ctx: &mut ActorContext, _alarm: AlarmInfo) -> Result<()> {
        let Some(mut run) = Self::load(ctx).await? else {
            return Ok(());
        };
        if is_final(run.status) {
            return Ok(());
        }
        let now = ctx.now_ms();
        let mut next: Option<UnixMs> = None;
        if let Some(ms) = run.timeout_ms
            && !run.cancel_requested
        {
            let deadline = run.created_at + ms as i64;
            if now >= deadline {
                let msg = DispatchMessage::Cancel {
                    owner: run.owner.clone(),
                    run_id: run.id.clone(),
                    reason: "workflow_timeout".into(),
                };
                self.sub.queues().send(DISPATCH_QUEUE, &msg, 0).await?;
            } else {
                next = Some(deadline);
            }
        }
        let mut stale = false;
        let running: Vec<String> = run
            .jobs
            .iter()
            .filter(|j| matches!(j.status, JobStatus::Running | JobStatus::Cancelling))
            .map(|j| j.id.clone())
            .collect();
        for id in running {
            let Some(mut job) = Self::job(ctx, &id).await? else {
                continue;
            };
            let seen = job.last_heartbeat_at.or(job.started_at).unwrap_or(now);
            let due = seen + self.stale_ms as i64;
            if due > now {
                next = Some(next.map_or(due, |n| n.min(due)));
                continue;
            }
            let agent = job.agent_id.clone().unwrap_or_default();
            let error = format!(
                "timed_out_stale: no sign of life from agent {agent} for {} s",
                (now - seen) / 1000
            );
            if self
                .apply(ctx, &mut run, &mut job, JobEvent::Fail, Some(error))
                .await?
            {
                job.status = JobStatus::TimedOutStale;
                ctx.put(&job_key(&job.id), &job)?;
                if let Some(s) = run.jobs.iter_mut().find(|s| s.id == job.id) {
                    s.status = JobStatus::TimedOutStale;
                }
                let msg = DispatchMessage::Stale {
                    owner: run.owner.clone(),
                    agent_id: agent,
                    job: JobRef {
                        run_id: run.id.clone(),
                        job_id: job.id.clone(),
                    },
                };
                self.sub.queues().send(DISPATCH_QUEUE, &msg, 0).await?;
                stale = true;
            }
        }
        if stale {
            self.settle(ctx, &mut run).await?;
        }
        if !is_final(run.status)
            && let Some(at) = next
        {
            ctx.set_alarm(at);
        }
        Ok(())
    }
}

impl RunActor {
    async fn each(
        &self,
        ctx: &mut ActorContext,
        jobs: &[String],
        event: JobEvent,
        error: Option<String>,
    ) -> Result<()> {
        let Some(mut run) = Self::load(ctx).await? else {
            return Ok(());
        };
        for id in jobs {
            if let Some(mut job) = Self::job(ctx, id).await? {
                self.apply(ctx, &mut run, &mut job, event, error.clone())
                    .await?;
            }
        }
        self.settle(ctx, &mut run).await
    }

    async fn report(
        &self,
        ctx: &mut ActorContext,
        agent_id: &str,
        report: FromAgent,
    ) -> Result<()> {
        let job_id = match &report {
            FromAgent::JobStatus { job, .. }
            | FromAgent::StepStatus { job, .. }
            | FromAgent::JobHeartbeat { job } => job.job_id.clone(),
            _ => return Ok(()),
        };
        let (Some(mut run), Some(mut job)) =
            (Self::load(ctx).await?, Self::job(ctx, &job_id).await?)
        else {
            return Ok(());
        };
        // Only the agent the job was given to speaks for it.
        if job.agent_id.as_deref() != Some(agent_id) {
            tracing::warn!(job = %job_id, agent = %agent_id, "report from another agent ignored");
            return Ok(());
        }
        match report {
            FromAgent::JobStatus { state, error, .. } => {
                let event = match (state, job.state) {
                    (ReportedJobState::Running, _) => JobEvent::Start,
                    (ReportedJobState::Success, _) => JobEvent::Succeed,
                    (ReportedJobState::Failed, _) => JobEvent::Fail,
                    (ReportedJobState::Cancelled, JobState::Cancelling) => JobEvent::Complete,
                    (ReportedJobState::Cancelled, _) => JobEvent::Cancel,
                };
                self.apply(ctx, &mut run, &mut job, event, error).await?;
                self.settle(ctx, &mut run).await?;
            }
            FromAgent::StepStatus {
                step_index,
                step_name,
                state,
                exit_code,
                duration_ms,
                error,
                ..
            } => {
                let record = StepRecord {
                    index: step_index,
                    name: step_name,
                    state,
                    exit_code,
                    duration_ms,
                    error,
                };
                match job.steps.iter_mut().find(|s| s.index == step_index) {
                    Some(s) => *s = record,
                    None => {
                        job.steps.push(record);
                        job.steps.sort_by_key(|s| s.index);
                    }
                }
                job.last_heartbeat_at = Some(ctx.now_ms());
                self.save_job(ctx, &mut run, &mut job).await?;
                ctx.put("run", &run)?;
            }
            FromAgent::JobHeartbeat { .. } => {
                job.last_heartbeat_at = Some(ctx.now_ms());
                ctx.put(&job_key(&job.id), &job)?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// The jobs of a workflow's lock entry for one run: static matrices expanded (a child per
/// combination, named `job (k=v, …)`, or `job (v)` for a one-axis list), `needs` edges with
/// their run-on sets, specs with `env`, matrix and `KICI_*` variables.
///
/// Errors: a message for a job the lock checks would refuse (a matrix over the limit) or a
/// dynamic job or matrix (which needs the TypeScript runtime).
pub fn plan_jobs(
    workflow: &kilocloud_kici::lock::LockWorkflow,
    run: &RunRecord,
) -> std::result::Result<Vec<JobRecord>, String> {
    use kilocloud_kici::lock::{LockJobEntry, Matrix, expand_matrix};
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for entry in &workflow.jobs {
        let LockJobEntry::Static(job) = entry else {
            return Err(
                "dynamic jobs need the TypeScript runtime, which this orchestrator \
                        does not have"
                    .into(),
            );
        };
        if let Some(Matrix::Dynamic { .. }) = job.matrix {
            return Err(format!(
                "job `{}` has a dynamic matrix, which needs the TypeScript runtime",
                job.name
            ));
        }
        if job.runs_on_all.is_some() {
            return Err(format!(
                "job `{}` uses runsOnAll (host fan-out), which is not supported yet",
                job.name
            ));
        }
        let env: BTreeMap<String, String> = job
            .extra
            .get("env")
            .and_then(|e| serde_json::from_value(e.clone()).ok())
            .unwrap_or_default();
        let checkout = job
            .extra
            .get("checkout")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let combos = expand_matrix(job)?;
        let one_axis = matches!(
            &job.matrix,
            Some(Matrix::Static {
                values: kilocloud_kici::lock::MatrixValues::List(_)
            })
        );
        for combo in combos {
            let name = if combo.is_empty() {
                job.name.clone()
            } else if one_axis {
                format!(
                    "{} ({})",
                    job.name,
                    combo.values().cloned().collect::<Vec<_>>().join(", ")
                )
            } else {
                let parts: Vec<String> = combo.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{} ({})", job.name, parts.join(", "))
            };
            if !names.insert(name.clone()) {
                return Err(format!("two jobs would be named `{name}`"));
            }
            let id = uuid::Uuid::now_v7().to_string();
            let mut job_env = env.clone();
            job_env.insert("CI".into(), "true".into());
            job_env.insert("KICI".into(), "true".into());
            job_env.insert("KICI_RUN_ID".into(), run.id.clone());
            job_env.insert("KICI_JOB_ID".into(), id.clone());
            job_env.insert("KICI_JOB_NAME".into(), name.clone());
            job_env.insert("KICI_WORKFLOW".into(), workflow.name.clone());
            job_env.insert("KICI_REPOSITORY".into(), run.repo.clone());
            job_env.insert("KICI_REF".into(), run.git_ref.clone());
            job_env.insert("KICI_SHA".into(), run.sha.clone());
            job_env.insert("KICI_EVENT".into(), run.event.clone());
            for (k, v) in &combo {
                job_env.insert(format!("MATRIX_{}", env_name(k)), v.clone());
            }
            out.push(JobRecord {
                id,
                name: name.clone(),
                base_name: job.name.clone(),
                state: JobState::Pending,
                status: JobStatus::Pending,
                runs_on: job.runs_on.clone().unwrap_or_default(),
                exclude: job.exclude_labels.clone().unwrap_or_default(),
                pick: job
                    .runs_on_pick
                    .clone()
                    .unwrap_or_else(|| "deterministic".into()),
                concurrency_group: job
                    .extra
                    .get("concurrencyGroup")
                    .and_then(Value::as_str)
                    .map(|g| render(g, workflow, run)),
                spec: JobSpec {
                    workflow: workflow.name.clone(),
                    name,
                    steps: job.steps.clone(),
                    env: job_env,
                    matrix: combo,
                    timeout_ms: job.timeout,
                    checkout,
                },
                agent_id: None,
                queued_at: None,
                started_at: None,
                completed_at: None,
                error: None,
                waiting_reason: None,
                steps: Vec::new(),
                version: 0,
                last_heartbeat_at: None,
            });
        }
    }
    Ok(out)
}

/// `node-version` → `NODE_VERSION`.
fn env_name(axis: &str) -> String {
    axis.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The summaries of planned jobs, with the `needs` edges of their lock jobs.
pub fn summaries(
    workflow: &kilocloud_kici::lock::LockWorkflow,
    jobs: &[JobRecord],
) -> Vec<JobSummary> {
    use kilocloud_kici::lock::LockJobEntry;
    let edges = |base: &str| -> Vec<NeedEdge> {
        workflow
            .jobs
            .iter()
            .find_map(|e| match e {
                LockJobEntry::Static(j) if j.name == base => Some(edges_of(j)),
                _ => None,
            })
            .unwrap_or_default()
    };
    jobs.iter()
        .map(|j| JobSummary {
            id: j.id.clone(),
            name: j.name.clone(),
            base_name: j.base_name.clone(),
            status: j.status,
            needs: edges(&j.base_name),
        })
        .collect()
}

/// A lock job's `needs` as edges: a name waits for success; `{name, runOn}` for those
/// statuses (unknown status names are dropped); groups (dynamic jobs) are not modelled.
fn edges_of(job: &kilocloud_kici::lock::LockJob) -> Vec<NeedEdge> {
    use kilocloud_kici::lock::Need;
    job.needs
        .iter()
        .filter_map(|n| match n {
            Need::Name(name) => Some(NeedEdge {
                upstream: name.clone(),
                run_on: vec![JobStatus::Success],
            }),
            Need::Job { name, run_on } => Some(NeedEdge {
                upstream: name.clone(),
                run_on: if run_on.is_empty() {
                    vec![JobStatus::Success]
                } else {
                    run_on
                        .iter()
                        .filter_map(|s| serde_json::from_value(Value::String(s.clone())).ok())
                        .collect()
                },
            }),
            Need::Group { .. } => None,
        })
        .collect()
}

/// A concurrency group template rendered for `run` (placeholders of
/// [`kilocloud_kici::workflow::GROUP_PLACEHOLDERS`]; an unknown one is kept as written).
pub fn render(
    template: &str,
    workflow: &kilocloud_kici::lock::LockWorkflow,
    run: &RunRecord,
) -> String {
    kilocloud_kici::workflow::render_group(template, |name| match name {
        "workflow" => workflow.name.clone(),
        "repo" => run.repo.clone(),
        "ref" => run.git_ref.clone(),
        "branch" => run
            .git_ref
            .strip_prefix("refs/heads/")
            .or_else(|| run.git_ref.strip_prefix("refs/tags/"))
            .unwrap_or(&run.git_ref)
            .to_owned(),
        "sha" => run.sha.clone(),
        _ => run.event.clone(),
    })
    .unwrap_or_else(|_| template.to_owned())
}
