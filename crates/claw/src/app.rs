//! The app actor (`claw_app`, keyed by app name): one app per owner, its addresses and its
//! env key (reference kilo-cloud.md §2 "KiloClawApp DO"). `Ensure` is idempotent: it records
//! the owner and the name first, creates the app when missing (a name collision with
//! another owner's machines is an error), allocates the v6 and shared v4 addresses, and sets
//! the env key as the app secret `KILOCLAW_ENV_KEY`, persisting a new key **before** the
//! provider call so that interleaved calls reuse it. The key is re-set on every `Ensure`
//! (self-heal) and returned with the secrets version machines must boot with. A partial
//! failure sets a retry alarm 60 s later.

use std::sync::Arc;

use kilocloud_identity::envelope::Envelope;
use kilocloud_substrate::{Actor, ActorContext, AlarmInfo, Result};
use serde::{Deserialize, Serialize};

use crate::{ClawError, crypto};

const STATE: &str = "state";
/// Retry delay after a partial failure, ms.
pub const ENSURE_RETRY_MS: i64 = 60_000;

/// Persisted app state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct AppState {
    owner: String,
    app_name: String,
    created: bool,
    ipv4_allocated: bool,
    ipv6_allocated: bool,
    /// The env key (base64 of 32 bytes), sealed with the master key.
    env_key: Option<Envelope>,
    secrets_version: u64,
}

/// What instances need from their app to build a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppKeys {
    /// The env key, base64 of 32 bytes.
    pub env_key: String,
    /// The secrets version that holds it.
    pub secrets_version: u64,
}

/// A call on an app.
#[derive(Debug)]
pub enum AppCall {
    /// Creates or repairs the app for `owner`; replies with its keys.
    Ensure {
        /// Owner key; a different owner than recorded is refused.
        owner: String,
    },
}

/// The actor type.
pub struct AppActor {
    pub(crate) shared: Arc<crate::Shared>,
}

impl Actor for AppActor {
    const TYPE: &'static str = "claw_app";
    const SUSPENDS: bool = true;
    type Call = AppCall;
    type Reply = std::result::Result<AppKeys, ClawError>;

    async fn call(
        &self,
        ctx: &mut ActorContext,
        call: AppCall,
    ) -> Result<std::result::Result<AppKeys, ClawError>> {
        let AppCall::Ensure { owner } = call;
        let mut state: AppState = ctx.get(STATE).await?.unwrap_or_default();
        if !state.owner.is_empty() && state.owner != owner {
            return Ok(Err(ClawError::Conflict(format!(
                "app {} belongs to another owner",
                ctx.key()
            ))));
        }
        let outcome = self.ensure(ctx, &mut state, owner).await;
        match outcome {
            Ok(keys) => {
                ctx.put(STATE, &state)?;
                Ok(Ok(keys))
            }
            Err(ClawError::Substrate(e)) => Err(e),
            Err(e) => {
                // What was checkpointed stays; retry the rest in a minute.
                ctx.rollback();
                ctx.set_alarm(ctx.now_ms() + ENSURE_RETRY_MS);
                Ok(Err(e))
            }
        }
    }

    async fn alarm(&self, ctx: &mut ActorContext, _: AlarmInfo) -> Result<()> {
        let mut state: AppState = ctx.get(STATE).await?.unwrap_or_default();
        if state.owner.is_empty() {
            return Ok(());
        }
        let owner = state.owner.clone();
        match self.ensure(ctx, &mut state, owner).await {
            Ok(_) => ctx.put(STATE, &state)?,
            Err(ClawError::Substrate(e)) => return Err(e),
            Err(e) => {
                tracing::warn!(app = %ctx.key(), error = %e, "app setup still failing; retrying");
                ctx.rollback();
                ctx.set_alarm(ctx.now_ms() + ENSURE_RETRY_MS);
            }
        }
        Ok(())
    }
}

impl AppActor {
    async fn ensure(
        &self,
        ctx: &mut ActorContext,
        state: &mut AppState,
        owner: String,
    ) -> std::result::Result<AppKeys, ClawError> {
        let provider = self.shared.provider.as_ref();
        let app = ctx.key().to_owned();
        if state.owner.is_empty() {
            state.owner = owner.clone();
            state.app_name = app.clone();
            ctx.put(STATE, state)?;
            ctx.checkpoint().await?;
        }
        if !state.created {
            if !ctx.suspend_while(provider.app_exists(&app)).await?? {
                match ctx.suspend_while(provider.create_app(&app)).await? {
                    Ok(()) => {}
                    Err(e) if e.is_conflict() => {
                        ctx.suspend_while(self.check_collision(&app, &owner))
                            .await??
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            state.created = true;
        }
        if !state.ipv6_allocated {
            ctx.suspend_while(provider.allocate_ip(&app, "v6"))
                .await??;
            state.ipv6_allocated = true;
        }
        if !state.ipv4_allocated {
            ctx.suspend_while(provider.allocate_ip(&app, "shared_v4"))
                .await??;
            state.ipv4_allocated = true;
        }
        let context = format!("claw-app/{app}/env-key");
        let key = match &state.env_key {
            Some(sealed) => String::from_utf8(self.shared.identity.open(sealed, &context)?)
                .map_err(|_| ClawError::Invalid("the env key is not UTF-8".into()))?,
            None => {
                let key = crypto::generate_env_key();
                state.env_key = Some(self.shared.identity.seal(key.as_bytes(), &context));
                ctx.put(STATE, state)?;
                ctx.checkpoint().await?;
                key
            }
        };
        state.secrets_version = ctx
            .suspend_while(provider.set_secret(&app, crypto::ENV_KEY_SECRET, &key))
            .await??;
        Ok(AppKeys {
            env_key: key,
            secrets_version: state.secrets_version,
        })
    }

    /// The app name exists: it is ours only if none of its machines belongs to another
    /// owner's sandbox (reference: ownership checked through machine metadata on 409).
    async fn check_collision(&self, app: &str, owner: &str) -> std::result::Result<(), ClawError> {
        let provider = self.shared.provider.as_ref();
        let machines = provider.list_machines(app, None).await?;
        let foreign = machines
            .into_iter()
            .filter_map(|m| m.metadata.get(crate::instance::META_OWNER).cloned())
            .find(|o| o != owner);
        match foreign {
            Some(other) => Err(ClawError::Conflict(format!(
                "app {app} already exists and holds machines of {other}: name collision"
            ))),
            None => Ok(()),
        }
    }
}
