//! The memory of one keyspace on one node: a main tier for the keys this node owns and a hot tier for copies of
//! keys owned by other nodes, both moka caches weighed in bytes.
//!
//! Writes and fills race: a load that started before a Put may finish after it. Two rules settle every race:
//! - a *fill* (the result of a load) never replaces an entry that is present: only writes do;
//! - every change of a key (Put, Delete, invalidation, purge) bumps the *epoch* of the key's stripe; a fill
//!   records the epoch before its lookup and stores its result only if the epoch is unchanged.
//!
//! Both checks and the insert happen under the stripe's lock, so a fill never resurrects a value that a write
//! replaced or removed. Stripes are per key hash (4096 of them), never a keyspace-wide lock; only a resize takes
//! them all.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use moka::{notification::RemovalCause, sync::Cache};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;

/// Fixed per-entry overhead added to key and value bytes when weighing an entry: moka's entry, the `Arc<str>`
/// key header, the `Bytes` handle and the expiry bookkeeping.
pub const ENTRY_OVERHEAD: u64 = 128;

/// Copies in the hot tier live at most this long, bounding how stale a copy can be when an invalidation cannot
/// reach this node (partition). Writes invalidate copies eagerly; this is the fallback.
pub const HOT_MAX_TTL: Duration = Duration::from_secs(30);

const STRIPES: usize = 4096;

/// A cached entry: a value, or a cached NOT_FOUND (negative entry).
#[derive(Clone, Debug)]
pub struct Entry {
    /// `None` for a cached NOT_FOUND.
    pub value: Option<Bytes>,
    /// When the entry expires; `None` = never.
    pub expires_at: Option<Instant>,
}

impl Entry {
    /// A positive entry with an optional TTL.
    /// A TTL too large to represent as an instant means "never expires".
    pub fn value(value: Bytes, ttl: Option<Duration>) -> Self {
        Self { value: Some(value), expires_at: ttl.and_then(|t| Instant::now().checked_add(t)) }
    }

    /// A negative entry (cached NOT_FOUND).
    pub fn not_found(ttl: Duration) -> Self {
        Self { value: None, expires_at: Instant::now().checked_add(ttl) }
    }

    /// Time left before expiry (`None` = never expires).
    pub fn ttl_left(&self) -> Option<Duration> {
        self.expires_at.map(|e| e.saturating_duration_since(Instant::now()))
    }

    fn weight(key: &str, value: &Self) -> u32 {
        let len = key.len() as u64 + value.value.as_ref().map_or(0, |v| v.len() as u64) + ENTRY_OVERHEAD;
        u32::try_from(len).unwrap_or(u32::MAX)
    }
}

struct EntryExpiry;

impl moka::Expiry<Arc<str>, Entry> for EntryExpiry {
    fn expire_after_create(&self, _key: &Arc<str>, value: &Entry, created_at: Instant) -> Option<Duration> {
        value.expires_at.map(|e| e.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &Arc<str>,
        value: &Entry,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        // A replaced value brings its own expiry (moka's default would keep the old one).
        value.expires_at.map(|e| e.saturating_duration_since(updated_at))
    }
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
    main: ArcSwap<Cache<Arc<str>, Entry, Hasher>>,
    hot: ArcSwap<Cache<Arc<str>, Entry, Hasher>>,
    stripes: Box<[Stripe]>,
    evictions: Counter,
}

/// The hasher of the cache tiers: foldhash, randomly seeded per process (keys are client-chosen, so the hash
/// must resist flooding), several times cheaper than the default SipHash on short keys.
type Hasher = foldhash::fast::RandomState;

fn build_cache(capacity: u64, evictions: Counter) -> Cache<Arc<str>, Entry, Hasher> {
    Cache::builder()
        .max_capacity(capacity)
        .weigher(|k: &Arc<str>, v: &Entry| Entry::weight(k, v))
        .expire_after(EntryExpiry)
        .support_invalidation_closures()
        .eviction_listener(move |_k, _v, cause| {
            if cause == RemovalCause::Size {
                evictions.inc();
            }
        })
        .build_with_hasher(Hasher::default())
}

impl Store {
    /// A store whose main tier holds `max_bytes` and hot tier `max_bytes / 8`.
    pub fn new(max_bytes: u64, evictions: &Counter) -> Self {
        Self {
            main: ArcSwap::from_pointee(build_cache(max_bytes, evictions.clone())),
            hot: ArcSwap::from_pointee(build_cache((max_bytes / 8).max(1), evictions.clone())),
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            evictions: evictions.clone(),
        }
    }

    fn cache(&self, tier: Tier) -> arc_swap::Guard<Arc<Cache<Arc<str>, Entry, Hasher>>> {
        match tier {
            Tier::Main => self.main.load(),
            Tier::Hot => self.hot.load(),
        }
    }

    /// Changes the byte budget in place: with every stripe locked (no write or fill can run), the main tier's
    /// entries move into a cache of the new size and the hot tier starts empty. Entries beyond the new size are
    /// evicted as usual.
    pub fn resize(&self, max_bytes: u64) {
        let guards: Vec<_> = self.stripes.iter().map(|s| s.lock.lock()).collect();
        let main = build_cache(max_bytes, self.evictions.clone());
        for (k, v) in self.main.load().iter() {
            main.insert(k.as_ref().clone(), v);
        }
        self.main.store(Arc::new(main));
        self.hot.store(Arc::new(build_cache((max_bytes / 8).max(1), self.evictions.clone())));
        drop(guards);
    }

    fn stripe(&self, hash: u64) -> &Stripe {
        // Reason: the modulo keeps the index below STRIPES, which fits usize.
        #[allow(clippy::cast_possible_truncation)]
        &self.stripes[(hash % STRIPES as u64) as usize]
    }

    /// Looks a key up in a tier.
    #[inline]
    pub fn get(&self, tier: Tier, key: &str) -> Option<Entry> {
        self.cache(tier).get(key)
    }

    /// The current epoch of a key's stripe, recorded before a fill starts.
    pub fn epoch(&self, hash: u64) -> u64 {
        // Lock-free read on the request path: the epoch only changes under the stripe's lock.
        self.stripe(hash).epoch.load(Ordering::Acquire)
    }

    /// Stores a fill result unless the key changed since `epoch` was recorded or an entry is present (only
    /// writes replace entries). Returns whether it was stored.
    pub fn fill(&self, tier: Tier, key: Arc<str>, hash: u64, entry: Entry, epoch: u64) -> bool {
        let stripe = self.stripe(hash);
        let _guard = stripe.lock.lock();
        let cache = self.cache(tier);
        if stripe.epoch.load(Ordering::Acquire) != epoch || cache.contains_key(&key) {
            return false;
        }
        cache.insert(key, entry);
        true
    }

    /// A write: stores the entry in `tier`, drops any copy in the other tier, and bumps the epoch so in-flight
    /// fills of the key are discarded.
    pub fn write(&self, tier: Tier, key: Arc<str>, hash: u64, entry: Entry) {
        let stripe = self.stripe(hash);
        let _guard = stripe.lock.lock();
        stripe.bump();
        let other = if tier == Tier::Main { Tier::Hot } else { Tier::Main };
        self.cache(other).invalidate(&key);
        self.cache(tier).insert(key, entry);
    }

    /// Removes a key from both tiers and bumps its epoch.
    pub fn remove(&self, key: &str, hash: u64) {
        let stripe = self.stripe(hash);
        let _guard = stripe.lock.lock();
        stripe.bump();
        self.main.load().invalidate(key);
        self.hot.load().invalidate(key);
    }

    /// Drops every entry of both tiers (or of the hot tier only). In-flight fills are discarded too: every epoch
    /// is bumped.
    pub fn purge(&self, hot_only: bool) {
        for stripe in &*self.stripes {
            let _guard = stripe.lock.lock();
            stripe.bump();
        }
        if !hot_only {
            self.main.load().invalidate_all();
        }
        self.hot.load().invalidate_all();
    }

    /// After a membership change: drops main-tier entries this node no longer owns and every hot copy (their
    /// owners may have changed, and a copy of a key this node now owns must not shadow the main tier later).
    pub fn retain_owned(&self, still_owned: impl Fn(&str) -> bool + Send + Sync + 'static) {
        self.hot.load().invalidate_all();
        // Reason: the predicate registry only fails when invalidation closures are disabled, and they are
        // enabled in `build_cache`; if it ever failed, dropping everything is the safe fallback.
        let main = self.main.load();
        if main.invalidate_entries_if(move |k, _| !still_owned(k)).is_err() {
            main.invalidate_all();
        }
    }

    /// Applies pending evictions and expirations so that sizes read next are exact.
    pub fn sync(&self) {
        self.main.load().run_pending_tasks();
        self.hot.load().run_pending_tasks();
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
        s.write(Tier::Main, "k".into(), h, Entry::value(Bytes::from_static(b"new"), None));
        assert!(!s.fill(Tier::Main, "k".into(), h, Entry::value(Bytes::from_static(b"old"), None), epoch));
        assert_eq!(s.get(Tier::Main, "k").and_then(|e| e.value), Some(Bytes::from_static(b"new")));
    }

    #[test]
    fn a_fill_never_replaces_a_present_entry() {
        let (s, _) = store(1 << 20);
        let h = crate::ring::key_hash("k");
        s.write(Tier::Main, "k".into(), h, Entry::value(Bytes::from_static(b"written"), None));
        let epoch = s.epoch(h);
        assert!(!s.fill(Tier::Main, "k".into(), h, Entry::value(Bytes::from_static(b"loaded"), None), epoch));
        assert_eq!(s.get(Tier::Main, "k").and_then(|e| e.value), Some(Bytes::from_static(b"written")));
    }

    #[test]
    fn resize_keeps_entries_and_applies_the_new_bound() {
        let (s, _) = store(1 << 20);
        for i in 0..500 {
            let key = format!("key-{i}");
            let h = crate::ring::key_hash(&key);
            s.write(Tier::Main, key.into(), h, Entry::value(Bytes::from(vec![0u8; 1000]), None));
        }
        s.resize(256 << 10);
        s.sync();
        assert!(s.tier_bytes(Tier::Main) <= 256 << 10);
        assert!(s.entries() > 100, "entries kept up to the new bound: {}", s.entries());
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
            s.write(Tier::Main, key.into(), h, Entry::value(Bytes::from(vec![0u8; 1000]), None));
        }
        s.sync();
        assert!(s.tier_bytes(Tier::Main) <= 256 << 10, "{} bytes", s.tier_bytes(Tier::Main));
        assert!(evictions.get() > 1_000, "evictions {}", evictions.get());
    }

    #[test]
    fn per_entry_ttl_expires() {
        let (s, _) = store(1 << 20);
        let h = crate::ring::key_hash("k");
        s.write(
            Tier::Main,
            "k".into(),
            h,
            Entry::value(Bytes::from_static(b"v"), Some(Duration::from_millis(30))),
        );
        s.write(Tier::Main, "p".into(), 1, Entry::value(Bytes::from_static(b"v"), None));
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.get(Tier::Main, "k").is_some() {
            assert!(Instant::now() < deadline, "entry did not expire");
            std::thread::yield_now();
        }
        assert!(s.get(Tier::Main, "p").is_some(), "entry without TTL stays");
    }
}
