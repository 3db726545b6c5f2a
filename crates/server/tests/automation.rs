//! Automation end to end, in process on SQLite and PostgreSQL: the GitHub webhook against the
//! 329 example payloads, code review from a signed `pull_request` webhook to a review posted on
//! the fake GitHub API (real git, real bubblewrap sandboxes, the real gateway in front of the
//! fake OpenAI upstream), per-owner slots and superseding, the review timeout, and triggers
//! (webhook and schedule) with their limits. Time runs on a manual clock; alarms and queue
//! deliveries are driven by the test, and a restart is a second node opened on the same store.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kilocloud_agent::sandbox::{LocalSandbox, SandboxConfig};
use kilocloud_automation::github::sign;
use kilocloud_automation::review::{
    COMPLETION_QUEUE as REVIEW_DONE, CompletionConsumer as ReviewDone, DISPATCH_QUEUE,
    DispatchConsumer,
};
use kilocloud_automation::triggers::{
    COMPLETION_QUEUE as TRIGGER_DONE, CompletionConsumer as TriggerDone, DELIVERY_QUEUE,
    DeliveryConsumer,
};
use kilocloud_automation::{
    Automation, AutomationConfig, GitHubConfig, ReviewConfig, ReviewStatus,
};
use kilocloud_test_support::fake_github::{APP_PRIVATE_KEY_PEM, FakeGitHub, FakePull};

const APP_ID: u64 = 4242;
const INSTALLATION: u64 = 77;
const WEBHOOK_SECRET: &str = "whsec-current";
const REPO: &str = "Codertocat/Hello-World";

const LIB_BEFORE: &str = "pub fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n";
const LIB_AFTER: &str = "pub fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\npub fn div(a: i32, b: i32) -> i32 {\n    a / b\n}\n";

struct Auto {
    env: Env,
    github: FakeGitHub,
    config: AutomationConfig,
}

impl Auto {
    fn automation(&self) -> &Automation {
        self.env.automation.as_ref().unwrap()
    }

    /// Posts a webhook delivery signed with `secret` (`None`: unsigned).
    async fn webhook(
        &self,
        event: &str,
        delivery: &str,
        body: &[u8],
        secret: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self
            .env
            .http
            .post(format!("{}/api/github/webhook", self.env.base))
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .body(body.to_vec());
        if let Some(secret) = secret {
            req = req.header("x-hub-signature-256", sign(secret.as_bytes(), body));
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Claims the test installation for the test user.
    async fn claim(&self) {
        let (status, body) = self
            .env
            .request(
                reqwest::Method::POST,
                "/api/github/installations",
                Some(json!({"installationId": INSTALLATION})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["accountLogin"], "Codertocat");
    }

    /// Handles every deliverable message of `queue` until none is left, with the consumer
    /// the server runs for it.
    async fn drain(&self, queue: &str) -> usize {
        let a = self.automation().clone();
        let consumer: Box<dyn kilocloud_substrate::Consumer> = match queue {
            DISPATCH_QUEUE => Box::new(DispatchConsumer(a)),
            REVIEW_DONE => Box::new(ReviewDone(a)),
            DELIVERY_QUEUE => Box::new(DeliveryConsumer(a)),
            TRIGGER_DONE => Box::new(TriggerDone(a)),
            other => panic!("unknown queue {other}"),
        };
        let mut total = 0;
        loop {
            let n = self
                .env
                .sub
                .queues()
                .process_batch(queue, consumer.as_ref())
                .await
                .unwrap();
            if n == 0 {
                return total;
            }
            total += n;
        }
    }

    /// Handles completion notices of `queue` as sessions end, until `done` holds; waits on
    /// the agents' event signal in between.
    async fn until<F, Fut>(&self, queue: &str, mut done: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut signal = self.env.agents.event_signal();
        tokio::time::timeout(Duration::from_secs(300), async {
            loop {
                signal.borrow_and_update();
                self.drain(queue).await;
                if done().await {
                    return;
                }
                signal.changed().await.unwrap();
            }
        })
        .await
        .expect("the condition was reached");
    }

    /// Creates a trigger through the API (201); returns it.
    async fn create_trigger(&self, spec: Value) -> Value {
        let (status, created) = self
            .env
            .request(reqwest::Method::POST, "/api/triggers", Some(spec))
            .await;
        assert_eq!(status, 201, "{created}");
        created
    }

    /// No review is waiting, queued or running.
    async fn settled(&self) -> bool {
        let counts = self.counts().await;
        [
            ReviewStatus::Pending,
            ReviewStatus::Queued,
            ReviewStatus::Running,
        ]
        .iter()
        .all(|s| !counts.contains_key(s))
    }

    async fn counts(&self) -> BTreeMap<ReviewStatus, usize> {
        self.automation()
            .review_counts(Owner::User(self.env.user))
            .await
            .unwrap()
    }
}

async fn auto(postgres: bool, review: ReviewConfig) -> Auto {
    auto_with(postgres, review, true, ServerOptions::default()).await
}

/// [`auto`]; `self_claim`: whether owners (not only site administrators) may claim
/// installations.
async fn auto_with(
    postgres: bool,
    review: ReviewConfig,
    self_claim: bool,
    options: ServerOptions,
) -> Auto {
    let github = FakeGitHub::start(APP_ID).await;
    github.set_fixed_token(Some(GIT_TOKEN.to_owned()));
    github.add_installation(INSTALLATION, "Codertocat", "User");
    let config = AutomationConfig {
        github: GitHubConfig {
            app_id: APP_ID,
            private_key: APP_PRIVATE_KEY_PEM.into(),
            private_key_path: String::new(),
            webhook_secrets: vec!["whsec-previous".into(), WEBHOOK_SECRET.into()],
            api_url: github.base_url.clone(),
            allow_self_claim: self_claim,
        },
        review,
    };
    let env = env_full(postgres, |_| {}, Some(config.clone()), options).await;
    Auto {
        env,
        github,
        config,
    }
}

/// The example payloads, as `(event, body)`.
fn examples() -> Vec<(String, Value)> {
    let text = include_str!("fixtures/github-webhooks/examples.json");
    let all: Vec<Value> = serde_json::from_str(text).unwrap();
    all.into_iter()
        .map(|e| (e["event"].as_str().unwrap().to_owned(), e["body"].clone()))
        .collect()
}

/// Every example payload signed with a configured secret gets 2xx; with a wrong or missing
/// signature 401 and no trace; a repeated delivery id is processed once.
async fn every_example_payload(postgres: bool) {
    // 658 bad signatures from one address: above the failure limiter's budget on purpose.
    let options = ServerOptions {
        auth_failures_per_minute: 100_000,
        ..ServerOptions::default()
    };
    let a = auto_with(postgres, ReviewConfig::default(), false, options).await;
    // By default only site administrators claim installations (nothing proves yet that a user
    // administers the GitHub account).
    let (status, body) = a
        .env
        .request(
            reqwest::Method::POST,
            "/api/github/installations",
            Some(json!({"installationId": INSTALLATION})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let examples = examples();
    assert_eq!(examples.len(), 329);
    for (i, (event, body)) in examples.iter().enumerate() {
        let bytes = serde_json::to_vec(body).unwrap();
        let bad = format!("bad-{i}");
        let (status, reply) = a.webhook(event, &bad, &bytes, Some("not-the-secret")).await;
        assert_eq!(status, 401, "{event} #{i} wrongly signed: {reply}");
        assert_eq!(reply["error"]["code"], "invalid_signature");
        let (status, _) = a.webhook(event, &bad, &bytes, None).await;
        assert_eq!(status, 401, "{event} #{i} unsigned");
        assert!(a.automation().delivery(&bad).await.unwrap().is_none());

        let good = format!("good-{i}");
        let (status, reply) = a.webhook(event, &good, &bytes, Some(WEBHOOK_SECRET)).await;
        assert!(
            (200..300).contains(&status),
            "{event} #{i} ({:?}): {status} {reply}",
            body["action"]
        );
        assert_eq!(reply["duplicate"], false);
        assert_ne!(reply["outcome"], "processing");
    }
    // Nothing was queued: no installation is claimed, so no review or trigger work exists.
    for queue in [DISPATCH_QUEUE, REVIEW_DONE, DELIVERY_QUEUE, TRIGGER_DONE] {
        assert_eq!(a.drain(queue).await, 0, "{queue}");
    }

    // A redelivery is answered with the first outcome and not processed again; the previous
    // secret still verifies (rotation).
    let (event, body) = examples
        .iter()
        .find(|(e, b)| e == "installation" && b["action"] == "created")
        .unwrap();
    let bytes = serde_json::to_vec(body).unwrap();
    let (status, first) = a
        .webhook(event, "dup-1", &bytes, Some(WEBHOOK_SECRET))
        .await;
    assert_eq!(status, 200);
    let (status, again) = a
        .webhook(event, "dup-1", &bytes, Some("whsec-previous"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["outcome"], first["outcome"]);
    assert_eq!(again["receivedAt"], first["receivedAt"]);

    // Forgotten after 24 h.
    a.env.clock.advance(24 * 3_600_000 + 1);
    a.env.sub.alarms().fire_due().await.unwrap();
    assert!(a.automation().delivery("dup-1").await.unwrap().is_none());

    // Headers and body are checked after the signature.
    let (status, reply) = a.webhook("", "x", b"{}", Some(WEBHOOK_SECRET)).await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let (status, _) = a
        .webhook("push", "y", b"not json", Some(WEBHOOK_SECRET))
        .await;
    assert_eq!(status, 400);
}

/// A repository with a pull request from `changes` (adding `div`), recorded on the fake
/// GitHub as #2; returns the `pull_request.opened` example adapted to it.
fn pull_request(a: &Auto, number: u64, branch: &str, action: &str) -> (String, Value) {
    // The branch name in the content: two pushes in one second must not make the same
    // commit (same tree, parent, author and time give the same id).
    let content = format!("{LIB_AFTER}// {branch}\n");
    let (_, head, diff) = a
        .env
        .git
        .push_branch(REPO, "main", branch, &[("src/lib.rs", &content)]);
    a.github.add_pull(
        "Codertocat",
        "Hello-World",
        FakePull {
            number,
            title: format!("Add div #{number}"),
            head_sha: head.clone(),
            head_ref: branch.into(),
            base_ref: "main".into(),
            diff,
            ..FakePull::default()
        },
    );
    let (_, mut body) = examples()
        .into_iter()
        .find(|(e, b)| e == "pull_request" && b["action"] == "opened")
        .unwrap();
    body["action"] = json!(action);
    body["number"] = json!(number);
    body["pull_request"]["number"] = json!(number);
    body["pull_request"]["head"]["sha"] = json!(head);
    body["pull_request"]["head"]["ref"] = json!(branch);
    body["pull_request"]["base"]["ref"] = json!("main");
    body["pull_request"]["draft"] = json!(false);
    body["installation"] = json!({"id": INSTALLATION, "node_id": "x"});
    (head, body)
}

fn seed_repo(a: &Auto) {
    a.env.git.create_repo(
        REPO,
        &[("src/lib.rs", LIB_BEFORE), ("AGENTS.md", "Be brief.\n")],
    );
}

/// The findings the scripted reviewer returns: one on the new division (line 6 of the new
/// file), one far from the diff (line 40).
fn findings() -> String {
    format!(
        "I read src/lib.rs.\n```json\n{}\n```",
        json!({
            "summary": "One real problem.",
            "comments": [
                {"path": "src/lib.rs", "line": 6, "body": "Division by zero panics when `b` is 0."},
                {"path": "src/lib.rs", "line": 40, "body": "Not part of the diff."}
            ]
        })
    )
}

/// A signed `pull_request.opened` → a review posted on the fake GitHub with an inline comment
/// on a changed line; the agent saw the diff; the record completes.
async fn review_end_to_end(postgres: bool) {
    let a = auto(postgres, ReviewConfig::default()).await;
    a.claim().await;
    seed_repo(&a);
    let (head, body) = pull_request(&a, 2, "changes", "opened");
    a.env.upstream.push(Reply::text(&findings(), 900, 120));

    let bytes = serde_json::to_vec(&body).unwrap();
    let (status, reply) = a
        .webhook("pull_request", "pr-1", &bytes, Some(WEBHOOK_SECRET))
        .await;
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["outcome"].as_str().unwrap().ends_with("queued"),
        "{reply}"
    );

    assert_eq!(a.drain(DISPATCH_QUEUE).await, 1);
    let owner = Owner::User(a.env.user);
    a.until(REVIEW_DONE, || async { a.settled().await }).await;
    let list = a.automation().reviews(owner).await.unwrap();
    assert_eq!(list[0].status, ReviewStatus::Completed, "{:?}", list[0]);

    let posted = a.github.reviews();
    assert_eq!(posted.len(), 1);
    let review = &posted[0].body;
    assert_eq!(posted[0].number, 2);
    assert_eq!(review["commit_id"], head);
    assert_eq!(review["event"], "COMMENT");
    let comments = review["comments"].as_array().unwrap();
    assert_eq!(comments.len(), 1, "{review}");
    assert_eq!(comments[0]["path"], "src/lib.rs");
    assert_eq!(comments[0]["line"], 6);
    assert_eq!(comments[0]["side"], "RIGHT");
    let text = review["body"].as_str().unwrap();
    assert!(text.starts_with("One real problem."), "{text}");
    assert!(text.contains("line 40: Not part of the diff."), "{text}");

    let list = a.automation().reviews(owner).await.unwrap();
    let record = &list[0];
    assert_eq!(record.status, ReviewStatus::Completed);
    assert_eq!(record.comments_posted, 1);
    assert!(record.review_url.is_some());
    // The reviewer got the diff and ran read-only.
    let prompt = a.env.upstream.requests()[0].body["messages"].to_string();
    assert!(prompt.contains("a / b"), "the diff is in the prompt");
    assert!(prompt.contains("#2"));
    // Visible through the API.
    let (status, shown) = a
        .env
        .request(
            reqwest::Method::GET,
            &format!("/api/reviews/{}", record.id),
            None,
        )
        .await;
    assert_eq!((status, shown["status"].as_str()), (200, Some("completed")));
}

/// 50 pull requests at once: never more than the slots queued or running; the rest wait and
/// are all reviewed; a push supersedes a waiting and a running review; closing cancels.
async fn slots_and_superseding(postgres: bool) {
    let a = auto(postgres, ReviewConfig::default()).await;
    a.claim().await;
    seed_repo(&a);
    let mut bodies = Vec::new();
    for n in 1..=50 {
        let branch = format!("pr-{n}");
        bodies.push(pull_request(&a, n, &branch, "opened").1);
    }
    let posts = bodies.iter().enumerate().map(|(i, b)| {
        let bytes = serde_json::to_vec(b).unwrap();
        let a = &a;
        async move {
            a.webhook(
                "pull_request",
                &format!("d-{i}"),
                &bytes,
                Some(WEBHOOK_SECRET),
            )
            .await
        }
    });
    for (status, reply) in futures::future::join_all(posts).await {
        assert_eq!(status, 200, "{reply}");
    }
    let counts = a.counts().await;
    assert_eq!(counts.get(&ReviewStatus::Queued), Some(&20), "{counts:?}");
    assert_eq!(counts.get(&ReviewStatus::Pending), Some(&30), "{counts:?}");

    // A push to a waiting pull request (#50 is among the last) and to a queued one (#1).
    let owner = Owner::User(a.env.user);
    let reviews = a.automation().reviews(owner).await.unwrap();
    let waiting = reviews
        .iter()
        .find(|r| r.status == ReviewStatus::Pending)
        .unwrap()
        .number;
    let queued = reviews
        .iter()
        .find(|r| r.status == ReviewStatus::Queued)
        .unwrap()
        .number;
    let mut new_heads = BTreeMap::new();
    for (i, n) in [waiting, queued].into_iter().enumerate() {
        let (head, body) = pull_request(&a, n, &format!("pr-{n}-v2"), "synchronize");
        new_heads.insert(n, head);
        let bytes = serde_json::to_vec(&body).unwrap();
        let (status, _) = a
            .webhook(
                "pull_request",
                &format!("sync-{i}"),
                &bytes,
                Some(WEBHOOK_SECRET),
            )
            .await;
        assert_eq!(status, 200);
    }
    // The same push again changes nothing.
    let (_, body) = (0, {
        let mut b = bodies[(queued - 1) as usize].clone();
        b["action"] = json!("synchronize");
        b["pull_request"]["head"]["sha"] = json!(new_heads[&queued]);
        b["pull_request"]["head"]["ref"] = json!(format!("pr-{queued}-v2"));
        b
    });
    let (_, reply) = a
        .webhook(
            "pull_request",
            "sync-again",
            &serde_json::to_vec(&body).unwrap(),
            Some(WEBHOOK_SECRET),
        )
        .await;
    assert!(
        reply["outcome"]
            .as_str()
            .unwrap()
            .contains("already covers"),
        "{reply}"
    );
    let counts = a.counts().await;
    assert_eq!(
        counts.get(&ReviewStatus::Superseded),
        Some(&2),
        "{counts:?}"
    );
    assert_eq!(counts.get(&ReviewStatus::Queued), Some(&20), "{counts:?}");

    // Closing a waiting pull request cancels its review.
    let closing = reviews
        .iter()
        .rev()
        .find(|r| r.status == ReviewStatus::Pending && r.number != waiting)
        .unwrap()
        .number;
    let mut closed = bodies[(closing - 1) as usize].clone();
    closed["action"] = json!("closed");
    let (_, reply) = a
        .webhook(
            "pull_request",
            "close",
            &serde_json::to_vec(&closed).unwrap(),
            Some(WEBHOOK_SECRET),
        )
        .await;
    assert!(
        reply["outcome"].as_str().unwrap().ends_with("cancelled"),
        "{reply}"
    );

    // Run everything; the slots hold at every step.
    let mut signal = a.env.agents.event_signal();
    tokio::time::timeout(Duration::from_secs(600), async {
        loop {
            signal.borrow_and_update();
            a.drain(DISPATCH_QUEUE).await;
            a.drain(REVIEW_DONE).await;
            let counts = a.counts().await;
            let active = counts.get(&ReviewStatus::Queued).unwrap_or(&0)
                + counts.get(&ReviewStatus::Running).unwrap_or(&0);
            assert!(active <= 20, "{counts:?}");
            if a.settled().await {
                assert_eq!(
                    counts.get(&ReviewStatus::Completed),
                    Some(&49),
                    "{counts:?}"
                );
                break;
            }
            signal.changed().await.unwrap();
        }
    })
    .await
    .expect("every review completed");
    let counts = a.counts().await;
    assert_eq!(counts.get(&ReviewStatus::Cancelled), Some(&1), "{counts:?}");
    let posted = a.github.reviews();
    assert_eq!(posted.len(), 49);
    for (n, head) in &new_heads {
        let on_pr: Vec<_> = posted.iter().filter(|r| r.number == *n).collect();
        assert_eq!(on_pr.len(), 1, "one review on #{n}");
        assert_eq!(on_pr[0].body["commit_id"], json!(head));
    }
    assert!(!posted.iter().any(|r| r.number == closing));
}

/// A review whose session hangs fails after 20 minutes and frees its slot.
async fn review_timeout(postgres: bool) {
    let a = auto(
        postgres,
        ReviewConfig {
            max_concurrent: 1,
            ..ReviewConfig::default()
        },
    )
    .await;
    a.claim().await;
    seed_repo(&a);
    a.env.upstream.push(Reply::Hang);
    for (i, n) in [1u64, 2].into_iter().enumerate() {
        let (_, body) = pull_request(&a, n, &format!("b{n}"), "opened");
        let bytes = serde_json::to_vec(&body).unwrap();
        a.webhook(
            "pull_request",
            &format!("t-{i}"),
            &bytes,
            Some(WEBHOOK_SECRET),
        )
        .await;
    }
    assert_eq!(a.drain(DISPATCH_QUEUE).await, 1);
    let owner = Owner::User(a.env.user);
    let running = a.automation().reviews(owner).await.unwrap();
    let first = running.iter().find(|r| r.number == 1).unwrap();
    assert_eq!(first.status, ReviewStatus::Running);
    assert_eq!(a.counts().await.get(&ReviewStatus::Pending), Some(&1));

    a.env.clock.advance(20 * 60_000);
    a.env.sub.alarms().fire_due().await.unwrap();
    let first = a
        .automation()
        .review(owner, &first.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.status, ReviewStatus::Failed);
    assert!(first.error.unwrap().contains("20 min"));
    // The slot went to the next review.
    let counts = a.counts().await;
    assert_eq!(counts.get(&ReviewStatus::Queued), Some(&1), "{counts:?}");
    assert!(a.github.reviews().is_empty());
}

/// The review queued before a restart is posted by the restarted node.
async fn review_survives_restart(postgres: bool) {
    let a = auto(postgres, ReviewConfig::default()).await;
    a.claim().await;
    seed_repo(&a);
    let (head, body) = pull_request(&a, 2, "changes", "opened");
    a.env.upstream.push(Reply::text(&findings(), 900, 120));
    let bytes = serde_json::to_vec(&body).unwrap();
    let (status, _) = a
        .webhook("pull_request", "r-1", &bytes, Some(WEBHOOK_SECRET))
        .await;
    assert_eq!(status, 200);

    let node = Restarted::open(&a.env, a.config.clone()).await;
    let owner = Owner::User(a.env.user);
    assert_eq!(
        node.sub
            .queues()
            .process_batch(DISPATCH_QUEUE, &DispatchConsumer(node.automation.clone()))
            .await
            .unwrap(),
        1
    );
    let mut signal = node.agents.event_signal();
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            signal.borrow_and_update();
            node.sub
                .queues()
                .process_batch(REVIEW_DONE, &ReviewDone(node.automation.clone()))
                .await
                .unwrap();
            let list = node.automation.reviews(owner).await.unwrap();
            if list[0].status == ReviewStatus::Completed {
                break;
            }
            signal.changed().await.unwrap();
        }
    })
    .await
    .expect("the review completed on the restarted node");
    let posted = a.github.reviews();
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0].body["commit_id"], head);
    assert_eq!(posted[0].body["comments"][0]["line"], 6);
}

/// A second node on the same store, with its own agents and automation.
struct Restarted {
    sub: Substrate,
    agents: kilocloud_agent::Agents,
    automation: Automation,
}

impl Restarted {
    async fn open(env: &Env, config: AutomationConfig) -> Self {
        let sub = env._store.open(env.clock.clone()).await;
        let identity = identity_on(&sub, &env.master_keys);
        let mut agent_config = kilocloud_agent::AgentConfig {
            default_model: MODEL.into(),
            ..kilocloud_agent::AgentConfig::default()
        };
        agent_config.git.allow_http = true;
        agent_config.git.allow_private_hosts = true;
        agent_config.git.github_base = env.git.base_url.clone();
        let sandbox = Arc::new(LocalSandbox::new(
            &SandboxConfig::default(),
            env._sandboxes.path().to_path_buf(),
        ));
        let agents =
            kilocloud_agent::Agents::with_sandbox(&sub, identity.clone(), agent_config, sandbox);
        agents.set_server_url(&env.base);
        let automation = Automation::new(&sub, identity, agents.clone(), config).unwrap();
        Self {
            sub,
            agents,
            automation,
        }
    }
}

/// A webhook trigger with an HMAC secret: a bad signature is refused and leaves no request;
/// a signed call renders the template from the payload, starts a session on the repository
/// (with the owner's installation token), and the request follows it to `success`.
async fn webhook_trigger(postgres: bool) {
    let a = auto(postgres, ReviewConfig::default()).await;
    a.claim().await;
    seed_repo(&a);
    let created = a
        .create_trigger(json!({
            "id": "issue-bot",
            "destination": {"type": "cloud_agent", "githubRepo": REPO, "mode": "ask",
                "promptTemplate": "Look into: {{ payload.issue.title }} ({{ headers['x-event'] }})"},
            "activation": {"type": "webhook",
                "auth": {"kind": "hmac", "header": "X-Signature-256", "secret": "trigger-secret-1"}},
        }))
        .await;
    assert!(created.get("auth").is_none() && !created.to_string().contains("trigger-secret-1"));
    let path = created["inboundPath"].as_str().unwrap().to_owned();
    assert_eq!(path, format!("/hooks/user/{}/issue-bot", a.env.user));

    let body = json!({"issue": {"title": "Crash on start"}}).to_string();
    let post = |signature: Option<String>| {
        let mut req = a
            .env
            .http
            .post(format!("{}{path}?source=test", a.env.base))
            .header("content-type", "application/json")
            .header("x-event", "issues")
            .body(body.clone());
        if let Some(s) = signature {
            req = req.header("x-signature-256", s);
        }
        req.send()
    };
    let res = post(Some(sign(b"wrong-secret", body.as_bytes())))
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = post(None).await.unwrap();
    assert_eq!(res.status(), 401);
    let (_, requests) = a
        .env
        .request(
            reqwest::Method::GET,
            "/api/triggers/issue-bot/requests",
            None,
        )
        .await;
    assert_eq!(requests, json!([]), "a refused call leaves no request");

    a.env
        .upstream
        .push(Reply::text("Looked; the crash is in main.", 50, 10));
    let res = post(Some(sign(b"trigger-secret-1", body.as_bytes())))
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let captured: Value = res.json().await.unwrap();
    let request_id = captured["requestId"].as_str().unwrap().to_owned();

    assert_eq!(a.drain(DELIVERY_QUEUE).await, 1);
    let owner = Owner::User(a.env.user);
    let r = a
        .automation()
        .trigger_request(owner, "issue-bot", &request_id)
        .await
        .unwrap();
    assert_eq!(
        r.status,
        kilocloud_automation::triggers::RequestStatus::Inprogress
    );
    assert_eq!(r.query, "source=test");
    assert!(
        !r.headers.contains_key("x-signature-256"),
        "the auth header is not stored"
    );
    let session = r.session_id.clone().unwrap();

    a.until(TRIGGER_DONE, || async {
        a.automation()
            .trigger_request(owner, "issue-bot", &request_id)
            .await
            .unwrap()
            .status
            == kilocloud_automation::triggers::RequestStatus::Success
    })
    .await;
    let prompt = a.env.upstream.requests()[0].body["messages"].to_string();
    assert!(
        prompt.contains("Look into: Crash on start (issues)"),
        "{prompt}"
    );
    let (status, view) = a
        .env
        .request(
            reqwest::Method::GET,
            &format!("/api/sessions/{session}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        view["hasGitToken"], true,
        "cloned with the installation token"
    );
    assert_eq!(view["repo"], format!("{}/{REPO}.git", a.env.git.base_url));
}

/// Limits: 413 over 256 KiB, 415 for binary content, 429 with 20 in flight, 404 for an
/// unknown or inactive trigger; the newest 100 requests are kept.
async fn webhook_limits(postgres: bool) {
    let a = auto(postgres, ReviewConfig::default()).await;
    let spec = json!({
        "id": "notes",
        "destination": {"type": "chat", "messageTemplate": "note: {{ payload.n }}"},
        "activation": {"type": "webhook"},
    });
    let (status, created) = a
        .env
        .request(reqwest::Method::POST, "/api/triggers", Some(spec.clone()))
        .await;
    assert_eq!(status, 201, "{created}");
    let (status, _) = a
        .env
        .request(reqwest::Method::POST, "/api/triggers", Some(spec.clone()))
        .await;
    assert_eq!(status, 409);
    let url = format!("{}/hooks/user/{}/notes", a.env.base, a.env.user);
    let send = |body: String, content_type: &'static str| {
        a.env
            .http
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let res = send("x".repeat(256 * 1024 + 1), "text/plain")
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    let res = send("GIF89a".into(), "image/gif").await.unwrap();
    assert_eq!(res.status(), 415);
    let res = a
        .env
        .http
        .post(format!("{}/hooks/user/{}/nope", a.env.base, a.env.user))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);

    let mut first = None;
    for n in 0..20 {
        let res = send(json!({"n": n}).to_string(), "application/json")
            .await
            .unwrap();
        assert_eq!(res.status(), 202);
        let v: Value = res.json().await.unwrap();
        first.get_or_insert(v["requestId"].as_str().unwrap().to_owned());
    }
    let res = send("{}".into(), "application/json").await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "5");
    assert_eq!(a.drain(DELIVERY_QUEUE).await, 20);
    let owner = Owner::User(a.env.user);
    let r = a
        .automation()
        .trigger_request(owner, "notes", first.as_ref().unwrap())
        .await
        .unwrap();
    assert_eq!(r.message.as_deref(), Some("note: 0"));
    assert_eq!(
        r.status,
        kilocloud_automation::triggers::RequestStatus::Success
    );

    // 120 requests in all: the oldest 20 are gone.
    for round in 0..5 {
        for n in 0..20 {
            let res = send(json!({"n": round * 20 + n}).to_string(), "application/json")
                .await
                .unwrap();
            assert_eq!(res.status(), 202);
        }
        a.drain(DELIVERY_QUEUE).await;
    }
    let kept = a
        .automation()
        .trigger_requests(owner, "notes", 100)
        .await
        .unwrap();
    assert_eq!(kept.len(), 100);
    assert!(
        a.automation()
            .trigger_request(owner, "notes", first.as_ref().unwrap())
            .await
            .is_err()
    );
    // A shared secret in a header: stored only as its hash; wrong or missing → 401.
    let created = a
        .create_trigger(json!({
            "id": "guarded",
            "destination": {"type": "chat", "messageTemplate": "{{ body }}"},
            "activation": {"type": "webhook",
                "auth": {"kind": "header", "header": "X-Hook-Token", "secret": "s3cret-hook-token"}},
        }))
        .await;
    assert_eq!(created["authKind"], "header");
    assert!(!created.to_string().contains("s3cret"));
    let guarded = format!("{}/hooks/user/{}/guarded", a.env.base, a.env.user);
    for (token, want) in [
        (None, 401),
        (Some("wrong-token-value"), 401),
        (Some("s3cret-hook-token"), 202),
    ] {
        let mut req = a.env.http.post(&guarded).body("hello");
        if let Some(t) = token {
            req = req.header("x-hook-token", t);
        }
        assert_eq!(req.send().await.unwrap().status(), want, "{token:?}");
    }
    a.drain(DELIVERY_QUEUE).await;
    let got = a
        .automation()
        .trigger_requests(owner, "guarded", 10)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.as_deref(), Some("hello"));
    assert!(!got[0].headers.contains_key("x-hook-token"));

    // Inactive: 404.
    let mut inactive = spec.clone();
    inactive["active"] = json!(false);
    let (status, _) = a
        .env
        .request(reqwest::Method::PUT, "/api/triggers/notes", Some(inactive))
        .await;
    assert_eq!(status, 200);
    let res = send("{}".into(), "application/json").await.unwrap();
    assert_eq!(res.status(), 404);
    // Another user does not see it.
    let system = kilocloud_identity::model::Initiator {
        user: Uuid::nil(),
        request_id: None,
    };
    let (_, other, _) = a
        .env
        .identity
        .create_user("other@example.com", "other", false, &system)
        .await
        .unwrap();
    let (status, _) = a
        .env
        .request_as(&other, reqwest::Method::GET, "/api/triggers/notes", None)
        .await;
    assert_eq!(status, 404);
    // Requests whose sessions never report back stop counting after 24 h.
    let _ = a
        .create_trigger(json!({
            "id": "stuck",
            "destination": {"type": "chat", "messageTemplate": "x"},
            "activation": {"type": "webhook"},
        }))
        .await;
    let stuck = format!("{}/hooks/user/{}/stuck", a.env.base, a.env.user);
    let mut first_stuck = None;
    for _ in 0..20 {
        let res = a.env.http.post(&stuck).body("{}").send().await.unwrap();
        assert_eq!(res.status(), 202);
        let v: Value = res.json().await.unwrap();
        first_stuck.get_or_insert(v["requestId"].as_str().unwrap().to_owned());
    }
    let res = a.env.http.post(&stuck).body("{}").send().await.unwrap();
    assert_eq!(res.status(), 429);
    a.env.clock.advance(24 * 3_600_000 + 1);
    let res = a.env.http.post(&stuck).body("{}").send().await.unwrap();
    assert_eq!(res.status(), 202);
    let old = a
        .automation()
        .trigger_request(owner, "stuck", first_stuck.as_ref().unwrap())
        .await
        .unwrap();
    assert_eq!(
        old.status,
        kilocloud_automation::triggers::RequestStatus::Failed
    );
    assert!(old.error.unwrap().contains("24 h"));

    // Guessing the secret is limited per address like credentials (30 failures a minute; two
    // were spent above; the address is then blocked for every authentication).
    let mut statuses = Vec::new();
    for _ in 0..31 {
        let res = a
            .env
            .http
            .post(&guarded)
            .header("x-hook-token", "guess")
            .body("x")
            .send();
        statuses.push(res.await.unwrap().status().as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        28,
        "{statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&429));
}

/// A scheduled trigger fires on time (not a millisecond early) and starts a session; after a
/// restart its next firing still comes, from the stored alarm.
async fn scheduled_trigger(postgres: bool) {
    let a = auto(postgres, ReviewConfig::default()).await;
    a.claim().await;
    seed_repo(&a);
    let created = a
        .create_trigger(json!({
            "id": "nightly",
            "destination": {"type": "cloud_agent", "githubRepo": REPO, "mode": "ask",
                "promptTemplate": "Scheduled check at {{ timestamp }} ({{ method }})"},
            "activation": {"type": "schedule", "cron": "*/15 * * * *", "timezone": "Europe/Paris"},
        }))
        .await;
    let next = created["nextFireAt"].as_i64().unwrap();
    assert_eq!(next % (15 * 60_000), 0);
    let now = a.env.clock.now_ms();
    assert!(next > now && next - now <= 15 * 60_000);

    a.env.clock.advance(next - now - 1);
    a.env.sub.alarms().fire_due().await.unwrap();
    let owner = Owner::User(a.env.user);
    assert!(
        a.automation()
            .trigger_requests(owner, "nightly", 10)
            .await
            .unwrap()
            .is_empty()
    );
    a.env.clock.advance(1);
    a.env.sub.alarms().fire_due().await.unwrap();
    let fired = a
        .automation()
        .trigger_requests(owner, "nightly", 10)
        .await
        .unwrap();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].received_at, next);
    assert_eq!(fired[0].method, "SCHEDULE");
    a.env.upstream.push(Reply::text("All good.", 20, 5));
    assert_eq!(a.drain(DELIVERY_QUEUE).await, 1);
    a.until(TRIGGER_DONE, || async {
        a.automation()
            .trigger_requests(owner, "nightly", 10)
            .await
            .unwrap()[0]
            .status
            == kilocloud_automation::triggers::RequestStatus::Success
    })
    .await;
    let prompt = a.env.upstream.requests()[0].body["messages"].to_string();
    assert!(prompt.contains("(SCHEDULE)"), "{prompt}");

    // Restart: a new node on the same store fires the next occurrence.
    let node = Restarted::open(&a.env, a.config.clone()).await;
    let shown = node.automation.trigger(owner, "nightly").await.unwrap();
    assert_eq!(shown.next_fire_at, Some(next + 15 * 60_000));
    a.env.clock.advance(15 * 60_000);
    node.sub.alarms().fire_due().await.unwrap();
    let fired = node
        .automation
        .trigger_requests(owner, "nightly", 10)
        .await
        .unwrap();
    assert_eq!(fired.len(), 2);
    assert_eq!(fired[0].received_at, next + 15 * 60_000);
    a.env.upstream.push(Reply::text("Still good.", 20, 5));
    assert_eq!(
        node.sub
            .queues()
            .process_batch(DELIVERY_QUEUE, &DeliveryConsumer(node.automation.clone()))
            .await
            .unwrap(),
        1
    );
    let started = node
        .automation
        .trigger_requests(owner, "nightly", 10)
        .await
        .unwrap();
    assert!(
        started[0].session_id.is_some(),
        "a session started: {started:?}"
    );
}

on_both_backends!(
    every_example_payload,
    review_end_to_end,
    slots_and_superseding,
    review_timeout,
    review_survives_restart,
    webhook_trigger,
    webhook_limits,
    scheduled_trigger,
);
