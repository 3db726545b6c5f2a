//! Access codes (reference kilo-cloud.md §2 "Access-code issuance" and
//! `POST /kilo-access-gateway`), one actor per user (`claw_access`, keyed by user id): at
//! most one active code per user (issuing expires the previous one), valid 10 min, redeemed
//! once, atomically (the check and the flip are one actor call). The actor's alarm deletes a
//! code once it has expired (the reference's daily clean-up).

use kilocloud_substrate::{Actor, ActorContext, AlarmInfo, Result, UnixMs};
use serde::{Deserialize, Serialize};

use crate::crypto;

const CODE: &str = "code";
/// How long a code is valid, ms (reference: 10 min).
pub const ACCESS_CODE_TTL_MS: i64 = 10 * 60 * 1000;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredCode {
    /// SHA-256 of the code, hex: the code itself is never stored.
    sha256: String,
    expires_at: UnixMs,
    redeemed: bool,
}

/// A call on a user's access codes.
#[derive(Debug)]
pub enum AccessCall {
    /// Issues a new code (expiring the active one); replies with it and its expiry.
    Issue,
    /// Redeems a code (normalized input); replies whether it was active and unexpired.
    Redeem(String),
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessReply {
    /// The new code (10 chars, no dash) and its expiry, ms since epoch.
    Issued {
        /// The code.
        code: String,
        /// Expiry, ms since epoch.
        expires_at: UnixMs,
    },
    /// Whether the redemption succeeded.
    Redeemed(bool),
}

fn digest(code: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(code.as_bytes()))
}

/// The actor type.
pub struct AccessActor;

impl Actor for AccessActor {
    const TYPE: &'static str = "claw_access";
    type Call = AccessCall;
    type Reply = AccessReply;

    async fn call(&self, ctx: &mut ActorContext, call: AccessCall) -> Result<AccessReply> {
        let now = ctx.now_ms();
        match call {
            AccessCall::Issue => {
                let code = crypto::generate_access_code();
                let expires_at = now + ACCESS_CODE_TTL_MS;
                let stored = StoredCode {
                    sha256: digest(&code),
                    expires_at,
                    redeemed: false,
                };
                ctx.put(CODE, &stored)?;
                ctx.set_alarm(expires_at);
                Ok(AccessReply::Issued { code, expires_at })
            }
            AccessCall::Redeem(code) => {
                let Some(mut stored) = ctx.get::<StoredCode>(CODE).await? else {
                    return Ok(AccessReply::Redeemed(false));
                };
                let matches = kilocloud_identity::credential::secrets_equal(
                    stored.sha256.as_bytes(),
                    digest(&code).as_bytes(),
                );
                if !matches || stored.redeemed || stored.expires_at <= now {
                    return Ok(AccessReply::Redeemed(false));
                }
                stored.redeemed = true;
                ctx.put(CODE, &stored)?;
                Ok(AccessReply::Redeemed(true))
            }
        }
    }

    async fn alarm(&self, ctx: &mut ActorContext, _: AlarmInfo) -> Result<()> {
        if let Some(stored) = ctx.get::<StoredCode>(CODE).await?
            && stored.expires_at > ctx.now_ms()
        {
            ctx.set_alarm(stored.expires_at);
            return Ok(());
        }
        ctx.delete_all();
        Ok(())
    }
}
