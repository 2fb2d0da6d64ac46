//! What a WebAssembly hook adds to a miss: one `fetch` through the hook runtime with a pooled (warm) instance,
//! and with a fresh instance per call, against the same work done by a native data source.
//!
//! `cargo bench -p distcache-node --bench hooks` (run by `make bench` after `make hooks`). The hook is the test
//! hook in `echo` mode (value = prefix + key, no I/O), so the figures are the runtime's own cost: taking an
//! instance, resetting fuel and the deadline, lowering the key, running the guest, lifting the entry.
//! `HOOK_WASM` overrides the module path; `BENCH_CALLS` the number of pooled calls (default 200000);
//! `BENCH_JSON` names a file for the results.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use distcache_node::{
    hooks::{HookRuntime, HookSettings, HookSource},
    keyspace::parse_keyspaces,
    metrics::Metrics,
    source::{DataSource, FetchError, Fetched, error_chain},
};

/// The same answer as the echo hook, computed natively.
struct NativeEcho(Vec<u8>);

#[async_trait]
impl DataSource for NativeEcho {
    async fn fetch(&self, key: &str) -> Result<Fetched, FetchError> {
        let mut value = Vec::with_capacity(self.0.len() + key.len());
        value.extend_from_slice(&self.0);
        value.extend_from_slice(key.as_bytes());
        Ok(Fetched { value: Bytes::from(value), ttl: None })
    }
}

fn module_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HOOK_WASM") {
        return p.into();
    }
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from(".."), Path::to_owned);
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    target.join("hooks/wasm32-wasip2/release/distcache_test_hook.wasm")
}

/// Mean time per call over `calls` sequential calls (after `calls / 10` warm-up calls).
async fn per_call(source: &dyn DataSource, keys: &[String], calls: usize, before: impl Fn()) -> Duration {
    for key in keys.iter().cycle().take(calls / 10) {
        before();
        source.fetch(key).await.ok();
    }
    let mut spent = Duration::ZERO;
    for key in keys.iter().cycle().take(calls) {
        before();
        let started = Instant::now();
        let fetched = source.fetch(key).await;
        spent += started.elapsed();
        assert!(fetched.is_ok(), "fetch failed: {fetched:?}");
    }
    spent / u32::try_from(calls).unwrap_or(u32::MAX)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn run() -> Result<(), String> {
    let module = module_path();
    if !module.exists() {
        return Err(format!("{} not found: run `make hooks` first (or set HOOK_WASM)", module.display()));
    }
    let calls: usize = std::env::var("BENCH_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let prefix = "x".repeat(100);
    let yaml = format!(
        "keyspaces:\n  - name: bench\n    maxBytes: 64Mi\n    hook:\n      module: {{ path: \"{}\" }}\n      \
         config: {{ mode: echo, prefix: \"{prefix}\" }}\n      limits: {{ poolSize: 1 }}\n",
        module.display()
    );
    let specs = parse_keyspaces(Path::new("bench.yaml"), &yaml).map_err(|e| e.to_string())?;
    let cache = std::env::temp_dir().join(format!("distcache-bench-hooks-{}", std::process::id()));
    let settings =
        HookSettings { cache_dir: cache.clone(), config_map_dir: cache.clone(), max_instances: 64 };
    let runtime = HookRuntime::new(settings, Arc::new(Metrics::new())).map_err(|e| e.to_string())?;
    let hook: Arc<HookSource> = runtime
        .build_hook(&specs[0], specs[0].spec.hook.as_ref().ok_or("no hook")?, Path::new("."))
        .await
        .map_err(|e| error_chain(&e))?;
    let native = NativeEcho(prefix.into_bytes());
    let keys: Vec<String> = (0..1024).map(|i| format!("user:{i:06}")).collect();

    let native_t = per_call(&native, &keys, calls, || {}).await;
    let pooled_t = per_call(hook.as_ref(), &keys, calls, || {}).await;
    let fresh_calls = (calls / 40).max(1000);
    let fresh_t = per_call(hook.as_ref(), &keys, fresh_calls, || hook.drain_pool()).await;
    let _ = std::fs::remove_dir_all(&cache);

    let added_pooled = micros(pooled_t) - micros(native_t);
    let added_fresh = micros(fresh_t) - micros(native_t);
    println!("hook cost per fetch (echo hook, 100-byte values, one call at a time)");
    println!("  native data source          {:>8.2} µs/call", micros(native_t));
    println!(
        "  hook, pooled instance       {:>8.2} µs/call  (+{added_pooled:.2} µs over native; goal ≤ 2)",
        micros(pooled_t)
    );
    println!(
        "  hook, fresh instance        {:>8.2} µs/call  (+{added_fresh:.2} µs over native; goal ≤ 35)",
        micros(fresh_t)
    );
    if let Some(path) = std::env::var_os("BENCH_JSON") {
        let json = serde_json::json!({
            "calls": calls,
            "freshCalls": fresh_calls,
            "nativeUs": micros(native_t),
            "pooledUs": micros(pooled_t),
            "freshUs": micros(fresh_t),
            "addedPooledUs": added_pooled,
            "addedFreshUs": added_fresh,
        });
        std::fs::write(&path, json.to_string()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn main() {
    // `cargo bench` passes `--bench`; this harness has no options of its own.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run()) {
        eprintln!("hooks bench failed: {e}");
        std::process::exit(1);
    }
}
