//! The webhook pipeline (reference `kici.md` §7.3). Automation's GitHub ingress has already
//! verified the signature and claimed the delivery id (24 h dedup) when it hands a delivery
//! to [`Ci`] as a [`DeliverySink`]; CI queues it on `kici-webhooks` and answers at once. The
//! consumer then: normalises the event (14 GitHub event types, others ignored); reads the
//! lock file at the event's ref through the contents API, with an LRU cache keyed
//! `github:<repo>:<ref>` (500 entries, 1 h; a missing or corrupt lock is never cached);
//! fills changed files from the push payload only when a trigger has path filters; matches
//! each workflow (first matching trigger wins, with the decision trace); and creates one run
//! per matched workflow. Run ids derive from the delivery and workflow, so a redelivered
//! queue message creates nothing twice. A corrupt lock file is recorded as a failed run
//! (`lockfile_corrupt: …`) so it is visible, not silently dropped.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use kilocloud_automation::webhook::{DeliverySink, InboundDelivery};
use kilocloud_identity::Owner;
use kilocloud_kici::lock::LockWorkflow;
use kilocloud_kici::{LockFile, RunStatus, decide, normalize, parse_lock_file};
use kilocloud_substrate::{Consumer, Delivery, UnixMs};
use lru::LruCache;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::run::{self, RunRecord};
use crate::{Ci, CiError, WEBHOOK_QUEUE};

/// Where the lock file lives in a repository.
pub const LOCK_PATH: &str = ".kici/kici.lock.json";

/// Namespace of run ids derived from deliveries (UUID v5).
const RUN_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b69_6369_2d72_756e_2d69_642d_7631_0000);

/// Cached lock files by `provider:repo:ref`, with their fetch time.
pub(crate) struct LockCache {
    entries: Mutex<LruCache<String, (Arc<LockFile>, UnixMs)>>,
    ttl_ms: u64,
}

impl LockCache {
    pub(crate) fn new(capacity: usize, ttl_ms: u64) -> Self {
        Self {
            entries: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity.max(1)).expect("at least one"),
            )),
            ttl_ms,
        }
    }

    fn get(&self, key: &str, now: UnixMs) -> Option<Arc<LockFile>> {
        let mut entries = self.entries.lock().expect("lock cache");
        match entries.get(key) {
            Some((lock, at)) if now - *at < self.ttl_ms as i64 => Some(lock.clone()),
            Some(_) => {
                entries.pop(key);
                None
            }
            None => None,
        }
    }

    fn put(&self, key: String, lock: Arc<LockFile>, now: UnixMs) {
        self.entries
            .lock()
            .expect("lock cache")
            .put(key, (lock, now));
    }
}

/// A message of [`WEBHOOK_QUEUE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WebhookMessage {
    delivery: String,
    event: String,
    owner: String,
    installation_id: u64,
    payload: Value,
}

/// What reading the lock file found.
pub(crate) enum Lock {
    Found(Arc<LockFile>),
    Missing,
    Corrupt(String),
}

#[async_trait::async_trait]
impl DeliverySink for Ci {
    async fn deliver(&self, d: &InboundDelivery) -> Result<Option<String>, String> {
        if normalize(&d.event, &d.payload).is_none() {
            return Ok(None);
        }
        let msg = WebhookMessage {
            delivery: d.delivery.clone(),
            event: d.event.clone(),
            owner: d.owner.to_string(),
            installation_id: d.installation_id,
            payload: d.payload.clone(),
        };
        self.sub()
            .queues()
            .send(WEBHOOK_QUEUE, &msg, 0)
            .await
            .map_err(|e| format!("ci: cannot queue the delivery: {e}"))?;
        Ok(Some("ci: queued".into()))
    }
}

/// Handles [`WEBHOOK_QUEUE`].
pub(crate) struct WebhookConsumer(pub(crate) Ci);

#[async_trait::async_trait]
impl Consumer for WebhookConsumer {
    async fn handle(&self, delivery: &Delivery) -> kilocloud_substrate::Result<()> {
        let msg: WebhookMessage = delivery.body()?;
        match self.0.process(&msg).await {
            Ok(outcome) => {
                tracing::info!(delivery = %msg.delivery, event = %msg.event, %outcome, "ci webhook");
                Ok(())
            }
            Err(e) => Err(match e {
                CiError::Substrate(e) => e,
                other => kilocloud_substrate::Error::Handler(other.to_string()),
            }),
        }
    }
}

impl Ci {
    pub(crate) async fn read_lock(
        &self,
        installation_id: u64,
        repo: &str,
        git_ref: &str,
    ) -> Result<Lock, CiError> {
        let github = self.github().ok_or(CiError::Disabled(
            "the GitHub App is not configured (github.app_id)",
        ))?;
        let key = format!("github:{repo}:{git_ref}");
        let now = self.sub().clock().now_ms();
        if let Some(lock) = self.inner.locks.get(&key, now) {
            metrics::counter!("kilocloud_ci_lock_cache_total", "outcome" => "hit").increment(1);
            return Ok(Lock::Found(lock));
        }
        metrics::counter!("kilocloud_ci_lock_cache_total", "outcome" => "miss").increment(1);
        let transient = |e: kilocloud_automation::GitHubError| {
            kilocloud_substrate::Error::Handler(format!("reading {LOCK_PATH}: {e}"))
        };
        let token = github
            .installation_token(installation_id)
            .await
            .map_err(transient)?;
        let Some(text) = github
            .file_contents(&token, repo, LOCK_PATH, git_ref)
            .await
            .map_err(transient)?
        else {
            return Ok(Lock::Missing);
        };
        match parse_lock_file(text.as_bytes()) {
            Ok(lock) => {
                let lock = Arc::new(lock);
                self.inner.locks.put(key, lock.clone(), now);
                Ok(Lock::Found(lock))
            }
            Err(e) => Ok(Lock::Corrupt(e.to_string())),
        }
    }

    /// The files a pull request changes, through the API (fetched only when a trigger has
    /// path filters).
    async fn pull_changed_files(
        &self,
        installation_id: u64,
        repo: &str,
        payload: &Value,
    ) -> Result<Vec<String>, CiError> {
        let github = self.github().ok_or(CiError::Disabled(
            "the GitHub App is not configured (github.app_id)",
        ))?;
        let number = payload["pull_request"]["number"]
            .as_u64()
            .or_else(|| payload["number"].as_u64())
            .unwrap_or(0);
        let fail = |e: kilocloud_automation::GitHubError| {
            kilocloud_substrate::Error::Handler(format!("changed files of #{number}: {e}"))
        };
        let token = github
            .installation_token(installation_id)
            .await
            .map_err(fail)?;
        Ok(github
            .pull_files(&token, repo, number)
            .await
            .map_err(fail)?)
    }

    /// Runs the pipeline for one delivery (what the `kici-webhooks` consumer does): one run
    /// per matched workflow; returns the outcome (`runs …`, `no workflow matched`,
    /// `lockfile_missing: …`, `lockfile_corrupt: …`, `ignored: …`). Idempotent per delivery.
    ///
    /// Errors: [`CiError::Disabled`] without a GitHub App; [`CiError::Substrate`] (GitHub
    /// failures too, as handler errors the queue retries).
    pub async fn process_delivery(&self, d: &InboundDelivery) -> Result<String, CiError> {
        self.process(&WebhookMessage {
            delivery: d.delivery.clone(),
            event: d.event.clone(),
            owner: d.owner.to_string(),
            installation_id: d.installation_id,
            payload: d.payload.clone(),
        })
        .await
    }

    async fn process(&self, msg: &WebhookMessage) -> Result<String, CiError> {
        let Some(n) = normalize(&msg.event, &msg.payload) else {
            return Ok(format!("ignored: {} is not a KiCI event", msg.event));
        };
        let owner: Owner = msg
            .owner
            .parse()
            .map_err(|_| CiError::Invalid(format!("bad owner {:?}", msg.owner)))?;
        let repo = msg.payload["repository"]["full_name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if repo.is_empty() {
            return Ok("ignored: no repository in the payload".into());
        }
        let installation_id = n.installation_id.unwrap_or(msg.installation_id);
        let git_ref = match msg.event.as_str() {
            "push" | "create" | "delete" => {
                msg.payload["ref"].as_str().unwrap_or_default().to_owned()
            }
            "pull_request" | "pull_request_review" | "pull_request_review_comment" => format!(
                "refs/pull/{}/head",
                msg.payload["pull_request"]["number"].as_u64().unwrap_or(0)
            ),
            _ => n
                .event
                .target_branch
                .clone()
                .map(|b| format!("refs/heads/{b}"))
                .unwrap_or_default(),
        };
        let source = RunSource {
            clone_url: msg.payload["repository"]["clone_url"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("https://github.com/{repo}.git")),
            repo: repo.clone(),
            git_ref,
            sha: n.lock_ref.clone(),
            event: n.event.kind.clone(),
            delivery: msg.delivery.clone(),
            installation_id: Some(installation_id),
            rerun_of: None,
        };
        let lock = match self.read_lock(installation_id, &repo, &n.lock_ref).await? {
            Lock::Found(lock) => lock,
            Lock::Missing => {
                return Ok(format!(
                    "lockfile_missing: no {LOCK_PATH} at {}",
                    n.lock_ref
                ));
            }
            Lock::Corrupt(reason) => {
                let run = self
                    .record_failed_run(
                        owner,
                        &source,
                        "(lock file)",
                        format!("lockfile_corrupt: {reason}"),
                    )
                    .await?;
                return Ok(format!("lockfile_corrupt: run {} records it", run.id));
            }
        };
        let mut event = n.event.clone();
        event.source_repo = Some(repo.clone());
        let wants_files = lock
            .workflows
            .iter()
            .flat_map(|w| &w.triggers)
            .any(|t| t["paths"].as_array().is_some_and(|p| !p.is_empty()));
        if wants_files {
            event.changed_files = match event.kind.as_str() {
                "push" => Some(push_changed_files(&msg.payload)),
                "pull_request" => Some(
                    self.pull_changed_files(installation_id, &repo, &msg.payload)
                        .await?,
                ),
                _ => None,
            };
        }
        let mut created = Vec::new();
        for workflow in &lock.workflows {
            let decision = decide(&workflow.triggers, &event);
            if decision.matched.is_none() {
                continue;
            }
            let run = self
                .start_run(owner, workflow, &source, json!(decision.trace))
                .await?;
            created.push(run.id);
        }
        Ok(if created.is_empty() {
            "no workflow matched".into()
        } else {
            format!("runs {}", created.join(", "))
        })
    }

    /// The run id of `workflow` for `source`: derived from the owner, the delivery and the
    /// workflow (UUID v5), so a redelivered message finds the run it created.
    fn run_id(owner: Owner, source: &RunSource, workflow: &str) -> String {
        uuid::Uuid::new_v5(
            &RUN_NAMESPACE,
            format!("{owner}/{}/{workflow}", source.delivery).as_bytes(),
        )
        .to_string()
    }

    fn run_record(&self, owner: Owner, source: &RunSource, workflow: &str) -> RunRecord {
        RunRecord {
            id: Self::run_id(owner, source, workflow),
            owner: owner.to_string(),
            workflow: workflow.to_owned(),
            repo: source.repo.clone(),
            provider: "github".into(),
            git_ref: source.git_ref.clone(),
            sha: source.sha.clone(),
            event: source.event.clone(),
            delivery: source.delivery.clone(),
            installation_id: source.installation_id,
            clone_url: source.clone_url.clone(),
            status: RunStatus::Pending,
            created_at: self.sub().clock().now_ms(),
            started_at: None,
            completed_at: None,
            failure_reason: None,
            trace: Value::Null,
            timeout_ms: None,
            rerun_of: source.rerun_of.clone(),
            cancel_requested: false,
            workflow_lock: Value::Null,
            concurrency_group: None,
            group_held: false,
            jobs: Vec::new(),
        }
    }

    /// Records a run that failed before any job (a corrupt lock file), so it is visible.
    pub(crate) async fn record_failed_run(
        &self,
        owner: Owner,
        source: &RunSource,
        workflow: &str,
        reason: String,
    ) -> Result<RunRecord, CiError> {
        let mut run = self.run_record(owner, source, workflow);
        run.status = RunStatus::Failed;
        run.completed_at = Some(run.created_at);
        run.failure_reason = Some(reason);
        self.create_run(run, Vec::new()).await
    }

    /// Starts a run of `workflow` (a lock file's) on `source`: its jobs planned (matrices
    /// expanded), root jobs queued. A workflow that cannot be planned (a dynamic job, a
    /// matrix over the limit) is a failed run saying why. Idempotent per (owner, delivery,
    /// workflow).
    ///
    /// Errors: [`CiError::Substrate`].
    pub async fn start_run(
        &self,
        owner: Owner,
        workflow: &LockWorkflow,
        source: &RunSource,
        trace: Value,
    ) -> Result<RunRecord, CiError> {
        let mut run = RunRecord {
            trace,
            timeout_ms: workflow.timeout,
            workflow_lock: serde_json::to_value(workflow).unwrap_or_default(),
            ..self.run_record(owner, source, &workflow.name)
        };
        let concurrency = workflow.extra.get("concurrency");
        if let Some(group) = concurrency.and_then(|c| c["group"].as_str()) {
            run.concurrency_group = Some(run::render(group, workflow, &run));
        }
        match run::plan_jobs(workflow, &run) {
            Ok(mut jobs) => {
                run.jobs = run::summaries(workflow, &jobs);
                let cancel_in_progress = concurrency
                    .and_then(|c| c["cancelInProgress"].as_bool())
                    .unwrap_or(true);
                self.join_group(&mut run, cancel_in_progress).await?;
                if run.group_held {
                    let group = run.concurrency_group.clone().unwrap_or_default();
                    for job in &mut jobs {
                        job.waiting_reason = Some(format!(
                            "waiting for an earlier run of concurrency group {group} to end"
                        ));
                    }
                }
                self.create_run(run, jobs).await
            }
            Err(reason) => {
                run.status = RunStatus::Failed;
                run.completed_at = Some(run.created_at);
                run.failure_reason = Some(format!("matrix_expansion: {reason}"));
                self.create_run(run, Vec::new()).await
            }
        }
    }
}

/// Where a run's code comes from and what started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSource {
    /// `owner/name`.
    pub repo: String,
    /// Clone URL.
    pub clone_url: String,
    /// The ref (`refs/heads/main`).
    pub git_ref: String,
    /// The commit.
    pub sha: String,
    /// The normalised event type.
    pub event: String,
    /// The delivery id (part of the run id).
    pub delivery: String,
    /// The installation for tokens and check runs.
    pub installation_id: Option<u64>,
    /// The run this one re-runs.
    pub rerun_of: Option<String>,
}

/// The files a push changed, from its payload's commits (`added`, `modified`, `removed`;
/// GitHub lists at most 20 commits there, the documented limit).
fn push_changed_files(payload: &Value) -> Vec<String> {
    let mut files: Vec<String> = payload["commits"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| {
            ["added", "modified", "removed"]
                .into_iter()
                .flat_map(move |k| c[k].as_array().into_iter().flatten())
        })
        .filter_map(|f| f.as_str().map(str::to_owned))
        .collect();
    files.sort();
    files.dedup();
    files
}
