//! GitHub App installations and the owners they belong to.
//!
//! An installation is recorded by the actor `github_installation` (key: the installation id)
//! when GitHub sends an `installation` event or when an owner claims it through the API
//! (`POST /api/github/installations`, which checks with GitHub that it exists). Whichever
//! comes first, the other completes the record. Each owner's installations are listed by the
//! actor `github_owner` (key: `user:<id>` / `org:<id>`), which the git token service reads to
//! find the installation for a repository (reference §9 `getTokenForRepo`).

use kilocloud_identity::Owner;
use kilocloud_substrate::{Actor, ActorContext, Result, Substrate};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::github::{AccessToken, InstallationInfo};
use crate::{Automation, AutomationError, AutomationRefusal};

/// Actor type of one installation.
pub const INSTALLATION_ACTOR: &str = "github_installation";
/// Actor type of an owner's list of installations.
pub const OWNER_ACTOR: &str = "github_owner";

/// What is known of one installation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Installation {
    /// Installation id.
    pub id: u64,
    /// The GitHub account it is installed on.
    pub account_login: String,
    /// `User` or `Organization`.
    pub account_type: String,
    /// The owner it belongs to (`user:<id>` / `org:<id>`), once claimed.
    pub owner: Option<String>,
    /// The user who claimed it; automation for the owner acts as this user.
    pub claimed_by: Option<Uuid>,
    /// Suspended on GitHub.
    pub suspended: bool,
    /// Uninstalled on GitHub.
    pub deleted: bool,
    /// Last change, ms.
    pub updated_at: i64,
}

impl Installation {
    /// The owner and acting user, when claimed and usable (not suspended or deleted).
    pub fn active_owner(&self) -> Option<(Owner, Uuid)> {
        if self.suspended || self.deleted {
            return None;
        }
        Some((self.owner.as_deref()?.parse().ok()?, self.claimed_by?))
    }
}

/// Calls of [`InstallationActor`].
#[derive(Debug)]
pub enum InstallationCall {
    /// An `installation` event: `created`, `deleted`, `suspend`, `unsuspend`,
    /// `new_permissions_accepted`.
    Observe {
        /// The event's action.
        action: String,
        /// The installation as the event describes it.
        info: InstallationInfo,
    },
    /// An owner claims it.
    Claim {
        /// The claiming owner.
        owner: Owner,
        /// The claiming user.
        by: Uuid,
        /// GitHub's description.
        info: InstallationInfo,
    },
    /// The owner gives it up.
    Release {
        /// The owner.
        owner: Owner,
    },
}

/// The installation actor.
pub struct InstallationActor;

impl Actor for InstallationActor {
    const TYPE: &'static str = INSTALLATION_ACTOR;
    type Call = InstallationCall;
    type Reply = std::result::Result<Installation, AutomationRefusal>;

    async fn call(&self, ctx: &mut ActorContext, call: InstallationCall) -> Result<Self::Reply> {
        let now = ctx.now_ms();
        let current: Option<Installation> = ctx.get("record").await?;
        let fresh = |info: &InstallationInfo| Installation {
            id: info.id,
            account_login: info.account_login.clone(),
            account_type: info.account_type.clone(),
            owner: None,
            claimed_by: None,
            suspended: info.suspended,
            deleted: false,
            updated_at: now,
        };
        let record = match call {
            InstallationCall::Observe { action, info } => {
                let mut r = current.unwrap_or_else(|| fresh(&info));
                if !info.account_login.is_empty() {
                    r.account_login = info.account_login;
                    r.account_type = info.account_type;
                }
                match action.as_str() {
                    "deleted" => r.deleted = true,
                    "suspend" => r.suspended = true,
                    "unsuspend" => r.suspended = false,
                    "created" => {
                        r.deleted = false;
                        r.suspended = info.suspended;
                    }
                    _ => {}
                }
                r
            }
            InstallationCall::Claim { owner, by, info } => {
                let mut r = current.unwrap_or_else(|| fresh(&info));
                let owner = owner.to_string();
                if r.owner.as_ref().is_some_and(|o| *o != owner) {
                    return Ok(Err(AutomationRefusal::Conflict(
                        "this installation belongs to another owner".into(),
                    )));
                }
                r.owner = Some(owner);
                r.claimed_by = Some(by);
                r.account_login = info.account_login;
                r.account_type = info.account_type;
                r.suspended = info.suspended;
                r.deleted = false;
                r
            }
            InstallationCall::Release { owner } => {
                let Some(mut r) = current.filter(|r| r.owner == Some(owner.to_string())) else {
                    return Ok(Err(AutomationRefusal::NotFound));
                };
                r.owner = None;
                r.claimed_by = None;
                r
            }
        };
        let record = Installation {
            updated_at: now,
            ..record
        };
        ctx.put("record", &record)?;
        Ok(Ok(record))
    }
}

/// Calls of [`OwnerInstallationsActor`].
#[derive(Debug)]
pub enum OwnerCall {
    /// Lists the installation under `i/<id>` with its account login.
    Add(u64, String),
    /// Drops it.
    Remove(u64),
}

/// An owner's installations (`i/<id>` → account login).
pub struct OwnerInstallationsActor;

impl Actor for OwnerInstallationsActor {
    const TYPE: &'static str = OWNER_ACTOR;
    type Call = OwnerCall;
    type Reply = ();

    async fn call(&self, ctx: &mut ActorContext, call: OwnerCall) -> Result<()> {
        match call {
            OwnerCall::Add(id, login) => ctx.put(&format!("i/{id:020}"), &login),
            OwnerCall::Remove(id) => {
                ctx.delete(&format!("i/{id:020}"));
                Ok(())
            }
        }
    }
}

pub(crate) fn register(sub: &Substrate) {
    sub.actors().register(InstallationActor);
    sub.actors().register(OwnerInstallationsActor);
}

impl Automation {
    /// Records an `installation` event.
    pub(crate) async fn observe_installation(
        &self,
        action: &str,
        info: InstallationInfo,
    ) -> Result<Installation, AutomationError> {
        let id = info.id;
        let record = self
            .inner
            .sub
            .actors()
            .call::<InstallationActor>(
                &id.to_string(),
                InstallationCall::Observe {
                    action: action.to_owned(),
                    info,
                },
            )
            .await?
            .map_err(|r| r.into_error("installation"))?;
        if let Some(owner) = &record.owner {
            let call = if record.deleted {
                OwnerCall::Remove(id)
            } else {
                OwnerCall::Add(id, record.account_login.clone())
            };
            self.inner
                .sub
                .actors()
                .call::<OwnerInstallationsActor>(owner, call)
                .await?;
        }
        Ok(record)
    }

    /// Claims installation `id` for `owner` after checking with GitHub that it exists. Only a
    /// site administrator (`site_admin`) may, unless `github.allow_self_claim` is set.
    ///
    /// Errors: [`AutomationError::Forbidden`] for a claim not allowed;
    /// [`AutomationError::NotFound`] when GitHub does not know it;
    /// [`AutomationError::Conflict`] when another owner claimed it;
    /// [`AutomationError::Disabled`] without a GitHub App.
    pub async fn claim_installation(
        &self,
        owner: Owner,
        by: Uuid,
        site_admin: bool,
        id: u64,
    ) -> Result<Installation, AutomationError> {
        let github = self.github_or_disabled()?;
        if !site_admin && !self.inner.config.github.allow_self_claim {
            return Err(AutomationError::Forbidden(
                "claiming a GitHub App installation needs a site administrator (set \
                 github.allow_self_claim to let owners claim their own): nothing proves yet that \
                 you administer the GitHub account it is installed on"
                    .into(),
            ));
        }
        let info = match github.installation(id).await {
            Ok(info) => info,
            Err(e) if e.is_not_found() => return Err(AutomationError::NotFound("installation")),
            Err(e) => return Err(e.into()),
        };
        let record = self
            .inner
            .sub
            .actors()
            .call::<InstallationActor>(&id.to_string(), InstallationCall::Claim { owner, by, info })
            .await?
            .map_err(|r| r.into_error("installation"))?;
        self.inner
            .sub
            .actors()
            .call::<OwnerInstallationsActor>(
                &owner.to_string(),
                OwnerCall::Add(id, record.account_login.clone()),
            )
            .await?;
        Ok(record)
    }

    /// Gives up installation `id`.
    ///
    /// Errors: [`AutomationError::NotFound`] when it is not `owner`'s.
    pub async fn release_installation(&self, owner: Owner, id: u64) -> Result<(), AutomationError> {
        self.inner
            .sub
            .actors()
            .call::<InstallationActor>(&id.to_string(), InstallationCall::Release { owner })
            .await?
            .map_err(|r| r.into_error("installation"))?;
        self.inner
            .sub
            .actors()
            .call::<OwnerInstallationsActor>(&owner.to_string(), OwnerCall::Remove(id))
            .await?;
        Ok(())
    }

    /// One installation's record, if known.
    pub async fn installation(&self, id: u64) -> Result<Option<Installation>, AutomationError> {
        Ok(self
            .inner
            .sub
            .actor_read(INSTALLATION_ACTOR, &id.to_string(), "record")
            .await?)
    }

    /// `owner`'s installations.
    pub async fn installations(&self, owner: Owner) -> Result<Vec<Installation>, AutomationError> {
        let ids: Vec<(String, String)> = self
            .inner
            .sub
            .actor_scan(OWNER_ACTOR, &owner.to_string(), "i/", "", 1000)
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for (key, _) in ids {
            if let Some(id) = key.strip_prefix("i/").and_then(|s| s.parse().ok())
                && let Some(record) = self.installation(id).await?
            {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// An installation token for `repo` (`owner/name`) on behalf of `owner`: the owner must
    /// have claimed an active installation on the repository's account (reference §9
    /// `getTokenForRepo`; the caller's right to act for the owner is checked by the API's
    /// owner scope).
    ///
    /// Errors: [`AutomationError::Invalid`] for a malformed repository;
    /// [`AutomationError::NotFound`] (`no_installation_found`) when the owner has no usable
    /// installation there; [`AutomationError::GitHub`] when minting fails.
    pub async fn token_for_repo(
        &self,
        owner: Owner,
        repo: &str,
    ) -> Result<(u64, AccessToken), AutomationError> {
        let github = self.github_or_disabled()?;
        let account = repo
            .split_once('/')
            .filter(|(a, n)| !a.is_empty() && !n.is_empty() && !n.contains('/'))
            .map(|(a, _)| a)
            .ok_or_else(|| AutomationError::Invalid(format!("{repo:?} is not owner/repo")))?;
        let installation = self
            .installations(owner)
            .await?
            .into_iter()
            .find(|i| i.account_login.eq_ignore_ascii_case(account) && i.active_owner().is_some())
            .ok_or(AutomationError::NotFound("GitHub App installation"))?;
        Ok((
            installation.id,
            github.installation_token(installation.id).await?,
        ))
    }
}
