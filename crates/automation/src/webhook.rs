//! GitHub webhook ingest (`POST /api/github/webhook`).
//!
//! In order: the `X-Hub-Signature-256` HMAC is verified against the configured secrets (a bad
//! or missing one is 401 and nothing is stored or queued); the body must be JSON; the delivery
//! id (`X-GitHub-Delivery`) is claimed in the actor `github_delivery` (key: the id), which
//! forgets it 24 h later, so a redelivery within a day is answered 200 without being processed
//! again; the installation maps the event to its owner; the event is routed by
//! `X-GitHub-Event` and `action`. Events and actions nobody handles are accepted and recorded
//! with the outcome `ignored`. If routing fails the claim is released, so GitHub's redelivery
//! is processed.

use kilocloud_substrate::{Actor, ActorContext, Result, Substrate};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use kilocloud_identity::Owner;
use uuid::Uuid;

use crate::github::InstallationInfo;
use crate::review::PullRequestEvent;
use crate::{Automation, AutomationError};

/// Actor type of one delivery.
pub const DELIVERY_ACTOR: &str = "github_delivery";
/// How long a delivery id is remembered, ms (24 h).
pub const DEDUP_WINDOW_MS: i64 = 24 * 3_600_000;
/// A delivery still `processing` this long after its claim may be claimed again, ms.
pub const STALE_CLAIM_MS: i64 = 60_000;
/// Largest webhook body accepted, bytes (GitHub caps payloads at 25 MB; we take 5 MiB).
pub const MAX_WEBHOOK_BYTES: usize = 5 << 20;

/// What happened to a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRecord {
    /// `X-GitHub-Delivery`.
    pub delivery: String,
    /// `X-GitHub-Event`.
    pub event: String,
    /// The payload's `action`, if any.
    pub action: Option<String>,
    /// The payload's installation id, if any.
    pub installation_id: Option<u64>,
    /// Receipt time, ms.
    pub received_at: i64,
    /// `processing`, or what routing did (`review queued`, `ignored: …`).
    pub outcome: String,
    /// True in a reply when this delivery id was seen before (and not processed again).
    #[serde(default)]
    pub duplicate: bool,
}

/// Calls of [`DeliveryActor`].
#[derive(Debug)]
pub enum DeliveryCall {
    /// Claims the delivery id: the stored record if seen before, else stores this one.
    Claim(DeliveryRecord),
    /// Records the outcome.
    Settle(String),
    /// Forgets the delivery (routing failed; GitHub may redeliver).
    Release,
}

/// Remembers one delivery id for 24 h.
pub struct DeliveryActor;

impl Actor for DeliveryActor {
    const TYPE: &'static str = DELIVERY_ACTOR;
    type Call = DeliveryCall;
    type Reply = Option<DeliveryRecord>;

    async fn call(&self, ctx: &mut ActorContext, call: DeliveryCall) -> Result<Self::Reply> {
        match call {
            DeliveryCall::Claim(record) => {
                if let Some(seen) = ctx.get::<DeliveryRecord>("record").await? {
                    // A claim still `processing` after a minute belongs to a node that died
                    // mid-delivery: the redelivery takes it over.
                    let stale = seen.outcome == "processing"
                        && record.received_at - seen.received_at > STALE_CLAIM_MS;
                    if !stale {
                        return Ok(Some(seen));
                    }
                }
                ctx.put("record", &record)?;
                ctx.set_alarm(record.received_at + DEDUP_WINDOW_MS);
                Ok(None)
            }
            DeliveryCall::Settle(outcome) => {
                let Some(mut record) = ctx.get::<DeliveryRecord>("record").await? else {
                    return Ok(None);
                };
                record.outcome = outcome;
                ctx.put("record", &record)?;
                Ok(Some(record))
            }
            DeliveryCall::Release => {
                ctx.delete_all();
                Ok(None)
            }
        }
    }

    async fn alarm(
        &self,
        ctx: &mut ActorContext,
        _alarm: kilocloud_substrate::AlarmInfo,
    ) -> Result<()> {
        ctx.delete_all();
        Ok(())
    }
}

pub(crate) fn register(sub: &Substrate) {
    sub.actors().register(DeliveryActor);
}

/// A verified, first-seen delivery of an installation an owner claimed, as handed to a
/// [`DeliverySink`].
#[derive(Debug, Clone)]
pub struct InboundDelivery {
    /// `X-GitHub-Delivery`.
    pub delivery: String,
    /// `X-GitHub-Event`.
    pub event: String,
    /// The installation's owner.
    pub owner: Owner,
    /// The user who claimed the installation.
    pub user: Uuid,
    /// The installation.
    pub installation_id: u64,
    /// The parsed body.
    pub payload: Value,
}

/// Another service that takes GitHub deliveries (KiCI). It must persist what it needs
/// before it returns (a queue message), so that a delivery it accepted survives a crash;
/// an error releases the delivery's dedup claim, so GitHub's redelivery is processed.
#[async_trait::async_trait]
pub trait DeliverySink: Send + Sync + 'static {
    /// Takes one delivery; returns an outcome to record beside automation's, or `None` when
    /// the delivery is not for it.
    ///
    /// Errors: a message when it could not persist the delivery.
    async fn deliver(&self, delivery: &InboundDelivery) -> Result<Option<String>, String>;
}

/// The headers of a delivery that ingest reads.
#[derive(Debug, Clone, Copy)]
pub struct WebhookHeaders<'a> {
    /// `X-GitHub-Event`.
    pub event: Option<&'a str>,
    /// `X-GitHub-Delivery`.
    pub delivery: Option<&'a str>,
    /// `X-Hub-Signature-256`.
    pub signature: Option<&'a str>,
}

impl Automation {
    /// Ingests one GitHub webhook delivery (see the module docs).
    ///
    /// Errors: [`AutomationError::Disabled`] without a GitHub App;
    /// [`AutomationError::Unauthorized`] for a bad or missing signature (checked first);
    /// [`AutomationError::Invalid`] without the event or delivery header or with a body that
    /// is not JSON; others when routing fails (the delivery is then not remembered).
    pub async fn github_webhook(
        &self,
        headers: WebhookHeaders<'_>,
        body: &[u8],
    ) -> Result<DeliveryRecord, AutomationError> {
        let github = self.github_or_disabled()?;
        if !github.verify(headers.signature, body) {
            metrics::counter!("kilocloud_github_webhooks_total", "outcome" => "bad_signature")
                .increment(1);
            return Err(AutomationError::Unauthorized(
                "X-Hub-Signature-256 is missing or does not match",
            ));
        }
        let event = headers
            .event
            .filter(|e| !e.is_empty())
            .ok_or_else(|| AutomationError::Invalid("X-GitHub-Event is required".into()))?;
        let delivery = headers
            .delivery
            .filter(|d| !d.is_empty() && d.len() <= 100)
            .ok_or_else(|| {
                AutomationError::Invalid("X-GitHub-Delivery is required (1–100 chars)".into())
            })?;
        let payload: Value = serde_json::from_slice(body)
            .map_err(|e| AutomationError::Invalid(format!("body is not JSON: {e}")))?;
        let action = payload["action"].as_str().map(str::to_owned);
        let installation_id = payload["installation"]["id"].as_u64();
        let record = DeliveryRecord {
            delivery: delivery.to_owned(),
            event: event.to_owned(),
            action: action.clone(),
            installation_id,
            received_at: self.inner.sub.clock().now_ms(),
            outcome: "processing".into(),
            duplicate: false,
        };
        let actors = self.inner.sub.actors();
        if let Some(seen) = actors
            .call::<DeliveryActor>(delivery, DeliveryCall::Claim(record.clone()))
            .await?
        {
            metrics::counter!("kilocloud_github_webhooks_total", "outcome" => "duplicate")
                .increment(1);
            return Ok(DeliveryRecord {
                duplicate: true,
                ..seen
            });
        }
        let routed = match self.route(event, action.as_deref(), &payload).await {
            Ok(outcome) => self
                .sink(delivery, event, &payload)
                .await
                .map(|sunk| match sunk {
                    Some(ci) => format!("{outcome}; {ci}"),
                    None => outcome,
                }),
            Err(e) => Err(e),
        };
        match routed {
            Ok(outcome) => {
                metrics::counter!("kilocloud_github_webhooks_total", "outcome" => "accepted")
                    .increment(1);
                tracing::info!(%delivery, %event, action = action.as_deref().unwrap_or(""),
                    %outcome, "github webhook");
                let settled = actors
                    .call::<DeliveryActor>(delivery, DeliveryCall::Settle(outcome.clone()))
                    .await?;
                Ok(settled.unwrap_or(DeliveryRecord { outcome, ..record }))
            }
            Err(e) => {
                if let Err(release) = actors
                    .call::<DeliveryActor>(delivery, DeliveryCall::Release)
                    .await
                {
                    tracing::warn!(%delivery, error = %release, "cannot release a failed delivery");
                }
                Err(e)
            }
        }
    }

    /// The delivery's record, if seen in the last 24 h.
    pub async fn delivery(&self, id: &str) -> Result<Option<DeliveryRecord>, AutomationError> {
        Ok(self
            .inner
            .sub
            .actor_read(DELIVERY_ACTOR, id, "record")
            .await?)
    }

    /// Hands the delivery to the sink, if one is set and the installation is claimed.
    async fn sink(
        &self,
        delivery: &str,
        event: &str,
        payload: &Value,
    ) -> Result<Option<String>, AutomationError> {
        let Some(sink) = self.inner.sink.get() else {
            return Ok(None);
        };
        let Some(id) = payload["installation"]["id"].as_u64() else {
            return Ok(None);
        };
        let Some((owner, user)) = self.installation(id).await?.and_then(|i| i.active_owner())
        else {
            return Ok(None);
        };
        let inbound = InboundDelivery {
            delivery: delivery.to_owned(),
            event: event.to_owned(),
            owner,
            user,
            installation_id: id,
            payload: payload.clone(),
        };
        sink.deliver(&inbound)
            .await
            .map_err(AutomationError::Unavailable)
    }

    /// Routes a verified, first-seen delivery; returns its outcome.
    async fn route(
        &self,
        event: &str,
        action: Option<&str>,
        payload: &Value,
    ) -> Result<String, AutomationError> {
        let installation = &payload["installation"];
        match (event, action) {
            ("installation", Some(action)) => {
                let info = InstallationInfo {
                    id: installation["id"].as_u64().ok_or_else(|| {
                        AutomationError::Invalid("installation.id is missing".into())
                    })?,
                    account_login: installation["account"]["login"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    account_type: installation["account"]["type"]
                        .as_str()
                        .unwrap_or("User")
                        .to_owned(),
                    suspended: !installation["suspended_at"].is_null(),
                };
                let record = self.observe_installation(action, info).await?;
                Ok(format!(
                    "installation {} {action}{}",
                    record.id,
                    if record.owner.is_some() {
                        ""
                    } else {
                        " (not claimed by an owner yet)"
                    }
                ))
            }
            ("pull_request", Some(action)) => {
                let Some(id) = installation["id"].as_u64() else {
                    return Ok("ignored: no installation in the payload".into());
                };
                let Some((owner, user)) =
                    self.installation(id).await?.and_then(|i| i.active_owner())
                else {
                    return Ok(format!(
                        "ignored: installation {id} is not claimed by an owner"
                    ));
                };
                let Some(pr) = PullRequestEvent::parse(action, id, payload) else {
                    return Ok("ignored: pull_request payload without repository or head".into());
                };
                self.on_pull_request(owner, user, pr).await
            }
            _ => Ok(format!(
                "ignored: {event}{} is not handled",
                action.map(|a| format!(".{a}")).unwrap_or_default()
            )),
        }
    }
}
