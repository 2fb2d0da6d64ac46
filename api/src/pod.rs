//! When a node pod counts as a member of its cache: one rule for the node's Kubernetes discovery, the operator's
//! status and the tests, so "Ready nodes" means the same everywhere.

use k8s_openapi::api::core::v1::Pod;

/// Whether a node pod serves: its `Ready` condition is `True` and it is not being deleted (a terminating pod has
/// left the ring even while it drains).
pub fn pod_is_serving(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
