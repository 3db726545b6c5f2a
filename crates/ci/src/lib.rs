//! KiCI's orchestrator inside `kilocloud serve`, and its agent (reference `kici.md`).
//!
//! - **Pipeline** ([`pipeline`]): a verified GitHub delivery (automation's webhook ingress
//!   deduplicates and verifies it first) is queued on `kici-webhooks`; its consumer
//!   normalises it, reads `.kici/kici.lock.json` at the event's ref through the contents API
//!   (LRU cache keyed `provider:repo:ref`, 500 entries, 1 h; corrupt locks are never cached
//!   and make a run recorded `lockfile_corrupt`), matches every workflow's triggers and
//!   creates one run per matched workflow.
//! - **Runs** ([`run`]): the `kici_run` actor holds a run, its jobs and steps, gates `needs`
//!   and aggregates; jobs that become ready go out on `kici-dispatch`.
//! - **Dispatch** ([`pool`]): the `kici_pool` actor per owner is the FIFO queue and the
//!   agent registry; agents connect over WebSocket ([`protocol`]) to any node, and their
//!   connection ([`Ci::take`]) sends what the pool gives them.
//! - **Check runs** ([`checks`]): one check run per job follows its status on GitHub.
//! - **Agent** ([`agent`]): `kilocloud ci agent`, which runs jobs in bubblewrap sandboxes.

pub mod agent;
pub mod checks;
pub mod pipeline;
pub mod pool;
pub mod protocol;
pub mod run;
pub mod sources;

pub use pipeline::RunSource;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kilocloud_automation::GitHubApp;
use kilocloud_identity::Owner;
use kilocloud_substrate::{QueueConfig, Substrate, UnixMs};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::pool::{AgentRecord, PoolActor, PoolCall, PoolReply, QueueEntry};
use crate::protocol::{FromAgent, JobRef, ToAgent};
use crate::run::{JobRecord, LogChunk, RUN_ACTOR, RunActor, RunCall, RunRecord, RunReply};

/// Queue of jobs that became ready, agents' lost jobs, and deadline cancels.
pub const DISPATCH_QUEUE: &str = "kici-dispatch";
/// Queue of check-run updates.
pub const CHECKS_QUEUE: &str = "kici-checks";
/// Queue of GitHub deliveries for the pipeline.
pub const WEBHOOK_QUEUE: &str = "kici-webhooks";
/// Actor type of an owner's run index and agent tokens.
pub const INDEX_ACTOR: &str = "kici_index";
/// Actor type of an agent token (key: its SHA-256, hex).
pub const TOKEN_ACTOR: &str = "kici_agent_token";

/// `ci.*` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CiConfig {
    /// How long a disconnected agent's running jobs wait for it to come back before they
    /// fail, ms. Default 120,000 (2 × the 60 s maximum reconnect delay, `kici.md` §11).
    pub recovery_window_ms: u64,
    /// A running job whose agent sends nothing (heartbeat, step, log) this long is
    /// `timed_out_stale`, ms. Default 120,000 (the 60 s job heartbeat × 2, §11).
    pub stale_after_ms: u64,
    /// Lock files cached (`KICI_LOCKFILE_CACHE_MAX`). Default 500.
    pub lock_cache_entries: usize,
    /// How long a cached lock file is used, ms (`KICI_LOCKFILE_CACHE_TTL_MS`). Default 1 h.
    pub lock_cache_ttl_ms: u64,
    /// Log bytes one step may stream (`KICI_MAX_LOG_SIZE_BYTES`). Default 10 MiB.
    pub max_log_bytes: u64,
    /// Public base URL of this server, for check runs' details links. Default empty (none).
    pub public_url: String,
}

impl Default for CiConfig {
    fn default() -> Self {
        Self {
            recovery_window_ms: 120_000,
            stale_after_ms: 120_000,
            lock_cache_entries: 500,
            lock_cache_ttl_ms: 3_600_000,
            max_log_bytes: protocol::DEFAULT_MAX_LOG_BYTES,
            public_url: String::new(),
        }
    }
}

/// A failure of a CI call, mapped to HTTP by the server.
#[derive(Debug, thiserror::Error)]
pub enum CiError {
    /// Bad input (400).
    #[error("{0}")]
    Invalid(String),
    /// Unknown, or another owner's (404).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// Not in a state that allows it (409).
    #[error("{0}")]
    Conflict(String),
    /// GitHub is not configured (503).
    #[error("{0}")]
    Disabled(&'static str),
    /// A webhook's signature or key does not verify (401).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A body over the source's limit (413).
    #[error("body is {size} bytes; the limit is {limit} bytes")]
    TooLarge {
        /// Bytes received.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A substrate failure.
    #[error(transparent)]
    Substrate(#[from] kilocloud_substrate::Error),
}

/// A message of [`DISPATCH_QUEUE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DispatchMessage {
    /// Jobs of a run became ready.
    Ready {
        /// Owner key.
        owner: String,
        /// The run.
        run_id: String,
        /// The jobs.
        jobs: Vec<String>,
    },
    /// A job given to an agent that went away before taking it.
    Requeue {
        /// Owner key (the pool's).
        owner: String,
        /// The job.
        job: JobRef,
    },
    /// Jobs whose agent did not come back.
    Lost {
        /// Owner key.
        owner: String,
        /// The jobs.
        jobs: Vec<JobRef>,
        /// Why.
        reason: String,
    },
    /// A job timed out stale: free its agent's slot and tell the agent to kill it.
    Stale {
        /// Owner key.
        owner: String,
        /// The agent it was given to.
        agent_id: String,
        /// The job.
        job: JobRef,
    },
    /// A run of a concurrency group ended: the next one may start.
    GroupLeft {
        /// Owner key.
        owner: String,
        /// The group.
        group: String,
        /// The run that ended.
        run_id: String,
    },
    /// Cancel a run (the workflow deadline).
    Cancel {
        /// Owner key.
        owner: String,
        /// The run.
        run_id: String,
        /// Why.
        reason: String,
    },
}

/// A message of [`CHECKS_QUEUE`]: make job `job`'s check run follow its state, once the
/// job's record of at least `version` is committed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckMessage {
    /// Owner key.
    pub owner: String,
    /// The job.
    pub job: JobRef,
    /// The job record's version the message was sent for.
    #[serde(default)]
    pub version: u64,
    /// The job's status at that version (the check run shows each status it went through,
    /// even when a later one is committed by the time the message is handled).
    pub status: kilocloud_kici::JobStatus,
}

/// An agent's connection on this node.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    /// The owner it works for.
    pub owner: Owner,
    /// Its id.
    pub agent_id: String,
    /// This connection.
    pub connection: String,
    wake: Arc<Notify>,
}

impl AgentHandle {
    /// Resolves when the pool may have work or cancels for this agent.
    pub async fn woken(&self) {
        self.wake.notified().await
    }
}

/// An owner's summary of a run in listings.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRef {
    id: String,
}

/// What an agent token stores.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgentTokenRecord {
    owner: String,
    id: String,
    name: String,
    created_at: UnixMs,
}

/// A created agent token (the secret is shown once).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedAgentToken {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// `kat_<64 hex>`; stored only as its SHA-256.
    pub token: String,
}

/// KiCI's orchestrator service. Cheap to clone.
#[derive(Clone)]
pub struct Ci {
    inner: Arc<Inner>,
}

struct Inner {
    sub: Substrate,
    identity: kilocloud_identity::Identity,
    github: Option<GitHubApp>,
    config: CiConfig,
    /// Agent connections on this node: (owner key, agent id) → wake-up.
    agents: Mutex<HashMap<(String, String), Arc<Notify>>>,
    /// Runs with live log followers on this node: (owner key, run id) → wake-up.
    followers: Mutex<HashMap<(String, String), Arc<Notify>>>,
    locks: pipeline::LockCache,
}

impl Ci {
    /// Registers CI's actors and queues on `sub` (before [`Substrate::start`]); call
    /// [`Ci::start`] after it started.
    pub fn new(
        sub: &Substrate,
        identity: kilocloud_identity::Identity,
        github: Option<GitHubApp>,
        config: CiConfig,
    ) -> Self {
        sub.actors().register(RunActor {
            sub: sub.clone(),
            stale_ms: config.stale_after_ms,
        });
        sub.actors().register(PoolActor {
            sub: sub.clone(),
            recovery_ms: config.recovery_window_ms,
        });
        sub.actors().register(IndexActor);
        sub.actors().register(TokenActor);
        sub.actors().register(sources::SourceActor);
        sub.actors().register(checks::CheckActor {
            github: github.clone(),
        });
        for (name, concurrency) in [(DISPATCH_QUEUE, 16), (CHECKS_QUEUE, 8), (WEBHOOK_QUEUE, 4)] {
            sub.queues()
                .declare(QueueConfig {
                    max_attempts: 5,
                    retry_base_ms: 1_000,
                    concurrency,
                    ..QueueConfig::new(name)
                })
                .expect("CI queue settings are valid");
        }
        let locks = pipeline::LockCache::new(config.lock_cache_entries, config.lock_cache_ttl_ms);
        Self {
            inner: Arc::new(Inner {
                sub: sub.clone(),
                identity,
                github,
                config,
                agents: Mutex::new(HashMap::new()),
                followers: Mutex::new(HashMap::new()),
                locks,
            }),
        }
    }

    /// Starts the queue consumers.
    pub fn start(&self) {
        let sub = &self.inner.sub;
        sub.start_consumer(DISPATCH_QUEUE, Arc::new(DispatchConsumer(self.clone())));
        sub.start_consumer(CHECKS_QUEUE, Arc::new(checks::CheckConsumer(self.clone())));
        sub.start_consumer(
            WEBHOOK_QUEUE,
            Arc::new(pipeline::WebhookConsumer(self.clone())),
        );
    }

    /// The settings.
    pub fn config(&self) -> &CiConfig {
        &self.inner.config
    }

    pub(crate) fn sub(&self) -> &Substrate {
        &self.inner.sub
    }

    pub(crate) fn identity(&self) -> &kilocloud_identity::Identity {
        &self.inner.identity
    }

    pub(crate) fn github(&self) -> Option<&GitHubApp> {
        self.inner.github.as_ref()
    }

    async fn run_call(
        &self,
        owner: &str,
        run_id: &str,
        call: RunCall,
    ) -> Result<RunReply, CiError> {
        Ok(self
            .inner
            .sub
            .actors()
            .call::<RunActor>(&format!("{owner}/{run_id}"), call)
            .await?)
    }

    async fn pool_call(&self, owner: &str, call: PoolCall) -> Result<PoolReply, CiError> {
        Ok(self
            .inner
            .sub
            .actors()
            .call::<PoolActor>(owner, call)
            .await?)
    }

    fn wake_agents(&self, owner: &str, agents: &[String]) {
        let map = self.inner.agents.lock().expect("agents lock");
        for agent in agents {
            if let Some(n) = map.get(&(owner.to_owned(), agent.clone())) {
                n.notify_one();
            }
        }
    }

    fn wake_followers(&self, owner: &str, run_id: &str) {
        if let Some(n) = self
            .inner
            .followers
            .lock()
            .expect("followers lock")
            .get(&(owner.to_owned(), run_id.to_owned()))
        {
            n.notify_waiters();
        }
    }

    /// Stores a new run with its jobs (idempotent by run id) and indexes it for its owner.
    pub(crate) async fn create_run(
        &self,
        run: RunRecord,
        jobs: Vec<JobRecord>,
    ) -> Result<RunRecord, CiError> {
        let owner = run.owner.clone();
        let index_key = format!("r/{:016x}/{}", u64::MAX - run.created_at as u64, run.id);
        // The index entry first: a run is never missing from its owner's listing.
        self.inner
            .sub
            .actors()
            .call::<IndexActor>(
                &owner,
                IndexCall::Put(index_key, serde_json::json!({"id": run.id})),
            )
            .await?;
        let id = run.id.clone();
        match self
            .run_call(&owner, &id, RunCall::Create(Box::new(run), jobs))
            .await?
        {
            RunReply::Run(Some(run)) => Ok(*run),
            _ => Err(CiError::NotFound("run")),
        }
    }

    /// The owner's runs, newest first, at most `limit` (1–200), after the cursor `after` (a
    /// previous page's last `cursor`).
    ///
    /// Errors: [`CiError::Substrate`].
    pub async fn runs(
        &self,
        owner: Owner,
        limit: u32,
        after: &str,
    ) -> Result<Vec<(String, RunRecord)>, CiError> {
        let owner = owner.to_string();
        let refs: Vec<(String, RunRef)> = self
            .inner
            .sub
            .actor_scan(INDEX_ACTOR, &owner, "r/", after, limit.clamp(1, 200))
            .await?;
        let mut out = Vec::new();
        for (cursor, r) in refs {
            if let Some(run) = self
                .inner
                .sub
                .actor_read::<RunRecord>(RUN_ACTOR, &format!("{owner}/{}", r.id), "run")
                .await?
            {
                out.push((cursor, run));
            }
        }
        Ok(out)
    }

    /// A run with its jobs.
    ///
    /// Errors: [`CiError::NotFound`] for an unknown run or another owner's.
    pub async fn run(
        &self,
        owner: Owner,
        run_id: &str,
    ) -> Result<(RunRecord, Vec<JobRecord>), CiError> {
        let owner = owner.to_string();
        let key = format!("{owner}/{run_id}");
        let run: RunRecord = self
            .inner
            .sub
            .actor_read(RUN_ACTOR, &key, "run")
            .await?
            .ok_or(CiError::NotFound("run"))?;
        let mut jobs = Vec::new();
        for summary in &run.jobs {
            if let Some(job) = self
                .inner
                .sub
                .actor_read::<JobRecord>(RUN_ACTOR, &key, &format!("job/{}", summary.id))
                .await?
            {
                jobs.push(job);
            }
        }
        Ok((run, jobs))
    }

    /// Log chunks of a job after seq `after` (exclusive; `None` from the start), at most
    /// `limit`.
    ///
    /// Errors: [`CiError::NotFound`] for an unknown run or job.
    pub async fn logs(
        &self,
        owner: Owner,
        run_id: &str,
        job_id: &str,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<LogChunk>, CiError> {
        let owner = owner.to_string();
        let key = format!("{owner}/{run_id}");
        let run: Option<RunRecord> = self.inner.sub.actor_read(RUN_ACTOR, &key, "run").await?;
        if !run.is_some_and(|r| r.jobs.iter().any(|j| j.id == job_id)) {
            return Err(CiError::NotFound("job"));
        }
        let after = after
            .map(|s| format!("log/{job_id}/{s:010}"))
            .unwrap_or_default();
        Ok(self
            .inner
            .sub
            .actor_scan::<LogChunk>(
                RUN_ACTOR,
                &key,
                &format!("log/{job_id}/"),
                &after,
                limit.clamp(1, 1000),
            )
            .await?
            .into_iter()
            .map(|(_, c)| c)
            .collect())
    }

    /// Resolves when the run may have new logs or states (a change on this node, or at
    /// most `poll` later for changes made on other nodes).
    pub async fn changed(&self, owner: Owner, run_id: &str, poll: std::time::Duration) {
        let notify = self
            .inner
            .followers
            .lock()
            .expect("followers lock")
            .entry((owner.to_string(), run_id.to_owned()))
            .or_default()
            .clone();
        let _ = tokio::time::timeout(poll, notify.notified()).await;
    }

    /// Cancels a run: a first request is graceful (running jobs get `job.cancel`, then end
    /// `cancelled`), a second forces.
    ///
    /// Errors: [`CiError::NotFound`]; [`CiError::Conflict`] for a run that already ended.
    pub async fn cancel(
        &self,
        owner: Owner,
        run_id: &str,
        reason: &str,
    ) -> Result<RunRecord, CiError> {
        let (run, _) = self.run(owner, run_id).await?;
        if run.completed_at.is_some() {
            return Err(CiError::Conflict(format!(
                "run {run_id} already ended ({})",
                serde_json::to_value(run.status)
                    .unwrap_or_default()
                    .as_str()
                    .unwrap_or("")
            )));
        }
        self.cancel_key(&owner.to_string(), run_id, reason).await?;
        Ok(self.run(owner, run_id).await?.0)
    }

    async fn cancel_key(&self, owner: &str, run_id: &str, reason: &str) -> Result<(), CiError> {
        let RunReply::Stop(stop) = self
            .run_call(
                owner,
                run_id,
                RunCall::Cancel {
                    force: false,
                    reason: reason.to_owned(),
                },
            )
            .await?
        else {
            return Ok(());
        };
        let run: Option<RunRecord> = self
            .inner
            .sub
            .actor_read(RUN_ACTOR, &format!("{owner}/{run_id}"), "run")
            .await?;
        let queued: Vec<JobRef> = run
            .map(|r| {
                r.jobs
                    .iter()
                    .map(|j| JobRef {
                        run_id: run_id.to_owned(),
                        job_id: j.id.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let on_agents = stop
            .into_iter()
            .map(|(agent, job)| (agent, job, false))
            .collect();
        if let PoolReply::Woken(woken) = self
            .pool_call(owner, PoolCall::Cancel(on_agents, queued))
            .await?
        {
            self.wake_agents(owner, &woken);
        }
        self.wake_followers(owner, run_id);
        Ok(())
    }

    /// Runs a run's workflow again on the same commit, as a new run (`rerunOf` set).
    ///
    /// Errors: [`CiError::NotFound`]; [`CiError::Conflict`] for a run still going or one
    /// without a workflow (a corrupt lock).
    pub async fn rerun(&self, owner: Owner, run_id: &str) -> Result<RunRecord, CiError> {
        let (old, _) = self.run(owner, run_id).await?;
        if old.completed_at.is_none() {
            return Err(CiError::Conflict(format!(
                "run {run_id} has not ended; cancel it first"
            )));
        }
        if old.workflow_lock.is_null() {
            return Err(CiError::Conflict(format!(
                "run {run_id} has no workflow to run again ({})",
                old.failure_reason.clone().unwrap_or_default()
            )));
        }
        let workflow: kilocloud_kici::lock::LockWorkflow =
            serde_json::from_value(old.workflow_lock.clone())
                .map_err(|e| CiError::Conflict(format!("stored workflow unreadable: {e}")))?;
        let source = pipeline::RunSource {
            repo: old.repo.clone(),
            clone_url: old.clone_url.clone(),
            git_ref: old.git_ref.clone(),
            sha: old.sha.clone(),
            event: old.event.clone(),
            delivery: format!("rerun:{run_id}:{}", uuid::Uuid::new_v4()),
            installation_id: old.installation_id,
            rerun_of: Some(run_id.to_owned()),
        };
        self.start_run(owner, &workflow, &source, old.trace.clone())
            .await
    }

    /// Mints an agent token for `owner`, shown once, stored as its SHA-256.
    ///
    /// Errors: [`CiError::Invalid`] for an empty or over-long name.
    pub async fn create_agent_token(
        &self,
        owner: Owner,
        name: &str,
    ) -> Result<CreatedAgentToken, CiError> {
        if name.is_empty() || name.len() > 100 {
            return Err(CiError::Invalid("name must be 1–100 characters".into()));
        }
        let secret: [u8; 32] = rand::random();
        let token = format!("kat_{}", hex::encode(secret));
        let id = uuid::Uuid::now_v7().to_string();
        let record = AgentTokenRecord {
            owner: owner.to_string(),
            id: id.clone(),
            name: name.to_owned(),
            created_at: self.inner.sub.clock().now_ms(),
        };
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        self.inner
            .sub
            .actors()
            .call::<TokenActor>(&hash, Some(record.clone()))
            .await?;
        self.inner
            .sub
            .actors()
            .call::<IndexActor>(
                &owner.to_string(),
                IndexCall::Put(
                    format!("t/{id}"),
                    serde_json::json!({"hash": hash, "name": name}),
                ),
            )
            .await?;
        Ok(CreatedAgentToken {
            id,
            name: name.to_owned(),
            token,
        })
    }

    /// The owner an agent token works for, or `None` for an unknown token. The lookup is by
    /// the token's SHA-256, so no secret is compared byte by byte.
    ///
    /// Errors: [`CiError::Substrate`].
    pub async fn authenticate_agent(&self, token: &str) -> Result<Option<Owner>, CiError> {
        if !token.starts_with("kat_") {
            return Ok(None);
        }
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        let record: Option<AgentTokenRecord> = self
            .inner
            .sub
            .actor_read(TOKEN_ACTOR, &hash, "token")
            .await?;
        Ok(record.and_then(|r| r.owner.parse().ok()))
    }

    /// The owner's agents and waiting jobs.
    ///
    /// Errors: [`CiError::Substrate`].
    pub async fn pool(&self, owner: Owner) -> Result<(Vec<AgentRecord>, Vec<QueueEntry>), CiError> {
        match self
            .pool_call(&owner.to_string(), PoolCall::Snapshot)
            .await?
        {
            PoolReply::Snapshot { agents, queue } => Ok((agents, queue)),
            _ => Ok((Vec::new(), Vec::new())),
        }
    }

    /// Registers an agent's connection (its first frame, `agent.register`). Its running
    /// jobs it no longer has fail; those it has run on.
    ///
    /// Errors: [`CiError::Invalid`] for another first frame or a `kici:`-free label check
    /// failure; [`CiError::Substrate`].
    pub async fn register(
        &self,
        owner: Owner,
        first: FromAgent,
    ) -> Result<(AgentHandle, ToAgent), CiError> {
        let FromAgent::Register {
            agent_id,
            labels,
            max_concurrency,
            in_flight_jobs,
            hostname,
            version,
            protocol_version,
        } = first
        else {
            return Err(CiError::Invalid(
                "the first frame must be agent.register".into(),
            ));
        };
        if protocol_version != protocol::PROTOCOL_VERSION {
            return Err(CiError::Invalid(format!(
                "protocol version {protocol_version} is not spoken here (1)"
            )));
        }
        if agent_id.is_empty() || agent_id.len() > 128 || labels.len() > 100 {
            return Err(CiError::Invalid(
                "agentId must be 1–128 characters, labels at most 100".into(),
            ));
        }
        let owner_key = owner.to_string();
        let connection = uuid::Uuid::new_v4().to_string();
        let reply = self
            .pool_call(
                &owner_key,
                PoolCall::Register {
                    agent_id: agent_id.clone(),
                    labels: labels.clone(),
                    max_concurrency,
                    connection: connection.clone(),
                    node: self.inner.sub.node_id().to_owned(),
                    hostname,
                    version,
                    in_flight: in_flight_jobs,
                },
            )
            .await?;
        if let PoolReply::Registered { reclaimed, lost } = reply {
            for (run_id, jobs) in by_run(&reclaimed) {
                self.run_call(&owner_key, &run_id, RunCall::Reclaimed(jobs))
                    .await?;
            }
            for (run_id, jobs) in by_run(&lost) {
                self.run_call(
                    &owner_key,
                    &run_id,
                    RunCall::Lost(jobs, "the agent restarted without the job".into()),
                )
                .await?;
                self.wake_followers(&owner_key, &run_id);
            }
        }
        let wake = Arc::new(Notify::new());
        wake.notify_one();
        self.inner
            .agents
            .lock()
            .expect("agents lock")
            .insert((owner_key, agent_id.clone()), wake.clone());
        Ok((
            AgentHandle {
                owner,
                agent_id: agent_id.clone(),
                connection,
                wake,
            },
            ToAgent::RegisterAck { agent_id, labels },
        ))
    }

    /// What to send the agent now: dispatches of jobs the pool gave it (with a fresh clone
    /// token) and cancels.
    ///
    /// Errors: [`CiError::Substrate`].
    pub async fn take(&self, agent: &AgentHandle) -> Result<Vec<ToAgent>, CiError> {
        let owner = agent.owner.to_string();
        let PoolReply::Work(work) = self
            .pool_call(
                &owner,
                PoolCall::Take {
                    agent_id: agent.agent_id.clone(),
                    connection: agent.connection.clone(),
                },
            )
            .await?
        else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for job in work.jobs {
            let reply = self
                .run_call(
                    &owner,
                    &job.run_id,
                    RunCall::Assign {
                        job_id: job.job_id.clone(),
                        agent_id: agent.agent_id.clone(),
                    },
                )
                .await?;
            let RunReply::Dispatch(Some(dispatch)) = reply else {
                // Cancelled meanwhile: the slot is free again.
                self.pool_call(
                    &owner,
                    PoolCall::Finish {
                        agent_id: agent.agent_id.clone(),
                        job,
                        requeue: None,
                        refused: None,
                    },
                )
                .await?;
                continue;
            };
            let token = match (self.github(), dispatch.installation_id) {
                (Some(github), Some(id)) => match github.installation_token(id).await {
                    Ok(t) => Some(t.token),
                    Err(e) => {
                        tracing::warn!(error = %e, "no clone token; the agent clones without one");
                        None
                    }
                },
                _ => None,
            };
            out.push(ToAgent::JobDispatch {
                message_id: uuid::Uuid::new_v4().to_string(),
                job,
                repo_url: dispatch.clone_url,
                git_ref: dispatch.git_ref,
                sha: dispatch.sha,
                job_config: Box::new(dispatch.spec),
                token,
                max_log_size_bytes: self.inner.config.max_log_bytes,
            });
        }
        for (job, force) in work.cancels {
            out.push(ToAgent::JobCancel {
                job,
                reason: "the run was cancelled".into(),
                force,
            });
        }
        Ok(out)
    }

    /// Handles one frame of a registered agent.
    ///
    /// Errors: [`CiError::Invalid`] for a second `agent.register`; [`CiError::Substrate`].
    pub async fn agent_message(&self, agent: &AgentHandle, msg: FromAgent) -> Result<(), CiError> {
        let owner = agent.owner.to_string();
        match msg {
            FromAgent::Register { .. } => {
                return Err(CiError::Invalid(
                    "agent.register was already received".into(),
                ));
            }
            FromAgent::Heartbeat { .. } | FromAgent::JobAck { .. } => {}
            FromAgent::JobReject { job, reason } => {
                tracing::info!(agent = %agent.agent_id, %reason, "job rejected; requeued");
                // The job leaves the agent in its run and goes back to the queue's front.
                let ready = self.unassigned(&owner, &job).await?;
                if let PoolReply::Woken(w) = self
                    .pool_call(
                        &owner,
                        PoolCall::Finish {
                            agent_id: agent.agent_id.clone(),
                            job,
                            requeue: ready,
                            refused: Some(reason),
                        },
                    )
                    .await?
                {
                    self.wake_agents(&owner, &w);
                }
            }
            FromAgent::LogChunk {
                job,
                step_index,
                lines,
            } => {
                self.run_call(
                    &owner,
                    &job.run_id,
                    RunCall::Log {
                        job_id: job.job_id.clone(),
                        step_index,
                        lines,
                    },
                )
                .await?;
                self.wake_followers(&owner, &job.run_id);
            }
            FromAgent::JobStatus { ref job, state, .. } => {
                let job = job.clone();
                self.run_call(
                    &owner,
                    &job.run_id,
                    RunCall::Report(agent.agent_id.clone(), msg),
                )
                .await?;
                if state != protocol::ReportedJobState::Running {
                    if let PoolReply::Woken(w) = self
                        .pool_call(
                            &owner,
                            PoolCall::Finish {
                                agent_id: agent.agent_id.clone(),
                                job: job.clone(),
                                requeue: None,
                                refused: None,
                            },
                        )
                        .await?
                    {
                        self.wake_agents(&owner, &w);
                    }
                    agent.wake.notify_one();
                }
                self.wake_followers(&owner, &job.run_id);
            }
            FromAgent::StepStatus { ref job, .. } | FromAgent::JobHeartbeat { ref job } => {
                let run_id = job.run_id.clone();
                self.run_call(
                    &owner,
                    &run_id,
                    RunCall::Report(agent.agent_id.clone(), msg),
                )
                .await?;
                self.wake_followers(&owner, &run_id);
            }
        }
        Ok(())
    }

    /// A rejected job, made ready again in its run (its agent cleared).
    async fn unassigned(
        &self,
        owner: &str,
        job: &JobRef,
    ) -> Result<Option<run::ReadyJob>, CiError> {
        match self
            .run_call(owner, &job.run_id, RunCall::Unassign(job.job_id.clone()))
            .await?
        {
            RunReply::Ready(r) => Ok(r),
            _ => Ok(None),
        }
    }

    /// The agent's connection closed: its running jobs become `recovering` for the recovery
    /// window.
    ///
    /// Errors: [`CiError::Substrate`].
    pub async fn disconnect(&self, agent: &AgentHandle) -> Result<(), CiError> {
        let owner = agent.owner.to_string();
        {
            let mut map = self.inner.agents.lock().expect("agents lock");
            let key = (owner.clone(), agent.agent_id.clone());
            if map.get(&key).is_some_and(|n| Arc::ptr_eq(n, &agent.wake)) {
                map.remove(&key);
            }
        }
        let reply = self
            .pool_call(
                &owner,
                PoolCall::Disconnect {
                    agent_id: agent.agent_id.clone(),
                    connection: agent.connection.clone(),
                },
            )
            .await?;
        if let PoolReply::Disconnected(jobs) = reply {
            for (run_id, jobs) in by_run(&jobs) {
                self.run_call(&owner, &run_id, RunCall::Recovering(jobs))
                    .await?;
                self.wake_followers(&owner, &run_id);
            }
        }
        Ok(())
    }
}

fn by_run(jobs: &[JobRef]) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for j in jobs {
        out.entry(j.run_id.clone())
            .or_default()
            .push(j.job_id.clone());
    }
    out
}

/// Handles [`DISPATCH_QUEUE`].
struct DispatchConsumer(Ci);

#[async_trait::async_trait]
impl kilocloud_substrate::Consumer for DispatchConsumer {
    async fn handle(
        &self,
        delivery: &kilocloud_substrate::Delivery,
    ) -> kilocloud_substrate::Result<()> {
        let ci = &self.0;
        let msg: DispatchMessage = delivery.body()?;
        let result = match msg {
            DispatchMessage::Ready {
                owner,
                run_id,
                jobs,
            } => ci.enqueue(&owner, &run_id, jobs).await,
            DispatchMessage::Requeue { owner, job } => {
                ci.enqueue(&owner, &job.run_id, vec![job.job_id]).await
            }
            DispatchMessage::Lost {
                owner,
                jobs,
                reason,
            } => {
                let mut result = Ok(());
                for (run_id, jobs) in by_run(&jobs) {
                    result = result.and(
                        ci.run_call(&owner, &run_id, RunCall::Lost(jobs, reason.clone()))
                            .await
                            .map(|_| ()),
                    );
                    ci.wake_followers(&owner, &run_id);
                }
                result
            }
            DispatchMessage::Cancel {
                owner,
                run_id,
                reason,
            } => ci.cancel_key(&owner, &run_id, &reason).await,
            DispatchMessage::GroupLeft {
                owner,
                group,
                run_id,
            } => ci.leave_group(&owner, &group, &run_id).await,
            DispatchMessage::Stale {
                owner,
                agent_id,
                job,
            } => {
                let run_id = job.run_id.clone();
                let reply = ci
                    .pool_call(&owner, PoolCall::Stale { agent_id, job })
                    .await;
                if let Ok(PoolReply::Woken(w)) = &reply {
                    ci.wake_agents(&owner, w);
                }
                ci.wake_followers(&owner, &run_id);
                reply.map(|_| ())
            }
        };
        result.map_err(|e| match e {
            CiError::Substrate(e) => e,
            other => kilocloud_substrate::Error::Handler(other.to_string()),
        })
    }
}

impl Ci {
    /// A run of `group` ended: the next waiting run of the group starts.
    async fn leave_group(&self, owner: &str, group: &str, run_id: &str) -> Result<(), CiError> {
        let reply = self
            .inner
            .sub
            .actors()
            .call::<IndexActor>(
                owner,
                IndexCall::Leave {
                    group: group.to_owned(),
                    run_id: run_id.to_owned(),
                },
            )
            .await?;
        if let Some(next) = reply.next {
            self.run_call(owner, &next, RunCall::Release).await?;
        }
        Ok(())
    }

    /// Joins `run` to its workflow's concurrency group (before it is created): older runs
    /// are cancelled when the group cancels in progress, else `run` waits its turn.
    pub(crate) async fn join_group(
        &self,
        run: &mut RunRecord,
        cancel_in_progress: bool,
    ) -> Result<(), CiError> {
        let Some(group) = run.concurrency_group.clone() else {
            return Ok(());
        };
        let reply = self
            .inner
            .sub
            .actors()
            .call::<IndexActor>(
                &run.owner,
                IndexCall::Join {
                    group: group.clone(),
                    run_id: run.id.clone(),
                    cancel_in_progress,
                },
            )
            .await?;
        run.group_held = reply.wait;
        for old in reply.supersede {
            let reason = format!("superseded by run {} (concurrency group {group})", run.id);
            if let Err(e) = self.cancel_key(&run.owner, &old, &reason).await {
                tracing::warn!(run = %old, error = %e, "cannot cancel a superseded run");
            }
        }
        Ok(())
    }

    /// Queues a run's ready jobs in its owner's pool, wakes the agents given them and tells
    /// the run why the others wait.
    async fn enqueue(&self, owner: &str, run_id: &str, jobs: Vec<String>) -> Result<(), CiError> {
        let RunReply::ReadyJobs(ready) = self.run_call(owner, run_id, RunCall::Ready(jobs)).await?
        else {
            return Ok(());
        };
        if ready.is_empty() {
            return Ok(());
        }
        if let PoolReply::Enqueued { woken, waiting } =
            self.pool_call(owner, PoolCall::Enqueue(ready)).await?
        {
            self.wake_agents(owner, &woken);
            let reasons: Vec<(String, String)> = waiting
                .into_iter()
                .filter(|(j, _)| j.run_id == run_id)
                .map(|(j, r)| (j.job_id, r))
                .collect();
            if !reasons.is_empty() {
                self.run_call(owner, run_id, RunCall::Waiting(reasons))
                    .await?;
            }
        }
        Ok(())
    }
}

/// Calls of [`IndexActor`].
#[derive(Debug)]
pub(crate) enum IndexCall {
    Put(String, serde_json::Value),
    /// A run joins a concurrency group: replies (older runs to cancel, whether it waits).
    Join {
        group: String,
        run_id: String,
        cancel_in_progress: bool,
    },
    /// A run left its group: replies the run that may start now.
    Leave {
        group: String,
        run_id: String,
    },
}

/// Replies of [`IndexActor`].
#[derive(Debug, Default)]
pub(crate) struct IndexReply {
    supersede: Vec<String>,
    wait: bool,
    next: Option<String>,
}

/// An owner's run index (`r/<inverted created ms>/<run id>`) and agent tokens (`t/<id>`).
pub(crate) struct IndexActor;

impl kilocloud_substrate::Actor for IndexActor {
    const TYPE: &'static str = INDEX_ACTOR;
    type Call = IndexCall;
    type Reply = IndexReply;

    async fn call(
        &self,
        ctx: &mut kilocloud_substrate::ActorContext,
        call: IndexCall,
    ) -> kilocloud_substrate::Result<IndexReply> {
        match call {
            IndexCall::Put(key, value) => {
                ctx.put(&key, &value)?;
                Ok(IndexReply::default())
            }
            IndexCall::Join {
                group,
                run_id,
                cancel_in_progress,
            } => {
                // `g/<group>`: the group's runs in arrival order; the first one may run.
                let key = format!("g/{group}");
                let mut runs: Vec<String> = ctx.get(&key).await?.unwrap_or_default();
                if runs.contains(&run_id) {
                    return Ok(IndexReply {
                        wait: runs.first() != Some(&run_id),
                        ..IndexReply::default()
                    });
                }
                let reply = if cancel_in_progress {
                    IndexReply {
                        supersede: std::mem::take(&mut runs),
                        ..IndexReply::default()
                    }
                } else {
                    IndexReply {
                        wait: !runs.is_empty(),
                        ..IndexReply::default()
                    }
                };
                runs.push(run_id);
                ctx.put(&key, &runs)?;
                Ok(reply)
            }
            IndexCall::Leave { group, run_id } => {
                let key = format!("g/{group}");
                let mut runs: Vec<String> = ctx.get(&key).await?.unwrap_or_default();
                let was_first = runs.first() == Some(&run_id);
                runs.retain(|r| r != &run_id);
                let next = if was_first {
                    runs.first().cloned()
                } else {
                    None
                };
                if runs.is_empty() {
                    ctx.delete(&key);
                } else {
                    ctx.put(&key, &runs)?;
                }
                Ok(IndexReply {
                    next,
                    ..IndexReply::default()
                })
            }
        }
    }
}

/// One agent token, keyed by its SHA-256 (`token`: [`AgentTokenRecord`]); `None` revokes.
struct TokenActor;

impl kilocloud_substrate::Actor for TokenActor {
    const TYPE: &'static str = TOKEN_ACTOR;
    type Call = Option<AgentTokenRecord>;
    type Reply = ();

    async fn call(
        &self,
        ctx: &mut kilocloud_substrate::ActorContext,
        call: Option<AgentTokenRecord>,
    ) -> kilocloud_substrate::Result<()> {
        match call {
            Some(record) => ctx.put("token", &record),
            None => {
                ctx.delete_all();
                Ok(())
            }
        }
    }
}
