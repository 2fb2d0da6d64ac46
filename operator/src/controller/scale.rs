//! Scale-in one node at a time. The StatefulSet manages its pods in parallel (new nodes start together and form one
//! ring before any of them is Ready), so lowering its replicas would stop every surplus pod at once, and a
//! PodDisruptionBudget does not limit a StatefulSet's own scale-down. A stopping node hands its entries to the
//! nodes that own them next; several stopping at once would hand them to each other, or to nobody. So when
//! `spec.replicas` is below the StatefulSet's replicas, the operator lowers the StatefulSet by one, waits until
//! that pod is gone (its node has handed off and exited), and only then lowers it by the next one. Scale-out is
//! all at once.
//!
//! [`step`] decides from the StatefulSet's current replicas and the names of the pods that exist (terminating ones
//! included); it is pure. [`observe`] reads both from the API server.

use k8s_openapi::api::{apps::v1::StatefulSet, core::v1::Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, ObjectMeta},
};

use super::{Error, build::selector_string, validate::ValidSpec};

/// What the StatefulSet's replicas are to be now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// `spec.replicas` of the StatefulSet to apply.
    pub replicas: i32,
    /// The scale-in under way, if any.
    pub scale_in: Option<ScaleIn>,
}

/// A scale-in under way: one pod at a time from `from` to `to` on the way to `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleIn {
    /// The StatefulSet's replicas before this step.
    pub from: i32,
    /// Its replicas in this step.
    pub to: i32,
    /// `spec.replicas` of the DistCache.
    pub target: i32,
    /// The pods this step removes that still exist (terminating: handing their entries off), by name.
    pub waiting_for: Vec<String>,
    /// Whether this reconcile lowers the StatefulSet (the step starts now) rather than waits for the pods of a
    /// step under way.
    pub starts: bool,
}

impl ScaleIn {
    /// `scaling in: 4 → 3 of target 2`.
    pub fn summary(&self) -> String {
        format!("scaling in: {} → {} of target {}", self.from, self.to, self.target)
    }

    /// For the Progressing condition: `scaling in: 4 → 3 of target 2 (waiting for demo-3 to hand off its entries
    /// and stop)`.
    pub fn message(&self) -> String {
        if self.waiting_for.is_empty() {
            return self.summary();
        }
        format!(
            "{} (waiting for {} to hand off its entries and stop)",
            self.summary(),
            self.waiting_for.join(", ")
        )
    }
}

/// The ordinal of a pod of StatefulSet `set` (`<set>-<ordinal>`).
fn ordinal(set: &str, pod: &str) -> Option<i32> {
    let digits = pod.strip_prefix(set)?.strip_prefix('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The StatefulSet's replicas for `target` (the DistCache's `spec.replicas`), given its `current` replicas (`None`:
/// there is no StatefulSet yet) and the names of the pods of StatefulSet `set` that exist, terminating ones
/// included.
pub fn step(set: &str, target: i32, current: Option<i32>, pods: &[String]) -> Step {
    let Some(current) = current else { return Step { replicas: target, scale_in: None } };
    if target > current {
        return Step { replicas: target, scale_in: None };
    }
    // Pods beyond the StatefulSet's replicas: the ones the last step removes, still stopping.
    let mut beyond: Vec<(i32, String)> = pods
        .iter()
        .filter_map(|p| ordinal(set, p).filter(|o| *o >= current).map(|o| (o, p.clone())))
        .collect();
    beyond.sort();
    if let Some((highest, _)) = beyond.last() {
        let scale_in = ScaleIn {
            from: highest.saturating_add(1),
            to: current,
            target,
            waiting_for: beyond.into_iter().map(|(_, p)| p).collect(),
            starts: false,
        };
        return Step { replicas: current, scale_in: Some(scale_in) };
    }
    if target == current {
        return Step { replicas: target, scale_in: None };
    }
    let to = current - 1;
    let waiting_for = pods.iter().filter(|p| ordinal(set, p).is_some_and(|o| o >= to)).cloned().collect();
    Step { replicas: to, scale_in: Some(ScaleIn { from: current, to, target, waiting_for, starts: true }) }
}

/// Whether an object is controlled by the DistCache with `uid`.
fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .as_ref()
        .is_some_and(|refs| refs.iter().any(|r| r.uid == uid && r.controller == Some(true)))
}

/// Reads the DistCache's StatefulSet (its replicas, when this DistCache controls it: `None` otherwise, or without
/// one) and the names of its pods, and decides the step.
pub async fn observe(client: &Client, valid: &ValidSpec) -> Result<Step, Error> {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &valid.namespace);
    let set = sets.get_opt(&valid.name).await.map_err(|source| Error::Read {
        kind: "StatefulSet".to_owned(),
        name: valid.name.clone(),
        source,
    })?;
    let current = set
        .filter(|s| controlled_by(&s.metadata, &valid.owner.uid))
        .map(|s| s.spec.and_then(|spec| spec.replicas).unwrap_or(1));
    if current.is_none_or(|c| valid.replicas > c) {
        return Ok(step(&valid.name, valid.replicas, current, &[]));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &valid.namespace);
    let list = pods
        .list_metadata(&ListParams::default().labels(&selector_string(&valid.name)))
        .await
        .map_err(|source| Error::Pods { name: valid.name.clone(), source })?;
    let names: Vec<String> = list.items.iter().map(ResourceExt::name_any).collect();
    Ok(step(&valid.name, valid.replicas, current, &names))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    /// A step's replicas and its scale-in.
    fn stepping(replicas: i32, from: i32, target: i32, waiting: &[&str], starts: bool) -> Step {
        let scale_in = ScaleIn { from, to: replicas, target, waiting_for: pods(waiting), starts };
        Step { replicas, scale_in: Some(scale_in) }
    }

    #[test]
    fn a_new_statefulset_and_scale_out_take_every_replica_at_once() {
        assert_eq!(step("demo", 5, None, &[]), Step { replicas: 5, scale_in: None });
        let all = pods(&["demo-0", "demo-1"]);
        assert_eq!(step("demo", 5, Some(2), &all), Step { replicas: 5, scale_in: None });
        assert_eq!(step("demo", 2, Some(2), &all), Step { replicas: 2, scale_in: None }, "settled");
    }

    #[test]
    fn scale_in_lowers_by_one_and_waits_until_that_pod_is_gone() {
        let five = pods(&["demo-0", "demo-1", "demo-2", "demo-3", "demo-4"]);
        // 5 → 2: the first step stops demo-4.
        let first = step("demo", 2, Some(5), &five);
        assert_eq!(first, stepping(4, 5, 2, &["demo-4"], true));
        assert_eq!(
            first.scale_in.as_ref().map(ScaleIn::message).as_deref(),
            Some("scaling in: 5 → 4 of target 2 (waiting for demo-4 to hand off its entries and stop)")
        );
        // The StatefulSet is at 4; demo-4 still exists (not yet deleted, or terminating): hold at 4.
        assert_eq!(step("demo", 2, Some(4), &five), stepping(4, 5, 2, &["demo-4"], false));
        // demo-4 is gone: the next step stops demo-3.
        let four = pods(&["demo-0", "demo-1", "demo-2", "demo-3"]);
        assert_eq!(step("demo", 2, Some(4), &four), stepping(3, 4, 2, &["demo-3"], true));
        // The last step: at the target, but demo-2 is still stopping.
        let three = pods(&["demo-0", "demo-1", "demo-2"]);
        assert_eq!(step("demo", 2, Some(3), &three), stepping(2, 3, 2, &["demo-2"], true));
        assert_eq!(step("demo", 2, Some(2), &three), stepping(2, 3, 2, &["demo-2"], false));
        assert_eq!(
            step("demo", 2, Some(2), &pods(&["demo-0", "demo-1"])),
            Step { replicas: 2, scale_in: None }
        );
    }

    #[test]
    fn a_step_whose_pod_is_not_there_goes_on_and_scale_out_interrupts_a_scale_in() {
        // demo-3 never existed (it was pending and deleted, say): nothing to wait for in that step.
        let step_3 = step("demo", 1, Some(4), &pods(&["demo-0", "demo-1", "demo-2"]));
        assert_eq!(step_3, stepping(3, 4, 1, &[], true));
        assert_eq!(step_3.scale_in.map(|s| s.message()).as_deref(), Some("scaling in: 4 → 3 of target 1"));
        // Scaled out again while demo-4 stops: all at once (the StatefulSet recreates demo-4 once it is gone).
        let stopping = pods(&["demo-0", "demo-1", "demo-2", "demo-3", "demo-4"]);
        assert_eq!(step("demo", 6, Some(4), &stopping), Step { replicas: 6, scale_in: None });
        // To zero, one at a time too.
        assert_eq!(step("demo", 0, Some(1), &pods(&["demo-0"])), stepping(0, 1, 0, &["demo-0"], true));
    }

    #[test]
    fn only_this_statefulsets_pods_count() {
        assert_eq!(ordinal("demo", "demo-12"), Some(12));
        for other in ["demo-", "demo-x", "demo-1a", "demo2-1", "demo-peers-1", "other-3", "demo"] {
            assert_eq!(ordinal("demo", other), None, "{other}");
        }
        // A pod of StatefulSet demo-2 (another DistCache whose name starts the same) is not demo's.
        let mixed = pods(&["demo-0", "demo-1", "demo-2-4"]);
        assert_eq!(step("demo", 1, Some(2), &mixed), stepping(1, 2, 1, &["demo-1"], true));
    }
}
