//! Upstreams that refuse, cannot be resolved, present an untrusted certificate, hang,
//! reset or cut a response short. Before the response starts the client gets a clear 502
//! or 504; after it started the client sees an aborted stream, never a clean end.

mod support;

use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use support::fixtures::*;
use support::*;

fn gateway_for(url: &str) -> Gateway {
    Gateway::start(&format!("[upstreams]\nharbor_core = \"{url}\"\n"))
}

async fn get(client: &HttpsClient, url: String) -> http::Response<hyper::body::Incoming> {
    client.request(Request::get(&url).body(empty()).unwrap()).await.unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Asserts a gateway-made registry error with `status` whose message contains `text`.
async fn assert_registry_error(response: http::Response<hyper::body::Incoming>, status: StatusCode, text: &str) {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["docker-distribution-api-version"], "registry/2.0");
    let body = body_text(response.into_body()).await;
    assert!(body.starts_with("{\"errors\":[{\"code\":\"UNAVAILABLE\""), "{body}");
    assert!(body.contains(text), "expected {text:?} in {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unresolvable_upstream_gives_502() {
    // A label longer than 63 bytes fails inside the resolver library, so no DNS query
    // leaves the machine.
    let host = format!("{}.invalid", "a".repeat(70));
    let gateway = Gateway::start(&format!("[upstreams]\nharbor_core = \"http://{host}:5000\"\n"));
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let response = get(&https_client(protocol), gateway.url("/v2/")).await;
        assert_registry_error(response, StatusCode::BAD_GATEWAY, "unreachable").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_upstream_certificate_gives_502() {
    let upstream = TlsUpstream::start();
    let gateway = Gateway::start(&format!("[upstreams]\nharbor_core = \"{}\"\n", upstream.url()));
    let response = get(&https_client(Protocol::Http1), gateway.url("/v2/")).await;
    assert_registry_error(response, StatusCode::BAD_GATEWAY, "unreachable").await;
    assert!(gateway.process.log_text().contains("UnknownIssuer"), "{}", gateway.process.log_text());

    // The same upstream works once its CA is configured, so the failure above was the
    // certificate check and nothing else.
    let trusting = Gateway::start(&format!(
        "[upstreams]\nharbor_core = \"{}\"\n[upstream_tls]\nca_file = \"{}\"\n",
        upstream.url(),
        ca_file().display()
    ));
    let response = get(&https_client(Protocol::Http1), trusting.url("/v2/")).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_upstream_gives_504() {
    let upstream = Upstream::start(Behavior::Hang);
    let gateway = Gateway::start(&format!("[upstreams]\nharbor_core = \"{}\"\n[timeouts]\nregistry_idle = 1\n", upstream.url()));
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let started = Instant::now();
        let response = tokio::time::timeout(Duration::from_secs(10), get(&https_client(protocol), gateway.url("/v2/")))
            .await
            .unwrap_or_else(|_| panic!("{protocol:?}: no response 10 s after the request, expected 504 after 1 s"));
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        let body = body_text(response.into_body()).await;
        assert!(body.contains("did not respond within 1 s"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_before_response_gives_502() {
    let upstream = Upstream::start(Behavior::ResetBeforeResponse);
    let gateway = gateway_for(&upstream.url());
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let response = get(&https_client(protocol), gateway.url("/v2/")).await;
        assert_registry_error(response, StatusCode::BAD_GATEWAY, "failed to answer").await;
    }
}

/// Reads a body to its end and returns the error that ended it, if any.
async fn body_error(response: http::Response<hyper::body::Incoming>) -> (usize, Option<String>) {
    let mut body = response.into_body();
    let mut length = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => length += frame.data_ref().map_or(0, |d| d.len()),
            Err(error) => return (length, Some(format!("{error:?}"))),
        }
    }
    (length, None)
}

async fn assert_truncated_body_is_an_error(behavior: Behavior) {
    let upstream = Upstream::start(behavior);
    let gateway = Gateway::start(&format!("[upstreams]\nharbor_core = \"{}\"\n[timeouts]\nregistry_idle = 2\n", upstream.url()));
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let response = get(&https_client(protocol), gateway.url("/v2/x/blobs/sha256:0")).await;
        assert_eq!(response.status(), StatusCode::OK, "{behavior:?} {protocol:?}");
        let (length, error) = body_error(response).await;
        assert!(length < 1_000_000, "{behavior:?} {protocol:?}: a complete-looking body of {length} bytes");
        let error = error.unwrap_or_else(|| panic!("{behavior:?} {protocol:?}: the body ended cleanly after {length} bytes"));
        if protocol == Protocol::Http2 {
            assert!(error.contains("INTERNAL_ERROR") || error.contains("Reset"), "{behavior:?}: expected a stream reset: {error}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_mid_body_aborts_stream() {
    assert_truncated_body_is_an_error(Behavior::ResetMidBody).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn short_content_length_aborts_stream() {
    assert_truncated_body_is_an_error(Behavior::ShortContentLength).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unfinished_chunked_body_aborts_stream() {
    assert_truncated_body_is_an_error(Behavior::ShortChunked).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_body_aborts_stream() {
    assert_truncated_body_is_an_error(Behavior::HangMidBody).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_upstream_leaves_others_alone() {
    let core = Upstream::start(Behavior::Hang);
    let rancher = Upstream::start(Behavior::Ok);
    let gateway = Gateway::start(&format!(
        "[upstreams]\nharbor_core = \"{}\"\nrancher = \"{}\"\n[timeouts]\nregistry_idle = 20\n",
        core.url(),
        rancher.url()
    ));
    let client = https_client(Protocol::Http2);

    // 100 registry requests hang on Harbor while Rancher is used.
    let mut hanging = Vec::new();
    for index in 0..100 {
        let request = client.request(Request::get(gateway.url(&format!("/v2/r/manifests/{index}"))).body(empty()).unwrap());
        hanging.push(tokio::spawn(request));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..20 {
        let started = Instant::now();
        let response = get(&https_client(Protocol::Http1), gateway.url("/dashboard/")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(started.elapsed() < Duration::from_millis(500), "Rancher slowed to {:?}", started.elapsed());
    }
    assert!(hanging.iter().all(|task| !task.is_finished()));
    assert_eq!(core.request_count(), 100);

    // The reverse: Rancher refuses connections while the registry keeps working.
    let dead = free_port();
    let registry = Upstream::start(Behavior::Ok);
    let gateway = Gateway::start(&format!(
        "[upstreams]\nharbor_core = \"{}\"\nrancher = \"http://127.0.0.1:{dead}\"\n",
        registry.url()
    ));
    let response = get(&client, gateway.url("/dashboard/")).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let response = get(&client, gateway.url("/v2/")).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_gone_mid_upload_aborts_upstream() {
    let upstream = Upstream::start(Behavior::Ok);
    let gateway = gateway_for(&upstream.url());

    {
        let mut tls = tls_connect(gateway.port, "http/1.1").await;
        assert!(write_tolerant(&mut tls, b"PUT /v2/x/blobs/uploads/1?digest=sha256:0 HTTP/1.1\r\nhost: localhost\r\ncontent-length: 1000000\r\n\r\n").await);
        assert!(write_tolerant(&mut tls, &[b'u'; 300_000]).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Dropping the stream closes the TCP connection without a TLS close_notify.
    }

    // The upstream receives an incomplete body at once, well before any idle timeout.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let recorded = upstream.requests();
        if recorded.len() == 1 && !recorded[0].complete && !recorded[0].body.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the upstream request was not aborted: {recorded:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The aborted connection is not reused: the next request gets a fresh, working one.
    let response = get(&https_client(Protocol::Http1), gateway.url("/v2/")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(upstream.connection_count(), 2, "the aborted upstream connection went back to the pool");
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_discards_aborted_upload() {
    let registry = Registry::start();
    let gateway = Gateway::in_front_of(&registry);
    let client = https_client(Protocol::Http1);
    let data = vec![7u8; 2 << 20];
    let digest = sha256_digest(&data);

    let started = client
        .request(Request::post(gateway.url("/v2/aborted/blobs/uploads/")).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let target = location.strip_prefix(&gateway.url("")).unwrap().to_string();

    {
        let mut tls = tls_connect(gateway.port, "http/1.1").await;
        let head = format!(
            "PUT {target}&digest={digest} HTTP/1.1\r\nhost: localhost:{}\r\ncontent-length: {}\r\n\r\n",
            gateway.port,
            data.len()
        );
        assert!(write_tolerant(&mut tls, head.as_bytes()).await);
        assert!(write_tolerant(&mut tls, &data[..data.len() / 2]).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let head = client
        .request(Request::head(gateway.url(&format!("/v2/aborted/blobs/{digest}"))).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND, "the registry committed a half-sent blob");

    // The same upload completes when sent whole, over the same gateway and pool.
    let started = client
        .request(Request::post(gateway.url("/v2/aborted/blobs/uploads/")).body(empty()).unwrap())
        .await
        .unwrap();
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let done = client
        .request(Request::builder().method(Method::PUT).uri(format!("{location}&digest={digest}")).body(full(data)).unwrap())
        .await
        .unwrap();
    assert_eq!(done.status(), StatusCode::CREATED);
}

/// Starts a raw HTTP/1.1 upstream that reads a `Content-Length` body at about 2.5 MB/s for
/// its first 5 s and at full speed after that, then responds with 201 and the number of
/// body bytes it read. The fast end keeps the wait short after the gateway's last body frame,
/// when the kernel's socket buffers can still hold megabytes.
async fn slow_reading_upstream() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else { return };
        let mut received = Vec::new();
        let mut piece = vec![0u8; 64 << 10];
        let head_end = loop {
            let n = stream.read(&mut piece[..1024]).await.unwrap();
            assert!(n > 0, "the gateway closed within the request head");
            received.extend_from_slice(&piece[..n]);
            if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .map(|value| value.trim().parse().unwrap())
            .expect("the upload has a Content-Length");
        let mut body = received.len() - head_end;
        let slow_until = Instant::now() + Duration::from_secs(5);
        while body < length {
            let n = stream.read(&mut piece).await.unwrap();
            if n == 0 {
                break;
            }
            body += n;
            if Instant::now() < slow_until {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        let text = format!("read {body}");
        let response = format!("HTTP/1.1 201 Created\r\ncontent-length: {}\r\n\r\n{text}", text.len());
        let _ = stream.write_all(response.as_bytes()).await;
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_reading_upstream_gets_whole_upload() {
    // The upstream reads slowly for 5 s, more than twice registry_idle. The body is larger
    // than what it reads in that time plus what socket buffers hold, so frames keep moving
    // all the while and the wait for its response must not expire.
    let port = slow_reading_upstream().await;
    let gateway = Gateway::start(&format!(
        "[upstreams]\nharbor_core = \"http://127.0.0.1:{port}\"\n[timeouts]\nregistry_idle = 2\n"
    ));
    let data = vec![9u8; 32 << 20];
    let started = Instant::now();
    let request = Request::put(gateway.url("/v2/x/blobs/uploads/1?digest=sha256:0")).body(full(data)).unwrap();
    let response = https_client(Protocol::Http1).request(request).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), StatusCode::CREATED, "after {elapsed:?}");
    assert_eq!(body_text(response.into_body()).await, format!("read {}", 32 << 20));
    assert!(elapsed > Duration::from_secs(4), "the upstream read too fast to test anything: {elapsed:?}");
}
