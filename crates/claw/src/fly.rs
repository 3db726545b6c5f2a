//! The Fly Machines provider: [`ComputeProvider`] over the Fly Machines REST API (reference
//! kilo-cloud.md §2 "Fly Machines API calls used"), base `{api_url}/v1`, every call with
//! `Authorization: Bearer <api_token>` and JSON bodies.
//!
//! Errors: a non-2xx answer becomes a [`ProviderError`] carrying the status and the body as
//! Fly sent it (so `is_not_found` / `is_capacity` classify it); a transport failure has
//! status 0. Nothing is retried here: the instance actor decides.
//!
//! Rate limit: Fly documents 1 request/s per action per machine with a burst of 3. Every
//! machine call first waits (`until_key_ready`) on a keyed `governor` limiter whose key is
//! (action, machine id), or (action, app) for `create` and `list`, which have no machine id
//! yet; the quota is [`FlyConfig::rate_per_second`] with burst [`FlyConfig::rate_burst`].
//!
//! The proxy reaches a runtime at [`FlyConfig::app_url`] (`https://<app>.fly.dev`) with the
//! header `fly-force-instance-id: <machine id>` (reference §2 "Catch-all proxy").

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use url::Url;

use crate::provider::{
    ComputeProvider, ExecOutput, Machine, MachineSpec, Mount, ProviderError, ProviderResult,
    RUNTIME_PORT, UpstreamIo, UpstreamTarget, Volume, VolumeSpec,
};

/// Image every machine runs unless configured otherwise (reference §2: the registry app
/// `kiloclaw-machines`, tag `latest`, shared by all per-user apps).
pub const DEFAULT_IMAGE: &str = "registry.fly.io/kiloclaw-machines:latest";
/// Timeout of establishing a connection (API or runtime).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of one API request; above [`WAIT_MAX`] because `wait` holds the request open.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(75);
/// Longest `wait` Fly accepts (reference §2: the endpoint caps at 60 s).
pub const WAIT_MAX: Duration = Duration::from_secs(60);
/// Header making Fly's proxy route to one machine of an app.
pub const FORCE_INSTANCE_HEADER: &str = "fly-force-instance-id";
/// The limiter forgets idle keys once it holds more than this many.
const LIMITER_KEYS_MAX: usize = 4096;

/// Settings of the Fly provider (`claw.fly.*` in the configuration). `Debug` leaves the
/// token out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlyConfig {
    /// Machines API base URL, without `/v1`. Default `https://api.machines.dev`.
    pub api_url: String,
    /// Fly API token (reference `FLY_API_TOKEN`), sent as a Bearer token. Required.
    pub api_token: kilocloud_identity::secret::Secret,
    /// Organization apps are created in. Default `personal`.
    pub org_slug: String,
    /// Where Fly's proxy reaches an app: a URL template in which `{app}` is replaced by the
    /// app name. Default `https://{app}.fly.dev`; tests use `http://127.0.0.1:<port>`.
    pub app_url: String,
    /// Image machines run. Default [`DEFAULT_IMAGE`].
    pub image: String,
    /// Machine calls allowed per second per (action, machine). Default 1 (Fly's limit).
    pub rate_per_second: u32,
    /// Machine calls allowed at once per (action, machine). Default 3 (Fly's burst).
    pub rate_burst: u32,
}

impl Default for FlyConfig {
    fn default() -> Self {
        Self {
            api_url: "https://api.machines.dev".into(),
            api_token: kilocloud_identity::secret::Secret::default(),
            org_slug: "personal".into(),
            app_url: "https://{app}.fly.dev".into(),
            image: DEFAULT_IMAGE.into(),
            rate_per_second: 1,
            rate_burst: 3,
        }
    }
}

impl std::fmt::Debug for FlyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlyConfig")
            .field("api_url", &self.api_url)
            .field("api_token", &"<redacted>")
            .field("org_slug", &self.org_slug)
            .field("app_url", &self.app_url)
            .field("image", &self.image)
            .field("rate_per_second", &self.rate_per_second)
            .field("rate_burst", &self.rate_burst)
            .finish()
    }
}

/// Rate-limiter key: (action, machine id or app name).
type RateKey = (&'static str, String);

/// The Fly Machines provider. Cheap to clone (the HTTP client, limiter and TLS settings are
/// shared).
#[derive(Clone)]
pub struct FlyProvider {
    config: FlyConfig,
    base: Url,
    client: reqwest::Client,
    limiter: Arc<DefaultKeyedRateLimiter<RateKey>>,
    tls: Arc<ClientConfig>,
}

impl std::fmt::Debug for FlyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlyProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The limiter quota of `config`: `rate_per_second` per second, burst `rate_burst`.
fn quota(config: &FlyConfig) -> Result<Quota, String> {
    let rate = NonZeroU32::new(config.rate_per_second).ok_or("fly.rate_per_second is 0")?;
    let burst = NonZeroU32::new(config.rate_burst).ok_or("fly.rate_burst is 0")?;
    Ok(Quota::per_second(rate).allow_burst(burst))
}

/// `template` with `{app}` replaced, parsed; only `http` and `https` URLs with a host.
fn app_url(template: &str, app: &str) -> Result<Url, String> {
    let url = Url::parse(&template.replace("{app}", app)).map_err(|e| format!("app_url: {e}"))?;
    match (url.scheme(), url.host_str()) {
        ("http" | "https", Some(_)) => Ok(url),
        _ => Err(format!("app_url {url}: not an http(s) URL with a host")),
    }
}

impl FlyProvider {
    /// A provider for `config`. Errors: an empty token, an unusable `api_url` or `app_url`,
    /// or a zero rate.
    pub fn new(config: FlyConfig) -> Result<Self, String> {
        if config.api_token.expose().trim().is_empty() {
            return Err("fly.api_token is empty".into());
        }
        let mut base = Url::parse(&config.api_url).map_err(|e| format!("fly.api_url: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(format!("fly.api_url {base}: not an http(s) URL"));
        }
        base.path_segments_mut()
            .map_err(|()| "fly.api_url cannot be a base")?
            .pop_if_empty()
            .push("v1");
        app_url(&config.app_url, "app")?;
        let limiter = Arc::new(RateLimiter::keyed(quota(&config)?));
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        // The process-wide crypto provider when one is installed, else aws-lc-rs (the one
        // reqwest uses); `ClientConfig::builder()` would panic with both ring and aws-lc-rs.
        let crypto = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        let roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = ClientConfig::builder_with_provider(crypto)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = Arc::new(tls);
        Ok(Self {
            config,
            base,
            client,
            limiter,
            tls,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FlyConfig {
        &self.config
    }

    /// `{api_url}/v1/<segments...>?<query>`, percent-encoded.
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// `/apps/{app}/machines`, with `?metadata.<key>=<value>` when filtered.
    fn list_url(&self, app: &str, filter: Option<(&str, &str)>) -> Url {
        let filter = filter.map(|(key, value)| (format!("metadata.{key}"), value));
        let query: Vec<_> = filter.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        self.url(&["apps", app, "machines"], &query)
    }

    /// Waits until the limiter lets `action` on `scope` (a machine id, or the app) through.
    async fn throttle(&self, action: &'static str, scope: &str) {
        if self.limiter.len() > LIMITER_KEYS_MAX {
            self.limiter.retain_recent();
        }
        let key = (action, scope.to_string());
        self.limiter.until_key_ready(&key).await;
    }

    /// The machine config sent on create and update (reference §2 "Machine config").
    fn machine_config(&self, spec: &MachineSpec) -> Value {
        json!({
            "image": self.config.image,
            "env": spec.env,
            "guest": spec.guest,
            "services": [{
                "protocol": "tcp",
                "internal_port": RUNTIME_PORT,
                "autostart": false,
                "autostop": "off",
                "ports": [{"port": 443, "handlers": ["tls", "http"]}],
            }],
            "mounts": spec.mounts,
            "metadata": spec.metadata,
        })
    }

    /// Sends one request; the answer's body on 2xx, else the module's error rules.
    async fn request(
        &self,
        op: &str,
        method: Method,
        url: Url,
        body: Option<Value>,
        timeout: Option<Duration>,
    ) -> ProviderResult<String> {
        let mut request = self.client.request(method, url);
        request = request.bearer_auth(self.config.api_token.expose());
        if let Some(body) = &body {
            request = request.json(body);
        }
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        let transport = |e: reqwest::Error| ProviderError::new(op, 0, error_chain(&e));
        let response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let text = response.text().await;
        tracing::debug!(operation = op, status, "fly machines api");
        match text {
            Ok(text) if (200..300).contains(&status) => Ok(text),
            Err(e) if (200..300).contains(&status) => Err(transport(e)),
            text => Err(ProviderError::new(op, status, text.unwrap_or_default())),
        }
    }

    /// [`Self::request`], ignoring the answer.
    async fn send(
        &self,
        op: &str,
        method: Method,
        url: Url,
        body: Option<Value>,
    ) -> ProviderResult<()> {
        self.request(op, method, url, body, None).await.map(drop)
    }

    /// [`Self::request`] and the answer as JSON.
    async fn fetch(
        &self,
        op: &str,
        method: Method,
        url: Url,
        body: Option<Value>,
    ) -> ProviderResult<Value> {
        let text = self.request(op, method, url, body, None).await?;
        parse_json(op, &text)
    }
}

/// `e` and its sources, `: `-separated (reqwest's own message is only "error sending
/// request"), without the URL.
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    match e.url() {
        Some(url) => text.replace(&format!(" for url ({url})"), ""),
        None => text,
    }
}

/// `text` as JSON; an unparseable 2xx answer is an error with status 200.
fn parse_json(op: &str, text: &str) -> ProviderResult<Value> {
    serde_json::from_str(text)
        .map_err(|e| ProviderError::new(op, 200, format!("invalid answer ({e}): {text}")))
}

/// The string at `key` of `v`, empty when missing or not a string.
fn text_at(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

/// A Fly machine object as a [`Machine`]; missing (or null) fields are empty.
fn parse_machine(v: &Value) -> Machine {
    let config = &v["config"];
    let mounts = config["mounts"].as_array().into_iter().flatten();
    let metadata = config["metadata"].as_object().into_iter().flatten();
    Machine {
        id: text_at(v, "id"),
        state: text_at(v, "state"),
        region: text_at(v, "region"),
        instance_id: text_at(v, "instance_id"),
        mounts: mounts
            .map(|m| Mount {
                volume: text_at(m, "volume"),
                path: text_at(m, "path"),
            })
            .collect(),
        metadata: metadata
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect(),
        updated_at: text_at(v, "updated_at"),
    }
}

/// A Fly volume object as a [`Volume`]; an empty or null `attached_machine_id` is `None`.
fn parse_volume(v: &Value) -> Volume {
    Volume {
        id: text_at(v, "id"),
        name: text_at(v, "name"),
        region: text_at(v, "region"),
        state: text_at(v, "state"),
        attached_machine_id: Some(text_at(v, "attached_machine_id")).filter(|s| !s.is_empty()),
    }
}

/// The secrets version of a `set secret` answer: `version` or `Version`, a number or a
/// numeric string.
fn parse_secrets_version(v: &Value) -> Option<u64> {
    let version = v.get("version").or_else(|| v.get("Version"))?;
    version.as_u64().or_else(|| version.as_str()?.parse().ok())
}

/// `timeout` in whole seconds, at least 1 (rounded up).
fn whole_secs(timeout: Duration) -> u64 {
    timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0 || timeout.is_zero())
}

/// `min_secrets_version` added to a create/update body when the spec has one.
fn with_secrets_version(mut body: Value, spec: &MachineSpec) -> Value {
    if let Some(version) = spec.min_secrets_version {
        body["min_secrets_version"] = json!(version);
    }
    body
}

#[async_trait]
impl ComputeProvider for FlyProvider {
    fn kind(&self) -> &'static str {
        "fly"
    }

    async fn app_exists(&self, app: &str) -> ProviderResult<bool> {
        match self
            .send("get app", Method::GET, self.url(&["apps", app], &[]), None)
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn create_app(&self, app: &str) -> ProviderResult<()> {
        let body = json!({"app_name": app, "org_slug": self.config.org_slug, "network": app});
        self.send(
            "create app",
            Method::POST,
            self.url(&["apps"], &[]),
            Some(body),
        )
        .await
    }

    async fn delete_app(&self, app: &str) -> ProviderResult<()> {
        self.send(
            "delete app",
            Method::DELETE,
            self.url(&["apps", app], &[]),
            None,
        )
        .await
    }

    async fn allocate_ip(&self, app: &str, kind: &str) -> ProviderResult<()> {
        let url = self.url(&["apps", app, "ip_assignments"], &[]);
        match self
            .send(
                "allocate ip",
                Method::POST,
                url,
                Some(json!({"type": kind})),
            )
            .await
        {
            Err(e) if !matches!(e.status, 409 | 422) => Err(e),
            _ => Ok(()),
        }
    }

    async fn set_secret(&self, app: &str, name: &str, value: &str) -> ProviderResult<u64> {
        let (op, body) = ("set secret", json!({"value": value}));
        let url = self.url(&["apps", app, "secrets", name], &[]);
        let answer = self.fetch(op, Method::POST, url, Some(body)).await?;
        parse_secrets_version(&answer)
            .ok_or_else(|| ProviderError::new(op, 200, format!("no version in answer: {answer}")))
    }

    async fn create_volume(&self, app: &str, spec: &VolumeSpec) -> ProviderResult<Volume> {
        let mut body = json!({
            "name": spec.name,
            "size_gb": spec.size_gb,
            "region": spec.region,
            "compute": spec.compute,
        });
        if let Some(source) = &spec.source_volume_id {
            body["source_volume_id"] = json!(source);
        }
        let url = self.url(&["apps", app, "volumes"], &[]);
        Ok(parse_volume(
            &self
                .fetch("create volume", Method::POST, url, Some(body))
                .await?,
        ))
    }

    async fn get_volume(&self, app: &str, id: &str) -> ProviderResult<Volume> {
        let url = self.url(&["apps", app, "volumes", id], &[]);
        Ok(parse_volume(
            &self.fetch("get volume", Method::GET, url, None).await?,
        ))
    }

    async fn delete_volume(&self, app: &str, id: &str) -> ProviderResult<()> {
        let url = self.url(&["apps", app, "volumes", id], &[]);
        self.send("delete volume", Method::DELETE, url, None).await
    }

    async fn create_machine(&self, app: &str, spec: &MachineSpec) -> ProviderResult<Machine> {
        self.throttle("create", app).await;
        let config = self.machine_config(spec);
        let body = json!({"name": spec.name, "region": spec.region, "config": config});
        let body = with_secrets_version(body, spec);
        let url = self.url(&["apps", app, "machines"], &[]);
        Ok(parse_machine(
            &self
                .fetch("create machine", Method::POST, url, Some(body))
                .await?,
        ))
    }

    async fn get_machine(&self, app: &str, id: &str) -> ProviderResult<Machine> {
        self.throttle("get", id).await;
        let url = self.url(&["apps", app, "machines", id], &[]);
        Ok(parse_machine(
            &self.fetch("get machine", Method::GET, url, None).await?,
        ))
    }

    async fn update_machine(
        &self,
        app: &str,
        id: &str,
        spec: &MachineSpec,
    ) -> ProviderResult<Machine> {
        self.throttle("update", id).await;
        let body = with_secrets_version(json!({"config": self.machine_config(spec)}), spec);
        let url = self.url(&["apps", app, "machines", id], &[]);
        Ok(parse_machine(
            &self
                .fetch("update machine", Method::POST, url, Some(body))
                .await?,
        ))
    }

    async fn start_machine(&self, app: &str, id: &str) -> ProviderResult<()> {
        self.throttle("start", id).await;
        let url = self.url(&["apps", app, "machines", id, "start"], &[]);
        self.send("start machine", Method::POST, url, None).await
    }

    async fn stop_machine(&self, app: &str, id: &str) -> ProviderResult<()> {
        self.throttle("stop", id).await;
        let url = self.url(&["apps", app, "machines", id, "stop"], &[]);
        self.send("stop machine", Method::POST, url, None).await
    }

    async fn delete_machine(&self, app: &str, id: &str) -> ProviderResult<()> {
        self.throttle("delete", id).await;
        let url = self.url(&["apps", app, "machines", id], &[("force", "true")]);
        self.send("delete machine", Method::DELETE, url, None).await
    }

    /// `timeout` is sent in whole seconds, 1 to 60; `instance_id` only when there is one.
    async fn wait_machine(
        &self,
        app: &str,
        id: &str,
        state: &str,
        instance_id: Option<&str>,
        timeout: Duration,
    ) -> ProviderResult<()> {
        self.throttle("wait", id).await;
        let secs = whole_secs(timeout.min(WAIT_MAX)).to_string();
        let mut query = vec![("state", state), ("timeout", secs.as_str())];
        query.extend(
            instance_id
                .filter(|i| !i.is_empty())
                .map(|i| ("instance_id", i)),
        );
        let url = self.url(&["apps", app, "machines", id, "wait"], &query);
        self.send("wait machine", Method::GET, url, None).await
    }

    /// `GET /apps/{app}/machines`, with `?metadata.<key>=<value>` when filtered.
    async fn list_machines(
        &self,
        app: &str,
        filter: Option<(&str, &str)>,
    ) -> ProviderResult<Vec<Machine>> {
        self.throttle("list", app).await;
        let url = self.list_url(app, filter);
        let answer = self.fetch("list machines", Method::GET, url, None).await?;
        let machines = answer.as_array().into_iter().flatten();
        Ok(machines.map(parse_machine).collect())
    }

    /// The HTTP request may last `timeout` plus 15 s (at least [`REQUEST_TIMEOUT`]).
    async fn exec(
        &self,
        app: &str,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> ProviderResult<ExecOutput> {
        self.throttle("exec", id).await;
        let secs = whole_secs(timeout);
        let url = self.url(&["apps", app, "machines", id, "exec"], &[]);
        let body = Some(json!({"command": argv, "timeout": secs}));
        let limit = Some(REQUEST_TIMEOUT.max(Duration::from_secs(secs + 15)));
        let answer = parse_json(
            "exec",
            &self.request("exec", Method::POST, url, body, limit).await?,
        )?;
        let exit_code = answer["exit_code"]
            .as_i64()
            .and_then(|c| i32::try_from(c).ok());
        Ok(ExecOutput {
            exit_code: exit_code.unwrap_or(-1),
            stdout: text_at(&answer, "stdout"),
            stderr: text_at(&answer, "stderr"),
        })
    }

    /// `Host` is `app_url`'s host (and port, when it names one) with `{app}` substituted.
    fn upstream(&self, app: &str, id: &str) -> UpstreamTarget {
        let url = app_url(&self.config.app_url, app).ok();
        let host = match url.as_ref().map(|u| (u.host_str(), u.port())) {
            Some((Some(host), Some(port))) => format!("{host}:{port}"),
            Some((Some(host), None)) => host.to_string(),
            _ => format!("{app}.fly.dev"),
        };
        let headers = vec![(FORCE_INSTANCE_HEADER.to_string(), id.to_string())];
        UpstreamTarget { host, headers }
    }

    /// TCP to `app_url`'s host and port, then TLS (webpki roots, SNI = host) for `https`.
    async fn dial(&self, app: &str, _id: &str) -> ProviderResult<Box<dyn UpstreamIo>> {
        let fail = |m: String| ProviderError::new("dial", 0, m);
        let url = app_url(&self.config.app_url, app).map_err(fail)?;
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(fail(format!("{url}: no host"))),
        };
        let port = url.port_or_known_default().unwrap_or(443);
        let connect = TcpStream::connect((host.as_str(), port));
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| fail(format!("{host}:{port}: connect timed out")))?
            .map_err(|e| fail(format!("{host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        if url.scheme() == "http" {
            return Ok(Box::new(tcp));
        }
        let name = ServerName::try_from(host.clone()).map_err(|e| fail(format!("{host}: {e}")))?;
        let handshake = TlsConnector::from(self.tls.clone()).connect(name, tcp);
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| fail(format!("{host}:{port}: TLS handshake timed out")))?
            .map_err(|e| fail(format!("{host}:{port}: TLS: {e}")))?;
        Ok(Box::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::collections::BTreeMap;

    fn provider(app_url: &str) -> FlyProvider {
        let api_token = "fo1_secret".into();
        let config = FlyConfig {
            api_token,
            app_url: app_url.into(),
            ..FlyConfig::default()
        };
        FlyProvider::new(config).unwrap()
    }

    #[test]
    fn config_defaults_redaction_and_validation() {
        let config: FlyConfig = serde_json::from_str(r#"{"api_token": "fo1_secret"}"#).unwrap();
        assert_eq!(config.api_url, "https://api.machines.dev");
        assert_eq!(
            (config.org_slug.as_str(), config.image.as_str()),
            ("personal", DEFAULT_IMAGE)
        );
        assert_eq!(config.app_url, "https://{app}.fly.dev");
        assert_eq!((config.rate_per_second, config.rate_burst), (1, 3));
        let debug = format!("{config:?}");
        assert!(!debug.contains("fo1_secret") && debug.contains("<redacted>"));
        assert!(serde_json::from_str::<FlyConfig>(r#"{"token": "x"}"#).is_err());

        assert!(FlyProvider::new(FlyConfig::default()).is_err());
        let rejects = |f: fn(&mut FlyConfig)| {
            let mut c = config.clone();
            f(&mut c);
            FlyProvider::new(c).is_err()
        };
        assert!(rejects(|c| c.api_url = "not a url".into()));
        assert!(rejects(|c| c.app_url = "ftp://{app}.example".into()));
        assert!(rejects(|c| c.rate_burst = 0));
        assert!(!format!("{:?}", FlyProvider::new(config).unwrap()).contains("fo1_secret"));
    }

    #[test]
    fn parses_fly_machines_and_volumes() {
        let answer = r#"{
          "id": "3d8d413b29d089", "name": "dXNlcl8x", "state": "started", "region": "dfw",
          "instance_id": "01JKZ8Q4W6N3R2", "private_ip": "fdaa:0:1:a7b:1f3:5e2:9c1:2",
          "config": {
            "image": "registry.fly.io/kiloclaw-machines:latest",
            "env": {"KILOCODE_FEATURE": "kilo-claw"},
            "guest": {"cpu_kind": "shared", "cpus": 2, "memory_mb": 4096},
            "mounts": [{"encrypted": true, "path": "/root", "size_gb": 10,
                        "volume": "vol_4y5l1e2k7p3", "name": "kiloclaw_dxnlcl8x"}],
            "metadata": {"kiloclaw_user_id": "user_1", "kiloclaw_sandbox_id": "dXNlcl8x"}
          },
          "image_ref": {"registry": "registry.fly.io", "repository": "kiloclaw-machines"},
          "created_at": "2026-02-10T09:12:01Z", "updated_at": "2026-02-10T09:12:14Z",
          "events": [{"type": "start", "status": "started", "timestamp": 1739178734000}]
        }"#;
        let m = parse_machine(&serde_json::from_str(answer).unwrap());
        assert_eq!(
            (m.id.as_str(), m.state.as_str()),
            ("3d8d413b29d089", "started")
        );
        assert_eq!(
            (m.region.as_str(), m.instance_id.as_str()),
            ("dfw", "01JKZ8Q4W6N3R2")
        );
        let mount = Mount {
            volume: "vol_4y5l1e2k7p3".into(),
            path: "/root".into(),
        };
        assert_eq!(m.mounts, vec![mount]);
        assert_eq!(m.metadata["kiloclaw_user_id"], "user_1");
        assert_eq!(m.updated_at, "2026-02-10T09:12:14Z");

        let sparse = parse_machine(&json!({"id": "m1", "config": {"metadata": null}}));
        assert!(sparse.state.is_empty() && sparse.mounts.is_empty() && sparse.metadata.is_empty());
        let volume = json!({"id": "vol_1", "name": "kiloclaw_x", "region": "yyz",
            "state": "created", "size_gb": 10, "attached_machine_id": null});
        let v = parse_volume(&volume);
        assert_eq!(
            (v.id.as_str(), v.region.as_str(), v.attached_machine_id),
            ("vol_1", "yyz", None)
        );
        assert_eq!(parse_secrets_version(&json!({"Version": 7})), Some(7));
        assert_eq!(parse_secrets_version(&json!({"version": "8"})), Some(8));
    }

    #[test]
    fn builds_urls_and_the_machine_config() {
        let p = provider("https://{app}.fly.dev");
        let url = p.list_url("acct-1", Some(("kiloclaw_user_id", "user a&b@x")));
        let expected = "https://api.machines.dev/v1/apps/acct-1/machines\
                        ?metadata.kiloclaw_user_id=user+a%26b%40x";
        assert_eq!(url.as_str(), expected);
        assert_eq!(p.list_url("acct-1", None).query(), None);
        assert_eq!(p.url(&["apps", "a/b"], &[]).path(), "/v1/apps/a%2Fb");
        assert_eq!(whole_secs(Duration::from_millis(1500)), 2);
        assert_eq!(whole_secs(Duration::ZERO), 1);
        assert_eq!(whole_secs(Duration::from_secs(300).min(WAIT_MAX)), 60);

        let spec = MachineSpec {
            name: "s".into(),
            region: "dfw".into(),
            env: BTreeMap::from([("A".into(), "1".into())]),
            guest: Default::default(),
            mounts: vec![Mount {
                volume: "vol_1".into(),
                path: "/root".into(),
            }],
            metadata: BTreeMap::new(),
            min_secrets_version: Some(3),
        };
        let config = p.machine_config(&spec);
        assert_eq!(config["image"], DEFAULT_IMAGE);
        assert_eq!(
            config["guest"],
            json!({"cpus": 2, "memory_mb": 4096, "cpu_kind": "shared"})
        );
        assert_eq!(config["services"][0]["internal_port"], 18789);
        assert_eq!(
            config["services"][0]["ports"][0]["handlers"],
            json!(["tls", "http"])
        );
        assert_eq!(config["mounts"][0]["volume"], "vol_1");
        assert_eq!(
            with_secrets_version(json!({}), &spec)["min_secrets_version"],
            3
        );
    }

    #[test]
    fn app_url_templating() {
        let target = provider("https://{app}.fly.dev").upstream("acct-abc", "m1");
        assert_eq!(target.host, "acct-abc.fly.dev");
        assert_eq!(
            target.headers,
            vec![("fly-force-instance-id".into(), "m1".into())]
        );
        let local = provider("http://127.0.0.1:4567").upstream("acct-abc", "m1");
        assert_eq!(local.host, "127.0.0.1:4567");
        let url = app_url("http://{app}.internal:80/", "a").unwrap();
        assert_eq!(url.as_str(), "http://a.internal/");
    }

    #[test]
    fn rate_limit_is_per_action_per_machine() {
        let p = provider("https://{app}.fly.dev");
        let key = |action: &'static str, id: &str| (action, id.to_string());
        for _ in 0..3 {
            assert!(p.limiter.check_key(&key("start", "m1")).is_ok());
        }
        assert!(p.limiter.check_key(&key("start", "m1")).is_err());
        assert!(p.limiter.check_key(&key("start", "m2")).is_ok());
        assert!(p.limiter.check_key(&key("stop", "m1")).is_ok());

        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::dashmap_with_clock(quota(p.config()).unwrap(), clock.clone());
        for _ in 0..3 {
            assert!(limiter.check_key(&key("get", "m1")).is_ok());
        }
        assert!(limiter.check_key(&key("get", "m1")).is_err());
        clock.advance(Duration::from_secs(1));
        assert!(limiter.check_key(&key("get", "m1")).is_ok());
        assert!(limiter.check_key(&key("get", "m1")).is_err());
    }
}
