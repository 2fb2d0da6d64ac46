//! The protections of a data source, on one engine without IO: stale-while-revalidate, stale-if-error, the
//! circuit breaker, the rate limit, refresh-ahead and warm-up. The source is an in-memory one whose answers a
//! test switches (failing, holding fetches back). Entry lifetimes are real time (the store's clock), kept short.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use distcache_api::ValidKeyspace;

use super::*;
use crate::{
    error::Code,
    keyspace::parse_keyspaces,
    membership::Membership,
    metrics::Metrics,
    peer::local::LocalNetwork,
    ring::Member,
    source::{BuildSourceError, DataSource, FetchError, Fetched, SourceFactory},
};

/// A source whose values carry a short TTL, which can fail (unavailable) or hold fetches until released.
struct Origin {
    fetches: AtomicUsize,
    failing: AtomicBool,
    held: tokio::sync::watch::Sender<bool>,
    ttl: Duration,
}

impl Origin {
    fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            fetches: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            held: tokio::sync::watch::Sender::new(false),
            ttl,
        })
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl DataSource for Origin {
    async fn fetch(&self, key: &str) -> Result<Fetched, FetchError> {
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        let mut held = self.held.subscribe();
        let _ = held.wait_for(|h| !*h).await;
        if self.failing.load(Ordering::SeqCst) {
            return Err(FetchError::Unavailable("origin answered 503".into()));
        }
        if key.starts_with("missing") {
            return Err(FetchError::NotFound { negative_ttl: None });
        }
        Ok(Fetched { value: Bytes::from(format!("{key}#{n}")), ttl: Some(self.ttl) })
    }
}

struct Factory(Arc<Origin>);

#[async_trait]
impl SourceFactory for Factory {
    async fn build(
        &self,
        _keyspace: &ValidKeyspace,
        _base_dir: &Path,
    ) -> Result<Option<Arc<dyn DataSource>>, BuildSourceError> {
        Ok(Some(Arc::clone(&self.0) as Arc<dyn DataSource>))
    }
}

/// One standalone engine serving keyspace `ks` with `settings` (YAML lines of the keyspace).
async fn engine(origin: &Arc<Origin>, settings: &str) -> Arc<Engine> {
    let yaml = format!(
        "keyspaces:\n  - name: ks\n    maxBytes: 1Mi\n    fetchTimeout: 2s\n    hook: {{ module: {{ path: x.wasm }} }}\n{settings}"
    );
    let metrics = Arc::new(Metrics::new());
    let keyspaces = Arc::new(Keyspaces::new(Arc::new(Factory(Arc::clone(origin))), Arc::clone(&metrics)));
    let specs = parse_keyspaces(Path::new("keyspaces.yaml"), &yaml).expect("valid keyspaces");
    keyspaces.apply(specs, Path::new("."), None, false).await.expect("apply");
    let member = Member::new("solo", "10.0.0.1:7422");
    let net = LocalNetwork::new();
    let transport = net.transport(&member, Duration::from_secs(1));
    let engine = Engine::new(keyspaces, Arc::new(Membership::new(member.clone())), transport, metrics);
    net.attach(&member.address, &engine);
    engine.set_members(&[]).await;
    engine
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the key's entry has expired (real time).
async fn expire(engine: &Engine, key: &str) {
    let ks = engine.keyspaces().get("ks").expect("ks");
    wait_until("the entry to expire", || ks.store.get(crate::store::Tier::Main, key).is_none()).await;
}

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let origin = Origin::new(Duration::from_millis(100));
    let e = engine(&origin, "    staleWhileRevalidate: 30s\n").await;
    assert_eq!(e.get("ks", "k").await.expect("first load").bytes, "k#1");
    expire(&e, "k").await;
    origin.held.send_replace(true);
    // Many readers while the refresh is held back: every one gets the stale value without waiting.
    for _ in 0..20 {
        let v = e.get("ks", "k").await.expect("stale answer");
        assert!(v.stale, "marked stale");
        assert_eq!(v.bytes, "k#1");
        assert_eq!(v.ttl, Some(Duration::ZERO));
    }
    wait_until("the background refresh to start", || origin.fetches() == 2).await;
    for _ in 0..20 {
        assert!(e.get("ks", "k").await.expect("stale answer").stale);
    }
    assert_eq!(origin.fetches(), 2, "one background refresh for 40 readers");
    origin.held.send_replace(false);
    let ks = e.keyspaces().get("ks").expect("ks");
    wait_until("the refresh to land", || ks.store.get(crate::store::Tier::Main, "k").is_some()).await;
    let v = e.get("ks", "k").await.expect("fresh");
    assert_eq!((v.bytes.as_ref(), v.stale), (b"k#2".as_ref(), false));
    assert_eq!(ks.metrics.stale_revalidate.get(), 40);
    assert_eq!(ks.metrics.background_revalidate.get(), 1);
}

#[tokio::test]
async fn stale_if_error_serves_the_last_value_while_the_source_fails_and_not_beyond_its_window() {
    let origin = Origin::new(Duration::from_millis(50));
    let e = engine(&origin, "    staleIfError: 300ms\n").await;
    e.get("ks", "k").await.expect("load");
    expire(&e, "k").await;
    origin.failing.store(true, Ordering::SeqCst);
    let v = e.get("ks", "k").await.expect("stale instead of the error");
    assert!(v.stale);
    assert_eq!(v.bytes, "k#1");
    let ks = e.keyspaces().get("ks").expect("ks");
    assert_eq!(ks.metrics.stale_source_error.get(), 1);
    // Past the window, the error stands.
    let ks2 = Arc::clone(&ks);
    wait_until("the value to be older than staleIfError", move || {
        ks2.store
            .lookup(crate::store::Tier::Main, "k")
            .and_then(|entry| entry.stale_for(std::time::Instant::now()))
            .is_none_or(|age| age > Duration::from_millis(300))
    })
    .await;
    let err = e.get("ks", "k").await.expect_err("beyond staleIfError");
    assert_eq!(err.code(), Code::Unavailable);
    // A key never cached has nothing to fall back on.
    assert_eq!(e.get("ks", "other").await.expect_err("no value").code(), Code::Unavailable);
}

#[tokio::test]
async fn the_breaker_opens_refuses_without_calling_the_source_then_half_opens_and_closes() {
    let origin = Origin::new(Duration::from_mins(1));
    let e =
        engine(&origin, "    circuitBreaker: { failureRatio: 0.5, minimumRequests: 4, openFor: 300ms }\n")
            .await;
    origin.failing.store(true, Ordering::SeqCst);
    for i in 0..4 {
        let err = e.get("ks", &format!("k{i}")).await.expect_err("failing");
        assert_eq!(err.code(), Code::Unavailable);
    }
    let ks = e.keyspaces().get("ks").expect("ks");
    assert_eq!(ks.metrics.circuit_state.get(), 1, "open after 4 of 4 failed");
    let before = origin.fetches();
    for i in 0..10 {
        let err = e.get("ks", &format!("other{i}")).await.expect_err("open");
        assert!(err.to_string().contains("circuit open for keyspace ks"), "{err}");
    }
    assert_eq!(origin.fetches(), before, "no fetch while open");
    assert_eq!(ks.metrics.circuit_rejected.get(), 10);
    origin.failing.store(false, Ordering::SeqCst);
    let breaker = ks.protect.breaker.clone().expect("a breaker");
    wait_until("the circuit to half-open", || breaker.state() == crate::protect::CircuitState::HalfOpen)
        .await;
    assert_eq!(
        e.get("ks", "after").await.expect("the probe succeeds").bytes,
        format!("after#{}", before + 1)
    );
    assert_eq!(ks.metrics.circuit_state.get(), 0, "closed again");
}

#[tokio::test]
async fn not_found_answers_never_open_the_breaker() {
    let origin = Origin::new(Duration::from_mins(1));
    let e = engine(&origin, "    circuitBreaker: { minimumRequests: 2 }\n").await;
    for i in 0..50 {
        assert_eq!(e.get("ks", &format!("missing{i}")).await.expect_err("nf").code(), Code::NotFound);
    }
    assert_eq!(e.keyspaces().get("ks").expect("ks").metrics.circuit_state.get(), 0);
}

#[tokio::test]
async fn the_rate_limit_refuses_beyond_its_budget_with_resource_exhausted() {
    let origin = Origin::new(Duration::from_mins(1));
    // fetchTimeout 2s, one fetch per second, burst 2: two go at once, the third waits ~1s, and a batch of many
    // cannot all get a token within the deadline.
    let e = engine(&origin, "    rateLimit: { fetchesPerSecond: 1, burst: 2 }\n").await;
    e.get("ks", "a").await.expect("token 1");
    e.get("ks", "b").await.expect("token 2");
    let keys: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let results = e.get_many("ks", &keys).await.expect("batch");
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(!refused.is_empty(), "10 fetches at 1/s cannot fit a 2 s deadline");
    for err in refused {
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(err.to_string().contains("keyspace ks: source fetch rate limit (1/s) reached"), "{err}");
    }
    assert!(
        origin.fetches() <= 2 + 3,
        "at most the burst and the tokens of the deadline: {}",
        origin.fetches()
    );
}

#[tokio::test]
async fn refresh_ahead_keeps_a_read_key_from_ever_missing() {
    let origin = Origin::new(Duration::from_millis(300));
    let e = engine(&origin, "    refreshAhead: 0.5\n").await;
    e.get("ks", "hot").await.expect("load");
    let ks = e.keyspaces().get("ks").expect("ks");
    // Reads for three lifetimes of the entry.
    // A read every 10 ms (paced by an interval: this loop waits for nothing but the next read).
    let end = tokio::time::Instant::now() + Duration::from_millis(900);
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    while tokio::time::Instant::now() < end {
        pace.tick().await;
        let v = e.get("ks", "hot").await.expect("hit");
        assert!(!v.stale);
    }
    assert_eq!(ks.metrics.misses.get(), 1, "only the first read missed");
    assert!(ks.metrics.background_refresh_ahead.get() >= 2, "refreshed ahead of expiry");
    assert!(origin.fetches() <= 1 + 6, "one refresh per lifetime, not one per read: {}", origin.fetches());
}

#[tokio::test]
async fn warm_up_loads_the_listed_keys_once_and_reports_progress() {
    let origin = Origin::new(Duration::from_mins(1));
    let e = engine(&origin, "    warmUp: { keys: [a, b, c, missing-d], fetchesPerSecond: 100 }\n").await;
    e.get("ks", "a").await.expect("a is already there");
    e.start_warm_ups();
    let ks = e.keyspaces().get("ks").expect("ks");
    wait_until("the warm-up to finish", || ks.protect.warm_up.progress().done).await;
    let p = ks.protect.warm_up.progress();
    assert_eq!((p.listed, p.owned, p.loaded, p.present, p.failed), (4, 4, 3, 1, 0));
    assert_eq!(origin.fetches(), 4, "a once by the read, b, c and missing-d once by the warm-up");
    assert_eq!(ks.metrics.background_warm_up.get(), 3);
    e.get("ks", "b").await.expect("b warm");
    assert_eq!(origin.fetches(), 4);
}

#[tokio::test]
async fn hot_keys_lists_the_most_read_keys() {
    let origin = Origin::new(Duration::from_mins(1));
    let e = engine(&origin, "").await;
    for (key, reads) in [("hot", 200), ("warm", 40), ("cold", 1)] {
        for _ in 0..reads {
            e.get("ks", key).await.expect("read");
        }
    }
    let stats = e.stats(Some("ks")).expect("stats");
    let keys: Vec<&str> = stats[0].hot_keys.iter().map(|h| h.key.as_str()).collect();
    assert_eq!(keys.first(), Some(&"hot"), "{keys:?}");
    assert!(keys.contains(&"warm"), "{keys:?}");
    assert!(!keys.contains(&"cold"), "{keys:?}");
}
