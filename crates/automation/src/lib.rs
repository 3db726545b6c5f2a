//! Automation: events from the outside world turned into Cloud Agent work.
//!
//! - [`github`]: the GitHub App (webhook signatures, installation access tokens, REST calls).
//! - [`installations`]: which owner each GitHub App installation belongs to.
//! - [`webhook`]: `POST /api/github/webhook` ingest: verify, deduplicate, route.
//! - [`triggers`]: owner-scoped triggers fired by HTTP webhooks or cron schedules
//!   (reference §4, plus the schedules the reference lacks).
//! - [`review`]: code review of pull requests (reference §5).
//!
//! Every piece of coordination state is an actor; work crosses between them through queues
//! with dead-letter queues, and a session's end comes back through its completion notice.

pub mod findings;
pub mod github;
pub mod installations;
pub mod review;
pub mod triggers;
pub mod webhook;

use std::sync::{Arc, Weak};

use kilocloud_agent::{AgentError, Agents, Caller};
use kilocloud_identity::{Identity, Owner};
use kilocloud_substrate::Substrate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use github::{GitHubApp, GitHubConfig, GitHubError};
pub use review::{ReviewConfig, ReviewRecord, ReviewSettings, ReviewStatus};
pub use triggers::{TriggerConfig, TriggerRequest, TriggerSpec};

/// Settings of automation (`github.*` and `review.*` in the configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutomationConfig {
    /// The GitHub App.
    pub github: GitHubConfig,
    /// Code review.
    pub review: ReviewConfig,
}

/// An automation failure, mapped to HTTP by the server.
#[derive(Debug, thiserror::Error)]
pub enum AutomationError {
    /// Bad input (400).
    #[error("{0}")]
    Invalid(String),
    /// Unknown resource, or another owner's (404).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A conflicting state (409).
    #[error("{0}")]
    Conflict(String),
    /// Missing or wrong webhook credentials (401).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Not allowed for this caller (403).
    #[error("{0}")]
    Forbidden(String),
    /// Body over the limit (413).
    #[error("body is {size} bytes; the limit is {limit} bytes")]
    TooLarge {
        /// Bytes received (at least).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A content type triggers do not take (415).
    #[error("content type {0:?} is not accepted; send text or JSON")]
    UnsupportedMediaType(String),
    /// Too many requests of one trigger in flight (429).
    #[error("{in_flight} requests of this trigger are in flight; the limit is {limit}")]
    TooManyInFlight {
        /// Captured or in progress.
        in_flight: usize,
        /// The limit.
        limit: usize,
    },
    /// The feature is not configured on this server (503).
    #[error("{0}")]
    Disabled(&'static str),
    /// A service a delivery is handed to could not take it (503; GitHub redelivers).
    #[error("{0}")]
    Unavailable(String),
    /// GitHub failed (502, or 503 when transient).
    #[error(transparent)]
    GitHub(#[from] GitHubError),
    /// The Cloud Agent refused or failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A substrate failure.
    #[error(transparent)]
    Substrate(#[from] kilocloud_substrate::Error),
}

impl AutomationError {
    /// Whether a later attempt may pass: GitHub network failures, 429, 5xx and rate limits; a
    /// sandbox that is unavailable for now; a bound on concurrent executions; storage
    /// failures.
    pub fn is_transient(&self) -> bool {
        match self {
            AutomationError::GitHub(g) => g.is_transient(),
            AutomationError::Agent(AgentError::Unavailable { retryable, .. }) => *retryable,
            AutomationError::Agent(AgentError::Busy { .. }) | AutomationError::Unavailable(_) => {
                true
            }
            AutomationError::Agent(AgentError::Substrate(_)) | AutomationError::Substrate(_) => {
                true
            }
            _ => false,
        }
    }
}

/// A refusal by one of automation's actors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutomationRefusal {
    /// Unknown, or another owner's.
    NotFound,
    /// A conflicting state.
    Conflict(String),
}

impl AutomationRefusal {
    pub(crate) fn into_error(self, what: &'static str) -> AutomationError {
        match self {
            AutomationRefusal::NotFound => AutomationError::NotFound(what),
            AutomationRefusal::Conflict(m) => AutomationError::Conflict(m),
        }
    }
}

/// A failed piece of automation work, as a queue consumer or alarm reports it to the
/// substrate (which retries it).
impl From<AutomationError> for kilocloud_substrate::Error {
    fn from(e: AutomationError) -> Self {
        kilocloud_substrate::Error::Handler(e.to_string())
    }
}

/// The automation service. Cheap to clone.
#[derive(Clone)]
pub struct Automation {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) sub: Substrate,
    pub(crate) identity: Identity,
    pub(crate) agents: Agents,
    pub(crate) github: Option<GitHubApp>,
    pub(crate) config: AutomationConfig,
    pub(crate) sink: std::sync::OnceLock<Arc<dyn webhook::DeliverySink>>,
}

impl Automation {
    /// Registers automation's actors and queues on `sub` (before [`Substrate::start`]); call
    /// [`Automation::start`] after the substrate started.
    ///
    /// Errors: a message when the GitHub App is configured but its key or secrets are not
    /// usable.
    pub fn new(
        sub: &Substrate,
        identity: Identity,
        agents: Agents,
        config: AutomationConfig,
    ) -> Result<Self, String> {
        let github = GitHubApp::new(&config.github, sub, &identity)?;
        let inner = Arc::new(Inner {
            sub: sub.clone(),
            identity,
            agents,
            github,
            config,
            sink: std::sync::OnceLock::new(),
        });
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        installations::register(sub);
        webhook::register(sub);
        triggers::register(sub, weak.clone());
        review::register(sub, weak);
        Ok(Self { inner })
    }

    /// Starts the queue consumers (after [`Substrate::start`]).
    pub fn start(&self) {
        triggers::start(self);
        review::start(self);
    }

    /// Hands every verified, first-seen delivery of a claimed installation to `sink` as well
    /// (KiCI takes pushes, pull requests and the other events its triggers match). Set once,
    /// before [`Automation::start`]; a second call is ignored.
    pub fn set_delivery_sink(&self, sink: Arc<dyn webhook::DeliverySink>) {
        let _ = self.inner.sink.set(sink);
    }

    /// The GitHub App, when configured.
    pub fn github(&self) -> Option<&GitHubApp> {
        self.inner.github.as_ref()
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    pub(crate) fn github_or_disabled(&self) -> Result<&GitHubApp, AutomationError> {
        self.inner.github.as_ref().ok_or(AutomationError::Disabled(
            "the GitHub App is not configured on this server (github.app_id)",
        ))
    }

    /// The caller a piece of automation acts as: `user`, in `owner`'s scope. For an
    /// organization the user must still be a member.
    ///
    /// Errors: [`AutomationError::Forbidden`] when the user left the organization or no
    /// longer exists.
    pub(crate) async fn acting_caller(
        &self,
        owner: Owner,
        user: Uuid,
    ) -> Result<Caller, AutomationError> {
        let identity = &self.inner.identity;
        if identity.user(user).await.ok().flatten().is_none() {
            return Err(AutomationError::Forbidden(format!(
                "user {user}, who set this up, no longer exists"
            )));
        }
        let org = match owner {
            Owner::User(id) if id == user => None,
            Owner::User(_) => {
                return Err(AutomationError::Forbidden(
                    "a personal resource acts only as its user".into(),
                ));
            }
            Owner::Org(org) => {
                if identity.org_role(org, user).await.ok().flatten().is_none() {
                    return Err(AutomationError::Forbidden(format!(
                        "user {user}, who set this up, is no longer a member of organization {org}"
                    )));
                }
                Some(org)
            }
        };
        Ok(Caller {
            user,
            org,
            bot: None,
        })
    }
}

/// Upgrades an actor's handle on the service, or fails the call (the service is shutting
/// down).
pub(crate) fn upgrade(weak: &Weak<Inner>) -> kilocloud_substrate::Result<Automation> {
    weak.upgrade()
        .map(Automation::from_inner)
        .ok_or_else(|| kilocloud_substrate::Error::Handler("automation is shut down".into()))
}
