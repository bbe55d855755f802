//! A 2 GiB blob pushed and pulled through the gateway: the gateway's memory stays flat
//! because bodies stream frame by frame. The peak RSS is written to artifacts/ for the
//! benchmark record.

mod support;

use http::{Method, Request, StatusCode};
use support::*;

const BLOB_BYTES: u64 = 2 << 30;
/// The gateway's peak RSS must stay under this while the blob moves both ways.
const MAX_PEAK_RSS_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn two_gib_blob_keeps_memory_flat() {
    let registry = Registry::start();
    let gateway = Gateway::in_front_of(&registry);
    let work = tempfile::tempdir().unwrap();
    let blob = work.path().join("blob");
    let digest = write_random_file(&blob, BLOB_BYTES, 42);
    let rss_at_start = gateway.peak_rss_kib();

    // Monolithic push over HTTP/1.1, streamed from disk.
    let client = https_client(Protocol::Http1);
    let start = Request::post(gateway.url("/v2/large/blob/blobs/uploads/")).body(empty()).unwrap();
    let started = client.request(start).await.unwrap();
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let put = Request::put(format!("{location}&digest={digest}"))
        .header("content-length", BLOB_BYTES)
        .header("content-type", "application/octet-stream")
        .body(file_body(&blob))
        .unwrap();
    let pushed = client.request(put).await.unwrap();
    assert_eq!(pushed.status(), StatusCode::CREATED, "{}", body_text(pushed.into_body()).await);
    let rss_after_push = gateway.peak_rss_kib();

    // Pull over HTTP/1.1 and HTTP/2, hashing as the frames arrive.
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let client = https_client(protocol);
        let get = Request::builder()
            .method(Method::GET)
            .uri(gateway.url(&format!("/v2/large/blob/blobs/{digest}")))
            .body(empty())
            .unwrap();
        let response = client.request(get).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{protocol:?}");
        let (pulled, length) = hash_body(response.into_body()).await.unwrap();
        assert_eq!(length, BLOB_BYTES, "{protocol:?} length");
        assert_eq!(pulled, digest, "{protocol:?} digest");
    }
    let peak = gateway.peak_rss_kib();

    let record = format!(
        "2 GiB blob through harbor-gateway (push HTTP/1.1, pull HTTP/1.1 and HTTP/2)\n\
         peak RSS at start: {rss_at_start} KiB\n\
         peak RSS after push: {rss_after_push} KiB\n\
         peak RSS after both pulls: {peak} KiB\n"
    );
    println!("{record}");
    let artifacts = repo_path("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("large-blob-rss.txt"), &record).unwrap();

    assert!(peak < MAX_PEAK_RSS_KIB, "gateway peak RSS {peak} KiB is over {MAX_PEAK_RSS_KIB} KiB");
}
