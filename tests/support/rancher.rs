//! A stand-in for the Rancher server: HTTPS with the test certificate (so the gateway must
//! trust certs-test/ca.crt for it), HTTP/1.1 only, like Rancher behind its ingress.
//!
//! Ordinary requests get a JSON echo of what arrived (method, request target, headers,
//! body length) and a response that carries hop-by-hop headers, which the gateway must
//! remove. WebSocket upgrades get an echo socket that greets first, echoes text and binary
//! messages, closes with 4001 when sent `close-me`, and records the close frame it receives.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::repo_path;

/// First message the echo socket sends, before the client says anything.
pub const GREETING: &str = "hello from rancher";
/// Text message that makes the echo socket close with [`SERVER_CLOSE_CODE`].
pub const CLOSE_ME: &str = "close-me";
pub const SERVER_CLOSE_CODE: u16 = 4001;
pub const SERVER_CLOSE_REASON: &str = "server closing";

/// What the fixture saw, for assertions.
#[derive(Debug, Default)]
pub struct Seen {
    /// Headers of each WebSocket handshake, with its request target.
    pub upgrades: Vec<(String, HeaderMap)>,
    /// Close frames received from clients: (code, reason).
    pub client_closes: Vec<(u16, String)>,
    /// WebSocket sessions whose connection is still open.
    pub open_sockets: usize,
}

pub struct Rancher {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
}

impl Rancher {
    pub async fn start() -> Rancher {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(server_tls_config(&[b"http/1.1"])));
        let seen = Arc::new(Mutex::new(Seen::default()));

        let state = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let acceptor = acceptor.clone();
                let state = state.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let service = service_fn(move |request| handle(request, state.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Rancher { addr, seen }
    }

    /// Returns the upstream URL for the gateway's `[upstreams] rancher`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }
}

/// TLS server settings with the test certificate and the given ALPN protocols.
pub fn server_tls_config(alpn: &[&[u8]]) -> rustls::ServerConfig {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(repo_path("certs-test/tls.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(repo_path("certs-test/tls.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

async fn handle(request: Request<Incoming>, seen: Arc<Mutex<Seen>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let is_websocket = request
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if is_websocket {
        return Ok(accept_websocket(request, seen));
    }
    Ok(echo(request).await)
}

async fn echo(request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers.entry(name.to_string()).or_default().push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let echo = serde_json::json!({
        "method": parts.method.as_str(),
        "target": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or(""),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_length": body.len(),
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-fixture", "rancher")
        // Hop-by-hop headers that must not reach the gateway's client (RFC 9110 7.6.1).
        .header(header::CONNECTION, "x-upstream-hop")
        .header("x-upstream-hop", "1")
        .header("keep-alive", "timeout=5, max=100")
        .header("proxy-connection", "keep-alive")
        .body(Full::new(Bytes::from(echo.to_string())))
        .unwrap()
}

fn accept_websocket(mut request: Request<Incoming>, seen: Arc<Mutex<Seen>>) -> Response<Full<Bytes>> {
    let target = request.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    seen.lock().unwrap().upgrades.push((target, request.headers().clone()));
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return Response::builder().status(StatusCode::BAD_REQUEST).body(Full::new(Bytes::from("no key"))).unwrap();
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        seen.lock().unwrap().open_sockets += 1;
        serve_echo_socket(upgraded, &seen).await;
        seen.lock().unwrap().open_sockets -= 1;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-accept", tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn serve_echo_socket(upgraded: hyper::upgrade::Upgraded, seen: &Mutex<Seen>) {
    let mut socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    if socket.send(Message::text(GREETING)).await.is_err() {
        return;
    }
    while let Some(Ok(message)) = socket.next().await {
        match message {
            Message::Text(text) if text.as_str() == CLOSE_ME => {
                let frame = CloseFrame { code: CloseCode::from(SERVER_CLOSE_CODE), reason: SERVER_CLOSE_REASON.into() };
                let _ = socket.close(Some(frame)).await;
            }
            Message::Text(_) | Message::Binary(_) => {
                if socket.send(message).await.is_err() {
                    break;
                }
            }
            Message::Close(frame) => {
                let (code, reason) = frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                seen.lock().unwrap().client_closes.push((code, reason));
                // tungstenite replies to the close frame by itself on the next poll.
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
    // Go's TLS connections, Rancher's included, send close_notify when closed, but a dropped
    // rustls stream does not. The gateway passes an unclean end on to its client.
    let _ = tokio::io::AsyncWriteExt::shutdown(socket.get_mut()).await;
}
