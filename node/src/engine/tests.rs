//! The engine's guarantees, tested without IO: engines of one in-process cluster call each other through the
//! [`LocalNetwork`], which counts every Peer call and injects faults per member. Data sources are counting
//! in-memory sources that can be held back with a gate. (`tests/tests/cluster.rs` checks the same paths over
//! gRPC on loopback.)

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use distcache_api::ValidKeyspace;

use super::*;
use crate::{
    error::Code,
    keyspace::parse_keyspaces,
    membership::Membership,
    metrics::Metrics,
    peer::local::{Fault, LocalNetwork, Op},
    ring::{Member, Ring, key_hash},
    source::{BuildSourceError, DataSource, FetchError, Fetched, SourceFactory},
    store::Tier,
};

/// Read-through keyspace (every key exists, except those starting with "missing").
const RT: &str = "rt";
/// Cache-aside keyspace (no source).
const ASIDE: &str = "aside";
const PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// A data source that counts fetches per key and can hold them until released.
#[derive(Default)]
struct CountingSource {
    fetches: parking_lot::Mutex<HashMap<String, usize>>,
    started: AtomicUsize,
    held: tokio::sync::watch::Sender<bool>,
}

impl CountingSource {
    fn hold(&self) {
        self.held.send_replace(true);
    }

    fn release(&self) {
        self.held.send_replace(false);
    }

    fn total(&self) -> usize {
        self.fetches.lock().values().sum()
    }

    fn of(&self, key: &str) -> usize {
        self.fetches.lock().get(key).copied().unwrap_or(0)
    }
}

#[async_trait]
impl DataSource for CountingSource {
    async fn fetch(&self, key: &str) -> Result<Fetched, FetchError> {
        *self.fetches.lock().entry(key.to_owned()).or_default() += 1;
        self.started.fetch_add(1, Ordering::SeqCst);
        let mut held = self.held.subscribe();
        let _ = held.wait_for(|h| !*h).await;
        if key.starts_with("missing") {
            return Err(FetchError::NotFound { negative_ttl: None });
        }
        Ok(Fetched { value: Bytes::from(format!("source:{key}")), ttl: None })
    }
}

/// Gives keyspace `rt` the node's counting source; `aside` has none.
struct Sources(Arc<CountingSource>);

#[async_trait]
impl SourceFactory for Sources {
    async fn build(
        &self,
        keyspace: &ValidKeyspace,
        _base_dir: &Path,
    ) -> Result<Option<Arc<dyn DataSource>>, BuildSourceError> {
        Ok((keyspace.name == RT).then(|| Arc::clone(&self.0) as Arc<dyn DataSource>))
    }
}

struct Node {
    member: Member,
    engine: Arc<Engine>,
    source: Arc<CountingSource>,
}

impl Node {
    fn ks(&self, name: &str) -> Arc<KeyspaceRuntime> {
        self.engine.keyspaces().get(name).expect("keyspace")
    }
}

struct Cluster {
    net: Arc<LocalNetwork>,
    nodes: Vec<Node>,
}

const KEYSPACES: &str = "
keyspaces:
  - name: rt
    maxBytes: 256Ki
    fetchTimeout: 5s
    hook: { module: { path: unused.wasm } }
  - name: aside
    maxBytes: 256Ki
";

impl Cluster {
    /// Nodes with these names, each with every other as a member.
    async fn new(names: &[&str]) -> Self {
        let net = LocalNetwork::new();
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            nodes.push(Self::node_at(&net, name, i).await);
        }
        let cluster = Self { net, nodes };
        cluster.view(names, names).await;
        cluster
    }

    /// Nodes with these names; only those in `started` know each other (the rest have no member set yet).
    async fn started(names: &[&str], started: &[&str]) -> Self {
        let net = LocalNetwork::new();
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            nodes.push(Self::node_at(&net, name, i).await);
        }
        let cluster = Self { net, nodes };
        cluster.view(started, started).await;
        cluster
    }

    /// Gives each node of `of` the members `members` (itself excluded) as discovery would.
    async fn view(&self, of: &[&str], members: &[&str]) {
        let all: Vec<Member> = members.iter().map(|n| self.node(n).member.clone()).collect();
        for name in of {
            self.node(name).engine.set_members(&all).await;
        }
    }

    async fn node_at(net: &Arc<LocalNetwork>, name: &str, i: usize) -> Node {
        let member = Member::new(name, format!("10.0.0.{}:7422", i + 1));
        let metrics = Arc::new(Metrics::new());
        let source = Arc::new(CountingSource::default());
        let keyspaces =
            Arc::new(Keyspaces::new(Arc::new(Sources(Arc::clone(&source))), Arc::clone(&metrics)));
        let specs = parse_keyspaces(Path::new("keyspaces.yaml"), KEYSPACES).expect("valid keyspaces");
        keyspaces.apply(specs, Path::new("."), None, false).await.expect("keyspaces apply");
        let membership = Arc::new(Membership::new(member.clone()));
        let transport = net.transport(&member, PEER_TIMEOUT);
        let engine = Engine::new(keyspaces, membership, transport, metrics);
        net.attach(&member.address, &engine);
        Node { member, engine, source }
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.member.name == name).expect("node")
    }

    fn fetches(&self) -> usize {
        self.nodes.iter().map(|n| n.source.total()).sum()
    }

    fn ring(&self, names: &[&str]) -> Ring {
        Ring::new(names.iter().map(|n| self.node(n).member.clone()).collect())
    }

    /// A key (with `prefix`) that `before`'s ring gives to `from` and `after`'s ring to `to`.
    fn key_moving(
        &self,
        prefix: &str,
        (from, before): (&str, &[&str]),
        (to, after): (&str, &[&str]),
    ) -> String {
        let (before, after) = (self.ring(before), self.ring(after));
        (0..10_000)
            .map(|i| format!("{prefix}{i}"))
            .find(|k| {
                before.owner(key_hash(k)).is_some_and(|m| m.name == from)
                    && after.owner(key_hash(k)).is_some_and(|m| m.name == to)
            })
            .expect("some key of 10000 moves between any two owners")
    }

    /// A key that `names`' ring gives to `owner`.
    fn key_owned_by(&self, owner: &str, names: &[&str], prefix: &str) -> String {
        let ring = self.ring(names);
        (0..10_000)
            .map(|i| format!("{prefix}{i}"))
            .find(|k| ring.owner(key_hash(k)).is_some_and(|m| m.name == owner))
            .expect("some key of 10000 maps to every owner")
    }
}

fn value(key: &str) -> Bytes {
    Bytes::from(format!("source:{key}"))
}

/// Lets every spawned task run until it waits on something.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_cold_key_is_fetched_once_across_the_cluster() {
    let c = Cluster::new(&["node-a", "node-b", "node-c"]).await;
    let keys: Vec<String> = (0..30).map(|i| format!("cold-{i}")).collect();
    for n in &c.nodes {
        n.source.hold();
    }
    let mut readers = Vec::new();
    for n in &c.nodes {
        for key in &keys {
            for _ in 0..3 {
                let (engine, key) = (Arc::clone(&n.engine), key.clone());
                readers.push(tokio::spawn(async move { (engine.get(RT, &key).await, key) }));
            }
        }
    }
    // Every key's owner is fetching it (once), and every other reader waits on that fetch.
    let started = || c.nodes.iter().map(|n| n.source.started.load(Ordering::SeqCst)).sum::<usize>();
    while started() < keys.len() {
        settle().await;
    }
    settle().await;
    for n in &c.nodes {
        n.source.release();
    }
    for r in readers {
        let (got, key) = r.await.expect("reader");
        assert_eq!(got.map(|v| v.bytes), Ok(value(&key)));
    }
    assert_eq!(c.fetches(), keys.len(), "one fetch per key for 9 readers of it on 3 nodes");
    for key in &keys {
        let fetched_by: Vec<_> =
            c.nodes.iter().filter(|n| n.source.of(key) > 0).map(|n| &n.member.name).collect();
        let owner = c.ring(&["node-a", "node-b", "node-c"]).owner(key_hash(key)).map(|m| m.name.clone());
        assert_eq!(fetched_by.len(), 1);
        assert_eq!(Some(fetched_by[0].clone()), owner, "the owner fetches");
    }
}

/// Before: a leader filled the store and then left the flight; a reader whose store lookup missed before the
/// fill but whose flight lookup came after it led a second fetch.
#[tokio::test]
async fn a_reader_that_missed_before_a_fill_does_not_fetch_again() {
    let c = Cluster::new(&["node-a"]).await;
    let a = c.node("node-a");
    let ks = a.ks(RT);
    let hash = key_hash("k");
    // The second reader's lookup: recorded epoch and miss, before the first reader's load fills the store.
    let epoch = ks.store.epoch(hash);
    assert!(ks.store.get(Tier::Main, "k").is_none());
    assert_eq!(a.engine.get(RT, "k").await.map(|v| v.bytes), Ok(value("k")));
    assert!(ks.source_flight.is_empty(), "the first load has left the flight");
    // Now the second reader reaches the flight: it leads, and must find the value instead of fetching.
    let again = a.engine.load_owned(&ks, (Arc::from("k"), hash, epoch)).await;
    assert_eq!(again.map(|v| v.bytes), Ok(value("k")));
    assert_eq!(a.source.of("k"), 1, "one fetch");
}

/// Before: Y answered a peer's request for a key it no longer owned by fetching it itself (a second fetch
/// cluster-wide, and a value that ignored a write at the real owner). Now a peer request goes on once, to the
/// owner in Y's view, and stops there.
#[tokio::test]
async fn while_rings_disagree_a_peer_request_goes_on_once_to_the_owner_and_stops_there() {
    let c = Cluster::new(&["node-x", "node-y", "node-z"]).await;
    // Rings disagree: X still thinks the cluster is {X, Y}; Y and Z already see Z.
    let (x, y, z) = (c.node("node-x"), c.node("node-y"), c.node("node-z"));
    x.engine.set_members(std::slice::from_ref(&y.member)).await;
    let key = c.key_moving(
        "moving-",
        ("node-y", &["node-x", "node-y"]),
        ("node-z", &["node-x", "node-y", "node-z"]),
    );
    // A write through Z (the owner) is what X reads, through Y.
    z.engine.put(RT, &key, Bytes::from_static(b"written"), None).await.expect("put");
    assert_eq!(x.engine.get(RT, &key).await.map(|v| v.bytes), Ok(Bytes::from_static(b"written")));
    assert_eq!(c.net.calls("node-y", Op::Load), 1, "X forwards to the owner on its ring");
    assert_eq!(c.net.calls("node-z", Op::Load), 1, "Y goes on to the owner on its ring, once");
    assert_eq!(c.net.calls("node-x", Op::Load), 0, "Z serves a forwarded request itself");
    assert_eq!(c.fetches(), 0, "nobody fetched a key that was written");
    // The same for a batch, with a key nobody wrote: one fetch, by its owner in the newest view.
    let cold = c.key_moving(
        "cold-moving-",
        ("node-y", &["node-x", "node-y"]),
        ("node-z", &["node-x", "node-y", "node-z"]),
    );
    let keys = vec![cold.clone(), c.key_owned_by("node-y", &["node-x", "node-y", "node-z"], "batch-")];
    let results = x.engine.get_many(RT, &keys).await.expect("batch");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!((y.source.of(&cold), z.source.of(&cold)), (0, 1));
    assert_eq!(c.net.calls("node-x", Op::Load), 0);
}

#[tokio::test]
async fn get_many_makes_one_load_per_owner() {
    let c = Cluster::new(&["node-a", "node-b", "node-c"]).await;
    let a = c.node("node-a");
    let keys: Vec<String> = (0..100).map(|i| format!("many-{i}")).collect();
    let results = a.engine.get_many(RT, &keys).await.expect("batch");
    let got: Vec<_> = results.into_iter().map(|r| r.map(|v| v.bytes)).collect();
    let want: Vec<_> = keys.iter().map(|k| Ok(value(k))).collect();
    assert_eq!(got, want, "one result per key, in request order");
    assert_eq!(c.net.calls("node-b", Op::Load), 1);
    assert_eq!(c.net.calls("node-c", Op::Load), 1);
    assert_eq!(c.fetches(), 100);
    // Again: A answers its own keys from its main tier and the others from its hot tier.
    let again = a.engine.get_many(RT, &keys).await.expect("batch");
    assert!(again.iter().all(Result::is_ok));
    assert_eq!((c.net.calls("node-b", Op::Load), c.net.calls("node-c", Op::Load)), (1, 1));
    assert_eq!(c.fetches(), 100);
}

#[tokio::test]
async fn a_non_owner_answers_a_repeated_get_from_its_hot_tier_within_an_eighth_of_max_bytes() {
    let c = Cluster::new(&["node-a", "node-b"]).await;
    let a = c.node("node-a");
    let key = c.key_owned_by("node-b", &["node-a", "node-b"], "hot-");
    for _ in 0..3 {
        assert_eq!(a.engine.get(RT, &key).await.map(|v| v.bytes), Ok(value(&key)));
    }
    assert_eq!(c.net.calls("node-b", Op::Load), 1, "later reads are hot-tier hits");
    assert_eq!(a.ks(RT).metrics.hits_hot.get(), 2);
    // Many remote keys: the hot tier keeps copies, bounded by maxBytes / 8.
    let ring = c.ring(&["node-a", "node-b"]);
    let remote: Vec<String> = (0..3000)
        .map(|i| format!("bulk-{i}"))
        .filter(|k| ring.owner(key_hash(k)).is_some_and(|m| m.name == "node-b"))
        .collect();
    for chunk in remote.chunks(500) {
        a.engine.get_many(RT, chunk).await.expect("batch");
    }
    let store = &a.ks(RT).store;
    store.sync();
    let hot = store.tier_bytes(Tier::Hot);
    assert!(hot > 0, "copies are kept");
    assert!(hot <= (256 << 10) / 8, "hot tier holds {hot} bytes, more than 1/8 of maxBytes");
}

#[tokio::test]
async fn a_write_invalidates_copies_before_it_answers() {
    let c = Cluster::new(&["node-x", "node-y", "node-z"]).await;
    let (x, y, z) = (c.node("node-x"), c.node("node-y"), c.node("node-z"));
    let key = c.key_owned_by("node-y", &["node-x", "node-y", "node-z"], "w-");
    assert!(x.engine.get(RT, &key).await.is_ok(), "X holds a copy");
    z.engine.put(RT, &key, Bytes::from_static(b"new"), None).await.expect("put through Z");
    assert_eq!(x.engine.get(RT, &key).await.map(|v| v.bytes), Ok(Bytes::from_static(b"new")), "no old copy");
    assert_eq!(c.net.calls("node-y", Op::Store), 1);
    // A member that cannot be reached fails the write, naming it; the owner's change stands.
    c.net.set_fault("node-x", Some(Fault::Unreachable));
    let err = z.engine.put(RT, &key, Bytes::from_static(b"newer"), None).await.expect_err("X unreachable");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.to_string().contains("node-x"), "{err}");
    assert_eq!(y.engine.get(RT, &key).await.map(|v| v.bytes), Ok(Bytes::from_static(b"newer")));
    let err = y.engine.delete(RT, &key).await.expect_err("X unreachable");
    assert!(err.code() == Code::Unavailable && err.to_string().contains("node-x"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_non_owner_fetches_itself_when_the_owner_is_unreachable_but_not_when_it_is_slow() {
    let c = Cluster::new(&["node-a", "node-b"]).await;
    let (a, b) = (c.node("node-a"), c.node("node-b"));
    let key = c.key_owned_by("node-b", &["node-a", "node-b"], "fb-");
    c.net.set_fault("node-b", Some(Fault::Unreachable));
    assert_eq!(a.engine.get(RT, &key).await.map(|v| v.bytes), Ok(value(&key)));
    assert_eq!((a.source.of(&key), b.source.of(&key)), (1, 0), "A fetched itself");
    assert_eq!(a.ks(RT).metrics.fallbacks.get(), 1);
    // Cache-aside has nothing to fall back on: UNAVAILABLE naming the owner.
    let err = a.engine.get(ASIDE, &key).await.expect_err("owner unreachable");
    assert!(err.code() == Code::Unavailable && err.to_string().contains("node-b"), "{err}");
    // A slow owner is not down: DEADLINE_EXCEEDED, and no second fetch from here.
    let slow = c.key_owned_by("node-b", &["node-a", "node-b"], "slow-");
    c.net.set_fault("node-b", Some(Fault::Delay(Duration::from_hours(1))));
    let err = a.engine.get(RT, &slow).await.expect_err("owner too slow");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert_eq!(a.source.of(&slow), 0);
}

#[tokio::test]
async fn a_fill_that_started_before_a_write_never_overrides_it() {
    let c = Cluster::new(&["node-x", "node-y"]).await;
    let (x, y) = (c.node("node-x"), c.node("node-y"));
    let key = c.key_owned_by("node-y", &["node-x", "node-y"], "race-");
    y.source.hold();
    let reader = {
        let (engine, key) = (Arc::clone(&x.engine), key.clone());
        tokio::spawn(async move { engine.get(RT, &key).await })
    };
    while y.source.started.load(Ordering::SeqCst) == 0 {
        settle().await;
    }
    // The owner's fetch (for X) is in flight; a write lands, then the fetch finishes.
    y.engine.put(RT, &key, Bytes::from_static(b"written"), None).await.expect("put");
    y.source.release();
    let _in_flight = reader.await.expect("reader");
    assert_eq!(y.engine.get(RT, &key).await.map(|v| v.bytes), Ok(Bytes::from_static(b"written")), "owner");
    assert_eq!(x.engine.get(RT, &key).await.map(|v| v.bytes), Ok(Bytes::from_static(b"written")), "copy");
}

/// Before: failed members were matched by substring of the error text, so when demo-10 failed, demo-1 was
/// skipped in the second round.
#[tokio::test]
async fn purge_skips_exactly_the_members_that_failed() {
    let c = Cluster::new(&["demo-1", "demo-10", "demo-2"]).await;
    c.net.set_fault("demo-10", Some(Fault::Unreachable));
    let err = c.node("demo-2").engine.purge(RT).await.expect_err("demo-10 is unreachable");
    assert!(err.to_string().contains("purged 2 of 3 nodes") && err.to_string().contains("demo-10"), "{err}");
    assert_eq!(c.net.calls("demo-1", Op::Purge), 2, "both rounds reach demo-1");
    assert_eq!(c.net.calls("demo-10", Op::Purge), 1, "a failed member is not asked again");
    c.net.set_fault("demo-10", None);
    assert_eq!(c.node("demo-2").engine.purge(RT).await, Ok(3));
}

#[tokio::test]
async fn batch_results_are_per_key_and_a_single_key_write_reports_its_own_error() {
    let c = Cluster::new(&["node-a", "node-b"]).await;
    let a = c.node("node-a");
    let long = "k".repeat(MAX_KEY_BYTES + 1);
    let keys = vec!["ok-1".to_owned(), String::new(), long.clone(), "missing-1".to_owned()];
    let results = a.engine.get_many(RT, &keys).await.expect("batch");
    let codes: Vec<Code> =
        results.iter().map(|r| r.as_ref().map_or_else(EngineError::code, |_| Code::Ok)).collect();
    assert_eq!(codes, [Code::Ok, Code::InvalidArgument, Code::InvalidArgument, Code::NotFound]);
    let err = a.engine.put(ASIDE, &long, Bytes::new(), None).await.expect_err("key too long");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = a.engine.delete(ASIDE, "").await.expect_err("empty key");
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn holders_of_copies_are_members_or_a_bounded_number_of_outside_callers() {
    let c = Cluster::new(&["node-x", "node-y"]).await;
    let (x, y) = (c.node("node-x"), c.node("node-y"));
    let key = c.key_owned_by("node-y", &["node-x", "node-y"], "held-");
    let load = |from: Member| y.engine.load_for_peer(RT, std::slice::from_ref(&key), Some(from), false);
    // A member's name under another address is not that member: not recorded.
    load(Member::new("node-x", "10.0.0.99:7422")).await.expect("load");
    assert!(y.engine.copy_holders().is_empty(), "{:?}", y.engine.copy_holders());
    load(x.member.clone()).await.expect("load");
    assert_eq!(y.engine.copy_holders(), vec![("node-x".to_owned(), x.member.address.clone())]);
    // Callers outside the ring (nodes that already see Y): remembered, but only so many.
    for i in 0..200 {
        load(Member::new(format!("outside-{i}"), format!("10.1.0.{}:7422", i % 250))).await.expect("load");
    }
    let held = y.engine.copy_holders();
    assert_eq!(held.len(), 2 + crate::engine::MAX_OUTSIDE_HOLDERS, "bounded: {}", held.len());
    assert!(held.iter().any(|(name, _)| name == "node-x"), "the member stays recorded");
}

// ---- Membership changes: no stale reads after a flap, no lost writes, warm leaves ------------------------------

const ABC: [&str; 3] = ["node-a", "node-b", "node-c"];

fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// What every node answers for a key of a keyspace: value bytes, or the error code.
async fn answers(c: &Cluster, keyspace: &str, key: &str) -> Vec<Result<Bytes, Code>> {
    let mut out = Vec::new();
    for n in &c.nodes {
        out.push(n.engine.get(keyspace, key).await.map(|v| v.bytes).map_err(|e| e.code()));
    }
    out
}

/// Before: C, dropped by A and B (a readiness flap, missed probes), kept its old entries; writes and deletes of
/// its keys went to the interim owners meanwhile, and once re-admitted C answered with the overwritten value and
/// the deleted key, for as long as they stayed in its cache (forever without a TTL).
#[tokio::test]
async fn a_member_dropped_and_readmitted_answers_the_writes_made_while_it_was_out() {
    let c = Cluster::new(&ABC).await;
    let overwritten = c.key_owned_by("node-c", &ABC, "flap-put-");
    let deleted = c.key_owned_by("node-c", &ABC, "flap-del-");
    let (a, cc) = (c.node("node-a"), c.node("node-c"));
    a.engine.put(ASIDE, &overwritten, bytes("v1"), None).await.expect("put v1");
    a.engine.put(ASIDE, &deleted, bytes("v1"), None).await.expect("put");
    // A and B drop C; C does not notice (its own view is unchanged) and cannot be reached.
    c.net.set_fault("node-c", Some(Fault::Unreachable));
    c.view(&["node-a", "node-b"], &["node-a", "node-b"]).await;
    a.engine.put(ASIDE, &overwritten, bytes("v2"), None).await.expect("put v2 while C is out");
    a.engine.delete(ASIDE, &deleted).await.expect("delete while C is out");
    assert_eq!(cc.ks(ASIDE).store.get(Tier::Main, &overwritten).and_then(|e| e.value), Some(bytes("v1")));
    // C comes back and is re-admitted.
    c.net.set_fault("node-c", None);
    c.view(&["node-a", "node-b"], &ABC).await;
    for (i, got) in answers(&c, ASIDE, &overwritten).await.into_iter().enumerate() {
        assert_eq!(got, Ok(bytes("v2")), "node {i} after C was re-admitted");
    }
    for (i, got) in answers(&c, ASIDE, &deleted).await.into_iter().enumerate() {
        assert_eq!(got, Err(Code::NotFound), "node {i}: the delete made while C was out stands");
    }
    let sent: u64 =
        ["node-a", "node-b"].iter().map(|n| c.node(n).engine.metrics().handoff_total("sent")).sum();
    assert!(sent >= 2, "the interim owners handed both back ({sent})");
}

/// Before: B, whose ring still named itself the owner, acknowledged a Put and then dropped the key when its ring
/// caught up (`retain_owned`): readers got NOT_FOUND.
#[tokio::test]
async fn a_write_acknowledged_while_rings_disagree_survives_convergence() {
    let c = Cluster::new(&ABC).await;
    let (a, b) = (c.node("node-a"), c.node("node-b"));
    // C joins: A and B do not see it yet; the key moves from B to C.
    let ab = ["node-a", "node-b"];
    c.view(&ab, &ab).await;
    let key = c.key_moving("disagree-", ("node-b", &ab), ("node-c", &ABC));
    a.engine.put(ASIDE, &key, bytes("acknowledged"), None).await.expect("put through A, stored on B");
    // B's view catches up, then A's.
    c.view(&["node-b"], &ABC).await;
    c.view(&["node-a"], &ABC).await;
    for (i, got) in answers(&c, ASIDE, &key).await.into_iter().enumerate() {
        assert_eq!(got, Ok(bytes("acknowledged")), "node {i} after the views converged");
    }
    // And the other way round: B already sees C, A does not; the write goes on from B to C.
    let key2 = c.key_moving("disagree2-", ("node-b", &ab), ("node-c", &ABC));
    c.view(&["node-a"], &ab).await;
    a.engine.put(ASIDE, &key2, bytes("forwarded"), None).await.expect("put");
    assert_eq!(c.net.calls("node-c", Op::Store), 1, "B passed the write on to C");
    c.view(&["node-a"], &ABC).await;
    for (i, got) in answers(&c, ASIDE, &key2).await.into_iter().enumerate() {
        assert_eq!(got, Ok(bytes("forwarded")), "node {i}");
    }
    assert_eq!(b.ks(ASIDE).store.get(Tier::Main, &key2).map(|e| e.value), None, "not left on B");
}

/// Before: a node that left took its entries with it: every read-through key it owned was fetched again, every
/// cache-aside key it owned was gone.
fn ring_without_c(c: &Cluster) -> Ring {
    c.ring(&["node-a", "node-b"])
}

#[tokio::test]
async fn a_leaving_node_hands_its_entries_to_the_next_owners_with_their_remaining_ttl() {
    let c = Cluster::new(&ABC).await;
    let (a, b, cc) = (c.node("node-a"), c.node("node-b"), c.node("node-c"));
    let ring = c.ring(&ABC);
    let keys: Vec<String> = (0..300).map(|i| format!("leave-{i}")).collect();
    let owned_by_c: Vec<&String> =
        keys.iter().filter(|k| ring.owner(key_hash(k)).is_some_and(|m| m.name == "node-c")).collect();
    assert!(owned_by_c.len() > 50, "C owns a third of the keys");
    for k in &keys {
        a.engine
            .put(ASIDE, k, bytes(&format!("value-{k}")), Some(Duration::from_secs(100)))
            .await
            .expect("put");
        a.engine.get(RT, k).await.expect("read-through fill");
    }
    let fetched = c.fetches();
    let expiry: HashMap<String, std::time::Instant> = owned_by_c
        .iter()
        .map(|k| {
            let e = cc.ks(ASIDE).store.get(Tier::Main, k).expect("C holds its keys");
            ((*k).clone(), e.expires_at.expect("a TTL"))
        })
        .collect();
    let moved = cc.engine.leave().await;
    assert!(moved >= 2 * owned_by_c.len(), "C handed off both keyspaces' entries ({moved})");
    assert!(
        !a.engine.membership().ring().members().iter().any(|m| m.name == "node-c"),
        "A dropped C at once"
    );
    assert!(
        !b.engine.membership().ring().members().iter().any(|m| m.name == "node-c"),
        "B dropped C at once"
    );
    for k in &keys {
        for n in [a, b] {
            let v =
                n.engine.get(ASIDE, k).await.unwrap_or_else(|e| panic!("{k} through {}: {e}", n.member.name));
            assert_eq!(v.bytes, bytes(&format!("value-{k}")));
            assert!(v.ttl.is_some_and(|t| t <= Duration::from_secs(100)), "{k}: {:?}", v.ttl);
            assert_eq!(n.engine.get(RT, k).await.map(|v| v.bytes), Ok(value(k)));
        }
        if let Some(was) = expiry.get(k) {
            let owner = ring_without_c(&c).owner(key_hash(k)).map(|m| m.name.clone()).expect("an owner");
            let now = c.node(&owner).ks(ASIDE).store.get(Tier::Main, k).and_then(|e| e.expires_at);
            assert_eq!(now, Some(*was), "{k}: the new owner keeps the expiry, never extends it");
        }
    }
    assert_eq!(c.fetches(), fetched, "no key was fetched again after C left");
    // C itself owns nothing any more: what reaches it goes to the new owners.
    let k = owned_by_c[0];
    a.engine.put(ASIDE, k, bytes("after-leave"), None).await.expect("put");
    assert_eq!(cc.engine.get(ASIDE, k).await.map(|v| v.bytes), Ok(bytes("after-leave")));
}

/// Before: a node that (re)started had an empty cache and nobody asked for what the others held: a cache-aside
/// key it owned read NOT_FOUND, a read-through key was fetched again.
#[tokio::test]
async fn a_new_owner_that_misses_asks_the_previous_owner_before_the_source() {
    // C starts while A and B already serve: its first view is {A, B, C}, theirs do not include it yet.
    let c = Cluster::started(&ABC, &["node-a", "node-b"]).await;
    let (a, cc) = (c.node("node-a"), c.node("node-c"));
    let keys: Vec<String> = (0..10_000)
        .map(|i| format!("prev-{i}"))
        .filter(|k| c.ring(&ABC).owner(key_hash(k)).is_some_and(|m| m.name == "node-c"))
        .take(20)
        .collect();
    for k in &keys {
        a.engine.put(ASIDE, k, bytes("kept"), None).await.expect("put");
        a.engine.get(RT, k).await.expect("fill");
    }
    let fetched = c.fetches();
    c.view(&["node-c"], &ABC).await;
    for k in &keys {
        assert_eq!(cc.engine.get(ASIDE, k).await.map(|v| v.bytes), Ok(bytes("kept")), "{k}");
        assert_eq!(cc.engine.get(RT, k).await.map(|v| v.bytes), Ok(value(k)), "{k}");
    }
    assert_eq!(c.fetches(), fetched, "no fetch: the previous owners answered");
    assert_eq!(cc.engine.metrics().previous_owner_hits.get(), 2 * keys.len() as u64);
    // Each key was asked for once; the next reads are main-tier hits.
    let peeks = c.net.calls("node-a", Op::Peek) + c.net.calls("node-b", Op::Peek);
    cc.engine.get_many(ASIDE, &keys).await.expect("batch");
    assert_eq!(c.net.calls("node-a", Op::Peek) + c.net.calls("node-b", Op::Peek), peeks);
}

/// Every way an entry can arrive (a write, a fill, a handoff, a previous owner's answer) keeps the newest.
#[tokio::test]
async fn newer_wins_on_every_insert_path() {
    use crate::store::{Entry, Held};
    let c = Cluster::new(&["node-a", "node-b"]).await;
    let a = c.node("node-a");
    let key = c.key_owned_by("node-a", &["node-a", "node-b"], "nw-");
    let ks = a.ks(ASIDE);
    let old = a.engine.next_version();
    a.engine.put(ASIDE, &key, bytes("written"), None).await.expect("put");
    let handoff = |held: Held| {
        let e = Arc::clone(&a.engine);
        let k: Arc<str> = Arc::from(key.as_str());
        async move { e.accept_handoff("node-b", ASIDE, vec![(k, Some(held))], (false, false), 0).await }
    };
    // An older handoff, value or delete, is ignored.
    let r = handoff(Held::Entry(Entry::value(bytes("stale"), None).versioned(old))).await;
    assert_eq!((r.applied, r.ignored), (0, 1));
    handoff(Held::Deleted(old)).await;
    assert_eq!(a.engine.get(ASIDE, &key).await.map(|v| v.bytes), Ok(bytes("written")));
    // A newer one wins.
    let newer = a.engine.next_version() + 1;
    let r = handoff(Held::Entry(Entry::value(bytes("newer"), None).versioned(newer))).await;
    assert_eq!(r.applied, 1);
    assert_eq!(a.engine.get(ASIDE, &key).await.map(|v| v.bytes), Ok(bytes("newer")));
    // A delete, then an older entry arriving late (a handoff or a previous owner's answer) stays deleted.
    a.engine.delete(ASIDE, &key).await.expect("delete");
    let r = handoff(Held::Entry(Entry::value(bytes("resurrected"), None).versioned(newer))).await;
    assert_eq!(r.ignored, 1);
    let hash = key_hash(&key);
    let epoch = ks.store.epoch(hash);
    let late = Entry::value(bytes("late-fill"), None).versioned(newer);
    assert!(!ks.store.fill(Tier::Main, &key, hash, &late, epoch), "a fill older than the delete");
    assert_eq!(a.engine.get(ASIDE, &key).await.map(|v| v.bytes).map_err(|e| e.code()), Err(Code::NotFound));
    // A write always wins: its version is newer than every version this node has seen.
    a.engine.put(ASIDE, &key, bytes("rewritten"), None).await.expect("put");
    assert_eq!(a.engine.get(ASIDE, &key).await.map(|v| v.bytes), Ok(bytes("rewritten")));
}

/// Deletes are remembered for `TOMBSTONE_TTL`; a member out for longer may have missed some whose tombstones are
/// gone. It is re-admitted without its old entries (colder, never wrong); a short absence keeps them.
#[tokio::test(start_paused = true)]
async fn a_member_out_for_longer_than_deletes_are_remembered_comes_back_without_its_old_entries() {
    let c = Cluster::new(&ABC).await;
    let a = c.node("node-a");
    let short = c.key_owned_by("node-c", &ABC, "short-");
    let long = c.key_owned_by("node-c", &ABC, "long-");
    a.engine.put(ASIDE, &short, bytes("kept"), None).await.expect("put");
    c.net.set_fault("node-c", Some(Fault::Unreachable));
    c.view(&["node-a", "node-b"], &["node-a", "node-b"]).await;
    tokio::time::advance(Duration::from_mins(1)).await;
    c.net.set_fault("node-c", None);
    c.view(&["node-a", "node-b"], &ABC).await;
    assert_eq!(a.engine.get(ASIDE, &short).await.map(|v| v.bytes), Ok(bytes("kept")), "a minute out: kept");

    a.engine.put(ASIDE, &long, bytes("old"), None).await.expect("put");
    c.net.set_fault("node-c", Some(Fault::Unreachable));
    c.view(&["node-a", "node-b"], &["node-a", "node-b"]).await;
    tokio::time::advance(Duration::from_mins(6)).await;
    c.net.set_fault("node-c", None);
    c.view(&["node-a", "node-b"], &ABC).await;
    for n in &c.nodes {
        let got = n.engine.get(ASIDE, &long).await.map_err(|e| e.code());
        assert_eq!(
            got,
            Err(Code::NotFound),
            "six minutes out: {} does not vouch for C's old entry",
            n.member.name
        );
    }
}

/// A previous owner's copy never undoes a delete made on the new owner since.
#[tokio::test]
async fn a_previous_owner_does_not_bring_back_a_key_deleted_on_the_new_owner() {
    let c = Cluster::started(&ABC, &["node-a", "node-b"]).await;
    let (a, cc) = (c.node("node-a"), c.node("node-c"));
    let key = c.key_owned_by("node-c", &ABC, "del-prev-");
    a.engine.put(ASIDE, &key, bytes("before"), None).await.expect("put");
    c.view(&["node-c"], &ABC).await;
    cc.engine.delete(ASIDE, &key).await.expect("delete on the new owner");
    let got = cc.engine.get(ASIDE, &key).await.map_err(|e| e.code());
    assert_eq!(got, Err(Code::NotFound), "the previous owner's value must not come back");
    assert_eq!(c.net.calls("node-a", Op::Peek) + c.net.calls("node-b", Op::Peek), 0, "not even asked");
}
