//! Real processes: three `distcache-node` binaries on loopback with static discovery, driven by the `distcache`
//! CLI as a user would, plus gRPC health and reflection on the same port.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use distcache_tests::{built_binary, http_get, wait_for};

/// A node process, killed (by its PID) when dropped.
struct NodeProcess {
    child: Child,
    grpc: SocketAddr,
    peer: SocketAddr,
    admin: SocketAddr,
}

/// A node's client, peer and admin addresses.
#[derive(Clone, Copy)]
struct Addrs {
    grpc: SocketAddr,
    peer: SocketAddr,
    admin: SocketAddr,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_configs(dir: &Path, n: usize) -> anyhow::Result<Vec<Addrs>> {
    let addrs: Vec<Addrs> = distcache_tests::spare_addrs(3 * n)?
        .chunks_exact(3)
        .map(|a| Addrs { grpc: a[0], peer: a[1], admin: a[2] })
        .collect();
    let peers: Vec<String> = addrs.iter().map(|a| format!("\"{}\"", a.peer)).collect();
    std::fs::write(
        dir.join("keyspaces.yaml"),
        "keyspaces:\n  - { name: users, maxBytes: 16Mi, ttl: 5m }\n  - { name: sessions, maxBytes: 1Mi, maxValueBytes: 1Ki }\n",
    )?;
    for (i, Addrs { grpc, peer, admin }) in addrs.iter().enumerate() {
        std::fs::write(
            dir.join(format!("node-{}.yaml", i + 1)),
            format!(
                "name: node-{}\nlisten: {grpc}\npeerListen: {peer}\nadvertise: {peer}\nadmin: {admin}\n\
                 discovery:\n  static: {{ peers: [{}], probeInterval: 250ms }}\n\
                 keyspacesFile: ./keyspaces.yaml\nkeyspacesPollInterval: 100ms\n",
                i + 1,
                peers.join(", ")
            ),
        )?;
    }
    Ok(addrs)
}

fn spawn_node(dir: &Path, i: usize, Addrs { grpc, peer, admin }: Addrs) -> anyhow::Result<NodeProcess> {
    let log = std::fs::File::create(dir.join(format!("node-{}.log", i + 1)))?;
    let child = Command::new(built_binary("distcache-node")?)
        .arg("--config")
        .arg(dir.join(format!("node-{}.yaml", i + 1)))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    Ok(NodeProcess { child, grpc, peer, admin })
}

/// Waits until every node is ready and sees `n` members, reading the node logs into the error on timeout.
async fn wait_cluster(dir: &Path, nodes: &[NodeProcess], n: usize) -> anyhow::Result<()> {
    let all_ready = wait_for(Duration::from_secs(20), "every node ready with all members", || async {
        for node in nodes {
            let ready = matches!(http_get(node.admin, "/readyz").await, Ok((200, _)));
            let members = match http_get(node.admin, "/admin/peers").await {
                Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["members"].as_array().map(Vec::len))
                    .unwrap_or(0),
                _ => 0,
            };
            if !(ready && members == n) {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await;
    all_ready.map_err(|e| {
        let logs: Vec<String> = (1..=nodes.len())
            .map(|i| std::fs::read_to_string(dir.join(format!("node-{i}.log"))).unwrap_or_default())
            .collect();
        e.context(format!("node logs:\n{}", logs.join("\n---\n")))
    })
}

fn cli(endpoint: SocketAddr, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(built_binary("distcache")?)
        .arg("--endpoint")
        .arg(format!("http://{endpoint}"))
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_processes_serve_the_cli() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let addrs = write_configs(dir.path(), 3)?;
    let mut nodes = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        nodes.push(spawn_node(dir.path(), i, *a)?);
    }
    wait_cluster(dir.path(), &nodes, 3).await?;
    let (n1, n2, n3) = (nodes[0].grpc, nodes[1].grpc, nodes[2].grpc);

    // A write on node 1 is read on nodes 2 and 3.
    let o = cli(n1, &["put", "users", "alice", "{\"name\":\"Alice\"}"])?;
    assert!(o.status.success(), "put failed: {}", stderr(&o));
    for node in [n2, n3] {
        let o = cli(node, &["get", "users", "alice"])?;
        assert!(o.status.success(), "get failed: {}", stderr(&o));
        assert_eq!(stdout(&o).trim_end(), "{\"name\":\"Alice\"}");
    }
    let o = cli(n3, &["--json", "get", "users", "alice"])?;
    let v: serde_json::Value = serde_json::from_str(&stdout(&o))?;
    assert_eq!(v["value"], "{\"name\":\"Alice\"}");
    assert!(v["ttl_ms"].as_u64().is_some_and(|t| t > 0 && t <= 300_000), "{v}");

    // A missing key: exit code 3 and "not found" on stderr, distinct from other errors (1).
    let o = cli(n2, &["get", "users", "nobody"])?;
    assert_eq!(o.status.code(), Some(3), "stderr: {}", stderr(&o));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));
    let o = cli(n2, &["get", "nokeyspace", "x"])?;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown keyspace"), "{}", stderr(&o));
    let o = cli(n2, &["put", "sessions", "big", &"x".repeat(2000)])?;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("maxValueBytes"), "{}", stderr(&o));

    // Delete through node 3: gone everywhere.
    let o = cli(n3, &["delete", "users", "alice"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    for node in [n1, n2, n3] {
        assert_eq!(cli(node, &["get", "users", "alice"])?.status.code(), Some(3));
    }

    // Introspection commands, human and JSON.
    let o = cli(n1, &["--json", "members"])?;
    let members: serde_json::Value = serde_json::from_str(&stdout(&o))?;
    let list = members.as_array().or_else(|| members["members"].as_array()).cloned().unwrap_or_default();
    assert_eq!(list.len(), 3, "{members}");
    let o = cli(n1, &["keyspaces"])?;
    assert!(stdout(&o).contains("users") && stdout(&o).contains("sessions"), "{}", stdout(&o));
    let o = cli(n2, &["--json", "stats", "users"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_str(&stdout(&o))?;
    assert!(stats.to_string().contains("hot_hits"), "{stats}");

    // /metrics carries the contract names.
    let (code, metrics) = http_get(nodes[0].admin, "/metrics").await?;
    assert_eq!(code, 200);
    for name in [
        "distcache_requests_total",
        "distcache_cache_hits_total",
        "distcache_cache_misses_total",
        "distcache_entries",
        "distcache_bytes",
        "distcache_evictions_total",
        "distcache_members 3",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }

    client_port_serves_only_client_services(n1, nodes[0].peer).await?;

    // An invalid keyspaces edit is refused; the nodes keep serving the old keyspaces.
    cli(n1, &["put", "users", "bob", "b"])?;
    std::fs::write(dir.path().join("keyspaces.yaml"), "keyspaces:\n  - { name: users, maxBytes: -5 }\n")?;
    wait_for(Duration::from_secs(5), "the invalid reload is refused and reported", || async {
        let (_, body) = http_get(nodes[1].admin, "/admin/keyspaces").await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v["lastError"].as_str().is_some_and(|e| e.contains("maxBytes")))
    })
    .await?;
    assert_eq!(stdout(&cli(n2, &["get", "users", "bob"])?).trim_end(), "b");

    // SIGTERM: every node exits cleanly.
    for node in &mut nodes {
        let pid = node.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
    }
    for node in &mut nodes {
        let mut exit = None;
        wait_for(Duration::from_secs(10), "node stops after SIGTERM", || {
            let polled = node.child.try_wait().map_err(anyhow::Error::from);
            if let Ok(Some(code)) = &polled {
                exit = Some(*code);
            }
            std::future::ready(polled.map(|code| code.is_some()))
        })
        .await?;
        assert!(exit.is_some_and(|s| s.success()), "node exited with {exit:?}");
    }
    Ok(())
}

/// gRPC health and reflection answer on the client port (so grpcurl works without the .proto files); the
/// internal Peer service is not there (UNIMPLEMENTED, not listed), only on the peer port.
async fn client_port_serves_only_client_services(n1: SocketAddr, peer: SocketAddr) -> anyhow::Result<()> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{n1}"))?.connect().await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest { service: "distcache.v1.Cache".into() })
        .await?
        .into_inner();
    assert_eq!(serving.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let services = reflection_services(channel.clone()).await?;
    for s in ["distcache.v1.Cache", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|x| x == s), "{s} not listed by reflection: {services:?}");
    }
    assert!(
        !services.iter().any(|x| x == "distcache.v1.Peer"),
        "Peer listed on the client port: {services:?}"
    );
    let purge =
        distcache_proto::v1::PurgeRequest { keyspace: "users".into(), from: "x".into(), hot_only: false };
    let refused = distcache_proto::v1::peer_client::PeerClient::new(channel).purge(purge).await;
    assert_eq!(refused.map(|_| ()).map_err(|s| s.code()), Err(tonic::Code::Unimplemented));
    let peer_channel = tonic::transport::Channel::from_shared(format!("http://{peer}"))?.connect().await?;
    let mut peer_client = distcache_proto::v1::peer_client::PeerClient::new(peer_channel);
    let pong = peer_client.ping(distcache_proto::v1::PingRequest { from: "test".into() }).await?.into_inner();
    assert_eq!((pong.name.as_str(), pong.address.as_str()), ("node-1", peer.to_string().as_str()));

    Ok(())
}

async fn reflection_services(channel: tonic::transport::Channel) -> anyhow::Result<Vec<String>> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client.server_reflection_info(futures::stream::iter(vec![req])).await?.into_inner();
    let mut names = Vec::new();
    if let Some(resp) = futures::StreamExt::next(&mut stream).await
        && let Some(MessageResponse::ListServicesResponse(list)) = resp?.message_response
    {
        names = list.service.into_iter().map(|s| s.name).collect();
    }
    Ok(names)
}
