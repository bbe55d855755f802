//! A bounded soak on loopback: blob pushes and pulls over HTTP/1.1 and HTTP/2 to the real
//! registry, WebSocket sessions to a Rancher fixture over both protocols, bad requests and
//! dropped connections, for `SOAK_SECONDS` (default 75). Good clients must see no error,
//! every upload's digest must be confirmed by the registry, every WebSocket message must
//! come back byte for byte, and the gateway's memory and file descriptors must not grow.
//! Some WebSocket sessions are abandoned with a bare TCP close, and no tunnel may outlive
//! its client.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode};
use support::fixtures::*;
use support::rancher::Rancher;
use support::websocket::{close_cleanly, echo_all, messages, open_http1, open_http2};
use tokio_tungstenite::tungstenite::Message;
use support::*;

/// One WebSocket session in this many is abandoned without a close frame.
const ABANDON_EVERY: u64 = 4;
/// Messages echoed in each WebSocket session.
const MESSAGES_PER_SESSION: usize = 6;
/// Maximum size of a binary WebSocket message, and of the large one sent every eighth
/// session. The large one spans many reads and TLS records in the tunnel.
const MAX_BINARY: usize = 64 << 10;
const MAX_LARGE_BINARY: usize = 1 << 20;
/// Pause between one worker's WebSocket sessions. In one 75 s run on two shared cores,
/// sessions back to back halved the blob pushes completed (6864 to 3301).
const SESSION_PAUSE: Duration = Duration::from_millis(50);

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
    websocket_closed: AtomicU64,
    websocket_abandoned: AtomicU64,
    websocket_messages: AtomicU64,
    websocket_bytes: AtomicU64,
    /// WebSocket sessions that failed, each with its error.
    websocket_failures: Mutex<Vec<String>>,
}

impl Counters {
    fn websocket_sessions(&self) -> u64 {
        self.websocket_closed.load(Ordering::Relaxed) + self.websocket_abandoned.load(Ordering::Relaxed)
    }
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

/// Opens WebSocket sessions one after another until `until`, over HTTP/1.1 Upgrade for even
/// workers and HTTP/2 extended CONNECT for odd ones. Failures are counted, not raised, so
/// that the soak reports all of them at the end.
async fn websocket_sessions(port: u16, worker: u64, until: Instant, counters: Arc<Counters>) {
    let mut session = 0u64;
    while Instant::now() < until {
        session += 1;
        let seed = (worker << 32) | session;
        let abandon = session % ABANDON_EVERY == 0;
        let max_binary = if session % 8 == 1 { MAX_LARGE_BINARY } else { MAX_BINARY };
        let batch = messages(seed, MESSAGES_PER_SESSION, max_binary);
        let target = format!("/v3/subscribe?sockId={seed}");
        let result = if worker % 2 == 0 {
            http1_session(port, &target, batch, abandon).await
        } else {
            http2_session(port, &target, batch, abandon).await
        };

        match result {
            Ok(bytes) => {
                counters.websocket_messages.fetch_add(MESSAGES_PER_SESSION as u64, Ordering::Relaxed);
                counters.websocket_bytes.fetch_add(bytes, Ordering::Relaxed);
                let finished = if abandon { &counters.websocket_abandoned } else { &counters.websocket_closed };
                finished.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                let protocol = if worker % 2 == 0 { "HTTP/1.1" } else { "HTTP/2" };
                counters.websocket_failures.lock().unwrap().push(format!("{protocol} session {target}: {error}"));
            }
        }
        tokio::time::sleep(SESSION_PAUSE).await;
    }
}

/// Echoes `batch` over a WebSocket opened with an HTTP/1.1 Upgrade, then closes it with the
/// closing handshake, or with `abandon` drops the TCP stream without a close frame.
/// Returns the bytes echoed.
async fn http1_session(port: u16, target: &str, batch: Vec<Message>, abandon: bool) -> Result<u64, BoxError> {
    let mut socket = open_http1(port, target).await?;
    let bytes = echo_all(&mut socket, batch).await?;
    if abandon {
        drop(socket);
    } else {
        close_cleanly(&mut socket).await?;
    }
    Ok(bytes)
}

/// Like [`http1_session`] over an HTTP/2 extended CONNECT. Abandoning drops the whole
/// HTTP/2 connection, so the gateway gets a TCP close without GOAWAY or RST_STREAM.
async fn http2_session(port: u16, target: &str, batch: Vec<Message>, abandon: bool) -> Result<u64, BoxError> {
    let mut session = open_http2(port, target).await?;
    let bytes = echo_all(&mut session.socket, batch).await?;
    if abandon {
        session.connection.abort();
    } else {
        close_cleanly(&mut session.socket).await?;
    }
    Ok(bytes)
}

async fn run_mix(base: &str, port: u16, until: Instant, counters: Arc<Counters>) {
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let protocol = if worker % 2 == 0 { Protocol::Http1 } else { Protocol::Http2 };
        tasks.push(tokio::spawn(push_and_pull(base.to_string(), protocol, worker, until, counters.clone())));
    }
    for worker in 0..2 {
        tasks.push(tokio::spawn(websocket_sessions(port, worker, until, counters.clone())));
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
    let rancher = Rancher::start().await;
    let gateway = Gateway::start(&format!(
        "[upstreams]\nharbor_core = \"{}\"\nrancher = \"{}\"\n[upstream_tls]\nca_file = \"{}\"\n\
         [timeouts]\nkeep_alive = 2\nheader_read = 2\n",
        registry.url(),
        rancher.url(),
        ca_file().display()
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
    let rancher_open = rancher.seen.lock().unwrap().open_sockets;
    let failures = counters.websocket_failures.lock().unwrap().clone();
    eprintln!(
        "soak: {seconds} s, {} pushes, {} pulls, {} rejected, {} dropped connections; \
         RSS {rss_start} -> {rss_end} KiB, fds {fds_start} -> {fds_end}",
        counters.pushes.load(Ordering::Relaxed),
        counters.pulls.load(Ordering::Relaxed),
        counters.rejected.load(Ordering::Relaxed),
        counters.dropped.load(Ordering::Relaxed),
    );
    eprintln!(
        "soak: {} WebSocket sessions ({} closed, {} abandoned), {} messages, {} KiB echoed, \
         {} failed; {rancher_open} still open at Rancher",
        counters.websocket_sessions(),
        counters.websocket_closed.load(Ordering::Relaxed),
        counters.websocket_abandoned.load(Ordering::Relaxed),
        counters.websocket_messages.load(Ordering::Relaxed),
        counters.websocket_bytes.load(Ordering::Relaxed) / 1024,
        failures.len(),
    );
    for failure in failures.iter().take(5) {
        eprintln!("soak: WebSocket failure: {failure}");
    }
    assert!(counters.pushes.load(Ordering::Relaxed) > 0, "no push completed");
    assert!(counters.rejected.load(Ordering::Relaxed) > 0, "no bad request was sent");
    assert!(failures.is_empty(), "{} WebSocket sessions failed, first: {}", failures.len(), failures[0]);
    assert!(counters.websocket_closed.load(Ordering::Relaxed) > 0, "no WebSocket session closed cleanly");
    assert!(counters.websocket_abandoned.load(Ordering::Relaxed) > 0, "no WebSocket session was abandoned");
    assert_eq!(rancher_open, 0, "WebSocket sessions outlived their clients at the Rancher fixture");
    assert!(fds_end <= fds_start + 4, "file descriptors grew from {fds_start} to {fds_end}");
    assert!(rss_end <= rss_start + 24 * 1024, "RSS grew from {rss_start} KiB to {rss_end} KiB");
}
