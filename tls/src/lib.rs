//! TLS for DistCache: certificate material loaded from PEM files and checked, rustls configurations for the
//! client, admin and peer ports, reload when the files change, peer identities, and a TLS connector for tonic
//! clients (the node's peer client, the client library and CLI).
//!
//! One crypto provider (ring) everywhere, chosen explicitly: a process that links another provider too still
//! builds every config the same way.

pub mod accept;
pub mod configs;
pub mod connect;
pub mod material;
#[cfg(feature = "pki")]
pub mod pki;
pub mod reload;
#[cfg(test)]
mod tests;

pub use accept::{TlsConn, TlsConnectInfo, accept_loop, incoming};
pub use configs::{ClientAuth, Configs, client_config};
pub use connect::{Connector, explain, find_rustls_error};
pub use material::{CertIdentity, Material, MaterialError, TlsFiles, provider};
pub use reload::{LoadError, Reload, ReloadReport, Tls, TlsSettings};
pub use rustls;
pub use rustls_pki_types;
