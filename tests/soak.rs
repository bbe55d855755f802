//! A bounded soak on loopback: blob pushes and pulls over HTTP/1.1 and HTTP/2 to the real
//! registry, mixed with bad requests and dropped connections, for `SOAK_SECONDS` (default
//! 75). Good clients must see no error, every upload's digest must be confirmed by the
//! registry, and the gateway's memory and file descriptors must not grow.
//!
//! TODO: add WebSocket sessions to the mix once the gateway proxies WebSocket upgrades.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode};
use support::fixtures::*;
use support::*;

/// Resident memory (VmRSS) in KiB and open file descriptors of a process.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    (rss, fds)
}

#[derive(Default)]
struct Counters {
    pushes: AtomicU64,
    pulls: AtomicU64,
    rejected: AtomicU64,
    dropped: AtomicU64,
}

async fn push_and_pull(gateway_url: String, protocol: Protocol, worker: u64, until: Instant, counters: Arc<Counters>) {
    let client = https_client(protocol);
    let mut round = 0u64;
    while Instant::now() < until {
        round += 1;
        let size = 64 * 1024 + ((worker * 7919 + round * 104_729) % (1 << 20)) as usize;
        let data: Vec<u8> = (0..size).map(|i| ((i as u64 * 31 + worker + round) % 251) as u8).collect();
        let digest = sha256_digest(&data);
        let repo = format!("soak/w{worker}");

        let started = client
            .request(Request::post(format!("{gateway_url}/v2/{repo}/blobs/uploads/")).body(empty()).unwrap())
            .await
            .expect("POST upload");
        assert_eq!(started.status(), StatusCode::ACCEPTED);
        let location = started.headers()["location"].to_str().unwrap().to_string();
        let done = client
            .request(
                Request::builder()
                    .method(Method::PUT)
                    .uri(format!("{location}&digest={digest}"))
                    .body(full(data))
                    .unwrap(),
            )
            .await
            .expect("PUT upload");
        assert_eq!(done.status(), StatusCode::CREATED, "{}", body_text(done.into_body()).await);
        // The registry computed the digest of what arrived; it must be what was sent.
        assert_eq!(done.headers()["docker-content-digest"], digest.as_str());
        counters.pushes.fetch_add(1, Ordering::Relaxed);

        let pulled = client
            .request(Request::get(format!("{gateway_url}/v2/{repo}/blobs/{digest}")).body(empty()).unwrap())
            .await
            .expect("GET blob");
        assert_eq!(pulled.status(), StatusCode::OK);
        let (pulled_digest, length) = hash_body(pulled.into_body()).await.expect("blob body");
        assert_eq!((pulled_digest, length), (digest, size as u64));
        counters.pulls.fetch_add(1, Ordering::Relaxed);
    }
}

async fn misbehave(port: u16, until: Instant, counters: Arc<Counters>) {
    let bad_requests: [&[u8]; 4] = [
        b"GET /v2/../service/notifications HTTP/1.1\r\nhost: localhost\r\n\r\n",
        b"POST /v2/ HTTP/1.1\r\nhost: localhost\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        b"GET /registry/%2e%2e/v3 HTTP/1.1\r\nhost: localhost\r\n\r\n",
        b"POST /v2/x/blobs/uploads/ HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ];
    let mut round = 0usize;
    while Instant::now() < until {
        round += 1;
        let request = bad_requests[round % bad_requests.len()];
        let (response, _) = raw_http1(port, request, Duration::from_millis(300)).await;
        assert_eq!(status_of(&response), 400, "{}: {response}", String::from_utf8_lossy(request));
        counters.rejected.fetch_add(1, Ordering::Relaxed);

        // A client that sends half a header section and disappears.
        let mut tls = tls_connect(port, "http/1.1").await;
        write_tolerant(&mut tls, b"GET /v2/ HTTP/1.1\r\nhost: loc").await;
        drop(tls);
        // A client that connects and never starts TLS.
        drop(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        counters.dropped.fetch_add(2, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_mix(base: &str, port: u16, until: Instant, counters: Arc<Counters>) {
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let protocol = if worker % 2 == 0 { Protocol::Http1 } else { Protocol::Http2 };
        tasks.push(tokio::spawn(push_and_pull(base.to_string(), protocol, worker, until, counters.clone())));
    }
    tasks.push(tokio::spawn(misbehave(port, until, counters.clone())));
    for task in tasks {
        task.await.expect("a soak worker failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_mixed_traffic() {
    let seconds: u64 = std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(75);
    let registry = Registry::start();
    let gateway = Gateway::start(&format!(
        "[upstreams]\nharbor_core = \"{}\"\n[timeouts]\nkeep_alive = 2\nheader_read = 2\n",
        registry.url()
    ));
    let pid = gateway.process.pid();
    let base = gateway.url("");

    // Warm up with the same mix, so pools, TLS state and allocator arenas reach their
    // working size before the baseline is taken.
    let counters = Arc::new(Counters::default());
    run_mix(&base, gateway.port, Instant::now() + Duration::from_secs(15), counters.clone()).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (rss_start, fds_start) = usage(pid);

    let counters = Arc::new(Counters::default());
    run_mix(&base, gateway.port, Instant::now() + Duration::from_secs(seconds), counters.clone()).await;

    // Clients are gone; idle connections close after keep_alive.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (rss_end, fds_end) = usage(pid);
    eprintln!(
        "soak: {seconds} s, {} pushes, {} pulls, {} rejected, {} dropped connections; \
         RSS {rss_start} -> {rss_end} KiB, fds {fds_start} -> {fds_end}",
        counters.pushes.load(Ordering::Relaxed),
        counters.pulls.load(Ordering::Relaxed),
        counters.rejected.load(Ordering::Relaxed),
        counters.dropped.load(Ordering::Relaxed),
    );
    assert!(counters.pushes.load(Ordering::Relaxed) > 0, "no push completed");
    assert!(counters.rejected.load(Ordering::Relaxed) > 0, "no bad request was sent");
    assert!(fds_end <= fds_start + 4, "file descriptors grew from {fds_start} to {fds_end}");
    assert!(rss_end <= rss_start + 24 * 1024, "RSS grew from {rss_start} KiB to {rss_end} KiB");
}
