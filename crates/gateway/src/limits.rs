//! Free-model limits per client address (reference §1.4–1.6): at most 200 free-model requests
//! per hour from one address, signed in or not, and at most 10,000 anonymous ones per 24 h (the
//! "promotion" limit, after which anonymous callers are asked to sign in). Counted by one
//! `free_use` actor per address, in minute buckets; a request is counted when it is admitted,
//! before it is forwarded.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kilocloud_substrate::{Actor, ActorContext, Result as SubResult, Substrate};

const BUCKETS: &str = "buckets";
const MINUTE_MS: i64 = 60_000;
const DAY_MINUTES: i64 = 24 * 60;

/// The limits; defaults are the reference's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeLimits {
    /// Free-model requests per address per hour. Default 200.
    pub per_hour: u32,
    /// Anonymous free-model requests per address per 24 h. Default 10,000.
    pub anonymous_per_day: u32,
}

impl Default for FreeLimits {
    fn default() -> Self {
        Self {
            per_hour: 200,
            anonymous_per_day: 10_000,
        }
    }
}

/// Why a free-model request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The hourly limit: retry after this many seconds.
    Hourly {
        /// Seconds until a request is counted out of the window.
        retry_after_secs: u64,
    },
    /// The anonymous 24-hour limit: sign in.
    Promotion,
}

struct FreeUseActor;

struct Admit {
    anonymous: bool,
    limits: FreeLimits,
}

impl Actor for FreeUseActor {
    const TYPE: &'static str = "free_use";
    type Call = Admit;
    type Reply = Result<(), Refusal>;

    async fn call(&self, ctx: &mut ActorContext, call: Admit) -> SubResult<Result<(), Refusal>> {
        let now_min = ctx.now_ms().div_euclid(MINUTE_MS);
        let mut buckets: BTreeMap<i64, [u32; 2]> = ctx.get(BUCKETS).await?.unwrap_or_default();
        buckets.retain(|&m, _| m > now_min - DAY_MINUTES);
        let hour: Vec<(i64, u32)> = buckets
            .range(now_min - 59..)
            .map(|(&m, c)| (m, c[0]))
            .collect();
        let in_hour: u32 = hour.iter().map(|(_, c)| c).sum();
        if in_hour >= call.limits.per_hour {
            let oldest = hour.first().map_or(now_min, |(m, _)| *m);
            let retry_after_secs = ((oldest + 60 - now_min).max(1) * 60) as u64;
            return Ok(Err(Refusal::Hourly { retry_after_secs }));
        }
        if call.anonymous {
            let anonymous: u32 = buckets.values().map(|c| c[1]).sum();
            if anonymous >= call.limits.anonymous_per_day {
                return Ok(Err(Refusal::Promotion));
            }
        }
        let bucket = buckets.entry(now_min).or_default();
        bucket[0] += 1;
        bucket[1] += u32::from(call.anonymous);
        ctx.put(BUCKETS, &buckets)?;
        Ok(Ok(()))
    }
}

/// The free-model limiter.
#[derive(Clone)]
pub struct FreeModelLimiter {
    sub: Substrate,
    limits: FreeLimits,
}

impl FreeModelLimiter {
    /// Registers the `free_use` actor on `sub` (before [`Substrate::start`]).
    pub fn new(sub: &Substrate, limits: FreeLimits) -> Self {
        sub.actors().register(FreeUseActor);
        Self {
            sub: sub.clone(),
            limits,
        }
    }

    /// Counts a free-model request from `ip`, or refuses it.
    pub async fn admit(
        &self,
        ip: IpAddr,
        anonymous: bool,
    ) -> kilocloud_substrate::Result<Result<(), Refusal>> {
        let call = Admit {
            anonymous,
            limits: self.limits,
        };
        self.sub
            .actors()
            .call::<FreeUseActor>(&format!("ip:{ip}"), call)
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kilocloud_substrate::ManualClock;
    use kilocloud_test_support::TestStore;

    use super::*;

    #[tokio::test]
    async fn hourly_and_promotion_limits_count_per_address() {
        let store = TestStore::new(false).await;
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let sub = store.open(clock.clone()).await;
        let limits = FreeLimits {
            per_hour: 3,
            anonymous_per_day: 5,
        };
        let l = FreeModelLimiter::new(&sub, limits);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(l.admit(a, true).await.unwrap(), Ok(()));
        }
        let Err(Refusal::Hourly { retry_after_secs }) = l.admit(a, false).await.unwrap() else {
            panic!("the fourth request in an hour is refused");
        };
        assert_eq!(retry_after_secs, 3600);
        assert_eq!(
            l.admit(b, true).await.unwrap(),
            Ok(()),
            "another address has its own budget"
        );
        clock.advance(60 * MINUTE_MS);
        assert_eq!(
            l.admit(a, true).await.unwrap(),
            Ok(()),
            "an hour later the window has moved"
        );
        assert_eq!(l.admit(a, true).await.unwrap(), Ok(()));
        clock.advance(60 * MINUTE_MS);
        assert_eq!(
            l.admit(a, true).await.unwrap(),
            Err(Refusal::Promotion),
            "5 anonymous in 24 h"
        );
        assert_eq!(
            l.admit(a, false).await.unwrap(),
            Ok(()),
            "signed-in callers are not promoted"
        );
        clock.advance(DAY_MINUTES * MINUTE_MS);
        assert_eq!(l.admit(a, true).await.unwrap(), Ok(()));
    }
}
