//! WebSocket tunnels and the gateway's connection limits. A tunnel keeps its slot under
//! `limits.max_connections` until it ends. The drain at SIGTERM closes open tunnels instead
//! of waiting for them, after the other requests on their connection, so it ends well
//! within the drain period.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::fixtures::read_to_close;
use support::ops::{send_signal, start_gateway, wait_for_exit, wait_until};
use support::rancher::Rancher;
use support::websocket::{close_cleanly, connect_http2, echo_all, messages, open_http1, open_http2, open_on_http2, STEP};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::Error as WsError;

/// Drain period of these tests, long enough that a drain that runs to its deadline differs
/// clearly from one that ends because every tunnel was closed.
const DRAIN_SECONDS: u64 = 10;

fn rancher_config(rancher: &Rancher, extra: &str) -> String {
    format!(
        "[upstreams]\nrancher = \"{}\"\n[upstream_tls]\nca_file = \"{}\"\n{extra}",
        rancher.url(),
        ca_file().display()
    )
}

/// Waits for the gateway to exit after SIGTERM, and checks that it exited 0, well before the
/// drain deadline, after closing every connection. Returns its log.
fn assert_quick_drain(gateway: &mut Gateway, signalled: Instant) -> String {
    let status = wait_for_exit(gateway, Duration::from_secs(DRAIN_SECONDS + 5));
    let log = gateway.process.log_text();
    assert_eq!(status.code(), Some(0), "{log}");
    let elapsed = signalled.elapsed();
    assert!(elapsed < Duration::from_secs(DRAIN_SECONDS / 2), "the drain took {elapsed:?}, waiting for the tunnel\n{log}");
    assert!(log.contains("all connections closed; exiting"), "{log}");
    log
}

#[tokio::test(flavor = "multi_thread")]
async fn tunnel_holds_connection_slot() {
    let rancher = Rancher::start().await;
    let gateway = Gateway::start(&rancher_config(&rancher, "[limits]\nmax_connections = 1\n"));
    let mut socket = open_http1(gateway.port, "/v3/subscribe").await.expect("WebSocket through the gateway");

    let port = gateway.port;
    let second = tokio::spawn(async move { support::fixtures::tls_connect(port, "http/1.1").await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!second.is_finished(), "a second connection was served while a tunnel held the only slot");
    echo_all(&mut socket, messages(1, 4, 4096)).await.expect("the tunnel still works while another client waits");

    close_cleanly(&mut socket).await.expect("clean close");
    drop(socket);
    let mut second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the waiting connection is served once the tunnel closes")
        .unwrap();
    second.write_all(b"GET /v3/settings HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await.unwrap();
    let (data, closed) = read_to_close(&mut second, STEP).await;
    assert!(closed, "the response did not end");
    let response = String::from_utf8_lossy(&data);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_closes_http1_tunnel() {
    let rancher = Rancher::start().await;
    let mut gateway = start_gateway(&rancher_config(&rancher, &format!("[timeouts]\ndrain = {DRAIN_SECONDS}\n")), "text");
    let mut socket = open_http1(gateway.port, "/v3/subscribe").await.expect("WebSocket through the gateway");
    echo_all(&mut socket, messages(2, 4, 4096)).await.expect("echo before the drain");

    let signalled = Instant::now();
    send_signal(&gateway, "TERM");
    // The gateway cannot send a close frame into a byte tunnel, so the stream ends with a
    // TLS close_notify, which tungstenite reports as a reset without a closing handshake.
    // A process that exits with the tunnel still open gives an unexpected end of file.
    let end = tokio::time::timeout(STEP, socket.next()).await.expect("the tunnel was not closed by the drain");
    assert!(
        matches!(end, Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)))),
        "expected a TLS close_notify, got {end:?}"
    );

    let log = assert_quick_drain(&mut gateway, signalled);
    assert!(log.contains("closing an upgraded connection for the drain"), "{log}");
    // The fixture notices the closed upstream connection in a task of its own.
    wait_until(Duration::from_secs(2), "the upstream side of the tunnel to close", || {
        std::future::ready(rancher.seen.lock().unwrap().open_sockets == 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_closes_http2_tunnel() {
    let rancher = Rancher::start().await;
    let mut gateway = start_gateway(&rancher_config(&rancher, &format!("[timeouts]\ndrain = {DRAIN_SECONDS}\n")), "text");
    let mut session = open_http2(gateway.port, "/v3/subscribe").await.expect("WebSocket through the gateway");
    echo_all(&mut session.socket, messages(3, 4, 4096)).await.expect("echo before the drain");

    let signalled = Instant::now();
    send_signal(&gateway, "TERM");
    let end = tokio::time::timeout(STEP, session.socket.next()).await.expect("the tunnel was not closed by the drain");
    assert!(!matches!(end, Some(Ok(_))), "expected the stream to end, got {end:?}");

    let log = assert_quick_drain(&mut gateway, signalled);
    assert!(log.contains("closing an upgraded connection for the drain"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_closes_http2_tunnel_after_requests() {
    let rancher = Rancher::start().await;
    let mut gateway = start_gateway(&rancher_config(&rancher, &format!("[timeouts]\ndrain = {DRAIN_SECONDS}\n")), "text");
    let (mut sender, _connection) = connect_http2(gateway.port).await.expect("HTTP/2 connection to the gateway");
    let mut socket = open_on_http2(&mut sender, gateway.port, "/v3/subscribe").await.expect("WebSocket through the gateway");

    // An upload on the same connection whose body the test keeps open. The Rancher fixture
    // reads the whole body before it responds, so the request stays in flight.
    let (chunks, receiver) = tokio::sync::mpsc::channel::<Bytes>(1);
    let frames = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let chunk = receiver.recv().await?;
        Some((Ok::<_, BoxError>(Frame::data(chunk)), receiver))
    });
    let upload = Request::builder()
        .method(Method::PUT)
        .uri(format!("https://localhost:{}/v3/uploads/held", gateway.port))
        .body(StreamBody::new(frames).boxed_unsync())
        .unwrap();
    let response = tokio::spawn(sender.send_request(upload));
    chunks.send(Bytes::from_static(b"first part ")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    send_signal(&gateway, "TERM");
    tokio::time::sleep(Duration::from_secs(1)).await;
    echo_all(&mut socket, messages(4, 4, 4096))
        .await
        .expect("the tunnel stays open while a request on its connection is in flight");

    chunks.send(Bytes::from_static(b"second part")).await.unwrap();
    drop(chunks);
    let response = tokio::time::timeout(STEP, response).await.expect("upload response").unwrap().expect("upload through the drain");
    assert_eq!(response.status(), StatusCode::OK);
    let echo: serde_json::Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echo["body_length"], 22, "{echo}");

    let end = tokio::time::timeout(STEP, socket.next()).await.expect("the tunnel was not closed after the upload ended");
    assert!(!matches!(end, Some(Ok(_))), "expected the stream to end, got {end:?}");
    assert_quick_drain(&mut gateway, signalled);
}
