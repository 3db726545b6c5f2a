//! Owners and roles: who a resource belongs to, and what a member of an organization may do.
//!
//! Every service scopes its state to an [`Owner`]; its string form (`user:<uuid>`,
//! `org:<uuid>`) is the key of the owner's actor and a prefix of other services' actor keys, so
//! ownership is part of every address (DESIGN.md §4, invariant 1).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// A user or an organization: the party a resource belongs to and is billed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// A user, by user id.
    User(Uuid),
    /// An organization, by organization id.
    Org(Uuid),
}

impl Owner {
    /// The owner's id (user id or organization id).
    pub fn id(&self) -> Uuid {
        match self {
            Owner::User(id) | Owner::Org(id) => *id,
        }
    }

    /// `user` or `org`.
    pub fn kind(&self) -> &'static str {
        match self {
            Owner::User(_) => "user",
            Owner::Org(_) => "org",
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind(), self.id())
    }
}

/// Why a string is not an [`Owner`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an owner is `user:<uuid>` or `org:<uuid>`")]
pub struct OwnerParseError;

impl FromStr for Owner {
    type Err = OwnerParseError;

    /// Parses `user:<uuid>` or `org:<uuid>` (hyphenated UUID).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, id) = s.split_once(':').ok_or(OwnerParseError)?;
        let id = parse_uuid(id).ok_or(OwnerParseError)?;
        match kind {
            "user" => Ok(Owner::User(id)),
            "org" => Ok(Owner::Org(id)),
            _ => Err(OwnerParseError),
        }
    }
}

impl Serialize for Owner {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Owner {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for Owner {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some("`user:<uuid>` or `org:<uuid>`"))
            .examples(["org:0b5d3c1e-6f5e-4a35-9a5b-8f1f2e3d4c5b"])
            .into()
    }
}

impl ToSchema for Owner {}

/// Parses a hyphenated UUID (36 characters), the only form ids take in paths and headers.
pub fn parse_uuid(s: &str) -> Option<Uuid> {
    if s.len() != 36 {
        return None;
    }
    Uuid::try_parse(s).ok()
}

/// A member's role in an organization, ordered by power: `member < admin < owner`.
///
/// - `member`: uses the organization's resources (sessions, models, secrets by name).
/// - `admin`: also manages members (up to `admin`), API keys, secrets, bots and settings.
/// - `owner`: also adds and removes owners and deletes the organization.
///
/// A user acting for themselves holds `owner` over their own resources.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Uses the organization's resources.
    Member,
    /// Manages members, keys, secrets and bots.
    Admin,
    /// Full control, including deleting the organization.
    Owner,
}

impl Role {
    /// `member`, `admin` or `owner`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "member" => Ok(Role::Member),
            "admin" => Ok(Role::Admin),
            "owner" => Ok(Role::Owner),
            other => Err(format!(
                "unknown role `{other}`: expected member, admin or owner"
            )),
        }
    }
}

/// Why an `X-KiloCode-OrganizationId` header value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("X-KiloCode-OrganizationId must be a UUID")]
pub struct OrgHeaderError;

/// Parses the `X-KiloCode-OrganizationId` header value (reference §0.1): surrounding
/// whitespace is ignored, an empty value means no organization, anything else must be a
/// hyphenated UUID.
pub fn parse_org_header(raw: &[u8]) -> Result<Option<Uuid>, OrgHeaderError> {
    let s = std::str::from_utf8(raw).map_err(|_| OrgHeaderError)?.trim();
    if s.is_empty() {
        return Ok(None);
    }
    parse_uuid(s).map(Some).ok_or(OrgHeaderError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_round_trips_through_its_string_form() {
        let id = Uuid::new_v4();
        for owner in [Owner::User(id), Owner::Org(id)] {
            let s = owner.to_string();
            assert_eq!(s.parse::<Owner>().unwrap(), owner);
            let json = serde_json::to_string(&owner).unwrap();
            assert_eq!(json, format!("\"{s}\""));
        }
        for bad in [
            "",
            "user",
            "user:",
            "team:",
            "org:not-a-uuid",
            "user:{00000000-0000-0000-0000-000000000000}",
        ] {
            assert!(bad.parse::<Owner>().is_err(), "{bad}");
        }
    }

    #[test]
    fn roles_are_ordered_by_power() {
        assert!(Role::Member < Role::Admin && Role::Admin < Role::Owner);
        assert_eq!("admin".parse::<Role>().unwrap(), Role::Admin);
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn org_header_accepts_only_hyphenated_uuids() {
        let id = Uuid::new_v4();
        assert_eq!(parse_org_header(id.to_string().as_bytes()), Ok(Some(id)));
        assert_eq!(parse_org_header(format!(" {id} ").as_bytes()), Ok(Some(id)));
        assert_eq!(parse_org_header(b""), Ok(None));
        for bad in [
            &b"42"[..],
            b"not-a-uuid",
            &[0xff, 0xfe],
            id.simple().to_string().as_bytes(),
        ] {
            assert_eq!(parse_org_header(bad), Err(OrgHeaderError));
        }
    }
}
