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
    EPOCH_TICK, HookError,
    bindings::{DataSource as Bindings, DataSourcePre},
    instance::{HookLimits, HookSource, HostState},
    module::{self, ModuleBytes, sha256_hex, write_atomically},
};
use crate::{
    metrics::Metrics,
    source::{BuildSourceError, DataSource, SourceFactory},
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

/// Why the hook runtime could not be created (a keyspace's hook fails with a [`HookError`]).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The engine could not be configured.
    #[error("failed to create the WebAssembly engine")]
    Engine(#[source] wasmtime::Error),
    /// The host imports could not be linked.
    #[error("failed to link the host interfaces")]
    Link(#[source] wasmtime::Error),
    /// The thread that advances the epoch could not be started.
    #[error("failed to start the epoch thread")]
    EpochThread(#[source] std::io::Error),
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
        let engine = Engine::new(&config).map_err(BuildError::Engine)?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(BuildError::Link)?;
        Bindings::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(BuildError::Link)?;
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
            .map_err(BuildError::EpochThread)?;
        Ok(Arc::new(Self { engine, linker, settings, metrics, compat, built: Mutex::new(HashMap::new()) }))
    }

    /// The engine (shared by every keyspace).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles a component, or loads its precompiled artifact from the cache.
    pub async fn component(&self, module: &ModuleBytes) -> Result<Component, HookError> {
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
            .map_err(|source| HookError::CompileTask { module: origin, source })?
            .map_err(|source| HookError::CompileComponent { module: module.origin.clone(), source })?;
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
            .map_err(|source| HookError::LoadCompiled { module: module.origin.clone(), source })
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
    ) -> Result<Arc<HookSource>, HookError> {
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
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|source| HookError::LinkImports { module: module.origin.clone(), source })?;
        let pre = DataSourcePre::new(pre)
            .map_err(|source| HookError::BindExports { module: module.origin.clone(), source })?;
        let limits = HookLimits::new(keyspace, hook);
        let source =
            HookSource::new(keyspace, pre, hook, limits, module.sha256.clone(), Arc::clone(&self.metrics))
                .map_err(HookError::BuildHttpClient)?;
        // One instance now: a module that cannot be instantiated or refuses its config is refused here, and
        // the first miss finds a warm instance.
        source
            .warm_up()
            .await
            .map_err(|source| HookError::InitHook { module: module.origin.clone(), source })?;
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
    ) -> Result<Option<Arc<dyn DataSource>>, BuildSourceError> {
        let Some(hook) = &keyspace.spec.hook else {
            self.built.lock().remove(&keyspace.name);
            return Ok(None);
        };
        Ok(Some(self.build_hook(keyspace, hook, base_dir).await?))
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

#[cfg(test)]
mod tests {
    use distcache_api::{KeyspacesFile, validate_keyspaces};

    use super::*;
    use crate::{hooks::ModuleError, source::error_chain};

    fn runtime(cache: &Path) -> Arc<HookRuntime> {
        let settings = HookSettings {
            cache_dir: cache.join("cache"),
            config_map_dir: cache.join("mounts"),
            max_instances: 2,
        };
        HookRuntime::new(settings, Arc::new(Metrics::new())).expect("the engine starts")
    }

    fn keyspace(module: &str) -> ValidKeyspace {
        let yaml = format!("keyspaces:\n  - {{ name: ks, maxBytes: 1Mi, hook: {{ module: {module} }} }}\n");
        let file: KeyspacesFile = serde_yaml::from_str(&yaml).expect("fixture parses");
        validate_keyspaces(&file.keyspaces).expect("fixture is valid").remove(0)
    }

    async fn build_error(runtime: &HookRuntime, keyspace: &ValidKeyspace, base: &Path) -> BuildSourceError {
        match runtime.build(keyspace, base).await {
            Ok(_) => panic!("the hook of {keyspace:?} must fail to build"),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn a_garbage_module_is_a_permanent_compile_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = runtime(dir.path());
        std::fs::write(dir.path().join("garbage.wasm"), b"\0asm but not really a component").expect("write");
        let error = build_error(&runtime, &keyspace("{ path: garbage.wasm }"), dir.path()).await;
        assert!(
            matches!(&error, BuildSourceError::BuildHook(HookError::CompileComponent { module, .. }) if module.ends_with("garbage.wasm")),
            "{error:?}"
        );
        assert!(!error.is_transient());
        let shown = error_chain(&error);
        assert!(
            shown.starts_with("hook module ") && shown.contains("is not a valid WebAssembly component: "),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn a_module_not_mounted_yet_is_transient() {
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = runtime(dir.path());
        let keyspace = keyspace("{ configMap: { name: late, key: hook.wasm } }");
        let error = build_error(&runtime, &keyspace, dir.path()).await;
        assert!(
            matches!(
                &error,
                BuildSourceError::BuildHook(HookError::LoadModule(ModuleError::ReadModule { .. }))
            ),
            "{error:?}"
        );
        assert!(error.is_transient());
        assert_eq!(
            runtime.watch_paths(&keyspace, dir.path()),
            vec![dir.path().join("mounts/late/hook.wasm")]
        );
        let message = error_chain(&error);
        assert!(message.starts_with("failed to read hook module ConfigMap late/hook.wasm"), "{message}");
    }

    #[tokio::test]
    async fn a_checksum_mismatch_is_permanent() {
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = runtime(dir.path());
        std::fs::write(dir.path().join("hook.wasm"), b"bytes").expect("write");
        let keyspace = keyspace(&format!("{{ path: hook.wasm, sha256: \"{}\" }}", "ab".repeat(32)));
        let error = build_error(&runtime, &keyspace, dir.path()).await;
        assert!(
            matches!(
                &error,
                BuildSourceError::BuildHook(HookError::LoadModule(ModuleError::ChecksumMismatch { .. }))
            ),
            "{error:?}"
        );
        assert!(!error.is_transient());
    }
}
