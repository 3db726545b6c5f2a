//! Device authorization for CLIs that cannot receive a redirect (the Kilo Code CLI's `kilo auth
//! login`, contract §3, in the manner of RFC 8628): a client asks for a code, shows it to the
//! user and polls; the user, signed in elsewhere, approves or denies it; the next poll after an
//! approval hands out a new user JWT, once.
//!
//! One `device_auth` actor per code holds its state; its alarm deletes it after it expires.
//! The token waits sealed with the master key until it is picked up.

use kilocloud_substrate::{Actor, ActorContext, AlarmInfo, Result as SubResult};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

use crate::model::Initiator;
use crate::{Error, Identity, Principal, Result};

/// How long a code may be approved and polled, seconds.
pub const DEVICE_CODE_TTL_S: i64 = 600;
/// Lifetime of the token a device gets, seconds (the Kilo CLI stores it for 365 days).
pub const DEVICE_TOKEN_TTL_S: i64 = 365 * 24 * 3600;
/// Characters of codes: upper case and digits without look-alikes (0/O, 1/I/L, vowels).
const ALPHABET: &[u8] = b"BCDFGHJKMNPQRSTVWXZ23456789";
const STATE: &str = "state";

/// Where a code stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Status {
    Pending,
    Approved {
        email: String,
        token: crate::envelope::Envelope,
    },
    Denied,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeviceState {
    expires_at_ms: i64,
    status: Status,
}

/// What a poll finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePoll {
    /// Not decided yet.
    Pending,
    /// Approved: the device's token (handed out this once) and the user's email.
    Approved {
        /// A user JWT valid [`DEVICE_TOKEN_TTL_S`].
        token: String,
        /// The approving user's email.
        email: String,
    },
    /// The user refused it.
    Denied,
    /// Expired, picked up already, or never issued.
    Expired,
}

enum DeviceCall {
    Create { expires_at_ms: i64 },
    Poll,
    Decide(Status),
}

enum DeviceReply {
    Created(bool),
    Polled(Option<DeviceState>),
    Decided(bool),
}

struct DeviceActor;

impl Actor for DeviceActor {
    const TYPE: &'static str = "device_auth";
    type Call = DeviceCall;
    type Reply = DeviceReply;

    async fn call(&self, ctx: &mut ActorContext, call: DeviceCall) -> SubResult<DeviceReply> {
        let state: Option<DeviceState> = ctx.get(STATE).await?;
        let live = state.filter(|s| s.expires_at_ms > ctx.now_ms());
        Ok(match call {
            DeviceCall::Create { expires_at_ms } => {
                if live.is_some() {
                    return Ok(DeviceReply::Created(false));
                }
                ctx.put(
                    STATE,
                    &DeviceState {
                        expires_at_ms,
                        status: Status::Pending,
                    },
                )?;
                ctx.set_alarm(expires_at_ms);
                DeviceReply::Created(true)
            }
            DeviceCall::Poll => {
                // An approval is handed out once; a poll after it finds nothing.
                if matches!(
                    live,
                    Some(DeviceState {
                        status: Status::Approved { .. },
                        ..
                    })
                ) {
                    ctx.delete_all();
                }
                DeviceReply::Polled(live)
            }
            DeviceCall::Decide(status) => match live {
                Some(s) if matches!(s.status, Status::Pending) => {
                    ctx.put(
                        STATE,
                        &DeviceState {
                            expires_at_ms: s.expires_at_ms,
                            status,
                        },
                    )?;
                    DeviceReply::Decided(true)
                }
                _ => DeviceReply::Decided(false),
            },
        })
    }

    async fn alarm(&self, ctx: &mut ActorContext, _: AlarmInfo) -> SubResult<()> {
        ctx.delete_all();
        Ok(())
    }
}

/// A new code: `XXXX-XXXX` from [`ALPHABET`] (about 38 bits).
fn new_code() -> String {
    let mut rng = rand::rng();
    let mut code = String::with_capacity(9);
    for i in 0..8 {
        if i == 4 {
            code.push('-');
        }
        code.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    code
}

/// A code as users type it: upper case, the dash optional.
fn normalize(code: &str) -> String {
    let raw: String = code
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    match raw.len() {
        8 => format!("{}-{}", &raw[..4], &raw[4..]),
        _ => raw,
    }
}

impl Identity {
    pub(crate) fn register_device_auth(sub: &kilocloud_substrate::Substrate) {
        sub.actors().register(DeviceActor);
    }

    async fn device_call(&self, code: &str, call: DeviceCall) -> Result<DeviceReply> {
        Ok(self
            .inner
            .sub
            .actors()
            .call::<DeviceActor>(code, call)
            .await?)
    }

    /// Starts a device authorization: a new code, pending for [`DEVICE_CODE_TTL_S`].
    pub async fn device_start(&self) -> Result<String> {
        let expires_at_ms = self.now_ms() + DEVICE_CODE_TTL_S * 1000;
        loop {
            let code = new_code();
            if let DeviceReply::Created(true) = self
                .device_call(&code, DeviceCall::Create { expires_at_ms })
                .await?
            {
                return Ok(code);
            }
        }
    }

    /// Where code `code` stands; an approval is returned (with its token) once.
    pub async fn device_poll(&self, code: &str) -> Result<DevicePoll> {
        let code = normalize(code);
        let DeviceReply::Polled(state) = self.device_call(&code, DeviceCall::Poll).await? else {
            unreachable!("a poll replies with the state")
        };
        Ok(match state.map(|s| s.status) {
            None => DevicePoll::Expired,
            Some(Status::Pending) => DevicePoll::Pending,
            Some(Status::Denied) => DevicePoll::Denied,
            Some(Status::Approved { email, token }) => DevicePoll::Approved {
                token: String::from_utf8(self.open(&token, &token_context(&code))?)
                    .map_err(|_| Error::Invalid("the device token is not UTF-8".into()))?,
                email,
            },
        })
    }

    /// Approves code `code` for `principal` (a personal credential): the device's next poll
    /// gets a new JWT of that user, valid [`DEVICE_TOKEN_TTL_S`].
    ///
    /// Errors: [`Error::Forbidden`] for a credential that is not personal;
    /// [`Error::NotFound`] when the code is unknown, expired or decided already.
    pub async fn device_approve(
        &self,
        code: &str,
        principal: &Principal,
        by: &Initiator,
    ) -> Result<()> {
        if !principal.is_personal() {
            return Err(Error::Forbidden {
                code: "personal_credential_required",
                message: "approve a device with your own credential (not an organization's key, \
                          an org-pinned token or a bot's)"
                    .into(),
            });
        }
        let code = normalize(code);
        let user = self
            .user(principal.user)
            .await?
            .ok_or(Error::NotFound { what: "user" })?;
        let (token, _) = self
            .issue_jwt(principal.user, None, None, DEVICE_TOKEN_TTL_S, by)
            .await?;
        let status = Status::Approved {
            email: user.email,
            token: self.seal(token.as_bytes(), &token_context(&code)),
        };
        self.decide(&code, status).await
    }

    /// Denies code `code`: the device's next poll is told so.
    ///
    /// Errors: [`Error::NotFound`] when the code is unknown, expired or decided already.
    pub async fn device_deny(&self, code: &str) -> Result<()> {
        self.decide(&normalize(code), Status::Denied).await
    }

    async fn decide(&self, code: &str, status: Status) -> Result<()> {
        match self.device_call(code, DeviceCall::Decide(status)).await? {
            DeviceReply::Decided(true) => Ok(()),
            _ => Err(Error::NotFound {
                what: "device code (unknown, expired or decided already)",
            }),
        }
    }
}

fn token_context(code: &str) -> String {
    format!("device-auth/{code}/token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_readable_and_normalized() {
        let code = new_code();
        assert_eq!(code.len(), 9);
        assert!(
            code.chars()
                .all(|c| c == '-' || ALPHABET.contains(&(c as u8)))
        );
        assert_eq!(normalize(&code.to_lowercase().replace('-', "")), code);
        assert_eq!(normalize("bcdf-ghjk"), "BCDF-GHJK");
    }
}
