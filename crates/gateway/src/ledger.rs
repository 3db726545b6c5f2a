//! Balances and the usage ledger: one `ledger` actor per owner (key: the [`Owner`] string)
//! holding the balance in microdollars, the usage rows and the grants. A usage row and the
//! balance change it causes commit in one transaction, with the counters the limits read: spend
//! per UTC day and month, each member's spend of an organization per UTC day, and tokens per
//! minute per owner and per credential. Balance and counters are read without a call (point
//! reads), so the pre-flight checks never queue behind charges.
//!
//! Charging is at least once and deduplicated, so it is exactly once: the proxy puts each
//! finished request's row on the durable [`CHARGE_QUEUE`] (deliverable after
//! [`CHARGE_RECOVERY_DELAY_MS`]) before the client's response completes, then records it at
//! once and withdraws the queued copy. The ledger keeps `req/<request id>` for every row it
//! holds and ignores a row whose request id it has seen, so a queued copy that is delivered
//! anyway (the withdrawal failed or came late) changes nothing, and a row whose node died
//! before recording it is charged by whichever node's [`ChargeConsumer`] claims it.

use kilocloud_identity::model::Initiator;
use kilocloud_identity::{Error, Owner, Result};
use std::sync::Arc;

use async_trait::async_trait;
use kilocloud_substrate::{
    Actor, ActorContext, Consumer, Delivery, QueueConfig, Result as SubResult, Substrate,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::limits::TokenWindow;

/// Usage rows kept per owner; older ones are deleted as new ones arrive.
pub const USAGE_RETENTION: u64 = 10_000;
/// Largest single grant, microdollars (USD 1,000,000).
pub const MAX_GRANT_MICRODOLLARS: i64 = 1_000_000_000_000;

const BALANCE: &str = "balance";
/// Sequence numbers of usage rows and of grants, separately (retention deletes by usage seq).
const USAGE_SEQ: &str = "usage_seq";
const GRANT_SEQ: &str = "grant_seq";
const USAGE: &str = "usage/";
const GRANT: &str = "grant/";
/// Spend per UTC day (`spent/day/YYYY-MM-DD`) and month (`spent/month/YYYY-MM`), microdollars.
const SPENT_DAY: &str = "spent/day/";
const SPENT_MONTH: &str = "spent/month/";
/// An organization member's spend today: `spent/member/<userId>` → [`MemberSpend`].
const SPENT_MEMBER: &str = "spent/member/";
/// Tokens per minute of the owner (`tpm/owner`) and of each credential acting for it
/// (`tpm/cred/<credential>`, see [`UsageRow::credential`]): [`TokenWindow`]s.
const TPM_OWNER: &str = "tpm/owner";
const TPM_CRED: &str = "tpm/cred/";
/// The row a request id was recorded as: `req/<requestId>` → its usage `seq`.
const REQUEST: &str = "req/";
/// Usage rows read per storage scan when listing, outside the actor.
const LIST_PAGE: u64 = 500;

/// The durable queue of finished requests' rows waiting to be charged (at least once; the
/// ledger deduplicates by request id).
pub const CHARGE_QUEUE: &str = "gateway-charges";
/// How long a queued row waits before a consumer charges it, ms: the proxy records the row
/// itself right after queueing it and then withdraws the copy, so the copy is delivered only
/// when the node died (or recording failed) in between.
pub const CHARGE_RECOVERY_DELAY_MS: u64 = 30_000;

/// A member's spend of an organization's balance on one UTC day.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MemberSpend {
    /// `YYYY-MM-DD`.
    day: String,
    microdollars: i64,
}

/// The UTC day and month of `at_ms`, as used in the spend keys: (`YYYY-MM-DD`, `YYYY-MM`).
fn periods(at_ms: i64) -> (String, String) {
    let t = chrono::DateTime::from_timestamp_millis(at_ms).unwrap_or_default();
    (
        t.format("%Y-%m-%d").to_string(),
        t.format("%Y-%m").to_string(),
    )
}

/// What an owner has spent, microdollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spend {
    /// Today (UTC).
    pub day: i64,
    /// This month (UTC).
    pub month: i64,
}

/// One gateway request as billed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageRow {
    /// Sequence number in the owner's ledger (set when recorded).
    pub seq: u64,
    /// The server's id of the request (a UUID v7, made by the proxy, never the caller's):
    /// the ledger records each request id once. Empty in rows from before it existed.
    #[serde(default)]
    pub request_id: String,
    /// The provider's id of the request (`x-request-id` or Anthropic's `request-id`).
    #[serde(default)]
    pub upstream_request_id: Option<String>,
    /// Request start, ms since epoch.
    pub at_ms: i64,
    /// Who pays.
    pub owner: Owner,
    /// The user who made the request.
    pub user: Uuid,
    /// The API key used, if any.
    pub api_key: Option<Uuid>,
    /// Model asked for (e.g. `kilo/auto`).
    pub requested_model: String,
    /// Model served.
    pub model: String,
    /// Provider that served it.
    pub provider: String,
    /// HTTP status returned to the client.
    pub status: u16,
    /// Streaming request.
    pub streaming: bool,
    /// Time to the first byte of the upstream response, ms.
    pub ttfb_ms: u64,
    /// Total time, ms.
    pub total_ms: u64,
    /// Input tokens (not cached).
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Input tokens read from cache.
    pub cache_read_tokens: u64,
    /// Input tokens written to cache.
    pub cache_write_tokens: u64,
    /// Charged, microdollars (0 for free models).
    pub cost_microdollars: i64,
    /// What the request cost upstream, microdollars, charged or not.
    pub true_cost_microdollars: i64,
    /// `X-KiloCode-ProjectId`.
    pub project_id: Option<String>,
    /// `X-KiloCode-TaskId`.
    pub task_id: Option<String>,
    /// `x-kilocode-mode`.
    pub mode: Option<String>,
    /// The provider reported no usage (a stream cut short, or a provider that omits it): the
    /// tokens are estimated from the request and the content relayed (counted with the `cl100k_base` tokenizer).
    #[serde(default)]
    pub estimated: bool,
    /// `X-KiloCode-Feature`.
    pub feature: Option<String>,
    /// `X-KiloCode-MachineId`: the client machine's id (the Kilo Code CLI's telemetry id).
    #[serde(default)]
    pub machine_id: Option<String>,
    /// `X-KiloCode-EditorName`: the client and its version, e.g. `Kilo CLI 7.7.7`.
    #[serde(default)]
    pub editor: Option<String>,
}

/// A credential as the limits key it: `key:<apiKeyId>` for an API key, `user:<userId>` for a
/// user JWT.
pub fn credential_key(api_key: Option<Uuid>, user: Uuid) -> String {
    match api_key {
        Some(key) => format!("key:{key}"),
        None => format!("user:{user}"),
    }
}

impl UsageRow {
    /// The credential the request came with (see [`credential_key`]).
    pub fn credential(&self) -> String {
        credential_key(self.api_key, self.user)
    }

    /// Tokens the request processed: input, output and cache, for tokens-per-minute limits.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_read_tokens)
            .saturating_add(self.cache_write_tokens)
    }
}

/// Which usage rows a listing returns; every field that is set must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageFilter {
    /// Only rows with `seq` below this (paging: the last `seq` of the previous page).
    pub before: Option<u64>,
    /// Rows at or after this time, ms since epoch.
    pub since_ms: Option<i64>,
    /// Rows before this time, ms since epoch.
    pub until_ms: Option<i64>,
    /// Requested or served model id.
    pub model: Option<String>,
    /// Provider that served.
    pub provider: Option<String>,
    /// The user who made the request.
    pub user: Option<Uuid>,
    /// The API key used.
    pub api_key: Option<Uuid>,
    /// HTTP status returned.
    pub status: Option<u16>,
    /// `X-KiloCode-Feature`.
    pub feature: Option<String>,
    /// `X-KiloCode-ProjectId`.
    pub project_id: Option<String>,
    /// `X-KiloCode-TaskId`.
    pub task_id: Option<String>,
}

impl UsageFilter {
    /// Whether `row` passes.
    pub fn matches(&self, row: &UsageRow) -> bool {
        fn eq<T: PartialEq>(want: &Option<T>, have: &T) -> bool {
            want.as_ref().is_none_or(|w| w == have)
        }
        fn eq_opt<T: PartialEq>(want: &Option<T>, have: &Option<T>) -> bool {
            want.is_none() || want == have
        }
        self.before.is_none_or(|b| row.seq < b)
            && self.since_ms.is_none_or(|t| row.at_ms >= t)
            && self.until_ms.is_none_or(|t| row.at_ms < t)
            && self
                .model
                .as_ref()
                .is_none_or(|m| *m == row.model || *m == row.requested_model)
            && eq(&self.provider, &row.provider)
            && eq(&self.user, &row.user)
            && eq_opt(&self.api_key, &row.api_key)
            && eq(&self.status, &row.status)
            && eq_opt(&self.feature, &row.feature)
            && eq_opt(&self.project_id, &row.project_id)
            && eq_opt(&self.task_id, &row.task_id)
    }
}

/// The counters the limits read for one request, point-read before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// The owner's spend today and this month.
    pub spend: Spend,
    /// The member's spend of the organization today (0 for personal owners), microdollars.
    pub member_today: i64,
    /// The owner's tokens per minute.
    pub owner_tokens: TokenWindow,
    /// The credential's tokens per minute (acting for this owner).
    pub credential_tokens: TokenWindow,
}

/// A credit grant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GrantRecord {
    amount_microdollars: i64,
    by: Uuid,
    note: String,
    at_ms: i64,
}

enum LedgerCall {
    Grant { amount: i64, by: Uuid, note: String },
    Record(Box<UsageRow>),
}

enum LedgerReply {
    Balance(i64),
}

struct LedgerActor;

impl Actor for LedgerActor {
    const TYPE: &'static str = "ledger";
    type Call = LedgerCall;
    type Reply = LedgerReply;

    async fn call(&self, ctx: &mut ActorContext, call: LedgerCall) -> SubResult<LedgerReply> {
        let balance: i64 = ctx.get(BALANCE).await?.unwrap_or(0);
        match call {
            LedgerCall::Grant { amount, by, note } => {
                let seq: u64 = ctx.get(GRANT_SEQ).await?.unwrap_or(0) + 1;
                let grant = GrantRecord {
                    amount_microdollars: amount,
                    by,
                    note,
                    at_ms: ctx.now_ms(),
                };
                ctx.put(&format!("{GRANT}{seq:020}"), &grant)?;
                ctx.put(GRANT_SEQ, &seq)?;
                ctx.put(BALANCE, &balance.saturating_add(amount))?;
                Ok(LedgerReply::Balance(balance.saturating_add(amount)))
            }
            LedgerCall::Record(mut row) => {
                let request_key = format!("{REQUEST}{}", row.request_id);
                if !row.request_id.is_empty() && ctx.get::<u64>(&request_key).await?.is_some() {
                    // Recorded already (the queued copy of a row, or a redelivery).
                    return Ok(LedgerReply::Balance(balance));
                }
                let seq: u64 = ctx.get(USAGE_SEQ).await?.unwrap_or(0) + 1;
                row.seq = seq;
                if !row.request_id.is_empty() {
                    ctx.put(&request_key, &seq)?;
                }
                let after = balance.saturating_sub(row.cost_microdollars);
                ctx.put(&format!("{USAGE}{seq:020}"), &row)?;
                ctx.put(USAGE_SEQ, &seq)?;
                ctx.put(BALANCE, &after)?;
                if row.cost_microdollars != 0 {
                    let (day, month) = periods(row.at_ms);
                    for key in [format!("{SPENT_DAY}{day}"), format!("{SPENT_MONTH}{month}")] {
                        let spent: i64 = ctx.get(&key).await?.unwrap_or(0);
                        ctx.put(&key, &spent.saturating_add(row.cost_microdollars))?;
                    }
                    if matches!(row.owner, Owner::Org(_)) {
                        let key = format!("{SPENT_MEMBER}{}", row.user);
                        let mut spent: MemberSpend = ctx.get(&key).await?.unwrap_or_default();
                        // A row of an earlier day recorded late (a long stream) does not
                        // reset today's count; it only counts in the day and month totals.
                        if day > spent.day {
                            spent = MemberSpend {
                                day: day.clone(),
                                microdollars: 0,
                            };
                        }
                        if day == spent.day {
                            spent.microdollars =
                                spent.microdollars.saturating_add(row.cost_microdollars);
                            ctx.put(&key, &spent)?;
                        }
                    }
                }
                let tokens = row.total_tokens();
                if tokens > 0 {
                    for key in [
                        TPM_OWNER.to_owned(),
                        format!("{TPM_CRED}{}", row.credential()),
                    ] {
                        let window: TokenWindow = ctx.get(&key).await?.unwrap_or_default();
                        ctx.put(&key, &window.add(ctx.now_ms(), tokens))?;
                    }
                }
                if seq > USAGE_RETENTION {
                    let old = format!("{USAGE}{:020}", seq - USAGE_RETENTION);
                    if let Some(old_row) = ctx.get::<UsageRow>(&old).await?
                        && !old_row.request_id.is_empty()
                    {
                        ctx.delete(&format!("{REQUEST}{}", old_row.request_id));
                    }
                    ctx.delete(&old);
                }
                Ok(LedgerReply::Balance(after))
            }
        }
    }
}

/// Balances, grants and usage rows.
#[derive(Clone)]
pub struct Ledger {
    sub: Substrate,
}

impl Ledger {
    /// Registers the ledger actor and declares [`CHARGE_QUEUE`] on `sub` (before
    /// [`Substrate::start`]).
    pub fn new(sub: &Substrate) -> Self {
        sub.actors().register(LedgerActor);
        sub.queues()
            .declare(QueueConfig {
                max_attempts: 10,
                retry_base_ms: 2_000,
                ..QueueConfig::new(CHARGE_QUEUE)
            })
            .expect("the charge queue's settings are valid");
        Self { sub: sub.clone() }
    }

    /// Starts this node's consumer of [`CHARGE_QUEUE`] (after [`Substrate::start`]).
    pub fn start_charging(&self) {
        self.sub
            .start_consumer(CHARGE_QUEUE, Arc::new(ChargeConsumer(self.clone())));
    }

    /// Puts `row` on [`CHARGE_QUEUE`], durably: once this returns, the row is charged even if
    /// this node dies. Returns the message id, for [`Ledger::cancel_charge`].
    ///
    /// Errors: [`Error::Substrate`] when the store refuses the message.
    pub async fn enqueue_charge(&self, row: &UsageRow) -> Result<i64> {
        Ok(self
            .sub
            .queues()
            .send(CHARGE_QUEUE, row, CHARGE_RECOVERY_DELAY_MS)
            .await?)
    }

    /// Withdraws queued charge `id` once its row is recorded, so no consumer spends a claim on
    /// the duplicate. Returns false when a consumer has it already (it then finds the row
    /// recorded and skips it).
    pub async fn cancel_charge(&self, id: i64) -> Result<bool> {
        Ok(self.sub.queues().cancel(CHARGE_QUEUE, id).await?)
    }

    /// Whether the owner's ledger holds the row of `request_id` (a point read, no call).
    pub async fn is_recorded(&self, owner: Owner, request_id: &str) -> Result<bool> {
        Ok(self
            .read::<u64>(&owner.to_string(), format!("{REQUEST}{request_id}"))
            .await?
            .is_some())
    }

    /// One value of the `ledger` actor `key`, by a point read.
    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        storage_key: String,
    ) -> Result<Option<T>> {
        Ok(self
            .sub
            .actor_read(LedgerActor::TYPE, key, &storage_key)
            .await?)
    }

    /// The owner's balance, microdollars (0 for an owner never granted anything).
    pub async fn balance(&self, owner: Owner) -> Result<i64> {
        let balance: Option<i64> = self.read(&owner.to_string(), BALANCE.to_owned()).await?;
        Ok(balance.unwrap_or(0))
    }

    /// The counters the limits read for a request by `user` with `credential` (see
    /// [`UsageRow::credential`]) acting for `owner` at `at_ms`: concurrent point reads, no call.
    pub async fn counters(
        &self,
        owner: Owner,
        user: Uuid,
        credential: &str,
        at_ms: i64,
    ) -> Result<Counters> {
        let (day, month) = periods(at_ms);
        let key = owner.to_string();
        // Concurrently: one round trip's latency on PostgreSQL instead of five.
        let (spent_day, spent_month, member, owner_tokens, credential_tokens) = futures::try_join!(
            self.read::<i64>(&key, format!("{SPENT_DAY}{day}")),
            self.read::<i64>(&key, format!("{SPENT_MONTH}{month}")),
            async {
                match owner {
                    Owner::Org(_) => {
                        self.read::<MemberSpend>(&key, format!("{SPENT_MEMBER}{user}"))
                            .await
                    }
                    Owner::User(_) => Ok(None),
                }
            },
            self.read::<TokenWindow>(&key, TPM_OWNER.to_owned()),
            self.read::<TokenWindow>(&key, format!("{TPM_CRED}{credential}")),
        )?;
        Ok(Counters {
            spend: Spend {
                day: spent_day.unwrap_or(0),
                month: spent_month.unwrap_or(0),
            },
            member_today: member
                .filter(|m| m.day == day)
                .map_or(0, |m| m.microdollars),
            owner_tokens: owner_tokens.unwrap_or_default(),
            credential_tokens: credential_tokens.unwrap_or_default(),
        })
    }

    /// Adds `amount` microdollars (negative to take credit back) to the owner's balance.
    /// Returns the new balance.
    ///
    /// Errors: [`Error::Invalid`] for 0 or more than [`MAX_GRANT_MICRODOLLARS`] either way.
    pub async fn grant(
        &self,
        owner: Owner,
        amount: i64,
        note: &str,
        by: &Initiator,
    ) -> Result<i64> {
        if amount == 0 || amount.unsigned_abs() > MAX_GRANT_MICRODOLLARS as u64 {
            return Err(Error::Invalid(format!(
                "a grant is a non-zero amount of at most {MAX_GRANT_MICRODOLLARS} microdollars"
            )));
        }
        let call = LedgerCall::Grant {
            amount,
            by: by.user,
            note: note.chars().take(500).collect(),
        };
        match self
            .sub
            .actors()
            .call::<LedgerActor>(&owner.to_string(), call)
            .await?
        {
            LedgerReply::Balance(b) => Ok(b),
        }
    }

    /// Records a request and charges its cost, in one transaction; a row whose request id the
    /// ledger holds already changes nothing. Returns the balance after.
    pub async fn record(&self, row: UsageRow) -> Result<i64> {
        let key = row.owner.to_string();
        match self
            .sub
            .actors()
            .call::<LedgerActor>(&key, LedgerCall::Record(Box::new(row)))
            .await?
        {
            LedgerReply::Balance(b) => Ok(b),
        }
    }

    /// The owner's usage rows that pass `filter`, newest first, at most `limit`. Read from
    /// committed storage in pages of [`LIST_PAGE`] rows, newest first, without calling (and so
    /// without queueing behind or holding up) the ledger actor.
    pub async fn usage(
        &self,
        owner: Owner,
        filter: UsageFilter,
        limit: usize,
    ) -> Result<Vec<UsageRow>> {
        let key = owner.to_string();
        let last: u64 = self.read(&key, USAGE_SEQ.to_owned()).await?.unwrap_or(0);
        // Kept rows have seq in (last − retention, last]; `upper` is exclusive.
        let lowest = last.saturating_sub(USAGE_RETENTION) + 1;
        let mut upper = filter.before.map_or(last + 1, |b| b.min(last + 1));
        let mut rows = Vec::new();
        while upper > lowest && rows.len() < limit {
            let start = upper.saturating_sub(LIST_PAGE).max(lowest);
            let page: Vec<(String, UsageRow)> = self
                .sub
                .actor_scan(
                    LedgerActor::TYPE,
                    &key,
                    USAGE,
                    &format!("{USAGE}{:020}", start - 1),
                    (upper - start) as u32,
                )
                .await?;
            rows.extend(
                page.into_iter()
                    .rev()
                    .map(|(_, r)| r)
                    .filter(|r| r.seq < upper && filter.matches(r))
                    .take(limit - rows.len()),
            );
            upper = start;
        }
        Ok(rows)
    }
}

/// Consumes [`CHARGE_QUEUE`]: charges a queued row unless the ledger holds it already.
pub struct ChargeConsumer(pub Ledger);

#[async_trait]
impl Consumer for ChargeConsumer {
    async fn handle(&self, delivery: &Delivery) -> SubResult<()> {
        let row: UsageRow = delivery.body()?;
        let recorded = self
            .0
            .is_recorded(row.owner, &row.request_id)
            .await
            .map_err(|e| kilocloud_substrate::Error::Handler(e.to_string()))?;
        if !recorded {
            tracing::warn!(owner = %row.owner, request_id = %row.request_id,
                "charging a gateway request its node did not record");
            self.0
                .record(row)
                .await
                .map_err(|e| kilocloud_substrate::Error::Handler(e.to_string()))?;
        }
        Ok(())
    }
}
