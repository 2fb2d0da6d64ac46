//! Dialling over TLS with tonic: a connector (TCP, then a rustls handshake with the config current at that
//! moment) for `Endpoint::connect_with_connector*`, and the translation of handshake failures into what a user
//! can act on.

use std::{future::Future, io, pin::Pin, sync::Arc, time::Duration};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::{AlertDescription, CertificateError, ClientConfig};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

/// Where the connector gets its config (reloaded material gives new connections new configs).
pub type ConfigSource = Arc<dyn Fn() -> Arc<ClientConfig> + Send + Sync>;

/// A tonic connector that speaks TLS.
#[derive(Clone)]
pub struct Connector {
    config: ConfigSource,
    server_name: Option<ServerName<'static>>,
    connect_timeout: Duration,
}

impl Connector {
    /// A connector; `server_name` overrides the name the certificate is checked against (default: the host of
    /// the URI dialled).
    pub fn new(
        config: ConfigSource,
        server_name: Option<ServerName<'static>>,
        connect_timeout: Duration,
    ) -> Self {
        Self { config, server_name, connect_timeout }
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), io::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = (self.config)();
        let server_name = self.server_name.clone();
        let connect_timeout = self.connect_timeout;
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| invalid(format!("no host in {uri}")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = match server_name {
                Some(n) => n,
                None => ServerName::try_from(host.clone())
                    .map_err(|e| invalid(format!("{host} is not a valid TLS server name: {e}")))?,
            };
            let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect((host.as_str(), port)))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {host}:{port} timed out"))
                })??;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Finds a rustls error in an error's source chain (tonic wraps the connector's `io::Error`, which wraps it).
pub fn find_rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = e.downcast_ref::<io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(r) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(r);
        }
        next = e.source();
    }
    None
}

/// What a failed handshake means for the user of a client, or `None` when it is not a TLS failure.
pub fn explain(err: &rustls::Error, server_name: &str) -> String {
    use rustls::Error as E;
    match err {
        E::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "unknown CA: the certificate of {server_name} is not signed by a CA in the trusted bundle \
             (--tls-ca / DISTCACHE_TLS_CA)"
        ),
        E::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => {
            format!(
                "name mismatch: the server's certificate is not valid for {server_name} (set --tls-server-name / \
                 DISTCACHE_TLS_SERVER_NAME to a name the certificate carries): {err}"
            )
        }
        E::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            format!("the certificate of {server_name} has expired: {err}")
        }
        E::AlertReceived(AlertDescription::CertificateRequired) => format!(
            "client certificate required: {server_name} asks every client for a certificate (--tls-cert and \
             --tls-key / DISTCACHE_TLS_CERT and DISTCACHE_TLS_KEY)"
        ),
        E::AlertReceived(
            AlertDescription::UnknownCA | AlertDescription::BadCertificate | AlertDescription::AccessDenied,
        ) => format!(
            "{server_name} refused the client certificate ({err}): it must be signed by the server's CA"
        ),
        E::InvalidMessage(_) => {
            format!("{server_name} does not speak TLS on this port (use an http:// endpoint?): {err}")
        }
        other => format!("TLS handshake with {server_name} failed: {other}"),
    }
}
