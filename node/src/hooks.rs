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

pub use instance::{HookSource, TrapReason};
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
