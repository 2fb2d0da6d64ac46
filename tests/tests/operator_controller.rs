//! The operator's reconcile behaviour on a Kubernetes 1.20 API server, where no CEL rule protects it: on a
//! private test bed (its own API server, so the CRD here never meets the Helm release of the end-to-end test),
//! with the operator binary run as a process with the bed's admin credentials.
//!
//! - An invalid DistCache (among its problems a `spec.resp.defaultKeyspace` that names no keyspace) gets
//!   `Degraded=True InvalidSpec` naming every bad field and an `InvalidSpec` Event, no StatefulSet, and never
//!   holds up a valid DistCache in the same namespace; fixing it makes it Available. A DistCache named like a
//!   Service the user has reports `NameConflict` and leaves the Service alone.
//! - 1.20 serves PodDisruptionBudgets only as policy/v1beta1: the operator writes it in that version and says so
//!   in the Degraded condition's message; disabling it in the spec deletes it.
//! - A keyspace whose hook module ConfigMap does not exist yet shows `hook: Failed` with the node's message, a
//!   `KeyspaceRefused` Event, while the other keyspaces keep serving; once the ConfigMap exists every node loads
//!   the hook (`Loaded`, `nodesLoaded` = replicas, one module sha256) and serves reads through it.
//! - `/metrics` counts the reconciliations by result.
//! - Traces: the operator, run with `--otlp-endpoint`, exports a `distcache.reconcile` span per reconcile naming
//!   the DistCache, its namespace and the result (`ok`, `invalid`) to an in-process OTLP collector; the nodes of a
//!   DistCache with `spec.tracing` export theirs to it, each span naming its pod and namespace.
//!
//! A second private bed, for the network and TLS objects (DistCaches of 0 replicas: nothing here needs a node to
//! run):
//! - the client Service exposes only the client port 7420, the headless `<name>-peers` only the peer port 7422,
//!   and the NetworkPolicy `<name>` admits 7422 only from the DistCache's own pods (7420 and 7421 from anywhere);
//!   disabling it deletes it. (The bed enforces no NetworkPolicy: this checks the object, not the traffic.)
//!   `spec.resp` enabled adds its port (`resp`) to the client Service and to the NetworkPolicy's ports open to
//!   anyone, never to the peer Service; disabled again, the port is gone from both.
//! - `spec.tls.secretName`: `TLSReady=False SecretMissing` until the Secret exists, `KeyMissing` naming `ca.crt`
//!   for a kubernetes.io/tls Secret without it, `True SecretReady` once it has it; the pod template mounts the
//!   Secret, and a new certificate in it leaves the StatefulSet alone (the nodes reload it in place).
//! - `spec.tls.certManager` without cert-manager: `Degraded=True CertManagerMissing` with a message that says so.
//!   Then cert-manager's published Certificate CRD (v1.8.2, operator/testdata) is installed: the operator sees the
//!   API at its next look, creates the Certificate `<name>-tls` — accepted by the API server against
//!   cert-manager's schema, which server-side apply enforces down to undeclared fields — and waits for its Secret;
//!   the Secret as cert-manager would issue it makes TLSReady True; switching to secretName deletes the
//!   Certificate.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use distcache_api::{DistCache, HookState};
use distcache_proto::v1::{GetRequest, PutRequest, cache_client::CacheClient};
use distcache_tests::{
    built_binary, hook_module, http_get,
    otlp::{Collector, Span},
    repo_root,
    testbed::PrivateBed,
    wait_for,
};
use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::StatefulSet,
        core::v1::{ConfigMap, Pod, Secret, Service},
        events::v1::Event,
        networking::v1::NetworkPolicy,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};

const NS: &str = "controller";
const OPERATOR_ADDR: &str = "127.0.42.250:18080";
const TLS_OPERATOR_ADDR: &str = "127.0.43.250:18080";

fn dc(name: &str, spec: &serde_json::Value) -> anyhow::Result<DistCache> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "distcache.io/v1alpha1",
        "kind": "DistCache",
        "metadata": { "name": name, "namespace": NS },
        "spec": spec,
    }))?)
}

async fn status_of(api: &Api<DistCache>, name: &str) -> anyhow::Result<distcache_api::DistCacheStatus> {
    Ok(api.get(name).await?.status.unwrap_or_default())
}

fn condition<'a>(
    s: &'a distcache_api::DistCacheStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.conditions.iter().find(|c| c.type_ == type_)
}

/// Waits until the DistCache's status satisfies `ok`; on timeout the error shows the last status seen.
async fn wait_status(
    caches: &Api<DistCache>,
    name: &str,
    within: Duration,
    what: &str,
    ok: impl Fn(&distcache_api::DistCacheStatus) -> bool,
) -> anyhow::Result<()> {
    let ok = &ok;
    let waited = wait_for(within, what, || async move { Ok(ok(&status_of(caches, name).await?)) }).await;
    if let Err(e) = waited {
        let last = serde_json::to_string(&status_of(caches, name).await?)?;
        anyhow::bail!("{e}; last status of {name}: {last}");
    }
    Ok(())
}

async fn events(client: &Client, object: &str, reason: &str) -> anyhow::Result<Vec<String>> {
    let list = Api::<Event>::namespaced(client.clone(), NS).list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.note.unwrap_or_default())
        .collect())
}

async fn ready_pod_ips(client: &Client, instance: &str) -> anyhow::Result<Vec<String>> {
    let pods = Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={instance}")))
        .await?;
    Ok(pods
        .items
        .iter()
        .filter(|p| distcache_tests::testbed::is_ready(p))
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect())
}

/// Installs a CRD from a file of the repository and waits until it is Established.
async fn install_crd(client: &Client, file: &str, name: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(repo_root().join(file))?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text)?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd).await?;
    wait_for(Duration::from_secs(30), &format!("the CRD {name} established"), || {
        let crds = crds.clone();
        async move {
            let crd = crds.get(name).await?;
            Ok(crd
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True")))
        }
    })
    .await
}

/// The DistCache CRD as a 1.20 cluster gets it (no CEL rules), the operator as a process with the bed's admin
/// credentials (metrics on `listen`; with `otlp`, exporting its reconcile spans there), and the test namespace.
async fn start_operator(
    private: &PrivateBed,
    listen: &str,
    otlp: Option<&str>,
) -> anyhow::Result<tokio::process::Child> {
    let client = private.bed.client.clone();
    install_crd(&client, "crds/distcache-without-cel.yaml", "distcaches.distcache.io").await?;
    let operator = tokio::process::Command::new(built_binary("distcache-operator")?)
        .args(["run", "--listen", listen, "--node-listen-on-pod-ip", "--node-image"])
        .arg("example.invalid/distcache-node:test")
        .args(otlp.map(|url| format!("--otlp-endpoint={url}")))
        .env("KUBECONFIG", &private.bed.kubeconfig)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({ "metadata": { "name": NS } }))?,
        )
        .await?;
    Ok(operator)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_reports_invalid_specs_and_refused_keyspaces_and_keeps_reconciling() -> anyhow::Result<()>
{
    let private = PrivateBed::start(42).await?;
    let client = private.bed.client.clone();
    let collector = Collector::start().await?;
    let mut operator = start_operator(&private, OPERATOR_ADDR, Some(&collector.url())).await?;
    let caches: Api<DistCache> = Api::namespaced(client.clone(), NS);
    invalid_specs_and_pod_disruption_budgets(&client, &caches, &collector).await?;
    refused_then_loaded_keyspace(&client, &caches).await?;

    // Metrics of the reconciliations.
    let addr: SocketAddr = OPERATOR_ADDR.parse()?;
    let (code, text) = http_get(addr, "/metrics").await?;
    assert_eq!(code, 200);
    for needle in [
        "distcache_operator_reconciliations_total{result=\"ok\"}",
        "distcache_operator_reconciliations_total{result=\"invalid\"}",
    ] {
        assert!(text.contains(needle), "{needle} in {text}");
    }
    operator.kill().await?;
    Ok(())
}

async fn invalid_specs_and_pod_disruption_budgets(
    client: &Client,
    caches: &Api<DistCache>,
    collector: &Collector,
) -> anyhow::Result<()> {
    // An invalid DistCache next to a valid one.
    let bad = dc(
        "bad",
        &serde_json::json!({
            "replicas": 1,
            "podDisruptionBudget": { "minAvailable": 1, "maxUnavailable": 1 },
            "keyspaces": [
                { "name": "a", "maxBytes": "1Mi",
                  "hook": { "module": { "url": "http://127.0.0.1:1/x.wasm" }, "allowedHosts": ["nohost"] } },
                // Serving stale values needs a data source: without a hook there is nothing to protect.
                { "name": "b", "maxBytes": "1Mi", "staleIfError": "1m" },
            ],
            // The Redis-protocol front end's keys without a prefix would go to a keyspace that does not exist.
            "resp": { "enabled": true, "defaultKeyspace": "c" },
        }),
    )?;
    caches.create(&PostParams::default(), &bad).await?;
    // Its nodes export every request's spans to the collector the operator exports to.
    let good = dc(
        "good",
        &serde_json::json!({ "replicas": 2, "keyspaces": [{ "name": "sessions", "maxBytes": "1Mi" }],
            "tracing": { "otlpEndpoint": collector.url(), "sampleRatio": 1.0 }, "log": { "format": "json" } }),
    )?;
    caches.create(&PostParams::default(), &good).await?;

    wait_status(caches, "good", Duration::from_mins(1), "good Available with 2/2", |s| {
        s.ready.as_deref() == Some("2/2") && condition(s, "Available").is_some_and(|c| c.status == "True")
    })
    .await?;
    let s = status_of(caches, "bad").await?;
    let degraded =
        condition(&s, "Degraded").ok_or_else(|| anyhow::anyhow!("bad has no Degraded condition"))?;
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "InvalidSpec"));
    for field in [
        "spec.podDisruptionBudget: set minAvailable or maxUnavailable, not both",
        "spec.keyspaces[0].hook.module.sha256: required",
        "spec.keyspaces[0].hook.allowedHosts[0]",
        "spec.keyspaces[1].staleIfError: needs a hook",
        r#"spec.resp.defaultKeyspace: "c" is not one of spec.keyspaces (a, b)"#,
    ] {
        assert!(degraded.message.contains(field), "missing {field:?} in {}", degraded.message);
    }
    let invalid_events = events(client, "bad", "InvalidSpec").await?;
    assert!(
        invalid_events.iter().any(|note| note.contains("spec.keyspaces[1].staleIfError: needs a hook")),
        "an InvalidSpec Event on bad naming every field: {invalid_events:?}"
    );
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    assert!(sets.get_opt("bad").await?.is_none(), "nothing is built from an invalid spec");
    traces_of_the_operator_and_the_nodes(client, collector).await?;

    // 1.20: the PodDisruptionBudget exists as policy/v1beta1, and the status says so.
    let s = status_of(caches, "good").await?;
    let degraded =
        condition(&s, "Degraded").ok_or_else(|| anyhow::anyhow!("good has no Degraded condition"))?;
    assert_eq!(degraded.status, "False");
    assert!(degraded.message.contains("policy/v1beta1"), "{}", degraded.message);
    let v1beta1 = ApiResource {
        group: "policy".into(),
        version: "v1beta1".into(),
        api_version: "policy/v1beta1".into(),
        kind: "PodDisruptionBudget".into(),
        plural: "poddisruptionbudgets".into(),
    };
    let pdbs: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &v1beta1);
    let pdb = pdbs.get("good").await?;
    assert_eq!(pdb.data["spec"]["maxUnavailable"], 1, "{:?}", pdb.data);

    // Fixing the invalid one makes it Available; the ConfigMap of keyspaces follows the spec.
    let fix = serde_json::json!({ "spec": { "podDisruptionBudget": { "minAvailable": null }, "resp": null,
        "keyspaces": [ { "name": "a", "maxBytes": "1Mi" } ] } });
    caches.patch("bad", &PatchParams::default(), &Patch::Merge(fix)).await?;
    wait_status(caches, "bad", Duration::from_mins(1), "bad Available once fixed", |s| {
        condition(s, "Available").is_some_and(|c| c.status == "True")
            && condition(s, "Degraded").is_some_and(|c| c.status == "False")
    })
    .await?;

    // A DistCache named like a Service the user already has: the Service is left alone, the DistCache says why.
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), NS);
    let theirs: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "taken" },
        "spec": { "selector": { "app": "theirs" }, "ports": [{ "port": 80, "protocol": "TCP" }] }
    }))?;
    services.create(&PostParams::default(), &theirs).await?;
    caches.create(&PostParams::default(), &dc("taken", &serde_json::json!({ "replicas": 1 }))?).await?;
    wait_status(caches, "taken", Duration::from_secs(30), "taken reports the name conflict", |s| {
        condition(s, "Degraded")
            .is_some_and(|c| c.reason == "NameConflict" && c.message.contains("Service taken"))
    })
    .await?;
    let service = services.get("taken").await?;
    let selector = service.spec.and_then(|s| s.selector).unwrap_or_default();
    assert_eq!(selector.get("app").map(String::as_str), Some("theirs"), "the user's Service is untouched");
    assert!(service.metadata.owner_references.is_none(), "and not adopted (the GC would delete it)");
    caches.delete("taken", &kube::api::DeleteParams::default()).await?;

    // Disabling the PodDisruptionBudget deletes it.
    let off = serde_json::json!({ "spec": { "podDisruptionBudget": { "enabled": false } } });
    caches.patch("good", &PatchParams::default(), &Patch::Merge(off)).await?;
    wait_for(Duration::from_secs(30), "the PodDisruptionBudget deleted", || {
        let pdbs = pdbs.clone();
        async move { Ok(pdbs.get_opt("good").await?.is_none()) }
    })
    .await?;

    Ok(())
}

/// The operator's reconcile spans name each DistCache and its result; the nodes of `good` trace as its
/// `spec.tracing` says, each span naming its pod and namespace.
async fn traces_of_the_operator_and_the_nodes(client: &Client, collector: &Collector) -> anyhow::Result<()> {
    let reconciled = |name: &'static str, result: &'static str| {
        move |s: &Span| {
            s.name == "distcache.reconcile"
                && s.service == "distcache-operator"
                && s.attributes.get("distcache.name").map(String::as_str) == Some(name)
                && s.attributes.get("k8s.namespace.name").map(String::as_str) == Some(NS)
                && s.attributes.get("distcache.result").map(String::as_str) == Some(result)
        }
    };
    wait_for(Duration::from_secs(30), "the operator's reconcile spans of good and bad", || {
        let spans = collector.spans();
        std::future::ready(Ok(
            spans.iter().any(reconciled("good", "ok")) && spans.iter().any(reconciled("bad", "invalid"))
        ))
    })
    .await?;

    let ip =
        ready_pod_ips(client, "good").await?.into_iter().next().ok_or_else(|| anyhow::anyhow!("no pod"))?;
    let mut cache = CacheClient::connect(format!("http://{ip}:7420")).await?;
    let got = cache.get(GetRequest { keyspace: "sessions".into(), key: "nobody".into() }).await;
    assert_eq!(got.map_err(|s| s.code()).err(), Some(tonic::Code::NotFound), "a cache-aside miss");
    let mut get = None;
    wait_for(Duration::from_secs(30), "the node's span of that Get", || {
        get = collector.spans().into_iter().find(|s| s.name == "distcache.Cache/Get");
        std::future::ready(Ok(get.is_some()))
    })
    .await?;
    let get = get.ok_or_else(|| anyhow::anyhow!("no Get span"))?;
    assert_eq!(get.service, "distcache-node");
    assert_eq!(get.attributes.get("distcache.keyspace").map(String::as_str), Some("sessions"), "{get:?}");
    assert!(
        get.resource.get("k8s.pod.name").is_some_and(|p| p.starts_with("good-")),
        "the pod names itself: {:?}",
        get.resource
    );
    assert_eq!(get.resource.get("k8s.namespace.name").map(String::as_str), Some(NS));
    Ok(())
}

async fn refused_then_loaded_keyspace(client: &Client, caches: &Api<DistCache>) -> anyhow::Result<()> {
    // A keyspace whose module ConfigMap does not exist yet: Failed with the nodes' message, while sessions serves.
    let add = serde_json::json!({ "spec": { "keyspaces": [
        { "name": "sessions", "maxBytes": "1Mi" },
        { "name": "users", "maxBytes": "4Mi",
          "hook": { "module": { "configMap": { "name": "users-hook", "key": "hook.wasm" } },
                    "config": { "mode": "echo", "prefix": "hook:" } } } ] } });
    caches.patch("good", &PatchParams::default(), &Patch::Merge(add)).await?;
    wait_status(caches, "good", Duration::from_secs(90), "users Failed on every node after the roll", |s| {
        let users = s.keyspaces.iter().find(|k| k.name == "users");
        s.updated_replicas == 2
            && s.ready_replicas == 2
            && users.is_some_and(|k| {
                k.hook == HookState::Failed && k.message.as_deref().is_some_and(|m| m.contains("users-hook"))
            })
    })
    .await?;
    let s = status_of(caches, "good").await?;
    let degraded = condition(&s, "Degraded").ok_or_else(|| anyhow::anyhow!("no Degraded condition"))?;
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "KeyspaceRefused"));
    assert!(!events(client, "good", "KeyspaceRefused").await?.is_empty(), "a KeyspaceRefused Event");
    for ip in ready_pod_ips(client, "good").await? {
        let mut c = CacheClient::connect(format!("http://{ip}:7420")).await?;
        let put = PutRequest {
            keyspace: "sessions".into(),
            key: ip.clone(),
            value: b"v".to_vec().into(),
            ttl: None,
        };
        c.put(put).await?;
        let got = c.get(GetRequest { keyspace: "sessions".into(), key: ip.clone() }).await?.into_inner();
        assert_eq!(got.value, &b"v"[..], "sessions serves through {ip}");
    }

    // The ConfigMap appears: every node loads the hook without a restart.
    let wasm = std::fs::read(hook_module("distcache_test_hook")?)?;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let map: ConfigMap = serde_json::from_value(serde_json::json!({ "metadata": { "name": "users-hook" } }))?;
    let map = ConfigMap {
        binary_data: Some(std::collections::BTreeMap::from([("hook.wasm".to_owned(), ByteString(wasm))])),
        ..map
    };
    maps.create(&PostParams::default(), &map).await?;
    wait_status(caches, "good", Duration::from_secs(90), "users Loaded on both nodes", |s| {
        s.keyspaces.iter().any(|k| {
            k.name == "users"
                && k.hook == HookState::Loaded
                && k.nodes_loaded == 2
                && k.module_sha256.is_some()
        })
    })
    .await?;
    for ip in ready_pod_ips(client, "good").await? {
        let mut c = CacheClient::connect(format!("http://{ip}:7420")).await?;
        let got = c.get(GetRequest { keyspace: "users".into(), key: "k1".into() }).await?.into_inner();
        assert_eq!(got.value, &b"hook:k1"[..], "the hook serves through {ip}");
    }
    let pods = Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels("app.kubernetes.io/instance=good"))
        .await?;
    for pod in &pods.items {
        let restarts: i32 = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map_or(0, |c| c.iter().map(|c| c.restart_count).sum());
        assert_eq!(restarts, 0, "no node restarted to load the hook");
    }

    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_guards_the_peer_port_and_reports_the_tls_material() -> anyhow::Result<()> {
    let private = PrivateBed::start(43).await?;
    let client = private.bed.client.clone();
    let mut operator = start_operator(&private, TLS_OPERATOR_ADDR, None).await?;
    let caches: Api<DistCache> = Api::namespaced(client.clone(), NS);
    ports_and_network_policy(&client, &caches).await?;
    tls_from_a_secret(&client, &caches).await?;
    tls_from_cert_manager(&client, &caches).await?;
    operator.kill().await?;
    Ok(())
}

/// Waits until the object `name` of `api` exists (or, `gone`, no longer exists).
async fn wait_object<K>(api: &Api<K>, name: &str, gone: bool, within: Duration) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
{
    let what = format!("{} {name} {}", api.resource_url(), if gone { "gone" } else { "there" });
    wait_for(within, &what, || async { Ok(api.get_opt(name).await?.is_some() != gone) }).await
}

async fn ports_and_network_policy(client: &Client, caches: &Api<DistCache>) -> anyhow::Result<()> {
    caches.create(&PostParams::default(), &dc("guarded", &serde_json::json!({ "replicas": 0 }))?).await?;
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), NS);
    wait_object(&policies, "guarded", false, Duration::from_secs(30)).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    wait_object(&services, "guarded", false, Duration::from_secs(30)).await?;
    let ports = |s: &Service| -> Vec<(Option<String>, i32)> {
        s.spec.iter().flat_map(|s| s.ports.iter().flatten()).map(|p| (p.name.clone(), p.port)).collect()
    };
    assert_eq!(ports(&services.get("guarded").await?), [(Some("grpc".to_owned()), 7420)], "client Service");
    assert_eq!(
        ports(&services.get("guarded-peers").await?),
        [(Some("peer".to_owned()), 7422)],
        "peer Service"
    );

    let policy = policies.get("guarded").await?;
    let spec = policy.spec.clone().ok_or_else(|| anyhow::anyhow!("NetworkPolicy without spec"))?;
    let own_pods = serde_json::json!({ "matchLabels": {
        "app.kubernetes.io/name": "distcache", "app.kubernetes.io/instance": "guarded" } });
    assert_eq!(serde_json::to_value(&spec.pod_selector)?, own_pods, "it selects the DistCache's pods");
    assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_owned()][..]));
    assert_eq!(
        serde_json::to_value(&spec.ingress)?,
        serde_json::json!([
            { "from": [{ "podSelector": own_pods }], "ports": [{ "port": 7422, "protocol": "TCP" }] },
            { "ports": [{ "port": 7420, "protocol": "TCP" }, { "port": 7421, "protocol": "TCP" }] },
        ]),
        "the peer port only from the DistCache's own pods; client and admin ports from anywhere"
    );
    let dc = caches.get("guarded").await?;
    let owner = policy.metadata.owner_references.unwrap_or_default();
    assert!(owner.iter().any(|r| Some(&r.uid) == dc.metadata.uid.as_ref() && r.controller == Some(true)));
    resp_port(caches, &services, &policies).await?;

    let off = serde_json::json!({ "spec": { "networkPolicy": { "enabled": false } } });
    caches.patch("guarded", &PatchParams::default(), &Patch::Merge(off)).await?;
    wait_object(&policies, "guarded", true, Duration::from_secs(30)).await
}

/// `spec.resp`: turning it on adds its port to the client Service (never to the peer Service) and to the
/// NetworkPolicy's ports open to anyone; turning it off takes the port away again (the operator's server-side
/// apply no longer owns it).
async fn resp_port(
    caches: &Api<DistCache>,
    services: &Api<Service>,
    policies: &Api<NetworkPolicy>,
) -> anyhow::Result<()> {
    let ports = |s: Option<&Service>| -> Vec<i32> {
        s.and_then(|s| s.spec.as_ref())
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .map(|p| p.port)
            .collect()
    };
    let open = |p: Option<&NetworkPolicy>| -> Vec<serde_json::Value> {
        p.and_then(|p| p.spec.as_ref())
            .and_then(|s| s.ingress.as_ref())
            .and_then(|rules| rules.get(1))
            .iter()
            .flat_map(|r| r.ports.iter().flatten())
            .filter_map(|p| serde_json::to_value(p.port.as_ref()?).ok())
            .collect()
    };
    for (resp, client, anyone) in [
        (serde_json::json!({ "enabled": true, "port": 16379 }), vec![7420, 16379], vec![7420, 7421, 16379]),
        (serde_json::Value::Null, vec![7420], vec![7420, 7421]),
    ] {
        let patch = serde_json::json!({ "spec": { "resp": resp } });
        caches.patch("guarded", &PatchParams::default(), &Patch::Merge(patch)).await?;
        let what = format!("client Service ports {client:?}, NetworkPolicy open to anyone on {anyone:?}");
        let anyone: Vec<serde_json::Value> = anyone.into_iter().map(serde_json::Value::from).collect();
        wait_for(Duration::from_secs(30), &what, || async {
            let service = services.get_opt("guarded").await?;
            let policy = policies.get_opt("guarded").await?;
            Ok(ports(service.as_ref()) == client && open(policy.as_ref()) == anyone)
        })
        .await?;
        let peers = services.get("guarded-peers").await?;
        assert_eq!(ports(Some(&peers)), [7422], "the peer Service never carries the RESP port");
        let service = services.get("guarded").await?;
        let resp = service.spec.iter().flat_map(|s| s.ports.iter().flatten()).find(|p| p.port == 16379);
        if let Some(p) = resp {
            assert_eq!(p.name.as_deref(), Some("resp"));
            assert_eq!(
                p.target_port,
                Some(IntOrString::String("resp".to_owned())),
                "the container port by name"
            );
        }
    }
    Ok(())
}

fn tls_secret(name: &str, keys: &[(&str, &str)]) -> anyhow::Result<Secret> {
    let data: std::collections::BTreeMap<String, ByteString> =
        keys.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec()))).collect();
    Ok(Secret {
        data: Some(data),
        type_: Some("kubernetes.io/tls".to_owned()),
        ..serde_json::from_value(serde_json::json!({ "metadata": { "name": name } }))?
    })
}

/// Waits until the DistCache's TLSReady condition has `status` and `reason` (and a message containing `says`).
async fn wait_tls_ready(
    caches: &Api<DistCache>,
    name: &str,
    status: &str,
    reason: &str,
    says: &str,
) -> anyhow::Result<()> {
    let what = format!("{name}: TLSReady {status} {reason}");
    wait_status(caches, name, Duration::from_secs(45), &what, |s| {
        condition(s, "TLSReady")
            .is_some_and(|c| c.status == status && c.reason == reason && c.message.contains(says))
    })
    .await
}

async fn tls_from_a_secret(client: &Client, caches: &Api<DistCache>) -> anyhow::Result<()> {
    let spec = serde_json::json!({ "replicas": 0, "tls": { "secretName": "secure-certs" } });
    caches.create(&PostParams::default(), &dc("secure", &spec)?).await?;
    wait_tls_ready(caches, "secure", "False", "SecretMissing", "Secret secure-certs not found").await?;
    // Without TLS material the pods would wait for the Secret: the status says so, and Degraded stays for what
    // the user must act on elsewhere.
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let set = sets.get("secure").await?;
    let pod = set.spec.clone().and_then(|s| s.template.spec).ok_or_else(|| anyhow::anyhow!("no pod spec"))?;
    let volume = pod.volumes.iter().flatten().find(|v| v.name == "tls");
    assert_eq!(
        volume.and_then(|v| v.secret.as_ref()).and_then(|s| s.secret_name.as_deref()),
        Some("secure-certs"),
        "the pods mount the Secret"
    );
    let env: Vec<String> = pod.containers[0].env.iter().flatten().map(|e| e.name.clone()).collect();
    assert!(env.iter().any(|e| e == "DISTCACHE_TLS__CA_FILE"), "{env:?}");

    // A kubernetes.io/tls Secret as `kubectl create secret tls` makes it: no ca.crt.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let partial = tls_secret("secure-certs", &[("tls.crt", "CERT 1"), ("tls.key", "KEY 1")])?;
    secrets.create(&PostParams::default(), &partial).await?;
    wait_tls_ready(caches, "secure", "False", "KeyMissing", "ca.crt").await?;
    let generation = sets.get("secure").await?.metadata.generation;

    let full = tls_secret("secure-certs", &[("tls.crt", "CERT 1"), ("tls.key", "KEY 1"), ("ca.crt", "CA")])?;
    secrets.replace("secure-certs", &PostParams::default(), &full).await?;
    wait_tls_ready(caches, "secure", "True", "SecretReady", "secure-certs").await?;
    // A new certificate in the same Secret: the nodes reload it; the StatefulSet does not change (no roll).
    let rotated =
        tls_secret("secure-certs", &[("tls.crt", "CERT 2"), ("tls.key", "KEY 2"), ("ca.crt", "CA")])?;
    secrets.replace("secure-certs", &PostParams::default(), &rotated).await?;
    let dc = caches.get("secure").await?;
    wait_for(Duration::from_secs(30), "the operator observed secure", || async {
        let now = caches.get("secure").await?;
        Ok(now.status.and_then(|s| s.observed_generation) == dc.metadata.generation)
    })
    .await?;
    assert_eq!(sets.get("secure").await?.metadata.generation, generation, "a new certificate rolls no pod");
    Ok(())
}

async fn tls_from_cert_manager(client: &Client, caches: &Api<DistCache>) -> anyhow::Result<()> {
    let spec = serde_json::json!({ "replicas": 0, "tls": { "certManager": {
        "issuerRef": { "name": "cluster-ca", "kind": "ClusterIssuer" }, "duration": "30d", "renewBefore": "10d" } } });
    caches.create(&PostParams::default(), &dc("issued", &spec)?).await?;
    let missing = "spec.tls.certManager is set but cert-manager is not installed (no cert-manager.io/v1 Certificate API)";
    wait_status(caches, "issued", Duration::from_secs(45), "issued: Degraded CertManagerMissing", |s| {
        condition(s, "Degraded").is_some_and(|c| {
            c.status == "True" && c.reason == "CertManagerMissing" && c.message.starts_with(missing)
        }) && condition(s, "TLSReady")
            .is_some_and(|c| c.status == "False" && c.reason == "CertManagerMissing")
    })
    .await?;
    assert!(!events(client, "issued", "ApplyFailed").await?.iter().any(|e| e.contains("Certificate")));

    // cert-manager's own CRD (as its release publishes it): the operator finds the API at its next look and
    // applies the Certificate, which the API server checks against cert-manager's schema.
    install_crd(
        client,
        "operator/testdata/cert-manager-v1.8.2-certificates.crd.yaml",
        "certificates.cert-manager.io",
    )
    .await?;
    let resource = ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
        "certificates",
    );
    let certificates: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &resource);
    wait_object(&certificates, "issued-tls", false, Duration::from_mins(1)).await?;
    let certificate = certificates.get("issued-tls").await?;
    let spec = &certificate.data["spec"];
    assert_eq!(spec["secretName"], "issued-tls");
    assert_eq!(
        spec["issuerRef"],
        serde_json::json!({ "name": "cluster-ca", "kind": "ClusterIssuer", "group": "cert-manager.io" })
    );
    assert_eq!(
        spec["dnsNames"],
        serde_json::json!([
            "issued",
            "issued.controller",
            "issued.controller.svc",
            "issued.controller.svc.cluster.local",
            "issued-peers.controller.svc",
            "issued-peers.controller.svc.cluster.local",
            "*.issued-peers.controller.svc",
            "*.issued-peers.controller.svc.cluster.local",
        ]),
        "the client Service in every form and every pod"
    );
    assert_eq!(
        spec["usages"],
        serde_json::json!(["server auth", "client auth", "digital signature", "key encipherment"])
    );
    assert_eq!(
        (spec["duration"].as_str(), spec["renewBefore"].as_str()),
        (Some("720h0m0s"), Some("240h0m0s"))
    );
    let dc = caches.get("issued").await?;
    let owners = certificate.metadata.owner_references.unwrap_or_default();
    assert!(owners.iter().any(|r| Some(&r.uid) == dc.metadata.uid.as_ref() && r.controller == Some(true)));
    wait_status(
        caches,
        "issued",
        Duration::from_secs(45),
        "issued: waiting for cert-manager's Secret",
        |s| {
            condition(s, "Degraded").is_some_and(|c| c.status == "False")
                && condition(s, "TLSReady").is_some_and(|c| {
                    c.status == "False"
                        && c.reason == "SecretMissing"
                        && c.message.contains("waiting for cert-manager")
                })
        },
    )
    .await?;

    // The Secret as cert-manager's CA issuer writes it.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let issued = tls_secret("issued-tls", &[("tls.crt", "CERT"), ("tls.key", "KEY"), ("ca.crt", "CA")])?;
    secrets.create(&PostParams::default(), &issued).await?;
    wait_tls_ready(caches, "issued", "True", "SecretReady", "issued-tls").await?;

    // Leaving cert-manager for a Secret of one's own removes the Certificate the operator made.
    let own = serde_json::json!({ "spec": { "tls": { "certManager": null, "secretName": "issued-tls" } } });
    caches.patch("issued", &PatchParams::default(), &Patch::Merge(own)).await?;
    wait_object(&certificates, "issued-tls", true, Duration::from_secs(30)).await
}
