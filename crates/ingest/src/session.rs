//! The `cli_session` actor: one CLI session of one owner, its summary ([`CliSession`]) and
//! its items compacted by key, and the parsing of ingest bodies into those items.

use std::collections::BTreeMap;

use kilocloud_substrate::{Actor, ActorContext, Result as SubResult};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{IngestError, MAX_ITEMS_PER_INGEST, MAX_TITLE_CHARS, Result};

pub(crate) const SESSION_ACTOR: &str = "cli_session";
pub(crate) const META: &str = "meta";
/// Largest item kept, bytes of its `data` as JSON (2 MiB; the reference drops items over
/// 2 MiB − 64 KiB, its row limit). Larger items are dropped and reported.
pub const MAX_ITEM_BYTES: usize = 2 * 1024 * 1024;

/// A CLI session's summary, kept beside its items and updated by each ingest.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CliSession {
    /// The CLI's session id (`ses_…`).
    pub session_id: String,
    /// Title: from the title route, else from the last `session` item.
    pub title: Option<String>,
    /// Whether the title was written by the model (`POST …/title` `generated`).
    pub title_generated: bool,
    /// Created (`POST /api/session`), ms since the epoch.
    pub created_at: i64,
    /// Last ingest or change, ms since the epoch.
    pub updated_at: i64,
    /// The `v` of the last ingest request.
    pub ingest_version: u32,
    /// Items stored by ingest requests, counting replacements.
    pub items_ingested: u64,
    /// From `kilo_meta`: `cli`, `vscode`, ….
    pub platform: Option<String>,
    /// From `kilo_meta`: the organization the CLI ran for.
    pub org_id: Option<String>,
    /// From `kilo_meta`: the repository (credentials stripped by the CLI).
    pub git_url: Option<String>,
    /// From `kilo_meta`: the branch.
    pub git_branch: Option<String>,
    /// From `session_status`: `idle`, `busy`, `retry`, `permission` or `question`.
    pub status: Option<String>,
    /// From `session_close`: why it ended (`completed`, …); cleared by `session_open`.
    pub close_reason: Option<String>,
    /// From the `session` item's `parentID`: the parent session of a child session.
    pub parent_id: Option<String>,
    /// The share token while shared (the owner's to hand out: `https://app.kilo.ai/s/<token>`).
    pub share_token: Option<String>,
}

/// An item ready to store: its storage key and data.
pub(crate) struct StoredItem {
    pub key: String,
    pub data: Value,
}

pub(crate) enum Call {
    Create {
        session_id: String,
    },
    Ingest {
        version: u32,
        items: Vec<StoredItem>,
    },
    Share(String),
    Unshare,
    Title {
        title: String,
        generated: bool,
    },
    Delete,
}

pub(crate) enum Reply {
    Session(Box<CliSession>),
    Done,
    Shared(String),
    /// Unshared or deleted, with the token it had.
    Unshared(Option<String>),
    /// No such session.
    Missing,
}

pub(crate) struct SessionActor;

impl Actor for SessionActor {
    const TYPE: &'static str = SESSION_ACTOR;
    type Call = Call;
    type Reply = Reply;

    async fn call(&self, ctx: &mut ActorContext, call: Call) -> SubResult<Reply> {
        let now = ctx.now_ms();
        let meta: Option<CliSession> = ctx.get(META).await?;
        if let Call::Create { session_id } = call {
            if let Some(meta) = meta {
                return Ok(Reply::Session(Box::new(meta)));
            }
            let meta = CliSession {
                session_id,
                title: None,
                title_generated: false,
                created_at: now,
                updated_at: now,
                ingest_version: 0,
                items_ingested: 0,
                platform: None,
                org_id: None,
                git_url: None,
                git_branch: None,
                status: None,
                close_reason: None,
                parent_id: None,
                share_token: None,
            };
            ctx.put(META, &meta)?;
            return Ok(Reply::Session(Box::new(meta)));
        }
        let Some(mut meta) = meta else {
            return Ok(Reply::Missing);
        };
        let reply = match call {
            Call::Create { .. } => unreachable!("answered above"),
            Call::Ingest { version, items } => {
                meta.ingest_version = version;
                meta.items_ingested += items.len() as u64;
                for item in &items {
                    apply(&mut meta, item);
                    ctx.put(&item.key, &item.data)?;
                }
                Reply::Done
            }
            Call::Share(token) => {
                let held = meta.share_token.get_or_insert(token).clone();
                Reply::Shared(held)
            }
            Call::Unshare => Reply::Unshared(meta.share_token.take()),
            Call::Title { title, generated } => {
                meta.title = Some(title);
                meta.title_generated = generated;
                Reply::Done
            }
            Call::Delete => {
                ctx.delete_all();
                return Ok(Reply::Unshared(meta.share_token));
            }
        };
        meta.updated_at = now;
        ctx.put(META, &meta)?;
        Ok(reply)
    }
}

/// What an item tells the summary.
fn apply(meta: &mut CliSession, item: &StoredItem) {
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let d = &item.data;
    match item.key.as_str() {
        "s/kilo_meta" => {
            meta.platform = text(&d["platform"]).or(meta.platform.take());
            meta.org_id = text(&d["orgId"]);
            meta.git_url = text(&d["gitUrl"]);
            meta.git_branch = text(&d["gitBranch"]);
        }
        "s/session" => {
            if let Some(title) = d["title"].as_str().filter(|t| !t.is_empty()) {
                meta.title = Some(title.chars().take(MAX_TITLE_CHARS).collect());
            }
            meta.parent_id = text(&d["parentID"]);
        }
        "s/session_status" => meta.status = text(&d["status"]),
        "s/session_open" => meta.close_reason = None,
        "s/session_close" => meta.close_reason = text(&d["reason"]),
        _ => {}
    }
}

impl StoredItem {
    fn key_for(kind: &str, data: &Value) -> Result<String> {
        let id = |field: &str| -> Result<&str> {
            let id = data[field].as_str().ok_or_else(|| {
                IngestError::Invalid(format!("a `{kind}` item needs `data.{field}`"))
            })?;
            crate::check_id(field, id)?;
            Ok(id)
        };
        Ok(match kind {
            "message" => format!("m/{}", id("id")?),
            "part" => format!("p/{}/{}", id("messageID")?, id("id")?),
            other => format!("s/{other}"),
        })
    }
}

#[derive(Deserialize)]
struct Body {
    data: Vec<RawItem>,
}

#[derive(Deserialize)]
struct RawItem {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

/// Parses an ingest body into the items to store, deduplicated by key (the last one wins),
/// and the labels (`<type>` or `<type>:<id>`) of items dropped for being over
/// [`MAX_ITEM_BYTES`].
pub(crate) fn parse_items(body: &[u8]) -> Result<(Vec<StoredItem>, Vec<String>)> {
    let body: Body = serde_json::from_slice(body).map_err(|e| {
        IngestError::Invalid(format!(
            "the body must be JSON `{{\"data\":[{{\"type\",\"data\"}},…]}}`: {e}"
        ))
    })?;
    if body.data.len() > MAX_ITEMS_PER_INGEST {
        return Err(IngestError::TooManyItems {
            count: body.data.len(),
        });
    }
    let mut items = BTreeMap::new();
    let mut dropped = Vec::new();
    for (i, raw) in body.data.into_iter().enumerate() {
        let kind_ok = !raw.kind.is_empty()
            && raw.kind.len() <= 64
            && raw
                .kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !kind_ok {
            return Err(IngestError::Invalid(format!(
                "item {i}: `type` must be 1 to 64 characters of `[a-z0-9_]`"
            )));
        }
        let key = StoredItem::key_for(&raw.kind, &raw.data)
            .map_err(|e| IngestError::Invalid(format!("item {i}: {e}")))?;
        let size = serde_json::to_vec(&raw.data).map_or(usize::MAX, |v| v.len());
        if size > MAX_ITEM_BYTES {
            let label = match raw.data["id"].as_str() {
                Some(id) if key.starts_with("m/") || key.starts_with("p/") => {
                    format!("{}:{id}", raw.kind)
                }
                _ => raw.kind.clone(),
            };
            tracing::warn!(item = %label, bytes = size, "ingest item over the size limit dropped");
            dropped.push(label);
            continue;
        }
        items.insert(key, raw.data);
    }
    Ok((
        items
            .into_iter()
            .map(|(key, data)| StoredItem { key, data })
            .collect(),
        dropped,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_keyed_and_deduplicated() {
        let body = serde_json::json!({"data": [
            {"type": "session", "data": {"id": "ses_1", "title": "a"}},
            {"type": "message", "data": {"id": "msg_1", "role": "user"}},
            {"type": "part", "data": {"id": "prt_1", "messageID": "msg_1", "text": "v1"}},
            {"type": "part", "data": {"id": "prt_1", "messageID": "msg_1", "text": "v2"}},
            {"type": "session", "data": {"id": "ses_1", "title": "b"}},
            {"type": "session_status", "data": {"status": "idle"}},
        ]});
        let (items, dropped) = parse_items(body.to_string().as_bytes()).unwrap();
        assert!(dropped.is_empty());
        let got: Vec<(&str, &Value)> = items.iter().map(|i| (i.key.as_str(), &i.data)).collect();
        assert_eq!(
            got.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            ["m/msg_1", "p/msg_1/prt_1", "s/session", "s/session_status"]
        );
        assert_eq!(got[1].1["text"], "v2");
        assert_eq!(got[2].1["title"], "b");
    }

    #[test]
    fn bad_bodies_are_refused() {
        for (body, needle) in [
            ("not json", "must be JSON"),
            (r#"{"data": {}}"#, "must be JSON"),
            (r#"{"data": [{"type": "message", "data": {}}]}"#, "data.id"),
            (
                r#"{"data": [{"type": "part", "data": {"id": "p"}}]}"#,
                "data.messageID",
            ),
            (
                r#"{"data": [{"type": "message", "data": {"id": "a/b"}}]}"#,
                "letters, digits",
            ),
            (r#"{"data": [{"type": "Bad Type", "data": {}}]}"#, "`type`"),
        ] {
            let err = parse_items(body.as_bytes()).err().expect(body).to_string();
            assert!(err.contains(needle), "{body}: {err}");
        }
    }

    #[test]
    fn oversized_items_are_dropped_and_named() {
        let big = "x".repeat(MAX_ITEM_BYTES);
        let body = serde_json::json!({"data": [
            {"type": "part", "data": {"id": "prt_big", "messageID": "msg_1", "text": big}},
            {"type": "session_status", "data": {"status": "busy"}},
        ]});
        let (items, dropped) = parse_items(body.to_string().as_bytes()).unwrap();
        assert_eq!(dropped, ["part:prt_big"]);
        assert_eq!(items.len(), 1);
    }
}
