//! Warm-up: each owner loads the keys its keyspaces list in `warmUp.keys` that it owns, at the warm-up rate,
//! once it has settled into the cluster and again after every change of ownership (a keyspaces reload too).
//!
//! A pass goes through the listed keys this node owns when it starts. A key already in the main tier (loaded,
//! or handed over by its previous owner) is counted as present and costs nothing; the others are loaded like a
//! miss (previous owners first during the grace window, then the data source), through the key's single flight,
//! as background fetches (`distcache_background_fetches_total{reason="warm_up"}`), which never wait for a token
//! of the keyspace's rate limit. A new pass replaces the one running. Readiness never waits for a warm-up.

use std::sync::{Arc, atomic::Ordering};

use futures::FutureExt;

use super::{
    Engine,
    read::{Fetch, Why},
};
use crate::{error::EngineError, keyspace::KeyspaceRuntime, protect::Limiter, ring::key_hash, store::Tier};

impl Engine {
    /// Lets warm-ups run from now on (the node has settled into the cluster) and starts them.
    pub fn start_warm_ups(self: &Arc<Self>) {
        self.warm_ups.store(true, Ordering::Release);
        self.warm_up_all();
    }

    /// Starts a warm-up pass of every keyspace that lists keys (once warm-ups may run).
    pub fn warm_up_all(self: &Arc<Self>) {
        if !self.warm_ups.load(Ordering::Acquire) || self.is_leaving() {
            return;
        }
        for ks in self.keyspaces.all() {
            if ks.source.is_some() && ks.protect.settings.warm_up.is_some() {
                self.warm_up(&ks);
            }
        }
    }

    fn warm_up(self: &Arc<Self>, ks: &Arc<KeyspaceRuntime>) {
        let Some((keys, rate)) = ks.protect.settings.warm_up.clone() else { return };
        let owned: Vec<(Arc<str>, u64)> = keys
            .iter()
            .map(|k| (Arc::from(k.as_str()), key_hash(k)))
            .filter(|(_, hash)| self.remote_owner(*hash).is_none())
            .collect();
        let progress = &ks.protect.warm_up;
        let pass = progress.begin(keys.len(), owned.len());
        let (this, ks) = (Arc::clone(self), Arc::clone(ks));
        tokio::spawn(async move {
            let progress = &ks.protect.warm_up;
            let pace = Limiter::new(rate, 1);
            for (key, hash) in owned {
                if !progress.current(pass) || this.is_leaving() {
                    return;
                }
                // Owned by another node since the pass started: the pass that change started has it.
                if this.remote_owner(hash).is_some() {
                    continue;
                }
                let epoch = ks.store.epoch(hash);
                if ks.store.get(Tier::Main, &key).is_some() {
                    progress.present.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // A limiter with a far deadline always gets its token.
                pace.acquire(tokio::time::Instant::now() + std::time::Duration::from_hours(1)).await;
                let load = || {
                    this.owner_load(
                        &ks,
                        vec![(Arc::clone(&key), hash, epoch)],
                        Fetch::Background(Why::WarmUp),
                    )
                    .map(super::single)
                    .boxed()
                };
                match ks.source_flight.load(&key, load).await {
                    Ok(_) | Err(EngineError::NotFound) => {
                        progress.loaded.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        progress.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(keyspace = %ks.config.name, key = %key, error = %e, "warm-up load failed; the key loads on its first read");
                    }
                }
            }
            if progress.current(pass) {
                progress.done.store(true, Ordering::Release);
                let p = progress.progress();
                tracing::info!(
                    keyspace = %ks.config.name,
                    owned = p.owned,
                    loaded = p.loaded,
                    present = p.present,
                    failed = p.failed,
                    "warm-up done"
                );
            }
        });
    }
}
