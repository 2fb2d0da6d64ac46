//! Membership changes without stale reads, lost writes or cold caches.
//!
//! - **Every change moves what this node no longer owns** to the new owner ([`Engine::set_members`]): entries
//!   and recent deletes (tombstones), with their versions and remaining TTLs, applied "newer wins" by the
//!   receiver ([`Engine::accept_handoff`]). Nothing is dropped before it was offered to its owner.
//! - **A (re)joining member is brought up to date before it is admitted**: before this node puts a joiner into
//!   its ring (and so routes the joiner's keys to it), it pushes what it holds for those keys, including writes
//!   and deletes made while the joiner was out, and tells it to drop its hot copies (invalidations could not
//!   reach it). A node that was dropped by the others and comes back therefore never answers with a value that
//!   was overwritten or deleted meanwhile, once the others have re-admitted it.
//! - **Leaving** ([`Engine::leave`], on SIGTERM): the node tells every member it leaves (they drop it at once,
//!   until discovery stops listing it or the node, restarted, says it is back),
//!   stops owning anything (its own requests go to the next owners), and pushes its entries to them, hottest
//!   first, within the handoff budget. It keeps them until it exits, for previous-owner reads.
//! - **Previous-owner reads**: during the grace window after a change, a new owner that misses a key asks the
//!   key's previous owner (a member that still runs, or one that left gracefully) before its data source, so a
//!   key whose handoff has not arrived yet costs no fetch and a cache-aside key is not lost.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::{FutureExt, future::BoxFuture};

use super::Engine;
use crate::{
    keyspace::{KeyspaceRuntime, Value},
    peer::{HandoffBatch, HandoffReply},
    ring::{Member, Ring, key_hash},
    store::{Held, Tier},
};

/// How long a leave notice keeps a member out of the ring if discovery goes on listing it (discovery normally
/// drops a leaving node within a probe round: it answers pings with `leaving`).
const DEPARTED_FOR: Duration = Duration::from_mins(1);

/// Handoff settings (`handoff:` in the node config).
#[derive(Clone, Debug)]
pub struct HandoffSettings {
    /// Budget of one handoff: the pushes of a membership change, or of a leave.
    pub timeout: Duration,
    /// How long after a change a new owner asks a key's previous owner before its data source.
    pub grace: Duration,
    /// Largest batch of one handoff call, in bytes of keys and values.
    pub batch_bytes: usize,
}

impl Default for HandoffSettings {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(10), grace: Duration::from_secs(30), batch_bytes: 1 << 20 }
    }
}

/// The ring before the last membership change, while previous-owner reads use it.
pub(super) struct Previous {
    ring: Arc<Ring>,
    until: tokio::time::Instant,
    /// Previous owners that did not answer a peek: not asked again (a pod that is gone costs one timeout).
    silent: parking_lot::Mutex<HashSet<String>>,
}

/// What a handoff round sent, by keyspace: key → version, for entries the owner acknowledged.
type Sent = HashMap<String, HashMap<Arc<str>, u64>>;

/// A member away for longer than this may have missed deletes whose tombstones expired meanwhile.
const ABSENCE_TOMBSTONES_COVER: Duration = Duration::from_mins(5);

fn held_version(h: &Held) -> u64 {
    match h {
        Held::Entry(e) => e.version,
        Held::Deleted(v) => *v,
    }
}

fn held_bytes(key: &str, h: &Held) -> usize {
    key.len()
        + 32
        + match h {
            Held::Entry(e) => e.value.as_ref().map_or(0, bytes::Bytes::len),
            Held::Deleted(_) => 0,
        }
}

/// Entries by the member that owns them, as they move.
type Moving = HashMap<Member, Vec<(Arc<str>, Held)>>;

/// Adds each entry to the batch of its owner under `ring`; returns the entries the ring gives to `local` (or to
/// nobody: an empty ring), which stay.
fn group_by_owner(
    ring: &Ring,
    local: &str,
    entries: impl IntoIterator<Item = (Arc<str>, Held)>,
    moving: &mut Moving,
) -> Vec<(Arc<str>, Held)> {
    let mut stay = Vec::new();
    for (key, held) in entries {
        match ring.owner(key_hash(&key)).filter(|m| m.name != local) {
            Some(owner) => moving.entry(owner.clone()).or_default().push((key, held)),
            None => stay.push((key, held)),
        }
    }
    stay
}

/// Splits entries into batches of at most `max` bytes (at least one entry each).
fn chunks(entries: Vec<(Arc<str>, Held)>, max: usize) -> Vec<Vec<(Arc<str>, Held)>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for (k, h) in entries {
        let b = held_bytes(&k, &h);
        if !current.is_empty() && size + b > max {
            out.push(std::mem::take(&mut current));
            size = 0;
        }
        size += b;
        current.push((k, h));
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

impl Engine {
    /// The ring the node would have with `others` (plus itself unless leaving).
    fn ring_with(&self, others: &[Member]) -> Ring {
        let mut all: Vec<Member> = others.to_vec();
        if !self.is_leaving() {
            all.push(self.membership.local().clone());
        }
        Ring::new(all)
    }

    /// Discovery's members without those that announced their leave.
    fn effective_members(&self) -> Vec<Member> {
        let departed = self.departed.lock();
        let local = &self.membership.local().name;
        self.discovered
            .lock()
            .iter()
            .filter(|m| !departed.contains_key(&m.name) && &m.name != local)
            .cloned()
            .collect()
    }

    /// Applies a new set of other members from discovery. A joiner is brought up to date before it enters the
    /// ring; after the change, entries this node no longer owns move to their owners (see the module docs).
    pub async fn set_members(self: &Arc<Self>, others: &[Member]) {
        let first = !self.membership.is_known();
        let _one = self.ring_change.lock().await;
        {
            let now = tokio::time::Instant::now();
            // A departed member that discovery no longer lists is gone: it may come back later as a new process.
            self.departed.lock().retain(|name, until| *until > now && others.iter().any(|m| &m.name == name));
            *self.discovered.lock() = others.to_vec();
        }
        self.apply_members().await;
        if first {
            // A node that restarts faster than discovery notices (same name, same address) is still marked as
            // departed by the others: tell them this is a new process.
            let this = Arc::clone(self);
            let others = others.to_vec();
            tokio::spawn(async move {
                let notices = others.iter().map(|m| this.transport.handoff(m, HandoffBatch::default()));
                futures::future::join_all(notices).await;
            });
        }
    }

    /// Re-applies the members when a leave notice expired (discovery kept listing the member).
    pub async fn expire_departed(self: &Arc<Self>) {
        let now = tokio::time::Instant::now();
        let expired = {
            let mut departed = self.departed.lock();
            let before = departed.len();
            departed.retain(|_, until| *until > now);
            departed.len() != before
        };
        if expired {
            let _one = self.ring_change.lock().await;
            self.apply_members().await;
        }
    }

    /// Applies the effective members (must hold `ring_change`).
    async fn apply_members(self: &Arc<Self>) {
        let others = self.effective_members();
        let first = !self.membership.is_known();
        let old = self.membership.ring();
        let joiners: Vec<Member> = others.iter().filter(|m| !old.members().contains(m)).cloned().collect();
        let mut sent = Sent::new();
        if !first && !joiners.is_empty() && !self.is_leaving() {
            // Before the joiners get their keys' traffic from this node, they get what this node holds for them.
            let target = self.ring_with(&others);
            sent = self.push_moved(&target, Some(&joiners), false).await;
        }
        let changes = self.membership.update(&others);
        {
            let mut dropped = self.dropped.lock();
            for c in &changes {
                match c.kind {
                    crate::membership::ChangeKind::Leave => {
                        dropped.insert(c.member.name.clone(), (tokio::time::Instant::now(), self.hlc.now()));
                    }
                    _ => {
                        dropped.remove(&c.member.name);
                    }
                }
            }
        }
        let ring = self.membership.ring();
        self.metrics.members.set(i64::try_from(ring.len()).unwrap_or(i64::MAX));
        if changes.is_empty() {
            return;
        }
        for c in &changes {
            tracing::info!(member = %c.member.name, address = %c.member.address, change = ?c.kind, "membership changed");
        }
        // On the first member set, the keys' previous owners are the others (they served while this node was not
        // a member: it just started, or restarted).
        let previous_ring = if first { Arc::new(Ring::new(others.clone())) } else { old };
        self.previous.store(Some(Arc::new(Previous {
            ring: previous_ring,
            until: tokio::time::Instant::now() + self.handoff.grace,
            silent: parking_lot::Mutex::new(HashSet::new()),
        })));
        for ks in self.keyspaces.all() {
            // Hot copies: their owners may have changed, and a copy of a key this node now owns must not shadow
            // its main tier later.
            ks.store.drop_hot();
        }
        if !first && !self.is_leaving() {
            self.move_unowned(&ring, &sent).await;
        }
        // Connections are kept for members and recent copy holders (they are sent invalidations) only.
        let mut keep: HashSet<String> = ring.members().iter().map(|m| m.address.clone()).collect();
        keep.extend(self.copy_holders.iter().map(|e| e.value().0.clone()));
        keep.extend(self.departed.lock().keys().filter_map(|name| {
            self.discovered.lock().iter().find(|m| &m.name == name).map(|m| m.address.clone())
        }));
        self.transport.retain_addresses(&keep);
        // Keys listed for warm-up that this node owns now are loaded (those handed over are present).
        self.warm_up_all();
    }

    /// After a change: offers every main-tier entry this node no longer owns to its owner (those the pre-join
    /// push already delivered at the same version are not sent again), then drops them here.
    async fn move_unowned(self: &Arc<Self>, ring: &Arc<Ring>, already: &Sent) {
        let local = self.membership.local().name.clone();
        let mut pending = Vec::new();
        for ks in self.keyspaces.all() {
            let done = already.get(&ks.config.name);
            // Entries the pre-join push delivered at this version are only dropped here.
            let not_sent = ks.store.snapshot().into_iter().filter(|(key, held)| {
                let sent = done.and_then(|d| d.get(key)).is_some_and(|v| *v == held_version(held));
                if let (true, Held::Entry(e)) = (sent, held) {
                    ks.store.forget_moved(key, key_hash(key), e.version);
                }
                !sent
            });
            let mut moving = Moving::new();
            group_by_owner(ring, &local, not_sent, &mut moving);
            for (owner, entries) in moving {
                pending.push(self.send(Arc::clone(&ks), owner, entries, false, true));
            }
        }
        self.within_budget(futures::future::join_all(pending)).await;
    }

    /// Pushes what this node holds for keys that `target` gives to other members (only to `only`, when set),
    /// without dropping anything. Returns what the owners acknowledged.
    async fn push_moved(self: &Arc<Self>, target: &Ring, only: Option<&[Member]>, leaving: bool) -> Sent {
        let local = self.membership.local().name.clone();
        let mut pending = Vec::new();
        for ks in self.keyspaces.all() {
            let mut moving = Moving::new();
            group_by_owner(target, &local, ks.store.snapshot(), &mut moving);
            if let Some(only) = only {
                moving.retain(|owner, _| only.contains(owner));
                // Every joiner hears from this node, entries or not: it drops its hot copies.
                for m in only {
                    moving.entry(m.clone()).or_default();
                }
            }
            for (owner, entries) in moving {
                let admitted = only.is_some().then(|| self.stale_before(&owner.name));
                let ks = Arc::clone(&ks);
                let this = Arc::clone(self);
                pending.push(
                    async move {
                        let keyspace = ks.config.name.clone();
                        let sent = this.send_batches(&ks, &owner, entries, leaving, admitted).await;
                        (keyspace, sent)
                    }
                    .boxed(),
                );
            }
        }
        let mut sent = Sent::new();
        if let Some(results) = self.within_budget(futures::future::join_all(pending)).await {
            for (keyspace, keys) in results {
                sent.entry(keyspace).or_default().extend(keys);
            }
        }
        sent
    }

    /// Sends entries to their new owner; when `forget`, drops each batch here once offered (delivered or not:
    /// a node that no longer owns a key must not keep a copy that no one invalidates).
    fn send(
        self: &Arc<Self>,
        ks: Arc<KeyspaceRuntime>,
        owner: Member,
        entries: Vec<(Arc<str>, Held)>,
        leaving: bool,
        forget: bool,
    ) -> BoxFuture<'static, ()> {
        let this = Arc::clone(self);
        async move {
            let offered: Vec<(Arc<str>, u64)> = if forget {
                entries.iter().map(|(k, h)| (Arc::clone(k), held_version(h))).collect()
            } else {
                Vec::new()
            };
            this.send_batches(&ks, &owner, entries, leaving, None).await;
            for (key, version) in offered {
                ks.store.forget_moved(&key, key_hash(&key), version);
            }
        }
        .boxed()
    }

    /// For a joiner this node dropped long ago: the version before which its entries cannot be trusted (0 =
    /// all can: the deletes made while it was out are still remembered here).
    fn stale_before(&self, name: &str) -> u64 {
        match self.dropped.lock().get(name) {
            Some((at, version)) if at.elapsed() >= ABSENCE_TOMBSTONES_COVER => *version,
            _ => 0,
        }
    }

    /// Sends entries in batches (the first one with `admitted` and its `stale_before`, when given); returns the
    /// keys (and versions) the owner acknowledged.
    async fn send_batches(
        &self,
        ks: &KeyspaceRuntime,
        owner: &Member,
        entries: Vec<(Arc<str>, Held)>,
        leaving: bool,
        admitted: Option<u64>,
    ) -> HashMap<Arc<str>, u64> {
        // Cached NOT_FOUNDs do not move: the new owner asks its source (or previous owner) again.
        let entries: Vec<(Arc<str>, Held)> =
            entries.into_iter().filter(|(_, h)| !matches!(h, Held::Entry(e) if e.value.is_none())).collect();
        let mut acknowledged = HashMap::new();
        let batches =
            if entries.is_empty() { vec![Vec::new()] } else { chunks(entries, self.handoff.batch_bytes) };
        for (i, batch) in batches.into_iter().enumerate() {
            if batch.is_empty() && admitted.is_none() {
                continue;
            }
            let versions: Vec<(Arc<str>, u64)> =
                batch.iter().map(|(k, h)| (Arc::clone(k), held_version(h))).collect();
            let n = batch.len() as u64;
            let call = HandoffBatch {
                keyspace: ks.config.name.clone(),
                entries: batch,
                leaving,
                admitted: admitted.is_some(),
                stale_before: if i == 0 { admitted.unwrap_or(0) } else { 0 },
            };
            match self.transport.handoff(owner, call).await {
                Ok(HandoffReply { applied, ignored }) => {
                    self.metrics.handoff("sent", n);
                    tracing::debug!(owner = %owner.name, keyspace = %ks.config.name, applied, ignored, "handed off");
                    acknowledged.extend(versions);
                }
                Err(e) => {
                    self.metrics.peer_errors.inc();
                    tracing::warn!(owner = %owner.name, keyspace = %ks.config.name, entries = n, error = %e,
                        "handoff failed; the new owner loads these keys again");
                }
            }
        }
        acknowledged
    }

    /// Runs `work` within the handoff budget; `None` (and a warning) when the budget ran out.
    async fn within_budget<T>(&self, work: impl std::future::Future<Output = T>) -> Option<T> {
        let done = tokio::time::timeout(self.handoff.timeout, work).await.ok();
        if done.is_none() {
            tracing::warn!(budget = ?self.handoff.timeout, "handoff did not finish within its budget; the rest is loaded again by the new owners");
        }
        done
    }

    /// Leaves the cluster (SIGTERM): tells every member, stops owning keys, and pushes every entry to its next
    /// owner, hottest first, within the handoff budget. Entries stay here until the process exits, so the new
    /// owners can still ask for keys whose push has not arrived. Returns the number of entries acknowledged.
    pub async fn leave(self: &Arc<Self>) -> usize {
        let ring = self.membership.ring();
        let local = self.membership.local().name.clone();
        let others: Vec<Member> = ring.members().iter().filter(|m| m.name != local).cloned().collect();
        // The notice first: the owners-to-be drop this node before the entries arrive, so they own them.
        let notices = others.iter().map(|m| {
            let call = HandoffBatch { leaving: true, ..HandoffBatch::default() };
            async move { (m, self.transport.handoff(m, call).await) }
        });
        for (m, r) in self.within_budget(futures::future::join_all(notices)).await.unwrap_or_default() {
            if let Err(e) = r {
                tracing::warn!(member = %m.name, error = %e, "could not tell a member that this node leaves");
            }
        }
        {
            let _one = self.ring_change.lock().await;
            self.membership.set_leaving();
            self.apply_members().await;
        }
        let target = self.membership.ring();
        let sent = self.push_moved(&target, None, true).await;
        let n: usize = sent.values().map(HashMap::len).sum();
        tracing::info!(entries = n, members = others.len(), "left the cluster; entries handed off");
        n
    }

    /// Applies entries handed to this node, "newer wins"; a leave notice first drops the sender from the ring.
    /// A leaving node passes what it receives on to the owners in its view.
    pub async fn accept_handoff(
        self: &Arc<Self>,
        from: &str,
        keyspace: &str,
        entries: Vec<(Arc<str>, Option<Held>)>,
        (leaving, admitted): (bool, bool),
        stale_before: u64,
    ) -> HandoffReply {
        if leaving && !from.is_empty() {
            let fresh = self
                .departed
                .lock()
                .insert(from.to_owned(), tokio::time::Instant::now() + DEPARTED_FOR)
                .is_none();
            if fresh {
                tracing::info!(member = from, "member leaves; dropping it from the ring");
                let _one = self.ring_change.lock().await;
                self.apply_members().await;
            }
        }
        if !leaving && keyspace.is_empty() && self.departed.lock().remove(from).is_some() {
            tracing::info!(member = from, "member is back after leaving");
            let _one = self.ring_change.lock().await;
            self.apply_members().await;
        }
        if keyspace.is_empty() {
            return HandoffReply::default();
        }
        let Some(ks) = self.keyspaces.get(keyspace) else {
            tracing::warn!(keyspace, from, "handoff for a keyspace this node does not serve; ignored");
            return HandoffReply { applied: 0, ignored: u32::try_from(entries.len()).unwrap_or(u32::MAX) };
        };
        if admitted {
            ks.store.drop_hot();
        }
        if stale_before > 0 && !self.is_leaving() {
            tracing::warn!(
                keyspace,
                from,
                "this node was out of the ring for longer than deletes are remembered: dropping its entries from before"
            );
            ks.store.forget_older_than(stale_before);
        }
        let entries: Vec<(Arc<str>, Held)> = entries.into_iter().filter_map(|(k, h)| Some((k, h?))).collect();
        for (_, h) in &entries {
            self.hlc.observe(held_version(h));
        }
        if self.is_leaving() {
            // Not an owner any more: pass them on (newer wins there too).
            let mut by_owner = Moving::new();
            let stay = group_by_owner(
                &self.membership.ring(),
                &self.membership.local().name,
                entries,
                &mut by_owner,
            );
            let mut applied = 0u32;
            for (k, h) in stay {
                applied += u32::from(ks.store.merge(&k, key_hash(&k), h));
            }
            for (owner, batch) in by_owner {
                let n = u32::try_from(batch.len()).unwrap_or(u32::MAX);
                if !self.send_batches(&ks, &owner, batch, true, None).await.is_empty() {
                    applied += n;
                }
            }
            return HandoffReply { applied, ignored: 0 };
        }
        let mut reply = HandoffReply::default();
        let mut changed = Vec::new();
        for (k, h) in entries {
            let hash = key_hash(&k);
            if ks.store.merge(&k, hash, h) {
                reply.applied += 1;
                changed.push(k);
            } else {
                reply.ignored += 1;
            }
        }
        self.metrics.handoff("received", u64::from(reply.applied));
        self.metrics.handoff("ignored", u64::from(reply.ignored));
        if !changed.is_empty() {
            // Another node may have copied the older value from here before this arrived (it admitted this node
            // before the sender did): such copies go, as after a write.
            self.invalidate_copies(&ks.config.name, changed).await;
        }
        reply
    }

    /// What this node holds in memory for keys (no fetch, no forwarding), for a new owner's previous-owner read.
    pub fn peek(&self, keyspace: &str, keys: &[Arc<str>]) -> Vec<Option<Held>> {
        let Some(ks) = self.keyspaces.get(keyspace) else { return vec![None; keys.len()] };
        keys.iter()
            .map(|k| ks.store.held(k).filter(|h| !matches!(h, Held::Entry(e) if e.value.is_none())))
            .collect()
    }

    /// The previous owner to ask for a key this node now owns, during the grace window: a member of the ring
    /// before the last change that still runs (a member now, or one that left gracefully).
    fn previous_owner(&self, hash: u64) -> Option<Member> {
        let previous = self.previous.load_full()?;
        if tokio::time::Instant::now() >= previous.until {
            return None;
        }
        let local = &self.membership.local().name;
        let mut owner = previous.ring.owner(hash)?.clone();
        if &owner.name == local {
            // It was this node's: if the ring now names another owner, this node's entry went there (a request
            // routed here just before the change can miss after the entry moved).
            owner = self.membership.ring().owner(hash)?.clone();
            if &owner.name == local {
                return None;
            }
        }
        // Asked whether it is still a member or not: a member that leaves gracefully answers until it exits, and
        // discovery may drop it before its leave notice arrives. One that does not answer (it crashed, or is cut
        // off) is not asked again during this window: a peek waits at most a short deadline once.
        (!previous.silent.lock().contains(&owner.name)).then_some(owner)
    }

    /// True while a previous-owner read may apply (a change happened within the grace window).
    pub(super) fn in_grace(&self) -> bool {
        self.previous.load().as_ref().is_some_and(|p| tokio::time::Instant::now() < p.until)
    }

    /// Asks the keys' previous owners for what they hold; stores what they answer in the main tier unless
    /// something newer is here (a write or a delete since). Returns one answer per key: `Some(Ok)` a value,
    /// `Some(Err)` deleted there, `None` nothing known.
    pub(super) async fn ask_previous_owners(
        &self,
        ks: &KeyspaceRuntime,
        keys: &[super::LoadKey],
    ) -> Vec<Option<Result<Value, ()>>> {
        let mut answers = vec![None; keys.len()];
        let mut groups: HashMap<Member, Vec<usize>> = HashMap::new();
        for (i, (key, hash, _)) in keys.iter().enumerate() {
            // Deleted here: nothing a previous owner holds is newer.
            if matches!(ks.store.held(key), Some(Held::Deleted(_))) {
                continue;
            }
            let owner = self.previous_owner(*hash);
            tracing::debug!(key = %key, previous_owner = ?owner.as_ref().map(|m| &m.name), "miss during the grace window");
            if let Some(owner) = owner {
                groups.entry(owner).or_default().push(i);
            }
        }
        if groups.is_empty() {
            return answers;
        }
        let calls = groups.into_iter().map(|(owner, positions)| {
            let names: Vec<Arc<str>> = positions.iter().map(|&i| Arc::clone(&keys[i].0)).collect();
            async move { (positions, self.transport.peek(&owner, &ks.config.name, names).await, owner) }
        });
        for (positions, result, owner) in futures::future::join_all(calls).await {
            let held = match result {
                Ok(h) if h.len() == positions.len() => h,
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(owner = %owner.name, error = %e, "previous owner did not answer; loading from the source");
                    if let Some(p) = self.previous.load_full() {
                        p.silent.lock().insert(owner.name.clone());
                    }
                    continue;
                }
            };
            for (i, h) in positions.into_iter().zip(held) {
                let (key, hash, _) = &keys[i];
                tracing::debug!(key = %key, owner = %owner.name, held = ?h.as_ref().map(|h| match h { Held::Entry(e) => e.version, Held::Deleted(v) => *v }), "previous owner answered");
                match h {
                    Some(Held::Entry(e)) => {
                        self.hlc.observe(e.version);
                        // Newer wins, not the epoch: a membership change bumps every epoch (it drops the hot
                        // tier), and a read that spans it must still get the previous owner's value. A write or
                        // delete here since is newer, and stays.
                        ks.store.merge(key, *hash, Held::Entry(e));
                        // What is here now: the peeked entry, or a write that landed meanwhile. Nothing means the
                        // key was deleted here later than the peeked version: the source decides.
                        if let Some(Ok(v)) = ks.store.get(Tier::Main, key).map(super::entry_to_value) {
                            self.metrics.previous_owner_hits.inc();
                            answers[i] = Some(Ok(v));
                        }
                    }
                    Some(Held::Deleted(v)) => {
                        self.hlc.observe(v);
                        ks.store.merge(key, *hash, Held::Deleted(v));
                        answers[i] = Some(Err(()));
                    }
                    None => {}
                }
            }
        }
        answers
    }

    /// For keys this node stored although it does not own them in its view (a forwarded write while views
    /// differ): pushes them to their owner now, so the write is where readers look once views agree.
    pub(super) async fn push_to_owners(self: &Arc<Self>, ks: &Arc<KeyspaceRuntime>, keys: &[Arc<str>]) {
        let held = keys.iter().filter_map(|k| Some((Arc::clone(k), ks.store.held(k)?)));
        let mut by_owner = Moving::new();
        group_by_owner(&self.membership.ring(), &self.membership.local().name, held, &mut by_owner);
        for (owner, batch) in by_owner {
            self.send_batches(ks, &owner, batch, false, None).await;
        }
    }

    /// The next version for a write or a fill on this node.
    pub(super) fn next_version(&self) -> u64 {
        self.hlc.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Entry;

    #[test]
    fn batches_respect_the_byte_limit_and_keep_every_entry() {
        let entries: Vec<(Arc<str>, Held)> = (0..100)
            .map(|i| {
                let e = Entry::value(bytes::Bytes::from(vec![0u8; 100]), None).versioned(i);
                (Arc::from(format!("k{i}")), Held::Entry(e))
            })
            .collect();
        let batches = chunks(entries, 1000);
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 100);
        assert!(batches.iter().all(|b| b.iter().map(|(k, h)| held_bytes(k, h)).sum::<usize>() <= 1000));
    }
}
