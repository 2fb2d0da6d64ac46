//! Applies the built objects with server-side apply (field manager `distcache-operator`, forced: the operator
//! owns the fields it sets), in dependency order, and reports the first failure with the object it concerns.

use std::fmt::Debug;

use k8s_openapi::{
    NamespaceResourceScope,
    api::{apps::v1::StatefulSet, policy::v1::PodDisruptionBudget},
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};

use super::{Error, build::Objects};
use crate::{FIELD_MANAGER, capabilities::PdbApi};

/// What the API server returned for the objects whose state the status reports.
#[derive(Clone, Debug)]
pub struct Applied {
    /// The StatefulSet as stored (with its status).
    pub stateful_set: StatefulSet,
    /// How the PodDisruptionBudget was handled.
    pub pod_disruption_budget: PdbOutcome,
}

/// The PodDisruptionBudget's fate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PdbOutcome {
    /// Applied with this API version.
    Applied(&'static str),
    /// Disabled in the spec (and removed if it existed).
    Disabled,
    /// The server serves no PodDisruptionBudget API.
    Unsupported,
}

async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object))
        .await
        .map_err(|source| Error::Apply { kind: K::kind(&()).into_owned(), name, source })
}

fn pdb_resource(api_version: &str) -> ApiResource {
    let version = api_version.trim_start_matches("policy/");
    ApiResource {
        group: "policy".to_owned(),
        version: version.to_owned(),
        api_version: api_version.to_owned(),
        kind: "PodDisruptionBudget".to_owned(),
        plural: "poddisruptionbudgets".to_owned(),
    }
}

/// Applies every object; the PodDisruptionBudget in the version the server serves.
pub async fn apply_all(
    client: &Client,
    namespace: &str,
    objects: &Objects,
    pdb_api: PdbApi,
) -> Result<Applied, Error> {
    apply(client, namespace, &objects.service_account).await?;
    apply(client, namespace, &objects.role).await?;
    apply(client, namespace, &objects.role_binding).await?;
    // The keyspaces file before the StatefulSet: new pods start with the current keyspaces.
    apply(client, namespace, &objects.config_map).await?;
    apply(client, namespace, &objects.peers_service).await?;
    apply(client, namespace, &objects.client_service).await?;
    let stateful_set = apply(client, namespace, &objects.stateful_set).await?;
    let pod_disruption_budget = match (&objects.pod_disruption_budget, pdb_api.api_version()) {
        (_, None) => PdbOutcome::Unsupported,
        (Some(pdb), Some(api_version)) => {
            apply_pdb(client, namespace, pdb, api_version).await?;
            PdbOutcome::Applied(api_version)
        }
        (None, Some(api_version)) => {
            let name = objects.stateful_set.metadata.name.clone().unwrap_or_default();
            delete_pdb(client, namespace, &name, api_version).await?;
            PdbOutcome::Disabled
        }
    };
    Ok(Applied { stateful_set, pod_disruption_budget })
}

async fn apply_pdb(
    client: &Client,
    namespace: &str,
    pdb: &PodDisruptionBudget,
    api_version: &str,
) -> Result<(), Error> {
    let name = pdb.metadata.name.clone().unwrap_or_default();
    let failed = |source| Error::Apply { kind: "PodDisruptionBudget".to_owned(), name: name.clone(), source };
    if api_version == "policy/v1" {
        apply(client, namespace, pdb).await?;
        return Ok(());
    }
    // policy/v1beta1 has the same fields as v1 for what the operator sets (selector, min/maxUnavailable).
    let mut value = serde_json::to_value(pdb).map_err(|e| failed(kube::Error::SerdeError(e)))?;
    value["apiVersion"] = api_version.into();
    let object: DynamicObject =
        serde_json::from_value(value).map_err(|e| failed(kube::Error::SerdeError(e)))?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &pdb_resource(api_version));
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object))
        .await
        .map_err(failed)?;
    Ok(())
}

async fn delete_pdb(client: &Client, namespace: &str, name: &str, api_version: &str) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &pdb_resource(api_version));
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => {
            Err(Error::Delete { kind: "PodDisruptionBudget".to_owned(), name: name.to_owned(), source })
        }
    }
}
