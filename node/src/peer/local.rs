//! [`PeerTransport`] inside one process: engines call each other directly, with faults injected per member.
//!
//! This is how the engine's guarantees are tested without IO (`engine/tests.rs`): every call of the Peer
//! service has its in-process twin here, counted per member and operation, and each member can be made
//! unreachable, slow, or refusing. Time is tokio's, so tests can run on a paused clock.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{HandoffBatch, HandoffReply, KeyResults, PeerError, PeerTransport, Pong, WriteEntry, key_names};
use crate::{engine::Engine, error::EngineError, keyspace::Value, ring::Member, store::Held};

/// A fault injected on calls *to* a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The member cannot be reached: calls fail at once, as a refused connection does.
    Unreachable,
    /// The member answers after this delay; calls whose deadline is shorter fail as timed out.
    Delay(Duration),
    /// The member is reached but rejects every call (as a node that is shutting down does).
    Refuse,
}

/// A Peer call, for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Owner-side load.
    Load,
    /// Owner-side store.
    Store,
    /// Owner-side removal.
    Remove,
    /// Invalidation of copies.
    Invalidate,
    /// Purge of a keyspace.
    Purge,
    /// Liveness.
    Ping,
    /// Entries moving owner (and leave notices).
    Handoff,
    /// Previous-owner lookups.
    Peek,
}

/// The engines of one in-process cluster, by address, with the faults and the call counts.
#[derive(Default)]
pub struct LocalNetwork {
    engines: Mutex<HashMap<String, std::sync::Weak<Engine>>>,
    faults: Mutex<HashMap<String, Fault>>,
    calls: Mutex<HashMap<(String, Op), usize>>,
}

impl LocalNetwork {
    /// An empty network.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The transport of the member `local` (its calls are made from that member).
    pub fn transport(self: &Arc<Self>, local: &Member, timeout: Duration) -> Arc<LocalTransport> {
        Arc::new(LocalTransport { network: Arc::clone(self), local: local.clone(), timeout })
    }

    /// Makes `engine` reachable at `address`.
    pub fn attach(&self, address: &str, engine: &Arc<Engine>) {
        self.engines.lock().insert(address.to_owned(), Arc::downgrade(engine));
    }

    /// Injects a fault on calls to the member named `name`; `None` heals it.
    pub fn set_fault(&self, name: &str, fault: Option<Fault>) {
        let mut faults = self.faults.lock();
        match fault {
            Some(f) => faults.insert(name.to_owned(), f),
            None => faults.remove(name),
        };
    }

    /// How many calls of `op` the member named `name` received (faulty ones included).
    pub fn calls(&self, name: &str, op: Op) -> usize {
        self.calls.lock().get(&(name.to_owned(), op)).copied().unwrap_or(0)
    }

    /// Forgets every count.
    pub fn reset_calls(&self) {
        self.calls.lock().clear();
    }

    /// Counts the call, applies the member's fault, and returns the engine to call.
    async fn reach(&self, peer: &Member, op: Op, deadline: Duration) -> Result<Arc<Engine>, PeerError> {
        *self.calls.lock().entry((peer.name.clone(), op)).or_default() += 1;
        let fail = |message: &str, timed_out: bool| PeerError {
            name: peer.name.clone(),
            address: peer.address.clone(),
            message: message.to_owned(),
            timed_out,
        };
        let fault = self.faults.lock().get(&peer.name).copied();
        match fault {
            Some(Fault::Unreachable) => return Err(fail("connection refused (injected)", false)),
            Some(Fault::Refuse) => return Err(fail("the node refused the call (injected)", false)),
            Some(Fault::Delay(d)) if d >= deadline => {
                tokio::time::sleep(deadline).await;
                return Err(fail("deadline exceeded (injected delay)", true));
            }
            Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
            None => {}
        }
        let engine = self.engines.lock().get(&peer.address).and_then(std::sync::Weak::upgrade);
        engine.ok_or_else(|| fail("no node at this address", false))
    }
}

/// The in-process transport of one member.
pub struct LocalTransport {
    network: Arc<LocalNetwork>,
    local: Member,
    timeout: Duration,
}

/// A batch-level failure of the callee becomes a per-key error, as the Peer service does.
fn per_key<T>(n: usize, r: Result<KeyResults<T>, EngineError>) -> KeyResults<T> {
    r.unwrap_or_else(|e| (0..n).map(|_| Err(e.clone())).collect())
}

#[async_trait]
impl PeerTransport for LocalTransport {
    async fn load(
        &self,
        peer: &Member,
        keyspace: &str,
        keys: Vec<Arc<str>>,
        timeout: Duration,
        forwarded: bool,
    ) -> Result<KeyResults<Value>, PeerError> {
        let engine = self.network.reach(peer, Op::Load, timeout).await?;
        let from = Some(self.local.clone());
        Ok(per_key(keys.len(), engine.load_for_peer(keyspace, &key_names(&keys), from, forwarded).await))
    }

    async fn store(
        &self,
        peer: &Member,
        keyspace: &str,
        entries: Vec<WriteEntry>,
        forwarded: bool,
    ) -> Result<KeyResults<()>, PeerError> {
        let engine = self.network.reach(peer, Op::Store, self.timeout * 2).await?;
        let n = entries.len();
        Ok(per_key(n, engine.store_for_peer(keyspace, entries, forwarded).await))
    }

    async fn remove(
        &self,
        peer: &Member,
        keyspace: &str,
        keys: Vec<Arc<str>>,
        forwarded: bool,
    ) -> Result<KeyResults<()>, PeerError> {
        let engine = self.network.reach(peer, Op::Remove, self.timeout * 2).await?;
        Ok(per_key(keys.len(), engine.remove_for_peer(keyspace, &key_names(&keys), forwarded).await))
    }

    async fn handoff(&self, peer: &Member, batch: HandoffBatch) -> Result<HandoffReply, PeerError> {
        let engine = self.network.reach(peer, Op::Handoff, self.timeout * 2).await?;
        let entries = batch.entries.into_iter().map(|(k, h)| (k, Some(h))).collect();
        Ok(engine
            .accept_handoff(
                &self.local.name,
                &batch.keyspace,
                entries,
                (batch.leaving, batch.admitted),
                batch.stale_before,
            )
            .await)
    }

    async fn peek(
        &self,
        peer: &Member,
        keyspace: &str,
        keys: Vec<Arc<str>>,
    ) -> Result<Vec<Option<Held>>, PeerError> {
        let engine = self.network.reach(peer, Op::Peek, self.timeout).await?;
        Ok(engine.peek(keyspace, &keys))
    }

    async fn invalidate(&self, peer: &Member, keyspace: &str, keys: Vec<Arc<str>>) -> Result<(), PeerError> {
        let engine = self.network.reach(peer, Op::Invalidate, self.timeout).await?;
        // An unknown keyspace holds no copies: nothing to invalidate is success (as on the Peer service).
        let _ = engine.invalidate(keyspace, &key_names(&keys));
        Ok(())
    }

    async fn purge(&self, peer: &Member, keyspace: &str, hot_only: bool) -> Result<(), PeerError> {
        let engine = self.network.reach(peer, Op::Purge, self.timeout).await?;
        let _ = engine.purge_local(keyspace, hot_only);
        Ok(())
    }

    async fn ping(&self, address: &str) -> Result<Pong, PeerError> {
        let engines: Vec<_> =
            self.network.engines.lock().iter().map(|(a, e)| (a.clone(), e.clone())).collect();
        let found = engines.into_iter().find(|(a, _)| a == address).and_then(|(_, e)| e.upgrade());
        let peer = found.map(|e| e.membership().local().clone());
        let peer = peer.unwrap_or_else(|| Member::new(address, address));
        let engine = self.network.reach(&peer, Op::Ping, self.timeout).await?;
        Ok(Pong { member: engine.membership().local().clone(), leaving: engine.is_leaving() })
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }
}
