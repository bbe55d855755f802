//! The downstream TLS listener: accept, handshake under a timeout, then serve HTTP/1.1 or
//! HTTP/2 on the connection, as ALPN and the connection preface decide.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use rustls::AlertDescription;
use tracing::Instrument;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::reload::SharedGateway;
use crate::telemetry::{next_connection_id, ConnectionInfo};

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
    gateway: SharedGateway,
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
        let id = next_connection_id();
        let span = tracing::info_span!("connection", id, client_addr = %peer);
        tokio::spawn(connection.run(stream, peer, id, span.clone()).instrument(span));
    }
}

struct Connection {
    acceptor: TlsAcceptor,
    gateway: SharedGateway,
    builder: Arc<auto::Builder<TokioExecutor>>,
    settings: ConnectionSettings,
    graceful: Watcher,
}

impl Connection {
    async fn run(self, stream: TcpStream, peer: SocketAddr, id: u64, span: tracing::Span) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let metrics = self.gateway.load().metrics().clone();
        let tls = match tokio::time::timeout(self.settings.tls_handshake, self.acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                let reason = handshake_failure_reason(&error);
                metrics.handshake_failed(reason);
                // A peer that closes before the handshake is usually a TCP probe or a
                // port scan: not worth a line at the default level.
                if reason == "connection_closed" {
                    tracing::debug!(reason, %error, "TLS handshake failed");
                } else {
                    tracing::info!(reason, %error, "TLS handshake failed");
                }
                return;
            }
            Err(_) => {
                metrics.handshake_failed("timeout");
                tracing::info!(reason = "timeout", timeout_seconds = self.settings.tls_handshake.as_secs(), "TLS handshake timed out");
                return;
            }
        };

        let session = tls.get_ref().1;
        let tls_version = match session.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        };
        // The auto builder also accepts an HTTP/2 preface without ALPN, which no TLS
        // client sends in practice; such a connection is counted as h1.
        let protocol = if session.alpn_protocol() == Some(b"h2") { "h2" } else { "h1" };
        tracing::debug!(tls = tls_version, protocol, sni = session.server_name().unwrap_or("-"), "connection established");
        let _open = metrics.connection_opened(protocol);

        let connection = Arc::new(ConnectionInfo { id, peer, tls_version, span });
        let gateway = self.gateway;
        let service = service_fn(move |request| {
            // Each request takes the gateway in force when it arrives, so a reload
            // applies to open connections from their next request on.
            let gateway = gateway.load_full();
            let connection = connection.clone();
            let span = connection.span.clone();
            async move { Ok::<_, Infallible>(gateway.handle(request, &connection).await) }.instrument(span)
        });
        let connection = self.builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
        let connection = self.graceful.watch(connection.into_owned());
        match connection.await {
            Ok(()) => tracing::debug!("connection closed"),
            Err(error) => tracing::debug!(error = %crate::proxy::error_chain(&*error), "connection closed with an error"),
        }
    }
}

/// Returns the `reason` label for a failed handshake, one of
/// [`crate::metrics::HANDSHAKE_FAILURE_REASONS`].
fn handshake_failure_reason(error: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;

    // tokio-rustls wraps a rustls::Error in an io::Error of kind InvalidData.
    let tls_error = error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls_error {
        Some(rustls::Error::AlertReceived(alert)) => match alert {
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA => "certificate_rejected",
            _ => "alert",
        },
        Some(rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol) => "incompatible",
        Some(
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. }
            | rustls::Error::PeerMisbehaved(_)
            | rustls::Error::DecryptError,
        ) => "protocol_error",
        Some(_) => "other",
        None => match error.kind() {
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe => "connection_closed",
            _ => "other",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn handshake_reasons() {
        let tls = |error: rustls::Error| Error::new(ErrorKind::InvalidData, error);
        let cases = [
            (tls(rustls::Error::AlertReceived(AlertDescription::UnknownCA)), "certificate_rejected"),
            (tls(rustls::Error::AlertReceived(AlertDescription::InternalError)), "alert"),
            (tls(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoCipherSuitesInCommon)), "incompatible"),
            (tls(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)), "protocol_error"),
            (Error::from(ErrorKind::UnexpectedEof), "connection_closed"),
            (Error::from(ErrorKind::PermissionDenied), "other"),
        ];
        for (error, reason) in cases {
            assert_eq!(handshake_failure_reason(&error), reason, "{error}");
            assert!(crate::metrics::HANDSHAKE_FAILURE_REASONS.contains(&reason));
        }
    }
}
