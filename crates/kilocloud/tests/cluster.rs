//! Several `kilocloud serve` processes on one database (DESIGN.md §3 "Node loss"):
//! on PostgreSQL calls for one actor key never overlap across processes, each alarm firing runs
//! once, each queue message is handled by one consumer at a time, and a SIGKILLed node's work is
//! taken over, while a node that drains after SIGTERM keeps its work. On SQLite a second server
//! on the same data directory is refused.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Node, Store};
use serde_json::json;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refuses_a_second_server() {
    let store = Store::sqlite().await;
    let mut first = Node::start(&store, "first.log");
    let (ok, _, stderr) = common::cli(&store, &["serve", "--listen", "127.0.0.1:0"]);
    assert!(!ok);
    assert!(
        stderr.contains("locked by another kilocloud process"),
        "{stderr}"
    );
    assert!(first.sigterm().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_nodes_share_the_work() {
    let store = Store::postgres().await;
    let a = Node::start(&store, "a.log");
    let b = Node::start(&store, "b.log");
    let nodes = [&a, &b];

    // Actor writes on 4 hot keys from both nodes at once: a lost update would show as a count
    // below the number of writes.
    let mut writes = Vec::new();
    for i in 0..400 {
        let node = nodes[i % 2];
        let (http, base) = (node.http.clone(), node.base.clone());
        writes.push(tokio::spawn(async move {
            let r = Node::detached(http, base)
                .post(
                    &format!("/api/admin/probe/hot{}", i % 4),
                    json!({"token": format!("w{i}")}),
                )
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
        }));
    }
    for w in writes {
        w.await.unwrap();
    }
    for k in 0..4 {
        assert_eq!(a.actor(&format!("hot{k}")).await["storage"]["count"], 100);
    }

    // Queue messages sent through both nodes, consumed by both: each handled exactly once.
    for i in 0..300 {
        let r = nodes[i % 2]
            .post(
                "/api/admin/queues/probe/messages",
                json!({"key": format!("q{}", i % 5), "token": format!("m{i}")}),
            )
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
    }
    // Alarms set through both nodes on 40 actors, due in one second.
    let due = now_ms() + 1_000;
    for i in 0..40 {
        let r = nodes[i % 2]
            .post(
                &format!("/api/admin/probe/alarm{i}/alarm"),
                json!({"at_ms": due + i as i64}),
            )
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    a.wait_until("messages handled", Duration::from_secs(60), || async {
        let q = a.queue("probe").await;
        q["ready"] == 0 && q["in_flight"] == 0 && q["delayed"] == 0
    })
    .await;
    let mut deliveries = BTreeMap::new();
    for k in 0..5 {
        let storage = a.actor(&format!("q{k}")).await["storage"].clone();
        for (key, v) in storage.as_object().unwrap() {
            if let Some(token) = key.strip_prefix("deliveries/") {
                deliveries.insert(token.to_owned(), v.as_i64().unwrap());
            }
        }
    }
    assert_eq!(deliveries.len(), 300);
    assert!(
        deliveries.values().all(|n| *n == 1),
        "a message was handled twice: {deliveries:?}"
    );
    for i in 0..40 {
        let key = format!("alarm{i}");
        let at = due + i as i64;
        a.wait_until("alarm fired", Duration::from_secs(60), || {
            let key = key.clone();
            let a = &a;
            async move {
                a.actor(&key).await["storage"]
                    .get(format!("alarm/{at}"))
                    .is_some()
            }
        })
        .await;
        assert_eq!(
            a.actor(&key).await["storage"][format!("alarm/{at}")],
            1,
            "{key} fired more than once"
        );
    }
    let q = a.queue("probe").await;
    assert_eq!(q["dead"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sigkilled_node_is_taken_over() {
    let store = Store::postgres().await;
    let mut a = Node::start(&store, "a.log");
    let b = Node::start(&store, "b.log");
    // Slow messages so that both nodes hold some when A dies.
    for i in 0..40 {
        let r = a
            .post("/api/admin/queues/probe/messages",
                json!({"key": format!("s{}", i % 4), "token": format!("slow{i}"), "hold_ms": 1_500}))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
    }
    // Alarms due right around the kill.
    let due = now_ms() + 300;
    for i in 0..20 {
        a.post(
            &format!("/api/admin/probe/takeover{i}/alarm"),
            json!({"at_ms": due}),
        )
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    }
    b.wait_until(
        "both nodes hold messages",
        Duration::from_secs(30),
        || async { b.queue("probe").await["in_flight"].as_i64().unwrap() >= 20 },
    )
    .await;
    a.sigkill();
    let killed = Instant::now();
    // B keeps serving writes on keys A may have been calling.
    for k in 0..4 {
        b.post(
            &format!("/api/admin/probe/s{k}"),
            json!({"token": "after-kill"}),
        )
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    }
    b.wait_until(
        "all messages handled by the survivor",
        Duration::from_secs(60),
        || async {
            let q = b.queue("probe").await;
            q["ready"] == 0 && q["in_flight"] == 0 && q["delayed"] == 0
        },
    )
    .await;
    let drained = killed.elapsed();
    let mut handled = 0;
    for k in 0..4 {
        let storage = b.actor(&format!("s{k}")).await["storage"].clone();
        handled += storage
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with("t/slow"))
            .count();
        assert_eq!(storage["t/after-kill"], true);
    }
    assert_eq!(handled, 40, "every message was handled despite the kill");
    for i in 0..20 {
        let key = format!("takeover{i}");
        b.wait_until(
            "alarm fired after takeover",
            Duration::from_secs(60),
            || {
                let key = key.clone();
                let b = &b;
                async move {
                    b.actor(&key).await["storage"]
                        .get(format!("alarm/{due}"))
                        .is_some()
                }
            },
        )
        .await;
    }
    assert_eq!(b.queue("probe").await["dead"], 0);
    eprintln!("takeover: survivor finished the dead node's messages {drained:?} after SIGKILL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_draining_node_keeps_its_work() {
    let store = Store::postgres().await;
    let mut a = Node::start(&store, "a.log");
    // Messages that take longer than the dead-node timeout (5 s): while A drains them after
    // SIGTERM it must keep heartbeating, or B would take them over and handle them twice.
    for i in 0..4 {
        let r = a
            .post(
                "/api/admin/queues/probe/messages",
                json!({"key": "drain", "token": format!("long{i}"), "hold_ms": 7_000}),
            )
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
    }
    a.wait_until("A holds all four", Duration::from_secs(30), || async {
        a.queue("probe").await["in_flight"] == 4
    })
    .await;
    let b = Node::start(&store, "b.log");
    let status = a.sigterm();
    assert!(status.success(), "graceful shutdown exits 0");
    // Had B taken any over, it would still be handling it now (7 s more); wait for the queue
    // to be empty before counting deliveries.
    b.wait_until("queue empty", Duration::from_secs(60), || async {
        let q = b.queue("probe").await;
        q["ready"] == 0 && q["in_flight"] == 0 && q["delayed"] == 0
    })
    .await;
    let storage = b.actor("drain").await["storage"].clone();
    for i in 0..4 {
        assert_eq!(
            storage[format!("deliveries/long{i}")],
            1,
            "long{i}: {storage}"
        );
    }
}
