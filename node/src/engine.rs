//! The read-through engine: routes every operation to the owner of its key and runs the owner-side logic.
//!
//! - **Reads.** The owner answers from its main tier or loads the key from the keyspace's data source, once
//!   for all concurrent readers on that node (single flight). A non-owner answers from its hot tier (copies of
//!   remote keys, 1/8 of `maxBytes`, at most [`HOT_MAX_TTL`]) or asks the owner, also once per key for all its
//!   concurrent readers, so a cold key costs one fetch cluster-wide. A request that came from a peer is always
//!   served locally (never forwarded again), so nodes with different member lists cannot loop. When the owner
//!   cannot be reached, a non-owner fetches from the source itself and keeps the value in its hot tier.
//! - **Writes.** Put/Delete go to the owner, which applies them and then invalidates copies on every other
//!   member before answering, so after a successful write no node serves the old value. A member that cannot
//!   be reached turns the write into UNAVAILABLE naming it (the owner's own change stands).
//! - **Batches.** GetMany/PutMany/DeleteMany group keys by owner: one peer call per owner, results in request
//!   order, one result per key.
//!
//! Nothing on the request path takes a keyspace- or node-wide lock: keyspaces and the ring are `ArcSwap`
//! snapshots, caches are moka (sharded), single flight is a sharded map, write/fill races use striped epochs.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{FutureExt, future::BoxFuture};

use crate::{
    error::{Code, EngineError},
    keyspace::{KeyspaceRuntime, Keyspaces, Value},
    membership::Membership,
    metrics::Metrics,
    peer::{KeyResults, PeerError, PeerTransport, WriteEntry},
    ring::{Member, Ring, key_hash},
    source::{DataSource, FetchError},
    store::{Entry, HOT_MAX_TTL, Tier},
};

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;
/// Most keys in one batch call.
pub const MAX_BATCH: usize = 10_000;
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
        Some(bytes) => Ok(Value { bytes, ttl }),
        None => Err(EngineError::NotFound),
    }
}

fn peer_unreachable(e: &PeerError) -> EngineError {
    EngineError::Unavailable(e.to_string())
}

/// Groups batch positions by owner: `None` = this node.
fn group_by_owner(
    ring: &crate::ring::Ring,
    local: &str,
    keys: impl Iterator<Item = (usize, u64)>,
) -> Vec<(Option<Member>, Vec<usize>)> {
    let mut groups: Vec<(Option<Member>, Vec<usize>)> = Vec::new();
    for (i, hash) in keys {
        let owner = ring.owner(hash).filter(|m| m.name != local).cloned();
        match groups.iter_mut().find(|(o, _)| o.as_ref().map(|m| &m.name) == owner.as_ref().map(|m| &m.name))
        {
            Some((_, positions)) => positions.push(i),
            None => groups.push((owner, vec![i])),
        }
    }
    groups
}

impl Engine {
    /// An engine over keyspaces, membership and a peer transport.
    pub fn new(
        keyspaces: Arc<Keyspaces>,
        membership: Arc<Membership>,
        transport: Arc<dyn PeerTransport>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self { keyspaces, membership, transport, metrics, copy_holders: dashmap::DashMap::new() })
    }

    /// The keyspaces.
    pub fn keyspaces(&self) -> &Arc<Keyspaces> {
        &self.keyspaces
    }

    /// The membership.
    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn keyspace(&self, name: &str) -> Result<Arc<KeyspaceRuntime>, EngineError> {
        self.keyspaces.get(name).ok_or_else(|| EngineError::UnknownKeyspace {
            name: name.to_owned(),
            known: self.keyspaces.names(),
        })
    }

    /// The owner of a key hash, or `None` when it is this node.
    ///
    /// Returns the ring and the owner's index rather than a `Member`: a hot-tier hit must not pay for cloning
    /// the owner's name and address.
    fn remote_owner(&self, hash: u64) -> Option<(Arc<Ring>, usize)> {
        let ring = self.membership.ring();
        let i = ring.owner_index(hash)?;
        (ring.members()[i].name != self.membership.local().name).then_some((ring, i))
    }

    /// Applies a new set of other members: swaps the ring, publishes events, drops entries this node no longer
    /// owns and every hot copy.
    pub fn set_members(&self, others: &[Member]) {
        let changes = self.membership.update(others);
        let ring = self.membership.ring();
        self.metrics.members.set(i64::try_from(ring.len()).unwrap_or(i64::MAX));
        if changes.is_empty() {
            return;
        }
        for c in &changes {
            tracing::info!(member = %c.member.name, address = %c.member.address, change = ?c.kind, "membership changed");
        }
        let local = self.membership.local().name.clone();
        for ks in self.keyspaces.all() {
            let ring = Arc::clone(&ring);
            let local = local.clone();
            ks.store.retain_owned(move |key| ring.owner(key_hash(key)).is_none_or(|m| m.name == local));
        }
        // Connections are kept for members and recent copy holders (they are sent invalidations) only.
        let mut keep: std::collections::HashSet<String> =
            ring.members().iter().map(|m| m.address.clone()).collect();
        keep.extend(self.copy_holders.iter().map(|e| e.value().0.clone()));
        self.transport.retain_addresses(&keep);
    }

    // ---------------------------------------------------------------------------------------------- reads

    /// Get of one key, routed to its owner.
    pub async fn get(self: &Arc<Self>, keyspace: &str, key: &str) -> Result<Value, EngineError> {
        let ks = self.keyspace(keyspace)?;
        let result = if let Err(e) = validate_key(key) {
            Err(e)
        } else {
            let hash = key_hash(key);
            match self.remote_owner(hash) {
                None => self.get_owned(&ks, key, hash).await,
                Some(owner) => self.get_remote(&ks, key, hash, owner).await,
            }
        };
        match &result {
            Ok(_) => {
                ks.metrics.get_ok.inc();
            }
            Err(EngineError::NotFound) => {
                ks.metrics.get_not_found.inc();
            }
            Err(e) => self.metrics.request("get", keyspace, e.code()),
        }
        result
    }

    /// Owner-side get: main tier, then the data source through single flight.
    async fn get_owned(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        key: &str,
        hash: u64,
    ) -> Result<Value, EngineError> {
        let epoch = ks.store.epoch(hash);
        if let Some(entry) = ks.store.get(Tier::Main, key) {
            ks.metrics.hits_main.inc();
            return entry_to_value(entry);
        }
        ks.metrics.misses.inc();
        let Some(source) = ks.source.clone() else { return Err(EngineError::NotFound) };
        // The load is built only by the leader; callers that join an in-flight load build nothing.
        ks.source_flight
            .load(key, || {
                self.source_load(ks, source, vec![(Arc::from(key), hash, epoch)], Tier::Main)
                    .map(|mut v| v.pop().unwrap_or(Err(EngineError::NotFound)))
                    .boxed()
            })
            .await
    }

    /// Non-owner get: hot tier, then the owner through single flight.
    async fn get_remote(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        key: &str,
        hash: u64,
        (ring, owner): (Arc<Ring>, usize),
    ) -> Result<Value, EngineError> {
        let epoch = ks.store.epoch(hash);
        if let Some(entry) = ks.store.get(Tier::Hot, key) {
            ks.metrics.hits_hot.inc();
            return entry_to_value(entry);
        }
        ks.metrics.misses.inc();
        ks.metrics.forwarded.inc();
        ks.peer_flight
            .load(key, || {
                let owner = ring.members()[owner].clone();
                self.peer_load(ks, owner, vec![(Arc::from(key), hash, epoch)])
                    .map(|mut v| v.pop().unwrap_or(Err(EngineError::NotFound)))
                    .boxed()
            })
            .await
    }

    /// Builds the future that fetches `keys` from the data source and fills `tier` (a fill never overrides a
    /// write that landed after the epochs in `keys` were recorded).
    fn source_load(
        &self,
        ks: &Arc<KeyspaceRuntime>,
        source: Arc<dyn DataSource>,
        keys: Vec<LoadKey>,
        tier: Tier,
    ) -> BoxFuture<'static, Vec<Result<Value, EngineError>>> {
        let ks = Arc::clone(ks);
        let metrics = Arc::clone(&self.metrics);
        async move {
            let started = std::time::Instant::now();
            let timeout = ks.config.fetch_timeout;
            // Whether the keyspace's fetchTimeout cut the fetch (rather than the source reporting a timeout).
            let mut cut = false;
            let fetched: Vec<Result<crate::source::Fetched, FetchError>> = if keys.len() == 1 {
                if let Ok(r) = tokio::time::timeout(timeout, source.fetch(&keys[0].0)).await {
                    vec![r]
                } else {
                    cut = true;
                    vec![Err(FetchError::Timeout)]
                }
            } else {
                let names: Vec<String> = keys.iter().map(|(k, _, _)| k.to_string()).collect();
                match tokio::time::timeout(timeout, source.fetch_many(&names)).await {
                    Ok(r) if r.len() == keys.len() => r,
                    Ok(r) => {
                        let msg = format!("data source returned {} results for {} keys", r.len(), keys.len());
                        keys.iter().map(|_| Err(FetchError::Internal(msg.clone()))).collect()
                    }
                    Err(_) => {
                        cut = true;
                        keys.iter().map(|_| Err(FetchError::Timeout)).collect()
                    }
                }
            };
            ks.metrics.fetch_seconds.observe(started.elapsed().as_secs_f64());
            let name = ks.config.name.clone();
            let tier_ttl = |ttl: Option<Duration>| match tier {
                Tier::Main => ttl,
                Tier::Hot => Some(ttl.map_or(HOT_MAX_TTL, |t| t.min(HOT_MAX_TTL))),
            };
            let mut out = Vec::with_capacity(keys.len());
            for ((key, hash, epoch), result) in keys.into_iter().zip(fetched) {
                ks.metrics.fetches_total.inc();
                let outcome = match result {
                    Ok(f) => {
                        metrics.fetch(&name, "ok");
                        let ttl = f.ttl.or(ks.config.ttl);
                        if ttl != Some(Duration::ZERO) {
                            ks.store.fill(
                                tier,
                                key,
                                hash,
                                Entry::value(f.value.clone(), tier_ttl(ttl)),
                                epoch,
                            );
                        }
                        Ok(Value { bytes: f.value, ttl })
                    }
                    Err(FetchError::NotFound { negative_ttl }) => {
                        metrics.fetch(&name, "not_found");
                        if let Some(ttl) = negative_ttl.or(ks.config.negative_ttl).filter(|t| !t.is_zero()) {
                            let ttl = tier_ttl(Some(ttl)).unwrap_or(ttl);
                            ks.store.fill(tier, key, hash, Entry::not_found(ttl), epoch);
                        }
                        Err(EngineError::NotFound)
                    }
                    Err(FetchError::InvalidKey(m)) => {
                        metrics.fetch(&name, "invalid_key");
                        Err(EngineError::InvalidArgument(format!(
                            "data source of keyspace {name:?} rejected the key: {m}"
                        )))
                    }
                    Err(FetchError::Unavailable(m)) => {
                        metrics.fetch(&name, "unavailable");
                        Err(EngineError::Unavailable(format!(
                            "data source of keyspace {name:?} is unavailable: {m}"
                        )))
                    }
                    Err(FetchError::Timeout) => {
                        metrics.fetch(&name, "timeout");
                        if cut {
                            Err(EngineError::DeadlineExceeded { keyspace: name.clone(), timeout })
                        } else {
                            Err(EngineError::SourceTimedOut(format!(
                                "data source of keyspace {name:?} timed out (its own time limit)"
                            )))
                        }
                    }
                    Err(FetchError::Internal(m)) => {
                        metrics.fetch(&name, "internal");
                        Err(EngineError::Internal(format!("data source of keyspace {name:?} failed: {m}")))
                    }
                };
                out.push(outcome);
            }
            out
        }
        .boxed()
    }

    /// Builds the future that loads `keys` from their owner and fills the hot tier. When the owner cannot be
    /// reached, it fetches from the data source itself (or reports UNAVAILABLE for a cache-aside keyspace). An
    /// owner that is reachable but slow is not "down": its deadline covers its own fetch, and missing it is
    /// DEADLINE_EXCEEDED, never a second fetch from here.
    fn peer_load(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        owner: Member,
        keys: Vec<LoadKey>,
    ) -> BoxFuture<'static, Vec<Result<Value, EngineError>>> {
        let ks = Arc::clone(ks);
        let this = Arc::clone(self);
        async move {
            let names: Vec<Arc<str>> = keys.iter().map(|(k, _, _)| Arc::clone(k)).collect();
            let deadline = ks.config.fetch_timeout + this.transport.timeout();
            match this.transport.load(&owner, &ks.config.name, names, deadline).await {
                Ok(results) => {
                    let mut out = Vec::with_capacity(keys.len());
                    for ((key, hash, epoch), r) in keys.into_iter().zip(results) {
                        match &r {
                            Ok(v) => {
                                let ttl = Some(v.ttl.map_or(HOT_MAX_TTL, |t| t.min(HOT_MAX_TTL)));
                                ks.store.fill(Tier::Hot, key, hash, Entry::value(v.bytes.clone(), ttl), epoch);
                            }
                            // The owner has not loaded this keyspace yet (its reload lags ours): transient.
                            Err(e) if e.code() == Code::FailedPrecondition => {
                                out.push(Err(EngineError::Unavailable(format!(
                                    "owner {} does not serve keyspace {:?} yet: {e}",
                                    owner.name, ks.config.name
                                ))));
                                continue;
                            }
                            Err(_) => {}
                        }
                        out.push(r);
                    }
                    out
                }
                Err(e) if e.timed_out => {
                    this.metrics.peer_errors.inc();
                    let err = EngineError::Remote { code: Code::DeadlineExceeded, message: e.to_string() };
                    keys.iter().map(|_| Err(err.clone())).collect()
                }
                Err(e) => {
                    this.metrics.peer_errors.inc();
                    ks.metrics.fallbacks.inc_by(keys.len() as u64);
                    tracing::debug!(owner = %owner.name, error = %e, keys = keys.len(), "owner unreachable; loading locally");
                    match ks.source.clone() {
                        // The epochs recorded before the hot-tier lookup still apply: an invalidation that
                        // arrived meanwhile must win over this fallback's result too.
                        Some(source) => this.source_load(&ks, source, keys, Tier::Hot).await,
                        None => keys.iter().map(|_| Err(peer_unreachable(&e))).collect(),
                    }
                }
            }
        }
        .boxed()
    }

    /// GetMany: per-key results in request order; keys grouped by owner, one peer call per owner.
    pub async fn get_many(
        self: &Arc<Self>,
        keyspace: &str,
        keys: &[String],
    ) -> Result<KeyResults<Value>, EngineError> {
        let ks = self.keyspace(keyspace)?;
        validate_batch(keys.len())?;
        let results = self.get_many_routed(&ks, keys, true).await;
        self.metrics.request("get_many", keyspace, Code::Ok);
        Ok(results)
    }

    /// Owner-side load of keys for a peer: served here whatever the ring says (never forwarded again).
    /// `from` is the calling node; it is remembered as a holder of copies (see [`Engine::set_members`]).
    pub async fn load_for_peer(
        self: &Arc<Self>,
        keyspace: &str,
        keys: &[String],
        from: Option<Member>,
    ) -> Result<KeyResults<Value>, EngineError> {
        if let Some(m) = from {
            // One insert: a `match` on `get_mut` keeps the shard locked through its arms (the scrutinee lives
            // until the match ends), and inserting from an arm then deadlocks on that lock — which happened for
            // every peer that came back under its name with a new address (a recreated pod).
            self.copy_holders.insert(m.name, (m.address, std::time::Instant::now()));
        }
        let ks = self.keyspace(keyspace)?;
        validate_batch(keys.len())?;
        Ok(self.get_many_routed(&ks, keys, false).await)
    }

    async fn get_many_routed(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        keys: &[String],
        route: bool,
    ) -> KeyResults<Value> {
        let mut results: Vec<Option<Result<Value, EngineError>>> = vec![None; keys.len()];
        let mut valid = Vec::with_capacity(keys.len());
        let mut hashes = vec![0u64; keys.len()];
        for (i, key) in keys.iter().enumerate() {
            match validate_key(key) {
                Ok(()) => {
                    hashes[i] = key_hash(key);
                    valid.push((i, hashes[i]));
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let groups = if route {
            group_by_owner(&self.membership.ring(), &self.membership.local().name, valid.into_iter())
        } else {
            vec![(None, valid.into_iter().map(|(i, _)| i).collect())]
        };
        let mut pending = Vec::new();
        for (owner, positions) in groups {
            let tier = if owner.is_some() { Tier::Hot } else { Tier::Main };
            let mut misses: Vec<(usize, Arc<str>, u64, u64)> = Vec::new();
            for i in positions {
                let key = &keys[i];
                let hash = hashes[i];
                let epoch = ks.store.epoch(hash);
                if let Some(entry) = ks.store.get(tier, key) {
                    let counter =
                        if tier == Tier::Main { &ks.metrics.hits_main } else { &ks.metrics.hits_hot };
                    counter.inc();
                    results[i] = Some(entry_to_value(entry));
                } else {
                    ks.metrics.misses.inc();
                    misses.push((i, Arc::from(key.as_str()), hash, epoch));
                }
            }
            if misses.is_empty() {
                continue;
            }
            let names: Vec<Arc<str>> = misses.iter().map(|(_, k, _, _)| Arc::clone(k)).collect();
            let recorded: std::collections::HashMap<Arc<str>, (u64, u64)> =
                misses.iter().map(|(_, k, h, e)| (Arc::clone(k), (*h, *e))).collect();
            let with_hash = move |led: Vec<Arc<str>>| -> Vec<LoadKey> {
                led.into_iter()
                    .map(|k| {
                        let (h, e) = recorded.get(&k).copied().unwrap_or((0, u64::MAX));
                        (k, h, e)
                    })
                    .collect()
            };
            let futures = match owner {
                None => {
                    let Some(source) = ks.source.clone() else {
                        for (i, _, _, _) in &misses {
                            results[*i] = Some(Err(EngineError::NotFound));
                        }
                        continue;
                    };
                    ks.source_flight
                        .load_many(&names, |led| self.source_load(ks, source, with_hash(led), Tier::Main))
                }
                Some(owner) => {
                    ks.metrics.forwarded.inc_by(misses.len() as u64);
                    ks.peer_flight.load_many(&names, |led| self.peer_load(ks, owner, with_hash(led)))
                }
            };
            for ((i, _, _, _), fut) in misses.into_iter().zip(futures) {
                pending.push(async move { (i, fut.await) });
            }
        }
        for (i, r) in futures::future::join_all(pending).await {
            results[i] = Some(r);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(EngineError::Internal("no result computed for key".into()))))
            .collect()
    }

    // --------------------------------------------------------------------------------------------- writes

    /// Put of one key.
    pub async fn put(
        self: &Arc<Self>,
        keyspace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), EngineError> {
        let entry = WriteEntry { key: Arc::from(key), value, ttl };
        self.put_many(keyspace, vec![entry]).await.and_then(|mut r| r.pop().unwrap_or(Ok(())))
    }

    /// PutMany: per-key results in request order; one store call per owner.
    pub async fn put_many(
        self: &Arc<Self>,
        keyspace: &str,
        entries: Vec<WriteEntry>,
    ) -> Result<KeyResults<()>, EngineError> {
        let ks = self.keyspace(keyspace)?;
        validate_batch(entries.len())?;
        let op = if entries.len() == 1 { "put" } else { "put_many" };
        let results = self.write_routed(&ks, entries.into_iter().map(Write::Put).collect()).await;
        self.count_writes(op, keyspace, &results);
        Ok(results)
    }

    /// Delete of one key.
    pub async fn delete(self: &Arc<Self>, keyspace: &str, key: &str) -> Result<(), EngineError> {
        self.delete_many(keyspace, &[key.to_owned()]).await.and_then(|mut r| r.pop().unwrap_or(Ok(())))
    }

    /// DeleteMany: per-key results in request order; one remove call per owner.
    pub async fn delete_many(
        self: &Arc<Self>,
        keyspace: &str,
        keys: &[String],
    ) -> Result<KeyResults<()>, EngineError> {
        let ks = self.keyspace(keyspace)?;
        validate_batch(keys.len())?;
        let op = if keys.len() == 1 { "delete" } else { "delete_many" };
        let results =
            self.write_routed(&ks, keys.iter().map(|k| Write::Delete(Arc::from(k.as_str()))).collect()).await;
        self.count_writes(op, keyspace, &results);
        Ok(results)
    }

    fn count_writes(&self, op: &'static str, keyspace: &str, results: &KeyResults<()>) {
        let code = results.iter().find_map(|r| r.as_ref().err().map(EngineError::code)).unwrap_or(Code::Ok);
        self.metrics.request(op, keyspace, code);
    }

    async fn write_routed(self: &Arc<Self>, ks: &Arc<KeyspaceRuntime>, writes: Vec<Write>) -> KeyResults<()> {
        let mut results: Vec<Option<Result<(), EngineError>>> = vec![None; writes.len()];
        let mut valid = Vec::with_capacity(writes.len());
        for (i, w) in writes.iter().enumerate() {
            let check = match w {
                Write::Put(e) => validate_write(ks, e),
                Write::Delete(k) => validate_key(k),
            };
            match check {
                Ok(()) => valid.push((i, key_hash(w.key()))),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let groups =
            group_by_owner(&self.membership.ring(), &self.membership.local().name, valid.into_iter());
        let mut calls = Vec::new();
        for (owner, positions) in groups {
            let batch: Vec<Write> = positions.iter().map(|&i| writes[i].clone()).collect();
            let this = Arc::clone(self);
            let ks = Arc::clone(ks);
            calls.push(async move {
                let outcome = match owner {
                    None => this.write_owned(&ks, batch).await,
                    Some(owner) => this.write_remote(&ks, &owner, batch).await,
                };
                (positions, outcome)
            });
        }
        for (positions, outcome) in futures::future::join_all(calls).await {
            for (i, r) in positions.into_iter().zip(outcome) {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(EngineError::Internal("no result computed for key".into()))))
            .collect()
    }

    async fn write_remote(&self, ks: &KeyspaceRuntime, owner: &Member, batch: Vec<Write>) -> KeyResults<()> {
        let n = batch.len();
        let keys: Vec<Arc<str>> = batch.iter().map(|w| Arc::clone(w.key_arc())).collect();
        let (puts, deletes): (Vec<_>, Vec<_>) = batch.into_iter().partition(|w| matches!(w, Write::Put(_)));
        // A batch is all puts or all deletes (they come from one API call).
        let outcome = if deletes.is_empty() {
            let entries =
                puts.into_iter().filter_map(|w| if let Write::Put(e) = w { Some(e) } else { None }).collect();
            self.transport.store(owner, &ks.config.name, entries).await
        } else {
            let keys = deletes.iter().map(|w| Arc::clone(w.key_arc())).collect();
            self.transport.remove(owner, &ks.config.name, keys).await
        };
        // Whatever the owner did, drop this node's own copies: the owner invalidates the members it knows, and
        // during a membership change it may not know this node yet.
        for key in &keys {
            ks.store.remove(key, key_hash(key));
            ks.peer_flight.forget(key);
        }
        match outcome {
            Ok(results) if results.len() == n => results,
            Ok(results) => vec![
                Err(EngineError::Internal(format!(
                    "owner {} returned {} results for {n} keys",
                    owner.name,
                    results.len()
                )));
                n
            ],
            Err(e) => {
                self.metrics.peer_errors.inc();
                vec![Err(peer_unreachable(&e)); n]
            }
        }
    }

    /// Owner-side write: apply locally, then invalidate copies on every other member.
    async fn write_owned(&self, ks: &KeyspaceRuntime, batch: Vec<Write>) -> KeyResults<()> {
        let mut keys = Vec::with_capacity(batch.len());
        for w in batch {
            let hash = key_hash(w.key());
            match w {
                Write::Put(e) => {
                    let ttl = e.ttl.or(ks.config.ttl);
                    ks.store.write(Tier::Main, Arc::clone(&e.key), hash, Entry::value(e.value, ttl));
                    ks.source_flight.forget(&e.key);
                    keys.push(e.key);
                }
                Write::Delete(key) => {
                    ks.store.remove(&key, hash);
                    ks.source_flight.forget(&key);
                    keys.push(key);
                }
            }
        }
        let n = keys.len();
        match self.invalidate_everywhere(&ks.config.name, keys).await {
            Ok(()) => vec![Ok(()); n],
            Err(e) => vec![Err(e); n],
        }
    }

    /// Invalidates copies on every other member (each must acknowledge) and on recent copy holders outside the
    /// member list (best effort: such a node is joining, or gone; its copies expire within `HOT_MAX_TTL`).
    async fn invalidate_everywhere(&self, keyspace: &str, keys: Vec<Arc<str>>) -> Result<(), EngineError> {
        let ring = self.membership.ring();
        let local = &self.membership.local().name;
        let members: Vec<&Member> = ring.members().iter().filter(|m| &m.name != local).collect();
        self.copy_holders.retain(|_, (_, seen)| seen.elapsed() < HOT_MAX_TTL);
        let outsiders: Vec<Member> = self
            .copy_holders
            .iter()
            .filter(|e| e.key() != local && !members.iter().any(|m| &m.name == e.key()))
            .map(|e| Member::new(e.key().clone(), e.value().0.clone()))
            .collect();
        let required = members.iter().map(|m| self.transport.invalidate(m, keyspace, keys.clone()));
        let best_effort = outsiders.iter().map(|m| self.transport.invalidate(m, keyspace, keys.clone()));
        let (required, best_effort) = futures::future::join(
            futures::future::join_all(required),
            futures::future::join_all(best_effort),
        )
        .await;
        for e in best_effort.into_iter().filter_map(Result::err) {
            tracing::debug!(error = %e, "could not invalidate copies on a node outside the member list");
        }
        let failures: Vec<String> =
            required.into_iter().filter_map(|r| r.err().map(|e| e.to_string())).collect();
        if failures.is_empty() {
            Ok(())
        } else {
            self.metrics.peer_errors.inc_by(failures.len() as u64);
            Err(EngineError::Unavailable(format!(
                "written on owner {local}, but copies on other nodes could not be invalidated: {}",
                failures.join("; ")
            )))
        }
    }

    /// Owner-side store for a peer (never forwarded again).
    pub async fn store_for_peer(
        &self,
        keyspace: &str,
        entries: Vec<WriteEntry>,
    ) -> Result<KeyResults<()>, EngineError> {
        let ks = self.keyspace(keyspace)?;
        validate_batch(entries.len())?;
        Ok(self.write_validated_owned(&ks, entries.into_iter().map(Write::Put).collect()).await)
    }

    /// Owner-side removal for a peer (never forwarded again).
    pub async fn remove_for_peer(
        &self,
        keyspace: &str,
        keys: &[String],
    ) -> Result<KeyResults<()>, EngineError> {
        let ks = self.keyspace(keyspace)?;
        validate_batch(keys.len())?;
        Ok(self
            .write_validated_owned(&ks, keys.iter().map(|k| Write::Delete(Arc::from(k.as_str()))).collect())
            .await)
    }

    async fn write_validated_owned(&self, ks: &KeyspaceRuntime, writes: Vec<Write>) -> KeyResults<()> {
        let mut results: Vec<Option<Result<(), EngineError>>> = vec![None; writes.len()];
        let mut ok = Vec::new();
        let mut positions = Vec::new();
        for (i, w) in writes.into_iter().enumerate() {
            let check = match &w {
                Write::Put(e) => validate_write(ks, e),
                Write::Delete(k) => validate_key(k),
            };
            match check {
                Ok(()) => {
                    ok.push(w);
                    positions.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        for (i, r) in positions.into_iter().zip(self.write_owned(ks, ok).await) {
            results[i] = Some(r);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(EngineError::Internal("no result computed for key".into()))))
            .collect()
    }

    /// Drops copies of keys on this node (both tiers), sent by an owner after a write.
    pub fn invalidate(&self, keyspace: &str, keys: &[String]) -> Result<(), EngineError> {
        let ks = self.keyspace(keyspace)?;
        for key in keys {
            ks.store.remove(key, key_hash(key));
            ks.peer_flight.forget(key);
            ks.source_flight.forget(key);
        }
        Ok(())
    }

    /// Drops every entry of a keyspace on this node.
    pub fn purge_local(&self, keyspace: &str, hot_only: bool) -> Result<(), EngineError> {
        let ks = self.keyspace(keyspace)?;
        ks.store.purge(hot_only);
        ks.peer_flight.clear();
        if !hot_only {
            ks.source_flight.clear();
            tracing::info!(keyspace, "keyspace purged");
        }
        Ok(())
    }

    /// PurgeKeySpace: drops every entry of a keyspace on every member; returns the number of nodes purged.
    ///
    /// Two rounds: every node drops everything, then every node drops its hot copies again. A node purged early
    /// could otherwise copy a pre-purge value from an owner not purged yet; after the second round no such copy
    /// is left.
    pub async fn purge(&self, keyspace: &str) -> Result<u32, EngineError> {
        let ring = self.membership.ring();
        let mut failed: Vec<String> = Vec::new();
        for hot_only in [false, true] {
            self.purge_local(keyspace, hot_only)?;
            let local = &self.membership.local().name;
            let calls = ring
                .members()
                .iter()
                .filter(|m| &m.name != local && !failed.iter().any(|f| f.contains(&m.name)))
                .map(|m| self.transport.purge(m, keyspace, hot_only));
            let results = futures::future::join_all(calls).await;
            failed.extend(results.iter().filter_map(|r| r.as_ref().err().map(ToString::to_string)));
        }
        let purged = u32::try_from(ring.len() - failed.len()).unwrap_or(u32::MAX);
        let outcome = if failed.is_empty() {
            Ok(purged)
        } else {
            Err(EngineError::Unavailable(format!(
                "purged {purged} of {} nodes; not purged: {}",
                ring.len(),
                failed.join("; ")
            )))
        };
        self.metrics.request("purge", keyspace, outcome.as_ref().err().map_or(Code::Ok, EngineError::code));
        outcome
    }

    /// Per-keyspace counters of this node.
    pub fn stats(&self, keyspace: Option<&str>) -> Result<Vec<KeyspaceStats>, EngineError> {
        let list = match keyspace {
            Some(name) if !name.is_empty() => vec![self.keyspace(name)?],
            _ => self.keyspaces.all(),
        };
        Ok(list
            .iter()
            .map(|ks| {
                ks.store.sync();
                let m = &ks.metrics;
                KeyspaceStats {
                    name: ks.config.name.clone(),
                    hits: m.hits_main.get(),
                    hot_hits: m.hits_hot.get(),
                    misses: m.misses.get(),
                    source_fetches: m.fetches_total.get(),
                    entries: ks.store.entries(),
                    bytes: ks.store.bytes(),
                    evictions: m.evictions.get(),
                    forwarded: m.forwarded.get(),
                    owner_fallbacks: m.fallbacks.get(),
                }
            })
            .collect())
    }

    /// Refreshes the entries/bytes gauges (before a scrape).
    pub fn refresh_gauges(&self) {
        for ks in self.keyspaces.all() {
            ks.store.sync();
            ks.metrics.entries.set(i64::try_from(ks.store.entries()).unwrap_or(i64::MAX));
            ks.metrics.bytes.set(i64::try_from(ks.store.bytes()).unwrap_or(i64::MAX));
        }
    }
}

/// Counters of one keyspace on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KeyspaceStats {
    /// Keyspace name.
    pub name: String,
    /// Main-tier hits.
    pub hits: u64,
    /// Hot-tier hits.
    pub hot_hits: u64,
    /// Misses.
    pub misses: u64,
    /// Data-source fetches by this node.
    pub source_fetches: u64,
    /// Entries held.
    pub entries: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Size evictions.
    pub evictions: u64,
    /// Requests forwarded to owners.
    pub forwarded: u64,
    /// Loads done because the owner was unreachable.
    pub owner_fallbacks: u64,
}

#[derive(Clone, Debug)]
enum Write {
    Put(WriteEntry),
    Delete(Arc<str>),
}

impl Write {
    fn key(&self) -> &str {
        self.key_arc()
    }

    fn key_arc(&self) -> &Arc<str> {
        match self {
            Self::Put(e) => &e.key,
            Self::Delete(k) => k,
        }
    }
}
