//! Protections of a keyspace's data source on one node: the fetch rate limit (a token bucket, governor), the
//! circuit breaker, and the warm-up's progress.
//!
//! **Rate limit.** A blocking fetch (a reader waits for it) waits for a token up to the keyspace's
//! `fetchTimeout`, and fails RESOURCE_EXHAUSTED when none comes in time; it does not wait at all when the bucket
//! says the wait would be longer. Background fetches (stale-while-revalidate, refresh-ahead, warm-up) never
//! wait: without a token they are skipped.
//!
//! **Circuit breaker.** Closed, it counts fetch outcomes in a sliding window of ten buckets. Only `unavailable`,
//! `timeout` and hook traps (internal) are failures; `not-found` and `invalid-key` are answers of a healthy
//! source and count as successes. Once the window holds at least `minimumRequests` outcomes and the share of
//! failures reaches `failureRatio`, it opens: fetches are refused at once for `openFor`. Then it is half-open:
//! one probe fetch at a time goes through; a probe that succeeds closes it, one that fails opens it again.

use std::{
    collections::VecDeque,
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use distcache_api::{BreakerSettings, Protection, WarmUpProgress};
use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    state::{InMemoryState, NotKeyed},
};
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;

use crate::source::FetchError;

type Bucket = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// A token bucket: `per_second` sustained, `burst` at once.
pub struct Limiter {
    bucket: Bucket,
    clock: DefaultClock,
    per_second: u32,
}

impl Limiter {
    /// A bucket of `burst` tokens refilled at `per_second`.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Self {
            bucket: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
            per_second,
        }
    }

    /// The sustained rate.
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Takes a token if one is there now.
    pub fn try_acquire(&self) -> bool {
        self.bucket.check().is_ok()
    }

    /// Takes a token, waiting for one until `deadline`; false when none comes by then (then it does not wait
    /// at all when the bucket already says so).
    pub async fn acquire(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            match self.bucket.check() {
                Ok(()) => return true,
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    let at = tokio::time::Instant::now() + wait;
                    if at > deadline {
                        return false;
                    }
                    tokio::time::sleep_until(at).await;
                }
            }
        }
    }
}

/// The breaker's state, as reported (`distcache_circuit_state`: 0, 1, 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    /// Fetches go through.
    Closed,
    /// Fetches are refused.
    Open,
    /// One probe at a time goes through.
    HalfOpen,
}

impl CircuitState {
    /// `closed`, `open`, `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    fn gauge_value(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

struct BreakerState {
    phase: Phase,
    /// (bucket index since `origin`, successes, failures), oldest first.
    buckets: VecDeque<(u64, u32, u32)>,
}

/// A circuit breaker (see the module doc).
pub struct Breaker {
    settings: BreakerSettings,
    state: Mutex<BreakerState>,
    origin: Instant,
    gauge: Gauge,
    keyspace: String,
}

/// Why a fetch may not go through now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The circuit is open; it half-opens in this long (zero: a probe is in flight).
    CircuitOpen(Duration),
    /// No token within the fetch's deadline.
    RateLimited,
}

/// Leave to call the source: records the outcome into the breaker (a probe that is dropped unrecorded frees
/// the half-open slot).
pub struct Admission {
    breaker: Option<Arc<Breaker>>,
    probe: bool,
    recorded: bool,
}

impl Admission {
    /// Admission without a breaker.
    pub fn free() -> Self {
        Self { breaker: None, probe: false, recorded: true }
    }

    /// Records the outcomes of the fetch (one per key).
    pub fn record<'a>(
        self,
        outcomes: impl IntoIterator<Item = &'a Result<crate::source::Fetched, FetchError>>,
    ) {
        self.record_at(outcomes, Instant::now());
    }

    /// [`Admission::record`] at `now`.
    fn record_at<'a>(
        mut self,
        outcomes: impl IntoIterator<Item = &'a Result<crate::source::Fetched, FetchError>>,
        now: Instant,
    ) {
        self.recorded = true;
        let Some(breaker) = self.breaker.take() else { return };
        let (mut ok, mut failed) = (0u32, 0u32);
        for r in outcomes {
            if counts_as_failure(r) {
                failed += 1;
            } else {
                ok += 1;
            }
        }
        breaker.record(self.probe, ok, failed, now);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.recorded
            && self.probe
            && let Some(b) = &self.breaker
        {
            let mut s = b.state.lock();
            if let Phase::HalfOpen { probing } = &mut s.phase {
                *probing = false;
            }
        }
    }
}

/// Whether an outcome counts against the source: unavailable, timeout, a trap (internal). Not-found and an
/// invalid key are answers of a healthy source.
pub fn counts_as_failure(r: &Result<crate::source::Fetched, FetchError>) -> bool {
    matches!(r, Err(FetchError::Unavailable(_) | FetchError::Timeout | FetchError::Internal(_)))
}

const BUCKETS: u64 = 10;

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings, gauge: Gauge, keyspace: &str) -> Self {
        gauge.set(0);
        Self {
            settings,
            state: Mutex::new(BreakerState { phase: Phase::Closed, buckets: VecDeque::new() }),
            origin: Instant::now(),
            gauge,
            keyspace: keyspace.to_owned(),
        }
    }

    fn bucket_of(&self, now: Instant) -> u64 {
        let width = (self.settings.window.as_nanos() / u128::from(BUCKETS)).max(1);
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos() / width).unwrap_or(u64::MAX)
    }

    /// The state now (an open circuit whose time is up reports half-open).
    pub fn state(&self) -> CircuitState {
        match self.state.lock().phase {
            Phase::Closed => CircuitState::Closed,
            Phase::Open { until } if Instant::now() < until => CircuitState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Asks to call the source now.
    pub fn admit(self: &Arc<Self>, now: Instant) -> Result<Admission, Refusal> {
        let mut s = self.state.lock();
        let probe = match s.phase {
            Phase::Closed => false,
            Phase::Open { until } if now < until => return Err(Refusal::CircuitOpen(until - now)),
            Phase::Open { .. } | Phase::HalfOpen { probing: false } => {
                s.phase = Phase::HalfOpen { probing: true };
                self.gauge.set(CircuitState::HalfOpen.gauge_value());
                tracing::info!(keyspace = %self.keyspace, "circuit half-open: one probe fetch goes through");
                true
            }
            Phase::HalfOpen { probing: true } => return Err(Refusal::CircuitOpen(Duration::ZERO)),
        };
        Ok(Admission { breaker: Some(Arc::clone(self)), probe, recorded: false })
    }

    fn record(&self, probe: bool, ok: u32, failed: u32, now: Instant) {
        let mut s = self.state.lock();
        if probe {
            if failed > 0 {
                self.open(&mut s, now, "the probe fetch failed");
            } else {
                s.phase = Phase::Closed;
                s.buckets.clear();
                self.gauge.set(CircuitState::Closed.gauge_value());
                tracing::info!(keyspace = %self.keyspace, "circuit closed: the probe fetch succeeded");
            }
            return;
        }
        // Outcomes of fetches admitted before the circuit opened do not count any more.
        if !matches!(s.phase, Phase::Closed) {
            return;
        }
        let bucket = self.bucket_of(now);
        let oldest = bucket.saturating_sub(BUCKETS - 1);
        while s.buckets.front().is_some_and(|b| b.0 < oldest) {
            s.buckets.pop_front();
        }
        match s.buckets.back_mut() {
            Some(b) if b.0 == bucket => {
                b.1 += ok;
                b.2 += failed;
            }
            _ => s.buckets.push_back((bucket, ok, failed)),
        }
        let (total_ok, total_failed) =
            s.buckets.iter().fold((0u64, 0u64), |(o, f), b| (o + u64::from(b.1), f + u64::from(b.2)));
        let total = total_ok + total_failed;
        // Reason: counts far below 2^52 are exact as f64.
        #[allow(clippy::cast_precision_loss)]
        let ratio = if total == 0 { 0.0 } else { total_failed as f64 / total as f64 };
        if total >= u64::from(self.settings.minimum_requests)
            && total_failed > 0
            && ratio >= self.settings.failure_ratio
        {
            let why = format!("{total_failed} of {total} fetches failed within {:?}", self.settings.window);
            self.open(&mut s, now, &why);
        }
    }

    fn open(&self, s: &mut BreakerState, now: Instant, why: &str) {
        s.phase = Phase::Open { until: now + self.settings.open_for };
        s.buckets.clear();
        self.gauge.set(CircuitState::Open.gauge_value());
        tracing::warn!(keyspace = %self.keyspace, open_for = ?self.settings.open_for, "circuit opened: {why}; fetches are refused until it half-opens");
    }
}

/// Progress of a keyspace's warm-up on this node.
#[derive(Default)]
pub struct WarmUp {
    /// Bumped by every new pass; a pass stops when it is no longer the current one.
    pub generation: AtomicU64,
    pub(crate) listed: AtomicU32,
    pub(crate) owned: AtomicU32,
    pub(crate) loaded: AtomicU32,
    pub(crate) present: AtomicU32,
    pub(crate) failed: AtomicU32,
    pub(crate) done: AtomicBool,
}

impl WarmUp {
    /// Starts a pass over `listed` keys of which `owned` are this node's; returns its generation.
    pub fn begin(&self, listed: usize, owned: usize) -> u64 {
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.listed.store(u32::try_from(listed).unwrap_or(u32::MAX), Ordering::Relaxed);
        self.owned.store(u32::try_from(owned).unwrap_or(u32::MAX), Ordering::Relaxed);
        for c in [&self.loaded, &self.present, &self.failed] {
            c.store(0, Ordering::Relaxed);
        }
        self.done.store(false, Ordering::Release);
        g
    }

    /// Whether pass `g` is still the current one.
    pub fn current(&self, g: u64) -> bool {
        self.generation.load(Ordering::Acquire) == g
    }

    /// The progress, as reported.
    pub fn progress(&self) -> WarmUpProgress {
        WarmUpProgress {
            listed: self.listed.load(Ordering::Relaxed),
            owned: self.owned.load(Ordering::Relaxed),
            loaded: self.loaded.load(Ordering::Relaxed),
            present: self.present.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Acquire),
        }
    }
}

/// Everything that protects one keyspace's data source on this node.
pub struct Protections {
    /// The settings these were built from.
    pub settings: Protection,
    /// The fetch rate limit.
    pub limiter: Option<Limiter>,
    /// The circuit breaker.
    pub breaker: Option<Arc<Breaker>>,
    /// Warm-up progress.
    pub warm_up: WarmUp,
}

impl Protections {
    /// Builds them from validated settings; `circuit_gauge` is the keyspace's `distcache_circuit_state`.
    pub fn new(settings: &Protection, circuit_gauge: Gauge, keyspace: &str) -> Self {
        Self {
            settings: settings.clone(),
            limiter: settings.rate_limit.map(|(rate, burst)| Limiter::new(rate, burst)),
            breaker: settings.circuit_breaker.map(|b| Arc::new(Breaker::new(b, circuit_gauge, keyspace))),
            warm_up: WarmUp::default(),
        }
    }

    /// The breaker's state, `None` without one.
    pub fn circuit(&self) -> Option<CircuitState> {
        self.breaker.as_ref().map(|b| b.state())
    }

    /// Asks leave to fetch `keys` keys: the breaker first (an open circuit costs no token), then one token per
    /// key, waiting until `deadline` when `wait` (a reader waits), else only if tokens are there now.
    pub async fn admit(&self, keys: usize, wait: Option<tokio::time::Instant>) -> Result<Admission, Refusal> {
        let admission = match &self.breaker {
            Some(b) => b.admit(Instant::now())?,
            None => Admission::free(),
        };
        if let Some(limiter) = &self.limiter {
            for _ in 0..keys {
                let got = match wait {
                    Some(deadline) => limiter.acquire(deadline).await,
                    None => limiter.try_acquire(),
                };
                if !got {
                    return Err(Refusal::RateLimited);
                }
            }
        }
        Ok(admission)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Fetched;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failure_ratio: 0.5,
            minimum_requests: 4,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
        }
    }

    #[allow(clippy::unnecessary_wraps, reason = "an outcome as the breaker records it")]
    fn ok() -> Result<Fetched, FetchError> {
        Ok(Fetched { value: bytes::Bytes::from_static(b"v"), ttl: None })
    }

    #[test]
    fn opens_at_the_ratio_after_the_minimum_and_half_opens_for_one_probe() {
        let b = Arc::new(Breaker::new(settings(), Gauge::default(), "users"));
        let t0 = Instant::now();
        // Three failures: below the minimum of four outcomes.
        for _ in 0..3 {
            b.admit(t0).expect("closed").record_at([&Err(FetchError::Unavailable("down".into()))], t0);
        }
        assert_eq!(b.state(), CircuitState::Closed);
        b.admit(t0).expect("closed").record_at([&ok()], t0);
        // 3 of 4 failed: open.
        assert!(matches!(b.admit(t0), Err(Refusal::CircuitOpen(d)) if d == Duration::from_secs(5)));
        let later = t0 + Duration::from_secs(6);
        let probe = b.admit(later).expect("a probe goes through");
        assert!(matches!(b.admit(later), Err(Refusal::CircuitOpen(Duration::ZERO))), "one probe at a time");
        probe.record_at([&Err(FetchError::Timeout)], later);
        assert!(b.admit(later).is_err(), "a failed probe opens it again");
        let much_later = later + Duration::from_secs(6);
        b.admit(much_later).expect("probe").record_at([&ok()], much_later);
        assert_eq!(b.state(), CircuitState::Closed);
        b.admit(much_later).expect("closed again");
    }

    #[test]
    fn not_found_and_invalid_keys_never_open_it() {
        let b = Arc::new(Breaker::new(settings(), Gauge::default(), "users"));
        let now = Instant::now();
        for _ in 0..100 {
            b.admit(now).expect("closed").record([
                &Err(FetchError::NotFound { negative_ttl: None }),
                &Err(FetchError::InvalidKey("bad".into())),
            ]);
        }
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[test]
    fn a_dropped_probe_frees_the_half_open_slot() {
        let b = Arc::new(Breaker::new(settings(), Gauge::default(), "users"));
        let t0 = Instant::now();
        for _ in 0..4 {
            b.admit(t0).expect("closed").record_at([&Err(FetchError::Internal("trap".into()))], t0);
        }
        let later = t0 + Duration::from_secs(6);
        drop(b.admit(later).expect("probe"));
        b.admit(later).expect("another probe may go");
    }

    #[tokio::test(start_paused = true)]
    async fn the_limiter_refuses_at_once_when_the_wait_exceeds_the_deadline() {
        let l = Limiter::new(1, 1);
        assert!(l.try_acquire());
        assert!(!l.try_acquire());
        let soon = tokio::time::Instant::now() + Duration::from_millis(10);
        assert!(!l.acquire(soon).await, "the next token is a second away");
    }
}
