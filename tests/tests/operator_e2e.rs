//! The operator end to end on the test bed, the way a user meets it:
//! 1. `helm install` of charts/distcache runs the operator (its pod is run by the test kubelet with the chart's
//!    RBAC, through a token of the chart's ServiceAccount), watching the test's namespace;
//! 2. the example origin (examples/k8s/origin.yaml, with 200 more users for the fetch counts below) runs as a pod,
//!    and the example DistCache (examples/k8s/distcache.yaml) reads through the example hook, a ConfigMap module,
//!    from it;
//! 3. the DistCache becomes three Ready node pods, and `kubectl get dc` says so;
//! 4. the `distcache` CLI reads every example user through every node, and the origin was asked once per user;
//! 5. keyspaces added with `kubectl apply` are served by every node without a restart: a cache-aside one, and one
//!    reading through the example hook with every protection set (rate limit, circuit breaker, both stale
//!    windows, refresh ahead, warm-up); each node reports its circuit closed and its warm-up done on
//!    `/admin/keyspaces`, the warm-up asked the origin once per listed key, and reads go through the hook;
//! 6. `kubectl scale dc` to five nodes;
//! 7. a new node image rolls the pods one at a time while a reader that routes like a Service sees no failed read;
//!    the origin requests during the roll are reported against a cold cache's;
//! 8. `kubectl scale dc` from five to two under the same reader: the operator stops one pod at a time (never two
//!    terminating at once, highest ordinal first, `Progressing` saying each step), no read fails, and every key
//!    reads through every node afterwards; the origin requests during the scale-in are reported against a cold
//!    cache's, and at the end of the scenario they must be at most 10 % of it (the nodes hand their entries off
//!    when they stop);
//! 9. a second DistCache of five nodes started together: each pod, when first seen Ready, already has all five in
//!    its ring (pods form one ring before any of them is Ready);
//! 10. TLS: a third DistCache with `spec.tls.secretName` (a CA and a certificate made here with rcgen, whose SANs
//!     are those the operator asks cert-manager for): its pods serve TLS and the CLI reads through them with the
//!     CA (and the nodes reach each other over mutual TLS on the peer port); the Secret is replaced with a
//!     certificate of a new CA, and every node serves it without a restart (same pod UIDs, restartCount 0,
//!     `distcache_tls_reloads_total{result="applied"}` up); its NetworkPolicy is present and correct;
//! 11. the Redis protocol: a fourth DistCache with `spec.resp` (the example's read-through keyspace as its default
//!     keyspace, a password from a Secret): its client Service has the port `resp`, and through every node
//!     `redis-cli GET <user>` and `GET <keyspace>:<user>` return the origin's bytes, loaded once per user for all
//!     nodes; without the password a node answers NOAUTH;
//! 12. deleting the DistCache garbage-collects every object it owned and stops every node process; `helm uninstall`
//!     keeps the CRD.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use distcache_proto::v1::{GetRequest, ListKeySpacesRequest, PurgeKeySpaceRequest, PutRequest};
use distcache_tests::{
    http_get,
    operator::{
        CRD_NAME, Example, PodWatch, Tool, cli, connect, create_hook_config_map, distcaches,
        example_distcache, get_dynamic, manifests, members_seen, node_selector, origin_users, parse_table,
        pod_image, pod_ip, pod_log_tail, pod_pid, process_running, restarts, spawn_reader, step,
        to_yaml_stream, wait_established,
    },
    repo_root,
    testbed::{Testbed, is_ready},
    wait_for,
};
use futures::FutureExt as _;
use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::StatefulSet,
        core::v1::{ConfigMap, Pod, Service, ServiceAccount},
        rbac::v1::{Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Resource,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

/// The Helm release of the operator.
const RELEASE: &str = "distcache";
/// Its pod's labels (charts/distcache/templates/_helpers.tpl).
const OPERATOR_SELECTOR: &str =
    "app.kubernetes.io/name=distcache-operator,app.kubernetes.io/instance=distcache";

/// The test's namespaces and tools.
struct Env {
    bed: Testbed,
    kubectl: Tool,
    helm: Tool,
    /// The operator's release namespace.
    system: String,
    /// The DistCache's namespace (with its hook ConfigMap and the origin).
    ns: String,
}

/// What step 2 deployed.
struct Deployed {
    /// The DistCache's name.
    name: String,
    /// The DistCache as last applied with kubectl.
    applied: Value,
    /// The read-through keyspace of the example and its users (key → the origin's bytes).
    keyspace: String,
    users: BTreeMap<String, Vec<u8>>,
    /// More users of the origin (key → bytes), read in steps 7 and 8 only: enough keys for a fetch count.
    bulk: BTreeMap<String, Vec<u8>>,
    /// The origin's address and the URL path its users are under (`/users`).
    origin: SocketAddr,
    users_path: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_runs_a_distcache_from_helm_install_to_uninstall() -> anyhow::Result<()> {
    let bed = Testbed::connect().await?;
    let system = bed.namespace("op-system").await?;
    let apps = bed.namespace("op-e2e").await?;
    let env = Env {
        kubectl: Tool::kubectl(&bed.kubeconfig),
        helm: Tool::helm(&bed.kubeconfig),
        system: system.name.clone(),
        ns: apps.name.clone(),
        bed,
    };
    let started = Instant::now();
    // A failed assertion panics: catch it, so that the cleanup below runs in every case.
    let outcome = std::panic::AssertUnwindSafe(scenario(&env)).catch_unwind().await;
    eprintln!("scenario took {:.1?}", started.elapsed());
    if !matches!(outcome, Ok(Ok(()))) {
        diagnose(&env).await;
    }
    // Whatever happened: the DistCache's namespace first (the operator may still have to finish it), then the
    // release (its ClusterRole and binding are cluster-wide: a leftover would break the next install).
    apps.delete().await?;
    let _ = env.helm.run(&["uninstall", RELEASE, "--namespace", &env.system]).await;
    system.delete().await?;
    match outcome {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

async fn scenario(env: &Env) -> anyhow::Result<()> {
    step("1. helm install", install_operator(env)).await?;
    let mut deployed = step("2. origin, hook ConfigMap and DistCache", deploy(env)).await?;
    let name = deployed.name.clone();
    step("3. three Ready nodes", wait_available(env, &name, 3, Duration::from_mins(1))).await?;
    step("4. read-through with the CLI", read_through(env, &deployed)).await?;
    step("5. keyspaces added without a restart, one with every protection", add_keyspace(env, &mut deployed))
        .await?;
    step("6. kubectl scale to 5", scale(env, &deployed, 5)).await?;
    step("7. a rolling image change without a failed read", roll(env, &deployed)).await?;
    let fetched = step("8. scale-in 5 → 2 one pod at a time", scale_in(env, &deployed)).await?;
    step("9. five pods started together form one ring", parallel_start(env)).await?;
    step("10. TLS from a Secret, rotated without a restart", tls(env)).await?;
    step("11. the Redis protocol through every node", redis_protocol(env, &deployed)).await?;
    step("12. delete and uninstall", delete_and_uninstall(env, &name)).await?;
    // Checked last, so that the steps after it run whatever it says: it needs the nodes' handoff on SIGTERM.
    anyhow::ensure!(
        fetched.ratio() <= 0.10,
        "scale-in 5→2 asked the source {} times, {:.0}% of a cold cache's {} (at most 10 %: a stopping node \
         hands its entries to their next owners)",
        fetched.during,
        fetched.ratio() * 100.0,
        fetched.cold
    );
    Ok(())
}

/// Origin requests during a change of the cluster, and what reading the same keys from a cold cache costs.
#[derive(Clone, Copy, Debug)]
struct Fetched {
    during: u64,
    cold: u64,
}

impl Fetched {
    fn ratio(self) -> f64 {
        self.during as f64 / self.cold.max(1) as f64
    }

    fn report(self, what: &str) {
        eprintln!(
            "{what}: {} source fetches vs cold baseline {} (ratio {:.2})",
            self.during,
            self.cold,
            self.ratio()
        );
    }
}

// ---- 1 ----------------------------------------------------------------------------------------------------

async fn install_operator(env: &Env) -> anyhow::Result<()> {
    adopt_kept_crd(env).await?;
    let chart = repo_root().join("charts/distcache");
    // The kubelet maps the example.invalid images to the workspace's binaries. The bed's pods share the host
    // network, so the nodes must bind their pod IP (node.listenOnPodIP), not 0.0.0.0.
    let values = format!(
        "operator.image.repository=example.invalid/distcache-operator,operator.image.tag=test,\
         node.image.repository=example.invalid/distcache-node,node.image.tag=test,node.listenOnPodIP=true,\
         watchNamespace={}",
        env.ns
    );
    let chart = chart.display().to_string();
    env.helm.run(&["install", RELEASE, &chart, "--namespace", &env.system, "--set", &values]).await?;
    let pods: Api<Pod> = Api::namespaced(env.bed.client.clone(), &env.system);
    wait_for(Duration::from_mins(1), "the operator pod Ready", || async {
        let list = pods.list(&ListParams::default().labels(OPERATOR_SELECTOR)).await?;
        Ok(list.items.len() == 1 && list.items.iter().all(is_ready))
    })
    .await?;
    wait_established(&env.bed.client, CRD_NAME, Duration::from_secs(30)).await
}

/// A CRD kept by an earlier run's `helm uninstall` (only on a bed that outlived a run: `make test` starts a fresh
/// one) belongs to that run's release; label it for this release so that Helm adopts it, as a user would.
async fn adopt_kept_crd(env: &Env) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(env.bed.client.clone());
    if crds.get_opt(CRD_NAME).await?.is_some() {
        let adopt = json!({ "metadata": {
            "labels": { "app.kubernetes.io/managed-by": "Helm" },
            "annotations": { "meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": env.system }
        }});
        crds.patch(CRD_NAME, &PatchParams::default(), &Patch::Merge(adopt)).await?;
    }
    Ok(())
}

// ---- 2 ----------------------------------------------------------------------------------------------------

async fn deploy(env: &Env) -> anyhow::Result<Deployed> {
    let Example { mut distcache, name, keyspace } = example_distcache()?;
    create_hook_config_map(&env.bed.client, &env.ns, &keyspace).await?;

    let (origin, users, bulk) = start_origin(env).await?;

    // The bed has no cluster DNS and no Service VIPs: the hook reaches the origin at its pod IP, so the example's
    // `http://<service>.<namespace>.svc:<port>/users` becomes `http://<pod IP>:<port>/users` (path kept).
    let mut users_path = String::new();
    for ks in distcache["spec"]["keyspaces"].as_array_mut().into_iter().flatten() {
        let Some(base) = ks["hook"]["config"]["baseUrl"].as_str() else { continue };
        let (scheme, rest) = base.split_once("://").ok_or_else(|| anyhow::anyhow!("baseUrl {base}"))?;
        let path = rest.find('/').map_or("", |i| &rest[i..]).to_owned();
        ks["hook"]["config"]["baseUrl"] = format!("{scheme}://{origin}{path}").into();
        ks["hook"]["allowedHosts"] = json!([origin.to_string()]);
        if ks["name"] == keyspace["name"] {
            path.trim_end_matches('/').clone_into(&mut users_path);
        }
    }
    distcache["metadata"]["namespace"] = env.ns.clone().into();
    env.kubectl.run_stdin(&["apply", "-f", "-"], &to_yaml_stream(&[distcache.clone()])?).await?;
    Ok(Deployed {
        name,
        applied: distcache,
        keyspace: keyspace["name"].as_str().unwrap_or_default().to_owned(),
        users,
        bulk,
        origin,
        users_path,
    })
}

/// How many users the origin serves beyond the example's.
const BULK_USERS: usize = 200;

/// The origin's users: the example's, and more for the fetch counts.
type Users = BTreeMap<String, Vec<u8>>;

/// Applies examples/k8s/origin.yaml in the test's namespace, with [`BULK_USERS`] more users in its ConfigMap, and
/// waits until its pod answers; the origin's address, the users of the manifest's ConfigMap (`<id>.json` →
/// bytes) and the bulk users.
async fn start_origin(env: &Env) -> anyhow::Result<(SocketAddr, Users, Users)> {
    let mut docs = manifests(&repo_root().join("examples/k8s/origin.yaml"))?;
    let mut users = BTreeMap::new();
    let bulk: Users = (0..BULK_USERS)
        .map(|i| {
            let id = format!("bulk-{i:03}");
            let text = format!(
                r#"{{"id":"{id}","name":"Bulk User {i}","plan":"free","padding":"{}"}}"#,
                "x".repeat(64)
            );
            (id, text.into_bytes())
        })
        .collect();
    for doc in &mut docs {
        doc["metadata"]["namespace"] = env.ns.clone().into();
        if doc["kind"] == "ConfigMap" {
            users.extend(origin_users(doc));
            for (id, text) in bulk.iter().chain(&protected_users()) {
                doc["data"][format!("{id}.json")] = String::from_utf8_lossy(text).into_owned().into();
            }
        }
    }
    anyhow::ensure!(
        !users.is_empty(),
        "examples/k8s/origin.yaml serves no users (no ConfigMap with <id>.json)"
    );
    env.kubectl.run_stdin(&["apply", "-f", "-"], &to_yaml_stream(&docs)?).await?;

    let pods: Api<Pod> = Api::namespaced(env.bed.client.clone(), &env.ns);
    let origin_pod = || async {
        let list = pods.list(&ListParams::default()).await?;
        anyhow::Ok(list.items.into_iter().find(|p| pod_image(p).contains("distcache-origin") && is_ready(p)))
    };
    wait_for(Duration::from_secs(30), "the origin pod Ready", || async { Ok(origin_pod().await?.is_some()) })
        .await?;
    let pod = origin_pod().await?.ok_or_else(|| anyhow::anyhow!("the origin pod went away"))?;
    let port = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.ports.as_ref())
        .and_then(|p| p.first())
        .map(|p| p.container_port)
        .ok_or_else(|| anyhow::anyhow!("the origin container declares no port"))?;
    let addr: SocketAddr = format!("{}:{port}", pod_ip(&pod).unwrap_or_default()).parse()?;
    wait_for(Duration::from_secs(10), "the origin answering /_stats", || async {
        Ok(http_get(addr, "/_stats").await.is_ok_and(|(status, _)| status == 200))
    })
    .await?;
    Ok((addr, users, bulk))
}

/// The origin's requests per path (`/_stats`).
async fn origin_hits(d: &Deployed) -> anyhow::Result<BTreeMap<String, u64>> {
    let (status, body) = http_get(d.origin, "/_stats").await?;
    anyhow::ensure!(status == 200, "/_stats answered {status}: {body}");
    Ok(serde_json::from_str(&body)?)
}

/// Requests the origin has answered for the example's users and the bulk ones: the keys of the example keyspace.
/// The protected keyspace's users (step 5) are left out: their warm-up runs again whenever ownership moves.
async fn origin_requests(d: &Deployed) -> anyhow::Result<u64> {
    let hits = origin_hits(d).await?;
    Ok(d.users.keys().chain(d.bulk.keys()).filter_map(|k| hits.get(&format!("{}/{k}", d.users_path))).sum())
}

/// Every user of the origin with its bytes: the example's and the bulk ones.
fn all_keys(d: &Deployed) -> Vec<(String, Vec<u8>)> {
    d.users.iter().chain(&d.bulk).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A cold cache's cost of `keys`: the keyspace purged on every node, then each key read once (through the Ready
/// nodes in turn); the origin requests that took. The keys are cached afterwards.
async fn cold_baseline(env: &Env, d: &Deployed, keys: &[(String, Vec<u8>)]) -> anyhow::Result<u64> {
    let nodes: Vec<String> = ready_nodes(env, &d.name).await?.into_values().collect();
    anyhow::ensure!(!nodes.is_empty(), "no Ready node");
    let mut clients = Vec::new();
    for ip in &nodes {
        clients.push(connect(ip).await?);
    }
    clients[0].purge_key_space(PurgeKeySpaceRequest { keyspace: d.keyspace.clone() }).await?;
    let before = origin_requests(d).await?;
    for (i, (key, want)) in keys.iter().enumerate() {
        let n = i % clients.len();
        let got = clients[n].get(GetRequest { keyspace: d.keyspace.clone(), key: key.clone() }).await;
        let got = got.with_context(|| format!("{key} through {}", nodes[n]))?.into_inner();
        assert_eq!(&got.value, want, "{key} through {} after the purge", nodes[n]);
    }
    Ok(origin_requests(d).await? - before)
}

// ---- 3 ----------------------------------------------------------------------------------------------------

/// The node pods of the DistCache.
async fn node_pods(env: &Env, name: &str) -> anyhow::Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(env.bed.client.clone(), &env.ns);
    Ok(pods.list(&ListParams::default().labels(&node_selector(name))).await?.items)
}

/// The IPs of the Ready node pods, by pod name.
async fn ready_nodes(env: &Env, name: &str) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(node_pods(env, name)
        .await?
        .iter()
        .filter(|p| is_ready(p))
        .filter_map(|p| Some((p.metadata.name.clone()?, pod_ip(p)?)))
        .collect())
}

/// `kubectl get dc <name>` as a row of its table.
async fn kubectl_get_dc(env: &Env, name: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let table = env.kubectl.run(&["get", "dc", name, "--namespace", &env.ns]).await?;
    parse_table(&table)
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("`kubectl get dc` printed {table:?}"))
}

/// Waits until exactly `n` node pods exist and are Ready, each sees the `n` of them as members, `kubectl get dc`
/// prints READY `n` (or `n/n`) and REPLICAS `n`, and the status says `n` ready replicas for the current
/// generation.
async fn wait_available(env: &Env, name: &str, n: usize, within: Duration) -> anyhow::Result<()> {
    let api = distcaches(&env.bed.client, &env.ns);
    let last = Mutex::new(String::new());
    let note = |what: String| *last.lock().expect("not poisoned") = what;
    let waited = wait_for(within, &format!("{n} Ready node pods that see each other"), || {
        let (api, note) = (api.clone(), &note);
        async move {
            let pods = node_pods(env, name).await?;
            let ready = ready_nodes(env, name).await?;
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
            let row = kubectl_get_dc(env, name).await?;
            let want = n.to_string();
            let ready_column = row.get("READY").map(String::as_str).unwrap_or_default();
            if !(ready_column == want || ready_column == format!("{n}/{n}"))
                || row.get("REPLICAS") != Some(&want)
            {
                note(format!("kubectl get dc: {row:?}"));
                return Ok(false);
            }
            let dc = api.get(name).await?;
            let status = &dc.data["status"];
            if status["readyReplicas"] != json!(n)
                || status["observedGeneration"] != json!(dc.metadata.generation)
            {
                note(format!("status {status}"));
                return Ok(false);
            }
            Ok(true)
        }
    })
    .await;
    waited.with_context(|| format!("last seen: {}", last.lock().expect("not poisoned")))
}

// ---- 4 ----------------------------------------------------------------------------------------------------

async fn read_through(env: &Env, d: &Deployed) -> anyhow::Result<()> {
    let nodes = ready_nodes(env, &d.name).await?;
    for (pod, ip) in &nodes {
        let endpoint = format!("http://{ip}:7420");
        for (user, want) in &d.users {
            let got = cli(&endpoint, &["get", &d.keyspace, user]).await?;
            assert_eq!(
                got.trim_end(),
                String::from_utf8_lossy(want).trim_end(),
                "`distcache get {} {user}` through {pod} ({ip})",
                d.keyspace
            );
        }
    }
    // Every user was read through every node, and the origin was asked once per user: the owner's hook loaded
    // it and every other node asked the owner.
    let (_, body) = http_get(d.origin, "/_stats").await?;
    let hits: BTreeMap<String, u64> = serde_json::from_str(&body)?;
    let want: BTreeMap<String, u64> = d.users.keys().map(|u| (format!("{}/{u}", d.users_path), 1)).collect();
    assert_eq!(hits, want, "origin requests after reading every user through every node");

    // The status reports the hook Loaded on every node.
    wait_keyspace_status(env, &d.name, &d.keyspace, "Loaded", nodes.len()).await
}

/// Waits until `status.keyspaces` of the DistCache says `hook` for `keyspace`, served by `nodes` nodes.
async fn wait_keyspace_status(
    env: &Env,
    name: &str,
    keyspace: &str,
    hook: &str,
    nodes: usize,
) -> anyhow::Result<()> {
    let api = distcaches(&env.bed.client, &env.ns);
    let last = Mutex::new(Value::Null);
    let what = format!("status.keyspaces: {keyspace} {hook} on {nodes} nodes");
    let reported = wait_for(Duration::from_secs(30), &what, || {
        let (api, last) = (api.clone(), &last);
        async move {
            let dc = api.get(name).await?;
            let keyspaces = dc.data["status"]["keyspaces"].clone();
            *last.lock().expect("not poisoned") = keyspaces.clone();
            Ok(keyspaces
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["name"] == keyspace && k["hook"] == hook && k["nodesLoaded"] == json!(nodes)))
        }
    })
    .await;
    reported.with_context(|| format!("status.keyspaces: {}", last.lock().expect("not poisoned")))
}

// ---- 5 ----------------------------------------------------------------------------------------------------

async fn add_keyspace(env: &Env, d: &mut Deployed) -> anyhow::Result<()> {
    let before = node_pods(env, &d.name).await?;
    let sets: Api<StatefulSet> = Api::namespaced(env.bed.client.clone(), &env.ns);
    let template_before = sets.get(&d.name).await?.spec.map(|s| s.template);

    let keyspaces =
        d.applied["spec"]["keyspaces"].as_array_mut().ok_or_else(|| anyhow::anyhow!("spec.keyspaces"))?;
    let example = keyspaces
        .iter()
        .find(|k| k["name"] == d.keyspace.as_str())
        .ok_or_else(|| anyhow::anyhow!("keyspace {} not applied", d.keyspace))?;
    let protected = protected_keyspace(&example["hook"]);
    keyspaces.push(json!({ "name": "sessions", "maxBytes": "1Mi" }));
    keyspaces.push(protected);
    env.kubectl.run_stdin(&["apply", "-f", "-"], &to_yaml_stream(std::slice::from_ref(&d.applied))?).await?;

    let api = distcaches(&env.bed.client, &env.ns);
    wait_for(Duration::from_secs(30), "the operator observed the new generation", || async {
        let dc = api.get(&d.name).await?;
        Ok(dc.data["status"]["observedGeneration"] == json!(dc.metadata.generation))
    })
    .await?;
    let nodes = ready_nodes(env, &d.name).await?;
    wait_for(Duration::from_secs(30), "every node serving keyspaces sessions and protected", || async {
        for ip in nodes.values() {
            let mut c = connect(ip).await?;
            let list = c.list_key_spaces(ListKeySpacesRequest {}).await?.into_inner();
            if !["sessions", PROTECTED].iter().all(|name| list.keyspaces.iter().any(|k| k.name == *name)) {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    // Put through each node, read back through all.
    let mut clients = Vec::new();
    for ip in nodes.values() {
        clients.push(connect(ip).await?);
    }
    for (i, writer) in nodes.keys().enumerate() {
        let key = format!("session-{i}");
        clients[i]
            .put(PutRequest {
                keyspace: "sessions".into(),
                key: key.clone(),
                value: format!("written through {writer}").into(),
                ttl: None,
            })
            .await?;
        for (c, reader) in clients.iter_mut().zip(nodes.keys()) {
            let got = c.get(GetRequest { keyspace: "sessions".into(), key: key.clone() }).await?.into_inner();
            assert_eq!(got.value, format!("written through {writer}").as_bytes(), "{key} through {reader}");
        }
    }
    // No pod was replaced or restarted, and none will be: the pod template did not change.
    let after = node_pods(env, &d.name).await?;
    let identity = |pods: &[Pod]| -> Vec<(Option<String>, Option<String>, i32)> {
        pods.iter().map(|p| (p.metadata.name.clone(), p.metadata.uid.clone(), restarts(p))).collect()
    };
    let (before, after) = (identity(&before), identity(&after));
    assert_eq!(after, before, "pods (name, uid, restarts) before and after adding a keyspace");
    assert!(after.iter().all(|(_, _, r)| *r == 0), "no restarts: {after:?}");
    let template_after = sets.get(&d.name).await?.spec.map(|s| s.template);
    assert_eq!(
        template_after, template_before,
        "the StatefulSet's pod template changed: the pods would roll"
    );

    wait_keyspace_status(env, &d.name, "sessions", "None", nodes.len()).await?;
    wait_keyspace_status(env, &d.name, PROTECTED, "Loaded", nodes.len()).await?;
    protections_at_work(d, &nodes).await
}

/// The keyspace of step 5 with every protection.
const PROTECTED: &str = "protected";
/// The origin's users of that keyspace: the first [`WARM_KEYS`] are its warm-up list, the others are not.
fn protected_users() -> Users {
    (0..4)
        .map(|i| {
            let id = format!("protected-{i}");
            (id.clone(), format!(r#"{{"id":"{id}","name":"Protected User {i}","plan":"pro"}}"#).into_bytes())
        })
        .collect()
}
/// How many of [`protected_users`] the keyspace warms up.
const WARM_KEYS: usize = 3;

/// A keyspace reading through `hook` (the example's, pointed at the bed's origin) with every protection set.
fn protected_keyspace(hook: &Value) -> Value {
    let warm: Vec<String> = protected_users().into_keys().take(WARM_KEYS).collect();
    json!({
        "name": PROTECTED,
        "maxBytes": "4Mi",
        // Longer than the scenario: no refresh ahead or stale serving changes what the steps after this count.
        "ttl": "30m",
        "hook": hook,
        "rateLimit": { "fetchesPerSecond": 200, "burst": 50 },
        "circuitBreaker": {},
        "staleWhileRevalidate": "30s",
        "staleIfError": "10m",
        "refreshAhead": 0.8,
        "warmUp": { "keys": warm, "fetchesPerSecond": 50 },
    })
}

/// The protected keyspace on every node: the circuit closed and the warm-up done (each node loaded or already
/// held every listed key it owns, and together they own each listed key once) before anyone read a key; the
/// origin was asked once per listed key; every key reads through every node with the origin's bytes.
async fn protections_at_work(d: &Deployed, nodes: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let last = Mutex::new(BTreeMap::new());
    let warmed =
        wait_for(Duration::from_secs(30), "warm-up done with the circuit closed on every node", || {
            let last = &last;
            async move {
                let mut owned = 0;
                let mut done = true;
                for (pod, ip) in nodes {
                    let stats = protected_stats(ip).await?;
                    let warm_up = &stats["warm_up"];
                    let (loaded, present) = (warm_up["loaded"].as_u64(), warm_up["present"].as_u64());
                    done &= stats["circuit_state"] == "closed"
                        && warm_up["done"] == true
                        && warm_up["listed"] == json!(WARM_KEYS)
                        && loaded.zip(present).map(|(l, p)| l + p) == warm_up["owned"].as_u64();
                    owned += warm_up["owned"].as_u64().unwrap_or_default();
                    last.lock().expect("not poisoned").insert(pod.clone(), stats);
                }
                Ok(done && owned == WARM_KEYS as u64)
            }
        })
        .await;
    warmed.with_context(|| {
        format!("stats of {PROTECTED} on each node: {:?}", last.lock().expect("not poisoned"))
    })?;

    let users = protected_users();
    let path = |key: &str| format!("{}/{key}", d.users_path);
    let hits = origin_hits(d).await?;
    for (key, _) in users.iter().take(WARM_KEYS) {
        assert_eq!(hits.get(&path(key)), Some(&1), "origin requests for warm-up key {key}: {hits:?}");
    }
    for (pod, ip) in nodes {
        let mut c = connect(ip).await?;
        for (key, want) in &users {
            let got = c.get(GetRequest { keyspace: PROTECTED.into(), key: key.clone() }).await;
            let got = got.with_context(|| format!("{PROTECTED}/{key} through {pod} ({ip})"))?.into_inner();
            assert_eq!(&got.value, want, "{PROTECTED}/{key} through {pod} ({ip})");
        }
    }
    // The warmed keys were served from the cache, the other one loaded through the hook once for all nodes.
    let hits = origin_hits(d).await?;
    for (i, key) in users.keys().enumerate() {
        assert_eq!(
            hits.get(&path(key)),
            Some(&1),
            "origin requests for {key} (warm-up key: {})",
            i < WARM_KEYS
        );
    }
    Ok(())
}

/// The `stats` of the protected keyspace in the node's `/admin/keyspaces` report.
async fn protected_stats(ip: &str) -> anyhow::Result<Value> {
    let (status, body) = http_get(format!("{ip}:7421").parse()?, "/admin/keyspaces").await?;
    anyhow::ensure!(status == 200, "/admin/keyspaces of {ip} answered {status}: {body}");
    let report: Value = serde_json::from_str(&body)?;
    report["keyspaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|k| k["name"] == PROTECTED)
        .map(|k| k["stats"].clone())
        .ok_or_else(|| anyhow::anyhow!("{ip} does not serve {PROTECTED}: {body}"))
}

// ---- 6 ----------------------------------------------------------------------------------------------------

async fn scale(env: &Env, d: &Deployed, replicas: usize) -> anyhow::Result<()> {
    let to = format!("--replicas={replicas}");
    env.kubectl.run(&["scale", "dc", &d.name, &to, "--namespace", &env.ns]).await?;
    wait_available(env, &d.name, replicas, Duration::from_mins(1)).await?;
    read_everything_everywhere(env, d).await
}

/// Every user (the example's and the bulk ones) read through every Ready node.
async fn read_everything_everywhere(env: &Env, d: &Deployed) -> anyhow::Result<()> {
    for (pod, ip) in ready_nodes(env, &d.name).await? {
        let mut c = connect(&ip).await?;
        for (user, want) in d.users.iter().chain(&d.bulk) {
            let got = c.get(GetRequest { keyspace: d.keyspace.clone(), key: user.clone() }).await;
            let got = got.with_context(|| format!("{user} through {pod} ({ip})"))?.into_inner();
            assert_eq!(&got.value, want, "{user} through {pod} ({ip})");
        }
    }
    Ok(())
}

// ---- 7 ----------------------------------------------------------------------------------------------------

async fn roll(env: &Env, d: &Deployed) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(env.bed.client.clone(), &env.ns);
    let replicas = node_pods(env, &d.name).await?.len();
    let watch = PodWatch::start(pods.clone(), &node_selector(&d.name), replicas).await?;
    let view = watch.view();
    anyhow::ensure!(
        view.serving().len() == replicas,
        "not every pod serves before the roll: {}",
        view.describe()
    );
    let keys = all_keys(d);
    let cold = cold_baseline(env, d, &keys).await?;
    let before = origin_requests(d).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let reader = spawn_reader(view.clone(), &d.keyspace, keys, stop.clone(), Duration::from_secs(150));

    let patch = r#"{"spec":{"image":{"tag":"test2"}}}"#;
    env.kubectl
        .run(&["patch", "dc", &d.name, "--namespace", &env.ns, "--type=merge", "--patch", patch])
        .await?;
    let sets: Api<StatefulSet> = Api::namespaced(env.bed.client.clone(), &env.ns);
    let image = |set: &StatefulSet| {
        set.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.containers.first()?.image.clone())
    };
    let new_image = Mutex::new(None);
    wait_for(Duration::from_secs(20), "the StatefulSet's image tag test2", || {
        let (sets, new_image) = (sets.clone(), &new_image);
        async move {
            let current = image(&sets.get(&d.name).await?).filter(|i| i.ends_with(":test2"));
            let found = current.is_some();
            *new_image.lock().expect("not poisoned") = current;
            Ok(found)
        }
    })
    .await?;
    let new_image = new_image.into_inner().expect("not poisoned").unwrap_or_default();
    let rolled = wait_for(Duration::from_secs(100), "every node pod Ready on the new image", || async {
        let all = node_pods(env, &d.name).await?;
        Ok(all.len() == replicas
            && all.iter().all(|p| is_ready(p) && pod_image(p) == new_image && restarts(p) == 0))
    })
    .await;
    let rolled = match rolled {
        Ok(()) => wait_available(env, &d.name, replicas, Duration::from_secs(30)).await,
        Err(e) => Err(e),
    };
    stop.cancel();
    let reads = reader.await?;
    let (worst, at) = view.worst();
    eprintln!(
        "rolling update: {} reads ok, {} failed; at most {worst} pod(s) unavailable at once",
        reads.ok, reads.failed
    );
    rolled.with_context(|| {
        format!("pods: {}; first failed reads:\n{}", view.describe(), reads.failures.join("\n"))
    })?;
    assert!(
        reads.failed == 0,
        "{} failed reads during the roll, first ones:\n{}",
        reads.failed,
        reads.failures.join("\n")
    );
    assert!(reads.ok >= 100, "the reader read only {} times", reads.ok);
    assert_eq!(worst, 1, "node pods unavailable at once during the roll (at the worst moment: {at})");
    assert!(view.errors().is_empty(), "pod watch errors: {:?}", view.errors());
    let dc = distcaches(&env.bed.client, &env.ns).get(&d.name).await?;
    assert_eq!(dc.data["status"]["updatedReplicas"], json!(replicas), "status: {}", dc.data["status"]);
    read_everything_everywhere(env, d).await?;
    Fetched { during: origin_requests(d).await? - before, cold }.report("rolling update");
    Ok(())
}

// ---- 8 ----------------------------------------------------------------------------------------------------

/// `kubectl scale dc` from five to two while a reader reads every user through the serving pods: the operator
/// stops one pod at a time (highest ordinal first, never two terminating at once, each step in the Progressing
/// condition and an Event), no read fails, every user reads through every node afterwards. The origin requests
/// from the scale until after that last read, against a cold cache's.
async fn scale_in(env: &Env, d: &Deployed) -> anyhow::Result<Fetched> {
    let pods: Api<Pod> = Api::namespaced(env.bed.client.clone(), &env.ns);
    let names: Vec<String> =
        node_pods(env, &d.name).await?.iter().filter_map(|p| p.metadata.name.clone()).collect();
    anyhow::ensure!(names.len() == 5, "five node pods before the scale-in: {names:?}");
    let keys = all_keys(d);
    let cold = cold_baseline(env, d, &keys).await?;
    // Two must serve throughout (the target); what the watch records of the terminating ones is the point.
    let watch = PodWatch::start(pods, &node_selector(&d.name), 2).await?;
    let view = watch.view();
    let stop = tokio_util::sync::CancellationToken::new();
    let progress = spawn_progress_recorder(env, &d.name, stop.clone());
    let before = origin_requests(d).await?;
    let reader = spawn_reader(view.clone(), &d.keyspace, keys, stop.clone(), Duration::from_secs(150));

    env.kubectl.run(&["scale", "dc", &d.name, "--replicas=2", "--namespace", &env.ns]).await?;
    // Three steps of a stopping node each (shutdown delay, handoff, drain), one after the other.
    let done = wait_available(env, &d.name, 2, Duration::from_secs(150)).await;
    stop.cancel();
    let reads = reader.await?;
    let progress = progress.await?;
    let (terminating, at) = view.most_terminating();
    let (short, short_at) = view.worst();
    eprintln!(
        "scale-in 5→2: {} reads ok, {} failed; at most {terminating} pod(s) terminating at once; stopped in the \
         order {:?}; at worst {short} of 2 pods not serving ({short_at}); Progressing said {progress:#?}",
        reads.ok,
        reads.failed,
        view.stopped(),
    );
    done.with_context(|| {
        format!("pods: {}; first failed reads:\n{}", view.describe(), reads.failures.join("\n"))
    })?;
    assert!(
        reads.failed == 0,
        "{} failed reads during the scale-in, first ones:\n{}",
        reads.failed,
        reads.failures.join("\n")
    );
    assert!(reads.ok >= 100, "the reader read only {} times", reads.ok);
    assert_eq!(
        terminating, 1,
        "node pods terminating at once during the scale-in (at the worst moment: {at})"
    );
    let name = &d.name;
    assert_eq!(view.stopped(), [format!("{name}-4"), format!("{name}-3"), format!("{name}-2")]);
    assert!(view.errors().is_empty(), "pod watch errors: {:?}", view.errors());
    for step in ["5 → 4", "4 → 3", "3 → 2"] {
        let said = format!("scaling in: {step} of target 2");
        assert!(
            progress.iter().any(|m| m.starts_with(&said)),
            "Progressing never said {said:?}: {progress:?}"
        );
    }
    let notes = events(env, &d.name, "ScalingIn").await?;
    assert_eq!(notes.len(), 3, "one ScalingIn Event per step: {notes:?}");
    assert_eq!(events(env, &d.name, "ScaledIn").await?.len(), 1, "one ScaledIn Event at the end");

    read_everything_everywhere(env, d).await?;
    let fetched = Fetched { during: origin_requests(d).await? - before, cold };
    fetched.report("scale-in 5→2");
    Ok(fetched)
}

/// The distinct `Progressing` messages with reason ScalingIn of DistCache `name`, looked at every 100 ms until
/// `stop` (or for at most 3 minutes).
fn spawn_progress_recorder(
    env: &Env,
    name: &str,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Vec<String>> {
    let (api, name) = (distcaches(&env.bed.client, &env.ns), name.to_owned());
    tokio::spawn(async move {
        let mut seen: Vec<String> = Vec::new();
        let deadline = Instant::now() + Duration::from_mins(3);
        let mut every = tokio::time::interval(Duration::from_millis(100));
        while !stop.is_cancelled() && Instant::now() < deadline {
            every.tick().await;
            let Ok(dc) = api.get(&name).await else { continue };
            for c in dc.data["status"]["conditions"].as_array().into_iter().flatten() {
                if c["type"] == "Progressing"
                    && c["reason"] == "ScalingIn"
                    && let Some(message) = c["message"].as_str()
                    && !seen.iter().any(|m| m == message)
                {
                    seen.push(message.to_owned());
                }
            }
        }
        seen
    })
}

/// The notes of the Events of `reason` about DistCache `name`.
async fn events(env: &Env, name: &str, reason: &str) -> anyhow::Result<Vec<String>> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.bed.client.clone(), &env.ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.note.unwrap_or_default())
        .collect())
}

// ---- 9 ----------------------------------------------------------------------------------------------------

/// A new DistCache of five nodes, whose pods start together (the StatefulSet manages them in parallel): each node,
/// at the moment it turns ready (its `/readyz`, polled every 20 ms from the moment its pod has an address) and
/// when its pod is first seen Ready, already has all five in its ring (`/admin/peers`) — above all the first one:
/// no node becomes ready with a ring of itself. Then it is deleted.
async fn parallel_start(env: &Env) -> anyhow::Result<()> {
    const NAME: &str = "wide";
    const N: usize = 5;
    let pods: Api<Pod> = Api::namespaced(env.bed.client.clone(), &env.ns);
    let watch = PodWatch::start(pods, &node_selector(NAME), N).await?;
    let view = watch.view();
    let distcache = json!({
        "apiVersion": "distcache.io/v1alpha1",
        "kind": "DistCache",
        "metadata": { "name": NAME, "namespace": env.ns },
        "spec": { "replicas": N, "keyspaces": [{ "name": "sessions", "maxBytes": "1Mi" }] },
    });
    env.kubectl.run_stdin(&["apply", "-f", "-"], &to_yaml_stream(&[distcache])?).await?;
    let all: std::collections::BTreeSet<String> = (0..N).map(|i| format!("{NAME}-{i}")).collect();
    let ring = |pod: &str, seen: anyhow::Result<distcache_tests::operator::Peers>| match seen {
        Ok(seen) if seen.local == pod && seen.members == all => "all five".to_owned(),
        Ok(seen) => format!("{} sees {:?}", seen.local, seen.members),
        Err(e) => format!("/admin/peers: {e:#}"),
    };
    // Pod name → its ring when its node turned ready, and when its pod was first seen Ready; in that order.
    let node_ready: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
    let pod_ready: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
    let known = |list: &Mutex<Vec<(String, String)>>, pod: &str| {
        list.lock().expect("not poisoned").iter().any(|(name, _)| name == pod)
    };
    let waited = wait_for(Duration::from_secs(90), "five Ready pods, each asked as it turned ready", || {
        let (view, node_ready, pod_ready, ring, known) = (&view, &node_ready, &pod_ready, &ring, &known);
        async move {
            for pod in view.addressed() {
                if known(node_ready, &pod.name) {
                    continue;
                }
                let ready = http_get(format!("{}:7421", pod.ip).parse()?, "/readyz").await;
                if ready.is_ok_and(|(status, _)| status == 200) {
                    let answer = ring(&pod.name, members_seen(&pod.ip).await);
                    node_ready.lock().expect("not poisoned").push((pod.name, answer));
                }
            }
            for pod in view.serving() {
                if !known(pod_ready, &pod.name) {
                    let answer = ring(&pod.name, members_seen(&pod.ip).await);
                    pod_ready.lock().expect("not poisoned").push((pod.name, answer));
                }
            }
            Ok(pod_ready.lock().expect("not poisoned").len() == N)
        }
    })
    .await;
    let (node_ready, pod_ready) =
        (node_ready.into_inner().expect("not poisoned"), pod_ready.into_inner().expect("not poisoned"));
    eprintln!(
        "five pods started together; rings in the order the nodes turned ready: {node_ready:?}; in the order \
         the pods were seen Ready: {pod_ready:?}"
    );
    waited.with_context(|| format!("pods: {}", view.describe()))?;
    let (first, answer) = &pod_ready[0];
    assert_eq!(answer, "all five", "the first pod seen Ready, {first}, did not see the other four");
    let (first, answer) = node_ready.first().ok_or_else(|| anyhow::anyhow!("no node seen turning ready"))?;
    assert_eq!(answer, "all five", "the first node to turn ready, {first}, did not see the other four");
    for (when, list) in [("turned ready", &node_ready), ("was seen Ready", &pod_ready)] {
        assert!(
            list.iter().all(|(_, a)| a == "all five"),
            "a node {when} before it saw the other four: {list:?}"
        );
    }
    let api = distcaches(&env.bed.client, &env.ns);
    api.delete(NAME, &DeleteParams::background()).await?;
    wait_for(Duration::from_mins(1), "the five-node DistCache's pods gone", || async {
        Ok(node_pods(env, NAME).await?.is_empty() && api.get_opt(NAME).await?.is_none())
    })
    .await
}

// ---- 10 ---------------------------------------------------------------------------------------------------

/// A test CA (rcgen): X.509 v3 with CA basic constraints, as rustls requires.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        Ok(Self { issuer: rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate()?)? })
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for the nodes (server and client auth, as peers use it both ways): PEM chain and key.
    fn leaf(&self, dns_names: &[String]) -> anyhow::Result<(String, String)> {
        let mut params = rcgen::CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, dns_names[0].clone());
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages =
            vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The SANs the operator asks cert-manager for (operator/src/controller/build.rs `certificate_dns_names`): the
/// client Service in every form, the headless Service, and every pod as a wildcard on it. No pod IPs: peers dial
/// each other by IP and check a peer's certificate for the SANs of their own.
fn node_dns_names(name: &str, namespace: &str) -> Vec<String> {
    let peers = format!("{name}-peers.{namespace}.svc");
    vec![
        name.to_owned(),
        format!("{name}.{namespace}"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.cluster.local"),
        peers.clone(),
        format!("{peers}.cluster.local"),
        format!("*.{peers}"),
        format!("*.{peers}.cluster.local"),
    ]
}

fn tls_secret(
    name: &str,
    cert: &str,
    key: &str,
    ca: &str,
) -> anyhow::Result<k8s_openapi::api::core::v1::Secret> {
    let data = [("tls.crt", cert), ("tls.key", key), ("ca.crt", ca)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect();
    Ok(k8s_openapi::api::core::v1::Secret {
        data: Some(data),
        type_: Some("kubernetes.io/tls".to_owned()),
        ..serde_json::from_value(json!({ "metadata": { "name": name } }))?
    })
}

/// The `distcache` CLI over TLS to one node: the CA file and the name to verify (the client Service's short
/// name, a SAN of the nodes' certificate).
async fn cli_tls(ip: &str, ca: &std::path::Path, server_name: &str, args: &[&str]) -> anyhow::Result<String> {
    let ca = ca.display().to_string();
    let mut all = vec!["--tls-ca", ca.as_str(), "--tls-server-name", server_name];
    all.extend_from_slice(args);
    cli(&format!("https://{ip}:7420"), &all).await
}

/// `distcache_tls_reloads_total{result="applied"}` of the node at `ip` (0 before the first).
async fn tls_reloads_applied(ip: &str) -> anyhow::Result<f64> {
    let (status, text) = http_get(format!("{ip}:7421").parse()?, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics of {ip} answered {status}");
    Ok(text
        .lines()
        .find(|l| l.starts_with("distcache_tls_reloads_total{") && l.contains(r#"result="applied""#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0))
}

async fn tls(env: &Env) -> anyhow::Result<()> {
    const NAME: &str = "secure";
    const SECRET: &str = "secure-certs";
    let dir = tempfile::tempdir()?;
    let names = node_dns_names(NAME, &env.ns);
    let ca1 = Ca::new("distcache e2e CA 1")?;
    let (cert, key) = ca1.leaf(&names)?;
    let ca1_file = dir.path().join("ca1.pem");
    std::fs::write(&ca1_file, ca1.pem())?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(env.bed.client.clone(), &env.ns);
    secrets.create(&PostParams::default(), &tls_secret(SECRET, &cert, &key, &ca1.pem())?).await?;
    let distcache = json!({
        "apiVersion": "distcache.io/v1alpha1",
        "kind": "DistCache",
        "metadata": { "name": NAME, "namespace": env.ns },
        "spec": {
            "replicas": 2,
            "keyspaces": [{ "name": "sessions", "maxBytes": "1Mi" }],
            "tls": { "secretName": SECRET },
        },
    });
    env.kubectl.run_stdin(&["apply", "-f", "-"], &to_yaml_stream(&[distcache])?).await?;
    wait_available(env, NAME, 2, Duration::from_secs(90)).await?;
    let api = distcaches(&env.bed.client, &env.ns);
    wait_for(Duration::from_secs(30), "TLSReady True", || async {
        let dc = api.get(NAME).await?;
        Ok(dc.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "TLSReady" && c["status"] == "True" && c["reason"] == "SecretReady"))
    })
    .await?;
    let nodes = ready_nodes(env, NAME).await?;
    let before = node_pods(env, NAME).await?;
    reads_over_tls(&nodes, &ca1_file).await?;
    let mut applied = BTreeMap::new();
    for (pod, ip) in &nodes {
        applied.insert(pod.clone(), tls_reloads_applied(ip).await?);
    }

    // Rotation: a certificate of a new CA, with both CAs trusted while the nodes roll over (each node reloads
    // on its own; peers must accept both meanwhile). Nothing else changes: no pod is replaced.
    let ca2 = Ca::new("distcache e2e CA 2")?;
    let (cert, key) = ca2.leaf(&names)?;
    let ca2_file = dir.path().join("ca2.pem");
    std::fs::write(&ca2_file, ca2.pem())?;
    let bundle = format!("{}{}", ca1.pem(), ca2.pem());
    secrets.replace(SECRET, &PostParams::default(), &tls_secret(SECRET, &cert, &key, &bundle)?).await?;
    rotated(&nodes, &applied, &ca2_file).await?;
    let after = node_pods(env, NAME).await?;
    let identity = |pods: &[Pod]| -> Vec<(Option<String>, Option<String>, i32)> {
        pods.iter().map(|p| (p.metadata.name.clone(), p.metadata.uid.clone(), restarts(p))).collect()
    };
    assert_eq!(
        identity(&after),
        identity(&before),
        "pods (name, uid, restarts) before and after the rotation"
    );
    assert!(identity(&after).iter().all(|(_, _, r)| *r == 0), "no restarts: {:?}", identity(&after));
    network_policy_of(env, NAME).await?;

    api.delete(NAME, &DeleteParams::background()).await?;
    wait_for(Duration::from_mins(1), "the TLS DistCache's pods gone", || async {
        Ok(node_pods(env, NAME).await?.is_empty() && api.get_opt(NAME).await?.is_none())
    })
    .await
}

/// The pods serve TLS: the CLI reads and writes through each with the CA. Keys written through one node and
/// owned by the other travel over the peer port, which the nodes guard with mutual TLS. A plain-text client
/// gets nothing.
async fn reads_over_tls(nodes: &BTreeMap<String, String>, ca: &std::path::Path) -> anyhow::Result<()> {
    const NAME: &str = "secure";
    let keys: Vec<String> = (0..8).map(|i| format!("key-{i}")).collect();
    let ips: Vec<&String> = nodes.values().collect();
    for (i, key) in keys.iter().enumerate() {
        let value = format!("value-{i}");
        cli_tls(ips[i % ips.len()], ca, NAME, &["put", "sessions", key, &value]).await?;
    }
    for (pod, ip) in nodes {
        for (i, key) in keys.iter().enumerate() {
            let got = cli_tls(ip, ca, NAME, &["get", "sessions", key]).await?;
            assert_eq!(
                got.trim_end(),
                format!("value-{i}"),
                "`distcache get sessions {key}` through {pod} over TLS"
            );
        }
        assert!(
            cli(&format!("http://{ip}:7420"), &["get", "sessions", "key-0"]).await.is_err(),
            "{pod} answers a plain-text client"
        );
    }
    Ok(())
}

/// Waits until every node serves the certificate of CA 2 (only it chains to CA 2 alone), checks that each
/// counted the reload, and that the nodes still reach each other: keys written through each node read back
/// through all.
async fn rotated(
    nodes: &BTreeMap<String, String>,
    applied: &BTreeMap<String, f64>,
    ca2_file: &std::path::Path,
) -> anyhow::Result<()> {
    const NAME: &str = "secure";
    for (pod, ip) in nodes {
        let last = Mutex::new(String::new());
        let served = wait_for(Duration::from_mins(1), &format!("{pod} serving the new certificate"), || {
            let last = &last;
            async move {
                match cli_tls(ip, ca2_file, NAME, &["get", "sessions", "key-0"]).await {
                    Ok(_) => Ok(true),
                    Err(e) => {
                        *last.lock().expect("not poisoned") = format!("{e:#}");
                        Ok(false)
                    }
                }
            }
        })
        .await;
        served.with_context(|| format!("last error: {}", last.lock().expect("not poisoned")))?;
        let now = tls_reloads_applied(ip).await?;
        assert!(
            now > applied[pod],
            "{pod}: distcache_tls_reloads_total{{result=\"applied\"}} {} → {now}",
            applied[pod]
        );
    }
    for (i, ip) in nodes.values().enumerate() {
        for j in 0..4 {
            let (key, value) = (format!("rotated-{i}-{j}"), format!("v-{i}-{j}"));
            cli_tls(ip, ca2_file, NAME, &["put", "sessions", &key, &value]).await?;
            for (pod, reader) in nodes {
                let got = cli_tls(reader, ca2_file, NAME, &["get", "sessions", &key]).await?;
                assert_eq!(got.trim_end(), value, "{key} through {pod} after the rotation");
            }
        }
    }
    Ok(())
}

/// The NetworkPolicy: the peer port only from this DistCache's pods, client and admin ports from anywhere. The
/// bed enforces no NetworkPolicy (its pods are processes on the host's loopback, with no network plugin), so
/// this checks the object a cluster's network plugin would enforce, not the traffic.
async fn network_policy_of(env: &Env, name: &str) -> anyhow::Result<()> {
    let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        Api::namespaced(env.bed.client.clone(), &env.ns);
    let policy = policies.get(name).await?;
    let own_pods = json!({ "matchLabels": { "app.kubernetes.io/name": "distcache", "app.kubernetes.io/instance": name } });
    let spec =
        serde_json::to_value(policy.spec.ok_or_else(|| anyhow::anyhow!("NetworkPolicy without spec"))?)?;
    assert_eq!(spec["podSelector"], own_pods);
    assert_eq!(spec["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        spec["ingress"],
        json!([
            { "from": [{ "podSelector": own_pods }], "ports": [{ "port": 7422, "protocol": "TCP" }] },
            { "ports": [{ "port": 7420, "protocol": "TCP" }, { "port": 7421, "protocol": "TCP" }] },
        ])
    );
    Ok(())
}

// ---- 11 ---------------------------------------------------------------------------------------------------

/// The RESP port of step 11. Not Redis's 6379: a redis-server on the test machine (`make bench`) may hold it on
/// 0.0.0.0, and the bed's pods share the host's network.
const RESP_PORT: u16 = 16379;

/// A DistCache of two nodes with the Redis-protocol front end, reading through the example's hook keyspace, which
/// is also its default keyspace, with a password from a Secret (stored with a trailing newline, which the node
/// ignores). Its client Service carries the port `resp`, which names the pods' container port; through that port
/// of every node `redis-cli GET <user>` and `GET <keyspace>:<user>` return the origin's bytes, and the origin was
/// asked once per user for both nodes; without the password a node answers NOAUTH. Then it is deleted.
async fn redis_protocol(env: &Env, d: &Deployed) -> anyhow::Result<()> {
    const NAME: &str = "redis";
    const SECRET: &str = "redis-auth";
    const PASSWORD: &str = "e2e-s3cret";
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(env.bed.client.clone(), &env.ns);
    let secret = k8s_openapi::api::core::v1::Secret {
        data: Some([("password".to_owned(), ByteString(format!("{PASSWORD}\n").into_bytes()))].into()),
        ..serde_json::from_value(json!({ "metadata": { "name": SECRET } }))?
    };
    secrets.create(&PostParams::default(), &secret).await?;
    let keyspace = d.applied["spec"]["keyspaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|k| k["name"] == d.keyspace.as_str())
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("keyspace {} not applied", d.keyspace))?;
    let distcache = json!({
        "apiVersion": "distcache.io/v1alpha1",
        "kind": "DistCache",
        "metadata": { "name": NAME, "namespace": env.ns },
        "spec": {
            "replicas": 2,
            "keyspaces": [keyspace],
            "resp": {
                "enabled": true,
                "port": RESP_PORT,
                "defaultKeyspace": d.keyspace,
                "passwordSecret": { "name": SECRET, "key": "password" },
            },
        },
    });
    env.kubectl.run_stdin(&["apply", "-f", "-"], &to_yaml_stream(&[distcache])?).await?;
    wait_available(env, NAME, 2, Duration::from_secs(90)).await?;

    // Where a Service would send a client of its port `resp`: the pods' container port of that name.
    let service = Api::<Service>::namespaced(env.bed.client.clone(), &env.ns).get(NAME).await?;
    let ports: Vec<(Option<String>, i32, Option<IntOrString>)> = service
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| (p.name.clone(), p.port, p.target_port.clone()))
        .collect();
    let named =
        |name: &str, port: i32| (Some(name.to_owned()), port, Some(IntOrString::String(name.to_owned())));
    assert_eq!(ports, [named("grpc", 7420), named("resp", i32::from(RESP_PORT))], "client Service {NAME}");
    let mut nodes = Vec::new();
    for pod in node_pods(env, NAME).await? {
        let port = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some("resp"))
            .map(|p| p.container_port)
            .ok_or_else(|| anyhow::anyhow!("pod {:?} has no container port resp", pod.metadata.name))?;
        let (name, ip) = (pod.metadata.name.clone().unwrap_or_default(), pod_ip(&pod).unwrap_or_default());
        nodes.push((name, format!("{ip}:{port}")));
    }

    let before = origin_requests(d).await?;
    for (pod, addr) in &nodes {
        for (user, want) in &d.users {
            for key in [user.clone(), format!("{}:{user}", d.keyspace)] {
                let got = redis_cli(addr, Some(PASSWORD), &["GET", &key]).await?;
                assert_eq!(
                    got.trim_end(),
                    String::from_utf8_lossy(want).trim_end(),
                    "`redis-cli GET {key}` through {pod} ({addr})"
                );
            }
        }
        let user = d.users.keys().next().ok_or_else(|| anyhow::anyhow!("no users"))?;
        let refused = redis_cli(addr, None, &["GET", user]).await;
        assert!(
            refused.as_ref().is_err_and(|e| format!("{e:#}").contains("NOAUTH")),
            "`redis-cli GET {user}` without the password through {pod} ({addr}): {refused:?}"
        );
    }
    let fetched = origin_requests(d).await? - before;
    assert_eq!(
        fetched,
        d.users.len() as u64,
        "origin requests for {} users read over RESP through {} nodes, with and without the keyspace prefix",
        d.users.len(),
        nodes.len()
    );

    let api = distcaches(&env.bed.client, &env.ns);
    api.delete(NAME, &DeleteParams::background()).await?;
    wait_for(Duration::from_mins(1), "the RESP DistCache's pods gone", || async {
        Ok(node_pods(env, NAME).await?.is_empty() && api.get_opt(NAME).await?.is_none())
    })
    .await?;
    secrets.delete(SECRET, &DeleteParams::default()).await?;
    Ok(())
}

/// `redis-cli -e -h <host> -p <port> <args>` (the password, if any, through `REDISCLI_AUTH`), within 10 s: its
/// output, or an error with what it printed (`-e`: an error reply such as NOAUTH fails it).
async fn redis_cli(addr: &str, password: Option<&str>, args: &[&str]) -> anyhow::Result<String> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("{addr} is not host:port"))?;
    let mut command = tokio::process::Command::new("redis-cli");
    command
        .args(["-e", "-h", host, "-p", port])
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(password) = password {
        command.env("REDISCLI_AUTH", password);
    }
    let output = tokio::time::timeout(Duration::from_secs(10), command.output())
        .await
        .map_err(|_| anyhow::anyhow!("redis-cli -h {host} -p {port} {args:?} did not finish within 10 s"))?
        .context("cannot run redis-cli (Debian package redis-tools)")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "redis-cli -h {host} -p {port} {}: {}: {stdout}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

// ---- 12 ---------------------------------------------------------------------------------------------------

async fn delete_and_uninstall(env: &Env, name: &str) -> anyhow::Result<()> {
    let client = &env.bed.client;
    let ns = &env.ns;
    let dc = distcaches(client, ns).get(name).await?;
    let uid = dc.metadata.uid.clone().unwrap_or_default();

    // What the DistCache owns, each checked to exist and to be owned by it (so that the garbage collector,
    // not the operator, is what removes it).
    let owned_names = [
        ("ConfigMap", format!("{name}-keyspaces")),
        ("StatefulSet", name.to_owned()),
        ("Service", name.to_owned()),
        ("Service", format!("{name}-peers")),
        ("ServiceAccount", format!("{name}-node")),
        ("Role", format!("{name}-node")),
        ("RoleBinding", format!("{name}-node")),
        ("NetworkPolicy", name.to_owned()),
    ];
    let owners = |refs: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
        refs.into_iter().flatten().any(|r| r.uid == uid && r.kind == "DistCache")
    };
    for (kind, object) in &owned_names {
        let meta =
            get_meta(env, kind, object).await?.ok_or_else(|| anyhow::anyhow!("{kind} {object} missing"))?;
        assert!(
            owners(meta.owner_references.as_ref()),
            "{kind} {object} is not owned by the DistCache: {meta:?}"
        );
    }
    if let Some(pdb) = pdb(env, name).await? {
        assert!(owners(pdb.metadata.owner_references.as_ref()), "the PDB is not owned by the DistCache");
    }

    let processes: Vec<(String, i32)> = node_pods(env, name)
        .await?
        .iter()
        .map(|p| Ok((p.metadata.name.clone().unwrap_or_default(), pod_pid(p)?)))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(
        processes.iter().all(|(_, pid)| process_running(*pid)),
        "a node process is not running: {processes:?}"
    );

    distcaches(client, ns).delete(name, &DeleteParams::background()).await?;
    let last = Mutex::new(Vec::new());
    let gone = wait_for(Duration::from_mins(1), "every owned object and node pod gone", || {
        let (last, owned_names, processes) = (&last, &owned_names, &processes);
        async move {
            let mut left = Vec::new();
            for (kind, object) in owned_names {
                if get_meta(env, kind, object).await?.is_some() {
                    left.push(format!("{kind} {object}"));
                }
            }
            if pdb(env, name).await?.is_some() {
                left.push(format!("PodDisruptionBudget {name}"));
            }
            if distcaches(client, ns).get_opt(name).await?.is_some() {
                left.push(format!("DistCache {name}"));
            }
            for pod in node_pods(env, name).await? {
                left.push(format!("Pod {}", pod.metadata.name.unwrap_or_default()));
            }
            for (pod, pid) in processes {
                if process_running(*pid) {
                    left.push(format!("process {pid} of {pod}"));
                }
            }
            let done = left.is_empty();
            *last.lock().expect("not poisoned") = left;
            Ok(done)
        }
    })
    .await;
    gone.with_context(|| format!("left: {:?}", last.lock().expect("not poisoned")))?;

    let operator = Api::<Pod>::namespaced(client.clone(), &env.system)
        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
        .await?
        .items;
    let operator_pids: Vec<i32> = operator.iter().map(pod_pid).collect::<anyhow::Result<_>>()?;
    env.helm.run(&["uninstall", RELEASE, "--namespace", &env.system]).await?;
    wait_for(Duration::from_secs(30), "the operator pod and process gone", || async {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &env.system);
        Ok(pods.list(&ListParams::default().labels(OPERATOR_SELECTOR)).await?.items.is_empty()
            && !operator_pids.iter().any(|pid| process_running(*pid)))
    })
    .await?;
    let crd = Api::<CustomResourceDefinition>::all(client.clone()).get_opt(CRD_NAME).await?;
    let crd = crd.ok_or_else(|| anyhow::anyhow!("helm uninstall deleted the CRD"))?;
    assert!(crd.metadata.deletion_timestamp.is_none(), "the CRD is being deleted");
    Ok(())
}

/// The metadata of an object of `kind` in the test namespace, if it exists.
async fn get_meta(
    env: &Env,
    kind: &str,
    name: &str,
) -> anyhow::Result<Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>> {
    async fn meta<K>(api: Api<K>, name: &str) -> anyhow::Result<Option<kube::api::ObjectMeta>>
    where
        K: Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
    {
        Ok(api.get_opt(name).await?.map(|o| o.meta().clone()))
    }
    let c = env.bed.client.clone();
    let ns = &env.ns;
    match kind {
        "ConfigMap" => meta(Api::<ConfigMap>::namespaced(c, ns), name).await,
        "StatefulSet" => meta(Api::<StatefulSet>::namespaced(c, ns), name).await,
        "Service" => meta(Api::<Service>::namespaced(c, ns), name).await,
        "ServiceAccount" => meta(Api::<ServiceAccount>::namespaced(c, ns), name).await,
        "Role" => meta(Api::<Role>::namespaced(c, ns), name).await,
        "RoleBinding" => meta(Api::<RoleBinding>::namespaced(c, ns), name).await,
        "NetworkPolicy" => {
            meta(Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(c, ns), name).await
        }
        other => anyhow::bail!("no API for kind {other}"),
    }
}

/// The PodDisruptionBudget of the DistCache, if the operator made one (policy/v1beta1 on the 1.20 bed, policy/v1
/// on newer servers).
async fn pdb(env: &Env, name: &str) -> anyhow::Result<Option<kube::api::DynamicObject>> {
    for version in ["v1", "v1beta1"] {
        let kind = ("policy", version, "PodDisruptionBudget", "poddisruptionbudgets");
        if let Some(pdb) = get_dynamic(&env.bed.client, &env.ns, kind, name).await? {
            return Ok(Some(pdb));
        }
    }
    Ok(None)
}

// ---- on failure -------------------------------------------------------------------------------------------

/// Prints what a reader of a failed run needs: the objects, the DistCache's status, the operator's log and the
/// end of every node's log.
async fn diagnose(env: &Env) {
    let get = [
        "get",
        "distcaches,statefulsets,pods,configmaps,services",
        "-o",
        "wide",
        "--namespace",
        env.ns.as_str(),
    ];
    match env.kubectl.run(&get).await {
        Ok(text) => eprintln!("--- kubectl get (test namespace)\n{text}"),
        Err(e) => eprintln!("--- kubectl get failed: {e:#}"),
    }
    for dc in distcaches(&env.bed.client, &env.ns)
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        eprintln!(
            "--- DistCache {}: generation {:?}, status {:#}",
            dc.metadata.name.as_deref().unwrap_or_default(),
            dc.metadata.generation,
            dc.data["status"]
        );
    }
    for (ns, what) in [(&env.system, "operator"), (&env.ns, "pod")] {
        let pods: Api<Pod> = Api::namespaced(env.bed.client.clone(), ns);
        for pod in pods.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
            let lines = if what == "operator" { 80 } else { 25 };
            eprintln!(
                "--- {what} {}: container.log (last {lines} lines)\n{}",
                pod.metadata.name.as_deref().unwrap_or_default(),
                pod_log_tail(&pod, lines)
            );
        }
    }
}
