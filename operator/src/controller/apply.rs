//! Applies the built objects with server-side apply (field manager `distcache-operator`, forced: the operator
//! owns the fields it sets), in dependency order, and reports the first failure with the object it concerns.
//! An object of a needed name that the DistCache does not control is never taken over.

use std::fmt::Debug;

use k8s_openapi::{
    NamespaceResourceScope,
    api::{apps::v1::StatefulSet, networking::v1::NetworkPolicy, policy::v1::PodDisruptionBudget},
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, Preconditions},
};
use serde::{Serialize, de::DeserializeOwned};

use super::{
    Error,
    build::{Objects, certificate_resource},
};
use crate::{FIELD_MANAGER, capabilities::PdbApi};

/// What the API server returned for the objects whose state the status reports.
#[derive(Clone, Debug)]
pub struct Applied {
    /// The StatefulSet as stored (with its status).
    pub stateful_set: StatefulSet,
    /// How the PodDisruptionBudget was handled.
    pub pod_disruption_budget: PdbOutcome,
    /// How the cert-manager Certificate was handled.
    pub certificate: CertificateOutcome,
}

/// The cert-manager Certificate's fate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateOutcome {
    /// Not wanted (no `spec.tls.certManager`); one this DistCache had created is removed.
    NotWanted,
    /// Applied.
    Applied,
    /// Wanted, but the server serves no cert-manager.io/v1 Certificate API (cert-manager is not installed).
    CertManagerMissing,
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

/// Applies every object; the PodDisruptionBudget in the version the server serves, the cert-manager Certificate
/// when cert-manager is installed (`cert_manager`). `uid` is the DistCache's.
pub async fn apply_all(
    client: &Client,
    namespace: &str,
    uid: &str,
    objects: &Objects,
    pdb_api: PdbApi,
    cert_manager: bool,
) -> Result<Applied, Error> {
    let name = objects.stateful_set.metadata.name.clone().unwrap_or_default();
    // Before the pods: the NetworkPolicy that guards their peer port, the Certificate whose Secret they mount
    // (without cert-manager, the pods wait for that Secret and the status says why).
    let network_policies = ApiResource::erase::<NetworkPolicy>(&());
    match &objects.network_policy {
        Some(policy) => {
            apply(client, namespace, uid, policy).await?;
        }
        None => delete_owned(client, namespace, uid, &network_policies, &name).await?,
    }
    let certificate_name = format!("{name}-tls");
    let certificate = match (&objects.certificate, cert_manager) {
        (Some(certificate), true) => {
            apply_dynamic(client, namespace, uid, &certificate_resource(), certificate).await?;
            CertificateOutcome::Applied
        }
        (Some(_), false) => CertificateOutcome::CertManagerMissing,
        (None, true) => {
            delete_owned(client, namespace, uid, &certificate_resource(), &certificate_name).await?;
            CertificateOutcome::NotWanted
        }
        (None, false) => CertificateOutcome::NotWanted,
    };
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
            delete_owned(client, namespace, uid, &pdb_resource(api_version), &name).await?;
            PdbOutcome::Disabled
        }
    };
    Ok(Applied { stateful_set, pod_disruption_budget, certificate })
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
    apply_dynamic(client, namespace, uid, &pdb_resource(api_version), &object).await
}

/// Applies an object of a resource known only at run time (a PodDisruptionBudget of an older API version, a
/// cert-manager Certificate), never taking over one the DistCache does not control.
async fn apply_dynamic(
    client: &Client,
    namespace: &str,
    uid: &str,
    resource: &ApiResource,
    object: &DynamicObject,
) -> Result<(), Error> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let failed = |source| Error::Apply { kind: resource.kind.clone(), name: name.clone(), source };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, resource);
    if let Some(existing) = api.get_opt(&name).await.map_err(failed)?
        && !controlled_by(&existing.metadata, uid)
    {
        return Err(Error::NameConflict { kind: resource.kind.clone(), name });
    }
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object))
        .await
        .map_err(failed)?;
    Ok(())
}

/// Deletes an object this DistCache created and no longer wants (a disabled PodDisruptionBudget or
/// NetworkPolicy, the Certificate of a DistCache that left cert-manager), if there is one — never a user's own
/// of that name (the usual reason to disable ours is to bring one's own).
async fn delete_owned(
    client: &Client,
    namespace: &str,
    uid: &str,
    resource: &ApiResource,
    name: &str,
) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, resource);
    let failed = |source| Error::Delete { kind: resource.kind.clone(), name: name.to_owned(), source };
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
