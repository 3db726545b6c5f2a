//! Cloud Agent sessions (reference system §3): a session runs an AI coding agent on a
//! repository inside a sandbox, streams what it does as ordered events, and reports terminal
//! transitions to a callback.
//!
//! - [`ids`]: session, execution and sandbox ids; the filesystem layout; branch names.
//! - [`sandbox`]: the providers (`local` bubblewrap, `process`) behind [`sandbox::SandboxProvider`].
//! - [`git`]: clone, commit and push with the token only in an HTTP header.
//! - [`session`]: the session actor (executions, state machine, event log, history, reaper).
//! - [`harness`]: the built-in tool-calling agent and the external CLI harness.
//! - [`mask`]: secret values masked in everything recorded or sent to the model.
//! - [`runner`]: one execution from sandbox to terminal event.
//! - [`callback`]: the callback queue's consumer.
//! - [`service`]: [`Agents`], what the HTTP API calls.

pub mod callback;
pub mod git;
pub mod harness;
pub mod ids;
pub mod mask;
pub mod runner;
pub mod sandbox;
mod seccomp;
pub mod service;
pub mod session;

pub use service::{
    AgentConfig, AgentError, Agents, BusyScope, CallbackTarget, Caller, EventFilter, EventFrame,
    FollowUp, ModelCatalog, PrepareRequest, Prepared, SessionExport, SessionSummary, SessionView,
    Started,
};
pub use session::{CompletionMessage, CompletionNotice};
