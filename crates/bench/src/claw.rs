//! KiloClaw proxy overhead: one local upstream (the built-in KiloClaw runtime, `GET /health`
//! and the `GET /ws` ping → pong socket) reached three ways in the same run: directly;
//! through the server's `/i/<id>/…` proxy (the real router, SQLite, KiloClaw on the `fly`
//! provider against the fake Fly API, whose `app_url` is the upstream; every request carries
//! a user JWT, verified with the instance it may reach at most once a second, and the
//! instance's machine is read before the relay);
//! and through nginx (`/usr/sbin/nginx`, one process, keep-alive to the upstream) when it is
//! installed. The same client for each: 16 keep-alive connections in a closed loop (each sends
//! its next request when the previous answer is read) for a fixed time after a warm-up, then
//! one connection the same way (latency without queueing); then 16 WebSocket connections each
//! doing sequential ping → pong round trips. "Added" is a path's latency minus the direct
//! path's at the same percentile. A request that fails counts as an error. Nothing is
//! asserted: the report shows the ratios to nginx.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use kilocloud_claw::fly::{FlyConfig, FlyProvider};
use kilocloud_claw::runtime::RuntimeConfig;
use kilocloud_claw::{Claw, ClawConfig, CreateInstance, ProviderKind};
use kilocloud_gateway::config::GatewayConfig;
use kilocloud_identity::envelope::{MasterKey, MasterKeys};
use kilocloud_identity::model::Initiator;
use kilocloud_identity::{Identity, IdentityConfig, Owner};
use kilocloud_server::{AppState, ServerOptions};
use kilocloud_substrate::{
    BlobConfig, DatabaseConfig, Substrate, Synchronous, SystemClock, Tuning,
};
use kilocloud_test_support::fake_flyio::FakeFly;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use uuid::Uuid;

use crate::Args;
use crate::report::{histogram, p50_p99, rate};

/// Concurrent connections of each load.
const CONNECTIONS: usize = 16;
/// The nginx executable (Debian's package).
const NGINX: &str = "/usr/sbin/nginx";
/// Token of the fake Fly API.
const FLY_TOKEN: &str = "bench-fly-token";

/// One way to reach the upstream.
struct Target {
    name: &'static str,
    /// `GET` URL answering the runtime's health document.
    http: String,
    /// The runtime's socket, with its gateway token.
    ws: String,
    /// The user JWT the proxy needs.
    bearer: Option<String>,
}

/// What one load on one target measured.
struct Outcome {
    rate: f64,
    p50: f64,
    p99: f64,
    errors: u64,
}

/// The nginx process; killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One closed-loop worker's tally.
struct Tally {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            hist: histogram(),
            ok: 0,
            errors: 0,
        }
    }
}

/// Merges the workers' tallies over a window of `elapsed`.
fn outcome(tallies: Vec<Tally>, elapsed: Duration) -> Outcome {
    let mut all = Tally::new();
    for t in tallies {
        let _ = all.hist.add(&t.hist);
        all.ok += t.ok;
        all.errors += t.errors;
    }
    let (p50, p99) = p50_p99(&all.hist);
    Outcome {
        rate: rate(all.ok, elapsed),
        p50,
        p99,
        errors: all.errors,
    }
}

/// `clients.len()` keep-alive connections, each sending `GET` after `GET` for `secs`.
async fn http_load(clients: &[reqwest::Client], t: &Target, secs: Duration) -> Outcome {
    let started = Instant::now();
    let deadline = started + secs;
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let (client, url, bearer) = (client.clone(), t.http.clone(), t.bearer.clone());
        tasks.spawn(async move {
            let mut tally = Tally::new();
            while Instant::now() < deadline {
                let mut req = client.get(&url);
                if let Some(b) = &bearer {
                    req = req.bearer_auth(b);
                }
                let t0 = Instant::now();
                let ok = match req.send().await {
                    Ok(res) if res.status().is_success() => res.bytes().await.is_ok(),
                    _ => false,
                };
                if ok {
                    let _ = tally.hist.record(t0.elapsed().as_micros().max(1) as u64);
                    tally.ok += 1;
                } else {
                    tally.errors += 1;
                }
            }
            tally
        });
    }
    let tallies = tasks.join_all().await;
    outcome(tallies, started.elapsed())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the runtime's socket through `t` (with the bearer JWT when it needs one).
async fn ws_connect(t: &Target) -> anyhow::Result<Socket> {
    let mut request = t.ws.as_str().into_client_request()?;
    if let Some(b) = &t.bearer {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {b}").parse()?);
    }
    // A small read buffer: tungstenite zero-fills the free part of it on every read (128 KiB
    // by default), which would make the load generator the bottleneck.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .with_context(|| format!("{}: WebSocket connect", t.name))?;
    Ok(socket)
}

/// One ping → pong round trip; false when the answer is not the pong.
async fn round_trip(socket: &mut Socket, n: u64) -> bool {
    let ping = format!("{{\"type\":\"ping\",\"data\":{n}}}");
    if socket.send(Message::text(ping)).await.is_err() {
        return false;
    }
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str::<serde_json::Value>(text.as_str())
                    .is_ok_and(|v| v["type"] == "pong" && v["data"] == n);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            _ => return false,
        }
    }
}

/// `CONNECTIONS` sockets (opened before the clock starts), each doing sequential round trips
/// for `secs`; a socket whose round trip fails stops there.
async fn ws_load(t: &Target, secs: Duration) -> anyhow::Result<Outcome> {
    let mut sockets = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        sockets.push(ws_connect(t).await?);
    }
    let started = Instant::now();
    let deadline = started + secs;
    let mut tasks = tokio::task::JoinSet::new();
    for mut socket in sockets {
        tasks.spawn(async move {
            let mut tally = Tally::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let t0 = Instant::now();
                if round_trip(&mut socket, n).await {
                    let _ = tally.hist.record(t0.elapsed().as_micros().max(1) as u64);
                    tally.ok += 1;
                } else {
                    tally.errors += 1;
                    break;
                }
            }
            let _ = socket.close(None).await;
            tally
        });
    }
    let tallies = tasks.join_all().await;
    Ok(outcome(tallies, started.elapsed()))
}

/// Writes the nginx configuration and starts it in front of `upstream` (`127.0.0.1:<port>`);
/// `None` when nginx is not installed.
async fn start_nginx(dir: &Path, upstream: &str) -> anyhow::Result<Option<(Proc, String)>> {
    if !Path::new(NGINX).is_file() {
        return Ok(None);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let d = dir.display();
    // One process doing the work (master_process off: no privilege drop, so the temp paths in
    // the 0700 temp dir stay writable when run as root), keep-alive to the upstream, the
    // WebSocket upgrade passed on, plain requests with `Connection: ""` so the upstream
    // connection is reused.
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {d}/error.log warn;\n\
         pid {d}/nginx.pid;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n\
         client_body_temp_path {d}/client_body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}\n\
         upstream claw {{ server {upstream}; keepalive 32; }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://claw;\n\
         proxy_http_version 1.1;\n      proxy_set_header Upgrade $http_upgrade;\n\
         proxy_set_header Connection $connection_upgrade;\n      proxy_read_timeout 60s;\n    }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let log = std::fs::File::create(dir.join("nginx.stderr"))?;
    let child = Command::new(NGINX)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot run nginx")?;
    let mut nginx = Proc(child);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = http.get(format!("{base}/health")).send().await
            && r.status().is_success()
        {
            return Ok(Some((nginx, base)));
        }
        anyhow::ensure!(
            nginx.0.try_wait()?.is_none() && Instant::now() < deadline,
            "nginx did not start: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server with KiloClaw on the fly provider, whose instance's runtime is served at
/// `upstream`: returns the server's base URL, the user JWT, the instance id and its gateway
/// token. The server runs until the process ends.
async fn start_proxy(
    dir: &Path,
    fly: &FakeFly,
    upstream: std::net::SocketAddr,
) -> anyhow::Result<(Substrate, String, String, Uuid, String)> {
    let sub = Substrate::open(
        &DatabaseConfig::Sqlite {
            path: dir.join("bench.db"),
            synchronous: Synchronous::Normal,
        },
        &BlobConfig::Local {
            path: dir.join("blobs"),
        },
        Tuning::default(),
        Arc::new(SystemClock),
    )
    .await?;
    let identity = Identity::new(
        &sub,
        IdentityConfig {
            jwt_secret: b"bench-secret".to_vec(),
            master_keys: MasterKeys::new(MasterKey::generate().0, vec![]),
            internal_api_secret: None,
        },
    );
    let gateway = kilocloud_server::api::gateway::state(&sub, &GatewayConfig::default(), |_| None)
        .map_err(|e| anyhow::anyhow!(e))?;
    let provider = FlyProvider::new(FlyConfig {
        api_url: fly.url(),
        api_token: FLY_TOKEN.into(),
        app_url: format!("http://{upstream}"),
        rate_per_second: 100_000,
        rate_burst: 100_000,
        ..FlyConfig::default()
    })
    .map_err(|e| anyhow::anyhow!("fly: {e}"))?;
    let claw = Claw::new(
        &sub,
        identity.clone(),
        ClawConfig {
            provider: ProviderKind::Fly,
            gateway_token_secret: "bench-gateway-secret".into(),
            ..ClawConfig::default()
        },
        Arc::new(provider),
        String::new(),
    );
    sub.start().await?;
    let system = Initiator {
        user: Uuid::nil(),
        request_id: None,
    };
    let (user, _, _) = identity
        .create_user("claw-bench@example.com", "bench", false, &system)
        .await?;
    let by = Initiator {
        user: user.id,
        request_id: None,
    };
    let (jwt, _) = identity.issue_jwt(user.id, None, None, 3600, &by).await?;
    let instance = claw
        .create(
            Owner::User(user.id),
            user.id,
            CreateInstance {
                start: Some(true),
                ..CreateInstance::default()
            },
            &by,
        )
        .await
        .map_err(|e| anyhow::anyhow!("create instance: {e}"))?;
    let token = claw.gateway_token(&instance.sandbox_id);
    let state = AppState::new(sub.clone(), identity, gateway, &ServerOptions::default())
        .with_claw(claw, false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = kilocloud_server::serve(
            listener,
            kilocloud_server::router(state),
            std::future::pending(),
            Duration::from_secs(1),
        )
        .await;
    });
    Ok((sub, base, jwt, instance.id, token))
}

/// Runs the group and returns its Markdown section.
pub async fn run(args: &Args) -> anyhow::Result<String> {
    let secs = Duration::from_secs(if args.quick { 2 } else { 5 });
    let warm = Duration::from_millis(if args.quick { 300 } else { 1_000 });
    let dir = kilocloud_test_support::temp_dir();
    let fly = FakeFly::start(FLY_TOKEN).await;
    let upstream_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream = upstream_listener.local_addr()?;
    let (sub, base, jwt, id, token) = start_proxy(dir.path(), &fly, upstream).await?;
    let runtime = RuntimeConfig {
        gateway_token: token.clone(),
        api_key: "unused".into(),
        api_base_url: "http://127.0.0.1:9/".into(),
        default_model: "m".into(),
        home: dir.path().join("runtime-home"),
    };
    let runtime = tokio::spawn(kilocloud_claw::runtime::serve(upstream_listener, runtime));
    let nginx = start_nginx(dir.path(), &upstream.to_string()).await?;
    if nginx.is_none() {
        eprintln!("claw: {NGINX} is missing; the nginx column is skipped");
    }

    let mut targets = vec![
        Target {
            name: "direct",
            http: format!("http://{upstream}/health"),
            ws: format!("ws://{upstream}/ws?token={token}"),
            bearer: None,
        },
        Target {
            name: "kilocloud proxy",
            http: format!("{base}/i/{id}/health"),
            ws: format!("{}/i/{id}/ws?token={token}", base.replacen("http", "ws", 1)),
            bearer: Some(jwt),
        },
    ];
    if let Some((_, nginx)) = &nginx {
        targets.push(Target {
            name: "nginx",
            http: format!("{nginx}/health"),
            ws: format!("{}/ws?token={token}", nginx.replacen("http", "ws", 1)),
            bearer: None,
        });
    }
    // Every path answers before anything is measured.
    for t in &targets {
        let mut req = reqwest::Client::new().get(&t.http);
        if let Some(b) = &t.bearer {
            req = req.bearer_auth(b);
        }
        let res = req.send().await?;
        anyhow::ensure!(
            res.status().is_success(),
            "{}: GET {} answered {}",
            t.name,
            t.http,
            res.status()
        );
        let mut socket = ws_connect(t).await?;
        anyhow::ensure!(
            round_trip(&mut socket, 0).await,
            "{}: no pong on {}",
            t.name,
            t.ws
        );
        let _ = socket.close(None).await;
    }

    let mut http = Vec::new();
    for t in &targets {
        // One client per connection, so each keeps exactly one keep-alive connection.
        let clients = (0..CONNECTIONS)
            .map(|_| {
                reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .tcp_nodelay(true)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        http_load(&clients, t, warm).await;
        http.push(http_load(&clients, t, secs).await);
    }
    // One connection: the added latency without queueing behind the other connections.
    let mut http_one = Vec::new();
    for t in &targets {
        let client = [reqwest::Client::builder().tcp_nodelay(true).build()?];
        http_load(&client, t, warm).await;
        http_one.push(http_load(&client, t, secs).await);
    }
    let mut ws = Vec::new();
    for t in &targets {
        ws_load(t, warm).await?;
        ws.push(ws_load(t, secs).await?);
    }
    runtime.abort();
    drop(nginx);
    sub.shutdown(Duration::from_secs(1)).await;

    let mut out = format!(
        "\n## KiloClaw proxy\n\n\
         One upstream (the built-in KiloClaw runtime: `GET /health`, and `/ws` answering each \
         ping with a pong) reached directly, through the server's `/i/<id>/…` proxy (SQLite; \
         `fly` provider against the fake Fly API; user JWT on every request) and through \
         nginx (one process, `keepalive 32` to the upstream). {CONNECTIONS} keep-alive \
         connections in a closed loop for {} s per cell after a {} ms warm-up; the client, the \
         upstream and the proxy share the cores (nginx runs in its own process). Added = \
         path − direct at the same percentile; the one-connection table shows it without \
         queueing.{}\n",
        secs.as_secs(),
        warm.as_millis(),
        if nginx_missing(&targets) {
            format!(" nginx: not measured ({NGINX} is missing).")
        } else {
            String::new()
        }
    );
    for (title, unit, rows) in [
        ("HTTP `GET /health`", "req/s", &http),
        ("HTTP `GET /health`, one connection", "req/s", &http_one),
        (
            "WebSocket ping → pong (sequential per connection)",
            "round trips/s",
            &ws,
        ),
    ] {
        out += &format!(
            "\n### {title}\n\n| path | {unit} | ÷ nginx | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n"
        );
        let direct = &rows[0];
        let nginx_rate = targets
            .iter()
            .position(|t| t.name == "nginx")
            .map(|i| rows[i].rate);
        for (t, o) in targets.iter().zip(rows.iter()) {
            out += &format!(
                "| {} | {:.0} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} |\n",
                t.name,
                o.rate,
                nginx_rate.map_or("-".into(), |n| format!("{:.2}×", o.rate / n)),
                o.p50,
                o.p99,
                o.p50 - direct.p50,
                o.p99 - direct.p99,
                o.errors
            );
        }
    }
    out.push('\n');
    Ok(out)
}

fn nginx_missing(targets: &[Target]) -> bool {
    !targets.iter().any(|t| t.name == "nginx")
}
