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
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::Limits;
use crate::framing::FramingGuard;
use crate::idle::{InFlight, Tracked};
use crate::reload::SharedGateway;
use crate::telemetry::{next_connection_id, ConnectionInfo};
use crate::tunnels::Tunnels;
use crate::workers::Workers;

/// Per-connection limits and timeouts.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    pub tls_handshake: Duration,
    pub header_read: Duration,
    pub keep_alive: Duration,
    pub limits: Limits,
}

/// HTTP/2 flow-control windows. A stream window well above the bandwidth-delay product of
/// a fast link keeps layer pushes and pulls over HTTP/2 from stalling on WINDOW_UPDATEs.
const H2_STREAM_WINDOW: u32 = 4 << 20;
const H2_CONNECTION_WINDOW: u32 = 16 << 20;
/// Streams a client may reset before the gateway has accepted them, and streams the gateway
/// may reset for protocol errors, before the connection gets GOAWAY. These bound the HTTP/2
/// rapid-reset attack (CVE-2023-44487); the values are the h2 crate's own defaults.
const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// hyper's read buffer is also its header limit (a head that does not fit gets 431), so
/// it is sized from the header limits; this floor keeps body reads efficient.
const MIN_READ_BUFFER: usize = 64 << 10;

/// Bytes of request line and header section that the HTTP parsers accept at all. Requests
/// up to this size are parsed, so the gateway can respond with 414 or 431 and a readable body
/// (see `proxy::check_request_size`); larger ones get hyper's or h2's bare 431.
pub fn parser_header_limit(limits: &Limits) -> usize {
    2 * (limits.max_header_bytes + limits.max_uri_bytes)
}

pub fn http_builder(settings: &ConnectionSettings) -> auto::Builder<TokioExecutor> {
    let parser_limit = parser_header_limit(&settings.limits);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The header read timeout also runs while a kept-alive connection waits for its next
    // request line, so it bounds idle HTTP/1.1 connections too.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read)
        .max_buf_size(parser_limit.max(MIN_READ_BUFFER))
        .keep_alive(true);
    // The header list limit also bounds a HEADERS frame followed by endless CONTINUATION
    // frames: the h2 crate stops decoding and resets once the list grows past it.
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_concurrent_streams(settings.limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(parser_limit).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
        // RFC 8441: lets HTTP/2 clients open WebSockets with extended CONNECT.
        .enable_connect_protocol();
    builder
}

/// Accepts connections until `shutdown` turns true and hands each to one of `workers`, on
/// whose thread it then runs. Each connection is registered with `graceful`, which waits
/// for it to close when the gateway drains; `shutdown` signals it to finish its requests
/// and close.
///
/// At most `limits.max_connections` connections are served at once. The loop stops
/// accepting at the limit instead of accepting and closing, so waiting clients stay in the
/// kernel's accept queue and get served as soon as a connection ends.
pub async fn serve_https(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    gateway: SharedGateway,
    settings: ConnectionSettings,
    graceful: Arc<GracefulShutdown>,
    mut shutdown: watch::Receiver<bool>,
    workers: Arc<Workers>,
) {
    let builder = Arc::new(http_builder(&settings));
    let slots = Arc::new(Semaphore::new(settings.limits.max_connections));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = shutdown.changed() => break,
        };
        if slots.available_permits() == 0 {
            tracing::warn!(max_connections = settings.limits.max_connections, "connection limit reached; new connections wait");
        }
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
            drain: shutdown.clone(),
            _permit: permit,
        };
        let id = next_connection_id();
        let span = tracing::info_span!("connection", id, client_addr = %peer);
        // A Tokio socket belongs to the runtime that registered it, so the stream moves to
        // its worker as a std socket and registers there.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, client_addr = %peer, "cannot hand a connection to a worker; closing it");
                continue;
            }
        };
        workers.spawn_connection(
            async move {
                let stream = match TcpStream::from_std(stream) {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "cannot register a connection with its worker; closing it");
                        return;
                    }
                };
                connection.run(stream, peer, id, tracing::Span::current()).await;
            }
            .instrument(span),
        );
    }
}

struct Connection {
    acceptor: TlsAcceptor,
    gateway: SharedGateway,
    builder: Arc<auto::Builder<TokioExecutor>>,
    settings: ConnectionSettings,
    /// Held until the connection ends so that `shutdown()` waits for it.
    graceful: Watcher,
    drain: watch::Receiver<bool>,
    /// Held until the connection and its tunnels end, so an upgraded connection keeps
    /// counting against `limits.max_connections`.
    _permit: OwnedSemaphorePermit,
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

        let connection = Arc::new(ConnectionInfo { id, peer, tls_version, span, tunnels: Tunnels::default() });
        let info = connection.clone();
        let gateway = self.gateway;
        let in_flight = InFlight::default();
        let requests = in_flight.clone();
        let service = service_fn(move |request| {
            // Each request takes the gateway in force when it arrives, so a reload
            // applies to open connections from their next request on.
            let gateway = gateway.load_full();
            let connection = connection.clone();
            let span = connection.span.clone();
            let guard = requests.start();
            async move {
                let response = gateway.handle(request, &connection).await;
                Ok::<_, Infallible>(response.map(|body| Tracked::new(body, guard)))
            }
            .instrument(span)
        });
        let stream = FramingGuard::new(tls, protocol == "h1", parser_header_limit(&self.settings.limits), self.settings.header_read);
        let connection = self.builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let mut connection = std::pin::pin!(connection.into_owned());
        let mut drain = self.drain;
        let idle = in_flight.idle_for(self.settings.keep_alive);
        let mut idle = std::pin::pin!(idle);
        let mut closing = false;
        let mut draining = false;
        let mut tunnels_closed = false;

        // Idle time and the drain both end the connection the same way: GOAWAY on HTTP/2,
        // close after the current response on HTTP/1.1. At drain, the HTTP/2 streams that
        // carry tunnels are closed once the connection's other requests have finished.
        let result = loop {
            tokio::select! {
                result = connection.as_mut() => break result,
                _ = idle.as_mut(), if !closing => {
                    tracing::debug!(keep_alive = ?self.settings.keep_alive, "closing an idle connection");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = drain.wait_for(|stop| *stop), if !draining => {
                    if !closing {
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    draining = true;
                }
                () = in_flight.none(), if draining && !tunnels_closed => {
                    info.tunnels.close_all();
                    tunnels_closed = true;
                }
            }
        };
        match result {
            Ok(()) => tracing::debug!("connection closed"),
            Err(error) => tracing::debug!(error = %crate::proxy::error_chain(&*error), "connection closed with an error"),
        }
        wait_for_tunnels(&info.tunnels, &mut drain).await;
        drop(self.graceful);
    }
}

/// Waits for the tunnels that outlive hyper's connection future, which an HTTP/1.1
/// connection leaves once the 101 response is sent. Until they end, the caller keeps the
/// connection's slot and drain watcher.
///
/// At drain the tunnels are closed instead of waited for. Rancher's WebSockets (the UI's
/// subscriptions, kubectl shells) stay open until a side closes them, so waiting would hold
/// every drain to its full period, and Rancher's UI reconnects at once to a replica that is
/// still ready.
async fn wait_for_tunnels(tunnels: &Tunnels, drain: &mut watch::Receiver<bool>) {
    if tunnels.count() == 0 {
        return;
    }
    tokio::select! {
        () = tunnels.all_closed() => return,
        _ = drain.wait_for(|stop| *stop) => {}
    }
    tunnels.close_all();
    tunnels.all_closed().await;
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
