//! The Cloud Agent as the server runs it, for benchmarks: a started substrate, identity, the
//! gateway in front of the fake OpenAI upstream, `Agents` on the `local` (bubblewrap)
//! provider, the HTTP server on a loopback port, and one user.

use std::sync::Arc;
use std::time::Duration;

use kilocloud_agent::sandbox::LocalSandbox;
use kilocloud_agent::{AgentConfig, Agents};
use kilocloud_gateway::config::{GatewayConfig, ModelConfig, ProviderConfig, ProviderKind};
use kilocloud_identity::envelope::{MasterKey, MasterKeys};
use kilocloud_identity::model::{Initiator, UserRecord};
use kilocloud_identity::{Identity, IdentityConfig};
use kilocloud_server::AppState;
use kilocloud_substrate::Substrate;
use kilocloud_test_support::fake_openai::FakeOpenAi;
use uuid::Uuid;

use crate::Backend;

/// A running stack; the server stops when it is dropped.
pub struct AgentStack {
    /// Storage and its substrate.
    pub backend: Backend,
    /// The Cloud Agent.
    pub agents: Agents,
    /// The fake model provider.
    pub upstream: FakeOpenAi,
    /// The user the benchmark acts as.
    pub user: UserRecord,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    _sandboxes: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for AgentStack {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl AgentStack {
    /// Starts the stack on SQLite or PostgreSQL. `configure` adjusts the agent configuration;
    /// `services` may add services (their actors, queues and routes) to the server state.
    pub async fn start(
        postgres: bool,
        configure: impl FnOnce(&mut AgentConfig),
        services: impl FnOnce(&Substrate, &Identity, &Agents, AppState) -> AppState,
    ) -> anyhow::Result<Self> {
        let backend = Backend::open(postgres).await?;
        let sub = backend.substrate.clone();
        let identity = Identity::new(
            &sub,
            IdentityConfig {
                jwt_secret: b"bench-secret".to_vec(),
                master_keys: MasterKeys::new(MasterKey::generate().0, vec![]),
                internal_api_secret: None,
            },
        );
        let upstream = FakeOpenAi::start_quiet().await;
        let gateway_config = GatewayConfig {
            providers: vec![ProviderConfig {
                id: "fake".into(),
                kind: ProviderKind::OpenaiCompatible,
                base_url: upstream.base_url.clone(),
                api_key: "k".into(),
                api_key_env: String::new(),
                byok_family: String::new(),
                models: vec![ModelConfig {
                    id: "vendor/free".into(),
                    upstream_id: "free".into(),
                    context_length: 100_000,
                    input_price: 0.0,
                    output_price: 0.0,
                    cache_read_price: 0.0,
                    cache_write_price: 0.0,
                    free: true,
                    fallback_providers: Vec::new(),
                }],
            }],
            ..GatewayConfig::default()
        };
        let gateway = kilocloud_server::api::gateway::state(&sub, &gateway_config, |_| None)
            .map_err(|e| anyhow::anyhow!(e))?;
        let sandboxes = tempfile::tempdir()?;
        let mut config = AgentConfig {
            default_model: "vendor/free".into(),
            ..AgentConfig::default()
        };
        config.git.allow_http = true;
        config.git.allow_private_hosts = true;
        configure(&mut config);
        let sandbox = Arc::new(LocalSandbox::new(
            &config.sandbox,
            sandboxes.path().to_path_buf(),
        ));
        let agents = Agents::with_sandbox(&sub, identity.clone(), config, sandbox);
        let state = AppState::new(
            sub.clone(),
            identity.clone(),
            gateway,
            &kilocloud_server::ServerOptions::default(),
        )
        .with_agents(agents.clone());
        let state = services(&sub, &identity, &agents, state);
        agents.start();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        agents.set_server_url(&base);
        let server = tokio::spawn(async move {
            let _ = kilocloud_server::serve(
                listener,
                kilocloud_server::router(state),
                std::future::pending(),
                Duration::from_secs(1),
            )
            .await;
        });
        let system = Initiator {
            user: Uuid::nil(),
            request_id: None,
        };
        let (user, _, _) = identity
            .create_user(
                &format!("bench-{}@example.com", Uuid::new_v4()),
                "bench",
                false,
                &system,
            )
            .await?;
        Ok(Self {
            backend,
            agents,
            upstream,
            user,
            base,
            _sandboxes: sandboxes,
            server,
        })
    }
}
