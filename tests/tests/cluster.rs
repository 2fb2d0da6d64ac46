//! A 3-node cluster of real node servers (gRPC over loopback, static discovery) with counting data sources.

use std::{sync::Arc, time::Duration};

use distcache_proto::v1::{
    DeleteRequest, GetManyRequest, GetRequest, PutRequest, StatsRequest, key_result::Outcome,
};
use distcache_tests::{Cluster, KEYSPACES, source_value};
use tonic::Code;

fn get(ks: &str, key: &str) -> GetRequest {
    GetRequest { keyspace: ks.into(), key: key.into() }
}

fn put(ks: &str, key: &str, value: &str) -> PutRequest {
    PutRequest { keyspace: ks.into(), key: key.into(), value: value.to_owned().into(), ttl: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_is_fetched_only_by_its_owner() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, KEYSPACES, Duration::ZERO).await?;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(cluster.client(i).await?);
    }
    for k in 0..300 {
        let key = format!("user:{k}");
        for c in &mut clients {
            let v = c.get(get("rt", &key)).await?.into_inner();
            assert_eq!(v.value, source_value(&key));
        }
        let owner = cluster.owner_of(&key).expect("owner");
        for (i, n) in cluster.nodes.iter().enumerate() {
            let expected = u64::from(i == owner);
            assert_eq!(
                n.source.of(&key),
                expected,
                "{key}: node {} fetched {} times (owner node {})",
                n.name,
                n.source.of(&key),
                owner + 1
            );
        }
    }
    // Every node owns a share of the keys.
    for n in &cluster.nodes {
        assert!(n.source.total() > 50, "{} fetched only {}", n.name, n.source.total());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_gets_of_one_cold_key_cause_one_fetch() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, KEYSPACES, Duration::from_millis(300)).await?;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(cluster.client(i).await?);
    }
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let mut c = clients[i % 3].clone();
        tasks.push(tokio::spawn(async move { c.get(get("rt", "cold-key")).await }));
    }
    for t in tasks {
        let v = t.await??.into_inner();
        assert_eq!(v.value, source_value("cold-key"));
    }
    let total: u64 = cluster.nodes.iter().map(|n| n.source.total()).sum();
    assert_eq!(total, 1, "1000 concurrent Gets across 3 nodes must cause exactly one fetch");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_read_everywhere_and_never_leave_stale_copies() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, KEYSPACES, Duration::ZERO).await?;
    let mut c: Vec<_> = Vec::new();
    for i in 0..3 {
        c.push(cluster.client(i).await?);
    }
    for k in 0..30 {
        let key = format!("session:{k}");
        c[0].put(put("kv", &key, "v1")).await?;
        for cl in &mut c {
            assert_eq!(cl.get(get("kv", &key)).await?.into_inner().value, "v1");
        }
        // Every node has read it (hot copies exist); overwrite through another node.
        c[k % 3].put(put("kv", &key, "v2")).await?;
        for (i, cl) in c.iter_mut().enumerate() {
            assert_eq!(
                cl.get(get("kv", &key)).await?.into_inner().value,
                "v2",
                "node {} served a stale value",
                i + 1
            );
        }
        c[(k + 1) % 3].delete(DeleteRequest { keyspace: "kv".into(), key: key.clone() }).await?;
        for (i, cl) in c.iter_mut().enumerate() {
            let err = cl.get(get("kv", &key)).await.expect_err("deleted");
            assert_eq!(err.code(), Code::NotFound, "node {} still serves a deleted key", i + 1);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_and_negative_ttl_expire() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, KEYSPACES, Duration::ZERO).await?;
    let mut c = cluster.client(0).await?;
    c.put(PutRequest {
        keyspace: "kv".into(),
        key: "short".into(),
        value: "x".to_owned().into(),
        ttl: Some(prost_types::Duration { seconds: 0, nanos: 200_000_000 }),
    })
    .await?;
    let got = c.get(get("kv", "short")).await?.into_inner();
    let ttl = got.ttl.expect("a TTL is reported");
    assert!(ttl.seconds == 0 && ttl.nanos <= 200_000_000, "{ttl:?}");
    distcache_tests::wait_for(Duration::from_secs(3), "the entry expires", || {
        let mut c = c.clone();
        async move {
            match c.get(get("kv", "short")).await {
                Err(e) if e.code() == Code::NotFound => Ok(true),
                Ok(_) => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await?;

    // Negative caching: a missing key is fetched once per negativeTtl (300 ms), not on every Get.
    let owner = cluster.owner_of("missing-1").expect("owner");
    for _ in 0..20 {
        assert_eq!(c.get(get("rt", "missing-1")).await.expect_err("missing").code(), Code::NotFound);
    }
    assert_eq!(cluster.nodes[owner].source.of("missing-1"), 1, "NOT_FOUND is cached");
    // Once the negative entry expires, the next Get reaches the source again.
    let source = &cluster.nodes[owner].source;
    distcache_tests::wait_for(Duration::from_secs(3), "the negative entry expires", || {
        let mut c = c.clone();
        async move {
            let _ = c.get(get("rt", "missing-1")).await;
            Ok(source.of("missing-1") >= 2)
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_bound_holds_under_a_write_flood_and_evictions_are_counted() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, KEYSPACES, Duration::ZERO).await?;
    let mut c = cluster.client(0).await?;
    let value = "x".repeat(1000);
    let entries: Vec<_> = (0..3000)
        .map(|i| distcache_proto::v1::Entry {
            key: format!("flood-{i}"),
            value: value.clone().into(),
            ttl: None,
        })
        .collect();
    for chunk in entries.chunks(500) {
        let r = c
            .put_many(distcache_proto::v1::PutManyRequest {
                keyspace: "small".into(),
                entries: chunk.to_vec(),
            })
            .await?;
        assert!(r.into_inner().results.iter().all(|r| matches!(r.outcome, Some(Outcome::Ok(_)))));
    }
    let mut evictions = 0;
    for i in 0..3 {
        let mut ci = cluster.client(i).await?;
        let stats = ci.stats(StatsRequest { keyspace: "small".into() }).await?.into_inner();
        let s = &stats.keyspaces[0];
        // Main tier 256 KiB + hot tier 32 KiB.
        assert!(s.bytes <= 256 * 1024 + 32 * 1024, "node {}: {} bytes held", i + 1, s.bytes);
        evictions += s.evictions;
    }
    // 3000 entries of ~1.1 KB cannot fit into 3 × 256 KiB: most were evicted, and every eviction is counted.
    assert!(evictions >= 2000, "only {evictions} evictions counted");
    let metrics = reqwest_metrics(cluster.nodes[0].admin).await?;
    assert!(metrics.contains("distcache_evictions_total{keyspace=\"small\"}"), "{metrics}");
    Ok(())
}

async fn reqwest_metrics(admin: std::net::SocketAddr) -> anyhow::Result<String> {
    distcache_tests::http_get(admin, "/metrics").await.map(|(_, body)| body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_keeps_order_and_reports_per_key_errors() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, KEYSPACES, Duration::ZERO).await?;
    let mut c = cluster.client(1).await?;
    let mut keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    keys.insert(5, "missing-a".into());
    keys.insert(17, String::new());
    keys.insert(30, "k3".into()); // duplicate
    let r = c.get_many(GetManyRequest { keyspace: "rt".into(), keys: keys.clone() }).await?.into_inner();
    assert_eq!(r.results.len(), keys.len());
    for (key, res) in keys.iter().zip(&r.results) {
        assert_eq!(&res.key, key);
        match (key.as_str(), &res.outcome) {
            ("missing-a", Some(Outcome::Error(e))) => assert_eq!(e.code, Code::NotFound as i32),
            ("", Some(Outcome::Error(e))) => {
                assert_eq!(e.code, Code::InvalidArgument as i32);
                assert!(e.message.contains("empty"), "{}", e.message);
            }
            (k, Some(Outcome::Value(v))) => assert_eq!(v.value, source_value(k)),
            (k, other) => anyhow::bail!("unexpected result for {k:?}: {other:?}"),
        }
    }
    // Misses of one owner were fetched with fetch_many (batched), each key once.
    let batched: usize = cluster
        .nodes
        .iter()
        .map(|n| n.source.batches.lock().map_or(0, |b| b.iter().filter(|s| **s > 1).count()))
        .sum();
    assert!(batched >= 1, "fetch_many used for batched misses");
    for n in &cluster.nodes {
        assert!(n.source.fetches.lock().is_ok_and(|m| m.values().all(|c| *c == 1)));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_their_status_and_the_node_keeps_serving() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, KEYSPACES, Duration::ZERO).await?;
    let mut c = cluster.client(0).await?;
    let cases: Vec<(PutRequest, Code, &str)> = vec![
        (put("kv", "", "v"), Code::InvalidArgument, "empty"),
        (put("kv", &"k".repeat(4097), "v"), Code::InvalidArgument, "4096"),
        (put("small", "big", &"v".repeat(1025)), Code::InvalidArgument, "maxValueBytes"),
        (put("nope", "k", "v"), Code::FailedPrecondition, "unknown keyspace"),
    ];
    for (req, code, needle) in cases {
        let err = c.put(req).await.expect_err("rejected");
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().contains(needle), "{:?} should mention {needle:?}", err.message());
    }
    let err = c.get(get("kv", &"k".repeat(5000))).await.expect_err("long key");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c.get(get("nope", "k")).await.expect_err("unknown keyspace");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("kv"), "lists known keyspaces: {}", err.message());
    // A key of exactly 4096 bytes and a value of exactly maxValueBytes are fine, and the node still serves.
    c.put(put("kv", &"k".repeat(4096), "v")).await?;
    c.put(put("small", "edge", &"v".repeat(1024))).await?;
    assert_eq!(c.get(get("kv", &"k".repeat(4096))).await?.into_inner().value, "v");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_of_three_nodes_killed_the_others_serve_every_key_within_5s() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, KEYSPACES, Duration::ZERO).await?;
    let keys: Vec<String> = (0..200).map(|i| format!("item:{i}")).collect();
    let mut c1 = cluster.client(0).await?;
    for k in &keys {
        c1.get(get("rt", k)).await?;
    }
    cluster.nodes[2].kill();
    let started = std::time::Instant::now();
    let mut clients = vec![cluster.client(0).await?, cluster.client(1).await?];
    for k in &keys {
        for c in &mut clients {
            let v = tokio::time::timeout(Duration::from_secs(5), c.get(get("rt", k))).await??.into_inner();
            assert_eq!(v.value, source_value(k));
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    // The first reads of node-3's keys found it unreachable (it was still in the ring) and were loaded by the
    // asking node itself, which is counted.
    let fallbacks: u64 = cluster
        .nodes
        .iter()
        .filter_map(|n| n.engine())
        .filter_map(|e| e.stats(Some("rt")).ok())
        .map(|s| s[0].owner_fallbacks)
        .sum();
    assert!(fallbacks > 0, "owner-unreachable loads are counted");
    // And the dead node leaves the ring of both survivors within 5 s.
    cluster.wait_members(2, Duration::from_secs(5)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_peer_that_stops_answering_leaves_and_rejoins() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, KEYSPACES, Duration::ZERO).await?;
    let (grpc, peer, admin) = (cluster.nodes[1].grpc, cluster.nodes[1].peer, cluster.nodes[1].admin);
    cluster.nodes[1].kill();
    let t = std::time::Instant::now();
    cluster.wait_members(2, Duration::from_secs(5)).await?;
    println!("dead peer left the ring after {:?}", t.elapsed());
    let peers: Vec<_> = cluster.nodes.iter().map(|n| n.peer).collect();
    let slot = distcache_tests::Slot::bind_at(grpc, peer, admin)?;
    let config = distcache_tests::static_config(&peers, &cluster.keyspaces_file);
    cluster.nodes[1] = distcache_tests::start_node(
        "node-2",
        slot,
        config,
        distcache_tests::CountingSource::new("node-2", Duration::ZERO),
    )
    .await?;
    cluster.wait_members(3, Duration::from_secs(5)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_different_member_lists_complete_requests() -> anyhow::Result<()> {
    use distcache_tests::{CountingSource, Slot, start_node, static_config};
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("keyspaces.yaml");
    std::fs::write(&file, KEYSPACES)?;
    let (a, b) = (Slot::bind()?, Slot::bind()?);
    let (a_addr, b_addr) = (a.peer_addr()?, b.peer_addr()?);
    // A knows B; B knows A and a third address where nothing runs (so B's ring differs from A's once the ghost
    // is dropped, and B and A disagree on owners while they differ).
    let ghost = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let node_a =
        start_node("a", a, static_config(&[b_addr], &file), CountingSource::new("a", Duration::ZERO)).await?;
    let mut cfg_b = static_config(&[a_addr, ghost], &file);
    cfg_b.discovery = distcache_node::config::DiscoveryConfig::Standalone; // B sees only itself
    let node_b = start_node("b", b, cfg_b, CountingSource::new("b", Duration::ZERO)).await?;
    distcache_tests::wait_until(Duration::from_secs(5), || {
        node_a.engine().is_some_and(|e| e.membership().ring().len() == 2)
    })
    .await?;
    let mut ca = distcache_tests::client(node_a.grpc).await?;
    let mut cb = distcache_tests::client(node_b.grpc).await?;
    for i in 0..100 {
        let key = format!("k{i}");
        let va = tokio::time::timeout(Duration::from_secs(5), ca.get(get("rt", &key))).await??.into_inner();
        let vb = tokio::time::timeout(Duration::from_secs(5), cb.get(get("rt", &key))).await??.into_inner();
        assert_eq!(va.value, source_value(&key));
        assert_eq!(vb.value, source_value(&key));
        tokio::time::timeout(Duration::from_secs(5), ca.put(put("kv", &key, "x"))).await??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_keyspaces_reload_is_refused_and_the_old_keyspaces_keep_serving() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, KEYSPACES, Duration::ZERO).await?;
    let mut c = cluster.client(0).await?;
    c.put(put("kv", "keep", "me")).await?;
    let engines: Vec<Arc<distcache_node::engine::Engine>> =
        cluster.nodes.iter().filter_map(|n| n.engine().cloned()).collect();
    std::fs::write(&cluster.keyspaces_file, "keyspaces:\n  - { name: kv, maxBytes: 12Qi }\n")?;
    distcache_tests::wait_until(Duration::from_secs(5), || {
        engines.iter().all(|e| e.metrics().reloads("refused") >= 1)
    })
    .await?;
    let status = engines[0].keyspaces().status();
    assert!(status.last_error.as_deref().is_some_and(|e| e.contains("maxBytes")), "{status:?}");
    assert_eq!(c.get(get("kv", "keep")).await?.into_inner().value, "me");
    assert_eq!(c.get(get("rt", "x")).await?.into_inner().value, source_value("x"));

    // A valid change applies without restart: a keyspace appears, another disappears, entries stay.
    std::fs::write(
        &cluster.keyspaces_file,
        "keyspaces:\n  - { name: kv, maxBytes: 32Mi }\n  - { name: fresh, maxBytes: 1Mi }\n",
    )?;
    distcache_tests::wait_until(Duration::from_secs(5), || {
        engines.iter().all(|e| e.keyspaces().get("fresh").is_some() && e.keyspaces().get("rt").is_none())
    })
    .await?;
    assert_eq!(c.get(get("kv", "keep")).await?.into_inner().value, "me", "entries survive a resize");
    c.put(put("fresh", "a", "b")).await?;
    assert_eq!(c.get(get("rt", "x")).await.expect_err("removed").code(), Code::FailedPrecondition);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_cannot_reach_a_member_fails_naming_it() -> anyhow::Result<()> {
    // Probes that never give up, so the dead node stays in the ring while we write.
    let mut cluster = Cluster::start_with(3, KEYSPACES, Duration::ZERO, |c| {
        if let distcache_node::config::DiscoveryConfig::Static(s) = &mut c.discovery {
            s.failure_threshold = 1_000_000;
        }
    })
    .await?;
    let mut c = cluster.client(0).await?;
    let key = (0..10_000)
        .map(|i| format!("k{i}"))
        .find(|k| cluster.owner_of(k) == Some(0))
        .expect("a key node-1 owns");
    c.put(put("kv", &key, "v")).await?;
    cluster.nodes[2].kill();
    for err in [
        c.delete(DeleteRequest { keyspace: "kv".into(), key: key.clone() })
            .await
            .expect_err("node-3 is down"),
        c.put(put("kv", &key, "v2")).await.expect_err("node-3 is down"),
    ] {
        assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
        assert!(
            err.message().contains("node-3"),
            "the error names the unreachable member: {}",
            err.message()
        );
    }
    let err = c
        .purge_key_space(distcache_proto::v1::PurgeKeySpaceRequest { keyspace: "kv".into() })
        .await
        .expect_err("node-3 is down");
    assert!(err.message().contains("node-3"), "{}", err.message());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_empties_a_keyspace_on_every_node() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, KEYSPACES, Duration::ZERO).await?;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(cluster.client(i).await?);
    }
    for k in 0..60 {
        clients[0].put(put("kv", &format!("p{k}"), "v")).await?;
    }
    for c in &mut clients {
        for k in 0..60 {
            c.get(get("kv", &format!("p{k}"))).await?;
        }
    }
    let r = clients[1]
        .purge_key_space(distcache_proto::v1::PurgeKeySpaceRequest { keyspace: "kv".into() })
        .await?
        .into_inner();
    assert_eq!(r.nodes, 3);
    for c in &mut clients {
        for k in 0..60 {
            assert_eq!(c.get(get("kv", &format!("p{k}"))).await.expect_err("purged").code(), Code::NotFound);
        }
        let stats = c.stats(StatsRequest { keyspace: "kv".into() }).await?.into_inner();
        assert_eq!(stats.keyspaces[0].entries, 0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_members_streams_the_snapshot_then_changes() -> anyhow::Result<()> {
    use distcache_proto::v1::{WatchMembersRequest, member_event::Type};
    let mut cluster = Cluster::start(3, KEYSPACES, Duration::ZERO).await?;
    let mut c = cluster.client(0).await?;
    let mut stream = c.watch_members(WatchMembersRequest {}).await?.into_inner();
    let mut snapshot = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.message()).await??.expect("event");
        if ev.r#type == Type::SnapshotEnd as i32 {
            break;
        }
        assert_eq!(ev.r#type, Type::Join as i32);
        let m = ev.member.expect("member");
        snapshot.push((m.name, m.local));
    }
    snapshot.sort();
    assert_eq!(
        snapshot,
        vec![("node-1".to_owned(), true), ("node-2".to_owned(), false), ("node-3".to_owned(), false)]
    );
    cluster.nodes[2].kill();
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.message()).await??.expect("event");
    assert_eq!(ev.r#type, Type::Leave as i32);
    assert_eq!(ev.member.map(|m| m.name).as_deref(), Some("node-3"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_invalidates_copies_on_a_node_the_owner_does_not_list() -> anyhow::Result<()> {
    use distcache_tests::{CountingSource, Slot, start_node, static_config};
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("keyspaces.yaml");
    std::fs::write(&file, KEYSPACES)?;
    let (a, b, c) = (Slot::bind()?, Slot::bind()?, Slot::bind()?);
    let (a_addr, b_addr, c_addr) = (a.peer_addr()?, b.peer_addr()?, c.peer_addr()?);
    // A and B list only each other; C lists all three. A never learns about C.
    let node_a =
        start_node("a", a, static_config(&[b_addr], &file), CountingSource::new("a", Duration::ZERO)).await?;
    let node_b =
        start_node("b", b, static_config(&[a_addr], &file), CountingSource::new("b", Duration::ZERO)).await?;
    let node_c = start_node(
        "c",
        c,
        static_config(&[a_addr, b_addr, c_addr], &file),
        CountingSource::new("c", Duration::ZERO),
    )
    .await?;
    distcache_tests::wait_until(Duration::from_secs(5), || {
        node_c.engine().is_some_and(|e| e.membership().ring().len() == 3)
            && node_a.engine().is_some_and(|e| e.membership().ring().len() == 2)
            && node_b.engine().is_some_and(|e| e.membership().ring().len() == 2)
    })
    .await?;
    let ring_c = node_c.engine().expect("running").membership().ring();
    let key = (0..10_000)
        .map(|i| format!("k{i}"))
        .find(|k| ring_c.owner(distcache_node::ring::key_hash(k)).is_some_and(|m| m.name == "a"))
        .expect("a key that C routes to A");
    let mut ca = distcache_tests::client(node_a.grpc).await?;
    let mut cc = distcache_tests::client(node_c.grpc).await?;
    ca.put(put("kv", &key, "v1")).await?;
    assert_eq!(cc.get(get("kv", &key)).await?.into_inner().value, "v1", "C now holds a hot copy");
    ca.put(put("kv", &key, "v2")).await?;
    assert_eq!(cc.get(get("kv", &key)).await?.into_inner().value, "v2", "C's copy was invalidated");
    ca.delete(DeleteRequest { keyspace: "kv".into(), key: key.clone() }).await?;
    assert_eq!(cc.get(get("kv", &key)).await.expect_err("deleted").code(), Code::NotFound);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_comes_back_under_its_name_with_a_new_address_is_served() -> anyhow::Result<()> {
    // A recreated pod keeps its name and gets a new address. The owner records who holds copies of its keys per
    // caller; a second caller address for a known name once deadlocked the owner (its map locked itself).
    let cluster = Cluster::start(1, KEYSPACES, Duration::ZERO).await?;
    let addr = cluster.nodes[0].peer;
    let mut peer = distcache_proto::v1::peer_client::PeerClient::connect(format!("http://{addr}")).await?;
    for from_address in ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:2", "127.0.0.1:3"] {
        let request = distcache_proto::v1::LoadRequest {
            keyspace: "rt".into(),
            keys: vec!["k".into()],
            from: "node-recreated".into(),
            from_address: from_address.into(),
            forwarded: false,
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), peer.load(request)).await;
        assert!(matches!(answer, Ok(Ok(_))), "load from {from_address}: {answer:?}");
    }
    let mut c = cluster.client(0).await?;
    assert_eq!(c.get(get("rt", "k")).await?.into_inner().value, source_value("k"), "still serving");
    let engine = cluster.nodes[0].engine().expect("running");
    assert_eq!(engine.copy_holders(), vec![("node-recreated".to_owned(), "127.0.0.1:3".to_owned())]);
    // A caller that names an address on another host than its own is not recorded: the owner would dial it.
    let request = distcache_proto::v1::LoadRequest {
        keyspace: "rt".into(),
        keys: vec!["k".into()],
        from: "elsewhere".into(),
        from_address: "192.0.2.7:7422".into(),
        forwarded: false,
    };
    peer.load(request).await?;
    assert!(engine.copy_holders().iter().all(|(name, _)| name != "elsewhere"), "{:?}", engine.copy_holders());
    Ok(())
}
