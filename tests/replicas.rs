//! Gateway replicas share nothing: the registry keeps the upload state, so the requests of one
//! chunked upload may land on different gateway processes, as behind a Kubernetes Service.

mod support;

use http::{Method, Request, StatusCode};
use support::*;

/// Moves an upload URL from one replica's public origin to another's.
fn on_replica(url: &str, from: &Gateway, to: &Gateway) -> String {
    url.replacen(&from.url(""), &to.url(""), 1)
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_upload_across_replicas() {
    let registry = Registry::start();
    let first = Gateway::in_front_of(&registry);
    let second = Gateway::in_front_of(&registry);
    let replicas = [&first, &second];
    let client = https_client(Protocol::Http1);

    let layer: Vec<u8> = (0..4 * 1_048_576u32).map(|i| (i.wrapping_mul(2_246_822_519) >> 13) as u8).collect();
    let digest = sha256_digest(&layer);

    let start = Request::post(first.url("/v2/team/app/blobs/uploads/")).body(empty()).unwrap();
    let started = client.request(start).await.unwrap();
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let mut location = started.headers()["location"].to_str().unwrap().to_string();
    let mut current = &first;

    // Each PATCH goes to the other replica than the previous request did.
    let mut offset = 0;
    for (index, chunk) in layer.chunks(1_048_576).enumerate() {
        let next = replicas[(index + 1) % 2];
        let url = on_replica(&location, current, next);
        let range = format!("{}-{}", offset, offset + chunk.len() - 1);
        let patch = Request::builder()
            .method(Method::PATCH)
            .uri(&url)
            .header("content-type", "application/octet-stream")
            .header("content-range", &range)
            .body(full(chunk.to_vec()))
            .unwrap();
        let patched = client.request(patch).await.unwrap();
        assert_eq!(patched.status(), StatusCode::ACCEPTED, "PATCH {range} on replica {}", next.port);
        location = patched.headers()["location"].to_str().unwrap().to_string();
        assert!(location.starts_with(&next.url("/v2/")), "{location} is not on replica {}", next.port);
        current = next;
        offset += chunk.len();
    }

    let other = if current.port == first.port { &second } else { &first };
    let put = Request::put(format!("{}&digest={digest}", on_replica(&location, current, other)))
        .body(empty())
        .unwrap();
    let committed = client.request(put).await.unwrap();
    assert_eq!(committed.status(), StatusCode::CREATED, "{}", body_text(committed.into_body()).await);

    // Both replicas serve the committed blob.
    for replica in replicas {
        let get = Request::get(replica.url(&format!("/v2/team/app/blobs/{digest}"))).body(empty()).unwrap();
        let response = client.request(get).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let (pulled, length) = hash_body(response.into_body()).await.unwrap();
        assert_eq!(pulled, digest, "replica {}", replica.port);
        assert_eq!(length, layer.len() as u64);
    }
}
