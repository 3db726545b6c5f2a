//! `kilocloud-bench`: measures the substrate against its targets (DESIGN.md §6) with NATS
//! JetStream measured in the same run as the queue reference, the cost of authentication
//! beside signature-only JWT verification and the KiloClaw proxy beside nginx, and prints a
//! Markdown report for BENCHMARKS.md.
//!
//! ```text
//! cargo run --release -p kilocloud-bench            # everything (≈ 3–5 minutes)
//! cargo run --release -p kilocloud-bench -- --quick # smaller counts, for a smoke run
//! ```
//!
//! PostgreSQL comes from `KILOCLOUD_TEST_DATABASE_URL` (a fresh database is created and
//! dropped); NATS from `--nats` (default `127.0.0.1:4222`).

mod actors;
mod alarms;
mod auth;
mod automation;
mod ci;
mod claw;
mod drain;
mod gateway;
mod queue;
mod report;
mod sandbox;
mod stack;

use std::sync::Arc;

use clap::Parser;
use kilocloud_substrate::{
    BlobConfig, DatabaseConfig, Substrate, Synchronous, SystemClock, Tuning,
};
use kilocloud_test_support::{PgDatabase, temp_dir};

/// Benchmarks of the Kilo Cloud substrate.
#[derive(Parser, Clone)]
struct Args {
    /// Smaller message and call counts (a smoke run, not for BENCHMARKS.md).
    #[arg(long)]
    quick: bool,
    /// Run only these groups (queue, drain, actors, alarms, auth, gateway, sandbox, automation, claw, ci). Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// NATS server for the JetStream reference.
    #[arg(long, default_value = "127.0.0.1:4222")]
    nats: String,
    /// The LiteLLM proxy executable (`pip install 'litellm[proxy]'`), for the gateway reference.
    #[arg(long, value_name = "PATH")]
    litellm: Option<String>,
}

/// A backend under test: its substrate and what keeps its storage alive.
pub struct Backend {
    /// Label for the report.
    pub name: &'static str,
    /// Opened and started substrate.
    pub substrate: Substrate,
    _dir: tempfile::TempDir,
    _db: Option<PgDatabase>,
}

impl Backend {
    async fn open(postgres: bool) -> anyhow::Result<Self> {
        let dir = temp_dir();
        let db = if postgres {
            Some(PgDatabase::create().await)
        } else {
            None
        };
        let database = match &db {
            None => DatabaseConfig::Sqlite {
                path: dir.path().join("bench.db"),
                synchronous: Synchronous::Normal,
            },
            Some(db) => DatabaseConfig::Postgres {
                url: db.url.clone(),
                max_connections: 64,
                schema: None,
            },
        };
        let substrate = Substrate::open(
            &database,
            &BlobConfig::Local {
                path: dir.path().join("blobs"),
            },
            Tuning {
                actor_max_backlog: 100_000,
                ..Tuning::default()
            },
            Arc::new(SystemClock),
        )
        .await?;
        substrate.start().await?;
        Ok(Self {
            name: if postgres { "PostgreSQL" } else { "SQLite" },
            substrate,
            _dir: dir,
            _db: db,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let wants = |g: &str| args.only.is_empty() || args.only.iter().any(|o| o == g);
    let mut out = report::header(args.quick);
    if wants("queue") {
        out += &queue::run(&args).await?;
    }
    if wants("drain") {
        out += &drain::run(&args).await?;
    }
    if wants("actors") {
        out += &actors::run(&args).await?;
    }
    if wants("alarms") {
        out += &alarms::run(&args).await?;
    }
    if wants("auth") {
        out += &auth::run(&args).await?;
    }
    if wants("gateway") {
        out += &gateway::run(&args).await?;
    }
    if wants("sandbox") {
        out += &sandbox::run(&args).await?;
    }
    if wants("automation") {
        out += &automation::run(&args).await?;
    }
    if wants("claw") {
        out += &claw::run(&args).await?;
    }
    if wants("ci") {
        out += &ci::run(&args).await?;
    }
    println!("{out}");
    Ok(())
}
