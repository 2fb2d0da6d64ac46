//! The memory of one keyspace on one node: a main tier for the keys this node owns and a hot tier for copies of
//! keys owned by other nodes, both [`Table`]s weighed in bytes.
//!
//! Writes and fills race: a load that started before a Put may finish after it. Two rules settle every race:
//! - a *fill* (the result of a load) never replaces an entry that is present: only writes do;
//! - every change of a key (Put, Delete, invalidation, purge) bumps the *epoch* of the key's stripe; a fill
//!   records the epoch before its lookup and stores its result only if the epoch is unchanged.
//!
//! Both checks and the insert happen under the stripe's lock, so a fill never resurrects a value that a write
//! replaced or removed. Stripes are per key hash (4096 of them), never a keyspace-wide lock.
//!
//! Entries carry a *version* (see [`crate::hlc`]), assigned by the owner that wrote or loaded them. Entries that
//! move between nodes (handoff, previous-owner reads) are inserted with [`Store::merge`]: newer wins against the
//! entry present and against a *tombstone*, the version of a recent delete, kept for [`TOMBSTONE_TTL`] so that
//! an older copy of a deleted key cannot come back from another node.
//!
//! A resize (a keyspace's `maxBytes` changed by a reload) swaps in a main tier of the new size and then copies
//! the old one over, one stripe lock at a time, while requests go on: see [`Store::resize`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;

use crate::table::{Stored, Table};

/// Fixed per-entry overhead added to key and value bytes when weighing an entry: the entry's header and `Arc`
/// counts, its slab slot, visited byte and index bucket in the [`Table`], and the allocator's rounding. Measured
/// with `make bench` (memory per cached entry): see the README's benchmark section.
pub const ENTRY_OVERHEAD: u64 = 96;

/// Copies in the hot tier live at most this long, bounding how stale a copy can be when an invalidation cannot
/// reach this node (partition). Writes invalidate copies eagerly; this is the fallback.
pub const HOT_MAX_TTL: Duration = Duration::from_secs(30);

const STRIPES: usize = 4096;

/// How long a delete is remembered (its tombstone): longer than any handoff or previous-owner read can lag.
pub const TOMBSTONE_TTL: Duration = Duration::from_mins(10);

/// Counters of the heat sketch (a count-min sketch of main-tier hits, 4 rows), used to hand off the hottest
/// entries first.
const HEAT_ROWS: usize = 4;
const HEAT_WIDTH: usize = 4096;
/// A key estimated at this many reads halves the whole sketch (a multiple of the hot-keys sample).
const HEAT_AGE_AT: u16 = 1 << 14;

/// A cached entry: a value, or a cached NOT_FOUND (negative entry).
#[derive(Clone, Debug)]
pub struct Entry {
    /// `None` for a cached NOT_FOUND.
    pub value: Option<Bytes>,
    /// When the entry expires; `None` = never.
    pub expires_at: Option<Instant>,
    /// Version assigned by the owner (0 for hot copies, which never move).
    pub version: u64,
    /// The TTL it was given, in milliseconds (saturating; 0 without one): refresh-ahead measures the part of
    /// the lifetime that has passed.
    pub lifetime_ms: u32,
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Entry {
    /// A positive entry with an optional TTL.
    /// A TTL too large to represent as an instant means "never expires".
    pub fn value(value: Bytes, ttl: Option<Duration>) -> Self {
        Self {
            value: Some(value),
            expires_at: ttl.and_then(|t| Instant::now().checked_add(t)),
            version: 0,
            lifetime_ms: ttl.map_or(0, millis),
        }
    }

    /// A negative entry (cached NOT_FOUND).
    pub fn not_found(ttl: Duration) -> Self {
        Self {
            value: None,
            expires_at: Instant::now().checked_add(ttl),
            version: 0,
            lifetime_ms: millis(ttl),
        }
    }

    /// The entry with a version.
    #[must_use]
    pub fn versioned(mut self, version: u64) -> Self {
        self.version = version;
        self
    }

    /// Time left before expiry (`None` = never expires).
    pub fn ttl_left(&self) -> Option<Duration> {
        self.expires_at.map(|e| e.saturating_duration_since(Instant::now()))
    }

    /// Whether it has expired at `now` (it may still be kept for the stale windows).
    #[inline]
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }

    /// How long past its expiry it is at `now`; `None` while fresh.
    pub fn stale_for(&self, now: Instant) -> Option<Duration> {
        self.expires_at.filter(|e| *e <= now).map(|e| now - e)
    }

    /// Whether a read at `now` falls in the last part of its lifetime that refresh-ahead `fraction` leaves
    /// (0.8: the last fifth).
    pub fn refresh_due(&self, now: Instant, fraction: f64) -> bool {
        refresh_due(self.expires_at, self.lifetime_ms, now, fraction)
    }
}

/// [`Entry::refresh_due`] of an entry expiring at `expires_at` that was written with a TTL of `lifetime_ms`.
pub(crate) fn refresh_due(
    expires_at: Option<Instant>,
    lifetime_ms: u32,
    now: Instant,
    fraction: f64,
) -> bool {
    let (Some(expires), true) = (expires_at, lifetime_ms > 0) else { return false };
    let left = expires.saturating_duration_since(now);
    left < Duration::from_millis(u64::from(lifetime_ms)).mul_f64(1.0 - fraction)
}

/// Which tier an operation addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Keys this node owns.
    Main,
    /// Copies of keys owned by other nodes.
    Hot,
}

/// One stripe: the lock that serializes changes of its keys, and their epoch (read without the lock).
#[derive(Default)]
struct Stripe {
    lock: Mutex<()>,
    epoch: AtomicU64,
}

impl Stripe {
    /// Must be called with `lock` held.
    fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// Both tiers of one keyspace plus the epoch stripes. The caches sit behind `ArcSwap` so that a resize can
/// replace them in place while every writer keeps going through this one `Store`.
pub struct Store {
    main: ArcSwap<Table>,
    hot: ArcSwap<Table>,
    /// While a resize copies: the main tier being replaced. Reads that miss the new main tier look here; writes,
    /// removals and purges drop keys here too, so the copy never brings back a key changed since the swap.
    draining: ArcSwapOption<Table>,
    /// Odd while a resize is between its swap and the end of its copy (a sequence lock for readers, so that a
    /// read racing the end of a copy retries instead of missing a key that moved under it).
    resizes: AtomicU64,
    /// Serializes resizes (a second one waits for the first copy to finish).
    resize_lock: Mutex<()>,
    stripes: Box<[Stripe]>,
    evictions: Counter,
    /// Versions of recent deletes, by key (entries without a value whose version is the delete's).
    tombstones: Table,
    /// Count-min sketch of reads by key hash (approximate; halved when a cell nears saturation; relaxed atomics).
    heat: Box<[std::sync::atomic::AtomicU16]>,
    /// The hottest keys, fed by the sketch.
    hot_keys: crate::hotkeys::HotKeys,
    /// How long an expired value stays in the main tier for the stale windows (nanoseconds).
    stale_keep: Arc<AtomicU64>,
}

/// What a node holds for a key, as it moves to another node: an entry, or the version of its delete.
#[derive(Clone, Debug)]
pub enum Held {
    /// A value (or cached NOT_FOUND) with its version and expiry.
    Entry(Entry),
    /// Deleted at this version.
    Deleted(u64),
}

fn build_cache(capacity: u64, evictions: Counter, keep: Option<Arc<AtomicU64>>) -> Table {
    Table::new(capacity, ENTRY_OVERHEAD, Some(evictions), keep)
}

/// A tombstone: the version of a delete, kept for [`TOMBSTONE_TTL`].
fn tombstone(version: u64) -> Entry {
    Entry::not_found(TOMBSTONE_TTL).versioned(version)
}

impl Store {
    /// A store whose main tier holds `max_bytes` and hot tier `max_bytes / 8`.
    pub fn new(max_bytes: u64, evictions: &Counter) -> Self {
        let stale_keep = Arc::new(AtomicU64::new(0));
        Self {
            main: ArcSwap::from_pointee(build_cache(
                max_bytes,
                evictions.clone(),
                Some(Arc::clone(&stale_keep)),
            )),
            hot: ArcSwap::from_pointee(build_cache((max_bytes / 8).max(1), evictions.clone(), None)),
            draining: ArcSwapOption::empty(),
            resizes: AtomicU64::new(0),
            resize_lock: Mutex::new(()),
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            evictions: evictions.clone(),
            tombstones: Table::new((max_bytes / 16).max(64 << 10), 64, None, None),
            heat: (0..HEAT_ROWS * HEAT_WIDTH).map(|_| std::sync::atomic::AtomicU16::new(0)).collect(),
            hot_keys: crate::hotkeys::HotKeys::default(),
            stale_keep,
        }
    }

    /// Sets how long expired values stay in the main tier (the longer stale window; zero: not at all). Applies
    /// to entries inserted from now on.
    pub fn set_stale_keep(&self, keep: Duration) {
        self.stale_keep.store(u64::try_from(keep.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The hottest keys, at most `n`.
    pub fn hot_keys(&self, n: usize) -> Vec<distcache_api::HotKey> {
        self.hot_keys.top(n)
    }

    /// The sketch cells of a key hash, one per row.
    fn heat_cells(hash: u64) -> impl Iterator<Item = usize> {
        // Reason: each 12-bit slice of the hash is below HEAT_WIDTH.
        #[allow(clippy::cast_possible_truncation)]
        (0..HEAT_ROWS).map(move |row| row * HEAT_WIDTH + ((hash >> (row * 12)) as usize % HEAT_WIDTH))
    }

    /// Counts a read of a key (for "hottest first" handoffs and the hot-keys list). Lossy under races, never
    /// blocking: every [`crate::hotkeys::SAMPLE`]th estimated read offers the key to the list.
    #[inline]
    pub fn touch(&self, hash: u64, key: &str) {
        let mut estimate = u16::MAX;
        for cell in Self::heat_cells(hash) {
            let c = &self.heat[cell];
            let v = c.load(Ordering::Relaxed).saturating_add(1);
            c.store(v, Ordering::Relaxed);
            estimate = estimate.min(v);
        }
        if estimate % crate::hotkeys::SAMPLE == 0 {
            if estimate >= HEAT_AGE_AT {
                self.age_heat();
            }
            if self.hot_keys.may_enter(u64::from(estimate)) {
                self.hot_keys.offer(key, u64::from(estimate));
            }
        }
    }

    /// Halves the sketch and the hot-keys list, so that both follow what is read now.
    #[cold]
    fn age_heat(&self) {
        for c in &*self.heat {
            let v = c.load(Ordering::Relaxed);
            c.store(v / 2, Ordering::Relaxed);
        }
        self.hot_keys.age();
    }

    /// Estimated hits of a key (an upper bound, as count-min sketches give).
    pub fn heat(&self, hash: u64) -> u16 {
        Self::heat_cells(hash).map(|cell| self.heat[cell].load(Ordering::Relaxed)).min().unwrap_or(0)
    }

    fn cache(&self, tier: Tier) -> arc_swap::Guard<Arc<Table>> {
        match tier {
            Tier::Main => self.main.load(),
            Tier::Hot => self.hot.load(),
        }
    }

    /// Changes the byte budget in place: swaps in a main tier of the new size and an empty hot tier, then copies
    /// the old main tier's entries over (entries beyond the new size are evicted as usual).
    ///
    /// Requests go on during the copy: every stripe is locked only for the swap itself (microseconds), and the
    /// copy then takes one stripe's lock per entry. Reads that miss the new tier find the old one in `draining`;
    /// writes land in the new tier and drop the key from the old one. The copy may take long for a large tier:
    /// call it from a blocking thread (`spawn_blocking`), not from an async task.
    pub fn resize(&self, max_bytes: u64) {
        self.resize_with(max_bytes, |_| {});
    }

    /// [`Store::resize`], calling `copied` with the running count after each entry it copies (tests pause there).
    fn resize_with(&self, max_bytes: u64, mut copied: impl FnMut(usize)) {
        let _one_at_a_time = self.resize_lock.lock();
        let main =
            Arc::new(build_cache(max_bytes, self.evictions.clone(), Some(Arc::clone(&self.stale_keep))));
        let old = {
            // No write or fill is between loading a tier and inserting into it while the swap happens, so
            // none can land in the old tier after the copy has passed its key.
            let _all: Vec<_> = self.stripes.iter().map(|s| s.lock.lock()).collect();
            let old = self.main.load_full();
            self.draining.store(Some(Arc::clone(&old)));
            self.resizes.fetch_add(1, Ordering::AcqRel);
            self.main.store(Arc::clone(&main));
            self.hot.store(Arc::new(build_cache((max_bytes / 8).max(1), self.evictions.clone(), None)));
            old
        };
        let mut count = 0;
        for (key, _) in old.entries() {
            let stripe = self.stripe(crate::ring::key_hash(&key));
            let copied_one = {
                let _guard = stripe.lock.lock();
                // Read again under the lock: a change since the swap removed the key from `old` (and a write put
                // its new value in `main`).
                if let Some(current) = old.get(&key)
                    && !main.contains_key(&key)
                {
                    main.insert(&key, &current);
                    true
                } else {
                    false
                }
            };
            // Outside the stripe's lock: a test pausing here must not block writers of that stripe.
            if copied_one {
                count += 1;
                copied(count);
            }
        }
        self.resizes.fetch_add(1, Ordering::AcqRel);
        self.draining.store(None);
    }

    fn stripe(&self, hash: u64) -> &Stripe {
        // Reason: the modulo keeps the index below STRIPES, which fits usize.
        #[allow(clippy::cast_possible_truncation)]
        &self.stripes[(hash % STRIPES as u64) as usize]
    }

    /// Looks a key up in a tier: a fresh entry (expired values kept for the stale windows are not answered;
    /// see [`Store::lookup`]).
    #[inline]
    pub fn get(&self, tier: Tier, key: &str) -> Option<Entry> {
        self.get_stored(tier, key).map(|s| s.to_entry())
    }

    /// [`Store::get`], the entry as stored (nothing copied).
    #[inline]
    pub fn get_stored(&self, tier: Tier, key: &str) -> Option<Stored> {
        self.lookup_stored(tier, key).filter(|e| e.expires_at().is_none_or(|at| at > Instant::now()))
    }

    /// Looks a key up in a tier, expired values kept for the stale windows included.
    #[inline]
    pub fn lookup(&self, tier: Tier, key: &str) -> Option<Entry> {
        self.lookup_stored(tier, key).map(|s| s.to_entry())
    }

    /// [`Store::lookup`], the entry as stored (nothing copied).
    #[inline]
    pub fn lookup_stored(&self, tier: Tier, key: &str) -> Option<Stored> {
        if tier == Tier::Hot {
            return self.hot.load().get_stored(key);
        }
        loop {
            let resizes = self.resizes.load(Ordering::Acquire);
            if let Some(entry) = self.main.load().get_stored(key) {
                return Some(entry);
            }
            if resizes % 2 == 1
                && let Some(old) = &*self.draining.load()
                && let Some(entry) = old.get_stored(key)
            {
                return Some(entry);
            }
            // A miss is only an answer if no resize started or ended while looking (rare: retry).
            if self.resizes.load(Ordering::Acquire) == resizes {
                return None;
            }
        }
    }

    /// The current epoch of a key's stripe, recorded before a fill starts.
    pub fn epoch(&self, hash: u64) -> u64 {
        // Lock-free read on the request path: the epoch only changes under the stripe's lock.
        self.stripe(hash).epoch.load(Ordering::Acquire)
    }

    /// Stores a fill result unless the key changed since `epoch` was recorded or an entry is present (only
    /// writes replace entries). Returns whether it was stored.
    pub fn fill(&self, tier: Tier, key: &str, hash: u64, entry: &Entry, epoch: u64) -> bool {
        let stripe = self.stripe(hash);
        let _guard = stripe.lock.lock();
        let cache = self.cache(tier);
        // An expired value kept for the stale windows is replaced like an absent one.
        let now = Instant::now();
        let fresh = |e: Entry| !e.is_expired(now);
        let draining_has_it = tier == Tier::Main
            && self.draining.load().as_ref().is_some_and(|d| d.get(key).is_some_and(fresh));
        if stripe.epoch.load(Ordering::Acquire) != epoch
            || cache.get(key).is_some_and(fresh)
            || draining_has_it
        {
            return false;
        }
        // An entry that moved from another node must not bring back a key deleted here later than it was written.
        if tier == Tier::Main && self.tombstones.get(key).is_some_and(|t| t.version >= entry.version) {
            return false;
        }
        cache.insert(key, entry);
        true
    }

    /// A refresh (refresh-ahead, stale-while-revalidate): replaces the main-tier entry with a newly fetched one
    /// unless the key changed since `epoch` (a write, delete or handoff won) or was deleted later. `None`
    /// removes it (the source no longer has the key). Returns whether it changed.
    pub fn refill(&self, key: &str, hash: u64, entry: Option<&Entry>, epoch: u64) -> bool {
        let stripe = self.stripe(hash);
        let _guard = stripe.lock.lock();
        if stripe.epoch.load(Ordering::Acquire) != epoch {
            return false;
        }
        if let Some(entry) = &entry
            && self.tombstones.get(key).is_some_and(|t| t.version >= entry.version)
        {
            return false;
        }
        if let Some(old) = &*self.draining.load() {
            old.invalidate(key);
        }
        match entry {
            Some(entry) => self.main.load().insert(key, entry),
            None => self.main.load().invalidate(key),
        }
        true
    }

    /// A write: stores the entry in `tier`, drops any copy in the other tier, and bumps the epoch so in-flight
    /// fills of the key are discarded.
    pub fn write(&self, tier: Tier, key: &str, hash: u64, entry: &Entry) {
        let stripe = self.stripe(hash);
        let _guard = stripe.lock.lock();
        stripe.bump();
        let other = if tier == Tier::Main { Tier::Hot } else { Tier::Main };
        self.cache(other).invalidate(key);
        if let Some(old) = &*self.draining.load() {
            old.invalidate(key);
        }
        if tier == Tier::Main {
            self.tombstones.invalidate(key);
        }
        self.cache(tier).insert(key, entry);
    }

    /// The owner's delete: removes the key from both tiers and remembers the delete's version.
    pub fn delete(&self, key: &str, hash: u64, version: u64) {
        self.remove(key, hash);
        self.tombstones.insert(key, &tombstone(version));
    }

    /// Inserts an entry that moved from another node (a handoff or a previous owner's answer) if it is newer
    /// than the main-tier entry present and than a delete of the key. Returns whether it was stored.
    pub fn merge(&self, key: &str, hash: u64, held: Held) -> bool {
        let stripe = self.stripe(hash);
        let _guard = stripe.lock.lock();
        let version = match &held {
            Held::Entry(e) => e.version,
            Held::Deleted(v) => *v,
        };
        if self.tombstones.get(key).is_some_and(|t| t.version >= version) {
            return false;
        }
        let main = self.main.load();
        let present = main.get(key).or_else(|| self.draining.load().as_ref().and_then(|d| d.get(key)));
        if present.is_some_and(|p| p.version >= version) {
            return false;
        }
        stripe.bump();
        self.hot.load().invalidate(key);
        if let Some(old) = &*self.draining.load() {
            old.invalidate(key);
        }
        match held {
            Held::Entry(entry) => {
                self.tombstones.invalidate(key);
                main.insert(key, &entry);
            }
            Held::Deleted(v) => {
                main.invalidate(key);
                self.tombstones.insert(key, &tombstone(v));
            }
        }
        true
    }

    /// What the main tier holds for a key: an entry, a recent delete, or nothing.
    pub fn held(&self, key: &str) -> Option<Held> {
        match self.get(Tier::Main, key) {
            Some(e) => Some(Held::Entry(e)),
            None => self.tombstones.get(key).map(|t| Held::Deleted(t.version)),
        }
    }

    /// A snapshot of the main tier and the recent deletes (for handoffs), hottest first.
    pub fn snapshot(&self) -> Vec<(Arc<str>, Held)> {
        let mut all: Vec<(Arc<str>, Held, u16)> = Vec::new();
        let tiers = std::iter::once(self.main.load_full()).chain(self.draining.load_full());
        let now = Instant::now();
        for tier in tiers {
            // Expired values kept for the stale windows stay here: only fresh entries move.
            for (k, e) in tier.entries().into_iter().filter(|(_, e)| !e.is_expired(now)) {
                let heat = self.heat(crate::ring::key_hash(&k));
                all.push((k, Held::Entry(e), heat));
            }
        }
        for (k, t) in self.tombstones.entries() {
            all.push((k, Held::Deleted(t.version), 0));
        }
        all.sort_by_key(|e| std::cmp::Reverse(e.2));
        all.into_iter().map(|(k, h, _)| (k, h)).collect()
    }

    /// After a handoff: drops the key from the main tier unless it changed since (a newer version arrived).
    pub fn forget_moved(&self, key: &str, hash: u64, version: u64) {
        let stripe = self.stripe(hash);
        let _guard = stripe.lock.lock();
        let main = self.main.load();
        if main.get(key).is_some_and(|e| e.version <= version) {
            stripe.bump();
            main.invalidate(key);
        }
        if let Some(old) = &*self.draining.load() {
            old.invalidate(key);
        }
    }

    /// Drops main-tier entries not newer than `version` (a node that was out of the ring for longer than deletes
    /// are remembered cannot tell which of its entries were deleted meanwhile). An entry whose version equals
    /// `version` goes too: versions of different nodes tie when they were made in the same clock tick, and
    /// dropping such an entry only makes the node colder, never wrong.
    pub fn forget_older_than(&self, version: u64) {
        self.bump_all();
        let tiers = std::iter::once(self.main.load_full()).chain(self.draining.load_full());
        for main in tiers {
            main.invalidate_entries_if(|e| e.version <= version);
        }
    }

    /// Bumps every stripe's epoch: in-flight fills of every key are discarded.
    fn bump_all(&self) {
        for stripe in &*self.stripes {
            let _guard = stripe.lock.lock();
            stripe.bump();
        }
    }

    /// Drops every hot copy (after a membership change; their owners may have changed).
    pub fn drop_hot(&self) {
        self.bump_all();
        self.hot.load().invalidate_all();
    }

    /// Removes a key's hot copy and bumps its epoch.
    pub fn drop_copy(&self, key: &str, hash: u64) {
        let stripe = self.stripe(hash);
        let _guard = stripe.lock.lock();
        stripe.bump();
        self.hot.load().invalidate(key);
    }

    /// Removes a key from both tiers and bumps its epoch.
    pub fn remove(&self, key: &str, hash: u64) {
        let stripe = self.stripe(hash);
        let _guard = stripe.lock.lock();
        stripe.bump();
        self.main.load().invalidate(key);
        self.hot.load().invalidate(key);
        if let Some(old) = &*self.draining.load() {
            old.invalidate(key);
        }
    }

    /// Drops every entry of both tiers (or of the hot tier only). In-flight fills are discarded too: every epoch
    /// is bumped.
    pub fn purge(&self, hot_only: bool) {
        self.bump_all();
        if !hot_only {
            self.main.load().invalidate_all();
            if let Some(old) = &*self.draining.load() {
                old.invalidate_all();
            }
        }
        self.hot.load().invalidate_all();
        if !hot_only {
            self.hot_keys.clear();
        }
    }

    /// Reclaims expired entries (and tombstones) so that sizes read next are exact.
    pub fn sync(&self) {
        self.main.load().run_pending_tasks();
        self.hot.load().run_pending_tasks();
        self.tombstones.run_pending_tasks();
    }

    /// Entries held (both tiers).
    pub fn entries(&self) -> u64 {
        self.main.load().entry_count() + self.hot.load().entry_count()
    }

    /// Weighed bytes held (both tiers).
    pub fn bytes(&self) -> u64 {
        self.main.load().weighted_size() + self.hot.load().weighted_size()
    }

    /// Weighed bytes of one tier.
    pub fn tier_bytes(&self, tier: Tier) -> u64 {
        self.cache(tier).weighted_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max: u64) -> (Store, Counter) {
        let evictions = Counter::default();
        (Store::new(max, &evictions), evictions)
    }

    #[test]
    fn a_fill_that_raced_a_write_is_discarded() {
        let (s, _) = store(1 << 20);
        let h = crate::ring::key_hash("k");
        let epoch = s.epoch(h);
        s.write(Tier::Main, "k", h, &Entry::value(Bytes::from_static(b"new"), None));
        assert!(!s.fill(Tier::Main, "k", h, &Entry::value(Bytes::from_static(b"old"), None), epoch));
        assert_eq!(s.get(Tier::Main, "k").and_then(|e| e.value), Some(Bytes::from_static(b"new")));
    }

    #[test]
    fn a_fill_never_replaces_a_present_entry() {
        let (s, _) = store(1 << 20);
        let h = crate::ring::key_hash("k");
        s.write(Tier::Main, "k", h, &Entry::value(Bytes::from_static(b"written"), None));
        let epoch = s.epoch(h);
        assert!(!s.fill(Tier::Main, "k", h, &Entry::value(Bytes::from_static(b"loaded"), None), epoch));
        assert_eq!(s.get(Tier::Main, "k").and_then(|e| e.value), Some(Bytes::from_static(b"written")));
    }

    #[test]
    fn resize_keeps_entries_and_applies_the_new_bound() {
        let (s, _) = store(1 << 20);
        for i in 0..500 {
            let key = format!("key-{i}");
            let h = crate::ring::key_hash(&key);
            s.write(Tier::Main, &key, h, &Entry::value(Bytes::from(vec![0u8; 1000]), None));
        }
        s.resize(256 << 10);
        s.sync();
        assert!(s.tier_bytes(Tier::Main) <= 256 << 10);
        assert!(s.entries() > 100, "entries kept up to the new bound: {}", s.entries());
    }

    /// Before: a resize held all 4096 stripe locks while it copied the main tier, so every write and fill of
    /// the keyspace (and the tokio worker running it) waited for the whole copy.
    #[test]
    fn writes_removals_and_reads_go_on_while_a_resize_copies() {
        let (s, _) = store(16 << 20);
        let s = Arc::new(s);
        for i in 0..1000 {
            let key = format!("key-{i}");
            s.write(
                Tier::Main,
                &key,
                crate::ring::key_hash(&key),
                &Entry::value(Bytes::from_static(b"v"), None),
            );
        }
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let resizer = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                s.resize_with(16 << 20, |n| {
                    if n == 1 {
                        started_tx.send(()).expect("test waits");
                        go_rx.recv().expect("test releases the copy");
                    }
                });
            })
        };
        started_rx.recv_timeout(Duration::from_secs(10)).expect("the resize started copying");
        // The copy is paused after one entry. Everything below runs on another thread with a deadline, so a
        // store that blocks during the copy fails the test instead of hanging it.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let worker = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let h = crate::ring::key_hash("written-during-copy");
                s.write(Tier::Main, "written-during-copy", h, &Entry::value(Bytes::from_static(b"w"), None));
                s.remove("key-500", crate::ring::key_hash("key-500"));
                s.write(
                    Tier::Main,
                    "key-7",
                    crate::ring::key_hash("key-7"),
                    &Entry::value(Bytes::from_static(b"new"), None),
                );
                let readable = (0..1000).filter(|i| s.get(Tier::Main, &format!("key-{i}")).is_some()).count();
                done_tx.send(readable).expect("test waits");
            })
        };
        let readable = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a write, a removal and reads completed while the resize was copying");
        assert_eq!(readable, 999, "every key but the removed one is readable during the copy");
        go_tx.send(()).expect("resizer waits");
        resizer.join().expect("resizer");
        worker.join().expect("worker");
        assert!(s.get(Tier::Main, "key-500").is_none(), "the copy must not bring back a removed key");
        assert_eq!(
            s.get(Tier::Main, "key-7").and_then(|e| e.value),
            Some(Bytes::from_static(b"new")),
            "nor an old value"
        );
        assert!(s.get(Tier::Main, "written-during-copy").is_some());
        assert_eq!((0..1000).filter(|i| s.get(Tier::Main, &format!("key-{i}")).is_some()).count(), 999);
    }

    #[test]
    fn a_huge_ttl_means_no_expiry_instead_of_a_panic() {
        assert!(Entry::value(Bytes::new(), Some(Duration::MAX)).expires_at.is_none());
    }

    #[test]
    fn byte_bound_holds_and_evictions_are_counted() {
        let (s, evictions) = store(256 << 10);
        for i in 0..2_000 {
            let key = format!("key-{i}");
            let h = crate::ring::key_hash(&key);
            s.write(Tier::Main, &key, h, &Entry::value(Bytes::from(vec![0u8; 1000]), None));
        }
        s.sync();
        assert!(s.tier_bytes(Tier::Main) <= 256 << 10, "{} bytes", s.tier_bytes(Tier::Main));
        assert!(evictions.get() > 1_000, "evictions {}", evictions.get());
    }

    #[test]
    fn per_entry_ttl_expires() {
        let (s, _) = store(1 << 20);
        let h = crate::ring::key_hash("k");
        s.write(Tier::Main, "k", h, &Entry::value(Bytes::from_static(b"v"), Some(Duration::from_millis(30))));
        s.write(Tier::Main, "p", 1, &Entry::value(Bytes::from_static(b"v"), None));
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.get(Tier::Main, "k").is_some() {
            assert!(Instant::now() < deadline, "entry did not expire");
            std::thread::yield_now();
        }
        assert!(s.get(Tier::Main, "p").is_some(), "entry without TTL stays");
    }
}
