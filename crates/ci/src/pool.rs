//! The `kici_pool` actor, one per owner: the owner's dispatch queue and agent registry
//! (reference `kici.md` §8 `dispatch_queue` and the Dispatcher). Being one single writer,
//! a claim is exclusive without row locks: a job is given to at most one agent, and an
//! agent never holds more than its `maxConcurrency`. Jobs wait in FIFO order of readiness;
//! an agent takes the oldest job it can run; a new job goes to the free agent `runsOnPick`
//! chooses (`deterministic`: the lowest agent id).
//!
//! Storage: `agent/<id>` ([`AgentRecord`]), `q/<seq, 20 digits>` ([`QueueEntry`]),
//! `qjob/<run>/<job>` (the entry's key, for dedup and removal), `seq`. The alarm ends the
//! recovery windows of disconnected agents (§11): their jobs are then lost, sent as
//! [`crate::DispatchMessage::Lost`] for the service to fail them.

use std::collections::BTreeMap;

use kilocloud_kici::lock::LabelMatcher;
use kilocloud_substrate::{Actor, ActorContext, AlarmInfo, Result, Substrate, UnixMs};
use serde::{Deserialize, Serialize};

use crate::protocol::JobRef;
use crate::run::ReadyJob;
use crate::{DISPATCH_QUEUE, DispatchMessage};

/// Actor type of an owner's pool.
pub const POOL_ACTOR: &str = "kici_pool";
/// Queue entries read per page when the pool walks its queue.
const QUEUE_PAGE: u32 = 64;

/// A registered agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRecord {
    /// Its id.
    pub id: String,
    /// Its labels.
    pub labels: Vec<String>,
    /// Jobs at once.
    pub max_concurrency: u32,
    /// Jobs given to it and not finished.
    pub active: Vec<JobRef>,
    /// Jobs given to it that its connection has not taken yet.
    pub undelivered: Vec<JobRef>,
    /// Jobs to tell it to stop: (job, force).
    pub cancels: Vec<(JobRef, bool)>,
    /// Whether a connection is open.
    pub connected: bool,
    /// The open connection's id (a later connection replaces an earlier one).
    pub connection: String,
    /// The node holding the connection.
    pub node: String,
    /// Host name.
    pub hostname: String,
    /// Version.
    pub version: String,
    /// First registration.
    pub registered_at: UnixMs,
    /// When the connection closed (the recovery window runs from here).
    pub disconnected_at: Option<UnixMs>,
    /// It refused a job as `draining`: it gets no more until it registers again.
    #[serde(default)]
    pub draining: bool,
}

impl AgentRecord {
    fn free(&self) -> usize {
        if self.draining {
            return 0;
        }
        (self.max_concurrency as usize).saturating_sub(self.active.len())
    }

    /// Whether it may run a job with these matchers: each `runs_on` matcher matches one of
    /// its labels and no `exclude` matcher matches any.
    pub fn satisfies(&self, runs_on: &[LabelMatcher], exclude: &[LabelMatcher]) -> bool {
        runs_on
            .iter()
            .all(|m| self.labels.iter().any(|l| m.matches(l)))
            && !exclude
                .iter()
                .any(|m| self.labels.iter().any(|l| m.matches(l)))
    }
}

/// A job waiting for an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueEntry {
    /// The job and its matchers.
    pub ready: ReadyJob,
    /// Why no agent took it yet (no agent has its labels; all busy).
    pub reason: Option<String>,
}

/// Calls of [`PoolActor`].
#[derive(Debug)]
pub enum PoolCall {
    /// An agent connected. Replies which of its jobs it still runs (`reclaimed`) and which it
    /// lost (given to it, not in its `inFlightJobs`).
    Register {
        /// Its id.
        agent_id: String,
        /// Its labels.
        labels: Vec<String>,
        /// Jobs at once.
        max_concurrency: u32,
        /// The connection's id.
        connection: String,
        /// This node.
        node: String,
        /// Host name and version.
        hostname: String,
        /// Version.
        version: String,
        /// What it says it still runs.
        in_flight: Vec<JobRef>,
    },
    /// The connection closed; its jobs wait the recovery window for it to come back.
    Disconnect {
        /// The agent.
        agent_id: String,
        /// The connection that closed (a newer one is left alone).
        connection: String,
    },
    /// Queues ready jobs (idempotent per job) and gives what it can to free agents. Replies
    /// the agents given work and, per job left waiting, why.
    Enqueue(Vec<ReadyJob>),
    /// What the agent's connection should send now: jobs given to it, then (with free
    /// slots) the oldest queued jobs it can run; and the cancels for it.
    Take {
        /// The agent.
        agent_id: String,
        /// Its connection (a stale connection takes nothing).
        connection: String,
    },
    /// The agent is done with a job (ended, refused, or not wanted any more).
    Finish {
        /// The agent.
        agent_id: String,
        /// The job.
        job: JobRef,
        /// Put the job back in the queue (a `job.reject`).
        requeue: Option<ReadyJob>,
        /// The agent refused it: `draining` (it takes no more until it registers again) or
        /// `busy` (it holds all it can: its capacity becomes what it holds).
        refused: Option<String>,
    },
    /// Stops jobs: queued ones leave the queue; jobs on agents get a cancel. Replies the
    /// agents to wake.
    Cancel(Vec<(String, JobRef, bool)>, Vec<JobRef>),
    /// A job of the agent timed out stale: its slot is freed and the agent is told to kill
    /// it. Replies the agents to wake.
    Stale {
        /// The agent.
        agent_id: String,
        /// The job.
        job: JobRef,
    },
    /// Agents and queue, for the API.
    Snapshot,
}

/// What a connection sends its agent.
#[derive(Debug, Default)]
pub struct Work {
    /// Jobs to dispatch.
    pub jobs: Vec<JobRef>,
    /// Jobs to cancel: (job, force).
    pub cancels: Vec<(JobRef, bool)>,
}

/// Replies of [`PoolActor`].
#[derive(Debug)]
pub enum PoolReply {
    /// Of `Register`.
    Registered {
        /// Still running on the agent.
        reclaimed: Vec<JobRef>,
        /// Given to it, gone from it.
        lost: Vec<JobRef>,
    },
    /// Agents given work, and jobs left waiting with why.
    Enqueued {
        /// Agents to wake.
        woken: Vec<String>,
        /// (job, reason).
        waiting: Vec<(JobRef, String)>,
    },
    /// Of `Take`.
    Work(Work),
    /// Of `Disconnect`: the jobs now recovering.
    Disconnected(Vec<JobRef>),
    /// Agents to wake.
    Woken(Vec<String>),
    /// Of `Snapshot`.
    Snapshot {
        /// Agents by id.
        agents: Vec<AgentRecord>,
        /// Waiting jobs in order.
        queue: Vec<QueueEntry>,
    },
    /// Done.
    Done,
}

/// The pool actor.
pub struct PoolActor {
    pub(crate) sub: Substrate,
    /// The recovery window, ms ([`crate::CiConfig::recovery_window_ms`]).
    pub(crate) recovery_ms: u64,
}

fn group_key(group: &str) -> String {
    format!("grp/{}", hex::encode(group))
}

fn qjob_key(job: &JobRef) -> String {
    format!("qjob/{}/{}", job.run_id, job.job_id)
}

struct State {
    agents: BTreeMap<String, AgentRecord>,
    /// Entries in the queue (`qlen`), so a call need not read the queue to know.
    queued: u64,
    /// Concurrency group → its job on an agent (`grp/<group>`).
    groups: BTreeMap<String, JobRef>,
}

impl PoolActor {
    async fn state(ctx: &mut ActorContext) -> Result<State> {
        let agents = ctx
            .list::<AgentRecord>("agent/")
            .await?
            .into_iter()
            .map(|(_, a)| (a.id.clone(), a))
            .collect();
        let queued = ctx.get::<u64>("qlen").await?.unwrap_or(0);
        let groups = ctx
            .list::<(String, JobRef)>("grp/")
            .await?
            .into_iter()
            .map(|(_, g)| g)
            .collect();
        Ok(State {
            agents,
            queued,
            groups,
        })
    }

    fn put_agent(ctx: &mut ActorContext, agent: &AgentRecord) -> Result<()> {
        ctx.put(&format!("agent/{}", agent.id), agent)
    }

    /// The job no longer holds its concurrency group.
    fn leave_group(ctx: &mut ActorContext, state: &mut State, job: &JobRef) {
        let held: Vec<String> = state
            .groups
            .iter()
            .filter(|(_, j)| *j == job)
            .map(|(g, _)| g.clone())
            .collect();
        for group in held {
            state.groups.remove(&group);
            ctx.delete(&group_key(&group));
        }
    }

    /// Why `entry` cannot go to an agent now, or the agent it goes to.
    fn place(state: &State, entry: &QueueEntry) -> Result<String, String> {
        let r = &entry.ready;
        if let Some(group) = &r.group
            && state.groups.get(group).is_some_and(|j| j != &r.job)
        {
            return Err(format!("waiting for concurrency group {group}"));
        }
        let mut candidates: Vec<&AgentRecord> = state
            .agents
            .values()
            .filter(|a| a.connected && a.free() > 0 && a.satisfies(&r.runs_on, &r.exclude))
            .collect();
        if r.pick == "any" {
            candidates.sort_by_key(|a| std::cmp::Reverse(a.free()));
        }
        if let Some(agent) = candidates.first() {
            return Ok(agent.id.clone());
        }
        Err(
            if state
                .agents
                .values()
                .any(|a| a.satisfies(&r.runs_on, &r.exclude))
            {
                "waiting for a free agent with its labels".to_owned()
            } else {
                format!(
                    "no registered agent has the labels it needs ({}); the job waits until one \
                     registers",
                    describe(&r.runs_on, &r.exclude)
                )
            },
        )
    }

    /// Gives queued jobs, oldest first, to free agents that can run them, walking the queue
    /// from its head in pages and stopping once no agent is free (so a long queue costs a
    /// page, not its length, while agents keep up). Entries passed over get their reason.
    /// Replies the agents given work.
    async fn assign(ctx: &mut ActorContext, state: &mut State) -> Result<Vec<String>> {
        let mut woken = Vec::new();
        let any_free = |state: &State| state.agents.values().any(|a| a.connected && a.free() > 0);
        let mut after = String::new();
        while state.queued > 0 && any_free(state) {
            let (page, next) = ctx
                .list_page::<QueueEntry>("q/", &after, QUEUE_PAGE)
                .await?;
            for (key, mut entry) in page {
                if !any_free(state) {
                    break;
                }
                match Self::place(state, &entry) {
                    Ok(agent_id) => {
                        let r = &entry.ready;
                        let agent = state.agents.get_mut(&agent_id).expect("a candidate");
                        agent.active.push(r.job.clone());
                        agent.undelivered.push(r.job.clone());
                        Self::put_agent(ctx, agent)?;
                        ctx.delete(&key);
                        ctx.delete(&qjob_key(&r.job));
                        state.queued = state.queued.saturating_sub(1);
                        if let Some(group) = &r.group {
                            ctx.put(&group_key(group), &(group.clone(), r.job.clone()))?;
                            state.groups.insert(group.clone(), r.job.clone());
                        }
                        if !woken.contains(&agent_id) {
                            woken.push(agent_id);
                        }
                    }
                    Err(reason) => {
                        if entry.reason.as_deref() != Some(&reason) {
                            entry.reason = Some(reason);
                            ctx.put(&key, &entry)?;
                        }
                    }
                }
            }
            match next {
                Some(n) => after = n,
                None => break,
            }
        }
        ctx.put("qlen", &state.queued)?;
        Ok(woken)
    }

    /// The earliest end of a recovery window, to arm the alarm at.
    fn arm(ctx: &mut ActorContext, state: &State, recovery_ms: u64) {
        let next = state
            .agents
            .values()
            .filter(|a| !a.connected && !a.active.is_empty())
            .filter_map(|a| a.disconnected_at)
            .min();
        match next {
            Some(at) => ctx.set_alarm(at + recovery_ms as i64),
            None => ctx.delete_alarm(),
        }
    }
}

/// `kici:os:linux, !flaky` for messages.
pub fn describe(runs_on: &[LabelMatcher], exclude: &[LabelMatcher]) -> String {
    let show = |m: &LabelMatcher| match m {
        LabelMatcher::Exact { value } => value.clone(),
        LabelMatcher::Regex { source, flags } => format!("/{source}/{flags}"),
    };
    runs_on
        .iter()
        .map(show)
        .chain(exclude.iter().map(|m| format!("!{}", show(m))))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Actor for PoolActor {
    const TYPE: &'static str = POOL_ACTOR;
    type Call = PoolCall;
    type Reply = PoolReply;

    async fn call(&self, ctx: &mut ActorContext, call: PoolCall) -> Result<PoolReply> {
        let mut state = Self::state(ctx).await?;
        match call {
            PoolCall::Register {
                agent_id,
                labels,
                max_concurrency,
                connection,
                node,
                hostname,
                version,
                in_flight,
            } => {
                let now = ctx.now_ms();
                let previous = state.agents.remove(&agent_id);
                let (mut reclaimed, mut lost) = (Vec::new(), Vec::new());
                let active = previous
                    .as_ref()
                    .map(|p| p.active.clone())
                    .unwrap_or_default();
                for job in active {
                    if in_flight.contains(&job) {
                        reclaimed.push(job);
                    } else {
                        lost.push(job);
                    }
                }
                let agent = AgentRecord {
                    id: agent_id.clone(),
                    labels,
                    max_concurrency: max_concurrency.max(1),
                    active: reclaimed.clone(),
                    undelivered: Vec::new(),
                    cancels: previous
                        .as_ref()
                        .map(|p| {
                            p.cancels
                                .iter()
                                .filter(|(j, _)| reclaimed.contains(j))
                                .cloned()
                                .collect()
                        })
                        .unwrap_or_default(),
                    connected: true,
                    connection,
                    node,
                    hostname,
                    version,
                    registered_at: previous.as_ref().map_or(now, |p| p.registered_at),
                    disconnected_at: None,
                    draining: false,
                };
                Self::put_agent(ctx, &agent)?;
                state.agents.insert(agent_id, agent);
                // It may take queued work at once.
                Self::assign(ctx, &mut state).await?;
                Ok(PoolReply::Registered { reclaimed, lost })
            }
            PoolCall::Disconnect {
                agent_id,
                connection,
            } => {
                let Some(agent) = state.agents.get_mut(&agent_id) else {
                    return Ok(PoolReply::Disconnected(Vec::new()));
                };
                if agent.connection != connection || !agent.connected {
                    return Ok(PoolReply::Disconnected(Vec::new()));
                }
                agent.connected = false;
                agent.disconnected_at = Some(ctx.now_ms());
                // Jobs given but never taken go back to the queue front (they never ran).
                let undelivered = std::mem::take(&mut agent.undelivered);
                agent.active.retain(|j| !undelivered.contains(j));
                let recovering = agent.active.clone();
                Self::put_agent(ctx, agent)?;
                for job in &undelivered {
                    Self::leave_group(ctx, &mut state, job);
                }
                for job in undelivered {
                    let msg = DispatchMessage::Requeue {
                        owner: ctx.key().to_owned(),
                        job,
                    };
                    self.sub.queues().send(DISPATCH_QUEUE, &msg, 0).await?;
                }
                Self::arm(ctx, &state, self.recovery_ms);
                Ok(PoolReply::Disconnected(recovering))
            }
            PoolCall::Enqueue(ready) => {
                let mut seq: u64 = ctx.get("seq").await?.unwrap_or(0);
                let mut added = Vec::new();
                for r in ready {
                    let qjob = qjob_key(&r.job);
                    let given = state.agents.values().any(|a| a.active.contains(&r.job));
                    if given || ctx.get::<String>(&qjob).await?.is_some() {
                        continue;
                    }
                    seq += 1;
                    let key = format!("q/{seq:020}");
                    let mut entry = QueueEntry {
                        ready: r,
                        reason: None,
                    };
                    // Said now, since the walk below stops at the first busy moment.
                    entry.reason = Self::place(&state, &entry).err();
                    ctx.put(&key, &entry)?;
                    ctx.put(&qjob, &key)?;
                    state.queued += 1;
                    added.push(entry.ready.job.clone());
                }
                ctx.put("seq", &seq)?;
                let woken = Self::assign(ctx, &mut state).await?;
                let mut waiting = Vec::new();
                for job in added {
                    if let Some(key) = ctx.get::<String>(&qjob_key(&job)).await?
                        && let Some(entry) = ctx.get::<QueueEntry>(&key).await?
                        && let Some(reason) = entry.reason
                    {
                        waiting.push((job, reason));
                    }
                }
                Ok(PoolReply::Enqueued { woken, waiting })
            }
            PoolCall::Take {
                agent_id,
                connection,
            } => {
                let Some(agent) = state.agents.get(&agent_id) else {
                    return Ok(PoolReply::Work(Work::default()));
                };
                if agent.connection != connection || !agent.connected {
                    return Ok(PoolReply::Work(Work::default()));
                }
                if agent.free() > 0 && state.queued > 0 {
                    Self::assign(ctx, &mut state).await?;
                }
                let agent = state.agents.get_mut(&agent_id).expect("present");
                let work = Work {
                    jobs: std::mem::take(&mut agent.undelivered),
                    cancels: std::mem::take(&mut agent.cancels),
                };
                if !work.jobs.is_empty() || !work.cancels.is_empty() {
                    Self::put_agent(ctx, agent)?;
                }
                Ok(PoolReply::Work(work))
            }
            PoolCall::Finish {
                agent_id,
                job,
                requeue,
                refused,
            } => {
                if let Some(agent) = state.agents.get_mut(&agent_id) {
                    agent.active.retain(|j| j != &job);
                    agent.undelivered.retain(|j| j != &job);
                    agent.cancels.retain(|(j, _)| j != &job);
                    match refused.as_deref() {
                        Some("draining") => agent.draining = true,
                        Some(_) => agent.max_concurrency = (agent.active.len() as u32).max(1),
                        None => {}
                    }
                    Self::put_agent(ctx, agent)?;
                }
                Self::leave_group(ctx, &mut state, &job);
                if let Some(r) = requeue {
                    // Back at the front: it was the oldest when it was given.
                    let key = format!("q/{:020}", 0);
                    let key = format!("{key}-{}", r.job.job_id);
                    let entry = QueueEntry {
                        ready: r,
                        reason: None,
                    };
                    ctx.put(&key, &entry)?;
                    ctx.put(&qjob_key(&entry.ready.job), &key)?;
                    state.queued += 1;
                }
                let woken = Self::assign(ctx, &mut state).await?;
                Self::arm(ctx, &state, self.recovery_ms);
                Ok(PoolReply::Woken(woken))
            }
            PoolCall::Cancel(on_agents, queued) => {
                for job in queued {
                    if let Some(key) = ctx.get::<String>(&qjob_key(&job)).await? {
                        ctx.delete(&key);
                        ctx.delete(&qjob_key(&job));
                        state.queued = state.queued.saturating_sub(1);
                    }
                }
                ctx.put("qlen", &state.queued)?;
                let mut woken = Vec::new();
                for (agent_id, job, force) in on_agents {
                    if let Some(agent) = state.agents.get_mut(&agent_id) {
                        if agent.undelivered.contains(&job) {
                            // Never sent: nothing to stop.
                            agent.undelivered.retain(|j| j != &job);
                            agent.active.retain(|j| j != &job);
                        } else if agent.active.contains(&job) {
                            agent.cancels.push((job, force));
                            woken.push(agent_id.clone());
                        }
                        Self::put_agent(ctx, agent)?;
                    }
                }
                Ok(PoolReply::Woken(woken))
            }
            PoolCall::Stale { agent_id, job } => {
                let mut woken = Vec::new();
                if let Some(agent) = state.agents.get_mut(&agent_id)
                    && agent.active.contains(&job)
                {
                    agent.active.retain(|j| j != &job);
                    agent.undelivered.retain(|j| j != &job);
                    agent.cancels.push((job.clone(), true));
                    Self::put_agent(ctx, agent)?;
                    woken.push(agent_id);
                }
                Self::leave_group(ctx, &mut state, &job);
                for w in Self::assign(ctx, &mut state).await? {
                    if !woken.contains(&w) {
                        woken.push(w);
                    }
                }
                Ok(PoolReply::Woken(woken))
            }
            PoolCall::Snapshot => Ok(PoolReply::Snapshot {
                agents: state.agents.into_values().collect(),
                queue: ctx
                    .list::<QueueEntry>("q/")
                    .await?
                    .into_iter()
                    .map(|(_, e)| e)
                    .collect(),
            }),
        }
    }

    async fn alarm(&self, ctx: &mut ActorContext, _alarm: AlarmInfo) -> Result<()> {
        let recovery_ms = self.recovery_ms;
        let now = ctx.now_ms();
        let mut state = Self::state(ctx).await?;
        let mut lost = Vec::new();
        for agent in state.agents.values_mut() {
            let expired = !agent.connected
                && agent
                    .disconnected_at
                    .is_some_and(|at| at + recovery_ms as i64 <= now);
            if expired && !agent.active.is_empty() {
                let jobs = std::mem::take(&mut agent.active);
                lost.extend(jobs.iter().cloned());
                agent.cancels.clear();
                Self::put_agent(ctx, agent)?;
                let msg = DispatchMessage::Lost {
                    owner: ctx.key().to_owned(),
                    jobs,
                    reason: "agent disconnected and did not reconnect within the recovery \
                             window"
                        .into(),
                };
                self.sub.queues().send(DISPATCH_QUEUE, &msg, 0).await?;
            }
        }
        for job in &lost {
            Self::leave_group(ctx, &mut state, job);
        }
        Self::arm(ctx, &state, recovery_ms);
        Ok(())
    }
}
