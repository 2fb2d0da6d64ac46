//! The keyspaces a node serves: loading and validating the keyspaces file, building each keyspace's runtime, and
//! applying reloads without a restart.
//!
//! The set is an immutable map behind an `ArcSwap`: the request path loads it without a lock, a reload builds a
//! complete new map and swaps it in. A reload that fails to parse, validate or build a data source changes
//! nothing: the last good set keeps serving and the failure is logged, counted and shown on `/admin/keyspaces`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use distcache_api::{KeyspacesFile, ValidKeyspace, validate_keyspaces};
use parking_lot::Mutex;
use serde::Serialize;

use crate::{
    metrics::{KeyspaceMetrics, Metrics},
    singleflight::SingleFlight,
    source::{BuildSourceError, DataSource, SourceFactory, error_chain},
    store::Store,
};

/// A value as returned to a reader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    /// The bytes.
    pub bytes: bytes::Bytes,
    /// Time left before expiry; `None` = never expires.
    pub ttl: Option<Duration>,
    /// An expired value answered anyway (stale-while-revalidate, stale-if-error).
    pub stale: bool,
}

/// Everything one keyspace needs on the request path.
pub struct KeyspaceRuntime {
    /// Validated settings.
    pub config: ValidKeyspace,
    /// Main and hot tiers.
    pub store: Arc<Store>,
    /// The data source (read-through) or `None` (cache-aside).
    pub source: Option<Arc<dyn DataSource>>,
    /// Pre-resolved metric handles.
    pub metrics: KeyspaceMetrics,
    /// In-flight loads from the data source (owner side).
    pub source_flight: Arc<SingleFlight<Value>>,
    /// In-flight loads from owners (non-owner side).
    pub peer_flight: Arc<SingleFlight<Value>>,
    /// Rate limit, circuit breaker and warm-up of the data source.
    pub protect: Arc<crate::protect::Protections>,
}

impl KeyspaceRuntime {
    /// Keyspace name.
    pub fn name(&self) -> &str {
        &self.config.name
    }
}

/// Why a keyspaces file was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("failed to read keyspaces file {path}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not match the schema.
    #[error("failed to parse keyspaces file {path}: {message}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// serde's message, naming the field and line.
        message: String,
    },
    /// Values out of range, duplicates, ...
    #[error("invalid keyspaces file {path}: {message}")]
    Invalid {
        /// File path.
        path: PathBuf,
        /// Every problem, each naming its field.
        message: String,
    },
    /// A data source could not be built: the change is refused.
    #[error("keyspaces file {path}: failed to build the data source of keyspace {keyspace:?}")]
    Source {
        /// File path.
        path: PathBuf,
        /// The keyspace.
        keyspace: String,
        /// Cause.
        #[source]
        source: BuildSourceError,
    },
    /// The data sources of these keyspaces could not be built, and they were left out while the others were
    /// applied (a node's first load, and the reloads until every keyspace of its file is served).
    #[error("keyspaces file {path}: {} left out until their data source can be built", names(.left_out))]
    LeftOut {
        /// File path.
        path: PathBuf,
        /// Each keyspace left out, and why.
        left_out: Vec<(String, BuildSourceError)>,
    },
}

fn names(left_out: &[(String, BuildSourceError)]) -> String {
    let names: Vec<String> = left_out.iter().map(|(name, _)| format!("{name:?}")).collect();
    format!("keyspace{} {}", if names.len() == 1 { "" } else { "s" }, names.join(", "))
}

impl LoadError {
    /// Whether the same keyspaces file may apply when tried again: only when a data source failed for a
    /// reason that can heal (a module file not mounted yet, a failed download). A file that does not parse or
    /// validate, or a hook that is invalid (wrong checksum, not a component, `init` refusing its config),
    /// fails the same way until the file or the module changes.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Read { .. } => true,
            Self::Parse { .. } | Self::Invalid { .. } => false,
            Self::Source { source, .. } => source.is_transient(),
            Self::LeftOut { left_out, .. } => left_out.iter().any(|(_, e)| e.is_transient()),
        }
    }

    /// The message with every cause, for logs and `/admin/keyspaces` (`Display` shows only the first line of
    /// the story).
    pub fn detail(&self) -> String {
        match self {
            Self::LeftOut { path, left_out } => {
                let each: Vec<String> = left_out
                    .iter()
                    .map(|(name, e)| {
                        format!("failed to build the data source of keyspace {name:?}: {}", error_chain(e))
                    })
                    .collect();
                format!("keyspaces file {}: {}", path.display(), each.join("; "))
            }
            other => error_chain(other),
        }
    }
}

/// Parses and validates keyspaces YAML.
pub fn parse_keyspaces(path: &Path, text: &str) -> Result<Vec<ValidKeyspace>, LoadError> {
    let file: KeyspacesFile = if text.trim().is_empty() {
        KeyspacesFile::default()
    } else {
        serde_yaml::from_str(text)
            .map_err(|e| LoadError::Parse { path: path.to_owned(), message: e.to_string() })?
    };
    validate_keyspaces(&file.keyspaces)
        .map_err(|e| LoadError::Invalid { path: path.to_owned(), message: e.to_string() })
}

/// State of the last reload, shown on `/admin/keyspaces`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReloadStatus {
    /// Keyspaces file path.
    pub file: Option<PathBuf>,
    /// When the current set was applied (seconds since the Unix epoch).
    pub applied_at: Option<u64>,
    /// The error of the last refused reload, if the file has not been fixed since.
    pub last_error: Option<String>,
}

/// The keyspaces of a node.
pub struct Keyspaces {
    map: ArcSwap<HashMap<String, Arc<KeyspaceRuntime>>>,
    factory: Arc<dyn SourceFactory>,
    metrics: Arc<Metrics>,
    status: Mutex<ReloadStatus>,
    /// Whether the last refusal (or the keyspaces left out) may heal when tried again.
    refusal_may_heal: AtomicBool,
    /// Whether any keyspace has `access` lists (requests skip the check when none has).
    any_access: AtomicBool,
    /// Counts the sets applied (a warm-up follows each).
    applied: tokio::sync::watch::Sender<u64>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Keyspaces {
    /// An empty set.
    pub fn new(factory: Arc<dyn SourceFactory>, metrics: Arc<Metrics>) -> Self {
        Self {
            map: ArcSwap::from_pointee(HashMap::new()),
            factory,
            metrics,
            status: Mutex::new(ReloadStatus::default()),
            refusal_may_heal: AtomicBool::new(false),
            any_access: AtomicBool::new(false),
            applied: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Wakes up after every set applied.
    pub fn subscribe_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Whether any keyspace restricts its callers (`access`).
    pub fn any_access(&self) -> bool {
        self.any_access.load(Ordering::Acquire)
    }

    /// The runtime of a keyspace (lock-free).
    #[inline]
    pub fn get(&self, name: &str) -> Option<Arc<KeyspaceRuntime>> {
        self.map.load().get(name).cloned()
    }

    /// All runtimes, sorted by name.
    pub fn all(&self) -> Vec<Arc<KeyspaceRuntime>> {
        let mut all: Vec<_> = self.map.load().values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Comma-separated names (for error messages).
    pub fn names(&self) -> String {
        let mut names: Vec<String> = self.map.load().keys().cloned().collect();
        names.sort();
        names.join(", ")
    }

    /// Status of the last reload.
    pub fn status(&self) -> ReloadStatus {
        self.status.lock().clone()
    }

    /// Builds the runtimes of a validated set and swaps them in. Keyspaces whose settings did not change keep
    /// their runtime; a changed keyspace keeps its entries (copied into a resized store when `maxBytes`
    /// changed in place) and its data source when the hook did not change. Sources are built before anything
    /// changes, so nothing changes when one fails to build.
    ///
    /// `modules_changed` says that files the sources are built from changed (a hook module replaced in place):
    /// then every keyspace with such files asks the factory again, which swaps in the new module. Calls in
    /// flight finish on the source they started with.
    pub async fn apply(
        &self,
        specs: Vec<ValidKeyspace>,
        base_dir: &Path,
        file: Option<&Path>,
        modules_changed: bool,
    ) -> Result<(), LoadError> {
        match self.apply_inner(specs, base_dir, file, modules_changed, false).await? {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Like [`Keyspaces::apply`], but with `skip_failed` keyspaces not served yet whose data source cannot be
    /// built (a hook module not mounted yet) are left out instead of refusing the whole set, and returned as
    /// [`LoadError::LeftOut`] for the caller to record ([`Keyspaces::refuse`]) and, when it may heal, retry. For
    /// a node's first load: a pod whose module ConfigMap is missing still serves every other keyspace instead of
    /// crash-looping.
    async fn apply_inner(
        &self,
        specs: Vec<ValidKeyspace>,
        base_dir: &Path,
        file: Option<&Path>,
        modules_changed: bool,
        skip_failed: bool,
    ) -> Result<Option<LoadError>, LoadError> {
        let current = self.map.load_full();
        // First everything that can fail (building data sources), then the changes.
        let mut planned = Vec::with_capacity(specs.len());
        let mut skipped = Vec::new();
        for config in specs {
            let old = current.get(&config.name).cloned();
            let rebuild =
                (modules_changed && !self.factory.watch_paths(&config, base_dir).is_empty()) || old.is_none();
            let source = match &old {
                Some(old) if !rebuild && old.config == config => old.source.clone(),
                Some(old) if !rebuild && same_source_inputs(&old.config, &config) => old.source.clone(),
                _ => match self.factory.build(&config, base_dir).await {
                    Ok(source) => source,
                    // Only a keyspace not served yet is left out: a served one keeps serving as it is, and
                    // the change is refused.
                    Err(e) if skip_failed && old.is_none() => {
                        skipped.push((config.name, e));
                        continue;
                    }
                    Err(source) => {
                        return Err(LoadError::Source {
                            path: file.map(Path::to_owned).unwrap_or_default(),
                            keyspace: config.name,
                            source,
                        });
                    }
                },
            };
            planned.push((config, old, source));
        }
        let mut next = HashMap::with_capacity(planned.len());
        for (config, old, source) in planned {
            if let Some(old) = &old
                && old.config == config
                && same_source(old.source.as_ref(), source.as_ref())
            {
                next.insert(config.name.clone(), Arc::clone(old));
                continue;
            }
            let metrics = self.metrics.keyspace(&config.name);
            // The store is shared with the old runtime (requests still holding it write to the same caches);
            // a new size is applied in place. The resize copies the main tier on a blocking thread (it serves
            // requests while it copies), so that a large tier never holds up a tokio worker.
            let store = match &old {
                Some(old) => {
                    if old.config.max_bytes != config.max_bytes {
                        let (store, max_bytes) = (Arc::clone(&old.store), config.max_bytes);
                        drop(tokio::task::spawn_blocking(move || store.resize(max_bytes)));
                    }
                    Arc::clone(&old.store)
                }
                None => Arc::new(Store::new(config.max_bytes, &metrics.evictions)),
            };
            let (source_flight, peer_flight) = match &old {
                Some(old) => (Arc::clone(&old.source_flight), Arc::clone(&old.peer_flight)),
                None => (Arc::default(), Arc::default()),
            };
            // The breaker's state and the warm-up's progress survive a reload that leaves them as they were.
            let protect = match &old {
                Some(old) if old.config.protection == config.protection => Arc::clone(&old.protect),
                _ => Arc::new(crate::protect::Protections::new(
                    &config.protection,
                    metrics.circuit_state.clone(),
                    &config.name,
                )),
            };
            store.set_stale_keep(config.protection.stale_keep());
            let runtime =
                KeyspaceRuntime { config, store, source, metrics, source_flight, peer_flight, protect };
            next.insert(runtime.config.name.clone(), Arc::new(runtime));
        }
        for name in current.keys() {
            if !next.contains_key(name) {
                self.metrics.forget_keyspace(name);
                tracing::info!(keyspace = %name, "keyspace removed");
            }
        }
        for (name, rt) in &next {
            match current.get(name) {
                None => tracing::info!(keyspace = %name, max_bytes = rt.config.max_bytes, "keyspace added"),
                Some(old) if !Arc::ptr_eq(old, rt) => tracing::info!(keyspace = %name, "keyspace updated"),
                Some(_) => {}
            }
        }
        self.any_access.store(next.values().any(|rt| rt.config.spec.access.is_some()), Ordering::Release);
        self.map.store(Arc::new(next));
        self.applied.send_modify(|n| *n += 1);
        let mut status = self.status.lock();
        status.file = file.map(Path::to_owned);
        status.applied_at = Some(unix_now());
        if skipped.is_empty() {
            status.last_error = None;
            self.refusal_may_heal.store(false, Ordering::Relaxed);
            return Ok(None);
        }
        Ok(Some(LoadError::LeftOut { path: file.map(Path::to_owned).unwrap_or_default(), left_out: skipped }))
    }

    /// A node's first load of its keyspaces file: invalid files fail (the node does not start), but keyspaces
    /// whose data source cannot be built yet are left out and returned as an error to retry, while the others
    /// serve (see [`Keyspaces::apply`] for the all-or-nothing reloads of a running node).
    pub async fn load_file_initial(&self, path: &Path) -> Result<Option<LoadError>, LoadError> {
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
        let specs = parse_keyspaces(path, &text)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let left_out = self.apply_inner(specs, base, Some(path), false, true).await?;
        if let Some(e) = &left_out {
            self.refuse(e, false);
        }
        Ok(left_out)
    }

    /// Reads, validates and applies a keyspaces file.
    pub async fn load_file(&self, path: &Path) -> Result<(), LoadError> {
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
        let specs = parse_keyspaces(path, &text)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        self.apply(specs, base, Some(path), false).await
    }

    /// The files the sources of `specs` are built from (hook modules), to watch for changes.
    pub fn watch_paths(&self, specs: &[ValidKeyspace], base_dir: &Path) -> Vec<PathBuf> {
        specs.iter().flat_map(|ks| self.factory.watch_paths(ks, base_dir)).collect()
    }

    /// Records a refused reload, or keyspaces left out ([`LoadError::LeftOut`]).
    ///
    /// A retry of the same change that fails with the same error is neither logged nor counted again.
    pub fn refuse(&self, error: &LoadError, retry: bool) {
        let message = error.detail();
        let may_heal = error.is_transient();
        self.refusal_may_heal.store(may_heal, Ordering::Relaxed);
        let mut status = self.status.lock();
        if retry && status.last_error.as_deref() == Some(message.as_str()) {
            tracing::debug!(error = %message, "keyspaces reload retried, still refused");
            return;
        }
        self.metrics.reload("refused");
        let next =
            if may_heal { "retried" } else { "not retried until the keyspaces file or a module changes" };
        if matches!(error, LoadError::LeftOut { .. }) {
            tracing::warn!(error = %message, "keyspaces left out until their data source can be built ({next}); the others serve");
        } else {
            tracing::warn!(error = %message, "keyspaces reload refused ({next}); the last good keyspaces keep serving");
        }
        status.last_error = Some(message);
    }

    /// Whether the last refusal recorded by [`Keyspaces::refuse`] may heal when the same change is tried again.
    pub fn refusal_may_heal(&self) -> bool {
        self.refusal_may_heal.load(Ordering::Relaxed)
    }
}

/// A change refused because a data source could not be built, for a reason that may heal, is tried again after
/// this many poll intervals (30 s with the default 1 s interval).
pub const RETRY_REFUSED_TICKS: u32 = 30;

/// Whether a keyspace's data source depends on nothing that differs between two configs.
fn same_source_inputs(a: &ValidKeyspace, b: &ValidKeyspace) -> bool {
    a.spec.hook == b.spec.hook && a.max_value_bytes == b.max_value_bytes && a.fetch_timeout == b.fetch_timeout
}

fn same_source(a: Option<&Arc<dyn DataSource>>, b: Option<&Arc<dyn DataSource>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

/// What identifies a version of a watched file: size, modification time and inode (a ConfigMap update swaps
/// the file behind a symlink, which changes the inode even when size and time do not).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint(Option<(u64, Option<SystemTime>, u64)>);

fn fingerprints(paths: &[PathBuf]) -> Vec<Fingerprint> {
    use std::os::unix::fs::MetadataExt;
    paths
        .iter()
        .map(|p| Fingerprint(std::fs::metadata(p).ok().map(|m| (m.len(), m.modified().ok(), m.ino()))))
        .collect()
}

/// Polls the keyspaces file, and the hook modules it names, and applies changes until `shutdown`.
///
/// Polling (by content, every `interval`) rather than inotify: a Kubernetes ConfigMap volume updates by swapping
/// a symlinked directory, which file-level inotify watches miss; reading a small file once a second is cheap and
/// sees every kind of update. Module files are compared by size, time and inode, not read, every tick.
///
/// `retry_pending` says that the first load left keyspaces out ([`Keyspaces::load_file_initial`]): until
/// every keyspace of the file is served, changes apply what they can and leave the rest out, as the first load
/// did. A change refused (or keyspaces left out) for a reason that may heal ([`LoadError::is_transient`]) is
/// retried every [`RETRY_REFUSED_TICKS`] intervals; any other waits for the file or a module to change.
pub async fn watch_file(
    keyspaces: Arc<Keyspaces>,
    metrics: Arc<Metrics>,
    path: PathBuf,
    interval: Duration,
    retry_pending: bool,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut last = std::fs::read(&path).ok();
    let base = path.parent().unwrap_or_else(|| Path::new(".")).to_owned();
    let mut watched = last
        .as_deref()
        .and_then(|b| parse_keyspaces(&path, &String::from_utf8_lossy(b)).ok())
        .map(|specs| keyspaces.watch_paths(&specs, &base))
        .unwrap_or_default();
    let mut prints = fingerprints(&watched);
    let mut missing_logged = false;
    // Keyspaces of the file are left out (since the first load).
    let mut partial = retry_pending;
    // A change refused because a data source could not be built for a reason that may heal (a download failed,
    // a module file is not there yet) may succeed later: it is retried every RETRY_REFUSED_TICKS intervals until
    // it applies or the file changes.
    let retry_after = || Some(tokio::time::Instant::now() + interval * RETRY_REFUSED_TICKS);
    let mut retry_at = if retry_pending && keyspaces.refusal_may_heal() { retry_after() } else { None };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let current = match tokio::fs::read(&path).await {
            Ok(bytes) => {
                missing_logged = false;
                bytes
            }
            Err(e) => {
                if !missing_logged {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read keyspaces file; keeping the current keyspaces");
                    missing_logged = true;
                }
                continue;
            }
        };
        let modules_changed = fingerprints(&watched) != prints;
        let unchanged = last.as_deref() == Some(current.as_slice()) && !modules_changed;
        let retry = unchanged && retry_at.is_some_and(|t| tokio::time::Instant::now() >= t);
        if unchanged && !retry {
            continue;
        }
        if !unchanged && !settled(&path, &current).await {
            // Caught while an editor or a script that does not rename writes it: read again next tick.
            continue;
        }
        last = Some(current.clone());
        let text = String::from_utf8_lossy(&current);
        let parsed = if text.trim().is_empty() {
            Err(LoadError::Invalid {
                path: path.clone(),
                message: "the file is empty; write `keyspaces: []` to remove every keyspace".into(),
            })
        } else {
            parse_keyspaces(&path, &text)
        };
        let outcome = match parsed {
            Ok(specs) => {
                // Fingerprinted before the build reads them: a change during the build is seen next tick.
                watched = keyspaces.watch_paths(&specs, &base);
                prints = fingerprints(&watched);
                keyspaces.apply_inner(specs, &base, Some(&path), modules_changed, partial).await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(None) => {
                partial = false;
                retry_at = None;
                metrics.reload("applied");
                tracing::info!(path = %path.display(), "keyspaces reloaded");
            }
            Ok(Some(e)) | Err(e) => {
                retry_at = if e.is_transient() { retry_after() } else { None };
                keyspaces.refuse(&e, retry);
            }
        }
    }
}

/// How long a changed keyspaces file must read the same before it is applied.
const SETTLE_READ: Duration = Duration::from_millis(25);

/// Whether the file still holds `read` after [`SETTLE_READ`]: a writer that truncates and then writes (not a
/// rename, as ConfigMap mounts do) can be caught in between, with an empty or a cut-off file that may even parse.
async fn settled(path: &Path, read: &[u8]) -> bool {
    tokio::time::sleep(SETTLE_READ).await;
    tokio::fs::read(path).await.is_ok_and(|again| again == read)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use async_trait::async_trait;

    use super::*;
    use crate::hooks::{HookError, ModuleError};

    /// Fails to build the source of keyspace `hooked`, transiently (a module not mounted) or not (a wrong
    /// checksum), until `heal_after` builds; every other keyspace is cache-aside.
    struct Flaky {
        transient: bool,
        heal_after: usize,
        builds: AtomicUsize,
    }

    impl Flaky {
        fn new(transient: bool, heal_after: usize) -> Arc<Self> {
            Arc::new(Self { transient, heal_after, builds: AtomicUsize::new(0) })
        }

        fn builds(&self) -> usize {
            self.builds.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl SourceFactory for Flaky {
        async fn build(
            &self,
            keyspace: &ValidKeyspace,
            _base: &Path,
        ) -> Result<Option<Arc<dyn DataSource>>, BuildSourceError> {
            if keyspace.name != "hooked" || self.builds.fetch_add(1, Ordering::SeqCst) >= self.heal_after {
                return Ok(None);
            }
            let error = if self.transient {
                ModuleError::ReadModule {
                    module: "ConfigMap late/hook.wasm".into(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                }
            } else {
                ModuleError::ChecksumMismatch {
                    module: "hook.wasm".into(),
                    expected: "0".repeat(64),
                    actual: "1".repeat(64),
                }
            };
            Err(HookError::from(error).into())
        }
    }

    const BOTH: &str =
        "keyspaces:\n  - { name: plain, maxBytes: 1Mi }\n  - { name: hooked, maxBytes: 1Mi }\n";

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).expect("write keyspaces file");
    }

    /// Watches `file` with 10 ms ticks (a retry every 300 ms) for `run`, writing `change` into it after 100 ms.
    /// The tests run on tokio's paused clock: `run` is virtual time, and the runtime finishes every tick's work
    /// (file reads included: blocking tasks hold the clock) before the clock moves on, so the number of ticks
    /// and retries in `run` is exact, not a hope about how fast this machine is.
    async fn watch_for(
        keyspaces: &Arc<Keyspaces>,
        metrics: &Arc<Metrics>,
        file: &Path,
        pending: bool,
        change: Option<&str>,
        run: Duration,
    ) {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(watch_file(
            Arc::clone(keyspaces),
            Arc::clone(metrics),
            file.to_owned(),
            Duration::from_millis(10),
            pending,
            shutdown.clone(),
        ));
        if let Some(text) = change {
            tokio::time::sleep(Duration::from_millis(100)).await;
            write(file, text);
        }
        tokio::time::sleep(run).await;
        shutdown.cancel();
        task.await.expect("watcher ends");
    }

    fn error_of(keyspaces: &Keyspaces) -> String {
        keyspaces.status().last_error.unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn a_keyspace_left_out_at_start_is_retried_only_when_it_can_heal() {
        for transient in [true, false] {
            let dir = tempfile::tempdir().expect("temp dir");
            let file = dir.path().join("keyspaces.yaml");
            write(&file, BOTH);
            let factory = Flaky::new(transient, 3);
            let metrics = Arc::new(Metrics::new());
            let keyspaces = Arc::new(Keyspaces::new(factory.clone(), Arc::clone(&metrics)));

            let left_out =
                keyspaces.load_file_initial(&file).await.expect("the file is valid").expect("left out");
            assert!(matches!(&left_out, LoadError::LeftOut { left_out, .. } if left_out.len() == 1));
            assert_eq!(left_out.is_transient(), transient);
            assert_eq!(keyspaces.refusal_may_heal(), transient);
            assert!(
                keyspaces.get("plain").is_some() && keyspaces.get("hooked").is_none(),
                "the others serve"
            );
            let error = error_of(&keyspaces);
            let why =
                if transient { "failed to read hook module ConfigMap late/hook.wasm: " } else { "refused" };
            assert!(
                error.contains("keyspace \"hooked\"") && error.contains(why),
                "the cause is reported: {error}"
            );
            assert_eq!(metrics.reloads("refused"), 1);

            watch_for(&keyspaces, &metrics, &file, true, None, Duration::from_millis(1500)).await;
            if transient {
                assert_eq!(factory.builds(), 4, "retried until it healed (3 failures), then applied once");
                assert!(keyspaces.get("hooked").is_some(), "loaded once it healed");
                assert_eq!(error_of(&keyspaces), "", "the refusal is cleared");
                assert_eq!(metrics.reloads("applied"), 1);
                assert_eq!(
                    metrics.reloads("refused"),
                    1,
                    "a retry failing the same way is not counted again"
                );
            } else {
                assert_eq!(factory.builds(), 1, "a permanent failure is not retried");
                assert!(keyspaces.get("hooked").is_none());
                assert_eq!(error_of(&keyspaces), error, "still reported");

                // A changed file is tried again, and still leaves out only what fails.
                let more = format!("{BOTH}  - {{ name: more, maxBytes: 1Mi }}\n");
                watch_for(&keyspaces, &metrics, &file, true, Some(&more), Duration::from_millis(800)).await;
                assert_eq!(factory.builds(), 2, "tried once more for the changed file");
                assert!(keyspaces.get("more").is_some(), "the new keyspace serves");
                assert!(keyspaces.get("hooked").is_none());
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_reload_is_retried_only_when_it_can_heal() {
        for transient in [true, false] {
            let dir = tempfile::tempdir().expect("temp dir");
            let file = dir.path().join("keyspaces.yaml");
            write(&file, "keyspaces:\n  - { name: plain, maxBytes: 1Mi }\n");
            let factory = Flaky::new(transient, usize::MAX);
            let metrics = Arc::new(Metrics::new());
            let keyspaces = Arc::new(Keyspaces::new(factory.clone(), Arc::clone(&metrics)));
            keyspaces.load_file(&file).await.expect("applies");

            watch_for(&keyspaces, &metrics, &file, false, Some(BOTH), Duration::from_millis(1500)).await;

            let error = error_of(&keyspaces);
            assert!(error.contains("failed to build the data source of keyspace \"hooked\""), "{error}");
            assert!(keyspaces.get("hooked").is_none(), "the change is refused");
            assert_eq!(metrics.reloads("refused"), 1, "counted once");
            if transient {
                assert!(factory.builds() >= 3, "retried every 300 ms: {} builds", factory.builds());
            } else {
                assert_eq!(factory.builds(), 1, "a permanent failure is not retried");
            }
        }
    }

    /// Polls `condition` every 10 ms of the paused clock, for at most one virtual second.
    async fn until(condition: impl Fn() -> bool, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while !condition() {
            assert!(tokio::time::Instant::now() < deadline, "not within 1 s: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_file_caught_mid_write_or_emptied_is_not_applied() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("keyspaces.yaml");
        let two = "keyspaces:\n  - { name: plain, maxBytes: 1Mi }\n  - { name: old, maxBytes: 1Mi }\n";
        write(&file, two);
        let metrics = Arc::new(Metrics::new());
        let keyspaces = Arc::new(Keyspaces::new(Flaky::new(false, 0), Arc::clone(&metrics)));
        keyspaces.load_file(&file).await.expect("applies");
        let names = |k: &Keyspaces| k.names();

        // A writer that truncates and writes: a tick at 100 ms reads the cut-off file (valid YAML, one keyspace
        // fewer), which the file no longer holds 25 ms later; only the finished file is applied.
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(watch_file(
            Arc::clone(&keyspaces),
            Arc::clone(&metrics),
            file.clone(),
            Duration::from_millis(10),
            false,
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(95)).await;
        write(&file, "keyspaces:\n  - { name: plain, maxBytes: 1Mi }\n");
        tokio::time::sleep(Duration::from_millis(10)).await;
        write(&file, &format!("{two}  - {{ name: new, maxBytes: 1Mi }}\n"));
        // The first reload applied is the finished file: had the cut-off one been applied, it would be first.
        until(|| metrics.reloads("applied") == 1, "a reload applied").await;
        assert_eq!(names(&keyspaces), "new, old, plain", "the cut-off file was never applied");

        // An emptied file is refused, not read as "no keyspaces".
        write(&file, " \n");
        until(|| metrics.reloads("refused") == 1, "the emptied file refused").await;
        shutdown.cancel();
        task.await.expect("watcher ends");
        assert_eq!(names(&keyspaces), "new, old, plain", "every keyspace still serves");
        let error = error_of(&keyspaces);
        assert!(error.contains("the file is empty; write `keyspaces: []`"), "{error}");
        assert_eq!(metrics.reloads("refused"), 1);
    }

    #[test]
    fn only_source_failures_that_can_heal_are_transient() {
        let path = PathBuf::from("keyspaces.yaml");
        let missing = || {
            BuildSourceError::from(HookError::from(ModuleError::ReadModule {
                module: "m".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }))
        };
        let source = |source| LoadError::Source { path: path.clone(), keyspace: "k".into(), source };
        assert!(source(missing()).is_transient());
        assert!(!source(BuildSourceError::NoHookRuntime).is_transient());
        assert!(!LoadError::Invalid { path: path.clone(), message: "bad".into() }.is_transient());
        let left_out = |errors: Vec<BuildSourceError>| LoadError::LeftOut {
            path: path.clone(),
            left_out: errors.into_iter().map(|e| ("k".to_owned(), e)).collect(),
        };
        assert!(left_out(vec![BuildSourceError::NoHookRuntime, missing()]).is_transient(), "one may heal");
        assert!(!left_out(vec![BuildSourceError::NoHookRuntime]).is_transient());
        let shown = source(missing());
        assert_eq!(
            shown.to_string(),
            "keyspaces file keyspaces.yaml: failed to build the data source of keyspace \"k\""
        );
        assert_eq!(
            shown.detail(),
            format!(
                "{shown}: failed to read hook module m: {}",
                std::io::Error::from(std::io::ErrorKind::NotFound)
            )
        );
    }
}
