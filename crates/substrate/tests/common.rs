//! Harness: opens a substrate on a fresh SQLite file or PostgreSQL schema with a manual clock.

#![allow(dead_code, missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use kilocloud_substrate::{
    Actor, ActorContext, BlobConfig, DatabaseConfig, ManualClock, Result, Substrate, Synchronous,
    Tuning,
};
use kilocloud_test_support::{PgSchema, temp_dir};

/// 2026-01-01T00:00:00Z.
pub const T0: i64 = 1_767_225_600_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// One test's database: a temp dir (SQLite file, blobs) and, on PostgreSQL, a schema.
pub struct Env {
    pub kind: Kind,
    pub dir: tempfile::TempDir,
    pub schema: Option<PgSchema>,
    pub clock: ManualClock,
}

impl Env {
    pub async fn new(kind: Kind) -> Self {
        let schema = match kind {
            Kind::Sqlite => None,
            Kind::Postgres => Some(PgSchema::create().await),
        };
        Self {
            kind,
            dir: temp_dir(),
            schema,
            clock: ManualClock::new(T0),
        }
    }

    pub fn database(&self) -> DatabaseConfig {
        match &self.schema {
            None => DatabaseConfig::Sqlite {
                path: self.dir.path().join("kilocloud.db"),
                synchronous: Synchronous::Normal,
            },
            Some(s) => DatabaseConfig::Postgres {
                url: s.url.clone(),
                max_connections: 16,
                schema: Some(s.name.clone()),
            },
        }
    }

    pub fn blobs(&self) -> BlobConfig {
        BlobConfig::Local {
            path: self.dir.path().join("blobs"),
        }
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.dir.path().join("kilocloud.db")
    }

    /// Opens a substrate (not started) with `tuning`, without the clock-skew check (the manual
    /// clock is not wall time).
    pub async fn open_with(&self, tuning: Tuning) -> Substrate {
        Substrate::open(
            &self.database(),
            &self.blobs(),
            Tuning {
                max_clock_skew_ms: 0,
                ..tuning
            },
            Arc::new(self.clock.clone()),
        )
        .await
        .expect("open substrate")
    }

    pub async fn open(&self) -> Substrate {
        self.open_with(Tuning::default()).await
    }
}

/// Generates `mod sqlite { #[test] fn name() }` and `mod postgres { ... }` for each scenario
/// `async fn name(kind: Kind)` in scope.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Kind::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Kind::Postgres).await
                }
            )*
        }
    };
}

impl Env {
    /// Current manual-clock time.
    pub fn clock_now(&self) -> i64 {
        use kilocloud_substrate::Clock;
        self.clock.now_ms()
    }
}

/// A counter actor that counts overlapping calls on one key. Clones share the count, so one
/// instance registered on several nodes detects overlaps across them.
#[derive(Clone, Default)]
pub struct OverlapCounter {
    busy: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<AtomicBool>>>>,
    /// Calls that started while another call on the same key was running.
    pub overlaps: Arc<AtomicUsize>,
}

/// A call on [`OverlapCounter`].
pub enum CounterCall {
    /// Add one; returns the new value.
    Incr,
    /// Return the value.
    Get,
}

impl Actor for OverlapCounter {
    const TYPE: &'static str = "counter";
    type Call = CounterCall;
    type Reply = i64;

    async fn call(&self, ctx: &mut ActorContext, call: CounterCall) -> Result<i64> {
        let flag = self
            .busy
            .lock()
            .unwrap()
            .entry(ctx.key().to_owned())
            .or_default()
            .clone();
        if flag.swap(true, Ordering::SeqCst) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        let n: i64 = ctx.get("n").await?.unwrap_or(0);
        // Yield between read and write so an interleaving call would lose an update.
        tokio::task::yield_now().await;
        let out = match call {
            CounterCall::Incr => {
                ctx.put("n", &(n + 1))?;
                n + 1
            }
            CounterCall::Get => n,
        };
        flag.store(false, Ordering::SeqCst);
        Ok(out)
    }
}
