//! The downstream TLS listener: accept, handshake under a timeout, then serve HTTP/1.1 or
//! HTTP/2 on the connection, as ALPN and the connection preface decide.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::proxy::Gateway;

/// Per-connection limits and timeouts.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    pub tls_handshake: Duration,
    pub header_read: Duration,
}

/// HTTP/2 flow-control windows. A stream window well above the bandwidth-delay product of
/// a fast link keeps layer pushes and pulls over HTTP/2 from stalling on WINDOW_UPDATEs.
const H2_STREAM_WINDOW: u32 = 4 << 20;
const H2_CONNECTION_WINDOW: u32 = 16 << 20;
const H2_MAX_CONCURRENT_STREAMS: u32 = 250;

pub fn http_builder(settings: &ConnectionSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        // RFC 8441: lets HTTP/2 clients open WebSockets with extended CONNECT.
        .enable_connect_protocol();
    builder
}

/// Accepts connections until `shutdown` turns true. Each connection is registered with
/// `graceful`, which signals it to finish its requests and close when the gateway drains.
pub async fn serve_https(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    gateway: Arc<Gateway>,
    settings: ConnectionSettings,
    graceful: Arc<GracefulShutdown>,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = Arc::new(http_builder(&settings));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually out of file descriptors; back off instead of spinning.
                    tracing::error!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let connection = Connection {
            acceptor: acceptor.clone(),
            gateway: gateway.clone(),
            builder: builder.clone(),
            settings: settings.clone(),
            graceful: graceful.watcher(),
        };
        tokio::spawn(connection.run(stream, peer));
    }
}

struct Connection {
    acceptor: TlsAcceptor,
    gateway: Arc<Gateway>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    settings: ConnectionSettings,
    graceful: Watcher,
}

impl Connection {
    async fn run(self, stream: TcpStream, peer: SocketAddr) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        let tls = match tokio::time::timeout(self.settings.tls_handshake, self.acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                tracing::info!(%peer, %error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, timeout = ?self.settings.tls_handshake, "TLS handshake timed out");
                return;
            }
        };

        let gateway = self.gateway;
        let service = service_fn(move |request| {
            let gateway = gateway.clone();
            async move { Ok::<_, Infallible>(gateway.handle(request, peer).await) }
        });
        let connection = self.builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
        let connection = self.graceful.watch(connection.into_owned());
        if let Err(error) = connection.await {
            tracing::debug!(%peer, error = %crate::proxy::error_chain(&*error), "connection closed with an error");
        }
    }
}
