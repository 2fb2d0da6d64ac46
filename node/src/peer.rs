//! How the engine talks to other nodes. The trait keeps the engine free of transport types; `peer/grpc.rs` is
//! the implementation over the `distcache.v1.Peer` gRPC service.

pub mod grpc;
pub mod local;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{error::EngineError, keyspace::Value, ring::Member, store::Held};

/// Entries of one keyspace moving to the node that owns them now (see the Peer service's `Handoff`).
#[derive(Clone, Debug, Default)]
pub struct HandoffBatch {
    /// Keyspace (empty for a bare notice).
    pub keyspace: String,
    /// Keys with what the sender holds for them.
    pub entries: Vec<(Arc<str>, Held)>,
    /// The sender is leaving the cluster.
    pub leaving: bool,
    /// The receiver was just admitted to the sender's ring.
    pub admitted: bool,
    /// With `admitted`: entries of the receiver older than this version may have been deleted while it was out
    /// (longer than tombstones are kept); it drops them. 0 = nothing to drop.
    pub stale_before: u64,
}

/// What a handoff did on the receiver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandoffReply {
    /// Entries stored.
    pub applied: u32,
    /// Entries older than what the receiver held.
    pub ignored: u32,
}

/// A peer's answer to a ping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pong {
    /// Its name and the address to dial.
    pub member: Member,
    /// It is leaving the cluster (discovery drops it at once).
    pub leaving: bool,
}

/// One entry of a write.
#[derive(Clone, Debug)]
pub struct WriteEntry {
    /// Key.
    pub key: Arc<str>,
    /// Value.
    pub value: Bytes,
    /// TTL; `None` = the keyspace default.
    pub ttl: Option<Duration>,
}

/// A peer could not be reached, or failed at the transport level. Never an application outcome (those are
/// per-key results).
#[derive(Clone, Debug, thiserror::Error)]
#[error("peer {name} ({address}) {}: {message}", if *.timed_out { "did not answer in time" } else { "unreachable" })]
pub struct PeerError {
    /// Member name (or the address when the name is unknown).
    pub name: String,
    /// Address dialled.
    pub address: String,
    /// What failed.
    pub message: String,
    /// The peer may have been reached but did not answer before the deadline: it may still be working on the
    /// request, so callers must not treat it as down.
    pub timed_out: bool,
}

/// The keys of a peer call as the Peer service takes them.
fn key_names(keys: &[Arc<str>]) -> Vec<String> {
    keys.iter().map(ToString::to_string).collect()
}

/// Per-key outcomes of a batch sent to a peer.
pub type KeyResults<T> = Vec<Result<T, EngineError>>;

/// Calls on other nodes.
#[async_trait]
pub trait PeerTransport: Send + Sync + 'static {
    /// Owner-side get-or-fetch of keys, bounded by `timeout`, which must leave room for the owner's own fetch
    /// from the data source. A callee that does not own a key in its view forwards it once, unless `forwarded`.
    async fn load(
        &self,
        peer: &Member,
        keyspace: &str,
        keys: Vec<Arc<str>>,
        timeout: Duration,
        forwarded: bool,
    ) -> Result<KeyResults<Value>, PeerError>;
    /// Owner-side store, followed by the owner's invalidation of copies elsewhere (forwarded once, as `load`).
    async fn store(
        &self,
        peer: &Member,
        keyspace: &str,
        entries: Vec<WriteEntry>,
        forwarded: bool,
    ) -> Result<KeyResults<()>, PeerError>;
    /// Owner-side removal, followed by invalidation elsewhere (forwarded once, as `load`).
    async fn remove(
        &self,
        peer: &Member,
        keyspace: &str,
        keys: Vec<Arc<str>>,
        forwarded: bool,
    ) -> Result<KeyResults<()>, PeerError>;
    /// Entries moving to the peer, applied "newer wins"; also the leave notice.
    async fn handoff(&self, peer: &Member, batch: HandoffBatch) -> Result<HandoffReply, PeerError>;
    /// What the peer holds in memory for keys (no fetch, no forwarding): one answer per key.
    async fn peek(
        &self,
        peer: &Member,
        keyspace: &str,
        keys: Vec<Arc<str>>,
    ) -> Result<Vec<Option<Held>>, PeerError>;
    /// Drops copies of keys on the peer.
    async fn invalidate(&self, peer: &Member, keyspace: &str, keys: Vec<Arc<str>>) -> Result<(), PeerError>;
    /// Drops every entry of a keyspace on the peer (or only its hot copies).
    async fn purge(&self, peer: &Member, keyspace: &str, hot_only: bool) -> Result<(), PeerError>;
    /// Liveness and identity of the node at `address`.
    async fn ping(&self, address: &str) -> Result<Pong, PeerError>;
    /// Deadline of one peer call. Forwarded writes get twice as long: the owner bounds its own invalidation
    /// round by this deadline before it answers.
    fn timeout(&self) -> Duration;
    /// Drops whatever the transport keeps for addresses not in `keep` (connections to members that left: pods
    /// that were replaced come back at new addresses, so without this every old address would stay forever).
    fn retain_addresses(&self, keep: &std::collections::HashSet<String>) {
        let _ = keep;
    }
}
