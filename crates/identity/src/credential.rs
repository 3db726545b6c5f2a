//! Credential formats and their parsers: user JWTs (reference §0.1, "v3"), API keys and
//! tickets. Parsing here is pure (no storage); [`crate::Identity`] adds the stored checks
//! (pepper, revocation, single use). Every parser returns an [`AuthError`] for any input; none
//! panics (property-tested).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::owner::parse_uuid;

/// The JWT `version` claim this server issues and accepts.
pub const TOKEN_VERSION: u32 = 3;
/// API key prefix.
pub const API_KEY_PREFIX: &str = "kc_";
/// Ticket prefix.
pub const TICKET_PREFIX: &str = "kt_";
/// Length of an API key: the prefix and 32 bytes in unpadded base64url.
pub const API_KEY_LEN: usize = 3 + 43;
const TICKET_RANDOM_BYTES: usize = 32;

/// Why a request is not authenticated. Each variant has a stable `code` for clients; the
/// message never contains the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials were sent.
    #[error("missing credentials: send `Authorization: Bearer <token or API key>`")]
    Missing,
    /// Not a JWT, API key or ticket of ours, or claims of the wrong shape.
    #[error("malformed credential: {0}")]
    Malformed(&'static str),
    /// The JWT's signature does not verify with the server secret.
    #[error("token signature is invalid")]
    BadSignature,
    /// The JWT's `exp` has passed.
    #[error("token has expired")]
    Expired,
    /// The JWT's `version` claim is not 3.
    #[error("token version {0} is not supported (expected 3)")]
    WrongVersion(i64),
    /// The user rotated their pepper after the token was issued, or no longer exists.
    #[error("token has been revoked")]
    Revoked,
    /// No such API key.
    #[error("API key is not valid")]
    ApiKeyUnknown,
    /// The API key was revoked.
    #[error("API key has been revoked")]
    ApiKeyRevoked,
    /// The API key's expiry has passed.
    #[error("API key has expired")]
    ApiKeyExpired,
    /// Unknown ticket, already used, or for another resource.
    #[error("ticket is not valid (unknown, already used, or for another resource)")]
    TicketInvalid,
    /// The ticket is older than 60 s.
    #[error("ticket has expired")]
    TicketExpired,
    /// Wrong or missing internal service secret.
    #[error("internal API key is missing or wrong")]
    InternalKey,
}

impl AuthError {
    /// Stable machine-readable code, e.g. `token_expired`.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "unauthenticated",
            AuthError::Malformed(_) => "credential_malformed",
            AuthError::BadSignature => "token_invalid_signature",
            AuthError::Expired => "token_expired",
            AuthError::WrongVersion(_) => "token_version_unsupported",
            AuthError::Revoked => "token_revoked",
            AuthError::ApiKeyUnknown => "api_key_invalid",
            AuthError::ApiKeyRevoked => "api_key_revoked",
            AuthError::ApiKeyExpired => "api_key_expired",
            AuthError::TicketInvalid => "ticket_invalid",
            AuthError::TicketExpired => "ticket_expired",
            AuthError::InternalKey => "internal_key_invalid",
        }
    }
}

/// Claims of a user API token (reference §0.1). Times are seconds since the epoch (RFC 7519).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenClaims {
    /// The user the token acts as.
    pub kilo_user_id: String,
    /// The user's pepper when the token was issued; must equal the stored one.
    pub api_token_pepper: Option<String>,
    /// Always 3.
    pub version: i64,
    /// Expiry, s since epoch.
    pub exp: i64,
    /// Issue time, s since epoch.
    #[serde(default)]
    pub iat: i64,
    /// Pins the token to one organization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_id: Option<String>,
    /// The bot the token acts as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_id: Option<String>,
}

/// A verified token: signature, version and expiry checked; pepper not yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// `kiloUserId`.
    pub user_id: Uuid,
    /// `apiTokenPepper`.
    pub pepper: Option<String>,
    /// `organizationId`.
    pub org_id: Option<Uuid>,
    /// `botId`.
    pub bot_id: Option<Uuid>,
    /// `exp`, s since epoch.
    pub exp: i64,
}

/// Signs and verifies user tokens with the server secret (HS256).
pub struct TokenSigner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(***)")
    }
}

impl TokenSigner {
    /// A signer for `secret` (the server's `jwt_secret`, at least 32 bytes recommended).
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked against the injected clock in `verify`, not the system clock.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Signs `claims` (HS256).
    pub fn sign(&self, claims: &TokenClaims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing of serializable claims cannot fail")
    }

    /// Verifies the signature first (so nothing about a forged token is revealed), then the
    /// claims' shape, `version == 3` and `exp > now_s`.
    ///
    /// Errors: [`AuthError::Malformed`], [`AuthError::BadSignature`],
    /// [`AuthError::WrongVersion`], [`AuthError::Expired`].
    pub fn verify(&self, token: &str, now_s: i64) -> Result<VerifiedToken, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed("not a JWT"))?;
        if header.alg != Algorithm::HS256 {
            return Err(AuthError::Malformed("token algorithm must be HS256"));
        }
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, &self.decoding, &self.validation)
                .map_err(|e| match e.kind() {
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    _ => AuthError::Malformed("not a JWT"),
                })?;
        let claims: TokenClaims = serde_json::from_value(data.claims)
            .map_err(|_| AuthError::Malformed("token claims are missing or of the wrong type"))?;
        if claims.version != i64::from(TOKEN_VERSION) {
            return Err(AuthError::WrongVersion(claims.version));
        }
        if claims.exp <= now_s {
            return Err(AuthError::Expired);
        }
        let uuid = |s: &str| parse_uuid(s).ok_or(AuthError::Malformed("token ids must be UUIDs"));
        Ok(VerifiedToken {
            user_id: uuid(&claims.kilo_user_id)?,
            pepper: claims.api_token_pepper,
            org_id: claims.organization_id.as_deref().map(uuid).transpose()?,
            bot_id: claims.bot_id.as_deref().map(uuid).transpose()?,
            exp: claims.exp,
        })
    }
}

/// SHA-256 of a credential string, lowercase hex: how API keys and tickets are stored.
pub fn credential_hash(credential: &str) -> String {
    Sha256::digest(credential.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new API key: `kc_` + 32 random bytes in unpadded base64url.
pub fn generate_api_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{API_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Checks an API key's shape and returns its storage hash.
///
/// Errors: [`AuthError::Malformed`] unless `kc_` followed by 43 base64url characters that
/// decode to 32 bytes.
pub fn parse_api_key(key: &str) -> Result<String, AuthError> {
    let body = key
        .strip_prefix(API_KEY_PREFIX)
        .filter(|_| key.len() == API_KEY_LEN)
        .ok_or(AuthError::Malformed(
            "an API key is `kc_` and 43 characters",
        ))?;
    match URL_SAFE_NO_PAD.decode(body) {
        Ok(b) if b.len() == 32 => Ok(credential_hash(key)),
        _ => Err(AuthError::Malformed(
            "an API key is `kc_` and 43 characters",
        )),
    }
}

/// A new ticket for `user`: `kt_` + base64url(user id (16 bytes) ‖ 32 random bytes). The user
/// id inside tells the server which owner's actor holds it; the random part makes it
/// unguessable.
pub fn generate_ticket(user: Uuid) -> String {
    let mut bytes = [0u8; 16 + TICKET_RANDOM_BYTES];
    bytes[..16].copy_from_slice(user.as_bytes());
    rand::rng().fill_bytes(&mut bytes[16..]);
    format!("{TICKET_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The user a ticket was issued to and its storage hash.
///
/// Errors: [`AuthError::Malformed`] for anything not produced by [`generate_ticket`].
pub fn parse_ticket(ticket: &str) -> Result<(Uuid, String), AuthError> {
    const BAD: AuthError = AuthError::Malformed("a ticket is `kt_` and 64 characters");
    let body = ticket.strip_prefix(TICKET_PREFIX).ok_or(BAD)?;
    if body.len() != 64 {
        return Err(BAD);
    }
    let bytes = URL_SAFE_NO_PAD.decode(body).map_err(|_| BAD)?;
    if bytes.len() != 16 + TICKET_RANDOM_BYTES {
        return Err(BAD);
    }
    let user = Uuid::from_slice(&bytes[..16]).map_err(|_| BAD)?;
    Ok((user, credential_hash(ticket)))
}

/// Constant-time equality of two secrets (different lengths compare unequal, in time that
/// depends only on the lengths).
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    Sha256::digest(a).ct_eq(&Sha256::digest(b)).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(user: Uuid, exp: i64) -> TokenClaims {
        TokenClaims {
            kilo_user_id: user.to_string(),
            api_token_pepper: Some("p".into()),
            version: 3,
            exp,
            iat: 0,
            organization_id: None,
            bot_id: None,
        }
    }

    #[test]
    fn tokens_verify_and_fail_with_precise_reasons() {
        let signer = TokenSigner::new(b"0123456789abcdef0123456789abcdef");
        let user = Uuid::new_v4();
        let t = signer.sign(&claims(user, 1000));
        let v = signer.verify(&t, 999).unwrap();
        assert_eq!((v.user_id, v.pepper.as_deref()), (user, Some("p")));
        assert_eq!(signer.verify(&t, 1000), Err(AuthError::Expired));
        let other = TokenSigner::new(b"another secret, also 32 bytes ok");
        assert_eq!(other.verify(&t, 0), Err(AuthError::BadSignature));
        // Change one character inside the signature (the last one carries padding bits).
        let mut tampered = t.clone().into_bytes();
        let i = tampered.len() - 10;
        tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(signer.verify(&tampered, 0), Err(AuthError::BadSignature));
        let v2 = signer.sign(&TokenClaims {
            version: 2,
            ..claims(user, 1000)
        });
        assert_eq!(signer.verify(&v2, 0), Err(AuthError::WrongVersion(2)));
        let bad_id = signer.sign(&TokenClaims {
            kilo_user_id: "42".into(),
            ..claims(user, 1000)
        });
        assert!(matches!(
            signer.verify(&bad_id, 0),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            signer.verify("abc", 0),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn api_keys_and_tickets_have_fixed_shapes() {
        let key = generate_api_key();
        assert_eq!(key.len(), API_KEY_LEN);
        assert_eq!(parse_api_key(&key).unwrap(), credential_hash(&key));
        assert!(parse_api_key(&key[..API_KEY_LEN - 1]).is_err());
        assert!(parse_api_key(&key.replace("kc_", "kx_")).is_err());
        let user = Uuid::new_v4();
        let ticket = generate_ticket(user);
        assert_eq!(
            parse_ticket(&ticket).unwrap(),
            (user, credential_hash(&ticket))
        );
        assert!(parse_ticket(&ticket[1..]).is_err());
        assert!(secrets_equal(b"abc", b"abc") && !secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"abcd"));
    }
}
