//! KiCI, the CI system of kilocloud (reference `kici.md`): the lock file `.kici/kici.lock.json`
//! and its validation ([`lock`]), the execution state machine of jobs with run aggregation
//! ([`state`]), trigger matching with its decision trace ([`trigger`]), and the GitHub
//! normalizer of webhook deliveries ([`github`]). Pure code: no I/O, no storage; the
//! orchestrator and agents build on it.

pub mod github;
pub mod lock;
pub mod state;
pub mod trigger;
pub mod workflow;

pub use github::{Normalized, normalize};
pub use lock::{LockError, LockFile, parse_lock_file};
pub use state::{
    InvalidTransition, JobEvent, JobState, JobStatus, RunStatus, aggregate, transition,
};
pub use trigger::{Decision, Event, TraceEntry, decide};
