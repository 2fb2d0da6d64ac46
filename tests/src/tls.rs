//! TLS helpers for the tests: a directory laid out as a Kubernetes Secret volume (files behind a `..data`
//! symlink, replaced atomically), TLS gRPC channels as applications and peers open them, and what a node
//! presents on a fresh handshake.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use distcache_tls::{
    Connector, TlsFiles,
    pki::Leaf,
    rustls::{self, ClientConfig, RootCertStore, pki_types::ServerName, sign::CertifiedKey},
    rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tonic::transport::{Channel, Endpoint};

/// A directory that looks like a mounted `kubernetes.io/tls` Secret: `tls.crt`, `tls.key` and `ca.crt` are
/// symlinks into `..data`, which points at a timestamped directory; an update writes a new directory and
/// renames a new `..data` link over the old one, so all three files change in one step (as the kubelet does).
pub struct SecretDir {
    dir: PathBuf,
    generation: AtomicU32,
}

impl SecretDir {
    /// Creates the volume under `dir` with the first content.
    pub fn create(dir: &Path, leaf: &Leaf, ca_pem: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let s = Self { dir: dir.to_owned(), generation: AtomicU32::new(0) };
        s.update(leaf, ca_pem)?;
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name))?;
        }
        Ok(s)
    }

    /// The node's `tls` files.
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            cert_file: self.dir.join("tls.crt"),
            key_file: self.dir.join("tls.key"),
            ca_file: self.dir.join("ca.crt"),
        }
    }

    /// Replaces the three files at once.
    pub fn update(&self, leaf: &Leaf, ca_pem: &str) -> anyhow::Result<()> {
        self.update_raw(&leaf.cert_pem, &leaf.key_pem, ca_pem)
    }

    /// Replaces the three files at once with any content (bad material included).
    pub fn update_raw(&self, cert: &str, key: &str, ca: &str) -> anyhow::Result<()> {
        let n = self.generation.fetch_add(1, Ordering::Relaxed);
        let data = format!("..2026_12_03_{n:04}");
        let target = self.dir.join(&data);
        std::fs::create_dir(&target)?;
        std::fs::write(target.join("tls.crt"), cert)?;
        std::fs::write(target.join("tls.key"), key)?;
        std::fs::write(target.join("ca.crt"), ca)?;
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&data, &tmp)?;
        std::fs::rename(&tmp, self.dir.join("..data"))?;
        Ok(())
    }
}

/// Roots from PEM text.
pub fn roots(ca_pem: &str) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    Ok(roots)
}

/// A certificate and key as rustls signs with them.
pub fn certified(leaf: &Leaf) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &distcache_tls::provider())?))
}

/// An application's TLS config: trusts `ca_pem`, presents `client` when given.
pub fn app_config(ca_pem: &str, client: Option<&Leaf>) -> anyhow::Result<Arc<ClientConfig>> {
    let identity = client.map(certified).transpose()?;
    Ok(Arc::new(distcache_tls::client_config(roots(ca_pem)?, identity)?))
}

/// A gRPC channel over TLS to `addr`, checking the server's certificate against `server_name`. Connects
/// eagerly, so a refused handshake is an error here.
pub async fn channel(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    server_name: &str,
) -> anyhow::Result<Channel> {
    let name = ServerName::try_from(server_name.to_owned())?;
    let connector = Connector::new(Arc::new(move || Arc::clone(&config)), Some(name), Duration::from_secs(2));
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await?)
}

/// The serial number of the certificate `addr` presents on a new handshake (any client certificate accepted
/// or not: the handshake's server half is what is read).
pub async fn served_serial(addr: SocketAddr, ca_pem: &str, client: Option<&Leaf>) -> anyhow::Result<String> {
    let config = app_config(ca_pem, client)?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost".to_owned())?, tcp)
        .await?;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow::anyhow!("no server certificate"))?;
    Ok(distcache_tls::CertIdentity::parse(cert).map_err(anyhow::Error::msg)?.serial)
}

/// `GET path` over HTTPS/1.1 (the admin port with `admin.tls`), trusting `ca_pem`.
pub async fn https_get(addr: SocketAddr, path: &str, ca_pem: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = (*app_config(ca_pem, None)?).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost".to_owned())?, tcp)
        .await?;
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((code, body))
}

/// Makes sure a rustls alert type is in scope for tests that match on it.
pub use rustls::AlertDescription;
