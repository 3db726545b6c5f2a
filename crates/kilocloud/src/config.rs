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

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP listen address. Default `127.0.0.1:8787`.
    pub listen: SocketAddr,
    /// Data directory (SQLite database, blobs). Default `.kilocloud`.
    pub data_dir: PathBuf,
    /// `postgres://…` to use PostgreSQL; empty for SQLite in the data directory. Default empty.
    pub database_url: String,
    /// `auto`, `human` or `json`. Default `auto`.
    pub log_format: LogFormat,
    /// tracing filter directive, e.g. `info` or `kilocloud=debug`. Default `info`.
    pub log_level: String,
    /// Bearer token enabling the admin API (`/api/admin`). Default empty (disabled).
    pub admin_token: String,
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8787".parse().expect("valid address"),
            data_dir: PathBuf::from(".kilocloud"),
            database_url: String::new(),
            log_format: LogFormat::Auto,
            log_level: "info".into(),
            admin_token: String::new(),
            shutdown_grace_ms: 30_000,
            sqlite: SqliteConfig::default(),
            postgres: PostgresConfig::default(),
            blobs: None,
            substrate: Tuning::default(),
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
                url: self.database_url.clone(),
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

    /// The configuration as TOML with secrets redacted (`config show`).
    pub fn to_redacted_toml(&self) -> anyhow::Result<String> {
        let mut shown = self.clone();
        if !shown.admin_token.is_empty() {
            shown.admin_token = "***".into();
        }
        if !shown.database_url.is_empty() {
            shown.database_url =
                kilocloud_substrate::store::postgres::redact_url(&shown.database_url);
        }
        Ok(toml::to_string_pretty(&shown)?)
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
