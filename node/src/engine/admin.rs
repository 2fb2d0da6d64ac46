//! Whole-keyspace operations: purge (local and cluster-wide) and the per-keyspace counters (the type
//! `/admin/keyspaces` reports and the `Stats` RPC carries).

use distcache_api::KeyspaceCounters;

use super::Engine;
use crate::error::{Code, EngineError};

/// Hot keys reported per keyspace (`/admin/keyspaces`, `Stats`).
pub const HOT_KEYS_REPORTED: usize = 20;

impl Engine {
    /// Drops every entry of a keyspace on this node.
    pub fn purge_local(&self, keyspace: &str, hot_only: bool) -> Result<(), EngineError> {
        let ks = self.keyspace(keyspace)?;
        ks.store.purge(hot_only);
        ks.peer_flight.clear();
        if !hot_only {
            ks.source_flight.clear();
            tracing::info!(keyspace, "keyspace purged");
        }
        Ok(())
    }

    /// PurgeKeySpace: drops every entry of a keyspace on every member; returns the number of nodes purged.
    ///
    /// Two rounds: every node drops everything, then every node drops its hot copies again. A node purged early
    /// could otherwise copy a pre-purge value from an owner not purged yet; after the second round no such copy
    /// is left. A member that failed the first round is not asked again.
    pub async fn purge(&self, keyspace: &str) -> Result<u32, EngineError> {
        let ring = self.membership.ring();
        let local = &self.membership.local().name;
        // Failed members by exact name, with their error (a name is never matched as part of another).
        let mut failed: Vec<(String, String)> = Vec::new();
        for hot_only in [false, true] {
            self.purge_local(keyspace, hot_only)?;
            let targets: Vec<_> = ring
                .members()
                .iter()
                .filter(|m| &m.name != local && !failed.iter().any(|(name, _)| name == &m.name))
                .collect();
            let results = futures::future::join_all(
                targets.iter().map(|m| self.transport.purge(m, keyspace, hot_only)),
            )
            .await;
            for (m, r) in targets.into_iter().zip(results) {
                if let Err(e) = r {
                    failed.push((m.name.clone(), e.to_string()));
                }
            }
        }
        let purged = u32::try_from(ring.len() - failed.len()).unwrap_or(u32::MAX);
        let outcome = if failed.is_empty() {
            Ok(purged)
        } else {
            let errors: Vec<&str> = failed.iter().map(|(_, e)| e.as_str()).collect();
            Err(EngineError::Unavailable(format!(
                "purged {purged} of {} nodes; not purged: {}",
                ring.len(),
                errors.join("; ")
            )))
        };
        self.metrics.request("purge", keyspace, outcome.as_ref().err().map_or(Code::Ok, EngineError::code));
        outcome
    }

    /// Per-keyspace counters of this node.
    pub fn stats(&self, keyspace: Option<&str>) -> Result<Vec<KeyspaceCounters>, EngineError> {
        let list = match keyspace {
            Some(name) if !name.is_empty() => vec![self.keyspace(name)?],
            _ => self.keyspaces.all(),
        };
        Ok(list
            .iter()
            .map(|ks| {
                ks.store.sync();
                let m = &ks.metrics;
                KeyspaceCounters {
                    name: ks.config.name.clone(),
                    hits: m.hits_main.get(),
                    hot_hits: m.hits_hot.get(),
                    misses: m.misses.get(),
                    source_fetches: m.fetches_total.get(),
                    entries: ks.store.entries(),
                    bytes: ks.store.bytes(),
                    evictions: m.evictions.get(),
                    forwarded: m.forwarded.get(),
                    owner_fallbacks: m.fallbacks.get(),
                    circuit_state: ks.protect.circuit().map(|c| c.as_str().to_owned()).unwrap_or_default(),
                    stale_served: m.stale_served(),
                    rate_limited: m.rate_limited.get(),
                    hot_keys: ks.store.hot_keys(HOT_KEYS_REPORTED),
                    warm_up: ks.protect.settings.warm_up.as_ref().map(|_| ks.protect.warm_up.progress()),
                }
            })
            .collect())
    }

    /// Refreshes the entries/bytes gauges (before a scrape).
    pub fn refresh_gauges(&self) {
        for ks in self.keyspaces.all() {
            ks.store.sync();
            ks.metrics.entries.set(i64::try_from(ks.store.entries()).unwrap_or(i64::MAX));
            ks.metrics.bytes.set(i64::try_from(ks.store.bytes()).unwrap_or(i64::MAX));
        }
    }
}
