//! The built-in assistant runtime: the small stand-in for the OpenClaw gateway that each
//! instance runs in its sandbox (reference kilo-cloud.md §2 "Machine boot"). An HTTP and
//! WebSocket chat server whose model calls go to the model gateway (OpenAI-compatible
//! `POST {base}chat/completions`); the conversation lives on the instance's volume.
//!
//! Routes: `GET /health`, `GET /` (the chat page), `GET /ws?token=` (the chat socket) and
//! `GET /api/history` (bearer gateway token).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::Mutex;

/// Default model gateway base URL (reference).
pub const DEFAULT_API_BASE_URL: &str = "https://api.kilo.ai/api/openrouter/";
/// Default model (reference), in the `kilocode/<provider>/<model>` form.
pub const DEFAULT_MODEL: &str = "kilocode/anthropic/claude-opus-4.5";
/// Most messages of the conversation sent to the model (the last ones).
pub const CONTEXT_MESSAGES: usize = 50;
/// Timeout of one model call, s.
const MODEL_TIMEOUT_S: u64 = 300;
/// Longest error body quoted in a "model call failed" message, characters.
const ERROR_BODY_CHARS: usize = 200;
/// Largest WebSocket frame accepted from the client, bytes.
const MAX_FRAME_BYTES: usize = 1 << 20;

/// The runtime's configuration, read from the machine's environment.
#[derive(Clone)]
pub struct RuntimeConfig {
    /// The gateway token clients must present (`OPENCLAW_GATEWAY_TOKEN`).
    pub gateway_token: String,
    /// The model gateway key (`KILOCODE_API_KEY`).
    pub api_key: String,
    /// The model gateway base URL, ending with '/' (e.g. `http://127.0.0.1:8787/api/openrouter/`).
    pub api_base_url: String,
    /// The model, as configured (`kilocode/<provider>/<model>`; the prefix is stripped when sent).
    pub default_model: String,
    /// Home directory (the instance's volume); the conversation lives under `.kiloclaw/`.
    pub home: PathBuf,
}

impl std::fmt::Debug for RuntimeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeConfig")
            .field("gateway_token", &"<redacted>")
            .field("api_key", &"<redacted>")
            .field("api_base_url", &self.api_base_url)
            .field("default_model", &self.default_model)
            .field("home", &self.home)
            .finish()
    }
}

impl RuntimeConfig {
    /// Reads `OPENCLAW_GATEWAY_TOKEN` and `KILOCODE_API_KEY` (required), `KILOCODE_API_BASE_URL`
    /// (default [`DEFAULT_API_BASE_URL`], a trailing '/' added), `KILOCODE_DEFAULT_MODEL`
    /// (default [`DEFAULT_MODEL`]) and `HOME` (default `/root`). Empty values count as unset.
    ///
    /// Errors: the name of a missing required variable.
    pub fn from_env(vars: &BTreeMap<String, String>) -> Result<Self, String> {
        let get = |name: &str| vars.get(name).filter(|v| !v.is_empty()).cloned();
        let required = |name: &str| get(name).ok_or_else(|| format!("{name} is required"));
        let mut api_base_url = get("KILOCODE_API_BASE_URL").unwrap_or(DEFAULT_API_BASE_URL.into());
        if !api_base_url.ends_with('/') {
            api_base_url.push('/');
        }
        Ok(Self {
            gateway_token: required("OPENCLAW_GATEWAY_TOKEN")?,
            api_key: required("KILOCODE_API_KEY")?,
            api_base_url,
            default_model: get("KILOCODE_DEFAULT_MODEL").unwrap_or(DEFAULT_MODEL.into()),
            home: PathBuf::from(get("HOME").unwrap_or("/root".into())),
        })
    }

    /// The model name sent to the gateway: [`Self::default_model`] without `kilocode/`.
    fn gateway_model(&self) -> &str {
        let model = &self.default_model;
        model.strip_prefix("kilocode/").unwrap_or(model)
    }
}

/// One conversation message, as stored (one JSON object a line) and sent to the model.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChatMessage {
    role: String,
    content: String,
}

/// A client → server WebSocket frame.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientFrame {
    Ping {
        #[serde(default)]
        data: Value,
    },
    Chat {
        text: String,
    },
}

/// Shared state of the runtime.
struct Runtime {
    config: RuntimeConfig,
    http: reqwest::Client,
    log: PathBuf,
    conversation: Mutex<Vec<ChatMessage>>,
}

/// The runtime's routes (see the module doc), with the conversation read from
/// `{home}/.kiloclaw/conversation.jsonl` (lines that do not parse are skipped).
pub fn router(config: RuntimeConfig) -> Router {
    let dir = config.home.join(".kiloclaw");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot create the runtime directory");
    }
    let log = dir.join("conversation.jsonl");
    let conversation = match std::fs::read_to_string(&log) {
        Ok(text) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(file = %log.display(), error = %e, "cannot read the conversation");
            Vec::new()
        }
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(MODEL_TIMEOUT_S))
        .build()
        .unwrap_or_default();
    let state = Arc::new(Runtime {
        config,
        http,
        log,
        conversation: Mutex::new(conversation),
    });
    Router::new()
        .route("/health", get(health))
        .route("/", get(|| async { Html(CHAT_PAGE) }))
        .route("/ws", get(ws))
        .route("/api/history", get(history))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not found") })
        .with_state(state)
}

/// Serves [`router`] on `listener` until the server fails.
///
/// Errors: the listener's I/O error.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: RuntimeConfig,
) -> std::io::Result<()> {
    axum::serve(listener, router(config)).await
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok", "service": "kiloclaw-runtime" }))
}

async fn history(State(rt): State<Arc<Runtime>>, headers: HeaderMap) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t)
            if kilocloud_identity::credential::secrets_equal(
                t.as_bytes(),
                rt.config.gateway_token.as_bytes(),
            ) =>
        {
            let messages = rt.conversation.lock().await.clone();
            Json(json!({ "messages": messages })).into_response()
        }
        _ => error(StatusCode::UNAUTHORIZED, "unauthorized"),
    }
}

async fn ws(
    State(rt): State<Arc<Runtime>>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let refusal = match query.get("token") {
        None => Some("gateway token missing"),
        Some(t)
            if !kilocloud_identity::credential::secrets_equal(
                t.as_bytes(),
                rt.config.gateway_token.as_bytes(),
            ) =>
        {
            Some("gateway token mismatch")
        }
        Some(_) => None,
    };
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move {
            match refusal {
                Some(reason) => refuse(socket, reason).await,
                None => converse(rt, socket).await,
            }
        })
}

/// Sends the error frame and closes with 1008 and the same reason.
async fn refuse(mut socket: WebSocket, reason: &'static str) {
    let frame = json!({ "type": "error", "error": { "message": reason } });
    let _ = socket.send(Message::Text(frame.to_string().into())).await;
    let close = CloseFrame {
        code: 1008,
        reason: reason.into(),
    };
    let _ = socket.send(Message::Close(Some(close))).await;
}

async fn converse(rt: Arc<Runtime>, mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        let reply = match message {
            Message::Text(text) => handle_frame(&rt, text.as_str()).await,
            Message::Binary(_) => error_frame("binary frames are not supported"),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if socket
            .send(Message::Text(reply.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
}

fn error_frame(message: &str) -> Value {
    json!({ "type": "error", "error": { "message": message } })
}

async fn handle_frame(rt: &Runtime, text: &str) -> Value {
    match serde_json::from_str::<ClientFrame>(text) {
        Err(e) => error_frame(&format!("invalid frame: {e}")),
        Ok(ClientFrame::Ping { data }) => json!({ "type": "pong", "data": data }),
        Ok(ClientFrame::Chat { text }) if text.trim().is_empty() => error_frame("empty message"),
        Ok(ClientFrame::Chat { text }) => match chat(rt, text).await {
            Ok((text, model)) => json!({ "type": "reply", "text": text, "model": model }),
            Err(message) => error_frame(&message),
        },
    }
}

/// Appends `message` to the conversation and its file (under the conversation lock).
async fn remember(rt: &Runtime, conversation: &mut Vec<ChatMessage>, message: ChatMessage) {
    let mut line = serde_json::to_string(&message).unwrap_or_default();
    line.push('\n');
    let written = async {
        if let Some(dir) = rt.log.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&rt.log)
            .await?;
        file.write_all(line.as_bytes()).await?;
        // A tokio file writes in the background: flush so the line is on disk on return.
        file.flush().await
    };
    if let Err(e) = written.await {
        tracing::warn!(file = %rt.log.display(), error = %e, "cannot append to the conversation");
    }
    conversation.push(message);
}

/// One chat turn: records the user's text, calls the model with the last
/// [`CONTEXT_MESSAGES`] messages, records the reply. Returns (reply text, model).
async fn chat(rt: &Runtime, text: String) -> Result<(String, String), String> {
    let messages = {
        let mut conversation = rt.conversation.lock().await;
        let user = ChatMessage {
            role: "user".into(),
            content: text,
        };
        remember(rt, &mut conversation, user).await;
        let from = conversation.len().saturating_sub(CONTEXT_MESSAGES);
        conversation[from..].to_vec()
    };
    let model = rt.config.gateway_model();
    let url = format!("{}chat/completions", rt.config.api_base_url);
    let body = json!({ "model": model, "messages": messages, "stream": false });
    let response = rt
        .http
        .post(&url)
        .bearer_auth(&rt.config.api_key)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("model call failed: {e}"))?;
    let status = response.status();
    let raw = response.text().await.unwrap_or_default();
    let failed = || {
        let short: String = raw.chars().take(ERROR_BODY_CHARS).collect();
        format!("model call failed: {} {}", status.as_u16(), short.trim())
    };
    if !status.is_success() {
        return Err(failed());
    }
    let parsed: Value = serde_json::from_str(&raw).map_err(|_| failed())?;
    let content = parsed["choices"][0]["message"]["content"]
        .as_str()
        .ok_or_else(failed)?
        .to_string();
    let replied_model = parsed["model"].as_str().unwrap_or(model).to_string();
    let assistant = ChatMessage {
        role: "assistant".into(),
        content: content.clone(),
    };
    remember(rt, &mut *rt.conversation.lock().await, assistant).await;
    Ok((content, replied_model))
}

/// The chat page: self-contained; reads the token from `#token=`, keeps it in sessionStorage
/// and opens the socket relative to the page (it is served behind a proxy prefix).
const CHAT_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>KiloClaw</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{margin:0;font:15px/1.4 system-ui,sans-serif;background:#111;color:#eee;display:flex;flex-direction:column;height:100vh}
header{padding:.6em 1em;background:#222;display:flex;justify-content:space-between}
#log{flex:1;overflow-y:auto;padding:1em}
.m{margin:.4em 0;padding:.5em .8em;border-radius:8px;max-width:80%;white-space:pre-wrap}
.user{background:#2a4d7a;margin-left:auto}.assistant{background:#333}.error{background:#7a2a2a}
form{display:flex;padding:.6em;gap:.5em;background:#222}
input{flex:1;padding:.6em;border-radius:6px;border:0;background:#333;color:#eee}
button{padding:.6em 1.2em;border-radius:6px;border:0;background:#4a7;color:#fff}
</style></head><body>
<header><b>KiloClaw</b><span id="status">connecting…</span></header>
<div id="log"></div>
<form id="f"><input id="t" autocomplete="off" placeholder="Message"><button>Send</button></form>
<script>
const log = document.getElementById('log'), statusEl = document.getElementById('status');
function show(role, text) {
  const d = document.createElement('div'); d.className = 'm ' + role; d.textContent = text;
  log.appendChild(d); log.scrollTop = log.scrollHeight;
}
const fromHash = new URLSearchParams(location.hash.slice(1)).get('token');
if (fromHash) {
  sessionStorage.setItem('kiloclaw-token', fromHash);
  history.replaceState(null, '', location.pathname + location.search);
}
const token = sessionStorage.getItem('kiloclaw-token') || '';
fetch(new URL('api/history', location.href), {headers: {Authorization: 'Bearer ' + token}})
  .then(r => r.ok ? r.json() : {messages: []})
  .then(h => h.messages.forEach(m => show(m.role, m.content))).catch(() => {});
const url = new URL('ws', location.href);
url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
url.hash = ''; url.search = '?token=' + encodeURIComponent(token);
const ws = new WebSocket(url);
ws.onopen = () => statusEl.textContent = 'connected';
ws.onclose = e => statusEl.textContent = 'disconnected' + (e.reason ? ': ' + e.reason : '');
ws.onmessage = e => {
  const f = JSON.parse(e.data);
  if (f.type === 'reply') show('assistant', f.text);
  else if (f.type === 'error') show('error', f.error.message);
};
document.getElementById('f').onsubmit = e => {
  e.preventDefault();
  const t = document.getElementById('t'), text = t.value.trim();
  if (!text || ws.readyState !== 1) return;
  show('user', text); ws.send(JSON.stringify({type: 'chat', text})); t.value = '';
};
</script></body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    type Seen = Arc<std::sync::Mutex<Vec<(String, Value)>>>;

    fn config(home: &std::path::Path, base: &str) -> RuntimeConfig {
        let vars: BTreeMap<String, String> = [
            ("OPENCLAW_GATEWAY_TOKEN", "gw-token"),
            ("KILOCODE_API_KEY", "api-key"),
            ("KILOCODE_API_BASE_URL", base),
            ("HOME", home.to_str().unwrap()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        RuntimeConfig::from_env(&vars).unwrap()
    }

    async fn spawn(app: Router) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    /// A fake chat-completions endpoint recording (authorization, body) of each call.
    async fn fake_gateway(seen: Seen) -> String {
        let app = Router::new().route(
            "/api/openrouter/chat/completions",
            axum::routing::post(move |headers: HeaderMap, Json(body): Json<Value>| async move {
                let auth = headers[header::AUTHORIZATION].to_str().unwrap().to_string();
                seen.lock().unwrap().push((auth, body));
                Json(json!({"choices":[{"message":{"role":"assistant","content":"hi"}}],"model":"m"}))
            }),
        );
        format!("http://{}/api/openrouter", spawn(app).await)
    }

    async fn next_json<S>(ws: &mut S) -> Value
    where
        S: futures::Stream<Item = tokio_tungstenite::tungstenite::Result<WsMessage>> + Unpin,
    {
        match ws.next().await.unwrap().unwrap() {
            WsMessage::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    #[test]
    fn from_env_defaults_and_required() {
        let mut vars = BTreeMap::new();
        vars.insert("KILOCODE_API_KEY".to_string(), "k".to_string());
        let err = RuntimeConfig::from_env(&vars).unwrap_err();
        assert!(err.contains("OPENCLAW_GATEWAY_TOKEN"), "{err}");
        vars.insert("OPENCLAW_GATEWAY_TOKEN".to_string(), "t".to_string());
        let c = RuntimeConfig::from_env(&vars).unwrap();
        assert_eq!(c.api_base_url, DEFAULT_API_BASE_URL);
        assert_eq!(c.gateway_model(), "anthropic/claude-opus-4.5");
        assert_eq!(c.home, PathBuf::from("/root"));
        assert!(!format!("{c:?}").contains("\"k\""));
    }

    #[tokio::test]
    async fn health_and_not_found() {
        let home = tempfile::tempdir().unwrap();
        let addr = spawn(router(config(home.path(), "http://127.0.0.1:1/"))).await;
        let r = reqwest::get(format!("http://{addr}/health")).await.unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body, json!({"status":"ok","service":"kiloclaw-runtime"}));
        let r = reqwest::get(format!("http://{addr}/nope")).await.unwrap();
        assert_eq!(r.status(), 404);
        let page = reqwest::get(format!("http://{addr}/")).await.unwrap();
        assert!(
            page.text()
                .await
                .unwrap()
                .contains("new URL('ws', location.href)")
        );
    }

    #[tokio::test]
    async fn ws_rejects_a_bad_token_and_echoes_pings() {
        let home = tempfile::tempdir().unwrap();
        let addr = spawn(router(config(home.path(), "http://127.0.0.1:1/"))).await;
        let url = format!("ws://{addr}/ws?token=wrong");
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let frame = next_json(&mut ws).await;
        let expected = json!({"type":"error","error":{"message":"gateway token mismatch"}});
        assert_eq!(frame, expected);
        match ws.next().await.unwrap().unwrap() {
            WsMessage::Close(Some(close)) => {
                assert_eq!(u16::from(close.code), 1008);
                assert_eq!(close.reason.as_str(), "gateway token mismatch");
            }
            other => panic!("expected a close frame, got {other:?}"),
        }

        let url = format!("ws://{addr}/ws?token=gw-token");
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let ping = json!({"type":"ping","data":{"n":[1,2]}}).to_string();
        ws.send(WsMessage::Text(ping.into())).await.unwrap();
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type":"pong","data":{"n":[1,2]}})
        );
        ws.send(WsMessage::Text("{oops".into())).await.unwrap();
        assert_eq!(next_json(&mut ws).await["type"], "error");
    }

    #[tokio::test]
    async fn chat_round_trip_persists_across_restarts() {
        let home = tempfile::tempdir().unwrap();
        let seen = Seen::default();
        let base = fake_gateway(seen.clone()).await;
        let addr = spawn(router(config(home.path(), &base))).await;
        let url = format!("ws://{addr}/ws?token=gw-token");
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let chat = json!({"type":"chat","text":"hello"}).to_string();
        ws.send(WsMessage::Text(chat.into())).await.unwrap();
        let reply = next_json(&mut ws).await;
        assert_eq!(reply, json!({"type":"reply","text":"hi","model":"m"}));

        let (auth, body) = seen.lock().unwrap()[0].clone();
        assert_eq!(auth, "Bearer api-key");
        assert_eq!(body["model"], "anthropic/claude-opus-4.5");
        assert_eq!(body["stream"], false);
        assert_eq!(body["messages"], json!([{"role":"user","content":"hello"}]));
        let file = home.path().join(".kiloclaw/conversation.jsonl");
        assert_eq!(std::fs::read_to_string(file).unwrap().lines().count(), 2);

        let addr = spawn(router(config(home.path(), &base))).await;
        let client = reqwest::Client::new();
        let history = format!("http://{addr}/api/history");
        let r = client.get(&history).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = client
            .get(&history)
            .bearer_auth("gw-token")
            .send()
            .await
            .unwrap();
        let body: Value = r.json().await.unwrap();
        let expected =
            json!([{"role":"user","content":"hello"},{"role":"assistant","content":"hi"}]);
        assert_eq!(body["messages"], expected);
    }

    #[tokio::test]
    async fn a_gateway_error_keeps_the_socket_open() {
        let home = tempfile::tempdir().unwrap();
        let app = Router::new().fallback(|| async { (StatusCode::PAYMENT_REQUIRED, "no credits") });
        let base = format!("http://{}/", spawn(app).await);
        let addr = spawn(router(config(home.path(), &base))).await;
        let url = format!("ws://{addr}/ws?token=gw-token");
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let chat = json!({"type":"chat","text":"hello"}).to_string();
        ws.send(WsMessage::Text(chat.into())).await.unwrap();
        let frame = next_json(&mut ws).await;
        assert_eq!(
            frame["error"]["message"],
            "model call failed: 402 no credits"
        );
        ws.send(WsMessage::Text(json!({"type":"ping"}).to_string().into()))
            .await
            .unwrap();
        assert_eq!(next_json(&mut ws).await, json!({"type":"pong","data":null}));
    }
}
