//! DNS discovery against a real authoritative DNS server (hickory-server, in-process, on 127.0.0.1): nodes find
//! each other through SRV records (else A records), and follow the zone as it changes.

use std::{collections::BTreeSet, net::SocketAddr, path::Path, time::Duration};

use distcache_node::{
    NodeConfig,
    config::{DiscoveryConfig, DnsDiscovery},
};
use distcache_proto::v1::{GetRequest, PutRequest};
use distcache_tests::{
    CountingSource, KEYSPACES, Slot, TestNode, dns::DnsServer, start_node, static_config, wait_until,
};

/// The harness's node config (fast keyspace polling, short peer timeout) with DNS discovery of `name`.
fn dns_config(server: SocketAddr, name: &str, keyspaces_file: &Path) -> NodeConfig {
    let mut config = static_config(&[], keyspaces_file);
    config.discovery = DiscoveryConfig::Dns(DnsDiscovery {
        name: name.to_owned(),
        port: 7420,
        interval: distcache_api::DurationString(Duration::from_millis(200)),
        nameservers: vec![server],
        probe_interval: distcache_api::DurationString(Duration::from_millis(250)),
        failure_threshold: 3,
    });
    config
}

fn names(node: &TestNode) -> BTreeSet<String> {
    node.engine()
        .map(|e| e.membership().ring().members().iter().map(|m| m.name.clone()).collect())
        .unwrap_or_default()
}

async fn all_see(nodes: &[&TestNode], expected: &[&str], what: &str) -> anyhow::Result<()> {
    let expected: BTreeSet<String> = expected.iter().map(|s| (*s).to_owned()).collect();
    wait_until(Duration::from_secs(15), || nodes.iter().all(|n| names(n) == expected)).await.map_err(|e| {
        anyhow::anyhow!("{what}: {e}; seen: {:?}", nodes.iter().map(|n| names(n)).collect::<Vec<_>>())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_follow_the_srv_records_of_a_name() -> anyhow::Result<()> {
    let dns = DnsServer::start("distcache.test.").await?;
    let peers = dns.fqdn("peers");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("keyspaces.yaml");
    std::fs::write(&file, KEYSPACES)?;
    let slots: Vec<Slot> = (0..4).map(|_| Slot::bind()).collect::<anyhow::Result<_>>()?;
    let addrs: Vec<SocketAddr> = slots.iter().map(Slot::peer_addr).collect::<anyhow::Result<_>>()?;
    for i in 0..addrs.len() {
        dns.set_a(&dns.fqdn(&format!("node-{}", i + 1)), &[std::net::Ipv4Addr::LOCALHOST], 1).await?;
    }
    let srv = |n: usize| -> Vec<(String, u16)> {
        (0..n).map(|i| (dns.fqdn(&format!("node-{}", i + 1)), addrs[i].port())).collect()
    };
    dns.set_srv(&peers, &srv(3), 1).await?;

    // Three nodes started together end in one ring.
    let mut nodes = Vec::new();
    for (i, slot) in slots.into_iter().enumerate() {
        let name = format!("node-{}", i + 1);
        nodes.push(
            start_node(
                &name,
                slot,
                dns_config(dns.addr, &peers, &file),
                CountingSource::new(&name, Duration::ZERO),
            )
            .await?,
        );
    }
    let first3: Vec<&TestNode> = nodes.iter().take(3).collect();
    all_see(&first3, &["node-1", "node-2", "node-3"], "three nodes from SRV").await?;

    // Join: node-4 (running, but not yet in the zone) appears in the SRV set.
    dns.set_srv(&peers, &srv(4), 1).await?;
    let all: Vec<&TestNode> = nodes.iter().collect();
    all_see(&all, &["node-1", "node-2", "node-3", "node-4"], "node-4 joined through DNS").await?;

    // After the change, every key is fetched once cluster-wide, by its owner, and a write through one node is
    // read back through every node.
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(distcache_tests::client(n.grpc).await?);
    }
    for k in 0..40 {
        let key = format!("user:{k}");
        for c in &mut clients {
            c.get(GetRequest { keyspace: "rt".into(), key: key.clone() }).await?;
        }
        let fetches: u64 = nodes.iter().map(|n| n.source.of(&key)).sum();
        assert_eq!(fetches, 1, "{key} fetched {fetches} times");
        let value = format!("written-{k}");
        clients[k % 4]
            .put(PutRequest {
                keyspace: "rt".into(),
                key: key.clone(),
                value: value.clone().into(),
                ttl: None,
            })
            .await?;
        for c in &mut clients {
            let got = c.get(GetRequest { keyspace: "rt".into(), key: key.clone() }).await?.into_inner().value;
            assert_eq!(got, value.as_bytes(), "{key}");
        }
    }

    // Leave: node-2 removed from the zone leaves every other node's ring.
    dns.set_srv(&peers, &[srv(4)[0].clone(), srv(4)[2].clone(), srv(4)[3].clone()], 1).await?;
    let rest: Vec<&TestNode> = nodes.iter().filter(|n| n.name != "node-2").collect();
    all_see(&rest, &["node-1", "node-3", "node-4"], "node-2 left through DNS").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_srv_records_a_records_and_the_configured_port_are_used() -> anyhow::Result<()> {
    let dns = DnsServer::start("distcache.test.").await?;
    let flat = dns.fqdn("flat");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("keyspaces.yaml");
    std::fs::write(&file, KEYSPACES)?;
    // Two nodes on the same port of two loopback addresses, as pods behind a headless Service are.
    let first = std::net::TcpListener::bind("127.0.0.2:0")?;
    let port = first.local_addr()?.port();
    drop(first);
    let ips = [std::net::Ipv4Addr::new(127, 0, 0, 2), std::net::Ipv4Addr::new(127, 0, 0, 3)];
    let mut nodes = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let any = SocketAddr::new((*ip).into(), 0);
        let slot = Slot::bind_at(any, SocketAddr::new((*ip).into(), port), any)?;
        let mut config = dns_config(dns.addr, &flat, &file);
        if let DiscoveryConfig::Dns(d) = &mut config.discovery {
            d.port = port;
        }
        let name = format!("flat-{}", i + 1);
        nodes.push(start_node(&name, slot, config, CountingSource::new(&name, Duration::ZERO)).await?);
    }
    dns.set_a(&flat, &ips, 1).await?;
    let all: Vec<&TestNode> = nodes.iter().collect();
    all_see(&all, &["flat-1", "flat-2"], "two nodes from A records").await?;
    // The name disappears (no ready endpoints): each node is alone.
    dns.set_a(&flat, &[], 1).await?;
    wait_until(Duration::from_secs(15), || nodes.iter().all(|n| names(n).len() == 1)).await?;
    Ok(())
}
