//! Queue contract: send/receive/ack, delays, visibility-timeout redelivery, retries, dead-letter
//! after max attempts and replay, size and delay limits, consumers and graceful shutdown.
//! Also KV with TTL and blobs. On SQLite and PostgreSQL, with a manual clock.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use common::{Env, Kind};
use kilocloud_substrate::{
    Consumer, Delivery, Error, MAX_MESSAGE_BYTES, QueueConfig, QueueStats, Result, RetryOutcome,
};
use serde_json::json;

fn config(name: &str) -> QueueConfig {
    QueueConfig {
        max_attempts: 3,
        visibility_timeout_ms: 10_000,
        retry_base_ms: 1_000,
        ..QueueConfig::new(name)
    }
}

async fn stats(sub: &kilocloud_substrate::Substrate, queue: &str) -> QueueStats {
    sub.queues()
        .stats()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.queue == queue)
        .unwrap()
}

async fn send_receive_ack_in_order(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let q = sub.queues();
    q.declare(config("jobs")).unwrap();
    let ids = q
        .send_batch(
            "jobs",
            &[json!({"n": 1}), json!({"n": 2}), json!({"n": 3})],
            0,
        )
        .await
        .unwrap();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let got = q.receive("jobs", 2).await.unwrap();
    assert_eq!(
        got.iter()
            .map(|d| d.body::<serde_json::Value>().unwrap()["n"].clone())
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(got.iter().all(|d| d.attempts == 1));
    let s = stats(&sub, "jobs").await;
    assert_eq!((s.ready, s.in_flight, s.delayed, s.dead), (1, 2, 0, 0));
    // Held messages are not delivered to another receive.
    let rest = q.receive("jobs", 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    for d in got.iter().chain(&rest) {
        assert!(q.ack(d).await.unwrap());
    }
    assert!(!q.ack(&rest[0]).await.unwrap(), "second ack is stale");
    let s = stats(&sub, "jobs").await;
    assert_eq!((s.ready, s.in_flight, s.delayed, s.dead), (0, 0, 0, 0));
}

async fn delayed_send_is_invisible_until_due(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let q = sub.queues();
    q.declare(config("later")).unwrap();
    q.send("later", &json!("x"), 30_000).await.unwrap();
    assert!(q.receive("later", 10).await.unwrap().is_empty());
    assert_eq!(stats(&sub, "later").await.delayed, 1);
    env.clock.advance(29_999);
    assert!(q.receive("later", 10).await.unwrap().is_empty());
    env.clock.advance(1);
    assert_eq!(q.receive("later", 10).await.unwrap().len(), 1);
    let e = q
        .send("later", &json!("x"), 24 * 3_600_000 + 1)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DelayTooLong { .. }), "{e}");
}

async fn visibility_timeout_redelivers(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let q = sub.queues();
    q.declare(config("vt")).unwrap();
    q.send("vt", &json!({"job": 1}), 0).await.unwrap();
    let first = q.receive("vt", 1).await.unwrap().remove(0);
    env.clock.advance(9_999);
    assert!(q.receive("vt", 1).await.unwrap().is_empty(), "still hidden");
    env.clock.advance(1);
    let second = q.receive("vt", 1).await.unwrap().remove(0);
    assert_eq!(second.id, first.id);
    assert_eq!(second.attempts, 2);
    assert!(
        !q.ack(&first).await.unwrap(),
        "the expired delivery's receipt is stale"
    );
    assert_eq!(
        q.retry(&first, None, "late").await.unwrap(),
        RetryOutcome::Stale
    );
    assert!(q.ack(&second).await.unwrap());
}

async fn retries_then_dead_letters_and_replays(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let q = sub.queues();
    q.declare(config("work")).unwrap();
    let id = q.send("work", &json!({"payload": "p"}), 0).await.unwrap();
    // Default backoff is exponential: 1 s after the first failure, 2 s after the second.
    for (attempt, backoff) in [(1u32, 1_000), (2, 2_000)] {
        let d = q.receive("work", 1).await.unwrap().remove(0);
        assert_eq!((d.id, d.attempts), (id, attempt));
        let outcome = q.retry(&d, None, &format!("boom {attempt}")).await.unwrap();
        assert_eq!(outcome, RetryOutcome::Requeued);
        assert_eq!(stats(&sub, "work").await.delayed, 1);
        env.clock.advance(backoff - 1);
        assert!(
            q.receive("work", 1).await.unwrap().is_empty(),
            "not before its backoff"
        );
        env.clock.advance(1);
    }
    let d = q.receive("work", 1).await.unwrap().remove(0);
    assert_eq!(d.attempts, 3);
    assert_eq!(
        q.retry(&d, None, "boom 3").await.unwrap(),
        RetryOutcome::DeadLettered
    );
    let s = stats(&sub, "work").await;
    assert_eq!((s.ready, s.in_flight, s.dead), (0, 0, 1));
    let dead = q.dead_letters("work", 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, id);
    assert_eq!(dead[0].last_error, "boom 3");
    assert_eq!(dead[0].body, json!({"payload": "p"}));
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(q.replay("work", None).await.unwrap(), 1);
    assert!(q.dead_letters("work", 0, 10).await.unwrap().is_empty());
    let again = q.receive("work", 1).await.unwrap().remove(0);
    assert_eq!(again.attempts, 1, "replayed messages start over");
    assert_eq!(
        again.body::<serde_json::Value>().unwrap(),
        json!({"payload": "p"})
    );
    assert!(q.ack(&again).await.unwrap());
}

async fn last_visibility_timeout_dead_letters(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let q = sub.queues();
    q.declare(QueueConfig {
        max_attempts: 2,
        ..config("stuck")
    })
    .unwrap();
    q.send("stuck", &json!(1), 0).await.unwrap();
    for _ in 0..2 {
        assert_eq!(q.receive("stuck", 1).await.unwrap().len(), 1);
        env.clock.advance(10_000);
    }
    assert!(q.receive("stuck", 1).await.unwrap().is_empty());
    let dead = q.dead_letters("stuck", 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .last_error
            .contains("delivery 2 was not acknowledged"),
        "{}",
        dead[0].last_error
    );
    // Replay a chosen id only.
    assert_eq!(
        q.replay("stuck", Some(&[dead[0].id + 1000])).await.unwrap(),
        0
    );
    assert_eq!(q.replay("stuck", Some(&[dead[0].id])).await.unwrap(), 1);
}

async fn oversized_or_unknown_is_refused_and_nothing_enqueued(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let q = sub.queues();
    q.declare(config("big")).unwrap();
    let too_big = "x".repeat(MAX_MESSAGE_BYTES);
    let e = q
        .send_batch("big", &[json!("small"), json!(too_big)], 0)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::MessageTooLarge { limit: 131_072, .. }),
        "{e}"
    );
    // Exactly at the limit is accepted: the JSON string adds two quote bytes.
    q.send("big", &"x".repeat(MAX_MESSAGE_BYTES - 2), 0)
        .await
        .unwrap();
    let s = stats(&sub, "big").await;
    assert_eq!(s.ready, 1, "the refused batch left nothing behind");
    let e = q
        .send_batch("big", &vec![json!(1); 101], 0)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Invalid { what: "batch", .. }), "{e}");
    let e = q.send("nope", &json!(1), 0).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { what: "queue", .. }), "{e}");
}

/// Fails messages whose body says so; counts handled messages.
struct Worker {
    handled: AtomicU32,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    /// Told when a handler starts (before the gate).
    started: Option<tokio::sync::mpsc::UnboundedSender<()>>,
}

#[async_trait]
impl Consumer for Worker {
    async fn handle(&self, d: &Delivery) -> Result<()> {
        if let Some(started) = &self.started {
            let _ = started.send(());
        }
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        self.handled.fetch_add(1, Ordering::SeqCst);
        if d.body::<serde_json::Value>()?["fail"] == true {
            return Err(Error::handler("poison"));
        }
        Ok(())
    }
}

async fn process_batch_acks_and_retries(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let q = sub.queues();
    q.declare(QueueConfig {
        max_attempts: 1,
        ..config("mixed")
    })
    .unwrap();
    q.send_batch("mixed", &[json!({"fail": false}), json!({"fail": true})], 0)
        .await
        .unwrap();
    let worker = Worker {
        handled: 0.into(),
        gate: None,
        started: None,
    };
    assert_eq!(q.process_batch("mixed", &worker).await.unwrap(), 2);
    let s = stats(&sub, "mixed").await;
    assert_eq!((s.ready, s.in_flight, s.dead), (0, 0, 1));
    assert_eq!(
        q.dead_letters("mixed", 0, 10).await.unwrap()[0].last_error,
        "poison"
    );
}

async fn consumer_finishes_in_flight_messages_on_shutdown(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    sub.start().await.unwrap();
    sub.queues().declare(config("graceful")).unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (started, mut handlers) = tokio::sync::mpsc::unbounded_channel();
    let worker = Arc::new(Worker {
        handled: 0.into(),
        gate: Some(gate.clone()),
        started: Some(started),
    });
    sub.start_consumer("graceful", worker.clone());
    sub.queues()
        .send_batch("graceful", &[json!(1), json!(2)], 0)
        .await
        .unwrap();
    // Wait until both handlers run (claimed is not enough: shutdown may begin between the
    // claim and the handlers' start), told by the handlers; the deadline only guards a hang.
    for _ in 0..2 {
        tokio::time::timeout(std::time::Duration::from_secs(30), handlers.recv())
            .await
            .expect("both handlers start")
            .unwrap();
    }
    let shutdown = tokio::spawn({
        let sub = sub.clone();
        async move { sub.shutdown(std::time::Duration::from_secs(30)).await }
    });
    gate.add_permits(2);
    assert!(shutdown.await.unwrap(), "shutdown finished in-flight work");
    assert_eq!(worker.handled.load(Ordering::SeqCst), 2);
    let s = stats(&sub, "graceful").await;
    assert_eq!(
        (s.ready, s.in_flight),
        (0, 0),
        "both were acked before shutdown returned"
    );
}

async fn kv_ttl_expires_with_the_clock(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let kv = sub.kv();
    kv.put(
        "dedup:1",
        &json!({"seen": true}),
        Some(std::time::Duration::from_secs(60)),
    )
    .await
    .unwrap();
    kv.put("config:a", &"forever", None).await.unwrap();
    assert_eq!(
        kv.get::<serde_json::Value>("dedup:1").await.unwrap(),
        Some(json!({"seen": true}))
    );
    assert_eq!(kv.list("dedup:").await.unwrap(), vec!["dedup:1".to_owned()]);
    env.clock.advance(59_999);
    assert!(
        kv.get::<serde_json::Value>("dedup:1")
            .await
            .unwrap()
            .is_some()
    );
    env.clock.advance(1);
    assert!(
        kv.get::<serde_json::Value>("dedup:1")
            .await
            .unwrap()
            .is_none(),
        "expired at its TTL"
    );
    assert!(kv.list("dedup:").await.unwrap().is_empty());
    assert_eq!(kv.sweep().await.unwrap(), 1);
    assert_eq!(
        kv.get::<String>("config:a").await.unwrap().as_deref(),
        Some("forever")
    );
    assert!(kv.delete("config:a").await.unwrap());
    assert!(!kv.delete("config:a").await.unwrap());
}

async fn blobs_roundtrip(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let blobs = sub.blobs();
    blobs
        .put("sessions/a/log.txt", bytes::Bytes::from_static(b"hello"))
        .await
        .unwrap();
    blobs
        .put("sessions/b/log.txt", bytes::Bytes::from_static(b"world!"))
        .await
        .unwrap();
    assert_eq!(
        &blobs.get("sessions/a/log.txt").await.unwrap()[..],
        b"hello"
    );
    let mut listed: Vec<_> = blobs
        .list("sessions")
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.path, m.size))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("sessions/a/log.txt".into(), 5),
            ("sessions/b/log.txt".into(), 6)
        ]
    );
    blobs.delete("sessions/a/log.txt").await.unwrap();
    blobs.delete("sessions/a/log.txt").await.unwrap();
    let e = blobs.get("sessions/a/log.txt").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { what: "blob", .. }), "{e}");
}

async fn queue_settings_are_validated(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    for bad in [
        QueueConfig {
            batch_size: 0,
            ..config("bad")
        },
        QueueConfig {
            max_attempts: 0,
            ..config("bad")
        },
        QueueConfig {
            visibility_timeout_ms: 10,
            ..config("bad")
        },
    ] {
        let e = sub.queues().declare(bad).unwrap_err();
        assert!(
            matches!(e, Error::Invalid { .. }) && e.to_string().contains("\"bad\""),
            "{e}"
        );
    }
    assert!(sub.queues().names().is_empty());
}

/// A delivery whose node crashed (released by the takeover) costs no attempt: only failures
/// count towards `max_attempts`; deliveries without an outcome have their own, larger bound.
async fn crashed_deliveries_do_not_use_attempts(kind: Kind) {
    let env = Env::new(kind).await;
    let survivor = env.open().await;
    let cfg = QueueConfig {
        max_attempts: 2,
        ..config("crashy")
    };
    survivor.queues().declare(cfg.clone()).unwrap();
    let id = survivor
        .queues()
        .send("crashy", &json!(1), 0)
        .await
        .unwrap();
    for round in 1..=4 {
        let victim = env.open().await;
        victim.queues().declare(cfg.clone()).unwrap();
        let d = victim
            .queues()
            .receive("crashy", 1)
            .await
            .unwrap()
            .remove(0);
        assert_eq!((d.id, d.attempts), (id, round));
        drop(victim); // crashed mid-handler: no ack, no retry
        assert_eq!(survivor.reap_dead_nodes().await.unwrap().messages, 1);
    }
    assert!(
        survivor
            .queues()
            .dead_letters("crashy", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let q = survivor.queues();
    let d = q.receive("crashy", 1).await.unwrap().remove(0);
    assert_eq!(d.attempts, 5);
    assert_eq!(
        q.retry(&d, Some(0), "first failure").await.unwrap(),
        RetryOutcome::Requeued
    );
    let d = q.receive("crashy", 1).await.unwrap().remove(0);
    assert_eq!(
        q.retry(&d, Some(0), "second failure").await.unwrap(),
        RetryOutcome::DeadLettered
    );
    let dead = q.dead_letters("crashy", 0, 10).await.unwrap();
    assert_eq!(
        (dead[0].attempts, dead[0].last_error.as_str()),
        (6, "second failure")
    );

    // A message that only ever crashes its consumers is dead-lettered after
    // DELIVERIES_PER_ATTEMPT × max_attempts deliveries.
    q.send("crashy", &json!(2), 0).await.unwrap();
    for _ in 0..(kilocloud_substrate::DELIVERIES_PER_ATTEMPT * 2) {
        let victim = env.open().await;
        victim.queues().declare(cfg.clone()).unwrap();
        assert_eq!(victim.queues().receive("crashy", 1).await.unwrap().len(), 1);
        drop(victim);
        survivor.reap_dead_nodes().await.unwrap();
    }
    assert!(q.receive("crashy", 1).await.unwrap().is_empty());
    let dead = q.dead_letters("crashy", 0, 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(
        dead[1]
            .last_error
            .contains("delivered 6 times without an outcome"),
        "{}",
        dead[1].last_error
    );
}

/// Holds its message until released; says when it started.
struct Slow {
    started: tokio::sync::mpsc::UnboundedSender<i64>,
    release: Arc<tokio::sync::Notify>,
}

#[async_trait]
impl Consumer for Slow {
    async fn handle(&self, d: &Delivery) -> Result<()> {
        let released = self.release.notified();
        self.started.send(d.id).unwrap();
        released.await;
        Ok(())
    }
}

/// A handler that runs past the visibility timeout keeps its message (the consumer loop extends
/// the timeout while it runs), so no other node gets it and it is acked, never dead-lettered.
async fn slow_handler_keeps_its_message(kind: Kind) {
    let env = Env::new(kind).await;
    let node = env.open().await;
    let other = env.open().await;
    let cfg = QueueConfig {
        max_attempts: 1,
        ..config("slow")
    };
    for n in [&node, &other] {
        n.queues().declare(cfg.clone()).unwrap();
    }
    node.queues().send("slow", &json!(1), 0).await.unwrap();
    let (started, mut handler_started) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let slow = Slow {
        started,
        release: release.clone(),
    };
    let running = tokio::spawn({
        let node = node.clone();
        async move { node.queues().process_batch("slow", &slow).await }
    });
    handler_started.recv().await.unwrap();
    for step in 1..=3 {
        // Past the (previous) visibility timeout: the handler's heartbeat must have moved it.
        env.clock.advance(10_000);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while stats(&node, "slow").await.in_flight != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "step {step}: not extended"
            );
            tokio::task::yield_now().await;
        }
        assert!(
            other.queues().receive("slow", 1).await.unwrap().is_empty(),
            "step {step}"
        );
    }
    release.notify_one();
    assert_eq!(running.await.unwrap().unwrap(), 1);
    let s = stats(&node, "slow").await;
    assert_eq!((s.ready, s.in_flight, s.delayed, s.dead), (0, 0, 0, 0));
}

/// Dead letters can be deleted by id or purged; unknown queues are `NotFound` (404).
async fn dead_letters_are_deleted_and_unknown_queues_refused(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let q = sub.queues();
    q.declare(QueueConfig {
        max_attempts: 1,
        ..config("trash")
    })
    .unwrap();
    q.send_batch("trash", &[json!(1), json!(2), json!(3)], 0)
        .await
        .unwrap();
    for d in q.receive("trash", 3).await.unwrap() {
        assert_eq!(
            q.retry(&d, None, "bad").await.unwrap(),
            RetryOutcome::DeadLettered
        );
    }
    let dead = q.dead_letters("trash", 0, 10).await.unwrap();
    assert_eq!(
        q.delete_dead_letters("trash", Some(&[dead[0].id]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(q.dead_letters("trash", 0, 10).await.unwrap().len(), 2);
    assert_eq!(q.delete_dead_letters("trash", None).await.unwrap(), 2);
    assert!(q.dead_letters("trash", 0, 10).await.unwrap().is_empty());
    for e in [
        q.dead_letters("nope", 0, 10).await.unwrap_err(),
        q.delete_dead_letters("nope", None).await.unwrap_err(),
        q.replay("nope", None).await.unwrap_err(),
    ] {
        assert!(matches!(e, Error::NotFound { what: "queue", .. }), "{e}");
    }
    // Another process (an operator command) that never declared the queue still finds it by
    // its rows.
    let operator = env.open().await;
    q.send("trash", &json!(4), 0).await.unwrap();
    assert!(
        operator
            .queues()
            .dead_letters("trash", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

on_every_backend!(
    crashed_deliveries_do_not_use_attempts,
    slow_handler_keeps_its_message,
    dead_letters_are_deleted_and_unknown_queues_refused,
    queue_settings_are_validated,
    send_receive_ack_in_order,
    delayed_send_is_invisible_until_due,
    visibility_timeout_redelivers,
    retries_then_dead_letters_and_replays,
    last_visibility_timeout_dead_letters,
    oversized_or_unknown_is_refused_and_nothing_enqueued,
    process_batch_acks_and_retries,
    consumer_finishes_in_flight_messages_on_shutdown,
    kv_ttl_expires_with_the_clock,
    blobs_roundtrip,
);
