//! Certificate and configuration reload, and drain on SIGTERM, against the running binary
//! with real transfers in flight.

mod support;

use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use support::ops::*;
use support::*;

/// Opens an HTTP/1.1 connection of its own, so a test can tell that it stays open.
async fn open_connection(port: u16) -> (SendRequest<TestBody>, Vec<u8>) {
    let stream = tls_connect(port, true, &[b"http/1.1"]).await.unwrap();
    let leaf = peer_leaf(&stream);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    (sender, leaf)
}

async fn status_on(sender: &mut SendRequest<TestBody>, port: u16, path: &str) -> StatusCode {
    sender.ready().await.expect("the connection is still open");
    let request = Request::get(path)
        .header("host", format!("localhost:{port}"))
        .body(empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    response.into_body().collect().await.unwrap();
    status
}

fn reloads(result: &'static str) -> [(&'static str, &'static str); 1] {
    [("result", result)]
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_swap_reaches_new_handshakes() {
    let registry = Registry::start();
    let secret_dir = tempfile::tempdir().unwrap();
    let read = |name: &str| std::fs::read(repo_path(&format!("certs-test/{name}"))).unwrap();
    let mut secret = SecretDir::new(secret_dir.path(), &read("tls.crt"), &read("tls.key"));
    let gateway = start_gateway_with_tls(
        &secret.cert(),
        &secret.key(),
        &format!("[upstreams]\nharbor_core = \"{}\"\n[reload]\nwatch_interval = 1\n", registry.url()),
        "text",
    );
    let rsa_leaf = leaf_der(&repo_path("certs-test/tls.crt"));
    let ec_leaf = leaf_der(&repo_path("certs-test/tls-ec.crt"));

    let (mut old_connection, old_leaf) = open_connection(gateway.port).await;
    assert_eq!(old_leaf, rsa_leaf);
    assert_eq!(status_on(&mut old_connection, gateway.port, "/v2/").await, StatusCode::OK);

    // The kubelet's update: a new directory behind an atomically renamed `..data` link.
    secret.update(&read("tls-ec.crt"), &read("tls-ec-sec1.key"));
    wait_until(Duration::from_secs(10), "a fresh handshake to get the EC certificate", || async {
        served_leaf(gateway.port).await == ec_leaf
    })
    .await;
    wait_for_metric(&gateway, "harbor_gateway_reloads_total", &reloads("success"), 1.0).await;
    let text = scrape(&gateway).await;
    let expiry = metric(&text, "harbor_gateway_certificate_expiry_timestamp_seconds", &[]);
    assert_eq!(expiry, Some(openssl_not_after(&repo_path("certs-test/tls-ec.crt")) as f64));

    // The connection opened before the swap keeps working.
    assert_eq!(status_on(&mut old_connection, gateway.port, "/v2/").await, StatusCode::OK);

    // A broken certificate is rejected: the EC certificate stays in force.
    secret.update(
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
        &read("tls-ec-sec1.key"),
    );
    wait_for_metric(&gateway, "harbor_gateway_reloads_total", &reloads("failure"), 1.0).await;
    assert_eq!(served_leaf(gateway.port).await, ec_leaf);
    assert_eq!(status_on(&mut old_connection, gateway.port, "/v2/").await, StatusCode::OK);
    let (mut new_connection, _) = open_connection(gateway.port).await;
    assert_eq!(status_on(&mut new_connection, gateway.port, "/v2/").await, StatusCode::OK);
    assert_eq!(admin_get(&gateway, "/readyz").await.0, 200);

    let text = scrape(&gateway).await;
    assert_eq!(metric(&text, "harbor_gateway_reloads_total", &reloads("success")), Some(1.0));
    let log = gateway.process.log_text();
    let failure = log
        .lines()
        .find(|line| line.contains("reload failed"))
        .unwrap_or_else(|| panic!("no failed reload in the log:\n{log}"));
    assert!(failure.contains("ERROR"), "{failure}");
    assert!(failure.contains(&secret.cert().display().to_string()), "the error names the file: {failure}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_configuration() {
    let registry = Registry::start();
    let gateway = start_gateway(
        &format!("[upstreams]\nharbor_core = \"{}\"\n[reload]\nwatch_interval = 0\n", registry.url()),
        "text",
    );
    let (mut connection, _) = open_connection(gateway.port).await;
    assert_eq!(status_on(&mut connection, gateway.port, "/v2/blocked/x").await, StatusCode::NOT_FOUND);

    // A new route, and a new admin address that cannot apply without a restart.
    let original = std::fs::read_to_string(&gateway.config_path).unwrap();
    let moved_admin = original.replace(
        &format!("admin = \"127.0.0.1:{}\"", gateway.admin_port),
        &format!("admin = \"127.0.0.1:{}\"", free_port()),
    );
    assert_ne!(moved_admin, original);
    let blocked = format!("{moved_admin}[[routes]]\nprefix = \"/v2/blocked\"\nstatus = 403\n");
    std::fs::write(&gateway.config_path, &blocked).unwrap();
    send_signal(&gateway, "HUP");
    wait_for_metric(&gateway, "harbor_gateway_reloads_total", &reloads("success"), 1.0).await;

    // The open connection's next request takes the new route table.
    assert_eq!(status_on(&mut connection, gateway.port, "/v2/blocked/x").await, StatusCode::FORBIDDEN);
    assert_eq!(status_on(&mut connection, gateway.port, "/v2/").await, StatusCode::OK);
    let log = gateway.process.log_text();
    assert!(log.contains("listen addresses changed in the configuration; they take effect only after a restart"), "{log}");

    // An invalid file leaves the previous configuration in force.
    std::fs::write(&gateway.config_path, format!("bogus = 1\n{blocked}")).unwrap();
    send_signal(&gateway, "HUP");
    wait_for_metric(&gateway, "harbor_gateway_reloads_total", &reloads("failure"), 1.0).await;
    assert_eq!(status_on(&mut connection, gateway.port, "/v2/blocked/x").await, StatusCode::FORBIDDEN);
    let log = gateway.process.log_text();
    let failure = log.lines().find(|line| line.contains("reload failed")).unwrap();
    assert!(failure.contains("unknown field `bogus`"), "{failure}");
    assert!(failure.contains(&gateway.config_path.display().to_string()), "{failure}");

    // With watching off, only the two signals reloaded.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = scrape(&gateway).await;
    assert_eq!(metric(&text, "harbor_gateway_reloads_total", &reloads("success")), Some(1.0));
    assert_eq!(metric(&text, "harbor_gateway_reloads_total", &reloads("failure")), Some(1.0));
}

/// Pushes `size` pseudo-random bytes straight to the registry as a blob of `repo`; returns
/// the digest.
async fn push_blob_to_registry(registry: &Registry, repo: &str, size: u64) -> String {
    let file = registry.dir.path().join("blob.bin");
    let digest = write_random_file(&file, size, 7);
    let client: Client<_, TestBody> = Client::builder(TokioExecutor::new()).build_http();

    let started = client
        .request(Request::post(format!("{}/v2/{repo}/blobs/uploads/", registry.url())).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let location = if location.starts_with('/') { format!("{}{location}", registry.url()) } else { location };

    let put = client
        .request(Request::put(format!("{location}&digest={digest}")).body(file_body(&file)).unwrap())
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);
    std::fs::remove_file(&file).unwrap();
    digest
}

async fn start_download(gateway: &Gateway, protocol: Protocol, repo: &str, digest: &str) -> (HttpsClient, hyper::body::Incoming) {
    let client = https_client(protocol);
    let request = Request::builder()
        .method(Method::GET)
        .uri(gateway.url(&format!("/v2/{repo}/blobs/{digest}")))
        .body(empty())
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    (client, response.into_body())
}

/// Reads frames into `hasher` until at least `limit` bytes have arrived in total or the
/// body ends; returns the running total.
async fn read_into(body: &mut hyper::body::Incoming, hasher: &mut Sha256, mut total: u64, limit: u64) -> Result<u64, BoxError> {
    while total < limit {
        let Some(frame) = body.frame().await else { break };
        if let Ok(data) = frame?.into_data() {
            total += data.len() as u64;
            hasher.update(&data);
        }
    }
    Ok(total)
}

fn https_port_closed(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&format!("127.0.0.1:{port}").parse().unwrap(), Duration::from_millis(200)).is_err()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_blob_download() {
    const SIZE: u64 = 256 << 20;
    let registry = Registry::start();
    let repo = "library/drain";
    let digest = push_blob_to_registry(&registry, repo, SIZE).await;

    for protocol in [Protocol::Http1, Protocol::Http2] {
        let mut gateway = start_gateway(
            &format!("[upstreams]\nharbor_core = \"{}\"\n[timeouts]\ndrain = 60\n", registry.url()),
            "text",
        );
        let (_client, mut body) = start_download(&gateway, protocol, repo, &digest).await;
        let mut hasher = Sha256::new();
        let received = read_into(&mut body, &mut hasher, 0, 16 << 20).await.unwrap();
        assert!(received < SIZE, "{protocol:?}: the transfer finished before the signal");

        send_signal(&gateway, "TERM");
        // Readiness drops at once and new connections are refused, while the download
        // is still open.
        // The signal arrives asynchronously, so "at once" means within a second.
        wait_until(Duration::from_secs(1), "/readyz to answer 503", || async {
            admin_get(&gateway, "/readyz").await.0 == 503
        })
        .await;
        let (_, text) = admin_get(&gateway, "/readyz").await;
        assert!(text.contains("draining"), "{text}");
        wait_until(Duration::from_secs(5), "the https listener to close", || {
            std::future::ready(https_port_closed(gateway.port))
        })
        .await;
        assert!(gateway.process.child.try_wait().unwrap().is_none(), "{protocol:?}: exited during the transfer");

        let received = read_into(&mut body, &mut hasher, received, u64::MAX)
            .await
            .unwrap_or_else(|e| panic!("{protocol:?}: the download broke during the drain: {e}"));
        assert_eq!(received, SIZE, "{protocol:?}");
        assert_eq!(format!("sha256:{}", hex::encode(hasher.finalize())), digest, "{protocol:?}");

        let status = wait_for_exit(&mut gateway, Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "{protocol:?}: {}", gateway.process.log_text());
        let log = gateway.process.log_text();
        assert!(log.contains("draining signal=\"SIGTERM\""), "{log}");
        assert!(log.contains("all connections closed; exiting"), "{log}");
        assert!(log.contains("status=200"), "{log}");
        assert!(log.contains("outcome=\"complete\""), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_period_limits_stalled_transfer() {
    let registry = Registry::start();
    let repo = "library/stalled";
    let digest = push_blob_to_registry(&registry, repo, 64 << 20).await;
    let mut gateway = start_gateway(
        &format!("[upstreams]\nharbor_core = \"{}\"\n[timeouts]\ndrain = 1\n", registry.url()),
        "text",
    );
    let (_client, mut body) = start_download(&gateway, Protocol::Http1, repo, &digest).await;
    read_into(&mut body, &mut Sha256::new(), 0, 1 << 20).await.unwrap();

    // The client stops reading; the drain period ends the wait.
    let signalled = Instant::now();
    send_signal(&gateway, "TERM");
    let status = wait_for_exit(&mut gateway, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    let elapsed = signalled.elapsed();
    assert!(elapsed >= Duration::from_millis(900), "exited after {elapsed:?}, before the drain period");
    let log = gateway.process.log_text();
    assert!(log.contains("drain period ended with connections still open"), "{log}");
    assert!(read_into(&mut body, &mut Sha256::new(), 0, u64::MAX).await.is_err(), "the body should end with an error");
}
