//! Queue drain against a backlog: how fast a consumer takes messages off the head of a queue
//! when 5,000 or 200,000 messages wait behind it. A claim reads only the head of the ready index
//! (a LIMITed scan), so the two rates should be close (target: within 2×).

use std::time::{Duration, Instant};

use kilocloud_substrate::{Consumer, Delivery, MAX_BATCH_MESSAGES, QueueConfig, Substrate};

use crate::report::rate;
use crate::{Args, Backend};

struct Ack;

#[async_trait::async_trait]
impl Consumer for Ack {
    async fn handle(&self, _: &Delivery) -> kilocloud_substrate::Result<()> {
        Ok(())
    }
}

/// Fills `queue` with `backlog` messages, then drains the first `measured` of them with
/// `process_batch` (claim 256, ack each); returns msg/s of the drain.
async fn drain(
    sub: &Substrate,
    queue: &str,
    backlog: usize,
    measured: usize,
) -> anyhow::Result<f64> {
    sub.queues().declare(QueueConfig {
        batch_size: 256,
        ..QueueConfig::new(queue)
    })?;
    let batch: Vec<serde_json::Value> = (0..MAX_BATCH_MESSAGES)
        .map(|i| serde_json::json!({ "n": i, "pad": "x".repeat(64) }))
        .collect();
    for _ in 0..backlog.div_ceil(MAX_BATCH_MESSAGES) {
        sub.queues().send_batch(queue, &batch, 0).await?;
    }
    let started = Instant::now();
    let mut drained = 0;
    while drained < measured {
        let n = sub.queues().process_batch(queue, &Ack).await?;
        anyhow::ensure!(n > 0, "queue {queue} ran dry after {drained} messages");
        drained += n;
    }
    Ok(rate(drained as u64, started.elapsed()))
}

/// The report section.
pub async fn run(args: &Args) -> anyhow::Result<String> {
    let (small, large, measured) = if args.quick {
        (2_000, 20_000, 1_000)
    } else {
        (5_000, 200_000, 5_000)
    };
    let mut s = format!(
        "### Queue drain against a backlog (claim 256, ack each; first {measured} messages)\n\n\
         | backend | backlog {small} msg/s | backlog {large} msg/s | ratio |\n|---|---:|---:|---:|\n"
    );
    for postgres in [false, true] {
        let b = Backend::open(postgres).await?;
        let r_small = drain(&b.substrate, "drain-small", small, measured).await?;
        let r_large = drain(&b.substrate, "drain-large", large, measured).await?;
        b.substrate.shutdown(Duration::from_secs(10)).await;
        s += &format!(
            "| {} | {r_small:.0} | {r_large:.0} | {:.2}× |\n",
            b.name,
            r_small / r_large
        );
    }
    s.push('\n');
    Ok(s)
}
