//! The probe: a synthetic workload that exercises the substrate end to end (HTTP → queue →
//! consumer → actor → alarm) so operators can check a deployment, and so the crash and
//! multi-node tests drive a real `kilocloud serve` through its public admin API.
//!
//! - Queue `probe`: messages `{"key": "...", "token": "...", "fail": false, "hold_ms": 0}`. The
//!   consumer waits `hold_ms` (a slow handler), then records `token` on the probe actor `key`,
//!   or fails when `fail` is true (exercising retries and the dead-letter queue).
//! - Actor `probe`: storage `count` (distinct tokens recorded), `t/<token>` (true),
//!   `deliveries/<token>` (how many times the consumer handled it; 1 unless a node died or a
//!   visibility timeout expired mid-handling), and for each alarm run `alarm/<scheduled_at>`
//!   (successful runs of that firing; 1 unless a node died mid-run).

use std::sync::Arc;

use async_trait::async_trait;
use kilocloud_substrate::{
    Actor, ActorContext, AlarmInfo, Consumer, Delivery, Error, QueueConfig, Result, Substrate,
};
use serde::{Deserialize, Serialize};

/// The probe queue's name.
pub const PROBE_QUEUE: &str = "probe";

/// A probe queue message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeMessage {
    /// Probe actor key to record on.
    pub key: String,
    /// Token to record (idempotency key).
    pub token: String,
    /// Fail instead of recording (to exercise retries and dead-lettering).
    #[serde(default)]
    pub fail: bool,
    /// Wait this long before recording, ms (simulates a slow handler). At most 60,000.
    #[serde(default)]
    pub hold_ms: u64,
}

/// A call on the probe actor.
#[derive(Debug, Clone)]
pub enum ProbeCall {
    /// Record a token; returns the number of distinct tokens.
    Record(String),
    /// Record a token delivered by the queue and count the delivery.
    Deliver(String),
    /// Set the alarm to `at_ms`; returns the current count.
    SetAlarm(i64),
}

/// The probe actor.
pub struct ProbeActor;

impl Actor for ProbeActor {
    const TYPE: &'static str = "probe";
    type Call = ProbeCall;
    type Reply = i64;

    async fn call(&self, ctx: &mut ActorContext, call: ProbeCall) -> Result<i64> {
        let count: i64 = ctx.get("count").await?.unwrap_or(0);
        match call {
            ProbeCall::Record(token) => record(ctx, count, &token).await,
            ProbeCall::Deliver(token) => {
                let key = format!("deliveries/{token}");
                let n: i64 = ctx.get(&key).await?.unwrap_or(0);
                ctx.put(&key, &(n + 1))?;
                record(ctx, count, &token).await
            }
            ProbeCall::SetAlarm(at) => {
                ctx.set_alarm(at);
                Ok(count)
            }
        }
    }

    async fn alarm(&self, ctx: &mut ActorContext, alarm: AlarmInfo) -> Result<()> {
        let key = format!("alarm/{}", alarm.scheduled_at);
        let runs: i64 = ctx.get(&key).await?.unwrap_or(0);
        ctx.put(&key, &(runs + 1))
    }
}

/// Records `token` once; returns the number of distinct tokens.
async fn record(ctx: &mut ActorContext, count: i64, token: &str) -> Result<i64> {
    let key = format!("t/{token}");
    if ctx.get::<bool>(&key).await?.is_some() {
        return Ok(count);
    }
    ctx.put(&key, &true)?;
    ctx.put("count", &(count + 1))?;
    Ok(count + 1)
}

/// Consumer of the probe queue.
pub struct ProbeConsumer {
    substrate: Substrate,
}

#[async_trait]
impl Consumer for ProbeConsumer {
    async fn handle(&self, delivery: &Delivery) -> Result<()> {
        let msg: ProbeMessage = delivery.body()?;
        if msg.fail {
            return Err(Error::handler(format!(
                "probe message {} asked to fail",
                msg.token
            )));
        }
        if msg.hold_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(msg.hold_ms.min(60_000))).await;
        }
        self.substrate
            .actors()
            .call::<ProbeActor>(&msg.key, ProbeCall::Deliver(msg.token))
            .await?;
        Ok(())
    }
}

/// Registers the probe actor and declares the probe queue.
pub fn register(substrate: &Substrate) -> Result<()> {
    substrate.actors().register(ProbeActor);
    substrate.queues().declare(QueueConfig {
        max_attempts: 3,
        retry_base_ms: 200,
        ..QueueConfig::new(PROBE_QUEUE)
    })
}

/// Starts the probe queue's consumer on this node.
pub fn start(substrate: &Substrate) {
    substrate.start_consumer(
        PROBE_QUEUE,
        Arc::new(ProbeConsumer {
            substrate: substrate.clone(),
        }),
    );
}
