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

/// Watches an SSE byte stream as it passes through, without changing or holding it, and keeps
/// the last `usage` object seen in a `data:` event (OpenAI sends it in the final chunk when
/// `stream_options.include_usage` is set).
#[derive(Debug, Default)]
pub struct SseUsageScanner {
    line: Vec<u8>,
    usage: Option<Usage>,
}

/// Longest SSE line kept for parsing, bytes; a longer line is skipped (a usage chunk is small).
const MAX_LINE: usize = 1 << 20;

impl SseUsageScanner {
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
        if let Ok(event) = serde_json::from_slice::<Value>(data.trim_ascii_start())
            && let Some(usage) = event.get("usage").and_then(Usage::from_openai)
        {
            self.usage = Some(usage);
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
        let mut none = SseUsageScanner::default();
        none.feed(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert_eq!(none.usage(), None);
    }
}
