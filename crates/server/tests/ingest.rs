//! Session ingest of the Kilo Code CLI and `kilo remote` presence, through a real server on
//! SQLite and PostgreSQL: create (idempotent), ingest with compaction by key, export in
//! `kilo export`'s shape, listing, title, share and the public share fetch, unshare, delete;
//! the errors (400 malformed, 404 unknown and another owner's, 413 over the body limit,
//! too many items, an oversized item dropped); and the remote WebSocket: heartbeat and its
//! ack, presence per owner, the last event per session, a bad token closed with 4401.

mod common;

use common::*;
use futures::SinkExt;
use reqwest::Method;
use tokio_tungstenite::tungstenite::Message;

const SESSION: &str = "ses_0123456789abcdefghijklmnop";

async fn stranger(env: &Env) -> String {
    let system = Initiator {
        user: Uuid::nil(),
        request_id: None,
    };
    let (_, key, _) = env
        .identity
        .create_user("stranger@example.com", "stranger", false, &system)
        .await
        .unwrap();
    key
}

fn item(kind: &str, data: Value) -> Value {
    json!({"type": kind, "data": data})
}

/// Ingests `items` into [`SESSION`] as the env's user.
async fn ingest(env: &Env, items: Vec<Value>) -> (u16, Value) {
    ingest_as(env, &env.key, SESSION, items).await
}

async fn ingest_as(env: &Env, key: &str, id: &str, items: Vec<Value>) -> (u16, Value) {
    env.request_as(
        key,
        Method::POST,
        &format!("/api/session/{id}/ingest?v=2"),
        Some(json!({ "data": items })),
    )
    .await
}

async fn raw_post(env: &Env, path: &str, body: Vec<u8>) -> (u16, Value) {
    let res = env
        .http
        .post(format!("{}{path}", env.base))
        .bearer_auth(&env.key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn ingest_routes(pg: bool) {
    let env = env(pg).await;
    let other = stranger(&env).await;

    // Create, twice: the same answer.
    for _ in 0..2 {
        let (status, body) = env
            .request(
                Method::POST,
                "/api/session",
                Some(json!({"sessionId": SESSION})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body,
            json!({"id": SESSION, "ingestPath": format!("/api/session/{SESSION}/ingest")})
        );
    }

    // Two flushes as `kilo run` sends them; the second replaces the session, a part and
    // the status.
    let (status, body) = ingest(
        &env,
        vec![
            item(
                "kilo_meta",
                json!({"platform": "cli", "gitUrl": "https://example.com/r.git",
                    "gitBranch": "main"}),
            ),
            item("session", json!({"id": SESSION, "title": "First title"})),
            item("session_status", json!({"status": "busy"})),
            item("message", json!({"id": "msg_001", "role": "user"})),
            item(
                "part",
                json!({"id": "prt_001", "messageID": "msg_001", "type": "text", "text": "v1"}),
            ),
            item("session_open", json!({})),
        ],
    )
    .await;
    assert_eq!((status, &body["success"]), (200, &json!(true)), "{body}");
    let (status, body) = ingest(
        &env,
        vec![
            item("message", json!({"id": "msg_002", "role": "assistant"})),
            item(
                "part",
                json!({"id": "prt_003", "messageID": "msg_002", "type": "text", "text": "hi"}),
            ),
            item(
                "part",
                json!({"id": "prt_002", "messageID": "msg_002", "type": "step-start"}),
            ),
            item(
                "part",
                json!({"id": "prt_001", "messageID": "msg_001", "type": "text", "text": "v2"}),
            ),
            item("session", json!({"id": SESSION, "title": "Say hi"})),
            item("session_status", json!({"status": "idle"})),
            item("session_close", json!({"reason": "completed"})),
        ],
    )
    .await;
    assert_eq!((status, body["stored"].as_u64()), (200, Some(7)), "{body}");

    let (status, export) = env
        .request(Method::GET, &format!("/api/session/{SESSION}/export"), None)
        .await;
    assert_eq!(status, 200, "{export}");
    assert_eq!(export["info"], json!({"id": SESSION, "title": "Say hi"}));
    let messages = export["messages"].as_array().unwrap();
    let shape: Vec<(String, Vec<String>)> = messages
        .iter()
        .map(|m| {
            (
                m["info"]["id"].as_str().unwrap().to_owned(),
                m["parts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["id"].as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("msg_001".to_owned(), vec!["prt_001".to_owned()]),
            (
                "msg_002".to_owned(),
                vec!["prt_002".to_owned(), "prt_003".to_owned()]
            ),
        ]
    );
    assert_eq!(messages[0]["parts"][0]["text"], "v2", "the later part wins");

    let (_, list) = env.request(Method::GET, "/api/session", None).await;
    let row = &list["sessions"][0];
    assert_eq!(
        (
            &row["sessionId"],
            &row["title"],
            &row["status"],
            &row["closeReason"],
            &row["platform"],
            &row["gitBranch"]
        ),
        (
            &json!(SESSION),
            &json!("Say hi"),
            &json!("idle"),
            &json!("completed"),
            &json!("cli"),
            &json!("main")
        ),
        "{list}"
    );
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(
        row["updatedAt"],
        env.clock.now_ms(),
        "times are the substrate's clock"
    );

    // Title.
    let (status, _) = env
        .request(
            Method::POST,
            &format!("/api/session/{SESSION}/title"),
            Some(json!({"title": "Renamed", "generated": true})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, got) = env
        .request(Method::GET, &format!("/api/session/{SESSION}"), None)
        .await;
    assert_eq!(
        (&got["title"], &got["titleGenerated"]),
        (&json!("Renamed"), &json!(true))
    );

    // Errors.
    let (status, body) = raw_post(
        &env,
        &format!("/api/session/{SESSION}/ingest?v=2"),
        b"{not json".to_vec(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, body) = ingest_as(&env, &env.key, "ses_unknown", vec![]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("session_not_found"))
    );
    let (status, body) = ingest(&env, vec![item("part", json!({"id": "prt_9"}))]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let many = (0..=kilocloud_ingest::MAX_ITEMS_PER_INGEST)
        .map(|i| item("message", json!({"id": format!("msg_{i}")})))
        .collect();
    let (status, body) = ingest(&env, many).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("too_many_items"))
    );
    let huge = json!({"data": [item("part", json!({"id": "prt_x", "messageID": "msg_001",
        "text": "x".repeat(kilocloud_ingest::MAX_INGEST_BODY_BYTES)}))]});
    let (status, body) = raw_post(
        &env,
        &format!("/api/session/{SESSION}/ingest?v=2"),
        huge.to_string().into_bytes(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    let big = "y".repeat(kilocloud_ingest::MAX_ITEM_BYTES + 1);
    let (status, body) = ingest(
        &env,
        vec![
            item(
                "part",
                json!({"id": "prt_big", "messageID": "msg_001", "text": big}),
            ),
            item("session_status", json!({"status": "busy"})),
        ],
    )
    .await;
    assert_eq!(
        (status, &body["dropped"]),
        (200, &json!(["part:prt_big"])),
        "{body}"
    );
    let (status, body) = env
        .request(
            Method::POST,
            "/api/session",
            Some(json!({"sessionId": "../escape"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );

    // Another owner sees nothing of it.
    for (method, path, body) in [
        (Method::POST, "ingest?v=2", Some(json!({"data": []}))),
        (Method::GET, "export", None),
        (Method::POST, "share", None),
        (Method::POST, "unshare", None),
        (Method::POST, "title", Some(json!({"title": "x"}))),
        (Method::GET, "", None),
        (Method::DELETE, "", None),
    ] {
        let path = format!("/api/session/{SESSION}/{path}");
        let path = path.trim_end_matches('/');
        let (status, got) = env.request_as(&other, method.clone(), path, body).await;
        assert_eq!(
            (status, got["error"]["code"].as_str()),
            (404, Some("session_not_found")),
            "{method} {path}: {got}"
        );
    }
    let (_, theirs) = env
        .request_as(&other, Method::GET, "/api/session", None)
        .await;
    assert_eq!(theirs["sessions"], json!([]));

    // Share: the same token twice; the public fetch needs no credentials.
    let (status, shared) = share(&env).await;
    assert_eq!(status, 200, "{shared}");
    let token = shared["share_token"].as_str().unwrap().to_owned();
    assert_eq!(share(&env).await.1["share_token"], token.as_str());
    let public = |token: String| {
        let url = format!("{}/session/{token}", env.base);
        let http = env.http.clone();
        async move {
            let res = http.get(url).send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = public(token.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"], export["messages"]);
    assert_eq!(body["info"]["id"], SESSION);
    let (status, body) = public(Uuid::new_v4().to_string()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("share_not_found"))
    );
    let (status, _) = env
        .request(
            Method::POST,
            &format!("/api/session/{SESSION}/unshare"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(public(token.clone()).await.0, 404, "unshared");
    let again = share(&env).await.1["share_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(again, token, "a new share gets a new token");

    // Delete: gone everywhere, the share included.
    let (status, _) = env
        .request(Method::DELETE, &format!("/api/session/{SESSION}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(public(again).await.0, 404);
    let (status, _) = env
        .request(Method::GET, &format!("/api/session/{SESSION}/export"), None)
        .await;
    assert_eq!(status, 404);
    let (_, list) = env.request(Method::GET, "/api/session", None).await;
    assert_eq!(list["sessions"], json!([]));
}

async fn share(env: &Env) -> (u16, Value) {
    env.request(Method::POST, &format!("/api/session/{SESSION}/share"), None)
        .await
}

async fn connections(env: &Env, key: &str) -> Vec<Value> {
    let (status, body) = env
        .request_as(key, Method::GET, "/api/user/cli/connections", None)
        .await;
    assert_eq!(status, 200, "{body}");
    body["connections"].as_array().unwrap().clone()
}

/// Polls the owner's connections until `done` holds (a deadline guards against hangs).
async fn until_connections(env: &Env, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let list = connections(env, &env.key).await;
            if done(&list) {
                return list;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the connections reach the expected state (a guard against hangs)")
}

async fn remote_presence(pg: bool) {
    let env = env(pg).await;
    let other = stranger(&env).await;
    let ws_base = env.base.replace("http://", "ws://");
    let connection = Uuid::new_v4().to_string();

    // A bad token: upgraded, then closed with 4401.
    let (mut bad, _) = tokio_tungstenite::connect_async(format!(
        "{ws_base}/api/user/cli?token=kc_wrong&connectionId={connection}"
    ))
    .await
    .unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(30), bad.next())
        .await
        .expect("the server closes the socket (a guard against hangs)");
    match frame {
        Some(Ok(Message::Close(Some(close)))) => assert_eq!(u16::from(close.code), 4401),
        other => panic!("expected a 4401 close, got {other:?}"),
    }

    let (mut socket, response) = tokio_tungstenite::connect_async(format!(
        "{ws_base}/api/user/cli?token={}&connectionId={connection}",
        env.key
    ))
    .await
    .unwrap();
    assert!(
        response.headers().get("sec-websocket-extensions").is_none(),
        "no extension is negotiated"
    );
    let heartbeat = json!({"type": "heartbeat", "protocolVersion": "7.7.7",
        "capabilities": {"attachments": true, "sessionClone": true},
        "sessions": [{"id": SESSION, "status": "idle", "title": "t"}],
        "instance": {"name": "host", "projectName": "p", "version": "7.7.7", "kind": "remote"}});
    socket
        .send(Message::Text(heartbeat.to_string().into()))
        .await
        .unwrap();
    let ack = tokio::time::timeout(Duration::from_secs(30), socket.next())
        .await
        .expect("an ack (a guard against hangs)")
        .unwrap()
        .unwrap();
    let ack: Value = serde_json::from_str(ack.to_text().unwrap()).unwrap();
    assert_eq!(ack, json!({"type": "heartbeat_ack"}));
    let list = connections(&env, &env.key).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["connectionId"], connection.as_str());
    assert_eq!(list[0]["heartbeats"], 1);
    assert_eq!(list[0]["sessions"][0]["id"], SESSION);
    assert_eq!(list[0]["instance"]["name"], "host");
    assert!(connections(&env, &other).await.is_empty(), "per owner");

    let event = json!({"type": "event", "sessionId": SESSION, "event": "session.status",
        "data": {"status": "busy"}});
    socket
        .send(Message::Text(event.to_string().into()))
        .await
        .unwrap();
    let list = until_connections(&env, |l| {
        l.first()
            .is_some_and(|c| !c["lastEvents"].as_array().unwrap().is_empty())
    })
    .await;
    assert_eq!(
        list[0]["lastEvents"][0],
        json!({"sessionId": SESSION, "event": "session.status", "at": list[0]["lastEvents"][0]["at"],
            "data": {"status": "busy"}})
    );

    socket.close(None).await.unwrap();
    until_connections(&env, |l| l.is_empty()).await;
}

on_both_backends!(ingest_routes, remote_presence);
