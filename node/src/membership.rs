//! Live membership: the ring in use, and the stream of join/leave/update events behind `WatchMembers`.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use arc_swap::ArcSwap;
use tokio::sync::broadcast;

use crate::ring::{Member, Ring};

/// Kind of a membership change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// A member joined.
    Join,
    /// A member left.
    Leave,
    /// A member's address changed.
    Update,
}

/// One membership change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberChange {
    /// What happened.
    pub kind: ChangeKind,
    /// The member it happened to.
    pub member: Member,
}

/// The node's view of the cluster.
pub struct Membership {
    local: Member,
    ring: ArcSwap<Ring>,
    known: AtomicBool,
    /// Set when the node leaves: from then on its ring excludes it, so it owns nothing.
    leaving: AtomicBool,
    events: broadcast::Sender<MemberChange>,
}

impl Membership {
    /// A membership with only the local node, not yet known (discovery has not reported).
    pub fn new(local: Member) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            ring: ArcSwap::from_pointee(Ring::new(vec![local.clone()])),
            local,
            known: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            events,
        }
    }

    /// This node.
    pub fn local(&self) -> &Member {
        &self.local
    }

    /// The ring in use (lock-free).
    #[inline]
    pub fn ring(&self) -> Arc<Ring> {
        self.ring.load_full()
    }

    /// True once discovery reported the membership at least once.
    pub fn is_known(&self) -> bool {
        self.known.load(Ordering::Acquire)
    }

    /// Marks this node as leaving: the next [`Membership::update`] builds a ring without it.
    pub fn set_leaving(&self) {
        self.leaving.store(true, Ordering::Release);
    }

    /// True once the node is leaving.
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// Subscribes to future changes.
    pub fn subscribe(&self) -> broadcast::Receiver<MemberChange> {
        self.events.subscribe()
    }

    /// Replaces the set of other members; returns the changes (empty when nothing changed). The local node is
    /// a member unless it is leaving; an entry with the local name is ignored.
    pub fn update(&self, others: &[Member]) -> Vec<MemberChange> {
        let old: BTreeMap<String, Member> =
            self.ring.load().members().iter().map(|m| (m.name.clone(), m.clone())).collect();
        let mut new: BTreeMap<String, Member> = BTreeMap::new();
        if !self.is_leaving() {
            new.insert(self.local.name.clone(), self.local.clone());
        }
        for m in others {
            if m.name != self.local.name {
                new.insert(m.name.clone(), m.clone());
            }
        }
        let mut changes = Vec::new();
        for (name, m) in &new {
            match old.get(name) {
                None => changes.push(MemberChange { kind: ChangeKind::Join, member: m.clone() }),
                Some(o) if o.address != m.address => {
                    changes.push(MemberChange { kind: ChangeKind::Update, member: m.clone() });
                }
                Some(_) => {}
            }
        }
        for (name, m) in &old {
            if !new.contains_key(name) {
                changes.push(MemberChange { kind: ChangeKind::Leave, member: m.clone() });
            }
        }
        if !changes.is_empty() {
            self.ring.store(Arc::new(Ring::new(new.into_values().collect())));
            for c in &changes {
                // No receiver is not an error: nobody watches right now.
                let _ = self.events.send(c.clone());
            }
        }
        self.known.store(true, Ordering::Release);
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_joins_leaves_and_updates() {
        let m = Membership::new(Member::new("a", "127.0.0.1:1"));
        assert!(!m.is_known());
        let c = m.update(&[Member::new("b", "127.0.0.1:2"), Member::new("a", "x")]);
        assert_eq!(c, vec![MemberChange { kind: ChangeKind::Join, member: Member::new("b", "127.0.0.1:2") }]);
        assert!(m.is_known());
        assert_eq!(m.ring().len(), 2);
        let c = m.update(&[Member::new("b", "127.0.0.1:3"), Member::new("c", "127.0.0.1:4")]);
        assert_eq!(c.len(), 2);
        let c = m.update(&[]);
        assert_eq!(c.iter().filter(|c| c.kind == ChangeKind::Leave).count(), 2);
        assert_eq!(m.ring().len(), 1);
    }
}
