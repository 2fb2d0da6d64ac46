//! Validation of a DistCache: the CRD's CEL rules and the keyspace rules the nodes enforce, checked by the
//! operator itself so that an API server without CEL (Kubernetes before 1.25) never lets an invalid spec reach
//! the pods. Parse, don't validate: the result is a [`ValidSpec`] of typed fields with every default applied,
//! and it is all that `build` reads, so an object can only be built from a spec that passed. Pure: no IO,
//! unit-tested with YAML fixtures.

use std::{collections::BTreeMap, fmt};

use distcache_api::{
    ClientAuth, DEFAULT_RESP_PORT, DistCache, DistCacheSpec, DurationString, ImageSpec, LogSpec,
    MAX_HANDOFF_TIMEOUT, MAX_REPLICAS, RespSpec, SchedulingSpec, SecretKeyRef, TlsSpec, TracingSpec,
    ValidKeyspace, validate_keyspaces,
};
use k8s_openapi::{
    api::core::v1::ResourceRequirements,
    apimachinery::pkg::{apis::meta::v1::OwnerReference, util::intstr::IntOrString},
};
use kube::{Resource, ResourceExt};

use super::build::{ADMIN_PORT, GRPC_PORT, PEER_PORT};

/// A DistCache that passed validation: who it is and what it asks for, typed, with its defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    /// `metadata.name`, a DNS label of at most [`MAX_NAME_LENGTH`] characters.
    pub name: String,
    /// `metadata.namespace`: where every owned object goes. Required, never defaulted: an object sent to the
    /// namespace "" would go to the wrong API path.
    pub namespace: String,
    /// The controller reference every owned object carries, so that the garbage collector deletes it with the
    /// DistCache and the applier recognises it as ours.
    pub owner: OwnerReference,
    /// Number of node pods, within `0..=MAX_REPLICAS`.
    pub replicas: i32,
    /// The parts of `spec.image` that are set; the rest comes from the operator's default node image.
    pub image: Image,
    /// Requests and limits of the node container, as given.
    pub resources: Option<ResourceRequirements>,
    /// The validated keyspaces (same order as the spec); each keeps the spec it came from, which is what the
    /// keyspaces file carries.
    pub keyspaces: Vec<ValidKeyspace>,
    /// How the nodes find each other: exactly one backend, its settings defaulted.
    pub discovery: Discovery,
    /// Where the node pods may run (empty when not set).
    pub scheduling: SchedulingSpec,
    /// The PodDisruptionBudget to keep, if any.
    pub pod_disruption_budget: PdbPolicy,
    /// The client Service.
    pub service: ClientService,
    /// TLS of the nodes, when `spec.tls` is set.
    pub tls: Option<Tls>,
    /// Whether the NetworkPolicy `<name>` is wanted.
    pub network_policy: bool,
    /// Longest time a stopping node spends handing its entries off, at most [`MAX_HANDOFF_TIMEOUT`] (zero: no
    /// handoff).
    pub handoff_timeout: std::time::Duration,
    /// The Redis-protocol front end, when `spec.resp.enabled`.
    pub resp: Option<Resp>,
    /// The nodes' traces, when `spec.tracing` is set: an endpoint and a ratio the nodes accept.
    pub tracing: Option<TracingSpec>,
    /// The nodes' logs (defaults: text, the node's default level).
    pub log: LogSpec,
}

/// The nodes' Redis-protocol front end, with its defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resp {
    /// Its port on every node and on the client Service: not one of the nodes' other ports.
    pub port: u16,
    /// The keyspace of keys without a keyspace prefix: one of the spec's keyspaces.
    pub default_keyspace: Option<String>,
    /// The Secret key holding the password clients must give (`AUTH`), if any.
    pub password_secret: Option<SecretKeyRef>,
}

/// TLS of the nodes: where the certificate comes from and whether clients must present one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    /// The certificate's source.
    pub source: TlsSource,
    /// What the client port asks of clients.
    pub client_auth: ClientAuth,
}

/// Where the nodes' certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSource {
    /// A Secret the user provides.
    Secret(String),
    /// A cert-manager Certificate `<name>-tls` the operator creates, issued into the Secret `<name>-tls`.
    CertManager(CertManager),
}

/// A cert-manager Certificate request, with its defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertManager {
    /// Issuer name.
    pub issuer_name: String,
    /// Issuer kind (default Issuer).
    pub issuer_kind: String,
    /// Issuer API group (default cert-manager.io).
    pub issuer_group: String,
    /// Requested lifetime, at least [`MIN_CERT_DURATION`].
    pub duration: Option<std::time::Duration>,
    /// Renewal before expiry, shorter than the lifetime.
    pub renew_before: Option<std::time::Duration>,
}

/// cert-manager refuses certificates shorter-lived than an hour.
pub const MIN_CERT_DURATION: std::time::Duration = std::time::Duration::from_hours(1);

impl Tls {
    /// The Secret the nodes mount: the user's, or the one cert-manager issues into (`<name>-tls`).
    pub fn secret_name(&self, distcache: &str) -> String {
        match &self.source {
            TlsSource::Secret(name) => name.clone(),
            TlsSource::CertManager(_) => format!("{distcache}-tls"),
        }
    }
}

/// The node image as the spec overrides it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Image {
    /// Repository, when the spec sets one.
    pub repository: Option<String>,
    /// Tag, when the spec sets one.
    pub tag: Option<String>,
    /// Pull policy; `None` leaves Kubernetes' default for the tag.
    pub pull_policy: Option<PullPolicy>,
}

/// A container image pull policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull on every container start.
    Always,
    /// Pull when the node does not have the image.
    IfNotPresent,
    /// Use only an image the node has.
    Never,
}

impl PullPolicy {
    const ALL: [Self; 3] = [Self::Always, Self::IfNotPresent, Self::Never];

    /// The value Kubernetes expects in `imagePullPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }

    /// The policy of that exact (case-sensitive, as Kubernetes reads it) name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// A Service type the client Service may have (ExternalName would not select the nodes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    /// A cluster-internal virtual IP (the default).
    #[default]
    ClusterIp,
    /// ClusterIP plus a port on every Kubernetes node.
    NodePort,
    /// NodePort plus a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    const ALL: [Self; 3] = [Self::ClusterIp, Self::NodePort, Self::LoadBalancer];

    /// The value Kubernetes expects in a Service's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }

    /// The type of that exact (case-sensitive, as Kubernetes reads it) name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// The client Service `<name>`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientService {
    /// Its type.
    pub type_: ServiceType,
    /// Its annotations (none when empty).
    pub annotations: BTreeMap<String, String>,
}

/// How the nodes find each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovery {
    /// Ready pods of the DistCache through the Kubernetes API (namespace and selector are the DistCache's).
    Kubernetes,
    /// SRV records of the headless Service `<name>-peers`.
    Dns {
        /// Longest time between two resolutions; `None` leaves the node's default.
        interval: Option<DurationString>,
    },
    /// Announcements on a NATS subject.
    Nats {
        /// Server URL, `nats://` or `tls://`.
        url: String,
        /// The subject, defaulted to `distcache.<namespace>.<name>`.
        subject: String,
    },
}

/// What the PodDisruptionBudget `<name>` limits. A number or a percentage, at least 0, at most 100%.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PdbPolicy {
    /// At most this many node pods down at once (the default: 1).
    MaxUnavailable(IntOrString),
    /// At least this many node pods up.
    MinAvailable(IntOrString),
    /// No PodDisruptionBudget (one the DistCache created before is removed).
    Disabled,
}

/// Every problem of a DistCache, each naming its field (`spec.keyspaces[0].maxBytes: ...`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec(pub Vec<String>);

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

/// Longest DistCache name: its StatefulSet's pods carry a `controller-revision-hash` label of the name plus 11
/// characters, and label values are at most 63.
pub const MAX_NAME_LENGTH: usize = 52;

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=MAX_NAME_LENGTH).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject
            .split('.')
            .all(|t| !t.is_empty() && t.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'))
}

/// Collects the problems; each `parse_*` step returns its typed value or records why there is none.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, problem: impl Into<String>) {
        self.0.push(problem.into());
    }
}

/// Parses a DistCache's identity and spec into a [`ValidSpec`]; reports every problem at once.
pub fn validate(dc: &DistCache) -> Result<ValidSpec, InvalidSpec> {
    let mut problems = Problems::default();
    let spec = &dc.spec;
    let name = dc.name_any();
    if !valid_name(&name) {
        problems.push(format!(
            "metadata.name: {name:?} must be a DNS label of at most {MAX_NAME_LENGTH} characters (lowercase letters, \
             digits, '-', starting with a letter): it names the StatefulSet, its pods and Services"
        ));
    }
    let namespace = dc.namespace().filter(|n| !n.is_empty());
    if namespace.is_none() {
        problems.push("metadata.namespace: required: a DistCache is namespaced and its objects go there");
    }
    let owner = dc.controller_owner_ref(&());
    if owner.is_none() {
        problems.push("metadata.uid: required: every object the DistCache owns references it");
    }
    if !(0..=MAX_REPLICAS).contains(&spec.replicas) {
        problems.push(format!(
            "spec.replicas: {} is out of range: must be between 0 and {MAX_REPLICAS}",
            spec.replicas
        ));
    }
    let image = parse_image(spec.image.as_ref(), &mut problems);
    let discovery = parse_discovery(spec, &name, namespace.as_deref().unwrap_or_default(), &mut problems);
    let pod_disruption_budget = parse_pdb(spec, &mut problems);
    let service = parse_service(spec, &mut problems);
    let tls = match &spec.tls {
        None => Some(None),
        Some(tls) => parse_tls(tls, &mut problems).map(Some),
    };
    // Checked also while disabled, as the CRD's rules check it; built only when enabled.
    let resp = match &spec.resp {
        None => Some(None),
        Some(r) => parse_resp(r, spec, &mut problems).map(|resp| r.enabled.then_some(resp)),
    };
    check_telemetry(spec, &mut problems);
    let handoff_timeout = spec.handoff.timeout.get();
    if handoff_timeout > MAX_HANDOFF_TIMEOUT {
        problems.push(format!(
            "spec.handoff.timeout: {} is longer than the maximum of {}",
            spec.handoff.timeout,
            DurationString(MAX_HANDOFF_TIMEOUT)
        ));
    }
    let keyspaces = match validate_keyspaces(&spec.keyspaces) {
        Ok(k) => k,
        Err(errors) => {
            problems.0.extend(errors.0.iter().map(|e| format!("spec.{e}")));
            Vec::new()
        }
    };
    match (
        problems.0.is_empty(),
        namespace,
        owner,
        image,
        discovery,
        pod_disruption_budget,
        service,
        (tls, resp),
    ) {
        (
            true,
            Some(namespace),
            Some(owner),
            Some(image),
            Some(discovery),
            Some(pdb),
            Some(service),
            (Some(tls), Some(resp)),
        ) => Ok(ValidSpec {
            name,
            namespace,
            owner,
            replicas: spec.replicas,
            image,
            resources: spec.resources.clone(),
            keyspaces,
            discovery,
            scheduling: spec.scheduling.clone().unwrap_or_default(),
            pod_disruption_budget: pdb,
            service,
            tls,
            network_policy: spec.network_policy.enabled,
            handoff_timeout,
            resp,
            tracing: spec.tracing.clone(),
            log: spec.log.clone().unwrap_or_default(),
        }),
        _ => Err(InvalidSpec(problems.0)),
    }
}

/// `spec.tracing` and `spec.log`, checked as the nodes check their `tracing` and `log` (which they become).
fn check_telemetry(spec: &DistCacheSpec, problems: &mut Problems) {
    if let Some(tracing) = &spec.tracing {
        if let Err(e) = distcache_telemetry::check_endpoint(&tracing.otlp_endpoint) {
            problems.push(format!("spec.tracing.otlpEndpoint: {e}"));
        }
        if let Some(ratio) = tracing.sample_ratio
            && let Err(e) = distcache_telemetry::check_sample_ratio(ratio)
        {
            problems.push(format!("spec.tracing.sampleRatio: {e}"));
        }
    }
    if let Some(level) = spec.log.as_ref().and_then(|l| l.level.as_deref())
        && let Err(e) = distcache_telemetry::check_level(level)
    {
        problems.push(format!("spec.log.level: {e}"));
    }
}

fn parse_image(image: Option<&ImageSpec>, problems: &mut Problems) -> Option<Image> {
    let Some(image) = image else { return Some(Image::default()) };
    let mut ok = true;
    for (field, value) in [("repository", &image.repository), ("tag", &image.tag)] {
        if let Some(v) = value
            && (v.is_empty() || v.contains(char::is_whitespace))
        {
            problems.push(format!("spec.image.{field}: {v:?} must be non-empty and without spaces"));
            ok = false;
        }
    }
    let pull_policy = image.pull_policy.as_deref().and_then(|p| {
        let policy = PullPolicy::parse(p);
        if policy.is_none() {
            problems.push(format!("spec.image.pullPolicy: {p:?} must be one of Always, IfNotPresent, Never"));
            ok = false;
        }
        policy
    });
    ok.then(|| Image { repository: image.repository.clone(), tag: image.tag.clone(), pull_policy })
}

fn parse_discovery(
    spec: &DistCacheSpec,
    name: &str,
    namespace: &str,
    problems: &mut Problems,
) -> Option<Discovery> {
    let d = &spec.discovery;
    let mut ok = true;
    let backends = [d.kubernetes.is_some(), d.dns.is_some(), d.nats.is_some()].iter().filter(|b| **b).count();
    if backends != 1 {
        problems.push("spec.discovery: set exactly one of kubernetes, dns or nats");
        ok = false;
    }
    if let Some(nats) = &d.nats
        && !(nats.url.starts_with("nats://") || nats.url.starts_with("tls://"))
    {
        problems.push(format!("spec.discovery.nats.url: {:?} must start with nats:// or tls://", nats.url));
        ok = false;
    }
    if let Some(subject) = d.nats.as_ref().and_then(|n| n.subject.as_deref())
        && !valid_subject(subject)
    {
        problems.push(format!(
            "spec.discovery.nats.subject: {subject:?} must be dot-separated tokens of letters, digits, '-' and '_'"
        ));
        ok = false;
    }
    if !ok {
        return None;
    }
    Some(if let Some(nats) = &d.nats {
        Discovery::Nats {
            url: nats.url.clone(),
            subject: nats.subject.clone().unwrap_or_else(|| format!("distcache.{namespace}.{name}")),
        }
    } else if let Some(dns) = &d.dns {
        Discovery::Dns { interval: dns.interval }
    } else {
        Discovery::Kubernetes
    })
}

fn parse_pdb(spec: &DistCacheSpec, problems: &mut Problems) -> Option<PdbPolicy> {
    let pdb = &spec.pod_disruption_budget;
    let mut ok = true;
    if pdb.min_available.is_some() && pdb.max_unavailable.is_some() {
        problems.push("spec.podDisruptionBudget: set minAvailable or maxUnavailable, not both");
        ok = false;
    }
    for (field, value) in [("minAvailable", &pdb.min_available), ("maxUnavailable", &pdb.max_unavailable)] {
        if let Some(v) = value
            && !valid_int_or_percent(v)
        {
            problems.push(format!(
                "spec.podDisruptionBudget.{field}: must be a non-negative number or a percentage"
            ));
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    Some(match (pdb.enabled, &pdb.min_available, &pdb.max_unavailable) {
        (false, _, _) => PdbPolicy::Disabled,
        (true, Some(min), _) => PdbPolicy::MinAvailable(min.clone()),
        (true, None, Some(max)) => PdbPolicy::MaxUnavailable(max.clone()),
        (true, None, None) => PdbPolicy::MaxUnavailable(IntOrString::Int(1)),
    })
}

fn parse_service(spec: &DistCacheSpec, problems: &mut Problems) -> Option<ClientService> {
    let type_ = match spec.service.type_.as_deref() {
        None => ServiceType::default(),
        Some(t) => {
            let Some(type_) = ServiceType::parse(t) else {
                problems.push(format!(
                    "spec.service.type: {t:?} must be one of ClusterIP, NodePort, LoadBalancer"
                ));
                return None;
            };
            type_
        }
    };
    Some(ClientService { type_, annotations: spec.service.annotations.clone() })
}

/// `spec.resp` with its defaults, whether enabled or not; `None` when it has a problem.
fn parse_resp(resp: &RespSpec, spec: &DistCacheSpec, problems: &mut Problems) -> Option<Resp> {
    let RespSpec { enabled: _, port, default_keyspace, password_secret } = resp;
    let mut ok = true;
    let port = port.unwrap_or(DEFAULT_RESP_PORT);
    let taken = [(GRPC_PORT, "client gRPC"), (ADMIN_PORT, "admin"), (PEER_PORT, "peer")];
    if port == 0 {
        problems.push("spec.resp.port: 0 is out of range: must be between 1 and 65535");
        ok = false;
    } else if let Some((_, what)) = taken.iter().find(|(p, _)| *p == i32::from(port)) {
        problems.push(format!(
            "spec.resp.port: {port} is the nodes' {what} port: choose another (default {DEFAULT_RESP_PORT})"
        ));
        ok = false;
    }
    if let Some(name) = default_keyspace
        && !spec.keyspaces.iter().any(|k| k.name == *name)
    {
        let known: Vec<&str> = spec.keyspaces.iter().map(|k| k.name.as_str()).collect();
        problems.push(format!(
            "spec.resp.defaultKeyspace: {name:?} is not one of spec.keyspaces ({})",
            if known.is_empty() { "there are none".to_owned() } else { known.join(", ") }
        ));
        ok = false;
    }
    if let Some(secret) = password_secret {
        if !valid_subdomain(&secret.name) {
            problems
                .push(format!("spec.resp.passwordSecret.name: {:?} is not a valid Secret name", secret.name));
            ok = false;
        }
        if !valid_secret_key(&secret.key) {
            problems.push(format!(
                "spec.resp.passwordSecret.key: {:?} must be 1 to 253 letters, digits, '-', '_' or '.'",
                secret.key
            ));
            ok = false;
        }
    }
    ok.then(|| Resp {
        port,
        default_keyspace: default_keyspace.clone(),
        password_secret: password_secret.clone(),
    })
}

/// A key of a Secret's data.
fn valid_secret_key(key: &str) -> bool {
    (1..=253).contains(&key.len())
        && key.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && key != "."
        && key != ".."
}

/// A Kubernetes object name (a DNS subdomain).
fn valid_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
        })
}

fn parse_tls(tls: &TlsSpec, problems: &mut Problems) -> Option<Tls> {
    let client_auth = tls.client_auth.unwrap_or_default();
    match (&tls.secret_name, &tls.cert_manager) {
        (Some(name), None) => {
            if !valid_subdomain(name) {
                problems.push(format!("spec.tls.secretName: {name:?} is not a valid Secret name"));
                return None;
            }
            Some(Tls { source: TlsSource::Secret(name.clone()), client_auth })
        }
        (None, Some(cm)) => {
            let mut ok = true;
            let issuer = &cm.issuer_ref;
            if issuer.name.is_empty() {
                problems.push("spec.tls.certManager.issuerRef.name: required");
                ok = false;
            }
            for (field, value) in [("kind", &issuer.kind), ("group", &issuer.group)] {
                if value.as_deref().is_some_and(|v| v.is_empty() || v.contains(char::is_whitespace)) {
                    problems.push(format!(
                        "spec.tls.certManager.issuerRef.{field}: must be non-empty, without spaces"
                    ));
                    ok = false;
                }
            }
            let duration = cm.duration.map(DurationString::get);
            let renew_before = cm.renew_before.map(DurationString::get);
            if let Some(d) = duration
                && d < MIN_CERT_DURATION
            {
                problems.push(format!(
                    "spec.tls.certManager.duration: {} is shorter than cert-manager's minimum of 1h",
                    DurationString(d)
                ));
                ok = false;
            }
            if let Some(r) = renew_before
                && (r.is_zero() || r >= duration.unwrap_or(DEFAULT_CERT_DURATION))
            {
                problems.push(format!(
                    "spec.tls.certManager.renewBefore: {} must be above 0 and shorter than the duration ({})",
                    DurationString(r),
                    DurationString(duration.unwrap_or(DEFAULT_CERT_DURATION))
                ));
                ok = false;
            }
            ok.then(|| Tls {
                source: TlsSource::CertManager(CertManager {
                    issuer_name: issuer.name.clone(),
                    issuer_kind: issuer.kind.clone().unwrap_or_else(|| "Issuer".to_owned()),
                    issuer_group: issuer.group.clone().unwrap_or_else(|| "cert-manager.io".to_owned()),
                    duration,
                    renew_before,
                }),
                client_auth,
            })
        }
        _ => {
            problems.push("spec.tls: set exactly one of secretName or certManager");
            None
        }
    }
}

/// cert-manager's default certificate lifetime (90 days).
pub const DEFAULT_CERT_DURATION: std::time::Duration = std::time::Duration::from_hours(2160);

fn valid_int_or_percent(v: &IntOrString) -> bool {
    match v {
        IntOrString::Int(i) => *i >= 0,
        IntOrString::String(s) => {
            s.strip_suffix('%').and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| n <= 100)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> DistCacheSpec {
        serde_yaml::from_str(yaml).expect("fixture parses")
    }

    /// A DistCache as the API server hands it over: named, in a namespace, with a uid.
    fn dc(name: &str, spec: DistCacheSpec) -> DistCache {
        let mut dc = DistCache::new(name, spec);
        dc.metadata.namespace = Some("apps".to_owned());
        dc.metadata.uid = Some("uid-1".to_owned());
        dc
    }

    fn check(name: &str, spec: &DistCacheSpec) -> Result<ValidSpec, InvalidSpec> {
        validate(&dc(name, spec.clone()))
    }

    #[test]
    fn defaults_validate() {
        let s = spec("{}");
        assert_eq!(s.replicas, 3);
        assert!(s.discovery.kubernetes.is_some());
        assert!(s.pod_disruption_budget.enabled);
        let valid = check("demo", &s).expect("the empty spec is valid");
        assert_eq!((valid.name.as_str(), valid.namespace.as_str(), valid.replicas), ("demo", "apps", 3));
        assert_eq!((valid.owner.kind.as_str(), valid.owner.uid.as_str()), ("DistCache", "uid-1"));
        assert_eq!(valid.image, Image::default());
        assert_eq!(valid.discovery, Discovery::Kubernetes);
        assert_eq!(valid.pod_disruption_budget, PdbPolicy::MaxUnavailable(IntOrString::Int(1)));
        assert_eq!(
            valid.service,
            ClientService { type_: ServiceType::ClusterIp, annotations: BTreeMap::new() }
        );
        assert!(valid.keyspaces.is_empty());
    }

    #[test]
    fn every_problem_names_its_field() {
        let s = spec(
            r#"
replicas: -1
image: { pullPolicy: Sometimes }
discovery: { kubernetes: {}, nats: { url: "http://x", subject: "distcache.>" } }
podDisruptionBudget: { minAvailable: 1, maxUnavailable: "150%" }
service: { type: ExternalName }
handoff: { timeout: 6m }
keyspaces:
  - { name: users, maxBytes: 1Ki }
  - { name: a, maxBytes: 1Mi, hook: { module: { url: "https://x/y.wasm" }, allowedHosts: ["nohost"] } }
"#,
        );
        let err = check("9-Bad.name", &s).expect_err("invalid").to_string();
        for expected in [
            "spec.replicas: -1 is out of range",
            "spec.image.pullPolicy",
            "spec.discovery: set exactly one",
            "spec.discovery.nats.url",
            "spec.discovery.nats.subject",
            "metadata.name: \"9-Bad.name\"",
            "spec.podDisruptionBudget: set minAvailable or maxUnavailable, not both",
            "spec.podDisruptionBudget.maxUnavailable",
            "spec.service.type",
            "spec.handoff.timeout: 6m is longer than the maximum of 5m",
            "spec.keyspaces[0].maxBytes",
            "spec.keyspaces[1].hook.module.sha256: required",
            "spec.keyspaces[1].hook.allowedHosts[0]",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in {err}");
        }
    }

    #[test]
    fn the_handoff_timeout_defaults_to_10s_and_may_be_off() {
        let valid = check("demo", &spec("{}")).expect("valid");
        assert_eq!(valid.handoff_timeout, std::time::Duration::from_secs(10));
        let off = check("demo", &spec("handoff: { timeout: 0s }")).expect("0s turns it off");
        assert_eq!(off.handoff_timeout, std::time::Duration::ZERO);
        let most = check("demo", &spec("handoff: { timeout: 5m }")).expect("the maximum");
        assert_eq!(most.handoff_timeout, MAX_HANDOFF_TIMEOUT);
        assert!(serde_yaml::from_str::<DistCacheSpec>("handoff: { timeout: 10 }").is_err(), "no unit");
    }

    #[test]
    fn names_fit_the_objects_they_name() {
        let s = spec("{}");
        assert!(check(&"a".repeat(MAX_NAME_LENGTH), &s).is_ok());
        assert!(check(&"a".repeat(MAX_NAME_LENGTH + 1), &s).is_err());
        for bad in ["-a", "a-", "a.b", "A", "1a", ""] {
            assert!(check(bad, &s).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_distcache_without_namespace_or_uid_is_invalid() {
        let mut d = dc("demo", spec("{}"));
        d.metadata.namespace = None;
        let err = validate(&d).expect_err("no namespace").0;
        assert_eq!(err, ["metadata.namespace: required: a DistCache is namespaced and its objects go there"]);
        d.metadata.namespace = Some(String::new());
        assert!(validate(&d).is_err(), "an empty namespace is no namespace");
        let mut d = dc("demo", spec("{}"));
        d.metadata.uid = None;
        let err = validate(&d).expect_err("no uid").0;
        assert_eq!(err, ["metadata.uid: required: every object the DistCache owns references it"]);
    }

    #[test]
    fn a_bad_pull_policy_or_service_type_is_named_alone() {
        let err = check("demo", &spec("image: { pullPolicy: always }")).expect_err("lowercase").0;
        assert_eq!(err, [r#"spec.image.pullPolicy: "always" must be one of Always, IfNotPresent, Never"#]);
        let err = check("demo", &spec("service: { type: ExternalName }")).expect_err("not selectable").0;
        assert_eq!(
            err,
            [r#"spec.service.type: "ExternalName" must be one of ClusterIP, NodePort, LoadBalancer"#]
        );
    }

    #[test]
    fn enum_values_parse_to_their_variant_and_back() {
        for (text, policy) in [
            ("Always", PullPolicy::Always),
            ("IfNotPresent", PullPolicy::IfNotPresent),
            ("Never", PullPolicy::Never),
        ] {
            let valid = check("demo", &spec(&format!("image: {{ pullPolicy: {text} }}"))).expect("valid");
            assert_eq!(valid.image.pull_policy, Some(policy));
            assert_eq!(policy.as_str(), text);
        }
        for (text, type_) in [
            ("ClusterIP", ServiceType::ClusterIp),
            ("NodePort", ServiceType::NodePort),
            ("LoadBalancer", ServiceType::LoadBalancer),
        ] {
            let valid = check("demo", &spec(&format!("service: {{ type: {text} }}"))).expect("valid");
            assert_eq!(valid.service.type_, type_);
            assert_eq!(type_.as_str(), text);
        }
    }

    #[test]
    fn discovery_and_pdb_settings_are_typed_with_their_defaults() {
        let nats = |yaml: &str| check("demo", &spec(yaml)).expect("valid").discovery;
        assert_eq!(
            nats("discovery: { nats: { url: 'nats://n:4222' } }"),
            Discovery::Nats { url: "nats://n:4222".to_owned(), subject: "distcache.apps.demo".to_owned() }
        );
        assert_eq!(
            nats("discovery: { nats: { url: 'tls://n:4222', subject: a.b } }"),
            Discovery::Nats { url: "tls://n:4222".to_owned(), subject: "a.b".to_owned() }
        );
        assert_eq!(nats("discovery: { dns: {} }"), Discovery::Dns { interval: None });
        assert_eq!(
            nats("discovery: { dns: { interval: 7s } }"),
            Discovery::Dns { interval: Some(DurationString(std::time::Duration::from_secs(7))) }
        );
        let pdb = |yaml: &str| check("demo", &spec(yaml)).expect("valid").pod_disruption_budget;
        assert_eq!(
            pdb("podDisruptionBudget: { minAvailable: '50%' }"),
            PdbPolicy::MinAvailable(IntOrString::String("50%".to_owned()))
        );
        assert_eq!(
            pdb("podDisruptionBudget: { maxUnavailable: 2 }"),
            PdbPolicy::MaxUnavailable(IntOrString::Int(2))
        );
        assert_eq!(pdb("podDisruptionBudget: { enabled: false, maxUnavailable: 2 }"), PdbPolicy::Disabled);
        assert!(
            check("demo", &spec("podDisruptionBudget: { enabled: false, maxUnavailable: -1 }")).is_err(),
            "a disabled budget's values are still checked"
        );
    }

    #[test]
    fn tls_and_network_policy_are_typed_with_their_defaults() {
        let valid = check("demo", &spec("{}")).expect("valid");
        assert_eq!(valid.tls, None, "no TLS unless asked for");
        assert!(valid.network_policy, "the NetworkPolicy is on by default");
        assert!(!check("demo", &spec("networkPolicy: { enabled: false }")).expect("valid").network_policy);

        let tls = |yaml: &str| check("demo", &spec(yaml)).expect("valid").tls.expect("tls");
        let secret = tls("tls: { secretName: demo-certs }");
        assert_eq!(
            secret,
            Tls { source: TlsSource::Secret("demo-certs".to_owned()), client_auth: ClientAuth::None }
        );
        assert_eq!(secret.secret_name("demo"), "demo-certs");
        assert_eq!(tls("tls: { secretName: c, clientAuth: required }").client_auth, ClientAuth::Required);
        let cm = tls("tls: { certManager: { issuerRef: { name: ca } } }");
        assert_eq!(
            cm.source,
            TlsSource::CertManager(CertManager {
                issuer_name: "ca".to_owned(),
                issuer_kind: "Issuer".to_owned(),
                issuer_group: "cert-manager.io".to_owned(),
                duration: None,
                renew_before: None,
            })
        );
        assert_eq!(cm.secret_name("demo"), "demo-tls", "the Secret cert-manager issues into");
        let cm = tls(
            "tls: { certManager: { issuerRef: { name: ca, kind: ClusterIssuer }, duration: 48h, renewBefore: 12h } }",
        );
        let TlsSource::CertManager(cm) = cm.source else { panic!("certManager") };
        assert_eq!(cm.issuer_kind, "ClusterIssuer");
        assert_eq!(
            (cm.duration, cm.renew_before),
            (Some(std::time::Duration::from_hours(48)), Some(std::time::Duration::from_hours(12)))
        );
    }

    #[test]
    fn tls_problems_name_their_field() {
        let err = |yaml: &str| check("demo", &spec(yaml)).expect_err("invalid").to_string();
        assert_eq!(err("tls: {}"), "spec.tls: set exactly one of secretName or certManager");
        assert_eq!(
            err("tls: { secretName: a, certManager: { issuerRef: { name: ca } } }"),
            "spec.tls: set exactly one of secretName or certManager"
        );
        assert!(err("tls: { secretName: Bad_Name }").starts_with("spec.tls.secretName: \"Bad_Name\""));
        assert!(
            err("tls: { certManager: { issuerRef: { name: '' } } }")
                .contains("spec.tls.certManager.issuerRef.name: required")
        );
        assert!(
            err("tls: { certManager: { issuerRef: { name: ca }, duration: 30m } }")
                .contains("spec.tls.certManager.duration: 30m is shorter than cert-manager's minimum of 1h")
        );
        assert!(
            err("tls: { certManager: { issuerRef: { name: ca }, duration: 2h, renewBefore: 2h } }").contains(
                "spec.tls.certManager.renewBefore: 2h must be above 0 and shorter than the duration (2h)"
            )
        );
        assert!(
            err("tls: { certManager: { issuerRef: { name: ca }, renewBefore: 100d } }").contains("(90d)")
        );
        let unknown = serde_yaml::from_str::<DistCacheSpec>("tls: { secretName: a, clientAuth: always }");
        assert!(unknown.is_err(), "clientAuth is none, optional or required");
    }

    #[test]
    fn keyspace_protections_are_checked_and_named_by_field() {
        let s = spec(
            r"
keyspaces:
  - { name: plain, maxBytes: 1Mi, staleIfError: 1m }
  - name: users
    maxBytes: 1Mi
    hook: { module: { path: users.wasm } }
    circuitBreaker: { failureRatio: 1.5 }
    refreshAhead: 1.0
    rateLimit: { fetchesPerSecond: 0 }
",
        );
        let err = check("demo", &s).expect_err("invalid").0;
        for expected in [
            "spec.keyspaces[0].staleIfError: needs a hook",
            "spec.keyspaces[1].circuitBreaker.failureRatio: 1.5 must be greater than 0 and at most 1",
            "spec.keyspaces[1].refreshAhead: 1 is out of range",
            "spec.keyspaces[1].rateLimit.fetchesPerSecond: must be between 1 and 1000000",
        ] {
            assert!(err.iter().any(|e| e.starts_with(expected)), "missing {expected:?} in {err:?}");
        }
        assert_eq!(err.len(), 4, "one problem per bad field: {err:?}");

        let fixed = spec(
            r"
keyspaces:
  - name: users
    maxBytes: 1Mi
    hook: { module: { path: users.wasm } }
    circuitBreaker: {}
    staleIfError: 1m
",
        );
        let valid = check("demo", &fixed).expect("protections with a hook are valid");
        let breaker = valid.keyspaces[0].protection.circuit_breaker.expect("breaker");
        assert_eq!((breaker.failure_ratio, breaker.minimum_requests), (0.5, 20), "the defaults applied");
        assert_eq!(valid.keyspaces[0].protection.stale_if_error, Some(std::time::Duration::from_mins(1)));
    }

    const TWO_KEYSPACES: &str =
        "keyspaces: [{ name: users, maxBytes: 1Mi }, { name: sessions, maxBytes: 1Mi }]\n";

    #[test]
    fn resp_is_off_unless_enabled_and_typed_with_its_defaults() {
        let resp = |yaml: &str| check("demo", &spec(&format!("{TWO_KEYSPACES}{yaml}"))).expect("valid").resp;
        assert_eq!(resp(""), None, "no front end without spec.resp");
        assert_eq!(resp("resp: {}"), None, "disabled by default");
        assert_eq!(resp("resp: { enabled: false, port: 7000, defaultKeyspace: users }"), None);
        assert_eq!(
            resp("resp: { enabled: true }"),
            Some(Resp { port: 6379, default_keyspace: None, password_secret: None }),
            "Redis's port by default, no default keyspace, no password"
        );
        assert_eq!(
            resp(
                "resp: { enabled: true, port: 7000, defaultKeyspace: sessions, \
                 passwordSecret: { name: redis-auth, key: password } }"
            ),
            Some(Resp {
                port: 7000,
                default_keyspace: Some("sessions".to_owned()),
                password_secret: Some(SecretKeyRef {
                    name: "redis-auth".to_owned(),
                    key: "password".to_owned()
                }),
            })
        );
        assert!(resp("resp: { enabled: true, port: 1 }").is_some_and(|r| r.port == 1));
        assert!(resp("resp: { enabled: true, port: 65535 }").is_some_and(|r| r.port == 65535));
    }

    #[test]
    fn resp_problems_name_their_field() {
        let err =
            |yaml: &str| check("demo", &spec(&format!("{TWO_KEYSPACES}{yaml}"))).expect_err("invalid").0;
        assert_eq!(
            err("resp: { enabled: true, port: 0 }"),
            ["spec.resp.port: 0 is out of range: must be between 1 and 65535"]
        );
        for (port, what) in [(7420, "client gRPC"), (7421, "admin"), (7422, "peer")] {
            assert_eq!(
                err(&format!("resp: {{ enabled: true, port: {port} }}")),
                [format!("spec.resp.port: {port} is the nodes' {what} port: choose another (default 6379)")]
            );
        }
        assert_eq!(
            err("resp: { enabled: true, defaultKeyspace: orders }"),
            [r#"spec.resp.defaultKeyspace: "orders" is not one of spec.keyspaces (users, sessions)"#]
        );
        let none = check("demo", &spec("resp: { enabled: true, defaultKeyspace: users }"))
            .expect_err("no keyspaces");
        assert_eq!(
            none.0,
            [r#"spec.resp.defaultKeyspace: "users" is not one of spec.keyspaces (there are none)"#]
        );
        assert_eq!(
            err("resp: { enabled: true, passwordSecret: { name: Bad_Name, key: 'a/b' } }"),
            [
                r#"spec.resp.passwordSecret.name: "Bad_Name" is not a valid Secret name"#,
                r#"spec.resp.passwordSecret.key: "a/b" must be 1 to 253 letters, digits, '-', '_' or '.'"#,
            ]
        );
        // Checked while disabled too, as the CRD's rules are.
        assert_eq!(err("resp: { port: 7422, defaultKeyspace: users }").len(), 1);
        assert!(serde_yaml::from_str::<DistCacheSpec>("resp: { enabled: true, port: 65536 }").is_err());
        assert!(serde_yaml::from_str::<DistCacheSpec>("resp: { enabled: true, port: -1 }").is_err());
    }

    #[test]
    fn tracing_and_log_are_checked_as_the_nodes_check_them() {
        let valid = check(
            "demo",
            &spec(
                "tracing: { otlpEndpoint: 'http://otel-collector.monitoring:4317', sampleRatio: 0.25 }\n\
                 log: { format: json, level: 'info,distcache_node::hooks=debug' }",
            ),
        )
        .expect("valid");
        let tracing = valid.tracing.expect("tracing");
        assert_eq!(
            (tracing.otlp_endpoint.as_str(), tracing.sample_ratio, tracing.record_keys),
            ("http://otel-collector.monitoring:4317", Some(0.25), false)
        );
        assert_eq!(valid.log.format, distcache_api::LogFormatSpec::Json);
        let plain = check("demo", &spec("{}")).expect("valid");
        assert_eq!((plain.tracing, plain.log), (None, LogSpec::default()), "off, text, the node's level");

        let err = check(
            "demo",
            &spec("tracing: { otlpEndpoint: 'https://c:4317', sampleRatio: 1.5 }\nlog: { level: 'info,=[' }"),
        )
        .expect_err("invalid")
        .0;
        assert_eq!(err.len(), 3, "{err:?}");
        assert!(err[0].starts_with("spec.tracing.otlpEndpoint: must be an http:// URL"), "{err:?}");
        assert_eq!(err[1], "spec.tracing.sampleRatio: must be between 0 and 1, got 1.5");
        assert!(err[2].starts_with(r#"spec.log.level: "info,=[" is not a valid filter"#), "{err:?}");
        assert!(serde_yaml::from_str::<DistCacheSpec>("log: { format: xml }").is_err());
        assert!(
            serde_yaml::from_str::<DistCacheSpec>("tracing: { sampleRatio: 0.5 }").is_err(),
            "no endpoint"
        );
    }

    #[test]
    fn unknown_keyspace_fields_are_rejected_when_parsing() {
        let err = serde_yaml::from_str::<DistCacheSpec>("keyspaces: [{ name: a, maxBytes: 1Mi, tll: 5m }]")
            .expect_err("typo")
            .to_string();
        assert!(err.contains("tll"), "{err}");
    }
}
