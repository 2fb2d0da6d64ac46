//! Reads: Get and GetMany, routed to the owner; the owner-side load for peers; loads from the data source and
//! from owners, each through single flight.

use std::{sync::Arc, time::Duration};

use futures::{FutureExt, future::BoxFuture};
use tracing::Instrument;

use super::{
    Engine, LoadKey, entry_to_value, peer_unreachable, routing::group_by_owner, validate_batch, validate_key,
};
use crate::{
    batch::Batch,
    error::{Code, EngineError},
    keyspace::{KeyspaceRuntime, Value},
    metrics::Metrics,
    peer::KeyResults,
    protect::{Refusal, counts_as_failure},
    ring::{Member, Ring, key_hash},
    source::{DataSource, FetchError, Fetched},
    store::{Entry, HOT_MAX_TTL, Tier},
    telemetry,
};

/// The keys of one owner that missed this node's cache: position in the batch, and the key to load.
type Misses = Vec<(usize, LoadKey)>;

/// How a load from the data source runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fetch {
    /// A reader waits for it: it waits for a rate-limit token up to the fetch's deadline.
    Blocking,
    /// Nobody waits for it: it refreshes an entry or warms one up, and never waits for a token.
    Background(Why),
}

/// Why a fetch runs in the background.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Why {
    /// An expired entry answered stale within staleWhileRevalidate.
    Revalidate,
    /// A fresh entry read in the last part of its TTL.
    RefreshAhead,
    /// A listed key loaded by the warm-up.
    WarmUp,
}

/// Why a value is answered stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StaleWhy {
    SourceError,
    CircuitOpen,
    RateLimited,
}

/// A stale answer: the value of an expired entry, with no time left.
fn stale_value(bytes: bytes::Bytes) -> Value {
    Value { bytes, ttl: Some(Duration::ZERO), stale: true }
}

/// Counts a Get answered with a value (`found`) or NOT_FOUND.
fn count_found(ks: &KeyspaceRuntime, found: bool) {
    if found {
        ks.metrics.get_ok.inc();
    } else {
        ks.metrics.get_not_found.inc();
    }
}

/// A Get answered from memory, still as the store holds it: nothing is copied or allocated until it becomes a
/// [`Value`] (the RESP front end writes [`Hit::value`] straight into its reply).
pub struct Hit {
    stored: crate::table::Stored,
    stale: bool,
}

impl Hit {
    /// The value; `None` for a cached NOT_FOUND.
    pub fn value(&self) -> Option<&[u8]> {
        self.stored.value()
    }

    /// The answer [`Engine::get`] gives for it.
    pub fn into_value(self) -> Result<Value, EngineError> {
        let bytes = self.stored.value_bytes().ok_or(EngineError::NotFound)?;
        if self.stale {
            return Ok(stale_value(bytes));
        }
        let ttl = self.stored.expires_at().map(|e| e.saturating_duration_since(std::time::Instant::now()));
        Ok(Value { bytes, ttl, stale: false })
    }
}

/// Where the keys of a batch are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// A client's request: each key at its owner in this node's view.
    Client,
    /// A peer's request: keys owned here are served here, the others forwarded once (marked forwarded).
    Peer,
    /// A forwarded request: everything here.
    Here,
}

impl Engine {
    /// Get of one key, routed to its owner.
    pub async fn get(self: &Arc<Self>, keyspace: &str, key: &str) -> Result<Value, EngineError> {
        let ks = self.keyspace(keyspace)?;
        let result = if let Err(e) = validate_key(key) {
            Err(e)
        } else {
            let hash = key_hash(key);
            ks.store.touch(hash, key);
            match self.remote_owner(hash) {
                None => self.get_owned(&ks, key, hash).await,
                Some(owner) => self.get_remote(&ks, key, hash, owner).await,
            }
        };
        self.count_get(&ks, &result);
        result
    }

    /// Counts one Get's outcome (the common ones through handles resolved once).
    fn count_get(&self, ks: &KeyspaceRuntime, result: &Result<Value, EngineError>) {
        match result {
            Ok(_) => count_found(ks, true),
            Err(EngineError::NotFound) => count_found(ks, false),
            Err(e) => self.metrics.request("get", ks.name(), e.code()),
        }
    }

    /// Get of one key answered from memory without awaiting: the owner's main tier (with the same fresh, stale
    /// and refresh-ahead rules as [`Engine::get`]) or, on a non-owner, its hot tier. `None` when the answer needs
    /// a load (a miss, or a key the limits refuse, which [`Engine::get`] then reports): the caller falls back to
    /// [`Engine::get`]. Counted like [`Engine::get`]. The RESP front end answers hits through this, in the
    /// connection's task, without a task switch.
    pub fn get_cached(self: &Arc<Self>, ks: &Arc<KeyspaceRuntime>, key: &str) -> Option<Hit> {
        if validate_key(key).is_err() {
            return None;
        }
        let hash = key_hash(key);
        let hit = if self.remote_owner(hash).is_some() {
            let stored = ks.store.get_stored(Tier::Hot, key)?;
            ks.metrics.hits_hot.inc();
            Hit { stored, stale: false }
        } else {
            let epoch = ks.store.epoch(hash);
            self.main_hit(ks, key, hash, epoch)?
        };
        ks.store.touch(hash, key);
        count_found(ks, hit.value().is_some());
        Some(hit)
    }

    /// Owner-side get: main tier, then the data source through single flight.
    async fn get_owned(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        key: &str,
        hash: u64,
    ) -> Result<Value, EngineError> {
        let epoch = ks.store.epoch(hash);
        if let Some(hit) = self.main_hit(ks, key, hash, epoch) {
            telemetry::record_outcome(if hit.stale { "stale" } else { "hit" });
            return hit.into_value();
        }
        ks.metrics.misses.inc();
        telemetry::record_outcome("miss");
        self.load_owned(ks, (Arc::from(key), hash, epoch)).await
    }

    /// The owner's answer from its main tier, as stored: a fresh entry (refreshed in the background when read in
    /// the last part of its TTL, with refreshAhead), or an expired value within staleWhileRevalidate, answered
    /// stale while one background fetch refreshes it. `None`: a miss.
    fn main_hit(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        key: &str,
        hash: u64,
        epoch: u64,
    ) -> Option<Hit> {
        let stored = ks.store.lookup_stored(Tier::Main, key)?;
        let Some(expires_at) = stored.expires_at() else {
            ks.metrics.hits_main.inc();
            return Some(Hit { stored, stale: false });
        };
        let now = std::time::Instant::now();
        let settings = &ks.protect.settings;
        if expires_at > now {
            ks.metrics.hits_main.inc();
            if let Some(fraction) = settings.refresh_ahead
                && stored.value().is_some()
                && stored.refresh_due(now, fraction)
            {
                self.refresh(ks, key, hash, epoch, Why::RefreshAhead);
            }
            return Some(Hit { stored, stale: false });
        }
        let window = settings.stale_while_revalidate?;
        stored.value()?;
        if now - expires_at > window {
            return None;
        }
        ks.metrics.hits_main.inc();
        ks.metrics.stale_revalidate.inc();
        self.refresh(ks, key, hash, epoch, Why::Revalidate);
        Some(Hit { stored, stale: true })
    }

    /// Starts a background fetch of a key this node owns, through its single flight (nothing starts when a load
    /// of the key is in flight already). `epoch` was recorded before the lookup that found the entry: a write
    /// since then wins over the refresh.
    fn refresh(self: &Arc<Self>, ks: &Arc<KeyspaceRuntime>, key: &str, hash: u64, epoch: u64, why: Why) {
        let Some(source) = ks.source.clone() else { return };
        if ks.source_flight.contains(key) {
            return;
        }
        let (this, rt) = (Arc::clone(self), Arc::clone(ks));
        // The flight runs the load as its own task; nobody awaits it here.
        drop(ks.source_flight.load_many(&[Arc::from(key)], move |led| {
            let keys = led.into_iter().map(|k| (k, hash, epoch)).collect();
            this.source_load(&rt, source, keys, Tier::Main, Fetch::Background(why))
        }));
    }

    /// The owner's load of a key that missed its main tier: joins the key's load in flight or leads a new one.
    pub(super) async fn load_owned(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        key: LoadKey,
    ) -> Result<Value, EngineError> {
        // A cache-aside keyspace has nothing to load, except from a previous owner just after a change.
        if ks.source.is_none() && !self.in_grace() {
            return Err(EngineError::NotFound);
        }
        let name = Arc::clone(&key.0);
        // The load is built only by the leader; callers that join an in-flight load build nothing.
        ks.source_flight
            .load(&name, || self.owner_load(ks, vec![key], Fetch::Blocking).map(super::single).boxed())
            .await
    }

    /// Builds the owner's load of keys that missed its main tier: the main tier again (a load that finished
    /// meanwhile), then the keys' previous owners during the grace window after a membership change, then the
    /// data source (NOT_FOUND for a cache-aside keyspace).
    pub(super) fn owner_load(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        keys: Vec<LoadKey>,
        fetch: Fetch,
    ) -> BoxFuture<'static, KeyResults<Value>> {
        let ks = Arc::clone(ks);
        let this = Arc::clone(self);
        // The load a single flight's leader runs for everyone who asked for these keys meanwhile.
        let span = if telemetry::in_trace() {
            tracing::info_span!(
                target: telemetry::SPANS,
                "distcache.singleflight",
                distcache.keyspace = ks.name(),
                distcache.keys = keys.len(),
            )
        } else {
            tracing::Span::none()
        };
        async move {
            let mut batch = Batch::new(keys.len());
            let mut missing = Vec::with_capacity(keys.len());
            for (i, key) in keys.into_iter().enumerate() {
                match ks.store.get(Tier::Main, &key.0) {
                    Some(entry) => batch.set(i, entry_to_value(entry)),
                    None => missing.push((i, key)),
                }
            }
            if !missing.is_empty() && this.in_grace() {
                let keys: Vec<LoadKey> = missing.iter().map(|(_, k)| k.clone()).collect();
                let answers = this.ask_previous_owners(&ks, &keys).await;
                let mut still = Vec::with_capacity(missing.len());
                for ((i, key), answer) in missing.into_iter().zip(answers) {
                    match answer {
                        Some(Ok(v)) => batch.set(i, Ok(v)),
                        // Deleted on the previous owner: the data source decides (NOT_FOUND without one).
                        Some(Err(())) | None => still.push((i, key)),
                    }
                }
                missing = still;
            }
            if missing.is_empty() {
                return batch.finish();
            }
            // A handoff may have brought some while the previous owners were asked.
            missing.retain(|(i, key)| match ks.store.get(Tier::Main, &key.0) {
                Some(entry) => {
                    batch.set(*i, entry_to_value(entry));
                    false
                }
                None => true,
            });
            if missing.is_empty() {
                return batch.finish();
            }
            let Some(source) = ks.source.clone() else {
                for (i, _) in missing {
                    batch.set(i, Err(EngineError::NotFound));
                }
                return batch.finish();
            };
            let (positions, keys): (Vec<usize>, Vec<LoadKey>) = missing.into_iter().unzip();
            let results = this.source_load(&ks, source, keys, Tier::Main, fetch).await;
            batch.fill(positions, results);
            batch.finish()
        }
        .instrument(span)
        .boxed()
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
            telemetry::record_outcome("hot_hit");
            return entry_to_value(entry);
        }
        ks.metrics.misses.inc();
        ks.metrics.forwarded.inc();
        telemetry::record_outcome("forwarded");
        ks.peer_flight
            .load(key, || {
                let owner = ring.members()[owner].clone();
                // Only the leader of the key's flight asks the owner: its span is the one hop.
                let span = if telemetry::in_trace() {
                    tracing::info_span!(
                        target: telemetry::SPANS,
                        "distcache.forward",
                        otel.kind = "client",
                        rpc.system = "grpc",
                        distcache.owner = owner.name.as_str(),
                        distcache.owner_address = owner.address.as_str(),
                    )
                } else {
                    tracing::Span::none()
                };
                self.peer_load(ks, owner, vec![(Arc::from(key), hash, epoch)], false)
                    .map(super::single)
                    .instrument(span)
                    .boxed()
            })
            .await
    }

    /// Builds the future that fetches `keys` from the data source and fills `tier` (a fill never overrides a
    /// write that landed after the epochs in `keys` were recorded).
    ///
    /// It runs as the leader of a single flight, and first looks in `tier` again: a load of the same key that
    /// finished between the caller's cache lookup and its flight lookup has filled the cache and left the
    /// flight, which made this caller a new leader. Answering from the cache then keeps "one fetch per cold
    /// key" true (groupcache does the same).
    ///
    /// The fetch first passes the keyspace's protections: the circuit breaker, then the rate limit (a
    /// [`Fetch::Blocking`] fetch waits for tokens within the fetchTimeout, a background one does not wait). When
    /// the fetch is refused or fails, an owner answers the key's last value instead if it is within
    /// staleIfError (marked stale).
    fn source_load(
        &self,
        ks: &Arc<KeyspaceRuntime>,
        source: Arc<dyn DataSource>,
        keys: Vec<LoadKey>,
        tier: Tier,
        mode: Fetch,
    ) -> BoxFuture<'static, KeyResults<Value>> {
        let ks = Arc::clone(ks);
        let metrics = Arc::clone(&self.metrics);
        // Fills of the main tier carry this node's next version (hot copies never move: no version).
        let version = if tier == Tier::Main { self.next_version() } else { 0 };
        async move {
            let mut batch = Batch::new(keys.len());
            let mut missing = Vec::with_capacity(keys.len());
            let now = std::time::Instant::now();
            let refresh_ahead =
                ks.protect.settings.refresh_ahead.filter(|_| mode == Fetch::Background(Why::RefreshAhead));
            for (i, key) in keys.into_iter().enumerate() {
                match ks.store.get(tier, &key.0) {
                    // A refresh-ahead whose entry is no longer due was done by another load meanwhile.
                    Some(entry) if refresh_ahead.is_none_or(|f| !entry.refresh_due(now, f)) => {
                        batch.set(i, entry_to_value(entry));
                    }
                    _ => missing.push((i, key)),
                }
            }
            if missing.is_empty() {
                return batch.finish();
            }
            let (positions, keys): (Vec<usize>, Vec<LoadKey>) = missing.into_iter().unzip();
            let budget = ks.config.fetch_timeout;
            let deadline = tokio::time::Instant::now() + budget;
            let wait = (mode == Fetch::Blocking).then_some(deadline);
            let results: Vec<Result<Value, EngineError>> = match ks.protect.admit(keys.len(), wait).await {
                Err(refusal) => {
                    let n = keys.len() as u64;
                    let (why, error) = match refusal {
                        Refusal::RateLimited => {
                            ks.metrics.rate_limited.inc_by(n);
                            (StaleWhy::RateLimited, rate_limited(&ks))
                        }
                        Refusal::CircuitOpen(retry_in) => {
                            ks.metrics.circuit_rejected.inc_by(n);
                            (StaleWhy::CircuitOpen, circuit_open(&ks, retry_in))
                        }
                    };
                    keys.iter()
                        .map(|key| fallback(&ks, tier, &key.0, why).unwrap_or_else(|| Err(error.clone())))
                        .collect()
                }
                Ok(admission) => {
                    if let Fetch::Background(why) = mode {
                        let counter = match why {
                            Why::Revalidate => &ks.metrics.background_revalidate,
                            Why::RefreshAhead => &ks.metrics.background_refresh_ahead,
                            Why::WarmUp => &ks.metrics.background_warm_up,
                        };
                        counter.inc_by(keys.len() as u64);
                    }
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let span = if telemetry::in_trace() {
                        tracing::info_span!(
                            target: telemetry::SPANS,
                            "distcache.source.fetch",
                            distcache.keyspace = ks.name(),
                            distcache.keys = keys.len(),
                            distcache.hook = ks.config.spec.hook.is_some(),
                        )
                    } else {
                        tracing::Span::none()
                    };
                    let (fetched, cut) = fetch(&ks, source.as_ref(), &keys, left).instrument(span).await;
                    admission.record(&fetched);
                    // A refresh replaces the entry it refreshes (a fill only takes the place of no entry).
                    let replace = matches!(mode, Fetch::Background(Why::Revalidate | Why::RefreshAhead));
                    keys.into_iter()
                        .zip(fetched)
                        .map(|(key, r)| {
                            let failed = counts_as_failure(&r);
                            let name = Arc::clone(&key.0);
                            let answer = settle(&ks, &metrics, (tier, version, replace), key, r, cut);
                            match answer {
                                Err(e) if failed => {
                                    fallback(&ks, tier, &name, StaleWhy::SourceError).unwrap_or(Err(e))
                                }
                                answer => answer,
                            }
                        })
                        .collect()
                }
            };
            batch.fill(positions, results);
            batch.finish()
        }
        .boxed()
    }

    /// Builds the future that loads `keys` from their owner and fills the hot tier. When the owner cannot be
    /// reached, it fetches from the data source itself (or reports UNAVAILABLE for a cache-aside keyspace). An
    /// owner that is reachable but slow is not "down": its deadline covers its own fetch, and missing it is
    /// DEADLINE_EXCEEDED, never a second fetch from here. `forwarded`: this node passes on a peer's request.
    fn peer_load(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        owner: Member,
        keys: Vec<LoadKey>,
        forwarded: bool,
    ) -> BoxFuture<'static, KeyResults<Value>> {
        let ks = Arc::clone(ks);
        let this = Arc::clone(self);
        async move {
            let names: Vec<Arc<str>> = keys.iter().map(|(k, _, _)| Arc::clone(k)).collect();
            let deadline = ks.config.fetch_timeout + this.transport.timeout();
            match this.transport.load(&owner, &ks.config.name, names, deadline, forwarded).await {
                Ok(results) if results.len() == keys.len() => {
                    keys.into_iter().zip(results).map(|(key, r)| fill_copy(&ks, &owner, key, r)).collect()
                }
                Ok(results) => {
                    let message = format!("owner {} answered {} results for {} keys", owner.name, results.len(), keys.len());
                    vec![Err(EngineError::Internal(message)); keys.len()]
                }
                Err(e) if e.timed_out => {
                    this.metrics.peer_errors.inc();
                    let err = EngineError::Remote { code: Code::DeadlineExceeded, message: e.to_string() };
                    vec![Err(err); keys.len()]
                }
                Err(e) => {
                    this.metrics.peer_errors.inc();
                    ks.metrics.fallbacks.inc_by(keys.len() as u64);
                    tracing::debug!(owner = %owner.name, error = %e, keys = keys.len(), "owner unreachable; loading locally");
                    match ks.source.clone() {
                        // The epochs recorded before the hot-tier lookup still apply: an invalidation that
                        // arrived meanwhile must win over this fallback's result too.
                        Some(source) => this.source_load(&ks, source, keys, Tier::Hot, Fetch::Blocking).await,
                        None => vec![Err(peer_unreachable(&e)); keys.len()],
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
        let results = self.get_many_routed(&ks, keys, Route::Client).await;
        self.metrics.request("get_many", keyspace, Code::Ok);
        Ok(results)
    }

    /// Owner-side load of keys for a peer. Keys this node owns in its view are served here; the others are
    /// forwarded once to their owner in this view (views differ during a membership change), unless the request
    /// was already forwarded, in which case everything is served here. `from` is the calling node, vetted by the transport (its address is on the host the call came from, and
    /// with TLS the connection is a mutually authenticated peer). It is remembered as a holder of copies (see
    /// [`Engine::set_members`]): always when it is a current member under that name and address, otherwise — a
    /// node that already sees this one while this one does not see it yet — only while fewer than
    /// [`super::MAX_OUTSIDE_HOLDERS`] such callers are remembered, so made-up names cannot grow the map without bound.
    pub async fn load_for_peer(
        self: &Arc<Self>,
        keyspace: &str,
        keys: &[String],
        from: Option<Member>,
        forwarded: bool,
    ) -> Result<KeyResults<Value>, EngineError> {
        if let Some(m) = from
            && self.may_hold_copies(&m)
        {
            // One insert: a `match` on `get_mut` keeps the shard locked through its arms (the scrutinee lives
            // until the match ends), and inserting from an arm then deadlocks on that lock — which happened for
            // every peer that came back under its name with a new address (a recreated pod).
            self.copy_holders.insert(m.name, (m.address, std::time::Instant::now()));
        }
        let ks = self.keyspace(keyspace)?;
        validate_batch(keys.len())?;
        // A leaving node owns nothing: it passes even forwarded requests on.
        let route = if forwarded && !self.is_leaving() { Route::Here } else { Route::Peer };
        Ok(self.get_many_routed(&ks, keys, route).await)
    }

    /// Answers what the caches hold and loads the rest, one load per owner.
    async fn get_many_routed(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        keys: &[String],
        route: Route,
    ) -> KeyResults<Value> {
        let mut batch = Batch::new(keys.len());
        let valid = batch.split(keys, |key| validate_key(key).map(|()| key_hash(key)));
        let valid = valid.into_iter().map(|(i, hash)| (i, hash, hash));
        let groups = if route == Route::Here {
            vec![(None, valid.map(|(i, _, hash)| (i, hash)).collect())]
        } else {
            group_by_owner(&self.membership.ring(), &self.membership.local().name, valid)
        };
        let mut pending = Vec::new();
        for (owner, items) in groups {
            let misses = self.lookup(ks, owner.is_some(), keys, items, &mut batch);
            if !misses.is_empty() {
                pending.extend(self.load_misses(ks, owner, misses, &mut batch, route == Route::Peer));
            }
        }
        for (i, r) in futures::future::join_all(pending).await {
            batch.set(i, r);
        }
        batch.finish()
    }

    /// Starts the loads of one owner's misses through single flight; returns one future per key still to
    /// answer (a cache-aside keyspace answers NOT_FOUND for its own misses at once).
    fn load_misses(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        owner: Option<Member>,
        misses: Misses,
        batch: &mut Batch<Value>,
        forwarded: bool,
    ) -> Vec<BoxFuture<'static, (usize, Result<Value, EngineError>)>> {
        let names: Vec<Arc<str>> = misses.iter().map(|(_, (k, _, _))| Arc::clone(k)).collect();
        let recorded: std::collections::HashMap<Arc<str>, (u64, u64)> =
            misses.iter().map(|(_, (k, h, e))| (Arc::clone(k), (*h, *e))).collect();
        // The flight hands the leader the keys it leads; their hashes and epochs are the ones recorded here.
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
                if ks.source.is_none() && !self.in_grace() {
                    for (i, _) in &misses {
                        batch.set(*i, Err(EngineError::NotFound));
                    }
                    return Vec::new();
                }
                ks.source_flight.load_many(&names, |led| self.owner_load(ks, with_hash(led), Fetch::Blocking))
            }
            Some(owner) => {
                ks.metrics.forwarded.inc_by(misses.len() as u64);
                ks.peer_flight.load_many(&names, |led| self.peer_load(ks, owner, with_hash(led), forwarded))
            }
        };
        misses.into_iter().zip(futures).map(|((i, _), fut)| async move { (i, fut.await) }.boxed()).collect()
    }
}

impl Engine {
    /// Looks up one owner's keys in this node's tier for them (main when local, hot when remote): hits are
    /// answered in `batch`, misses returned with the epoch recorded before the lookup.
    fn lookup(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        remote: bool,
        keys: &[String],
        items: Vec<(usize, u64)>,
        batch: &mut Batch<Value>,
    ) -> Misses {
        let mut misses = Vec::new();
        for (i, hash) in items {
            let key = &keys[i];
            ks.store.touch(hash, key);
            let epoch = ks.store.epoch(hash);
            let answer = if remote {
                ks.store.get(Tier::Hot, key).map(|entry| {
                    ks.metrics.hits_hot.inc();
                    entry_to_value(entry)
                })
            } else {
                self.main_hit(ks, key, hash, epoch).map(Hit::into_value)
            };
            if let Some(answer) = answer {
                batch.set(i, answer);
            } else {
                ks.metrics.misses.inc();
                misses.push((i, (Arc::from(key.as_str()), hash, epoch)));
            }
        }
        misses
    }
}

/// The answer for a key whose fetch was refused or failed: the entry if it is still fresh (a refresh-ahead
/// that failed), or its value marked stale when it expired less than staleIfError ago (owners only: hot copies
/// are not kept past expiry). `None`: the error stands.
fn fallback(
    ks: &KeyspaceRuntime,
    tier: Tier,
    key: &str,
    why: StaleWhy,
) -> Option<Result<Value, EngineError>> {
    if tier != Tier::Main {
        return None;
    }
    let entry = ks.store.lookup(Tier::Main, key)?;
    let now = std::time::Instant::now();
    let Some(age) = entry.stale_for(now) else {
        return Some(entry_to_value(entry));
    };
    let window = ks.protect.settings.stale_if_error?;
    let bytes = entry.value?;
    if age > window {
        return None;
    }
    match why {
        StaleWhy::SourceError => ks.metrics.stale_source_error.inc(),
        StaleWhy::CircuitOpen => ks.metrics.stale_circuit_open.inc(),
        StaleWhy::RateLimited => ks.metrics.stale_rate_limited.inc(),
    };
    Some(Ok(stale_value(bytes)))
}

fn rate_limited(ks: &KeyspaceRuntime) -> EngineError {
    let rate = ks.protect.limiter.as_ref().map_or(0, crate::protect::Limiter::per_second);
    EngineError::ResourceExhausted(format!(
        "keyspace {}: source fetch rate limit ({rate}/s) reached",
        ks.config.name
    ))
}

fn circuit_open(ks: &KeyspaceRuntime, retry_in: Duration) -> EngineError {
    let when = if retry_in.is_zero() {
        "a probe fetch is in flight".to_owned()
    } else {
        format!("retrying in {:.1}s", retry_in.as_secs_f64())
    };
    EngineError::Unavailable(format!(
        "circuit open for keyspace {}: its data source failed too often, {when}",
        ks.config.name
    ))
}

/// Calls the data source for `keys` within the keyspace's fetchTimeout. Returns one result per key and whether
/// the fetchTimeout cut the fetch (rather than the source reporting a timeout of its own).
async fn fetch(
    ks: &KeyspaceRuntime,
    source: &dyn DataSource,
    keys: &[LoadKey],
    timeout: Duration,
) -> (Vec<Result<Fetched, FetchError>>, bool) {
    let started = std::time::Instant::now();
    let outcome = if let [(key, _, _)] = keys {
        match tokio::time::timeout(timeout, source.fetch(key)).await {
            Ok(r) => (vec![r], false),
            Err(_) => (vec![Err(FetchError::Timeout)], true),
        }
    } else {
        let names: Vec<String> = keys.iter().map(|(k, _, _)| k.to_string()).collect();
        match tokio::time::timeout(timeout, source.fetch_many(&names)).await {
            Ok(r) if r.len() == keys.len() => (r, false),
            Ok(r) => {
                let msg = format!("data source returned {} results for {} keys", r.len(), keys.len());
                (keys.iter().map(|_| Err(FetchError::Internal(msg.clone()))).collect(), false)
            }
            Err(_) => (keys.iter().map(|_| Err(FetchError::Timeout)).collect(), true),
        }
    };
    ks.metrics.fetch_seconds.observe(started.elapsed().as_secs_f64());
    outcome
}

/// Turns one fetch result into the reader's answer, filling `tier` with values and cached NOT_FOUNDs.
fn settle(
    ks: &KeyspaceRuntime,
    metrics: &Metrics,
    (tier, version, replace): (Tier, u64, bool),
    (key, hash, epoch): LoadKey,
    result: Result<Fetched, FetchError>,
    cut: bool,
) -> Result<Value, EngineError> {
    let name = &ks.config.name;
    let tier_ttl = |ttl: Option<Duration>| match tier {
        Tier::Main => ttl,
        Tier::Hot => Some(ttl.map_or(HOT_MAX_TTL, |t| t.min(HOT_MAX_TTL))),
    };
    ks.metrics.fetches_total.inc();
    match result {
        Ok(f) => {
            metrics.fetch(name, "ok");
            let ttl = f.ttl.or(ks.config.ttl);
            if ttl != Some(Duration::ZERO) {
                let entry = Entry::value(f.value.clone(), tier_ttl(ttl)).versioned(version);
                if replace {
                    ks.store.refill(&key, hash, Some(&entry), epoch);
                } else {
                    ks.store.fill(tier, &key, hash, &entry, epoch);
                }
            }
            Ok(Value { bytes: f.value, ttl, stale: false })
        }
        Err(FetchError::NotFound { negative_ttl }) => {
            metrics.fetch(name, "not_found");
            let negative = negative_ttl.or(ks.config.negative_ttl).filter(|t| !t.is_zero());
            match negative {
                Some(ttl) => {
                    let entry = Entry::not_found(tier_ttl(Some(ttl)).unwrap_or(ttl)).versioned(version);
                    if replace {
                        ks.store.refill(&key, hash, Some(&entry), epoch);
                    } else {
                        ks.store.fill(tier, &key, hash, &entry, epoch);
                    }
                }
                // The source no longer has the key: a value kept for it (refreshed, or expired and kept for
                // the stale windows) must not be answered again.
                None if tier == Tier::Main
                    && (replace
                        || ks
                            .store
                            .lookup(Tier::Main, &key)
                            .is_some_and(|e| e.is_expired(std::time::Instant::now()))) =>
                {
                    ks.store.refill(&key, hash, None, epoch);
                }
                None => {}
            }
            Err(EngineError::NotFound)
        }
        Err(FetchError::InvalidKey(m)) => {
            metrics.fetch(name, "invalid_key");
            Err(EngineError::InvalidArgument(format!(
                "data source of keyspace {name:?} rejected the key: {m}"
            )))
        }
        Err(FetchError::Unavailable(m)) => {
            metrics.fetch(name, "unavailable");
            Err(EngineError::Unavailable(format!("data source of keyspace {name:?} is unavailable: {m}")))
        }
        Err(FetchError::Timeout) => {
            metrics.fetch(name, "timeout");
            if cut {
                Err(EngineError::DeadlineExceeded {
                    keyspace: name.clone(),
                    timeout: ks.config.fetch_timeout,
                })
            } else {
                Err(EngineError::SourceTimedOut(format!(
                    "data source of keyspace {name:?} timed out (its own time limit)"
                )))
            }
        }
        Err(FetchError::Internal(m)) => {
            metrics.fetch(name, "internal");
            Err(EngineError::Internal(format!("data source of keyspace {name:?} failed: {m}")))
        }
    }
}

/// Keeps an owner's answer as a hot copy (a value only; cached NOT_FOUNDs stay with the owner).
fn fill_copy(
    ks: &KeyspaceRuntime,
    owner: &Member,
    (key, hash, epoch): LoadKey,
    result: Result<Value, EngineError>,
) -> Result<Value, EngineError> {
    match result {
        // A stale answer is not copied: it has no time left.
        Ok(v) if v.stale => Ok(v),
        Ok(v) => {
            let ttl = Some(v.ttl.map_or(HOT_MAX_TTL, |t| t.min(HOT_MAX_TTL)));
            ks.store.fill(Tier::Hot, &key, hash, &Entry::value(v.bytes.clone(), ttl), epoch);
            Ok(v)
        }
        // The owner has not loaded this keyspace yet (its reload lags ours): transient.
        Err(e) if e.code() == Code::FailedPrecondition => Err(EngineError::Unavailable(format!(
            "owner {} does not serve keyspace {:?} yet: {e}",
            owner.name, ks.config.name
        ))),
        Err(e) => Err(e),
    }
}
