//! Protocol upgrades through the gateway: WebSockets to Rancher, and any other HTTP/1.1
//! upgrade such as `SPDY/3.1`, which older kubectl versions use for `exec` through Rancher's
//! Kubernetes proxy.
//!
//! Two downstream forms are accepted, and both reach the upstream as an HTTP/1.1 upgrade:
//! - HTTP/1.1 `Connection: upgrade` plus `Upgrade: <protocol>` (RFC 9110 section 7.8),
//!   forwarded with those two headers kept;
//! - HTTP/2 extended CONNECT with `:protocol = websocket` (RFC 8441), turned into an
//!   HTTP/1.1 WebSocket handshake upstream. The upstream's 101 becomes a 200 downstream.
//!
//! After the switch the gateway copies bytes both ways, frames and close frames included,
//! until both sides close, nothing moves in either direction for the idle period, or the
//! gateway drains.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::tunnels::TunnelGuard;

const SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
const SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");
const SEC_WEBSOCKET_VERSION: HeaderName = HeaderName::from_static("sec-websocket-version");

/// An upgrade that the downstream client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeRequest {
    /// HTTP/1.1 upgrade; the value of the client's `Upgrade` header.
    Http1(HeaderValue),
    /// HTTP/2 extended CONNECT for a WebSocket.
    ExtendedConnect,
}

/// Classifies a request: `Ok(Some(_))` for a genuine upgrade, `Ok(None)` for an ordinary
/// request, and an error for a CONNECT that the gateway does not tunnel.
pub fn classify<B>(request: &Request<B>) -> Result<Option<UpgradeRequest>, ProxyError> {
    if request.method() == Method::CONNECT {
        let protocol = request.extensions().get::<hyper::ext::Protocol>();
        return match protocol {
            Some(protocol) if protocol.as_str().eq_ignore_ascii_case("websocket") => {
                Ok(Some(UpgradeRequest::ExtendedConnect))
            }
            Some(protocol) => Err(ProxyError::NotImplemented(
                format!("extended CONNECT for {:?} is not supported; only websocket is", protocol.as_str()).into(),
            )),
            None => Err(ProxyError::NotImplemented("CONNECT tunnels are not supported by this gateway".into())),
        };
    }
    if request.version() != Version::HTTP_11 {
        return Ok(None);
    }
    let connection_upgrade = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let Some(protocol) = request.headers().get(header::UPGRADE) else {
        return Ok(None);
    };
    // `h2c` switches this one connection to HTTP/2; it means nothing to the upstream.
    let only_h2c = protocol
        .to_str()
        .map(|value| value.split(',').all(|p| p.trim().eq_ignore_ascii_case("h2c")))
        .unwrap_or(false);
    Ok((connection_upgrade && !only_h2c).then(|| UpgradeRequest::Http1(protocol.clone())))
}

impl UpgradeRequest {
    /// Adjusts the upstream request after hop-by-hop headers were removed: puts back
    /// `Upgrade` and `Connection: upgrade`, and for extended CONNECT builds the HTTP/1.1
    /// WebSocket handshake.
    pub fn prepare_upstream(&self, method: &mut Method, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        match self {
            UpgradeRequest::Http1(protocol) => {
                headers.insert(header::UPGRADE, protocol.clone());
            }
            UpgradeRequest::ExtendedConnect => {
                *method = Method::GET;
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(SEC_WEBSOCKET_KEY, websocket_key());
                if !headers.contains_key(SEC_WEBSOCKET_VERSION) {
                    headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
                }
            }
        }
    }

    /// Adjusts the upstream's 101 response for the downstream client. Returns the status
    /// to send: 101 for HTTP/1.1, 200 for extended CONNECT (RFC 8441 section 5).
    pub fn prepare_downstream(&self, upstream_protocol: Option<HeaderValue>, headers: &mut HeaderMap) -> StatusCode {
        match self {
            UpgradeRequest::Http1(requested) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, upstream_protocol.unwrap_or_else(|| requested.clone()));
                StatusCode::SWITCHING_PROTOCOLS
            }
            UpgradeRequest::ExtendedConnect => {
                // The accept value matches the gateway's own key; the HTTP/2 client sent none.
                headers.remove(SEC_WEBSOCKET_ACCEPT);
                StatusCode::OK
            }
        }
    }
}

/// Generates a fresh `Sec-WebSocket-Key`: 16 random bytes in base64 (RFC 6455 section 4.1).
fn websocket_key() -> HeaderValue {
    // RandomState is seeded from the operating system's random source; the key is a nonce
    // that proves the upstream speaks WebSocket, not a secret.
    let mut bytes = [0u8; 16];
    for half in bytes.chunks_exact_mut(8) {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(0);
        half.copy_from_slice(&hasher.finish().to_le_bytes());
    }
    HeaderValue::from_str(&base64_encode(&bytes)).expect("base64 is a valid header value")
}

fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Waits for both sides to finish switching protocols, then copies bytes both ways until
/// both close, nothing moves for `idle`, or the connection signals its tunnels to close at
/// drain. Runs in its own task, so the request handler can return the 101 (or 200) that
/// lets the client switch. `guard` keeps the tunnel counted on its client connection until
/// the task ends.
pub fn spawn_tunnel(
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    mut guard: TunnelGuard,
    idle: Duration,
    upstream_name: String,
    path: String,
) {
    tokio::spawn(async move {
        let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(upstream = %upstream_name, %path, %error, "protocol upgrade failed after the switch was accepted");
                return;
            }
        };
        let activity = Activity::new();
        let mut downstream = Tracked { inner: TokioIo::new(downstream), activity: activity.clone() };
        let mut upstream = Tracked { inner: TokioIo::new(upstream), activity: activity.clone() };
        tracing::debug!(upstream = %upstream_name, %path, "upgraded connection open");

        let draining = tokio::select! {
            result = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => {
                match result {
                    Ok((sent, received)) => tracing::debug!(upstream = %upstream_name, %path, sent, received, "upgraded connection closed"),
                    Err(error) => tracing::debug!(upstream = %upstream_name, %path, %error, "upgraded connection ended with an error"),
                }
                false
            }
            () = activity.expired(idle) => {
                tracing::info!(upstream = %upstream_name, %path, idle = ?idle, "upgraded connection closed after the idle timeout");
                false
            }
            () = guard.closing() => true,
        };
        if draining {
            // The tunnel copies bytes without parsing WebSocket frames, so it cannot send a
            // close frame. A TLS close_notify (or END_STREAM on HTTP/2) shows the client that
            // the gateway ended the connection on purpose.
            tracing::info!(upstream = %upstream_name, %path, "closing an upgraded connection for the drain");
            let shutdown = async {
                let _ = downstream.shutdown().await;
                let _ = upstream.shutdown().await;
            };
            if tokio::time::timeout(DRAIN_SHUTDOWN_TIMEOUT, shutdown).await.is_err() {
                tracing::debug!(upstream = %upstream_name, %path, "peer did not take the close in time; dropping the connection");
            }
        }
        drop(guard);
    });
}

/// How long closing a tunnel at drain may wait for a peer that does not read.
const DRAIN_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// Time of the last byte moved in either direction, shared by both halves of a tunnel.
#[derive(Clone)]
struct Activity {
    start: Instant,
    last_millis: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Self { start: Instant::now(), last_millis: Arc::new(AtomicU64::new(0)) }
    }

    fn touch(&self) {
        let millis = self.start.elapsed().as_millis() as u64;
        self.last_millis.store(millis, Ordering::Relaxed);
    }

    /// Completes once `idle` has passed without a byte moving.
    async fn expired(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// An I/O stream that records activity on every read and write that moves bytes.
struct Tracked<T> {
    inner: T,
    activity: Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri("/v3/subscribe").version(version);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn genuine_upgrades() {
        let websocket = request(Version::HTTP_11, &[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(classify(&websocket).unwrap(), Some(UpgradeRequest::Http1(HeaderValue::from_static("websocket"))));

        let spdy = request(Version::HTTP_11, &[("connection", "Upgrade"), ("upgrade", "SPDY/3.1")]);
        assert_eq!(classify(&spdy).unwrap(), Some(UpgradeRequest::Http1(HeaderValue::from_static("SPDY/3.1"))));
    }

    #[test]
    fn not_upgrades() {
        let cases = [
            request(Version::HTTP_11, &[("upgrade", "websocket")]),
            request(Version::HTTP_11, &[("connection", "upgrade")]),
            request(Version::HTTP_11, &[("connection", "keep-alive"), ("upgrade", "websocket")]),
            request(Version::HTTP_11, &[("connection", "upgrade"), ("upgrade", "h2c")]),
            request(Version::HTTP_10, &[("connection", "upgrade"), ("upgrade", "websocket")]),
        ];
        for case in cases {
            assert_eq!(classify(&case).unwrap(), None, "{:?}", case.headers());
        }
    }

    #[test]
    fn connect_without_websocket_is_not_implemented() {
        let connect = Request::builder().method(Method::CONNECT).uri("example.com:443").body(()).unwrap();
        assert!(matches!(classify(&connect), Err(ProxyError::NotImplemented(_))));

        let mut other = Request::builder().method(Method::CONNECT).uri("https://gateway.test/x").body(()).unwrap();
        other.extensions_mut().insert(hyper::ext::Protocol::from_static("connect-udp"));
        assert!(matches!(classify(&other), Err(ProxyError::NotImplemented(_))));

        let mut websocket = Request::builder().method(Method::CONNECT).uri("https://gateway.test/x").body(()).unwrap();
        websocket.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
        assert_eq!(classify(&websocket).unwrap(), Some(UpgradeRequest::ExtendedConnect));
    }

    #[test]
    fn extended_connect_becomes_handshake() {
        let mut method = Method::CONNECT;
        let mut headers = HeaderMap::new();
        UpgradeRequest::ExtendedConnect.prepare_upstream(&mut method, &mut headers);
        assert_eq!(method, Method::GET);
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "upgrade");
        assert_eq!(headers[SEC_WEBSOCKET_VERSION], "13");
        assert_eq!(headers[SEC_WEBSOCKET_KEY].len(), 24);
        assert_ne!(headers[SEC_WEBSOCKET_KEY], websocket_key(), "keys must differ");
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64_encode(input.as_bytes()), expected);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn activity_expires_after_idle() {
        let activity = Activity::new();
        let idle = Duration::from_secs(1800);
        let waiter = tokio::spawn({
            let activity = activity.clone();
            async move { activity.expired(idle).await }
        });
        tokio::time::sleep(Duration::from_secs(1000)).await;
        activity.touch();
        tokio::time::sleep(Duration::from_secs(1000)).await;
        assert!(!waiter.is_finished(), "expired although a byte moved 1000 s ago");
        tokio::time::sleep(Duration::from_secs(801)).await;
        assert!(waiter.is_finished(), "still open 1801 s after the last byte");
    }
}
