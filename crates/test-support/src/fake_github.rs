//! A fake GitHub REST API (the documented `api.github.com` protocol) for one GitHub App, on a
//! real loopback socket, with fault injection.
//!
//! Authentication works as on GitHub: `/app/...` takes `Authorization: Bearer <JWT>`, an RS256
//! JWT signed with the app's key ([`APP_PRIVATE_KEY_PEM`]) whose `iss` is the app id (a number
//! or a string), `exp` in the future and at most 10 min (+60 s of drift) after `iat`.
//! Repository endpoints take an installation token the fake issued (`Bearer` or `token`
//! scheme), not expired, for an installation on the `{owner}` account; otherwise 401, or 404
//! for another account's repository (GitHub hides it). Errors carry GitHub's error JSON.
//!
//! Endpoints: installations and installation tokens; pull requests (JSON, the unified diff
//! with the `application/vnd.github.v3.diff` media type, files, reviews whose inline comments
//! must sit on lines of the diff, creation); check runs; issue labels and comments; refs and
//! branches. Everything else answers 404. Requests and writes are recorded for assertions;
//! [`FakeGitHub::fail_next`] and [`FakeGitHub::set_latency`] inject faults.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

/// The test GitHub App's private key (PKCS#8 PEM), a throwaway committed for tests.
pub const APP_PRIVATE_KEY_PEM: &str = include_str!("../fixtures/github-app-test-key.pem");
/// The public half of [`APP_PRIVATE_KEY_PEM`] (SPKI PEM): the fake verifies app JWTs with it.
pub const APP_PUBLIC_KEY_PEM: &str = include_str!("../fixtures/github-app-test-key.pub.pem");

/// Login of the app's bot user, the author of reviews and comments.
pub const BOT_LOGIN: &str = "kilo-code-bot[bot]";

const DOCS_URL: &str = "https://docs.github.com/rest";
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Longest app JWT GitHub accepts (`exp - iat`): 10 min, plus 60 s of clock drift.
const MAX_JWT_LIFETIME_SECS: u64 = 600 + 60;

/// A pull request the fake serves.
#[derive(Debug, Clone, Default)]
pub struct FakePull {
    /// Its number.
    pub number: u64,
    /// Title.
    pub title: String,
    /// Description.
    pub body: String,
    /// Whether it is a draft.
    pub draft: bool,
    /// Head commit.
    pub head_sha: String,
    /// Head branch (without `refs/heads/`).
    pub head_ref: String,
    /// Base commit.
    pub base_sha: String,
    /// Base branch (without `refs/heads/`).
    pub base_ref: String,
    /// The unified diff (`git diff` output, one `diff --git` section per file).
    pub diff: String,
}

/// A review the fake accepted.
#[derive(Debug, Clone)]
pub struct RecordedReview {
    /// Repository owner, as in the request path.
    pub owner: String,
    /// Repository name, as in the request path.
    pub repo: String,
    /// Pull request number.
    pub number: u64,
    /// The request body as sent.
    pub body: Value,
}

/// An issue or pull request comment the fake accepted.
#[derive(Debug, Clone)]
pub struct RecordedComment {
    /// Repository owner, as in the request path.
    pub owner: String,
    /// Repository name, as in the request path.
    pub repo: String,
    /// Issue or pull request number.
    pub number: u64,
    /// The comment's text.
    pub body: String,
}

/// A request the fake received. The Authorization header's value is never kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// Whether an `Authorization` header was present.
    pub has_authorization: bool,
}

struct Installation {
    login: String,
    account_type: String,
    suspended: bool,
}

struct IssuedToken {
    installation: u64,
    expires_at: DateTime<Utc>,
}

struct StoredPull {
    owner: String,
    repo: String,
    pull: FakePull,
}

struct Fault {
    prefix: String,
    remaining: usize,
    status: u16,
}

/// Repository key: owner and name, lowercased (GitHub's names are case-insensitive).
type RepoKey = (String, String);

fn repo_key(owner: &str, repo: &str) -> RepoKey {
    (owner.to_ascii_lowercase(), repo.to_ascii_lowercase())
}

#[derive(Default)]
struct Inner {
    installations: BTreeMap<u64, Installation>,
    /// Issued token to the installations it was issued for (several with a fixed token).
    tokens: HashMap<String, Vec<IssuedToken>>,
    fixed_token: Option<String>,
    token_ttl: Duration,
    tokens_issued: usize,
    pulls: BTreeMap<(RepoKey, u64), StoredPull>,
    created_pulls: Vec<Value>,
    reviews: Vec<RecordedReview>,
    check_runs: Vec<(RepoKey, Value)>,
    /// Every status a check run was given, in order: (id, `status` or `completed:<conclusion>`).
    check_run_history: Vec<(u64, String)>,
    /// File contents per repository, ref and path (`GET …/contents/{path}?ref=`).
    files: HashMap<(RepoKey, String, String), String>,
    content_fetches: usize,
    labels: HashMap<(RepoKey, u64), Vec<String>>,
    comments: Vec<RecordedComment>,
    /// Full ref name (`refs/heads/main`) to commit, per repository.
    refs: HashMap<RepoKey, BTreeMap<String, String>>,
    requests: Vec<RecordedRequest>,
    faults: Vec<Fault>,
    latency: Duration,
    last_id: u64,
}

impl Inner {
    fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }
}

struct FakeState {
    app_id: u64,
    base_url: String,
    key: DecodingKey,
    inner: Mutex<Inner>,
}

/// The running fake; stops when dropped.
pub struct FakeGitHub {
    /// `http://127.0.0.1:PORT`, the API base URL clients configure (like
    /// `https://api.github.com`).
    pub base_url: String,
    state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGitHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeGitHub {
    /// Starts the API of the app `app_id` (key pair: the committed fixture) on a free loopback
    /// port.
    pub async fn start(app_id: u64) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let base_url = format!("http://{addr}");
        let state = Arc::new(FakeState {
            app_id,
            base_url: base_url.clone(),
            key: DecodingKey::from_rsa_der(&pem_der(APP_PUBLIC_KEY_PEM)),
            inner: Mutex::new(Inner {
                token_ttl: DEFAULT_TOKEN_TTL,
                ..Inner::default()
            }),
        });
        let repos = "/repos/{owner}/{repo}";
        let app = Router::new()
            .route("/app/installations/{id}", get(get_installation))
            .route("/app/installations/{id}/access_tokens", post(create_token))
            .route(&format!("{repos}/pulls"), post(create_pull))
            .route(&format!("{repos}/pulls/{{number}}"), get(get_pull))
            .route(&format!("{repos}/pulls/{{number}}/files"), get(pull_files))
            .route(
                &format!("{repos}/pulls/{{number}}/reviews"),
                post(create_review),
            )
            .route(&format!("{repos}/check-runs"), post(create_check_run))
            .route(&format!("{repos}/contents/{{*path}}"), get(get_contents))
            .route(
                &format!("{repos}/check-runs/{{id}}"),
                patch(update_check_run),
            )
            .route(
                &format!("{repos}/issues/{{number}}/labels"),
                get(list_labels).post(add_labels),
            )
            .route(
                &format!("{repos}/issues/{{number}}/comments"),
                post(create_comment),
            )
            .route(&format!("{repos}/git/refs"), post(create_ref))
            .route(&format!("{repos}/branches/{{*branch}}"), get(get_branch))
            .fallback(not_found)
            .method_not_allowed_fallback(not_found)
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                record_and_inject,
            ))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base_url,
            state,
            task,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.inner.lock().expect("lock")
    }

    /// Installs the app on the account `account_login` (`User` or `Organization`) as
    /// installation `id`.
    pub fn add_installation(&self, id: u64, account_login: &str, account_type: &str) {
        self.lock().installations.insert(
            id,
            Installation {
                login: account_login.to_owned(),
                account_type: account_type.to_owned(),
                suspended: false,
            },
        );
    }

    /// Suspends (or unsuspends) installation `id`: `suspended_at` is set and, as on GitHub,
    /// minting a token for it answers 403.
    pub fn set_suspended(&self, id: u64, suspended: bool) {
        if let Some(i) = self.lock().installations.get_mut(&id) {
            i.suspended = suspended;
        }
    }

    /// Serves `pull` in `owner/repo`; its head and base branches exist at its head and base
    /// commits.
    pub fn add_pull(&self, owner: &str, repo: &str, pull: FakePull) {
        let mut inner = self.lock();
        let key = repo_key(owner, repo);
        let refs = inner.refs.entry(key.clone()).or_default();
        for (branch, sha) in [
            (&pull.head_ref, &pull.head_sha),
            (&pull.base_ref, &pull.base_sha),
        ] {
            if !branch.is_empty() {
                refs.insert(format!("refs/heads/{branch}"), sha.clone());
            }
        }
        let stored = StoredPull {
            owner: owner.to_owned(),
            repo: repo.to_owned(),
            pull,
        };
        inner.pulls.insert((key, stored.pull.number), stored);
    }

    /// Creates (or moves) the branch `branch` of `owner/repo` at `sha`.
    pub fn add_branch(&self, owner: &str, repo: &str, branch: &str, sha: &str) {
        self.lock()
            .refs
            .entry(repo_key(owner, repo))
            .or_default()
            .insert(format!("refs/heads/{branch}"), sha.to_owned());
    }

    /// The commit of branch `branch` of `owner/repo`, if it exists (set up or created through
    /// `POST /git/refs`).
    pub fn branch_sha(&self, owner: &str, repo: &str, branch: &str) -> Option<String> {
        self.lock()
            .refs
            .get(&repo_key(owner, repo))?
            .get(&format!("refs/heads/{branch}"))
            .cloned()
    }

    /// Makes every token issued from now on exactly `token` (`None`: random `ghs_…` tokens).
    pub fn set_fixed_token(&self, token: Option<String>) {
        self.lock().fixed_token = token;
    }

    /// Lifetime of tokens issued from now on (default 1 h).
    pub fn set_token_ttl(&self, ttl: Duration) {
        self.lock().token_ttl = ttl;
    }

    /// How many installation tokens were issued.
    pub fn tokens_issued(&self) -> usize {
        self.lock().tokens_issued
    }

    /// The reviews accepted so far, in order.
    pub fn reviews(&self) -> Vec<RecordedReview> {
        self.lock().reviews.clone()
    }

    /// Serves `contents` as the file `path` of `owner/repo` at `git_ref` (a sha, branch or
    /// tag, matched exactly) through the contents API.
    pub fn add_file(&self, owner: &str, repo: &str, git_ref: &str, path: &str, contents: &str) {
        self.lock().files.insert(
            (repo_key(owner, repo), git_ref.to_owned(), path.to_owned()),
            contents.to_owned(),
        );
    }

    /// Contents API requests answered so far (found or not).
    pub fn content_fetches(&self) -> usize {
        self.lock().content_fetches
    }

    /// The statuses check run `id` was given, in order: `queued`, `in_progress`, …, and
    /// `completed:<conclusion>` once a conclusion was set.
    pub fn check_run_history(&self, id: u64) -> Vec<String> {
        self.lock()
            .check_run_history
            .iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// The latest state of each check run created so far, in creation order, as GitHub
    /// answers it (`id`, `name`, `head_sha`, `status`, `conclusion`, `output`, `url`, ...).
    pub fn check_runs(&self) -> Vec<Value> {
        self.lock()
            .check_runs
            .iter()
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The labels now on issue or pull request `number` of `owner/repo`.
    pub fn labels(&self, owner: &str, repo: &str, number: u64) -> Vec<String> {
        self.lock()
            .labels
            .get(&(repo_key(owner, repo), number))
            .cloned()
            .unwrap_or_default()
    }

    /// The issue comments accepted so far, in order.
    pub fn issue_comments(&self) -> Vec<RecordedComment> {
        self.lock().comments.clone()
    }

    /// The pull requests created through `POST /pulls`, as GitHub answered them (`number`,
    /// `title`, `body`, `draft`, `head.ref`, `base.ref`, ...).
    pub fn created_pulls(&self) -> Vec<Value> {
        self.lock().created_pulls.clone()
    }

    /// Every request received so far, faulted ones included.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// The next `count` requests whose path starts with `path_prefix` answer `status` with
    /// GitHub's error JSON; 403 and 429 carry exhausted rate-limit headers
    /// (`x-ratelimit-remaining: 0`, `x-ratelimit-reset`), 429 also `retry-after: 1`.
    pub fn fail_next(&self, path_prefix: &str, count: usize, status: u16) {
        self.lock().faults.push(Fault {
            prefix: path_prefix.to_owned(),
            remaining: count,
            status,
        });
    }

    /// Delays every response by `d` (default zero).
    pub fn set_latency(&self, d: Duration) {
        self.lock().latency = d;
    }
}

// ---------------------------------------------------------------------------------------------
// Responses, authentication, faults

/// A GitHub error answer: a status and GitHub's error JSON.
struct GhError {
    status: StatusCode,
    body: Value,
}

impl IntoResponse for GhError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

type Answer = Result<Response, GhError>;

fn gh_error(status: StatusCode, message: &str) -> GhError {
    GhError {
        status,
        body: json!({"message": message, "documentation_url": DOCS_URL}),
    }
}

/// 422 `Unprocessable Entity` with one error string, as review validation answers.
fn unprocessable(error: &str) -> GhError {
    GhError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        body: json!({"message": "Unprocessable Entity", "errors": [error],
            "documentation_url": DOCS_URL}),
    }
}

/// 422 `Validation Failed` with structured errors, as resource creation answers.
fn validation_failed(errors: Value) -> GhError {
    GhError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        body: json!({"message": "Validation Failed", "errors": errors,
            "documentation_url": DOCS_URL}),
    }
}

fn created(body: Value) -> Answer {
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

fn ok(body: Value) -> Answer {
    Ok(Json(body).into_response())
}

async fn not_found() -> GhError {
    gh_error(StatusCode::NOT_FOUND, "Not Found")
}

/// A GitHub user object (`simple-user`) with every field GitHub always sends.
fn user_json(base_url: &str, login: &str, id: u64, kind: &str) -> Value {
    let api = format!("{base_url}/users/{login}");
    json!({
        "login": login, "id": id, "node_id": format!("U_{id}"), "type": kind,
        "site_admin": false, "gravatar_id": "",
        "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}?v=4"),
        "html_url": format!("https://github.com/{login}"),
        "url": api, "followers_url": format!("{api}/followers"),
        "following_url": format!("{api}/following{{/other_user}}"),
        "gists_url": format!("{api}/gists{{/gist_id}}"),
        "starred_url": format!("{api}/starred{{/owner}}{{/repo}}"),
        "subscriptions_url": format!("{api}/subscriptions"),
        "organizations_url": format!("{api}/orgs"), "repos_url": format!("{api}/repos"),
        "events_url": format!("{api}/events{{/privacy}}"),
        "received_events_url": format!("{api}/received_events"),
    })
}

/// The app's bot user, author of reviews and comments.
fn bot_json(base_url: &str) -> Value {
    user_json(base_url, BOT_LOGIN, 2, "Bot")
}

/// A repository object (the fields GitHub always sends, and the owner).
fn repo_json(base_url: &str, owner: &str, repo: &str) -> Value {
    // A stable id per repository.
    let id = format!("{owner}/{repo}")
        .to_ascii_lowercase()
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
        % 1_000_000_000;
    json!({
        "id": id, "node_id": format!("R_{id}"), "name": repo,
        "full_name": format!("{owner}/{repo}"), "private": true, "fork": false,
        "owner": user_json(base_url, owner, 3, "Organization"),
        "html_url": format!("https://github.com/{owner}/{repo}"),
        "url": format!("{base_url}/repos/{owner}/{repo}"),
    })
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A JSON request body; 400 `Problems parsing JSON` like GitHub when it is not JSON.
fn parse_json(body: &Bytes) -> Result<Value, GhError> {
    serde_json::from_slice(body)
        .map_err(|_| gh_error(StatusCode::BAD_REQUEST, "Problems parsing JSON"))
}

/// The credential of `Authorization: Bearer <x>` (or `token <x>` when `token_scheme`).
fn credential(headers: &HeaderMap, token_scheme: bool) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    let known = scheme.eq_ignore_ascii_case("bearer")
        || (token_scheme && scheme.eq_ignore_ascii_case("token"));
    known.then(|| rest.trim())
}

/// The public key (SPKI) or private key (PKCS#8) DER inside a PEM.
fn pem_der(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .expect("the fixture key is valid PEM")
}

impl FakeState {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("lock")
    }

    /// Checks the app JWT of `/app/...` requests.
    fn app_auth(&self, headers: &HeaderMap) -> Result<(), GhError> {
        let unauthorized = |m: &str| gh_error(StatusCode::UNAUTHORIZED, m);
        let Some(jwt) = credential(headers, false) else {
            return Err(unauthorized(
                "A JSON web token could not be decoded (Authorization: Bearer <JWT> required)",
            ));
        };
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        let claims = match jsonwebtoken::decode::<Value>(jwt, &self.key, &validation) {
            Ok(data) => data.claims,
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                return Err(unauthorized(
                    "'Expiration time' claim ('exp') must be a numeric value representing the \
                     future time at which the assertion expires",
                ));
            }
            Err(_) => return Err(unauthorized("A JSON web token could not be decoded")),
        };
        let iss = match &claims["iss"] {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse::<u64>().ok(),
            _ => None,
        };
        if iss != Some(self.app_id) {
            return Err(unauthorized(
                "'Issuer' claim ('iss') must be the app's id (Integration not found)",
            ));
        }
        let now = Utc::now().timestamp().max(0) as u64;
        let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
            return Err(unauthorized(
                "'Issued at' claim ('iat') must be an Integer representing the time that the \
                 assertion was issued",
            ));
        };
        if iat > now + 60 {
            return Err(unauthorized(
                "'Issued at' claim ('iat') must be an Integer representing a time in the past",
            ));
        }
        if exp.saturating_sub(iat) > MAX_JWT_LIFETIME_SECS {
            return Err(unauthorized(
                "'Expiration time' claim ('exp') is too far in the future",
            ));
        }
        Ok(())
    }

    /// Checks the installation token of a `/repos/{owner}/...` request.
    fn repo_auth(&self, headers: &HeaderMap, owner: &str) -> Result<(), GhError> {
        let Some(token) = credential(headers, true) else {
            return Err(gh_error(
                StatusCode::UNAUTHORIZED,
                "Requires authentication",
            ));
        };
        let inner = self.lock();
        let now = Utc::now();
        let live: Vec<&IssuedToken> = inner
            .tokens
            .get(token)
            .into_iter()
            .flatten()
            .filter(|t| now < t.expires_at)
            .collect();
        if live.is_empty() {
            return Err(gh_error(StatusCode::UNAUTHORIZED, "Bad credentials"));
        }
        let owns = |t: &&IssuedToken| {
            inner
                .installations
                .get(&t.installation)
                .is_some_and(|i| i.login.eq_ignore_ascii_case(owner))
        };
        if live.iter().any(owns) {
            Ok(())
        } else {
            // GitHub hides another account's repository.
            Err(gh_error(StatusCode::NOT_FOUND, "Not Found"))
        }
    }
}

/// Middleware: records the request, waits the latency, answers an injected fault if one
/// matches.
async fn record_and_inject(
    State(state): State<Arc<FakeState>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let (latency, fault) = {
        let mut inner = state.lock();
        inner.requests.push(RecordedRequest {
            method: request.method().to_string(),
            path: path.clone(),
            has_authorization: request.headers().contains_key(header::AUTHORIZATION),
        });
        let fault = inner
            .faults
            .iter_mut()
            .find(|f| f.remaining > 0 && path.starts_with(&f.prefix))
            .map(|f| {
                f.remaining -= 1;
                f.status
            });
        inner.faults.retain(|f| f.remaining > 0);
        (inner.latency, fault)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault {
        Some(status) => fault_response(status),
        None => next.run(request).await,
    }
}

fn fault_response(status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = match status {
        401 => "Bad credentials",
        403 => "API rate limit exceeded for installation.",
        429 => "You have exceeded a secondary rate limit.",
        _ => code.canonical_reason().unwrap_or("Error"),
    };
    let mut response = gh_error(code, message).into_response();
    if status == 403 || status == 429 {
        let reset = Utc::now().timestamp() + 60;
        let h = response.headers_mut();
        h.insert("x-ratelimit-limit", HeaderValue::from_static("5000"));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        h.insert("x-ratelimit-used", HeaderValue::from_static("5000"));
        h.insert("x-ratelimit-resource", HeaderValue::from_static("core"));
        h.insert("x-ratelimit-reset", HeaderValue::from(reset));
        if status == 429 {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
    }
    response
}

// ---------------------------------------------------------------------------------------------
// App endpoints

async fn get_installation(
    State(s): State<Arc<FakeState>>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Answer {
    s.app_auth(&headers)?;
    let inner = s.lock();
    let i = inner
        .installations
        .get(&id)
        .ok_or_else(|| gh_error(StatusCode::NOT_FOUND, "Not Found"))?;
    let suspended_at = i.suspended.then_some("2026-01-01T00:00:00Z");
    ok(json!({
        "id": id,
        "account": user_json(&s.base_url, &i.login, 100_000 + id, &i.account_type),
        "permissions": {"contents": "write", "pull_requests": "write", "issues": "write",
            "checks": "write", "metadata": "read"},
        "events": ["pull_request", "issue_comment", "push"],
        "app_id": s.app_id,
        "app_slug": "kilo-code-bot",
        "target_id": 100_000 + id,
        "target_type": i.account_type,
        "suspended_at": suspended_at,
        "repository_selection": "all",
        "access_tokens_url": format!("{}/app/installations/{id}/access_tokens", s.base_url),
        "html_url": format!("https://github.com/settings/installations/{id}"),
    }))
}

async fn create_token(
    State(s): State<Arc<FakeState>>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Answer {
    s.app_auth(&headers)?;
    let mut inner = s.lock();
    match inner.installations.get(&id) {
        None => return Err(gh_error(StatusCode::NOT_FOUND, "Not Found")),
        Some(i) if i.suspended => {
            return Err(gh_error(
                StatusCode::FORBIDDEN,
                "This installation has been suspended",
            ));
        }
        Some(_) => {}
    }
    let token = inner.fixed_token.clone().unwrap_or_else(random_token);
    let ttl = TimeDelta::from_std(inner.token_ttl).unwrap_or(TimeDelta::hours(1));
    let expires_at = Utc::now() + ttl;
    let issued = inner.tokens.entry(token.clone()).or_default();
    issued.retain(|t| t.installation != id);
    issued.push(IssuedToken {
        installation: id,
        expires_at,
    });
    inner.tokens_issued += 1;
    created(json!({
        "token": token,
        "expires_at": expires_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        "permissions": {"contents": "write", "pull_requests": "write", "issues": "write",
            "checks": "write", "metadata": "read"},
        "repository_selection": "all",
    }))
}

fn random_token() -> String {
    use rand::Rng as _;
    let suffix: String = rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(36)
        .map(char::from)
        .collect();
    format!("ghs_{suffix}")
}

// ---------------------------------------------------------------------------------------------
// Pull requests

fn pull_json(base_url: &str, p: &StoredPull) -> Value {
    let full_name = format!("{}/{}", p.owner, p.repo);
    let n = p.pull.number;
    let repo = repo_json(base_url, &p.owner, &p.repo);
    json!({
        "id": 1_000_000 + n,
        "node_id": format!("PR_{n}"),
        "number": n,
        "state": "open",
        "draft": p.pull.draft,
        "title": p.pull.title,
        "body": p.pull.body,
        "url": format!("{base_url}/repos/{full_name}/pulls/{n}"),
        "html_url": format!("https://github.com/{full_name}/pull/{n}"),
        "diff_url": format!("https://github.com/{full_name}/pull/{n}.diff"),
        "user": user_json(base_url, "octocat", 1, "User"),
        "head": {"label": format!("{}:{}", p.owner, p.pull.head_ref), "ref": p.pull.head_ref,
            "sha": p.pull.head_sha, "repo": repo},
        "base": {"label": format!("{}:{}", p.owner, p.pull.base_ref), "ref": p.pull.base_ref,
            "sha": p.pull.base_sha, "repo": repo},
    })
}

/// Whether `Accept` asks for the diff media type.
fn wants_diff(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.split(';').next().unwrap_or_default().trim())
        .any(|t| t == "application/vnd.github.v3.diff" || t == "application/vnd.github.diff")
}

/// Runs `f` on pull `number` of `owner/repo`, or answers 404.
fn with_pull<T>(
    s: &FakeState,
    owner: &str,
    repo: &str,
    number: u64,
    f: impl FnOnce(&StoredPull) -> T,
) -> Result<T, GhError> {
    let inner = s.lock();
    inner
        .pulls
        .get(&(repo_key(owner, repo), number))
        .map(f)
        .ok_or_else(|| gh_error(StatusCode::NOT_FOUND, "Not Found"))
}

async fn get_pull(
    State(s): State<Arc<FakeState>>,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    headers: HeaderMap,
) -> Answer {
    s.repo_auth(&headers, &owner)?;
    if wants_diff(&headers) {
        let diff = with_pull(&s, &owner, &repo, number, |p| p.pull.diff.clone())?;
        let content_type = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
        return Ok((content_type, diff).into_response());
    }
    ok(with_pull(&s, &owner, &repo, number, |p| {
        pull_json(&s.base_url, p)
    })?)
}

async fn pull_files(
    State(s): State<Arc<FakeState>>,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Answer {
    s.repo_auth(&headers, &owner)?;
    let (files, head_sha) = with_pull(&s, &owner, &repo, number, |p| {
        (parse_diff(&p.pull.diff), p.pull.head_sha.clone())
    })?;
    let contents = format!("{}/repos/{owner}/{repo}/contents", s.base_url);
    let number_param = |name: &str, default: usize| {
        query
            .get(name)
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(default)
    };
    let per_page = number_param("per_page", 30).clamp(1, 100);
    let page = number_param("page", 1).max(1);
    let last = files.len().div_ceil(per_page).max(1);
    let body: Vec<Value> = files
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|f| f.to_json(&contents, &head_sha))
        .collect();
    let mut response = Json(Value::Array(body)).into_response();
    if page < last {
        let url = format!(
            "{}/repos/{owner}/{repo}/pulls/{number}/files?per_page={per_page}",
            s.base_url
        );
        let link = format!(
            "<{url}&page={}>; rel=\"next\", <{url}&page={last}>; rel=\"last\"",
            page + 1
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, v);
        }
    }
    Ok(response)
}

async fn create_pull(
    State(s): State<Arc<FakeState>>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    s.repo_auth(&headers, &owner)?;
    let req = parse_json(&body)?;
    let missing: Vec<Value> = ["title", "head", "base"]
        .iter()
        .filter(|f| req[**f].as_str().is_none_or(str::is_empty))
        .map(|f| json!({"resource": "PullRequest", "field": f, "code": "missing_field"}))
        .collect();
    if !missing.is_empty() {
        return Err(validation_failed(Value::Array(missing)));
    }
    let head = req["head"].as_str().unwrap_or_default();
    let head_ref = head.split_once(':').map_or(head, |(_, b)| b).to_owned();
    let base_ref = req["base"].as_str().unwrap_or_default().to_owned();
    let key = repo_key(&owner, &repo);
    let mut inner = s.lock();
    let in_repo = || {
        inner
            .pulls
            .range((key.clone(), 0)..=(key.clone(), u64::MAX))
    };
    if in_repo().any(|(_, p)| p.pull.head_ref == head_ref && p.pull.base_ref == base_ref) {
        return Err(validation_failed(
            json!([{"resource": "PullRequest", "code": "custom",
            "message": format!("A pull request already exists for {owner}:{head_ref}.")}]),
        ));
    }
    let number = in_repo().map(|((_, n), _)| *n).max().unwrap_or(0) + 1;
    let sha_of = |branch: &str| {
        inner
            .refs
            .get(&key)
            .and_then(|r| r.get(&format!("refs/heads/{branch}")))
            .cloned()
            .unwrap_or_else(|| "0".repeat(40))
    };
    let stored = StoredPull {
        owner: owner.clone(),
        repo: repo.clone(),
        pull: FakePull {
            number,
            title: req["title"].as_str().unwrap_or_default().to_owned(),
            body: req["body"].as_str().unwrap_or_default().to_owned(),
            draft: req["draft"].as_bool().unwrap_or(false),
            head_sha: sha_of(&head_ref),
            base_sha: sha_of(&base_ref),
            head_ref,
            base_ref,
            diff: String::new(),
        },
    };
    let answer = pull_json(&s.base_url, &stored);
    inner.pulls.insert((key, number), stored);
    inner.created_pulls.push(answer.clone());
    created(answer)
}

async fn create_review(
    State(s): State<Arc<FakeState>>,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    s.repo_auth(&headers, &owner)?;
    let req = parse_json(&body)?;
    let (diff, head_sha) = with_pull(&s, &owner, &repo, number, |p| {
        (p.pull.diff.clone(), p.pull.head_sha.clone())
    })?;
    let state = match req["event"].as_str() {
        None => "PENDING",
        Some("COMMENT") => "COMMENTED",
        Some("APPROVE") => "APPROVED",
        Some("REQUEST_CHANGES") => "CHANGES_REQUESTED",
        Some(_) => {
            return Err(unprocessable(
                "Event is not one of COMMENT, APPROVE, REQUEST_CHANGES",
            ));
        }
    };
    let files = parse_diff(&diff);
    for comment in req["comments"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        check_comment(&files, comment).map_err(unprocessable)?;
    }
    let mut inner = s.lock();
    let id = inner.next_id();
    inner.reviews.push(RecordedReview {
        owner: owner.clone(),
        repo: repo.clone(),
        number,
        body: req.clone(),
    });
    ok(json!({
        "id": id,
        "node_id": format!("PRR_{id}"),
        "body": req["body"].as_str().unwrap_or_default(),
        "state": state,
        "commit_id": req["commit_id"].as_str().unwrap_or(&head_sha),
        "html_url": format!("https://github.com/{owner}/{repo}/pull/{number}#pullrequestreview-{id}"),
        "pull_request_url": format!("{}/repos/{owner}/{repo}/pulls/{number}", s.base_url),
        "submitted_at": (state != "PENDING").then(now_rfc3339),
        "user": bot_json(&s.base_url),
    }))
}

/// GitHub's checks on one inline review comment: the path is a file of the diff and the line
/// (and `start_line`) is visible in its hunks on the comment's side.
fn check_comment(files: &[FileDiff], comment: &Value) -> Result<(), &'static str> {
    let path = comment["path"].as_str().unwrap_or_default();
    let file = files
        .iter()
        .find(|f| f.filename == path)
        .ok_or("Path could not be resolved")?;
    let Some(line) = comment["line"].as_u64() else {
        // The deprecated `position`: a line of the file's patch, counted below its first `@@`.
        return match comment["position"].as_u64() {
            Some(p) if p >= 1 && p <= file.positions => Ok(()),
            _ => Err("Line could not be resolved"),
        };
    };
    let visible = |side: &str, line: u64| match side {
        "RIGHT" => file.right.contains(&line),
        "LEFT" => file.left.contains(&line),
        _ => false,
    };
    let side = comment["side"].as_str().unwrap_or("RIGHT");
    if !visible(side, line) {
        return Err("Line could not be resolved");
    }
    if let Some(start) = comment["start_line"].as_u64() {
        let start_side = comment["start_side"].as_str().unwrap_or(side);
        if !visible(start_side, start) {
            return Err("Start line could not be resolved");
        }
        if start_side == side && start > line {
            return Err("start_line must precede the end line");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The diff

/// One file of a unified diff.
#[derive(Debug, Default)]
struct FileDiff {
    filename: String,
    previous_filename: Option<String>,
    status: &'static str,
    additions: u64,
    deletions: u64,
    /// The hunks (from the first `@@`), as GitHub's `patch`; `None` for a binary file.
    patch: Option<String>,
    /// New-file line numbers visible in the hunks: added and context lines.
    right: BTreeSet<u64>,
    /// Old-file line numbers visible in the hunks: removed and context lines.
    left: BTreeSet<u64>,
    /// Lines of the patch below its first hunk header (valid `position`s).
    positions: u64,
}

impl FileDiff {
    /// GitHub's `diff-entry`; `contents` is the repository's `/contents` URL.
    fn to_json(&self, contents: &str, head_sha: &str) -> Value {
        let mut v = json!({
            "filename": self.filename, "status": self.status, "additions": self.additions,
            "deletions": self.deletions, "changes": self.additions + self.deletions,
            "contents_url": format!("{contents}/{}?ref={head_sha}", self.filename),
        });
        if let Some(patch) = &self.patch {
            v["patch"] = json!(patch);
        }
        if let Some(previous) = &self.previous_filename {
            v["previous_filename"] = json!(previous);
        }
        v
    }
}

/// Splits `diff` into files on `diff --git` lines.
fn parse_diff(diff: &str) -> Vec<FileDiff> {
    let mut sections: Vec<Vec<&str>> = Vec::new();
    for line in diff.lines() {
        if line.starts_with("diff --git ") {
            sections.push(vec![line]);
        } else if let Some(section) = sections.last_mut() {
            section.push(line);
        }
    }
    sections.iter().map(|s| parse_file(s)).collect()
}

/// `@@ -old[,n] +new[,n] @@ ...`: the first old and new line numbers.
fn hunk_start(line: &str) -> Option<(u64, u64)> {
    let ranges = line.strip_prefix("@@ -")?.split(" @@").next()?;
    let (old, new) = ranges.split_once(" +")?;
    let first = |r: &str| r.split(',').next()?.parse::<u64>().ok();
    Some((first(old)?, first(new)?))
}

fn parse_file(section: &[&str]) -> FileDiff {
    let header = section[0].trim_start_matches("diff --git ");
    let (mut old_path, mut new_path) = match header.split_once(" b/") {
        Some((a, b)) => (a.trim_start_matches("a/").to_owned(), b.to_owned()),
        None => (header.to_owned(), header.to_owned()),
    };
    let mut file = FileDiff {
        status: "modified",
        ..FileDiff::default()
    };
    let hunks_at = section.iter().position(|l| l.starts_with("@@"));
    for line in &section[1..hunks_at.unwrap_or(section.len())] {
        if line.starts_with("new file mode") {
            file.status = "added";
        } else if line.starts_with("deleted file mode") {
            file.status = "removed";
        } else if let Some(from) = line.strip_prefix("rename from ") {
            file.status = "renamed";
            old_path = from.to_owned();
        } else if let Some(to) = line.strip_prefix("rename to ") {
            new_path = to.to_owned();
        } else if let Some(a) = line.strip_prefix("--- ") {
            if a != "/dev/null" {
                old_path = a.trim_start_matches("a/").to_owned();
            }
        } else if let Some(b) = line.strip_prefix("+++ ")
            && b != "/dev/null"
        {
            new_path = b.trim_start_matches("b/").to_owned();
        }
    }
    if file.status == "renamed" {
        file.previous_filename = Some(old_path.clone());
    }
    file.filename = if file.status == "removed" {
        old_path
    } else {
        new_path
    };
    let Some(start) = hunks_at else {
        return file;
    };
    let hunks = &section[start..];
    let (mut old, mut new) = (0, 0);
    for line in hunks {
        if line.starts_with("@@") {
            (old, new) = hunk_start(line).unwrap_or((0, 0));
            continue;
        }
        match line.as_bytes().first() {
            Some(b'+') => {
                file.right.insert(new);
                new += 1;
                file.additions += 1;
            }
            Some(b'-') => {
                file.left.insert(old);
                old += 1;
                file.deletions += 1;
            }
            Some(b'\\') => {} // "\ No newline at end of file"
            _ => {
                file.left.insert(old);
                file.right.insert(new);
                old += 1;
                new += 1;
            }
        }
    }
    file.positions = hunks.len() as u64 - 1;
    file.patch = Some(hunks.join("\n"));
    file
}

// ---------------------------------------------------------------------------------------------
// Checks, issues, refs

async fn create_check_run(
    State(s): State<Arc<FakeState>>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    s.repo_auth(&headers, &owner)?;
    let req = parse_json(&body)?;
    let missing: Vec<Value> = ["name", "head_sha"]
        .iter()
        .filter(|f| req[**f].as_str().is_none_or(str::is_empty))
        .map(|f| json!({"resource": "CheckRun", "field": f, "code": "missing_field"}))
        .collect();
    if !missing.is_empty() {
        return Err(validation_failed(Value::Array(missing)));
    }
    let mut inner = s.lock();
    let id = inner.next_id();
    let url = format!("{}/repos/{owner}/{repo}/check-runs/{id}", s.base_url);
    let mut run = json!({
        "id": id,
        "node_id": format!("CR_{id}"),
        "name": req["name"],
        "head_sha": req["head_sha"],
        "status": "queued",
        "conclusion": null,
        "started_at": now_rfc3339(),
        "completed_at": null,
        "output": {"title": null, "summary": null, "text": null, "annotations_count": 0,
            "annotations_url": format!("{url}/annotations")},
        "pull_requests": [],
        "url": url,
        "html_url": format!("https://github.com/{owner}/{repo}/runs/{id}"),
    });
    merge_check_run(&mut run, &req);
    let state = check_state(&run);
    inner.check_run_history.push((id, state));
    inner
        .check_runs
        .push((repo_key(&owner, &repo), run.clone()));
    created(run)
}

async fn update_check_run(
    State(s): State<Arc<FakeState>>,
    Path((owner, repo, id)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    s.repo_auth(&headers, &owner)?;
    let req = parse_json(&body)?;
    let key = repo_key(&owner, &repo);
    let mut inner = s.lock();
    let (_, run) = inner
        .check_runs
        .iter_mut()
        .find(|(k, run)| *k == key && run["id"] == id)
        .ok_or_else(|| gh_error(StatusCode::NOT_FOUND, "Not Found"))?;
    merge_check_run(run, &req);
    let (run, state) = (run.clone(), check_state(run));
    inner.check_run_history.push((id, state));
    ok(run)
}

fn check_state(run: &Value) -> String {
    match run["conclusion"].as_str() {
        Some(c) => format!("completed:{c}"),
        None => run["status"].as_str().unwrap_or("queued").to_owned(),
    }
}

/// `GET /repos/{o}/{r}/contents/{path}?ref=`: the file as the API returns it (base64, wrapped
/// at 60 characters like GitHub), 404 for an unknown path or ref. Without `ref`, `main`.
async fn get_contents(
    State(s): State<Arc<FakeState>>,
    Path((owner, repo, path)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Answer {
    s.repo_auth(&headers, &owner)?;
    let git_ref = q.get("ref").cloned().unwrap_or_else(|| "main".into());
    let mut inner = s.lock();
    inner.content_fetches += 1;
    let text = inner
        .files
        .get(&(repo_key(&owner, &repo), git_ref.clone(), path.clone()))
        .cloned()
        .ok_or_else(|| gh_error(StatusCode::NOT_FOUND, "Not Found"))?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
    let wrapped: Vec<String> = encoded
        .as_bytes()
        .chunks(60)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    let url = format!(
        "{}/repos/{owner}/{repo}/contents/{path}?ref={git_ref}",
        s.base_url
    );
    let name = path.rsplit('/').next().unwrap_or(&path).to_owned();
    ok(json!({
        "type": "file", "encoding": "base64", "size": text.len(), "name": name, "path": path,
        "content": wrapped.join("\n") + "\n", "sha": format!("{:040x}", text.len()),
        "url": url, "git_url": null, "html_url": null, "download_url": null,
        "_links": {"self": url, "git": null, "html": null},
    }))
}

/// Applies the fields of a create or update request; a conclusion completes the run.
fn merge_check_run(run: &mut Value, req: &Value) {
    let fields = [
        "name",
        "status",
        "conclusion",
        "details_url",
        "external_id",
        "started_at",
        "completed_at",
    ];
    for field in fields {
        if let Some(v) = req.get(field) {
            run[field] = v.clone();
        }
    }
    if let Some(output) = req["output"].as_object() {
        for (k, v) in output {
            run["output"][k] = v.clone();
        }
    }
    if !run["conclusion"].is_null() {
        run["status"] = json!("completed");
        if run["completed_at"].is_null() {
            run["completed_at"] = json!(now_rfc3339());
        }
    }
}

async fn list_labels(
    State(s): State<Arc<FakeState>>,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    headers: HeaderMap,
) -> Answer {
    s.repo_auth(&headers, &owner)?;
    let inner = s.lock();
    let labels = inner.labels.get(&(repo_key(&owner, &repo), number));
    let labels = labels.map(Vec::as_slice).unwrap_or_default();
    ok(labels_json(&s.base_url, &owner, &repo, labels))
}

async fn add_labels(
    State(s): State<Arc<FakeState>>,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    s.repo_auth(&headers, &owner)?;
    let req = parse_json(&body)?;
    // `{"labels": ["a"]}`, `{"labels": [{"name": "a"}]}` or a bare array.
    let list = req.get("labels").unwrap_or(&req);
    let Some(items) = list.as_array() else {
        return Err(validation_failed(
            json!([{"resource": "Label", "field": "labels", "code": "invalid"}]),
        ));
    };
    let names: Vec<String> = items
        .iter()
        .filter_map(|l| l.as_str().or_else(|| l["name"].as_str()))
        .map(str::to_owned)
        .collect();
    let mut inner = s.lock();
    let labels = inner
        .labels
        .entry((repo_key(&owner, &repo), number))
        .or_default();
    for name in names {
        if !labels.contains(&name) {
            labels.push(name);
        }
    }
    ok(labels_json(&s.base_url, &owner, &repo, labels))
}

fn labels_json(base_url: &str, owner: &str, repo: &str, labels: &[String]) -> Value {
    let url = format!("{base_url}/repos/{owner}/{repo}/labels");
    labels
        .iter()
        .enumerate()
        .map(|(i, name)| {
            json!({"id": i + 1, "node_id": format!("LA_{}", i + 1), "url": format!("{url}/{name}"),
                "name": name, "color": "ededed", "default": false, "description": null})
        })
        .collect()
}

async fn create_comment(
    State(s): State<Arc<FakeState>>,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    s.repo_auth(&headers, &owner)?;
    let req = parse_json(&body)?;
    let Some(text) = req["body"].as_str().filter(|b| !b.is_empty()) else {
        return Err(validation_failed(
            json!([{"resource": "IssueComment", "field": "body", "code": "missing_field"}]),
        ));
    };
    let mut inner = s.lock();
    let id = inner.next_id();
    inner.comments.push(RecordedComment {
        owner: owner.clone(),
        repo: repo.clone(),
        number,
        body: text.to_owned(),
    });
    created(json!({
        "id": id,
        "node_id": format!("IC_{id}"),
        "body": text,
        "url": format!("{}/repos/{owner}/{repo}/issues/comments/{id}", s.base_url),
        "html_url": format!("https://github.com/{owner}/{repo}/issues/{number}#issuecomment-{id}"),
        "user": bot_json(&s.base_url),
        "created_at": now_rfc3339(),
        "updated_at": now_rfc3339(),
    }))
}

async fn create_ref(
    State(s): State<Arc<FakeState>>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    s.repo_auth(&headers, &owner)?;
    let req = parse_json(&body)?;
    let (Some(name), Some(sha)) = (req["ref"].as_str(), req["sha"].as_str()) else {
        return Err(validation_failed(
            json!([{"resource": "Reference", "code": "missing_field"}]),
        ));
    };
    if !name.starts_with("refs/") || name.matches('/').count() < 2 {
        return Err(gh_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Reference name is invalid",
        ));
    }
    let mut inner = s.lock();
    let refs = inner.refs.entry(repo_key(&owner, &repo)).or_default();
    if refs.contains_key(name) {
        return Err(gh_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Reference already exists",
        ));
    }
    refs.insert(name.to_owned(), sha.to_owned());
    let api = format!("{}/repos/{owner}/{repo}/git", s.base_url);
    created(json!({
        "ref": name, "node_id": format!("REF_{name}"), "url": format!("{api}/{name}"),
        "object": {"type": "commit", "sha": sha, "url": format!("{api}/commits/{sha}")},
    }))
}

async fn get_branch(
    State(s): State<Arc<FakeState>>,
    Path((owner, repo, branch)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Answer {
    s.repo_auth(&headers, &owner)?;
    let inner = s.lock();
    let sha = inner
        .refs
        .get(&repo_key(&owner, &repo))
        .and_then(|r| r.get(&format!("refs/heads/{branch}")))
        .ok_or_else(|| gh_error(StatusCode::NOT_FOUND, "Branch not found"))?;
    let url = format!("{}/repos/{owner}/{repo}/commits/{sha}", s.base_url);
    ok(json!({"name": branch, "commit": {"sha": sha, "url": url}, "protected": false}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const APP_ID: u64 = 4242;
    const DIFF: &str = "\
diff --git a/src/lib.rs b/src/lib.rs
index 1111111..2222222 100644
--- a/src/lib.rs
+++ b/src/lib.rs
@@ -10,4 +10,5 @@ mod m;
 fn a() {}
-fn b() {}
+fn b() -> u8 { 1 }
+fn c() {}
 fn d() {}
 fn e() {}
diff --git a/README.md b/README.md
new file mode 100644
index 0000000..3333333
--- /dev/null
+++ b/README.md
@@ -0,0 +1,2 @@
+# Title
+text
";

    /// The DER of `tag` at the start of `der`: (contents, rest).
    fn der_tlv(der: &[u8], tag: u8) -> (&[u8], &[u8]) {
        assert_eq!(der[0], tag, "DER tag");
        let (len, head) = match der[1] {
            n if n < 0x80 => (n as usize, 2),
            n => {
                let k = (n & 0x7f) as usize;
                let len = der[2..2 + k]
                    .iter()
                    .fold(0usize, |a, b| (a << 8) | *b as usize);
                (len, 2 + k)
            }
        };
        (&der[head..head + len], &der[head + len..])
    }

    /// An app JWT with these claims, signed with the fixture key. `aws_lc_rs` signs with a
    /// PKCS#1 key, so the PKCS#8 wrapper (version, algorithm, octet string) is taken off.
    fn jwt(claims: Value) -> String {
        let pkcs8 = pem_der(APP_PRIVATE_KEY_PEM);
        let (info, _) = der_tlv(&pkcs8, 0x30);
        let (_, rest) = der_tlv(info, 0x02);
        let (_, rest) = der_tlv(rest, 0x30);
        let (pkcs1, _) = der_tlv(rest, 0x04);
        let key = EncodingKey::from_rsa_der(pkcs1);
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).expect("sign")
    }

    fn app_jwt() -> String {
        let now = Utc::now().timestamp();
        jwt(json!({"iss": APP_ID.to_string(), "iat": now - 60, "exp": now + 540}))
    }

    async fn fake() -> FakeGitHub {
        let gh = FakeGitHub::start(APP_ID).await;
        gh.add_installation(7, "Acme", "Organization");
        gh.add_installation(8, "other", "User");
        gh.add_pull(
            "acme",
            "widgets",
            FakePull {
                number: 5,
                title: "Add c".into(),
                head_sha: "a".repeat(40),
                head_ref: "feature".into(),
                base_sha: "b".repeat(40),
                base_ref: "main".into(),
                diff: DIFF.into(),
                ..FakePull::default()
            },
        );
        gh
    }

    async fn token(gh: &FakeGitHub, installation: u64) -> String {
        let res = reqwest::Client::new()
            .post(format!(
                "{}/app/installations/{installation}/access_tokens",
                gh.base_url
            ))
            .bearer_auth(app_jwt())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        let v: Value = res.json().await.unwrap();
        v["token"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn app_endpoints_require_a_valid_jwt() {
        let gh = fake().await;
        let http = reqwest::Client::new();
        let url = format!("{}/app/installations/7", gh.base_url);
        let now = Utc::now().timestamp();
        let status = |jwt: Option<String>| {
            let mut req = http.get(&url);
            if let Some(jwt) = jwt {
                req = req.bearer_auth(jwt);
            }
            async move { req.send().await.unwrap().status().as_u16() }
        };
        assert_eq!(status(None).await, 401);
        assert_eq!(status(Some("not.a.jwt".into())).await, 401);
        let wrong_app = jwt(json!({"iss": 1, "iat": now, "exp": now + 60}));
        assert_eq!(status(Some(wrong_app)).await, 401);
        let expired = jwt(json!({"iss": APP_ID, "iat": now - 700, "exp": now - 100}));
        assert_eq!(status(Some(expired)).await, 401);
        let too_long = jwt(json!({"iss": APP_ID, "iat": now, "exp": now + 3600}));
        assert_eq!(status(Some(too_long)).await, 401);
        let numeric = jwt(json!({"iss": APP_ID, "iat": now - 60, "exp": now + 540}));
        assert_eq!(status(Some(numeric)).await, 200);

        let res = http.get(&url).bearer_auth(app_jwt()).send().await.unwrap();
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["account"]["login"], "Acme");
        assert_eq!(v["account"]["type"], "Organization");
        assert_eq!(v["app_id"], APP_ID);
        assert!(v["suspended_at"].is_null());
        let res = http
            .get(format!("{}/app/installations/99", gh.base_url))
            .bearer_auth(app_jwt())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404);
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["documentation_url"], DOCS_URL);

        let minted = token(&gh, 7).await;
        assert!(minted.starts_with("ghs_") && minted.len() == 40, "{minted}");
        gh.set_fixed_token(Some("ghs_fixed".into()));
        assert_eq!(token(&gh, 7).await, "ghs_fixed");
        assert_eq!(token(&gh, 8).await, "ghs_fixed");
        assert_eq!(gh.tokens_issued(), 3);
        // One fixed token serves both accounts.
        for owner in ["acme", "other"] {
            let res = http
                .get(format!("{}/repos/{owner}/r/branches/main", gh.base_url))
                .bearer_auth("ghs_fixed")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 404);
            let v: Value = res.json().await.unwrap();
            assert_eq!(v["message"], "Branch not found");
        }
    }

    #[tokio::test]
    async fn repository_endpoints_require_the_owners_installation_token() {
        let gh = fake().await;
        let http = reqwest::Client::new();
        let url = format!("{}/repos/acme/widgets/pulls/5", gh.base_url);
        let acme = token(&gh, 7).await;
        let other = token(&gh, 8).await;
        let get = |auth: Option<String>| {
            let mut req = http.get(&url);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            async move { req.send().await.unwrap().status().as_u16() }
        };
        assert_eq!(get(None).await, 401);
        assert_eq!(get(Some("Bearer ghs_unknown".into())).await, 401);
        assert_eq!(get(Some(format!("Bearer {other}"))).await, 404);
        assert_eq!(get(Some(format!("Bearer {acme}"))).await, 200);
        assert_eq!(get(Some(format!("token {acme}"))).await, 200);
        gh.set_token_ttl(Duration::ZERO);
        let expired = token(&gh, 7).await;
        assert_eq!(get(Some(format!("token {expired}"))).await, 401);
        assert!(gh.requests().iter().any(|r| !r.has_authorization));
    }

    #[tokio::test]
    async fn pulls_diffs_files_and_reviews() {
        let gh = fake().await;
        let http = reqwest::Client::new();
        let t = token(&gh, 7).await;
        let base = format!("{}/repos/acme/widgets/pulls/5", gh.base_url);
        let res = http
            .get(&base)
            .bearer_auth(&t)
            .header("accept", "application/vnd.github.v3.diff")
            .send()
            .await
            .unwrap();
        assert_eq!(res.headers()["content-type"], "text/plain; charset=utf-8");
        assert_eq!(res.text().await.unwrap(), DIFF);
        let pr: Value = http
            .get(&base)
            .bearer_auth(&t)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(pr["head"]["sha"], "a".repeat(40));
        assert_eq!(pr["base"]["ref"], "main");
        assert_eq!(pr["head"]["repo"]["full_name"], "acme/widgets");

        let files: Value = http
            .get(format!("{base}/files?per_page=100"))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(files[0]["filename"], "src/lib.rs");
        assert_eq!(files[0]["status"], "modified");
        assert_eq!(
            (
                files[0]["additions"].as_u64(),
                files[0]["deletions"].as_u64()
            ),
            (Some(2), Some(1))
        );
        assert_eq!(files[1]["filename"], "README.md");
        assert_eq!(files[1]["status"], "added");
        assert!(
            files[1]["patch"]
                .as_str()
                .unwrap()
                .starts_with("@@ -0,0 +1,2 @@")
        );

        let review = |comments: Value| {
            let req = http
                .post(format!("{base}/reviews"))
                .bearer_auth(&t)
                .json(&json!({"event": "COMMENT", "body": "sum", "comments": comments}));
            async move { req.send().await.unwrap() }
        };
        let ok = review(json!([
            {"path": "src/lib.rs", "line": 12, "body": "added line"},
            {"path": "src/lib.rs", "line": 14, "side": "RIGHT", "body": "context"},
            {"path": "src/lib.rs", "line": 11, "side": "LEFT", "body": "removed"},
            {"path": "README.md", "start_line": 1, "line": 2, "body": "range"},
        ]))
        .await;
        assert_eq!(ok.status(), 200);
        let v: Value = ok.json().await.unwrap();
        assert_eq!(v["state"], "COMMENTED");
        assert_eq!(v["commit_id"], "a".repeat(40));
        assert_eq!(v["user"]["login"], BOT_LOGIN);
        for bad in [
            json!({"path": "src/lib.rs", "line": 9, "body": "outside the hunk"}),
            json!({"path": "src/lib.rs", "line": 14, "side": "LEFT", "body": "past the old lines"}),
            json!({"path": "README.md", "line": 1, "side": "LEFT", "body": "new file"}),
            json!({"path": "nope.rs", "line": 1, "body": "no such file"}),
        ] {
            let res = review(json!([bad])).await;
            assert_eq!(res.status(), 422, "{bad}");
            let v: Value = res.json().await.unwrap();
            assert_eq!(v["message"], "Unprocessable Entity");
        }
        let reviews = gh.reviews();
        assert_eq!(reviews.len(), 1);
        assert_eq!((reviews[0].owner.as_str(), reviews[0].number), ("acme", 5));
        assert_eq!(reviews[0].body["comments"][0]["line"], 12);
    }

    #[tokio::test]
    async fn checks_labels_comments_refs_and_new_pulls() {
        let gh = fake().await;
        let http = reqwest::Client::new();
        let t = token(&gh, 7).await;
        let repo = format!("{}/repos/acme/widgets", gh.base_url);
        let send = |method: reqwest::Method, path: &str, body: Option<Value>| {
            let mut req = http
                .request(method, format!("{repo}{path}"))
                .bearer_auth(&t);
            if let Some(body) = body {
                req = req.json(&body);
            }
            async move {
                let res = req.send().await.unwrap();
                (res.status().as_u16(), res.json::<Value>().await.unwrap())
            }
        };
        use reqwest::Method as M;
        let (status, run) = send(
            M::POST,
            "/check-runs",
            Some(json!({"name": "review", "head_sha": "abc", "status": "in_progress"})),
        )
        .await;
        assert_eq!((status, run["status"].as_str()), (201, Some("in_progress")));
        let id = run["id"].as_u64().unwrap();
        let (status, run) = send(
            M::PATCH,
            &format!("/check-runs/{id}"),
            Some(json!({"conclusion": "success"})),
        )
        .await;
        assert_eq!((status, run["status"].as_str()), (200, Some("completed")));
        assert_eq!(gh.check_runs()[0]["conclusion"], "success");

        let (status, labels) = send(
            M::POST,
            "/issues/5/labels",
            Some(json!({"labels": ["bug", "review"]})),
        )
        .await;
        assert_eq!((status, labels[1]["name"].as_str()), (200, Some("review")));
        send(
            M::POST,
            "/issues/5/labels",
            Some(json!({"labels": ["bug"]})),
        )
        .await;
        let (_, labels) = send(M::GET, "/issues/5/labels", None).await;
        assert_eq!(labels.as_array().unwrap().len(), 2);
        assert_eq!(gh.labels("Acme", "widgets", 5), ["bug", "review"]);

        let (status, c) = send(
            M::POST,
            "/issues/5/comments",
            Some(json!({"body": "hello"})),
        )
        .await;
        assert_eq!((status, c["body"].as_str()), (201, Some("hello")));
        assert_eq!(gh.issue_comments()[0].body, "hello");

        let new_ref = json!({"ref": "refs/heads/fix/x", "sha": "c".repeat(40)});
        assert_eq!(
            send(M::POST, "/git/refs", Some(new_ref.clone())).await.0,
            201
        );
        assert_eq!(send(M::POST, "/git/refs", Some(new_ref)).await.0, 422);
        let (status, branch) = send(M::GET, "/branches/fix/x", None).await;
        assert_eq!(
            (status, branch["commit"]["sha"].clone()),
            (200, json!("c".repeat(40)))
        );
        assert_eq!(send(M::GET, "/branches/missing", None).await.0, 404);

        let pull = json!({"title": "Fix", "head": "acme:fix/x", "base": "main", "draft": true});
        let (status, pr) = send(M::POST, "/pulls", Some(pull.clone())).await;
        assert_eq!((status, pr["number"].as_u64()), (201, Some(6)));
        assert_eq!(pr["head"]["sha"], "c".repeat(40));
        assert_eq!(send(M::POST, "/pulls", Some(pull)).await.0, 422);
        assert_eq!(gh.created_pulls()[0]["head"]["ref"], "fix/x");
        assert_eq!(send(M::GET, "/pulls/6", None).await.0, 200);
        assert_eq!(send(M::DELETE, "/pulls/6", None).await.0, 404);
        let (status, v) = send(M::GET, "/unknown", None).await;
        assert_eq!((status, v["message"].as_str()), (404, Some("Not Found")));
    }

    #[tokio::test]
    async fn injected_faults_and_latency() {
        let gh = fake().await;
        let http = reqwest::Client::new();
        gh.fail_next("/app/installations/7/access_tokens", 2, 429);
        let url = format!("{}/app/installations/7/access_tokens", gh.base_url);
        for _ in 0..2 {
            let res = http.post(&url).bearer_auth(app_jwt()).send().await.unwrap();
            assert_eq!(res.status(), 429);
            assert_eq!(res.headers()["retry-after"], "1");
            assert_eq!(res.headers()["x-ratelimit-remaining"], "0");
            let reset: i64 = res.headers()["x-ratelimit-reset"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(reset > Utc::now().timestamp());
        }
        gh.fail_next("/app/", 1, 403);
        let res = http.post(&url).bearer_auth(app_jwt()).send().await.unwrap();
        let v: Value = res.json().await.unwrap();
        assert!(v["message"].as_str().unwrap().contains("rate limit"));
        gh.fail_next("/repos/", 1, 502);
        assert_eq!(token(&gh, 7).await.len(), 40);
        assert_eq!(gh.tokens_issued(), 1);

        gh.set_latency(Duration::from_millis(150));
        let started = std::time::Instant::now();
        let res = http
            .get(format!("{}/nothing?x=1", gh.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404);
        assert!(started.elapsed() >= Duration::from_millis(150));
        let requests = gh.requests();
        assert_eq!(requests.len(), 5);
        assert!(
            requests[..4]
                .iter()
                .all(|r| r.method == "POST" && r.has_authorization)
        );
        assert_eq!(requests[4].path, "/nothing");
    }
}
