//! Kubernetes discovery: the members are the started pods of a label selector in one namespace, watched through
//! the API server (kube-runtime's watcher: list, then watch; a re-list after watch expiry or an API-server
//! restart) into a reflector `Store`, the one copy of the pods; the member set is derived from the store after
//! each change.
//!
//! A pod is a member while it is not being deleted, has a podIP, has the named container port, and the container
//! that declares that port has started (phase Running, the container's state `running`, and `started` unless the
//! kubelet leaves it out). Readiness is not asked for: a node becomes Ready only once it knows its members, so
//! pods started together must see each other before any of them is Ready, and a readiness flap (an overloaded
//! node missing a probe) must not move keys. Its member name is the pod name (the node's `name`, set from
//! `metadata.name` by the operator) and its address `podIP:port`. A pod that is deleted leaves as soon as its
//! deletion starts (before its process stops), so traffic moves before the node goes away; a container that
//! exits (a crash) leaves until it runs again.
//!
//! Settling: the first member set is reported (which makes the node ready) once a complete list is in and every
//! pod of the selector that is not being deleted is a member, or [`SETTLE_WINDOW`] after the first complete
//! list, whichever comes first. So pods started together (a StatefulSet with parallel pod management) form one
//! ring before any of them is Ready, instead of each becoming Ready with a ring of itself; a pod that cannot start
//! (unschedulable, an image pull failing) holds up the others' readiness only for the window, and joins when it
//! starts. During a re-list (`Init`, `InitApply`…) the store keeps the previous complete list and swaps in the new
//! one only at `InitDone`: an API-server restart never flaps membership to empty or to a partial list. Errors (API
//! server unreachable, 403 from a missing Role) are reported through `DiscoveryStatus` while the last known
//! members keep serving, and retried with backoff.
//!
//! RBAC: only `get`, `list` and `watch` on `pods` in the node's own namespace (a Role, not a ClusterRole):
//!
//! ```yaml
//! rules:
//!   - apiGroups: [""]
//!     resources: ["pods"]
//!     verbs: ["get", "list", "watch"]
//! ```

use std::{collections::BTreeMap, time::Duration};

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

/// How long after the first complete list the first member set is reported even though some pods of the selector
/// have not started yet.
pub const SETTLE_WINDOW: Duration = Duration::from_secs(10);

/// The member a pod stands for, if it is one: not being deleted, with a podIP and the named container port, and
/// that container started. Readiness plays no part.
pub fn member_of(pod: &Pod, port_name: &str) -> Option<Member> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    let (container, port) = pod.spec.as_ref()?.containers.iter().find_map(|c| {
        let port = c.ports.as_ref()?.iter().find(|p| p.name.as_deref() == Some(port_name))?;
        Some((c.name.as_str(), port.container_port))
    })?;
    // Real kubelets set `started` once the startup probe (if any) passed; ours sets it with the process.
    let started = status.container_statuses.as_ref()?.iter().any(|c| {
        c.name == container
            && c.state.as_ref().is_some_and(|s| s.running.is_some())
            && c.started != Some(false)
    });
    if !started {
        return None;
    }
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
/// stops, the stream ends or the receiver is gone; the first report only once the pods have settled (see the
/// module documentation). Separate from `run` so that it can be fed events without an API server.
async fn follow(
    mut events: BoxStream<'_, watcher::Result<watcher::Event<Pod>>>,
    store: &Store<Pod>,
    port_name: &str,
    source: &str,
    ctx: DiscoveryContext,
) {
    // Whether a complete list has reached the store: before the first `InitDone` it is empty, not known empty.
    let mut listed = false;
    // Until the first report: when the settle window ends (set at the first complete list).
    let mut settle_by: Option<tokio::time::Instant> = None;
    let mut window_over = false;
    let mut last: Option<Vec<Member>> = None;
    loop {
        let settle = async {
            match settle_by {
                Some(deadline) if last.is_none() && !window_over => tokio::time::sleep_until(deadline).await,
                _ => std::future::pending().await,
            }
        };
        // `None`: the settle window is over.
        let event = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            () = settle => None,
            event = events.next() => Some(event),
        };
        match event {
            None => window_over = true,
            Some(None) => {
                ctx.status.problem("the pod watch ended");
                return;
            }
            Some(Some(Err(e))) => {
                ctx.status.problem(format!("watching {source}: {e}"));
                continue;
            }
            Some(Some(Ok(event))) => {
                ctx.status.healthy();
                match event {
                    // A (re-)list in progress is buffered by the reflector's writer: the store, and so the
                    // members, stay as they were until it completes.
                    watcher::Event::Init | watcher::Event::InitApply(_) => continue,
                    watcher::Event::InitDone => {
                        listed = true;
                        settle_by.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE_WINDOW);
                    }
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) if !listed => continue,
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => {}
                }
            }
        }
        let members = members_of(store, port_name, &ctx.local.name);
        if last.is_none() {
            let waiting = not_started(store, port_name, &ctx.local.name);
            if !waiting.is_empty() && !window_over {
                tracing::debug!(waiting = ?waiting, "waiting for the pods of the selector to start");
                continue;
            }
            if !waiting.is_empty() {
                tracing::warn!(
                    waiting = ?waiting,
                    window = ?SETTLE_WINDOW,
                    "pods of the selector have not started within the settle window; going on without them"
                );
            }
        }
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

/// The other pods in `store` that are not being deleted and not (yet) members, by name.
fn not_started(store: &Store<Pod>, port_name: &str, local: &str) -> Vec<String> {
    let mut names: Vec<String> = store
        .state()
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && member_of(p, port_name).is_none())
        .filter_map(|p| p.metadata.name.clone())
        .filter(|name| name != local)
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod's life as the kubelet reports it.
    #[derive(Clone, Copy)]
    enum Phase {
        /// Created, not yet given an address (not scheduled, or the sandbox is being set up).
        Pending,
        /// The container runs; Ready or not.
        Running { ready: bool },
        /// The container exited and waits for its restart (phase stays Running).
        Restarting,
    }

    fn pod_with(name: &str, phase: Phase, ip: Option<&str>, deleting: bool) -> Pod {
        let (phase_name, ready, state, started) = match phase {
            Phase::Pending => {
                ("Pending", false, serde_json::json!({ "waiting": { "reason": "ContainerCreating" } }), false)
            }
            Phase::Running { ready } => ("Running", ready, serde_json::json!({ "running": {} }), true),
            Phase::Restarting => {
                ("Running", false, serde_json::json!({ "waiting": { "reason": "CrashLoopBackOff" } }), false)
            }
        };
        let flag = if ready { "True" } else { "False" };
        let mut value = serde_json::json!({
            "metadata": { "name": name, "uid": name },
            "spec": { "containers": [
                { "name": "sidecar", "ports": [{ "name": "metrics", "containerPort": 9000 }] },
                { "name": "node", "ports": [{ "name": "grpc", "containerPort": 7420 }] },
            ] },
            "status": {
                "phase": phase_name,
                "conditions": [{ "type": "Ready", "status": flag }],
                "containerStatuses": [
                    { "name": "sidecar", "ready": false, "restartCount": 0, "image": "", "imageID": "",
                      "state": { "waiting": {} } },
                    { "name": "node", "ready": ready, "started": started, "restartCount": 0, "image": "",
                      "imageID": "", "state": state },
                ],
            }
        });
        if let Some(ip) = ip {
            value["status"]["podIP"] = ip.into();
        }
        if deleting {
            value["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        }
        serde_json::from_value(value).expect("fixture")
    }

    /// A pod whose node container runs, not Ready.
    fn running(name: &str, ip: &str) -> Pod {
        pod_with(name, Phase::Running { ready: false }, Some(ip), false)
    }

    fn ready(name: &str, ip: &str) -> Pod {
        pod_with(name, Phase::Running { ready: true }, Some(ip), false)
    }

    fn pending(name: &str) -> Pod {
        pod_with(name, Phase::Pending, None, false)
    }

    #[test]
    fn started_pods_with_an_ip_and_the_port_are_members_ready_or_not() {
        let member = Some(Member::new("a", "10.0.0.1:7420"));
        assert_eq!(member_of(&ready("a", "10.0.0.1"), "grpc"), member);
        assert_eq!(member_of(&running("a", "10.0.0.1"), "grpc"), member, "running, not Ready");
        assert_eq!(member_of(&pending("a"), "grpc"), None, "pending, no podIP yet");
        assert_eq!(
            member_of(&pod_with("a", Phase::Pending, Some("10.0.0.1"), false), "grpc"),
            None,
            "an address, but the container has not started"
        );
        assert_eq!(
            member_of(&pod_with("a", Phase::Restarting, Some("10.0.0.1"), false), "grpc"),
            None,
            "the container exited and waits for its restart"
        );
        let mut probing = running("a", "10.0.0.1");
        if let Some(c) = probing.status.as_mut().and_then(|s| s.container_statuses.as_mut()) {
            c[1].started = Some(false);
        }
        assert_eq!(member_of(&probing, "grpc"), None, "running, startup probe not passed yet");
        let mut old_kubelet = running("a", "10.0.0.1");
        if let Some(c) = old_kubelet.status.as_mut().and_then(|s| s.container_statuses.as_mut()) {
            c[1].started = None;
        }
        assert_eq!(member_of(&old_kubelet, "grpc"), member, "a kubelet that does not report `started`");
        assert_eq!(
            member_of(&pod_with("a", Phase::Running { ready: true }, Some("10.0.0.1"), true), "grpc"),
            None,
            "being deleted"
        );
        assert_eq!(member_of(&ready("a", "10.0.0.1"), "peer"), None, "no such port");
        assert_eq!(
            member_of(&ready("a", "10.0.0.1"), "metrics"),
            None,
            "the port's container (the sidecar) has not started"
        );
        assert_eq!(
            member_of(&running("a", "fd00::1"), "grpc").map(|m| m.address),
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

        /// The next member set reported within `within`, by name; `None` if there was none.
        async fn next_within(&mut self, within: Duration) -> Option<Vec<String>> {
            let update = tokio::time::timeout(within, self.updates.recv()).await.ok()?;
            Some(update.expect("follow is running").into_iter().map(|m| m.name).collect())
        }

        /// The next member set reported, by name.
        async fn next(&mut self) -> Vec<String> {
            self.next_within(Duration::from_secs(5)).await.expect("an update within 5 s")
        }
    }

    #[tokio::test]
    async fn members_come_from_complete_lists_and_never_flap_during_a_relist() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut h = Harness::start();
        // The first list: nothing is reported until it is complete, then all of it (without this node), whether
        // Ready or not: nodes are not Ready before they know their members.
        h.send([
            Ok(Init),
            Ok(InitApply(running("a", "10.0.0.1"))),
            Ok(InitApply(running("self", "10.0.0.9"))),
            Ok(InitApply(ready("b", "10.0.0.2"))),
            Ok(InitDone),
        ]);
        assert_eq!(h.next().await, ["a", "b"], "a partial first list was reported");
        // A pod that starts joins; its readiness coming and going changes nothing.
        h.send([
            Ok(Apply(pending("c"))),
            Ok(Apply(running("c", "10.0.0.3"))),
            Ok(Apply(ready("c", "10.0.0.3"))),
            Ok(Apply(running("c", "10.0.0.3"))),
        ]);
        assert_eq!(h.next().await, ["a", "b", "c"], "a started pod did not join");
        // A failing watch is reported (counted) while the members stay; the next event clears the problem.
        h.send([Err(watcher::Error::NoResourceVersion)]);
        // A re-list (after the error, say) is not reported as an empty or a partial set: the first report after
        // it is the complete new list, where `b` is gone.
        h.send([
            Ok(Init),
            Ok(InitApply(running("c", "10.0.0.3"))),
            Ok(InitApply(ready("a", "10.0.0.1"))),
            Ok(InitDone),
        ]);
        assert_eq!(h.next().await, ["a", "c"], "the re-list flapped, or a readiness change was reported");
        assert_eq!(h.errors.get(), 1, "the watch error was not counted");
        assert_eq!(h.status.current(), None, "the problem outlived the recovery");
        // A pod being deleted leaves; so does a deleted one.
        h.send([
            Ok(Apply(pod_with("a", Phase::Running { ready: true }, Some("10.0.0.1"), true))),
            Ok(Delete(ready("c", "10.0.0.3"))),
        ]);
        assert_eq!(h.next().await, ["c"], "a pod being deleted stayed");
        assert_eq!(h.next().await, Vec::<String>::new(), "a deleted pod stayed");
        drop(h.events);
        tokio::time::timeout(std::time::Duration::from_secs(5), h.task)
            .await
            .expect("follow returns when the watch ends")
            .expect("no panic");
        assert_eq!(h.status.current().as_deref(), Some("the pod watch ended"));
    }

    /// Pods started together: the first report waits for the one still pending, and includes it.
    #[tokio::test(start_paused = true)]
    async fn the_first_report_waits_until_every_pod_has_started() {
        use watcher::Event::{Apply, Init, InitApply, InitDone};
        let mut h = Harness::start();
        h.send([
            Ok(Init),
            Ok(InitApply(running("self", "10.0.0.9"))),
            Ok(InitApply(running("a", "10.0.0.1"))),
            Ok(InitApply(pending("b"))),
            Ok(InitDone),
        ]);
        // A pod being deleted is not waited for.
        h.send([Ok(Apply(pod_with("old", Phase::Pending, None, true)))]);
        assert_eq!(
            h.next_within(Duration::from_secs(5)).await,
            None,
            "reported before every pod of the selector started"
        );
        h.send([Ok(Apply(pod_with("b", Phase::Pending, Some("10.0.0.2"), false)))]);
        assert_eq!(h.next_within(Duration::from_secs(1)).await, None, "an address is not a start");
        h.send([Ok(Apply(running("b", "10.0.0.2")))]);
        assert_eq!(
            h.next_within(Duration::from_millis(1)).await.as_deref(),
            Some(&["a".to_owned(), "b".to_owned()][..])
        );
    }

    /// A pod that never starts holds up the first report for the settle window only, and joins when it starts.
    #[tokio::test(start_paused = true)]
    async fn a_pod_that_does_not_start_holds_up_the_first_report_for_the_settle_window_only() {
        use watcher::Event::{Apply, Init, InitApply, InitDone};
        let mut h = Harness::start();
        let listed = tokio::time::Instant::now();
        h.send([
            Ok(Init),
            Ok(InitApply(running("a", "10.0.0.1"))),
            Ok(InitApply(pending("b"))),
            Ok(InitDone),
        ]);
        // Events during the window do not end it early.
        h.send([Ok(Apply(running("c", "10.0.0.3")))]);
        assert_eq!(
            h.next_within(SETTLE_WINDOW.saturating_sub(Duration::from_millis(10))).await,
            None,
            "reported early"
        );
        assert_eq!(h.next().await, ["a", "c"], "no report after the settle window");
        assert!(listed.elapsed() >= SETTLE_WINDOW, "reported after {:?}", listed.elapsed());
        h.send([Ok(Apply(running("b", "10.0.0.2")))]);
        assert_eq!(h.next().await, ["a", "b", "c"], "the late pod did not join");
    }
}
