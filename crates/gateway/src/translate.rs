//! Translation between the three model APIs the gateway serves: OpenAI Chat Completions,
//! Anthropic Messages and OpenAI Responses. A client speaks one ([`Wire`]); the provider that
//! serves its model speaks Chat Completions (`openai`, `openai-compatible`, `openrouter`
//! providers) or Messages (`anthropic` providers). When they differ, the request goes through
//! Chat Completions as the hub (client → Chat → provider) and the response, streamed or not,
//! comes back the same way (provider → Chat → client), so Claude Code works with an
//! OpenAI-compatible model and the OpenAI SDK with an Anthropic one.
//!
//! What is carried across: text, images (base64 and URL), system prompts, tools, tool calls and
//! tool results, `tool_choice`, parallel tool use, stop sequences, temperature and top-p, the
//! output limit, JSON output formats (Responses `text.format` ↔ Chat `response_format`),
//! stop reasons, usage (with cache reads and writes) and errors, and in streams every text,
//! tool-call and usage event. What has no counterpart is left out: Anthropic server tools
//! (`web_search_…` and the like, which only Anthropic runs), thinking blocks and reasoning
//! deltas (their signatures cannot be made up), `top_k`, logprobs. Requests that cannot be
//! carried (Responses `previous_response_id` or `item_reference`, which need stored
//! responses; file inputs; malformed messages) are refused with a [`TranslateError`].
//!
//! Sources: OpenAI's API reference (Chat Completions, Responses and their streaming events),
//! Anthropic's (Messages, streaming messages, tool use).

use serde_json::{Map, Value, json};

use crate::usage::{SseLines, sse_data};

/// An API a client or provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// OpenAI Chat Completions (`/chat/completions`): the hub.
    Chat,
    /// Anthropic Messages (`/messages`).
    Messages,
    /// OpenAI Responses (`/responses`); clients only, served through Chat Completions.
    Responses,
}

/// Output limit of a Messages request made from a request that set none (Anthropic requires
/// `max_tokens`), tokens.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// A request that cannot be carried to the provider's API. Answered 400 `invalid_request`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct TranslateError(pub String);

fn refuse<T>(message: impl Into<String>) -> Result<T, TranslateError> {
    Err(TranslateError(message.into()))
}

/// `request` (a JSON object in `from`'s format) in `to`'s format. `to` is `Chat` or
/// `Messages`; a request already in `to`'s format is returned as it is.
///
/// Errors: [`TranslateError`] naming the part that cannot be carried.
pub fn request(from: Wire, to: Wire, request: Value) -> Result<Value, TranslateError> {
    if from == to {
        return Ok(request);
    }
    let chat = match from {
        Wire::Chat => request,
        Wire::Messages => messages_request_to_chat(&request)?,
        Wire::Responses => responses_request_to_chat(&request)?,
    };
    match to {
        Wire::Chat => Ok(chat),
        Wire::Messages => chat_request_to_messages(&chat),
        Wire::Responses => refuse("no provider is served the Responses API directly"),
    }
}

/// A successful non-streaming `response` of the provider (in `from`: `Chat` or `Messages`) in
/// the client's format `to`.
pub fn response(from: Wire, to: Wire, response: Value) -> Value {
    if from == to {
        return response;
    }
    let chat = match from {
        Wire::Messages => messages_response_to_chat(&response),
        _ => response,
    };
    match to {
        Wire::Chat => chat,
        Wire::Messages => chat_response_to_messages(&chat),
        Wire::Responses => chat_response_to_responses(&chat),
    }
}

/// An error body of the provider (in `from`) in the client's format `to`: OpenAI's
/// `{"error":{"message","type","code"}}` (Chat and Responses) or Anthropic's
/// `{"type":"error","error":{"type","message"}}`. A body of another shape is kept as its text.
pub fn error_body(from: Wire, to: Wire, body: &[u8]) -> Value {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if from == to && parsed.is_object() {
        return parsed;
    }
    let error = &parsed["error"];
    let message = error["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(2000).collect());
    let kind = error["type"].as_str().unwrap_or("api_error");
    match to {
        Wire::Messages => json!({"type": "error", "error": {"type": kind, "message": message}}),
        _ => {
            json!({"error": {"message": message, "type": kind, "code": error.get("code").cloned().unwrap_or(Value::Null)}})
        }
    }
}

/// The SSE event that ends a stream cut short, in `wire`'s format: OpenAI-style
/// `data: {"error":{…}}` for Chat, `event: error` with `{"type":"error","error":{…}}` for
/// Messages, `event: error` with `{"type":"error","code","message"}` for Responses.
pub fn error_event(wire: Wire, message: &str, code: &str) -> String {
    match wire {
        Wire::Chat => format!(
            "data: {}\n\n",
            json!({"error": {"message": message, "type": "upstream_error", "code": code}})
        ),
        Wire::Messages => sse(
            "error",
            &json!({"type": "error", "error": {"type": "api_error", "message": message}}),
        ),
        Wire::Responses => sse(
            "error",
            &json!({"type": "error", "code": code, "message": message, "param": null}),
        ),
    }
}

fn sse(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Copies the fields named in `pairs` (`(from, to)`) that `src` has into `dst`.
fn copy(src: &Value, dst: &mut Map<String, Value>, pairs: &[(&str, &str)]) {
    for (from, to) in pairs {
        if let Some(v) = src.get(*from).filter(|v| !v.is_null()) {
            dst.insert((*to).to_owned(), v.clone());
        }
    }
}

/// The text of a content that is a string or an array of text parts (any other part is
/// skipped), parts joined with newlines.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Stop reasons and usage.

/// Chat `finish_reason` → Messages `stop_reason`.
fn stop_reason(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// Messages `stop_reason` → Chat `finish_reason`.
fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// Messages usage (input excludes the cache) → Chat usage (prompt includes it).
fn chat_usage(u: &Value) -> Value {
    let n = |k: &str| u[k].as_u64().unwrap_or(0);
    let (read, write) = (
        n("cache_read_input_tokens"),
        n("cache_creation_input_tokens"),
    );
    let prompt = n("input_tokens") + read + write;
    let completion = n("output_tokens");
    json!({
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
    })
}

/// Chat usage → Messages usage.
fn messages_usage(u: &Value) -> Value {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let details = &u["prompt_tokens_details"];
    let (read, write) = (
        n(&details["cached_tokens"]),
        n(&details["cache_write_tokens"]),
    );
    json!({
        "input_tokens": n(&u["prompt_tokens"]).saturating_sub(read + write),
        "output_tokens": n(&u["completion_tokens"]),
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": write,
    })
}

/// Chat usage → Responses usage (input includes cached tokens, as in Chat).
fn responses_usage(u: &Value) -> Value {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let (input, output) = (n(&u["prompt_tokens"]), n(&u["completion_tokens"]));
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": n(&u["prompt_tokens_details"]["cached_tokens"])},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": n(&u["completion_tokens_details"]["reasoning_tokens"])},
        "total_tokens": input + output,
    })
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// A Chat request → a Messages request.
fn chat_request_to_messages(chat: &Value) -> Result<Value, TranslateError> {
    let Some(list) = chat["messages"].as_array() else {
        return refuse("`messages` must be an array");
    };
    let mut system: Vec<Value> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or("");
        match role {
            "system" | "developer" => system.extend(text_blocks(&m["content"])),
            "user" => push_turn(&mut messages, "user", user_blocks(&m["content"], i)?),
            "assistant" => {
                let mut blocks = text_blocks(&m["content"]);
                for call in m["tool_calls"].as_array().into_iter().flatten() {
                    let args = call["function"]["arguments"].as_str().unwrap_or("");
                    let input: Value = if args.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(args).map_err(|_| {
                            TranslateError(format!(
                                "messages[{i}]: a tool call's `arguments` is not JSON"
                            ))
                        })?
                    };
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call["id"].as_str().map_or_else(|| new_id("toolu_"), str::to_owned),
                        "name": call["function"]["name"],
                        "input": input,
                    }));
                }
                push_turn(&mut messages, "assistant", blocks);
            }
            "tool" => {
                let Some(id) = m["tool_call_id"].as_str() else {
                    return refuse(format!(
                        "messages[{i}]: a tool message needs `tool_call_id`"
                    ));
                };
                let result = json!({"type": "tool_result", "tool_use_id": id, "content": text_of(&m["content"])});
                push_turn(&mut messages, "user", vec![result]);
            }
            other => return refuse(format!("messages[{i}]: unsupported role `{other}`")),
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), chat["model"].clone());
    out.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    let max = chat["max_completion_tokens"]
        .as_u64()
        .or(chat["max_tokens"].as_u64())
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), max.into());
    copy(
        chat,
        &mut out,
        &[
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("stream", "stream"),
        ],
    );
    match &chat["stop"] {
        Value::String(s) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Value::Array(a) => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if let Some(user) = chat["user"].as_str() {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    let tools: Vec<Value> = chat["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["type"] == "function")
        .map(|t| {
            let f = &t["function"];
            let mut tool = json!({
                "name": f["name"],
                "input_schema": if f["parameters"].is_object() { f["parameters"].clone() } else { json!({"type": "object"}) },
            });
            if let Some(d) = f["description"].as_str() {
                tool["description"] = d.into();
            }
            tool
        })
        .collect();
    let no_parallel = chat["parallel_tool_calls"] == false;
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
        let mut choice = match &chat["tool_choice"] {
            Value::String(s) if s == "none" => json!({"type": "none"}),
            Value::String(s) if s == "required" => json!({"type": "any"}),
            Value::Object(o) => {
                json!({"type": "tool", "name": o.get("function").map_or(&Value::Null, |f| &f["name"])})
            }
            _ => json!({"type": "auto"}),
        };
        if no_parallel && choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = true.into();
        }
        out.insert("tool_choice".into(), choice);
    }
    Ok(Value::Object(out))
}

/// Text blocks of a Chat content (a string, or parts of which text ones are kept with their
/// `cache_control`). Empty texts are dropped: Anthropic refuses empty text blocks.
fn text_blocks(content: &Value) -> Vec<Value> {
    let block = |text: &str, part: Option<&Value>| {
        let mut b = json!({"type": "text", "text": text});
        if let Some(cc) = part.and_then(|p| p.get("cache_control")) {
            b["cache_control"] = cc.clone();
        }
        b
    };
    match content {
        Value::String(s) if !s.is_empty() => vec![block(s, None)],
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| {
                let text = p["text"].as_str().filter(|t| !t.is_empty())?;
                Some(block(text, Some(p)))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Blocks of a Chat user content: text and images (`image_url` with a `data:` URL becomes a
/// base64 source, any other URL a URL source).
fn user_blocks(content: &Value, i: usize) -> Result<Vec<Value>, TranslateError> {
    let Value::Array(parts) = content else {
        return Ok(text_blocks(content));
    };
    let mut blocks = Vec::new();
    for p in parts {
        match p["type"].as_str() {
            Some("text") => blocks.extend(text_blocks(&Value::Array(vec![p.clone()]))),
            Some("image_url") => {
                let url = p["image_url"]["url"]
                    .as_str()
                    .or(p["image_url"].as_str())
                    .unwrap_or("");
                let source = match url
                    .strip_prefix("data:")
                    .and_then(|rest| rest.split_once(";base64,"))
                {
                    Some((media_type, data)) => {
                        json!({"type": "base64", "media_type": media_type, "data": data})
                    }
                    None => json!({"type": "url", "url": url}),
                };
                blocks.push(json!({"type": "image", "source": source}));
            }
            other => {
                return refuse(format!(
                    "messages[{i}]: content part type {} cannot be sent to this model's provider",
                    other.unwrap_or("(none)")
                ));
            }
        }
    }
    Ok(blocks)
}

/// Appends a turn, merging it into the previous one of the same role (Messages alternates
/// user and assistant turns). Turns without blocks are dropped.
fn push_turn(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = messages.last_mut()
        && last["role"] == role
        && let Some(content) = last["content"].as_array_mut()
    {
        content.extend(blocks);
        return;
    }
    messages.push(json!({"role": role, "content": blocks}));
}

/// A Messages request → a Chat request.
fn messages_request_to_chat(req: &Value) -> Result<Value, TranslateError> {
    let Some(list) = req["messages"].as_array() else {
        return refuse("`messages` must be an array");
    };
    let mut messages = Vec::new();
    let system = text_of(&req["system"]);
    if !system.is_empty() {
        messages.push(json!({"role": "system", "content": system}));
    }
    for (i, m) in list.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or("");
        let blocks = match &m["content"] {
            Value::String(s) => vec![json!({"type": "text", "text": s})],
            Value::Array(b) => b.clone(),
            _ => {
                return refuse(format!(
                    "messages[{i}]: `content` must be a string or an array"
                ));
            }
        };
        match role {
            // Claude Code sends system messages between turns too.
            "system" => {
                messages.push(json!({"role": "system", "content": text_of(&Value::Array(blocks))}))
            }
            "user" => {
                let mut parts = Vec::new();
                for b in &blocks {
                    match b["type"].as_str() {
                        Some("tool_result") => {
                            let mut content = match &b["content"] {
                                Value::String(s) => s.clone(),
                                other => text_of(other),
                            };
                            if b["is_error"] == true {
                                content = format!("Error: {content}");
                            }
                            messages.push(json!({"role": "tool", "tool_call_id": b["tool_use_id"], "content": content}));
                        }
                        Some("text") => parts.push(json!({"type": "text", "text": b["text"]})),
                        Some("image") => {
                            let s = &b["source"];
                            let url = match s["type"].as_str() {
                                Some("base64") => format!(
                                    "data:{};base64,{}",
                                    s["media_type"].as_str().unwrap_or("image/png"),
                                    s["data"].as_str().unwrap_or("")
                                ),
                                _ => s["url"].as_str().unwrap_or("").to_owned(),
                            };
                            parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
                        }
                        other => {
                            return refuse(format!(
                                "messages[{i}]: content block type {} cannot be sent to this \
                                 model's provider",
                                other.unwrap_or("(none)")
                            ));
                        }
                    }
                }
                if !parts.is_empty() {
                    messages.push(json!({"role": "user", "content": parts}));
                }
            }
            "assistant" => {
                let text: Vec<&str> = blocks
                    .iter()
                    .filter(|b| b["type"] == "text")
                    .filter_map(|b| b["text"].as_str())
                    .collect();
                let calls: Vec<Value> = blocks
                    .iter()
                    .filter(|b| b["type"] == "tool_use")
                    .map(|b| json!({"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": b["input"].to_string()}}))
                    .collect();
                let mut msg = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { text.concat().into() }});
                if !calls.is_empty() {
                    msg["tool_calls"] = Value::Array(calls);
                }
                messages.push(msg);
            }
            other => return refuse(format!("messages[{i}]: unsupported role `{other}`")),
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), req["model"].clone());
    out.insert("messages".into(), Value::Array(messages));
    copy(
        req,
        &mut out,
        &[
            ("max_tokens", "max_tokens"),
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("stream", "stream"),
            ("stop_sequences", "stop"),
        ],
    );
    if let Some(user) = req["metadata"]["user_id"].as_str() {
        out.insert("user".into(), user.into());
    }
    // Custom tools only: server tools (`web_search_…`, `bash_…`) run at Anthropic.
    let tools: Vec<Value> = req["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| {
            t.get("input_schema").is_some() && matches!(t["type"].as_str(), None | Some("custom"))
        })
        .map(|t| {
            let mut f = json!({"name": t["name"], "parameters": t["input_schema"]});
            if let Some(d) = t["description"].as_str() {
                f["description"] = d.into();
            }
            json!({"type": "function", "function": f})
        })
        .collect();
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
        let choice = &req["tool_choice"];
        let tool_choice = match choice["type"].as_str() {
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => json!({"type": "function", "function": {"name": choice["name"]}}),
            _ => json!("auto"),
        };
        out.insert("tool_choice".into(), tool_choice);
        if choice["disable_parallel_tool_use"] == true {
            out.insert("parallel_tool_calls".into(), false.into());
        }
    }
    Ok(Value::Object(out))
}

/// A Responses request → a Chat request.
fn responses_request_to_chat(req: &Value) -> Result<Value, TranslateError> {
    if req
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return refuse(
            "`previous_response_id` needs stored responses, which this gateway does not keep; \
             send the whole conversation in `input` (with `store: false`)",
        );
    }
    let mut messages: Vec<Value> = Vec::new();
    if let Some(instructions) = req["instructions"].as_str() {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    match &req["input"] {
        Value::String(s) => messages.push(json!({"role": "user", "content": s})),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                responses_item(&mut messages, item, i)?;
            }
        }
        _ => return refuse("`input` must be a string or an array of items"),
    }
    let mut out = Map::new();
    out.insert("model".into(), req["model"].clone());
    out.insert("messages".into(), Value::Array(messages));
    copy(
        req,
        &mut out,
        &[
            ("max_output_tokens", "max_tokens"),
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("stream", "stream"),
            ("parallel_tool_calls", "parallel_tool_calls"),
            ("user", "user"),
        ],
    );
    let tools: Vec<Value> = req["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["type"] == "function")
        .map(|t| {
            let mut f = json!({"name": t["name"], "parameters": t.get("parameters").cloned().unwrap_or(json!({"type": "object"}))});
            copy(t, f.as_object_mut().expect("object"), &[("description", "description"), ("strict", "strict")]);
            json!({"type": "function", "function": f})
        })
        .collect();
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
        let choice = match &req["tool_choice"] {
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
                json!({"type": "function", "function": {"name": o.get("name")}})
            }
            Value::String(s) => Value::String(s.clone()),
            _ => json!("auto"),
        };
        out.insert("tool_choice".into(), choice);
    }
    let format = &req["text"]["format"];
    match format["type"].as_str() {
        Some("json_schema") => {
            let mut schema = json!({"name": format["name"], "schema": format["schema"]});
            copy(
                format,
                schema.as_object_mut().expect("object"),
                &[("strict", "strict"), ("description", "description")],
            );
            out.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": schema}),
            );
        }
        Some("json_object") => {
            out.insert("response_format".into(), json!({"type": "json_object"}));
        }
        _ => {}
    }
    Ok(Value::Object(out))
}

/// One Responses input item appended to Chat `messages`.
fn responses_item(messages: &mut Vec<Value>, item: &Value, i: usize) -> Result<(), TranslateError> {
    let kind = item["type"].as_str().unwrap_or("message");
    match kind {
        "message" => {
            let role = match item["role"].as_str() {
                Some(r @ ("user" | "assistant" | "system" | "developer")) => r,
                _ => return refuse(format!("input[{i}]: a message needs a role")),
            };
            let content = match &item["content"] {
                Value::String(s) => Value::String(s.clone()),
                Value::Array(parts) if role == "assistant" => {
                    text_of(&Value::Array(parts.clone())).into()
                }
                Value::Array(parts) => {
                    let mut out = Vec::new();
                    for p in parts {
                        match p["type"].as_str() {
                            Some("input_text" | "output_text" | "text") => {
                                out.push(json!({"type": "text", "text": p["text"]}));
                            }
                            Some("input_image") => {
                                let mut image = json!({"url": p["image_url"]});
                                copy(
                                    p,
                                    image.as_object_mut().expect("object"),
                                    &[("detail", "detail")],
                                );
                                out.push(json!({"type": "image_url", "image_url": image}));
                            }
                            other => {
                                return refuse(format!(
                                    "input[{i}]: content type {} is not supported by this gateway",
                                    other.unwrap_or("(none)")
                                ));
                            }
                        }
                    }
                    Value::Array(out)
                }
                _ => {
                    return refuse(format!(
                        "input[{i}]: `content` must be a string or an array"
                    ));
                }
            };
            messages.push(json!({"role": role, "content": content}));
        }
        "function_call" => {
            let call = json!({
                "id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"].as_str().unwrap_or("{}")},
            });
            // Consecutive calls belong to one assistant turn.
            match messages.last_mut() {
                Some(last) if last["role"] == "assistant" && last["tool_calls"].is_array() => {
                    last["tool_calls"].as_array_mut().expect("array").push(call);
                }
                Some(last) if last["role"] == "assistant" => last["tool_calls"] = json!([call]),
                _ => messages
                    .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        "function_call_output" => {
            let output = match &item["output"] {
                Value::String(s) => s.clone(),
                other => text_of(other),
            };
            messages
                .push(json!({"role": "tool", "tool_call_id": item["call_id"], "content": output}));
        }
        // Reasoning items carry nothing a Chat provider can use.
        "reasoning" => {}
        other => {
            return refuse(format!(
                "input[{i}]: item type `{other}` is not supported by this gateway"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Non-streaming responses.

/// A Messages response → a Chat response.
fn messages_response_to_chat(m: &Value) -> Value {
    let blocks = m["content"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let text: String = blocks
        .iter()
        .filter(|b| b["type"] == "text")
        .filter_map(|b| b["text"].as_str())
        .collect();
    let calls: Vec<Value> = blocks
        .iter()
        .filter(|b| b["type"] == "tool_use")
        .map(|b| json!({"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": b["input"].to_string()}}))
        .collect();
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { text.into() }});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    json!({
        "id": m["id"].as_str().map_or_else(|| new_id("chatcmpl-"), str::to_owned),
        "object": "chat.completion",
        "created": now_secs(),
        "model": m["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(m["stop_reason"].as_str().unwrap_or("end_turn"))}],
        "usage": chat_usage(&m["usage"]),
    })
}

/// A Chat response → a Messages response (its first choice).
fn chat_response_to_messages(c: &Value) -> Value {
    let choice = &c["choices"][0];
    let msg = &choice["message"];
    let mut content: Vec<Value> = text_blocks(&msg["content"]);
    for call in msg["tool_calls"].as_array().into_iter().flatten() {
        let input =
            serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap_or(""))
                .unwrap_or_else(|_| json!({}));
        content.push(json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": input}));
    }
    json!({
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": c["model"],
        "content": content,
        "stop_reason": stop_reason(choice["finish_reason"].as_str().unwrap_or("stop")),
        "stop_sequence": null,
        "usage": messages_usage(&c["usage"]),
    })
}

/// A Chat response → a Responses response (its first choice).
fn chat_response_to_responses(c: &Value) -> Value {
    let choice = &c["choices"][0];
    let msg = &choice["message"];
    let mut output = Vec::new();
    let text = text_of(&msg["content"]);
    if !text.is_empty() {
        output.push(json!({
            "type": "message", "id": new_id("msg_"), "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }));
    }
    for call in msg["tool_calls"].as_array().into_iter().flatten() {
        output.push(json!({
            "type": "function_call", "id": new_id("fc_"), "status": "completed",
            "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"],
        }));
    }
    let truncated = choice["finish_reason"] == "length";
    json!({
        "id": new_id("resp_"),
        "object": "response",
        "created_at": now_secs(),
        "status": if truncated { "incomplete" } else { "completed" },
        "incomplete_details": if truncated { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "model": c["model"],
        "output": output,
        "usage": responses_usage(&c["usage"]),
        "error": null,
    })
}

// ---------------------------------------------------------------------------------------------
// Streams.

/// One event of a Chat Completions stream, the hub of stream translation.
enum ChatEvent {
    /// A `chat.completion.chunk`.
    Chunk(Value),
    /// `data: [DONE]`.
    Done,
    /// A mid-stream error, `{"error":{…}}`.
    Error(Value),
}

/// Translates a provider's SSE stream (Chat or Messages) into the client's format, chunk by
/// chunk, across chunk boundaries. Feed it the provider's bytes as they come; it returns the
/// client's bytes (possibly none) for each.
pub struct StreamTranslator {
    lines: SseLines,
    decoder: Decoder,
    encoder: Encoder,
}

impl StreamTranslator {
    /// A translator from the provider's `from` (`Chat` or `Messages`) to the client's `to`.
    pub fn new(from: Wire, to: Wire) -> Self {
        Self {
            lines: SseLines::default(),
            decoder: match from {
                Wire::Messages => Decoder::Messages(MessagesDecoder::default()),
                _ => Decoder::Chat,
            },
            encoder: match to {
                Wire::Chat => Encoder::Chat,
                Wire::Messages => Encoder::Messages(MessagesEncoder::default()),
                Wire::Responses => Encoder::Responses(ResponsesEncoder::default()),
            },
        }
    }

    /// The client's bytes for the provider's next `bytes`.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = String::new();
        let (decoder, encoder) = (&mut self.decoder, &mut self.encoder);
        self.lines.feed(bytes, |line| {
            for event in decoder.line(line) {
                encoder.event(event, &mut out);
            }
        });
        out.into_bytes()
    }

    /// The client's closing bytes when the provider's stream ended without its terminal event
    /// but after a finish reason: the stream is closed properly. Otherwise nothing (the client
    /// sees the stream cut).
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = String::new();
        self.encoder.close(&mut out);
        out.into_bytes()
    }
}

enum Decoder {
    Chat,
    Messages(MessagesDecoder),
}

impl Decoder {
    fn line(&mut self, line: &[u8]) -> Vec<ChatEvent> {
        let Some(data) = sse_data(line) else {
            return Vec::new();
        };
        if data == b"[DONE]" {
            return vec![ChatEvent::Done];
        }
        let Ok(event) = serde_json::from_slice::<Value>(data) else {
            return Vec::new();
        };
        match self {
            Decoder::Chat if event.get("error").is_some() => vec![ChatEvent::Error(event)],
            Decoder::Chat => vec![ChatEvent::Chunk(event)],
            Decoder::Messages(d) => d.event(&event),
        }
    }
}

/// Messages events → Chat events.
#[derive(Default)]
struct MessagesDecoder {
    id: String,
    model: Value,
    created: i64,
    /// Message usage so far (input from `message_start`, output from `message_delta`).
    usage: Map<String, Value>,
    /// Content block index → tool call index.
    tools: Vec<(u64, usize)>,
}

impl MessagesDecoder {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> ChatEvent {
        ChatEvent::Chunk(json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }))
    }

    fn event(&mut self, e: &Value) -> Vec<ChatEvent> {
        match e["type"].as_str() {
            Some("message_start") => {
                let m = &e["message"];
                self.id = m["id"]
                    .as_str()
                    .map_or_else(|| new_id("chatcmpl-"), str::to_owned);
                self.model = m["model"].clone();
                self.created = now_secs();
                if let Some(u) = m["usage"].as_object() {
                    self.usage.extend(u.clone());
                }
                vec![self.chunk(json!({"role": "assistant", "content": ""}), None)]
            }
            Some("content_block_start") => {
                let b = &e["content_block"];
                if b["type"] != "tool_use" {
                    return Vec::new();
                }
                let index = self.tools.len();
                self.tools.push((e["index"].as_u64().unwrap_or(0), index));
                vec![self.chunk(
                    json!({"tool_calls": [{"index": index, "id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": ""}}]}),
                    None,
                )]
            }
            Some("content_block_delta") => {
                let d = &e["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => vec![self.chunk(json!({"content": d["text"]}), None)],
                    Some("input_json_delta") => {
                        let block = e["index"].as_u64().unwrap_or(0);
                        let Some(&(_, index)) = self.tools.iter().find(|(b, _)| *b == block) else {
                            return Vec::new();
                        };
                        vec![self.chunk(
                            json!({"tool_calls": [{"index": index, "function": {"arguments": d["partial_json"]}}]}),
                            None,
                        )]
                    }
                    _ => Vec::new(),
                }
            }
            Some("message_delta") => {
                if let Some(u) = e["usage"].as_object() {
                    self.usage.extend(
                        u.iter()
                            .filter(|(_, v)| !v.is_null())
                            .map(|(k, v)| (k.clone(), v.clone())),
                    );
                }
                match e["delta"]["stop_reason"].as_str() {
                    Some(stop) => vec![self.chunk(json!({}), Some(finish_reason(stop)))],
                    None => Vec::new(),
                }
            }
            Some("message_stop") => vec![
                ChatEvent::Chunk(json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": [],
                    "usage": chat_usage(&Value::Object(self.usage.clone())),
                })),
                ChatEvent::Done,
            ],
            Some("error") => vec![ChatEvent::Error(json!({"error": e["error"]}))],
            _ => Vec::new(),
        }
    }
}

enum Encoder {
    Chat,
    Messages(MessagesEncoder),
    Responses(ResponsesEncoder),
}

impl Encoder {
    fn event(&mut self, event: ChatEvent, out: &mut String) {
        match self {
            Encoder::Chat => match event {
                ChatEvent::Chunk(v) | ChatEvent::Error(v) => {
                    out.push_str(&format!("data: {v}\n\n"));
                }
                ChatEvent::Done => out.push_str("data: [DONE]\n\n"),
            },
            Encoder::Messages(e) => e.event(event, out),
            Encoder::Responses(e) => e.event(event, out),
        }
    }

    fn close(&mut self, out: &mut String) {
        match self {
            Encoder::Chat => {}
            Encoder::Messages(e) if e.progress.finish.is_some() => e.stop(out),
            Encoder::Responses(e) if e.progress.finish.is_some() => e.stop(out),
            _ => {}
        }
    }
}

/// Where an encoder's stream stands.
#[derive(Default)]
struct Progress {
    /// The terminal (or an error) event went out: nothing more is sent.
    stopped: bool,
    /// The open block or item: its index, and the Chat tool call index when it is a call.
    open: Option<(usize, Option<u64>)>,
    /// The finish reason and usage, which Chat sends in separate chunks before `[DONE]`.
    finish: Option<String>,
    usage: Option<Value>,
}

impl Progress {
    fn note(&mut self, chunk: &Value) {
        if let Some(f) = chunk["choices"][0]["finish_reason"].as_str() {
            self.finish = Some(f.to_owned());
        }
        if chunk["usage"].is_object() {
            self.usage = Some(chunk["usage"].clone());
        }
    }

    fn usage(&self) -> &Value {
        self.usage.as_ref().unwrap_or(&Value::Null)
    }
}

/// A client stream format made from Chat events. The walk over a chunk is shared (text into
/// the open text block, each tool call's pieces into its own block, a new block closing the
/// open one); each format says how its blocks open, grow and close.
trait ChunkEncoder {
    fn progress(&mut self) -> &mut Progress;
    /// The stream's opening events, once.
    fn start(&mut self, model: &Value, out: &mut String);
    /// Opens a text block (closing the open one); its index.
    fn open_text(&mut self, out: &mut String) -> usize;
    /// Opens the block of Chat tool call `call` (index `tool`); its index.
    fn open_tool(&mut self, call: &Value, tool: u64, out: &mut String) -> usize;
    fn text_delta(&mut self, index: usize, text: &str, out: &mut String);
    fn arguments_delta(&mut self, index: usize, arguments: &str, out: &mut String);
    /// The closing events: the open block's, then the stream's.
    fn end(&mut self, out: &mut String);
    /// A mid-stream error, `{message, type?, code?}`.
    fn error(&mut self, error: &Value, out: &mut String);

    /// Ends the stream, once.
    fn stop(&mut self, out: &mut String) {
        if !std::mem::replace(&mut self.progress().stopped, true) {
            self.end(out);
        }
    }

    fn event(&mut self, event: ChatEvent, out: &mut String) {
        if self.progress().stopped {
            return;
        }
        match event {
            ChatEvent::Chunk(chunk) => {
                self.start(&chunk["model"], out);
                self.progress().note(&chunk);
                let delta = &chunk["choices"][0]["delta"];
                if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
                    let index = match self.progress().open {
                        Some((index, None)) => index,
                        _ => self.open_text(out),
                    };
                    self.text_delta(index, text, out);
                }
                for call in delta["tool_calls"].as_array().into_iter().flatten() {
                    let tool = call["index"].as_u64().unwrap_or(0);
                    let index = match self.progress().open {
                        Some((index, Some(t))) if t == tool => index,
                        _ => self.open_tool(call, tool, out),
                    };
                    if let Some(arguments) = call["function"]["arguments"]
                        .as_str()
                        .filter(|a| !a.is_empty())
                    {
                        self.arguments_delta(index, arguments, out);
                    }
                }
            }
            ChatEvent::Done => {
                self.start(&Value::Null, out);
                self.stop(out);
            }
            ChatEvent::Error(e) => {
                self.error(&e["error"], out);
                self.progress().stopped = true;
            }
        }
    }
}

/// Chat events → Messages events.
#[derive(Default)]
struct MessagesEncoder {
    started: bool,
    next_index: usize,
    progress: Progress,
}

impl MessagesEncoder {
    fn close_block(&mut self, out: &mut String) {
        if let Some((index, _)) = self.progress.open.take() {
            out.push_str(&sse(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn open_block(&mut self, block: Value, tool: Option<u64>, out: &mut String) -> usize {
        self.close_block(out);
        let index = self.next_index;
        self.next_index += 1;
        self.progress.open = Some((index, tool));
        out.push_str(&sse(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        index
    }

    fn delta(index: usize, delta: Value, out: &mut String) {
        out.push_str(&sse(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
    }
}

impl ChunkEncoder for MessagesEncoder {
    fn progress(&mut self) -> &mut Progress {
        &mut self.progress
    }

    fn start(&mut self, model: &Value, out: &mut String) {
        if self.started {
            return;
        }
        self.started = true;
        out.push_str(&sse(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": new_id("msg_"), "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }}),
        ));
    }

    fn open_text(&mut self, out: &mut String) -> usize {
        self.open_block(json!({"type": "text", "text": ""}), None, out)
    }

    fn open_tool(&mut self, call: &Value, tool: u64, out: &mut String) -> usize {
        let id = call["id"]
            .as_str()
            .map_or_else(|| new_id("toolu_"), str::to_owned);
        self.open_block(
            json!({"type": "tool_use", "id": id, "name": call["function"]["name"], "input": {}}),
            Some(tool),
            out,
        )
    }

    fn text_delta(&mut self, index: usize, text: &str, out: &mut String) {
        Self::delta(index, json!({"type": "text_delta", "text": text}), out);
    }

    fn arguments_delta(&mut self, index: usize, arguments: &str, out: &mut String) {
        Self::delta(
            index,
            json!({"type": "input_json_delta", "partial_json": arguments}),
            out,
        );
    }

    fn end(&mut self, out: &mut String) {
        self.close_block(out);
        let stop = stop_reason(self.progress.finish.as_deref().unwrap_or("stop"));
        out.push_str(&sse(
            "message_delta",
            &json!({"type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": null},
                "usage": messages_usage(self.progress.usage())}),
        ));
        out.push_str(&sse("message_stop", &json!({"type": "message_stop"})));
    }

    fn error(&mut self, error: &Value, out: &mut String) {
        let kind = error["type"].as_str().unwrap_or("api_error");
        out.push_str(&sse(
            "error",
            &json!({"type": "error", "error": {"type": kind, "message": error["message"]}}),
        ));
    }
}

/// Chat events → Responses events (`response.created` … `response.completed`), each with its
/// `sequence_number`.
#[derive(Default)]
struct ResponsesEncoder {
    response: Option<Value>,
    seq: u64,
    /// Output items so far, completed ones as they will appear in `response.completed`.
    output: Vec<Value>,
    progress: Progress,
}

impl ResponsesEncoder {
    fn emit(&mut self, kind: &str, mut data: Value, out: &mut String) {
        data["type"] = kind.into();
        data["sequence_number"] = self.seq.into();
        self.seq += 1;
        out.push_str(&sse(kind, &data));
    }

    fn close_item(&mut self, out: &mut String) {
        let Some((index, _)) = self.progress.open.take() else {
            return;
        };
        let mut item = self.output[index].clone();
        item["status"] = "completed".into();
        let id = item["id"].clone();
        if item["type"] == "message" {
            let text = item["content"][0]["text"].clone();
            self.emit(
                "response.output_text.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                out,
            );
            self.emit(
                "response.content_part.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": item["content"][0]}),
                out,
            );
        } else {
            self.emit(
                "response.function_call_arguments.done",
                json!({"item_id": id, "output_index": index, "arguments": item["arguments"]}),
                out,
            );
        }
        self.output[index] = item.clone();
        self.emit(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
            out,
        );
    }

    fn open_item(&mut self, item: Value, tool: Option<u64>, out: &mut String) -> usize {
        self.close_item(out);
        let index = self.output.len();
        self.output.push(item.clone());
        self.progress.open = Some((index, tool));
        self.emit(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
            out,
        );
        index
    }
}

/// Appends `piece` to the string in `slot`.
fn append(slot: &mut Value, piece: &str) {
    let sofar = slot.as_str().unwrap_or("").to_owned();
    *slot = (sofar + piece).into();
}

impl ChunkEncoder for ResponsesEncoder {
    fn progress(&mut self) -> &mut Progress {
        &mut self.progress
    }

    fn start(&mut self, model: &Value, out: &mut String) {
        if self.response.is_some() {
            return;
        }
        let response = json!({
            "id": new_id("resp_"), "object": "response", "created_at": now_secs(),
            "status": "in_progress", "model": model, "output": [], "usage": null, "error": null,
            "incomplete_details": null,
        });
        self.response = Some(response.clone());
        self.emit(
            "response.created",
            json!({"response": response.clone()}),
            out,
        );
        self.emit("response.in_progress", json!({"response": response}), out);
    }

    fn open_text(&mut self, out: &mut String) -> usize {
        let index = self.open_item(
            json!({"type": "message", "id": new_id("msg_"), "status": "in_progress", "role": "assistant", "content": []}),
            None,
            out,
        );
        let part = json!({"type": "output_text", "text": "", "annotations": []});
        self.output[index]["content"] = json!([part]);
        let id = self.output[index]["id"].clone();
        self.emit(
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
            out,
        );
        index
    }

    fn open_tool(&mut self, call: &Value, tool: u64, out: &mut String) -> usize {
        let call_id = call["id"]
            .as_str()
            .map_or_else(|| new_id("call_"), str::to_owned);
        self.open_item(
            json!({"type": "function_call", "id": new_id("fc_"), "status": "in_progress",
                "call_id": call_id, "name": call["function"]["name"], "arguments": ""}),
            Some(tool),
            out,
        )
    }

    fn text_delta(&mut self, index: usize, text: &str, out: &mut String) {
        let item = &mut self.output[index];
        append(&mut item["content"][0]["text"], text);
        let id = item["id"].clone();
        self.emit(
            "response.output_text.delta",
            json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text}),
            out,
        );
    }

    fn arguments_delta(&mut self, index: usize, arguments: &str, out: &mut String) {
        let item = &mut self.output[index];
        append(&mut item["arguments"], arguments);
        let id = item["id"].clone();
        self.emit(
            "response.function_call_arguments.delta",
            json!({"item_id": id, "output_index": index, "delta": arguments}),
            out,
        );
    }

    fn end(&mut self, out: &mut String) {
        self.close_item(out);
        let mut response = self.response.clone().unwrap_or(Value::Null);
        let truncated = self.progress.finish.as_deref() == Some("length");
        response["status"] = if truncated { "incomplete" } else { "completed" }.into();
        if truncated {
            response["incomplete_details"] = json!({"reason": "max_output_tokens"});
        }
        response["output"] = Value::Array(std::mem::take(&mut self.output));
        response["usage"] = responses_usage(self.progress.usage());
        let kind = if truncated {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.emit(kind, json!({"response": response}), out);
    }

    fn error(&mut self, error: &Value, out: &mut String) {
        self.emit(
            "error",
            json!({"code": error.get("code").cloned().unwrap_or(Value::Null), "message": error["message"], "param": null}),
            out,
        );
    }
}

#[cfg(test)]
mod tests;
