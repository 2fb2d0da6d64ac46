//! Writes: Put/Delete (and their batches) routed to the owner; the owner applies them and invalidates copies
//! on every other member before answering.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use super::{
    Engine, peer_unreachable, routing::group_by_owner, single, validate_batch, validate_key, validate_write,
};
use crate::{
    batch::Batch,
    error::{Code, EngineError},
    keyspace::KeyspaceRuntime,
    peer::{KeyResults, WriteEntry},
    ring::{Member, key_hash},
    store::{Entry, HOT_MAX_TTL, Tier},
};

/// One write of a batch: a batch is all puts or all deletes (they come from one API call).
#[derive(Clone, Debug)]
enum Write {
    Put(WriteEntry),
    Delete(Arc<str>),
}

impl Write {
    fn key(&self) -> &Arc<str> {
        match self {
            Self::Put(e) => &e.key,
            Self::Delete(k) => k,
        }
    }

    fn validate(self, ks: &KeyspaceRuntime) -> Result<Self, EngineError> {
        match &self {
            Self::Put(e) => validate_write(ks, e)?,
            Self::Delete(k) => validate_key(k)?,
        }
        Ok(self)
    }
}

impl Engine {
    /// Put of one key.
    pub async fn put(
        self: &Arc<Self>,
        keyspace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), EngineError> {
        let entry = WriteEntry { key: Arc::from(key), value, ttl };
        self.put_many(keyspace, vec![entry]).await.and_then(single)
    }

    /// PutMany: per-key results in request order; one store call per owner.
    pub async fn put_many(
        self: &Arc<Self>,
        keyspace: &str,
        entries: Vec<WriteEntry>,
    ) -> Result<KeyResults<()>, EngineError> {
        let ks = self.keyspace(keyspace)?;
        validate_batch(entries.len())?;
        let op = if entries.len() == 1 { "put" } else { "put_many" };
        let results = self.write_routed(&ks, entries.into_iter().map(Write::Put).collect(), false).await;
        self.count_writes(op, &ks, &results);
        Ok(results)
    }

    /// Delete of one key.
    pub async fn delete(self: &Arc<Self>, keyspace: &str, key: &str) -> Result<(), EngineError> {
        self.delete_many(keyspace, &[key.to_owned()]).await.and_then(single)
    }

    /// DeleteMany: per-key results in request order; one remove call per owner.
    pub async fn delete_many(
        self: &Arc<Self>,
        keyspace: &str,
        keys: &[String],
    ) -> Result<KeyResults<()>, EngineError> {
        let ks = self.keyspace(keyspace)?;
        validate_batch(keys.len())?;
        let op = if keys.len() == 1 { "delete" } else { "delete_many" };
        let writes = keys.iter().map(|k| Write::Delete(Arc::from(k.as_str()))).collect();
        let results = self.write_routed(&ks, writes, false).await;
        self.count_writes(op, &ks, &results);
        Ok(results)
    }

    fn count_writes(&self, op: &'static str, ks: &KeyspaceRuntime, results: &KeyResults<()>) {
        let code = results.iter().find_map(|r| r.as_ref().err().map(EngineError::code)).unwrap_or(Code::Ok);
        // The common cases through handles resolved once (no label lookup on the write path).
        match (op, code) {
            ("put", Code::Ok) => {
                ks.metrics.put_ok.inc();
            }
            ("delete", Code::Ok) => {
                ks.metrics.delete_ok.inc();
            }
            _ => self.metrics.request(op, ks.name(), code),
        }
    }

    /// Applies writes at their owners in this node's view (`forwarded`: this node passes on a peer's request).
    async fn write_routed(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        writes: Vec<Write>,
        forwarded: bool,
    ) -> KeyResults<()> {
        let mut batch = Batch::new(writes.len());
        let valid = batch.split(writes, |w| w.validate(ks));
        let items = valid.into_iter().map(|(i, w)| (i, key_hash(w.key()), w));
        let groups = group_by_owner(&self.membership.ring(), &self.membership.local().name, items);
        let calls = groups.into_iter().map(|(owner, items)| async move {
            let (positions, writes): (Vec<usize>, Vec<Write>) = items.into_iter().unzip();
            let outcome = match owner {
                None => self.write_owned(ks, writes).await,
                Some(owner) => self.write_remote(ks, &owner, writes, forwarded).await,
            };
            (positions, outcome)
        });
        for (positions, outcome) in futures::future::join_all(calls).await {
            batch.fill(positions, outcome);
        }
        batch.finish()
    }

    async fn write_remote(
        &self,
        ks: &KeyspaceRuntime,
        owner: &Member,
        writes: Vec<Write>,
        forwarded: bool,
    ) -> KeyResults<()> {
        let n = writes.len();
        let keys: Vec<Arc<str>> = writes.iter().map(|w| Arc::clone(w.key())).collect();
        let (puts, deletes): (Vec<_>, Vec<_>) = writes.into_iter().partition(|w| matches!(w, Write::Put(_)));
        let outcome = if deletes.is_empty() {
            let entries =
                puts.into_iter().filter_map(|w| if let Write::Put(e) = w { Some(e) } else { None }).collect();
            self.transport.store(owner, &ks.config.name, entries, forwarded).await
        } else {
            let keys = deletes.iter().map(|w| Arc::clone(w.key())).collect();
            self.transport.remove(owner, &ks.config.name, keys, forwarded).await
        };
        // Whatever the owner did, drop this node's own copies: the owner invalidates the members it knows, and
        // during a membership change it may not know this node yet.
        for key in &keys {
            ks.store.remove(key, key_hash(key));
            ks.peer_flight.forget(key);
        }
        match outcome {
            Ok(results) if results.len() == n => results,
            Ok(results) => {
                let message = format!("owner {} returned {} results for {n} keys", owner.name, results.len());
                vec![Err(EngineError::Internal(message)); n]
            }
            Err(e) => {
                self.metrics.peer_errors.inc();
                vec![Err(peer_unreachable(&e)); n]
            }
        }
    }

    /// Owner-side write: apply locally, then invalidate copies on every other member.
    async fn write_owned(&self, ks: &KeyspaceRuntime, writes: Vec<Write>) -> KeyResults<()> {
        let mut keys = Vec::with_capacity(writes.len());
        for w in writes {
            let hash = key_hash(w.key());
            match w {
                Write::Put(e) => {
                    let ttl = e.ttl.or(ks.config.ttl);
                    let entry = Entry::value(e.value, ttl).versioned(self.next_version());
                    ks.store.write(Tier::Main, &e.key, hash, &entry);
                    ks.source_flight.forget(&e.key);
                    keys.push(e.key);
                }
                Write::Delete(key) => {
                    ks.store.delete(&key, hash, self.next_version());
                    ks.source_flight.forget(&key);
                    keys.push(key);
                }
            }
        }
        let n = keys.len();
        match self.invalidate_everywhere(&ks.config.name, keys).await {
            Ok(()) => vec![Ok(()); n],
            Err(e) => vec![Err(e); n],
        }
    }

    /// Invalidates copies on every other member (each must acknowledge) and on recent copy holders outside the
    /// member list (best effort: such a node is joining, or gone; its copies expire within `HOT_MAX_TTL`, and one
    /// that does not answer is forgotten, so later writes do not wait for it).
    async fn invalidate_everywhere(&self, keyspace: &str, keys: Vec<Arc<str>>) -> Result<(), EngineError> {
        let ring = self.membership.ring();
        let local = &self.membership.local().name;
        let members: Vec<&Member> = ring.members().iter().filter(|m| &m.name != local).collect();
        // Alone, with no node having loaded from this one: nobody holds a copy (the common case of a single
        // node, and what every write there would otherwise pay for: a pass over the holders' map).
        if members.is_empty() && self.copy_holders.is_empty() {
            return Ok(());
        }
        self.copy_holders.retain(|_, (_, seen)| seen.elapsed() < HOT_MAX_TTL);
        let outsiders: Vec<Member> = self
            .copy_holders
            .iter()
            .filter(|e| e.key() != local && !members.iter().any(|m| &m.name == e.key()))
            .map(|e| Member::new(e.key().clone(), e.value().0.clone()))
            .collect();
        let required = members.iter().map(|m| self.transport.invalidate(m, keyspace, keys.clone()));
        let best_effort = outsiders.iter().map(|m| self.transport.invalidate(m, keyspace, keys.clone()));
        let (required, best_effort) = futures::future::join(
            futures::future::join_all(required),
            futures::future::join_all(best_effort),
        )
        .await;
        for (m, r) in outsiders.iter().zip(best_effort) {
            if let Err(e) = r {
                // Not asked again: its copies expire within HOT_MAX_TTL, and if it joins, whoever admits it tells
                // it to drop them. Without this, every write would wait for a frozen or cut-off node.
                self.copy_holders.remove(&m.name);
                tracing::debug!(error = %e, "could not invalidate copies on a node outside the member list; forgetting it");
            }
        }
        let failures: Vec<String> =
            required.into_iter().filter_map(|r| r.err().map(|e| e.to_string())).collect();
        if failures.is_empty() {
            return Ok(());
        }
        self.metrics.peer_errors.inc_by(failures.len() as u64);
        Err(EngineError::Unavailable(format!(
            "written on owner {local}, but copies on other nodes could not be invalidated: {}",
            failures.join("; ")
        )))
    }

    /// Drops copies of keys on the other members and recent copy holders, best effort (after a handoff changed
    /// entries here: copies of the older values must not outlive the change).
    pub(super) async fn invalidate_copies(&self, keyspace: &str, keys: Vec<Arc<str>>) {
        if let Err(e) = self.invalidate_everywhere(keyspace, keys).await {
            tracing::debug!(error = %e, "could not drop every copy of handed-off keys; they expire within 30 s");
        }
    }

    /// Owner-side store for a peer: keys this node owns in its view are applied here, the others forwarded
    /// once to their owner in this view; a forwarded request is applied here (see [`Engine::load_for_peer`]).
    pub async fn store_for_peer(
        self: &Arc<Self>,
        keyspace: &str,
        entries: Vec<WriteEntry>,
        forwarded: bool,
    ) -> Result<KeyResults<()>, EngineError> {
        let ks = self.keyspace(keyspace)?;
        validate_batch(entries.len())?;
        Ok(self.write_for_peer(&ks, entries.into_iter().map(Write::Put).collect(), forwarded).await)
    }

    /// Owner-side removal for a peer, routed as [`Engine::store_for_peer`].
    pub async fn remove_for_peer(
        self: &Arc<Self>,
        keyspace: &str,
        keys: &[String],
        forwarded: bool,
    ) -> Result<KeyResults<()>, EngineError> {
        let ks = self.keyspace(keyspace)?;
        validate_batch(keys.len())?;
        let writes = keys.iter().map(|k| Write::Delete(Arc::from(k.as_str()))).collect();
        Ok(self.write_for_peer(&ks, writes, forwarded).await)
    }

    async fn write_for_peer(
        self: &Arc<Self>,
        ks: &Arc<KeyspaceRuntime>,
        writes: Vec<Write>,
        forwarded: bool,
    ) -> KeyResults<()> {
        // A leaving node owns nothing: it passes even forwarded writes on.
        if !forwarded || self.is_leaving() {
            return self.write_routed(ks, writes, true).await;
        }
        let mut batch = Batch::new(writes.len());
        let (positions, valid): (Vec<usize>, Vec<Write>) =
            batch.split(writes, |w| w.validate(ks)).into_iter().unzip();
        let keys: Vec<Arc<str>> = valid.iter().map(|w| Arc::clone(w.key())).collect();
        let results = self.write_owned(ks, valid).await;
        // The sender's view names this node, but this node's view names another owner: the write goes there too
        // before it is acknowledged, so it is where readers look once the views agree.
        self.push_to_owners(ks, &keys).await;
        batch.fill(positions, results);
        batch.finish()
    }

    /// Drops copies of keys on this node (both tiers), sent by an owner after a write.
    pub fn invalidate(&self, keyspace: &str, keys: &[String]) -> Result<(), EngineError> {
        let ks = self.keyspace(keyspace)?;
        // A leaving node keeps its main tier until it exits: new owners ask it for keys whose push has not
        // arrived (their newer writes win anyway). Only its copies go.
        let leaving = self.is_leaving();
        for key in keys {
            if leaving {
                ks.store.drop_copy(key, key_hash(key));
            } else {
                ks.store.remove(key, key_hash(key));
            }
            ks.peer_flight.forget(key);
            ks.source_flight.forget(key);
        }
        Ok(())
    }
}
