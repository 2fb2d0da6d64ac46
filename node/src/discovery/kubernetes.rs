//! Kubernetes discovery: the members are the Ready pods of a label selector in one namespace, watched through the
//! API server (kube-runtime's watcher: list, then watch; a re-list after watch expiry or an API-server restart)
//! into a reflector `Store`, the one copy of the pods; the member set is derived from the store after each change.
//!
//! A pod is a member while it is Ready, not being deleted, has a podIP, and has the named container port; its
//! member name is the pod name (the node's `name`, set from `metadata.name` by the operator) and its address
//! `podIP:port`. A pod that loses readiness leaves the ring; a pod that is deleted leaves as soon as its deletion
//! starts (before its process stops), so traffic moves before the node goes away.
//!
//! Settling: the first member set is reported after the first complete list, so nodes started together agree
//! from the start. During a re-list (`Init`, `InitApply`…) the store keeps the previous complete list and swaps
//! in the new one only at `InitDone`: an API-server restart never flaps membership to empty or to a partial list. Errors (API server unreachable, 403 from a missing Role) are reported through
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

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
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
        let (store, writer) = reflector::store();
        let events = reflector::reflector(writer, watcher(api, config)).default_backoff().boxed();
        let source = format!("pods in {namespace} ({})", settings.label_selector);
        follow(events, &store, &settings.port_name, &source, ctx).await;
    }
}

/// Reports the members in `store` after each change `events` (a reflector over `store`) makes, until the node
/// stops, the stream ends or the receiver is gone. Separate from `run` so that it can be fed events without an
/// API server.
async fn follow(
    mut events: BoxStream<'_, watcher::Result<watcher::Event<Pod>>>,
    store: &Store<Pod>,
    port_name: &str,
    source: &str,
    ctx: DiscoveryContext,
) {
    // Whether a complete list has reached the store: before the first `InitDone` it is empty, not known empty.
    let mut listed = false;
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
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                ctx.status.problem(format!("watching {source}: {e}"));
                continue;
            }
        };
        ctx.status.healthy();
        match event {
            // A (re-)list in progress is buffered by the reflector's writer: the store, and so the members, stay
            // as they were until it completes.
            watcher::Event::Init | watcher::Event::InitApply(_) => continue,
            watcher::Event::InitDone => listed = true,
            watcher::Event::Apply(_) | watcher::Event::Delete(_) if !listed => continue,
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => {}
        }
        let members = members_of(store, port_name, &ctx.local.name);
        if last.as_ref() != Some(&members) {
            tracing::info!(members = members.len() + 1, "pod membership changed");
            if ctx.updates.send(members.clone()).await.is_err() {
                return;
            }
            last = Some(members);
        }
    }
}

/// The other members among the pods in `store`, ordered by name (one per name).
fn members_of(store: &Store<Pod>, port_name: &str, local: &str) -> Vec<Member> {
    let members: BTreeMap<String, Member> = store
        .state()
        .iter()
        .filter_map(|p| member_of(p, port_name))
        .filter(|m| m.name != local)
        .map(|m| (m.name.clone(), m))
        .collect();
    members.into_values().collect()
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

    /// The watcher's events as a reflector over a store sees them, fed by hand; the members `follow` reports.
    struct Harness {
        events: tokio::sync::mpsc::UnboundedSender<watcher::Result<watcher::Event<Pod>>>,
        updates: tokio::sync::mpsc::Receiver<Vec<Member>>,
        status: std::sync::Arc<crate::discovery::DiscoveryStatus>,
        errors: prometheus_client::metrics::counter::Counter,
        task: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        fn start() -> Self {
            let (events, rx) = tokio::sync::mpsc::unbounded_channel();
            let (store, writer) = reflector::store();
            let stream =
                reflector::reflector(writer, tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
                    .boxed();
            let (updates_tx, updates) = tokio::sync::mpsc::channel(16);
            let errors = prometheus_client::metrics::counter::Counter::default();
            let status = std::sync::Arc::new(crate::discovery::DiscoveryStatus::new(errors.clone()));
            let local = Member::new("self", "10.0.0.9:7420");
            let ctx = DiscoveryContext {
                transport: std::sync::Arc::new(crate::peer::grpc::GrpcPeers::new(
                    &local,
                    std::time::Duration::from_secs(1),
                    1 << 20,
                )),
                local,
                updates: updates_tx,
                shutdown: tokio_util::sync::CancellationToken::new(),
                status: std::sync::Arc::clone(&status),
            };
            let task = tokio::spawn(async move { follow(stream, &store, "grpc", "pods", ctx).await });
            Self { events, updates, status, errors, task }
        }

        fn send(&self, events: impl IntoIterator<Item = watcher::Result<watcher::Event<Pod>>>) {
            for e in events {
                self.events.send(e).expect("follow is running");
            }
        }

        /// The next member set reported, by name.
        async fn next(&mut self) -> Vec<String> {
            let update = tokio::time::timeout(std::time::Duration::from_secs(5), self.updates.recv())
                .await
                .expect("an update within 5 s")
                .expect("follow is running");
            update.into_iter().map(|m| m.name).collect()
        }
    }

    fn ready(name: &str, ip: &str) -> Pod {
        pod(name, true, Some(ip), false)
    }

    #[tokio::test]
    async fn members_come_from_complete_lists_and_never_flap_during_a_relist() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut h = Harness::start();
        // The first list: nothing is reported until it is complete, then all of it (without this node).
        h.send([
            Ok(Init),
            Ok(InitApply(ready("a", "10.0.0.1"))),
            Ok(InitApply(ready("self", "10.0.0.9"))),
            Ok(InitApply(ready("b", "10.0.0.2"))),
            Ok(InitDone),
        ]);
        assert_eq!(h.next().await, ["a", "b"], "a partial first list was reported");
        // A pod that is not Ready changes nothing; becoming Ready makes it a member.
        h.send([Ok(Apply(pod("c", false, Some("10.0.0.3"), false))), Ok(Apply(ready("c", "10.0.0.3")))]);
        assert_eq!(h.next().await, ["a", "b", "c"], "a not-Ready pod was reported");
        // A failing watch is reported (counted) while the members stay; the next event clears the problem.
        h.send([Err(watcher::Error::NoResourceVersion)]);
        // A re-list (after the error, say) is not reported as an empty or a partial set: the first report after
        // it is the complete new list, where `b` is gone.
        h.send([
            Ok(Init),
            Ok(InitApply(ready("c", "10.0.0.3"))),
            Ok(InitApply(ready("a", "10.0.0.1"))),
            Ok(InitDone),
        ]);
        assert_eq!(h.next().await, ["a", "c"], "the re-list flapped");
        assert_eq!(h.errors.get(), 1, "the watch error was not counted");
        assert_eq!(h.status.current(), None, "the problem outlived the recovery");
        // A pod being deleted leaves; so does a deleted one.
        h.send([Ok(Apply(pod("a", true, Some("10.0.0.1"), true))), Ok(Delete(ready("c", "10.0.0.3")))]);
        assert_eq!(h.next().await, ["c"], "a pod being deleted stayed");
        assert_eq!(h.next().await, Vec::<String>::new(), "a deleted pod stayed");
        drop(h.events);
        tokio::time::timeout(std::time::Duration::from_secs(5), h.task)
            .await
            .expect("follow returns when the watch ends")
            .expect("no panic");
        assert_eq!(h.status.current().as_deref(), Some("the pod watch ended"));
    }
}
