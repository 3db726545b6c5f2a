//! Actor calls: a read-modify-write call (get a counter, put it back incremented, commit) over
//! 10,000 distinct keys and on one hot key; calls/s and p50/p99 call latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kilocloud_substrate::{Actor, ActorContext, Result, Substrate};

use crate::report::{histogram, p50_p99, rate};
use crate::{Args, Backend};

struct Counter;

impl Actor for Counter {
    const TYPE: &'static str = "bench_counter";
    type Call = ();
    type Reply = i64;
    async fn call(&self, ctx: &mut ActorContext, _: ()) -> Result<i64> {
        let n: i64 = ctx.get("n").await?.unwrap_or(0);
        ctx.put("n", &(n + 1))?;
        Ok(n + 1)
    }
}

struct Outcome {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn calls(sub: &Substrate, keys: usize, total: usize, in_flight: usize) -> Outcome {
    let hist = Arc::new(std::sync::Mutex::new(histogram()));
    let start = Instant::now();
    futures::stream::iter(0..total)
        .map(|i| {
            let (sub, hist) = (sub.clone(), hist.clone());
            async move {
                let t = Instant::now();
                sub.actors()
                    .call::<Counter>(&format!("key-{}", i % keys), ())
                    .await
                    .expect("call");
                let _ = hist
                    .lock()
                    .unwrap()
                    .record(t.elapsed().as_micros().max(1) as u64);
            }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await;
    let elapsed = start.elapsed();
    let (p50_ms, p99_ms) = p50_p99(&hist.lock().unwrap());
    Outcome {
        rate: rate(total as u64, elapsed),
        p50_ms,
        p99_ms,
    }
}

/// Runs the actor group and returns its Markdown section.
pub async fn run(args: &Args) -> anyhow::Result<String> {
    let (spread, hot) = if args.quick {
        (20_000, 5_000)
    } else {
        (200_000, 50_000)
    };
    let mut s = String::from(
        "### Actors: read-modify-write calls, each committed\n\n\
         | backend | 10,000 keys calls/s | p50 / p99 ms | one hot key calls/s | p50 / p99 ms |\n\
         |---|---:|---:|---:|---:|\n",
    );
    let (mut reference, mut ours) = (None, None);
    for postgres in [false, true] {
        let b = Backend::open(postgres).await?;
        b.substrate.actors().register(Counter);
        // Warm up (creates the rows), then measure.
        calls(&b.substrate, 10_000, 10_000, 256).await;
        let across = calls(&b.substrate, 10_000, spread, 256).await;
        let one = calls(&b.substrate, 1, hot, 64).await;
        b.substrate.shutdown(Duration::from_secs(10)).await;
        s += &format!(
            "| {} | {:.0} | {:.2} / {:.2} | {:.0} | {:.2} / {:.2} |\n",
            b.name, across.rate, across.p50_ms, across.p99_ms, one.rate, one.p50_ms, one.p99_ms
        );
        if postgres {
            ours = Some((across.rate, one.rate));
        }
    }
    // After the backend (and its pool) is gone, so pgbench has the server's connections.
    if let Some((ours_across, ours_one)) = ours {
        let url = kilocloud_test_support::postgres_url();
        reference = Some(
            pgbench(&url, if args.quick { 3 } else { 8 })
                .map(|(across_tps, one_tps)| (ours_across, ours_one, across_tps, one_tps)),
        );
    }
    match reference {
        Some(Ok((ours_across, ours_one, across_tps, one_tps))) => {
            s += &format!(
                "| PostgreSQL itself (pgbench, same statements, reference) | {across_tps:.0} | | {one_tps:.0} | |\n\n\
                 Ratio to pgbench: {:.2}× across keys, {:.2}× on one key.\n\n",
                ours_across / across_tps,
                ours_one / one_tps
            );
        }
        Some(Err(e)) => s += &format!("\n(No PostgreSQL reference in this run: {e}.)\n\n"),
        None => s += "\n",
    }
    Ok(s)
}

/// The same work as a PostgreSQL actor call, as a pgbench script: advisory lock, read, upsert,
/// unlock. Returns (tps over 10,000 keys with 64 clients, tps on one key with 64 clients).
fn pgbench(url: &str, secs: u32) -> Result<(f64, f64), String> {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("no /usr/lib/postgresql: {e}"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin/pgbench"))
        .find(|p| p.exists())
        .ok_or("pgbench not found")?;
    let psql = bin.with_file_name("psql");
    let setup = std::process::Command::new(&psql)
        .args([
            url,
            "-qc",
            "CREATE TABLE IF NOT EXISTS pgbench_actor (k text PRIMARY KEY, v bigint)",
        ])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if !setup.status.success() {
        return Err(format!("psql: {}", String::from_utf8_lossy(&setup.stderr)));
    }
    let dir = kilocloud_test_support::temp_dir();
    let run = |keys: u32| -> Result<f64, String> {
        let script = dir.path().join(format!("actor-{keys}.sql"));
        std::fs::write(
            &script,
            format!(
                "\\set id random(1, {keys})\n\
                 SELECT pg_advisory_lock(:id);\n\
                 SELECT v FROM pgbench_actor WHERE k = 'k' || :id;\n\
                 INSERT INTO pgbench_actor VALUES ('k' || :id, 1) ON CONFLICT (k) DO UPDATE SET v = pgbench_actor.v + 1;\n\
                 SELECT pg_advisory_unlock(:id);\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let out = std::process::Command::new(&bin)
            .args([
                "-n",
                "-M",
                "prepared",
                "-c",
                "64",
                "-j",
                "2",
                "-T",
                &secs.to_string(),
                "-f",
            ])
            .arg(&script)
            .arg(url)
            .output()
            .map_err(|e| format!("pgbench: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| {
                format!(
                    "pgbench printed no tps: {stdout} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    };
    let result = (run(10_000), run(1));
    let _ = std::process::Command::new(&psql)
        .args([url, "-qc", "DROP TABLE pgbench_actor"])
        .output();
    Ok((result.0?, result.1?))
}
