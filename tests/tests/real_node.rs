//! The operator end to end on the bed's real node (`make e2e-real`: containerd, the kubelet v1.20.2, kube-proxy
//! and the cluster DNS, with the project's images built by tests/testbed/images.sh), the way a user's first
//! `helm install` meets a cluster. Ignored by `make test` (its bed runs the test kubelet).
//!
//! 1. `helm install` of charts/distcache with the images `localhost/distcache-{operator,node}:<tag>`: the operator
//!    pod passes its readiness probe through the container runtime, runs as 65532 on a read-only root file
//!    system, and reaches the API server through the `kubernetes` Service (in-cluster config: its
//!    KUBERNETES_SERVICE_HOST is that Service's ClusterIP);
//! 2. examples/k8s/origin.yaml (its image only replaced) and the example hook as a ConfigMap; the example
//!    DistCache unchanged: its hook reaches the origin as `http://users-origin:8080`, a name only the cluster DNS
//!    resolves (through the pod's search list);
//! 3. three Ready node pods that see each other (discovery by the pod watch), each process uid 65532 on a
//!    read-only root, the compiled hook kept on the pod's emptyDir;
//! 4. every example user read through the DistCache's ClusterIP Service from outside the cluster network,
//!    returning the origin's bytes; the origin (asked through its own ClusterIP) answered once per user;
//! 5. `kubectl scale dc` to five;
//! 6. a new node image (`<tag>-next`) rolls the pods one at a time while two readers go through the ClusterIP
//!    Service: one long-lived gRPC channel (an application) and a new connection for every read (new clients,
//!    balanced by kube-proxy); no read fails;
//! 7. a second DistCache with `discovery: { dns: {} }`: its nodes find each other through the headless
//!    Service's records in the cluster DNS;
//! 8. deleting the DistCaches garbage-collects what they owned and stops their containers; `helm uninstall`
//!    removes the operator and keeps the CRD.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use distcache_client::Client;
use distcache_tests::{
    http_get,
    operator::{
        CRD_NAME, Example, Tool, create_hook_config_map, distcaches, example_distcache, manifests,
        members_seen, node_selector, origin_users, pod_image, pod_ip, step, to_yaml_stream, wait_established,
    },
    repo_root,
    testbed::{Testbed, is_ready, testbed_dir},
    wait_for,
};
use futures::FutureExt as _;
use k8s_openapi::{
    api::{
        apps::v1::StatefulSet,
        core::v1::{ConfigMap, Pod, Service},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const RELEASE: &str = "distcache";
const OPERATOR_SELECTOR: &str =
    "app.kubernetes.io/name=distcache-operator,app.kubernetes.io/instance=distcache";
/// The uid every image runs as (the distroless `nonroot` user).
const NONROOT: u32 = 65532;

struct Env {
    bed: Testbed,
    kubectl: Tool,
    helm: Tool,
    system: String,
    ns: String,
    /// Tag of the images imported into the node's containerd (`localhost/distcache-*:<tag>`).
    tag: String,
}

struct Deployed {
    name: String,
    keyspace: String,
    users: BTreeMap<String, Vec<u8>>,
    /// The origin's ClusterIP address and the path its users are under.
    origin: SocketAddr,
    users_path: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the bed's real node and the images: make e2e-real"]
async fn a_helm_install_runs_on_a_real_node_from_images_to_uninstall() -> anyhow::Result<()> {
    anyhow::ensure!(
        testbed_dir().join("real-node").exists(),
        "the running bed has no real node: make e2e-real (or make testbed-up KUBELET=real, then images.sh)"
    );
    let bed = Testbed::connect().await?;
    let system = bed.namespace("real-system").await?;
    let apps = bed.namespace("real-e2e").await?;
    let env = Env {
        kubectl: Tool::kubectl(&bed.kubeconfig),
        helm: Tool::helm(&bed.kubeconfig),
        system: system.name.clone(),
        ns: apps.name.clone(),
        tag: std::env::var("DISTCACHE_E2E_IMAGE_TAG").unwrap_or_else(|_| "e2e".to_owned()),
        bed,
    };
    let started = Instant::now();
    let outcome = std::panic::AssertUnwindSafe(scenario(&env)).catch_unwind().await;
    eprintln!("scenario took {:.1?}", started.elapsed());
    if !matches!(outcome, Ok(Ok(()))) {
        diagnose(&env).await;
    }
    apps.delete().await?;
    let _ = env.helm.run(&["uninstall", RELEASE, "--namespace", &env.system]).await;
    system.delete().await?;
    match outcome {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

async fn scenario(env: &Env) -> anyhow::Result<()> {
    step("1. helm install, the operator in a pod", install_operator(env)).await?;
    let d = step("2. origin, hook ConfigMap and the example DistCache", deploy(env)).await?;
    step("3. three Ready node pods", wait_ring(env, &d.name, 3, Duration::from_mins(2))).await?;
    step("3. the node containers as 65532, read-only root, hook cache on the emptyDir", containers(env, &d))
        .await?;
    step("4. reads through the ClusterIP Service", read_through_service(env, &d)).await?;
    step("5. kubectl scale to 5", scale(env, &d, 5)).await?;
    step("6. a rolling image change without a failed read", roll(env, &d)).await?;
    step("7. DNS discovery through the headless Service", dns_discovery(env)).await?;
    step("8. delete, garbage collection, uninstall", delete_and_uninstall(env, &d.name)).await?;
    Ok(())
}

// ---- processes of containers ----------------------------------------------------------------------------------

/// A process of a pod's container, seen from the host.
#[derive(Debug)]
struct ContainerProcess {
    pid: u32,
    comm: String,
    uid: u32,
    /// Whether its `/` is mounted read-only.
    read_only_root: bool,
}

/// The processes of pod `uid`'s containers (its cgroup is `.../pod<uid>/<container>` with the kubelet's cgroupfs
/// driver), without the sandbox's `pause`.
fn container_processes(uid: &str) -> anyhow::Result<Vec<ContainerProcess>> {
    let marker = format!("/pod{uid}/");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let dir = entry.path();
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else { continue };
        if !cgroup.contains(&marker) {
            continue;
        }
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim().to_owned();
        if comm == "pause" {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse().ok())
            .unwrap_or(u32::MAX);
        // mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS ...
        let mountinfo = std::fs::read_to_string(dir.join("mountinfo")).unwrap_or_default();
        let read_only_root = mountinfo.lines().any(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.get(4) == Some(&"/") && fields.get(5).is_some_and(|o| o.split(',').any(|x| x == "ro"))
        });
        found.push(ContainerProcess { pid, comm, uid, read_only_root });
    }
    Ok(found)
}

/// Asserts that pod `pod` runs exactly one container process named like `comm`, as 65532 on a read-only root.
fn assert_nonroot_read_only(pod: &Pod, comm: &str) -> anyhow::Result<ContainerProcess> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let mut processes = container_processes(&uid)?;
    anyhow::ensure!(
        processes.len() == 1 && processes[0].comm.starts_with(comm),
        "pod {name}: container processes {processes:?}, expected one {comm}"
    );
    let process = processes.remove(0);
    anyhow::ensure!(process.uid == NONROOT, "pod {name}: {process:?} does not run as {NONROOT}");
    anyhow::ensure!(process.read_only_root, "pod {name}: {process:?} has a writable root file system");
    Ok(process)
}

// ---- 1 ----------------------------------------------------------------------------------------------------

async fn install_operator(env: &Env) -> anyhow::Result<()> {
    let chart = repo_root().join("charts/distcache").display().to_string();
    // pullPolicy Never: the images are in the node's containerd only; a pull would mean a missing import.
    let values = format!(
        "operator.image.repository=localhost/distcache-operator,operator.image.tag={tag},\
         operator.image.pullPolicy=Never,node.image.repository=localhost/distcache-node,node.image.tag={tag},\
         watchNamespace={ns}",
        tag = env.tag,
        ns = env.ns
    );
    env.helm.run(&["install", RELEASE, &chart, "--namespace", &env.system, "--set", &values]).await?;
    let pods: Api<Pod> = Api::namespaced(env.bed.client.clone(), &env.system);
    let operator = || async {
        let list = pods.list(&ListParams::default().labels(OPERATOR_SELECTOR)).await?;
        anyhow::Ok(list.items.into_iter().find(is_ready))
    };
    wait_for(Duration::from_mins(1), "the operator pod Ready (its readiness probe)", || async {
        Ok(operator().await?.is_some())
    })
    .await?;
    wait_established(&env.bed.client, CRD_NAME, Duration::from_secs(30)).await?;
    let pod = operator().await?.ok_or_else(|| anyhow::anyhow!("the operator pod went away"))?;
    let process = assert_nonroot_read_only(&pod, "distcache-oper")?;
    // In-cluster configuration: the API server is the `kubernetes` Service's ClusterIP, through kube-proxy.
    let environ = std::fs::read(format!("/proc/{}/environ", process.pid))?;
    let kubernetes: Service = Api::namespaced(env.bed.client.clone(), "default").get("kubernetes").await?;
    let cluster_ip = kubernetes.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
    let want = format!("KUBERNETES_SERVICE_HOST={cluster_ip}");
    anyhow::ensure!(
        environ.split(|b| *b == 0).any(|v| v == want.as_bytes()),
        "the operator's environment has no {want}"
    );
    Ok(())
}

// ---- 2 ----------------------------------------------------------------------------------------------------

async fn deploy(env: &Env) -> anyhow::Result<Deployed> {
    let examples = repo_root().join("examples/k8s");
    let Example { mut distcache, name, keyspace } = example_distcache()?;
    create_hook_config_map(&env.bed.client, &env.ns, &keyspace).await?;

    // The origin as the example ships it, on the image built here.
    let mut docs = manifests(&examples.join("origin.yaml"))?;
    let mut users = BTreeMap::new();
    for doc in &mut docs {
        doc["metadata"]["namespace"] = env.ns.clone().into();
        if doc["kind"] == "ConfigMap" {
            users.extend(origin_users(doc));
        }
        if doc["kind"] == "Deployment" {
            for container in
                doc["spec"]["template"]["spec"]["containers"].as_array_mut().into_iter().flatten()
            {
                container["image"] = format!("localhost/distcache-origin:{}", env.tag).into();
                container["imagePullPolicy"] = "Never".into();
            }
        }
    }
    anyhow::ensure!(!users.is_empty(), "examples/k8s/origin.yaml serves no users");
    env.kubectl.run_stdin(&["apply", "-f", "-"], &to_yaml_stream(&docs)?).await?;
    let services: Api<Service> = Api::namespaced(env.bed.client.clone(), &env.ns);
    let origin_service = services.get("users-origin").await?;
    let origin_ip = origin_service.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
    let origin: SocketAddr = format!("{origin_ip}:8080").parse()?;
    wait_for(Duration::from_mins(1), "the origin answering through its ClusterIP", || async {
        Ok(http_get(origin, "/_stats").await.is_ok_and(|(status, _)| status == 200))
    })
    .await?;

    // The example DistCache as it is: its baseUrl names the origin's Service by its short name.
    let base = keyspace["hook"]["config"]["baseUrl"].as_str().unwrap_or_default().to_owned();
    let rest = base.split_once("://").map_or("", |(_, r)| r);
    let users_path = rest.find('/').map_or("", |i| &rest[i..]).trim_end_matches('/').to_owned();
    distcache["metadata"]["namespace"] = env.ns.clone().into();
    env.kubectl.run_stdin(&["apply", "-f", "-"], &to_yaml_stream(&[distcache])?).await?;
    Ok(Deployed {
        name,
        keyspace: keyspace["name"].as_str().unwrap_or_default().to_owned(),
        users,
        origin,
        users_path,
    })
}

// ---- 3 ----------------------------------------------------------------------------------------------------

async fn node_pods(env: &Env, name: &str) -> anyhow::Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(env.bed.client.clone(), &env.ns);
    Ok(pods.list(&ListParams::default().labels(&node_selector(name))).await?.items)
}

/// Waits until exactly `n` node pods of `name` exist, are Ready, and each sees the `n` of them as members.
async fn wait_ring(env: &Env, name: &str, n: usize, within: Duration) -> anyhow::Result<()> {
    let last = Mutex::new(String::new());
    let note = |what: String| *last.lock().expect("not poisoned") = what;
    let waited = wait_for(within, &format!("{n} Ready node pods of {name} that see each other"), || {
        let note = &note;
        async move {
            let pods = node_pods(env, name).await?;
            let ready: BTreeMap<String, String> = pods
                .iter()
                .filter(|p| is_ready(p))
                .filter_map(|p| Some((p.metadata.name.clone()?, pod_ip(p)?)))
                .collect();
            if pods.len() != n || ready.len() != n {
                note(format!("{} pods, {} Ready", pods.len(), ready.len()));
                return Ok(false);
            }
            for (pod, ip) in &ready {
                let seen = members_seen(ip).await;
                if !seen.as_ref().is_ok_and(|s| s.local == *pod && s.members.iter().eq(ready.keys())) {
                    note(format!("{pod} ({ip}) answers {seen:?}"));
                    return Ok(false);
                }
            }
            Ok(true)
        }
    })
    .await;
    waited.with_context(|| format!("last seen: {}", last.lock().expect("not poisoned")))
}

async fn containers(env: &Env, d: &Deployed) -> anyhow::Result<()> {
    for pod in node_pods(env, &d.name).await? {
        assert_nonroot_read_only(&pod, "distcache-node")?;
    }
    Ok(())
}

/// Files in the emptyDir that holds pod `pod`'s hook cache, on the kubelet's disk.
fn hook_cache_files(pod: &Pod) -> anyhow::Result<Vec<PathBuf>> {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().ok_or_else(|| anyhow::anyhow!("pod without spec"))?;
    let mount = spec
        .containers
        .iter()
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .find(|m| m.mount_path == "/var/cache/distcache")
        .ok_or_else(|| anyhow::anyhow!("no volume mounted at /var/cache/distcache"))?;
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .ok_or_else(|| anyhow::anyhow!("no volume {}", mount.name))?;
    anyhow::ensure!(volume.empty_dir.is_some(), "the hook cache volume {} is not an emptyDir", volume.name);
    let dir =
        testbed_dir().join(format!("kubelet/pods/{uid}/volumes/kubernetes.io~empty-dir/{}", volume.name));
    let mut files = Vec::new();
    let mut stack = vec![dir];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
    }
    Ok(files)
}

// ---- 4 ----------------------------------------------------------------------------------------------------

/// The ClusterIP address of the DistCache's client Service (port 7420).
async fn cache_service(env: &Env, name: &str) -> anyhow::Result<String> {
    let service: Service = Api::namespaced(env.bed.client.clone(), &env.ns).get(name).await?;
    let ip = service.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
    anyhow::ensure!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "Service {name} has no ClusterIP: {ip:?}");
    Ok(format!("{ip}:7420"))
}

/// The project's client of the Service at `addr`, as an application connects (2 s to connect, 5 s per call).
async fn connect(addr: &str) -> Result<Client, distcache_client::Error> {
    Client::builder(format!("http://{addr}"))
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn origin_hits(d: &Deployed) -> anyhow::Result<BTreeMap<String, u64>> {
    let (status, body) = http_get(d.origin, "/_stats").await?;
    anyhow::ensure!(status == 200, "/_stats answered {status}: {body}");
    Ok(serde_json::from_str(&body)?)
}

async fn read_through_service(env: &Env, d: &Deployed) -> anyhow::Result<()> {
    let service = cache_service(env, &d.name).await?;
    // Several rounds, each on a new connection: kube-proxy spreads them over the pods, and every read of a key
    // not yet cached asks its owner, which loads it once.
    for round in 0..6 {
        let client = connect(&service).await?;
        for (user, want) in &d.users {
            let got = client.get(d.keyspace.as_str(), user.as_str()).await;
            let got = got.with_context(|| format!("{user} through {service}, round {round}"))?;
            let got =
                got.ok_or_else(|| anyhow::anyhow!("{user} through {service}, round {round}: not found"))?;
            assert_eq!(&got.value, want, "{user} through the Service {service}, round {round}");
        }
    }
    let hits = origin_hits(d).await?;
    let want: BTreeMap<String, u64> = d.users.keys().map(|u| (format!("{}/{u}", d.users_path), 1)).collect();
    assert_eq!(hits, want, "origin requests after six rounds of reads through the Service");
    // The hook was compiled by the owners of those keys, into their emptyDir.
    let mut cached = 0;
    for pod in node_pods(env, &d.name).await? {
        cached += usize::from(!hook_cache_files(&pod)?.is_empty());
    }
    anyhow::ensure!(cached > 0, "no node pod keeps a compiled hook on its emptyDir");
    Ok(())
}

// ---- 5 ----------------------------------------------------------------------------------------------------

async fn scale(env: &Env, d: &Deployed, replicas: usize) -> anyhow::Result<()> {
    let count = format!("--replicas={replicas}");
    env.kubectl.run(&["scale", "dc", &d.name, "--namespace", &env.ns, &count]).await?;
    wait_ring(env, &d.name, replicas, Duration::from_mins(2)).await
}

// ---- 6 ----------------------------------------------------------------------------------------------------

/// What a reader saw.
#[derive(Debug, Default)]
struct Reads {
    ok: u64,
    failed: u64,
    failures: Vec<String>,
}

/// Reads `keys` through the Service at `addr` about every 10 ms until `stop`, with the project's client
/// (`distcache_client::Client`, as an application reads): on one long-lived client, or on a new client (a new
/// connection) for every read (`fresh`).
fn spawn_service_reader(
    addr: String,
    keyspace: String,
    keys: Vec<(String, Vec<u8>)>,
    fresh: bool,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Reads> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut reads = Reads::default();
        let mut long_lived: Option<Client> = None;
        let mut pace = tokio::time::interval(Duration::from_millis(10));
        let mut i = 0usize;
        while !stop.is_cancelled() && started.elapsed() < Duration::from_mins(5) {
            pace.tick().await;
            let (key, want) = &keys[i % keys.len()];
            i += 1;
            let at = format!("{:.1}s", started.elapsed().as_secs_f64());
            let mut fail = |what: String| {
                reads.failed += 1;
                if reads.failures.len() < 20 {
                    reads.failures.push(format!("{at}: {what}"));
                }
            };
            let client = match &long_lived {
                Some(client) if !fresh => Ok(client.clone()),
                _ => connect(&addr).await,
            };
            let client = match client {
                Ok(client) => client,
                Err(e) => {
                    fail(format!("connecting to {addr}: {e}"));
                    continue;
                }
            };
            if !fresh && long_lived.is_none() {
                long_lived = Some(client.clone());
            }
            match client.get(keyspace.as_str(), key.as_str()).await {
                Ok(Some(value)) if value.value == want.as_slice() => reads.ok += 1,
                Ok(Some(value)) => {
                    fail(format!("{key} answered {:?}", String::from_utf8_lossy(&value.value)));
                }
                Ok(None) => fail(format!("{key}: not found")),
                Err(e) => fail(format!("{key}: {e}")),
            }
        }
        reads
    })
}

async fn roll(env: &Env, d: &Deployed) -> anyhow::Result<()> {
    let service = cache_service(env, &d.name).await?;
    let keys: Vec<(String, Vec<u8>)> = d.users.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let stop = CancellationToken::new();
    let app = spawn_service_reader(service.clone(), d.keyspace.clone(), keys.clone(), false, stop.clone());
    let arrivals = spawn_service_reader(service, d.keyspace.clone(), keys, true, stop.clone());
    let replicas = node_pods(env, &d.name).await?.len();
    let next = format!("{}-next", env.tag);
    let patch = json!({ "spec": { "image": { "tag": next } } }).to_string();
    let rolled = async {
        env.kubectl
            .run(&["patch", "dc", &d.name, "--namespace", &env.ns, "--type=merge", "--patch", &patch])
            .await?;
        let want = format!("localhost/distcache-node:{next}");
        wait_for(Duration::from_mins(4), &format!("every node pod Ready on {want}"), || async {
            let all = node_pods(env, &d.name).await?;
            Ok(all.len() == replicas && all.iter().all(|p| is_ready(p) && pod_image(p) == want))
        })
        .await?;
        wait_ring(env, &d.name, replicas, Duration::from_mins(1)).await
    }
    .await;
    stop.cancel();
    let (app, arrivals) = (app.await?, arrivals.await?);
    eprintln!(
        "rolling update through the Service: long-lived channel {} ok / {} failed, new connections {} ok / {} \
         failed",
        app.ok, app.failed, arrivals.ok, arrivals.failed
    );
    rolled?;
    for (what, reads) in [("the long-lived channel", &app), ("new connections", &arrivals)] {
        assert!(
            reads.failed == 0,
            "{} failed reads on {what} during the roll, first ones:\n{}",
            reads.failed,
            reads.failures.join("\n")
        );
        assert!(reads.ok >= 100, "{what} read only {} times", reads.ok);
    }
    let sets: Api<StatefulSet> = Api::namespaced(env.bed.client.clone(), &env.ns);
    let set = sets.get(&d.name).await?;
    let status = set.status.unwrap_or_default();
    anyhow::ensure!(
        status.current_revision == status.update_revision,
        "the StatefulSet did not finish its roll: {status:?}"
    );
    Ok(())
}

// ---- 7 ----------------------------------------------------------------------------------------------------

async fn dns_discovery(env: &Env) -> anyhow::Result<()> {
    let name = "peers-dns";
    let manifest = json!({
        "apiVersion": "distcache.io/v1alpha1",
        "kind": "DistCache",
        "metadata": { "name": name, "namespace": env.ns },
        "spec": {
            "replicas": 3,
            "discovery": { "dns": { "interval": "2s" } },
            "keyspaces": [{ "name": "notes", "maxBytes": "8Mi", "ttl": "1m" }],
        },
    });
    env.kubectl.run_stdin(&["apply", "-f", "-"], &to_yaml_stream(&[manifest])?).await?;
    wait_ring(env, name, 3, Duration::from_mins(2)).await?;
    // Each node learnt the others from DNS only: it logs the answer of the headless Service's name.
    let pods: Api<Pod> = Api::namespaced(env.bed.client.clone(), &env.ns);
    for pod in node_pods(env, name).await? {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let logs = pods.logs(&pod_name, &kube::api::LogParams::default()).await?;
        anyhow::ensure!(
            logs.contains("DNS answer changed")
                && logs.contains(&format!("{name}-peers.{}.svc.cluster.local", env.ns)),
            "{pod_name} did not log a DNS answer for its headless Service:\n{logs}"
        );
    }
    distcaches(&env.bed.client, &env.ns).delete(name, &DeleteParams::background()).await?;
    Ok(())
}

// ---- 8 ----------------------------------------------------------------------------------------------------

async fn delete_and_uninstall(env: &Env, name: &str) -> anyhow::Result<()> {
    let client = &env.bed.client;
    let uids: Vec<String> =
        node_pods(env, name).await?.iter().filter_map(|p| p.metadata.uid.clone()).collect();
    anyhow::ensure!(!uids.is_empty(), "no node pod before the delete");
    let deleting = Instant::now();
    distcaches(client, &env.ns).delete(name, &DeleteParams::background()).await?;
    let left = Mutex::new(Vec::new());
    let gone = wait_for(Duration::from_mins(2), "every owned object, pod and container gone", || {
        let (left, uids) = (&left, &uids);
        async move {
            let mut now = Vec::new();
            let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &env.ns);
            let services: Api<Service> = Api::namespaced(client.clone(), &env.ns);
            let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &env.ns);
            if sets.get_opt(name).await?.is_some() {
                now.push(format!("StatefulSet {name}"));
            }
            for service in [name.to_owned(), format!("{name}-peers")] {
                if services.get_opt(&service).await?.is_some() {
                    now.push(format!("Service {service}"));
                }
            }
            if maps.get_opt(&format!("{name}-keyspaces")).await?.is_some() {
                now.push(format!("ConfigMap {name}-keyspaces"));
            }
            for dc in ["peers-dns", name] {
                if distcaches(client, &env.ns).get_opt(dc).await?.is_some() {
                    now.push(format!("DistCache {dc}"));
                }
            }
            for pod in node_pods(env, name).await?.into_iter().chain(node_pods(env, "peers-dns").await?) {
                now.push(format!("Pod {}", pod.metadata.name.unwrap_or_default()));
            }
            for uid in uids {
                if !container_processes(uid)?.is_empty() {
                    now.push(format!("container processes of pod {uid}"));
                }
            }
            let done = now.is_empty();
            let mut last = left.lock().expect("not poisoned");
            if *last != now {
                eprintln!("{:>5.1?} after the delete, left: {now:?}", deleting.elapsed());
            }
            *last = now;
            Ok(done)
        }
    })
    .await;
    gone.with_context(|| format!("left: {:?}", left.lock().expect("not poisoned")))?;
    eprintln!(
        "the DistCaches' objects, pods and containers gone {:.1?} after the delete",
        deleting.elapsed()
    );

    let operator: Vec<String> = Api::<Pod>::namespaced(client.clone(), &env.system)
        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
        .await?
        .items
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    let uninstalling = Instant::now();
    env.helm.run(&["uninstall", RELEASE, "--namespace", &env.system]).await?;
    wait_for(Duration::from_mins(1), "the operator pod and its container gone", || async {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &env.system);
        let mut running = false;
        for uid in &operator {
            running |= !container_processes(uid)?.is_empty();
        }
        Ok(pods.list(&ListParams::default().labels(OPERATOR_SELECTOR)).await?.items.is_empty() && !running)
    })
    .await?;
    eprintln!("the operator pod and container gone {:.1?} after helm uninstall", uninstalling.elapsed());
    let crd = Api::<CustomResourceDefinition>::all(client.clone()).get_opt(CRD_NAME).await?;
    anyhow::ensure!(
        crd.is_some_and(|c| c.metadata.deletion_timestamp.is_none()),
        "helm uninstall deleted the CRD"
    );
    Ok(())
}

/// What a failed run leaves to read: pods, events and the last log lines of every pod in the test namespaces.
async fn diagnose(env: &Env) {
    for ns in [&env.system, &env.ns] {
        for args in [vec!["get", "pods,svc,endpoints,dc,statefulsets", "-o", "wide"], vec!["get", "events"]] {
            let mut args = args;
            args.extend(["--namespace", ns.as_str()]);
            match env.kubectl.run(&args).await {
                Ok(out) => eprintln!("--- kubectl {}\n{out}", args.join(" ")),
                Err(e) => eprintln!("--- kubectl {}: {e:#}", args.join(" ")),
            }
        }
        let pods: Api<Pod> = Api::namespaced(env.bed.client.clone(), ns);
        for pod in pods.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let params = kube::api::LogParams { tail_lines: Some(30), ..Default::default() };
            match pods.logs(&name, &params).await {
                Ok(logs) => eprintln!("--- logs of {ns}/{name}\n{logs}"),
                Err(e) => eprintln!("--- logs of {ns}/{name}: {e}"),
            }
        }
    }
}
