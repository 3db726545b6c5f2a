//! SQLite backend: the embedded single-node default.
//!
//! One OS thread owns the only write connection and applies writes with **group commit**: it takes
//! every job waiting in its channel (up to [`MAX_BATCH`]), runs each inside its own savepoint so one
//! failing job cannot affect another, commits once, and only then answers the callers. A caller is
//! told "done" only after its write is in the WAL. Reads run on a small pool of read-only
//! connections; in WAL mode they never wait for the writer.
//!
//! Single-node only: the data directory lock (see [`crate::Substrate::open`]) keeps a second
//! server off the same file, so process-local actor serialization is enough.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::{
    ActorSession, ActorSnapshot, AlarmCompletion, AlarmRow, AlarmSnapshot, Backend, BackendKind,
    ClaimCandidate, ClaimDecision, ClaimRequest, ClaimedMessage, DeadLetter, QueueStats, Released,
    RetryOutcome, RetryRequest, Signal, WriteSet, claim_decision, migrations,
};
use crate::clock::UnixMs;
use crate::error::{Error, Result};

/// Most jobs committed in one transaction.
pub const MAX_BATCH: usize = 512;
const READERS: usize = 4;

type Completer = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A write job. Given the writer it runs (in a savepoint) and returns what to do once the batch
/// committed or failed; given `None` it is failed without running.
type Job = Box<dyn FnOnce(Option<&Writer>) -> Completer + Send>;

/// The write connection, owned by the writer thread.
struct Writer {
    conn: Connection,
    /// Set when a savepoint could not be rolled back or released: the transaction can no longer
    /// be trusted and the batch must be rolled back whole.
    poisoned: std::cell::Cell<bool>,
}

/// `PRAGMA synchronous` setting for the write connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Durable across process crashes (the WAL is written before a commit returns); the last
    /// commits can be lost on power failure. SQLite's recommended setting for WAL.
    #[default]
    Normal,
    /// Also durable across power failure: every commit fsyncs the WAL.
    Full,
}

/// The SQLite backend. Cheap to clone: every clone shares the writer thread and readers.
#[derive(Clone)]
pub struct SqliteBackend {
    inner: Arc<Inner>,
}

struct Inner {
    writer: mpsc::Sender<Job>,
    readers: Vec<Mutex<Connection>>,
    /// Scans (stats, listings, snapshots) use their own connection on the blocking pool, so
    /// they can never take the readers the hot path needs.
    scan: Mutex<Connection>,
    next_reader: AtomicUsize,
}

/// Creates the database file with mode 0600 when it does not exist, and takes group and
/// other access away from an existing one and its `-wal` and `-shm` files (SQLite creates
/// those with the database file's mode).
fn restrict_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let storage = |e: std::io::Error| Error::Storage(format!("{}: {e}", path.display()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(storage(e)),
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let file = std::path::PathBuf::from(name);
        match std::fs::metadata(&file) {
            Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                let mode = meta.permissions().mode() & 0o700;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))
                    .map_err(storage)?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(storage(e)),
        }
    }
    Ok(())
}

fn open_conn(path: &Path, read_only: bool, sync: Synchronous) -> Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match sync {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
    }
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl SqliteBackend {
    /// Opens (creating if needed) the database at `path`, applies migrations, and starts the
    /// writer thread.
    ///
    /// Errors: [`Error::SchemaTooNew`] when the file was written by a newer binary;
    /// [`Error::Storage`] when it cannot be opened.
    pub fn open(path: &Path, sync: Synchronous) -> Result<Self> {
        restrict_mode(path)?;
        let mut conn = open_conn(path, false, sync)?;
        migrate(&mut conn)?;
        let readers = (0..READERS)
            .map(|_| open_conn(path, true, sync).map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;
        let scan = Mutex::new(open_conn(path, true, sync)?);
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("kilocloud-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| Error::Storage(format!("cannot start sqlite writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer: tx,
                readers,
                scan,
                next_reader: AtomicUsize::new(0),
            }),
        })
    }

    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        self.inner.write(f).await
    }

    fn read<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        self.inner.read(f)
    }

    /// Runs a read that may scan many rows (stats, listings) on the blocking thread pool, so
    /// it cannot stall the async workers.
    async fn read_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner
                .scan
                .lock()
                .map_err(|_| Error::Storage("sqlite scan connection poisoned".into()))?;
            f(&conn)
        })
        .await
        .map_err(|e| Error::Storage(format!("sqlite read task: {e}")))?
    }
}

impl Inner {
    /// Runs `f` in the writer thread inside the next group commit; resolves after the commit.
    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |writer: Option<&Writer>| -> Completer {
            let res = match writer {
                Some(w) => in_savepoint(w, f),
                None => Err(Error::Storage("not run: its batch failed".into())),
            };
            Box::new(move |commit: Result<(), String>| {
                let out = match commit {
                    Ok(()) => res,
                    Err(e) => Err(Error::Storage(format!("sqlite commit failed: {e}"))),
                };
                let _ = tx.send(out);
            })
        });
        self.writer
            .send(job)
            .map_err(|_| Error::Storage("sqlite writer thread has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Storage("sqlite writer thread has stopped".into()))?
    }

    /// Runs a read on one of the read-only connections. Reads are point or prefix queries that
    /// take microseconds, so they run on the calling task.
    fn read<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        for _ in 0..self.readers.len() {
            let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
            if let Ok(conn) = self.readers[i].try_lock() {
                return f(&conn);
            }
        }
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        let conn = self.readers[i]
            .lock()
            .map_err(|_| Error::Storage("sqlite reader poisoned".into()))?;
        f(&conn)
    }
}

fn in_savepoint<R>(w: &Writer, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
    let conn = &w.conn;
    if let Err(e) = conn
        .prepare_cached("SAVEPOINT job")
        .and_then(|mut s| s.execute([]))
    {
        w.poisoned.set(true);
        return Err(e.into());
    }
    // A panicking job must not take the writer thread (and every later write) down with it.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(conn)))
        .unwrap_or_else(|_| {
            Err(Error::Storage(
                "a write job panicked; it was rolled back".into(),
            ))
        });
    let end = if outcome.is_ok() {
        conn.prepare_cached("RELEASE job")
            .and_then(|mut s| s.execute([]))
    } else {
        conn.prepare_cached("ROLLBACK TO job")
            .and_then(|mut s| s.execute([]))
            .and_then(|_| conn.prepare_cached("RELEASE job")?.execute([]))
    };
    if let Err(e) = end {
        w.poisoned.set(true);
        return Err(e.into());
    }
    outcome
}

fn writer_loop(conn: Connection, rx: mpsc::Receiver<Job>) {
    let writer = Writer {
        conn,
        poisoned: std::cell::Cell::new(false),
    };
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        metrics::histogram!("kilocloud_sqlite_group_commit_jobs").record(batch.len() as f64);
        let (completers, result) = run_batch(&writer, batch);
        if let Err(e) = &result {
            tracing::error!(error = %e, jobs = completers.len(), "sqlite batch failed; nothing in it was committed");
        }
        for completer in completers {
            completer(result.clone());
        }
    }
}

/// Runs a batch in one transaction. Either every job that succeeded is committed, or nothing
/// is and every job is told so: a job whose savepoint could not be cleaned up, or a statement
/// error that made SQLite roll the transaction back, fails the whole batch and the jobs after
/// it are not run (they would otherwise run outside any transaction).
fn run_batch(w: &Writer, batch: Vec<Job>) -> (Vec<Completer>, Result<(), String>) {
    let conn = &w.conn;
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        return (
            batch.into_iter().map(|job| job(None)).collect(),
            Err(e.to_string()),
        );
    }
    let mut broken: Option<String> = None;
    let mut completers = Vec::with_capacity(batch.len());
    for job in batch {
        if broken.is_some() {
            completers.push(job(None));
            continue;
        }
        completers.push(job(Some(w)));
        if w.poisoned.get() || conn.is_autocommit() {
            broken = Some("the transaction was aborted by a failing write".into());
        }
    }
    let result = match broken {
        Some(reason) => Err(reason),
        None => conn.execute_batch("COMMIT").map_err(|e| e.to_string()),
    };
    if !conn.is_autocommit() {
        // Whatever went wrong, leave the connection outside any transaction for the next batch.
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "sqlite writer cannot roll back");
        }
    }
    w.poisoned.set(false);
    (completers, result)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS kilocloud_schema (
            version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    )?;
    let current = schema_version(conn)?;
    migrations::check_not_newer(current)?;
    for m in migrations::MIGRATIONS
        .iter()
        .filter(|m| m.version > current)
    {
        let tx = conn.transaction()?;
        tx.execute_batch(m.sqlite)?;
        tx.execute(
            "INSERT INTO kilocloud_schema (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![
                m.version,
                m.name,
                crate::clock::Clock::now_ms(&crate::SystemClock)
            ],
        )?;
        tx.commit()?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "applied sqlite migration"
        );
    }
    Ok(())
}

fn schema_version(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM kilocloud_schema",
        [],
        |r| r.get(0),
    )?)
}

fn read_alarm(conn: &Connection, t: &str, k: &str) -> Result<Option<(UnixMs, i64)>> {
    Ok(conn
        .prepare_cached(
            "SELECT fire_at, generation FROM alarms WHERE actor_type = ?1 AND actor_key = ?2",
        )?
        .query_row(params![t, k], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// Applies a call's write set; shared by commit. Runs inside the writer's transaction.
fn apply_writes(
    conn: &Connection,
    t: &str,
    k: &str,
    writes: &WriteSet,
    completion: Option<AlarmCompletion>,
) -> Result<()> {
    if let Some(c) = completion {
        conn.prepare_cached(
            "DELETE FROM alarms WHERE actor_type = ?1 AND actor_key = ?2 AND generation = ?3",
        )?
        .execute(params![t, k, c.generation])?;
    }
    if writes.cleared {
        conn.prepare_cached("DELETE FROM actor_storage WHERE actor_type = ?1 AND actor_key = ?2")?
            .execute(params![t, k])?;
        conn.prepare_cached("DELETE FROM alarms WHERE actor_type = ?1 AND actor_key = ?2")?
            .execute(params![t, k])?;
    }
    for (key, value) in &writes.entries {
        match value {
            Some(v) => conn
                .prepare_cached(
                    "INSERT INTO actor_storage (actor_type, actor_key, key, value) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (actor_type, actor_key, key) DO UPDATE SET value = excluded.value",
                )?
                .execute(params![t, k, key, v])?,
            None => conn
                .prepare_cached(
                    "DELETE FROM actor_storage WHERE actor_type = ?1 AND actor_key = ?2 AND key = ?3",
                )?
                .execute(params![t, k, key])?,
        };
    }
    match writes.alarm {
        Some(Some(at)) => {
            conn.prepare_cached(
                "INSERT INTO alarms (actor_type, actor_key, fire_at, retry_count, generation, claimed_by)
                 VALUES (?1, ?2, ?3, 0, ?4, NULL)
                 ON CONFLICT (actor_type, actor_key) DO UPDATE SET fire_at = excluded.fire_at,
                   retry_count = 0, generation = excluded.generation, claimed_by = NULL",
            )?
            .execute(params![t, k, at, rand::random::<i64>()])?;
        }
        Some(None) => {
            conn.prepare_cached("DELETE FROM alarms WHERE actor_type = ?1 AND actor_key = ?2")?
                .execute(params![t, k])?;
        }
        None => {}
    }
    Ok(())
}

struct SqliteSession {
    backend: Arc<Inner>,
    actor_type: String,
    key: String,
}

#[async_trait]
impl ActorSession for SqliteSession {
    async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        self.backend.read(|c| {
            Ok(c.prepare_cached(
                "SELECT value FROM actor_storage WHERE actor_type = ?1 AND actor_key = ?2 AND key = ?3",
            )?
            .query_row(params![self.actor_type, self.key, key], |r| r.get(0))
            .optional()?)
        })
    }

    async fn list(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.backend
            .read(|c| list_storage(c, &self.actor_type, &self.key, prefix))
    }

    async fn list_page(
        &mut self,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        self.backend.read(|c| {
            list_storage_page(
                c,
                &self.actor_type,
                &self.key,
                prefix,
                after,
                i64::from(limit),
            )
        })
    }

    async fn alarm(&mut self) -> Result<Option<(UnixMs, i64)>> {
        self.backend
            .read(|c| read_alarm(c, &self.actor_type, &self.key))
    }

    async fn flush(&mut self, writes: WriteSet) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let (t, k) = (self.actor_type.clone(), self.key.clone());
        self.backend
            .write(move |c| apply_writes(c, &t, &k, &writes, None))
            .await
    }

    async fn commit(
        self: Box<Self>,
        writes: WriteSet,
        completion: Option<AlarmCompletion>,
    ) -> Result<()> {
        if writes.is_empty() && completion.is_none() {
            return Ok(());
        }
        let (t, k) = (self.actor_type, self.key);
        self.backend
            .write(move |c| apply_writes(c, &t, &k, &writes, completion))
            .await
    }

    async fn release(self: Box<Self>) {}
}

fn list_storage(c: &Connection, t: &str, k: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
    // SQLite reads `LIMIT -1` as no limit.
    list_storage_page(c, t, k, prefix, "", -1)
}

/// At most `limit` entries (−1: all) of one actor whose key starts with `prefix` and sorts
/// after `after`, in key order.
fn list_storage_page(
    c: &Connection,
    t: &str,
    k: &str,
    prefix: &str,
    after: &str,
    limit: i64,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut stmt = c.prepare_cached(
        "SELECT key, value FROM actor_storage WHERE actor_type = ?1 AND actor_key = ?2
         AND key >= ?3 AND key > ?4 ORDER BY key LIMIT ?5",
    )?;
    let rows = stmt.query_map(params![t, k, prefix, after, limit], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (key, value): (String, Vec<u8>) = row?;
        if !key.starts_with(prefix) {
            break;
        }
        out.push((key, value));
    }
    Ok(out)
}

fn move_to_dlq(c: &Connection, id: i64, error: &str, now: UnixMs) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO dead_letters (queue, message_id, body, attempts, last_error, enqueued_at, failed_at)
         SELECT queue, id, body, attempts, ?2, enqueued_at, ?3 FROM queue_messages WHERE id = ?1",
    )?
    .execute(params![id, error, now])?;
    c.prepare_cached("DELETE FROM queue_messages WHERE id = ?1")?
        .execute(params![id])?;
    Ok(())
}

#[async_trait]
impl Backend for SqliteBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Sqlite
    }

    async fn forward_signals(&self, _tx: tokio::sync::mpsc::Sender<Signal>) -> Result<()> {
        Ok(())
    }

    async fn schema_version(&self) -> Result<i64> {
        self.read(schema_version)
    }

    async fn ping(&self) -> Result<()> {
        self.read(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
    }

    async fn actor_session(
        &self,
        actor_type: &str,
        key: &str,
        // One node: the local lock is the only lock, and a suspended call keeps it.
        _suspensions: Option<&dyn crate::Clock>,
    ) -> Result<Box<dyn ActorSession>> {
        Ok(Box::new(SqliteSession {
            backend: self.inner.clone(),
            actor_type: actor_type.to_owned(),
            key: key.to_owned(),
        }))
    }

    async fn actor_snapshot(&self, actor_type: &str, key: &str) -> Result<ActorSnapshot> {
        let (actor_type, key) = (actor_type.to_owned(), key.to_owned());
        self.read_blocking(move |c| {
            let (actor_type, key) = (actor_type.as_str(), key.as_str());
            let storage = list_storage(c, actor_type, key, "")?
                .into_iter()
                .map(|(k, v)| (k, super::json_or_bytes(&v)))
                .collect();
            let alarm = c
                .prepare_cached(
                    "SELECT fire_at, retry_count, claimed_by FROM alarms
                     WHERE actor_type = ?1 AND actor_key = ?2",
                )?
                .query_row(params![actor_type, key], |r| {
                    Ok(AlarmSnapshot {
                        fire_at: r.get(0)?,
                        retry_count: r.get(1)?,
                        claimed_by: r.get(2)?,
                    })
                })
                .optional()?;
            Ok(ActorSnapshot {
                actor_type: actor_type.to_owned(),
                key: key.to_owned(),
                storage,
                alarm,
            })
        })
        .await
    }

    async fn next_alarm_at(&self, types: &[&str]) -> Result<Option<UnixMs>> {
        let types = serde_json::to_string(types)?;
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT MIN(t) FROM (
                    SELECT MIN(fire_at) AS t FROM alarms WHERE claimed_by IS NULL
                      AND actor_type IN (SELECT value FROM json_each(?1))
                    UNION ALL
                    SELECT MIN(MAX(fire_at, claimed_until)) FROM alarms WHERE claimed_by IS NOT NULL
                      AND actor_type IN (SELECT value FROM json_each(?1)))",
            )?
            .query_row(params![types], |r| r.get(0))?)
        })
    }

    async fn claim_due_alarms(
        &self,
        node: &str,
        now: UnixMs,
        lease_until: UnixMs,
        limit: u32,
        types: &[&str],
    ) -> Result<Vec<AlarmRow>> {
        let node = node.to_owned();
        let types = serde_json::to_string(types)?;
        self.write(move |c| {
            let mut stmt = c.prepare_cached(
                "UPDATE alarms SET claimed_by = ?1, claimed_until = ?5
                 WHERE (actor_type, actor_key) IN (
                    SELECT actor_type, actor_key FROM (
                        SELECT actor_type, actor_key, fire_at FROM alarms
                        WHERE claimed_by IS NULL AND fire_at <= ?2
                        UNION ALL
                        SELECT actor_type, actor_key, fire_at FROM alarms
                        WHERE claimed_by IS NOT NULL AND claimed_until <= ?2 AND fire_at <= ?2)
                    WHERE actor_type IN (SELECT value FROM json_each(?4))
                    ORDER BY fire_at LIMIT ?3)
                 RETURNING actor_type, actor_key, fire_at, retry_count, generation",
            )?;
            let rows = stmt.query_map(params![node, now, limit, types, lease_until], |r| {
                Ok(AlarmRow {
                    actor_type: r.get(0)?,
                    actor_key: r.get(1)?,
                    fire_at: r.get(2)?,
                    retry_count: r.get(3)?,
                    generation: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn alarm_extend(&self, row: &AlarmRow, node: &str, lease_until: UnixMs) -> Result<bool> {
        let (row, node) = (row.clone(), node.to_owned());
        self.write(move |c| {
            Ok(c.prepare_cached(
                "UPDATE alarms SET claimed_until = ?5
                 WHERE actor_type = ?1 AND actor_key = ?2 AND generation = ?3 AND claimed_by = ?4",
            )?
            .execute(params![
                row.actor_type,
                row.actor_key,
                row.generation,
                node,
                lease_until
            ])? == 1)
        })
        .await
    }

    async fn alarm_failed(
        &self,
        row: &AlarmRow,
        retry_at: Option<UnixMs>,
        counted: bool,
    ) -> Result<()> {
        let row = row.clone();
        self.write(move |c| {
            match retry_at {
                Some(at) => c
                    .prepare_cached(
                        "UPDATE alarms SET fire_at = ?4, retry_count = retry_count + ?5,
                           claimed_by = NULL, claimed_until = NULL
                         WHERE actor_type = ?1 AND actor_key = ?2 AND generation = ?3",
                    )?
                    .execute(params![
                        row.actor_type,
                        row.actor_key,
                        row.generation,
                        at,
                        u32::from(counted)
                    ])?,
                None => c
                    .prepare_cached(
                        "DELETE FROM alarms WHERE actor_type = ?1 AND actor_key = ?2 AND generation = ?3",
                    )?
                    .execute(params![row.actor_type, row.actor_key, row.generation])?,
            };
            Ok(())
        })
        .await
    }

    async fn alarm_unclaim(&self, row: &AlarmRow) -> Result<()> {
        let row = row.clone();
        self.write(move |c| {
            c.prepare_cached(
                "UPDATE alarms SET claimed_by = NULL, claimed_until = NULL
                 WHERE actor_type = ?1 AND actor_key = ?2 AND generation = ?3",
            )?
            .execute(params![row.actor_type, row.actor_key, row.generation])?;
            Ok(())
        })
        .await
    }

    async fn queue_send(
        &self,
        queue: &str,
        bodies: Vec<Vec<u8>>,
        now: UnixMs,
        visible_at: UnixMs,
    ) -> Result<Vec<i64>> {
        let queue = queue.to_owned();
        self.write(move |c| {
            let mut stmt = c.prepare_cached(
                "INSERT INTO queue_messages (queue, body, enqueued_at, visible_at) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut ids = Vec::with_capacity(bodies.len());
            for body in bodies {
                stmt.execute(params![queue, body, now, visible_at])?;
                ids.push(c.last_insert_rowid());
            }
            Ok(ids)
        })
        .await
    }

    async fn queue_claim(&self, req: ClaimRequest<'_>) -> Result<Vec<ClaimedMessage>> {
        let (queue, node) = (req.queue.to_owned(), req.node.to_owned());
        let (now, limit, vt) = (req.now, req.limit, req.visibility_timeout_ms);
        let (max_attempts, max_deliveries) = (req.max_attempts, req.max_deliveries);
        self.write(move |c| {
            // One LIMITed scan of the ready index, whatever the backlog behind it.
            let candidates: Vec<ClaimCandidate> = c
                .prepare_cached(
                    "SELECT id, claimed_by IS NOT NULL, attempts, failures, last_error
                     FROM queue_messages WHERE queue = ?1 AND visible_at <= ?2
                     ORDER BY visible_at, id LIMIT ?3",
                )?
                .query_map(params![queue, now, limit], |r| {
                    Ok(ClaimCandidate {
                        id: r.get(0)?,
                        timed_out: r.get(1)?,
                        attempts: r.get(2)?,
                        failures: r.get(3)?,
                        last_error: r.get(4)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let mut out = Vec::with_capacity(candidates.len());
            for cand in candidates {
                match claim_decision(&cand, max_attempts, max_deliveries) {
                    ClaimDecision::DeadLetter(error) => move_to_dlq(c, cand.id, &error, now)?,
                    ClaimDecision::Deliver {
                        failures,
                        last_error,
                    } => out.push(
                        c.prepare_cached(
                            "UPDATE queue_messages SET attempts = attempts + 1, failures = ?2,
                               last_error = ?3, visible_at = ?4, claimed_by = ?5
                             WHERE id = ?1 RETURNING id, body, attempts, enqueued_at",
                        )?
                        .query_row(
                            params![cand.id, failures, last_error, now + vt, node],
                            |r| {
                                Ok(ClaimedMessage {
                                    id: r.get(0)?,
                                    body: r.get(1)?,
                                    attempts: r.get(2)?,
                                    enqueued_at: r.get(3)?,
                                })
                            },
                        )?,
                    ),
                }
            }
            out.sort_by_key(|m| m.id);
            Ok(out)
        })
        .await
    }

    async fn queue_ack(&self, queue: &str, id: i64, attempts: u32) -> Result<bool> {
        let queue = queue.to_owned();
        self.write(move |c| {
            Ok(c.prepare_cached(
                "DELETE FROM queue_messages WHERE id = ?1 AND queue = ?2 AND attempts = ?3",
            )?
            .execute(params![id, queue, attempts])?
                == 1)
        })
        .await
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
        let (queue, error) = (queue.to_owned(), error.to_owned());
        self.write(move |c| {
            let current: Option<(u32, u32)> = c
                .prepare_cached(
                    "SELECT attempts, failures FROM queue_messages WHERE id = ?1 AND queue = ?2",
                )?
                .query_row(params![id, queue], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((current, failures)) = current else {
                return Ok(RetryOutcome::Stale);
            };
            if current != attempts {
                return Ok(RetryOutcome::Stale);
            }
            if failures + 1 >= max_attempts {
                move_to_dlq(c, id, &error, now)?;
                return Ok(RetryOutcome::DeadLettered);
            }
            c.prepare_cached(
                "UPDATE queue_messages SET visible_at = ?2, last_error = ?3, claimed_by = NULL,
                   failures = failures + 1 WHERE id = ?1",
            )?
            .execute(params![id, visible_at, error])?;
            Ok(RetryOutcome::Requeued)
        })
        .await
    }

    async fn queue_extend(
        &self,
        queue: &str,
        id: i64,
        attempts: u32,
        node: &str,
        visible_at: UnixMs,
    ) -> Result<bool> {
        let (queue, node) = (queue.to_owned(), node.to_owned());
        self.write(move |c| {
            Ok(c.prepare_cached(
                "UPDATE queue_messages SET visible_at = ?5
                 WHERE id = ?1 AND queue = ?2 AND attempts = ?3 AND claimed_by = ?4",
            )?
            .execute(params![id, queue, attempts, node, visible_at])?
                == 1)
        })
        .await
    }

    async fn dlq_delete(&self, queue: &str, ids: Option<&[i64]>) -> Result<u64> {
        let queue = queue.to_owned();
        let ids = ids.map(serde_json::to_string).transpose()?;
        self.write(move |c| {
            Ok(c.prepare_cached(
                "DELETE FROM dead_letters WHERE queue = ?1
                 AND (?2 IS NULL OR id IN (SELECT value FROM json_each(?2)))",
            )?
            .execute(params![queue, ids])? as u64)
        })
        .await
    }

    async fn queue_exists(&self, queue: &str) -> Result<bool> {
        let queue = queue.to_owned();
        self.read_blocking(move |c| {
            Ok(c.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM queue_messages WHERE queue = ?1)
                     OR EXISTS (SELECT 1 FROM dead_letters WHERE queue = ?1)",
            )?
            .query_row(params![queue], |r| r.get(0))?)
        })
        .await
    }

    async fn dlq_list(&self, queue: &str, after: i64, limit: u32) -> Result<Vec<DeadLetter>> {
        let queue = queue.to_owned();
        self.read_blocking(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, queue, message_id, body, attempts, last_error, enqueued_at, failed_at
                 FROM dead_letters WHERE queue = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![queue, after, limit], |r| {
                let body: Vec<u8> = r.get(3)?;
                Ok(DeadLetter {
                    id: r.get(0)?,
                    queue: r.get(1)?,
                    message_id: r.get(2)?,
                    body: super::json_or_bytes(&body),
                    attempts: r.get(4)?,
                    last_error: r.get(5)?,
                    enqueued_at: r.get(6)?,
                    failed_at: r.get(7)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn dlq_replay(&self, queue: &str, ids: Option<&[i64]>, now: UnixMs) -> Result<u64> {
        let queue = queue.to_owned();
        let ids = ids.map(<[i64]>::to_vec);
        self.write(move |c| {
            let selected: Vec<i64> = match ids {
                Some(ids) => ids,
                None => c
                    .prepare_cached("SELECT id FROM dead_letters WHERE queue = ?1 ORDER BY id")?
                    .query_map(params![queue], |r| r.get(0))?
                    .collect::<Result<_, _>>()?,
            };
            let mut moved = 0;
            for id in selected {
                let n = c
                    .prepare_cached(
                        "INSERT INTO queue_messages (queue, body, enqueued_at, visible_at)
                         SELECT queue, body, enqueued_at, ?3 FROM dead_letters WHERE id = ?1 AND queue = ?2",
                    )?
                    .execute(params![id, queue, now])?;
                c.prepare_cached("DELETE FROM dead_letters WHERE id = ?1 AND queue = ?2")?
                    .execute(params![id, queue])?;
                moved += n as u64;
            }
            Ok(moved)
        })
        .await
    }

    async fn queue_stats(&self, now: UnixMs) -> Result<Vec<QueueStats>> {
        self.read_blocking(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT queue,
                    SUM(CASE WHEN visible_at <= ?1 THEN 1 ELSE 0 END),
                    SUM(CASE WHEN visible_at > ?1 AND claimed_by IS NULL THEN 1 ELSE 0 END),
                    SUM(CASE WHEN visible_at > ?1 AND claimed_by IS NOT NULL THEN 1 ELSE 0 END),
                    COALESCE(?1 - MIN(CASE WHEN visible_at <= ?1 THEN visible_at END), 0)
                 FROM queue_messages GROUP BY queue",
            )?;
            let messages = stmt
                .query_map(params![now], |r| {
                    Ok(QueueStats {
                        queue: r.get(0)?,
                        ready: r.get::<_, i64>(1)? as u64,
                        delayed: r.get::<_, i64>(2)? as u64,
                        in_flight: r.get::<_, i64>(3)? as u64,
                        dead: 0,
                        oldest_ready_age_ms: r.get(4)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let dead = c
                .prepare_cached("SELECT queue, COUNT(*) FROM dead_letters GROUP BY queue")?
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(super::merge_queue_stats(messages, dead))
        })
        .await
    }

    async fn actor_read(
        &self,
        actor_type: &str,
        key: &str,
        storage_key: &str,
    ) -> Result<Option<Vec<u8>>> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT value FROM actor_storage WHERE actor_type = ?1 AND actor_key = ?2 AND key = ?3",
            )?
            .query_row(params![actor_type, key, storage_key], |r| r.get(0))
            .optional()?)
        })
    }

    async fn actor_scan(
        &self,
        actor_type: &str,
        key: &str,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let (t, k, p, a) = (
            actor_type.to_owned(),
            key.to_owned(),
            prefix.to_owned(),
            after.max(prefix).to_owned(),
        );
        self.read_blocking(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT key, value FROM actor_storage WHERE actor_type = ?1 AND actor_key = ?2
                 AND key > ?3 AND substr(key, 1, length(?4)) = ?4 ORDER BY key LIMIT ?5",
            )?;
            let rows =
                stmt.query_map(params![t, k, a, p, limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn actor_keys(&self, actor_type: &str, after: &str, limit: u32) -> Result<Vec<String>> {
        let (actor_type, after) = (actor_type.to_owned(), after.to_owned());
        self.read_blocking(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT DISTINCT actor_key FROM actor_storage WHERE actor_type = ?1 AND actor_key > ?2
                 ORDER BY actor_key LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![actor_type, after, limit], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
        })
        .await
    }

    async fn kv_get(&self, key: &str, now: UnixMs) -> Result<Option<Vec<u8>>> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT value FROM kv WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
            )?
            .query_row(params![key, now], |r| r.get(0))
            .optional()?)
        })
    }

    async fn kv_put(&self, key: &str, value: Vec<u8>, expires_at: Option<UnixMs>) -> Result<()> {
        let key = key.to_owned();
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO kv (key, value, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
            )?
            .execute(params![key, value, expires_at])?;
            Ok(())
        })
        .await
    }

    async fn kv_delete(&self, key: &str) -> Result<bool> {
        let key = key.to_owned();
        self.write(move |c| {
            Ok(c.prepare_cached("DELETE FROM kv WHERE key = ?1")?
                .execute(params![key])?
                == 1)
        })
        .await
    }

    async fn kv_list(&self, prefix: &str, now: UnixMs, limit: u32) -> Result<Vec<String>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT key FROM kv WHERE key >= ?1 AND (expires_at IS NULL OR expires_at > ?2)
                 ORDER BY key LIMIT ?3",
            )?;
            let mut out = Vec::new();
            for key in stmt.query_map(params![prefix, now, limit], |r| r.get::<_, String>(0))? {
                let key = key?;
                if !key.starts_with(prefix) {
                    break;
                }
                out.push(key);
            }
            Ok(out)
        })
    }

    async fn kv_sweep(&self, now: UnixMs) -> Result<u64> {
        self.write(move |c| {
            Ok(
                c.prepare_cached(
                    "DELETE FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                )?
                .execute(params![now])? as u64,
            )
        })
        .await
    }

    async fn node_heartbeat(&self, node: &str, now: UnixMs) -> Result<Option<UnixMs>> {
        let node = node.to_owned();
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO nodes (node_id, started_at, heartbeat_at) VALUES (?1, ?2, ?2)
                 ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            )?
            .execute(params![node, now])?;
            // One machine: the database's clock is this clock.
            Ok(None)
        })
        .await
    }

    async fn release_dead_nodes(
        &self,
        self_node: &str,
        dead_before: UnixMs,
        now: UnixMs,
    ) -> Result<Released> {
        let self_node = self_node.to_owned();
        self.write(move |c| {
            let dead: Vec<String> = c
                .prepare_cached(
                    "SELECT node_id FROM nodes WHERE heartbeat_at < ?1 AND node_id <> ?2
                     UNION
                     SELECT claimed_by FROM queue_messages WHERE claimed_by IS NOT NULL
                       AND claimed_by <> ?2 AND claimed_by NOT IN (SELECT node_id FROM nodes)
                     UNION
                     SELECT claimed_by FROM alarms WHERE claimed_by IS NOT NULL
                       AND claimed_by <> ?2 AND claimed_by NOT IN (SELECT node_id FROM nodes)",
                )?
                .query_map(params![dead_before, self_node], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut released = Released::default();
            for node in dead {
                let r = release_node(c, &node, now)?;
                released.messages += r.messages;
                released.alarms += r.alarms;
            }
            Ok(released)
        })
        .await
    }

    async fn node_leave(&self, node: &str, now: UnixMs) -> Result<Released> {
        let node = node.to_owned();
        self.write(move |c| release_node(c, &node, now)).await
    }
}

fn release_node(c: &Connection, node: &str, now: UnixMs) -> Result<Released> {
    let messages = c
        .prepare_cached(
            "UPDATE queue_messages SET claimed_by = NULL, visible_at = MIN(visible_at, ?2)
             WHERE claimed_by = ?1",
        )?
        .execute(params![node, now])? as u64;
    let alarms = c
        .prepare_cached(
            "UPDATE alarms SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by = ?1",
        )?
        .execute(params![node])? as u64;
    c.prepare_cached("DELETE FROM nodes WHERE node_id = ?1")?
        .execute(params![node])?;
    Ok(Released { messages, alarms })
}
