//! Kubernetes discovery on the test bed: a StatefulSet of `distcache-node` pods whose nodes find each other by
//! watching their pods with a Role that only allows get/list/watch on pods, scaled 3 → 5 → 2. After each step
//! every node's members are the Ready pods, every key is readable through every node, and a write through one
//! node is read back through all (no node keeps serving a key it no longer owns). A pod that loses readiness
//! stays in the ring (a readiness flap moves no key); a pod whose process exits leaves it until it runs again.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use distcache_proto::v1::{GetRequest, PutRequest};
use distcache_tests::{
    hook_module, http_get,
    testbed::{PrivateBed, Testbed, is_ready, node_statefulset},
    wait_for,
};
use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::StatefulSet,
        core::v1::{ConfigMap, Pod, ServiceAccount},
        rbac::v1::{Role, RoleBinding},
    },
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};

const NODE_YAML: &str = "discovery:\n  kubernetes: { labelSelector: \"app=kd\", portName: peer }\n\
keyspacesFile: keyspaces.yaml\nkeyspacesPollInterval: 200ms\npeerTimeout: 1s\n";
const KEYSPACES_YAML: &str = "keyspaces:\n  - name: rt\n    maxBytes: 4Mi\n    hook:\n      module: { path: hook.wasm }\n      \
config: { mode: echo, prefix: \"v:\" }\n";

async fn create<K>(api: &Api<K>, value: serde_json::Value) -> anyhow::Result<()>
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + k8s_openapi::serde::Serialize
        + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value)?;
    api.create(&PostParams::default(), &object).await?;
    Ok(())
}

fn statefulset() -> serde_json::Value {
    node_statefulset("kd", 3, Some("kd-node"))
}

fn ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref().and_then(|s| s.pod_ip.clone())
}

/// Ready pods by name, with their podIP.
async fn ready(pods: &Api<Pod>) -> anyhow::Result<Vec<(String, String)>> {
    let list = pods.list(&ListParams::default().labels("app=kd")).await?;
    Ok(list
        .items
        .iter()
        .filter(|p| is_ready(p))
        .filter_map(|p| Some((p.metadata.name.clone()?, ip(p)?)))
        .collect())
}

/// The member names a node sees (`/admin/peers`), itself included.
async fn members_seen(ip: &str) -> anyhow::Result<BTreeSet<String>> {
    let (status, body) = http_get(format!("{ip}:7421").parse()?, "/admin/peers").await?;
    anyhow::ensure!(status == 200, "/admin/peers answered {status}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .collect())
}

/// Waits until `n` pods are Ready and every one of them sees exactly the Ready pods as members.
async fn converged(pods: &Api<Pod>, n: usize) -> anyhow::Result<Vec<(String, String)>> {
    wait_for(Duration::from_mins(1), &format!("{n} Ready pods that all see each other"), || async {
        let ready = ready(pods).await?;
        if ready.len() != n {
            return Ok(false);
        }
        let names: BTreeSet<String> = ready.iter().map(|(n, _)| n.clone()).collect();
        for (_, ip) in &ready {
            if members_seen(ip).await.ok().as_ref() != Some(&names) {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    ready(pods).await
}

/// Every key readable through every node, and a write through one node read back through all.
async fn consistent(nodes: &[(String, String)], step: &str) -> anyhow::Result<()> {
    let addrs: Vec<SocketAddr> =
        nodes.iter().map(|(_, ip)| format!("{ip}:7420").parse()).collect::<Result<_, _>>()?;
    let mut clients = Vec::new();
    for a in &addrs {
        clients.push(distcache_tests::client(*a).await?);
    }
    for k in 0..60 {
        let key = format!("k{k}");
        // Half of the keys are overwritten at each step through a different node.
        let expected = if k % 2 == 0 {
            let value = format!("{step}-{k}");
            let writer = &mut clients[k % addrs.len()];
            writer
                .put(PutRequest {
                    keyspace: "rt".into(),
                    key: key.clone(),
                    value: value.clone().into(),
                    ttl: None,
                })
                .await?;
            value
        } else {
            format!("v:{key}")
        };
        for (c, addr) in clients.iter_mut().zip(&addrs) {
            let got = c.get(GetRequest { keyspace: "rt".into(), key: key.clone() }).await?.into_inner().value;
            assert_eq!(got, expected.as_bytes(), "{step}: {key} through {addr}");
        }
    }
    Ok(())
}

/// Creates the nodes' config (with the echo hook), least-privilege RBAC and the StatefulSet `kd` of 3 pods.
async fn deploy(client: &kube::Client, namespace: &str) -> anyhow::Result<(Api<StatefulSet>, Api<Pod>)> {
    let hook = std::fs::read(hook_module("distcache_test_hook")?)?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let mut config: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "kd-config" },
        "data": { "node.yaml": NODE_YAML, "keyspaces.yaml": KEYSPACES_YAML }
    }))?;
    config.binary_data = Some([("hook.wasm".to_owned(), ByteString(hook))].into());
    cms.create(&PostParams::default(), &config).await?;
    // The nodes' least privilege: get/list/watch pods in their namespace.
    create(
        &Api::<ServiceAccount>::namespaced(client.clone(), namespace),
        serde_json::json!({ "metadata": { "name": "kd-node" } }),
    )
    .await?;
    create(
        &Api::<Role>::namespaced(client.clone(), namespace),
        serde_json::json!({
            "metadata": { "name": "kd-node" },
            "rules": [{ "apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"] }]
        }),
    )
    .await?;
    create(
        &Api::<RoleBinding>::namespaced(client.clone(), namespace),
        serde_json::json!({
            "metadata": { "name": "kd-node" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kd-node" },
            "subjects": [{ "kind": "ServiceAccount", "name": "kd-node", "namespace": namespace }]
        }),
    )
    .await?;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    create(&sets, statefulset()).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);

    Ok((sets, pods))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_find_each_other_through_the_api_as_the_statefulset_scales() -> anyhow::Result<()> {
    let bed = Testbed::connect().await?;
    let ns = bed.namespace("kd").await?;
    let (sets, pods) = deploy(&bed.client, &ns.name).await?;
    let nodes = converged(&pods, 3).await?;
    consistent(&nodes, "three").await?;

    for (replicas, step) in [(5, "five"), (2, "two")] {
        sets.patch(
            "kd",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "replicas": replicas } })),
        )
        .await?;
        let nodes = converged(&pods, replicas).await?;
        consistent(&nodes, step).await?;
    }

    readiness_flaps_move_no_key_and_a_crash_does(&sets, &pods).await?;

    sets.delete("kd", &DeleteParams::background()).await?;
    ns.delete().await?;
    Ok(())
}

/// With kd-0 and kd-1 running: kd-1 loses readiness (its Ready condition as a kubelet reports a failed probe)
/// and stays in kd-0's ring — checked when kd-0 sees kd-2, which the StatefulSet creates after the readiness
/// change, so kd-0 has seen that change by then. Then kd-1's process dies behind the kubelet's back: kd-1 leaves
/// kd-0's ring, and rejoins once the kubelet has restarted it.
async fn readiness_flaps_move_no_key_and_a_crash_does(
    sets: &Api<StatefulSet>,
    pods: &Api<Pod>,
) -> anyhow::Result<()> {
    let nodes = ready(pods).await?;
    let ip_of = |name: &str| {
        nodes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, ip)| ip.clone())
            .ok_or_else(|| anyhow::anyhow!("{name}"))
    };
    let watcher_ip = ip_of("kd-0")?;
    ip_of("kd-1")?;
    pods.patch_status(
        "kd-1",
        &PatchParams::default(),
        &Patch::Strategic(
            serde_json::json!({ "status": { "conditions": [{ "type": "Ready", "status": "False" }] } }),
        ),
    )
    .await?;
    sets.patch(
        "kd",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": { "replicas": 3 } })),
    )
    .await?;
    let names = |list: &[&str]| list.iter().map(|n| (*n).to_owned()).collect::<BTreeSet<String>>();
    let seen = std::sync::Mutex::new(BTreeSet::new());
    wait_for(Duration::from_secs(30), "kd-2 in kd-0's ring", || async {
        let members = members_seen(&watcher_ip).await?;
        anyhow::ensure!(members.contains("kd-1"), "kd-1 left kd-0's ring on a readiness change: {members:?}");
        let joined = members.contains("kd-2");
        *seen.lock().expect("not poisoned") = members;
        Ok(joined)
    })
    .await?;
    assert_eq!(*seen.lock().expect("not poisoned"), names(&["kd-0", "kd-1", "kd-2"]));

    let victim = pods.get("kd-1").await?;
    let pid = distcache_tests::operator::pod_pid(&victim)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
    wait_for(Duration::from_secs(20), "kd-1 out of kd-0's ring after its process died", || async {
        Ok(members_seen(&watcher_ip).await? == names(&["kd-0", "kd-2"]))
    })
    .await?;
    wait_for(Duration::from_secs(30), "kd-1 back in kd-0's ring once restarted", || async {
        Ok(members_seen(&watcher_ip).await? == names(&["kd-0", "kd-1", "kd-2"]))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_survives_an_api_server_restart_without_flapping() -> anyhow::Result<()> {
    // A bed of this test's own: restarting the shared bed's API server would disturb the other tests.
    let private = PrivateBed::start(1).await?;
    let bed = &private.bed;
    let ns = bed.namespace("kr").await?;
    let (sets, pods) = deploy(&bed.client, &ns.name).await?;
    let nodes = converged(&pods, 3).await?;
    let ips: Vec<String> = nodes.iter().map(|(_, ip)| ip.clone()).collect();

    // Sample every node's membership throughout the outage: it must never shrink.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampling = {
        let (ips, stop) = (ips.clone(), std::sync::Arc::clone(&stop));
        tokio::spawn(async move {
            let mut samples = 0u32;
            let mut every = tokio::time::interval(Duration::from_millis(100));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                every.tick().await;
                for ip in &ips {
                    let seen = members_seen(ip).await?;
                    anyhow::ensure!(seen.len() == 3, "{ip} saw {seen:?} during the API-server restart");
                    samples += 1;
                }
            }
            anyhow::Ok(samples)
        })
    };
    private.restart("kube-apiserver").await?;
    // The watch recovers: a new pod is seen by everybody.
    sets.patch(
        "kd",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": { "replicas": 4 } })),
    )
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampling.await??;
    assert!(samples > 3, "membership sampled {samples} times");
    let nodes = converged(&pods, 4).await?;
    consistent(&nodes, "after-restart").await?;
    for (_, ip) in &nodes {
        let (_, body) = http_get(format!("{ip}:7421").parse()?, "/admin/peers").await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        assert!(v["discoveryProblem"].is_null(), "{ip}: {body}");
    }
    ns.delete().await?;
    Ok(())
}
