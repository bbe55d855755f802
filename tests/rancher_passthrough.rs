//! Everything that is not Harbor's reaches Rancher unchanged: ordinary requests with clean
//! hop-by-hop handling, WebSockets over HTTP/1.1 upgrades and HTTP/2 extended CONNECT, and
//! Rancher keeps working with the Harbor routes switched off.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::rancher::{Rancher, CLOSE_ME, GREETING, SERVER_CLOSE_CODE, SERVER_CLOSE_REASON};
use support::*;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Every step of these tests is local; anything slower than this is a hang.
const STEP: Duration = Duration::from_secs(10);

/// Headers that apply to one connection only (RFC 9110 section 7.6.1), plus the ones the
/// fixtures name in `Connection`.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-upstream-hop",
    "x-client-hop",
];

fn gateway_for(rancher: &Rancher, extra: &str) -> Gateway {
    Gateway::start(&format!(
        "[upstreams]\nrancher = \"{}\"\n[upstream_tls]\nca_file = \"{}\"\n{extra}",
        rancher.url(),
        ca_file().display()
    ))
}

/// Opens a TLS connection to the gateway that trusts the test CA and offers one ALPN protocol.
async fn tls_connect(port: u16, alpn: &[u8]) -> TlsStream<TcpStream> {
    support::fixtures::tls_connect(port, std::str::from_utf8(alpn).unwrap()).await
}

async fn websocket(gateway: &Gateway, target: &str) -> (WebSocketStream<TlsStream<TcpStream>>, http::Response<Option<Vec<u8>>>) {
    let tls = tls_connect(gateway.port, b"http/1.1").await;
    let url = format!("wss://localhost:{}{target}", gateway.port);
    tokio::time::timeout(STEP, tokio_tungstenite::client_async(url, tls))
        .await
        .expect("WebSocket handshake timed out")
        .expect("WebSocket handshake through the gateway")
}

async fn next_message<S>(socket: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(STEP, socket.next())
        .await
        .expect("no WebSocket message within 10 s")
        .expect("WebSocket closed without a close frame")
        .expect("WebSocket read failed")
}

/// Sends text and binary messages and expects each back unchanged.
async fn assert_echo<S>(socket: &mut WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    socket.send(Message::text("ping through the gateway")).await.unwrap();
    assert_eq!(next_message(socket).await, Message::text("ping through the gateway"));

    let binary: Vec<u8> = (0..=255u8).collect();
    socket.send(Message::binary(binary.clone())).await.unwrap();
    assert_eq!(next_message(socket).await, Message::binary(binary));

    // Larger than any single read, so the tunnel must stream it in pieces.
    let large: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 251) as u8).collect();
    socket.send(Message::binary(large.clone())).await.unwrap();
    assert_eq!(next_message(socket).await, Message::binary(large));
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_over_http1_relays_frames() {
    let rancher = Rancher::start().await;
    let gateway = gateway_for(&rancher, "");

    let (mut socket, response) = websocket(&gateway, "/v3/subscribe?sockId=1&namespace=%2Fx").await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(next_message(&mut socket).await, Message::text(GREETING));
    assert_echo(&mut socket).await;

    // Client-initiated close: the fixture must see our code, and we must see its reply.
    let close = CloseFrame { code: CloseCode::from(4000), reason: "bye".into() };
    socket.close(Some(close)).await.unwrap();
    match next_message(&mut socket).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4000),
        other => panic!("expected the echoed close frame, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let seen = rancher.seen.lock().unwrap();
    assert_eq!(seen.client_closes, vec![(4000, "bye".to_string())]);
    let (target, headers) = &seen.upgrades[0];
    assert_eq!(target, "/v3/subscribe?sockId=1&namespace=%2Fx");
    assert_eq!(headers["upgrade"], "websocket");
    assert!(headers["connection"].to_str().unwrap().to_ascii_lowercase().contains("upgrade"));
    assert_eq!(headers["host"], format!("localhost:{}", gateway.port).as_str());
    assert_eq!(headers["x-forwarded-proto"], "https");
    assert_eq!(headers["x-forwarded-port"], gateway.port.to_string().as_str());
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert!(headers.contains_key("sec-websocket-key"));
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_server_close_relayed() {
    let rancher = Rancher::start().await;
    let gateway = gateway_for(&rancher, "");

    let (mut socket, _) = websocket(&gateway, "/v1/subscribe").await;
    assert_eq!(next_message(&mut socket).await, Message::text(GREETING));
    socket.send(Message::text(CLOSE_ME)).await.unwrap();
    match next_message(&mut socket).await {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), SERVER_CLOSE_CODE);
            assert_eq!(frame.reason.as_str(), SERVER_CLOSE_REASON);
        }
        other => panic!("expected the server's close frame, got {other:?}"),
    }
    // After the close handshake the stream ends instead of hanging.
    let end = tokio::time::timeout(STEP, socket.next()).await.expect("stream did not end after close");
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_over_http2_extended_connect() {
    let rancher = Rancher::start().await;
    let gateway = gateway_for(&rancher, "");

    let tls = tls_connect(gateway.port, b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, TestBody>(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);

    // An ordinary request first, so the client has the server's SETTINGS, which must
    // allow extended CONNECT (RFC 8441 section 3).
    let warmup = Request::get(format!("https://localhost:{}/v3/settings", gateway.port)).body(empty()).unwrap();
    assert_eq!(sender.send_request(warmup).await.unwrap().status(), StatusCode::OK);

    let mut connect = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("https://localhost:{}/v3/subscribe?sockId=2", gateway.port))
        .header("sec-websocket-version", "13")
        .body(empty())
        .unwrap();
    connect.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    let response = tokio::time::timeout(STEP, sender.send_request(connect)).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK, "extended CONNECT must answer 200");
    assert!(response.headers().get("sec-websocket-accept").is_none());

    let upgraded = hyper::upgrade::on(response).await.expect("HTTP/2 stream as a tunnel");
    let mut socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    assert_eq!(next_message(&mut socket).await, Message::text(GREETING));
    assert_echo(&mut socket).await;
    socket.close(Some(CloseFrame { code: CloseCode::Normal, reason: "done".into() })).await.unwrap();
    assert!(matches!(next_message(&mut socket).await, Message::Close(Some(_))));

    let seen = rancher.seen.lock().unwrap();
    let (target, headers) = &seen.upgrades[0];
    assert_eq!(target, "/v3/subscribe?sockId=2");
    assert_eq!(headers["upgrade"], "websocket");
    assert_eq!(headers["sec-websocket-version"], "13");
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_connect_not_implemented() {
    let rancher = Rancher::start().await;
    let gateway = gateway_for(&rancher, "");

    let mut tls = tls_connect(gateway.port, b"http/1.1").await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").await.unwrap();
    let mut reply = vec![0u8; 1024];
    let n = tokio::time::timeout(STEP, tls.read(&mut reply)).await.unwrap().unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 501"), "{reply}");
    assert!(reply.contains("CONNECT tunnels are not supported"), "{reply}");
}

/// Sends a request that must reach Rancher; returns the response headers and the
/// fixture's JSON echo of the request.
async fn send_to_rancher(client: &HttpsClient, request: Request<TestBody>) -> (http::HeaderMap, serde_json::Value) {
    let response = tokio::time::timeout(STEP, client.request(request)).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-fixture"], "rancher");
    let headers = response.headers().clone();
    let echo: serde_json::Value = serde_json::from_str(&body_text(response.into_body()).await).unwrap();
    (headers, echo)
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_requests_unchanged_without_hop_headers() {
    let rancher = Rancher::start().await;
    let gateway = gateway_for(&rancher, "");

    for protocol in [Protocol::Http1, Protocol::Http2] {
        let client = https_client(protocol);
        let target = "/v3/clusters/c-abc12?action=generateKubeconfig&q=%2Fa%3Db";
        let mut request = Request::builder()
            .method(Method::PATCH)
            .uri(gateway.url(target))
            .header("x-forwarded-proto", "http")
            .header("x-forwarded-for", "10.9.9.9");
        if protocol == Protocol::Http1 {
            // A WebSocket-looking request without `Connection: upgrade` is not an upgrade.
            request = request
                .header("connection", "x-client-hop")
                .header("x-client-hop", "1")
                .header("keep-alive", "timeout=300")
                .header("proxy-connection", "keep-alive")
                .header("upgrade", "websocket");
        }
        let (headers, echo) = send_to_rancher(&client, request.body(full("{\"a\":1}")).unwrap()).await;

        assert_eq!(echo["method"], "PATCH", "{protocol:?}");
        assert_eq!(echo["target"], target, "{protocol:?}");
        assert_eq!(echo["body_length"], 7, "{protocol:?}");
        let sent = &echo["headers"];
        assert_eq!(sent["host"][0], format!("localhost:{}", gateway.port), "{protocol:?}");
        assert_eq!(sent["x-forwarded-proto"][0], "https", "{protocol:?}");
        assert_eq!(sent["x-forwarded-port"][0], gateway.port.to_string(), "{protocol:?}");
        assert_eq!(sent["x-forwarded-host"][0], format!("localhost:{}", gateway.port), "{protocol:?}");
        assert_eq!(sent["x-forwarded-for"][0], "127.0.0.1", "{protocol:?}");
        for name in HOP_BY_HOP {
            assert!(sent.get(*name).is_none(), "{protocol:?}: {name} reached Rancher: {sent}");
            assert!(headers.get(*name).is_none(), "{protocol:?}: {name} reached the client: {headers:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rancher_paths_beside_harbor_carve_outs() {
    let rancher = Rancher::start().await;
    let gateway = gateway_for(&rancher, "");
    let client = https_client(Protocol::Http2);

    for target in ["/", "/dashboard/home", "/api/v1/namespaces?limit=5", "/c/local/explorer", "/c/c-abc12/apps", "/k8s/clusters/local/api"] {
        let request = Request::get(gateway.url(target)).body(empty()).unwrap();
        let (_, echo) = send_to_rancher(&client, request).await;
        assert_eq!(echo["target"], target);
        assert_eq!(echo["method"], "GET");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn harbor_disabled_keeps_rancher() {
    let rancher = Rancher::start().await;
    let gateway = gateway_for(&rancher, "[harbor]\nenabled = false\n");
    let client = https_client(Protocol::Http1);

    let registry = client.request(Request::get(gateway.url("/v2/")).body(empty()).unwrap()).await.unwrap();
    assert_eq!(registry.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(registry.headers()["docker-distribution-api-version"], "registry/2.0");
    assert!(registry.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let json: serde_json::Value = serde_json::from_str(&body_text(registry.into_body()).await).unwrap();
    assert_eq!(json["errors"][0]["code"], "UNAVAILABLE");
    assert!(json["errors"][0]["message"].as_str().unwrap().contains("registry is disabled"), "{json}");

    let portal = client.request(Request::get(gateway.url("/registry/")).body(empty()).unwrap()).await.unwrap();
    assert_eq!(portal.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(portal.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let page = body_text(portal.into_body()).await;
    assert!(page.contains("registry is disabled"), "{page}");

    for path in ["/registry", "/api/v2.0/projects", "/c/login", "/service/token"] {
        let response = client.request(Request::get(gateway.url(path)).body(empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
    }

    let request = Request::get(gateway.url("/v3/settings")).body(empty()).unwrap();
    let (_, echo) = send_to_rancher(&client, request).await;
    assert_eq!(echo["target"], "/v3/settings");
    let (mut socket, _) = websocket(&gateway, "/v1/subscribe").await;
    assert_eq!(next_message(&mut socket).await, Message::text(GREETING));
}
