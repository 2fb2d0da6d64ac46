//! Node configuration: a YAML file (`--config`) whose every field can be overridden by an environment variable
//! `DISTCACHE_<FIELD>` (nested fields joined by `__`, values in YAML syntax), as pods set them:
//! `DISTCACHE_NAME=node-0`, `DISTCACHE_ADVERTISE=10.0.0.7:7422`,
//! `DISTCACHE_DISCOVERY__STATIC__PEERS='["10.0.0.7:7422","10.0.0.8:7422"]'`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use distcache_api::{ByteSize, DurationString};
use distcache_telemetry::{check_endpoint, check_level, check_sample_ratio};
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

/// Default client gRPC port (Cache, health, reflection).
pub const GRPC_PORT: u16 = 7420;
/// Default peer gRPC port (the internal Peer service).
pub const PEER_PORT: u16 = 7422;
/// Default admin HTTP port.
pub const ADMIN_PORT: u16 = 7421;

/// The node configuration file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique member name; default: the hostname.
    #[serde(default)]
    pub name: Option<String>,
    /// Client gRPC listen address: the Cache service, gRPC health and reflection.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Peer gRPC listen address: the internal Peer service only (mutual TLS when `tls` is set). Keep it off
    /// client networks: the operator exposes it only on the headless peer Service, behind a NetworkPolicy.
    #[serde(default = "default_peer_listen")]
    pub peer_listen: SocketAddr,
    /// Address peers dial (the peer port); default: `peerListen`, with 127.0.0.1 when it is unspecified
    /// (0.0.0.0).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Admin HTTP: `host:port`, or `{ listen: host:port, tls: true }` to serve it over TLS with the node's
    /// certificate (probes then use HTTPS). Default plain, so that `/metrics` scrapers and HTTP probes work.
    #[serde(default)]
    pub admin: AdminConfig,
    /// TLS: `{ certFile, keyFile, caFile, clientAuth: none|optional|required, peerIdentities: [...] }`. The client
    /// port then serves TLS and the peer port requires mutual TLS with a certificate that chains to `caFile` and
    /// carries one of `peerIdentities` (default: the SANs of this node's certificate). The files are re-read
    /// when they change; bad material is refused and the last good one keeps serving. Paths are relative to the
    /// config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<distcache_tls::TlsSettings>,
    /// How members find each other.
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    /// The keyspaces file, relative to the config file's directory; absent = no keyspaces.
    #[serde(default)]
    pub keyspaces_file: Option<PathBuf>,
    /// How often the keyspaces file is checked for changes.
    #[serde(default = "default_poll")]
    pub keyspaces_poll_interval: DurationString,
    /// Deadline of one call to a peer.
    #[serde(default = "default_peer_timeout")]
    pub peer_timeout: DurationString,
    /// Largest gRPC message accepted or sent (bounds batch sizes; values are bounded per keyspace).
    #[serde(default = "default_max_message")]
    pub max_message_bytes: ByteSize,
    /// Tokio worker threads; default: one per CPU. On a machine shared with busy neighbours (or a load
    /// generator), fewer workers avoid contending with them for cores. 1 runs the node as one event loop
    /// (tokio's current-thread scheduler), the cheapest per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
    /// How long a stopping node keeps answering in-flight requests.
    #[serde(default = "default_drain")]
    pub shutdown_grace: DurationString,
    /// How long a stopping node keeps accepting new requests after it reported itself not ready (gRPC health
    /// NOT_SERVING, `/readyz` 503), before it closes its listeners. Peers and load balancers learn of the
    /// stop with some delay (a pod watch, endpoint propagation); during this time their requests still succeed.
    /// Default 0s; the operator sets a few seconds for pods.
    #[serde(default = "default_shutdown_delay")]
    pub shutdown_delay: DurationString,
    /// The WebAssembly hook runtime.
    #[serde(default)]
    pub hooks: HooksConfig,
    /// Moving entries to their new owner on membership changes.
    #[serde(default)]
    pub handoff: HandoffConfig,
    /// The Redis-protocol (RESP2/RESP3) front end: off unless `resp.listen` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resp: Option<RespConfig>,
    /// Traces over OTLP/gRPC: `{ otlpEndpoint, sampleRatio, recordKeys }`. Off unless an endpoint is set, here
    /// or in `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[serde(default)]
    pub tracing: TracingConfig,
    /// Logs on stderr: `{ format: text|json, level }`. `RUST_LOG`, when set, overrides `level`.
    #[serde(default)]
    pub log: LogConfig,
}

/// `tracing:` — spans of the request path exported over OTLP/gRPC (see `docs/design.md`, "Tracing").
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector, such as `http://otel-collector.monitoring:4317`. Default: the standard
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then `OTEL_EXPORTER_OTLP_ENDPOINT`; with neither, tracing is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Share of the requests that start a trace here, 0 to 1 (default 0.01). A request whose caller sent a
    /// sampled W3C `traceparent` is always traced, one whose caller did not sample it never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_ratio: Option<f64>,
    /// Record the key itself on spans (`distcache.key`). Off by default: keys can be personal data.
    #[serde(default)]
    pub record_keys: bool,
}

impl TracingConfig {
    fn check(&self) -> Result<(), String> {
        if let Some(ratio) = self.sample_ratio {
            check_sample_ratio(ratio).map_err(|e| format!("tracing.sampleRatio {e}"))?;
        }
        if let Some(endpoint) = self.otlp_endpoint.as_deref().filter(|e| !e.trim().is_empty()) {
            check_endpoint(endpoint).map_err(|e| format!("tracing.otlpEndpoint {e}"))?;
        }
        Ok(())
    }
}

/// `log:` — how the node logs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`: one JSON object per line, with `trace_id` and `span_id` inside a traced
    /// request. `DISTCACHE_LOG=json` also selects JSON.
    #[serde(default)]
    pub format: LogFormat,
    /// Levels in `RUST_LOG` syntax, such as `info` (the default) or `info,distcache_node::hooks=debug`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

/// The log line format.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `resp:` — the Redis-protocol front end (see `docs/design.md`, "The RESP front end").
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RespConfig {
    /// Listen address, such as `0.0.0.0:6379`.
    pub listen: SocketAddr,
    /// The keyspace of a key without a known `keyspace:` prefix. Without it, such a key gets an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_keyspace: Option<String>,
    /// Password of the `default` user (`AUTH password`, `HELLO 3 AUTH default password`). When a password or
    /// users are set, every connection must authenticate first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A file holding the `default` user's password (trailing newline ignored), such as a mounted Secret.
    /// Relative to the config file's directory. Not together with `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Named users (`AUTH name password`): the name is the client's identity in the keyspaces' `access` lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<RespUser>,
    /// Most client connections at once; a connection over the limit gets an error and is closed. Default 10000.
    #[serde(default = "default_resp_max_connections")]
    pub max_connections: u32,
    /// A connection idle this long is closed; 0s (the default) keeps idle connections open.
    #[serde(default = "default_resp_idle")]
    pub idle_timeout: DurationString,
    /// Largest backlog of replies a client has not read; a client that lets it grow past this is disconnected
    /// (Redis's client-output-buffer-limit). Default 64Mi.
    #[serde(default = "default_resp_max_output")]
    pub max_output_bytes: ByteSize,
    /// Largest request (one command with its arguments). Default 64Mi; values are bounded per keyspace too.
    #[serde(default = "default_resp_max_request")]
    pub max_request_bytes: ByteSize,
}

/// A named RESP user.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RespUser {
    /// User name, and the identity the keyspaces' `access` lists name.
    pub name: String,
    /// Password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A file holding the password (trailing newline ignored), relative to the config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

impl RespConfig {
    /// Checks what serde cannot: one password source per user, unique names, sane limits.
    pub fn check(&self) -> Result<(), String> {
        if self.password.is_some() && self.password_file.is_some() {
            return Err("resp: set password or passwordFile, not both".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, user) in self.users.iter().enumerate() {
            if user.name.is_empty() || user.name.chars().any(char::is_whitespace) {
                return Err(format!("resp.users[{i}].name must be a non-empty name without spaces"));
            }
            if user.name == "default" && (self.password.is_some() || self.password_file.is_some()) {
                return Err(format!(
                    "resp.users[{i}]: user \"default\" is set twice (by resp.password/passwordFile too)"
                ));
            }
            if !names.insert(user.name.as_str()) {
                return Err(format!("resp.users[{i}].name {:?} appears twice", user.name));
            }
            if user.password.is_some() == user.password_file.is_some() {
                return Err(format!(
                    "resp.users[{i}] ({}) needs exactly one of password and passwordFile",
                    user.name
                ));
            }
        }
        if self.max_connections == 0 {
            return Err("resp.maxConnections must be at least 1".into());
        }
        if self.max_output_bytes.bytes() < 64 << 10 {
            return Err("resp.maxOutputBytes must be at least 64Ki".into());
        }
        if self.max_request_bytes.bytes() < 4 << 10 {
            return Err("resp.maxRequestBytes must be at least 4Ki".into());
        }
        Ok(())
    }
}

fn default_resp_max_connections() -> u32 {
    10_000
}
fn default_resp_idle() -> DurationString {
    DurationString(Duration::ZERO)
}
fn default_resp_max_output() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_resp_max_request() -> ByteSize {
    ByteSize(64 << 20)
}

/// `handoff:` — how entries move when members join and leave.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HandoffConfig {
    /// Budget of one handoff: on SIGTERM, the time spent pushing entries to their next owners (hottest first);
    /// on a membership change, the time spent moving the entries this node no longer owns. Pods need a
    /// `terminationGracePeriodSeconds` above `shutdownDelay` plus this. Default 10s.
    #[serde(default = "default_handoff_timeout")]
    pub timeout: DurationString,
    /// How long after a membership change a new owner that misses a key asks the key's previous owner before
    /// its data source. Default 30s.
    #[serde(default = "default_handoff_grace")]
    pub grace: DurationString,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        Self { timeout: default_handoff_timeout(), grace: default_handoff_grace() }
    }
}

fn default_handoff_timeout() -> DurationString {
    DurationString(Duration::from_secs(10))
}
fn default_handoff_grace() -> DurationString {
    DurationString(Duration::from_secs(30))
}

/// The admin HTTP listener.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(from = "AdminField")]
pub struct AdminConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Serve HTTPS with the node's certificate (needs `tls`).
    pub tls: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: default_admin(), tls: false }
    }
}

impl From<SocketAddr> for AdminConfig {
    fn from(listen: SocketAddr) -> Self {
        Self { listen, tls: false }
    }
}

/// The two spellings of `admin`.
#[derive(Deserialize)]
#[serde(untagged, expecting = "admin: host:port, or { listen: host:port, tls: true|false }")]
enum AdminField {
    Address(SocketAddr),
    Full {
        #[serde(default = "default_admin")]
        listen: SocketAddr,
        #[serde(default)]
        tls: bool,
    },
}

impl From<AdminField> for AdminConfig {
    fn from(f: AdminField) -> Self {
        match f {
            AdminField::Address(listen) => Self { listen, tls: false },
            AdminField::Full { listen, tls } => Self { listen, tls },
        }
    }
}

/// Settings of the hook runtime (per node; per-keyspace limits live in the keyspaces file).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HooksConfig {
    /// Where compiled hook modules and downloaded `url` modules are kept, so a restart deserializes instead of
    /// compiling and downloads nothing. Relative to the config file's directory. Default: `distcache-hooks` in
    /// the system's temporary directory. A cache that cannot be written only costs a compile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// The directory under which ConfigMaps holding hook modules are mounted, one sub-directory per ConfigMap:
    /// a `module: { configMap: { name, key } }` is read from `<configMapDir>/<name>/<key>`. Relative to the
    /// config file's directory.
    #[serde(default = "default_config_map_dir")]
    pub config_map_dir: PathBuf,
    /// Most hook instances alive at once on this node, over all keyspaces (sizes the pooling allocator, which
    /// reserves — but does not commit — 4 GiB of address space per instance memory). Default 256.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
}

impl Default for HooksConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            config_map_dir: default_config_map_dir(),
            max_instances: default_max_instances(),
        }
    }
}

impl HooksConfig {
    /// The cache directory in effect.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("distcache-hooks"))
    }
}

fn default_config_map_dir() -> PathBuf {
    PathBuf::from("/etc/distcache/modules")
}
fn default_max_instances() -> u32 {
    256
}

/// The discovery backend. In YAML, a mapping with exactly one key naming the backend:
/// `discovery: { static: { peers: [...] } }`, `{ kubernetes: {...} }`, `{ dns: {...} }`, `{ nats: {...} }` or
/// `{ standalone: {} }`; a config without `discovery` is standalone.
///
/// One enum rather than a struct of optional backends, so that a config built in code cannot name two backends
/// (or none) and silently run as something else; what the type cannot rule out (an empty NATS subject, say) is
/// checked by [`DiscoveryConfig::validate`] when the file is loaded and again when the node starts.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "DiscoveryFields", into = "DiscoveryFields")]
pub enum DiscoveryConfig {
    /// A fixed list of peers, health-checked.
    Static(StaticDiscovery),
    /// One node alone (`standalone: {}`).
    #[default]
    Standalone,
    /// The started pods of a label selector (Ready or not), watched through the Kubernetes API.
    Kubernetes(KubernetesDiscovery),
    /// Announcements and heartbeats on a NATS subject.
    Nats(NatsDiscovery),
    /// The SRV (else A/AAAA) records of a name, e.g. a headless Service.
    Dns(DnsDiscovery),
}

/// Why a discovery setting is unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// More than one backend is named.
    #[error("discovery: both {first} and {second} are set; set exactly one of {BACKENDS}")]
    Conflict {
        /// The first backend named (in the order of [`BACKENDS`]).
        first: &'static str,
        /// Another backend named.
        second: &'static str,
    },
    /// The `discovery` mapping names no backend.
    #[error(
        "discovery: no backend is set; set exactly one of {BACKENDS} (leave discovery out for standalone)"
    )]
    Missing,
    /// The backend's settings are incomplete.
    #[error("{0}")]
    Invalid(&'static str),
}

/// The backend keys of the `discovery` mapping, for messages.
pub const BACKENDS: &str = "static, standalone, kubernetes, nats, dns";

impl DiscoveryConfig {
    /// The backend's key in the config file.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Static(_) => "static",
            Self::Standalone => "standalone",
            Self::Kubernetes(_) => "kubernetes",
            Self::Nats(_) => "nats",
            Self::Dns(_) => "dns",
        }
    }

    /// Checks what the type does not: required settings are present and well-formed.
    pub fn validate(&self) -> Result<(), DiscoveryError> {
        match self {
            Self::Nats(n)
                if n.url.trim().is_empty()
                    || n.subject.trim().is_empty()
                    || n.subject.contains([' ', '*', '>']) =>
            {
                Err(DiscoveryError::Invalid(
                    "discovery.nats: url and subject are required; the subject has no spaces or wildcards",
                ))
            }
            Self::Dns(d) if d.name.trim().is_empty() => {
                Err(DiscoveryError::Invalid("discovery.dns.name is required"))
            }
            Self::Kubernetes(k) if k.label_selector.trim().is_empty() => Err(DiscoveryError::Invalid(
                "discovery.kubernetes.labelSelector is required (it selects this cluster's pods)",
            )),
            _ => Ok(()),
        }
    }
}

/// The YAML shape of [`DiscoveryConfig`]: one optional field per backend, so that a mapping naming two backends
/// is reported by name (serde's own enum representation would only say "expected a map with one entry").
#[derive(Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DiscoveryFields {
    #[serde(default, rename = "static", skip_serializing_if = "Option::is_none")]
    static_list: Option<StaticDiscovery>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    standalone: Option<Empty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kubernetes: Option<KubernetesDiscovery>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nats: Option<NatsDiscovery>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dns: Option<DnsDiscovery>,
}

impl TryFrom<DiscoveryFields> for DiscoveryConfig {
    type Error = DiscoveryError;

    fn try_from(f: DiscoveryFields) -> Result<Self, DiscoveryError> {
        let set: Vec<Self> = [
            f.static_list.map(Self::Static),
            f.standalone.map(|Empty {}| Self::Standalone),
            f.kubernetes.map(Self::Kubernetes),
            f.nats.map(Self::Nats),
            f.dns.map(Self::Dns),
        ]
        .into_iter()
        .flatten()
        .collect();
        match set.as_slice() {
            [] => Err(DiscoveryError::Missing),
            [one] => {
                one.validate()?;
                Ok(one.clone())
            }
            [first, second, ..] => Err(DiscoveryError::Conflict { first: first.key(), second: second.key() }),
        }
    }
}

impl From<DiscoveryConfig> for DiscoveryFields {
    fn from(d: DiscoveryConfig) -> Self {
        let none = Self::default();
        match d {
            DiscoveryConfig::Static(s) => Self { static_list: Some(s), ..none },
            DiscoveryConfig::Standalone => Self { standalone: Some(Empty {}), ..none },
            DiscoveryConfig::Kubernetes(k) => Self { kubernetes: Some(k), ..none },
            DiscoveryConfig::Nats(n) => Self { nats: Some(n), ..none },
            DiscoveryConfig::Dns(d) => Self { dns: Some(d), ..none },
        }
    }
}

/// DNS discovery settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsDiscovery {
    /// The name: SRV records first, A/AAAA otherwise.
    pub name: String,
    /// Peer port for A/AAAA answers (SRV answers carry their own).
    #[serde(default = "default_peer_port")]
    pub port: u16,
    /// Longest time between two resolutions (sooner when the records' TTL ends).
    #[serde(default = "default_dns_interval")]
    pub interval: DurationString,
    /// Name servers (`ip:port`); default: the system's resolver configuration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<SocketAddr>,
    /// Time between health probes of the resolved addresses.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: DurationString,
    /// Consecutive failed probes before an address leaves the ring.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
}

fn default_peer_port() -> u16 {
    PEER_PORT
}
fn default_dns_interval() -> DurationString {
    DurationString(Duration::from_secs(5))
}

/// Kubernetes discovery settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesDiscovery {
    /// Namespace of the pods; default: the namespace of the node's own credentials (the pod's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Label selector of the node pods, e.g. `app.kubernetes.io/instance=demo`.
    pub label_selector: String,
    /// Name of the container port peers dial (the peer port).
    #[serde(default = "default_port_name")]
    pub port_name: String,
}

/// NATS discovery settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsDiscovery {
    /// Server URL(s), comma-separated, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Subject prefix the cluster's nodes share, e.g. `distcache.demo`.
    pub subject: String,
    /// Interval of a node's heartbeat.
    #[serde(default = "default_heartbeat")]
    pub heartbeat: DurationString,
    /// Heartbeats a member may miss before it leaves the ring.
    #[serde(default = "default_failure_threshold")]
    pub missed_heartbeats: u32,
}

fn default_port_name() -> String {
    "peer".into()
}
fn default_heartbeat() -> DurationString {
    DurationString(Duration::from_secs(2))
}

/// An empty settings object (`standalone: {}`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// Static discovery settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticDiscovery {
    /// Peer addresses (`host:port`); may include this node's own advertise address.
    pub peers: Vec<String>,
    /// Time between health probes.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: DurationString,
    /// Consecutive failed probes before a peer leaves the ring.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], GRPC_PORT))
}
fn default_peer_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], PEER_PORT))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT))
}
fn default_poll() -> DurationString {
    DurationString(Duration::from_secs(1))
}
fn default_peer_timeout() -> DurationString {
    DurationString(Duration::from_secs(2))
}
fn default_max_message() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_shutdown_delay() -> DurationString {
    DurationString(Duration::ZERO)
}
fn default_drain() -> DurationString {
    DurationString(Duration::from_secs(5))
}
fn default_probe_interval() -> DurationString {
    DurationString(Duration::from_secs(1))
}
fn default_failure_threshold() -> u32 {
    3
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: None,
            listen: default_listen(),
            peer_listen: default_peer_listen(),
            advertise: None,
            admin: AdminConfig::default(),
            tls: None,
            discovery: DiscoveryConfig::default(),
            keyspaces_file: None,
            keyspaces_poll_interval: default_poll(),
            peer_timeout: default_peer_timeout(),
            max_message_bytes: default_max_message(),
            shutdown_grace: default_drain(),
            shutdown_delay: default_shutdown_delay(),
            worker_threads: None,
            hooks: HooksConfig::default(),
            handoff: HandoffConfig::default(),
            resp: None,
            tracing: TracingConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config file {path}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The YAML (after env overrides) does not match the schema.
    #[error("invalid config {origin}: {message}")]
    Invalid {
        /// The file, or "from the environment".
        origin: String,
        /// serde's message with the field path.
        message: String,
    },
    /// An environment override is not valid YAML.
    #[error("invalid environment variable {name}: {message}")]
    Env {
        /// Variable name.
        name: String,
        /// Parse error.
        message: String,
    },
}

fn camel(segment: &str) -> String {
    let mut out = String::new();
    for (i, part) in segment.split('_').filter(|p| !p.is_empty()).enumerate() {
        let lower = part.to_ascii_lowercase();
        if i == 0 {
            out.push_str(&lower);
        } else {
            let mut chars = lower.chars();
            if let Some(first) = chars.next() {
                out.push(first.to_ascii_uppercase());
                out.extend(chars);
            }
        }
    }
    out
}

fn set_path(root: &mut Mapping, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = root;
    for p in parents {
        let key = Value::String(p.clone());
        if !matches!(node.get(&key), Some(Value::Mapping(_))) {
            node.insert(key.clone(), Value::Mapping(Mapping::new()));
        }
        match node.get_mut(&key) {
            Some(Value::Mapping(m)) => node = m,
            _ => return,
        }
    }
    node.insert(Value::String(last.clone()), value);
}

impl NodeConfig {
    /// Loads the file (if any), applies `DISTCACHE_*` overrides from `env`, and resolves relative paths against
    /// the file's directory.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut root = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.to_owned(), source })?;
                match serde_yaml::from_str::<Value>(&text) {
                    Ok(Value::Mapping(m)) => m,
                    Ok(Value::Null) => Mapping::new(),
                    Ok(_) => {
                        return Err(ConfigError::Invalid {
                            origin: p.display().to_string(),
                            message: "the top level must be a mapping".into(),
                        });
                    }
                    Err(e) => {
                        return Err(ConfigError::Invalid {
                            origin: p.display().to_string(),
                            message: e.to_string(),
                        });
                    }
                }
            }
            None => Mapping::new(),
        };
        let mut overridden = Vec::new();
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix("DISTCACHE_") else {
                continue;
            };
            // DISTCACHE_ENDPOINT and DISTCACHE_LOG belong to the CLI and logging, not to the node config.
            if rest == "ENDPOINT" || rest == "LOG" || rest.is_empty() {
                continue;
            }
            let value: Value = serde_yaml::from_str(&raw)
                .map_err(|e| ConfigError::Env { name: name.clone(), message: e.to_string() })?;
            let path: Vec<String> = rest.split("__").map(camel).collect();
            set_path(&mut root, &path, value);
            overridden.push(name);
        }
        let origin = match path {
            Some(p) if overridden.is_empty() => p.display().to_string(),
            Some(p) => format!("{} (with {})", p.display(), overridden.join(", ")),
            None => format!("from the environment ({})", overridden.join(", ")),
        };
        // Through text rather than `from_value`: serde_yaml's `Value` deserializer cannot read externally
        // tagged enums (`discovery: {static: ...}`) from a plain mapping.
        let text = serde_yaml::to_string(&Value::Mapping(root))
            .map_err(|e| ConfigError::Invalid { origin: origin.clone(), message: e.to_string() })?;
        let mut config: Self = serde_yaml::from_str(&text)
            .map_err(|e| ConfigError::Invalid { origin, message: e.to_string() })?;
        if let Some(dir) = path.and_then(Path::parent) {
            let hooks = &mut config.hooks;
            let tls = config.tls.as_mut().map(|t| &mut t.files);
            let (cert, key, ca) = match tls {
                Some(f) => (Some(&mut f.cert_file), Some(&mut f.key_file), Some(&mut f.ca_file)),
                None => (None, None, None),
            };
            let (resp_password, resp_users) = match config.resp.as_mut() {
                Some(r) => (
                    r.password_file.as_mut(),
                    r.users.iter_mut().filter_map(|u| u.password_file.as_mut()).collect(),
                ),
                None => (None, Vec::new()),
            };
            for file in [
                config.keyspaces_file.as_mut(),
                resp_password,
                hooks.cache_dir.as_mut(),
                Some(&mut hooks.config_map_dir),
                cert,
                key,
                ca,
            ]
            .into_iter()
            .flatten()
            .chain(resp_users)
            {
                if file.is_relative() {
                    *file = dir.join(&*file);
                }
            }
        }
        config.check()?;
        Ok(config)
    }

    /// The checks a file that parses can still fail: settings that contradict each other or are out of range.
    fn check(&self) -> Result<(), ConfigError> {
        if self.admin.tls && self.tls.is_none() {
            return Err(ConfigError::Invalid {
                origin: "config".into(),
                message: "admin.tls is true but tls (certFile, keyFile, caFile) is not set".into(),
            });
        }
        if let Some(resp) = &self.resp {
            resp.check().map_err(|message| ConfigError::Invalid { origin: "config".into(), message })?;
        }
        self.tracing.check().map_err(|message| ConfigError::Invalid { origin: "config".into(), message })?;
        if let Some(level) = &self.log.level
            && let Err(e) = check_level(level)
        {
            return Err(ConfigError::Invalid { origin: "config".into(), message: format!("log.level {e}") });
        }
        if !(1..=100_000).contains(&self.hooks.max_instances) {
            return Err(ConfigError::Invalid {
                origin: "config".into(),
                message: "hooks.maxInstances must be between 1 and 100000".into(),
            });
        }
        Ok(())
    }

    /// The member name: configured, else the hostname.
    pub fn member_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "distcache-node".into())
        })
    }

    /// The address peers dial, given the bound peer address.
    pub fn advertise_address(&self, bound: SocketAddr) -> String {
        match &self.advertise {
            Some(a) => a.clone(),
            None if bound.ip().is_unspecified() => format!("127.0.0.1:{}", bound.port()),
            None => bound.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_nested_fields_and_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("node.yaml");
        std::fs::write(&file, "name: a\nkeyspacesFile: ./ks.yaml\ndiscovery:\n  standalone: {}\n")
            .expect("write");
        let env = vec![
            ("DISTCACHE_NAME".to_owned(), "b".to_owned()),
            ("DISTCACHE_DISCOVERY".to_owned(), "{static: {peers: [\"127.0.0.1:1\"]}}".to_owned()),
            ("DISTCACHE_PEER_TIMEOUT".to_owned(), "3s".to_owned()),
            ("DISTCACHE_ENDPOINT".to_owned(), "ignored".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
        ];
        let c = NodeConfig::load(Some(&file), env).expect("valid");
        assert_eq!(c.name.as_deref(), Some("b"));
        assert_eq!(c.keyspaces_file, Some(dir.path().join("./ks.yaml")));
        assert_eq!(c.peer_timeout.get(), Duration::from_secs(3));
        match c.discovery {
            DiscoveryConfig::Static(s) => assert_eq!(s.peers, vec!["127.0.0.1:1"]),
            other => panic!("override ignored: {other:?}"),
        }
    }

    #[test]
    fn nested_env_path() {
        let env = vec![("DISTCACHE_DISCOVERY__STATIC__PEERS".to_owned(), "[\"127.0.0.1:9\"]".to_owned())];
        let c = NodeConfig::load(None, env).expect("valid");
        assert!(matches!(c.discovery, DiscoveryConfig::Static(ref s) if s.peers == vec!["127.0.0.1:9"]));
    }

    #[test]
    fn typos_are_reported_with_the_field() {
        let err = NodeConfig::load(None, vec![("DISTCACHE_LISTN".to_owned(), "x".to_owned())])
            .expect_err("unknown field")
            .to_string();
        assert!(err.contains("listn") && err.contains("DISTCACHE_LISTN"), "{err}");
    }

    fn load_yaml(yaml: &str) -> Result<NodeConfig, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("node.yaml");
        std::fs::write(&file, yaml).expect("write");
        NodeConfig::load(Some(&file), Vec::new())
    }

    #[test]
    fn two_backends_are_an_error_naming_both() {
        let err = load_yaml(
            "discovery:\n  static: { peers: [\"127.0.0.1:1\"] }\n  nats: { url: nats://n, subject: s }\n",
        )
        .expect_err("two backends")
        .to_string();
        assert!(err.contains("static") && err.contains("nats") && err.contains("both"), "{err}");
        // The same through the environment, merged into the file's backend.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("node.yaml");
        std::fs::write(&file, "discovery: { standalone: {} }\n").expect("write");
        let env = vec![("DISTCACHE_DISCOVERY__DNS__NAME".to_owned(), "peers.local".to_owned())];
        let err = NodeConfig::load(Some(&file), env).expect_err("two backends").to_string();
        assert!(err.contains("standalone") && err.contains("dns"), "{err}");
    }

    #[test]
    fn an_empty_or_unknown_backend_is_an_error_not_standalone() {
        let err = load_yaml("discovery: {}\n").expect_err("no backend").to_string();
        assert!(err.contains("no backend"), "{err}");
        let err = load_yaml("discovery: { consul: {} }\n").expect_err("unknown backend").to_string();
        assert!(err.contains("consul"), "{err}");
        let err = load_yaml("discovery: { nats: { url: nats://n, subject: \"a.>\" } }\n")
            .expect_err("wildcard subject")
            .to_string();
        assert!(err.contains("discovery.nats"), "{err}");
        let err = load_yaml("discovery: { kubernetes: { labelSelector: \" \" } }\n")
            .expect_err("empty selector")
            .to_string();
        assert!(err.contains("labelSelector"), "{err}");
    }

    #[test]
    fn no_discovery_is_standalone_and_documented_forms_parse() {
        assert_eq!(load_yaml("name: a\n").expect("valid").discovery, DiscoveryConfig::Standalone);
        assert_eq!(
            load_yaml("discovery: { standalone: {} }\n").expect("valid").discovery,
            DiscoveryConfig::Standalone
        );
        // The forms in README.md's node config.
        let c = load_yaml(
            "discovery:\n  static: { peers: [\"127.0.0.1:7420\", \"127.0.0.1:7430\"], probeInterval: 1s, failureThreshold: 3 }\n",
        )
        .expect("static");
        assert!(
            matches!(c.discovery, DiscoveryConfig::Static(ref s) if s.peers.len() == 2 && s.failure_threshold == 3)
        );
        let c = load_yaml(
            "discovery:\n  nats: { url: nats://127.0.0.1:4222, subject: distcache.demo, heartbeat: 2s, missedHeartbeats: 3 }\n",
        )
        .expect("nats");
        assert!(matches!(c.discovery, DiscoveryConfig::Nats(ref n) if n.subject == "distcache.demo"));
        let c = load_yaml(
            "discovery:\n  dns: { name: demo-peers.default.svc.cluster.local, port: 7420, interval: 5s, nameservers: [\"10.0.0.10:53\"] }\n",
        )
        .expect("dns");
        assert!(matches!(c.discovery, DiscoveryConfig::Dns(ref d) if d.nameservers.len() == 1));
    }

    /// What the operator sets in the node pods (`discovery_env` in operator/src/controller/build.rs: JSON, one
    /// backend, in `DISTCACHE_DISCOVERY`) must keep parsing.
    #[test]
    fn the_operators_discovery_env_parses() {
        let load = |json: &str| {
            NodeConfig::load(None, vec![("DISTCACHE_DISCOVERY".to_owned(), json.to_owned())])
                .map(|c| c.discovery)
        };
        let k = load(
            r#"{"kubernetes":{"labelSelector":"app.kubernetes.io/instance=demo,app.kubernetes.io/name=distcache","namespace":"apps","portName":"grpc"}}"#,
        );
        assert_eq!(
            k.expect("kubernetes"),
            DiscoveryConfig::Kubernetes(KubernetesDiscovery {
                namespace: Some("apps".into()),
                label_selector: "app.kubernetes.io/instance=demo,app.kubernetes.io/name=distcache".into(),
                port_name: "grpc".into(),
            })
        );
        let d = load(r#"{"dns":{"interval":"10s","name":"demo-peers.apps.svc.cluster.local","port":7420}}"#);
        assert!(
            matches!(d, Ok(DiscoveryConfig::Dns(ref d)) if d.name == "demo-peers.apps.svc.cluster.local" && d.interval.get() == Duration::from_secs(10)),
            "{d:?}"
        );
        let n = load(r#"{"nats":{"subject":"distcache.apps.demo","url":"nats://n:4222"}}"#);
        assert!(
            matches!(n, Ok(DiscoveryConfig::Nats(ref n)) if n.url == "nats://n:4222" && n.missed_heartbeats == 3),
            "{n:?}"
        );
    }

    #[test]
    fn serializing_writes_the_one_backend_key() {
        let c = DiscoveryConfig::Static(StaticDiscovery {
            peers: vec!["127.0.0.1:1".into()],
            probe_interval: default_probe_interval(),
            failure_threshold: 2,
        });
        let yaml = serde_yaml::to_string(&c).expect("serialize");
        assert!(yaml.starts_with("static:"), "{yaml}");
        assert_eq!(serde_yaml::from_str::<DiscoveryConfig>(&yaml).expect("round trip"), c);
        assert_eq!(
            serde_yaml::to_string(&DiscoveryConfig::Standalone).expect("serialize"),
            "standalone: {}\n"
        );
    }

    #[test]
    fn admin_takes_an_address_or_a_mapping_and_tls_paths_resolve_against_the_file() {
        let c = load_yaml("admin: 127.0.0.1:9000\n").expect("address");
        assert_eq!(c.admin, AdminConfig { listen: "127.0.0.1:9000".parse().expect("addr"), tls: false });
        let c = load_yaml(
            "admin: { listen: 127.0.0.1:9001, tls: true }\n\
             tls: { certFile: tls/tls.crt, keyFile: tls/tls.key, caFile: /etc/ca.crt, clientAuth: required }\n",
        )
        .expect("mapping");
        assert!(c.admin.tls);
        let tls = c.tls.expect("tls");
        assert!(tls.files.cert_file.is_absolute() && tls.files.cert_file.ends_with("tls/tls.crt"));
        assert_eq!(tls.files.ca_file, PathBuf::from("/etc/ca.crt"));
        assert_eq!(tls.client_auth, distcache_tls::ClientAuth::Required);
        let err =
            load_yaml("admin: { listen: 127.0.0.1:9001, tls: true }\n").expect_err("no material").to_string();
        assert!(err.contains("admin.tls"), "{err}");
        let err = load_yaml("tls: { certFile: a, keyFile: b, caFile: c, clientAuth: maybe }\n")
            .expect_err("bad clientAuth")
            .to_string();
        assert!(err.contains("maybe"), "{err}");
        // The peer port's defaults: its own port, and what discovery dials.
        let c = NodeConfig::default();
        assert_eq!(c.peer_listen.port(), PEER_PORT);
        assert_eq!(c.advertise_address(SocketAddr::from(([0, 0, 0, 0], PEER_PORT))), "127.0.0.1:7422");
    }
    #[test]
    fn resp_settings_parse_from_the_file_and_the_environment_and_bad_ones_say_which() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("node.yaml");
        std::fs::write(&file, "resp: { listen: 127.0.0.1:6379, passwordFile: ./pw }\n").expect("write");
        let env = vec![
            ("DISTCACHE_RESP__DEFAULT_KEYSPACE".to_owned(), "users".to_owned()),
            ("DISTCACHE_RESP__MAX_OUTPUT_BYTES".to_owned(), "1Mi".to_owned()),
        ];
        let resp = NodeConfig::load(Some(&file), env).expect("loads").resp.expect("resp");
        assert_eq!(resp.listen, SocketAddr::from(([127, 0, 0, 1], 6379)));
        assert_eq!(resp.default_keyspace.as_deref(), Some("users"));
        assert_eq!(resp.max_output_bytes.bytes(), 1 << 20);
        assert_eq!(resp.max_connections, 10_000, "default");
        assert!(resp.idle_timeout.get().is_zero(), "idle connections stay open by default");
        assert_eq!(resp.password_file, Some(dir.path().join("./pw")), "relative to the config file");
        assert!(NodeConfig::default().resp.is_none(), "off unless configured");
        for (yaml, says) in [
            ("resp: { listen: 127.0.0.1:1, password: a, passwordFile: b }", "not both"),
            ("resp: { listen: 127.0.0.1:1, users: [{ name: x }] }", "resp.users[0] (x) needs exactly one"),
            (
                "resp: { listen: 127.0.0.1:1, users: [{ name: x, password: a }, { name: x, password: b }] }",
                "appears twice",
            ),
            ("resp: { listen: 127.0.0.1:1, maxConnections: 0 }", "maxConnections"),
            ("resp: { listen: 127.0.0.1:1, maxOutputBytes: 1Ki }", "maxOutputBytes"),
            ("resp: { listen: 127.0.0.1:1, defaultKeyspce: users }", "defaultKeyspce"),
        ] {
            let err = load_yaml(yaml).expect_err(yaml).to_string();
            assert!(err.contains(says), "{yaml}: {err}");
        }
    }

    #[test]
    fn tracing_and_log_settings_come_from_the_file_or_the_environment_and_bad_ones_say_which() {
        let env = vec![
            ("DISTCACHE_TRACING__OTLP_ENDPOINT".to_owned(), "http://otel:4317".to_owned()),
            ("DISTCACHE_TRACING__SAMPLE_RATIO".to_owned(), "0.5".to_owned()),
            ("DISTCACHE_LOG__FORMAT".to_owned(), "json".to_owned()),
            ("DISTCACHE_LOG__LEVEL".to_owned(), "info,distcache_node=debug".to_owned()),
        ];
        let c = NodeConfig::load(None, env).expect("the operator's variables load");
        assert_eq!(c.tracing.otlp_endpoint.as_deref(), Some("http://otel:4317"));
        assert_eq!(c.tracing.sample_ratio, Some(0.5));
        assert_eq!(
            (c.log.format, c.log.level.as_deref()),
            (LogFormat::Json, Some("info,distcache_node=debug"))
        );
        for (yaml, says) in [
            ("tracing: { otlpEndpoint: 'https://otel:4317' }", "tracing.otlpEndpoint must be an http:// URL"),
            ("tracing: { otlpEndpoint: 'http://' }", "tracing.otlpEndpoint must be an http:// URL"),
            ("tracing: { sampleRatio: 1.5 }", "tracing.sampleRatio must be between 0 and 1, got 1.5"),
            ("log: { level: 'info,=[' }", "log.level \"info,=[\" is not a valid filter"),
            ("log: { format: xml }", "xml"),
        ] {
            let err = load_yaml(yaml).expect_err(yaml).to_string();
            assert!(err.contains(says), "{yaml}: {err}");
        }
    }
}
