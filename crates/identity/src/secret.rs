//! [`Secret`]: a secret text value (a configured key, token or password) as a type, so that no
//! `Debug` of a configuration, request or credential holder can print it. The value lives in a
//! [`secrecy::SecretString`] (zeroized on drop) and is read only through [`Secret::expose`].
//!
//! Serialization writes the value (configuration layering needs it), except inside
//! [`redacting`], where every non-empty secret serializes as [`REDACTED`]: `config show`
//! serializes the whole configuration that way, so a secret nested anywhere is redacted
//! without being listed.

use std::cell::Cell;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a secret is shown as.
pub const REDACTED: &str = "***";

thread_local! {
    static REDACTING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (a serialization) with every [`Secret`] serializing as [`REDACTED`] (empty ones
/// as empty, so an unset secret still reads as unset) on this thread.
pub fn redacting<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            REDACTING.with(|r| r.set(self.0));
        }
    }
    let _reset = Reset(REDACTING.with(|r| r.replace(true)));
    f()
}

/// A secret text value; `Debug` prints `***` (or `""` when empty).
#[derive(Clone, Default)]
pub struct Secret(SecretString);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The value. Call it only where the value is used (a header, a key derivation).
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Whether the value is empty (the secret is not set).
    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_empty() { "\"\"" } else { REDACTED })
    }
}

/// Compares in constant time for equal lengths (configuration equality, not authentication).
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        let (a, b) = (self.expose().as_bytes(), other.expose().as_bytes());
        a.len() == b.len() && bool::from(a.ct_eq(b))
    }
}

impl Eq for Secret {}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !self.is_empty() && REDACTING.with(Cell::get) {
            serializer.serialize_str(REDACTED)
        } else {
            serializer.serialize_str(self.expose())
        }
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_and_redact_on_request() {
        #[derive(Debug, Serialize, Deserialize, PartialEq)]
        struct Holder {
            key: Secret,
            unset: Secret,
            nested: Vec<Secret>,
        }
        let holder: Holder =
            serde_json::from_str(r#"{"key": "k-123", "unset": "", "nested": ["n-456"]}"#).unwrap();
        let debug = format!("{holder:?}");
        assert!(
            !debug.contains("k-123") && !debug.contains("n-456"),
            "{debug}"
        );
        assert_eq!(holder.key.expose(), "k-123");
        let plain = serde_json::to_string(&holder).unwrap();
        assert_eq!(plain, r#"{"key":"k-123","unset":"","nested":["n-456"]}"#);
        let redacted = redacting(|| serde_json::to_string(&holder).unwrap());
        assert_eq!(redacted, r#"{"key":"***","unset":"","nested":["***"]}"#);
        // Redaction ends with the closure.
        assert_eq!(serde_json::to_string(&holder).unwrap(), plain);
        assert_eq!(Secret::from("a"), Secret::new("a".to_owned()));
        assert_ne!(Secret::from("a"), Secret::from("b"));
    }
}
