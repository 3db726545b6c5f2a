//! Envelope encryption of secrets at rest (reference §0.3, with a symmetric master key).
//!
//! Each secret gets its own random AES-256-GCM data key (DEK). The value is encrypted with the
//! DEK under a caller-given context (owner and name) as associated data, so a ciphertext moved
//! to another owner or name fails to decrypt. The DEK is encrypted ("wrapped") with the master
//! key from `KILOCLOUD_MASTER_KEY`; the envelope records the master key's id, so after a
//! rotation old envelopes still open with a previous key until
//! [`MasterKeys::rewrap`] moves their DEK to the current one. Plaintext DEKs never leave this
//! module.

use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const NONCE_LEN: usize = 12;
const ENVELOPE_VERSION: u8 = 1;

/// Errors of key parsing and envelope operations. None of them carries key or plaintext bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The master key text is not 32 bytes in hex or base64.
    #[error("a master key is 32 bytes, written as 64 hex digits or in base64")]
    BadMasterKey,
    /// The envelope was wrapped with a master key this node does not have.
    #[error("secret was encrypted with master key `{0}`, which is not configured")]
    UnknownKey(String),
    /// Authentication failed: wrong key, wrong context, or corrupted data.
    #[error("secret cannot be decrypted (corrupted, or stored under another owner or name)")]
    Corrupt,
}

/// One master key and its id: the first 16 hex digits of SHA-256 of the key bytes, so the id
/// follows the key without a name to configure and reveals nothing usable.
#[derive(Clone)]
pub struct MasterKey {
    id: String,
    cipher: Aes256Gcm,
}

impl MasterKey {
    /// Parses 32 bytes written as 64 hex digits or base64 (standard or URL-safe, padded or not).
    ///
    /// Errors: [`CryptoError::BadMasterKey`].
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| CryptoError::BadMasterKey)?
        } else {
            let unpadded = text.trim_end_matches('=');
            URL_SAFE_NO_PAD
                .decode(unpadded)
                .or_else(|_| STANDARD.decode(text))
                .map_err(|_| CryptoError::BadMasterKey)?
        };
        let key: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::BadMasterKey)?;
        Ok(Self::from_bytes(&key))
    }

    /// A new random key and its text form (base64).
    pub fn generate() -> (Self, String) {
        let key = Aes256Gcm::generate_key(OsRng);
        let text = STANDARD.encode(key.as_slice());
        (Self::from_bytes(key.as_ref()), text)
    }

    fn from_bytes(key: &[u8; 32]) -> Self {
        let digest = Sha256::digest(key);
        let id = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            id,
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key)),
        }
    }

    /// The key id recorded in envelopes.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

/// 32 random bytes from the OS in base64: a new master key or JWT secret
/// (`kilocloud admin generate-key`, and the embedded default when none is configured).
pub fn generate_secret_text() -> String {
    MasterKey::generate().1
}

/// An encrypted value as stored: `{v, kid, dek, data}`, where `dek` and `data` are
/// base64(nonce(12) ‖ ciphertext ‖ tag(16)). Holds no plaintext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version, 1.
    pub v: u8,
    /// Id of the master key that wraps `dek`.
    pub kid: String,
    /// The data key, encrypted with the master key.
    pub dek: String,
    /// The value, encrypted with the data key.
    pub data: String,
}

/// The current master key and the previous ones still accepted for decryption.
#[derive(Debug, Clone)]
pub struct MasterKeys {
    current: MasterKey,
    previous: Vec<MasterKey>,
}

impl MasterKeys {
    /// `current` encrypts; `current` and `previous` decrypt.
    pub fn new(current: MasterKey, previous: Vec<MasterKey>) -> Self {
        Self { current, previous }
    }

    /// Id of the key new envelopes are wrapped with.
    pub fn current_id(&self) -> &str {
        self.current.id()
    }

    /// Encrypts `plaintext` under a fresh data key; `context` (e.g. `org:<id>/secret/NAME`)
    /// must be given again to open it.
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Envelope {
        let dek = Aes256Gcm::generate_key(OsRng);
        let data = encrypt(&Aes256Gcm::new(&dek), plaintext, context.as_bytes());
        let dek = encrypt(
            &self.current.cipher,
            dek.as_slice(),
            &dek_aad(&self.current),
        );
        Envelope {
            v: ENVELOPE_VERSION,
            kid: self.current.id.clone(),
            dek,
            data,
        }
    }

    /// Decrypts an envelope sealed with the same `context`.
    ///
    /// Errors: [`CryptoError::UnknownKey`] when its master key is not configured;
    /// [`CryptoError::Corrupt`] on any authentication failure.
    pub fn open(&self, envelope: &Envelope, context: &str) -> Result<Vec<u8>, CryptoError> {
        let dek = self.unwrap_dek(envelope)?;
        let cipher = Aes256Gcm::new_from_slice(&dek).map_err(|_| CryptoError::Corrupt)?;
        decrypt(&cipher, &envelope.data, context.as_bytes())
    }

    /// Re-wraps the envelope's data key with the current master key; `None` when it already
    /// is. The encrypted value itself is unchanged.
    ///
    /// Errors: as [`MasterKeys::open`], for the data key.
    pub fn rewrap(&self, envelope: &Envelope) -> Result<Option<Envelope>, CryptoError> {
        if envelope.kid == self.current.id {
            return Ok(None);
        }
        let dek = self.unwrap_dek(envelope)?;
        Ok(Some(Envelope {
            v: ENVELOPE_VERSION,
            kid: self.current.id.clone(),
            dek: encrypt(&self.current.cipher, &dek, &dek_aad(&self.current)),
            data: envelope.data.clone(),
        }))
    }

    fn find(&self, kid: &str) -> Result<&MasterKey, CryptoError> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == kid)
            .ok_or_else(|| CryptoError::UnknownKey(kid.to_owned()))
    }

    /// The data key's bytes. Errors: as [`MasterKeys::open`].
    fn unwrap_dek(&self, envelope: &Envelope) -> Result<Vec<u8>, CryptoError> {
        if envelope.v != ENVELOPE_VERSION {
            return Err(CryptoError::Corrupt);
        }
        let key = self.find(&envelope.kid)?;
        decrypt(&key.cipher, &envelope.dek, &dek_aad(key))
    }
}

/// Associated data of a wrapped data key: binds it to the master key's id.
fn dek_aad(key: &MasterKey) -> Vec<u8> {
    format!("kilocloud-dek:v{ENVELOPE_VERSION}:{}", key.id).into_bytes()
}

fn encrypt(cipher: &Aes256Gcm, plaintext: &[u8], aad: &[u8]) -> String {
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let ct = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encryption cannot fail for in-memory buffers");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    STANDARD.encode(out)
}

fn decrypt(cipher: &Aes256Gcm, encoded: &str, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let raw = STANDARD.decode(encoded).map_err(|_| CryptoError::Corrupt)?;
    if raw.len() < NONCE_LEN + 16 {
        return Err(CryptoError::Corrupt);
    }
    let (nonce, ct) = raw.split_at(NONCE_LEN);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| CryptoError::Corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (MasterKey, MasterKey) {
        (MasterKey::generate().0, MasterKey::generate().0)
    }

    #[test]
    fn round_trip_binds_the_context() {
        let (k, _) = keys();
        let ring = MasterKeys::new(k, vec![]);
        let env = ring.seal(b"sk-live-123", "user:a/secret/X");
        assert!(!env.data.contains("sk-live"));
        assert_eq!(ring.open(&env, "user:a/secret/X").unwrap(), b"sk-live-123");
        assert_eq!(
            ring.open(&env, "user:b/secret/X"),
            Err(CryptoError::Corrupt)
        );
        let mut tampered = env.clone();
        tampered.data.replace_range(20..24, "AAAA");
        assert_eq!(
            ring.open(&tampered, "user:a/secret/X"),
            Err(CryptoError::Corrupt)
        );
    }

    #[test]
    fn rotation_rewraps_and_old_envelopes_still_open() {
        let (old, new) = keys();
        let before = MasterKeys::new(old.clone(), vec![]);
        let env = before.seal(b"v", "c");
        let after = MasterKeys::new(new.clone(), vec![old]);
        assert_eq!(after.open(&env, "c").unwrap(), b"v");
        let rewrapped = after.rewrap(&env).unwrap().expect("needs rewrap");
        assert_eq!(rewrapped.kid, new.id());
        assert_eq!(rewrapped.data, env.data);
        assert_eq!(after.rewrap(&rewrapped).unwrap(), None);
        let only_new = MasterKeys::new(new, vec![]);
        assert_eq!(only_new.open(&rewrapped, "c").unwrap(), b"v");
        assert!(matches!(
            only_new.open(&env, "c"),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    #[test]
    fn master_keys_parse_from_hex_and_base64_with_stable_ids() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let a = MasterKey::parse(hex).unwrap();
        let bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let b = MasterKey::parse(&STANDARD.encode(&bytes)).unwrap();
        let c = MasterKey::parse(&URL_SAFE_NO_PAD.encode(&bytes)).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.id(), c.id());
        assert_eq!(a.id().len(), 16);
        for bad in ["", "short", &hex[..62], &STANDARD.encode([0u8; 31])] {
            assert_eq!(
                MasterKey::parse(bad).unwrap_err(),
                CryptoError::BadMasterKey
            );
        }
        assert!(!format!("{a:?}").contains("0011"));
    }
}
