//! KiloClaw on the `fly` provider against the fake Fly Machines API, on SQLite and
//! PostgreSQL, with an injected clock: the lifecycle and env encryption; two-phase destroy
//! under 30% injected failures (and lost replies) leaving zero machines and volumes once the
//! alarms have run; every reconciliation rule (a machine found down restarted, 5 failed
//! restarts 10 s apart mark it stopped, a down report reconciles at once, 404, started while
//! stopped, metadata recovery with its cooldown, mount repair, a lost volume recreated);
//! capacity errors (region rotation, fork); no duplicate after a transient error; restore
//! after the instance's state is lost.

use std::sync::Arc;

use kilocloud_claw::fly::{FlyConfig, FlyProvider};
use kilocloud_claw::instance::{InstanceState, Status};
use kilocloud_claw::provider::{ComputeProvider, Guest, MachineDown, VolumeSpec};
use kilocloud_claw::registry::{InstanceRow, RegistryActor, RegistryCall};
use kilocloud_claw::{
    AlarmCadence, Claw, ClawConfig, ClawError, CreateInstance, InstanceRef, ProviderKind,
};
use kilocloud_identity::envelope::{MasterKey, MasterKeys};
use kilocloud_identity::model::Initiator;
use kilocloud_identity::{Identity, IdentityConfig, Owner};
use kilocloud_substrate::{Clock as _, ManualClock, Substrate, Tuning};
use kilocloud_test_support::fake_flyio::FakeFly;
use kilocloud_test_support::{TestStore, on_both_backends};
use uuid::Uuid;

/// 2027-01-01T00:00:00Z.
const T0: i64 = 1_798_761_600_000;
const FLY_TOKEN: &str = "fly-test-token";
const MINUTE: i64 = 60_000;

struct Env {
    _store: TestStore,
    sub: Substrate,
    identity: Identity,
    clock: Arc<ManualClock>,
    claw: Claw,
    fly: FakeFly,
    provider: Arc<FlyProvider>,
    user: Uuid,
    by: Initiator,
}

async fn env(pg: bool) -> Env {
    env_with(pg, Tuning::default()).await
}

async fn env_with(pg: bool, tuning: Tuning) -> Env {
    let store = TestStore::new(pg).await;
    let clock = Arc::new(ManualClock::new(T0));
    let sub = store.open_with(clock.clone(), tuning).await;
    let identity = Identity::new(
        &sub,
        IdentityConfig {
            jwt_secret: b"claw-test-jwt-secret-0123456789".to_vec(),
            master_keys: MasterKeys::new(
                MasterKey::parse(
                    "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
                )
                .unwrap(),
                vec![],
            ),
            internal_api_secret: None,
        },
    );
    let fly = FakeFly::start(FLY_TOKEN).await;
    let provider = Arc::new(
        FlyProvider::new(FlyConfig {
            api_url: fly.url(),
            api_token: FLY_TOKEN.into(),
            // The limiter is unit-tested; here it must not slow retries down.
            rate_per_second: 10_000,
            rate_burst: 10_000,
            ..FlyConfig::default()
        })
        .unwrap(),
    );
    let config = ClawConfig {
        provider: ProviderKind::Fly,
        gateway_token_secret: "gateway-secret".into(),
        regions: ["dfw", "yyz", "cdg"].map(String::from).to_vec(),
        alarm: AlarmCadence {
            idle_ms: 10 * MINUTE,
            jitter_ms: 0,
            ..AlarmCadence::default()
        },
        startup_timeout_ms: 1_000,
        ..ClawConfig::default()
    };
    let claw = Claw::new(
        &sub,
        identity.clone(),
        config,
        provider.clone(),
        "https://cloud.example.com/api/openrouter/".into(),
    );
    let system = Initiator {
        user: Uuid::nil(),
        request_id: None,
    };
    let (user, _, _) = identity
        .create_user("claw@example.com", "claw", false, &system)
        .await
        .unwrap();
    Env {
        _store: store,
        sub,
        identity: identity.clone(),
        clock,
        claw,
        fly,
        provider,
        user: user.id,
        by: Initiator {
            user: user.id,
            request_id: None,
        },
    }
}

impl Env {
    async fn create(&self, start: bool) -> InstanceRef {
        let request = CreateInstance {
            name: "fly".into(),
            secrets: [("API_TOKEN".to_owned(), "s3cr3t".to_owned())].into(),
            start: Some(start),
            ..CreateInstance::default()
        };
        let view = self
            .claw
            .create(Owner::User(self.user), self.user, request, &self.by)
            .await
            .unwrap();
        self.claw
            .find(Owner::User(self.user), view.id)
            .await
            .unwrap()
    }

    async fn state(&self, found: &InstanceRef) -> InstanceState {
        self.claw.state(&found.key).await.unwrap()
    }

    /// Advances the clock by `ms` and runs every alarm due.
    async fn tick(&self, ms: i64) {
        self.clock.advance(ms);
        self.sub.alarms().fire_due().await.unwrap();
    }

    fn app(&self) -> String {
        kilocloud_claw::ids::app_name("acct", &Owner::User(self.user).to_string())
    }

    fn machine_json(&self, id: &str) -> serde_json::Value {
        self.fly
            .machines(&self.app())
            .into_iter()
            .find(|m| m["id"] == id)
            .expect("machine")
    }

    fn requests_since(&self, from: usize, method: &str, path_end: &str) -> usize {
        self.fly.requests()[from..]
            .iter()
            .filter(|r| r.method == method && r.path.ends_with(path_end))
            .count()
    }
}

async fn lifecycle_and_env_encryption(pg: bool) {
    let e = env(pg).await;
    let found = e.create(true).await;
    let s = e.state(&found).await;
    assert_eq!(s.status, Some(Status::Running));
    assert_eq!(s.region.as_deref(), Some("dfw"));
    assert_eq!((e.fly.machine_count(), e.fly.volume_count()), (1, 1));
    let machine = e.machine_json(s.machine_id.as_deref().unwrap());
    assert_eq!(machine["name"], s.sandbox_id);
    let env_vars = &machine["config"]["env"];
    for name in ["KILOCODE_API_KEY", "OPENCLAW_GATEWAY_TOKEN", "API_TOKEN"] {
        assert!(
            env_vars.get(name).is_none(),
            "{name} is never sent in the clear"
        );
        let sealed = env_vars[format!("KILOCLAW_ENC_{name}")].as_str().unwrap();
        assert!(sealed.starts_with("enc:v1:"), "{sealed}");
    }
    assert_eq!(env_vars["AUTO_APPROVE_DEVICES"], "true");
    assert!(!machine.to_string().contains("s3cr3t"));
    // The key reaches the machine only as an app secret; with it, the env opens.
    let key = e
        .fly
        .secret(&e.app(), "KILOCLAW_ENV_KEY")
        .expect("env key secret");
    let mut vars: std::collections::BTreeMap<String, String> =
        serde_json::from_value(env_vars.clone()).unwrap();
    vars.insert("KILOCLAW_ENV_KEY".into(), key);
    let opened = kilocloud_claw::crypto::open_env(vars).unwrap();
    assert_eq!(opened["API_TOKEN"], "s3cr3t");
    assert_eq!(
        opened["OPENCLAW_GATEWAY_TOKEN"],
        e.claw.gateway_token(&s.sandbox_id)
    );
    assert_eq!(
        machine["config"]["metadata"]["kiloclaw_sandbox_id"],
        s.sandbox_id
    );

    e.claw.stop(&found).await.unwrap();
    assert_eq!(e.state(&found).await.status, Some(Status::Stopped));
    assert_eq!(
        e.machine_json(s.machine_id.as_deref().unwrap())["state"],
        "stopped"
    );
    e.claw.start(&found).await.unwrap();
    let again = e.state(&found).await;
    assert_eq!(again.status, Some(Status::Running));
    assert_eq!(
        again.machine_id, s.machine_id,
        "the same machine is started again"
    );

    assert!(e.claw.destroy(&found).await.unwrap());
    assert_eq!((e.fly.machine_count(), e.fly.volume_count()), (0, 0));
    assert_eq!(e.state(&found).await, InstanceState::default());
    assert!(
        e.claw
            .find(Owner::User(e.user), found.row.id)
            .await
            .is_err()
    );
}

async fn destroy_under_injected_failures_leaves_nothing(pg: bool) {
    let e = env(pg).await;
    let mut instances = Vec::new();
    for _ in 0..6 {
        instances.push(e.create(true).await);
    }
    assert_eq!((e.fly.machine_count(), e.fly.volume_count()), (6, 6));
    let from = e.fly.requests().len();
    e.fly.set_failure_rate(0.3, 7);
    e.fly.set_lost_reply_rate(0.1, 11);
    for found in &instances {
        // Phase 1 is local and always lands; phase 2 may leave work for the alarm.
        e.claw.destroy(found).await.unwrap();
        let s = e.state(found).await;
        assert!(
            s.status.is_none() || s.status == Some(Status::Destroying),
            "{s:?}"
        );
    }
    for _ in 0..40 {
        e.tick(MINUTE + 1).await;
    }
    for found in &instances {
        assert_eq!(e.state(found).await, InstanceState::default(), "wiped");
    }
    assert_eq!((e.fly.machine_count(), e.fly.volume_count()), (0, 0));
    assert_eq!(
        e.requests_since(from, "POST", "/machines") + e.requests_since(from, "POST", "/volumes"),
        0,
        "destroying never recreates anything"
    );
    assert!(
        e.sub.alarms().fire_due().await.unwrap().fired == 0,
        "no alarm left"
    );
}

async fn reconciliation_rules(pg: bool) {
    let e = env(pg).await;
    let found = e.create(true).await;
    let s = e.state(&found).await;
    let (app, machine) = (e.app(), s.machine_id.clone().unwrap());

    // Running, but Fly says stopped (the runtime crashed): the alarm that finds it starts
    // the machine again.
    e.fly.set_machine_state(&app, &machine, "stopped");
    e.tick(5 * MINUTE + 1).await;
    let s = e.state(&found).await;
    assert_eq!(
        (
            s.status,
            s.health_check_fail_count,
            e.machine_json(&machine)["state"].clone()
        ),
        (Some(Status::Running), 0, serde_json::json!("started"))
    );
    assert_eq!(s.last_started_at, Some(e.clock.now_ms()));

    // Restarts that fail are retried every 10 s; the 5th failure in a row marks it stopped.
    e.fly.set_machine_state(&app, &machine, "stopped");
    e.fly
        .fail_next(&format!("/machines/{machine}"), "POST", 5, 500, "boom");
    e.tick(5 * MINUTE + 1).await;
    for n in 1..5 {
        let s = e.state(&found).await;
        assert_eq!(
            (s.status, s.health_check_fail_count),
            (Some(Status::Running), n)
        );
        e.tick(10_000).await;
    }
    let s = e.state(&found).await;
    assert_eq!(
        (s.status, s.health_check_fail_count),
        (Some(Status::Stopped), 0)
    );
    assert_eq!(e.machine_json(&machine)["state"], "stopped");

    // Stopped, but Fly says started: running again.
    e.fly.set_machine_state(&app, &machine, "started");
    e.tick(10 * MINUTE + 1).await;
    assert_eq!(e.state(&found).await.status, Some(Status::Running));

    // The machine is gone (404): stopped at once, id cleared.
    e.fly.remove_machine(&app, &machine);
    e.tick(5 * MINUTE + 1).await;
    let s = e.state(&found).await;
    assert_eq!(
        (s.status, s.machine_id.clone()),
        (Some(Status::Stopped), None)
    );

    // No machine id: metadata recovery, at most every 30 min.
    let lists = |from| e.requests_since(from, "GET", "/machines");
    let from = e.fly.requests().len();
    e.tick(10 * MINUTE + 1).await;
    assert_eq!(lists(from), 1, "first recovery attempt");
    e.tick(10 * MINUTE + 1).await;
    assert_eq!(lists(from), 1, "within the cooldown");
    let volume = s.volume_id.clone().unwrap();
    let meta = [
        ("kiloclaw_sandbox_id", s.sandbox_id.as_str()),
        ("kiloclaw_user_id", "x"),
    ];
    let stale = e
        .fly
        .insert_machine(&app, "old", "dfw", &meta, "stopped", None);
    let adopted = e
        .fly
        .insert_machine(&app, "new", "dfw", &meta, "started", None);
    e.tick(10 * MINUTE + 1).await;
    assert_eq!(lists(from), 1, "still within the cooldown (20 min)");
    e.tick(10 * MINUTE + 1).await;
    assert_eq!(lists(from), 2, "after the cooldown");
    let s = e.state(&found).await;
    assert_eq!(
        s.machine_id.as_deref(),
        Some(adopted.as_str()),
        "started ranks first over {stale}"
    );
    assert_eq!(s.status, Some(Status::Running));

    // Mount drift: the adopted machine lacks the volume at /root; the alarm repairs it.
    assert_eq!(
        e.machine_json(&adopted)["config"]["mounts"],
        serde_json::Value::Null
    );
    e.tick(5 * MINUTE + 1).await;
    let mounts = &e.machine_json(&adopted)["config"]["mounts"];
    assert_eq!(mounts[0]["volume"], volume.as_str(), "{mounts}");
    assert_eq!(mounts[0]["path"], "/root");
    assert_eq!(e.machine_json(&adopted)["state"], "started");

    // The volume is lost: logged as data loss, recreated; the mount follows.
    e.fly.remove_volume(&app, &volume);
    e.tick(5 * MINUTE + 1).await;
    let s = e.state(&found).await;
    let new_volume = s.volume_id.clone().unwrap();
    assert_ne!(new_volume, volume);
    e.tick(5 * MINUTE + 1).await;
    let mounts = &e.machine_json(&adopted)["config"]["mounts"];
    assert_eq!(mounts[0]["volume"], new_volume.as_str(), "{mounts}");
}

/// A provider's report that a runtime went down moves the instance's alarm to now: it is
/// restarted without waiting for the 5-minute alarm. Reports of another machine, or for an
/// instance that is not running, change nothing.
async fn a_machine_reported_down_is_restarted_at_once(pg: bool) {
    let e = env(pg).await;
    let found = e.create(true).await;
    let s = e.state(&found).await;
    let (app, machine) = (e.app(), s.machine_id.clone().unwrap());
    let report = |machine_id: &str| MachineDown {
        app: app.clone(),
        machine_id: machine_id.to_owned(),
        sandbox_id: s.sandbox_id.clone(),
    };
    e.fly.set_machine_state(&app, &machine, "stopped");
    e.claw.machine_down(&report("another")).await.unwrap();
    e.tick(0).await;
    assert_eq!(
        e.machine_json(&machine)["state"],
        "stopped",
        "another machine's report"
    );
    e.claw.machine_down(&report(&machine)).await.unwrap();
    e.tick(0).await;
    assert_eq!(e.machine_json(&machine)["state"], "started");
    let s = e.state(&found).await;
    assert_eq!(
        (s.status, s.last_started_at),
        (Some(Status::Running), Some(e.clock.now_ms()))
    );
    // Stopped on purpose: a late report does not start it again.
    let view = e.claw.stop(&found).await.unwrap();
    assert_eq!(view.status, "stopped");
    e.claw.machine_down(&report(&machine)).await.unwrap();
    e.tick(0).await;
    assert_eq!(e.machine_json(&machine)["state"], "stopped");
    assert_eq!(e.state(&found).await.status, Some(Status::Stopped));
    // A report of an unknown sandbox is ignored.
    let unknown = MachineDown {
        sandbox_id: "not a sandbox id!".into(),
        ..report(&machine)
    };
    e.claw.machine_down(&unknown).await.unwrap();
}

async fn capacity_errors_move_the_region_and_fork(pg: bool) {
    let e = env(pg).await;
    let found = e.create(true).await;
    let s = e.state(&found).await;
    let (app, machine, old_volume) = (
        e.app(),
        s.machine_id.clone().unwrap(),
        s.volume_id.clone().unwrap(),
    );
    e.claw.stop(&found).await.unwrap();
    // The host is gone and dfw is full: the next start must create a machine elsewhere.
    e.fly.remove_machine(&app, &machine);
    e.fly.set_region_exhausted("dfw", true);
    e.claw.start(&found).await.unwrap();
    let s = e.state(&found).await;
    assert_eq!(s.status, Some(Status::Running));
    assert_eq!(s.region.as_deref(), Some("yyz"));
    let new_volume = s.volume_id.clone().unwrap();
    assert_eq!(
        e.fly.forked_from(&app, &new_volume).as_deref(),
        Some(old_volume.as_str()),
        "a volume with user data is forked, not replaced"
    );
    assert_eq!(e.fly.volume_count(), 1, "the stranded volume is deleted");
    assert_eq!(e.fly.machine_count(), 1);
    assert_eq!(
        s.config.region.as_deref(),
        Some("yyz"),
        "dfw moved to the end"
    );
}

async fn transient_errors_never_create_duplicates(pg: bool) {
    let e = env(pg).await;
    let found = e.create(true).await;
    let s = e.state(&found).await;
    let machine = s.machine_id.clone().unwrap();
    e.fly.set_machine_state(&e.app(), &machine, "stopped");
    e.fly.fail_next(
        &format!("/machines/{machine}"),
        "GET",
        1,
        503,
        "{\"error\":\"flaky\"}",
    );
    // The status says running: start first confirms the machine, and the 503 stops it there.
    let err = e.claw.start(&found).await.unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(e.fly.machine_count(), 1);
    e.claw.start(&found).await.unwrap();
    let s = e.state(&found).await;
    assert_eq!(s.machine_id.as_deref(), Some(machine.as_str()));
    assert_eq!(e.fly.machine_count(), 1, "no duplicate");
    assert_eq!(e.machine_json(&machine)["state"], "started");
}

async fn restore_after_state_loss(pg: bool) {
    let e = env(pg).await;
    // What survives a wiped instance actor: its registry row, and the machine and volume
    // on Fly, found through their metadata.
    let id = Uuid::new_v4();
    let owner = Owner::User(e.user).to_string();
    let sandbox = kilocloud_claw::ids::SandboxId::for_instance(id);
    let app = e.app();
    e.provider.create_app(&app).await.unwrap();
    let volume = e
        .provider
        .create_volume(
            &app,
            &VolumeSpec {
                name: kilocloud_claw::ids::volume_name(&sandbox),
                size_gb: 10,
                region: "cdg".into(),
                compute: Guest::default(),
                source_volume_id: None,
            },
        )
        .await
        .unwrap();
    let machine = e.fly.insert_machine(
        &app,
        &sandbox,
        "cdg",
        &[("kiloclaw_sandbox_id", sandbox.as_str())],
        "stopped",
        Some(&volume.id),
    );
    let row = InstanceRow {
        id,
        owner: owner.clone(),
        user_id: e.user,
        org_id: None,
        sandbox_id: sandbox.clone(),
        name: "restored".into(),
        created_at: T0,
        destroyed_at: None,
    };
    e.sub
        .actors()
        .call::<RegistryActor>(&owner, RegistryCall::Insert { row, limit: 10 })
        .await
        .unwrap()
        .unwrap();
    let found = e.claw.find(Owner::User(e.user), id).await.unwrap();
    e.claw.start(&found).await.unwrap();
    let s = e.state(&found).await;
    assert_eq!(s.status, Some(Status::Running));
    assert_eq!(
        s.machine_id.as_deref(),
        Some(machine.as_str()),
        "adopted, not recreated"
    );
    assert_eq!(s.volume_id.as_deref(), Some(volume.id.as_str()));
    assert_eq!(s.region.as_deref(), Some("cdg"));
    assert_eq!((e.fly.machine_count(), e.fly.volume_count()), (1, 1));
    assert!(e.claw.destroy(&found).await.unwrap());
    assert_eq!((e.fly.machine_count(), e.fly.volume_count()), (0, 0));
    // A start that comes after the destroy (it raced it, holding the old row) restores
    // nothing.
    assert!(matches!(
        e.claw.start(&found).await,
        Err(ClawError::NotFound)
    ));
    assert_eq!((e.fly.machine_count(), e.fly.volume_count()), (0, 0));
    assert_eq!(e.state(&found).await.status, None);
}

/// Provisioning an id another owner holds is refused without touching that instance; a
/// destroyed legacy instance (its id is the user's) can be provisioned again.
async fn provisioning_ids(pg: bool) {
    let e = env(pg).await;
    let victim = e.create(true).await;
    let org = Owner::Org(Uuid::new_v4());
    let taken = e
        .claw
        .provision_instance(org, e.user, victim.row.id, CreateInstance::default(), &e.by)
        .await;
    assert!(matches!(taken, Err(ClawError::Conflict(_))), "{taken:?}");
    let s = e.state(&victim).await;
    assert_eq!(
        s.status,
        Some(Status::Running),
        "the owner's instance is intact"
    );
    assert_eq!(e.fly.machine_count(), 1);
    assert!(
        e.claw.list(org).await.unwrap().is_empty(),
        "no row left behind"
    );

    let legacy = e
        .claw
        .provision_legacy(e.user, CreateInstance::default(), &e.by)
        .await
        .unwrap();
    assert_eq!(legacy.id, e.user);
    let found = e.claw.find(Owner::User(e.user), e.user).await.unwrap();
    assert!(e.claw.destroy(&found).await.unwrap());
    let again = e
        .claw
        .provision_legacy(e.user, CreateInstance::default(), &e.by)
        .await
        .unwrap();
    assert_eq!(again.id, e.user);
    assert_eq!(again.sandbox_id, legacy.sandbox_id);
}

/// 24 starts at once, each waiting on a slow provider, leave the database sessions to
/// everyone else: the lifecycle calls wait on the provider suspended, without a session
/// (the store has 6 session slots; each start waits seconds on the provider), so other
/// actors' calls are served meanwhile instead of answering `Overloaded`, and every start
/// completes.
async fn concurrent_starts_leave_sessions_for_other_actors(pg: bool) {
    let e = env_with(
        pg,
        Tuning {
            actor_lock_wait_ms: 1_500,
            ..Tuning::default()
        },
    )
    .await;
    e.fly.set_latency(std::time::Duration::from_millis(150));
    let identity = e.identity.clone();
    let mut owners = vec![(e.user, e.by.clone())];
    for i in 1..3 {
        let (user, _, _) = identity
            .create_user(&format!("claw{i}@example.com"), "claw", false, &e.by)
            .await
            .unwrap();
        let by = Initiator {
            user: user.id,
            request_id: None,
        };
        owners.push((user.id, by));
    }
    let starts: Vec<_> = owners
        .iter()
        .flat_map(|(user, by)| (0..8).map(move |_| (*user, by.clone())))
        .map(|(user, by)| {
            let claw = e.claw.clone();
            tokio::spawn(async move {
                let request = CreateInstance {
                    name: "busy".into(),
                    start: Some(true),
                    ..CreateInstance::default()
                };
                claw.create(Owner::User(user), user, request, &by).await
            })
        })
        .collect();
    // Meanwhile other actors are called, one after another, as long as starts run.
    let mut served = 0;
    while starts.iter().any(|s| !s.is_finished()) {
        identity
            .create_org(&format!("org-{served}"), &e.by)
            .await
            .expect("other actors are served while the starts wait on the provider");
        served += 1;
    }
    for start in starts {
        let view = start.await.unwrap().expect("every start completes");
        assert_eq!(view.status, "running");
    }
    assert!(served > 0);
}

on_both_backends!(
    concurrent_starts_leave_sessions_for_other_actors,
    provisioning_ids,
    lifecycle_and_env_encryption,
    destroy_under_injected_failures_leaves_nothing,
    reconciliation_rules,
    a_machine_reported_down_is_restarted_at_once,
    capacity_errors_move_the_region_and_fork,
    transient_errors_never_create_duplicates,
    restore_after_state_loss,
);
