//! Single flight: concurrent loads of one key share one load.
//!
//! The first caller for a key (the leader) registers a shared future for it and spawns the load as its own task,
//! so a caller that gives up (client cancelled) never cancels the load the others wait on. Later callers find
//! the registered future and await it. The task unregisters its keys when it finishes, before publishing the
//! result, so nobody joins a finished load. Batches register every key they lead under one task.
//! A leader that drives its load itself (no spawn; a task finishing it if the leader is dropped) was measured
//! against this on the miss path (2026-12-04, one worker thread, c50, interleaved runs): no less CPU per miss and
//! no better p99, so the simpler spawned task stays.
//! The map is sharded (`DashMap`): no keyspace-wide lock.

use std::{
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use dashmap::{DashMap, mapref::entry::Entry as MapEntry};
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};

use crate::error::EngineError;

type Outcome<T> = Result<T, EngineError>;
type SharedOutcome<T> = Shared<BoxFuture<'static, Outcome<T>>>;

/// The in-flight loads of one keyspace tier.
pub struct SingleFlight<T: Clone + Send + Sync + 'static> {
    inflight: DashMap<Arc<str>, (u64, SharedOutcome<T>)>,
    ids: AtomicU64,
}

impl<T: Clone + Send + Sync + 'static> Default for SingleFlight<T> {
    fn default() -> Self {
        Self { inflight: DashMap::new(), ids: AtomicU64::new(0) }
    }
}

impl<T: Clone + Send + Sync + 'static> SingleFlight<T> {
    /// Loads one key: joins the in-flight load of `key` or runs `load` as the leader.
    pub async fn load<F>(self: &Arc<Self>, key: &str, load: F) -> Outcome<T>
    where
        F: FnOnce() -> BoxFuture<'static, Outcome<T>>,
    {
        let mut futures = self.load_many(&[Arc::from(key)], |_| {
            let fut = load();
            async move { vec![fut.await] }.boxed()
        });
        match futures.pop() {
            Some(f) => f.await,
            None => Err(EngineError::Internal("single flight returned no result".into())),
        }
    }

    /// Loads many keys: returns one future per key (in order). Keys already in flight join their load; the
    /// others are led together by one call of `load` with the list of led keys (deduplicated), which must return
    /// one result per led key, in order.
    pub fn load_many<F>(self: &Arc<Self>, keys: &[Arc<str>], load: F) -> Vec<SharedOutcome<T>>
    where
        F: FnOnce(Vec<Arc<str>>) -> BoxFuture<'static, Vec<Outcome<T>>>,
    {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = futures::channel::oneshot::channel::<Vec<Outcome<T>>>();
        let batch = rx.map(Result::unwrap_or_default).boxed().shared();
        let mut led: Vec<Arc<str>> = Vec::new();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let fut = match self.inflight.entry(key.clone()) {
                MapEntry::Occupied(e) => e.get().1.clone(),
                MapEntry::Vacant(v) => {
                    let index = led.len();
                    led.push(key.clone());
                    let fut = batch
                        .clone()
                        .map(move |results| {
                            results.get(index).cloned().unwrap_or_else(|| {
                                Err(EngineError::Internal(
                                    "load was cancelled or returned too few results".into(),
                                ))
                            })
                        })
                        .boxed()
                        .shared();
                    v.insert((id, fut.clone()));
                    fut
                }
            };
            out.push(fut);
        }
        if !led.is_empty() {
            let this = Arc::clone(self);
            let run = load(led.clone());
            tokio::spawn(async move {
                // Unregisters the keys however the task ends (waiters then get an error instead of joining a
                // dead load forever).
                let guard = Unregister { flight: this, keys: led, id };
                let count = guard.keys.len();
                // A panic of the load is an error for each of its keys, saying so.
                let results = AssertUnwindSafe(run).catch_unwind().await.unwrap_or_else(|_| {
                    (0..count).map(|_| Err(EngineError::Internal("the load panicked".into()))).collect()
                });
                drop(guard);
                // Waiters may all be gone; nothing to do then.
                let _ = tx.send(results);
            });
        }
        out
    }

    /// Forgets every in-flight load (after a purge).
    pub fn clear(&self) {
        self.inflight.clear();
    }

    /// Forgets the in-flight load of a key (after a write, so that later readers do not join a load that
    /// started before the write). The load itself finishes and is discarded by the store's epoch check.
    pub fn forget(&self, key: &str) {
        self.inflight.remove(key);
    }

    /// Whether a load of `key` is in flight.
    pub fn contains(&self, key: &str) -> bool {
        self.inflight.contains_key(key)
    }

    /// Number of keys in flight.
    pub fn len(&self) -> usize {
        self.inflight.len()
    }

    /// True when nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }
}

struct Unregister<T: Clone + Send + Sync + 'static> {
    flight: Arc<SingleFlight<T>>,
    keys: Vec<Arc<str>>,
    id: u64,
}

impl<T: Clone + Send + Sync + 'static> Drop for Unregister<T> {
    fn drop(&mut self) {
        for key in &self.keys {
            self.flight.inflight.remove_if(key, |_, (owner, _)| *owner == self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test]
    async fn concurrent_loads_of_one_key_share_one_call() {
        let sf = Arc::new(SingleFlight::<u32>::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let sf = sf.clone();
            let calls = calls.clone();
            let mut release = release_rx.clone();
            tasks.push(tokio::spawn(async move {
                sf.load("k", move || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let _ = release.wait_for(|r| *r).await;
                        Ok(7)
                    }
                    .boxed()
                })
                .await
            }));
        }
        // Every caller is registered once the key is in flight and all tasks have polled.
        while sf.is_empty() {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        release_tx.send_replace(true);
        for t in tasks {
            assert_eq!(t.await.expect("task"), Ok(7));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(sf.is_empty());
    }

    /// A load that waits for `release`, then counts itself finished.
    fn gated_load(
        finished: &Arc<AtomicUsize>,
        release: &tokio::sync::watch::Receiver<bool>,
    ) -> impl FnOnce() -> BoxFuture<'static, Outcome<u32>> + use<> {
        let (finished, mut release) = (Arc::clone(finished), release.clone());
        move || {
            async move {
                let _ = release.wait_for(|r| *r).await;
                finished.fetch_add(1, Ordering::SeqCst);
                Ok(7)
            }
            .boxed()
        }
    }

    /// One flight and loads of `k` that wait for [`Gated::release`], counting those that finished.
    struct Gated {
        sf: Arc<SingleFlight<u32>>,
        finished: Arc<AtomicUsize>,
        release_tx: tokio::sync::watch::Sender<bool>,
        release_rx: tokio::sync::watch::Receiver<bool>,
    }

    impl Gated {
        fn new() -> Self {
            let (release_tx, release_rx) = tokio::sync::watch::channel(false);
            Self { sf: Arc::default(), finished: Arc::default(), release_tx, release_rx }
        }

        /// A task that loads `k` (leading, or joining the load in flight).
        fn spawn(&self) -> tokio::task::JoinHandle<Outcome<u32>> {
            let (sf, load) = (Arc::clone(&self.sf), gated_load(&self.finished, &self.release_rx));
            tokio::spawn(async move { sf.load("k", load).await })
        }

        /// [`Gated::spawn`], once the load is in flight.
        async fn lead(&self) -> tokio::task::JoinHandle<Outcome<u32>> {
            let leader = self.spawn();
            while self.sf.is_empty() {
                tokio::task::yield_now().await;
            }
            leader
        }

        fn release(&self) {
            self.release_tx.send_replace(true);
        }

        fn finished(&self) -> usize {
            self.finished.load(Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn a_leader_that_gives_up_neither_cancels_the_load_nor_fails_its_joiners() {
        let g = Gated::new();
        let leader = g.lead().await;
        let joiner = g.spawn();
        tokio::task::yield_now().await;
        leader.abort();
        assert!(leader.await.expect_err("aborted").is_cancelled());
        g.release();
        assert_eq!(joiner.await.expect("joiner"), Ok(7), "the joiner gets the load's result");
        assert_eq!(g.finished(), 1, "one load ran, to its end");
        assert!(g.sf.is_empty());
    }

    #[tokio::test]
    async fn a_load_nobody_waits_for_any_more_still_finishes_and_leaves_the_flight() {
        let g = Gated::new();
        let leader = g.lead().await;
        leader.abort();
        assert!(leader.await.expect_err("aborted").is_cancelled());
        g.release();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !g.sf.is_empty() || g.finished() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the abandoned load did not finish");
            tokio::task::yield_now().await;
        }
        assert_eq!(g.finished(), 1);
    }

    #[tokio::test]
    async fn a_load_that_panics_is_an_error_for_the_leader_and_its_joiners() {
        let sf = Arc::new(SingleFlight::<u32>::default());
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let panicking = move || {
            let mut release = release_rx;
            async move {
                let _ = release.wait_for(|r| *r).await;
                panic!("a bug in the load");
            }
            .boxed()
        };
        let leader = tokio::spawn({
            let sf = sf.clone();
            async move { sf.load("k", panicking).await }
        });
        while sf.is_empty() {
            tokio::task::yield_now().await;
        }
        let joiner = tokio::spawn({
            let sf = sf.clone();
            async move { sf.load("k", || async { Ok(1) }.boxed()).await }
        });
        tokio::task::yield_now().await;
        release_tx.send_replace(true);
        for caller in [leader, joiner] {
            let got = caller.await.expect("no caller panics");
            assert!(matches!(got, Err(EngineError::Internal(ref m)) if m.contains("panicked")), "{got:?}");
        }
        assert!(sf.is_empty());
        assert_eq!(sf.load("k", || async { Ok(2) }.boxed()).await, Ok(2), "the next load starts afresh");
    }

    #[tokio::test]
    async fn batch_leads_new_keys_and_joins_inflight_ones() {
        let sf = Arc::new(SingleFlight::<String>::default());
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let first = sf.load_many(&[Arc::from("a")], move |keys| {
            async move {
                let _ = release_rx.await;
                keys.iter().map(|k| Ok(format!("first-{k}"))).collect()
            }
            .boxed()
        });
        let second = sf.load_many(&[Arc::from("a"), Arc::from("b"), Arc::from("b")], |keys| {
            assert_eq!(keys.len(), 1, "only b is led, once");
            async move { keys.iter().map(|k| Ok(format!("second-{k}"))).collect() }.boxed()
        });
        let _ = release_tx.send(());
        assert_eq!(first[0].clone().await, Ok("first-a".into()));
        let got: Vec<_> = futures::future::join_all(second).await;
        assert_eq!(got, vec![Ok("first-a".into()), Ok("second-b".into()), Ok("second-b".into())]);
    }
}
