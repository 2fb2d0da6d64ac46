//! The DistCache CRD (crds/distcache.yaml) as API servers enforce it:
//! - on the bed's apiextensions-apiserver 1.36.4 (CEL validation rules), valid DistCaches (the example and one
//!   per discovery backend) are accepted, and an object that breaks one rule is refused (422) with that rule's
//!   message, for every `x-kubernetes-validations` rule in the CRD (a rule added without a case here fails the
//!   test);
//! - on the bed's kube-apiserver 1.20.2, which predates CEL, the same CRD installs with `kubectl apply`: the rules
//!   are ignored there (an object only CEL would refuse is accepted, which is why the operator validates the same
//!   rules itself).

use std::time::Duration;

use distcache_tests::{
    operator::{CRD_NAME, Tool, distcaches, manifests, to_yaml_stream, wait_established},
    repo_root,
    testbed::Testbed,
    wait_for,
};
use futures::FutureExt as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

/// The CRD as generated, as JSON.
fn crd() -> anyhow::Result<Value> {
    manifests(&repo_root().join("crds/distcache.yaml"))?
        .into_iter()
        .find(|d| d["kind"] == "CustomResourceDefinition")
        .ok_or_else(|| anyhow::anyhow!("crds/distcache.yaml holds no CustomResourceDefinition"))
}

/// Every CEL rule of a schema: (rule, the message the server answers with).
fn cel_rules(schema: &Value, out: &mut Vec<(String, String)>) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map {
                if key == "x-kubernetes-validations" {
                    for rule in value.as_array().into_iter().flatten() {
                        let text = rule["rule"].as_str().unwrap_or_default().to_owned();
                        // Without a message the server quotes the rule.
                        let message = rule["message"].as_str().map_or_else(|| text.clone(), str::to_owned);
                        out.push((text, message));
                    }
                } else {
                    cel_rules(value, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| cel_rules(v, out)),
        _ => {}
    }
}

/// A DistCache that sets nearly every field, each to a valid value.
fn valid(name: &str) -> Value {
    let selector = json!({ "matchLabels": { "app.kubernetes.io/instance": name } });
    json!({
        "apiVersion": "distcache.io/v1alpha1",
        "kind": "DistCache",
        "metadata": { "name": name },
        "spec": {
            "replicas": 3,
            "image": { "repository": "ghcr.io/distcache/distcache-node", "tag": "0.1.0", "pullPolicy": "IfNotPresent" },
            "resources": { "requests": { "cpu": "250m", "memory": "256Mi" }, "limits": { "memory": "1Gi" } },
            "keyspaces": [
                {
                    "name": "users",
                    "maxBytes": "64Mi",
                    "ttl": "5m",
                    "negativeTtl": "30s",
                    "fetchTimeout": "2s",
                    "hook": {
                        "module": { "configMap": { "name": "users-hook", "key": "http-json.wasm" } },
                        "config": { "baseUrl": "http://users-origin.default.svc:8080/users" },
                        "allowedHosts": ["users-origin.default.svc:8080", "[fd00::1]:443", "10.0.0.7:80"],
                        "limits": { "fuel": 50_000_000, "memory": "64Mi", "timeout": "2s", "poolSize": 8 }
                    }
                },
                {
                    "name": "products",
                    "maxBytes": "16Mi",
                    "hook": {
                        "module": {
                            "url": "https://example.com/hooks/http-json.wasm",
                            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                        },
                        "allowedHosts": ["api.example.com:443"]
                    }
                },
                { "name": "local", "maxBytes": "1Mi", "hook": { "module": { "path": "hooks/local.wasm" } } },
                { "name": "sessions", "maxBytes": "16Mi", "ttl": "30m", "maxValueBytes": "1Mi" },
                {
                    "name": "protected",
                    "maxBytes": "8Mi",
                    "ttl": "1m",
                    "hook": { "module": { "path": "hooks/protected.wasm" } },
                    "rateLimit": { "fetchesPerSecond": 200, "burst": 50 },
                    "circuitBreaker": { "failureRatio": 0.5, "minimumRequests": 20, "window": "10s", "openFor": "5s" },
                    "staleWhileRevalidate": "30s",
                    "staleIfError": "10m",
                    "refreshAhead": 0.8,
                    "warmUp": { "keys": ["alice", "bob"], "fetchesPerSecond": 50 }
                }
            ],
            "discovery": { "kubernetes": {} },
            "scheduling": {
                "nodeSelector": { "kubernetes.io/os": "linux" },
                "tolerations": [{ "key": "dedicated", "operator": "Equal", "value": "cache", "effect": "NoSchedule" }],
                "affinity": { "podAntiAffinity": { "preferredDuringSchedulingIgnoredDuringExecution": [{
                    "weight": 100,
                    "podAffinityTerm": { "topologyKey": "kubernetes.io/hostname", "labelSelector": selector }
                }] } },
                "topologySpreadConstraints": [{
                    "maxSkew": 1,
                    "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": selector
                }]
            },
            "podDisruptionBudget": { "enabled": true, "maxUnavailable": 1 },
            "handoff": { "timeout": "15s" },
            "service": { "type": "ClusterIP", "annotations": { "example.com/team": "cache" } },
            "tls": { "secretName": "cache-certs", "clientAuth": "required" },
            "networkPolicy": { "enabled": true },
            "resp": {
                "enabled": true,
                "port": 6380,
                "defaultKeyspace": "users",
                "passwordSecret": { "name": "cache-redis", "key": "password" }
            },
            "tracing": { "otlpEndpoint": "http://otel-collector.monitoring:4317", "sampleRatio": 0.05 },
            "log": { "format": "json", "level": "info,distcache_node::hooks=debug" }
        }
    })
}

/// `valid(name)` with the value at JSON pointer `at` replaced (or appended, for a pointer ending in `/-`).
fn with(name: &str, at: &str, value: Value) -> anyhow::Result<Value> {
    let mut object = valid(name);
    if let Some(list) = at.strip_suffix("/-") {
        object
            .pointer_mut(list)
            .and_then(Value::as_array_mut)
            .ok_or_else(|| anyhow::anyhow!("{list} is not a list"))?
            .push(value);
    } else {
        *object.pointer_mut(at).ok_or_else(|| anyhow::anyhow!("{at} not in the valid object"))? = value;
    }
    Ok(object)
}

/// One invalid object and what the server must say about it.
struct Case {
    what: &'static str,
    object: Value,
    /// A part of the 422 message: a CEL rule's message (exactly as in the CRD) or a schema error.
    expect: &'static str,
    cel: bool,
}

fn cases() -> anyhow::Result<Vec<Case>> {
    const MODULE: &str = "hook.module: set exactly one of path, configMap or url";
    const SHA: &str = "hook.module: url requires sha256";
    const HOSTS: &str =
        "every allowedHosts entry must be host:port, for example users-api:8080 or [fd00::1]:443";
    const PDB: &str = "podDisruptionBudget: set minAvailable or maxUnavailable, not both";
    const DISCOVERY: &str = "discovery: set exactly one of kubernetes, dns or nats";
    const NATS: &str = "discovery.nats.url must start with nats:// or tls://";
    const NAME: &str = "metadata.name: a DistCache name is a DNS label of at most 52 characters (lowercase letters, \
                        digits, '-', starting with a letter): it names the StatefulSet, its pods and Services";
    let module = "/spec/keyspaces/0/hook/module";
    let hosts = "/spec/keyspaces/0/hook/allowedHosts";
    let case = |what, object, expect, cel| Case { what, object, expect, cel };
    let mut all = tls_cases()?;
    all.extend(protection_cases()?);
    all.extend(resp_cases()?);
    all.extend(telemetry_cases()?);
    all.extend([
        case("a hook module without a source", with("no-source", module, json!({}))?, MODULE, true),
        case(
            "a hook module with two sources",
            with(
                "two-sources",
                module,
                json!({ "path": "a.wasm", "configMap": { "name": "h", "key": "k" } }),
            )?,
            MODULE,
            true,
        ),
        case(
            "a url module without sha256",
            with("no-sha", module, json!({ "url": "https://example.com/h.wasm" }))?,
            SHA,
            true,
        ),
        case(
            "an allowedHosts entry without a port",
            with("no-port", hosts, json!(["users-origin"]))?,
            HOSTS,
            true,
        ),
        case(
            "an allowedHosts entry that is a URL",
            with("url-host", hosts, json!(["http://origin:80"]))?,
            HOSTS,
            true,
        ),
        case(
            "a PodDisruptionBudget with minAvailable and maxUnavailable",
            with("both", "/spec/podDisruptionBudget", json!({ "minAvailable": 1, "maxUnavailable": 1 }))?,
            PDB,
            true,
        ),
        case(
            "two discovery backends",
            with("two-backends", "/spec/discovery", json!({ "kubernetes": {}, "dns": {} }))?,
            DISCOVERY,
            true,
        ),
        case("no discovery backend", with("no-backend", "/spec/discovery", json!({}))?, DISCOVERY, true),
        case(
            "a NATS URL that is not nats:// or tls://",
            with("nats-http", "/spec/discovery", json!({ "nats": { "url": "http://nats:4222" } }))?,
            NATS,
            true,
        ),
        case("a name too long for its pods' labels", valid(&"n".repeat(53)), NAME, true),
        case("a name with a dot", valid("demo.cache"), NAME, true),
        // Plain schema checks, which every server version enforces.
        case(
            "two keyspaces of one name",
            with("duplicate", "/spec/keyspaces/-", json!({ "name": "users", "maxBytes": "1Mi" }))?,
            "Duplicate value",
            false,
        ),
        case(
            "a keyspace name with capitals",
            with("capitals", "/spec/keyspaces/3/name", json!("Sessions"))?,
            "should match",
            false,
        ),
        case(
            "negative replicas",
            with("negative", "/spec/replicas", json!(-1))?,
            "greater than or equal to 0",
            false,
        ),
    ]);
    Ok(all)
}

/// The keyspace protections (rateLimit, circuitBreaker, stale windows, refreshAhead, warmUp): `valid` sets them
/// all on keyspace 4, `protected`; keyspace 3, `sessions`, has no hook.
fn protection_cases() -> anyhow::Result<Vec<Case>> {
    const HOOK: &str = "rateLimit, circuitBreaker, staleWhileRevalidate, staleIfError, refreshAhead and warmUp need \
                        a hook (they protect and use the data source)";
    const RATIO: &str = "circuitBreaker.failureRatio must be greater than 0 and at most 1";
    let protected = "/spec/keyspaces/4";
    let case = |what, object, expect, cel| Case { what, object, expect, cel };
    Ok(vec![
        case(
            "staleIfError on a keyspace without a hook",
            with(
                "stale-no-hook",
                "/spec/keyspaces/3",
                json!({ "name": "sessions", "maxBytes": "16Mi", "staleIfError": "1m" }),
            )?,
            HOOK,
            true,
        ),
        case(
            "rateLimit on a keyspace without a hook",
            with(
                "limit-no-hook",
                "/spec/keyspaces/3",
                json!({ "name": "sessions", "maxBytes": "16Mi", "rateLimit": { "fetchesPerSecond": 10 } }),
            )?,
            HOOK,
            true,
        ),
        case(
            "a circuit breaker that opens at a failure ratio of 0",
            with("ratio-zero", &format!("{protected}/circuitBreaker/failureRatio"), json!(0))?,
            RATIO,
            true,
        ),
        case(
            "a circuit breaker failure ratio above 1",
            with("ratio-high", &format!("{protected}/circuitBreaker/failureRatio"), json!(1.5))?,
            RATIO,
            true,
        ),
        // Plain schema bounds.
        case(
            "refreshAhead 1.0 (at most 0.99: a refresh at expiry is no refresh ahead)",
            with("refresh-one", &format!("{protected}/refreshAhead"), json!(1.0))?,
            "less than or equal to 0.99",
            false,
        ),
        case(
            "rateLimit of 0 fetches per second",
            with("rate-zero", &format!("{protected}/rateLimit/fetchesPerSecond"), json!(0))?,
            "greater than or equal to 1",
            false,
        ),
        case(
            "an empty warm-up key",
            with("warm-empty", &format!("{protected}/warmUp/keys"), json!(["alice", ""]))?,
            "at least 1 chars long",
            false,
        ),
        case(
            "more than 10000 warm-up keys",
            with(
                "warm-many",
                &format!("{protected}/warmUp/keys"),
                (0..=10_000).map(|i| format!("k{i}")).collect::<Value>(),
            )?,
            "must have at most 10000 items",
            false,
        ),
    ])
}

fn tls_cases() -> anyhow::Result<Vec<Case>> {
    const TLS: &str = "tls: set exactly one of secretName or certManager";
    let both = json!({ "secretName": "c", "certManager": {
        "issuerRef": { "name": "ca", "kind": "ClusterIssuer" }, "duration": "90d", "renewBefore": "30d" } });
    Ok(vec![
        Case {
            what: "TLS from a Secret and from cert-manager",
            object: with("two-tls", "/spec/tls", both)?,
            expect: TLS,
            cel: true,
        },
        Case {
            what: "TLS without a source",
            object: with("no-tls", "/spec/tls", json!({ "clientAuth": "optional" }))?,
            expect: TLS,
            cel: true,
        },
        Case {
            what: "a clientAuth that is not none, optional or required",
            object: with("client-auth", "/spec/tls/clientAuth", json!("always"))?,
            expect: "Unsupported value",
            cel: false,
        },
    ])
}

/// `spec.resp`: its port is none of the nodes' other ports, and its default keyspace one of spec.keyspaces.
fn resp_cases() -> anyhow::Result<Vec<Case>> {
    const PORT: &str = "resp.port must not be 7420, 7421 or 7422: the nodes' client, admin and peer ports";
    const DEFAULT: &str = "resp.defaultKeyspace must be the name of one of spec.keyspaces";
    let case = |what, object, expect, cel| Case { what, object, expect, cel };
    Ok(vec![
        case(
            "a RESP port that is the client gRPC port",
            with("resp-grpc", "/spec/resp/port", json!(7420))?,
            PORT,
            true,
        ),
        case(
            "a RESP port that is the peer port",
            with("resp-peer", "/spec/resp/port", json!(7422))?,
            PORT,
            true,
        ),
        case(
            "a RESP default keyspace that is not a keyspace",
            with("resp-orders", "/spec/resp/defaultKeyspace", json!("orders"))?,
            DEFAULT,
            true,
        ),
        case(
            "a RESP default keyspace without keyspaces",
            with("resp-none", "/spec/keyspaces", json!([]))?,
            DEFAULT,
            true,
        ),
        // Plain schema bounds.
        case(
            "RESP port 0",
            with("resp-zero", "/spec/resp/port", json!(0))?,
            "greater than or equal to 1",
            false,
        ),
        case(
            "RESP port 65536",
            with("resp-high", "/spec/resp/port", json!(65536))?,
            "less than or equal to 65535",
            false,
        ),
        case(
            "a RESP password Secret key with a slash",
            with("resp-key", "/spec/resp/passwordSecret/key", json!("a/b"))?,
            "should match",
            false,
        ),
    ])
}

/// `spec.tracing` and `spec.log`: schema bounds only.
fn telemetry_cases() -> anyhow::Result<Vec<Case>> {
    let case = |what, object, expect| Case { what, object, expect, cel: false };
    Ok(vec![
        case(
            "an OTLP endpoint that is not http://",
            with("otlp-https", "/spec/tracing/otlpEndpoint", json!("https://otel:4317"))?,
            "should match",
        ),
        case(
            "a sample ratio above 1",
            with("ratio-high", "/spec/tracing/sampleRatio", json!(2))?,
            "less than or equal to 1",
        ),
        case("tracing without an endpoint", with("otlp-none", "/spec/tracing", json!({}))?, "Required value"),
        case(
            "a log format that is neither text nor json",
            with("log-xml", "/spec/log/format", json!("xml"))?,
            "Unsupported value",
        ),
    ])
}

/// Creates `object`, retrying while the server is still wiring the new resource up (404 right after Established).
async fn create_when_served(api: &Api<DynamicObject>, object: &Value) -> anyhow::Result<()> {
    let object: DynamicObject = serde_json::from_value(object.clone())?;
    wait_for(Duration::from_secs(10), "the DistCache resource served", || {
        let (api, object) = (api.clone(), object.clone());
        async move {
            match api.create(&PostParams::default(), &object).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
                Err(e) => Err(anyhow::anyhow!("{:?} was refused: {e}", object.metadata.name)),
            }
        }
    })
    .await
}

/// The example DistCache (examples/k8s/distcache.yaml).
fn example() -> anyhow::Result<Value> {
    manifests(&repo_root().join("examples/k8s/distcache.yaml"))?
        .into_iter()
        .find(|d| d["kind"] == "DistCache")
        .ok_or_else(|| anyhow::anyhow!("examples/k8s/distcache.yaml has no DistCache"))
}

/// Runs `body` in a fresh namespace, then deletes the CRD `crd(namespace)` (on the apiextensions-apiserver 1.36 if
/// `crd_server`, else on the bed's 1.20) and the namespace, also when the body failed or panicked.
async fn in_namespace<F, Fut>(
    prefix: &str,
    crd_server: bool,
    crd: fn(&str) -> String,
    body: F,
) -> anyhow::Result<()>
where
    F: FnOnce(Testbed, String) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let bed = Testbed::connect().await?;
    let ns = bed.namespace(prefix).await?;
    let client = if crd_server { bed.crd_server().await? } else { bed.client.clone() };
    let outcome = std::panic::AssertUnwindSafe(body(bed, ns.name.clone())).catch_unwind().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    let _ = crds.delete(&crd(&ns.name), &DeleteParams::default()).await;
    ns.delete().await?;
    match outcome {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cel_rules_refuse_each_invalid_distcache_with_the_rules_message() -> anyhow::Result<()> {
    in_namespace("crd-cel", true, |_| CRD_NAME.to_owned(), cel_rules_refuse).await
}

async fn cel_rules_refuse(bed: Testbed, ns: String) -> anyhow::Result<()> {
    let server = bed.crd_server().await?;
    let crd_json = crd()?;
    let crd: CustomResourceDefinition = serde_json::from_value(crd_json.clone())?;
    let crds: Api<CustomResourceDefinition> = Api::all(server.clone());
    // Created or updated: the CRD is cluster-wide on that server and may be left from an earlier run.
    crds.patch(CRD_NAME, &PatchParams::apply("distcache-tests").force(), &Patch::Apply(&crd)).await?;
    wait_established(&server, CRD_NAME, Duration::from_secs(30)).await?;
    let api = distcaches(&server, &ns);

    let mut accepted = vec![valid("good")];
    accepted.push(with("good-dns", "/spec/discovery", json!({ "dns": { "interval": "5s" } }))?);
    accepted.push(with(
        "good-nats",
        "/spec/discovery",
        json!({ "nats": { "url": "tls://nats.messaging:4222", "subject": "distcache.demo" } }),
    )?);
    accepted.push(with(
        "good-pdb",
        "/spec/podDisruptionBudget",
        json!({ "enabled": true, "minAvailable": "50%" }),
    )?);
    accepted.push(with("good-resp", "/spec/resp", json!({ "enabled": true }))?);
    accepted.push(with("good-resp-off", "/spec/resp", json!({ "enabled": false, "port": 16379 }))?);
    let mut example = example()?;
    example["metadata"]["name"] = "example".into();
    accepted.push(example);
    for object in &accepted {
        create_when_served(&api, object).await?;
    }

    let cases = cases()?;
    let mut wrong = Vec::new();
    for case in &cases {
        let object: DynamicObject = serde_json::from_value(case.object.clone())?;
        match api.create(&PostParams::default(), &object).await {
            Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains(case.expect) => {}
            Err(e) => wrong.push(format!("{}: refused, but not with {:?}: {e}", case.what, case.expect)),
            Ok(_) => wrong.push(format!("{}: accepted", case.what)),
        }
    }
    assert!(wrong.is_empty(), "invalid DistCaches not refused as they should be:\n{}", wrong.join("\n"));

    // Every CEL rule of the CRD has a case above.
    let mut rules = Vec::new();
    cel_rules(&crd_json, &mut rules);
    let untested: Vec<&(String, String)> =
        rules.iter().filter(|(_, message)| !cases.iter().any(|c| c.cel && c.expect == message)).collect();
    assert!(!rules.is_empty(), "crds/distcache.yaml has no x-kubernetes-validations rule");
    assert!(untested.is_empty(), "CEL rules without a case in this test: {untested:?}");
    Ok(())
}

/// The group of the 1.20 test's copy of the CRD.
fn old_server_group(ns: &str) -> String {
    format!("{ns}.test.distcache.io")
}

/// The name of that copy.
fn old_server_crd(ns: &str) -> String {
    format!("oldservercaches.{}", old_server_group(ns))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crd_installs_on_kubernetes_1_20_which_ignores_cel() -> anyhow::Result<()> {
    in_namespace("crd-old", false, old_server_crd, crd_installs_on_1_20).await
}

async fn crd_installs_on_1_20(bed: Testbed, ns: String) -> anyhow::Result<()> {
    let kubectl = Tool::kubectl(&bed.kubeconfig);
    let file = repo_root().join("crds/distcache.yaml");
    let path = file.display().to_string();
    // The file exactly as users apply it, validated by the server without being stored: the real CRD belongs to
    // the operator test's Helm release on this shared bed. `--validate=false`: a kubectl that validates against a
    // pre-1.25 server's OpenAPI document refuses the CRD client-side ("unknown field x-kubernetes-validations in
    // JSONSchemaProps"), although the server accepts it and ignores the rules.
    kubectl.run(&["apply", "--dry-run=server", "--validate=false", "-f", &path]).await?;

    // The same schema stored and used, under a group and names of this test's own (no second `dc` or `distcaches`
    // for kubectl to choose between while the operator test runs).
    let group = old_server_group(&ns);
    let name = old_server_crd(&ns);
    let mut copy = crd()?;
    copy["metadata"] = json!({ "name": name });
    copy["spec"]["group"] = group.clone().into();
    copy["spec"]["names"] = json!({
        "kind": "OldServerCache", "listKind": "OldServerCacheList", "plural": "oldservercaches",
        "singular": "oldservercache"
    });
    kubectl.run_stdin(&["apply", "--validate=false", "-f", "-"], &to_yaml_stream(&[copy])?).await?;
    wait_established(&bed.client, &name, Duration::from_secs(30)).await?;
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(&group, "v1alpha1", "OldServerCache"),
        "oldservercaches",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(bed.client.clone(), &ns, &resource);
    let retyped = |mut object: Value| {
        object["apiVersion"] = format!("{group}/v1alpha1").into();
        object["kind"] = "OldServerCache".into();
        object
    };
    create_when_served(&api, &retyped(valid("good"))).await?;
    // Only a CEL rule refuses this one: 1.20 stores it.
    let cel_only = retyped(with("two-backends", "/spec/discovery", json!({ "kubernetes": {}, "dns": {} }))?);
    api.create(&PostParams::default(), &serde_json::from_value(cel_only)?).await?;
    // The structural schema itself is enforced.
    let negative = retyped(with("negative", "/spec/replicas", json!(-1))?);
    match api.create(&PostParams::default(), &serde_json::from_value(negative)?).await {
        Err(kube::Error::Api(e)) if e.code == 422 => {}
        other => anyhow::bail!("negative replicas not refused on 1.20: {:?}", other.map(|o| o.metadata.name)),
    }
    Ok(())
}
