//! Gateway configuration: providers, their models and prices, and the `kilo/auto` table.
//! Documented in `docs/configuration.md` (`[gateway]`) and `docs/gateway.md`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The `[gateway]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Upstream providers, in the order the catalog lists them.
    pub providers: Vec<ProviderConfig>,
    /// Provider for models no provider lists (passed through by id). Empty: unknown models
    /// answer 404.
    pub default_provider: String,
    /// `kilo/auto`: `x-kilocode-mode` value → model id. The `default` entry serves a missing or
    /// unknown mode (reference §1.2: plan/architect/ask… → Opus, build/code… → Sonnet).
    pub auto_models: BTreeMap<String, String>,
    /// Model aliases: a model id clients send (exact, or a glob: `claude-sonnet-*`) → the id
    /// it is served as, e.g. Claude Code's default `claude-sonnet-4-5-20250929` →
    /// `anthropic/claude-sonnet-4.6`. Checked before routing, in key order (exact ids sort
    /// with the rest; a request matching several globs takes the first); the usage row keeps
    /// the id asked for. Targets must be routable (checked at start). Default: none.
    pub model_aliases: BTreeMap<String, String>,
    /// Longest silence of an upstream response once it has started (between two chunks of
    /// the body), ms: an idle timeout, so a long stream that keeps sending is never cut.
    /// Default 120,000. A stream cut by it ends with an error event (`docs/gateway.md`).
    pub upstream_timeout_ms: u64,
    /// Longest wait for the upstream response to start (its status and headers), ms. Default
    /// 600,000 (10 min, the reference's timeout; a non-streaming request's whole answer is
    /// generated before its first byte).
    pub upstream_first_byte_timeout_ms: u64,
    /// Largest request body the gateway routes accept, bytes; larger ones get 413. Default
    /// 33,554,432 (32 MiB: agents send whole conversations, images included).
    pub max_body_bytes: usize,
    /// Free-model requests per client address per hour, signed in or not. Default 200.
    pub free_requests_per_hour_per_ip: u32,
    /// Anonymous free-model requests per client address per 24 h. Default 10,000.
    pub anonymous_requests_per_day_per_ip: u32,
    /// Per-key and per-owner limits; every one is off when 0.
    pub limits: Limits,
    /// Organizations' custom models may point at loopback, private and link-local addresses
    /// (off by default: an org admin must not reach the server's own network).
    pub allow_private_custom_endpoints: bool,
}

/// The `[gateway.limits]` section: request rates (per node, in memory), token rates and dollar
/// budgets (durable, across nodes, from the ledger). 0 disables a limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute per credential (API key, or the user for JWTs).
    pub requests_per_minute_per_key: u32,
    /// Requests per minute per owner acted for.
    pub requests_per_minute_per_owner: u32,
    /// Tokens (input, output and cache) per minute per credential acting for an owner, in a
    /// sliding window, counted when each request ends. Durable, across nodes.
    pub tokens_per_minute_per_key: u64,
    /// Tokens per minute per owner acted for, likewise.
    pub tokens_per_minute_per_owner: u64,
    /// USD an owner may spend per UTC day.
    pub daily_budget_usd: f64,
    /// USD an owner may spend per UTC month.
    pub monthly_budget_usd: f64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            providers: Vec::new(),
            default_provider: String::new(),
            auto_models: BTreeMap::new(),
            model_aliases: BTreeMap::new(),
            upstream_timeout_ms: 120_000,
            upstream_first_byte_timeout_ms: 600_000,
            max_body_bytes: 32 * 1024 * 1024,
            free_requests_per_hour_per_ip: 200,
            anonymous_requests_per_day_per_ip: 10_000,
            limits: Limits::default(),
            allow_private_custom_endpoints: false,
        }
    }
}

/// The wire protocol a provider speaks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// OpenAI Chat Completions (`{base_url}/chat/completions`).
    OpenaiCompatible,
    /// OpenRouter: OpenAI Chat Completions that also reports `usage.cost`.
    Openrouter,
    /// Anthropic Messages (`{base_url}/messages`, `x-api-key`, `anthropic-version`); serves
    /// `/api/gateway/v1/messages` only.
    Anthropic,
}

/// One upstream provider.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Id, shown in the catalog and the `x-kilocode-provider` response header.
    pub id: String,
    /// Protocol.
    pub kind: ProviderKind,
    /// Base URL, e.g. `https://openrouter.ai/api/v1`.
    pub base_url: String,
    /// API key. Secret; prefer `api_key_env`.
    #[serde(default)]
    pub api_key: String,
    /// Name of an environment variable holding the API key.
    #[serde(default)]
    pub api_key_env: String,
    /// BYOK: this provider also serves models `<family>/…` with the owner's own key, stored
    /// as the owner's secret `BYOK_<FAMILY>` (upper case, other characters as `_`). Empty: none.
    #[serde(default)]
    pub byok_family: String,
    /// Models this provider serves.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
}

impl fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("api_key", &if self.api_key.is_empty() { "" } else { "***" })
            .field("api_key_env", &self.api_key_env)
            .field("byok_family", &self.byok_family)
            .field("models", &self.models)
            .finish()
    }
}

/// One model of a provider. Prices are USD per million tokens, which is also microdollars per
/// token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Public id clients ask for, e.g. `anthropic/claude-sonnet-4.6`.
    pub id: String,
    /// Id sent upstream; default: `id`.
    #[serde(default)]
    pub upstream_id: String,
    /// Context window, tokens.
    #[serde(default)]
    pub context_length: u64,
    /// USD per million input tokens (not cached).
    #[serde(default)]
    pub input_price: f64,
    /// USD per million output tokens.
    #[serde(default)]
    pub output_price: f64,
    /// USD per million input tokens read from the provider's cache.
    #[serde(default)]
    pub cache_read_price: f64,
    /// USD per million input tokens written to the provider's cache.
    #[serde(default)]
    pub cache_write_price: f64,
    /// Free to callers: never charged, allowed at zero balance.
    #[serde(default)]
    pub free: bool,
    /// Providers tried in order when this one answers 5xx, times out or cannot be reached
    /// (they are sent the same upstream id).
    #[serde(default)]
    pub fallback_providers: Vec<String>,
}
