//! The GitHub normalizer (reference `kici.md` §4): a webhook delivery (its `X-GitHub-Event`
//! and JSON payload) as the [`Event`] triggers are matched against, with the ref its lock file
//! is read at, the installation whose token reads it, and what trust decisions need. 14 event
//! types are handled; any other is ignored. Changed files are left unknown: they are fetched
//! lazily, only when some trigger has path patterns (§4).

use serde_json::Value;

use crate::trigger::Event;

/// A delivery, normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    /// The event to match.
    pub event: Event,
    /// Where the lock file is read: push `after`, the PR family's head sha, status `sha`,
    /// release `target_commitish`, else `HEAD`.
    pub lock_ref: String,
    /// `installation.id`: whose token reads the lock file and posts check runs.
    pub installation_id: Option<u64>,
    /// `sender.id`, kept for trust decisions.
    pub sender_id: Option<u64>,
    /// A pull request from a fork (head repository ≠ base repository).
    pub fork: bool,
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

/// `payload` of a GitHub `event` (the `X-GitHub-Event` header) normalised; `None` for the
/// event types KiCI does not handle.
pub fn normalize(event: &str, payload: &Value) -> Option<Normalized> {
    let action = payload["action"].as_str().unwrap_or("").to_owned();
    let pr = &payload["pull_request"];
    let head_sha = || text(&pr["head"]["sha"]);
    let mut fork = false;
    let (kind, target, source, lock_ref) = match event {
        "pull_request" | "pull_request_review" | "pull_request_review_comment" => {
            let kind = match event {
                "pull_request" => "pull_request",
                "pull_request_review" => "review",
                _ => "review_comment",
            };
            fork = pr["head"]["repo"]["full_name"] != pr["base"]["repo"]["full_name"];
            (
                kind,
                text(&pr["base"]["ref"]),
                text(&pr["head"]["ref"]),
                head_sha(),
            )
        }
        "push" => {
            let r = payload["ref"].as_str().unwrap_or("");
            let (kind, name) = match r.strip_prefix("refs/tags/") {
                Some(tag) => ("tag", tag),
                None => ("push", r.strip_prefix("refs/heads/").unwrap_or(r)),
            };
            (kind, Some(name.to_owned()), None, text(&payload["after"]))
        }
        "issue_comment" => {
            let default = text(&payload["repository"]["default_branch"]).unwrap_or("main".into());
            ("comment", Some(default), None, None)
        }
        "repository_dispatch" => ("dispatch", text(&payload["branch"]), None, None),
        "release" => {
            let commitish = text(&payload["release"]["target_commitish"]);
            ("release", commitish.clone(), None, commitish)
        }
        "create" | "delete" => (event, text(&payload["ref"]), None, None),
        "status" => (
            "status",
            text(&payload["branches"][0]["name"]),
            None,
            text(&payload["sha"]),
        ),
        "workflow_run" => (
            "workflow_run",
            text(&payload["workflow_run"]["head_branch"]),
            None,
            None,
        ),
        "fork" | "star" | "watch" => (event, None, None, None),
        _ => return None,
    };
    Some(Normalized {
        event: Event {
            kind: kind.to_owned(),
            action,
            payload: payload.clone(),
            target_branch: target,
            source_branch: source,
            changed_files: None,
            source_repo: text(&payload["repository"]["full_name"]),
        },
        lock_ref: lock_ref.unwrap_or_else(|| "HEAD".to_owned()),
        installation_id: payload["installation"]["id"].as_u64(),
        sender_id: payload["sender"]["id"].as_u64(),
        fork,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn repo() -> Value {
        json!({"full_name": "acme/app", "default_branch": "trunk"})
    }

    #[test]
    fn pull_requests_and_their_reviews() {
        let pr = |head_repo: &str| {
            json!({"action": "opened", "repository": repo(), "installation": {"id": 7}, "sender": {"id": 42},
                "pull_request": {"base": {"ref": "main", "repo": {"full_name": "acme/app"}},
                    "head": {"ref": "feature/x", "sha": "abc123", "repo": {"full_name": head_repo}}}})
        };
        let n = normalize("pull_request", &pr("acme/app")).unwrap();
        assert_eq!(
            (
                n.event.kind.as_str(),
                n.event.action.as_str(),
                n.event.target_branch.as_deref(),
                n.event.source_branch.as_deref()
            ),
            ("pull_request", "opened", Some("main"), Some("feature/x"))
        );
        assert_eq!(
            (n.lock_ref.as_str(), n.installation_id, n.sender_id, n.fork),
            ("abc123", Some(7), Some(42), false)
        );
        assert_eq!(n.event.source_repo.as_deref(), Some("acme/app"));
        assert!(normalize("pull_request", &pr("mallory/app")).unwrap().fork);
        for (event, kind) in [
            ("pull_request_review", "review"),
            ("pull_request_review_comment", "review_comment"),
        ] {
            let n = normalize(event, &pr("acme/app")).unwrap();
            assert_eq!(
                (n.event.kind.as_str(), n.lock_ref.as_str()),
                (kind, "abc123")
            );
        }
    }

    #[test]
    fn pushes_of_branches_and_tags() {
        let push = |r: &str| json!({"ref": r, "after": "def456", "repository": repo()});
        let n = normalize("push", &push("refs/heads/release/1.0")).unwrap();
        assert_eq!(
            (
                n.event.kind.as_str(),
                n.event.target_branch.as_deref(),
                n.lock_ref.as_str()
            ),
            ("push", Some("release/1.0"), "def456")
        );
        assert_eq!(n.event.changed_files, None, "fetched lazily");
        let n = normalize("push", &push("refs/tags/v2.0.0")).unwrap();
        assert_eq!(
            (n.event.kind.as_str(), n.event.target_branch.as_deref()),
            ("tag", Some("v2.0.0"))
        );
    }

    #[test]
    fn the_other_handled_events() {
        let n = normalize(
            "issue_comment",
            &json!({"action": "created", "repository": repo(), "comment": {"body": "/deploy"}}),
        )
        .unwrap();
        assert_eq!(
            (
                n.event.kind.as_str(),
                n.event.target_branch.as_deref(),
                n.lock_ref.as_str()
            ),
            ("comment", Some("trunk"), "HEAD")
        );
        let bare = normalize("issue_comment", &json!({"action": "created"})).unwrap();
        assert_eq!(
            bare.event.target_branch.as_deref(),
            Some("main"),
            "the fallback branch"
        );
        let n = normalize(
            "repository_dispatch",
            &json!({"action": "deploy", "branch": "main", "repository": repo()}),
        )
        .unwrap();
        assert_eq!(
            (n.event.kind.as_str(), n.event.action.as_str()),
            ("dispatch", "deploy")
        );
        let n = normalize(
            "release",
            &json!({"action": "published", "release": {"target_commitish": "v3"}}),
        )
        .unwrap();
        assert_eq!(
            (n.event.kind.as_str(), n.lock_ref.as_str()),
            ("release", "v3")
        );
        for event in ["create", "delete"] {
            let n = normalize(event, &json!({"ref": "feature/y", "ref_type": "branch"})).unwrap();
            assert_eq!(
                (n.event.kind.as_str(), n.event.target_branch.as_deref()),
                (event, Some("feature/y"))
            );
        }
        let n = normalize(
            "status",
            &json!({"sha": "s1", "state": "success", "branches": [{"name": "main"}]}),
        )
        .unwrap();
        assert_eq!(
            (n.event.target_branch.as_deref(), n.lock_ref.as_str()),
            (Some("main"), "s1")
        );
        let n = normalize(
            "workflow_run",
            &json!({"action": "completed", "workflow_run": {"head_branch": "dev"}}),
        )
        .unwrap();
        assert_eq!(n.event.target_branch.as_deref(), Some("dev"));
        for event in ["fork", "star", "watch"] {
            assert_eq!(
                normalize(event, &json!({"action": "started"}))
                    .unwrap()
                    .event
                    .kind,
                event
            );
        }
        for ignored in ["issues", "check_run", "ping", "installation"] {
            assert!(normalize(ignored, &json!({})).is_none(), "{ignored}");
        }
    }

    #[test]
    fn a_normalized_push_meets_its_trigger() {
        let n = normalize(
            "push",
            &json!({"ref": "refs/heads/main", "after": "x", "repository": repo()}),
        )
        .unwrap();
        let triggers = [
            json!({"_type": "push", "branches": [{"type": "glob", "pattern": "main"}], "paths": [], "repos": ["acme/*"]}),
        ];
        assert_eq!(crate::trigger::decide(&triggers, &n.event).matched, Some(0));
    }
}
