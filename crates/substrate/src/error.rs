//! The substrate's error type.

use std::time::Duration;

/// Errors returned by substrate operations. Each variant maps to one HTTP status in the server's
/// error type (see `kilocloud-server`'s `ApiError`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The actor's backlog (queued calls for one key) is full. HTTP 503 with `Retry-After`.
    #[error("actor {actor_type}:{key} is overloaded ({backlog} calls queued); retry later")]
    Overloaded {
        /// Actor type name.
        actor_type: String,
        /// Actor key.
        key: String,
        /// Calls queued when the call was refused.
        backlog: usize,
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
    /// A message body is over the 128 KiB limit. HTTP 413.
    #[error("message is {size} bytes; the limit is {limit} bytes")]
    MessageTooLarge {
        /// Serialized JSON size in bytes.
        size: usize,
        /// Limit in bytes.
        limit: usize,
    },
    /// The requested delivery delay is over 24 h. HTTP 400.
    #[error("delay of {delay_ms} ms exceeds the maximum of {max_ms} ms")]
    DelayTooLong {
        /// Requested delay in ms.
        delay_ms: u64,
        /// Maximum delay in ms.
        max_ms: u64,
    },
    /// No queue, actor type or record with that name. HTTP 404.
    #[error("{what} not found: {name}")]
    NotFound {
        /// Kind of thing that was looked up ("queue", "actor type", ...).
        what: &'static str,
        /// The name or id that was looked up.
        name: String,
    },
    /// Invalid argument (a bad cron expression, time zone, key). HTTP 400.
    #[error("invalid {what}: {message}")]
    Invalid {
        /// What was invalid.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// The database schema is newer than this binary understands.
    #[error(
        "database schema version {found} is newer than this binary supports ({supported}); \
         upgrade kilocloud or point it at another database"
    )]
    SchemaTooNew {
        /// Version recorded in the database.
        found: i64,
        /// Newest version this binary knows.
        supported: i64,
    },
    /// The SQLite data directory is in use by another `kilocloud serve` process.
    #[error(
        "data directory {path} is locked by another kilocloud process (SQLite is single-node; use PostgreSQL for several nodes)"
    )]
    DataDirLocked {
        /// Lock file path.
        path: String,
    },
    /// The handler of an actor call or alarm failed; its writes were discarded.
    #[error("{0}")]
    Handler(String),
    /// A bug: a handler panicked, or stored data did not decode. HTTP 500; details are logged,
    /// not shown to clients.
    #[error("internal error: {0}")]
    Internal(String),
    /// The substrate is shutting down and refuses new work. HTTP 503.
    #[error("shutting down")]
    ShuttingDown,
    /// A storage (database or object store) failure. HTTP 500 or 503.
    #[error("storage error: {0}")]
    Storage(String),
    /// A value could not be serialized or deserialized as JSON.
    #[error("serialization error: {0}")]
    Serde(#[from] serde_json::Error),
}

impl Error {
    /// Builds [`Error::Handler`] from anything displayable; for actor and consumer handlers.
    pub fn handler(message: impl std::fmt::Display) -> Self {
        Error::Handler(message.to_string())
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Storage(format!("sqlite: {e}"))
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Storage(format!("postgres: {e}"))
    }
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { path, .. } => Error::NotFound {
                what: "blob",
                name: path,
            },
            other => Error::Storage(format!("object store: {other}")),
        }
    }
}

/// Result alias for substrate operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
