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
    /// else 0. Rounded to the nearest microdollar.
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
        usd_micros.round() as i64
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
/// the usage it reports.
#[derive(Debug, Default)]
pub struct SseUsageScanner {
    format: StreamFormat,
    line: Vec<u8>,
    usage: Option<Usage>,
}

/// Longest SSE line kept for parsing, bytes; a longer line is skipped (a usage chunk is small).
const MAX_LINE: usize = 1 << 20;

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
        for &b in bytes {
            if b == b'\n' {
                self.line_done();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }

    fn line_done(&mut self) {
        let line = std::mem::take(&mut self.line);
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let Ok(event) = serde_json::from_slice::<Value>(data.trim_ascii_start()) else {
            return;
        };
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

    /// The usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }
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
        let mut none = SseUsageScanner::default();
        none.feed(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert_eq!(none.usage(), None);
    }
}
