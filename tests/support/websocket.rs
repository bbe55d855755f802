//! WebSocket clients that reach the Rancher fixture through the gateway, over an HTTP/1.1
//! Upgrade or an HTTP/2 extended CONNECT (RFC 8441). Every step returns an error instead of
//! panicking, so a long-running test can count failures. A step slower than [`STEP`] is an
//! error too.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::rancher::GREETING;
use super::{empty, tls_client_config, BoxError, TestBody};

/// Maximum wait for any one step on loopback.
pub const STEP: Duration = Duration::from_secs(10);

pub type Http1Socket = WebSocketStream<TlsStream<TcpStream>>;
pub type Http2Socket = WebSocketStream<TokioIo<Upgraded>>;

/// A WebSocket on an HTTP/2 stream, with the task that drives its connection. Aborting the
/// task drops the connection's TCP stream.
pub struct Http2Session {
    pub socket: Http2Socket,
    pub connection: JoinHandle<()>,
}

async fn within<T, E: Into<BoxError>>(description: &str, step: impl Future<Output = Result<T, E>>) -> Result<T, BoxError> {
    match tokio::time::timeout(STEP, step).await {
        Ok(result) => result.map_err(|error| format!("{description}: {}", error.into()).into()),
        Err(_) => Err(format!("{description}: timed out after {STEP:?}").into()),
    }
}

async fn tls_connect(port: u16, alpn: &[u8]) -> Result<TlsStream<TcpStream>, BoxError> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(true, &[alpn])));
    let tcp = within("TCP connect", TcpStream::connect(("127.0.0.1", port))).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    within("TLS handshake", connector.connect(name, tcp)).await
}

/// Opens a WebSocket with an HTTP/1.1 Upgrade to `target` and reads the fixture's greeting.
pub async fn open_http1(port: u16, target: &str) -> Result<Http1Socket, BoxError> {
    let tls = tls_connect(port, b"http/1.1").await?;
    let url = format!("wss://localhost:{port}{target}");
    let (mut socket, response) = within("WebSocket handshake", tokio_tungstenite::client_async(url, tls)).await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!("WebSocket handshake answered {}", response.status()).into());
    }
    expect_greeting(&mut socket).await?;
    Ok(socket)
}

/// Opens an HTTP/2 connection to the gateway and spawns the task that drives it.
pub async fn connect_http2(port: u16) -> Result<(SendRequest<TestBody>, JoinHandle<()>), BoxError> {
    let tls = tls_connect(port, b"h2").await?;
    let (sender, connection) = within(
        "HTTP/2 handshake",
        hyper::client::conn::http2::Builder::new(TokioExecutor::new()).handshake::<_, TestBody>(TokioIo::new(tls)),
    )
    .await?;
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((sender, connection))
}

/// Opens a WebSocket with an HTTP/2 extended CONNECT to `target` on a connection of its own
/// and reads the greeting.
pub async fn open_http2(port: u16, target: &str) -> Result<Http2Session, BoxError> {
    let (mut sender, connection) = connect_http2(port).await?;
    let socket = open_on_http2(&mut sender, port, target).await?;
    Ok(Http2Session { socket, connection })
}

/// Opens a WebSocket with an HTTP/2 extended CONNECT to `target` on the connection of
/// `sender`, and reads the greeting.
pub async fn open_on_http2(sender: &mut SendRequest<TestBody>, port: u16, target: &str) -> Result<Http2Socket, BoxError> {
    // The client may send extended CONNECT only after the server's SETTINGS allowed it
    // (RFC 8441 section 3). A completed request guarantees that they arrived.
    let warmup = Request::get(format!("https://localhost:{port}/v3/settings")).body(empty()).unwrap();
    let warmup = within("request before extended CONNECT", sender.send_request(warmup)).await?;
    if warmup.status() != StatusCode::OK {
        return Err(format!("request before extended CONNECT answered {}", warmup.status()).into());
    }

    let mut connect = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("https://localhost:{port}{target}"))
        .header("sec-websocket-version", "13")
        .body(empty())
        .unwrap();
    connect.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    let response = within("extended CONNECT", sender.send_request(connect)).await?;
    if response.status() != StatusCode::OK {
        return Err(format!("extended CONNECT answered {}", response.status()).into());
    }
    let upgraded = within("HTTP/2 stream as a tunnel", hyper::upgrade::on(response)).await?;
    let mut socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    expect_greeting(&mut socket).await?;
    Ok(socket)
}

/// Reads the next message. A closed stream is an error.
pub async fn next_message<S>(socket: &mut WebSocketStream<S>) -> Result<Message, BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(STEP, socket.next()).await {
        Err(_) => Err(format!("no WebSocket message within {STEP:?}").into()),
        Ok(None) => Err("WebSocket stream ended without a close frame".into()),
        Ok(Some(result)) => result.map_err(|error| format!("WebSocket read failed: {error}").into()),
    }
}

async fn expect_greeting<S>(socket: &mut WebSocketStream<S>) -> Result<(), BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match next_message(socket).await? {
        Message::Text(text) if text.as_str() == GREETING => Ok(()),
        other => Err(format!("expected the greeting, got {}", describe(&other)).into()),
    }
}

/// Builds `count` messages from `seed`: text and binary in turn, of sizes from a few bytes to
/// `max_binary`, so that the tunnel must carry both small frames and frames split over reads.
pub fn messages(seed: u64, count: usize, max_binary: usize) -> Vec<Message> {
    (0..count as u64)
        .map(|i| {
            let mixed = (seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i * 1_442_695_040_888_963_407)) >> 33;
            if i % 2 == 0 {
                let length = 1 + (mixed % 4096) as usize;
                let text: String = (0..length).map(|j| char::from(b'a' + ((j as u64 + mixed) % 26) as u8)).collect();
                Message::text(text)
            } else {
                let length = 1 + (mixed as usize % max_binary);
                Message::binary((0..length).map(|j| ((j as u64 * 131 + mixed) % 251) as u8).collect::<Vec<u8>>())
            }
        })
        .collect()
}

/// Sends each message and expects it back byte for byte. Returns the bytes echoed.
pub async fn echo_all<S>(socket: &mut WebSocketStream<S>, messages: Vec<Message>) -> Result<u64, BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut bytes = 0;
    for message in messages {
        within("WebSocket send", socket.send(message.clone())).await?;
        let echoed = next_message(socket).await?;
        if echoed != message {
            return Err(format!("echo differs: sent {}, received {}", describe(&message), describe(&echoed)).into());
        }
        bytes += message.len() as u64;
    }
    Ok(bytes)
}

/// Runs the closing handshake from the client side: sends a normal close, expects the
/// fixture's close frame back, then the end of the stream.
pub async fn close_cleanly<S>(socket: &mut WebSocketStream<S>) -> Result<(), BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let frame = CloseFrame { code: CloseCode::Normal, reason: "done".into() };
    within("WebSocket close", socket.close(Some(frame))).await?;
    match next_message(socket).await? {
        Message::Close(Some(frame)) if frame.code == CloseCode::Normal => {}
        other => return Err(format!("expected the echoed close frame, got {}", describe(&other)).into()),
    }
    match tokio::time::timeout(STEP, socket.next()).await {
        Err(_) => Err(format!("the stream did not end within {STEP:?} after the close handshake").into()),
        Ok(None) | Ok(Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed))) => Ok(()),
        Ok(Some(Ok(message))) => Err(format!("a message after the close handshake: {}", describe(&message)).into()),
        Ok(Some(Err(error))) => Err(format!("the stream failed after the close handshake: {error}").into()),
    }
}

/// Describes a message by kind and length, since a payload can be megabytes long.
pub fn describe(message: &Message) -> String {
    match message {
        Message::Text(text) if text.len() <= 64 => format!("text {:?}", text.as_str()),
        Message::Text(text) => format!("text of {} bytes", text.len()),
        Message::Binary(data) => format!("binary of {} bytes", data.len()),
        Message::Close(frame) => format!("close {frame:?}"),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => format!("{message:?}"),
    }
}
