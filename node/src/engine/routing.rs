//! Who answers a key: the owner on this node's ring, and what changes when the ring does.

use std::sync::Arc;

use super::Engine;
use crate::ring::{Member, Ring};

/// Batch items of one owner (`None` = this node), each with its position in the batch.
pub(super) type OwnerGroup<T> = (Option<Member>, Vec<(usize, T)>);

/// Groups batch items by owner (`None` = this node), keeping each item's position; groups appear in the order
/// of their first item, items in request order.
pub(super) fn group_by_owner<T>(
    ring: &Ring,
    local: &str,
    items: impl IntoIterator<Item = (usize, u64, T)>,
) -> Vec<OwnerGroup<T>> {
    let mut groups: Vec<OwnerGroup<T>> = Vec::new();
    for (i, hash, item) in items {
        let owner = ring.owner(hash).filter(|m| m.name != local);
        let name = owner.map(|m| m.name.as_str());
        match groups.iter_mut().find(|(o, _)| o.as_ref().map(|m| m.name.as_str()) == name) {
            Some((_, members)) => members.push((i, item)),
            None => groups.push((owner.cloned(), vec![(i, item)])),
        }
    }
    groups
}

impl Engine {
    /// The owner of a key hash, or `None` when it is this node.
    ///
    /// Returns the ring and the owner's index rather than a `Member`: a hot-tier hit must not pay for cloning
    /// the owner's name and address.
    pub(super) fn remote_owner(&self, hash: u64) -> Option<(Arc<Ring>, usize)> {
        let ring = self.membership.ring();
        let i = ring.owner_index(hash)?;
        (ring.members()[i].name != self.membership.local().name).then_some((ring, i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::key_hash;

    #[test]
    fn groups_keep_positions_and_name_remote_owners_only() {
        let ring = Ring::new(vec![Member::new("a", "1"), Member::new("b", "2"), Member::new("c", "3")]);
        let items: Vec<(usize, u64, usize)> = (0..200).map(|i| (i, key_hash(&format!("k{i}")), i)).collect();
        let groups = group_by_owner(&ring, "a", items.clone());
        assert_eq!(groups.len(), 3, "three owners for 200 keys");
        assert!(groups.iter().all(|(o, _)| o.as_ref().is_none_or(|m| m.name != "a")), "local is None");
        let mut seen: Vec<usize> = groups.iter().flat_map(|(_, v)| v.iter().map(|(i, _)| *i)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..200).collect::<Vec<_>>(), "every item in exactly one group");
        for (owner, members) in &groups {
            for (i, item) in members {
                assert_eq!(i, item);
                let expected = ring.owner(items[*i].1).map(|m| m.name.clone());
                let got = owner.as_ref().map_or_else(|| "a".to_owned(), |m| m.name.clone());
                assert_eq!(expected, Some(got));
            }
        }
    }
}
