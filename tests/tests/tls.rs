//! TLS on real listeners: the client port serves TLS, the peer port requires mutual TLS with a peer identity,
//! certificates rotate without a restart (a Secret-style `..data` swap under a reader loop), a CA rolls over,
//! bad material is refused while the old keeps serving, and keyspace access lists are enforced per operation.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use distcache_node::config::{AdminConfig, NodeConfig};
use distcache_proto::v1::{
    GetRequest, PingRequest, PutRequest, cache_client::CacheClient, peer_client::PeerClient,
};
use distcache_tests::{
    CountingSource, Slot, TestNode, start_node, static_config,
    tls::{SecretDir, app_config, channel, https_get, served_serial},
    wait_for,
};
use distcache_tls::{
    ClientAuth, TlsSettings,
    pki::{Ca, Leaf, LeafOptions, Usage},
    rustls_pki_types::pem::PemObject,
};
use tonic::transport::Channel;

const KEYSPACES: &str = "keyspaces:
  - { name: kv, maxBytes: 16Mi }
  - name: users
    maxBytes: 16Mi
    access: { read: [reader.test, writer.test], write: [writer.test] }
";

/// The SANs every node certificate of these tests carries: the nodes share one identity, as pods sharing one
/// Secret do.
const NODE_SANS: &[&str] = &["127.0.0.1", "localhost"];

struct TlsCluster {
    nodes: Vec<TestNode>,
    secrets: Vec<SecretDir>,
    _dir: tempfile::TempDir,
}

/// Starts `n` nodes with static discovery over their peer ports, each with its own Secret-style directory
/// holding `leaf` and `ca_pem`.
async fn start(
    n: usize,
    leaf: &Leaf,
    ca_pem: &str,
    tweak: impl Fn(&mut NodeConfig),
) -> anyhow::Result<TlsCluster> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("keyspaces.yaml");
    std::fs::write(&file, KEYSPACES)?;
    let slots: Vec<Slot> = (0..n).map(|_| Slot::bind()).collect::<anyhow::Result<_>>()?;
    let peers: Vec<SocketAddr> = slots.iter().map(Slot::peer_addr).collect::<anyhow::Result<_>>()?;
    let mut nodes = Vec::new();
    let mut secrets = Vec::new();
    for (i, slot) in slots.into_iter().enumerate() {
        let name = format!("node-{}", i + 1);
        let secret = SecretDir::create(&dir.path().join(&name), leaf, ca_pem)?;
        let mut config = static_config(&peers, &file);
        config.tls = Some(TlsSettings {
            files: secret.files(),
            client_auth: ClientAuth::None,
            peer_identities: Vec::new(),
        });
        tweak(&mut config);
        nodes.push(start_node(&name, slot, config, CountingSource::new(&name, Duration::ZERO)).await?);
        secrets.push(secret);
    }
    let cluster = TlsCluster { nodes, secrets, _dir: dir };
    wait_for(Duration::from_secs(10), "every node sees every member over mutual TLS", || async {
        Ok(cluster.nodes.iter().all(|t| t.engine().is_some_and(|e| e.membership().ring().len() == n)))
    })
    .await?;
    Ok(cluster)
}

async fn tls_client(
    addr: SocketAddr,
    ca_pem: &str,
    leaf: Option<&Leaf>,
) -> anyhow::Result<CacheClient<Channel>> {
    Ok(CacheClient::new(channel(addr, app_config(ca_pem, leaf)?, "localhost").await?))
}

/// Dials a peer port as a peer would, presenting `leaf` (which must chain to `trusted_ca` for our side to
/// accept the node's certificate) and pings.
async fn peer_ping(addr: SocketAddr, trusted_ca: &str, leaf: &Leaf) -> anyhow::Result<String> {
    let ch = channel(addr, app_config(trusted_ca, Some(leaf))?, "localhost").await?;
    let pong = PeerClient::new(ch).ping(PingRequest { from: "test".into() }).await?.into_inner();
    Ok(pong.name)
}

fn get(keyspace: &str, key: &str) -> GetRequest {
    GetRequest { keyspace: keyspace.into(), key: key.into() }
}

fn put(keyspace: &str, key: &str, value: &str) -> PutRequest {
    PutRequest {
        keyspace: keyspace.into(),
        key: key.into(),
        value: value.as_bytes().to_vec().into(),
        ttl: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_serve_tls_and_the_peer_port_admits_only_authenticated_peers() -> anyhow::Result<()> {
    let ca = Ca::new("cluster CA")?;
    let node_cert = ca.issue(NODE_SANS)?;
    let cluster = start(2, &node_cert, &ca.pem(), |_| {}).await?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);

    // Round trips over TLS through both nodes: every key is reachable from every node, so half of them cross
    // the peer port (mutual TLS) to their owner.
    let mut via_a = tls_client(a.grpc, &ca.pem(), None).await?;
    let mut via_b = tls_client(b.grpc, &ca.pem(), None).await?;
    for i in 0..20 {
        via_a.put(put("kv", &format!("k{i}"), &format!("v{i}"))).await?;
    }
    for i in 0..20 {
        let v = via_b.get(get("kv", &format!("k{i}"))).await?.into_inner();
        assert_eq!(v.value, format!("v{i}").into_bytes());
    }
    assert!(b.engine().is_some_and(|e| {
        e.metrics().encode().is_ok_and(|m| m.contains("distcache_forwarded_total{keyspace=\"kv\"}"))
    }));

    // A plain client on the TLS client port: refused.
    let plain = async {
        let mut c = distcache_tests::client(a.grpc).await?;
        c.get(get("kv", "k1")).await?;
        anyhow::Ok(())
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(10), plain).await.is_ok_and(|r| r.is_err()),
        "plain client served"
    );

    // A client that trusts another CA: refused (by the client, which cannot verify the node).
    let stranger = Ca::new("stranger CA")?;
    let err = tls_client(a.grpc, &stranger.pem(), None).await.map(|_| ()).expect_err("unknown CA");
    let text = format!("{err:?}");
    assert!(text.contains("UnknownIssuer"), "{text}");

    // The Peer service is not on the client port, even over TLS.
    let ch = channel(a.grpc, app_config(&ca.pem(), None)?, "localhost").await?;
    let status =
        PeerClient::new(ch).ping(PingRequest { from: "x".into() }).await.expect_err("no Peer on 7420");
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    // The peer port: a peer with the cluster's identity is admitted (the positive control) …
    assert_eq!(peer_ping(a.peer, &ca.pem(), &node_cert).await?, "node-1");
    // … a certificate from a foreign CA is refused …
    let foreign = stranger.issue(NODE_SANS)?;
    assert!(peer_ping(a.peer, &ca.pem(), &foreign).await.is_err(), "a peer from a foreign CA was admitted");
    // … and so is one from the same CA with another identity.
    let intruder = ca.issue(&["intruder.test"])?;
    let refused =
        peer_ping(a.peer, &ca.pem(), &intruder).await.expect_err("a peer with another identity was admitted");
    println!("same CA, other identity: {refused:#}");
    // Without any client certificate: refused.
    let ch = channel(a.peer, app_config(&ca.pem(), None)?, "localhost").await;
    let anonymous = match ch {
        Err(e) => Err(e),
        Ok(ch) => PeerClient::new(ch)
            .ping(PingRequest { from: "x".into() })
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from),
    };
    assert!(anonymous.is_err(), "a peer without a certificate was admitted");
    // A plain connection to the peer port: refused.
    let plain = async {
        let ch = Channel::from_shared(format!("http://{}", a.peer))?.connect().await?;
        PeerClient::new(ch).ping(PingRequest { from: "x".into() }).await?;
        anyhow::Ok(())
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(10), plain).await.is_ok_and(|r| r.is_err()),
        "plain peer served"
    );
    Ok(())
}

/// A reader loop over fresh TLS connections to every node; counts reads and failures until stopped.
struct Readers {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Readers {
    fn start(addrs: Vec<SocketAddr>, ca_pem: String, keys: usize) -> Self {
        let (stop, ok, failed) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (stopped, reads, failures) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let task = tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stopped.load(Ordering::Acquire) {
                for addr in &addrs {
                    // A new connection (a new handshake) every round, so material changes are exercised.
                    let round = async {
                        let mut c = tls_client(*addr, &ca_pem, None).await?;
                        for k in 0..keys {
                            let v = c.get(get("kv", &format!("k{k}"))).await?.into_inner();
                            anyhow::ensure!(v.value == format!("v{k}").into_bytes(), "wrong value for k{k}");
                        }
                        anyhow::Ok(())
                    };
                    match round.await {
                        Ok(()) => {
                            reads.fetch_add(keys as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            errors.push(format!("{addr}: {e:#}"));
                        }
                    }
                }
            }
            errors
        });
        Self { stop, ok, failed, task }
    }

    async fn reads_after(&self, n: u64) -> anyhow::Result<()> {
        let target = self.ok.load(Ordering::Relaxed) + n;
        wait_for(Duration::from_secs(10), "the readers make progress", || {
            std::future::ready(Ok(self.ok.load(Ordering::Relaxed) >= target))
        })
        .await
    }

    async fn finish(self) -> anyhow::Result<(u64, u64, Vec<String>)> {
        self.stop.store(true, Ordering::Release);
        let errors = self.task.await?;
        Ok((self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed), errors))
    }
}

async fn wait_serial(addr: SocketAddr, ca_pem: &str, serial: &str) -> anyhow::Result<()> {
    wait_for(Duration::from_secs(10), "the node presents the new certificate", || async {
        Ok(served_serial(addr, ca_pem, None).await.is_ok_and(|s| s == serial))
    })
    .await
}

fn serial(leaf: &Leaf) -> anyhow::Result<String> {
    let der = distcache_tls::rustls_pki_types::CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes())?;
    Ok(distcache_tls::CertIdentity::parse(&der).map_err(anyhow::Error::msg)?.serial)
}

async fn metric(admin: SocketAddr, line: &str) -> anyhow::Result<bool> {
    Ok(distcache_tests::http_get(admin, "/metrics").await?.1.lines().any(|l| l == line))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_and_bad_material_is_refused() -> anyhow::Result<()> {
    let ca = Ca::new("cluster CA")?;
    let first = ca.issue(NODE_SANS)?;
    let cluster = start(2, &first, &ca.pem(), |_| {}).await?;
    let mut c = tls_client(cluster.nodes[0].grpc, &ca.pem(), None).await?;
    for k in 0..10 {
        c.put(put("kv", &format!("k{k}"), &format!("v{k}"))).await?;
    }
    let addrs: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.grpc).collect();
    let readers = Readers::start(addrs.clone(), ca.pem(), 10);
    readers.reads_after(50).await?;

    // Rotation: each node's Secret gets a new certificate and key, one swap each.
    let second = ca.issue(NODE_SANS)?;
    for (node, secret) in cluster.nodes.iter().zip(&cluster.secrets) {
        secret.update(&second, &ca.pem())?;
        wait_serial(node.grpc, &ca.pem(), &serial(&second)?).await?;
        assert!(metric(node.admin, "distcache_tls_reloads_total{result=\"applied\"} 1").await?);
        readers.reads_after(50).await?;
    }
    // Peers still admit each other with the new material on new connections.
    assert_eq!(peer_ping(cluster.nodes[0].peer, &ca.pem(), &second).await?, "node-1");

    // Bad material: a key that belongs to another certificate, then an expired certificate. Each is refused
    // once and reported; the node keeps presenting the second certificate.
    let third = ca.issue(NODE_SANS)?;
    let node = &cluster.nodes[1];
    cluster.secrets[1].update_raw(&third.cert_pem, &first.key_pem, &ca.pem())?;
    wait_for(Duration::from_secs(10), "the mismatched pair is refused", || async {
        metric(node.admin, "distcache_tls_reloads_total{result=\"refused\"} 1").await
    })
    .await?;
    let (code, ready) = distcache_tests::http_get(node.admin, "/readyz").await?;
    assert_eq!(code, 200, "{ready}");
    assert!(ready.contains("last reload refused") && ready.contains("does not belong"), "{ready}");
    let expired = ca.issue_with(&LeafOptions { sans: NODE_SANS, expired: true, ..LeafOptions::default() })?;
    cluster.secrets[1].update(&expired, &ca.pem())?;
    wait_for(Duration::from_secs(10), "the expired certificate is refused", || async {
        metric(node.admin, "distcache_tls_reloads_total{result=\"refused\"} 2").await
    })
    .await?;
    assert_eq!(served_serial(node.grpc, &ca.pem(), None).await?, serial(&second)?);
    readers.reads_after(50).await?;

    let (ok, failed, errors) = readers.finish().await?;
    println!("reads during rotation: {ok} ok, {failed} failed rounds");
    assert_eq!(failed, 0, "reads failed during rotation: {errors:?}");
    let metrics = distcache_tests::http_get(node.admin, "/metrics").await?.1;
    let expiry: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("distcache_tls_cert_expiry_seconds "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(expiry > 29.0 * 86_400.0, "the expiry gauge follows the certificate in use: {expiry}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rollover_through_a_bundle_fails_no_request() -> anyhow::Result<()> {
    let old_ca = Ca::new("old CA")?;
    let new_ca = Ca::new("new CA")?;
    let bundle = format!("{}{}", old_ca.pem(), new_ca.pem());
    let old_cert = old_ca.issue(NODE_SANS)?;
    let new_cert = new_ca.issue(NODE_SANS)?;
    let cluster = start(2, &old_cert, &old_ca.pem(), |_| {}).await?;
    let mut c = tls_client(cluster.nodes[0].grpc, &old_ca.pem(), None).await?;
    for k in 0..10 {
        c.put(put("kv", &format!("k{k}"), &format!("v{k}"))).await?;
    }
    // Applications trust both CAs first; so do the nodes, then each node switches to a certificate of the new
    // CA, then the old CA is dropped everywhere.
    let readers = Readers::start(cluster.nodes.iter().map(|n| n.grpc).collect(), bundle.clone(), 10);
    readers.reads_after(50).await?;
    let steps: [(&Leaf, &str, &str); 3] = [
        (&old_cert, &bundle, "both CAs trusted"),
        (&new_cert, &bundle, "new certificate"),
        (&new_cert, &new_ca.pem(), "old CA dropped"),
    ];
    for (leaf, ca_pem, what) in steps {
        for (i, (node, secret)) in cluster.nodes.iter().zip(&cluster.secrets).enumerate() {
            secret.update(leaf, ca_pem)?;
            let applied =
                format!("distcache_tls_reloads_total{{result=\"applied\"}} {}", applied_count(what));
            wait_for(Duration::from_secs(10), &format!("node-{} applies: {what}", i + 1), || async {
                metric(node.admin, &applied).await
            })
            .await?;
            readers.reads_after(30).await?;
            // A peer with the current material, on a new connection, is admitted.
            assert!(
                peer_ping(node.peer, &bundle, leaf).await.is_ok(),
                "{what}: node-{} refuses peers",
                i + 1
            );
        }
    }
    let (ok, failed, errors) = readers.finish().await?;
    println!("reads during the CA rollover: {ok} ok, {failed} failed rounds");
    assert_eq!(failed, 0, "reads failed during the rollover: {errors:?}");
    // After the rollover a certificate of the old CA is refused as a peer.
    assert!(peer_ping(cluster.nodes[0].peer, &bundle, &old_cert).await.is_err());
    Ok(())
}

fn applied_count(step: &str) -> u32 {
    match step {
        "both CAs trusted" => 1,
        "new certificate" => 2,
        _ => 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyspace_access_is_enforced_per_operation_by_client_identity() -> anyhow::Result<()> {
    let ca = Ca::new("cluster CA")?;
    let node_cert = ca.issue(NODE_SANS)?;
    let cluster = start(2, &node_cert, &ca.pem(), |c| {
        if let Some(t) = c.tls.as_mut() {
            t.client_auth = ClientAuth::Required;
        }
    })
    .await?;
    let client_cert = |name: &'static str| {
        ca.issue_with(&LeafOptions {
            sans: &[],
            common_name: name,
            usage: Usage::Client,
            ..LeafOptions::default()
        })
    };
    let (reader, writer, other) =
        (client_cert("reader.test")?, client_cert("writer.test")?, client_cert("other.test")?);
    let addr = cluster.nodes[1].grpc;
    let mut w = tls_client(addr, &ca.pem(), Some(&writer)).await?;
    let mut r = tls_client(addr, &ca.pem(), Some(&reader)).await?;
    let mut o = tls_client(addr, &ca.pem(), Some(&other)).await?;

    w.put(put("users", "alice", "A")).await?;
    assert_eq!(r.get(get("users", "alice")).await?.into_inner().value, b"A".to_vec());
    let denied = r.put(put("users", "alice", "evil")).await.expect_err("reader may not write");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied.message().contains("\"users\"") && denied.message().contains("write"),
        "{}",
        denied.message()
    );
    assert!(!denied.message().contains("writer.test"), "the list leaked: {}", denied.message());
    let denied = o.get(get("users", "alice")).await.expect_err("other may not read");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(denied.message().contains("read"), "{}", denied.message());
    // A keyspace without access lists is open to every authenticated client.
    o.put(put("kv", "x", "1")).await?;
    assert_eq!(w.get(get("kv", "x")).await?.into_inner().value, b"1".to_vec());
    // The value was not changed by the refused write.
    assert_eq!(w.get(get("users", "alice")).await?.into_inner().value, b"A".to_vec());
    let admin = cluster.nodes[1].admin;
    assert!(
        metric(admin, "distcache_requests_total{op=\"put\",keyspace=\"users\",code=\"permission_denied\"} 1")
            .await?
    );
    assert!(
        metric(admin, "distcache_requests_total{op=\"get\",keyspace=\"users\",code=\"permission_denied\"} 1")
            .await?
    );

    // clientAuth: required: no certificate, no service.
    let anonymous = async {
        let mut c = tls_client(addr, &ca.pem(), None).await?;
        c.get(get("kv", "x")).await?;
        anyhow::Ok(())
    };
    let err = anonymous.await.expect_err("a client without a certificate was served");
    println!("no client certificate: {err:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_serves_https_when_asked() -> anyhow::Result<()> {
    let ca = Ca::new("cluster CA")?;
    let cluster = start(1, &ca.issue(NODE_SANS)?, &ca.pem(), |c| {
        c.admin = AdminConfig { listen: c.admin.listen, tls: true };
    })
    .await?;
    let admin = cluster.nodes[0].admin;
    let (code, body) = https_get(admin, "/readyz", &ca.pem()).await?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("tls: certificate serial"), "{body}");
    let (code, metrics) = https_get(admin, "/metrics", &ca.pem()).await?;
    assert_eq!(code, 200);
    assert!(metrics.contains("distcache_tls_cert_expiry_seconds"), "{metrics}");
    assert!(
        distcache_tests::http_get(admin, "/readyz").await.map_or(true, |(c, _)| c != 200),
        "plain HTTP served"
    );
    Ok(())
}
