//! The RESP front end driven by real Redis clients, against `distcache-node` processes: redis-py 5 (RESP3, HELLO 3
//! AUTH), ioredis 5 (RESP2, AUTH and an INFO ready check), redis-cli and redis-benchmark from Debian's redis-tools.
//! Each cluster has two nodes, a keyspace `users` read through the `http-json` hook from the in-process origin, and
//! a cache-aside keyspace `kv`, the RESP default keyspace (so redis-benchmark's `key:000000000042` lands there).
//! What each test proves:
//!
//! - [`redis_py_over_resp3_with_a_password`] and [`ioredis_with_a_password`]: the client scripts of `tests/clients`
//!   (handshake, SET/GET, MGET, DEL, EXPIRE/TTL, a pipeline of 100 commands, and a read-through GET of a key that
//!   the other node owns) pass against a node with `password` set, and the read-through key cost the origin one
//!   request.
//! - [`redis_cli_reads_writes_and_reads_through_any_node`]: PING, SET on one node and GET on the other, and a GET of
//!   a cold `users:` key through the node that does not own it answers the origin's value, fetched once.
//! - [`redis_cli_authenticates_and_refuses_a_wrong_password`]: `--pass` works, no password is NOAUTH, a wrong one is
//!   WRONGPASS (through `--pass` and through an AUTH command).
//! - [`redis_benchmark_set_get_gets_no_error_reply`]: redis-benchmark `-t set,get -n 20000 -c 20 -P 4 -d 100`, with
//!   AUTH, finishes both tests and prints no error.
//!
//! The client libraries come from `make setup` (`tests/clients/install.sh`), in `/var/cache/distcache/clients` or
//! `$DISTCACHE_CLIENTS_DIR`; without them the tests fail at once saying so. Every external process runs with a
//! deadline and is killed by its PID when it passes it. Run after `cargo build --workspace --bins` (the tests start
//! the built node binary) with the `wasm32-wasip2` target installed (the hook is built on first use).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use distcache_tests::{hook_module, http_get, origin::Origin, procs::ProcCluster, repo_root, wait_for};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const PASSWORD: &str = "secret";
/// How long one client script or redis-cli call may take before it is killed.
const CLIENT_DEADLINE: Duration = Duration::from_mins(1);
/// How long the redis-benchmark run may take (40,000 requests against a debug build).
const BENCHMARK_DEADLINE: Duration = Duration::from_mins(3);

// ---------------------------------------------------------------------------------------------------------------
// Helpers: the installed clients, external processes with deadlines, the cluster and its origin.
// ---------------------------------------------------------------------------------------------------------------

/// Where `make setup` installs the client libraries.
fn clients_dir() -> PathBuf {
    std::env::var_os("DISTCACHE_CLIENTS_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/distcache/clients"), PathBuf::from)
}

/// `path`, or an error that says how to get it.
fn installed(path: PathBuf, what: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        path.exists(),
        "{what} not found at {}: run make setup (as root; it installs the test clients into {}, or where \
         DISTCACHE_CLIENTS_DIR says)",
        path.display(),
        clients_dir().display()
    );
    Ok(path)
}

/// A program on PATH (redis-cli, redis-benchmark, node), or an error that says how to get it.
fn on_path(program: &str, package: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!("{program} not found on PATH: run make setup (it installs Debian's {package})")
        })
}

/// A command for `program` with `args`, whose output is collected and which is killed when dropped.
fn command(program: &Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    cmd
}

/// Runs `cmd` to its end, or kills it (SIGKILL to its PID, through `kill_on_drop`) once `within` has passed.
async fn run(mut cmd: tokio::process::Command, within: Duration) -> anyhow::Result<Output> {
    let shown = format!("{:?}", cmd.as_std());
    let child = cmd.spawn().with_context(|| format!("cannot start {shown}"))?;
    // On the deadline the wait is dropped, and with it the child, which kill_on_drop kills by its PID.
    tokio::time::timeout(within, child.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("{shown} still running after {within:?}; killed"))?
        .with_context(|| format!("waiting for {shown}"))
}

/// Runs `cmd` and requires exit status 0; its stdout.
async fn run_ok(cmd: tokio::process::Command, within: Duration) -> anyhow::Result<String> {
    let shown = format!("{:?}", cmd.as_std());
    let out = run(cmd, within).await?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "{shown} failed ({}):\n{stdout}\n{stderr}", out.status);
    Ok(stdout.into_owned())
}

/// What the origin answers for `users:<key>` (the file `items/<key>.json`).
fn value_of(key: &str) -> String {
    format!("{{\"id\":\"{key}\",\"via\":\"origin\"}}")
}

/// A two-node cluster with the RESP front end on (`resp_fields` added to each node's `resp` section), keyspace
/// `users` read through the origin and cache-aside `kv`; ready, serving both, and answering RESP.
struct Bed {
    cluster: ProcCluster,
    origin: Origin,
    data: tempfile::TempDir,
}

impl Bed {
    async fn start(resp_fields: &str) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        std::fs::create_dir_all(data.path().join("items"))?;
        let origin = Origin::start("127.0.0.1:0".parse()?, data.path()).await?;
        let keyspaces = format!(
            "keyspaces:
  - name: users
    maxBytes: 16Mi
    ttl: 5m
    hook:
      module: {{ path: \"{module}\" }}
      config: {{ baseUrl: \"{base}/items\" }}
      allowedHosts: [\"{host}\"]
  - name: kv
    maxBytes: 64Mi
",
            module = hook_module("http_json")?.display(),
            base = origin.url(),
            host = origin.addr,
        );
        // One event loop per node (`workerThreads: 1`, the current-thread runtime `make bench` measures): the
        // real clients, read-through over the peer path and the hook all run on it.
        let cluster = ProcCluster::start_resp(2, &keyspaces, "workerThreads: 1", resp_fields)?;
        let bed = Self { cluster, origin, data };
        bed.cluster.wait_views(&[0, 1], &["node-1", "node-2"], Duration::from_secs(30)).await?;
        for node in &bed.cluster.nodes {
            let (admin, resp) = (node.admin, bed.resp(&node.name)?);
            let what = format!("{} serving users and answering RESP", node.name);
            let ready = wait_for(Duration::from_secs(30), &what, || async move {
                let keyspaces = http_get(admin, "/admin/keyspaces").await;
                let users = matches!(keyspaces, Ok((200, body)) if body.contains("\"users\""));
                Ok(users && resp_listening(resp).await)
            })
            .await;
            ready.map_err(|e| e.context(bed.cluster.logs()))?;
        }
        Ok(bed)
    }

    /// The RESP address of the node called `name`.
    fn resp(&self, name: &str) -> anyhow::Result<SocketAddr> {
        let node = self.cluster.nodes.iter().find(|n| n.name == name).context("no such node")?;
        node.resp.context("the node has no RESP address")
    }

    /// A `users` key that node `owner` (index) owns, with its value in the origin; cold.
    fn origin_key(&self, prefix: &str, owner: usize) -> anyhow::Result<String> {
        let key = (0..1000)
            .map(|i| format!("{prefix}{i}"))
            .find(|k| self.cluster.owner_of(k) == owner)
            .context("no key of 1000 is owned by that node")?;
        std::fs::write(self.data.path().join("items").join(format!("{key}.json")), value_of(&key))?;
        Ok(key)
    }

    /// Requests the origin received for `users:<key>`.
    fn fetches(&self, key: &str) -> u64 {
        self.origin.hits(&format!("/items/{key}"))
    }
}

/// True when `addr` answers a RESP PING (with PONG, or NOAUTH when a password is set).
async fn resp_listening(addr: SocketAddr) -> bool {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await?;
        std::io::Result::Ok(buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"))
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), exchange).await, Ok(Ok(true)))
}

/// redis-cli against `addr` with `args`: stdout and stderr.
async fn redis_cli(addr: SocketAddr, args: &[&str]) -> anyhow::Result<(String, String)> {
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let mut all = vec!["-h", &host, "-p", &port];
    all.extend_from_slice(args);
    let out = run(command(&on_path("redis-cli", "redis-tools")?, &all), CLIENT_DEADLINE).await?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim_end().to_owned();
    Ok((text(&out.stdout), text(&out.stderr)))
}

/// redis-cli's stdout for `args`, requiring an empty stderr.
async fn cli(addr: SocketAddr, args: &[&str]) -> anyhow::Result<String> {
    let (stdout, stderr) = redis_cli(addr, args).await?;
    anyhow::ensure!(stderr.is_empty(), "redis-cli {args:?}: stderr {stderr:?} (stdout {stdout:?})");
    Ok(stdout)
}

/// Runs a client script of `tests/clients` against `addr` (with the password, the scratch keys in `kv`, and the
/// read-through key and its value).
async fn run_script(program: &Path, script: &str, addr: SocketAddr, key: &str) -> anyhow::Result<String> {
    let script = repo_root().join("tests/clients").join(script);
    let (host, port, rt_key, rt_value) =
        (addr.ip().to_string(), addr.port().to_string(), format!("users:{key}"), value_of(key));
    let args = [
        script.to_str().context("non-UTF-8 path")?,
        "--host",
        &host,
        "--port",
        &port,
        "--password",
        PASSWORD,
        "--prefix",
        "kv:",
        "--read-through-key",
        &rt_key,
        "--read-through-value",
        &rt_value,
    ];
    let mut cmd = command(program, &args);
    cmd.env("NODE_PATH", clients_dir().join("node/node_modules"));
    run_ok(cmd, CLIENT_DEADLINE).await
}

// ---------------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn redis_py_over_resp3_with_a_password() -> anyhow::Result<()> {
    let python = installed(clients_dir().join("python/bin/python"), "the redis-py virtual environment")?;
    let bed = Bed::start(&format!("defaultKeyspace: kv, password: {PASSWORD}")).await?;
    let key = bed.origin_key("py-", 1)?;
    let out = run_script(&python, "redis_py_check.py", bed.resp("node-1")?, &key)
        .await
        .map_err(|e| e.context(bed.cluster.logs()))?;
    assert!(out.contains("redis-py: all checks passed"), "{out}");
    assert_eq!(bed.fetches(&key), 1, "the read-through GET of users:{key} asks the origin once");
    Ok(())
}

#[tokio::test]
async fn ioredis_with_a_password() -> anyhow::Result<()> {
    installed(clients_dir().join("node/node_modules/ioredis/package.json"), "ioredis")?;
    let node = on_path("node", "nodejs")?;
    let bed = Bed::start(&format!("defaultKeyspace: kv, password: {PASSWORD}")).await?;
    let key = bed.origin_key("js-", 1)?;
    let out = run_script(&node, "ioredis_check.js", bed.resp("node-1")?, &key)
        .await
        .map_err(|e| e.context(bed.cluster.logs()))?;
    assert!(out.contains("ioredis: all checks passed"), "{out}");
    assert_eq!(bed.fetches(&key), 1, "the read-through GET of users:{key} asks the origin once");
    Ok(())
}

#[tokio::test]
async fn redis_cli_reads_writes_and_reads_through_any_node() -> anyhow::Result<()> {
    let bed = Bed::start("defaultKeyspace: kv").await?;
    let (one, two) = (bed.resp("node-1")?, bed.resp("node-2")?);
    assert_eq!(cli(one, &["PING"]).await?, "PONG");
    assert_eq!(cli(one, &["SET", "kv:cli-greeting", "hello there"]).await?, "OK");
    assert_eq!(
        cli(two, &["GET", "kv:cli-greeting"]).await?,
        "hello there",
        "a write is read through the other node"
    );
    assert_eq!(cli(two, &["SET", "no-keyspace-prefix", "in kv"]).await?, "OK");
    assert_eq!(
        cli(one, &["GET", "kv:no-keyspace-prefix"]).await?,
        "in kv",
        "a key without a keyspace goes to kv"
    );

    // A cold key that node-2 owns, read through node-1: the origin's value, fetched once; then a hit on both nodes.
    let key = bed.origin_key("cli-", 1)?;
    let rt = format!("users:{key}");
    assert_eq!(
        cli(one, &["GET", &rt]).await?,
        value_of(&key),
        "read-through GET on the node that does not own it"
    );
    assert_eq!(bed.fetches(&key), 1);
    assert_eq!(cli(two, &["GET", &rt]).await?, value_of(&key));
    assert_eq!(cli(one, &["GET", &rt]).await?, value_of(&key));
    assert_eq!(bed.fetches(&key), 1, "later reads of users:{key} are hits");
    assert_eq!(cli(one, &["GET", "users:not-in-the-origin"]).await?, "", "a key the origin lacks is nil");
    Ok(())
}

#[tokio::test]
async fn redis_cli_authenticates_and_refuses_a_wrong_password() -> anyhow::Result<()> {
    let bed = Bed::start(&format!("defaultKeyspace: kv, password: {PASSWORD}")).await?;
    let addr = bed.resp("node-2")?;
    let auth = ["--pass", PASSWORD, "--no-auth-warning"];
    assert_eq!(cli(addr, &[&auth[..], &["PING"]].concat()).await?, "PONG");
    assert_eq!(cli(addr, &[&auth[..], &["SET", "kv:cli-secret", "v"]].concat()).await?, "OK");
    assert_eq!(cli(addr, &[&auth[..], &["GET", "kv:cli-secret"]].concat()).await?, "v");

    let (stdout, _) = redis_cli(addr, &["GET", "kv:cli-secret"]).await?;
    assert!(stdout.starts_with("NOAUTH"), "no password: {stdout:?}");
    // redis-cli reports a failed AUTH on stderr and then runs the command unauthenticated.
    let (stdout, stderr) =
        redis_cli(addr, &["--pass", "wrong", "--no-auth-warning", "GET", "kv:cli-secret"]).await?;
    assert!(stderr.contains("WRONGPASS"), "wrong password: stderr {stderr:?}");
    assert!(stdout.starts_with("NOAUTH"), "wrong password: stdout {stdout:?}");
    let (stdout, _) = redis_cli(addr, &["AUTH", "wrong"]).await?;
    assert!(stdout.starts_with("WRONGPASS"), "AUTH wrong: {stdout:?}");
    let (stdout, _) = redis_cli(addr, &["AUTH", "default", "wrong"]).await?;
    assert!(stdout.starts_with("WRONGPASS"), "AUTH default wrong: {stdout:?}");
    Ok(())
}

#[tokio::test]
async fn redis_benchmark_set_get_gets_no_error_reply() -> anyhow::Result<()> {
    let benchmark = on_path("redis-benchmark", "redis-tools")?;
    let bed = Bed::start(&format!("defaultKeyspace: kv, password: {PASSWORD}")).await?;
    let addr = bed.resp("node-1")?;
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    // Random keys of 1,000 (key:000000000000 ..), so both nodes own some (node-1 forwards the others' writes), and
    // 20,000 SETs write each of them (all but with probability e^-20).
    let mut args = vec!["-h", &host, "-p", &port, "-a", PASSWORD, "-t", "set,get", "-n", "20000", "-c", "20"];
    args.extend(["-P", "4", "-d", "100", "-r", "1000", "-q"]);
    // redis-benchmark 7 exits at the first error reply, printing "Error from server: …" on stderr (its -e only
    // warns that it has no effect); an older one counts error replies as answers unless -e makes it print them.
    let version = run_ok(command(&benchmark, &["--version"]), CLIENT_DEADLINE).await?;
    let major: u32 =
        version.split_whitespace().nth(1).and_then(|v| v.split('.').next()?.parse().ok()).unwrap_or(0);
    if major < 7 {
        args.push("-e");
    }
    let out = run(command(&benchmark, &args), BENCHMARK_DEADLINE).await?;
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.split(['\r', '\n']).map(str::trim).filter(|l| !l.is_empty()).collect();
    let bad: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("ERR") || l.to_lowercase().contains("error") || l.contains("WARN"))
        .collect();
    let context = || format!("redis-benchmark {args:?} ({}):\n{text}\n{}", out.status, bed.cluster.logs());
    assert!(out.status.success() && bad.is_empty(), "error lines {bad:?} in {}", context());
    for test in ["SET", "GET"] {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("{test}: ")) && l.contains("requests per second")),
            "no {test} result in {}",
            context()
        );
    }
    // The keys it wrote are there, through the other node too.
    let mut exists = vec!["--pass", PASSWORD, "--no-auth-warning", "EXISTS"];
    let keys: Vec<String> = (0..10).map(|i| format!("key:{i:012}")).collect();
    exists.extend(keys.iter().map(String::as_str));
    assert_eq!(
        cli(bed.resp("node-2")?, &exists).await?,
        "10",
        "the first 10 keys of the range, written by SET"
    );
    Ok(())
}
