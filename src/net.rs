//! The listener's connections: plain TCP, or TLS (rustls) accepted under the configuration in
//! force when the connection came (SIGHUP swaps it for later connections; open ones keep theirs).
//! Handshakes run in tasks of their own, so a slow or silent client never holds the accept loop.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::RwLock;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

/// The TLS configuration in force, swapped on reload.
pub(crate) type TlsConfig = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once: past it the accept loop waits for one to end, so a
/// flood of connections that never finish their handshake holds a bounded number of tasks.
const MAX_HANDSHAKES: usize = 1024;

/// One accepted connection.
pub(crate) enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// What handlers may learn of the connection.
#[derive(Clone, Debug)]
pub(crate) struct ConnInfo {
    pub(crate) remote: Option<SocketAddr>,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        let tcp = match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        };
        ConnInfo {
            remote: tcp.peer_addr().ok(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The accepted connections of `listener` (Nagle off: with it every reply waited ~40 ms for a
/// delayed ACK), through TLS when `tls` is set. The accept task ends with the stream.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Option<TlsConfig>,
) -> impl tokio_stream::Stream<Item = io::Result<Conn>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Conn>>(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: keep serving the open connections.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            match &tls {
                None => {
                    if tx.send(Ok(Conn::Plain(tcp))).await.is_err() {
                        return;
                    }
                }
                Some(config) => {
                    let Ok(permit) = handshakes.clone().acquire_owned().await else {
                        return;
                    };
                    let acceptor = tokio_rustls::TlsAcceptor::from(config.read().clone());
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                let _ = tx.send(Ok(Conn::Tls(Box::new(stream)))).await;
                            }
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    Incoming {
        rx: tokio_stream::wrappers::ReceiverStream::new(rx),
        accept,
    }
}

/// The connection stream; dropping it stops accepting.
struct Incoming {
    rx: tokio_stream::wrappers::ReceiverStream<io::Result<Conn>>,
    accept: tokio::task::JoinHandle<()>,
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Conn>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.get_mut().rx).poll_next(cx)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
