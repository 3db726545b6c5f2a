//! `kilocloud trigger …`, `kilocloud review …` and `kilocloud github …`: triggers (webhook
//! and scheduled), code review settings and reviews, and GitHub App installations, for the
//! owner acted for (`--org` for an organization).

use anyhow::Context;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use crate::account::{Common, client, print_json, s, table, time};

/// `kilocloud trigger`.
#[derive(Subcommand)]
pub enum TriggerCommand {
    /// Create a trigger that starts a Cloud Agent session (or stores a chat message) when its
    /// webhook is called or its schedule fires.
    Create(Box<TriggerArgs>),
    /// The owner's triggers.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// One trigger.
    Show {
        /// Trigger id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Delete a trigger, its requests and its schedule.
    Delete {
        /// Trigger id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// The trigger's newest requests and what became of them.
    Requests {
        /// Trigger id.
        id: String,
        /// How many (1–100).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        common: Common,
    },
}

/// `kilocloud trigger create`.
#[derive(Args)]
pub struct TriggerArgs {
    /// Trigger id: 1–64 of a-z, 0-9, - and _.
    id: String,
    /// `owner/repo` on GitHub, or an https clone URL, for a Cloud Agent session.
    #[arg(long, required_unless_present = "chat")]
    repo: Option<String>,
    /// The prompt template (MiniJinja: `{{ payload.issue.title }}`, `{{ body }}`, …).
    #[arg(long, required_unless_present = "chat")]
    prompt: Option<String>,
    /// Store a chat message rendered from this template instead of starting a session.
    #[arg(long, conflicts_with_all = ["repo", "prompt"])]
    chat: Option<String>,
    /// Fire on this cron schedule (5 or 6 fields, or `@hourly`…) instead of a webhook.
    #[arg(long)]
    cron: Option<String>,
    /// Time zone of --cron (IANA name).
    #[arg(long, default_value = "UTC", requires = "cron")]
    timezone: String,
    /// Require this header on webhook calls, carrying --secret.
    #[arg(long, requires = "secret", conflicts_with = "cron")]
    auth_header: Option<String>,
    /// The webhook secret (`-` reads it from stdin).
    #[arg(long, requires = "auth_header")]
    secret: Option<String>,
    /// The header carries `sha256=<HMAC-SHA256 of the body>` instead of the secret itself.
    #[arg(long, requires = "auth_header")]
    hmac: bool,
    /// Session mode; default code.
    #[arg(long)]
    mode: Option<String>,
    /// Session model; default the server's.
    #[arg(long)]
    model: Option<String>,
    /// Commit and push when the session completes.
    #[arg(long)]
    auto_commit: bool,
    #[command(flatten)]
    common: Common,
}

/// `kilocloud review`.
#[derive(Subcommand)]
pub enum ReviewCommand {
    /// Show the code review settings, or change those given.
    Config(ReviewConfigArgs),
    /// Reviews of the last 7 days, newest first.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// One review.
    Show {
        /// Review id (`rev_…`).
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

/// `kilocloud review config`.
#[derive(Args)]
pub struct ReviewConfigArgs {
    /// Turn code review on or off.
    #[arg(long)]
    enabled: Option<bool>,
    /// Review only these repositories (`owner/name`, repeatable); `--all-repositories`
    /// clears the list.
    #[arg(long = "repository")]
    repositories: Vec<String>,
    /// Review every repository of the owner's installations.
    #[arg(long, conflicts_with = "repositories")]
    all_repositories: bool,
    /// Model of the reviewer.
    #[arg(long)]
    model: Option<String>,
    /// Extra instructions for the reviewer.
    #[arg(long)]
    instructions: Option<String>,
    /// Skip draft pull requests.
    #[arg(long)]
    skip_drafts: Option<bool>,
    /// Leave paths matching this glob out (repeatable; replaces the list).
    #[arg(long = "ignore")]
    ignore_paths: Vec<String>,
    /// Reviews running at once (1–100).
    #[arg(long)]
    max_concurrent: Option<u32>,
    #[command(flatten)]
    common: Common,
}

/// `kilocloud github`.
#[derive(Subcommand)]
pub enum GitHubCommand {
    /// The owner's GitHub App installations.
    Installations {
        #[command(flatten)]
        common: Common,
    },
    /// Claim an installation of the app for the owner (its id is in the app's setup URL).
    Claim {
        /// Installation id.
        installation_id: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Give an installation up.
    Release {
        /// Installation id.
        installation_id: u64,
        #[command(flatten)]
        common: Common,
    },
}

fn read_secret(value: String) -> anyhow::Result<String> {
    if value != "-" {
        return Ok(value);
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the secret from stdin")?;
    Ok(line.trim_end().to_owned())
}

fn trigger_body(args: TriggerArgs) -> anyhow::Result<Value> {
    let destination = match (args.chat, args.repo, args.prompt) {
        (Some(template), _, _) => json!({"type": "chat", "messageTemplate": template}),
        (None, Some(repo), Some(prompt)) => {
            let mut d = json!({"type": "cloud_agent", "promptTemplate": prompt,
                "autoCommit": args.auto_commit});
            if repo.starts_with("https://") || repo.starts_with("http://") {
                d["gitUrl"] = json!(repo);
            } else {
                d["githubRepo"] = json!(repo);
            }
            if let Some(mode) = args.mode {
                d["mode"] = json!(mode);
            }
            if let Some(model) = args.model {
                d["model"] = json!(model);
            }
            d
        }
        _ => anyhow::bail!("give --repo and --prompt, or --chat"),
    };
    let activation = match args.cron {
        Some(cron) => json!({"type": "schedule", "cron": cron, "timezone": args.timezone}),
        None => {
            let auth = match (args.auth_header, args.secret) {
                (Some(header), Some(secret)) => json!({
                    "kind": if args.hmac { "hmac" } else { "header" },
                    "header": header,
                    "secret": read_secret(secret)?,
                }),
                _ => Value::Null,
            };
            json!({"type": "webhook", "auth": auth})
        }
    };
    Ok(json!({"id": args.id, "destination": destination, "activation": activation}))
}

fn print_trigger(t: &Value) {
    println!("trigger     {}", s(&t["id"]));
    println!("owner       {}", s(&t["owner"]));
    println!("active      {}", s(&t["active"]));
    let d = &t["destination"];
    match d["type"].as_str() {
        Some("chat") => println!("destination chat message: {}", s(&d["messageTemplate"])),
        _ => println!(
            "destination session on {} ({})",
            s(if d["githubRepo"].is_null() {
                &d["gitUrl"]
            } else {
                &d["githubRepo"]
            }),
            s(&d["mode"])
        ),
    }
    match t["activationType"].as_str() {
        Some("schedule") => println!(
            "schedule    {} {} (next {})",
            s(&t["cron"]),
            s(&t["timezone"]),
            time(&t["nextFireAt"])
        ),
        _ => println!(
            "webhook     POST <server>{} (auth: {})",
            s(&t["inboundPath"]),
            s(&t["authKind"])
        ),
    }
}

/// Runs one `kilocloud trigger` command.
pub async fn trigger(command: TriggerCommand) -> anyhow::Result<()> {
    match command {
        TriggerCommand::Create(args) => {
            let common = args.common.clone();
            let body = trigger_body(*args)?;
            let t = client(&common)?
                .call(Method::POST, "/api/triggers", Some(body))
                .await?;
            if common.json {
                return print_json(&t);
            }
            print_trigger(&t);
            Ok(())
        }
        TriggerCommand::List { common } => {
            let list = client(&common)?
                .call(Method::GET, "/api/triggers", None)
                .await?;
            if common.json {
                return print_json(&list);
            }
            let rows = list
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    vec![
                        s(&t["id"]),
                        s(&t["activationType"]),
                        s(&t["destination"]["type"]),
                        s(&t["active"]),
                        time(&t["createdAt"]),
                    ]
                })
                .collect();
            table(
                &["TRIGGER", "ACTIVATION", "DESTINATION", "ACTIVE", "CREATED"],
                rows,
            );
            Ok(())
        }
        TriggerCommand::Show { id, common } => {
            let t = client(&common)?
                .call(Method::GET, &format!("/api/triggers/{id}"), None)
                .await?;
            if common.json {
                return print_json(&t);
            }
            print_trigger(&t);
            Ok(())
        }
        TriggerCommand::Delete { id, common } => {
            client(&common)?
                .call(Method::DELETE, &format!("/api/triggers/{id}"), None)
                .await?;
            eprintln!("Deleted trigger {id}");
            Ok(())
        }
        TriggerCommand::Requests { id, limit, common } => {
            let list = client(&common)?
                .call(
                    Method::GET,
                    &format!("/api/triggers/{id}/requests?limit={limit}"),
                    None,
                )
                .await?;
            if common.json {
                return print_json(&list);
            }
            let rows = list
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        s(&r["id"]),
                        time(&r["receivedAt"]),
                        s(&r["method"]),
                        s(&r["status"]),
                        s(&r["sessionId"]),
                        s(&r["error"]),
                    ]
                })
                .collect();
            table(
                &[
                    "REQUEST", "RECEIVED", "METHOD", "STATUS", "SESSION", "ERROR",
                ],
                rows,
            );
            Ok(())
        }
    }
}

/// Runs one `kilocloud review` command.
pub async fn review(command: ReviewCommand) -> anyhow::Result<()> {
    match command {
        ReviewCommand::Config(args) => {
            let client = client(&args.common)?;
            let mut settings = client
                .call(Method::GET, "/api/review/settings", None)
                .await?;
            let mut changed = false;
            let mut set = |key: &str, value: Value| {
                settings[key] = value;
                changed = true;
            };
            if let Some(v) = args.enabled {
                set("enabled", json!(v));
            }
            if !args.repositories.is_empty() {
                set("repositories", json!(args.repositories));
            }
            if args.all_repositories {
                set("repositories", json!([]));
            }
            if let Some(v) = args.model {
                set("model", json!(v));
            }
            if let Some(v) = args.instructions {
                set("instructions", json!(v));
            }
            if let Some(v) = args.skip_drafts {
                set("skipDrafts", json!(v));
            }
            if !args.ignore_paths.is_empty() {
                set("ignorePaths", json!(args.ignore_paths));
            }
            if let Some(v) = args.max_concurrent {
                set("maxConcurrent", json!(v));
            }
            if changed {
                settings = client
                    .call(Method::PUT, "/api/review/settings", Some(settings))
                    .await?;
            }
            print_json(&settings)
        }
        ReviewCommand::List { common } => {
            let list = client(&common)?
                .call(Method::GET, "/api/reviews", None)
                .await?;
            if common.json {
                return print_json(&list);
            }
            let rows = list
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        s(&r["id"]),
                        format!("{}#{}", s(&r["repo"]), s(&r["number"])),
                        s(&r["status"]),
                        s(&r["commentsPosted"]),
                        time(&r["createdAt"]),
                    ]
                })
                .collect();
            table(
                &["REVIEW", "PULL REQUEST", "STATUS", "COMMENTS", "CREATED"],
                rows,
            );
            Ok(())
        }
        ReviewCommand::Show { id, common } => {
            let r = client(&common)?
                .call(Method::GET, &format!("/api/reviews/{id}"), None)
                .await?;
            if common.json {
                return print_json(&r);
            }
            println!("review       {}", s(&r["id"]));
            println!(
                "pull request {}#{} {}",
                s(&r["repo"]),
                s(&r["number"]),
                s(&r["title"])
            );
            println!("head         {} ({})", s(&r["headSha"]), s(&r["headRef"]));
            println!("status       {}", s(&r["status"]));
            println!("session      {}", s(&r["sessionId"]));
            println!(
                "posted       {} ({} inline comments)",
                s(&r["reviewUrl"]),
                s(&r["commentsPosted"])
            );
            println!("error        {}", s(&r["error"]));
            Ok(())
        }
    }
}

/// Runs one `kilocloud github` command.
pub async fn github(command: GitHubCommand) -> anyhow::Result<()> {
    match command {
        GitHubCommand::Installations { common } => {
            let list = client(&common)?
                .call(Method::GET, "/api/github/installations", None)
                .await?;
            if common.json {
                return print_json(&list);
            }
            let rows = list
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| {
                    vec![
                        s(&i["id"]),
                        s(&i["accountLogin"]),
                        s(&i["accountType"]),
                        if i["suspended"] == true {
                            "suspended".into()
                        } else if i["deleted"] == true {
                            "uninstalled".into()
                        } else {
                            "active".into()
                        },
                    ]
                })
                .collect();
            table(&["INSTALLATION", "ACCOUNT", "TYPE", "STATE"], rows);
            Ok(())
        }
        GitHubCommand::Claim {
            installation_id,
            common,
        } => {
            let i = client(&common)?
                .call(
                    Method::POST,
                    "/api/github/installations",
                    Some(json!({"installationId": installation_id})),
                )
                .await?;
            if common.json {
                return print_json(&i);
            }
            eprintln!(
                "Claimed installation {} on {}",
                s(&i["id"]),
                s(&i["accountLogin"])
            );
            Ok(())
        }
        GitHubCommand::Release {
            installation_id,
            common,
        } => {
            client(&common)?
                .call(
                    Method::DELETE,
                    &format!("/api/github/installations/{installation_id}"),
                    None,
                )
                .await?;
            eprintln!("Released installation {installation_id}");
            Ok(())
        }
    }
}
