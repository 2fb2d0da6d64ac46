//! The client over real TLS: the in-process fake of the Cache service behind the same TLS accept loop and
//! server config as a node's client port, certificates from a throwaway CA.

use std::path::Path;

use distcache_tls::{
    ClientAuth, TlsFiles, TlsSettings,
    pki::{Ca, LeafOptions, Usage},
};

use super::*;
use crate::{
    Client, ClientBuilder,
    testing::{self, KEYSPACE},
};

/// A CA, the server's certificate for 127.0.0.1 and localhost, and a place for more files.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    server: TlsFiles,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Ca::new("distcache test CA").expect("CA");
        let leaf = ca.issue(&["127.0.0.1", "localhost"]).expect("server certificate");
        let server = leaf.write(&dir.path().join("server"), &ca.pem()).expect("write server files");
        Self { dir, ca, server }
    }

    fn settings(&self, client_auth: ClientAuth) -> TlsSettings {
        TlsSettings { files: self.server.clone(), client_auth, peer_identities: Vec::new() }
    }

    /// A client certificate (clientAuth usage only) named `name`, issued by `ca` (this PKI's CA by default).
    fn client_cert(&self, name: &str, ca: Option<&Ca>) -> TlsFiles {
        let ca = ca.unwrap_or(&self.ca);
        let leaf = ca
            .issue_with(&LeafOptions {
                sans: &[name],
                common_name: name,
                usage: Usage::Client,
                ..Default::default()
            })
            .expect("client certificate");
        leaf.write(&self.dir.path().join(name), &ca.pem()).expect("write client files")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn https(addr: std::net::SocketAddr) -> String {
    format!("https://{addr}")
}

fn with_ca(endpoint: String, ca: &Path) -> ClientBuilder {
    Client::builder(endpoint).tls_ca_file(ca)
}

/// The error of a connection that must fail, as `Error::Tls`, and its message.
async fn tls_failure(builder: ClientBuilder) -> String {
    let err = builder.connect().await.expect_err("the connection must fail");
    assert!(matches!(err, Error::Tls { .. }), "not a TLS error: {err:?}");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    err.to_string()
}

async fn config_failure(builder: ClientBuilder) -> String {
    let err = builder.connect().await.expect_err("the options must be refused");
    assert!(matches!(err, Error::Config(_)), "not a configuration error: {err:?}");
    err.to_string()
}

#[tokio::test]
async fn round_trip_over_https_with_the_ca() {
    let pki = Pki::new();
    let (addr, fake) = testing::serve_tls(pki.settings(ClientAuth::None)).await;
    let client = with_ca(https(addr), &pki.server.ca_file).connect().await.expect("TLS connect");
    client.put(KEYSPACE, "42", "alice", None).await.expect("put over TLS");
    let value = client.get(KEYSPACE, "42").await.expect("get over TLS").expect("stored");
    assert_eq!(&value.value[..], b"alice");
    // Both calls reached the server (the fake does not count connect's ListKeySpaces).
    assert_eq!(fake.calls.load(std::sync::atomic::Ordering::Relaxed), 2);

    // A DNS name of the certificate works too, and several connections each do their handshake.
    let by_name = with_ca(format!("https://localhost:{}", addr.port()), &pki.server.ca_file)
        .connections(3)
        .connect()
        .await
        .expect("TLS connect by name");
    for i in 0..6 {
        assert_eq!(by_name.get(KEYSPACE, format!("k{i}")).await.expect("get"), None);
    }
    // The name dialled need not be in the certificate when --tls-server-name names one that is.
    let renamed = with_ca(https(addr), &pki.server.ca_file).tls_server_name("localhost");
    renamed.connect().await.expect("server name override");
}

#[tokio::test]
async fn unknown_ca_is_named() {
    let pki = Pki::new();
    let (addr, _fake) = testing::serve_tls(pki.settings(ClientAuth::None)).await;
    let other = Ca::new("another CA").expect("CA");
    std::fs::write(pki.path("other-ca.crt"), other.pem()).expect("write");
    let message = tls_failure(with_ca(https(addr), &pki.path("other-ca.crt"))).await;
    assert!(message.contains("unknown CA"), "{message}");
    assert!(message.contains(&https(addr)), "names the endpoint: {message}");
}

#[tokio::test]
async fn name_mismatch_is_named() {
    let pki = Pki::new();
    let (addr, _fake) = testing::serve_tls(pki.settings(ClientAuth::None)).await;
    let message =
        tls_failure(with_ca(https(addr), &pki.server.ca_file).tls_server_name("cache.example.com")).await;
    assert!(message.contains("name mismatch"), "{message}");
    assert!(message.contains("cache.example.com"), "{message}");
}

#[tokio::test]
async fn a_required_client_certificate_is_asked_for() {
    let pki = Pki::new();
    let (addr, _fake) = testing::serve_tls(pki.settings(ClientAuth::Required)).await;

    // Without one: TLS 1.3 completes the client's side of the handshake and the server's certificate_required
    // alert comes after it, so it is the connect probe that sees it.
    let message = tls_failure(with_ca(https(addr), &pki.server.ca_file)).await;
    assert!(message.contains("client certificate required"), "{message}");

    // With one from the server's CA.
    let mine = pki.client_cert("app-1", None);
    let client = with_ca(https(addr), &pki.server.ca_file)
        .tls_cert_file(&mine.cert_file)
        .tls_key_file(&mine.key_file)
        .connect()
        .await
        .expect("client certificate accepted");
    client.put(KEYSPACE, "k", "v", None).await.expect("put with a client certificate");

    // With one from another CA.
    let foreign_ca = Ca::new("foreign CA").expect("CA");
    let foreign = pki.client_cert("intruder", Some(&foreign_ca));
    let message = tls_failure(
        with_ca(https(addr), &pki.server.ca_file)
            .tls_cert_file(&foreign.cert_file)
            .tls_key_file(&foreign.key_file),
    )
    .await;
    assert!(message.contains("refused the client certificate"), "{message}");
}

#[tokio::test]
async fn a_plain_client_is_told_to_use_https() {
    let pki = Pki::new();
    let (addr, _fake) = testing::serve_tls(pki.settings(ClientAuth::None)).await;
    for endpoint in [format!("http://{addr}"), addr.to_string()] {
        let message = tls_failure(Client::builder(&endpoint)).await;
        assert!(message.contains("may require TLS"), "{message}");
        assert!(message.contains(&format!("use https://{addr}")), "{message}");
    }
}

#[tokio::test]
async fn a_tls_client_to_a_plain_server_is_told_so() {
    let pki = Pki::new();
    let (addr, _fake) = testing::serve().await;
    let message = tls_failure(with_ca(https(addr), &pki.server.ca_file)).await;
    assert!(message.contains("does not speak TLS") && message.contains("http://"), "{message}");
}

#[tokio::test]
async fn unusable_options_fail_before_connecting() {
    let pki = Pki::new();
    // Nothing listens: every one of these must fail on the options, not on the connection.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let mine = pki.client_cert("app-1", None);
    let other = pki.client_cert("app-2", None);

    let message = config_failure(Client::builder(https(closed))).await;
    assert!(message.contains("--tls-ca"), "https:// without a CA bundle: {message}");

    for plain in [format!("http://{closed}"), closed.to_string()] {
        let message = config_failure(with_ca(plain.clone(), &pki.server.ca_file)).await;
        assert!(message.contains("plain endpoint") && message.contains("use https://"), "{message}");
        let message = config_failure(Client::builder(&plain).tls_server_name("x")).await;
        assert!(message.contains("--tls-server-name"), "{message}");
    }

    let message =
        config_failure(with_ca(https(closed), &pki.server.ca_file).tls_cert_file(&mine.cert_file)).await;
    assert!(message.contains("--tls-key"), "certificate without key: {message}");
    let message =
        config_failure(with_ca(https(closed), &pki.server.ca_file).tls_key_file(&mine.key_file)).await;
    assert!(message.contains("--tls-cert"), "key without certificate: {message}");

    let message = config_failure(
        with_ca(https(closed), &pki.server.ca_file)
            .tls_cert_file(&mine.cert_file)
            .tls_key_file(&other.key_file),
    )
    .await;
    assert!(message.contains("cannot be used together"), "mismatched key: {message}");

    let missing = pki.path("missing.crt");
    let message = config_failure(with_ca(https(closed), &missing)).await;
    assert!(message.contains("cannot read the CA bundle") && message.contains("missing.crt"), "{message}");

    std::fs::write(pki.path("empty.crt"), "not a certificate\n").expect("write");
    let message = config_failure(with_ca(https(closed), &pki.path("empty.crt"))).await;
    assert!(message.contains("no PEM certificate"), "{message}");

    let message = config_failure(Client::builder(format!("ftp://{closed}"))).await;
    assert!(message.contains("unsupported scheme"), "{message}");
}

#[test]
fn alerts_are_found_in_the_text_h2_keeps() {
    // What a call fails with when the server's alert comes after the handshake: h2 rebuilds the I/O error
    // from its kind and text.
    let h2_error = io::Error::new(io::ErrorKind::InvalidData, "received fatal alert: CertificateRequired");
    let status = tonic::Status::from_error(Box::new(h2_error));
    assert_eq!(alert_in_text(&status), Some(AlertDescription::CertificateRequired));
    let other = io::Error::new(io::ErrorKind::InvalidData, "received fatal alert: UnknownCA");
    assert_eq!(alert_in_text(&other), Some(AlertDescription::UnknownCA));
    assert_eq!(alert_in_text(&io::Error::other("connection reset")), None);
}

#[test]
fn targets_dial_plain_http_and_check_the_host() {
    let pki = Pki::new();
    let options = TlsOptions { ca_file: Some(pki.server.ca_file.clone()), ..TlsOptions::default() };
    let target = Target::resolve(" https://[::1]:7420 ", &options).expect("IPv6 endpoint");
    assert_eq!(target.endpoint, "https://[::1]:7420");
    assert_eq!(target.dial, "http://[::1]:7420");
    assert_eq!(target.tls.as_ref().map(TlsTarget::server_name).as_deref(), Some("::1"));

    let options = TlsOptions { server_name: Some("node-0.cache".to_owned()), ..options };
    let target = Target::resolve("https://10.0.0.7:7420", &options).expect("override");
    assert_eq!(target.tls.as_ref().map(TlsTarget::server_name).as_deref(), Some("node-0.cache"));

    let plain = Target::resolve("node:7420", &TlsOptions::default()).expect("plain");
    assert_eq!((plain.endpoint.as_str(), plain.dial.as_str()), ("http://node:7420", "http://node:7420"));
    assert!(plain.tls.is_none());
}

#[tokio::test]
async fn the_bench_h2_transport_speaks_tls_with_the_clients_settings() {
    use crate::bench::{self, BenchConfig, Op, Transport};
    let pki = Pki::new();
    let (addr, fake) = testing::serve_tls(pki.settings(ClientAuth::None)).await;
    let client =
        with_ca(https(addr), &pki.server.ca_file).connections(2).connect().await.expect("TLS connect");
    let config = BenchConfig {
        op: Op::Mixed,
        concurrency: 4,
        duration: std::time::Duration::from_millis(200),
        warmup: std::time::Duration::ZERO,
        keys: 20,
        keyspace: KEYSPACE.to_owned(),
        transport: Transport::H2,
        ..BenchConfig::default()
    };
    let before = fake.calls.load(std::sync::atomic::Ordering::Relaxed);
    let report = bench::run(&client, &config).await.expect("bench over TLS");
    assert!(report.requests > 0, "{report:?}");
    assert_eq!((report.errors, report.misses), (0, 0), "{report:?}");
    // Every call of the run reached the server (the preload's PutMany calls come on top).
    let calls = fake.calls.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(calls >= report.requests, "{calls} calls for {report:?}");

    // A certificate the client's CA did not sign fails the connection the way the client library's does.
    let other = Pki::new();
    let (other_addr, _other) = testing::serve_tls(other.settings(ClientAuth::None)).await;
    let stranger = with_ca(https(other_addr), &other.server.ca_file).connect().await.expect("TLS connect");
    let target = stranger.target().expect("built by the builder").clone();
    let wrong_ca = Target { tls: client.target().and_then(|t| t.tls.clone()), ..target };
    match wrong_ca.open_stream(std::time::Duration::from_secs(5)).await {
        // Both test CAs carry the same name, so rustls finds the issuer and then the signature fails.
        Err(Error::Tls { reason, .. }) => assert!(reason.contains("BadSignature"), "{reason}"),
        Err(other) => panic!("expected a TLS error, got {other:?}"),
        Ok(_) => panic!("a certificate from another CA was accepted"),
    }
}
