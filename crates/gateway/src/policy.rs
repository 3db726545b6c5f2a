//! Organization gateway policy (reference §1.7b and §1.10): which models the organization's
//! members may use (an allow-list of exact ids or `vendor/*`), how much of the organization's
//! balance each member may spend per UTC day, and the organization's own custom models, asked
//! for as `kilo/<id>` and sent to the organization's endpoint with its key. One
//! `gateway_policy` actor per organization (key: the organization id) holds it; requests read it
//! with a point read.

use std::collections::BTreeMap;

use kilocloud_identity::{Error, Result};
use kilocloud_substrate::{Actor, ActorContext, Result as SubResult, Substrate};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::catalog::Provider;
use crate::config::{ModelConfig, ProviderKind};

const POLICY: &str = "policy";
/// Most allow-list entries, custom models and per-member limits in one policy.
pub const MAX_POLICY_ENTRIES: usize = 200;
/// Secrets a custom model may use as its key start with this, so an admin cannot send the
/// organization's other secrets (BYOK keys, session secrets) to an endpoint they choose.
pub const CUSTOM_MODEL_SECRET_PREFIX: &str = "CUSTOM_MODEL_";

/// An organization's gateway policy. The default (empty) policy allows every model, sets no
/// per-member limit and has no custom models.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct OrgPolicy {
    /// Models members may use: exact ids (`anthropic/claude-sonnet-4.6`) or a vendor's
    /// models (`anthropic/*`). Empty: every model. Checked against the model after
    /// `kilo/auto` resolution; custom models are always allowed. Others answer 404
    /// `model_not_allowed`.
    pub model_allow_list: Vec<String>,
    /// Microdollars of the organization's balance each member may spend per UTC day; `None`:
    /// no limit. A member at the limit gets 402 as if the balance were depleted (reference
    /// §1.10: the balance is `min(limit − spent today, org balance)`).
    pub member_daily_limit_microdollars: Option<i64>,
    /// Per-member overrides of `memberDailyLimitMicrodollars`, by user id.
    pub member_daily_limits: BTreeMap<Uuid, i64>,
    /// The organization's own models, served from its endpoint, never charged.
    pub custom_models: Vec<CustomModel>,
}

/// A custom model of an organization: `kilo/<id>` goes to `baseUrl` with the key held in the
/// organization's secret `apiKeySecret` (set through `PUT /api/secrets/{name}`, encrypted at
/// rest). The organization pays its endpoint itself, so these requests are never charged and
/// need no balance (reference §1.10).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomModel {
    /// Asked for as `kilo/<id>`: 1–64 characters of `A-Z a-z 0-9 . _ -`; not `auto`.
    pub id: String,
    /// `openai-compatible` (Chat Completions and Embeddings) or `anthropic` (Messages).
    #[schema(value_type = String)]
    pub kind: ProviderKind,
    /// Base URL, `http://` or `https://`, e.g. `https://llm.example.com/v1`.
    pub base_url: String,
    /// Model id sent to the endpoint.
    pub upstream_model: String,
    /// Name of the organization's secret holding the endpoint's API key, starting with
    /// `CUSTOM_MODEL_`; empty: none sent.
    #[serde(default)]
    pub api_key_secret: String,
    /// Context window, tokens (for clients; 0 when unknown).
    #[serde(default)]
    pub context_length: u64,
}

impl CustomModel {
    /// The provider to call, with the key read from the organization's secret.
    pub fn provider(&self, api_key: String) -> Provider {
        Provider {
            id: format!("custom:{}", self.id),
            kind: self.kind,
            base_url: self.base_url.trim_end_matches('/').to_owned(),
            api_key,
            models: Vec::new(),
            byok_family: String::new(),
        }
    }

    /// The model's entry for routing and metering: sent as `upstreamModel`, priced at zero.
    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            id: format!("kilo/{}", self.id),
            upstream_id: self.upstream_model.clone(),
            context_length: self.context_length,
            input_price: 0.0,
            output_price: 0.0,
            cache_read_price: 0.0,
            cache_write_price: 0.0,
            free: false,
            fallback_providers: Vec::new(),
        }
    }
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl OrgPolicy {
    /// Checks the policy; the error names the offending entry.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.model_allow_list.len() > MAX_POLICY_ENTRIES
            || self.custom_models.len() > MAX_POLICY_ENTRIES
            || self.member_daily_limits.len() > MAX_POLICY_ENTRIES
        {
            return Err(format!(
                "a policy holds at most {MAX_POLICY_ENTRIES} allow-list entries, custom models \
                 and member limits each"
            ));
        }
        for entry in &self.model_allow_list {
            let id = entry.strip_suffix("/*").unwrap_or(entry);
            if id.is_empty()
                || id.len() > 200
                || id.contains('*')
                || id.contains(char::is_whitespace)
            {
                return Err(format!(
                    "allow-list entry `{entry}` must be a model id or `vendor/*`"
                ));
            }
        }
        if let Some(user) = self
            .member_daily_limits
            .iter()
            .find_map(|(user, l)| (*l < 0).then_some(user))
        {
            return Err(format!(
                "the daily limit of member {user} must be ≥ 0 microdollars"
            ));
        }
        if self.member_daily_limit_microdollars.is_some_and(|l| l < 0) {
            return Err("memberDailyLimitMicrodollars must be ≥ 0".into());
        }
        for (i, m) in self.custom_models.iter().enumerate() {
            if !valid_id(&m.id) || m.id.eq_ignore_ascii_case("auto") {
                return Err(format!(
                    "custom model id `{}` must be 1–64 characters of A-Z a-z 0-9 . _ - and not \
                     `auto`",
                    m.id
                ));
            }
            if !m.api_key_secret.is_empty()
                && !m.api_key_secret.starts_with(CUSTOM_MODEL_SECRET_PREFIX)
            {
                return Err(format!(
                    "custom model `{}`: apiKeySecret must name a secret starting with \
                     {CUSTOM_MODEL_SECRET_PREFIX}",
                    m.id
                ));
            }
            if self.custom_models[..i].iter().any(|o| o.id == m.id) {
                return Err(format!("custom model `{}` is listed twice", m.id));
            }
            if m.kind == ProviderKind::Openrouter {
                return Err(format!(
                    "custom model `{}`: kind must be openai-compatible or anthropic",
                    m.id
                ));
            }
            if !(m.base_url.starts_with("http://") || m.base_url.starts_with("https://"))
                || m.base_url.len() > 500
            {
                return Err(format!(
                    "custom model `{}`: baseUrl must be an http(s) URL",
                    m.id
                ));
            }
            if m.upstream_model.is_empty() || m.upstream_model.len() > 200 {
                return Err(format!(
                    "custom model `{}`: upstreamModel must be 1–200 characters",
                    m.id
                ));
            }
        }
        Ok(())
    }

    /// Whether members may use `model` (an id after `kilo/auto` resolution).
    pub fn allows(&self, model: &str) -> bool {
        self.model_allow_list.is_empty()
            || self
                .model_allow_list
                .iter()
                .any(|entry| match entry.strip_suffix("/*") {
                    Some(vendor) => model
                        .strip_prefix(vendor)
                        .is_some_and(|rest| rest.starts_with('/')),
                    None => entry == model,
                })
    }

    /// The custom model asked for as `requested` (`kilo/<id>`), if the organization has it.
    pub fn custom_model(&self, requested: &str) -> Option<&CustomModel> {
        let id = requested.strip_prefix("kilo/")?;
        self.custom_models.iter().find(|m| m.id == id)
    }

    /// `user`'s daily limit in microdollars, if any: their override, else the default.
    pub fn member_daily_limit(&self, user: Uuid) -> Option<i64> {
        self.member_daily_limits
            .get(&user)
            .copied()
            .or(self.member_daily_limit_microdollars)
    }
}

struct PolicyActor;

impl Actor for PolicyActor {
    const TYPE: &'static str = "gateway_policy";
    type Call = OrgPolicy;
    type Reply = ();

    async fn call(&self, ctx: &mut ActorContext, policy: OrgPolicy) -> SubResult<()> {
        if policy == OrgPolicy::default() {
            ctx.delete(POLICY);
        } else {
            ctx.put(POLICY, &policy)?;
        }
        Ok(())
    }
}

/// Organizations' policies.
#[derive(Clone)]
pub struct Policies {
    sub: Substrate,
}

impl Policies {
    /// Registers the `gateway_policy` actor on `sub` (before [`Substrate::start`]).
    pub fn new(sub: &Substrate) -> Self {
        sub.actors().register(PolicyActor);
        Self { sub: sub.clone() }
    }

    /// The organization's policy (the default when none was set), by a point read.
    pub async fn get(&self, org: Uuid) -> Result<OrgPolicy> {
        let policy: Option<OrgPolicy> = self
            .sub
            .actor_read(PolicyActor::TYPE, &org.to_string(), POLICY)
            .await?;
        Ok(policy.unwrap_or_default())
    }

    /// Replaces the organization's policy.
    ///
    /// Errors: [`Error::Invalid`] naming the offending entry (see [`OrgPolicy::validate`]).
    pub async fn put(&self, org: Uuid, policy: OrgPolicy) -> Result<()> {
        policy.validate().map_err(Error::Invalid)?;
        self.sub
            .actors()
            .call::<PolicyActor>(&org.to_string(), policy)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_matches_exact_ids_and_vendors() {
        let p = OrgPolicy {
            model_allow_list: vec!["anthropic/*".into(), "openai/gpt-5".into()],
            ..OrgPolicy::default()
        };
        for (model, allowed) in [
            ("anthropic/claude-sonnet-4.6", true),
            ("anthropic", false),
            ("anthropicx/model", false),
            ("openai/gpt-5", true),
            ("openai/gpt-5-mini", false),
            ("vendor/free", false),
        ] {
            assert_eq!(p.allows(model), allowed, "{model}");
        }
        assert!(OrgPolicy::default().allows("anything/at-all"));
    }

    #[test]
    fn validation_names_the_culprit() {
        let custom = |id: &str, url: &str| CustomModel {
            id: id.into(),
            kind: ProviderKind::OpenaiCompatible,
            base_url: url.into(),
            upstream_model: "m".into(),
            api_key_secret: String::new(),
            context_length: 0,
        };
        let cases = [
            (
                OrgPolicy {
                    model_allow_list: vec!["*".into()],
                    ..OrgPolicy::default()
                },
                "`*`",
            ),
            (
                OrgPolicy {
                    member_daily_limit_microdollars: Some(-1),
                    ..OrgPolicy::default()
                },
                "memberDailyLimitMicrodollars",
            ),
            (
                OrgPolicy {
                    custom_models: vec![custom("a b", "https://x")],
                    ..OrgPolicy::default()
                },
                "`a b`",
            ),
            (
                OrgPolicy {
                    custom_models: vec![custom("a", "ftp://x")],
                    ..OrgPolicy::default()
                },
                "baseUrl",
            ),
            (
                OrgPolicy {
                    custom_models: vec![custom("auto", "https://x")],
                    ..OrgPolicy::default()
                },
                "`auto`",
            ),
            (
                OrgPolicy {
                    custom_models: vec![CustomModel {
                        api_key_secret: "BYOK_ANTHROPIC".into(),
                        ..custom("a", "https://x")
                    }],
                    ..OrgPolicy::default()
                },
                "CUSTOM_MODEL_",
            ),
            (
                OrgPolicy {
                    custom_models: vec![custom("a", "https://x"), custom("a", "https://y")],
                    ..OrgPolicy::default()
                },
                "twice",
            ),
        ];
        for (policy, culprit) in cases {
            let err = policy.validate().unwrap_err();
            assert!(err.contains(culprit), "{err} names {culprit}");
        }
        let ok = OrgPolicy {
            custom_models: vec![custom("team-llm", "https://llm.example.com/v1/")],
            member_daily_limits: [(Uuid::nil(), 5)].into(),
            member_daily_limit_microdollars: Some(10),
            ..OrgPolicy::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.member_daily_limit(Uuid::nil()), Some(5));
        assert_eq!(ok.member_daily_limit(Uuid::from_u128(1)), Some(10));
        let m = ok.custom_model("kilo/team-llm").unwrap();
        assert_eq!(
            m.provider(String::new()).base_url,
            "https://llm.example.com/v1"
        );
        assert!(ok.custom_model("team-llm").is_none());
    }
}
