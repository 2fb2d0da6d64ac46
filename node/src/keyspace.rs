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
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use distcache_api::{KeyspacesFile, ValidKeyspace, validate_keyspaces};
use parking_lot::Mutex;
use serde::Serialize;

use crate::{
    metrics::{KeyspaceMetrics, Metrics},
    singleflight::SingleFlight,
    source::{DataSource, SourceFactory},
    store::Store,
};

/// A value as returned to a reader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    /// The bytes.
    pub bytes: bytes::Bytes,
    /// Time left before expiry; `None` = never expires.
    pub ttl: Option<Duration>,
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
    /// A data source could not be built.
    #[error("keyspaces file {path}: {message}")]
    Source {
        /// File path.
        path: PathBuf,
        /// The factory's message.
        message: String,
    },
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
        }
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

    /// Like [`Keyspaces::apply`], but keyspaces whose data source cannot be built (a hook module not mounted
    /// yet) are left out instead of refusing the whole set; their error is returned (and recorded as the last
    /// refusal) so that the caller retries. For a node's first load: a pod whose module ConfigMap is missing
    /// still serves every other keyspace instead of crash-looping.
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
                    Err(message) if skip_failed => {
                        tracing::warn!(keyspace = %config.name, error = %message, "keyspace left out until its data source can be built");
                        skipped.push(message);
                        continue;
                    }
                    Err(message) => {
                        return Err(LoadError::Source {
                            path: file.map(Path::to_owned).unwrap_or_default(),
                            message,
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
            let runtime = KeyspaceRuntime { config, store, source, metrics, source_flight, peer_flight };
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
        self.map.store(Arc::new(next));
        let mut status = self.status.lock();
        status.file = file.map(Path::to_owned);
        status.applied_at = Some(unix_now());
        if skipped.is_empty() {
            status.last_error = None;
            return Ok(None);
        }
        let error = LoadError::Source {
            path: file.map(Path::to_owned).unwrap_or_default(),
            message: skipped.join("; "),
        };
        status.last_error = Some(error.to_string());
        self.metrics.reload("refused");
        Ok(Some(error))
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
        self.apply_inner(specs, base, Some(path), false, true).await
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

    /// Records a refused reload.
    ///
    /// A retry of the same change that fails with the same error is neither logged nor counted again.
    pub fn refuse(&self, error: &LoadError, retry: bool) {
        let message = error.to_string();
        let mut status = self.status.lock();
        if retry && status.last_error.as_deref() == Some(message.as_str()) {
            tracing::debug!(error = %message, "keyspaces reload retried, still refused");
            return;
        }
        self.metrics.reload("refused");
        tracing::warn!(error = %message, "keyspaces reload refused; the last good keyspaces keep serving");
        status.last_error = Some(message);
    }
}

/// A change refused because a data source could not be built is tried again after this many poll intervals
/// (30 s with the default 1 s interval).
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
    // A change refused because a data source could not be built (a download failed, a module file is not there
    // yet) may succeed later: it is retried every RETRY_REFUSED_TICKS intervals until it applies or the file
    // changes.
    let mut retry_at: Option<tokio::time::Instant> =
        retry_pending.then(|| tokio::time::Instant::now() + interval * RETRY_REFUSED_TICKS);
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
        last = Some(current.clone());
        let text = String::from_utf8_lossy(&current);
        let outcome = match parse_keyspaces(&path, &text) {
            Ok(specs) => {
                // Fingerprinted before the build reads them: a change during the build is seen next tick.
                watched = keyspaces.watch_paths(&specs, &base);
                prints = fingerprints(&watched);
                keyspaces.apply(specs, &base, Some(&path), modules_changed).await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                retry_at = None;
                metrics.reload("applied");
                tracing::info!(path = %path.display(), "keyspaces reloaded");
            }
            Err(e) => {
                retry_at = matches!(e, LoadError::Source { .. })
                    .then(|| tokio::time::Instant::now() + interval * RETRY_REFUSED_TICKS);
                keyspaces.refuse(&e, retry);
            }
        }
    }
}
