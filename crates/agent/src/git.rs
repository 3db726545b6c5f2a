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
    /// Files auto-commit never stages: git glob patterns, matched against the file name at
    /// any depth when they hold no `/`, else against the path from the repository root.
    /// Default [`DEFAULT_NEVER_COMMIT`]; an empty list stages everything.
    pub never_commit: Vec<String>,
}

/// The default of `agent.git.never_commit`: environment files, keys, certificates and
/// credential files that an agent may create or copy into the workspace but that must not
/// reach the remote.
pub const DEFAULT_NEVER_COMMIT: &[&str] = &[
    ".env*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".npmrc",
    ".pypirc",
    ".netrc",
    ".git-credentials",
    "credentials*.json",
];

/// What [`GitConfig::commit_all`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommitOutcome {
    /// Whether a commit was made (false: nothing else to commit).
    pub committed: bool,
    /// Changed files left unstaged because they match `never_commit`, paths from the
    /// repository root.
    pub left_out: Vec<String>,
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
            never_commit: DEFAULT_NEVER_COMMIT
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
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
    /// The remote answered that the repository does not exist (or the token cannot see it:
    /// hosts such as GitHub answer 404 for both).
    #[error("the repository does not exist")]
    RepositoryNotFound,
    /// The branch asked for does not exist on the remote.
    #[error("the branch does not exist")]
    BranchNotFound,
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
        self.git_pinned(dir, token, None)
    }

    /// When private hosts are not allowed: resolves `url`'s host, refuses it if any of its
    /// addresses is not public, and returns the `http.curloptResolve` entry
    /// (`host:port:address`) that makes git connect to the address checked, so a second DNS
    /// answer cannot point it elsewhere. `None` when private hosts are allowed.
    ///
    /// Errors: [`GitError::BadRemote`] for a private or unresolvable host.
    async fn pin(&self, url: &str) -> Result<Option<String>, GitError> {
        if self.allow_private_hosts {
            return Ok(None);
        }
        let parsed = url::Url::parse(url)
            .map_err(|e| GitError::BadRemote(format!("gitUrl is not a URL: {e}")))?;
        let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
            return Err(GitError::BadRemote("gitUrl has no host".into()));
        };
        let ips = kilocloud_identity::net::GuardedResolver::new(false)
            .resolve_checked(host)
            .await
            .map_err(|e| {
                GitError::BadRemote(format!(
                    "{e} (the operator can allow private remotes with agent.git.allow_private_hosts)"
                ))
            })?;
        let ip = match ips[0] {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        };
        Ok(Some(format!("{host}:{port}:{ip}")))
    }

    /// [`GitConfig::git`], connecting to the address `resolve` pins (an `http.curloptResolve`
    /// entry) and following no redirects (which would resolve another host unchecked).
    fn git_pinned(
        &self,
        dir: &Path,
        token: Option<&str>,
        resolve: Option<&str>,
    ) -> tokio::process::Command {
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
        if let Some(resolve) = resolve {
            entries.push(("http.curloptResolve".into(), resolve.to_owned()));
            entries.push(("http.followRedirects".into(), "false".into()));
        }
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

    /// Runs `cmd`; its stdout, trimmed.
    async fn run(
        &self,
        op: &'static str,
        cmd: tokio::process::Command,
        timeout: Duration,
    ) -> Result<String, GitError> {
        Ok(self.run_raw(op, cmd, timeout).await?.trim().to_owned())
    }

    /// Runs `cmd`; its stdout as printed.
    async fn run_raw(
        &self,
        op: &'static str,
        mut cmd: tokio::process::Command,
        timeout: Duration,
    ) -> Result<String, GitError> {
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| GitError::TimedOut(op))??;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
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
    ///
    /// Unless private hosts are allowed, the remote's host must resolve to public addresses
    /// only, and git connects to the address checked.
    ///
    /// Errors: [`GitError::BadRemote`] for a host resolving to a private address;
    /// [`GitError::RepositoryNotFound`], [`GitError::BranchNotFound`] (`upstream`), else as
    /// git failed.
    pub async fn clone(
        &self,
        url: &str,
        token: Option<&str>,
        dest: &Path,
        branch: &str,
        upstream: bool,
    ) -> Result<(), GitError> {
        let resolve = self.pin(url).await?;
        let mut cmd = self.git_pinned(dest, token, resolve.as_deref());
        cmd.args(["clone", "--no-recurse-submodules", "--quiet"]);
        if upstream {
            cmd.args(["--branch", branch]);
        }
        cmd.args(["--", url, "."]);
        self.run("clone", cmd, Duration::from_millis(self.clone_timeout_ms))
            .await
            .map_err(classify_clone_failure)?;
        if !upstream {
            let mut cmd = self.git(dest, None);
            cmd.args(["checkout", "--quiet", "-b", branch]);
            self.run("checkout", cmd, Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    /// Stages every change except files matching `never_commit` and commits with `message`.
    /// Reports whether there was anything to commit and which changed files were left out.
    pub async fn commit_all(&self, dir: &Path, message: &str) -> Result<CommitOutcome, GitError> {
        let mut add = self.git(dir, None);
        add.args(["add", "--all", "--", "."]);
        add.args(self.never_commit.iter().map(|p| exclude_pathspec(p)));
        self.run("add", add, Duration::from_secs(60)).await?;
        let mut staged = self.git(dir, None);
        staged.args(["diff", "--cached", "--name-only", "-z"]);
        let staged = self.run("diff", staged, Duration::from_secs(60)).await?;
        let mut left = self.git(dir, None);
        left.args(["status", "--porcelain", "-z", "--untracked-files=all"]);
        let left = self
            .run_raw("status", left, Duration::from_secs(60))
            .await?;
        let left_out = unstaged_paths(&left);
        if staged.is_empty() {
            return Ok(CommitOutcome {
                committed: false,
                left_out,
            });
        }
        let mut commit = self.git(dir, None);
        commit.args(["commit", "--quiet", "--no-verify", "-m", message]);
        self.run("commit", commit, Duration::from_secs(60)).await?;
        Ok(CommitOutcome {
            committed: true,
            left_out,
        })
    }

    /// Pushes `HEAD` to `branch` on `url` (never forced), checked and pinned as
    /// [`GitConfig::clone`].
    pub async fn push(
        &self,
        dir: &Path,
        url: &str,
        token: Option<&str>,
        branch: &str,
    ) -> Result<(), GitError> {
        let resolve = self.pin(url).await?;
        let mut cmd = self.git_pinned(dir, token, resolve.as_deref());
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

    /// Clones `url` into the empty directory `dest` and checks out the commit `sha`
    /// detached, as CI needs: a ref outside the branches (`refs/pull/7/head`) is fetched
    /// first; HEAD is then verified to be `sha` (reference `kici.md` §10: clone at the ref,
    /// token in a header, HEAD checked against the sha).
    ///
    /// Errors: as [`GitConfig::clone`]; [`GitError::Failed`] when the commit is not there.
    pub async fn clone_at(
        &self,
        url: &str,
        token: Option<&str>,
        dest: &Path,
        git_ref: &str,
        sha: &str,
    ) -> Result<(), GitError> {
        let resolve = self.pin(url).await?;
        let mut cmd = self.git_pinned(dest, token, resolve.as_deref());
        cmd.args([
            "clone",
            "--no-recurse-submodules",
            "--no-checkout",
            "--quiet",
        ]);
        cmd.args(["--", url, "."]);
        self.run("clone", cmd, Duration::from_millis(self.clone_timeout_ms))
            .await
            .map_err(classify_clone_failure)?;
        if !git_ref.is_empty() && !git_ref.starts_with("refs/heads/") {
            let mut fetch = self.git_pinned(dest, token, resolve.as_deref());
            fetch.args(["fetch", "--quiet", "origin", "--", git_ref]);
            self.run("fetch", fetch, Duration::from_millis(self.clone_timeout_ms))
                .await?;
        }
        let mut checkout = self.git(dest, None);
        checkout.args(["checkout", "--quiet", "--detach", sha, "--"]);
        self.run("checkout", checkout, Duration::from_secs(60))
            .await?;
        let mut head = self.git(dest, None);
        head.args(["rev-parse", "HEAD"]);
        let head = self.run("rev-parse", head, Duration::from_secs(30)).await?;
        if head != sha {
            return Err(GitError::Failed {
                op: "checkout",
                message: format!("HEAD is {head}, not {sha}"),
            });
        }
        Ok(())
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

/// The paths `git status --porcelain -z` reports with unstaged changes. Entries are
/// `XY path`, the work tree's column Y set for what stayed unstaged; a rename or copy (X `R`
/// or `C`) is followed by its source path as an entry of its own.
fn unstaged_paths(status: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut entries = status.split('\0').filter(|e| !e.is_empty());
    while let Some(entry) = entries.next() {
        let bytes = entry.as_bytes();
        if bytes.len() < 4 {
            continue;
        }
        if matches!(bytes[0], b'R' | b'C') {
            entries.next();
        }
        if bytes[1] != b' ' {
            paths.push(entry[3..].to_owned());
        }
    }
    paths
}

/// The git pathspec excluding `pattern` (a `never_commit` entry): a name pattern matches at
/// any depth, a path pattern from the root.
fn exclude_pathspec(pattern: &str) -> String {
    let pattern = pattern.trim_start_matches('/');
    if pattern.contains('/') {
        format!(":(exclude,glob){pattern}")
    } else {
        format!(":(exclude,glob)**/{pattern}")
    }
}

/// Recognises git's messages for a missing repository (`fatal: repository '…' not found`,
/// the HTTP 404 of smart HTTP) and a missing `--branch` (`fatal: Remote branch … not found in
/// upstream origin`).
fn classify_clone_failure(e: GitError) -> GitError {
    match &e {
        GitError::Failed { message, .. } => {
            let lower = message.to_ascii_lowercase();
            if lower.contains("remote branch") && lower.contains("not found") {
                GitError::BranchNotFound
            } else if lower.contains("repository") && lower.contains("not found") {
                GitError::RepositoryNotFound
            } else {
                e
            }
        }
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real repository with a change of every kind: only the files matching no
    /// `never_commit` pattern are committed; the others stay in the work tree, reported.
    #[tokio::test]
    async fn auto_commit_leaves_secret_files_out() {
        let dir = tempfile::tempdir().unwrap();
        let git = GitConfig::default();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .current_dir(dir.path())
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        run(&["init", "--quiet", "--initial-branch=main"]);
        let files = [
            ("src/main.rs", true),
            ("README.md", true),
            ("config/settings.json", true),
            (".gitignore", true),
            ("environment.md", true),
            (".env", false),
            (".env.local", false),
            ("app/.env.production", false),
            ("certs/server.pem", false),
            ("tls.key", false),
            ("id_rsa", false),
            ("home/.ssh/id_ed25519.pub", false),
            (".npmrc", false),
            ("sub/.netrc", false),
            ("credentials.json", false),
            ("gcp/credentials-prod.json", false),
        ];
        for (path, _) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "TOKEN=hunter2\n").unwrap();
        }
        let outcome = git.commit_all(dir.path(), "work").await.unwrap();
        assert!(outcome.committed);
        let committed: std::collections::BTreeSet<String> =
            run(&["ls-files"]).lines().map(str::to_owned).collect();
        let want: std::collections::BTreeSet<String> = files
            .iter()
            .filter(|(_, commit)| *commit)
            .map(|(p, _)| (*p).to_owned())
            .collect();
        assert_eq!(committed, want);
        let mut left_out = outcome.left_out.clone();
        left_out.sort();
        let mut secret: Vec<String> = files
            .iter()
            .filter(|(_, commit)| !*commit)
            .map(|(p, _)| (*p).to_owned())
            .collect();
        secret.sort();
        assert_eq!(left_out, secret);
        // Nothing else changed: no commit, the same files left out.
        let again = git.commit_all(dir.path(), "again").await.unwrap();
        assert!(!again.committed);
        assert_eq!(again.left_out.len(), secret.len());
        // An empty list commits everything.
        let everything = GitConfig {
            never_commit: Vec::new(),
            ..GitConfig::default()
        };
        assert!(
            everything
                .commit_all(dir.path(), "all")
                .await
                .unwrap()
                .committed
        );
        assert_eq!(run(&["ls-files"]).lines().count(), files.len());
    }

    /// A remote named by a host that resolves to loopback is refused unless private hosts
    /// are allowed; git connects to the address checked.
    #[tokio::test]
    async fn remotes_resolving_to_private_addresses_are_refused() {
        let server = kilocloud_test_support::git_server::GitServer::start("t0ken").await;
        let url = server.create_repo("r", &[("a.txt", "a\n")]);
        let by_name = url.replace("127.0.0.1", "localhost");
        assert_ne!(by_name, url);
        let strict = GitConfig {
            allow_http: true,
            ..GitConfig::default()
        };
        let dest = tempfile::tempdir().unwrap();
        let err = strict
            .clone(&by_name, Some("t0ken"), dest.path(), "work", false)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, GitError::BadRemote(m) if m.contains("non-public address")),
            "{err:?}"
        );
        assert!(server.seen_uris().is_empty(), "git never connected");
        let open = GitConfig {
            allow_private_hosts: true,
            ..Clone::clone(&strict)
        };
        open.clone(&by_name, Some("t0ken"), dest.path(), "work", false)
            .await
            .unwrap();
        assert!(dest.path().join("a.txt").exists());
        // Pinning: the entry carries the checked address.
        let pinned = GitConfig {
            allow_private_hosts: false,
            ..open
        };
        assert!(pinned.pin(&by_name).await.is_err());
        assert_eq!(
            GitConfig::default()
                .pin("https://203.0.113.7:8443/a.git")
                .await
                .unwrap()
                .as_deref(),
            Some("203.0.113.7:8443:203.0.113.7")
        );
    }

    #[test]
    fn clone_failures_are_classified() {
        let failed = |m: &str| GitError::Failed {
            op: "clone",
            message: m.into(),
        };
        for (message, want) in [
            (
                "remote: Repository not found. / fatal: repository 'https://github.com/a/b.git/' not found",
                "RepositoryNotFound",
            ),
            (
                "warning: Could not find remote branch nope to clone. / fatal: Remote branch nope not found in upstream origin",
                "BranchNotFound",
            ),
            (
                "fatal: Authentication failed for 'https://x/a.git/'",
                "Failed",
            ),
        ] {
            let got = format!("{:?}", classify_clone_failure(failed(message)));
            assert!(got.starts_with(want), "{message}: {got}");
        }
    }

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
