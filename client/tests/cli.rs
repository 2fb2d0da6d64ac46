//! The `distcache` binary over plain gRPC against the crate's in-process fake of the Cache service: the stale
//! marker of `get`, the protection columns of `stats`, and `hot-keys` on one node and summed over two.

use std::process::Output;

// Reason: the fake is shared with the library's unit tests, and this file uses only part of it.
#[allow(dead_code)]
#[path = "../src/testing.rs"]
mod testing;

/// Runs the built CLI against `endpoint` with `args`, no DISTCACHE_* variable inherited.
async fn distcache(endpoint: &str, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_distcache"));
    for name in [
        "DISTCACHE_ENDPOINT",
        "DISTCACHE_TLS_CA",
        "DISTCACHE_TLS_CERT",
        "DISTCACHE_TLS_KEY",
        "DISTCACHE_TLS_SERVER_NAME",
    ] {
        command.env_remove(name);
    }
    command.args(["--endpoint", endpoint]).args(args).kill_on_drop(true);
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

fn json(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "{}", stderr(output));
    serde_json::from_str(stdout(output).trim()).expect("JSON output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_marks_stale_values_and_stats_shows_protections() {
    let (addr, _fake) = testing::serve().await;
    let endpoint = addr.to_string();

    let o = distcache(&endpoint, &["get", "users", testing::STALE_KEY]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim_end().as_bytes(), testing::STALE_VALUE, "the value alone on stdout");
    assert!(stderr(&o).contains("(stale:"), "{}", stderr(&o));
    let doc = json(&distcache(&endpoint, &["get", "users", testing::STALE_KEY, "--json"]).await);
    assert_eq!(doc["stale"], true);

    let o = distcache(&endpoint, &["put", "users", "fresh", "v"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = distcache(&endpoint, &["get", "users", "fresh"]).await;
    assert!(o.status.success() && stderr(&o).is_empty(), "{}", stderr(&o));
    assert_eq!(json(&distcache(&endpoint, &["get", "users", "fresh", "--json"]).await)["stale"], false);

    let o = distcache(&endpoint, &["stats"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.lines().nth(1).is_some_and(|h| h.ends_with("CIRCUIT  STALE  RATE_LIMITED")), "{out}");
    assert!(out.lines().nth(2).is_some_and(|row| row.ends_with("closed   1      2")), "{out}");
    assert!(
        out.contains("warm-up users: 12/12 owned keys loaded or present (30 listed), 0 failed, done"),
        "{out}"
    );
    let doc = json(&distcache(&endpoint, &["stats", "users", "--json"]).await);
    assert_eq!(doc["keyspaces"][0]["hot_keys"][0], serde_json::json!({ "key": "42", "hits": 12 }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_keys_of_one_node_and_of_every_member() {
    let (a, fake_a) = testing::serve().await;
    let (b, fake_b) = testing::serve().await;
    // The fakes advertise their client address: peer port = client port, which --all-members carries over.
    let members = [("node-a", a), ("node-b", b)];
    fake_a.set_cluster("node-a", &members, &[("x", 10), ("y", 4)]);
    fake_b.set_cluster("node-b", &members, &[("y", 7), ("z", 1)]);
    let endpoint = format!("http://{a}");

    let o = distcache(&endpoint, &["hot-keys", "users"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim_end(),
        "hot keys of users on node-a (estimated recent reads)\nKEY  HITS\nx    10\ny    4"
    );

    let doc = json(&distcache(&endpoint, &["hot-keys", "users", "--all-members", "--json"]).await);
    assert_eq!(
        doc,
        serde_json::json!({
            "keyspace": "users",
            "nodes": ["node-a", "node-b"],
            "failed": [],
            "hot_keys": [{ "key": "y", "hits": 11 }, { "key": "x", "hits": 10 }, { "key": "z", "hits": 1 }],
        })
    );
    let o = distcache(&endpoint, &["hot-keys", "users", "--all-members", "--top", "1"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).ends_with("KEY  HITS\ny    11\n"), "{}", stdout(&o));

    // The node's own error for an unknown keyspace.
    let o = distcache(&endpoint, &["hot-keys", "nope"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown keyspace"), "{}", stderr(&o));

    // A member that cannot be counted (here: its address leads to another node) is reported, the rest shown.
    fake_a.set_cluster("node-a", &[("node-a", a), ("node-b", b), ("node-c", b)], &[("x", 10)]);
    let o = distcache(&endpoint, &["hot-keys", "users", "--all-members"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("member node-c at http://{b} not counted")), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("hot keys of users on node-a, node-b ("), "{}", stdout(&o));
}
