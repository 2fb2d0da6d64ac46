//! Entry versions: a hybrid logical clock (HLC).
//!
//! A version is `unix milliseconds << 16 | counter`: it follows wall time (so versions assigned on different
//! nodes order as their writes did, to within clock skew) and never goes backwards on one node. Every node also
//! *observes* the versions it receives (handoffs, peeks), so a version it assigns afterwards is newer than any
//! it has seen: an owner's write always wins over what was moved to it, even when its clock lags the sender's.
//!
//! Versions decide every insert that does not come from the owner's own write path: a handed-off or peeked
//! entry is stored only if it is newer than what the receiver holds or has deleted ("newer wins").

use std::sync::atomic::{AtomicU64, Ordering};

/// Bits of a version below the milliseconds.
const LOGICAL_BITS: u32 = 16;

/// A hybrid logical clock.
#[derive(Debug, Default)]
pub struct Hlc {
    last: AtomicU64,
}

fn wall() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX >> LOGICAL_BITS));
    ms << LOGICAL_BITS
}

impl Hlc {
    /// A clock starting at the wall clock.
    pub fn new() -> Self {
        Self { last: AtomicU64::new(wall()) }
    }

    /// A new version, newer than every version this clock assigned or observed.
    pub fn now(&self) -> u64 {
        let physical = wall();
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let next = physical.max(last.saturating_add(1));
            match self.last.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Records a version received from another node: later versions from this clock are newer.
    pub fn observe(&self, version: u64) {
        self.last.fetch_max(version, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase_and_pass_observed_ones() {
        let c = Hlc::new();
        let a = c.now();
        let b = c.now();
        assert!(b > a);
        let ahead = b + (5_000 << LOGICAL_BITS);
        c.observe(ahead);
        assert!(c.now() > ahead, "a version after observing one from a clock 5 s ahead is newer");
    }
}
