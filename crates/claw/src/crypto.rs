//! Secrets of a runtime (reference kilo-cloud.md §2): the gateway token (derived, never
//! stored), the `enc:v1:` env encryption with a per-app key, the launcher's fail-closed
//! decryption, and access codes.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::Rng as _;
use sha2::Sha256;

/// Prefix of an encrypted env value.
pub const ENC_PREFIX: &str = "enc:v1:";
/// Prefix of the env name carrying an encrypted value: `KILOCLAW_ENC_<NAME>`.
pub const ENC_ENV_PREFIX: &str = "KILOCLAW_ENC_";
/// Reserved env prefix (user variables may not use it).
pub const ENV_ENV_PREFIX: &str = "KILOCLAW_ENV_";
/// The app secret holding the env key (base64 of 32 bytes).
pub const ENV_KEY_SECRET: &str = "KILOCLAW_ENV_KEY";
/// Characters of an access code: 32, without the ambiguous `I`, `O`, `0`, `1`.
pub const ACCESS_CODE_ALPHABET: &[u8; 32] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
/// Length of an access code, without the dash.
pub const ACCESS_CODE_LEN: usize = 10;

/// The gateway token of a sandbox: hex of HMAC-SHA256(key = `secret`, message = sandbox id).
/// Deterministic, so it is derived wherever needed and never stored.
pub fn gateway_token(secret: &[u8], sandbox_id: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(sandbox_id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// A fresh env key: 32 random bytes, base64.
pub fn generate_env_key() -> String {
    let key: [u8; 32] = rand::rng().random();
    STANDARD.encode(key)
}

fn cipher(key_b64: &str) -> Result<Aes256Gcm, String> {
    let key = STANDARD
        .decode(key_b64.trim())
        .map_err(|_| "the env key is not base64".to_owned())?;
    Aes256Gcm::new_from_slice(&key).map_err(|_| "the env key is not 32 bytes".to_owned())
}

/// Encrypts one value: `enc:v1:` + base64(12-byte IV ‖ ciphertext ‖ 16-byte tag), AES-256-GCM.
///
/// Errors: a key that is not base64 of 32 bytes.
pub fn encrypt_value(key_b64: &str, plaintext: &str) -> Result<String, String> {
    let cipher = cipher(key_b64)?;
    let iv: [u8; 12] = rand::rng().random();
    let sealed = cipher
        .encrypt(Nonce::from_slice(&iv), plaintext.as_bytes())
        .map_err(|_| "encryption failed".to_owned())?;
    let mut out = iv.to_vec();
    out.extend_from_slice(&sealed);
    Ok(format!("{ENC_PREFIX}{}", STANDARD.encode(out)))
}

/// Decrypts a value of [`encrypt_value`].
///
/// Errors: no `enc:v1:` prefix, bad base64, too short, or a failed tag check.
pub fn decrypt_value(key_b64: &str, value: &str) -> Result<String, String> {
    let body = value
        .strip_prefix(ENC_PREFIX)
        .ok_or_else(|| format!("value lacks the {ENC_PREFIX} prefix"))?;
    let raw = STANDARD
        .decode(body)
        .map_err(|_| "encrypted value is not base64".to_owned())?;
    if raw.len() < 12 + 16 {
        return Err("encrypted value is too short".into());
    }
    let plain = cipher(key_b64)?
        .decrypt(Nonce::from_slice(&raw[..12]), &raw[12..])
        .map_err(|_| "encrypted value does not open with this key".to_owned())?;
    String::from_utf8(plain).map_err(|_| "decrypted value is not UTF-8".into())
}

/// A shell identifier `[A-Za-z_][A-Za-z0-9_]*`: the names env variables may have.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks a user-chosen env name: a shell identifier not starting with the reserved
/// `KILOCLAW_ENC_` / `KILOCLAW_ENV_`.
///
/// Errors: why it is refused.
pub fn check_user_env_name(name: &str) -> Result<(), String> {
    if !is_env_name(name) {
        return Err(format!(
            "`{name}` is not a shell identifier ([A-Za-z_][A-Za-z0-9_]*)"
        ));
    }
    if name.starts_with(ENC_ENV_PREFIX) || name.starts_with(ENV_ENV_PREFIX) {
        return Err(format!(
            "`{name}` uses a reserved prefix ({ENC_ENV_PREFIX}, {ENV_ENV_PREFIX})"
        ));
    }
    Ok(())
}

/// The machine env: `plain` as is, and every `sensitive` value encrypted with the app's env
/// key under `KILOCLAW_ENC_<NAME>` (reference §2 "Environment built for the machine").
///
/// Errors: a bad key.
pub fn seal_env(
    key_b64: &str,
    plain: BTreeMap<String, String>,
    sensitive: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    let mut env = plain;
    for (name, value) in sensitive {
        env.remove(name);
        env.insert(
            format!("{ENC_ENV_PREFIX}{name}"),
            encrypt_value(key_b64, value)?,
        );
    }
    Ok(env)
}

/// The launcher's side (reference §2 "Machine boot"): decrypts every `KILOCLAW_ENC_<NAME>`
/// into `<NAME>`, then removes the encrypted variables and the key. Fails closed: encrypted
/// variables without [`ENV_KEY_SECRET`] are an error, never silently dropped.
///
/// Errors: encrypted values but no key; a stripped name that is not a shell identifier; a
/// value without the prefix or that does not open.
pub fn open_env(mut vars: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, String> {
    let encrypted: Vec<String> = vars
        .keys()
        .filter(|k| k.starts_with(ENC_ENV_PREFIX))
        .cloned()
        .collect();
    let key = vars.remove(ENV_KEY_SECRET);
    if encrypted.is_empty() {
        return Ok(vars);
    }
    let key = key.ok_or_else(|| {
        format!(
            "{} encrypted variables but no {ENV_KEY_SECRET}: refusing to start",
            encrypted.len()
        )
    })?;
    for name in encrypted {
        let value = vars.remove(&name).unwrap_or_default();
        let plain_name = &name[ENC_ENV_PREFIX.len()..];
        if !is_env_name(plain_name) {
            return Err(format!(
                "`{name}`: `{plain_name}` is not a shell identifier"
            ));
        }
        let plain = decrypt_value(&key, &value).map_err(|e| format!("`{name}`: {e}"))?;
        vars.insert(plain_name.to_owned(), plain);
    }
    Ok(vars)
}

/// A fresh access code: 10 chars from [`ACCESS_CODE_ALPHABET`] (50 bits).
pub fn generate_access_code() -> String {
    let mut rng = rand::rng();
    (0..ACCESS_CODE_LEN)
        .map(|_| ACCESS_CODE_ALPHABET[rng.random_range(0..32)] as char)
        .collect()
}

/// The display form `XXXXX-XXXXX`.
pub fn display_access_code(code: &str) -> String {
    let (a, b) = code.split_at(code.len().min(5));
    format!("{a}-{b}")
}

/// Normalizes typed input: trimmed, upper-cased, dashes and spaces removed.
pub fn normalize_access_code(input: &str) -> String {
    input
        .trim()
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_token_is_hex_hmac_of_the_sandbox_id() {
        let t = gateway_token(b"secret", "ki_00");
        assert_eq!(t.len(), 64);
        assert_eq!(t, gateway_token(b"secret", "ki_00"));
        assert_ne!(t, gateway_token(b"secret", "ki_01"));
        assert_ne!(t, gateway_token(b"other", "ki_00"));
    }

    #[test]
    fn env_round_trips_and_fails_closed_without_the_key() {
        let key = generate_env_key();
        let plain = BTreeMap::from([("A".to_owned(), "1".to_owned())]);
        let sensitive = BTreeMap::from([("KILOCODE_API_KEY".to_owned(), "sk".to_owned())]);
        let env = seal_env(&key, plain, &sensitive).unwrap();
        let sealed = &env["KILOCLAW_ENC_KILOCODE_API_KEY"];
        assert!(sealed.starts_with(ENC_PREFIX) && !sealed.contains("sk\""));
        assert!(!env.contains_key("KILOCODE_API_KEY"));
        let err = open_env(env.clone()).unwrap_err();
        assert!(err.contains("no KILOCLAW_ENV_KEY"), "{err}");
        let mut with_key = env.clone();
        with_key.insert(ENV_KEY_SECRET.into(), key.clone());
        let opened = open_env(with_key).unwrap();
        assert_eq!(opened["KILOCODE_API_KEY"], "sk");
        assert_eq!(opened["A"], "1");
        assert!(!opened.keys().any(|k| k.starts_with("KILOCLAW_")));
        let mut wrong = env;
        wrong.insert(ENV_KEY_SECRET.into(), generate_env_key());
        assert!(open_env(wrong).is_err());
    }

    #[test]
    fn env_names_are_checked() {
        assert!(check_user_env_name("MY_VAR1").is_ok());
        assert!(check_user_env_name("1X").is_err());
        assert!(check_user_env_name("A-B").is_err());
        assert!(check_user_env_name("KILOCLAW_ENC_X").is_err());
        assert!(check_user_env_name("KILOCLAW_ENV_KEY").is_err());
    }

    #[test]
    fn access_codes_use_the_unambiguous_alphabet() {
        let code = generate_access_code();
        assert_eq!(code.len(), 10);
        assert!(code.bytes().all(|b| ACCESS_CODE_ALPHABET.contains(&b)));
        assert!(!code.contains(['I', 'O', '0', '1']));
        let shown = display_access_code(&code);
        assert_eq!(shown.len(), 11);
        assert_eq!(
            normalize_access_code(&format!("  {}  ", shown.to_lowercase())),
            code
        );
    }
}
