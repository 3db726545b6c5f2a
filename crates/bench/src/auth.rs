//! Authentication cost: what every gateway request pays before any work. Measures
//! `Identity::authenticate` for a user JWT (signature, then the pepper read) and an API key
//! (hash, index read, record read, creator read), and an API key with organization scope (one
//! more read, the membership), beside the reference in the same run: verifying the JWT's
//! signature and claims alone, with no storage.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use kilocloud_identity::credential::TokenSigner;
use kilocloud_identity::envelope::{MasterKey, MasterKeys};
use kilocloud_identity::model::Initiator;
use kilocloud_identity::{Identity, IdentityConfig, Owner, Role};
use uuid::Uuid;

use crate::report::{histogram, p50_p99, rate};
use crate::{Args, Backend};

const SECRET: &[u8] = b"bench-jwt-secret-0123456789abcdef";
const IN_FLIGHT: usize = 32;

struct Row {
    what: String,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Throughput with [`IN_FLIGHT`] checks in flight; latency one check at a time (so it is the
/// check's own cost, not queueing), after a warm-up that fills the connection pool.
async fn measure<F, Fut>(what: String, total: usize, op: F) -> Row
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    pass(total / 10, IN_FLIGHT, &op).await;
    let (rate, _, _) = pass(total, IN_FLIGHT, &op).await;
    let (_, p50_ms, p99_ms) = pass(total / 4, 1, &op).await;
    Row {
        what,
        rate,
        p50_ms,
        p99_ms,
    }
}

/// `total` checks, `in_flight` at a time: (checks/s, p50 ms, p99 ms).
async fn pass<F, Fut>(total: usize, in_flight: usize, op: &F) -> (f64, f64, f64)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let hist = Arc::new(std::sync::Mutex::new(histogram()));
    let start = Instant::now();
    futures::stream::iter(0..total)
        .map(|_| {
            let hist = hist.clone();
            let fut = op();
            async move {
                let t = Instant::now();
                fut.await;
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
    (rate(total as u64, elapsed), p50_ms, p99_ms)
}

/// Runs the group on both backends and returns its Markdown section.
pub async fn run(args: &Args) -> anyhow::Result<String> {
    let total = if args.quick { 2_000 } else { 50_000 };
    let mut rows = Vec::new();
    for postgres in [false, true] {
        let backend = Backend::open(postgres).await?;
        let id = Identity::new(
            &backend.substrate,
            IdentityConfig {
                jwt_secret: SECRET.to_vec(),
                master_keys: MasterKeys::new(MasterKey::generate().0, vec![]),
                internal_api_secret: None,
            },
        );
        let system = Initiator {
            user: Uuid::nil(),
            request_id: None,
        };
        let (user, user_key, _) = id
            .create_user("bench@example.com", "bench", false, &system)
            .await?;
        let by = Initiator {
            user: user.id,
            request_id: None,
        };
        let org = id.create_org("bench", &by).await?;
        let (org_key, _) = id
            .create_api_key(Owner::Org(org.id), "bench", None, &by)
            .await?;
        let (jwt, _) = id.issue_jwt(user.id, None, None, 3600, &by).await?;
        if !postgres {
            let signer = Arc::new(TokenSigner::new(SECRET));
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs() as i64;
            rows.push(
                measure(
                    "reference: JWT signature and claims only".into(),
                    total,
                    || {
                        let (signer, jwt) = (signer.clone(), jwt.clone());
                        async move {
                            signer.verify(&jwt, now).expect("valid");
                        }
                    },
                )
                .await,
            );
        }
        let name = backend.name;
        rows.push(
            measure(format!("{name}: user JWT"), total, || {
                let (id, jwt) = (id.clone(), jwt.clone());
                async move {
                    id.authenticate(&jwt).await.expect("valid");
                }
            })
            .await,
        );
        rows.push(
            measure(format!("{name}: API key"), total, || {
                let (id, key) = (id.clone(), user_key.clone());
                async move {
                    id.authenticate(&key).await.expect("valid");
                }
            })
            .await,
        );
        rows.push(
            measure(format!("{name}: org API key + org scope"), total, || {
                let (id, key) = (id.clone(), org_key.clone());
                async move {
                    let p = id.authenticate(&key).await.expect("valid");
                    let scope = id.scope(&p, None).await.expect("member");
                    assert_eq!(scope.role, Role::Owner);
                }
            })
            .await,
        );
        backend
            .substrate
            .shutdown(std::time::Duration::from_secs(5))
            .await;
    }
    let reference = rows[0].p50_ms;
    let mut out = format!(
        "### Authentication ({total} checks at {IN_FLIGHT} in flight for checks/s; latency one at a time)\n\n\
         | credential | checks/s | p50 ms | p99 ms | p50 vs signature only |\n|---|---:|---:|---:|---:|\n"
    );
    for r in &rows {
        out += &format!(
            "| {} | {:.0} | {:.3} | {:.3} | {:.1}× |\n",
            r.what,
            r.rate,
            r.p50_ms,
            r.p99_ms,
            r.p50_ms / reference.max(0.001)
        );
    }
    out.push('\n');
    Ok(out)
}
