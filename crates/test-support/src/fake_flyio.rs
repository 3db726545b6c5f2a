//! A fake Fly Machines REST API (the documented `api.machines.dev` protocol) on a real loopback
//! socket, with fault injection.
//!
//! Every request must carry `Authorization: Bearer <token>` (the token given to
//! [`FakeFly::start`]), else 401. Errors are Fly's JSON `{"error": "<message>"}`; unknown
//! routes answer 404.
//!
//! Endpoints, all under `/v1/apps`: apps (create, get, delete) and IP assignments; secrets
//! (write, delete, list: names and digests, never values) with an app-wide version;
//! machines (create, get, update, start, stop, delete, wait, list filtered by
//! `metadata.<key>=<value>`, exec); volumes (create, fork, get, list, delete, snapshots).
//! Mounting a volume attaches it to the machine; a volume is mounted by one machine at a time.
//! Requests are recorded for assertions; [`FakeFly::set_failure_rate`],
//! [`FakeFly::set_lost_reply_rate`], [`FakeFly::fail_next`],
//! [`FakeFly::set_region_exhausted`] and [`FakeFly::set_latency`] inject faults.
//!
//! Deliberate deviations from Fly, for deterministic tests:
//! - `GET .../wait` never blocks: it answers 200 when the machine is already in the state, else
//!   408 `deadline_exceeded` at once (the `timeout` is only validated, at most 60 s). An
//!   `instance_id` other than the machine's current one never satisfies the wait (except
//!   `destroyed` once the machine is gone).
//! - Machines change state instantly (no `starting`/`stopping`); a destroyed machine is gone at
//!   once (404), as is one [`FakeFly::set_machine_state`] sets to `destroyed`.
//! - A machine created without a region lands in `iad`; machine names are not unique.
//! - Secret digests are FNV-1a hashes, not Fly's; `exec`'s `cmd` string is split on
//!   whitespace; `exec` answers the reply set by [`FakeFly::set_exec_reply`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

/// The 412 body Fly answers when a region has no capacity left.
pub const CAPACITY_ERROR: &str = "insufficient resources available to fulfill request";

/// Region of a machine created without one.
pub const DEFAULT_REGION: &str = "iad";

/// Longest `timeout` (seconds) `GET .../wait` accepts.
const MAX_WAIT_SECS: u64 = 60;

/// A request the fake received. The Authorization header is never kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query string (empty when none).
    pub query: String,
    /// The status the client saw (an injected fault's, when one applied).
    pub status: u16,
}

/// A command run through `POST .../machines/{id}/exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedExec {
    /// The app.
    pub app: String,
    /// The machine.
    pub machine_id: String,
    /// The command: `command` as sent, or `cmd` split on whitespace.
    pub command: Vec<String>,
}

struct Machine {
    id: String,
    name: String,
    state: String,
    region: String,
    instance_id: String,
    private_ip: String,
    config: Value,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl Machine {
    fn json(&self) -> Value {
        json!({
            "id": self.id, "name": self.name, "state": self.state, "region": self.region,
            "instance_id": self.instance_id, "private_ip": self.private_ip,
            "config": self.config, "image_ref": {},
            "created_at": rfc3339(self.created_at), "updated_at": rfc3339(self.updated_at),
            "events": [],
        })
    }

    /// Whether `DELETE` without `force=true` refuses it.
    fn active(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "stopped" | "created" | "suspended" | "failed"
        )
    }

    fn set_state(&mut self, state: &str) {
        self.state = state.to_owned();
        self.updated_at = Utc::now();
    }
}

struct Volume {
    id: String,
    name: String,
    region: String,
    size_gb: u64,
    attached_machine_id: Option<String>,
    created_at: DateTime<Utc>,
    forked_from: Option<String>,
    snapshots: Vec<Value>,
}

impl Volume {
    fn json(&self, state: &str) -> Value {
        json!({
            "id": self.id, "name": self.name, "region": self.region, "size_gb": self.size_gb,
            "state": state, "attached_machine_id": self.attached_machine_id,
            "created_at": rfc3339(self.created_at),
        })
    }
}

struct App {
    org: String,
    /// In creation order.
    machines: Vec<Machine>,
    /// In creation order.
    volumes: Vec<Volume>,
    secrets: BTreeMap<String, String>,
    secrets_version: u64,
    /// IP type (`v6`, `shared_v4`) to address.
    ips: BTreeMap<String, String>,
}

impl App {
    fn new(org: &str) -> Self {
        Self {
            org: org.to_owned(),
            machines: Vec::new(),
            volumes: Vec::new(),
            secrets: BTreeMap::new(),
            secrets_version: 0,
            ips: BTreeMap::new(),
        }
    }

    fn machine(&mut self, id: &str) -> Result<&mut Machine, Reply> {
        self.machines
            .iter_mut()
            .find(|m| m.id == id)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, "machine not found"))
    }

    fn volume(&mut self, id: &str) -> Result<&mut Volume, Reply> {
        self.volumes
            .iter_mut()
            .find(|v| v.id == id)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, "volume not found"))
    }

    /// Detaches every volume `machine_id` mounts.
    fn detach(&mut self, machine_id: &str) {
        for v in &mut self.volumes {
            if v.attached_machine_id.as_deref() == Some(machine_id) {
                v.attached_machine_id = None;
            }
        }
    }

    fn attach(&mut self, volume_id: &str, machine_id: &str) {
        if let Some(v) = self.volumes.iter_mut().find(|v| v.id == volume_id) {
            v.attached_machine_id = Some(machine_id.to_owned());
        }
    }

    /// Removes machine `id` and detaches its volume; whether it existed.
    fn remove_machine(&mut self, id: &str) -> bool {
        let before = self.machines.len();
        self.machines.retain(|m| m.id != id);
        self.detach(id);
        self.machines.len() != before
    }

    /// The volume `config.mounts` references (at most one), checked for a machine in `region`;
    /// `machine_id`: the machine being updated, which may keep its own volume.
    fn mount(
        &self,
        config: &Value,
        region: &str,
        machine_id: Option<&str>,
    ) -> Result<Option<String>, Reply> {
        let mounts = match config.get("mounts") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(m)) => m,
            Some(_) => return Err(bad_request("config.mounts must be an array")),
        };
        let ids: Vec<&str> = mounts
            .iter()
            .filter_map(|m| m.get("volume")?.as_str())
            .collect();
        let id = match ids.as_slice() {
            [] => return Ok(None),
            [id] => *id,
            _ => return Err(bad_request("a machine can mount at most one volume")),
        };
        let Some(v) = self.volumes.iter().find(|v| v.id == id) else {
            return Err(bad_request(&format!("volume {id} not found")));
        };
        if v.region != region {
            return Err(bad_request(&format!(
                "volume {id} is in region {}, not {region}",
                v.region
            )));
        }
        match &v.attached_machine_id {
            Some(other) if Some(other.as_str()) != machine_id => Err(error(
                StatusCode::CONFLICT,
                "volume is attached to another machine",
            )),
            _ => Ok(Some(id.to_owned())),
        }
    }
}

struct Fault {
    path_contains: String,
    method: String,
    remaining: usize,
    status: u16,
    body: String,
}

/// A fault drawn with probability `rate` from a seeded generator.
struct Chance {
    rate: f64,
    rng: StdRng,
}

fn draw(chance: &mut Option<Chance>) -> bool {
    chance
        .as_mut()
        .is_some_and(|c| c.rng.random::<f64>() < c.rate)
}

struct Inner {
    apps: BTreeMap<String, App>,
    requests: Vec<RecordedRequest>,
    execs: Vec<RecordedExec>,
    exec_reply: (String, i64),
    faults: Vec<Fault>,
    failure: Option<Chance>,
    lost_reply: Option<Chance>,
    exhausted: BTreeSet<String>,
    latency: Duration,
    last_ip: u64,
}

struct FakeState {
    token: String,
    inner: Mutex<Inner>,
}

impl FakeState {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("lock")
    }
}

/// The running fake; stops when dropped.
pub struct FakeFly {
    base_url: String,
    state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeFly {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeFly {
    /// Starts the API on a free loopback port; requests must carry `Bearer <token>`.
    pub async fn start(token: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let state = Arc::new(FakeState {
            token: token.to_owned(),
            inner: Mutex::new(Inner {
                apps: BTreeMap::new(),
                requests: Vec::new(),
                execs: Vec::new(),
                exec_reply: (String::new(), 0),
                faults: Vec::new(),
                failure: None,
                lost_reply: None,
                exhausted: BTreeSet::new(),
                latency: Duration::ZERO,
                last_ip: 0,
            }),
        });
        let app = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base_url: format!("http://{addr}"),
            state,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`, the base URL clients configure (like `https://api.machines.dev`).
    pub fn url(&self) -> String {
        self.base_url.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock()
    }

    /// Each request (after authentication) fails with 503 `injected failure`, without effect,
    /// with probability `rate`, drawn from a generator seeded with `seed`: the same requests in
    /// the same order fail the same way. A `rate` of 0 turns it off.
    pub fn set_failure_rate(&self, rate: f64, seed: u64) {
        self.lock().failure = (rate > 0.0).then(|| Chance {
            rate,
            rng: StdRng::seed_from_u64(seed),
        });
    }

    /// Like [`FakeFly::set_failure_rate`], but the request takes effect and only its reply is
    /// lost: the client sees 503 `injected failure`.
    pub fn set_lost_reply_rate(&self, rate: f64, seed: u64) {
        self.lock().lost_reply = (rate > 0.0).then(|| Chance {
            rate,
            rng: StdRng::seed_from_u64(seed),
        });
    }

    /// The next `count` requests whose path contains `path_contains` and whose method is
    /// `method` (any method when empty) answer `status` with `body`, without effect.
    pub fn fail_next(
        &self,
        path_contains: &str,
        method: &str,
        count: usize,
        status: u16,
        body: &str,
    ) {
        self.lock().faults.push(Fault {
            path_contains: path_contains.to_owned(),
            method: method.to_ascii_uppercase(),
            remaining: count,
            status,
            body: body.to_owned(),
        });
    }

    /// Marks `region` out of capacity (or not): creating machines and volumes there answers
    /// 412 with [`CAPACITY_ERROR`].
    pub fn set_region_exhausted(&self, region: &str, exhausted: bool) {
        let mut inner = self.lock();
        if exhausted {
            inner.exhausted.insert(region.to_owned());
        } else {
            inner.exhausted.remove(region);
        }
    }

    /// Delays every response by `d` (a real sleep, default zero; for benchmarks).
    pub fn set_latency(&self, d: Duration) {
        self.lock().latency = d;
    }

    /// What `exec` answers from now on: `stdout`, empty stderr and `exit_code`.
    pub fn set_exec_reply(&self, stdout: &str, exit_code: i64) {
        self.lock().exec_reply = (stdout.to_owned(), exit_code);
    }

    /// Sets a machine's state behind the client's back (a crash: `stopped`); `destroyed`
    /// removes it and detaches its volume. No-op for an unknown machine.
    pub fn set_machine_state(&self, app: &str, machine_id: &str, state: &str) {
        let mut inner = self.lock();
        let Some(app) = inner.apps.get_mut(app) else {
            return;
        };
        if state == "destroyed" {
            app.remove_machine(machine_id);
        } else if let Ok(m) = app.machine(machine_id) {
            m.set_state(state);
        }
    }

    /// Sets a machine's `updated_at`.
    pub fn set_machine_updated_at(&self, app: &str, machine_id: &str, at: DateTime<Utc>) {
        if let Some(m) = self
            .lock()
            .apps
            .get_mut(app)
            .and_then(|a| a.machine(machine_id).ok())
        {
            m.updated_at = at;
        }
    }

    /// Loses machine `id` (later requests for it answer 404); its volume is detached.
    pub fn remove_machine(&self, app: &str, id: &str) {
        if let Some(a) = self.lock().apps.get_mut(app) {
            a.remove_machine(id);
        }
    }

    /// Loses volume `id` (later requests for it answer 404).
    pub fn remove_volume(&self, app: &str, id: &str) {
        if let Some(a) = self.lock().apps.get_mut(app) {
            a.volumes.retain(|v| v.id != id);
        }
    }

    /// Seeds a machine in `state` whose `config.metadata` is `metadata` and which mounts
    /// `volume_id` at `/root` (the volume must exist in the app; it becomes attached).
    /// Creates the app (organization `personal`) if needed. Returns the machine's id.
    pub fn insert_machine(
        &self,
        app: &str,
        name: &str,
        region: &str,
        metadata: &[(&str, &str)],
        state: &str,
        volume_id: Option<&str>,
    ) -> String {
        let mut inner = self.lock();
        let ip = inner.next_ip();
        let app = inner
            .apps
            .entry(app.to_owned())
            .or_insert_with(|| App::new("personal"));
        let metadata: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect();
        let mut config = json!({"metadata": metadata});
        if let Some(vol) = volume_id {
            assert!(
                app.volumes.iter().any(|v| v.id == vol),
                "insert_machine: no volume {vol} in the app"
            );
            config["mounts"] = json!([{"volume": vol, "path": "/root"}]);
        }
        let machine = new_machine(name, region, state, config, ip);
        let id = machine.id.clone();
        if let Some(vol) = volume_id {
            app.attach(vol, &id);
        }
        app.machines.push(machine);
        id
    }

    /// Sets what `GET .../volumes/{id}/snapshots` answers (default `[]`).
    pub fn set_volume_snapshots(&self, app: &str, volume_id: &str, snapshots: Vec<Value>) {
        if let Some(v) = self
            .lock()
            .apps
            .get_mut(app)
            .and_then(|a| a.volume(volume_id).ok())
        {
            v.snapshots = snapshots;
        }
    }

    /// The apps, by name.
    pub fn apps(&self) -> Vec<String> {
        self.lock().apps.keys().cloned().collect()
    }

    /// The machines of `app` as the API answers them, in creation order.
    pub fn machines(&self, app: &str) -> Vec<Value> {
        self.lock()
            .apps
            .get(app)
            .map(|a| a.machines.iter().map(Machine::json).collect())
            .unwrap_or_default()
    }

    /// The volumes of `app` as the API answers them, in creation order.
    pub fn volumes(&self, app: &str) -> Vec<Value> {
        self.lock()
            .apps
            .get(app)
            .map(|a| a.volumes.iter().map(|v| v.json("created")).collect())
            .unwrap_or_default()
    }

    /// How many machines exist, across apps.
    pub fn machine_count(&self) -> usize {
        self.lock().apps.values().map(|a| a.machines.len()).sum()
    }

    /// How many volumes exist, across apps.
    pub fn volume_count(&self) -> usize {
        self.lock().apps.values().map(|a| a.volumes.len()).sum()
    }

    /// The value of secret `name` of `app`, if set.
    pub fn secret(&self, app: &str, name: &str) -> Option<String> {
        self.lock().apps.get(app)?.secrets.get(name).cloned()
    }

    /// The volume `volume_id` was forked from (`source_volume_id`), if any.
    pub fn forked_from(&self, app: &str, volume_id: &str) -> Option<String> {
        let inner = self.lock();
        let app = inner.apps.get(app)?;
        app.volumes
            .iter()
            .find(|v| v.id == volume_id)?
            .forked_from
            .clone()
    }

    /// Every request received so far, faulted and unauthorized ones included.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// The commands run through `exec`, in order.
    pub fn execs(&self) -> Vec<RecordedExec> {
        self.lock().execs.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Serving

/// A status and a JSON body (empty for 202 on app deletion).
struct Reply {
    status: StatusCode,
    body: String,
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let empty = self.body.is_empty();
        let mut response = (self.status, self.body).into_response();
        let headers = response.headers_mut();
        if empty {
            headers.remove(header::CONTENT_TYPE);
        } else {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        response
    }
}

type Answer = Result<Reply, Reply>;

fn reply(status: StatusCode, body: Value) -> Reply {
    Reply {
        status,
        body: body.to_string(),
    }
}

fn ok(body: Value) -> Answer {
    Ok(reply(StatusCode::OK, body))
}

fn error(status: StatusCode, message: &str) -> Reply {
    reply(status, json!({"error": message}))
}

fn bad_request(message: &str) -> Reply {
    error(StatusCode::BAD_REQUEST, message)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn random_chars(alphabet: &[u8], n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
        .collect()
}

/// A ULID-like instance id: 10 Crockford base-32 characters of milliseconds, 16 random.
fn instance_id() -> String {
    const CROCKFORD: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let ms = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
    let time: String = (0..10)
        .rev()
        .map(|i| char::from(CROCKFORD[((ms >> (i * 5)) & 31) as usize]))
        .collect();
    time + &random_chars(CROCKFORD, 16)
}

fn new_machine(name: &str, region: &str, state: &str, config: Value, ip: u64) -> Machine {
    let now = Utc::now();
    Machine {
        id: random_chars(b"0123456789abcdef", 14),
        name: name.to_owned(),
        state: state.to_owned(),
        region: region.to_owned(),
        instance_id: instance_id(),
        private_ip: format!("fdaa:0:1:a7b:{:x}:{:x}::2", ip >> 16, ip & 0xffff),
        config,
        created_at: now,
        updated_at: now,
    }
}

/// FNV-1a, as a stand-in for Fly's secret digest.
fn digest(value: &str) -> String {
    let hash = value.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The request body as JSON (`{}` when empty); 400 when it is not JSON.
fn parse(body: &Bytes) -> Result<Value, Reply> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|_| bad_request("invalid JSON body"))
}

fn str_field<'a>(body: &'a Value, key: &str) -> Option<&'a str> {
    body.get(key)?.as_str().filter(|s| !s.is_empty())
}

/// `min_secrets_version`, when set, must not exceed the app's secrets version.
fn check_secrets_version(app: &App, body: &Value) -> Result<(), Reply> {
    match body.get("min_secrets_version").and_then(Value::as_u64) {
        Some(min) if min > app.secrets_version => Err(bad_request("min_secrets_version not met")),
        _ => Ok(()),
    }
}

/// The machine `config` of a create or update body: an object whose `metadata`, if any, maps
/// strings to strings.
fn machine_config(body: &Value) -> Result<Value, Reply> {
    let config = body
        .get("config")
        .filter(|c| c.is_object())
        .ok_or_else(|| bad_request("config is required"))?;
    match config.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) if m.values().all(Value::is_string) => {}
        Some(_) => return Err(bad_request("config.metadata must map strings to strings")),
    }
    Ok(config.clone())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Every request: authentication, faults, the endpoint, recording, latency.
async fn handle(State(state): State<Arc<FakeState>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let authorized = bearer(request.headers()) == Some(state.token.as_str());
    let body = axum::body::to_bytes(request.into_body(), 16 << 20).await;
    let (reply, latency) = {
        let mut inner = state.lock();
        let reply = match body {
            Ok(body) if authorized => inner.serve(&method, &path, &query, &body),
            Ok(_) => error(StatusCode::UNAUTHORIZED, "unauthorized"),
            Err(_) => bad_request("unreadable body"),
        };
        inner.requests.push(RecordedRequest {
            method: method.to_string(),
            path,
            query,
            status: reply.status.as_u16(),
        });
        (reply, inner.latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    reply.into_response()
}

impl Inner {
    fn next_ip(&mut self) -> u64 {
        self.last_ip += 1;
        self.last_ip
    }

    /// An authorized request, with faults applied.
    fn serve(&mut self, method: &Method, path: &str, query: &str, body: &Bytes) -> Reply {
        let fault = self.faults.iter_mut().find(|f| {
            f.remaining > 0
                && path.contains(&f.path_contains)
                && (f.method.is_empty() || f.method == method.as_str())
        });
        if let Some(f) = fault {
            f.remaining -= 1;
            let status =
                StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = f.body.clone();
            self.faults.retain(|f| f.remaining > 0);
            return Reply { status, body };
        }
        if draw(&mut self.failure) {
            return error(StatusCode::SERVICE_UNAVAILABLE, "injected failure");
        }
        let lost = draw(&mut self.lost_reply);
        let query: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        let reply = self
            .dispatch(method.as_str(), &segments, &query, body)
            .unwrap_or_else(|e| e);
        if lost {
            error(StatusCode::SERVICE_UNAVAILABLE, "injected failure")
        } else {
            reply
        }
    }

    fn dispatch(
        &mut self,
        method: &str,
        segments: &[&str],
        query: &[(String, String)],
        body: &Bytes,
    ) -> Answer {
        let not_found = || error(StatusCode::NOT_FOUND, "not found");
        let (name, rest) = match segments {
            ["v1", "apps"] if method == "POST" => return self.create_app(&parse(body)?),
            ["v1", "apps", name, rest @ ..] => (*name, rest),
            _ => return Err(not_found()),
        };
        if method == "DELETE" && rest.is_empty() {
            return match self.apps.remove(name) {
                Some(_) => Ok(Reply {
                    status: StatusCode::ACCEPTED,
                    body: String::new(),
                }),
                None => Err(error(StatusCode::NOT_FOUND, "app not found")),
            };
        }
        let Inner {
            apps,
            exhausted,
            exec_reply,
            execs,
            last_ip,
            ..
        } = self;
        let mut next_ip = || {
            *last_ip += 1;
            *last_ip
        };
        let app = apps
            .get_mut(name)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, "app not found"))?;
        let has_capacity = |region: &str| {
            if exhausted.contains(region) {
                Err(error(StatusCode::PRECONDITION_FAILED, CAPACITY_ERROR))
            } else {
                Ok(())
            }
        };
        let flag = |key: &str| query.iter().any(|(k, v)| k == key && v == "true");
        match (method, rest) {
            ("GET", []) => ok(json!({
                "name": name, "organization": {"slug": app.org}, "status": "deployed",
            })),
            ("POST", ["ip_assignments"]) => {
                let body = parse(body)?;
                let kind = str_field(&body, "type").unwrap_or_default();
                let ip = next_ip();
                let address = match kind {
                    "v6" => format!("2a09:8280:1::{ip:x}"),
                    "shared_v4" => format!("66.241.{}.{}", (ip >> 8) & 0xff, ip & 0xff),
                    _ => return Err(bad_request("type must be v6 or shared_v4")),
                };
                if app.ips.contains_key(kind) {
                    return Err(error(
                        StatusCode::CONFLICT,
                        "ip of this type already assigned",
                    ));
                }
                app.ips.insert(kind.to_owned(), address.clone());
                ok(json!({"ip": address, "type": kind}))
            }
            ("GET", ["secrets"]) => ok(app
                .secrets
                .iter()
                .map(|(n, v)| json!({"name": n, "digest": digest(v)}))
                .collect()),
            ("POST", ["secrets", secret]) => {
                let body = parse(body)?;
                let value = body
                    .get("value")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad_request("value is required"))?;
                app.secrets.insert((*secret).to_owned(), value.to_owned());
                app.secrets_version += 1;
                ok(json!({"version": app.secrets_version}))
            }
            ("DELETE", ["secrets", secret]) => {
                app.secrets
                    .remove(*secret)
                    .ok_or_else(|| error(StatusCode::NOT_FOUND, "secret not found"))?;
                app.secrets_version += 1;
                ok(json!({"version": app.secrets_version}))
            }
            ("POST", ["machines"]) => {
                let body = parse(body)?;
                let config = machine_config(&body)?;
                check_secrets_version(app, &body)?;
                let region = str_field(&body, "region").unwrap_or(DEFAULT_REGION);
                has_capacity(region)?;
                let volume = app.mount(&config, region, None)?;
                let state = if body["skip_launch"] == true {
                    "created"
                } else {
                    "started"
                };
                let ip = next_ip();
                let name =
                    str_field(&body, "name").map_or_else(|| format!("machine-{ip}"), str::to_owned);
                let machine = new_machine(&name, region, state, config, ip);
                if let Some(v) = volume {
                    app.attach(&v, &machine.id);
                }
                let json = machine.json();
                app.machines.push(machine);
                ok(json)
            }
            ("GET", ["machines"]) => {
                let filters: Vec<(&str, &str)> = query
                    .iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix("metadata.")?, v.as_str())))
                    .collect();
                let region = query.iter().find(|(k, _)| k == "region").map(|(_, v)| v);
                ok(app
                    .machines
                    .iter()
                    .filter(|m| region.is_none_or(|r| *r == m.region))
                    .filter(|m| {
                        filters
                            .iter()
                            .all(|(k, v)| m.config["metadata"][*k].as_str() == Some(*v))
                    })
                    .map(Machine::json)
                    .collect())
            }
            ("GET", ["machines", id]) => ok(app.machine(id)?.json()),
            ("POST", ["machines", id]) => {
                let body = parse(body)?;
                let config = machine_config(&body)?;
                check_secrets_version(app, &body)?;
                let region = app.machine(id)?.region.clone();
                let volume = app.mount(&config, &region, Some(id))?;
                app.detach(id);
                if let Some(v) = &volume {
                    app.attach(v, id);
                }
                let m = app.machine(id)?;
                m.config = config;
                m.instance_id = instance_id();
                let state = if body["skip_launch"] == true {
                    m.state.clone()
                } else {
                    "started".to_owned()
                };
                m.set_state(&state);
                ok(m.json())
            }
            ("DELETE", ["machines", id]) => {
                if app.machine(id)?.active() && !flag("force") {
                    return Err(error(
                        StatusCode::PRECONDITION_FAILED,
                        "machine still active, refusing to delete",
                    ));
                }
                app.remove_machine(id);
                ok(json!({"ok": true}))
            }
            ("POST", ["machines", id, "start"]) => {
                let m = app.machine(id)?;
                let previous = std::mem::take(&mut m.state);
                m.set_state("started");
                ok(json!({"previous_state": previous}))
            }
            ("POST", ["machines", id, "stop"]) => {
                app.machine(id)?.set_state("stopped");
                ok(json!({"ok": true}))
            }
            ("GET", ["machines", id, "wait"]) => {
                let param = |key: &str| {
                    query
                        .iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v.as_str())
                };
                let state = param("state").unwrap_or("started");
                if !matches!(state, "started" | "stopped" | "suspended" | "destroyed") {
                    return Err(bad_request("invalid state"));
                }
                if let Some(t) = param("timeout") {
                    match t.parse::<u64>() {
                        Ok(secs) if secs <= MAX_WAIT_SECS => {}
                        _ => return Err(bad_request("timeout must be between 0 and 60 seconds")),
                    }
                }
                let m = match app.machine(id) {
                    Ok(m) => m,
                    Err(_) if state == "destroyed" => return ok(json!({"ok": true})),
                    Err(e) => return Err(e),
                };
                let same_instance = param("instance_id").is_none_or(|i| i == m.instance_id);
                if same_instance && m.state == state {
                    ok(json!({"ok": true}))
                } else {
                    Err(error(StatusCode::REQUEST_TIMEOUT, "deadline_exceeded"))
                }
            }
            ("POST", ["machines", id, "exec"]) => {
                let body = parse(body)?;
                let command: Vec<String> = match (&body["command"], &body["cmd"]) {
                    (Value::Array(argv), _) => argv
                        .iter()
                        .map(|a| a.as_str().map(str::to_owned))
                        .collect::<Option<_>>()
                        .ok_or_else(|| bad_request("command must be strings"))?,
                    (_, Value::String(cmd)) => cmd.split_whitespace().map(str::to_owned).collect(),
                    _ => return Err(bad_request("command or cmd is required")),
                };
                let m = app.machine(id)?;
                if m.state != "started" {
                    return Err(error(
                        StatusCode::PRECONDITION_FAILED,
                        "machine is not started",
                    ));
                }
                execs.push(RecordedExec {
                    app: name.to_owned(),
                    machine_id: m.id.clone(),
                    command,
                });
                ok(json!({"exit_code": exec_reply.1, "stdout": exec_reply.0, "stderr": ""}))
            }
            ("POST", ["volumes"]) => {
                let body = parse(body)?;
                let vol_name =
                    str_field(&body, "name").ok_or_else(|| bad_request("name is required"))?;
                let region =
                    str_field(&body, "region").ok_or_else(|| bad_request("region is required"))?;
                has_capacity(region)?;
                let source = match str_field(&body, "source_volume_id") {
                    Some(src) => Some(app.volume(src)?),
                    None => None,
                };
                let size_gb = body["size_gb"]
                    .as_u64()
                    .or(source.as_ref().map(|s| s.size_gb))
                    .unwrap_or(1);
                let volume = Volume {
                    id: format!(
                        "vol_{}",
                        random_chars(b"abcdefghijklmnopqrstuvwxyz0123456789", 16)
                    ),
                    name: vol_name.to_owned(),
                    region: region.to_owned(),
                    size_gb,
                    attached_machine_id: None,
                    created_at: Utc::now(),
                    forked_from: source.map(|s| s.id.clone()),
                    snapshots: Vec::new(),
                };
                let json = volume.json("created");
                app.volumes.push(volume);
                ok(json)
            }
            ("GET", ["volumes"]) => ok(app.volumes.iter().map(|v| v.json("created")).collect()),
            ("GET", ["volumes", id]) => ok(app.volume(id)?.json("created")),
            ("DELETE", ["volumes", id]) => {
                let v = app.volume(id)?;
                if v.attached_machine_id.is_some() {
                    return Err(error(
                        StatusCode::PRECONDITION_FAILED,
                        "volume is attached to a machine",
                    ));
                }
                let json = v.json("destroyed");
                app.volumes.retain(|v| v.id != *id);
                ok(json)
            }
            ("GET", ["volumes", id, "snapshots"]) => {
                ok(Value::Array(app.volume(id)?.snapshots.clone()))
            }
            _ => Err(not_found()),
        }
    }

    fn create_app(&mut self, body: &Value) -> Answer {
        let name =
            str_field(body, "app_name").ok_or_else(|| bad_request("app_name is required"))?;
        if self.apps.contains_key(name) {
            return Err(error(StatusCode::CONFLICT, "app already exists"));
        }
        let org = str_field(body, "org_slug").unwrap_or("personal");
        self.apps.insert(name.to_owned(), App::new(org));
        Ok(reply(StatusCode::CREATED, json!({})))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "fly-test-token";

    /// A client of one fake with the right token.
    struct Api {
        fly: FakeFly,
        http: reqwest::Client,
    }

    impl Api {
        async fn new() -> Self {
            Self {
                fly: FakeFly::start(TOKEN).await,
                http: reqwest::Client::new(),
            }
        }

        async fn call(
            &self,
            method: reqwest::Method,
            path: &str,
            body: Option<Value>,
        ) -> (u16, Value) {
            let mut req = self
                .http
                .request(method, format!("{}{path}", self.fly.url()))
                .bearer_auth(TOKEN);
            if let Some(body) = body {
                req = req.json(&body);
            }
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let text = res.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        }

        async fn get(&self, path: &str) -> (u16, Value) {
            self.call(reqwest::Method::GET, path, None).await
        }

        async fn post(&self, path: &str, body: Value) -> (u16, Value) {
            self.call(reqwest::Method::POST, path, Some(body)).await
        }

        async fn delete(&self, path: &str) -> (u16, Value) {
            self.call(reqwest::Method::DELETE, path, None).await
        }

        async fn create_app(&self, name: &str) {
            let body = json!({"app_name": name, "org_slug": "acme", "network": "n1"});
            assert_eq!(self.post("/v1/apps", body).await.0, 201);
        }
    }

    fn machine_body(name: &str, region: &str, metadata: Value) -> Value {
        json!({"name": name, "region": region,
            "config": {"image": "registry.fly.io/kilo:1", "metadata": metadata}})
    }

    #[tokio::test]
    async fn requests_need_the_token() {
        let api = Api::new().await;
        let url = format!("{}/v1/apps/a", api.fly.url());
        let res = api.http.get(&url).send().await.unwrap();
        assert_eq!(res.status(), 401);
        let v: Value = res.json().await.unwrap();
        assert_eq!(v, json!({"error": "unauthorized"}));
        let res = api
            .http
            .get(&url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
        assert_eq!(
            api.get("/v1/apps/a").await,
            (404, json!({"error": "app not found"}))
        );
        assert_eq!(api.get("/v2/whatever").await.0, 404);
        let statuses: Vec<u16> = api.fly.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [401, 401, 404, 404]);
    }

    #[tokio::test]
    async fn machine_lifecycle_with_a_volume() {
        let api = Api::new().await;
        api.create_app("kilo").await;
        let dup = json!({"app_name": "kilo", "org_slug": "acme"});
        assert_eq!(
            api.post("/v1/apps", dup).await,
            (409, json!({"error": "app already exists"}))
        );
        let (status, app) = api.get("/v1/apps/kilo").await;
        assert_eq!(
            (status, app["organization"]["slug"].as_str()),
            (200, Some("acme"))
        );

        let (status, vol) = api
            .post(
                "/v1/apps/kilo/volumes",
                json!({"name": "data", "size_gb": 3, "region": "cdg"}),
            )
            .await;
        assert_eq!((status, vol["state"].as_str()), (200, Some("created")));
        let vol_id = vol["id"].as_str().unwrap().to_owned();
        assert!(vol_id.starts_with("vol_") && vol_id.len() == 20, "{vol_id}");
        let mut body = machine_body("m1", "cdg", json!({"kilo_user": "u1"}));
        body["config"]["mounts"] = json!([{"volume": vol_id, "path": "/data"}]);
        let mut elsewhere = body.clone();
        elsewhere["region"] = json!("ord");
        assert_eq!(api.post("/v1/apps/kilo/machines", elsewhere).await.0, 400);

        let (status, m) = api.post("/v1/apps/kilo/machines", body.clone()).await;
        assert_eq!((status, m["state"].as_str()), (200, Some("started")));
        let id = m["id"].as_str().unwrap().to_owned();
        assert!(
            id.len() == 14
                && id
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(m["instance_id"].as_str().unwrap().len(), 26);
        assert_eq!(m["config"]["metadata"]["kilo_user"], "u1");
        let (_, v) = api.get(&format!("/v1/apps/kilo/volumes/{vol_id}")).await;
        assert_eq!(v["attached_machine_id"], json!(id));
        let (status, v) = api.post("/v1/apps/kilo/machines", body).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (409, Some("volume is attached to another machine"))
        );
        let (status, v) = api.delete(&format!("/v1/apps/kilo/volumes/{vol_id}")).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (412, Some("volume is attached to a machine"))
        );

        let m_path = format!("/v1/apps/kilo/machines/{id}");
        let instance = m["instance_id"].as_str().unwrap();
        let api = &api;
        let wait = |q: String| {
            let path = format!("{m_path}/wait?{q}");
            async move { api.get(&path).await.0 }
        };
        assert_eq!(
            wait(format!("state=started&timeout=30&instance_id={instance}")).await,
            200
        );
        assert_eq!(wait("state=started&instance_id=01OTHER".into()).await, 408);
        assert_eq!(wait("state=stopped&timeout=5".into()).await, 408);
        assert_eq!(wait("state=stopped&timeout=61".into()).await, 400);
        assert_eq!(
            api.post(&format!("{m_path}/stop"), json!({})).await,
            (200, json!({"ok": true}))
        );
        assert_eq!(wait("state=stopped".into()).await, 200);
        let (_, v) = api.post(&format!("{m_path}/start"), json!({})).await;
        assert_eq!(v["previous_state"], "stopped");

        let (status, v) = api.delete(&m_path).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (412, Some("machine still active, refusing to delete"))
        );
        assert_eq!(
            api.delete(&format!("{m_path}?force=true")).await,
            (200, json!({"ok": true}))
        );
        assert_eq!(
            api.get(&m_path).await,
            (404, json!({"error": "machine not found"}))
        );
        assert_eq!(wait("state=destroyed".into()).await, 200);
        assert!(api.fly.volumes("kilo")[0]["attached_machine_id"].is_null());
        let (status, v) = api.delete(&format!("/v1/apps/kilo/volumes/{vol_id}")).await;
        assert_eq!((status, v["state"].as_str()), (200, Some("destroyed")));
        assert_eq!(api.fly.volume_count(), 0);
        assert_eq!(api.delete("/v1/apps/kilo").await.0, 202);
        assert!(api.fly.apps().is_empty());
    }

    #[tokio::test]
    async fn updates_secrets_exec_and_forks() {
        let api = Api::new().await;
        api.create_app("kilo").await;
        let secret = |v: &str| json!({"value": v});
        assert_eq!(
            api.post("/v1/apps/kilo/secrets/A", secret("1")).await.1["version"],
            1
        );
        assert_eq!(
            api.post("/v1/apps/kilo/secrets/B", secret("2")).await.1["version"],
            2
        );
        assert_eq!(api.delete("/v1/apps/kilo/secrets/B").await.1["version"], 3);
        let (_, list) = api.get("/v1/apps/kilo/secrets").await;
        assert_eq!(list.as_array().unwrap().len(), 1);
        assert!(list[0].get("value").is_none() && list[0]["digest"].is_string());
        assert_eq!(api.fly.secret("kilo", "A").as_deref(), Some("1"));

        let mut body = machine_body("m", "cdg", json!({}));
        body["min_secrets_version"] = json!(4);
        let (status, v) = api.post("/v1/apps/kilo/machines", body.clone()).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some("min_secrets_version not met"))
        );
        body["min_secrets_version"] = json!(3);
        body["skip_launch"] = json!(true);
        let (_, m) = api.post("/v1/apps/kilo/machines", body).await;
        assert_eq!(m["state"], "created");
        let m_path = format!("/v1/apps/kilo/machines/{}", m["id"].as_str().unwrap());
        let exec = json!({"command": ["echo", "hi"], "timeout": 5});
        assert_eq!(
            api.post(&format!("{m_path}/exec"), exec.clone()).await.0,
            412
        );

        let (status, fork_src) = api
            .post(
                "/v1/apps/kilo/volumes",
                json!({"name": "d", "size_gb": 2, "region": "cdg"}),
            )
            .await;
        assert_eq!(status, 200);
        let src = fork_src["id"].as_str().unwrap();
        let fork = json!({"name": "d", "region": "cdg", "source_volume_id": src});
        let (_, forked) = api.post("/v1/apps/kilo/volumes", fork).await;
        let fork_id = forked["id"].as_str().unwrap();
        assert_eq!(forked["size_gb"], 2);
        assert_eq!(api.fly.forked_from("kilo", fork_id).as_deref(), Some(src));
        let missing = json!({"name": "d", "region": "cdg", "source_volume_id": "vol_nope"});
        assert_eq!(api.post("/v1/apps/kilo/volumes", missing).await.0, 404);

        let update =
            json!({"config": {"image": "i:2", "mounts": [{"volume": fork_id, "path": "/d"}]}});
        let (status, updated) = api.post(&m_path, update).await;
        assert_eq!((status, updated["state"].as_str()), (200, Some("started")));
        assert_ne!(updated["instance_id"], m["instance_id"]);
        assert_eq!(api.fly.volumes("kilo")[1]["attached_machine_id"], m["id"]);
        api.fly.set_exec_reply("hello\n", 0);
        let (status, v) = api.post(&format!("{m_path}/exec"), exec).await;
        assert_eq!((status, v["stdout"].as_str()), (200, Some("hello\n")));
        assert_eq!(api.fly.execs()[0].command, ["echo", "hi"]);
        let ips = "/v1/apps/kilo/ip_assignments";
        assert_eq!(api.post(ips, json!({"type": "v6"})).await.0, 200);
        assert_eq!(api.post(ips, json!({"type": "v6"})).await.0, 409);
        assert_eq!(
            api.post(ips, json!({"type": "shared_v4"})).await.1["type"],
            "shared_v4"
        );
    }

    #[tokio::test]
    async fn lists_filter_on_metadata() {
        let api = Api::new().await;
        api.create_app("kilo").await;
        let a = api.fly.insert_machine(
            "kilo",
            "a",
            "cdg",
            &[("user", "u1"), ("kind", "sandbox")],
            "stopped",
            None,
        );
        api.fly.insert_machine(
            "kilo",
            "b",
            "cdg",
            &[("user", "u2"), ("kind", "sandbox")],
            "started",
            None,
        );
        let old = DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        api.fly.set_machine_updated_at("kilo", &a, old);
        let (_, all) = api
            .get("/v1/apps/kilo/machines?metadata.kind=sandbox&include_deleted=true")
            .await;
        assert_eq!(all.as_array().unwrap().len(), 2);
        let (_, one) = api
            .get("/v1/apps/kilo/machines?metadata.kind=sandbox&metadata.user=u1")
            .await;
        assert_eq!(one.as_array().unwrap().len(), 1);
        assert_eq!(
            (one[0]["id"].as_str(), one[0]["state"].as_str()),
            (Some(a.as_str()), Some("stopped"))
        );
        assert_eq!(one[0]["updated_at"], "2025-01-01T00:00:00Z");
        let (_, none) = api.get("/v1/apps/kilo/machines?metadata.user=u3").await;
        assert_eq!(none, json!([]));
        api.fly.set_machine_state("kilo", &a, "destroyed");
        assert_eq!(api.fly.machine_count(), 1);
        assert_eq!(api.get(&format!("/v1/apps/kilo/machines/{a}")).await.0, 404);
    }

    #[tokio::test]
    async fn exhausted_regions_refuse_machines_and_volumes() {
        let api = Api::new().await;
        api.create_app("kilo").await;
        api.fly.set_region_exhausted("cdg", true);
        let capacity = (412, json!({"error": CAPACITY_ERROR}));
        let m = machine_body("m", "cdg", json!({}));
        assert_eq!(
            api.post("/v1/apps/kilo/machines", m.clone()).await,
            capacity
        );
        let vol = json!({"name": "d", "size_gb": 1, "region": "cdg"});
        assert_eq!(
            api.post("/v1/apps/kilo/volumes", vol.clone()).await,
            capacity
        );
        assert_eq!(
            api.post(
                "/v1/apps/kilo/machines",
                machine_body("m", "ams", json!({}))
            )
            .await
            .0,
            200
        );
        api.fly.set_region_exhausted("cdg", false);
        assert_eq!(api.post("/v1/apps/kilo/machines", m).await.0, 200);
        assert_eq!(api.post("/v1/apps/kilo/volumes", vol).await.0, 200);
    }

    /// The statuses of 20 machine creations at a failure rate of 0.5 with seed `seed`, and how
    /// many machines exist afterwards.
    async fn faulty_creations(seed: u64) -> (Vec<u16>, usize) {
        let api = Api::new().await;
        api.create_app("kilo").await;
        api.fly.set_failure_rate(0.5, seed);
        let mut statuses = Vec::new();
        for i in 0..20 {
            let body = machine_body(&format!("m{i}"), "cdg", json!({}));
            statuses.push(api.post("/v1/apps/kilo/machines", body).await.0);
        }
        (statuses, api.fly.machine_count())
    }

    #[tokio::test]
    async fn seeded_failures_are_reproducible_and_have_no_effect() {
        let (first, count) = faulty_creations(42).await;
        let (second, _) = faulty_creations(42).await;
        assert_eq!(first, second);
        assert!(first.contains(&503) && first.contains(&200), "{first:?}");
        assert_eq!(count, first.iter().filter(|s| **s == 200).count());
    }

    #[tokio::test]
    async fn lost_replies_apply_the_change_and_fail_next_does_not() {
        let api = Api::new().await;
        api.create_app("kilo").await;
        api.fly.set_lost_reply_rate(1.0, 7);
        let (status, v) = api
            .post(
                "/v1/apps/kilo/machines",
                machine_body("m", "cdg", json!({})),
            )
            .await;
        assert_eq!((status, v), (503, json!({"error": "injected failure"})));
        assert_eq!(api.fly.machine_count(), 1);
        api.fly.set_lost_reply_rate(0.0, 0);

        api.fly
            .fail_next("/machines", "post", 2, 500, r#"{"error":"boom"}"#);
        for _ in 0..2 {
            let res = api
                .post(
                    "/v1/apps/kilo/machines",
                    machine_body("m", "cdg", json!({})),
                )
                .await;
            assert_eq!(res, (500, json!({"error": "boom"})));
        }
        assert_eq!(api.fly.machine_count(), 1);
        assert_eq!(
            api.post(
                "/v1/apps/kilo/machines",
                machine_body("m", "cdg", json!({}))
            )
            .await
            .0,
            200
        );
        let last = api.fly.requests().pop().unwrap();
        assert_eq!(
            (last.method.as_str(), last.path.as_str(), last.status),
            ("POST", "/v1/apps/kilo/machines", 200)
        );
    }
}
