//! Time source for the substrate.
//!
//! Every timestamp the substrate stores (alarm times, message visibility, KV expiry, node heartbeats)
//! is milliseconds since the Unix epoch as read from a [`Clock`], never from the database's own
//! clock, so tests can move time with a [`ManualClock`] on either backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// Milliseconds since the Unix epoch (UTC).
pub type UnixMs = i64;

/// A source of wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Current time, ms since the Unix epoch.
    fn now_ms(&self) -> UnixMs;

    /// Resolves once `now_ms() >= deadline` *or* `max_wait_ms` of real time passed (whichever comes
    /// first). Background loops use it so that a [`ManualClock`] advanced by a test wakes them.
    fn sleep_until(
        &self,
        deadline: UnixMs,
        max_wait_ms: u64,
    ) -> futures::future::BoxFuture<'static, ()>;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> UnixMs {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    fn sleep_until(
        &self,
        deadline: UnixMs,
        max_wait_ms: u64,
    ) -> futures::future::BoxFuture<'static, ()> {
        let wait = (deadline - self.now_ms()).clamp(0, max_wait_ms as i64) as u64;
        Box::pin(tokio::time::sleep(std::time::Duration::from_millis(wait)))
    }
}

/// A clock that only moves when told to; for deterministic tests.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicI64>,
    moved: Arc<Notify>,
}

impl ManualClock {
    /// A clock frozen at `start_ms`.
    pub fn new(start_ms: UnixMs) -> Self {
        Self {
            now: Arc::new(AtomicI64::new(start_ms)),
            moved: Arc::new(Notify::new()),
        }
    }

    /// Moves the clock forward by `ms` and wakes every [`Clock::sleep_until`] waiter.
    pub fn advance(&self, ms: i64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
        self.moved.notify_waiters();
    }

    /// Sets the clock to `ms` and wakes every waiter.
    pub fn set(&self, ms: UnixMs) {
        self.now.store(ms, Ordering::SeqCst);
        self.moved.notify_waiters();
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> UnixMs {
        self.now.load(Ordering::SeqCst)
    }

    fn sleep_until(
        &self,
        deadline: UnixMs,
        max_wait_ms: u64,
    ) -> futures::future::BoxFuture<'static, ()> {
        let this = self.clone();
        Box::pin(async move {
            let real_deadline =
                tokio::time::Instant::now() + std::time::Duration::from_millis(max_wait_ms);
            loop {
                let moved = this.moved.notified();
                if this.now_ms() >= deadline {
                    return;
                }
                tokio::select! {
                    _ = moved => {}
                    _ = tokio::time::sleep_until(real_deadline) => return,
                }
            }
        })
    }
}
