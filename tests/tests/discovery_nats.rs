//! NATS discovery against a real `nats-server` (started per test on a spare loopback address, killed at the end):
//! nodes started together agree on one ring, a graceful stop leaves at once, a killed node expires, a NATS outage
//! keeps the last members and recovers, an unreachable NATS is explained, and a joining node takes over its keys.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use distcache_proto::v1::GetRequest;
use distcache_tests::{
    CountingSource, KEYSPACES, NatsServer, Slot, TestNode, client, http_get, nats_config, source_value,
    start_node, wait_for,
};

/// The heartbeat of most tests.
const HEARTBEAT: Duration = Duration::from_millis(200);

/// A NATS server and a keyspaces file shared by a test's nodes.
struct Bed {
    nats: NatsServer,
    _dir: tempfile::TempDir,
    keyspaces_file: PathBuf,
    subject: String,
}

impl Bed {
    fn new(subject: &str) -> anyhow::Result<Self> {
        let nats = NatsServer::start()?;
        let dir = tempfile::tempdir()?;
        let keyspaces_file = dir.path().join("keyspaces.yaml");
        std::fs::write(&keyspaces_file, KEYSPACES)?;
        Ok(Self { nats, _dir: dir, keyspaces_file, subject: subject.to_owned() })
    }

    async fn node(&self, name: &str, heartbeat: Duration, missed: u32) -> anyhow::Result<TestNode> {
        self.node_at(&self.nats.url, name, heartbeat, missed).await
    }

    async fn node_at(
        &self,
        url: &str,
        name: &str,
        heartbeat: Duration,
        missed: u32,
    ) -> anyhow::Result<TestNode> {
        let config = nats_config(url, &self.subject, heartbeat, missed, &self.keyspaces_file);
        start_node(name, Slot::bind()?, config, CountingSource::new(name, Duration::ZERO)).await
    }

    /// Starts `names` at the same moment.
    async fn nodes(&self, names: &[&str], heartbeat: Duration, missed: u32) -> anyhow::Result<Vec<TestNode>> {
        futures::future::try_join_all(names.iter().map(|n| self.node(n, heartbeat, missed))).await
    }
}

/// The member names of a node's ring, sorted (empty for a stopped node).
fn ring(node: &TestNode) -> Vec<String> {
    let mut names: Vec<String> = node
        .engine()
        .map(|e| e.membership().ring().members().iter().map(|m| m.name.clone()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn names(of: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = of.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

/// Waits until every node in `nodes` has exactly the members `expected`.
async fn wait_ring(nodes: &[&TestNode], expected: &[&str], within: Duration) -> anyhow::Result<()> {
    let expected = names(expected);
    let what = format!("every node's ring is {expected:?}");
    wait_for(within, &what, || {
        let ok = nodes.iter().all(|n| ring(n) == expected);
        std::future::ready(Ok(ok))
    })
    .await
    .map_err(|e| {
        let seen: Vec<_> = nodes.iter().map(|n| (n.name.clone(), ring(n))).collect();
        anyhow::anyhow!("{e}; seen: {seen:?}")
    })
}

/// Checks `cond` every 20 ms for `period`; fails at the first time it does not hold.
async fn holds_for<F, Fut>(period: Duration, what: &str, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let end = Instant::now() + period;
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    while Instant::now() < end {
        ticker.tick().await;
        anyhow::ensure!(cond().await?, "{what}: stopped holding");
    }
    Ok(())
}

/// `/admin/peers` `discoveryProblem` of a node.
async fn discovery_problem(node: &TestNode) -> anyhow::Result<Option<String>> {
    let (status, body) = http_get(node.admin, "/admin/peers").await?;
    anyhow::ensure!(status == 200, "/admin/peers answered {status}: {body}");
    let json: serde_json::Value = serde_json::from_str(&body)?;
    Ok(json["discoveryProblem"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_together_form_one_ring_and_a_fourth_joins() -> anyhow::Result<()> {
    let bed = Bed::new("distcache.join")?;
    // A heartbeat of 500 ms is also the settle window: the first member set comes after it.
    let heartbeat = Duration::from_millis(500);
    let mut nodes = bed.nodes(&["node-1", "node-2", "node-3"], heartbeat, 3).await?;
    wait_for(Duration::from_secs(5), "every node is ready", || {
        std::future::ready(Ok(nodes.iter().all(|n| n.engine().is_some_and(|e| e.membership().is_known()))))
    })
    .await?;
    // Settled: each node's first member set already holds everybody (no partial rings that later merge).
    for n in &nodes {
        assert_eq!(
            ring(n),
            names(&["node-1", "node-2", "node-3"]),
            "{} became ready with a partial ring",
            n.name
        );
    }

    nodes.push(bed.node("node-4", heartbeat, 3).await?);
    let all: Vec<&TestNode> = nodes.iter().collect();
    wait_ring(&all, &["node-1", "node-2", "node-3", "node-4"], Duration::from_secs(5)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_says_goodbye_and_leaves_at_once() -> anyhow::Result<()> {
    let bed = Bed::new("distcache.leave")?;
    // Expiry 25 × 200 ms = 5 s: leaving well before that can only be the goodbye.
    let mut nodes = bed.nodes(&["node-1", "node-2", "node-3"], HEARTBEAT, 25).await?;
    let all: Vec<&TestNode> = nodes.iter().collect();
    wait_ring(&all, &["node-1", "node-2", "node-3"], Duration::from_secs(5)).await?;

    let started = Instant::now();
    nodes[2].stop().await?;
    let rest: Vec<&TestNode> = nodes[..2].iter().collect();
    wait_ring(&rest, &["node-1", "node-2"], Duration::from_secs(2)).await?;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "goodbye took {took:?} (expiry is 5 s)");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_expires_after_its_missed_heartbeats() -> anyhow::Result<()> {
    let bed = Bed::new("distcache.kill")?;
    let mut nodes = bed.nodes(&["node-1", "node-2", "node-3"], HEARTBEAT, 3).await?;
    let all: Vec<&TestNode> = nodes.iter().collect();
    wait_ring(&all, &["node-1", "node-2", "node-3"], Duration::from_secs(5)).await?;

    let killed = Instant::now();
    nodes[2].kill();
    let rest: Vec<&TestNode> = nodes[..2].iter().collect();
    wait_ring(&rest, &["node-1", "node-2"], Duration::from_secs(5)).await?;
    let took = killed.elapsed();
    // Expiry is 3 × 200 ms; its last heartbeat was at most one interval before the kill.
    assert!(took >= Duration::from_millis(350), "a killed node left after {took:?}, before its expiry");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_keeps_the_members_and_recovers() -> anyhow::Result<()> {
    let mut bed = Bed::new("distcache.restart")?;
    let mut nodes = bed.nodes(&["node-1", "node-2", "node-3"], HEARTBEAT, 3).await?;
    let three = ["node-1", "node-2", "node-3"];
    {
        let all: Vec<&TestNode> = nodes.iter().collect();
        wait_ring(&all, &three, Duration::from_secs(5)).await?;
    }

    bed.nats.kill();
    wait_for(Duration::from_secs(5), "node-1 reports the lost NATS connection", || async {
        Ok(discovery_problem(&nodes[0]).await?.is_some())
    })
    .await?;
    // Down for more than twice the expiry (600 ms): nobody expires, everybody stays ready with a warning.
    holds_for(Duration::from_millis(1500), "every node keeps 3 members while NATS is down", || {
        std::future::ready(Ok(nodes.iter().all(|n| ring(n) == names(&three))))
    })
    .await?;
    for n in &nodes {
        let (status, body) = http_get(n.admin, "/readyz").await?;
        assert_eq!(status, 200, "{}: /readyz while NATS is down: {body}", n.name);
        assert!(body.contains("warning") && body.contains("nats"), "{}: /readyz says {body:?}", n.name);
        let problem = discovery_problem(n).await?;
        assert!(
            problem.as_deref().is_some_and(|p| p.contains(&bed.nats.url)),
            "{}: problem {problem:?}",
            n.name
        );
    }

    bed.nats.restart()?;
    for n in &nodes {
        wait_for(Duration::from_secs(10), "discovery recovers after the NATS restart", || async {
            Ok(discovery_problem(n).await?.is_none())
        })
        .await?;
    }
    // Fresh timestamps after the reconnect: nobody expired in the meantime.
    for n in &nodes {
        assert_eq!(ring(n), names(&three), "{} after the reconnect", n.name);
    }
    nodes.push(bed.node("node-4", HEARTBEAT, 3).await?);
    let all: Vec<&TestNode> = nodes.iter().collect();
    wait_ring(&all, &["node-1", "node-2", "node-3", "node-4"], Duration::from_secs(5)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_is_explained_and_the_node_is_not_ready() -> anyhow::Result<()> {
    let bed = Bed::new("distcache.nowhere")?;
    // A port that was free a moment ago: nothing listens there.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let url = format!("nats://{nowhere}");
    let node = bed.node_at(&url, "node-1", HEARTBEAT, 3).await?;

    wait_for(Duration::from_secs(5), "/readyz explains the NATS connection problem", || async {
        let (status, body) = http_get(node.admin, "/readyz").await?;
        Ok(status == 503 && body.contains("cannot connect") && body.contains(&url))
    })
    .await?;
    let (_, metrics) = http_get(node.admin, "/metrics").await?;
    let errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("distcache_discovery_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no distcache_discovery_errors_total in /metrics:\n{metrics}"))?;
    assert!(errors > 0.0, "distcache_discovery_errors_total is {errors}");
    assert!(!node.engine().is_some_and(|e| e.membership().is_known()), "membership known without NATS");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_join_keys_move_to_their_new_owner_without_a_fetch() -> anyhow::Result<()> {
    let bed = Bed::new("distcache.owners")?;
    let mut nodes = bed.nodes(&["node-1", "node-2", "node-3"], HEARTBEAT, 3).await?;
    {
        let all: Vec<&TestNode> = nodes.iter().collect();
        wait_ring(&all, &["node-1", "node-2", "node-3"], Duration::from_secs(5)).await?;
    }
    let keys: Vec<String> = (0..200).map(|k| format!("user:{k}")).collect();
    get_everywhere(&nodes, &keys).await?;
    let owner_before: Vec<String> =
        keys.iter().map(|k| owner(&nodes[0], k)).collect::<anyhow::Result<_>>()?;
    let before: Vec<Vec<u64>> = keys.iter().map(|k| nodes.iter().map(|n| n.source.of(k)).collect()).collect();

    nodes.push(bed.node("node-4", HEARTBEAT, 3).await?);
    {
        let all: Vec<&TestNode> = nodes.iter().collect();
        wait_ring(&all, &["node-1", "node-2", "node-3", "node-4"], Duration::from_secs(5)).await?;
    }
    get_everywhere(&nodes, &keys).await?;

    let mut moved = 0;
    for (k, key) in keys.iter().enumerate() {
        let now = owner(&nodes[0], key)?;
        for n in &nodes[1..] {
            assert_eq!(owner(n, key)?, now, "{key}: {} disagrees on the owner", n.name);
        }
        for (i, n) in nodes.iter().enumerate() {
            let earlier = before[k].get(i).copied().unwrap_or(0);
            let fetched = n.source.of(key) - earlier;
            // A key that moved to the new node was handed to it (or asked of its previous owner): no fetch anywhere.
            assert_eq!(fetched, 0, "{key}: {} fetched it again after the join (owner now {now})", n.name);
        }
        if now != owner_before[k] {
            assert_eq!(now, "node-4", "{key} moved from {} to {now}, not to the new node", owner_before[k]);
            moved += 1;
        }
    }
    assert!(moved > 10, "only {moved} of 200 keys moved to the new node");
    Ok(())
}

/// The member that owns `key` in `node`'s ring.
fn owner(node: &TestNode, key: &str) -> anyhow::Result<String> {
    let engine = node.engine().ok_or_else(|| anyhow::anyhow!("{} is stopped", node.name))?;
    let ring = engine.membership().ring();
    let owner = ring
        .owner(distcache_node::ring::key_hash(key))
        .ok_or_else(|| anyhow::anyhow!("{}: empty ring", node.name))?;
    Ok(owner.name.clone())
}

/// Gets every key in the read-through keyspace through every node and checks the values.
async fn get_everywhere(nodes: &[TestNode], keys: &[String]) -> anyhow::Result<()> {
    for n in nodes {
        let mut c = client(n.grpc).await?;
        for key in keys {
            let v = c.get(GetRequest { keyspace: "rt".into(), key: key.clone() }).await?.into_inner();
            assert_eq!(v.value, source_value(key), "{key} through {}", n.name);
        }
    }
    Ok(())
}
