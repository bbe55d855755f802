//! Clients that are slow, oversized, ambiguous or confused, sent by these tests to a
//! gateway on loopback in front of recording upstreams. Each test checks both what the
//! client gets and that nothing it should not reach reached an upstream.

mod support;

use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode};
use support::fixtures::*;
use support::h2raw::{self, H2Connection};
use support::*;
use tokio::io::AsyncWriteExt;

/// A gateway with recording upstreams as Harbor core and as Rancher.
struct Setup {
    core: Upstream,
    rancher: Upstream,
    gateway: Gateway,
}

impl Setup {
    fn start(extra: &str) -> Setup {
        let core = Upstream::start(Behavior::Ok);
        let rancher = Upstream::start(Behavior::Ok);
        let gateway = Gateway::start(&format!(
            "[upstreams]\nharbor_core = \"{}\"\nrancher = \"{}\"\n{extra}",
            core.url(),
            rancher.url()
        ));
        Setup { core, rancher, gateway }
    }

    fn upstream_requests(&self) -> usize {
        self.core.request_count() + self.rancher.request_count()
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_header_is_cut() {
    let setup = Setup::start("[timeouts]\nheader_read = 1\n");
    let mut tls = tls_connect(setup.gateway.port, "http/1.1").await;
    tls.write_all(b"GET /v2/ HTTP/1.1\r\nhost: localhost\r\nx-slow: ").await.unwrap();
    let started = Instant::now();
    let mut closed = false;
    // One header byte every 300 ms: moving, but the header section never completes.
    for _ in 0..20 {
        if !write_tolerant(&mut tls, b"a").await {
            closed = true;
            break;
        }
        let (_, eof) = read_to_close(&mut tls, Duration::from_millis(300)).await;
        if eof {
            closed = true;
            break;
        }
    }
    assert!(closed, "the gateway kept a header section open for {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(4), "closed only after {:?}", started.elapsed());
    assert_eq!(setup.upstream_requests(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_handshake_is_cut() {
    let setup = Setup::start("[timeouts]\ntls_handshake = 1\n");
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", setup.gateway.port)).await.unwrap();
    let started = Instant::now();
    let (_, closed) = read_to_close(&mut tcp, Duration::from_secs(5)).await;
    assert!(closed, "a client that never starts TLS kept its connection");
    assert!(started.elapsed() < Duration::from_secs(3), "closed only after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed() {
    let setup = Setup::start("[timeouts]\nheader_read = 1\nkeep_alive = 1\n");

    // HTTP/1.1: one request, then silence.
    let mut tls = tls_connect(setup.gateway.port, "http/1.1").await;
    tls.write_all(get("/v2/").as_bytes()).await.unwrap();
    let started = Instant::now();
    let (data, closed) = read_to_close(&mut tls, Duration::from_secs(5)).await;
    assert_eq!(status_of(&String::from_utf8_lossy(&data)), 200);
    assert!(closed, "h1: the idle connection stayed open");
    assert!(started.elapsed() < Duration::from_secs(4), "h1 idle close after {:?}", started.elapsed());

    // HTTP/2: no stream at all; the gateway sends GOAWAY and closes.
    let mut h2 = H2Connection::open(setup.gateway.port).await;
    let started = Instant::now();
    let (frames, closed) = h2.read_frames(Duration::from_secs(5)).await;
    assert!(
        frames.iter().any(|f| f.kind == h2raw::GOAWAY),
        "no GOAWAY: {frames:?}\n{}",
        setup.gateway.process.log_text()
    );
    assert!(closed, "h2: the idle connection stayed open");
    assert!(started.elapsed() < Duration::from_secs(4), "h2 idle close after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn kept_alive_h1_waits_header_read() {
    // keep_alive is 60 s, so only the header read timeout, which also runs while hyper
    // waits for the next request line, can close this connection in time.
    let setup = Setup::start("[timeouts]\nheader_read = 1\nkeep_alive = 60\n");
    let mut tls = tls_connect(setup.gateway.port, "http/1.1").await;
    tls.write_all(get("/v2/").as_bytes()).await.unwrap();
    let started = Instant::now();
    let (data, closed) = read_to_close(&mut tls, Duration::from_secs(5)).await;
    assert_eq!(status_of(&String::from_utf8_lossy(&data)), 200);
    assert!(closed, "a kept-alive connection with no next request stayed open");
    assert!(started.elapsed() < Duration::from_secs(4), "closed only after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn long_request_keeps_connection() {
    // keep_alive counts only time with no request in flight: a response that takes longer
    // than keep_alive must not be cut.
    let hang = Upstream::start(Behavior::Hang);
    let gateway = Gateway::start(&format!(
        "[upstreams]\nharbor_core = \"{}\"\n[timeouts]\nkeep_alive = 1\nregistry_idle = 3\n",
        hang.url()
    ));
    let mut h2 = H2Connection::open(gateway.port).await;
    let authority = format!("localhost:{}", gateway.port);
    let block = h2raw::header_block(&h2raw::get_fields("/v2/", &authority, &[]));
    h2.send(&h2raw::encode_frame(h2raw::HEADERS, h2raw::END_HEADERS | h2raw::END_STREAM, 1, &block)).await;
    let (frames, _) = h2.read_frames(Duration::from_secs(6)).await;
    let response = frames.iter().position(|f| f.kind == h2raw::HEADERS && f.stream == 1);
    let response = response.unwrap_or_else(|| {
        panic!("the stream got no response (expected 504 after 3 s, not a keep-alive close): {frames:?}")
    });
    // A GOAWAY is due 1 s after the response ends, never while the request is in flight.
    let goaway = frames.iter().position(|f| f.kind == h2raw::GOAWAY);
    assert!(goaway.is_none_or(|at| at > response), "GOAWAY while the request was in flight: {frames:?}");
    assert!(data_has(&frames, 1, "did not respond within 3 s"), "{frames:?}");
}

fn data_has(frames: &[h2raw::Frame], stream: u32, text: &str) -> bool {
    h2raw::data_text(frames, stream).contains(text)
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_moving_upload_completes() {
    // registry_idle is 1 s, the upload takes about 3 s in total and never pauses for 1 s.
    let setup = Setup::start("[timeouts]\nregistry_idle = 1\n");
    let mut tls = tls_connect(setup.gateway.port, "http/1.1").await;
    tls.write_all(b"PUT /v2/x/blobs/uploads/1 HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..10 {
        tls.write_all(b"400\r\n").await.unwrap();
        tls.write_all(&[b'l'; 0x400]).await.unwrap();
        tls.write_all(b"\r\n").await.unwrap();
        tls.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tls.write_all(b"0\r\n\r\n").await.unwrap();
    let (data, _) = read_to_close(&mut tls, Duration::from_secs(2)).await;
    let text = String::from_utf8_lossy(&data);
    assert_eq!(status_of(&text), 200, "{text}");
    let recorded = setup.core.requests();
    assert_eq!(recorded.len(), 1);
    assert!(recorded[0].complete);
    assert_eq!(recorded[0].body.len(), 10 * 0x400);
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_upload_gets_408() {
    let setup = Setup::start("[timeouts]\nregistry_idle = 1\n");
    let mut tls = tls_connect(setup.gateway.port, "http/1.1").await;
    tls.write_all(b"PUT /v2/x/blobs/uploads/1 HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100000\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&[b's'; 1000]).await.unwrap();
    tls.flush().await.unwrap();
    let (data, _) = read_to_close(&mut tls, Duration::from_secs(4)).await;
    let text = String::from_utf8_lossy(&data);
    assert_eq!(status_of(&text), 408, "{text}\n{}", setup.gateway.process.log_text());
    assert!(text.contains("\"errors\""), "not a registry JSON error: {text}");

    // The upstream saw the request start and then lose its body: it must not be complete.
    let recorded = setup.core.requests();
    assert_eq!(recorded.len(), 1);
    assert!(!recorded[0].complete, "the upstream got a complete-looking body");
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_limit_queues_clients() {
    let setup = Setup::start("[limits]\nmax_connections = 2\n");
    let first = tls_connect(setup.gateway.port, "http/1.1").await;
    let _second = tls_connect(setup.gateway.port, "http/1.1").await;

    let port = setup.gateway.port;
    let third = tokio::spawn(async move { tls_connect(port, "http/1.1").await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!third.is_finished(), "a third connection was served beyond max_connections = 2");

    drop(first);
    let mut third = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the waiting connection is served once a slot frees")
        .unwrap();
    third.write_all(get("/v2/").as_bytes()).await.unwrap();
    let (data, _) = read_to_close(&mut third, Duration::from_millis(500)).await;
    assert_eq!(status_of(&String::from_utf8_lossy(&data)), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_stream_limit_is_advertised() {
    let setup = Setup::start("[limits]\nmax_concurrent_streams = 7\n");
    let h2 = H2Connection::open(setup.gateway.port).await;
    let settings = h2.server_settings.settings();
    assert!(
        settings.contains(&(h2raw::SETTINGS_MAX_CONCURRENT_STREAMS, 7)),
        "SETTINGS {settings:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn large_headers_pass_and_oversized_get_431() {
    let setup = Setup::start("");
    // 64 KiB of header fields in total, in a form like a large bearer token and cookie.
    let token = "t".repeat(40 << 10);
    let fixed = "authorization".len() + "Bearer ".len() + "cookie".len() + "host".len() + format!("localhost:{}", setup.gateway.port).len() + 3 * 4;
    let cookie = "c".repeat((64 << 10) - fixed - token.len());

    for protocol in [Protocol::Http1, Protocol::Http2] {
        let client = https_client(protocol);
        let send = |path: &str, cookie: &str| {
            let request = Request::get(setup.gateway.url(path))
                .header("authorization", format!("Bearer {token}"))
                .header("cookie", cookie)
                .body(empty())
                .unwrap();
            client.request(request)
        };

        let response = send("/v2/", &cookie).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{protocol:?}: 64 KiB of headers");

        let response = send("/v2/", &format!("{cookie}{}", "c".repeat(64))).await.unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "{protocol:?}");
        assert_eq!(response.headers()["docker-distribution-api-version"], "registry/2.0");
        let body = body_text(response.into_body()).await;
        assert!(body.contains("above the limit of 65536"), "{body}");

        // Far above the limit the parser itself responds with 431 and closes without reading
        // further. The client may still be writing then, so over HTTP/1.1 it can see the
        // reset before the response; either way nothing reaches an upstream (checked below).
        // The parser's 431 has no body, unlike the gateway's. A body here means that the
        // parser took the whole head into memory.
        let huge = "h".repeat(400 << 10);
        if let Ok(response) = send("/dashboard", &huge).await {
            assert_eq!(response.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "{protocol:?}");
            let body = body_text(response.into_body()).await;
            assert_eq!(body, "", "{protocol:?}: the head above the parser limit was read whole");
        }
    }
    // Only the two requests within the limit reached the registry.
    assert_eq!(setup.core.request_count(), 2);
    assert_eq!(setup.rancher.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn long_uri_gets_414() {
    let setup = Setup::start("");
    let client = https_client(Protocol::Http1);
    let ok = format!("/v2/x/blobs/uploads/1?_state={}", "s".repeat(8000));
    let response = client.request(Request::get(setup.gateway.url(&ok)).body(empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let long = format!("/v2/x/blobs/uploads/1?_state={}", "s".repeat(8200));
    let response = client.request(Request::get(setup.gateway.url(&long)).body(empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::URI_TOO_LONG);
    let body = body_text(response.into_body()).await;
    assert!(body.starts_with("{\"errors\":[{\"code\":\"UNSUPPORTED\""), "{body}");
    assert_eq!(setup.core.request_count(), 1);
}

/// Requests whose framing is ambiguous. Each must get 400, the connection must close, and
/// the upstream must see nothing.
const SMUGGLING: &[(&str, &str)] = &[
    ("differing Content-Length", "POST /v2/ HTTP/1.1\r\nhost: localhost\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhelloGET /v2/smuggled HTTP/1.1\r\nhost: localhost\r\n\r\n"),
    ("Content-Length list", "POST /v2/ HTTP/1.1\r\nhost: localhost\r\ncontent-length: 5, 6\r\n\r\nhello!"),
    ("signed Content-Length", "POST /v2/ HTTP/1.1\r\nhost: localhost\r\ncontent-length: +5\r\n\r\nhello"),
    ("Content-Length with letters", "POST /v2/ HTTP/1.1\r\nhost: localhost\r\ncontent-length: 5a\r\n\r\nhello"),
    ("Transfer-Encoding not chunked", "POST /v2/ HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: gzip\r\n\r\nhello"),
    ("chunked before another coding", "POST /v2/ HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
    ("Transfer-Encoding on HTTP/1.0", "POST /v2/ HTTP/1.0\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("obs-fold", "GET /v2/ HTTP/1.1\r\nhost: localhost\r\nx-folded: a\r\n b\r\n\r\n"),
    ("space before colon", "GET /v2/ HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding : chunked\r\n\r\n"),
    ("invalid chunk size", "POST /v2/ HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    ("chunk size overflow", "POST /v2/ HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\nfffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
    ("bare CR", "GET /v2/ HTTP/1.1\r\nhost: localhost\rx-evil: 1\r\n\r\n"),
    ("NUL in header", "GET /v2/ HTTP/1.1\r\nhost: localhost\r\nx-nul: a\0b\r\n\r\n"),
];

#[tokio::test(flavor = "multi_thread")]
async fn ambiguous_framing_is_rejected() {
    let setup = Setup::start("");
    for (name, request) in SMUGGLING {
        let (response, closed) = raw_http1(setup.gateway.port, request.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(status_of(&response), 400, "{name}: {response:?}");
        assert!(closed, "{name}: the connection stayed open");
        assert_eq!(setup.upstream_requests(), 0, "{name}: reached an upstream: {:?}", setup.core.requests());
    }

    let (response, _) = raw_http1(setup.gateway.port, b"GET /v2/ HTTP/1.1\r\n\r\n", Duration::from_millis(500)).await;
    assert_eq!(status_of(&response), 400, "missing Host: {response}");
    assert_eq!(setup.upstream_requests(), 0);
}

/// Requests that hyper alone would accept and re-frame. The gateway's framing guard rejects
/// them, because a parser in front of the gateway might split them differently.
const STRICT_FRAMING: &[(&str, &str, &str)] = &[
    ("Content-Length then Transfer-Encoding", "POST /v2/ HTTP/1.1\r\nhost: localhost\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /v2/smuggled HTTP/1.1\r\nhost: localhost\r\n\r\n", "both Content-Length and Transfer-Encoding"),
    ("Transfer-Encoding then Content-Length", "POST /v2/ HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\n", "both Content-Length and Transfer-Encoding"),
    ("identical Content-Length twice", "POST /v2/ HTTP/1.1\r\nhost: localhost\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello", "more than one Content-Length"),
    ("bare LF in the request line", "GET /v2/ HTTP/1.1\nhost: localhost\r\n\r\n", "LF alone"),
    ("bare LF between fields", "GET /v2/ HTTP/1.1\r\nhost: localhost\nx-a: 1\r\n\r\n", "LF alone"),
    ("bare LF ends the head", "GET /v2/ HTTP/1.1\r\nhost: localhost\r\n\n", "LF alone"),
    ("upgrade with a body", "POST /v2/ HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: websocket\r\ncontent-length: 5\r\n\r\nhello", "upgrade cannot have a body"),
];

#[tokio::test(flavor = "multi_thread")]
async fn strict_framing_rejected_with_registry_error() {
    let setup = Setup::start("");
    for (name, request, message) in STRICT_FRAMING {
        let (response, closed) = raw_http1(setup.gateway.port, request.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(status_of(&response), 400, "{name}: {response:?}");
        assert!(response.contains("{\"errors\":[{\"code\":"), "{name}: not a registry error: {response}");
        assert!(response.contains(message), "{name}: {response}");
        assert_eq!(response.matches("HTTP/1.1 ").count(), 1, "{name}: a second response came back: {response}");
        assert!(closed, "{name}: the connection stayed open");
        assert_eq!(setup.upstream_requests(), 0, "{name}: reached an upstream: {:?}", setup.core.requests());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_before_rejection_served() {
    let setup = Setup::start("");
    let request = "GET /v2/first HTTP/1.1\r\nhost: localhost\r\n\r\n\
        PUT /v2/second HTTP/1.1\r\nhost: localhost\r\ncontent-length: 5\r\n\r\nhello\
        POST /v2/third HTTP/1.1\r\nhost: localhost\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx\
        GET /v2/fourth HTTP/1.1\r\nhost: localhost\r\n\r\n";
    let (response, closed) = raw_http1(setup.gateway.port, request.as_bytes(), Duration::from_secs(3)).await;
    let statuses: Vec<&str> = response.match_indices("HTTP/1.1 ").map(|(at, _)| &response[at + 9..at + 12]).collect();
    assert_eq!(statuses, ["200", "200", "400"], "{response}");
    assert!(closed);
    let lines: Vec<String> = setup.core.requests().iter().map(|r| r.request_line().to_string()).collect();
    assert_eq!(lines, ["GET /v2/first HTTP/1.1", "PUT /v2/second HTTP/1.1"]);
    assert_eq!(setup.core.requests()[1].body, b"hello");
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_upgrade_keeps_framing_checks() {
    // The guard stops checking only after a 101. Here the upgrade is refused, so the
    // bytes after it are read as the next request, and that one is rejected.
    let setup = Setup::start("");
    let request = "GET /v2/ HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n\
        POST /v2/ HTTP/1.1\r\nhost: localhost\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    let (response, closed) = raw_http1(setup.gateway.port, request.as_bytes(), Duration::from_secs(3)).await;
    let statuses: Vec<&str> = response.match_indices("HTTP/1.1 ").map(|(at, _)| &response[at + 9..at + 12]).collect();
    assert_eq!(statuses.last(), Some(&"400"), "{response}");
    assert!(response.contains("both Content-Length and Transfer-Encoding"), "{response}");
    assert!(closed);
    assert!(setup.core.requests().iter().all(|r| r.request_line().starts_with("GET ")), "{:?}", setup.core.requests());
}

#[tokio::test(flavor = "multi_thread")]
async fn bare_lf_in_chunk_line_fails_upload() {
    let setup = Setup::start("");
    let head = "PATCH /v2/x/blobs/uploads/1 HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n";
    let body = "5\nhello\r\n0\r\n\r\n";
    let (response, closed) = raw_http1(setup.gateway.port, format!("{head}{body}").as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(status_of(&response), 400, "{response}");
    assert!(closed);
    assert_eq!(setup.upstream_requests(), 0, "{:?}", setup.core.requests());

    // The same body 300 ms after the head: the gateway waits for the first body frame
    // before it opens the upstream request, so the upstream still receives nothing.
    let mut tls = tls_connect(setup.gateway.port, "http/1.1").await;
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(write_tolerant(&mut tls, body.as_bytes()).await);
    let (data, closed) = read_to_close(&mut tls, Duration::from_secs(3)).await;
    let response = String::from_utf8_lossy(&data);
    assert_eq!(status_of(&response), 400, "delayed body: {response}");
    assert!(closed, "delayed body: the connection stayed open");
    assert_eq!(setup.upstream_requests(), 0, "delayed body: {:?}", setup.core.requests());
}

/// `(path, upstream that must get it byte for byte)`, or `None` for 400.
const PATHS: &[(&str, Option<&str>)] = &[
    ("/registry/../v1/management.cattle.io.settings", None),
    ("/registry/%2e%2e/v1/x", None),
    ("/v2/../service/notifications", None),
    ("/v2/..%2f..%2fregistry/api", None),
    ("/v2/%2E%2E/%2e%2e/api/v2.0/projects", None),
    ("/api/v2.0/../../v3/settings", None),
    ("/v2/./library/alpine/manifests/latest", None),
    ("/v2\\..\\v3", None),
    ("/v2/x%5c..%5cy", None),
    ("/v2/a%00b", None),
    ("/v2/a%2Fb/blobs/uploads/1", Some("core")),
    ("/v2/library/alpine/manifests/v1.2", Some("core")),
    ("/api/v2.0/projects/library/repositories/a%252Fb", Some("core")),
    ("//v2/", Some("rancher")),
    ("/v2//x", Some("core")),
    ("/registry%2fapi/v2.0/projects", Some("rancher")),
    ("/V2/", Some("rancher")),
];

#[tokio::test(flavor = "multi_thread")]
async fn confusing_paths_never_cross_routes() {
    let setup = Setup::start("");
    for &(path, expected) in PATHS {
        let before = (setup.core.request_count(), setup.rancher.request_count());
        let (response, _) = raw_http1(setup.gateway.port, get(path).as_bytes(), Duration::from_millis(500)).await;
        let after = (setup.core.request_count(), setup.rancher.request_count());
        match expected {
            None => {
                assert_eq!(status_of(&response), 400, "{path}: {response}");
                assert_eq!(before, after, "{path} reached an upstream");
            }
            Some(name) => {
                assert_eq!(status_of(&response), 200, "{path}: {response}");
                let upstream = if name == "core" { &setup.core } else { &setup.rancher };
                let last = upstream.requests().pop().unwrap_or_else(|| panic!("{path}: {name} got nothing"));
                assert_eq!(last.request_line(), format!("GET {path} HTTP/1.1"), "{path}: not byte for byte");
            }
        }
    }

    // A fragment is cut off by the parser before routing, so routing and forwarding agree.
    let (response, _) = raw_http1(setup.gateway.port, get("/v2/x#/../../v3").as_bytes(), Duration::from_millis(500)).await;
    assert_eq!(status_of(&response), 200, "{response}");
    assert_eq!(setup.core.requests().pop().unwrap().request_line(), "GET /v2/x HTTP/1.1");

    // Absolute form: routed on its path, and its authority becomes the Host.
    let absolute = "GET https://localhost/registry/../v3 HTTP/1.1\r\nhost: localhost\r\n\r\n";
    let (response, _) = raw_http1(setup.gateway.port, absolute.as_bytes(), Duration::from_millis(500)).await;
    assert_eq!(status_of(&response), 400, "{response}");
    let absolute = "GET https://gateway.test/v2/x HTTP/1.1\r\nhost: localhost\r\n\r\n";
    let (response, _) = raw_http1(setup.gateway.port, absolute.as_bytes(), Duration::from_millis(500)).await;
    assert_eq!(status_of(&response), 200, "{response}");
    let last = setup.core.requests().pop().unwrap();
    assert_eq!(last.request_line(), "GET /v2/x HTTP/1.1");
    assert_eq!(last.header_values("host"), vec!["gateway.test"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn path_rejection_is_clear() {
    let setup = Setup::start("");
    let (response, _) = raw_http1(setup.gateway.port, get("/v2/%2e%2e/x").as_bytes(), Duration::from_millis(500)).await;
    assert!(response.contains("docker-distribution-api-version: registry/2.0"), "{response}");
    assert!(response.contains("contains a `.` or `..` segment"), "{response}");
    let (response, _) = raw_http1(setup.gateway.port, get("/dashboard/%2e%2e/x").as_bytes(), Duration::from_millis(500)).await;
    assert!(response.contains("content-type: text/plain"), "{response}");
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_are_replaced() {
    let setup = Setup::start("");
    let request = "GET /v2/ HTTP/1.1\r\nhost: localhost:1234\r\nx-forwarded-for: 203.0.113.9\r\n\
                   x-forwarded-proto: http\r\nx-forwarded-host: evil.example\r\nx-forwarded-port: 80\r\n\
                   forwarded: for=203.0.113.9;proto=http;host=evil.example\r\nx-real-ip: 203.0.113.9\r\n\r\n";
    let (response, _) = raw_http1(setup.gateway.port, request.as_bytes(), Duration::from_millis(500)).await;
    assert_eq!(status_of(&response), 200, "{response}");
    let recorded = setup.core.requests().pop().unwrap();
    assert_eq!(recorded.header_values("x-forwarded-for"), vec!["127.0.0.1"], "{}", recorded.head);
    assert_eq!(recorded.header_values("x-forwarded-proto"), vec!["https"]);
    assert_eq!(recorded.header_values("x-forwarded-host"), vec!["localhost:1234"]);
    assert_eq!(recorded.header_values("x-forwarded-port"), vec!["1234"]);
    assert!(recorded.header_values("forwarded").is_empty(), "{}", recorded.head);
    assert!(recorded.header_values("x-real-ip").is_empty(), "{}", recorded.head);
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_connection_headers_are_rejected() {
    let setup = Setup::start("");
    let authority = format!("localhost:{}", setup.gateway.port);
    for header in [("connection", "keep-alive"), ("transfer-encoding", "chunked"), ("upgrade", "websocket"), ("te", "gzip")] {
        let mut h2 = H2Connection::open(setup.gateway.port).await;
        let block = h2raw::header_block(&h2raw::get_fields("/v2/", &authority, &[header]));
        h2.send(&h2raw::encode_frame(h2raw::HEADERS, h2raw::END_HEADERS | h2raw::END_STREAM, 1, &block)).await;
        let (frames, _) = h2.read_frames(Duration::from_millis(800)).await;
        let reset = frames.iter().find(|f| f.kind == h2raw::RST_STREAM && f.stream == 1);
        assert_eq!(reset.and_then(|f| f.error_code()), Some(1), "{header:?}: expected PROTOCOL_ERROR, got {frames:?}");
    }
    assert_eq!(setup.upstream_requests(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_host_must_match_authority() {
    let setup = Setup::start("");
    let authority = format!("localhost:{}", setup.gateway.port);
    let mut h2 = H2Connection::open(setup.gateway.port).await;
    let block = h2raw::header_block(&h2raw::get_fields("/dashboard", &authority, &[("host", "harbor-core")]));
    h2.send(&h2raw::encode_frame(h2raw::HEADERS, h2raw::END_HEADERS | h2raw::END_STREAM, 1, &block)).await;
    let (frames, _) = h2.read_frames(Duration::from_millis(800)).await;
    assert!(data_has(&frames, 1, "does not match :authority"), "{frames:?}");

    let block = h2raw::header_block(&h2raw::get_fields("/dashboard", &authority, &[("host", &authority)]));
    h2.send(&h2raw::encode_frame(h2raw::HEADERS, h2raw::END_HEADERS | h2raw::END_STREAM, 3, &block)).await;
    let (frames, _) = h2.read_frames(Duration::from_millis(800)).await;
    assert!(data_has(&frames, 3, "upstream ok"), "{frames:?}");
    assert_eq!(setup.rancher.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_rapid_reset_is_bounded() {
    let setup = Setup::start("");
    let authority = format!("localhost:{}", setup.gateway.port);
    let mut h2 = H2Connection::open(setup.gateway.port).await;
    let block = h2raw::header_block(&h2raw::get_fields("/v2/", &authority, &[]));

    let mut batch = Vec::new();
    for index in 0..10_000u32 {
        let stream = 1 + 2 * index;
        batch.extend(h2raw::encode_frame(h2raw::HEADERS, h2raw::END_HEADERS | h2raw::END_STREAM, stream, &block));
        batch.extend(h2raw::encode_frame(h2raw::RST_STREAM, 0, stream, &8u32.to_be_bytes()));
    }
    let _ = h2.send(&batch).await;
    let (frames, closed) = h2.read_frames(Duration::from_secs(5)).await;
    let goaway = frames.iter().find(|f| f.kind == h2raw::GOAWAY);
    assert!(goaway.is_some() || closed, "10 000 reset streams did not end the connection");
    if let Some(goaway) = goaway {
        assert_eq!(goaway.error_code(), Some(0xb), "expected ENHANCE_YOUR_CALM: {goaway:?}");
    }
    let reached = setup.core.request_count();
    assert!(reached < 1_000, "{reached} of 10 000 reset streams reached the upstream");

    // The gateway still serves a well-behaved client.
    let response = https_client(Protocol::Http2)
        .request(Request::get(setup.gateway.url("/v2/")).method(Method::HEAD).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_continuation_flood_is_bounded() {
    let setup = Setup::start("");
    let authority = format!("localhost:{}", setup.gateway.port);
    let mut h2 = H2Connection::open(setup.gateway.port).await;
    let rss_before = current_rss_kib(setup.gateway.process.pid());

    let block = h2raw::header_block(&h2raw::get_fields("/v2/", &authority, &[]));
    h2.send(&h2raw::encode_frame(h2raw::HEADERS, 0, 1, &block)).await;
    let filler = h2raw::header_block(&[("x-flood", &"f".repeat(16_000))]);
    let started = Instant::now();
    let mut sent = 0usize;
    // Up to 64 MiB of CONTINUATION frames, far beyond any header limit.
    while sent < 64 << 20 {
        if !h2.send(&h2raw::encode_frame(h2raw::CONTINUATION, 0, 1, &filler)).await {
            break;
        }
        sent += filler.len();
        if started.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let (frames, closed) = h2.read_frames(Duration::from_secs(3)).await;
    let answered = closed || frames.iter().any(|f| matches!(f.kind, h2raw::GOAWAY | h2raw::RST_STREAM | h2raw::HEADERS));
    assert!(answered, "the gateway kept reading CONTINUATION frames: {sent} bytes sent");
    assert!(sent < 16 << 20, "the gateway accepted {sent} bytes of CONTINUATION frames");
    let rss_after = current_rss_kib(setup.gateway.process.pid());
    assert!(rss_after < rss_before + 32 << 10, "RSS grew from {rss_before} KiB to {rss_after} KiB");
    assert_eq!(setup.upstream_requests(), 0);
}

fn current_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}
