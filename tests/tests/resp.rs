//! The RESP (Redis protocol) front end, driven by the Rust Redis client (redis-rs) and by raw sockets against real
//! `distcache-node` processes. What each test proves:
//!
//! - [`a_cold_key_is_read_through_the_hook_once_through_any_node`]: GET of a key no node holds runs the hook at the
//!   key's owner, through either node, under `keyspace:key` and under the default keyspace, over RESP2 and RESP3:
//!   the origin sees one request per key.
//! - [`commands_answer_as_redis_clients_expect`]: SET with its options, SETEX, MGET across keyspaces, MSET, DEL,
//!   EXISTS, EXPIRE/PEXPIRE with conditions, TTL/PTTL, TYPE, and Redis's error wording for unknown commands, wrong
//!   arity, NOPROTO, CLUSTER, SELECT, CLIENT TRACKING, and for keys DistCache refuses.
//! - [`pipelines_keep_their_order_and_writes_are_seen_through_every_node`]: 300 pipelined commands mixing hits,
//!   misses through the hook and writes answer in order; a SET through one node is what GET answers through the
//!   other.
//! - [`auth_gates_every_command_and_users_are_access_identities`]: NOAUTH before AUTH, WRONGPASS for a wrong
//!   password, HELLO 3 AUTH; a named user is the identity the keyspace's `access` lists name (NOPERM otherwise).
//! - [`a_client_that_does_not_read_its_replies_is_disconnected_at_the_output_limit`]: a pipelining client that
//!   never reads is cut off at `maxOutputBytes` (counted), and the node keeps serving others.
//! - [`connection_limit_idle_timeout_and_protocol_errors`]: the connection over `maxConnections` gets Redis's
//!   error, an idle connection is closed after `idleTimeout`, a malformed request gets `-ERR Protocol error` and
//!   the connection is closed.
//!
//! Every wait polls with a deadline; every loop is bounded. Run after `cargo build --workspace --bins` (the tests
//! start the built binary) with the `wasm32-wasip2` target installed (the hook is built on first use).

use std::{net::SocketAddr, time::Duration};

use distcache_tests::{hook_module, http_get, origin::Origin, procs::ProcCluster, wait_for};
use redis::AsyncCommands;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// What the origin answers for `key`.
fn value_of(key: &str) -> String {
    format!("{{\"key\":\"{key}\"}}")
}

/// An origin serving `items/<key>.json` for each of `keys`.
async fn origin_with(keys: &[String]) -> anyhow::Result<(tempfile::TempDir, Origin)> {
    Ok(distcache_tests::origin::serving_items(keys, |key| value_of(key).into_bytes()).await?)
}

/// Keyspaces: `users` read through the http-json hook from the origin, `kv` cache-aside, and `extra` appended
/// (whole keyspace entries).
fn keyspaces(origin: &Origin, extra: &str) -> anyhow::Result<String> {
    Ok(format!(
        "keyspaces:\n  - name: users\n    maxBytes: 16Mi\n    ttl: 5m\n    hook:\n      module: {{ path: \"{module}\" }}\n      \
         config: {{ baseUrl: \"{base}/items\" }}\n      allowedHosts: [\"{host}\"]\n  \
         - name: kv\n    maxBytes: 64Mi\n    maxValueBytes: 1Mi\n{extra}",
        module = hook_module("http_json")?.display(),
        base = origin.url(),
        host = origin.addr,
    ))
}

/// A cluster of `n` nodes with RESP on, ready, every node serving `users`.
async fn cluster(n: usize, keyspaces: &str, resp_fields: &str) -> anyhow::Result<ProcCluster> {
    let cluster = ProcCluster::start_resp(n, keyspaces, "", resp_fields)?;
    let names: Vec<String> = (1..=n).map(|i| format!("node-{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let all: Vec<usize> = (0..n).collect();
    cluster.wait_views(&all, &names, Duration::from_secs(30)).await?;
    for node in &cluster.nodes {
        let waited = wait_for(Duration::from_secs(30), &format!("{} serving users", node.name), || async {
            let (status, body) = http_get(node.admin, "/admin/keyspaces").await?;
            Ok(status == 200 && body.contains("\"users\""))
        })
        .await;
        waited.map_err(|e| e.context(cluster.logs()))?;
    }
    Ok(cluster)
}

fn resp_addr(cluster: &ProcCluster, i: usize) -> anyhow::Result<SocketAddr> {
    cluster.nodes[i].resp.ok_or_else(|| anyhow::anyhow!("node {i} has no RESP address"))
}

/// A redis-rs connection to node `i` (`url_tail`: `?protocol=resp3` and the like; `auth`: `user:password@`).
async fn connect(
    cluster: &ProcCluster,
    i: usize,
    auth: &str,
    url_tail: &str,
) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let addr = resp_addr(cluster, i)?;
    let client = redis::Client::open(format!("redis://{auth}{addr}/{url_tail}"))?;
    // redis-rs gives up on a reply after 500 ms by default; a pipeline of cold keys waits for the origin in turn.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(20)));
    Ok(client.get_multiplexed_async_connection_with_config(&config).await?)
}

/// Runs a command and returns the error text the server answered (fails if it succeeded).
async fn error_of(con: &mut redis::aio::MultiplexedConnection, args: &[&[u8]]) -> anyhow::Result<String> {
    let mut cmd = redis::cmd(std::str::from_utf8(args[0])?);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match cmd.query_async::<redis::Value>(con).await {
        Ok(v) => anyhow::bail!("{:?} succeeded with {v:?}", String::from_utf8_lossy(args[0])),
        Err(e) => Ok(e.to_string()),
    }
}

/// Requests the origin got for `key`.
fn origin_requests(origin: &Origin, key: &str) -> u64 {
    origin.hits(&format!("/items/{key}"))
}

#[tokio::test]
async fn a_cold_key_is_read_through_the_hook_once_through_any_node() -> anyhow::Result<()> {
    let keys: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
    let (_data, origin) = origin_with(&keys).await?;
    let cluster = cluster(2, &keyspaces(&origin, "")?, "defaultKeyspace: users").await?;
    let mut plain = connect(&cluster, 0, "", "").await?;
    let mut resp3 = connect(&cluster, 1, "", "?protocol=resp3").await?;
    for (i, key) in keys.iter().enumerate() {
        // Half the keys under `users:`, half through the default keyspace; each node asked for every key, so
        // half the reads go through a node that does not own the key.
        let name = if i % 2 == 0 { format!("users:{key}") } else { key.clone() };
        let first: Option<String> = plain.get(&name).await?;
        let second: Option<String> = resp3.get(&name).await?;
        assert_eq!(first.as_deref(), Some(value_of(key).as_str()), "{name} through node-1");
        assert_eq!(second.as_deref(), Some(value_of(key).as_str()), "{name} through node-2");
        assert_eq!(origin_requests(&origin, key), 1, "{key} fetched once from the origin");
    }
    let missing: Option<String> = resp3.get("users:nobody").await?;
    assert_eq!(missing, None, "a key the origin does not have is nil");
    Ok(())
}

#[tokio::test]
#[allow(clippy::too_many_lines, reason = "one command after the other, each with its expected answer")]
async fn commands_answer_as_redis_clients_expect() -> anyhow::Result<()> {
    let (_data, origin) = origin_with(&["known".to_owned()]).await?;
    let cluster = cluster(1, &keyspaces(&origin, "")?, "defaultKeyspace: kv").await?;
    let mut c = connect(&cluster, 0, "", "").await?;

    // SET and its options.
    let set: String = redis::cmd("SET").arg("a").arg("1").query_async(&mut c).await?;
    assert_eq!(set, "OK");
    let nx: Option<String> = redis::cmd("SET").arg("a").arg("2").arg("NX").query_async(&mut c).await?;
    assert_eq!(nx, None, "NX on a present key sets nothing");
    let xx: Option<String> = redis::cmd("SET").arg("fresh").arg("2").arg("XX").query_async(&mut c).await?;
    assert_eq!(xx, None, "XX on an absent key sets nothing");
    assert_eq!(c.get::<_, Option<String>>("fresh").await?, None);
    let old: Option<String> = redis::cmd("SET").arg("a").arg("3").arg("GET").query_async(&mut c).await?;
    assert_eq!(old.as_deref(), Some("1"), "SET GET answers the old value");
    assert_eq!(c.get::<_, String>("kv:a").await?, "3", "kv:a and a are the same key");
    let _: () = redis::cmd("SET").arg("t").arg("v").arg("EX").arg(100).query_async(&mut c).await?;
    let ttl: i64 = c.ttl("t").await?;
    assert!((99..=100).contains(&ttl), "TTL after EX 100: {ttl}");
    let _: () = redis::cmd("SET").arg("t").arg("w").arg("KEEPTTL").query_async(&mut c).await?;
    let pttl: i64 = c.pttl("t").await?;
    assert!((90_000..=100_000).contains(&pttl), "KEEPTTL kept the TTL: {pttl} ms");
    let _: () = redis::cmd("SET").arg("p").arg("v").arg("PX").arg(1500).query_async(&mut c).await?;
    let pttl: i64 = c.pttl("p").await?;
    assert!((1..=1500).contains(&pttl), "PX 1500: {pttl}");
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 50;
    let _: () = redis::cmd("SET").arg("e").arg("v").arg("EXAT").arg(at).query_async(&mut c).await?;
    let ttl: i64 = c.ttl("e").await?;
    assert!((48..=50).contains(&ttl), "EXAT now+50: {ttl}");
    let _: () = redis::cmd("SET").arg("e").arg("v").arg("PXAT").arg(1000).query_async(&mut c).await?;
    assert_eq!(c.exists::<_, i64>("e").await?, 0, "PXAT in the past deletes the key");
    assert!(
        error_of(&mut c, &[b"SET", b"a", b"1", b"EX", b"0"])
            .await?
            .contains("invalid expire time in 'set' command")
    );
    assert!(
        error_of(&mut c, &[b"SET", b"a", b"1", b"EX", b"x"])
            .await?
            .contains("value is not an integer or out of range")
    );
    assert!(error_of(&mut c, &[b"SET", b"a", b"1", b"NX", b"XX"]).await?.contains("syntax error"));
    assert!(
        error_of(&mut c, &[b"SET", b"a", b"1", b"EX", b"5", b"PX", b"5"]).await?.contains("syntax error")
    );
    let _: () = redis::cmd("SETEX").arg("s").arg(30).arg("v").query_async(&mut c).await?;
    assert!((29..=30).contains(&c.ttl::<_, i64>("s").await?));
    assert!(
        error_of(&mut c, &[b"SETEX", b"s", b"0", b"v"])
            .await?
            .contains("invalid expire time in 'setex' command")
    );

    // Multi-key commands, across keyspaces and through the hook.
    let _: () = redis::cmd("MSET").arg("m1").arg("x").arg("kv:m2").arg("y").query_async(&mut c).await?;
    let values: Vec<Option<String>> =
        redis::cmd("MGET").arg("m1").arg("m2").arg("nothing").arg("users:known").query_async(&mut c).await?;
    assert_eq!(values, vec![Some("x".into()), Some("y".into()), None, Some(value_of("known"))]);
    let exists: i64 = redis::cmd("EXISTS")
        .arg("m1")
        .arg("m1")
        .arg("nothing")
        .arg("users:known")
        .query_async(&mut c)
        .await?;
    assert_eq!(exists, 3, "EXISTS counts every present key named, repeats included");
    let deleted: i64 = redis::cmd("DEL").arg("m1").arg("m2").query_async(&mut c).await?;
    assert_eq!(deleted, 2);
    let _: i64 = redis::cmd("UNLINK").arg("a").query_async(&mut c).await?;
    let gone: Vec<Option<String>> =
        redis::cmd("MGET").arg("m1").arg("m2").arg("a").query_async(&mut c).await?;
    assert_eq!(gone, vec![None, None, None]);
    assert!(
        error_of(&mut c, &[b"MSET", b"a", b"1", b"b"])
            .await?
            .contains("wrong number of arguments for 'mset' command")
    );

    // Expiry.
    let _: () = c.set("x", "1").await?;
    assert_eq!(c.ttl::<_, i64>("x").await?, -1, "no TTL without one (kv has no default)");
    assert_eq!(c.ttl::<_, i64>("nothing").await?, -2);
    let gt: i64 = redis::cmd("EXPIRE").arg("x").arg(100).arg("GT").query_async(&mut c).await?;
    assert_eq!(gt, 0, "GT against no expiry (infinite) does not hold");
    let set: i64 = redis::cmd("EXPIRE").arg("x").arg(100).arg("NX").query_async(&mut c).await?;
    assert_eq!(set, 1);
    let lt: i64 = redis::cmd("EXPIRE").arg("x").arg(200).arg("LT").query_async(&mut c).await?;
    assert_eq!(lt, 0, "LT with a longer time does not hold");
    let px: i64 = redis::cmd("PEXPIRE").arg("x").arg(50_000).query_async(&mut c).await?;
    assert_eq!(px, 1);
    assert!((49..=50).contains(&c.ttl::<_, i64>("x").await?));
    assert_eq!(c.get::<_, String>("x").await?, "1", "EXPIRE keeps the value");
    assert_eq!(redis::cmd("EXPIRE").arg("nothing").arg(5).query_async::<i64>(&mut c).await?, 0);
    assert_eq!(redis::cmd("EXPIRE").arg("x").arg(-1).query_async::<i64>(&mut c).await?, 1);
    assert_eq!(c.exists::<_, i64>("x").await?, 0, "EXPIRE with a negative time deletes");
    let _: () = c.set("y", "1").await?;
    assert_eq!(redis::cmd("TYPE").arg("y").query_async::<String>(&mut c).await?, "string");
    assert_eq!(redis::cmd("TYPE").arg("nothing").query_async::<String>(&mut c).await?, "none");

    // Connection and server commands.
    assert_eq!(redis::cmd("PING").query_async::<String>(&mut c).await?, "PONG");
    assert_eq!(redis::cmd("ECHO").arg("hi").query_async::<String>(&mut c).await?, "hi");
    assert_eq!(redis::cmd("SELECT").arg(0).query_async::<String>(&mut c).await?, "OK");
    let _: () = redis::cmd("CLIENT").arg("SETNAME").arg("tester").query_async(&mut c).await?;
    assert_eq!(redis::cmd("CLIENT").arg("GETNAME").query_async::<String>(&mut c).await?, "tester");
    assert!(redis::cmd("CLIENT").arg("ID").query_async::<i64>(&mut c).await? > 0);
    let info: String = redis::cmd("INFO").query_async(&mut c).await?;
    assert!(info.contains("loading:0") && info.contains("redis_version:"), "{info}");
    let config: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("save").query_async(&mut c).await?;
    assert_eq!(config, vec!["save".to_owned(), String::new()]);
    let count: i64 = redis::cmd("COMMAND").arg("COUNT").query_async(&mut c).await?;
    assert!(count >= 25, "{count}");
    let dbsize: i64 = redis::cmd("DBSIZE").query_async(&mut c).await?;
    assert!(dbsize >= 1, "{dbsize}");

    // Errors, in Redis's words.
    // The exact bytes, as clients match on them.
    let mut raw = TcpStream::connect(resp_addr(&cluster, 0)?).await?;
    assert_eq!(
        exchange(&mut raw, b"*2\r\n$8\r\nFLUSHALL\r\n$5\r\nASYNC\r\n").await?,
        "-ERR unknown command 'FLUSHALL', with args beginning with: 'ASYNC' \r\n"
    );
    assert_eq!(
        exchange(&mut raw, b"*1\r\n$3\r\nGET\r\n").await?,
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert!(error_of(&mut c, &[b"HELLO", b"4"]).await?.contains("NOPROTO"));
    assert!(error_of(&mut c, &[b"CLUSTER", b"INFO"]).await?.contains("cluster support disabled"));
    assert!(error_of(&mut c, &[b"SELECT", b"1"]).await?.contains("DB index is out of range"));
    assert!(error_of(&mut c, &[b"CLIENT", b"TRACKING", b"on"]).await?.contains("not supported"));
    assert!(error_of(&mut c, &[b"GET", b"\xff\xfe"]).await?.contains("not valid UTF-8"));
    assert!(
        error_of(&mut c, &[b"GET", "k".repeat(5000).as_bytes()]).await?.contains("longer than the limit")
    );
    assert!(error_of(&mut c, &[b"GET", b"users:"]).await?.contains("must not be empty"));
    let big = vec![b'v'; (1 << 20) + 1];
    assert!(error_of(&mut c, &[b"SET", b"big", &big]).await?.contains("maxValueBytes"));
    // The connection still serves after every error.
    assert_eq!(c.get::<_, String>("y").await?, "1");
    Ok(())
}

#[tokio::test]
async fn pipelines_keep_their_order_and_writes_are_seen_through_every_node() -> anyhow::Result<()> {
    let keys: Vec<String> =
        (0..50).map(|i| format!("p{i}")).chain((0..30).map(|i| format!("q{i}"))).collect();
    let (_data, origin) = origin_with(&keys).await?;
    let cluster = cluster(2, &keyspaces(&origin, "")?, "").await?;
    let mut one = connect(&cluster, 0, "", "").await?;
    let mut two = connect(&cluster, 1, "", "?protocol=resp3").await?;
    for i in 0..50 {
        let _: () = one.set(format!("kv:k{i}"), format!("v{i}")).await?;
    }
    // 300 commands in one pipeline: hits, reads through the hook (cold, then warm), writes.
    let mut pipe = redis::pipe();
    let mut expected = Vec::new();
    for i in 0..50 {
        pipe.cmd("GET").arg(format!("kv:k{i}"));
        expected.push(Some(format!("v{i}")));
        pipe.cmd("GET").arg(format!("users:p{i}"));
        expected.push(Some(value_of(&format!("p{i}"))));
        pipe.cmd("SET").arg(format!("kv:k{i}")).arg(format!("w{i}"));
        expected.push(Some("OK".to_owned()));
        pipe.cmd("GET").arg(format!("kv:k{i}"));
        expected.push(Some(format!("w{i}")));
        pipe.cmd("GET").arg(format!("users:p{i}"));
        expected.push(Some(value_of(&format!("p{i}"))));
        pipe.cmd("GET").arg(format!("kv:none{i}"));
        expected.push(None);
    }
    let got: Vec<Option<String>> = pipe.query_async(&mut two).await?;
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "reply {i} of the pipeline");
    }
    for key in &keys[..50] {
        assert_eq!(origin_requests(&origin, key), 1, "{key} fetched once");
    }
    // 30 GETs of cold keys in a row load together (one batch per keyspace), not one after the other; each still
    // answers its own command, in order, and each key reaches the origin once.
    let batched_before = get_many_requests(cluster.nodes[1].admin).await?;
    let mut run = redis::pipe();
    for i in 0..30 {
        run.cmd("GET").arg(format!("users:q{i}"));
    }
    run.cmd("GET").arg("users:p0");
    let got: Vec<Option<String>> = run.query_async(&mut two).await?;
    let mut want: Vec<Option<String>> = (0..30).map(|i| Some(value_of(&format!("q{i}")))).collect();
    want.push(Some(value_of("p0")));
    assert_eq!(got, want);
    for i in 0..30 {
        assert_eq!(origin_requests(&origin, &format!("q{i}")), 1, "q{i} fetched once");
    }
    let batched = get_many_requests(cluster.nodes[1].admin).await? - batched_before;
    assert!((1..=2).contains(&batched), "30 cold GETs in a row took {batched} batch loads");
    // What one node wrote, the other answers (it held a copy of the old value: the write dropped it).
    for i in 0..50 {
        let key = format!("kv:k{i}");
        let _: Option<String> = one.get(&key).await?;
        let _: () = two.set(&key, format!("z{i}")).await?;
        assert_eq!(one.get::<_, Option<String>>(&key).await?, Some(format!("z{i}")), "{key} through node-1");
    }
    Ok(())
}

#[tokio::test]
async fn auth_gates_every_command_and_users_are_access_identities() -> anyhow::Result<()> {
    let (_data, origin) = origin_with(&[]).await?;
    let guarded = "  - name: team\n    maxBytes: 1Mi\n    access: { read: [alice, bob], write: [alice] }\n";
    let fields = "defaultKeyspace: kv, password: s3cret, users: [{ name: alice, password: a-pass }, { name: bob, password: b-pass }]";
    let cluster = cluster(1, &keyspaces(&origin, guarded)?, fields).await?;
    let addr = resp_addr(&cluster, 0)?;

    // Raw: before AUTH, only AUTH/HELLO/QUIT.
    let mut raw = TcpStream::connect(addr).await?;
    assert!(
        exchange(&mut raw, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
            .await?
            .starts_with("-NOAUTH Authentication required.")
    );
    assert!(exchange(&mut raw, b"*1\r\n$4\r\nPING\r\n").await?.starts_with("-NOAUTH"));
    assert!(exchange(&mut raw, b"*2\r\n$4\r\nAUTH\r\n$5\r\nwrong\r\n").await?.starts_with("-WRONGPASS"));
    assert!(
        exchange(&mut raw, b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n")
            .await?
            .starts_with("-NOAUTH HELLO must be called")
    );
    let hello = exchange(
        &mut raw,
        b"*5\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n$6\r\ns3cret\r\n",
    )
    .await?;
    assert!(hello.starts_with("%7\r\n") && hello.contains("proto\r\n:3"), "{hello:?}");
    assert_eq!(exchange(&mut raw, b"*1\r\n$4\r\nPING\r\n").await?, "+PONG\r\n");

    // Through the client: the default user's password in the URL.
    let mut default = connect(&cluster, 0, ":s3cret@", "?protocol=resp3").await?;
    let _: () = default.set("k", "v").await?;
    assert_eq!(default.get::<_, String>("k").await?, "v");
    let denied = error_of(&mut default, &[b"GET", b"team:x"]).await?;
    assert!(denied.to_uppercase().contains("NOPERM") && denied.contains("may not read"), "{denied}");
    let mut alice = connect(&cluster, 0, "alice:a-pass@", "").await?;
    let _: () = alice.set("team:x", "1").await?;
    let mut bob = connect(&cluster, 0, "bob:b-pass@", "").await?;
    assert_eq!(bob.get::<_, String>("team:x").await?, "1", "bob may read");
    let refused = error_of(&mut bob, &[b"SET", b"team:x", b"2"]).await?;
    assert!(refused.to_uppercase().contains("NOPERM") && refused.contains("may not write"), "{refused}");
    let wrong = redis::Client::open(format!("redis://alice:b-pass@{addr}/"))?
        .get_multiplexed_async_connection()
        .await;
    // redis-rs reports WRONGPASS as an authentication failure.
    let wrong = wrong.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(wrong.contains("AuthenticationFailed") || wrong.contains("WRONGPASS"), "{wrong}");
    Ok(())
}

/// Sends `request` and reads what arrives within a second of the first byte (one reply in these tests).
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> anyhow::Result<String> {
    stream.write_all(request).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Batch loads of keyspace `users` a node ran for its clients (`distcache_requests_total{op="get_many"}`).
async fn get_many_requests(admin: SocketAddr) -> anyhow::Result<u64> {
    let (_, text) = http_get(admin, "/metrics").await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("distcache_requests_total{")
                && l.contains("op=\"get_many\"")
                && l.contains("keyspace=\"users\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// `distcache_resp_disconnects_total{reason}` of a node.
async fn disconnects(admin: SocketAddr, reason: &str) -> anyhow::Result<u64> {
    let (_, text) = http_get(admin, "/metrics").await?;
    let prefix = format!("distcache_resp_disconnects_total{{reason=\"{reason}\"}} ");
    Ok(text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0))
}

#[tokio::test]
async fn a_client_that_does_not_read_its_replies_is_disconnected_at_the_output_limit() -> anyhow::Result<()> {
    let (_data, origin) = origin_with(&[]).await?;
    let cluster = cluster(1, &keyspaces(&origin, "")?, "defaultKeyspace: kv, maxOutputBytes: 1Mi").await?;
    let addr = resp_addr(&cluster, 0)?;
    let mut c = connect(&cluster, 0, "", "").await?;
    let _: () = c.set("big", vec![b'x'; 512 << 10]).await?;

    // 4,000 GETs of a 512 KiB value (2 GB of replies) sent without reading one reply. The node must cut the
    // client off, not queue the replies.
    let mut greedy = TcpStream::connect(addr).await?;
    let request = b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n".repeat(4000);
    // The node may close the connection before all of it is sent: a write error then is the expected outcome.
    let _ = tokio::time::timeout(Duration::from_secs(20), greedy.write_all(&request)).await;
    wait_for(Duration::from_secs(20), "the greedy client disconnected for output_limit", || async {
        Ok(disconnects(cluster.nodes[0].admin, "output_limit").await? == 1)
    })
    .await?;
    // The connection is closed: what the client still reads ends, well short of 2 GB.
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match greedy.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the connection was not closed");
    assert!(received < 256 << 20, "received {received} bytes: the backlog was not bounded");
    // Others are served as before.
    assert_eq!(c.get::<_, Vec<u8>>("big").await?.len(), 512 << 10);
    Ok(())
}

#[tokio::test]
async fn connection_limit_idle_timeout_and_protocol_errors() -> anyhow::Result<()> {
    let (_data, origin) = origin_with(&[]).await?;
    let fields = "defaultKeyspace: kv, maxConnections: 2, idleTimeout: 1s";
    let cluster = cluster(1, &keyspaces(&origin, "")?, fields).await?;
    let addr = resp_addr(&cluster, 0)?;
    let admin = cluster.nodes[0].admin;

    let mut first = TcpStream::connect(addr).await?;
    let mut second = TcpStream::connect(addr).await?;
    assert_eq!(exchange(&mut first, b"PING\r\n").await?, "+PONG\r\n", "inline commands work");
    assert_eq!(exchange(&mut second, b"*1\r\n$4\r\nPING\r\n").await?, "+PONG\r\n");
    let mut third = TcpStream::connect(addr).await?;
    let mut refused = String::new();
    tokio::time::timeout(Duration::from_secs(5), third.read_to_string(&mut refused)).await??;
    assert_eq!(refused, "-ERR max number of clients reached\r\n");

    // Both idle past 1 s: closed by the node.
    for stream in [&mut first, &mut second] {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await??;
        assert!(rest.is_empty());
    }
    wait_for(Duration::from_secs(5), "two idle disconnects counted", || async {
        Ok(disconnects(admin, "idle").await? == 2)
    })
    .await?;

    // A malformed request: the error, then the connection closes.
    let mut bad = TcpStream::connect(addr).await?;
    bad.write_all(b"*1\r\n$x\r\n").await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), bad.read_to_string(&mut answer)).await??;
    assert_eq!(answer, "-ERR Protocol error: invalid bulk length\r\n");
    assert_eq!(disconnects(admin, "protocol_error").await?, 1);
    Ok(())
}
