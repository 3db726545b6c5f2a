//! The alarm scheduler: finds due alarms, runs them on their actors, retries failures.
//!
//! Each node claims due alarms of the actor types it has registered (`claimed_by` = its node id)
//! so one firing runs on one node; each run is an actor call in its own task (so it never
//! overlaps the actor's other calls, a panic is contained, and a slow handler delays no other
//! alarm), at most `alarm_concurrency` at once. A successful run deletes the alarm in the same
//! commit as the handler's writes (unless the handler set a new one). A failed or panicked run
//! is rescheduled `2 s × 2^retry_count` later, at most [`ALARM_MAX_RETRIES`] times, then dropped
//! with an error log — as Durable Object alarms are. Only a failure of the handler itself uses a
//! retry: an alarm that could not run (its actor `Overloaded`, a lock or session timeout, a
//! failed commit) runs again [`ALARM_RETRY_BASE_MS`] later with its count unchanged.
//!
//! A claim is a lease of [`ALARM_LEASE_MS`], renewed every third of it while the handler runs;
//! an alarm whose lease expired (its node lost track of it, e.g. through a database outage that
//! kept it from recording the outcome) is claimable again by any node.

use std::sync::Arc;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actor::{ActorSystem, AlarmRun};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::store::{AlarmRow, Backend};

/// First retry delay of a failed alarm, ms; doubles with each retry.
pub const ALARM_RETRY_BASE_MS: i64 = 2_000;
/// Retries of a failed alarm before it is dropped.
pub const ALARM_MAX_RETRIES: u32 = 6;
/// How long a claim on an alarm lasts unless its node renews it (it does while the handler
/// runs), ms.
pub const ALARM_LEASE_MS: i64 = 60_000;
const CLAIM_BATCH: usize = 256;

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
    permits: Arc<Semaphore>,
    tasks: TaskTracker,
    /// This node may claim only while `now <= lease`.
    lease: Arc<std::sync::atomic::AtomicI64>,
}

#[derive(Clone, Copy)]
enum Outcome {
    Fired,
    Retried,
    Dropped,
    Stale,
}

impl Alarms {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        clock: Arc<dyn Clock>,
        actors: Arc<ActorSystem>,
        node_id: String,
        concurrency: usize,
        tasks: TaskTracker,
        lease: Arc<std::sync::atomic::AtomicI64>,
    ) -> Self {
        Self {
            backend,
            clock,
            wake: actors.alarm_wake(),
            actors,
            node_id,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            tasks,
            lease,
        }
    }

    /// Claims and runs every alarm due now (by the substrate clock) and waits for the runs;
    /// returns what happened. The background loop does the same without waiting; tests call
    /// this directly after moving a manual clock.
    pub async fn fire_due(self: &Arc<Self>) -> Result<FireReport> {
        let mut report = FireReport::default();
        loop {
            // One pass; another only if this one was cut short by the batch or permit limit.
            // Alarms that handlers re-arm for "now" wait for the next call, so this returns.
            let (runs, more) = self.dispatch().await?;
            for run in runs {
                match run
                    .await
                    .map_err(|e| Error::Storage(format!("alarm task: {e}")))?
                {
                    Outcome::Fired => report.fired += 1,
                    Outcome::Retried => report.retried += 1,
                    Outcome::Dropped => report.dropped += 1,
                    Outcome::Stale => report.stale += 1,
                }
            }
            if !more {
                return Ok(report);
            }
        }
    }

    /// Claims due alarms while permits are free and starts a task for each. Also says whether
    /// more may be due (a claim filled its batch, or permits ran out).
    async fn dispatch(self: &Arc<Self>) -> Result<(Vec<JoinHandle<Outcome>>, bool)> {
        let types = self.actors.types();
        let mut runs = Vec::new();
        loop {
            let free = self.permits.available_permits().min(CLAIM_BATCH);
            let fenced = self.clock.now_ms() > self.lease.load(std::sync::atomic::Ordering::SeqCst);
            if types.is_empty() || fenced {
                return Ok((runs, false));
            }
            if free == 0 {
                return Ok((runs, true));
            }
            let now = self.clock.now_ms();
            let rows = self
                .backend
                .claim_due_alarms(
                    &self.node_id,
                    now,
                    now + ALARM_LEASE_MS,
                    free as u32,
                    &types,
                )
                .await?;
            let claimed = rows.len();
            for row in rows {
                let permit = self
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed");
                let this = self.clone();
                runs.push(self.tasks.spawn(async move { this.run(row, permit).await }));
            }
            if claimed < free {
                return Ok((runs, false));
            }
        }
    }

    /// Runs one claimed alarm and records its outcome, renewing the claim's lease while it
    /// runs. The handler runs in a task of its own so that a panic is a failure like any other.
    async fn run(self: Arc<Self>, row: AlarmRow, permit: OwnedSemaphorePermit) -> Outcome {
        let actors = self.actors.clone();
        let claimed = row.clone();
        let running = tokio::spawn(async move { actors.run_alarm(&claimed).await });
        let result = self.renew_while(&row, running).await;
        let outcome = match result {
            Ok(AlarmRun::Fired) => Outcome::Fired,
            Ok(AlarmRun::Stale) => Outcome::Stale,
            Ok(AlarmRun::HandlerFailed(e)) => self.failed(&row, e).await,
            Ok(AlarmRun::NotRun(e)) => self.not_run(&row, e).await,
            Err(e) => {
                let e = Error::Internal(format!("alarm handler panicked: {e}"));
                self.failed(&row, e).await
            }
        };
        drop(permit);
        self.wake.notify_one();
        outcome
    }

    /// Awaits a running alarm, extending its claim's lease every third of [`ALARM_LEASE_MS`].
    async fn renew_while(
        &self,
        row: &AlarmRow,
        mut running: JoinHandle<AlarmRun>,
    ) -> std::result::Result<AlarmRun, tokio::task::JoinError> {
        let every = ALARM_LEASE_MS / 3;
        loop {
            let next = self.clock.now_ms() + every;
            tokio::select! {
                done = &mut running => return done,
                _ = self.clock.sleep_until(next, every as u64) => {}
            }
            let until = self.clock.now_ms() + ALARM_LEASE_MS;
            if let Err(e) = self.backend.alarm_extend(row, &self.node_id, until).await {
                tracing::warn!(actor_type = %row.actor_type, key = %row.actor_key, error = %e,
                    "cannot renew the lease of a running alarm");
            }
        }
    }

    /// An alarm that could not run: again in [`ALARM_RETRY_BASE_MS`], its retries untouched
    /// (on shutdown the claim is given back instead).
    async fn not_run(&self, row: &AlarmRow, error: Error) -> Outcome {
        tracing::warn!(actor_type = %row.actor_type, key = %row.actor_key, %error,
            "alarm could not run; trying again without using a retry");
        metrics::counter!("kilocloud_alarm_not_run_total").increment(1);
        let recorded = if matches!(error, Error::ShuttingDown) {
            self.backend.alarm_unclaim(row).await
        } else {
            let at = self.clock.now_ms() + ALARM_RETRY_BASE_MS;
            self.backend.alarm_failed(row, Some(at), false).await
        };
        if let Err(e) = recorded {
            tracing::error!(actor_type = %row.actor_type, key = %row.actor_key, error = %e,
                "cannot reschedule the alarm; it is claimable again when its lease expires");
        }
        Outcome::Retried
    }

    async fn failed(&self, row: &AlarmRow, error: Error) -> Outcome {
        let (retry_at, outcome) = if row.retry_count < ALARM_MAX_RETRIES {
            let retry_at = self.clock.now_ms() + alarm_retry_delay_ms(row.retry_count);
            tracing::warn!(
                actor_type = %row.actor_type, key = %row.actor_key, retry = row.retry_count + 1,
                retry_at, %error, "alarm handler failed; retrying"
            );
            metrics::counter!("kilocloud_alarm_retries_total").increment(1);
            (Some(retry_at), Outcome::Retried)
        } else {
            tracing::error!(
                actor_type = %row.actor_type, key = %row.actor_key, retries = row.retry_count,
                %error, "alarm handler failed after the last retry; alarm dropped"
            );
            metrics::counter!("kilocloud_alarm_dropped_total").increment(1);
            (None, Outcome::Dropped)
        };
        if let Err(e) = self.backend.alarm_failed(row, retry_at, true).await {
            // Could not record the failure: give the claim back so the alarm runs again.
            tracing::error!(actor_type = %row.actor_type, key = %row.actor_key, error = %e,
                "cannot reschedule failed alarm; releasing its claim");
            if let Err(e) = self.backend.alarm_unclaim(row).await {
                tracing::error!(error = %e,
                    "cannot release alarm claim; it is claimable again when its lease expires");
            }
        }
        outcome
    }

    /// Background loop: dispatches due alarms, then sleeps until the next alarm, a local
    /// `set_alarm` or finished run, `poll_ms` (alarms set by other nodes), or shutdown.
    pub(crate) async fn run_loop(self: Arc<Self>, poll_ms: u64, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let failed = match self.dispatch().await {
                Ok(_) => false,
                Err(e) => {
                    tracing::error!(error = %e, "alarm pass failed");
                    true
                }
            };
            let fenced = self.clock.now_ms() > self.lease.load(std::sync::atomic::Ordering::SeqCst);
            let next = if failed || fenced || self.permits.available_permits() == 0 {
                // After a failure wait for the poll interval rather than retry at once; when
                // every permit is busy, a finished run wakes us (or the poll does). While the
                // claim lease has lapsed nothing may be claimed until the heartbeat renews it:
                // waiting for a due alarm would spin (and, on a one-thread runtime with a
                // synchronous store, starve the heartbeat that would end it).
                i64::MAX
            } else {
                match self.backend.next_alarm_at(&self.actors.types()).await {
                    Ok(next) => next.unwrap_or(i64::MAX),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read next alarm time");
                        i64::MAX
                    }
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
