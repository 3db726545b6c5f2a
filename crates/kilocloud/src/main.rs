//! `kilocloud`: the single binary. `serve` runs a node; the other commands operate on the same
//! configuration and database (see `docs/cli.md`).

mod account;
mod automation;
mod ci;
mod claw;
mod client;
mod config;
mod session;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use config::{Config, LogFormat, Overrides};
use kilocloud_identity::Identity;
use kilocloud_server::{AppState, ServerOptions, probe};
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
    /// Administration of the store: first administrator, master-key rotation.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Store a server URL and a credential (JWT or API key) for the account commands.
    Login(account::LoginArgs),
    /// Show the user behind the stored credential and their organizations.
    Whoami {
        #[command(flatten)]
        common: account::Common,
    },
    /// Organizations and their members.
    #[command(subcommand)]
    Org(account::OrgCommand),
    /// API keys.
    #[command(subcommand)]
    Token(account::TokenCommand),
    /// Secrets (encrypted at rest; values are never shown).
    #[command(subcommand)]
    Secret(account::SecretCommand),
    /// Users (site administrators).
    #[command(subcommand)]
    User(account::UserCommand),
    /// Your audit log, or an organization's with --org.
    Audit(account::AuditArgs),
    /// Credit grants and balances of the model gateway.
    #[command(subcommand)]
    Credits(account::CreditsCommand),
    /// Model gateway requests of the owner acted for, with tokens and cost.
    Usage(account::UsageArgs),
    /// Sessions: Cloud Agent sessions (create and follow live, send, watch, interrupt,
    /// delete) and, in list and show, the Kilo Code CLI's ingested sessions.
    #[command(subcommand)]
    Session(session::SessionCommand),
    /// `kilo remote` connections of the Kilo Code CLI.
    #[command(subcommand)]
    Remote(session::RemoteCommand),
    /// Triggers: webhooks and schedules that start Cloud Agent sessions.
    #[command(subcommand)]
    Trigger(automation::TriggerCommand),
    /// Code review of pull requests: settings, reviews.
    #[command(subcommand)]
    Review(automation::ReviewCommand),
    /// GitHub App installations of the owner.
    #[command(subcommand)]
    Github(automation::GitHubCommand),
    /// KiloClaw assistant runtimes: create, list, status, start, stop, destroy, open.
    #[command(subcommand)]
    Claw(claw::ClawCommand),
    /// KiCI: compile workflows, run an agent, follow runs and their logs, cancel, rerun.
    #[command(subcommand)]
    Ci(ci::CiCommand),
    /// The built-in KiloClaw runtime, run inside an instance's sandbox (not for direct use):
    /// decrypts its env (failing closed without the key) and serves on port 18789;
    /// `doctor` checks the same and prints a report.
    #[command(hide = true)]
    ClawRuntime {
        /// `doctor` to check instead of serving.
        mode: Option<String>,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// On an empty store, create the administrator and print a one-time API key to stderr.
    /// The server must be stopped (SQLite) or may run (PostgreSQL).
    Init {
        /// The administrator's email. Default: bootstrap_admin_email.
        #[arg(long)]
        email: Option<String>,
    },
    /// Re-wrap every secret's data key with the current master_key; previous_master_keys
    /// must hold the keys they were wrapped with.
    RotateMasterKey,
    /// Print 32 random bytes in base64: a new master_key or jwt_secret.
    GenerateKey,
    /// Create a new API key for a user (default: the first administrator) and print it to
    /// stderr, for when a key is lost. Needs the database, like `init`.
    IssueKey {
        /// The user's email. Default: the first administrator.
        #[arg(long)]
        email: Option<String>,
    },
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
    /// Delete dead letters for good: the given ids, or all of them with `--all`.
    Delete {
        /// Queue name.
        queue: String,
        /// Dead-letter id to delete; repeat for several.
        #[arg(long = "id", value_name = "ID", required_unless_present = "all")]
        ids: Vec<i64>,
        /// Delete every dead letter of the queue (a purge).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
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
    if let Command::ClawRuntime { mode } = &cli.command {
        return claw_runtime(mode.as_deref());
    }
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

/// `kilocloud claw-runtime [doctor]`, inside a KiloClaw sandbox: no configuration file, logs
/// to stderr (the machine's log).
fn claw_runtime(mode: Option<&str>) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .init();
    let doctor = match mode {
        None => false,
        Some("doctor") => true,
        Some(other) => {
            eprintln!("error: unknown mode `{other}` (expected `doctor`)");
            return std::process::ExitCode::from(2);
        }
    };
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(kilocloud_claw::run_runtime(doctor)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// KiloClaw on `sub`, or `None` when `claw.enabled` is false. `gateway` is this server's
/// address, forwarded into local sandboxes for the runtimes' model calls.
fn claw_service(
    config: &Config,
    sub: &Substrate,
    identity: &Identity,
    gateway: std::net::SocketAddr,
) -> anyhow::Result<Option<kilocloud_claw::Claw>> {
    use kilocloud_claw::provider::ComputeProvider;
    let claw = config.claw()?;
    if !claw.enabled {
        return Ok(None);
    }
    let (provider, api_base_url): (Arc<dyn ComputeProvider>, String) = match claw.provider {
        kilocloud_claw::ProviderKind::Local => {
            let root = config.data_dir.join("claw");
            let sandbox = kilocloud_agent::sandbox::LocalSandbox::new(
                &config.agent.sandbox,
                root.join("sandboxes"),
            );
            let forward = std::net::SocketAddr::new(
                if gateway.ip().is_unspecified() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    gateway.ip()
                },
                gateway.port(),
            );
            let provider = kilocloud_claw::local::LocalProvider::new(
                root,
                sandbox,
                claw.runtime_command.clone(),
                Some(forward),
            )
            .map_err(|e| anyhow::anyhow!("claw: {e}"))?;
            let inside = format!(
                "http://127.0.0.1:{}/api/openrouter/",
                kilocloud_agent::sandbox::FORWARD_PORT
            );
            (Arc::new(provider), inside)
        }
        kilocloud_claw::ProviderKind::Fly => {
            let provider = kilocloud_claw::fly::FlyProvider::new(claw.fly.clone())
                .map_err(|e| anyhow::anyhow!("invalid claw.fly configuration: {e}"))?;
            (Arc::new(provider), claw.api_base_url.clone())
        }
    };
    Ok(Some(kilocloud_claw::Claw::new(
        sub,
        identity.clone(),
        claw,
        provider,
        api_base_url,
    )))
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
        Command::Admin(a) => admin_command(a, &config).await,
        Command::Login(a) => account::login(a).await,
        Command::Whoami { common } => account::whoami(common).await,
        Command::Org(c) => account::org(c).await,
        Command::Token(c) => account::token(c).await,
        Command::Secret(c) => account::secret(c).await,
        Command::User(c) => account::user(c).await,
        Command::Audit(a) => account::audit(a).await,
        Command::Credits(c) => account::credits(c).await,
        Command::Usage(a) => account::usage(a).await,
        Command::Session(c) => session::run(c).await,
        Command::Remote(c) => session::remote(c).await,
        Command::Trigger(c) => automation::trigger(c).await,
        Command::Review(c) => automation::review(c).await,
        Command::Github(c) => automation::github(c).await,
        Command::Claw(c) => claw::claw(c).await,
        Command::Ci(c) => ci::ci(c, &config).await,
        Command::ClawRuntime { .. } => unreachable!("run before the configuration is loaded"),
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
        QueueCommand::Delete { queue, ids, all } => {
            let ids = (!all).then_some(ids);
            let n = sub
                .queues()
                .delete_dead_letters(&queue, ids.as_deref())
                .await?;
            println!("deleted {n} dead letter(s) of {queue}");
        }
    }
    Ok(())
}

/// Opens the store with identity's actors registered and starts it (taking the SQLite lock, so
/// a command that changes actor state cannot race a running server on the same file).
async fn start_identity(config: &Config) -> anyhow::Result<(Substrate, Identity)> {
    let sub = open(config).await?;
    let identity = Identity::new(&sub, config.identity()?);
    sub.start().await.map_err(|e| match e {
        kilocloud_substrate::Error::DataDirLocked { .. } => {
            anyhow::anyhow!("{e}; stop the server first, or run this against PostgreSQL")
        }
        e => e.into(),
    })?;
    Ok((sub, identity))
}

/// Creates the first administrator when the store has none; prints their API key to stderr
/// directly (not through the log, which may be shipped elsewhere). Returns whether it did.
async fn bootstrap(identity: &Identity, email: &str) -> anyhow::Result<bool> {
    let Some((user, key)) = identity.bootstrap(email).await? else {
        return Ok(false);
    };
    eprintln!(
        "\nCreated the administrator {} ({}). Its API key, shown only this once:\n\n    {key}\n\n\
         Log in with: kilocloud login --url <server URL> --token <the key>\n",
        user.email, user.id
    );
    tracing::info!(user = %user.id, "created the first administrator; API key printed to stderr");
    Ok(true)
}

async fn admin_command(command: AdminCommand, config: &Config) -> anyhow::Result<()> {
    if let AdminCommand::GenerateKey = command {
        println!("{}", kilocloud_identity::envelope::generate_secret_text());
        return Ok(());
    }
    let (sub, identity) = start_identity(config).await?;
    let result = match command {
        AdminCommand::Init { email } => {
            let email = email.unwrap_or_else(|| config.bootstrap_admin_email.clone());
            match bootstrap(&identity, &email).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(anyhow::anyhow!(
                    "the store is already initialized (administrator {}); \
                     create more users with `kilocloud user create`",
                    identity.bootstrap_admin().await?.map(|u| u.to_string()).unwrap_or_default()
                )),
                Err(e) => Err(e),
            }
        }
        AdminCommand::RotateMasterKey => identity
            .rotate_master_key(|r| {
                eprintln!(
                    "… {} owners visited, {} secrets re-wrapped, {} already current",
                    r.owners, r.rewrapped, r.already_current
                )
            })
            .await
            .map(|r| {
                println!(
                    "re-wrapped {} secret(s) of {} owner(s) with master key {}; {} were already current",
                    r.rewrapped,
                    r.owners,
                    identity.master_key_id(),
                    r.already_current
                )
            })
            .map_err(Into::into),
        AdminCommand::IssueKey { email } => issue_key(&identity, email).await,
        AdminCommand::GenerateKey => unreachable!("handled above"),
    };
    sub.shutdown(Duration::from_secs(5)).await;
    result
}

/// `admin issue-key`: a new personal API key for `email`, or for the first administrator.
async fn issue_key(identity: &Identity, email: Option<String>) -> anyhow::Result<()> {
    let user = match &email {
        Some(email) => identity.user_by_email(email).await?,
        None => match identity.bootstrap_admin().await? {
            Some(id) => identity.user(id).await?,
            None => None,
        },
    };
    let user = user.with_context(|| match &email {
        Some(email) => format!("no user with email {email}"),
        None => "the store has no administrator yet; run `kilocloud admin init`".into(),
    })?;
    let by = kilocloud_identity::model::Initiator {
        user: user.id,
        request_id: None,
    };
    let (key, view) = identity
        .create_api_key(
            kilocloud_identity::Owner::User(user.id),
            "recovery",
            None,
            &by,
        )
        .await?;
    eprintln!(
        "Created API key {} for {} ({}), shown only this once:\n\n    {key}\n",
        view.id, user.email, user.id
    );
    Ok(())
}

/// Creates the data directory and tightens its mode: 0700 (only the server's user), or
/// 0711 when the server is root and sandboxes kept under it run as their own unprivileged
/// user, which must be able to pass through it to reach its directories (bubblewrap, started
/// as that user, resolves them itself); it still cannot list or read anything else. The
/// logs of KiloClaw's local runtimes get 0700. The database (0600) is the substrate's,
/// `secrets.toml` (0600) the configuration's.
fn prepare_data_dir(config: &Config) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let agent_sandbox = &config.agent.sandbox;
    let agent_under = agent_sandbox.provider == kilocloud_agent::sandbox::ProviderKind::Local
        && (agent_sandbox.root.as_os_str().is_empty() || agent_sandbox.root.starts_with(dir));
    let claw = config.claw()?;
    let claw_under = claw.enabled && claw.provider == kilocloud_claw::ProviderKind::Local;
    let traversable = nix::unistd::geteuid().is_root() && (agent_under || claw_under);
    let mode = if traversable { 0o711 } else { 0o700 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    if claw_under {
        let logs = dir.join("claw").join("logs");
        std::fs::create_dir_all(&logs)
            .and_then(|()| std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o700)))
            .with_context(|| format!("cannot prepare {}", logs.display()))?;
    }
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    prepare_data_dir(&config)?;
    // Bound first: KiloClaw's local runtimes reach the model gateway at this address.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let (sub, identity, gateway, agents, automation, claw, ci) = {
        let sub = open(&config).await?;
        probe::register(&sub)?;
        let identity = Identity::new(&sub, config.identity()?);
        let gateway = kilocloud_server::api::gateway::state(&sub, &config.gateway, |name| {
            std::env::var(name).ok()
        })
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let agents = kilocloud_agent::Agents::new(
            &sub,
            identity.clone(),
            config.agent.clone(),
            config.data_dir.join("sandboxes"),
        )
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let automation = kilocloud_automation::Automation::new(
            &sub,
            identity.clone(),
            agents.clone(),
            kilocloud_automation::AutomationConfig {
                github: config.github.clone(),
                review: config.review.clone(),
            },
        )
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let claw = claw_service(&config, &sub, &identity, addr)?;
        let ci = kilocloud_ci::Ci::new(
            &sub,
            identity.clone(),
            automation.github().cloned(),
            config.ci.clone(),
        );
        automation.set_delivery_sink(Arc::new(ci.clone()));
        sub.start().await?;
        gateway.ledger.start_charging();
        agents.start();
        automation.start();
        ci.start();
        if let Some(claw) = &claw {
            // Runtimes that go down (or died with the previous server) restart within seconds.
            claw.watch_machines();
        }
        (sub, identity, gateway, agents, automation, claw, ci)
    };
    if let Err(e) = agents.sandbox().check().await {
        // Sessions will fail with this message too; the server is still useful without them.
        tracing::warn!(
            provider = agents.sandbox().kind(),
            "Cloud Agent sessions cannot run: {e}"
        );
    }
    bootstrap(&identity, &config.bootstrap_admin_email).await?;
    agents.set_server_url(&format!("http://{addr}"));
    probe::start(&sub);
    let recordings = gateway.clone();
    let state = AppState::new(
        sub.clone(),
        identity,
        gateway,
        &ServerOptions {
            admin_token: config.admin_token.expose().to_owned(),
            auth_failures_per_minute: config.auth_failures_per_minute,
            trusted_proxies: config
                .server
                .trusted_networks()
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?,
        },
    )
    .with_agents(agents.clone())
    .with_automation(automation)
    .with_ci(ci);
    let state = match claw {
        Some(claw) => state.with_claw(claw, config.claw.secure_cookie),
        None => state,
    };
    // The handlers are in place before anyone learns the address: a SIGTERM right after the
    // listening line is a graceful shutdown, never the default action (death by signal).
    let signals = ShutdownSignals::register()?;
    // Tests and scripts read this line to find the port (`--listen 127.0.0.1:0`).
    println!("kilocloud listening on http://{addr}");
    std::io::stdout().flush()?;
    tracing::info!(%addr, backend = ?sub.backend_kind(), node = sub.node_id(), "listening");

    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let signalled = Arc::new(std::sync::OnceLock::<Instant>::new());
    let on_signal = signalled.clone();
    let intake = sub.clone();
    let agents_stop = agents.clone();
    // One deadline for everything: on the signal, consumers and the scheduler stop claiming
    // work at once while HTTP drains; the substrate gets what is left of the grace period.
    let drained = kilocloud_server::serve(
        listener,
        kilocloud_server::router(state),
        async move {
            signals.recv().await;
            let _ = on_signal.set(Instant::now());
            intake.stop_intake();
            agents_stop.stop();
            tracing::info!("shutting down: no new connections or work; finishing in-flight work");
        },
        grace,
    )
    .await?;
    // Interrupted executions record their end, and usage recordings run after their
    // responses; both need the substrate, so they go first.
    let elapsed = signalled.get().map(Instant::elapsed).unwrap_or_default();
    if !agents.shutdown(grace.saturating_sub(elapsed)).await {
        tracing::error!("shutdown grace period ran out before every execution recorded its end");
    }
    let elapsed = signalled.get().map(Instant::elapsed).unwrap_or_default();
    let settled = tokio::time::timeout(grace.saturating_sub(elapsed), recordings.settle())
        .await
        .is_ok();
    if !settled {
        tracing::error!("shutdown grace period ran out before all gateway usage was recorded");
    }
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

/// SIGTERM and SIGINT, registered when made (a signal arriving later is caught, whenever
/// [`ShutdownSignals::recv`] is first polled).
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn register() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// The first of either.
    async fn recv(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}
