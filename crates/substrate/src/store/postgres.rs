//! PostgreSQL backend: several `kilocloud serve` nodes on one database.
//!
//! - **Actors**: a call holds a session-level advisory lock on
//!   `hashtextextended(type || 0x1f || key, 0)` on one pooled connection for its whole duration, and
//!   commits its write set on that connection. PostgreSQL drops the lock when the connection closes,
//!   so a node killed mid-call frees its actors as soon as its sockets close.
//! - **Alarms and queue messages** are claimed with `FOR UPDATE SKIP LOCKED`, recording the claiming
//!   node. Nodes heartbeat into `nodes`; any node releases the claims of a node whose heartbeat is
//!   older than the configured dead-node timeout.
//! - Sends and alarm sets `NOTIFY` the other nodes, which `LISTEN` and wake their consumers and
//!   schedulers at once; polling stays as the fallback.
//! - Migrations run under a fixed advisory lock so nodes starting together apply them once.
//! - A call of a suspendable actor type that waits on the outside world
//!   (`ActorContext::suspend_while`) leaves a lease row in `actor_suspensions` and gives its
//!   lock, connection and session slot back; a session on that key on another node waits
//!   while the lease holds, and the suspended call, resuming, takes the lock again and ends
//!   its lease, or fails if the lease lapsed and another node took the key (fencing).

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool, Postgres, Row};

use super::{
    ActorSession, ActorSnapshot, AlarmCompletion, AlarmRow, AlarmSnapshot, Backend, BackendKind,
    ClaimCandidate, ClaimDecision, ClaimRequest, ClaimedMessage, DeadLetter, QueueStats, Released,
    RetryOutcome, RetryRequest, Signal, WriteSet, claim_decision, migrations,
};
use crate::clock::UnixMs;
use crate::error::{Error, Result};

/// `NOTIFY` channel for queues that got deliverable messages (payload: the queue name).
const QUEUE_CHANNEL: &str = "kilocloud_queue";
/// `NOTIFY` channel for alarms being set (no payload).
const ALARM_CHANNEL: &str = "kilocloud_alarm";

/// Advisory lock id held while migrating ("kilocloud" in ASCII, truncated).
const MIGRATION_LOCK: i64 = 0x6b696c6f636c6f75;

/// Per-connection limits and identity of a node's PostgreSQL sessions.
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// This node's id; every connection's `application_name` is `kilocloud/<node_id>`, so a
    /// node that takes over a dead node's work can terminate the dead node's sessions (and with
    /// them the advisory locks they hold).
    pub node_id: String,
    /// `statement_timeout`, ms: no statement of this node runs longer.
    pub statement_timeout_ms: u64,
    /// `lock_timeout`, ms: the longest an actor call waits for its advisory lock (or a
    /// statement for a row lock) before the caller gets `Overloaded`.
    pub lock_timeout_ms: u64,
}

/// SQLSTATE of a `lock_timeout` (`lock_not_available`).
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// The PostgreSQL backend.
#[derive(Clone)]
pub struct PostgresBackend {
    /// Actor sessions, queues, KV, alarms.
    pool: PgPool,
    /// Heartbeats, takeover and the `LISTEN` connection, on connections of their own so that a
    /// busy main pool cannot delay a heartbeat until other nodes think this one is dead.
    control: PgPool,
    /// Actor sessions may hold at most three quarters of `pool`.
    sessions: std::sync::Arc<tokio::sync::Semaphore>,
    /// The longest an actor call waits for a session, ms (the lock wait is bounded by the
    /// connections' `lock_timeout`).
    lock_wait_ms: u64,
    /// Signals for other nodes, sent by [`notify_loop`] after the commits that caused them.
    notify: tokio::sync::mpsc::UnboundedSender<Signal>,
    /// This node's id, as its suspension leases name it.
    node_id: String,
}

impl PostgresBackend {
    /// Connects with up to `max_connections` pooled connections and applies migrations.
    ///
    /// `search_path`, when given, is set on every connection (tests use one schema each). Every
    /// connection gets `settings` (statement and lock timeouts, `application_name`) and
    /// server-side TCP keepalives (idle 5 s, interval 2 s, 3 probes), so the server drops the
    /// sessions, and the advisory locks, of a node whose host vanished within about 11 s.
    /// Errors: [`Error::Storage`] naming the URL with its password redacted when the database is
    /// unreachable; [`Error::SchemaTooNew`].
    pub async fn connect(
        url: &str,
        max_connections: u32,
        search_path: Option<&str>,
        settings: &PgSettings,
    ) -> Result<Self> {
        if max_connections < 4 {
            return Err(Error::Invalid {
                what: "postgres.max_connections",
                message: format!("{max_connections} is too small; use at least 4"),
            });
        }
        let mut opts: PgConnectOptions = url.parse().map_err(|e| {
            Error::Storage(format!("invalid database URL {}: {e}", redact_url(url)))
        })?;
        if let Some(schema) = search_path {
            opts = opts.options([("search_path", schema)]);
        }
        let (statement, lock) = (
            settings.statement_timeout_ms.to_string(),
            settings.lock_timeout_ms.to_string(),
        );
        opts = opts
            .application_name(&application_name(&settings.node_id))
            .options([
                ("statement_timeout", statement.as_str()),
                ("lock_timeout", lock.as_str()),
                ("idle_in_transaction_session_timeout", "60000"),
                ("tcp_keepalives_idle", "5"),
                ("tcp_keepalives_interval", "2"),
                ("tcp_keepalives_count", "3"),
            ]);
        // One direct connection first: it reports the real cause (refused, auth, unknown
        // database) where the pool would only report a timeout.
        let probe = sqlx::PgConnection::connect_with(&opts).await.map_err(|e| {
            Error::Storage(format!(
                "cannot connect to PostgreSQL at {}: {e}",
                redact_url(url)
            ))
        })?;
        let _ = probe.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(10))
            // A broken connection fails its statement and is then discarded by the pool; a ping
            // before every acquire would add a round trip to every actor call.
            .test_before_acquire(false)
            .connect_with(opts.clone())
            .await
            .map_err(|e| {
                Error::Storage(format!(
                    "cannot connect to PostgreSQL at {}: {e}",
                    redact_url(url)
                ))
            })?;
        let control = PgPoolOptions::new()
            .max_connections(3)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_lazy_with(opts);
        let sessions = std::sync::Arc::new(tokio::sync::Semaphore::new(
            (max_connections as usize * 3 / 4).max(1),
        ));
        let (notify, pending) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(notify_loop(control.clone(), pending));
        let backend = Self {
            pool,
            control,
            sessions,
            lock_wait_ms: settings.lock_timeout_ms,
            notify,
            node_id: settings.node_id.clone(),
        };
        backend.migrate().await?;
        Ok(backend)
    }

    async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *conn)
            .await?;
        let result = self.migrate_locked(&mut conn).await;
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *conn)
            .await?;
        result
    }

    async fn migrate_locked(&self, conn: &mut PoolConnection<Postgres>) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS kilocloud_schema (
                version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut **conn)
        .await?;
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0)::BIGINT FROM kilocloud_schema")
                .fetch_one(&mut **conn)
                .await?;
        migrations::check_not_newer(current)?;
        for m in migrations::MIGRATIONS
            .iter()
            .filter(|m| m.version > current)
        {
            let mut tx = conn.begin().await?;
            sqlx::raw_sql(m.postgres).execute(&mut *tx).await?;
            sqlx::query(
                "INSERT INTO kilocloud_schema (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(m.version)
            .bind(m.name)
            .bind(crate::clock::Clock::now_ms(&crate::SystemClock))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(
                version = m.version,
                name = m.name,
                "applied postgres migration"
            );
        }
        Ok(())
    }
}

/// Sends the `NOTIFY`s other nodes listen for, outside the data transactions that caused them:
/// a `NOTIFY` in a transaction takes a database-wide lock until its commit has been flushed,
/// which would serialize every such commit. Signals that pile up while one round trip is in
/// flight are coalesced (one per queue). Payloads carry the schema, so deployments and tests
/// sharing a database do not wake each other. Ends when the backend is dropped.
async fn notify_loop(control: PgPool, mut pending: tokio::sync::mpsc::UnboundedReceiver<Signal>) {
    while let Some(first) = pending.recv().await {
        let (mut queues, mut alarm) = (std::collections::BTreeSet::new(), false);
        let mut add = |s: Signal| match s {
            Signal::Queue(q) => {
                queues.insert(q);
            }
            Signal::Alarm => alarm = true,
        };
        add(first);
        while let Ok(s) = pending.try_recv() {
            add(s);
        }
        let queues: Vec<String> = queues.into_iter().collect();
        let sent = sqlx::query(
            "SELECT count(pg_notify('kilocloud_queue', current_schema() || '.' || q))
             FROM UNNEST($1::text[]) AS u(q)
             UNION ALL
             SELECT count(pg_notify('kilocloud_alarm', current_schema())) WHERE $2",
        )
        .bind(&queues)
        .bind(alarm)
        .execute(&control)
        .await;
        if let Err(e) = sent {
            // Other nodes still find the work by polling.
            tracing::debug!(error = %e, "cannot notify other nodes");
        }
    }
}

/// `postgres://user:secret@host/db?password=x` → `postgres://user:***@host/db?password=***`.
pub fn redact_url(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return "<unparseable URL>".to_owned();
    };
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if u.query_pairs().any(|(k, _)| k == "password") {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// `application_name` of a node's connections.
fn application_name(node_id: &str) -> String {
    format!("kilocloud/{node_id}")
}

fn lock_name(actor_type: &str, key: &str) -> String {
    format!("{actor_type}\u{1f}{key}")
}

struct PgSession {
    conn: Option<PoolConnection<Postgres>>,
    notify: tokio::sync::mpsc::UnboundedSender<Signal>,
    /// Keeps running actor sessions below the pool size, so that handlers, queues, alarms and
    /// KV always find a connection. `None` while suspended.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    actor_type: String,
    key: String,
    /// Where a suspended session gets its slot and connection back.
    pool: PgPool,
    sessions: std::sync::Arc<tokio::sync::Semaphore>,
    node_id: String,
}

impl PgSession {
    fn conn(&mut self) -> &mut PoolConnection<Postgres> {
        self.conn.as_mut().expect("session used after release")
    }

    async fn unlock(&mut self) -> Result<()> {
        let name = lock_name(&self.actor_type, &self.key);
        let conn = self.conn();
        sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
            .bind(name)
            .execute(&mut **conn)
            .await?;
        Ok(())
    }

    /// Applies the common write set (no `delete_all`, no alarm completion) as one statement:
    /// one round trip, atomic by itself.
    async fn apply_simple(&mut self, writes: &WriteSet) -> Result<()> {
        let (t, k) = (self.actor_type.clone(), self.key.clone());
        write_entries(self.conn(), &t, &k, writes).await
    }

    /// Applies a write set that clears the actor or completes an alarm, in a transaction.
    async fn apply(
        &mut self,
        writes: &WriteSet,
        completion: Option<AlarmCompletion>,
    ) -> Result<()> {
        let (t, k) = (self.actor_type.clone(), self.key.clone());
        let mut tx = self.conn().begin().await?;
        if let Some(c) = completion {
            sqlx::query(
                "DELETE FROM alarms WHERE actor_type = $1 AND actor_key = $2 AND generation = $3",
            )
            .bind(&t)
            .bind(&k)
            .bind(c.generation)
            .execute(&mut *tx)
            .await?;
        }
        if writes.cleared {
            sqlx::query("DELETE FROM actor_storage WHERE actor_type = $1 AND actor_key = $2")
                .bind(&t)
                .bind(&k)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM alarms WHERE actor_type = $1 AND actor_key = $2")
                .bind(&t)
                .bind(&k)
                .execute(&mut *tx)
                .await?;
        }
        write_entries(&mut tx, &t, &k, writes).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Applies `writes` (and `completion`) in the cheapest atomic way; nothing for nothing.
    async fn write(
        &mut self,
        writes: &WriteSet,
        completion: Option<AlarmCompletion>,
    ) -> Result<()> {
        if writes.is_empty() && completion.is_none() {
            Ok(())
        } else if !writes.cleared && completion.is_none() {
            self.apply_simple(writes).await
        } else {
            self.apply(writes, completion).await
        }
    }

    /// Ends the session: unlocks, or closes the connection (which drops the lock server-side)
    /// when unlocking fails.
    async fn finish(&mut self) {
        if self.unlock().await.is_err()
            && let Some(conn) = self.conn.take()
        {
            let _ = conn.close().await;
        }
        self.conn = None;
    }
}

impl Drop for PgSession {
    fn drop(&mut self) {
        // Dropped without commit/release (a panicking or cancelled call): close the connection
        // instead of returning it to the pool with the advisory lock still held.
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}

#[async_trait]
impl ActorSession for PgSession {
    async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        let (t, k) = (self.actor_type.clone(), self.key.clone());
        Ok(sqlx::query_scalar(
            "SELECT value FROM actor_storage WHERE actor_type = $1 AND actor_key = $2 AND key = $3",
        )
        .bind(t)
        .bind(k)
        .bind(key)
        .fetch_optional(&mut **self.conn())
        .await?)
    }

    async fn list(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let (t, k) = (self.actor_type.clone(), self.key.clone());
        list_storage(self.conn(), &t, &k, prefix).await
    }

    async fn list_page(
        &mut self,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let (t, k) = (self.actor_type.clone(), self.key.clone());
        let rows = sqlx::query(
            "SELECT key, value FROM actor_storage WHERE actor_type = $1 AND actor_key = $2
             AND starts_with(key, $3) AND key COLLATE \"C\" > $4
             ORDER BY key COLLATE \"C\" LIMIT $5",
        )
        .bind(t)
        .bind(k)
        .bind(prefix)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&mut **self.conn())
        .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn alarm(&mut self) -> Result<Option<(UnixMs, i64)>> {
        let (t, k) = (self.actor_type.clone(), self.key.clone());
        let row = sqlx::query(
            "SELECT fire_at, generation FROM alarms WHERE actor_type = $1 AND actor_key = $2",
        )
        .bind(t)
        .bind(k)
        .fetch_optional(&mut **self.conn())
        .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    async fn flush(&mut self, writes: WriteSet) -> Result<()> {
        self.write(&writes, None).await?;
        if matches!(writes.alarm, Some(Some(_))) {
            let _ = self.notify.send(Signal::Alarm);
        }
        Ok(())
    }

    async fn commit(
        mut self: Box<Self>,
        writes: WriteSet,
        completion: Option<AlarmCompletion>,
    ) -> Result<()> {
        let result = self.write(&writes, completion).await;
        self.finish().await;
        if result.is_ok() && matches!(writes.alarm, Some(Some(_))) {
            let _ = self.notify.send(Signal::Alarm);
        }
        result
    }

    async fn release(mut self: Box<Self>) {
        self.finish().await;
    }

    async fn suspend(&mut self, until: UnixMs) -> Result<()> {
        let (t, k, node) = (
            self.actor_type.clone(),
            self.key.clone(),
            self.node_id.clone(),
        );
        sqlx::query(
            "INSERT INTO actor_suspensions (actor_type, actor_key, node_id, until_ms)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (actor_type, actor_key) DO UPDATE
             SET node_id = excluded.node_id, until_ms = excluded.until_ms",
        )
        .bind(&t)
        .bind(&k)
        .bind(&node)
        .bind(until)
        .execute(&mut **self.conn())
        .await?;
        // The lease is committed (autocommit) before the lock goes: a session that gets the
        // lock next sees it.
        self.finish().await;
        self.permit = None;
        Ok(())
    }

    async fn renew_suspension(&mut self, until: UnixMs) -> Result<()> {
        let renewed = sqlx::query(
            "UPDATE actor_suspensions SET until_ms = $4
             WHERE actor_type = $1 AND actor_key = $2 AND node_id = $3",
        )
        .bind(&self.actor_type)
        .bind(&self.key)
        .bind(&self.node_id)
        .bind(until)
        .execute(&self.pool)
        .await?;
        if renewed.rows_affected() == 0 {
            return Err(self.lost());
        }
        Ok(())
    }

    async fn resume(&mut self) -> Result<()> {
        self.permit = Some(
            self.sessions
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed"),
        );
        self.conn = Some(self.pool.acquire().await?);
        let name = lock_name(&self.actor_type, &self.key);
        // Other nodes hold this lock only long enough to see the lease; retry past their
        // `lock_timeout` rather than fail the call after its outside work is done.
        let mut attempts = 0;
        loop {
            match sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
                .bind(&name)
                .execute(&mut **self.conn())
                .await
            {
                Ok(_) => break,
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) && attempts < 5 =>
                {
                    attempts += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let (t, k, node) = (
            self.actor_type.clone(),
            self.key.clone(),
            self.node_id.clone(),
        );
        let ended = sqlx::query(
            "DELETE FROM actor_suspensions WHERE actor_type = $1 AND actor_key = $2 AND node_id = $3",
        )
        .bind(t)
        .bind(k)
        .bind(node)
        .execute(&mut **self.conn())
        .await?;
        if ended.rows_affected() == 0 {
            return Err(self.lost());
        }
        Ok(())
    }
}

impl PgSession {
    fn lost(&self) -> Error {
        Error::Storage(format!(
            "actor {}:{}: its suspension lease lapsed and another node ran it; this call's \
             later writes are discarded",
            self.actor_type, self.key
        ))
    }
}

/// Applies a write set's puts, deletes and alarm set/delete in one statement. Its parts touch
/// disjoint rows (a key is either put or deleted; the alarm is either set or deleted), which a
/// single statement requires.
async fn write_entries(
    conn: &mut sqlx::PgConnection,
    t: &str,
    k: &str,
    writes: &WriteSet,
) -> Result<()> {
    let (mut put_keys, mut put_values, mut deleted) = (Vec::new(), Vec::new(), Vec::new());
    for (key, value) in &writes.entries {
        match value {
            Some(v) => {
                put_keys.push(key.as_str());
                put_values.push(v.as_slice());
            }
            None => deleted.push(key.as_str()),
        }
    }
    let (alarm_op, alarm_at) = match writes.alarm {
        None => (0, 0),
        Some(Some(at)) => (1, at),
        Some(None) => (2, 0),
    };
    sqlx::query(
        "WITH del AS (
            DELETE FROM actor_storage
            WHERE actor_type = $1 AND actor_key = $2 AND key = ANY($3::text[])),
         ins AS (
            INSERT INTO actor_storage (actor_type, actor_key, key, value)
            SELECT $1, $2, k, v FROM UNNEST($4::text[], $5::bytea[]) AS u(k, v)
            ON CONFLICT (actor_type, actor_key, key) DO UPDATE SET value = excluded.value),
         alarm_set AS (
            INSERT INTO alarms (actor_type, actor_key, fire_at, retry_count, generation, claimed_by)
            SELECT $1, $2, $7, 0, $8, NULL WHERE $6 = 1
            ON CONFLICT (actor_type, actor_key) DO UPDATE SET fire_at = excluded.fire_at,
              retry_count = 0, generation = excluded.generation, claimed_by = NULL),
         alarm_del AS (
            DELETE FROM alarms WHERE actor_type = $1 AND actor_key = $2 AND $6 = 2)
         SELECT 1",
    )
    .bind(t)
    .bind(k)
    .bind(&deleted)
    .bind(&put_keys)
    .bind(&put_values)
    .bind(alarm_op)
    .bind(alarm_at)
    .bind(rand::random::<i64>())
    .execute(conn)
    .await?;
    Ok(())
}

async fn list_storage(
    conn: &mut sqlx::PgConnection,
    t: &str,
    k: &str,
    prefix: &str,
) -> Result<Vec<(String, Vec<u8>)>> {
    let rows = sqlx::query(
        "SELECT key, value FROM actor_storage WHERE actor_type = $1 AND actor_key = $2
         AND starts_with(key, $3) ORDER BY key COLLATE \"C\"",
    )
    .bind(t)
    .bind(k)
    .bind(prefix)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn dead_letter(r: sqlx::postgres::PgRow) -> DeadLetter {
    let body: Vec<u8> = r.get(3);
    DeadLetter {
        id: r.get(0),
        queue: r.get(1),
        message_id: r.get(2),
        body: super::json_or_bytes(&body),
        attempts: r.get::<i32, _>(4) as u32,
        last_error: r.get(5),
        enqueued_at: r.get(6),
        failed_at: r.get(7),
    }
}

impl PostgresBackend {
    /// A session on `(actor_type, key)` holding its advisory lock.
    async fn lock_session(&self, actor_type: &str, key: &str) -> Result<Box<PgSession>> {
        // The session owns the connection before the lock is requested: if the request fails
        // or is cancelled, dropping the session closes the connection, so a lock granted late
        // can never end up on a pooled connection.
        // Bounded like the pool's own acquire: a node whose sessions are all taken (for example
        // by handlers that each wait for a call on another actor) answers Overloaded instead of
        // hanging.
        let overloaded = || Error::Overloaded {
            actor_type: actor_type.to_owned(),
            key: key.to_owned(),
            backlog: self.sessions.available_permits(),
            retry_after: std::time::Duration::from_secs(1),
        };
        let permit = tokio::time::timeout(
            std::time::Duration::from_millis(self.lock_wait_ms),
            self.sessions.clone().acquire_owned(),
        )
        .await
        .map_err(|_| overloaded())?
        .expect("semaphore never closed");
        let mut session = PgSession {
            notify: self.notify.clone(),
            permit: Some(permit),
            conn: Some(self.pool.acquire().await?),
            actor_type: actor_type.to_owned(),
            key: key.to_owned(),
            pool: self.pool.clone(),
            sessions: self.sessions.clone(),
            node_id: self.node_id.clone(),
        };
        // Bounded by the connection's `lock_timeout`: a key held by a hung node answers
        // Overloaded (503, Retry-After) until the takeover terminates that node's sessions.
        let locked = sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
            .bind(lock_name(actor_type, key))
            .execute(&mut **session.conn())
            .await;
        match locked {
            Ok(_) => Ok(Box::new(session)),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) => {
                Err(overloaded())
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[async_trait]
impl Backend for PostgresBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Postgres
    }

    async fn forward_signals(&self, tx: tokio::sync::mpsc::Sender<Signal>) -> Result<()> {
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&self.control)
            .await?;
        let queue_prefix = format!("{schema}.");
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.control).await?;
        listener.listen_all([QUEUE_CHANNEL, ALARM_CHANNEL]).await?;
        loop {
            // `recv` reconnects by itself after a lost connection; notifications sent meanwhile
            // are caught by the pollers.
            let n = tokio::select! {
                n = listener.recv() => n?,
                _ = tx.closed() => return Ok(()),
            };
            let signal = match n.channel() {
                QUEUE_CHANNEL => match n.payload().strip_prefix(&queue_prefix) {
                    Some(queue) => Signal::Queue(queue.to_owned()),
                    None => continue, // another schema's
                },
                _ if n.payload() == schema => Signal::Alarm,
                _ => continue,
            };
            if tx.send(signal).await.is_err() {
                return Ok(());
            }
        }
    }

    async fn schema_version(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0)::BIGINT FROM kilocloud_schema")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn actor_session(
        &self,
        actor_type: &str,
        key: &str,
        suspensions: Option<&dyn crate::Clock>,
    ) -> Result<Box<dyn ActorSession>> {
        let Some(clock) = suspensions else {
            return Ok(self.lock_session(actor_type, key).await?);
        };
        let deadline =
            tokio::time::Instant::now() + std::time::Duration::from_millis(self.lock_wait_ms);
        loop {
            let mut session = self.lock_session(actor_type, key).await?;
            let lease: Option<(String, i64)> = sqlx::query_as(
                "SELECT node_id, until_ms FROM actor_suspensions
                 WHERE actor_type = $1 AND actor_key = $2",
            )
            .bind(actor_type)
            .bind(key)
            .fetch_optional(&mut **session.conn())
            .await?;
            match lease {
                None => return Ok(session),
                Some((node, until)) if node != self.node_id && until > clock.now_ms() => {
                    // Another node's call is out waiting on the outside world: wait for it.
                    session.finish().await;
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::Overloaded {
                            actor_type: actor_type.to_owned(),
                            key: key.to_owned(),
                            backlog: 0,
                            retry_after: std::time::Duration::from_secs(1),
                        });
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Some(_) => {
                    // Lapsed (its node died), or this node's own from before a restart.
                    sqlx::query(
                        "DELETE FROM actor_suspensions WHERE actor_type = $1 AND actor_key = $2",
                    )
                    .bind(actor_type)
                    .bind(key)
                    .execute(&mut **session.conn())
                    .await?;
                    return Ok(session);
                }
            }
        }
    }

    async fn actor_snapshot(&self, actor_type: &str, key: &str) -> Result<ActorSnapshot> {
        let mut conn = self.pool.acquire().await?;
        let storage = list_storage(&mut conn, actor_type, key, "")
            .await?
            .into_iter()
            .map(|(k, v)| (k, super::json_or_bytes(&v)))
            .collect();
        let alarm = sqlx::query(
            "SELECT fire_at, retry_count, claimed_by FROM alarms WHERE actor_type = $1 AND actor_key = $2",
        )
        .bind(actor_type)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| AlarmSnapshot {
            fire_at: r.get(0),
            retry_count: r.get::<i32, _>(1) as u32,
            claimed_by: r.get(2),
        });
        Ok(ActorSnapshot {
            actor_type: actor_type.to_owned(),
            key: key.to_owned(),
            storage,
            alarm,
        })
    }

    async fn next_alarm_at(&self, types: &[&str]) -> Result<Option<UnixMs>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(t) FROM (
                SELECT MIN(fire_at) AS t FROM alarms WHERE claimed_by IS NULL AND actor_type = ANY($1)
                UNION ALL
                SELECT MIN(GREATEST(fire_at, claimed_until)) FROM alarms
                WHERE claimed_by IS NOT NULL AND actor_type = ANY($1)) n",
        )
        .bind(types)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn claim_due_alarms(
        &self,
        node: &str,
        now: UnixMs,
        lease_until: UnixMs,
        limit: u32,
        types: &[&str],
    ) -> Result<Vec<AlarmRow>> {
        let rows = sqlx::query(
            "UPDATE alarms a SET claimed_by = $1, claimed_until = $5
             FROM (SELECT actor_type, actor_key FROM alarms
                   WHERE fire_at <= $2 AND actor_type = ANY($4)
                     AND (claimed_by IS NULL OR claimed_until <= $2)
                   ORDER BY fire_at LIMIT $3 FOR UPDATE SKIP LOCKED) d
             WHERE a.actor_type = d.actor_type AND a.actor_key = d.actor_key
             RETURNING a.actor_type, a.actor_key, a.fire_at, a.retry_count, a.generation",
        )
        .bind(node)
        .bind(now)
        .bind(i64::from(limit))
        .bind(types)
        .bind(lease_until)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AlarmRow {
                actor_type: r.get(0),
                actor_key: r.get(1),
                fire_at: r.get(2),
                retry_count: r.get::<i32, _>(3) as u32,
                generation: r.get(4),
            })
            .collect())
    }

    async fn alarm_extend(&self, row: &AlarmRow, node: &str, lease_until: UnixMs) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE alarms SET claimed_until = $5
             WHERE actor_type = $1 AND actor_key = $2 AND generation = $3 AND claimed_by = $4",
        )
        .bind(&row.actor_type)
        .bind(&row.actor_key)
        .bind(row.generation)
        .bind(node)
        .bind(lease_until)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn alarm_failed(
        &self,
        row: &AlarmRow,
        retry_at: Option<UnixMs>,
        counted: bool,
    ) -> Result<()> {
        let q = match retry_at {
            Some(at) => sqlx::query(
                "UPDATE alarms SET fire_at = $4, retry_count = retry_count + $5,
                   claimed_by = NULL, claimed_until = NULL
                 WHERE actor_type = $1 AND actor_key = $2 AND generation = $3",
            )
            .bind(&row.actor_type)
            .bind(&row.actor_key)
            .bind(row.generation)
            .bind(at)
            .bind(i32::from(counted)),
            None => sqlx::query(
                "DELETE FROM alarms WHERE actor_type = $1 AND actor_key = $2 AND generation = $3",
            )
            .bind(&row.actor_type)
            .bind(&row.actor_key)
            .bind(row.generation),
        };
        q.execute(&self.pool).await?;
        Ok(())
    }

    async fn alarm_unclaim(&self, row: &AlarmRow) -> Result<()> {
        sqlx::query(
            "UPDATE alarms SET claimed_by = NULL, claimed_until = NULL
             WHERE actor_type = $1 AND actor_key = $2 AND generation = $3",
        )
        .bind(&row.actor_type)
        .bind(&row.actor_key)
        .bind(row.generation)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn queue_send(
        &self,
        queue: &str,
        bodies: Vec<Vec<u8>>,
        now: UnixMs,
        visible_at: UnixMs,
    ) -> Result<Vec<i64>> {
        let ids = sqlx::query_scalar(
            "INSERT INTO queue_messages (queue, body, enqueued_at, visible_at)
             SELECT $1, b, $3, $4 FROM UNNEST($2::bytea[]) WITH ORDINALITY AS u(b, n) ORDER BY n
             RETURNING id",
        )
        .bind(queue)
        .bind(&bodies)
        .bind(now)
        .bind(visible_at)
        .fetch_all(&self.pool)
        .await?;
        if visible_at <= now {
            let _ = self.notify.send(Signal::Queue(queue.to_owned()));
        }
        Ok(ids)
    }

    async fn queue_claim(&self, req: ClaimRequest<'_>) -> Result<Vec<ClaimedMessage>> {
        // One LIMITed scan of the ready index (rows locked, others' locked rows skipped), then
        // the shared rule decides per message; dead-lettering and claiming commit together.
        let mut tx = self.pool.begin().await?;
        let candidates: Vec<ClaimCandidate> = sqlx::query(
            "SELECT id, claimed_by IS NOT NULL, attempts, failures, last_error FROM queue_messages
             WHERE queue = $1 AND visible_at <= $2
             ORDER BY visible_at, id LIMIT $3 FOR UPDATE SKIP LOCKED",
        )
        .bind(req.queue)
        .bind(req.now)
        .bind(i64::from(req.limit))
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| ClaimCandidate {
            id: r.get(0),
            timed_out: r.get(1),
            attempts: r.get::<i32, _>(2) as u32,
            failures: r.get::<i32, _>(3) as u32,
            last_error: r.get(4),
        })
        .collect();
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let (mut dead_ids, mut dead_errors) = (Vec::new(), Vec::new());
        let (mut ids, mut failures, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        for cand in &candidates {
            match claim_decision(cand, req.max_attempts, req.max_deliveries) {
                ClaimDecision::DeadLetter(error) => {
                    dead_ids.push(cand.id);
                    dead_errors.push(error);
                }
                ClaimDecision::Deliver {
                    failures: f,
                    last_error,
                } => {
                    ids.push(cand.id);
                    failures.push(f as i32);
                    errors.push(last_error);
                }
            }
        }
        if !dead_ids.is_empty() {
            sqlx::query(
                "WITH m AS (DELETE FROM queue_messages q USING UNNEST($1::bigint[], $2::text[]) AS u(id, e)
                            WHERE q.id = u.id
                            RETURNING q.queue, q.id, q.body, q.attempts, u.e, q.enqueued_at)
                 INSERT INTO dead_letters (queue, message_id, body, attempts, last_error, enqueued_at, failed_at)
                 SELECT queue, id, body, attempts, e, enqueued_at, $3 FROM m ORDER BY id",
            )
            .bind(&dead_ids)
            .bind(&dead_errors)
            .bind(req.now)
            .execute(&mut *tx)
            .await?;
        }
        let rows = if ids.is_empty() {
            Vec::new()
        } else {
            sqlx::query(
                "UPDATE queue_messages m SET attempts = m.attempts + 1, failures = u.f,
                   last_error = u.e, visible_at = $4, claimed_by = $5
                 FROM UNNEST($1::bigint[], $2::int[], $3::text[]) AS u(id, f, e)
                 WHERE m.id = u.id
                 RETURNING m.id, m.body, m.attempts, m.enqueued_at",
            )
            .bind(&ids)
            .bind(&failures)
            .bind(&errors)
            .bind(req.now + req.visibility_timeout_ms)
            .bind(req.node)
            .fetch_all(&mut *tx)
            .await?
        };
        tx.commit().await?;
        let mut out: Vec<ClaimedMessage> = rows
            .into_iter()
            .map(|r| ClaimedMessage {
                id: r.get(0),
                body: r.get(1),
                attempts: r.get::<i32, _>(2) as u32,
                enqueued_at: r.get(3),
            })
            .collect();
        out.sort_by_key(|m| m.id);
        Ok(out)
    }

    async fn queue_extend(
        &self,
        queue: &str,
        id: i64,
        attempts: u32,
        node: &str,
        visible_at: UnixMs,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE queue_messages SET visible_at = $5
             WHERE id = $1 AND queue = $2 AND attempts = $3 AND claimed_by = $4",
        )
        .bind(id)
        .bind(queue)
        .bind(attempts as i32)
        .bind(node)
        .bind(visible_at)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn dlq_delete(&self, queue: &str, ids: Option<&[i64]>) -> Result<u64> {
        let r = sqlx::query(
            "DELETE FROM dead_letters WHERE queue = $1 AND ($2::bigint[] IS NULL OR id = ANY($2))",
        )
        .bind(queue)
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    async fn queue_exists(&self, queue: &str) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM queue_messages WHERE queue = $1)
                 OR EXISTS (SELECT 1 FROM dead_letters WHERE queue = $1)",
        )
        .bind(queue)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn queue_ack(&self, queue: &str, id: i64, attempts: u32) -> Result<bool> {
        let done = sqlx::query(
            "DELETE FROM queue_messages WHERE id = $1 AND queue = $2 AND attempts = $3",
        )
        .bind(id)
        .bind(queue)
        .bind(attempts as i32)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn queue_retry(&self, req: RetryRequest<'_>) -> Result<RetryOutcome> {
        let RetryRequest {
            queue,
            id,
            attempts,
            visible_at,
            error,
            max_attempts,
            now,
        } = req;
        let mut tx = self.pool.begin().await?;
        let current: Option<(i32, i32)> = sqlx::query_as(
            "SELECT attempts, failures FROM queue_messages WHERE id = $1 AND queue = $2 FOR UPDATE",
        )
        .bind(id)
        .bind(queue)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((current, failures)) = current else {
            return Ok(RetryOutcome::Stale);
        };
        if current != attempts as i32 {
            return Ok(RetryOutcome::Stale);
        }
        let outcome = if failures as u32 + 1 >= max_attempts {
            move_to_dlq(&mut tx, id, error, now).await?;
            RetryOutcome::DeadLettered
        } else {
            sqlx::query(
                "UPDATE queue_messages SET visible_at = $2, last_error = $3, claimed_by = NULL,
                   failures = failures + 1 WHERE id = $1",
            )
            .bind(id)
            .bind(visible_at)
            .bind(error)
            .execute(&mut *tx)
            .await?;
            RetryOutcome::Requeued
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn dlq_list(&self, queue: &str, after: i64, limit: u32) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT id, queue, message_id, body, attempts, last_error, enqueued_at, failed_at
             FROM dead_letters WHERE queue = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(queue)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(dead_letter).collect())
    }

    async fn dlq_replay(&self, queue: &str, ids: Option<&[i64]>, now: UnixMs) -> Result<u64> {
        let moved = sqlx::query(
            "WITH moved AS (
                DELETE FROM dead_letters WHERE queue = $1 AND ($2::bigint[] IS NULL OR id = ANY($2))
                RETURNING id, queue, body, enqueued_at)
             INSERT INTO queue_messages (queue, body, enqueued_at, visible_at)
             SELECT queue, body, enqueued_at, $3 FROM moved ORDER BY id",
        )
        .bind(queue)
        .bind(ids)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if moved.rows_affected() > 0 {
            let _ = self.notify.send(Signal::Queue(queue.to_owned()));
        }
        Ok(moved.rows_affected())
    }

    async fn queue_stats(&self, now: UnixMs) -> Result<Vec<QueueStats>> {
        let rows = sqlx::query(
            "SELECT queue,
                COUNT(*) FILTER (WHERE visible_at <= $1),
                COUNT(*) FILTER (WHERE visible_at > $1 AND claimed_by IS NULL),
                COUNT(*) FILTER (WHERE visible_at > $1 AND claimed_by IS NOT NULL),
                COALESCE($1 - MIN(visible_at) FILTER (WHERE visible_at <= $1), 0)::BIGINT
             FROM queue_messages GROUP BY queue",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let messages = rows
            .into_iter()
            .map(|r| QueueStats {
                queue: r.get(0),
                ready: r.get::<i64, _>(1) as u64,
                delayed: r.get::<i64, _>(2) as u64,
                in_flight: r.get::<i64, _>(3) as u64,
                dead: 0,
                oldest_ready_age_ms: r.get(4),
            })
            .collect();
        let dead = sqlx::query("SELECT queue, COUNT(*) FROM dead_letters GROUP BY queue")
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1) as u64));
        Ok(super::merge_queue_stats(messages, dead))
    }

    async fn actor_read(
        &self,
        actor_type: &str,
        key: &str,
        storage_key: &str,
    ) -> Result<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar(
            "SELECT value FROM actor_storage WHERE actor_type = $1 AND actor_key = $2 AND key = $3",
        )
        .bind(actor_type)
        .bind(key)
        .bind(storage_key)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn actor_scan(
        &self,
        actor_type: &str,
        key: &str,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(sqlx::query_as(
            "SELECT key, value FROM actor_storage WHERE actor_type = $1 AND actor_key = $2
             AND key > $3 AND left(key, length($4)) = $4 ORDER BY key LIMIT $5",
        )
        .bind(actor_type)
        .bind(key)
        .bind(after.max(prefix))
        .bind(prefix)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn actor_keys(&self, actor_type: &str, after: &str, limit: u32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT actor_key FROM actor_storage WHERE actor_type = $1 AND actor_key > $2
             ORDER BY actor_key LIMIT $3",
        )
        .bind(actor_type)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn kv_get(&self, key: &str, now: UnixMs) -> Result<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar(
            "SELECT value FROM kv WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(key)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn kv_put(&self, key: &str, value: Vec<u8>, expires_at: Option<UnixMs>) -> Result<()> {
        sqlx::query(
            "INSERT INTO kv (key, value, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(value)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn kv_delete(&self, key: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM kv WHERE key = $1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn kv_list(&self, prefix: &str, now: UnixMs, limit: u32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT key FROM kv WHERE starts_with(key, $1) AND (expires_at IS NULL OR expires_at > $2)
             ORDER BY key COLLATE \"C\" LIMIT $3",
        )
        .bind(prefix)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn kv_sweep(&self, now: UnixMs) -> Result<u64> {
        let r = sqlx::query("DELETE FROM kv WHERE expires_at IS NOT NULL AND expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn node_heartbeat(&self, node: &str, now: UnixMs) -> Result<Option<UnixMs>> {
        let db_now: i64 = sqlx::query_scalar(
            "INSERT INTO nodes (node_id, started_at, heartbeat_at) VALUES ($1, $2, $2)
             ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at
             RETURNING (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT",
        )
        .bind(node)
        .bind(now)
        .fetch_one(&self.control)
        .await?;
        Ok(Some(db_now))
    }

    async fn release_dead_nodes(
        &self,
        self_node: &str,
        dead_before: UnixMs,
        now: UnixMs,
    ) -> Result<Released> {
        let dead: Vec<String> = sqlx::query_scalar(
            "SELECT node_id FROM nodes WHERE heartbeat_at < $1 AND node_id <> $2
             UNION
             SELECT claimed_by FROM queue_messages WHERE claimed_by IS NOT NULL
               AND claimed_by <> $2 AND claimed_by NOT IN (SELECT node_id FROM nodes)
             UNION
             SELECT claimed_by FROM alarms WHERE claimed_by IS NOT NULL
               AND claimed_by <> $2 AND claimed_by NOT IN (SELECT node_id FROM nodes)",
        )
        .bind(dead_before)
        .bind(self_node)
        .fetch_all(&self.control)
        .await?;
        let mut released = Released::default();
        for node in dead {
            tracing::warn!(node = %node, "node missed its heartbeats; taking over its claims");
            let r = self.release_claims(&node, now, Some(dead_before)).await?;
            released.messages += r.messages;
            released.alarms += r.alarms;
        }
        Ok(released)
    }

    async fn node_leave(&self, node: &str, now: UnixMs) -> Result<Released> {
        self.release_claims(node, now, None).await
    }
}

impl PostgresBackend {
    /// Releases `node`'s claims and forgets it, in one transaction. With `dead_before`, first
    /// re-checks under a row lock that the node is still silent (or unregistered), so a node
    /// that heartbeated since the caller looked keeps its work.
    async fn release_claims(
        &self,
        node: &str,
        now: UnixMs,
        dead_before: Option<UnixMs>,
    ) -> Result<Released> {
        let mut tx = self.control.begin().await?;
        if let Some(dead_before) = dead_before {
            let heartbeat: Option<i64> =
                sqlx::query_scalar("SELECT heartbeat_at FROM nodes WHERE node_id = $1 FOR UPDATE")
                    .bind(node)
                    .fetch_optional(&mut *tx)
                    .await?;
            if heartbeat.is_some_and(|at| at >= dead_before) {
                return Ok(Released::default());
            }
        }
        let messages = sqlx::query(
            "UPDATE queue_messages SET claimed_by = NULL, visible_at = LEAST(visible_at, $2)
             WHERE claimed_by = $1",
        )
        .bind(node)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let alarms = sqlx::query(
            "UPDATE alarms SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by = $1",
        )
        .bind(node)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM nodes WHERE node_id = $1")
            .bind(node)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if dead_before.is_some() {
            self.terminate_sessions(node).await;
        }
        Ok(Released { messages, alarms })
    }

    /// Terminates the database sessions of a node declared dead, which frees the advisory
    /// locks of the actor calls it was running: a hung or partitioned node cannot hold keys
    /// until its TCP connections time out, and cannot commit anything after its takeover (its
    /// commits fail on the closed connection). Needs the same role or `pg_signal_backend`;
    /// without it the locks go when the server's keepalives give up on the node.
    async fn terminate_sessions(&self, node: &str) {
        let terminated = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
        )
        .bind(application_name(node))
        .fetch_one(&self.control)
        .await;
        match terminated {
            Ok(n) => tracing::warn!(node, sessions = n, "terminated the dead node's sessions"),
            Err(e) => tracing::warn!(node, error = %e,
                "cannot terminate the dead node's sessions; its locks are freed when its \
                 connections time out"),
        }
    }
}

async fn move_to_dlq(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    id: i64,
    error: &str,
    now: UnixMs,
) -> Result<()> {
    sqlx::query(
        "WITH m AS (DELETE FROM queue_messages WHERE id = $1
                    RETURNING queue, id, body, attempts, enqueued_at)
         INSERT INTO dead_letters (queue, message_id, body, attempts, last_error, enqueued_at, failed_at)
         SELECT queue, id, body, attempts, $2, enqueued_at, $3 FROM m",
    )
    .bind(id)
    .bind(error)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
