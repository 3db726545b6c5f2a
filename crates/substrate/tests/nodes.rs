//! Node contract: schema versioning, the SQLite single-server lock, and on PostgreSQL several
//! nodes sharing one database (cross-node actor serialization, dead-node takeover).
//! Process-level crash and SIGKILL tests live in the `kilocloud` crate.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::{CounterCall, Env, Kind, OverlapCounter};
use kilocloud_substrate::{Actor, ActorContext, Error, QueueConfig, Result, Substrate, Tuning};
use serde_json::json;
use sqlx::Connection;

async fn schema_newer_than_binary_is_refused(kind: Kind) {
    let env = Env::new(kind).await;
    drop(env.open().await);
    match &env.schema {
        None => {
            let c = rusqlite::Connection::open(env.sqlite_path()).unwrap();
            c.execute(
                "INSERT INTO kilocloud_schema (version, name, applied_at) VALUES (999, 'future', 0)",
                [],
            )
            .unwrap();
        }
        Some(s) => {
            let mut c = sqlx::PgConnection::connect(&s.url).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {}.kilocloud_schema (version, name, applied_at) VALUES (999, 'future', 0)",
                s.name
            )))
            .execute(&mut c)
            .await
            .unwrap();
        }
    }
    let e = Substrate::open(
        &env.database(),
        &env.blobs(),
        Tuning::default(),
        Arc::new(env.clock.clone()),
    )
    .await
    .err()
    .expect("must refuse a newer schema");
    assert!(matches!(e, Error::SchemaTooNew { found: 999, .. }), "{e}");
    assert!(
        e.to_string().contains("newer than this binary supports"),
        "{e}"
    );
}

async fn open_is_idempotent_and_ready(kind: Kind) {
    let env = Env::new(kind).await;
    let a = env.open().await;
    a.ready().await.unwrap();
    let b = env.open().await;
    assert_eq!(
        b.schema_version().await.unwrap(),
        Substrate::latest_schema_version()
    );
}

async fn node_without_heartbeats_stops_claiming(kind: Kind) {
    let env = Env::new(kind).await;
    // One heartbeat at start, then none for an hour: the node's claim lease (half the dead-node
    // timeout, 2.5 s) runs out.
    let sub = env
        .open_with(Tuning {
            node_heartbeat_ms: 3_600_000,
            ..Tuning::default()
        })
        .await;
    sub.start().await.unwrap();
    sub.queues().declare(QueueConfig::new("fenced")).unwrap();
    sub.queues().send("fenced", &json!(1), 0).await.unwrap();
    env.clock.advance(2_501);
    assert!(
        sub.queues().receive("fenced", 10).await.unwrap().is_empty(),
        "a node that cannot heartbeat must not claim"
    );
    sub.shutdown(std::time::Duration::from_secs(10)).await;
    // A healthy node (here: the same database reopened and started) delivers it.
    let next = env.open().await;
    next.start().await.unwrap();
    next.queues().declare(QueueConfig::new("fenced")).unwrap();
    assert_eq!(next.queues().receive("fenced", 10).await.unwrap().len(), 1);
    next.shutdown(std::time::Duration::from_secs(10)).await;
}

on_every_backend!(
    schema_newer_than_binary_is_refused,
    open_is_idempotent_and_ready,
    node_without_heartbeats_stops_claiming,
    suspended_calls_hold_no_session,
);

#[tokio::test]
async fn sqlite_refuses_a_second_server_on_one_file() {
    let env = Env::new(Kind::Sqlite).await;
    let first = env.open().await;
    first.start().await.unwrap();
    let second = env.open().await;
    let e = second.start().await.unwrap_err();
    assert!(matches!(e, Error::DataDirLocked { .. }), "{e}");
    assert!(e.to_string().contains("use PostgreSQL for several nodes"));
    first.shutdown(std::time::Duration::from_secs(10)).await;
    second
        .start()
        .await
        .expect("the lock is free after shutdown");
    second.shutdown(std::time::Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_nodes_never_run_one_key_concurrently() {
    let env = Env::new(Kind::Postgres).await;
    let (a, b) = (env.open().await, env.open().await);
    let actor = OverlapCounter::default();
    a.actors().register(actor.clone());
    b.actors().register(actor.clone());
    let mut tasks = Vec::new();
    for i in 0..200 {
        let node = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            node.actors()
                .call::<OverlapCounter>(&format!("k{}", i % 3), CounterCall::Incr)
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(actor.overlaps.load(Ordering::SeqCst), 0);
    let mut total = 0;
    for k in 0..3 {
        let snap = a.actor_snapshot("counter", &format!("k{k}")).await.unwrap();
        total += snap.storage["n"].as_i64().unwrap();
    }
    assert_eq!(total, 200, "no lost updates across nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dead_node_messages_are_taken_over() {
    let env = Env::new(Kind::Postgres).await;
    // Node A heartbeats once at start and then, as far as this test is concerned, dies.
    let slow = Tuning {
        node_heartbeat_ms: 3_600_000,
        ..Tuning::default()
    };
    let a = env.open_with(slow.clone()).await;
    a.start().await.unwrap();
    let b = env.open_with(slow).await;
    for node in [&a, &b] {
        node.queues()
            .declare(QueueConfig {
                visibility_timeout_ms: 600_000,
                ..QueueConfig::new("held")
            })
            .unwrap();
    }
    a.queues()
        .send_batch("held", &[json!(1), json!(2)], 0)
        .await
        .unwrap();
    let held = a.queues().receive("held", 10).await.unwrap();
    assert_eq!(held.len(), 2);
    assert!(b.queues().receive("held", 10).await.unwrap().is_empty());
    // Within the dead-node timeout nothing is taken over.
    env.clock.advance(4_000);
    assert_eq!(b.reap_dead_nodes().await.unwrap().messages, 0);
    env.clock.advance(1_001);
    assert_eq!(
        a.reap_dead_nodes().await.unwrap().messages,
        0,
        "a node never reaps itself"
    );
    assert_eq!(b.reap_dead_nodes().await.unwrap().messages, 2);
    let taken = b.queues().receive("held", 10).await.unwrap();
    assert_eq!(
        taken.iter().map(|d| d.attempts).collect::<Vec<_>>(),
        vec![2, 2]
    );
    for d in &taken {
        assert!(b.queues().ack(d).await.unwrap());
    }
    // The dead node's sessions were terminated by the takeover: what it tries now fails on
    // its closed connections or finds its receipts stale.
    for _ in 0..16 {
        if let Ok(acked) = a.queues().ack(&held[0]).await {
            assert!(!acked, "the dead node's receipts are stale");
            break;
        }
    }
    // Claims of a node that is not registered at all (its row is gone) are released too.
    b.queues().send("held", &json!(3), 0).await.unwrap();
    assert_eq!(b.queues().receive("held", 10).await.unwrap().len(), 1);
    assert_eq!(a.reap_dead_nodes().await.unwrap().messages, 1);
}

/// Reports every message and alarm it handles on a channel.
#[derive(Clone)]
struct Reporter(tokio::sync::mpsc::UnboundedSender<String>);

#[async_trait::async_trait]
impl kilocloud_substrate::Consumer for Reporter {
    async fn handle(&self, d: &kilocloud_substrate::Delivery) -> Result<()> {
        let _ = self.0.send(format!("message {}", d.body::<i64>()?));
        Ok(())
    }
}

impl Actor for Reporter {
    const TYPE: &'static str = "reporter";
    type Call = i64;
    type Reply = ();
    async fn call(&self, ctx: &mut ActorContext, at: i64) -> Result<()> {
        ctx.set_alarm(at);
        Ok(())
    }
    async fn alarm(&self, ctx: &mut ActorContext, _: kilocloud_substrate::AlarmInfo) -> Result<()> {
        let _ = self.0.send(format!("alarm {}", ctx.key()));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_nodes_wake_each_other_without_polling() {
    let env = Env::new(Kind::Postgres).await;
    // Pollers effectively off: only a notification from the other node can wake B.
    let no_polling = Tuning {
        queue_poll_ms: 3_600_000,
        alarm_poll_ms: 3_600_000,
        ..Tuning::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let a = env.open_with(no_polling.clone()).await;
    let b = env.open_with(no_polling).await;
    for node in [&a, &b] {
        node.queues().declare(QueueConfig::new("wake")).unwrap();
        node.actors().register(Reporter(tx.clone()));
    }
    b.start().await.unwrap();
    b.start_consumer("wake", Arc::new(Reporter(tx.clone())));
    // B's consumer is running and idle: it handled a message sent through B and acked it, so
    // its next receive came up empty and it now waits for a wake-up.
    b.queues().send("wake", &-1, 0).await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), "message -1");
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let stats = b.queues().stats().await.unwrap();
            if stats.iter().all(|s| s.ready == 0 && s.in_flight == 0) {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("B acked its message (a guard against hangs)");
    // B starts listening asynchronously; A repeats until B reacts, which it does at once once
    // it listens. Without notifications B would wait an hour.
    let mut woke = None;
    for i in 0..100 {
        a.queues().send("wake", &i, 0).await.unwrap();
        if let Ok(Some(m)) =
            tokio::time::timeout(std::time::Duration::from_millis(100), rx.recv()).await
        {
            woke = Some(m);
            break;
        }
    }
    assert!(
        woke.is_some_and(|m| m.starts_with("message")),
        "B's consumer was never woken"
    );
    let mut fired = false;
    for i in 0..100 {
        a.actors()
            .call::<Reporter>(&format!("r{i}"), common::T0)
            .await
            .unwrap();
        while let Ok(Some(m)) =
            tokio::time::timeout(std::time::Duration::from_millis(100), rx.recv()).await
        {
            if m.starts_with("alarm") {
                fired = true;
            }
        }
        if fired {
            break;
        }
    }
    assert!(fired, "B's scheduler was never woken by an alarm set on A");
    b.shutdown(std::time::Duration::from_secs(10)).await;
}

/// Holds its actor (and so, on PostgreSQL, the key's advisory lock) until released.
#[derive(Clone, Default)]
struct Hanger {
    started: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
}

impl Actor for Hanger {
    const TYPE: &'static str = "hanger";
    type Call = bool;
    type Reply = ();
    async fn call(&self, ctx: &mut ActorContext, hang: bool) -> Result<()> {
        if hang {
            let released = self.release.notified();
            self.started.notify_one();
            released.await;
        }
        ctx.put("done", &true)
    }
}

/// A node that hangs mid-call (here: its handler never returns and its heartbeats stop) holds
/// the key's advisory lock; when another node declares it dead, the takeover terminates the
/// hung node's database sessions, so the survivor serves that key at once, and the hung node
/// can no longer commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hung_node_loses_its_actor_locks() {
    let env = Env::new(Kind::Postgres).await;
    let silent = Tuning {
        node_heartbeat_ms: 3_600_000,
        actor_lock_wait_ms: 200,
        ..Tuning::default()
    };
    let hung = env.open_with(silent.clone()).await;
    hung.start().await.unwrap();
    let survivor = env.open_with(silent).await;
    let (h1, h2) = (Hanger::default(), Hanger::default());
    hung.actors().register(h1.clone());
    survivor.actors().register(h2);
    let started = h1.started.notified();
    let stuck = tokio::spawn({
        let hung = hung.clone();
        async move { hung.actors().call::<Hanger>("k", true).await }
    });
    started.await;
    // Meanwhile the key is held: the survivor's call waits at most the lock wait, then is told
    // to come back later.
    let e = survivor
        .actors()
        .call::<Hanger>("k", false)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Overloaded { .. }), "{e}");
    env.clock.advance(5_001);
    survivor.reap_dead_nodes().await.unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        survivor.actors().call::<Hanger>("k", false),
    )
    .await
    .expect("the survivor got the key")
    .unwrap();
    // The hung node wakes up: its commit fails, nothing of it lands.
    h1.release.notify_one();
    assert!(stuck.await.unwrap().is_err(), "a fenced node cannot commit");
}

/// A node whose clock disagrees with the database's beyond `max_clock_skew_ms` stops claiming
/// and is not ready; it reports the skew it measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_clock_skew_fences_claims() {
    use kilocloud_substrate::{Clock, ManualClock, SystemClock};
    let env = Env::new(Kind::Postgres).await;
    let ahead = ManualClock::new(SystemClock.now_ms() + 60_000);
    let sub = Substrate::open(
        &env.database(),
        &env.blobs(),
        Tuning {
            max_clock_skew_ms: 2_000,
            ..Tuning::default()
        },
        Arc::new(ahead.clone()),
    )
    .await
    .unwrap();
    sub.start().await.unwrap();
    let skew = sub.clock_skew_ms().expect("measured at start");
    assert!((55_000..65_000).contains(&skew), "skew {skew}");
    assert!(sub.ready().await.is_err(), "a skewed node is not ready");
    sub.queues().declare(QueueConfig::new("skewed")).unwrap();
    sub.queues().send("skewed", &json!(1), 0).await.unwrap();
    assert!(
        sub.queues().receive("skewed", 10).await.unwrap().is_empty(),
        "a skewed node must not claim"
    );
    sub.shutdown(std::time::Duration::from_secs(10)).await;
    // The same database with an agreeing clock claims it.
    let fine = Substrate::open(
        &env.database(),
        &env.blobs(),
        Tuning::default(),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    fine.start().await.unwrap();
    assert!(fine.clock_skew_ms().unwrap().abs() < 2_000);
    fine.ready().await.unwrap();
    fine.queues().declare(QueueConfig::new("skewed")).unwrap();
    fine.queues().send("skewed", &json!(2), 0).await.unwrap();
    let got = fine.queues().receive("skewed", 10).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body::<i64>().unwrap(), 2);
    fine.shutdown(std::time::Duration::from_secs(10)).await;
}

/// An actor whose `Wait` call suspends until the test opens its key's gate.
#[derive(Clone, Default)]
struct Outside {
    gates: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Notify>>>>,
    /// Told the key of each call once its outside work runs (its session handed back).
    suspended: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<String>>>>,
}

enum OutsideCall {
    Wait,
    Read,
}

impl Outside {
    fn gate(&self, key: &str) -> Arc<tokio::sync::Notify> {
        self.gates
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_default()
            .clone()
    }
}

impl Actor for Outside {
    const TYPE: &'static str = "outside";
    const SUSPENDS: bool = true;
    type Call = OutsideCall;
    type Reply = (Option<i64>, Option<i64>);

    async fn call(&self, ctx: &mut ActorContext, call: OutsideCall) -> Result<Self::Reply> {
        if let OutsideCall::Wait = call {
            ctx.put("before", &1)?;
            let gate = self.gate(ctx.key());
            let told = self.suspended.lock().unwrap().clone();
            let key = ctx.key().to_owned();
            ctx.suspend_while(async move {
                if let Some(told) = told {
                    let _ = told.send(key);
                }
                gate.notified().await;
            })
            .await?;
            ctx.put("after", &1)?;
        }
        Ok((ctx.get("before").await?, ctx.get("after").await?))
    }
}

/// Calls waiting on the outside world hold no database session: more of them than the
/// node has session slots all get to their outside work, and other actors' calls go on
/// meanwhile. What was buffered before the wait is committed (lock-free readers see it).
async fn suspended_calls_hold_no_session(kind: Kind) {
    let env = Env::new(kind).await;
    let node = env.open().await;
    let outside = Outside::default();
    let (told, mut suspended) = tokio::sync::mpsc::unbounded_channel();
    *outside.suspended.lock().unwrap() = Some(told);
    node.actors().register(outside.clone());
    node.actors().register(OverlapCounter::default());
    // 16 connections, 12 session slots: 20 calls that kept their sessions could not all run.
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let node = node.clone();
            tokio::spawn(async move {
                node.actors()
                    .call::<Outside>(&format!("k{i}"), OutsideCall::Wait)
                    .await
            })
        })
        .collect();
    for _ in 0..20 {
        tokio::time::timeout(std::time::Duration::from_secs(30), suspended.recv())
            .await
            .expect("every call reaches its outside work")
            .unwrap();
    }
    assert_eq!(
        node.actors()
            .call::<OverlapCounter>("other", CounterCall::Incr)
            .await
            .unwrap(),
        1,
        "other actors are served while 20 calls are out"
    );
    let before: Option<i64> = node.actor_read("outside", "k0", "before").await.unwrap();
    assert_eq!(before, Some(1), "the write before the wait is committed");
    for i in 0..20 {
        outside.gate(&format!("k{i}")).notify_one();
    }
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), (Some(1), Some(1)));
    }
}

/// On PostgreSQL another node does not run a key while a call on it is suspended (it waits,
/// then answers Overloaded); once the call resumes and commits, it does. A suspension whose
/// lease lapsed (its node stalled) is taken over, and the suspended call, resuming, fails
/// without committing: fencing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_suspended_keys_stay_with_their_call() {
    let env = Env::new(Kind::Postgres).await;
    let tuning = || Tuning {
        actor_lock_wait_ms: 300,
        ..Tuning::default()
    };
    let (a, b) = (env.open_with(tuning()).await, env.open_with(tuning()).await);
    let outside = Outside::default();
    let (told, mut suspended) = tokio::sync::mpsc::unbounded_channel();
    *outside.suspended.lock().unwrap() = Some(told);
    a.actors().register(outside.clone());
    b.actors().register(outside.clone());
    let wait = |key: &'static str| {
        let a = a.clone();
        tokio::spawn(async move { a.actors().call::<Outside>(key, OutsideCall::Wait).await })
    };

    let held = wait("held");
    suspended.recv().await.unwrap();
    let e = b
        .actors()
        .call::<Outside>("held", OutsideCall::Read)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Overloaded { .. }), "{e}");
    outside.gate("held").notify_one();
    assert_eq!(held.await.unwrap().unwrap(), (Some(1), Some(1)));
    assert_eq!(
        b.actors()
            .call::<Outside>("held", OutsideCall::Read)
            .await
            .unwrap(),
        (Some(1), Some(1))
    );

    // The lease lapses (as if A had stalled past it): B takes the key over.
    let stalled = wait("stalled");
    suspended.recv().await.unwrap();
    let schema = env.schema.as_ref().unwrap();
    let mut c = sqlx::PgConnection::connect(&schema.url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "UPDATE {}.actor_suspensions SET until_ms = 0 WHERE actor_key = 'stalled'",
        schema.name
    )))
    .execute(&mut c)
    .await
    .unwrap();
    assert_eq!(
        b.actors()
            .call::<Outside>("stalled", OutsideCall::Read)
            .await
            .unwrap(),
        (Some(1), None),
        "B runs it, seeing what A committed before the wait"
    );
    outside.gate("stalled").notify_one();
    let e = stalled.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("lease lapsed"), "{e}");
    let after: Option<i64> = b.actor_read("outside", "stalled", "after").await.unwrap();
    assert_eq!(
        after, None,
        "the fenced call committed nothing after its wait"
    );
}
