//! Generic webhook sources (reference `kici.md` §7.2, direct ingestion): an owner registers a
//! source bound to a repository branch (where its lock file is read) and gets a secret, shown
//! once, and a URL, `POST /api/ci/webhooks/<source id>`. A delivery there is checked in
//! order: the source exists (404); the body is within `maxPayloadBytes` (413, default 1 MiB);
//! the signature verifies (401): `hmac-sha256` (header `x-signature-256`, `sha256=<hex HMAC of
//! the raw body>`, constant-time) or `api-key` (header `authorization`, `Bearer ` stripped,
//! constant-time); the idempotency key (header `x-idempotency-key`, else `x-delivery-id`,
//! else `x-request-id`, else a new UUID) was not seen within `dedupWindowSeconds` (default
//! 300; a repeat answers `duplicate`). The event type comes from `x-event-type` (default
//! empty). The lock file is then read at the branch's current commit and every workflow
//! whose `genericWebhook` trigger names this source (and, if it lists events, this event)
//! gets a run. The secret is sealed with the master key at rest.

use kilocloud_identity::Owner;
use kilocloud_identity::envelope::Envelope;
use kilocloud_kici::decide;
use kilocloud_kici::trigger::Event;
use kilocloud_substrate::{Actor, ActorContext, AlarmInfo, Result, UnixMs};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::pipeline::{LOCK_PATH, Lock, RunSource};
use crate::{Ci, CiError, INDEX_ACTOR, IndexActor, IndexCall};

/// Actor type of a generic source (key: its id).
pub const SOURCE_ACTOR: &str = "kici_source";
/// Largest body any source may accept, bytes (the route's own cap).
pub const MAX_SOURCE_PAYLOAD: usize = 5 << 20;

/// What an owner asks for (`POST /api/ci/sources`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    /// The name `genericWebhook` triggers use (`source: <name>`); 1–64 of a-z, 0-9, - and _.
    pub name: String,
    /// `owner/name` on GitHub: where the lock file is read (through the owner's installation).
    pub repo: String,
    /// The branch whose tip commit runs. Default `main`.
    #[serde(default)]
    pub branch: Option<String>,
    /// Clone URL. Default `https://github.com/<repo>.git`.
    #[serde(default)]
    pub clone_url: Option<String>,
    /// `hmac-sha256` (default) or `api-key`.
    #[serde(default)]
    pub method: Option<String>,
    /// The header carrying the signature or key. Default `x-signature-256` or
    /// `authorization`.
    #[serde(default)]
    pub header: Option<String>,
    /// Deliveries with the same idempotency key within this many seconds are duplicates.
    /// Default 300.
    #[serde(default)]
    pub dedup_window_seconds: Option<u64>,
    /// Largest body accepted, bytes. Default 1 MiB; at most 5 MiB.
    #[serde(default)]
    pub max_payload_bytes: Option<usize>,
}

/// A source as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceRecord {
    /// UUID.
    pub id: String,
    /// Owner key.
    pub owner: String,
    /// Its name.
    pub name: String,
    /// Repository.
    pub repo: String,
    /// Branch.
    pub branch: String,
    /// Clone URL.
    pub clone_url: String,
    /// The owner's installation on the repository's account.
    pub installation_id: u64,
    /// `hmac-sha256` or `api-key`.
    pub method: String,
    /// Header of the signature or key.
    pub header: String,
    /// Dedup window, ms.
    pub dedup_window_ms: u64,
    /// Body cap, bytes.
    pub max_payload_bytes: usize,
    /// When created.
    pub created_at: UnixMs,
    /// The secret, sealed (context `kici-source:<id>`).
    secret: Envelope,
}

/// A source without its secret (what the API shows).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceView {
    /// UUID.
    pub id: String,
    /// Name.
    pub name: String,
    /// Repository.
    pub repo: String,
    /// Branch.
    pub branch: String,
    /// `hmac-sha256` or `api-key`.
    pub method: String,
    /// Signature header.
    pub header: String,
    /// Where deliveries go.
    pub path: String,
    /// Dedup window, s.
    pub dedup_window_seconds: u64,
    /// Body cap, bytes.
    pub max_payload_bytes: usize,
}

impl From<&SourceRecord> for SourceView {
    fn from(r: &SourceRecord) -> Self {
        Self {
            id: r.id.clone(),
            name: r.name.clone(),
            repo: r.repo.clone(),
            branch: r.branch.clone(),
            method: r.method.clone(),
            header: r.header.clone(),
            path: format!("/api/ci/webhooks/{}", r.id),
            dedup_window_seconds: r.dedup_window_ms / 1000,
            max_payload_bytes: r.max_payload_bytes,
        }
    }
}

/// What a delivery to a source became.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenericOutcome {
    /// The delivery id (`generic:<source>:<idempotency key>`).
    pub delivery: String,
    /// The event type.
    pub event_type: String,
    /// Seen within the window: nothing was done.
    pub duplicate: bool,
    /// Runs started.
    pub runs: Vec<String>,
    /// What happened (`runs …`, `no workflow matched`, `lockfile_missing …`).
    pub outcome: String,
}

/// Calls of [`SourceActor`].
#[derive(Debug)]
pub enum SourceCall {
    /// Stores the source.
    Create(Box<SourceRecord>),
    /// Claims an idempotency key; replies whether it was already claimed within the window.
    Claim(String),
    /// Gives a claim back (the delivery failed, so a retry is processed).
    Release(String),
}

/// One generic source: its record and the idempotency keys of its window (`d/<key>`), purged
/// by the alarm.
pub struct SourceActor;

impl Actor for SourceActor {
    const TYPE: &'static str = SOURCE_ACTOR;
    type Call = SourceCall;
    type Reply = bool;

    async fn call(&self, ctx: &mut ActorContext, call: SourceCall) -> Result<bool> {
        match call {
            SourceCall::Create(record) => {
                ctx.put("source", &record)?;
                Ok(false)
            }
            SourceCall::Claim(key) => {
                let Some(record) = ctx.get::<SourceRecord>("source").await? else {
                    return Ok(true);
                };
                let now = ctx.now_ms();
                let slot = format!("d/{}", hex::encode(&key));
                if let Some(at) = ctx.get::<UnixMs>(&slot).await?
                    && now - at < record.dedup_window_ms as i64
                {
                    return Ok(true);
                }
                ctx.put(&slot, &now)?;
                if ctx.alarm().await?.is_none() {
                    ctx.set_alarm(now + record.dedup_window_ms as i64);
                }
                Ok(false)
            }
            SourceCall::Release(key) => {
                ctx.delete(&format!("d/{}", hex::encode(&key)));
                Ok(false)
            }
        }
    }

    async fn alarm(&self, ctx: &mut ActorContext, _alarm: AlarmInfo) -> Result<()> {
        let Some(record) = ctx.get::<SourceRecord>("source").await? else {
            return Ok(());
        };
        let now = ctx.now_ms();
        let window = record.dedup_window_ms as i64;
        let mut oldest = None::<UnixMs>;
        for (key, at) in ctx.list::<UnixMs>("d/").await? {
            if now - at >= window {
                ctx.delete(&key);
            } else {
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
            }
        }
        if let Some(at) = oldest {
            ctx.set_alarm(at + window);
        }
        Ok(())
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Ci {
    /// Registers a generic source for `owner`, bound to `repo`'s `branch` through the
    /// owner's installation `installation_id`. Replies the source and its secret (shown
    /// once).
    ///
    /// Errors: [`CiError::Invalid`] for a bad name, method, header or limit.
    pub async fn create_source(
        &self,
        owner: Owner,
        installation_id: u64,
        spec: SourceSpec,
    ) -> std::result::Result<(SourceView, String), CiError> {
        if !valid_name(&spec.name) {
            return Err(CiError::Invalid(
                "name must be 1–64 of a-z, 0-9, - and _".into(),
            ));
        }
        let method = spec.method.unwrap_or_else(|| "hmac-sha256".into());
        let header = match (method.as_str(), spec.header) {
            (_, Some(h)) if h.is_empty() || h.parse::<http::HeaderName>().is_err() => {
                return Err(CiError::Invalid(format!("{h:?} is not a header name")));
            }
            (_, Some(h)) => h.to_ascii_lowercase(),
            ("hmac-sha256", None) => "x-signature-256".into(),
            ("api-key", None) => "authorization".into(),
            (other, None) => {
                return Err(CiError::Invalid(format!(
                    "method {other:?} is neither hmac-sha256 nor api-key"
                )));
            }
        };
        if method != "hmac-sha256" && method != "api-key" {
            return Err(CiError::Invalid(format!(
                "method {method:?} is neither hmac-sha256 nor api-key"
            )));
        }
        let max_payload_bytes = spec.max_payload_bytes.unwrap_or(1 << 20);
        if max_payload_bytes == 0 || max_payload_bytes > MAX_SOURCE_PAYLOAD {
            return Err(CiError::Invalid(format!(
                "maxPayloadBytes must be 1–{MAX_SOURCE_PAYLOAD}"
            )));
        }
        let id = uuid::Uuid::now_v7().to_string();
        let secret = format!("kws_{}", hex::encode(rand::random::<[u8; 32]>()));
        let record = SourceRecord {
            id: id.clone(),
            owner: owner.to_string(),
            name: spec.name,
            clone_url: spec
                .clone_url
                .unwrap_or_else(|| format!("https://github.com/{}.git", spec.repo)),
            repo: spec.repo,
            branch: spec.branch.unwrap_or_else(|| "main".into()),
            installation_id,
            method,
            header,
            dedup_window_ms: spec.dedup_window_seconds.unwrap_or(300) * 1000,
            max_payload_bytes,
            created_at: self.sub().clock().now_ms(),
            secret: self
                .identity()
                .seal(secret.as_bytes(), &format!("kici-source:{id}")),
        };
        let view = SourceView::from(&record);
        self.sub()
            .actors()
            .call::<IndexActor>(
                &owner.to_string(),
                IndexCall::Put(format!("s/{id}"), json!({"id": id})),
            )
            .await?;
        self.sub()
            .actors()
            .call::<SourceActor>(&id, SourceCall::Create(Box::new(record)))
            .await?;
        Ok((view, secret))
    }

    /// The owner's generic sources.
    ///
    /// Errors: [`CiError::Substrate`].
    pub async fn sources(&self, owner: Owner) -> std::result::Result<Vec<SourceView>, CiError> {
        let refs: Vec<(String, Value)> = self
            .sub()
            .actor_scan(INDEX_ACTOR, &owner.to_string(), "s/", "", 1000)
            .await?;
        let mut out = Vec::new();
        for (_, r) in refs {
            let id = r["id"].as_str().unwrap_or_default();
            if let Some(record) = self
                .sub()
                .actor_read::<SourceRecord>(SOURCE_ACTOR, id, "source")
                .await?
            {
                out.push(SourceView::from(&record));
            }
        }
        Ok(out)
    }

    /// Takes one delivery to source `id` (see the module docs). `header` reads a request
    /// header by lowercase name.
    ///
    /// Errors: [`CiError::NotFound`] (unknown source), [`CiError::TooLarge`],
    /// [`CiError::Unauthorized`] (bad signature or key; nothing is stored),
    /// [`CiError::Disabled`] without a GitHub App, [`CiError::Substrate`] when the lock
    /// cannot be read (the idempotency claim is released, so a retry is processed).
    pub async fn generic_webhook(
        &self,
        id: &str,
        header: impl Fn(&str) -> Option<String>,
        body: &[u8],
    ) -> std::result::Result<GenericOutcome, CiError> {
        let source: SourceRecord = self
            .sub()
            .actor_read(SOURCE_ACTOR, id, "source")
            .await?
            .ok_or(CiError::NotFound("source"))?;
        if body.len() > source.max_payload_bytes {
            return Err(CiError::TooLarge {
                size: body.len(),
                limit: source.max_payload_bytes,
            });
        }
        let secret = self
            .identity()
            .open(&source.secret, &format!("kici-source:{}", source.id))
            .map_err(|_| CiError::Conflict("the source's secret cannot be opened".into()))?;
        let given = header(&source.header);
        let verified = match source.method.as_str() {
            "hmac-sha256" => kilocloud_automation::github::verify_signature(
                std::slice::from_ref(&secret),
                given.as_deref(),
                body,
            ),
            _ => given.as_deref().is_some_and(|g| {
                let g = g.strip_prefix("Bearer ").unwrap_or(g).trim();
                bool::from(g.as_bytes().ct_eq(&secret))
            }),
        };
        if !verified {
            return Err(CiError::Unauthorized(
                "the signature or key of the delivery does not match the source's secret",
            ));
        }
        let key = header("x-idempotency-key")
            .or_else(|| header("x-delivery-id"))
            .or_else(|| header("x-request-id"))
            .filter(|k| !k.is_empty() && k.len() <= 200)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let event_type = header("x-event-type").unwrap_or_default();
        let delivery = format!("generic:{}:{key}", source.id);
        let duplicate = self
            .sub()
            .actors()
            .call::<SourceActor>(&source.id, SourceCall::Claim(key.clone()))
            .await?;
        if duplicate {
            return Ok(GenericOutcome {
                delivery,
                event_type,
                duplicate: true,
                runs: Vec::new(),
                outcome: "duplicate".into(),
            });
        }
        match self.run_source(&source, &delivery, &event_type, body).await {
            Ok((outcome, runs)) => Ok(GenericOutcome {
                delivery,
                event_type,
                duplicate: false,
                runs,
                outcome,
            }),
            Err(e) => {
                let _ = self
                    .sub()
                    .actors()
                    .call::<SourceActor>(&source.id, SourceCall::Release(key))
                    .await;
                Err(e)
            }
        }
    }

    async fn run_source(
        &self,
        source: &SourceRecord,
        delivery: &str,
        event_type: &str,
        body: &[u8],
    ) -> std::result::Result<(String, Vec<String>), CiError> {
        let owner: Owner = source
            .owner
            .parse()
            .map_err(|_| CiError::Conflict("the source's owner is unreadable".into()))?;
        let github = self.github().ok_or(CiError::Disabled(
            "the GitHub App is not configured (github.app_id)",
        ))?;
        let fail = |e: kilocloud_automation::GitHubError| {
            kilocloud_substrate::Error::Handler(format!("GitHub: {e}"))
        };
        let token = github
            .installation_token(source.installation_id)
            .await
            .map_err(fail)?;
        let Some(sha) = github
            .branch_sha(&token, &source.repo, &source.branch)
            .await
            .map_err(fail)?
        else {
            return Ok((
                format!("no branch {} in {}", source.branch, source.repo),
                Vec::new(),
            ));
        };
        let run_source = RunSource {
            repo: source.repo.clone(),
            clone_url: source.clone_url.clone(),
            git_ref: format!("refs/heads/{}", source.branch),
            sha: sha.clone(),
            event: "generic_webhook".into(),
            delivery: delivery.to_owned(),
            installation_id: Some(source.installation_id),
            rerun_of: None,
        };
        let lock = match self
            .read_lock(source.installation_id, &source.repo, &sha)
            .await?
        {
            Lock::Found(lock) => lock,
            Lock::Missing => {
                return Ok((
                    format!("lockfile_missing: no {LOCK_PATH} at {sha}"),
                    Vec::new(),
                ));
            }
            Lock::Corrupt(reason) => {
                let run = self
                    .record_failed_run(
                        owner,
                        &run_source,
                        "(lock file)",
                        format!("lockfile_corrupt: {reason}"),
                    )
                    .await?;
                return Ok((format!("lockfile_corrupt: run {}", run.id), vec![run.id]));
            }
        };
        let payload: Value = serde_json::from_slice(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
        let event = Event {
            kind: "generic_webhook".into(),
            action: event_type.to_owned(),
            payload: json!({"source": source.name, "eventType": event_type, "body": payload}),
            target_branch: Some(source.branch.clone()),
            source_branch: None,
            changed_files: None,
            source_repo: Some(source.repo.clone()),
        };
        let mut runs = Vec::new();
        for workflow in &lock.workflows {
            let decision = decide(&workflow.triggers, &event);
            if decision.matched.is_some() {
                let run = self
                    .start_run(owner, workflow, &run_source, json!(decision.trace))
                    .await?;
                runs.push(run.id);
            }
        }
        let outcome = if runs.is_empty() {
            "no workflow matched".into()
        } else {
            format!("runs {}", runs.join(", "))
        };
        Ok((outcome, runs))
    }
}
