//! Git on the host, for a session's workspace: clone, branch, commit and push with the real
//! `git`. The token travels only in an `Authorization` header passed through git's
//! `GIT_CONFIG_*` environment: never in the URL, in argv, in `.git/config` or on disk.
//! Host-side git ignores system and global config, runs no hooks, and allows only the
//! configured protocols; the workspace's `.git` is read-only inside the sandbox, so nothing the
//! agent does can plant config or hooks for it.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// `agent.git`: author, limits and allowed remotes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GitConfig {
    /// Commit author name. Default `Kilo Code Cloud` (reference §3).
    pub author_name: String,
    /// Commit author email.
    pub author_email: String,
    /// Base URL that `owner/repo` is cloned from. Default `https://github.com`.
    pub github_base: String,
    /// Clone timeout, ms. Default 120,000 (reference §3).
    pub clone_timeout_ms: u64,
    /// Push timeout, ms. Default 120,000.
    pub push_timeout_ms: u64,
    /// Allows `http://` remotes (tokens then cross the network in clear). Default false.
    pub allow_http: bool,
    /// Allows remotes on loopback, private or link-local addresses. Default false.
    pub allow_private_hosts: bool,
}

impl Default for GitConfig {
    fn default() -> Self {
        Self {
            author_name: "Kilo Code Cloud".into(),
            author_email: "cloud-agent@users.noreply.kilocloud.invalid".into(),
            github_base: "https://github.com".into(),
            clone_timeout_ms: 120_000,
            push_timeout_ms: 120_000,
            allow_http: false,
            allow_private_hosts: false,
        }
    }
}

/// A git failure.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The remote URL is not acceptable; says why.
    #[error("{0}")]
    BadRemote(String),
    /// git failed; its message (token-free).
    #[error("git {op} failed: {message}")]
    Failed {
        /// `clone`, `push`, …
        op: &'static str,
        /// The last lines git printed.
        message: String,
    },
    /// git ran past its time limit.
    #[error("git {0} timed out")]
    TimedOut(&'static str),
    /// git could not be started.
    #[error("cannot run git: {0}")]
    Io(#[from] std::io::Error),
}

impl GitConfig {
    /// The clone URL for `github_repo` (`owner/repo`) or `git_url`, checked against the
    /// allowed schemes and hosts.
    ///
    /// Errors: [`GitError::BadRemote`] for a malformed `owner/repo`, a URL with credentials, a
    /// scheme other than https (or http when allowed), or a private host when not allowed.
    pub fn remote_url(
        &self,
        github_repo: Option<&str>,
        git_url: Option<&str>,
    ) -> Result<String, GitError> {
        let url = match (github_repo, git_url) {
            (Some(repo), None) => {
                let valid = repo.split('/').count() == 2
                    && repo.split('/').all(|p| {
                        !p.is_empty()
                            && p != "."
                            && p != ".."
                            && p.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    });
                if !valid {
                    return Err(GitError::BadRemote(format!(
                        "githubRepo must be `owner/repo`, got `{repo}`"
                    )));
                }
                format!("{}/{repo}.git", self.github_base.trim_end_matches('/'))
            }
            (None, Some(url)) => url.to_owned(),
            _ => {
                return Err(GitError::BadRemote(
                    "give exactly one of githubRepo and gitUrl".into(),
                ));
            }
        };
        let parsed = url::Url::parse(&url)
            .map_err(|e| GitError::BadRemote(format!("gitUrl is not a URL: {e}")))?;
        match parsed.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err(GitError::BadRemote(
                    "gitUrl must use https (the operator can allow http with agent.git.allow_http)"
                        .into(),
                ));
            }
            other => {
                return Err(GitError::BadRemote(format!(
                    "gitUrl scheme `{other}` is not supported; use https"
                )));
            }
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(GitError::BadRemote(
                "gitUrl must not carry credentials; pass the token as gitToken".into(),
            ));
        }
        if !self.allow_private_hosts && kilocloud_identity::net::private_url(&url) {
            return Err(GitError::BadRemote(
                "gitUrl must not point at a loopback, private or link-local address (the \
                 operator can allow them with agent.git.allow_private_hosts)"
                    .into(),
            ));
        }
        Ok(url)
    }

    fn protocols(&self) -> &'static str {
        if self.allow_http {
            "https:http"
        } else {
            "https"
        }
    }

    /// A hardened `git` command in `dir` carrying `token` (if any) as an HTTP header.
    fn git(&self, dir: &Path, token: Option<&str>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("git");
        cmd.current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ALLOW_PROTOCOL", self.protocols())
            .env("GIT_AUTHOR_NAME", &self.author_name)
            .env("GIT_AUTHOR_EMAIL", &self.author_email)
            .env("GIT_COMMITTER_NAME", &self.author_name)
            .env("GIT_COMMITTER_EMAIL", &self.author_email)
            .args([
                "-c",
                "core.hooksPath=/dev/null",
                "-c",
                "core.fsmonitor=false",
                "-c",
                "protocol.file.allow=never",
                "-c",
                "submodule.recurse=false",
                // The worktree belongs to the sandbox's user, not to the server's: git's
                // ownership check would refuse it. What that check guards against (config
                // and hooks planted by another user) is already closed: `.git` is the
                // host's (read-only inside), hooks and fsmonitor are off.
                "-c",
                "safe.directory=*",
            ])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut entries = vec![("credential.helper".to_owned(), String::new())];
        if let Some(token) = token {
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
            entries.push((
                "http.extraHeader".into(),
                format!("Authorization: Basic {basic}"),
            ));
        }
        cmd.env("GIT_CONFIG_COUNT", entries.len().to_string());
        for (i, (k, v)) in entries.into_iter().enumerate() {
            cmd.env(format!("GIT_CONFIG_KEY_{i}"), k);
            cmd.env(format!("GIT_CONFIG_VALUE_{i}"), v);
        }
        cmd
    }

    async fn run(
        &self,
        op: &'static str,
        mut cmd: tokio::process::Command,
        timeout: Duration,
    ) -> Result<String, GitError> {
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| GitError::TimedOut(op))??;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(4).collect();
        Err(GitError::Failed {
            op,
            message: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
        })
    }

    /// Clones `url` into the empty directory `dest`, then checks out `branch`: the existing
    /// remote branch when `upstream` (an error if it does not exist), else a new branch from
    /// the default branch.
    pub async fn clone(
        &self,
        url: &str,
        token: Option<&str>,
        dest: &Path,
        branch: &str,
        upstream: bool,
    ) -> Result<(), GitError> {
        let mut cmd = self.git(dest, token);
        cmd.args(["clone", "--no-recurse-submodules", "--quiet"]);
        if upstream {
            cmd.args(["--branch", branch]);
        }
        cmd.args(["--", url, "."]);
        self.run("clone", cmd, Duration::from_millis(self.clone_timeout_ms))
            .await?;
        if !upstream {
            let mut cmd = self.git(dest, None);
            cmd.args(["checkout", "--quiet", "-b", branch]);
            self.run("checkout", cmd, Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    /// Stages everything and commits with `message`. Returns false when there was nothing to
    /// commit.
    pub async fn commit_all(&self, dir: &Path, message: &str) -> Result<bool, GitError> {
        let mut add = self.git(dir, None);
        add.args(["add", "--all"]);
        self.run("add", add, Duration::from_secs(60)).await?;
        let mut status = self.git(dir, None);
        status.args(["status", "--porcelain"]);
        if self
            .run("status", status, Duration::from_secs(60))
            .await?
            .is_empty()
        {
            return Ok(false);
        }
        let mut commit = self.git(dir, None);
        commit.args(["commit", "--quiet", "--no-verify", "-m", message]);
        self.run("commit", commit, Duration::from_secs(60)).await?;
        Ok(true)
    }

    /// Pushes `HEAD` to `branch` on `url` (never forced).
    pub async fn push(
        &self,
        dir: &Path,
        url: &str,
        token: Option<&str>,
        branch: &str,
    ) -> Result<(), GitError> {
        let mut cmd = self.git(dir, token);
        cmd.args([
            "push",
            "--quiet",
            "--no-verify",
            "--",
            url,
            &format!("HEAD:refs/heads/{branch}"),
        ]);
        self.run("push", cmd, Duration::from_millis(self.push_timeout_ms))
            .await
            .map(drop)
    }

    /// The checked-out branch, `None` on a detached HEAD or outside a repository.
    pub async fn current_branch(&self, dir: &Path) -> Option<String> {
        let mut cmd = self.git(dir, None);
        cmd.args(["symbolic-ref", "--quiet", "--short", "HEAD"]);
        self.run("symbolic-ref", cmd, Duration::from_secs(30))
            .await
            .ok()
            .filter(|b| !b.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remotes_are_checked() {
        let strict = GitConfig::default();
        assert_eq!(
            strict.remote_url(Some("acme/widgets"), None).unwrap(),
            "https://github.com/acme/widgets.git"
        );
        for bad in ["acme", "acme/", "../x", "a/b/c", "acme/wid gets"] {
            assert!(strict.remote_url(Some(bad), None).is_err(), "{bad}");
        }
        assert!(
            strict
                .remote_url(None, Some("https://git.example.com/a.git"))
                .is_ok()
        );
        for bad in [
            "http://git.example.com/a.git",
            "file:///etc",
            "ext::sh -c id",
            "git://example.com/a",
            "https://user:pw@git.example.com/a.git",
            "https://127.0.0.1/a.git",
            "https://10.0.0.1/a.git",
        ] {
            assert!(strict.remote_url(None, Some(bad)).is_err(), "{bad}");
        }
        assert!(strict.remote_url(None, None).is_err());
        assert!(strict.remote_url(Some("a/b"), Some("https://x/y")).is_err());
        let local = GitConfig {
            allow_http: true,
            allow_private_hosts: true,
            ..GitConfig::default()
        };
        assert!(
            local
                .remote_url(None, Some("http://127.0.0.1:9/a.git"))
                .is_ok()
        );
        assert!(local.remote_url(None, Some("file:///etc")).is_err());
    }
}
