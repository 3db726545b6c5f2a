//! Key-value storage with TTL, for caches, dedup keys and cooldowns. Never the authority for
//! anything: a value may vanish when it expires or when an operator clears the table.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::clock::Clock;
use crate::error::Result;
use crate::store::Backend;

/// Most keys one [`Kv::list`] returns.
pub const KV_LIST_LIMIT: u32 = 1000;

/// The KV store. Values are JSON.
#[derive(Clone)]
pub struct Kv {
    backend: Arc<dyn Backend>,
    clock: Arc<dyn Clock>,
}

impl Kv {
    pub(crate) fn new(backend: Arc<dyn Backend>, clock: Arc<dyn Clock>) -> Self {
        Self { backend, clock }
    }

    /// The value of `key`, or `None` when absent or expired (expiry is judged by the substrate
    /// clock at read time, so a value is never returned after its TTL even before a sweep).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.backend
            .kv_get(key, self.clock.now_ms())
            .await?
            .map(|v| serde_json::from_slice(&v).map_err(Into::into))
            .transpose()
    }

    /// Stores `value` under `key`, replacing any value; it expires after `ttl` if given.
    pub async fn put<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let expires_at = ttl.map(|t| self.clock.now_ms() + t.as_millis() as i64);
        self.backend
            .kv_put(key, serde_json::to_vec(value)?, expires_at)
            .await
    }

    /// Deletes `key`; true if it existed (expired or not).
    pub async fn delete(&self, key: &str) -> Result<bool> {
        self.backend.kv_delete(key).await
    }

    /// Live keys starting with `prefix`, in byte order, at most [`KV_LIST_LIMIT`].
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.backend
            .kv_list(prefix, self.clock.now_ms(), KV_LIST_LIMIT)
            .await
    }

    /// Deletes expired entries; returns how many. Runs periodically in the background.
    pub async fn sweep(&self) -> Result<u64> {
        self.backend.kv_sweep(self.clock.now_ms()).await
    }
}
