//! Session ingest (reference §10, CLI contract §2b and §5): the Kilo Code CLI pushes each
//! session's history (the session record, messages, parts, diffs, status) as items; we keep
//! them compacted per item in one `cli_session` actor per owner and session, and serve them
//! back as an export (`kilo export`'s shape), through a public share token (`kilo import`),
//! and in listings. The presence of `kilo remote` connections is [`presence`].
//!
//! Actors (all written only by [`Ingest`]; none calls another):
//! - `cli_session`, key `<owner>/<sessionId>` (owner `user:<uuid>` or `org:<uuid>`): `meta`
//!   ([`CliSession`]), `s/<type>` (singleton items), `m/<messageId>` (messages),
//!   `p/<messageId>/<partId>` (parts). A later version of an item replaces the earlier one.
//! - `cli_session_index`, key `<owner>`: `s/<sessionId>` → creation time (ms). A superset of
//!   the owner's sessions: the entry is written before the session and removed after it, and
//!   readers skip entries whose session has no `meta`.
//! - `cli_share`, key `<share token>`: `ptr` → owner and session id. Written before the
//!   session records the token and deleted after the session forgets it; a pointer whose
//!   session does not hold the same token reads as absent.
//!
//! Reads (export, listing, the public share) are lock-free reads of committed state
//! (`Substrate::actor_read`, `actor_scan`), so they never queue behind an ingest.

pub mod presence;
mod session;

use kilocloud_identity::Owner;
use kilocloud_substrate::{Actor, ActorContext, Substrate};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use presence::Presence;
use session::{Call, Reply, SESSION_ACTOR, SessionActor};
pub use session::{CliSession, MAX_ITEM_BYTES};

/// Largest ingest request body accepted, bytes (8 MiB); larger ones get 413. The CLI flushes
/// small batches (a few items each), so this bounds one request's memory, not a session.
pub const MAX_INGEST_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Most items in one ingest request; more is 400 `too_many_items`.
pub const MAX_ITEMS_PER_INGEST: usize = 2000;
/// Longest session id accepted (the CLI's are `ses_` + 26 characters).
pub const MAX_SESSION_ID_LEN: usize = 100;
/// Longest title kept, characters; longer titles are cut.
pub const MAX_TITLE_CHARS: usize = 500;
/// Most sessions one listing page returns.
pub const MAX_LIST_LIMIT: usize = 500;

const INDEX_ACTOR: &str = "cli_session_index";
const SHARE_ACTOR: &str = "cli_share";

/// What goes wrong in session ingest.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Bad input (400): a malformed body, an item without its id, a bad session id.
    #[error("{0}")]
    Invalid(String),
    /// More items in one request than [`MAX_ITEMS_PER_INGEST`] (400).
    #[error("{count} items in one request; at most {MAX_ITEMS_PER_INGEST} are accepted")]
    TooManyItems {
        /// Items sent.
        count: usize,
    },
    /// No such session for this owner (404), also what another owner's session answers; for
    /// a share token: unknown or unshared.
    #[error("{what} not found")]
    NotFound {
        /// `session` or `share`.
        what: &'static str,
    },
    /// Storage or substrate failure.
    #[error(transparent)]
    Substrate(#[from] kilocloud_substrate::Error),
}

/// `Result` of this crate.
pub type Result<T, E = IngestError> = std::result::Result<T, E>;

/// What an ingest request did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestOutcome {
    /// Always true (the CLI accepts any 2xx).
    pub success: bool,
    /// Items stored (after deduplication within the request).
    pub stored: usize,
    /// Keys of items dropped for being over [`MAX_ITEM_BYTES`] (the reference drops them
    /// too, so that one huge tool output does not refuse the batch around it).
    pub dropped: Vec<String>,
}

/// A `cli_session_index` or `cli_share` actor: a few rows, put and deleted one at a time.
struct RowsActor<const SHARE: bool>;

enum RowsCall {
    Put(String, Value),
    Delete(String),
}

impl<const SHARE: bool> Actor for RowsActor<SHARE> {
    const TYPE: &'static str = if SHARE { SHARE_ACTOR } else { INDEX_ACTOR };
    type Call = RowsCall;
    type Reply = ();

    async fn call(
        &self,
        ctx: &mut ActorContext,
        call: RowsCall,
    ) -> kilocloud_substrate::Result<()> {
        match call {
            RowsCall::Put(key, value) => ctx.put(&key, &value)?,
            RowsCall::Delete(key) => ctx.delete(&key),
        }
        Ok(())
    }
}

/// The pointer a share token holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SharePointer {
    owner: String,
    session_id: String,
}

/// Session ingest for every owner, and the presence of `kilo remote` connections on this node.
#[derive(Clone)]
pub struct Ingest {
    sub: Substrate,
    presence: std::sync::Arc<Presence>,
}

impl Ingest {
    /// The service on `sub`; registers its actor types.
    pub fn new(sub: &Substrate) -> Self {
        sub.actors().register(SessionActor);
        sub.actors().register(RowsActor::<false>);
        sub.actors().register(RowsActor::<true>);
        Self {
            sub: sub.clone(),
            presence: std::sync::Arc::new(Presence::new(sub.clock().clone())),
        }
    }

    /// The `kilo remote` connections of this node.
    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    /// Creates session `session_id` for `owner` (`POST /api/session`); creating it again is
    /// a no-op that returns it as it is.
    ///
    /// Errors: [`IngestError::Invalid`] for an id that is empty, longer than
    /// [`MAX_SESSION_ID_LEN`] or not of `[A-Za-z0-9_-]`.
    pub async fn create(&self, owner: Owner, session_id: &str) -> Result<CliSession> {
        check_id("sessionId", session_id)?;
        let now = self.sub.clock().now_ms();
        // The index entry first: a superset of the sessions.
        self.sub
            .actors()
            .call::<RowsActor<false>>(
                &owner.to_string(),
                RowsCall::Put(format!("s/{session_id}"), json!(now)),
            )
            .await?;
        match self
            .session_call(
                owner,
                session_id,
                Call::Create {
                    session_id: session_id.to_owned(),
                },
            )
            .await?
        {
            Reply::Session(s) => Ok(*s),
            _ => unreachable!("create replies with the session"),
        }
    }

    /// Stores the items of one ingest request (`POST /api/session/{id}/ingest?v=N`): `body`
    /// is `{"data":[{"type","data"},…]}`. Items are keyed `message:<id>`, `part:<id>` (under
    /// its message) or by type (every other type is a singleton); a later item with the same
    /// key replaces the earlier one, within the request and across requests.
    ///
    /// Errors: [`IngestError::Invalid`] for malformed JSON or an item without its id;
    /// [`IngestError::TooManyItems`]; [`IngestError::NotFound`] for a session this owner
    /// did not create.
    pub async fn ingest(
        &self,
        owner: Owner,
        session_id: &str,
        version: u32,
        body: &[u8],
    ) -> Result<IngestOutcome> {
        check_id("session id", session_id)?;
        let (items, dropped) = session::parse_items(body)?;
        let stored = items.len();
        match self
            .session_call(owner, session_id, Call::Ingest { version, items })
            .await?
        {
            Reply::Done => Ok(IngestOutcome {
                success: true,
                stored,
                dropped,
            }),
            _ => Err(IngestError::NotFound { what: "session" }),
        }
    }

    /// Shares the session: returns its share token (a random UUID, 122 bits), the same one
    /// while it stays shared.
    ///
    /// Errors: [`IngestError::NotFound`].
    pub async fn share(&self, owner: Owner, session_id: &str) -> Result<String> {
        check_id("session id", session_id)?;
        if let Some(token) = self.get(owner, session_id).await?.share_token {
            return Ok(token);
        }
        let token = uuid::Uuid::new_v4().to_string();
        let pointer = SharePointer {
            owner: owner.to_string(),
            session_id: session_id.to_owned(),
        };
        // The pointer first: it reads as absent until the session holds the same token.
        self.sub
            .actors()
            .call::<RowsActor<true>>(
                &token,
                RowsCall::Put("ptr".into(), serde_json::to_value(&pointer).expect("json")),
            )
            .await?;
        match self
            .session_call(owner, session_id, Call::Share(token.clone()))
            .await?
        {
            Reply::Shared(held) => {
                if held != token {
                    // Shared concurrently by another request: ours is not used.
                    self.forget_share(&token).await?;
                }
                Ok(held)
            }
            _ => {
                self.forget_share(&token).await?;
                Err(IngestError::NotFound { what: "session" })
            }
        }
    }

    /// Stops sharing the session (its token stops working); a no-op when not shared.
    ///
    /// Errors: [`IngestError::NotFound`].
    pub async fn unshare(&self, owner: Owner, session_id: &str) -> Result<()> {
        check_id("session id", session_id)?;
        match self.session_call(owner, session_id, Call::Unshare).await? {
            Reply::Unshared(old) => {
                if let Some(token) = old {
                    self.forget_share(&token).await?;
                }
                Ok(())
            }
            _ => Err(IngestError::NotFound { what: "session" }),
        }
    }

    /// Sets the session's title (cut to [`MAX_TITLE_CHARS`]); `generated` says the model
    /// wrote it rather than the user.
    ///
    /// Errors: [`IngestError::NotFound`].
    pub async fn set_title(
        &self,
        owner: Owner,
        session_id: &str,
        title: &str,
        generated: bool,
    ) -> Result<()> {
        check_id("session id", session_id)?;
        let title = title.chars().take(MAX_TITLE_CHARS).collect();
        match self
            .session_call(owner, session_id, Call::Title { title, generated })
            .await?
        {
            Reply::Done => Ok(()),
            _ => Err(IngestError::NotFound { what: "session" }),
        }
    }

    /// Deletes the session, its items and its share.
    ///
    /// Errors: [`IngestError::NotFound`].
    pub async fn delete(&self, owner: Owner, session_id: &str) -> Result<()> {
        check_id("session id", session_id)?;
        let old = match self.session_call(owner, session_id, Call::Delete).await? {
            Reply::Unshared(old) => old,
            _ => return Err(IngestError::NotFound { what: "session" }),
        };
        if let Some(token) = old {
            self.forget_share(&token).await?;
        }
        self.sub
            .actors()
            .call::<RowsActor<false>>(
                &owner.to_string(),
                RowsCall::Delete(format!("s/{session_id}")),
            )
            .await?;
        Ok(())
    }

    /// The session's summary.
    ///
    /// Errors: [`IngestError::NotFound`] (also for another owner's session).
    pub async fn get(&self, owner: Owner, session_id: &str) -> Result<CliSession> {
        check_id("session id", session_id)?;
        self.sub
            .actor_read(
                SESSION_ACTOR,
                &session_key(owner, session_id),
                session::META,
            )
            .await?
            .ok_or(IngestError::NotFound { what: "session" })
    }

    /// A page of the owner's sessions: at most `limit` (1 to [`MAX_LIST_LIMIT`]) of those
    /// whose id sorts after `after` (the cursor; `""` starts at the beginning; pages follow
    /// id order), the page sorted most recently updated first; and the next page's cursor
    /// when more may follow.
    pub async fn list(
        &self,
        owner: Owner,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<CliSession>, Option<String>)> {
        let limit = limit.clamp(1, MAX_LIST_LIMIT);
        let after = if after.is_empty() {
            String::new()
        } else {
            format!("s/{after}")
        };
        let entries: Vec<(String, Value)> = self
            .sub
            .actor_scan(INDEX_ACTOR, &owner.to_string(), "s/", &after, limit as u32)
            .await?;
        let next = (entries.len() == limit)
            .then(|| entries.last().map(|(k, _)| k["s/".len()..].to_owned()))
            .flatten();
        let mut sessions = Vec::with_capacity(entries.len());
        for (key, _) in entries {
            let id = &key["s/".len()..];
            if let Some(s) = self
                .sub
                .actor_read::<CliSession>(SESSION_ACTOR, &session_key(owner, id), session::META)
                .await?
            {
                sessions.push(s);
            }
        }
        sessions.sort_by_key(|s| std::cmp::Reverse(s.updated_at));
        Ok((sessions, next))
    }

    /// The session as `kilo export` prints it: `{info, messages:[{info, parts:[…]}]}`;
    /// `info` is the last `session` item (or, before one arrived, `{id, title, time}`),
    /// messages in id order (the CLI's ids grow with time), each with its parts in id order.
    ///
    /// Errors: [`IngestError::NotFound`].
    pub async fn export(&self, owner: Owner, session_id: &str) -> Result<Value> {
        let meta = self.get(owner, session_id).await?;
        self.snapshot(&session_key(owner, session_id), &meta).await
    }

    /// The export of the session shared under `token` (no credentials: the token is the
    /// capability).
    ///
    /// Errors: [`IngestError::NotFound`] `share` for an unknown or unshared token.
    pub async fn shared_export(&self, token: &str) -> Result<Value> {
        let not_found = IngestError::NotFound { what: "share" };
        if uuid::Uuid::parse_str(token).is_err() {
            return Err(not_found);
        }
        let Some(ptr) = self
            .sub
            .actor_read::<SharePointer>(SHARE_ACTOR, token, "ptr")
            .await?
        else {
            return Err(not_found);
        };
        let key = format!("{}/{}", ptr.owner, ptr.session_id);
        let meta: Option<CliSession> = self
            .sub
            .actor_read(SESSION_ACTOR, &key, session::META)
            .await?;
        match meta {
            Some(meta) if meta.share_token.as_deref() == Some(token) => {
                self.snapshot(&key, &meta).await
            }
            _ => Err(not_found),
        }
    }

    async fn snapshot(&self, key: &str, meta: &CliSession) -> Result<Value> {
        let info = self
            .sub
            .actor_read::<Value>(SESSION_ACTOR, key, "s/session")
            .await?
            .unwrap_or_else(|| {
                json!({
                    "id": meta.session_id,
                    "title": meta.title.clone().unwrap_or_default(),
                    "time": {"created": meta.created_at, "updated": meta.updated_at},
                })
            });
        let messages: Vec<(String, Value)> = self
            .sub
            .actor_scan(SESSION_ACTOR, key, "m/", "", u32::MAX)
            .await?;
        let parts: Vec<(String, Value)> = self
            .sub
            .actor_scan(SESSION_ACTOR, key, "p/", "", u32::MAX)
            .await?;
        let mut by_message: std::collections::HashMap<&str, Vec<Value>> = Default::default();
        for (k, part) in &parts {
            if let Some((message, _)) = k["p/".len()..].split_once('/') {
                by_message.entry(message).or_default().push(part.clone());
            }
        }
        let messages: Vec<Value> = messages
            .into_iter()
            .map(|(k, info)| {
                let parts = by_message.remove(&k["m/".len()..]).unwrap_or_default();
                json!({"info": info, "parts": parts})
            })
            .collect();
        Ok(json!({"info": info, "messages": messages}))
    }

    async fn forget_share(&self, token: &str) -> Result<()> {
        self.sub
            .actors()
            .call::<RowsActor<true>>(token, RowsCall::Delete("ptr".into()))
            .await?;
        Ok(())
    }

    async fn session_call(&self, owner: Owner, session_id: &str, call: Call) -> Result<Reply> {
        Ok(self
            .sub
            .actors()
            .call::<SessionActor>(&session_key(owner, session_id), call)
            .await?)
    }
}

/// The `cli_session` key: ownership is part of it.
fn session_key(owner: Owner, session_id: &str) -> String {
    format!("{owner}/{session_id}")
}

/// An id of a session, message or part: 1 to [`MAX_SESSION_ID_LEN`] characters of
/// `[A-Za-z0-9_-]` (so it can be part of a storage key).
pub(crate) fn check_id(what: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SESSION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(IngestError::Invalid(format!(
            "{what} must be 1 to {MAX_SESSION_ID_LEN} characters of letters, digits, `_` and `-`"
        )))
    }
}
