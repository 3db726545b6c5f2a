//! `kilocloud ci …`: KiCI. `compile` turns `.kici/workflows/*.yml` into
//! `.kici/kici.lock.json` (offline); `agent` runs a CI agent; `runs`, `show`, `logs`,
//! `cancel`, `rerun`, `agents`, `agent-token` and `source` talk to the server as the
//! logged-in user (`--org` for an organization).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::account::{Common, client, print_json, s, table, time};

/// `kilocloud ci`.
#[derive(Subcommand)]
pub enum CiCommand {
    /// Compile `.kici/workflows/*.yml` into `.kici/kici.lock.json`.
    Compile {
        /// The `.kici` directory.
        #[arg(long, default_value = ".kici")]
        kici_dir: PathBuf,
        /// Only check that the lock file is up to date (exit 1 when it is not).
        #[arg(long)]
        check: bool,
    },
    /// Run a CI agent: dial the server, run the jobs it is sent in sandboxes. The agent
    /// token is read from KILOCLOUD_CI_AGENT_TOKEN (never from the command line).
    Agent(Box<AgentArgs>),
    /// Mint an agent token (shown once).
    AgentToken {
        /// A name for it.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Generic webhook sources: create one (its secret is shown once), list them.
    #[command(subcommand)]
    Source(SourceCommand),
    /// The owner's agents and the jobs waiting for one.
    Agents {
        #[command(flatten)]
        common: Common,
    },
    /// The owner's runs, newest first.
    Runs {
        /// How many (1–200).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        common: Common,
    },
    /// One run with its jobs and steps.
    Show {
        /// Run id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// A run's logs; with --follow, live until the run ends (exit 1 unless it succeeded).
    Logs {
        /// Run id.
        id: String,
        /// Only this job (id or name).
        #[arg(long)]
        job: Option<String>,
        /// Stream until the run ends.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Cancel a run (again to force).
    Cancel {
        /// Run id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Run a run's workflow again on the same commit.
    Rerun {
        /// Run id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

/// `kilocloud ci source`.
#[derive(Subcommand)]
pub enum SourceCommand {
    /// Register a source; deliveries to its URL run the workflows whose genericWebhook
    /// trigger names it, at the tip of --branch.
    Create {
        /// The name triggers use (`genericWebhook: {source: NAME}`).
        name: String,
        /// `owner/name` on GitHub (an installation of the owner must cover it).
        #[arg(long)]
        repo: String,
        /// The branch whose tip runs.
        #[arg(long, default_value = "main")]
        branch: String,
        /// Clone URL (default `https://github.com/<repo>.git`).
        #[arg(long)]
        clone_url: Option<String>,
        /// `hmac-sha256` (signature of the body) or `api-key` (the secret in a header).
        #[arg(long, default_value = "hmac-sha256")]
        method: String,
        #[command(flatten)]
        common: Common,
    },
    /// The owner's sources.
    List {
        #[command(flatten)]
        common: Common,
    },
}

/// `kilocloud ci agent`.
#[derive(clap::Args)]
pub struct AgentArgs {
    /// The server's URL.
    #[arg(long, env = "KILOCLOUD_CI_SERVER")]
    server: url::Url,
    /// Labels, comma-separated (kici:os, kici:arch and kici:host are added).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Jobs at once.
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    /// Stable id (default: `<hostname>-<hash of the work directory>`).
    #[arg(long)]
    agent_id: Option<String>,
    /// Where sandboxes live.
    #[arg(long, default_value = ".kilocloud-agent")]
    work_dir: PathBuf,
    /// Serve /health, /ready and /metrics here (`none` to not serve).
    #[arg(long, default_value = "127.0.0.1:8080")]
    health_listen: String,
    /// Allow cloning over plain http:// (tokens then cross the network in clear).
    #[arg(long)]
    allow_http_git: bool,
    /// Allow cloning from loopback or private addresses.
    #[arg(long)]
    allow_private_git_hosts: bool,
}

/// Runs a `kilocloud ci` command.
pub async fn ci(command: CiCommand, config: &crate::config::Config) -> anyhow::Result<()> {
    match command {
        CiCommand::Compile { kici_dir, check } => compile(&kici_dir, check),
        CiCommand::Agent(args) => agent(*args, config).await,
        CiCommand::AgentToken { name, common } => {
            let created = client(&common)?
                .call(
                    Method::POST,
                    "/api/ci/agent-tokens",
                    Some(json!({"name": name})),
                )
                .await?;
            if common.json {
                return print_json(&created);
            }
            println!("{}", s(&created["token"]));
            eprintln!(
                "Agent token {} ({}). It is shown once; give it to agents as \
                 KILOCLOUD_CI_AGENT_TOKEN.",
                s(&created["id"]),
                s(&created["name"])
            );
            Ok(())
        }
        CiCommand::Source(SourceCommand::Create {
            name,
            repo,
            branch,
            clone_url,
            method,
            common,
        }) => {
            let mut body = json!({"name": name, "repo": repo, "branch": branch, "method": method});
            if let Some(url) = clone_url {
                body["cloneUrl"] = url.into();
            }
            let created = client(&common)?
                .call(Method::POST, "/api/ci/sources", Some(body))
                .await?;
            if common.json {
                return print_json(&created);
            }
            let source = &created["source"];
            println!("{}", s(&created["secret"]));
            eprintln!(
                "Source {} ({}): deliveries go to POST {} with {} in {}. The secret above \
                 is shown once.",
                s(&source["id"]),
                s(&source["name"]),
                s(&source["path"]),
                if source["method"] == "api-key" {
                    "the secret"
                } else {
                    "sha256=<HMAC-SHA256 of the body>"
                },
                s(&source["header"])
            );
            Ok(())
        }
        CiCommand::Source(SourceCommand::List { common }) => {
            let v = client(&common)?
                .call(Method::GET, "/api/ci/sources", None)
                .await?;
            if common.json {
                return print_json(&v);
            }
            let rows = v["sources"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    vec![
                        s(&x["id"]),
                        s(&x["name"]),
                        format!("{}@{}", s(&x["repo"]), s(&x["branch"])),
                        s(&x["method"]),
                        s(&x["path"]),
                    ]
                })
                .collect();
            table(&["SOURCE", "NAME", "REPO", "METHOD", "PATH"], rows);
            Ok(())
        }
        CiCommand::Agents { common } => {
            let v = client(&common)?
                .call(Method::GET, "/api/ci/agents", None)
                .await?;
            if common.json {
                return print_json(&v);
            }
            let rows = v["agents"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    vec![
                        s(&a["id"]),
                        if a["connected"] == true {
                            "connected"
                        } else {
                            "disconnected"
                        }
                        .into(),
                        format!(
                            "{}/{}",
                            a["active"].as_array().map_or(0, Vec::len),
                            s(&a["maxConcurrency"])
                        ),
                        labels(&a["labels"]),
                    ]
                })
                .collect();
            table(&["AGENT", "STATE", "JOBS", "LABELS"], rows);
            for entry in v["queue"].as_array().into_iter().flatten() {
                println!(
                    "waiting: job {} of run {}: {}",
                    s(&entry["ready"]["job"]["jobId"]),
                    s(&entry["ready"]["job"]["runId"]),
                    s(&entry["reason"])
                );
            }
            Ok(())
        }
        CiCommand::Runs { limit, common } => {
            let v = client(&common)?
                .call(Method::GET, &format!("/api/ci/runs?limit={limit}"), None)
                .await?;
            if common.json {
                return print_json(&v);
            }
            let rows = v["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        s(&r["id"]),
                        s(&r["workflow"]),
                        s(&r["repo"]),
                        short_sha(&r["sha"]),
                        s(&r["status"]),
                        time(&r["createdAt"]),
                    ]
                })
                .collect();
            table(
                &["RUN", "WORKFLOW", "REPO", "SHA", "STATUS", "CREATED"],
                rows,
            );
            Ok(())
        }
        CiCommand::Show { id, common } => {
            let v = client(&common)?
                .call(Method::GET, &format!("/api/ci/runs/{id}"), None)
                .await?;
            if common.json {
                return print_json(&v);
            }
            let run = &v["run"];
            println!(
                "{} {} on {}@{}: {}",
                s(&run["id"]),
                s(&run["workflow"]),
                s(&run["repo"]),
                short_sha(&run["sha"]),
                s(&run["status"])
            );
            if let Some(reason) = run["failureReason"].as_str() {
                println!("  {reason}");
            }
            let rows = v["jobs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|j| {
                    vec![
                        s(&j["id"]),
                        s(&j["name"]),
                        s(&j["status"]),
                        s(&j["agentId"]),
                        j["error"]
                            .as_str()
                            .or(j["waitingReason"].as_str())
                            .unwrap_or("")
                            .to_owned(),
                    ]
                })
                .collect();
            table(&["JOB", "NAME", "STATUS", "AGENT", "NOTE"], rows);
            Ok(())
        }
        CiCommand::Logs {
            id,
            job,
            follow,
            common,
        } => logs(&id, job.as_deref(), follow, &common).await,
        CiCommand::Cancel { id, common } => {
            let v = client(&common)?
                .call(Method::POST, &format!("/api/ci/runs/{id}/cancel"), None)
                .await?;
            if common.json {
                return print_json(&v);
            }
            println!("run {id}: {}", s(&v["run"]["status"]));
            Ok(())
        }
        CiCommand::Rerun { id, common } => {
            let v = client(&common)?
                .call(Method::POST, &format!("/api/ci/runs/{id}/rerun"), None)
                .await?;
            if common.json {
                return print_json(&v);
            }
            println!("{}", s(&v["run"]["id"]));
            Ok(())
        }
    }
}

fn labels(v: &Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

fn short_sha(v: &Value) -> String {
    s(v).chars().take(12).collect()
}

/// Compiles the workflows of `kici_dir`; with `check`, compares instead of writing.
fn compile(kici_dir: &Path, check: bool) -> anyhow::Result<()> {
    let dir = kici_dir.join("workflows");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        anyhow::bail!("no workflows in {} (*.yml or *.yaml)", dir.display());
    }
    let root = kici_dir.parent().unwrap_or(Path::new(""));
    let sources = files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let file = path
                .strip_prefix(root)
                .unwrap_or(path)
                .to_string_lossy()
                .into_owned();
            Ok(kilocloud_kici::workflow::WorkflowSource { file, text })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let lock = kilocloud_kici::workflow::compile(&sources)?;
    let text = kilocloud_kici::workflow::to_lock_json(&lock);
    let out = kici_dir.join("kici.lock.json");
    if check {
        let current = std::fs::read_to_string(&out).unwrap_or_default();
        if current != text {
            anyhow::bail!(
                "{} is out of date; run `kilocloud ci compile`",
                out.display()
            );
        }
        eprintln!("{} is up to date", out.display());
        return Ok(());
    }
    std::fs::write(&out, &text).with_context(|| format!("cannot write {}", out.display()))?;
    let jobs: usize = lock.workflows.iter().map(|w| w.jobs.len()).sum();
    eprintln!(
        "wrote {} ({} workflow(s), {jobs} job(s))",
        out.display(),
        lock.workflows.len()
    );
    Ok(())
}

async fn agent(args: AgentArgs, config: &crate::config::Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = std::env::var("KILOCLOUD_CI_AGENT_TOKEN").context(
        "KILOCLOUD_CI_AGENT_TOKEN must hold the agent token (`kilocloud ci agent-token`)",
    )?;
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("cannot create {}", args.work_dir.display()))?;
    let work_dir = args.work_dir.canonicalize()?;
    let agent_id = args.agent_id.unwrap_or_else(|| {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(work_dir.to_string_lossy().as_bytes());
        format!(
            "{}-{}",
            kilocloud_ci::agent::hostname(),
            &hex::encode(hash)[..8]
        )
    });
    let health_listen = match args.health_listen.as_str() {
        "none" | "" => None,
        addr => Some(
            addr.parse()
                .context("--health-listen is host:port or none")?,
        ),
    };
    let mut git = <kilocloud_agent::git::GitConfig as Clone>::clone(&config.agent.git);
    git.allow_http |= args.allow_http_git;
    git.allow_private_hosts |= args.allow_private_git_hosts;
    let agent_config = kilocloud_ci::agent::AgentConfig {
        server: args.server,
        token,
        agent_id,
        labels: args.labels.into_iter().filter(|l| !l.is_empty()).collect(),
        max_concurrency: args.concurrency.max(1),
        work_dir,
        health_listen,
        sandbox: config.agent.sandbox.clone(),
        git,
        shutdown_grace: Duration::from_secs(10),
    };
    let (shutdown, drain) = (CancellationToken::new(), CancellationToken::new());
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let (s2, d2) = (shutdown.clone(), drain.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => s2.cancel(),
                _ = interrupt.recv() => s2.cancel(),
                _ = usr1.recv() => d2.cancel(),
            }
        }
    });
    println!("kilocloud ci agent {} starting", agent_config.agent_id);
    kilocloud_ci::agent::run(agent_config, shutdown, drain).await?;
    Ok(())
}

/// Prints a run's logs: all so far, or (`follow`) live until the run ends.
async fn logs(id: &str, job: Option<&str>, follow: bool, common: &Common) -> anyhow::Result<()> {
    let client = client(common)?;
    let wanted = |job_id: &str, name: &str| job.is_none_or(|j| j == job_id || j == name);
    if !follow {
        let v = client
            .call(Method::GET, &format!("/api/ci/runs/{id}"), None)
            .await?;
        for j in v["jobs"].as_array().into_iter().flatten() {
            let (job_id, name) = (s(&j["id"]), s(&j["name"]));
            if !wanted(&job_id, &name) {
                continue;
            }
            let mut after: Option<u64> = None;
            loop {
                let query = after.map(|a| format!("?after={a}")).unwrap_or_default();
                let page = client
                    .call(
                        Method::GET,
                        &format!("/api/ci/runs/{id}/jobs/{job_id}/logs{query}"),
                        None,
                    )
                    .await?;
                let chunks = page["chunks"].as_array().cloned().unwrap_or_default();
                if chunks.is_empty() {
                    break;
                }
                for chunk in &chunks {
                    after = chunk["seq"].as_u64();
                    print_chunk(&name, chunk, common.json);
                }
            }
        }
        return Ok(());
    }
    let request = client.ws_request(&format!("/api/ci/runs/{id}/logs/stream"))?;
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .context("cannot open the log stream")?;
    while let Some(message) = ws.next().await {
        let message = message.context("log stream failed")?;
        let Ok(text) = message.to_text() else {
            continue;
        };
        let Ok(frame) = serde_json::from_str::<Value>(text) else {
            continue;
        };
        match frame["type"].as_str() {
            Some("log") if wanted(&s(&frame["jobId"]), &s(&frame["job"])) => {
                print_chunk(&s(&frame["job"]), &frame["chunk"], common.json)
            }
            Some("job") if wanted(&s(&frame["id"]), &s(&frame["name"])) => {
                eprintln!("[{}] {}", s(&frame["name"]), s(&frame["status"]));
            }
            Some("run") => {
                let status = s(&frame["status"]);
                eprintln!("run {id}: {status}");
                if status != "success" {
                    anyhow::bail!("run {id} ended {status}");
                }
                return Ok(());
            }
            _ => {}
        }
    }
    anyhow::bail!("the server closed the log stream before the run ended")
}

fn print_chunk(job: &str, chunk: &Value, json: bool) {
    if json {
        println!("{}", json!({"job": job, "chunk": chunk}));
        return;
    }
    for line in chunk["lines"].as_array().into_iter().flatten() {
        println!("[{job}] {}", line.as_str().unwrap_or_default());
    }
}
