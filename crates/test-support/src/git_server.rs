//! A real git server for tests: `git http-backend` (git's own smart-HTTP CGI program) behind
//! an axum listener on loopback, serving bare repositories from a temporary directory. Every
//! request must carry `Authorization: Basic base64(x-access-token:<token>)` with the server's
//! token, so tests prove the token travels in a header; pushes are allowed for that user. A
//! public server ([`GitServer::start_public`]) takes anyone, for clients that send no token.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncWriteExt;

/// A running git HTTP server.
pub struct GitServer {
    /// `http://127.0.0.1:<port>`; a repository is at `<base_url>/<name>.git`.
    pub base_url: String,
    /// The token clients must present.
    pub token: String,
    root: PathBuf,
    _dir: tempfile::TempDir,
    state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

struct ServerState {
    root: PathBuf,
    /// The `Authorization` header required; `None`: anyone.
    expected: Option<String>,
    /// Authorization header values seen (to check no request went without one).
    seen_auth: Mutex<Vec<Option<String>>>,
    /// Request URIs seen (to check no token ever appears in a URL).
    seen_uris: Mutex<Vec<String>>,
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn git(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Fixture")
        .env("GIT_AUTHOR_EMAIL", "fixture@example.com")
        .env("GIT_COMMITTER_NAME", "Fixture")
        .env("GIT_COMMITTER_EMAIL", "fixture@example.com")
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl GitServer {
    /// Starts a server whose token is `token`.
    pub async fn start(token: &str) -> Self {
        Self::start_with(Some(token)).await
    }

    /// Starts a server that asks for no token, to read or to push (`token` is empty).
    pub async fn start_public() -> Self {
        Self::start_with(None).await
    }

    async fn start_with(token: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("repos");
        std::fs::create_dir_all(&root).expect("repos dir");
        use base64::Engine as _;
        let encode = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let state = Arc::new(ServerState {
            root: root.clone(),
            expected: token.map(|token| {
                format!(
                    "Basic {}",
                    encode(format!("x-access-token:{token}").as_bytes())
                )
            }),
            seen_auth: Mutex::new(Vec::new()),
            seen_uris: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base_url = format!("http://{}", listener.local_addr().expect("addr"));
        let app = axum::Router::new().fallback(cgi).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base_url,
            token: token.unwrap_or_default().to_owned(),
            root,
            _dir: dir,
            state,
            task,
        }
    }

    /// Creates the bare repository `<name>.git` whose `main` holds `files` (path, content) in
    /// one commit; returns its URL.
    pub fn create_repo(&self, name: &str, files: &[(&str, &str)]) -> String {
        let work = self.root.join(format!("{name}-seed"));
        std::fs::create_dir_all(&work).expect("seed dir");
        git(&work, &["init", "--quiet", "--initial-branch=main"]);
        for (path, content) in files {
            let file = work.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("dirs");
            std::fs::write(file, content).expect("write");
        }
        git(&work, &["add", "--all"]);
        git(&work, &["commit", "--quiet", "-m", "initial"]);
        let bare = self.root.join(format!("{name}.git"));
        git(
            &self.root,
            &[
                "clone",
                "--quiet",
                "--bare",
                work.to_str().expect("utf-8"),
                bare.to_str().expect("utf-8"),
            ],
        );
        git(&bare, &["config", "http.receivepack", "true"]);
        std::fs::remove_dir_all(&work).expect("remove seed");
        format!("{}/{name}.git", self.base_url)
    }

    /// The content of `path` at the tip of `branch` of repository `name`, if both exist.
    pub fn file_at(&self, name: &str, branch: &str, path: &str) -> Option<String> {
        let out = std::process::Command::new("git")
            .current_dir(self.root.join(format!("{name}.git")))
            .args(["show", &format!("{branch}:{path}")])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Commits `files` (path, content) on a new branch `branch` started from `base` of
    /// repository `name`, as a pull request's head. Returns the base and head commit ids and
    /// `git diff base...branch` (what GitHub's diff media type returns).
    pub fn push_branch(
        &self,
        name: &str,
        base: &str,
        branch: &str,
        files: &[(&str, &str)],
    ) -> (String, String, String) {
        let bare = self.root.join(format!("{name}.git"));
        let work = self.root.join(format!("{name}-{branch}-work"));
        git(
            &self.root,
            &[
                "clone",
                "--quiet",
                "--branch",
                base,
                bare.to_str().expect("utf-8"),
                work.to_str().expect("utf-8"),
            ],
        );
        git(&work, &["checkout", "--quiet", "-b", branch]);
        for (path, content) in files {
            let file = work.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("dirs");
            std::fs::write(file, content).expect("write");
        }
        git(&work, &["add", "--all"]);
        git(&work, &["commit", "--quiet", "-m", "changes"]);
        git(&work, &["push", "--quiet", "origin", branch]);
        let out = |args: &[&str]| {
            let o = std::process::Command::new("git")
                .current_dir(&work)
                .args(args)
                .output()
                .expect("git runs");
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let base_sha = out(&["rev-parse", base]).trim().to_owned();
        let head_sha = out(&["rev-parse", "HEAD"]).trim().to_owned();
        let diff = out(&["diff", &format!("{base}...{branch}")]);
        std::fs::remove_dir_all(&work).expect("remove work tree");
        (base_sha, head_sha, diff)
    }

    /// The subject of the last commit of `branch`, if it exists.
    pub fn last_subject(&self, name: &str, branch: &str) -> Option<String> {
        let out = std::process::Command::new("git")
            .current_dir(self.root.join(format!("{name}.git")))
            .args(["log", "-1", "--format=%s%n%an <%ae>", branch])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Authorization headers of every request so far (`None` for a request without one).
    pub fn seen_auth(&self) -> Vec<Option<String>> {
        self.state.seen_auth.lock().expect("lock").clone()
    }

    /// Every request URI so far.
    pub fn seen_uris(&self) -> Vec<String> {
        self.state.seen_uris.lock().expect("lock").clone()
    }
}

async fn cgi(State(state): State<Arc<ServerState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let auth = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    state.seen_auth.lock().expect("lock").push(auth.clone());
    state
        .seen_uris
        .lock()
        .expect("lock")
        .push(parts.uri.to_string());
    if let Some(expected) = &state.expected
        && auth.as_deref() != Some(expected.as_str())
    {
        let mut res = (StatusCode::UNAUTHORIZED, "authentication required").into_response();
        res.headers_mut().insert(
            "www-authenticate",
            HeaderValue::from_static("Basic realm=\"git\""),
        );
        return res;
    }
    let body: Bytes = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(_) => return StatusCode::PAYLOAD_TOO_LARGE.into_response(),
    };
    let header = |h: &HeaderMap, name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &state.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REMOTE_USER", "x-access-token")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or_default())
        .env("CONTENT_TYPE", header(&parts.headers, "content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env(
            "HTTP_CONTENT_ENCODING",
            header(&parts.headers, "content-encoding"),
        )
        .env("GIT_PROTOCOL", header(&parts.headers, "git-protocol"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("git http-backend starts");
    let mut stdin = child.stdin.take().expect("stdin");
    let feed = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let out = child.wait_with_output().await.expect("http-backend runs");
    let _ = feed.await;
    // CGI output: headers, a blank line, the body.
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)));
    let Some((end, sep)) = split else {
        return (StatusCode::INTERNAL_SERVER_ERROR, out.stderr).into_response();
    };
    let mut response = Response::new(Body::from(raw[end + sep..].to_vec()));
    for line in String::from_utf8_lossy(&raw[..end]).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or("500");
            *response.status_mut() = code.parse().unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else if let (Ok(n), Ok(v)) = (
            axum::http::HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().insert(n, v);
        }
    }
    response
}
