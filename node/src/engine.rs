//! The read-through engine: routes every operation to the owner of its key and runs the owner-side logic.
//!
//! - **Reads** ([`read`](self::read)). The owner answers from its main tier or loads the key from the keyspace's
//!   data source, once for all concurrent readers on that node (single flight). A non-owner answers from its hot
//!   tier (copies of remote keys, 1/8 of `maxBytes`, at most [`HOT_MAX_TTL`]) or asks the owner, also once per
//!   key for all its concurrent readers, so a cold key costs one fetch cluster-wide. A request that came from a
//!   peer is always served locally (never forwarded again), so nodes with different member lists cannot loop.
//!   When the owner cannot be reached, a non-owner fetches from the source itself and keeps the value in its hot
//!   tier.
//! - **Writes** ([`write`](self::write)). Put/Delete go to the owner, which applies them and then invalidates
//!   copies on every other member before answering, so after a successful write no node serves the old value.
//!   A member that cannot be reached turns the write into UNAVAILABLE naming it (the owner's own change stands).
//! - **Batches.** GetMany/PutMany/DeleteMany group keys by owner ([`routing`](self::routing)): one peer call per
//!   owner, results in request order, one result per key ([`Batch`](crate::batch::Batch)).
//! - **Admin** ([`admin`](self::admin)): purge, per-keyspace counters.
//!
//! Nothing on the request path takes a keyspace- or node-wide lock: keyspaces and the ring are `ArcSwap`
//! snapshots, cache tiers are sharded tables ([`crate::table`]), single flight is a sharded map, write/fill
//! races use striped epochs.
//!
//! The engine does no IO of its own: other nodes are behind [`PeerTransport`] (gRPC in production, the
//! in-process [`LocalNetwork`](crate::peer::local::LocalNetwork) in the unit tests) and data sources behind
//! [`DataSource`](crate::source::DataSource).

mod admin;
mod handoff;
mod read;
mod routing;
mod warmup;
mod write;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_protect;

use std::{collections::HashMap, sync::Arc, time::Duration};

pub use handoff::HandoffSettings;

#[cfg(doc)]
use crate::store::HOT_MAX_TTL;
use crate::{
    error::EngineError,
    keyspace::{KeyspaceRuntime, Keyspaces, Value},
    membership::Membership,
    metrics::Metrics,
    peer::{KeyResults, PeerError, PeerTransport, WriteEntry},
    ring::Member,
    store::Entry,
};

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;
/// Most keys in one batch call.
pub const MAX_BATCH: usize = 10_000;
/// Most callers outside this node's ring remembered as holders of copies at once (nodes that see this one before
/// it sees them, during a membership change); members are always remembered.
pub const MAX_OUTSIDE_HOLDERS: usize = 64;
/// Longest TTL accepted on a write.
pub const MAX_TTL: Duration = Duration::from_hours(366 * 24);

/// A key to load: the key, its hash, and the epoch of its stripe recorded *before* the cache lookup that missed,
/// so that a write landing anywhere after that lookup wins over the load's result.
type LoadKey = (Arc<str>, u64, u64);

/// The engine of one node.
pub struct Engine {
    keyspaces: Arc<Keyspaces>,
    membership: Arc<Membership>,
    transport: Arc<dyn PeerTransport>,
    metrics: Arc<Metrics>,
    /// Nodes that loaded keys from this node recently (they may hold hot copies), by name: address and when.
    /// Writes invalidate them too, so copies are dropped even on a node that this node's member list does not
    /// include yet (membership views differ while they converge).
    copy_holders: dashmap::DashMap<String, (String, std::time::Instant)>,
    /// Versions of entries (see [`crate::hlc`]).
    hlc: crate::hlc::Hlc,
    handoff: HandoffSettings,
    /// The member set discovery reported last (before removing the departed).
    discovered: parking_lot::Mutex<Vec<Member>>,
    /// Members that announced they are leaving, until discovery stops listing them (or the mark expires).
    departed: parking_lot::Mutex<HashMap<String, tokio::time::Instant>>,
    /// The ring before the last change, during the grace window (previous-owner reads).
    previous: arc_swap::ArcSwapOption<handoff::Previous>,
    /// Members that left this node's ring: when, and this node's clock then (see `HandoffBatch::stale_before`).
    dropped: parking_lot::Mutex<HashMap<String, (tokio::time::Instant, u64)>>,
    /// Serializes membership changes (each one's handoff runs before the next one starts).
    ring_change: tokio::sync::Mutex<()>,
    /// Set once the node has settled into the cluster: warm-ups run from then on.
    warm_ups: std::sync::atomic::AtomicBool,
}

/// Checks a key against the API limits.
pub fn validate_key(key: &str) -> Result<(), EngineError> {
    if key.is_empty() {
        return Err(EngineError::InvalidArgument("key must not be empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(EngineError::InvalidArgument(format!(
            "key is {} bytes, longer than the limit of {MAX_KEY_BYTES} bytes",
            key.len()
        )));
    }
    Ok(())
}

fn validate_batch(len: usize) -> Result<(), EngineError> {
    if len > MAX_BATCH {
        return Err(EngineError::InvalidArgument(format!(
            "batch of {len} keys is larger than the limit of {MAX_BATCH} keys"
        )));
    }
    Ok(())
}

fn validate_write(ks: &KeyspaceRuntime, e: &WriteEntry) -> Result<(), EngineError> {
    validate_key(&e.key)?;
    if e.value.len() as u64 > ks.config.max_value_bytes {
        return Err(EngineError::InvalidArgument(format!(
            "value is {} bytes, larger than keyspace {:?}'s maxValueBytes of {} bytes",
            e.value.len(),
            ks.config.name,
            ks.config.max_value_bytes
        )));
    }
    if e.ttl.is_some_and(|t| t > MAX_TTL) {
        return Err(EngineError::InvalidArgument(format!(
            "ttl is longer than the limit of {} days",
            MAX_TTL.as_secs() / 86_400
        )));
    }
    if e.ttl == Some(Duration::ZERO) {
        return Err(EngineError::InvalidArgument(
            "ttl must be positive (omit it for the keyspace default)".into(),
        ));
    }
    Ok(())
}

fn entry_to_value(entry: Entry) -> Result<Value, EngineError> {
    let ttl = entry.ttl_left();
    match entry.value {
        Some(bytes) => Ok(Value { bytes, ttl, stale: false }),
        None => Err(EngineError::NotFound),
    }
}

fn peer_unreachable(e: &PeerError) -> EngineError {
    EngineError::Unavailable(e.to_string())
}

/// The one result of a single-key call made through a batch path. Anything but exactly one result is a bug,
/// reported as INTERNAL (never as success).
fn single<T>(results: KeyResults<T>) -> Result<T, EngineError> {
    let n = results.len();
    let mut results = results.into_iter();
    match (results.next(), n) {
        (Some(r), 1) => r,
        _ => Err(EngineError::Internal(format!("a single-key call produced {n} results"))),
    }
}

impl Engine {
    /// An engine over keyspaces, membership and a peer transport.
    pub fn new(
        keyspaces: Arc<Keyspaces>,
        membership: Arc<Membership>,
        transport: Arc<dyn PeerTransport>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Self::with_handoff(keyspaces, membership, transport, metrics, HandoffSettings::default())
    }

    /// An engine with handoff settings.
    pub fn with_handoff(
        keyspaces: Arc<Keyspaces>,
        membership: Arc<Membership>,
        transport: Arc<dyn PeerTransport>,
        metrics: Arc<Metrics>,
        handoff: HandoffSettings,
    ) -> Arc<Self> {
        Arc::new(Self {
            keyspaces,
            membership,
            transport,
            metrics,
            copy_holders: dashmap::DashMap::new(),
            hlc: crate::hlc::Hlc::new(),
            handoff,
            discovered: parking_lot::Mutex::new(Vec::new()),
            departed: parking_lot::Mutex::new(HashMap::new()),
            previous: arc_swap::ArcSwapOption::empty(),
            dropped: parking_lot::Mutex::new(HashMap::new()),
            ring_change: tokio::sync::Mutex::new(()),
            warm_ups: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// True once the node is leaving (it got SIGTERM): it owns nothing and hands its entries off.
    pub fn is_leaving(&self) -> bool {
        self.membership.is_leaving()
    }

    /// The keyspaces.
    pub fn keyspaces(&self) -> &Arc<Keyspaces> {
        &self.keyspaces
    }

    /// The membership.
    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }

    /// Calls on other nodes.
    pub fn transport(&self) -> &Arc<dyn PeerTransport> {
        &self.transport
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether a caller of `Load` is remembered as a holder of copies: a current member (name and address), or
    /// one of a bounded number of callers outside the ring.
    fn may_hold_copies(&self, caller: &Member) -> bool {
        let ring = self.membership.ring();
        let members = ring.members();
        match members.iter().find(|r| r.name == caller.name) {
            // A member's name under another address is not that member.
            Some(member) => member.address == caller.address,
            None => {
                self.copy_holders.contains_key(&caller.name)
                    || self.copy_holders.len() < members.len() + MAX_OUTSIDE_HOLDERS
            }
        }
    }

    /// The callers remembered as holders of copies (name, address), for tests and diagnostics.
    pub fn copy_holders(&self) -> Vec<(String, String)> {
        self.copy_holders.iter().map(|e| (e.key().clone(), e.value().0.clone())).collect()
    }

    /// Checks the keyspace's `access` lists for a caller with `identities` (the SANs and CN of its client
    /// certificate; empty without one). A refusal is counted under `op` with `code="permission_denied"` and
    /// names the keyspace and the operation, never the lists. An unknown keyspace passes: the operation itself
    /// reports it.
    pub fn authorize(
        &self,
        keyspace: &str,
        op: &'static str,
        access: distcache_api::AccessOp,
        identities: &[String],
    ) -> Result<(), EngineError> {
        self.authorize_as(keyspace, op, access, identities, "no client certificate was presented")
    }

    /// [`Engine::authorize`], with what a refusal says when the caller has no identity (`anonymous`).
    pub fn authorize_as(
        &self,
        keyspace: &str,
        op: &'static str,
        access: distcache_api::AccessOp,
        identities: &[String],
        anonymous: &str,
    ) -> Result<(), EngineError> {
        // The common case, on every request: no keyspace has lists, so no lookup.
        if !self.keyspaces.any_access() {
            return Ok(());
        }
        let Some(ks) = self.keyspaces.get(keyspace) else {
            return Ok(());
        };
        match &ks.config.spec.access {
            Some(lists) if !lists.allows(access, identities) => {
                self.metrics.request(op, keyspace, crate::error::Code::PermissionDenied);
                let why = if identities.is_empty() { format!(" ({anonymous})") } else { String::new() };
                Err(EngineError::PermissionDenied(format!(
                    "keyspace {keyspace:?}: this client may not {} ({op}){why}",
                    access.as_str()
                )))
            }
            _ => Ok(()),
        }
    }

    fn keyspace(&self, name: &str) -> Result<Arc<KeyspaceRuntime>, EngineError> {
        self.keyspaces.get(name).ok_or_else(|| EngineError::UnknownKeyspace {
            name: name.to_owned(),
            known: self.keyspaces.names(),
        })
    }
}
