//! Partition: three `distcache-node` processes, each in a network namespace of its own on one private bridge
//! (`distcache_tests::netns::Lan`). Node 2 is cut off for 20 s while a writer and readers go through nodes 0 and 1,
//! then healed.
//!
//! During the cut, no read through nodes 0 and 1 may return a value older than a write they acknowledged before
//! the read started (NOT_FOUND for the cut node's untouched keys is allowed: their only copy is cut off). After the
//! heal, the staleness window (from the heal until every node answers every key with its latest acknowledged state)
//! must stay within `STALENESS_BOUND`, and the cut node's untouched keys must still be there.
//!
//! Needs root and iproute2 (CI runs as root); without them the test fails and says so.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use distcache_node::ring::{Member, Ring, key_hash};
use distcache_proto::v1::{DeleteRequest, GetRequest, GetResponse, PutRequest, cache_client::CacheClient};
use distcache_tests::{
    built_binary, http_get,
    netns::{Lan, NsProcess},
    wait_for,
};
use futures::StreamExt as _;
use tokio::{task::JoinHandle, time::MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

/// The documented bound of the staleness window after a heal.
const STALENESS_BOUND: Duration = Duration::from_secs(3);

const NODES: usize = 3;
/// The node that is cut off.
const CUT_NODE: usize = 2;
/// The nodes that stay connected (the majority): every read and write of the cut goes through them.
const MAJORITY: [usize; 2] = [0, 1];
const KEYS: usize = 300;
const CUT_FOR: Duration = Duration::from_secs(20);
/// After the heal, every round must be right for this long, with every node seeing every member, before the
/// staleness window is taken as over (a clean round while the members still disagree may not last).
const STABLE_FOR: Duration = Duration::from_secs(2);
/// How long the heal is watched at most: past the bound, so that a window longer than the bound is still measured.
const HEAL_DEADLINE: Duration = Duration::from_secs(20);
/// The whole scenario, from the first readiness probe to the last check.
const BUDGET: Duration = Duration::from_secs(85);
/// The writer's operations are spread over this much of the cut (failed attempts push them later).
const WRITE_SPAN: Duration = Duration::from_secs(12);
/// Between two reads of one reader during the cut.
const READ_PACE: Duration = Duration::from_millis(5);
const READERS_PER_NODE: usize = 2;
/// Concurrent reads of one read round (every key through every node).
const ROUND_CONCURRENCY: usize = 64;
/// Deadline of one client call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
const KEYSPACE: &str = "aside";
const CLIENT_PORT: u16 = 7420;
const ADMIN_PORT: u16 = 7421;
const PEER_PORT: u16 = 7422;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_for_20_s_serves_the_latest_writes_soon_after_the_heal() -> anyhow::Result<()> {
    Lan::available().context(
        "the partition test needs root and iproute2 (`ip netns`, veth, bridge); CI runs it as root, so run it as root",
    )?;
    let cluster = Cluster::start()?;
    let outcome = match tokio::time::timeout(BUDGET, scenario(&cluster)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(anyhow::anyhow!("the partition scenario did not finish within {BUDGET:?}")),
    };
    outcome.map_err(|e| e.context(format!("node logs:\n{}", cluster.logs())))
}

// ---------------------------------------------------------------------------------------------------------------
// The cluster: one node process per namespace.

/// The namespaces and the node processes (dropped first: killed by their PIDs, then the namespaces are deleted).
struct Cluster {
    procs: Vec<NsProcess>,
    lan: Lan,
    ips: Vec<Ipv4Addr>,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> anyhow::Result<Self> {
        let lan = Lan::new(NODES)?;
        let ips = (0..NODES).map(|i| lan.node_ip(i)).collect::<anyhow::Result<Vec<_>>>()?;
        let dir = tempfile::tempdir()?;
        let keyspaces = dir.path().join("keyspaces.yaml");
        std::fs::write(&keyspaces, format!("keyspaces:\n  - {{ name: {KEYSPACE}, maxBytes: 16Mi }}\n"))?;
        let peers: Vec<String> = ips.iter().map(|ip| format!("\"{ip}:{PEER_PORT}\"")).collect();
        let binary = built_binary("distcache-node")?;
        let mut cluster = Self { procs: Vec::new(), lan, ips, dir };
        for i in 0..NODES {
            let ip = cluster.ips[i];
            let config = cluster.dir.path().join(format!("node-{i}.yaml"));
            std::fs::write(
                &config,
                format!(
                    "name: node-{i}\nlisten: {ip}:{CLIENT_PORT}\npeerListen: {ip}:{PEER_PORT}\n\
                     advertise: {ip}:{PEER_PORT}\nadmin: {ip}:{ADMIN_PORT}\n\
                     discovery:\n  static: {{ peers: [{}], probeInterval: 250ms }}\n\
                     keyspacesFile: \"{}\"\nkeyspacesPollInterval: 100ms\n",
                    peers.join(", "),
                    keyspaces.display()
                ),
            )?;
            let args = [OsStr::new("--config"), config.as_os_str()];
            let process = cluster.lan.spawn(i, &binary, args, &[("RUST_LOG", "info")], &cluster.log(i))?;
            cluster.procs.push(process);
        }
        Ok(cluster)
    }

    fn grpc(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.ips[i], CLIENT_PORT))
    }

    fn admin(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.ips[i], ADMIN_PORT))
    }

    fn peer(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.ips[i], PEER_PORT))
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{i}.log"))
    }

    /// Every node's log, each after a header line.
    fn logs(&self) -> String {
        (0..NODES)
            .map(|i| {
                let log = std::fs::read_to_string(self.log(i)).unwrap_or_else(|e| format!("(no log: {e})"));
                format!("--- node-{i} ({}) ---\n{log}", self.ips[i])
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("node logs:\n{}", self.logs());
        }
    }
}

/// The member names a node reports on `/admin/peers`, sorted; `None` when it does not answer.
async fn member_names(admin: SocketAddr) -> Option<Vec<String>> {
    let (code, body) = http_get(admin, "/admin/peers").await.ok()?;
    if code != 200 {
        return None;
    }
    let report: serde_json::Value = serde_json::from_str(&body).ok()?;
    let mut names: Vec<String> =
        report["members"].as_array()?.iter().filter_map(|m| m["name"].as_str().map(str::to_owned)).collect();
    names.sort();
    Some(names)
}

async fn wait_ready(cluster: &Cluster) -> anyhow::Result<()> {
    let all: Vec<String> = (0..NODES).map(|i| format!("node-{i}")).collect();
    let all = &all;
    wait_for(Duration::from_secs(20), "every node ready, with all 3 members", move || async move {
        for i in 0..NODES {
            let ready = matches!(http_get(cluster.admin(i), "/readyz").await, Ok((200, _)));
            if !ready || member_names(cluster.admin(i)).await.as_ref() != Some(all) {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await
}

async fn connect(addr: SocketAddr) -> anyhow::Result<CacheClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    Ok(CacheClient::new(channel))
}

// ---------------------------------------------------------------------------------------------------------------
// Keys, answers, and the records of reads and writes.

/// What the writer does to a key during the cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Keep,
    Put,
    Delete,
}

struct KeyPlan {
    key: String,
    /// Written before the cut.
    v0: String,
    /// Written during the cut (`Op::Put`).
    v1: String,
    /// Index of the owner node in the full ring.
    owner: usize,
    op: Op,
}

impl KeyPlan {
    /// The answer once the cut's write to this key is acknowledged.
    fn after_write(&self) -> Seen {
        match self.op {
            Op::Keep => Seen::V0,
            Op::Put => Seen::V1,
            Op::Delete => Seen::Absent,
        }
    }
}

/// One answer to a Get, relative to the key's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    V0,
    V1,
    Absent,
    /// A value that was never written.
    Other,
    /// An error other than NOT_FOUND.
    Failed(Code),
}

#[derive(Clone, Copy, Debug)]
struct Read {
    node: usize,
    key: usize,
    start: Instant,
    end: Instant,
    seen: Seen,
}

struct WriteLog {
    key: usize,
    first_try: Option<Instant>,
    /// When it was acknowledged, and through which node.
    acked: Option<(Instant, usize)>,
    /// How long the acknowledged attempt took.
    ack_latency: Option<Duration>,
    attempts: usize,
    /// Failed attempts by status code.
    failures: BTreeMap<String, usize>,
    /// An attempt was still running when the cut ended (its outcome is unknown).
    in_flight_at_end: bool,
}

/// Owners from the ring every node computes (rendezvous hashing over the member names); of the cut node's keys,
/// half are overwritten during the cut, a quarter deleted, a quarter kept (interleaved in key order).
fn plan_keys(cluster: &Cluster) -> anyhow::Result<Vec<KeyPlan>> {
    let ring = Ring::new(
        (0..NODES).map(|i| Member::new(format!("node-{i}"), cluster.peer(i).to_string())).collect(),
    );
    let mut cut_keys = 0usize;
    (0..KEYS)
        .map(|k| {
            let key = format!("k{k}");
            let owner_name = ring.owner(key_hash(&key)).context("empty ring")?.name.clone();
            let owner: usize = owner_name
                .strip_prefix("node-")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("unexpected member name {owner_name}"))?;
            let op = if owner == CUT_NODE {
                cut_keys += 1;
                match (cut_keys - 1) % 4 {
                    0 | 1 => Op::Put,
                    2 => Op::Delete,
                    _ => Op::Keep,
                }
            } else {
                Op::Keep
            };
            Ok(KeyPlan { v0: format!("v0-{key}"), v1: format!("v1-{key}"), key, owner, op })
        })
        .collect()
}

fn get_request(key: &str) -> GetRequest {
    GetRequest { keyspace: KEYSPACE.into(), key: key.into() }
}

fn put_request(key: &str, value: &str) -> PutRequest {
    PutRequest { keyspace: KEYSPACE.into(), key: key.into(), value: value.to_owned().into(), ttl: None }
}

fn classify(answer: Result<tonic::Response<GetResponse>, tonic::Status>, plan: &KeyPlan) -> Seen {
    match answer {
        Ok(response) => {
            let value = &response.get_ref().value[..];
            if value == plan.v0.as_bytes() {
                Seen::V0
            } else if value == plan.v1.as_bytes() {
                Seen::V1
            } else {
                Seen::Other
            }
        }
        Err(status) if status.code() == Code::NotFound => Seen::Absent,
        Err(status) => Seen::Failed(status.code()),
    }
}

async fn read_once(mut client: CacheClient<Channel>, node: usize, key: usize, plan: &KeyPlan) -> Read {
    let start = Instant::now();
    let seen = classify(client.get(get_request(&plan.key)).await, plan);
    Read { node, key, start, end: Instant::now(), seen }
}

/// Every key through every node once: the reads whose answer is not in `want[key]`.
struct Round {
    end: Instant,
    wrong: Vec<Read>,
}

async fn read_round(clients: &[CacheClient<Channel>], plans: &[KeyPlan], want: &[Vec<Seen>]) -> Round {
    let pairs: Vec<(usize, usize)> =
        (0..clients.len()).flat_map(|n| (0..plans.len()).map(move |k| (n, k))).collect();
    let reads: Vec<Read> = futures::stream::iter(pairs)
        .map(|(n, k)| read_once(clients[n].clone(), n, k, &plans[k]))
        .buffer_unordered(ROUND_CONCURRENCY)
        .collect()
        .await;
    let wrong = reads.into_iter().filter(|r| !want[r.key].contains(&r.seen)).collect();
    Round { end: Instant::now(), wrong }
}

/// The first few reads of `reads`, for messages.
fn describe(reads: &[Read], plans: &[KeyPlan], since: Instant) -> String {
    let mut out = String::new();
    for r in reads.iter().take(10) {
        let at = r.start.saturating_duration_since(since).as_millis();
        let _ = write!(out, "\n  +{at} ms node-{} {}: {:?}", r.node, plans[r.key].key, r.seen);
    }
    if reads.len() > 10 {
        let _ = write!(out, "\n  ... and {} more", reads.len() - 10);
    }
    out
}

fn count_codes(codes: impl Iterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for c in codes {
        *counts.entry(c).or_default() += 1;
    }
    counts
}

// ---------------------------------------------------------------------------------------------------------------
// Load during the cut.

/// Reads keys in a loop (from key `first` on) through one node until `stop`.
async fn reader(
    mut client: CacheClient<Channel>,
    node: usize,
    first: usize,
    plans: Arc<Vec<KeyPlan>>,
    stop: CancellationToken,
) -> Vec<Read> {
    let mut reads = Vec::new();
    let mut pace = tokio::time::interval(READ_PACE);
    pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for key in (0..plans.len()).cycle().skip(first) {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = pace.tick() => {}
        }
        let start = Instant::now();
        let answer = tokio::select! {
            () = stop.cancelled() => break,
            answer = client.get(get_request(&plans[key].key)) => answer,
        };
        reads.push(Read { node, key, start, end: Instant::now(), seen: classify(answer, &plans[key]) });
    }
    reads
}

/// Applies each planned write through the majority nodes, the writes started on a schedule spread over
/// `WRITE_SPAN` (open loop: a slow write does not hold back the next ones); a failed attempt is retried, through
/// the other node, until acknowledged or `stop`.
async fn writer(
    clients: Vec<CacheClient<Channel>>,
    plans: Arc<Vec<KeyPlan>>,
    stop: CancellationToken,
) -> Vec<WriteLog> {
    let keys: Vec<usize> = (0..plans.len()).filter(|&k| plans[k].op != Op::Keep).collect();
    let period = WRITE_SPAN / u32::try_from(keys.len().max(1)).unwrap_or(u32::MAX);
    let start = Instant::now();
    let mut not_before = start;
    let mut writes = Vec::with_capacity(keys.len());
    for (j, &key) in keys.iter().enumerate() {
        writes.push(write_until_acked(&clients, j, key, &plans[key], &stop, not_before));
        not_before += period;
    }
    futures::future::join_all(writes).await
}

/// One planned write: from `not_before` on, attempts (through the majority nodes alternately, starting with
/// node `j % 2`, 100 ms apart) until one is acknowledged or `stop`.
async fn write_until_acked(
    clients: &[CacheClient<Channel>],
    j: usize,
    key: usize,
    plan: &KeyPlan,
    stop: &CancellationToken,
    not_before: Instant,
) -> WriteLog {
    let mut log = WriteLog {
        key,
        first_try: None,
        acked: None,
        ack_latency: None,
        attempts: 0,
        failures: BTreeMap::new(),
        in_flight_at_end: false,
    };
    let mut next = not_before;
    loop {
        // Pacing of the schedule and of retries (not a wait for a condition).
        tokio::select! {
            () = stop.cancelled() => return log,
            () = tokio::time::sleep_until(next.into()) => {}
        }
        let through = (j + log.attempts) % clients.len();
        let mut client = clients[through].clone();
        let started = Instant::now();
        log.first_try.get_or_insert(started);
        log.attempts += 1;
        let result = tokio::select! {
            () = stop.cancelled() => {
                log.in_flight_at_end = true;
                return log;
            }
            result = write_once(&mut client, plan) => result,
        };
        match result {
            Ok(()) => {
                log.acked = Some((Instant::now(), MAJORITY[through]));
                log.ack_latency = Some(started.elapsed());
                return log;
            }
            Err(code) => *log.failures.entry(format!("{code:?}")).or_default() += 1,
        }
        next = Instant::now() + Duration::from_millis(100);
    }
}

async fn write_once(client: &mut CacheClient<Channel>, plan: &KeyPlan) -> Result<(), Code> {
    let result = match plan.op {
        Op::Put => client.put(put_request(&plan.key, &plan.v1)).await.map(drop),
        Op::Delete => {
            client.delete(DeleteRequest { keyspace: KEYSPACE.into(), key: plan.key.clone() }).await.map(drop)
        }
        Op::Keep => Ok(()),
    };
    result.map_err(|status| status.code())
}

/// Changes of the member names one node reports: when, and the sorted names (`None`: no answer).
type MemberTimeline = Vec<(Instant, Option<Vec<String>>)>;

/// The member names a node reports, polled every 100 ms until `stop`: each change with its time (`None`: no
/// answer).
async fn watch_members(admin: SocketAddr, stop: CancellationToken) -> MemberTimeline {
    let mut changes = MemberTimeline::new();
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = pace.tick() => {}
        }
        let names = tokio::select! {
            () = stop.cancelled() => break,
            names = member_names(admin) => names,
        };
        if changes.last().is_none_or(|(_, last)| *last != names) {
            changes.push((Instant::now(), names));
        }
    }
    changes
}

// ---------------------------------------------------------------------------------------------------------------
// The scenario.

async fn scenario(cluster: &Cluster) -> anyhow::Result<()> {
    wait_ready(cluster).await?;
    let mut clients = Vec::new();
    for i in 0..NODES {
        clients.push(connect(cluster.grpc(i)).await?);
    }
    let plans = Arc::new(plan_keys(cluster)?);

    // Every key written through node 0, then read through every node (which also leaves copies on the others).
    let puts: Vec<anyhow::Result<()>> = futures::stream::iter(plans.iter())
        .map(|p| {
            let mut client = clients[0].clone();
            async move {
                client
                    .put(put_request(&p.key, &p.v0))
                    .await
                    .with_context(|| format!("put {} before the cut", p.key))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    puts.into_iter().collect::<anyhow::Result<()>>()?;
    let v0: Vec<Vec<Seen>> = plans.iter().map(|_| vec![Seen::V0]).collect();
    let started = Instant::now();
    let before = read_round(&clients, &plans, &v0).await;
    anyhow::ensure!(
        before.wrong.is_empty(),
        "before the cut, not every node reads every key:{}",
        describe(&before.wrong, &plans, started)
    );

    let stop_watching = CancellationToken::new();
    let _stop_watching_on_exit = stop_watching.clone().drop_guard();
    let watchers: Vec<JoinHandle<_>> =
        (0..NODES).map(|i| tokio::spawn(watch_members(cluster.admin(i), stop_watching.clone()))).collect();

    let cut = cut_phase(cluster, &clients, &plans).await?;
    let heal = heal_phase(cluster, &clients, &plans, &cut.writes).await?;

    stop_watching.cancel();
    let mut membership = Vec::new();
    for w in watchers {
        membership.push(w.await?);
    }
    report(&plans, &cut, &heal, &membership)
}

struct CutOutcome {
    at: Instant,
    reads: Vec<Read>,
    writes: Vec<WriteLog>,
}

/// Cuts the node off for `CUT_FOR` under reads and writes through the majority (`heal_phase` heals it).
async fn cut_phase(
    cluster: &Cluster,
    clients: &[CacheClient<Channel>],
    plans: &Arc<Vec<KeyPlan>>,
) -> anyhow::Result<CutOutcome> {
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    cluster.lan.cut(CUT_NODE)?;
    let at = Instant::now();
    let mut readers = Vec::new();
    for (m, &node) in MAJORITY.iter().enumerate() {
        for r in 0..READERS_PER_NODE {
            let first = (m * READERS_PER_NODE + r) * KEYS / (MAJORITY.len() * READERS_PER_NODE);
            let task = reader(clients[node].clone(), node, first, Arc::clone(plans), stop.clone());
            readers.push(tokio::spawn(task));
        }
    }
    let majority: Vec<_> = MAJORITY.iter().map(|&n| clients[n].clone()).collect();
    let writing = tokio::spawn(writer(majority, Arc::clone(plans), stop.clone()));

    // The cut lasts CUT_FOR, whatever happens meanwhile: a duration of the scenario, not a wait for a condition.
    tokio::time::sleep_until((at + CUT_FOR).into()).await;
    stop.cancel();
    let mut reads = Vec::new();
    for r in readers {
        reads.extend(r.await?);
    }
    let writes = writing.await?;
    Ok(CutOutcome { at, reads, writes })
}

struct HealOutcome {
    at: Instant,
    /// What the polling saw.
    seen: HealProgress,
    /// Wrong answers in the final rounds, after the polling.
    after: Vec<Read>,
}

/// What the polling after the heal has seen so far.
#[derive(Default)]
struct HealProgress {
    rounds: usize,
    /// The wrong answers of the first round.
    first_wrong: Option<Vec<Read>>,
    /// End of the first round with no wrong answer.
    first_clean: Option<Instant>,
    /// End of the first round of the current run of rounds without a wrong answer.
    clean_since: Option<Instant>,
    /// Rounds with wrong answers after a round without any.
    relapses: usize,
    /// When every node first reported all members (`None` again whenever one does not).
    settled_since: Option<Instant>,
    /// The wrong answers of the last round that had any.
    last_wrong: Vec<Read>,
    /// End of the last wrong answer that was a value or NOT_FOUND (not an error).
    last_stale: Option<Instant>,
    /// The staleness window ended here: the start of the run of clean rounds that lasted `STABLE_FOR` with every
    /// node seeing every member.
    converged: Option<Instant>,
}

impl HealProgress {
    /// Takes one round (and whether every node then reported all members); true once converged.
    fn record(&mut self, round: Round, settled: bool) -> bool {
        self.rounds += 1;
        if self.first_wrong.is_none() {
            self.first_wrong = Some(round.wrong.clone());
        }
        self.settled_since = if settled { self.settled_since.or(Some(round.end)) } else { None };
        if round.wrong.is_empty() {
            self.first_clean.get_or_insert(round.end);
            self.clean_since.get_or_insert(round.end);
        } else {
            if self.clean_since.take().is_some() {
                self.relapses += 1;
            }
            let stale =
                round.wrong.iter().filter(|r| !matches!(r.seen, Seen::Failed(_))).map(|r| r.end).max();
            self.last_stale = self.last_stale.max(stale);
            self.last_wrong = round.wrong;
        }
        if let (Some(clean), Some(settled)) = (self.clean_since, self.settled_since)
            && round.end.saturating_duration_since(clean.max(settled)) >= STABLE_FOR
        {
            self.converged = Some(clean);
        }
        self.converged.is_some()
    }
}

/// Heals the cut and polls every key through every node until all answer the latest acknowledged state, and
/// keep doing so for `STABLE_FOR` after every node sees every member again.
async fn heal_phase(
    cluster: &Cluster,
    clients: &[CacheClient<Channel>],
    plans: &[KeyPlan],
    writes: &[WriteLog],
) -> anyhow::Result<HealOutcome> {
    let mut want: Vec<Vec<Seen>> = plans.iter().map(|p| vec![p.after_write()]).collect();
    for w in writes.iter().filter(|w| w.acked.is_none()) {
        // Unacknowledged: either outcome (the test fails on it anyway).
        want[w.key] = vec![Seen::V0, plans[w.key].after_write()];
    }
    let all: Vec<String> = (0..NODES).map(|i| format!("node-{i}")).collect();
    cluster.lan.heal(CUT_NODE)?;
    let at = Instant::now();

    let progress = Mutex::new(HealProgress::default());
    let (progress_ref, want_ref, all_ref) = (&progress, &want[..], &all);
    let polled = wait_for(
        HEAL_DEADLINE,
        "every node answers every key as last acknowledged, stably",
        move || async move {
            let round = read_round(clients, plans, want_ref).await;
            let mut settled = true;
            for i in 0..NODES {
                settled &= member_names(cluster.admin(i)).await.as_ref() == Some(all_ref);
            }
            let mut p = progress_ref.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            Ok(p.record(round, settled))
        },
    )
    .await;
    let seen = progress.into_inner().map_err(|_| anyhow::anyhow!("poisoned"))?;
    if let Err(e) = polled {
        println!("partition: {e:#}");
    }

    // Every key (the cut node's untouched ones included) through every node, once more.
    let mut after = Vec::new();
    if seen.converged.is_some() {
        after = read_round(clients, plans, &want).await.wrong;
    }
    Ok(HealOutcome { at, seen, after })
}

// ---------------------------------------------------------------------------------------------------------------
// Judgement.

/// What the reads through the majority saw during the cut.
#[derive(Default)]
struct CutVerdict {
    reads: usize,
    errors: BTreeMap<String, usize>,
    /// Reads of a written key that started after the write was acknowledged.
    checked_after_ack: usize,
    /// NOT_FOUND for an untouched key of the cut node (allowed: its only copy is cut off).
    absent_untouched: usize,
    violations: Vec<(Read, &'static str)>,
}

fn judge_cut(cut: &CutOutcome, plans: &[KeyPlan]) -> CutVerdict {
    let mut acked: Vec<Option<Instant>> = vec![None; plans.len()];
    for w in &cut.writes {
        acked[w.key] = w.acked.map(|(at, _)| at);
    }
    let mut v = CutVerdict { reads: cut.reads.len(), ..CutVerdict::default() };
    v.errors = count_codes(cut.reads.iter().filter_map(|r| match r.seen {
        Seen::Failed(code) => Some(format!("{code:?}")),
        _ => None,
    }));
    for r in cut.reads.iter().filter(|r| !matches!(r.seen, Seen::Failed(_))) {
        let plan = &plans[r.key];
        let acked_before = acked[r.key].is_some_and(|at| at < r.start);
        let verdict = match plan.op {
            Op::Keep if plan.owner != CUT_NODE => {
                (r.seen != Seen::V0).then_some("a majority node's key changed")
            }
            Op::Keep => match r.seen {
                Seen::V0 => None,
                Seen::Absent => {
                    v.absent_untouched += 1;
                    None
                }
                _ => Some("a value never written"),
            },
            _ if acked_before => {
                v.checked_after_ack += 1;
                match r.seen {
                    seen if seen == plan.after_write() => None,
                    Seen::V0 => Some("stale: older than an acknowledged write"),
                    Seen::Absent => Some("lost: NOT_FOUND after an acknowledged put"),
                    _ => Some("a value never written"),
                }
            }
            _ => (![Seen::V0, Seen::Absent, plan.after_write()].contains(&r.seen))
                .then_some("a value never written"),
        };
        if let Some(why) = verdict {
            v.violations.push((*r, why));
        }
    }
    v
}

fn report(
    plans: &[KeyPlan],
    cut: &CutOutcome,
    heal: &HealOutcome,
    membership: &[MemberTimeline],
) -> anyhow::Result<()> {
    let of_cut: Vec<&KeyPlan> = plans.iter().filter(|p| p.owner == CUT_NODE).collect();
    let count = |op: Op| of_cut.iter().filter(|p| p.op == op).count();
    println!(
        "partition: node-{CUT_NODE} owns {} of {KEYS} keys: {} overwritten, {} deleted, {} untouched during the cut",
        of_cut.len(),
        count(Op::Put),
        count(Op::Delete),
        count(Op::Keep)
    );
    for (i, changes) in membership.iter().enumerate() {
        let line: Vec<String> = changes
            .iter()
            .map(|(t, names)| match names {
                Some(names) => format!("+{} ms {names:?}", since(cut.at, *t)),
                None => format!("+{} ms (no answer)", since(cut.at, *t)),
            })
            .collect();
        println!(
            "partition: members seen by node-{i} (times from the cut; heal at +{} ms): {}",
            since(cut.at, heal.at),
            line.join(", ")
        );
    }
    let mut failures: Vec<String> = Vec::new();
    let acknowledged = report_writes(plans, cut, &mut failures);
    report_cut_reads(plans, cut, &mut failures);
    report_heal(plans, heal, acknowledged, &mut failures);
    anyhow::ensure!(failures.is_empty(), "partition test failed:\n- {}", failures.join("\n- "));
    Ok(())
}

/// Milliseconds from `from` to `t`.
fn since(from: Instant, t: Instant) -> u128 {
    t.saturating_duration_since(from).as_millis()
}

/// Prints what the writer did; returns the number of acknowledged writes.
fn report_writes(plans: &[KeyPlan], cut: &CutOutcome, failures: &mut Vec<String>) -> usize {
    let acked: Vec<(Instant, usize)> = cut.writes.iter().filter_map(|w| w.acked).collect();
    let failed_attempts = count_codes(
        cut.writes
            .iter()
            .flat_map(|w| w.failures.iter().flat_map(|(code, n)| std::iter::repeat_n(code.clone(), *n))),
    );
    let through: Vec<usize> = MAJORITY.iter().map(|n| acked.iter().filter(|(_, t)| t == n).count()).collect();
    let mut latencies: Vec<u128> =
        cut.writes.iter().filter_map(|w| w.ack_latency).map(|d| d.as_millis()).collect();
    latencies.sort_unstable();
    let median = latencies.get(latencies.len() / 2).copied().unwrap_or_default();
    let slowest = latencies.last().copied().unwrap_or_default();
    let first = acked.iter().map(|(t, _)| since(cut.at, *t)).min().unwrap_or_default();
    let last = acked.iter().map(|(t, _)| since(cut.at, *t)).max().unwrap_or_default();
    println!(
        "partition: writes during the cut: {} planned, {} acknowledged (through node-0, node-1: {through:?}; first at \
         +{first} ms, last at +{last} ms; acknowledged attempt took {median} ms median, {slowest} ms max), failed \
         attempts {failed_attempts:?}, in flight at the end: {}",
        cut.writes.len(),
        acked.len(),
        cut.writes.iter().filter(|w| w.in_flight_at_end).count()
    );
    let unacked: Vec<&str> =
        cut.writes.iter().filter(|w| w.acked.is_none()).map(|w| plans[w.key].key.as_str()).collect();
    if !unacked.is_empty() {
        failures.push(format!(
            "{} of {} writes through the majority were never acknowledged during the {CUT_FOR:?} cut: {unacked:?}",
            unacked.len(),
            cut.writes.len()
        ));
    }
    acked.len()
}

/// Prints and judges what the readers saw during the cut.
fn report_cut_reads(plans: &[KeyPlan], cut: &CutOutcome, failures: &mut Vec<String>) {
    let verdict = judge_cut(cut, plans);
    println!(
        "partition: reads through node-0/node-1 during the cut: {} (errors {:?}); {} read a written key after its \
         acknowledgement; NOT_FOUND for untouched keys of node-{CUT_NODE}: {}; violations: {}",
        verdict.reads,
        verdict.errors,
        verdict.checked_after_ack,
        verdict.absent_untouched,
        verdict.violations.len()
    );
    if !verdict.violations.is_empty() {
        let mut text = String::new();
        for (r, why) in verdict.violations.iter().take(10) {
            let acked_at = cut
                .writes
                .iter()
                .find(|w| w.key == r.key)
                .and_then(|w| w.acked)
                .map(|(t, _)| since(cut.at, t));
            let _ = write!(
                text,
                "\n  +{} ms node-{} {}: {:?} ({why}; write acknowledged at {acked_at:?} ms)",
                since(cut.at, r.start),
                r.node,
                plans[r.key].key,
                r.seen
            );
        }
        failures.push(format!(
            "{} reads through the majority during the cut broke an acknowledged write:{text}",
            verdict.violations.len()
        ));
    }
    if verdict.checked_after_ack == 0 {
        failures.push("no read during the cut checked an acknowledged write: the test proved nothing".into());
    }
}

/// Prints the staleness window and judges it against the bound.
fn report_heal(plans: &[KeyPlan], heal: &HealOutcome, acknowledged: usize, failures: &mut Vec<String>) {
    let seen = &heal.seen;
    let after_heal =
        |t: Option<Instant>| t.map_or_else(|| "never".to_owned(), |t| format!("+{} ms", since(heal.at, t)));
    let window = seen.converged.map(|t| t.saturating_duration_since(heal.at));
    let window_text = window.map_or_else(
        || format!("> {} ms (not converged)", HEAL_DEADLINE.as_millis()),
        |w| format!("{} ms", w.as_millis()),
    );
    let first = seen.first_wrong.as_deref().unwrap_or_default();
    let by_node: Vec<usize> = (0..NODES).map(|n| first.iter().filter(|r| r.node == n).count()).collect();
    let kinds = count_codes(first.iter().map(|r| format!("{:?}", r.seen)));
    println!(
        "partition: heal: {} read rounds (every key through every node); the first had {} wrong answers (by node \
         {by_node:?}; {kinds:?}); first clean round {}, wrong again after a clean round {} times, last stale answer \
         (a value or NOT_FOUND, not an error) {}, every node sees every member since {}",
        seen.rounds,
        first.len(),
        after_heal(seen.first_clean),
        seen.relapses,
        after_heal(seen.last_stale),
        after_heal(seen.settled_since)
    );
    println!(
        "partition: cut {} s, {acknowledged} writes acknowledged, staleness window after heal {window_text} (bound {} \
         ms)",
        CUT_FOR.as_secs(),
        STALENESS_BOUND.as_millis()
    );
    match window {
        None => failures.push(format!(
            "within {HEAL_DEADLINE:?} of the heal, the nodes never answered every key as last acknowledged for \
             {STABLE_FOR:?} with all members; the last round with wrong answers had {}:{}",
            seen.last_wrong.len(),
            describe(&seen.last_wrong, plans, heal.at)
        )),
        Some(w) if w > STALENESS_BOUND => failures.push(format!(
            "staleness window after the heal {} ms > bound {} ms; the last round with wrong answers had {}:{}",
            w.as_millis(),
            STALENESS_BOUND.as_millis(),
            seen.last_wrong.len(),
            describe(&seen.last_wrong, plans, heal.at)
        )),
        Some(_) => {}
    }
    if !heal.after.is_empty() {
        failures.push(format!(
            "after convergence, {} reads answered other than the latest acknowledged state:{}",
            heal.after.len(),
            describe(&heal.after, plans, heal.at)
        ));
    }
}
