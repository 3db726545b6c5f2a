//! The presence of `kilo remote` connections (CLI contract §5): which CLI instances of an
//! owner are connected to this node, what their last heartbeat said (instance, sessions) and
//! the last `event` each reported per session.
//!
//! Kept in memory on the node the WebSocket is connected to (a connection is live state of
//! one socket; nothing of it needs to survive the socket): a listing shows this node's
//! connections only. A reconnect with the same `connectionId` replaces the earlier entry.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use kilocloud_identity::Owner;
use kilocloud_substrate::Clock;
use serde::Serialize;
use serde_json::Value;

/// Most connections one owner may hold on one node; more is refused.
pub const MAX_CONNECTIONS_PER_OWNER: usize = 64;
/// Most sessions whose last event one connection keeps (the oldest is forgotten first).
pub const MAX_EVENT_SESSIONS: usize = 256;
/// Largest event `data` kept, bytes of JSON; a larger one is kept without its data.
pub const MAX_EVENT_DATA_BYTES: usize = 64 * 1024;
/// Most sessions a heartbeat's list keeps.
pub const MAX_HEARTBEAT_SESSIONS: usize = 1000;

/// One connected CLI instance.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    /// The CLI's `connectionId` (a UUID it picks per process).
    pub connection_id: String,
    /// Connected, ms since the epoch.
    pub connected_at: i64,
    /// Last heartbeat, ms since the epoch; `None` before the first.
    pub last_heartbeat_at: Option<i64>,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// The CLI's version (`protocolVersion` of the heartbeat, e.g. `7.7.7`).
    pub protocol_version: Option<String>,
    /// `capabilities` of the last heartbeat (`{attachments, sessionClone}`).
    #[schema(value_type = Object)]
    pub capabilities: Value,
    /// `instance` of the last heartbeat: `{name, projectName, version, kind, startedAt,
    /// gitBranch}`.
    #[schema(value_type = Object)]
    pub instance: Value,
    /// `sessions` of the last heartbeat: `[{id, status, title, parentSessionId?, gitUrl?,
    /// gitBranch?, platform?, prLink?}]`.
    #[schema(value_type = Vec<Object>)]
    pub sessions: Vec<Value>,
    /// The last `event` per session, most recent first.
    pub last_events: Vec<SessionEvent>,
}

/// The last event a connection reported for one session.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionEvent {
    /// The session.
    pub session_id: String,
    /// The event's name (e.g. `message.part.updated`).
    pub event: String,
    /// Received, ms since the epoch.
    pub at: i64,
    /// Its data; `None` when over [`MAX_EVENT_DATA_BYTES`].
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

/// Why a connection is refused.
#[derive(Debug, thiserror::Error)]
#[error("this owner already has {MAX_CONNECTIONS_PER_OWNER} connections on this node")]
pub struct TooManyConnections;

struct Entry {
    generation: u64,
    connection: Connection,
    events: HashMap<String, SessionEvent>,
}

#[derive(Default)]
struct State {
    next_generation: u64,
    owners: HashMap<Owner, BTreeMap<String, Entry>>,
}

/// The connections of this node, per owner.
pub struct Presence {
    clock: Arc<dyn Clock>,
    state: Arc<Mutex<State>>,
}

/// Held by a connected socket; dropping it removes the connection (unless a reconnect with
/// the same id replaced it meanwhile).
pub struct Registration {
    state: Arc<Mutex<State>>,
    owner: Owner,
    connection_id: String,
    generation: u64,
    clock: Arc<dyn Clock>,
}

impl Presence {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            state: Arc::default(),
        }
    }

    /// Registers connection `connection_id` of `owner`, replacing one with the same id.
    ///
    /// Errors: [`TooManyConnections`] beyond [`MAX_CONNECTIONS_PER_OWNER`].
    pub fn connect(
        &self,
        owner: Owner,
        connection_id: &str,
    ) -> Result<Registration, TooManyConnections> {
        let mut state = self.state.lock().unwrap();
        state.next_generation += 1;
        let generation = state.next_generation;
        let conns = state.owners.entry(owner).or_default();
        if conns.len() >= MAX_CONNECTIONS_PER_OWNER && !conns.contains_key(connection_id) {
            return Err(TooManyConnections);
        }
        conns.insert(
            connection_id.to_owned(),
            Entry {
                generation,
                connection: Connection {
                    connection_id: connection_id.to_owned(),
                    connected_at: self.clock.now_ms(),
                    last_heartbeat_at: None,
                    heartbeats: 0,
                    protocol_version: None,
                    capabilities: Value::Null,
                    instance: Value::Null,
                    sessions: Vec::new(),
                    last_events: Vec::new(),
                },
                events: HashMap::new(),
            },
        );
        Ok(Registration {
            state: self.state.clone(),
            owner,
            connection_id: connection_id.to_owned(),
            generation,
            clock: self.clock.clone(),
        })
    }

    /// The owner's connections on this node, by connection id.
    pub fn list(&self, owner: Owner) -> Vec<Connection> {
        let state = self.state.lock().unwrap();
        state
            .owners
            .get(&owner)
            .into_iter()
            .flat_map(|conns| conns.values())
            .map(|e| {
                let mut c = e.connection.clone();
                c.last_events = e.events.values().cloned().collect();
                c.last_events
                    .sort_by(|a, b| b.at.cmp(&a.at).then(a.session_id.cmp(&b.session_id)));
                c
            })
            .collect()
    }
}

impl Registration {
    fn with_entry(&self, f: impl FnOnce(&mut Entry, i64)) {
        let now = self.clock.now_ms();
        let mut state = self.state.lock().unwrap();
        if let Some(entry) = state
            .owners
            .get_mut(&self.owner)
            .and_then(|c| c.get_mut(&self.connection_id))
            .filter(|e| e.generation == self.generation)
        {
            f(entry, now);
        }
    }

    /// Records a `heartbeat` message: `{protocolVersion, capabilities, sessions, instance}`.
    pub fn heartbeat(&self, message: &Value) {
        self.with_entry(|e, now| {
            let c = &mut e.connection;
            c.last_heartbeat_at = Some(now);
            c.heartbeats += 1;
            c.protocol_version = message["protocolVersion"].as_str().map(str::to_owned);
            c.capabilities = message["capabilities"].clone();
            c.instance = message["instance"].clone();
            c.sessions = message["sessions"]
                .as_array()
                .map(|s| s.iter().take(MAX_HEARTBEAT_SESSIONS).cloned().collect())
                .unwrap_or_default();
        });
    }

    /// Records an `event` message: `{sessionId, event, data}` (the last one per session is
    /// kept). Returns false when it lacks `sessionId` or `event`.
    pub fn event(&self, message: &Value) -> bool {
        let (Some(session_id), Some(event)) =
            (message["sessionId"].as_str(), message["event"].as_str())
        else {
            return false;
        };
        let data = &message["data"];
        let fits = serde_json::to_vec(data).is_ok_and(|v| v.len() <= MAX_EVENT_DATA_BYTES);
        self.with_entry(|e, now| {
            if e.events.len() >= MAX_EVENT_SESSIONS && !e.events.contains_key(session_id) {
                let oldest = e
                    .events
                    .values()
                    .min_by_key(|ev| ev.at)
                    .map(|ev| ev.session_id.clone());
                if let Some(oldest) = oldest {
                    e.events.remove(&oldest);
                }
            }
            e.events.insert(
                session_id.to_owned(),
                SessionEvent {
                    session_id: session_id.to_owned(),
                    event: event.to_owned(),
                    at: now,
                    data: fits.then(|| data.clone()),
                },
            );
        });
        true
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap();
        if let Some(conns) = state.owners.get_mut(&self.owner) {
            if conns
                .get(&self.connection_id)
                .is_some_and(|e| e.generation == self.generation)
            {
                conns.remove(&self.connection_id);
            }
            if conns.is_empty() {
                state.owners.remove(&self.owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kilocloud_substrate::ManualClock;
    use serde_json::json;

    #[test]
    fn heartbeats_events_and_reconnects() {
        let clock = Arc::new(ManualClock::new(1_000));
        let p = Presence::new(clock.clone());
        let owner = Owner::User(uuid::Uuid::new_v4());
        let other = Owner::User(uuid::Uuid::new_v4());
        let first = p.connect(owner, "c1").unwrap();
        first.heartbeat(&json!({"type": "heartbeat", "protocolVersion": "7.7.7",
            "sessions": [{"id": "ses_a", "status": "idle"}], "instance": {"name": "h"}}));
        clock.advance(5);
        assert!(first.event(&json!({"sessionId": "ses_a", "event": "e1", "data": {"n": 1}})));
        assert!(first.event(&json!({"sessionId": "ses_a", "event": "e2", "data": {"n": 2}})));
        assert!(!first.event(&json!({"event": "no session"})));
        let list = p.list(owner);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].heartbeats, 1);
        assert_eq!(list[0].sessions[0]["id"], "ses_a");
        assert_eq!(list[0].last_events.len(), 1);
        assert_eq!(list[0].last_events[0].event, "e2");
        assert!(p.list(other).is_empty());
        // A reconnect replaces the entry; the old socket's end leaves it alone.
        let second = p.connect(owner, "c1").unwrap();
        drop(first);
        assert_eq!(p.list(owner).len(), 1);
        assert_eq!(p.list(owner)[0].heartbeats, 0);
        drop(second);
        assert!(p.list(owner).is_empty());
    }
}
