//! API types shared by the DistCache node and operator: the `DistCache` custom resource ([`DistCache`]), the
//! keyspace specification and the reports of the node's admin endpoints ([`KeyspacesReport`], [`PeersReport`]).
//!
//! [`KeyspaceSpec`] is both an entry of the node's keyspaces file and an element of `DistCache.spec.keyspaces`,
//! so the CRD field and the file the operator writes into the keyspace ConfigMap are one type: what validates
//! here validates everywhere. Sizes are Kubernetes quantities ([`ByteSize`]) and durations are Go-style strings
//! ([`DurationString`]), as Kubernetes users write them.

mod admin;
mod distcache;
mod duration;
mod host;
mod keyspace;
mod pod;
mod quantity;

pub use admin::{
    HotKey, KeyspaceCounters, KeyspaceReport, KeyspacesReport, LocalNode, PeerReport, PeersReport,
    WarmUpProgress,
};
pub use distcache::{
    CertManagerSpec, ClientAuth, DEFAULT_HANDOFF_TIMEOUT, DEFAULT_REPLICAS, DEFAULT_RESP_PORT, DiscoverySpec,
    DistCache, DistCacheSpec, DistCacheStatus, DnsDiscoverySpec, GROUP, HandoffSpec, HookState, ImageSpec,
    IssuerRef, KeyspaceStatus, KubernetesDiscoverySpec, LogFormatSpec, LogSpec, MAX_HANDOFF_TIMEOUT,
    MAX_REPLICAS, NatsDiscoverySpec, NetworkPolicySpec, PodDisruptionBudgetSpec, RespSpec, SchedulingSpec,
    SecretKeyRef, ServiceSpec, TlsSpec, TracingSpec, VERSION,
};
pub use duration::{DurationString, ParseDurationError};
pub use host::{Host, HostPort, ParseHostPortError};
pub use keyspace::{
    AccessOp, AccessSpec, BreakerSettings, CircuitBreakerSpec, ConfigMapKeyRef, DEFAULT_FETCH_TIMEOUT,
    DEFAULT_MAX_VALUE_BYTES, HookLimits, HookSpec, KeyspaceSpec, KeyspacesFile, MAX_KEYSPACES, ModuleSource,
    Protection, RateLimitSpec, ValidKeyspace, ValidationError, ValidationErrors, WarmUpSpec,
    validate_keyspaces,
};
pub use pod::pod_is_serving;
pub use quantity::{ByteSize, ParseSizeError};
