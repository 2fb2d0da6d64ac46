//! The JSON reports of a node's admin endpoints, `/admin/keyspaces` ([`KeyspacesReport`]) and `/admin/peers`
//! ([`PeersReport`]). The node serializes them and the operator (and anyone else who asks a node) deserializes
//! them, so both sides agree on the field names by construction instead of by two hand-written copies.
//!
//! The field names are the wire format: camelCase, except the counters of [`KeyspaceCounters`], which have
//! always been snake_case. Fields a newer or older node may not send are `#[serde(default)]`, so that a report
//! still reads across versions during a roll.

use serde::{Deserialize, Serialize};

use crate::KeyspaceSpec;

/// `/admin/keyspaces`: the keyspaces a node serves and the state of its keyspaces file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyspacesReport {
    /// The keyspaces file the node watches, if any.
    #[serde(default)]
    pub file: Option<String>,
    /// When the current keyspaces were applied (seconds since the Unix epoch).
    #[serde(default)]
    pub applied_at: Option<u64>,
    /// Why the last reload was refused, while the file has not been fixed (the previous keyspaces keep serving).
    #[serde(default)]
    pub last_error: Option<String>,
    /// Reloads applied since the node started.
    #[serde(default)]
    pub reloads_applied: u64,
    /// Reloads refused since the node started.
    #[serde(default)]
    pub reloads_refused: u64,
    /// The keyspaces served.
    #[serde(default)]
    pub keyspaces: Vec<KeyspaceReport>,
}

/// One keyspace a node serves: its effective settings, the spec they came from, its hook and its counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyspaceReport {
    /// Keyspace name.
    pub name: String,
    /// Byte budget of the main tier on this node.
    #[serde(default)]
    pub max_bytes: u64,
    /// Default entry TTL in milliseconds (`None`: entries do not expire).
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// TTL of cached NOT_FOUND answers in milliseconds (`None`: not cached).
    #[serde(default)]
    pub negative_ttl_ms: Option<u64>,
    /// Deadline of one fetch in milliseconds.
    #[serde(default)]
    pub fetch_timeout_ms: u64,
    /// Largest value accepted, in bytes.
    #[serde(default)]
    pub max_value_bytes: u64,
    /// Whether a data source (hook) loads misses.
    #[serde(default)]
    pub read_through: bool,
    /// What the data source says about itself (a hook: `moduleSha256`, its pool and limits). Free-form: each
    /// kind of source describes itself; [`KeyspaceReport::module_sha256`] reads the one field others rely on.
    #[serde(default)]
    pub hook: Option<serde_json::Value>,
    /// The spec the node serves, as it read it from its keyspaces file: equal to the DistCache's keyspace once
    /// the node has applied it.
    pub spec: KeyspaceSpec,
    /// This node's counters of the keyspace.
    #[serde(default)]
    pub stats: Option<KeyspaceCounters>,
}

impl KeyspaceReport {
    /// The SHA-256 of the hook module the node runs, when the keyspace has a hook.
    pub fn module_sha256(&self) -> Option<&str> {
        self.hook.as_ref()?.get("moduleSha256")?.as_str()
    }
}

/// Counters of one keyspace on one node. Snake_case on the wire, unlike the rest of the reports: the names
/// the node has always sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KeyspaceCounters {
    /// Keyspace name.
    pub name: String,
    /// Main-tier hits.
    pub hits: u64,
    /// Hot-tier hits.
    pub hot_hits: u64,
    /// Misses.
    pub misses: u64,
    /// Data-source fetches by this node.
    pub source_fetches: u64,
    /// Entries held.
    pub entries: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Size evictions.
    pub evictions: u64,
    /// Requests forwarded to owners.
    pub forwarded: u64,
    /// Loads done because the owner was unreachable.
    pub owner_fallbacks: u64,
    /// The data source's circuit: `closed`, `open` or `half_open`; empty without a breaker.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub circuit_state: String,
    /// Expired values answered stale.
    pub stale_served: u64,
    /// Fetches refused by the rate limit.
    pub rate_limited: u64,
    /// The keys read most often recently on this node, hottest first (estimated).
    pub hot_keys: Vec<HotKey>,
    /// Warm-up progress; absent without `warmUp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_up: Option<WarmUpProgress>,
}

/// A frequently read key and its estimated recent reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HotKey {
    /// The key.
    pub key: String,
    /// Estimated reads (halved as time passes).
    pub hits: u64,
}

/// Warm-up progress of a keyspace on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WarmUpProgress {
    /// Keys listed.
    pub listed: u32,
    /// Listed keys this node owns.
    pub owned: u32,
    /// Loaded by the warm-up.
    pub loaded: u32,
    /// Already held when the warm-up reached them.
    pub present: u32,
    /// Loads that failed (loaded on first read instead).
    pub failed: u32,
    /// Whether the last pass finished.
    pub done: bool,
}

/// `/admin/peers`: the members a node sees.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeersReport {
    /// The node that answered.
    #[serde(default)]
    pub local: LocalNode,
    /// Its discovery backend (`kubernetes`, `dns`, `nats`, `static`, `standalone`).
    #[serde(default)]
    pub discovery: String,
    /// What keeps the backend from its source, if anything (the node then serves the last known members).
    #[serde(default)]
    pub discovery_problem: Option<String>,
    /// Whether the node has heard from discovery at least once.
    #[serde(default)]
    pub known: bool,
    /// The members of the ring, the local node included.
    #[serde(default)]
    pub members: Vec<PeerReport>,
}

/// The node that answered `/admin/peers`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LocalNode {
    /// Member name.
    pub name: String,
    /// gRPC address other nodes dial.
    pub address: String,
}

/// One member of the ring.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerReport {
    /// Member name.
    pub name: String,
    /// gRPC address other nodes dial.
    pub address: String,
    /// Whether it is the node that answered.
    pub local: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/admin/keyspaces` as the node has always answered (keys sorted, `null` for what is not set).
    const KEYSPACES: &str = r#"{"appliedAt":1764770000,"file":"/etc/distcache/keyspaces/keyspaces.yaml","keyspaces":[{"fetchTimeoutMs":2000,"hook":{"fuel":100000000,"idleInstances":2,"moduleSha256":"ab12","poolSize":4},"maxBytes":67108864,"maxValueBytes":1048576,"name":"users","negativeTtlMs":null,"readThrough":true,"spec":{"hook":{"module":{"configMap":{"key":"k.wasm","name":"users-hook"}}},"maxBytes":"64Mi","name":"users","ttl":"5m"},"stats":{"bytes":10,"entries":1,"evictions":0,"forwarded":3,"hits":4,"hot_hits":5,"hot_keys":[],"misses":6,"name":"users","owner_fallbacks":7,"rate_limited":0,"source_fetches":8,"stale_served":0},"ttlMs":300000},{"fetchTimeoutMs":2000,"hook":null,"maxBytes":1048576,"maxValueBytes":1048576,"name":"sessions","negativeTtlMs":null,"readThrough":false,"spec":{"maxBytes":"1Mi","name":"sessions"},"stats":null,"ttlMs":null}],"lastError":null,"reloadsApplied":2,"reloadsRefused":1}"#;

    /// `/admin/peers` as the node has always answered.
    const PEERS: &str = r#"{"discovery":"kubernetes","discoveryProblem":"watch failed","known":true,"local":{"address":"10.0.0.1:7420","name":"demo-0"},"members":[{"address":"10.0.0.1:7420","local":true,"name":"demo-0"},{"address":"10.0.0.2:7420","local":false,"name":"demo-1"}]}"#;

    #[test]
    fn keyspaces_report_reads_and_writes_the_nodes_json() {
        let report: KeyspacesReport = serde_json::from_str(KEYSPACES).expect("the node's answer reads");
        let users = &report.keyspaces[0];
        assert_eq!(
            (users.name.as_str(), users.ttl_ms, users.module_sha256(), users.read_through),
            ("users", Some(300_000), Some("ab12"), true)
        );
        assert_eq!(users.spec.max_bytes.0, 64 << 20);
        let stats = users.stats.as_ref().expect("stats");
        assert_eq!((stats.hot_hits, stats.owner_fallbacks, stats.source_fetches), (5, 7, 8));
        assert_eq!((report.keyspaces[1].module_sha256(), report.keyspaces[1].stats.as_ref()), (None, None));
        assert_eq!(
            (report.reloads_applied, report.reloads_refused, report.applied_at),
            (2, 1, Some(1_764_770_000))
        );
        // The same bytes back: every field name and null as the node writes them.
        let value = serde_json::to_value(&report).expect("serializes");
        assert_eq!(value.to_string(), KEYSPACES);
        assert_eq!(serde_json::from_value::<KeyspacesReport>(value).expect("round trip"), report);
    }

    #[test]
    fn peers_report_reads_and_writes_the_nodes_json() {
        let report: PeersReport = serde_json::from_str(PEERS).expect("the node's answer reads");
        assert_eq!(
            report.local,
            LocalNode { name: "demo-0".to_owned(), address: "10.0.0.1:7420".to_owned() }
        );
        assert_eq!(report.members.iter().filter(|m| m.local).count(), 1);
        assert_eq!(report.discovery_problem.as_deref(), Some("watch failed"));
        let value = serde_json::to_value(&report).expect("serializes");
        assert_eq!(value.to_string(), PEERS);
        assert_eq!(serde_json::from_value::<PeersReport>(value).expect("round trip"), report);
    }

    #[test]
    fn a_report_missing_optional_fields_still_reads() {
        let report: KeyspacesReport =
            serde_json::from_str(r#"{"keyspaces":[{"name":"a","spec":{"name":"a","maxBytes":"1Mi"}}]}"#)
                .expect("an older or newer node's answer reads");
        assert_eq!((report.keyspaces[0].name.as_str(), report.last_error.as_deref()), ("a", None));
        let peers: PeersReport =
            serde_json::from_str(r#"{"members":[{"name":"x"}],"extra":1}"#).expect("reads");
        assert_eq!(peers.members[0].name, "x");
    }
}
