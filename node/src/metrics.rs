//! Prometheus metrics of a node. The names and labels are part of the product's contract (docs/design.md).
//!
//! Counters used on every request are resolved once per keyspace into [`KeyspaceMetrics`] (an `Arc`'d atomic
//! each), so the hot path increments an atomic instead of looking up a label set.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::error::Code;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    op: &'static str,
    keyspace: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyspaceLabel {
    keyspace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    keyspace: String,
    tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    keyspace: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    keyspace: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhyLabels {
    keyspace: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExportLabels {
    keyspace: String,
    export: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    result: &'static str,
}

fn fetch_histogram() -> Histogram {
    // 100 µs .. ~26 s, doubling.
    Histogram::new((0..19).map(|i| 0.0001 * f64::from(1u32 << i)))
}

/// All metric families of a node, registered in one registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    hits: Family<TierLabels, Counter>,
    misses: Family<KeyspaceLabel, Counter>,
    fetches: Family<ResultLabels, Counter>,
    fetch_seconds: Family<KeyspaceLabel, Histogram, fn() -> Histogram>,
    entries: Family<KeyspaceLabel, Gauge>,
    bytes: Family<KeyspaceLabel, Gauge>,
    evictions: Family<KeyspaceLabel, Counter>,
    forwarded: Family<KeyspaceLabel, Counter>,
    fallbacks: Family<KeyspaceLabel, Counter>,
    hook_traps: Family<ReasonLabels, Counter>,
    hook_calls: Family<ExportLabels, Counter>,
    reloads: Family<OutcomeLabel, Counter>,
    /// Not exported: all fetches per keyspace, summed for `Stats`; kept here so it survives keyspace rebuilds.
    fetch_totals: Family<KeyspaceLabel, Counter>,
    /// Current ring size, this node included.
    pub members: Gauge,
    /// Peer calls that failed at the transport level (unreachable, timeout).
    pub peer_errors: Counter,
    /// Failures of the discovery backend to reach its source (API server, NATS, DNS).
    pub discovery_errors: Counter,
    /// TLS material reloads by result (registered only when TLS is configured).
    tls_reloads: Family<OutcomeLabel, Counter>,
    /// Seconds until the served certificate expires (registered only when TLS is configured).
    pub tls_cert_expiry_seconds: Gauge,
    /// Entries moved between owners, by direction (`sent`, `received`, `ignored`: older than what was held).
    handoff_entries: Family<DirectionLabel, Counter>,
    /// Misses of a new owner answered by the key's previous owner instead of the data source.
    pub previous_owner_hits: Counter,
    circuit_state: Family<KeyspaceLabel, Gauge>,
    stale_served: Family<WhyLabels, Counter>,
    background_fetches: Family<WhyLabels, Counter>,
    rate_limited: Family<KeyspaceLabel, Counter>,
    circuit_rejected: Family<KeyspaceLabel, Counter>,
    /// Open RESP client connections.
    pub resp_connections: Gauge,
    /// RESP commands executed.
    pub resp_commands: Counter,
    resp_disconnects: Family<CauseLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family (without the TLS ones).
    pub fn new() -> Self {
        Self::with_tls(false)
    }

    /// Creates and registers every family; the TLS ones when `tls`.
    #[allow(clippy::too_many_lines, reason = "one line per metric family; splitting the list would hide it")]
    pub fn with_tls(tls: bool) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let hits = Family::<TierLabels, Counter>::default();
        let misses = Family::<KeyspaceLabel, Counter>::default();
        let fetches = Family::<ResultLabels, Counter>::default();
        let fetch_seconds = Family::<KeyspaceLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            fetch_histogram as fn() -> Histogram,
        );
        let entries = Family::<KeyspaceLabel, Gauge>::default();
        let bytes = Family::<KeyspaceLabel, Gauge>::default();
        let evictions = Family::<KeyspaceLabel, Counter>::default();
        let forwarded = Family::<KeyspaceLabel, Counter>::default();
        let fallbacks = Family::<KeyspaceLabel, Counter>::default();
        let hook_traps = Family::<ReasonLabels, Counter>::default();
        let hook_calls = Family::<ExportLabels, Counter>::default();
        let reloads = Family::<OutcomeLabel, Counter>::default();
        let members = Gauge::default();
        let peer_errors = Counter::default();
        let discovery_errors = Counter::default();
        let tls_reloads = Family::<OutcomeLabel, Counter>::default();
        let tls_cert_expiry_seconds = Gauge::default();
        let handoff_entries = Family::<DirectionLabel, Counter>::default();
        let previous_owner_hits = Counter::default();
        let circuit_state = Family::<KeyspaceLabel, Gauge>::default();
        let stale_served = Family::<WhyLabels, Counter>::default();
        let background_fetches = Family::<WhyLabels, Counter>::default();
        let rate_limited = Family::<KeyspaceLabel, Counter>::default();
        let circuit_rejected = Family::<KeyspaceLabel, Counter>::default();
        let resp_connections = Gauge::default();
        let resp_commands = Counter::default();
        let resp_disconnects = Family::<CauseLabel, Counter>::default();
        let r = &mut registry;
        r.register(
            "distcache_resp_connections",
            "Open RESP (Redis protocol) client connections",
            resp_connections.clone(),
        );
        r.register(
            "distcache_resp_commands",
            "RESP (Redis protocol) commands executed",
            resp_commands.clone(),
        );
        r.register(
            "distcache_resp_disconnects",
            "RESP connections the node closed, by reason (output_limit, idle, max_connections, protocol_error)",
            resp_disconnects.clone(),
        );
        r.register(
            "distcache_circuit_state",
            "State of the data source's circuit breaker on this node: 0 closed, 1 open, 2 half-open",
            circuit_state.clone(),
        );
        r.register(
            "distcache_stale_served",
            "Expired values answered stale, by reason (revalidate, source_error, circuit_open, rate_limited)",
            stale_served.clone(),
        );
        r.register(
            "distcache_background_fetches",
            "Data-source fetches no reader waited for, by reason (revalidate, refresh_ahead, warm_up)",
            background_fetches.clone(),
        );
        r.register(
            "distcache_rate_limited",
            "Data-source fetches refused by the keyspace's rate limit",
            rate_limited.clone(),
        );
        r.register(
            "distcache_circuit_rejected",
            "Data-source fetches refused because the circuit was open",
            circuit_rejected.clone(),
        );
        r.register(
            "distcache_handoff_entries",
            "Entries moved to their new owner on membership changes, by direction (sent, received, ignored as older)",
            handoff_entries.clone(),
        );
        r.register(
            "distcache_previous_owner_hits",
            "Misses of a new owner answered by the key's previous owner instead of the data source",
            previous_owner_hits.clone(),
        );
        if tls {
            r.register(
                "distcache_tls_reloads",
                "Reloads of the TLS certificate, key and CA files by result (applied, refused)",
                tls_reloads.clone(),
            );
            r.register(
                "distcache_tls_cert_expiry_seconds",
                "Seconds until the certificate the node serves expires (negative once it has)",
                tls_cert_expiry_seconds.clone(),
            );
        }
        r.register(
            "distcache_requests",
            "Cache API requests by operation, keyspace and status code",
            requests.clone(),
        );
        r.register(
            "distcache_cache_hits",
            "Cache hits by tier (main = owner, hot = copy of a remote key)",
            hits.clone(),
        );
        r.register("distcache_cache_misses", "Cache misses", misses.clone());
        r.register("distcache_source_fetches", "Data-source fetches by result", fetches.clone());
        r.register(
            "distcache_source_fetch_seconds",
            "Duration of data-source fetches",
            fetch_seconds.clone(),
        );
        r.register("distcache_entries", "Entries held by this node (main + hot)", entries.clone());
        r.register("distcache_bytes", "Bytes held by this node (main + hot), as weighed", bytes.clone());
        r.register("distcache_evictions", "Entries evicted to stay within maxBytes", evictions.clone());
        r.register("distcache_members", "Members of the ring as seen by this node", members.clone());
        r.register(
            "distcache_discovery_errors",
            "Failures of discovery to reach its source (API server, NATS, DNS)",
            discovery_errors.clone(),
        );
        r.register("distcache_hook_traps", "Hook calls that trapped, by reason", hook_traps.clone());
        r.register(
            "distcache_hook_calls",
            "Calls into hooks by export (fetch, fetch-many, init)",
            hook_calls.clone(),
        );
        r.register("distcache_forwarded", "Requests forwarded to the owner of the key", forwarded.clone());
        r.register(
            "distcache_owner_fallbacks",
            "Loads done by a non-owner because the owner could not be reached",
            fallbacks.clone(),
        );
        r.register("distcache_keyspace_reloads", "Keyspaces file reloads by result", reloads.clone());
        r.register(
            "distcache_peer_errors",
            "Peer calls that failed at the transport level",
            peer_errors.clone(),
        );
        Self {
            registry,
            requests,
            hits,
            misses,
            fetches,
            fetch_seconds,
            entries,
            bytes,
            evictions,
            forwarded,
            fallbacks,
            hook_traps,
            hook_calls,
            reloads,
            fetch_totals: Family::default(),
            handoff_entries,
            previous_owner_hits,
            circuit_state,
            stale_served,
            background_fetches,
            rate_limited,
            circuit_rejected,
            resp_connections,
            resp_commands,
            resp_disconnects,
            members,
            peer_errors,
            discovery_errors,
            tls_reloads,
            tls_cert_expiry_seconds,
        }
    }

    /// Counts a RESP connection the node closed, by reason.
    pub fn resp_disconnect(&self, reason: &'static str) {
        self.resp_disconnects.get_or_create(&CauseLabel { reason }).inc();
    }

    /// Resolves the per-keyspace handles used on the request path.
    ///
    /// Each handle is cloned out in its own statement: `get_or_create` returns a read guard, and a second
    /// `get_or_create` on the same family while the first guard lives (one struct-literal statement) would
    /// wait for the write lock forever.
    pub fn keyspace(&self, name: &str) -> KeyspaceMetrics {
        let ks = KeyspaceLabel { keyspace: name.to_owned() };
        let tier = |tier| TierLabels { keyspace: name.to_owned(), tier };
        let req = |code: Code| RequestLabels { op: "get", keyspace: name.to_owned(), code: code.label() };
        let hits_main = self.hits.get_or_create(&tier("main")).clone();
        let hits_hot = self.hits.get_or_create(&tier("hot")).clone();
        let get_ok = self.requests.get_or_create(&req(Code::Ok)).clone();
        let ok = |op| RequestLabels { op, keyspace: name.to_owned(), code: Code::Ok.label() };
        let put_ok = self.requests.get_or_create(&ok("put")).clone();
        let delete_ok = self.requests.get_or_create(&ok("delete")).clone();
        let get_not_found = self.requests.get_or_create(&req(Code::NotFound)).clone();
        let misses = self.misses.get_or_create(&ks).clone();
        let evictions = self.evictions.get_or_create(&ks).clone();
        let forwarded = self.forwarded.get_or_create(&ks).clone();
        let fallbacks = self.fallbacks.get_or_create(&ks).clone();
        let fetch_seconds = self.fetch_seconds.get_or_create(&ks).clone();
        let entries = self.entries.get_or_create(&ks).clone();
        let bytes = self.bytes.get_or_create(&ks).clone();
        let fetches_total = self.fetch_totals.get_or_create(&ks).clone();
        let why = |reason| WhyLabels { keyspace: name.to_owned(), reason };
        let circuit_state = self.circuit_state.get_or_create(&ks).clone();
        let stale_revalidate = self.stale_served.get_or_create(&why("revalidate")).clone();
        let stale_source_error = self.stale_served.get_or_create(&why("source_error")).clone();
        let stale_circuit_open = self.stale_served.get_or_create(&why("circuit_open")).clone();
        let stale_rate_limited = self.stale_served.get_or_create(&why("rate_limited")).clone();
        let background_revalidate = self.background_fetches.get_or_create(&why("revalidate")).clone();
        let background_refresh_ahead = self.background_fetches.get_or_create(&why("refresh_ahead")).clone();
        let background_warm_up = self.background_fetches.get_or_create(&why("warm_up")).clone();
        let rate_limited = self.rate_limited.get_or_create(&ks).clone();
        let circuit_rejected = self.circuit_rejected.get_or_create(&ks).clone();
        KeyspaceMetrics {
            put_ok,
            delete_ok,
            hits_main,
            hits_hot,
            misses,
            evictions,
            forwarded,
            fallbacks,
            fetch_seconds,
            entries,
            bytes,
            get_ok,
            get_not_found,
            fetches_total,
            circuit_state,
            stale_revalidate,
            stale_source_error,
            stale_circuit_open,
            stale_rate_limited,
            background_revalidate,
            background_refresh_ahead,
            background_warm_up,
            rate_limited,
            circuit_rejected,
        }
    }

    /// Counts one API request (operations other than the pre-resolved Get outcomes).
    pub fn request(&self, op: &'static str, keyspace: &str, code: Code) {
        self.requests
            .get_or_create(&RequestLabels { op, keyspace: keyspace.to_owned(), code: code.label() })
            .inc();
    }

    /// Counts one data-source fetch by result.
    pub fn fetch(&self, keyspace: &str, result: &'static str) {
        self.fetches.get_or_create(&ResultLabels { keyspace: keyspace.to_owned(), result }).inc();
    }

    /// Counts a hook trap.
    pub fn hook_trap(&self, keyspace: &str, reason: &str) {
        self.hook_traps
            .get_or_create(&ReasonLabels { keyspace: keyspace.to_owned(), reason: reason.to_owned() })
            .inc();
    }

    /// The counter of calls into one export of a keyspace's hook (resolved once per hook, not per call).
    pub fn hook_calls(&self, keyspace: &str, export: &'static str) -> Counter {
        self.hook_calls.get_or_create(&ExportLabels { keyspace: keyspace.to_owned(), export }).clone()
    }

    /// Counts entries moved between owners in one direction (`sent`, `received`, `ignored`).
    pub fn handoff(&self, direction: &'static str, entries: u64) {
        self.handoff_entries.get_or_create(&DirectionLabel { direction }).inc_by(entries);
    }

    /// Entries moved so far in one direction (`sent`, `received`, `ignored`).
    pub fn handoff_total(&self, direction: &'static str) -> u64 {
        self.handoff_entries.get_or_create(&DirectionLabel { direction }).get()
    }

    /// Counts a keyspaces reload (`applied`, `refused`, `unchanged` is not counted).
    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&OutcomeLabel { result }).inc();
    }

    /// Counts a TLS material reload by result.
    pub fn tls_reload(&self, result: &'static str) {
        self.tls_reloads.get_or_create(&OutcomeLabel { result }).inc();
    }

    /// Number of reloads with this result so far.
    pub fn reloads(&self, result: &'static str) -> u64 {
        self.reloads.get_or_create(&OutcomeLabel { result }).get()
    }

    /// Drops the per-keyspace gauges of a removed keyspace (counters stay: they are monotonic history).
    pub fn forget_keyspace(&self, name: &str) {
        let ks = KeyspaceLabel { keyspace: name.to_owned() };
        self.entries.remove(&ks);
        self.bytes.remove(&ks);
        self.circuit_state.remove(&ks);
    }

    /// Prometheus text exposition of every family.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Pre-resolved metric handles of one keyspace (cheap atomic increments on the request path).
#[derive(Clone, Debug)]
pub struct KeyspaceMetrics {
    /// Successful Puts of one key (`distcache_requests_total{op="put",code="ok"}`), resolved once.
    pub put_ok: Counter,
    /// Successful Deletes of one key (`{op="delete",code="ok"}`).
    pub delete_ok: Counter,
    /// Hits in the main tier.
    pub hits_main: Counter,
    /// Hits in the hot tier.
    pub hits_hot: Counter,
    /// Misses.
    pub misses: Counter,
    /// Size evictions.
    pub evictions: Counter,
    /// Requests forwarded to the owner.
    pub forwarded: Counter,
    /// Loads done because the owner could not be reached.
    pub fallbacks: Counter,
    /// Fetch durations.
    pub fetch_seconds: Histogram,
    /// Entries gauge (refreshed on scrape).
    pub entries: Gauge,
    /// Bytes gauge (refreshed on scrape).
    pub bytes: Gauge,
    /// Get requests answered OK.
    pub get_ok: Counter,
    /// Get requests answered NOT_FOUND.
    pub get_not_found: Counter,
    /// All fetches of this keyspace (any result), for `Stats`.
    pub fetches_total: Counter,
    /// `distcache_circuit_state`.
    pub circuit_state: Gauge,
    /// Stale answers while revalidating.
    pub stale_revalidate: Counter,
    /// Stale answers because the source failed.
    pub stale_source_error: Counter,
    /// Stale answers because the circuit was open.
    pub stale_circuit_open: Counter,
    /// Stale answers because the rate limit was reached.
    pub stale_rate_limited: Counter,
    /// Background fetches of stale-while-revalidate.
    pub background_revalidate: Counter,
    /// Background fetches of refresh-ahead.
    pub background_refresh_ahead: Counter,
    /// Warm-up fetches.
    pub background_warm_up: Counter,
    /// Fetches refused by the rate limit.
    pub rate_limited: Counter,
    /// Fetches refused by the open circuit.
    pub circuit_rejected: Counter,
}

impl KeyspaceMetrics {
    /// Stale answers of every reason.
    pub fn stale_served(&self) -> u64 {
        self.stale_revalidate.get()
            + self.stale_source_error.get()
            + self.stale_circuit_open.get()
            + self.stale_rate_limited.get()
    }
}
