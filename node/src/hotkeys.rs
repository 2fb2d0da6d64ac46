//! The hottest keys of a keyspace on one node: a bounded top-K fed by the store's count-min sketch.
//!
//! Every read of a key bumps its cells in the sketch (lock-free). Only when a key's estimate reaches a multiple
//! of [`SAMPLE`] and is above the list's floor (its smallest count once full, read without a lock) is it offered
//! to the top-K, under a lock taken with `try_lock`: the request path never waits, and a key is allocated only
//! when it enters the list. When a sketch cell nears saturation, every cell and
//! every count of the list is halved, so the list follows what is hot now rather than since the start.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use distcache_api::HotKey;
use parking_lot::Mutex;

/// Keys kept.
pub const TOP_K: usize = 32;
/// A key is offered to the list every this many estimated reads.
pub const SAMPLE: u16 = 16;

/// The top-K list.
#[derive(Default)]
pub struct HotKeys {
    top: Mutex<Vec<(Arc<str>, u64)>>,
    /// The smallest count of a full list (0 until it is full): estimates at or below it are not offered.
    floor: AtomicU64,
}

impl HotKeys {
    /// Whether an estimate may enter the list (a lock-free check before [`HotKeys::offer`]).
    #[inline]
    pub fn may_enter(&self, estimate: u64) -> bool {
        estimate > self.floor.load(Ordering::Relaxed)
    }

    /// Offers a key with its estimated reads; skipped when the list is busy.
    pub fn offer(&self, key: &str, estimate: u64) {
        let Some(mut top) = self.top.try_lock() else { return };
        Self::offer_locked(&mut top, key, estimate);
        let floor = if top.len() < TOP_K { 0 } else { top.iter().map(|e| e.1).min().unwrap_or(0) };
        self.floor.store(floor, Ordering::Relaxed);
    }

    fn offer_locked(top: &mut Vec<(Arc<str>, u64)>, key: &str, estimate: u64) {
        if let Some(e) = top.iter_mut().find(|(k, _)| k.as_ref() == key) {
            e.1 = e.1.max(estimate);
            return;
        }
        if top.len() < TOP_K {
            top.push((Arc::from(key), estimate));
            return;
        }
        if let Some((i, min)) = top.iter().enumerate().min_by_key(|(_, e)| e.1).map(|(i, e)| (i, e.1))
            && estimate > min
        {
            top[i] = (Arc::from(key), estimate);
        }
    }

    /// Halves every count (the sketch was halved).
    pub fn age(&self) {
        let mut top = self.top.lock();
        for e in top.iter_mut() {
            e.1 /= 2;
        }
        top.retain(|e| e.1 > 0);
        self.floor.store(0, Ordering::Relaxed);
    }

    /// Forgets every key (purge).
    pub fn clear(&self) {
        self.top.lock().clear();
        self.floor.store(0, Ordering::Relaxed);
    }

    /// The list, hottest first, at most `n`.
    pub fn top(&self, n: usize) -> Vec<HotKey> {
        let mut top: Vec<HotKey> =
            self.top.lock().iter().map(|(k, c)| HotKey { key: k.to_string(), hits: *c }).collect();
        top.sort_by(|a, b| b.hits.cmp(&a.hits).then_with(|| a.key.cmp(&b.key)));
        top.truncate(n);
        top
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_hottest_and_ages() {
        let hot = HotKeys::default();
        for i in 0..100u64 {
            hot.offer(&format!("k{i}"), i);
        }
        let top = hot.top(3);
        assert_eq!(top.iter().map(|h| h.key.as_str()).collect::<Vec<_>>(), ["k99", "k98", "k97"]);
        assert_eq!(hot.top(100).len(), TOP_K);
        hot.age();
        assert_eq!(hot.top(1)[0].hits, 49);
    }
}
