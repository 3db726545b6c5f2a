//! Storage backends: the one place that knows SQL.
//!
//! [`Backend`] is the narrow contract the rest of the substrate is written against. Two
//! implementations keep it: [`sqlite`] (embedded, single node, one writer thread with group commit)
//! and [`postgres`] (multi-node: advisory locks for actors, `FOR UPDATE SKIP LOCKED` claims for
//! alarms and queue messages, node heartbeats for takeover). Every timestamp is ms since the Unix
//! epoch from the substrate's [`crate::Clock`].

pub(crate) mod migrations;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::clock::UnixMs;
use crate::error::Result;

/// Which database a [`Backend`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Embedded SQLite in WAL mode.
    Sqlite,
    /// PostgreSQL (multi-node).
    Postgres,
}

/// Buffered writes of one actor call, applied atomically by [`ActorSession::commit`].
#[derive(Debug, Default, Clone)]
pub struct WriteSet {
    /// `delete_all` was called: storage and alarm are removed before `entries` apply.
    pub cleared: bool,
    /// Key → new value (`None` deletes the key). Values are JSON bytes.
    pub entries: BTreeMap<String, Option<Vec<u8>>>,
    /// `Some(Some(t))` sets the alarm to `t`, `Some(None)` deletes it, `None` leaves it alone.
    pub alarm: Option<Option<UnixMs>>,
}

impl WriteSet {
    /// True when committing would change nothing.
    pub fn is_empty(&self) -> bool {
        !self.cleared && self.entries.is_empty() && self.alarm.is_none()
    }
}

/// An alarm row as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmRow {
    /// Actor type name.
    pub actor_type: String,
    /// Actor key.
    pub actor_key: String,
    /// When it is due, ms since epoch.
    pub fire_at: UnixMs,
    /// Failed attempts so far (0 on the first run).
    pub retry_count: u32,
    /// Changes every time the alarm is set; completion only deletes the generation it ran.
    pub generation: i64,
}

/// What to do with the alarm that a call ran for, applied in the call's commit.
#[derive(Debug, Clone, Copy)]
pub struct AlarmCompletion {
    /// Generation of the alarm that ran; the row is deleted only if it still has it.
    pub generation: i64,
}

/// One delivery of a queue message to a consumer.
#[derive(Debug, Clone)]
pub struct ClaimedMessage {
    /// Message id (unique per database; increasing in send order on one node).
    pub id: i64,
    /// JSON body.
    pub body: Vec<u8>,
    /// Deliveries so far including this one (1 on first delivery).
    pub attempts: u32,
    /// When the message was first sent, ms since epoch.
    pub enqueued_at: UnixMs,
}

/// Parameters of a claim of queue messages.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    /// Queue name.
    pub queue: &'a str,
    /// Claiming node id.
    pub node: &'a str,
    /// Now, ms since epoch.
    pub now: UnixMs,
    /// Most messages to return.
    pub limit: u32,
    /// How long the claim hides the messages from other consumers, ms.
    pub visibility_timeout_ms: i64,
    /// Failed deliveries (handler errors and expired visibility timeouts) after which a message
    /// goes to the dead-letter queue instead of being delivered again.
    pub max_attempts: u32,
    /// Deliveries after which a message goes to the dead-letter queue even without recorded
    /// failures: its consumers keep disappearing (a message that crashes its node).
    pub max_deliveries: u32,
}

/// A deliverable message as a claim finds it, before [`claim_decision`] decides its fate.
#[derive(Debug, Clone)]
pub(crate) struct ClaimCandidate {
    /// Message id.
    pub id: i64,
    /// Still claimed: its previous delivery's visibility timeout expired without an ack or a
    /// retry (a hung or too slow handler). A delivery whose node died is released by the
    /// takeover (`claimed_by` cleared) and does not count.
    pub timed_out: bool,
    /// Deliveries so far.
    pub attempts: u32,
    /// Failed deliveries so far.
    pub failures: u32,
    /// The last recorded error.
    pub last_error: Option<String>,
}

/// What a claim does with one [`ClaimCandidate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClaimDecision {
    /// Deliver it again, recording `failures` and `last_error`.
    Deliver {
        /// Failed deliveries including a timeout just detected.
        failures: u32,
        /// The last error, with the timeout note when one was just detected.
        last_error: Option<String>,
    },
    /// Move it to the dead-letter queue with this error.
    DeadLetter(String),
}

/// One rule for both backends: an expired visibility timeout is a failed delivery; a message
/// with `max_attempts` failures, or `max_deliveries` deliveries, is dead-lettered.
pub(crate) fn claim_decision(
    c: &ClaimCandidate,
    max_attempts: u32,
    max_deliveries: u32,
) -> ClaimDecision {
    let previous = c
        .last_error
        .as_deref()
        .map(|e| format!("; previous error: {e}"))
        .unwrap_or_default();
    let (failures, last_error) = if c.timed_out {
        let note = format!(
            "delivery {} was not acknowledged within its visibility timeout{previous}",
            c.attempts
        );
        (c.failures + 1, Some(note))
    } else {
        (c.failures, c.last_error.clone())
    };
    if failures >= max_attempts {
        ClaimDecision::DeadLetter(last_error.unwrap_or_default())
    } else if c.attempts >= max_deliveries {
        ClaimDecision::DeadLetter(format!(
            "delivered {} times without an outcome (its consumers stopped or their nodes \
             died){previous}",
            c.attempts
        ))
    } else {
        ClaimDecision::Deliver {
            failures,
            last_error,
        }
    }
}

/// Parameters of [`Backend::queue_retry`].
#[derive(Debug, Clone)]
pub struct RetryRequest<'a> {
    /// Queue name.
    pub queue: &'a str,
    /// Message id.
    pub id: i64,
    /// The delivery's attempt count (its receipt); a mismatch means the delivery is stale.
    pub attempts: u32,
    /// When to deliver it again, ms since epoch.
    pub visible_at: UnixMs,
    /// The handler's error, kept as the message's last error.
    pub error: &'a str,
    /// With this many failed deliveries (this one included) the message goes to the
    /// dead-letter queue instead.
    pub max_attempts: u32,
    /// Now, ms since epoch.
    pub now: UnixMs,
}

/// Result of [`Backend::queue_retry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The message will be delivered again after the delay.
    Requeued,
    /// It had reached the queue's max failed attempts and moved to the dead-letter queue.
    DeadLettered,
    /// The receipt was stale (the message was redelivered or acked meanwhile); nothing changed.
    Stale,
}

/// A dead-lettered message.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// Id in the dead-letter table.
    pub id: i64,
    /// Source queue.
    pub queue: String,
    /// Id the message had in its queue.
    pub message_id: i64,
    /// JSON body.
    pub body: serde_json::Value,
    /// Deliveries made before it was dead-lettered.
    pub attempts: u32,
    /// The last handler error (or the visibility-timeout note).
    pub last_error: String,
    /// First send, ms since epoch.
    pub enqueued_at: UnixMs,
    /// When it was dead-lettered, ms since epoch.
    pub failed_at: UnixMs,
}

/// Depth and age of one queue.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct QueueStats {
    /// Queue name.
    pub queue: String,
    /// Messages deliverable now.
    pub ready: u64,
    /// Messages waiting for a delay or retry delay.
    pub delayed: u64,
    /// Messages held by a consumer (inside their visibility timeout).
    pub in_flight: u64,
    /// Messages in the dead-letter queue.
    pub dead: u64,
    /// Age of the oldest deliverable message (now − visible_at), ms; 0 when none.
    pub oldest_ready_age_ms: i64,
}

/// A snapshot of one actor's durable state, for operators.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActorSnapshot {
    /// Actor type.
    pub actor_type: String,
    /// Actor key.
    pub key: String,
    /// Storage entries as JSON.
    pub storage: BTreeMap<String, serde_json::Value>,
    /// The pending alarm, if any.
    pub alarm: Option<AlarmSnapshot>,
}

/// The pending alarm of an actor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AlarmSnapshot {
    /// Due time, ms since epoch.
    pub fire_at: UnixMs,
    /// Failed attempts so far.
    pub retry_count: u32,
    /// Node currently running it, if claimed.
    pub claimed_by: Option<String>,
}

/// Claims released by a takeover pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// Queue messages made visible again.
    pub messages: u64,
    /// Alarms made claimable again.
    pub alarms: u64,
}

/// An actor's storage opened for one call, holding its cross-node lock (PostgreSQL) for as long as
/// it lives. Dropping it without [`ActorSession::commit`] discards the call's writes.
#[async_trait]
pub trait ActorSession: Send {
    /// Committed value of `key`.
    async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Committed entries whose key starts with `prefix`, in key order.
    async fn list(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;
    /// At most `limit` committed entries whose key starts with `prefix` and sorts after
    /// `after`, in key order.
    async fn list_page(
        &mut self,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>>;
    /// The committed alarm: `(fire_at, generation)`.
    async fn alarm(&mut self) -> Result<Option<(UnixMs, i64)>>;
    /// Applies `writes` atomically and keeps the lock: the call goes on, and a later
    /// [`ActorSession::commit`] or [`ActorSession::release`] ends it.
    async fn flush(&mut self, writes: WriteSet) -> Result<()>;
    /// Applies `writes` (and, for an alarm run, `completion`) atomically, then releases the lock.
    async fn commit(
        self: Box<Self>,
        writes: WriteSet,
        completion: Option<AlarmCompletion>,
    ) -> Result<()>;
    /// Releases the lock without writing.
    async fn release(self: Box<Self>);
    /// Hands the session back while the call waits on the outside world: on a backend that
    /// holds a connection and a cross-node lock per call (PostgreSQL), records a suspension
    /// lease of this node until `until` (ms since epoch), then frees the lock, the connection
    /// and the session slot. Every write must have been flushed. Others: nothing to do.
    async fn suspend(&mut self, until: UnixMs) -> Result<()> {
        let _ = until;
        Ok(())
    }
    /// Extends a suspension lease to `until`.
    ///
    /// Errors: [`crate::Error::Storage`], also when the lease is no longer this node's.
    async fn renew_suspension(&mut self, until: UnixMs) -> Result<()> {
        let _ = until;
        Ok(())
    }
    /// Takes the session back after [`ActorSession::suspend`]: a slot, a connection and the
    /// lock again, and the lease ended.
    ///
    /// Errors: [`crate::Error::Storage`] when the lease lapsed and another node ran the key
    /// meanwhile (this call must not commit on top of it).
    async fn resume(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A change another node made that this node should react to at once rather than at its next
/// poll (PostgreSQL `LISTEN`/`NOTIFY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// Messages became deliverable on this queue.
    Queue(String),
    /// An alarm was set.
    Alarm,
}

/// The storage contract every backend keeps. See ARCHITECTURE.md "Substrate invariants".
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Which database this is.
    fn kind(&self) -> BackendKind;
    /// Streams [`Signal`]s from other nodes into `tx` until it is closed. Backends without
    /// cross-node signalling (SQLite: one node) return at once.
    async fn forward_signals(&self, tx: tokio::sync::mpsc::Sender<Signal>) -> Result<()>;
    /// Schema version the database is at.
    async fn schema_version(&self) -> Result<i64>;
    /// Round trip to the database (for `/ready`).
    async fn ping(&self) -> Result<()>;

    /// Opens an actor's storage for one call; on PostgreSQL blocks until this node holds the
    /// actor's advisory lock.
    ///
    /// `suspensions`: the actor type may suspend its calls ([`ActorSession::suspend`]); the
    /// backend then also waits (at most the lock wait, then [`crate::Error::Overloaded`])
    /// while another node's unexpired suspension lease holds the key, by this clock.
    async fn actor_session(
        &self,
        actor_type: &str,
        key: &str,
        suspensions: Option<&dyn crate::Clock>,
    ) -> Result<Box<dyn ActorSession>>;
    /// Reads an actor's state without locking it (operator view).
    async fn actor_snapshot(&self, actor_type: &str, key: &str) -> Result<ActorSnapshot>;
    /// Committed value of one storage key of an actor, read without locking it.
    async fn actor_read(
        &self,
        actor_type: &str,
        key: &str,
        storage_key: &str,
    ) -> Result<Option<Vec<u8>>>;
    /// Committed entries of one actor whose storage key starts with `prefix` and sorts after
    /// `after`, in key order, at most `limit`; read without locking it.
    async fn actor_scan(
        &self,
        actor_type: &str,
        key: &str,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>>;
    /// Keys of actors of `actor_type` that have storage, above `after`, in byte order, at most
    /// `limit`.
    async fn actor_keys(&self, actor_type: &str, after: &str, limit: u32) -> Result<Vec<String>>;

    /// Earliest unclaimed alarm time among actors of `types`, if any.
    async fn next_alarm_at(&self, types: &[&str]) -> Result<Option<UnixMs>>;
    /// Claims up to `limit` due alarms of actors of `types` for `node` until `lease_until`
    /// (ms since epoch): unclaimed ones, and ones whose claim's lease expired (the claiming
    /// node lost track of them, e.g. during a database outage).
    async fn claim_due_alarms(
        &self,
        node: &str,
        now: UnixMs,
        lease_until: UnixMs,
        limit: u32,
        types: &[&str],
    ) -> Result<Vec<AlarmRow>>;
    /// Extends `node`'s claim on a running alarm to `lease_until`. False when the claim is no
    /// longer this node's (taken over, or the alarm was replaced).
    async fn alarm_extend(&self, row: &AlarmRow, node: &str, lease_until: UnixMs) -> Result<bool>;
    /// Records a failed alarm run: reschedules at `retry_at`, with `retry_count + 1` when
    /// `counted` (a handler failure; an alarm that could not run, e.g. `Overloaded`, keeps its
    /// count), or deletes it when `retry_at` is `None`. Only touches the row if it still has
    /// `generation`.
    async fn alarm_failed(
        &self,
        row: &AlarmRow,
        retry_at: Option<UnixMs>,
        counted: bool,
    ) -> Result<()>;
    /// Gives back this node's claim on an alarm whose failure could not be recorded.
    async fn alarm_unclaim(&self, row: &AlarmRow) -> Result<()>;

    /// Enqueues messages (JSON bodies) on `queue`, deliverable from `visible_at`. Returns their ids.
    async fn queue_send(
        &self,
        queue: &str,
        bodies: Vec<Vec<u8>>,
        now: UnixMs,
        visible_at: UnixMs,
    ) -> Result<Vec<i64>>;
    /// Claims up to `limit` deliverable messages with one LIMITed scan of the ready index; a
    /// message whose previous claim timed out counts a failure, and those that reach
    /// `max_attempts` failures or `max_deliveries` deliveries (`claim_decision`) are moved to
    /// the dead-letter queue instead.
    async fn queue_claim(&self, req: ClaimRequest<'_>) -> Result<Vec<ClaimedMessage>>;
    /// Deletes a delivered message if `attempts` still matches (the receipt). Returns false when stale.
    async fn queue_ack(&self, queue: &str, id: i64, attempts: u32) -> Result<bool>;
    /// Extends a delivery's visibility timeout to `visible_at` while its handler runs, if the
    /// receipt (`attempts`) is current and `node` still holds it. Returns false when stale.
    async fn queue_extend(
        &self,
        queue: &str,
        id: i64,
        attempts: u32,
        node: &str,
        visible_at: UnixMs,
    ) -> Result<bool>;
    /// Makes a delivered message visible again at `visible_at` with `error` noted and one more
    /// failure counted, or moves it to the dead-letter queue when that failure is its
    /// `max_attempts`th.
    async fn queue_retry(&self, req: RetryRequest<'_>) -> Result<RetryOutcome>;
    /// Dead-lettered messages of `queue`, oldest first, with id greater than `after`.
    async fn dlq_list(&self, queue: &str, after: i64, limit: u32) -> Result<Vec<DeadLetter>>;
    /// Moves dead-lettered messages (all, or the given ids) back to `queue` as new messages with
    /// zero attempts. Returns how many moved.
    async fn dlq_replay(&self, queue: &str, ids: Option<&[i64]>, now: UnixMs) -> Result<u64>;
    /// Deletes dead-lettered messages of `queue` (all, or the given ids). Returns how many.
    async fn dlq_delete(&self, queue: &str, ids: Option<&[i64]>) -> Result<u64>;
    /// Whether `queue` has messages or dead letters (operator commands that run without the
    /// services' queue declarations use this to tell an unknown queue from an empty one).
    async fn queue_exists(&self, queue: &str) -> Result<bool>;
    /// Depth and age of every queue that has messages or dead letters.
    async fn queue_stats(&self, now: UnixMs) -> Result<Vec<QueueStats>>;

    /// Value of a KV key if present and not expired.
    async fn kv_get(&self, key: &str, now: UnixMs) -> Result<Option<Vec<u8>>>;
    /// Stores a KV value, expiring at `expires_at` if given.
    async fn kv_put(&self, key: &str, value: Vec<u8>, expires_at: Option<UnixMs>) -> Result<()>;
    /// Deletes a KV key; true if it existed.
    async fn kv_delete(&self, key: &str) -> Result<bool>;
    /// Non-expired KV keys with `prefix`, in order.
    async fn kv_list(&self, prefix: &str, now: UnixMs, limit: u32) -> Result<Vec<String>>;
    /// Deletes expired KV entries; returns how many.
    async fn kv_sweep(&self, now: UnixMs) -> Result<u64>;

    /// Records that `node` is alive at `now`. Returns the database server's clock at that
    /// moment (ms since epoch) where it has one of its own (PostgreSQL), for skew detection.
    async fn node_heartbeat(&self, node: &str, now: UnixMs) -> Result<Option<UnixMs>>;
    /// Releases every claim (messages, alarms) held by nodes other than `self_node` whose last
    /// heartbeat is older than `dead_before` or that are not registered at all (a node whose
    /// row was removed), and forgets the dead nodes.
    async fn release_dead_nodes(
        &self,
        self_node: &str,
        dead_before: UnixMs,
        now: UnixMs,
    ) -> Result<Released>;
    /// Removes `node` and releases its claims (clean shutdown).
    async fn node_leave(&self, node: &str, now: UnixMs) -> Result<Released>;
}

/// Combines per-queue message counts with per-queue dead-letter counts into one sorted list
/// (a queue may appear in either or both).
pub(crate) fn merge_queue_stats(
    messages: Vec<QueueStats>,
    dead: impl IntoIterator<Item = (String, u64)>,
) -> Vec<QueueStats> {
    let mut stats: BTreeMap<String, QueueStats> =
        messages.into_iter().map(|s| (s.queue.clone(), s)).collect();
    for (queue, n) in dead {
        stats
            .entry(queue.clone())
            .or_insert_with(|| QueueStats {
                queue,
                ..Default::default()
            })
            .dead = n;
    }
    stats.into_values().collect()
}

/// Decodes stored JSON for operator views; bytes that are not JSON show as a size note.
pub(crate) fn json_or_bytes(v: &[u8]) -> serde_json::Value {
    serde_json::from_slice(v)
        .unwrap_or_else(|_| serde_json::Value::String(format!("<{} bytes, not JSON>", v.len())))
}
