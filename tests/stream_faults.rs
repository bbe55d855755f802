//! An upstream that fails before or during a response: the client gets a clear error
//! status, or an aborted stream, never a body that looks complete.

mod support;

use std::time::Duration;

use http::{Request, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the raw upstream does after reading a request.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Promises 1 MiB, sends 1000 bytes, closes.
    ShortBody,
    /// Sends headers and 1000 bytes of a 1 MiB body, then goes silent.
    StallMidBody,
    /// Reads the request and never responds.
    NeverAnswer,
}

/// Starts a raw HTTP/1.1 upstream on an ephemeral port that fails in the given way.
async fn raw_upstream(behaviour: Behaviour) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 16 << 10];
                let _ = stream.read(&mut buffer).await;
                let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\n";
                match behaviour {
                    Behaviour::ShortBody => {
                        let _ = stream.write_all(head).await;
                        let _ = stream.write_all(&[7u8; 1000]).await;
                    }
                    Behaviour::StallMidBody => {
                        let _ = stream.write_all(head).await;
                        let _ = stream.write_all(&[7u8; 1000]).await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    Behaviour::NeverAnswer => tokio::time::sleep(Duration::from_secs(30)).await,
                }
            });
        }
    });
    port
}

fn gateway_for(port: u16) -> Gateway {
    Gateway::start(&format!(
        "[upstreams]\nharbor_core = \"http://127.0.0.1:{port}\"\n[timeouts]\nregistry_idle = 1\n"
    ))
}

async fn get_blob(gateway: &Gateway, protocol: Protocol) -> http::Response<hyper::body::Incoming> {
    let request = Request::get(gateway.url("/v2/a/blobs/sha256:00")).body(empty()).unwrap();
    https_client(protocol).request(request).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn short_upstream_body_aborts_download() {
    let gateway = gateway_for(raw_upstream(Behaviour::ShortBody).await);
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let response = get_blob(&gateway, protocol).await;
        assert_eq!(response.status(), StatusCode::OK, "{protocol:?}: headers were already sent");
        let result = hash_body(response.into_body()).await;
        assert!(result.is_err(), "{protocol:?}: truncated body ended cleanly: {result:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_upstream_body_aborts_after_idle() {
    let gateway = gateway_for(raw_upstream(Behaviour::StallMidBody).await);
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let response = get_blob(&gateway, protocol).await;
        let outcome = tokio::time::timeout(Duration::from_secs(10), hash_body(response.into_body())).await;
        let result = outcome.expect("the gateway should end a stalled body after the idle timeout");
        assert!(result.is_err(), "{protocol:?}: stalled body ended cleanly: {result:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_upstream_gives_json_504() {
    let gateway = gateway_for(raw_upstream(Behaviour::NeverAnswer).await);
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let response = get_blob(&gateway, protocol).await;
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{protocol:?}");
        assert_eq!(response.headers()["docker-distribution-api-version"], "registry/2.0");
        let body = body_text(response.into_body()).await;
        assert!(body.contains(r#""code":"UNAVAILABLE""#), "{body}");
        assert!(body.contains("did not respond within 1 s"), "{body}");
    }
}
