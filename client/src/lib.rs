//! Rust client for `DistCache`, a distributed read-through cache, and the `distcache` CLI built on it.
//!
//! [`Client`] talks to the `distcache.v1.Cache` gRPC service of any node; the node routes each key to its owner,
//! which answers from memory or loads the value from the keyspace's data source. Results are typed: a key with
//! no value is `Ok(None)`, other failures are an [`Error`] variant per documented status code, and batch calls
//! return one result per key. [`bench`](mod@bench) is the load generator behind `distcache bench`.
//!
//! `https://` endpoints use TLS: the CA bundle is required ([`ClientBuilder::tls_ca_file`]), a client certificate
//! optional, and a connection that fails because of TLS is an [`Error::Tls`] that says what failed (unknown CA,
//! name mismatch, client certificate required, TLS on one side only).

pub mod bench;
mod client;
mod error;
#[cfg(test)]
mod testing;
mod tls;

pub use client::{
    Client, ClientBuilder, DEFAULT_CONNECT_TIMEOUT, DEFAULT_ENDPOINT, HotKey, KeyspaceInfo, KeyspaceStats,
    Member, MemberEvent, MemberEvents, Stats, Value, WarmUp,
};
pub use error::Error;
