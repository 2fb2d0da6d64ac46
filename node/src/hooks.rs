//! The WebAssembly hook runtime: runs a keyspace's data-source hook (a component of the WIT world
//! `distcache:hook/data-source`, `proto/wit/hook.wit`) on a miss.
//!
//! Design, in the order a call meets it:
//! - **One `Engine` per process** ([`HookRuntime`]), with the component model, fuel, epoch interruption and the
//!   pooling instance allocator. A background thread advances the epoch every [`EPOCH_TICK`].
//! - **Modules** ([`module`]) come from a path, a mounted ConfigMap key or a URL pinned by sha256. Each is
//!   compiled once and kept as a precompiled artifact in the cache directory, keyed by the module's sha256 and
//!   the engine's compatibility hash (wasmtime version + settings); a restart deserializes instead of compiling.
//! - **Instances** ([`instance`]) are created from an `InstancePre` (imports resolved once), initialised with
//!   the keyspace's `hook.config`, and kept in a bounded per-keyspace pool. Each call resets fuel, arms a
//!   wall-clock deadline and runs under the keyspace's memory limit. A call that traps (fuel, deadline, memory,
//!   panic) discards its instance and becomes a typed [`FetchError`](crate::source::FetchError); the node and
//!   the other keyspaces are untouched.
//! - **Egress** ([`http`]) is the host's `http` interface: only to the keyspace's `allowedHosts`, with a cap on
//!   concurrent requests and on response size. WASI is linked with no files, no sockets and no environment;
//!   the guest's stdout and stderr go to the node's log ([`output`]), rate-limited per keyspace.
//! - Calls are async: a guest waiting on its backend waits on a future, and a guest burning CPU yields to the
//!   scheduler at every epoch tick, so no hook holds a runtime worker.

mod bindings;
pub mod http;
pub mod instance;
pub mod module;
pub mod output;
pub mod runtime;

use std::time::Duration;

pub use instance::{HookSource, InitError, TrapReason};
pub use module::ModuleError;
pub use runtime::{HookRuntime, HookSettings};

/// How often the epoch advances: the resolution of hook deadlines and the longest a guest runs without
/// yielding to the async scheduler.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Default fuel per call.
pub const DEFAULT_FUEL: u64 = 100_000_000;
/// Default linear-memory limit of one instance.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// Default number of instances (and concurrent calls) per keyspace.
pub const DEFAULT_POOL_SIZE: u32 = 16;
/// Default number of concurrent outbound HTTP requests per keyspace.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: u32 = 32;

/// Why a keyspace's hook could not be built. [`HookError::is_transient`] tells a failure that may heal (a
/// module file not mounted yet, a download that failed) from one that repeats until the keyspace or the module
/// changes (a wrong checksum, a file that is not a component, an `init` that refuses its config).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The module could not be read, downloaded or verified.
    #[error(transparent)]
    LoadModule(#[from] ModuleError),
    /// The module is not a WebAssembly component this engine can compile.
    #[error("hook module {module} is not a valid WebAssembly component")]
    CompileComponent {
        /// Which module.
        module: String,
        /// wasmtime's reason.
        #[source]
        source: wasmtime::Error,
    },
    /// The compiler's task did not finish (it panicked, or the runtime is shutting down).
    #[error("compiling hook module {module} did not finish")]
    CompileTask {
        /// Which module.
        module: String,
        /// Cause.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The freshly compiled module could not be loaded.
    #[error("failed to load the compiled hook module {module}")]
    LoadCompiled {
        /// Which module.
        module: String,
        /// Cause.
        #[source]
        source: wasmtime::Error,
    },
    /// The component's imports are not what the host provides.
    #[error("hook module {module} cannot run here: it must target the distcache:hook/data-source world")]
    LinkImports {
        /// Which module.
        module: String,
        /// The import that does not match.
        #[source]
        source: wasmtime::Error,
    },
    /// The component does not export the data-source world.
    #[error("hook module {module} does not export the distcache:hook/data-source world")]
    BindExports {
        /// Which module.
        module: String,
        /// The missing or mistyped export.
        #[source]
        source: wasmtime::Error,
    },
    /// The hook's HTTP client could not be built.
    #[error("failed to build the HTTP client of the hook")]
    BuildHttpClient(#[source] reqwest::Error),
    /// The first instance could not be made ready (instantiation, or `init` refusing its config).
    #[error("failed to start hook module {module}")]
    InitHook {
        /// Which module.
        module: String,
        /// Cause.
        #[source]
        source: InitError,
    },
}

impl HookError {
    /// Whether building the hook again, with the same keyspace and module, may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::LoadModule(e) => e.is_transient(),
            Self::CompileTask { source, .. } => source.is_cancelled(),
            Self::InitHook { source, .. } => source.is_transient(),
            Self::CompileComponent { .. }
            | Self::LoadCompiled { .. }
            | Self::LinkImports { .. }
            | Self::BindExports { .. }
            | Self::BuildHttpClient(_) => false,
        }
    }
}
