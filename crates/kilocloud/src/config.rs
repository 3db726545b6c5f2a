//! Configuration: defaults, then a TOML file (`--config FILE`, else `./kilocloud.toml` if
//! present), then `KILOCLOUD_*` environment variables (nested keys with `__`, e.g.
//! `KILOCLOUD_SUBSTRATE__ACTOR_MAX_BACKLOG`), then command-line flags. Every key is documented
//! with its default in `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use kilocloud_substrate::{BlobConfig, DatabaseConfig, Synchronous, Tuning};
use serde::{Deserialize, Serialize};

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable when stderr is a terminal, JSON otherwise.
    Auto,
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// SQLite settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SqliteConfig {
    /// `normal` (default; durable across process crashes) or `full` (also across power loss).
    pub synchronous: Synchronous,
}

/// PostgreSQL settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connections per node. Default 32.
    pub max_connections: u32,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            max_connections: 32,
        }
    }
}

/// A secret setting: `Debug` prints `***`, so a logged configuration never shows it, and
/// `config show` redacts it wherever it is nested.
pub use kilocloud_identity::secret::Secret as SecretString;

/// The `[server]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Reverse proxies trusted to name the client in `Forwarded` / `X-Forwarded-For`: CIDRs
    /// (`10.0.0.0/8`) or single addresses. Default empty: the TCP peer is the client, and
    /// those headers are ignored (a client could forge them). The client address is what the
    /// authentication-failure and free-model limits count.
    pub trusted_proxies: Vec<String>,
}

impl ServerConfig {
    /// The trusted proxies as networks.
    ///
    /// Errors: the first entry that is neither a CIDR nor an address, described.
    pub fn trusted_networks(&self) -> Result<Vec<ipnet::IpNet>, String> {
        self.trusted_proxies
            .iter()
            .map(|entry| {
                let entry = entry.trim();
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        format!(
                            "server.trusted_proxies: `{entry}` is neither a CIDR (10.0.0.0/8) nor an address"
                        )
                    })
            })
            .collect()
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP listen address. Default `127.0.0.1:8787`.
    pub listen: SocketAddr,
    /// Data directory (SQLite database, blobs). Default `.kilocloud`.
    pub data_dir: PathBuf,
    /// `postgres://…` to use PostgreSQL; empty for SQLite in the data directory. Default empty.
    pub database_url: SecretString,
    /// `auto`, `human` or `json`. Default `auto`.
    pub log_format: LogFormat,
    /// tracing filter directive, e.g. `info` or `kilocloud=debug`. Default `info`.
    pub log_level: String,
    /// Static bearer token for the admin API (`/api/admin`), besides site administrators'
    /// credentials. Default empty (only administrators).
    pub admin_token: SecretString,
    /// HS256 secret signing user JWTs. Default empty: on SQLite generated once into
    /// `<data_dir>/secrets.toml`; required on PostgreSQL (every node must share it).
    pub jwt_secret: SecretString,
    /// Master key wrapping secrets' data keys: 32 bytes as 64 hex digits or base64. Default
    /// empty: generated like `jwt_secret` on SQLite, required on PostgreSQL.
    pub master_key: SecretString,
    /// Earlier master keys, comma-separated, still accepted for decryption during a rotation.
    pub previous_master_keys: SecretString,
    /// Secret of the `x-internal-api-key` header for platform-to-platform routes. Default
    /// empty: those routes refuse every call.
    pub internal_api_secret: SecretString,
    /// Failed authentications allowed per client IP per minute before 429. Default 30.
    pub auth_failures_per_minute: u32,
    /// The HTTP server behind reverse proxies.
    pub server: ServerConfig,
    /// Email of the administrator created on an empty store. Default `admin@localhost`.
    pub bootstrap_admin_email: String,
    /// Longest graceful shutdown, ms. Default 30,000.
    pub shutdown_grace_ms: u64,
    /// SQLite settings.
    pub sqlite: SqliteConfig,
    /// PostgreSQL settings.
    pub postgres: PostgresConfig,
    /// Blob store; default local directory `<data_dir>/blobs`.
    pub blobs: Option<BlobConfig>,
    /// Substrate tuning.
    pub substrate: Tuning,
    /// The model gateway: providers, models, prices (see `docs/gateway.md`).
    pub gateway: kilocloud_gateway::GatewayConfig,
    /// The Cloud Agent: sandboxes, git, the agent harness (see `docs/sessions.md`).
    pub agent: kilocloud_agent::AgentConfig,
    /// The GitHub App: id, private key, webhook secrets, API URL (see `docs/github.md`).
    pub github: kilocloud_automation::GitHubConfig,
    /// Code review defaults (see `docs/review.md`).
    pub review: kilocloud_automation::ReviewConfig,
    /// KiloClaw assistant runtimes: provider, regions, cadence (see `docs/claw.md`).
    pub claw: kilocloud_claw::ClawConfig,
    /// KiCI: recovery window, lock cache, log limits (see `docs/ci.md`).
    pub ci: kilocloud_ci::CiConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8787".parse().expect("valid address"),
            data_dir: PathBuf::from(".kilocloud"),
            database_url: SecretString::default(),
            log_format: LogFormat::Auto,
            log_level: "info".into(),
            admin_token: SecretString::default(),
            jwt_secret: SecretString::default(),
            master_key: SecretString::default(),
            previous_master_keys: SecretString::default(),
            internal_api_secret: SecretString::default(),
            auth_failures_per_minute: 30,
            server: ServerConfig::default(),
            bootstrap_admin_email: "admin@localhost".into(),
            shutdown_grace_ms: 30_000,
            sqlite: SqliteConfig::default(),
            postgres: PostgresConfig::default(),
            blobs: None,
            substrate: Tuning::default(),
            gateway: kilocloud_gateway::GatewayConfig::default(),
            agent: kilocloud_agent::AgentConfig::default(),
            github: kilocloud_automation::GitHubConfig::default(),
            review: kilocloud_automation::ReviewConfig::default(),
            claw: kilocloud_claw::ClawConfig::default(),
            ci: kilocloud_ci::CiConfig::default(),
        }
    }
}

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

/// Environment variables that are not configuration keys (test and tool settings).
fn is_config_key(key: &str) -> bool {
    let top = key.split("__").next().unwrap_or(key).to_ascii_lowercase();
    matches!(
        top.as_str(),
        "listen"
            | "data_dir"
            | "database_url"
            | "log_format"
            | "log_level"
            | "admin_token"
            | "jwt_secret"
            | "master_key"
            | "previous_master_keys"
            | "internal_api_secret"
            | "auth_failures_per_minute"
            | "server"
            | "bootstrap_admin_email"
            | "gateway"
            | "agent"
            | "github"
            | "review"
            | "claw"
            | "ci"
            | "shutdown_grace_ms"
            | "sqlite"
            | "postgres"
            | "blobs"
            | "substrate"
    )
}

impl Config {
    /// Loads the layers. `file` is `--config`; without it `./kilocloud.toml` is read if present.
    ///
    /// Errors name the file, the key and what was expected (figment's messages).
    pub fn load(file: Option<&Path>, overrides: Overrides) -> anyhow::Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(f) => {
                anyhow::ensure!(f.is_file(), "config file {} does not exist", f.display());
                fig = fig.merge(Toml::file_exact(f));
            }
            None if Path::new("kilocloud.toml").is_file() => {
                fig = fig.merge(Toml::file_exact("kilocloud.toml"));
            }
            None => {}
        }
        fig = fig
            .merge(
                Env::prefixed("KILOCLOUD_")
                    .filter(|k| is_config_key(k.as_str()))
                    .split("__"),
            )
            .merge(Serialized::defaults(overrides));
        fig.extract::<Config>()
            .map_err(|e| anyhow::anyhow!(describe(e)))
            .context("invalid configuration")
    }

    /// The database this configuration selects.
    pub fn database(&self) -> DatabaseConfig {
        if self.database_url.is_empty() {
            DatabaseConfig::Sqlite {
                path: self.data_dir.join("kilocloud.db"),
                synchronous: self.sqlite.synchronous,
            }
        } else {
            DatabaseConfig::Postgres {
                url: self.database_url.expose().to_owned(),
                max_connections: self.postgres.max_connections,
                schema: None,
            }
        }
    }

    /// The blob store this configuration selects.
    pub fn blobs(&self) -> BlobConfig {
        self.blobs.clone().unwrap_or_else(|| BlobConfig::Local {
            path: self.data_dir.join("blobs"),
        })
    }

    /// The configuration as TOML with secrets redacted (`config show`): every
    /// [`SecretString`], wherever it is nested, shows as `***`, except `database_url`, shown
    /// with only its password redacted; gateway providers' `api_key` (not of that type) is
    /// redacted by name, and S3 credentials are never serialized.
    pub fn to_redacted_toml(&self) -> anyhow::Result<String> {
        let mut shown = self.clone();
        for provider in &mut shown.gateway.providers {
            if !provider.api_key.is_empty() {
                provider.api_key = kilocloud_identity::secret::REDACTED.into();
            }
        }
        let mut value = kilocloud_identity::secret::redacting(|| toml::Value::try_from(&shown))?;
        if let Some(table) = value.as_table_mut()
            && !self.database_url.is_empty()
        {
            table.insert(
                "database_url".into(),
                kilocloud_substrate::store::postgres::redact_url(self.database_url.expose()).into(),
            );
        }
        Ok(toml::to_string_pretty(&value)?)
    }
}

/// One line per figment error: `key: message (in source)`.
fn describe(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| {
            let key = if e.path.is_empty() {
                String::new()
            } else {
                format!("key `{}`: ", e.path.join("."))
            };
            let source = e
                .metadata
                .as_ref()
                .map(|m| match &m.source {
                    Some(src) => format!(" (from {} {src})", m.name),
                    None => format!(" (from {})", m.name),
                })
                .unwrap_or_default();
            format!("{key}{}{source}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Secrets generated for the embedded default (`<data_dir>/secrets.toml`, mode 0600).
#[derive(Debug, Serialize, Deserialize)]
struct GeneratedSecrets {
    jwt_secret: SecretString,
    master_key: SecretString,
}

impl Config {
    /// The identity service's settings. Unset `jwt_secret` and `master_key` are read from, or
    /// generated once into, `<data_dir>/secrets.toml` on SQLite; on PostgreSQL they must be
    /// configured, since every node must share them.
    ///
    /// Errors: a missing secret on PostgreSQL, an unparseable master key, an unreadable file.
    pub fn identity(&self) -> anyhow::Result<kilocloud_identity::IdentityConfig> {
        use kilocloud_identity::envelope::{MasterKey, MasterKeys};
        let (mut jwt, mut master) = (self.jwt_secret.clone(), self.master_key.clone());
        if jwt.is_empty() || master.is_empty() {
            anyhow::ensure!(
                self.database_url.is_empty(),
                "jwt_secret and master_key must be set (KILOCLOUD_JWT_SECRET, KILOCLOUD_MASTER_KEY) \
                 when using PostgreSQL: every node must share them; \
                 `kilocloud admin generate-key` prints a new one"
            );
            let generated = self.generated_secrets()?;
            if jwt.is_empty() {
                jwt = generated.jwt_secret;
            }
            if master.is_empty() {
                master = generated.master_key;
            }
        }
        let current = MasterKey::parse(master.expose()).context("invalid master_key")?;
        let previous = self
            .previous_master_keys
            .expose()
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(MasterKey::parse)
            .collect::<Result<Vec<_>, _>>()
            .context("invalid previous_master_keys")?;
        Ok(kilocloud_identity::IdentityConfig {
            jwt_secret: jwt.expose().as_bytes().to_vec(),
            master_keys: MasterKeys::new(current, previous),
            internal_api_secret: Some(self.internal_api_secret.expose().to_owned()),
        })
    }

    /// KiloClaw's settings, with the gateway-token key filled in: when `claw.gateway_token_secret`
    /// is unset it is derived from the master key (HMAC-SHA256 over a fixed label), so every
    /// node sharing the master key derives the same one.
    ///
    /// Errors: as [`Config::identity`].
    pub fn claw(&self) -> anyhow::Result<kilocloud_claw::ClawConfig> {
        use hmac::Mac;
        let mut claw = self.claw.clone();
        if claw.gateway_token_secret.is_empty() {
            let master = if self.master_key.is_empty() {
                self.identity()?;
                self.generated_secrets()?.master_key
            } else {
                self.master_key.clone()
            };
            let mut mac =
                <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(master.expose().as_bytes())
                    .expect("HMAC takes any key length");
            mac.update(b"kiloclaw gateway token secret v1");
            claw.gateway_token_secret = hex::encode(mac.finalize().into_bytes()).into();
        }
        Ok(claw)
    }

    fn generated_secrets(&self) -> anyhow::Result<GeneratedSecrets> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.data_dir.join("secrets.toml");
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("cannot create {}", self.data_dir.display()))?;
        let generated = GeneratedSecrets {
            jwt_secret: SecretString::new(kilocloud_identity::envelope::generate_secret_text()),
            master_key: SecretString::new(kilocloud_identity::envelope::generate_secret_text()),
        };
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                let text = format!(
                    "# Generated by kilocloud for the embedded default. Back this file up with the\n\
                     # database: without master_key the stored secrets cannot be decrypted.\n{}",
                    toml::to_string(&generated)?
                );
                f.write_all(text.as_bytes())?;
                f.sync_all()?;
                tracing::warn!(path = %path.display(), "generated jwt_secret and master_key; back this file up");
                Ok(generated)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))
            }
            Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every secret setting, nested ones included, with a distinct value: none shows in the
    /// `Debug` of the configuration (what a log line would print) nor in `config show`.
    #[test]
    fn secrets_never_show_in_debug_or_config_show() {
        let toml = r#"
            admin_token = "sec-admin-token"
            jwt_secret = "sec-jwt-secret"
            master_key = "sec-master-key"
            previous_master_keys = "sec-previous-1,sec-previous-2"
            internal_api_secret = "sec-internal"
            database_url = "postgres://kc:sec-db-password@db.example/kc"
            blobs = {kind = "s3", bucket = "b", access_key_id = "AKIA", secret_access_key = "sec-s3-key"}
            [[gateway.providers]]
            id = "p"
            kind = "openai-compatible"
            base_url = "https://llm.example/v1"
            api_key = "sec-provider-key"
            [github]
            private_key = "sec-github-pem"
            webhook_secrets = ["sec-webhook-1", "sec-webhook-2"]
            [claw]
            gateway_token_secret = "sec-claw-gateway"
            [claw.fly]
            api_token = "sec-fly-token"
        "#;
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(toml))
            .extract()
            .unwrap();
        assert_eq!(config.github.webhook_secrets[1].expose(), "sec-webhook-2");
        let debug = format!("{config:?}");
        let shown = config.to_redacted_toml().unwrap();
        for text in [&debug, &shown] {
            assert!(!text.contains("sec-"), "a secret shows in:\n{text}");
        }
        let shown: toml::Value = toml::from_str(&shown).unwrap();
        for path in [
            "admin_token",
            "jwt_secret",
            "master_key",
            "previous_master_keys",
            "internal_api_secret",
            "github.private_key",
            "github.webhook_secrets.0",
            "claw.gateway_token_secret",
            "claw.fly.api_token",
            "gateway.providers.0.api_key",
        ] {
            let mut value = &shown;
            for part in path.split('.') {
                value = match part.parse::<usize>() {
                    Ok(i) => &value[i],
                    Err(_) => &value[part],
                };
            }
            assert_eq!(value.as_str(), Some("***"), "{path}");
        }
    }
}
