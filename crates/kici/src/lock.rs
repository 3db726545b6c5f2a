//! The lock file `.kici/kici.lock.json` (reference `kici.md` §2): the only thing the
//! orchestrator reads to decide what to run. [`parse_lock_file`] reads it and checks what the
//! reference checks on fetch and at compile time (§2.7): the exact schema version, well-formed
//! label matchers whose regexes compile (the `regex` crate matches in linear time, so no
//! pattern can be a ReDoS), unique workflow and job names, a `needs` graph without missing
//! dependencies, self-references or cycles, and static matrices of at most
//! [`MAX_MATRIX_JOBS`] jobs. Fields this crate does not model are kept as they are
//! (`extra`), so real lock files of the reference format are accepted.
//!
//! Extension: a step may carry `run`, a shell script (workflows authored in YAML have no
//! TypeScript step functions to point at).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The lock file schema version this orchestrator reads; any other is refused (§2).
pub const SCHEMA_VERSION: u64 = 29;

/// Most jobs a static matrix may expand to (§2.7).
pub const MAX_MATRIX_JOBS: usize = 256;

/// Largest compiled regex of a label matcher, bytes (the `regex` crate's size limit).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A lock file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockFile {
    /// Exactly [`SCHEMA_VERSION`].
    pub schema_version: u64,
    /// The first workflow's source file and export.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Value>,
    /// sha256 of the schema version, source and workflows (hex).
    #[serde(default)]
    pub content_hash: String,
    /// The workflows.
    pub workflows: Vec<LockWorkflow>,
    /// Fields not modelled here.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A workflow (§2.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockWorkflow {
    /// Unique in the lock file (E107).
    pub name: String,
    /// Its triggers, tried in order (§2.5, §4); kept as JSON here.
    #[serde(default)]
    pub triggers: Vec<Value>,
    /// Its jobs.
    #[serde(default)]
    pub jobs: Vec<LockJobEntry>,
    /// Whole-run deadline, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Fields not modelled here.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A job entry: static, or generated at run time (§2.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "_type", rename_all = "lowercase")]
pub enum LockJobEntry {
    /// A job known at compile time.
    Static(Box<LockJob>),
    /// A job generator evaluated by an agent (`{source, group?, needs?}`).
    Dynamic(Map<String, Value>),
}

/// A static job (§2.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockJob {
    /// Unique in its workflow (E106).
    pub name: String,
    /// Labels an agent must match, all of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runs_on: Option<Vec<LabelMatcher>>,
    /// Labels an agent must match none of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclude_labels: Option<Vec<LabelMatcher>>,
    /// `deterministic` (default) or `any`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runs_on_pick: Option<String>,
    /// Host fan-out; mutually exclusive with `runsOn`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runs_on_all: Option<RunsOnAll>,
    /// Jobs (or groups) this one waits for.
    #[serde(default)]
    pub needs: Vec<Need>,
    /// Steps, in order.
    #[serde(default)]
    pub steps: Vec<LockStepEntry>,
    /// A static or dynamic matrix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matrix: Option<Matrix>,
    /// Combinations added to a static matrix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include: Option<Vec<BTreeMap<String, String>>>,
    /// Combinations removed from a static matrix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclude: Option<Vec<BTreeMap<String, String>>>,
    /// Job wall clock limit, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Fields not modelled here.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `runsOnAll`: an OR of AND-groups of matchers, minus excludes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunsOnAll {
    /// Agents matching every matcher of any group.
    pub include: Vec<Vec<LabelMatcher>>,
    /// Agents matching any of these are left out.
    #[serde(default)]
    pub exclude: Vec<LabelMatcher>,
}

/// A label matcher: `{kind: "exact", value}` or `{kind: "regex", source, flags}`. A plain
/// string is refused (§2.7: it protects against stale locks mis-routing jobs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LabelMatcher {
    /// The label equals `value`.
    Exact {
        /// The label.
        value: String,
    },
    /// The label matches the JavaScript regex `source` with `flags` (unanchored).
    Regex {
        /// The pattern.
        source: String,
        /// `i`, `m`, `s`, `u`, `g`, `y` (the last three change nothing for a test).
        #[serde(default)]
        flags: String,
    },
}

impl LabelMatcher {
    /// The compiled regex of a regex matcher.
    ///
    /// Errors: a message when the pattern does not compile or uses an unknown flag.
    pub fn regex(&self) -> Result<Option<regex::Regex>, String> {
        let LabelMatcher::Regex { source, flags } = self else {
            return Ok(None);
        };
        let mut builder = regex::RegexBuilder::new(source);
        builder.size_limit(REGEX_SIZE_LIMIT);
        for flag in flags.chars() {
            match flag {
                'i' => {
                    builder.case_insensitive(true);
                }
                'm' => {
                    builder.multi_line(true);
                }
                's' => {
                    builder.dot_matches_new_line(true);
                }
                'u' | 'g' | 'y' | 'd' => {}
                other => return Err(format!("unknown regex flag `{other}`")),
            }
        }
        builder
            .build()
            .map(Some)
            .map_err(|e| format!("regex /{source}/ is not usable: {e}"))
    }

    /// Whether `label` matches.
    pub fn matches(&self, label: &str) -> bool {
        match self {
            LabelMatcher::Exact { value } => value == label,
            LabelMatcher::Regex { .. } => self
                .regex()
                .ok()
                .flatten()
                .is_some_and(|r| r.is_match(label)),
        }
    }
}

/// What a job waits for: a job by name (default `runOn: ["success"]`), or a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Need {
    /// `"build"`.
    Name(String),
    /// `{name, runOn}`.
    Job {
        /// The job.
        name: String,
        /// The statuses that let this one run.
        #[serde(rename = "runOn", default)]
        run_on: Vec<String>,
    },
    /// `{group, runOn}`.
    Group {
        /// The dynamic group.
        group: String,
        /// The statuses that let this one run.
        #[serde(rename = "runOn", default)]
        run_on: Vec<String>,
    },
}

impl Need {
    /// The job this need names, if it names one.
    pub fn job(&self) -> Option<&str> {
        match self {
            Need::Name(n) | Need::Job { name: n, .. } => Some(n),
            Need::Group { .. } => None,
        }
    }
}

/// A step or a parallel group of steps (§2.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LockStepEntry {
    /// `{kind: "parallel", name, failFast, children}`.
    Parallel(ParallelStep),
    /// A step (`kind` absent or `sequential`).
    Step(LockStep),
}

/// A step (§2.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockStep {
    /// Unique in its job.
    pub name: String,
    /// Extension: the shell script this step runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Time limit, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// A failure does not fail the job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continue_on_error: bool,
    /// Fields not modelled here.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A group of steps run in parallel (no nesting).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParallelStep {
    /// Always `parallel`.
    pub kind: ParallelKind,
    /// Its name.
    pub name: String,
    /// The first failure cancels the others (default true).
    #[serde(default = "yes")]
    pub fail_fast: bool,
    /// The steps.
    pub children: Vec<LockStep>,
}

/// The `kind` of a parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParallelKind {
    /// `parallel`.
    Parallel,
}

fn yes() -> bool {
    true
}

/// A matrix: static (expanded by the orchestrator) or dynamic (by an agent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "_type", rename_all = "lowercase")]
pub enum Matrix {
    /// `values`: a list (one axis, `value`) or named axes.
    Static {
        /// The axes.
        values: MatrixValues,
    },
    /// Evaluated by an agent from `source`.
    Dynamic {
        /// Where its generator is.
        source: Value,
    },
}

/// A static matrix's values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MatrixValues {
    /// One axis.
    List(Vec<String>),
    /// Named axes.
    Axes(BTreeMap<String, Vec<String>>),
}

/// A lock file that cannot be used. The run it was fetched for is recorded as
/// `lockfile_corrupt` and the file is never cached (§2.7).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// Not JSON of the lock file's shape.
    #[error("the lock file is malformed: {0}")]
    Malformed(String),
    /// Another schema version.
    #[error(
        "the lock file has schema version {found}; this orchestrator reads exactly {SCHEMA_VERSION} (recompile it)"
    )]
    SchemaVersion {
        /// The version found.
        found: u64,
    },
    /// A label matcher's regex does not compile.
    #[error("workflow `{workflow}`, job `{job}`: {message}")]
    Label {
        /// Workflow.
        workflow: String,
        /// Job.
        job: String,
        /// Why.
        message: String,
    },
    /// E101: a need names no job of the workflow.
    #[error("E101 workflow `{workflow}`: job `{job}` needs `{missing}`, which does not exist")]
    MissingDependency {
        /// Workflow.
        workflow: String,
        /// Job.
        job: String,
        /// The need.
        missing: String,
    },
    /// E102: the needs form a cycle.
    #[error("E102 workflow `{workflow}`: the needs of jobs {jobs:?} form a cycle")]
    Cycle {
        /// Workflow.
        workflow: String,
        /// The jobs on or behind the cycle, sorted.
        jobs: Vec<String>,
    },
    /// E103: a job needs itself.
    #[error("E103 workflow `{workflow}`: job `{job}` needs itself")]
    SelfReference {
        /// Workflow.
        workflow: String,
        /// Job.
        job: String,
    },
    /// E106: two jobs of a workflow share a name.
    #[error("E106 workflow `{workflow}`: two jobs are named `{job}`")]
    DuplicateJob {
        /// Workflow.
        workflow: String,
        /// Job.
        job: String,
    },
    /// E107: two workflows share a name.
    #[error("E107 two workflows are named `{0}`")]
    DuplicateWorkflow(String),
    /// A job's shape breaks a rule (runsOn with runsOnAll, steps, matrix).
    #[error("workflow `{workflow}`, job `{job}`: {message}")]
    Job {
        /// Workflow.
        workflow: String,
        /// Job.
        job: String,
        /// Why.
        message: String,
    },
}

/// Reads and checks a lock file (see the module doc).
///
/// Errors: the first [`LockError`] found.
pub fn parse_lock_file(bytes: &[u8]) -> Result<LockFile, LockError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| LockError::Malformed(e.to_string()))?;
    // The version first: a lock of another version may not have this one's shape.
    let found = value["schemaVersion"]
        .as_u64()
        .ok_or_else(|| LockError::Malformed("schemaVersion is missing".into()))?;
    if found != SCHEMA_VERSION {
        return Err(LockError::SchemaVersion { found });
    }
    let lock: LockFile =
        serde_json::from_value(value).map_err(|e| LockError::Malformed(e.to_string()))?;
    let mut names = HashSet::new();
    for workflow in &lock.workflows {
        if !names.insert(workflow.name.as_str()) {
            return Err(LockError::DuplicateWorkflow(workflow.name.clone()));
        }
        check_workflow(workflow)?;
    }
    Ok(lock)
}

fn check_workflow(workflow: &LockWorkflow) -> Result<(), LockError> {
    let wf = || workflow.name.clone();
    let jobs: Vec<&LockJob> = workflow
        .jobs
        .iter()
        .filter_map(|j| match j {
            LockJobEntry::Static(job) => Some(&**job),
            LockJobEntry::Dynamic(_) => None,
        })
        .collect();
    let mut names = HashSet::new();
    for job in &jobs {
        if !names.insert(job.name.as_str()) {
            return Err(LockError::DuplicateJob {
                workflow: wf(),
                job: job.name.clone(),
            });
        }
    }
    for job in &jobs {
        check_job(&workflow.name, job)?;
        for need in job.needs.iter().filter_map(Need::job) {
            if need == job.name {
                return Err(LockError::SelfReference {
                    workflow: wf(),
                    job: job.name.clone(),
                });
            }
            if !names.contains(need) {
                return Err(LockError::MissingDependency {
                    workflow: wf(),
                    job: job.name.clone(),
                    missing: need.to_owned(),
                });
            }
        }
    }
    // Kahn's algorithm: what cannot be ordered is on a cycle or waits for one.
    let mut waiting: HashMap<&str, usize> = jobs
        .iter()
        .map(|j| {
            (
                j.name.as_str(),
                j.needs.iter().filter_map(Need::job).count(),
            )
        })
        .collect();
    let mut ready: Vec<&str> = waiting
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(j, _)| *j)
        .collect();
    let mut ordered = 0;
    while let Some(done) = ready.pop() {
        ordered += 1;
        for job in &jobs {
            if job.needs.iter().filter_map(Need::job).any(|n| n == done) {
                let count = waiting.get_mut(job.name.as_str()).expect("every job");
                *count -= job
                    .needs
                    .iter()
                    .filter_map(Need::job)
                    .filter(|n| *n == done)
                    .count();
                if *count == 0 {
                    ready.push(job.name.as_str());
                }
            }
        }
    }
    if ordered < jobs.len() {
        let mut stuck: Vec<String> = waiting
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(j, _)| j.to_owned())
            .collect();
        stuck.sort();
        return Err(LockError::Cycle {
            workflow: wf(),
            jobs: stuck,
        });
    }
    Ok(())
}

fn check_job(workflow: &str, job: &LockJob) -> Result<(), LockError> {
    let fail = |message: String| LockError::Job {
        workflow: workflow.to_owned(),
        job: job.name.clone(),
        message,
    };
    if job.runs_on.is_some() && job.runs_on_all.is_some() {
        return Err(fail("runsOn and runsOnAll cannot both be set".into()));
    }
    let matchers = job
        .runs_on
        .iter()
        .flatten()
        .chain(job.exclude_labels.iter().flatten())
        .chain(
            job.runs_on_all
                .iter()
                .flat_map(|a| a.include.iter().flatten().chain(&a.exclude)),
        );
    for matcher in matchers {
        matcher.regex().map_err(|message| LockError::Label {
            workflow: workflow.to_owned(),
            job: job.name.clone(),
            message,
        })?;
    }
    if let Some(pick) = &job.runs_on_pick
        && pick != "deterministic"
        && pick != "any"
    {
        return Err(fail(format!(
            "runsOnPick `{pick}` is neither deterministic nor any"
        )));
    }
    let mut steps = HashSet::new();
    for entry in &job.steps {
        let children: &[LockStep] = match entry {
            LockStepEntry::Step(step) => std::slice::from_ref(step),
            LockStepEntry::Parallel(group) => {
                if group.children.is_empty() {
                    return Err(fail(format!(
                        "parallel group `{}` has no steps",
                        group.name
                    )));
                }
                &group.children
            }
        };
        for step in children {
            if !steps.insert(step.name.as_str()) {
                return Err(fail(format!("two steps are named `{}`", step.name)));
            }
        }
    }
    if let Some(Matrix::Static { .. }) = &job.matrix {
        let n = expand_matrix(job).map_err(fail)?.len();
        if n > MAX_MATRIX_JOBS {
            return Err(fail(format!(
                "its matrix expands to {n} jobs; at most {MAX_MATRIX_JOBS} are allowed"
            )));
        }
    }
    Ok(())
}

/// The combinations of a job's static matrix: the product of its axes (a list is the axis
/// `value`), without those matching every key of an `exclude` entry, then each `include`
/// entry not already present added at the end. A job without a static matrix has one,
/// empty, combination.
///
/// Errors: a message when the product alone exceeds [`MAX_MATRIX_JOBS`] times 16 (it is
/// not built), or an axis is empty.
pub fn expand_matrix(job: &LockJob) -> Result<Vec<BTreeMap<String, String>>, String> {
    let Some(Matrix::Static { values }) = &job.matrix else {
        return Ok(vec![BTreeMap::new()]);
    };
    let axes: Vec<(String, &Vec<String>)> = match values {
        MatrixValues::List(list) => vec![("value".to_owned(), list)],
        MatrixValues::Axes(axes) => axes.iter().map(|(k, v)| (k.clone(), v)).collect(),
    };
    let mut size: usize = 1;
    for (name, values) in &axes {
        if values.is_empty() {
            return Err(format!("matrix axis `{name}` has no values"));
        }
        size = size.saturating_mul(values.len());
        if size > MAX_MATRIX_JOBS * 16 {
            return Err(format!(
                "its matrix expands to over {} jobs; at most {MAX_MATRIX_JOBS} are allowed",
                MAX_MATRIX_JOBS * 16
            ));
        }
    }
    let mut combos = vec![BTreeMap::new()];
    for (name, values) in &axes {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.insert(name.clone(), v.clone());
                    c
                })
            })
            .collect();
    }
    let matches = |combo: &BTreeMap<String, String>, entry: &BTreeMap<String, String>| {
        entry.iter().all(|(k, v)| combo.get(k) == Some(v))
    };
    let excludes = job.exclude.as_deref().unwrap_or_default();
    combos.retain(|c| !excludes.iter().any(|e| matches(c, e)));
    for include in job.include.as_deref().unwrap_or_default() {
        if !combos.contains(include) {
            combos.push(include.clone());
        }
    }
    Ok(combos)
}

#[cfg(test)]
mod tests;
