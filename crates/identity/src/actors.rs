//! The two actor types identity keeps its state in.
//!
//! - `owner`, keyed by the [`Owner`] string (`user:<id>`, `org:<id>`): the profile, the
//!   organization's members (the authority) or the user's membership index, API keys,
//!   tickets, secrets, bots and the audit log. One actor per owner means every change and its
//!   audit entry commit together, and calls on one owner are serialized.
//! - `index`, keyed by `<namespace>:<value>` (`email:<address>`, `apikey:<sha256>`): unique
//!   pointers from a lookup value to an owner. An index entry is never the authority: a
//!   pointer whose target is gone is treated as absent.
//!
//! A user's membership index is a superset of their memberships: an entry is added before the
//! organization commits the membership and is not removed when the member leaves (readers
//! check each entry against the organization), so no interleaving of calls or crash can hide
//! a membership. Only the service calls actors; actors never call each other, so no cycle of
//! calls can deadlock (see [`kilocloud_substrate::Actor`]).

use std::sync::Arc;

use kilocloud_substrate::{ActorContext, Result as SubResult};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::credential::AuthError;
use crate::envelope::MasterKeys;
use crate::error::{Error, Result};
use crate::model::{
    ApiKeyRecord, AuditEntry, BotView, Initiator, MemberView, OrgView, SecretRecord, UserRecord,
};
use crate::owner::{Owner, Role};

/// Audit entries kept per owner; older ones are deleted as new ones arrive.
pub const AUDIT_RETENTION: u64 = 10_000;
/// Most outstanding tickets per user; issuing more first drops expired ones, then refuses.
pub const MAX_TICKETS_PER_USER: usize = 100;

/// Storage keys inside an owner actor.
pub(crate) mod keys {
    pub const PROFILE: &str = "profile";
    pub const AUDIT_SEQ: &str = "audit_seq";
    pub const AUDIT: &str = "audit/";
    pub const MEMBER: &str = "member/";
    pub const MEMBERSHIP: &str = "membership/";
    pub const APIKEY: &str = "apikey/";
    pub const TICKET: &str = "ticket/";
    pub const SECRET: &str = "secret/";
    pub const BOT: &str = "bot/";
}

/// A stored ticket (`ticket/<sha256>` in the user's actor).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct TicketRecord {
    pub resource: String,
    pub expires_at_ms: i64,
}

/// A stored membership (`member/<userId>` in the organization's actor).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct MemberRecord {
    pub role: Role,
    pub added_at_ms: i64,
}

/// Calls on an owner actor. A refusal is returned as the reply's `Err`, after the call's
/// buffered writes are rolled back, so it never commits part of a change.
pub(crate) enum OwnerCall {
    CreateUser {
        user: UserRecord,
        key: ApiKeyRecord,
        by: Initiator,
    },
    RotatePepper {
        pepper: String,
        by: Initiator,
    },
    CreateOrg {
        org: OrgView,
        by: Initiator,
    },
    RenameOrg {
        name: String,
        by: Initiator,
    },
    DeleteOrg,
    Record {
        action: &'static str,
        target: String,
        by: Initiator,
    },
    PutMember {
        user: Uuid,
        role: Role,
        by: Initiator,
    },
    RemoveMember {
        user: Uuid,
        by: Initiator,
    },
    SetMembershipIndex {
        org: Uuid,
        present: bool,
    },
    CreateApiKey {
        record: ApiKeyRecord,
        by: Initiator,
    },
    RevokeApiKey {
        id: Uuid,
        by: Initiator,
    },
    TouchApiKey {
        id: Uuid,
        at_ms: i64,
    },
    IssueTicket {
        hash: String,
        ticket: TicketRecord,
    },
    RedeemTicket {
        hash: String,
        resource: String,
    },
    PutSecret {
        record: SecretRecord,
        by: Initiator,
    },
    DeleteSecret {
        name: String,
        by: Initiator,
    },
    Rewrap {
        keys: Arc<MasterKeys>,
    },
    CreateBot {
        bot: BotView,
        by: Initiator,
    },
    DeleteBot {
        id: Uuid,
        by: Initiator,
    },
    List {
        prefix: &'static str,
    },
}

/// Replies of [`OwnerCall`]s.
pub(crate) enum OwnerReply {
    Done,
    Members(Vec<Uuid>),
    Member(MemberView),
    ApiKey(ApiKeyRecord),
    Rewrapped { rewrapped: u64, current: u64 },
    Entries(Vec<(String, serde_json::Value)>),
    TicketExpired,
}

/// The `owner` actor type.
pub(crate) struct OwnerActor;

impl kilocloud_substrate::Actor for OwnerActor {
    const TYPE: &'static str = "owner";
    type Call = OwnerCall;
    type Reply = Result<OwnerReply>;

    async fn call(&self, ctx: &mut ActorContext, call: OwnerCall) -> SubResult<Result<OwnerReply>> {
        let owner: Owner = ctx
            .key()
            .parse()
            .map_err(|_| kilocloud_substrate::Error::Invalid {
                what: "owner actor key",
                message: ctx.key().to_owned(),
            })?;
        let mut h = Handler { ctx, owner };
        match h.handle(call).await {
            Ok(reply) => Ok(Ok(reply)),
            Err(Error::Substrate(e)) => Err(e),
            // A refusal: whatever the handler buffered is dropped; the caller gets the reason.
            Err(e) => {
                ctx.rollback();
                Ok(Err(e))
            }
        }
    }
}

struct Handler<'a> {
    ctx: &'a mut ActorContext,
    owner: Owner,
}

impl Handler<'_> {
    async fn get<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>> {
        Ok(self.ctx.get(key).await?)
    }

    fn put<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<()> {
        Ok(self.ctx.put(key, value)?)
    }

    async fn require_profile<T: DeserializeOwned>(&mut self) -> Result<T> {
        let what = match self.owner {
            Owner::User(_) => "user",
            Owner::Org(_) => "organization",
        };
        self.get(keys::PROFILE)
            .await?
            .ok_or(Error::NotFound { what })
    }

    async fn audit(
        &mut self,
        by: &Initiator,
        action: &str,
        target: impl Into<String>,
    ) -> Result<()> {
        let seq = self.get::<u64>(keys::AUDIT_SEQ).await?.unwrap_or(0) + 1;
        let entry = AuditEntry {
            seq,
            at_ms: self.ctx.now_ms(),
            actor: by.user,
            owner: self.owner,
            action: action.to_owned(),
            target: target.into(),
            request_id: by.request_id.clone(),
        };
        self.put(keys::AUDIT_SEQ, &seq)?;
        self.put(&audit_key(seq), &entry)?;
        if seq > AUDIT_RETENTION {
            self.ctx.delete(&audit_key(seq - AUDIT_RETENTION));
        }
        Ok(())
    }

    async fn handle(&mut self, call: OwnerCall) -> Result<OwnerReply> {
        match call {
            OwnerCall::CreateUser { user, key, by } => {
                if self.get::<UserRecord>(keys::PROFILE).await?.is_some() {
                    return Err(Error::conflict("user_exists", "user already exists"));
                }
                self.put(keys::PROFILE, &user)?;
                self.put(&format!("{}{}", keys::APIKEY, key.id), &key)?;
                self.audit(&by, "user.created", user.id.to_string()).await?;
                self.audit(&by, "token.created", format!("{} ({})", key.id, key.name))
                    .await?;
            }
            OwnerCall::RotatePepper { pepper, by } => {
                let mut user: UserRecord = self.require_profile().await?;
                user.api_token_pepper = Some(pepper);
                self.put(keys::PROFILE, &user)?;
                self.audit(&by, "pepper.rotated", user.id.to_string())
                    .await?;
            }
            OwnerCall::CreateOrg { org, by } => {
                if self.get::<OrgView>(keys::PROFILE).await?.is_some() {
                    return Err(Error::conflict("org_exists", "organization already exists"));
                }
                self.put(keys::PROFILE, &org)?;
                let member = MemberRecord {
                    role: Role::Owner,
                    added_at_ms: org.created_at_ms,
                };
                self.put(&format!("{}{}", keys::MEMBER, by.user), &member)?;
                self.audit(&by, "org.created", org.id.to_string()).await?;
                self.audit(&by, "member.added", format!("{} as owner", by.user))
                    .await?;
            }
            OwnerCall::RenameOrg { name, by } => {
                let mut org: OrgView = self.require_profile().await?;
                org.name = name;
                self.put(keys::PROFILE, &org)?;
                self.audit(&by, "org.renamed", org.name.clone()).await?;
            }
            OwnerCall::Record { action, target, by } => {
                self.require_owner_exists().await?;
                self.audit(&by, action, target).await?;
            }
            OwnerCall::DeleteOrg => {
                let _: OrgView = self.require_profile().await?;
                let members = self.member_ids().await?;
                self.ctx.delete_all();
                return Ok(OwnerReply::Members(members));
            }
            OwnerCall::PutMember { user, role, by } => {
                let _: OrgView = self.require_profile().await?;
                let caller_role = self.caller_role(by.user).await?;
                if caller_role < Role::Admin {
                    return Err(Error::forbidden(
                        "insufficient_role",
                        "managing members needs the admin role",
                    ));
                }
                let key = format!("{}{user}", keys::MEMBER);
                let existing: Option<MemberRecord> = self.get(&key).await?;
                let touches_owner =
                    role == Role::Owner || existing.as_ref().is_some_and(|m| m.role == Role::Owner);
                if touches_owner && caller_role < Role::Owner {
                    return Err(Error::forbidden(
                        "insufficient_role",
                        "only an owner can add, demote or promote owners",
                    ));
                }
                if existing.as_ref().is_some_and(|m| m.role == Role::Owner) && role != Role::Owner {
                    self.ensure_another_owner(user).await?;
                }
                let added_at_ms = existing
                    .as_ref()
                    .map_or(self.ctx.now_ms(), |m| m.added_at_ms);
                self.put(&key, &MemberRecord { role, added_at_ms })?;
                let action = if existing.is_some() {
                    "member.role_changed"
                } else {
                    "member.added"
                };
                self.audit(&by, action, format!("{user} as {role}")).await?;
                return Ok(OwnerReply::Member(MemberView {
                    user_id: user,
                    role,
                    added_at_ms,
                    email: None,
                }));
            }
            OwnerCall::RemoveMember { user, by } => {
                let _: OrgView = self.require_profile().await?;
                // Anyone may leave; removing others needs admin, and owner for owners.
                let caller_role = match by.user == user {
                    true => Role::Owner,
                    false => self.caller_role(by.user).await?,
                };
                if caller_role < Role::Admin {
                    return Err(Error::forbidden(
                        "insufficient_role",
                        "removing members needs the admin role",
                    ));
                }
                let key = format!("{}{user}", keys::MEMBER);
                let existing: MemberRecord = self
                    .get(&key)
                    .await?
                    .ok_or(Error::NotFound { what: "member" })?;
                if existing.role == Role::Owner {
                    if caller_role < Role::Owner {
                        return Err(Error::forbidden(
                            "insufficient_role",
                            "only an owner can remove an owner",
                        ));
                    }
                    self.ensure_another_owner(user).await?;
                }
                self.ctx.delete(&key);
                self.audit(&by, "member.removed", user.to_string()).await?;
            }
            OwnerCall::SetMembershipIndex { org, present } => {
                let key = format!("{}{org}", keys::MEMBERSHIP);
                match present {
                    true => self.put(&key, &true)?,
                    false => self.ctx.delete(&key),
                }
            }
            OwnerCall::CreateApiKey { record, by } => {
                self.require_owner_exists().await?;
                self.put(&format!("{}{}", keys::APIKEY, record.id), &record)?;
                self.audit(
                    &by,
                    "token.created",
                    format!("{} ({})", record.id, record.name),
                )
                .await?;
            }
            OwnerCall::RevokeApiKey { id, by } => {
                let key = format!("{}{id}", keys::APIKEY);
                let mut record: ApiKeyRecord = self
                    .get(&key)
                    .await?
                    .ok_or(Error::NotFound { what: "API key" })?;
                if record.revoked_at_ms.is_none() {
                    record.revoked_at_ms = Some(self.ctx.now_ms());
                    self.put(&key, &record)?;
                    self.audit(
                        &by,
                        "token.revoked",
                        format!("{} ({})", record.id, record.name),
                    )
                    .await?;
                }
                return Ok(OwnerReply::ApiKey(record));
            }
            OwnerCall::TouchApiKey { id, at_ms } => {
                let key = format!("{}{id}", keys::APIKEY);
                if let Some(mut record) = self.get::<ApiKeyRecord>(&key).await? {
                    record.last_used_at_ms = Some(at_ms.max(record.last_used_at_ms.unwrap_or(0)));
                    self.put(&key, &record)?;
                }
            }
            OwnerCall::IssueTicket { hash, ticket } => {
                let now = self.ctx.now_ms();
                let outstanding: Vec<(String, TicketRecord)> = self.ctx.list(keys::TICKET).await?;
                let mut live = 0;
                for (key, t) in outstanding {
                    if t.expires_at_ms <= now {
                        self.ctx.delete(&key);
                    } else {
                        live += 1;
                    }
                }
                if live >= MAX_TICKETS_PER_USER {
                    return Err(Error::conflict(
                        "too_many_tickets",
                        format!(
                            "at most {MAX_TICKETS_PER_USER} unused tickets per user; use or let some expire"
                        ),
                    ));
                }
                self.put(&format!("{}{hash}", keys::TICKET), &ticket)?;
            }
            OwnerCall::RedeemTicket { hash, resource } => {
                let key = format!("{}{hash}", keys::TICKET);
                let ticket: Option<TicketRecord> = self.get(&key).await?;
                let Some(ticket) = ticket else {
                    return Err(AuthError::TicketInvalid.into());
                };
                if ticket.resource != resource {
                    // Not consumed: presenting it for the wrong resource must not burn it.
                    return Err(AuthError::TicketInvalid.into());
                }
                self.ctx.delete(&key);
                // Consumed either way, so an expired ticket does not linger.
                if ticket.expires_at_ms <= self.ctx.now_ms() {
                    return Ok(OwnerReply::TicketExpired);
                }
            }
            OwnerCall::PutSecret { record, by } => {
                self.require_owner_exists().await?;
                let key = format!("{}{}", keys::SECRET, record.name);
                let existing: Option<SecretRecord> = self.get(&key).await?;
                let record = SecretRecord {
                    created_at_ms: existing.map_or(record.created_at_ms, |e| e.created_at_ms),
                    ..record
                };
                self.put(&key, &record)?;
                self.audit(&by, "secret.written", record.name.clone())
                    .await?;
            }
            OwnerCall::DeleteSecret { name, by } => {
                let key = format!("{}{name}", keys::SECRET);
                if self.get::<SecretRecord>(&key).await?.is_none() {
                    return Err(Error::NotFound { what: "secret" });
                }
                self.ctx.delete(&key);
                self.audit(&by, "secret.deleted", name).await?;
            }
            OwnerCall::Rewrap { keys: ring } => {
                let secrets: Vec<(String, SecretRecord)> = self.ctx.list(keys::SECRET).await?;
                let (mut rewrapped, mut current) = (0, 0);
                for (key, mut record) in secrets {
                    match ring.rewrap(&record.envelope)? {
                        Some(envelope) => {
                            record.envelope = envelope;
                            self.put(&key, &record)?;
                            rewrapped += 1;
                        }
                        None => current += 1,
                    }
                }
                return Ok(OwnerReply::Rewrapped { rewrapped, current });
            }
            OwnerCall::CreateBot { bot, by } => {
                self.require_owner_exists().await?;
                self.put(&format!("{}{}", keys::BOT, bot.id), &bot)?;
                self.audit(&by, "bot.created", format!("{} ({})", bot.id, bot.name))
                    .await?;
            }
            OwnerCall::DeleteBot { id, by } => {
                let key = format!("{}{id}", keys::BOT);
                if self.get::<BotView>(&key).await?.is_none() {
                    return Err(Error::NotFound { what: "bot" });
                }
                self.ctx.delete(&key);
                self.audit(&by, "bot.deleted", id.to_string()).await?;
            }
            OwnerCall::List { prefix } => {
                return Ok(OwnerReply::Entries(self.ctx.list(prefix).await?));
            }
        }
        Ok(OwnerReply::Done)
    }

    async fn require_owner_exists(&mut self) -> Result<()> {
        match self.owner {
            Owner::User(_) => self.require_profile::<UserRecord>().await.map(drop),
            Owner::Org(_) => self.require_profile::<OrgView>().await.map(drop),
        }
    }

    /// The caller's current role in this organization, read in the same transaction as the
    /// change it authorizes (a role checked earlier may have changed since).
    async fn caller_role(&mut self, caller: Uuid) -> Result<Role> {
        let member: Option<MemberRecord> = self.get(&format!("{}{caller}", keys::MEMBER)).await?;
        member.map(|m| m.role).ok_or(Error::NotFound {
            what: "organization",
        })
    }

    async fn member_ids(&mut self) -> Result<Vec<Uuid>> {
        let members: Vec<(String, MemberRecord)> = self.ctx.list(keys::MEMBER).await?;
        Ok(members
            .into_iter()
            .filter_map(|(k, _)| k[keys::MEMBER.len()..].parse().ok())
            .collect())
    }

    /// Refuses a change that would leave the organization without an owner.
    async fn ensure_another_owner(&mut self, leaving: Uuid) -> Result<()> {
        let members: Vec<(String, MemberRecord)> = self.ctx.list(keys::MEMBER).await?;
        let others = members
            .iter()
            .filter(|(k, m)| m.role == Role::Owner && !k.ends_with(&leaving.to_string()))
            .count();
        if others == 0 {
            return Err(Error::conflict(
                "last_owner",
                "an organization must keep at least one owner",
            ));
        }
        Ok(())
    }
}

fn audit_key(seq: u64) -> String {
    format!("{}{seq:020}", keys::AUDIT)
}

/// How long a claim is protected from takeover, ms: a claim whose record has not appeared
/// this long after it was made is abandoned (its claimer crashed), never one in progress.
pub(crate) const CLAIM_GRACE_MS: i64 = 60_000;

/// Calls on an index actor.
pub(crate) enum IndexCall {
    /// Points the entry at `target` unless it points elsewhere. `steal_from` takes over a
    /// pointer the caller has found dangling, if it is older than [`CLAIM_GRACE_MS`]. Replies
    /// whether the entry now points at `target`.
    Claim {
        target: String,
        steal_from: Option<String>,
    },
}

/// The `index` actor type: one unique pointer per key, stored as `target`.
pub(crate) struct IndexActor;

/// Storage key of an index entry's pointer.
pub(crate) const INDEX_TARGET: &str = "target";
/// Storage key of when the pointer was set, ms.
const INDEX_CLAIMED_AT: &str = "claimed_at_ms";

impl kilocloud_substrate::Actor for IndexActor {
    const TYPE: &'static str = "index";
    type Call = IndexCall;
    type Reply = bool;

    async fn call(&self, ctx: &mut ActorContext, call: IndexCall) -> SubResult<bool> {
        let current: Option<String> = ctx.get(INDEX_TARGET).await?;
        let IndexCall::Claim { target, steal_from } = call;
        let abandoned = match (&current, &steal_from) {
            (Some(c), Some(s)) if c == s => {
                let at: i64 = ctx.get(INDEX_CLAIMED_AT).await?.unwrap_or(0);
                ctx.now_ms() - at >= CLAIM_GRACE_MS
            }
            _ => false,
        };
        if current.as_ref() == Some(&target) {
            return Ok(true);
        }
        if current.is_some() && !abandoned {
            return Ok(false);
        }
        ctx.put(INDEX_TARGET, &target)?;
        ctx.put(INDEX_CLAIMED_AT, &ctx.now_ms())?;
        Ok(true)
    }
}
