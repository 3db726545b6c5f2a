//! The catalog: providers and models from configuration, and routing a requested model to the
//! provider that serves it (reference §1.7): BYOK (see [`Catalog::byok`]), else the model's own
//! provider with its fallbacks, else the default provider. Organizations' custom models
//! (`kilo/<id>`) are routed by the server from their [`crate::policy`].

use std::collections::HashMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::config::{GatewayConfig, ModelConfig, ProviderKind};

/// A provider ready to call.
#[derive(Clone)]
pub struct Provider {
    /// Id.
    pub id: String,
    /// Protocol.
    pub kind: ProviderKind,
    /// Base URL without a trailing `/`.
    pub base_url: String,
    /// API key (resolved from the config or its environment variable). Never logged.
    pub api_key: String,
    /// Its models.
    pub models: Vec<ModelConfig>,
    /// BYOK family it serves with owners' keys; empty for none.
    pub byok_family: String,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("models", &self.models.len())
            .finish_non_exhaustive()
    }
}

/// Where a request goes.
#[derive(Clone)]
pub struct Route<'a> {
    /// The provider.
    pub provider: &'a Provider,
    /// Providers to try next, in order, on 5xx, timeouts and connection errors.
    pub fallbacks: Vec<&'a Provider>,
    /// The model's catalog entry; `None` when passed through to the default provider.
    pub model: Option<&'a ModelConfig>,
    /// The model id after `kilo/auto` resolution.
    pub resolved: &'a str,
}

impl Route<'_> {
    /// The id to send upstream.
    pub fn upstream_model(&self) -> &str {
        match self.model {
            Some(m) if !m.upstream_id.is_empty() => &m.upstream_id,
            _ => self.resolved,
        }
    }

    /// Free to the caller: a catalog model marked free, or a model outside the catalog whose id
    /// ends in `:free` (the OpenRouter convention).
    pub fn is_free(&self) -> bool {
        match self.model {
            Some(m) => m.free,
            None => self.resolved.ends_with(":free"),
        }
    }
}

/// A model as `GET /api/gateway/models` lists it (OpenAI's list format plus pricing).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelView {
    /// Model id.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds, as OpenAI's model object has it; always 0 (the catalog does not record
    /// when a model was released).
    pub created: i64,
    /// Provider id.
    pub owned_by: String,
    /// Context window, tokens.
    pub context_length: u64,
    /// USD per million tokens.
    pub pricing: Pricing,
    /// Free to callers.
    pub free: bool,
}

/// Prices, USD per million tokens.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Pricing {
    /// Input tokens.
    pub input: f64,
    /// Output tokens.
    pub output: f64,
    /// Input tokens read from cache.
    pub cache_read: f64,
    /// Input tokens written to cache.
    pub cache_write: f64,
}

/// A provider as `GET /api/gateway/providers` lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProviderView {
    /// Provider id.
    pub id: String,
    /// `openai-compatible`, `openrouter` or `anthropic`.
    pub kind: String,
    /// Number of catalog models.
    pub models: usize,
}

/// Providers and models, indexed for routing.
#[derive(Debug)]
pub struct Catalog {
    providers: Vec<Provider>,
    by_model: HashMap<String, (usize, usize)>,
    default: Option<usize>,
    auto: std::collections::BTreeMap<String, String>,
    /// `gateway.model_aliases`: what a client's id matches → the id it is served as.
    aliases: Vec<(globset::GlobMatcher, String)>,
}

impl Catalog {
    /// Builds the catalog. `env` reads environment variables (for `api_key_env`).
    ///
    /// Errors (one message naming the provider or model): duplicate ids, an unknown
    /// `default_provider`, a missing key variable, a negative or non-finite price, an auto
    /// entry naming a model no provider serves.
    pub fn new(
        config: &GatewayConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let mut providers = Vec::new();
        let mut by_model = HashMap::new();
        for (pi, p) in config.providers.iter().enumerate() {
            if providers.iter().any(|q: &Provider| q.id == p.id) || p.id.is_empty() {
                return Err(format!(
                    "gateway provider id `{}` is empty or repeated",
                    p.id
                ));
            }
            let api_key = match (p.api_key.is_empty(), p.api_key_env.is_empty()) {
                (false, _) => p.api_key.clone(),
                (true, false) => env(&p.api_key_env).ok_or_else(|| {
                    format!(
                        "gateway provider `{}`: environment variable {} is not set",
                        p.id, p.api_key_env
                    )
                })?,
                (true, true) => String::new(),
            };
            for (mi, m) in p.models.iter().enumerate() {
                let prices = [
                    m.input_price,
                    m.output_price,
                    m.cache_read_price,
                    m.cache_write_price,
                ];
                if prices.iter().any(|x| !x.is_finite() || *x < 0.0) {
                    return Err(format!(
                        "gateway model `{}`: prices must be finite and ≥ 0",
                        m.id
                    ));
                }
                if by_model.insert(m.id.clone(), (pi, mi)).is_some() {
                    return Err(format!("gateway model `{}` is listed twice", m.id));
                }
            }
            providers.push(Provider {
                id: p.id.clone(),
                kind: p.kind,
                base_url: p.base_url.trim_end_matches('/').to_owned(),
                api_key,
                models: p.models.clone(),
                byok_family: p.byok_family.clone(),
            });
        }
        for p in &providers {
            for m in &p.models {
                for f in &m.fallback_providers {
                    match providers.iter().find(|q| &q.id == f) {
                        Some(q) if q.id != p.id && q.kind == p.kind => {}
                        _ => {
                            return Err(format!(
                                "gateway model `{}`: fallback provider `{f}` is not another \
                                 provider of the same kind",
                                m.id
                            ));
                        }
                    }
                }
            }
        }
        let default = match config.default_provider.as_str() {
            "" => None,
            id => Some(
                providers
                    .iter()
                    .position(|p| p.id == id && p.kind == ProviderKind::Openrouter)
                    .ok_or_else(|| {
                        format!(
                            "gateway default_provider `{id}` is not an `openrouter` provider (only \
                             OpenRouter reports the cost of models outside the catalog)"
                        )
                    })?,
            ),
        };
        let mut aliases = Vec::new();
        for (pattern, target) in &config.model_aliases {
            let glob = globset::GlobBuilder::new(pattern)
                .literal_separator(false)
                .build()
                .map_err(|e| {
                    format!("gateway model_aliases: `{pattern}` is not a valid glob: {e}")
                })?;
            aliases.push((glob.compile_matcher(), target.clone()));
        }
        let catalog = Self {
            providers,
            by_model,
            default,
            auto: config.auto_models.clone(),
            aliases,
        };
        for (pattern, target) in &config.model_aliases {
            if catalog.route(target, None).is_none() {
                return Err(format!(
                    "gateway model_aliases.{pattern} = `{target}`: no provider serves it"
                ));
            }
        }
        for (mode, model) in &catalog.auto {
            if catalog.route(model, None).is_none() {
                return Err(format!(
                    "gateway auto_models.{mode} = `{model}`: no provider serves it"
                ));
            }
        }
        Ok(catalog)
    }

    /// Resolves `requested` through the aliases ([`Catalog::resolve_alias`]), then `kilo/auto`
    /// (any case) by `mode` (the `x-kilocode-mode` header; missing counts as `build`, unknown
    /// takes the `default` entry) and `kilo-auto/<tier>` by tier; other ids are returned as
    /// they are. `None` when the table has no answer.
    pub fn resolve_auto<'a>(&'a self, requested: &'a str, mode: Option<&str>) -> Option<&'a str> {
        let requested = self.resolve_alias(requested);
        let lower = requested.to_ascii_lowercase();
        let key = if lower == "kilo/auto" {
            mode.unwrap_or("build").to_ascii_lowercase()
        } else if let Some(tier) = lower.strip_prefix("kilo-auto/") {
            tier.to_owned()
        } else {
            return Some(requested);
        };
        self.auto
            .get(&key)
            .or_else(|| self.auto.get("default"))
            .map(String::as_str)
    }

    /// `requested` through `gateway.model_aliases` (the first matching alias's target), or as
    /// it is.
    pub fn resolve_alias<'a>(&'a self, requested: &'a str) -> &'a str {
        self.aliases
            .iter()
            .find(|(glob, _)| glob.is_match(requested))
            .map_or(requested, |(_, target)| target.as_str())
    }

    /// The provider for `model` (already resolved), first match wins: the model's own provider,
    /// else the default provider. `mode` is unused unless `model` is an auto id.
    pub fn route<'a>(&'a self, model: &'a str, mode: Option<&str>) -> Option<Route<'a>> {
        let resolved = self.resolve_auto(model, mode)?;
        if let Some(&(p, m)) = self.by_model.get(resolved) {
            let provider = &self.providers[p];
            let model = &provider.models[m];
            let fallbacks = model
                .fallback_providers
                .iter()
                .filter_map(|id| self.provider(id))
                .collect();
            return Some(Route {
                provider,
                fallbacks,
                model: Some(model),
                resolved,
            });
        }
        self.default.map(|d| Route {
            provider: &self.providers[d],
            fallbacks: Vec::new(),
            model: None,
            resolved,
        })
    }

    /// A provider by id.
    pub fn provider(&self, id: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.id == id)
    }

    /// The provider serving BYOK requests for `model` (`<family>/…`), and the name of the
    /// owner's secret holding their key for it.
    pub fn byok(&self, model: &str) -> Option<(&Provider, String)> {
        let family = model.split_once('/')?.0;
        let provider = self
            .providers
            .iter()
            .find(|p| !p.byok_family.is_empty() && p.byok_family.eq_ignore_ascii_case(family))?;
        let secret: String = family
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        Some((provider, format!("BYOK_{secret}")))
    }

    /// Every catalog model.
    pub fn models(&self) -> Vec<ModelView> {
        self.providers
            .iter()
            .flat_map(|p| {
                p.models.iter().map(|m| ModelView {
                    id: m.id.clone(),
                    object: "model",
                    created: 0,
                    owned_by: p.id.clone(),
                    context_length: m.context_length,
                    pricing: Pricing {
                        input: m.input_price,
                        output: m.output_price,
                        cache_read: m.cache_read_price,
                        cache_write: m.cache_write_price,
                    },
                    free: m.free,
                })
            })
            .collect()
    }

    /// The models a client without its own choice should use: `kilo/auto` when the auto table
    /// has entries, else the first paid catalog model (else the first); and the first free
    /// model, else `kilo-auto/free`.
    pub fn default_models(&self) -> (Option<String>, String) {
        let models: Vec<&ModelConfig> = self.providers.iter().flat_map(|p| &p.models).collect();
        let paid = if self.auto.is_empty() {
            models
                .iter()
                .find(|m| !m.free)
                .or(models.first())
                .map(|m| m.id.clone())
        } else {
            Some("kilo/auto".to_owned())
        };
        let free = models
            .iter()
            .find(|m| m.free)
            .map_or_else(|| "kilo-auto/free".to_owned(), |m| m.id.clone());
        (paid, free)
    }

    /// Every catalog model with the provider that serves it, in catalog order.
    pub fn entries(&self) -> impl Iterator<Item = (&Provider, &ModelConfig)> {
        self.providers
            .iter()
            .flat_map(|p| p.models.iter().map(move |m| (p, m)))
    }

    /// One catalog model by id (exact).
    pub fn model(&self, id: &str) -> Option<ModelView> {
        self.models().into_iter().find(|m| m.id == id)
    }

    /// Every provider.
    pub fn providers(&self) -> Vec<ProviderView> {
        self.providers
            .iter()
            .map(|p| ProviderView {
                id: p.id.clone(),
                kind: match p.kind {
                    ProviderKind::OpenaiCompatible => "openai-compatible".into(),
                    ProviderKind::Openrouter => "openrouter".into(),
                    ProviderKind::Anthropic => "anthropic".into(),
                },
                models: p.models.len(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProviderConfig;

    fn model(id: &str, free: bool) -> ModelConfig {
        ModelConfig {
            id: id.into(),
            upstream_id: String::new(),
            context_length: 1000,
            input_price: 3.0,
            output_price: 15.0,
            cache_read_price: 0.3,
            cache_write_price: 3.75,
            free,
            fallback_providers: Vec::new(),
        }
    }

    fn config() -> GatewayConfig {
        let provider = |id: &str, models| ProviderConfig {
            id: id.into(),
            kind: if id == "a" {
                ProviderKind::Openrouter
            } else {
                ProviderKind::OpenaiCompatible
            },
            base_url: format!("http://{id}/v1/"),
            api_key: String::new(),
            api_key_env: format!("{}_KEY", id.to_uppercase()),
            byok_family: if id == "b" {
                "anthropic".into()
            } else {
                String::new()
            },
            models,
        };
        GatewayConfig {
            providers: vec![
                provider(
                    "a",
                    vec![
                        model("anthropic/sonnet", false),
                        model("anthropic/opus", false),
                    ],
                ),
                provider("b", vec![model("free/small", true)]),
            ],
            default_provider: "a".into(),
            auto_models: [
                ("build", "anthropic/sonnet"),
                ("plan", "anthropic/opus"),
                ("default", "anthropic/sonnet"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            upstream_timeout_ms: 1000,
            ..GatewayConfig::default()
        }
    }

    fn env(name: &str) -> Option<String> {
        Some(format!("key-of-{name}"))
    }

    #[test]
    fn routes_by_model_then_default_and_resolves_auto() {
        let c = Catalog::new(&config(), env).unwrap();
        let r = c.route("free/small", None).unwrap();
        assert_eq!((r.provider.id.as_str(), r.is_free()), ("b", true));
        assert_eq!(r.provider.api_key, "key-of-B_KEY");
        assert_eq!(r.provider.base_url, "http://b/v1");
        let r = c.route("vendor/unknown", None).unwrap();
        assert_eq!((r.provider.id.as_str(), r.model.is_none()), ("a", true));
        assert!(c.route("vendor/x:free", None).unwrap().is_free());
        for (mode, want) in [
            (None, "anthropic/sonnet"),
            (Some("PLAN"), "anthropic/opus"),
            (Some("nonsense"), "anthropic/sonnet"),
        ] {
            assert_eq!(
                c.route("Kilo/Auto", mode).unwrap().resolved,
                want,
                "{mode:?}"
            );
        }
        assert_eq!(
            c.route("kilo-auto/plan", None).unwrap().resolved,
            "anthropic/opus"
        );
        assert_eq!(c.models().len(), 3);
        assert_eq!(
            c.default_models(),
            (Some("kilo/auto".to_owned()), "free/small".to_owned())
        );
        let (byok, secret) = c.byok("Anthropic/sonnet").unwrap();
        assert_eq!((byok.id.as_str(), secret.as_str()), ("b", "BYOK_ANTHROPIC"));
        assert!(c.byok("openai/gpt").is_none() && c.byok("no-slash").is_none());
    }

    #[test]
    fn aliases_map_client_ids_before_routing() {
        let mut cfg = config();
        cfg.default_provider = String::new();
        cfg.model_aliases = [
            ("claude-sonnet-4-5-20250929", "anthropic/sonnet"),
            ("claude-opus-*", "anthropic/opus"),
            ("claude-3-5-haiku-*", "free/small"),
            ("auto-for-claude", "kilo/auto"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let c = Catalog::new(&cfg, env).unwrap();
        let served = |id| c.route(id, Some("plan")).map(|r| r.resolved.to_owned());
        assert_eq!(
            served("claude-sonnet-4-5-20250929").as_deref(),
            Some("anthropic/sonnet")
        );
        assert_eq!(
            served("claude-opus-4-1-20250805").as_deref(),
            Some("anthropic/opus")
        );
        assert!(
            c.route("claude-3-5-haiku-20241022", None)
                .unwrap()
                .is_free()
        );
        assert_eq!(
            served("auto-for-claude").as_deref(),
            Some("anthropic/opus"),
            "then kilo/auto"
        );
        assert_eq!(served("claude-unknown"), None, "no alias, no provider: 404");
        assert_eq!(
            served("anthropic/sonnet").as_deref(),
            Some("anthropic/sonnet")
        );
        let mut bad = cfg.clone();
        bad.model_aliases
            .insert("claude-*".into(), "vendor/missing".into());
        let e = Catalog::new(&bad, env).unwrap_err();
        assert!(
            e.contains("model_aliases.claude-*") && e.contains("vendor/missing"),
            "{e}"
        );
        bad.model_aliases = [("claude-[".to_owned(), "anthropic/sonnet".to_owned())].into();
        assert!(
            Catalog::new(&bad, env)
                .unwrap_err()
                .contains("not a valid glob")
        );
    }

    #[test]
    fn bad_configurations_are_refused_with_the_culprit_named() {
        let mut dup = config();
        dup.providers[1]
            .models
            .push(model("anthropic/sonnet", false));
        assert!(
            Catalog::new(&dup, env)
                .unwrap_err()
                .contains("anthropic/sonnet")
        );
        let mut no_default = config();
        no_default.default_provider = "zz".into();
        assert!(Catalog::new(&no_default, env).unwrap_err().contains("zz"));
        assert!(
            Catalog::new(&config(), |_| None)
                .unwrap_err()
                .contains("A_KEY")
        );
        let mut fallback = config();
        fallback.providers[0].models[0].fallback_providers = vec!["a".into()];
        assert!(
            Catalog::new(&fallback, env)
                .unwrap_err()
                .contains("fallback")
        );
        let mut price = config();
        price.providers[0].models[0].input_price = -1.0;
        assert!(Catalog::new(&price, env).is_err());
        let mut no_default_no_auto = config();
        no_default_no_auto.default_provider.clear();
        no_default_no_auto
            .auto_models
            .insert("x".into(), "missing/model".into());
        assert!(
            Catalog::new(&no_default_no_auto, env)
                .unwrap_err()
                .contains("missing/model")
        );
        assert!(Catalog::new(&no_default_no_auto, env).is_err());
    }
}
