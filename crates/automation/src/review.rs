//! Code review of pull requests (reference §5).
//!
//! A `pull_request` event (`opened`, `synchronize`, `reopened`, `ready_for_review`; drafts
//! skipped unless configured) from a claimed installation becomes a review record in the
//! owner's actor `review_owner` (key `user:<id>` / `org:<id>`), which is the authority for
//! every review of the owner: statuses, the order of waiting reviews and the concurrency
//! slots (default 20 queued or running; the rest wait, oldest first). A newer push supersedes
//! a waiting or running review of the same pull request; closing the pull request cancels it.
//!
//! A review given a slot is sent to the queue `review-dispatch`; its consumer starts the
//! review's orchestrator actor `review` (key `<owner>/<reviewId>`), whose alarm fails the
//! review if it is not done within 20 minutes, fetches the diff with an installation token,
//! and prepares and initiates a Cloud Agent session in `ask` mode (read-only) on the pull
//! request's head branch, with the diff, the repository's own instructions and the owner's.
//! The session's completion notice arrives on `review-completions`: the agent's findings are
//! placed on the diff's lines ([`crate::findings`]) and posted as one GitHub review; then the
//! record turns terminal and the owner's next waiting review takes the slot. Terminal records
//! are removed after 7 days.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use globset::{Glob, GlobSet, GlobSetBuilder};
use kilocloud_agent::session::Mode;
use kilocloud_agent::{AgentError, CompletionMessage, CompletionNotice, PrepareRequest};
use kilocloud_identity::Owner;
use kilocloud_substrate::{
    Actor, ActorContext, AlarmInfo, Consumer, Delivery, QueueConfig, Result, Substrate,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::findings::{DiffLines, build_review, filter_diff, parse_findings};
use crate::{Automation, AutomationError, AutomationRefusal, Inner, upgrade};

/// Actor type of an owner's reviews and settings.
pub const OWNER_ACTOR: &str = "review_owner";
/// Actor type of one review's orchestrator.
pub const REVIEW_ACTOR: &str = "review";
/// Queue of reviews given a slot.
pub const DISPATCH_QUEUE: &str = "review-dispatch";
/// Queue of finished review sessions.
pub const COMPLETION_QUEUE: &str = "review-completions";
/// How soon a timed-out review whose failure could not be recorded is tried again, ms.
pub const TIMEOUT_RETRY_MS: i64 = 60_000;
/// Deliveries of a dispatch or completion before the review is failed.
pub const MAX_ATTEMPTS: u32 = 3;

/// Settings of code review (`review.*` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReviewConfig {
    /// Reviews queued or running at once per owner, unless the owner sets fewer or more.
    /// Default 20 (reference §5).
    pub max_concurrent: u32,
    /// A review not done after this long fails, ms. Default 1,200,000 (20 min).
    pub timeout_ms: u64,
    /// Terminal reviews are removed after this long, ms. Default 604,800,000 (7 days).
    pub retention_ms: u64,
    /// Most bytes of diff put in the agent's prompt. Default 200,000.
    pub max_diff_bytes: usize,
    /// Model when the owner sets none; empty uses `agent.default_model`.
    pub default_model: String,
}

impl Default for ReviewConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 20,
            timeout_ms: 20 * 60_000,
            retention_ms: 7 * 24 * 3_600_000,
            max_diff_bytes: 200_000,
            default_model: String::new(),
        }
    }
}

/// An owner's review settings (`PUT /api/review/settings`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ReviewSettings {
    /// Review pull requests at all. Default true.
    pub enabled: bool,
    /// Repositories (`owner/name`) to review; empty means every repository of the owner's
    /// installations.
    pub repositories: Vec<String>,
    /// Model; default `review.default_model`.
    pub model: Option<String>,
    /// Extra instructions for the reviewer (at most 10,000 characters).
    pub instructions: String,
    /// Skip draft pull requests (review them when marked ready). Default true.
    pub skip_drafts: bool,
    /// Glob patterns of paths left out of the review (`vendor/**`, `*.lock`).
    pub ignore_paths: Vec<String>,
    /// Reviews queued or running at once (1–100); default `review.max_concurrent`.
    pub max_concurrent: Option<u32>,
}

impl Default for ReviewSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            repositories: Vec::new(),
            model: None,
            instructions: String::new(),
            skip_drafts: true,
            ignore_paths: Vec::new(),
            max_concurrent: None,
        }
    }
}

impl ReviewSettings {
    /// Checks the settings.
    ///
    /// Errors: a message naming the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for r in &self.repositories {
            if r.split('/').count() != 2 || r.split('/').any(str::is_empty) {
                return Err(format!("repositories: {r:?} is not owner/name"));
            }
        }
        if self.instructions.chars().count() > 10_000 {
            return Err("instructions: at most 10,000 characters".into());
        }
        if let Some(n) = self.max_concurrent
            && !(1..=100).contains(&n)
        {
            return Err("maxConcurrent: between 1 and 100".into());
        }
        if self.model.as_deref().is_some_and(str::is_empty) {
            return Err("model: must not be empty (omit it for the default)".into());
        }
        self.ignore_set().map(|_| ())
    }

    /// The compiled `ignore_paths`.
    ///
    /// Errors: a message naming the bad pattern.
    pub fn ignore_set(&self) -> std::result::Result<GlobSet, String> {
        let mut b = GlobSetBuilder::new();
        for p in &self.ignore_paths {
            b.add(Glob::new(p).map_err(|e| format!("ignorePaths: {p:?}: {e}"))?);
        }
        b.build().map_err(|e| format!("ignorePaths: {e}"))
    }

    fn covers(&self, repo: &str) -> bool {
        self.repositories.is_empty()
            || self
                .repositories
                .iter()
                .any(|r| r.eq_ignore_ascii_case(repo))
    }
}

/// Where a review is (reference §5 statuses, plus `superseded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReviewStatus {
    /// Waiting for a slot.
    Pending,
    /// Has a slot; its session is being prepared.
    Queued,
    /// Its session runs.
    Running,
    /// Posted on the pull request.
    Completed,
    /// Failed; `error` says why.
    Failed,
    /// Cancelled (the pull request was closed).
    Cancelled,
    /// A newer push to the pull request replaced it.
    Superseded,
}

impl ReviewStatus {
    /// Completed, failed, cancelled or superseded.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            ReviewStatus::Pending | ReviewStatus::Queued | ReviewStatus::Running
        )
    }

    fn holds_slot(self) -> bool {
        matches!(self, ReviewStatus::Queued | ReviewStatus::Running)
    }
}

/// One review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReviewRecord {
    /// `rev_<uuid>`.
    pub id: String,
    /// `user:<id>` / `org:<id>`.
    pub owner: String,
    /// The user the review acts as (who claimed the installation).
    pub acting_user: Uuid,
    /// The GitHub App installation.
    pub installation_id: u64,
    /// `owner/name`.
    pub repo: String,
    /// Pull request number.
    pub number: u64,
    /// Pull request title.
    pub title: String,
    /// Head commit reviewed.
    pub head_sha: String,
    /// Head branch.
    pub head_ref: String,
    /// Base branch.
    pub base_ref: String,
    /// Status.
    pub status: ReviewStatus,
    /// The Cloud Agent session, once prepared.
    pub session_id: Option<String>,
    /// Why it failed, was cancelled or superseded.
    pub error: Option<String>,
    /// The posted review's page.
    pub review_url: Option<String>,
    /// Inline comments posted.
    pub comments_posted: u32,
    /// Creation, ms.
    pub created_at: i64,
    /// Last change, ms.
    pub updated_at: i64,
}

/// A `pull_request` event, the fields review needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequestEvent {
    /// The event's action.
    pub action: String,
    /// The installation.
    pub installation_id: u64,
    /// `owner/name` of the base repository.
    pub repo: String,
    /// Number.
    pub number: u64,
    /// Title.
    pub title: String,
    /// Draft.
    pub draft: bool,
    /// Head commit.
    pub head_sha: String,
    /// Head branch.
    pub head_ref: String,
    /// Base branch.
    pub base_ref: String,
    /// The head's repository, when GitHub names it (another one for a fork).
    pub head_repo: Option<String>,
}

impl PullRequestEvent {
    /// Reads the fields from a `pull_request` payload; `None` when one is missing.
    pub fn parse(action: &str, installation_id: u64, payload: &Value) -> Option<Self> {
        let pr = &payload["pull_request"];
        Some(Self {
            action: action.to_owned(),
            installation_id,
            repo: payload["repository"]["full_name"].as_str()?.to_owned(),
            number: payload["number"]
                .as_u64()
                .or_else(|| pr["number"].as_u64())?,
            title: pr["title"].as_str().unwrap_or_default().to_owned(),
            draft: pr["draft"].as_bool().unwrap_or(false),
            head_sha: pr["head"]["sha"].as_str()?.to_owned(),
            head_ref: pr["head"]["ref"].as_str()?.to_owned(),
            base_ref: pr["base"]["ref"].as_str().unwrap_or_default().to_owned(),
            head_repo: pr["head"]["repo"]["full_name"].as_str().map(str::to_owned),
        })
    }
}

/// Calls of [`ReviewOwnerActor`].
#[derive(Debug)]
pub enum OwnerCall {
    /// The settings.
    Settings,
    /// One review, read in turn with the calls on the owner (so after the call that queued
    /// it has committed).
    Get(String),
    /// Replaces the settings (with the configured default of slots).
    PutSettings(ReviewSettings, u32),
    /// A new review; supersedes the pull request's earlier one unless it is for the same
    /// head commit (then nothing happens).
    Submit {
        /// The review, `pending`.
        record: Box<ReviewRecord>,
        /// The configured default of slots.
        default_slots: u32,
    },
    /// Moves a review on. Ignored once the review is terminal.
    Update {
        /// Review id.
        id: String,
        /// New status.
        status: ReviewStatus,
        /// The session, when known.
        session_id: Option<String>,
        /// Why, for failures.
        error: Option<String>,
        /// The posted review's page.
        review_url: Option<String>,
        /// Inline comments posted.
        comments_posted: u32,
        /// The configured default of slots.
        default_slots: u32,
    },
    /// Cancels the pull request's review (it was closed).
    CancelPull {
        /// `owner/name`.
        repo: String,
        /// Number.
        number: u64,
        /// The configured default of slots.
        default_slots: u32,
    },
}

/// What a call of [`ReviewOwnerActor`] changed.
#[derive(Debug, Default)]
pub struct OwnerReply {
    /// The review the call was about, as it is now.
    pub record: Option<ReviewRecord>,
    /// Reviews that lost their slot or place in line (superseded or cancelled): interrupt
    /// their sessions.
    pub stopped: Vec<ReviewRecord>,
    /// The settings (for `Settings` and `PutSettings`).
    pub settings: Option<ReviewSettings>,
}

/// An owner's reviews, waiting line and slots (see the module docs). Storage: `settings`,
/// `rev/<id>` records, `wait/<seq>` → id in arrival order, `slot/<id>` for each review
/// holding a slot, `pr/<repo>#<number>` → the pull request's latest review.
pub struct ReviewOwnerActor {
    retention_ms: i64,
    sub: Substrate,
}

impl ReviewOwnerActor {
    async fn settings(ctx: &mut ActorContext) -> Result<ReviewSettings> {
        Ok(ctx.get("settings").await?.unwrap_or_default())
    }

    /// Ends `record` with `status` (freeing its slot or its place in line).
    async fn end(
        ctx: &mut ActorContext,
        record: &mut ReviewRecord,
        status: ReviewStatus,
        error: Option<String>,
    ) -> Result<()> {
        record.status = status;
        record.error = error;
        record.updated_at = ctx.now_ms();
        ctx.delete(&format!("slot/{}", record.id));
        for (key, id) in ctx.list::<String>("wait/").await? {
            if id == record.id {
                ctx.delete(&key);
            }
        }
        ctx.put(&format!("rev/{}", record.id), record)
    }

    /// Gives free slots to waiting reviews, oldest first, and sends each to the dispatch
    /// queue before the call commits (an outbox: if the commit then fails, the dispatch finds
    /// the review not queued and drops the message; sent after, a failure in between would
    /// leave a slot held by a review nobody starts).
    async fn fill(&self, ctx: &mut ActorContext, default_slots: u32) -> Result<()> {
        let settings = Self::settings(ctx).await?;
        let limit = settings.max_concurrent.unwrap_or(default_slots).max(1) as usize;
        let mut held = ctx.list::<bool>("slot/").await?.len();
        for (key, id) in ctx.list::<String>("wait/").await? {
            if held >= limit {
                break;
            }
            ctx.delete(&key);
            let Some(mut record) = ctx.get::<ReviewRecord>(&format!("rev/{id}")).await? else {
                continue;
            };
            if record.status != ReviewStatus::Pending {
                continue;
            }
            record.status = ReviewStatus::Queued;
            record.updated_at = ctx.now_ms();
            ctx.put(&format!("rev/{id}"), &record)?;
            ctx.put(&format!("slot/{id}"), &true)?;
            held += 1;
            let msg = DispatchMessage {
                owner: ctx.key().to_owned(),
                id,
            };
            self.sub.queues().send(DISPATCH_QUEUE, &msg, 0).await?;
        }
        Ok(())
    }

    fn arm_cleanup(&self, ctx: &mut ActorContext) {
        // Daily pass; terminal records older than the retention go.
        ctx.set_alarm(ctx.now_ms() + (self.retention_ms / 7).max(60_000));
    }
}

impl Actor for ReviewOwnerActor {
    const TYPE: &'static str = OWNER_ACTOR;
    type Call = OwnerCall;
    type Reply = std::result::Result<OwnerReply, AutomationRefusal>;

    async fn call(&self, ctx: &mut ActorContext, call: OwnerCall) -> Result<Self::Reply> {
        let mut reply = OwnerReply::default();
        match call {
            OwnerCall::Settings => reply.settings = Some(Self::settings(ctx).await?),
            OwnerCall::Get(id) => reply.record = ctx.get(&format!("rev/{id}")).await?,
            OwnerCall::PutSettings(settings, default_slots) => {
                ctx.put("settings", &settings)?;
                // More slots take effect at once.
                self.fill(ctx, default_slots).await?;
                reply.settings = Some(settings);
            }
            OwnerCall::Submit {
                record,
                default_slots,
            } => {
                let pr_key = format!("pr/{}#{}", record.repo, record.number);
                if let Some(prev_id) = ctx.get::<String>(&pr_key).await?
                    && let Some(mut prev) =
                        ctx.get::<ReviewRecord>(&format!("rev/{prev_id}")).await?
                    && !prev.status.is_terminal()
                {
                    if prev.head_sha == record.head_sha {
                        reply.record = Some(prev);
                        return Ok(Ok(reply));
                    }
                    let msg = format!("superseded by a push of {}", record.head_sha);
                    Self::end(ctx, &mut prev, ReviewStatus::Superseded, Some(msg)).await?;
                    reply.stopped.push(prev);
                }
                let seq: u64 = ctx.get("next_seq").await?.unwrap_or(1);
                ctx.put("next_seq", &(seq + 1))?;
                ctx.put(&format!("wait/{seq:020}"), &record.id)?;
                ctx.put(&format!("rev/{}", record.id), &record)?;
                ctx.put(&pr_key, &record.id)?;
                if ctx.alarm().await?.is_none() {
                    self.arm_cleanup(ctx);
                }
                self.fill(ctx, default_slots).await?;
                reply.record = ctx.get(&format!("rev/{}", record.id)).await?;
            }
            OwnerCall::Update {
                id,
                status,
                session_id,
                error,
                review_url,
                comments_posted,
                default_slots,
            } => {
                let Some(mut record) = ctx.get::<ReviewRecord>(&format!("rev/{id}")).await? else {
                    return Ok(Err(AutomationRefusal::NotFound));
                };
                if record.status.is_terminal() {
                    reply.record = Some(record);
                    return Ok(Ok(reply));
                }
                if session_id.is_some() {
                    record.session_id = session_id;
                }
                if status.is_terminal() {
                    record.review_url = review_url;
                    record.comments_posted = comments_posted;
                    Self::end(ctx, &mut record, status, error).await?;
                    self.fill(ctx, default_slots).await?;
                } else {
                    record.status = status;
                    record.updated_at = ctx.now_ms();
                    ctx.put(&format!("rev/{id}"), &record)?;
                }
                reply.record = Some(record);
            }
            OwnerCall::CancelPull {
                repo,
                number,
                default_slots,
            } => {
                if let Some(id) = ctx.get::<String>(&format!("pr/{repo}#{number}")).await?
                    && let Some(mut record) = ctx.get::<ReviewRecord>(&format!("rev/{id}")).await?
                    && !record.status.is_terminal()
                {
                    let reason = Some("the pull request was closed".to_owned());
                    let had_slot = record.status.holds_slot();
                    Self::end(ctx, &mut record, ReviewStatus::Cancelled, reason).await?;
                    if had_slot {
                        self.fill(ctx, default_slots).await?;
                    }
                    reply.stopped.push(record.clone());
                    reply.record = Some(record);
                }
            }
        }
        Ok(Ok(reply))
    }

    async fn alarm(&self, ctx: &mut ActorContext, _alarm: AlarmInfo) -> Result<()> {
        let cutoff = ctx.now_ms() - self.retention_ms;
        let mut live = 0;
        for (key, record) in ctx.list::<ReviewRecord>("rev/").await? {
            if record.status.is_terminal() && record.updated_at < cutoff {
                ctx.delete(&key);
                let pr_key = format!("pr/{}#{}", record.repo, record.number);
                if ctx.get::<String>(&pr_key).await?.as_deref() == Some(record.id.as_str()) {
                    ctx.delete(&pr_key);
                }
            } else {
                live += 1;
            }
        }
        if live > 0 {
            self.arm_cleanup(ctx);
        }
        Ok(())
    }
}

/// State of one review's orchestrator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrchestratorState {
    /// The review when it started.
    pub record: ReviewRecord,
    /// The session, once prepared.
    pub session_id: Option<String>,
    /// Start, ms.
    pub started_at: i64,
    /// Done (the alarm then only cleans up).
    pub finished: bool,
}

/// Calls of [`ReviewActor`].
#[derive(Debug)]
pub enum ReviewCall {
    /// Starts (or returns) the orchestration and arms the timeout.
    Start(Box<ReviewRecord>),
    /// Records the session.
    Attach(String),
    /// Ends the orchestration; the state is removed after the retention.
    Finish,
}

/// One review's orchestrator: its session and its 20-minute timeout.
pub struct ReviewActor {
    service: Weak<Inner>,
}

impl Actor for ReviewActor {
    const TYPE: &'static str = REVIEW_ACTOR;
    type Call = ReviewCall;
    type Reply = Option<OrchestratorState>;

    async fn call(&self, ctx: &mut ActorContext, call: ReviewCall) -> Result<Self::Reply> {
        let state: Option<OrchestratorState> = ctx.get("state").await?;
        let config = &upgrade(&self.service)?.inner.config.review;
        let state = match (call, state) {
            (ReviewCall::Start(record), None) => {
                let now = ctx.now_ms();
                ctx.set_alarm(now + config.timeout_ms as i64);
                OrchestratorState {
                    record: *record,
                    session_id: None,
                    started_at: now,
                    finished: false,
                }
            }
            (ReviewCall::Start(_), Some(s)) => return Ok(Some(s)),
            (ReviewCall::Attach(session), Some(mut s)) => {
                s.session_id = Some(session);
                s
            }
            (ReviewCall::Finish, Some(mut s)) => {
                if !s.finished {
                    s.finished = true;
                    ctx.set_alarm(ctx.now_ms() + config.retention_ms as i64);
                }
                s
            }
            (_, None) => return Ok(None),
        };
        ctx.put("state", &state)?;
        Ok(Some(state))
    }

    async fn alarm(&self, ctx: &mut ActorContext, _alarm: AlarmInfo) -> Result<()> {
        let Some(mut state) = ctx.get::<OrchestratorState>("state").await? else {
            return Ok(());
        };
        if state.finished {
            ctx.delete_all();
            return Ok(());
        }
        let automation = upgrade(&self.service)?;
        let minutes = automation.inner.config.review.timeout_ms / 60_000;
        let error = format!("the review did not finish within {minutes} min");
        tracing::warn!(review = %state.record.id, "{error}");
        let owner: Owner = state
            .record
            .owner
            .parse()
            .map_err(|_| kilocloud_substrate::Error::Handler("bad owner in a review".into()))?;
        if let Err(e) = automation
            .settle_record(
                owner,
                &state.record.id,
                Settled::Failed(error),
                state.session_id.clone(),
            )
            .await
        {
            // Not an alarm failure: those are retried six times and then dropped, which would
            // leave the review holding its slot for good. Try again in a minute, for as long
            // as it takes.
            tracing::error!(review = %state.record.id, error = %e,
                "cannot fail a timed-out review; retrying in a minute");
            ctx.set_alarm(ctx.now_ms() + TIMEOUT_RETRY_MS);
            return Ok(());
        }
        if let Some(session) = &state.session_id {
            automation
                .interrupt_review_session(owner, state.record.acting_user, session)
                .await;
        }
        state.finished = true;
        ctx.put("state", &state)?;
        ctx.set_alarm(ctx.now_ms() + automation.inner.config.review.retention_ms as i64);
        Ok(())
    }
}

/// A message of [`DISPATCH_QUEUE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DispatchMessage {
    owner: String,
    id: String,
}

/// How a review ended, for [`Automation::settle`].
enum Settled {
    Completed { url: Option<String>, comments: u32 },
    Failed(String),
}

pub(crate) fn register(sub: &Substrate, service: Weak<Inner>) {
    let retention_ms = upgrade(&service)
        .map(|a| a.inner.config.review.retention_ms as i64)
        .unwrap_or(7 * 24 * 3_600_000);
    sub.actors().register(ReviewOwnerActor {
        retention_ms,
        sub: sub.clone(),
    });
    sub.actors().register(ReviewActor { service });
    for name in [DISPATCH_QUEUE, COMPLETION_QUEUE] {
        sub.queues()
            .declare(QueueConfig {
                max_attempts: MAX_ATTEMPTS,
                retry_base_ms: 5_000,
                visibility_timeout_ms: 5 * 60_000,
                batch_size: 8,
                concurrency: 8,
                ..QueueConfig::new(name)
            })
            .expect("the review queues' settings are valid");
    }
}

pub(crate) fn start(automation: &Automation) {
    let sub = &automation.inner.sub;
    sub.start_consumer(
        DISPATCH_QUEUE,
        Arc::new(DispatchConsumer(automation.clone())),
    );
    sub.start_consumer(
        COMPLETION_QUEUE,
        Arc::new(CompletionConsumer(automation.clone())),
    );
}

/// Consumes [`DISPATCH_QUEUE`]: starts a review's session.
pub struct DispatchConsumer(pub Automation);

#[async_trait]
impl Consumer for DispatchConsumer {
    async fn handle(&self, delivery: &Delivery) -> Result<()> {
        let msg: DispatchMessage = delivery.body()?;
        let Ok(owner) = msg.owner.parse::<Owner>() else {
            return Ok(());
        };
        let outcome = self.0.start_review(owner, &msg.id).await;
        self.0
            .retry_or_fail(
                delivery,
                owner,
                &msg.id,
                outcome,
                "starting the review",
                None,
            )
            .await
    }
}

/// Consumes [`COMPLETION_QUEUE`]: posts a finished review.
pub struct CompletionConsumer(pub Automation);

#[async_trait]
impl Consumer for CompletionConsumer {
    async fn handle(&self, delivery: &Delivery) -> Result<()> {
        let msg: CompletionMessage = delivery.body()?;
        let Ok(ctx) = serde_json::from_value::<DispatchMessage>(msg.context.clone()) else {
            return Ok(());
        };
        let Ok(owner) = ctx.owner.parse::<Owner>() else {
            return Ok(());
        };
        let outcome = self.0.finish_review(owner, &ctx.id, &msg).await;
        let session = Some(msg.payload.session_id.clone());
        self.0
            .retry_or_fail(
                delivery,
                owner,
                &ctx.id,
                outcome,
                "posting the review",
                session,
            )
            .await
    }
}

/// The prompt of a review session.
fn review_prompt(record: &ReviewRecord, settings: &ReviewSettings, diff: &str) -> String {
    let mut prompt = format!(
        "You are reviewing pull request #{number} \"{title}\" of {repo} ({head} into {base}). \
The repository is checked out at the pull request's head commit {sha}.\n\n\
Read the changed files and whatever else you need. Follow the repository's own review \
instructions if it has any (AGENTS.md, .kilocode/rules/, CONTRIBUTING.md). Look for bugs, \
security problems, missing error handling and unclear code in the changed lines; do not \
comment on style a formatter would fix.\n\n\
End with one JSON object, and nothing after it:\n\
{{\"summary\": \"<your overall assessment, markdown>\", \"comments\": [{{\"path\": \
\"<file>\", \"line\": <line number in the new version of the file, on a line the diff \
shows>, \"body\": \"<the problem and a suggested fix>\"}}]}}\n",
        number = record.number,
        title = record.title,
        repo = record.repo,
        head = record.head_ref,
        base = record.base_ref,
        sha = record.head_sha,
    );
    if !settings.instructions.trim().is_empty() {
        prompt.push_str("\nInstructions from the repository's owner:\n");
        prompt.push_str(settings.instructions.trim());
        prompt.push('\n');
    }
    prompt.push_str("\nThe diff:\n```diff\n");
    prompt.push_str(diff);
    prompt.push_str("\n```\n");
    prompt
}

/// `diff` cut to at most `max` bytes on a line boundary, with a note when cut.
fn truncate_diff(diff: &str, max: usize) -> String {
    if diff.len() <= max {
        return diff.to_owned();
    }
    let mut end = max;
    while !diff.is_char_boundary(end) {
        end -= 1;
    }
    let cut = diff[..end].rfind('\n').unwrap_or(end);
    format!(
        "{}\n... (diff truncated at {max} bytes; read the files for the rest)",
        &diff[..cut]
    )
}

impl Automation {
    fn default_slots(&self) -> u32 {
        self.inner.config.review.max_concurrent
    }

    async fn owner_call(
        &self,
        owner: Owner,
        call: OwnerCall,
    ) -> std::result::Result<OwnerReply, AutomationError> {
        self.inner
            .sub
            .actors()
            .call::<ReviewOwnerActor>(&owner.to_string(), call)
            .await?
            .map_err(|r| r.into_error("review"))
    }

    /// Interrupts the sessions of the reviews that lost their slot and finishes their
    /// orchestrators.
    async fn apply(&self, owner: Owner, reply: &OwnerReply) -> Result<()> {
        for record in &reply.stopped {
            if let Some(session) = &record.session_id {
                self.interrupt_review_session(owner, record.acting_user, session)
                    .await;
            }
            let key = format!("{owner}/{}", record.id);
            self.inner
                .sub
                .actors()
                .call::<ReviewActor>(&key, ReviewCall::Finish)
                .await?;
        }
        Ok(())
    }

    async fn interrupt_review_session(&self, owner: Owner, user: Uuid, session: &str) {
        let Ok(caller) = self.acting_caller(owner, user).await else {
            return;
        };
        match self.inner.agents.interrupt(caller, session).await {
            Ok(_) | Err(AgentError::Conflict { .. }) | Err(AgentError::NotFound) => {}
            Err(e) => tracing::warn!(%session, error = %e, "cannot interrupt a review session"),
        }
    }

    /// What a review consumer does with the outcome of `step`: a transient failure is
    /// retried through the queue while attempts remain ([`MAX_ATTEMPTS`]); any other, or the
    /// last, fails the review with the reason.
    async fn retry_or_fail(
        &self,
        delivery: &Delivery,
        owner: Owner,
        id: &str,
        outcome: std::result::Result<(), AutomationError>,
        step: &str,
        session_id: Option<String>,
    ) -> Result<()> {
        match outcome {
            Ok(()) => Ok(()),
            Err(e) if e.is_transient() && delivery.attempts < MAX_ATTEMPTS => Err(e.into()),
            Err(e) => {
                tracing::warn!(review = %id, error = %e, "{step} failed");
                let why = Settled::Failed(format!("{step} failed: {e}"));
                Ok(self.settle(owner, id, why, session_id).await?)
            }
        }
    }

    /// Routes a `pull_request` event of `owner`'s installation; returns the outcome.
    pub(crate) async fn on_pull_request(
        &self,
        owner: Owner,
        user: Uuid,
        pr: PullRequestEvent,
    ) -> std::result::Result<String, AutomationError> {
        match pr.action.as_str() {
            "opened" | "synchronize" | "reopened" | "ready_for_review" => {}
            "closed" => {
                let reply = self
                    .owner_call(
                        owner,
                        OwnerCall::CancelPull {
                            repo: pr.repo.clone(),
                            number: pr.number,
                            default_slots: self.default_slots(),
                        },
                    )
                    .await?;
                self.apply(owner, &reply).await?;
                return Ok(match reply.record {
                    Some(r) => format!("review {} cancelled", r.id),
                    None => "ignored: no review in progress".into(),
                });
            }
            other => return Ok(format!("ignored: pull_request.{other} is not reviewed")),
        }
        let settings = self.review_settings(owner).await?;
        if !settings.enabled {
            return Ok("skipped: code review is disabled for this owner".into());
        }
        if !settings.covers(&pr.repo) {
            return Ok(format!(
                "skipped: {} is not in the reviewed repositories",
                pr.repo
            ));
        }
        if pr.draft && settings.skip_drafts {
            return Ok("skipped: draft pull request".into());
        }
        if let Some(head) = pr
            .head_repo
            .as_deref()
            .filter(|h| !h.eq_ignore_ascii_case(&pr.repo))
        {
            return Ok(format!(
                "skipped: the pull request comes from the fork {head} (not reviewed yet)"
            ));
        }
        let now = self.inner.sub.clock().now_ms();
        let record = ReviewRecord {
            id: format!("rev_{}", Uuid::new_v4().simple()),
            owner: owner.to_string(),
            acting_user: user,
            installation_id: pr.installation_id,
            repo: pr.repo,
            number: pr.number,
            title: pr.title,
            head_sha: pr.head_sha,
            head_ref: pr.head_ref,
            base_ref: pr.base_ref,
            status: ReviewStatus::Pending,
            session_id: None,
            error: None,
            review_url: None,
            comments_posted: 0,
            created_at: now,
            updated_at: now,
        };
        let id = record.id.clone();
        let reply = self
            .owner_call(
                owner,
                OwnerCall::Submit {
                    record: Box::new(record),
                    default_slots: self.default_slots(),
                },
            )
            .await?;
        self.apply(owner, &reply).await?;
        let current = reply.record.as_ref();
        Ok(match current {
            Some(r) if r.id != id => format!("review {} already covers this commit", r.id),
            Some(r) => format!(
                "review {} {}",
                r.id,
                if r.status == ReviewStatus::Queued {
                    "queued"
                } else {
                    "waiting for a slot"
                }
            ),
            None => "review recorded".into(),
        })
    }

    /// Moves review `id` to a terminal status, then dispatches the next waiting reviews and
    /// finishes the orchestrator.
    async fn settle(
        &self,
        owner: Owner,
        id: &str,
        how: Settled,
        session_id: Option<String>,
    ) -> std::result::Result<(), AutomationError> {
        self.settle_record(owner, id, how, session_id).await?;
        self.inner
            .sub
            .actors()
            .call::<ReviewActor>(&format!("{owner}/{id}"), ReviewCall::Finish)
            .await?;
        Ok(())
    }

    /// [`Automation::settle`] without finishing the orchestrator (for the orchestrator's own
    /// alarm, which must not call itself).
    async fn settle_record(
        &self,
        owner: Owner,
        id: &str,
        how: Settled,
        session_id: Option<String>,
    ) -> std::result::Result<(), AutomationError> {
        let (status, error, review_url, comments_posted) = match how {
            Settled::Completed { url, comments } => (ReviewStatus::Completed, None, url, comments),
            Settled::Failed(e) => (ReviewStatus::Failed, Some(e), None, 0),
        };
        let reply = self
            .owner_call(
                owner,
                OwnerCall::Update {
                    id: id.to_owned(),
                    status,
                    session_id,
                    error,
                    review_url,
                    comments_posted,
                    default_slots: self.default_slots(),
                },
            )
            .await;
        let reply = match reply {
            Err(AutomationError::NotFound(_)) => return Ok(()),
            other => other?,
        };
        self.apply(owner, &reply).await?;
        Ok(())
    }

    /// An installation token for `record`, after checking that its installation still belongs
    /// to the review's owner and is active (it may have been released, suspended, uninstalled
    /// or claimed by another owner since the webhook).
    async fn review_token(
        &self,
        owner: Owner,
        record: &ReviewRecord,
    ) -> std::result::Result<crate::github::AccessToken, AutomationError> {
        let github = self.github_or_disabled()?;
        let usable = self
            .installation(record.installation_id)
            .await?
            .and_then(|i| i.active_owner())
            .is_some_and(|(o, _)| o == owner);
        if !usable {
            return Err(AutomationError::Forbidden(format!(
                "GitHub App installation {} no longer belongs to this owner or is not active",
                record.installation_id
            )));
        }
        Ok(github.installation_token(record.installation_id).await?)
    }

    /// Dispatch: the orchestrator, the diff, the session.
    async fn start_review(
        &self,
        owner: Owner,
        id: &str,
    ) -> std::result::Result<(), AutomationError> {
        // Through the owner actor, not a lock-free read: the dispatch message is sent before
        // the call that queued the review commits, and must see that commit.
        let Some(record) = self
            .owner_call(owner, OwnerCall::Get(id.to_owned()))
            .await?
            .record
        else {
            return Ok(());
        };
        if record.status != ReviewStatus::Queued && record.status != ReviewStatus::Running {
            return Ok(());
        }
        let key = format!("{owner}/{id}");
        let actors = self.inner.sub.actors();
        let state = actors
            .call::<ReviewActor>(&key, ReviewCall::Start(Box::new(record.clone())))
            .await?
            .expect("Start always answers");
        if state.finished {
            return Ok(());
        }
        let caller = self.acting_caller(owner, record.acting_user).await?;
        let session_id = match state.session_id {
            Some(s) => s,
            None => {
                let github = self.github_or_disabled()?;
                let token = self.review_token(owner, &record).await?;
                let settings = self.review_settings(owner).await?;
                let ignore = settings.ignore_set().map_err(AutomationError::Invalid)?;
                let diff = github
                    .pull_diff(&token, &record.repo, record.number)
                    .await?;
                let diff = truncate_diff(
                    &filter_diff(&diff, &ignore),
                    self.inner.config.review.max_diff_bytes,
                );
                let model = settings.model.clone().or_else(|| {
                    Some(self.inner.config.review.default_model.clone()).filter(|m| !m.is_empty())
                });
                let prepared = self
                    .inner
                    .agents
                    .prepare(
                        caller,
                        PrepareRequest {
                            github_repo: Some(record.repo.clone()),
                            git_token: Some(token.token.clone()),
                            upstream_branch: Some(record.head_ref.clone()),
                            mode: Some(Mode::Ask),
                            model,
                            prompt: review_prompt(&record, &settings, &diff),
                            notify: Some(CompletionNotice {
                                queue: COMPLETION_QUEUE.into(),
                                context: json!({"owner": owner.to_string(), "id": id}),
                            }),
                            ..PrepareRequest::default()
                        },
                    )
                    .await?;
                actors
                    .call::<ReviewActor>(&key, ReviewCall::Attach(prepared.session_id.clone()))
                    .await?;
                prepared.session_id
            }
        };
        let reply = self
            .owner_call(
                owner,
                OwnerCall::Update {
                    id: id.to_owned(),
                    status: ReviewStatus::Running,
                    session_id: Some(session_id.clone()),
                    error: None,
                    review_url: None,
                    comments_posted: 0,
                    default_slots: self.default_slots(),
                },
            )
            .await?;
        if reply.record.is_some_and(|r| r.status.is_terminal()) {
            // Superseded or cancelled while the session was prepared.
            return Ok(());
        }
        match self.inner.agents.initiate(caller, &session_id).await {
            Ok(_) | Err(AgentError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Completion: post the findings, settle the review.
    async fn finish_review(
        &self,
        owner: Owner,
        id: &str,
        msg: &CompletionMessage,
    ) -> std::result::Result<(), AutomationError> {
        let Some(record) = self.review(owner, id).await? else {
            return Ok(());
        };
        if record.status.is_terminal() {
            return Ok(());
        }
        let session = Some(msg.payload.session_id.clone());
        if msg.payload.status != kilocloud_agent::session::ExecStatus::Completed {
            let why = msg
                .payload
                .error_message
                .clone()
                .unwrap_or_else(|| "the review session did not complete".into());
            return self.settle(owner, id, Settled::Failed(why), session).await;
        }
        let github = self.github_or_disabled()?;
        let token = self.review_token(owner, &record).await?;
        let settings = self.review_settings(owner).await?;
        let ignore = settings.ignore_set().map_err(AutomationError::Invalid)?;
        let diff = github
            .pull_diff(&token, &record.repo, record.number)
            .await?;
        let findings = parse_findings(msg.payload.summary.as_deref().unwrap_or_default());
        let mut review = build_review(
            &findings,
            &DiffLines::parse(&diff),
            &ignore,
            &record.head_sha,
        );
        let posted = match github
            .create_review(&token, &record.repo, record.number, &review)
            .await
        {
            Err(crate::GitHubError::Status { status: 422, .. }) if !review.comments.is_empty() => {
                // A comment GitHub would not place (the diff moved on): everything into the
                // summary.
                let unplaced = review
                    .comments
                    .drain(..)
                    .map(|c| format!("- `{}` line {}: {}", c.path, c.line, c.body))
                    .collect::<Vec<_>>()
                    .join("\n");
                review.body = format!("{}\n\n**Findings**\n\n{unplaced}", review.body);
                github
                    .create_review(&token, &record.repo, record.number, &review)
                    .await?
            }
            other => other?,
        };
        let how = Settled::Completed {
            url: posted.html_url,
            comments: review.comments.len() as u32,
        };
        self.settle(owner, id, how, session).await
    }

    /// `owner`'s review settings.
    pub async fn review_settings(
        &self,
        owner: Owner,
    ) -> std::result::Result<ReviewSettings, AutomationError> {
        Ok(self
            .owner_call(owner, OwnerCall::Settings)
            .await?
            .settings
            .unwrap_or_default())
    }

    /// Replaces `owner`'s review settings.
    ///
    /// Errors: [`AutomationError::Invalid`] naming the bad field.
    pub async fn put_review_settings(
        &self,
        owner: Owner,
        settings: ReviewSettings,
    ) -> std::result::Result<ReviewSettings, AutomationError> {
        settings.validate().map_err(AutomationError::Invalid)?;
        Ok(self
            .owner_call(
                owner,
                OwnerCall::PutSettings(settings, self.default_slots()),
            )
            .await?
            .settings
            .unwrap_or_default())
    }

    /// One of `owner`'s reviews.
    pub async fn review(
        &self,
        owner: Owner,
        id: &str,
    ) -> std::result::Result<Option<ReviewRecord>, AutomationError> {
        Ok(self
            .inner
            .sub
            .actor_read(OWNER_ACTOR, &owner.to_string(), &format!("rev/{id}"))
            .await?)
    }

    /// `owner`'s reviews of the last 7 days, newest first.
    pub async fn reviews(
        &self,
        owner: Owner,
    ) -> std::result::Result<Vec<ReviewRecord>, AutomationError> {
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let page: Vec<(String, ReviewRecord)> = self
                .inner
                .sub
                .actor_scan(OWNER_ACTOR, &owner.to_string(), "rev/", &after, 500)
                .await?;
            let full = page.len() == 500;
            if let Some((k, _)) = page.last() {
                after = k.clone();
            }
            out.extend(page.into_iter().map(|(_, r)| r));
            if !full {
                break;
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(out)
    }

    /// Counts of `owner`'s reviews by status (for the CLI and tests).
    pub async fn review_counts(
        &self,
        owner: Owner,
    ) -> std::result::Result<BTreeMap<ReviewStatus, usize>, AutomationError> {
        let mut counts = BTreeMap::new();
        for r in self.reviews(owner).await? {
            *counts.entry(r.status).or_default() += 1;
        }
        Ok(counts)
    }
}
