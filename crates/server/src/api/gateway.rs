//! The model gateway's HTTP surface: OpenAI Chat Completions proxied to the provider that
//! serves the model, streamed chunk by chunk, metered and charged to the owner acted for; the
//! catalog; the caller's balance and usage. Reference system §1.
//!
//! A request: parse → resolve `kilo/auto` and route → (paid model) balance must be > 0, else
//! 402 → forward with `stream_options.include_usage` forced on → relay the response as it
//! arrives, watching it for usage → when it ends, or the client goes away (which drops, and so
//! cancels, the upstream request), record the usage row and charge its cost in one
//! transaction, in the background after the response as the reference does (§1, `after()`),
//! so the ledger's commit is not on the client's path. The balance is checked before and
//! charged after, so concurrent requests overspend by at most what the requests in flight
//! (including those still being recorded) cost. Recordings are tracked so shutdown waits for
//! them ([`GatewayState::settle`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use kilocloud_gateway::catalog::{ModelView, Provider, ProviderView};
use kilocloud_gateway::config::{ModelConfig, ProviderKind};
use kilocloud_gateway::ledger::credential_key;
use kilocloud_gateway::{
    Catalog, Counters, CustomModel, FreeLimits, FreeModelLimiter, GatewayConfig, Ledger, OrgPolicy,
    Policies, Refusal, Route, Spend, SseUsageScanner, StreamFormat, StreamTranslator, Usage,
    UsageFilter, UsageRow, Wire, estimated_input_tokens, translate,
};
use kilocloud_identity::{Credential, Owner, Principal};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{AuditQuery, ErrorBody};
use crate::auth::{
    Admin, ClientIp, GatewayCaller, Member, OrgAccess, OwnerScope, RequireRole, SiteAdmin,
};
use crate::error::{Query, read_body};
use crate::{ApiError, AppState, Json};

/// Header naming the provider that served a request.
pub const PROVIDER_HEADER: &str = "x-kilocode-provider";
/// Header with the server's id of a gateway request: the `requestId` of its usage row.
pub const REQUEST_ID_HEADER: &str = "x-kilocode-request-id";
/// Header relaying the provider's request id (its `x-request-id`, or Anthropic's
/// `request-id`, which is also relayed under its own name).
pub const UPSTREAM_REQUEST_ID_HEADER: &str = "x-upstream-request-id";
/// Header with what a non-streaming request was charged, microdollars (streams report cost in
/// their usage, and in the usage row).
pub const COST_HEADER: &str = "x-kilocode-cost-microdollars";

/// What the gateway needs at run time.
pub struct GatewayState {
    /// Providers and models.
    pub catalog: Catalog,
    /// Balances and usage.
    pub ledger: Ledger,
    /// Free-model limits per client address.
    pub free_limiter: FreeModelLimiter,
    /// Requests per minute per credential, when limited.
    pub key_rate: Option<governor::DefaultKeyedRateLimiter<String>>,
    /// Requests per minute per owner, when limited.
    pub owner_rate: Option<governor::DefaultKeyedRateLimiter<String>>,
    /// Dollar budgets per owner, microdollars (0: none): per UTC day and month.
    pub budgets: (i64, i64),
    /// Tokens per minute (0: none): per credential and per owner.
    pub token_limits: (u64, u64),
    /// Organizations' policies.
    pub policies: Policies,
    /// Organizations' custom models may point at loopback and private addresses.
    pub private_custom_endpoints: bool,
    /// Client for upstream calls to the configured providers.
    pub http: reqwest::Client,
    /// Client for organizations' custom models: every address a name resolves to is checked
    /// at connect time, so an admin's endpoint cannot reach the server's own network by a
    /// DNS name either (unless `allow_private_custom_endpoints`).
    pub custom_http: reqwest::Client,
    /// Longest silence of an upstream response body between chunks.
    pub upstream_idle_timeout: Duration,
    /// Longest wait for an upstream response's status and headers.
    pub upstream_first_byte_timeout: Duration,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Usage recordings still running after their responses.
    recordings: Recordings,
}

impl GatewayState {
    /// Waits until no usage recording is running (each has committed or given up): at
    /// shutdown, before the substrate stops, and in tests before reading balances.
    pub async fn settle(&self) {
        let mut running = self.recordings.0.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = running.wait_for(|n| *n == 0).await;
    }
}

/// Counts the usage recordings running in the background.
#[derive(Clone)]
struct Recordings(Arc<tokio::sync::watch::Sender<usize>>);

impl Recordings {
    fn new() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(0)))
    }

    /// Runs `recording` on `runtime`, counted until it ends (or panics).
    fn spawn(
        &self,
        runtime: &tokio::runtime::Handle,
        recording: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        struct Running(Recordings);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.0.send_modify(|n| *n -= 1);
            }
        }
        self.0.send_modify(|n| *n += 1);
        let running = Running(self.clone());
        runtime.spawn(async move {
            let _running = running;
            recording.await;
        });
    }
}

/// `POST /api/gateway/chat/completions`
#[utoipa::path(post, path = "/api/gateway/chat/completions", tag = "gateway",
    request_body(content = Object, description = "OpenAI Chat Completions request"),
    responses((status = 200, description = "OpenAI Chat Completions response, or an SSE stream"),
        (status = 401, body = ErrorBody), (status = 402, description = "balance depleted"),
        (status = 404, body = ErrorBody), (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn chat_completions(
    State(s): State<AppState>,
    caller: GatewayCaller,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    proxy(s, Endpoint::Chat, caller, ip, headers, body).await
}

/// `POST /api/openrouter/chat/completions`: the reference's path, same handler.
#[utoipa::path(post, path = "/api/openrouter/chat/completions", tag = "gateway",
    request_body(content = Object, description = "OpenAI Chat Completions request"),
    responses((status = 200, description = "as /api/gateway/chat/completions")),
    security(("bearer" = [])))]
pub async fn openrouter_chat_completions(
    State(s): State<AppState>,
    caller: GatewayCaller,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    proxy(s, Endpoint::Chat, caller, ip, headers, body).await
}

/// `POST /api/gateway/v1/chat/completions`: for OpenAI SDKs with `base_url=…/api/gateway/v1`.
#[utoipa::path(post, path = "/api/gateway/v1/chat/completions", tag = "gateway",
    request_body(content = Object, description = "OpenAI Chat Completions request"),
    responses((status = 200, description = "as /api/gateway/chat/completions")),
    security(("bearer" = [])))]
pub async fn v1_chat_completions(
    State(s): State<AppState>,
    caller: GatewayCaller,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    proxy(s, Endpoint::Chat, caller, ip, headers, body).await
}

/// `POST /api/gateway/v1/messages`: the Anthropic Messages API (streaming too), for the
/// `anthropic` SDK and Claude Code with `ANTHROPIC_BASE_URL=<server>/api/gateway`. The
/// credential may come as `x-api-key` or `Authorization: Bearer`. Any model: `anthropic`
/// providers get the request as it is, OpenAI-compatible ones through Chat Completions,
/// translated both ways ([`kilocloud_gateway::translate`]).
#[utoipa::path(post, path = "/api/gateway/v1/messages", tag = "gateway",
    request_body(content = Object, description = "Anthropic Messages request"),
    responses((status = 200, description = "Anthropic Messages response, or an SSE stream"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 402, description = "balance depleted"), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn v1_messages(
    State(s): State<AppState>,
    caller: GatewayCaller,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    proxy(s, Endpoint::Messages, caller, ip, headers, body).await
}

/// `POST /api/gateway/v1/messages/count_tokens`: Anthropic's token counting (Claude Code
/// calls it to manage its context): `{model, messages, system?, tools?}` →
/// `{"input_tokens": N}`. Counted here, for any model of the catalog or of the organization
/// acted for, with the gateway's estimator ([`estimated_input_tokens`]: `cl100k_base`, 3
/// tokens a message), not by the provider: an estimate, deterministic, never charged. Open to
/// anonymous callers for free models, like the Messages route.
///
/// Errors: 400 `invalid_json`; 404 `model_not_found`; 401 `PAID_MODEL_AUTH_REQUIRED` (paid
/// model, no credentials) or the credential's own 401; 413 over `gateway.max_body_bytes`.
#[utoipa::path(post, path = "/api/gateway/v1/messages/count_tokens", tag = "gateway",
    request_body(content = Object, description = "Anthropic count_tokens request"),
    responses((status = 200, description = "`{input_tokens}`"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn v1_count_tokens(
    State(s): State<AppState>,
    caller: GatewayCaller,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = read_body(body, s.gateway.max_body_bytes).await?;
    let request: Value = json_object(&body)?;
    let model = request["model"].as_str().unwrap_or("");
    let missing = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("model `{model}` does not exist"),
        )
    };
    let scope = match caller {
        GatewayCaller::Signed(scope) => Some(scope),
        GatewayCaller::Anonymous => None,
        GatewayCaller::Unverified(u) => {
            let free = s
                .gateway
                .catalog
                .route(model, None)
                .is_some_and(|r| r.is_free());
            if !free {
                return Err(u.refuse(&s));
            }
            None
        }
    };
    let custom = match scope.as_ref().map(OwnerScope::owner) {
        Some(Owner::Org(org)) => s
            .gateway
            .policies
            .get(org)
            .await?
            .custom_model(model)
            .is_some(),
        _ => false,
    };
    if !custom {
        let route = s.gateway.catalog.route(model, None).ok_or_else(missing)?;
        if scope.is_none() && !route.is_free() {
            return Err(paid_model_auth_required());
        }
    }
    Ok(Json(
        json!({"input_tokens": estimated_input_tokens(&request)}),
    ))
}

/// `POST /api/gateway/v1/embeddings`: OpenAI Embeddings, passed through to the model's
/// provider and charged for its input tokens like a chat request.
#[utoipa::path(post, path = "/api/gateway/v1/embeddings", tag = "gateway",
    request_body(content = Object, description = "OpenAI Embeddings request"),
    responses((status = 200, description = "OpenAI Embeddings response"),
        (status = 401, body = ErrorBody), (status = 402, description = "balance depleted"),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn v1_embeddings(
    State(s): State<AppState>,
    caller: GatewayCaller,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    proxy(s, Endpoint::Embeddings, caller, ip, headers, body).await
}

/// `POST /api/gateway/v1/responses`: the OpenAI Responses API (streaming too), for the OpenAI
/// SDK's `client.responses` with `base_url=…/api/gateway/v1`, over any model: served through
/// the model's provider's own API, Chat Completions or Messages, translated both ways
/// ([`kilocloud_gateway::translate`]). Stateless: `store` is ignored and
/// `previous_response_id` is refused (400 `invalid_request`); send the whole conversation.
#[utoipa::path(post, path = "/api/gateway/v1/responses", tag = "gateway",
    request_body(content = Object, description = "OpenAI Responses request"),
    responses((status = 200, description = "A Responses `response` object, or its SSE event stream"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 402, description = "balance depleted"), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn v1_responses(
    State(s): State<AppState>,
    caller: GatewayCaller,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    proxy(s, Endpoint::Responses, caller, ip, headers, body).await
}

/// `POST /api/openrouter/responses`: the path the Kilo Code CLI uses for models whose
/// `ai_sdk_provider` is `openai` (contract §2a); same handler as `/api/gateway/v1/responses`.
#[utoipa::path(post, path = "/api/openrouter/responses", tag = "gateway",
    request_body(content = Object, description = "OpenAI Responses request"),
    responses((status = 200, description = "as /api/gateway/v1/responses")),
    security(("bearer" = [])))]
pub async fn openrouter_responses(
    State(s): State<AppState>,
    caller: GatewayCaller,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    proxy(s, Endpoint::Responses, caller, ip, headers, body).await
}

/// `POST /api/fim/completions`: fill-in-the-middle completions in Mistral's format
/// (`{model, prompt, suffix?, max_tokens?, stream?}` → a Chat-style completion or chunk
/// stream), the autocomplete route of the Kilo Code clients (reference §1, "Endpoints").
/// Passed to `{base_url}/fim/completions` of the model's provider, which must be
/// OpenAI-compatible (Mistral's API is); metered and charged like a chat request. The
/// reference serves `mistralai/` models only; here any catalog model whose provider has the
/// endpoint. Errors as for chat, and 400 `unsupported_api` for a model on an `anthropic`
/// provider.
#[utoipa::path(post, path = "/api/fim/completions", tag = "gateway",
    request_body(content = Object, description = "Mistral FIM request"),
    responses((status = 200, description = "A completion, or an SSE chunk stream"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 402, description = "balance depleted"), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn fim_completions(
    State(s): State<AppState>,
    caller: GatewayCaller,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    proxy(s, Endpoint::Fim, caller, ip, headers, body).await
}

/// A request body that must be a JSON object. Errors: 400 `invalid_json`.
fn json_object(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "the body must be a JSON object",
            )
        })
}

/// 401 `PAID_MODEL_AUTH_REQUIRED`: a paid model without credentials (reference §1.5).
fn paid_model_auth_required() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "PAID_MODEL_AUTH_REQUIRED",
        "sign in (an API key or token) to use paid models",
    )
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(500).collect())
}

/// The API a request is made in, by the client or to the provider.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// OpenAI `/chat/completions`.
    Chat,
    /// OpenAI `/embeddings` (never streamed).
    Embeddings,
    /// Anthropic `/messages`.
    Messages,
    /// OpenAI `/responses`: from clients only, served through Chat Completions or Messages.
    Responses,
    /// Mistral's fill-in-the-middle `/fim/completions` (Chat-style responses and usage).
    Fim,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Messages => "/messages",
            Endpoint::Responses => "/responses",
            Endpoint::Fim => "/fim/completions",
        }
    }

    /// The translatable API of this endpoint; `None` for those passed through only.
    fn wire(self) -> Option<Wire> {
        match self {
            Endpoint::Chat => Some(Wire::Chat),
            Endpoint::Messages => Some(Wire::Messages),
            Endpoint::Responses => Some(Wire::Responses),
            Endpoint::Embeddings | Endpoint::Fim => None,
        }
    }

    /// The endpoint a provider of `kind` is sent this endpoint's requests on: the same one, or
    /// (Chat, Messages, Responses) the one of the provider's own API, translated
    /// ([`kilocloud_gateway::translate`]). `None` when the provider cannot serve it at all
    /// (Embeddings and FIM need an OpenAI-compatible provider).
    fn upstream(self, kind: ProviderKind) -> Option<Endpoint> {
        let anthropic = kind == ProviderKind::Anthropic;
        match self {
            Endpoint::Embeddings | Endpoint::Fim if anthropic => None,
            Endpoint::Embeddings | Endpoint::Fim => Some(self),
            _ if anthropic => Some(Endpoint::Messages),
            _ => Some(Endpoint::Chat),
        }
    }

    /// The stream format of this endpoint's responses, as a provider sends them.
    fn stream_format(self) -> StreamFormat {
        match self {
            Endpoint::Messages => StreamFormat::Anthropic,
            _ => StreamFormat::OpenAi,
        }
    }

    /// The usage of a provider's response on this endpoint.
    fn usage(self, body: &Value) -> Option<Usage> {
        let usage = body.get("usage")?;
        match self {
            Endpoint::Messages => Usage::from_anthropic(usage),
            _ => Usage::from_openai(usage),
        }
    }
}

/// 400 `unsupported_api`: the provider serving the model cannot serve this API.
fn unsupported_api(model: &str, provider: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "unsupported_api",
        format!(
            "model `{model}` is served by provider `{provider}`, which does not speak this API \
             (Embeddings and FIM need an OpenAI-compatible provider)"
        ),
    )
}

/// The body a provider reached on `upstream` is sent for a client request on `endpoint`:
/// `request` itself, or translated. A Chat body made by translation asks for stream usage, and
/// OpenRouter's cost, as the client's own Chat requests are made to (see [`forward`]).
///
/// Errors: 400 `invalid_request` when the request cannot be carried to the provider's API.
fn upstream_body<'a>(
    endpoint: Endpoint,
    upstream: Endpoint,
    kind: ProviderKind,
    request: &'a Value,
) -> Result<std::borrow::Cow<'a, Value>, ApiError> {
    let (Some(from), Some(to)) = (endpoint.wire(), upstream.wire()) else {
        return Ok(std::borrow::Cow::Borrowed(request));
    };
    if from == to {
        return Ok(std::borrow::Cow::Borrowed(request));
    }
    let mut body = translate::request(from, to, request.clone())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.0))?;
    if to == Wire::Chat {
        if body["stream"] == true {
            body["stream_options"] = json!({"include_usage": true});
        }
        if kind == ProviderKind::Openrouter {
            body["usage"] = json!({"include": true});
        }
    }
    Ok(std::borrow::Cow::Owned(body))
}

async fn proxy(
    s: AppState,
    endpoint: Endpoint,
    caller: GatewayCaller,
    ip: std::net::IpAddr,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(body, s.gateway.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match forward(s, endpoint, caller, ip, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn forward(
    s: AppState,
    endpoint: Endpoint,
    caller: GatewayCaller,
    ip: std::net::IpAddr,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let at_ms = s.substrate.clock().now_ms();
    let g = &s.gateway;
    let mut request: Value = json_object(&body)?;
    let requested = request["model"].as_str().unwrap_or("").to_owned();
    let mode = header_str(&headers, "x-kilocode-mode");
    let model_missing = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("model `{requested}` does not exist"),
        )
    };
    if requested.is_empty() {
        return Err(model_missing());
    }
    let (scope, unverified) = match caller {
        GatewayCaller::Anonymous => (None, None),
        GatewayCaller::Signed(scope) => (Some(scope), None),
        GatewayCaller::Unverified(u) => (None, Some(u)),
    };
    let owner = scope.as_ref().map(OwnerScope::owner);
    // An organization's policy: its custom models, model allow-list and member limits
    // (reference §1.7b, §1.10).
    let policy = match owner {
        Some(Owner::Org(org)) => Some(g.policies.get(org).await?),
        _ => None,
    };
    let custom = policy.as_ref().and_then(|p| p.custom_model(&requested));
    let custom_model = custom.map(CustomModel::model_config);
    let custom_provider = match (custom, owner) {
        (Some(c), Some(owner)) => Some(c.provider(custom_model_key(&s, owner, c).await?)),
        _ => None,
    };
    let route = match (&custom_provider, &custom_model) {
        (Some(provider), Some(model)) => Route {
            provider,
            fallbacks: Vec::new(),
            model: Some(model),
            resolved: &requested,
        },
        _ => g
            .catalog
            .route(&requested, mode.as_deref())
            .ok_or_else(model_missing)?,
    };
    if endpoint.upstream(route.provider.kind).is_none() {
        return Err(unsupported_api(&requested, &route.provider.id));
    }
    let free = custom.is_none() && route.is_free();
    // A credential that did not authenticate is anonymous on a free model, and refused
    // (counted as a failed authentication) on any other (reference §1 step 5).
    if let Some(unverified) = unverified
        && !free
    {
        return Err(unverified.refuse(&s));
    }
    // Anonymous callers may use free models only (reference §1.5).
    if scope.is_none() && !free {
        return Err(paid_model_auth_required());
    }
    if let Some(policy) = &policy
        && custom.is_none()
        && !policy.allows(route.resolved)
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_allowed",
            format!(
                "model `{}` is not allowed by this organization's policy",
                route.resolved
            ),
        ));
    }
    if free {
        match g.free_limiter.admit(ip, scope.is_none()).await? {
            Ok(()) => {}
            Err(Refusal::Hourly { retry_after_secs }) => {
                return Err(ApiError {
                    retry_after_secs: Some(retry_after_secs),
                    ..ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_exceeded",
                        "too many free-model requests from this address; retry later",
                    )
                });
            }
            Err(Refusal::Promotion) => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "PROMOTION_MODEL_LIMIT_REACHED",
                    "the anonymous free-model limit for this address is reached; sign up or \
                     sign in to continue",
                ));
            }
        }
    }
    // BYOK comes first (reference §1.7a): the owner's own key for the model's family, and then
    // never the platform's key, not even as a fallback. A custom model is the organization's
    // own endpoint and key likewise.
    let own_key: Option<OwnKey> = match (&custom_provider, custom, owner) {
        (Some(provider), Some(c), _) => Some(OwnKey {
            provider,
            key: provider.api_key.clone(),
            secret: c.api_key_secret.clone(),
            code: "custom_model_upstream_error",
        }),
        (None, _, Some(owner)) => match g.catalog.byok(route.resolved) {
            Some((provider, secret)) => s
                .identity
                .secret_value(owner, &secret)
                .await?
                .and_then(|k| String::from_utf8(k).ok())
                .filter(|k| !k.is_empty())
                .map(|key| OwnKey {
                    provider,
                    key,
                    secret,
                    code: "byok_upstream_error",
                }),
            None => None,
        },
        _ => None,
    };
    let charged = own_key.is_none() && !free;
    if let Some(scope) = &scope {
        preflight(g, scope, policy.as_ref(), charged, at_ms).await?;
    }
    let streaming =
        endpoint != Endpoint::Embeddings && request["stream"].as_bool().unwrap_or(false);
    request["model"] = Value::String(route.upstream_model().to_owned());
    if let Some(obj) = request.as_object_mut() {
        obj.remove("models");
    }
    // A client's Chat stream asks for usage (and, below, OpenRouter's cost); a request
    // translated into Chat gets the same in `upstream_body`.
    if streaming && endpoint == Endpoint::Chat {
        match request.get_mut("stream_options") {
            None | Some(Value::Null) => request["stream_options"] = json!({"include_usage": true}),
            Some(Value::Object(o)) => {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            Some(_) => return Err(ApiError::bad_request("stream_options must be an object")),
        }
    }
    // OpenRouter reports a request's cost only when asked; it prices models outside the catalog.
    if route.provider.kind == ProviderKind::Openrouter
        && endpoint == Endpoint::Chat
        && request.get("usage").is_none()
    {
        request["usage"] = json!({"include": true});
    }
    if let Some(own) = &own_key
        && endpoint.upstream(own.provider.kind).is_none()
    {
        return Err(unsupported_api(&requested, &own.provider.id));
    }
    let attempts: Vec<(&Provider, &str)> = match &own_key {
        Some(own) => vec![(own.provider, own.key.as_str())],
        None => std::iter::once(route.provider)
            .chain(route.fallbacks.iter().copied())
            .filter(|p| endpoint.upstream(p.kind).is_some())
            .map(|p| (p, p.api_key.as_str()))
            .collect(),
    };
    let request = Arc::new(request);
    // Each attempt's body, translated for its provider's API when that differs (fallbacks
    // may be of other kinds).
    let bodies = attempts
        .iter()
        .map(|(p, _)| {
            let upstream = endpoint.upstream(p.kind).expect("filtered above");
            upstream_body(endpoint, upstream, p.kind, &request).map(|b| (upstream, b))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let principal = scope.as_ref().map(|s| &s.auth.principal);
    let request_id = uuid::Uuid::now_v7().to_string();
    let row = UsageRow {
        seq: 0,
        request_id: request_id.clone(),
        upstream_request_id: None,
        at_ms,
        // Anonymous requests have no owner and are not recorded (only counted, above).
        owner: owner.unwrap_or(Owner::User(uuid::Uuid::nil())),
        user: principal.map_or(uuid::Uuid::nil(), |p| p.user),
        api_key: principal.and_then(api_key_of),
        requested_model: requested.clone(),
        model: route.resolved.to_owned(),
        provider: attempts[0].0.id.clone(),
        status: 0,
        streaming,
        ttfb_ms: 0,
        total_ms: 0,
        input_tokens: 0,
        output_tokens: 0,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cost_microdollars: 0,
        true_cost_microdollars: 0,
        project_id: header_str(&headers, "x-kilocode-projectid"),
        task_id: header_str(&headers, "x-kilocode-taskid"),
        mode,
        feature: header_str(&headers, "x-kilocode-feature"),
        machine_id: header_str(&headers, "x-kilocode-machineid"),
        editor: header_str(&headers, "x-kilocode-editorname"),
        estimated: false,
    };
    let meter = Meter {
        ledger: owner.map(|_| g.ledger.clone()),
        recordings: g.recordings.clone(),
        // Label by catalog id only: request ids are caller-chosen and unbounded.
        label: match (custom, route.model) {
            (Some(_), _) => "custom".to_owned(),
            (None, Some(m)) => m.id.clone(),
            (None, None) => "other".to_owned(),
        },
        model: route.model.cloned(),
        charged,
        started,
        request: request.clone(),
    };
    // From here on, a client that goes away still gets its request recorded (see Pending).
    let mut pending = Pending(Some((meter, row)));
    metrics::histogram!("kilocloud_gateway_overhead_seconds")
        .record(started.elapsed().as_secs_f64());
    // Anthropic's version and beta flags come from the client (Claude Code sets them).
    let anthropic_headers: Vec<(&'static str, String)> = [
        (
            "anthropic-version",
            header_str(&headers, "anthropic-version").or(Some("2023-06-01".into())),
        ),
        ("anthropic-beta", header_str(&headers, "anthropic-beta")),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect();
    let http = if custom.is_some() {
        &g.custom_http
    } else {
        &g.http
    };
    let (attempt, sent) =
        send_with_fallbacks(g, http, &attempts, &bodies, &anthropic_headers).await;
    let provider = attempts[attempt].0;
    let upstream = bodies[attempt].0;
    drop(bodies);
    pending.row().provider = provider.id.clone();
    pending.row().ttfb_ms = started.elapsed().as_millis() as u64;
    metrics::histogram!("kilocloud_gateway_ttfb_seconds").record(started.elapsed().as_secs_f64());
    let res = match sent {
        Ok(res) => res,
        Err(e) => {
            let (status, code, message) = match e {
                SendError::FirstByteTimeout => (
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    "the provider did not start answering in time",
                ),
                SendError::Unreachable(_) => (
                    StatusCode::BAD_GATEWAY,
                    "upstream_unavailable",
                    "the provider could not be reached",
                ),
            };
            pending.finish(status, None).await;
            return Err(ApiError::new(status, code, message));
        }
    };
    let upstream_id = ["x-request-id", "request-id"]
        .iter()
        .find_map(|h| res.headers().get(*h)?.to_str().ok())
        .map(|v| v.chars().take(200).collect::<String>());
    pending.row().upstream_request_id = upstream_id.clone();
    let anthropic_request_id = res.headers().get("request-id").cloned();
    let upstream_status = res.status().as_u16();
    if let Some(own) = &own_key
        && matches!(upstream_status, 401 | 402 | 403 | 429)
    {
        let status = StatusCode::from_u16(upstream_status).unwrap_or(StatusCode::BAD_GATEWAY);
        pending.finish(status, None).await;
        let whose = match own.code {
            "byok_upstream_error" => {
                "[BYOK] the provider refused the request made with your own key"
            }
            _ => "the organization's custom model endpoint refused the request made with its key",
        };
        return Err(ApiError::new(
            status,
            own.code,
            format!(
                "{whose} (status {upstream_status}); check the key stored in the secret {}, \
                 and its quota",
                own.secret
            ),
        ));
    }
    // Without BYOK, the provider refusing the platform's key or account is the platform's
    // problem, not the caller's: 402 → 503 (§1.15), 401/403 → 502; the body (which may echo
    // part of the key) is logged, not relayed.
    let platform_error = match upstream_status {
        402 => Some((
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_payment_required",
            "the platform's provider account cannot serve this request now; retry later",
        )),
        401 | 403 => Some((
            StatusCode::BAD_GATEWAY,
            "upstream_auth_failed",
            "the provider refused the platform's credentials; the operator has been told",
        )),
        _ => None,
    };
    if let Some((status, code, message)) = platform_error {
        tracing::error!(provider = %provider.id, upstream_status, "provider refused the platform's key or account");
        pending.finish(status, None).await;
        return Err(ApiError {
            retry_after_secs: Some(30),
            ..ApiError::new(status, code, message)
        });
    }
    let status = StatusCode::from_u16(upstream_status).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = res
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/json"));
    let served_by =
        HeaderValue::from_str(&provider.id).unwrap_or(HeaderValue::from_static("unknown"));
    let body = guard_idle(res.bytes_stream(), g.upstream_idle_timeout);
    // The client's and the provider's APIs, when the response must be translated.
    let translation = match (upstream.wire(), endpoint.wire()) {
        (Some(from), Some(to)) if from != to => Some((from, to)),
        _ => None,
    };
    // Chat-style responses carry their cost in `usage`, as OpenRouter's do.
    let priced = matches!(endpoint, Endpoint::Chat | Endpoint::Fim);
    let mut cost = None;
    let mut response = if streaming && status.is_success() {
        let (meter, mut row) = pending.disarm();
        row.status = status.as_u16();
        let recordings = meter.recordings.clone();
        Response::new(Body::from_stream(Metered {
            inner: body,
            scanner: SseUsageScanner::new(upstream.stream_format()),
            translator: translation.map(|(from, to)| StreamTranslator::new(from, to)),
            client: endpoint.wire().unwrap_or(Wire::Chat),
            cost_lines: priced.then(CostLines::default),
            finish: Some((meter, row)),
            charging: None,
            recordings,
        }))
    } else {
        let bytes = match collect(body).await {
            Ok(b) => b,
            Err(cut) => {
                tracing::warn!(provider = %provider.id, error = %cut, "upstream body failed");
                let status = cut.status();
                pending.finish(status, None).await;
                return Err(ApiError::new(status, cut.code(), cut.to_string()));
            }
        };
        let parsed = serde_json::from_slice::<Value>(&bytes).ok();
        let usage = parsed.as_ref().and_then(|v| upstream.usage(v));
        let (costs, owned) = pending.finish(status, usage).await;
        cost = owned.then_some(costs.charged);
        let bytes = match (translation, parsed) {
            (_, Some(mut v)) if status.is_success() && (translation.is_some() || priced) => {
                if let Some((from, to)) = translation {
                    v = translate::response(from, to, v);
                }
                if priced && let Some(usage) = v.get_mut("usage").and_then(Value::as_object_mut) {
                    costs.add_to(usage);
                }
                Bytes::from(v.to_string())
            }
            (Some((from, to)), _) => {
                Bytes::from(translate::error_body(from, to, &bytes).to_string())
            }
            (None, _) => bytes,
        };
        Response::new(Body::from(bytes))
    };
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let content_type = match translation {
        Some(_) if streaming && status.is_success() => {
            HeaderValue::from_static("text/event-stream")
        }
        Some(_) => HeaderValue::from_static("application/json"),
        None => content_type,
    };
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(PROVIDER_HEADER, served_by);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert(REQUEST_ID_HEADER, v);
    }
    if let Some(v) = upstream_id.and_then(|v| HeaderValue::from_str(&v).ok()) {
        headers.insert(UPSTREAM_REQUEST_ID_HEADER, v);
    }
    if let Some(v) = anthropic_request_id {
        headers.insert("request-id", v);
    }
    if let Some(micros) = cost {
        headers.insert(COST_HEADER, HeaderValue::from(micros));
    }
    Ok(response)
}

/// What a request cost, microdollars.
#[derive(Clone, Copy)]
struct Costs {
    /// Charged to the owner (0 for free models and the caller's own keys).
    charged: i64,
    /// At the provider's list price, charged or not.
    upstream: i64,
}

impl Costs {
    /// Adds them to a Chat `usage` object as OpenRouter reports costs and the Kilo Code CLI
    /// reads them (contract §4): `cost`, USD charged, and
    /// `cost_details.upstream_inference_cost`, USD the inference cost: the charge, or, when
    /// nothing is charged (free models, the caller's own key), the provider's list price.
    fn add_to(self, usage: &mut serde_json::Map<String, Value>) {
        let usd = |micros: i64| micros as f64 / 1e6;
        let inference = if self.charged > 0 {
            self.charged
        } else {
            self.upstream
        };
        usage.insert("cost".into(), json!(usd(self.charged)));
        usage.insert(
            "cost_details".into(),
            json!({"upstream_inference_cost": usd(inference)}),
        );
    }
}

/// Rewrites the usage chunks of a Chat stream on their way to the client to carry the
/// request's cost ([`Costs::add_to`]); every other line goes out as it came. Works line by
/// line, so a line is held until it is complete.
#[derive(Default)]
struct CostLines {
    lines: kilocloud_gateway::usage::SseLines,
}

impl CostLines {
    /// The client's bytes for `bytes`, usage chunks priced by `meter`.
    fn rewrite(&mut self, bytes: &[u8], meter: &Meter) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len() + 64);
        self.lines.feed(bytes, |line| {
            match priced_usage_line(line, meter) {
                Some(priced) => out.extend_from_slice(priced.as_bytes()),
                None => out.extend_from_slice(line),
            }
            out.push(b'\n');
        });
        out
    }
}

/// A Chat stream line with usage (`data: {…"usage":{"prompt_tokens":…}}`), with its cost
/// added; `None` for every other line.
fn priced_usage_line(line: &[u8], meter: &Meter) -> Option<String> {
    let data = kilocloud_gateway::usage::sse_data(line)?;
    // Cheap test first: most chunks carry no usage.
    if !data.windows(15).any(|w| w == b"\"prompt_tokens\"") {
        return None;
    }
    let mut chunk: Value = serde_json::from_slice(data).ok()?;
    let usage = Usage::from_openai(&chunk["usage"])?;
    meter.costs(&usage).add_to(chunk["usage"].as_object_mut()?);
    Some(format!("data: {chunk}"))
}

/// A request whose outcome is not recorded yet. If the handler is dropped first (the client
/// went away, which also drops and so cancels the upstream request), it is recorded with
/// status 499 and estimated tokens.
struct Pending(Option<(Meter, UsageRow)>);

impl Pending {
    fn row(&mut self) -> &mut UsageRow {
        &mut self.0.as_mut().expect("pending until finished").1
    }

    /// Prices the request with `status` and `usage` and makes its charge durable (see
    /// [`Meter::charge`]). Returns what it costs, and whether it has an owner to charge.
    async fn finish(mut self, status: StatusCode, usage: Option<Usage>) -> (Costs, bool) {
        let (meter, mut row) = self.disarm();
        row.status = status.as_u16();
        let row = meter.price(row, usage, None);
        let costs = Costs {
            charged: row.cost_microdollars,
            upstream: row.true_cost_microdollars,
        };
        let owned = meter.ledger.is_some();
        meter.charge(row).await;
        (costs, owned)
    }

    /// Hands the recording over (to the streamed body).
    fn disarm(&mut self) -> (Meter, UsageRow) {
        self.0.take().expect("pending until finished")
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some((meter, mut row)) = self.0.take() {
            row.status = 499;
            let row = meter.price(row, None, Some(0));
            meter.charge_in_background(row);
        }
    }
}

/// Why sending a request upstream failed.
enum SendError {
    /// No status and headers within `upstream_first_byte_timeout_ms`.
    FirstByteTimeout,
    /// Connecting or sending failed.
    Unreachable(reqwest::Error),
}

/// Why an upstream body ended early.
#[derive(Debug, thiserror::Error)]
enum UpstreamCut {
    /// Silent for longer than `upstream_timeout_ms`.
    #[error("the provider stopped sending (idle timeout)")]
    Idle,
    /// The connection broke.
    #[error("the provider's response broke off")]
    Broken,
}

impl UpstreamCut {
    fn status(&self) -> StatusCode {
        match self {
            UpstreamCut::Idle => StatusCode::GATEWAY_TIMEOUT,
            UpstreamCut::Broken => StatusCode::BAD_GATEWAY,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            UpstreamCut::Idle => "upstream_timeout",
            UpstreamCut::Broken => "upstream_unavailable",
        }
    }

    /// The event that ends a cut stream, in the client's format
    /// ([`translate::error_event`]: OpenAI-style `data: {"error":{…}}`, as OpenAI and
    /// OpenRouter send mid-stream errors, or an `event: error`).
    fn event(&self, client: Wire) -> Bytes {
        Bytes::from(translate::error_event(
            client,
            &self.to_string(),
            self.code(),
        ))
    }
}

type ByteStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Bytes, UpstreamCut>> + Send>>;

/// `body` failing with [`UpstreamCut::Idle`] when no chunk arrives for `idle`, and ending
/// after its first error.
fn guard_idle(
    body: impl futures::Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
    idle: Duration,
) -> ByteStream {
    let mut failed = false;
    Box::pin(
        tokio_stream::StreamExt::timeout(body, idle)
            .map(|chunk| match chunk {
                Ok(Ok(bytes)) => Ok(bytes),
                Ok(Err(_)) => Err(UpstreamCut::Broken),
                Err(_) => Err(UpstreamCut::Idle),
            })
            .take_while(move |chunk| {
                let go = !failed;
                failed |= chunk.is_err();
                futures::future::ready(go)
            }),
    )
}

/// The whole of a (non-streaming) upstream body.
async fn collect(mut body: ByteStream) -> Result<Bytes, UpstreamCut> {
    let mut all = Vec::new();
    while let Some(chunk) = futures::StreamExt::next(&mut body).await {
        all.extend_from_slice(&chunk?);
    }
    Ok(all.into())
}

/// Sends each attempt's body (`bodies[i]` on its endpoint for `attempts[i]`) in turn until a
/// provider answers with anything but a 5xx, or the last one answers at all (reference:
/// fallbacks on 5xx, timeouts and connection errors). Returns the index of the last attempt
/// and its outcome.
async fn send_with_fallbacks(
    g: &GatewayState,
    http: &reqwest::Client,
    attempts: &[(&Provider, &str)],
    bodies: &[(Endpoint, std::borrow::Cow<'_, Value>)],
    anthropic_headers: &[(&'static str, String)],
) -> (usize, Result<reqwest::Response, SendError>) {
    let mut tried = 0;
    loop {
        let (provider, key) = attempts[tried];
        let (endpoint, body) = &bodies[tried];
        let mut upstream = http
            .post(format!("{}{}", provider.base_url, endpoint.path()))
            .header("HTTP-Referer", "https://kilocode.ai")
            .header("X-Title", "Kilo Code")
            .json(body.as_ref());
        if provider.kind == ProviderKind::Anthropic {
            if !key.is_empty() {
                upstream = upstream.header("x-api-key", key);
            }
            for (name, value) in anthropic_headers {
                upstream = upstream.header(*name, value);
            }
        } else if !key.is_empty() {
            upstream = upstream.bearer_auth(key);
        }
        let sent = match tokio::time::timeout(g.upstream_first_byte_timeout, upstream.send()).await
        {
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) => Err(SendError::Unreachable(e)),
            Err(_) => Err(SendError::FirstByteTimeout),
        };
        tried += 1;
        let failed = match &sent {
            Ok(res) => res.status().is_server_error(),
            Err(_) => true,
        };
        if !failed || tried == attempts.len() {
            return (tried - 1, sent);
        }
        match &sent {
            Ok(res) => {
                tracing::warn!(provider = %provider.id, status = %res.status(), "upstream failed; trying the next provider")
            }
            Err(SendError::Unreachable(e)) => {
                tracing::warn!(provider = %provider.id, error = %e, "upstream failed; trying the next provider")
            }
            Err(SendError::FirstByteTimeout) => {
                tracing::warn!(provider = %provider.id, "upstream did not answer in time; trying the next provider")
            }
        }
        metrics::counter!("kilocloud_gateway_fallbacks_total", "provider" => provider.id.clone())
            .increment(1);
    }
}

/// The caller's own key for a request: BYOK, or an organization's custom model. One attempt,
/// never the platform's key; the provider's refusals are the caller's to fix.
struct OwnKey<'a> {
    provider: &'a Provider,
    key: String,
    /// The secret the key is stored in, named in errors.
    secret: String,
    /// Error code of the provider's refusals.
    code: &'static str,
}

/// The key of an organization's custom model, from its secret (empty when it names none).
///
/// Errors: 502 `custom_model_key_missing` when the secret is not set.
async fn custom_model_key(
    s: &AppState,
    owner: Owner,
    model: &CustomModel,
) -> Result<String, ApiError> {
    if model.api_key_secret.is_empty() {
        return Ok(String::new());
    }
    let key = s
        .identity
        .secret_value(owner, &model.api_key_secret)
        .await?;
    key.and_then(|k| String::from_utf8(k).ok())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "custom_model_key_missing",
                format!(
                    "the organization's model kilo/{} needs its key in the secret {}; an admin can \
                 set it with PUT /api/secrets/{}",
                    model.id, model.api_key_secret, model.api_key_secret
                ),
            )
        })
}

/// The API key a request came with, if any.
fn api_key_of(p: &Principal) -> Option<uuid::Uuid> {
    match p.credential {
        Credential::ApiKey(id) => Some(id),
        Credential::Jwt => None,
    }
}

/// The signed-in caller's limits, before anything goes upstream: requests per minute per
/// credential and per owner (→ 429 `rate_limited`), tokens per minute likewise (→ 429
/// `rate_limited`), and for `charged` requests the owner's daily and monthly budgets (→ 429
/// `budget_exceeded`), the balance and the member's daily limit in the organization (→ 402).
async fn preflight(
    g: &GatewayState,
    scope: &OwnerScope,
    policy: Option<&OrgPolicy>,
    charged: bool,
    at_ms: i64,
) -> Result<(), ApiError> {
    let principal = &scope.auth.principal;
    let owner = scope.owner();
    let credential = credential_key(api_key_of(principal), principal.user);
    check_rate(&g.key_rate, credential.clone(), "key")?;
    check_rate(&g.owner_rate, owner.to_string(), "owner")?;
    let member_limit = policy.and_then(|p| p.member_daily_limit(principal.user));
    let (tpm_key, tpm_owner) = g.token_limits;
    let (daily, monthly) = g.budgets;
    let needs_counters = tpm_key > 0
        || tpm_owner > 0
        || (charged && (daily > 0 || monthly > 0 || member_limit.is_some()));
    if !needs_counters && !charged {
        return Ok(());
    }
    let counters = match needs_counters {
        true => {
            g.ledger
                .counters(owner, principal.user, &credential, at_ms)
                .await?
        }
        false => Counters::default(),
    };
    for (window, limit, what) in [
        (counters.credential_tokens, tpm_key, "key"),
        (counters.owner_tokens, tpm_owner, "owner"),
    ] {
        if let Err(wait) = window.check(at_ms, limit) {
            return Err(ApiError {
                retry_after_secs: Some(wait),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("too many tokens per minute for this {what}; retry later"),
                )
            });
        }
    }
    if !charged {
        return Ok(());
    }
    check_budgets(g.budgets, counters.spend, at_ms)?;
    let balance = g.ledger.balance(owner).await?;
    if balance <= 0 {
        return Err(payment_required(
            balance,
            "Your balance is depleted; add credits to use paid models, or use a free model.",
        ));
    }
    if let Some(limit) = member_limit {
        let left = limit.saturating_sub(counters.member_today);
        if left <= 0 {
            return Err(payment_required(
                left.min(balance),
                "You have used your daily limit in this organization; it renews at midnight \
                 UTC. Use a free model, or ask an admin to raise the limit.",
            ));
        }
    }
    Ok(())
}

/// 402 with the reference's body `{error: {title, message, balance (USD)}}` (§1.10).
fn payment_required(balance: i64, message: &str) -> ApiError {
    ApiError {
        details: Some(json!({
            "title": "Paid model - credits required",
            "balance": balance as f64 / 1e6,
        })),
        ..ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_balance",
            message,
        )
    }
}

/// Prices and records a finished request.
struct Meter {
    /// Where the row goes; `None` for anonymous requests.
    ledger: Option<Ledger>,
    /// Where the recording runs.
    recordings: Recordings,
    /// The `model` label of the request counter: a catalog id, `custom` or `other`.
    label: String,
    model: Option<ModelConfig>,
    /// Charged to the owner: not a free model and not BYOK.
    charged: bool,
    started: Instant,
    /// The request as sent upstream, for estimating input tokens when no usage comes back.
    request: Arc<Value>,
}

impl Meter {
    /// Fills in the usage, cost (zero when not charged) and total time, and counts the request.
    /// A request the provider served (2xx), or that went upstream and was cut short (the
    /// client left: 499; the stream was cut: 502/504), given as `estimated_output` (the tokens
    /// of the content relayed), without reporting usage is estimated with the tokenizer: input
    /// from the request's text, output from `estimated_output`; the row says so.
    /// What `usage` costs on this request.
    fn costs(&self, usage: &Usage) -> Costs {
        let upstream = usage.cost_microdollars(self.model.as_ref());
        Costs {
            charged: if self.charged { upstream } else { 0 },
            upstream,
        }
    }

    fn price(
        &self,
        mut row: UsageRow,
        usage: Option<Usage>,
        estimated_output: Option<u64>,
    ) -> UsageRow {
        let served = (200..300).contains(&row.status) || estimated_output.is_some();
        let usage = match usage {
            Some(u) => u,
            None if served => {
                row.estimated = true;
                metrics::counter!("kilocloud_gateway_usage_estimated_total").increment(1);
                Usage {
                    input_tokens: estimated_input_tokens(&self.request),
                    output_tokens: estimated_output.unwrap_or(0),
                    ..Usage::default()
                }
            }
            None => Usage::default(),
        };
        row.input_tokens = usage.input_tokens;
        row.output_tokens = usage.output_tokens;
        row.cache_read_tokens = usage.cache_read_tokens;
        row.cache_write_tokens = usage.cache_write_tokens;
        let costs = self.costs(&usage);
        row.true_cost_microdollars = costs.upstream;
        row.cost_microdollars = costs.charged;
        row.total_ms = self.started.elapsed().as_millis() as u64;
        metrics::counter!("kilocloud_gateway_requests_total",
            "model" => self.label.clone(), "provider" => row.provider.clone(), "status" => row.status.to_string())
        .increment(1);
        row
    }

    /// Makes the charge of `row` durable: puts it on the ledger's charge queue (awaited, so
    /// the caller can hold the response's end until it is committed), then records it in the
    /// ledger in a tracked background task and withdraws the queued copy. The copy charges the
    /// row if this node dies before recording it; delivered anyway, it is skipped (the ledger
    /// deduplicates by request id).
    /// Anonymous requests have no ledger and are only counted.
    async fn charge(self, row: UsageRow) {
        let Some(ledger) = self.ledger else { return };
        let mut queued = None;
        for attempt in 0..3u32 {
            match ledger.enqueue_charge(&row).await {
                Ok(id) => {
                    queued = Some(id);
                    break;
                }
                Err(e) if attempt < 2 => {
                    tracing::warn!(owner = %row.owner, error = %e, "queueing a gateway charge failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50 << (2 * attempt))).await;
                }
                Err(e) => {
                    tracing::error!(owner = %row.owner, request_id = %row.request_id, error = %e,
                        "could not queue a gateway charge; recording it directly only");
                }
            }
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let recording = async move {
            let (owner, cost) = (row.owner, row.cost_microdollars);
            for attempt in 0..3u32 {
                match ledger.record(row.clone()).await {
                    Ok(_) => {
                        // The queued copy is not needed now; if withdrawing fails, it is
                        // delivered later and skipped as recorded.
                        if let Some(id) = queued
                            && let Err(e) = ledger.cancel_charge(id).await
                        {
                            tracing::debug!(%owner, error = %e, "could not withdraw a queued charge");
                        }
                        return;
                    }
                    Err(e) if attempt < 2 => {
                        tracing::warn!(%owner, error = %e, "recording gateway usage failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100 << (2 * attempt))).await;
                    }
                    Err(e) if queued.is_some() => {
                        // The queued copy charges it later.
                        tracing::warn!(%owner, cost_microdollars = cost, error = %e,
                            "could not record gateway usage now; the charge queue will");
                    }
                    Err(e) => {
                        tracing::error!(%owner, cost_microdollars = cost, error = %e,
                            "could not queue or record gateway usage: this charge is lost");
                    }
                }
            }
        };
        self.recordings.spawn(&runtime, recording);
    }

    /// [`Meter::charge`] in a tracked background task, for requests whose client went away
    /// (from `Drop`, which cannot wait).
    fn charge_in_background(self, row: UsageRow) {
        if self.ledger.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(owner = %row.owner, "no runtime to record gateway usage on");
            return;
        };
        let recordings = self.recordings.clone();
        recordings.spawn(&runtime, self.charge(row));
    }
}

/// The upstream SSE body on its way to the client, watched for usage. When the stream's
/// terminal event (`[DONE]`, `message_stop`) arrives, the chunk holding it waits until the
/// request's charge is durable, so the response completes only after it (status 200
/// whatever the client does next). When the upstream is cut (idle timeout, broken
/// connection), the client gets an error event in the stream's format, the request is
/// recorded as 504/502, and the stream ends. When the client goes away first, the request is
/// recorded with what was seen (499).
struct Metered {
    inner: ByteStream,
    /// Reads the provider's stream, before any translation.
    scanner: SseUsageScanner,
    /// Turns the provider's stream into the client's API, when they differ.
    translator: Option<StreamTranslator>,
    /// The client's API, for the event that ends a cut stream.
    client: Wire,
    /// Adds the cost to usage chunks, for Chat-style clients.
    cost_lines: Option<CostLines>,
    finish: Option<(Meter, UsageRow)>,
    /// The charge being made durable, and the bytes to send once it is.
    charging: Option<(futures::future::BoxFuture<'static, ()>, Option<Bytes>)>,
    /// Tracks a charge this stream leaves unfinished when dropped.
    recordings: Recordings,
}

impl Metered {
    /// Starts charging the request with what the scanner saw (once); `then` goes out after.
    fn start_charging(&mut self, status: Option<StatusCode>, then: Option<Bytes>) {
        if let Some((meter, mut row)) = self.finish.take() {
            if let Some(status) = status {
                row.status = status.as_u16();
            }
            let (usage, out) = (self.scanner.usage(), self.scanner.estimated_output_tokens());
            let row = meter.price(row, usage, Some(out));
            self.charging = Some((Box::pin(meter.charge(row)), then));
        }
    }
}

impl futures::Stream for Metered {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if let Some((charge, _)) = &mut self.charging {
            std::task::ready!(charge.as_mut().poll(cx));
            let (_, then) = self.charging.take().expect("charging");
            if let Some(bytes) = then {
                return Poll::Ready(Some(Ok(bytes)));
            }
        }
        if self.finish.is_none() {
            // Complete, cut or ended: never poll the upstream again.
            return Poll::Ready(None);
        }
        loop {
            match self.inner.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(bytes))) => {
                    let this = &mut *self;
                    this.scanner.feed(&bytes);
                    let out = match &mut this.translator {
                        Some(t) => Bytes::from(t.feed(&bytes)),
                        None => bytes,
                    };
                    let out = match (&mut this.cost_lines, &this.finish) {
                        (Some(lines), Some((meter, _))) => Bytes::from(lines.rewrite(&out, meter)),
                        _ => out,
                    };
                    if !self.scanner.is_complete() {
                        if out.is_empty() {
                            // Nothing to send yet for what came (a partial line, a ping).
                            continue;
                        }
                        return Poll::Ready(Some(Ok(out)));
                    }
                    self.start_charging(None, Some(out));
                }
                Poll::Ready(Some(Err(cut))) => {
                    let event = cut.event(self.client);
                    self.start_charging(Some(cut.status()), Some(event));
                }
                Poll::Ready(None) => {
                    let closing = self.translator.as_mut().map(|t| Bytes::from(t.finish()));
                    self.start_charging(None, closing.filter(|b| !b.is_empty()));
                }
            }
            break;
        }
        // Charging has started: poll it.
        self.poll_next(cx)
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // Unless charged already, the client went away: the upstream request is cancelled
        // with this stream; record what was seen.
        if let Some((meter, mut row)) = self.finish.take() {
            row.status = 499;
            let (usage, out) = (self.scanner.usage(), self.scanner.estimated_output_tokens());
            let row = meter.price(row, usage, Some(out));
            meter.charge_in_background(row);
        }
        // A charge already started but not finished is finished in the background.
        if let Some((charge, _)) = self.charging.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            self.recordings.spawn(&runtime, charge);
        }
    }
}

/// The catalog.
#[derive(Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The models.
    pub data: Vec<ModelView>,
}

/// `GET /api/gateway/models`: the catalog (OpenAI's list format, with prices). Public, as in
/// the reference.
#[utoipa::path(get, path = "/api/gateway/models", tag = "gateway",
    responses((status = 200, body = ModelList)))]
pub async fn models(State(s): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: s.gateway.catalog.models(),
    })
}

/// `GET /api/gateway/v1/models`: the same, for OpenAI SDKs.
#[utoipa::path(get, path = "/api/gateway/v1/models", tag = "gateway",
    responses((status = 200, body = ModelList)))]
pub async fn v1_models(State(s): State<AppState>) -> Json<ModelList> {
    models(State(s)).await
}

/// `GET /api/gateway/v1/models/{id}` (and `/api/gateway/models/{id}`): one catalog model,
/// OpenAI's "retrieve model". Ids contain slashes (`vendor/model`), so the route takes the
/// rest of the path; a percent-encoded `%2F` works too. Public, like the list.
///
/// Errors: 404 `model_not_found`.
#[utoipa::path(get, path = "/api/gateway/v1/models/{id}", tag = "gateway",
    params(("id" = String, Path, description = "Model id, e.g. `anthropic/claude-sonnet-4.6`")),
    responses((status = 200, body = ModelView), (status = 404, body = ErrorBody)))]
pub async fn v1_model(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<ModelView>, ApiError> {
    s.gateway.catalog.model(&id).map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("model `{id}` does not exist"),
        )
    })
}

/// One model as the Kilo Code CLI's catalog reads it (contract §2a, OpenRouter's model
/// shape): prices in USD per token as strings, `tools` among the supported parameters (the
/// CLI drops models without it), and `opencode.ai_sdk_provider` naming the API the CLI then
/// calls: `anthropic` (Messages, `/api/openrouter/messages`) for Anthropic providers,
/// `openai-compatible` (Chat Completions) for the rest.
fn cli_model(
    id: &str,
    kind: ProviderKind,
    context_length: u64,
    prices: [f64; 4],
    free: bool,
) -> Value {
    let per_token = |usd_per_million: f64| format!("{}", usd_per_million / 1e6);
    json!({
        "id": id,
        "name": id,
        "context_length": context_length,
        "pricing": {
            "prompt": per_token(prices[0]),
            "completion": per_token(prices[1]),
            "input_cache_read": per_token(prices[2]),
            "input_cache_write": per_token(prices[3]),
        },
        "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
        "top_provider": {"max_completion_tokens": null},
        "supported_parameters": ["tools", "temperature"],
        "isFree": free,
        "opencode": {"ai_sdk_provider": match kind {
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::OpenaiCompatible | ProviderKind::Openrouter => "openai-compatible",
        }},
    })
}

/// The catalog as the Kilo Code CLI reads it, without the models `policy` does not allow and
/// with its custom models (`kilo/<id>`).
fn cli_models(s: &AppState, policy: Option<&OrgPolicy>) -> Json<Value> {
    let mut data: Vec<Value> = s
        .gateway
        .catalog
        .entries()
        .filter(|(_, m)| policy.is_none_or(|p| p.allows(&m.id)))
        .map(|(p, m)| {
            let prices = [
                m.input_price,
                m.output_price,
                m.cache_read_price,
                m.cache_write_price,
            ];
            cli_model(&m.id, p.kind, m.context_length, prices, m.free)
        })
        .collect();
    for c in policy.map_or(&[][..], |p| p.custom_models.as_slice()) {
        let id = format!("kilo/{}", c.id);
        data.push(cli_model(&id, c.kind, c.context_length, [0.0; 4], true));
    }
    Json(json!({"data": data}))
}

/// `GET /api/openrouter/models`: the catalog in the Kilo Code CLI's shape. Public.
#[utoipa::path(get, path = "/api/openrouter/models", tag = "gateway",
    responses((status = 200, description = "`{data: [model…]}`")))]
pub async fn openrouter_models(State(s): State<AppState>) -> Json<Value> {
    cli_models(&s, None)
}

/// `GET /api/organizations/{id}/models` (members): the catalog as the organization's policy
/// allows it, with its custom models, in the Kilo Code CLI's shape.
#[utoipa::path(get, path = "/api/organizations/{id}/models", tag = "gateway",
    params(("id" = uuid::Uuid, Path, description = "Organization id")),
    responses((status = 200, description = "`{data: [model…]}`"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn org_models(
    State(s): State<AppState>,
    access: OrgAccess<Member>,
) -> Result<Json<Value>, ApiError> {
    let policy = s.gateway.policies.get(access.org).await?;
    Ok(cli_models(&s, Some(&policy)))
}

/// `POST /api/openrouter/messages`: the reference's path of the Messages API (the Kilo Code
/// CLI calls it for models whose `ai_sdk_provider` is `anthropic`), same handler as
/// `/api/gateway/v1/messages`.
#[utoipa::path(post, path = "/api/openrouter/messages", tag = "gateway",
    request_body(content = Object, description = "Anthropic Messages request"),
    responses((status = 200, description = "as /api/gateway/v1/messages")),
    security(("bearer" = [])))]
pub async fn openrouter_messages(
    State(s): State<AppState>,
    caller: GatewayCaller,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    proxy(s, Endpoint::Messages, caller, ip, headers, body).await
}

/// Default models, as the Kilo Code CLI reads them (contract §2a).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Defaults {
    /// For signed-in callers: `kilo/auto` when the auto table is configured, else the first
    /// paid catalog model; absent with an empty catalog.
    pub default_model: Option<String>,
    /// For anonymous callers: the first free catalog model, else `kilo-auto/free`.
    pub default_free_model: String,
}

fn defaults_of(s: &AppState) -> Defaults {
    let (default_model, default_free_model) = s.gateway.catalog.default_models();
    Defaults {
        default_model,
        default_free_model,
    }
}

/// `GET /api/defaults`: default models. Public (the CLI reads `defaultModel` with a token,
/// `defaultFreeModel` without).
#[utoipa::path(get, path = "/api/defaults", tag = "gateway",
    responses((status = 200, body = Defaults)))]
pub async fn defaults(State(s): State<AppState>) -> Json<Defaults> {
    Json(defaults_of(&s))
}

/// `GET /api/organizations/{id}/defaults` (members): the organization's default models (the
/// server's).
#[utoipa::path(get, path = "/api/organizations/{id}/defaults", tag = "gateway",
    params(("id" = uuid::Uuid, Path, description = "Organization id")),
    responses((status = 200, body = Defaults), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn org_defaults(State(s): State<AppState>, _access: OrgAccess<Member>) -> Json<Defaults> {
    Json(defaults_of(&s))
}

/// The providers.
#[derive(Serialize, ToSchema)]
pub struct ProviderList {
    /// The providers.
    pub providers: Vec<ProviderView>,
}

/// `GET /api/gateway/providers`. Public.
#[utoipa::path(get, path = "/api/gateway/providers", tag = "gateway",
    responses((status = 200, body = ProviderList)))]
pub async fn providers(State(s): State<AppState>) -> Json<ProviderList> {
    Json(ProviderList {
        providers: s.gateway.catalog.providers(),
    })
}

/// The balance of the owner acted for.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Balance {
    /// USD.
    pub balance: f64,
    /// Microdollars.
    pub balance_microdollars: i64,
    /// `balance <= 0`: paid models answer 402.
    pub is_depleted: bool,
}

/// `GET /api/profile/balance` (members): the balance of the owner acted for.
#[utoipa::path(get, path = "/api/profile/balance", tag = "gateway",
    params(("X-KiloCode-OrganizationId" = Option<uuid::Uuid>, Header, description = "Act for this organization")),
    responses((status = 200, body = Balance), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn balance(
    State(s): State<AppState>,
    RequireRole(scope, ..): RequireRole<Member>,
) -> Result<Json<Balance>, ApiError> {
    let micros = s.gateway.ledger.balance(scope.owner()).await?;
    Ok(Json(Balance {
        balance: micros as f64 / 1e6,
        balance_microdollars: micros,
        is_depleted: micros <= 0,
    }))
}

/// A page of usage rows, newest first.
#[derive(Serialize, ToSchema)]
pub struct UsagePage {
    /// The rows.
    pub usage: Vec<UsageRow>,
}

/// Query of `GET /api/usage`: paging and filters; every filter given must match.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Only rows with `seq` below this (the `seq` of the last row of the previous page).
    pub before: Option<u64>,
    /// Most rows to return, 1–1000. Default 100.
    pub limit: Option<usize>,
    /// Rows at or after this time, ms since epoch.
    pub since: Option<i64>,
    /// Rows before this time, ms since epoch.
    pub until: Option<i64>,
    /// Requested or served model id.
    pub model: Option<String>,
    /// Provider that served.
    pub provider: Option<String>,
    /// User who made the request.
    pub user: Option<uuid::Uuid>,
    /// API key used.
    pub api_key: Option<uuid::Uuid>,
    /// HTTP status returned.
    pub status: Option<u16>,
    /// `X-KiloCode-Feature`.
    pub feature: Option<String>,
    /// `X-KiloCode-ProjectId`.
    pub project_id: Option<String>,
    /// `X-KiloCode-TaskId`.
    pub task_id: Option<String>,
}

/// `GET /api/usage` (admins of an organization; anyone for themself): the owner's usage rows,
/// newest first, filtered.
#[utoipa::path(get, path = "/api/usage", tag = "gateway", params(UsageQuery,
        ("X-KiloCode-OrganizationId" = Option<uuid::Uuid>, Header, description = "Act for this organization (admins)")),
    responses((status = 200, body = UsagePage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn usage(
    State(s): State<AppState>,
    RequireRole(scope, ..): RequireRole<Admin>,
    Query(q): Query<UsageQuery>,
) -> Result<Json<UsagePage>, ApiError> {
    let limit = AuditQuery {
        before: None,
        limit: q.limit,
    }
    .limit()?;
    let filter = UsageFilter {
        before: q.before,
        since_ms: q.since,
        until_ms: q.until,
        model: q.model,
        provider: q.provider,
        user: q.user,
        api_key: q.api_key,
        status: q.status,
        feature: q.feature,
        project_id: q.project_id,
        task_id: q.task_id,
    };
    let usage = s.gateway.ledger.usage(scope.owner(), filter, limit).await?;
    Ok(Json(UsagePage { usage }))
}

/// `GET /api/orgs/{id}/gateway-policy` (members): the organization's gateway policy.
#[utoipa::path(get, path = "/api/orgs/{id}/gateway-policy", tag = "gateway",
    params(("id" = uuid::Uuid, Path, description = "Organization id")),
    responses((status = 200, body = OrgPolicy), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_policy(
    State(s): State<AppState>,
    access: OrgAccess<Member>,
) -> Result<Json<OrgPolicy>, ApiError> {
    Ok(Json(s.gateway.policies.get(access.org).await?))
}

/// `PUT /api/orgs/{id}/gateway-policy` (admins): replaces the organization's gateway policy
/// (an empty object restores the default). Audited as `gateway_policy.updated`.
#[utoipa::path(put, path = "/api/orgs/{id}/gateway-policy", tag = "gateway", request_body = OrgPolicy,
    params(("id" = uuid::Uuid, Path, description = "Organization id")),
    responses((status = 200, body = OrgPolicy), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_policy(
    State(s): State<AppState>,
    access: OrgAccess<Admin>,
    Json(policy): Json<OrgPolicy>,
) -> Result<Json<OrgPolicy>, ApiError> {
    if !s.gateway.private_custom_endpoints {
        for m in &policy.custom_models {
            if kilocloud_identity::net::private_url(&m.base_url) {
                return Err(ApiError::bad_request(format!(
                    "custom model `{}`: baseUrl must not be a loopback, private or link-local \
                     address (the operator can allow them with \
                     gateway.allow_private_custom_endpoints)",
                    m.id
                )));
            }
        }
    }
    s.gateway.policies.put(access.org, policy.clone()).await?;
    let target = format!(
        "{} allowed, {} custom models, {} member limits",
        policy.model_allow_list.len(),
        policy.custom_models.len(),
        policy.member_daily_limits.len()
            + usize::from(policy.member_daily_limit_microdollars.is_some()),
    );
    s.identity
        .record_audit(
            Owner::Org(access.org),
            "gateway_policy.updated",
            target,
            &access.auth.initiator(),
        )
        .await?;
    Ok(Json(policy))
}

/// Body of `POST /api/admin/credits`.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Grant {
    /// `user:<uuid>` or `org:<uuid>`.
    pub owner: Owner,
    /// Microdollars to add (negative to take back).
    pub amount_microdollars: i64,
    /// Why, kept with the grant.
    #[serde(default)]
    pub note: String,
}

/// `POST /api/admin/credits` (site administrators): grants credit to an owner.
pub async fn grant(
    SiteAdmin(auth): SiteAdmin,
    State(s): State<AppState>,
    Json(body): Json<Grant>,
) -> Result<Json<Value>, ApiError> {
    let balance = s
        .gateway
        .ledger
        .grant(
            body.owner,
            body.amount_microdollars,
            &body.note,
            &auth.initiator(),
        )
        .await?;
    Ok(Json(
        json!({"owner": body.owner, "balanceMicrodollars": balance}),
    ))
}

fn per_minute(n: u32) -> Option<governor::DefaultKeyedRateLimiter<String>> {
    std::num::NonZeroU32::new(n)
        .map(|n| governor::RateLimiter::keyed(governor::Quota::per_minute(n)))
}

fn usd_to_micros(usd: f64) -> Result<i64, String> {
    if !usd.is_finite() || usd < 0.0 {
        return Err(format!("gateway budget {usd} must be a finite amount ≥ 0"));
    }
    Ok((usd * 1e6).round() as i64)
}

/// `Err(429)` when `limiter` has no room for `key` now.
fn check_rate(
    limiter: &Option<governor::DefaultKeyedRateLimiter<String>>,
    key: String,
    what: &str,
) -> Result<(), ApiError> {
    use governor::clock::Clock as _;
    let Some(limiter) = limiter else {
        return Ok(());
    };
    limiter.check_key(&key).map_err(|not_until| {
        let wait = not_until.wait_time_from(limiter.clock().now());
        ApiError {
            retry_after_secs: Some(wait.as_secs().max(1)),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests per minute for this {what}; retry later"),
            )
        }
    })
}

/// `Err(429)` when the owner has spent its daily or monthly budget (microdollars, 0: none);
/// `Retry-After` points at the next UTC day or month.
fn check_budgets((daily, monthly): (i64, i64), spend: Spend, now_ms: i64) -> Result<(), ApiError> {
    use chrono::{Datelike, TimeZone};
    if daily == 0 && monthly == 0 {
        return Ok(());
    }
    let now = chrono::Utc
        .timestamp_millis_opt(now_ms)
        .single()
        .unwrap_or_default();
    let day_end = (now.date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc();
    let month_end = {
        let first = now.date_naive().with_day(1).unwrap_or_default();
        (first + chrono::Months::new(1))
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc()
    };
    let exceeded = |period: &str, until: chrono::DateTime<chrono::Utc>| ApiError {
        retry_after_secs: Some((until - now).num_seconds().max(1) as u64),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "budget_exceeded",
            format!("the {period} spending budget is used up; it renews at {until}"),
        )
    };
    if daily > 0 && spend.day >= daily {
        return Err(exceeded("daily", day_end));
    }
    if monthly > 0 && spend.month >= monthly {
        return Err(exceeded("monthly", month_end));
    }
    Ok(())
}

/// The gateway for `config`, registering its actor types on `sub` (before it starts). `env`
/// reads provider keys named by `api_key_env`.
///
/// Errors: an invalid catalog, described (see [`Catalog::new`]).
pub fn state(
    sub: &kilocloud_substrate::Substrate,
    config: &GatewayConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Arc<GatewayState>, String> {
    Ok(Arc::new(GatewayState {
        catalog: Catalog::new(config, env)?,
        ledger: Ledger::new(sub),
        free_limiter: FreeModelLimiter::new(
            sub,
            FreeLimits {
                per_hour: config.free_requests_per_hour_per_ip,
                anonymous_per_day: config.anonymous_requests_per_day_per_ip,
            },
        ),
        key_rate: per_minute(config.limits.requests_per_minute_per_key),
        owner_rate: per_minute(config.limits.requests_per_minute_per_owner),
        budgets: (
            usd_to_micros(config.limits.daily_budget_usd)?,
            usd_to_micros(config.limits.monthly_budget_usd)?,
        ),
        token_limits: (
            config.limits.tokens_per_minute_per_key,
            config.limits.tokens_per_minute_per_owner,
        ),
        policies: Policies::new(sub),
        private_custom_endpoints: config.allow_private_custom_endpoints,
        // Never follow redirects: a provider (or an organization's endpoint) must not send
        // the key on to another host.
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?,
        custom_http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(90))
            .dns_resolver(kilocloud_identity::net::guarded_resolver(
                config.allow_private_custom_endpoints,
            ))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?,
        upstream_idle_timeout: Duration::from_millis(config.upstream_timeout_ms),
        upstream_first_byte_timeout: Duration::from_millis(config.upstream_first_byte_timeout_ms),
        max_body_bytes: config.max_body_bytes,
        recordings: Recordings::new(),
    }))
}
