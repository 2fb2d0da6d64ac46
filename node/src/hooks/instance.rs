//! A keyspace's hook: a bounded pool of ready instances, and one call under its limits.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use distcache_api::{ByteSize, HookSpec, ValidKeyspace};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;
use wasmtime::{Engine, ResourceLimiter, Store, Trap, UpdateDeadline, component::ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::{
    DEFAULT_FUEL, DEFAULT_MAX_CONCURRENT_REQUESTS, DEFAULT_MEMORY, DEFAULT_POOL_SIZE, EPOCH_TICK,
    bindings::{self, DataSource as Bindings, DataSourcePre},
    http::{HttpGate, HttpLimits},
    output::{GuestOutput, LogBudget},
};
use crate::{
    metrics::Metrics,
    source::{DataSource, FetchError, Fetched},
};

/// The limits of one call of a keyspace's hook, with defaults applied.
#[derive(Clone, Debug)]
pub struct HookLimits {
    /// Fuel per call.
    pub fuel: u64,
    /// Linear memory of one instance.
    pub memory: u64,
    /// Wall-clock deadline of one call.
    pub timeout: Duration,
    /// Instances (and concurrent calls).
    pub pool_size: u32,
    /// Largest value a hook may return.
    pub max_value_bytes: u64,
    /// Egress limits.
    pub http: HttpLimits,
}

impl HookLimits {
    /// The limits of a keyspace's hook.
    pub fn new(keyspace: &ValidKeyspace, hook: &HookSpec) -> Self {
        let l = hook.limits.clone().unwrap_or_default();
        Self {
            fuel: l.fuel.unwrap_or(DEFAULT_FUEL),
            memory: l.memory.map_or(DEFAULT_MEMORY, ByteSize::bytes),
            // The hook's own deadline never outlives the fetch it serves.
            timeout: l.timeout.map_or(keyspace.fetch_timeout, |t| t.get().min(keyspace.fetch_timeout)),
            pool_size: l.pool_size.unwrap_or(DEFAULT_POOL_SIZE).max(1),
            max_value_bytes: keyspace.max_value_bytes,
            http: HttpLimits {
                max_response_bytes: l.max_response_bytes.map_or(keyspace.max_value_bytes, ByteSize::bytes),
                max_concurrent: l.max_concurrent_requests.unwrap_or(DEFAULT_MAX_CONCURRENT_REQUESTS),
            },
        }
    }
}

/// Why a hook call was stopped (the `reason` label of `distcache_hook_traps_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrapReason {
    /// All fuel of the call consumed.
    Fuel,
    /// The wall-clock deadline passed.
    Timeout,
    /// The instance tried to grow its memory past the limit.
    Memory,
    /// The guest panicked (`unreachable`).
    Panic,
    /// The guest's call stack overflowed.
    StackOverflow,
    /// The hook returned a value larger than the keyspace's maxValueBytes.
    Oversized,
    /// Any other trap.
    Other,
}

impl TrapReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Fuel => "fuel",
            Self::Timeout => "timeout",
            Self::Memory => "memory",
            Self::Panic => "panic",
            Self::StackOverflow => "stack_overflow",
            Self::Oversized => "oversized",
            Self::Other => "trap",
        }
    }
}

/// Raised by the epoch callback when a call's deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("the hook call exceeded its deadline")]
struct DeadlineExceeded;

/// Raised by the resource limiter when an instance grows its memory past the limit.
#[derive(Debug, thiserror::Error)]
#[error("the hook tried to grow its memory to {desired} bytes, over its limit of {limit}")]
struct MemoryLimitExceeded {
    desired: usize,
    limit: ByteSize,
}

/// Why a new instance could not be made ready: instantiating the component and calling its `init`.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The new store refused its fuel (an engine without fuel metering).
    #[error("failed to set the fuel of a new hook instance")]
    SetFuel(#[source] wasmtime::Error),
    /// Instantiating or `init` trapped (or failed to link at run time); `message` says how.
    #[error("the hook failed to start: {message}")]
    Trapped {
        /// Why it stopped.
        reason: TrapReason,
        /// What happened, as for a trapped call.
        message: String,
    },
    /// Instantiating and `init` did not finish within the hook's timeout.
    #[error("the hook's init exceeded its timeout of {timeout:?}")]
    TimedOut {
        /// The hook's timeout.
        timeout: Duration,
    },
    /// `init` returned an error: the hook refuses its config.
    #[error("the hook's init refused its config: {message}")]
    InitRefused {
        /// The hook's message.
        message: String,
    },
}

impl InitError {
    /// Whether making an instance again may succeed: only a timeout (an `init` that waits on a backend); a
    /// refused config or a trap repeats with the same module and config.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::TimedOut { .. } | Self::Trapped { reason: TrapReason::Timeout, .. })
    }
}

impl From<InitError> for FetchError {
    fn from(e: InitError) -> Self {
        match e {
            InitError::SetFuel(e) => FetchError::Internal(format!("{e}")),
            InitError::Trapped { reason: TrapReason::Timeout, .. } | InitError::TimedOut { .. } => {
                FetchError::Timeout
            }
            InitError::Trapped { message, .. } => FetchError::Internal(message),
            refused @ InitError::InitRefused { .. } => FetchError::Internal(refused.to_string()),
        }
    }
}

/// The host side of one instance: WASI (no files, sockets or environment), the egress gate and the call's
/// deadline.
pub struct HostState {
    pub(super) keyspace: Arc<str>,
    pub(super) http: Arc<HttpGate>,
    pub(super) deadline: Instant,
    memory_limit: usize,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            return Err(MemoryLimitExceeded { desired, limit: ByteSize(self.memory_limit as u64) }.into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// One ready instance.
struct Instance {
    store: Store<HostState>,
    bindings: Bindings,
    stderr: GuestOutput,
}

impl Instance {
    /// Resets fuel and arms the deadline for the next call.
    fn arm(&mut self, limits: &HookLimits) -> wasmtime::Result<()> {
        self.store.set_fuel(limits.fuel)?;
        self.store.data_mut().deadline = Instant::now() + limits.timeout;
        self.store.set_epoch_deadline(1);
        Ok(())
    }
}

/// Per-export call counters, resolved once.
struct CallCounters {
    init: Counter,
    fetch: Counter,
    fetch_many: Counter,
}

/// The data source of a keyspace with a hook.
pub struct HookSource {
    keyspace: Arc<str>,
    engine: Engine,
    pre: DataSourcePre<HostState>,
    config: Vec<(String, String)>,
    limits: HookLimits,
    sha256: String,
    http: Arc<HttpGate>,
    idle: Mutex<Vec<Instance>>,
    slots: Semaphore,
    log_budget: Arc<LogBudget>,
    metrics: Arc<Metrics>,
    calls: CallCounters,
}

impl std::fmt::Debug for HookSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookSource")
            .field("keyspace", &self.keyspace)
            .field("sha256", &self.sha256)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl HookSource {
    /// The source of `keyspace`'s hook; fails only when its HTTP client cannot be built.
    pub(super) fn new(
        keyspace: &ValidKeyspace,
        pre: DataSourcePre<HostState>,
        hook: &HookSpec,
        limits: HookLimits,
        sha256: String,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, reqwest::Error> {
        let http = Arc::new(HttpGate::new(&keyspace.allowed_hosts, &limits.http)?);
        let calls = CallCounters {
            init: metrics.hook_calls(&keyspace.name, "init"),
            fetch: metrics.hook_calls(&keyspace.name, "fetch"),
            fetch_many: metrics.hook_calls(&keyspace.name, "fetch-many"),
        };
        let keyspace: Arc<str> = Arc::from(keyspace.name.as_str());
        Ok(Arc::new(Self {
            engine: pre.engine().clone(),
            log_budget: LogBudget::new(Arc::clone(&keyspace)),
            keyspace,
            pre,
            config: hook.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            slots: Semaphore::new(limits.pool_size as usize),
            limits,
            sha256,
            http,
            idle: Mutex::new(Vec::new()),
            metrics,
            calls,
        }))
    }

    /// SHA-256 of the module this source runs.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The limits in effect.
    pub fn limits(&self) -> &HookLimits {
        &self.limits
    }

    /// Instances idle in the pool now.
    pub fn idle_instances(&self) -> usize {
        self.idle.lock().len()
    }

    /// Creates and initialises one instance and puts it in the pool.
    pub async fn warm_up(&self) -> Result<(), InitError> {
        let instance = self.instantiate().await?;
        self.idle.lock().push(instance);
        Ok(())
    }

    /// Drops every idle instance (the next call creates a fresh one). Used by benchmarks and tests.
    pub fn drain_pool(&self) {
        self.idle.lock().clear();
    }

    /// A fresh instance: new store, instantiated from the pre-linked component, `init` called with the config.
    async fn instantiate(&self) -> Result<Instance, InitError> {
        let stderr = GuestOutput::new("stderr", Arc::clone(&self.log_budget));
        let stdout = GuestOutput::new("stdout", Arc::clone(&self.log_budget));
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout)
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = HostState {
            keyspace: Arc::clone(&self.keyspace),
            http: Arc::clone(&self.http),
            deadline: Instant::now() + self.limits.timeout,
            memory_limit: usize::try_from(self.limits.memory).unwrap_or(usize::MAX),
            wasi,
            table: ResourceTable::new(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        // At every epoch tick past the armed deadline: trap when the call's wall-clock deadline has passed,
        // else yield to the scheduler and check again one tick later. A busy guest therefore never holds a
        // runtime worker for more than one tick.
        store.epoch_deadline_callback(|ctx| {
            if Instant::now() >= ctx.data().deadline {
                Err(DeadlineExceeded.into())
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store.set_fuel(self.limits.fuel).map_err(InitError::SetFuel)?;
        store.set_epoch_deadline(1);
        let deadline = self.limits.timeout + 2 * EPOCH_TICK;
        let started = async {
            let bindings = self.pre.instantiate_async(&mut store).await?;
            self.calls.init.inc();
            let init = bindings.call_init(&mut store, &self.config).await?;
            wasmtime::Result::Ok((bindings, init))
        };
        let (bindings, init) = match tokio::time::timeout(deadline, started).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                let (reason, message) = self.count_trap(&e, &stderr);
                return Err(InitError::Trapped { reason, message });
            }
            Err(_) => {
                self.count_timeout();
                return Err(InitError::TimedOut { timeout: self.limits.timeout });
            }
        };
        init.map_err(|message| InitError::InitRefused { message })?;
        Ok(Instance { store, bindings, stderr })
    }

    /// Takes a slot and an instance (idle, or fresh).
    async fn acquire(&self) -> Result<(tokio::sync::SemaphorePermit<'_>, Instance), FetchError> {
        let permit = self
            .slots
            .acquire()
            .await
            .map_err(|_| FetchError::Unavailable("the hook is shutting down".into()))?;
        let idle = self.idle.lock().pop();
        let instance = match idle {
            Some(i) => i,
            None => self.instantiate().await.map_err(FetchError::from)?,
        };
        Ok((permit, instance))
    }

    fn release(&self, instance: Instance) {
        self.idle.lock().push(instance);
    }

    /// Counts and logs a call stopped by its deadline.
    fn count_timeout(&self) {
        self.metrics.hook_trap(&self.keyspace, TrapReason::Timeout.label());
        tracing::warn!(keyspace = %self.keyspace, timeout = ?self.limits.timeout, "hook call exceeded its timeout; instance discarded");
    }

    /// Like [`HookSource::count_timeout`], as the call's error.
    fn timed_out(&self) -> FetchError {
        self.count_timeout();
        FetchError::Timeout
    }

    /// Classifies a failed call (the instance is discarded by the caller), counts and logs it.
    fn count_trap(&self, error: &wasmtime::Error, stderr: &GuestOutput) -> (TrapReason, String) {
        let (reason, message) = classify(error, stderr, &self.limits);
        self.metrics.hook_trap(&self.keyspace, reason.label());
        tracing::warn!(keyspace = %self.keyspace, reason = reason.label(), error = %message, "hook call trapped; instance discarded");
        (reason, message)
    }

    /// Like [`HookSource::count_trap`], as the call's error.
    fn trapped(&self, error: &wasmtime::Error, stderr: &GuestOutput) -> FetchError {
        let (reason, message) = self.count_trap(error, stderr);
        match reason {
            TrapReason::Timeout => FetchError::Timeout,
            _ => FetchError::Internal(message),
        }
    }

    /// Converts what a hook returned for one key.
    fn convert(
        &self,
        key: &str,
        result: Result<bindings::Entry, bindings::FetchError>,
    ) -> Result<Fetched, FetchError> {
        match result {
            Ok(entry) => {
                if entry.value.len() as u64 > self.limits.max_value_bytes {
                    self.metrics.hook_trap(&self.keyspace, TrapReason::Oversized.label());
                    return Err(FetchError::Internal(format!(
                        "the hook returned {} for key {key:?}, more than the keyspace's maxValueBytes ({})",
                        ByteSize(entry.value.len() as u64),
                        ByteSize(self.limits.max_value_bytes)
                    )));
                }
                Ok(Fetched { value: Bytes::from(entry.value), ttl: entry.ttl_ms.map(Duration::from_millis) })
            }
            Err(bindings::FetchError::NotFound(ttl)) => {
                Err(FetchError::NotFound { negative_ttl: ttl.map(Duration::from_millis) })
            }
            Err(bindings::FetchError::InvalidKey(m)) => Err(FetchError::InvalidKey(m)),
            Err(bindings::FetchError::Unavailable(m)) => Err(FetchError::Unavailable(m)),
            Err(bindings::FetchError::Timeout) => Err(FetchError::Timeout),
            Err(bindings::FetchError::Internal(m)) => Err(FetchError::Internal(m)),
        }
    }
}

#[async_trait]
impl DataSource for HookSource {
    async fn fetch(&self, key: &str) -> Result<Fetched, FetchError> {
        let (_permit, mut instance) = self.acquire().await?;
        instance.arm(&self.limits).map_err(|e| FetchError::Internal(e.to_string()))?;
        self.calls.fetch.inc();
        let Instance { store, bindings, .. } = &mut instance;
        let call = bindings.call_fetch(&mut *store, key);
        match tokio::time::timeout(self.limits.timeout + 2 * EPOCH_TICK, call).await {
            Ok(Ok(result)) => {
                self.release(instance);
                self.convert(key, result)
            }
            Ok(Err(e)) => Err(self.trapped(&e, &instance.stderr)),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "moduleSha256": self.sha256,
            "idleInstances": self.idle_instances(),
            "poolSize": self.limits.pool_size,
            "fuel": self.limits.fuel,
            "memoryBytes": self.limits.memory,
            "timeoutMs": self.limits.timeout.as_millis(),
            "maxResponseBytes": self.limits.http.max_response_bytes,
            "maxConcurrentRequests": self.limits.http.max_concurrent,
        })
    }

    async fn fetch_many(&self, keys: &[String]) -> Vec<Result<Fetched, FetchError>> {
        let all = |e: FetchError| keys.iter().map(|_| Err(e.clone())).collect();
        let (_permit, mut instance) = match self.acquire().await {
            Ok(acquired) => acquired,
            Err(e) => return all(e),
        };
        if let Err(e) = instance.arm(&self.limits) {
            return all(FetchError::Internal(e.to_string()));
        }
        self.calls.fetch_many.inc();
        let Instance { store, bindings, .. } = &mut instance;
        let call = bindings.call_fetch_many(&mut *store, keys);
        match tokio::time::timeout(self.limits.timeout + 2 * EPOCH_TICK, call).await {
            Ok(Ok(results)) => {
                self.release(instance);
                if results.len() != keys.len() {
                    let msg = format!(
                        "the hook's fetch-many returned {} results for {} keys",
                        results.len(),
                        keys.len()
                    );
                    return all(FetchError::Internal(msg));
                }
                keys.iter().zip(results).map(|(k, r)| self.convert(k, r)).collect()
            }
            Ok(Err(e)) => all(self.trapped(&e, &instance.stderr)),
            Err(_) => all(self.timed_out()),
        }
    }
}

/// What stopped a call, and the message for the reader.
fn classify(error: &wasmtime::Error, stderr: &GuestOutput, limits: &HookLimits) -> (TrapReason, String) {
    if error.downcast_ref::<DeadlineExceeded>().is_some() {
        return (TrapReason::Timeout, format!("the hook exceeded its timeout of {:?}", limits.timeout));
    }
    if let Some(m) = error.downcast_ref::<MemoryLimitExceeded>() {
        return (TrapReason::Memory, format!("the hook exceeded its memory limit of {}", m.limit));
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => {
            (TrapReason::Fuel, format!("the hook ran out of fuel ({} units per call)", limits.fuel))
        }
        Some(Trap::Interrupt) => {
            (TrapReason::Timeout, format!("the hook exceeded its timeout of {:?}", limits.timeout))
        }
        Some(Trap::StackOverflow) => (TrapReason::StackOverflow, "the hook overflowed its call stack".into()),
        Some(Trap::UnreachableCodeReached) => {
            let text = stderr.tail();
            (
                TrapReason::Panic,
                match panic_message(&text) {
                    Some(m) => format!("the hook panicked: {m}"),
                    None => "the hook panicked (wasm `unreachable` executed)".into(),
                },
            )
        }
        Some(trap) => (TrapReason::Other, format!("the hook trapped: {trap}")),
        None => (TrapReason::Other, format!("the hook failed: {error:#}")),
    }
}

/// The message of the last Rust panic in a guest's stderr (`thread '..' panicked at FILE:LINE:COL:\nMESSAGE`).
fn panic_message(stderr: &str) -> Option<String> {
    let start = stderr.rfind("panicked at ")?;
    let rest = &stderr[start + "panicked at ".len()..];
    let (location, message) = rest.split_once('\n').unwrap_or((rest, ""));
    let message: Vec<&str> = message
        .lines()
        .take_while(|l| !l.starts_with("note: "))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let location = location.trim_end_matches(':');
    let text = if message.is_empty() {
        location.to_owned()
    } else {
        format!("{} (at {location})", message.join(" "))
    };
    Some(text.chars().take(1024).collect())
}

#[cfg(test)]
mod tests {
    use super::panic_message;

    #[test]
    fn panic_messages_are_quoted_from_stderr() {
        let stderr = "some log\nthread '<unnamed>' panicked at src/lib.rs:10:5:\ntest hook panicked on purpose\n\
                      note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            panic_message(stderr).as_deref(),
            Some("test hook panicked on purpose (at src/lib.rs:10:5)")
        );
        assert_eq!(panic_message("nothing here"), None);
    }
}
