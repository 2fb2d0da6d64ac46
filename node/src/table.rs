//! One cache tier: a byte-bounded hash table of entries with CLOCK eviction, built for a small footprint per entry
//! and reads that never allocate in the table or write to shared bookkeeping.
//!
//! Layout: the table is split into up to [`SHARDS`] shards by key hash, each behind a reader-writer lock. A shard keeps
//! its entries in a slab (`Vec<Option<Arc<[u8]>>>`, holes reused), a hash index of slab positions
//! (`hashbrown::HashTable<u32>`, 5 bytes per bucket) and a 4-byte *meta* word per slot: 31 bits of the key's hash
//! (so that growing the index rehashes without touching the entries: a few µs per thousand entries) and a
//! *visited* bit. An entry is a single allocation holding a 20-byte header, the key and the value (see
//! [`Node`]); with a 16-byte key and a 100-byte value that is one 160-byte malloc chunk, plus about 35 bytes of
//! slab, meta and index.
//!
//! - **Reads** take the shard's read lock, find the entry, set its visited bit (skipped when it is already set)
//!   and clone the entry's `Arc`. Nothing else is written: no access queue, no read log.
//! - **Eviction** is CLOCK per shard: when the table's bytes exceed its capacity, the writer that went over evicts
//!   from the shards in turn (a rotating shard hand); in each, a hand sweeps the slab, clearing visited bits and
//!   evicting the first entry that was not read since the hand last passed it. Expired entries met on the way go
//!   first (they are not counted as evictions).
//! - **Expiry** is checked on every read (an entry past its deadline is never answered). Expired entries are
//!   reclaimed by the sweep, by [`Table::run_pending_tasks`] (which a metrics scrape calls) and by writes,
//!   which look at two slots of their shard beyond the expiry hand each time.
//!
//! Why not moka (used before): its per-entry bookkeeping (entry, access and write order queue nodes, timer
//! wheel, frequency sketch, table slot) measured about 400 bytes per entry, 2.5× Redis's RSS for 1 M small
//! entries, and its read bookkeeping (access-order deque, read log) took a third of the CPU of pipelined GETs.

use std::{
    hash::BuildHasher,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use hashbrown::HashTable;
use parking_lot::RwLock;
use prometheus_client::metrics::counter::Counter;

use crate::store::Entry;

/// Shards of a large table (a power of two). Many, so that each shard's index is small and grows in a short
/// pause (its growth blocks the shard's writers and readers).
const SHARDS: usize = 256;

/// A table gets a shard per this many bytes of capacity (up to [`SHARDS`]): a small table has few shards, so
/// that its CLOCK is close to one over all its entries.
const BYTES_PER_SHARD: u64 = 256 << 10;

/// Bytes of an entry's header: version (8), expiry in µs (6), lifetime in ms with the negative flag (4), key
/// length (2).
const HEADER: usize = 20;

/// The visited bit of a slot's meta word; the other 31 bits are the key's index hash.
const VISITED: u32 = 1 << 31;

/// Set in the lifetime field of a cached NOT_FOUND.
const NEGATIVE: u32 = 1 << 31;

/// The largest expiry offset the header holds (48 bits of microseconds: about 8.9 years after the process
/// started); later deadlines are stored as this one.
const MAX_EXPIRY_US: u64 = (1 << 48) - 1;

/// Slots a write looks at beyond the expiry hand, to reclaim expired entries without a background task.
const EXPIRY_STEPS_PER_WRITE: usize = 2;

/// The instant expiry offsets count from.
static BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

fn micros_since_base(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*BASE).as_nanos().div_ceil(1000)).unwrap_or(u64::MAX)
}

fn now_us() -> u64 {
    micros_since_base(Instant::now())
}

/// An entry in its stored form: `[version u64][expiry µs u48, 0 = never][lifetime ms u31 | NEGATIVE][key len
/// u16][key][value]`, little-endian. The expiry is offset by one (0 means "never").
struct Node;

impl Node {
    fn encode(key: &str, entry: &Entry) -> Option<Arc<[u8]>> {
        let key_len = u16::try_from(key.len()).ok()?;
        let value = entry.value.as_deref().unwrap_or_default();
        let expiry = entry.expires_at.map_or(0, |at| (micros_since_base(at) + 1).min(MAX_EXPIRY_US));
        let mut lifetime = entry.lifetime_ms.min(NEGATIVE - 1);
        if entry.value.is_none() {
            lifetime |= NEGATIVE;
        }
        let len = HEADER + key.len() + value.len();
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let fill = |buf: &mut Vec<u8>| {
            buf.clear();
            buf.extend_from_slice(&entry.version.to_le_bytes());
            buf.extend_from_slice(&expiry.to_le_bytes()[..6]);
            buf.extend_from_slice(&lifetime.to_le_bytes());
            buf.extend_from_slice(&key_len.to_le_bytes());
            buf.extend_from_slice(key.as_bytes());
            buf.extend_from_slice(value);
            Arc::<[u8]>::from(&buf[..])
        };
        // One allocation per entry: the bytes are assembled in a reused buffer (values up to 64 KiB) and copied
        // into the `Arc` once.
        if len <= 64 << 10 {
            SCRATCH
                .with(|s| s.try_borrow_mut().ok().map(|mut buf| fill(&mut buf)))
                .or_else(|| Some(fill(&mut Vec::with_capacity(len))))
        } else {
            Some(fill(&mut Vec::with_capacity(len)))
        }
    }

    fn key_len(node: &[u8]) -> usize {
        usize::from(u16::from_le_bytes([node[18], node[19]]))
    }

    fn key(node: &[u8]) -> &[u8] {
        &node[HEADER..HEADER + Self::key_len(node)]
    }

    fn expiry(node: &[u8]) -> u64 {
        let mut b = [0u8; 8];
        b[..6].copy_from_slice(&node[8..14]);
        u64::from_le_bytes(b)
    }

    fn lifetime_field(node: &[u8]) -> u32 {
        u32::from_le_bytes([node[14], node[15], node[16], node[17]])
    }

    fn is_value(node: &[u8]) -> bool {
        Self::lifetime_field(node) & NEGATIVE == 0
    }

    fn version(node: &[u8]) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&node[..8]);
        u64::from_le_bytes(b)
    }

    /// Bytes of key and value.
    fn payload(node: &[u8]) -> u64 {
        (node.len() - HEADER) as u64
    }

    /// Where the value starts.
    fn value_at(node: &[u8]) -> usize {
        HEADER + Self::key_len(node)
    }

    /// The value as `Bytes` pointing into the entry; `None` for a cached NOT_FOUND.
    fn value_bytes(node: &Arc<[u8]>) -> Option<Bytes> {
        Self::is_value(node)
            .then(|| Bytes::from_owner(ValueOf { node: Arc::clone(node), at: Self::value_at(node) }))
    }

    /// When it expires; `None` = never.
    fn expires_at(node: &[u8]) -> Option<Instant> {
        let expiry = Self::expiry(node);
        (expiry > 0).then(|| *BASE + Duration::from_micros(expiry - 1))
    }

    /// Its lifetime (the TTL it was written with) in ms.
    fn lifetime_ms(node: &[u8]) -> u32 {
        Self::lifetime_field(node) & !NEGATIVE
    }

    fn decode(node: &Arc<[u8]>) -> Entry {
        Entry {
            value: Self::value_bytes(node),
            expires_at: Self::expires_at(node),
            version: Self::version(node),
            lifetime_ms: Self::lifetime_ms(node),
        }
    }
}

/// The value of a stored entry, handed out as `Bytes` without copying it.
struct ValueOf {
    node: Arc<[u8]>,
    at: usize,
}

impl AsRef<[u8]> for ValueOf {
    fn as_ref(&self) -> &[u8] {
        &self.node[self.at..]
    }
}

/// An entry as the table holds it, shared with the table: cloning it or reading its value copies and allocates
/// nothing (the RESP hit path writes the value straight from here).
#[derive(Clone)]
pub struct Stored(Arc<[u8]>);

impl Stored {
    /// The value; `None` for a cached NOT_FOUND.
    pub fn value(&self) -> Option<&[u8]> {
        Node::is_value(&self.0).then(|| &self.0[Node::value_at(&self.0)..])
    }

    /// The value as `Bytes` (pointing into the entry; one small allocation for the handle).
    pub fn value_bytes(&self) -> Option<Bytes> {
        Node::value_bytes(&self.0)
    }

    /// When it expires; `None` = never.
    pub fn expires_at(&self) -> Option<Instant> {
        Node::expires_at(&self.0)
    }

    /// The whole entry.
    pub fn to_entry(&self) -> Entry {
        Node::decode(&self.0)
    }

    /// See [`Entry::refresh_due`].
    pub fn refresh_due(&self, now: Instant, fraction: f64) -> bool {
        crate::store::refresh_due(self.expires_at(), Node::lifetime_ms(&self.0), now, fraction)
    }
}

#[derive(Default)]
struct Shard {
    /// Slab positions by key hash.
    index: HashTable<u32>,
    slots: Vec<Option<Arc<[u8]>>>,
    /// One per slot: the key's index hash (31 bits) and [`VISITED`], set when read since the CLOCK hand last
    /// passed.
    meta: Vec<AtomicU32>,
    /// Empty slots, reused first.
    free: Vec<u32>,
    /// The CLOCK hand (a slot position).
    hand: usize,
    /// Where writes look for expired entries next.
    expiry_hand: usize,
}

/// What removing entries from a shard freed.
#[derive(Default)]
struct Freed {
    entries: u64,
    payload: u64,
}

impl Freed {
    fn add(&mut self, node: &[u8]) {
        self.entries += 1;
        self.payload += Node::payload(node);
    }
}

/// One cache tier (see the module documentation).
pub struct Table {
    shards: Box<[RwLock<Shard>]>,
    hasher: foldhash::fast::RandomState,
    /// Byte budget: the entries' key and value bytes plus `overhead` each.
    capacity: u64,
    overhead: u64,
    bytes: AtomicU64,
    entries: AtomicU64,
    /// The shard the next eviction starts in.
    shard_hand: AtomicUsize,
    /// Counts evictions for lack of room.
    evictions: Option<Counter>,
    /// How long past their expiry values stay readable (the keyspace's stale windows), in nanoseconds; negative
    /// entries are dropped at their expiry.
    keep: Option<Arc<AtomicU64>>,
}

impl Table {
    /// A table holding at most `capacity` bytes, weighing each entry as its key and value bytes plus `overhead`.
    pub fn new(
        capacity: u64,
        overhead: u64,
        evictions: Option<Counter>,
        keep: Option<Arc<AtomicU64>>,
    ) -> Self {
        Self {
            shards: (0..shard_count(capacity)).map(|_| RwLock::new(Shard::default())).collect(),
            hasher: foldhash::fast::RandomState::default(),
            capacity,
            overhead,
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            shard_hand: AtomicUsize::new(0),
            evictions,
            keep,
        }
    }

    /// The key's hash: its bits from 40 on pick the shard, its low 31 bits are the index hash.
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> &RwLock<Shard> {
        // Reason: the index is below SHARDS. The shard takes hash bits the index's buckets do not use.
        #[allow(clippy::cast_possible_truncation)]
        &self.shards[(hash >> 40) as usize & (self.shards.len() - 1)]
    }

    /// The last microsecond (since `BASE`) at which a node may still be answered; `u64::MAX` without expiry.
    fn deadline(&self, node: &[u8]) -> u64 {
        let expiry = Node::expiry(node);
        if expiry == 0 {
            return u64::MAX;
        }
        let keep = match &self.keep {
            Some(keep) if Node::is_value(node) => keep.load(Ordering::Relaxed) / 1000,
            _ => 0,
        };
        (expiry - 1).saturating_add(keep)
    }

    fn live(&self, node: &[u8], now: &mut Option<u64>) -> bool {
        let deadline = self.deadline(node);
        deadline == u64::MAX || deadline > *now.get_or_insert_with(now_us)
    }

    fn weight(&self, payload: u64) -> u64 {
        payload + self.overhead
    }

    /// Looks a key up: its entry unless it has passed its deadline (its expiry, plus the stale windows for
    /// values). Marks it visited.
    #[inline]
    pub fn get(&self, key: &str) -> Option<Entry> {
        self.get_stored(key).map(|s| s.to_entry())
    }

    /// [`Table::get`], the entry as stored.
    #[inline]
    pub fn get_stored(&self, key: &str) -> Option<Stored> {
        let hash = self.hash(key.as_bytes());
        let shard = self.shard(hash).read();
        let slot =
            *shard.index.find(index_hash(hash), |&i| slot_key(&shard.slots, i) == Some(key.as_bytes()))?;
        let node = shard.slots[slot as usize].as_ref()?;
        if !self.live(node, &mut None) {
            return None;
        }
        let meta = &shard.meta[slot as usize];
        if meta.load(Ordering::Relaxed) & VISITED == 0 {
            meta.fetch_or(VISITED, Ordering::Relaxed);
        }
        Some(Stored(Arc::clone(node)))
    }

    /// Whether the key has an entry that [`Table::get`] would answer (without marking it visited).
    pub fn contains_key(&self, key: &str) -> bool {
        let hash = self.hash(key.as_bytes());
        let shard = self.shard(hash).read();
        shard
            .index
            .find(index_hash(hash), |&i| slot_key(&shard.slots, i) == Some(key.as_bytes()))
            .and_then(|&i| shard.slots[i as usize].as_ref())
            .is_some_and(|node| self.live(node, &mut None))
    }

    /// Inserts or replaces the entry of a key. An entry heavier than the whole capacity is not stored (and the
    /// key's previous entry is dropped), counted as an eviction; so is a key longer than 65,535 bytes.
    pub fn insert(&self, key: &str, entry: &Entry) {
        let payload = (key.len() + entry.value.as_ref().map_or(0, Bytes::len)) as u64;
        let node = match Node::encode(key, entry) {
            Some(node) if self.weight(payload) <= self.capacity => node,
            _ => {
                self.invalidate(key);
                if let Some(evictions) = &self.evictions {
                    evictions.inc();
                }
                return;
            }
        };
        let hash = self.hash(key.as_bytes());
        let mut freed = Freed::default();
        {
            let mut guard = self.shard(hash).write();
            let shard = &mut *guard;
            let found = shard
                .index
                .find(index_hash(hash), |&i| slot_key(&shard.slots, i) == Some(key.as_bytes()))
                .copied();
            if let Some(i) = found {
                if let Some(old) = shard.slots[i as usize].replace(node) {
                    freed.add(&old);
                }
            } else {
                let i = shard.place(node, hash);
                let Shard { index, meta, .. } = shard;
                index.insert_unique(index_hash(hash), i, |&j| {
                    meta.get(j as usize).map_or(0, |m| index_hash(u64::from(m.load(Ordering::Relaxed))))
                });
            }
            self.expire_some(shard, &mut freed);
        }
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(self.weight(payload), Ordering::Relaxed);
        self.release(&freed);
        self.evict_to_capacity();
    }

    /// Removes a key's entry, if any.
    pub fn invalidate(&self, key: &str) {
        let hash = self.hash(key.as_bytes());
        let mut freed = Freed::default();
        {
            let mut guard = self.shard(hash).write();
            let shard = &mut *guard;
            let Shard { index, slots, .. } = shard;
            let Ok(found) =
                index.find_entry(index_hash(hash), |&i| slot_key(slots, i) == Some(key.as_bytes()))
            else {
                return;
            };
            let (i, _) = found.remove();
            if let Some(node) = shard.vacate(i) {
                freed.add(&node);
            }
        }
        self.release(&freed);
    }

    /// Removes every entry.
    pub fn invalidate_all(&self) {
        for shard in &*self.shards {
            let mut freed = Freed::default();
            {
                let mut guard = shard.write();
                for node in guard.slots.iter().flatten() {
                    freed.add(node);
                }
                *guard = Shard::default();
            }
            self.release(&freed);
        }
    }

    /// Removes every entry for which `remove` returns true.
    pub fn invalidate_entries_if(&self, mut remove: impl FnMut(&Entry) -> bool) {
        for shard in &*self.shards {
            let mut freed = Freed::default();
            {
                let mut guard = shard.write();
                let doomed: Vec<usize> = guard
                    .slots
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| n.as_ref().filter(|n| remove(&Node::decode(n))).map(|_| i))
                    .collect();
                for i in doomed {
                    if let Some(node) = guard.remove_slot(i) {
                        freed.add(&node);
                    }
                }
            }
            self.release(&freed);
        }
    }

    /// A snapshot of every entry that [`Table::get`] would answer, with its key.
    pub fn entries(&self) -> Vec<(Arc<str>, Entry)> {
        let mut all = Vec::with_capacity(usize::try_from(self.entry_count()).unwrap_or(0));
        let mut now = None;
        for shard in &*self.shards {
            let guard = shard.read();
            for node in guard.slots.iter().flatten() {
                if self.live(node, &mut now)
                    && let Ok(key) = std::str::from_utf8(Node::key(node))
                {
                    all.push((Arc::from(key), Node::decode(node)));
                }
            }
        }
        all
    }

    /// Reclaims every expired entry, so that [`Table::entry_count`] and [`Table::weighted_size`] are exact. Scans
    /// each shard in chunks under its read lock, taking the write lock only for a chunk that has expired entries,
    /// so that reads go on during the scan.
    pub fn run_pending_tasks(&self) {
        const CHUNK: usize = 1024;
        let mut now = None;
        for shard in &*self.shards {
            let mut start = 0;
            loop {
                let expired: Vec<usize> = {
                    let guard = shard.read();
                    if start >= guard.slots.len() {
                        break;
                    }
                    let end = (start + CHUNK).min(guard.slots.len());
                    (start..end)
                        .filter(|&i| guard.slots[i].as_ref().is_some_and(|n| !self.live(n, &mut now)))
                        .collect()
                };
                start += CHUNK;
                if expired.is_empty() {
                    continue;
                }
                let mut freed = Freed::default();
                {
                    let mut guard = shard.write();
                    for i in expired {
                        // Checked again: the slot may have been rewritten since the read.
                        if guard
                            .slots
                            .get(i)
                            .and_then(Option::as_ref)
                            .is_some_and(|n| !self.live(n, &mut now))
                            && let Some(node) = guard.remove_slot(i)
                        {
                            freed.add(&node);
                        }
                    }
                }
                self.release(&freed);
            }
        }
    }

    /// Entries held (expired ones not reclaimed yet included).
    pub fn entry_count(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// Weighed bytes held.
    pub fn weighted_size(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn release(&self, freed: &Freed) {
        if freed.entries > 0 {
            self.entries.fetch_sub(freed.entries, Ordering::Relaxed);
            self.bytes.fetch_sub(freed.payload + freed.entries * self.overhead, Ordering::Relaxed);
        }
    }

    /// Looks at the next few slots past the shard's expiry hand and removes the expired entries among them.
    fn expire_some(&self, shard: &mut Shard, freed: &mut Freed) {
        let len = shard.slots.len();
        if len == 0 {
            return;
        }
        let mut now = None;
        for _ in 0..EXPIRY_STEPS_PER_WRITE.min(len) {
            let i = shard.expiry_hand % len;
            shard.expiry_hand = i + 1;
            if shard.slots[i].as_ref().is_some_and(|n| !self.live(n, &mut now))
                && let Some(node) = shard.remove_slot(i)
            {
                freed.add(&node);
            }
        }
    }

    /// Evicts until the bytes held are within the capacity, going through the shards in turn. A shard whose
    /// entries were all read since its hand last passed gives none this time (its visited bits are cleared on
    /// the way), so the eviction moves on to a shard that has a cold entry; only after a whole round of shards
    /// without one do read entries go.
    fn evict_to_capacity(&self) {
        let mut fruitless = 0;
        while self.bytes.load(Ordering::Relaxed) > self.capacity && fruitless < 2 * self.shards.len() {
            let index = self.shard_hand.fetch_add(1, Ordering::Relaxed) % self.shards.len();
            let mut freed = Freed::default();
            let evicted = {
                let mut guard = self.shards[index].write();
                self.evict_one(&mut guard, &mut freed)
            };
            if evicted && let Some(evictions) = &self.evictions {
                evictions.inc();
            }
            if freed.entries == 0 {
                fruitless += 1;
            } else {
                fruitless = 0;
            }
            self.release(&freed);
        }
    }

    /// One CLOCK turn at most in a shard: sweeps from its hand, clearing visited bits, and removes the first
    /// entry not visited (true) or an expired entry met on the way (false; `freed` counts it).
    fn evict_one(&self, shard: &mut Shard, freed: &mut Freed) -> bool {
        let len = shard.slots.len();
        let mut now = None;
        for _ in 0..len {
            let i = shard.hand % len;
            shard.hand = i + 1;
            let Some(node) = &shard.slots[i] else { continue };
            if !self.live(node, &mut now) {
                if let Some(node) = shard.remove_slot(i) {
                    freed.add(&node);
                }
                return false;
            }
            if shard.meta[i].fetch_and(!VISITED, Ordering::Relaxed) & VISITED == 0 {
                if let Some(node) = shard.remove_slot(i) {
                    freed.add(&node);
                }
                return true;
            }
        }
        false
    }
}

impl Shard {
    /// Puts a node in a free slot (or a new one) and returns its position.
    fn place(&mut self, node: Arc<[u8]>, hash: u64) -> u32 {
        // Reason: the meta word keeps the low 31 bits of the hash.
        #[allow(clippy::cast_possible_truncation)]
        let meta = hash as u32 & !VISITED;
        if let Some(i) = self.free.pop() {
            self.slots[i as usize] = Some(node);
            self.meta[i as usize].store(meta, Ordering::Relaxed);
            return i;
        }
        self.slots.push(Some(node));
        self.meta.push(AtomicU32::new(meta));
        // Reason: a shard holds far fewer than 2^32 entries (each takes at least 21 bytes of memory).
        #[allow(clippy::cast_possible_truncation)]
        let i = (self.slots.len() - 1) as u32;
        i
    }

    /// Removes the entry in slot `i` from the index and the slab.
    fn remove_slot(&mut self, i: usize) -> Option<Arc<[u8]>> {
        self.slots.get(i)?.as_ref()?;
        let hash = index_hash(u64::from(self.meta[i].load(Ordering::Relaxed)));
        let slot = u32::try_from(i).ok()?;
        if let Ok(found) = self.index.find_entry(hash, |&j| j == slot) {
            found.remove();
        }
        self.vacate(slot)
    }

    /// Empties a slot (already removed from the index) and returns what it held.
    fn vacate(&mut self, i: u32) -> Option<Arc<[u8]>> {
        let node = self.slots.get_mut(i as usize)?.take()?;
        self.free.push(i);
        Some(node)
    }
}

/// The hash the index works with: the key hash's low 31 bits (what a slot's meta word keeps), spread so that
/// hashbrown's bucket (low bits) and tag (top 7 bits) both come from them.
fn index_hash(hash: u64) -> u64 {
    let low = hash & u64::from(!VISITED);
    low | (low << 33)
}

/// Shards for a table of `capacity` bytes: a power of two from 1 to [`SHARDS`].
fn shard_count(capacity: u64) -> usize {
    usize::try_from((capacity / BYTES_PER_SHARD).clamp(1, SHARDS as u64))
        .map_or(SHARDS, usize::next_power_of_two)
        .min(SHARDS)
}

fn slot_key(slots: &[Option<Arc<[u8]>>], i: u32) -> Option<&[u8]> {
    slots.get(i as usize)?.as_deref().map(Node::key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(v: &'static [u8], ttl: Option<Duration>) -> Entry {
        Entry::value(Bytes::from_static(v), ttl)
    }

    #[test]
    fn an_entry_comes_back_as_it_was_stored() {
        let t = Table::new(1 << 20, 64, None, None);
        let e = value(b"hello", Some(Duration::from_mins(1))).versioned(42);
        t.insert("k", &e);
        let stored = t.get_stored("k").expect("stored");
        assert_eq!(stored.value(), Some(&b"hello"[..]));
        assert_eq!(stored.value_bytes().as_deref(), Some(&b"hello"[..]));
        assert_eq!(stored.expires_at(), stored.to_entry().expires_at);
        assert!(
            !stored.refresh_due(Instant::now(), 0.5)
                && stored.refresh_due(Instant::now() + Duration::from_secs(31), 0.5)
        );
        let got = t.get("k").expect("stored");
        assert_eq!(got.value.as_deref(), Some(&b"hello"[..]));
        assert_eq!(got.version, 42);
        assert_eq!(got.lifetime_ms, 60_000);
        let (a, b) = (got.expires_at.expect("ttl"), e.expires_at.expect("ttl"));
        assert!(a >= b && a - b < Duration::from_micros(2), "expiry kept to the microsecond, never earlier");
        t.insert("n", &Entry::not_found(Duration::from_secs(5)).versioned(7));
        let neg = t.get("n").expect("negative entry");
        assert!(neg.value.is_none());
        assert_eq!(neg.version, 7);
        assert_eq!((t.entry_count(), t.weighted_size()), (2, 1 + 5 + 64 + 1 + 64));
        t.insert("k", &value(b"hi", None));
        assert_eq!((t.entry_count(), t.weighted_size()), (2, 1 + 2 + 64 + 1 + 64));
        assert!(t.get("k").expect("replaced").expires_at.is_none());
        t.invalidate("k");
        t.invalidate("absent");
        assert!(t.get("k").is_none());
        assert_eq!((t.entry_count(), t.weighted_size()), (1, 1 + 64));
    }

    #[test]
    fn the_byte_bound_holds_and_read_entries_survive_a_scan() {
        let evictions = Counter::default();
        let t = Table::new(200 * (10 + 64), 64, Some(evictions.clone()), None);
        for i in 0..100 {
            t.insert(&format!("hot-{i:04}"), &value(b"x", None));
        }
        for round in 0..5 {
            for i in 0..100 {
                assert!(t.get(&format!("hot-{i:04}")).is_some(), "round {round}: hot-{i} kept");
            }
            for i in 0..60 {
                t.insert(&format!("scan-{round}-{i:03}"), &value(b"x", None));
            }
            assert!(t.weighted_size() <= t.capacity);
        }
        assert!(evictions.get() >= 100, "the scans were evicted: {}", evictions.get());
        let weighed: usize = t.entries().iter().map(|(k, _)| k.len() + 1 + 64).sum();
        assert_eq!(t.weighted_size(), weighed as u64);
    }

    #[test]
    fn expired_entries_are_not_answered_and_are_reclaimed() {
        let keep = Arc::new(AtomicU64::new(0));
        let t = Table::new(1 << 20, 64, None, Some(Arc::clone(&keep)));
        keep.store(60_000_000_000, Ordering::Relaxed);
        t.insert("gone", &value(b"v", Some(Duration::ZERO)));
        t.insert("neg", &Entry::not_found(Duration::ZERO));
        t.insert("stays", &value(b"v", None));
        assert!(t.get("gone").is_some(), "an expired value is kept for the stale windows");
        assert!(t.get("neg").is_none(), "negative entries are not");
        keep.store(0, Ordering::Relaxed);
        assert!(t.get("gone").is_none() && !t.contains_key("gone"));
        t.run_pending_tasks();
        assert_eq!(t.entry_count(), 1);
        assert_eq!(t.entries().len(), 1);
    }

    #[test]
    fn an_entry_larger_than_the_table_is_refused_and_drops_the_old_one() {
        let evictions = Counter::default();
        let t = Table::new(1000, 64, Some(evictions.clone()), None);
        t.insert("k", &value(b"small", None));
        t.insert("k", &Entry::value(Bytes::from(vec![0u8; 2000]), None));
        assert!(t.get("k").is_none());
        assert_eq!((t.entry_count(), t.weighted_size(), evictions.get()), (0, 0, 1));
    }

    #[test]
    fn removal_by_predicate_invalidate_all_and_slot_reuse() {
        let t = Table::new(1 << 20, 64, None, None);
        for i in 0..1000u64 {
            t.insert(&format!("k{i}"), &value(b"v", None).versioned(i));
        }
        t.invalidate_entries_if(|e| e.version < 500);
        assert_eq!(t.entry_count(), 500);
        assert!(t.get("k499").is_none() && t.get("k500").is_some());
        for i in 0..500u64 {
            t.insert(&format!("k{i}"), &value(b"v", None));
        }
        let slots: usize = t.shards.iter().map(|s| s.read().slots.len()).sum();
        assert_eq!(slots, 1000, "freed slots are reused");
        assert_eq!(
            (shard_count(0), shard_count(1 << 20), shard_count(5 << 20), shard_count(1 << 40)),
            (1, 4, 32, 256)
        );
        assert_eq!(t.entries().len(), 1000);
        t.invalidate_all();
        assert_eq!((t.entry_count(), t.weighted_size()), (0, 0));
        assert!(t.get("k600").is_none());
    }

    /// Writers, removers and readers on four threads over a table that evicts all the time: every read answers
    /// the key's own value, and afterwards the counters agree with what the table holds.
    #[test]
    fn concurrent_writes_reads_and_evictions_keep_the_counters_exact() {
        let t = Arc::new(Table::new(500 * (16 + 64), 64, Some(Counter::default()), None));
        let threads: Vec<_> = (0..4u64)
            .map(|n| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    for round in 0..20_000u64 {
                        let k = format!("key-{:05}", (round * 7 + n * 13) % 2000);
                        match (n, round % 5) {
                            (0 | 1, 0) => {
                                t.invalidate(&k);
                            }
                            (0 | 1, 1) => {
                                t.insert(&k, &Entry::value(Bytes::from(k.clone()), Some(Duration::ZERO)));
                            }
                            (0 | 1, _) => {
                                t.insert(&k, &Entry::value(Bytes::from(k.clone()), None));
                            }
                            _ => {
                                if let Some(e) = t.get(&k) {
                                    assert_eq!(
                                        e.value.as_deref(),
                                        Some(k.as_bytes()),
                                        "a read answers its own key"
                                    );
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().expect("no thread panicked");
        }
        t.run_pending_tasks();
        let held = t.entries();
        let weighed: u64 =
            held.iter().map(|(k, e)| (k.len() + e.value.as_ref().map_or(0, Bytes::len)) as u64 + 64).sum();
        assert_eq!(t.entry_count(), held.len() as u64);
        assert_eq!(t.weighted_size(), weighed);
        assert!(t.weighted_size() <= 500 * (16 + 64), "within the capacity: {}", t.weighted_size());
        assert!(held.len() > 100, "the table stays in use: {}", held.len());
    }
}
