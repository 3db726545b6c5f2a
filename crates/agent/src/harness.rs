//! Agent harnesses. The built-in one ([`run_builtin`]) is a tool-calling loop against our own
//! gateway's OpenAI Chat Completions API, with the session owner's credentials: tools read,
//! write and edit files, list and search the workspace, run commands, and finish with a
//! summary. Every tool runs inside the session's sandbox (file tools too, so a symlink the
//! agent planted cannot make the host read or write outside the workspace). The external one
//! ([`run_external`]) runs any OpenAI-compatible agent CLI in the sandbox with
//! `OPENAI_BASE_URL`/`OPENAI_API_KEY` pointing at the gateway, turning its output lines into
//! events. The `kilo` one ([`run_kilo`]) runs the official Kilo Code CLI (`kilo run`) in the
//! sandbox, as the reference's Cloud Agent does, its model calls going to our gateway.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::runner::{Emitter, Stopped};
use crate::sandbox::{ExecRequest, SandboxProvider, SessionMount};
use crate::session::Mode;

/// `agent.harness`: which harness runs executions and its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HarnessConfig {
    /// `builtin` (default) or `external`.
    pub kind: HarnessKind,
    /// Most model calls of one execution (built-in). Default 50.
    pub max_steps: u32,
    /// Default and largest time limit of one `run_command`, ms. Default 120,000.
    pub command_timeout_ms: u64,
    /// Most bytes of a command's output (each of stdout and stderr) given back to the model.
    /// Default 65,536.
    pub output_cap_bytes: usize,
    /// Timeout of one model call, ms. Default 300,000.
    pub model_timeout_ms: u64,
    /// The external CLI's command line; `{prompt}`, `{model}` and `{mode}` are replaced in each
    /// argument. Example: `["my-agent", "--model", "{model}", "--prompt", "{prompt}"]`.
    pub external_command: Vec<String>,
    /// Time limit of one external CLI run, ms. Default 1,200,000 (the reference's 20 min).
    /// Also the `kilo` harness's.
    pub external_timeout_ms: u64,
    /// The `kilo` harness: the host path of the Kilo Code CLI's native binary
    /// (`…/node_modules/@kilocode/cli-linux-x64/bin/kilo`, as `scripts/install-kilo-cli`
    /// installs and prints it). Its directory is mounted read-only in the sandbox. Default
    /// empty.
    pub kilo_path: String,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        Self {
            kind: HarnessKind::Builtin,
            max_steps: 50,
            command_timeout_ms: 120_000,
            output_cap_bytes: 64 * 1024,
            model_timeout_ms: 300_000,
            external_command: Vec::new(),
            external_timeout_ms: 1_200_000,
            kilo_path: String::new(),
        }
    }
}

/// Which harness runs executions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HarnessKind {
    /// The built-in tool-calling loop.
    #[default]
    Builtin,
    /// An external agent CLI (`external_command`).
    External,
    /// The Kilo Code CLI (`kilo_path`).
    Kilo,
}

/// How the harness reaches the gateway.
#[derive(Debug, Clone)]
pub struct GatewayAccess {
    /// Base URL of the OpenAI-compatible API, e.g. `http://127.0.0.1:8787/api/gateway/v1`.
    pub base_url: String,
    /// A credential of the session's owner.
    pub token: kilocloud_identity::secret::Secret,
    /// The organization the session belongs to (sent as `X-KiloCode-OrganizationId`).
    pub org: Option<uuid::Uuid>,
    /// For the external harness: the gateway's address on the host, forwarded into the
    /// sandbox (where `base_url` points at the forward).
    pub forward: Option<std::net::SocketAddr>,
}

/// Everything one execution's harness needs.
pub struct Turn<'a> {
    /// The sandbox provider.
    pub sandbox: &'a dyn SandboxProvider,
    /// The session's directories.
    pub mount: &'a SessionMount,
    /// Environment for commands (user variables and secrets).
    pub env: &'a [(String, String)],
    /// Set when the execution is interrupted.
    pub cancel: &'a CancellationToken,
    /// Where events go.
    pub emit: &'a Emitter,
    /// Limits.
    pub config: &'a HarnessConfig,
    /// The gateway.
    pub gateway: &'a GatewayAccess,
    /// Session id (sent as `X-KiloCode-TaskId`).
    pub session_id: &'a str,
    /// Mode.
    pub mode: Mode,
    /// Model id.
    pub model: &'a str,
    /// The prompt of this execution.
    pub prompt: &'a str,
    /// Earlier messages of the session (follow-ups continue the conversation).
    pub history: Vec<Value>,
    /// HTTP client.
    pub http: &'a reqwest::Client,
}

/// How a harness run ended (other than by an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The agent finished; its summary and exit code.
    Finished {
        /// What the agent says it did.
        summary: String,
        /// 0 for the built-in agent; the CLI's status for the external one.
        exit_code: i32,
    },
    /// The interrupt token fired.
    Interrupted,
}

/// A fatal harness failure; the message is shown to the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HarnessError(pub String);

impl From<Stopped> for HarnessError {
    fn from(s: Stopped) -> Self {
        HarnessError(s.to_string())
    }
}

/// Messages a run added, as items for the history.
pub type NewMessages = Vec<Value>;

const SYSTEM_PROMPT: &str = "You are Kilo Code, an autonomous coding agent working in a git \
repository checked out in your current working directory. Use the tools to inspect and change \
the code and to run commands (tests, builds). Paths are relative to the repository root. Do \
not commit: the platform commits your changes. When the task is done, call `finish` with a \
short summary of what you changed.";

const READ_ONLY_NOTE: &str = " You are in a read-only mode: you can read, list and search, but \
not write files or run commands. Answer or plan, then call `finish`.";

fn tool(name: &str, description: &str, parameters: Value) -> Value {
    json!({"type": "function", "function": {"name": name, "description": description, "parameters": parameters}})
}

fn tools(mode: Mode) -> Vec<Value> {
    let mut tools = vec![
        tool(
            "read_file",
            "Read a text file. Returns its lines numbered from 1.",
            json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "offset": {"type": "integer", "description": "first line, from 1"},
                "limit": {"type": "integer", "description": "most lines"}
            }, "required": ["path"]}),
        ),
        tool(
            "list_files",
            "List files under a directory (recursively, .git excluded), optionally filtered by a glob such as `**/*.rs`.",
            json!({"type": "object", "properties": {
                "path": {"type": "string", "description": "default ."},
                "glob": {"type": "string"}
            }}),
        ),
        tool(
            "search",
            "Search file contents with an extended regular expression; returns file:line:text.",
            json!({"type": "object", "properties": {
                "pattern": {"type": "string"},
                "path": {"type": "string", "description": "default ."}
            }, "required": ["pattern"]}),
        ),
        tool(
            "finish",
            "End the task with a summary of what was done.",
            json!({"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}),
        ),
    ];
    if mode.writes() {
        tools.extend([
            tool(
                "write_file",
                "Create or overwrite a file with the given content (parent directories are created).",
                json!({"type": "object", "properties": {
                    "path": {"type": "string"}, "content": {"type": "string"}
                }, "required": ["path", "content"]}),
            ),
            tool(
                "edit_file",
                "Replace exactly one occurrence of `old` with `new` in a file.",
                json!({"type": "object", "properties": {
                    "path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}
                }, "required": ["path", "old", "new"]}),
            ),
            tool(
                "run_command",
                "Run a shell command in the repository (no network). Returns exit code and output.",
                json!({"type": "object", "properties": {
                    "command": {"type": "string"},
                    "timeout_seconds": {"type": "integer"}
                }, "required": ["command"]}),
            ),
        ]);
    }
    tools
}

/// Runs the built-in agent to completion, interruption, the step limit or a fatal error.
/// Returns the outcome and the messages it added to the history.
///
/// The messages keep OpenAI's tool-call pairing (every assistant message with `tool_calls` is
/// followed by a `tool` message for each call): a call that an interrupt or a failure left
/// unanswered gets a synthetic result saying so ([`INTERRUPTED_TOOL_RESULT`],
/// [`FAILED_TOOL_RESULT`]), so a follow-up can continue the conversation.
pub async fn run_builtin(turn: Turn<'_>) -> (Result<Outcome, HarnessError>, NewMessages) {
    let mut added: NewMessages = Vec::new();
    let outcome = builtin_loop(&turn, &mut added).await;
    let note = match &outcome {
        Ok(Outcome::Interrupted) => INTERRUPTED_TOOL_RESULT,
        _ => FAILED_TOOL_RESULT,
    };
    pair_tool_calls(&mut added, note);
    (outcome, added)
}

/// The result recorded for a tool call an interrupt stopped or that never ran because of one.
pub const INTERRUPTED_TOOL_RESULT: &str =
    "interrupted by user: this tool call was stopped before it finished";

/// The result recorded for a tool call that never finished because the execution failed.
pub const FAILED_TOOL_RESULT: &str = "not run: the execution failed before this tool call finished";

/// Restores OpenAI's tool-call pairing in `messages` (Chat Completions messages): after each
/// assistant message with `tool_calls`, adds a `tool` message with `note` for every call not
/// answered in the run of `tool` messages that follows it, and drops `tool` messages that
/// answer no call of that assistant message. Messages already paired are left as they are.
pub fn pair_tool_calls(messages: &mut Vec<Value>, note: &str) {
    let mut paired = Vec::with_capacity(messages.len());
    // The ids of the last assistant message's calls not answered yet.
    let mut open: Vec<String> = Vec::new();
    let close = |open: &mut Vec<String>, paired: &mut Vec<Value>| {
        for id in open.drain(..) {
            paired.push(json!({"role": "tool", "tool_call_id": id, "content": note}));
        }
    };
    for message in messages.drain(..) {
        if message["role"] == "tool" {
            let id = message["tool_call_id"].as_str().unwrap_or_default();
            if let Some(at) = open.iter().position(|x| x == id) {
                open.remove(at);
                paired.push(message);
            }
            continue;
        }
        close(&mut open, &mut paired);
        if message["role"] == "assistant"
            && let Some(calls) = message["tool_calls"].as_array()
        {
            open = calls
                .iter()
                .map(|c| c["id"].as_str().unwrap_or_default().to_owned())
                .collect();
        }
        paired.push(message);
    }
    close(&mut open, &mut paired);
    *messages = paired;
}

async fn builtin_loop(turn: &Turn<'_>, added: &mut NewMessages) -> Result<Outcome, HarnessError> {
    let mut system = SYSTEM_PROMPT.to_owned();
    if !turn.mode.writes() {
        system.push_str(READ_ONLY_NOTE);
    }
    let mut messages = vec![json!({"role": "system", "content": system})];
    // A history recorded before tool calls were closed on interrupts may hold unanswered calls.
    let mut history = turn.history.clone();
    pair_tool_calls(&mut history, INTERRUPTED_TOOL_RESULT);
    messages.extend(history);
    let user = json!({"role": "user", "content": turn.prompt});
    messages.push(user.clone());
    added.push(user);
    let tools = tools(turn.mode);
    for step in 1..=turn.config.max_steps {
        if turn.cancel.is_cancelled() {
            return Ok(Outcome::Interrupted);
        }
        let reply = tokio::select! {
            reply = chat(turn, &messages, &tools) => reply?,
            () = turn.cancel.cancelled() => return Ok(Outcome::Interrupted),
        };
        let message = reply["choices"][0]["message"].clone();
        let content = message["content"].as_str().unwrap_or_default().to_owned();
        let calls = message["tool_calls"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut assistant = json!({"role": "assistant", "content": message["content"].clone()});
        if !calls.is_empty() {
            assistant["tool_calls"] = Value::Array(calls.clone());
        }
        messages.push(assistant.clone());
        added.push(assistant);
        turn.emit
            .emit(
                "agent",
                json!({"kind": "message", "step": step, "role": "assistant", "content": content,
                       "usage": reply["usage"].clone()}),
            )
            .await?;
        if calls.is_empty() {
            return Ok(Outcome::Finished {
                summary: content,
                exit_code: 0,
            });
        }
        let mut finished = None;
        for call in calls {
            let id = call["id"].as_str().unwrap_or_default().to_owned();
            let name = call["function"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let raw_args = call["function"]["arguments"].as_str().unwrap_or("{}");
            let args: Value = serde_json::from_str(raw_args).unwrap_or(Value::Null);
            turn.emit
                .emit(
                    "agent",
                    json!({"kind": "tool_call", "id": id, "name": name, "arguments": args}),
                )
                .await?;
            let (ok, output) = if args.is_object() {
                match run_tool(turn, &name, &args).await {
                    Ok(ToolResult::Finish(summary)) => {
                        finished = Some(summary);
                        (true, "finished".to_owned())
                    }
                    Ok(ToolResult::Output(ok, text)) => (ok, text),
                    Err(ToolStop::Interrupted) => return Ok(Outcome::Interrupted),
                    Err(ToolStop::Stopped(s)) => return Err(s.into()),
                    Err(ToolStop::Sandbox(e)) => {
                        return Err(HarnessError(format!("sandbox failure: {e}")));
                    }
                }
            } else {
                (
                    false,
                    format!("arguments are not a JSON object: {raw_args}"),
                )
            };
            // Masked before it is cut for the event and before the model sees it.
            let output = turn.emit.mask().text(&output).into_owned();
            turn.emit
                .emit(
                    "agent",
                    json!({"kind": "tool_result", "id": id, "name": name, "ok": ok,
                           "output": preview(&output, 4096)}),
                )
                .await?;
            let result = json!({"role": "tool", "tool_call_id": id, "content": output});
            messages.push(result.clone());
            added.push(result);
        }
        if let Some(summary) = finished {
            return Ok(Outcome::Finished {
                summary,
                exit_code: 0,
            });
        }
    }
    Err(HarnessError(format!(
        "the agent reached the step limit ({}) without finishing",
        turn.config.max_steps
    )))
}

/// At most `max` bytes of `text` (cut at a character boundary), marked when cut.
fn preview(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} bytes]", &text[..end], text.len())
}

async fn chat(turn: &Turn<'_>, messages: &[Value], tools: &[Value]) -> Result<Value, HarnessError> {
    let url = format!(
        "{}/chat/completions",
        turn.gateway.base_url.trim_end_matches('/')
    );
    let mut request = turn
        .http
        .post(&url)
        .bearer_auth(turn.gateway.token.expose())
        .header("x-kilocode-mode", turn.mode.as_str())
        .header("x-kilocode-feature", "cloud-agent")
        .header("x-kilocode-taskid", turn.session_id)
        .timeout(Duration::from_millis(turn.config.model_timeout_ms))
        .json(&json!({"model": turn.model, "messages": messages, "tools": tools, "tool_choice": "auto"}));
    if let Some(org) = turn.gateway.org {
        request = request.header("x-kilocode-organizationid", org.to_string());
    }
    let response = request
        .send()
        .await
        .map_err(|e| HarnessError(format!("cannot reach the model gateway: {e}")))?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| {
        HarnessError(format!(
            "the model gateway answered {status} with a malformed body: {e}"
        ))
    })?;
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        return Err(HarnessError(format!(
            "the model call failed ({status}): {message}"
        )));
    }
    if !body["choices"][0]["message"].is_object() {
        return Err(HarnessError("the model answered without a message".into()));
    }
    Ok(body)
}

enum ToolResult {
    Finish(String),
    Output(bool, String),
}

enum ToolStop {
    Interrupted,
    /// Events could not be recorded (the execution ended meanwhile, or storage failed).
    Stopped(Stopped),
    Sandbox(crate::sandbox::SandboxError),
}

/// A workspace-relative path, refused when absolute or climbing out with `..` (inside the
/// sandbox nothing else is reachable anyway; this keeps the agent's view coherent).
fn rel_path(args: &Value, key: &str, default: Option<&str>) -> Result<String, String> {
    let path = args[key]
        .as_str()
        .or(default)
        .ok_or(format!("`{key}` is required"))?;
    let trimmed = path.trim().trim_start_matches("./");
    if trimmed.starts_with('/') || trimmed.split('/').any(|p| p == "..") {
        return Err(format!("`{path}`: use a path inside the repository"));
    }
    Ok(if trimmed.is_empty() {
        ".".into()
    } else {
        trimmed.to_owned()
    })
}

async fn run_tool(turn: &Turn<'_>, name: &str, args: &Value) -> Result<ToolResult, ToolStop> {
    let writes = turn.mode.writes();
    let text = |ok: bool, s: String| Ok(ToolResult::Output(ok, s));
    macro_rules! path {
        ($key:expr, $default:expr) => {
            match rel_path(args, $key, $default) {
                Ok(p) => p,
                Err(e) => return text(false, e),
            }
        };
    }
    let cap = turn.config.output_cap_bytes;
    match name {
        "finish" => Ok(ToolResult::Finish(
            args["summary"].as_str().unwrap_or_default().to_owned(),
        )),
        "read_file" => {
            let path = path!("path", None);
            let out = exec(
                turn,
                file_tool(vec!["cat".into(), "--".into(), path], None, cap),
            )
            .await?;
            if !out.success() {
                return text(false, out.combined_text());
            }
            let content = String::from_utf8_lossy(&out.stdout);
            let offset = args["offset"].as_u64().unwrap_or(1).max(1) as usize;
            let limit = args["limit"].as_u64().map_or(usize::MAX, |l| l as usize);
            let mut numbered: String = content
                .lines()
                .enumerate()
                .skip(offset - 1)
                .take(limit)
                .map(|(i, l)| format!("{:>5}\t{l}\n", i + 1))
                .collect();
            if out.truncated {
                numbered.push_str("[file truncated]\n");
            }
            text(true, numbered)
        }
        "list_files" => {
            let path = path!("path", Some("."));
            let out = exec(
                turn,
                file_tool(
                    [
                        "find", &path, "-path", "*/.git", "-prune", "-o", "-type", "f", "-print",
                    ]
                    .map(String::from)
                    .to_vec(),
                    None,
                    cap,
                ),
            )
            .await?;
            if !out.success() {
                return text(false, out.combined_text());
            }
            let listing = String::from_utf8_lossy(&out.stdout);
            let files = listing.lines().map(|l| l.trim_start_matches("./"));
            let files: Vec<&str> = match args["glob"].as_str() {
                Some(glob) => match globset::Glob::new(glob) {
                    Ok(g) => {
                        let m = g.compile_matcher();
                        files.filter(|f| m.is_match(f)).collect()
                    }
                    Err(e) => return text(false, format!("bad glob: {e}")),
                },
                None => files.collect(),
            };
            text(true, files.join("\n"))
        }
        "search" => {
            let path = path!("path", Some("."));
            let Some(pattern) = args["pattern"].as_str() else {
                return text(false, "`pattern` is required".into());
            };
            let out = exec(
                turn,
                file_tool(
                    vec![
                        "grep".into(),
                        "-rnIE".into(),
                        "--exclude-dir=.git".into(),
                        "-e".into(),
                        pattern.into(),
                        "--".into(),
                        path,
                    ],
                    None,
                    cap,
                ),
            )
            .await?;
            // grep exits 1 when nothing matched.
            match out.exit_code {
                Some(0) => text(true, out.combined_text()),
                Some(1) => text(true, "no matches".into()),
                _ => text(false, out.combined_text()),
            }
        }
        "write_file" | "edit_file" | "run_command" if !writes => text(
            false,
            format!("`{name}` is not available in {} mode", turn.mode.as_str()),
        ),
        "write_file" => {
            let path = path!("path", None);
            let content = args["content"].as_str().unwrap_or_default();
            write(turn, &path, content).await
        }
        "edit_file" => {
            let path = path!("path", None);
            let (Some(old), Some(new)) = (args["old"].as_str(), args["new"].as_str()) else {
                return text(false, "`old` and `new` are required".into());
            };
            let out = exec(
                turn,
                file_tool(
                    vec!["cat".into(), "--".into(), path.clone()],
                    None,
                    16 << 20,
                ),
            )
            .await?;
            if !out.success() {
                return text(false, out.combined_text());
            }
            let content = String::from_utf8_lossy(&out.stdout);
            match content.matches(old).count() {
                1 => write(turn, &path, &content.replacen(old, new, 1)).await,
                0 => text(false, format!("`old` does not occur in {path}")),
                n => text(
                    false,
                    format!("`old` occurs {n} times in {path}; make it unique"),
                ),
            }
        }
        "run_command" => {
            let Some(command) = args["command"].as_str() else {
                return text(false, "`command` is required".into());
            };
            let limit = turn.config.command_timeout_ms;
            let timeout = args["timeout_seconds"]
                .as_u64()
                .map_or(limit, |s| (s * 1000).min(limit));
            turn.emit
                .emit(
                    "status",
                    json!({"message": format!("running: {}", preview(command, 200))}),
                )
                .await
                .map_err(ToolStop::Stopped)?;
            let request = ExecRequest {
                env: turn.env.to_vec(),
                ..ExecRequest::shell(command, Duration::from_millis(timeout), cap)
            };
            let out = exec(turn, request).await?;
            let combined = turn.emit.mask().text(&out.combined_text()).into_owned();
            turn.emit
                .emit(
                    "output",
                    json!({"command": command, "exitCode": out.exit_code, "output": preview(&combined, 16 * 1024)}),
                )
                .await
                .map_err(ToolStop::Stopped)?;
            let status = match out.exit_code {
                Some(code) => format!("exit code {code}"),
                None => "killed".into(),
            };
            text(out.success(), format!("{status}\n{combined}"))
        }
        other => text(false, format!("unknown tool `{other}`")),
    }
}

async fn write(turn: &Turn<'_>, path: &str, content: &str) -> Result<ToolResult, ToolStop> {
    let script = "mkdir -p -- \"$(dirname -- \"$1\")\" && cat > \"$1\"";
    let argv = ["sh", "-c", script, "sh", path].map(String::from).to_vec();
    let out = exec(
        turn,
        file_tool(argv, Some(content.as_bytes().to_vec()), 4096),
    )
    .await?;
    Ok(if out.success() {
        ToolResult::Output(true, format!("wrote {} bytes to {path}", content.len()))
    } else {
        ToolResult::Output(false, out.combined_text())
    })
}

/// A file tool's command: `argv` with `stdin`, a 60 s limit and `cap` bytes of output.
fn file_tool(argv: Vec<String>, stdin: Option<Vec<u8>>, cap: usize) -> ExecRequest {
    ExecRequest {
        argv,
        env: Vec::new(),
        stdin,
        cwd: None,
        timeout: Duration::from_secs(60),
        output_cap: cap,
        forward: None,
        ro_binds: Vec::new(),
    }
}

/// Runs one tool's command in the session's sandbox; an interrupt that killed it stops the
/// tool.
async fn exec(
    turn: &Turn<'_>,
    request: ExecRequest,
) -> Result<crate::sandbox::ExecOutput, ToolStop> {
    let out = turn
        .sandbox
        .exec(turn.mount, request, turn.cancel)
        .await
        .map_err(ToolStop::Sandbox)?;
    if out.cancelled {
        return Err(ToolStop::Interrupted);
    }
    Ok(out)
}

/// Runs the external agent CLI once in the sandbox with the gateway in its environment; each
/// line it prints becomes an `output` event (a JSON line is passed through as the event's
/// `data`). Its last non-empty line is the summary; exit code 0 completes the execution,
/// anything else fails it.
///
/// The sandbox has no network: the gateway's address is forwarded into it
/// ([`crate::sandbox::ExecRequest::forward`]) and `gateway.base_url` is the URL inside.
pub async fn run_external(turn: Turn<'_>) -> (Result<Outcome, HarnessError>, NewMessages) {
    let result = external(&turn).await;
    conversation(&turn, result)
}

/// The messages a run of a CLI harness adds to the session: the prompt, and its summary
/// when it finished.
fn conversation(
    turn: &Turn<'_>,
    result: Result<Outcome, HarnessError>,
) -> (Result<Outcome, HarnessError>, NewMessages) {
    let user = json!({"role": "user", "content": turn.prompt});
    let mut added = vec![user];
    if let Ok(Outcome::Finished { summary, .. }) = &result {
        added.push(json!({"role": "assistant", "content": summary}));
    }
    (result, added)
}

async fn external(turn: &Turn<'_>) -> Result<Outcome, HarnessError> {
    if turn.config.external_command.is_empty() {
        return Err(HarnessError(
            "agent.harness.kind is `external` but agent.harness.external_command is empty".into(),
        ));
    }
    let argv: Vec<String> = turn
        .config
        .external_command
        .iter()
        .map(|a| {
            a.replace("{prompt}", turn.prompt)
                .replace("{model}", turn.model)
                .replace("{mode}", turn.mode.as_str())
        })
        .collect();
    let mut env = turn.env.to_vec();
    env.extend([
        ("OPENAI_BASE_URL".to_owned(), turn.gateway.base_url.clone()),
        (
            "OPENAI_API_KEY".to_owned(),
            turn.gateway.token.expose().to_owned(),
        ),
        ("KILO_MODEL".to_owned(), turn.model.to_owned()),
        ("KILO_MODE".to_owned(), turn.mode.as_str().to_owned()),
        ("SESSION_ID".to_owned(), turn.session_id.to_owned()),
    ]);
    if let Some(org) = turn.gateway.org {
        env.push(("KILOCODE_ORGANIZATION_ID".into(), org.to_string()));
    }
    run_cli(turn, argv, env, Vec::new(), |line, _| Some(line.to_owned())).await
}

/// Runs a CLI harness's command in the sandbox (the gateway forwarded in, `ro_binds`
/// mounted): each output line becomes an `output` event (a JSON object as it is), and the
/// summary is the last `Some` that `summary_of(line, parsed)` gives. Exit code 0 finishes.
async fn run_cli(
    turn: &Turn<'_>,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    ro_binds: Vec<(std::path::PathBuf, String)>,
    summary_of: impl Fn(&str, Option<&Value>) -> Option<String>,
) -> Result<Outcome, HarnessError> {
    let request = ExecRequest {
        argv,
        env,
        stdin: None,
        cwd: None,
        timeout: Duration::from_millis(turn.config.external_timeout_ms),
        output_cap: 4 << 20,
        forward: turn.gateway.forward,
        ro_binds,
    };
    let out = turn
        .sandbox
        .exec(turn.mount, request, turn.cancel)
        .await
        .map_err(|e| HarnessError(format!("sandbox failure: {e}")))?;
    if out.cancelled {
        return Ok(Outcome::Interrupted);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut summary = String::new();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let parsed = serde_json::from_str::<Value>(line)
            .ok()
            .filter(Value::is_object);
        if let Some(s) = summary_of(line, parsed.as_ref()) {
            summary = s;
        }
        let data = parsed.unwrap_or_else(|| json!({"line": line}));
        turn.emit.emit("output", data).await?;
    }
    if !out.stderr.is_empty() {
        turn.emit
            .emit(
                "output",
                json!({"stderr": preview(&turn.emit.mask().text(&String::from_utf8_lossy(&out.stderr)), 16 * 1024)}),
            )
            .await?;
    }
    match out.exit_code {
        Some(0) => Ok(Outcome::Finished {
            summary,
            exit_code: 0,
        }),
        _ if out.timed_out => Err(HarnessError("the agent CLI ran past its time limit".into())),
        code => Err(HarnessError(format!(
            "the agent CLI failed ({})",
            code.map_or("killed".to_owned(), |c| format!("exit code {c}"))
        ))),
    }
}

/// Where the directory of the Kilo Code CLI's binary is mounted in a `local` sandbox.
pub const KILO_DIR_INSIDE: &str = "/kilo-cli";

/// Runs the Kilo Code CLI once in the sandbox: `kilo run --auto --format json --model
/// kilo/<model> --agent <code|plan|ask> <prompt>`, with `KILO_API_URL` at the gateway's
/// forward (its model catalog and chat calls are ours, with the owner's per-execution
/// credential as `KILO_API_KEY`), telemetry, auto-update, session ingest and snapshots off,
/// and the organization as `KILO_ORG_ID`. Its JSON events become `output` events; the summary
/// is the text of its last `text` part. Exit code 0 completes the execution.
///
/// Errors: a [`HarnessError`] when `agent.harness.kilo_path` is empty or not a file, when the
/// CLI fails (its exit code), or runs past `external_timeout_ms`.
pub async fn run_kilo(turn: Turn<'_>) -> (Result<Outcome, HarnessError>, NewMessages) {
    let result = kilo(&turn).await;
    conversation(&turn, result)
}

async fn kilo(turn: &Turn<'_>) -> Result<Outcome, HarnessError> {
    let path = std::path::Path::new(&turn.config.kilo_path);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(HarnessError(
            "agent.harness.kind is `kilo` but agent.harness.kilo_path is empty: install the \
             Kilo Code CLI with scripts/install-kilo-cli and set kilo_path to the binary it \
             prints"
                .into(),
        ));
    };
    if !path.is_file() {
        return Err(HarnessError(format!(
            "agent.harness.kilo_path {} is not a file (install the Kilo Code CLI with \
             scripts/install-kilo-cli)",
            path.display()
        )));
    }
    // A `local` sandbox sees only what is mounted; the `process` provider runs on the host.
    let (program, ro_binds) = if turn.sandbox.kind() == "local" {
        (
            format!("{KILO_DIR_INSIDE}/{}", name.to_string_lossy()),
            vec![(dir.to_path_buf(), KILO_DIR_INSIDE.to_owned())],
        )
    } else {
        (path.display().to_string(), Vec::new())
    };
    let agent = match turn.mode {
        Mode::Code | Mode::Build | Mode::Orchestrator => "code",
        Mode::Plan | Mode::Architect => "plan",
        Mode::Ask => "ask",
    };
    let argv = vec![
        program,
        "run".into(),
        "--auto".into(),
        "--format".into(),
        "json".into(),
        "--model".into(),
        format!("kilo/{}", turn.model),
        "--agent".into(),
        agent.into(),
        turn.prompt.to_owned(),
    ];
    let api = turn
        .gateway
        .base_url
        .trim_end_matches('/')
        .trim_end_matches("/api/gateway/v1")
        .to_owned();
    let mut env = turn.env.to_vec();
    env.extend(
        [
            ("KILO_API_URL", api.as_str()),
            ("KILO_MODELS_URL", api.as_str()),
            ("KILO_API_KEY", turn.gateway.token.expose()),
            ("KILO_TELEMETRY_LEVEL", "off"),
            ("KILO_DISABLE_AUTOUPDATE", "1"),
            ("KILO_DISABLE_SESSION_INGEST", "1"),
            ("KILO_CONFIG_CONTENT", r#"{"snapshot":false}"#),
            ("KILOCODE_FEATURE", "cloud-agent"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    if let Some(org) = turn.gateway.org {
        env.push(("KILO_ORG_ID".into(), org.to_string()));
    }
    run_cli(turn, argv, env, ro_binds, |_, event| {
        let part = &event?["part"];
        (part["type"] == "text")
            .then(|| part["text"].as_str().map(str::to_owned))
            .flatten()
    })
    .await
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    fn asks(ids: &[&str]) -> Value {
        let calls: Vec<Value> = ids
            .iter()
            .map(|id| json!({"id": id, "type": "function", "function": {"name": "f", "arguments": "{}"}}))
            .collect();
        json!({"role": "assistant", "content": null, "tool_calls": calls})
    }

    fn answer(id: &str, content: &str) -> Value {
        json!({"role": "tool", "tool_call_id": id, "content": content})
    }

    #[test]
    fn unanswered_tool_calls_get_a_result_and_orphans_go() {
        let user = json!({"role": "user", "content": "hi"});
        let n = "note";
        for (given, want) in [
            (vec![user.clone()], vec![user.clone()]),
            (
                vec![asks(&["a"]), answer("a", "ok"), user.clone()],
                vec![asks(&["a"]), answer("a", "ok"), user.clone()],
            ),
            (vec![asks(&["a"])], vec![asks(&["a"]), answer("a", n)]),
            (
                vec![asks(&["a", "b"]), answer("a", "ok"), user.clone()],
                vec![
                    asks(&["a", "b"]),
                    answer("a", "ok"),
                    answer("b", n),
                    user.clone(),
                ],
            ),
            (
                vec![user.clone(), answer("x", "orphan"), user.clone()],
                vec![user.clone(), user.clone()],
            ),
            (
                vec![asks(&["a"]), answer("a", "ok"), answer("a", "twice")],
                vec![asks(&["a"]), answer("a", "ok")],
            ),
        ] {
            let mut messages = given.clone();
            super::pair_tool_calls(&mut messages, n);
            assert_eq!(messages, want, "{given:?}");
        }
    }
}
