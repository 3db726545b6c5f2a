//! Test support shared by every crate's tests.
//!
//! - [`postgres_url`]: the PostgreSQL server tests run against: `KILOCLOUD_TEST_DATABASE_URL`,
//!   default `postgres://postgres@127.0.0.1:5432/test`. `scripts/test` starts a throwaway cluster
//!   and sets the variable when no server answers there. Tests fail loudly, never skip, when it
//!   is unreachable.
//! - [`PgSchema`]: a fresh schema per test, dropped afterwards, so tests run in parallel on one
//!   database; [`PgDatabase`]: a fresh database, for tests that start server processes.
//! - [`temp_dir`]: a directory for SQLite files and blobs.
//! - [`TestStore`]: both together: a substrate on a fresh SQLite file or PostgreSQL schema.
//!
//! - [`fake_openai`], [`fake_anthropic`]: fake model providers with scripted replies.
//! - [`fake_github`]: the GitHub REST API of one GitHub App (JWT and installation-token
//!   authentication, pull requests, reviews, checks, labels, comments, refs) with fault
//!   injection; [`git_server`]: a real git smart-HTTP server.
//! - [`fake_flyio`]: the Fly Machines REST API (apps, secrets, machines, volumes) with fault
//!   injection.
//!
//! Fakes of external services live here; product code never depends on this crate.

pub mod fake_anthropic;
pub mod fake_flyio;
pub mod fake_github;
pub mod fake_openai;
pub mod git_server;

/// Instantiates each `async fn name(postgres: bool)` scenario as the tests `name::sqlite` and
/// `name::postgres`: one suite, every backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(false).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(true).await
            }
        }
    )*};
}

use std::sync::Arc;
use std::time::Duration;

use kilocloud_substrate::{BlobConfig, Clock, DatabaseConfig, Substrate, Synchronous, Tuning};
use sqlx::Connection;

/// One test's store: a temp directory (SQLite file, blobs) and, on PostgreSQL, a fresh schema;
/// both removed when this value is dropped. Keep it alive as long as the substrate.
pub struct TestStore {
    /// SQLite file and blobs.
    pub dir: tempfile::TempDir,
    /// The schema, on PostgreSQL.
    pub schema: Option<PgSchema>,
}

impl TestStore {
    /// A fresh store on PostgreSQL when `postgres`, else on SQLite.
    pub async fn new(postgres: bool) -> Self {
        let schema = if postgres {
            Some(PgSchema::create().await)
        } else {
            None
        };
        Self {
            dir: temp_dir(),
            schema,
        }
    }

    /// The database: `db` in the directory, or the schema with a pool of 8.
    pub fn database(&self) -> DatabaseConfig {
        match &self.schema {
            None => DatabaseConfig::Sqlite {
                path: self.dir.path().join("db"),
                synchronous: Synchronous::Normal,
            },
            Some(s) => DatabaseConfig::Postgres {
                url: s.url.clone(),
                max_connections: 8,
                schema: Some(s.name.clone()),
            },
        }
    }

    /// Opens a substrate (not started) on this store with default tuning and `clock`, without
    /// the clock-skew check (tests' manual clocks are not wall time).
    pub async fn open(&self, clock: Arc<dyn Clock>) -> Substrate {
        self.open_with(clock, Tuning::default()).await
    }

    /// [`TestStore::open`] with `tuning` (its clock-skew check off likewise).
    pub async fn open_with(&self, clock: Arc<dyn Clock>, tuning: Tuning) -> Substrate {
        let blobs = BlobConfig::Local {
            path: self.dir.path().join("blobs"),
        };
        let tuning = Tuning {
            max_clock_skew_ms: 0,
            ..tuning
        };
        Substrate::open(&self.database(), &blobs, tuning, clock)
            .await
            .expect("open the test substrate")
    }
}

/// Default URL of the test PostgreSQL server.
pub const DEFAULT_TEST_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// URL of the PostgreSQL server tests use.
pub fn postgres_url() -> String {
    std::env::var("KILOCLOUD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| DEFAULT_TEST_DATABASE_URL.to_owned())
}

/// A schema created for one test and dropped when this value is dropped.
pub struct PgSchema {
    /// Server URL.
    pub url: String,
    /// Schema name (`t_<uuid>`).
    pub name: String,
}

impl PgSchema {
    /// Creates a fresh schema on [`postgres_url`].
    ///
    /// Panics with instructions when the server is unreachable: PostgreSQL tests never skip.
    pub async fn create() -> Self {
        let url = postgres_url();
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        execute(&url, format!("CREATE SCHEMA {name}")).await;
        Self { url, name }
    }
}

async fn connect(url: &str) -> sqlx::PgConnection {
    match tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect(url)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "PostgreSQL test server unreachable at {url}: {e}\n\
             Run the tests with scripts/test (it starts a throwaway cluster when needed) or set \
             KILOCLOUD_TEST_DATABASE_URL."
        ),
        Err(_) => panic!("timed out connecting to the PostgreSQL test server at {url}"),
    }
}

/// Runs one administrative statement; panics (the test cannot go on) when it fails.
async fn execute(url: &str, sql: String) {
    let mut conn = connect(url).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let _ = conn.close().await;
}

/// Best-effort clean-up from a `Drop`: runs `sql` on a private runtime on a plain thread, since
/// a destructor may run inside or outside a runtime.
fn clean_up(url: String, sql: String) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            if let Ok(Ok(mut c)) =
                tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect(&url))
                    .await
            {
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut c)
                    .await;
                let _ = c.close().await;
            }
        });
    })
    .join();
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        clean_up(
            self.url.clone(),
            format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        );
    }
}

/// A temporary directory for SQLite files and blobs, removed on drop.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kilocloud-test-")
        .tempdir()
        .expect("temp dir")
}

/// A database created for one test (process-level tests give each server process a URL) and
/// dropped, with its connections, when this value is dropped.
pub struct PgDatabase {
    /// URL of the new database.
    pub url: String,
    name: String,
    admin_url: String,
}

impl PgDatabase {
    /// Creates a fresh database on the server of [`postgres_url`].
    pub async fn create() -> Self {
        let admin_url = postgres_url();
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        execute(&admin_url, format!("CREATE DATABASE {name}")).await;
        let mut url = url::Url::parse(&admin_url).expect("valid test database URL");
        url.set_path(&format!("/{name}"));
        Self {
            url: url.to_string(),
            name,
            admin_url,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        clean_up(
            self.admin_url.clone(),
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Adds a provider-style request id (`req_fake_<n>`, counting up per process) as header
/// `name` to `res`, as OpenAI (`x-request-id`) and Anthropic (`request-id`) do on every
/// response.
pub(crate) async fn with_request_id(
    mut res: axum::response::Response,
    name: &'static str,
) -> axum::response::Response {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("req_fake_{n}")) {
        res.headers_mut().insert(name, v);
    }
    res
}

/// The events of an SSE body, for assertions: `(event name, data)` per event, the name `""`
/// when unnamed, the data parsed as JSON (a string when it is not JSON, as `[DONE]`).
pub fn sse_events(body: &str) -> Vec<(String, serde_json::Value)> {
    body.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = serde_json::Value::Null;
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap_or_else(|_| d.into());
                }
            }
            (name, data)
        })
        .collect()
}
