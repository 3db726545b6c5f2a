//! Keyed single-writer actors with transactional storage and one alarm each.
//!
//! An actor is addressed by `(type, key)`. [`ActorSystem::call`] runs the actor's handler with an
//! [`ActorContext`]: reads see committed state plus the call's own writes; writes are buffered and
//! committed atomically when the handler returns `Ok`, discarded when it returns `Err` or panics.
//! Calls on one key run one at a time (a FIFO mutex per key on this node, plus the backend's
//! cross-node lock on PostgreSQL); calls on different keys run concurrently. At most
//! `max_backlog` calls may wait for one key; beyond that callers get [`Error::Overloaded`].
//!
//! Behaviour follows Cloudflare Durable Objects (storage transactions, one alarm per object,
//! `setAlarm` replaces, alarm retries with backoff); see DESIGN.md §3.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use crate::clock::{Clock, UnixMs};
use crate::cron::CronSchedule;
use crate::error::{Error, Result};
use crate::store::{ActorSession, AlarmCompletion, Backend, WriteSet};

/// What an alarm handler is told about the firing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlarmInfo {
    /// The time the alarm was scheduled for (or rescheduled to by a retry), ms since epoch.
    pub scheduled_at: UnixMs,
    /// Failed attempts before this one: 0 on the first run, up to [`crate::ALARM_MAX_RETRIES`].
    pub retry_count: u32,
}

impl AlarmInfo {
    /// True when an earlier run of this alarm failed.
    pub fn is_retry(&self) -> bool {
        self.retry_count > 0
    }
}

/// An actor type: a stateless handler whose state lives in the [`ActorContext`]'s storage.
///
/// One value of the type serves every key; it holds shared dependencies (HTTP clients, config).
/// A handler must not call its own actor, directly or through a cycle of actors: the call would
/// wait for the running one to finish, forever.
pub trait Actor: Send + Sync + 'static {
    /// Type name, part of the address and of stored rows; must not contain `\u{1f}`.
    const TYPE: &'static str;
    /// A call's input.
    type Call: Send + 'static;
    /// A call's output.
    type Reply: Send + 'static;
    /// Its calls may wait on the outside world without a database session
    /// ([`ActorContext::suspend_while`]). Sessions of such a type on PostgreSQL check for
    /// another node's suspension lease (one more query per call); default `false`.
    const SUSPENDS: bool = false;

    /// Handles one call. Returning `Err` discards every write the call made.
    fn call(
        &self,
        ctx: &mut ActorContext,
        call: Self::Call,
    ) -> impl Future<Output = Result<Self::Reply>> + Send;

    /// Handles the actor's alarm. Returning `Err` discards the writes and reschedules the alarm
    /// with exponential backoff (2 s base, at most 6 retries). The default deletes nothing and
    /// succeeds.
    fn alarm(
        &self,
        ctx: &mut ActorContext,
        alarm: AlarmInfo,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (ctx, alarm);
        async { Ok(()) }
    }
}

/// The storage and alarm of one actor during one call.
pub struct ActorContext {
    actor_type: &'static str,
    key: String,
    session: Box<dyn ActorSession>,
    writes: WriteSet,
    clock: Arc<dyn Clock>,
    /// Generation of the alarm being run, during an alarm run.
    firing: Option<i64>,
    /// A checkpoint set the alarm: the scheduler is told when the call ends.
    alarm_set: bool,
    /// The actor type declares [`Actor::SUSPENDS`].
    suspends: bool,
}

/// How long a suspended call's lease holds its key against other nodes without renewal, ms
/// (renewed every third of it; a node that stops renewing, having died or stalled, loses the
/// key this long after).
pub const SUSPENSION_LEASE_MS: i64 = 30_000;

impl ActorContext {
    /// The actor's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The actor's type name.
    pub fn actor_type(&self) -> &'static str {
        self.actor_type
    }

    /// Current time from the substrate's clock, ms since epoch.
    pub fn now_ms(&self) -> UnixMs {
        self.clock.now_ms()
    }

    /// Reads `key` as JSON: the call's own write if any, else the committed value.
    ///
    /// Errors: [`Error::Serde`] when the stored JSON does not fit `T`; [`Error::Storage`].
    pub async fn get<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>> {
        let raw = match self.writes.entries.get(key) {
            Some(v) => v.clone(),
            None if self.writes.cleared => None,
            None => self.session.get(key).await?,
        };
        raw.map(|v| serde_json::from_slice(&v).map_err(Error::from))
            .transpose()
    }

    /// Buffers a write of `value` (as JSON) under `key`.
    pub fn put<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value)?;
        self.writes.entries.insert(key.to_owned(), Some(bytes));
        Ok(())
    }

    /// Discards every write and alarm change this call has buffered, as if it had made none;
    /// later writes in the same call are kept. For handlers that refuse a call with a reply
    /// (`Ok`) rather than an error, so a refusal never commits half a change.
    pub fn rollback(&mut self) {
        self.writes = WriteSet::default();
    }

    /// Buffers a delete of `key`.
    pub fn delete(&mut self, key: &str) {
        self.writes.entries.insert(key.to_owned(), None);
    }

    /// Entries whose key starts with `prefix`, in key order, including the call's own writes.
    pub async fn list<T: DeserializeOwned>(&mut self, prefix: &str) -> Result<Vec<(String, T)>> {
        let mut merged: std::collections::BTreeMap<String, Vec<u8>> = if self.writes.cleared {
            Default::default()
        } else {
            self.session.list(prefix).await?.into_iter().collect()
        };
        for (k, v) in self.writes.entries.range(prefix.to_owned()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        merged
            .into_iter()
            .map(|(k, v)| Ok((k, serde_json::from_slice(&v)?)))
            .collect()
    }

    /// A page of [`ActorContext::list`]: entries whose key starts with `prefix` and sorts
    /// after `after` (empty: from the start), in key order, including the call's own writes,
    /// reading at most `limit` committed rows. Replies the entries and, when more may follow,
    /// the key to pass as `after` for the next page (the page can be short, even empty, when
    /// the call deleted entries, so page until `None`). For a long list an actor walks from
    /// its start, as a queue's head.
    ///
    /// Errors: [`Error::Serde`], [`Error::Storage`].
    pub async fn list_page<T: DeserializeOwned>(
        &mut self,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<(Vec<(String, T)>, Option<String>)> {
        let limit = limit.max(1);
        let committed = if self.writes.cleared {
            Vec::new()
        } else {
            self.session.list_page(prefix, after, limit).await?
        };
        // A full page bounds what this page covers; buffered writes past it show on a later
        // page.
        let bound = (committed.len() as u32 == limit)
            .then(|| committed.last().map(|(k, _)| k.clone()))
            .flatten();
        let mut merged: std::collections::BTreeMap<String, Vec<u8>> =
            committed.into_iter().collect();
        let start = std::ops::Bound::Excluded(after.to_owned());
        for (k, v) in self
            .writes
            .entries
            .range::<String, _>((start, std::ops::Bound::Unbounded))
        {
            if k.as_str() < prefix {
                continue;
            }
            if !k.starts_with(prefix) || bound.as_ref().is_some_and(|b| k > b) {
                break;
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        let entries = merged
            .into_iter()
            .map(|(k, v)| Ok((k, serde_json::from_slice(&v)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok((entries, bound))
    }

    /// Commits the writes and alarm change buffered so far, keeping the actor's lock: the call
    /// goes on, and its later writes commit when it returns `Ok` (an `Err` then discards only
    /// those). For handlers that must persist an external effect before awaiting the next
    /// one, as a Durable Object's storage write is durable before it awaits I/O: a machine id
    /// right after creating the machine and before waiting for it to start (reference
    /// kilo-cloud.md §13.3), pending-destroy ids before deleting. Calls on this key keep
    /// waiting meanwhile; lock-free readers ([`crate::Substrate::actor_read`]) see the
    /// checkpoint.
    ///
    /// Errors: [`Error::Storage`], the buffered writes being kept for the final commit.
    pub async fn checkpoint(&mut self) -> Result<()> {
        let writes = std::mem::take(&mut self.writes);
        if let Err(e) = self.session.flush(writes.clone()).await {
            self.writes = writes;
            return Err(e);
        }
        self.alarm_set |= matches!(writes.alarm, Some(Some(_)));
        Ok(())
    }

    /// Runs `work`, a slow call to the outside world (a provider API taking up to minutes),
    /// without holding a database session: commits the writes buffered so far (as
    /// [`Self::checkpoint`]), hands the session back (on PostgreSQL its connection, advisory
    /// lock and session slot, so slow calls cannot exhaust the pool and make other actors
    /// `Overloaded`), runs `work`, and takes the session again. The key stays this call's:
    /// this node queues the key's other calls as always, and other nodes wait while the
    /// suspension lease ([`SUSPENSION_LEASE_MS`], renewed every third of it while `work`
    /// runs) holds. On SQLite the session holds nothing, so this is `work` after a checkpoint.
    /// Only for actor types with [`Actor::SUSPENDS`].
    ///
    /// Errors: [`Error::Invalid`] for an actor type without `SUSPENDS`; [`Error::Storage`]
    /// from the checkpoint (nothing suspended then) or when the lease lapsed (this node
    /// stalled past it) and another node ran the key meanwhile: the call must end, and its
    /// later writes are discarded.
    pub async fn suspend_while<F: Future>(&mut self, work: F) -> Result<F::Output> {
        if !self.suspends {
            return Err(Error::Invalid {
                what: "actor type",
                message: format!(
                    "{} does not declare SUSPENDS, so its calls cannot suspend",
                    self.actor_type
                ),
            });
        }
        self.checkpoint().await?;
        let clock = self.clock.clone();
        self.session
            .suspend(clock.now_ms() + SUSPENSION_LEASE_MS)
            .await?;
        let every = (SUSPENSION_LEASE_MS / 3) as u64;
        tokio::pin!(work);
        let out = loop {
            let next = clock.now_ms() + every as i64;
            tokio::select! {
                out = &mut work => break out,
                () = clock.sleep_until(next, every) => {
                    if let Err(e) = self.session.renew_suspension(clock.now_ms() + SUSPENSION_LEASE_MS).await {
                        tracing::warn!(actor_type = self.actor_type, key = %self.key, error = %e,
                            "renewing a suspension lease failed");
                    }
                }
            }
        };
        self.session.resume().await?;
        Ok(out)
    }

    /// Buffers removal of all storage and the alarm.
    pub fn delete_all(&mut self) {
        self.writes = WriteSet {
            cleared: true,
            ..WriteSet::default()
        };
    }

    /// The alarm time as this call sees it, ms since epoch. During an alarm run the firing
    /// alarm is already consumed: this returns `None` unless the run set a new one (as
    /// Durable Objects' `getAlarm` does).
    pub async fn alarm(&mut self) -> Result<Option<UnixMs>> {
        match self.writes.alarm {
            Some(a) => Ok(a),
            None if self.writes.cleared => Ok(None),
            None => Ok(match self.session.alarm().await? {
                Some((_, generation)) if Some(generation) == self.firing => None,
                other => other.map(|(at, _)| at),
            }),
        }
    }

    /// Sets (replacing) the alarm to fire at `at_ms`, committed with the call.
    pub fn set_alarm(&mut self, at_ms: UnixMs) {
        self.writes.alarm = Some(Some(at_ms));
    }

    /// Removes the alarm, committed with the call.
    pub fn delete_alarm(&mut self) {
        self.writes.alarm = Some(None);
    }

    /// Sets the alarm to the schedule's next occurrence after now and returns it.
    ///
    /// A cron actor calls this when created and at the end of every alarm run. A run that fails
    /// discards this write like any other, and is retried; if it fails past the last retry the
    /// schedule stops, with an error log, until something sets it again.
    ///
    /// Errors: [`Error::Invalid`] when the schedule has no future occurrence.
    pub fn schedule_cron(&mut self, schedule: &CronSchedule) -> Result<UnixMs> {
        let next = schedule.next_after(self.now_ms())?;
        self.set_alarm(next);
        Ok(next)
    }
}

/// Type-erased actor entry for the alarm scheduler, which knows actors only by type name.
trait ErasedActor: Send + Sync {
    fn alarm<'a>(&'a self, ctx: &'a mut ActorContext, info: AlarmInfo)
    -> BoxFuture<'a, Result<()>>;
    fn suspends(&self) -> bool;
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<A: Actor> ErasedActor for A {
    fn alarm<'a>(
        &'a self,
        ctx: &'a mut ActorContext,
        info: AlarmInfo,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(Actor::alarm(self, ctx, info))
    }
    fn suspends(&self) -> bool {
        A::SUSPENDS
    }
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// Per-key admission: a FIFO mutex and a count of calls holding or waiting for it.
#[derive(Default)]
struct Slot {
    mutex: tokio::sync::Mutex<()>,
    queued: AtomicUsize,
}

const SHARDS: usize = 64;

/// Admission slots of live keys, sharded to keep lock hold times short.
type Shards = Vec<std::sync::Mutex<HashMap<(&'static str, String), Arc<Slot>>>>;

fn shard_of<'a>(
    shards: &'a Shards,
    actor_type: &str,
    key: &str,
) -> &'a std::sync::Mutex<HashMap<(&'static str, String), Arc<Slot>>> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    actor_type.hash(&mut h);
    key.hash(&mut h);
    &shards[(h.finish() as usize) % SHARDS]
}

/// Runs actor calls and alarms; owns the per-key admission slots.
pub struct ActorSystem {
    backend: Arc<dyn Backend>,
    clock: Arc<dyn Clock>,
    actors: std::sync::RwLock<HashMap<&'static str, Arc<dyn ErasedActor>>>,
    slots: Arc<Shards>,
    max_backlog: usize,
    tasks: TaskTracker,
    alarm_set: Arc<Notify>,
    closed: std::sync::atomic::AtomicBool,
}

/// Whether a call is refused when its key's backlog is full (calls) or always waits (alarms).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admission {
    Bounded,
    Always,
}

/// Releases a slot reservation when a call finishes (or its task is dropped).
struct SlotGuard {
    shards: Arc<Shards>,
    actor_type: &'static str,
    key: String,
    slot: Arc<Slot>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if self.slot.queued.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut shard = shard_of(&self.shards, self.actor_type, &self.key)
                .lock()
                .unwrap();
            let id = (self.actor_type, std::mem::take(&mut self.key));
            if let Some(s) = shard.get(&id)
                && Arc::ptr_eq(s, &self.slot)
                && s.queued.load(Ordering::Acquire) == 0
            {
                shard.remove(&id);
            }
        }
    }
}

impl ActorSystem {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        clock: Arc<dyn Clock>,
        max_backlog: usize,
        tasks: TaskTracker,
        alarm_set: Arc<Notify>,
    ) -> Self {
        Self {
            backend,
            clock,
            actors: Default::default(),
            slots: Arc::new((0..SHARDS).map(|_| Default::default()).collect()),
            max_backlog,
            tasks,
            alarm_set,
            closed: false.into(),
        }
    }

    /// Registers an actor type. Registering the same type twice replaces the handler.
    pub fn register<A: Actor>(&self, actor: A) {
        self.actors
            .write()
            .unwrap()
            .insert(A::TYPE, Arc::new(actor));
    }

    /// Names of the registered actor types.
    pub fn types(&self) -> Vec<&'static str> {
        let mut t: Vec<_> = self.actors.read().unwrap().keys().copied().collect();
        t.sort_unstable();
        t
    }

    /// The notifier that wakes the alarm scheduler (set by calls that set an alarm).
    pub(crate) fn alarm_wake(&self) -> Arc<Notify> {
        self.alarm_set.clone()
    }

    pub(crate) fn wake_alarms(&self) {
        self.alarm_set.notify_one();
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn admit(
        &self,
        actor_type: &'static str,
        key: &str,
        admission: Admission,
    ) -> Result<SlotGuard> {
        let slot = {
            let mut shard = shard_of(&self.slots, actor_type, key).lock().unwrap();
            let slot = shard
                .entry((actor_type, key.to_owned()))
                .or_default()
                .clone();
            let queued = slot.queued.fetch_add(1, Ordering::AcqRel);
            if admission == Admission::Bounded && queued >= self.max_backlog {
                slot.queued.fetch_sub(1, Ordering::AcqRel);
                metrics::counter!("kilocloud_actor_overloaded_total", "actor_type" => actor_type)
                    .increment(1);
                return Err(Error::Overloaded {
                    actor_type: actor_type.to_owned(),
                    key: key.to_owned(),
                    backlog: queued,
                    retry_after: Duration::from_secs(1),
                });
            }
            slot
        };
        Ok(SlotGuard {
            shards: self.slots.clone(),
            actor_type,
            key: key.to_owned(),
            slot,
        })
    }

    fn handler<A: Actor>(&self) -> Result<Arc<A>> {
        let erased = self
            .actors
            .read()
            .unwrap()
            .get(A::TYPE)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                what: "actor type",
                name: A::TYPE.to_owned(),
            })?;
        erased
            .as_any()
            .downcast::<A>()
            .map_err(|_| Error::Storage(format!("actor type {} registered twice", A::TYPE)))
    }

    /// Runs one call on actor `(A::TYPE, key)` and returns its reply after its writes committed.
    ///
    /// The call runs in its own task: if the caller stops waiting, the call still completes (and
    /// commits). Errors: [`Error::Overloaded`] when `max_backlog` calls already wait for this key;
    /// [`Error::ShuttingDown`]; the handler's own error (writes discarded); [`Error::Storage`] when
    /// the commit fails (writes discarded, reply dropped).
    pub async fn call<A: Actor>(self: &Arc<Self>, key: &str, call: A::Call) -> Result<A::Reply> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let actor = self.handler::<A>()?;
        // Reserve the backlog slot before spawning, so Overloaded is immediate.
        let guard = self.admit(A::TYPE, key, Admission::Bounded)?;
        let this = self.clone();
        let task = self.tasks.spawn(async move {
            this.run(guard, A::SUSPENDS, move |ctx| {
                Box::pin(async move { actor.call(ctx, call).await.map(|r| (r, None)) })
            })
            .await
        });
        task.await
            .map_err(|e| Error::Internal(format!("actor call {}:{key} panicked: {e}", A::TYPE)))?
    }

    /// Runs `f` as a call on `(actor_type, key)`: admission, local and cross-node lock, session,
    /// commit or discard. `f` returns the reply and, for alarm runs, the completion to commit.
    async fn run<R: Send>(
        &self,
        guard: SlotGuard,
        suspends: bool,
        f: impl for<'c> FnOnce(
            &'c mut ActorContext,
        ) -> BoxFuture<'c, Result<(R, Option<AlarmCompletion>)>>,
    ) -> Result<R> {
        let _held = guard.slot.mutex.lock().await;
        let session = self
            .backend
            .actor_session(
                guard.actor_type,
                &guard.key,
                suspends.then_some(self.clock.as_ref()),
            )
            .await?;
        let mut ctx = ActorContext {
            actor_type: guard.actor_type,
            key: guard.key.clone(),
            session,
            writes: WriteSet::default(),
            clock: self.clock.clone(),
            firing: None,
            alarm_set: false,
            suspends,
        };
        match f(&mut ctx).await {
            Ok((reply, completion)) => {
                let sets_alarm = ctx.alarm_set || matches!(ctx.writes.alarm, Some(Some(_)));
                ctx.session.commit(ctx.writes, completion).await?;
                if sets_alarm {
                    self.alarm_set.notify_one();
                }
                Ok(reply)
            }
            Err(e) => {
                ctx.session.release().await;
                if ctx.alarm_set {
                    self.alarm_set.notify_one();
                }
                Err(e)
            }
        }
    }

    /// Runs a claimed alarm on its actor and says how it went; only an error of the handler
    /// itself is an [`AlarmRun::HandlerFailed`] (what counts against the alarm's retries).
    pub(crate) async fn run_alarm(&self, row: &crate::store::AlarmRow) -> AlarmRun {
        let found = self
            .actors
            .read()
            .unwrap()
            .get_key_value(row.actor_type.as_str())
            .map(|(t, a)| (*t, a.clone()));
        let Some((actor_type, actor)) = found else {
            return AlarmRun::NotRun(Error::NotFound {
                what: "actor type",
                name: row.actor_type.clone(),
            });
        };
        let guard = match self.admit(actor_type, &row.actor_key, Admission::Always) {
            Ok(guard) => guard,
            Err(e) => return AlarmRun::NotRun(e),
        };
        let (fire_at, generation, retry_count) = (row.fire_at, row.generation, row.retry_count);
        let lag_clock = self.clock.clone();
        let handler_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let failed = handler_failed.clone();
        let suspends = actor.suspends();
        let result = self
            .run(guard, suspends, move |ctx| {
                Box::pin(async move {
                    if ctx.session.alarm().await? != Some((fire_at, generation)) {
                        return Ok((false, None));
                    }
                    ctx.firing = Some(generation);
                    let lag_ms = (lag_clock.now_ms() - fire_at).max(0);
                    metrics::histogram!("kilocloud_alarm_lag_seconds")
                        .record(lag_ms as f64 / 1000.0);
                    let info = AlarmInfo {
                        scheduled_at: fire_at,
                        retry_count,
                    };
                    if let Err(e) = actor.alarm(ctx, info).await {
                        failed.store(true, Ordering::SeqCst);
                        return Err(e);
                    }
                    Ok((true, Some(AlarmCompletion { generation })))
                })
            })
            .await;
        match result {
            Ok(true) => AlarmRun::Fired,
            Ok(false) => AlarmRun::Stale,
            Err(e) if handler_failed.load(Ordering::SeqCst) => AlarmRun::HandlerFailed(e),
            Err(e) => AlarmRun::NotRun(e),
        }
    }
}

/// How one run of a claimed alarm went.
#[derive(Debug)]
pub(crate) enum AlarmRun {
    /// The handler ran and its writes (and the alarm's deletion) committed.
    Fired,
    /// The alarm was replaced or deleted before it could run.
    Stale,
    /// The handler returned an error (or panicked): counts against its retries.
    HandlerFailed(Error),
    /// The handler never ran or its commit failed (the actor was `Overloaded`, its lock or
    /// session could not be had, the node is shutting down, the database failed): the alarm
    /// runs again without using a retry.
    NotRun(Error),
}
