//! Cloud Agent sessions (reference system §3): a session runs an AI coding agent on a
//! repository inside a sandbox.

pub mod ids;
pub mod sandbox;
