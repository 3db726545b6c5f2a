use serde_json::json;

use super::*;

fn push(branch: &str, files: &[&str]) -> Event {
    Event {
        kind: "push".into(),
        target_branch: Some(branch.into()),
        changed_files: Some(files.iter().map(|f| (*f).to_owned()).collect()),
        source_repo: Some("acme/app".into()),
        ..Event::default()
    }
}

fn pr(action: &str, base: &str, head: Option<&str>) -> Event {
    Event {
        kind: "pull_request".into(),
        action: action.into(),
        target_branch: Some(base.into()),
        source_branch: head.map(str::to_owned),
        ..Event::default()
    }
}

fn first(triggers: Value, event: &Event) -> Option<usize> {
    decide(triggers.as_array().unwrap(), event).matched
}

#[test]
fn the_first_matching_trigger_wins_and_the_trace_says_why() {
    let triggers = json!([
        {"_type": "pr", "events": ["opened"], "targetBranches": [], "sourceBranches": [], "paths": []},
        {"_type": "push", "branches": [{"type": "glob", "pattern": "main"}], "paths": []},
        {"_type": "push", "branches": [], "paths": []},
    ]);
    let d = decide(triggers.as_array().unwrap(), &push("main", &[]));
    assert_eq!(d.matched, Some(1));
    assert_eq!(
        d.trace,
        vec![
            TraceEntry {
                trigger: 0,
                filter: "type".into(),
                passed: false
            },
            TraceEntry {
                trigger: 1,
                filter: "type".into(),
                passed: true
            },
            TraceEntry {
                trigger: 1,
                filter: "branches".into(),
                passed: true
            },
            TraceEntry {
                trigger: 1,
                filter: "paths".into(),
                passed: true
            },
            TraceEntry {
                trigger: 1,
                filter: "repos".into(),
                passed: true
            },
        ]
    );
    assert_eq!(first(triggers.clone(), &push("dev", &[])), Some(2));
    assert_eq!(
        first(json!([]), &push("main", &[])),
        None,
        "no triggers, no run"
    );
    assert_eq!(
        first(json!([{"_type": "nonsense"}]), &push("main", &[])),
        None
    );
}

#[test]
fn branch_globs_keep_to_a_segment_and_regexes_are_unanchored() {
    let on = |pattern: Value| json!([{"_type": "push", "branches": [pattern], "paths": []}]);
    assert_eq!(
        first(
            on(json!({"type": "glob", "pattern": "release/*"})),
            &push("release/1.0", &[])
        ),
        Some(0)
    );
    assert_eq!(
        first(
            on(json!({"type": "glob", "pattern": "release/*"})),
            &push("release/1/hotfix", &[])
        ),
        None
    );
    assert_eq!(
        first(
            on(json!({"type": "glob", "pattern": "release/**"})),
            &push("release/1/hotfix", &[])
        ),
        Some(0)
    );
    assert_eq!(
        first(
            on(json!({"type": "regex", "pattern": "feat-"})),
            &push("my-feat-x", &[])
        ),
        Some(0)
    );
    assert_eq!(
        first(
            on(json!({"type": "regex", "pattern": "^feat-"})),
            &push("my-feat-x", &[])
        ),
        None
    );
    assert_eq!(
        first(
            on(json!({"type": "regex", "pattern": "^FEAT", "flags": "i"})),
            &push("feat-1", &[])
        ),
        Some(0)
    );
}

#[test]
fn pull_requests_match_actions_and_both_branches() {
    let t = json!([{"_type": "pr", "events": ["opened", "synchronize"],
        "targetBranches": [{"type": "glob", "pattern": "main"}],
        "sourceBranches": [{"type": "glob", "pattern": "feature/*"}], "paths": []}]);
    assert_eq!(
        first(t.clone(), &pr("opened", "main", Some("feature/x"))),
        Some(0)
    );
    assert_eq!(
        first(t.clone(), &pr("closed", "main", Some("feature/x"))),
        None
    );
    assert_eq!(
        first(t.clone(), &pr("opened", "dev", Some("feature/x"))),
        None
    );
    assert_eq!(
        first(t.clone(), &pr("opened", "main", None)),
        None,
        "no head ref, no match"
    );
    let any = json!([{"_type": "pr", "events": [], "targetBranches": [], "sourceBranches": [], "paths": []}]);
    assert_eq!(
        first(any, &pr("", "main", None)),
        Some(0),
        "empty filters constrain nothing"
    );
}

#[test]
fn paths_drop_excluded_files_first() {
    let t = |paths: Value| json!([{"_type": "push", "branches": [], "paths": paths}]);
    let code = t(json!(["src/**", "!**/*.md"]));
    assert_eq!(first(code.clone(), &push("main", &["src/lib.rs"])), Some(0));
    assert_eq!(
        first(code.clone(), &push("main", &["src/README.md"])),
        None,
        "all excluded"
    );
    assert_eq!(
        first(code.clone(), &push("main", &["docs/a.md", "src/lib.rs"])),
        Some(0),
        "an excluded file vetoes nothing"
    );
    assert_eq!(first(code.clone(), &push("main", &["docs/a.txt"])), None);
    assert_eq!(
        first(code.clone(), &push("main", &[])),
        None,
        "paths but no changed files"
    );
    let not_docs = t(json!(["!docs/**"]));
    assert_eq!(
        first(not_docs.clone(), &push("main", &["src/a.rs"])),
        Some(0),
        "only excludes"
    );
    assert_eq!(first(not_docs, &push("main", &["docs/a.md"])), None);
}

#[test]
fn repos_reject_on_an_exclude_first() {
    let t = json!([{"_type": "push", "branches": [], "paths": [], "repos": ["acme/*", "!acme/secret"]}]);
    let from = |repo: Option<&str>| Event {
        source_repo: repo.map(str::to_owned),
        ..push("main", &[])
    };
    assert_eq!(first(t.clone(), &from(Some("acme/app"))), Some(0));
    assert_eq!(first(t.clone(), &from(Some("acme/secret"))), None);
    assert_eq!(first(t.clone(), &from(Some("other/app"))), None);
    assert_eq!(
        first(t.clone(), &from(None)),
        None,
        "repos but no source repository"
    );
    let regex = json!([{"_type": "push", "branches": [], "paths": [], "repos": [{"type": "regex", "pattern": "^acme/"}]}]);
    assert_eq!(first(regex, &from(Some("acme/x"))), Some(0));
    let only_not =
        json!([{"_type": "push", "branches": [], "paths": [], "repos": ["!acme/secret"]}]);
    assert_eq!(first(only_not.clone(), &from(Some("x/y"))), Some(0));
    assert_eq!(first(only_not, &from(Some("acme/secret"))), None);
}

#[test]
fn comments_tags_dispatch_and_webhooks() {
    let comment = |body: &str, on_pr: bool| Event {
        kind: "comment".into(),
        action: "created".into(),
        payload: if on_pr {
            json!({"comment": {"body": body}, "issue": {"pull_request": {}}})
        } else {
            json!({"comment": {"body": body}, "issue": {}})
        },
        ..Event::default()
    };
    let t = json!([{"_type": "comment", "actions": ["created"], "source": "pr",
        "bodyMatch": {"type": "glob", "pattern": "/deploy*"}}]);
    assert_eq!(first(t.clone(), &comment("/deploy prod", true)), Some(0));
    assert_eq!(
        first(t.clone(), &comment("/deploy prod", false)),
        None,
        "not on a PR"
    );
    assert_eq!(
        first(t.clone(), &comment("please /deploy", true)),
        None,
        "the whole body"
    );
    let tag = json!([{"_type": "tag", "patterns": [{"type": "glob", "pattern": "v*"}]}]);
    let tagged = Event {
        kind: "tag".into(),
        target_branch: Some("v1.2.0".into()),
        ..Event::default()
    };
    assert_eq!(first(tag.clone(), &tagged), Some(0));
    assert_eq!(
        first(tag, &push("v1.2.0", &[])),
        None,
        "a branch push is no tag"
    );
    let dispatch = json!([{"_type": "dispatch", "types": ["deploy"]}]);
    let sent = Event {
        kind: "dispatch".into(),
        action: "deploy".into(),
        ..Event::default()
    };
    assert_eq!(first(dispatch, &sent), Some(0));
    let webhook = json!([{"_type": "webhook", "events": ["deployment_status"], "actions": []}]);
    let raw = Event {
        kind: "deployment_status".into(),
        ..Event::default()
    };
    assert_eq!(first(webhook, &raw), Some(0));
    let generic =
        json!([{"_type": "generic_webhook", "source": "stripe", "events": ["invoice.paid"]}]);
    let hook = |source: &str, ev: &str| Event {
        kind: "generic_webhook".into(),
        payload: json!({"source": source, "eventType": ev}),
        ..Event::default()
    };
    assert_eq!(
        first(generic.clone(), &hook("stripe", "invoice.paid")),
        Some(0)
    );
    assert_eq!(
        first(generic.clone(), &hook("stripe", "invoice.void")),
        None
    );
    assert_eq!(first(generic, &hook("github", "invoice.paid")), None);
    let schedule = json!([{"_type": "schedule", "cronExpression": "0 * * * *", "timezone": "UTC"}]);
    let tick = |cron: &str| Event {
        kind: "schedule".into(),
        payload: json!({"cronExpression": cron}),
        ..Event::default()
    };
    assert_eq!(first(schedule.clone(), &tick("0 * * * *")), Some(0));
    assert_eq!(first(schedule, &tick("5 * * * *")), None);
}
