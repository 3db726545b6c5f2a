//! A fake Anthropic Messages upstream (`POST /v1/messages`) on a real loopback socket, speaking
//! the documented wire format: a `message` object, or, when `stream` is true, the event
//! sequence `message_start`, `content_block_start`, `content_block_delta`…,
//! `content_block_stop`, `message_delta` (with the output usage), `message_stop`. Replies are
//! scripted in order (default: a short text); requests are recorded.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::fake_openai::Recorded;

/// One scripted reply.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A text answer with this usage.
    Text {
        /// The text; streamed split on spaces.
        text: String,
        /// `usage.input_tokens`.
        input_tokens: u64,
        /// `usage.output_tokens`.
        output_tokens: u64,
        /// `usage.cache_read_input_tokens`.
        cache_read_input_tokens: u64,
    },
    /// A `tool_use` block calling `name` with `input`.
    ToolUse {
        /// Tool name.
        name: String,
        /// Tool input.
        input: Value,
    },
    /// An error status with an Anthropic error body.
    Status(u16),
}

impl Reply {
    /// A text reply with this usage and no cache reads.
    pub fn text(text: &str, input_tokens: u64, output_tokens: u64) -> Self {
        Reply::Text {
            text: text.to_owned(),
            input_tokens,
            output_tokens,
            cache_read_input_tokens: 0,
        }
    }
}

#[derive(Default)]
struct FakeState {
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Recorded>>,
}

/// The running fake; stops when dropped.
pub struct FakeAnthropic {
    /// `http://127.0.0.1:PORT/v1`, the base URL a provider is configured with.
    pub base_url: String,
    state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAnthropic {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeAnthropic {
    /// Starts the fake on a free loopback port.
    pub async fn start() -> Self {
        let state = Arc::new(FakeState::default());
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .layer(axum::middleware::map_response(|res| {
                crate::with_request_id(res, "request-id")
            }))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
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

/// The request rules Anthropic's Messages API enforces (and a translated request is most
/// likely to break): `max_tokens` is an integer; `messages` is non-empty, starts with a user
/// turn and alternates user and assistant; roles are only `user` and `assistant` (the system
/// prompt is top-level); text blocks are not empty; every `tool_result` answers a `tool_use` of
/// the assistant turn right before and comes before any other block of its turn.
///
/// Errors: Anthropic's wording of the first rule broken, e.g. `messages: roles must alternate
/// between "user" and "assistant", but found multiple "user" roles in a row`.
pub fn check_request(body: &Value) -> Result<(), String> {
    if !body["max_tokens"].is_u64() {
        return Err("max_tokens: Field required".into());
    }
    let Some(messages) = body["messages"].as_array().filter(|m| !m.is_empty()) else {
        return Err("messages: at least one message is required".into());
    };
    let mut tool_uses: Vec<&str> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or("");
        if role != "user" && role != "assistant" {
            return Err(format!(
                "messages.{i}.role: Input should be 'user' or 'assistant'"
            ));
        }
        if i == 0 && role != "user" {
            return Err("messages: first message must use the \"user\" role".into());
        }
        if i > 0 && messages[i - 1]["role"] == role {
            return Err(format!(
                "messages: roles must alternate between \"user\" and \"assistant\", but found \
                 multiple \"{role}\" roles in a row"
            ));
        }
        let blocks = match &m["content"] {
            Value::String(_) => Vec::new(),
            Value::Array(b) => b.iter().collect(),
            _ => {
                return Err(format!(
                    "messages.{i}.content: Input should be a valid list"
                ));
            }
        };
        let mut seen_other = false;
        for (j, b) in blocks.iter().enumerate() {
            match b["type"].as_str() {
                Some("text") if b["text"].as_str().is_none_or(str::is_empty) => {
                    return Err(format!(
                        "messages.{i}.content.{j}.text: text content blocks must be non-empty"
                    ));
                }
                Some("tool_result") => {
                    let id = b["tool_use_id"].as_str().unwrap_or("");
                    if seen_other || !tool_uses.contains(&id) {
                        return Err(format!(
                            "messages.{i}.content.{j}: unexpected `tool_use_id` found in \
                             `tool_result` blocks: {id}. Each `tool_result` block must have a \
                             corresponding `tool_use` block in the previous message."
                        ));
                    }
                }
                _ => seen_other = true,
            }
        }
        tool_uses = blocks
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .filter_map(|b| b["id"].as_str())
            .collect();
    }
    Ok(())
}

async fn messages(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.requests.lock().unwrap().push(Recorded {
        headers,
        body: body.clone(),
    });
    if let Err(message) = check_request(&body) {
        let err = json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}});
        return (StatusCode::BAD_REQUEST, axum::Json(err)).into_response();
    }
    let reply = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Reply::Text {
            text: "ok".into(),
            input_tokens: 10,
            output_tokens: 5,
            cache_read_input_tokens: 0,
        });
    let model = body["model"].as_str().unwrap_or("claude-fake").to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let (blocks, stop, usage) = match reply {
        Reply::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let err = json!({"type": "error", "error": {"type": "api_error", "message": format!("fake error {code}")}});
            return (status, axum::Json(err)).into_response();
        }
        Reply::Text {
            text,
            input_tokens,
            output_tokens,
            cache_read_input_tokens,
        } => (
            vec![json!({"type": "text", "text": text})],
            "end_turn",
            json!({"input_tokens": input_tokens, "output_tokens": output_tokens,
                   "cache_read_input_tokens": cache_read_input_tokens, "cache_creation_input_tokens": 0}),
        ),
        Reply::ToolUse { name, input } => (
            vec![json!({"type": "tool_use", "id": "toolu_fake", "name": name, "input": input})],
            "tool_use",
            json!({"input_tokens": 30, "output_tokens": 12}),
        ),
    };
    if !stream {
        return axum::Json(json!({
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": blocks, "stop_reason": stop, "stop_sequence": null, "usage": usage,
        }))
        .into_response();
    }
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    let mut events = vec![(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": start_usage}}),
    )];
    for (i, block) in blocks.iter().enumerate() {
        let (start, deltas) = match block["type"].as_str() {
            Some("tool_use") => {
                let mut empty = block.clone();
                empty["input"] = json!({});
                let json_text = block["input"].to_string();
                (
                    empty,
                    vec![json!({"type": "input_json_delta", "partial_json": json_text})],
                )
            }
            _ => {
                let text = block["text"].as_str().unwrap_or("");
                let parts = text
                    .split(' ')
                    .enumerate()
                    .map(|(j, w)| {
                        let t = if j == 0 {
                            w.to_owned()
                        } else {
                            format!(" {w}")
                        };
                        json!({"type": "text_delta", "text": t})
                    })
                    .collect();
                (json!({"type": "text", "text": ""}), parts)
            }
        };
        events.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": i, "content_block": start}),
        ));
        for d in deltas {
            events.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": i, "delta": d}),
            ));
        }
        events.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": i}),
        ));
    }
    events.push((
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
            "usage": {"output_tokens": usage["output_tokens"]}}),
    ));
    events.push(("message_stop", json!({"type": "message_stop"})));
    let text: String = events
        .into_iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect();
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from(text))
        .unwrap()
}
