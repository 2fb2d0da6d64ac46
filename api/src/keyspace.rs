//! The keyspace specification and its validation.

use std::{collections::BTreeMap, collections::HashSet, fmt, time::Duration};

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{ByteSize, DurationString, HostPort};

/// Default `fetchTimeout` of a keyspace.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `maxValueBytes` of a keyspace (capped at `maxBytes`).
pub const DEFAULT_MAX_VALUE_BYTES: u64 = 8 << 20;
/// Most keyspaces one node or one DistCache serves.
pub const MAX_KEYSPACES: usize = 256;

/// Most `allowedHosts` entries of one hook (also a bound of the CRD's CEL rule cost).
const MAX_ALLOWED_HOSTS: usize = 16;
const MIN_MAX_BYTES: u64 = 64 << 10;
const MAX_MAX_BYTES: u64 = 1 << 40;
const MAX_VALUE_BYTES_LIMIT: u64 = 512 << 20;
const MIN_TTL: Duration = Duration::from_millis(10);
const MAX_TTL: Duration = Duration::from_hours(366 * 24);
const MAX_FETCH_TIMEOUT: Duration = Duration::from_mins(10);

/// The keyspaces file a node reads (`keyspacesFile`), and the data key of the operator's keyspace ConfigMap.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyspacesFile {
    /// The keyspaces, each with a unique name.
    #[serde(default)]
    pub keyspaces: Vec<KeyspaceSpec>,
}

/// One keyspace: a named, independently sized and configured set of keys. Each node holds the keys of every
/// keyspace that it owns, up to `maxBytes` per keyspace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.hook) || !(has(self.rateLimit) || has(self.circuitBreaker) || has(self.staleWhileRevalidate) || \
     has(self.staleIfError) || has(self.refreshAhead) || has(self.warmUp))"
).message("rateLimit, circuitBreaker, staleWhileRevalidate, staleIfError, refreshAhead and warmUp need a hook (they protect and use the data source)"))]
pub struct KeyspaceSpec {
    /// Name used by clients (`Get(keyspace, key)`): lowercase letters, digits, '-', '_' and '.', at most 63
    /// characters, starting and ending with a letter or digit.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$"))]
    pub name: String,
    /// Memory budget of the keyspace on each node, counting key + value + a fixed per-entry overhead; least
    /// recently and least frequently used entries are evicted beyond it. Between 64Ki and 1Ti. One eighth of it
    /// is the budget of the hot tier that keeps copies of keys owned by other nodes.
    pub max_bytes: ByteSize,
    /// Default time to live of an entry (a Put or the data source may set another). Absent: entries do not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<DurationString>,
    /// How long a NOT_FOUND answer of the data source is cached. Absent: NOT_FOUND is not cached and every Get of
    /// a missing key reaches the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_ttl: Option<DurationString>,
    /// Deadline of one fetch from the data source; a slower fetch fails with DEADLINE_EXCEEDED. Default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_timeout: Option<DurationString>,
    /// Largest value a Put accepts. Default 8Mi (or maxBytes when smaller); at most 512Mi and at most maxBytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_value_bytes: Option<ByteSize>,
    /// The data-source hook that loads missing keys (read-through). Absent: a pure cache-aside keyspace where a
    /// miss is NOT_FOUND and values arrive only through Put.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookSpec>,
    /// Which clients may read and write this keyspace, by the identities of their TLS client certificates (a
    /// subject alternative name or the common name). Needs the node's `tls.clientAuth: required` (the operator's
    /// `spec.tls.clientAuth`): a caller without a certificate has no identity and is refused. Absent: every
    /// client may read and write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessSpec>,
    /// Most data-source fetches per second on each node (a token bucket). A fetch beyond it waits up to the
    /// keyspace's fetchTimeout for a token, then fails with RESOURCE_EXHAUSTED. Background refreshes and
    /// warm-up loads use the same budget and never wait. Needs a hook. Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Stops calling a failing data source for a while: once at least `minimumRequests` fetches ended within
    /// `window` and the share of failures (unavailable, timeout, hook trap; never not-found or an invalid key)
    /// reaches `failureRatio`, the circuit opens and fetches fail at once with UNAVAILABLE (or serve a stale
    /// value, see staleIfError) for `openFor`; then single probe fetches go through, and the first success
    /// closes it again. Needs a hook. Absent: no breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// An expired entry at most this long past its expiry is answered at once, marked stale, while one
    /// background fetch refreshes it (RFC 5861 stale-while-revalidate). Needs a hook. Absent: an expired entry
    /// is fetched again before it is answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_while_revalidate: Option<DurationString>,
    /// When a fetch fails (unavailable, timeout, hook trap, circuit open, rate limit), the last value, at most
    /// this long past its expiry, is answered instead, marked stale (RFC 5861 stale-if-error). Expired entries
    /// are kept in memory, counted in maxBytes, for the longer of the two stale windows. Needs a hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_if_error: Option<DurationString>,
    /// A key read after this fraction of its time to live has passed is fetched again in the background, so
    /// readers of a popular key never wait for it to expire (0.8: reads in the last fifth of the TTL refresh
    /// it). Between 0.1 and 0.99. Needs a hook. Absent: no refresh ahead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.1, max = 0.99))]
    pub refresh_ahead: Option<f64>,
    /// Keys loaded before anyone asks: each node loads those it owns after it starts and after ownership moves
    /// (readiness does not wait for it). Needs a hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_up: Option<WarmUpSpec>,
}

/// A token bucket on data-source fetches, per node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Sustained fetches per second, between 1 and 1000000.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub fetches_per_second: u32,
    /// Fetches allowed at once above the sustained rate, between 1 and 1000000. Default: fetchesPerSecond.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub burst: Option<u32>,
}

/// The circuit breaker of a keyspace's data source, per node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.failureRatio) || (self.failureRatio > 0.0 && self.failureRatio <= 1.0)"
).message("circuitBreaker.failureRatio must be greater than 0 and at most 1"))]
pub struct CircuitBreakerSpec {
    /// Share of failed fetches within the window that opens the circuit, above 0 and at most 1. Default 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_ratio: Option<f64>,
    /// Fewest fetches within the window before the ratio counts, between 1 and 100000. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub minimum_requests: Option<u32>,
    /// The sliding window fetches are counted in, between 1s and 1h. Default 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<DurationString>,
    /// How long the circuit stays open before probe fetches go through, between 100ms and 1h. Default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<DurationString>,
}

/// Keys to load ahead of readers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmUpSpec {
    /// The keys, at most 10000; each node loads those it owns.
    #[serde(default)]
    #[schemars(length(max = 10000), inner(length(min = 1, max = 4096)))]
    pub keys: Vec<String>,
    /// Warm-up fetches per second on each node, between 1 and 100000. Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub fetches_per_second: Option<u32>,
}

/// The callers allowed per operation. A call outside its list fails with PERMISSION_DENIED, naming the keyspace
/// and the operation (never the list).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessSpec {
    /// Identities allowed to Get and GetMany. Absent: every client may read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub read: Option<Vec<String>>,
    /// Identities allowed to Put, Delete (and their batch forms) and PurgeKeySpace. Absent: every client may
    /// write. An empty list: nobody may write (a read-through-only keyspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub write: Option<Vec<String>>,
}

impl AccessSpec {
    /// Whether a caller with `identities` may do `op`; `None` identities = no client certificate.
    pub fn allows(&self, op: AccessOp, identities: &[String]) -> bool {
        let list = match op {
            AccessOp::Read => &self.read,
            AccessOp::Write => &self.write,
        };
        match list {
            None => true,
            Some(allowed) => identities.iter().any(|id| allowed.iter().any(|a| a == id)),
        }
    }
}

/// The two kinds of operation an [`AccessSpec`] controls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessOp {
    /// Get, GetMany.
    Read,
    /// Put, PutMany, Delete, DeleteMany, PurgeKeySpace.
    Write,
}

impl AccessOp {
    /// "read" or "write", for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

/// A WebAssembly data-source hook and its sandbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HookSpec {
    /// Where the hook's WebAssembly component comes from: exactly one of path, configMap, or url with sha256.
    pub module: ModuleSource,
    /// String settings passed to the hook's `init` (for example the backend's base URL).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// The only `host:port` pairs the hook may reach through the host's HTTP interface, for example
    /// `users-api.default.svc:8080` or `[fd00::1]:443`, at most 16. Empty: no egress at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 3, max = 261)))]
    #[x_kube(validation = kube::core::Rule::new(
        r"self.all(h, h.matches('^([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\\[[0-9A-Fa-f:.]+\\]):[0-9]{1,5}$'))"
    ).message("every allowedHosts entry must be host:port, for example users-api:8080 or [fd00::1]:443"))]
    pub allowed_hosts: Vec<String>,
    /// Resource limits of one hook call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<HookLimits>,
}

/// The source of a hook's WebAssembly component. Exactly one of `path`, `configMap` or `url` (with `sha256`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = kube::core::Rule::new(
        "(has(self.path) ? 1 : 0) + (has(self.configMap) ? 1 : 0) + (has(self.url) ? 1 : 0) == 1"
    ).message("hook.module: set exactly one of path, configMap or url"),
    validation = kube::core::Rule::new("!has(self.url) || has(self.sha256)")
        .message("hook.module: url requires sha256"),
)]
pub struct ModuleSource {
    /// A file on the node, relative to the keyspaces file's directory unless absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A key of a ConfigMap (binaryData) in the DistCache's namespace, mounted into the node pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKeyRef>,
    /// An http(s) URL to download the component from, once; requires `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Hex SHA-256 of the component; required with `url`, checked for every source when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// A key of a ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMapKeyRef {
    /// ConfigMap name.
    pub name: String,
    /// Key inside the ConfigMap.
    pub key: String,
}

/// Limits of one hook call.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HookLimits {
    /// WebAssembly fuel (roughly instructions) per call. Default 100000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Linear memory of one instance, between 1Mi and 4Gi. Default 64Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// Wall-clock deadline of one call. Default: the keyspace's fetchTimeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationString>,
    /// Most hook instances of the keyspace on one node, which is also the number of hook calls that run at
    /// once; further misses wait for a free instance. Idle instances are kept ready for the next call.
    /// Default 16, at most 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<u32>,
    /// Largest HTTP response body the hook may receive through the host's http interface. Default: the
    /// keyspace's maxValueBytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<ByteSize>,
    /// Most outbound HTTP requests of the keyspace's hook in flight at once on one node. Default 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
}

/// A keyspace whose settings passed validation, with defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidKeyspace {
    /// Keyspace name.
    pub name: String,
    /// Byte budget of the main tier on each node.
    pub max_bytes: u64,
    /// Default entry TTL.
    pub ttl: Option<Duration>,
    /// TTL of cached NOT_FOUND answers.
    pub negative_ttl: Option<Duration>,
    /// Deadline of one fetch.
    pub fetch_timeout: Duration,
    /// Largest value accepted.
    pub max_value_bytes: u64,
    /// The hook's `allowedHosts`, parsed (empty without a hook).
    pub allowed_hosts: Vec<HostPort>,
    /// Protections of the data source and stale serving, with defaults applied.
    pub protection: Protection,
    /// The spec it came from (hook settings are interpreted by the hook runtime).
    pub spec: KeyspaceSpec,
}

/// The validated `rateLimit`, `circuitBreaker`, stale windows, `refreshAhead` and `warmUp` of a keyspace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Protection {
    /// Sustained fetches per second and burst.
    pub rate_limit: Option<(u32, u32)>,
    /// The circuit breaker.
    pub circuit_breaker: Option<BreakerSettings>,
    /// How long past expiry an entry is answered while it is refreshed.
    pub stale_while_revalidate: Option<Duration>,
    /// How long past expiry an entry is answered when a fetch fails.
    pub stale_if_error: Option<Duration>,
    /// Fraction of the TTL after which a read refreshes the entry in the background.
    pub refresh_ahead: Option<f64>,
    /// Keys to load ahead, and the warm-up rate (fetches per second).
    pub warm_up: Option<(Vec<String>, u32)>,
}

impl Protection {
    /// How long an expired entry stays useful (the longer stale window); zero without one.
    pub fn stale_keep(&self) -> Duration {
        self.stale_while_revalidate.unwrap_or_default().max(self.stale_if_error.unwrap_or_default())
    }
}

/// A circuit breaker's settings, defaults applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerSettings {
    /// Share of failures that opens it.
    pub failure_ratio: f64,
    /// Fewest fetches in the window before it may open.
    pub minimum_requests: u32,
    /// The counting window.
    pub window: Duration,
    /// How long it stays open.
    pub open_for: Duration,
}

/// Default `circuitBreaker.failureRatio`.
pub const DEFAULT_FAILURE_RATIO: f64 = 0.5;
/// Default `circuitBreaker.minimumRequests`.
pub const DEFAULT_MINIMUM_REQUESTS: u32 = 20;
/// Default `circuitBreaker.window`.
pub const DEFAULT_BREAKER_WINDOW: Duration = Duration::from_secs(10);
/// Default `circuitBreaker.openFor`.
pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(5);
/// Default `warmUp.fetchesPerSecond`.
pub const DEFAULT_WARM_UP_RATE: u32 = 50;
/// Most `warmUp.keys`.
pub const MAX_WARM_UP_KEYS: usize = 10_000;

/// Validates the protections of one keyspace (`at` = `keyspaces[i]`).
fn validate_protection(c: &mut Collector, at: &str, spec: &KeyspaceSpec) -> Protection {
    let used = [
        (spec.rate_limit.is_some(), "rateLimit"),
        (spec.circuit_breaker.is_some(), "circuitBreaker"),
        (spec.stale_while_revalidate.is_some(), "staleWhileRevalidate"),
        (spec.stale_if_error.is_some(), "staleIfError"),
        (spec.refresh_ahead.is_some(), "refreshAhead"),
        (spec.warm_up.is_some(), "warmUp"),
    ];
    if spec.hook.is_none() {
        for (_, field) in used.iter().filter(|(set, _)| *set) {
            c.push(
                format!("{at}.{field}"),
                "needs a hook: it protects or uses the data source, and this keyspace has none",
            );
        }
    }
    let rate_limit = spec.rate_limit.as_ref().map(|r| {
        if !(1..=1_000_000).contains(&r.fetches_per_second) {
            c.push(format!("{at}.rateLimit.fetchesPerSecond"), "must be between 1 and 1000000");
        }
        if let Some(b) = r.burst
            && !(1..=1_000_000).contains(&b)
        {
            c.push(format!("{at}.rateLimit.burst"), "must be between 1 and 1000000");
        }
        (r.fetches_per_second.max(1), r.burst.unwrap_or(r.fetches_per_second).max(1))
    });
    let circuit_breaker = spec.circuit_breaker.as_ref().map(|b| {
        let failure_ratio = b.failure_ratio.unwrap_or(DEFAULT_FAILURE_RATIO);
        if !(failure_ratio > 0.0 && failure_ratio <= 1.0) {
            c.push(
                format!("{at}.circuitBreaker.failureRatio"),
                format!("{failure_ratio} must be greater than 0 and at most 1"),
            );
        }
        let minimum_requests = b.minimum_requests.unwrap_or(DEFAULT_MINIMUM_REQUESTS);
        if !(1..=100_000).contains(&minimum_requests) {
            c.push(format!("{at}.circuitBreaker.minimumRequests"), "must be between 1 and 100000");
        }
        c.duration_in_range(
            format!("{at}.circuitBreaker.window"),
            b.window,
            Duration::from_secs(1),
            Duration::from_hours(1),
        );
        c.duration_in_range(
            format!("{at}.circuitBreaker.openFor"),
            b.open_for,
            Duration::from_millis(100),
            Duration::from_hours(1),
        );
        BreakerSettings {
            failure_ratio,
            minimum_requests,
            window: b.window.map_or(DEFAULT_BREAKER_WINDOW, DurationString::get),
            open_for: b.open_for.map_or(DEFAULT_OPEN_FOR, DurationString::get),
        }
    });
    c.duration_in_range(format!("{at}.staleWhileRevalidate"), spec.stale_while_revalidate, MIN_TTL, MAX_TTL);
    c.duration_in_range(format!("{at}.staleIfError"), spec.stale_if_error, MIN_TTL, MAX_TTL);
    if let Some(r) = spec.refresh_ahead
        && !(0.1..=0.99).contains(&r)
    {
        c.push(format!("{at}.refreshAhead"), format!("{r} is out of range: must be between 0.1 and 0.99"));
    }
    let warm_up = spec.warm_up.as_ref().map(|w| {
        if w.keys.len() > MAX_WARM_UP_KEYS {
            c.push(
                format!("{at}.warmUp.keys"),
                format!("{} keys given, at most {MAX_WARM_UP_KEYS} allowed", w.keys.len()),
            );
        }
        let mut seen = HashSet::new();
        for (j, key) in w.keys.iter().enumerate() {
            if key.is_empty() || key.len() > 4096 {
                c.push(format!("{at}.warmUp.keys[{j}]"), "a key must be 1 to 4096 bytes long");
            } else if !seen.insert(key.as_str()) {
                c.push(format!("{at}.warmUp.keys[{j}]"), format!("duplicate key {key:?}"));
            }
        }
        let rate = w.fetches_per_second.unwrap_or(DEFAULT_WARM_UP_RATE);
        if !(1..=100_000).contains(&rate) {
            c.push(format!("{at}.warmUp.fetchesPerSecond"), "must be between 1 and 100000");
        }
        (w.keys.clone(), rate.max(1))
    });
    Protection {
        rate_limit,
        circuit_breaker,
        stale_while_revalidate: spec.stale_while_revalidate.map(DurationString::get),
        stale_if_error: spec.stale_if_error.map(DurationString::get),
        refresh_ahead: spec.refresh_ahead,
        warm_up,
    }
}

/// One problem found in a keyspaces file, naming the field (`keyspaces[1].maxBytes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    /// JSON-path-like location of the field.
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in a keyspaces file (validation does not stop at the first).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

struct Collector {
    errors: Vec<ValidationError>,
}

impl Collector {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ValidationError { field: field.into(), message: message.into() });
    }

    fn duration_in_range(
        &mut self,
        field: String,
        value: Option<DurationString>,
        min: Duration,
        max: Duration,
    ) {
        if let Some(DurationString(d)) = value
            && (d < min || d > max)
        {
            self.push(
                field,
                format!(
                    "{} is out of range: must be between {} and {}",
                    DurationString(d),
                    DurationString(min),
                    DurationString(max)
                ),
            );
        }
    }
}

fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// Validates a hook and returns its parsed `allowedHosts` (the entries that parse).
fn validate_hook(c: &mut Collector, at: &str, hook: &HookSpec) -> Vec<HostPort> {
    let m = &hook.module;
    let sources = [m.path.is_some(), m.config_map.is_some(), m.url.is_some()].iter().filter(|s| **s).count();
    if sources != 1 {
        c.push(format!("{at}.hook.module"), "exactly one of path, configMap or url must be set");
    }
    if m.url.is_some() && m.sha256.is_none() {
        c.push(format!("{at}.hook.module.sha256"), "required when url is set");
    }
    if let Some(url) = &m.url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        c.push(format!("{at}.hook.module.url"), format!("{url:?} must be an http:// or https:// URL"));
    }
    if let Some(sha) = &m.sha256
        && !(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        c.push(format!("{at}.hook.module.sha256"), "must be 64 hexadecimal characters");
    }
    if let Some(path) = &m.path
        && path.is_empty()
    {
        c.push(format!("{at}.hook.module.path"), "must not be empty");
    }
    if hook.allowed_hosts.len() > MAX_ALLOWED_HOSTS {
        c.push(
            format!("{at}.hook.allowedHosts"),
            format!("{} entries given, at most {MAX_ALLOWED_HOSTS} allowed", hook.allowed_hosts.len()),
        );
    }
    let mut allowed_hosts = Vec::with_capacity(hook.allowed_hosts.len());
    for (i, entry) in hook.allowed_hosts.iter().enumerate() {
        match entry.parse::<HostPort>() {
            Ok(host) => allowed_hosts.push(host),
            Err(e) => c.push(format!("{at}.hook.allowedHosts[{i}]"), e.to_string()),
        }
    }
    if let Some(limits) = &hook.limits {
        if limits.fuel == Some(0) {
            c.push(format!("{at}.hook.limits.fuel"), "must be positive");
        }
        if let Some(ByteSize(mem)) = limits.memory
            && !(1 << 20..=4 << 30).contains(&mem)
        {
            c.push(format!("{at}.hook.limits.memory"), "must be between 1Mi and 4Gi");
        }
        c.duration_in_range(format!("{at}.hook.limits.timeout"), limits.timeout, MIN_TTL, MAX_FETCH_TIMEOUT);
        if let Some(pool) = limits.pool_size
            && !(1..=1024).contains(&pool)
        {
            c.push(format!("{at}.hook.limits.poolSize"), "must be between 1 and 1024");
        }
        if let Some(ByteSize(bytes)) = limits.max_response_bytes
            && !(1..=MAX_VALUE_BYTES_LIMIT).contains(&bytes)
        {
            c.push(
                format!("{at}.hook.limits.maxResponseBytes"),
                format!("must be positive and at most {}", ByteSize(MAX_VALUE_BYTES_LIMIT)),
            );
        }
        if let Some(n) = limits.max_concurrent_requests
            && !(1..=4096).contains(&n)
        {
            c.push(format!("{at}.hook.limits.maxConcurrentRequests"), "must be between 1 and 4096");
        }
    }
    allowed_hosts
}

/// Validates a list of keyspaces and applies defaults. Reports every problem at once, each naming its field
/// as `keyspaces[i].field`.
pub fn validate_keyspaces(specs: &[KeyspaceSpec]) -> Result<Vec<ValidKeyspace>, ValidationErrors> {
    let mut c = Collector { errors: Vec::new() };
    if specs.len() > MAX_KEYSPACES {
        c.push("keyspaces", format!("{} keyspaces given, at most {MAX_KEYSPACES} allowed", specs.len()));
    }
    let mut seen = HashSet::new();
    let mut valid = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let at = format!("keyspaces[{i}]");
        if !valid_name(&spec.name) {
            c.push(
                format!("{at}.name"),
                format!(
                    "{:?} is not a valid keyspace name: use 1-63 lowercase letters, digits, '-', '_' or '.', \
                     starting and ending with a letter or digit",
                    spec.name
                ),
            );
        } else if !seen.insert(spec.name.as_str()) {
            c.push(format!("{at}.name"), format!("duplicate keyspace name {:?}", spec.name));
        }
        let max_bytes = spec.max_bytes.0;
        if !(MIN_MAX_BYTES..=MAX_MAX_BYTES).contains(&max_bytes) {
            c.push(
                format!("{at}.maxBytes"),
                format!(
                    "{} is out of range: must be between {} and {}",
                    spec.max_bytes,
                    ByteSize(MIN_MAX_BYTES),
                    ByteSize(MAX_MAX_BYTES)
                ),
            );
        }
        c.duration_in_range(format!("{at}.ttl"), spec.ttl, MIN_TTL, MAX_TTL);
        c.duration_in_range(format!("{at}.negativeTtl"), spec.negative_ttl, MIN_TTL, MAX_TTL);
        c.duration_in_range(format!("{at}.fetchTimeout"), spec.fetch_timeout, MIN_TTL, MAX_FETCH_TIMEOUT);
        let max_value_bytes = match spec.max_value_bytes {
            Some(ByteSize(v)) => {
                if v == 0 || v > MAX_VALUE_BYTES_LIMIT || v > max_bytes {
                    c.push(
                        format!("{at}.maxValueBytes"),
                        format!(
                            "{} is out of range: must be positive, at most {} and at most maxBytes ({})",
                            ByteSize(v),
                            ByteSize(MAX_VALUE_BYTES_LIMIT),
                            spec.max_bytes
                        ),
                    );
                }
                v
            }
            None => DEFAULT_MAX_VALUE_BYTES.min(max_bytes),
        };
        let allowed_hosts =
            spec.hook.as_ref().map(|hook| validate_hook(&mut c, &at, hook)).unwrap_or_default();
        if let Some(access) = &spec.access {
            for (op, list) in [("read", &access.read), ("write", &access.write)] {
                for (j, id) in list.iter().flatten().enumerate() {
                    if id.trim().is_empty() || id.len() > 253 || id.chars().any(char::is_whitespace) {
                        c.push(
                            format!("{at}.access.{op}[{j}]"),
                            format!("{id:?} is not an identity: a certificate's SAN or CN, without spaces"),
                        );
                    }
                }
            }
        }
        let protection = validate_protection(&mut c, &at, spec);
        valid.push(ValidKeyspace {
            name: spec.name.clone(),
            max_bytes,
            ttl: spec.ttl.map(DurationString::get),
            negative_ttl: spec.negative_ttl.map(DurationString::get),
            fetch_timeout: spec.fetch_timeout.map_or(DEFAULT_FETCH_TIMEOUT, DurationString::get),
            max_value_bytes,
            allowed_hosts,
            protection,
            spec: spec.clone(),
        });
    }
    if c.errors.is_empty() { Ok(valid) } else { Err(ValidationErrors(c.errors)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> KeyspacesFile {
        serde_yaml::from_str(yaml).expect("fixture parses")
    }

    #[test]
    fn design_example_validates_with_defaults() {
        let file = parse(
            r#"
keyspaces:
  - name: users
    maxBytes: 64Mi
    ttl: 5m
    negativeTtl: 30s
    fetchTimeout: 2s
    hook:
      module: { path: hooks/users.wasm }
      config: { baseUrl: "http://127.0.0.1:8080/users" }
      allowedHosts: ["127.0.0.1:8080"]
      limits: { fuel: 50000000, memory: 64Mi, timeout: 2s, poolSize: 8 }
  - name: sessions
    maxBytes: 1Mi
"#,
        );
        let valid = validate_keyspaces(&file.keyspaces).expect("valid");
        assert_eq!(valid[0].max_bytes, 64 << 20);
        assert_eq!(valid[0].ttl, Some(Duration::from_mins(5)));
        assert_eq!(valid[0].fetch_timeout, Duration::from_secs(2));
        assert_eq!(valid[1].max_value_bytes, 1 << 20, "default capped at maxBytes");
        assert_eq!(valid[1].fetch_timeout, DEFAULT_FETCH_TIMEOUT);
        assert_eq!(valid[0].allowed_hosts, vec!["127.0.0.1:8080".parse::<HostPort>().expect("parses")]);
        assert!(valid[1].allowed_hosts.is_empty());
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let file = parse(
            r#"
keyspaces:
  - { name: users, maxBytes: 1Ki, ttl: 1ms }
  - { name: users, maxBytes: 1Mi, maxValueBytes: 2Mi }
  - { name: "Bad Name", maxBytes: 1Mi, hook: { module: {}, allowedHosts: ["nohost"] } }
"#,
        );
        let errors = validate_keyspaces(&file.keyspaces).expect_err("invalid").to_string();
        for expected in [
            "keyspaces[0].maxBytes: 1Ki is out of range",
            "keyspaces[0].ttl: 1ms is out of range",
            "keyspaces[1].name: duplicate keyspace name \"users\"",
            "keyspaces[1].maxValueBytes",
            "keyspaces[2].name",
            "keyspaces[2].hook.module: exactly one of path, configMap or url",
            "keyspaces[2].hook.allowedHosts[0]: invalid host:port \"nohost\": missing :port",
        ] {
            assert!(errors.contains(expected), "missing {expected:?} in {errors}");
        }
    }

    #[test]
    fn unknown_fields_and_bad_sizes_fail_to_parse_with_the_field_path() {
        let err = serde_yaml::from_str::<KeyspacesFile>("keyspaces:\n  - { name: a, maxBytes: 12Qi }\n")
            .expect_err("bad size")
            .to_string();
        assert!(err.contains("keyspaces[0].maxBytes") && err.contains("12Qi"), "{err}");
        let err =
            serde_yaml::from_str::<KeyspacesFile>("keyspaces:\n  - { name: a, maxBytes: 1Mi, tll: 5m }\n")
                .expect_err("typo")
                .to_string();
        assert!(err.contains("tll"), "{err}");
    }

    #[test]
    fn url_module_needs_a_sha256() {
        let file = parse(
            "keyspaces:\n  - { name: a, maxBytes: 1Mi, hook: { module: { url: \"https://x/y.wasm\" } } }\n",
        );
        let errors = validate_keyspaces(&file.keyspaces).expect_err("invalid").to_string();
        assert!(errors.contains("keyspaces[0].hook.module.sha256: required"), "{errors}");
    }

    #[test]
    fn protections_validate_with_defaults_and_need_a_hook() {
        let file = parse(
            r"
keyspaces:
  - name: users
    maxBytes: 1Mi
    hook: { module: { path: users.wasm } }
    rateLimit: { fetchesPerSecond: 200, burst: 50 }
    circuitBreaker: {}
    staleWhileRevalidate: 30s
    staleIfError: 10m
    refreshAhead: 0.8
    warmUp: { keys: [a, b] }
  - { name: plain, maxBytes: 1Mi, rateLimit: { fetchesPerSecond: 10 }, staleIfError: 1m }
",
        );
        let errors = validate_keyspaces(&file.keyspaces).expect_err("plain has no hook").to_string();
        assert!(errors.contains("keyspaces[1].rateLimit: needs a hook"), "{errors}");
        assert!(errors.contains("keyspaces[1].staleIfError: needs a hook"), "{errors}");
        assert!(!errors.contains("keyspaces[0]"), "{errors}");
        let valid = validate_keyspaces(&file.keyspaces[..1]).expect("valid");
        let p = &valid[0].protection;
        assert_eq!(p.rate_limit, Some((200, 50)));
        let b = p.circuit_breaker.expect("breaker");
        assert_eq!((b.failure_ratio, b.minimum_requests), (DEFAULT_FAILURE_RATIO, DEFAULT_MINIMUM_REQUESTS));
        assert_eq!((b.window, b.open_for), (DEFAULT_BREAKER_WINDOW, DEFAULT_OPEN_FOR));
        assert_eq!(p.stale_keep(), Duration::from_mins(10));
        assert_eq!(p.warm_up, Some((vec!["a".to_owned(), "b".to_owned()], DEFAULT_WARM_UP_RATE)));
    }

    #[test]
    fn protections_out_of_range_are_reported_with_their_field() {
        let file = parse(
            r#"
keyspaces:
  - name: users
    maxBytes: 1Mi
    hook: { module: { path: users.wasm } }
    rateLimit: { fetchesPerSecond: 0 }
    circuitBreaker: { failureRatio: 1.5, minimumRequests: 0, window: 10ms, openFor: 2h }
    refreshAhead: 1.0
    warmUp: { keys: [a, a, ""], fetchesPerSecond: 0 }
"#,
        );
        let errors = validate_keyspaces(&file.keyspaces).expect_err("invalid").to_string();
        for expected in [
            "keyspaces[0].rateLimit.fetchesPerSecond",
            "keyspaces[0].circuitBreaker.failureRatio: 1.5 must be greater than 0",
            "keyspaces[0].circuitBreaker.minimumRequests",
            "keyspaces[0].circuitBreaker.window: 10ms is out of range",
            "keyspaces[0].circuitBreaker.openFor: 2h is out of range",
            "keyspaces[0].refreshAhead: 1 is out of range",
            "keyspaces[0].warmUp.keys[1]: duplicate key \"a\"",
            "keyspaces[0].warmUp.keys[2]",
            "keyspaces[0].warmUp.fetchesPerSecond",
        ] {
            assert!(errors.contains(expected), "missing {expected:?} in {errors}");
        }
    }
}
