//! Crash test: a real `kilocloud serve` is SIGKILLed at random moments under queue traffic,
//! actor writes and alarms, 20 times, then restarted; nothing acknowledged is lost and every
//! message ends acked or dead-lettered. On SQLite and PostgreSQL.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Node, Store};
use rand::Rng;
use serde_json::json;

const KILLS: usize = 20;
const KEYS: usize = 8;

/// What the server acknowledged (HTTP success) before it was killed.
#[derive(Default)]
struct Acked {
    /// Probe messages accepted: token → (key, should fail).
    messages: BTreeMap<String, (String, bool)>,
    /// Direct actor writes acknowledged: token → key.
    writes: BTreeMap<String, String>,
    /// Alarms accepted: actor key → scheduled time.
    alarms: BTreeMap<String, i64>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Drives traffic from `workers` tasks until `budget` operations were acknowledged, then kills
/// the node while requests are still in flight.
async fn drive_then_kill(node: &mut Node, round: usize, acked: Arc<Mutex<Acked>>) {
    let budget = rand::rng().random_range(10..120);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let reached = Arc::new(tokio::sync::Notify::new());
    let mut workers = Vec::new();
    for w in 0..6 {
        let (http, base) = (node.http.clone(), node.base.clone());
        let (acked, done, stop) = (acked.clone(), done.clone(), stop.clone());
        let reached = reached.clone();
        workers.push(tokio::spawn(async move {
            let client = Node::detached(http, base);
            for seq in 0.. {
                let token = format!("r{round}w{w}s{seq}");
                let key = format!("k{}", seq % KEYS);
                let op = seq % 10;
                let ok = tokio::select! {
                    _ = stop.notified() => return,
                    ok = async {
                        match op {
                            0..=5 => {
                                let fail = op == 5 && seq % 20 == 5;
                                let r = client.post("/api/admin/queues/probe/messages",
                                    json!({"key": key, "token": token, "fail": fail})).await;
                                let ok = r.map(|r| r.status().as_u16() == 202).unwrap_or(false);
                                if ok { acked.lock().unwrap().messages.insert(token, (key, fail)); }
                                ok
                            }
                            6..=8 => {
                                let r = client.post(&format!("/api/admin/probe/{key}"), json!({"token": token})).await;
                                let ok = r.map(|r| r.status().is_success()).unwrap_or(false);
                                if ok { acked.lock().unwrap().writes.insert(token, key); }
                                ok
                            }
                            _ => {
                                let akey = format!("alarm-{token}");
                                let at = now_ms() + 200;
                                let r = client.post(&format!("/api/admin/probe/{akey}/alarm"), json!({"at_ms": at})).await;
                                let ok = r.map(|r| r.status().is_success()).unwrap_or(false);
                                if ok { acked.lock().unwrap().alarms.insert(akey, at); }
                                ok
                            }
                        }
                    } => ok,
                };
                if !ok {
                    return; // the server is gone
                }
                if done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == budget {
                    reached.notify_one();
                }
            }
        }));
    }
    reached.notified().await;
    // Kill with requests in flight.
    node.sigkill();
    stop.notify_waiters();
    for w in workers {
        let _ = w.await;
    }
}

async fn crash_loses_nothing(store: Store) {
    let acked = Arc::new(Mutex::new(Acked::default()));
    for round in 0..KILLS {
        let mut node = Node::start(&store, &format!("round-{round}.log"));
        drive_then_kill(&mut node, round, acked.clone()).await;
    }
    let node = Node::start(&store, "final.log");
    // Everything settles: no message left in the queue, every alarm fired.
    node.wait_until("probe queue drained", Duration::from_secs(120), || async {
        let q = node.queue("probe").await;
        q["ready"] == 0 && q["delayed"] == 0 && q["in_flight"] == 0
    })
    .await;
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        acked.messages.len() >= KILLS,
        "the test drove too little traffic"
    );
    for (akey, at) in &acked.alarms {
        let akey = akey.clone();
        let at = *at;
        node.wait_until("acknowledged alarm fired", Duration::from_secs(120), || {
            let akey = akey.clone();
            let node = &node;
            async move {
                node.actor(&akey).await["storage"][format!("alarm/{at}")]
                    .as_i64()
                    .unwrap_or(0)
                    >= 1
            }
        })
        .await;
    }
    let dead: BTreeSet<String> = node
        .dead_letters("probe")
        .await
        .into_iter()
        .map(|d| d["body"]["token"].as_str().unwrap().to_owned())
        .collect();
    let mut actors = BTreeMap::new();
    for k in 0..KEYS {
        let key = format!("k{k}");
        actors.insert(key.clone(), node.actor(&key).await["storage"].clone());
    }
    for (token, (key, fail)) in &acked.messages {
        let recorded = actors[key][format!("t/{token}")] == true;
        if *fail {
            assert!(
                dead.contains(token),
                "failing message {token} must be dead-lettered"
            );
            assert!(!recorded);
        } else {
            assert!(
                recorded || dead.contains(token),
                "acknowledged message {token} was neither handled nor dead-lettered"
            );
        }
    }
    for (token, key) in &acked.writes {
        assert_eq!(
            actors[key][format!("t/{token}")],
            true,
            "acknowledged write {token} lost"
        );
    }
    // No torn commits: each actor's count equals its recorded tokens.
    for (key, storage) in &actors {
        let tokens = storage
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with("t/"))
            .count() as i64;
        assert_eq!(
            storage["count"].as_i64().unwrap_or(0),
            tokens,
            "actor {key}"
        );
    }
    eprintln!(
        "crash test: {KILLS} kills; acked {} messages, {} writes, {} alarms; {} dead letters",
        acked.messages.len(),
        acked.writes.len(),
        acked.alarms.len(),
        dead.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_crash_loses_nothing() {
    crash_loses_nothing(Store::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_loses_nothing() {
    crash_loses_nothing(Store::postgres().await).await;
}
