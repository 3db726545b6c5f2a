//! The callback consumer: POSTs a terminal transition to the session's callback target with
//! its headers and a 10 s timeout. Network errors, 429 and 5xx are retried through the queue
//! (5 deliveries, backoff 60·2^(n−1) s: 60, 120, 240, 480) and then dead-lettered; any other
//! status is final and acknowledged (reference §3 "Callback queue", plus the dead-letter queue
//! the reference lacks). Targets are checked twice: a private address literal is refused
//! before sending, and the client's resolver refuses names that resolve to one at connect
//! time (`kilocloud_identity::net::GuardedResolver`); both refusals are final.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use kilocloud_identity::Identity;
use kilocloud_substrate::{Consumer, Delivery, Error, Result};

use crate::session::CallbackJob;

/// Timeout of one callback POST.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Delivers callback jobs.
pub struct CallbackConsumer {
    identity: Identity,
    http: reqwest::Client,
    allow_private: bool,
}

impl CallbackConsumer {
    /// A consumer opening sealed headers with `identity`; targets on private addresses (by
    /// literal or by resolution) are refused unless `allow_private`.
    pub fn new(identity: Identity, allow_private: bool) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(kilocloud_identity::net::guarded_resolver(allow_private))
            .timeout(CALLBACK_TIMEOUT)
            .build()
            .expect("an HTTP client builds");
        Self {
            identity,
            http,
            allow_private,
        }
    }
}

#[async_trait]
impl Consumer for CallbackConsumer {
    async fn handle(&self, delivery: &Delivery) -> Result<()> {
        let job: CallbackJob = delivery.body()?;
        let session = &job.payload.session_id;
        if !self.allow_private && kilocloud_identity::net::private_url(&job.target.url) {
            tracing::warn!(%session, "callback target is a private address; dropped");
            return Ok(());
        }
        let headers: BTreeMap<String, String> = match &job.target.headers {
            Some(sealed) => {
                let bytes = self
                    .identity
                    .open(sealed, &job.seal_context)
                    .map_err(|e| Error::Handler(format!("cannot open callback headers: {e}")))?;
                serde_json::from_slice(&bytes)?
            }
            None => BTreeMap::new(),
        };
        let mut request = self.http.post(&job.target.url).json(&job.payload);
        for (name, value) in &headers {
            request = request.header(name, value);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => {
                let status = response.status();
                if status.as_u16() == 429 || status.is_server_error() {
                    Err(Error::Handler(format!("callback answered {status}")))
                } else {
                    tracing::warn!(%session, %status, attempt = delivery.attempts,
                        "callback refused; not retried");
                    Ok(())
                }
            }
            Err(e) if kilocloud_identity::net::is_private_refusal(&e) => {
                tracing::warn!(%session, error = %e.without_url(), "callback target resolves to a private address; dropped");
                Ok(())
            }
            // Never log the error's URL with headers; the URL itself carries no secret.
            Err(e) => Err(Error::Handler(format!(
                "callback failed: {}",
                if e.is_timeout() {
                    "timed out".to_owned()
                } else {
                    e.without_url().to_string()
                }
            ))),
        }
    }
}
