//! Free-model limits per client address (reference §1.4–1.6): at most 200 free-model requests
//! per hour from one address, signed in or not, and at most 10,000 anonymous ones per 24 h (the
//! "promotion" limit, after which anonymous callers are asked to sign in). Counted by one
//! `free_use` actor per address, in minute buckets; a request is counted when it is admitted,
//! before it is forwarded. Also the sliding-window token counter behind the tokens-per-minute
//! limits ([`TokenWindow`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use kilocloud_substrate::{Actor, ActorContext, Result as SubResult, Substrate};
use serde::{Deserialize, Serialize};

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

/// Tokens counted in a sliding one-minute window, as two fixed minute buckets weighted by
/// how much of the previous minute still lies in the window (the sliding-window counter that
/// Cloudflare's rate limiting uses). Kept per owner and per credential by the ledger; tokens
/// are counted after a request, since only its usage tells them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenWindow {
    /// The current bucket's minute (ms since epoch ÷ 60,000).
    pub minute: i64,
    /// Tokens in the current minute.
    pub current: u64,
    /// Tokens in the minute before it.
    pub previous: u64,
}

impl TokenWindow {
    /// The window as seen at minute `now_min`: buckets moved forward, older ones dropped.
    fn at(self, now_min: i64) -> Self {
        match now_min - self.minute {
            // Not later than the current bucket (a request that started before a concurrent
            // one was counted, or another node's clock): the window as it is.
            ..=0 => self,
            1 => Self {
                minute: now_min,
                current: 0,
                previous: self.current,
            },
            _ => Self {
                minute: now_min,
                current: 0,
                previous: 0,
            },
        }
    }

    /// Adds `tokens` counted at `now_ms`.
    pub fn add(self, now_ms: i64, tokens: u64) -> Self {
        let mut w = self.at(now_ms.div_euclid(MINUTE_MS));
        w.current = w.current.saturating_add(tokens);
        w
    }

    /// `Err(seconds to wait)` when the window at `now_ms` already holds `limit` tokens or
    /// more (a `limit` of 0 admits everything); the wait is until the estimate drops below
    /// `limit` if nothing else is counted, rounded up to whole seconds, at least 1.
    pub fn check(self, now_ms: i64, limit: u64) -> Result<(), u64> {
        const M: u128 = MINUTE_MS as u128;
        let w = self.at(now_ms.div_euclid(MINUTE_MS));
        let elapsed = now_ms.rem_euclid(MINUTE_MS) as u128;
        let (limit, cur, prev) = (
            u128::from(limit),
            u128::from(w.current),
            u128::from(w.previous),
        );
        // Everything scaled by a minute in ms, so the arithmetic is exact.
        if limit == 0 || prev * (M - elapsed) + cur * M < limit * M {
            return Ok(());
        }
        // First ms `e` of a minute at which `weighted * (M - e) + rest * M < limit * M`.
        let first_ms = |weighted: u128, rest: u128| M - ((limit - rest) * M - 1) / weighted;
        let wait_ms = if cur < limit {
            // Within this minute, as the previous minute slides out.
            first_ms(prev, cur) - elapsed
        } else {
            // In the next minute, as this one becomes the weighted bucket.
            (M - elapsed) + first_ms(cur, 0)
        };
        Err(wait_ms.div_ceil(1000).max(1) as u64)
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

    #[test]
    fn token_window_slides_over_two_minutes() {
        let t0 = 1_800_000_000_000 - 1_800_000_000_000 % MINUTE_MS;
        let w = TokenWindow::default().add(t0, 600);
        assert_eq!(w.check(t0, 1000), Ok(()));
        assert_eq!(w.check(t0, 0), Ok(()), "0 is no limit");
        let w = w.add(t0 + 30_000, 400);
        // 1,000 in this minute: the rest of it, then 1 ms of the next, before it is below.
        assert_eq!(w.check(t0 + 30_000, 1000), Err(31));
        // A quarter into the next minute, 750 of the old 1,000 still count.
        let next = t0 + MINUTE_MS + 15_000;
        assert_eq!(w.check(next, 1000), Ok(()));
        // Below 700 once the old bucket weighs under 0.7: 3.001 s on.
        assert_eq!(w.check(next, 700), Err(4));
        let w = w.add(next, 200);
        assert_eq!((w.current, w.previous), (200, 1000));
        assert_eq!(
            w.check(next, 900),
            Err(4),
            "750 + 200 ≥ 900 until the weight is 0.7"
        );
        assert_eq!(w.check(next, 1000), Ok(()));
        assert_eq!(
            w.check(t0 + 3 * MINUTE_MS, 1),
            Ok(()),
            "two minutes on, all gone"
        );
        assert_eq!(
            w.add(t0, 5),
            TokenWindow { current: 205, ..w },
            "a late count joins the current bucket instead of emptying the window"
        );
    }
}
