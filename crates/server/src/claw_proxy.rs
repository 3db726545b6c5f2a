//! The KiloClaw proxy and access gateway (reference kilo-cloud.md §2 "Catch-all proxy" and
//! "Public (no auth)" routes).
//!
//! `/i/{instanceId}/…` relays HTTP and WebSocket traffic both ways to the instance's runtime;
//! `/claw/…` does the same for the caller's legacy per-user instance. The caller proves who
//! they are with a user JWT (`Authorization: Bearer`, or the `kiloclaw-auth` cookie the access
//! gateway sets), checked with the strict pepper rule; the instance must be theirs or their
//! organization's, else 404 (existence is not revealed). A destroying instance answers 409,
//! one without a machine 404 `not_provisioned`. When a running instance's runtime does not
//! answer, it is started again once and the request retried (the HTTP body is buffered for
//! that, at most [`MAX_PROXY_BODY_BYTES`]); otherwise 503. The caller's credential and cookie
//! never reach the runtime. WebSocket frames from the runtime whose error says the gateway
//! token is missing or mismatched are rewritten to a reconnect message (close reasons too,
//! cut to 123 bytes); an error on one side closes the other with 1011.
//!
//! `GET /kilo-access-gateway?instance&user[&code]` serves the access-code form; `POST`
//! redeems the code (single use, 10 min), sets the 24 h `kiloclaw-auth` cookie and sends the
//! browser to `/i/<id>/#token=<gateway token>` (the token travels in the fragment, never to a
//! server log).

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame as AxumClose, Message as AxumMsg, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{any, get};
use axum::{Form, Router};
use futures::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use kilocloud_claw::instance::Status;
use kilocloud_claw::{ACCESS_COOKIE, ACCESS_COOKIE_TTL_S, Claw, ClawError, InstanceRef};
use kilocloud_identity::{Owner, Principal};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message as UpMsg;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as UpClose;
use uuid::Uuid;

use crate::api::claw::claw;
use crate::auth::{bearer_token, bearer_value, limited_webhook};
use crate::{ApiError, AppState};

/// Largest HTTP request body relayed, bytes (buffered so a retry can replay it).
pub const MAX_PROXY_BODY_BYTES: usize = 10 * 1024 * 1024;
/// What a gateway-token error from the runtime is rewritten to.
const RECONNECT_MESSAGE: &str = "Gateway authentication failed. Please reconnect.";
/// Idle upstream connections kept per machine.
const POOL_PER_MACHINE: usize = 32;

/// The proxy's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/i/{id}", any(redirect_to_slash))
        .route("/i/{id}/", any(proxy_instance))
        .route("/i/{id}/{*rest}", any(proxy_instance))
        .route("/claw", any(proxy_legacy))
        .route("/claw/{*rest}", any(proxy_legacy))
        .merge(
            Router::new()
                .route("/kilo-access-gateway", get(access_form).post(access_redeem))
                .layer(axum::middleware::map_response(no_store)),
        )
}

/// The access page carries codes, and the page that opens an instance its gateway token: no
/// cache (the browser's, or a proxy's) may keep either (`Cache-Control: no-store`, RFC 9111
/// §5.2.2.5).
async fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The proxy's per-node memory: idle connections to runtimes and the callers verified
/// recently. Cheap to share (`Arc` in [`AppState`]).
#[derive(Default)]
pub struct ProxyState {
    pool: UpstreamPool,
    verified: VerifiedCache,
}

/// Idle HTTP/1 connections to runtimes, per machine.
#[derive(Default)]
struct UpstreamPool {
    idle: Mutex<HashMap<String, Vec<http1::SendRequest<Full<Bytes>>>>>,
}

/// How long a verified caller and the instance they may reach are taken as read, in ms. A
/// revoked token (pepper rotated), a lost membership or a destroyed registry row takes effect
/// at the proxy within this time; the instance's state (destroying, its machine) is read on
/// every request regardless. Its effect on concurrent HTTP throughput is smaller than the
/// benchmark's run-to-run spread (BENCHMARKS.md).
const VERIFIED_TTL_MS: i64 = 1_000;
/// Most entries kept; beyond it the cache starts over.
const VERIFIED_MAX: usize = 10_000;

/// Credentials the proxy verified recently, with the instance each may reach: the JWT check
/// (signature and pepper read) and the registry lookup are then skipped for
/// [`VERIFIED_TTL_MS`]. Keyed by the exact credentials sent and the target; only successes
/// are kept. Memory only, per node; times come from the substrate's clock.
#[derive(Default)]
struct VerifiedCache {
    entries: Mutex<HashMap<String, Verified>>,
}

/// A cache entry: when it was verified and until when the credential is valid (ms since the
/// epoch), how, and the instance.
struct Verified {
    at_ms: i64,
    expires_at_ms: Option<i64>,
    proof: Proof,
    found: InstanceRef,
}

impl VerifiedCache {
    /// The access cookie's and the bearer token's values, and the target.
    fn key(headers: &HeaderMap, target: &Target) -> String {
        let cookie = cookie(headers, ACCESS_COOKIE).unwrap_or_default();
        let bearer = bearer_token(headers).unwrap_or_default();
        match target {
            Target::Instance(id) => format!("{cookie}\n{bearer}\ni/{id}"),
            Target::Legacy => format!("{cookie}\n{bearer}\nclaw"),
        }
    }

    fn get(&self, key: &str, now_ms: i64) -> Option<(Proof, InstanceRef)> {
        let entries = self.entries.lock().unwrap();
        let v = entries.get(key)?;
        let fresh = now_ms >= v.at_ms
            && now_ms - v.at_ms < VERIFIED_TTL_MS
            && v.expires_at_ms.is_none_or(|exp| exp > now_ms);
        fresh.then(|| (v.proof, v.found.clone()))
    }

    fn put(&self, key: String, verified: Verified) {
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= VERIFIED_MAX {
            entries.clear();
        }
        entries.insert(key, verified);
    }
}

impl UpstreamPool {
    /// A connection ready for a request. Connections still streaming a response body stay
    /// pooled (they are ready again once it ends); closed ones are dropped.
    fn take(&self, machine: &str) -> Option<http1::SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap();
        let senders = idle.get_mut(machine)?;
        senders.retain(|s| !s.is_closed());
        let ready = senders.iter().position(|s| s.is_ready())?;
        Some(senders.swap_remove(ready))
    }

    fn put(&self, machine: &str, sender: http1::SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().unwrap();
        let senders = idle.entry(machine.to_owned()).or_default();
        senders.retain(|s| !s.is_closed());
        if senders.len() < POOL_PER_MACHINE {
            senders.push(sender);
        }
    }

    fn forget(&self, machine: &str) {
        self.idle.lock().unwrap().remove(machine);
    }
}

/// `/i/{id}` → `/i/{id}/`, keeping the query.
async fn redirect_to_slash(Path(id): Path<String>, request: Request) -> Redirect {
    match request.uri().query() {
        Some(q) => Redirect::permanent(&format!("/i/{id}/?{q}")),
        None => Redirect::permanent(&format!("/i/{id}/")),
    }
}

async fn proxy_instance(
    State(s): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    request: Request,
) -> Response {
    let id = params.get("id").cloned().unwrap_or_default();
    proxy(s, Target::Instance(id), request).await
}

async fn proxy_legacy(State(s): State<AppState>, request: Request) -> Response {
    proxy(s, Target::Legacy, request).await
}

enum Target {
    /// `/i/{id}/…`: the instance's id as given (validated as a UUID).
    Instance(String),
    /// `/claw/…`: the caller's legacy instance.
    Legacy,
}

impl Target {
    /// The path the runtime sees: the request's path as sent (still percent-encoded) minus
    /// the `/i/{id}` or `/claw` prefix, with the query.
    fn upstream_path(&self, uri: &http::Uri) -> String {
        let prefix_segments = match self {
            Target::Instance(_) => 2,
            Target::Legacy => 1,
        };
        let mut rest = uri.path().trim_start_matches('/');
        for _ in 0..prefix_segments {
            rest = rest.split_once('/').map_or("", |(_, tail)| tail);
        }
        match uri.query() {
            Some(q) => format!("/{rest}?{q}"),
            None => format!("/{rest}"),
        }
    }
}

/// How the caller proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proof {
    /// The access cookie: an `Authorization` header is the runtime's own (its gateway token)
    /// and is relayed, unless it is one of our credentials (see [`forwarded_headers`]).
    Cookie,
    /// A bearer JWT: the header is ours and never reaches the runtime.
    Bearer,
}

/// The caller from the access cookie or else a bearer JWT (strict pepper check either way;
/// API keys are not accepted), under the per-address failure limiter (a failed bearer check
/// counts; a stale cookie next to a valid bearer does not).
async fn caller(s: &AppState, parts: &Parts) -> Result<(Principal, Proof), ApiError> {
    limited_webhook(parts, s, async {
        if let Some(token) = cookie(&parts.headers, ACCESS_COOKIE)
            && let Ok(p) = s.identity.authenticate_jwt(&token).await
        {
            return Ok((p, Proof::Cookie));
        }
        let Some(token) = bearer_token(&parts.headers) else {
            return Err(ApiError::unauthorized(
                "sign in: a bearer JWT, or an access code redeemed at /kilo-access-gateway \
                 (`kilocloud claw open` prints one)",
            ));
        };
        Ok((s.identity.authenticate_jwt(token).await?, Proof::Bearer))
    })
    .await
}

/// Whether `caller` may reach `found` beyond ownership (which `find_for_user` checked): a
/// bot's token never does (403), and a token pinned to an organization reaches only that
/// organization's instances (404 otherwise, as for anyone else's).
fn check_credential(caller: &Principal, found: &InstanceRef) -> Result<(), ApiError> {
    if caller.bot.is_some() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "personal_credential_required",
            "a bot's token cannot open an instance; sign in as the user",
        ));
    }
    match caller.pinned_org {
        Some(org) if found.row.org_id != Some(org) => Err(ClawError::NotFound.into()),
        _ => Ok(()),
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

async fn proxy(s: AppState, target: Target, request: Request) -> Response {
    match relay(&s, target, request).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn relay(s: &AppState, target: Target, request: Request) -> Result<Response, ApiError> {
    let claw = claw(s)?.clone();
    let (mut parts, body) = request.into_parts();
    let path_and_query = target.upstream_path(&parts.uri);
    let cache_key = VerifiedCache::key(&parts.headers, &target);
    let now_ms = s.substrate.clock().now_ms();
    let (proof, found) = match s.claw_proxy.verified.get(&cache_key, now_ms) {
        Some(hit) => hit,
        None => {
            let (principal, proof) = caller(s, &parts).await?;
            let user = principal.user;
            let found = match target {
                Target::Instance(id) => {
                    let id = Uuid::parse_str(&id)
                        .map_err(|_| ApiError::not_found("instance not found"))?;
                    claw.find_for_user(user, id).await?
                }
                Target::Legacy => claw.find(Owner::User(user), user).await?,
            };
            check_credential(&principal, &found)?;
            s.claw_proxy.verified.put(
                cache_key,
                Verified {
                    at_ms: now_ms,
                    expires_at_ms: principal.expires_at_ms,
                    proof,
                    found: found.clone(),
                },
            );
            (proof, found)
        }
    };
    let is_upgrade = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if is_upgrade {
        let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, s)
            .await
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let protocols = requested_protocols(&parts.headers);
        let forwarded = forwarded_headers(&parts.headers, proof);
        let (upstream, chosen) =
            connect_ws(&claw, &found, &path_and_query, &forwarded, &protocols).await?;
        // The client is answered with the subprotocol the runtime chose (RFC 6455 §4.2.2),
        // none when it chose none.
        return Ok(upgrade
            .read_buffer_size(RELAY_READ_BUFFER_BYTES)
            .protocols(chosen)
            .on_upgrade(move |client| relay_ws(client, upstream)));
    }
    let body = axum::body::to_bytes(body, MAX_PROXY_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is over the proxy's limit of {MAX_PROXY_BODY_BYTES} bytes"),
            )
        })?;
    let headers = forwarded_headers(&parts.headers, proof);
    let method = parts.method.clone();
    let proxy = s.claw_proxy.clone();
    let pool = &proxy.pool;
    let send = |machine: (String, String)| {
        let (claw, headers, body, method, path) = (
            claw.clone(),
            headers.clone(),
            body.clone(),
            method.clone(),
            path_and_query.clone(),
        );
        async move { send_http(&claw, pool, machine, method, &path, headers, body).await }
    };
    let machine = machine_of(&claw, &found).await?;
    match send(machine.clone()).await {
        Ok(response) => Ok(response),
        Err(e) => {
            let machine = recover(&claw, &found, &machine.1, e).await?;
            pool.forget(&machine.1);
            send(machine).await.map_err(|e| unreachable_error(&e))
        }
    }
}

/// The instance's app and machine, refusing destroying (409) and unprovisioned (404)
/// instances.
async fn machine_of(claw: &Claw, found: &InstanceRef) -> Result<(String, String), ApiError> {
    let state = claw.state(&found.key).await?;
    if state.status == Some(Status::Destroying) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "instance_destroying",
            "the instance is being destroyed",
        ));
    }
    match state.machine_id {
        Some(m) => Ok((state.app_name, m)),
        None => Err(ClawError::NotProvisioned.into()),
    }
}

/// After a failed attempt: a running instance is started again (once, and only if it is
/// still running on the machine that did not answer) and its machine returned for the retry;
/// otherwise 503.
async fn recover(
    claw: &Claw,
    found: &InstanceRef,
    machine: &str,
    cause: String,
) -> Result<(String, String), ApiError> {
    tracing::warn!(instance = %found.row.id, %machine, error = %cause, "runtime did not answer: restarting it once");
    let state = claw.recover(found, machine).await?;
    if state.status != Some(Status::Running) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "instance_not_reachable",
            "Instance not reachable: it is not running (start it first)",
        ));
    }
    machine_of(claw, found).await
}

fn unreachable_error(cause: &str) -> ApiError {
    ApiError {
        retry_after_secs: Some(5),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "instance_not_reachable",
            format!("the instance's runtime did not answer after a restart: {cause}"),
        )
    }
}

/// The request headers for the runtime: without hop-by-hop headers (RFC 9110 §7.6.1), the
/// access cookie, and an `Authorization` header that carried the caller's JWT or looks like
/// any credential of ours (a JWT or an API key), whoever sent it: the runtime's own token
/// (hex) passes.
fn forwarded_headers(incoming: &HeaderMap, proof: Proof) -> HeaderMap {
    let mut out = HeaderMap::new();
    let listed: Vec<String> = incoming
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in incoming {
        let n = name.as_str();
        let hop = matches!(
            n,
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "host"
                | "cookie"
                | "content-length"
        ) || (n == "authorization"
            && (proof == Proof::Bearer || is_our_credential(value)))
            || n.starts_with("sec-websocket-")
            || listed.iter().any(|l| l == n);
        if !hop {
            out.append(name.clone(), value.clone());
        }
    }
    if let Some(cookies) = cookie_without_access(incoming) {
        out.insert(header::COOKIE, cookies);
    }
    out
}

/// Whether an `Authorization` value is shaped like a credential of ours: a JWT (three
/// dot-separated parts) or an API key or ticket (`kc_…`, `kt_…`).
fn is_our_credential(value: &HeaderValue) -> bool {
    let token = bearer_value(value);
    token.split('.').count() == 3
        || token.starts_with(kilocloud_identity::credential::API_KEY_PREFIX)
        || token.starts_with(kilocloud_identity::credential::TICKET_PREFIX)
}

/// The caller's cookies minus the access cookie (the runtime may set its own).
fn cookie_without_access(incoming: &HeaderMap) -> Option<HeaderValue> {
    let kept: Vec<String> = incoming
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| !kv.is_empty() && !kv.starts_with(&format!("{ACCESS_COOKIE}=")))
        .map(str::to_owned)
        .collect();
    (!kept.is_empty())
        .then(|| HeaderValue::from_str(&kept.join("; ")).ok())
        .flatten()
}

/// One HTTP exchange with the runtime over a pooled or new connection. Errors (as text)
/// mean the runtime did not answer: nothing was relayed yet, so a retry is safe.
async fn send_http(
    claw: &Claw,
    pool: &UpstreamPool,
    (app, machine): (String, String),
    method: http::Method,
    path: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, String> {
    let provider = claw.provider();
    let target = provider.upstream(&app, &machine);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    *request.headers_mut() = headers;
    let h = request.headers_mut();
    h.insert(
        header::HOST,
        HeaderValue::from_str(&target.host).map_err(|e| e.to_string())?,
    );
    for (k, v) in &target.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
            h.insert(k, v);
        }
    }
    // A pooled connection the runtime has closed is not a runtime that does not answer: such
    // a failure is retried once on a new connection before the caller may restart anything.
    let pooled = match pool.take(&machine) {
        Some(mut sender) => match sender.send_request(request.clone()).await {
            Ok(response) => Some((sender, response)),
            Err(_) => None,
        },
        None => None,
    };
    let (sender, response) = match pooled {
        Some(done) => done,
        None => {
            let (mut sender, conn) = connect_within(async {
                let io = provider
                    .dial(&app, &machine)
                    .await
                    .map_err(|e| e.to_string())?;
                http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| e.to_string())
            })
            .await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            (sender, response)
        }
    };
    pool.put(&machine, sender);
    let (mut parts, body) = response.into_parts();
    for hop in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        HeaderName::from_static("keep-alive"),
    ] {
        parts.headers.remove(hop);
    }
    drop_access_cookie(&mut parts.headers);
    Ok(Response::from_parts(
        parts,
        Body::new(body.map_err(axum::Error::new)),
    ))
}

/// Removes any `Set-Cookie` of the access cookie from a runtime's response: every runtime
/// shares this origin, and one must not replace the caller's sign-in with another user's.
fn drop_access_cookie(headers: &mut HeaderMap) {
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            let name = v
                .to_str()
                .ok()
                .and_then(|v| v.split_once('='))
                .map(|(name, _)| name.trim());
            name != Some(ACCESS_COOKIE)
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in kept {
        headers.append(header::SET_COOKIE, v);
    }
}

fn requested_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

type UpstreamWs = tokio_tungstenite::WebSocketStream<Box<dyn kilocloud_claw::provider::UpstreamIo>>;

/// How long reaching a runtime (dial plus HTTP or WebSocket handshake) may take before it
/// counts as not answering, in seconds.
const CONNECT_TIMEOUT_S: u64 = 10;

/// Runs a dial-and-handshake under [`CONNECT_TIMEOUT_S`].
async fn connect_within<T>(connect: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(std::time::Duration::from_secs(CONNECT_TIMEOUT_S), connect)
        .await
        .map_err(|_| format!("no answer within {CONNECT_TIMEOUT_S} s"))?
}

/// The runtime's side of a WebSocket and the subprotocol it chose.
type Opened = (UpstreamWs, Option<String>);

/// Opens the runtime's side of a WebSocket, with the same restart-and-retry rule.
async fn connect_ws(
    claw: &Claw,
    found: &InstanceRef,
    path: &str,
    headers: &HeaderMap,
    protocols: &[String],
) -> Result<Opened, ApiError> {
    let machine = machine_of(claw, found).await?;
    match open_ws(claw, &machine, path, headers, protocols).await {
        Ok(ws) => Ok(ws),
        Err(e) => {
            let machine = recover(claw, found, &machine.1, e).await?;
            open_ws(claw, &machine, path, headers, protocols)
                .await
                .map_err(|e| unreachable_error(&e))
        }
    }
}

/// Read buffer of each side of a relayed WebSocket, in bytes. tungstenite zero-fills the free
/// part of its read buffer on every read; at its 128 KiB default that was about a fifth of
/// the relay's CPU in the `bench claw` profile (BENCHMARKS.md). Frames larger than this are
/// still read whole, in several reads.
const RELAY_READ_BUFFER_BYTES: usize = 8 * 1024;

fn relay_ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(RELAY_READ_BUFFER_BYTES)
}

/// Opens a WebSocket to the runtime with the (already filtered) `headers` and the
/// subprotocols the client asked for.
async fn open_ws(
    claw: &Claw,
    (app, machine): &(String, String),
    path: &str,
    headers: &HeaderMap,
    protocols: &[String],
) -> Result<Opened, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let provider = claw.provider();
    let target = provider.upstream(app, machine);
    let mut request = format!("ws://{}{path}", target.host)
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let h = request.headers_mut();
    for (k, v) in headers {
        h.append(k.clone(), v.clone());
    }
    if !protocols.is_empty()
        && let Ok(v) = HeaderValue::from_str(&protocols.join(", "))
    {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
    for (k, v) in &target.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
            h.insert(k, v);
        }
    }
    let (ws, response) = connect_within(async {
        let io = provider
            .dial(app, machine)
            .await
            .map_err(|e| e.to_string())?;
        tokio_tungstenite::client_async_with_config(request, io, Some(relay_ws_config()))
            .await
            .map_err(|e| e.to_string())
    })
    .await?;
    let chosen = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((ws, chosen))
}

/// Whether a runtime message reports a missing or mismatched gateway token.
fn is_gateway_token_error(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("gateway token missing") || lower.contains("gateway token mismatch")
}

/// A text frame from the runtime, with a gateway-token error rewritten.
fn rewrite_text(text: &str) -> String {
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(text) else {
        return text.to_owned();
    };
    let message = v.pointer("/error/message").and_then(|m| m.as_str());
    if message.is_some_and(is_gateway_token_error) {
        v["error"]["message"] = RECONNECT_MESSAGE.into();
        return v.to_string();
    }
    text.to_owned()
}

/// A close reason from the runtime: rewritten likewise, cut to 123 bytes (the most a close
/// frame carries, RFC 6455 §5.5).
fn rewrite_reason(reason: &str) -> String {
    let reason = if is_gateway_token_error(reason) {
        RECONNECT_MESSAGE
    } else {
        reason
    };
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// Relays frames both ways until either side closes.
async fn relay_ws(client: WebSocket, upstream: UpstreamWs) {
    let (mut client_tx, mut client_rx) = client.split();
    let (mut up_tx, mut up_rx) = upstream.split();
    let to_upstream = async {
        while let Some(msg) = client_rx.next().await {
            let msg = match msg {
                Ok(AxumMsg::Text(t)) => UpMsg::text(t.as_str()),
                Ok(AxumMsg::Binary(b)) => UpMsg::binary(b),
                Ok(AxumMsg::Ping(b)) => UpMsg::Ping(b),
                Ok(AxumMsg::Pong(b)) => UpMsg::Pong(b),
                Ok(AxumMsg::Close(frame)) => {
                    let close = frame.map(|f| UpClose {
                        code: f.code.into(),
                        reason: f.reason.as_str().into(),
                    });
                    let _ = up_tx.send(UpMsg::Close(close)).await;
                    return;
                }
                Err(_) => {
                    let _ = up_tx
                        .send(UpMsg::Close(Some(UpClose {
                            code: 1011u16.into(),
                            reason: "client error".into(),
                        })))
                        .await;
                    return;
                }
            };
            if up_tx.send(msg).await.is_err() {
                return;
            }
        }
    };
    let to_client = async {
        while let Some(msg) = up_rx.next().await {
            let msg = match msg {
                Ok(UpMsg::Text(t)) => AxumMsg::Text(rewrite_text(t.as_str()).into()),
                Ok(UpMsg::Binary(b)) => AxumMsg::Binary(b),
                Ok(UpMsg::Ping(b)) => AxumMsg::Ping(b),
                Ok(UpMsg::Pong(b)) => AxumMsg::Pong(b),
                Ok(UpMsg::Close(frame)) => {
                    let close = frame.map(|f| AxumClose {
                        code: f.code.into(),
                        reason: rewrite_reason(f.reason.as_str()).into(),
                    });
                    let _ = client_tx.send(AxumMsg::Close(close)).await;
                    return;
                }
                Ok(UpMsg::Frame(_)) => continue,
                Err(_) => {
                    let _ = client_tx
                        .send(AxumMsg::Close(Some(AxumClose {
                            code: 1011,
                            reason: "upstream error".into(),
                        })))
                        .await;
                    return;
                }
            };
            if client_tx.send(msg).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = to_upstream => {},
        () = to_client => {},
    }
}

// ----- the access gateway -----

/// `GET /kilo-access-gateway` query.
#[derive(Debug, Deserialize)]
pub struct AccessQuery {
    instance: Uuid,
    user: Uuid,
    #[serde(default)]
    code: String,
}

/// `POST /kilo-access-gateway` form.
#[derive(Debug, Deserialize)]
pub struct AccessForm {
    instance: Uuid,
    user: Uuid,
    code: String,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn form_page(q: &AccessQuery, error: Option<&str>) -> Html<String> {
    let error = error
        .map(|e| format!("<p class=\"error\">{}</p>", escape(e)))
        .unwrap_or_default();
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>KiloClaw access</title>\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <style>body{{font-family:system-ui,sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem}}\
         input{{font-size:1.4rem;letter-spacing:.15em;width:100%;padding:.4rem}}\
         button{{font-size:1.1rem;margin-top:1rem;padding:.4rem 1.2rem}}.error{{color:#b00}}</style>\
         </head><body><h1>Open your assistant</h1>\
         <p>Enter the access code from <code>kilocloud claw open</code> (valid 10 minutes, once).</p>{error}\
         <form method=\"post\" action=\"/kilo-access-gateway\">\
         <input type=\"hidden\" name=\"instance\" value=\"{}\"><input type=\"hidden\" name=\"user\" value=\"{}\">\
         <input name=\"code\" value=\"{}\" placeholder=\"XXXXX-XXXXX\" autocomplete=\"one-time-code\" autofocus>\
         <button type=\"submit\">Open</button></form></body></html>",
        q.instance,
        q.user,
        escape(&q.code)
    ))
}

/// `GET /kilo-access-gateway`: with a valid access cookie for that user, straight to the
/// instance; otherwise the code form (never redeems: link previews must not burn codes).
async fn access_form(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<AccessQuery>,
) -> Response {
    if let Ok(claw) = claw(&s)
        && let Some(token) = cookie(&headers, ACCESS_COOKIE)
        && let Ok(p) = s.identity.authenticate_jwt(&token).await
        && p.user == q.user
        && let Ok(found) = claw.find_for_user(q.user, q.instance).await
    {
        return open_instance(claw, &found).into_response();
    }
    form_page(&q, None).into_response()
}

fn open_instance(claw: &Claw, found: &InstanceRef) -> Response {
    let token = claw.gateway_token(&found.row.sandbox_id);
    let target = format!("/i/{}/#token={token}", found.row.id);
    // A page, not a 302: the fragment must survive, and the token stays out of Location logs.
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Opening…</title></head>\
         <body><p>Opening your assistant…</p><script>location.replace({});</script></body></html>",
        serde_json::to_string(&target).unwrap_or_default()
    ))
    .into_response()
}

/// `POST /kilo-access-gateway`: redeems an access code (form `instance`, `user`, `code`), sets
/// the access cookie and opens the instance; 401 with the form again on failure. A
/// cross-site form post is refused (403; login CSRF: another site must not sign a browser in
/// as someone else), and wrong codes count against the per-address authentication failure
/// limit (then 429).
async fn access_redeem(
    State(s): State<AppState>,
    parts: Parts,
    Form(f): Form<AccessForm>,
) -> Response {
    let q = AccessQuery {
        instance: f.instance,
        user: f.user,
        code: String::new(),
    };
    if is_cross_site(&parts.headers) {
        return (
            StatusCode::FORBIDDEN,
            form_page(&q, Some("Open this page from this site to sign in.")),
        )
            .into_response();
    }
    let claw = match claw(&s) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let by = kilocloud_identity::model::Initiator {
        user: f.user,
        request_id: None,
    };
    let redeemed = limited_webhook(&parts, &s, async {
        let wrong = || {
            ApiError::unauthorized(
                "That code is wrong, used or expired. Run `kilocloud claw open` for a new one.",
            )
        };
        let found = claw
            .find_for_user(f.user, f.instance)
            .await
            .map_err(|_| wrong())?;
        let jwt = claw
            .redeem_access_code(f.user, &f.code, &by)
            .await
            .map_err(|_| wrong())?;
        Ok((found, jwt))
    })
    .await;
    match redeemed {
        Ok((found, jwt)) => {
            let secure = if s.claw_cookie_secure { "; Secure" } else { "" };
            let cookie = format!(
                "{ACCESS_COOKIE}={jwt}; Max-Age={ACCESS_COOKIE_TTL_S}; Path=/; HttpOnly; SameSite=Lax{secure}"
            );
            let mut response = open_instance(claw, &found);
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            (StatusCode::UNAUTHORIZED, form_page(&q, Some(&e.message))).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Whether a browser says the request comes from another site: `Sec-Fetch-Site: cross-site`,
/// or an `Origin` whose host is not the request's `Host`. Clients that send neither (curl,
/// the CLI) are not refused.
fn is_cross_site(headers: &HeaderMap) -> bool {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if text(HeaderName::from_static("sec-fetch-site")) == Some("cross-site") {
        return true;
    }
    match (text(header::ORIGIN), text(header::HOST)) {
        (Some(origin), Some(host)) => {
            let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            !origin_host.eq_ignore_ascii_case(host)
        }
        (Some(_), None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_token_errors_are_rewritten() {
        let t = rewrite_text(r#"{"type":"error","error":{"message":"gateway token mismatch"}}"#);
        assert!(t.contains(RECONNECT_MESSAGE), "{t}");
        let plain = r#"{"type":"reply","text":"gateway token mismatch is a phrase"}"#;
        assert_eq!(rewrite_text(plain), plain);
        assert_eq!(rewrite_reason("Gateway token missing"), RECONNECT_MESSAGE);
        assert_eq!(rewrite_reason(&"é".repeat(100)).len(), 122);
    }

    #[test]
    fn credentials_and_hop_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        h.insert(
            header::COOKIE,
            "a=1; kiloclaw-auth=jwt; b=2".parse().unwrap(),
        );
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        let out = forwarded_headers(&h, Proof::Bearer);
        assert!(
            out.get(header::AUTHORIZATION).is_none(),
            "the caller's JWT stays here"
        );
        let from_cookie = forwarded_headers(&h, Proof::Cookie);
        assert_eq!(
            from_cookie.get(header::AUTHORIZATION).unwrap(),
            "Bearer x",
            "the runtime's own token is relayed"
        );
        assert!(out.get("x-private").is_none());
        assert_eq!(out.get(header::COOKIE).unwrap(), "a=1; b=2");
        assert_eq!(out.get("x-kept").unwrap(), "1");
    }

    #[test]
    fn verified_callers_are_kept_one_second_and_never_past_expiry() {
        let cache = VerifiedCache::default();
        let found = InstanceRef {
            key: "k".into(),
            row: kilocloud_claw::registry::InstanceRow {
                id: Uuid::nil(),
                owner: "user".into(),
                user_id: Uuid::nil(),
                org_id: None,
                sandbox_id: "ki_0".into(),
                name: "n".into(),
                created_at: 0,
                destroyed_at: None,
            },
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer a.b.c".parse().unwrap());
        let key = VerifiedCache::key(&headers, &Target::Instance("i".into()));
        cache.put(
            key.clone(),
            Verified {
                at_ms: 10_000,
                expires_at_ms: Some(10_500),
                proof: Proof::Bearer,
                found: found.clone(),
            },
        );
        assert_eq!(
            cache.get(&key, 10_499),
            Some((Proof::Bearer, found.clone()))
        );
        assert_eq!(cache.get(&key, 10_500), None, "the token expired");
        let other = VerifiedCache::key(&headers, &Target::Legacy);
        assert_eq!(cache.get(&other, 10_001), None, "another target");
        cache.put(
            key.clone(),
            Verified {
                at_ms: 20_000,
                expires_at_ms: None,
                proof: Proof::Bearer,
                found: found.clone(),
            },
        );
        assert!(cache.get(&key, 20_999).is_some());
        assert_eq!(
            cache.get(&key, 21_000),
            None,
            "verified again after a second"
        );
        headers.insert(header::AUTHORIZATION, "Bearer d.e.f".parse().unwrap());
        let changed = VerifiedCache::key(&headers, &Target::Instance("i".into()));
        assert_eq!(cache.get(&changed, 20_001), None, "another credential");
    }

    #[test]
    fn cross_site_form_posts_are_recognised() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        assert!(!is_cross_site(&headers(&[])), "curl and the CLI");
        assert!(!is_cross_site(&headers(&[
            ("origin", "https://claw.example.com"),
            ("host", "claw.example.com"),
        ])));
        assert!(is_cross_site(&headers(&[
            ("origin", "https://evil.example"),
            ("host", "claw.example.com"),
        ])));
        assert!(is_cross_site(&headers(&[("sec-fetch-site", "cross-site")])));
    }

    #[test]
    fn the_upstream_path_keeps_its_encoding() {
        let instance = Target::Instance("abc".into());
        let uri = |u: &str| u.parse::<http::Uri>().unwrap();
        assert_eq!(
            instance.upstream_path(&uri("/i/abc/a%20b/c%3Fd?x=1")),
            "/a%20b/c%3Fd?x=1"
        );
        assert_eq!(instance.upstream_path(&uri("/i/abc/")), "/");
        assert_eq!(Target::Legacy.upstream_path(&uri("/claw")), "/");
        assert_eq!(Target::Legacy.upstream_path(&uri("/claw/x%2Fy")), "/x%2Fy");
    }

    #[test]
    fn a_runtime_cannot_set_the_access_cookie() {
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            format!("{ACCESS_COOKIE}=stolen; Path=/").parse().unwrap(),
        );
        h.append(header::SET_COOKIE, "session=1; Path=/i/x/".parse().unwrap());
        drop_access_cookie(&mut h);
        let left: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(left, ["session=1; Path=/i/x/"]);
    }

    #[test]
    fn our_credentials_never_reach_the_runtime() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer a.b.c".parse().unwrap());
        assert!(
            forwarded_headers(&h, Proof::Cookie)
                .get(header::AUTHORIZATION)
                .is_none()
        );
        h.insert(header::AUTHORIZATION, "Bearer kc_abc".parse().unwrap());
        assert!(
            forwarded_headers(&h, Proof::Cookie)
                .get(header::AUTHORIZATION)
                .is_none()
        );
        h.insert(header::AUTHORIZATION, "Bearer 0123abcd".parse().unwrap());
        assert!(
            forwarded_headers(&h, Proof::Cookie)
                .get(header::AUTHORIZATION)
                .is_some()
        );
    }
}
