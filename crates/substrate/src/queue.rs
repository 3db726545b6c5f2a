//! Named durable queues with visibility timeouts, retries and a dead-letter queue.
//!
//! Semantics follow Cloudflare Queues (DESIGN.md §3): JSON messages up to [`MAX_MESSAGE_BYTES`],
//! optional delivery delay up to [`MAX_DELAY_MS`], at-least-once delivery. A received message is
//! hidden from other consumers for the queue's visibility timeout, which the consumer loop
//! extends while its handler runs (a heartbeat every third of the timeout); the consumer acks
//! it, or retries it with a delay and an error. Attempts are counted at claim, but only
//! *failed* deliveries (a handler error, or a visibility timeout that expired while the node
//! was alive: a hung handler) count towards `max_attempts`; a delivery whose node died is
//! released by the takeover and costs nothing. After `max_attempts` failures the message moves
//! to the dead-letter queue with its last error, where it can be listed, replayed or deleted;
//! one that was delivered [`DELIVERIES_PER_ATTEMPT`] × `max_attempts` times without any
//! recorded outcome (it keeps crashing its node) is dead-lettered too.
//!
//! A delivery's receipt is `(id, attempts)`: an ack or retry from a consumer whose visibility
//! timeout expired and whose message was delivered again is recognised as stale and ignored.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{Clock, UnixMs};
use crate::error::{Error, Result};
use crate::store::{Backend, ClaimRequest, DeadLetter, QueueStats, RetryOutcome, RetryRequest};

/// Largest message body, bytes of serialized JSON (128 KiB, as Cloudflare Queues).
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;
/// Longest delivery delay, ms (24 h).
pub const MAX_DELAY_MS: u64 = 24 * 60 * 60 * 1000;
/// Most messages in one [`Queues::send_batch`] (as Cloudflare Queues' `sendBatch`).
pub const MAX_BATCH_MESSAGES: usize = 100;
/// Longest default retry backoff, ms (10 min).
pub const MAX_RETRY_BACKOFF_MS: u64 = 10 * 60 * 1000;
/// Deliveries allowed per allowed failure before a message whose consumers keep disappearing
/// without an outcome is dead-lettered anyway (a poison message that crashes its node).
pub const DELIVERIES_PER_ATTEMPT: u32 = 3;

/// Settings of one queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue name.
    pub name: String,
    /// Failed deliveries (handler errors, expired visibility timeouts) before a message is
    /// dead-lettered. Default 3.
    pub max_attempts: u32,
    /// How long a delivery hides the message from other consumers, ms. Default 30,000. The
    /// consumer loop extends it while the handler runs, so it bounds how long a *hung* node
    /// holds a message, not how long a handler may take.
    pub visibility_timeout_ms: u64,
    /// Base of the default retry backoff (`base × 2^(attempts−1)`, capped at 10 min), ms.
    /// Default 1,000.
    pub retry_base_ms: u64,
    /// Most messages one receive claims. Default 32.
    pub batch_size: u32,
    /// Most messages a node's consumer handles at once. Default 16.
    pub concurrency: usize,
}

impl QueueConfig {
    /// A queue with the defaults above.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            max_attempts: 3,
            visibility_timeout_ms: 30_000,
            retry_base_ms: 1_000,
            batch_size: 32,
            concurrency: 16,
        }
    }
}

/// One delivery of a message to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Queue it came from.
    pub queue: String,
    /// Message id.
    pub id: i64,
    /// Deliveries including this one (1 on the first).
    pub attempts: u32,
    /// First send time, ms since epoch.
    pub enqueued_at: UnixMs,
    body: Vec<u8>,
}

impl Delivery {
    /// Decodes the JSON body. Errors: [`Error::Serde`].
    pub fn body<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// The raw JSON bytes.
    pub fn raw(&self) -> &[u8] {
        &self.body
    }
}

/// Handles messages of one queue. `Ok` acks; `Err` retries with the queue's backoff (or
/// dead-letters after `max_attempts`).
#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// Processes one delivery. Must be idempotent: delivery is at least once.
    async fn handle(&self, delivery: &Delivery) -> Result<()>;
}

/// A declared queue: its settings and the notifier that wakes its local consumer on send.
type QueueEntry = (Arc<QueueConfig>, Arc<Notify>);

/// All queues of this node.
pub struct Queues {
    backend: Arc<dyn Backend>,
    clock: Arc<dyn Clock>,
    node_id: String,
    /// This node may claim only while `now <= lease` (see `Substrate` node liveness).
    lease: Arc<std::sync::atomic::AtomicI64>,
    configs: std::sync::RwLock<HashMap<String, QueueEntry>>,
}

impl Queues {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        clock: Arc<dyn Clock>,
        node_id: String,
        lease: Arc<std::sync::atomic::AtomicI64>,
    ) -> Self {
        Self {
            backend,
            clock,
            node_id,
            lease,
            configs: Default::default(),
        }
    }

    /// Declares a queue (or replaces its settings; a running consumer keeps the settings it
    /// started with). Sending to an undeclared queue fails.
    ///
    /// Errors: [`Error::Invalid`] when a setting is out of range: `max_attempts`, `batch_size`
    /// and `concurrency` must be at least 1, `visibility_timeout_ms` at least 1,000 and at most
    /// 12 h (Cloudflare Queues' maximum).
    pub fn declare(&self, config: QueueConfig) -> Result<()> {
        let invalid = |message: String| Error::Invalid {
            what: "queue settings",
            message: format!("queue {:?}: {message}", config.name),
        };
        if config.max_attempts == 0 || config.batch_size == 0 || config.concurrency == 0 {
            return Err(invalid(
                "max_attempts, batch_size and concurrency must be at least 1".into(),
            ));
        }
        if !(1_000..=12 * 3_600_000).contains(&config.visibility_timeout_ms) {
            return Err(invalid(format!(
                "visibility_timeout_ms must be between 1000 and 43200000, not {}",
                config.visibility_timeout_ms
            )));
        }
        let mut configs = self.configs.write().unwrap();
        let wake = configs
            .get(&config.name)
            .map(|(_, w)| w.clone())
            .unwrap_or_default();
        configs.insert(config.name.clone(), (Arc::new(config), wake));
        Ok(())
    }

    /// Settings of a declared queue. Errors: [`Error::NotFound`].
    pub fn config(&self, queue: &str) -> Result<Arc<QueueConfig>> {
        self.entry(queue).map(|(c, _)| c)
    }

    /// Declared queue names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<_> = self.configs.read().unwrap().keys().cloned().collect();
        n.sort();
        n
    }

    fn entry(&self, queue: &str) -> Result<QueueEntry> {
        self.configs
            .read()
            .unwrap()
            .get(queue)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                what: "queue",
                name: queue.to_owned(),
            })
    }

    /// Wakes this node's consumer of `queue`, if any (a signal from another node).
    pub(crate) fn wake(&self, queue: &str) {
        if let Ok((_, wake)) = self.entry(queue) {
            wake.notify_one();
        }
    }

    /// Sends one message, deliverable after `delay_ms`. Returns its id once it is committed.
    ///
    /// Errors: [`Error::MessageTooLarge`], [`Error::DelayTooLong`], [`Error::NotFound`] for an
    /// undeclared queue; nothing is enqueued on error.
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        queue: &str,
        body: &T,
        delay_ms: u64,
    ) -> Result<i64> {
        Ok(self.send_batch(queue, &[body], delay_ms).await?[0])
    }

    /// Sends up to [`MAX_BATCH_MESSAGES`] messages atomically (all or none), in order. Same
    /// errors as [`Self::send`], and [`Error::Invalid`] for a larger batch.
    pub async fn send_batch<T: Serialize>(
        &self,
        queue: &str,
        bodies: &[T],
        delay_ms: u64,
    ) -> Result<Vec<i64>> {
        let (_, wake) = self.entry(queue)?;
        if bodies.len() > MAX_BATCH_MESSAGES {
            return Err(Error::Invalid {
                what: "batch",
                message: format!(
                    "{} messages; at most {MAX_BATCH_MESSAGES} per batch",
                    bodies.len()
                ),
            });
        }
        if delay_ms > MAX_DELAY_MS {
            return Err(Error::DelayTooLong {
                delay_ms,
                max_ms: MAX_DELAY_MS,
            });
        }
        let encoded = bodies
            .iter()
            .map(|b| {
                let bytes = serde_json::to_vec(b)?;
                if bytes.len() > MAX_MESSAGE_BYTES {
                    return Err(Error::MessageTooLarge {
                        size: bytes.len(),
                        limit: MAX_MESSAGE_BYTES,
                    });
                }
                Ok(bytes)
            })
            .collect::<Result<Vec<_>>>()?;
        let now = self.clock.now_ms();
        let ids = self
            .backend
            .queue_send(queue, encoded, now, now + delay_ms as i64)
            .await?;
        metrics::counter!("kilocloud_queue_sent_total", "queue" => queue.to_owned())
            .increment(ids.len() as u64);
        if delay_ms == 0 {
            wake.notify_one();
        }
        Ok(ids)
    }

    /// Claims up to `max` deliverable messages for this node, hiding them for the queue's
    /// visibility timeout. Returns nothing while this node's heartbeats are failing.
    pub async fn receive(&self, queue: &str, max: u32) -> Result<Vec<Delivery>> {
        let (config, _) = self.entry(queue)?;
        if self.clock.now_ms() > self.lease.load(std::sync::atomic::Ordering::SeqCst) {
            // Heartbeats are failing: other nodes may soon take this node's work over, so it
            // takes no more.
            return Ok(Vec::new());
        }
        let claimed = self
            .backend
            .queue_claim(ClaimRequest {
                queue,
                node: &self.node_id,
                now: self.clock.now_ms(),
                limit: max,
                visibility_timeout_ms: config.visibility_timeout_ms as i64,
                max_attempts: config.max_attempts,
                max_deliveries: config.max_attempts.saturating_mul(DELIVERIES_PER_ATTEMPT),
            })
            .await?;
        Ok(claimed
            .into_iter()
            .map(|m| Delivery {
                queue: queue.to_owned(),
                id: m.id,
                attempts: m.attempts,
                enqueued_at: m.enqueued_at,
                body: m.body,
            })
            .collect())
    }

    /// Acknowledges a delivery: the message is deleted. Returns false when the receipt is stale
    /// (the visibility timeout expired and the message was delivered again or dead-lettered).
    pub async fn ack(&self, delivery: &Delivery) -> Result<bool> {
        let acked = self
            .backend
            .queue_ack(&delivery.queue, delivery.id, delivery.attempts)
            .await?;
        if acked {
            metrics::counter!("kilocloud_queue_acked_total", "queue" => delivery.queue.clone())
                .increment(1);
        }
        Ok(acked)
    }

    /// Deletes message `id` of `queue` if no consumer has received it yet (an outbox entry whose
    /// work was done another way). Returns whether it was deleted: false once it has been
    /// delivered (its consumer then decides) or when there is no such message.
    pub async fn cancel(&self, queue: &str, id: i64) -> Result<bool> {
        // Never delivered = zero attempts, the receipt `queue_ack` checks.
        self.backend.queue_ack(queue, id, 0).await
    }

    /// Gives a delivery back with `error`: it is delivered again after `delay_ms` (default: the
    /// queue's exponential backoff), or dead-lettered when this is its `max_attempts`th failure.
    pub async fn retry(
        &self,
        delivery: &Delivery,
        delay_ms: Option<u64>,
        error: &str,
    ) -> Result<RetryOutcome> {
        let (config, _) = self.entry(&delivery.queue)?;
        let delay = delay_ms
            .unwrap_or_else(|| {
                config
                    .retry_base_ms
                    .saturating_mul(1u64 << (delivery.attempts.saturating_sub(1)).min(30))
                    .min(MAX_RETRY_BACKOFF_MS)
            })
            .min(MAX_DELAY_MS);
        let now = self.clock.now_ms();
        let outcome = self
            .backend
            .queue_retry(RetryRequest {
                queue: &delivery.queue,
                id: delivery.id,
                attempts: delivery.attempts,
                visible_at: now + delay as i64,
                error,
                max_attempts: config.max_attempts,
                now,
            })
            .await?;
        if outcome == RetryOutcome::DeadLettered {
            tracing::warn!(queue = %delivery.queue, id = delivery.id, attempts = delivery.attempts,
                error, "message dead-lettered");
            metrics::counter!("kilocloud_queue_dead_lettered_total", "queue" => delivery.queue.clone())
                .increment(1);
        }
        Ok(outcome)
    }

    /// Extends a delivery's visibility timeout by the queue's timeout from now, while its
    /// handler still runs. Returns false when the receipt is stale (the message was taken over
    /// or settled meanwhile). The consumer loop calls this itself; handlers need not.
    pub async fn extend(&self, delivery: &Delivery) -> Result<bool> {
        let (config, _) = self.entry(&delivery.queue)?;
        self.backend
            .queue_extend(
                &delivery.queue,
                delivery.id,
                delivery.attempts,
                &self.node_id,
                self.clock.now_ms() + config.visibility_timeout_ms as i64,
            )
            .await
    }

    /// Errors with [`Error::NotFound`] unless `queue` is declared on this node or has messages
    /// or dead letters (operator commands run without the services' declarations).
    async fn known(&self, queue: &str) -> Result<()> {
        if self.entry(queue).is_ok() || self.backend.queue_exists(queue).await? {
            Ok(())
        } else {
            Err(Error::NotFound {
                what: "queue",
                name: queue.to_owned(),
            })
        }
    }

    /// Dead-lettered messages of `queue` with id above `after`, oldest first, at most `limit`.
    /// Errors: [`Error::NotFound`] for a queue that is neither declared nor has rows.
    pub async fn dead_letters(
        &self,
        queue: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>> {
        self.known(queue).await?;
        self.backend.dlq_list(queue, after, limit).await
    }

    /// Deletes dead letters of `queue` (all when `ids` is `None`: a purge). Returns how many
    /// were deleted. Errors: [`Error::NotFound`] for an unknown queue.
    pub async fn delete_dead_letters(&self, queue: &str, ids: Option<&[i64]>) -> Result<u64> {
        self.known(queue).await?;
        let n = self.backend.dlq_delete(queue, ids).await?;
        tracing::info!(queue, deleted = n, "dead letters deleted");
        Ok(n)
    }

    /// Moves dead letters of `queue` (all, or those with the given dead-letter ids) back to the
    /// queue as new messages with zero attempts. Returns how many moved.
    /// Errors: [`Error::NotFound`] for an unknown queue.
    pub async fn replay(&self, queue: &str, ids: Option<&[i64]>) -> Result<u64> {
        self.known(queue).await?;
        let n = self
            .backend
            .dlq_replay(queue, ids, self.clock.now_ms())
            .await?;
        if let Ok((_, wake)) = self.entry(queue) {
            wake.notify_one();
        }
        Ok(n)
    }

    /// Depth, in-flight count, dead-letter size and oldest-message age of every declared queue
    /// and every queue that has rows.
    pub async fn stats(&self) -> Result<Vec<QueueStats>> {
        let mut stats = self.backend.queue_stats(self.clock.now_ms()).await?;
        for name in self.names() {
            if !stats.iter().any(|s| s.queue == name) {
                stats.push(QueueStats {
                    queue: name,
                    ..Default::default()
                });
            }
        }
        stats.sort_by(|a, b| a.queue.cmp(&b.queue));
        Ok(stats)
    }

    /// Receives one batch and handles it with `consumer`, acking or retrying each message.
    /// Returns how many messages were handled. The consumer loop is this in a loop; tests call
    /// it directly.
    pub async fn process_batch<C: Consumer + ?Sized>(
        &self,
        queue: &str,
        consumer: &C,
    ) -> Result<usize> {
        let (config, _) = self.entry(queue)?;
        let batch = self.receive(queue, config.batch_size).await?;
        let n = batch.len();
        for d in batch {
            let outcome = self.handle(&config, consumer, &d).await;
            self.settle(&d, outcome).await?;
        }
        Ok(n)
    }

    /// Runs the handler, extending the delivery's visibility timeout every third of it while the
    /// handler runs, so a slow handler keeps its message and a hung node loses it.
    async fn handle<C: Consumer + ?Sized>(
        &self,
        config: &QueueConfig,
        consumer: &C,
        delivery: &Delivery,
    ) -> Result<()> {
        let every = config.visibility_timeout_ms / 3;
        let handled = consumer.handle(delivery);
        tokio::pin!(handled);
        loop {
            let next = self.clock.now_ms() + every as i64;
            tokio::select! {
                outcome = &mut handled => return outcome,
                _ = self.clock.sleep_until(next, every) => {}
            }
            match self.extend(delivery).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!(queue = %delivery.queue, id = delivery.id,
                    "delivery was taken over while its handler runs"),
                Err(e) => tracing::warn!(queue = %delivery.queue, id = delivery.id, error = %e,
                    "cannot extend the visibility timeout"),
            }
        }
    }

    async fn settle(&self, delivery: &Delivery, outcome: Result<()>) -> Result<()> {
        let current = match outcome {
            Ok(()) => self.ack(delivery).await?,
            Err(e) => self.retry(delivery, None, &e.to_string()).await? != RetryOutcome::Stale,
        };
        if !current {
            // Handled after its visibility timeout: it was (or will be) delivered again.
            tracing::warn!(queue = %delivery.queue, id = delivery.id, attempts = delivery.attempts,
                "stale receipt: the message was handled after its visibility timeout expired");
            metrics::counter!("kilocloud_queue_stale_receipts_total", "queue" => delivery.queue.clone())
                .increment(1);
        }
        Ok(())
    }

    /// Background consumer: claims batches while it has free concurrency, handles each message
    /// in its own task, acks or retries it. Sleeps until a local send, `poll_ms` (sends from
    /// other nodes, delays ending), or shutdown; in-flight messages finish before it returns.
    pub(crate) async fn run_consumer(
        self: Arc<Self>,
        queue: String,
        consumer: Arc<dyn Consumer>,
        poll_ms: u64,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) {
        let Ok((config, wake)) = self.entry(&queue) else {
            tracing::error!(queue, "consumer started for an undeclared queue");
            return;
        };
        let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
        while !shutdown.is_cancelled() {
            let first = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.cancelled() => break,
            };
            let free = 1 + permits.available_permits() as u32;
            let batch = match self.receive(&queue, free.min(config.batch_size)).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(queue, error = %e, "receive failed");
                    drop(first);
                    tokio::select! {
                        _ = self.clock.sleep_until(self.clock.now_ms() + poll_ms as i64, poll_ms) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                drop(first);
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = self.clock.sleep_until(self.clock.now_ms() + poll_ms as i64, poll_ms) => {}
                    _ = shutdown.cancelled() => {}
                }
                continue;
            }
            let mut first = Some(first);
            for d in batch {
                let permit = match first.take() {
                    Some(p) => p,
                    None => permits
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("semaphore never closed"),
                };
                let (this, consumer, config) = (self.clone(), consumer.clone(), config.clone());
                tasks.spawn(async move {
                    let outcome = this.handle(&config, consumer.as_ref(), &d).await;
                    if let Err(e) = this.settle(&d, outcome).await {
                        tracing::error!(queue = %d.queue, id = d.id, error = %e,
                            "cannot settle message; it will be redelivered after its visibility timeout");
                    }
                    drop(permit);
                });
            }
        }
    }
}
