//! The test kubelet: runs the pods of a real Kubernetes API server as local processes of the project's binaries.
//!
//! There is no container runtime on the test machines, so this kubelet maps a container image to a binary built
//! from this workspace (`*distcache-node*` → `distcache-node`, `*distcache-operator*` → `distcache-operator`,
//! `*distcache-origin*` → `distcache-origin`, the example origin of `examples/k8s`) and runs it as a process.
//! What it does, as a kubelet does:
//! - registers its Node and keeps it Ready by renewing its Lease in `kube-node-lease` every 10 s;
//! - binds the pods it is responsible for (no scheduler runs): unscheduled pods whose images all map to a binary
//!   and that match the label selector, if one is given;
//! - gives each pod its own loopback address (127.0.0.x) as podIP;
//! - materialises ConfigMap, Secret and emptyDir volumes as files under the pod's directory and keeps ConfigMap
//!   and Secret files current with the objects (an atomic `..data` symlink swap, as the real kubelet does);
//! - passes args and env: literal values, `$(VAR)` references, downward-API `fieldRef`s (`metadata.name`,
//!   `metadata.namespace`, `metadata.uid`, `status.podIP`, `spec.nodeName`, `spec.serviceAccountName`) and
//!   ConfigMap/Secret key refs;
//! - gives the process API access as its ServiceAccount: a kubeconfig with a token from the TokenRequest API,
//!   named by `KUBECONFIG`, so RBAC is real;
//! - runs the readiness probe (httpGet, grpc or tcpSocket) and reports `Ready`, `ContainersReady`, podIP,
//!   phase and container statuses;
//! - restarts exited containers per `restartPolicy` (with backoff, counting restarts);
//! - on deletion sends SIGTERM, waits the grace period, sends SIGKILL, and finishes the deletion with grace 0.
//!
//! **Paths**: a container path under one of the container's `volumeMounts` is remapped to the pod directory:
//! `<mountPath>/x` becomes `<pod dir>/root<mountPath>/x`. The kubelet rewrites every argument and env value that
//! starts with a mount path this way, and a directory that has mount points below it (paths inside mounted files are
//! not rewritten: use paths relative to the file).
//!
//! Each pod's directory is `<dir>/pods/<namespace>_<name>_<uid>/`: `root/` (mount points), `volumes/`,
//! `kubeconfig`, `container.log` and `pid` (of the running process).
//!
//! Not emulated: scheduling constraints, resource limits, container isolation, init containers, liveness and
//! startup probes, Service VIPs, cluster DNS. All pods share the host network: a process must listen on its podIP.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{
            Binding, ConfigMap, Container, Node, NodeAddress, NodeCondition, NodeStatus, ObjectReference,
            Pod, Probe, Secret,
        },
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
};
use tokio::{process::Child, sync::Mutex};

/// Settings of a test kubelet.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// Node name.
    pub node_name: String,
    /// Pod directories live here.
    pub dir: PathBuf,
    /// Where the project binaries are (`distcache-node`, `distcache-operator`, `distcache-origin`).
    pub binaries: PathBuf,
    /// Only pods with these labels (`k=v,k2=v2`), in addition to mapping to a binary; empty = all that map.
    pub selector: BTreeMap<String, String>,
    /// The API server URL written into pods' kubeconfigs.
    pub server: String,
    /// PEM of the API server's CA, for pods' kubeconfigs.
    pub ca_pem: String,
    /// Poll interval of pods and volumes.
    pub interval: Duration,
    /// The first three octets of pod addresses: pods get `<subnet>.2` ..= `<subnet>.254` (default `127.0.0`;
    /// two beds on one machine use different ones).
    pub pod_subnet: [u8; 3],
}

/// The binary an image maps to.
pub fn binary_for_image(image: &str) -> Option<&'static str> {
    if image.contains("distcache-operator") {
        Some("distcache-operator")
    } else if image.contains("distcache-node") {
        Some("distcache-node")
    } else if image.contains("distcache-origin") {
        Some("distcache-origin")
    } else {
        None
    }
}

/// One running pod.
struct RunningPod {
    uid: String,
    namespace: String,
    name: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    child: Option<Child>,
    restarts: i32,
    next_start: Option<Instant>,
    ready: bool,
    probe_successes: i32,
    probe_failures: i32,
    last_probe: Option<Instant>,
    started_at: Option<Instant>,
    volumes_version: String,
    last_status: Option<serde_json::Value>,
}

/// The test kubelet.
pub struct Kubelet {
    client: Client,
    config: KubeletConfig,
    pods: Mutex<HashMap<String, RunningPod>>,
    /// Pod addresses not in use, least recently freed first (as cluster IPAM does: a recreated pod gets a new
    /// address, so peers see the same member name move).
    free_ips: std::sync::Mutex<std::collections::VecDeque<Ipv4Addr>>,
    /// Pods whose processes are being stopped in the background (deletion in progress).
    stopping: std::sync::Mutex<HashSet<String>>,
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

impl Kubelet {
    /// A kubelet talking to `client`.
    pub fn new(client: Client, config: KubeletConfig) -> Arc<Self> {
        // <subnet>.1 is the host's; pods get <subnet>.2 ..= <subnet>.254 (reused after a pod is gone).
        let [a, b, c] = config.pod_subnet;
        let free_ips = (2..=254u8).map(|i| Ipv4Addr::new(a, b, c, i)).collect();
        Arc::new(Self {
            client,
            config,
            pods: Mutex::new(HashMap::new()),
            free_ips: std::sync::Mutex::new(free_ips),
            stopping: std::sync::Mutex::new(HashSet::new()),
        })
    }

    /// Registers the Node and runs until `stop` is cancelled; then stops every pod process it started.
    pub async fn run(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
        self.register_node().await?;
        let lease = {
            let this = Arc::clone(&self);
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    if let Err(e) = this.renew_lease().await {
                        tracing::warn!(error = %e, "lease renewal failed");
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(10)) => {}
                    }
                }
            })
        };
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = ticker.tick() => {}
            }
            if let Err(e) = Box::pin(self.sync()).await {
                tracing::warn!(error = %format!("{e:#}"), "sync failed");
            }
        }
        lease.abort();
        // All at once: the kubelet itself gets a bounded time to stop (testbed.sh waits 10 s, then SIGKILL).
        let mut pods = self.pods.lock().await;
        futures::future::join_all(pods.values_mut().map(|pod| stop_process(pod, Duration::from_secs(5))))
            .await;
        Ok(())
    }

    async fn register_node(&self) -> anyhow::Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = Node {
            metadata: ObjectMeta {
                name: Some(self.config.node_name.clone()),
                labels: Some(BTreeMap::from([
                    ("kubernetes.io/hostname".to_owned(), self.config.node_name.clone()),
                    ("distcache.io/test-kubelet".to_owned(), "true".to_owned()),
                ])),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        if nodes.get_opt(&self.config.node_name).await?.is_none() {
            nodes.create(&PostParams::default(), &node).await.context("failed to register the Node")?;
        }
        let status = NodeStatus {
            addresses: Some(vec![NodeAddress { type_: "InternalIP".into(), address: "127.0.0.1".into() }]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: Some("KubeletReady".into()),
                message: Some("distcache test kubelet is posting ready status".into()),
                last_heartbeat_time: Some(now_time()),
                last_transition_time: Some(now_time()),
            }]),
            capacity: Some(BTreeMap::from([
                ("cpu".to_owned(), k8s_openapi::apimachinery::pkg::api::resource::Quantity("64".into())),
                ("memory".to_owned(), k8s_openapi::apimachinery::pkg::api::resource::Quantity("64Gi".into())),
                ("pods".to_owned(), k8s_openapi::apimachinery::pkg::api::resource::Quantity("250".into())),
            ])),
            ..NodeStatus::default()
        };
        let mut allocatable = status.capacity.clone();
        let status = NodeStatus { allocatable: allocatable.take(), ..status };
        nodes
            .patch_status(
                &self.config.node_name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": status })),
            )
            .await
            .context("failed to set the Node's status")?;
        self.renew_lease().await?;
        tracing::info!(node = %self.config.node_name, "node registered");
        Ok(())
    }

    async fn renew_lease(&self) -> anyhow::Result<()> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let spec = LeaseSpec {
            holder_identity: Some(self.config.node_name.clone()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..LeaseSpec::default()
        };
        if leases.get_opt(&self.config.node_name).await?.is_some() {
            leases
                .patch(
                    &self.config.node_name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "spec": spec })),
                )
                .await?;
        } else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.node_name.clone()), ..ObjectMeta::default() },
                spec: Some(spec),
            };
            leases.create(&PostParams::default(), &lease).await?;
        }
        Ok(())
    }

    fn responsible_for(&self, pod: &Pod) -> bool {
        let Some(spec) = &pod.spec else { return false };
        if !spec.containers.iter().all(|c| c.image.as_deref().and_then(binary_for_image).is_some()) {
            return false;
        }
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        self.config.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// One round: bind new pods, start, probe and report ours, finish deleted ones.
    async fn sync(self: &Arc<Self>) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let list = api.list(&ListParams::default()).await?;
        let mut seen = HashSet::new();
        for pod in list.items {
            let Some(uid) = pod.metadata.uid.clone() else { continue };
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            match node {
                None if pod.metadata.deletion_timestamp.is_none() && self.responsible_for(&pod) => {
                    if let Err(e) = self.bind(&pod).await {
                        tracing::warn!(pod = ?pod.metadata.name, error = %e, "bind failed");
                    }
                }
                Some(n) if n == self.config.node_name => {
                    seen.insert(uid.clone());
                    if let Err(e) = self.sync_pod(&pod, &uid).await {
                        tracing::warn!(pod = ?pod.metadata.name, error = %format!("{e:#}"), "pod sync failed");
                    }
                }
                _ => {}
            }
        }
        // Pods that vanished from the API (force-deleted): stop their processes.
        let mut pods = self.pods.lock().await;
        let gone: Vec<String> = pods.keys().filter(|uid| !seen.contains(*uid)).cloned().collect();
        for uid in gone {
            if let Some(mut pod) = pods.remove(&uid) {
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    stop_process(&mut pod, Duration::from_secs(5)).await;
                    this.release(&pod);
                });
            }
        }
        Ok(())
    }

    fn release(&self, pod: &RunningPod) {
        let _ = std::fs::remove_dir_all(&pod.dir);
        if let Ok(mut ips) = self.free_ips.lock() {
            ips.push_back(pod.ip);
        }
    }

    async fn bind(&self, pod: &Pod) -> anyhow::Result<()> {
        let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let binding = Binding {
            metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() },
            target: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(self.config.node_name.clone()),
                ..ObjectReference::default()
            },
        };
        let _: serde_json::Value =
            api.create_subresource("binding", &name, &PostParams::default(), &binding).await?;
        tracing::info!(pod = %format!("{ns}/{name}"), "bound");
        Ok(())
    }

    /// Stops a deleted pod's process in the background, as a kubelet does: a pod taking its grace period to stop
    /// holds up no other pod (probes, starts and other deletions go on). Then finishes the deletion.
    fn stop_in_background(
        self: &Arc<Self>,
        mut pod: RunningPod,
        grace: Duration,
        api: Api<Pod>,
        name: String,
    ) {
        let uid = pod.uid.clone();
        if let Ok(mut s) = self.stopping.lock() {
            s.insert(uid.clone());
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            stop_process(&mut pod, grace).await;
            this.release(&pod);
            if let Err(e) = finish_deletion(&api, &name, &uid).await {
                tracing::warn!(pod = %name, error = %format!("{e:#}"), "finishing the deletion failed; retried");
            }
            if let Ok(mut s) = this.stopping.lock() {
                s.remove(&uid);
            }
        });
    }

    async fn sync_pod(self: &Arc<Self>, pod: &Pod, uid: &str) -> anyhow::Result<()> {
        let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        if self.stopping.lock().is_ok_and(|s| s.contains(uid)) {
            return Ok(());
        }
        let mut pods = self.pods.lock().await;
        if !pods.contains_key(uid) {
            if pod.metadata.deletion_timestamp.is_some() {
                // Never started here: finish the deletion.
                drop(pods);
                return finish_deletion(&api, &name, uid).await;
            }
            let ip = self
                .free_ips
                .lock()
                .ok()
                .and_then(|mut ips| ips.pop_front())
                .ok_or_else(|| anyhow::anyhow!("no free pod address"))?;
            let dir = self.config.dir.join("pods").join(format!("{ns}_{name}_{uid}"));
            std::fs::create_dir_all(&dir)?;
            pods.insert(
                uid.to_owned(),
                RunningPod {
                    uid: uid.to_owned(),
                    namespace: ns.clone(),
                    name: name.clone(),
                    ip,
                    dir,
                    child: None,
                    restarts: 0,
                    next_start: Some(Instant::now()),
                    ready: false,
                    probe_successes: 0,
                    probe_failures: 0,
                    last_probe: None,
                    started_at: None,
                    volumes_version: String::new(),
                    last_status: None,
                },
            );
        }
        let Some(running) = pods.get_mut(uid) else { return Ok(()) };
        let spec = pod.spec.clone().unwrap_or_default();

        if pod.metadata.deletion_timestamp.is_some() {
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .or(spec.termination_grace_period_seconds)
                .unwrap_or(30)
                .max(0);
            let grace = Duration::from_secs(u64::try_from(grace).unwrap_or(30));
            let Some(done) = pods.remove(uid) else { return Ok(()) };
            drop(pods);
            self.stop_in_background(done, grace, api, name);
            return Ok(());
        }

        self.sync_volumes(pod, running).await?;
        let container = spec.containers.first().cloned().unwrap_or_default();

        reap(running, spec.restart_policy.as_deref(), &format!("{ns}/{name}"))?;
        if running.child.is_none() && running.next_start.is_some_and(|t| Instant::now() >= t) {
            match self.spawn(pod, &container, running).await {
                Ok(child) => {
                    running.child = Some(child);
                    running.started_at = Some(Instant::now());
                    running.next_start = None;
                }
                Err(e) => {
                    tracing::warn!(pod = %format!("{ns}/{name}"), error = %format!("{e:#}"), "cannot start container");
                    running.next_start = Some(Instant::now() + Duration::from_secs(2));
                }
            }
        }
        if running.child.is_some() {
            self.probe(&container, running).await;
        }
        let status = pod_status(running, &container, &self.config.node_name);
        if running.last_status.as_ref() != Some(&status) {
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": status.clone() })),
            )
            .await?;
            running.last_status = Some(status);
        }
        Ok(())
    }

    /// Runs the readiness probe when it is due and updates readiness.
    async fn probe(&self, container: &Container, pod: &mut RunningPod) {
        let Some(probe) = container.readiness_probe.clone() else {
            pod.ready = true;
            return;
        };
        let period =
            Duration::from_secs(u64::try_from(probe.period_seconds.unwrap_or(10).max(1)).unwrap_or(10));
        let delay =
            Duration::from_secs(u64::try_from(probe.initial_delay_seconds.unwrap_or(0).max(0)).unwrap_or(0));
        let now = Instant::now();
        if pod.started_at.is_some_and(|s| now < s + delay) || pod.last_probe.is_some_and(|t| now < t + period)
        {
            return;
        }
        pod.last_probe = Some(now);
        let ok = run_probe(&probe, container, pod.ip).await;
        if ok {
            pod.probe_successes += 1;
            pod.probe_failures = 0;
            if pod.probe_successes >= probe.success_threshold.unwrap_or(1) {
                pod.ready = true;
            }
        } else {
            pod.probe_failures += 1;
            pod.probe_successes = 0;
            if pod.probe_failures >= probe.failure_threshold.unwrap_or(3) {
                pod.ready = false;
            }
        }
    }

    /// Writes the pod's ConfigMap, Secret and emptyDir volumes (and its API kubeconfig); rewrites ConfigMap
    /// and Secret volumes when their content changed.
    async fn sync_volumes(&self, pod: &Pod, running: &mut RunningPod) -> anyhow::Result<()> {
        let ns = &running.namespace;
        let spec = pod.spec.clone().unwrap_or_default();
        let mut contents: Vec<(String, BTreeMap<String, Vec<u8>>)> = Vec::new();
        for volume in spec.volumes.unwrap_or_default() {
            let mut files = BTreeMap::new();
            if let Some(cm) = &volume.config_map {
                let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
                let name = cm.name.clone();
                if let Some(obj) = api.get_opt(&name).await? {
                    let mut all: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                    for (k, v) in obj.data.unwrap_or_default() {
                        all.insert(k, v.into_bytes());
                    }
                    for (k, v) in obj.binary_data.unwrap_or_default() {
                        all.insert(k, v.0);
                    }
                    files = select_items(all, cm.items.as_deref());
                } else if !cm.optional.unwrap_or(false) {
                    anyhow::bail!("ConfigMap {ns}/{name} of volume {} not found", volume.name);
                }
            } else if let Some(secret) = &volume.secret {
                let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
                let name = secret.secret_name.clone().unwrap_or_default();
                if let Some(obj) = api.get_opt(&name).await? {
                    let mut all: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                    for (k, v) in obj.data.unwrap_or_default() {
                        all.insert(k, v.0);
                    }
                    for (k, v) in obj.string_data.unwrap_or_default() {
                        all.insert(k, v.into_bytes());
                    }
                    files = select_items(all, secret.items.as_deref());
                } else if !secret.optional.unwrap_or(false) {
                    anyhow::bail!("Secret {ns}/{name} of volume {} not found", volume.name);
                }
            } else if volume.empty_dir.is_none() {
                anyhow::bail!(
                    "volume {}: only configMap, secret and emptyDir volumes are supported",
                    volume.name
                );
            }
            contents.push((volume.name.clone(), files));
        }
        let version = format!("{contents:?}");
        if version == running.volumes_version {
            return Ok(());
        }
        for (volume, files) in &contents {
            write_volume(&running.dir.join("volumes").join(volume), files)?;
        }
        running.volumes_version = version;
        Ok(())
    }

    /// A kubeconfig for the pod's ServiceAccount, with a token from the TokenRequest API.
    async fn pod_kubeconfig(&self, pod: &Pod, running: &RunningPod) -> anyhow::Result<PathBuf> {
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), &running.namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec!["https://kubernetes.default.svc".into()],
                expiration_seconds: Some(24 * 3600),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let issued: TokenRequest = api
            .create_subresource("token", &sa, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for ServiceAccount {}/{sa}", running.namespace))?;
        let token = issued.status.map(|s| s.token).unwrap_or_default();
        let ca = base64_encode(self.config.ca_pem.as_bytes());
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n  - name: testbed\n    cluster:\n      server: {}\n      \
             certificate-authority-data: {ca}\nusers:\n  - name: {sa}\n    user:\n      token: {token}\ncontexts:\n  \
             - name: pod\n    context: {{ cluster: testbed, user: {sa}, namespace: {} }}\ncurrent-context: pod\n",
            self.config.server, running.namespace
        );
        let path = running.dir.join("kubeconfig");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    async fn spawn(&self, pod: &Pod, container: &Container, running: &RunningPod) -> anyhow::Result<Child> {
        let image = container.image.clone().unwrap_or_default();
        let binary =
            binary_for_image(&image).ok_or_else(|| anyhow::anyhow!("image {image} maps to no binary"))?;
        let path = self.config.binaries.join(binary);
        anyhow::ensure!(path.exists(), "{} not built", path.display());
        // Mounts: <pod dir>/root<mountPath> → the volume's directory.
        let mut mounts = Vec::new();
        for m in container.volume_mounts.clone().unwrap_or_default() {
            let target = running.dir.join("root").join(m.mount_path.trim_start_matches('/'));
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let _ = std::fs::remove_file(&target);
            let mut source = running.dir.join("volumes").join(&m.name);
            if let Some(sub) = &m.sub_path
                && !sub.is_empty()
            {
                source = source.join(sub);
            }
            std::os::unix::fs::symlink(&source, &target)?;
            mounts.push(m.mount_path.clone());
        }
        // A mount point, a path below one, or a directory with mount points below it (a parent of several
        // mounts, such as the node's ConfigMap module directory) lives under `<pod dir>/root`.
        let remap = |value: &str| -> String {
            let dir = value.trim_end_matches('/');
            for mount in &mounts {
                let mount = mount.trim_end_matches('/');
                if value.starts_with('/')
                    && (dir == mount
                        || value.starts_with(&format!("{mount}/"))
                        || (!dir.is_empty() && mount.starts_with(&format!("{dir}/"))))
                {
                    return format!("{}/root{value}", running.dir.display());
                }
            }
            value.to_owned()
        };
        let kubeconfig = self.pod_kubeconfig(pod, running).await?;
        let mut env: Vec<(String, String)> = vec![("KUBECONFIG".into(), kubeconfig.display().to_string())];
        for var in container.env.clone().unwrap_or_default() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => expand(v, &env),
                (None, Some(from)) => self.env_from(pod, running, from).await?,
                (None, None) => String::new(),
            };
            env.push((var.name.clone(), remap(&value)));
        }
        let args: Vec<String> = container
            .command
            .clone()
            .unwrap_or_default()
            .into_iter()
            .skip(1) // the entrypoint is the mapped binary
            .chain(container.args.clone().unwrap_or_default())
            .map(|a| remap(&expand(&a, &env)))
            .collect();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(running.dir.join("container.log"))?;
        let mut cmd = tokio::process::Command::new(&path);
        cmd.args(&args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .current_dir(&running.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("spawning {}", path.display()))?;
        // For tests that kill the process behind the kubelet's back (a crash).
        if let Some(pid) = child.id() {
            std::fs::write(running.dir.join("pid"), pid.to_string())?;
        }
        tracing::info!(pod = %format!("{}/{}", running.namespace, running.name), ip = %running.ip, binary, "container started");
        Ok(child)
    }

    async fn env_from(
        &self,
        pod: &Pod,
        running: &RunningPod,
        from: &k8s_openapi::api::core::v1::EnvVarSource,
    ) -> anyhow::Result<String> {
        if let Some(field) = &from.field_ref {
            return Ok(match field.field_path.as_str() {
                "metadata.name" => running.name.clone(),
                "metadata.namespace" => running.namespace.clone(),
                "metadata.uid" => running.uid.clone(),
                "status.podIP" => running.ip.to_string(),
                "status.hostIP" => "127.0.0.1".into(),
                "spec.nodeName" => self.config.node_name.clone(),
                "spec.serviceAccountName" => {
                    pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default()
                }
                other => anyhow::bail!("fieldRef {other} is not supported by the test kubelet"),
            });
        }
        if let Some(key) = &from.config_map_key_ref {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &running.namespace);
            let cm = api.get(&key.name).await?;
            return Ok(cm.data.unwrap_or_default().get(&key.key).cloned().unwrap_or_default());
        }
        if let Some(key) = &from.secret_key_ref {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &running.namespace);
            let s = api.get(&key.name).await?;
            let v = s.data.unwrap_or_default().get(&key.key).map(|b| b.0.clone()).unwrap_or_default();
            return Ok(String::from_utf8_lossy(&v).into_owned());
        }
        anyhow::bail!("unsupported env valueFrom")
    }
}

/// Notices an exited container and schedules its restart per `restartPolicy` (exponential backoff, capped).
fn reap(running: &mut RunningPod, policy: Option<&str>, pod: &str) -> anyhow::Result<()> {
    let Some(child) = running.child.as_mut() else { return Ok(()) };
    let Some(status) = child.try_wait()? else { return Ok(()) };
    tracing::info!(pod, %status, "container exited");
    running.child = None;
    running.ready = false;
    running.probe_successes = 0;
    let policy = policy.unwrap_or("Always");
    if policy == "Always" || (policy == "OnFailure" && !status.success()) {
        running.restarts += 1;
        let exponent = u32::try_from(running.restarts.clamp(0, 4)).unwrap_or(4);
        running.next_start =
            Some(Instant::now() + Duration::from_secs(1 << exponent).min(Duration::from_secs(10)));
    } else {
        running.next_start = None;
    }
    Ok(())
}

/// `$(VAR)` references to earlier variables, as Kubernetes expands them; `$$` is a literal `$`.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix("$(")
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&tail[..end + 3]),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

fn select_items(
    all: BTreeMap<String, Vec<u8>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
) -> BTreeMap<String, Vec<u8>> {
    match items {
        None => all,
        Some(items) => {
            items.iter().filter_map(|i| Some((i.path.clone(), all.get(&i.key)?.clone()))).collect()
        }
    }
}

/// Writes a volume as the kubelet does: files in a fresh timestamped directory, `..data` swapped to it
/// atomically, and one symlink per key into `..data`.
fn write_volume(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let stamp = format!("..{}", Timestamp::now().as_nanosecond());
    let fresh = dir.join(&stamp);
    for (key, bytes) in files {
        let path = fresh.join(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, bytes)?;
    }
    std::fs::create_dir_all(&fresh)?;
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::fs::rename(&tmp, dir.join("..data"))?;
    for key in files.keys() {
        let top = key.split('/').next().unwrap_or(key);
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(top), &link)?;
        }
    }
    if let Some(old) = old
        && old != Path::new(&stamp)
    {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// The PEM of the cluster CA named by a kubeconfig's current context (inline data or a file).
pub fn ca_pem(config: &kube::config::Kubeconfig) -> anyhow::Result<String> {
    use base64::Engine as _;
    let context = config.current_context.clone().unwrap_or_default();
    let cluster_name = config
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .unwrap_or_default();
    let cluster = config
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.as_ref())
        .ok_or_else(|| anyhow::anyhow!("kubeconfig has no cluster {cluster_name:?}"))?;
    if let Some(data) = &cluster.certificate_authority_data {
        let bytes = base64::engine::general_purpose::STANDARD.decode(data.trim())?;
        return Ok(String::from_utf8(bytes)?);
    }
    if let Some(file) = &cluster.certificate_authority {
        return Ok(std::fs::read_to_string(file)?);
    }
    anyhow::bail!("kubeconfig cluster {cluster_name:?} has no certificate authority")
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn port_of(
    container: &Container,
    port: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
) -> Option<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => container
            .ports
            .as_ref()?
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Runs one readiness probe against the pod's address.
async fn run_probe(probe: &Probe, container: &Container, ip: Ipv4Addr) -> bool {
    let timeout = Duration::from_secs(u64::try_from(probe.timeout_seconds.unwrap_or(1).max(1)).unwrap_or(1));
    let check = async {
        if let Some(http) = &probe.http_get {
            let port = port_of(container, &http.port)?;
            let path = http.path.clone().unwrap_or_else(|| "/".into());
            let (status, _) = crate::http_get(SocketAddr::new(IpAddr::V4(ip), port), &path).await.ok()?;
            return Some((200..400).contains(&status));
        }
        if let Some(grpc) = &probe.grpc {
            let port = u16::try_from(grpc.port).ok()?;
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{ip}:{port}"))
                .ok()?
                .connect()
                .await
                .ok()?;
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            let response = client
                .check(tonic_health::pb::HealthCheckRequest {
                    service: grpc.service.clone().unwrap_or_default(),
                })
                .await
                .ok()?;
            return Some(
                response.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            );
        }
        if let Some(tcp) = &probe.tcp_socket {
            let port = port_of(container, &tcp.port)?;
            return Some(tokio::net::TcpStream::connect((ip, port)).await.is_ok());
        }
        None
    };
    matches!(tokio::time::timeout(timeout, check).await, Ok(Some(true)))
}

/// SIGTERM, up to `grace` for the process to exit, then SIGKILL.
async fn stop_process(pod: &mut RunningPod, grace: Duration) {
    let Some(mut child) = pod.child.take() else { return };
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
    tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), "container stopped");
}

/// Finishes a graceful deletion (grace 0, for this pod's UID only).
async fn finish_deletion(api: &Api<Pod>, name: &str, uid: &str) -> anyhow::Result<()> {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions { uid: Some(uid.to_owned()), resource_version: None }),
        ..DeleteParams::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The pod status this kubelet reports.
fn pod_status(pod: &RunningPod, container: &Container, _node: &str) -> serde_json::Value {
    let running = pod.child.is_some();
    let ready = running && pod.ready;
    let flag = |b: bool| if b { "True" } else { "False" };
    let state = if running {
        serde_json::json!({ "running": {} })
    } else {
        serde_json::json!({ "waiting": { "reason": if pod.restarts > 0 { "CrashLoopBackOff" } else { "ContainerCreating" } } })
    };
    serde_json::json!({
        "phase": if running || pod.restarts > 0 || pod.next_start.is_some() { "Running" } else { "Succeeded" },
        "hostIP": "127.0.0.1",
        "podIP": pod.ip.to_string(),
        "podIPs": [{ "ip": pod.ip.to_string() }],
        "conditions": [
            { "type": "PodScheduled", "status": "True" },
            { "type": "Initialized", "status": "True" },
            { "type": "ContainersReady", "status": flag(ready) },
            { "type": "Ready", "status": flag(ready) },
        ],
        "containerStatuses": [{
            "name": container.name,
            "image": container.image.clone().unwrap_or_default(),
            "imageID": "",
            "ready": ready,
            "started": running,
            "restartCount": pod.restarts,
            "state": state,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_references_expand_like_kubernetes() {
        let env = vec![("POD_IP".to_owned(), "127.0.0.5".to_owned())];
        assert_eq!(expand("$(POD_IP):7420", &env), "127.0.0.5:7420");
        assert_eq!(expand("$(MISSING)x", &env), "$(MISSING)x");
        assert_eq!(expand("$$(POD_IP)", &env), "$(POD_IP)");
        assert_eq!(expand("plain $ sign", &env), "plain $ sign");
    }

    #[test]
    fn images_map_to_project_binaries() {
        assert_eq!(binary_for_image("ghcr.io/acme/distcache-node:0.1.0"), Some("distcache-node"));
        assert_eq!(binary_for_image("distcache-operator:dev"), Some("distcache-operator"));
        assert_eq!(binary_for_image("ghcr.io/distcache/distcache-origin:0.1.0"), Some("distcache-origin"));
        assert_eq!(binary_for_image("nginx:1.27"), None);
    }
}
