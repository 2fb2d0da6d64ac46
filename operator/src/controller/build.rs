//! Builds the objects a DistCache owns from its validated spec ([`ValidSpec`], never the raw DistCache: what
//! did not pass validation cannot be built). Pure: no IO; the result is what server-side apply sends, so only
//! fields set here are owned by the operator, and only fields a Kubernetes 1.20 API server knows are ever set.

use std::collections::{BTreeMap, BTreeSet};

use distcache_api::{KeyspacesFile, LogFormatSpec};
use k8s_openapi::{
    api::{
        apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy},
        core::v1::{
            Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
            EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec,
            PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource, SecurityContext, Service,
            ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
        },
        networking::v1::{
            NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use kube::api::{ApiResource, DynamicObject};

use super::validate::{CertManager, Discovery, Image, PdbPolicy, Resp, TlsSource, ValidSpec};
use crate::labels;

/// Client gRPC port of the nodes (Cache, health, reflection): the client Service's port.
pub const GRPC_PORT: i32 = 7420;
/// Peer gRPC port of the nodes (the internal Peer service, mutual TLS when TLS is on): only on the headless
/// Service `<name>-peers`, and only node pods of the same DistCache may reach it (the NetworkPolicy).
pub const PEER_PORT: i32 = 7422;
/// Where the TLS Secret is mounted in the node container (`tls.crt`, `tls.key`, `ca.crt`).
pub const TLS_DIR: &str = "/etc/distcache/tls";
/// The keys a TLS Secret must hold.
pub const TLS_KEYS: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];
/// Admin HTTP port of the nodes (`/readyz`, `/metrics`, `/admin/...`).
pub const ADMIN_PORT: i32 = 7421;
/// Data key of the keyspaces ConfigMap, the file the nodes watch.
pub const KEYSPACES_KEY: &str = "keyspaces.yaml";
/// Where the keyspaces ConfigMap is mounted in the node container.
pub const KEYSPACES_DIR: &str = "/etc/distcache/keyspaces";
/// Under which directory each hook-module ConfigMap is mounted (`<dir>/<configmap>/<key>`), the node's
/// `hooks.configMapDir`.
pub const MODULES_DIR: &str = "/etc/distcache/modules";
/// The node's compiled-hook cache (an emptyDir: the root filesystem stays read-only).
pub const HOOK_CACHE_DIR: &str = "/var/cache/distcache";
/// Where the Secret of `spec.resp.passwordSecret` is mounted in the node container (its one key as
/// [`RESP_PASSWORD_FILE`]).
pub const RESP_DIR: &str = "/etc/distcache/resp";
/// The file in [`RESP_DIR`] that holds the RESP password: the node's `resp.passwordFile`.
pub const RESP_PASSWORD_FILE: &str = "password";
/// Name of the RESP port on the node container and the client Service.
pub const RESP_PORT_NAME: &str = "resp";
/// Container name of the node.
pub const CONTAINER: &str = "node";

/// Operator-wide settings that shape the objects.
#[derive(Clone, Debug)]
pub struct BuildConfig {
    /// Node image used for the parts of `spec.image` that are not set (`repository:tag`).
    pub node_image: String,
    /// Bind the node's ports to the pod IP instead of 0.0.0.0. For pods that share a network namespace (host
    /// networking, the project's test bed); `kubectl port-forward` needs 0.0.0.0.
    pub listen_on_pod_ip: bool,
    /// DNS domain of the cluster, for DNS discovery (`<name>-peers.<ns>.svc.<domain>`).
    pub cluster_domain: String,
    /// How long a stopping node keeps serving after it turned not-ready (its `shutdownDelay`).
    pub shutdown_delay_seconds: u32,
}

impl Default for BuildConfig {
    fn default() -> Self {
        Self {
            node_image: format!("ghcr.io/distcache/distcache-node:{}", env!("CARGO_PKG_VERSION")),
            listen_on_pod_ip: false,
            cluster_domain: "cluster.local".to_owned(),
            shutdown_delay_seconds: 5,
        }
    }
}

/// Everything a DistCache owns.
#[derive(Clone, Debug)]
pub struct Objects {
    /// `<name>-keyspaces`: the nodes' keyspaces file.
    pub config_map: ConfigMap,
    /// `<name>-node`.
    pub service_account: ServiceAccount,
    /// `<name>-node`: list and watch pods (Kubernetes discovery).
    pub role: Role,
    /// `<name>-node`.
    pub role_binding: RoleBinding,
    /// `<name>-peers`: headless, Ready pods only (DNS discovery, stable pod names).
    pub peers_service: Service,
    /// `<name>`: what applications connect to.
    pub client_service: Service,
    /// `<name>`: the nodes.
    pub stateful_set: StatefulSet,
    /// `<name>`, when enabled (written as policy/v1; the applier converts it for older servers).
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
    /// `<name>`, when enabled: the peer port only from this DistCache's pods.
    pub network_policy: Option<NetworkPolicy>,
    /// `<name>-tls`, a cert-manager.io/v1 Certificate, when `spec.tls.certManager` is set.
    pub certificate: Option<DynamicObject>,
}

impl Objects {
    /// The objects with the StatefulSet at `replicas` pods instead of `spec.replicas`: the operator scales in one
    /// pod at a time (see `scale`).
    #[must_use]
    pub fn with_stateful_set_replicas(mut self, replicas: i32) -> Self {
        if let Some(spec) = self.stateful_set.spec.as_mut() {
            spec.replicas = Some(replicas);
        }
        self
    }
}

/// The cert-manager Certificate resource (cert-manager.io/v1).
pub fn certificate_resource() -> ApiResource {
    ApiResource {
        group: "cert-manager.io".to_owned(),
        version: "v1".to_owned(),
        api_version: "cert-manager.io/v1".to_owned(),
        kind: "Certificate".to_owned(),
        plural: "certificates".to_owned(),
    }
}

/// The DNS names the nodes' certificate covers: the client Service `<name>` in its short, namespaced, `.svc` and
/// cluster-domain forms, the headless Service `<name>-peers` (`.svc` and cluster-domain forms), and every pod as
/// a wildcard on the headless Service (`<pod>.<name>-peers.<namespace>.svc`, the names the StatefulSet's pods
/// have). Peers dial each other by IP and check that a peer's certificate carries the SANs of their own, so one
/// certificate for every pod needs no pod IPs.
pub fn certificate_dns_names(name: &str, namespace: &str, cluster_domain: &str) -> Vec<String> {
    let peers = format!("{name}-peers.{namespace}.svc");
    vec![
        name.to_owned(),
        format!("{name}.{namespace}"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.{cluster_domain}"),
        peers.clone(),
        format!("{peers}.{cluster_domain}"),
        format!("*.{peers}"),
        format!("*.{peers}.{cluster_domain}"),
    ]
}

/// The key usages of the nodes' certificate: a node serves with it (server auth) and presents it to the peers it
/// dials (client auth, mutual TLS on the peer port).
pub const CERTIFICATE_USAGES: [&str; 4] =
    ["server auth", "client auth", "digital signature", "key encipherment"];

/// A duration as Go writes it (`2160h0m0s`), which cert-manager's `duration` and `renewBefore` parse (Go's
/// `time.ParseDuration` has no day unit). Whole seconds: cert-manager works in seconds.
pub fn go_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    format!("{}h{}m{}s", s / 3600, s / 60 % 60, s % 60)
}

/// The pod selector of a DistCache's nodes.
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_owned(), labels::NAME_VALUE.to_owned()),
        (labels::INSTANCE.to_owned(), name.to_owned()),
    ])
}

/// The selector as a string (`status.selector`, the nodes' discovery selector).
pub fn selector_string(name: &str) -> String {
    selector_labels(name).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn common_labels(name: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(name);
    l.insert(labels::MANAGED_BY.to_owned(), labels::MANAGER.to_owned());
    l
}

fn metadata(valid: &ValidSpec, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(valid.namespace.clone()),
        labels: Some(common_labels(&valid.name)),
        owner_references: Some(vec![valid.owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// The image reference for the nodes: `spec.image` over the operator's default.
pub fn node_image(image: &Image, config: &BuildConfig) -> String {
    let (default_repo, default_tag) = split_image(&config.node_image);
    let repo = image.repository.clone().unwrap_or_else(|| default_repo.to_owned());
    match image.tag.clone().or_else(|| default_tag.map(str::to_owned)) {
        Some(tag) => format!("{repo}:{tag}"),
        None => repo,
    }
}

/// Splits `repo[:tag]` (a registry port is not a tag: `host:5000/x`).
fn split_image(image: &str) -> (&str, Option<&str>) {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
        _ => (image, None),
    }
}

/// The ConfigMaps holding hook modules, sorted and without duplicates.
pub fn module_config_maps(valid: &ValidSpec) -> BTreeSet<String> {
    valid
        .keyspaces
        .iter()
        .filter_map(|k| k.spec.hook.as_ref()?.module.config_map.as_ref().map(|c| c.name.clone()))
        .collect()
}

/// A volume name (a DNS label) for a ConfigMap name (a DNS subdomain, possibly longer or with dots).
fn module_volume_name(config_map: &str) -> String {
    // FNV-1a: stable across versions and platforms, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in config_map.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("module-{hash:016x}")
}

/// Builds every owned object from the validated DistCache (the keyspaces are written as given).
pub fn build(valid: &ValidSpec, config: &BuildConfig) -> Objects {
    let node_account = format!("{}-node", valid.name);
    Objects {
        config_map: keyspaces_config_map(valid),
        service_account: ServiceAccount {
            metadata: metadata(valid, node_account.clone()),
            ..ServiceAccount::default()
        },
        role: Role {
            metadata: metadata(valid, node_account.clone()),
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["pods".to_owned()]),
                verbs: vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()],
                ..PolicyRule::default()
            }]),
        },
        role_binding: RoleBinding {
            metadata: metadata(valid, node_account.clone()),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".to_owned(),
                kind: "Role".to_owned(),
                name: node_account.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".to_owned(),
                name: node_account,
                namespace: Some(valid.namespace.clone()),
                ..Subject::default()
            }]),
        },
        peers_service: peers_service(valid),
        client_service: client_service(valid),
        stateful_set: stateful_set(valid, config),
        pod_disruption_budget: pod_disruption_budget(valid),
        network_policy: network_policy(valid),
        certificate: certificate(valid, config),
    }
}

fn keyspaces_config_map(valid: &ValidSpec) -> ConfigMap {
    let file = KeyspacesFile { keyspaces: valid.keyspaces.iter().map(|k| k.spec.clone()).collect() };
    // Serializing plain data types cannot fail; an empty file would still be a valid (empty) keyspaces file.
    let body = serde_yaml::to_string(&file).unwrap_or_else(|_| "keyspaces: []\n".to_owned());
    let text = format!(
        "# Written by distcache-operator from DistCache {}/{}: edit spec.keyspaces of the DistCache, not this file.\n{body}",
        valid.namespace, valid.name
    );
    ConfigMap {
        metadata: metadata(valid, format!("{}-keyspaces", valid.name)),
        data: Some(BTreeMap::from([(KEYSPACES_KEY.to_owned(), text)])),
        ..ConfigMap::default()
    }
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::String(name.to_owned())),
        // Server-side apply on 1.20 requires the protocol (it is part of the list's merge key).
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

fn peers_service(valid: &ValidSpec) -> Service {
    Service {
        metadata: metadata(valid, format!("{}-peers", valid.name)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(false),
            selector: Some(selector_labels(&valid.name)),
            // The peer port only: it is what DNS discovery resolves, and peers dial nothing else.
            ports: Some(vec![service_port("peer", PEER_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn client_service(valid: &ValidSpec) -> Service {
    let mut meta = metadata(valid, valid.name.clone());
    if !valid.service.annotations.is_empty() {
        meta.annotations = Some(valid.service.annotations.clone());
    }
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some(valid.service.type_.as_str().to_owned()),
            selector: Some(selector_labels(&valid.name)),
            // The client ports only: the Peer service is never behind the client Service.
            ports: Some(client_ports(valid).map(|(name, port)| service_port(name, port)).collect()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The ports applications use, by name: gRPC, and the Redis-protocol front end when it is enabled.
fn client_ports(valid: &ValidSpec) -> impl Iterator<Item = (&'static str, i32)> {
    let resp = valid.resp.as_ref().map(|r| (RESP_PORT_NAME, i32::from(r.port)));
    std::iter::once(("grpc", GRPC_PORT)).chain(resp)
}

fn pod_disruption_budget(valid: &ValidSpec) -> Option<PodDisruptionBudget> {
    let (max_unavailable, min_available) = match &valid.pod_disruption_budget {
        PdbPolicy::Disabled => return None,
        PdbPolicy::MaxUnavailable(max) => (Some(max.clone()), None),
        PdbPolicy::MinAvailable(min) => (None, Some(min.clone())),
    };
    Some(PodDisruptionBudget {
        metadata: metadata(valid, valid.name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable,
            min_available,
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&valid.name)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

/// Ingress to the node pods: the peer port only from node pods of this DistCache (same namespace, the selector
/// labels), the client ports (gRPC, RESP when enabled) and the admin port from anywhere (applications, probes,
/// Prometheus, the operator). Egress is not restricted: nodes reach the API server, NATS, DNS and their hooks'
/// origins.
fn network_policy(valid: &ValidSpec) -> Option<NetworkPolicy> {
    if !valid.network_policy {
        return None;
    }
    let port = |port: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_owned()),
        ..NetworkPolicyPort::default()
    };
    let nodes =
        LabelSelector { match_labels: Some(selector_labels(&valid.name)), ..LabelSelector::default() };
    Some(NetworkPolicy {
        metadata: metadata(valid, valid.name.clone()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(nodes.clone()),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(nodes),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: Some(vec![port(PEER_PORT)]),
                },
                // No `from`: any source.
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(
                        [port(GRPC_PORT), port(ADMIN_PORT)]
                            .into_iter()
                            .chain(valid.resp.as_ref().map(|r| port(i32::from(r.port))))
                            .collect(),
                    ),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    })
}

/// The cert-manager Certificate `<name>-tls`, issued into the Secret `<name>-tls` that the nodes mount.
fn certificate(valid: &ValidSpec, config: &BuildConfig) -> Option<DynamicObject> {
    let tls = valid.tls.as_ref()?;
    let TlsSource::CertManager(CertManager {
        issuer_name,
        issuer_kind,
        issuer_group,
        duration,
        renew_before,
    }) = &tls.source
    else {
        return None;
    };
    let name = format!("{}-tls", valid.name);
    let mut spec = serde_json::json!({
        "secretName": tls.secret_name(&valid.name),
        "issuerRef": { "name": issuer_name, "kind": issuer_kind, "group": issuer_group },
        "dnsNames": certificate_dns_names(&valid.name, &valid.namespace, &config.cluster_domain),
        "usages": CERTIFICATE_USAGES,
        // A new private key with every renewal (cert-manager before 1.18 keeps the old one by default).
        "privateKey": { "rotationPolicy": "Always" },
    });
    if let Some(d) = duration {
        spec["duration"] = go_duration(*d).into();
    }
    if let Some(r) = renew_before {
        spec["renewBefore"] = go_duration(*r).into();
    }
    let mut object = DynamicObject::new(&name, &certificate_resource())
        .within(&valid.namespace)
        .data(serde_json::json!({ "spec": spec }));
    object.metadata = metadata(valid, name);
    Some(object)
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value.into()), ..EnvVar::default() }
}

/// The node's discovery setting (`DISTCACHE_DISCOVERY`, YAML flow syntax, which JSON is).
fn discovery_env(valid: &ValidSpec, config: &BuildConfig) -> String {
    let (name, namespace) = (&valid.name, &valid.namespace);
    let value = match &valid.discovery {
        Discovery::Nats { url, subject } => serde_json::json!({ "nats": { "url": url, "subject": subject } }),
        Discovery::Dns { interval } => {
            let mut v = serde_json::json!({ "dns": {
                "name": format!("{name}-peers.{namespace}.svc.{}", config.cluster_domain),
                "port": PEER_PORT,
            }});
            if let Some(interval) = interval {
                v["dns"]["interval"] = interval.to_string().into();
            }
            v
        }
        Discovery::Kubernetes => serde_json::json!({ "kubernetes": {
            "namespace": namespace,
            "labelSelector": selector_string(name),
            "portName": "peer",
        }}),
    };
    value.to_string()
}

/// An environment value that the node reads (as YAML) as the string `s`: `s` itself when that is how YAML reads
/// it, else `s` quoted (a keyspace named `123` or `true` would otherwise be a number or a boolean).
fn yaml_string(s: &str) -> String {
    match serde_yaml::from_str::<serde_yaml::Value>(s) {
        Ok(serde_yaml::Value::String(read)) if read == s => s.to_owned(),
        // JSON strings are YAML strings.
        _ => serde_json::Value::from(s).to_string(),
    }
}

/// The node's `tracing` and `log` settings from `spec.tracing` and `spec.log`; with tracing, the pod and its
/// namespace as resource attributes of every span (`k8s.pod.name`, `k8s.namespace.name`).
fn telemetry_env(valid: &ValidSpec) -> Vec<EnvVar> {
    let mut vars = Vec::new();
    if let Some(tracing) = &valid.tracing {
        vars.push(env("DISTCACHE_TRACING__OTLP_ENDPOINT", yaml_string(&tracing.otlp_endpoint)));
        if let Some(ratio) = tracing.sample_ratio {
            vars.push(env("DISTCACHE_TRACING__SAMPLE_RATIO", ratio.to_string()));
        }
        if tracing.record_keys {
            vars.push(env("DISTCACHE_TRACING__RECORD_KEYS", "true"));
        }
        vars.push(env(
            "OTEL_RESOURCE_ATTRIBUTES",
            "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)",
        ));
    }
    if valid.log.format != LogFormatSpec::Text {
        vars.push(env("DISTCACHE_LOG__FORMAT", valid.log.format.as_str()));
    }
    if let Some(level) = &valid.log.level {
        vars.push(env("DISTCACHE_LOG__LEVEL", yaml_string(level)));
    }
    vars
}

/// A read-only mount of the volume `name` at `path` (Secrets: certificates, the RESP password).
fn read_only_mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The node's `resp` setting, one field per variable.
fn resp_env(resp: &Resp, bind: &str) -> Vec<EnvVar> {
    let mut vars = vec![env("DISTCACHE_RESP__LISTEN", format!("{bind}:{}", resp.port))];
    if let Some(keyspace) = &resp.default_keyspace {
        vars.push(env("DISTCACHE_RESP__DEFAULT_KEYSPACE", yaml_string(keyspace)));
    }
    if resp.password_secret.is_some() {
        vars.push(env("DISTCACHE_RESP__PASSWORD_FILE", format!("{RESP_DIR}/{RESP_PASSWORD_FILE}")));
    }
    vars
}

/// The node pod's volumes and the container's mounts: keyspaces file, hook cache, the TLS Secret, the RESP
/// password Secret, one per module ConfigMap.
fn volumes(valid: &ValidSpec) -> (Vec<Volume>, Vec<VolumeMount>) {
    let name = &valid.name;
    let mut volumes = vec![
        Volume {
            name: "keyspaces".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: format!("{name}-keyspaces"),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "hook-cache".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "keyspaces".to_owned(),
            mount_path: KEYSPACES_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "hook-cache".to_owned(),
            mount_path: HOOK_CACHE_DIR.to_owned(),
            ..VolumeMount::default()
        },
    ];
    if let Some(tls) = &valid.tls {
        volumes.push(Volume {
            name: "tls".to_owned(),
            // Not optional: a node of a DistCache with TLS never starts without its certificate (the pod waits
            // for the Secret; TLSReady says why). Only the Secret's name is in the pod template: a new
            // certificate in the same Secret reaches the running nodes, which reload it, without a roll.
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls.secret_name(name)),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(read_only_mount("tls", TLS_DIR));
    }
    if let Some(secret) = valid.resp.as_ref().and_then(|r| r.password_secret.as_ref()) {
        volumes.push(Volume {
            name: "resp-password".to_owned(),
            // Its one key as a file of a fixed name. Not optional: a node that is to ask for a password never
            // starts without it (the pod waits for the Secret).
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.name.clone()),
                items: Some(vec![KeyToPath {
                    key: secret.key.clone(),
                    path: RESP_PASSWORD_FILE.to_owned(),
                    ..KeyToPath::default()
                }]),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(read_only_mount("resp-password", RESP_DIR));
    }
    for cm in module_config_maps(valid) {
        let volume = module_volume_name(&cm);
        volumes.push(Volume {
            name: volume.clone(),
            // Optional: a missing module ConfigMap fails only its keyspace (the node reports it), not the pod.
            config_map: Some(ConfigMapVolumeSource {
                name: cm.clone(),
                optional: Some(true),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: volume,
            mount_path: format!("{MODULES_DIR}/{cm}"),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    (volumes, mounts)
}

fn node_container(valid: &ValidSpec, config: &BuildConfig, mounts: Vec<VolumeMount>) -> Container {
    let bind = if config.listen_on_pod_ip { "$(POD_IP)" } else { "0.0.0.0" };
    let admin_probe = |path: &str| HTTPGetAction {
        path: Some(path.to_owned()),
        port: IntOrString::String("admin".to_owned()),
        ..HTTPGetAction::default()
    };
    let mut env_vars = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
        env("DISTCACHE_NAME", "$(POD_NAME)"),
        env("DISTCACHE_LISTEN", format!("{bind}:{GRPC_PORT}")),
        env("DISTCACHE_PEER_LISTEN", format!("{bind}:{PEER_PORT}")),
        env("DISTCACHE_ADVERTISE", format!("$(POD_IP):{PEER_PORT}")),
        env("DISTCACHE_ADMIN", format!("{bind}:{ADMIN_PORT}")),
        env("DISTCACHE_DISCOVERY", discovery_env(valid, config)),
        env("DISTCACHE_KEYSPACES_FILE", format!("{KEYSPACES_DIR}/{KEYSPACES_KEY}")),
        env("DISTCACHE_HOOKS__CACHE_DIR", HOOK_CACHE_DIR),
        env("DISTCACHE_HOOKS__CONFIG_MAP_DIR", MODULES_DIR),
        env("DISTCACHE_SHUTDOWN_DELAY", format!("{}s", config.shutdown_delay_seconds)),
        env("DISTCACHE_SHUTDOWN_GRACE", "20s"),
        // The node's `handoff.timeout`: how long it pushes its entries to their next owners on SIGTERM.
        env("DISTCACHE_HANDOFF__TIMEOUT", distcache_api::DurationString(valid.handoff_timeout).to_string()),
    ];
    if let Some(tls) = &valid.tls {
        // The node's `tls` setting, one field per variable (each value a plain path, as Kubernetes users read
        // them; peerIdentities defaults to the SANs of the certificate itself).
        env_vars.extend([
            env("DISTCACHE_TLS__CERT_FILE", format!("{TLS_DIR}/tls.crt")),
            env("DISTCACHE_TLS__KEY_FILE", format!("{TLS_DIR}/tls.key")),
            env("DISTCACHE_TLS__CA_FILE", format!("{TLS_DIR}/ca.crt")),
            env("DISTCACHE_TLS__CLIENT_AUTH", tls.client_auth.as_str()),
        ]);
    }
    if let Some(resp) = &valid.resp {
        env_vars.extend(resp_env(resp, bind));
    }
    env_vars.extend(telemetry_env(valid));
    let port = |name: &str, port: i32| ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    };
    Container {
        name: CONTAINER.to_owned(),
        image: Some(node_image(&valid.image, config)),
        image_pull_policy: valid.image.pull_policy.map(|p| p.as_str().to_owned()),
        env: Some(env_vars),
        ports: Some(
            [port("grpc", GRPC_PORT), port("peer", PEER_PORT), port("admin", ADMIN_PORT)]
                .into_iter()
                .chain(valid.resp.as_ref().map(|r| port(RESP_PORT_NAME, i32::from(r.port))))
                .collect(),
        ),
        readiness_probe: Some(Probe {
            http_get: Some(admin_probe("/readyz")),
            period_seconds: Some(2),
            timeout_seconds: Some(1),
            failure_threshold: Some(2),
            ..Probe::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(admin_probe("/healthz")),
            initial_delay_seconds: Some(10),
            period_seconds: Some(10),
            timeout_seconds: Some(2),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        resources: valid.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

/// How long Kubernetes lets a stopping node pod take before it kills it: on SIGTERM the node turns not ready and
/// keeps serving for its shutdown delay, hands its entries off for up to `spec.handoff.timeout`, then drains the
/// requests in flight (DISTCACHE_SHUTDOWN_GRACE, 20 s); 5 s more as a margin.
pub fn termination_grace_seconds(valid: &ValidSpec, config: &BuildConfig) -> i64 {
    let handoff = valid.handoff_timeout.as_secs() + u64::from(valid.handoff_timeout.subsec_nanos() > 0);
    i64::from(config.shutdown_delay_seconds) + i64::try_from(handoff).unwrap_or(i64::MAX / 2) + 25
}

fn stateful_set(valid: &ValidSpec, config: &BuildConfig) -> StatefulSet {
    let name = &valid.name;
    let (volumes, mounts) = volumes(valid);
    let container = node_container(valid, config, mounts);
    let scheduling = valid.scheduling.clone();
    let some_vec = |v: Vec<_>| if v.is_empty() { None } else { Some(v) };
    let pod = PodSpec {
        service_account_name: Some(format!("{name}-node")),
        termination_grace_period_seconds: Some(termination_grace_seconds(valid, config)),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            fs_group: Some(65532),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![container],
        volumes: Some(volumes),
        node_selector: if scheduling.node_selector.is_empty() {
            None
        } else {
            Some(scheduling.node_selector)
        },
        tolerations: some_vec(scheduling.tolerations),
        affinity: scheduling.affinity,
        topology_spread_constraints: if scheduling.topology_spread_constraints.is_empty() {
            None
        } else {
            Some(scheduling.topology_spread_constraints)
        },
        ..PodSpec::default()
    };
    StatefulSet {
        metadata: metadata(valid, name.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(valid.replicas),
            service_name: Some(format!("{name}-peers")),
            // Pods start and stop in parallel when scaling; a changed template still rolls one pod at a time
            // (highest ordinal first), each replaced pod Ready before the next goes.
            pod_management_policy: Some("Parallel".to_owned()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                ..StatefulSetUpdateStrategy::default()
            }),
            revision_history_limit: Some(10),
            selector: LabelSelector { match_labels: Some(selector_labels(name)), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(common_labels(name)), ..ObjectMeta::default() }),
                spec: Some(pod),
            },
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

#[cfg(test)]
mod tests {
    use distcache_api::DistCache;

    use super::*;
    use crate::controller::validate::{PullPolicy, ServiceType, validate};

    fn dc(yaml: &str) -> DistCache {
        let mut dc: DistCache = serde_yaml::from_str(yaml).expect("fixture parses");
        dc.metadata.uid = Some("uid-1".to_owned());
        dc
    }

    fn valid(dc: &DistCache) -> ValidSpec {
        validate(dc).expect("valid")
    }

    fn objects(dc: &DistCache, config: &BuildConfig) -> Objects {
        build(&valid(dc), config)
    }

    const DEMO: &str = r"
apiVersion: distcache.io/v1alpha1
kind: DistCache
metadata: { name: demo, namespace: apps }
spec:
  keyspaces:
    - name: users
      maxBytes: 64Mi
      hook:
        module: { configMap: { name: users-hook, key: http-json.wasm } }
        allowedHosts: ['users-origin:8080']
    - { name: sessions, maxBytes: 1Mi }
";

    #[test]
    fn demo_objects_have_names_labels_and_owner() {
        let dc = dc(DEMO);
        let o = objects(&dc, &BuildConfig::default());
        assert_eq!(o.config_map.metadata.name.as_deref(), Some("demo-keyspaces"));
        assert_eq!(o.peers_service.metadata.name.as_deref(), Some("demo-peers"));
        assert_eq!(o.client_service.metadata.name.as_deref(), Some("demo"));
        assert_eq!(o.role_binding.role_ref.name, "demo-node");
        let owner = &o.stateful_set.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("DistCache", "uid-1", Some(true))
        );
        let labels = o.stateful_set.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "distcache-operator");
        assert_eq!(
            selector_string("demo"),
            "app.kubernetes.io/instance=demo,app.kubernetes.io/name=distcache"
        );
        let pdb = o.pod_disruption_budget.expect("enabled by default");
        assert_eq!(pdb.spec.and_then(|s| s.max_unavailable), Some(IntOrString::Int(1)));
    }

    #[test]
    fn keyspaces_file_round_trips_and_modules_are_mounted() {
        let dc = dc(DEMO);
        let o = objects(&dc, &BuildConfig::default());
        let text = &o.config_map.data.as_ref().expect("data")[KEYSPACES_KEY];
        let file: KeyspacesFile = serde_yaml::from_str(text).expect("the nodes can read it");
        assert_eq!(file.keyspaces, dc.spec.keyspaces);
        let pod = o.stateful_set.spec.expect("spec").template.spec.expect("pod");
        let mounts = pod.containers[0].volume_mounts.clone().expect("mounts");
        assert!(mounts.iter().any(|m| m.mount_path == "/etc/distcache/modules/users-hook"), "{mounts:?}");
        let volumes = pod.volumes.expect("volumes");
        let module = volumes.iter().find(|v| v.name.starts_with("module-")).expect("module volume");
        assert_eq!(module.config_map.as_ref().and_then(|c| c.optional), Some(true));
        assert!(module.name.len() <= 63);
    }

    #[test]
    fn protections_reach_the_keyspaces_file_as_given() {
        let dc = dc(r"
apiVersion: distcache.io/v1alpha1
kind: DistCache
metadata: { name: demo, namespace: apps }
spec:
  keyspaces:
    - name: users
      maxBytes: 64Mi
      ttl: 5m
      hook: { module: { configMap: { name: users-hook, key: http-json.wasm } } }
      rateLimit: { fetchesPerSecond: 200, burst: 50 }
      circuitBreaker: { failureRatio: 0.25, minimumRequests: 10, window: 30s, openFor: 2s }
      staleWhileRevalidate: 30s
      staleIfError: 10m
      refreshAhead: 0.8
      warmUp: { keys: [alice, bob], fetchesPerSecond: 5 }
");
        let o = objects(&dc, &BuildConfig::default());
        let text = &o.config_map.data.as_ref().expect("data")[KEYSPACES_KEY];
        for field in [
            "rateLimit:",
            "fetchesPerSecond: 200",
            "circuitBreaker:",
            "failureRatio: 0.25",
            "openFor: 2s",
            "staleWhileRevalidate: 30s",
            "staleIfError: 10m",
            "refreshAhead: 0.8",
            "warmUp:",
        ] {
            assert!(text.contains(field), "{field:?} missing in the keyspaces file:\n{text}");
        }
        // The nodes read the same protections, with the same defaults, as the operator validated.
        let file: KeyspacesFile = serde_yaml::from_str(text).expect("the nodes can read it");
        assert_eq!(file.keyspaces, dc.spec.keyspaces);
        let on_node = distcache_api::validate_keyspaces(&file.keyspaces).expect("valid on the node");
        assert_eq!(on_node[0].protection, valid(&dc).keyspaces[0].protection);
        assert_eq!(on_node[0].protection.warm_up, Some((vec!["alice".to_owned(), "bob".to_owned()], 5)));
    }

    #[test]
    fn keyspace_changes_leave_the_pod_template_alone() {
        let before = dc(DEMO);
        let mut after = before.clone();
        after.spec.keyspaces[1].max_bytes = distcache_api::ByteSize(2 << 20);
        after.spec.keyspaces.push(serde_yaml::from_str("{ name: extra, maxBytes: 1Mi }").expect("keyspace"));
        let config = BuildConfig::default();
        let (a, b) = (objects(&before, &config), objects(&after, &config));
        assert_eq!(a.stateful_set, b.stateful_set, "no roll for keyspace changes");
        assert_ne!(a.config_map, b.config_map);
    }

    #[test]
    fn image_defaults_and_overrides() {
        let config = BuildConfig {
            node_image: "registry:5000/dc/distcache-node:1.2.3".to_owned(),
            ..BuildConfig::default()
        };
        let mut d = dc(DEMO);
        assert_eq!(node_image(&valid(&d).image, &config), "registry:5000/dc/distcache-node:1.2.3");
        d.spec.image = Some(distcache_api::ImageSpec { tag: Some("1.2.4".to_owned()), ..Default::default() });
        assert_eq!(node_image(&valid(&d).image, &config), "registry:5000/dc/distcache-node:1.2.4");
        let config = BuildConfig { node_image: "localhost:5000/node".to_owned(), ..BuildConfig::default() };
        d.spec.image = None;
        assert_eq!(node_image(&valid(&d).image, &config), "localhost:5000/node");
    }

    #[test]
    fn discovery_settings_reach_the_node() {
        let mut d = dc(DEMO);
        let config = BuildConfig::default();
        let env_of = |d: &DistCache| -> String {
            let set = stateful_set(&valid(d), &config);
            let pod = set.spec.expect("spec").template.spec.expect("pod");
            let env = pod.containers[0].env.clone().expect("env");
            env.into_iter().find(|e| e.name == "DISTCACHE_DISCOVERY").and_then(|e| e.value).expect("set")
        };
        assert!(env_of(&d).contains(
            r#""labelSelector":"app.kubernetes.io/instance=demo,app.kubernetes.io/name=distcache""#
        ));
        d.spec.discovery = serde_yaml::from_str("{ dns: {} }").expect("dns");
        assert!(env_of(&d).contains("demo-peers.apps.svc.cluster.local"), "{}", env_of(&d));
        d.spec.discovery = serde_yaml::from_str("{ nats: { url: 'nats://n:4222' } }").expect("nats");
        assert!(env_of(&d).contains("distcache.apps.demo"), "{}", env_of(&d));
    }

    #[test]
    fn disabled_pdb_is_not_built() {
        let mut d = dc(DEMO);
        d.spec.pod_disruption_budget.enabled = false;
        assert!(objects(&d, &BuildConfig::default()).pod_disruption_budget.is_none());
    }

    fn container(o: &Objects) -> Container {
        let pod = o.stateful_set.spec.clone().expect("spec").template.spec.expect("pod");
        pod.containers[0].clone()
    }

    #[test]
    fn typed_settings_reach_the_objects_as_kubernetes_spells_them() {
        let mut d = dc(DEMO);
        let config = BuildConfig::default();
        let o = objects(&d, &config);
        assert_eq!(container(&o).image_pull_policy, None, "Kubernetes' default for the tag");
        let service_type = |o: &Objects| o.client_service.spec.clone().and_then(|s| s.type_);
        assert_eq!(service_type(&o).as_deref(), Some("ClusterIP"));
        for (policy, text) in [
            (PullPolicy::Always, "Always"),
            (PullPolicy::IfNotPresent, "IfNotPresent"),
            (PullPolicy::Never, "Never"),
        ] {
            d.spec.image =
                Some(distcache_api::ImageSpec { pull_policy: Some(text.to_owned()), ..Default::default() });
            let v = valid(&d);
            assert_eq!(v.image.pull_policy, Some(policy));
            assert_eq!(container(&build(&v, &config)).image_pull_policy.as_deref(), Some(text));
        }
        for (type_, text) in [
            (ServiceType::ClusterIp, "ClusterIP"),
            (ServiceType::NodePort, "NodePort"),
            (ServiceType::LoadBalancer, "LoadBalancer"),
        ] {
            d.spec.service.type_ = Some(text.to_owned());
            let v = valid(&d);
            assert_eq!(v.service.type_, type_);
            assert_eq!(service_type(&build(&v, &config)).as_deref(), Some(text));
        }
    }

    #[test]
    fn the_grace_period_covers_shutdown_delay_handoff_and_drain() {
        let grace = |yaml: &str, delay: u32| {
            let config = BuildConfig { shutdown_delay_seconds: delay, ..BuildConfig::default() };
            let o = objects(&dc(&format!("{DEMO}{yaml}")), &config);
            o.stateful_set.spec.and_then(|s| s.template.spec).and_then(|p| p.termination_grace_period_seconds)
        };
        assert_eq!(grace("", 5), Some(5 + 10 + 25), "default handoff timeout 10s");
        let handoff = |yaml: &str| {
            env_value(
                &container(&objects(&dc(&format!("{DEMO}{yaml}")), &BuildConfig::default())),
                "DISTCACHE_HANDOFF__TIMEOUT",
            )
        };
        assert_eq!(handoff("").as_deref(), Some("10s"), "the node's handoff.timeout");
        assert_eq!(handoff("  handoff: { timeout: 1500ms }\n").as_deref(), Some("1s500ms"));
        assert_eq!(grace("  handoff: { timeout: 0s }\n", 5), Some(5 + 25), "no handoff");
        assert_eq!(
            grace("  handoff: { timeout: 1500ms }\n", 3),
            Some(3 + 2 + 25),
            "whole seconds, rounded up"
        );
    }

    #[test]
    fn the_stateful_set_replicas_can_differ_from_the_spec() {
        let o = objects(&dc(DEMO), &BuildConfig::default());
        let replicas = |o: &Objects| o.stateful_set.spec.as_ref().and_then(|s| s.replicas);
        assert_eq!(replicas(&o), Some(3));
        let stepped = o.clone().with_stateful_set_replicas(4);
        assert_eq!(replicas(&stepped), Some(4));
        assert_eq!(
            stepped.stateful_set.spec.map(|s| s.template),
            o.stateful_set.spec.map(|s| s.template),
            "only the replicas"
        );
    }

    #[test]
    fn pdb_policy_sets_exactly_one_bound() {
        let mut d = dc(DEMO);
        let bounds = |d: &DistCache| {
            let spec = objects(d, &BuildConfig::default()).pod_disruption_budget.expect("enabled").spec;
            let spec = spec.expect("spec");
            (spec.max_unavailable, spec.min_available)
        };
        assert_eq!(bounds(&d), (Some(IntOrString::Int(1)), None));
        d.spec.pod_disruption_budget.min_available = Some(IntOrString::String("50%".to_owned()));
        assert_eq!(bounds(&d), (None, Some(IntOrString::String("50%".to_owned()))));
        d.spec.pod_disruption_budget.min_available = None;
        d.spec.pod_disruption_budget.max_unavailable = Some(IntOrString::Int(2));
        assert_eq!(bounds(&d), (Some(IntOrString::Int(2)), None));
    }

    fn env_value(c: &Container, name: &str) -> Option<String> {
        c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.clone())
    }

    #[test]
    fn the_client_port_is_on_the_client_service_and_the_peer_port_only_on_the_headless_one() {
        let o = objects(&dc(DEMO), &BuildConfig::default());
        let ports = |s: &Service| -> Vec<(Option<String>, i32)> {
            s.spec.iter().flat_map(|s| s.ports.iter().flatten()).map(|p| (p.name.clone(), p.port)).collect()
        };
        assert_eq!(ports(&o.client_service), [(Some("grpc".to_owned()), 7420)]);
        assert_eq!(ports(&o.peers_service), [(Some("peer".to_owned()), 7422)]);
        let c = container(&o);
        let declared: Vec<(Option<String>, i32)> =
            c.ports.iter().flatten().map(|p| (p.name.clone(), p.container_port)).collect();
        assert_eq!(
            declared,
            [
                (Some("grpc".to_owned()), 7420),
                (Some("peer".to_owned()), 7422),
                (Some("admin".to_owned()), 7421)
            ]
        );
        assert_eq!(env_value(&c, "DISTCACHE_LISTEN").as_deref(), Some("0.0.0.0:7420"));
        assert_eq!(env_value(&c, "DISTCACHE_PEER_LISTEN").as_deref(), Some("0.0.0.0:7422"));
        assert_eq!(
            env_value(&c, "DISTCACHE_ADVERTISE").as_deref(),
            Some("$(POD_IP):7422"),
            "peers dial the peer port"
        );
        assert_eq!(env_value(&c, "DISTCACHE_ADMIN").as_deref(), Some("0.0.0.0:7421"));
        let discovery = env_value(&c, "DISTCACHE_DISCOVERY").expect("discovery");
        assert!(discovery.contains(r#""portName":"peer""#), "{discovery}");

        let on_pod_ip = BuildConfig { listen_on_pod_ip: true, ..BuildConfig::default() };
        let c = container(&objects(&dc(DEMO), &on_pod_ip));
        assert_eq!(env_value(&c, "DISTCACHE_LISTEN").as_deref(), Some("$(POD_IP):7420"));
        assert_eq!(env_value(&c, "DISTCACHE_PEER_LISTEN").as_deref(), Some("$(POD_IP):7422"));
        assert_eq!(env_value(&c, "DISTCACHE_ADMIN").as_deref(), Some("$(POD_IP):7421"));

        let mut d = dc(DEMO);
        d.spec.discovery = serde_yaml::from_str("{ dns: {} }").expect("dns");
        let c = container(&objects(&d, &BuildConfig::default()));
        let discovery: serde_json::Value =
            serde_json::from_str(&env_value(&c, "DISTCACHE_DISCOVERY").expect("discovery")).expect("json");
        assert_eq!(discovery["dns"]["port"], 7422, "DNS discovery resolves the headless Service's peer port");
    }

    #[test]
    fn the_network_policy_admits_the_peer_port_only_from_the_same_distcache() {
        let o = objects(&dc(DEMO), &BuildConfig::default());
        let policy = o.network_policy.expect("enabled by default");
        assert_eq!(policy.metadata.name.as_deref(), Some("demo"));
        assert_eq!(policy.metadata.namespace.as_deref(), Some("apps"));
        assert!(policy.metadata.owner_references.is_some());
        let spec = policy.spec.expect("spec");
        let nodes =
            Some(LabelSelector { match_labels: Some(selector_labels("demo")), ..LabelSelector::default() });
        assert_eq!(spec.pod_selector, nodes);
        assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_owned()][..]));
        let rules = spec.ingress.expect("ingress rules");
        let ports = |r: &NetworkPolicyIngressRule| -> Vec<(IntOrString, String)> {
            r.ports
                .iter()
                .flatten()
                .map(|p| (p.port.clone().expect("port"), p.protocol.clone().expect("protocol")))
                .collect()
        };
        assert_eq!(rules.len(), 2);
        assert_eq!(ports(&rules[0]), [(IntOrString::Int(7422), "TCP".to_owned())]);
        let from = rules[0].from.clone().expect("the peer port has sources");
        assert_eq!(from.len(), 1);
        assert_eq!(from[0].pod_selector, nodes, "only pods of this DistCache");
        assert_eq!(from[0].namespace_selector, None, "in its own namespace");
        assert_eq!(from[0].ip_block, None);
        assert_eq!(
            ports(&rules[1]),
            [(IntOrString::Int(7420), "TCP".to_owned()), (IntOrString::Int(7421), "TCP".to_owned())]
        );
        assert_eq!(rules[1].from, None, "client and admin ports from anywhere");

        let mut d = dc(DEMO);
        d.spec.network_policy.enabled = false;
        assert!(objects(&d, &BuildConfig::default()).network_policy.is_none());
    }

    const TLS_SECRET: &str = "tls: { secretName: demo-certs, clientAuth: required }";
    const TLS_CERT_MANAGER: &str =
        "tls: { certManager: { issuerRef: { name: ca }, duration: 90d, renewBefore: 15d } }";

    fn with_tls(yaml: &str) -> DistCache {
        let mut d = dc(DEMO);
        let tls: serde_json::Value = serde_yaml::from_str(yaml).expect("tls");
        d.spec.tls = Some(serde_json::from_value(tls["tls"].clone()).expect("tls spec"));
        d
    }

    #[test]
    fn tls_mounts_the_secret_and_points_the_node_at_its_files() {
        let config = BuildConfig::default();
        let plain = objects(&dc(DEMO), &config);
        let c = container(&plain);
        assert!(
            c.env.iter().flatten().all(|e| !e.name.starts_with("DISTCACHE_TLS")),
            "no TLS without spec.tls"
        );
        assert!(plain.certificate.is_none());

        let o = objects(&with_tls(TLS_SECRET), &config);
        let c = container(&o);
        assert_eq!(env_value(&c, "DISTCACHE_TLS__CERT_FILE").as_deref(), Some("/etc/distcache/tls/tls.crt"));
        assert_eq!(env_value(&c, "DISTCACHE_TLS__KEY_FILE").as_deref(), Some("/etc/distcache/tls/tls.key"));
        assert_eq!(env_value(&c, "DISTCACHE_TLS__CA_FILE").as_deref(), Some("/etc/distcache/tls/ca.crt"));
        assert_eq!(env_value(&c, "DISTCACHE_TLS__CLIENT_AUTH").as_deref(), Some("required"));
        let mount = c.volume_mounts.iter().flatten().find(|m| m.name == "tls").expect("tls mount");
        assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/distcache/tls", Some(true)));
        let pod = o.stateful_set.spec.clone().expect("spec").template.spec.expect("pod");
        let volume = pod.volumes.iter().flatten().find(|v| v.name == "tls").expect("tls volume");
        let secret = volume.secret.clone().expect("a Secret volume");
        assert_eq!(secret.secret_name.as_deref(), Some("demo-certs"));
        assert_eq!(secret.optional, None, "required: a node never starts without its certificate");
        assert!(o.certificate.is_none(), "the user's Secret needs no Certificate");

        // The default clientAuth, and the cert-manager Secret name.
        let o = objects(&with_tls(TLS_CERT_MANAGER), &config);
        let c = container(&o);
        assert_eq!(env_value(&c, "DISTCACHE_TLS__CLIENT_AUTH").as_deref(), Some("none"));
        let pod = o.stateful_set.spec.clone().expect("spec").template.spec.expect("pod");
        let volume = pod.volumes.iter().flatten().find(|v| v.name == "tls").expect("tls volume");
        assert_eq!(volume.secret.as_ref().and_then(|s| s.secret_name.as_deref()), Some("demo-tls"));
    }

    #[test]
    fn turning_tls_on_rolls_the_pods_but_a_new_certificate_does_not() {
        let config = BuildConfig::default();
        let template = |d: &DistCache| objects(d, &config).stateful_set.spec.expect("spec").template;
        let on = with_tls(TLS_SECRET);
        assert_ne!(template(&dc(DEMO)), template(&on), "TLS on is a configuration change");
        // The certificate is the Secret's content, which the template does not name: rotating it (a new Secret
        // content, a renewal by cert-manager) leaves the StatefulSet as it is; the nodes reload the files.
        assert_eq!(template(&on), template(&with_tls(TLS_SECRET)));
        let template_text = serde_json::to_string(&template(&on)).expect("json");
        assert!(!template_text.contains("tls.crt\":"), "no Secret content in the template");
    }

    #[test]
    fn the_certificate_covers_the_client_service_and_every_pod() {
        let config = BuildConfig { cluster_domain: "example.internal".to_owned(), ..BuildConfig::default() };
        let o = objects(&with_tls(TLS_CERT_MANAGER), &config);
        let cert = o.certificate.expect("a Certificate for certManager");
        assert_eq!(
            cert.types.as_ref().map(|t| (t.api_version.as_str(), t.kind.as_str())),
            Some(("cert-manager.io/v1", "Certificate"))
        );
        assert_eq!(cert.metadata.name.as_deref(), Some("demo-tls"));
        assert_eq!(cert.metadata.namespace.as_deref(), Some("apps"));
        let owner = &cert.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("DistCache", Some(true)));
        let spec = &cert.data["spec"];
        assert_eq!(spec["secretName"], "demo-tls");
        assert_eq!(
            spec["issuerRef"],
            serde_json::json!({ "name": "ca", "kind": "Issuer", "group": "cert-manager.io" }),
            "kind and group defaulted"
        );
        assert_eq!(
            spec["dnsNames"],
            serde_json::json!([
                "demo",
                "demo.apps",
                "demo.apps.svc",
                "demo.apps.svc.example.internal",
                "demo-peers.apps.svc",
                "demo-peers.apps.svc.example.internal",
                "*.demo-peers.apps.svc",
                "*.demo-peers.apps.svc.example.internal",
            ])
        );
        assert_eq!(
            spec["usages"],
            serde_json::json!(["server auth", "client auth", "digital signature", "key encipherment"]),
            "the peers use the same certificate as mutual-TLS clients"
        );
        assert_eq!(
            (spec["duration"].as_str(), spec["renewBefore"].as_str()),
            (Some("2160h0m0s"), Some("360h0m0s"))
        );

        let mut d =
            with_tls("tls: { certManager: { issuerRef: { name: ca, kind: ClusterIssuer, group: x.io } } }");
        d.metadata.namespace = Some("other".to_owned());
        let cert = objects(&d, &BuildConfig::default()).certificate.expect("certificate");
        assert_eq!(
            cert.data["spec"]["issuerRef"],
            serde_json::json!({ "name": "ca", "kind": "ClusterIssuer", "group": "x.io" })
        );
        assert!(cert.data["spec"].get("duration").is_none(), "cert-manager's default lifetime");
        assert_eq!(cert.data["spec"]["dnsNames"][2], "demo.other.svc");
    }

    #[test]
    fn go_durations_are_what_cert_manager_parses() {
        use std::time::Duration;
        assert_eq!(go_duration(Duration::from_hours(2160)), "2160h0m0s");
        assert_eq!(go_duration(Duration::from_secs(3600 + 120 + 3)), "1h2m3s");
        assert_eq!(go_duration(Duration::from_millis(90_500)), "0h1m30s");
    }

    /// The openAPIV3Schema of a CRD version.
    fn crd_schema(crd_yaml: &str, version: &str) -> serde_json::Value {
        let crd: serde_json::Value = serde_yaml::from_str(crd_yaml).expect("the CRD parses");
        crd["spec"]["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == version)
            .map(|v| v["schema"]["openAPIV3Schema"].clone())
            .expect("the version has a schema")
    }

    /// Checks `value` against a structural schema the way an API server does for what the operator sends: types,
    /// enums, required fields, and no field the schema does not declare (server-side apply refuses those).
    fn structural_errors(
        schema: &serde_json::Value,
        value: &serde_json::Value,
        at: &str,
        errors: &mut Vec<String>,
    ) {
        use serde_json::Value;
        let type_ok = match (schema["type"].as_str(), value) {
            (Some("object"), Value::Object(_))
            | (Some("array"), Value::Array(_))
            | (Some("string"), Value::String(_))
            | (Some("boolean"), Value::Bool(_))
            | (Some("number"), Value::Number(_))
            | (None, _) => true,
            (Some("integer"), Value::Number(n)) => n.is_i64() || n.is_u64(),
            _ => false,
        };
        if !type_ok {
            errors.push(format!("{at}: {value} is not of type {}", schema["type"]));
            return;
        }
        if let Some(allowed) = schema["enum"].as_array()
            && !allowed.contains(value)
        {
            errors.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
        match value {
            Value::Object(fields) => {
                for required in schema["required"].as_array().into_iter().flatten() {
                    if !fields.contains_key(required.as_str().unwrap_or_default()) {
                        errors.push(format!("{at}.{}: required", required.as_str().unwrap_or_default()));
                    }
                }
                for (name, field) in fields {
                    let path = format!("{at}.{name}");
                    match (schema["properties"].get(name), &schema["additionalProperties"]) {
                        (Some(sub), _) => structural_errors(sub, field, &path, errors),
                        (None, Value::Object(sub)) => {
                            structural_errors(&Value::Object(sub.clone()), field, &path, errors);
                        }
                        _ if schema["x-kubernetes-preserve-unknown-fields"] == true => {}
                        _ => errors.push(format!("{path}: field not declared in schema")),
                    }
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    structural_errors(&schema["items"], item, &format!("{at}[{i}]"), errors);
                }
            }
            _ => {}
        }
    }

    /// cert-manager's published CRD of certificates.cert-manager.io (v1.8.2, from the crates.io package
    /// cert-manager-crds; see the file's header).
    const CERT_MANAGER_CRD: &str = include_str!("../../testdata/cert-manager-v1.8.2-certificates.crd.yaml");

    #[test]
    fn the_certificate_matches_cert_managers_published_schema() {
        let schema = crd_schema(CERT_MANAGER_CRD, "v1");
        for yaml in [
            TLS_CERT_MANAGER,
            "tls: { certManager: { issuerRef: { name: ca, kind: ClusterIssuer } }, clientAuth: optional }",
        ] {
            let cert = objects(&with_tls(yaml), &BuildConfig::default()).certificate.expect("certificate");
            let value = serde_json::to_value(&cert).expect("json");
            assert_eq!(
                (value["apiVersion"].as_str(), value["kind"].as_str()),
                (Some("cert-manager.io/v1"), Some("Certificate"))
            );
            let mut errors = Vec::new();
            structural_errors(&schema["properties"]["spec"], &value["spec"], "spec", &mut errors);
            assert!(errors.is_empty(), "{yaml}: {errors:?}");
        }
        // The check has teeth: what cert-manager's schema refuses is refused here.
        for (bad, expected) in [
            (
                serde_json::json!({ "secretName": "s", "issuerRef": { "name": "ca" }, "usages": ["server-auth"] }),
                "spec.usages[0]",
            ),
            (
                serde_json::json!({ "secretName": "s", "issuerRef": { "kind": "Issuer" } }),
                "spec.issuerRef.name: required",
            ),
            (serde_json::json!({ "issuerRef": { "name": "ca" } }), "spec.secretName: required"),
            (
                serde_json::json!({ "secretName": "s", "issuerRef": { "name": "ca" }, "dnsName": ["x"] }),
                "spec.dnsName: field not declared",
            ),
            (
                serde_json::json!({ "secretName": "s", "issuerRef": { "name": "ca" }, "duration": 3600 }),
                "spec.duration",
            ),
        ] {
            let mut errors = Vec::new();
            structural_errors(&schema["properties"]["spec"], &bad, "spec", &mut errors);
            assert!(errors.iter().any(|e| e.contains(expected)), "{bad} gave {errors:?}");
        }
    }

    fn with_resp(yaml: &str) -> DistCache {
        dc(&format!("{DEMO}  resp: {yaml}\n"))
    }

    fn client_ports(o: &Objects) -> Vec<(Option<String>, i32, Option<IntOrString>)> {
        o.client_service
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .map(|p| (p.name.clone(), p.port, p.target_port.clone()))
            .collect()
    }

    #[test]
    fn without_resp_enabled_the_objects_are_those_without_resp() {
        let config = BuildConfig::default();
        let json = |d: &DistCache| {
            let o = objects(d, &config);
            serde_json::to_string(&(
                &o.stateful_set,
                &o.client_service,
                &o.peers_service,
                &o.network_policy,
                &o.config_map,
            ))
            .expect("json")
        };
        let absent = json(&dc(DEMO));
        assert_eq!(json(&with_resp("{}")), absent, "resp: {{}} is off");
        assert_eq!(
            json(&with_resp(
                "{ enabled: false, port: 7000, defaultKeyspace: users, passwordSecret: { name: s, key: k } }"
            )),
            absent,
            "a disabled front end leaves no trace"
        );
        assert!(!absent.contains("DISTCACHE_RESP") && !absent.contains(r#""resp"#), "{absent}");
    }

    #[test]
    fn resp_adds_its_port_to_the_pods_the_client_service_and_the_network_policy() {
        let config = BuildConfig::default();
        let o = objects(&with_resp("{ enabled: true, defaultKeyspace: users }"), &config);
        let c = container(&o);
        let declared: Vec<(Option<String>, i32)> =
            c.ports.iter().flatten().map(|p| (p.name.clone(), p.container_port)).collect();
        assert_eq!(
            declared,
            [
                (Some("grpc".to_owned()), 7420),
                (Some("peer".to_owned()), 7422),
                (Some("admin".to_owned()), 7421),
                (Some("resp".to_owned()), 6379),
            ]
        );
        assert_eq!(
            client_ports(&o),
            [
                (Some("grpc".to_owned()), 7420, Some(IntOrString::String("grpc".to_owned()))),
                (Some("resp".to_owned()), 6379, Some(IntOrString::String("resp".to_owned()))),
            ]
        );
        let peer_ports: Vec<i32> =
            o.peers_service.spec.iter().flat_map(|s| s.ports.iter().flatten()).map(|p| p.port).collect();
        assert_eq!(peer_ports, [7422], "the headless peer Service carries the peer port only");
        assert_eq!(env_value(&c, "DISTCACHE_RESP__LISTEN").as_deref(), Some("0.0.0.0:6379"));
        assert_eq!(env_value(&c, "DISTCACHE_RESP__DEFAULT_KEYSPACE").as_deref(), Some("users"));
        assert_eq!(env_value(&c, "DISTCACHE_RESP__PASSWORD_FILE"), None, "no password asked for");
        assert!(c.volume_mounts.iter().flatten().all(|m| m.name != "resp-password"));
        let rules = o.network_policy.and_then(|p| p.spec).and_then(|s| s.ingress).expect("ingress rules");
        let open: Vec<Option<IntOrString>> =
            rules[1].ports.iter().flatten().map(|p| p.port.clone()).collect();
        assert_eq!(
            open,
            [Some(IntOrString::Int(7420)), Some(IntOrString::Int(7421)), Some(IntOrString::Int(6379))],
            "RESP clients come from anywhere, as gRPC clients do"
        );
        assert_eq!(rules[1].from, None);

        // Another port; on the test bed's shared network, the pod IP like the other ports.
        let on_pod_ip = BuildConfig { listen_on_pod_ip: true, ..BuildConfig::default() };
        let o = objects(&with_resp("{ enabled: true, port: 16379 }"), &on_pod_ip);
        let c = container(&o);
        assert_eq!(env_value(&c, "DISTCACHE_RESP__LISTEN").as_deref(), Some("$(POD_IP):16379"));
        assert_eq!(env_value(&c, "DISTCACHE_RESP__DEFAULT_KEYSPACE"), None);
        assert_eq!(client_ports(&o)[1].1, 16379);
        assert!(
            c.ports.iter().flatten().any(|p| p.name.as_deref() == Some("resp") && p.container_port == 16379)
        );

        let template = |d: &DistCache| objects(d, &config).stateful_set.spec.expect("spec").template;
        assert_ne!(
            template(&dc(DEMO)),
            template(&with_resp("{ enabled: true }")),
            "turning it on rolls the pods"
        );
    }

    #[test]
    fn tracing_and_log_become_the_nodes_settings() {
        let config = BuildConfig::default();
        let c = container(&objects(&dc(DEMO), &config));
        assert!(
            c.env.iter().flatten().all(|e| !e.name.starts_with("DISTCACHE_TRACING")
                && !e.name.starts_with("DISTCACHE_LOG")
                && !e.name.starts_with("OTEL_")),
            "nothing without spec.tracing and spec.log"
        );
        let traced = dc(&format!(
            "{DEMO}  tracing: {{ otlpEndpoint: 'http://otel:4317', sampleRatio: 0.5, recordKeys: true }}\n  \
             log: {{ format: json, level: 'info,distcache_node=debug' }}\n"
        ));
        let c = container(&objects(&traced, &config));
        for (name, value) in [
            ("DISTCACHE_TRACING__OTLP_ENDPOINT", "http://otel:4317"),
            ("DISTCACHE_TRACING__SAMPLE_RATIO", "0.5"),
            ("DISTCACHE_TRACING__RECORD_KEYS", "true"),
            ("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)"),
            ("DISTCACHE_LOG__FORMAT", "json"),
            ("DISTCACHE_LOG__LEVEL", "info,distcache_node=debug"),
        ] {
            assert_eq!(env_value(&c, name).as_deref(), Some(value), "{name}");
        }
        let names: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        let at = |n: &str| names.iter().position(|x| *x == n);
        assert!(at("POD_NAMESPACE") < at("OTEL_RESOURCE_ATTRIBUTES"), "$(POD_NAMESPACE) is defined before");
        let template = |d: &DistCache| objects(d, &config).stateful_set.spec.expect("spec").template;
        assert_ne!(template(&dc(DEMO)), template(&traced), "changing them rolls the pods");
    }

    #[test]
    fn the_resp_password_secret_is_mounted_read_only_and_named_to_the_node() {
        let o = objects(
            &with_resp("{ enabled: true, passwordSecret: { name: redis-auth, key: the-password } }"),
            &BuildConfig::default(),
        );
        let c = container(&o);
        assert_eq!(
            env_value(&c, "DISTCACHE_RESP__PASSWORD_FILE").as_deref(),
            Some("/etc/distcache/resp/password")
        );
        let mount = c.volume_mounts.iter().flatten().find(|m| m.name == "resp-password").expect("mounted");
        assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/distcache/resp", Some(true)));
        let pod = o.stateful_set.spec.expect("spec").template.spec.expect("pod");
        let volume = pod.volumes.iter().flatten().find(|v| v.name == "resp-password").expect("volume");
        let secret = volume.secret.clone().expect("a Secret volume");
        assert_eq!(secret.secret_name.as_deref(), Some("redis-auth"));
        assert_eq!(secret.optional, None, "required: the pod waits for the Secret");
        let items = secret.items.expect("only the named key");
        assert_eq!(
            items.iter().map(|i| (i.key.as_str(), i.path.as_str())).collect::<Vec<_>>(),
            [("the-password", "password")]
        );
        let text = serde_json::to_string(&pod).expect("json");
        assert!(!text.contains("secretKeyRef"), "the password never goes into the environment");
    }

    #[test]
    fn a_default_keyspace_reaches_the_node_as_the_string_it_is() {
        for name in ["users", "a.b", "a-b_c", "123", "1e3", "true", "null", "0x1f", "1.5"] {
            let value = yaml_string(name);
            assert_eq!(
                serde_yaml::from_str::<String>(&value).ok().as_deref(),
                Some(name),
                "{name} as {value}"
            );
            let read: serde_yaml::Value = serde_yaml::from_str(&value).expect("yaml");
            assert_eq!(read, serde_yaml::Value::String(name.to_owned()), "{name} as {value}");
        }
        assert_eq!(yaml_string("users"), "users", "plain where plain reads back");
        assert_eq!(yaml_string("123"), r#""123""#);
    }

    #[test]
    fn every_object_goes_to_the_distcache_namespace() {
        let o = objects(&dc(DEMO), &BuildConfig::default());
        let namespaces = [
            &o.config_map.metadata,
            &o.service_account.metadata,
            &o.role.metadata,
            &o.role_binding.metadata,
            &o.peers_service.metadata,
            &o.client_service.metadata,
            &o.stateful_set.metadata,
        ]
        .map(|m| m.namespace.as_deref());
        assert_eq!(namespaces, [Some("apps"); 7]);
        let subjects = o.role_binding.subjects.expect("subjects");
        assert_eq!(subjects[0].namespace.as_deref(), Some("apps"));
    }
}
