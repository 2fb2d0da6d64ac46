//! `distcache`: the command-line client of `DistCache` — read, write and delete keys, inspect keyspaces, members,
//! counters and hot keys, and benchmark a cluster. Human-readable output by default, `--json` for scripts.

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::IpAddr,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use base64::Engine;
use clap::{Args, Parser, Subcommand, ValueEnum};
use distcache_api::ByteSize;
use distcache_client::{
    Client, ClientBuilder, DEFAULT_ENDPOINT, Error, HotKey, KeyspaceInfo, KeyspaceStats, Member, MemberEvent,
    Stats, Value,
    bench::{self, BenchConfig, Phase},
};
use distcache_duration::format_duration;
use futures::StreamExt;
use serde_json::json;

const EXIT_ERROR: u8 = 1;
const EXIT_NOT_FOUND: u8 = 3;

/// Per-call deadline when `--timeout` is not given (except for `bench`, which has none unless asked).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The note `get` prints on stderr for a value the node answered stale.
const STALE_NOTE: &str =
    "(stale: the value has expired and was served while the data source refreshes it or is failing)";

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  error (connection failure, server error, invalid argument, ...)
  2  usage error (invalid command line)
  3  key not found (get, delete)

TLS: an https:// endpoint needs --tls-ca (the PEM bundle of the CA that signed the
node's certificate, e.g. the ca.crt of the cluster's TLS Secret); add --tls-cert and
--tls-key when the node requires client certificates. http:// and host:port are plain,
and TLS options with them are an error.";

/// Command-line client of distcache, the distributed read-through cache.
#[derive(Debug, Parser)]
#[command(name = "distcache", version, after_help = AFTER_HELP)]
struct Cli {
    /// gRPC endpoint of any distcache node: https://host:port (TLS), http://host:port or host:port (plain).
    #[arg(long, global = true, env = "DISTCACHE_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    endpoint: String,
    /// PEM bundle of the CA(s) the node's certificate must chain to; required for https:// endpoints.
    #[arg(long, global = true, env = "DISTCACHE_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for nodes that ask for one (with --tls-key).
    #[arg(long, global = true, env = "DISTCACHE_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of the client certificate (with --tls-cert).
    #[arg(long, global = true, env = "DISTCACHE_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Name the node's certificate must be valid for [default: the endpoint's host].
    #[arg(long, global = true, env = "DISTCACHE_TLS_SERVER_NAME", value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Print JSON instead of text (one document; one object per line for `members --watch`).
    #[arg(long, global = true)]
    json: bool,
    /// Deadline of each call, e.g. 500ms or 5s [default: 10s; bench: none].
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the value of a key (loaded from the data source on a miss in a read-through keyspace).
    ///
    /// An expired value the node answers anyway (the keyspace's staleWhileRevalidate or staleIfError window) is
    /// printed as usual, with a "(stale: ...)" note on stderr; with --json, "stale" is true.
    Get {
        /// Keyspace name (see `distcache keyspaces`).
        keyspace: String,
        /// The key.
        key: String,
    },
    /// Store a value.
    Put {
        /// Keyspace name.
        keyspace: String,
        /// The key.
        key: String,
        /// The value; `-` reads it from stdin (bytes as they are).
        value: String,
        /// Entry TTL, e.g. 30s or 5m [default: the keyspace's TTL].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Remove keys from the cache cluster-wide (the data source is not touched).
    Delete {
        /// Keyspace name.
        keyspace: String,
        /// One or more keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// List the keyspaces the node serves, with their effective settings.
    Keyspaces,
    /// List the cluster members as the node sees them.
    Members {
        /// Keep streaming membership changes until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Show the node's per-keyspace counters (this node only, not cluster-wide).
    ///
    /// CIRCUIT is the state of the data source's circuit breaker (closed, open, half_open; "-" without one),
    /// STALE the expired values answered stale, RATE_LIMITED the fetches refused by the rate limit. A line per
    /// keyspace with a warm-up follows the table. --json also carries each keyspace's hot keys.
    Stats {
        /// Only this keyspace.
        keyspace: Option<String>,
    },
    /// Show a keyspace's hottest keys: estimated recent reads, hottest first.
    ///
    /// By default the keys the node at --endpoint served most often recently (its own estimate: counts halve as
    /// time passes, and a node reports at most its 20 hottest). With --all-members, every member is asked and
    /// the hits are summed per key; a member that cannot be asked is reported on stderr and the exit code is 1.
    HotKeys {
        /// Keyspace name.
        keyspace: String,
        /// Show at most this many keys.
        #[arg(long, value_name = "N", default_value_t = 20, value_parser = parse_positive)]
        top: usize,
        /// Ask every member and sum the hits per key.
        ///
        /// Members advertise their peer address (host:peer-port). Each is dialled at that host, on its peer port
        /// shifted as the node at --endpoint's is: by the endpoint's port minus that node's peer port (7422 ->
        /// 7420 with the default ports), so the members' addresses must be reachable from here (not through a
        /// port-forward to one pod). The TLS options apply to every member; the certificate is checked against
        /// --tls-server-name, or else the endpoint's host name. A member that answers under another name is
        /// reported, not counted.
        #[arg(long)]
        all_members: bool,
    },
    /// Drop every entry of a keyspace on every node.
    Purge {
        /// Keyspace name.
        keyspace: String,
    },
    /// Closed-loop load generator: fixed concurrency, warm-up, then latency percentiles and throughput.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// What each request does (mixed = 90% get, 10% put).
    #[arg(long, value_enum, default_value_t = OpArg::Get)]
    op: OpArg,
    /// Concurrent requests (closed-loop tasks).
    #[arg(long, default_value_t = 50, value_parser = parse_positive)]
    concurrency: usize,
    /// HTTP/2 connections shared by the tasks [default: min(concurrency, 4)].
    #[arg(long, value_parser = parse_positive)]
    connections: Option<usize>,
    /// Length of the measured phase.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_positive_duration)]
    duration: Duration,
    /// Length of the discarded warm-up phase.
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    warmup: Duration,
    /// Number of distinct keys (key-00000000 ...), drawn uniformly at random.
    #[arg(long, default_value_t = 100_000, value_parser = parse_positive)]
    keys: usize,
    /// Bytes per value (a count or a quantity such as 1Ki).
    #[arg(long, default_value = "100", value_name = "BYTES", value_parser = parse_size)]
    value_size: usize,
    /// Keys per call; above 1 uses GetMany/PutMany.
    #[arg(long, default_value_t = 1, value_parser = parse_positive)]
    batch: usize,
    /// Keyspace to benchmark; it must exist.
    #[arg(long, default_value = "bench")]
    keyspace: String,
    /// Do not write every key before a get/mixed run.
    #[arg(long)]
    no_preload: bool,
    /// Give every request a key never used before (a per-run prefix and a counter) instead of drawing from
    /// --keys: against a read-through keyspace every get is a miss that runs the data source (the miss path).
    /// Nothing is preloaded.
    #[arg(long)]
    unique_keys: bool,
    /// Worker threads of the load generator. One by default, like redis-benchmark: on a machine shared with
    /// the server, more client threads take cores from the server under test.
    #[arg(long, default_value_t = 1, value_parser = parse_positive)]
    threads: usize,
    /// How the tasks call the node: `client`, the Rust client library (tonic), as an application does; or `h2`,
    /// a lean gRPC caller on the h2 crate that costs the load generator about half the CPU per call, so more of
    /// a shared machine is left to the server (what redis-benchmark is to Redis). Both use the TLS options.
    #[arg(long, value_enum, default_value_t = TransportArg::Client)]
    transport: TransportArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    Client,
    H2,
}

impl From<TransportArg> for bench::Transport {
    fn from(transport: TransportArg) -> Self {
        match transport {
            TransportArg::Client => Self::Client,
            TransportArg::H2 => Self::H2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OpArg {
    Get,
    Put,
    Mixed,
}

impl From<OpArg> for bench::Op {
    fn from(op: OpArg) -> Self {
        match op {
            OpArg::Get => Self::Get,
            OpArg::Put => Self::Put,
            OpArg::Mixed => Self::Mixed,
        }
    }
}

impl BenchArgs {
    fn connections(&self) -> usize {
        self.connections.unwrap_or_else(|| bench::default_connections(self.concurrency))
    }

    fn config(&self) -> BenchConfig {
        BenchConfig {
            op: self.op.into(),
            concurrency: self.concurrency,
            duration: self.duration,
            warmup: self.warmup,
            keys: self.keys,
            value_size: self.value_size,
            batch: self.batch,
            keyspace: self.keyspace.clone(),
            preload: !self.no_preload,
            unique_keys: self.unique_keys,
            transport: self.transport.into(),
        }
    }
}

/// A `--timeout`, `--ttl`, `--duration` or `--warmup` value: the duration grammar of the CRD and the keyspaces
/// file (`500ms`, `30s`, `5m`, `1h30m`, `7d`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    distcache_duration::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let duration = parse_duration(s)?;
    if duration.is_zero() { Err("must be greater than zero".to_owned()) } else { Ok(duration) }
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let size = s.parse::<ByteSize>().map_err(|e| e.to_string())?;
    usize::try_from(size.bytes()).map_err(|_| "too large".to_owned())
}

// The load generator allocates a request and a response per call; mimalloc keeps that cheap so the benchmark
// measures the server, not glibc malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread (every command but a multi-threaded bench) runs tokio's current-thread runtime: one event loop,
    // like redis-benchmark. A multi-thread runtime of one worker hands every wake-up of a call through its LIFO
    // slot, so each request is written on its own, where one event loop lets the requests that one read of
    // responses made ready leave together.
    let threads = match &cli.command {
        Command::Bench(args) => args.threads,
        _ => 1,
    };
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all();
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: failed to start the async runtime: {err}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        // A closed pipe (`distcache members --watch | head`) is the reader's choice, not an error.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|cause| cause.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe))
}

impl Cli {
    /// The client the command uses: the endpoint and the TLS options of the global flags.
    fn client_builder(&self, connections: usize, timeout: Option<Duration>) -> ClientBuilder {
        self.builder_for(&self.endpoint, connections, timeout)
    }

    /// A client of another member at `endpoint`, with the TLS options of the global flags. Without
    /// --tls-server-name, the certificate is checked against the host name of --endpoint (the name the
    /// cluster's nodes share, e.g. its Service), since members are dialled by address.
    fn member_builder(&self, endpoint: &str, timeout: Duration) -> ClientBuilder {
        let mut builder = self.builder_for(endpoint, 1, Some(timeout));
        if self.tls_server_name.is_none()
            && endpoint.starts_with("https://")
            && let Some(host) = endpoint_host(&self.endpoint)
        {
            builder = builder.tls_server_name(host);
        }
        builder
    }

    fn builder_for(&self, endpoint: &str, connections: usize, timeout: Option<Duration>) -> ClientBuilder {
        let mut builder = Client::builder(endpoint).connections(connections);
        if let Some(timeout) = timeout {
            builder = builder.timeout(timeout);
        }
        if let Some(ca) = &self.tls_ca {
            builder = builder.tls_ca_file(ca);
        }
        if let Some(cert) = &self.tls_cert {
            builder = builder.tls_cert_file(cert);
        }
        if let Some(key) = &self.tls_key {
            builder = builder.tls_key_file(key);
        }
        if let Some(name) = &self.tls_server_name {
            builder = builder.tls_server_name(name);
        }
        builder
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let (connections, timeout) = match &cli.command {
        Command::Bench(args) => (args.connections(), cli.timeout),
        _ => (1, Some(cli.timeout.unwrap_or(DEFAULT_TIMEOUT))),
    };
    let client = cli.client_builder(connections, timeout).connect().await?;
    let json = cli.json;
    match cli.command {
        Command::HotKeys { ref keyspace, top, all_members } => {
            let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
            hot_keys(&cli, &client, keyspace, top, all_members.then_some(timeout)).await
        }
        Command::Get { keyspace, key } => get(&client, json, &keyspace, &key).await,
        Command::Put { keyspace, key, value, ttl } => put(&client, json, &keyspace, &key, &value, ttl).await,
        Command::Delete { keyspace, keys } => delete(&client, json, &keyspace, keys).await,
        Command::Keyspaces => {
            let keyspaces = client.keyspaces().await?;
            emit(&if json { keyspaces_json(&keyspaces) } else { keyspaces_table(&keyspaces) })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Members { watch: false } => {
            let members = client.members().await?;
            emit(&if json { members_json(&members) } else { members_table(&members) })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Members { watch: true } => watch_members(&client, json).await,
        Command::Stats { keyspace } => {
            let stats = client.stats(keyspace.as_deref()).await?;
            emit(&if json { stats_json(&stats) } else { stats_table(&stats) })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Purge { keyspace } => {
            let nodes = client.purge(keyspace.as_str()).await?;
            emit(&if json {
                json!({ "keyspace": keyspace, "nodes": nodes }).to_string()
            } else {
                format!("purged {keyspace} on {nodes} node(s)")
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => run_bench(&client, json, &args).await,
    }
}

/// Writes one line (or block) to stdout, surfacing write errors instead of panicking like `println!`.
fn emit(text: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.write_all(b"\n")?;
    stdout.flush()
}

async fn get(client: &Client, json: bool, keyspace: &str, key: &str) -> anyhow::Result<ExitCode> {
    let Some(value) = client.get(keyspace, key).await? else {
        eprintln!("not found: {keyspace}/{key}");
        return Ok(ExitCode::from(EXIT_NOT_FOUND));
    };
    if json {
        emit(&value_json(keyspace, key, &value))?;
    } else {
        emit(&String::from_utf8_lossy(&value.value))?;
        if value.stale {
            eprintln!("{STALE_NOTE}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn put(
    client: &Client,
    json: bool,
    keyspace: &str,
    key: &str,
    value: &str,
    ttl: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let bytes = if value == "-" {
        let mut buffer = Vec::new();
        io::stdin().lock().read_to_end(&mut buffer).context("failed to read the value from stdin")?;
        buffer
    } else {
        value.as_bytes().to_vec()
    };
    client.put(keyspace, key, bytes, ttl).await?;
    emit(&if json {
        json!({ "keyspace": keyspace, "key": key, "stored": true }).to_string()
    } else {
        "stored".into()
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn delete(client: &Client, json: bool, keyspace: &str, keys: Vec<String>) -> anyhow::Result<ExitCode> {
    let results = if let [key] = keys.as_slice() {
        vec![client.delete(keyspace, key.as_str()).await]
    } else {
        client.delete_many(keyspace, keys.iter().map(String::as_str)).await?
    };
    let mut deleted = Vec::new();
    let mut failed = Vec::new();
    let mut code = ExitCode::SUCCESS;
    let mut any_error = false;
    for (key, result) in keys.iter().zip(results) {
        match result {
            Ok(()) => deleted.push(key.as_str()),
            Err(err) => {
                if err.is_not_found() {
                    eprintln!("not found: {keyspace}/{key}");
                    if !any_error {
                        code = ExitCode::from(EXIT_NOT_FOUND);
                    }
                } else {
                    eprintln!("error: {keyspace}/{key}: {err}");
                    any_error = true;
                    code = ExitCode::from(EXIT_ERROR);
                }
                failed.push(json!({ "key": key, "code": err.code() as i32, "message": err.to_string() }));
            }
        }
    }
    if json {
        emit(&json!({ "keyspace": keyspace, "deleted": deleted, "failed": failed }).to_string())?;
    } else if keys.len() == 1 {
        if failed.is_empty() {
            emit("deleted")?;
        }
    } else {
        emit(&format!("deleted {} of {} keys", deleted.len(), keys.len()))?;
    }
    Ok(code)
}

async fn watch_members(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let mut events = client.watch_members().await?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let event = tokio::select! {
            interrupted = &mut ctrl_c => {
                interrupted.context("failed to listen for Ctrl-C")?;
                return Ok(ExitCode::SUCCESS);
            }
            event = events.next() => event,
        };
        match event {
            Some(event) => {
                let event = event?;
                if json {
                    emit(&member_event_json(&event))?;
                } else if event == MemberEvent::SnapshotEnd {
                    eprintln!("(snapshot complete; watching for changes, Ctrl-C to stop)");
                } else {
                    emit(&member_event_line(&event))?;
                }
            }
            None => {
                return Err(Error::Unavailable("the node closed the membership stream".to_owned()).into());
            }
        }
    }
}

async fn run_bench(client: &Client, json: bool, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let config = args.config();
    let progress = |phase: Phase| {
        if !json {
            match phase {
                Phase::Preloading { keys } => eprintln!("preloading {keys} keys into {}...", config.keyspace),
                Phase::WarmingUp(d) if d.is_zero() => {}
                Phase::WarmingUp(d) => eprintln!("warming up for {}...", format_duration(d)),
                Phase::Measuring(d) => eprintln!("measuring for {}...", format_duration(d)),
            }
        }
    };
    let report = bench::run_with_progress(client, &config, progress).await?;
    emit(&if json { serde_json::to_string(&report)? } else { report.to_string() })?;
    match (&report.first_error, report.all_failed()) {
        (Some(first), true) => eprintln!("error: every request failed; first error: {first}"),
        (None, true) => eprintln!("error: no request completed"),
        (Some(first), false) => eprintln!("warning: {} key(s) failed; first error: {first}", report.errors),
        (None, false) => {}
    }
    Ok(if report.all_failed() { ExitCode::from(EXIT_ERROR) } else { ExitCode::SUCCESS })
}

fn millis(duration: Option<Duration>) -> Option<u64> {
    duration.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn value_json(keyspace: &str, key: &str, value: &Value) -> String {
    let mut doc =
        json!({ "keyspace": keyspace, "key": key, "ttl_ms": millis(value.ttl), "stale": value.stale });
    match std::str::from_utf8(&value.value) {
        Ok(text) => doc["value"] = json!(text),
        Err(_) => doc["value_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&value.value)),
    }
    doc.to_string()
}

fn optional_duration(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "-".to_owned(), |d| format_duration(d).to_string())
}

fn keyspaces_table(keyspaces: &[KeyspaceInfo]) -> String {
    let rows = keyspaces.iter().map(|k| {
        vec![
            k.name.clone(),
            ByteSize(k.max_bytes).to_string(),
            optional_duration(k.ttl),
            optional_duration(k.negative_ttl),
            optional_duration(k.fetch_timeout),
            k.read_through.to_string(),
        ]
    });
    table(&["NAME", "MAX_BYTES", "TTL", "NEGATIVE_TTL", "FETCH_TIMEOUT", "READ_THROUGH"], rows)
}

fn keyspaces_json(keyspaces: &[KeyspaceInfo]) -> String {
    let keyspaces: Vec<_> = keyspaces
        .iter()
        .map(|k| {
            json!({
                "name": k.name,
                "max_bytes": k.max_bytes,
                "ttl_ms": millis(k.ttl),
                "negative_ttl_ms": millis(k.negative_ttl),
                "fetch_timeout_ms": millis(k.fetch_timeout),
                "max_value_bytes": k.max_value_bytes,
                "read_through": k.read_through,
            })
        })
        .collect();
    json!({ "keyspaces": keyspaces }).to_string()
}

fn members_table(members: &[Member]) -> String {
    let rows = members.iter().map(|m| vec![m.name.clone(), m.address.clone(), m.local.to_string()]);
    table(&["NAME", "ADDRESS", "LOCAL"], rows)
}

fn member_json(member: &Member) -> serde_json::Value {
    json!({ "name": member.name, "address": member.address, "local": member.local })
}

fn members_json(members: &[Member]) -> String {
    json!({ "members": members.iter().map(member_json).collect::<Vec<_>>() }).to_string()
}

fn member_event_parts(event: &MemberEvent) -> (&'static str, Option<&Member>) {
    match event {
        MemberEvent::Join(m) => ("join", Some(m)),
        MemberEvent::Leave(m) => ("leave", Some(m)),
        MemberEvent::Update(m) => ("update", Some(m)),
        MemberEvent::SnapshotEnd => ("snapshot_end", None),
    }
}

fn member_event_json(event: &MemberEvent) -> String {
    let (kind, member) = member_event_parts(event);
    let mut doc = json!({ "type": kind });
    if let Some(member) = member {
        doc["member"] = member_json(member);
    }
    doc.to_string()
}

fn member_event_line(event: &MemberEvent) -> String {
    let (kind, member) = member_event_parts(event);
    match member {
        Some(m) => format!(
            "{:<7} {} {}{}",
            kind.to_uppercase(),
            m.name,
            m.address,
            if m.local { " (local)" } else { "" }
        ),
        None => kind.to_uppercase(),
    }
}

fn stats_table(stats: &Stats) -> String {
    let rows = stats.keyspaces.iter().map(|k| {
        let mut row = vec![k.name.clone()];
        row.extend(
            [
                k.hits,
                k.hot_hits,
                k.misses,
                k.source_fetches,
                k.entries,
                k.bytes,
                k.evictions,
                k.forwarded,
                k.owner_fallbacks,
            ]
            .iter()
            .map(u64::to_string),
        );
        row.push(if k.circuit_state.is_empty() { "-".to_owned() } else { k.circuit_state.clone() });
        row.push(k.stale_served.to_string());
        row.push(k.rate_limited.to_string());
        row
    });
    let headers = [
        "KEYSPACE",
        "HITS",
        "HOT_HITS",
        "MISSES",
        "SOURCE_FETCHES",
        "ENTRIES",
        "BYTES",
        "EVICTIONS",
        "FORWARDED",
        "OWNER_FALLBACKS",
        "CIRCUIT",
        "STALE",
        "RATE_LIMITED",
    ];
    let mut out = format!("node {} ({} members)\n{}", stats.node, stats.members, table(&headers, rows));
    for line in stats.keyspaces.iter().filter_map(warm_up_line) {
        out.push('\n');
        out.push_str(&line);
    }
    out
}

/// `warm-up users: 12/12 owned keys loaded or present (30 listed), 0 failed, done`; `None` without a warm-up.
fn warm_up_line(stats: &KeyspaceStats) -> Option<String> {
    let w = stats.warm_up?;
    Some(format!(
        "warm-up {}: {}/{} owned keys loaded or present ({} listed), {} failed, {}",
        stats.name,
        u64::from(w.loaded) + u64::from(w.present),
        w.owned,
        w.listed,
        w.failed,
        if w.done { "done" } else { "in progress" }
    ))
}

fn hot_keys_json(keys: &[HotKey]) -> serde_json::Value {
    keys.iter().map(|h| json!({ "key": h.key, "hits": h.hits })).collect()
}

fn stats_json(stats: &Stats) -> String {
    let keyspaces: Vec<_> = stats
        .keyspaces
        .iter()
        .map(|k| {
            json!({
                "name": k.name,
                "hits": k.hits,
                "hot_hits": k.hot_hits,
                "misses": k.misses,
                "source_fetches": k.source_fetches,
                "entries": k.entries,
                "bytes": k.bytes,
                "evictions": k.evictions,
                "forwarded": k.forwarded,
                "owner_fallbacks": k.owner_fallbacks,
                "circuit_state": (!k.circuit_state.is_empty()).then_some(&k.circuit_state),
                "stale_served": k.stale_served,
                "rate_limited": k.rate_limited,
                "hot_keys": hot_keys_json(&k.hot_keys),
                "warm_up": k.warm_up.map(|w| json!({
                    "listed": w.listed,
                    "owned": w.owned,
                    "loaded": w.loaded,
                    "present": w.present,
                    "failed": w.failed,
                    "done": w.done,
                })),
            })
        })
        .collect();
    json!({ "node": stats.node, "members": stats.members, "keyspaces": keyspaces }).to_string()
}

/// What `hot-keys` found: the nodes whose estimates were summed, the members that could not be asked, and the
/// merged keys.
#[derive(Debug, Default)]
struct HotKeysReport {
    keyspace: String,
    /// Names of the nodes that answered, the one at --endpoint first.
    nodes: Vec<String>,
    /// Members that could not be asked: name, endpoint dialled (when one was derived), why.
    failed: Vec<(String, Option<String>, String)>,
    /// Hottest first, at most --top.
    keys: Vec<HotKey>,
}

async fn hot_keys(
    cli: &Cli,
    client: &Client,
    keyspace: &str,
    top: usize,
    all_members: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    // The node at --endpoint first: an unknown keyspace fails here with the node's own message.
    let (node, keys) = node_hot_keys(client, keyspace).await?;
    let mut report = HotKeysReport { keyspace: keyspace.to_owned(), nodes: vec![node], ..Default::default() };
    let mut lists = vec![keys];
    if let Some(timeout) = all_members {
        let members = client.members().await?;
        let local = members
            .iter()
            .find(|m| m.local)
            .ok_or_else(|| Error::Protocol("the node's member list does not include itself".to_owned()))?;
        // Behind a load balancer a reconnection may reach another node: its list would be the wrong one to
        // leave the answering node out of.
        if local.name != report.nodes[0] {
            anyhow::bail!(
                "{} answered as {} and then as {}: point --endpoint at one node",
                cli.endpoint,
                report.nodes[0],
                local.name
            );
        }
        let others: Vec<&Member> = members.iter().filter(|m| !m.local).collect();
        let answers = futures::future::join_all(
            others.iter().map(|member| member_hot_keys(cli, keyspace, local, member, timeout)),
        )
        .await;
        for (member, answer) in others.into_iter().zip(answers) {
            match answer {
                Ok(keys) => {
                    report.nodes.push(member.name.clone());
                    lists.push(keys);
                }
                Err((endpoint, err)) => {
                    report.failed.push((member.name.clone(), endpoint, format!("{err:#}")));
                }
            }
        }
    }
    report.keys = merge_hot_keys(lists, top);
    for (name, endpoint, message) in &report.failed {
        let at = endpoint.as_deref().map(|e| format!(" at {e}")).unwrap_or_default();
        eprintln!("error: member {name}{at} not counted: {message}");
    }
    emit(&if cli.json { hot_keys_report_json(&report) } else { hot_keys_report_table(&report) })?;
    Ok(if report.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_ERROR) })
}

/// The answering node's name and its hot keys of `keyspace`.
async fn node_hot_keys(client: &Client, keyspace: &str) -> Result<(String, Vec<HotKey>), Error> {
    let stats = client.stats(Some(keyspace)).await?;
    match stats.keyspaces.into_iter().find(|k| k.name == keyspace) {
        Some(found) => Ok((stats.node, found.hot_keys)),
        None => Err(Error::UnknownKeyspace(format!("node {} reported no keyspace {keyspace:?}", stats.node))),
    }
}

/// The hot keys of one other member, dialled at its client endpoint; the error comes with that endpoint when
/// it could be derived.
async fn member_hot_keys(
    cli: &Cli,
    keyspace: &str,
    local: &Member,
    member: &Member,
    timeout: Duration,
) -> Result<Vec<HotKey>, (Option<String>, anyhow::Error)> {
    let endpoint = member_endpoint(&cli.endpoint, &local.address, &member.address)
        .map_err(|message| (None, anyhow::anyhow!(message)))?;
    let fail = |err: anyhow::Error| (Some(endpoint.clone()), err);
    let client = cli.member_builder(&endpoint, timeout).connect().await.map_err(|e| fail(e.into()))?;
    let (node, keys) = node_hot_keys(&client, keyspace).await.map_err(|e| fail(e.into()))?;
    if node != member.name {
        return Err(fail(anyhow::anyhow!(
            "the node there is {node}: the member's client port is not where --all-members looks for it"
        )));
    }
    Ok(keys)
}

/// The client endpoint of a member whose advertised (peer) address is `member_peer`: the same host, and the
/// port shifted as far from its peer port as the endpoint's port is from the peer port of the node at the
/// endpoint (`local_peer`); the endpoint's scheme.
fn member_endpoint(endpoint: &str, local_peer: &str, member_peer: &str) -> Result<String, String> {
    let uri = endpoint_uri(endpoint)?;
    let scheme = uri.scheme_str().unwrap_or("http");
    let endpoint_port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    let (_, local_port) = split_address(local_peer)?;
    let (host, member_port) = split_address(member_peer)?;
    let port = i32::from(member_port) + i32::from(endpoint_port) - i32::from(local_port);
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("no client port follows from the member address {member_peer}"))?;
    Ok(format!("{scheme}://{host}:{port}"))
}

/// The endpoint as a URI, `http://` when it has no scheme (as the client reads it).
fn endpoint_uri(endpoint: &str) -> Result<tonic::transport::Uri, String> {
    let endpoint = endpoint.trim();
    let full = if endpoint.contains("://") { endpoint.to_owned() } else { format!("http://{endpoint}") };
    full.parse().map_err(|e| format!("invalid endpoint {endpoint:?}: {e}"))
}

/// `host:port` (`[v6]:port` too) into the host, brackets kept, and the port.
fn split_address(address: &str) -> Result<(&str, u16), String> {
    address
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host, port.parse().ok()?)))
        .filter(|(host, _)| !host.is_empty())
        .ok_or_else(|| format!("member address {address:?} is not host:port"))
}

/// The host of an endpoint when it is a name (not an IP address): what a TLS certificate shared by the cluster's
/// nodes carries.
fn endpoint_host(endpoint: &str) -> Option<String> {
    let uri = endpoint_uri(endpoint).ok()?;
    let host = uri.host()?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_err().then(|| host.to_owned())
}

/// Sums the hits per key over the nodes' lists; hottest first (ties by key), at most `top`.
fn merge_hot_keys(lists: impl IntoIterator<Item = Vec<HotKey>>, top: usize) -> Vec<HotKey> {
    let mut sums: HashMap<String, u64> = HashMap::new();
    for HotKey { key, hits } in lists.into_iter().flatten() {
        let sum = sums.entry(key).or_default();
        *sum = sum.saturating_add(hits);
    }
    let mut keys: Vec<HotKey> = sums.into_iter().map(|(key, hits)| HotKey { key, hits }).collect();
    keys.sort_by(|a, b| b.hits.cmp(&a.hits).then_with(|| a.key.cmp(&b.key)));
    keys.truncate(top);
    keys
}

fn hot_keys_report_table(report: &HotKeysReport) -> String {
    let summed = if report.nodes.len() > 1 { ", summed over the nodes" } else { "" };
    let mut out = format!(
        "hot keys of {} on {} (estimated recent reads{summed})\n",
        report.keyspace,
        report.nodes.join(", ")
    );
    out.push_str(&table(
        &["KEY", "HITS"],
        report.keys.iter().map(|h| vec![h.key.clone(), h.hits.to_string()]),
    ));
    if report.keys.is_empty() {
        out.push_str("\n(none yet: no key was read often enough recently)");
    }
    out
}

fn hot_keys_report_json(report: &HotKeysReport) -> String {
    let failed: Vec<_> = report
        .failed
        .iter()
        .map(|(name, endpoint, message)| json!({ "name": name, "endpoint": endpoint, "message": message }))
        .collect();
    json!({
        "keyspace": report.keyspace,
        "nodes": report.nodes,
        "failed": failed,
        "hot_keys": hot_keys_json(&report.keys),
    })
    .to_string()
}

/// Left-aligned columns separated by two spaces, like `kubectl get`.
fn table(headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.into_iter().collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    std::iter::once(&header_row)
        .chain(&rows)
        .map(|row| {
            let line: Vec<String> =
                row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
            line.join("  ").trim_end().to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use clap::error::ErrorKind;
    use distcache_client::WarmUp;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("distcache").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_use_go_notation() {
        let cli = parse(&["put", "users", "42", "alice", "--ttl", "1m30s"]).expect("valid");
        assert!(matches!(cli.command, Command::Put { ttl: Some(ttl), .. } if ttl == Duration::from_secs(90)));
        let cli = parse(&["--timeout", "250ms", "get", "users", "42"]).expect("valid");
        assert_eq!(cli.timeout, Some(Duration::from_millis(250)));
        // Global flags are accepted after the subcommand too.
        let cli = parse(&["get", "users", "42", "--timeout", "2s", "--json"]).expect("valid");
        assert_eq!(cli.timeout, Some(Duration::from_secs(2)));
        assert!(cli.json);
        for bad in ["5", "5x", "-1s", ""] {
            let flag = format!("--ttl={bad}");
            let err = parse(&["put", "ks", "k", "v", &flag]).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}");
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn bench_defaults_match_the_documentation() {
        let cli = parse(&["bench"]).expect("valid");
        let Command::Bench(args) = cli.command else { panic!("not bench") };
        assert_eq!(args.connections(), 4);
        assert_eq!(args.config(), BenchConfig::default());
    }

    #[test]
    fn bench_flags_parse() {
        let cli = parse(&[
            "bench",
            "--op",
            "mixed",
            "--concurrency",
            "2",
            "--duration",
            "500ms",
            "--warmup",
            "0s",
            "--keys",
            "10",
            "--value-size",
            "1Ki",
            "--batch",
            "16",
            "--keyspace",
            "k",
            "--no-preload",
        ])
        .expect("valid");
        let Command::Bench(args) = cli.command else { panic!("not bench") };
        assert_eq!(args.connections(), 2);
        let config = args.config();
        assert_eq!(config.op, bench::Op::Mixed);
        assert_eq!((config.concurrency, config.keys, config.value_size, config.batch), (2, 10, 1024, 16));
        assert_eq!((config.duration, config.warmup), (Duration::from_millis(500), Duration::ZERO));
        assert!(!config.preload);
        assert!(!config.unique_keys);
        assert_eq!(config.transport, bench::Transport::Client, "the client library unless asked");
        let cli = parse(&["bench", "--unique-keys"]).expect("valid");
        let Command::Bench(args) = cli.command else { panic!("not bench") };
        assert!(args.config().unique_keys);
        let cli = parse(&["bench", "--transport", "h2"]).expect("valid");
        let Command::Bench(args) = cli.command else { panic!("not bench") };
        assert_eq!(args.config().transport, bench::Transport::H2);
        assert!(parse(&["bench", "--transport", "grpc"]).is_err());
        for bad in [["--concurrency", "0"], ["--batch", "0"], ["--duration", "0s"], ["--op", "scan"]] {
            let err = parse(&["bench", bad[0], bad[1]]).expect_err("invalid");
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn delete_needs_a_key() {
        assert_eq!(parse(&["delete", "users"]).expect_err("no key").exit_code(), 2);
        let cli = parse(&["delete", "users", "a", "b"]).expect("valid");
        assert!(matches!(cli.command, Command::Delete { keys, .. } if keys == ["a", "b"]));
    }

    #[test]
    fn tls_flags_are_global() {
        use std::path::Path;
        let cli = parse(&[
            "--tls-ca",
            "ca.crt",
            "bench",
            "--tls-cert",
            "app.crt",
            "--tls-key",
            "app.key",
            "--tls-server-name",
            "node-0.cache",
        ])
        .expect("valid");
        assert!(matches!(cli.command, Command::Bench(_)));
        assert_eq!(cli.tls_ca.as_deref(), Some(Path::new("ca.crt")));
        assert_eq!(cli.tls_cert.as_deref(), Some(Path::new("app.crt")));
        assert_eq!(cli.tls_key.as_deref(), Some(Path::new("app.key")));
        assert_eq!(cli.tls_server_name.as_deref(), Some("node-0.cache"));
        let cli = parse(&["get", "users", "42", "--tls-ca", "ca.crt"]).expect("valid");
        assert_eq!(cli.tls_ca.as_deref(), Some(Path::new("ca.crt")));
    }

    #[test]
    fn help_lists_exit_codes() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("3  key not found"), "{help}");
    }

    #[test]
    fn values_are_text_or_base64_in_json() {
        let text = Value {
            value: Bytes::from_static(b"alice"),
            ttl: Some(Duration::from_millis(1500)),
            stale: false,
        };
        let doc: serde_json::Value = serde_json::from_str(&value_json("users", "42", &text)).expect("json");
        assert_eq!(
            doc,
            json!({ "keyspace": "users", "key": "42", "value": "alice", "ttl_ms": 1500, "stale": false })
        );
        let binary = Value { value: Bytes::from_static(&[0xff, 0x00, 0x01]), ttl: None, stale: true };
        let doc: serde_json::Value = serde_json::from_str(&value_json("k", "b", &binary)).expect("json");
        assert_eq!(
            doc,
            json!({ "keyspace": "k", "key": "b", "value_base64": "/wAB", "ttl_ms": null, "stale": true })
        );
    }

    #[test]
    fn tables_align_columns() {
        let out = table(
            &["NAME", "ADDRESS", "LOCAL"],
            vec![
                vec!["node-1".to_owned(), "127.0.0.1:7420".to_owned(), "true".to_owned()],
                vec!["n2".to_owned(), "10.0.0.2:7420".to_owned(), "false".to_owned()],
            ],
        );
        assert_eq!(
            out,
            "NAME    ADDRESS         LOCAL\nnode-1  127.0.0.1:7420  true\nn2      10.0.0.2:7420   false"
        );
    }

    #[test]
    fn keyspaces_show_human_units() {
        let info = KeyspaceInfo {
            name: "users".to_owned(),
            max_bytes: 64 << 20,
            ttl: Some(Duration::from_mins(5)),
            negative_ttl: None,
            fetch_timeout: Some(Duration::from_secs(2)),
            max_value_bytes: 8 << 20,
            read_through: true,
        };
        let out = keyspaces_table(std::slice::from_ref(&info));
        assert_eq!(out.lines().nth(1), Some("users  64Mi       5m   -             2s             true"));
        let doc: serde_json::Value = serde_json::from_str(&keyspaces_json(&[info])).expect("json");
        assert_eq!(doc["keyspaces"][0]["ttl_ms"], 300_000);
        assert_eq!(doc["keyspaces"][0]["negative_ttl_ms"], serde_json::Value::Null);
    }

    fn hot(key: &str, hits: u64) -> HotKey {
        HotKey { key: key.to_owned(), hits }
    }

    fn stats_with_protections() -> Stats {
        Stats {
            node: "node-1".to_owned(),
            members: 3,
            keyspaces: vec![
                KeyspaceStats {
                    name: "users".to_owned(),
                    hits: 7,
                    owner_fallbacks: 2,
                    circuit_state: "half_open".to_owned(),
                    stale_served: 4,
                    rate_limited: 5,
                    hot_keys: vec![hot("42", 9)],
                    warm_up: Some(WarmUp {
                        listed: 30,
                        owned: 12,
                        loaded: 10,
                        present: 2,
                        failed: 0,
                        done: true,
                    }),
                    ..Default::default()
                },
                KeyspaceStats { name: "sessions".to_owned(), ..Default::default() },
            ],
        }
    }

    #[test]
    fn stats_table_has_every_counter() {
        let out = stats_table(&stats_with_protections());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "node node-1 (3 members)");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "KEYSPACE",
                "HITS",
                "HOT_HITS",
                "MISSES",
                "SOURCE_FETCHES",
                "ENTRIES",
                "BYTES",
                "EVICTIONS",
                "FORWARDED",
                "OWNER_FALLBACKS",
                "CIRCUIT",
                "STALE",
                "RATE_LIMITED"
            ]
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["users", "7", "0", "0", "0", "0", "0", "0", "0", "2", "half_open", "4", "5"]
        );
        // No breaker: "-".
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["sessions", "0", "0", "0", "0", "0", "0", "0", "0", "0", "-", "0", "0"]
        );
        // One warm-up line per keyspace that has one.
        assert_eq!(lines[4], "warm-up users: 12/12 owned keys loaded or present (30 listed), 0 failed, done");
        assert_eq!(lines.len(), 5);
    }

    #[test]
    fn warm_up_in_progress_is_said() {
        let stats = KeyspaceStats {
            name: "users".to_owned(),
            warm_up: Some(WarmUp { listed: 3, owned: 2, loaded: 1, present: 0, failed: 1, done: false }),
            ..Default::default()
        };
        assert_eq!(
            warm_up_line(&stats).as_deref(),
            Some("warm-up users: 1/2 owned keys loaded or present (3 listed), 1 failed, in progress")
        );
    }

    #[test]
    fn stats_json_carries_every_field() {
        let doc: serde_json::Value =
            serde_json::from_str(&stats_json(&stats_with_protections())).expect("json");
        let users = &doc["keyspaces"][0];
        assert_eq!(users["circuit_state"], "half_open");
        assert_eq!((users["stale_served"].as_u64(), users["rate_limited"].as_u64()), (Some(4), Some(5)));
        assert_eq!(users["hot_keys"], json!([{ "key": "42", "hits": 9 }]));
        assert_eq!(
            users["warm_up"],
            json!({ "listed": 30, "owned": 12, "loaded": 10, "present": 2, "failed": 0, "done": true })
        );
        let sessions = &doc["keyspaces"][1];
        assert_eq!(sessions["circuit_state"], serde_json::Value::Null);
        assert_eq!(sessions["warm_up"], serde_json::Value::Null);
        assert_eq!(sessions["hot_keys"], json!([]));
    }

    #[test]
    fn hot_keys_parse() {
        let cli = parse(&["hot-keys", "users"]).expect("valid");
        assert!(matches!(
            cli.command,
            Command::HotKeys { ref keyspace, top: 20, all_members: false } if keyspace == "users"
        ));
        let cli = parse(&["hot-keys", "users", "--top", "5", "--all-members", "--json"]).expect("valid");
        assert!(matches!(cli.command, Command::HotKeys { top: 5, all_members: true, .. }));
        assert!(cli.json);
        assert_eq!(parse(&["hot-keys"]).expect_err("no keyspace").exit_code(), 2);
        assert_eq!(parse(&["hot-keys", "users", "--top", "0"]).expect_err("top 0").exit_code(), 2);
    }

    #[test]
    fn hot_keys_merge_by_summing_hits() {
        let merged = merge_hot_keys(
            vec![vec![hot("a", 10), hot("b", 8), hot("c", 1)], vec![hot("b", 5), hot("d", 9)], vec![]],
            3,
        );
        assert_eq!(merged, [hot("b", 13), hot("a", 10), hot("d", 9)]);
        // Ties: by key, so the output is stable.
        assert_eq!(merge_hot_keys(vec![vec![hot("y", 2), hot("x", 2)]], 20), [hot("x", 2), hot("y", 2)]);
        assert_eq!(
            merge_hot_keys(vec![vec![hot("k", u64::MAX)], vec![hot("k", 1)]], 1),
            [hot("k", u64::MAX)]
        );
    }

    #[test]
    fn hot_keys_render() {
        let mut report = HotKeysReport {
            keyspace: "users".to_owned(),
            nodes: vec!["node-1".to_owned()],
            keys: vec![hot("alice", 120), hot("bob", 7)],
            ..Default::default()
        };
        assert_eq!(
            hot_keys_report_table(&report),
            "hot keys of users on node-1 (estimated recent reads)\nKEY    HITS\nalice  120\nbob    7"
        );
        report.nodes.push("node-2".to_owned());
        report.failed.push((
            "node-3".to_owned(),
            Some("http://10.0.0.3:7420".to_owned()),
            "refused".to_owned(),
        ));
        let out = hot_keys_report_table(&report);
        assert!(
            out.starts_with("hot keys of users on node-1, node-2 (estimated recent reads, summed"),
            "{out}"
        );
        let doc: serde_json::Value = serde_json::from_str(&hot_keys_report_json(&report)).expect("json");
        assert_eq!(
            doc,
            json!({
                "keyspace": "users",
                "nodes": ["node-1", "node-2"],
                "failed": [{ "name": "node-3", "endpoint": "http://10.0.0.3:7420", "message": "refused" }],
                "hot_keys": [{ "key": "alice", "hits": 120 }, { "key": "bob", "hits": 7 }],
            })
        );
        report.keys.clear();
        assert!(
            hot_keys_report_table(&report).ends_with("(none yet: no key was read often enough recently)")
        );
    }

    #[test]
    fn members_are_dialled_at_their_client_port() {
        // Kubernetes: client 7420, peer 7422 on every pod.
        assert_eq!(
            member_endpoint("https://demo.cache.svc:7420", "10.0.0.1:7422", "10.0.0.2:7422").as_deref(),
            Ok("https://10.0.0.2:7420")
        );
        // The local example: three nodes on one host, each peer port two above its client port.
        assert_eq!(
            member_endpoint("127.0.0.1:7420", "127.0.0.1:7422", "127.0.0.1:7432").as_deref(),
            Ok("http://127.0.0.1:7430")
        );
        assert_eq!(
            member_endpoint("http://localhost:7430", "127.0.0.1:7432", "[fd00::3]:7442").as_deref(),
            Ok("http://[fd00::3]:7440")
        );
        assert!(member_endpoint("127.0.0.1:7420", "127.0.0.1:7422", "no-port").is_err());
        assert!(member_endpoint("127.0.0.1:1", "127.0.0.1:7422", "127.0.0.1:2").is_err(), "port below 1");
        assert_eq!(endpoint_host("https://demo.cache.svc:7420").as_deref(), Some("demo.cache.svc"));
        assert_eq!(endpoint_host("https://10.0.0.7:7420"), None);
        assert_eq!(endpoint_host("https://[::1]:7420"), None);
    }

    #[test]
    fn member_events_render() {
        let m = Member { name: "node-1".to_owned(), address: "127.0.0.1:7420".to_owned(), local: true };
        assert_eq!(member_event_line(&MemberEvent::Join(m.clone())), "JOIN    node-1 127.0.0.1:7420 (local)");
        let doc: serde_json::Value =
            serde_json::from_str(&member_event_json(&MemberEvent::Leave(m))).expect("json");
        assert_eq!(doc["type"], "leave");
        assert_eq!(doc["member"]["name"], "node-1");
        assert_eq!(member_event_json(&MemberEvent::SnapshotEnd), r#"{"type":"snapshot_end"}"#);
    }
}
