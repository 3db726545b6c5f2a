//! The model gateway in process on SQLite and PostgreSQL, against the fake OpenAI upstream:
//! forwarding, streaming, usage and cost, balances and 402, upstream error mapping, `kilo/auto`,
//! organization billing, and concurrent spend.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use kilocloud_gateway::config::{GatewayConfig, Limits, ModelConfig, ProviderConfig, ProviderKind};
use kilocloud_gateway::{Ledger, UsageFilter};
use kilocloud_identity::envelope::{MasterKey, MasterKeys};
use kilocloud_identity::model::Initiator;
use kilocloud_identity::{Identity, IdentityConfig, Owner, Role};
use kilocloud_server::api::gateway;
use kilocloud_server::{AppState, ServerOptions, router};
use kilocloud_substrate::{Clock, ManualClock};
use kilocloud_test_support::fake_anthropic::{FakeAnthropic, Reply as AnthropicReply};
use kilocloud_test_support::fake_openai::{FakeOpenAi, Reply};
use kilocloud_test_support::{TestStore, sse_events};
use serde_json::{Value, json};
use tower::ServiceExt;
use uuid::Uuid;

const PAID: &str = "vendor/paid";
const FREE: &str = "vendor/free";
/// Served by `fake`, falling back to `backup`.
const RESILIENT: &str = "vendor/resilient";
/// Served by `claude`, an Anthropic provider.
const CLAUDE: &str = "anthropic/claude";

struct Env {
    _store: TestStore,
    sub: kilocloud_substrate::Substrate,
    upstream: FakeOpenAi,
    /// The `backup` provider: fallback for RESILIENT, and BYOK for `vendor/…`.
    backup: FakeOpenAi,
    /// The `claude` provider (Anthropic Messages), serving CLAUDE.
    anthropic: FakeAnthropic,
    id: Identity,
    ledger: Ledger,
    gateway: Arc<gateway::GatewayState>,
    app: axum::Router,
    key: String,
    user: Uuid,
    clock: Arc<ManualClock>,
}

fn model(id: &str, free: bool) -> ModelConfig {
    ModelConfig {
        id: id.into(),
        upstream_id: format!("upstream-{}", id.replace('/', "-")),
        context_length: 200_000,
        input_price: 3.0,
        output_price: 15.0,
        cache_read_price: 0.3,
        cache_write_price: 3.75,
        free,
        fallback_providers: Vec::new(),
    }
}

async fn env(postgres: bool, timeout: Duration) -> Env {
    env_with(postgres, timeout, Limits::default()).await
}

async fn env_with(postgres: bool, timeout: Duration, limits: Limits) -> Env {
    let store = TestStore::new(postgres).await;
    // Noon UTC, 2027-01-01: budgets count per UTC day, and the test must not straddle midnight.
    let clock = Arc::new(ManualClock::new(1_798_804_800_000));
    let sub = store.open(clock.clone()).await;
    let id = Identity::new(
        &sub,
        IdentityConfig {
            jwt_secret: b"gateway-test-secret".to_vec(),
            master_keys: MasterKeys::new(MasterKey::generate().0, vec![]),
            internal_api_secret: None,
        },
    );
    let upstream = FakeOpenAi::start().await;
    let backup = FakeOpenAi::start().await;
    let anthropic = FakeAnthropic::start().await;
    let resilient = ModelConfig {
        fallback_providers: vec!["backup".into()],
        ..model(RESILIENT, false)
    };
    let config = GatewayConfig {
        providers: vec![
            ProviderConfig {
                id: "fake".into(),
                kind: ProviderKind::OpenaiCompatible,
                base_url: upstream.base_url.clone(),
                api_key: "upstream-secret-key".into(),
                api_key_env: String::new(),
                byok_family: String::new(),
                models: vec![model(PAID, false), model(FREE, true), resilient],
            },
            ProviderConfig {
                id: "backup".into(),
                kind: ProviderKind::OpenaiCompatible,
                base_url: backup.base_url.clone(),
                api_key: "backup-platform-key".into(),
                api_key_env: String::new(),
                byok_family: "vendor".into(),
                models: Vec::new(),
            },
            ProviderConfig {
                id: "claude".into(),
                kind: ProviderKind::Anthropic,
                base_url: anthropic.base_url.clone(),
                api_key: "anthropic-platform-key".into(),
                api_key_env: String::new(),
                byok_family: String::new(),
                models: vec![model(CLAUDE, false)],
            },
        ],
        auto_models: [("build", PAID), ("plan", FREE)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        model_aliases: [("claude-sonnet-*".to_owned(), PAID.to_owned())].into(),
        upstream_timeout_ms: timeout.as_millis() as u64,
        upstream_first_byte_timeout_ms: timeout.as_millis() as u64,
        free_requests_per_hour_per_ip: 6,
        anonymous_requests_per_day_per_ip: 4,
        limits,
        // The fakes listen on loopback.
        allow_private_custom_endpoints: true,
        ..GatewayConfig::default()
    };
    let state = gateway::state(&sub, &config, |_| None).unwrap();
    let ledger = state.ledger.clone();
    let gateway = state.clone();
    let system = Initiator {
        user: Uuid::nil(),
        request_id: None,
    };
    let (user, key, _) = id
        .create_user("dev@example.com", "dev", false, &system)
        .await
        .unwrap();
    let app = router(AppState::new(
        sub.clone(),
        id.clone(),
        state,
        &ServerOptions::default(),
    ));
    Env {
        _store: store,
        sub,
        upstream,
        backup,
        anthropic,
        id,
        ledger,
        gateway,
        app,
        key,
        user: user.id,
        clock,
    }
}

impl Env {
    async fn grant(&self, owner: Owner, micros: i64) {
        let by = Initiator {
            user: self.user,
            request_id: None,
        };
        self.ledger.grant(owner, micros, "test", &by).await.unwrap();
    }

    /// The balance once every request so far is recorded.
    async fn balance(&self, owner: Owner) -> i64 {
        self.gateway.settle().await;
        self.ledger.balance(owner).await.unwrap()
    }

    /// Usage rows (newest first) once every request so far is recorded.
    async fn usage(&self, owner: Owner, limit: usize) -> Vec<kilocloud_gateway::UsageRow> {
        self.gateway.settle().await;
        self.ledger
            .usage(owner, UsageFilter::default(), limit)
            .await
            .unwrap()
    }

    async fn chat(
        &self,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, http::HeaderMap, String) {
        self.chat_as(&self.key, body, headers).await
    }

    async fn chat_as(
        &self,
        key: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, http::HeaderMap, String) {
        let mut req = Request::post("/api/gateway/v1/chat/completions")
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        // Usage is recorded just after the response; the next request sees it.
        self.gateway.settle().await;
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    /// A POST of `body` to `uri` as this user: (status, content type, body text).
    async fn post_text(&self, uri: &str, body: Value) -> (StatusCode, String, String) {
        let req = Request::post(uri)
            .header("authorization", format!("Bearer {}", self.key))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        self.gateway.settle().await;
        let content_type = parts
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (
            parts.status,
            content_type,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    /// Any other request, as `key`: (status, JSON body).
    async fn call(
        &self,
        method: &str,
        uri: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
            .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

fn ask(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello"}]})
}

async fn non_streaming_is_forwarded_metered_and_charged(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;
    e.upstream
        .push(Reply::text("four words of reply", 1000, 200));
    let headers = [
        ("x-kilocode-projectid", "proj-1"),
        ("x-kilocode-taskid", "task-9"),
        ("x-kilocode-feature", "cloud-agent"),
        ("X-KILOCODE-MACHINEID", "machine-7"),
        ("X-KILOCODE-EDITORNAME", "Kilo CLI 7.7.7"),
    ];
    let (status, h, body) = e.chat(ask(PAID, false), &headers).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(h["x-kilocode-provider"], "fake");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "four words of reply"
    );
    assert_eq!(
        (&body["usage"]["cost"], &body["usage"]["cost_details"]),
        (&json!(0.006), &json!({"upstream_inference_cost": 0.006}))
    );

    let sent = &e.upstream.requests()[0];
    assert_eq!(sent.body["model"], "upstream-vendor-paid");
    assert_eq!(sent.headers["authorization"], "Bearer upstream-secret-key");
    assert!(
        sent.body.get("stream_options").is_none(),
        "only streams ask for usage chunks"
    );

    // 1000 × 3 + 200 × 15 = 6,000 µ$.
    assert_eq!(
        e.balance(me).await,
        1_000_000 - 6_000,
        "charged once the recording settles"
    );
    let rows = e.usage(me, 10).await;
    let row = &rows[0];
    assert_eq!(
        (row.input_tokens, row.output_tokens, row.cost_microdollars),
        (1000, 200, 6_000)
    );
    assert_eq!(
        (
            row.model.as_str(),
            row.provider.as_str(),
            row.status,
            row.streaming
        ),
        (PAID, "fake", 200, false)
    );
    assert_eq!(
        (
            row.project_id.as_deref(),
            row.task_id.as_deref(),
            row.feature.as_deref()
        ),
        (Some("proj-1"), Some("task-9"), Some("cloud-agent"))
    );
    assert_eq!(
        (row.machine_id.as_deref(), row.editor.as_deref()),
        (Some("machine-7"), Some("Kilo CLI 7.7.7"))
    );
    assert!(row.api_key.is_some() && row.user == e.user);
}

async fn streaming_is_relayed_chunk_by_chunk_and_charged_at_the_end(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;
    e.upstream.push(Reply::Text {
        content: "streamed reply here".into(),
        prompt_tokens: 500,
        completion_tokens: 40,
        cached_tokens: 300,
        chunk_delay: Duration::from_millis(1),
    });
    let (status, h, body) = e.chat(ask(PAID, true), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["content-type"], "text/event-stream");
    let text: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "streamed reply here");
    assert!(body.trim_end().ends_with("data: [DONE]"));
    assert_eq!(
        e.upstream.requests()[0].body["stream_options"]["include_usage"],
        true
    );
    // The usage chunk carries the cost as OpenRouter reports it (USD).
    let usage = sse_events(&body)
        .into_iter()
        .find_map(|(_, d)| d["usage"].as_object().cloned())
        .expect("a usage chunk");
    assert_eq!(usage["cost"], 0.00129, "{body}");
    assert_eq!(
        usage["cost_details"],
        json!({"upstream_inference_cost": 0.00129})
    );
    // 200 × 3 + 300 × 0.3 + 40 × 15 = 600 + 90 + 600.
    assert_eq!(e.balance(me).await, 1_000_000 - 1_290);
    let row = &e.usage(me, 1).await[0];
    assert_eq!(
        (
            row.input_tokens,
            row.cache_read_tokens,
            row.output_tokens,
            row.streaming
        ),
        (200, 300, 40, true)
    );

    // Embeddings pass through and are charged for their input: 4 words × 3 µ$.
    let req = Request::post("/api/gateway/v1/embeddings")
        .header("authorization", format!("Bearer {}", e.key))
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"model": PAID, "input": ["one two", "three four"]}).to_string(),
        ))
        .unwrap();
    let res = e.app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(e.balance(me).await, 1_000_000 - 1_290 - 12);

    // Tool calls pass through, streamed and not.
    for stream in [false, true] {
        e.upstream.push(Reply::ToolCall {
            name: "read_file".into(),
            arguments: r#"{"path":"a.rs"}"#.into(),
        });
        let (status, _, body) = e.chat(ask(PAID, stream), &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("read_file") && body.contains("tool_calls"),
            "{body}"
        );
    }
}

async fn balance_rules_and_upstream_errors(pg: bool) {
    let e = env(pg, Duration::from_millis(300)).await;
    let me = Owner::User(e.user);

    // Nothing granted: paid models answer 402; free ones work and are not charged.
    let (status, _, body) = e.chat(ask(PAID, false), &[]).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    let err: Value = serde_json::from_str(&body).unwrap();
    assert!(err["error"]["title"].is_string() && err["error"]["message"].is_string());
    assert_eq!(err["error"]["balance"], 0.0);
    assert!(
        e.upstream.requests().is_empty(),
        "a refused request never reaches the provider"
    );
    let (status, _, _) = e.chat(ask(FREE, false), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let row = &e.usage(me, 1).await[0];
    assert_eq!(
        (row.cost_microdollars, row.true_cost_microdollars),
        (0, 105)
    );
    assert_eq!(e.balance(me).await, 0);

    // The provider's 402 is the platform's problem: 503. Other errors pass through.
    e.grant(me, 1_000_000).await;
    e.upstream.push(Reply::Status(402));
    let (status, h, body) = e.chat(ask(PAID, false), &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(h.get("retry-after").is_some());
    e.upstream.push(Reply::Status(500));
    let (status, _, _) = e.chat(ask(PAID, false), &[]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    e.upstream.push(Reply::Hang);
    let (status, _, body) = e.chat(ask(PAID, false), &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    let statuses: Vec<u16> = e.usage(me, 3).await.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [504, 500, 503]);
    assert_eq!(
        e.balance(me).await,
        1_000_000,
        "failed requests cost nothing"
    );

    // Unknown model, bad JSON.
    let (status, _, body) = e.chat(ask("nobody/serves-this", false), &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("model_not_found"));
    let (status, _, _) = e.chat(json!("not an object"), &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn auto_model_and_organization_billing(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let by = Initiator {
        user: e.user,
        request_id: None,
    };
    let org = e.id.create_org("Acme", &by).await.unwrap();
    let (status, _, _) = e
        .chat(ask("kilo/auto", false), &[("x-kilocode-mode", "plan")])
        .await;
    assert_eq!(status, StatusCode::OK, "plan → the free model");
    assert_eq!(
        e.upstream.requests()[0].body["model"],
        "upstream-vendor-free"
    );

    // Acting for the organization bills the organization.
    e.grant(Owner::Org(org.id), 10_000).await;
    let org_id = org.id.to_string();
    let (status, _, _) = e
        .chat(
            ask("kilo/auto", false),
            &[("x-kilocode-organizationid", &org_id)],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "no mode → build → the paid model");
    assert_eq!(
        e.upstream.requests()[1].body["model"],
        "upstream-vendor-paid"
    );
    assert_eq!(e.balance(Owner::Org(org.id)).await, 10_000 - 105);
    assert_eq!(e.balance(Owner::User(e.user)).await, 0);
    let row = &e.usage(Owner::Org(org.id), 1).await[0];
    assert_eq!(
        (row.requested_model.as_str(), row.model.as_str(), row.user),
        ("kilo/auto", PAID, e.user)
    );

    // A member who is not an admin uses the organization but cannot read its usage.
    let system = Initiator {
        user: Uuid::nil(),
        request_id: None,
    };
    let (member, member_key, _) =
        e.id.create_user("m@example.com", "m", false, &system)
            .await
            .unwrap();
    e.id.put_member(org.id, member.id, Role::Member, &by)
        .await
        .unwrap();
    let usage = Request::get("/api/usage")
        .header("authorization", format!("Bearer {member_key}"))
        .header("x-kilocode-organizationid", &org_id)
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        e.app.clone().oneshot(usage).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let balance = Request::get("/api/profile/balance")
        .header("authorization", format!("Bearer {member_key}"))
        .header("x-kilocode-organizationid", &org_id)
        .body(Body::empty())
        .unwrap();
    let res = e.app.clone().oneshot(balance).await.unwrap();
    let body: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(
        (
            body["balanceMicrodollars"].as_i64(),
            body["isDepleted"].as_bool()
        ),
        (Some(9_895), Some(false))
    );
}

async fn concurrent_spend_is_exact_and_bounded(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let me = Owner::User(e.user);
    // Enough for about three requests of 105 µ$; twenty race for it.
    e.grant(me, 300).await;
    let results = futures::future::join_all((0..20).map(|_| e.chat(ask(PAID, false), &[]))).await;
    let served = results
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::OK)
        .count() as i64;
    let refused = results
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::PAYMENT_REQUIRED)
        .count() as i64;
    assert_eq!(served + refused, 20);
    let charged: i64 = e
        .usage(me, 100)
        .await
        .iter()
        .map(|r| r.cost_microdollars)
        .sum();
    assert_eq!(
        charged,
        served * 105,
        "every served request is charged exactly once"
    );
    assert_eq!(
        e.balance(me).await,
        300 - charged,
        "balance and usage agree"
    );
    assert!(
        served >= 3,
        "requests are served while the balance is positive"
    );
    // Each request checks the balance before and is charged after, so the overspend is at most
    // the cost of the requests in flight together; once they are charged, the rule holds again.
    assert!(e.balance(me).await <= 0);
    assert_eq!(
        e.chat(ask(PAID, false), &[]).await.0,
        StatusCode::PAYMENT_REQUIRED
    );
}

async fn fallbacks_and_byok(pg: bool) {
    let e = env(pg, Duration::from_millis(300)).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;

    // A 5xx, then a timeout, from the first provider: the backup serves, and says so.
    for failure in [Reply::Status(503), Reply::Hang] {
        e.upstream.push(failure);
        let (status, h, _) = e.chat(ask(RESILIENT, false), &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h["x-kilocode-provider"], "backup");
        let row = &e.usage(me, 1).await[0];
        assert_eq!(
            (row.provider.as_str(), row.status, row.cost_microdollars),
            ("backup", 200, 105)
        );
    }
    assert_eq!(
        e.backup.requests()[0].headers["authorization"],
        "Bearer backup-platform-key"
    );
    // A 4xx is the caller's problem: no fallback.
    e.upstream.push(Reply::Status(400));
    let (status, _, _) = e.chat(ask(RESILIENT, false), &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e.backup.requests().len(), 2);

    // BYOK: the owner's own key for `vendor/…`, through the BYOK provider, never charged, even
    // at a zero balance, and never the platform's key.
    let system = Initiator {
        user: Uuid::nil(),
        request_id: None,
    };
    let (user, user_key, _) =
        e.id.create_user("byok@example.com", "b", false, &system)
            .await
            .unwrap();
    let owner = Owner::User(user.id);
    let by = Initiator {
        user: user.id,
        request_id: None,
    };
    e.id.put_secret(owner, "BYOK_VENDOR", b"sk-users-own-key", &by)
        .await
        .unwrap();
    let byok_chat = |body: Value| {
        let app = e.app.clone();
        let key = user_key.clone();
        async move {
            let req = Request::post("/api/gateway/chat/completions")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let res = app.oneshot(req).await.unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let before = e.backup.requests().len();
    let (status, _) = byok_chat(ask(PAID, false)).await;
    assert_eq!(status, StatusCode::OK, "BYOK needs no balance");
    assert_eq!(
        e.backup.requests()[before].headers["authorization"],
        "Bearer sk-users-own-key"
    );
    let row = &e.usage(owner, 1).await[0];
    assert_eq!(
        (
            row.provider.as_str(),
            row.cost_microdollars,
            row.true_cost_microdollars
        ),
        ("backup", 0, 105)
    );
    assert_eq!(e.balance(owner).await, 0);
    // The provider refuses the user's key: a readable BYOK error, and no fallback anywhere.
    let upstream_before = e.upstream.requests().len();
    e.backup.push(Reply::Status(401));
    let (status, body) = byok_chat(ask(PAID, false)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        body.contains("byok_upstream_error") && body.contains("BYOK_VENDOR"),
        "{body}"
    );
    assert!(!body.contains("sk-users-own-key"));
    e.backup.push(Reply::Status(500));
    let (status, _) = byok_chat(ask(RESILIENT, false)).await;
    assert_eq!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "a BYOK request never falls back"
    );
    assert_eq!(
        e.upstream.requests().len(),
        upstream_before,
        "the platform's provider was never used"
    );
}

async fn anonymous_callers_and_free_model_limits(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let anonymous = |model: &'static str| {
        let app = e.app.clone();
        async move {
            let req = Request::post("/api/gateway/chat/completions")
                .header("content-type", "application/json")
                .body(Body::from(ask(model, false).to_string()))
                .unwrap();
            let res = app.oneshot(req).await.unwrap();
            let (parts, body) = res.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            (
                parts.status,
                parts.headers,
                String::from_utf8_lossy(&body).into_owned(),
            )
        }
    };
    let (status, _, body) = anonymous(PAID).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("PAID_MODEL_AUTH_REQUIRED"), "{body}");
    // The test configuration allows 4 anonymous and 6 free-model requests per address.
    for _ in 0..4 {
        assert_eq!(anonymous(FREE).await.0, StatusCode::OK);
    }
    let (status, _, body) = anonymous(FREE).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("PROMOTION_MODEL_LIMIT_REACHED"), "{body}");
    // Signed-in callers from the same address are not promoted, but share the hourly limit.
    assert_eq!(e.chat(ask(FREE, false), &[]).await.0, StatusCode::OK);
    assert_eq!(e.chat(ask(FREE, false), &[]).await.0, StatusCode::OK);
    let (status, h, body) = e.chat(ask(FREE, false), &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(h.get("retry-after").is_some());
    assert_eq!(
        e.upstream.requests().len(),
        6,
        "refused requests never reach the provider"
    );
    // Anonymous requests are counted, not billed to anyone.
    assert_eq!(e.usage(Owner::User(Uuid::nil()), 10).await.len(), 0);
}

async fn rate_limits_and_budgets(pg: bool) {
    let limits = Limits {
        requests_per_minute_per_key: 5,
        daily_budget_usd: 0.0003,
        ..Limits::default()
    };
    let e = env_with(pg, Duration::from_secs(10), limits).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;
    // 300 µ$ a day: three requests of 105 µ$ fit (the third crosses the line), the fourth does not.
    for _ in 0..3 {
        assert_eq!(e.chat(ask(PAID, false), &[]).await.0, StatusCode::OK);
    }
    let (status, h, body) = e.chat(ask(PAID, false), &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(body.contains("budget_exceeded"), "{body}");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry, 12 * 3600, "until the next UTC day");
    assert_eq!(e.balance(me).await, 1_000_000 - 315);
    // Free models are not budgeted, but every request counts against the key's rate.
    assert_eq!(e.chat(ask(FREE, false), &[]).await.0, StatusCode::OK);
    let (status, h, body) = e.chat(ask(FREE, false), &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(
        body.contains("rate_limited") && h.get("retry-after").is_some(),
        "{body}"
    );
}

async fn streams_are_relayed_as_they_come_and_cut_short_streams_are_charged(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;

    // The first chunk reaches the client while the provider is still sending: nothing buffers.
    e.upstream.push(Reply::StreamThenHang("first words".into()));
    let req = Request::post("/api/gateway/v1/chat/completions")
        .header("authorization", format!("Bearer {}", e.key))
        .header("content-type", "application/json")
        .body(Body::from(ask(PAID, true).to_string()))
        .unwrap();
    let res = e.app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first chunk arrives before the stream ends")
        .unwrap()
        .unwrap();
    let first = String::from_utf8_lossy(frame.data_ref().unwrap()).into_owned();
    assert!(first.contains("first words"), "{first}");
    // The client goes away: the upstream request is dropped, and the request is recorded as
    // 499, charged for its estimated tokens (input from the request, output from the content).
    drop(body);
    let row = e
        .usage(me, 1)
        .await
        .pop()
        .expect("the cut-short stream was recorded");
    assert_eq!((row.status, row.estimated), (499, true));
    assert_eq!(
        row.output_tokens,
        kilocloud_gateway::count_tokens("first words"),
        "the content relayed, tokenized"
    );
    assert!(row.input_tokens > 0 && row.cost_microdollars > 0);

    // A provider that never reports usage is estimated too, not free.
    e.upstream
        .push(Reply::StreamWithoutUsage("twelve chars".into()));
    let (status, _, _) = e.chat(ask(PAID, true), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let row = &e.usage(me, 1).await[0];
    assert_eq!(
        (row.status, row.estimated, row.output_tokens),
        (200, true, kilocloud_gateway::count_tokens("twelve chars"))
    );
    assert!(row.cost_microdollars > 0);

    // A malformed stream_options is refused, not forwarded.
    let mut bad = ask(PAID, true);
    bad["stream_options"] = json!(1);
    let (status, _, _) = e.chat(bad, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The provider refusing the platform's key is not the caller's 401, and its body is not
    // relayed.
    e.upstream.push(Reply::Status(401));
    let (status, _, body) = e.chat(ask(PAID, false), &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        body.contains("upstream_auth_failed") && !body.contains("fake upstream error"),
        "{body}"
    );
}

async fn organization_policy(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let by = Initiator {
        user: e.user,
        request_id: None,
    };
    let org = e.id.create_org("Acme", &by).await.unwrap();
    let org_id = org.id.to_string();
    let as_org = [("x-kilocode-organizationid", org_id.as_str())];
    e.grant(Owner::Org(org.id), 1_000_000).await;
    let (member, member_key, _) =
        e.id.create_user("m@example.com", "m", false, &by)
            .await
            .unwrap();
    e.id.put_member(org.id, member.id, Role::Member, &by)
        .await
        .unwrap();
    let policy_uri = format!("/api/orgs/{org_id}/gateway-policy");
    let (status, body) = e.call("GET", &policy_uri, &member_key, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["modelAllowList"],
        json!([]),
        "the default allows everything"
    );

    // Only admins change it, and a bad policy is refused whole.
    let policy = json!({
        "modelAllowList": [PAID],
        "memberDailyLimitMicrodollars": 6000,
        "memberDailyLimits": {e.user.to_string(): 1_000_000},
        "customModels": [{"id": "team", "kind": "openai-compatible", "baseUrl": e.backup.base_url,
            "upstreamModel": "team-model", "apiKeySecret": "CUSTOM_MODEL_TEAM"}],
    });
    let (status, _) = e
        .call("PUT", &policy_uri, &member_key, Some(policy.clone()))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let mut bad = policy.clone();
    bad["customModels"][0]["baseUrl"] = json!("file:///etc/passwd");
    let (status, body) = e.call("PUT", &policy_uri, &e.key, Some(bad)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.to_string().contains("baseUrl"), "{body}");
    let (status, body) = e.call("PUT", &policy_uri, &e.key, Some(policy)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The allow-list binds requests for the organization, not personal ones.
    let (status, _, body) = e.chat_as(&member_key, ask(FREE, false), &as_org).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("model_not_allowed"), "{body}");
    assert_eq!(
        e.chat_as(&member_key, ask(FREE, false), &[]).await.0,
        StatusCode::OK
    );

    // The member's daily limit: 6,000 µ$ of the organization's balance; one request of
    // 1,000 + 200 tokens costs 6,000 µ$, so the second is refused as a depleted balance.
    e.upstream.push(Reply::text("a reply", 1000, 200));
    let (status, _, body) = e.chat_as(&member_key, ask(PAID, false), &as_org).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = e.chat_as(&member_key, ask(PAID, false), &as_org).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["balance"], json!(0.0));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("daily limit")
    );
    // The owner has a larger override, and the next UTC day the member starts afresh.
    assert_eq!(e.chat(ask(PAID, false), &as_org).await.0, StatusCode::OK);
    e.clock.advance(24 * 3600 * 1000);
    let (status, _, body) = e.chat_as(&member_key, ask(PAID, false), &as_org).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A custom model goes to the organization's endpoint with its key, which must be set.
    let custom = ask("kilo/team", false);
    let (status, _, body) = e.chat_as(&member_key, custom.clone(), &as_org).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        body.contains("custom_model_key_missing") && body.contains("CUSTOM_MODEL_TEAM"),
        "{body}"
    );
    e.id.put_secret(
        Owner::Org(org.id),
        "CUSTOM_MODEL_TEAM",
        b"team-endpoint-key",
        &by,
    )
    .await
    .unwrap();
    let before = e.balance(Owner::Org(org.id)).await;
    let (status, h, body) = e.chat_as(&member_key, custom.clone(), &as_org).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(h["x-kilocode-provider"], "custom:team");
    let sent = e.backup.requests().pop().unwrap();
    assert_eq!(sent.headers["authorization"], "Bearer team-endpoint-key");
    assert_eq!(sent.body["model"], "team-model");
    assert_eq!(e.balance(Owner::Org(org.id)).await, before, "never charged");
    let row = &e.usage(Owner::Org(org.id), 1).await[0];
    assert_eq!(
        (
            row.model.as_str(),
            row.provider.as_str(),
            row.cost_microdollars
        ),
        ("kilo/team", "custom:team", 0)
    );
    // Outside the organization `kilo/team` is nobody's model.
    let (status, _, _) = e.chat_as(&member_key, custom, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let audit = e.id.audit(Owner::Org(org.id), None, 10).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.action == "gateway_policy.updated" && a.actor == e.user),
        "{audit:?}"
    );
}

async fn token_limits_and_usage_filters(pg: bool) {
    let limits = Limits {
        tokens_per_minute_per_key: 2000,
        ..Limits::default()
    };
    let e = env_with(pg, Duration::from_secs(10), limits).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;
    // 1,200 tokens each: the second request starts under the limit, the third does not.
    for _ in 0..2 {
        e.upstream.push(Reply::text("a reply", 1000, 200));
        let (status, _, _) = e
            .chat(ask(PAID, false), &[("x-kilocode-feature", "cloud-agent")])
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, h, body) = e.chat(ask(FREE, false), &[]).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "free models count too"
    );
    assert!(body.contains("tokens per minute"), "{body}");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=120).contains(&retry), "{retry}");
    e.clock.advance(retry as i64 * 1000);
    assert_eq!(
        e.chat(ask(FREE, false), &[]).await.0,
        StatusCode::OK,
        "after Retry-After"
    );

    // Filters on the usage listing, each one narrowing it.
    let at = e.clock.now_ms();
    for (query, rows) in [
        ("", 3),
        ("?feature=cloud-agent", 2),
        (&format!("?model={FREE}") as &str, 1),
        ("?status=200&provider=fake", 3),
        ("?status=429", 0),
        (&format!("?since={at}") as &str, 1),
        (&format!("?until={at}") as &str, 2),
        (&format!("?user={}&limit=1", e.user) as &str, 1),
    ] {
        let (status, body) = e
            .call("GET", &format!("/api/usage{query}"), &e.key, None)
            .await;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        assert_eq!(body["usage"].as_array().unwrap().len(), rows, "{query}");
    }
    for bad in ["?user=nope", "?limit=0", "?colour=red"] {
        let (status, body) = e
            .call("GET", &format!("/api/usage{bad}"), &e.key, None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
}

/// Sends `body` (raw bytes) to `uri` as `bearer` (none when empty); (status, headers, body).
async fn raw(
    app: &axum::Router,
    uri: &str,
    bearer: &str,
    body: Vec<u8>,
) -> (StatusCode, http::HeaderMap, Value) {
    let mut req = Request::post(uri).header("content-type", "application/json");
    if !bearer.is_empty() {
        req = req.header("authorization", format!("Bearer {bearer}"));
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Body limits (32 MiB on the gateway, JSON 413s everywhere), the model lookup, and the
/// response headers naming the request and its cost.
async fn body_limits_model_lookup_and_response_headers(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;
    // A 1 MiB conversation (far over the 256 KiB of other routes) goes through.
    e.upstream.push(Reply::text("ok", 1000, 200));
    let mut big = ask(PAID, false);
    big["messages"][0]["content"] = json!("x".repeat(1 << 20));
    let (status, h, body) = raw(
        &e.app,
        "/api/gateway/v1/chat/completions",
        &e.key,
        big.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // 1000 × 3 + 200 × 15 µ$, said in the response.
    assert_eq!(h["x-kilocode-cost-microdollars"], "6000");
    let request_id = h["x-kilocode-request-id"].to_str().unwrap().to_owned();
    assert!(Uuid::parse_str(&request_id).is_ok(), "{request_id}");
    let upstream_id = h["x-upstream-request-id"].to_str().unwrap().to_owned();
    assert!(
        upstream_id.starts_with("req_fake_"),
        "the provider's id, relayed"
    );
    let row = e.usage(me, 1).await.remove(0);
    assert_eq!(row.request_id, request_id);
    assert_eq!(
        row.upstream_request_id.as_deref(),
        Some(upstream_id.as_str())
    );
    // Over 32 MiB: 413 in the API's error format, and nothing reaches the provider.
    let sent = e.upstream.requests().len();
    let huge = vec![b' '; 32 * 1024 * 1024 + 1];
    let (status, _, body) = raw(&e.app, "/api/gateway/v1/chat/completions", &e.key, huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    assert_eq!(e.upstream.requests().len(), sent);
    // Other routes keep 256 KiB, and answer 413 as JSON too.
    let (status, _, body) = raw(&e.app, "/api/tokens", &e.key, vec![b' '; 300 * 1024]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    // axum's own plain-text rejections (here a path segment that is not a number) are
    // rewritten into the API's error format.
    let (status, body) = e
        .call("DELETE", "/api/github/installations/abc", &e.key, None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );

    // An alias (Claude Code's own model id) is served as its target; the row keeps both.
    e.upstream.push(Reply::text("ok", 10, 1));
    let (status, _, body) = e.chat(ask("claude-sonnet-4-5-20250929", false), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let row = e.usage(me, 1).await.remove(0);
    assert_eq!(
        (row.requested_model.as_str(), row.model.as_str()),
        ("claude-sonnet-4-5-20250929", PAID)
    );
    assert_eq!(
        e.upstream.requests().last().unwrap().body["model"],
        "upstream-vendor-paid"
    );

    // The catalog in the Kilo CLI's shape: prices per token as strings, tools supported.
    let (status, list) = e.call("GET", "/api/openrouter/models", &e.key, None).await;
    assert_eq!(status, StatusCode::OK);
    let paid = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == PAID)
        .unwrap();
    assert_eq!(paid["pricing"]["prompt"], "0.000003");
    assert_eq!(paid["pricing"]["completion"], "0.000015");
    assert!(
        paid["supported_parameters"]
            .as_array()
            .unwrap()
            .contains(&json!("tools"))
    );
    assert_eq!(paid["opencode"]["ai_sdk_provider"], "openai-compatible");
    assert_eq!(paid["isFree"], false);

    // GET /v1/models/{id}: ids with slashes, plain or percent-encoded.
    for uri in [
        "/api/gateway/v1/models/vendor/paid",
        "/api/gateway/v1/models/vendor%2Fpaid",
    ] {
        let (status, body) = e.call("GET", uri, &e.key, None).await;
        assert_eq!(status, StatusCode::OK, "{uri}");
        assert_eq!(
            (body["id"].as_str(), body["object"].as_str()),
            (Some(PAID), Some("model"))
        );
    }
    let (status, body) = e
        .call("GET", "/api/gateway/v1/models/vendor/none", &e.key, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "model_not_found");
}

/// Anthropic's `count_tokens`, counted by the gateway: the estimator's count, nothing sent
/// upstream, nothing charged; unknown models 404, paid ones need credentials.
async fn count_tokens_is_estimated_here(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let body = json!({"model": PAID, "system": "Hello, world!",
        "messages": [{"role": "user", "content": "Hello, world!"}]});
    let (status, _, reply) = raw(
        &e.app,
        "/api/gateway/v1/messages/count_tokens",
        &e.key,
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(
        reply["input_tokens"].as_u64(),
        Some(kilocloud_gateway::estimated_input_tokens(&body))
    );
    assert_eq!(
        reply["input_tokens"].as_u64(),
        Some(kilocloud_gateway::count_tokens("Hello, world!\nHello, world!") + 3)
    );
    assert!(e.upstream.requests().is_empty(), "nothing went upstream");
    assert_eq!(
        e.usage(Owner::User(e.user), 10).await.len(),
        0,
        "not charged"
    );
    let unknown = json!({"model": "vendor/none", "messages": []});
    let (status, _, reply) = raw(
        &e.app,
        "/api/gateway/v1/messages/count_tokens",
        &e.key,
        unknown.to_string().into_bytes(),
    )
    .await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );
    let (status, _, _) = raw(
        &e.app,
        "/api/gateway/v1/messages/count_tokens",
        "",
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a paid model needs credentials"
    );
    let free = json!({"model": FREE, "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, _) = raw(
        &e.app,
        "/api/gateway/v1/messages/count_tokens",
        "sk-placeholder",
        free.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "free models count anonymously");
}

/// A stream is complete once its terminal event went by: a client that hangs up right after
/// `[DONE]` leaves a 200 row with the provider's usage, not a 499.
async fn a_stream_that_relayed_done_is_complete(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;
    e.upstream.push(Reply::text("all of it", 10, 3));
    let req = Request::post("/api/gateway/v1/chat/completions")
        .header("authorization", format!("Bearer {}", e.key))
        .header("content-type", "application/json")
        .body(Body::from(ask(PAID, true).to_string()))
        .unwrap();
    let mut body = e.app.clone().oneshot(req).await.unwrap().into_body();
    let mut seen = String::new();
    while !seen.contains("[DONE]") {
        let frame = body.frame().await.expect("more frames").unwrap();
        seen.push_str(&String::from_utf8_lossy(frame.data_ref().unwrap()));
    }
    drop(body);
    let row = &e.usage(me, 1).await[0];
    assert_eq!((row.status, row.estimated), (200, false), "{seen}");
    assert_eq!((row.input_tokens, row.output_tokens), (10, 3));
}

/// `upstream_timeout_ms` is an idle timeout: a stream that goes silent is cut with an error
/// event in the stream and recorded as 504, charged for what was relayed.
async fn a_silent_stream_is_cut_with_an_error_event(pg: bool) {
    let e = env(pg, Duration::from_millis(300)).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;
    e.upstream.push(Reply::StreamThenHang("some words".into()));
    let (status, _, body) = e.chat(ask(PAID, true), &[]).await;
    assert_eq!(status, StatusCode::OK, "the stream had started");
    assert!(body.contains("some words"), "{body}");
    let last = body
        .lines()
        .rfind(|l| l.starts_with("data: "))
        .expect("an event");
    let event: Value = serde_json::from_str(&last["data: ".len()..]).unwrap();
    assert_eq!(event["error"]["code"], "upstream_timeout", "{body}");
    let row = &e.usage(me, 1).await[0];
    assert_eq!((row.status, row.estimated), (504, true));
    assert_eq!(
        row.output_tokens,
        kilocloud_gateway::count_tokens("some words")
    );
}

/// SDKs always send some key: on a free model a bearer that is not ours is anonymous (and is
/// no authentication failure); on a paid model it is refused.
async fn a_foreign_bearer_is_anonymous_on_free_models(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    for bearer in ["sk-placeholder", "anonymous"] {
        let (status, _, body) = raw(
            &e.app,
            "/api/gateway/v1/chat/completions",
            bearer,
            ask(FREE, false).to_string().into_bytes(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{bearer}: {body}");
    }
    let (status, _, body) = raw(
        &e.app,
        "/api/gateway/v1/chat/completions",
        "sk-placeholder",
        ask(PAID, false).to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // A wrong key of ours is a wrong key, free model or not.
    let (status, _, _) = raw(
        &e.app,
        "/api/gateway/v1/chat/completions",
        "kc_wrong",
        ask(FREE, false).to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(e.usage(Owner::User(e.user), 10).await.len(), 0);
}

/// Charges are durable before the response completes and exactly once: the row is on the
/// charge queue by the time the client has the whole response, and withdrawn once recorded; a
/// row its node never recorded (it died) is charged by the queue, once; a copy delivered
/// anyway changes nothing.
async fn charges_are_queued_durably_and_deduplicated(pg: bool) {
    use kilocloud_gateway::ledger::{CHARGE_QUEUE, CHARGE_RECOVERY_DELAY_MS, ChargeConsumer};
    let e = env(pg, Duration::from_secs(10)).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;
    e.upstream.push(Reply::text("ok", 1000, 200));
    let (status, _, _) = raw(
        &e.app,
        "/api/gateway/v1/chat/completions",
        &e.key,
        ask(PAID, false).to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The response is complete (its body read) and nothing has waited for the recording: the
    // row was queued before the body went out.
    let req = Request::get("/metrics").body(Body::empty()).unwrap();
    let res = e.app.clone().oneshot(req).await.unwrap();
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(
        text.lines()
            .any(|l| l == format!("kilocloud_queue_sent_total{{queue=\"{CHARGE_QUEUE}\"}} 1")),
        "{text}"
    );
    assert_eq!(e.balance(me).await, 1_000_000 - 6_000);
    let queued = |stats: Vec<kilocloud_substrate::QueueStats>| {
        stats
            .into_iter()
            .find(|q| q.queue == CHARGE_QUEUE)
            .map_or(0, |q| q.ready + q.delayed + q.in_flight)
    };
    assert_eq!(
        queued(e.sub.queues().stats().await.unwrap()),
        0,
        "the copy is withdrawn once the row is recorded"
    );

    // A node that queued a row and died before recording it: the queue charges it, once.
    let consumer = ChargeConsumer(e.ledger.clone());
    let mut row = e.usage(me, 1).await.remove(0);
    row.request_id = Uuid::now_v7().to_string();
    e.ledger.enqueue_charge(&row).await.unwrap();
    e.clock.advance(CHARGE_RECOVERY_DELAY_MS as i64 + 1);
    assert_eq!(
        e.sub
            .queues()
            .process_batch(CHARGE_QUEUE, &consumer)
            .await
            .unwrap(),
        1
    );
    assert_eq!(e.ledger.balance(me).await.unwrap(), 1_000_000 - 12_000);
    // Delivered again, or recorded again by anyone: nothing changes.
    e.ledger.enqueue_charge(&row).await.unwrap();
    e.clock.advance(CHARGE_RECOVERY_DELAY_MS as i64 + 1);
    e.sub
        .queues()
        .process_batch(CHARGE_QUEUE, &consumer)
        .await
        .unwrap();
    e.ledger.record(row.clone()).await.unwrap();
    assert_eq!(e.ledger.balance(me).await.unwrap(), 1_000_000 - 12_000);
    assert_eq!(e.usage(me, 10).await.len(), 2);
    assert_eq!(queued(e.sub.queues().stats().await.unwrap()), 0);
}

/// Listing usage reads storage page by page outside the ledger actor: filters and `before`
/// cross page boundaries, newest first.
async fn usage_listing_pages_across_storage_pages(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let me = Owner::User(e.user);
    e.upstream.push(Reply::text("ok", 1, 1));
    e.chat(ask(FREE, false), &[]).await;
    let template = e.usage(me, 1).await.remove(0);
    for i in 0..1_100u32 {
        let row = kilocloud_gateway::UsageRow {
            request_id: format!("r{i}"),
            status: if i % 100 == 0 { 500 } else { 200 },
            ..template.clone()
        };
        e.ledger.record(row).await.unwrap();
    }
    let failed = |before| {
        e.ledger.usage(
            me,
            UsageFilter {
                status: Some(500),
                before,
                ..UsageFilter::default()
            },
            5,
        )
    };
    let page = failed(None).await.unwrap();
    let seqs: Vec<u64> = page.iter().map(|r| r.seq).collect();
    // Row i has seq i + 2 (the free request was seq 1).
    assert_eq!(seqs, [1002, 902, 802, 702, 602]);
    let next = failed(Some(602)).await.unwrap();
    let seqs: Vec<u64> = next.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [502, 402, 302, 202, 102]);
    let all = e
        .ledger
        .usage(me, UsageFilter::default(), 1000)
        .await
        .unwrap();
    assert_eq!(all.len(), 1000);
    assert!(all.windows(2).all(|w| w[0].seq == w[1].seq + 1));
    assert_eq!(all[0].seq, 1101);
}

/// Chat Completions clients reach a model served by an Anthropic provider: the request goes
/// out in Messages form (system prompt on top, `max_tokens` set, tool results in a user turn),
/// answers come back as Chat completions and chunks, usage (with cache reads) is charged, and
/// the provider's errors keep their status in OpenAI's error format.
async fn chat_clients_reach_anthropic_models(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;
    e.anthropic.push(AnthropicReply::Text {
        text: "hello from claude".into(),
        input_tokens: 100,
        output_tokens: 20,
        cache_read_input_tokens: 1000,
    });
    let conversation = json!({
        "model": CLAUDE,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "read a"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "read", "arguments": "{\"path\":\"a\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "A's text"},
        ],
        "tools": [{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}],
    });
    let (status, content_type, body) = e
        .post_text("/api/gateway/v1/chat/completions", conversation)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(content_type, "application/json");
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "hello from claude"
    );
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    assert_eq!(reply["usage"]["prompt_tokens"], 1100);
    assert_eq!(
        reply["usage"]["prompt_tokens_details"]["cached_tokens"],
        1000
    );
    let sent = &e.anthropic.requests()[0];
    assert_eq!(sent.headers["x-api-key"], "anthropic-platform-key");
    assert_eq!(sent.body["model"], "upstream-anthropic-claude");
    assert_eq!(
        sent.body["system"],
        json!([{"type": "text", "text": "be brief"}])
    );
    assert_eq!(sent.body["max_tokens"], 4096);
    assert_eq!(
        sent.body["messages"][2]["content"][0]["type"],
        "tool_result"
    );
    // 100 × 3 + 1000 × 0.3 + 20 × 15 = 900 µ$.
    let row = &e.usage(me, 1).await[0];
    assert_eq!(
        (
            row.input_tokens,
            row.cache_read_tokens,
            row.output_tokens,
            row.cost_microdollars
        ),
        (100, 1000, 20, 900)
    );
    assert_eq!((row.provider.as_str(), row.status), ("claude", 200));

    // Streamed: Chat chunks, the usage chunk, `[DONE]`; charged from Anthropic's usage.
    e.anthropic
        .push(AnthropicReply::text("streamed words here", 50, 4));
    let (status, content_type, body) = e
        .post_text("/api/gateway/v1/chat/completions", ask(CLAUDE, true))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(content_type, "text/event-stream");
    let events = sse_events(&body);
    assert_eq!(events.last().unwrap().1, "[DONE]", "{body}");
    let text: String = events
        .iter()
        .filter_map(|(_, d)| d["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "streamed words here");
    let usage = &events[events.len() - 2].1["usage"];
    assert_eq!(
        (
            usage["prompt_tokens"].as_u64(),
            usage["completion_tokens"].as_u64()
        ),
        (Some(50), Some(4))
    );
    let row = &e.usage(me, 1).await[0];
    assert_eq!(
        (
            row.input_tokens,
            row.output_tokens,
            row.streaming,
            row.estimated
        ),
        (50, 4, true, false)
    );

    // A streamed tool call arrives as Chat tool-call deltas.
    e.anthropic.push(AnthropicReply::ToolUse {
        name: "read".into(),
        input: json!({"path": "b"}),
    });
    let mut tools = ask(CLAUDE, true);
    tools["tools"] = json!([{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}]);
    let (_, _, body) = e.post_text("/api/gateway/v1/chat/completions", tools).await;
    let events = sse_events(&body);
    let args: String = events
        .iter()
        .flat_map(|(_, d)| {
            d["choices"][0]["delta"]["tool_calls"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|c| c["function"]["arguments"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"path": "b"})
    );
    assert!(
        events
            .iter()
            .any(|(_, d)| d["choices"][0]["finish_reason"] == "tool_calls")
    );

    // The provider's refusal keeps its status, in OpenAI's error format.
    e.anthropic.push(AnthropicReply::Status(429));
    let (status, _, body) = e
        .post_text("/api/gateway/v1/chat/completions", ask(CLAUDE, false))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["message"], "fake error 429", "{body}");
    // A request that cannot be carried is refused before anything goes out.
    let before = e.anthropic.requests().len();
    let bad = json!({"model": CLAUDE, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]});
    let (status, _, body) = e.post_text("/api/gateway/v1/chat/completions", bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["code"],
        "invalid_request"
    );
    assert_eq!(e.anthropic.requests().len(), before);
}

/// Anthropic Messages clients (Claude Code) reach a model served by an OpenAI-compatible
/// provider, by its id or by an alias: the request goes out as Chat Completions (tool pairing
/// as OpenAI requires it, stream usage asked for), and answers come back as Messages and
/// Messages events, charged; a stream cut short ends with an Anthropic `error` event.
async fn messages_clients_reach_openai_models(pg: bool) {
    let e = env(pg, Duration::from_millis(500)).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;
    e.upstream.push(Reply::text("hi from gpt", 300, 30));
    let conversation = json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 200,
        "system": [{"type": "text", "text": "you are terse"}],
        "messages": [
            {"role": "user", "content": "list files"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "ls", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"},
                                         {"type": "text", "text": "and now?"}]},
        ],
        "tools": [{"name": "ls", "input_schema": {"type": "object"}}],
    });
    let (status, _, body) = e.post_text("/api/gateway/v1/messages", conversation).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["type"], "message");
    assert_eq!(
        reply["content"],
        json!([{"type": "text", "text": "hi from gpt"}])
    );
    assert_eq!(reply["stop_reason"], "end_turn");
    assert_eq!(reply["usage"]["input_tokens"], 300);
    let sent = &e.upstream.requests()[0];
    assert_eq!(
        sent.body["model"], "upstream-vendor-paid",
        "the alias resolved"
    );
    assert_eq!(sent.body["max_tokens"], 200);
    assert_eq!(
        sent.body["messages"],
        json!([
            {"role": "system", "content": "you are terse"},
            {"role": "user", "content": [{"type": "text", "text": "list files"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "a.txt"},
            {"role": "user", "content": [{"type": "text", "text": "and now?"}]},
        ])
    );
    let row = &e.usage(me, 1).await[0];
    assert_eq!(
        (row.requested_model.as_str(), row.model.as_str()),
        ("claude-sonnet-4-5-20250929", PAID)
    );
    assert_eq!(
        (row.input_tokens, row.output_tokens, row.cost_microdollars),
        (300, 30, 1_350)
    );

    // Streamed: Messages events in order, usage in `message_delta`, charged.
    e.upstream.push(Reply::text("one two three", 40, 3));
    let stream = json!({"model": PAID, "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "count"}]});
    let (status, content_type, body) = e
        .post_text("/api/gateway/v1/messages", stream.clone())
        .await;
    assert_eq!(
        (status, content_type.as_str()),
        (StatusCode::OK, "text/event-stream"),
        "{body}"
    );
    let events = sse_events(&body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
    let text: String = events
        .iter()
        .filter_map(|(_, d)| d["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "one two three");
    assert_eq!(events[events.len() - 2].1["usage"]["output_tokens"], 3);
    let sent = e.upstream.requests().pop().unwrap();
    assert_eq!(sent.body["stream_options"], json!({"include_usage": true}));
    let row = &e.usage(me, 1).await[0];
    assert_eq!(
        (row.input_tokens, row.output_tokens, row.estimated),
        (40, 3, false)
    );

    // A tool call streamed by the provider becomes a tool_use block.
    e.upstream.push(Reply::ToolCall {
        name: "ls".into(),
        arguments: "{\"dir\":\".\"}".into(),
    });
    let (_, _, body) = e
        .post_text("/api/gateway/v1/messages", stream.clone())
        .await;
    let events = sse_events(&body);
    let start = events
        .iter()
        .find(|(n, d)| n == "content_block_start" && d["content_block"]["type"] == "tool_use")
        .expect(&body);
    assert_eq!(start.1["content_block"]["name"], "ls");
    let json_text: String = events
        .iter()
        .filter_map(|(_, d)| d["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(json_text, "{\"dir\":\".\"}");
    assert_eq!(
        events[events.len() - 2].1["delta"]["stop_reason"],
        "tool_use"
    );

    // Cut short: the client gets Anthropic's `error` event; the row says 504.
    e.upstream.push(Reply::StreamThenHang("partial".into()));
    let (status, _, body) = e.post_text("/api/gateway/v1/messages", stream).await;
    assert_eq!(status, StatusCode::OK);
    let last = sse_events(&body).pop().unwrap();
    assert_eq!(last.0, "error", "{body}");
    assert_eq!(last.1["error"]["type"], "api_error");
    assert_eq!(e.usage(me, 1).await[0].status, 504);

    // The provider's errors come back in Anthropic's format.
    e.upstream.push(Reply::Status(400));
    let (status, _, body) = e
        .post_text(
            "/api/gateway/v1/messages",
            json!({"model": PAID, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (err["type"].as_str(), err["error"]["message"].as_str()),
        (Some("error"), Some("fake upstream error 400"))
    );
}

/// The Responses API over both kinds of provider, streamed and not; stateless.
async fn responses_api_over_any_provider(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;
    e.upstream.push(Reply::text("from chat", 12, 2));
    let ask_r = |model: &str, stream: bool| json!({"model": model, "input": "hi", "instructions": "be nice", "max_output_tokens": 64, "store": false, "stream": stream});
    for path in ["/api/gateway/v1/responses", "/api/openrouter/responses"] {
        if path.contains("openrouter") {
            e.upstream.push(Reply::text("from chat", 12, 2));
        }
        let (status, _, body) = e.post_text(path, ask_r(PAID, false)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let r: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(r["object"], "response");
        assert_eq!(r["output"][0]["content"][0]["text"], "from chat");
        assert_eq!(
            (
                r["usage"]["input_tokens"].as_u64(),
                r["usage"]["output_tokens"].as_u64()
            ),
            (Some(12), Some(2))
        );
    }
    let sent = e.upstream.requests().pop().unwrap();
    assert_eq!(
        sent.body["messages"],
        json!([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}])
    );
    assert_eq!(sent.body["max_tokens"], 64);

    e.anthropic.push(AnthropicReply::text("from claude", 7, 3));
    let (status, _, body) = e
        .post_text("/api/gateway/v1/responses", ask_r(CLAUDE, true))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = sse_events(&body);
    assert_eq!(events[0].0, "response.created");
    let done = &events.last().unwrap().1;
    assert_eq!(done["type"], "response.completed");
    assert_eq!(
        done["response"]["output"][0]["content"][0]["text"],
        "from claude"
    );
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .filter_map(|(_, d)| d["delta"].as_str())
        .collect();
    assert_eq!(text, "from claude");
    let row = &e.usage(me, 1).await[0];
    assert_eq!(
        (
            row.provider.as_str(),
            row.input_tokens,
            row.output_tokens,
            row.estimated
        ),
        ("claude", 7, 3, false)
    );

    let (status, _, body) = e
        .post_text(
            "/api/gateway/v1/responses",
            json!({"model": PAID, "input": "more", "previous_response_id": "resp_1"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("previous_response_id"), "{body}");
}

/// FIM goes to the provider's `/fim/completions` as it is and is charged like chat; a model on
/// an Anthropic provider has no FIM.
async fn fim_completions_are_proxied_and_charged(pg: bool) {
    let e = env(pg, Duration::from_secs(10)).await;
    let me = Owner::User(e.user);
    e.grant(me, 1_000_000).await;
    e.upstream.push(Reply::text("x + y", 30, 4));
    let fim = json!({"model": PAID, "prompt": "fn add(x: i32, y: i32) -> i32 {", "suffix": "}", "max_tokens": 16});
    let (status, _, body) = e.post_text("/api/fim/completions", fim.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["choices"][0]["message"]["content"],
        "x + y"
    );
    let sent = e.upstream.requests().pop().unwrap();
    assert_eq!(
        (sent.body["suffix"].as_str(), sent.body["model"].as_str()),
        (Some("}"), Some("upstream-vendor-paid"))
    );
    let row = &e.usage(me, 1).await[0];
    assert_eq!(
        (row.input_tokens, row.output_tokens, row.cost_microdollars),
        (30, 4, 150)
    );
    let mut streamed = fim.clone();
    streamed["stream"] = true.into();
    e.upstream.push(Reply::text("a b", 5, 2));
    let (status, _, body) = e.post_text("/api/fim/completions", streamed).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert_eq!(e.usage(me, 1).await[0].output_tokens, 2);
    let mut claude = fim;
    claude["model"] = CLAUDE.into();
    let (status, _, body) = e.post_text("/api/fim/completions", claude).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["code"],
        "unsupported_api"
    );
}

kilocloud_test_support::on_both_backends!(
    count_tokens_is_estimated_here,
    chat_clients_reach_anthropic_models,
    messages_clients_reach_openai_models,
    responses_api_over_any_provider,
    fim_completions_are_proxied_and_charged,
    body_limits_model_lookup_and_response_headers,
    a_stream_that_relayed_done_is_complete,
    a_silent_stream_is_cut_with_an_error_event,
    a_foreign_bearer_is_anonymous_on_free_models,
    charges_are_queued_durably_and_deduplicated,
    usage_listing_pages_across_storage_pages,
    organization_policy,
    token_limits_and_usage_filters,
    streams_are_relayed_as_they_come_and_cut_short_streams_are_charged,
    rate_limits_and_budgets,
    anonymous_callers_and_free_model_limits,
    fallbacks_and_byok,
    non_streaming_is_forwarded_metered_and_charged,
    streaming_is_relayed_chunk_by_chunk_and_charged_at_the_end,
    balance_rules_and_upstream_errors,
    auto_model_and_organization_billing,
    concurrent_spend_is_exact_and_bounded,
);
