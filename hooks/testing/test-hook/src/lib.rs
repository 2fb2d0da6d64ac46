//! A deliberately misbehaving (and a few useful) hook for DistCache's hook runtime tests and benchmarks.
//!
//! The behaviour is chosen by the init config key `mode`:
//!
//! | `mode` | behaviour of `fetch` | other config |
//! |---|---|---|
//! | `echo` | value = `prefix` + key; `fetch-many` answers every key in one call. As cheap as possible: used to measure the per-call overhead. | `prefix` (default ""), `ttlMs` (entry TTL in ms; default: the keyspace's `ttl`) |
//! | `not-found` | `not-found` | `negativeTtlMs` (default: the keyspace's `negativeTtl`) |
//! | `loop` | spins forever (until fuel or the timeout stops it) | |
//! | `memory` | allocates and touches memory in 1 MiB chunks, keeping all of it, forever (until the memory limit traps) | |
//! | `panic` | panics with "test hook panicked on purpose" (the instance traps) | |
//! | `oversized` | a value of `bytes` bytes of `x` | `bytes` (default 16777216) |
//! | `egress` | GET `url` with `{key}` replaced by the key; 2xx -> value = body, other status -> `unavailable("origin answered N")`, an http error -> converted by the SDK (`denied` -> `internal` naming "denied" and the host's reason, `timeout` -> `timeout`, connection -> `unavailable`) | `url` (required), `hostHeader` (sent as a `host` header, which the host must deny) |
//! | `fail-init` | `init` fails with "test hook refused its config" | |
//!
//! A missing or unknown `mode` fails `init` with a message listing the valid modes.

use std::hint::black_box;
use std::time::Duration;

use distcache_hook::{Config, Entry, FetchError, Hook, http};

const MODES: &str = "echo, not-found, loop, memory, panic, oversized, egress, fail-init";

enum TestHook {
    Echo { prefix: Vec<u8>, ttl: Option<Duration> },
    NotFound { ttl: Option<Duration> },
    Loop,
    Memory,
    Panic,
    Oversized { bytes: usize },
    Egress { url: String, host_header: Option<String> },
}

impl Hook for TestHook {
    fn init(config: &Config) -> Result<Self, String> {
        let Some(mode) = config.get("mode") else {
            return Err(format!("hook config is missing the required key \"mode\" (one of: {MODES})"));
        };
        Ok(match mode {
            "echo" => TestHook::Echo {
                prefix: config.get("prefix").unwrap_or_default().as_bytes().to_vec(),
                ttl: config.get_parsed("ttlMs")?.map(Duration::from_millis),
            },
            "not-found" => {
                TestHook::NotFound { ttl: config.get_parsed("negativeTtlMs")?.map(Duration::from_millis) }
            }
            "loop" => TestHook::Loop,
            "memory" => TestHook::Memory,
            "panic" => TestHook::Panic,
            "oversized" => {
                TestHook::Oversized { bytes: config.get_parsed("bytes")?.unwrap_or(16 * 1024 * 1024) }
            }
            "egress" => TestHook::Egress {
                url: config.require("url")?.to_owned(),
                host_header: config.get("hostHeader").map(str::to_owned),
            },
            "fail-init" => return Err("test hook refused its config".to_owned()),
            other => return Err(format!("unknown mode \"{other}\" (valid modes: {MODES})")),
        })
    }

    fn fetch(&self, key: &str) -> Result<Entry, FetchError> {
        match self {
            TestHook::Echo { prefix, ttl } => {
                let mut value = Vec::with_capacity(prefix.len() + key.len());
                value.extend_from_slice(prefix);
                value.extend_from_slice(key.as_bytes());
                Ok(Entry { value, ttl: *ttl })
            }
            TestHook::NotFound { ttl } => Err(FetchError::NotFound(*ttl)),
            TestHook::Loop => spin(),
            TestHook::Memory => grow(),
            TestHook::Panic => panic!("test hook panicked on purpose"),
            TestHook::Oversized { bytes } => Ok(Entry::new(vec![b'x'; *bytes])),
            TestHook::Egress { url, host_header } => egress(url, host_header.as_deref(), key),
        }
    }
}

/// Burns fuel (or wall-clock time) until the host stops the call.
fn spin() -> ! {
    let mut counter = 0u64;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

/// Allocates 1 MiB chunks and writes to every page of each, keeping them all, until the host's memory limit
/// stops the call (a failed allocation aborts, which traps too).
fn grow() -> ! {
    const CHUNK: usize = 1024 * 1024;
    const PAGE: usize = 4096;
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; CHUNK];
        for offset in (0..CHUNK).step_by(PAGE) {
            chunk[offset] = 1;
        }
        chunks.push(black_box(chunk));
        black_box(&chunks);
    }
}

fn egress(url: &str, host_header: Option<&str>, key: &str) -> Result<Entry, FetchError> {
    let mut request = http::Request::get(url.replace("{key}", key));
    if let Some(host) = host_header {
        request = request.header("host", host);
    }
    let response = request.send()?;
    if response.is_success() {
        Ok(Entry::new(response.body))
    } else {
        Err(FetchError::unavailable(format!("origin answered {}", response.status)))
    }
}

distcache_hook::export_hook!(TestHook);
