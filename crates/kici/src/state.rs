//! The execution state machine of a job (reference `kici.md` §5): a pure function from a state
//! and an event to the next state, with 11 states (7 transient, 4 terminal) and 16 events; the
//! wider persisted job status set; and how a run's status follows from its jobs'.

use serde::{Deserialize, Serialize};

/// A job's state in the pure machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Created, not yet queued (needs unmet, or not yet dispatched).
    Pending,
    /// In the dispatch queue, waiting for an agent.
    Queued,
    /// Running on an agent.
    Running,
    /// Its agent disconnected; within the recovery window (§11).
    Recovering,
    /// Cancelled gracefully; its hooks are running.
    Cancelling,
    /// Held: waiting for an approval or a label match.
    Held,
    /// Waiting for a timer (a delay or a wave).
    Waiting,
    /// Terminal: succeeded.
    Success,
    /// Terminal: failed.
    Failed,
    /// Terminal: cancelled.
    Cancelled,
    /// Terminal: skipped (its needs did not allow it to run).
    Skipped,
}

/// Every state, in declaration order.
pub const JOB_STATES: [JobState; 11] = [
    JobState::Pending,
    JobState::Queued,
    JobState::Running,
    JobState::Recovering,
    JobState::Cancelling,
    JobState::Held,
    JobState::Waiting,
    JobState::Success,
    JobState::Failed,
    JobState::Cancelled,
    JobState::Skipped,
];

/// An event of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobEvent {
    /// Put on the dispatch queue.
    Enqueue,
    /// An agent started it (also: a recovering job's agent reconnected).
    Start,
    /// It finished successfully.
    Succeed,
    /// It failed (also: the recovery window expired, a cancel hook failed).
    Fail,
    /// Cancelled at once.
    Cancel,
    /// Cancelled with its cancel hooks run first.
    CancelGraceful,
    /// A graceful cancel cut short.
    CancelForce,
    /// A graceful cancel's hooks finished.
    Complete,
    /// Skipped (needs not satisfied).
    Skip,
    /// Its agent went away.
    Recover,
    /// Held for approval or labels.
    Hold,
    /// An approval was given.
    Approve,
    /// An approval was refused.
    Reject,
    /// A hold expired.
    Expire,
    /// Waiting for a timer.
    Wait,
    /// The timer fired.
    TimerDone,
}

/// Every event, in declaration order.
pub const JOB_EVENTS: [JobEvent; 16] = [
    JobEvent::Enqueue,
    JobEvent::Start,
    JobEvent::Succeed,
    JobEvent::Fail,
    JobEvent::Cancel,
    JobEvent::CancelGraceful,
    JobEvent::CancelForce,
    JobEvent::Complete,
    JobEvent::Skip,
    JobEvent::Recover,
    JobEvent::Hold,
    JobEvent::Approve,
    JobEvent::Reject,
    JobEvent::Expire,
    JobEvent::Wait,
    JobEvent::TimerDone,
];

impl JobState {
    /// Whether no event leaves this state: success, failed, cancelled, skipped.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Success | JobState::Failed | JobState::Cancelled | JobState::Skipped
        )
    }
}

/// An event that the state does not accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {from:?} job does not accept {event:?}")]
pub struct InvalidTransition {
    /// The state.
    pub from: JobState,
    /// The refused event.
    pub event: JobEvent,
}

/// The state after `event` in `state`: one of the reference's 25 legal transitions (§5).
///
/// Errors: [`InvalidTransition`] for every other pair, terminal states included.
pub fn transition(state: JobState, event: JobEvent) -> Result<JobState, InvalidTransition> {
    use JobEvent as E;
    use JobState as S;
    let next = match (state, event) {
        (S::Pending, E::Enqueue) => S::Queued,
        (S::Pending, E::Cancel) => S::Cancelled,
        (S::Pending, E::Skip) => S::Skipped,
        (S::Pending, E::Hold) => S::Held,
        (S::Pending, E::Wait) => S::Waiting,
        (S::Queued, E::Start) => S::Running,
        (S::Queued, E::Fail) => S::Failed,
        (S::Queued, E::Cancel) => S::Cancelled,
        (S::Running, E::Succeed) => S::Success,
        (S::Running, E::Fail) => S::Failed,
        (S::Running, E::Cancel) => S::Cancelled,
        (S::Running, E::CancelGraceful) => S::Cancelling,
        (S::Running, E::Recover) => S::Recovering,
        (S::Recovering, E::Start) => S::Running,
        (S::Recovering, E::Fail) => S::Failed,
        (S::Recovering, E::Cancel) => S::Cancelled,
        (S::Cancelling, E::CancelForce) => S::Cancelled,
        (S::Cancelling, E::Complete) => S::Cancelled,
        (S::Cancelling, E::Fail) => S::Failed,
        (S::Held, E::Approve) => S::Queued,
        (S::Held, E::Reject) => S::Cancelled,
        (S::Held, E::Expire) => S::Cancelled,
        (S::Held, E::Cancel) => S::Cancelled,
        (S::Waiting, E::TimerDone) => S::Queued,
        (S::Waiting, E::Cancel) => S::Cancelled,
        (from, event) => return Err(InvalidTransition { from, event }),
    };
    Ok(next)
}

/// A job's persisted status (§5, "Wire/DB status enums"): the machine's states without
/// `held` and `waiting` (persisted as `pending`), plus `timed_out_stale` (its agent vanished
/// past the recovery window; GitHub conclusion `timed_out`) and `drift_dropped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Not yet queued (also a held or waiting job).
    Pending,
    /// Queued.
    Queued,
    /// Running.
    Running,
    /// Within the recovery window.
    Recovering,
    /// Running its cancel hooks.
    Cancelling,
    /// Terminal.
    Success,
    /// Terminal.
    Failed,
    /// Terminal.
    Cancelled,
    /// Terminal.
    Skipped,
    /// Terminal: its agent vanished and the job was not recovered; counts as failed.
    TimedOutStale,
    /// Terminal: dropped because its check found no drift.
    DriftDropped,
}

impl JobStatus {
    /// Whether the status is final: the last six.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Success
                | JobStatus::Failed
                | JobStatus::Cancelled
                | JobStatus::Skipped
                | JobStatus::TimedOutStale
                | JobStatus::DriftDropped
        )
    }
}

impl From<JobState> for JobStatus {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Pending | JobState::Held | JobState::Waiting => JobStatus::Pending,
            JobState::Queued => JobStatus::Queued,
            JobState::Running => JobStatus::Running,
            JobState::Recovering => JobStatus::Recovering,
            JobState::Cancelling => JobStatus::Cancelling,
            JobState::Success => JobStatus::Success,
            JobState::Failed => JobStatus::Failed,
            JobState::Cancelled => JobStatus::Cancelled,
            JobState::Skipped => JobStatus::Skipped,
        }
    }
}

/// A run's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// No job has started.
    Pending,
    /// Some job is queued, running, recovering or cancelling, or some are done and others
    /// not.
    Running,
    /// Terminal: every job ended and none failed or was cancelled.
    Success,
    /// Terminal: some job failed or timed out stale.
    Failed,
    /// Terminal: some job was cancelled and none failed.
    Cancelled,
}

/// The status of a run whose jobs have `jobs` (§5, "Run aggregation"): while any job is not
/// terminal, `pending` (none started) or `running`; once all are, `failed` if any failed or
/// timed out stale (failed beats cancelled), else `cancelled` if any was cancelled, else
/// `success` (skipped and drift-dropped jobs do not fail a run). A run without jobs succeeds.
pub fn aggregate(jobs: impl IntoIterator<Item = JobStatus>) -> RunStatus {
    let (mut open, mut started, mut failed, mut cancelled) = (false, false, false, false);
    for status in jobs {
        match status {
            JobStatus::Pending => open = true,
            JobStatus::Queued
            | JobStatus::Running
            | JobStatus::Recovering
            | JobStatus::Cancelling => {
                open = true;
                started = true;
            }
            JobStatus::Failed | JobStatus::TimedOutStale => {
                failed = true;
                started = true;
            }
            JobStatus::Cancelled => {
                cancelled = true;
                started = true;
            }
            JobStatus::Success | JobStatus::Skipped | JobStatus::DriftDropped => started = true,
        }
    }
    match (open, started, failed, cancelled) {
        (true, false, ..) => RunStatus::Pending,
        (true, true, ..) => RunStatus::Running,
        (false, _, true, _) => RunStatus::Failed,
        (false, _, false, true) => RunStatus::Cancelled,
        (false, ..) => RunStatus::Success,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// The reference's table (§5), row by row.
    const LEGAL: [(JobState, JobEvent, JobState); 25] = {
        use JobEvent as E;
        use JobState as S;
        [
            (S::Pending, E::Enqueue, S::Queued),
            (S::Pending, E::Cancel, S::Cancelled),
            (S::Pending, E::Skip, S::Skipped),
            (S::Pending, E::Hold, S::Held),
            (S::Pending, E::Wait, S::Waiting),
            (S::Queued, E::Start, S::Running),
            (S::Queued, E::Fail, S::Failed),
            (S::Queued, E::Cancel, S::Cancelled),
            (S::Running, E::Succeed, S::Success),
            (S::Running, E::Fail, S::Failed),
            (S::Running, E::Cancel, S::Cancelled),
            (S::Running, E::CancelGraceful, S::Cancelling),
            (S::Running, E::Recover, S::Recovering),
            (S::Recovering, E::Start, S::Running),
            (S::Recovering, E::Fail, S::Failed),
            (S::Recovering, E::Cancel, S::Cancelled),
            (S::Cancelling, E::CancelForce, S::Cancelled),
            (S::Cancelling, E::Complete, S::Cancelled),
            (S::Cancelling, E::Fail, S::Failed),
            (S::Held, E::Approve, S::Queued),
            (S::Held, E::Reject, S::Cancelled),
            (S::Held, E::Expire, S::Cancelled),
            (S::Held, E::Cancel, S::Cancelled),
            (S::Waiting, E::TimerDone, S::Queued),
            (S::Waiting, E::Cancel, S::Cancelled),
        ]
    };

    #[test]
    fn every_state_and_event_pair_is_as_the_table_says() {
        let legal: HashSet<(JobState, JobEvent)> = LEGAL.iter().map(|(s, e, _)| (*s, *e)).collect();
        assert_eq!(legal.len(), 25, "no pair twice in the table");
        let mut refused = 0;
        for state in JOB_STATES {
            for event in JOB_EVENTS {
                match LEGAL.iter().find(|(s, e, _)| (*s, *e) == (state, event)) {
                    Some((_, _, to)) => assert_eq!(transition(state, event), Ok(*to)),
                    None => {
                        assert_eq!(
                            transition(state, event),
                            Err(InvalidTransition { from: state, event }),
                            "{state:?} + {event:?}"
                        );
                        refused += 1;
                    }
                }
            }
        }
        assert_eq!(refused, 11 * 16 - 25);
    }

    #[test]
    fn terminal_states_are_final_and_every_state_can_end() {
        for state in JOB_STATES {
            let outgoing = JOB_EVENTS
                .iter()
                .filter(|e| transition(state, **e).is_ok())
                .count();
            assert_eq!(state.is_terminal(), outgoing == 0, "{state:?}");
            // Cancel ends every transient state, directly or through cancelling.
            let mut reachable = vec![state];
            let mut seen = HashSet::new();
            while let Some(s) = reachable.pop() {
                if seen.insert(s) {
                    reachable.extend(JOB_EVENTS.iter().filter_map(|e| transition(s, *e).ok()));
                }
            }
            assert!(seen.iter().any(|s| s.is_terminal()), "{state:?} can end");
        }
        assert_eq!(JOB_STATES.iter().filter(|s| s.is_terminal()).count(), 4);
    }

    #[test]
    fn persisted_statuses_keep_terminality() {
        for state in JOB_STATES {
            assert_eq!(
                JobStatus::from(state).is_terminal(),
                state.is_terminal(),
                "{state:?}"
            );
        }
        assert!(JobStatus::TimedOutStale.is_terminal() && JobStatus::DriftDropped.is_terminal());
        assert_eq!(JobStatus::from(JobState::Held), JobStatus::Pending);
        // Wire names.
        assert_eq!(
            serde_json::to_value(JobStatus::TimedOutStale).unwrap(),
            "timed_out_stale"
        );
        assert_eq!(
            serde_json::to_value(JobEvent::CancelGraceful).unwrap(),
            "CANCEL_GRACEFUL"
        );
    }

    #[test]
    fn runs_aggregate_their_jobs() {
        use JobStatus as J;
        for (jobs, want) in [
            (vec![], RunStatus::Success),
            (vec![J::Pending, J::Pending], RunStatus::Pending),
            (vec![J::Success, J::Pending], RunStatus::Running),
            (vec![J::Queued], RunStatus::Running),
            (
                vec![J::Success, J::Skipped, J::DriftDropped],
                RunStatus::Success,
            ),
            (vec![J::Success, J::Failed], RunStatus::Failed),
            (vec![J::Cancelled, J::Failed], RunStatus::Failed),
            (vec![J::Cancelled, J::TimedOutStale], RunStatus::Failed),
            (vec![J::Cancelled, J::Success], RunStatus::Cancelled),
            (vec![J::Failed, J::Running], RunStatus::Running),
        ] {
            assert_eq!(aggregate(jobs.clone()), want, "{jobs:?}");
        }
    }
}
