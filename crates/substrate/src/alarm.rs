//! The alarm scheduler: finds due alarms, runs them on their actors, retries failures.
//!
//! Each node claims due alarms (`claimed_by` = its node id) so one firing runs on one node; the
//! run itself is an actor call, so it never overlaps the actor's other calls. A successful run
//! deletes the alarm in the same commit as the handler's writes (unless the handler set a new
//! one). A failed run is rescheduled `2 s × 2^retry_count` later, at most
//! [`ALARM_MAX_RETRIES`] times, then dropped with an error log — as Durable Object alarms do.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::actor::ActorSystem;
use crate::clock::Clock;
use crate::error::Result;
use crate::store::{AlarmRow, Backend};

/// First retry delay of a failed alarm, ms; doubles with each retry.
pub const ALARM_RETRY_BASE_MS: i64 = 2_000;
/// Retries of a failed alarm before it is dropped.
pub const ALARM_MAX_RETRIES: u32 = 6;
const CLAIM_BATCH: u32 = 256;

/// What one [`Alarms::fire_due`] pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FireReport {
    /// Handlers that ran and committed.
    pub fired: u32,
    /// Handlers that failed and were rescheduled.
    pub retried: u32,
    /// Handlers that failed after the last retry; their alarms were dropped.
    pub dropped: u32,
    /// Claimed alarms that had been replaced or deleted before they ran.
    pub stale: u32,
}

/// Delay before retry `retry` (0-based) of a failed alarm: 2 s, 4 s, 8 s, ... 64 s.
pub fn alarm_retry_delay_ms(retry: u32) -> i64 {
    ALARM_RETRY_BASE_MS << retry.min(30)
}

/// Runs due alarms for this node.
pub struct Alarms {
    backend: Arc<dyn Backend>,
    clock: Arc<dyn Clock>,
    actors: Arc<ActorSystem>,
    node_id: String,
    wake: Arc<Notify>,
}

impl Alarms {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        clock: Arc<dyn Clock>,
        actors: Arc<ActorSystem>,
        node_id: String,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            backend,
            clock,
            actors,
            node_id,
            wake,
        }
    }

    /// Claims and runs every alarm due now (by the substrate clock); returns what happened.
    /// The background loop calls this; tests call it directly after moving a manual clock.
    pub async fn fire_due(&self) -> Result<FireReport> {
        let mut report = FireReport::default();
        loop {
            let now = self.clock.now_ms();
            let rows = self
                .backend
                .claim_due_alarms(&self.node_id, now, CLAIM_BATCH)
                .await?;
            let n = rows.len();
            let outcomes =
                futures::future::join_all(rows.iter().map(|row| self.fire_one(row))).await;
            for outcome in outcomes {
                match outcome? {
                    Outcome::Fired => report.fired += 1,
                    Outcome::Retried => report.retried += 1,
                    Outcome::Dropped => report.dropped += 1,
                    Outcome::Stale => report.stale += 1,
                }
            }
            if n < CLAIM_BATCH as usize {
                return Ok(report);
            }
        }
    }

    async fn fire_one(&self, row: &AlarmRow) -> Result<Outcome> {
        match self.actors.run_alarm(row).await {
            Ok(true) => Ok(Outcome::Fired),
            Ok(false) => Ok(Outcome::Stale),
            Err(e) if row.retry_count < ALARM_MAX_RETRIES => {
                let retry_at = self.clock.now_ms() + alarm_retry_delay_ms(row.retry_count);
                tracing::warn!(
                    actor_type = %row.actor_type, key = %row.actor_key, retry = row.retry_count + 1,
                    retry_at, error = %e, "alarm handler failed; retrying"
                );
                self.backend.alarm_failed(row, Some(retry_at)).await?;
                metrics::counter!("kilocloud_alarm_retries_total").increment(1);
                Ok(Outcome::Retried)
            }
            Err(e) => {
                tracing::error!(
                    actor_type = %row.actor_type, key = %row.actor_key, retries = row.retry_count,
                    error = %e, "alarm handler failed after the last retry; alarm dropped"
                );
                self.backend.alarm_failed(row, None).await?;
                metrics::counter!("kilocloud_alarm_dropped_total").increment(1);
                Ok(Outcome::Dropped)
            }
        }
    }

    /// Background loop: fires due alarms, then sleeps until the next alarm, a local
    /// `set_alarm`, `poll_ms` (alarms set by other nodes), or shutdown.
    pub(crate) async fn run(self: Arc<Self>, poll_ms: u64, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Err(e) = self.fire_due().await {
                tracing::error!(error = %e, "alarm pass failed");
            }
            let now = self.clock.now_ms();
            let next = match self.backend.next_alarm_at(now).await {
                Ok(next) => next.unwrap_or(i64::MAX),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read next alarm time");
                    i64::MAX
                }
            };
            tokio::select! {
                _ = self.clock.sleep_until(next, poll_ms) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
}

enum Outcome {
    Fired,
    Retried,
    Dropped,
    Stale,
}
