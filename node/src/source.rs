//! The data-source seam of the read-through engine.
//!
//! On a miss, the owner of a key asks the keyspace's [`DataSource`]. The engine neither knows nor cares what is
//! behind it: the WebAssembly hook runtime implements it, and tests plug in counting in-memory sources. A
//! [`SourceFactory`] builds the source of a keyspace from its spec when keyspaces are (re)loaded.

use std::{path::Path, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use distcache_api::ValidKeyspace;

use crate::hooks::HookError;

/// A value fetched from a data source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The value.
    pub value: Bytes,
    /// Entry TTL chosen by the source; `None` = the keyspace default.
    pub ttl: Option<Duration>,
}

/// Why a fetch failed, as the source reports it. Only `Unavailable`, `Timeout` and `Internal` are source
/// failures; `NotFound` and `InvalidKey` are answers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The source has no value for the key; `negative_ttl` overrides the keyspace's `negativeTtl`.
    #[error("not found")]
    NotFound {
        /// How long to cache the answer; `None` = the keyspace default.
        negative_ttl: Option<Duration>,
    },
    /// The source rejects the key.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// The backend is down or refused.
    #[error("source unavailable: {0}")]
    Unavailable(String),
    /// The source gave up waiting for its backend.
    #[error("source timed out")]
    Timeout,
    /// Anything else (a bug in the source, a trap of a hook).
    #[error("source failed: {0}")]
    Internal(String),
}

/// Loads values that are not in the cache. Implementations must be cheap to call concurrently: the engine
/// calls them from many requests at once (never twice at once for the same key on one node).
#[async_trait]
pub trait DataSource: Send + Sync + 'static {
    /// Fetches one key.
    async fn fetch(&self, key: &str) -> Result<Fetched, FetchError>;

    /// Fetches many keys in one call; returns one result per key, in order. The default fetches them
    /// concurrently one by one; sources with a batch API override it.
    async fn fetch_many(&self, keys: &[String]) -> Vec<Result<Fetched, FetchError>> {
        futures::future::join_all(keys.iter().map(|k| self.fetch(k))).await
    }

    /// What the source is, for `/admin/keyspaces` (a hook reports its module and pool); `Null` = nothing to say.
    fn describe(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// Why the data source of a keyspace could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildSourceError {
    /// The keyspace's hook could not be built.
    #[error(transparent)]
    BuildHook(#[from] HookError),
    /// The keyspace has a hook, but the node runs none.
    #[error(
        "the keyspace has a hook, but this node has no hook runtime; remove `hook` to use it as a cache-aside \
         keyspace"
    )]
    NoHookRuntime,
    /// A factory's own failure, as a message (the factories of embedders and tests); treated as transient.
    #[error("{0}")]
    Factory(String),
}

impl BuildSourceError {
    /// Whether building again from the same inputs may succeed (a module file not mounted yet, a failed
    /// download), so that a refused change is worth retrying. A factory's message is assumed to be.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::BuildHook(e) => e.is_transient(),
            Self::NoHookRuntime => false,
            Self::Factory(_) => true,
        }
    }
}

/// An error and its causes, `outer: cause: root cause`, for logs and status reports (error types here keep
/// their cause out of their own message).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Builds the data source of a keyspace from its validated spec (the `hook` field). Called on keyspaces
/// (re)loads for keyspaces that changed, or whose module files changed; an error refuses the whole reload.
#[async_trait]
pub trait SourceFactory: Send + Sync + 'static {
    /// `Ok(None)` for a keyspace without a hook (pure cache-aside). `base_dir` is the keyspaces file's directory,
    /// against which relative module paths resolve. A factory may return the source it built before when
    /// nothing it depends on changed (so warm state survives an unrelated change). The error says whether a
    /// retry may succeed ([`BuildSourceError::is_transient`]): the keyspaces loader retries only those.
    async fn build(
        &self,
        keyspace: &ValidKeyspace,
        base_dir: &Path,
    ) -> Result<Option<Arc<dyn DataSource>>, BuildSourceError>;

    /// Files the source of `keyspace` is built from (a hook's module file): when one of them changes, the
    /// keyspace is rebuilt although the keyspaces file did not change.
    fn watch_paths(&self, _keyspace: &ValidKeyspace, _base_dir: &Path) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
}

/// A factory consulted before another: `first` decides for the keyspaces it builds a source for, `then` for
/// the rest. Lets tests and embedders add sources next to the hook runtime.
pub struct Layered {
    /// Consulted first; `Ok(None)` passes the keyspace on.
    pub first: Arc<dyn SourceFactory>,
    /// The fallback.
    pub then: Arc<dyn SourceFactory>,
}

#[async_trait]
impl SourceFactory for Layered {
    async fn build(
        &self,
        keyspace: &ValidKeyspace,
        base_dir: &Path,
    ) -> Result<Option<Arc<dyn DataSource>>, BuildSourceError> {
        match self.first.build(keyspace, base_dir).await? {
            Some(source) => Ok(Some(source)),
            None => self.then.build(keyspace, base_dir).await,
        }
    }

    fn watch_paths(&self, keyspace: &ValidKeyspace, base_dir: &Path) -> Vec<std::path::PathBuf> {
        let mut paths = self.first.watch_paths(keyspace, base_dir);
        paths.extend(self.then.watch_paths(keyspace, base_dir));
        paths
    }
}

/// A factory without a hook runtime: keyspaces without a hook are accepted, a hook is refused with a clear
/// message. For embedders and tests that must not run WebAssembly.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;

#[async_trait]
impl SourceFactory for NoHooks {
    async fn build(
        &self,
        keyspace: &ValidKeyspace,
        _base_dir: &Path,
    ) -> Result<Option<Arc<dyn DataSource>>, BuildSourceError> {
        match keyspace.spec.hook {
            None => Ok(None),
            Some(_) => Err(BuildSourceError::NoHookRuntime),
        }
    }
}
