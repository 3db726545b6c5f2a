//! `kilocloud`: the single binary. `serve` runs a node; the other commands operate on the same
//! configuration and database (see `docs/cli.md`).

mod config;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use config::{Config, LogFormat, Overrides};
use kilocloud_server::{AppState, probe};
use kilocloud_substrate::{Substrate, SystemClock};

/// Kilo Cloud: runs AI coding agents and assistant runtimes for people and organizations.
#[derive(Parser)]
#[command(name = "kilocloud", version, propagate_version = true)]
struct Cli {
    /// Configuration file (TOML). Default: ./kilocloud.toml if present.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format: auto (human on a terminal, else JSON), human or json.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Data directory for the SQLite database and blobs. Default: ./.kilocloud
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL: postgres://… for PostgreSQL. Default: SQLite in the data directory.
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: HTTP server, queue consumers, alarm scheduler.
    Serve(ServeArgs),
    /// Apply pending database migrations and exit.
    Migrate,
    /// Configuration commands.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the version and the database schema version this binary supports.
    Version,
    /// Inspect queues and dead-letter queues.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Inspect actors.
    #[command(subcommand)]
    Actor(ActorCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on. Default: 127.0.0.1:8787
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (secrets redacted).
    Show,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Depth, in-flight count, dead letters and oldest-message age of every queue.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List a queue's dead-letter queue.
    Dlq {
        /// Queue name.
        queue: String,
        /// Only dead letters with an id above this.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Most to list (1-1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back to their queue (all, or the given ids).
    Replay {
        /// Queue name.
        queue: String,
        /// Dead-letter id to replay; repeat for several. Default: all.
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<i64>,
    },
}

#[derive(Subcommand)]
enum ActorCommand {
    /// Print an actor's storage and alarm as JSON.
    Show {
        /// Actor type, e.g. `probe`.
        actor_type: String,
        /// Actor key.
        key: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let listen = match &cli.command {
        Command::Serve(a) => a.listen,
        _ => None,
    };
    let overrides = Overrides {
        listen,
        data_dir: cli.data_dir.clone(),
        database_url: cli.database_url.clone(),
        log_format: cli.log_format,
    };
    let config = match Config::load(cli.config.as_deref(), overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Err(e) = init_logging(&config) {
        eprintln!("error: invalid configuration: key `log_level`: {e}");
        return std::process::ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) -> Result<(), tracing_subscriber::filter::ParseError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)?;
    let json = match config.log_format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    Ok(())
}

async fn open(config: &Config) -> anyhow::Result<Substrate> {
    Ok(Substrate::open(
        &config.database(),
        &config.blobs(),
        config.substrate.clone(),
        Arc::new(SystemClock),
    )
    .await?)
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => serve(config).await,
        Command::Migrate => {
            let sub = open(&config).await?;
            println!(
                "database is at schema version {} (this binary: {})",
                sub.schema_version().await?,
                Substrate::latest_schema_version()
            );
            Ok(())
        }
        Command::Config(ConfigCommand::Show) => {
            print!("{}", config.to_redacted_toml()?);
            Ok(())
        }
        Command::Version => {
            println!(
                "kilocloud {} (schema version {})",
                env!("CARGO_PKG_VERSION"),
                Substrate::latest_schema_version()
            );
            Ok(())
        }
        Command::Queue(q) => queue_command(q, &open(&config).await?).await,
        Command::Actor(ActorCommand::Show { actor_type, key }) => {
            let sub = open(&config).await?;
            let snap = sub.actor_snapshot(&actor_type, &key).await?;
            println!("{}", serde_json::to_string_pretty(&snap)?);
            Ok(())
        }
    }
}

async fn queue_command(command: QueueCommand, sub: &Substrate) -> anyhow::Result<()> {
    match command {
        QueueCommand::List { json } => {
            let stats = sub.queues().stats().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                println!(
                    "{:<24} {:>8} {:>8} {:>9} {:>6} {:>12}",
                    "QUEUE", "READY", "DELAYED", "IN_FLIGHT", "DEAD", "OLDEST_AGE_S"
                );
                for s in stats {
                    println!(
                        "{:<24} {:>8} {:>8} {:>9} {:>6} {:>12.1}",
                        s.queue,
                        s.ready,
                        s.delayed,
                        s.in_flight,
                        s.dead,
                        s.oldest_ready_age_ms as f64 / 1000.0
                    );
                }
            }
        }
        QueueCommand::Dlq {
            queue,
            after,
            limit,
            json,
        } => {
            let dead = sub.queues().dead_letters(&queue, after, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&dead)?);
            } else if dead.is_empty() {
                println!("no dead letters in {queue}");
            } else {
                println!(
                    "{:>8} {:>10} {:>8}  LAST_ERROR",
                    "ID", "MESSAGE", "ATTEMPTS"
                );
                for d in dead {
                    println!(
                        "{:>8} {:>10} {:>8}  {}",
                        d.id, d.message_id, d.attempts, d.last_error
                    );
                }
            }
        }
        QueueCommand::Replay { queue, ids } => {
            let ids = (!ids.is_empty()).then_some(ids);
            let n = sub.queues().replay(&queue, ids.as_deref()).await?;
            println!("replayed {n} message(s) to {queue}");
        }
    }
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let sub = open(&config).await?;
    probe::register(&sub)?;
    sub.start().await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    probe::start(&sub);
    let state = AppState::new(sub.clone(), Some(&config.admin_token));
    // Tests and scripts read this line to find the port (`--listen 127.0.0.1:0`).
    println!("kilocloud listening on http://{addr}");
    std::io::stdout().flush()?;
    tracing::info!(%addr, backend = ?sub.backend_kind(), node = sub.node_id(), "listening");

    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let signalled = Arc::new(std::sync::OnceLock::<Instant>::new());
    let on_signal = signalled.clone();
    let intake = sub.clone();
    // One deadline for everything: on the signal, consumers and the scheduler stop claiming
    // work at once while HTTP drains; the substrate gets what is left of the grace period.
    let drained = kilocloud_server::serve(
        listener,
        kilocloud_server::router(state),
        async move {
            shutdown_signal().await;
            let _ = on_signal.set(Instant::now());
            intake.stop_intake();
            tracing::info!("shutting down: no new connections or work; finishing in-flight work");
        },
        grace,
    )
    .await?;
    let elapsed = signalled.get().map(Instant::elapsed).unwrap_or_default();
    let finished = sub.shutdown(grace.saturating_sub(elapsed)).await;
    if drained && finished {
        tracing::info!("shutdown complete");
    } else {
        tracing::warn!(
            http_drained = drained,
            work_finished = finished,
            "shutdown grace period ran out; unfinished work will be redelivered"
        );
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
