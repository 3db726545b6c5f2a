//! Balances and the usage ledger: one `ledger` actor per owner (key: the [`Owner`] string)
//! holding the balance in microdollars, the usage rows and the grants. A usage row and the
//! balance change it causes commit in one transaction. The balance is read without a call (a
//! point read), so the pre-flight check never queues behind charges.

use kilocloud_identity::model::Initiator;
use kilocloud_identity::{Error, Owner, Result};
use kilocloud_substrate::{Actor, ActorContext, Result as SubResult, Substrate};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

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
    /// tokens are estimated from the request and the content relayed (4 characters a token).
    #[serde(default)]
    pub estimated: bool,
    /// `X-KiloCode-Feature`.
    pub feature: Option<String>,
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
    Usage { before: Option<u64>, limit: usize },
}

enum LedgerReply {
    Balance(i64),
    Rows(Vec<UsageRow>),
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
                let seq: u64 = ctx.get(USAGE_SEQ).await?.unwrap_or(0) + 1;
                row.seq = seq;
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
                }
                if seq > USAGE_RETENTION {
                    ctx.delete(&format!("{USAGE}{:020}", seq - USAGE_RETENTION));
                }
                Ok(LedgerReply::Balance(after))
            }
            LedgerCall::Usage { before, limit } => {
                let rows: Vec<(String, UsageRow)> = ctx.list(USAGE).await?;
                let mut rows: Vec<UsageRow> = rows
                    .into_iter()
                    .map(|(_, r)| r)
                    .filter(|r| before.is_none_or(|b| r.seq < b))
                    .collect();
                rows.reverse();
                rows.truncate(limit);
                Ok(LedgerReply::Rows(rows))
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
    /// Registers the ledger actor on `sub` (before [`Substrate::start`]).
    pub fn new(sub: &Substrate) -> Self {
        sub.actors().register(LedgerActor);
        Self { sub: sub.clone() }
    }

    /// The owner's balance, microdollars (0 for an owner never granted anything).
    pub async fn balance(&self, owner: Owner) -> Result<i64> {
        let balance: Option<i64> = self
            .sub
            .actor_read(LedgerActor::TYPE, &owner.to_string(), BALANCE)
            .await?;
        Ok(balance.unwrap_or(0))
    }

    /// What the owner has spent in the UTC day and month of `at_ms` (point reads).
    pub async fn spend(&self, owner: Owner, at_ms: i64) -> Result<Spend> {
        let (day, month) = periods(at_ms);
        let key = owner.to_string();
        let read = |k: String| {
            let (sub, key) = (self.sub.clone(), key.clone());
            async move {
                let v: Option<i64> = sub.actor_read(LedgerActor::TYPE, &key, &k).await?;
                Ok::<i64, Error>(v.unwrap_or(0))
            }
        };
        Ok(Spend {
            day: read(format!("{SPENT_DAY}{day}")).await?,
            month: read(format!("{SPENT_MONTH}{month}")).await?,
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
            LedgerReply::Rows(_) => unreachable!("a grant replies with the balance"),
        }
    }

    /// Records a request and charges its cost, in one transaction. Returns the new balance.
    pub async fn record(&self, row: UsageRow) -> Result<i64> {
        let key = row.owner.to_string();
        match self
            .sub
            .actors()
            .call::<LedgerActor>(&key, LedgerCall::Record(Box::new(row)))
            .await?
        {
            LedgerReply::Balance(b) => Ok(b),
            LedgerReply::Rows(_) => unreachable!("recording replies with the balance"),
        }
    }

    /// The owner's usage rows, newest first: `seq < before` (all when `None`), at most `limit`.
    pub async fn usage(
        &self,
        owner: Owner,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<UsageRow>> {
        let call = LedgerCall::Usage { before, limit };
        match self
            .sub
            .actors()
            .call::<LedgerActor>(&owner.to_string(), call)
            .await?
        {
            LedgerReply::Rows(rows) => Ok(rows),
            LedgerReply::Balance(_) => unreachable!("a listing replies with rows"),
        }
    }
}
