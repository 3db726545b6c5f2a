//! Masking of a session's secret values: what a command prints, what the agent says and what
//! is sent back to the model passes through a [`SecretMask`] before it is recorded (events,
//! history items) or added to the model's context, so a secret the agent echoes shows as
//! [`MASK`] everywhere but in the workspace itself.

use std::borrow::Cow;

use serde_json::Value;

/// What a secret value is replaced with.
pub const MASK: &str = "********";

/// Values shorter than this many bytes are not masked: masking every `a` or `1` would make
/// output unreadable and tell which characters a short secret has anyway.
pub const MIN_MASKED_BYTES: usize = 4;

/// The secret values of one session (its secrets and git token), longest first so that a
/// secret containing another is masked whole.
#[derive(Debug, Clone, Default)]
pub struct SecretMask {
    values: Vec<String>,
}

impl SecretMask {
    /// A mask of `values`; empty ones and those under [`MIN_MASKED_BYTES`] are left out.
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut values: Vec<String> = values
            .into_iter()
            .filter(|v| v.len() >= MIN_MASKED_BYTES)
            .collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Self { values }
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `text` with every occurrence of a secret value replaced by [`MASK`].
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for value in &self.values {
            if out.contains(value.as_str()) {
                out = Cow::Owned(out.replace(value.as_str(), MASK));
            }
        }
        out
    }

    /// Masks every string in `value` (object keys included), in place.
    pub fn value(&self, value: &mut Value) {
        if self.is_empty() {
            return;
        }
        match value {
            Value::String(s) => {
                if let Cow::Owned(masked) = self.text(s) {
                    *s = masked;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.value(v)),
            Value::Object(map) => {
                let entries = std::mem::take(map);
                for (key, mut v) in entries {
                    self.value(&mut v);
                    map.insert(self.text(&key).into_owned(), v);
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn secrets_are_masked_in_text_and_json() {
        let mask = SecretMask::new(["s3cr3t".into(), "s3cr3t-longer".into(), "ab".into()]);
        for (given, want) in [
            ("no secret here", "no secret here"),
            ("token=s3cr3t;", "token=********;"),
            ("s3cr3t-longer and s3cr3t", "******** and ********"),
            ("ab is too short to mask", "ab is too short to mask"),
        ] {
            assert_eq!(mask.text(given), want, "{given}");
        }
        let mut value = json!({"output": "echo s3cr3t", "list": ["s3cr3t", 1, null],
            "s3cr3t": {"deep": "x s3cr3t-longer y"}});
        mask.value(&mut value);
        assert_eq!(
            value,
            json!({"output": "echo ********", "list": ["********", 1, null],
                "********": {"deep": "x ******** y"}})
        );
        assert!(SecretMask::new([String::new()]).is_empty());
    }
}
