//! TLS of the client: `https://` endpoints, the PEM files they use (CA bundle, client certificate and key), and
//! connection failures translated into what the user can act on — unknown CA, name mismatch, a client
//! certificate required but absent, or TLS on one side only.
//!
//! The scheme decides: `https://` is TLS, `http://` and a bare `host:port` are plain. TLS options with a plain
//! endpoint are an error rather than a silent upgrade, so a typo never sends a cleartext request to a TLS
//! cluster or the other way round. There are no built-in roots: a cluster's certificates come from a private CA
//! (a Secret's `ca.crt`, cert-manager), so an `https://` endpoint needs the CA bundle.

use std::{
    error::Error as StdError,
    future::Future,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use distcache_tls::{
    Connector,
    rustls::{self, AlertDescription, ClientConfig, ProtocolVersion, RootCertStore, sign::CertifiedKey},
    rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::transport::Uri;

use crate::Error;

/// The TLS options of a [`crate::ClientBuilder`]: files as given, read at connect time.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsOptions {
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
    pub(crate) server_name: Option<String>,
}

impl TlsOptions {
    /// The options that are set, named as the CLI flags (the library's users see the same names in errors).
    fn given(&self) -> Vec<&'static str> {
        [
            (self.ca_file.is_some(), "--tls-ca"),
            (self.cert_file.is_some(), "--tls-cert"),
            (self.key_file.is_some(), "--tls-key"),
            (self.server_name.is_some(), "--tls-server-name"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect()
    }
}

/// Where a client connects and how: the endpoint as the user wrote it (for messages), what tonic dials, and the
/// TLS config and server name for `https://`.
#[derive(Clone)]
pub(crate) struct Target {
    /// Normalised endpoint, `http://host:port` or `https://host:port`: what errors name.
    pub(crate) endpoint: String,
    /// What tonic's `Endpoint` is built from: always `http://` (for `https://` the connector does the TLS, so
    /// tonic's own TLS is never involved).
    pub(crate) dial: String,
    /// `host:port` of the endpoint, for messages and for the probe of a plain endpoint.
    authority: String,
    pub(crate) tls: Option<TlsTarget>,
}

/// The TLS half of an `https://` target.
#[derive(Clone)]
pub(crate) struct TlsTarget {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl TlsTarget {
    /// The name the server's certificate is checked against, as text.
    pub(crate) fn server_name(&self) -> String {
        match &self.server_name {
            ServerName::DnsName(name) => name.as_ref().to_owned(),
            ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            other => format!("{other:?}"),
        }
    }
}

/// Accepts `host:port` as well as a full URI, because that is how people type addresses.
pub(crate) fn normalize_endpoint(endpoint: &str) -> String {
    let endpoint = endpoint.trim();
    if endpoint.contains("://") { endpoint.to_owned() } else { format!("http://{endpoint}") }
}

fn config_error(message: String) -> Error {
    Error::Config(message)
}

impl Target {
    /// Checks the endpoint against the options and, for `https://`, reads the PEM files and builds the config.
    pub(crate) fn resolve(endpoint: &str, options: &TlsOptions) -> Result<Self, Error> {
        let endpoint = normalize_endpoint(endpoint);
        let uri: Uri = endpoint
            .parse()
            .map_err(|e| config_error(format!("invalid endpoint {endpoint:?}: {e} (expected host:port, http://host:port or https://host:port)")))?;
        let authority = uri
            .authority()
            .map(ToString::to_string)
            .ok_or_else(|| config_error(format!("invalid endpoint {endpoint:?}: no host")))?;
        let tls = match uri.scheme_str() {
            Some("http") => {
                let given = options.given();
                if !given.is_empty() {
                    return Err(config_error(format!(
                        "TLS options ({}) given for the plain endpoint {endpoint}; use https://{authority}",
                        given.join(", ")
                    )));
                }
                None
            }
            Some("https") => Some(TlsTarget::build(&uri, options, &endpoint)?),
            other => {
                return Err(config_error(format!(
                    "invalid endpoint {endpoint:?}: unsupported scheme {:?} (use http:// or https://)",
                    other.unwrap_or_default()
                )));
            }
        };
        let dial = format!("http://{authority}");
        Ok(Self { endpoint, dial, authority, tls })
    }

    /// The connector of an `https://` target.
    pub(crate) fn connector(tls: &TlsTarget, connect_timeout: Duration) -> SettledConnector {
        let config = Arc::clone(&tls.config);
        let inner = Connector::new(
            Arc::new(move || Arc::clone(&config)),
            Some(tls.server_name.clone()),
            connect_timeout,
        );
        SettledConnector { inner, settle_timeout: connect_timeout }
    }

    /// What a failed connection attempt or call means, when it is about TLS: a TLS error from the handshake or
    /// the session (an alert the server sent after the handshake, such as TLS 1.3's `certificate_required`).
    /// `handshake` says the error came from dialling; only then does an early end of the connection mean the
    /// server does not speak TLS.
    pub(crate) fn explain(&self, err: &(dyn StdError + 'static), handshake: bool) -> Option<Error> {
        let tls = self.tls.as_ref()?;
        let server_name = tls.server_name();
        let reason = if let Some(rustls_error) = distcache_tls::find_rustls_error(err) {
            distcache_tls::explain(rustls_error, &server_name)
        } else if let Some(alert) = alert_in_text(err) {
            distcache_tls::explain(&rustls::Error::AlertReceived(alert), &server_name)
        } else if handshake && ended_early(err) {
            format!(
                "{} closed the connection during the TLS handshake: it does not seem to speak TLS on this port \
                 (use http://{}?)",
                self.authority, self.authority
            )
        } else {
            return None;
        };
        Some(Error::Tls { endpoint: self.endpoint.clone(), reason })
    }

    /// Opens one connection to the target as `distcache bench --transport h2` uses it: TCP (`TCP_NODELAY`),
    /// then TLS for an `https://` endpoint. A failure is explained like at connect time.
    pub(crate) async fn open_stream(
        &self,
        connect_timeout: Duration,
    ) -> Result<Box<dyn crate::bench::Io>, Error> {
        let Some(tls) = &self.tls else {
            let connect = tokio::time::timeout(connect_timeout, TcpStream::connect(self.authority.as_str()));
            let tcp = connect
                .await
                .map_err(|_| {
                    Error::Unavailable(format!(
                        "connecting to {} timed out after {connect_timeout:?}",
                        self.authority
                    ))
                })?
                .map_err(|err| Error::Unavailable(format!("cannot connect to {}: {err}", self.authority)))?;
            tcp.set_nodelay(true).map_err(|err| {
                Error::Unavailable(format!("cannot set TCP_NODELAY towards {}: {err}", self.authority))
            })?;
            return Ok(Box::new(tcp));
        };
        let uri: Uri = self
            .dial
            .parse()
            .map_err(|err| config_error(format!("invalid endpoint {}: {err}", self.endpoint)))?;
        let mut connector = Self::connector(tls, connect_timeout).inner;
        match tower_service::Service::call(&mut connector, uri).await {
            Ok(stream) => Ok(Box::new(stream.into_inner())),
            Err(err) => Err(self.explain(&err, true).unwrap_or_else(|| {
                Error::Unavailable(format!("cannot connect to {}: {err}", self.endpoint))
            })),
        }
    }

    /// For a plain endpoint whose connection broke before any answer: does the server speak TLS? It is asked
    /// directly: a TLS server answers the HTTP/2 preface with a TLS alert record.
    pub(crate) async fn explain_plain(&self, timeout: Duration) -> Option<Error> {
        if self.tls.is_some() || !speaks_tls(&self.authority, timeout).await {
            return None;
        }
        Some(Error::Tls {
            endpoint: self.endpoint.clone(),
            reason: format!(
                "the server may require TLS (it answered with a TLS alert): use https://{} with --tls-ca",
                self.authority
            ),
        })
    }
}

impl TlsTarget {
    fn build(uri: &Uri, options: &TlsOptions, endpoint: &str) -> Result<Self, Error> {
        let Some(ca_file) = &options.ca_file else {
            return Err(config_error(format!(
                "{endpoint} is a TLS endpoint: give the CA bundle that signed the server's certificate with \
                 --tls-ca / DISTCACHE_TLS_CA (a PEM file, such as the ca.crt of the cluster's TLS Secret)"
            )));
        };
        let roots = load_roots(ca_file)?;
        let identity = match (&options.cert_file, &options.key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(Arc::new(load_identity(cert, key)?)),
            (Some(_), None) => {
                return Err(config_error(
                    "a client certificate needs its private key: --tls-key / DISTCACHE_TLS_KEY".to_owned(),
                ));
            }
            (None, Some(_)) => {
                return Err(config_error(
                    "a client key needs its certificate: --tls-cert / DISTCACHE_TLS_CERT".to_owned(),
                ));
            }
        };
        let config = distcache_tls::client_config(roots, identity)
            .map_err(|e| config_error(format!("cannot build the TLS configuration: {e}")))?;
        let name = match &options.server_name {
            Some(name) => name.trim().to_owned(),
            None => uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned(),
        };
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| config_error(format!("{name:?} is not a valid TLS server name: {e}")))?;
        Ok(Self { config: Arc::new(config), server_name })
    }
}

/// The CA bundle: every certificate of a PEM file.
fn load_roots(path: &Path) -> Result<RootCertStore, Error> {
    let shown = path.display();
    let certs = read_certs(path, "CA bundle")?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(config_error(format!("the CA bundle {shown} holds no usable CA certificate")));
    }
    Ok(roots)
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let shown = path.display();
    let unreadable = |e: &dyn std::fmt::Display| config_error(format!("cannot read the {what} {shown}: {e}"));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(&e))?;
    if certs.is_empty() {
        return Err(config_error(format!("the {what} {shown} holds no PEM certificate")));
    }
    Ok(certs)
}

/// The client certificate (with any intermediates after it) and its key, checked to belong together.
fn load_identity(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, Error> {
    let chain = read_certs(cert_file, "client certificate")?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| config_error(format!("cannot read the client key {}: {e}", key_file.display())))?;
    CertifiedKey::from_der(chain, key, &distcache_tls::provider()).map_err(|e| {
        config_error(format!(
            "the client certificate {} and key {} cannot be used together: {e}",
            cert_file.display(),
            key_file.display()
        ))
    })
}

/// The TLS connector of the client: [`Connector`], then, with TLS 1.3, a wait for the server's first record
/// after the handshake.
///
/// In TLS 1.3 the client's side of the handshake ends before the server has checked the client's certificate
/// (or its absence): a refusal (`certificate_required`, `unknown_ca`, …) is an alert that arrives after it. If
/// the connection were handed to HTTP/2 at once, the client's first writes would race with the server closing
/// the connection, and the call could fail with a broken pipe that has lost the alert. Waiting for the server's
/// first record (a session ticket or its HTTP/2 SETTINGS, which an HTTP/2 server sends first) settles it: the
/// alert, read by rustls, fails the connection with the `rustls::Error` that explains it. The wait is bounded
/// by the connect timeout; a server that sends nothing first only delays the connection by that much.
#[derive(Clone)]
pub(crate) struct SettledConnector {
    inner: Connector,
    settle_timeout: Duration,
}

type TlsIo = <Connector as tower_service::Service<Uri>>::Response;

impl tower_service::Service<Uri> for SettledConnector {
    type Response = TlsIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsIo>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let settle_timeout = self.settle_timeout;
        Box::pin(async move {
            let mut io = connecting.await?;
            match tokio::time::timeout(settle_timeout, settle(&mut io)).await {
                Ok(settled) => settled.map(|()| io),
                // Nothing from the server yet: let HTTP/2 go on (and report whatever comes).
                Err(_) => Ok(io),
            }
        })
    }
}

/// Reads TLS records (never application data: rustls keeps it for HTTP/2) until the server has sent one after
/// the handshake, or has refused the connection.
async fn settle(io: &mut TlsIo) -> io::Result<()> {
    let (tcp, conn) = io.inner_mut().get_mut();
    if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        // Before TLS 1.3 the server's Finished, which the client's handshake waited for, came after its check.
        return Ok(());
    }
    loop {
        let state = conn.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if state.plaintext_bytes_to_read() > 0 || conn.tls13_tickets_received() > 0 {
            return Ok(());
        }
        if state.peer_has_closed() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection right after the TLS handshake",
            ));
        }
        tcp.readable().await?;
        match conn.read_tls(&mut TryRead(tcp)) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection right after the TLS handshake",
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// A non-blocking `std::io::Read` over a tokio TCP stream, for rustls's `read_tls`.
struct TryRead<'a>(&'a TcpStream);

impl io::Read for TryRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

/// The TLS alert a failed call received, from the text of its error. An alert after the handshake (TLS 1.3's
/// `certificate_required`, a refused client certificate) fails the first read of the HTTP/2 connection, and h2
/// keeps only the kind and text of such an I/O error, so the `rustls::Error` is not in the chain any more; its
/// text is (`received fatal alert: CertificateRequired`).
fn alert_in_text(err: &(dyn StdError + 'static)) -> Option<AlertDescription> {
    const PREFIX: &str = "received fatal alert: ";
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if let Some(start) = text.find(PREFIX) {
            let name: String =
                text[start + PREFIX.len()..].chars().take_while(char::is_ascii_alphanumeric).collect();
            return (0..=u8::MAX).map(AlertDescription::from).find(|alert| format!("{alert:?}") == name);
        }
        next = e.source();
    }
    None
}

/// True when the error chain holds an end of stream or a reset: the other side hung up.
fn ended_early(err: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(
                io.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            )
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// Sends the HTTP/2 client preface to `authority` and reports whether the answer is a TLS record (a TLS server
/// rejects the preface with an alert; an HTTP/2 server answers with frames or waits).
async fn speaks_tls(authority: &str, timeout: Duration) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(authority).await?;
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut header = [0_u8; 2];
        stream.read_exact(&mut header).await?;
        // Content type 21 (alert) or 22 (handshake), then the major version 3 of every TLS record.
        Ok::<bool, io::Error>(matches!(header, [21 | 22, 3]))
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(true)))
}

#[cfg(test)]
mod tests;
