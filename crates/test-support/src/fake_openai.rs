//! A fake OpenAI-compatible upstream (`POST /v1/chat/completions`, `POST /v1/embeddings`,
//! `GET /v1/models`) on a real
//! loopback socket, speaking the documented wire format: JSON completions, and Server-Sent
//! Events chunks ending in `data: [DONE]` when `stream` is true, with a final usage chunk when
//! `stream_options.include_usage` is set. Replies are scripted in order; with nothing scripted
//! it answers a short completion. Every request is recorded for assertions.
//!
//! Like OpenAI, chat completions enforce the tool-call pairing rule ([`check_tool_pairing`]):
//! a conversation that breaks it gets `400 invalid_request_error` and consumes no scripted
//! reply.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// One scripted reply.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A completion with this text and usage (streamed as chunks when the request streams).
    Text {
        /// The assistant's text; streamed split on spaces.
        content: String,
        /// `usage.prompt_tokens`.
        prompt_tokens: u64,
        /// `usage.completion_tokens`.
        completion_tokens: u64,
        /// `usage.prompt_tokens_details.cached_tokens`.
        cached_tokens: u64,
        /// Pause before each streamed chunk.
        chunk_delay: Duration,
    },
    /// A completion whose message calls `name` with `arguments` (a JSON string).
    ToolCall {
        /// Function name.
        name: String,
        /// Arguments, JSON text.
        arguments: String,
    },
    /// An error status with an OpenAI-style error body.
    Status(u16),
    /// A stream of this text that never sends a usage chunk (a provider ignoring
    /// `stream_options`).
    StreamWithoutUsage(String),
    /// A stream that sends one chunk with this text and then never ends.
    StreamThenHang(String),
    /// Accept the request and never answer (for timeouts and client disconnects).
    Hang,
}

impl Reply {
    /// A text reply with the given usage and no chunk delay.
    pub fn text(content: &str, prompt_tokens: u64, completion_tokens: u64) -> Self {
        Reply::Text {
            content: content.to_owned(),
            prompt_tokens,
            completion_tokens,
            cached_tokens: 0,
            chunk_delay: Duration::ZERO,
        }
    }
}

/// A request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Its headers.
    pub headers: HeaderMap,
    /// Its JSON body.
    pub body: Value,
}

#[derive(Default)]
struct FakeState {
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Recorded>>,
    /// Keep no record of requests (for benchmarks: memory stays flat).
    quiet: bool,
}

/// The running fake; stops when dropped.
pub struct FakeOpenAi {
    /// `http://127.0.0.1:PORT/v1`, the base URL clients configure.
    pub base_url: String,
    state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeOpenAi {
    /// Starts the fake on a free loopback port.
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// Starts the fake without recording requests (benchmarks).
    pub async fn start_quiet() -> Self {
        Self::start_with(true).await
    }

    async fn start_with(quiet: bool) -> Self {
        let state = Arc::new(FakeState {
            quiet,
            ..FakeState::default()
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/models", get(models))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/fim/completions", post(fim))
            .layer(axum::middleware::map_response(|res| {
                crate::with_request_id(res, "x-request-id")
            }))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        // Streams go out frame by frame: no Nagle delay between them.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base_url: format!("http://{addr}/v1"),
            state,
            task,
        }
    }

    /// Queues `reply` for the next request.
    pub fn push(&self, reply: Reply) {
        self.state.script.lock().unwrap().push_back(reply);
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }
}

async fn models() -> impl IntoResponse {
    axum::Json(json!({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}))
}

/// Embeddings: one 3-dimensional vector per input string; `prompt_tokens` counts the words.
async fn embeddings(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.requests.lock().unwrap().push(Recorded {
        headers,
        body: body.clone(),
    });
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let tokens: usize = inputs.iter().map(|s| s.split_whitespace().count()).sum();
    let data: Vec<Value> = (0..inputs.len())
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}))
        .collect();
    axum::Json(json!({
        "object": "list", "data": data, "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

/// Mistral's fill-in-the-middle endpoint: `prompt` (a string) is required (400 otherwise); the
/// answer is the next scripted reply, in the Chat format Mistral uses for FIM.
async fn fim(state: State<Arc<FakeState>>, headers: HeaderMap, body: Bytes) -> Response {
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if !parsed["prompt"].is_string() {
        let err = json!({"error": {"message": "prompt: field required", "type": "invalid_request_error", "code": null}});
        return (StatusCode::BAD_REQUEST, axum::Json(err)).into_response();
    }
    chat(state, headers, body).await
}

async fn chat(State(state): State<Arc<FakeState>>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if !state.quiet {
        state.requests.lock().unwrap().push(Recorded {
            headers,
            body: body.clone(),
        });
    }
    if let Err((param, message)) = check_tool_pairing(&body["messages"]) {
        let err = json!({"error": {"message": message, "type": "invalid_request_error",
            "param": param, "code": null}});
        return (StatusCode::BAD_REQUEST, axum::Json(err)).into_response();
    }
    let reply = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| Reply::text("ok", 10, 5));
    let model = body["model"].as_str().unwrap_or("fake-model").to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let include_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    match reply {
        Reply::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let err = json!({"error": {"message": format!("fake upstream error {code}"), "type": "fake", "code": code}});
            (status, axum::Json(err)).into_response()
        }
        Reply::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Reply::StreamWithoutUsage(text) => sse(
            vec![chunk(&model, json!({"content": text}), Some("stop"))],
            None,
            &model,
            Duration::ZERO,
        ),
        Reply::StreamThenHang(text) => {
            let first = format!(
                "data: {}\n\n",
                chunk(&model, json!({"content": text}), None)
            );
            let stream =
                futures_util::stream::once(
                    async move { Ok::<_, std::io::Error>(Bytes::from(first)) },
                )
                .chain(futures_util::stream::pending());
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }
        Reply::ToolCall { name, arguments } => {
            let call = json!({"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}});
            let usage = json!({"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28});
            if stream {
                let mut events = vec![chunk(
                    &model,
                    json!({"role": "assistant", "tool_calls": [
                        {"index": 0, "id": "call_1", "type": "function", "function": {"name": name, "arguments": ""}}
                    ]}),
                    None,
                )];
                events.push(chunk(
                    &model,
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
                    None,
                ));
                events.push(chunk(&model, json!({}), Some("tool_calls")));
                sse(
                    events,
                    include_usage.then_some(usage),
                    &model,
                    Duration::ZERO,
                )
            } else {
                axum::Json(json!({
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [call]}, "finish_reason": "tool_calls"}],
                    "usage": usage,
                }))
                .into_response()
            }
        }
        Reply::Text {
            content,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            chunk_delay,
        } => {
            let usage = json!({
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens},
            });
            if stream {
                let mut events = vec![chunk(
                    &model,
                    json!({"role": "assistant", "content": ""}),
                    None,
                )];
                for (i, word) in content.split(' ').enumerate() {
                    let text = if i == 0 {
                        word.to_owned()
                    } else {
                        format!(" {word}")
                    };
                    events.push(chunk(&model, json!({"content": text}), None));
                }
                events.push(chunk(&model, json!({}), Some("stop")));
                sse(events, include_usage.then_some(usage), &model, chunk_delay)
            } else {
                axum::Json(json!({
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": usage,
                }))
                .into_response()
            }
        }
    }
}

/// OpenAI's tool-call pairing rule for Chat Completions `messages`: every assistant message
/// with `tool_calls` is followed, before any other message, by `tool` messages answering each
/// of its `tool_call_id`s, and every `tool` message answers a call of the assistant message
/// right before its run of `tool` messages.
///
/// Errors: `(param, message)` as OpenAI words them, e.g. `("messages.[3].role", "An assistant
/// message with 'tool_calls' must be followed by tool messages responding to each
/// 'tool_call_id'. …")`. A `messages` that is not an array passes (other checks are not this
/// fake's business).
pub fn check_tool_pairing(messages: &Value) -> Result<(), (String, String)> {
    let Some(messages) = messages.as_array() else {
        return Ok(());
    };
    // The open assistant message: its index and the ids not answered yet.
    let mut open: Option<(usize, Vec<String>)> = None;
    let unanswered = |(at, ids): (usize, Vec<String>)| -> Result<(), (String, String)> {
        if ids.is_empty() {
            return Ok(());
        }
        Err((
            format!("messages.[{at}].role"),
            format!(
                "An assistant message with 'tool_calls' must be followed by tool messages \
                 responding to each 'tool_call_id'. The following tool_call_ids did not have \
                 response messages: {}",
                ids.join(", ")
            ),
        ))
    };
    for (i, message) in messages.iter().enumerate() {
        if message["role"] == "tool" {
            let id = message["tool_call_id"].as_str().unwrap_or_default();
            match open.as_mut() {
                Some((_, ids)) if ids.iter().any(|x| x == id) => ids.retain(|x| x != id),
                _ => {
                    return Err((
                        format!("messages.[{i}].role"),
                        "Invalid parameter: messages with role 'tool' must be a response to a \
                         preceeding message with 'tool_calls'."
                            .into(),
                    ));
                }
            }
            continue;
        }
        if let Some(group) = open.take() {
            unanswered(group)?;
        }
        let calls = message["tool_calls"].as_array();
        if message["role"] == "assistant" && calls.is_some_and(|c| !c.is_empty()) {
            let ids = calls
                .into_iter()
                .flatten()
                .map(|c| c["id"].as_str().unwrap_or_default().to_owned())
                .collect();
            open = Some((i, ids));
        }
    }
    open.map_or(Ok(()), unanswered)
}

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })
}

/// An SSE body: each event after `delay`, then the usage chunk (if any) and `[DONE]`.
fn sse(events: Vec<Value>, usage: Option<Value>, model: &str, delay: Duration) -> Response {
    let mut frames: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    if let Some(usage) = usage {
        let last = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
            "model": model, "choices": [], "usage": usage});
        frames.push(format!("data: {last}\n\n"));
    }
    frames.push("data: [DONE]\n\n".to_owned());
    let stream = futures_util::stream::unfold(frames.into_iter(), move |mut it| async move {
        let frame = it.next()?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<_, std::io::Error>(Bytes::from(frame)), it))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn tool_call_pairing_is_enforced() {
        let call = |id: &str| json!({"id": id, "type": "function", "function": {"name": "f", "arguments": "{}"}});
        let asks = |ids: &[&str]| {
            json!({"role": "assistant", "content": null,
            "tool_calls": ids.iter().map(|i| call(i)).collect::<Vec<_>>()})
        };
        let answer = |id: &str| json!({"role": "tool", "tool_call_id": id, "content": "x"});
        let user = json!({"role": "user", "content": "hi"});
        for (messages, error) in [
            (vec![user.clone()], None),
            (
                vec![user.clone(), asks(&["a"]), answer("a"), user.clone()],
                None,
            ),
            (vec![asks(&["a", "b"]), answer("b"), answer("a")], None),
            (
                vec![asks(&["a"]), answer("a"), asks(&["a"]), answer("a")],
                None,
            ),
            (vec![user.clone(), asks(&["a"])], Some("messages.[1].role")),
            (
                vec![asks(&["a", "b"]), answer("a"), user.clone()],
                Some("messages.[0].role"),
            ),
            (vec![user.clone(), answer("a")], Some("messages.[1].role")),
            (vec![asks(&["a"]), answer("b")], Some("messages.[1].role")),
            (
                vec![asks(&["a"]), answer("a"), answer("a")],
                Some("messages.[2].role"),
            ),
        ] {
            let got = super::check_tool_pairing(&json!(messages));
            assert_eq!(
                got.as_ref().err().map(|(p, _)| p.as_str()),
                error,
                "{messages:?}: {got:?}"
            );
        }
    }
}
