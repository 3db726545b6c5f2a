//! Alarm contract: fires at or after its time, at least once, survives restarts, retries with
//! exponential backoff (2 s base, 6 retries) and tells the handler its retry count; cron
//! schedules re-arm as alarms. On SQLite and PostgreSQL, with a manual clock.

mod common;

use std::sync::{Arc, Mutex};

use common::{Env, Kind, T0};
use kilocloud_substrate::{
    ALARM_LEASE_MS, ALARM_MAX_RETRIES, Actor, ActorContext, AlarmInfo, CronSchedule, Error,
    FireReport, Result, alarm_retry_delay_ms,
};

/// Records each alarm run; fails while `failures_left` > 0.
#[derive(Clone, Default)]
struct Recorder {
    runs: Arc<Mutex<Vec<(String, AlarmInfo, i64)>>>,
    failures_left: Arc<Mutex<u32>>,
}

enum Call {
    SetAlarm(i64),
    DeleteAlarm,
    Cron(Box<CronSchedule>),
}

impl Actor for Recorder {
    const TYPE: &'static str = "recorder";
    type Call = Call;
    type Reply = ();

    async fn call(&self, ctx: &mut ActorContext, call: Call) -> Result<()> {
        match call {
            Call::SetAlarm(at) => ctx.set_alarm(at),
            Call::DeleteAlarm => ctx.delete_alarm(),
            Call::Cron(s) => {
                ctx.put("cron", &(s.expr(), s.time_zone()))?;
                ctx.schedule_cron(&s)?;
            }
        }
        Ok(())
    }

    async fn alarm(&self, ctx: &mut ActorContext, info: AlarmInfo) -> Result<()> {
        self.runs
            .lock()
            .unwrap()
            .push((ctx.key().to_owned(), info, ctx.now_ms()));
        let runs: i64 = ctx.get("runs").await?.unwrap_or(0);
        ctx.put("runs", &(runs + 1))?;
        {
            let mut left = self.failures_left.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Err(Error::handler("alarm handler failed on purpose"));
            }
        }
        if let Some((expr, tz)) = ctx.get::<(String, String)>("cron").await? {
            ctx.schedule_cron(&CronSchedule::parse(&expr, &tz)?)?;
        }
        Ok(())
    }
}

fn fired(n: u32) -> FireReport {
    FireReport {
        fired: n,
        ..Default::default()
    }
}

async fn alarm_fires_at_or_after_its_time_once(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let rec = Recorder::default();
    sub.actors().register(rec.clone());
    sub.actors()
        .call::<Recorder>("a", Call::SetAlarm(T0 + 1_000))
        .await
        .unwrap();
    assert_eq!(
        sub.alarms().fire_due().await.unwrap(),
        FireReport::default()
    );
    env.clock.advance(999);
    assert_eq!(
        sub.alarms().fire_due().await.unwrap(),
        FireReport::default()
    );
    env.clock.advance(1);
    assert_eq!(sub.alarms().fire_due().await.unwrap(), fired(1));
    assert_eq!(
        sub.alarms().fire_due().await.unwrap(),
        FireReport::default()
    );
    let runs = rec.runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0].1,
        AlarmInfo {
            scheduled_at: T0 + 1_000,
            retry_count: 0
        }
    );
    assert!(!runs[0].1.is_retry());
    let snap = sub.actor_snapshot("recorder", "a").await.unwrap();
    assert!(snap.alarm.is_none(), "a successful run deletes the alarm");
    assert_eq!(snap.storage["runs"], 1);
}

async fn setting_an_alarm_replaces_it(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let rec = Recorder::default();
    sub.actors().register(rec.clone());
    let actors = sub.actors();
    actors
        .call::<Recorder>("a", Call::SetAlarm(T0 + 1_000))
        .await
        .unwrap();
    actors
        .call::<Recorder>("a", Call::SetAlarm(T0 + 5_000))
        .await
        .unwrap();
    env.clock.advance(2_000);
    assert_eq!(
        sub.alarms().fire_due().await.unwrap(),
        FireReport::default()
    );
    env.clock.advance(3_000);
    assert_eq!(sub.alarms().fire_due().await.unwrap(), fired(1));
    // Deleting prevents the firing.
    actors
        .call::<Recorder>("b", Call::SetAlarm(T0 + 6_000))
        .await
        .unwrap();
    actors
        .call::<Recorder>("b", Call::DeleteAlarm)
        .await
        .unwrap();
    env.clock.advance(10_000);
    assert_eq!(
        sub.alarms().fire_due().await.unwrap(),
        FireReport::default()
    );
    assert_eq!(rec.runs.lock().unwrap().len(), 1);
}

async fn alarm_survives_restart(kind: Kind) {
    let env = Env::new(kind).await;
    let rec = Recorder::default();
    {
        let sub = env.open().await;
        sub.start().await.unwrap();
        sub.actors().register(rec.clone());
        sub.actors()
            .call::<Recorder>("a", Call::SetAlarm(T0 + 60_000))
            .await
            .unwrap();
        assert!(sub.shutdown(std::time::Duration::from_secs(10)).await);
    }
    // The restarted node is driven by hand (not started) so that its background scheduler
    // cannot race the explicit pass.
    let sub = env.open().await;
    sub.actors().register(rec.clone());
    env.clock.advance(60_000);
    assert_eq!(sub.alarms().fire_due().await.unwrap(), fired(1));
    assert_eq!(rec.runs.lock().unwrap()[0].1.scheduled_at, T0 + 60_000);
}

/// Panics in its first alarm run; re-arms itself when it finds no alarm set during a run.
#[derive(Clone, Default)]
struct Flaky {
    panicked: Arc<std::sync::atomic::AtomicBool>,
    seen_during_run: Arc<Mutex<Vec<Option<i64>>>>,
}

impl Actor for Flaky {
    const TYPE: &'static str = "flaky";
    type Call = i64;
    type Reply = ();
    async fn call(&self, ctx: &mut ActorContext, at: i64) -> Result<()> {
        ctx.set_alarm(at);
        Ok(())
    }
    async fn alarm(&self, ctx: &mut ActorContext, info: AlarmInfo) -> Result<()> {
        if ctx.key() == "panics"
            && !self
                .panicked
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("alarm handler panics on purpose");
        }
        let current = ctx.alarm().await?;
        self.seen_during_run.lock().unwrap().push(current);
        if current.is_none() && ctx.key() == "periodic" {
            ctx.set_alarm(info.scheduled_at + 60_000);
        }
        Ok(())
    }
}

async fn panicking_alarm_is_retried_and_others_still_fire(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let flaky = Flaky::default();
    sub.actors().register(flaky.clone());
    sub.actors().call::<Flaky>("panics", T0).await.unwrap();
    sub.actors().call::<Flaky>("calm", T0).await.unwrap();
    let report = sub.alarms().fire_due().await.unwrap();
    assert_eq!(
        report,
        FireReport {
            fired: 1,
            retried: 1,
            ..Default::default()
        }
    );
    let snap = sub.actor_snapshot("flaky", "panics").await.unwrap();
    assert_eq!(snap.alarm.as_ref().unwrap().retry_count, 1);
    env.clock.advance(2_000);
    assert_eq!(sub.alarms().fire_due().await.unwrap(), fired(1));
    assert!(
        sub.actor_snapshot("flaky", "panics")
            .await
            .unwrap()
            .alarm
            .is_none()
    );
}

async fn firing_alarm_reads_as_unset_so_handlers_can_rearm(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let flaky = Flaky::default();
    sub.actors().register(flaky.clone());
    sub.actors().call::<Flaky>("periodic", T0).await.unwrap();
    assert_eq!(sub.alarms().fire_due().await.unwrap(), fired(1));
    assert_eq!(*flaky.seen_during_run.lock().unwrap(), vec![None]);
    let snap = sub.actor_snapshot("flaky", "periodic").await.unwrap();
    assert_eq!(
        snap.alarm.unwrap().fire_at,
        T0 + 60_000,
        "the handler re-armed"
    );
}

async fn alarms_of_unregistered_types_are_left_for_nodes_that_know_them(kind: Kind) {
    let env = Env::new(kind).await;
    let knows = env.open().await;
    knows.actors().register(Flaky::default());
    knows.actors().call::<Flaky>("elsewhere", T0).await.unwrap();
    // A node (say, an older version during a rolling deploy) without the type.
    let other = env.open().await;
    other.actors().register(Recorder::default());
    env.clock.advance(3_600_000);
    assert_eq!(
        other.alarms().fire_due().await.unwrap(),
        FireReport::default()
    );
    let snap = other.actor_snapshot("flaky", "elsewhere").await.unwrap();
    let alarm = snap.alarm.expect("the alarm is untouched");
    assert_eq!((alarm.retry_count, alarm.claimed_by), (0, None));
    assert_eq!(knows.alarms().fire_due().await.unwrap(), fired(1));
}

async fn failing_alarm_retries_with_backoff_then_drops(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let rec = Recorder::default();
    *rec.failures_left.lock().unwrap() = u32::MAX;
    sub.actors().register(rec.clone());
    sub.actors()
        .call::<Recorder>("a", Call::SetAlarm(T0))
        .await
        .unwrap();
    let mut expected_at = T0;
    for retry in 0..=ALARM_MAX_RETRIES {
        // Not a millisecond early.
        env.clock.set(expected_at - 1);
        assert_eq!(
            sub.alarms().fire_due().await.unwrap(),
            FireReport::default()
        );
        env.clock.set(expected_at);
        let report = sub.alarms().fire_due().await.unwrap();
        if retry < ALARM_MAX_RETRIES {
            assert_eq!(
                report,
                FireReport {
                    retried: 1,
                    ..Default::default()
                },
                "retry {retry}"
            );
            let snap = sub.actor_snapshot("recorder", "a").await.unwrap();
            let alarm = snap.alarm.expect("rescheduled");
            assert_eq!(alarm.retry_count, retry + 1);
            assert_eq!(alarm.fire_at, expected_at + alarm_retry_delay_ms(retry));
            expected_at = alarm.fire_at;
            // The failed run's writes were discarded.
            assert!(!snap.storage.contains_key("runs"));
        } else {
            assert_eq!(
                report,
                FireReport {
                    dropped: 1,
                    ..Default::default()
                }
            );
        }
    }
    let retry_counts: Vec<u32> = rec
        .runs
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.1.retry_count)
        .collect();
    assert_eq!(retry_counts, vec![0, 1, 2, 3, 4, 5, 6]);
    let delays: Vec<i64> = (0..ALARM_MAX_RETRIES).map(alarm_retry_delay_ms).collect();
    assert_eq!(delays, vec![2_000, 4_000, 8_000, 16_000, 32_000, 64_000]);
    assert!(
        sub.actor_snapshot("recorder", "a")
            .await
            .unwrap()
            .alarm
            .is_none()
    );
    env.clock.advance(1_000_000);
    assert_eq!(
        sub.alarms().fire_due().await.unwrap(),
        FireReport::default()
    );
}

async fn alarm_recovers_after_transient_failures(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let rec = Recorder::default();
    *rec.failures_left.lock().unwrap() = 2;
    sub.actors().register(rec.clone());
    sub.actors()
        .call::<Recorder>("a", Call::SetAlarm(T0))
        .await
        .unwrap();
    sub.alarms().fire_due().await.unwrap();
    env.clock.advance(2_000);
    sub.alarms().fire_due().await.unwrap();
    env.clock.advance(4_000);
    assert_eq!(sub.alarms().fire_due().await.unwrap(), fired(1));
    let runs = rec.runs.lock().unwrap().clone();
    assert_eq!(
        runs.iter().map(|r| r.1.retry_count).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert!(runs[2].1.is_retry());
    let snap = sub.actor_snapshot("recorder", "a").await.unwrap();
    assert_eq!(snap.storage["runs"], 1, "only the successful run committed");
}

async fn cron_schedule_rearms_as_alarms(kind: Kind) {
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let rec = Recorder::default();
    sub.actors().register(rec.clone());
    // 09:30 every day in Paris (UTC+1 in January): 08:30 UTC.
    let sched = CronSchedule::parse("30 9 * * *", "Europe/Paris").unwrap();
    sub.actors()
        .call::<Recorder>("daily", Call::Cron(Box::new(sched)))
        .await
        .unwrap();
    let first = T0 + (8 * 60 + 30) * 60_000;
    let snap = sub.actor_snapshot("recorder", "daily").await.unwrap();
    assert_eq!(snap.alarm.unwrap().fire_at, first);
    env.clock.set(first);
    assert_eq!(sub.alarms().fire_due().await.unwrap(), fired(1));
    let snap = sub.actor_snapshot("recorder", "daily").await.unwrap();
    assert_eq!(
        snap.alarm.unwrap().fire_at,
        first + 24 * 3_600_000,
        "re-armed for the next day"
    );
    env.clock.set(first + 24 * 3_600_000);
    assert_eq!(sub.alarms().fire_due().await.unwrap(), fired(1));
    assert_eq!(rec.runs.lock().unwrap().len(), 2);
}

#[test]
fn cron_parse_errors_name_the_input() {
    let e = CronSchedule::parse("61 * * * *", "UTC").unwrap_err();
    assert!(e.to_string().contains("61 * * * *"), "{e}");
    let e = CronSchedule::parse("* * * * *", "Mars/Olympus").unwrap_err();
    assert!(e.to_string().contains("Mars/Olympus"), "{e}");
}

/// A node that claimed an alarm and then lost track of it (it could not record the outcome
/// through a database outage) does not hold it forever: the claim is a lease, and once it
/// expires any node runs the alarm.
async fn expired_alarm_claim_is_reclaimed(kind: Kind) {
    use kilocloud_substrate::store::Backend;
    let env = Env::new(kind).await;
    let sub = env.open().await;
    let rec = Recorder::default();
    sub.actors().register(rec.clone());
    sub.actors()
        .call::<Recorder>("lost", Call::SetAlarm(T0))
        .await
        .unwrap();
    // The other node, alive (heartbeating), claims it through the storage API and goes quiet.
    let backend: Box<dyn Backend> = match &env.database() {
        kilocloud_substrate::DatabaseConfig::Sqlite { path, synchronous } => Box::new(
            kilocloud_substrate::store::sqlite::SqliteBackend::open(path, *synchronous).unwrap(),
        ),
        kilocloud_substrate::DatabaseConfig::Postgres { url, schema, .. } => Box::new(
            kilocloud_substrate::store::postgres::PostgresBackend::connect(
                url,
                4,
                schema.as_deref(),
                &kilocloud_substrate::store::postgres::PgSettings {
                    node_id: "node-lost".into(),
                    statement_timeout_ms: 30_000,
                    lock_timeout_ms: 10_000,
                },
            )
            .await
            .unwrap(),
        ),
    };
    backend.node_heartbeat("node-lost", T0).await.unwrap();
    let claimed = backend
        .claim_due_alarms("node-lost", T0, T0 + ALARM_LEASE_MS, 10, &["recorder"])
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    env.clock.set(T0 + ALARM_LEASE_MS - 1);
    assert_eq!(
        sub.alarms().fire_due().await.unwrap(),
        FireReport::default(),
        "leased"
    );
    env.clock.set(T0 + ALARM_LEASE_MS);
    assert_eq!(sub.alarms().fire_due().await.unwrap(), fired(1));
    assert_eq!(rec.runs.lock().unwrap().len(), 1);
}

on_every_backend!(
    expired_alarm_claim_is_reclaimed,
    alarm_fires_at_or_after_its_time_once,
    setting_an_alarm_replaces_it,
    alarm_survives_restart,
    failing_alarm_retries_with_backoff_then_drops,
    alarm_recovers_after_transient_failures,
    cron_schedule_rearms_as_alarms,
    panicking_alarm_is_retried_and_others_still_fire,
    firing_alarm_reads_as_unset_so_handlers_can_rearm,
    alarms_of_unregistered_types_are_left_for_nodes_that_know_them,
);

/// On PostgreSQL an alarm whose actor's cross-node lock is held elsewhere (a lock timeout: the
/// alarm never ran) runs again later without using any of its retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_alarm_that_cannot_lock_keeps_its_retries() {
    use sqlx::Connection;
    let env = Env::new(Kind::Postgres).await;
    let sub = env
        .open_with(kilocloud_substrate::Tuning {
            actor_lock_wait_ms: 50,
            ..Default::default()
        })
        .await;
    let rec = Recorder::default();
    sub.actors().register(rec.clone());
    sub.actors()
        .call::<Recorder>("busy", Call::SetAlarm(T0))
        .await
        .unwrap();
    let schema = env.schema.as_ref().unwrap();
    let mut holder = sqlx::PgConnection::connect(&schema.url).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind("recorder\u{1f}busy")
        .execute(&mut holder)
        .await
        .unwrap();
    let mut at = T0;
    for _ in 0..=ALARM_MAX_RETRIES + 2 {
        env.clock.set(at);
        let report = sub.alarms().fire_due().await.unwrap();
        assert_eq!(report.retried, 1, "{report:?}");
        let alarm = sub
            .actor_snapshot("recorder", "busy")
            .await
            .unwrap()
            .alarm
            .unwrap();
        assert_eq!(
            alarm.retry_count, 0,
            "a lock timeout is not a handler failure"
        );
        at = alarm.fire_at;
    }
    assert!(rec.runs.lock().unwrap().is_empty());
    holder.close().await.unwrap();
    env.clock.set(at);
    assert_eq!(sub.alarms().fire_due().await.unwrap(), fired(1));
    assert_eq!(rec.runs.lock().unwrap()[0].1.retry_count, 0);
}
