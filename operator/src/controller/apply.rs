//! Applies the built objects with server-side apply (field manager `distcache-operator`, forced: the operator
//! owns the fields it sets), in dependency order, and reports the first failure with the object it concerns.
//! An object of a needed name that the DistCache does not control is never taken over.

use std::fmt::Debug;

use k8s_openapi::{
    NamespaceResourceScope,
    api::{apps::v1::StatefulSet, policy::v1::PodDisruptionBudget},
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, Preconditions},
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
    /// Disabled in the spec (and removed if this DistCache had created it).
    Disabled,
    /// Enabled, but the server serves no PodDisruptionBudget API.
    Unsupported,
}

/// Whether an object is controlled by the DistCache with `uid`.
fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .as_ref()
        .is_some_and(|refs| refs.iter().any(|r| r.uid == uid && r.controller == Some(true)))
}

/// Applies one object. An object of that name that this DistCache does not control (a user's own Service or
/// ConfigMap) is left alone: a forced apply would rewrite it, and the garbage collector would delete it with the
/// DistCache.
async fn apply<K>(client: &Client, namespace: &str, uid: &str, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    let kind = || K::kind(&()).into_owned();
    let failed = |source| Error::Apply { kind: kind(), name: name.clone(), source };
    if let Some(existing) = api.get_opt(&name).await.map_err(failed)?
        && !controlled_by(existing.meta(), uid)
    {
        return Err(Error::NameConflict { kind: kind(), name });
    }
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object)).await.map_err(failed)
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

/// Applies every object; the PodDisruptionBudget in the version the server serves. `uid` is the DistCache's.
pub async fn apply_all(
    client: &Client,
    namespace: &str,
    uid: &str,
    objects: &Objects,
    pdb_api: PdbApi,
) -> Result<Applied, Error> {
    apply(client, namespace, uid, &objects.service_account).await?;
    apply(client, namespace, uid, &objects.role).await?;
    apply(client, namespace, uid, &objects.role_binding).await?;
    // The keyspaces file before the StatefulSet: new pods start with the current keyspaces.
    apply(client, namespace, uid, &objects.config_map).await?;
    apply(client, namespace, uid, &objects.peers_service).await?;
    apply(client, namespace, uid, &objects.client_service).await?;
    let stateful_set = apply(client, namespace, uid, &objects.stateful_set).await?;
    let pod_disruption_budget = match (&objects.pod_disruption_budget, pdb_api.api_version()) {
        (None, None) => PdbOutcome::Disabled,
        (Some(_), None) => PdbOutcome::Unsupported,
        (Some(pdb), Some(api_version)) => {
            apply_pdb(client, namespace, uid, pdb, api_version).await?;
            PdbOutcome::Applied(api_version)
        }
        (None, Some(api_version)) => {
            let name = objects.stateful_set.metadata.name.clone().unwrap_or_default();
            delete_pdb(client, namespace, uid, &name, api_version).await?;
            PdbOutcome::Disabled
        }
    };
    Ok(Applied { stateful_set, pod_disruption_budget })
}

async fn apply_pdb(
    client: &Client,
    namespace: &str,
    uid: &str,
    pdb: &PodDisruptionBudget,
    api_version: &str,
) -> Result<(), Error> {
    if api_version == "policy/v1" {
        apply(client, namespace, uid, pdb).await?;
        return Ok(());
    }
    // policy/v1beta1 has the same fields as v1 for what the operator sets (selector, min/maxUnavailable).
    let name = pdb.metadata.name.clone().unwrap_or_default();
    let failed = |source| Error::Apply { kind: "PodDisruptionBudget".to_owned(), name: name.clone(), source };
    let mut value = serde_json::to_value(pdb).map_err(|e| failed(kube::Error::SerdeError(e)))?;
    value["apiVersion"] = api_version.into();
    let object: DynamicObject =
        serde_json::from_value(value).map_err(|e| failed(kube::Error::SerdeError(e)))?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &pdb_resource(api_version));
    if let Some(existing) = api.get_opt(&name).await.map_err(failed)?
        && !controlled_by(&existing.metadata, uid)
    {
        return Err(Error::NameConflict { kind: "PodDisruptionBudget".to_owned(), name });
    }
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object))
        .await
        .map_err(failed)?;
    Ok(())
}

/// Deletes the PodDisruptionBudget this DistCache created, if there is one — never a user's own of that name
/// (the usual reason to disable ours is to bring one's own).
async fn delete_pdb(
    client: &Client,
    namespace: &str,
    uid: &str,
    name: &str,
    api_version: &str,
) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &pdb_resource(api_version));
    let failed =
        |source| Error::Delete { kind: "PodDisruptionBudget".to_owned(), name: name.to_owned(), source };
    let Some(existing) = api.get_opt(name).await.map_err(failed)? else { return Ok(()) };
    if !controlled_by(&existing.metadata, uid) {
        return Ok(());
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions { uid: existing.metadata.uid.clone(), resource_version: None }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(failed(source)),
    }
}
