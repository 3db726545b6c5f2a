//! Alarm lag: 2,000 alarms on distinct actors, due uniformly over 4 s; lag is handler start minus
//! scheduled time, measured by the handler with the system clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use kilocloud_substrate::{Actor, ActorContext, AlarmInfo, Result};
use tokio::sync::Notify;

use crate::report::histogram;
use crate::{Args, Backend};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

struct Lag {
    hist: std::sync::Mutex<hdrhistogram::Histogram<u64>>,
    fired: AtomicU64,
    target: u64,
    done: Notify,
}

#[derive(Clone)]
struct Timer(Arc<Lag>);

impl Actor for Timer {
    const TYPE: &'static str = "bench_timer";
    type Call = i64;
    type Reply = ();
    async fn call(&self, ctx: &mut ActorContext, at: i64) -> Result<()> {
        ctx.set_alarm(at);
        Ok(())
    }
    async fn alarm(&self, _: &mut ActorContext, info: AlarmInfo) -> Result<()> {
        let lag_ms = (now_ms() - info.scheduled_at).max(0) as u64;
        let _ = self.0.hist.lock().unwrap().record(lag_ms * 1000 + 1);
        if self.0.fired.fetch_add(1, Ordering::SeqCst) + 1 == self.0.target {
            self.0.done.notify_one();
        }
        Ok(())
    }
}

/// Runs the alarm group and returns its Markdown section.
pub async fn run(args: &Args) -> anyhow::Result<String> {
    let n: u64 = if args.quick { 500 } else { 2_000 };
    let mut s = String::from(
        "### Alarm lag (scheduled time → handler start)\n\n\
         | backend | alarms | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|\n",
    );
    for postgres in [false, true] {
        let b = Backend::open(postgres).await?;
        let lag = Arc::new(Lag {
            hist: std::sync::Mutex::new(histogram()),
            fired: AtomicU64::new(0),
            target: n,
            done: Notify::new(),
        });
        b.substrate.actors().register(Timer(lag.clone()));
        // Setting runs concurrently and must finish before the first alarm is due, so that the
        // measured lag is the scheduler's, not the setting load's.
        let first = now_ms() + 3_000;
        futures::stream::iter(0..n)
            .map(|i| {
                let sub = b.substrate.clone();
                async move {
                    let at = first + (i as i64 * 4_000) / n as i64;
                    sub.actors().call::<Timer>(&format!("t{i}"), at).await
                }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        anyhow::ensure!(now_ms() < first, "setting {n} alarms took longer than 3 s");
        lag.done.notified().await;
        b.substrate.shutdown(Duration::from_secs(10)).await;
        let h = lag.hist.lock().unwrap();
        s += &format!(
            "| {} | {n} | {:.1} | {:.1} | {:.1} |\n",
            b.name,
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0
        );
    }
    s += "\n";
    Ok(s)
}
