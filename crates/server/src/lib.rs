//! The HTTP face of a `kilocloud` node: one axum router for every service, the error type,
//! request ids, metrics, health and readiness, and graceful shutdown.
//!
//! Services add their routes in [`router`]; each route's handler states what it requires through
//! its extractors (for example [`admin::Admin`]).

pub mod admin;
pub mod api;
pub mod auth;
pub mod claw_proxy;
pub mod error;
pub mod observability;
pub mod probe;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use kilocloud_identity::Identity;
use kilocloud_substrate::Substrate;
use metrics_exporter_prometheus::PrometheusHandle;
use sha2::{Digest, Sha256};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

pub use error::{ApiError, Json};

/// Largest request body accepted by default, bytes (256 KiB). Larger bodies get 413.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// The node's substrate.
    pub substrate: Substrate,
    /// Users, organizations, credentials and secrets.
    pub identity: Identity,
    /// SHA-256 of the static admin token; `None` when not configured (admin users still work).
    pub admin_token_sha256: Option<Arc<[u8; 32]>>,
    /// The model gateway.
    pub gateway: Arc<api::gateway::GatewayState>,
    /// The Cloud Agent; `None` answers its routes with 503 `agent_disabled`.
    pub agents: Option<kilocloud_agent::Agents>,
    /// Triggers, the GitHub App and code review; `None` answers their routes with 503
    /// `automation_disabled`.
    pub automation: Option<kilocloud_automation::Automation>,
    /// KiloClaw; `None` answers its routes with 503 `claw_disabled`.
    pub claw: Option<kilocloud_claw::Claw>,
    /// KiCI's orchestrator; `None` answers its routes with 503 `ci_disabled`.
    pub ci: Option<kilocloud_ci::Ci>,
    /// Session ingest of the Kilo Code CLI and the presence of `kilo remote` connections
    /// (always on: it needs only the substrate).
    pub ingest: kilocloud_ingest::Ingest,
    /// The KiloClaw proxy's per-node memory (idle connections to runtimes, callers verified
    /// in the last second).
    pub claw_proxy: Arc<claw_proxy::ProxyState>,
    /// Whether the access cookie is marked `Secure` (set when served over HTTPS).
    pub claw_cookie_secure: bool,
    /// Per-IP budget of failed authentications.
    pub auth_limiter: Arc<auth::AuthFailureLimiter>,
    /// Proxies whose `Forwarded`/`X-Forwarded-For` headers name the client (see
    /// [`auth::ClientIp`]).
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
    /// Device codes started per client address: 10 a minute.
    pub device_codes: Arc<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>,
    /// Prometheus exposition handle.
    pub metrics: PrometheusHandle,
}

/// Settings of the HTTP layer. `Debug` leaves the admin token out.
#[derive(Clone)]
pub struct ServerOptions {
    /// Static admin token for `/api/admin` (break-glass); empty disables it.
    pub admin_token: String,
    /// Failed authentications allowed per client IP per minute (burst of the same size).
    pub auth_failures_per_minute: u32,
    /// Reverse proxies (CIDRs) trusted to name the client in `Forwarded` or
    /// `X-Forwarded-For`; empty: the TCP peer is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field(
                "admin_token",
                &if self.admin_token.is_empty() {
                    ""
                } else {
                    "***"
                },
            )
            .field("auth_failures_per_minute", &self.auth_failures_per_minute)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish()
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            admin_token: String::new(),
            auth_failures_per_minute: 30,
            trusted_proxies: Vec::new(),
        }
    }
}

impl AppState {
    /// State for `substrate`, `identity` and the gateway (whose actors must already be
    /// registered); registers session ingest's actors.
    pub fn new(
        substrate: Substrate,
        identity: Identity,
        gateway: Arc<api::gateway::GatewayState>,
        options: &ServerOptions,
    ) -> Self {
        let ingest = kilocloud_ingest::Ingest::new(&substrate);
        Self {
            substrate,
            identity,
            gateway,
            agents: None,
            automation: None,
            ci: None,
            claw: None,
            ingest,
            claw_proxy: Arc::default(),
            claw_cookie_secure: false,
            admin_token_sha256: Some(options.admin_token.as_str())
                .filter(|t| !t.is_empty())
                .map(|t| Arc::new(Sha256::digest(t.as_bytes()).into())),
            auth_limiter: Arc::new(auth::AuthFailureLimiter::new(
                options.auth_failures_per_minute,
            )),
            trusted_proxies: options.trusted_proxies.clone().into(),
            device_codes: Arc::new(governor::RateLimiter::keyed(governor::Quota::per_minute(
                std::num::NonZeroU32::new(10).expect("non-zero"),
            ))),
            metrics: observability::metrics_handle(),
        }
        .with_zeroed_metrics()
    }
}

impl AppState {
    /// With the Cloud Agent's routes served by `agents`, which then check sessions' models
    /// against this server's gateway.
    pub fn with_agents(mut self, agents: kilocloud_agent::Agents) -> Self {
        self.substrate.actors().register(api::cloud::MessageActor);
        agents.set_model_catalog(Arc::new(api::sessions::GatewayModels(self.gateway.clone())));
        self.agents = Some(agents);
        self
    }

    /// With KiloClaw's routes and proxy served by `claw`; `secure_cookie` marks the access
    /// cookie `Secure` (the server is reached over HTTPS).
    pub fn with_claw(mut self, claw: kilocloud_claw::Claw, secure_cookie: bool) -> Self {
        self.claw = Some(claw);
        self.claw_cookie_secure = secure_cookie;
        self
    }

    /// With the KiCI routes served by `ci`.
    pub fn with_ci(mut self, ci: kilocloud_ci::Ci) -> Self {
        self.ci = Some(ci);
        self
    }

    /// With the automation routes served by `automation`.
    pub fn with_automation(mut self, automation: kilocloud_automation::Automation) -> Self {
        self.automation = Some(automation);
        self
    }

    /// Registers the counters that may stay at zero for a long time, so dashboards and alerts
    /// see them from the first scrape.
    fn with_zeroed_metrics(self) -> Self {
        for actor_type in self.substrate.actors().types() {
            metrics::counter!("kilocloud_actor_overloaded_total", "actor_type" => actor_type)
                .increment(0);
        }
        metrics::counter!("kilocloud_alarm_retries_total").increment(0);
        metrics::counter!("kilocloud_alarm_dropped_total").increment(0);
        metrics::counter!("kilocloud_auth_failures_total", "code" => "unauthenticated")
            .increment(0);
        self
    }
}

/// The full router: health, readiness, metrics, and every service's API.
pub fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let (api, openapi) = api::routes();
    let openapi = Arc::new(openapi);
    // Our routes answer every error in the API's JSON format; the KiloClaw proxy relays the
    // runtime's own responses untouched.
    let ours = Router::new()
        .merge(api)
        .route(
            "/api/openapi.json",
            get(move || {
                let doc = openapi.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        // Model ids hold slashes, so these take the rest of the path (documented in the
        // OpenAPI document as `/api/gateway/v1/models/{id}`).
        .route("/api/gateway/v1/models/{*id}", get(api::gateway::v1_model))
        .route("/api/gateway/models/{*id}", get(api::gateway::v1_model))
        .route("/device-auth", get(api::device::page))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .nest("/api/admin", admin::routes())
        .layer(axum::middleware::from_fn(error::json_errors));
    Router::new()
        .merge(ours)
        .merge(claw_proxy::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(observability::track_http))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &http::Request<_>| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
                })
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}

/// `GET /health`: the process is up. Always 200 `{"status":"ok"}`.
async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /ready`: the store answers and its schema is current; 503 `not_ready` otherwise.
async fn ready(State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    s.substrate.ready().await.map_err(|e| {
        tracing::warn!(error = %e, "not ready");
        ApiError {
            retry_after_secs: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the store is unreachable or its schema is not current; see the server log",
            )
        }
    })?;
    Ok(Json(serde_json::json!({
        "status": "ready",
        "backend": s.substrate.backend_kind(),
        "schema_version": Substrate::latest_schema_version(),
        "node": s.substrate.node_id(),
    })))
}

/// `GET /metrics`: Prometheus text exposition.
async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        observability::render(&s.metrics, &s.substrate).await,
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("no route for this path")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed for this path",
    )
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and lets
/// in-flight requests finish for up to `grace`. Returns false if requests were cut off.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<bool> {
    use axum::serve::ListenerExt as _;
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let app = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    // Streams are written chunk by chunk: without TCP_NODELAY, Nagle's algorithm holds a
    // chunk until the client acknowledges the previous one, which a delayed ACK makes ~40 ms.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    });
    let mut server = Box::pin(server.into_future());
    tokio::select! {
        res = &mut server => { res?; return Ok(true); }
        _ = stopping_rx => {}
    }
    match tokio::time::timeout(grace, server).await {
        Ok(res) => res.map(|_| true),
        Err(_) => Ok(false),
    }
}
