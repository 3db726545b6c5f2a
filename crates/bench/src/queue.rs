//! Queue: send → deliver → ack with a durable commit at each step, 1 and 8 producers, and a
//! paced 1,000 msg/s run for latency; on SQLite, PostgreSQL and NATS JetStream (file storage,
//! explicit acks) in the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use kilocloud_substrate::{Consumer, Delivery, QueueConfig, Substrate};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::report::{histogram, p50_p99, rate};
use crate::{Args, Backend};

#[derive(Serialize, Deserialize)]
struct Msg {
    /// Send start, µs since the Unix epoch.
    sent_us: u64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// One measured scenario.
struct Outcome {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Counts deliveries and records send → deliver latency; wakes the waiter at `target`.
struct Recorder {
    hist: std::sync::Mutex<hdrhistogram::Histogram<u64>>,
    delivered: AtomicU64,
    target: AtomicU64,
    done: Notify,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            hist: std::sync::Mutex::new(histogram()),
            delivered: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            done: Notify::new(),
        })
    }

    pub fn record(&self, sent_us: u64) {
        let lat = now_us().saturating_sub(sent_us).max(1);
        let _ = self.hist.lock().unwrap().record(lat);
        if self.delivered.fetch_add(1, Ordering::SeqCst) + 1 == self.target.load(Ordering::SeqCst) {
            self.done.notify_one();
        }
    }

    /// Resets for a run of `n` messages.
    pub fn reset(&self, n: u64) {
        self.hist.lock().unwrap().reset();
        self.delivered.store(0, Ordering::SeqCst);
        self.target.store(n, Ordering::SeqCst);
    }
}

struct BenchConsumer(Arc<Recorder>);

#[async_trait::async_trait]
impl Consumer for BenchConsumer {
    async fn handle(&self, d: &Delivery) -> kilocloud_substrate::Result<()> {
        let m: Msg = d.body()?;
        self.0.record(m.sent_us);
        Ok(())
    }
}

/// Runs `producers` tasks sending `n` messages in total through `send`, waits for delivery of
/// all, and returns the outcome.
async fn run_scenario<F, Fut>(rec: &Arc<Recorder>, producers: usize, n: u64, send: F) -> Outcome
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    rec.reset(n);
    let start = Instant::now();
    let per = n / producers as u64;
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let send = send.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                send().await;
            }
        }));
    }
    rec.done.notified().await;
    let elapsed = start.elapsed();
    for t in tasks {
        t.await.unwrap();
    }
    let (p50_ms, p99_ms) = p50_p99(&rec.hist.lock().unwrap());
    Outcome {
        rate: rate(n, elapsed),
        p50_ms,
        p99_ms,
    }
}

/// Sends at `per_sec` for `secs` from one producer; returns the latency outcome.
async fn run_paced<F, Fut>(rec: &Arc<Recorder>, per_sec: u64, secs: u64, send: F) -> Outcome
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let n = per_sec * secs;
    rec.reset(n);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    for _ in 0..n {
        tick.tick().await;
        send().await;
    }
    rec.done.notified().await;
    let (p50_ms, p99_ms) = p50_p99(&rec.hist.lock().unwrap());
    Outcome {
        rate: rate(n, start.elapsed()),
        p50_ms,
        p99_ms,
    }
}

/// The three scenarios, in order: 1 producer, 8 producers, paced 1,000 msg/s.
async fn run_all<F, Fut>(rec: &Arc<Recorder>, args: &Args, send: F) -> Vec<Outcome>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut out = Vec::new();
    for (producers, n) in [
        (1, if args.quick { 2_000 } else { 20_000 }),
        (8, if args.quick { 8_000 } else { 80_000 }),
    ] {
        out.push(run_scenario(rec, producers, n, send.clone()).await);
    }
    out.push(run_paced(rec, 1_000, if args.quick { 2 } else { 10 }, send).await);
    out
}

async fn substrate_queue(sub: &Substrate, args: &Args) -> anyhow::Result<Vec<Outcome>> {
    let rec = Recorder::new();
    sub.queues().declare(QueueConfig {
        batch_size: 256,
        concurrency: 256,
        ..QueueConfig::new("bench")
    })?;
    sub.start_consumer("bench", Arc::new(BenchConsumer(rec.clone())));
    let s = sub.clone();
    let out = run_all(&rec, args, move || {
        let s = s.clone();
        async move {
            s.queues()
                .send("bench", &Msg { sent_us: now_us() }, 0)
                .await
                .unwrap();
        }
    })
    .await;
    Ok(out)
}

async fn nats_queue(args: &Args) -> anyhow::Result<Vec<Outcome>> {
    use async_nats::jetstream::{self, consumer, stream};
    let client = async_nats::connect(&args.nats).await?;
    let js = jetstream::new(client);
    let _ = js.delete_stream("KCBENCH").await;
    let stream = js
        .create_stream(stream::Config {
            name: "KCBENCH".into(),
            subjects: vec!["kcbench".into()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await?;
    let rec = Recorder::new();
    let consumer_rec = rec.clone();
    let consuming = tokio::spawn(async move {
        let mut messages = consumer.messages().await.expect("consume");
        while let Some(Ok(m)) = messages.next().await {
            let body: Msg = serde_json::from_slice(&m.payload).expect("json");
            consumer_rec.record(body.sent_us);
            m.ack().await.expect("ack");
        }
    });
    let publisher = js.clone();
    let out = run_all(&rec, args, move || {
        let js = publisher.clone();
        async move {
            let body = serde_json::to_vec(&Msg { sent_us: now_us() }).unwrap();
            js.publish("kcbench", body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    })
    .await;
    consuming.abort();
    let _ = js.delete_stream("KCBENCH").await;
    Ok(out)
}

/// Runs the queue group and returns its Markdown section.
pub async fn run(args: &Args) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    for postgres in [false, true] {
        let b = Backend::open(postgres).await?;
        let r = substrate_queue(&b.substrate, args).await?;
        b.substrate.shutdown(Duration::from_secs(10)).await;
        rows.push((b.name, r));
    }
    rows.push(("NATS JetStream (reference)", nats_queue(args).await?));
    let mut s = String::from(
        "### Queue: send → deliver → ack (durable commit per send, per ack)\n\n\
         | system | 1 producer msg/s | p50 / p99 send→deliver ms | 8 producers msg/s | p50 / p99 ms | paced 1,000 msg/s p50 / p99 ms |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for (name, r) in &rows {
        s += &format!(
            "| {name} | {:.0} | {:.2} / {:.2} | {:.0} | {:.2} / {:.2} | {:.2} / {:.2} |\n",
            r[0].rate,
            r[0].p50_ms,
            r[0].p99_ms,
            r[1].rate,
            r[1].p50_ms,
            r[1].p99_ms,
            r[2].p50_ms,
            r[2].p99_ms
        );
    }
    let nats = &rows[2].1;
    s += &format!(
        "\nRatio to JetStream (throughput, 8 producers): SQLite {:.2}×, PostgreSQL {:.2}×.\n\n",
        rows[0].1[1].rate / nats[1].rate,
        rows[1].1[1].rate / nats[1].rate
    );
    Ok(s)
}
