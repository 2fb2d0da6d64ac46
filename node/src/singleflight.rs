//! Single flight: concurrent loads of one key share one load.
//!
//! The first caller for a key (the leader) registers a shared future for it and polls the load once, in its own
//! task. A load that needs no waiting (a hook without I/O, a cache-aside NOT_FOUND) ends right there: no task is
//! spawned. A load that must wait is spawned as its own task, so a caller that gives up (client cancelled) never
//! cancels the load the others wait on. Later callers find the registered future and await it. The load
//! unregisters its keys when it finishes, before publishing the result, so nobody joins a finished load. Batches
//! register every key they lead under one load.
//! Measured (2026-12-04, one worker thread, c50 miss path): on the current-thread runtime a spawned load waits
//! behind every ready task before it runs, and its caller again behind them after it, so the first poll in the
//! caller's task is what keeps a miss's queueing close to a hit's. (On a multi-thread runtime, whose LIFO slot
//! runs a task spawned from a worker next, a leader driving its load itself had made no difference.)
//! The map is sharded (`DashMap`): no keyspace-wide lock.

use std::{
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
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
            // Unregisters the keys however the load ends (waiters then get an error instead of joining a dead
            // load forever).
            let guard = Unregister { flight: Arc::clone(self), keys: led, id };
            // A panic of the load is caught on every poll: it becomes an error for each of its keys.
            let mut run = AssertUnwindSafe(load(guard.keys.clone())).catch_unwind();
            // A load that needs no waiting (a hook without I/O, a cache-aside NOT_FOUND) ends in this first poll,
            // in the caller's task: no task to spawn and no second trip through the run queue, which on a
            // one-thread node is most of a miss's queueing. A load that must wait goes on in its own task, polled
            // there with that task's waker, so a caller that gives up never cancels it.
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            match run.poll_unpin(&mut cx) {
                Poll::Ready(results) => publish(guard, results, tx),
                Poll::Pending => {
                    tokio::spawn(async move { publish(guard, run.await, tx) });
                }
            }
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

/// Ends a load: its keys leave the flight, then its waiters (if any are left) get the results, or "the load
/// panicked" for each key.
fn publish<T: Clone + Send + Sync + 'static>(
    guard: Unregister<T>,
    results: std::thread::Result<Vec<Outcome<T>>>,
    tx: futures::channel::oneshot::Sender<Vec<Outcome<T>>>,
) {
    let count = guard.keys.len();
    let results = results.unwrap_or_else(|_| {
        (0..count).map(|_| Err(EngineError::Internal("the load panicked".into()))).collect()
    });
    drop(guard);
    let _ = tx.send(results);
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
    async fn a_load_that_needs_no_waiting_is_done_when_the_leader_asks() {
        let sf = Arc::new(SingleFlight::<u32>::default());
        let mut futures = sf.load_many(&[Arc::from("a"), Arc::from("b")], |keys| {
            async move { keys.iter().map(|k| Ok(u32::from(k.as_bytes()[0]))).collect() }.boxed()
        });
        assert!(sf.is_empty(), "finished in the first poll, nothing left in flight");
        let b = futures.pop().expect("b").now_or_never().expect("b is ready without waiting");
        let a = futures.pop().expect("a").now_or_never().expect("a is ready without waiting");
        assert_eq!((a, b), (Ok(97), Ok(98)));
    }

    #[tokio::test]
    async fn a_load_that_panics_in_its_first_poll_is_an_error_not_a_panic_of_the_caller() {
        let sf = Arc::new(SingleFlight::<u32>::default());
        let got = sf.load("k", || async { panic!("a bug in the load") }.boxed()).await;
        assert!(matches!(got, Err(EngineError::Internal(ref m)) if m.contains("panicked")), "{got:?}");
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
