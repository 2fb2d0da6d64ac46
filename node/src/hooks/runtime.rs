//! The process-wide hook engine: compiling (or loading precompiled) components and building each keyspace's
//! [`HookSource`].

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::Instant,
};

use async_trait::async_trait;
use distcache_api::{HookSpec, ValidKeyspace};
use parking_lot::Mutex;
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig,
    component::{Component, HasSelf, Linker},
};

use super::{
    EPOCH_TICK,
    bindings::{DataSource as Bindings, DataSourcePre},
    instance::{HookLimits, HookSource, HostState},
    module::{self, ModuleBytes, sha256_hex, write_atomically},
};
use crate::{
    metrics::Metrics,
    source::{DataSource, SourceFactory},
};

/// Node-wide settings of the hook runtime.
#[derive(Clone, Debug)]
pub struct HookSettings {
    /// Precompiled artifacts and downloaded modules.
    pub cache_dir: PathBuf,
    /// Where ConfigMaps with modules are mounted (`<dir>/<name>/<key>`).
    pub config_map_dir: PathBuf,
    /// Most instances alive at once, over all keyspaces.
    pub max_instances: u32,
}

impl HookSettings {
    /// Settings from the node configuration.
    pub fn from_config(config: &crate::config::HooksConfig) -> Self {
        Self {
            cache_dir: config.cache_dir(),
            config_map_dir: config.config_map_dir.clone(),
            max_instances: config.max_instances,
        }
    }
}

/// A built source and what it was built from (so an unchanged hook keeps its warm instances).
struct Built {
    hook: HookSpec,
    max_value_bytes: u64,
    fetch_timeout: std::time::Duration,
    sha256: String,
    source: Weak<HookSource>,
}

/// The hook runtime of a node: one wasmtime `Engine`, the linker with the host's imports, and the artifact
/// cache. It is the node's [`SourceFactory`].
pub struct HookRuntime {
    engine: Engine,
    linker: Linker<HostState>,
    settings: HookSettings,
    metrics: Arc<Metrics>,
    /// Engine compatibility hash (wasmtime version + settings), part of every artifact's cache key.
    compat: String,
    built: Mutex<HashMap<String, Built>>,
}

/// Why a hook could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The engine could not be configured.
    #[error("failed to create the WebAssembly engine: {0}")]
    Engine(String),
    /// The host imports could not be linked.
    #[error("failed to link the host interfaces: {0}")]
    Link(String),
}

impl HookRuntime {
    /// Creates the engine and starts its epoch ticker (a thread that ends when the engine is dropped).
    pub fn new(settings: HookSettings, metrics: Arc<Metrics>) -> Result<Arc<Self>, BuildError> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(settings.max_instances)
            .total_core_instances(settings.max_instances.saturating_mul(4))
            .total_memories(settings.max_instances.saturating_mul(2))
            .total_tables(settings.max_instances.saturating_mul(4))
            .total_stacks(settings.max_instances)
            .max_memory_size(4 << 30);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .consume_fuel(true)
            .epoch_interruption(true)
            .cranelift_opt_level(OptLevel::Speed)
            .max_wasm_stack(1 << 20)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| BuildError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| BuildError::Link(format!("{e:#}")))?;
        Bindings::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| BuildError::Link(format!("{e:#}")))?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = format!("{:016x}", hasher.finish());

        let weak = engine.weak();
        std::thread::Builder::new()
            .name("distcache-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| BuildError::Engine(format!("failed to start the epoch thread: {e}")))?;
        Ok(Arc::new(Self { engine, linker, settings, metrics, compat, built: Mutex::new(HashMap::new()) }))
    }

    /// The engine (shared by every keyspace).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles a component, or loads its precompiled artifact from the cache.
    pub async fn component(&self, module: &ModuleBytes) -> Result<Component, String> {
        let artifact =
            self.settings.cache_dir.join("compiled").join(format!("{}-{}.cwasm", module.sha256, self.compat));
        let checksum = artifact.with_extension("cwasm.sha256");
        if let Some(component) = self.load_artifact(&artifact, &checksum).await {
            return Ok(component);
        }
        let started = Instant::now();
        let engine = self.engine.clone();
        let bytes = module.bytes.clone();
        let origin = module.origin.clone();
        let compiled = tokio::task::spawn_blocking(move || engine.precompile_component(&bytes))
            .await
            .map_err(|e| format!("compiling module {origin} failed: {e}"))?
            .map_err(|e| format!("module {} is not a valid WebAssembly component: {e:#}", module.origin))?;
        tracing::info!(module = %module.origin, sha256 = %module.sha256, ms = started.elapsed().as_millis(), "hook module compiled");
        let sum = sha256_hex(&compiled);
        let stored = async {
            write_atomically(&artifact, &compiled).await?;
            write_atomically(&checksum, sum.as_bytes()).await
        };
        match stored.await {
            Ok(()) => self.prune_artifacts().await,
            Err(e) => {
                tracing::warn!(dir = %self.settings.cache_dir.display(), error = %e, "cannot write the compiled hook to the cache; a restart will compile it again");
            }
        }
        self.deserialize(&compiled)
            .map_err(|e| format!("loading the compiled module {} failed: {e:#}", module.origin))
    }

    /// Removes artifacts this engine can never load (another wasmtime version or settings), and all but the
    /// [`KEPT_ARTIFACTS`] most recently written of its own.
    async fn prune_artifacts(&self) {
        let dir = self.settings.cache_dir.join("compiled");
        let Ok(mut entries) = tokio::fs::read_dir(&dir).await else { return };
        let own_suffix = format!("-{}.cwasm", self.compat);
        let mut own = Vec::new();
        while let Ok(Some(entry)) = entries.next_entry().await {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "cwasm") {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(&own_suffix) {
                let written = entry.metadata().await.and_then(|m| m.modified()).ok();
                own.push((written, path));
            } else {
                remove_artifact(&path).await;
            }
        }
        own.sort_by_key(|(written, _)| std::cmp::Reverse(*written));
        for (_, path) in own.into_iter().skip(KEPT_ARTIFACTS) {
            remove_artifact(&path).await;
        }
    }

    async fn load_artifact(&self, artifact: &Path, checksum: &Path) -> Option<Component> {
        let bytes = tokio::fs::read(artifact).await.ok()?;
        let expected = tokio::fs::read_to_string(checksum).await.ok()?;
        if sha256_hex(&bytes) != expected.trim() {
            tracing::warn!(file = %artifact.display(), "precompiled hook artifact does not match its checksum; compiling again");
            return None;
        }
        match self.deserialize(&bytes) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(file = %artifact.display(), error = %e, "precompiled hook artifact is unusable; compiling again");
                None
            }
        }
    }

    #[expect(unsafe_code, reason = "wasmtime can only load precompiled code through an unsafe call")]
    fn deserialize(&self, bytes: &[u8]) -> wasmtime::Result<Component> {
        // SAFETY: `bytes` is an artifact produced by `Engine::precompile_component` of an engine with the same
        // compatibility hash: either just now in this process, or read back from our private cache directory
        // after its SHA-256 matched the checksum written next to it when it was produced. wasmtime itself
        // checks the artifact's header and engine compatibility before using it.
        unsafe { Component::deserialize(&self.engine, bytes) }
    }

    /// Builds (or returns the unchanged, already built) hook source of a keyspace with a hook.
    pub async fn build_hook(
        &self,
        keyspace: &ValidKeyspace,
        hook: &HookSpec,
        base_dir: &Path,
    ) -> Result<Arc<HookSource>, String> {
        let module =
            module::load(&hook.module, base_dir, &self.settings.config_map_dir, &self.settings.cache_dir)
                .await?;
        {
            let built = self.built.lock();
            if let Some(b) = built.get(&keyspace.name)
                && b.hook == *hook
                && b.sha256 == module.sha256
                && b.max_value_bytes == keyspace.max_value_bytes
                && b.fetch_timeout == keyspace.fetch_timeout
                && let Some(source) = b.source.upgrade()
            {
                return Ok(source);
            }
        }
        let component = self.component(&module).await?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            format!(
                "module {} cannot run here: {e:#} (it must target the distcache:hook/data-source world)",
                module.origin
            )
        })?;
        let pre = DataSourcePre::new(pre)
            .map_err(|e| format!("module {} does not export the data-source world: {e:#}", module.origin))?;
        let limits = HookLimits::new(keyspace, hook);
        let source =
            HookSource::new(keyspace, pre, hook, limits, module.sha256.clone(), Arc::clone(&self.metrics))
                .map_err(|e| format!("failed to build the hook's HTTP client: {e}"))?;
        // One instance now: a module that cannot be instantiated or refuses its config is refused here, and
        // the first miss finds a warm instance.
        source.warm_up().await.map_err(|e| format!("hook of keyspace {:?}: {e}", keyspace.name))?;
        tracing::info!(keyspace = %keyspace.name, module = %module.origin, sha256 = %module.sha256, "hook ready");
        self.built.lock().insert(
            keyspace.name.clone(),
            Built {
                hook: hook.clone(),
                max_value_bytes: keyspace.max_value_bytes,
                fetch_timeout: keyspace.fetch_timeout,
                sha256: module.sha256,
                source: Arc::downgrade(&source),
            },
        );
        Ok(source)
    }
}

/// Compiled modules of this engine kept in the cache directory (older ones are removed).
pub const KEPT_ARTIFACTS: usize = 64;

async fn remove_artifact(path: &Path) {
    let checksum = path.with_extension("cwasm.sha256");
    for file in [path, checksum.as_path()] {
        if let Err(e) = tokio::fs::remove_file(file).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(file = %file.display(), error = %e, "cannot remove an old hook artifact");
        }
    }
}

#[async_trait]
impl SourceFactory for HookRuntime {
    async fn build(
        &self,
        keyspace: &ValidKeyspace,
        base_dir: &Path,
    ) -> Result<Option<Arc<dyn DataSource>>, String> {
        let Some(hook) = &keyspace.spec.hook else {
            self.built.lock().remove(&keyspace.name);
            return Ok(None);
        };
        let source = self
            .build_hook(keyspace, hook, base_dir)
            .await
            .map_err(|e| format!("keyspace {:?}: {e}", keyspace.name))?;
        Ok(Some(source))
    }

    fn watch_paths(&self, keyspace: &ValidKeyspace, base_dir: &Path) -> Vec<PathBuf> {
        keyspace
            .spec
            .hook
            .as_ref()
            .and_then(|h| module::local_file(&h.module, base_dir, &self.settings.config_map_dir))
            .into_iter()
            .collect()
    }
}
