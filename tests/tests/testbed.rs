//! Self-test of the Kubernetes test bed: a StatefulSet of three `distcache-node` pods, created through the real
//! API server, run by the test kubelet, recreated by the real StatefulSet controller, and garbage-collected by
//! the real controller-manager.

use std::{net::SocketAddr, time::Duration};

use distcache_proto::v1::{GetRequest, ListKeySpacesRequest, PutRequest};
use distcache_tests::{
    testbed::{self, Testbed, is_ready, node_statefulset, pod_dir},
    wait_for,
};
use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{ConfigMap, Pod, Secret},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};

const NODE_YAML: &str =
    "discovery: { standalone: {} }\nkeyspacesFile: keyspaces.yaml\nkeyspacesPollInterval: 200ms\n";
const KEYSPACES_YAML: &str = "keyspaces:\n  - { name: kv, maxBytes: 1Mi }\n";

fn statefulset(name: &str, replicas: i32) -> anyhow::Result<StatefulSet> {
    Ok(serde_json::from_value(node_statefulset(name, replicas, None))?)
}

async fn ready_pods(pods: &Api<Pod>, app: &str) -> anyhow::Result<Vec<Pod>> {
    let list = pods.list(&ListParams::default().labels(&format!("app={app}"))).await?;
    Ok(list.items.into_iter().filter(is_ready).collect())
}

fn grpc_addr(pod: &Pod) -> anyhow::Result<SocketAddr> {
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).ok_or_else(|| anyhow::anyhow!("no podIP"))?;
    Ok(format!("{ip}:7420").parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_of_nodes_runs_recovers_and_is_garbage_collected() -> anyhow::Result<()> {
    let bed = Testbed::connect().await?;
    let ns = bed.namespace("sts").await?;
    let cms: Api<ConfigMap> = Api::namespaced(bed.client.clone(), &ns.name);
    let config: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "dc-config" },
        "data": { "node.yaml": NODE_YAML, "keyspaces.yaml": KEYSPACES_YAML }
    }))?;
    cms.create(&PostParams::default(), &config).await?;
    let sets: Api<StatefulSet> = Api::namespaced(bed.client.clone(), &ns.name);
    sets.create(&PostParams::default(), &statefulset("dc", 3)?).await?;
    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), &ns.name);

    wait_for(Duration::from_mins(1), "3 Ready pods", || async {
        Ok(ready_pods(&pods, "dc").await?.len() == 3)
    })
    .await?;
    let ready = ready_pods(&pods, "dc").await?;
    let mut ips = Vec::new();
    for pod in &ready {
        let addr = grpc_addr(pod)?;
        ips.push(addr);
        let mut c = distcache_tests::client(addr).await?;
        let name = pod.metadata.name.clone().unwrap_or_default();
        c.put(PutRequest { keyspace: "kv".into(), key: "who".into(), value: name.clone().into(), ttl: None })
            .await?;
        let v = c.get(GetRequest { keyspace: "kv".into(), key: "who".into() }).await?.into_inner();
        assert_eq!(v.value, name.as_bytes(), "standalone node at {addr} answers for itself");
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3, "every pod has its own address: {ips:?}");

    // A deleted pod is recreated by the StatefulSet controller and run again.
    let victim = ready.iter().find(|p| p.metadata.name.as_deref() == Some("dc-1")).cloned().expect("dc-1");
    let old_uid = victim.metadata.uid.clone();
    pods.delete("dc-1", &DeleteParams::default()).await?;
    wait_for(Duration::from_mins(1), "dc-1 recreated and Ready", || async {
        Ok(ready_pods(&pods, "dc")
            .await?
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some("dc-1") && p.metadata.uid != old_uid))
    })
    .await?;
    let fresh = ready_pods(&pods, "dc").await?;
    let dc1 = fresh.iter().find(|p| p.metadata.name.as_deref() == Some("dc-1")).expect("dc-1");
    let mut c = distcache_tests::client(grpc_addr(dc1)?).await?;
    let err =
        c.get(GetRequest { keyspace: "kv".into(), key: "who".into() }).await.expect_err("a new process");
    assert_eq!(err.code(), tonic::Code::NotFound, "the recreated pod runs a fresh node: {err:?}");

    // Deleting the StatefulSet: the garbage collector deletes the pods, the kubelet stops every process.
    let addrs: Vec<SocketAddr> = fresh.iter().map(grpc_addr).collect::<anyhow::Result<_>>()?;
    sets.delete("dc", &DeleteParams::background()).await?;
    wait_for(Duration::from_mins(1), "every pod gone", || async {
        Ok(pods.list(&ListParams::default().labels("app=dc")).await?.items.is_empty())
    })
    .await?;
    for addr in addrs {
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "a process still listens on {addr}");
    }
    ns.delete().await?;
    Ok(())
}

/// Lets the namespace's default ServiceAccount read pods (a Role and its RoleBinding).
async fn grant_pod_reader(client: &kube::Client, namespace: &str) -> anyhow::Result<()> {
    let roles: Api<Role> = Api::namespaced(client.clone(), namespace);
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": { "name": "pod-reader" },
                "rules": [{ "apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"] }]
            }))?,
        )
        .await?;
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), namespace);
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": { "name": "pod-reader" },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader" },
                "subjects": [{ "kind": "ServiceAccount", "name": "default", "namespace": namespace }]
            }))?,
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_see_configmap_updates_get_real_rbac_and_are_restarted_after_a_crash() -> anyhow::Result<()> {
    let bed = Testbed::connect().await?;
    let ns = bed.namespace("pod").await?;
    let cms: Api<ConfigMap> = Api::namespaced(bed.client.clone(), &ns.name);
    let config = |keyspaces: &str| -> anyhow::Result<ConfigMap> {
        Ok(serde_json::from_value(serde_json::json!({
            "metadata": { "name": "one-config" },
            "data": { "node.yaml": NODE_YAML, "keyspaces.yaml": keyspaces }
        }))?)
    };
    cms.create(&PostParams::default(), &config(KEYSPACES_YAML)?).await?;
    let secrets: Api<Secret> = Api::namespaced(bed.client.clone(), &ns.name);
    let secret = |token: &str| -> anyhow::Result<Secret> {
        Ok(serde_json::from_value(serde_json::json!({
            "metadata": { "name": "one-secret" }, "stringData": { "token": token }
        }))?)
    };
    secrets.create(&PostParams::default(), &secret("s3cr3t")?).await?;
    // The StatefulSet of the other test, plus a Secret volume.
    let mut set = serde_json::to_value(statefulset("one", 1)?)?;
    let template = set.pointer_mut("/spec/template/spec").ok_or_else(|| anyhow::anyhow!("no pod spec"))?;
    template["volumes"]
        .as_array_mut()
        .ok_or_else(|| anyhow::anyhow!("no volumes"))?
        .push(serde_json::json!({ "name": "secret", "secret": { "secretName": "one-secret" } }));
    template["containers"][0]["volumeMounts"]
        .as_array_mut()
        .ok_or_else(|| anyhow::anyhow!("no mounts"))?
        .push(serde_json::json!({ "name": "secret", "mountPath": "/etc/secret" }));
    let sets: Api<StatefulSet> = Api::namespaced(bed.client.clone(), &ns.name);
    sets.create(&PostParams::default(), &serde_json::from_value(set)?).await?;
    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), &ns.name);
    wait_for(Duration::from_mins(1), "the pod Ready", || async {
        Ok(ready_pods(&pods, "one").await?.len() == 1)
    })
    .await?;
    let pod = ready_pods(&pods, "one").await?.remove(0);
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let addr = grpc_addr(&pod)?;
    let c = distcache_tests::client(addr).await?;

    // 1. A ConfigMap change reaches the mounted file, and the node applies it without a restart.
    let more = format!("{KEYSPACES_YAML}  - {{ name: extra, maxBytes: 1Mi }}\n");
    cms.replace("one-config", &PostParams::default(), &config(&more)?).await?;
    wait_for(Duration::from_secs(30), "keyspace extra served", || {
        let mut c = c.clone();
        async move {
            let list = c.list_key_spaces(ListKeySpacesRequest {}).await?.into_inner();
            Ok(list.keyspaces.iter().any(|k| k.name == "extra"))
        }
    })
    .await?;
    let restarts = |p: &Pod| {
        p.status.as_ref().and_then(|s| s.container_statuses.as_ref()).map_or(0, |c| c[0].restart_count)
    };
    assert_eq!(restarts(&pods.get("one-0").await?), 0, "no restart for a ConfigMap change");

    // A Secret volume is a file at the remapped mount path, and follows the Secret.
    let dir = pod_dir(&ns.name, "one-0", &uid);
    let token = dir.join("root/etc/secret/token");
    assert_eq!(std::fs::read_to_string(&token)?, "s3cr3t");
    secrets.replace("one-secret", &PostParams::default(), &secret("rotated")?).await?;
    wait_for(Duration::from_secs(10), "the rotated Secret in the pod's file", || {
        let token = token.clone();
        async move { Ok(std::fs::read_to_string(&token)? == "rotated") }
    })
    .await?;

    // 2. The process's API credentials are its ServiceAccount's: RBAC decides.
    let file = kube::config::Kubeconfig::read_from(dir.join("kubeconfig"))?;
    let as_pod = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default()).await?,
    )?;
    let pods_as_pod: Api<Pod> = Api::namespaced(as_pod, &ns.name);
    match pods_as_pod.list(&ListParams::default()).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => anyhow::bail!("the default ServiceAccount listed pods: {:?}", other.map(|l| l.items.len())),
    }
    grant_pod_reader(&bed.client, &ns.name).await?;
    wait_for(Duration::from_secs(10), "the Role granted", || {
        let api = pods_as_pod.clone();
        async move { Ok(api.list(&ListParams::default()).await.is_ok()) }
    })
    .await?;

    // 3. A crash (kill -9 behind the kubelet's back) is restarted per restartPolicy Always.
    let pid: i32 = std::fs::read_to_string(dir.join("pid"))?.trim().parse()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
    wait_for(Duration::from_mins(1), "the container restarted and Ready", || async {
        let p = pods.get("one-0").await?;
        Ok(restarts(&p) >= 1 && is_ready(&p))
    })
    .await?;
    let new_pid: i32 = std::fs::read_to_string(dir.join("pid"))?.trim().parse()?;
    assert_ne!(pid, new_pid, "a new process runs");
    // The restarted node starts empty but serves its keyspaces from the (updated) ConfigMap again.
    let mut c = distcache_tests::client(addr).await?;
    let list = c.list_key_spaces(ListKeySpacesRequest {}).await?.into_inner();
    assert!(list.keyspaces.iter().any(|k| k.name == "extra"));
    ns.delete().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_and_helm_of_the_bed_talk_to_its_api_server() -> anyhow::Result<()> {
    let bed = Testbed::connect().await?;
    let ns = bed.namespace("cli").await?;
    let run = |program: std::path::PathBuf, args: Vec<String>| {
        let kubeconfig = bed.kubeconfig.clone();
        async move {
            let out = tokio::process::Command::new(&program)
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(&args)
                .output()
                .await?;
            anyhow::ensure!(
                out.status.success(),
                "{} {args:?}: {}",
                program.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            anyhow::Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    let namespaces =
        run(testbed::kubectl(), vec!["get".into(), "ns".into(), "-o".into(), "name".into()]).await?;
    assert!(namespaces.contains(&format!("namespace/{}", ns.name)), "{namespaces}");
    let version = run(testbed::helm(), vec!["version".into(), "--short".into()]).await?;
    assert!(version.starts_with("v3.17.2"), "{version}");
    let releases =
        run(testbed::helm(), vec!["list".into(), "-n".into(), ns.name.clone(), "-o".into(), "json".into()])
            .await?;
    assert_eq!(releases.trim(), "[]", "helm reached the API server: {releases}");
    ns.delete().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_current_apiextensions_server_enforces_cel_rules() -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    let bed = Testbed::connect().await?;
    let ns = bed.namespace("cel").await?;
    let server = bed.crd_server().await?;
    let group = format!("{}.test.distcache.io", ns.name);
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "metadata": { "name": format!("widgets.{group}") },
        "spec": {
            "group": group,
            "names": { "kind": "Widget", "plural": "widgets", "singular": "widget" },
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": { "spec": {
                        "type": "object",
                        "properties": { "min": { "type": "integer" }, "max": { "type": "integer" } },
                        "x-kubernetes-validations": [{ "rule": "self.min <= self.max", "message": "min must not exceed max" }]
                    } }
                } }
            }]
        }
    }))?;
    let crds: Api<CustomResourceDefinition> = Api::all(server.clone());
    crds.create(&PostParams::default(), &crd).await?;
    let name = format!("widgets.{group}");
    wait_for(Duration::from_secs(30), "the CRD established", || {
        let (crds, name) = (crds.clone(), name.clone());
        async move {
            let crd = crds.get(&name).await?;
            Ok(crd
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True")))
        }
    })
    .await?;
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(&group, "v1", "Widget"), "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(server.clone(), &ns.name, &resource);
    let widget = |name: &str, min: i64, max: i64| -> anyhow::Result<DynamicObject> {
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": format!("{group}/v1"), "kind": "Widget",
            "metadata": { "name": name },
            "spec": { "min": min, "max": max }
        }))?)
    };
    // Right after Established, the server may still be wiring the new resource up (404): retry until it serves.
    let good = widget("good", 1, 2)?;
    wait_for(Duration::from_secs(10), "the good object created", || {
        let (widgets, good) = (widgets.clone(), good.clone());
        async move {
            match widgets.create(&PostParams::default(), &good).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await?;
    // The bad object is refused by the CEL rule, with the rule's message.
    let message = match widgets.create(&PostParams::default(), &widget("bad", 3, 2)?).await {
        Err(kube::Error::Api(e)) if e.code == 422 => e.message.clone(),
        other => anyhow::bail!("the bad object was not refused: {:?}", other.map(|o| o.metadata.name)),
    };
    assert!(message.contains("min must not exceed max"), "{message}");
    crds.delete(&name, &DeleteParams::default()).await?;
    ns.delete().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_kubelet_keeps_its_node_ready_beyond_the_lease_grace_period() -> anyhow::Result<()> {
    use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
    let bed = Testbed::connect().await?;
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), "kube-node-lease");
    let renewed = || async {
        let lease = leases.get("testbed-node").await?;
        lease
            .spec
            .and_then(|s| s.renew_time)
            .map(|t| t.0)
            .ok_or_else(|| anyhow::anyhow!("lease never renewed"))
    };
    let first = renewed().await?;
    // The node-lifecycle controller marks a node NotReady 40 s after its last renewal: watch the lease move on
    // for longer than that.
    wait_for(Duration::from_secs(75), "the lease renewed for 45 s", || async {
        Ok(renewed().await?.duration_since(first) >= k8s_openapi::jiff::SignedDuration::from_secs(45))
    })
    .await?;
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let node = nodes.get("testbed-node").await?;
    let ready = node
        .status
        .and_then(|s| s.conditions)
        .and_then(|c| c.into_iter().find(|c| c.type_ == "Ready"))
        .ok_or_else(|| anyhow::anyhow!("no Ready condition"))?;
    assert_eq!(ready.status, "True", "{ready:?}");
    Ok(())
}
