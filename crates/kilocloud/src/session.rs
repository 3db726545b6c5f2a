//! `kilocloud session …`: Cloud Agent sessions from the terminal. `create` prepares and
//! initiates a session, then follows its event stream live (a spinner with the elapsed time
//! while the agent works, tool calls as they happen, the summary and branch at the end);
//! Ctrl-C interrupts the execution and waits for it to stop. `list` and `show` include the
//! Kilo Code CLI's sessions (session ingest); `kilocloud remote list` shows its `kilo remote`
//! connections.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};

use crate::account::{Common, client, print_json, s, table, time};
use crate::client::Client;

/// `kilocloud session`.
#[derive(Subcommand)]
pub enum SessionCommand {
    /// Prepare a session on a repository, start the agent, and follow it live.
    Create(CreateArgs),
    /// The sessions of the owner acted for, newest first: Cloud Agent sessions and Kilo Code
    /// CLI sessions (session ingest), with their source.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// One session: a Cloud Agent session and its executions, or a Kilo Code CLI session
    /// (`ses_…`) and its messages.
    Show {
        /// Session id (`agent_…` or `ses_…`).
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Send a follow-up message (a new execution) and follow it live.
    Send(SendArgs),
    /// Follow a session's events live (replaying from the start, or after --from-id).
    Watch {
        /// Session id.
        id: String,
        /// Replay only events after this id.
        #[arg(long, default_value_t = 0)]
        from_id: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Stop the running execution.
    Interrupt {
        /// Session id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Delete a session, its workspace and its history.
    Delete {
        /// Session id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

/// `kilocloud remote`.
#[derive(Subcommand)]
pub enum RemoteCommand {
    /// The `kilo remote` instances of the owner acted for connected to the server's node,
    /// with their sessions and last heartbeat.
    List {
        #[command(flatten)]
        common: Common,
    },
}

/// Runs one `kilocloud remote` command.
pub async fn remote(command: RemoteCommand) -> anyhow::Result<()> {
    let RemoteCommand::List { common } = command;
    let list = client(&common)?
        .call(Method::GET, "/api/user/cli/connections", None)
        .await?;
    if common.json {
        return print_json(&list);
    }
    let rows = list["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let sessions: Vec<String> = c["sessions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| format!("{} ({})", s(&x["id"]), s(&x["status"])))
                .collect();
            vec![
                s(&c["connectionId"]),
                s(&c["instance"]["name"]),
                s(&c["protocolVersion"]),
                time(&c["lastHeartbeatAt"]),
                sessions.join(", "),
            ]
        })
        .collect();
    table(
        &[
            "CONNECTION",
            "HOST",
            "VERSION",
            "LAST HEARTBEAT",
            "SESSIONS",
        ],
        rows,
    );
    Ok(())
}

/// `kilocloud session create`.
#[derive(Args)]
pub struct CreateArgs {
    /// The repository: an https clone URL, or `owner/repo` on GitHub.
    #[arg(long)]
    repo: String,
    /// What the agent should do.
    #[arg(long)]
    prompt: String,
    /// A token for clone and push (sent as an HTTP header, stored encrypted). `-` reads it
    /// from stdin.
    #[arg(long)]
    token: Option<String>,
    /// Work on this existing remote branch instead of a new `session/<id>`.
    #[arg(long)]
    branch: Option<String>,
    /// An environment variable for the agent's commands, `NAME=VALUE` (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// A secret environment variable, `NAME=VALUE` (repeatable; stored encrypted).
    #[arg(long = "secret", value_name = "NAME=VALUE")]
    secrets: Vec<String>,
    /// A setup command run once after the clone (repeatable, in order).
    #[arg(long = "setup", value_name = "COMMAND")]
    setup: Vec<String>,
    /// plan, code, build, orchestrator, architect or ask. Default code.
    #[arg(long)]
    mode: Option<String>,
    /// Model id. Default: the server's agent.default_model.
    #[arg(long)]
    model: Option<String>,
    /// Commit and push to the session's branch when the agent completes.
    #[arg(long)]
    auto_commit: bool,
    /// POST terminal transitions to this URL.
    #[arg(long)]
    callback_url: Option<String>,
    /// A header of the callback, `Name: value` (repeatable).
    #[arg(long = "callback-header", value_name = "NAME: VALUE")]
    callback_headers: Vec<String>,
    /// Return after starting instead of following the events.
    #[arg(long)]
    no_watch: bool,
    #[command(flatten)]
    common: Common,
}

/// `kilocloud session send`.
#[derive(Args)]
pub struct SendArgs {
    /// Session id.
    id: String,
    /// The message.
    #[arg(long)]
    prompt: String,
    /// Mode; default the session's.
    #[arg(long)]
    mode: Option<String>,
    /// Model; default the session's.
    #[arg(long)]
    model: Option<String>,
    /// Commit and push at completion.
    #[arg(long)]
    auto_commit: bool,
    /// Return after starting instead of following the events.
    #[arg(long)]
    no_watch: bool,
    #[command(flatten)]
    common: Common,
}

fn pairs(
    items: &[String],
    sep: char,
    what: &str,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    items
        .iter()
        .map(|item| {
            let (k, v) = item
                .split_once(sep)
                .with_context(|| format!("{what} `{item}`: expected NAME{sep}VALUE"))?;
            Ok((
                k.trim().to_owned(),
                Value::String(v.trim_start().to_owned()),
            ))
        })
        .collect()
}

/// Runs one `kilocloud session` command.
pub async fn run(command: SessionCommand) -> anyhow::Result<()> {
    match command {
        SessionCommand::Create(args) => create(args).await,
        SessionCommand::List { common } => list(&common).await,
        SessionCommand::Show { id, common } if id.starts_with("ses_") => {
            show_cli(&common, &id).await
        }
        SessionCommand::Show { id, common } => {
            let view = client(&common)?
                .call(Method::GET, &format!("/api/sessions/{id}"), None)
                .await?;
            if common.json {
                return print_json(&view);
            }
            println!("session    {}", s(&view["sessionId"]));
            println!("repository {}", s(&view["repo"]));
            println!(
                "branch     {} (last reported: {})",
                s(&view["branch"]),
                s(&view["lastBranch"])
            );
            println!("mode/model {} / {}", s(&view["mode"]), s(&view["model"]));
            println!("secrets    {}", s(&view["secretCount"]));
            println!(
                "sandbox    {} {}",
                s(&view["sandboxId"]),
                s(&view["workspacePath"])
            );
            let rows = view["executions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    vec![
                        s(&e["executionId"]),
                        s(&e["status"]),
                        time(&e["createdAt"]),
                        s(&e["error"]),
                    ]
                })
                .collect();
            table(&["EXECUTION", "STATUS", "CREATED", "ERROR"], rows);
            Ok(())
        }
        SessionCommand::Send(args) => {
            let client = client(&args.common)?;
            let mut body = json!({"prompt": args.prompt});
            if let Some(mode) = args.mode {
                body["mode"] = json!(mode);
            }
            if let Some(model) = args.model {
                body["model"] = json!(model);
            }
            if args.auto_commit {
                body["autoCommit"] = json!(true);
            }
            let started = client
                .call(
                    Method::POST,
                    &format!("/api/sessions/{}/messages", args.id),
                    Some(body),
                )
                .await?;
            start_output(&client, &args.id, &started, args.no_watch, args.common.json).await
        }
        SessionCommand::Watch {
            id,
            from_id,
            common,
        } => {
            let client = client(&common)?;
            let view = client
                .call(Method::GET, &format!("/api/sessions/{id}"), None)
                .await?;
            let target = view["activeExecutionId"]
                .as_str()
                .or_else(|| view["executions"].as_array()?.last()?["executionId"].as_str())
                .map(str::to_owned);
            watch(&client, &id, target.as_deref(), from_id, common.json).await
        }
        SessionCommand::Interrupt { id, common } => {
            let r = client(&common)?
                .call(Method::POST, &format!("/api/sessions/{id}/interrupt"), None)
                .await?;
            eprintln!("Interrupting {}", s(&r["executionId"]));
            Ok(())
        }
        SessionCommand::Delete { id, common } => {
            client(&common)?
                .call(Method::DELETE, &format!("/api/sessions/{id}"), None)
                .await?;
            eprintln!("Deleted {id}");
            Ok(())
        }
    }
}

/// `session list`: Cloud Agent sessions (`/api/sessions`; none when the Cloud Agent is
/// disabled) and Kilo Code CLI sessions (`/api/session`, session ingest) together, each
/// with its `source` (`cloud-agent` or `cli`), newest first.
async fn list(common: &Common) -> anyhow::Result<()> {
    let client = client(common)?;
    let agent = match client.call(Method::GET, "/api/sessions", None).await {
        Ok(list) => list,
        Err(e) if e.to_string().contains(" agent_disabled:") => json!([]),
        Err(e) => return Err(e),
    };
    let cli = client.call(Method::GET, "/api/session", None).await?;
    let mut all: Vec<Value> = Vec::new();
    for mut x in agent.as_array().cloned().unwrap_or_default() {
        x["source"] = json!("cloud-agent");
        all.push(x);
    }
    for mut x in cli["sessions"].as_array().cloned().unwrap_or_default() {
        x["source"] = json!("cli");
        x["repo"] = x["gitUrl"].clone();
        all.push(x);
    }
    all.sort_by_key(|x| std::cmp::Reverse(x["createdAt"].as_i64().unwrap_or(0)));
    if common.json {
        return print_json(&Value::Array(all));
    }
    let rows = all
        .iter()
        .map(|x| {
            vec![
                s(&x["sessionId"]),
                s(&x["source"]),
                time(&x["createdAt"]),
                s(&x["repo"]),
                s(&x["title"]),
            ]
        })
        .collect();
    table(
        &["SESSION", "SOURCE", "CREATED", "REPOSITORY", "TITLE"],
        rows,
    );
    Ok(())
}

/// `session show ses_…`: a Kilo Code CLI session: its summary and its messages (role and
/// text of each), from the export.
async fn show_cli(common: &Common, id: &str) -> anyhow::Result<()> {
    let client = client(common)?;
    let summary = client
        .call(Method::GET, &format!("/api/session/{id}"), None)
        .await?;
    let export = client
        .call(Method::GET, &format!("/api/session/{id}/export"), None)
        .await?;
    if common.json {
        return print_json(&json!({"session": summary, "export": export}));
    }
    println!("session    {} (cli)", s(&summary["sessionId"]));
    println!("title      {}", s(&summary["title"]));
    println!(
        "repository {} {}",
        s(&summary["gitUrl"]),
        s(&summary["gitBranch"])
    );
    println!(
        "status     {} (closed: {})",
        s(&summary["status"]),
        s(&summary["closeReason"])
    );
    println!("updated    {}", time(&summary["updatedAt"]));
    let rows = export["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let text: Vec<&str> = m["parts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect();
            vec![
                s(&m["info"]["id"]),
                s(&m["info"]["role"]),
                text.join(" ").chars().take(100).collect(),
            ]
        })
        .collect();
    table(&["MESSAGE", "ROLE", "TEXT"], rows);
    Ok(())
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    let client = client(&args.common)?;
    let mut body = json!({
        "prompt": args.prompt,
        "envVars": pairs(&args.env, '=', "--env")?,
        "secrets": pairs(&args.secrets, '=', "--secret")?,
        "setupCommands": args.setup,
        "autoCommit": args.auto_commit,
    });
    if args.repo.contains("://") {
        body["gitUrl"] = json!(args.repo);
    } else {
        body["githubRepo"] = json!(args.repo);
    }
    let token = match args.token.as_deref() {
        Some("-") => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            Some(line.trim().to_owned())
        }
        other => other.map(str::to_owned),
    };
    if let Some(token) = token {
        body["gitToken"] = json!(token);
    }
    if let Some(branch) = args.branch {
        body["upstreamBranch"] = json!(branch);
    }
    if let Some(mode) = args.mode {
        body["mode"] = json!(mode);
    }
    if let Some(model) = args.model {
        body["model"] = json!(model);
    }
    if let Some(url) = args.callback_url {
        body["callbackTarget"] = json!({"url": url, "headers": pairs(&args.callback_headers, ':', "--callback-header")?});
    }
    let spinner = spinner(args.common.json);
    spinner.set_message("cloning the repository and preparing the sandbox");
    let prepared = client.call(Method::POST, "/api/sessions", Some(body)).await;
    spinner.finish_and_clear();
    let prepared = prepared?;
    let id = s(&prepared["sessionId"]);
    if !args.common.json {
        eprintln!("Session {id} on branch {}", s(&prepared["branch"]));
    }
    let started = client
        .call(Method::POST, &format!("/api/sessions/{id}/initiate"), None)
        .await?;
    start_output(&client, &id, &started, args.no_watch, args.common.json).await
}

async fn start_output(
    client: &Client,
    id: &str,
    started: &Value,
    no_watch: bool,
    json: bool,
) -> anyhow::Result<()> {
    if no_watch {
        return if json {
            print_json(started)
        } else {
            println!("{}", s(&started["executionId"]));
            Ok(())
        };
    }
    watch(client, id, started["executionId"].as_str(), 0, json).await
}

fn spinner(hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// Follows the stream until `target` (an execution) ends; with no target, until the replay
/// is done and nothing runs. Returns an error when the execution failed or was interrupted.
async fn watch(
    client: &Client,
    id: &str,
    target: Option<&str>,
    from_id: u64,
    json: bool,
) -> anyhow::Result<()> {
    let ticket = client
        .call(
            Method::POST,
            "/api/tickets",
            Some(json!({"resource": format!("session:{id}")})),
        )
        .await?;
    let mut url = client.ws_url(&format!("/api/sessions/{id}/stream"))?;
    url.query_pairs_mut()
        .append_pair("ticket", &s(&ticket["ticket"]))
        .append_pair("fromId", &from_id.to_string());
    if let Some(org) = client.org() {
        url.query_pairs_mut().append_pair("organizationId", org);
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .context("cannot open the event stream")?;
    let started = Instant::now();
    let bar = spinner(json);
    bar.set_message("waiting for the agent");
    let mut interrupted = false;
    let Some(target) = target else {
        bar.finish_and_clear();
        eprintln!("No execution yet; initiate the session first.");
        return Ok(());
    };
    loop {
        let message = tokio::select! {
            m = ws.next() => m,
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                bar.suspend(|| eprintln!("Interrupting… (the agent stops at its next step)"));
                client.call(Method::POST, &format!("/api/sessions/{id}/interrupt"), None).await.ok();
                continue;
            }
        };
        let Some(message) = message else {
            bar.finish_and_clear();
            anyhow::bail!("the server closed the event stream");
        };
        let message = message.context("event stream failed")?;
        let Ok(text) = message.to_text() else {
            continue;
        };
        let Ok(event) = serde_json::from_str::<Value>(text) else {
            continue;
        };
        if json {
            println!("{text}");
        } else if let Some(line) = render(&event) {
            // Above the spinner (which only draws on a terminal), on stdout.
            bar.suspend(|| println!("{line}"));
        }
        let kind = event["streamEventType"].as_str().unwrap_or_default();
        let data = &event["data"];
        if kind == "agent" && data["kind"] == "tool_call" {
            bar.set_message(format!("running {}", s(&data["name"])));
        } else if kind == "agent" {
            bar.set_message("thinking");
        }
        if event["executionId"].as_str() != Some(target) {
            continue;
        }
        let end = match kind {
            "complete" => Some(Ok(())),
            "interrupted" => Some(Err(anyhow::anyhow!("interrupted: {}", s(&data["reason"])))),
            "error" if data["fatal"] == true => {
                Some(Err(anyhow::anyhow!("failed: {}", s(&data["error"]))))
            }
            _ => None,
        };
        if let Some(result) = end {
            bar.finish_and_clear();
            if !json {
                eprintln!("({:.1} s)", started.elapsed().as_secs_f64());
            }
            let _ = ws.close(None).await;
            return result;
        }
    }
}

/// One line for an event, or `None` for those not shown (heartbeats).
fn render(event: &Value) -> Option<String> {
    let data = &event["data"];
    let first_line = |v: &Value| {
        let text = v
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string());
        let line = text.lines().next().unwrap_or_default().to_owned();
        if line.chars().count() > 120 {
            format!("{}…", line.chars().take(120).collect::<String>())
        } else {
            line
        }
    };
    Some(match event["streamEventType"].as_str()? {
        "started" => format!(
            "▶ started {} ({} / {})",
            s(&event["executionId"]),
            s(&data["mode"]),
            s(&data["model"])
        ),
        "agent" => match data["kind"].as_str()? {
            "message"
                if data["content"]
                    .as_str()
                    .is_some_and(|c| !c.trim().is_empty()) =>
            {
                format!("  {}", s(&data["content"]).trim())
            }
            "tool_call" => format!("→ {} {}", s(&data["name"]), first_line(&data["arguments"])),
            "tool_result" => format!(
                "  {} {}",
                if data["ok"] == true { "✓" } else { "✗" },
                first_line(&data["output"])
            ),
            _ => return None,
        },
        "output" => {
            let text = data["output"]
                .as_str()
                .or(data["line"].as_str())
                .unwrap_or_default();
            text.lines()
                .take(20)
                .map(|l| format!("  │ {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        "status" => format!("· {}", s(&data["message"])),
        "error" => format!("✗ {}", s(&data["error"])),
        "interrupted" => format!("■ interrupted: {}", s(&data["reason"])),
        "complete" => {
            let mut line = format!("✔ completed on branch {}", s(&data["currentBranch"]));
            if let Some(summary) = data["summary"].as_str().filter(|t| !t.is_empty()) {
                line.push_str(&format!("\n  {summary}"));
            }
            line
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn events_render_as_lines() {
        let call = json!({"streamEventType": "agent", "data": {"kind": "tool_call", "name": "read_file", "arguments": {"path": "a"}}});
        assert_eq!(
            super::render(&call).unwrap(),
            "→ read_file {\"path\":\"a\"}"
        );
        let done = json!({"streamEventType": "complete", "data": {"currentBranch": "session/x", "summary": "Did it"}});
        assert_eq!(
            super::render(&done).unwrap(),
            "✔ completed on branch session/x\n  Did it"
        );
        assert!(super::render(&json!({"streamEventType": "heartbeat", "data": {}})).is_none());
        assert!(super::pairs(&["A=1".into()], '=', "--env").unwrap()["A"] == "1");
        assert!(super::pairs(&["A".into()], '=', "--env").is_err());
    }
}
