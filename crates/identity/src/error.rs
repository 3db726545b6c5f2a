//! The identity service's error: each variant maps to one HTTP status in the server.

use crate::credential::AuthError;
use crate::envelope::CryptoError;

/// Errors of [`crate::Identity`] operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not authenticated (401).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Authenticated but not allowed (403). `code` is stable, e.g. `insufficient_role`.
    #[error("{message}")]
    Forbidden {
        /// Machine-readable reason.
        code: &'static str,
        /// Human-readable reason.
        message: String,
    },
    /// No such resource for this owner (404); also what another owner's resource answers.
    #[error("{what} not found")]
    NotFound {
        /// What was looked up, e.g. `organization`.
        what: &'static str,
    },
    /// The change conflicts with current state (409), e.g. an email already in use.
    #[error("{message}")]
    Conflict {
        /// Machine-readable reason.
        code: &'static str,
        /// Human-readable reason.
        message: String,
    },
    /// Bad input (400).
    #[error("{0}")]
    Invalid(String),
    /// A stored secret cannot be decrypted with the configured master keys (500).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// Storage or substrate failure.
    #[error(transparent)]
    Substrate(#[from] kilocloud_substrate::Error),
}

impl Error {
    pub(crate) fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Error::Forbidden {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Error::Conflict {
            code,
            message: message.into(),
        }
    }
}

/// Result of identity operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
