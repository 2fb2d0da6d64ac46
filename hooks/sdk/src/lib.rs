//! Guest SDK for DistCache data-source hooks.
//!
//! A hook is a WebAssembly component (WASI 0.2, target `wasm32-wasip2`) that loads the value of a key the
//! cache does not hold yet. This crate wraps the bindings of the `distcache:hook/data-source` world
//! (`proto/wit/hook.wit`) in plain Rust types, so a hook is one trait implementation and one macro call.
//!
//! # Writing a hook
//!
//! Create a `cdylib` crate that depends on `distcache-hook`, implement [`Hook`] and export it with
//! [`export_hook!`]:
//!
//! ```ignore
//! use distcache_hook::{Config, Entry, FetchError, Hook, http};
//!
//! struct Users {
//!     base: String,
//! }
//!
//! impl Hook for Users {
//!     // Called once per instance with the keyspace's `hook.config`; an error refuses the hook.
//!     fn init(config: &Config) -> Result<Self, String> {
//!         Ok(Users { base: config.require("baseUrl")?.to_owned() })
//!     }
//!
//!     // Loads one key. `fetch_many` has a default that calls this once per key, in order.
//!     fn fetch(&self, key: &str) -> Result<Entry, FetchError> {
//!         let response = http::get(&format!("{}/{key}", self.base))?; // HttpError -> FetchError
//!         match response.status {
//!             200 => Ok(Entry::new(response.body)),
//!             404 => Err(FetchError::not_found()),
//!             status => Err(FetchError::unavailable(format!("origin answered {status}"))),
//!         }
//!     }
//! }
//!
//! distcache_hook::export_hook!(Users);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`; the `.wasm` file in
//! `target/wasm32-wasip2/release/` is the component to configure in a keyspace's `hook.module`.
//!
//! # Runtime model
//!
//! * `init` runs once per instance, before any fetch. The value it returns is kept in the instance (wasm is
//!   single-threaded, so it lives in a thread-local) and every later `fetch`/`fetch_many` borrows it.
//!   A fetch before a successful `init` answers [`FetchError::Internal`]`("hook not initialised")`.
//! * Instances are pooled and reused, so state kept in the hook value survives between calls, but an
//!   instance can be discarded at any time (after a trap, a timeout, or simply by the pool) and a fresh one
//!   is initialised with the same config.
//! * The only egress is [`http`], restricted by the host to the keyspace's `allowedHosts`. [`log`] writes
//!   lines to the node's log.
//! * A panic aborts the call: the instance traps, is discarded, and the reader gets INTERNAL.

// The bindings (and the export macro they generate) refer to this crate by name, also from inside it.
extern crate self as distcache_hook;

mod config;
pub mod http;
pub mod log;
mod types;

pub use config::Config;
/// The duration grammar of DistCache (`500ms`, `30s`, `5m`, `1h30m`, `7d`), the same as the keyspace's `ttl`:
/// [`Config::get_duration`] reads a config value with it.
pub use distcache_duration as duration;
pub use types::{Entry, FetchError};

/// Generated bindings of the `data-source` world. Not part of the public API: use the types re-exported at
/// the crate root. `unsafe` is allowed here only, for the canonical-ABI glue wit-bindgen generates.
#[doc(hidden)]
#[allow(unsafe_code, missing_docs, rust_2018_idioms, clippy::all, clippy::pedantic)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "data-source",
        path: "../../proto/wit",
        pub_export_macro: true,
        export_macro_name: "__export_data_source",
        default_bindings_module: "distcache_hook::bindings",
        runtime_path: "distcache_hook::__private::wit_bindgen::rt",
    });
}

/// A data source for one keyspace: what a hook implements. Export the implementation with [`export_hook!`].
pub trait Hook: Sized + 'static {
    /// Builds the hook from the keyspace's `hook.config`. Called once per instance, before any fetch.
    /// An error refuses the hook (the keyspaces change that introduced it is refused); say what is wrong
    /// with the config, naming the key.
    fn init(config: &Config) -> Result<Self, String>;

    /// Loads one key.
    fn fetch(&self, key: &str) -> Result<Entry, FetchError>;

    /// Loads many keys (the misses of one GetMany): one result per key, in the same order.
    ///
    /// The default calls [`Hook::fetch`] for each key in order. Override it when the backend has a batch
    /// API. Should an override return the wrong number of results, the SDK truncates the extra ones and
    /// answers the missing keys with [`FetchError::Internal`].
    fn fetch_many(&self, keys: &[String]) -> Vec<Result<Entry, FetchError>> {
        keys.iter().map(|key| self.fetch(key)).collect()
    }
}

/// Exports a [`Hook`] implementation as the component's `init`, `fetch` and `fetch-many`.
///
/// Call it once, at the root of a `cdylib` crate: `distcache_hook::export_hook!(MyHook);`
#[macro_export]
macro_rules! export_hook {
    ($hook:ty) => {
        // The generated exports are `#[unsafe(export_name)]` functions.
        #[allow(unsafe_code)]
        const _: () = {
            struct __DistcacheHookExport;

            impl $crate::bindings::Guest for __DistcacheHookExport {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    $crate::__private::init::<$hook>(config)
                }

                fn fetch(
                    key: ::std::string::String,
                ) -> ::core::result::Result<$crate::bindings::Entry, $crate::bindings::FetchError> {
                    $crate::__private::fetch::<$hook>(&key)
                }

                fn fetch_many(
                    keys: ::std::vec::Vec<::std::string::String>,
                ) -> ::std::vec::Vec<
                    ::core::result::Result<$crate::bindings::Entry, $crate::bindings::FetchError>,
                > {
                    $crate::__private::fetch_many::<$hook>(&keys)
                }
            }

    $crate::bindings::__export_data_source!(__DistcacheHookExport with_types_in $crate::bindings);
        };
    };
}

/// Support for [`export_hook!`]; not part of the public API.
#[doc(hidden)]
pub mod __private {
    use std::any::Any;
    use std::cell::RefCell;

    pub use wit_bindgen;

    use crate::bindings::{Entry as WitEntry, FetchError as WitFetchError};
    use crate::{Config, FetchError, Hook};

    thread_local! {
        /// The instance's hook value, set by `init`. Wasm is single-threaded: one per instance.
        static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }

    const NOT_INITIALISED: &str = "hook not initialised";

    pub fn init<H: Hook>(config: Vec<(String, String)>) -> Result<(), String> {
        let config = Config::new(config);
        // A refused config leaves no instance behind: later fetches answer "not initialised".
        let hook = H::init(&config).map(|hook| Box::new(hook) as Box<dyn Any>);
        let (result, new) = match hook {
            Ok(hook) => (Ok(()), Some(hook)),
            Err(message) => (Err(message), None),
        };
        let previous = INSTANCE.with(|cell| cell.replace(new));
        drop(previous);
        result
    }

    /// Runs `f` with the initialised hook, or `None` before a successful `init`.
    fn with_hook<H: Hook, R>(f: impl FnOnce(&H) -> R) -> Option<R> {
        INSTANCE.with(|cell| {
            let instance = cell.try_borrow().ok()?;
            let hook = instance.as_ref()?.downcast_ref::<H>()?;
            Some(f(hook))
        })
    }

    pub fn fetch<H: Hook>(key: &str) -> Result<WitEntry, WitFetchError> {
        match with_hook(|hook: &H| hook.fetch(key)) {
            Some(Ok(entry)) => Ok(entry.into()),
            Some(Err(error)) => Err(error.into()),
            None => Err(WitFetchError::Internal(NOT_INITIALISED.to_owned())),
        }
    }

    pub fn fetch_many<H: Hook>(keys: &[String]) -> Vec<Result<WitEntry, WitFetchError>> {
        let Some(results) = with_hook(|hook: &H| hook.fetch_many(keys)) else {
            return keys.iter().map(|_| Err(WitFetchError::Internal(NOT_INITIALISED.to_owned()))).collect();
        };
        let returned = results.len();
        let mut out: Vec<Result<WitEntry, WitFetchError>> = results
            .into_iter()
            .take(keys.len())
            .map(|result| result.map(Into::into).map_err(Into::into))
            .collect();
        while out.len() < keys.len() {
            out.push(Err(FetchError::Internal(format!(
                "hook returned {returned} results for {} keys",
                keys.len()
            ))
            .into()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bindings::FetchError as WitFetchError;

    struct Counting {
        short: bool,
    }

    impl Hook for Counting {
        fn init(config: &Config) -> Result<Self, String> {
            Ok(Counting { short: config.get("short").is_some() })
        }

        fn fetch(&self, key: &str) -> Result<Entry, FetchError> {
            Ok(Entry::new(key).with_ttl(Duration::from_secs(1)))
        }

        fn fetch_many(&self, keys: &[String]) -> Vec<Result<Entry, FetchError>> {
            let take = if self.short { 1 } else { keys.len() };
            keys.iter().take(take).map(|key| self.fetch(key)).collect()
        }
    }

    #[test]
    fn lifecycle() {
        let keys = vec!["a".to_owned(), "b".to_owned()];
        assert!(
            matches!(__private::fetch::<Counting>("a"), Err(WitFetchError::Internal(m)) if m == "hook not initialised")
        );
        assert_eq!(__private::init::<Counting>(Vec::new()), Ok(()));
        let entry = __private::fetch::<Counting>("a").map_err(|_| ()).map(|e| (e.value, e.ttl_ms));
        assert_eq!(entry, Ok((b"a".to_vec(), Some(1000))));
        assert_eq!(__private::fetch_many::<Counting>(&keys).iter().filter(|r| r.is_ok()).count(), 2);
        assert_eq!(__private::init::<Counting>(vec![("short".to_owned(), String::new())]), Ok(()));
        let results = __private::fetch_many::<Counting>(&keys);
        assert_eq!(results.len(), 2);
        assert!(matches!(&results[1], Err(WitFetchError::Internal(m)) if m.contains("1 results for 2 keys")));
    }

    #[test]
    fn display() {
        assert_eq!(
            FetchError::not_found_with_ttl(Duration::from_secs(2)).to_string(),
            "not found (negative ttl 2000ms)"
        );
        assert_eq!(FetchError::internal("boom").to_string(), "internal error: boom");
    }
}
