//! Accepting TLS connections for tonic and axum: TCP accepts on one task, each handshake on its own task with a
//! deadline (a slow or silent client holds up nobody), finished connections handed over through a channel. The
//! config is taken at each accept, so reloaded material applies to the next connection.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::material::CertIdentity;

/// How long a client may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request learns about its connection (tonic puts it in the request's extensions).
#[derive(Clone, Debug, Default)]
pub struct TlsConnectInfo {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The identities (SANs, then CN) of the client certificate; empty without one.
    pub identities: Arc<[String]>,
}

/// An accepted TLS connection.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: TlsConnectInfo,
}

impl TlsConn {
    /// What the connection's requests learn about it.
    pub fn info(&self) -> &TlsConnectInfo {
        &self.info
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> TlsConnectInfo {
        self.info.clone()
    }
}

/// Accepts TLS connections on `listener` until the receiver is dropped. `config` is called for every
/// connection; `port` names the listener in logs ("client", "peer", "admin").
pub fn accept_loop(
    listener: TcpListener,
    config: impl Fn() -> Arc<ServerConfig> + Send + Sync + 'static,
    port: &'static str,
) -> mpsc::Receiver<TlsConn> {
    let (tx, rx) = mpsc::channel::<TlsConn>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, port, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, port, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, port, "TLS handshake timed out");
                        return;
                    }
                };
                let identities = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|c| CertIdentity::parse(c).ok())
                    .map(|id| id.all().map(str::to_owned).collect::<Vec<_>>())
                    .unwrap_or_default();
                let info = TlsConnectInfo { remote: Some(remote), identities: identities.into() };
                let _ = tx.send(TlsConn { stream, info }).await;
            });
        }
    });
    rx
}

/// The accepted connections as the stream tonic's `serve_with_incoming` takes.
pub fn incoming(
    rx: mpsc::Receiver<TlsConn>,
) -> impl futures::Stream<Item = Result<TlsConn, io::Error>> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) })
}
