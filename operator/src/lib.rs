//! The DistCache operator: turns `DistCache` resources into the Kubernetes objects that run a cache cluster
//! (StatefulSet, Services, keyspaces ConfigMap, RBAC for the nodes, PodDisruptionBudget) and reports their state.
//!
//! The controller ([`controller`]) reconciles each DistCache as validate → build → apply → status. It depends on
//! `distcache-api` for the resource types, never on the node crate: the CRD's `keyspaces[]` and the node's
//! keyspaces file are the same type.

pub mod capabilities;
pub mod controller;
pub mod metrics;

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "distcache-operator";

/// Label keys and values on every owned object.
pub mod labels {
    /// `app.kubernetes.io/name`.
    pub const NAME: &str = "app.kubernetes.io/name";
    /// Value of [`NAME`].
    pub const NAME_VALUE: &str = "distcache";
    /// `app.kubernetes.io/instance`: the DistCache's name.
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    /// `app.kubernetes.io/managed-by`.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Value of [`MANAGED_BY`].
    pub const MANAGER: &str = "distcache-operator";
}

/// The DistCache CustomResourceDefinition as YAML. `cel_rules: false` leaves out the CEL validation rules
/// (`x-kubernetes-validations`) for API servers before Kubernetes 1.25, whose clients (kubectl, Helm) reject the
/// unknown field; the operator checks the same rules itself.
pub fn crd_yaml(cel_rules: bool) -> Result<String, CrdError> {
    use kube::CustomResourceExt;
    let mut value = serde_json::to_value(distcache_api::DistCache::crd()).map_err(CrdError::Json)?;
    if !cel_rules {
        strip_key(&mut value, "x-kubernetes-validations");
    }
    serde_yaml::to_string(&value).map_err(CrdError::Yaml)
}

/// Rendering the CRD failed (a bug in the types, never an input problem).
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The CRD did not convert to JSON.
    #[error("failed to convert the CRD to JSON")]
    Json(#[source] serde_json::Error),
    /// The CRD did not convert to YAML.
    #[error("failed to write the CRD as YAML")]
    Yaml(#[source] serde_yaml::Error),
}

fn strip_key(value: &mut serde_json::Value, key: &str) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove(key);
            map.values_mut().for_each(|v| strip_key(v, key));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| strip_key(v, key)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn crd_with_and_without_cel_rules() {
        let full = super::crd_yaml(true).expect("renders");
        let bare = super::crd_yaml(false).expect("renders");
        assert!(full.contains("x-kubernetes-validations") && full.contains("url requires sha256"));
        assert!(!bare.contains("x-kubernetes-validations"));
        assert!(bare.contains("shortNames") && bare.contains("specReplicasPath"));
    }
}
