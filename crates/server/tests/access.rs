//! The identity HTTP API on SQLite and PostgreSQL: the access matrix over every route in the
//! OpenAPI document, credential failures with their codes, tickets, the org header, the
//! authentication rate limit, and a scan of every log line the tests produced for secrets.

use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use kilocloud_gateway::config::{GatewayConfig, ModelConfig, ProviderConfig, ProviderKind};
use kilocloud_identity::credential::{TokenClaims, TokenSigner};
use kilocloud_identity::envelope::{MasterKey, MasterKeys};
use kilocloud_identity::model::Initiator;
use kilocloud_identity::{Identity, IdentityConfig, Owner, Role};
use kilocloud_server::api::gateway;
use kilocloud_server::{AppState, ServerOptions, router};
use kilocloud_substrate::ManualClock;
use kilocloud_test_support::TestStore;
use kilocloud_test_support::fake_anthropic::FakeAnthropic;
use kilocloud_test_support::fake_openai::FakeOpenAi;
use serde_json::{Value, json};
use tower::ServiceExt;
use uuid::Uuid;

/// 2027-01-01T00:00:00Z.
const T0: i64 = 1_798_761_600_000;
const JWT_SECRET: &[u8] = b"access-test-jwt-secret-0123456789";
const INTERNAL: &str = "internal-test-secret-value";
const SECRET_VALUE: &str = "sk-live-do-not-log-4242";

// ----- log capture -----

/// Everything any test in this binary logged, at every level.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || Capture(writer.clone()))
            .try_init()
            .expect("first subscriber");
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Asserts that no captured log line contains any of `secrets`.
fn assert_not_logged(secrets: &[String]) {
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(!text.is_empty(), "logs are being captured");
    for s in secrets {
        assert!(
            !text.contains(s.as_str()),
            "a secret appeared in the logs: {}…",
            &s[..6.min(s.len())]
        );
    }
}

// ----- environment -----

/// The free model of the test catalog, served by the fake upstream.
const FREE_MODEL: &str = "test/free";
/// A free model served by the fake Anthropic upstream.
const FREE_CLAUDE: &str = "test/claude-free";

struct Env {
    _store: TestStore,
    _upstream: FakeOpenAi,
    _claude: FakeAnthropic,
    clock: Arc<ManualClock>,
    id: Identity,
    app: axum::Router,
    master_key_text: String,
}

async fn env(postgres: bool, auth_failures_per_minute: u32) -> Env {
    logs();
    let store = TestStore::new(postgres).await;
    let clock = Arc::new(ManualClock::new(T0));
    let sub = store.open(clock.clone()).await;
    let (key, master_key_text) = MasterKey::generate();
    let id = Identity::new(
        &sub,
        IdentityConfig {
            jwt_secret: JWT_SECRET.to_vec(),
            master_keys: MasterKeys::new(key, vec![]),
            internal_api_secret: Some(INTERNAL.into()),
        },
    );
    let options = ServerOptions {
        auth_failures_per_minute,
        ..ServerOptions::default()
    };
    let upstream = FakeOpenAi::start().await;
    let claude = FakeAnthropic::start().await;
    let free = |id: &str| ModelConfig {
        id: id.into(),
        upstream_id: String::new(),
        context_length: 1000,
        input_price: 0.0,
        output_price: 0.0,
        cache_read_price: 0.0,
        cache_write_price: 0.0,
        free: true,
        fallback_providers: Vec::new(),
    };
    let gateway = GatewayConfig {
        providers: vec![
            ProviderConfig {
                id: "fake".into(),
                kind: ProviderKind::OpenaiCompatible,
                base_url: upstream.base_url.clone(),
                api_key: "upstream-key".into(),
                api_key_env: String::new(),
                byok_family: String::new(),
                models: vec![free(FREE_MODEL)],
            },
            ProviderConfig {
                id: "claude".into(),
                kind: ProviderKind::Anthropic,
                base_url: claude.base_url.clone(),
                api_key: "claude-key".into(),
                api_key_env: String::new(),
                byok_family: String::new(),
                models: vec![free(FREE_CLAUDE)],
            },
        ],
        ..GatewayConfig::default()
    };
    let gateway = gateway::state(&sub, &gateway, |_| None).unwrap();
    let app = router(AppState::new(sub, id.clone(), gateway, &options));
    Env {
        _store: store,
        _upstream: upstream,
        _claude: claude,
        clock,
        id,
        app,
        master_key_text,
    }
}

impl Env {
    /// How far the manual clock has moved from `T0`, ms.
    fn clock_offset(&self) -> i64 {
        use kilocloud_substrate::Clock;
        self.clock.now_ms() - T0
    }
}

struct Response {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Value,
}

impl Response {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

async fn send(app: &axum::Router, req: Request<Body>) -> Response {
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
    Response {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn request(
    method: &str,
    uri: &str,
    token: Option<&str>,
    org: Option<&str>,
    body: Option<&Value>,
) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if let Some(o) = org {
        b = b.header("X-KiloCode-OrganizationId", o);
    }
    match body {
        Some(v) => b
            .header("content-type", "application/json")
            .body(Body::from(v.to_string()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

fn by(user: Uuid) -> Initiator {
    Initiator {
        user,
        request_id: None,
    }
}

/// Users with their keys, an organization with an owner, an admin and a member, and one of
/// each owned resource for the organization.
struct Fixture {
    owner: String,
    admin: String,
    member: String,
    stranger: String,
    site_admin: String,
    owner_id: Uuid,
    admin_id: Uuid,
    member_id: Uuid,
    org: Uuid,
    org_key: Uuid,
    org_bot: Uuid,
    org_secret: &'static str,
    /// Pending device codes: one to poll and approve, one to deny.
    device_code: String,
    device_code_denied: String,
    /// A shared CLI session of the organization ([`CLI_SESSION`]) and its share token.
    cli_share_token: String,
}

impl Fixture {
    async fn new(e: &Env) -> Self {
        let n = Uuid::new_v4().simple().to_string();
        let user = |name: &'static str, admin: bool| {
            let email = format!("{name}-{n}@example.com");
            let id = e.id.clone();
            async move {
                let (u, key, _) = id
                    .create_user(&email, name, admin, &by(Uuid::nil()))
                    .await
                    .unwrap();
                (u.id, key)
            }
        };
        let (owner_id, owner) = user("owner", false).await;
        let (admin_id, admin) = user("admin", false).await;
        let (member_id, member) = user("member", false).await;
        let (_, stranger) = user("stranger", false).await;
        let (_, site_admin) = user("root", true).await;
        let org = e.id.create_org("Acme", &by(owner_id)).await.unwrap().id;
        e.id.put_member(org, admin_id, Role::Admin, &by(owner_id))
            .await
            .unwrap();
        e.id.put_member(org, member_id, Role::Member, &by(owner_id))
            .await
            .unwrap();
        let o = Owner::Org(org);
        let (_, key) =
            e.id.create_api_key(o, "org-ci", None, &by(owner_id))
                .await
                .unwrap();
        let bot = e.id.create_bot(o, "org-bot", &by(owner_id)).await.unwrap();
        e.id.put_secret(o, "ORG_SECRET", SECRET_VALUE.as_bytes(), &by(owner_id))
            .await
            .unwrap();
        let org_header = org.to_string();
        let r = send(
            &e.app,
            request(
                "POST",
                "/api/session",
                Some(&owner),
                Some(&org_header),
                Some(&json!({"sessionId": CLI_SESSION})),
            ),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let r = send(
            &e.app,
            request(
                "POST",
                &format!("/api/session/{CLI_SESSION}/share"),
                Some(&owner),
                Some(&org_header),
                None,
            ),
        )
        .await;
        let cli_share_token = r.body["share_token"]
            .as_str()
            .expect("a share token")
            .to_owned();
        Fixture {
            cli_share_token,
            owner,
            admin,
            member,
            stranger,
            site_admin,
            owner_id,
            admin_id,
            member_id,
            org,
            org_key: key.id,
            org_bot: bot.id,
            org_secret: "ORG_SECRET",
            device_code: e.id.device_start().await.unwrap(),
            device_code_denied: e.id.device_start().await.unwrap(),
        }
    }

    fn keys(&self) -> Vec<String> {
        vec![
            self.owner.clone(),
            self.admin.clone(),
            self.member.clone(),
            self.stranger.clone(),
            self.site_admin.clone(),
        ]
    }
}

// ----- the access matrix -----

/// Who may call a route.
#[derive(Clone, Copy, Debug)]
enum Access {
    /// Anyone, without credentials (the model catalog).
    Public,
    /// Any signed-in user, for themself.
    SignedIn,
    /// A site administrator.
    SiteAdmin,
    /// The internal service secret.
    Internal,
    /// A member of the organization in the path with at least this role.
    OrgPath(Role),
    /// The owner acted for (org header) with at least this role; `addressed` routes name one
    /// resource of it, so another user acting for themself gets 404.
    OrgHeader { min: Role, addressed: bool },
    /// Anonymous callers too, for free models (the gateway); with credentials, as `OrgHeader`
    /// for members.
    AnonymousFree,
    /// A Cloud Agent session route, owner-scoped like `OrgHeader` for members. This matrix
    /// runs without the Cloud Agent, so a caller who passes the checks gets 503
    /// `agent_disabled`; which sessions each owner reaches is tested in `sessions.rs`.
    Session,
    /// A WebSocket authenticated in its query instead of a bearer header: the session
    /// stream (a single-use ticket; checks in `sessions.rs`) and `kilo remote`'s socket
    /// (a credential; checks in `ingest.rs`). A plain request gets 426.
    SessionStream,
    /// An automation route (triggers, review, installations), owner-scoped like `OrgHeader`
    /// with at least `min`. This matrix runs without automation, so a caller who passes the
    /// checks gets 503 `automation_disabled`; the owners each route reaches are tested in
    /// `automation.rs`.
    Automation(Role),
    /// A KiloClaw user route, owner-scoped like `Automation`; without KiloClaw here, a caller
    /// who passes the checks gets 503 `claw_disabled` (which instances each owner reaches is
    /// tested in the `kilocloud` crate's `claw.rs`).
    Claw(Role),
    /// A KiloClaw platform route: the internal secret, then 503 `claw_disabled` here.
    ClawInternal,
    /// An inbound webhook (GitHub's, a trigger's): no bearer credential, authenticated by
    /// its signature or secret (tested in `automation.rs`); 503 `automation_disabled` here.
    Webhook,
    /// A CLI session route (session ingest), owner-scoped: a member of the organization
    /// reaches the organization's session [`CLI_SESSION`]; a stranger acting for themself
    /// gets 404 `session_not_found`.
    CliSession,
    /// A signed-in user's personal credential, acting once (a device approval): the owner
    /// succeeds, an organization's key is refused.
    Personal,
    /// A KiCI route, owner-scoped like `Automation`; without KiCI here, a caller who passes
    /// the checks gets 503 `ci_disabled` (which runs each owner reaches is tested in the
    /// `kilocloud` crate's `ci.rs`).
    Ci(Role),
    /// KiCI's inbound routes: the agent socket (an agent token instead of a user
    /// credential) and generic webhooks (a signature or key); tested in the `ci` crate and
    /// `ci.rs`; 503 `ci_disabled` here.
    CiInbound,
}

struct Route {
    method: &'static str,
    path: &'static str,
    access: Access,
    uri: fn(&Fixture) -> String,
    body: fn(&Fixture) -> Option<Value>,
}

fn routes() -> Vec<Route> {
    use Access::*;
    fn none(_: &Fixture) -> Option<Value> {
        None
    }
    vec![
        Route {
            method: "GET",
            path: "/api/users/me",
            access: SignedIn,
            uri: |_| "/api/users/me".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/profile",
            access: SignedIn,
            uri: |_| "/api/profile".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/user",
            access: SignedIn,
            uri: |_| "/api/user".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/defaults",
            access: Public,
            uri: |_| "/api/defaults".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/organizations/{id}/defaults",
            access: OrgPath(Role::Member),
            uri: |f| format!("/api/organizations/{}/defaults", f.org),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/users/me/rotate-pepper",
            access: SignedIn,
            uri: |_| "/api/users/me/rotate-pepper".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/users/me/audit",
            access: SignedIn,
            uri: |_| "/api/users/me/audit".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/users",
            access: SiteAdmin,
            uri: |_| "/api/users".into(),
            body: |_| Some(json!({"email": format!("new-{}@example.com", Uuid::new_v4())})),
        },
        Route {
            method: "POST",
            path: "/api/orgs",
            access: SignedIn,
            uri: |_| "/api/orgs".into(),
            body: |_| Some(json!({"name": "Other"})),
        },
        Route {
            method: "GET",
            path: "/api/orgs",
            access: SignedIn,
            uri: |_| "/api/orgs".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/orgs/{id}",
            access: OrgPath(Role::Member),
            uri: |f| format!("/api/orgs/{}", f.org),
            body: none,
        },
        Route {
            method: "PATCH",
            path: "/api/orgs/{id}",
            access: OrgPath(Role::Admin),
            uri: |f| format!("/api/orgs/{}", f.org),
            body: |_| Some(json!({"name": "Renamed"})),
        },
        Route {
            method: "DELETE",
            path: "/api/orgs/{id}",
            access: OrgPath(Role::Owner),
            uri: |f| format!("/api/orgs/{}", f.org),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/orgs/{id}/members",
            access: OrgPath(Role::Member),
            uri: |f| format!("/api/orgs/{}/members", f.org),
            body: none,
        },
        Route {
            method: "PUT",
            path: "/api/orgs/{id}/members/{user}",
            access: OrgPath(Role::Admin),
            uri: |f| format!("/api/orgs/{}/members/{}", f.org, f.member_id),
            body: |_| Some(json!({"role": "admin"})),
        },
        Route {
            method: "DELETE",
            path: "/api/orgs/{id}/members/{user}",
            access: OrgPath(Role::Admin),
            uri: |f| format!("/api/orgs/{}/members/{}", f.org, f.admin_id),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/orgs/{id}/gateway-policy",
            access: OrgPath(Role::Member),
            uri: |f| format!("/api/orgs/{}/gateway-policy", f.org),
            body: none,
        },
        Route {
            method: "PUT",
            path: "/api/orgs/{id}/gateway-policy",
            access: OrgPath(Role::Admin),
            uri: |f| format!("/api/orgs/{}/gateway-policy", f.org),
            body: |_| Some(json!({"modelAllowList": ["vendor/*"]})),
        },
        Route {
            method: "GET",
            path: "/api/orgs/{id}/audit",
            access: OrgPath(Role::Admin),
            uri: |f| format!("/api/orgs/{}/audit", f.org),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/tokens",
            access: OrgHeader {
                min: Role::Admin,
                addressed: false,
            },
            uri: |_| "/api/tokens".into(),
            body: |_| Some(json!({"name": "new"})),
        },
        Route {
            method: "GET",
            path: "/api/tokens",
            access: OrgHeader {
                min: Role::Admin,
                addressed: false,
            },
            uri: |_| "/api/tokens".into(),
            body: none,
        },
        Route {
            method: "DELETE",
            path: "/api/tokens/{id}",
            access: OrgHeader {
                min: Role::Admin,
                addressed: true,
            },
            uri: |f| format!("/api/tokens/{}", f.org_key),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/tokens/jwt",
            access: OrgHeader {
                min: Role::Member,
                addressed: false,
            },
            uri: |_| "/api/tokens/jwt".into(),
            body: |_| Some(json!({})),
        },
        Route {
            method: "POST",
            path: "/api/tickets",
            access: SignedIn,
            uri: |_| "/api/tickets".into(),
            body: |_| Some(json!({"resource": "session:x"})),
        },
        Route {
            method: "POST",
            path: "/api/internal/tickets/redeem",
            access: Internal,
            uri: |_| "/api/internal/tickets/redeem".into(),
            body: |_| Some(json!({"ticket": "kt_x", "resource": "r"})),
        },
        Route {
            method: "GET",
            path: "/api/secrets",
            access: OrgHeader {
                min: Role::Member,
                addressed: false,
            },
            uri: |_| "/api/secrets".into(),
            body: none,
        },
        Route {
            method: "PUT",
            path: "/api/secrets/{name}",
            access: OrgHeader {
                min: Role::Admin,
                addressed: false,
            },
            uri: |f| format!("/api/secrets/{}", f.org_secret),
            body: |_| Some(json!({"value": SECRET_VALUE})),
        },
        Route {
            method: "DELETE",
            path: "/api/secrets/{name}",
            access: OrgHeader {
                min: Role::Admin,
                addressed: true,
            },
            uri: |f| format!("/api/secrets/{}", f.org_secret),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/bots",
            access: OrgHeader {
                min: Role::Admin,
                addressed: false,
            },
            uri: |_| "/api/bots".into(),
            body: |_| Some(json!({"name": "b"})),
        },
        Route {
            method: "GET",
            path: "/api/bots",
            access: OrgHeader {
                min: Role::Member,
                addressed: false,
            },
            uri: |_| "/api/bots".into(),
            body: none,
        },
        Route {
            method: "DELETE",
            path: "/api/bots/{id}",
            access: OrgHeader {
                min: Role::Admin,
                addressed: true,
            },
            uri: |f| format!("/api/bots/{}", f.org_bot),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/gateway/chat/completions",
            access: AnonymousFree,
            uri: |_| "/api/gateway/chat/completions".into(),
            body: |_| {
                Some(json!({"model": FREE_MODEL, "messages": [{"role": "user", "content": "hi"}]}))
            },
        },
        Route {
            method: "POST",
            path: "/api/openrouter/chat/completions",
            access: AnonymousFree,
            uri: |_| "/api/openrouter/chat/completions".into(),
            body: |_| {
                Some(json!({"model": FREE_MODEL, "messages": [{"role": "user", "content": "hi"}]}))
            },
        },
        Route {
            method: "POST",
            path: "/api/gateway/v1/chat/completions",
            access: AnonymousFree,
            uri: |_| "/api/gateway/v1/chat/completions".into(),
            body: |_| {
                Some(json!({"model": FREE_MODEL, "messages": [{"role": "user", "content": "hi"}]}))
            },
        },
        Route {
            method: "POST",
            path: "/api/gateway/v1/responses",
            access: AnonymousFree,
            uri: |_| "/api/gateway/v1/responses".into(),
            body: |_| Some(json!({"model": FREE_MODEL, "input": "hi"})),
        },
        Route {
            method: "POST",
            path: "/api/openrouter/responses",
            access: AnonymousFree,
            uri: |_| "/api/openrouter/responses".into(),
            body: |_| Some(json!({"model": FREE_CLAUDE, "input": "hi"})),
        },
        Route {
            method: "POST",
            path: "/api/fim/completions",
            access: AnonymousFree,
            uri: |_| "/api/fim/completions".into(),
            body: |_| Some(json!({"model": FREE_MODEL, "prompt": "fn main() {", "suffix": "}"})),
        },
        Route {
            method: "POST",
            path: "/api/gateway/v1/messages",
            access: AnonymousFree,
            uri: |_| "/api/gateway/v1/messages".into(),
            body: |_| {
                Some(json!({"model": FREE_CLAUDE, "max_tokens": 10,
                    "messages": [{"role": "user", "content": "hi"}]}))
            },
        },
        Route {
            method: "POST",
            path: "/api/openrouter/messages",
            access: AnonymousFree,
            uri: |_| "/api/openrouter/messages".into(),
            body: |_| {
                Some(json!({"model": FREE_CLAUDE, "max_tokens": 10,
                    "messages": [{"role": "user", "content": "hi"}]}))
            },
        },
        Route {
            method: "GET",
            path: "/api/openrouter/models",
            access: Public,
            uri: |_| "/api/openrouter/models".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/organizations/{id}/models",
            access: OrgPath(Role::Member),
            uri: |f| format!("/api/organizations/{}/models", f.org),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/gateway/v1/messages/count_tokens",
            access: AnonymousFree,
            uri: |_| "/api/gateway/v1/messages/count_tokens".into(),
            body: |_| {
                Some(json!({"model": FREE_CLAUDE,
                    "messages": [{"role": "user", "content": "hi"}]}))
            },
        },
        Route {
            method: "POST",
            path: "/api/gateway/v1/embeddings",
            access: AnonymousFree,
            uri: |_| "/api/gateway/v1/embeddings".into(),
            body: |_| Some(json!({"model": FREE_MODEL, "input": "hello there"})),
        },
        Route {
            method: "GET",
            path: "/api/gateway/models",
            access: Public,
            uri: |_| "/api/gateway/models".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/gateway/v1/models",
            access: Public,
            uri: |_| "/api/gateway/v1/models".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/device-auth/codes",
            access: Public,
            uri: |_| "/api/device-auth/codes".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/device-auth/codes/{code}",
            access: Public,
            uri: |f| format!("/api/device-auth/codes/{}", f.device_code),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/device-auth/codes/{code}/approve",
            access: Personal,
            uri: |f| format!("/api/device-auth/codes/{}/approve", f.device_code),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/device-auth/codes/{code}/deny",
            access: Personal,
            uri: |f| format!("/api/device-auth/codes/{}/deny", f.device_code_denied),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/gateway/v1/models/{id}",
            access: Public,
            uri: |_| format!("/api/gateway/v1/models/{FREE_MODEL}"),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/gateway/providers",
            access: Public,
            uri: |_| "/api/gateway/providers".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/profile/balance",
            access: OrgHeader {
                min: Role::Member,
                addressed: false,
            },
            uri: |_| "/api/profile/balance".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/usage",
            access: OrgHeader {
                min: Role::Admin,
                addressed: false,
            },
            uri: |_| "/api/usage".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/sessions",
            access: Session,
            uri: |_| "/api/sessions".into(),
            body: |_| Some(json!({"githubRepo": "acme/widgets", "prompt": "p"})),
        },
        Route {
            method: "GET",
            path: "/api/sessions",
            access: Session,
            uri: |_| "/api/sessions".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/sessions/{id}",
            access: Session,
            uri: |_| format!("/api/sessions/{}", SESSION_ID),
            body: none,
        },
        Route {
            method: "DELETE",
            path: "/api/sessions/{id}",
            access: Session,
            uri: |_| format!("/api/sessions/{}", SESSION_ID),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/sessions/{id}/initiate",
            access: Session,
            uri: |_| format!("/api/sessions/{}/initiate", SESSION_ID),
            body: none,
        },
        Route {
            method: "POST",
            path: "/trpc/start",
            access: Session,
            uri: |_| "/trpc/start".into(),
            body: |_| {
                Some(
                    json!({"message": {"prompt": "hi", "id": "msg_0123456789abAbCdEfGhIjKlMn"},
                    "repository": {"type": "github", "repo": "acme/app"}}),
                )
            },
        },
        Route {
            method: "POST",
            path: "/trpc/send",
            access: Session,
            uri: |_| "/trpc/send".into(),
            body: |_| {
                Some(json!({"cloudAgentSessionId": SESSION_ID,
                    "message": {"prompt": "more", "id": "msg_0123456789abAbCdEfGhIjKlMn"}}))
            },
        },
        Route {
            method: "GET",
            path: "/trpc/getMessageResult",
            access: Session,
            uri: |_| {
                format!(
                    "/trpc/getMessageResult?input=%7B%22cloudAgentSessionId%22%3A%22{SESSION_ID}%22%2C%22messageId%22%3A%22msg_0123456789abAbCdEfGhIjKlMn%22%7D"
                )
            },
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/cloud-agent-next/sessions/stream-ticket",
            access: Session,
            uri: |_| "/api/cloud-agent-next/sessions/stream-ticket".into(),
            body: |_| Some(json!({"cloudAgentSessionId": SESSION_ID})),
        },
        Route {
            method: "GET",
            path: "/stream",
            access: SessionStream,
            uri: |_| format!("/stream?cloudAgentSessionId={SESSION_ID}"),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/sessions/{id}/messages",
            access: Session,
            uri: |_| format!("/api/sessions/{}/messages", SESSION_ID),
            body: |_| Some(json!({"prompt": "more"})),
        },
        Route {
            method: "POST",
            path: "/api/sessions/{id}/interrupt",
            access: Session,
            uri: |_| format!("/api/sessions/{}/interrupt", SESSION_ID),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/sessions/{id}/export",
            access: Session,
            uri: |_| format!("/api/sessions/{}/export", SESSION_ID),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/sessions/{id}/events",
            access: Session,
            uri: |_| format!("/api/sessions/{}/events", SESSION_ID),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/sessions/{id}/stream",
            access: SessionStream,
            uri: |_| format!("/api/sessions/{}/stream", SESSION_ID),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/session",
            access: OrgHeader {
                min: Role::Member,
                addressed: false,
            },
            uri: |_| "/api/session".into(),
            body: |_| Some(json!({"sessionId": "ses_another0123456789abcdefg"})),
        },
        Route {
            method: "GET",
            path: "/api/session",
            access: OrgHeader {
                min: Role::Member,
                addressed: false,
            },
            uri: |_| "/api/session".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/session/{id}",
            access: CliSession,
            uri: |_| format!("/api/session/{CLI_SESSION}"),
            body: none,
        },
        Route {
            method: "DELETE",
            path: "/api/session/{id}",
            access: CliSession,
            uri: |_| format!("/api/session/{CLI_SESSION}"),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/session/{id}/ingest",
            access: CliSession,
            uri: |_| format!("/api/session/{CLI_SESSION}/ingest?v=2"),
            body: |_| {
                Some(json!({"data": [{"type": "session_status", "data": {"status": "idle"}}]}))
            },
        },
        Route {
            method: "POST",
            path: "/api/session/{id}/share",
            access: CliSession,
            uri: |_| format!("/api/session/{CLI_SESSION}/share"),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/session/{id}/unshare",
            access: CliSession,
            uri: |_| format!("/api/session/{CLI_SESSION}/unshare"),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/session/{id}/title",
            access: CliSession,
            uri: |_| format!("/api/session/{CLI_SESSION}/title"),
            body: |_| Some(json!({"title": "t", "generated": false})),
        },
        Route {
            method: "GET",
            path: "/api/session/{id}/export",
            access: CliSession,
            uri: |_| format!("/api/session/{CLI_SESSION}/export"),
            body: none,
        },
        Route {
            method: "GET",
            path: "/session/{shareId}",
            access: Public,
            uri: |f| format!("/session/{}", f.cli_share_token),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/user/cli",
            access: SessionStream,
            uri: |_| format!("/api/user/cli?connectionId={}", Uuid::new_v4()),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/user/cli/connections",
            access: OrgHeader {
                min: Role::Member,
                addressed: false,
            },
            uri: |_| "/api/user/cli/connections".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/ci/agent-tokens",
            access: Ci(Role::Admin),
            uri: |_| "/api/ci/agent-tokens".into(),
            body: |_| Some(json!({"name": "t"})),
        },
        Route {
            method: "GET",
            path: "/api/ci/agents",
            access: Ci(Role::Member),
            uri: |_| "/api/ci/agents".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/ci/runs",
            access: Ci(Role::Member),
            uri: |_| "/api/ci/runs".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/ci/runs/{id}",
            access: Ci(Role::Member),
            uri: |_| format!("/api/ci/runs/{}", Uuid::new_v4()),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/ci/runs/{id}/jobs/{job}/logs",
            access: Ci(Role::Member),
            uri: |_| {
                format!(
                    "/api/ci/runs/{}/jobs/{}/logs",
                    Uuid::new_v4(),
                    Uuid::new_v4()
                )
            },
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/ci/runs/{id}/cancel",
            access: Ci(Role::Member),
            uri: |_| format!("/api/ci/runs/{}/cancel", Uuid::new_v4()),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/ci/runs/{id}/rerun",
            access: Ci(Role::Member),
            uri: |_| format!("/api/ci/runs/{}/rerun", Uuid::new_v4()),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/ci/runs/{id}/logs/stream",
            access: Ci(Role::Member),
            uri: |_| format!("/api/ci/runs/{}/logs/stream", Uuid::new_v4()),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/ci/sources",
            access: Ci(Role::Admin),
            uri: |_| "/api/ci/sources".into(),
            body: |_| Some(json!({"name": "s", "repo": "o/r"})),
        },
        Route {
            method: "GET",
            path: "/api/ci/sources",
            access: Ci(Role::Member),
            uri: |_| "/api/ci/sources".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/ci/webhooks/{id}",
            access: CiInbound,
            uri: |_| format!("/api/ci/webhooks/{}", Uuid::new_v4()),
            body: |_| Some(json!({"x": 1})),
        },
        Route {
            method: "GET",
            path: "/api/ci/agent",
            access: CiInbound,
            uri: |_| "/api/ci/agent".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/github/webhook",
            access: Webhook,
            uri: |_| "/api/github/webhook".into(),
            body: |_| Some(json!({"zen": "z"})),
        },
        Route {
            method: "GET",
            path: "/api/github/installations",
            access: Automation(Role::Member),
            uri: |_| "/api/github/installations".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/github/installations",
            access: Automation(Role::Admin),
            uri: |_| "/api/github/installations".into(),
            body: |_| Some(json!({"installationId": 1})),
        },
        Route {
            method: "DELETE",
            path: "/api/github/installations/{id}",
            access: Automation(Role::Admin),
            uri: |_| "/api/github/installations/1".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/triggers",
            access: Automation(Role::Admin),
            uri: |_| "/api/triggers".into(),
            body: |_| {
                Some(
                    json!({"id": "t", "destination": {"type": "chat", "messageTemplate": "m"}, "activation": {"type": "webhook"}}),
                )
            },
        },
        Route {
            method: "GET",
            path: "/api/triggers",
            access: Automation(Role::Member),
            uri: |_| "/api/triggers".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/triggers/{id}",
            access: Automation(Role::Member),
            uri: |_| "/api/triggers/t".into(),
            body: none,
        },
        Route {
            method: "PUT",
            path: "/api/triggers/{id}",
            access: Automation(Role::Admin),
            uri: |_| "/api/triggers/t".into(),
            body: |_| {
                Some(
                    json!({"id": "t", "destination": {"type": "chat", "messageTemplate": "m"}, "activation": {"type": "webhook"}}),
                )
            },
        },
        Route {
            method: "DELETE",
            path: "/api/triggers/{id}",
            access: Automation(Role::Admin),
            uri: |_| "/api/triggers/t".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/triggers/{id}/requests",
            access: Automation(Role::Member),
            uri: |_| "/api/triggers/t/requests".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/triggers/{id}/requests/{request_id}",
            access: Automation(Role::Member),
            uri: |_| "/api/triggers/t/requests/req_1".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/hooks/{owner_type}/{owner_id}/{trigger_id}",
            access: Webhook,
            uri: |f| format!("/hooks/org/{}/t", f.org),
            body: |_| Some(json!({"a": 1})),
        },
        Route {
            method: "GET",
            path: "/api/review/settings",
            access: Automation(Role::Member),
            uri: |_| "/api/review/settings".into(),
            body: none,
        },
        Route {
            method: "PUT",
            path: "/api/review/settings",
            access: Automation(Role::Admin),
            uri: |_| "/api/review/settings".into(),
            body: |_| Some(json!({"enabled": true})),
        },
        Route {
            method: "GET",
            path: "/api/reviews",
            access: Automation(Role::Member),
            uri: |_| "/api/reviews".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/reviews/{id}",
            access: Automation(Role::Member),
            uri: |_| "/api/reviews/rev_1".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/claw/instances",
            access: Claw(Role::Member),
            uri: |_| "/api/claw/instances".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/claw/instances",
            access: Claw(Role::Admin),
            uri: |_| "/api/claw/instances".into(),
            body: |_| Some(json!({"name": "c"})),
        },
        Route {
            method: "GET",
            path: "/api/claw/instances/{id}",
            access: Claw(Role::Member),
            uri: |_| "/api/claw/instances/00000000-0000-4000-8000-000000000001".into(),
            body: none,
        },
        Route {
            method: "DELETE",
            path: "/api/claw/instances/{id}",
            access: Claw(Role::Admin),
            uri: |_| "/api/claw/instances/00000000-0000-4000-8000-000000000001".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/claw/instances/{id}/status",
            access: Claw(Role::Member),
            uri: |_| "/api/claw/instances/00000000-0000-4000-8000-000000000001/status".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/claw/instances/{id}/start",
            access: Claw(Role::Admin),
            uri: |_| "/api/claw/instances/00000000-0000-4000-8000-000000000001/start".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/claw/instances/{id}/stop",
            access: Claw(Role::Admin),
            uri: |_| "/api/claw/instances/00000000-0000-4000-8000-000000000001/stop".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/claw/instances/{id}/restart",
            access: Claw(Role::Admin),
            uri: |_| "/api/claw/instances/00000000-0000-4000-8000-000000000001/restart".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/claw/instances/{id}/access-code",
            access: Claw(Role::Member),
            uri: |_| "/api/claw/instances/00000000-0000-4000-8000-000000000001/access-code".into(),
            body: none,
        },
        Route {
            method: "POST",
            path: "/api/platform/provision",
            access: ClawInternal,
            uri: |_| "/api/platform/provision".into(),
            body: |_| Some(json!({"userId": "00000000-0000-4000-8000-000000000002"})),
        },
        Route {
            method: "POST",
            path: "/api/platform/start",
            access: ClawInternal,
            uri: |_| "/api/platform/start".into(),
            body: |_| Some(json!({"userId": "00000000-0000-4000-8000-000000000002"})),
        },
        Route {
            method: "POST",
            path: "/api/platform/stop",
            access: ClawInternal,
            uri: |_| "/api/platform/stop".into(),
            body: |_| Some(json!({"userId": "00000000-0000-4000-8000-000000000002"})),
        },
        Route {
            method: "POST",
            path: "/api/platform/destroy",
            access: ClawInternal,
            uri: |_| "/api/platform/destroy".into(),
            body: |_| Some(json!({"userId": "00000000-0000-4000-8000-000000000002"})),
        },
        Route {
            method: "POST",
            path: "/api/platform/doctor",
            access: ClawInternal,
            uri: |_| "/api/platform/doctor".into(),
            body: |_| Some(json!({"userId": "00000000-0000-4000-8000-000000000002"})),
        },
        Route {
            method: "GET",
            path: "/api/platform/status",
            access: ClawInternal,
            uri: |_| "/api/platform/status?userId=00000000-0000-4000-8000-000000000002".into(),
            body: none,
        },
        Route {
            method: "GET",
            path: "/api/platform/gateway-token",
            access: ClawInternal,
            uri: |_| {
                "/api/platform/gateway-token?userId=00000000-0000-4000-8000-000000000002".into()
            },
            body: none,
        },
        Route {
            method: "PATCH",
            path: "/api/platform/kilocode-config",
            access: ClawInternal,
            uri: |_| "/api/platform/kilocode-config".into(),
            body: |_| Some(json!({"userId": "00000000-0000-4000-8000-000000000002"})),
        },
        Route {
            method: "PATCH",
            path: "/api/platform/channels",
            access: ClawInternal,
            uri: |_| "/api/platform/channels".into(),
            body: |_| Some(json!({"userId": "00000000-0000-4000-8000-000000000002"})),
        },
    ]
}

/// The id of the fixture's CLI session (the organization's).
const CLI_SESSION: &str = "ses_fixture0123456789abcdefgh";

/// A well-formed session id no one owns.
const SESSION_ID: &str = "agent_00000000-0000-4000-8000-000000000000";

/// Every operation in the OpenAPI document is in the matrix and vice versa, so a new route
/// cannot escape it.
async fn matrix_covers_every_route(e: &Env) -> Vec<Route> {
    let doc = send(
        &e.app,
        request("GET", "/api/openapi.json", None, None, None),
    )
    .await;
    assert_eq!(doc.status, StatusCode::OK);
    let mut documented = Vec::new();
    for (path, item) in doc.body["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            documented.push((method.to_uppercase(), path.clone(), secured));
        }
    }
    documented.sort();
    let table = routes();
    for (method, path, secured) in &documented {
        let public = table.iter().any(|r| {
            r.method == method
                && r.path == path
                && matches!(
                    r.access,
                    Access::Public | Access::SessionStream | Access::Webhook | Access::CiInbound
                )
        });
        assert_eq!(
            *secured, !public,
            "{method} {path}: only routes the matrix lists as public may lack a security requirement"
        );
    }
    let documented: Vec<(String, String)> =
        documented.into_iter().map(|(m, p, _)| (m, p)).collect();
    let mut listed: Vec<(String, String)> = table
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    listed.sort();
    assert_eq!(
        documented, listed,
        "the access matrix must list exactly the documented routes"
    );
    table
}

async fn access_matrix(pg: bool) {
    let e = env(pg, 1_000_000).await;
    let mut secrets = vec![
        SECRET_VALUE.to_owned(),
        e.master_key_text.clone(),
        INTERNAL.to_owned(),
    ];
    for route in matrix_covers_every_route(&e).await {
        let label = format!("{} {}", route.method, route.path);
        let f = Fixture::new(&e).await;
        secrets.extend(f.keys());
        let uri = (route.uri)(&f);
        let body = (route.body)(&f);
        let org = f.org.to_string();
        let call = |token: Option<&str>, org_header: Option<&str>| {
            send(
                &e.app,
                request(route.method, &uri, token, org_header, body.as_ref()),
            )
        };

        if matches!(route.access, Access::Public) {
            let r = call(None, None).await;
            assert!(
                r.status.is_success(),
                "{label} is public: {} {}",
                r.status,
                r.body
            );
            continue;
        }
        if matches!(route.access, Access::Webhook | Access::CiInbound) {
            let r = call(None, None).await;
            let disabled = if matches!(route.access, Access::CiInbound) {
                "ci_disabled"
            } else {
                "automation_disabled"
            };
            assert_eq!(
                (r.status, r.code()),
                (StatusCode::SERVICE_UNAVAILABLE, disabled),
                "{label}: {}",
                r.body
            );
            continue;
        }
        if matches!(route.access, Access::SessionStream) {
            let r = call(None, None).await;
            assert_eq!(
                (r.status, r.code()),
                (StatusCode::UPGRADE_REQUIRED, "websocket_required"),
                "{label}"
            );
            continue;
        }
        // 1. No credentials.
        let r = call(None, None).await;
        if matches!(route.access, Access::AnonymousFree) {
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{label} serves free models anonymously: {}",
                r.body
            );
        } else {
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{label} without credentials: {}",
                r.body
            );
            let want = if matches!(route.access, Access::Internal | Access::ClawInternal) {
                "internal_key_invalid"
            } else {
                "unauthenticated"
            };
            assert_eq!(r.code(), want, "{label}");
        }

        match route.access {
            Access::Public | Access::SessionStream | Access::Webhook | Access::CiInbound => {
                unreachable!("answered above")
            }
            Access::Automation(min) | Access::Claw(min) | Access::Ci(min) => {
                let disabled = match route.access {
                    Access::Claw(_) => "claw_disabled",
                    Access::Ci(_) => "ci_disabled",
                    _ => "automation_disabled",
                };
                let r = call(Some(&f.stranger), Some(&org)).await;
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::FORBIDDEN, "not_a_member"),
                    "{label} as stranger: {}",
                    r.body
                );
                if let Some((token, role)) = below(&f, min) {
                    let r = call(Some(token), Some(&org)).await;
                    assert_eq!(
                        (r.status, r.code()),
                        (StatusCode::FORBIDDEN, "insufficient_role"),
                        "{label} as {role}: {}",
                        r.body
                    );
                }
                let r = call(Some(&f.owner), Some(&org)).await;
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::SERVICE_UNAVAILABLE, disabled),
                    "{label} as owner: {}",
                    r.body
                );
            }
            Access::ClawInternal => {
                let mut req = request(route.method, &uri, Some(&f.owner), None, body.as_ref());
                req.headers_mut()
                    .insert("x-internal-api-key", "wrong".parse().unwrap());
                let r = send(&e.app, req).await;
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::UNAUTHORIZED, "internal_key_invalid"),
                    "{label}"
                );
                let mut req = request(route.method, &uri, None, None, body.as_ref());
                req.headers_mut()
                    .insert("x-internal-api-key", INTERNAL.parse().unwrap());
                let r = send(&e.app, req).await;
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::SERVICE_UNAVAILABLE, "claw_disabled"),
                    "{label}: {}",
                    r.body
                );
            }
            Access::Session => {
                let r = call(Some(&f.stranger), Some(&org)).await;
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::FORBIDDEN, "not_a_member"),
                    "{label} as stranger: {}",
                    r.body
                );
                let r = call(Some(&f.member), Some(&org)).await;
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::SERVICE_UNAVAILABLE, "agent_disabled"),
                    "{label} as member: {}",
                    r.body
                );
            }
            Access::CliSession => {
                let r = call(Some(&f.stranger), Some(&org)).await;
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::FORBIDDEN, "not_a_member"),
                    "{label} as stranger: {}",
                    r.body
                );
                let r = call(Some(&f.stranger), None).await;
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::NOT_FOUND, "session_not_found"),
                    "{label} as stranger for themself: {}",
                    r.body
                );
                let r = call(Some(&f.member), Some(&org)).await;
                assert!(
                    r.status.is_success(),
                    "{label} as member: {} {}",
                    r.status,
                    r.body
                );
            }
            Access::SignedIn | Access::Personal => {
                // Acts for the caller only: a stranger gets their own view. (A personal
                // route acts once, so only its owner calls it.)
                if matches!(route.access, Access::SignedIn) {
                    let r = call(Some(&f.stranger), None).await;
                    assert!(
                        r.status.is_success(),
                        "{label} as stranger: {} {}",
                        r.status,
                        r.body
                    );
                    assert!(
                        !r.body.to_string().contains(&org),
                        "{label} leaks the organization"
                    );
                }
                let r = call(Some(&f.owner), None).await;
                assert!(
                    r.status.is_success(),
                    "{label} as owner: {} {}",
                    r.status,
                    r.body
                );
            }
            Access::SiteAdmin => {
                let r = call(Some(&f.owner), None).await;
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::FORBIDDEN, "admin_required"),
                    "{label}"
                );
                let r = call(Some(&f.site_admin), None).await;
                assert!(
                    r.status.is_success(),
                    "{label} as site admin: {} {}",
                    r.status,
                    r.body
                );
            }
            Access::Internal => {
                let r = send(&e.app, {
                    let mut req = request(route.method, &uri, Some(&f.owner), None, body.as_ref());
                    req.headers_mut()
                        .insert("x-internal-api-key", "wrong".parse().unwrap());
                    req
                })
                .await;
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::UNAUTHORIZED, "internal_key_invalid"),
                    "{label}"
                );
                let (ticket, _) = e.id.issue_ticket(f.owner_id, "r").await.unwrap();
                let mut req = request(
                    route.method,
                    &uri,
                    None,
                    None,
                    Some(&json!({"ticket": ticket, "resource": "r"})),
                );
                req.headers_mut()
                    .insert("x-internal-api-key", INTERNAL.parse().unwrap());
                let r = send(&e.app, req).await;
                assert_eq!(r.status, StatusCode::OK, "{label}: {}", r.body);
                assert_eq!(r.body["userId"], f.owner_id.to_string());
                secrets.push(ticket);
            }
            Access::OrgPath(min) => {
                let r = call(Some(&f.stranger), None).await;
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::NOT_FOUND, "not_found"),
                    "{label} as stranger: {}",
                    r.body
                );
                if let Some((token, role)) = below(&f, min) {
                    let r = call(Some(token), None).await;
                    assert_eq!(
                        (r.status, r.code()),
                        (StatusCode::FORBIDDEN, "insufficient_role"),
                        "{label} as {role}: {}",
                        r.body
                    );
                }
                let r = call(Some(&f.owner), None).await;
                assert!(
                    r.status.is_success(),
                    "{label} as owner: {} {}",
                    r.status,
                    r.body
                );
            }
            Access::OrgHeader { .. } | Access::AnonymousFree => {
                let (min, addressed) = match route.access {
                    Access::OrgHeader { min, addressed } => (min, addressed),
                    _ => (Role::Member, false),
                };
                let r = call(Some(&f.stranger), Some(&org)).await;
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::FORBIDDEN, "not_a_member"),
                    "{label} as stranger: {}",
                    r.body
                );
                let r = call(Some(&f.stranger), None).await;
                if addressed {
                    assert_eq!(
                        (r.status, r.code()),
                        (StatusCode::NOT_FOUND, "not_found"),
                        "{label} as stranger for themself: {}",
                        r.body
                    );
                } else {
                    assert!(
                        r.status.is_success(),
                        "{label} as stranger for themself: {}",
                        r.body
                    );
                    let text = r.body.to_string();
                    // (A stranger writing a secret of their own names it in the request.)
                    let name = (route.method == "GET").then(|| f.org_secret.to_owned());
                    let ids = [org.clone(), f.org_key.to_string(), f.org_bot.to_string()];
                    for leaked in ids.into_iter().chain(name) {
                        assert!(
                            !text.contains(&leaked),
                            "{label} shows the organization's resources to a stranger"
                        );
                    }
                }
                if let Some((token, role)) = below(&f, min) {
                    let r = call(Some(token), Some(&org)).await;
                    assert_eq!(
                        (r.status, r.code()),
                        (StatusCode::FORBIDDEN, "insufficient_role"),
                        "{label} as {role}: {}",
                        r.body
                    );
                }
                let r = call(Some(&f.owner), Some(&org)).await;
                assert!(
                    r.status.is_success(),
                    "{label} as owner: {} {}",
                    r.status,
                    r.body
                );
                if let Some(key) = r.body["key"].as_str() {
                    secrets.push(key.to_owned());
                }
                if let Some(token) = r.body["token"].as_str() {
                    secrets.push(token.to_owned());
                }
            }
        }
    }
    assert_not_logged(&secrets);
}

/// A member whose role is just below `min`, if `min` is above `member`.
fn below(f: &Fixture, min: Role) -> Option<(&str, Role)> {
    match min {
        Role::Member => None,
        Role::Admin => Some((&f.member, Role::Member)),
        Role::Owner => Some((&f.admin, Role::Admin)),
    }
}

// ----- credential failures -----

async fn credential_failures(pg: bool) {
    let e = env(pg, 1_000_000).await;
    let f = Fixture::new(&e).await;
    let me = |token: &str| {
        send(
            &e.app,
            request("GET", "/api/users/me", Some(token), None, None),
        )
    };
    let jwt = |body: Value| {
        let app = e.app.clone();
        let key = f.owner.clone();
        async move {
            let r = send(
                &app,
                request("POST", "/api/tokens/jwt", Some(&key), None, Some(&body)),
            )
            .await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
            r.body["token"].as_str().unwrap().to_owned()
        }
    };
    let mut secrets = f.keys();
    secrets.push(SECRET_VALUE.into());

    // A good JWT works, then expires.
    let short = jwt(json!({"expiresInSeconds": 30})).await;
    assert_eq!(me(&short).await.status, StatusCode::OK);
    assert_eq!(me(&short).await.body["credential"], "jwt");
    e.clock.advance(30_000);
    let r = me(&short).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "token_expired")
    );

    // Tampered signature; wrong version; malformed.
    let token = jwt(json!({})).await;
    // Change one character inside the signature (the last one carries padding bits).
    let mut tampered = token.clone().into_bytes();
    let i = tampered.len() - 10;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let r = me(&tampered).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "token_invalid_signature")
    );
    let v2 = TokenSigner::new(JWT_SECRET).sign(&TokenClaims {
        kilo_user_id: f.owner_id.to_string(),
        api_token_pepper: None,
        version: 2,
        exp: T0 / 1000 + 3600,
        iat: T0 / 1000,
        organization_id: None,
        bot_id: None,
    });
    let r = me(&v2).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "token_version_unsupported")
    );
    for bad in ["", "x", "a.b.c", "kc_tooshort", &token[..token.len() / 2]] {
        let r = me(bad).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{bad:?}");
        assert!(
            [
                "credential_malformed",
                "unauthenticated",
                "token_invalid_signature"
            ]
            .contains(&r.code()),
            "{bad:?}: {}",
            r.body
        );
    }
    let r = send(
        &e.app,
        Request::get("/api/users/me")
            .header("authorization", "Basic abc")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "credential_malformed")
    );

    // Rotating the pepper revokes earlier JWTs, not API keys.
    assert_eq!(me(&token).await.status, StatusCode::OK);
    let r = send(
        &e.app,
        request(
            "POST",
            "/api/users/me/rotate-pepper",
            Some(&token),
            None,
            None,
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = me(&token).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "token_revoked")
    );
    assert_eq!(me(&f.owner).await.status, StatusCode::OK);
    let fresh = jwt(json!({})).await;
    assert_eq!(me(&fresh).await.status, StatusCode::OK);
    secrets.extend([short, token, fresh]);

    // A revoked API key.
    let org = f.org.to_string();
    let created = send(
        &e.app,
        request(
            "POST",
            "/api/tokens",
            Some(&f.owner),
            Some(&org),
            Some(&json!({"name": "temp"})),
        ),
    )
    .await;
    let key = created.body["key"].as_str().unwrap().to_owned();
    let r = me(&key).await;
    assert_eq!(
        (r.status, r.body["pinnedOrganizationId"].as_str()),
        (StatusCode::OK, Some(org.as_str()))
    );
    // An organization's key cannot act on its creator's own account, mint credentials, or see
    // the creator's other organizations.
    let personal_only = [
        ("POST", "/api/orgs", Some(json!({"name": "Side"}))),
        ("GET", "/api/orgs", None),
        (
            "POST",
            "/api/tickets",
            Some(json!({"resource": "session:x"})),
        ),
        ("POST", "/api/tokens", Some(json!({"name": "minted"}))),
        ("POST", "/api/tokens/jwt", Some(json!({}))),
        ("POST", "/api/users/me/rotate-pepper", None),
        ("GET", "/api/users/me/audit", None),
    ];
    for (method, path, body) in &personal_only {
        let r = send(
            &e.app,
            request(method, path, Some(&key), None, body.as_ref()),
        )
        .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::FORBIDDEN, "personal_credential_required"),
            "{method} {path} with an organization's key"
        );
    }
    let side = e.id.create_org("Side", &by(f.owner_id)).await.unwrap();
    let r = me(&key).await;
    let orgs = r.body["organizations"].as_array().unwrap();
    assert_eq!(orgs.len(), 1, "only the pinned organization: {}", r.body);
    assert_eq!(orgs[0]["id"], org);
    assert!(!r.body.to_string().contains(&side.id.to_string()));
    let id = created.body["apiKey"]["id"].as_str().unwrap();
    let r = send(
        &e.app,
        request(
            "DELETE",
            &format!("/api/tokens/{id}"),
            Some(&f.owner),
            Some(&org),
            None,
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = me(&key).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "api_key_revoked")
    );
    secrets.push(key);

    // A bot's token acts for its owner but mints nothing.
    let bot = send(
        &e.app,
        request(
            "POST",
            "/api/bots",
            Some(&f.owner),
            None,
            Some(&json!({"name": "ci"})),
        ),
    )
    .await;
    let bot_id = bot.body["id"].as_str().unwrap().to_owned();
    let bot_jwt = jwt(json!({"botId": bot_id})).await;
    let r = me(&bot_jwt).await;
    assert_eq!(
        (r.status, r.body["botId"].as_str()),
        (StatusCode::OK, Some(bot_id.as_str()))
    );
    for (method, path, body) in &personal_only {
        let r = send(
            &e.app,
            request(method, path, Some(&bot_jwt), None, body.as_ref()),
        )
        .await;
        assert_eq!(
            r.code(),
            "personal_credential_required",
            "{method} {path} with a bot's token"
        );
    }
    let r = send(
        &e.app,
        request("GET", "/api/secrets", Some(&bot_jwt), None, None),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "a bot uses its owner's resources");
    secrets.push(bot_jwt);

    // Minted credentials never outlive the credential that minted them.
    let parent = jwt(json!({"expiresInSeconds": 600})).await;
    let parent_exp_ms = T0 + e.clock_offset() + 600_000;
    let child = send(
        &e.app,
        request(
            "POST",
            "/api/tokens/jwt",
            Some(&parent),
            None,
            Some(&json!({"expiresInSeconds": 86_400})),
        ),
    )
    .await;
    assert_eq!(
        child.body["expiresAt"].as_i64().unwrap() * 1000,
        parent_exp_ms
    );
    let k = send(
        &e.app,
        request(
            "POST",
            "/api/tokens",
            Some(&parent),
            None,
            Some(&json!({"name": "from-jwt"})),
        ),
    )
    .await;
    assert_eq!(
        k.body["apiKey"]["expiresAtMs"].as_i64(),
        Some(parent_exp_ms)
    );
    let late = json!({"name": "late", "expiresAtMs": parent_exp_ms + 1});
    let r = send(
        &e.app,
        request("POST", "/api/tokens", Some(&parent), None, Some(&late)),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    secrets.extend([
        parent,
        child.body["token"].as_str().unwrap().to_owned(),
        k.body["key"].as_str().unwrap().to_owned(),
    ]);

    // The org header: not a UUID → 400; not a member → 403; a pinned JWT for another org → 403.
    let r = send(
        &e.app,
        request("GET", "/api/secrets", Some(&f.owner), Some("acme"), None),
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_organization_id")
    );
    let r = send(
        &e.app,
        request(
            "GET",
            "/api/secrets",
            Some(&f.owner),
            Some(&Uuid::new_v4().to_string()),
            None,
        ),
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "not_a_member")
    );
    let r = send(
        &e.app,
        request("GET", "/api/secrets", Some(&f.member), Some(&org), None),
    )
    .await;
    assert_eq!(
        (r.status, r.body["count"].as_u64()),
        (StatusCode::OK, Some(1))
    );
    assert!(!r.body.to_string().contains(SECRET_VALUE));

    // Tickets: single use, 60 s.
    let redeem = |ticket: &str, resource: &str| {
        let mut req = request(
            "POST",
            "/api/internal/tickets/redeem",
            None,
            None,
            Some(&json!({"ticket": ticket, "resource": resource})),
        );
        req.headers_mut()
            .insert("x-internal-api-key", INTERNAL.parse().unwrap());
        send(&e.app, req)
    };
    let issue = || {
        send(
            &e.app,
            request(
                "POST",
                "/api/tickets",
                Some(&f.member),
                None,
                Some(&json!({"resource": "session:a"})),
            ),
        )
    };
    let t = issue().await.body["ticket"].as_str().unwrap().to_owned();
    assert_eq!(
        redeem(&t, "session:a").await.body["userId"],
        f.member_id.to_string()
    );
    let r = redeem(&t, "session:a").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "ticket_invalid")
    );
    let late = issue().await.body["ticket"].as_str().unwrap().to_owned();
    e.clock.advance(60_000);
    let r = redeem(&late, "session:a").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "ticket_expired")
    );
    secrets.extend([t, late]);

    // The audit log saw it, with request ids.
    let r = send(
        &e.app,
        request(
            "GET",
            &format!("/api/orgs/{org}/audit?limit=3"),
            Some(&f.owner),
            None,
            None,
        ),
    )
    .await;
    let actions: Vec<&str> = r.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["token.revoked", "token.created", "secret.written"]
    );
    assert!(
        r.body["entries"][0]["requestId"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    let r = send(
        &e.app,
        request(
            "GET",
            &format!("/api/orgs/{org}/audit?limit=0"),
            Some(&f.owner),
            None,
            None,
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    assert_not_logged(&secrets);
}

async fn auth_failures_are_rate_limited(pg: bool) {
    let e = env(pg, 3).await;
    let f = Fixture::new(&e).await;
    // Requests without credentials are not failures.
    for _ in 0..5 {
        let r = send(&e.app, request("GET", "/api/users/me", None, None, None)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    for _ in 0..3 {
        let r = send(
            &e.app,
            request("GET", "/api/users/me", Some("kc_wrong"), None, None),
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let r = send(
        &e.app,
        request("GET", "/api/users/me", Some("kc_wrong"), None, None),
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_auth_failures")
    );
    assert!(r.headers.get("retry-after").is_some());
    // While blocked, a valid credential still works (others behind the same address are
    // not locked out); wrong ones stay refused.
    let r = send(
        &e.app,
        request("GET", "/api/users/me", Some(&f.owner), None, None),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(
        &e.app,
        request("GET", "/api/users/me", Some("kc_wrong"), None, None),
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // Unauthenticated routes are unaffected.
    let r = send(&e.app, request("GET", "/health", None, None, None)).await;
    assert_eq!(r.status, StatusCode::OK);
}

/// Device login as the Kilo CLI runs it: a code without credentials, polled (202) until a
/// signed-in user approves it, then one 200 with a working token and the user's email, then
/// 410; a denied code answers 403; an expired one 410; an org's key cannot approve.
async fn device_login(pg: bool) {
    let e = env(pg, 100).await;
    let f = Fixture::new(&e).await;
    let start = || {
        send(
            &e.app,
            request("POST", "/api/device-auth/codes", None, None, None),
        )
    };
    let poll = |code: String| {
        send(
            &e.app,
            request(
                "GET",
                &format!("/api/device-auth/codes/{code}"),
                None,
                None,
                None,
            ),
        )
    };
    let decide = |code: &str, what: &str, token: String| {
        send(
            &e.app,
            request(
                "POST",
                &format!("/api/device-auth/codes/{code}/{what}"),
                Some(&token),
                None,
                None,
            ),
        )
    };
    let r = start().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let code = r.body["code"].as_str().unwrap().to_owned();
    assert_eq!(r.body["expiresIn"], 600);
    assert!(
        r.body["verificationUrl"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/device-auth?code={code}")),
        "{}",
        r.body
    );
    assert_eq!(poll(code.clone()).await.status, StatusCode::ACCEPTED);
    // An organization's key is not the user's own credential.
    let (org_key, _) =
        e.id.create_api_key(Owner::Org(f.org), "device", None, &by(f.owner_id))
            .await
            .unwrap();
    let r = decide(&code, "approve", org_key).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    // Typed in lower case without the dash, as users do.
    let typed = code.replace('-', "").to_lowercase();
    let r = decide(&typed, "approve", f.owner.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = poll(code.clone()).await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (StatusCode::OK, Some("approved"))
    );
    assert!(r.body["userEmail"].as_str().unwrap().starts_with("owner-"));
    let token = r.body["token"].as_str().unwrap().to_owned();
    let me = send(
        &e.app,
        request("GET", "/api/users/me", Some(&token), None, None),
    )
    .await;
    assert_eq!(me.status, StatusCode::OK, "the device's token works");
    assert_eq!(me.body["user"]["id"], f.owner_id.to_string());
    assert_eq!(
        poll(code.clone()).await.status,
        StatusCode::GONE,
        "handed out once"
    );
    let r = decide(&code, "approve", f.owner.clone()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let denied = start().await.body["code"].as_str().unwrap().to_owned();
    assert_eq!(
        decide(&denied, "deny", f.member.clone()).await.status,
        StatusCode::OK
    );
    let r = poll(denied).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "device_denied")
    );

    let late = start().await.body["code"].as_str().unwrap().to_owned();
    e.clock.advance(601_000);
    let r = poll(late.clone()).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::GONE, "device_code_expired")
    );
    assert_eq!(
        decide(&late, "approve", f.owner.clone()).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(poll("NONE-SUCH".into()).await.status, StatusCode::GONE);
}

/// The account routes the Kilo Code CLI reads after login, in its shapes: the profile (email
/// and name nested and at the top, organizations with roles, the selection rule's inputs),
/// `/api/user`'s status, and the default models.
async fn kilo_cli_account_shapes(pg: bool) {
    let e = env(pg, 100).await;
    let f = Fixture::new(&e).await;
    let r = send(
        &e.app,
        request("GET", "/api/profile", Some(&f.owner), None, None),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["email"], r.body["user"]["email"]);
    assert_eq!(r.body["name"], r.body["user"]["name"]);
    assert_eq!(r.body["hasPersonalAccount"], true);
    assert_eq!(r.body["selectedOrganizationId"], Value::Null);
    let orgs = r.body["organizations"].as_array().unwrap();
    assert_eq!(orgs.len(), 1);
    assert_eq!(
        (
            orgs[0]["id"].as_str(),
            orgs[0]["name"].as_str(),
            orgs[0]["role"].as_str()
        ),
        (
            Some(f.org.to_string().as_str()),
            Some("Acme"),
            Some("owner")
        )
    );
    // A token pinned to the organization selects it and has no personal account.
    let (pinned, _) =
        e.id.issue_jwt(f.owner_id, Some(f.org), None, 3600, &by(f.owner_id))
            .await
            .unwrap();
    let r = send(
        &e.app,
        request("GET", "/api/profile", Some(&pinned), None, None),
    )
    .await;
    assert_eq!(r.body["selectedOrganizationId"], f.org.to_string());
    assert_eq!(r.body["hasPersonalAccount"], false);
    let r = send(
        &e.app,
        request("GET", "/api/user", Some(&f.owner), None, None),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(
        &e.app,
        request("GET", "/api/user", Some("kc_wrong"), None, None),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(&e.app, request("GET", "/api/defaults", None, None, None)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body["defaultFreeModel"].is_string(), "{}", r.body);
    assert!(r.body.get("defaultModel").is_some(), "{}", r.body);
}

kilocloud_test_support::on_both_backends!(
    kilo_cli_account_shapes,
    device_login,
    access_matrix,
    credential_failures,
    auth_failures_are_rate_limited
);
