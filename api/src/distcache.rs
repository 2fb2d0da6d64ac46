//! The `DistCache` custom resource (`distcache.io/v1alpha1`): one distributed cache, its nodes and keyspaces.
//!
//! The doc comments of every field are the text `kubectl explain distcache.spec.<field>` shows. Cross-field rules
//! are CEL (`x-kubernetes-validations`), checked by API servers that know CEL (1.25+); the operator validates the
//! same rules itself so an older server never gets an invalid object further than a `Degraded` condition.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint},
    apimachinery::pkg::{apis::meta::v1::Condition, util::intstr::IntOrString},
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::KeyspaceSpec;

/// API group of the DistCache resource.
pub const GROUP: &str = "distcache.io";
/// API version of the DistCache resource.
pub const VERSION: &str = "v1alpha1";
/// Default number of cache nodes.
pub const DEFAULT_REPLICAS: i32 = 3;
/// Most cache nodes one DistCache may ask for.
pub const MAX_REPLICAS: i32 = 1000;

/// The desired state of one distributed cache: how many nodes, which image, which keyspaces, how the nodes find
/// each other and how they are scheduled and exposed.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "distcache.io",
    version = "v1alpha1",
    kind = "DistCache",
    plural = "distcaches",
    shortname = "dc",
    category = "all",
    namespaced,
    status = "DistCacheStatus",
    doc = "A distributed read-through cache: the operator runs `replicas` cache nodes as a StatefulSet, shards \
           every keyspace over them by consistent hashing and keeps the keyspaces ConfigMap in step with \
           `spec.keyspaces` (no restart needed for keyspace changes).",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Ready nodes / desired nodes"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Desired number of cache nodes"
    ),
    printcolumn(
        name = "Keyspaces",
        type_ = "integer",
        json_path = ".status.keyspaceCount",
        description = "Number of keyspaces served"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = kube::core::Rule::new(
        "self.metadata.name.size() <= 52 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
    ).message(
        "metadata.name: a DistCache name is a DNS label of at most 52 characters (lowercase letters, digits, '-', \
         starting with a letter): it names the StatefulSet, its pods and Services"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.resp) || !has(self.resp.defaultKeyspace) || \
     (has(self.keyspaces) && self.keyspaces.exists(k, k.name == self.resp.defaultKeyspace))"
).message("resp.defaultKeyspace must be the name of one of spec.keyspaces"))]
pub struct DistCacheSpec {
    /// Number of cache nodes (pods). Keys are sharded over the nodes; new nodes start all at once, and scaling in
    /// removes the highest-numbered pod first, one at a time: the next pod stops only once the previous one is
    /// gone (it hands its entries to the remaining nodes while it stops, see handoff). Also settable through the
    /// scale subresource (`kubectl scale dc`). Default 3.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// The node container image. Fields left out come from the operator's default node image (the Helm chart's
    /// `node.image` value). Changing it replaces the pods one at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSpec>,

    /// CPU and memory requests and limits of each node container. Size memory above the sum of the keyspaces'
    /// maxBytes plus about 64Mi per 16 hook instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// The keyspaces every node serves, unique by name. Changes are written to the keyspaces ConfigMap and
    /// picked up by the running nodes without a restart; a change the nodes refuse keeps the previous keyspaces
    /// serving and shows in `status.keyspaces`.
    #[serde(default)]
    #[schemars(length(max = 256), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub keyspaces: Vec<KeyspaceSpec>,

    /// How the nodes find each other. Default: the Kubernetes API (the started pods of this DistCache).
    #[serde(default)]
    pub discovery: DiscoverySpec,

    /// Where the node pods may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<SchedulingSpec>,

    /// The PodDisruptionBudget that keeps voluntary disruptions (node drains) from taking down more than one
    /// cache node at a time. Default: enabled with maxUnavailable 1.
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetSpec,

    /// The client Service `<name>` that applications connect to (gRPC port 7420, and the Redis-protocol port
    /// `resp` when spec.resp is enabled).
    #[serde(default)]
    pub service: ServiceSpec,

    /// TLS for the nodes: with it, the client port 7420 serves TLS and the peer port 7422 (node to node) requires
    /// mutual TLS between the nodes of this DistCache. The certificate comes from a Secret you provide
    /// (`secretName`) or from cert-manager (`certManager`); either way the nodes re-read it when the Secret
    /// changes, without a restart. Default: no TLS (plain gRPC). Turning TLS on or off rolls the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// The NetworkPolicy `<name>` that admits the peer port 7422 only from the node pods of this DistCache (the
    /// client port 7420, the admin port 7421 and the Redis-protocol port of spec.resp stay open). Default:
    /// enabled. It is enforced only where the cluster's network plugin enforces NetworkPolicies.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,

    /// What a stopping node does with its entries (a scale-in, a roll, a drain): it pushes them to the nodes that
    /// own them next, so that they do not start cold. Default: `timeout: 10s`.
    #[serde(default)]
    pub handoff: HandoffSpec,

    /// A Redis-protocol (RESP2/RESP3) front end on every node, for clients that speak Redis (`redis-cli`, any
    /// Redis client library): `GET users:42` reads key 42 of keyspace users through the cache like the gRPC Get
    /// does. When enabled, each node also listens on `port` (default 6379), which the client Service `<name>`
    /// exposes as the port `resp`. Plain TCP even with `spec.tls`. Default: off. Turning it on or off, or
    /// changing any of its fields, rolls the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resp: Option<RespSpec>,

    /// Traces of the nodes' request path (a Get through the node that forwards it, the owner, the data source's
    /// hook and its HTTP calls), exported over OTLP/gRPC to a collector. Default: off. Changing it rolls the
    /// pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,

    /// How the nodes log (on stderr, as `kubectl logs` shows). Default: text lines at level `info`. Changing it
    /// rolls the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogSpec>,
}

fn default_replicas() -> i32 {
    DEFAULT_REPLICAS
}

/// A container image: repository, tag and pull policy.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// Image repository, for example `ghcr.io/distcache/distcache-node`. Default: the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub repository: Option<String>,
    /// Image tag. Default: the operator's (its own version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub tag: Option<String>,
    /// Pull policy: Always, IfNotPresent or Never. Default: the Kubernetes default for the tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Always", "IfNotPresent", "Never"]))]
    pub pull_policy: Option<String>,
}

/// How the nodes find each other: exactly one backend. Default: `kubernetes: {}`.
#[derive(KubeSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.kubernetes) ? 1 : 0) + (has(self.dns) ? 1 : 0) + (has(self.nats) ? 1 : 0) == 1"
).message("discovery: set exactly one of kubernetes, dns or nats"))]
pub struct DiscoverySpec {
    /// Watch the pods of this DistCache through the Kubernetes API (the operator grants the nodes a Role to list
    /// and watch pods). A pod is a member once its container has started, Ready or not, and leaves as soon as it
    /// starts terminating; pods started together form one ring before any of them is Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesDiscoverySpec>,
    /// Resolve the headless Service `<name>-peers` (SRV records) through cluster DNS, every few seconds. For
    /// clusters where the nodes must not read the Kubernetes API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsDiscoverySpec>,
    /// Announcements and heartbeats on a NATS subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsDiscoverySpec>,
}

impl Default for DiscoverySpec {
    fn default() -> Self {
        Self { kubernetes: Some(KubernetesDiscoverySpec {}), dns: None, nats: None }
    }
}

/// Kubernetes API discovery (no settings: the operator fills in namespace and label selector).
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesDiscoverySpec {}

/// DNS discovery through the headless Service.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsDiscoverySpec {
    /// Longest time between two resolutions, for example `5s`. Default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<crate::DurationString>,
}

/// NATS discovery.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NatsDiscoverySpec {
    /// NATS server URL, for example `nats://nats.messaging:4222`.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('nats://') || self.startsWith('tls://')")
        .message("discovery.nats.url must start with nats:// or tls://"))]
    pub url: String,
    /// Subject the nodes announce themselves on: dot-separated tokens of letters, digits, '-' and '_' (no
    /// wildcards). Default `distcache.<namespace>.<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"))]
    pub subject: Option<String>,
}

/// Scheduling constraints of the node pods (copied into the pod template).
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Node labels a node pod requires.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the node pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity of the node pods. Default: none; spreading the nodes over machines with
    /// topologySpreadConstraints or pod anti-affinity is recommended in production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How the node pods spread over zones or machines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
}

/// The PodDisruptionBudget of the node pods.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!(has(self.minAvailable) && has(self.maxUnavailable))")
    .message("podDisruptionBudget: set minAvailable or maxUnavailable, not both"))]
pub struct PodDisruptionBudgetSpec {
    /// Whether the operator creates the PodDisruptionBudget `<name>`. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Most node pods that a voluntary disruption may take down at once (a number or a percentage). Default 1
    /// when minAvailable is not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
    /// Fewest node pods that must stay up during a voluntary disruption (a number or a percentage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<IntOrString>,
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        Self { enabled: true, max_unavailable: None, min_available: None }
    }
}

fn default_true() -> bool {
    true
}

/// The client Service.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type: ClusterIP, NodePort or LoadBalancer. Default ClusterIP.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["ClusterIP", "NodePort", "LoadBalancer"]))]
    pub type_: Option<String>,
    /// Annotations of the client Service (for example for a cloud load balancer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Where the nodes' TLS certificate comes from: exactly one of `secretName` or `certManager`.
#[derive(KubeSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.secretName) ? 1 : 0) + (has(self.certManager) ? 1 : 0) == 1"
).message("tls: set exactly one of secretName or certManager"))]
pub struct TlsSpec {
    /// A Secret in the DistCache's namespace, of type kubernetes.io/tls, with `tls.crt` (the nodes' certificate
    /// chain), `tls.key` (its private key) and `ca.crt` (the CA bundle that peers' and clients' certificates
    /// must chain to). One certificate serves every node: it is both the server certificate of the client and
    /// peer ports and the client certificate a node presents to its peers, so it needs the usages server auth
    /// and client auth, and SANs that clients verify (for example `<name>.<namespace>.svc`). Replacing the
    /// Secret's content rotates the certificate on the running nodes without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub secret_name: Option<String>,
    /// Let cert-manager issue the certificate: the operator creates a cert-manager.io/v1 Certificate
    /// `<name>-tls` that cert-manager keeps renewed in the Secret `<name>-tls`. Its SANs cover the client Service
    /// (`<name>`, `<name>.<namespace>`, `<name>.<namespace>.svc` and the cluster-domain form) and the pods (the
    /// wildcard `*.<name>-peers.<namespace>.svc`, and the cluster-domain form). Needs cert-manager installed;
    /// without it the DistCache reports `Degraded` (CertManagerMissing) and the pods wait for the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_manager: Option<CertManagerSpec>,
    /// Whether clients of the client port 7420 must present a certificate (chaining to `ca.crt`): none (the
    /// default), optional (verified when presented) or required. Per-keyspace access lists (`access`) need
    /// required. The peer port always requires one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
}

/// Whether clients of the client port 7420 must present a certificate (chaining to `ca.crt`): none (the
/// default), optional (verified when presented) or required. Per-keyspace access lists (`access`) need required.
/// The peer port always requires one.
#[derive(JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificate is asked for.
    #[default]
    None,
    /// A client certificate is verified when the client presents one.
    Optional,
    /// Every client must present a certificate that chains to ca.crt.
    Required,
}

impl ClientAuth {
    /// The value the node's `tls.clientAuth` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Optional => "optional",
            Self::Required => "required",
        }
    }
}

/// A cert-manager Certificate for the nodes.
#[derive(KubeSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertManagerSpec {
    /// The cert-manager Issuer or ClusterIssuer that signs the certificate. Its CA must be one the nodes trust:
    /// the issued Secret's `ca.crt` (a CA or self-signed issuer fills it in; an ACME issuer does not, and then
    /// TLSReady stays False).
    pub issuer_ref: IssuerRef,
    /// Requested lifetime of the certificate, for example `2160h` (90 days, cert-manager's default when not set).
    /// At least 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<crate::DurationString>,
    /// How long before expiry cert-manager renews it, for example `360h`. Shorter than duration. Default:
    /// cert-manager's (a third of the duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_before: Option<crate::DurationString>,
}

/// A reference to a cert-manager issuer.
#[derive(KubeSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Name of the issuer.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Kind of the issuer: Issuer (in the DistCache's namespace, the default), ClusterIssuer, or the kind of an
    /// external issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub kind: Option<String>,
    /// API group of the issuer. Default cert-manager.io (external issuers have their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub group: Option<String>,
}

/// The NetworkPolicy of the node pods.
#[derive(KubeSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Whether the operator creates the NetworkPolicy `<name>`: ingress to the node pods on the peer port 7422
    /// only from node pods of this DistCache; the client port 7420, the admin port 7421 (probes, metrics) and,
    /// with spec.resp enabled, its Redis-protocol port from anywhere; nothing else. Default true. Disabling it
    /// deletes the one the operator made.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Default of `spec.handoff.timeout`.
pub const DEFAULT_HANDOFF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest `spec.handoff.timeout`.
pub const MAX_HANDOFF_TIMEOUT: std::time::Duration = std::time::Duration::from_mins(5);

/// The handoff of a stopping node's entries.
#[derive(KubeSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HandoffSpec {
    /// Longest time a stopping node spends pushing its entries to the nodes that own them next, for example `10s`
    /// (the default); what is not handed off by then is fetched again from the source when asked for. At most
    /// 5m; `0s` turns the handoff off. The pods' terminationGracePeriodSeconds grows with it (shutdown delay +
    /// this timeout + 25 s for the drain), so changing it rolls the pods.
    #[serde(default = "default_handoff_timeout")]
    pub timeout: crate::DurationString,
}

impl Default for HandoffSpec {
    fn default() -> Self {
        Self { timeout: default_handoff_timeout() }
    }
}

fn default_handoff_timeout() -> crate::DurationString {
    crate::DurationString(DEFAULT_HANDOFF_TIMEOUT)
}

/// The nodes' traces.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TracingSpec {
    /// The OTLP/gRPC collector the nodes export spans to, an `http://` URL such as
    /// `http://otel-collector.monitoring:4317`. Required to turn tracing on.
    #[schemars(length(min = 8, max = 512), regex(pattern = r"^http://[^\s/]+(/\S*)?$"))]
    pub otlp_endpoint: String,
    /// Share of the requests that start a trace at a node, 0 to 1. Default 0.01. A request whose caller sent a
    /// sampled W3C `traceparent` is always traced, one whose caller sent an unsampled one never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sample_ratio: Option<f64>,
    /// Record the key itself on spans (`distcache.key`). Default false: keys can be personal data.
    #[serde(default)]
    pub record_keys: bool,
}

/// The nodes' logs.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogSpec {
    /// `text` (human-readable lines, the default) or `json` (one JSON object per line, with `trace_id` and
    /// `span_id` inside a traced request).
    #[serde(default)]
    pub format: LogFormatSpec,
    /// Levels in `RUST_LOG` syntax: `info` (the default), `warn`, or directives such as
    /// `info,distcache_node::hooks=debug`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub level: Option<String>,
}

/// The nodes' log line format.
#[derive(JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatSpec {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormatSpec {
    /// The spelling in the spec and in the node's `log.format`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// Default of `spec.resp.port`, Redis's own port.
pub const DEFAULT_RESP_PORT: u16 = 6379;

/// The Redis-protocol front end of the nodes.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.port) || !(self.port in [7420, 7421, 7422])")
    .message("resp.port must not be 7420, 7421 or 7422: the nodes' client, admin and peer ports"))]
pub struct RespSpec {
    /// Whether the nodes serve the Redis protocol on `port`. Default false: the other fields are then checked
    /// but not used.
    #[serde(default)]
    pub enabled: bool,
    /// TCP port of the front end on every node and on the client Service (named `resp`). 1 to 65535, not one
    /// of the nodes' other ports (7420 client gRPC, 7421 admin, 7422 peer). Default 6379.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// The keyspace of a key that does not start with the name of a keyspace and a colon: with
    /// `defaultKeyspace: users`, `GET 42` reads key 42 of users (and `GET users:42` too). Must be one of
    /// `spec.keyspaces`. Default: none, and a key without a keyspace prefix is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub default_keyspace: Option<String>,
    /// A key of a Secret in the DistCache's namespace that holds the password clients must give first
    /// (`AUTH <password>`, `redis-cli -a <password>`; a trailing newline is ignored). The Secret is mounted
    /// read-only into the node pods, which wait for it to exist. Default: none, and no password is asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretKeyRef>,
}

/// A key of a Secret in the DistCache's namespace.
#[derive(KubeSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key inside the Secret's data, for example `password`.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The observed state of a DistCache, as the operator last applied and saw it.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DistCacheStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Node pods that exist (the scale subresource's status replicas).
    #[serde(default)]
    pub replicas: i32,
    /// Node pods that are Ready and members of the cache.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Node pods that run the current pod template.
    #[serde(default)]
    pub updated_replicas: i32,
    /// `readyReplicas/replicas` as `kubectl get dc` shows it, for example `3/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// The label selector of the node pods, for the scale subresource (and HorizontalPodAutoscalers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Number of keyspaces in the spec.
    #[serde(default)]
    pub keyspace_count: i32,
    /// Available (as many Ready nodes as spec.replicas), Progressing (a roll or scale is under way) and Degraded
    /// (the spec is invalid, an object could not be applied or belongs to someone else, a node refused a
    /// keyspace, or a feature is missing on this cluster), each with a reason and message. A failed step changes
    /// only Degraded: the nodes that run keep serving. With spec.tls also TLSReady: True (SecretReady) when the
    /// TLS Secret exists with tls.crt, tls.key and ca.crt, else False with the reason (SecretMissing,
    /// KeyMissing, CertManagerMissing); without spec.tls there is no TLSReady condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The state of each keyspace's data-source hook on the nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keyspaces: Vec<KeyspaceStatus>,
}

/// The state of one keyspace on the nodes.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyspaceStatus {
    /// Keyspace name.
    pub name: String,
    /// Hook state: None (cache-aside keyspace), Loaded (every Ready node serves the current spec), Loading (some
    /// nodes do not serve it yet) or Failed (a node refused it; see message).
    pub hook: HookState,
    /// Ready nodes that serve the keyspace as specified.
    #[serde(default)]
    pub nodes_loaded: i32,
    /// SHA-256 of the hook module the nodes run, when they agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_sha256: Option<String>,
    /// Why the keyspace is not loaded everywhere (a node's refusal message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Hook state of a keyspace.
#[derive(JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HookState {
    /// A cache-aside keyspace without hook, served by every Ready node.
    None,
    /// Every Ready node serves the keyspace with its hook as specified.
    Loaded,
    /// Not every Ready node serves the keyspace as specified yet.
    #[default]
    Loading,
    /// A node refused the keyspace (its hook failed to load); the previous keyspaces keep serving.
    Failed,
}
