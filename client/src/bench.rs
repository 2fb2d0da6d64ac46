//! `distcache bench`: a closed-loop load generator, the tool `DistCache`'s performance is judged with.
//!
//! `concurrency` tasks share a [`Client`]; each sends one request, waits for the answer, records its latency and
//! sends the next, so the offered load adapts to the server (closed loop) and the latency numbers are honest
//! service times at that concurrency. A warm-up phase runs the same loop first and is discarded, so connection
//! setup, lazy allocation and cold caches do not pollute the measurement.
//!
//! The hot loop allocates nothing but the request itself: keys are formatted once into a shared slice, the value
//! is one [`Bytes`] shared by reference count, random numbers come from a per-task xorshift generator, and each
//! task records into its own histogram (merged at the end), so tasks never contend on shared state.
//!
//! With [`BenchConfig::unique_keys`] every key of every request is one never used before (a per-run prefix and a
//! shared counter), so against a read-through keyspace every `Get` is a miss that runs the data source: the
//! miss-path benchmark. Those keys are formatted per request and the tasks share one atomic counter.

use std::{
    fmt,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::{Client, Error};

/// Keys per `PutMany` call when preloading.
pub const PRELOAD_BATCH: usize = 500;

/// Largest latency the histograms track exactly, in microseconds (60 s); slower calls are recorded as 60 s.
const MAX_TRACKED_US: u64 = 60_000_000;

/// What each request of the benchmark does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Reads (`Get`, or `GetMany` with a batch): the cache-hit path when keys are preloaded.
    Get,
    /// Writes (`Put`, or `PutMany` with a batch).
    Put,
    /// 90 % reads, 10 % writes, chosen at random per request: a typical read-heavy cache workload.
    Mixed,
}

impl Op {
    /// The name used on the command line and in reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Put => "put",
            Self::Mixed => "mixed",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Op {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "get" => Ok(Self::Get),
            "put" => Ok(Self::Put),
            "mixed" => Ok(Self::Mixed),
            other => Err(format!("unknown bench op {other:?} (expected get, put or mixed)")),
        }
    }
}

/// How the tasks of a run call the node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Through the [`Client`] handed to [`run`] (tonic), as a Rust application does; calls are spread over its
    /// connections round-robin.
    #[default]
    Client,
    /// A lean gRPC caller on the `h2` crate, with as many connections as the client has (and its TLS settings),
    /// each task keeping to one: the load generator then costs about half as much CPU per call, which on a
    /// machine shared with the server leaves more of it to the server under test.
    H2,
}

impl Transport {
    /// The name used on the command line and in reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::H2 => "h2",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parameters of one benchmark run. The connection count is a property of the [`Client`] handed to [`run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchConfig {
    /// What each request does.
    pub op: Op,
    /// Concurrent closed-loop tasks (requests in flight).
    pub concurrency: usize,
    /// Length of the measured phase.
    pub duration: Duration,
    /// Length of the discarded warm-up phase before it.
    pub warmup: Duration,
    /// Size of the key space: keys are `key-00000000` … drawn uniformly at random.
    pub keys: usize,
    /// Bytes per value written (preload and puts).
    pub value_size: usize,
    /// Keys per call; above 1 the batch calls (`GetMany`/`PutMany`) are used.
    pub batch: usize,
    /// Keyspace to run against; it must exist on the node.
    pub keyspace: String,
    /// Write every key once before a `get`/`mixed` run, so reads hit. Ignored with `unique_keys`.
    pub preload: bool,
    /// Use a key never used before for every key of every request instead of drawing from `keys`: every read is
    /// then a miss (on a read-through keyspace, a data-source load) and every write inserts a new entry.
    pub unique_keys: bool,
    /// How calls are made (the preload always goes through the [`Client`]).
    pub transport: Transport,
}

impl Default for BenchConfig {
    /// The defaults of `distcache bench`.
    fn default() -> Self {
        Self {
            op: Op::Get,
            concurrency: 50,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            keys: 100_000,
            value_size: 100,
            batch: 1,
            keyspace: "bench".to_owned(),
            preload: true,
            unique_keys: false,
            transport: Transport::Client,
        }
    }
}

impl BenchConfig {
    fn validate(&self) -> Result<(), BenchError> {
        let invalid = |what: &str| Err(BenchError::InvalidConfig(what.to_owned()));
        if self.concurrency == 0 {
            return invalid("concurrency must be at least 1");
        }
        if self.batch == 0 {
            return invalid("batch must be at least 1");
        }
        if self.keys == 0 {
            return invalid("keys must be at least 1");
        }
        if self.duration.is_zero() {
            return invalid("duration must be positive");
        }
        Ok(())
    }
}

/// The default number of HTTP/2 connections for a run: `min(concurrency, 4)`. A few connections keep one TCP
/// stream (and the one task driving it) from being the bottleneck; more than a handful only adds overhead.
pub fn default_connections(concurrency: usize) -> usize {
    concurrency.clamp(1, 4)
}

/// The name of key number `i`: `key-{i:08}`, so keys sort and read naturally.
pub fn key_name(i: usize) -> String {
    format!("key-{i:08}")
}

/// Source of the keys of a `unique_keys` run: `u<run>-<n>`, where `<run>` differs between runs (the clock and a
/// process-wide run counter) and `<n>` counts up from 0 across all tasks, so no key repeats within a run nor,
/// in practice, across runs against the same node.
#[derive(Debug)]
struct UniqueKeys {
    prefix: String,
    next: AtomicU64,
}

impl UniqueKeys {
    fn new() -> Self {
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        Self { prefix: format!("u{nanos:x}{run:x}-"), next: AtomicU64::new(0) }
    }

    fn next_key(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}{n:08}", self.prefix)
    }
}

/// Phases of a run, reported to the progress callback of [`run_with_progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Writing every key once (`keys` of them).
    Preloading {
        /// Number of keys being written.
        keys: usize,
    },
    /// Running the loop without recording, for this long.
    WarmingUp(Duration),
    /// Running the measured loop, for this long.
    Measuring(Duration),
}

/// The outcome of a run; `Display` gives the human block, `Serialize` the `--json` object.
///
/// `requests` counts calls; `errors` and `misses` count keys (a failed batch call counts `batch` errors), so the
/// numbers mean the same for any batch size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// What each request did.
    pub op: Op,
    /// Concurrent closed-loop tasks.
    pub concurrency: usize,
    /// How the calls were made.
    pub transport: Transport,
    /// HTTP/2 connections the tasks shared.
    pub connections: usize,
    /// Keys per call.
    pub batch: usize,
    /// Bytes per value written.
    pub value_size: usize,
    /// Size of the key space (not used with `unique_keys`).
    pub keys: usize,
    /// Every key was used once (a miss-path run), see [`BenchConfig::unique_keys`].
    pub unique_keys: bool,
    /// Measured wall-clock time in seconds (the configured duration plus the tail of the last calls).
    pub duration_s: f64,
    /// Calls completed in the measured phase.
    pub requests: u64,
    /// Calls per second.
    pub ops_per_sec: f64,
    /// Keys per second (`ops_per_sec × batch`).
    pub keys_per_sec: f64,
    /// Median call latency, µs.
    pub p50_us: u64,
    /// 99th percentile call latency, µs.
    pub p99_us: u64,
    /// 99.9th percentile call latency, µs.
    pub p999_us: u64,
    /// Slowest call, µs.
    pub max_us: u64,
    /// Keys that failed (any error except a read's `NOT_FOUND`).
    pub errors: u64,
    /// Reads that found no value.
    pub misses: u64,
    /// The first error seen, to tell the user *why* calls failed; not part of the JSON report.
    #[serde(skip)]
    pub first_error: Option<String>,
}

impl BenchReport {
    /// True when nothing succeeded: no call completed, or every key of every call failed. The CLI exits
    /// non-zero then, so a misconfigured benchmark never passes for a fast one.
    pub fn all_failed(&self) -> bool {
        let attempted = self.requests.saturating_mul(u64::try_from(self.batch).unwrap_or(u64::MAX));
        self.requests == 0 || self.errors >= attempted
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "op           {}", self.op)?;
        writeln!(f, "concurrency  {}", self.concurrency)?;
        writeln!(f, "transport    {}", self.transport)?;
        writeln!(f, "connections  {}", self.connections)?;
        writeln!(f, "batch        {}", self.batch)?;
        if self.unique_keys {
            writeln!(f, "keys         unique (each used once)")?;
        }
        writeln!(f, "duration     {:.2} s", self.duration_s)?;
        writeln!(f, "requests     {}", self.requests)?;
        writeln!(f, "ops/s        {:.1}", self.ops_per_sec)?;
        writeln!(f, "keys/s       {:.1}", self.keys_per_sec)?;
        writeln!(f, "p50          {} µs", self.p50_us)?;
        writeln!(f, "p99          {} µs", self.p99_us)?;
        writeln!(f, "p99.9        {} µs", self.p999_us)?;
        writeln!(f, "max          {} µs", self.max_us)?;
        writeln!(f, "errors       {}", self.errors)?;
        write!(f, "misses       {}", self.misses)
    }
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A parameter is out of range.
    #[error("invalid bench configuration: {0}")]
    InvalidConfig(String),
    /// Writing the keys before a read benchmark failed (e.g. the keyspace does not exist).
    #[error("failed to preload {key}")]
    Preload {
        /// The key that failed (the first key of the batch when the whole call failed).
        key: String,
        /// The error of the call or of the first failed key.
        #[source]
        source: Error,
    },
    /// The latency histograms could not be created (a bug: the bounds are constants).
    #[error("failed to create latency histogram")]
    Histogram(#[source] hdrhistogram::CreationError),
    /// Merging the per-task histograms failed (a bug: they share their bounds).
    #[error("failed to merge latency histograms")]
    Merge(#[source] hdrhistogram::AdditionError),
    /// The connections of the `h2` transport could not be opened.
    #[error("failed to connect")]
    Connect(#[source] Error),
    /// A benchmark task panicked or was cancelled.
    #[error("a benchmark task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Runs a benchmark with `client` (its connection count is reported as `connections`).
pub async fn run(client: &Client, config: &BenchConfig) -> Result<BenchReport, BenchError> {
    run_with_progress(client, config, |_| {}).await
}

/// As [`run`], calling `progress` at the start of each phase (the CLI prints them to stderr).
pub async fn run_with_progress(
    client: &Client,
    config: &BenchConfig,
    progress: impl Fn(Phase),
) -> Result<BenchReport, BenchError> {
    config.validate()?;
    let (keys, unique): (Arc<[String]>, _) = if config.unique_keys {
        (Arc::new([]), Some(UniqueKeys::new()))
    } else {
        ((0..config.keys).map(key_name).collect(), None)
    };
    let value = Bytes::from(vec![b'x'; config.value_size]);
    if config.preload && config.op != Op::Put && unique.is_none() {
        progress(Phase::Preloading { keys: keys.len() });
        preload(client, config, &keys, &value).await?;
    }

    let callers = match config.transport {
        Transport::Client => vec![Caller::Client(client.clone())],
        Transport::H2 => {
            let target = client.target().ok_or_else(|| {
                BenchError::InvalidConfig(
                    "the h2 transport needs a client connected to an endpoint".to_owned(),
                )
            })?;
            let connections = (0..client.connections()).map(|_| wire::Connection::open(target));
            futures::future::try_join_all(connections)
                .await
                .map_err(BenchError::Connect)?
                .into_iter()
                .map(Caller::H2)
                .collect()
        }
    };
    let tallies = (0..config.concurrency).map(|_| Tally::new()).collect::<Result<Vec<_>, _>>()?;
    progress(Phase::WarmingUp(config.warmup));
    let warmup_end = Instant::now() + config.warmup;
    let plan = Arc::new(Plan {
        op: config.op,
        batch: config.batch,
        keyspace: config.keyspace.clone(),
        keys,
        unique,
        value,
        warmup_end,
        end: warmup_end + config.duration,
    });
    let mut workers = JoinSet::new();
    for (index, tally) in tallies.into_iter().enumerate() {
        let rng = XorShift64::seeded(index as u64);
        let caller = callers[index % callers.len()].clone();
        workers.spawn(worker(caller, Arc::clone(&plan), rng, tally));
    }
    tokio::time::sleep_until(warmup_end.into()).await;
    progress(Phase::Measuring(config.duration));
    let mut tallies = Vec::with_capacity(config.concurrency);
    while let Some(tally) = workers.join_next().await {
        tallies.push(tally.map_err(BenchError::Task)?);
    }
    let measured = Instant::now().saturating_duration_since(warmup_end);
    summarize(config, client.connections(), measured, tallies)
}

/// Writes every key once with `PutMany` batches of [`PRELOAD_BATCH`], `concurrency` batches in flight.
async fn preload(
    client: &Client,
    config: &BenchConfig,
    keys: &Arc<[String]>,
    value: &Bytes,
) -> Result<(), BenchError> {
    let chunks = keys.len().div_ceil(PRELOAD_BATCH);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..config.concurrency.min(chunks) {
        let (client, keys, value, next) =
            (client.clone(), Arc::clone(keys), value.clone(), Arc::clone(&next));
        let keyspace = config.keyspace.clone();
        tasks.spawn(async move {
            loop {
                let chunk = next.fetch_add(1, Ordering::Relaxed);
                if chunk >= chunks {
                    return Ok(());
                }
                let range = chunk * PRELOAD_BATCH..((chunk + 1) * PRELOAD_BATCH).min(keys.len());
                let batch = &keys[range];
                let entries = batch.iter().map(|key| (key.clone(), value.clone(), None));
                let failed = match client.put_many(keyspace.as_str(), entries).await {
                    Ok(results) => {
                        batch.iter().zip(results).find_map(|(key, result)| Some((key, result.err()?)))
                    }
                    Err(error) => Some((&batch[0], error)),
                };
                if let Some((key, source)) = failed {
                    return Err(BenchError::Preload { key: key.clone(), source });
                }
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.map_err(BenchError::Task)??;
    }
    Ok(())
}

/// What every task of a run shares, read-only.
struct Plan {
    op: Op,
    batch: usize,
    keyspace: String,
    keys: Arc<[String]>,
    /// Set for a `unique_keys` run; `keys` is empty then.
    unique: Option<UniqueKeys>,
    value: Bytes,
    warmup_end: Instant,
    end: Instant,
}

/// The outcome of one call, in keys.
#[derive(Debug, Default)]
struct CallOutcome {
    errors: u64,
    misses: u64,
    first_error: Option<Error>,
}

impl CallOutcome {
    fn failed(error: Error, keys: usize) -> Self {
        Self { errors: u64::try_from(keys).unwrap_or(u64::MAX), misses: 0, first_error: Some(error) }
    }

    fn key_error(&mut self, error: Error) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }
}

/// A connection's byte stream, plain TCP or TLS over it.
pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

/// What one task calls the node with.
#[derive(Clone)]
enum Caller {
    Client(Client),
    H2(wire::Connection),
}

impl Caller {
    /// `Ok(true)` for a value, `Ok(false)` for none.
    async fn get(&self, keyspace: &str, key: String) -> Result<bool, Error> {
        match self {
            Self::Client(client) => client.get(keyspace, key).await.map(|value| value.is_some()),
            Self::H2(connection) => connection.get(keyspace, key).await,
        }
    }

    async fn get_many(&self, keyspace: &str, keys: Vec<String>) -> Result<Vec<Result<bool, Error>>, Error> {
        match self {
            Self::Client(client) => Ok(client
                .get_many(keyspace, keys)
                .await?
                .into_iter()
                .map(|result| result.map(|value| value.is_some()))
                .collect()),
            Self::H2(connection) => connection.get_many(keyspace, keys).await,
        }
    }

    async fn put(&self, keyspace: &str, key: String, value: Bytes) -> Result<(), Error> {
        match self {
            Self::Client(client) => client.put(keyspace, key, value, None).await,
            Self::H2(connection) => connection.put(keyspace, key, value).await,
        }
    }

    async fn put_many(
        &self,
        keyspace: &str,
        entries: Vec<(String, Bytes)>,
    ) -> Result<Vec<Result<(), Error>>, Error> {
        match self {
            Self::Client(client) => {
                client.put_many(keyspace, entries.into_iter().map(|(key, value)| (key, value, None))).await
            }
            Self::H2(connection) => connection.put_many(keyspace, entries).await,
        }
    }
}

impl Plan {
    /// The key of the next request: a fresh one in a `unique_keys` run, else one drawn at random from `keys`.
    fn next_key(&self, rng: &mut XorShift64) -> String {
        match &self.unique {
            Some(unique) => unique.next_key(),
            None => self.keys[rng.below(self.keys.len())].clone(),
        }
    }

    async fn get(&self, caller: &Caller, rng: &mut XorShift64) -> CallOutcome {
        let mut outcome = CallOutcome::default();
        if self.batch == 1 {
            match caller.get(&self.keyspace, self.next_key(rng)).await {
                Ok(true) => {}
                Ok(false) => outcome.misses = 1,
                Err(error) => return CallOutcome::failed(error, 1),
            }
            return outcome;
        }
        let keys: Vec<String> = (0..self.batch).map(|_| self.next_key(rng)).collect();
        match caller.get_many(&self.keyspace, keys).await {
            Ok(results) => {
                for result in results {
                    match result {
                        Ok(true) => {}
                        Ok(false) => outcome.misses += 1,
                        Err(error) => outcome.key_error(error),
                    }
                }
                outcome
            }
            Err(error) => CallOutcome::failed(error, self.batch),
        }
    }

    async fn put(&self, caller: &Caller, rng: &mut XorShift64) -> CallOutcome {
        if self.batch == 1 {
            return match caller.put(&self.keyspace, self.next_key(rng), self.value.clone()).await {
                Ok(()) => CallOutcome::default(),
                Err(error) => CallOutcome::failed(error, 1),
            };
        }
        let entries: Vec<_> = (0..self.batch).map(|_| (self.next_key(rng), self.value.clone())).collect();
        match caller.put_many(&self.keyspace, entries).await {
            Ok(results) => {
                let mut outcome = CallOutcome::default();
                for error in results.into_iter().filter_map(Result::err) {
                    outcome.key_error(error);
                }
                outcome
            }
            Err(error) => CallOutcome::failed(error, self.batch),
        }
    }
}

/// One task's measurements.
struct Tally {
    histogram: Histogram<u64>,
    requests: u64,
    errors: u64,
    misses: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Result<Self, BenchError> {
        Ok(Self {
            histogram: Histogram::new_with_bounds(1, MAX_TRACKED_US, 3).map_err(BenchError::Histogram)?,
            requests: 0,
            errors: 0,
            misses: 0,
            first_error: None,
        })
    }

    fn record(&mut self, latency: Duration, outcome: CallOutcome) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        self.histogram.saturating_record(micros);
        self.requests += 1;
        self.errors += outcome.errors;
        self.misses += outcome.misses;
        if self.first_error.is_none() {
            self.first_error = outcome.first_error.map(|error| error.to_string());
        }
    }
}

/// The closed loop of one task: issue, wait, record (after the warm-up), repeat until the end of the run.
async fn worker(caller: Caller, plan: Arc<Plan>, mut rng: XorShift64, mut tally: Tally) -> Tally {
    loop {
        let start = Instant::now();
        if start >= plan.end {
            return tally;
        }
        let write = match plan.op {
            Op::Get => false,
            Op::Put => true,
            Op::Mixed => rng.below(10) == 0,
        };
        let outcome =
            if write { plan.put(&caller, &mut rng).await } else { plan.get(&caller, &mut rng).await };
        if start >= plan.warmup_end {
            tally.record(start.elapsed(), outcome);
        }
    }
}

/// Merges the per-task tallies into the report.
fn summarize(
    config: &BenchConfig,
    connections: usize,
    measured: Duration,
    tallies: Vec<Tally>,
) -> Result<BenchReport, BenchError> {
    let mut merged = Tally::new()?;
    for tally in tallies {
        merged.histogram.add(&tally.histogram).map_err(BenchError::Merge)?;
        merged.requests += tally.requests;
        merged.errors += tally.errors;
        merged.misses += tally.misses;
        if merged.first_error.is_none() {
            merged.first_error = tally.first_error;
        }
    }
    let seconds = measured.as_secs_f64();
    let ops_per_sec = if seconds > 0.0 { merged.requests as f64 / seconds } else { 0.0 };
    let histogram = &merged.histogram;
    let quantile = |q| {
        if histogram.is_empty() { 0 } else { histogram.value_at_quantile(q) }
    };
    Ok(BenchReport {
        op: config.op,
        concurrency: config.concurrency,
        transport: config.transport,
        connections,
        batch: config.batch,
        value_size: config.value_size,
        keys: config.keys,
        unique_keys: config.unique_keys,
        duration_s: round_to(seconds, 3),
        requests: merged.requests,
        ops_per_sec: round_to(ops_per_sec, 1),
        keys_per_sec: round_to(ops_per_sec * config.batch as f64, 1),
        p50_us: quantile(0.5),
        p99_us: quantile(0.99),
        p999_us: quantile(0.999),
        max_us: histogram.max(),
        errors: merged.errors,
        misses: merged.misses,
        first_error: merged.first_error,
    })
}

fn round_to(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// A xorshift64 generator: a few instructions per number, plenty uniform for picking keys, no dependency.
#[derive(Debug, Clone)]
struct XorShift64(u64);

impl XorShift64 {
    /// A generator for task `seed`; seeds are spread with splitmix64 so neighbouring tasks draw unrelated keys.
    fn seeded(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // Zero is the one state xorshift never leaves.
        Self(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `[0, n)` (`n > 0`), by multiply-shift rather than modulo: no division in the hot loop.
    #[allow(clippy::cast_possible_truncation, reason = "the product shifted right by 64 is < n, a usize")]
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

#[cfg(test)]
mod tests;
mod wire;
