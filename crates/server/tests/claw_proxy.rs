//! The KiloClaw proxy's state rules on SQLite and PostgreSQL, in process, on the `fly` provider
//! against the fake Fly API whose machines answer at one local upstream (the built-in runtime
//! behind a listener that can drop connections): a running machine that does not answer is
//! started again once and the request retried; an instance without a machine is 404
//! `not_provisioned`; a destroying one is 409; a destroyed one 404.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kilocloud_claw::fly::{FlyConfig, FlyProvider};
use kilocloud_claw::runtime::{RuntimeConfig, router as runtime_router};
use kilocloud_claw::{Claw, ClawConfig, CreateInstance, ProviderKind};
use kilocloud_gateway::GatewayConfig;
use kilocloud_identity::envelope::{MasterKey, MasterKeys};
use kilocloud_identity::model::Initiator;
use kilocloud_identity::{Identity, IdentityConfig, Owner};
use kilocloud_server::api::gateway;
use kilocloud_server::{AppState, ServerOptions, router};
use kilocloud_substrate::SystemClock;
use kilocloud_test_support::fake_flyio::FakeFly;
use kilocloud_test_support::{TestStore, on_both_backends};
use serde_json::Value;
use uuid::Uuid;

const FLY_TOKEN: &str = "fly-proxy-token";

/// An upstream that relays to `target`, closing the next `drops` new connections at once;
/// `cut` closes the connections it relays (a crashed runtime).
async fn flaky_upstream(
    target: std::net::SocketAddr,
    drops: Arc<AtomicUsize>,
    cut: Arc<tokio::sync::Notify>,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            if drops
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| d.checked_sub(1))
                .is_ok()
            {
                drop(conn);
                continue;
            }
            let cut = cut.clone();
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut conn, &mut up) => {}
                        () = cut.notified() => {}
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

async fn proxy_state_rules(pg: bool) {
    let store = TestStore::new(pg).await;
    let sub = store.open(Arc::new(SystemClock)).await;
    let identity = Identity::new(
        &sub,
        IdentityConfig {
            jwt_secret: b"claw-proxy-test-jwt-secret-0123".to_vec(),
            master_keys: MasterKeys::new(
                MasterKey::parse(
                    "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
                )
                .unwrap(),
                vec![],
            ),
            internal_api_secret: None,
        },
    );
    let gateway = gateway::state(&sub, &GatewayConfig::default(), |_| None).unwrap();
    let fly = FakeFly::start(FLY_TOKEN).await;
    let secret = "proxy-gateway-secret";

    // The runtime every machine "is": its gateway token is the instance's, set below.
    let runtime_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let runtime_addr = runtime_listener.local_addr().unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(tokio::sync::Notify::new());
    let app_url = flaky_upstream(runtime_addr, drops.clone(), cut.clone()).await;

    let provider = FlyProvider::new(FlyConfig {
        api_url: fly.url(),
        api_token: FLY_TOKEN.into(),
        app_url,
        rate_per_second: 10_000,
        rate_burst: 10_000,
        ..FlyConfig::default()
    })
    .unwrap();
    let claw = Claw::new(
        &sub,
        identity.clone(),
        ClawConfig {
            provider: ProviderKind::Fly,
            gateway_token_secret: secret.into(),
            startup_timeout_ms: 1_000,
            ..ClawConfig::default()
        },
        Arc::new(provider),
        String::new(),
    );
    sub.start().await.unwrap();
    let system = Initiator {
        user: Uuid::nil(),
        request_id: None,
    };
    let (user, _, _) = identity
        .create_user("proxy@example.com", "proxy", false, &system)
        .await
        .unwrap();
    let by = Initiator {
        user: user.id,
        request_id: None,
    };
    let (jwt, _) = identity
        .issue_jwt(user.id, None, None, 3600, &by)
        .await
        .unwrap();
    let create = |start| CreateInstance {
        start: Some(start),
        ..CreateInstance::default()
    };
    let running = claw
        .create(Owner::User(user.id), user.id, create(true), &by)
        .await
        .unwrap();
    let config = RuntimeConfig {
        gateway_token: claw.gateway_token(&running.sandbox_id),
        api_key: "unused".into(),
        api_base_url: "http://127.0.0.1:9/".into(),
        default_model: "m".into(),
        home: store.dir.path().join("runtime-home"),
    };
    tokio::spawn(async move {
        axum::serve(runtime_listener, runtime_router(config))
            .await
            .unwrap()
    });

    let state = AppState::new(
        sub.clone(),
        identity.clone(),
        gateway,
        &ServerOptions::default(),
    )
    .with_claw(claw.clone(), false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(
            listener,
            router(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap()
    });
    let http = reqwest::Client::new();
    // `GET /i/{id}/{path}` with `token`.
    let get_as = |id: Uuid, path: &str, token: &str| {
        http.get(format!("{base}/i/{id}/{path}"))
            .bearer_auth(token)
            .send()
    };
    let get = |id: Uuid| get_as(id, "health", &jwt);
    let code = |body: &Value| body["error"]["code"].as_str().unwrap_or("").to_owned();

    // Answers; then the runtime crashes (its connections close, the next one is refused): a
    // restart and one retry.
    assert_eq!(get(running.id).await.unwrap().status(), 200);
    let machine = running.machine_id.clone().unwrap();
    let machine_gets = || {
        fly.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(&format!("/machines/{machine}")))
            .count()
    };
    let before = machine_gets();
    drops.store(1, Ordering::SeqCst);
    cut.notify_waiters();
    let res = get(running.id).await.unwrap();
    assert_eq!(res.status(), 200, "retried after the restart");
    assert!(machine_gets() > before, "the restart checked the machine");
    // Two failures in a row: 503, with a reason.
    drops.store(2, Ordering::SeqCst);
    cut.notify_waiters();
    let res = get(running.id).await.unwrap();
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(code(&body), "instance_not_reachable", "{body}");
    drops.store(0, Ordering::SeqCst);

    // The path is relayed as sent: an encoded space reaches the runtime (its 404), not a
    // failed request that would restart it.
    let before = machine_gets();
    let res = get_as(running.id, "no%20such", &jwt).await.unwrap();
    assert_eq!(res.status(), 404, "the runtime's own answer");
    assert_eq!(machine_gets(), before, "no restart");

    // A token pinned to an organization reaches only that organization's instances; a bot's
    // token none.
    let org = identity.create_org("acme", &by).await.unwrap();
    let (pinned, _) = identity
        .issue_jwt(user.id, Some(org.id), None, 3600, &by)
        .await
        .unwrap();
    let res = get_as(running.id, "health", &pinned).await.unwrap();
    assert_eq!(
        res.status(),
        404,
        "a personal instance with an org-pinned token"
    );
    let bot = identity
        .create_bot(Owner::User(user.id), "helper", &by)
        .await
        .unwrap();
    let (bot_token, _) = identity
        .issue_jwt(user.id, None, Some(bot.id), 3600, &by)
        .await
        .unwrap();
    let res = get_as(running.id, "health", &bot_token).await.unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(
        code(&res.json().await.unwrap()),
        "personal_credential_required"
    );

    // The legacy per-user instance (provisioned without an instance id) is served at
    // `/claw/`, as documented.
    let legacy = claw
        .provision_legacy(user.id, create(true), &by)
        .await
        .unwrap();
    assert_eq!(legacy.id, user.id, "a legacy instance's key is its user");
    let res = http
        .get(format!("{base}/claw/health"))
        .bearer_auth(&jwt)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    let res = http
        .get(format!("{base}/claw/health"))
        .bearer_auth(&pinned)
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        404,
        "an org-pinned token has no personal legacy instance"
    );
    let found = claw.find(Owner::User(user.id), user.id).await.unwrap();
    assert!(claw.destroy(&found).await.unwrap());

    // No machine yet: 404 not_provisioned.
    let idle = claw
        .create(Owner::User(user.id), user.id, create(false), &by)
        .await
        .unwrap();
    let res = get(idle.id).await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(code(&res.json().await.unwrap()), "not_provisioned");

    // Destroying (the provider refuses the delete for now): 409; once gone: 404.
    fly.fail_next(
        &format!("/machines/{machine}"),
        "DELETE",
        1,
        503,
        "{\"error\":\"busy\"}",
    );
    let found = claw.find(Owner::User(user.id), running.id).await.unwrap();
    assert!(
        !claw.destroy(&found).await.unwrap(),
        "the delete is pending"
    );
    let res = get(running.id).await.unwrap();
    assert_eq!(res.status(), 409, "while destroying");
    assert_eq!(code(&res.json().await.unwrap()), "instance_destroying");
    // The next attempt (the alarm's, or a repeated destroy) confirms it: then 404.
    assert!(claw.destroy(&found).await.unwrap());
    assert_eq!(get(running.id).await.unwrap().status(), 404);
    assert_eq!(fly.machine_count(), 0);
}

on_both_backends!(proxy_state_rules);
