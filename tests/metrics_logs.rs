//! Metrics values and access-log lines after real traffic through the gateway to the real
//! `docker-registry` and to upstreams that fail on purpose.

mod support;

use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use support::ops::*;
use support::*;

async fn send(
    client: &HttpsClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: TestBody,
) -> http::Response<hyper::body::Incoming> {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    client
        .request(request.body(body).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Reads the body to the end and returns its length.
async fn body_length(response: http::Response<hyper::body::Incoming>) -> u64 {
    response.into_body().collect().await.unwrap().to_bytes().len() as u64
}

/// An upstream that accepts connections and never responds.
async fn silent_upstream() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut open_streams = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open_streams.push(stream);
        }
    });
    port
}

/// An upstream that reads the request head and closes the connection without responding.
async fn closing_upstream() -> u16 {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buffer = [0u8; 4096];
            let _ = stream.read(&mut buffer).await;
        }
    });
    port
}

fn access_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|line| line.contains(" access: ")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_real_traffic() {
    let registry = Registry::start();
    let dead_port = free_port();
    let silent_port = silent_upstream().await;
    let closing_port = closing_upstream().await;
    let gateway = start_gateway(
        &format!(
            "[upstreams]\nharbor_core = \"{}\"\ndead = \"http://127.0.0.1:{dead_port}\"\n\
             silent = \"http://127.0.0.1:{silent_port}\"\nclosing = \"http://127.0.0.1:{closing_port}\"\n\
             [timeouts]\ndefault_idle = 2\n\
             [[routes]]\nprefix = \"/dead\"\nupstream = \"dead\"\n\
             [[routes]]\nprefix = \"/silent\"\nupstream = \"silent\"\n\
             [[routes]]\nprefix = \"/closing\"\nupstream = \"closing\"\n",
            registry.url()
        ),
        "text",
    );
    let client = https_client(Protocol::Http1);
    let repo = "library/metrics-secret-repo";
    let mut registry_response_bytes = 0;

    // GET /v2/ and a monolithic blob upload: POST, then PUT with 100 000 bytes.
    let base = send(&client, Method::GET, &gateway.url("/v2/"), &[], empty()).await;
    assert_eq!(base.status(), StatusCode::OK);
    registry_response_bytes += body_length(base).await;

    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let digest = sha256_digest(&blob);
    let started = send(&client, Method::POST, &gateway.url(&format!("/v2/{repo}/blobs/uploads/")), &[], empty()).await;
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let location = started.headers()["location"].to_str().unwrap().to_string();
    registry_response_bytes += body_length(started).await;
    let put = send(&client, Method::PUT, &format!("{location}&digest={digest}"), &[], full(blob.clone())).await;
    assert_eq!(put.status(), StatusCode::CREATED);
    registry_response_bytes += body_length(put).await;

    // The blob back, a HEAD, and a 404 from the registry.
    let get = send(&client, Method::GET, &gateway.url(&format!("/v2/{repo}/blobs/{digest}")), &[], empty()).await;
    assert_eq!(get.status(), StatusCode::OK);
    let length = body_length(get).await;
    assert_eq!(length, blob.len() as u64);
    registry_response_bytes += length;
    let head = send(&client, Method::HEAD, &gateway.url(&format!("/v2/{repo}/blobs/{digest}")), &[], empty()).await;
    assert_eq!(head.status(), StatusCode::OK);
    registry_response_bytes += body_length(head).await;
    let missing = send(&client, Method::GET, &gateway.url(&format!("/v2/{repo}/manifests/nope")), &[], empty()).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    registry_response_bytes += body_length(missing).await;

    // One failure of each kind.
    let dead = send(&client, Method::GET, &gateway.url("/dead/x"), &[], empty()).await;
    assert_eq!(dead.status(), StatusCode::BAD_GATEWAY);
    let dead_bytes = body_length(dead).await;
    let silent = send(&client, Method::GET, &gateway.url("/silent/x"), &[], empty()).await;
    assert_eq!(silent.status(), StatusCode::GATEWAY_TIMEOUT);
    body_length(silent).await;
    let closing = send(&client, Method::GET, &gateway.url("/closing/x"), &[], empty()).await;
    assert_eq!(closing.status(), StatusCode::BAD_GATEWAY);
    body_length(closing).await;

    // Handshake failures: plain HTTP on the TLS port, and a client that rejects the
    // certificate because it does not trust the test CA.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", gateway.port)).await.unwrap();
        plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let _ = plain.read(&mut [0u8; 64]).await;
    }
    assert!(tls_connect(gateway.port, false, &[b"http/1.1"]).await.is_err());

    let route = |route: &'static str, method: &'static str, class: &'static str| {
        [("route", route), ("method", method), ("status_class", class)]
    };
    let requests = "harbor_gateway_requests_total";
    // Requests finish when their bodies end, which can be a moment after the client has
    // read the last byte.
    wait_for_metric(&gateway, requests, &route("registry", "GET", "4xx"), 1.0).await;
    wait_for_metric(&gateway, requests, &route("custom:/closing", "GET", "5xx"), 1.0).await;
    wait_for_metric(&gateway, "harbor_gateway_tls_handshake_failures_total", &[("reason", "certificate_rejected")], 1.0).await;
    let text = scrape(&gateway).await;
    let value = |name: &str, labels: &[(&str, &str)]| {
        metric(&text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in scrape:\n{text}"))
    };

    assert_eq!(value(requests, &route("registry", "GET", "2xx")), 2.0);
    assert_eq!(value(requests, &route("registry", "POST", "2xx")), 1.0);
    assert_eq!(value(requests, &route("registry", "PUT", "2xx")), 1.0);
    assert_eq!(value(requests, &route("registry", "HEAD", "2xx")), 1.0);
    assert_eq!(value(requests, &route("custom:/dead", "GET", "5xx")), 1.0);
    assert_eq!(value(requests, &route("custom:/silent", "GET", "5xx")), 1.0);

    assert_eq!(value("harbor_gateway_request_body_bytes_total", &[("route", "registry")]), blob.len() as f64);
    assert_eq!(value("harbor_gateway_response_body_bytes_total", &[("route", "registry")]), registry_response_bytes as f64);
    assert_eq!(value("harbor_gateway_response_body_bytes_total", &[("route", "custom:/dead")]), dead_bytes as f64);
    assert_eq!(value("harbor_gateway_requests_in_flight", &[("route", "registry")]), 0.0);

    let duration = "harbor_gateway_request_duration_seconds";
    let get_labels = [("route", "registry"), ("method", "GET")];
    assert_eq!(value(&format!("{duration}_count"), &get_labels), 3.0);
    assert!(value(&format!("{duration}_sum"), &get_labels) > 0.0);
    // The silent upstream timed out after the 2 s idle timeout, so the request lasted
    // more than a second but less than five.
    let silent_labels = |le: &'static str| [("route", "custom:/silent"), ("method", "GET"), ("le", le)];
    assert_eq!(value(&format!("{duration}_bucket"), &silent_labels("1")), 0.0);
    assert_eq!(value(&format!("{duration}_bucket"), &silent_labels("5")), 1.0);

    let failures = "harbor_gateway_upstream_failures_total";
    assert_eq!(value(failures, &[("upstream", "dead"), ("kind", "connect")]), 1.0);
    assert_eq!(value(failures, &[("upstream", "silent"), ("kind", "timeout")]), 1.0);
    assert_eq!(value(failures, &[("upstream", "closing"), ("kind", "reset")]), 1.0);
    for kind in ["connect", "timeout", "reset"] {
        assert_eq!(value(failures, &[("upstream", "harbor_core"), ("kind", kind)]), 0.0, "{kind}");
    }

    let handshakes = "harbor_gateway_tls_handshake_failures_total";
    assert_eq!(value(handshakes, &[("reason", "protocol_error")]), 1.0);
    assert_eq!(value(handshakes, &[("reason", "certificate_rejected")]), 1.0);

    let not_after = openssl_not_after(&repo_path("certs-test/tls.crt"));
    assert_eq!(value("harbor_gateway_certificate_expiry_timestamp_seconds", &[]), not_after as f64);
    assert_eq!(value("harbor_gateway_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert_eq!(value("harbor_gateway_reloads_total", &[("result", "success")]), 0.0);

    // Label values never carry client-controlled text.
    for forbidden in [repo, &digest[7..], "127.0.0.1", "/v2/"] {
        assert!(!text.contains(forbidden), "scrape contains {forbidden:?}:\n{text}");
    }

    // One access line per request: 6 registry requests and 3 failures.
    let log = gateway.process.log_text();
    assert_eq!(access_lines(&log).len(), 9, "{log}");
    assert!(log.contains("upstream=\"silent\" status=504"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn in_flight_lasts_until_body_ends() {
    let registry = Registry::start();
    let gateway = start_gateway(&format!("[upstreams]\nharbor_core = \"{}\"\n", registry.url()), "text");
    let client = https_client(Protocol::Http2);

    // 32 MiB is more than the socket buffers and HTTP/2 windows hold, so the transfer
    // stays open while the client does not read.
    let blob: Vec<u8> = (0..32u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let digest = sha256_digest(&blob);
    let started = send(&client, Method::POST, &gateway.url("/v2/big/blobs/uploads/"), &[], empty()).await;
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let put = send(&client, Method::PUT, &format!("{location}&digest={digest}"), &[], full(blob)).await;
    assert_eq!(put.status(), StatusCode::CREATED);
    body_length(put).await;

    let in_flight = [("route", "registry")];
    wait_for_metric(&gateway, "harbor_gateway_requests_in_flight", &in_flight, 0.0).await;
    let response = send(&client, Method::GET, &gateway.url(&format!("/v2/big/blobs/{digest}")), &[], empty()).await;
    assert_eq!(response.status(), StatusCode::OK);
    // The response head has arrived, but the request is in flight until the body ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait_for_metric(&gateway, "harbor_gateway_requests_in_flight", &in_flight, 1.0).await;
    let text = scrape(&gateway).await;
    assert_eq!(metric(&text, "harbor_gateway_requests_total", &[("route", "registry"), ("method", "GET"), ("status_class", "2xx")]), None);

    // A client that gives up ends the request as well.
    drop(response);
    wait_for_metric(&gateway, "harbor_gateway_requests_in_flight", &in_flight, 0.0).await;
    wait_for_metric(&gateway, "harbor_gateway_requests_total", &[("route", "registry"), ("method", "GET"), ("status_class", "2xx")], 1.0).await;
    // Worker threads write access lines when their event loop goes idle, a moment after
    // the metrics change.
    wait_until(Duration::from_secs(5), "the client_closed access line", || {
        std::future::ready(gateway.process.log_text().contains("outcome=\"client_closed\""))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn open_connections_by_protocol() {
    let registry = Registry::start();
    let gateway = start_gateway(&format!("[upstreams]\nharbor_core = \"{}\"\n", registry.url()), "text");

    let h1 = https_client(Protocol::Http1);
    let h2 = https_client(Protocol::Http2);
    for client in [&h1, &h2] {
        let response = send(client, Method::GET, &gateway.url("/v2/"), &[], empty()).await;
        assert_eq!(response.status(), StatusCode::OK);
        body_length(response).await;
    }
    let connections = "harbor_gateway_open_connections";
    wait_for_metric(&gateway, connections, &[("protocol", "h1")], 1.0).await;
    wait_for_metric(&gateway, connections, &[("protocol", "h2")], 1.0).await;

    drop(h1);
    drop(h2);
    wait_for_metric(&gateway, connections, &[("protocol", "h1")], 0.0).await;
    wait_for_metric(&gateway, connections, &[("protocol", "h2")], 0.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_has_no_secrets() {
    let registry = Registry::start();
    let dead_port = free_port();
    let gateway = start_gateway(
        &format!(
            "[upstreams]\nharbor_core = \"{}\"\ndead = \"http://127.0.0.1:{dead_port}\"\n\
             [[routes]]\nprefix = \"/dead\"\nupstream = \"dead\"\n",
            registry.url()
        ),
        "json",
    );
    let client = https_client(Protocol::Http2);
    // "admin:basic-secret-5" in base64, as a Basic Authorization header carries it.
    let basic = "YWRtaW46YmFzaWMtc2VjcmV0LTU=";
    let requests: [(&str, Vec<(&str, String)>); 5] = [
        ("/v2/", vec![("authorization", "Bearer bearer-secret-1".into()), ("cookie", "sid=cookie-secret-2".into())]),
        ("/v2/_catalog?access_token=query-secret-3&n=5", vec![]),
        ("/v2/a/b/tags/list?X-Amz-Signature=query-secret-4&token=query-secret-6", vec![]),
        ("/v2/", vec![("authorization", format!("Basic {basic}"))]),
        ("/dead/x?password=query-secret-7", vec![("cookie", "sid=cookie-secret-8".into())]),
    ];
    for (path, headers) in &requests {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let response = send(&client, Method::GET, &gateway.url(path), &headers, empty()).await;
        body_length(response).await;
    }

    let mut events = Vec::new();
    wait_until(Duration::from_secs(10), "five access events", || {
        events = gateway
            .process
            .log_text()
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .filter(|event| event["target"] == "access")
            .collect();
        std::future::ready(events.len() >= requests.len())
    })
    .await;

    let log = gateway.process.log_text();
    for secret in ["secret-1", "secret-2", "secret-3", "secret-4", "secret-6", "secret-7", "secret-8", basic] {
        assert!(!log.contains(secret), "the log contains {secret:?}:\n{log}");
    }
    assert_eq!(events.len(), requests.len(), "one access event per request:\n{log}");

    let fields: Vec<&serde_json::Value> = events.iter().map(|event| &event["fields"]).collect();
    for field in [
        "request_id", "client_addr", "method", "path", "route", "upstream", "status", "request_bytes",
        "response_bytes", "duration_ms", "protocol", "tls", "outcome",
    ] {
        assert!(fields.iter().all(|f| !f[field].is_null()), "{field} missing in {fields:?}");
    }
    let catalog = fields.iter().find(|f| f["path"].as_str().unwrap().starts_with("/v2/_catalog")).unwrap();
    assert_eq!(catalog["path"], "/v2/_catalog?access_token=REDACTED&n=5");
    assert_eq!(catalog["route"], "registry");
    assert_eq!(catalog["upstream"], "harbor_core");
    assert_eq!(catalog["status"], 200);
    assert_eq!(catalog["method"], "GET");
    assert_eq!(catalog["tls"], "TLSv1.3");
    assert_eq!(catalog["protocol"], "HTTP/2.0");
    assert_eq!(catalog["outcome"], "complete");
    assert!(catalog["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(catalog["response_bytes"].as_u64().unwrap() > 0);

    // The failed request also has an error event that names it, at error level.
    let dead = fields.iter().find(|f| f["route"] == "custom:/dead").unwrap();
    assert_eq!(dead["status"], 502);
    let request_id = dead["request_id"].as_u64().unwrap();
    let error = log
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|event| event["level"] == "ERROR" && event["fields"]["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no error event for request {request_id}:\n{log}"));
    assert_eq!(error["fields"]["path"], "/dead/x?password=REDACTED");
    assert!(error["fields"]["error"].as_str().unwrap().contains("cannot connect to upstream dead"));

    // Lifecycle events at info level.
    for message in ["https listener started", "admin listener started", "certificate loaded"] {
        assert!(log.contains(message), "no {message:?} in:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_bundle_is_served_when_configured() {
    // The body continues the [tls] table.
    let gateway = start_gateway(&format!("ca_bundle = \"{}\"\n[upstreams]\n", ca_file().display()), "text");
    let client = https_client(Protocol::Http1);
    let response = send(&client, Method::GET, &gateway.url("/registry/ca.crt"), &[], empty()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-pem-file");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], &std::fs::read(ca_file()).unwrap()[..]);

    // Without the key the path belongs to the portal route, unconfigured here.
    let plain = start_gateway("[upstreams]\n", "text");
    let response = send(&client, Method::GET, &plain.url("/registry/ca.crt"), &[], empty()).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(body_text(response.into_body()).await.contains("portal is not configured"));
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_answer_when_serving() {
    let registry = Registry::start();
    let gateway = start_gateway(&format!("[upstreams]\nharbor_core = \"{}\"\n", registry.url()), "text");
    assert_eq!(admin_get(&gateway, "/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(admin_get(&gateway, "/readyz").await, (200, "ready\n".to_string()));
    assert_eq!(admin_get(&gateway, "/nothing").await.0, 404);
}
