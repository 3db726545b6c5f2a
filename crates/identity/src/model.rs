//! Stored records and their API views. Times are ms since the Unix epoch. Records are what
//! the owner actor stores; views are what the HTTP API returns (no hashes, peppers or
//! ciphertexts).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::owner::{Owner, Role};

/// A user (stored as `profile` in the actor of `user:<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// User id.
    pub id: Uuid,
    /// Email, unique (case-insensitive).
    pub email: String,
    /// Display name.
    pub name: String,
    /// Site administrator: may create users and use the admin API.
    pub is_admin: bool,
    /// Creation time, ms.
    pub created_at_ms: i64,
    /// Current API token pepper; tokens must carry exactly this value.
    pub api_token_pepper: Option<String>,
}

/// A user as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    /// User id.
    pub id: Uuid,
    /// Email.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Site administrator.
    pub is_admin: bool,
    /// Creation time, ms since epoch.
    pub created_at_ms: i64,
}

impl From<&UserRecord> for UserView {
    fn from(u: &UserRecord) -> Self {
        Self {
            id: u.id,
            email: u.email.clone(),
            name: u.name.clone(),
            is_admin: u.is_admin,
            created_at_ms: u.created_at_ms,
        }
    }
}

/// An organization (stored as `profile` in the actor of `org:<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrgView {
    /// Organization id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// Creation time, ms since epoch.
    pub created_at_ms: i64,
    /// The user who created it.
    pub created_by: Uuid,
}

/// An organization with the caller's role in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrgMembershipView {
    /// The organization.
    #[serde(flatten)]
    pub org: OrgView,
    /// The caller's role.
    pub role: Role,
}

/// A membership (stored as `member/<userId>` in the organization's actor, which is the
/// authority; the user's actor keeps `membership/<orgId>` as an index for listing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberView {
    /// The member.
    pub user_id: Uuid,
    /// Their role.
    pub role: Role,
    /// When they were added, ms since epoch.
    pub added_at_ms: i64,
    /// Their email, when the user still exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// An API key (stored as `apikey/<id>` in its owner's actor; the global index maps its hash to
/// the owner and id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Key id (not secret).
    pub id: Uuid,
    /// Owner: a user, or an organization (then the key acts as `created_by` in that org).
    pub owner: Owner,
    /// Name given at creation.
    pub name: String,
    /// Last 4 characters of the key, to tell keys apart.
    pub hint: String,
    /// SHA-256 of the key, hex.
    pub hash: String,
    /// The user who created it; the key acts as this user.
    pub created_by: Uuid,
    /// Creation time, ms.
    pub created_at_ms: i64,
    /// Expiry, ms; none for keys that do not expire.
    pub expires_at_ms: Option<i64>,
    /// Last successful use, ms (updated at most once a minute).
    pub last_used_at_ms: Option<i64>,
    /// Revocation time, ms.
    pub revoked_at_ms: Option<i64>,
}

/// An API key as the API shows it (never the key or its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyView {
    /// Key id.
    pub id: Uuid,
    /// Owner.
    pub owner: Owner,
    /// Name.
    pub name: String,
    /// `kc_…` and the last 4 characters.
    pub hint: String,
    /// Creator.
    pub created_by: Uuid,
    /// Creation time, ms since epoch.
    pub created_at_ms: i64,
    /// Expiry, ms since epoch.
    pub expires_at_ms: Option<i64>,
    /// Last use, ms since epoch (at most a minute stale).
    pub last_used_at_ms: Option<i64>,
    /// Revocation time, ms since epoch.
    pub revoked_at_ms: Option<i64>,
}

impl From<&ApiKeyRecord> for ApiKeyView {
    fn from(k: &ApiKeyRecord) -> Self {
        Self {
            id: k.id,
            owner: k.owner,
            name: k.name.clone(),
            hint: format!("kc_…{}", k.hint),
            created_by: k.created_by,
            created_at_ms: k.created_at_ms,
            expires_at_ms: k.expires_at_ms,
            last_used_at_ms: k.last_used_at_ms,
            revoked_at_ms: k.revoked_at_ms,
        }
    }
}

/// A bot: a service identity of a user or an organization, used by automations. Tokens for a
/// bot carry `botId` and act for the bot's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BotView {
    /// Bot id.
    pub id: Uuid,
    /// Owner.
    pub owner: Owner,
    /// Name.
    pub name: String,
    /// Creator.
    pub created_by: Uuid,
    /// Creation time, ms since epoch.
    pub created_at_ms: i64,
}

/// A stored secret (`secret/<name>` in the owner's actor): the value only as an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// Name.
    pub name: String,
    /// The encrypted value.
    pub envelope: Envelope,
    /// First write, ms.
    pub created_at_ms: i64,
    /// Last write, ms.
    pub updated_at_ms: i64,
}

/// A secret as the API shows it: name and times, never the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretMeta {
    /// Name.
    pub name: String,
    /// First write, ms since epoch.
    pub created_at_ms: i64,
    /// Last write, ms since epoch.
    pub updated_at_ms: i64,
}

impl From<&SecretRecord> for SecretMeta {
    fn from(s: &SecretRecord) -> Self {
        Self {
            name: s.name.clone(),
            created_at_ms: s.created_at_ms,
            updated_at_ms: s.updated_at_ms,
        }
    }
}

/// One audit log entry, written in the same transaction as the change it records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Sequence number within the owner's log, from 1.
    pub seq: u64,
    /// Time, ms since epoch.
    pub at_ms: i64,
    /// The user who made the change.
    pub actor: Uuid,
    /// Whose log this is.
    pub owner: Owner,
    /// What happened, e.g. `token.created`, `member.added`, `secret.written`.
    pub action: String,
    /// What it happened to: a key id, a user id, a secret name.
    pub target: String,
    /// The request id of the HTTP request that made the change.
    pub request_id: Option<String>,
}

/// Who is making a change, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Initiator {
    /// The acting user.
    pub user: Uuid,
    /// The request id, if the change came over HTTP.
    pub request_id: Option<String>,
}
