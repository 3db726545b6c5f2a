//! Versioned schema migrations, one list per backend with the same version numbers.
//!
//! A database records every applied version in `kilocloud_schema`. Opening applies the missing
//! ones in order inside one transaction each; a database whose highest version is above
//! [`LATEST`] is refused with [`crate::Error::SchemaTooNew`] so an old binary never writes to a
//! schema it does not understand.

/// One migration: version, name and the SQL for each backend.
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// Newest schema version this binary knows.
pub(crate) const LATEST: i64 = 3;

pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "substrate",
        sqlite: r#"
CREATE TABLE actor_storage (
    actor_type TEXT NOT NULL,
    actor_key TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (actor_type, actor_key, key)
) WITHOUT ROWID;
CREATE TABLE alarms (
    actor_type TEXT NOT NULL,
    actor_key TEXT NOT NULL,
    fire_at INTEGER NOT NULL,
    retry_count INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL,
    claimed_by TEXT,
    PRIMARY KEY (actor_type, actor_key)
) WITHOUT ROWID;
CREATE INDEX alarms_due ON alarms (fire_at) WHERE claimed_by IS NULL;
CREATE TABLE queue_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    enqueued_at INTEGER NOT NULL,
    visible_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    claimed_by TEXT
);
CREATE INDEX queue_messages_ready ON queue_messages (queue, visible_at, id);
CREATE INDEX queue_messages_claimed ON queue_messages (claimed_by) WHERE claimed_by IS NOT NULL;
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    enqueued_at INTEGER NOT NULL,
    failed_at INTEGER NOT NULL
);
CREATE INDEX dead_letters_queue ON dead_letters (queue, id);
CREATE TABLE kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires_at INTEGER
) WITHOUT ROWID;
CREATE INDEX kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    started_at INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
) WITHOUT ROWID;
"#,
        postgres: r#"
CREATE TABLE actor_storage (
    actor_type TEXT NOT NULL,
    actor_key TEXT NOT NULL,
    key TEXT NOT NULL,
    value BYTEA NOT NULL,
    PRIMARY KEY (actor_type, actor_key, key)
);
CREATE TABLE alarms (
    actor_type TEXT NOT NULL,
    actor_key TEXT NOT NULL,
    fire_at BIGINT NOT NULL,
    retry_count INTEGER NOT NULL DEFAULT 0,
    generation BIGINT NOT NULL,
    claimed_by TEXT,
    PRIMARY KEY (actor_type, actor_key)
);
CREATE INDEX alarms_due ON alarms (fire_at) WHERE claimed_by IS NULL;
CREATE INDEX alarms_claimed ON alarms (claimed_by) WHERE claimed_by IS NOT NULL;
CREATE TABLE queue_messages (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue TEXT NOT NULL,
    body BYTEA NOT NULL,
    enqueued_at BIGINT NOT NULL,
    visible_at BIGINT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    claimed_by TEXT
);
CREATE INDEX queue_messages_ready ON queue_messages (queue, visible_at, id);
CREATE INDEX queue_messages_claimed ON queue_messages (claimed_by) WHERE claimed_by IS NOT NULL;
CREATE TABLE dead_letters (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue TEXT NOT NULL,
    message_id BIGINT NOT NULL,
    body BYTEA NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    enqueued_at BIGINT NOT NULL,
    failed_at BIGINT NOT NULL
);
CREATE INDEX dead_letters_queue ON dead_letters (queue, id);
CREATE TABLE kv (
    key TEXT PRIMARY KEY,
    value BYTEA NOT NULL,
    expires_at BIGINT
);
CREATE INDEX kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
"#,
    },
    Migration {
        version: 2,
        name: "alarm leases, queue failures",
        // `claimed_until`: an alarm's claim is a lease its node renews while the handler runs;
        // claims from before this version are reclaimable at once. `failures`: deliveries that
        // failed or timed out (dead-lettering counts these, not deliveries).
        sqlite: r#"
ALTER TABLE alarms ADD COLUMN claimed_until INTEGER;
UPDATE alarms SET claimed_until = 0 WHERE claimed_by IS NOT NULL;
CREATE INDEX alarms_leased ON alarms (claimed_until) WHERE claimed_by IS NOT NULL;
ALTER TABLE queue_messages ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
"#,
        postgres: r#"
ALTER TABLE alarms ADD COLUMN claimed_until BIGINT;
UPDATE alarms SET claimed_until = 0 WHERE claimed_by IS NOT NULL;
CREATE INDEX alarms_leased ON alarms (claimed_until) WHERE claimed_by IS NOT NULL;
ALTER TABLE queue_messages ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
"#,
    },
    Migration {
        version: 3,
        name: "actor suspensions",
        // A call that waits on the outside world without its session leaves a lease here
        // (`ActorContext::suspend_while`); other nodes do not run the key while it holds. One
        // node (SQLite) never needs it; the table is there so both schemas stay alike.
        sqlite: r#"
CREATE TABLE actor_suspensions (
    actor_type TEXT NOT NULL,
    actor_key TEXT NOT NULL,
    node_id TEXT NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (actor_type, actor_key)
) WITHOUT ROWID;
"#,
        postgres: r#"
CREATE TABLE actor_suspensions (
    actor_type TEXT NOT NULL,
    actor_key TEXT NOT NULL,
    node_id TEXT NOT NULL,
    until_ms BIGINT NOT NULL,
    PRIMARY KEY (actor_type, actor_key)
);
"#,
    },
];

/// Checks a database's version against this binary's.
pub(crate) fn check_not_newer(found: i64) -> crate::Result<()> {
    if found > LATEST {
        return Err(crate::Error::SchemaTooNew {
            found,
            supported: LATEST,
        });
    }
    Ok(())
}
