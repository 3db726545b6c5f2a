//! Identity and access: users, organizations and their members, bots, the [`Owner`] every
//! service scopes its state to, and the credentials that prove who is calling (user JWTs, API
//! keys, tickets, the internal service secret), plus secrets encrypted at rest.
//!
//! State lives in substrate actors (see [`actors`]), so it is the same on SQLite and
//! PostgreSQL. Credential checks read committed actor state directly
//! ([`Substrate::actor_read`]) instead of calling actors, so authentication never queues
//! behind a busy owner. HTTP lives in `kilocloud-server`; this crate knows nothing of it.
//! Behaviour follows the reference system §0 (tokens, pepper revocation, org header, service
//! secrets, envelope encryption) unless a doc comment says otherwise.

mod actors;
pub mod credential;
pub mod device;
pub mod envelope;
mod error;
pub mod model;
pub mod net;
pub mod owner;
pub mod secret;

use std::sync::Arc;

use kilocloud_substrate::{Actor as _, Substrate};
use uuid::Uuid;

pub use actors::{AUDIT_RETENTION, MAX_TICKETS_PER_USER};
use actors::{
    INDEX_TARGET, IndexActor, IndexCall, OwnerActor, OwnerCall, OwnerReply, TicketRecord, keys,
};
use credential::{AuthError, TokenClaims, TokenSigner};
use envelope::MasterKeys;
pub use error::{Error, Result};
use model::{
    ApiKeyRecord, ApiKeyView, AuditEntry, BotView, Initiator, MemberView, OrgMembershipView,
    OrgView, SecretMeta, SecretRecord, UserRecord,
};
pub use owner::{Owner, Role};

/// The actor types identity stores its state in (credential hashes, peppers, envelopes): never
/// to be shown over an API.
pub const ACTOR_TYPES: [&str; 2] = [OwnerActor::TYPE, IndexActor::TYPE];
/// How long a ticket lives, ms.
pub const TICKET_TTL_MS: i64 = 60_000;
/// Default lifetime of an issued user JWT, s (30 days).
pub const DEFAULT_TOKEN_TTL_S: i64 = 30 * 24 * 3600;
/// Longest lifetime of an issued user JWT, s (5 years, the reference's default).
pub const MAX_TOKEN_TTL_S: i64 = 5 * 365 * 24 * 3600;
/// Largest secret value, bytes.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// `last_used` of an API key is written at most this often, ms.
const TOUCH_INTERVAL_MS: i64 = 60_000;
const BOOTSTRAP_INDEX: &str = "system:bootstrap";

/// What the identity service needs from configuration.
pub struct IdentityConfig {
    /// HS256 secret for user JWTs.
    pub jwt_secret: Vec<u8>,
    /// Master keys for envelope encryption.
    pub master_keys: MasterKeys,
    /// The `x-internal-api-key` secret; `None` refuses every internal call.
    pub internal_api_secret: Option<String>,
}

/// How the caller proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// A user JWT.
    Jwt,
    /// An API key, by key id.
    ApiKey(Uuid),
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user the caller acts as (an org API key acts as its creator).
    pub user: Uuid,
    /// Site administrator acting with a personal credential: a credential pinned to an
    /// organization or acting as a bot never carries site-administrator rights.
    pub is_admin: bool,
    /// How they authenticated.
    pub credential: Credential,
    /// The organization the credential is pinned to (org API key, or JWT `organizationId`).
    pub pinned_org: Option<Uuid>,
    /// The bot the caller acts as (JWT `botId`).
    pub bot: Option<Uuid>,
    /// When the credential expires, ms since epoch (JWT `exp`, API key expiry).
    pub expires_at_ms: Option<i64>,
}

impl Principal {
    /// A personal credential: the user's own, not pinned to an organization and not a bot's.
    /// Only these change the user's account or mint further credentials.
    pub fn is_personal(&self) -> bool {
        self.pinned_org.is_none() && self.bot.is_none()
    }
}

/// The owner a request acts for and the caller's role over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    /// The owner.
    pub owner: Owner,
    /// `owner` for a user's own resources; the membership role in an organization.
    pub role: Role,
}

/// Result of [`Identity::rotate_master_key`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RotationReport {
    /// Owners visited.
    pub owners: u64,
    /// Secrets whose data key was re-wrapped with the current master key.
    pub rewrapped: u64,
    /// Secrets already wrapped with it.
    pub already_current: u64,
}

/// The identity service. Cheap to clone.
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    sub: Substrate,
    signer: TokenSigner,
    keys: Arc<MasterKeys>,
    internal_secret: Option<Vec<u8>>,
}

impl Identity {
    /// Registers identity's actor types on `sub` (before [`Substrate::start`]).
    pub fn new(sub: &Substrate, config: IdentityConfig) -> Self {
        sub.actors().register(OwnerActor);
        sub.actors().register(IndexActor);
        Self::register_device_auth(sub);
        Self {
            inner: Arc::new(Inner {
                sub: sub.clone(),
                signer: TokenSigner::new(&config.jwt_secret),
                keys: Arc::new(config.master_keys),
                internal_secret: config
                    .internal_api_secret
                    .filter(|s| !s.is_empty())
                    .map(String::into_bytes),
            }),
        }
    }

    fn now_ms(&self) -> i64 {
        self.inner.sub.clock().now_ms()
    }

    async fn call(&self, owner: Owner, call: OwnerCall) -> Result<OwnerReply> {
        self.inner
            .sub
            .actors()
            .call::<OwnerActor>(&owner.to_string(), call)
            .await?
    }

    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        owner: Owner,
        key: &str,
    ) -> Result<Option<T>> {
        Ok(self
            .inner
            .sub
            .actor_read(OwnerActor::TYPE, &owner.to_string(), key)
            .await?)
    }

    /// The owner's storage entries under `prefix`, in key order, with the key's suffix.
    async fn entries<T: serde::de::DeserializeOwned>(
        &self,
        owner: Owner,
        prefix: &'static str,
    ) -> Result<Vec<(String, T)>> {
        let OwnerReply::Entries(entries) = self.call(owner, OwnerCall::List { prefix }).await?
        else {
            unreachable!("List replies with entries")
        };
        entries
            .into_iter()
            .map(|(k, v)| {
                let value = serde_json::from_value(v).map_err(|e| Error::Substrate(e.into()))?;
                Ok((k[prefix.len()..].to_owned(), value))
            })
            .collect()
    }

    async fn list<T: serde::de::DeserializeOwned>(
        &self,
        owner: Owner,
        prefix: &'static str,
    ) -> Result<Vec<T>> {
        Ok(self
            .entries(owner, prefix)
            .await?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    async fn claim_index(
        &self,
        key: &str,
        target: &str,
        steal_from: Option<String>,
    ) -> Result<bool> {
        Ok(self
            .inner
            .sub
            .actors()
            .call::<IndexActor>(
                key,
                IndexCall::Claim {
                    target: target.to_owned(),
                    steal_from,
                },
            )
            .await?)
    }

    async fn read_index(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .inner
            .sub
            .actor_read(IndexActor::TYPE, key, INDEX_TARGET)
            .await?)
    }

    // ----- authentication -----

    /// Authenticates a bearer credential: an API key (`kc_…`) or a user JWT.
    ///
    /// Errors: [`Error::Auth`] with the precise reason; [`Error::Substrate`].
    pub async fn authenticate(&self, bearer: &str) -> Result<Principal> {
        if bearer.starts_with(credential::API_KEY_PREFIX) {
            self.authenticate_api_key(bearer).await
        } else {
            self.authenticate_jwt(bearer).await
        }
    }

    /// Verifies a user JWT: signature, `version == 3`, expiry, then the strict pepper check
    /// (the token's pepper must equal the user's stored pepper, `null` matching only `null`;
    /// the reference's KiloClaw rule), and that a `botId` names a bot of the token's owner.
    pub async fn authenticate_jwt(&self, token: &str) -> Result<Principal> {
        let t = self
            .inner
            .signer
            .verify(token, self.now_ms().div_euclid(1000))?;
        let user: UserRecord = self
            .read(Owner::User(t.user_id), keys::PROFILE)
            .await?
            .ok_or(AuthError::Revoked)?;
        if user.api_token_pepper != t.pepper {
            return Err(AuthError::Revoked.into());
        }
        if let Some(bot) = t.bot_id {
            let owner = t.org_id.map_or(Owner::User(user.id), Owner::Org);
            let found: Option<BotView> = self.read(owner, &format!("{}{bot}", keys::BOT)).await?;
            found.ok_or(AuthError::Revoked)?;
        }
        Ok(Principal {
            user: user.id,
            is_admin: user.is_admin && t.org_id.is_none() && t.bot_id.is_none(),
            credential: Credential::Jwt,
            pinned_org: t.org_id,
            bot: t.bot_id,
            expires_at_ms: Some(t.exp.saturating_mul(1000)),
        })
    }

    /// Checks an API key: known, not revoked, not expired, creator still a user. Records the
    /// use (at most once a minute, in the background).
    pub async fn authenticate_api_key(&self, key: &str) -> Result<Principal> {
        let hash = credential::parse_api_key(key)?;
        let target = self
            .read_index(&format!("apikey:{hash}"))
            .await?
            .ok_or(AuthError::ApiKeyUnknown)?;
        let (owner, id) = parse_key_target(&target).ok_or(AuthError::ApiKeyUnknown)?;
        let record: ApiKeyRecord = self
            .read(owner, &format!("{}{id}", keys::APIKEY))
            .await?
            .filter(|r: &ApiKeyRecord| {
                credential::secrets_equal(r.hash.as_bytes(), hash.as_bytes())
            })
            .ok_or(AuthError::ApiKeyUnknown)?;
        let now = self.now_ms();
        if record.revoked_at_ms.is_some() {
            return Err(AuthError::ApiKeyRevoked.into());
        }
        if record.expires_at_ms.is_some_and(|e| e <= now) {
            return Err(AuthError::ApiKeyExpired.into());
        }
        let user: UserRecord = self
            .read(Owner::User(record.created_by), keys::PROFILE)
            .await?
            .ok_or(AuthError::ApiKeyRevoked)?;
        if record
            .last_used_at_ms
            .is_none_or(|t| now - t >= TOUCH_INTERVAL_MS)
        {
            let this = self.clone();
            tokio_spawn(async move {
                let touch = OwnerCall::TouchApiKey { id, at_ms: now };
                if let Err(e) = this.call(owner, touch).await {
                    tracing::debug!(error = %e, key_id = %id, "could not record API key use");
                }
            });
        }
        Ok(Principal {
            user: user.id,
            is_admin: user.is_admin && owner == Owner::User(user.id),
            credential: Credential::ApiKey(id),
            pinned_org: match owner {
                Owner::Org(org) => Some(org),
                Owner::User(_) => None,
            },
            bot: None,
            expires_at_ms: record.expires_at_ms,
        })
    }

    /// Checks the `x-internal-api-key` header value in constant time. An unconfigured secret
    /// refuses everything (reference §0.2: a missing secret returns 401).
    pub fn verify_internal_key(&self, presented: Option<&[u8]>) -> Result<()> {
        match (&self.inner.internal_secret, presented) {
            (Some(secret), Some(p)) if credential::secrets_equal(secret, p) => Ok(()),
            _ => Err(AuthError::InternalKey.into()),
        }
    }

    /// The owner a request acts for: the organization from the `X-KiloCode-OrganizationId`
    /// header or the credential's pinned organization, else the caller themself.
    ///
    /// Errors: [`Error::Forbidden`] `organization_mismatch` when the header names another org
    /// than the credential is pinned to; `not_a_member` when the caller is not a member.
    pub async fn scope(&self, principal: &Principal, header_org: Option<Uuid>) -> Result<Scope> {
        let org = match (header_org, principal.pinned_org) {
            (Some(h), Some(p)) if h != p => {
                return Err(Error::forbidden(
                    "organization_mismatch",
                    "this credential is pinned to another organization",
                ));
            }
            (h, p) => h.or(p),
        };
        let Some(org) = org else {
            return Ok(Scope {
                owner: Owner::User(principal.user),
                role: Role::Owner,
            });
        };
        match self.org_role(org, principal.user).await? {
            Some(role) => Ok(Scope {
                owner: Owner::Org(org),
                role,
            }),
            None => Err(Error::forbidden(
                "not_a_member",
                "you are not a member of this organization",
            )),
        }
    }

    /// The user's role in the organization, if a member.
    pub async fn org_role(&self, org: Uuid, user: Uuid) -> Result<Option<Role>> {
        let member: Option<actors::MemberRecord> = self
            .read(Owner::Org(org), &format!("{}{user}", keys::MEMBER))
            .await?;
        Ok(member.map(|m| m.role))
    }

    // ----- users -----

    /// Creates a user with a fresh pepper and a first API key (returned once, with its view);
    /// `by` (a site administrator) is recorded in the new user's audit log. Emails are unique,
    /// compared in lowercase.
    ///
    /// Errors: [`Error::Invalid`] for a bad email or name; [`Error::Conflict`] `email_taken`.
    pub async fn create_user(
        &self,
        email: &str,
        name: &str,
        is_admin: bool,
        by: &Initiator,
    ) -> Result<(UserRecord, String, ApiKeyView)> {
        self.insert_user(Uuid::new_v4(), email, name, is_admin, Some(by))
            .await
    }

    /// Creates user `id` and its first API key in one transaction of the user's actor, after
    /// claiming the email (a claim left by a crash before the user existed is taken over).
    ///
    /// Errors: as [`Identity::create_user`]; [`Error::Conflict`] `user_exists` when `id` exists.
    async fn insert_user(
        &self,
        id: Uuid,
        email: &str,
        name: &str,
        is_admin: bool,
        by: Option<&Initiator>,
    ) -> Result<(UserRecord, String, ApiKeyView)> {
        let email = normalize_email(email)?;
        let user = UserRecord {
            id,
            email: email.clone(),
            name: validate_name("name", name, 100)?,
            is_admin,
            created_at_ms: self.now_ms(),
            api_token_pepper: Some(new_pepper()),
        };
        let index = format!("email:{email}");
        let target = id.to_string();
        if !self.claim_index(&index, &target, None).await? {
            let holder = self.read_index(&index).await?;
            let dangling = match holder.as_deref().and_then(owner::parse_uuid) {
                Some(holder) => self.user(holder).await?.is_none(),
                None => true,
            };
            if !dangling || !self.claim_index(&index, &target, holder).await? {
                return Err(Error::conflict(
                    "email_taken",
                    format!("a user with email {email} exists"),
                ));
            }
        }
        let (key, record) = self
            .new_api_key(Owner::User(id), "initial", None, id)
            .await?;
        let view = ApiKeyView::from(&record);
        let call = OwnerCall::CreateUser {
            user: user.clone(),
            key: record,
            by: by.cloned().unwrap_or(Initiator {
                user: id,
                request_id: None,
            }),
        };
        self.call(Owner::User(id), call).await?;
        Ok((user, key, view))
    }

    /// A user by id.
    pub async fn user(&self, id: Uuid) -> Result<Option<UserRecord>> {
        self.read(Owner::User(id), keys::PROFILE).await
    }

    /// A user by email (case-insensitive).
    pub async fn user_by_email(&self, email: &str) -> Result<Option<UserRecord>> {
        let Ok(email) = normalize_email(email) else {
            return Ok(None);
        };
        match self
            .read_index(&format!("email:{email}"))
            .await?
            .as_deref()
            .and_then(owner::parse_uuid)
        {
            Some(id) => Ok(self.user(id).await?.filter(|u| u.email == email)),
            None => Ok(None),
        }
    }

    /// Replaces the user's pepper, revoking every JWT issued before.
    pub async fn rotate_pepper(&self, user: Uuid, by: &Initiator) -> Result<()> {
        let call = OwnerCall::RotatePepper {
            pepper: new_pepper(),
            by: by.clone(),
        };
        self.call(Owner::User(user), call).await.map(drop)
    }

    /// Issues a user JWT valid for `ttl_s` seconds (1 s to 5 years), pinned to `org` and acting
    /// as `bot` when given, and records `token.issued` in the log of the owner it acts for. The
    /// caller has checked membership.
    ///
    /// Returns the token and its expiry, s since epoch.
    /// Errors: [`Error::Invalid`] for a lifetime out of range; [`Error::NotFound`] for an
    /// unknown user or a bot not of that owner.
    pub async fn issue_jwt(
        &self,
        user: Uuid,
        org: Option<Uuid>,
        bot: Option<Uuid>,
        ttl_s: i64,
        by: &Initiator,
    ) -> Result<(String, i64)> {
        if !(1..=MAX_TOKEN_TTL_S).contains(&ttl_s) {
            return Err(Error::Invalid(format!(
                "expiresInSeconds must be 1..={MAX_TOKEN_TTL_S}"
            )));
        }
        let record = self
            .user(user)
            .await?
            .ok_or(Error::NotFound { what: "user" })?;
        if let Some(bot) = bot {
            let owner = org.map_or(Owner::User(user), Owner::Org);
            let found: Option<BotView> = self.read(owner, &format!("{}{bot}", keys::BOT)).await?;
            found.ok_or(Error::NotFound { what: "bot" })?;
        }
        let iat = self.now_ms().div_euclid(1000);
        let claims = TokenClaims {
            kilo_user_id: user.to_string(),
            api_token_pepper: record.api_token_pepper,
            version: i64::from(credential::TOKEN_VERSION),
            exp: iat + ttl_s,
            iat,
            organization_id: org.map(|o| o.to_string()),
            bot_id: bot.map(|b| b.to_string()),
        };
        let token = self.inner.signer.sign(&claims);
        let target = match bot {
            Some(bot) => format!("JWT for bot {bot}, expires {}", claims.exp),
            None => format!("JWT for {user}, expires {}", claims.exp),
        };
        let record = OwnerCall::Record {
            action: "token.issued",
            target,
            by: by.clone(),
        };
        self.call(org.map_or(Owner::User(user), Owner::Org), record)
            .await?;
        Ok((token, claims.exp))
    }

    // ----- organizations -----

    /// Creates an organization with `by.user` as its owner.
    pub async fn create_org(&self, name: &str, by: &Initiator) -> Result<OrgView> {
        let org = OrgView {
            id: Uuid::new_v4(),
            name: validate_name("name", name, 100)?,
            created_at_ms: self.now_ms(),
            created_by: by.user,
        };
        // The index entry first: it may outlive a failed create, never the reverse.
        self.set_membership_index(by.user, org.id, true).await?;
        let call = OwnerCall::CreateOrg {
            org: org.clone(),
            by: by.clone(),
        };
        self.call(Owner::Org(org.id), call).await?;
        Ok(org)
    }

    async fn set_membership_index(&self, user: Uuid, org: Uuid, present: bool) -> Result<()> {
        let call = OwnerCall::SetMembershipIndex { org, present };
        self.call(Owner::User(user), call).await.map(drop)
    }

    /// An organization by id.
    pub async fn org(&self, id: Uuid) -> Result<Option<OrgView>> {
        self.read(Owner::Org(id), keys::PROFILE).await
    }

    /// The organizations a user belongs to, with their role, by name.
    ///
    /// The user's membership index is checked against each organization (the authority), so a
    /// stale entry left by a crash is not shown.
    pub async fn orgs_of(&self, user: Uuid) -> Result<Vec<OrgMembershipView>> {
        let memberships: Vec<(String, serde::de::IgnoredAny)> =
            self.entries(Owner::User(user), keys::MEMBERSHIP).await?;
        let mut out = Vec::new();
        for (org_id, _) in memberships {
            let Some(org_id) = owner::parse_uuid(&org_id) else {
                continue;
            };
            if let (Some(org), Some(role)) =
                (self.org(org_id).await?, self.org_role(org_id, user).await?)
            {
                out.push(OrgMembershipView { org, role });
            }
        }
        out.sort_by(|a, b| a.org.name.cmp(&b.org.name).then(a.org.id.cmp(&b.org.id)));
        Ok(out)
    }

    /// Renames an organization.
    pub async fn rename_org(&self, org: Uuid, name: &str, by: &Initiator) -> Result<OrgView> {
        let name = validate_name("name", name, 100)?;
        self.call(
            Owner::Org(org),
            OwnerCall::RenameOrg {
                name,
                by: by.clone(),
            },
        )
        .await?;
        self.org(org).await?.ok_or(Error::NotFound {
            what: "organization",
        })
    }

    /// Deletes an organization with its keys, secrets, bots and audit log.
    pub async fn delete_org(&self, org: Uuid, by: &Initiator) -> Result<()> {
        let OwnerReply::Members(members) = self.call(Owner::Org(org), OwnerCall::DeleteOrg).await?
        else {
            unreachable!("DeleteOrg replies with members")
        };
        for user in members {
            self.set_membership_index(user, org, false).await?;
        }
        // The organization's own log is gone with it; the deleter's log keeps the event.
        let record = OwnerCall::Record {
            action: "org.deleted",
            target: org.to_string(),
            by: by.clone(),
        };
        self.call(Owner::User(by.user), record).await.map(drop)
    }

    /// Members of an organization with their emails, in user-id order.
    pub async fn members(&self, org: Uuid) -> Result<Vec<MemberView>> {
        let members: Vec<(String, actors::MemberRecord)> =
            self.entries(Owner::Org(org), keys::MEMBER).await?;
        let mut out = Vec::new();
        for (user_id, m) in members {
            let Some(user_id) = owner::parse_uuid(&user_id) else {
                continue;
            };
            let email = self.user(user_id).await?.map(|u| u.email);
            out.push(MemberView {
                user_id,
                role: m.role,
                added_at_ms: m.added_at_ms,
                email,
            });
        }
        Ok(out)
    }

    /// Adds a member or changes their role, as `by.user`, whose role is checked inside the
    /// organization's transaction: admins manage members and admins; only owners add, promote
    /// to, or demote owners; the last owner cannot be demoted.
    pub async fn put_member(
        &self,
        org: Uuid,
        user: Uuid,
        role: Role,
        by: &Initiator,
    ) -> Result<MemberView> {
        let record = self
            .user(user)
            .await?
            .ok_or(Error::NotFound { what: "user" })?;
        // The index entry first: it may outlive a refused change, never miss an accepted one.
        self.set_membership_index(user, org, true).await?;
        let call = OwnerCall::PutMember {
            user,
            role,
            by: by.clone(),
        };
        let OwnerReply::Member(mut view) = self.call(Owner::Org(org), call).await? else {
            unreachable!("PutMember replies with the member")
        };
        view.email = Some(record.email);
        Ok(view)
    }

    /// Removes a member. Anyone may leave; removing others needs admin, and owner for owners;
    /// the last owner cannot leave. The caller's role is checked inside the organization's
    /// transaction. The member's index entry stays (it is checked on every read).
    pub async fn remove_member(&self, org: Uuid, user: Uuid, by: &Initiator) -> Result<()> {
        let call = OwnerCall::RemoveMember {
            user,
            by: by.clone(),
        };
        self.call(Owner::Org(org), call).await.map(drop)
    }

    // ----- API keys -----

    /// Creates an API key for `owner`, acting as `by.user`. Returns the key (shown once) and
    /// its view. `expires_at_ms` must be in the future.
    pub async fn create_api_key(
        &self,
        owner: Owner,
        name: &str,
        expires_at_ms: Option<i64>,
        by: &Initiator,
    ) -> Result<(String, ApiKeyView)> {
        let (key, record) = self
            .new_api_key(owner, name, expires_at_ms, by.user)
            .await?;
        let view = ApiKeyView::from(&record);
        let call = OwnerCall::CreateApiKey {
            record,
            by: by.clone(),
        };
        self.call(owner, call).await?;
        Ok((key, view))
    }

    /// Generates a key and points the index at its future record. The index is written first:
    /// it only points, and a pointer to a record that never committed is treated as unknown.
    async fn new_api_key(
        &self,
        owner: Owner,
        name: &str,
        expires_at_ms: Option<i64>,
        created_by: Uuid,
    ) -> Result<(String, ApiKeyRecord)> {
        let name = validate_name("name", name, 100)?;
        let now = self.now_ms();
        if expires_at_ms.is_some_and(|e| e <= now) {
            return Err(Error::Invalid("expiresAtMs must be in the future".into()));
        }
        let key = credential::generate_api_key();
        let record = ApiKeyRecord {
            id: Uuid::new_v4(),
            owner,
            name,
            hint: key[key.len() - 4..].to_owned(),
            hash: credential::credential_hash(&key),
            created_by,
            created_at_ms: now,
            expires_at_ms,
            last_used_at_ms: None,
            revoked_at_ms: None,
        };
        let target = format!("{owner}/{}", record.id);
        if !self
            .claim_index(&format!("apikey:{}", record.hash), &target, None)
            .await?
        {
            return Err(Error::conflict(
                "key_collision",
                "generated key collided; retry",
            ));
        }
        Ok((key, record))
    }

    /// API keys of `owner`, revoked ones included, newest first.
    pub async fn list_api_keys(&self, owner: Owner) -> Result<Vec<ApiKeyView>> {
        let mut keys: Vec<ApiKeyRecord> = self.list(owner, keys::APIKEY).await?;
        keys.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(a.id.cmp(&b.id)));
        Ok(keys.iter().map(ApiKeyView::from).collect())
    }

    /// Revokes an API key of `owner`; takes effect on the next request. Idempotent.
    ///
    /// Errors: [`Error::NotFound`] when `owner` has no such key.
    pub async fn revoke_api_key(
        &self,
        owner: Owner,
        id: Uuid,
        by: &Initiator,
    ) -> Result<ApiKeyView> {
        let OwnerReply::ApiKey(record) = self
            .call(owner, OwnerCall::RevokeApiKey { id, by: by.clone() })
            .await?
        else {
            unreachable!("RevokeApiKey replies with the key")
        };
        Ok(ApiKeyView::from(&record))
    }

    // ----- envelopes for other services -----

    /// Encrypts `plaintext` for another service's state (e.g. a session's git token) under the
    /// current master key; `context` (e.g. `user:<id>/agent/<sessionId>/gitToken`) binds it to
    /// its place and must be given again to [`Identity::open`] it.
    pub fn seal(&self, plaintext: &[u8], context: &str) -> envelope::Envelope {
        self.inner.keys.seal(plaintext, context)
    }

    /// Decrypts an envelope made by [`Identity::seal`] with the same `context`.
    ///
    /// Errors: [`Error::Crypto`] when its master key is not configured or it does not
    /// authenticate.
    pub fn open(&self, sealed: &envelope::Envelope, context: &str) -> Result<Vec<u8>> {
        Ok(self.inner.keys.open(sealed, context)?)
    }

    // ----- tickets -----

    /// Issues a single-use ticket for `user` and `resource` (e.g. `session:agent_…`), valid
    /// for 60 s. Returns the ticket and its expiry, ms since epoch.
    pub async fn issue_ticket(&self, user: Uuid, resource: &str) -> Result<(String, i64)> {
        let resource = validate_name("resource", resource, 512)?;
        let ticket = credential::generate_ticket(user);
        let expires_at_ms = self.now_ms() + TICKET_TTL_MS;
        let call = OwnerCall::IssueTicket {
            hash: credential::credential_hash(&ticket),
            ticket: TicketRecord {
                resource,
                expires_at_ms,
            },
        };
        self.call(Owner::User(user), call).await?;
        Ok((ticket, expires_at_ms))
    }

    /// Redeems a ticket for `resource`: returns its user and consumes it, so a second use
    /// fails. Presenting it for another resource fails without consuming it.
    ///
    /// Errors: [`AuthError::TicketInvalid`], [`AuthError::TicketExpired`],
    /// [`AuthError::Malformed`].
    pub async fn redeem_ticket(&self, ticket: &str, resource: &str) -> Result<Uuid> {
        let (user, hash) = credential::parse_ticket(ticket)?;
        let call = OwnerCall::RedeemTicket {
            hash,
            resource: resource.to_owned(),
        };
        match self.call(Owner::User(user), call).await? {
            OwnerReply::TicketExpired => Err(AuthError::TicketExpired.into()),
            _ => Ok(user),
        }
    }

    // ----- secrets -----

    /// Stores `value` under `name` for `owner`, encrypted with a fresh data key.
    ///
    /// Errors: [`Error::Invalid`] for a bad name (`[A-Za-z_][A-Za-z0-9_.-]*`, ≤ 128) or a value
    /// over 64 KiB.
    pub async fn put_secret(
        &self,
        owner: Owner,
        name: &str,
        value: &[u8],
        by: &Initiator,
    ) -> Result<SecretMeta> {
        validate_secret_name(name)?;
        if value.len() > MAX_SECRET_BYTES {
            return Err(Error::Invalid(format!(
                "a secret value is at most {MAX_SECRET_BYTES} bytes"
            )));
        }
        let now = self.now_ms();
        let record = SecretRecord {
            name: name.to_owned(),
            envelope: self.inner.keys.seal(value, &secret_context(owner, name)),
            created_at_ms: now,
            updated_at_ms: now,
        };
        let mut meta = SecretMeta::from(&record);
        self.call(
            owner,
            OwnerCall::PutSecret {
                record,
                by: by.clone(),
            },
        )
        .await?;
        if let Some(stored) = self
            .read::<SecretRecord>(owner, &format!("{}{name}", keys::SECRET))
            .await?
        {
            meta.created_at_ms = stored.created_at_ms;
        }
        Ok(meta)
    }

    /// Names and times of `owner`'s secrets, by name.
    pub async fn list_secrets(&self, owner: Owner) -> Result<Vec<SecretMeta>> {
        let secrets: Vec<SecretRecord> = self.list(owner, keys::SECRET).await?;
        Ok(secrets.iter().map(SecretMeta::from).collect())
    }

    /// Deletes a secret. Errors: [`Error::NotFound`].
    pub async fn delete_secret(&self, owner: Owner, name: &str, by: &Initiator) -> Result<()> {
        self.call(
            owner,
            OwnerCall::DeleteSecret {
                name: name.to_owned(),
                by: by.clone(),
            },
        )
        .await
        .map(drop)
    }

    /// The decrypted value of a secret, for services that use it (never for API responses).
    pub async fn secret_value(&self, owner: Owner, name: &str) -> Result<Option<Vec<u8>>> {
        let Some(record) = self
            .read::<SecretRecord>(owner, &format!("{}{name}", keys::SECRET))
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(
            self.inner
                .keys
                .open(&record.envelope, &secret_context(owner, name))?,
        ))
    }

    /// Re-wraps every secret's data key with the current master key, owner by owner; each
    /// owner's secrets change in one transaction. Safe to re-run; safe while servers run on
    /// PostgreSQL (actor locks serialize it with their writes).
    pub async fn rotate_master_key(
        &self,
        mut progress: impl FnMut(&RotationReport),
    ) -> Result<RotationReport> {
        let mut report = RotationReport::default();
        let mut after = String::new();
        loop {
            let batch = self
                .inner
                .sub
                .actor_keys(OwnerActor::TYPE, &after, 500)
                .await?;
            let Some(last) = batch.last() else { break };
            after = last.clone();
            for key in batch {
                let Ok(owner) = key.parse::<Owner>() else {
                    continue;
                };
                let call = OwnerCall::Rewrap {
                    keys: self.inner.keys.clone(),
                };
                if let OwnerReply::Rewrapped { rewrapped, current } = self.call(owner, call).await?
                {
                    report.rewrapped += rewrapped;
                    report.already_current += current;
                }
                report.owners += 1;
            }
            progress(&report);
        }
        Ok(report)
    }

    /// Id of the master key new secrets are wrapped with.
    pub fn master_key_id(&self) -> &str {
        self.inner.keys.current_id()
    }

    // ----- bots -----

    /// Creates a bot for `owner`.
    pub async fn create_bot(&self, owner: Owner, name: &str, by: &Initiator) -> Result<BotView> {
        let bot = BotView {
            id: Uuid::new_v4(),
            owner,
            name: validate_name("name", name, 100)?,
            created_by: by.user,
            created_at_ms: self.now_ms(),
        };
        self.call(
            owner,
            OwnerCall::CreateBot {
                bot: bot.clone(),
                by: by.clone(),
            },
        )
        .await?;
        Ok(bot)
    }

    /// Bots of `owner`.
    pub async fn list_bots(&self, owner: Owner) -> Result<Vec<BotView>> {
        self.list(owner, keys::BOT).await
    }

    /// Deletes a bot; its tokens stop working. Errors: [`Error::NotFound`].
    pub async fn delete_bot(&self, owner: Owner, id: Uuid, by: &Initiator) -> Result<()> {
        self.call(owner, OwnerCall::DeleteBot { id, by: by.clone() })
            .await
            .map(drop)
    }

    // ----- audit -----

    /// Appends an entry to `owner`'s audit log for a change another service made (e.g. the
    /// gateway's `gateway_policy.updated`). It commits after that change, not with it.
    ///
    /// Errors: [`Error::NotFound`] when the owner does not exist.
    pub async fn record_audit(
        &self,
        owner: Owner,
        action: &'static str,
        target: String,
        by: &Initiator,
    ) -> Result<()> {
        let record = OwnerCall::Record {
            action,
            target,
            by: by.clone(),
        };
        self.call(owner, record).await.map(drop)
    }

    /// `owner`'s audit log, newest first: entries with `seq < before` (all when `None`), at
    /// most `limit`.
    pub async fn audit(
        &self,
        owner: Owner,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>> {
        let mut entries: Vec<AuditEntry> = self.list(owner, keys::AUDIT).await?;
        entries.retain(|e| before.is_none_or(|b| e.seq < b));
        entries.reverse();
        entries.truncate(limit);
        Ok(entries)
    }

    // ----- bootstrap -----

    /// On a store without an administrator, creates one (`email`) with an API key; returns
    /// both, or `None` when the store was already initialized. One index entry picks the
    /// administrator's id, and the user and key commit together, so concurrent nodes create
    /// exactly one, and re-running after a crash half-way finishes the job.
    pub async fn bootstrap(&self, email: &str) -> Result<Option<(UserRecord, String)>> {
        let claimed = Uuid::new_v4().to_string();
        let holder = if self.claim_index(BOOTSTRAP_INDEX, &claimed, None).await? {
            claimed
        } else {
            self.read_index(BOOTSTRAP_INDEX).await?.unwrap_or_default()
        };
        let admin_id = owner::parse_uuid(&holder)
            .ok_or(Error::Invalid("bootstrap record is corrupt".into()))?;
        if self.user(admin_id).await?.is_some() {
            return Ok(None);
        }
        match self
            .insert_user(admin_id, email, "Administrator", true, None)
            .await
        {
            Ok((user, key, _)) => Ok(Some((user, key))),
            Err(Error::Conflict {
                code: "user_exists",
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The bootstrap administrator's id, once initialized.
    pub async fn bootstrap_admin(&self) -> Result<Option<Uuid>> {
        Ok(self
            .read_index(BOOTSTRAP_INDEX)
            .await?
            .as_deref()
            .and_then(owner::parse_uuid))
    }
}

fn tokio_spawn(f: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(f);
    }
}

fn parse_key_target(target: &str) -> Option<(Owner, Uuid)> {
    let (owner, id) = target.split_once('/')?;
    Some((owner.parse().ok()?, owner::parse_uuid(id)?))
}

fn secret_context(owner: Owner, name: &str) -> String {
    format!("{owner}/secret/{name}")
}

fn new_pepper() -> String {
    Uuid::new_v4().to_string()
}

fn normalize_email(email: &str) -> Result<String> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && email
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty() && !d.contains('@'))
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(Error::Invalid(format!("`{email}` is not an email address")))
    }
}

fn validate_name(field: &str, value: &str, max: usize) -> Result<String> {
    let v = value.trim();
    if v.is_empty() || v.chars().count() > max || v.chars().any(char::is_control) {
        return Err(Error::Invalid(format!(
            "{field} must be 1 to {max} characters without control characters"
        )));
    }
    Ok(v.to_owned())
}

/// Secret names: a letter or `_`, then letters, digits, `_`, `.` or `-`; at most 128.
fn validate_secret_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = name.len() <= 128
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid("a secret name starts with a letter or `_` and has at most 128 letters, digits, `_`, `.` or `-`".into()))
    }
}
