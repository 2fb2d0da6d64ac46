//! The DistCache node: a sharded, read-through cache server.
//!
//! Layout: the domain — [`ring`] (who owns a key), [`store`] (the memory of a keyspace), [`engine`] (routing,
//! single flight, read-through, writes), [`keyspace`] (loading and reloading keyspaces) — holds no transport or
//! Kubernetes types. Around it: [`peer`] (node-to-node calls, gRPC), [`discovery`] (membership sources),
//! [`server`] (the gRPC services), [`admin`] (HTTP), [`source`] (the data-source seam), [`hooks`] (the
//! WebAssembly runtime behind it), and [`node`] which assembles and runs them.
//!
//! Running a node in-process (what `distcache-node --config FILE` does, minus signal handling):
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use distcache_node::{NodeConfig, NodeOptions};
//!
//! let config = NodeConfig::load(Some("examples/local-cluster/node-1.yaml".as_ref()), std::env::vars())?;
//! let node = distcache_node::start(NodeOptions::new(config)).await?;
//! println!("serving gRPC on {} as {}", node.grpc_addr, node.name);
//! node.stop().await;
//! # Ok(())
//! # }
//! ```

pub mod admin;
pub mod batch;
pub mod config;
pub mod discovery;
pub mod engine;
pub mod error;
pub mod hlc;
pub mod hooks;
pub mod hotkeys;
pub mod keyspace;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod protect;
pub mod resp;
pub mod ring;
pub mod server;
pub mod singleflight;
pub mod source;
pub mod store;
pub mod table;
pub mod telemetry;

pub use config::NodeConfig;
pub use node::{NodeOptions, RunningNode, start};
