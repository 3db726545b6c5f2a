//! The HTTP surface on SQLite and PostgreSQL: error format and statuses, admin authentication,
//! body limits, request ids, readiness and metrics.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use kilocloud_gateway::GatewayConfig;
use kilocloud_identity::envelope::{MasterKey, MasterKeys};
use kilocloud_identity::{Identity, IdentityConfig};
use kilocloud_server::api::gateway;
use kilocloud_server::{ApiError, AppState, ServerOptions, probe, router};
use kilocloud_substrate::{Error, SystemClock};
use kilocloud_test_support::TestStore;
use serde_json::{Value, json};
use tower::ServiceExt;

const TOKEN: &str = "admin-secret";

struct Env {
    _store: TestStore,
    sub: kilocloud_substrate::Substrate,
    app: axum::Router,
}

fn identity_config() -> IdentityConfig {
    IdentityConfig {
        jwt_secret: b"http-test-jwt-secret".to_vec(),
        master_keys: MasterKeys::new(MasterKey::generate().0, vec![]),
        internal_api_secret: None,
    }
}

async fn env(postgres: bool, admin: Option<&str>) -> Env {
    let store = TestStore::new(postgres).await;
    let sub = store.open(Arc::new(SystemClock)).await;
    probe::register(&sub).unwrap();
    let identity = Identity::new(&sub, identity_config());
    let options = ServerOptions {
        admin_token: admin.unwrap_or_default().to_owned(),
        ..ServerOptions::default()
    };
    let gateway = gateway::state(&sub, &GatewayConfig::default(), |_| None).unwrap();
    let app = router(AppState::new(sub.clone(), identity, gateway, &options));
    Env {
        _store: store,
        sub,
        app,
    }
}

async fn send(app: &axum::Router, req: Request<Body>) -> (StatusCode, http::HeaderMap, Value) {
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
    (parts.status, parts.headers, value)
}

fn admin(method: &str, uri: &str, body: Option<String>) -> Request<Body> {
    let b = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json");
    b.body(body.map(Body::from).unwrap_or_else(Body::empty))
        .unwrap()
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

async fn surface(postgres: bool) {
    let e = env(postgres, Some(TOKEN)).await;
    let (s, h, b) = send(&e.app, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!((s, &b), (StatusCode::OK, &json!({"status": "ok"})));
    assert!(
        h.get("x-request-id").is_some(),
        "request id is set on responses"
    );
    let (s, _, b) = send(&e.app, Request::get("/ready").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["backend"], if postgres { "postgres" } else { "sqlite" });
    let (s, h, _) = send(
        &e.app,
        Request::get("/health")
            .header("x-request-id", "abc-123")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        h["x-request-id"], "abc-123",
        "a caller's request id is propagated"
    );

    let (s, _, b) = send(&e.app, Request::get("/nope").body(Body::empty()).unwrap()).await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
    let (s, _, b) = send(
        &e.app,
        Request::delete("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_error(s, &b, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");

    // Admin authentication.
    let (s, _, b) = send(
        &e.app,
        Request::get("/api/admin/queues")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthenticated");
    let (s, _, b) = send(
        &e.app,
        Request::get("/api/admin/queues")
            .header("authorization", "Bearer admin-secreT")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "credential_malformed");

    // Bad input.
    let (s, _, b) = send(
        &e.app,
        admin(
            "POST",
            "/api/admin/queues/probe/messages",
            Some("{not json".into()),
        ),
    )
    .await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_json");
    let big = json!({"key": "k", "token": "t", "pad": "x".repeat(140 * 1024)}).to_string();
    let (s, _, b) = send(
        &e.app,
        admin("POST", "/api/admin/queues/probe/messages", Some(big)),
    )
    .await;
    assert_error(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "message_too_large");
    let huge = json!({"pad": "x".repeat(300 * 1024)}).to_string();
    let (s, _, b) = send(
        &e.app,
        admin("POST", "/api/admin/queues/probe/messages", Some(huge)),
    )
    .await;
    assert_error(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let (s, _, b) = send(
        &e.app,
        admin("POST", "/api/admin/queues/nope/messages", Some("{}".into())),
    )
    .await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
    let (s, _, b) = send(
        &e.app,
        admin(
            "POST",
            "/api/admin/queues/probe/messages?delay_ms=86400001",
            Some("{}".into()),
        ),
    )
    .await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "delay_too_long");
    let (s, _, b) = send(
        &e.app,
        admin("GET", "/api/admin/queues/probe/dlq?limit=0", None),
    )
    .await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "bad_request");
    let (s, _, b) = send(
        &e.app,
        admin("POST", "/api/admin/queues/probe/replay", Some("[1]".into())),
    )
    .await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_json");
    // Unknown queues and actor types are 404, as documented.
    for (method, path) in [
        ("GET", "/api/admin/queues/nope/dlq"),
        ("POST", "/api/admin/queues/nope/replay"),
        ("DELETE", "/api/admin/queues/nope/dlq"),
        ("GET", "/api/admin/actors/no_such_type/k"),
    ] {
        let (s, _, b) = send(&e.app, admin(method, path, None)).await;
        assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
    }
    // Nothing was enqueued by any refused request.
    let (s, _, b) = send(&e.app, admin("GET", "/api/admin/queues", None)).await;
    assert_eq!(s, StatusCode::OK);
    let probe = b
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "probe")
        .unwrap()
        .clone();
    assert_eq!(probe["ready"], 0);

    // Accepted traffic.
    let (s, _, b) = send(
        &e.app,
        admin(
            "POST",
            "/api/admin/queues/probe/messages",
            Some(r#"{"key":"k","token":"t"}"#.into()),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert!(b["id"].as_i64().is_some());
    let (s, _, b) = send(
        &e.app,
        admin(
            "POST",
            "/api/admin/probe/k",
            Some(r#"{"token":"x"}"#.into()),
        ),
    )
    .await;
    assert_eq!((s, b), (StatusCode::OK, json!({"count": 1})));
    let (s, _, b) = send(&e.app, admin("GET", "/api/admin/actors/probe/k", None)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["storage"]["t/x"], true);
    for sensitive in [
        "owner/user:00000000-0000-0000-0000-000000000000",
        "index/email:a@b",
    ] {
        let uri = format!("/api/admin/actors/{sensitive}");
        let (s, _, b) = send(&e.app, admin("GET", &uri, None)).await;
        assert_error(s, &b, StatusCode::FORBIDDEN, "sensitive_actor_type");
    }

    let (s, h, text) = send(
        &e.app,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = text.as_str().unwrap();
    for name in [
        "kilocloud_http_requests_total",
        "kilocloud_http_request_duration_seconds_bucket",
        "kilocloud_queue_depth{queue=\"probe\",state=\"ready\"} 1",
        "kilocloud_queue_oldest_message_age_seconds{queue=\"probe\"}",
        "kilocloud_queue_dead_letters{queue=\"probe\"} 0",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }

    // Dead letters: listed, deleted by id, purged.
    let q = e.sub.queues();
    q.send_batch("probe", &[json!({"poison": 1}), json!({"poison": 2})], 0)
        .await
        .unwrap();
    let mut dead = 0;
    for _ in 0..100 {
        if dead == 3 {
            break;
        }
        for d in q.receive("probe", 10).await.unwrap() {
            if q.retry(&d, Some(0), "poison").await.unwrap()
                == kilocloud_substrate::RetryOutcome::DeadLettered
            {
                dead += 1;
            }
        }
    }
    assert_eq!(dead, 3, "every probe message was dead-lettered");
    let (s, _, b) = send(&e.app, admin("GET", "/api/admin/queues/probe/dlq", None)).await;
    assert_eq!(s, StatusCode::OK);
    let first = b[0]["id"].as_i64().unwrap();
    let (s, _, b) = send(
        &e.app,
        admin(
            "DELETE",
            "/api/admin/queues/probe/dlq",
            Some(json!({"ids": [first]}).to_string()),
        ),
    )
    .await;
    assert_eq!((s, b), (StatusCode::OK, json!({"deleted": 1})));
    let (s, _, b) = send(&e.app, admin("DELETE", "/api/admin/queues/probe/dlq", None)).await;
    assert_eq!((s, b), (StatusCode::OK, json!({"deleted": 2})));
    let (_, _, b) = send(&e.app, admin("GET", "/api/admin/queues/probe/dlq", None)).await;
    assert_eq!(b, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_http_surface() {
    surface(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_http_surface() {
    surface(true).await;
}

#[tokio::test]
async fn without_a_static_token_the_admin_api_needs_an_administrator() {
    let e = env(false, Some("")).await;
    let (s, _, b) = send(&e.app, admin("GET", "/api/admin/queues", None)).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "credential_malformed");
}

#[test]
fn substrate_errors_map_to_statuses() {
    use axum::response::IntoResponse;
    let cases: Vec<(Error, StatusCode, &str, Option<&str>)> = vec![
        (
            Error::Overloaded {
                actor_type: "t".into(),
                key: "k".into(),
                backlog: 9,
                retry_after: std::time::Duration::from_secs(1),
            },
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            Some("1"),
        ),
        (
            Error::ShuttingDown,
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            Some("1"),
        ),
        (
            Error::MessageTooLarge { size: 2, limit: 1 },
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_large",
            None,
        ),
        (
            Error::DelayTooLong {
                delay_ms: 2,
                max_ms: 1,
            },
            StatusCode::BAD_REQUEST,
            "delay_too_long",
            None,
        ),
        (
            Error::NotFound {
                what: "queue",
                name: "q".into(),
            },
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            Error::Invalid {
                what: "cron expression",
                message: "x".into(),
            },
            StatusCode::BAD_REQUEST,
            "bad_request",
            None,
        ),
        (
            Error::Handler("boom".into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "handler_failed",
            None,
        ),
        (
            Error::Internal("call panicked".into()),
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            None,
        ),
        (
            Error::Storage("db down at postgres://u:pw@h".into()),
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            Some("1"),
        ),
    ];
    for (err, status, code, retry_after) in cases {
        let api = ApiError::from(err);
        assert_eq!((api.status, api.code), (status, code));
        assert!(
            !api.message.contains("pw@"),
            "storage details are not exposed: {}",
            api.message
        );
        let res = api.into_response();
        assert_eq!(
            res.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap()),
            retry_after
        );
    }
}
