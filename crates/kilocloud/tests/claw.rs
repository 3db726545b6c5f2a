//! KiloClaw's "done when" on the real binary, on SQLite and PostgreSQL: `kilocloud claw create`
//! starts the built-in runtime in a bubblewrap sandbox on the local provider; a browser's
//! path (the access code from `claw open`, the form, the cookie, then `/i/<id>/` over HTTP and
//! WebSocket) reaches it; a chat message goes through the model gateway to the fake upstream;
//! gateway-token errors are rewritten; the ownership matrix holds (owner, org member, another
//! user, no credentials, destroyed); destroy leaves no machine, volume or process behind.

mod common;

use common::{Node, Store, cli_as as cli};
use futures::{SinkExt as _, StreamExt as _};
use kilocloud_test_support::fake_openai::{FakeOpenAi, Reply};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// A JWT for the user of API key `key` (the proxy takes JWTs, as the reference's does).
async fn jwt(node: &Node, key: &str) -> String {
    let r: Value = node
        .http
        .post(node.url("/api/tokens/jwt"))
        .bearer_auth(key)
        .json(&json!({"expiresInSeconds": 3600}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["token"].as_str().expect("token").to_owned()
}

/// A new user; returns (id, API key).
async fn user(node: &Node, admin_key: &str, email: &str) -> (String, String) {
    let r: Value = node
        .http
        .post(node.url("/api/users"))
        .bearer_auth(admin_key)
        .json(&json!({"email": email}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        r["user"]["id"].as_str().unwrap().to_owned(),
        r["apiKey"].as_str().unwrap().to_owned(),
    )
}

/// `GET path` with `auth` (a bearer JWT, or a `Cookie` header value when it starts with
/// `kiloclaw-auth=`); returns (status, body).
async fn get(node: &Node, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut req = node.http.get(node.url(path));
    match auth {
        Some(c) if c.starts_with("kiloclaw-auth=") => req = req.header("cookie", c),
        Some(t) => req = req.bearer_auth(t),
        None => {}
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(node: &Node, path: &str, cookie: &str) -> Ws {
    let url = node.url(path).replacen("http://", "ws://", 1);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("WebSocket through the proxy");
    ws
}

/// The next text frame as JSON; fails after 30 s without one (a guard against hangs, not a
/// timing assertion).
async fn next_json(ws: &mut Ws) -> Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no frame within 30 s");
        match frame.expect("a frame").expect("no error") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// Creates an instance through the CLI and returns its JSON.
async fn create(store: &Store, creds: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "claw",
        "create",
        "--model",
        "kilocode/vendor/paid",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = cli(store, creds, &args).await;
    assert!(ok, "claw create failed: {err}");
    serde_json::from_str(&out).unwrap()
}

/// Redeems the access code of `claw open` through the gateway form; returns the cookie
/// header value and the gateway token from the redirect page.
async fn open(node: &Node, store: &Store, creds: &str, id: &str) -> (String, String) {
    let (ok, out, err) = cli(store, creds, &["claw", "open", id]).await;
    assert!(ok, "{err}");
    let url = out.lines().next().unwrap().trim().to_owned();
    let code = out
        .lines()
        .find_map(|l| l.strip_prefix("access code: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    assert!(url.contains(&format!("instance={id}")), "{url}");
    assert_eq!(code.len(), 11, "XXXXX-XXXXX: {code}");
    // GET shows the form and never redeems.
    let form = node.http.get(&url).send().await.unwrap();
    assert_eq!(form.status(), 200);
    assert_eq!(
        form.headers()["cache-control"],
        "no-store",
        "codes are not cached"
    );
    assert!(form.text().await.unwrap().contains("<form"));
    let user = url
        .split("user=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let redeem = |code: String| {
        node.http
            .post(node.url("/kilo-access-gateway"))
            .header("content-type", "application/x-www-form-urlencoded")
            // Uuids and codes need no percent-encoding.
            .body(format!("instance={id}&user={user}&code={code}"))
            .send()
    };
    let res = redeem(code.to_lowercase()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["cache-control"],
        "no-store",
        "the page carries the gateway token"
    );
    let cookie = res
        .headers()
        .get("set-cookie")
        .expect("the access cookie")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("Max-Age=86400"),
        "{cookie}"
    );
    let page = res.text().await.unwrap();
    let token = page
        .split("#token=")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect::<String>();
    assert_eq!(token.len(), 64);
    // Single use.
    let again = redeem(code).await.unwrap();
    assert_eq!(again.status(), 401);
    (cookie.split(';').next().unwrap().to_owned(), token)
}

async fn done_when(store: Store) {
    let upstream = FakeOpenAi::start().await;
    let config = common::agent_config(&store, &upstream.base_url, "");
    let config_arg = config.to_str().unwrap().to_owned();
    let node = Node::start_with(&store, "node.log", &["--config", &config_arg]);
    let (admin_key, creds) = common::admin_login(&store, &node, "node.log").await;
    let owner_jwt = jwt(&node, &admin_key).await;

    let created = create(
        &store,
        &creds,
        &["--name", "mine", "--secret", "API_TOKEN=s3cr3t"],
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["status"], "running", "{created}");
    assert_eq!(created["provider"], "local");
    assert!(created["sandboxId"].as_str().unwrap().starts_with("ki_"));
    assert!(
        !created.to_string().contains("s3cr3t"),
        "secret values are never shown"
    );

    // HTTP through the proxy, with the owner's JWT.
    let (status, body) = get(&node, &format!("/i/{id}/health"), Some(&owner_jwt)).await;
    assert_eq!(
        (status, body.contains("kiloclaw-runtime")),
        (200, true),
        "{body}"
    );
    let (status, page) = get(&node, &format!("/i/{id}/"), Some(&owner_jwt)).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("<html") || page.contains("<!doctype"),
        "{page}"
    );

    // The browser's way in: access code, cookie, gateway token in the fragment.
    let (cookie, token) = open(&node, &store, &creds, &id).await;
    let (status, _) = get(&node, &format!("/i/{id}/health"), Some(&cookie)).await;
    assert_eq!(status, 200);

    // WebSocket both ways: echo, then a chat through the model gateway.
    let mut socket = ws(&node, &format!("/i/{id}/ws?token={token}"), &cookie).await;
    socket
        .send(Message::text(
            json!({"type": "ping", "data": {"n": 7}}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "pong", "data": {"n": 7}})
    );
    upstream.push(Reply::text("hello from the gateway", 5, 4));
    socket
        .send(Message::text(
            json!({"type": "chat", "text": "hi"}).to_string(),
        ))
        .await
        .unwrap();
    let reply = next_json(&mut socket).await;
    assert_eq!(reply["type"], "reply", "{reply}");
    assert_eq!(reply["text"], "hello from the gateway");
    socket.close(None).await.unwrap();

    // A wrong gateway token: the runtime's error is rewritten by the proxy.
    let mut bad = ws(&node, &format!("/i/{id}/ws?token=0000"), &cookie).await;
    let err = next_json(&mut bad).await;
    assert_eq!(
        err["error"]["message"], "Gateway authentication failed. Please reconnect.",
        "{err}"
    );

    // Ownership: another user and anonymous callers get nothing.
    let (other_id, other_key) = user(&node, &admin_key, "other@example.com").await;
    let other_jwt = jwt(&node, &other_key).await;
    assert_eq!(
        get(&node, &format!("/i/{id}/health"), Some(&other_jwt))
            .await
            .0,
        404
    );
    assert_eq!(get(&node, &format!("/i/{id}/health"), None).await.0, 401);
    assert_eq!(
        get(
            &node,
            &format!("/i/{}/health", uuid::Uuid::new_v4()),
            Some(&owner_jwt)
        )
        .await
        .0,
        404
    );
    // An organization's instance: its members reach it.
    let org: Value = node
        .http
        .post(node.url("/api/orgs"))
        .bearer_auth(&admin_key)
        .json(&json!({"name": "Claws"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let org_id = org["id"].as_str().unwrap().to_owned();
    let added = node
        .http
        .put(node.url(&format!("/api/orgs/{org_id}/members/{other_id}")))
        .bearer_auth(&admin_key)
        .json(&json!({"role": "member"}))
        .send()
        .await
        .unwrap();
    assert!(
        added.status().is_success(),
        "{}",
        added.text().await.unwrap()
    );
    let team = create(
        &store,
        &creds,
        &["--name", "team", "--org", &org_id, "--no-start"],
    )
    .await;
    let team_id = team["id"].as_str().unwrap().to_owned();
    assert_eq!(team["status"], "provisioned");
    let (ok, out, err) = cli(
        &store,
        &creds,
        &["claw", "start", &team_id, "--org", &org_id],
    )
    .await;
    assert!(ok && out.contains("running"), "{out}\n{err}");
    assert_eq!(
        get(&node, &format!("/i/{team_id}/health"), Some(&other_jwt))
            .await
            .0,
        200
    );
    let (ok, out, _) = cli(&store, &creds, &["claw", "list"]).await;
    assert!(
        ok && out.contains(&id) && !out.contains(&team_id),
        "personal list: {out}"
    );

    // Stop and start keep the volume: the conversation survives.
    let (ok, out, err) = cli(&store, &creds, &["claw", "stop", &id]).await;
    assert!(ok && out.contains("stopped"), "{out}\n{err}");
    assert_eq!(
        get(&node, &format!("/i/{id}/health"), Some(&owner_jwt))
            .await
            .0,
        503
    );
    let (ok, _, err) = cli(&store, &creds, &["claw", "start", &id]).await;
    assert!(ok, "{err}");
    let (status, history) = get(&node, &format!("/i/{id}/api/history"), Some(&owner_jwt)).await;
    assert_eq!(status, 401, "the runtime wants its own token: {history}");

    // Destroy leaves nothing behind.
    for (instance, org) in [(&id, None), (&team_id, Some(org_id.as_str()))] {
        let mut args = vec!["claw", "destroy", instance.as_str()];
        if let Some(org) = org {
            args.extend(["--org", org]);
        }
        let (ok, out, err) = cli(&store, &creds, &args).await;
        assert!(
            ok && out.contains("machine and volume deleted"),
            "{out}\n{err}"
        );
    }
    assert_eq!(
        get(&node, &format!("/i/{id}/health"), Some(&owner_jwt))
            .await
            .0,
        404
    );
    assert_eq!(
        get(&node, &format!("/i/{team_id}/health"), Some(&other_jwt))
            .await
            .0,
        404
    );
    let state: Value =
        serde_json::from_slice(&std::fs::read(store.dir().join("claw/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["machines"], json!({}), "{state}");
    assert_eq!(state["volumes"], json!({}), "{state}");
    let volumes = std::fs::read_dir(store.dir().join("claw/volumes"))
        .unwrap()
        .count();
    assert_eq!(volumes, 0, "volume directories are removed");
    let (ok, out, _) = cli(&store, &creds, &["claw", "list", "--json"]).await;
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn done_when_sqlite() {
    done_when(Store::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn done_when_postgres() {
    done_when(Store::postgres().await).await;
}
