//! Harness of the operator's end-to-end tests on the Kubernetes test bed: the bed's `kubectl` and `helm` bound to
//! its kubeconfig, the `DistCache` resource as a dynamic object (the tests speak the wire format users write, not
//! the Rust types), kubectl's table output, a pod watch that routes reads to Ready pods the way a Service does and
//! records how many node pods were unavailable at once, a reader that reads through it in the background, and a
//! check that a pod's process really exited.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use distcache_proto::v1::{GetRequest, cache_client::CacheClient};
use futures::StreamExt as _;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Pod},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    serde::Deserialize as _,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::testbed;

/// API group of the DistCache resource.
pub const GROUP: &str = "distcache.io";
/// Its version.
pub const VERSION: &str = "v1alpha1";
/// The CRD's name.
pub const CRD_NAME: &str = "distcaches.distcache.io";
/// The node's gRPC port.
pub const GRPC_PORT: u16 = 7420;
/// The node's admin HTTP port.
pub const ADMIN_PORT: u16 = 7421;

/// Runs one step of a scenario, saying how long it took (and which step failed).
pub async fn step<T>(what: &str, run: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let started = Instant::now();
    let result = run.await.with_context(|| format!("step {what}"));
    eprintln!("step {what}: {} in {:.1?}", if result.is_ok() { "ok" } else { "FAILED" }, started.elapsed());
    result
}

/// The example DistCache of examples/k8s/distcache.yaml.
pub struct Example {
    /// The DistCache object as the file has it.
    pub distcache: serde_json::Value,
    /// Its name.
    pub name: String,
    /// Its keyspace whose hook module is a ConfigMap.
    pub keyspace: serde_json::Value,
}

/// Reads the example DistCache (examples/k8s/distcache.yaml).
pub fn example_distcache() -> anyhow::Result<Example> {
    let distcache = manifests(&crate::repo_root().join("examples/k8s/distcache.yaml"))?
        .into_iter()
        .find(|d| d["kind"] == "DistCache")
        .ok_or_else(|| anyhow::anyhow!("examples/k8s/distcache.yaml has no DistCache"))?;
    let name = distcache["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let keyspace = distcache["spec"]["keyspaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|k| k["hook"]["module"]["configMap"].is_object())
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!("the example DistCache has no keyspace with a ConfigMap hook module")
        })?;
    Ok(Example { distcache, name, keyspace })
}

/// Creates the ConfigMap `keyspace`'s hook module names, holding the example hook (http-json), in `namespace`, as
/// a user does with `kubectl create configmap <name> --from-file=<key>=http-json.wasm`.
pub async fn create_hook_config_map(
    client: &Client,
    namespace: &str,
    keyspace: &serde_json::Value,
) -> anyhow::Result<()> {
    let module = &keyspace["hook"]["module"]["configMap"];
    let (name, key) =
        (module["name"].as_str().unwrap_or_default(), module["key"].as_str().unwrap_or_default());
    let wasm = std::fs::read(crate::hook_module("http_json")?)?;
    let mut hook: ConfigMap = serde_json::from_value(serde_json::json!({ "metadata": { "name": name } }))?;
    hook.binary_data = Some([(key.to_owned(), ByteString(wasm))].into());
    Api::<ConfigMap>::namespaced(client.clone(), namespace).create(&PostParams::default(), &hook).await?;
    Ok(())
}

/// The users a ConfigMap of examples/k8s/origin.yaml serves: `<id>.json` → its bytes.
pub fn origin_users(config_map: &serde_json::Value) -> BTreeMap<String, Vec<u8>> {
    config_map["data"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(file, content)| {
            Some((file.strip_suffix(".json")?.to_owned(), content.as_str()?.as_bytes().to_vec()))
        })
        .collect()
}

/// The DistCache resource (`distcache.io/v1alpha1`, plural `distcaches`).
pub fn distcache_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, "DistCache"), "distcaches")
}

/// DistCaches of a namespace.
pub fn distcaches(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &distcache_resource())
}

/// The label selector of a DistCache's node pods (the operator contract: name + instance labels).
pub fn node_selector(instance: &str) -> String {
    format!("app.kubernetes.io/name=distcache,app.kubernetes.io/instance={instance}")
}

/// Longest a kubectl or helm call may take.
const TOOL_TIMEOUT: Duration = Duration::from_mins(1);

/// A command-line tool of the bed (kubectl v1.20.2, helm 3.17.2), bound to a kubeconfig.
#[derive(Clone, Debug)]
pub struct Tool {
    program: PathBuf,
    kubeconfig: PathBuf,
}

impl Tool {
    /// The bed's kubectl with `kubeconfig`.
    pub fn kubectl(kubeconfig: &Path) -> Self {
        Self { program: testbed::kubectl(), kubeconfig: kubeconfig.to_owned() }
    }

    /// The bed's helm with `kubeconfig`.
    pub fn helm(kubeconfig: &Path) -> Self {
        Self { program: testbed::helm(), kubeconfig: kubeconfig.to_owned() }
    }

    /// Runs the tool; its stdout, or an error that quotes the command line, exit status and stderr.
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        self.run_with(args, None).await
    }

    /// Runs the tool with `stdin` as its standard input (`kubectl apply -f -`).
    pub async fn run_stdin(&self, args: &[&str], stdin: &str) -> anyhow::Result<String> {
        self.run_with(args, Some(stdin)).await
    }

    async fn run_with(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let name = self.program.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let line = format!("{name} {}", args.join(" "));
        let mut child = tokio::process::Command::new(&self.program)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {}", self.program.display()))?;
        let input = child.stdin.take();
        let write = async {
            if let (Some(mut pipe), Some(text)) = (input, stdin) {
                pipe.write_all(text.as_bytes()).await?;
            }
            std::io::Result::Ok(())
        };
        let run = async { tokio::join!(write, child.wait_with_output()) };
        let (written, output) = tokio::time::timeout(TOOL_TIMEOUT, run)
            .await
            .map_err(|_| anyhow::anyhow!("`{line}` did not finish within {TOOL_TIMEOUT:?}"))?;
        let output = output.with_context(|| format!("`{line}`"))?;
        anyhow::ensure!(
            output.status.success(),
            "`{line}` failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        written.with_context(|| format!("writing the input of `{line}`"))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// kubectl's table output (`kubectl get`), one map per row from column header to cell. Columns are found by the
/// start of each header word (kubectl aligns every cell under its header), so empty cells come out empty; a
/// header of several words (`NOMINATED NODE`) is not supported.
pub fn parse_table(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else { return Vec::new() };
    let bytes = header.as_bytes();
    let starts: Vec<usize> =
        (0..bytes.len()).filter(|&i| bytes[i] != b' ' && (i == 0 || bytes[i - 1] == b' ')).collect();
    let names: Vec<&str> = header.split_whitespace().collect();
    lines
        .map(|line| {
            names
                .iter()
                .enumerate()
                .map(|(n, name)| {
                    let from = starts[n].min(line.len());
                    let to = starts.get(n + 1).map_or(line.len(), |&s| s.min(line.len()));
                    ((*name).to_owned(), line.get(from..to).unwrap_or_default().trim().to_owned())
                })
                .collect()
        })
        .collect()
}

/// The documents of a YAML manifest file as JSON values (empty documents skipped).
pub fn manifests(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value =
            serde_json::Value::deserialize(doc).with_context(|| format!("parsing {}", path.display()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Documents as one YAML stream, for `kubectl apply -f -`.
pub fn to_yaml_stream(docs: &[serde_json::Value]) -> anyhow::Result<String> {
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(doc)?);
    }
    Ok(out)
}

/// Waits until CRD `name` is Established on the server of `client`.
pub async fn wait_established(client: &Client, name: &str, within: Duration) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crate::wait_for(within, &format!("CRD {name} Established"), || {
        let crds = crds.clone();
        async move {
            let Some(crd) = crds.get_opt(name).await? else { return Ok(false) };
            Ok(crd
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True")))
        }
    })
    .await
}

/// An object of a resource the server may not serve (`policy/v1beta1` PodDisruptionBudgets on 1.20, `policy/v1`
/// on newer servers): `None` when the object or the whole resource is missing.
pub async fn get_dynamic(
    client: &Client,
    namespace: &str,
    (group, version, kind, plural): (&str, &str, &str, &str),
    name: &str,
) -> anyhow::Result<Option<DynamicObject>> {
    let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    match api.get(name).await {
        Ok(object) => Ok(Some(object)),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether process `pid` still runs (a zombie counts as exited).
pub fn process_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // `pid (comm) S ...`: the state follows the last ')' (comm may contain anything).
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// The PID of the process the test kubelet runs for `pod` (the `pid` file of its pod directory).
pub fn pod_pid(pod: &Pod) -> anyhow::Result<i32> {
    let meta = &pod.metadata;
    let dir = testbed::pod_dir(
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
        meta.uid.as_deref().unwrap_or_default(),
    );
    let text = std::fs::read_to_string(dir.join("pid")).with_context(|| format!("{}/pid", dir.display()))?;
    Ok(text.trim().parse()?)
}

/// The last `lines` lines of the container log of `pod` (for failure reports).
pub fn pod_log_tail(pod: &Pod, lines: usize) -> String {
    let meta = &pod.metadata;
    let dir = testbed::pod_dir(
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
        meta.uid.as_deref().unwrap_or_default(),
    );
    let text = std::fs::read_to_string(dir.join("container.log")).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The podIP of a pod.
pub fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref().and_then(|s| s.pod_ip.clone())
}

/// The restart count of a pod's first container.
pub fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(0, |c| c.restart_count)
}

/// The image of a pod's first container.
pub fn pod_image(pod: &Pod) -> String {
    pod.spec.as_ref().and_then(|s| s.containers.first()).and_then(|c| c.image.clone()).unwrap_or_default()
}

/// What a node's `/admin/peers` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peers {
    /// The name of the node that answered.
    pub local: String,
    /// The member names it sees, itself included.
    pub members: BTreeSet<String>,
}

/// The members the node at `ip` sees (`/admin/peers` on its admin port), and its own name: a node that answers
/// for another pod's IP (a listener on 0.0.0.0 where pods share the host network) shows up here.
pub async fn members_seen(ip: &str) -> anyhow::Result<Peers> {
    let (status, body) = crate::http_get(format!("{ip}:{ADMIN_PORT}").parse()?, "/admin/peers").await?;
    anyhow::ensure!(status == 200, "/admin/peers of {ip} answered {status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(Peers {
        local: v["local"]["name"].as_str().unwrap_or_default().to_owned(),
        members: v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["name"].as_str().map(str::to_owned))
            .collect(),
    })
}

/// Runs the `distcache` CLI built with the workspace: `distcache --endpoint <endpoint> <args>`; its stdout, or an
/// error with its exit status and stderr.
pub async fn cli(endpoint: &str, args: &[&str]) -> anyhow::Result<String> {
    let program = crate::built_binary("distcache")?;
    let run = tokio::process::Command::new(&program)
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), run).await.map_err(|_| {
        anyhow::anyhow!("distcache --endpoint {endpoint} {args:?} did not finish within 30 s")
    })??;
    anyhow::ensure!(
        output.status.success(),
        "distcache --endpoint {endpoint} {}: {}: {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A pod that serves: Ready and not terminating, as a Service would route to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serving {
    /// Pod UID (pod IPs are reused by the test kubelet).
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Pod IP.
    pub ip: String,
}

/// What the pod watch has seen.
#[derive(Debug, Default)]
struct Seen {
    pods: BTreeMap<String, Pod>,
    /// The initial list is complete.
    synced: bool,
    /// How many pods should serve.
    expected: usize,
    /// Most pods short of `expected` at once, and the pods at that moment.
    worst: usize,
    worst_at: String,
    /// Most pods terminating at once, and the pods at that moment.
    most_terminating: usize,
    most_terminating_at: String,
    /// The pods in the order they started terminating (or vanished without being seen terminating).
    stopped: Vec<String>,
    /// Watch errors (retried with backoff).
    errors: Vec<String>,
}

impl Seen {
    fn serving(&self) -> Vec<Serving> {
        self.pods
            .values()
            .filter(|p| testbed::is_ready(p))
            .filter_map(|p| {
                Some(Serving { uid: p.metadata.uid.clone()?, name: p.metadata.name.clone()?, ip: pod_ip(p)? })
            })
            .collect()
    }

    fn describe(&self) -> String {
        self.pods
            .values()
            .map(|p| {
                let state = if p.metadata.deletion_timestamp.is_some() {
                    "terminating"
                } else if testbed::is_ready(p) {
                    "ready"
                } else {
                    "not ready"
                };
                format!("{}: {state} ({})", p.metadata.name.as_deref().unwrap_or_default(), pod_image(p))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn record(&mut self) {
        if !self.synced {
            return;
        }
        let short = self.expected.saturating_sub(self.serving().len());
        if short > self.worst {
            self.worst = short;
            self.worst_at = self.describe();
        }
        let terminating: Vec<String> = self
            .pods
            .values()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        if terminating.len() > self.most_terminating {
            self.most_terminating = terminating.len();
            self.most_terminating_at = self.describe();
        }
        for name in terminating {
            self.stopping(name);
        }
    }

    fn stopping(&mut self, name: String) {
        if self.stopped.last() != Some(&name) && !self.stopped.contains(&name) {
            self.stopped.push(name);
        }
    }
}

/// A cheap handle on what a [`PodWatch`] sees.
#[derive(Clone, Debug)]
pub struct PodView(Arc<Mutex<Seen>>);

impl PodView {
    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The pods that serve now.
    pub fn serving(&self) -> Vec<Serving> {
        self.lock().serving()
    }

    /// The most pods that were short of the expected number at once since the watch started, and the pods at
    /// that moment.
    pub fn worst(&self) -> (usize, String) {
        let seen = self.lock();
        (seen.worst, seen.worst_at.clone())
    }

    /// The pods that are not terminating and have an address (started, or about to start), whether Ready or not.
    pub fn addressed(&self) -> Vec<Serving> {
        self.lock()
            .pods
            .values()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| {
                Some(Serving { uid: p.metadata.uid.clone()?, name: p.metadata.name.clone()?, ip: pod_ip(p)? })
            })
            .collect()
    }

    /// The most pods that were terminating at once since the watch started, and the pods at that moment.
    pub fn most_terminating(&self) -> (usize, String) {
        let seen = self.lock();
        (seen.most_terminating, seen.most_terminating_at.clone())
    }

    /// The pods in the order they started stopping (terminating, or gone without being seen terminating).
    pub fn stopped(&self) -> Vec<String> {
        self.lock().stopped.clone()
    }

    /// Every pod now, as `name: state (image)`.
    pub fn describe(&self) -> String {
        self.lock().describe()
    }

    /// The watch's errors so far.
    pub fn errors(&self) -> Vec<String> {
        self.lock().errors.clone()
    }
}

/// Watches the pods of a label selector: which serve (for a reader that routes like a Service), how many were
/// ever missing from the expected number at once (a pod that is not Ready, terminating or not yet created counts
/// as missing), how many were terminating at once, and in which order pods stopped.
pub struct PodWatch {
    view: PodView,
    task: tokio::task::JoinHandle<()>,
}

impl PodWatch {
    /// Starts watching and waits (up to 10 s) until the initial list is in.
    pub async fn start(pods: Api<Pod>, selector: &str, expected: usize) -> anyhow::Result<Self> {
        let view = PodView(Arc::new(Mutex::new(Seen { expected, ..Seen::default() })));
        let stream = watcher(pods, watcher::Config::default().labels(selector)).default_backoff();
        let task = {
            let view = view.clone();
            tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                let mut buffer = BTreeMap::new();
                while let Some(event) = stream.next().await {
                    let mut seen = view.lock();
                    match event {
                        Ok(watcher::Event::Init) => buffer.clear(),
                        Ok(watcher::Event::InitApply(pod)) => {
                            buffer.insert(pod.metadata.name.clone().unwrap_or_default(), pod);
                        }
                        Ok(watcher::Event::InitDone) => {
                            seen.pods = std::mem::take(&mut buffer);
                            seen.synced = true;
                        }
                        Ok(watcher::Event::Apply(pod)) => {
                            seen.pods.insert(pod.metadata.name.clone().unwrap_or_default(), pod);
                        }
                        Ok(watcher::Event::Delete(pod)) => {
                            // A pod of the same name may already be back (the StatefulSet recreates it).
                            let name = pod.metadata.name.clone().unwrap_or_default();
                            if seen.pods.get(&name).is_some_and(|p| p.metadata.uid == pod.metadata.uid) {
                                seen.pods.remove(&name);
                            }
                            if seen.synced {
                                seen.stopping(name);
                            }
                        }
                        Err(e) => seen.errors.push(e.to_string()),
                    }
                    seen.record();
                }
            })
        };
        let watch = Self { view, task };
        let view = watch.view.clone();
        crate::wait_until(Duration::from_secs(10), || view.lock().synced)
            .await
            .context("the pod watch did not list the pods")?;
        Ok(watch)
    }

    /// A handle on what the watch sees.
    pub fn view(&self) -> PodView {
        self.view.clone()
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a background reader saw.
#[derive(Debug, Default)]
pub struct Reads {
    /// Reads that returned the expected value.
    pub ok: u64,
    /// Reads that failed (an error, a wrong value, no pod to read from).
    pub failed: u64,
    /// The first failures, described.
    pub failures: Vec<String>,
}

impl Reads {
    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
    }
}

/// Reads `keys` of `keyspace` (each with its expected value) over and over, each read through the next pod that
/// serves according to `view` (as a Service routes to Ready endpoints), about every 10 ms, until `stop` is
/// cancelled or `within` has elapsed.
pub fn spawn_reader(
    view: PodView,
    keyspace: &str,
    keys: Vec<(String, Vec<u8>)>,
    stop: CancellationToken,
    within: Duration,
) -> tokio::task::JoinHandle<Reads> {
    let keyspace = keyspace.to_owned();
    tokio::spawn(async move {
        let started = Instant::now();
        let mut reads = Reads::default();
        let mut clients: HashMap<String, CacheClient<Channel>> = HashMap::new();
        let mut pace = tokio::time::interval(Duration::from_millis(10));
        let mut i = 0usize;
        while !stop.is_cancelled() && started.elapsed() < within && !keys.is_empty() {
            pace.tick().await;
            let serving = view.serving();
            let at = format!("{:.1}s", started.elapsed().as_secs_f64());
            // Key and pod rotate at different speeds, so every key is read through every pod.
            let (key, want) = &keys[i % keys.len()];
            let Some(pod) = (!serving.is_empty()).then(|| &serving[(i + i / keys.len()) % serving.len()])
            else {
                reads.fail(format!("{at}: no pod serves ({})", view.describe()));
                i += 1;
                continue;
            };
            i += 1;
            let client = match clients.get(&pod.uid) {
                Some(c) => c.clone(),
                None => match connect(&pod.ip).await {
                    Ok(c) => {
                        clients.insert(pod.uid.clone(), c.clone());
                        c
                    }
                    Err(e) => {
                        reads.fail(format!("{at}: connecting to {} ({}): {e:#}", pod.name, pod.ip));
                        continue;
                    }
                },
            };
            let mut client = client;
            let request = GetRequest { keyspace: keyspace.clone(), key: key.clone() };
            match tokio::time::timeout(Duration::from_secs(5), client.get(request)).await {
                Ok(Ok(answer)) if answer.get_ref().value == want.as_slice() => reads.ok += 1,
                Ok(Ok(answer)) => reads.fail(format!(
                    "{at}: {key} through {} answered {:?}",
                    pod.name,
                    String::from_utf8_lossy(&answer.get_ref().value)
                )),
                Ok(Err(status)) => reads.fail(format!(
                    "{at}: {key} through {} ({}): {:?} {}",
                    pod.name,
                    pod.ip,
                    status.code(),
                    status.message()
                )),
                Err(_) => {
                    reads
                        .fail(format!("{at}: {key} through {} ({}): no answer within 5 s", pod.name, pod.ip));
                }
            }
        }
        reads
    })
}

/// A gRPC client of the node at `ip` (connect within 2 s, every call within 10 s).
pub async fn connect(ip: &str) -> anyhow::Result<CacheClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{ip}:{GRPC_PORT}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(CacheClient::new(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_tables_parse_by_column_including_empty_cells() {
        let text = "NAME   READY   REPLICAS   KEYSPACES   AGE\n\
                    demo   3/3     3          2           41s\n\
                    big            10                     2m\n";
        let rows = parse_table(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["NAME"], "demo");
        assert_eq!(rows[0]["READY"], "3/3");
        assert_eq!(rows[0]["REPLICAS"], "3");
        assert_eq!(rows[0]["KEYSPACES"], "2");
        assert_eq!(rows[0]["AGE"], "41s");
        assert_eq!(rows[1]["READY"], "");
        assert_eq!(rows[1]["REPLICAS"], "10");
        assert_eq!(rows[1]["KEYSPACES"], "");
        assert!(parse_table("").is_empty());
    }

    #[test]
    fn this_process_runs_and_a_reaped_child_does_not() {
        assert!(process_running(i32::try_from(std::process::id()).expect("pid fits i32")));
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = i32::try_from(child.id()).expect("pid fits i32");
        child.wait().expect("wait");
        assert!(!process_running(pid));
    }

    #[test]
    fn yaml_streams_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.yaml");
        std::fs::write(&path, "a: 1\n---\n---\nb: [x]\n").expect("write");
        let docs = manifests(&path).expect("parse");
        assert_eq!(docs, vec![serde_json::json!({"a": 1}), serde_json::json!({"b": ["x"]})]);
        std::fs::write(&path, to_yaml_stream(&docs).expect("yaml")).expect("write");
        assert_eq!(manifests(&path).expect("parse again"), docs);
    }
}
