//! Actor contract: serialization per key, concurrency across keys, transactional storage,
//! backlog bounds, on SQLite and PostgreSQL.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::{CounterCall, Env, Kind, OverlapCounter};
use kilocloud_substrate::{Actor, ActorContext, Error, Result, Tuning};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

/// Writes, reads its own writes, then optionally fails.
struct Scratch;

enum ScratchCall {
    PutThenFail {
        key: String,
        value: String,
    },
    Put {
        key: String,
        value: String,
    },
    Delete(String),
    DeleteAll,
    List(String),
    /// Writes `put` and deletes `delete` in the call, then walks `prefix` in pages of `limit`
    /// and compares the walk with a whole listing.
    Pages {
        prefix: String,
        limit: u32,
        put: Vec<(String, String)>,
        delete: Vec<String>,
    },
    Get(String),
    SetAlarm(i64),
    Alarm,
    Hold {
        entered: tokio::sync::oneshot::Sender<()>,
        release: tokio::sync::oneshot::Receiver<()>,
    },
    Meet(Arc<tokio::sync::Barrier>),
    PutThenPanic,
    /// Writes `kept` and an alarm, checkpoints, signals `entered`, waits for `release`, then
    /// writes `discarded` and fails.
    CheckpointThenFail {
        kept: String,
        discarded: String,
        entered: tokio::sync::oneshot::Sender<()>,
        release: tokio::sync::oneshot::Receiver<()>,
    },
    /// Writes `discarded` and an alarm, rolls back, then writes `kept`.
    PutRollbackPut {
        discarded: String,
        kept: String,
    },
}

#[derive(Debug, PartialEq)]
enum ScratchReply {
    None,
    Value(Option<String>),
    List(Vec<(String, String)>),
    Alarm(Option<i64>),
}

impl Actor for Scratch {
    const TYPE: &'static str = "scratch";
    type Call = ScratchCall;
    type Reply = ScratchReply;

    async fn call(&self, ctx: &mut ActorContext, call: ScratchCall) -> Result<ScratchReply> {
        Ok(match call {
            ScratchCall::PutThenFail { key, value } => {
                ctx.put(&key, &value)?;
                ctx.set_alarm(ctx.now_ms() + 1_000);
                assert_eq!(ctx.get::<String>(&key).await?, Some(value));
                return Err(Error::handler("deliberate failure"));
            }
            ScratchCall::CheckpointThenFail {
                kept,
                discarded,
                entered,
                release,
            } => {
                ctx.put(&kept, "k")?;
                ctx.set_alarm(ctx.now_ms() + 60_000);
                ctx.checkpoint().await?;
                assert_eq!(ctx.get::<String>(&kept).await?, Some("k".into()));
                let _ = entered.send(());
                let _ = release.await;
                ctx.put(&discarded, "d")?;
                return Err(Error::handler("deliberate failure after a checkpoint"));
            }
            ScratchCall::PutRollbackPut { discarded, kept } => {
                ctx.put(&discarded, "x")?;
                ctx.set_alarm(ctx.now_ms() + 1_000);
                ctx.rollback();
                assert_eq!(ctx.get::<String>(&discarded).await?, None);
                ctx.put(&kept, "y")?;
                ScratchReply::None
            }
            ScratchCall::Put { key, value } => {
                ctx.put(&key, &value)?;
                assert_eq!(ctx.get::<String>(&key).await?, Some(value));
                ScratchReply::None
            }
            ScratchCall::Delete(key) => {
                ctx.delete(&key);
                ScratchReply::None
            }
            ScratchCall::DeleteAll => {
                ctx.delete_all();
                ScratchReply::None
            }
            ScratchCall::List(prefix) => ScratchReply::List(ctx.list(&prefix).await?),
            ScratchCall::Pages {
                prefix,
                limit,
                put,
                delete,
            } => {
                for (k, v) in put {
                    ctx.put(&k, &v)?;
                }
                for k in delete {
                    ctx.delete(&k);
                }
                let mut walked = Vec::new();
                let mut after = String::new();
                loop {
                    let (page, next) = ctx.list_page::<String>(&prefix, &after, limit).await?;
                    assert!(
                        page.len() <= limit as usize + 3,
                        "a page reads at most its limit"
                    );
                    walked.extend(page);
                    match next {
                        Some(n) => after = n,
                        None => break,
                    }
                }
                assert_eq!(walked, ctx.list::<String>(&prefix).await?);
                ScratchReply::List(walked)
            }
            ScratchCall::Get(key) => ScratchReply::Value(ctx.get(&key).await?),
            ScratchCall::SetAlarm(at) => {
                ctx.set_alarm(at);
                ScratchReply::None
            }
            ScratchCall::Alarm => ScratchReply::Alarm(ctx.alarm().await?),
            ScratchCall::Hold { entered, release } => {
                let _ = entered.send(());
                let _ = release.await;
                ScratchReply::None
            }
            ScratchCall::PutThenPanic => {
                ctx.put("x", &"from a panicking call")?;
                panic!("handler panics on purpose");
            }
            ScratchCall::Meet(barrier) => {
                barrier.wait().await;
                ScratchReply::None
            }
        })
    }
}

fn put(key: &str, value: &str) -> ScratchCall {
    ScratchCall::Put {
        key: key.into(),
        value: value.into(),
    }
}

async fn calls_on_one_key_never_interleave(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let counter = OverlapCounter::default();
    sub.actors().register(counter.clone());
    // Property: for any mix of keys and callers, every increment lands exactly once and no two
    // calls on one key overlap.
    let cases: Vec<(usize, usize)> = {
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 6,
            ..ProptestConfig::default()
        });
        (0..6)
            .map(|_| {
                (1usize..5, 2usize..40)
                    .new_tree(&mut runner)
                    .unwrap()
                    .current()
            })
            .collect()
    };
    for (round, (keys, callers)) in cases.into_iter().enumerate() {
        let mut tasks = Vec::new();
        for c in 0..callers {
            let sub = sub.clone();
            let key = format!("r{round}-k{}", c % keys);
            tasks.push(tokio::spawn(async move {
                sub.actors()
                    .call::<OverlapCounter>(&key, CounterCall::Incr)
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        for k in 0..keys {
            let expected = (0..callers).filter(|c| c % keys == k).count() as i64;
            let got = sub
                .actors()
                .call::<OverlapCounter>(&format!("r{round}-k{k}"), CounterCall::Get)
                .await
                .unwrap();
            assert_eq!(got, expected, "round {round} key {k}");
        }
    }
    assert_eq!(counter.overlaps.load(Ordering::SeqCst), 0);
}

async fn calls_on_different_keys_run_concurrently(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    sub.actors().register(Scratch);
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    // Each call waits for the other: this completes only if both run at once.
    let a = sub
        .actors()
        .call::<Scratch>("a", ScratchCall::Meet(barrier.clone()));
    let b = sub
        .actors()
        .call::<Scratch>("b", ScratchCall::Meet(barrier));
    let (a, b) = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        tokio::join!(a, b)
    })
    .await
    .expect("calls on different keys deadlocked: they were serialized");
    a.unwrap();
    b.unwrap();
}

async fn point_reads_and_key_listing(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    sub.actors().register(Scratch);
    for key in ["k3", "k1", "k2"] {
        sub.actors()
            .call::<Scratch>(key, put("x", key))
            .await
            .unwrap();
    }
    let read: Option<String> = sub.actor_read("scratch", "k2", "x").await.unwrap();
    assert_eq!(read.as_deref(), Some("k2"));
    let missing: Option<String> = sub.actor_read("scratch", "k2", "y").await.unwrap();
    assert_eq!(missing, None);
    let failed = ScratchCall::PutThenFail {
        key: "z".into(),
        value: "v".into(),
    };
    sub.actors()
        .call::<Scratch>("k1", failed)
        .await
        .unwrap_err();
    let uncommitted: Option<String> = sub.actor_read("scratch", "k1", "z").await.unwrap();
    assert_eq!(uncommitted, None, "a failed call's write is never visible");
    assert_eq!(
        sub.actor_keys("scratch", "", 2).await.unwrap(),
        ["k1", "k2"]
    );
    assert_eq!(sub.actor_keys("scratch", "k2", 10).await.unwrap(), ["k3"]);
    assert!(sub.actor_keys("other", "", 10).await.unwrap().is_empty());
    // A scan pages through one actor's entries under a prefix, after a key.
    for k in ["ev/03", "ev/01", "ev/02", "ew/00", "eu/09"] {
        sub.actors().call::<Scratch>("k1", put(k, k)).await.unwrap();
    }
    let scan = |after: &'static str, limit| {
        let sub = sub.clone();
        async move {
            let rows: Vec<(String, String)> = sub
                .actor_scan("scratch", "k1", "ev/", after, limit)
                .await
                .unwrap();
            rows.into_iter().map(|(k, _)| k).collect::<Vec<_>>()
        }
    };
    assert_eq!(scan("", 10).await, ["ev/01", "ev/02", "ev/03"]);
    assert_eq!(scan("ev/01", 1).await, ["ev/02"]);
    assert!(scan("ev/03", 10).await.is_empty());
}

async fn rollback_discards_only_earlier_writes(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    sub.actors().register(Scratch);
    let actors = sub.actors();
    let call = ScratchCall::PutRollbackPut {
        discarded: "a".into(),
        kept: "b".into(),
    };
    actors.call::<Scratch>("k", call).await.unwrap();
    let listed = actors
        .call::<Scratch>("k", ScratchCall::List(String::new()))
        .await
        .unwrap();
    assert_eq!(listed, ScratchReply::List(vec![("b".into(), "y".into())]));
    let alarm = actors.call::<Scratch>("k", ScratchCall::Alarm).await;
    assert_eq!(alarm.unwrap(), ScratchReply::Alarm(None));
}

/// A checkpoint commits at once, visible to lock-free readers while the call still holds the
/// key; a later failure discards only what came after it.
async fn checkpoint_commits_while_the_call_goes_on(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    sub.actors().register(Scratch);
    let actors = sub.actors().clone();
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let (release, release_rx) = tokio::sync::oneshot::channel();
    let call = ScratchCall::CheckpointThenFail {
        kept: "a".into(),
        discarded: "b".into(),
        entered: entered_tx,
        release: release_rx,
    };
    let running = tokio::spawn(async move { actors.call::<Scratch>("k", call).await });
    entered.await.unwrap();
    let seen: Option<String> = sub.actor_read("scratch", "k", "a").await.unwrap();
    assert_eq!(
        seen.as_deref(),
        Some("k"),
        "the checkpoint is committed mid-call"
    );
    release.send(()).unwrap();
    assert!(running.await.unwrap().is_err());
    let actors = sub.actors();
    let listed = actors
        .call::<Scratch>("k", ScratchCall::List(String::new()))
        .await
        .unwrap();
    assert_eq!(listed, ScratchReply::List(vec![("a".into(), "k".into())]));
    let alarm = actors
        .call::<Scratch>("k", ScratchCall::Alarm)
        .await
        .unwrap();
    assert!(matches!(alarm, ScratchReply::Alarm(Some(_))), "{alarm:?}");
}

async fn failed_call_is_rolled_back(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    sub.actors().register(Scratch);
    let actors = sub.actors();
    actors.call::<Scratch>("k", put("x", "old")).await.unwrap();
    let err = actors
        .call::<Scratch>(
            "k",
            ScratchCall::PutThenFail {
                key: "x".into(),
                value: "new".into(),
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Handler(ref m) if m == "deliberate failure"),
        "{err}"
    );
    assert_eq!(
        actors
            .call::<Scratch>("k", ScratchCall::Get("x".into()))
            .await
            .unwrap(),
        ScratchReply::Value(Some("old".into()))
    );
    assert_eq!(
        actors
            .call::<Scratch>("k", ScratchCall::Alarm)
            .await
            .unwrap(),
        ScratchReply::Alarm(None),
        "the failed call's alarm must not commit"
    );
    let snap = sub.actor_snapshot("scratch", "k").await.unwrap();
    assert_eq!(snap.storage.len(), 1);
    assert!(snap.alarm.is_none());
    // A panic is contained: nothing is written, and the key (and, on PostgreSQL, its lock) is
    // free for the next call.
    let err = actors
        .call::<Scratch>("k", ScratchCall::PutThenPanic)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Internal(ref m) if m.contains("panicked")),
        "{err}"
    );
    assert_eq!(
        actors
            .call::<Scratch>("k", ScratchCall::Get("x".into()))
            .await
            .unwrap(),
        ScratchReply::Value(Some("old".into()))
    );
}

async fn storage_list_delete_and_delete_all(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    sub.actors().register(Scratch);
    let actors = sub.actors();
    for (k, v) in [("a/1", "x"), ("a/2", "y"), ("b/1", "z"), ("a/3", "w")] {
        actors.call::<Scratch>("k", put(k, v)).await.unwrap();
    }
    actors
        .call::<Scratch>("k", ScratchCall::Delete("a/2".into()))
        .await
        .unwrap();
    let listed = actors
        .call::<Scratch>("k", ScratchCall::List("a/".into()))
        .await
        .unwrap();
    assert_eq!(
        listed,
        ScratchReply::List(vec![("a/1".into(), "x".into()), ("a/3".into(), "w".into())])
    );
    // Another key sees nothing of this one.
    assert_eq!(
        actors
            .call::<Scratch>("other", ScratchCall::List("".into()))
            .await
            .unwrap(),
        ScratchReply::List(vec![])
    );
    actors
        .call::<Scratch>("k", ScratchCall::SetAlarm(common::T0 + 5_000))
        .await
        .unwrap();
    actors
        .call::<Scratch>("k", ScratchCall::DeleteAll)
        .await
        .unwrap();
    let snap = sub.actor_snapshot("scratch", "k").await.unwrap();
    assert!(snap.storage.is_empty());
    assert!(snap.alarm.is_none(), "delete_all removes the alarm too");
}

/// Paged listing walks the same entries as a whole listing, the call's own writes included.
async fn storage_pages(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    sub.actors().register(Scratch);
    let actors = sub.actors();
    for i in 1..=10 {
        actors
            .call::<Scratch>("k", put(&format!("a/{i:02}"), "c"))
            .await
            .unwrap();
    }
    actors.call::<Scratch>("k", put("b/1", "z")).await.unwrap();
    actors
        .call::<Scratch>("k", put("0", "before"))
        .await
        .unwrap();
    for limit in [1, 3, 10, 50] {
        let reply = actors
            .call::<Scratch>(
                "k",
                ScratchCall::Pages {
                    prefix: "a/".into(),
                    limit,
                    put: vec![
                        ("a/05x".into(), "new".into()),
                        ("a/99".into(), "end".into()),
                    ],
                    delete: vec!["a/03".into(), "a/04".into(), "a/05".into()],
                },
            )
            .await
            .unwrap();
        let ScratchReply::List(walked) = reply else {
            panic!("a list")
        };
        let keys: Vec<&str> = walked.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "a/01", "a/02", "a/05x", "a/06", "a/07", "a/08", "a/09", "a/10", "a/99"
            ],
            "limit {limit}"
        );
    }
}

async fn backlog_beyond_limit_is_overloaded(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env
        .open_with(Tuning {
            actor_max_backlog: 2,
            ..Tuning::default()
        })
        .await;
    sub.actors().register(Scratch);
    let actors = sub.actors().clone();
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let (release, hold) = tokio::sync::oneshot::channel();
    let holder = tokio::spawn({
        let actors = actors.clone();
        async move {
            actors
                .call::<Scratch>(
                    "hot",
                    ScratchCall::Hold {
                        entered: entered_tx,
                        release: hold,
                    },
                )
                .await
        }
    });
    entered.await.unwrap();
    // The second call is admitted on its first poll and then waits for the key.
    let mut second = Box::pin(actors.call::<Scratch>("hot", put("a", "1")));
    assert!(futures::poll!(&mut second).is_pending());
    let refused = actors
        .call::<Scratch>("hot", put("b", "2"))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, Error::Overloaded { backlog: 2, .. }),
        "{refused}"
    );
    // Other keys are unaffected.
    actors.call::<Scratch>("cold", put("c", "3")).await.unwrap();
    release.send(()).unwrap();
    holder.await.unwrap().unwrap();
    second.await.unwrap();
    assert_eq!(
        actors
            .call::<Scratch>("hot", ScratchCall::Get("b".into()))
            .await
            .unwrap(),
        ScratchReply::Value(None),
        "the refused call wrote nothing"
    );
}

on_every_backend!(
    calls_on_one_key_never_interleave,
    calls_on_different_keys_run_concurrently,
    failed_call_is_rolled_back,
    checkpoint_commits_while_the_call_goes_on,
    rollback_discards_only_earlier_writes,
    point_reads_and_key_listing,
    storage_list_delete_and_delete_all,
    storage_pages,
    backlog_beyond_limit_is_overloaded,
);
