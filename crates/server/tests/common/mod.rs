//! Shared by the Cloud Agent and automation tests: an in-process server on SQLite or
//! PostgreSQL with a real git server, real bubblewrap sandboxes, the real gateway in front of
//! the fake OpenAI upstream, a callback receiver, and (for automation) the fake GitHub API.
#![allow(dead_code)]

pub use std::collections::VecDeque;
pub use std::net::SocketAddr;
pub use std::sync::{Arc, Mutex};
pub use std::time::Duration;

pub use futures::StreamExt;
pub use kilocloud_agent::sandbox::{LocalSandbox, SandboxConfig};
pub use kilocloud_agent::session::CALLBACK_QUEUE;
pub use kilocloud_agent::{AgentConfig, Agents};
pub use kilocloud_gateway::config::{GatewayConfig, ModelConfig, ProviderConfig, ProviderKind};
pub use kilocloud_identity::envelope::{MasterKey, MasterKeys};
pub use kilocloud_identity::model::Initiator;
pub use kilocloud_identity::{Identity, IdentityConfig, Owner};
pub use kilocloud_server::api::gateway;
pub use kilocloud_server::{AppState, ServerOptions, router};
pub use kilocloud_substrate::{Clock, ManualClock, Substrate};
pub use kilocloud_test_support::fake_openai::{FakeOpenAi, Reply};
pub use kilocloud_test_support::git_server::GitServer;
pub use kilocloud_test_support::{TestStore, on_both_backends};
pub use serde_json::{Value, json};
pub use uuid::Uuid;

pub const MODEL: &str = "vendor/paid";
pub const GIT_TOKEN: &str = "ghs_test_token_4f1c";

/// A received callback: its body and its `x-secret` header.
pub type Received = (Value, Option<String>);

/// Receives callbacks; answers with the scripted statuses, then 200.
#[derive(Clone, Default)]
pub struct Receiver {
    pub statuses: Arc<Mutex<VecDeque<u16>>>,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    pub async fn start(self) -> String {
        let app = axum::Router::new().route(
            "/callback",
            axum::routing::post(
                |axum::extract::State(r): axum::extract::State<Receiver>,
                 headers: axum::http::HeaderMap,
                 axum::Json(body): axum::Json<Value>| async move {
                    let secret = headers
                        .get("x-secret")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    r.received.lock().unwrap().push((body, secret));
                    let status = r.statuses.lock().unwrap().pop_front().unwrap_or(200);
                    axum::http::StatusCode::from_u16(status).unwrap()
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/callback", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app.with_state(self)).await });
        url
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

pub struct Env {
    pub _store: TestStore,
    pub _sandboxes: tempfile::TempDir,
    pub sub: Substrate,
    pub clock: Arc<ManualClock>,
    pub upstream: FakeOpenAi,
    pub git: GitServer,
    pub agents: Agents,
    pub automation: Option<kilocloud_automation::Automation>,
    pub gateway: Arc<gateway::GatewayState>,
    pub identity: Identity,
    pub master_keys: MasterKeys,
    pub base: String,
    pub key: String,
    pub user: Uuid,
    pub http: reqwest::Client,
    pub receiver: Receiver,
    pub callback_url: String,
}

/// The identity service of the test server on `sub` (also for a restarted node).
pub fn identity_on(sub: &Substrate, master_keys: &MasterKeys) -> Identity {
    Identity::new(
        sub,
        IdentityConfig {
            jwt_secret: b"sessions-test-secret".to_vec(),
            master_keys: master_keys.clone(),
            internal_api_secret: None,
        },
    )
}

pub async fn env(postgres: bool) -> Env {
    env_with(postgres, |_| {}).await
}

pub async fn env_with(postgres: bool, tweak: impl FnOnce(&mut AgentConfig)) -> Env {
    env_full(postgres, tweak, None, ServerOptions::default()).await
}

/// [`env_with`], with automation when `automation` is given.
pub async fn env_full(
    postgres: bool,
    tweak: impl FnOnce(&mut AgentConfig),
    automation: Option<kilocloud_automation::AutomationConfig>,
    options: ServerOptions,
) -> Env {
    let store = TestStore::new(postgres).await;
    let clock = Arc::new(ManualClock::new(1_798_804_800_000));
    let sub = store.open(clock.clone()).await;
    let master_keys = MasterKeys::new(MasterKey::generate().0, vec![]);
    let identity = identity_on(&sub, &master_keys);
    let upstream = FakeOpenAi::start().await;
    let config = GatewayConfig {
        providers: vec![ProviderConfig {
            id: "fake".into(),
            kind: ProviderKind::OpenaiCompatible,
            base_url: upstream.base_url.clone(),
            api_key: "upstream-key".into(),
            api_key_env: String::new(),
            byok_family: String::new(),
            models: vec![ModelConfig {
                id: MODEL.into(),
                upstream_id: "upstream-paid".into(),
                context_length: 200_000,
                input_price: 3.0,
                output_price: 15.0,
                cache_read_price: 0.3,
                cache_write_price: 3.75,
                free: false,
                fallback_providers: Vec::new(),
            }],
        }],
        ..GatewayConfig::default()
    };
    let gateway = gateway::state(&sub, &config, |_| None).unwrap();
    let sandboxes = tempfile::tempdir().unwrap();
    let mut agent_config = AgentConfig {
        default_model: MODEL.into(),
        allow_private_callbacks: true,
        ..AgentConfig::default()
    };
    agent_config.git.allow_http = true;
    // `githubRepo` sessions (reviews, triggers) clone from the test git server.
    let git = GitServer::start(GIT_TOKEN).await;
    agent_config.git.github_base = git.base_url.clone();
    agent_config.git.allow_private_hosts = true;
    tweak(&mut agent_config);
    let sandbox = Arc::new(LocalSandbox::new(
        &SandboxConfig::default(),
        sandboxes.path().to_path_buf(),
    ));
    let agents = Agents::with_sandbox(&sub, identity.clone(), agent_config, sandbox);
    let automation = automation.map(|config| {
        kilocloud_automation::Automation::new(&sub, identity.clone(), agents.clone(), config)
            .unwrap()
    });
    let system = Initiator {
        user: Uuid::nil(),
        request_id: None,
    };
    let (user, key, _) = identity
        .create_user("agent@example.com", "agent", false, &system)
        .await
        .unwrap();
    gateway
        .ledger
        .grant(Owner::User(user.id), 10_000_000, "test", &system)
        .await
        .unwrap();
    let state = AppState::new(sub.clone(), identity.clone(), gateway.clone(), &options)
        .with_agents(agents.clone());
    let state = match &automation {
        Some(a) => state.with_automation(a.clone()),
        None => state,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    agents.set_server_url(&base);
    tokio::spawn(kilocloud_server::serve(
        listener,
        router(state),
        std::future::pending(),
        Duration::from_secs(1),
    ));
    let receiver = Receiver::default();
    let callback_url = receiver.clone().start().await;
    Env {
        _store: store,
        _sandboxes: sandboxes,
        sub,
        clock,
        upstream,
        git,
        agents,
        automation,
        gateway,
        identity,
        master_keys,
        base,
        key,
        user: user.id,
        http: reqwest::Client::new(),
        receiver,
        callback_url,
    }
}

impl Env {
    /// The user's usage rows (newest first, at most 100), once every request so far is
    /// recorded.
    pub async fn usage(&self) -> Vec<kilocloud_gateway::UsageRow> {
        self.gateway.settle().await;
        self.gateway
            .ledger
            .usage(
                Owner::User(self.user),
                kilocloud_gateway::UsageFilter::default(),
                100,
            )
            .await
            .unwrap()
    }

    /// Initiates `session` and waits for its first execution to end: (execution id, the
    /// session's view then).
    pub async fn initiate_and_wait(&self, session: &str) -> (String, Value) {
        let (_, started) = self
            .request(
                reqwest::Method::POST,
                &format!("/api/sessions/{session}/initiate"),
                None,
            )
            .await;
        let execution = started["executionId"]
            .as_str()
            .unwrap_or_else(|| panic!("initiate: {started}"))
            .to_owned();
        let view = self.until_terminal(session, &execution).await;
        (execution, view)
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.request_as(&self.key, method, path, body).await
    }

    pub async fn request_as(
        &self,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn prepare(&self, extra: Value) -> String {
        self.prepare_as(&self.key, extra).await
    }

    /// Prepares a session on the `demo` repository (created by the first call) as the holder
    /// of `key`.
    pub async fn prepare_as(&self, key: &str, extra: Value) -> String {
        let repo = if self.git.file_at("demo", "main", "hello.txt").is_some() {
            format!("{}/demo.git", self.git.base_url)
        } else {
            self.git.create_repo(
                "demo",
                &[("hello.txt", "hello world\n"), ("README.md", "# demo\n")],
            )
        };
        let mut body = json!({
            "gitUrl": repo,
            "gitToken": GIT_TOKEN,
            "prompt": "Change the greeting to kilo and record that you ran",
            "autoCommit": true,
            "envVars": {"GREETING_STYLE": "short"},
            "secrets": {"API_SECRET": "s3cr3t-value"},
            "callbackTarget": {"url": self.callback_url, "headers": {"x-secret": "callback-secret"}},
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, prepared) = self
            .request_as(key, reqwest::Method::POST, "/api/sessions", Some(body))
            .await;
        assert_eq!(status, 201, "{prepared}");
        prepared["sessionId"].as_str().unwrap().to_owned()
    }

    /// The session's view once `execution` is terminal, waiting on the event signal.
    pub async fn until_terminal(&self, session: &str, execution: &str) -> Value {
        let mut signal = self.agents.event_signal();
        tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                signal.borrow_and_update();
                let (_, view) = self
                    .request(
                        reqwest::Method::GET,
                        &format!("/api/sessions/{session}"),
                        None,
                    )
                    .await;
                let exec = view["executions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|e| e["executionId"] == execution)
                    .cloned()
                    .unwrap();
                if ["completed", "failed", "interrupted"]
                    .contains(&exec["status"].as_str().unwrap())
                {
                    return view;
                }
                signal.changed().await.unwrap();
            }
        })
        .await
        .expect("the execution ended")
    }

    /// The session's events once one of them satisfies `found`, waiting on the event signal
    /// (at most 120 s).
    pub async fn until_event(&self, session: &str, found: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut signal = self.agents.event_signal();
        tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                signal.borrow_and_update();
                let events = self.events(session, 0).await;
                if events.iter().any(&found) {
                    return events;
                }
                signal.changed().await.unwrap();
            }
        })
        .await
        .expect("the event was recorded")
    }

    pub async fn events(&self, session: &str, from: u64) -> Vec<Value> {
        let (status, page) = self
            .request(
                reqwest::Method::GET,
                &format!("/api/sessions/{session}/events?fromId={from}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        page["events"].as_array().unwrap().clone()
    }

    pub async fn ticket(&self, session: &str) -> String {
        let (status, t) = self
            .request(
                reqwest::Method::POST,
                "/api/tickets",
                Some(json!({"resource": format!("session:{session}")})),
            )
            .await;
        assert_eq!(status, 201, "{t}");
        t["ticket"].as_str().unwrap().to_owned()
    }

    pub async fn deliver_callbacks(&self) -> usize {
        let consumer =
            kilocloud_agent::callback::CallbackConsumer::new(self.identity.clone(), true);
        self.sub
            .queues()
            .process_batch(CALLBACK_QUEUE, &consumer)
            .await
            .unwrap()
    }
}

pub fn tool(name: &str, args: Value) -> Reply {
    Reply::ToolCall {
        name: name.into(),
        arguments: args.to_string(),
    }
}
