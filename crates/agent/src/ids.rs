//! Session and execution ids, the sandbox id derivation, the filesystem layout inside a
//! sandbox, and branch names (reference system §3 "Ids and filesystem layout").

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Whether sessions of one owner share a sandbox (`agent.sandbox.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxPolicy {
    /// One sandbox per (organization or user, user, bot), shared by its sessions (the
    /// reference's policy): they share its memory and process limits.
    #[default]
    Shared,
    /// One sandbox per session.
    PerSession,
}

/// A new session id, `agent_<uuid>`.
pub fn new_session_id() -> String {
    format!("agent_{}", Uuid::new_v4())
}

/// A new execution id, `exec_<uuid>`.
pub fn new_execution_id() -> String {
    format!("exec_{}", Uuid::new_v4())
}

/// Whether `id` has the shape of a session id (`agent_` and a hyphenated UUID).
pub fn is_session_id(id: &str) -> bool {
    id.strip_prefix("agent_")
        .is_some_and(|u| u.len() == 36 && Uuid::parse_str(u).is_ok())
}

/// The session actor's key, `<userId>:<sessionId>`: ownership is part of the address.
pub fn actor_key(user: Uuid, session_id: &str) -> String {
    format!("{user}:{session_id}")
}

/// The sandbox id (at most 63 characters): `<prefix>-<first 48 hex of sha256(original)>`,
/// where original is `<orgId or "user:"+userId>__<userId>[__bot:<botId>]` and prefix is `org`,
/// `usr`, `bot` (a bot in an organization) or `ubt` (a user's bot); under
/// [`SandboxPolicy::PerSession`] the session id is appended to the original and the prefix is
/// `ses`. Reference §3.
pub fn sandbox_id(
    org: Option<Uuid>,
    user: Uuid,
    bot: Option<Uuid>,
    policy: SandboxPolicy,
    session_id: &str,
) -> String {
    let mut original = match org {
        Some(org) => format!("{org}__{user}"),
        None => format!("user:{user}__{user}"),
    };
    if let Some(bot) = bot {
        original.push_str(&format!("__bot:{bot}"));
    }
    let prefix = match (policy, org.is_some(), bot.is_some()) {
        (SandboxPolicy::PerSession, _, _) => {
            original.push_str(&format!("__{session_id}"));
            "ses"
        }
        (_, true, true) => "bot",
        (_, true, false) => "org",
        (_, false, true) => "ubt",
        (_, false, false) => "usr",
    };
    let digest = Sha256::digest(original.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{}", &hex[..48])
}

/// The session's workspace inside the sandbox: `/workspace/<orgId>/<userId>/sessions/<sid>`,
/// or `/workspace/<userId>/sessions/<sid>` for a personal session.
pub fn workspace_path(org: Option<Uuid>, user: Uuid, session_id: &str) -> String {
    match org {
        Some(org) => format!("/workspace/{org}/{user}/sessions/{session_id}"),
        None => format!("/workspace/{user}/sessions/{session_id}"),
    }
}

/// The session's home inside the sandbox: `/home/<sid>`.
pub fn home_path(session_id: &str) -> String {
    format!("/home/{session_id}")
}

/// The default working branch of a session, `session/<sid>`.
pub fn session_branch(session_id: &str) -> String {
    format!("session/{session_id}")
}

/// Whether `name` is an acceptable branch: 1–255 characters of `[a-zA-Z0-9._-/]`, and none of
/// git's forbidden forms (`..`, a leading `-` or `/`, a trailing `/` or `.lock`).
pub fn valid_branch(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
        && !name.contains("..")
        && !name.contains("//")
        && !name.starts_with(['-', '/', '.'])
        && !name.ends_with(['/', '.'])
        && !name.ends_with(".lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_follow_the_reference_derivation() {
        let user = Uuid::parse_str("11111111-1111-4111-8111-111111111111").unwrap();
        let org = Uuid::parse_str("22222222-2222-4222-8222-222222222222").unwrap();
        let shared = SandboxPolicy::Shared;
        let personal = sandbox_id(None, user, None, shared, "agent_a");
        assert!(personal.starts_with("usr-") && personal.len() == 52);
        let expected = Sha256::digest(format!("user:{user}__{user}").as_bytes());
        let hex: String = expected.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(personal, format!("usr-{}", &hex[..48]));
        // Shared: the session does not matter; per-session: it does.
        assert_eq!(personal, sandbox_id(None, user, None, shared, "agent_b"));
        let per = SandboxPolicy::PerSession;
        assert_ne!(
            sandbox_id(None, user, None, per, "agent_a"),
            sandbox_id(None, user, None, per, "agent_b")
        );
        assert!(sandbox_id(Some(org), user, None, shared, "s").starts_with("org-"));
        assert!(sandbox_id(Some(org), user, Some(user), shared, "s").starts_with("bot-"));
        assert!(sandbox_id(None, user, Some(org), shared, "s").starts_with("ubt-"));
    }

    #[test]
    fn layout_and_ids() {
        let user = Uuid::new_v4();
        let id = new_session_id();
        assert!(is_session_id(&id));
        assert!(!is_session_id("agent_x"));
        assert!(!is_session_id(&format!("ses_{}", Uuid::new_v4())));
        assert_eq!(
            workspace_path(None, user, &id),
            format!("/workspace/{user}/sessions/{id}")
        );
        assert_eq!(home_path("agent_1"), "/home/agent_1");
    }

    #[test]
    fn branch_names() {
        for ok in ["main", "session/agent_1", "feature/x-1.2", "a"] {
            assert!(valid_branch(ok), "{ok}");
        }
        for bad in [
            "",
            "a..b",
            "-x",
            "/x",
            "x/",
            "x.lock",
            "a b",
            "a~1",
            "a:b",
            ".hidden",
            &"a".repeat(256),
        ] {
            assert!(!valid_branch(bad), "{bad}");
        }
    }
}
