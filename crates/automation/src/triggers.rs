//! Triggers (reference §4 "Webhook agent ingest", plus cron schedules the reference lacks).
//!
//! A trigger belongs to an owner and is one actor `trigger` keyed `<owner>/<triggerId>`
//! (`user:<id>/<triggerId>` or `org:<id>/<triggerId>`): its configuration, the newest 100
//! requests with their status, and, for a scheduled trigger, the alarm of its next firing.
//!
//! Activation:
//! - **webhook**: `POST /hooks/{ownerType}/{ownerId}/{triggerId}` with a text or JSON body of
//!   at most 256 KiB (413), optionally authenticated by a shared secret in a header (stored
//!   only as its SHA-256) or an HMAC-SHA256 signature of the body (`sha256=<hex>`, the secret
//!   stored sealed); both compared in constant time. At most 20 requests in flight (captured
//!   or in progress) per trigger (429).
//! - **schedule**: a cron expression in an IANA time zone, fired by the actor's alarm (at
//!   least once, also after a restart).
//!
//! A captured request is delivered through the queue `webhook-delivery` (3 attempts, then the
//! dead-letter queue): the template is rendered with the request, and a Cloud Agent session
//! is prepared and initiated (destination `cloud_agent`), or the rendered message is stored
//! for the chat service (destination `chat`). The session's completion notice, through
//! `trigger-completions`, moves the request to `success` or `failed`.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use kilocloud_agent::session::{ExecStatus, Mode};
use kilocloud_agent::{AgentError, CompletionMessage, CompletionNotice, PrepareRequest};
use kilocloud_identity::Owner;
use kilocloud_identity::envelope::Envelope;
use kilocloud_substrate::{
    Actor, ActorContext, AlarmInfo, Consumer, CronSchedule, Delivery, QueueConfig, Result,
    Substrate,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{Automation, AutomationError, AutomationRefusal, Inner, upgrade};

/// Actor type of a trigger.
pub const TRIGGER_ACTOR: &str = "trigger";
/// Queue of captured requests (reference §4: 3 attempts).
pub const DELIVERY_QUEUE: &str = "webhook-delivery";
/// Queue of the completion notices of trigger sessions.
pub const COMPLETION_QUEUE: &str = "trigger-completions";
/// Largest webhook body, bytes (reference §4: 256 KiB).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Requests captured or in progress at once per trigger (reference §4: 20).
pub const MAX_IN_FLIGHT: usize = 20;
/// Requests kept per trigger (reference §4: the newest 100 not in flight).
pub const KEPT_REQUESTS: usize = 100;
/// A request still in flight this long after it arrived is failed, ms (24 h).
pub const STALE_AFTER_MS: i64 = 24 * 3_600_000;
/// Deliveries of a captured request before it is failed and dead-lettered.
pub const DELIVERY_ATTEMPTS: u32 = 3;

/// What a trigger does when it fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Destination {
    /// Start a Cloud Agent session.
    CloudAgent {
        /// `owner/repo` on GitHub (cloned with the owner's GitHub App installation token when
        /// there is one); exactly one of this and `gitUrl`.
        #[serde(rename = "githubRepo", default)]
        github_repo: Option<String>,
        /// An https clone URL.
        #[serde(rename = "gitUrl", default)]
        git_url: Option<String>,
        /// Mode; default `code`.
        #[serde(default)]
        mode: Option<Mode>,
        /// Model; default `agent.default_model`.
        #[serde(default)]
        model: Option<String>,
        /// The prompt, a MiniJinja template (see [`render`]).
        #[serde(rename = "promptTemplate")]
        prompt_template: String,
        /// Commit and push when the session completes.
        #[serde(rename = "autoCommit", default)]
        auto_commit: bool,
    },
    /// Store a conversation message for the chat service.
    Chat {
        /// The message, a MiniJinja template.
        #[serde(rename = "messageTemplate")]
        message_template: String,
    },
}

/// How a trigger is fired (input form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Activation {
    /// `POST /hooks/{ownerType}/{ownerId}/{triggerId}`.
    Webhook {
        /// Optional authentication of requests.
        #[serde(default)]
        auth: Option<WebhookAuth>,
    },
    /// A cron schedule.
    Schedule {
        /// 5-field (minute) or 6-field (second) cron expression, or `@hourly` and the like.
        cron: String,
        /// IANA time zone; default `UTC`.
        #[serde(default = "utc")]
        timezone: String,
    },
}

fn utc() -> String {
    "UTC".into()
}

/// Webhook authentication (input form; the secret is never returned).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookAuth {
    /// `header`: the header carries the secret itself; `hmac`: the header carries
    /// `sha256=<hex HMAC-SHA256 of the body>`.
    pub kind: AuthKind,
    /// Header name (case-insensitive).
    pub header: String,
    /// The secret (8–512 bytes).
    pub secret: String,
}

impl std::fmt::Debug for WebhookAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookAuth")
            .field("kind", &self.kind)
            .field("header", &self.header)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Kinds of [`WebhookAuth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    /// A shared secret in a header.
    Header,
    /// An HMAC-SHA256 signature of the body in a header.
    Hmac,
}

/// Body of `POST /api/triggers` and `PUT /api/triggers/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TriggerSpec {
    /// 1–64 of `a-z0-9-_`, unique per owner (ignored by `PUT`).
    pub id: String,
    /// What it does.
    pub destination: Destination,
    /// How it fires.
    pub activation: Activation,
    /// Default true; an inactive trigger answers 404 and does not fire.
    #[serde(default = "yes")]
    pub active: bool,
}

fn yes() -> bool {
    true
}

/// Stored authentication: the header secret only hashed, the HMAC key sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredAuth {
    kind: AuthKind,
    header: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed_key: Option<Envelope>,
}

/// A trigger as stored and shown (secrets never included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerConfig {
    /// Trigger id.
    pub id: String,
    /// `user:<id>` / `org:<id>`.
    pub owner: String,
    /// The user who created it or last replaced its configuration; its sessions act as this
    /// user.
    pub created_by: Uuid,
    /// What it does.
    pub destination: Destination,
    /// `webhook` or `schedule`.
    pub activation_type: String,
    /// Cron expression, for a schedule.
    pub cron: Option<String>,
    /// Time zone, for a schedule.
    pub timezone: Option<String>,
    /// Next firing of a schedule, ms.
    pub next_fire_at: Option<i64>,
    /// `header` / `hmac` when webhook authentication is configured.
    pub auth_kind: Option<AuthKind>,
    /// The authentication header.
    pub auth_header: Option<String>,
    /// Active.
    pub active: bool,
    /// Creation, ms.
    pub created_at: i64,
    /// Last change, ms.
    pub updated_at: i64,
    /// Stored with the trigger; never returned by the service (see [`TriggerConfig::shown`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    auth: Option<StoredAuth>,
}

impl TriggerConfig {
    /// The configuration as the API shows it: without the stored secret material.
    fn shown(self) -> Self {
        Self { auth: None, ..self }
    }
}

/// Status of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    /// Stored and queued.
    Captured,
    /// Its session runs.
    Inprogress,
    /// The session completed, or the chat message was stored.
    Success,
    /// Failed; `error` says why.
    Failed,
}

impl RequestStatus {
    fn in_flight(self) -> bool {
        matches!(self, RequestStatus::Captured | RequestStatus::Inprogress)
    }
}

/// One request of a trigger (a webhook call or a schedule firing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerRequest {
    /// `req_<uuid>`.
    pub id: String,
    /// Arrival order.
    pub seq: u64,
    /// Arrival (or scheduled firing) time, ms.
    pub received_at: i64,
    /// HTTP method, or `SCHEDULE`.
    pub method: String,
    /// Path.
    pub path: String,
    /// Query string.
    pub query: String,
    /// Headers, lower-cased; the authentication header is left out.
    pub headers: BTreeMap<String, String>,
    /// Body (UTF-8, lossy).
    pub body: String,
    /// Content type.
    pub content_type: String,
    /// Client address.
    pub source_ip: String,
    /// Status.
    pub status: RequestStatus,
    /// The session started for it.
    pub session_id: Option<String>,
    /// Delivery start, ms.
    pub started_at: Option<i64>,
    /// Terminal since, ms.
    pub completed_at: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// The rendered chat message (destination `chat`).
    pub message: Option<String>,
    /// Failed by exhausted delivery attempts (a replay from the dead-letter queue retries
    /// it).
    #[serde(default)]
    pub dead_lettered: bool,
}

/// An incoming webhook request, as the HTTP layer hands it over.
#[derive(Debug, Clone, Default)]
pub struct IncomingRequest {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Query string.
    pub query: String,
    /// Headers (names lower-case).
    pub headers: BTreeMap<String, String>,
    /// Body.
    pub body: Vec<u8>,
    /// Client address.
    pub source_ip: String,
}

/// Calls of [`TriggerActor`].
#[derive(Debug)]
pub enum TriggerCall {
    /// Creates the trigger (409 when it exists).
    Create(Box<TriggerConfig>),
    /// Replaces its configuration.
    Update(Box<TriggerConfig>),
    /// Removes the trigger, its requests and its alarm.
    Delete,
    /// Stores a request and queues it; refuses when inactive or too many are in flight.
    Capture {
        /// The request.
        request: Box<TriggerRequest>,
        /// `updated_at` of the configuration the request was authenticated against.
        config_version: i64,
    },
    /// Delivery begins: the configuration and the request, if it still needs delivery.
    Begin(String),
    /// The session was prepared.
    SetSession(String, String),
    /// Stores the outcome (ignored unless in flight; a session outcome must name the
    /// request's session).
    Finish {
        /// Request id.
        request: String,
        /// The session the outcome is about, when it is a session's.
        session: Option<String>,
        /// `Success` or `Failed`.
        status: RequestStatus,
        /// Why it failed.
        error: Option<String>,
        /// The chat message.
        message: Option<String>,
        /// Failed by exhausted delivery attempts.
        dead_lettered: bool,
    },
}

/// Replies of [`TriggerActor`].
#[derive(Debug)]
pub enum TriggerReply {
    /// The configuration.
    Config(Box<TriggerConfig>),
    /// The captured request's id.
    Captured(String),
    /// Delivery may proceed.
    Begin(Box<TriggerConfig>, Box<TriggerRequest>),
    /// Nothing to do.
    Done,
}

/// A request's status and arrival (ms) under `st/<seq>`: the small index that counts requests
/// in flight and trims old ones without reading their bodies.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct StatusEntry {
    s: RequestStatus,
    at: i64,
}

/// A message of [`DELIVERY_QUEUE`] and the context of a trigger session's notice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RequestRef {
    trigger: String,
    request: String,
}

/// The trigger actor (see the module docs).
pub struct TriggerActor {
    service: Weak<Inner>,
}

impl TriggerActor {
    /// Requests captured or in progress. One in flight for more than [`STALE_AFTER_MS`] (its
    /// session never reported back: deleted, or its notice lost) is failed here, so it stops
    /// counting against [`MAX_IN_FLIGHT`].
    async fn in_flight(ctx: &mut ActorContext) -> Result<usize> {
        let now = ctx.now_ms();
        let mut count = 0;
        for (key, entry) in ctx.list::<StatusEntry>("st/").await? {
            if !entry.s.in_flight() {
                continue;
            }
            if now - entry.at <= STALE_AFTER_MS {
                count += 1;
                continue;
            }
            let seq = &key["st/".len()..];
            if let Some(mut r) = ctx.get::<TriggerRequest>(&format!("req/{seq}")).await? {
                r.status = RequestStatus::Failed;
                r.error = Some("no outcome within 24 h; given up".into());
                r.completed_at = Some(now);
                Self::store(ctx, &r)?;
            }
        }
        Ok(count)
    }

    async fn request(ctx: &mut ActorContext, id: &str) -> Result<Option<TriggerRequest>> {
        let Some(seq) = ctx.get::<u64>(&format!("rid/{id}")).await? else {
            return Ok(None);
        };
        ctx.get(&format!("req/{seq:020}")).await
    }

    fn store(ctx: &mut ActorContext, r: &TriggerRequest) -> Result<()> {
        ctx.put(&format!("req/{:020}", r.seq), r)?;
        let entry = StatusEntry {
            s: r.status,
            at: r.received_at,
        };
        ctx.put(&format!("st/{:020}", r.seq), &entry)?;
        ctx.put(&format!("rid/{}", r.id), &r.seq)
    }

    /// Stores `request`, trims the kept requests to the newest [`KEPT_REQUESTS`] not in
    /// flight, and queues it (before the call commits: a failed commit leaves a message whose
    /// request is gone, which delivery acknowledges).
    async fn capture(
        &self,
        ctx: &mut ActorContext,
        mut request: TriggerRequest,
    ) -> Result<std::result::Result<String, AutomationRefusal>> {
        let in_flight = Self::in_flight(ctx).await?;
        if in_flight >= MAX_IN_FLIGHT {
            return Ok(Err(AutomationRefusal::Conflict(format!(
                "in_flight:{in_flight}"
            ))));
        }
        let seq: u64 = ctx.get("next_seq").await?.unwrap_or(1);
        ctx.put("next_seq", &(seq + 1))?;
        request.seq = seq;
        Self::store(ctx, &request)?;
        let statuses = ctx.list::<StatusEntry>("st/").await?;
        let mut excess = statuses.len().saturating_sub(KEPT_REQUESTS);
        for (key, entry) in statuses {
            if excess == 0 {
                break;
            }
            if entry.s.in_flight() {
                continue;
            }
            let old_seq = &key["st/".len()..];
            if let Some(old) = ctx.get::<TriggerRequest>(&format!("req/{old_seq}")).await? {
                ctx.delete(&format!("rid/{}", old.id));
            }
            ctx.delete(&format!("req/{old_seq}"));
            ctx.delete(&key);
            excess -= 1;
        }
        let message = RequestRef {
            trigger: ctx.key().to_owned(),
            request: request.id.clone(),
        };
        upgrade(&self.service)?
            .inner
            .sub
            .queues()
            .send(DELIVERY_QUEUE, &message, 0)
            .await?;
        Ok(Ok(request.id))
    }
}

impl Actor for TriggerActor {
    const TYPE: &'static str = TRIGGER_ACTOR;
    type Call = TriggerCall;
    type Reply = std::result::Result<TriggerReply, AutomationRefusal>;

    async fn call(&self, ctx: &mut ActorContext, call: TriggerCall) -> Result<Self::Reply> {
        let config: Option<TriggerConfig> = ctx.get("config").await?;
        match call {
            TriggerCall::Create(new) => {
                if config.is_some() {
                    return Ok(Err(AutomationRefusal::Conflict(format!(
                        "trigger {} already exists",
                        new.id
                    ))));
                }
                let new = schedule(ctx, *new)?;
                ctx.put("config", &new)?;
                Ok(Ok(TriggerReply::Config(Box::new(new))))
            }
            TriggerCall::Update(new) => {
                let Some(old) = config else {
                    return Ok(Err(AutomationRefusal::NotFound));
                };
                // Sessions act as whoever configured the trigger last.
                let new = TriggerConfig {
                    created_at: old.created_at,
                    ..*new
                };
                let new = schedule(ctx, new)?;
                ctx.put("config", &new)?;
                Ok(Ok(TriggerReply::Config(Box::new(new))))
            }
            TriggerCall::Delete => {
                if config.is_none() {
                    return Ok(Err(AutomationRefusal::NotFound));
                }
                ctx.delete_all();
                Ok(Ok(TriggerReply::Done))
            }
            TriggerCall::Capture {
                request,
                config_version,
            } => {
                match config {
                    Some(c) if c.active && c.updated_at == config_version => {}
                    Some(c) if c.active => {
                        return Ok(Err(AutomationRefusal::Conflict(
                            "the trigger changed while the request arrived; retry".into(),
                        )));
                    }
                    _ => return Ok(Err(AutomationRefusal::NotFound)),
                }
                Ok(self
                    .capture(ctx, *request)
                    .await?
                    .map(TriggerReply::Captured))
            }
            TriggerCall::Begin(id) => {
                let (Some(config), Some(mut request)) = (config, Self::request(ctx, &id).await?)
                else {
                    return Ok(Ok(TriggerReply::Done));
                };
                let resumable = match request.status {
                    RequestStatus::Captured | RequestStatus::Inprogress => true,
                    RequestStatus::Failed => request.dead_lettered,
                    RequestStatus::Success => false,
                };
                if !resumable {
                    return Ok(Ok(TriggerReply::Done));
                }
                if request.status == RequestStatus::Failed {
                    // A replay from the dead-letter queue.
                    request.status = RequestStatus::Captured;
                    request.dead_lettered = false;
                    request.error = None;
                    request.completed_at = None;
                }
                request.started_at.get_or_insert(ctx.now_ms());
                Self::store(ctx, &request)?;
                Ok(Ok(TriggerReply::Begin(Box::new(config), Box::new(request))))
            }
            TriggerCall::SetSession(id, session) => {
                let Some(mut request) = Self::request(ctx, &id)
                    .await?
                    .filter(|r| r.status.in_flight())
                else {
                    return Ok(Err(AutomationRefusal::NotFound));
                };
                request.status = RequestStatus::Inprogress;
                request.session_id = Some(session);
                Self::store(ctx, &request)?;
                Ok(Ok(TriggerReply::Done))
            }
            TriggerCall::Finish {
                request: id,
                session,
                status,
                error,
                message,
                dead_lettered,
            } => {
                let Some(mut request) = Self::request(ctx, &id).await? else {
                    return Ok(Ok(TriggerReply::Done));
                };
                if !request.status.in_flight() {
                    return Ok(Ok(TriggerReply::Done));
                }
                if session.is_some() && session != request.session_id {
                    // Reference §4: a callback for another session is refused.
                    return Ok(Err(AutomationRefusal::Conflict(
                        "the outcome names another session".into(),
                    )));
                }
                request.status = status;
                request.error = error;
                request.message = message;
                request.dead_lettered = dead_lettered;
                request.completed_at = Some(ctx.now_ms());
                Self::store(ctx, &request)?;
                Ok(Ok(TriggerReply::Done))
            }
        }
    }

    async fn alarm(&self, ctx: &mut ActorContext, alarm: AlarmInfo) -> Result<()> {
        let Some(mut config) = ctx.get::<TriggerConfig>("config").await? else {
            return Ok(());
        };
        let (Some(cron), Some(tz)) = (&config.cron, &config.timezone) else {
            return Ok(());
        };
        if !config.active {
            return Ok(());
        }
        let scheduled = CronSchedule::parse(cron, tz)?;
        let firing = IncomingRequest {
            method: "SCHEDULE".into(),
            ..IncomingRequest::default()
        };
        let request = TriggerRequest::captured(alarm.scheduled_at, firing, String::new());
        match self.capture(ctx, request).await {
            Ok(Ok(id)) => tracing::info!(trigger = %ctx.key(), request = %id, "schedule fired"),
            Ok(Err(_)) => tracing::warn!(trigger = %ctx.key(),
                "schedule fired with {MAX_IN_FLIGHT} requests in flight; this firing is skipped"),
            Err(e) => {
                // Storage trouble: this firing is lost, the schedule is not (a failed alarm
                // run is retried only six times, then it would stop for good).
                ctx.rollback();
                tracing::error!(trigger = %ctx.key(), error = %e,
                    "schedule fired but the request could not be queued; this firing is skipped");
            }
        }
        config.next_fire_at = Some(ctx.schedule_cron(&scheduled)?);
        ctx.put("config", &config)
    }
}

/// Arms (or disarms) the alarm of a scheduled trigger.
fn schedule(ctx: &mut ActorContext, mut config: TriggerConfig) -> Result<TriggerConfig> {
    match (&config.cron, &config.timezone, config.active) {
        (Some(cron), Some(tz), true) => {
            let s = CronSchedule::parse(cron, tz)?;
            config.next_fire_at = Some(ctx.schedule_cron(&s)?);
        }
        _ => {
            config.next_fire_at = None;
            ctx.delete_alarm();
        }
    }
    Ok(config)
}

impl TriggerRequest {
    /// A new `captured` request (its `seq` is set when stored).
    fn captured(received_at: i64, incoming: IncomingRequest, content_type: String) -> Self {
        Self {
            id: format!("req_{}", Uuid::new_v4().simple()),
            seq: 0,
            received_at,
            method: incoming.method,
            path: incoming.path,
            query: incoming.query,
            headers: incoming.headers,
            body: String::from_utf8_lossy(&incoming.body).into_owned(),
            content_type,
            source_ip: incoming.source_ip,
            status: RequestStatus::Captured,
            session_id: None,
            started_at: None,
            completed_at: None,
            error: None,
            message: None,
            dead_lettered: false,
        }
    }
}

/// Most MiniJinja instructions one rendering of a trigger template may run (its fuel): far
/// above what a prompt template needs (a few hundred), far below what would hold a consumer
/// for long (a loop over `range(100000000)` stops within milliseconds).
pub const TEMPLATE_FUEL: u64 = 100_000;

/// Renders a trigger template with MiniJinja. Variables: `body` (text), `bodyJson` (the
/// body pretty-printed when it is JSON, else the text), `payload` (the parsed JSON body, so
/// `{{ payload.pull_request.title }}` works; undefined fields render empty), `method`,
/// `path`, `query`, `headers` (a map; `headers["x-github-event"]`), `sourceIp`, `timestamp`
/// (RFC 3339) (reference §4 placeholders, plus `payload`).
///
/// Errors: the template's syntax or evaluation error, or running out of its
/// [`TEMPLATE_FUEL`] (the message says so); the request then fails with it.
pub fn render(template: &str, request: &TriggerRequest) -> std::result::Result<String, String> {
    let payload: Value = serde_json::from_str(&request.body).unwrap_or(Value::Null);
    let body_json = if payload.is_null() {
        request.body.clone()
    } else {
        serde_json::to_string_pretty(&payload).unwrap_or_default()
    };
    let timestamp = chrono::DateTime::from_timestamp_millis(request.received_at)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    let mut env = minijinja::Environment::new();
    // `payload.a.b` renders empty when `a` is missing, as a template author expects.
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.render_str(
        template,
        minijinja::context! {
            body => request.body,
            bodyJson => body_json,
            payload => minijinja::Value::from_serialize(&payload),
            method => request.method,
            path => request.path,
            query => request.query,
            headers => request.headers,
            sourceIp => request.source_ip,
            timestamp => timestamp,
        },
    )
    .map_err(|e| match e.kind() {
        minijinja::ErrorKind::OutOfFuel => format!(
            "the template ran past its limit of {TEMPLATE_FUEL} instructions (a loop over a \
             large range?)"
        ),
        _ => e.to_string(),
    })
}

pub(crate) fn register(sub: &Substrate, service: Weak<Inner>) {
    sub.actors().register(TriggerActor { service });
    sub.queues()
        .declare(QueueConfig {
            max_attempts: DELIVERY_ATTEMPTS,
            retry_base_ms: 5_000,
            visibility_timeout_ms: 5 * 60_000,
            batch_size: 10,
            concurrency: 8,
            ..QueueConfig::new(DELIVERY_QUEUE)
        })
        .expect("the delivery queue's settings are valid");
    sub.queues()
        .declare(QueueConfig {
            max_attempts: 5,
            ..QueueConfig::new(COMPLETION_QUEUE)
        })
        .expect("the completion queue's settings are valid");
}

pub(crate) fn start(automation: &Automation) {
    let sub = &automation.inner.sub;
    sub.start_consumer(
        DELIVERY_QUEUE,
        Arc::new(DeliveryConsumer(automation.clone())),
    );
    sub.start_consumer(
        COMPLETION_QUEUE,
        Arc::new(CompletionConsumer(automation.clone())),
    );
}

/// Consumes [`DELIVERY_QUEUE`] (reference §4 `processWebhookMessage`).
pub struct DeliveryConsumer(pub Automation);

#[async_trait]
impl Consumer for DeliveryConsumer {
    async fn handle(&self, delivery: &Delivery) -> Result<()> {
        let msg: RequestRef = delivery.body()?;
        let automation = &self.0;
        let outcome = automation.deliver(&msg).await;
        let (status, error, message, retry) = match outcome {
            Ok(Delivered::Started) | Ok(Delivered::Nothing) => return Ok(()),
            Ok(Delivered::Message(m)) => (RequestStatus::Success, None, Some(m), false),
            Err(e) => {
                let transient = e.is_transient();
                (RequestStatus::Failed, Some(e.to_string()), None, transient)
            }
        };
        let last = delivery.attempts >= DELIVERY_ATTEMPTS;
        if retry && !last {
            return Err(kilocloud_substrate::Error::Handler(
                error.unwrap_or_default(),
            ));
        }
        automation
            .finish_request(&msg, None, status, error.clone(), message, retry)
            .await?;
        if retry {
            // Exhausted: the message goes to the dead-letter queue for inspection and
            // replay.
            return Err(kilocloud_substrate::Error::Handler(
                error.unwrap_or_default(),
            ));
        }
        Ok(())
    }
}

/// Consumes [`COMPLETION_QUEUE`]: a trigger session ended.
pub struct CompletionConsumer(pub Automation);

#[async_trait]
impl Consumer for CompletionConsumer {
    async fn handle(&self, delivery: &Delivery) -> Result<()> {
        let msg: CompletionMessage = delivery.body()?;
        let Ok(target) = serde_json::from_value::<RequestRef>(msg.context) else {
            return Ok(());
        };
        let (status, error) = match msg.payload.status {
            ExecStatus::Completed => (RequestStatus::Success, None),
            other => (
                RequestStatus::Failed,
                Some(
                    msg.payload
                        .error_message
                        .unwrap_or_else(|| format!("the session ended {other:?}")),
                ),
            ),
        };
        self.0
            .finish_request(
                &target,
                Some(msg.payload.session_id),
                status,
                error,
                None,
                false,
            )
            .await
    }
}

/// What a delivery did.
enum Delivered {
    /// A session started (or was already started).
    Started,
    /// A chat message was rendered.
    Message(String),
    /// The request is gone or already handled.
    Nothing,
}

/// Parses `user:<id>/<trigger>` into the owner.
fn owner_of(trigger_key: &str) -> Option<Owner> {
    trigger_key.split_once('/')?.0.parse().ok()
}

/// Checks a trigger id: 1–64 of `a-z0-9-_`.
fn valid_trigger_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Automation {
    async fn trigger_call(
        &self,
        key: &str,
        call: TriggerCall,
    ) -> std::result::Result<TriggerReply, AutomationError> {
        self.inner
            .sub
            .actors()
            .call::<TriggerActor>(key, call)
            .await?
            .map_err(|r| r.into_error("trigger"))
    }

    /// Validates `spec` into the stored form.
    fn trigger_config(
        &self,
        owner: Owner,
        user: Uuid,
        spec: TriggerSpec,
    ) -> std::result::Result<TriggerConfig, AutomationError> {
        let bad = |m: String| Err(AutomationError::Invalid(m));
        if !valid_trigger_id(&spec.id) {
            return bad("id: 1–64 characters of a-z, 0-9, - and _".into());
        }
        let template = match &spec.destination {
            Destination::CloudAgent {
                github_repo,
                git_url,
                prompt_template,
                ..
            } => {
                if github_repo.is_some() == git_url.is_some() {
                    return bad("destination: exactly one of githubRepo and gitUrl".into());
                }
                prompt_template
            }
            Destination::Chat { message_template } => message_template,
        };
        if template.trim().is_empty() || template.len() > 100_000 {
            return bad("destination: the template must have 1–100,000 characters".into());
        }
        let env = minijinja::Environment::new();
        if let Err(e) = env.template_from_str(template) {
            return bad(format!("destination: the template does not parse: {e}"));
        }
        let now = self.inner.sub.clock().now_ms();
        let mut config = TriggerConfig {
            id: spec.id.clone(),
            owner: owner.to_string(),
            created_by: user,
            destination: spec.destination,
            activation_type: String::new(),
            cron: None,
            timezone: None,
            next_fire_at: None,
            auth_kind: None,
            auth_header: None,
            active: spec.active,
            created_at: now,
            updated_at: now,
            auth: None,
        };
        match spec.activation {
            Activation::Webhook { auth } => {
                config.activation_type = "webhook".into();
                if let Some(auth) = auth {
                    let header = auth.header.trim().to_ascii_lowercase();
                    if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                        return bad(format!(
                            "activation.auth.header: {header:?} is not a header name"
                        ));
                    }
                    if !(8..=512).contains(&auth.secret.len()) {
                        return bad("activation.auth.secret: 8–512 bytes".into());
                    }
                    let context = format!("trigger:{owner}/{}", spec.id);
                    config.auth_kind = Some(auth.kind);
                    config.auth_header = Some(header.clone());
                    config.auth = Some(match auth.kind {
                        AuthKind::Header => StoredAuth {
                            kind: auth.kind,
                            header,
                            secret_sha256: Some(hex::encode(Sha256::digest(
                                auth.secret.as_bytes(),
                            ))),
                            sealed_key: None,
                        },
                        AuthKind::Hmac => StoredAuth {
                            kind: auth.kind,
                            header,
                            secret_sha256: None,
                            sealed_key: Some(
                                self.inner.identity.seal(auth.secret.as_bytes(), &context),
                            ),
                        },
                    });
                }
            }
            Activation::Schedule { cron, timezone } => {
                CronSchedule::parse(&cron, &timezone)
                    .map_err(|e| AutomationError::Invalid(format!("activation: {e}")))?;
                config.activation_type = "schedule".into();
                config.cron = Some(cron);
                config.timezone = Some(timezone);
            }
        }
        Ok(config)
    }

    /// Creates a trigger of `owner`, acting as `user`.
    ///
    /// Errors: [`AutomationError::Invalid`] naming the bad field; [`AutomationError::Conflict`]
    /// when the id is taken.
    pub async fn create_trigger(
        &self,
        owner: Owner,
        user: Uuid,
        spec: TriggerSpec,
    ) -> std::result::Result<TriggerConfig, AutomationError> {
        let config = self.trigger_config(owner, user, spec)?;
        let key = format!("{owner}/{}", config.id);
        match self
            .trigger_call(&key, TriggerCall::Create(Box::new(config)))
            .await?
        {
            TriggerReply::Config(c) => Ok(c.shown()),
            _ => Err(AutomationError::NotFound("trigger")),
        }
    }

    /// Replaces trigger `id`'s configuration (the id and creation time stay; sessions act as
    /// `user` from now on).
    ///
    /// Errors: as [`Automation::create_trigger`], and [`AutomationError::NotFound`].
    pub async fn update_trigger(
        &self,
        owner: Owner,
        user: Uuid,
        id: &str,
        spec: TriggerSpec,
    ) -> std::result::Result<TriggerConfig, AutomationError> {
        let config = self.trigger_config(
            owner,
            user,
            TriggerSpec {
                id: id.to_owned(),
                ..spec
            },
        )?;
        match self
            .trigger_call(
                &format!("{owner}/{id}"),
                TriggerCall::Update(Box::new(config)),
            )
            .await?
        {
            TriggerReply::Config(c) => Ok(c.shown()),
            _ => Err(AutomationError::NotFound("trigger")),
        }
    }

    /// Deletes trigger `id` with its requests and schedule.
    ///
    /// Errors: [`AutomationError::NotFound`].
    pub async fn delete_trigger(
        &self,
        owner: Owner,
        id: &str,
    ) -> std::result::Result<(), AutomationError> {
        if !valid_trigger_id(id) {
            return Err(AutomationError::NotFound("trigger"));
        }
        self.trigger_call(&format!("{owner}/{id}"), TriggerCall::Delete)
            .await
            .map(|_| ())
    }

    /// Trigger `id` of `owner` (secrets left out).
    ///
    /// Errors: [`AutomationError::NotFound`].
    pub async fn trigger(
        &self,
        owner: Owner,
        id: &str,
    ) -> std::result::Result<TriggerConfig, AutomationError> {
        Ok(self.stored_trigger(owner, id).await?.shown())
    }

    /// Trigger `id` of `owner` as stored, with its authentication.
    async fn stored_trigger(
        &self,
        owner: Owner,
        id: &str,
    ) -> std::result::Result<TriggerConfig, AutomationError> {
        if !valid_trigger_id(id) {
            return Err(AutomationError::NotFound("trigger"));
        }
        self.inner
            .sub
            .actor_read(TRIGGER_ACTOR, &format!("{owner}/{id}"), "config")
            .await?
            .ok_or(AutomationError::NotFound("trigger"))
    }

    /// `owner`'s triggers, by id.
    pub async fn triggers(
        &self,
        owner: Owner,
    ) -> std::result::Result<Vec<TriggerConfig>, AutomationError> {
        let prefix = format!("{owner}/");
        let mut out = Vec::new();
        let mut after = prefix.clone();
        loop {
            let keys = self
                .inner
                .sub
                .actor_keys(TRIGGER_ACTOR, &after, 200)
                .await?;
            let full = keys.len() == 200;
            for key in &keys {
                if !key.starts_with(&prefix) {
                    return Ok(out);
                }
                if let Some(c) = self
                    .inner
                    .sub
                    .actor_read::<TriggerConfig>(TRIGGER_ACTOR, key, "config")
                    .await?
                {
                    out.push(c.shown());
                }
            }
            match keys.last() {
                Some(last) if full => after = last.clone(),
                _ => return Ok(out),
            }
        }
    }

    /// The newest `limit` (1–100) requests of trigger `id`, newest first.
    ///
    /// Errors: [`AutomationError::NotFound`].
    pub async fn trigger_requests(
        &self,
        owner: Owner,
        id: &str,
        limit: usize,
    ) -> std::result::Result<Vec<TriggerRequest>, AutomationError> {
        self.trigger(owner, id).await?;
        let mut all: Vec<TriggerRequest> = self
            .inner
            .sub
            .actor_scan(
                TRIGGER_ACTOR,
                &format!("{owner}/{id}"),
                "req/",
                "",
                KEPT_REQUESTS as u32 + MAX_IN_FLIGHT as u32,
            )
            .await?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        all.reverse();
        all.truncate(limit.clamp(1, KEPT_REQUESTS));
        Ok(all)
    }

    /// One request of trigger `id`.
    ///
    /// Errors: [`AutomationError::NotFound`].
    pub async fn trigger_request(
        &self,
        owner: Owner,
        id: &str,
        request: &str,
    ) -> std::result::Result<TriggerRequest, AutomationError> {
        let key = format!("{owner}/{id}");
        let seq: u64 = self
            .inner
            .sub
            .actor_read(TRIGGER_ACTOR, &key, &format!("rid/{request}"))
            .await?
            .ok_or(AutomationError::NotFound("request"))?;
        self.inner
            .sub
            .actor_read(TRIGGER_ACTOR, &key, &format!("req/{seq:020}"))
            .await?
            .ok_or(AutomationError::NotFound("request"))
    }

    /// Captures a webhook request for trigger `id` of `owner` (`POST /hooks/…`); returns
    /// the request id.
    ///
    /// Errors: [`AutomationError::NotFound`] for an unknown, inactive or scheduled trigger;
    /// [`AutomationError::TooLarge`] over 256 KiB; [`AutomationError::UnsupportedMediaType`]
    /// for binary content; [`AutomationError::Unauthorized`] when the authentication header is
    /// missing or wrong; [`AutomationError::TooManyInFlight`] with 20 in flight.
    pub async fn capture(
        &self,
        owner: Owner,
        id: &str,
        incoming: IncomingRequest,
    ) -> std::result::Result<String, AutomationError> {
        let config = match self.stored_trigger(owner, id).await {
            Ok(c) if c.active && c.activation_type == "webhook" => c,
            Ok(_) | Err(AutomationError::NotFound(_)) => {
                return Err(AutomationError::NotFound("trigger"));
            }
            Err(e) => return Err(e),
        };
        if incoming.body.len() > MAX_BODY_BYTES {
            return Err(AutomationError::TooLarge {
                size: incoming.body.len(),
                limit: MAX_BODY_BYTES,
            });
        }
        let content_type = incoming
            .headers
            .get("content-type")
            .cloned()
            .unwrap_or_default();
        let ct = content_type.to_ascii_lowercase();
        if ["multipart/", "image/", "audio/", "video/"]
            .iter()
            .any(|p| ct.starts_with(p))
            || ["octet-stream", "pdf", "zip"]
                .iter()
                .any(|p| ct.contains(p))
        {
            return Err(AutomationError::UnsupportedMediaType(content_type));
        }
        let mut headers = incoming.headers;
        if let Some(auth) = &config.auth {
            let presented = headers.remove(&auth.header).unwrap_or_default();
            let ok = match auth.kind {
                AuthKind::Header => {
                    let digest = hex::encode(Sha256::digest(presented.as_bytes()));
                    let expected = auth.secret_sha256.as_deref().unwrap_or_default();
                    bool::from(digest.as_bytes().ct_eq(expected.as_bytes()))
                }
                AuthKind::Hmac => {
                    let context = format!("trigger:{owner}/{id}");
                    let key = auth
                        .sealed_key
                        .as_ref()
                        .and_then(|k| self.inner.identity.open(k, &context).ok())
                        .unwrap_or_default();
                    !key.is_empty()
                        && crate::github::verify_signature(&[key], Some(&presented), &incoming.body)
                }
            };
            if !ok {
                return Err(AutomationError::Unauthorized(
                    "the trigger's authentication header is missing or wrong",
                ));
            }
        }
        let received_at = self.inner.sub.clock().now_ms();
        let request = TriggerRequest::captured(
            received_at,
            IncomingRequest {
                headers,
                ..incoming
            },
            content_type,
        );
        let reply = self
            .inner
            .sub
            .actors()
            .call::<TriggerActor>(
                &format!("{owner}/{id}"),
                TriggerCall::Capture {
                    request: Box::new(request),
                    config_version: config.updated_at,
                },
            )
            .await?;
        match reply {
            Ok(TriggerReply::Captured(id)) => Ok(id),
            Err(AutomationRefusal::Conflict(m)) if m.starts_with("in_flight:") => {
                Err(AutomationError::TooManyInFlight {
                    in_flight: m["in_flight:".len()..].parse().unwrap_or(MAX_IN_FLIGHT),
                    limit: MAX_IN_FLIGHT,
                })
            }
            Err(r) => Err(r.into_error("trigger")),
            Ok(_) => Err(AutomationError::NotFound("trigger")),
        }
    }

    /// Delivers one captured request (reference §4 steps 1–6).
    async fn deliver(&self, msg: &RequestRef) -> std::result::Result<Delivered, AutomationError> {
        let Some(owner) = owner_of(&msg.trigger) else {
            return Ok(Delivered::Nothing);
        };
        let (config, request) = match self
            .trigger_call(&msg.trigger, TriggerCall::Begin(msg.request.clone()))
            .await?
        {
            TriggerReply::Begin(c, r) => (*c, *r),
            _ => {
                tracing::info!(trigger = %msg.trigger, request = %msg.request,
                    "request gone or already handled; delivery acknowledged");
                return Ok(Delivered::Nothing);
            }
        };
        let (github_repo, git_url, mode, model, template, auto_commit) = match &config.destination {
            Destination::Chat { message_template } => {
                return render(message_template, &request)
                    .map(Delivered::Message)
                    .map_err(|e| AutomationError::Invalid(format!("template: {e}")));
            }
            Destination::CloudAgent {
                github_repo,
                git_url,
                mode,
                model,
                prompt_template,
                auto_commit,
            } => (
                github_repo,
                git_url,
                mode,
                model,
                prompt_template,
                auto_commit,
            ),
        };
        let caller = self.acting_caller(owner, config.created_by).await?;
        let session_id = match &request.session_id {
            Some(s) => s.clone(),
            None => {
                let prompt = render(template, &request)
                    .map_err(|e| AutomationError::Invalid(format!("template: {e}")))?;
                let git_token = match github_repo {
                    Some(repo) if self.inner.github.is_some() => {
                        match self.token_for_repo(owner, repo).await {
                            Ok((_, token)) => Some(token.token),
                            // No installation: clone anonymously (a public repository).
                            Err(AutomationError::NotFound(_)) => None,
                            Err(e) => return Err(e),
                        }
                    }
                    _ => None,
                };
                let prepared = self
                    .inner
                    .agents
                    .prepare(
                        caller,
                        PrepareRequest {
                            github_repo: github_repo.clone(),
                            git_url: git_url.clone(),
                            git_token,
                            mode: *mode,
                            model: model.clone(),
                            prompt,
                            auto_commit: *auto_commit,
                            notify: Some(CompletionNotice {
                                queue: COMPLETION_QUEUE.into(),
                                context: json!(msg),
                            }),
                            ..PrepareRequest::default()
                        },
                    )
                    .await?;
                self.trigger_call(
                    &msg.trigger,
                    TriggerCall::SetSession(msg.request.clone(), prepared.session_id.clone()),
                )
                .await?;
                prepared.session_id
            }
        };
        match self.inner.agents.initiate(caller, &session_id).await {
            Ok(_) => Ok(Delivered::Started),
            // Initiated by an earlier delivery of the same message.
            Err(AgentError::Conflict { .. }) => Ok(Delivered::Started),
            Err(e) => Err(e.into()),
        }
    }

    async fn finish_request(
        &self,
        target: &RequestRef,
        session: Option<String>,
        status: RequestStatus,
        error: Option<String>,
        message: Option<String>,
        dead_lettered: bool,
    ) -> Result<()> {
        let call = TriggerCall::Finish {
            request: target.request.clone(),
            session,
            status,
            error,
            message,
            dead_lettered,
        };
        match self
            .inner
            .sub
            .actors()
            .call::<TriggerActor>(&target.trigger, call)
            .await?
        {
            Ok(_) => Ok(()),
            Err(refusal) => {
                tracing::warn!(trigger = %target.trigger, request = %target.request,
                    ?refusal, "trigger outcome refused");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: &str) -> TriggerRequest {
        TriggerRequest {
            id: "req_1".into(),
            seq: 1,
            received_at: 1_764_000_000_000,
            method: "POST".into(),
            path: "/hooks/x".into(),
            query: "a=1".into(),
            headers: BTreeMap::from([("x-event".into(), "push".into())]),
            body: body.into(),
            content_type: "application/json".into(),
            source_ip: "127.0.0.1".into(),
            status: RequestStatus::Captured,
            session_id: None,
            started_at: None,
            completed_at: None,
            error: None,
            message: None,
            dead_lettered: false,
        }
    }

    #[test]
    fn templates_see_the_request_and_the_parsed_payload() {
        let r = request(r#"{"issue": {"title": "Crash on start", "number": 7}}"#);
        let out = render(
            "{{ method }} {{ headers['x-event'] }}: fix #{{ payload.issue.number }} \
             {{ payload.issue.title }}{{ payload.missing.field }} at {{ timestamp }}",
            &r,
        )
        .unwrap();
        assert_eq!(
            out,
            "POST push: fix #7 Crash on start at 2025-11-24T16:00:00.000Z"
        );
        assert!(render("{{ bodyJson }}", &r).unwrap().contains("\n"));
        assert_eq!(render("{{ body }}", &request("plain")).unwrap(), "plain");
        assert!(render("{% if %}", &r).is_err());
    }

    /// Templates that would loop a hundred million times fail at once with a clear error.
    #[test]
    fn runaway_templates_run_out_of_fuel() {
        let r = request("{}");
        let started = std::time::Instant::now();
        for (template, error) in [
            // MiniJinja refuses a single huge range by itself.
            (
                "{% for i in range(100000000) %}x{% endfor %}",
                "range has too many elements",
            ),
            // Nested loops of allowed ranges are stopped by the fuel.
            (
                "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}",
                "limit of 100000 instructions",
            ),
            (
                "{% for i in range(100000) %}{{ i }}{% endfor %}",
                "limit of 100000 instructions",
            ),
        ] {
            let err = render(template, &r).unwrap_err();
            assert!(err.contains(error), "{template}: {err}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        // An ordinary loop has fuel to spare.
        let out = render("{% for i in range(1000) %}.{% endfor %}", &r).unwrap();
        assert_eq!(out.len(), 1000);
    }

    #[test]
    fn trigger_ids_are_slugs() {
        assert!(valid_trigger_id("nightly-triage_2"));
        assert!(!valid_trigger_id(""));
        assert!(!valid_trigger_id("Upper"));
        assert!(!valid_trigger_id("a/b"));
        assert!(!valid_trigger_id(&"a".repeat(65)));
    }
}
