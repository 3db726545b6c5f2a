//! Workflows authored in YAML (`.kici/workflows/*.yml`) and their compilation into the lock
//! file ([`compile`]). The reference authors workflows in TypeScript with `@kici-dev/sdk`
//! (`kici.md` §3); Rust cannot run that, so the same concepts, under the same names, are
//! written as YAML and each step carries a shell script (`run`, the lock file extension of
//! [`crate::lock::LockStep::run`]). The output is an ordinary schema-29 lock file, checked by
//! [`crate::parse_lock_file`] before it is returned, so what `kilocloud ci compile` writes is
//! exactly what the orchestrator accepts.
//!
//! ```yaml
//! name: ci
//! on:
//!   - push: { branches: [main], paths: ["src/**", "!**/*.md"] }
//!   - pr: { events: [opened, synchronize], target: [main] }
//!   - dispatch: {}
//! timeout: 3600000            # whole run, ms
//! concurrency:                # one run per group; a newer run cancels an older one
//!   group: deploy-${branch}   # ${workflow} ${repo} ${ref} ${branch} ${sha} ${event}
//!   cancelInProgress: true    # false: a newer run waits for the older one
//! jobs:
//!   lint:
//!     runsOn: kici:os:linux   # a label, a list (all must match) or {labels, exclude, pick}
//!     run: cargo fmt --check  # one step named after the job
//!   test:
//!     runsOn: [kici:os:linux]
//!     needs: [lint]           # or [{name: lint, when: always}]
//!     matrix: { toolchain: [stable, beta] }
//!     env: { RUST_BACKTRACE: "1" }
//!     timeout: 1800000        # ms
//!     concurrencyGroup: tests
//!     steps:
//!       - name: test
//!         run: cargo test
//!         timeout: 600000     # ms
//!         retry: 2
//!         continueOnError: false
//!       - parallel:
//!           name: extra
//!           failFast: true
//!           steps: [{ name: docs, run: cargo doc }, { name: bench, run: cargo bench --no-run }]
//! ```
//!
//! Labels written with glob characters (`*?[]{}`) become regex matchers, as the SDK does with
//! picomatch; `/re/flags` is a regex; anything else is exact. Labels starting with `kici:` may
//! be targeted but not set (they are set by agents).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::lock::{LockFile, SCHEMA_VERSION};

/// The hash recipe version written as `compileSchemaVersion` (`kici.md` §2).
pub const COMPILE_SCHEMA_VERSION: u64 = 5;

/// A workflow file that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// Not YAML, or not of the workflow shape (unknown keys are refused).
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// What the parser said, with its line and column.
        message: String,
    },
    /// Well-formed, but not a valid workflow.
    #[error("{file}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// The compiled lock file fails the lock file checks (a cycle, a missing dependency…).
    #[error("{0}")]
    Lock(#[from] crate::LockError),
}

/// One workflow file: its path (relative to the repository root, for `source.file`) and text.
#[derive(Debug, Clone)]
pub struct WorkflowSource {
    /// E.g. `.kici/workflows/ci.yml`.
    pub file: String,
    /// The YAML.
    pub text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowYaml {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    on: OneOrMany<BTreeMap<String, Value>>,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    concurrency: Option<ConcurrencyYaml>,
    jobs: indexmap_like::Ordered<JobYaml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConcurrencyYaml {
    group: String,
    #[serde(default = "yes")]
    cancel_in_progress: bool,
}

fn yes() -> bool {
    true
}

/// The placeholders a concurrency group template may use, filled per run by the orchestrator:
/// `${workflow}`, `${repo}` (`owner/name`), `${ref}` (`refs/heads/main`), `${branch}` (the
/// ref without `refs/heads/` or `refs/tags/`), `${sha}`, `${event}`.
pub const GROUP_PLACEHOLDERS: [&str; 6] = ["workflow", "repo", "ref", "branch", "sha", "event"];

/// `template` with each `${name}` of [`GROUP_PLACEHOLDERS`] replaced by `value(name)`.
///
/// Errors: the first unknown or unterminated placeholder.
pub fn render_group(template: &str, value: impl Fn(&str) -> String) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("`{template}`: a `${{` is not closed"))?;
        let name = &after[..end];
        if !GROUP_PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "`{template}`: unknown placeholder `${{{name}}}` (use {})",
                GROUP_PLACEHOLDERS
                    .iter()
                    .map(|p| format!("${{{p}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out.push_str(&value(name));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A YAML mapping kept in document order (job order is the order jobs are listed in).
mod indexmap_like {
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

    /// Entries in the order written.
    #[derive(Debug)]
    pub struct Ordered<T>(pub Vec<(String, T)>);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<T>(std::marker::PhantomData<T>);
            impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
                type Value = Ordered<T>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a mapping of names to jobs")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let mut entries = Vec::new();
                    while let Some((k, v)) = map.next_entry::<String, T>()? {
                        entries.push((k, v));
                    }
                    Ok(Ordered(entries))
                }
            }
            d.deserialize_map(V(std::marker::PhantomData))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JobYaml {
    #[serde(default)]
    runs_on: Option<RunsOnYaml>,
    #[serde(default)]
    needs: Vec<NeedYaml>,
    #[serde(default)]
    matrix: Option<Value>,
    #[serde(default)]
    include: Option<Vec<BTreeMap<String, String>>>,
    #[serde(default)]
    exclude: Option<Vec<BTreeMap<String, String>>>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    concurrency_group: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    checkout: Option<bool>,
    #[serde(default)]
    steps: Option<Vec<StepEntryYaml>>,
    #[serde(default)]
    run: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RunsOnYaml {
    One(String),
    All(Vec<String>),
    Full {
        labels: OneOrMany<String>,
        #[serde(default)]
        exclude: Vec<String>,
        #[serde(default)]
        pick: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum NeedYaml {
    Name(String),
    Full {
        name: String,
        #[serde(default)]
        when: Option<WhenYaml>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WhenYaml {
    Keyword(String),
    Statuses(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StepEntryYaml {
    Parallel { parallel: ParallelYaml },
    Step(StepYaml),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ParallelYaml {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    fail_fast: Option<bool>,
    #[serde(default)]
    max_parallel: Option<u32>,
    steps: Vec<StepYaml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StepYaml {
    #[serde(default)]
    name: Option<String>,
    run: String,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    retry: Option<u32>,
    #[serde(default)]
    continue_on_error: bool,
}

/// The terminal job statuses, the run-on set of `when: always` (`kici.md` §3).
const ALL_TERMINAL: [&str; 6] = [
    "success",
    "failed",
    "cancelled",
    "skipped",
    "timed_out_stale",
    "drift_dropped",
];

/// Compiles workflow files into one lock file, workflows in the order given (sort the files
/// by path for a deterministic lock). The lock's `contentHash` covers every workflow's; each
/// workflow's is `sha256("5:" + source with CRLF normalised to LF)` as in the reference.
///
/// Errors: [`CompileError`]: the first file that does not parse or is invalid, or the lock
/// file checks (duplicate names, needs graph, matrices, label regexes).
pub fn compile(sources: &[WorkflowSource]) -> Result<LockFile, CompileError> {
    let mut workflows = Vec::new();
    let mut all = Sha256::new();
    for source in sources {
        let workflow = compile_one(source)?;
        all.update(workflow["contentHash"].as_str().unwrap_or_default());
        workflows.push(workflow);
    }
    let mut lock = json!({
        "schemaVersion": SCHEMA_VERSION,
        "contentHash": hex::encode(all.finalize()),
        "workflows": workflows,
    });
    if let Some(first) = sources.first() {
        lock["source"] = json!({"file": first.file, "export": "#default"});
    }
    let bytes = serde_json::to_vec(&lock).expect("a JSON value serializes");
    Ok(crate::parse_lock_file(&bytes)?)
}

/// The lock file as the reference writes it: two-space indented JSON and a final newline.
pub fn to_lock_json(lock: &LockFile) -> String {
    let mut text = serde_json::to_string_pretty(lock).expect("a lock file serializes");
    text.push('\n');
    text
}

fn compile_one(source: &WorkflowSource) -> Result<Value, CompileError> {
    let file = source.file.clone();
    let invalid = |message: String| CompileError::Invalid {
        file: file.clone(),
        message,
    };
    let parsed: WorkflowYaml =
        yaml_serde::from_str(&source.text).map_err(|e| CompileError::Syntax {
            file: file.clone(),
            message: e.to_string(),
        })?;
    let normalized = source.text.replace("\r\n", "\n");
    let content_hash = hex::encode(Sha256::digest(
        format!("{COMPILE_SCHEMA_VERSION}:{normalized}").as_bytes(),
    ));
    let mut triggers = Vec::new();
    for (i, trigger) in parsed.on.into_vec().into_iter().enumerate() {
        if trigger.len() != 1 {
            return Err(invalid(format!(
                "on[{i}]: a trigger is a mapping with one key (its type), e.g. `push: {{}}`"
            )));
        }
        let (kind, options) = trigger.into_iter().next().expect("one entry");
        triggers
            .extend(compile_trigger(&kind, options).map_err(|m| invalid(format!("on[{i}]: {m}")))?);
    }
    if parsed.jobs.0.is_empty() {
        return Err(invalid("a workflow needs at least one job".into()));
    }
    let mut jobs = Vec::new();
    for (name, job) in parsed.jobs.0 {
        jobs.push(compile_job(&name, job).map_err(|m| invalid(format!("job `{name}`: {m}")))?);
    }
    let mut workflow = json!({
        "name": parsed.name,
        "source": {"file": source.file, "export": "#default"},
        "contentHash": content_hash,
        "compileSchemaVersion": COMPILE_SCHEMA_VERSION,
        "triggers": triggers,
        "jobs": jobs,
    });
    if let Some(d) = parsed.description {
        workflow["description"] = d.into();
    }
    if let Some(t) = parsed.timeout {
        workflow["timeout"] = t.into();
    }
    if let Some(c) = parsed.concurrency {
        render_group(&c.group, |_| String::new())
            .map_err(|m| invalid(format!("concurrency: {m}")))?;
        // `group` is an extension: the reference's group is a function the agent evaluates.
        workflow["concurrency"] = json!({"hasGroup": true, "group": c.group,
            "cancelInProgress": c.cancel_in_progress, "max": 1});
    }
    Ok(workflow)
}

/// A branch pattern (`BP`, §2.5): `/re/flags` is a regex, anything else a glob.
fn branch_pattern(p: &str) -> Value {
    match regex_literal(p) {
        Some((source, flags)) => json!({"type": "regex", "pattern": source, "flags": flags}),
        None => json!({"type": "glob", "pattern": p}),
    }
}

fn regex_literal(p: &str) -> Option<(&str, &str)> {
    let rest = p.strip_prefix('/')?;
    let end = rest.rfind('/')?;
    let flags = &rest[end + 1..];
    flags
        .chars()
        .all(|c| "imsuy".contains(c))
        .then_some((&rest[..end], flags))
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>, String> {
    match &v[key] {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("`{key}` must list strings"))
            })
            .collect(),
        _ => Err(format!("`{key}` must be a string or a list of strings")),
    }
}

fn patterns(v: &Value, key: &str) -> Result<Vec<Value>, String> {
    Ok(strings(v, key)?.iter().map(|p| branch_pattern(p)).collect())
}

/// The default PR actions of `pr()` (§3).
const PR_DEFAULT_EVENTS: [&str; 4] = ["opened", "synchronize", "reopened", "closed"];

fn compile_trigger(kind: &str, options: Value) -> Result<Vec<Value>, String> {
    let o = if options.is_null() {
        json!({})
    } else {
        options
    };
    let Some(fields) = o.as_object() else {
        return Err(format!("`{kind}` takes a mapping of options"));
    };
    let allowed: &[&str] = match kind {
        "pr" => &[
            "events",
            "target",
            "source",
            "paths",
            "repos",
            "description",
        ],
        "push" => &["branches", "tags", "paths", "repos", "description"],
        "tag" => &["patterns", "repos"],
        "comment" => &["actions", "source", "bodyMatch", "repos"],
        "review" => &["actions", "states"],
        "release" => &["actions"],
        "dispatch" => &["types"],
        "create" | "delete" => &["refTypes", "patterns"],
        "status" => &["contexts", "states"],
        "workflowRun" => &["actions", "workflows", "conclusions"],
        "webhook" => &["events", "actions"],
        "genericWebhook" => &["source", "events"],
        "schedule" => &["cron", "timezone", "description"],
        other => {
            return Err(format!(
                "unknown trigger `{other}` (pr, push, tag, comment, review, release, dispatch, \
                 create, delete, status, workflowRun, webhook, genericWebhook, schedule)"
            ));
        }
    };
    if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!(
            "`{kind}` has no option `{unknown}` (it takes {})",
            allowed.join(", ")
        ));
    }
    let repos = |t: &mut Value| -> Result<(), String> {
        if !o["repos"].is_null() {
            t["repos"] = patterns(&o, "repos")?.into();
        }
        Ok(())
    };
    let mut out = Vec::new();
    match kind {
        "pr" => {
            let mut events = strings(&o, "events")?;
            if events.is_empty() {
                events = PR_DEFAULT_EVENTS.iter().map(|e| e.to_string()).collect();
            }
            let mut t = json!({
                "_type": "pr", "events": events,
                "targetBranches": patterns(&o, "target")?,
                "sourceBranches": patterns(&o, "source")?,
                "paths": strings(&o, "paths")?,
            });
            repos(&mut t)?;
            out.push(t);
        }
        "push" => {
            let mut t = json!({
                "_type": "push", "branches": patterns(&o, "branches")?,
                "paths": strings(&o, "paths")?,
            });
            repos(&mut t)?;
            out.push(t);
            // The SDK's push({tags}) emits a tag trigger beside the push trigger (§3).
            let tags = patterns(&o, "tags")?;
            if !tags.is_empty() {
                let mut t = json!({"_type": "tag", "patterns": tags});
                repos(&mut t)?;
                out.push(t);
            }
        }
        "tag" => {
            let mut t = json!({"_type": "tag", "patterns": patterns(&o, "patterns")?});
            repos(&mut t)?;
            out.push(t);
        }
        "comment" => {
            let mut t = json!({"_type": "comment", "actions": strings(&o, "actions")?});
            if let Some(s) = o["source"].as_str() {
                if s != "issue" && s != "pr" {
                    return Err("comment `source` is issue or pr".into());
                }
                t["source"] = s.into();
            }
            if let Some(m) = o["bodyMatch"].as_str() {
                t["bodyMatch"] = branch_pattern(m);
            }
            repos(&mut t)?;
            out.push(t);
        }
        "review" => out.push(
            json!({"_type": "review", "actions": strings(&o, "actions")?,
            "states": strings(&o, "states")?}),
        ),
        "release" => out.push(json!({"_type": "release", "actions": strings(&o, "actions")?})),
        "dispatch" => out.push(json!({"_type": "dispatch", "types": strings(&o, "types")?})),
        "create" | "delete" => out.push(json!({"_type": kind,
            "refTypes": strings(&o, "refTypes")?, "patterns": patterns(&o, "patterns")?})),
        "status" => out.push(
            json!({"_type": "status", "contexts": strings(&o, "contexts")?,
            "states": strings(&o, "states")?}),
        ),
        "workflowRun" => out.push(json!({"_type": "workflow_run",
            "actions": strings(&o, "actions")?, "workflows": strings(&o, "workflows")?,
            "conclusions": strings(&o, "conclusions")?})),
        "webhook" => out.push(json!({"_type": "webhook", "events": strings(&o, "events")?,
            "actions": strings(&o, "actions")?})),
        "genericWebhook" => {
            let source = o["source"]
                .as_str()
                .ok_or("genericWebhook needs `source` (the generic source's name)")?;
            out.push(json!({"_type": "generic_webhook", "source": source,
                "events": strings(&o, "events")?}));
        }
        "schedule" => {
            let cron = o["cron"].as_str().ok_or("schedule needs `cron`")?;
            croner_check(cron)?;
            let mut t = json!({"_type": "schedule", "cronExpression": cron,
                "timezone": o["timezone"].as_str().unwrap_or("UTC")});
            if let Some(d) = o["description"].as_str() {
                t["description"] = d.into();
            }
            out.push(t);
        }
        _ => unreachable!("refused above"),
    }
    Ok(out)
}

/// Five or six space-separated cron fields; the orchestrator's cron parser checks the rest.
fn croner_check(cron: &str) -> Result<(), String> {
    let fields = cron.split_whitespace().count();
    if (5..=6).contains(&fields) {
        Ok(())
    } else {
        Err(format!(
            "schedule cron `{cron}` has {fields} fields; it takes 5 (or 6 with seconds)"
        ))
    }
}

/// A label matcher from how a label is written: `/re/flags`, a glob, or exact.
fn label_matcher(label: &str) -> Value {
    if let Some((source, flags)) = regex_literal(label) {
        return json!({"kind": "regex", "source": source, "flags": flags});
    }
    if label.contains(['*', '?', '[', ']', '{', '}']) {
        return json!({"kind": "regex", "source": glob_to_regex(label), "flags": ""});
    }
    json!({"kind": "exact", "value": label})
}

/// A glob over a label as an anchored regex: `*` and `**` any run of characters (labels have
/// no path separators), `?` one, `[…]` a class, `{a,b}` alternatives.
fn glob_to_regex(glob: &str) -> String {
    let mut re = String::from("^");
    let mut in_braces = 0;
    for c in glob.chars() {
        match c {
            '*' => {
                if !re.ends_with(".*") {
                    re.push_str(".*");
                }
            }
            '?' => re.push('.'),
            '[' | ']' => re.push(c),
            '{' => {
                in_braces += 1;
                re.push_str("(?:");
            }
            '}' if in_braces > 0 => {
                in_braces -= 1;
                re.push(')');
            }
            ',' if in_braces > 0 => re.push('|'),
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    re
}

fn compile_job(name: &str, job: JobYaml) -> Result<Value, String> {
    let (labels, exclude, pick) = match job.runs_on {
        None => return Err("`runsOn` is required (a label, a list, or {labels, exclude})".into()),
        Some(RunsOnYaml::One(l)) => (vec![l], Vec::new(), None),
        Some(RunsOnYaml::All(ls)) => (ls, Vec::new(), None),
        Some(RunsOnYaml::Full {
            labels,
            exclude,
            pick,
        }) => (labels.into_vec(), exclude, pick),
    };
    if labels.is_empty() {
        return Err("`runsOn` names no label".into());
    }
    let mut steps = Vec::new();
    match (job.steps, job.run) {
        (Some(_), Some(_)) => return Err("`steps` and `run` cannot both be set".into()),
        (None, None) => return Err("a job needs `steps` or `run`".into()),
        (None, Some(run)) => steps.push(json!({"name": name, "hasOutputs": false, "run": run})),
        (Some(list), None) => {
            if list.is_empty() {
                return Err("`steps` is empty".into());
            }
            // One counter names unnamed steps across the job, parallel children included (§2.4).
            let mut counter = 0;
            let mut parallels = 0;
            for entry in list {
                match entry {
                    StepEntryYaml::Step(s) => steps.push(compile_step(s, &mut counter)),
                    StepEntryYaml::Parallel { parallel } => {
                        parallels += 1;
                        if parallel.steps.is_empty() {
                            return Err("a parallel group needs steps".into());
                        }
                        let children: Vec<Value> = parallel
                            .steps
                            .into_iter()
                            .map(|s| compile_step(s, &mut counter))
                            .collect();
                        let mut group = json!({
                            "kind": "parallel",
                            "name": parallel.name.unwrap_or_else(|| format!("parallel-{parallels}")),
                            "failFast": parallel.fail_fast.unwrap_or(true),
                            "children": children,
                        });
                        if let Some(m) = parallel.max_parallel {
                            if m == 0 {
                                return Err("maxParallel must be at least 1".into());
                            }
                            group["maxParallel"] = m.into();
                        }
                        steps.push(group);
                    }
                }
            }
        }
    }
    let needs: Vec<Value> = job
        .needs
        .into_iter()
        .map(|n| match n {
            NeedYaml::Name(n) => Ok(Value::String(n)),
            NeedYaml::Full { name, when: None } => Ok(Value::String(name)),
            NeedYaml::Full {
                name,
                when: Some(when),
            } => Ok(json!({"name": name, "runOn": run_on(when)?})),
        })
        .collect::<Result<_, String>>()?;
    let mut out = Map::new();
    out.insert("_type".into(), "static".into());
    out.insert("name".into(), name.into());
    out.insert(
        "runsOn".into(),
        labels
            .iter()
            .map(|l| label_matcher(l))
            .collect::<Vec<_>>()
            .into(),
    );
    if !exclude.is_empty() {
        out.insert(
            "excludeLabels".into(),
            exclude
                .iter()
                .map(|l| label_matcher(l))
                .collect::<Vec<_>>()
                .into(),
        );
    }
    out.insert(
        "runsOnPick".into(),
        pick.unwrap_or_else(|| "deterministic".into()).into(),
    );
    out.insert("needs".into(), needs.into());
    out.insert("steps".into(), steps.into());
    if let Some(matrix) = job.matrix {
        let values = match matrix {
            Value::Array(_) | Value::Object(_) => matrix,
            _ => return Err("`matrix` is a list of values or a mapping of axes to lists".into()),
        };
        out.insert(
            "matrix".into(),
            json!({"_type": "static", "values": stringify_matrix(values)?}),
        );
    }
    if let Some(i) = job.include {
        out.insert("include".into(), serde_json::to_value(i).expect("strings"));
    }
    if let Some(e) = job.exclude {
        out.insert("exclude".into(), serde_json::to_value(e).expect("strings"));
    }
    if let Some(env) = job.env {
        out.insert("env".into(), serde_json::to_value(env).expect("strings"));
    }
    if let Some(t) = job.timeout {
        out.insert("timeout".into(), t.into());
    }
    if let Some(g) = job.concurrency_group {
        out.insert("concurrencyGroup".into(), g.into());
    }
    if let Some(d) = job.description {
        out.insert("description".into(), d.into());
    }
    if let Some(c) = job.checkout {
        out.insert("checkout".into(), c.into());
    }
    Ok(Value::Object(out))
}

/// Matrix values as strings (YAML `[18, 20]` are numbers; the lock holds strings).
fn stringify_matrix(values: Value) -> Result<Value, String> {
    let list = |v: Value| -> Result<Value, String> {
        let Value::Array(items) = v else {
            return Err("a matrix axis is a list".into());
        };
        items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => Ok(Value::String(s)),
                Value::Number(n) => Ok(Value::String(n.to_string())),
                Value::Bool(b) => Ok(Value::String(b.to_string())),
                _ => Err("matrix values are strings, numbers or booleans".into()),
            })
            .collect::<Result<Vec<_>, String>>()
            .map(Value::Array)
    };
    match values {
        Value::Object(axes) => axes
            .into_iter()
            .map(|(k, v)| Ok((k, list(v)?)))
            .collect::<Result<Map<_, _>, String>>()
            .map(Value::Object),
        other => list(other),
    }
}

fn run_on(when: WhenYaml) -> Result<Vec<String>, String> {
    Ok(match when {
        WhenYaml::Keyword(k) => match k.as_str() {
            "on-success" => vec!["success".into()],
            "always" => ALL_TERMINAL.iter().map(|s| s.to_string()).collect(),
            "on-skip" => vec!["success".into(), "skipped".into()],
            "on-failure" => vec!["failed".into(), "timed_out_stale".into()],
            other => {
                return Err(format!(
                    "`when: {other}` is not on-success, always, on-skip, on-failure or a list"
                ));
            }
        },
        WhenYaml::Statuses(list) => {
            if let Some(bad) = list.iter().find(|s| !ALL_TERMINAL.contains(&s.as_str())) {
                return Err(format!("`{bad}` is not a terminal job status"));
            }
            list
        }
    })
}

fn compile_step(step: StepYaml, counter: &mut u32) -> Value {
    *counter += 1;
    let mut s = json!({
        "name": step.name.unwrap_or_else(|| format!("step-{counter}")),
        "hasOutputs": false,
        "run": step.run,
    });
    if let Some(t) = step.timeout {
        s["timeout"] = t.into();
    }
    if let Some(n) = step.retry.filter(|n| *n > 1) {
        s["retry"] = json!({"maxAttempts": n, "delayMs": 1000, "backoff": "exponential",
            "maxDelayMs": 30000});
    }
    if step.continue_on_error {
        s["continueOnError"] = true.into();
    }
    s
}

#[cfg(test)]
mod tests;
