//! Usage from an upstream response, in the body or in the Server-Sent Events stream, and its
//! cost in microdollars (reference §1, "Usage and credits accounting").

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::ModelConfig;

/// Tokens of one request, and the cost the provider reported (OpenRouter's `usage.cost`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Input tokens not read from or written to the cache.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Input tokens read from the provider's cache.
    pub cache_read_tokens: u64,
    /// Input tokens written to the provider's cache.
    pub cache_write_tokens: u64,
    /// Cost the provider reported, USD.
    pub reported_cost_usd: Option<f64>,
}

impl Usage {
    /// Reads an OpenAI `usage` object: `prompt_tokens` (which includes cached tokens),
    /// `completion_tokens`, `prompt_tokens_details.cached_tokens` and `.cache_write_tokens`,
    /// and OpenRouter's `cost`. `None` unless it is an object with token counts.
    pub fn from_openai(usage: &Value) -> Option<Self> {
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let prompt = usage.get("prompt_tokens")?.as_u64()?;
        let details = &usage["prompt_tokens_details"];
        let cache_read = n(&details["cached_tokens"]);
        let cache_write = n(&details["cache_write_tokens"]);
        Some(Self {
            input_tokens: prompt.saturating_sub(cache_read + cache_write),
            output_tokens: n(&usage["completion_tokens"]),
            cache_read_tokens: cache_read,
            cache_write_tokens: cache_write,
            reported_cost_usd: usage["cost"]
                .as_f64()
                .filter(|c| c.is_finite() && *c >= 0.0),
        })
    }

    /// Reads an Anthropic Messages `usage` object: `input_tokens` (excluding cache),
    /// `output_tokens`, `cache_read_input_tokens`, `cache_creation_input_tokens`. `None` unless
    /// it has `input_tokens` or `output_tokens`.
    pub fn from_anthropic(usage: &Value) -> Option<Self> {
        let n = |k: &str| usage[k].as_u64();
        if n("input_tokens").is_none() && n("output_tokens").is_none() {
            return None;
        }
        Some(Self {
            input_tokens: n("input_tokens").unwrap_or(0),
            output_tokens: n("output_tokens").unwrap_or(0),
            cache_read_tokens: n("cache_read_input_tokens").unwrap_or(0),
            cache_write_tokens: n("cache_creation_input_tokens").unwrap_or(0),
            reported_cost_usd: None,
        })
    }

    /// What the request cost, microdollars: from the model's prices when the catalog has it
    /// (USD per million tokens = microdollars per token), else the provider's reported cost,
    /// else 0. Rounded up to a whole microdollar, so no paid request costs nothing.
    pub fn cost_microdollars(&self, model: Option<&ModelConfig>) -> i64 {
        let usd_micros = match model {
            Some(m) => {
                self.input_tokens as f64 * m.input_price
                    + self.output_tokens as f64 * m.output_price
                    + self.cache_read_tokens as f64 * m.cache_read_price
                    + self.cache_write_tokens as f64 * m.cache_write_price
            }
            None => self.reported_cost_usd.unwrap_or(0.0) * 1e6,
        };
        usd_micros.ceil() as i64
    }
}

/// The wire format of a stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StreamFormat {
    /// OpenAI Chat Completions chunks: the last chunk carries `usage` when
    /// `stream_options.include_usage` is set.
    #[default]
    OpenAi,
    /// Anthropic Messages events: `message_start` carries the input usage, `message_delta` the
    /// running output count.
    Anthropic,
}

/// Watches an SSE byte stream as it passes through, without changing or holding it, and keeps
/// the usage it reports and whether it has ended properly.
#[derive(Debug, Default)]
pub struct SseUsageScanner {
    format: StreamFormat,
    lines: SseLines,
    usage: Option<Usage>,
    /// Generated content seen (text and tool-call arguments), at most [`MAX_CONTENT`] bytes,
    /// for estimating the output when the stream ends before reporting usage.
    content: String,
    /// Bytes of content beyond [`MAX_CONTENT`], estimated at 4 a token.
    content_overflow: u64,
    /// The terminal event went by: OpenAI's `data: [DONE]`, Anthropic's `message_stop`.
    complete: bool,
}

/// Most generated content kept for counting its tokens, bytes.
const MAX_CONTENT: usize = 4 << 20;

/// Longest SSE line kept, bytes (16 MiB: a chunk with a large tool-call argument still fits);
/// the rest of a longer line is dropped.
const MAX_LINE: usize = 16 << 20;

/// Splits an SSE byte stream into lines, across chunk boundaries. Lines end in CRLF, LF or CR
/// (WHATWG HTML, "Server-sent events").
#[derive(Debug, Default)]
pub struct SseLines {
    line: Vec<u8>,
    /// The last byte was `\r`: a following `\n` ends no second line.
    after_cr: bool,
}

impl SseLines {
    /// Consumes `bytes`, calling `on_line` with each line completed (without its end).
    pub fn feed(&mut self, bytes: &[u8], mut on_line: impl FnMut(&[u8])) {
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    on_line(&self.line);
                    self.line.clear();
                }
                _ => {
                    self.after_cr = false;
                    if self.line.len() < MAX_LINE {
                        self.line.push(b);
                    }
                }
            }
        }
    }
}

/// The payload of an SSE `data:` line, trimmed; `None` for any other line.
pub fn sse_data(line: &[u8]) -> Option<&[u8]> {
    Some(line.strip_prefix(b"data:")?.trim_ascii())
}

impl SseUsageScanner {
    /// A scanner for streams in `format`.
    pub fn new(format: StreamFormat) -> Self {
        Self {
            format,
            ..Self::default()
        }
    }

    /// Consumes the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut lines = std::mem::take(&mut self.lines);
        lines.feed(bytes, |line| self.line_done(line));
        self.lines = lines;
    }

    fn line_done(&mut self, line: &[u8]) {
        let Some(data) = sse_data(line) else {
            return;
        };
        if data == b"[DONE]" {
            self.complete |= self.format == StreamFormat::OpenAi;
            return;
        }
        let Ok(event) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        for piece in content(&event) {
            if self.content.len() + piece.len() <= MAX_CONTENT {
                self.content.push_str(piece);
            } else {
                self.content_overflow += piece.len() as u64;
            }
        }
        match self.format {
            StreamFormat::OpenAi => {
                if let Some(usage) = event.get("usage").and_then(Usage::from_openai) {
                    self.usage = Some(usage);
                }
            }
            StreamFormat::Anthropic => match event["type"].as_str() {
                Some("message_start") => {
                    self.usage = Usage::from_anthropic(&event["message"]["usage"]);
                }
                Some("message_stop") => self.complete = true,
                Some("message_delta") => {
                    let delta = &event["usage"];
                    let usage = self.usage.get_or_insert_with(Usage::default);
                    if let Some(out) = delta["output_tokens"].as_u64() {
                        usage.output_tokens = out;
                    }
                    if let Some(input) = delta["input_tokens"].as_u64() {
                        usage.input_tokens = input;
                    }
                }
                _ => {}
            },
        }
    }

    /// The format it reads.
    pub fn format(&self) -> StreamFormat {
        self.format
    }

    /// The usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether the stream's terminal event went by (OpenAI `data: [DONE]`, Anthropic
    /// `message_stop`): the response is complete, whatever happens to the connection after.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Output tokens estimated from the content seen, counted with the `cl100k_base` tokenizer
    /// (deterministic), for streams that end before reporting usage.
    pub fn estimated_output_tokens(&self) -> u64 {
        count_tokens(&self.content) + self.content_overflow.div_ceil(4)
    }
}

/// The generated content of one stream event: OpenAI `delta.content` and tool-call
/// `arguments`; Anthropic `text_delta.text` and `input_json_delta.partial_json`.
fn content(event: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    for c in event["choices"].as_array().into_iter().flatten() {
        let delta = &c["delta"];
        out.extend(delta["content"].as_str());
        for t in delta["tool_calls"].as_array().into_iter().flatten() {
            out.extend(t["function"]["arguments"].as_str());
        }
    }
    let delta = &event["delta"];
    out.extend(delta["text"].as_str());
    out.extend(delta["partial_json"].as_str());
    out
}

/// Tokens of `text` in OpenAI's `cl100k_base` encoding (tiktoken; the smaller of its two
/// current vocabularies), the estimate used for every model whose provider reports no usage. The tokenizer loads on first use (a few
/// hundred ms and tens of MB, so a server whose providers report usage never pays for it).
pub fn count_tokens(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    tiktoken_rs::cl100k_base_singleton().count_ordinary(text) as u64
}

/// Tokens the provider bills per message beside its text (role and separators; OpenAI's
/// published count for its chat models).
const TOKENS_PER_MESSAGE: u64 = 3;

/// Input tokens estimated from a request (Chat Completions, Messages or Embeddings), for
/// requests whose response never reported usage: the text of its messages (string contents
/// and text parts, tool calls' arguments, tool results), system prompt, tool definitions and
/// embedding input, counted with [`count_tokens`], plus [`TOKENS_PER_MESSAGE`] per message.
/// Images and other binary parts are not counted.
pub fn estimated_input_tokens(request: &Value) -> u64 {
    fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::String(s) => out.push(s),
            Value::Array(items) => items.iter().for_each(|i| strings(i, out)),
            Value::Object(o) => {
                for (k, v) in o {
                    // Identifiers, roles and binary payloads are not prompt text.
                    if !matches!(
                        k.as_str(),
                        "role"
                            | "type"
                            | "id"
                            | "tool_call_id"
                            | "tool_use_id"
                            | "image_url"
                            | "source"
                            | "cache_control"
                            | "media_type"
                    ) {
                        strings(v, out);
                    }
                }
            }
            _ => {}
        }
    }
    let mut text = Vec::new();
    for key in ["messages", "system", "tools", "input", "prompt"] {
        strings(&request[key], &mut text);
    }
    let messages = request["messages"].as_array().map_or(0, Vec::len) as u64;
    count_tokens(&text.join("\n")) + messages * TOKENS_PER_MESSAGE
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn openai_usage_separates_cached_tokens_and_prices_them() {
        let u = Usage::from_openai(&json!({
            "prompt_tokens": 1000, "completion_tokens": 200,
            "prompt_tokens_details": {"cached_tokens": 600, "cache_write_tokens": 100}, "cost": 0.5
        }))
        .unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.cache_read_tokens,
                u.cache_write_tokens,
                u.output_tokens
            ),
            (300, 600, 100, 200)
        );
        let model = ModelConfig {
            id: "m".into(),
            upstream_id: String::new(),
            context_length: 0,
            input_price: 3.0,
            output_price: 15.0,
            cache_read_price: 0.3,
            cache_write_price: 3.75,
            free: false,
            fallback_providers: Vec::new(),
        };
        // 300×3 + 200×15 + 600×0.3 + 100×3.75 = 900 + 3000 + 180 + 375
        assert_eq!(u.cost_microdollars(Some(&model)), 4455);
        let tiny = Usage {
            input_tokens: 1,
            ..Usage::default()
        };
        let cheap = ModelConfig {
            input_price: 0.02,
            ..model.clone()
        };
        assert_eq!(
            tiny.cost_microdollars(Some(&cheap)),
            1,
            "a fraction of a microdollar is charged as one"
        );
        assert_eq!(
            u.cost_microdollars(None),
            500_000,
            "the reported cost without a price table"
        );
        assert_eq!(Usage::from_openai(&json!(null)), None);
        assert_eq!(Usage::from_openai(&json!({"completion_tokens": 3})), None);
    }

    #[test]
    fn the_scanner_finds_usage_across_arbitrary_chunk_boundaries() {
        let stream = concat!(
            ": keep-alive\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\r\n\r\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        for split in 0..stream.len() {
            let mut s = SseUsageScanner::default();
            s.feed(&stream[..split]);
            s.feed(&stream[split..]);
            let u = s.usage().expect("usage found");
            assert_eq!(
                (u.input_tokens, u.output_tokens),
                (7, 3),
                "split at {split}"
            );
        }
        let anthropic = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"cache_read_input_tokens\":30,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n"
        );
        let mut s = SseUsageScanner::new(StreamFormat::Anthropic);
        s.feed(anthropic.as_bytes());
        let u = s.usage().unwrap();
        assert_eq!(
            (u.input_tokens, u.cache_read_tokens, u.output_tokens),
            (12, 30, 9)
        );
        let mut cr = SseUsageScanner::default();
        cr.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"abcdefgh\"}}]}\rdata: {\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\r");
        assert_eq!(
            cr.usage().map(|u| u.input_tokens),
            Some(2),
            "bare CR ends lines too"
        );
        assert_eq!(cr.estimated_output_tokens(), count_tokens("abcdefgh"));
        assert!(!cr.is_complete(), "no [DONE] yet");
        let mut none = SseUsageScanner::default();
        none.feed(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert_eq!(none.usage(), None);
        assert!(none.is_complete());
        let mut stopped = SseUsageScanner::new(StreamFormat::Anthropic);
        stopped.feed(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        assert!(stopped.is_complete());
    }

    #[test]
    fn estimates_count_real_tokens_deterministically() {
        // "Hello, world!" is 4 tokens in cl100k_base: "Hello", ",", " world", "!".
        assert_eq!(count_tokens("Hello, world!"), 4);
        let request = json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Hello, world!"},
                {"role": "user", "content": [{"type": "text", "text": "Hello, world!"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            ],
        });
        let joined = count_tokens("Hello, world!\nHello, world!");
        assert_eq!(
            estimated_input_tokens(&request),
            joined + 2 * TOKENS_PER_MESSAGE
        );
        assert_eq!(
            estimated_input_tokens(&request),
            estimated_input_tokens(&request),
            "deterministic"
        );
        let mut s = SseUsageScanner::default();
        s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello,\"}}]}\n\n");
        s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\" world!\"}}]}\n\n");
        assert_eq!(
            s.estimated_output_tokens(),
            4,
            "counted over the joined content"
        );
    }
}
