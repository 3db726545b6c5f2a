//! The HTTP client behind the account commands (`login`, `whoami`, `org`, `token`, `secret`,
//! `user`, `audit`): the credentials file and calls to a server's `/api`.
//!
//! Credentials live in `<config dir>/kilocloud/credentials.json` (on Linux
//! `$XDG_CONFIG_HOME/kilocloud` or `~/.config/kilocloud`), mode 0600, or in the file named by
//! `KILOCLOUD_CREDENTIALS`.

use std::path::PathBuf;

use anyhow::Context;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What `kilocloud login` stores.
#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// Server base URL, e.g. `http://127.0.0.1:8787`.
    pub url: String,
    /// A JWT or API key.
    pub token: String,
}

/// Path of the credentials file.
pub fn credentials_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("KILOCLOUD_CREDENTIALS") {
        return Ok(PathBuf::from(p));
    }
    let dir = dirs::config_dir()
        .context("cannot find the user's config directory; set KILOCLOUD_CREDENTIALS")?;
    Ok(dir.join("kilocloud").join("credentials.json"))
}

impl Credentials {
    /// Writes the file with mode 0600 (replacing it atomically).
    pub fn save(&self) -> anyhow::Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = credentials_path()?;
        let dir = path.parent().context("credentials path has no directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Reads the file written by `kilocloud login`.
    pub fn load() -> anyhow::Result<Self> {
        let path = credentials_path()?;
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "not logged in ({} is missing); run `kilocloud login --url URL --token TOKEN`",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("invalid {}", path.display()))
    }
}

/// A client of one server with one credential.
pub struct Client {
    http: reqwest::Client,
    creds: Credentials,
    org: Option<String>,
}

impl Client {
    /// A client for `creds`, acting for `org` (sent as `X-KiloCode-OrganizationId`) if given.
    pub fn new(creds: Credentials, org: Option<String>) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .build()?,
            creds,
            org,
        })
    }

    /// The URL of `path` (with its query) on the server.
    pub fn url(&self, path: &str) -> anyhow::Result<reqwest::Url> {
        Ok(reqwest::Url::parse(&format!(
            "{}{path}",
            self.creds.url.trim_end_matches('/')
        ))?)
    }

    /// The WebSocket URL of `path` on the server (`ws://` or `wss://`).
    pub fn ws_url(&self, path: &str) -> anyhow::Result<reqwest::Url> {
        let mut url = self.url(path)?;
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme)
            .map_err(|()| anyhow::anyhow!("cannot make a WebSocket URL of {url}"))?;
        Ok(url)
    }

    /// A WebSocket handshake request for `path` carrying the credential as a bearer header
    /// (and the organization header), never in the URL.
    pub fn ws_request(
        &self,
        path: &str,
    ) -> anyhow::Result<tokio_tungstenite::tungstenite::handshake::client::Request> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = self.ws_url(path)?.as_str().into_client_request()?;
        let headers = request.headers_mut();
        headers.insert(
            "authorization",
            format!("Bearer {}", self.creds.token).parse()?,
        );
        if let Some(org) = &self.org {
            headers.insert("x-kilocode-organizationid", org.parse()?);
        }
        Ok(request)
    }

    /// The organization acted for, if any.
    pub fn org(&self) -> Option<&str> {
        self.org.as_deref()
    }

    /// Sends a request to `path` (e.g. `/api/users/me`) and returns the JSON body
    /// (`Value::Null` for 204). Errors carry the status, code and message of the API error.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.creds.url.trim_end_matches('/'));
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(&self.creds.token);
        if let Some(org) = &self.org {
            req = req.header("X-KiloCode-OrganizationId", org);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = res.status();
        let bytes = res.bytes().await?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        if status.is_success() {
            return Ok(value);
        }
        match (
            value["error"]["code"].as_str(),
            value["error"]["message"].as_str(),
        ) {
            (Some(code), Some(message)) => anyhow::bail!("{} {code}: {message}", status.as_u16()),
            _ => anyhow::bail!("{status}: {value}"),
        }
    }
}
