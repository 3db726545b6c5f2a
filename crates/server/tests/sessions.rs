//! Cloud Agent sessions end to end, in process on SQLite and PostgreSQL: a real git server
//! (`git http-backend`), real bubblewrap sandboxes, the real gateway in front of the fake
//! OpenAI upstream scripted to drive the built-in agent, a real WebSocket stream, and a
//! callback receiver. Time-based rules (reaper, callback backoff) run on a manual clock with
//! alarms and queue deliveries driven by the test.

mod common;

use common::*;
use kilocloud_agent::session::{ExecStatus, Execution, Mode, NewEvent, SessionActor, SessionCall};

/// Prepare → initiate → the built-in agent reads, edits, runs a command and finishes through
/// the gateway → events → commit and push to `session/<id>` → callback with its headers; the
/// stream replays after an event id; the history exports; secrets never show.
async fn main_path(postgres: bool) {
    let env = env(postgres).await;
    for reply in [
        tool("read_file", json!({"path": "hello.txt"})),
        tool(
            "edit_file",
            json!({"path": "hello.txt", "old": "world", "new": "kilo"}),
        ),
        tool(
            "run_command",
            json!({"command": "cat hello.txt && echo \"$GREETING_STYLE $API_SECRET\" > ran.txt && cat /etc/shadow"}),
        ),
        tool("finish", json!({"summary": "Changed the greeting"})),
    ] {
        env.upstream.push(reply);
    }
    let session = env.prepare(json!({})).await;
    let (status, started) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/initiate"),
            None,
        )
        .await;
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["status"], "started");
    assert_eq!(
        started["streamUrl"],
        format!("/api/sessions/{session}/stream")
    );
    let execution = started["executionId"].as_str().unwrap().to_owned();
    let view = env.until_terminal(&session, &execution).await;
    let exec = &view["executions"][0];
    assert_eq!(exec["status"], "completed", "{view}");
    let branch = format!("session/{session}");
    assert_eq!(view["lastBranch"], branch.as_str());
    assert_eq!(view["activeExecutionId"], Value::Null);
    // Secrets only as counts.
    assert_eq!(view["secretCount"], 1);
    assert_eq!(view["hasGitToken"], true);
    let shown = view.to_string();
    assert!(
        !shown.contains("s3cr3t-value")
            && !shown.contains(GIT_TOKEN)
            && !shown.contains("callback-secret")
    );

    // The events, in order.
    let events = env.events(&session, 0).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["streamEventType"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"started"));
    assert_eq!(kinds.last(), Some(&"complete"));
    let ids: Vec<u64> = events
        .iter()
        .map(|e| e["eventId"].as_u64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let tools: Vec<&str> = events
        .iter()
        .filter(|e| e["streamEventType"] == "agent" && e["data"]["kind"] == "tool_call")
        .map(|e| e["data"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(tools, ["read_file", "edit_file", "run_command", "finish"]);
    let output = events
        .iter()
        .find(|e| e["streamEventType"] == "output")
        .unwrap();
    let text = output["data"]["output"].as_str().unwrap();
    assert!(text.contains("hello kilo"), "{text}");
    // Reading the host's /etc/shadow from inside the session fails.
    assert!(!text.contains("root:"), "{text}");
    let complete = events.last().unwrap();
    assert_eq!(complete["data"]["currentBranch"], branch.as_str());
    assert_eq!(complete["data"]["exitCode"], 0);
    assert_eq!(complete["executionId"], execution.as_str());

    // Committed and pushed to session/<id>, with the configured author, the token only ever
    // in a header.
    assert_eq!(
        env.git.file_at("demo", &branch, "hello.txt").unwrap(),
        "hello kilo\n"
    );
    assert_eq!(
        env.git.file_at("demo", &branch, "ran.txt").unwrap(),
        "short s3cr3t-value\n"
    );
    assert_eq!(
        env.git.file_at("demo", "main", "hello.txt").unwrap(),
        "hello world\n"
    );
    let log = env.git.last_subject("demo", &branch).unwrap();
    assert!(
        log.contains("Change the greeting") && log.contains("Kilo Code Cloud"),
        "{log}"
    );
    assert!(env.git.seen_uris().iter().all(|u| !u.contains(GIT_TOKEN)));
    let authed = env.git.seen_auth().iter().filter(|a| a.is_some()).count();
    assert!(authed >= 2, "clone and push both authenticated");

    // Model calls went through the gateway, metered to the session's owner.
    let requests = env.upstream.requests();
    assert_eq!(requests.len(), 4);
    assert_eq!(requests[0].body["model"], "upstream-paid");
    let usage = env.usage().await;
    assert_eq!(usage.len(), 4);

    // The callback, with its headers.
    assert_eq!(env.deliver_callbacks().await, 1);
    let received = env.receiver.received();
    assert_eq!(received.len(), 1);
    let (payload, secret) = &received[0];
    assert_eq!(secret.as_deref(), Some("callback-secret"));
    assert_eq!(
        payload,
        &json!({"sessionId": session, "executionId": execution, "status": "completed",
            "lastSeenBranch": branch, "summary": "Changed the greeting"})
    );

    // Replay over the WebSocket after an event id, as after a reconnect.
    let from = ids[2];
    let ticket = env.ticket(&session).await;
    let ws_url = format!(
        "{}/api/sessions/{session}/stream?ticket={ticket}&fromId={from}",
        env.base.replace("http://", "ws://")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    let mut replayed = Vec::new();
    while replayed.len() < ids.len() - 3 {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(30), ws.next())
            .await
            .expect("replayed frames arrive (a guard against hangs)")
            .unwrap()
            .unwrap();
        let frame: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        replayed.push(frame["eventId"].as_u64().unwrap());
    }
    assert_eq!(replayed, ids[3..]);
    ws.close(None).await.unwrap();
    // A ticket opens one stream only.
    let again = tokio_tungstenite::connect_async(&ws_url).await;
    assert!(again.is_err());
    // Filters: only `complete` events.
    let ticket = env.ticket(&session).await;
    let filtered = format!(
        "{}/api/sessions/{session}/stream?ticket={ticket}&eventTypes=complete",
        env.base.replace("http://", "ws://")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&filtered).await.unwrap();
    let frame: Value =
        serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(frame["streamEventType"], "complete");

    // The history exports, compacted per item: the conversation of the execution.
    let (status, export) = env
        .request(
            reqwest::Method::GET,
            &format!("/api/sessions/{session}/export"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let items = export["items"].as_object().unwrap();
    assert_eq!(items["message/00000000"]["role"], "user");
    assert!(items.keys().filter(|k| k.starts_with("message/")).count() >= 9);
    assert_eq!(export["eventCount"], ids.len() as u64);

    // A follow-up continues the conversation.
    env.upstream
        .push(Reply::text("Nothing else to change.", 10, 5));
    let (status, next) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/messages"),
            Some(json!({"prompt": "Anything else?", "mode": "ask"})),
        )
        .await;
    assert_eq!(status, 202, "{next}");
    let followup = next["executionId"].as_str().unwrap();
    let view = env.until_terminal(&session, followup).await;
    let exec = view["executions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["executionId"] == followup)
        .unwrap();
    assert_eq!(exec["status"], "completed");
    let last = env.upstream.requests().pop().unwrap();
    let messages = last.body["messages"].as_array().unwrap();
    assert_eq!(
        messages[1]["content"],
        "Change the greeting to kilo and record that you ran"
    );
    assert_eq!(messages.last().unwrap()["content"], "Anything else?");
    // Read-only mode offers no writing tools.
    let names: Vec<&str> = last.body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&"run_command") && !names.contains(&"write_file"));

    // Delete removes it.
    let (status, _) = env
        .request(
            reqwest::Method::DELETE,
            &format!("/api/sessions/{session}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, _) = env
        .request(
            reqwest::Method::GET,
            &format!("/api/sessions/{session}"),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (_, list) = env
        .request(reqwest::Method::GET, "/api/sessions", None)
        .await;
    assert_eq!(list, json!([]));
}

/// One active execution: a second start is 409 with its id; an interrupt ends it
/// `interrupted`, and the callback says so.
async fn conflict_and_interrupt(postgres: bool) {
    let env = env(postgres).await;
    env.upstream.push(Reply::Hang);
    let session = env.prepare(json!({})).await;
    let (_, started) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/initiate"),
            None,
        )
        .await;
    let execution = started["executionId"].as_str().unwrap().to_owned();
    let (status, again) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/initiate"),
            None,
        )
        .await;
    assert_eq!(status, 409, "{again}");
    let (status, busy) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/messages"),
            Some(json!({"prompt": "more"})),
        )
        .await;
    assert_eq!(status, 409, "{busy}");
    assert_eq!(busy["error"]["code"], "execution_in_progress");
    assert_eq!(busy["error"]["activeExecutionId"], execution.as_str());
    let (status, stopping) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/interrupt"),
            None,
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(stopping["executionId"], execution.as_str());
    let view = env.until_terminal(&session, &execution).await;
    assert_eq!(view["executions"][0]["status"], "interrupted");
    assert_eq!(view["executions"][0]["error"], "User interrupted");
    let kinds: Vec<String> = env
        .events(&session, 0)
        .await
        .iter()
        .map(|e| e["streamEventType"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds.last().map(String::as_str), Some("interrupted"));
    let (status, _) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/interrupt"),
            None,
        )
        .await;
    assert_eq!(status, 409, "nothing left to interrupt");
    env.deliver_callbacks().await;
    assert_eq!(env.receiver.received()[0].0["status"], "interrupted");
}

/// An interrupt while a tool call runs leaves a history a provider enforcing OpenAI's
/// tool-call pairing accepts: the call gets a synthetic result, and a follow-up continues.
async fn interrupted_tool_call_keeps_pairing(postgres: bool) {
    let env = env(postgres).await;
    env.upstream
        .push(tool("run_command", json!({"command": "sleep 600"})));
    env.upstream
        .push(Reply::text("Picked up after the interrupt.", 10, 5));
    let session = env.prepare(json!({"autoCommit": false})).await;
    let (_, started) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/initiate"),
            None,
        )
        .await;
    let execution = started["executionId"].as_str().unwrap().to_owned();
    // The command is running once its status event is recorded.
    env.until_event(&session, |e| {
        e["streamEventType"] == "status"
            && e["data"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("running: sleep 600"))
    })
    .await;
    let (status, _) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/interrupt"),
            None,
        )
        .await;
    assert_eq!(status, 202);
    let view = env.until_terminal(&session, &execution).await;
    assert_eq!(view["executions"][0]["status"], "interrupted", "{view}");

    let (status, next) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/messages"),
            Some(json!({"prompt": "Carry on"})),
        )
        .await;
    assert_eq!(status, 202, "{next}");
    let followup = next["executionId"].as_str().unwrap();
    let view = env.until_terminal(&session, followup).await;
    let exec = view["executions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["executionId"] == followup)
        .unwrap();
    assert_eq!(exec["status"], "completed", "{view}");
    let last = env.upstream.requests().pop().unwrap();
    let messages = last.body["messages"].as_array().unwrap();
    let result = messages
        .iter()
        .find(|m| m["role"] == "tool")
        .unwrap_or_else(|| panic!("no tool result in {messages:?}"));
    assert_eq!(result["tool_call_id"], "call_1");
    assert!(
        result["content"].as_str().unwrap().contains("interrupted"),
        "{result}"
    );
    assert_eq!(messages.last().unwrap()["content"], "Carry on");
}

/// Concurrent executions are bounded per owner (429 `too_many_executions`) and per node
/// (503 `node_at_capacity`); a slot is free again once its execution ends.
async fn execution_bounds(postgres: bool) {
    let env = env_with(postgres, |config| {
        config.max_executions_per_owner = 1;
        config.max_executions_per_node = 2;
    })
    .await;
    let system = Initiator {
        user: Uuid::nil(),
        request_id: None,
    };
    let mut others = Vec::new();
    for name in ["second", "third"] {
        let (user, key, _) = env
            .identity
            .create_user(&format!("{name}@example.com"), name, false, &system)
            .await
            .unwrap();
        env.gateway
            .ledger
            .grant(Owner::User(user.id), 10_000_000, "test", &system)
            .await
            .unwrap();
        others.push(key);
    }
    let initiate = |key: String, session: String| {
        let env = &env;
        async move {
            env.request_as(
                &key,
                reqwest::Method::POST,
                &format!("/api/sessions/{session}/initiate"),
                None,
            )
            .await
        }
    };
    env.upstream.push(Reply::Hang);
    env.upstream.push(Reply::Hang);
    let first = env.prepare(json!({"autoCommit": false})).await;
    let second = env.prepare(json!({"autoCommit": false})).await;
    let (status, started) = initiate(env.key.clone(), first.clone()).await;
    assert_eq!(status, 202, "{started}");
    let running = started["executionId"].as_str().unwrap().to_owned();
    // The owner's bound.
    let (status, busy) = initiate(env.key.clone(), second.clone()).await;
    assert_eq!(status, 429, "{busy}");
    assert_eq!(busy["error"]["code"], "too_many_executions");
    assert!(
        busy["error"]["message"]
            .as_str()
            .unwrap()
            .contains("agent.max_executions_per_owner"),
        "{busy}"
    );
    // Another owner still starts: the node now runs two.
    let other = env
        .prepare_as(&others[0], json!({"autoCommit": false}))
        .await;
    let (status, started) = initiate(others[0].clone(), other.clone()).await;
    assert_eq!(status, 202, "{started}");
    let other_running = started["executionId"].as_str().unwrap().to_owned();
    // The node's bound.
    let third = env
        .prepare_as(&others[1], json!({"autoCommit": false}))
        .await;
    let (status, full) = initiate(others[1].clone(), third.clone()).await;
    assert_eq!(status, 503, "{full}");
    assert_eq!(full["error"]["code"], "node_at_capacity");
    assert_eq!(full["error"]["retryable"], true);
    // An ended execution frees both of its slots.
    let (status, _) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{first}/interrupt"),
            None,
        )
        .await;
    assert_eq!(status, 202);
    env.until_terminal(&first, &running).await;
    env.upstream
        .push(tool("finish", json!({"summary": "done"})));
    let (status, started) = initiate(env.key.clone(), second.clone()).await;
    assert_eq!(status, 202, "{started}");
    let view = env
        .until_terminal(&second, started["executionId"].as_str().unwrap())
        .await;
    assert_eq!(view["executions"][0]["status"], "completed", "{view}");
    let (status, _) = env
        .request_as(
            &others[0],
            reqwest::Method::POST,
            &format!("/api/sessions/{other}/interrupt"),
            None,
        )
        .await;
    assert_eq!(status, 202);
    let mut signal = env.agents.event_signal();
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            signal.borrow_and_update();
            let (_, view) = env
                .request_as(
                    &others[0],
                    reqwest::Method::GET,
                    &format!("/api/sessions/{other}"),
                    None,
                )
                .await;
            if view["executions"][0]["status"] == "interrupted" {
                return;
            }
            assert_eq!(view["executions"][0]["executionId"], other_running.as_str());
            signal.changed().await.unwrap();
        }
    })
    .await
    .expect("the other owner's execution ended");
    env.upstream
        .push(tool("finish", json!({"summary": "done"})));
    let (status, started) = initiate(others[1].clone(), third).await;
    assert_eq!(status, 202, "{started}");
}

/// Mistakes of the caller are refused at create as such: an unknown model is 404 before
/// anything is cloned, a missing repository or branch is 422, not a retryable 503.
async fn unknown_model_and_missing_refs(postgres: bool) {
    let env = env(postgres).await;
    let session = env.prepare(json!({"autoCommit": false})).await;
    let fetches = env.git.seen_uris().len();
    let repo = format!("{}/demo.git", env.git.base_url);
    let (status, err) = env
        .request(
            reqwest::Method::POST,
            "/api/sessions",
            Some(json!({"gitUrl": repo, "gitToken": GIT_TOKEN, "prompt": "p", "model": "vendor/nope"})),
        )
        .await;
    assert_eq!(status, 404, "{err}");
    assert_eq!(err["error"]["code"], "model_not_found");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("vendor/nope")
    );
    assert_eq!(env.git.seen_uris().len(), fetches, "nothing was cloned");
    // A follow-up naming an unknown model is refused before it starts.
    let (status, err) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/messages"),
            Some(json!({"prompt": "p", "model": "vendor/nope"})),
        )
        .await;
    assert_eq!(status, 404, "{err}");
    assert_eq!(err["error"]["code"], "model_not_found");

    let missing = format!("{}/missing.git", env.git.base_url);
    for (body, code) in [
        (
            json!({"gitUrl": missing, "gitToken": GIT_TOKEN, "prompt": "p"}),
            "repository_not_found",
        ),
        (
            json!({"gitUrl": repo, "gitToken": GIT_TOKEN, "prompt": "p", "upstreamBranch": "no-such-branch"}),
            "branch_not_found",
        ),
    ] {
        let (status, err) = env
            .request(reqwest::Method::POST, "/api/sessions", Some(body))
            .await;
        assert_eq!(status, 422, "{code}: {err}");
        assert_eq!(err["error"]["code"], code, "{err}");
        assert_eq!(err["error"].get("retryable"), None, "{err}");
    }
    let (_, list) = env
        .request(reqwest::Method::GET, "/api/sessions", None)
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

/// A secret a command echoes is masked in the events, the exported history and what the
/// model is sent next.
async fn secrets_are_masked(postgres: bool) {
    let env = env(postgres).await;
    env.upstream.push(tool(
        "run_command",
        json!({"command": "echo \"key=$API_SECRET\"; echo \"$API_SECRET\" >&2"}),
    ));
    env.upstream.push(tool(
        "finish",
        json!({"summary": "The key is s3cr3t-value"}),
    ));
    let session = env.prepare(json!({"autoCommit": false})).await;
    let (_, started) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/initiate"),
            None,
        )
        .await;
    let execution = started["executionId"].as_str().unwrap().to_owned();
    let view = env.until_terminal(&session, &execution).await;
    assert_eq!(view["executions"][0]["status"], "completed", "{view}");
    assert_eq!(view["executions"][0]["summary"], "The key is ********");
    let events = Value::Array(env.events(&session, 0).await).to_string();
    assert!(events.contains("key=********"), "{events}");
    let (status, export) = env
        .request(
            reqwest::Method::GET,
            &format!("/api/sessions/{session}/export"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let export = export.to_string();
    assert!(export.contains("key=********"), "{export}");
    let requests = env.upstream.requests();
    assert_eq!(requests.len(), 2);
    let context = requests[1].body["messages"].to_string();
    assert!(context.contains("key=********"), "{context}");
    for (what, text) in [
        ("events", &events),
        ("export", &export),
        ("model context", &context),
    ] {
        assert!(!text.contains("s3cr3t-value"), "{what}: {text}");
    }
    env.deliver_callbacks().await;
    assert_eq!(
        env.receiver.received()[0].0["summary"],
        "The key is ********"
    );
}

/// Bad input gets precise errors; another owner's session is 404; the stream needs a
/// WebSocket and a ticket.
async fn bad_input_and_scoping(postgres: bool) {
    let env = env(postgres).await;
    let repo = env.git.create_repo("bad", &[("a.txt", "a")]);
    let cases = [
        (json!({"gitUrl": repo, "prompt": ""}), "prompt"),
        (
            json!({"gitUrl": repo, "prompt": "x".repeat(100_001)}),
            "prompt",
        ),
        (json!({"gitUrl": "file:///etc", "prompt": "p"}), "scheme"),
        (
            json!({"gitUrl": format!("http://user:pw@{}", repo.trim_start_matches("http://")), "prompt": "p"}),
            "credentials",
        ),
        (json!({"prompt": "p"}), "exactly one"),
        (
            json!({"gitUrl": repo, "githubRepo": "a/b", "prompt": "p"}),
            "exactly one",
        ),
        (
            json!({"gitUrl": repo, "prompt": "p", "envVars": (0..51).map(|i| (format!("V{i}"), json!("x"))).collect::<serde_json::Map<_, _>>()}),
            "envVars",
        ),
        (
            json!({"gitUrl": repo, "prompt": "p", "envVars": {"HOME": "/x"}}),
            "HOME",
        ),
        (
            json!({"gitUrl": repo, "prompt": "p", "setupCommands": vec!["true"; 21]}),
            "setupCommands",
        ),
        (
            json!({"gitUrl": repo, "prompt": "p", "setupCommands": ["x".repeat(501)]}),
            "setup command",
        ),
        (
            json!({"gitUrl": repo, "prompt": "p", "upstreamBranch": "a..b"}),
            "upstreamBranch",
        ),
        (
            json!({"gitUrl": repo, "prompt": "p", "callbackTarget": {"url": "ftp://x"}}),
            "callbackTarget",
        ),
    ];
    for (body, needle) in cases {
        let (status, err) = env
            .request(reqwest::Method::POST, "/api/sessions", Some(body))
            .await;
        assert_eq!(status, 400, "{needle}: {err}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
    // Unknown fields are refused by the JSON extractor (422, the API's convention).
    let (status, err) = env
        .request(
            reqwest::Method::POST,
            "/api/sessions",
            Some(json!({"gitUrl": repo, "prompt": "p", "surprise": 1})),
        )
        .await;
    assert_eq!(status, 422, "{err}");
    assert!(err.to_string().contains("surprise"));
    // A clone failure (wrong token) is a retryable 503 and leaves nothing behind.
    let (status, err) = env
        .request(
            reqwest::Method::POST,
            "/api/sessions",
            Some(json!({"gitUrl": repo, "gitToken": "wrong", "prompt": "p"})),
        )
        .await;
    assert_eq!(status, 503, "{err}");
    assert_eq!(err["error"]["retryable"], true);
    // A failing setup command is 422 with its output.
    let (status, err) = env
        .request(
            reqwest::Method::POST,
            "/api/sessions",
            Some(json!({"gitUrl": repo, "gitToken": GIT_TOKEN, "prompt": "p", "setupCommands": ["echo broken >&2; exit 3"]})),
        )
        .await;
    assert_eq!(status, 422, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("broken"));
    let (_, list) = env
        .request(reqwest::Method::GET, "/api/sessions", None)
        .await;
    assert_eq!(list, json!([]));

    let session = env.prepare(json!({})).await;
    let (status, _) = env
        .request(
            reqwest::Method::GET,
            &format!("/api/sessions/agent_{}", Uuid::new_v4()),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = env
        .request(reqwest::Method::GET, "/api/sessions/not-an-id", None)
        .await;
    assert_eq!(status, 404);
    // Another user sees nothing of it.
    let system = Initiator {
        user: Uuid::nil(),
        request_id: None,
    };
    let (_, other_key, _) = env
        .identity
        .create_user("other@example.com", "other", false, &system)
        .await
        .unwrap();
    for (method, path) in [
        (reqwest::Method::GET, format!("/api/sessions/{session}")),
        (
            reqwest::Method::POST,
            format!("/api/sessions/{session}/initiate"),
        ),
        (
            reqwest::Method::POST,
            format!("/api/sessions/{session}/interrupt"),
        ),
        (
            reqwest::Method::GET,
            format!("/api/sessions/{session}/export"),
        ),
        (
            reqwest::Method::GET,
            format!("/api/sessions/{session}/events"),
        ),
        (reqwest::Method::DELETE, format!("/api/sessions/{session}")),
    ] {
        let (status, _) = env.request_as(&other_key, method, &path, None).await;
        assert_eq!(status, 404, "{path}");
    }
    let (_, list) = env
        .request_as(&other_key, reqwest::Method::GET, "/api/sessions", None)
        .await;
    assert_eq!(list, json!([]));
    // The stream: a plain request is 426; a WebSocket without a valid ticket is refused.
    let (status, _) = env
        .request(
            reqwest::Method::GET,
            &format!("/api/sessions/{session}/stream"),
            None,
        )
        .await;
    assert_eq!(status, 426);
    let ws = format!(
        "{}/api/sessions/{session}/stream?ticket=kt_bogus",
        env.base.replace("http://", "ws://")
    );
    assert!(tokio_tungstenite::connect_async(&ws).await.is_err());
    // A follow-up before initiate is a conflict.
    let (status, _) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/messages"),
            Some(json!({"prompt": "hi"})),
        )
        .await;
    assert_eq!(status, 409);
}

/// Reaper rules on a manual clock: pending for 5 min fails; running without a heartbeat for
/// 10 min fails; both clear the active id and send the callback; idle for 90 days deletes the
/// session and its workspace.
async fn reaper(postgres: bool) {
    let env = env(postgres).await;
    let session = env.prepare(json!({})).await;
    let key = format!("{}:{session}", env.user);
    let exec = |id: &str| Execution {
        execution_id: id.into(),
        status: ExecStatus::Pending,
        followup: false,
        prompt: "p".into(),
        mode: Mode::Code,
        model: MODEL.into(),
        auto_commit: false,
        created_at: env.clock.now_ms(),
        started_at: None,
        completed_at: None,
        last_heartbeat: None,
        error: None,
        exit_code: None,
        summary: None,
    };
    let actors = env.sub.actors();
    let status = |id: &'static str| {
        let sub = env.sub.clone();
        let key = key.clone();
        async move {
            let e: Execution = sub
                .actor_read("agent_session", &key, &format!("exec/{id}"))
                .await
                .unwrap()
                .unwrap();
            (e.status, e.error)
        }
    };
    let active = || {
        let sub = env.sub.clone();
        let key = key.clone();
        async move {
            sub.actor_read::<String>("agent_session", &key, "active")
                .await
                .unwrap()
        }
    };
    // Pending, never started.
    actors
        .call::<SessionActor>(&key, SessionCall::Start(Box::new(exec("exec_a"))))
        .await
        .unwrap()
        .unwrap();
    env.clock.advance(4 * 60_000);
    env.sub.alarms().fire_due().await.unwrap();
    assert_eq!(status("exec_a").await.0, ExecStatus::Pending, "not yet");
    env.clock.advance(60_000);
    env.sub.alarms().fire_due().await.unwrap();
    assert_eq!(
        status("exec_a").await,
        (
            ExecStatus::Failed,
            Some("the sandbox never started the execution".into())
        )
    );
    assert_eq!(active().await, None);
    // Running, then silent.
    let mut second = exec("exec_b");
    second.followup = true;
    actors
        .call::<SessionActor>(&key, SessionCall::Start(Box::new(second)))
        .await
        .unwrap()
        .unwrap();
    let started = SessionCall::Ingest {
        execution_id: "exec_b".into(),
        events: vec![NewEvent::new("started", json!({}))],
        items: Vec::new(),
    };
    actors
        .call::<SessionActor>(&key, started)
        .await
        .unwrap()
        .unwrap();
    env.clock.advance(9 * 60_000);
    env.sub.alarms().fire_due().await.unwrap();
    assert_eq!(
        status("exec_b").await.0,
        ExecStatus::Running,
        "9 minutes is not stale"
    );
    // The reaper runs every 5 minutes: the next run, 14 minutes in, finds it stale.
    env.clock.advance(5 * 60_000);
    env.sub.alarms().fire_due().await.unwrap();
    assert_eq!(
        status("exec_b").await,
        (ExecStatus::Failed, Some("no heartbeat".into()))
    );
    assert_eq!(active().await, None);
    // Both failures reached the callback queue.
    assert_eq!(env.deliver_callbacks().await, 2);
    let statuses: Vec<Value> = env
        .receiver
        .received()
        .iter()
        .map(|(p, _)| p["status"].clone())
        .collect();
    assert_eq!(statuses, [json!("failed"), json!("failed")]);
    // Late events of a failed execution are refused: terminal states are final.
    let late = SessionCall::Ingest {
        execution_id: "exec_b".into(),
        events: vec![NewEvent::new("complete", json!({"exitCode": 0}))],
        items: Vec::new(),
    };
    assert!(
        actors
            .call::<SessionActor>(&key, late)
            .await
            .unwrap()
            .is_err()
    );
    // Idle for 90 days: deleted with its workspace.
    let view = env
        .agents
        .get(
            kilocloud_agent::Caller {
                user: env.user,
                org: None,
                bot: None,
            },
            &session,
        )
        .await
        .unwrap();
    let workspace = env
        ._sandboxes
        .path()
        .join(&view.sandbox_id)
        .join(view.workspace_path.trim_start_matches('/'));
    assert!(workspace.join(".git").exists());
    env.clock.advance(90 * 24 * 3_600_000);
    env.sub.alarms().fire_due().await.unwrap();
    let (status, _) = env
        .request(
            reqwest::Method::GET,
            &format!("/api/sessions/{session}"),
            None,
        )
        .await;
    assert_eq!(status, 404);
    assert!(!workspace.exists());
}

/// Callbacks: 429 and 5xx are retried after 60·2^(n−1) s, at most 5 deliveries, then
/// dead-lettered; a 4xx other than 429 is final.
async fn callback_retries_and_dead_letter(postgres: bool) {
    let env = env(postgres).await;
    env.receiver.statuses.lock().unwrap().extend([500, 429]);
    env.upstream
        .push(tool("finish", json!({"summary": "done"})));
    let session = env.prepare(json!({"autoCommit": false})).await;
    let (_, started) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/initiate"),
            None,
        )
        .await;
    let execution = started["executionId"].as_str().unwrap().to_owned();
    env.until_terminal(&session, &execution).await;
    assert_eq!(env.deliver_callbacks().await, 1, "first attempt: 500");
    env.clock.advance(59_999);
    assert_eq!(env.deliver_callbacks().await, 0, "not before 60 s");
    env.clock.advance(1);
    assert_eq!(env.deliver_callbacks().await, 1, "second attempt: 429");
    env.clock.advance(119_999);
    assert_eq!(env.deliver_callbacks().await, 0, "not before 120 s more");
    env.clock.advance(1);
    assert_eq!(env.deliver_callbacks().await, 1, "third attempt: 200");
    assert_eq!(env.receiver.received().len(), 3);
    assert!(
        env.sub
            .queues()
            .dead_letters(CALLBACK_QUEUE, 0, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Always failing: five deliveries, then the dead-letter queue.
    env.receiver.statuses.lock().unwrap().extend([503; 5]);
    env.upstream
        .push(tool("finish", json!({"summary": "again"})));
    let (_, next) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/messages"),
            Some(json!({"prompt": "again"})),
        )
        .await;
    env.until_terminal(&session, next["executionId"].as_str().unwrap())
        .await;
    for wait in [0, 60_000, 120_000, 240_000, 480_000] {
        env.clock.advance(wait);
        assert_eq!(env.deliver_callbacks().await, 1);
    }
    assert_eq!(env.receiver.received().len(), 8);
    let dead = env
        .sub
        .queues()
        .dead_letters(CALLBACK_QUEUE, 0, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    env.clock.advance(3_600_000);
    assert_eq!(env.deliver_callbacks().await, 0);

    // A plain refusal is final.
    env.receiver.statuses.lock().unwrap().push_back(404);
    env.upstream
        .push(tool("finish", json!({"summary": "third"})));
    let (_, third) = env
        .request(
            reqwest::Method::POST,
            &format!("/api/sessions/{session}/messages"),
            Some(json!({"prompt": "third"})),
        )
        .await;
    env.until_terminal(&session, third["executionId"].as_str().unwrap())
        .await;
    assert_eq!(env.deliver_callbacks().await, 1);
    env.clock.advance(3_600_000);
    assert_eq!(env.deliver_callbacks().await, 0);
    assert_eq!(
        env.sub
            .queues()
            .dead_letters(CALLBACK_QUEUE, 0, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// The external CLI harness: a command line run in the sandbox with `OPENAI_BASE_URL` and
/// `OPENAI_API_KEY` pointing at the gateway, forwarded into the sandbox's otherwise empty
/// network; its JSON output lines become events, its last line the summary.
async fn external_cli_harness(postgres: bool) {
    let script = r#"curl -sS -H "Authorization: Bearer $OPENAI_API_KEY" -H 'content-type: application/json' -d "{\"model\":\"$KILO_MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}" "$OPENAI_BASE_URL/chat/completions"; echo; printf '%s\n' "$1" > prompt.txt; echo "wrote the prompt""#;
    let env = env_with(postgres, |config| {
        config.harness.kind = kilocloud_agent::harness::HarnessKind::External;
        config.harness.external_command = vec![
            "sh".into(),
            "-c".into(),
            script.into(),
            "sh".into(),
            "{prompt}".into(),
        ];
    })
    .await;
    env.upstream.push(Reply::text("hello from the model", 7, 3));
    let session = env.prepare(json!({})).await;
    let (_, view) = env.initiate_and_wait(&session).await;
    assert_eq!(view["executions"][0]["status"], "completed", "{view}");
    let events = env.events(&session, 0).await;
    let reply = events
        .iter()
        .find(|e| e["streamEventType"] == "output" && e["data"]["object"] == "chat.completion")
        .unwrap_or_else(|| panic!("no model reply among {events:?}"));
    assert_eq!(
        reply["data"]["choices"][0]["message"]["content"],
        "hello from the model"
    );
    let complete = events.last().unwrap();
    assert_eq!(complete["data"]["summary"], "wrote the prompt");
    let branch = format!("session/{session}");
    assert_eq!(
        env.git.file_at("demo", &branch, "prompt.txt").unwrap(),
        "Change the greeting to kilo and record that you ran\n"
    );
    let usage = env.usage().await;
    assert_eq!(usage.len(), 1, "the CLI's call was metered to the owner");
}

/// The Kilo Code CLI's native binary, from `KILOCLOUD_TEST_KILO_BIN` (scripts/test installs
/// the CLI with scripts/install-kilo-cli and exports it); the test fails loudly without it.
fn kilo_bin() -> String {
    std::env::var("KILOCLOUD_TEST_KILO_BIN").expect(
        "KILOCLOUD_TEST_KILO_BIN must name the Kilo Code CLI's native binary (scripts/test \
         installs it with scripts/install-kilo-cli)",
    )
}

/// The `kilo` harness: the real Kilo Code CLI runs `kilo run` in the sandbox, its catalog and
/// model calls going to our gateway through the forward with the owner's credential; the
/// file it writes with its own `write` tool is committed and pushed to the session's branch,
/// and its calls are charged to the owner.
async fn kilo_cli_harness(postgres: bool) {
    let env = env_with(postgres, |config| {
        config.harness.kind = kilocloud_agent::harness::HarnessKind::Kilo;
        config.harness.kilo_path = kilo_bin();
    })
    .await;
    env.upstream.push(Reply::ToolCall {
        name: "write".into(),
        arguments: json!({"filePath": "hello.txt", "content": "hello from kilo\n"}).to_string(),
    });
    env.upstream
        .push(Reply::text("I wrote hello.txt for you.", 30, 6));
    let session = env.prepare(json!({})).await;
    let (_, view) = env.initiate_and_wait(&session).await;
    let events = env.events(&session, 0).await;
    assert_eq!(
        view["executions"][0]["status"], "completed",
        "{view}\nevents: {events:?}"
    );
    let sent = env.upstream.requests();
    let tools: Vec<&str> = sent[0].body["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert!(tools.contains(&"write"), "the CLI's tools: {tools:?}");
    assert_eq!(sent[0].body["model"], "upstream-paid");
    let complete = events.last().unwrap();
    assert_eq!(
        complete["data"]["summary"], "I wrote hello.txt for you.",
        "{events:?}"
    );
    let branch = format!("session/{session}");
    assert_eq!(
        env.git.file_at("demo", &branch, "hello.txt").unwrap(),
        "hello from kilo\n"
    );
    let usage = env.usage().await;
    assert_eq!(
        usage.len(),
        sent.len(),
        "every CLI call was metered to the owner"
    );
    assert!(usage.iter().all(|r| r.cost_microdollars > 0));
    // The CLI's own headers are on the rows.
    assert!(
        usage
            .iter()
            .all(|r| r.feature.as_deref() == Some("cloud-agent")
                && r.editor
                    .as_deref()
                    .is_some_and(|e| e.starts_with("Kilo CLI"))
                && r.task_id.as_deref().is_some_and(|t| t.starts_with("ses_"))),
        "{usage:?}"
    );
}

/// `kilo cloud`'s `/stream` ends with the execution: a failed one's fatal `error` frame is
/// followed by a normal close (1000), as a `complete` is, so the CLI is not left waiting for
/// its idle timeout. The same session's plain stream keeps following.
async fn cloud_stream_closes_when_the_execution_ends(postgres: bool) {
    let env = env(postgres).await;
    for _ in 0..4 {
        env.upstream.push(Reply::Status(400));
    }
    let session = env.prepare(json!({})).await;
    let (_, view) = env.initiate_and_wait(&session).await;
    assert_eq!(view["executions"][0]["status"], "failed", "{view}");
    let (status, ticket) = env
        .request(
            reqwest::Method::POST,
            "/api/cloud-agent-next/sessions/stream-ticket",
            Some(json!({"cloudAgentSessionId": session})),
        )
        .await;
    assert_eq!(status, 200, "{ticket}");
    let url = format!(
        "{}/stream?cloudAgentSessionId={session}&ticket={}",
        env.base.replace("http://", "ws://"),
        ticket["ticket"].as_str().unwrap()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut types = Vec::new();
    let close = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    types.push(frame["streamEventType"].as_str().unwrap().to_owned());
                }
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => return frame,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("the server closes the stream (a guard against hangs)");
    assert_eq!(
        types.first().map(String::as_str),
        Some("started"),
        "{types:?}"
    );
    assert_eq!(types.last().map(String::as_str), Some("error"), "{types:?}");
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 1000);
}

on_both_backends!(
    external_cli_harness,
    cloud_stream_closes_when_the_execution_ends,
    kilo_cli_harness,
    main_path,
    conflict_and_interrupt,
    interrupted_tool_call_keeps_pairing,
    execution_bounds,
    unknown_model_and_missing_refs,
    secrets_are_masked,
    bad_input_and_scoping,
    reaper,
    callback_retries_and_dead_letter
);
