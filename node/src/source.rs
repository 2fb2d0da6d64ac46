//! The data-source seam of the read-through engine.
//!
//! On a miss, the owner of a key asks the keyspace's [`DataSource`]. The engine neither knows nor cares what is
//! behind it: the WebAssembly hook runtime implements it, and tests plug in counting in-memory sources. A
//! [`SourceFactory`] builds the source of a keyspace from its spec when keyspaces are (re)loaded.

use std::{path::Path, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use distcache_crds::ValidKeyspace;

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
}

/// Builds the data source of a keyspace from its validated spec (the `hook` field). Called on every keyspaces
/// (re)load for keyspaces whose hook changed; an error refuses the whole reload.
pub trait SourceFactory: Send + Sync + 'static {
    /// `Ok(None)` for a keyspace without a hook (pure cache-aside). `base_dir` is the keyspaces file's directory,
    /// against which relative module paths resolve.
    fn build(&self, keyspace: &ValidKeyspace, base_dir: &Path)
    -> Result<Option<Arc<dyn DataSource>>, String>;
}

/// The factory of a node without a hook runtime: keyspaces without a hook are accepted, a hook is refused with
/// a clear message (the hook runtime arrives with the `hooks` module).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;

impl SourceFactory for NoHooks {
    fn build(
        &self,
        keyspace: &ValidKeyspace,
        _base_dir: &Path,
    ) -> Result<Option<Arc<dyn DataSource>>, String> {
        match keyspace.spec.hook {
            None => Ok(None),
            Some(_) => Err(format!(
                "keyspace {:?} has a hook, but this node has no hook runtime; remove `hook` to use it as a \
                 cache-aside keyspace",
                keyspace.name
            )),
        }
    }
}
