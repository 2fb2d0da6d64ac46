//! Kubernetes discovery: the members are the Ready pods of a label selector in one namespace, watched through the
//! API server (kube-runtime's watcher: list, then watch; a re-list after watch expiry or an API-server restart).
//!
//! A pod is a member while it is Ready, not being deleted, has a podIP, and has the named container port; its
//! member name is the pod name (the node's `name`, set from `metadata.name` by the operator) and its address
//! `podIP:port`. A pod that loses readiness leaves the ring; a pod that is deleted leaves as soon as its deletion
//! starts (before its process stops), so traffic moves before the node goes away.
//!
//! Settling: the first member set is reported after the first complete list, so nodes started together agree
//! from the start. A re-list replaces the state only when it completes (`InitDone`): an API-server restart never
//! flaps membership to empty. Errors (API server unreachable, 403 from a missing Role) are reported through
//! `DiscoveryStatus` while the last known members keep serving, and retried with backoff.
//!
//! RBAC: only `get`, `list` and `watch` on `pods` in the node's own namespace (a Role, not a ClusterRole):
//!
//! ```yaml
//! rules:
//!   - apiGroups: [""]
//!     resources: ["pods"]
//!     verbs: ["get", "list", "watch"]
//! ```

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};

use super::{Discovery, DiscoveryContext};
use crate::ring::Member;

/// Kubernetes discovery settings.
#[derive(Clone, Debug)]
pub struct KubernetesSettings {
    /// Namespace; default: the namespace of the node's credentials.
    pub namespace: Option<String>,
    /// Label selector of the cluster's pods.
    pub label_selector: String,
    /// Named container port peers dial.
    pub port_name: String,
}

/// Kubernetes discovery.
pub struct Kubernetes {
    settings: KubernetesSettings,
}

impl Kubernetes {
    /// A backend with these settings (credentials: `KUBECONFIG`, else the pod's service account).
    pub fn new(settings: KubernetesSettings) -> Self {
        Self { settings }
    }
}

/// The member a pod stands for, if it is one.
pub fn member_of(pod: &Pod, port_name: &str) -> Option<Member> {
    if !distcache_api::pod_is_serving(pod) {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    let port = pod.spec.as_ref()?.containers.iter().find_map(|c| {
        c.ports.as_ref()?.iter().find(|p| p.name.as_deref() == Some(port_name)).map(|p| p.container_port)
    })?;
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
    Some(Member::new(pod.metadata.name.clone()?, format!("{host}:{port}")))
}

async fn client() -> Result<Client, String> {
    Client::try_default()
        .await
        .map_err(|e| format!("cannot build a Kubernetes client (KUBECONFIG or in-cluster): {e}"))
}

#[async_trait]
impl Discovery for Kubernetes {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn run(self: Box<Self>, ctx: DiscoveryContext) {
        let settings = self.settings;
        let client = loop {
            match client().await {
                Ok(c) => break c,
                Err(e) => {
                    ctx.status.problem(e);
                    tokio::select! {
                        () = ctx.shutdown.cancelled() => return,
                        () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                    }
                }
            }
        };
        let namespace = settings.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
        tracing::info!(namespace = %namespace, selector = %settings.label_selector, port = %settings.port_name, "watching pods");
        let api: Api<Pod> = Api::namespaced(client, &namespace);
        let config = watcher::Config::default().labels(&settings.label_selector);
        let mut events = watcher(api, config).default_backoff().boxed();
        // Pods by UID; `listing` collects a (re-)list until it is complete.
        let mut pods: HashMap<String, Pod> = HashMap::new();
        let mut listing: Option<HashMap<String, Pod>> = None;
        let mut known = false;
        let mut last: Option<Vec<Member>> = None;
        loop {
            let event = tokio::select! {
                () = ctx.shutdown.cancelled() => return,
                event = events.next() => event,
            };
            let Some(event) = event else {
                ctx.status.problem("the pod watch ended");
                return;
            };
            let uid = |p: &Pod| p.metadata.uid.clone().unwrap_or_default();
            match event {
                Err(e) => {
                    ctx.status
                        .problem(format!("watching pods in {namespace} ({}): {e}", settings.label_selector));
                    continue;
                }
                Ok(watcher::Event::Init) => listing = Some(HashMap::new()),
                Ok(watcher::Event::InitApply(pod)) => {
                    listing.get_or_insert_with(HashMap::new).insert(uid(&pod), pod);
                }
                Ok(watcher::Event::InitDone) => {
                    pods = listing.take().unwrap_or_default();
                    known = true;
                }
                Ok(watcher::Event::Apply(pod)) => {
                    pods.insert(uid(&pod), pod);
                }
                Ok(watcher::Event::Delete(pod)) => {
                    pods.remove(&uid(&pod));
                }
            }
            ctx.status.healthy();
            if !known {
                continue;
            }
            let members: BTreeMap<String, Member> = pods
                .values()
                .filter_map(|p| member_of(p, &settings.port_name))
                .filter(|m| m.name != ctx.local.name)
                .map(|m| (m.name.clone(), m))
                .collect();
            let members: Vec<Member> = members.into_values().collect();
            if last.as_ref() != Some(&members) {
                tracing::info!(members = members.len() + 1, "pod membership changed");
                if ctx.updates.send(members.clone()).await.is_err() {
                    return;
                }
                last = Some(members);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool, ip: Option<&str>, deleting: bool) -> Pod {
        let mut value = serde_json::json!({
            "metadata": { "name": name, "uid": name },
            "spec": { "containers": [{ "name": "node", "ports": [{ "name": "grpc", "containerPort": 7420 }] }] },
            "status": { "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }] }
        });
        if let Some(ip) = ip {
            value["status"]["podIP"] = ip.into();
        }
        if deleting {
            value["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        }
        serde_json::from_value(value).expect("fixture")
    }

    #[test]
    fn only_ready_pods_with_an_ip_and_the_port_are_members() {
        assert_eq!(
            member_of(&pod("a", true, Some("10.0.0.1"), false), "grpc"),
            Some(Member::new("a", "10.0.0.1:7420"))
        );
        assert_eq!(member_of(&pod("a", false, Some("10.0.0.1"), false), "grpc"), None, "not Ready");
        assert_eq!(member_of(&pod("a", true, None, false), "grpc"), None, "no podIP yet");
        assert_eq!(member_of(&pod("a", true, Some("10.0.0.1"), true), "grpc"), None, "being deleted");
        assert_eq!(member_of(&pod("a", true, Some("10.0.0.1"), false), "peer"), None, "no such port");
        assert_eq!(
            member_of(&pod("a", true, Some("fd00::1"), false), "grpc").map(|m| m.address),
            Some("[fd00::1]:7420".into())
        );
    }
}
