//! The orchestrator ↔ agent protocol (reference `kici.md` §6.2): JSON text frames over the
//! WebSocket the agent dials (`GET /api/ci/agent`, the agent token as a bearer credential in
//! the upgrade request, never in the URL), each an object tagged by `type` with the
//! reference's message names. The agent's first frame is `agent.register`; the orchestrator
//! answers `register.ack`, then sends `job.dispatch` and `job.cancel`; the agent reports
//! `job.ack`, `job.reject`, `job.status`, `step.status`, `log.chunk` and heartbeats.

use std::collections::BTreeMap;

use kilocloud_kici::lock::LockStepEntry;
use serde::{Deserialize, Serialize};

/// The protocol version both sides speak (`PROTOCOL_VERSION`).
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame either side accepts, bytes (§6: hard message cap 4 MiB).
pub const MAX_FRAME_BYTES: usize = 4 << 20;
/// Log lines a step may stream before the rest is dropped, bytes (`KICI_MAX_LOG_SIZE_BYTES`).
pub const DEFAULT_MAX_LOG_BYTES: u64 = 10 << 20;

/// Close code: the agent token was refused (4010, agent auth failed).
pub const CLOSE_AUTH_FAILED: u16 = 4010;
/// Close code: no `agent.register` in time (4002).
pub const CLOSE_REGISTER_TIMEOUT: u16 = 4002;
/// Close code: a frame that is not a protocol message (4003).
pub const CLOSE_INVALID_MESSAGE: u16 = 4003;
/// Close code: no frame for too long (4004, heartbeat timeout).
pub const CLOSE_HEARTBEAT_TIMEOUT: u16 = 4004;

/// A job dispatched or in flight: the run and the job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRef {
    /// The run (UUID).
    pub run_id: String,
    /// The job (UUID).
    pub job_id: String,
}

/// What an agent needs to run a job (`jobConfig` of `job.dispatch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    /// The workflow.
    pub workflow: String,
    /// The job's display name (`test (node=18)` for a matrix child).
    pub name: String,
    /// Its steps, as in the lock file (each with `run`).
    pub steps: Vec<LockStepEntry>,
    /// Environment of every step: the job's `env`, then `KICI_*` facts and the matrix as
    /// `MATRIX_<AXIS>`.
    pub env: BTreeMap<String, String>,
    /// The matrix combination (empty without a matrix).
    pub matrix: BTreeMap<String, String>,
    /// Whole-job wall clock, ms (`None`: only step limits).
    pub timeout_ms: Option<u64>,
    /// Clone the repository first (default true).
    pub checkout: bool,
}

/// Orchestrator → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ToAgent {
    /// The registration is accepted.
    #[serde(rename = "register.ack")]
    RegisterAck {
        /// The agent's id.
        #[serde(rename = "agentId")]
        agent_id: String,
        /// Its labels, the `kici:` ones included.
        labels: Vec<String>,
    },
    /// Run a job.
    #[serde(rename = "job.dispatch", rename_all = "camelCase")]
    JobDispatch {
        /// Unique per dispatch.
        message_id: String,
        /// Run and job.
        #[serde(flatten)]
        job: JobRef,
        /// HTTPS clone URL.
        repo_url: String,
        /// The ref the event names (`refs/heads/main`).
        #[serde(rename = "ref")]
        git_ref: String,
        /// The commit to check out.
        sha: String,
        /// What to run.
        job_config: Box<JobSpec>,
        /// A short-lived clone token, sent as an HTTP header by git, never in the URL.
        #[serde(skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// Per-step log cap, bytes.
        max_log_size_bytes: u64,
    },
    /// Stop a job: SIGTERM, then SIGKILL after the grace (immediately when `force`).
    #[serde(rename = "job.cancel", rename_all = "camelCase")]
    JobCancel {
        /// Run and job.
        #[serde(flatten)]
        job: JobRef,
        /// Why.
        reason: String,
        /// Skip the grace.
        force: bool,
    },
    /// A protocol error; the socket closes after it.
    #[serde(rename = "error")]
    Error {
        /// Machine-readable.
        code: String,
        /// For people.
        message: String,
    },
}

/// A job's state as an agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportedJobState {
    /// Started (after the clone).
    Running,
    /// Every step passed (or failed with `continueOnError`).
    Success,
    /// A step failed, the clone failed, or the job timed out.
    Failed,
    /// Stopped by `job.cancel`.
    Cancelled,
}

/// A step's state as an agent reports it (§5: step statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Started.
    Running,
    /// Exited 0.
    Success,
    /// Exited non-zero, or timed out.
    Failed,
    /// Not run (an earlier failure, or a failed parallel sibling with failFast).
    Skipped,
    /// Stopped by a cancel.
    Cancelled,
}

/// Agent → orchestrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum FromAgent {
    /// First frame.
    #[serde(rename = "agent.register", rename_all = "camelCase")]
    Register {
        /// Stable across restarts of one agent.
        agent_id: String,
        /// User labels (never `kici:`) and the agent's `kici:os|arch|host` labels.
        labels: Vec<String>,
        /// Jobs at once (default 1).
        #[serde(default = "one")]
        max_concurrency: u32,
        /// Jobs this process still runs (after a reconnect).
        #[serde(default)]
        in_flight_jobs: Vec<JobRef>,
        /// Host name.
        #[serde(default)]
        hostname: String,
        /// Agent version.
        #[serde(default)]
        version: String,
        /// Protocol version.
        #[serde(default = "protocol_version")]
        protocol_version: u32,
    },
    /// A dispatch was taken.
    #[serde(rename = "job.ack", rename_all = "camelCase")]
    JobAck {
        /// Run and job.
        #[serde(flatten)]
        job: JobRef,
    },
    /// A dispatch was refused (`busy`, `draining`).
    #[serde(rename = "job.reject", rename_all = "camelCase")]
    JobReject {
        /// Run and job.
        #[serde(flatten)]
        job: JobRef,
        /// Why.
        reason: String,
    },
    /// A job's state.
    #[serde(rename = "job.status", rename_all = "camelCase")]
    JobStatus {
        /// Run and job.
        #[serde(flatten)]
        job: JobRef,
        /// The state.
        state: ReportedJobState,
        /// Why it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A step's state.
    #[serde(rename = "step.status", rename_all = "camelCase")]
    StepStatus {
        /// Run and job.
        #[serde(flatten)]
        job: JobRef,
        /// Flat index across the job (parallel children included).
        step_index: u32,
        /// Its name.
        step_name: String,
        /// The state.
        state: StepState,
        /// Exit status when it ended.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        /// Run time, ms, when it ended.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
        /// Why it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Output lines of a step (batched: 50 lines or 100 ms).
    #[serde(rename = "log.chunk", rename_all = "camelCase")]
    LogChunk {
        /// Run and job.
        #[serde(flatten)]
        job: JobRef,
        /// The step (−1 before the first).
        step_index: i32,
        /// The lines, without newlines.
        lines: Vec<String>,
    },
    /// A running job is alive (every 60 s).
    #[serde(rename = "job.heartbeat", rename_all = "camelCase")]
    JobHeartbeat {
        /// Run and job.
        #[serde(flatten)]
        job: JobRef,
    },
    /// The connection is alive (every 30 s).
    #[serde(rename = "heartbeat")]
    Heartbeat {
        /// Agent clock, ms since epoch.
        timestamp: i64,
    },
}

fn one() -> u32 {
    1
}

fn protocol_version() -> u32 {
    PROTOCOL_VERSION
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn messages_use_the_reference_names_and_shapes() {
        let status: FromAgent = serde_json::from_value(json!({
            "type": "job.status", "runId": "r", "jobId": "j", "state": "failed", "error": "x"
        }))
        .unwrap();
        assert_eq!(
            status,
            FromAgent::JobStatus {
                job: JobRef {
                    run_id: "r".into(),
                    job_id: "j".into()
                },
                state: ReportedJobState::Failed,
                error: Some("x".into()),
            }
        );
        let register: FromAgent = serde_json::from_value(
            json!({"type": "agent.register", "agentId": "a", "labels": ["x"]}),
        )
        .unwrap();
        let FromAgent::Register {
            max_concurrency,
            protocol_version,
            ..
        } = register
        else {
            unreachable!()
        };
        assert_eq!((max_concurrency, protocol_version), (1, 1));
        let cancel = serde_json::to_value(ToAgent::JobCancel {
            job: JobRef {
                run_id: "r".into(),
                job_id: "j".into(),
            },
            reason: "cancelled by a user".into(),
            force: false,
        })
        .unwrap();
        assert_eq!(
            cancel,
            json!({"type": "job.cancel", "runId": "r", "jobId": "j",
                   "reason": "cancelled by a user", "force": false})
        );
        assert!(serde_json::from_value::<FromAgent>(json!({"type": "job.explode"})).is_err());
    }
}
