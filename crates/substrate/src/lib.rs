//! The Kilo Cloud substrate: what replaces Durable Objects, Queues, KV and R2 (DESIGN.md §3).
//!
//! - [`ActorSystem`]: keyed single-writer actors with transactional storage and one alarm each.
//! - [`Alarms`]: the scheduler that runs due alarms at least once, with retries.
//! - [`Queues`]: named queues with visibility timeouts, retries and dead-letter queues.
//! - [`Kv`]: values with TTL. [`Blobs`]: `object_store`. [`CronSchedule`]: cron → alarms.
//!
//! Everything is reached through one [`Substrate`] handle, opened on SQLite (embedded, single
//! node) or PostgreSQL (several nodes). Storage is behind [`store::Backend`]; everything above it
//! is backend-neutral.

mod actor;
mod alarm;
mod blob;
mod clock;
mod cron;
mod error;
mod kv;
mod queue;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use actor::{Actor, ActorContext, ActorSystem, AlarmInfo};
pub use alarm::{
    ALARM_LEASE_MS, ALARM_MAX_RETRIES, ALARM_RETRY_BASE_MS, Alarms, FireReport,
    alarm_retry_delay_ms,
};
pub use blob::{BlobConfig, BlobMeta, Blobs};
pub use clock::{Clock, ManualClock, SystemClock, UnixMs};
pub use cron::CronSchedule;
pub use error::{Error, Result};
pub use kv::{KV_LIST_LIMIT, Kv};
pub use queue::{
    Consumer, DELIVERIES_PER_ATTEMPT, Delivery, MAX_BATCH_MESSAGES, MAX_DELAY_MS,
    MAX_MESSAGE_BYTES, MAX_RETRY_BACKOFF_MS, QueueConfig, Queues,
};
pub use store::sqlite::Synchronous;
pub use store::{ActorSnapshot, BackendKind, DeadLetter, QueueStats, RetryOutcome};

use store::Backend;

/// Which database to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseConfig {
    /// An SQLite file (created if missing), WAL mode.
    Sqlite {
        /// Database file path.
        path: PathBuf,
        /// Commit durability.
        synchronous: Synchronous,
    },
    /// A PostgreSQL database.
    Postgres {
        /// `postgres://user:password@host:port/db`.
        url: String,
        /// Pool size per node.
        max_connections: u32,
        /// Schema to use instead of the URL's default `search_path` (tests isolate this way).
        schema: Option<String>,
    },
}

/// Substrate settings. Defaults match ARCHITECTURE.md and `docs/configuration.md`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Tuning {
    /// Calls that may wait for one actor key before callers get `Overloaded`. Default 1,000.
    pub actor_max_backlog: usize,
    /// How often a node writes its heartbeat, ms. Default 1,000.
    pub node_heartbeat_ms: u64,
    /// A node silent this long is dead and its claims are taken over, ms. Default 5,000.
    pub node_dead_after_ms: u64,
    /// Idle consumers look for messages sent by other nodes or whose delay ended this often, ms.
    /// Default 250.
    pub queue_poll_ms: u64,
    /// The alarm scheduler looks for alarms set by other nodes this often, ms. Default 1,000.
    pub alarm_poll_ms: u64,
    /// Alarm handlers a node runs at once. Default 16 (on PostgreSQL, running handlers share the
    /// actor sessions, three quarters of the pool; keep room for the calls they make).
    pub alarm_concurrency: usize,
    /// Expired KV entries are deleted this often, ms. Default 60,000.
    pub kv_sweep_ms: u64,
    /// PostgreSQL `statement_timeout` of every connection, ms. Default 30,000.
    pub db_statement_timeout_ms: u64,
    /// Longest wait of an actor call for its cross-node lock (PostgreSQL `lock_timeout`) and
    /// for a free session, ms; then the caller gets `Overloaded` (503 with Retry-After) and an
    /// alarm runs again later without using a retry. Default 10,000.
    pub actor_lock_wait_ms: u64,
    /// Largest tolerated difference between this node's clock and the database server's
    /// (PostgreSQL, measured at every heartbeat), ms. Beyond it the node logs an error, reports
    /// `kilocloud_clock_skew_ms`, is not ready, and stops claiming messages and alarms (their
    /// times would be wrong). 0 disables the check (for manual clocks). Default 2,000.
    pub max_clock_skew_ms: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            actor_max_backlog: 1_000,
            node_heartbeat_ms: 1_000,
            node_dead_after_ms: 5_000,
            queue_poll_ms: 250,
            alarm_poll_ms: 1_000,
            alarm_concurrency: 16,
            kv_sweep_ms: 60_000,
            db_statement_timeout_ms: 30_000,
            actor_lock_wait_ms: 10_000,
            max_clock_skew_ms: 2_000,
        }
    }
}

/// The substrate of one node. Cheap to clone.
#[derive(Clone)]
pub struct Substrate {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    clock: Arc<dyn Clock>,
    node_id: String,
    tuning: Tuning,
    actors: Arc<ActorSystem>,
    alarms: Arc<Alarms>,
    queues: Arc<Queues>,
    kv: Kv,
    blobs: Blobs,
    /// Cancelled when the node stops taking work (consumers, scheduler, KV sweeper).
    shutdown: CancellationToken,
    /// Cancelled last, after in-flight work finished: the heartbeat keeps this node's claims
    /// from being taken over while it drains.
    heartbeat: CancellationToken,
    started: std::sync::atomic::AtomicBool,
    /// Claims are allowed while `now <= claim_lease`: `i64::MAX` until `start`, then half the
    /// dead-node timeout past the last successful heartbeat, so a node that cannot heartbeat
    /// stops claiming before other nodes take its work over.
    claim_lease: Arc<std::sync::atomic::AtomicI64>,
    /// This node's clock minus the database's at the last heartbeat, ms (PostgreSQL only;
    /// `i64::MIN` until measured).
    clock_skew_ms: std::sync::atomic::AtomicI64,
    /// The heartbeat and takeover loop; outside `tasks` because it must outlive the drain.
    node_loop: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    tasks: TaskTracker,
    data_lock: std::sync::Mutex<Option<std::fs::File>>,
    sqlite_path: Option<PathBuf>,
}

impl Substrate {
    /// Connects to the database, applies pending migrations, and opens the blob store. Does not
    /// start background work: operator commands use the substrate this way; servers then call
    /// [`Substrate::start`].
    ///
    /// Errors: [`Error::SchemaTooNew`]; [`Error::Storage`] naming the database (password
    /// redacted) when it cannot be reached.
    pub async fn open(
        database: &DatabaseConfig,
        blobs: &BlobConfig,
        tuning: Tuning,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let node_id = format!("node-{}", uuid::Uuid::new_v4().simple());
        let (backend, sqlite_path): (Arc<dyn Backend>, _) = match database {
            DatabaseConfig::Sqlite { path, synchronous } => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        Error::Storage(format!("cannot create {}: {e}", dir.display()))
                    })?;
                }
                let backend = store::sqlite::SqliteBackend::open(path, *synchronous)?;
                (Arc::new(backend), Some(path.clone()))
            }
            DatabaseConfig::Postgres {
                url,
                max_connections,
                schema,
            } => {
                let settings = store::postgres::PgSettings {
                    node_id: node_id.clone(),
                    statement_timeout_ms: tuning.db_statement_timeout_ms,
                    lock_timeout_ms: tuning.actor_lock_wait_ms,
                };
                let backend = store::postgres::PostgresBackend::connect(
                    url,
                    *max_connections,
                    schema.as_deref(),
                    &settings,
                )
                .await?;
                (Arc::new(backend), None)
            }
        };
        let blobs = Blobs::open(blobs)?;
        let tasks = TaskTracker::new();
        let claim_lease = Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
        let actors = Arc::new(ActorSystem::new(
            backend.clone(),
            clock.clone(),
            tuning.actor_max_backlog,
            tasks.clone(),
            Arc::new(Notify::new()),
        ));
        let alarms = Arc::new(Alarms::new(
            backend.clone(),
            clock.clone(),
            actors.clone(),
            node_id.clone(),
            tuning.alarm_concurrency,
            tasks.clone(),
            claim_lease.clone(),
        ));
        let queues = Arc::new(Queues::new(
            backend.clone(),
            clock.clone(),
            node_id.clone(),
            claim_lease.clone(),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                kv: Kv::new(backend.clone(), clock.clone()),
                backend,
                clock,
                node_id,
                tuning,
                actors,
                alarms,
                queues,
                blobs,
                shutdown: CancellationToken::new(),
                heartbeat: CancellationToken::new(),
                started: false.into(),
                claim_lease,
                clock_skew_ms: i64::MIN.into(),
                node_loop: Default::default(),
                tasks,
                data_lock: Default::default(),
                sqlite_path,
            }),
        })
    }

    /// Joins the cluster as a serving node: on SQLite takes the data file's lock (one server per
    /// file) and releases claims left by an earlier process; starts the heartbeat and takeover
    /// loop, the alarm scheduler and the KV sweeper.
    ///
    /// Errors: [`Error::DataDirLocked`] when another process serves the same SQLite file.
    pub async fn start(&self) -> Result<()> {
        let i = &self.inner;
        if i.started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Invalid {
                what: "start",
                message: "this substrate was already started".into(),
            });
        }
        let started = self.start_node().await;
        if started.is_err() {
            // Nothing was spawned; a later `start` may try again.
            i.data_lock.lock().unwrap().take();
            i.started.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        started
    }

    async fn start_node(&self) -> Result<()> {
        let i = &self.inner;
        if let Some(path) = &i.sqlite_path {
            let lock_path = path.with_extension("lock");
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| Error::Storage(format!("cannot open {}: {e}", lock_path.display())))?;
            if file.try_lock().is_err() {
                return Err(Error::DataDirLocked {
                    path: lock_path.display().to_string(),
                });
            }
            *i.data_lock.lock().unwrap() = Some(file);
            // Single node: whatever an earlier process claimed is free now.
            let r = i
                .backend
                .release_dead_nodes(&i.node_id, i64::MAX, i.clock.now_ms())
                .await?;
            if r != Default::default() {
                tracing::info!(
                    messages = r.messages,
                    alarms = r.alarms,
                    "released claims left by an earlier process"
                );
            }
        }
        // From here claims need a lease that a heartbeat (with agreeing clocks) renews.
        i.claim_lease
            .store(i64::MIN, std::sync::atomic::Ordering::SeqCst);
        i.heartbeat().await?;
        let this = self.clone();
        *i.node_loop.lock().unwrap() = Some(tokio::spawn(async move { this.node_loop().await }));
        let (alarms, shutdown) = (i.alarms.clone(), i.shutdown.clone());
        let poll = i.tuning.alarm_poll_ms;
        i.tasks
            .spawn(async move { alarms.run_loop(poll, shutdown).await });
        let this = self.clone();
        i.tasks.spawn(async move { this.kv_sweep_loop().await });
        let this = self.clone();
        i.tasks.spawn(async move { this.signal_loop().await });
        tracing::info!(node = %i.node_id, backend = ?i.backend.kind(), "substrate started");
        Ok(())
    }

    async fn node_loop(&self) {
        let i = &self.inner;
        let every = i.tuning.node_heartbeat_ms;
        // SQLite has one node, which released every earlier claim at start: nothing to reap.
        let reap = i.sqlite_path.is_none();
        while !i.heartbeat.is_cancelled() {
            let now = i.clock.now_ms();
            if let Err(e) = i.heartbeat().await {
                tracing::error!(error = %e,
                    "node heartbeat failed; this node stops claiming work if it goes on failing");
            }
            if reap
                && !i.shutdown.is_cancelled()
                && let Err(e) = self.reap_dead_nodes().await
            {
                tracing::error!(error = %e, "dead-node takeover failed");
            }
            tokio::select! {
                _ = i.clock.sleep_until(now + every as i64, every) => {}
                _ = i.heartbeat.cancelled() => {}
            }
        }
    }

    /// Releases the claims (queue messages, alarms) of nodes whose heartbeat is older than
    /// `node_dead_after_ms`, so live nodes take them over. The node loop runs this every
    /// heartbeat; tests call it after moving a manual clock.
    pub async fn reap_dead_nodes(&self) -> Result<store::Released> {
        let i = &self.inner;
        let now = i.clock.now_ms();
        let r = i
            .backend
            .release_dead_nodes(&i.node_id, now - i.tuning.node_dead_after_ms as i64, now)
            .await?;
        if r != Default::default() {
            tracing::warn!(
                messages = r.messages,
                alarms = r.alarms,
                "took over claims of dead nodes"
            );
            i.actors.wake_alarms();
        }
        Ok(r)
    }

    /// Wakes local consumers and the scheduler when other nodes send messages or set alarms,
    /// so cross-node latency does not wait for the pollers (which remain the fallback).
    async fn signal_loop(&self) {
        let i = &self.inner;
        while !i.shutdown.is_cancelled() {
            let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
            let backend = i.backend.clone();
            let forward = async move { backend.forward_signals(tx).await };
            let dispatch = async {
                while let Some(signal) = rx.recv().await {
                    match signal {
                        store::Signal::Queue(queue) => i.queues.wake(&queue),
                        store::Signal::Alarm => i.actors.wake_alarms(),
                    }
                }
            };
            tokio::select! {
                (result, ()) = async { tokio::join!(forward, dispatch) } => match result {
                    Ok(()) => return, // no cross-node signals on this backend
                    Err(e) => tracing::warn!(error = %e, "lost the signal connection; retrying"),
                },
                _ = i.shutdown.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = i.shutdown.cancelled() => {}
            }
        }
    }

    async fn kv_sweep_loop(&self) {
        let i = &self.inner;
        let every = i.tuning.kv_sweep_ms;
        while !i.shutdown.is_cancelled() {
            if let Err(e) = i.kv.sweep().await {
                tracing::error!(error = %e, "kv sweep failed");
            }
            tokio::select! {
                _ = i.clock.sleep_until(i.clock.now_ms() + every as i64, every) => {}
                _ = i.shutdown.cancelled() => {}
            }
        }
    }

    /// Starts a background consumer for a declared queue on this node.
    pub fn start_consumer(&self, queue: &str, consumer: Arc<dyn Consumer>) {
        let i = &self.inner;
        let (queues, tasks) = (i.queues.clone(), i.tasks.clone());
        let (queue, poll, shutdown) =
            (queue.to_owned(), i.tuning.queue_poll_ms, i.shutdown.clone());
        i.tasks.spawn(async move {
            queues
                .run_consumer(queue, consumer, poll, shutdown, tasks)
                .await
        });
    }

    /// Stops taking new work: consumers stop claiming messages and the scheduler stops claiming
    /// alarms. In-flight work continues. Called first on SIGTERM; idempotent.
    pub fn stop_intake(&self) {
        self.inner.shutdown.cancel();
    }

    /// Stops the node: stops intake, waits up to `grace` for in-flight calls, alarms and
    /// messages (heartbeating meanwhile, so no other node takes them over), then refuses
    /// further actor calls, stops the heartbeat and releases this node's claims so other nodes
    /// need not wait for the dead-node timeout. Returns false if work was still running when
    /// `grace` ran out; that work's claims are then taken over by the usual rules.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        let i = &self.inner;
        let deadline = tokio::time::Instant::now() + grace;
        self.stop_intake();
        i.tasks.close();
        let finished = tokio::time::timeout_at(deadline, i.tasks.wait())
            .await
            .is_ok();
        i.actors.close();
        i.heartbeat.cancel();
        // The last heartbeat and the release are bounded too: a database that stopped answering
        // must not keep the process past its deadline (plus a moment for the release).
        let node_loop = i.node_loop.lock().unwrap().take();
        if let Some(mut node_loop) = node_loop
            && tokio::time::timeout_at(deadline, &mut node_loop)
                .await
                .is_err()
        {
            node_loop.abort();
        }
        if finished {
            let leave = i.backend.node_leave(&i.node_id, i.clock.now_ms());
            match tokio::time::timeout(Duration::from_secs(2), leave).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not release this node's claims"),
                Err(_) => tracing::warn!("timed out releasing this node's claims"),
            }
        }
        i.data_lock.lock().unwrap().take();
        finished
    }

    /// The actor system.
    pub fn actors(&self) -> &Arc<ActorSystem> {
        &self.inner.actors
    }

    /// The alarm scheduler.
    pub fn alarms(&self) -> &Arc<Alarms> {
        &self.inner.alarms
    }

    /// The queues.
    pub fn queues(&self) -> &Queues {
        &self.inner.queues
    }

    /// The KV store.
    pub fn kv(&self) -> &Kv {
        &self.inner.kv
    }

    /// The blob store.
    pub fn blobs(&self) -> &Blobs {
        &self.inner.blobs
    }

    /// The clock every timestamp comes from.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// This node's id (`node-<uuid>`), new at every start.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// Which database backs this substrate.
    pub fn backend_kind(&self) -> BackendKind {
        self.inner.backend.kind()
    }

    /// This node's clock minus the database server's, ms, as measured at the last heartbeat;
    /// `None` before the first one and on SQLite (one clock).
    pub fn clock_skew_ms(&self) -> Option<i64> {
        let skew = self
            .inner
            .clock_skew_ms
            .load(std::sync::atomic::Ordering::SeqCst);
        (skew != i64::MIN).then_some(skew)
    }

    /// Checks the database answers, its schema is the one this binary expects, and this node's
    /// clock is within `max_clock_skew_ms` of the database's (for `/ready`).
    pub async fn ready(&self) -> Result<()> {
        if let Some(skew) = self.clock_skew_ms()
            && self.inner.skewed(skew)
        {
            return Err(Error::Storage(format!(
                "this node's clock is {skew} ms off the database's (limit {} ms)",
                self.inner.tuning.max_clock_skew_ms
            )));
        }
        self.inner.backend.ping().await?;
        let v = self.inner.backend.schema_version().await?;
        if v != store::migrations::LATEST {
            return Err(Error::Storage(format!(
                "schema version {v}, expected {}",
                store::migrations::LATEST
            )));
        }
        Ok(())
    }

    /// Schema version of the database.
    pub async fn schema_version(&self) -> Result<i64> {
        self.inner.backend.schema_version().await
    }

    /// Newest schema version this binary knows.
    pub fn latest_schema_version() -> i64 {
        store::migrations::LATEST
    }

    /// The committed value of one storage key of an actor, read without a call and without
    /// locking the actor: it may miss a call in progress, never sees uncommitted writes. For hot
    /// read paths (credential checks) that must not queue behind the actor's calls.
    ///
    /// Errors: [`Error::Serde`] when the stored JSON does not fit `T`; [`Error::Storage`].
    pub async fn actor_read<T: serde::de::DeserializeOwned>(
        &self,
        actor_type: &str,
        key: &str,
        storage_key: &str,
    ) -> Result<Option<T>> {
        self.inner
            .backend
            .actor_read(actor_type, key, storage_key)
            .await?
            .map(|v| serde_json::from_slice(&v).map_err(Error::from))
            .transpose()
    }

    /// Committed entries of one actor whose storage key starts with `prefix` and sorts after
    /// `after` (an empty `after` starts at the prefix), in key order, at most `limit`, decoded
    /// as `T`; read without a call and without locking the actor, like
    /// [`Substrate::actor_read`]. For paging through logs an actor appends to.
    ///
    /// Errors: [`Error::Serde`] when a stored value does not fit `T`; [`Error::Storage`].
    pub async fn actor_scan<T: serde::de::DeserializeOwned>(
        &self,
        actor_type: &str,
        key: &str,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, T)>> {
        self.inner
            .backend
            .actor_scan(actor_type, key, prefix, after, limit)
            .await?
            .into_iter()
            .map(|(k, v)| Ok((k, serde_json::from_slice(&v)?)))
            .collect()
    }

    /// Keys of the actors of `actor_type` that have storage, above `after`, in byte order, at
    /// most `limit` (for maintenance passes that visit every actor of a type).
    pub async fn actor_keys(
        &self,
        actor_type: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<String>> {
        self.inner
            .backend
            .actor_keys(actor_type, after, limit)
            .await
    }

    /// An actor's committed storage and alarm, read without locking it (operator view).
    pub async fn actor_snapshot(&self, actor_type: &str, key: &str) -> Result<ActorSnapshot> {
        self.inner.backend.actor_snapshot(actor_type, key).await
    }
}

impl Inner {
    /// Writes this node's heartbeat and, unless the clocks disagree beyond
    /// `max_clock_skew_ms`, renews the claim lease. The skew is measured against the midpoint
    /// of the round trip, so network latency does not count as skew.
    async fn heartbeat(&self) -> Result<()> {
        let now = self.clock.now_ms();
        let db_now = self.backend.node_heartbeat(&self.node_id, now).await?;
        let Some(db_now) = db_now else {
            self.renew_claim_lease(now);
            return Ok(());
        };
        let skew = (now + self.clock.now_ms()) / 2 - db_now;
        metrics::gauge!("kilocloud_clock_skew_ms").set(skew as f64);
        let before = self
            .clock_skew_ms
            .swap(skew, std::sync::atomic::Ordering::SeqCst);
        if self.skewed(skew) {
            if before == i64::MIN || !self.skewed(before) {
                tracing::error!(
                    skew_ms = skew,
                    limit_ms = self.tuning.max_clock_skew_ms,
                    "this node's clock disagrees with the database's; it stops claiming messages \
                     and alarms until the clocks agree"
                );
            }
        } else {
            if before != i64::MIN && self.skewed(before) {
                tracing::info!(
                    skew_ms = skew,
                    "clock skew back within its limit; claiming again"
                );
            }
            self.renew_claim_lease(now);
        }
        Ok(())
    }

    /// Whether `skew` (ms) is beyond the configured limit (never, when the check is off).
    fn skewed(&self, skew: i64) -> bool {
        self.tuning.max_clock_skew_ms > 0 && skew.unsigned_abs() > self.tuning.max_clock_skew_ms
    }

    /// After a successful heartbeat at `now`: claims are allowed until half the dead-node
    /// timeout later.
    fn renew_claim_lease(&self, now: UnixMs) {
        let lease = now + self.tuning.node_dead_after_ms as i64 / 2;
        self.claim_lease
            .store(lease, std::sync::atomic::Ordering::SeqCst);
    }
}
