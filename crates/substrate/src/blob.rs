//! Blob storage through the `object_store` crate: the local filesystem by default, any
//! S3-compatible bucket by configuration.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where blobs live. `Debug` leaves the S3 secret access key out.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BlobConfig {
    /// A directory on the local filesystem (created if missing).
    Local {
        /// Root directory.
        path: PathBuf,
    },
    /// An S3-compatible bucket.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Region, e.g. `us-east-1`.
        #[serde(default = "default_region")]
        region: String,
        /// Endpoint URL for S3-compatible services (MinIO, R2); AWS when unset.
        #[serde(default)]
        endpoint: Option<String>,
        /// Access key id; taken from the environment (`AWS_ACCESS_KEY_ID`) when unset.
        #[serde(default)]
        access_key_id: Option<String>,
        /// Secret access key; from `AWS_SECRET_ACCESS_KEY` when unset. Never logged.
        #[serde(default, skip_serializing)]
        secret_access_key: Option<String>,
        /// Allow plain-HTTP endpoints (local MinIO).
        #[serde(default)]
        allow_http: bool,
    },
}

impl std::fmt::Debug for BlobConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobConfig::Local { path } => f.debug_struct("Local").field("path", path).finish(),
            BlobConfig::S3 {
                bucket,
                region,
                endpoint,
                access_key_id,
                secret_access_key,
                allow_http,
            } => f
                .debug_struct("S3")
                .field("bucket", bucket)
                .field("region", region)
                .field("endpoint", endpoint)
                .field("access_key_id", access_key_id)
                .field(
                    "secret_access_key",
                    &secret_access_key.as_ref().map(|_| "***"),
                )
                .field("allow_http", allow_http)
                .finish(),
        }
    }
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

/// Metadata of a stored blob.
#[derive(Debug, Clone, Serialize)]
pub struct BlobMeta {
    /// Path within the store.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, ms since epoch.
    pub last_modified_ms: i64,
}

/// The blob store.
#[derive(Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
}

impl Blobs {
    /// Opens the store described by `config`.
    ///
    /// Errors: [`Error::Storage`] when the directory cannot be created or the S3 settings are
    /// incomplete.
    pub fn open(config: &BlobConfig) -> Result<Self> {
        let store: Arc<dyn ObjectStore> = match config {
            BlobConfig::Local { path } => {
                // Only the server's user may read the blobs (users' data).
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::create_dir_all(path)
                    .and_then(|()| {
                        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                    })
                    .map_err(|e| {
                        Error::Storage(format!(
                            "cannot create blob directory {}: {e}",
                            path.display()
                        ))
                    })?;
                Arc::new(object_store::local::LocalFileSystem::new_with_prefix(path)?)
            }
            BlobConfig::S3 {
                bucket,
                region,
                endpoint,
                access_key_id,
                secret_access_key,
                allow_http,
            } => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_allow_http(*allow_http);
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(k) = access_key_id {
                    b = b.with_access_key_id(k);
                }
                if let Some(s) = secret_access_key {
                    b = b.with_secret_access_key(s);
                }
                Arc::new(b.build()?)
            }
        };
        Ok(Self { store })
    }

    /// Writes `data` at `path` (slash-separated, relative), replacing any blob there.
    pub async fn put(&self, path: &str, data: Bytes) -> Result<()> {
        self.store.put(&parse(path)?, data.into()).await?;
        Ok(())
    }

    /// Reads the blob at `path`. Errors: [`Error::NotFound`].
    pub async fn get(&self, path: &str) -> Result<Bytes> {
        Ok(self.store.get(&parse(path)?).await?.bytes().await?)
    }

    /// Deletes the blob at `path` (absent is not an error).
    pub async fn delete(&self, path: &str) -> Result<()> {
        match self.store.delete(&parse(path)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Blobs under the directory-like `prefix` (`""` for all), in no particular order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>> {
        let prefix = if prefix.is_empty() {
            None
        } else {
            Some(parse(prefix)?)
        };
        let metas: Vec<_> = self.store.list(prefix.as_ref()).try_collect().await?;
        Ok(metas
            .into_iter()
            .map(|m| BlobMeta {
                path: m.location.to_string(),
                size: m.size,
                last_modified_ms: m.last_modified.timestamp_millis(),
            })
            .collect())
    }
}

fn parse(path: &str) -> Result<Path> {
    Path::parse(path).map_err(|e| Error::Invalid {
        what: "blob path",
        message: e.to_string(),
    })
}
