//! The GitHub App: webhook signatures, installation access tokens (the git token service,
//! reference §9) and the few REST calls automation makes, through octocrab against
//! `github.api_url` (GitHub Enterprise Server: `https://<host>/api/v3`).
//!
//! Tokens: the app authenticates with an RS256 JWT (octocrab mints it from the private key)
//! and exchanges it for an installation access token (`POST /app/installations/{id}/
//! access_tokens`, valid 1 h). A token is cached in the substrate KV under
//! `gh-token:<installationId>`, sealed with the master key, for at most 30 min and never
//! beyond its expiry; one with less than 5 min left is never handed out, one with less than
//! 60 s left is never cached.

use std::time::Duration;

use hmac::{Hmac, Mac};
use kilocloud_identity::Identity;
use kilocloud_identity::envelope::Envelope;
use kilocloud_identity::secret::Secret;
use kilocloud_substrate::Substrate;
use octocrab::Octocrab;
use octocrab::models::{AppId, InstallationToken};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Longest a token stays in the cache (reference §9: 30 min).
pub const TOKEN_CACHE_MAX: Duration = Duration::from_secs(30 * 60);
/// A cached token with less than this left is not used (reference §9: 5 min).
pub const TOKEN_MIN_REMAINING: Duration = Duration::from_secs(5 * 60);
/// A token with less than this left is not cached (reference §9: 60 s).
pub const TOKEN_MIN_CACHEABLE: Duration = Duration::from_secs(60);
/// Timeout of one GitHub API request.
pub const API_TIMEOUT: Duration = Duration::from_secs(15);

/// Settings of the GitHub App (`github.*` in the configuration). `Debug` leaves the key and
/// the secrets out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GitHubConfig {
    /// The app's id; 0 disables the integration (webhooks answer 503 `github_disabled`).
    pub app_id: u64,
    /// The app's private key, PEM (PKCS#1 or PKCS#8). Prefer `private_key_path`.
    pub private_key: Secret,
    /// A file holding the private key, PEM.
    pub private_key_path: String,
    /// Webhook secrets; a delivery signed with any of them is accepted (so a secret can be
    /// rotated: add the new one, change it on GitHub, remove the old one).
    pub webhook_secrets: Vec<Secret>,
    /// REST API base URL. Default `https://api.github.com`.
    pub api_url: String,
    /// Lets any owner's admin claim an unclaimed installation. Default false: only site
    /// administrators claim, because nothing yet proves that a user administers the GitHub
    /// account an installation is on (the reference checks it with the user's GitHub OAuth
    /// token).
    pub allow_self_claim: bool,
}

impl Default for GitHubConfig {
    fn default() -> Self {
        Self {
            app_id: 0,
            private_key: Secret::default(),
            private_key_path: String::new(),
            webhook_secrets: Vec::new(),
            api_url: "https://api.github.com".into(),
            allow_self_claim: false,
        }
    }
}

/// A GitHub API failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GitHubError {
    /// GitHub answered with an error status.
    #[error("GitHub answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// GitHub's message.
        message: String,
    },
    /// The request did not complete (network, timeout, bad response body).
    #[error("GitHub request failed: {0}")]
    Transport(String),
}

impl GitHubError {
    /// Whether a retry may succeed: network failures, 429, 5xx and rate-limit 403s.
    pub fn is_transient(&self) -> bool {
        match self {
            GitHubError::Transport(_) => true,
            GitHubError::Status { status, message } => {
                *status == 429
                    || *status >= 500
                    || (*status == 403 && message.to_ascii_lowercase().contains("rate limit"))
            }
        }
    }

    /// Whether GitHub said 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, GitHubError::Status { status: 404, .. })
    }
}

impl From<octocrab::Error> for GitHubError {
    fn from(e: octocrab::Error) -> Self {
        match e {
            octocrab::Error::GitHub { source, .. } => GitHubError::Status {
                status: source.status_code.as_u16(),
                message: source.message,
            },
            other => GitHubError::Transport(other.to_string()),
        }
    }
}

/// An installation as GitHub describes it (`GET /app/installations/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallationInfo {
    /// Installation id.
    pub id: u64,
    /// The account it is installed on.
    pub account_login: String,
    /// `User` or `Organization`.
    pub account_type: String,
    /// Whether it is suspended.
    pub suspended: bool,
}

/// An installation access token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessToken {
    /// The token (`ghs_…`).
    pub token: String,
    /// Expiry, ms since epoch.
    pub expires_at_ms: i64,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"<redacted>")
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
    }
}

/// A cached token: sealed, so the KV never holds it in clear.
#[derive(Serialize, Deserialize)]
struct CachedToken {
    sealed: Envelope,
    expires_at_ms: i64,
}

/// A pull request review to post (`POST /repos/{o}/{r}/pulls/{n}/reviews`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewBody {
    /// The head commit reviewed.
    pub commit_id: String,
    /// The summary.
    pub body: String,
    /// `COMMENT`.
    pub event: String,
    /// Inline comments.
    pub comments: Vec<ReviewComment>,
}

/// One inline comment of a review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewComment {
    /// File path in the pull request.
    pub path: String,
    /// Line in the new file.
    pub line: u64,
    /// `RIGHT` (the new file).
    pub side: String,
    /// Markdown text.
    pub body: String,
}

/// What GitHub answered for a posted review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostedReview {
    /// Review id.
    pub id: u64,
    /// Its page.
    #[serde(default)]
    pub html_url: Option<String>,
}

/// The GitHub App client. Cheap to clone.
#[derive(Clone)]
pub struct GitHubApp {
    app_id: u64,
    api_url: String,
    app: Octocrab,
    secrets: std::sync::Arc<Vec<Vec<u8>>>,
    sub: Substrate,
    identity: Identity,
}

/// Verifies a webhook's `X-Hub-Signature-256` (`sha256=<hex HMAC-SHA256 of the raw body>`)
/// against each of `secrets`, in constant time per comparison (GitHub docs, "Validating
/// webhook deliveries").
pub fn verify_signature(secrets: &[Vec<u8>], header: Option<&str>, body: &[u8]) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    secrets.iter().fold(false, |ok, secret| {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(body);
        // `verify_slice` compares in constant time; every secret is tried.
        mac.verify_slice(&sig).is_ok() | ok
    })
}

/// `sha256=<hex>` of `body` under `secret`: what GitHub sends (for tests and tools).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl GitHubApp {
    /// The app for `config`, or `None` when `app_id` is 0.
    ///
    /// Errors: a message when the key cannot be read or parsed, no webhook secret is set, or
    /// the API URL is not a URL.
    pub fn new(
        config: &GitHubConfig,
        sub: &Substrate,
        identity: &Identity,
    ) -> Result<Option<Self>, String> {
        if config.app_id == 0 {
            return Ok(None);
        }
        let pem = if !config.private_key.is_empty() {
            config.private_key.expose().to_owned()
        } else if !config.private_key_path.is_empty() {
            std::fs::read_to_string(&config.private_key_path).map_err(|e| {
                format!(
                    "github.private_key_path {}: {e}",
                    config.private_key_path.as_str()
                )
            })?
        } else {
            return Err("github.app_id is set but neither github.private_key nor \
                        github.private_key_path is"
                .into());
        };
        if config.webhook_secrets.iter().all(|s| s.is_empty()) {
            return Err("github.app_id is set but github.webhook_secrets is empty".into());
        }
        let app = Octocrab::builder()
            .base_uri(config.api_url.as_str())
            .map_err(|e| format!("github.api_url: {e}"))?
            .set_connect_timeout(Some(API_TIMEOUT))
            .set_read_timeout(Some(API_TIMEOUT))
            .app_from_rsa_pem(AppId(config.app_id), pem.as_bytes())
            .map_err(|e| format!("github private key: {e}"))?
            .build()
            .map_err(|e| format!("github client: {e}"))?;
        Ok(Some(Self {
            app_id: config.app_id,
            api_url: config.api_url.clone(),
            app,
            secrets: std::sync::Arc::new(
                config
                    .webhook_secrets
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(|s| s.expose().as_bytes().to_vec())
                    .collect(),
            ),
            sub: sub.clone(),
            identity: identity.clone(),
        }))
    }

    /// The app id.
    pub fn app_id(&self) -> u64 {
        self.app_id
    }

    /// [`verify_signature`] with the configured secrets.
    pub fn verify(&self, header: Option<&str>, body: &[u8]) -> bool {
        verify_signature(&self.secrets, header, body)
    }

    /// `GET /app/installations/{id}` as the app.
    ///
    /// Errors: [`GitHubError`] (404 for an unknown installation).
    pub async fn installation(&self, id: u64) -> Result<InstallationInfo, GitHubError> {
        let v: serde_json::Value = self
            .app
            .get(format!("/app/installations/{id}"), None::<&()>)
            .await?;
        Ok(InstallationInfo {
            id,
            account_login: v["account"]["login"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            account_type: v["account"]["type"].as_str().unwrap_or("User").to_owned(),
            suspended: !v["suspended_at"].is_null(),
        })
    }

    /// An installation access token with at least 5 min left: from the cache, or minted
    /// through `POST /app/installations/{id}/access_tokens` (reference §9 `getToken`).
    ///
    /// Errors: [`GitHubError`]; a storage failure of the cache is logged and ignored.
    pub async fn installation_token(&self, id: u64) -> Result<AccessToken, GitHubError> {
        let key = format!("gh-token:{id}");
        let context = format!("github-token:{id}");
        let now = self.sub.clock().now_ms();
        let min_left = TOKEN_MIN_REMAINING.as_millis() as i64;
        match self.sub.kv().get::<CachedToken>(&key).await {
            Ok(Some(c)) if c.expires_at_ms - now >= min_left => {
                if let Ok(bytes) = self.identity.open(&c.sealed, &context)
                    && let Ok(token) = String::from_utf8(bytes)
                {
                    return Ok(AccessToken {
                        token,
                        expires_at_ms: c.expires_at_ms,
                    });
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "token cache unreadable; minting"),
        }
        let minted: InstallationToken = self
            .app
            .post(
                format!("/app/installations/{id}/access_tokens"),
                None::<&()>,
            )
            .await?;
        let expires_at_ms = minted
            .expires_at
            .as_deref()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.timestamp_millis())
            // GitHub documents one hour.
            .unwrap_or(now + 3_600_000);
        let left = expires_at_ms - now;
        if left >= TOKEN_MIN_CACHEABLE.as_millis() as i64 {
            let ttl = Duration::from_millis(left as u64).min(TOKEN_CACHE_MAX);
            let cached = CachedToken {
                sealed: self.identity.seal(minted.token.as_bytes(), &context),
                expires_at_ms,
            };
            if let Err(e) = self.sub.kv().put(&key, &cached, Some(ttl)).await {
                tracing::warn!(error = %e, "cannot cache an installation token");
            }
        }
        Ok(AccessToken {
            token: minted.token,
            expires_at_ms,
        })
    }

    /// A client acting as an installation with `token`.
    fn as_installation(&self, token: &AccessToken) -> Result<Octocrab, GitHubError> {
        Octocrab::builder()
            .base_uri(self.api_url.as_str())
            .map_err(|e| GitHubError::Transport(e.to_string()))?
            .set_connect_timeout(Some(API_TIMEOUT))
            .set_read_timeout(Some(API_TIMEOUT))
            .personal_token(token.token.clone())
            .build()
            .map_err(|e| GitHubError::Transport(e.to_string()))
    }

    /// The unified diff of a pull request (`GET /repos/{o}/{r}/pulls/{n}`, diff media type).
    ///
    /// Errors: [`GitHubError`].
    pub async fn pull_diff(
        &self,
        token: &AccessToken,
        repo: &str,
        number: u64,
    ) -> Result<String, GitHubError> {
        let (owner, name) = split_repo(repo)?;
        Ok(self
            .as_installation(token)?
            .pulls(owner, name)
            .get_diff(number)
            .await?)
    }

    /// Posts a review on a pull request.
    ///
    /// Errors: [`GitHubError`]; 422 when a comment's line is not part of the diff.
    pub async fn create_review(
        &self,
        token: &AccessToken,
        repo: &str,
        number: u64,
        review: &ReviewBody,
    ) -> Result<PostedReview, GitHubError> {
        split_repo(repo)?;
        Ok(self
            .as_installation(token)?
            .post(
                format!("/repos/{repo}/pulls/{number}/reviews"),
                Some(review),
            )
            .await?)
    }
}

impl GitHubApp {
    /// The file at `path` of `repo` at `git_ref` (a sha, branch or tag), through the contents
    /// API (`GET /repos/{o}/{r}/contents/{path}?ref=`); `None` when GitHub says 404 (no such
    /// file or ref). Never clones.
    ///
    /// Errors: [`GitHubError`]; a directory, or a file the API does not return inline
    /// (over 1 MB), is a 422.
    pub async fn file_contents(
        &self,
        token: &AccessToken,
        repo: &str,
        path: &str,
        git_ref: &str,
    ) -> Result<Option<String>, GitHubError> {
        let (owner, name) = split_repo(repo)?;
        let client = self.as_installation(token)?;
        let items = match client
            .repos(owner, name)
            .get_content()
            .path(path)
            .r#ref(git_ref)
            .send()
            .await
            .map_err(GitHubError::from)
        {
            Ok(items) => items,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let unusable = |message: &str| GitHubError::Status {
            status: 422,
            message: format!("{path}: {message}"),
        };
        let [item] = items.items.as_slice() else {
            return Err(unusable("is a directory"));
        };
        item.decoded_content()
            .map(Some)
            .ok_or_else(|| unusable("has no inline content (too large or not a file)"))
    }

    /// The paths a pull request changes (`GET /repos/{o}/{r}/pulls/{n}/files`, 100 per page;
    /// a renamed file's old path too), at most the 3,000 GitHub lists.
    ///
    /// Errors: [`GitHubError`].
    pub async fn pull_files(
        &self,
        token: &AccessToken,
        repo: &str,
        number: u64,
    ) -> Result<Vec<String>, GitHubError> {
        split_repo(repo)?;
        let client = self.as_installation(token)?;
        let mut files = Vec::new();
        for page in 1..=30 {
            let batch: Vec<serde_json::Value> = client
                .get(
                    format!("/repos/{repo}/pulls/{number}/files?per_page=100&page={page}"),
                    None::<&()>,
                )
                .await?;
            for f in &batch {
                for key in ["filename", "previous_filename"] {
                    if let Some(name) = f[key].as_str() {
                        files.push(name.to_owned());
                    }
                }
            }
            if batch.len() < 100 {
                break;
            }
        }
        Ok(files)
    }

    /// The commit at the tip of `branch` (`GET /repos/{o}/{r}/branches/{branch}`); `None`
    /// when GitHub says 404.
    ///
    /// Errors: [`GitHubError`].
    pub async fn branch_sha(
        &self,
        token: &AccessToken,
        repo: &str,
        branch: &str,
    ) -> Result<Option<String>, GitHubError> {
        split_repo(repo)?;
        let answer: Result<serde_json::Value, GitHubError> = self
            .as_installation(token)?
            .get(format!("/repos/{repo}/branches/{branch}"), None::<&()>)
            .await
            .map_err(GitHubError::from);
        match answer {
            Ok(v) => Ok(v["commit"]["sha"].as_str().map(str::to_owned)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a check run (`POST /repos/{o}/{r}/check-runs`) from the documented body
    /// (`name`, `head_sha`, `status`, `conclusion`, `details_url`, `external_id`, `output`);
    /// returns its id.
    ///
    /// Errors: [`GitHubError`] (422 for a missing name or head sha).
    pub async fn create_check_run(
        &self,
        token: &AccessToken,
        repo: &str,
        body: &serde_json::Value,
    ) -> Result<u64, GitHubError> {
        split_repo(repo)?;
        let created: serde_json::Value = self
            .as_installation(token)?
            .post(format!("/repos/{repo}/check-runs"), Some(body))
            .await?;
        created["id"]
            .as_u64()
            .ok_or_else(|| GitHubError::Transport("check run without an id".into()))
    }

    /// Updates check run `id` (`PATCH /repos/{o}/{r}/check-runs/{id}`); a `conclusion`
    /// completes it.
    ///
    /// Errors: [`GitHubError`].
    pub async fn update_check_run(
        &self,
        token: &AccessToken,
        repo: &str,
        id: u64,
        body: &serde_json::Value,
    ) -> Result<(), GitHubError> {
        split_repo(repo)?;
        let _: serde_json::Value = self
            .as_installation(token)?
            .patch(format!("/repos/{repo}/check-runs/{id}"), Some(body))
            .await?;
        Ok(())
    }
}

/// `owner/name` split in two.
fn split_repo(repo: &str) -> Result<(&str, &str), GitHubError> {
    repo.split_once('/')
        .filter(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| GitHubError::Status {
            status: 400,
            message: format!("{repo:?} is not owner/name"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_against_any_configured_secret() {
        let body = br#"{"zen":"Keep it logically awesome."}"#;
        let secrets = vec![b"old".to_vec(), b"new".to_vec()];
        assert!(verify_signature(&secrets, Some(&sign(b"new", body)), body));
        assert!(verify_signature(&secrets, Some(&sign(b"old", body)), body));
        assert!(!verify_signature(
            &secrets,
            Some(&sign(b"other", body)),
            body
        ));
        assert!(!verify_signature(&secrets, None, body));
        assert!(!verify_signature(&secrets, Some("sha256=zz"), body));
        assert!(!verify_signature(&secrets, Some("sha1=00"), body));
        let mut tampered = body.to_vec();
        tampered[3] ^= 1;
        assert!(!verify_signature(
            &secrets,
            Some(&sign(b"new", body)),
            &tampered
        ));
    }

    #[test]
    fn transient_errors_are_told_apart() {
        let status = |status, message: &str| GitHubError::Status {
            status,
            message: message.into(),
        };
        assert!(status(502, "Bad Gateway").is_transient());
        assert!(status(429, "slow down").is_transient());
        assert!(status(403, "API rate limit exceeded").is_transient());
        assert!(!status(403, "Resource not accessible by integration").is_transient());
        assert!(!status(404, "Not Found").is_transient());
        assert!(status(404, "Not Found").is_not_found());
    }
}
