//! The `distcache` binary over TLS: the flags and the `DISTCACHE_TLS_*` variables reach every subcommand
//! (`bench` included), and failures are explained on stderr with exit code 1. The server is the crate's
//! in-process fake of the Cache service behind a node's TLS accept loop.

use std::{path::Path, process::Output};

use distcache_tls::{
    ClientAuth, TlsFiles, TlsSettings,
    pki::{Ca, LeafOptions, Usage},
};

// Reason: the fake is shared with the library's unit tests, and this file uses only part of it.
#[allow(dead_code)]
#[path = "../src/testing.rs"]
mod testing;

const ENV: [&str; 5] = [
    "DISTCACHE_ENDPOINT",
    "DISTCACHE_TLS_CA",
    "DISTCACHE_TLS_CERT",
    "DISTCACHE_TLS_KEY",
    "DISTCACHE_TLS_SERVER_NAME",
];

/// Runs the built CLI with `args` and `env` only (no DISTCACHE_* variable inherited).
async fn distcache(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_distcache"));
    for name in ENV {
        command.env_remove(name);
    }
    command.args(args).envs(env.iter().copied()).kill_on_drop(true);
    tokio::time::timeout(std::time::Duration::from_mins(1), command.output())
        .await
        .expect("the CLI finishes")
        .expect("the CLI runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn write_leaf(ca: &Ca, dir: &Path, name: &str, usage: Usage) -> TlsFiles {
    let sans: &[&str] = if usage == Usage::Client { &["app-1"] } else { &["127.0.0.1", "localhost"] };
    let leaf = ca
        .issue_with(&LeafOptions { sans, common_name: name, usage, ..LeafOptions::default() })
        .expect("certificate");
    leaf.write(&dir.join(name), &ca.pem()).expect("write certificate files")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reads_and_writes_over_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new("distcache test CA").expect("CA");
    let server = write_leaf(&ca, dir.path(), "server", Usage::Both);
    let settings =
        TlsSettings { files: server.clone(), client_auth: ClientAuth::None, peer_identities: vec![] };
    let (addr, _fake) = testing::serve_tls(settings).await;
    let endpoint = format!("https://{addr}");
    let ca_file = server.ca_file.to_str().expect("UTF-8 path");

    let o =
        distcache(&["--endpoint", &endpoint, "--tls-ca", ca_file, "put", "users", "42", "alice"], &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim_end(), "stored");

    // The same through the environment.
    let env = [("DISTCACHE_ENDPOINT", Path::new(&endpoint)), ("DISTCACHE_TLS_CA", server.ca_file.as_path())];
    let o = distcache(&["get", "users", "42"], &env).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim_end(), "alice");

    // bench takes the same options.
    let bench = ["bench", "--keyspace", "users", "--keys", "10", "--concurrency", "2", "--duration", "300ms"];
    let o = distcache(&[&bench[..], &["--warmup", "0s", "--json"]].concat(), &env).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("bench JSON");
    assert!(report["requests"].as_u64().is_some_and(|n| n > 0), "{report}");

    // Another CA: exit 1 and the reason.
    let other = Ca::new("another CA").expect("CA");
    std::fs::write(dir.path().join("other.crt"), other.pem()).expect("write");
    let other_ca = dir.path().join("other.crt");
    let o = distcache(&["get", "users", "42"], &[env[0], ("DISTCACHE_TLS_CA", &other_ca)]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown CA"), "{}", stderr(&o));

    // TLS options with a plain endpoint are refused; a plain endpoint to this server is told to use https://.
    let plain = format!("http://{addr}");
    let o = distcache(&["--endpoint", &plain, "--tls-ca", ca_file, "keyspaces"], &[]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("given for the plain endpoint"), "{}", stderr(&o));
    let o = distcache(&["--endpoint", &plain, "keyspaces"], &[]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("may require TLS"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_presents_a_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new("distcache test CA").expect("CA");
    let server = write_leaf(&ca, dir.path(), "server", Usage::Both);
    let client = write_leaf(&ca, dir.path(), "client", Usage::Client);
    let settings =
        TlsSettings { files: server.clone(), client_auth: ClientAuth::Required, peer_identities: vec![] };
    let (addr, _fake) = testing::serve_tls(settings).await;
    let endpoint = format!("https://{addr}");
    let env = [("DISTCACHE_ENDPOINT", Path::new(&endpoint)), ("DISTCACHE_TLS_CA", server.ca_file.as_path())];

    let o = distcache(&["keyspaces"], &env).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("client certificate required"), "{}", stderr(&o));

    let with_cert = [
        env[0],
        env[1],
        ("DISTCACHE_TLS_CERT", client.cert_file.as_path()),
        ("DISTCACHE_TLS_KEY", client.key_file.as_path()),
    ];
    let o = distcache(&["keyspaces"], &with_cert).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("users"), "{}", stdout(&o));

    // Half a client identity is a clear error.
    let cert = client.cert_file.to_str().expect("UTF-8 path");
    let o = distcache(&["--tls-cert", cert, "keyspaces"], &env).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--tls-key"), "{}", stderr(&o));
}
