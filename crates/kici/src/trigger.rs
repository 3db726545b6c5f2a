//! Trigger matching (reference `kici.md` §4): which trigger of a workflow, if any, an event
//! starts. Triggers are tried in order and the first that matches wins; every filter is "empty
//! means no constraint"; filters are AND-ed, the entries of one filter OR-ed. Each filter
//! tried leaves an entry in the decision trace.
//!
//! Globs follow picomatch's defaults for `*` and `**` (`*` stays within a path segment, `**`
//! crosses them) through `globset` with `literal_separator`; unlike picomatch, a `*` also
//! matches a leading dot. Regexes are unanchored unless the author anchors them, compiled by
//! the linear-time `regex` crate.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An event, normalised from its provider (§4, `SimulatedEvent`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// `pull_request`, `push`, `tag`, `comment`, `review`, `release`, `dispatch`, `create`,
    /// `delete`, `status`, `workflow_run`, `fork`, `star`, `watch`, `generic_webhook`,
    /// `schedule`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The action (`opened`, `created`, …); missing is `""`.
    #[serde(default)]
    pub action: String,
    /// The provider's payload.
    #[serde(default)]
    pub payload: Value,
    /// PR base branch, pushed branch (without `refs/heads/`), or tag name.
    pub target_branch: Option<String>,
    /// PR head branch.
    pub source_branch: Option<String>,
    /// Files the event changed, when known (fetched lazily, only when a trigger has paths).
    pub changed_files: Option<Vec<String>>,
    /// `owner/repo` the event comes from (global workflows' `repos`).
    pub source_repo: Option<String>,
}

/// One filter of one trigger, tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEntry {
    /// The trigger's index in the workflow.
    pub trigger: usize,
    /// The filter: `type`, `action`, `branches`, `paths`, `repos`, …
    pub filter: String,
    /// Whether it passed.
    pub passed: bool,
}

/// The outcome of matching a workflow's triggers against an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The index of the first matching trigger.
    pub matched: Option<usize>,
    /// Every filter tried, in order.
    pub trace: Vec<TraceEntry>,
}

/// Which trigger of `triggers` (lock file JSON, §2.5) `event` starts, with the trace. A
/// workflow without triggers never matches; a trigger of an unknown `_type` never matches.
pub fn decide(triggers: &[Value], event: &Event) -> Decision {
    let mut trace = Vec::new();
    for (i, trigger) in triggers.iter().enumerate() {
        let mut check = Check {
            trigger: i,
            trace: &mut trace,
        };
        if matches(trigger, event, &mut check) {
            return Decision {
                matched: Some(i),
                trace,
            };
        }
    }
    Decision {
        matched: None,
        trace,
    }
}

struct Check<'a> {
    trigger: usize,
    trace: &'a mut Vec<TraceEntry>,
}

impl Check<'_> {
    fn note(&mut self, filter: &str, passed: bool) -> bool {
        self.trace.push(TraceEntry {
            trigger: self.trigger,
            filter: filter.to_owned(),
            passed,
        });
        passed
    }
}

/// The event type a trigger `_type` answers.
fn event_type(trigger: &str) -> Option<&'static str> {
    Some(match trigger {
        "pr" => "pull_request",
        "push" => "push",
        "tag" => "tag",
        "comment" => "comment",
        "review" => "review",
        "review_comment" => "review_comment",
        "release" => "release",
        "dispatch" => "dispatch",
        "create" => "create",
        "delete" => "delete",
        "status" => "status",
        "workflow_run" => "workflow_run",
        "fork" => "fork",
        "star" => "star",
        "watch" => "watch",
        "kici_event" => "kici_event",
        "workflow_complete" => "workflow_complete",
        "job_complete" => "job_complete",
        "generic_webhook" => "generic_webhook",
        "schedule" => "schedule",
        "lifecycle" => "lifecycle",
        _ => return None,
    })
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// Membership of `value` in the list at `list`; an empty list passes.
fn member(list: &Value, value: &str) -> bool {
    let list = strings(list);
    list.is_empty() || list.contains(&value)
}

fn matches(trigger: &Value, event: &Event, check: &mut Check<'_>) -> bool {
    let kind = trigger["_type"].as_str().unwrap_or("");
    let p = &event.payload;
    // `webhook` triggers name the raw event types they take.
    if kind == "webhook" {
        return check.note(
            "events",
            strings(&trigger["events"]).contains(&event.kind.as_str()),
        ) && check.note("actions", member(&trigger["actions"], &event.action));
    }
    let Some(wanted) = event_type(kind) else {
        return check.note("type", false);
    };
    if !check.note("type", event.kind == wanted) {
        return false;
    }
    let target = event.target_branch.as_deref();
    let ok = match kind {
        "pr" => {
            check.note("events", member(&trigger["events"], &event.action))
                && check.note(
                    "targetBranches",
                    branch_filter(&trigger["targetBranches"], target),
                )
                && check.note(
                    "sourceBranches",
                    branch_filter(&trigger["sourceBranches"], event.source_branch.as_deref()),
                )
                && check.note("paths", paths_filter(&trigger["paths"], event))
        }
        "push" => {
            check.note("branches", branch_filter(&trigger["branches"], target))
                && check.note("paths", paths_filter(&trigger["paths"], event))
        }
        "tag" => check.note("patterns", branch_filter(&trigger["patterns"], target)),
        "comment" => {
            let on_pr = p["issue"]["pull_request"].is_object();
            let source_ok = match trigger["source"].as_str() {
                Some("pr") => on_pr,
                Some("issue") => !on_pr,
                _ => true,
            };
            let body = p["comment"]["body"].as_str().unwrap_or("");
            check.note("actions", member(&trigger["actions"], &event.action))
                && check.note("source", source_ok)
                && check.note(
                    "bodyMatch",
                    trigger["bodyMatch"].is_null()
                        || pattern(&trigger["bodyMatch"]).is_some_and(|m| m.is_match(body)),
                )
        }
        "review" => {
            check.note("actions", member(&trigger["actions"], &event.action))
                && check.note(
                    "states",
                    member(
                        &trigger["states"],
                        p["review"]["state"].as_str().unwrap_or(""),
                    ),
                )
        }
        "review_comment" | "release" | "star" | "watch" => {
            check.note("actions", member(&trigger["actions"], &event.action))
        }
        "dispatch" => check.note("types", member(&trigger["types"], &event.action)),
        "create" | "delete" => {
            let ref_type = p["ref_type"].as_str().unwrap_or("");
            check.note("refTypes", member(&trigger["refTypes"], ref_type))
                && check.note(
                    "patterns",
                    branch_filter(&trigger["patterns"], p["ref"].as_str()),
                )
        }
        "status" => {
            let context = p["context"].as_str().unwrap_or("");
            let contexts: Vec<Matcher> = strings(&trigger["contexts"])
                .into_iter()
                .filter_map(Matcher::glob)
                .collect();
            check.note(
                "contexts",
                contexts.is_empty() || contexts.iter().any(|m| m.is_match(context)),
            ) && check.note(
                "states",
                member(&trigger["states"], p["state"].as_str().unwrap_or("")),
            )
        }
        "workflow_run" => {
            let run = &p["workflow_run"];
            check.note("actions", member(&trigger["actions"], &event.action))
                && check.note(
                    "workflows",
                    member(&trigger["workflows"], run["name"].as_str().unwrap_or("")),
                )
                && check.note(
                    "conclusions",
                    member(
                        &trigger["conclusions"],
                        run["conclusion"].as_str().unwrap_or(""),
                    ),
                )
        }
        "generic_webhook" => {
            let event_type = p["eventType"].as_str().unwrap_or(&event.action);
            check.note("source", trigger["source"] == p["source"])
                && check.note("events", member(&trigger["events"], event_type))
        }
        "schedule" => check.note(
            "cronExpression",
            trigger["cronExpression"] == p["cronExpression"],
        ),
        "lifecycle" => {
            check.note(
                "events",
                strings(&trigger["events"]).contains(&p["lifecycleEvent"].as_str().unwrap_or("")),
            ) && check.note(
                "sources",
                member(&trigger["sources"], p["source"].as_str().unwrap_or("")),
            )
        }
        "workflow_complete" | "job_complete" => {
            let equal = |k: &str| trigger[k].is_null() || trigger[k] == p[k];
            check.note("name", equal("name") && equal("workflow") && equal("job"))
                && check.note(
                    "status",
                    member(&trigger["status"], p["status"].as_str().unwrap_or("")),
                )
        }
        "kici_event" => check.note("eventName", trigger["eventName"] == p["eventName"]),
        // fork: the type is the whole filter.
        _ => true,
    };
    ok && check.note("repos", repos_filter(&trigger["repos"], event))
}

/// A compiled branch pattern or glob.
enum Matcher {
    Glob(globset::GlobMatcher),
    Regex(regex::Regex),
}

impl Matcher {
    fn glob(pattern: &str) -> Option<Matcher> {
        globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .ok()
            .map(|g| Matcher::Glob(g.compile_matcher()))
    }

    fn is_match(&self, s: &str) -> bool {
        match self {
            Matcher::Glob(g) => g.is_match(s),
            Matcher::Regex(r) => r.is_match(s),
        }
    }
}

/// A pattern `{type: glob|regex, pattern, flags?}` (a plain string is a glob). An invalid one
/// matches nothing.
fn pattern(v: &Value) -> Option<Matcher> {
    if let Some(glob) = v.as_str() {
        return Matcher::glob(glob);
    }
    let source = v["pattern"].as_str()?;
    match v["type"].as_str() {
        Some("regex") => {
            let flags = v["flags"].as_str().unwrap_or("");
            regex::RegexBuilder::new(source)
                .case_insensitive(flags.contains('i'))
                .multi_line(flags.contains('m'))
                .dot_matches_new_line(flags.contains('s'))
                .build()
                .ok()
                .map(Matcher::Regex)
        }
        _ => Matcher::glob(source),
    }
}

/// Branch patterns, OR-ed; empty passes; a value that is missing fails a non-empty filter.
fn branch_filter(patterns: &Value, value: Option<&str>) -> bool {
    let list = patterns.as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        return true;
    }
    let Some(value) = value else { return false };
    list.iter().filter_map(pattern).any(|m| m.is_match(value))
}

/// `paths` (§4): with patterns but no changed files, no match; excludes (`!…`) drop files
/// first; nothing left, no match; only excludes, match; else some file left matches some
/// include.
fn paths_filter(paths: &Value, event: &Event) -> bool {
    let list = strings(paths);
    if list.is_empty() {
        return true;
    }
    let files = event.changed_files.as_deref().unwrap_or_default();
    if files.is_empty() {
        return false;
    }
    let (excludes, includes) = split(&list);
    let left: Vec<&String> = files
        .iter()
        .filter(|f| !excludes.iter().any(|m| m.is_match(f)))
        .collect();
    if left.is_empty() {
        return false;
    }
    includes.is_empty() || left.iter().any(|f| includes.iter().any(|m| m.is_match(f)))
}

/// `repos` (§4): an exclude match rejects first; only excludes, accept; else some include
/// must match. A trigger with repos and an event without a source repository: no match.
fn repos_filter(repos: &Value, event: &Event) -> bool {
    let list = repos.as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        return true;
    }
    let Some(repo) = event.source_repo.as_deref() else {
        return false;
    };
    let mut includes = Vec::new();
    for entry in list {
        let negated = |p: &str| p.strip_prefix('!').map(str::to_owned);
        let (exclude, matcher) = match entry.as_str().and_then(negated) {
            Some(rest) => (true, Matcher::glob(&rest)),
            None => match entry["pattern"].as_str().and_then(negated) {
                Some(rest) => {
                    let mut e = entry.clone();
                    e["pattern"] = rest.into();
                    (true, pattern(&e))
                }
                None => (false, pattern(entry)),
            },
        };
        match (exclude, matcher) {
            (true, Some(m)) if m.is_match(repo) => return false,
            (false, Some(m)) => includes.push(m),
            _ => {}
        }
    }
    includes.is_empty() || includes.iter().any(|m| m.is_match(repo))
}

/// Globs split into excludes (`!`-prefixed, without the `!`) and includes.
fn split(list: &[&str]) -> (Vec<Matcher>, Vec<Matcher>) {
    let (mut excludes, mut includes) = (Vec::new(), Vec::new());
    for entry in list {
        match entry.strip_prefix('!') {
            Some(rest) => excludes.extend(Matcher::glob(rest)),
            None => includes.extend(Matcher::glob(entry)),
        }
    }
    (excludes, includes)
}

#[cfg(test)]
mod tests;
