//! Identity derivations (reference kilo-cloud.md §2 "Identity derivations", and the
//! multi-instance design): an instance's sandbox id is `ki_` + its UUID's 32 hex digits (35
//! chars); a legacy per-user instance's sandbox id is base64url (no padding) of the user id,
//! at most 63 chars. The two are told apart by shape alone ([`SandboxId::parse`]), without a
//! lookup. App, volume and machine names derive from them.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Prefix of an instance's sandbox id.
pub const INSTANCE_SANDBOX_PREFIX: &str = "ki_";
/// Longest sandbox id (a DNS label; reference: longer is an error).
pub const MAX_SANDBOX_ID_LEN: usize = 63;
/// Longest volume name Fly accepts.
const MAX_VOLUME_NAME_LEN: usize = 30;

/// A sandbox id, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxId {
    /// `ki_<32 hex>`: the instance with this id.
    Instance(Uuid),
    /// base64url of a user id: that user's legacy instance.
    Legacy(String),
}

impl SandboxId {
    /// The sandbox id of instance `id`: `ki_` + 32 lowercase hex digits.
    pub fn for_instance(id: Uuid) -> String {
        format!("{INSTANCE_SANDBOX_PREFIX}{}", id.simple())
    }

    /// The legacy sandbox id of `user_id`: base64url of its UTF-8 bytes, no padding.
    ///
    /// Errors: the result would be longer than [`MAX_SANDBOX_ID_LEN`] (a user id of more
    /// than 47 bytes).
    pub fn for_user(user_id: &str) -> Result<String, String> {
        let id = URL_SAFE_NO_PAD.encode(user_id.as_bytes());
        if id.len() > MAX_SANDBOX_ID_LEN || id.is_empty() {
            return Err(format!(
                "user id of {} bytes gives a sandbox id of {} chars (1..={MAX_SANDBOX_ID_LEN})",
                user_id.len(),
                id.len()
            ));
        }
        Ok(id)
    }

    /// Parses a sandbox id: `ki_` followed by exactly 32 lowercase hex digits is an instance;
    /// anything else that decodes as base64url to UTF-8 is a legacy user's. (A legacy id of
    /// a UUID user is 48 chars, so the two shapes never meet.)
    ///
    /// Errors: neither shape.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(hex) = s.strip_prefix(INSTANCE_SANDBOX_PREFIX)
            && hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Uuid::parse_str(hex)
                .map(SandboxId::Instance)
                .map_err(|e| e.to_string());
        }
        if s.is_empty() || s.len() > MAX_SANDBOX_ID_LEN {
            return Err(format!("sandbox id `{s}` has a bad length"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| format!("sandbox id `{s}` is neither ki_<hex> nor base64url"))?;
        String::from_utf8(bytes)
            .map(SandboxId::Legacy)
            .map_err(|_| format!("sandbox id `{s}` does not decode to a user id"))
    }
}

/// The app of an owner: `<prefix>-` + the first 20 hex digits of SHA-256(owner key), where
/// the prefix is `acct` in production and `dev` in development (reference §2). One app (a
/// private network, one env key) per owner.
pub fn app_name(prefix: &str, owner_key: &str) -> String {
    let digest = hex::encode(Sha256::digest(owner_key.as_bytes()));
    format!("{prefix}-{}", &digest[..20])
}

/// The volume name of a sandbox: `kiloclaw_<sandbox id>` lower-cased, every char outside
/// `[a-z0-9_]` replaced by `_`, cut to 30 chars (Fly's limit).
pub fn volume_name(sandbox_id: &str) -> String {
    format!("kiloclaw_{sandbox_id}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_VOLUME_NAME_LEN)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_and_legacy_ids_are_told_apart_by_shape() {
        let id = Uuid::new_v4();
        let sandbox = SandboxId::for_instance(id);
        assert_eq!(sandbox.len(), 35);
        assert_eq!(SandboxId::parse(&sandbox), Ok(SandboxId::Instance(id)));
        let user = Uuid::new_v4().to_string();
        let legacy = SandboxId::for_user(&user).unwrap();
        assert_eq!(legacy.len(), 48);
        assert_eq!(SandboxId::parse(&legacy), Ok(SandboxId::Legacy(user)));
        assert!(SandboxId::for_user(&"u".repeat(48)).is_err());
        assert!(SandboxId::parse("ki_XYZ").is_err());
        assert!(SandboxId::parse("").is_err());
    }

    #[test]
    fn names_follow_the_reference_rules() {
        let app = app_name("acct", "user:42");
        assert!(app.starts_with("acct-") && app.len() == 25, "{app}");
        assert_eq!(app, app_name("acct", "user:42"));
        assert_ne!(app, app_name("acct", "user:43"));
        let v = volume_name("ki_0123456789abcdef0123456789abcdef");
        assert_eq!(v, "kiloclaw_ki_0123456789abcdef01");
        assert_eq!(volume_name("AbC-d="), "kiloclaw_abc_d_");
    }
}
