//! Docker Registry HTTP API V2 flows through the gateway to the real `docker-registry`,
//! over HTTP/1.1 and HTTP/2.

mod support;

use http::{Method, Request, StatusCode};
use support::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

struct Api {
    client: HttpsClient,
    base: String,
}

impl Api {
    fn new(gateway: &Gateway, protocol: Protocol) -> Api {
        Api {
            client: https_client(protocol),
            base: gateway.url(""),
        }
    }

    async fn send(
        &self,
        method: Method,
        path_or_url: &str,
        headers: &[(&str, &str)],
        body: TestBody,
    ) -> http::Response<hyper::body::Incoming> {
        let url = if path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else {
            format!("{}{path_or_url}", self.base)
        };
        let mut request = Request::builder().method(method).uri(&url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.client
            .request(request.body(body).unwrap())
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    /// POST then PUT with the digest: a monolithic upload. Returns the blob's digest.
    async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256_digest(data);
        let started = self.send(Method::POST, &format!("/v2/{repo}/blobs/uploads/"), &[], empty()).await;
        assert_eq!(started.status(), StatusCode::ACCEPTED);
        let location = location(&started);
        assert!(location.starts_with(&self.base), "upload Location {location} is not public");

        let put_url = format!("{location}&digest={digest}");
        let done = self
            .send(Method::PUT, &put_url, &[("content-type", "application/octet-stream")], full(data.to_vec()))
            .await;
        assert_eq!(done.status(), StatusCode::CREATED, "{}", body_text(done.into_body()).await);
        digest
    }
}

fn location(response: &http::Response<hyper::body::Incoming>) -> String {
    response.headers()["location"].to_str().unwrap().to_string()
}

fn manifest_json(config: (&str, usize), layers: &[(&str, usize)]) -> String {
    let layers: Vec<String> = layers
        .iter()
        .map(|(digest, size)| {
            format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{digest}","size":{size}}}"#)
        })
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
        config.0,
        config.1,
        layers.join(",")
    )
}

async fn api_flows(protocol: Protocol) {
    let registry = Registry::start();
    let gateway = Gateway::in_front_of(&registry);
    let api = Api::new(&gateway, protocol);
    let repo = "library/flows";

    // Base check: the API version header passes through.
    let base = api.send(Method::GET, "/v2/", &[], empty()).await;
    assert_eq!(base.status(), StatusCode::OK);
    assert_eq!(base.headers()["docker-distribution-api-version"], "registry/2.0");

    // Monolithic upload.
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = api.push_blob(repo, config).await;
    let small_layer: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let small_digest = api.push_blob(repo, &small_layer).await;

    // Chunked upload: POST, three PATCHes with Content-Range, PUT with the digest.
    let chunked_layer: Vec<u8> = (0..3 * 1_048_576u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let chunked_digest = sha256_digest(&chunked_layer);
    let started = api.send(Method::POST, &format!("/v2/{repo}/blobs/uploads/"), &[], empty()).await;
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let mut upload = location(&started);
    let mut offset = 0;
    for chunk in chunked_layer.chunks(1_048_576) {
        let range = format!("{}-{}", offset, offset + chunk.len() - 1);
        let patched = api
            .send(
                Method::PATCH,
                &upload,
                &[("content-type", "application/octet-stream"), ("content-range", &range)],
                full(chunk.to_vec()),
            )
            .await;
        assert_eq!(patched.status(), StatusCode::ACCEPTED, "PATCH {range}");
        assert_eq!(patched.headers()["range"], format!("0-{}", offset + chunk.len() - 1));
        assert!(patched.headers().contains_key("docker-upload-uuid"));
        upload = location(&patched);
        assert!(upload.starts_with(&api.base), "PATCH Location {upload} is not public");
        offset += chunk.len();
    }
    let done = api.send(Method::PUT, &format!("{upload}&digest={chunked_digest}"), &[], empty()).await;
    assert_eq!(done.status(), StatusCode::CREATED);
    assert_eq!(done.headers()["docker-content-digest"], chunked_digest.as_str());

    // Manifest PUT by tag, then HEAD and GET with the Accept header clients send.
    let manifest = manifest_json(
        (&config_digest, config.len()),
        &[(&small_digest, small_layer.len()), (&chunked_digest, chunked_layer.len())],
    );
    let manifest_digest = sha256_digest(manifest.as_bytes());
    let put = api
        .send(Method::PUT, &format!("/v2/{repo}/manifests/v1"), &[("content-type", OCI_MANIFEST)], full(manifest.clone()))
        .await;
    assert_eq!(put.status(), StatusCode::CREATED, "{}", body_text(put.into_body()).await);

    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let head = api.send(Method::HEAD, &format!("/v2/{repo}/manifests/v1"), &[("accept", accept)], empty()).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["docker-content-digest"], manifest_digest.as_str());
    assert_eq!(head.headers()["content-length"], manifest.len().to_string().as_str());
    assert_eq!(head.headers()["content-type"], OCI_MANIFEST);

    let get = api.send(Method::GET, &format!("/v2/{repo}/manifests/v1"), &[("accept", accept)], empty()).await;
    assert_eq!(get.status(), StatusCode::OK);
    assert_eq!(body_text(get.into_body()).await, manifest);

    let by_digest = api
        .send(Method::GET, &format!("/v2/{repo}/manifests/{manifest_digest}"), &[("accept", accept)], empty())
        .await;
    assert_eq!(by_digest.status(), StatusCode::OK);

    // Blob HEAD and GET by digest.
    let head = api.send(Method::HEAD, &format!("/v2/{repo}/blobs/{chunked_digest}"), &[], empty()).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"], chunked_layer.len().to_string().as_str());
    let get = api.send(Method::GET, &format!("/v2/{repo}/blobs/{chunked_digest}"), &[], empty()).await;
    assert_eq!(get.status(), StatusCode::OK);
    let (digest, length) = hash_body(get.into_body()).await.unwrap();
    assert_eq!(digest, chunked_digest);
    assert_eq!(length, chunked_layer.len() as u64);

    // Range requests pass through untouched.
    let ranged = api
        .send(Method::GET, &format!("/v2/{repo}/blobs/{small_digest}"), &[("range", "bytes=10-19")], empty())
        .await;
    assert_eq!(ranged.status(), StatusCode::PARTIAL_CONTENT);
    let bytes = http_body_util::BodyExt::collect(ranged.into_body()).await.unwrap().to_bytes();
    assert_eq!(&bytes[..], &small_layer[10..20]);

    // Cross-repository mount.
    let other = "library/mounted";
    let mounted = api
        .send(Method::POST, &format!("/v2/{other}/blobs/uploads/?mount={chunked_digest}&from={repo}"), &[], empty())
        .await;
    assert_eq!(mounted.status(), StatusCode::CREATED);
    assert_eq!(location(&mounted), format!("{}/v2/{other}/blobs/{chunked_digest}", api.base));
    let head = api.send(Method::HEAD, &format!("/v2/{other}/blobs/{chunked_digest}"), &[], empty()).await;
    assert_eq!(head.status(), StatusCode::OK);

    // Tag listing and catalog.
    let tags = api.send(Method::GET, &format!("/v2/{repo}/tags/list"), &[], empty()).await;
    assert_eq!(tags.status(), StatusCode::OK);
    assert_eq!(body_text(tags.into_body()).await.trim(), format!(r#"{{"name":"{repo}","tags":["v1"]}}"#));
    let catalog = api.send(Method::GET, "/v2/_catalog?n=10", &[], empty()).await;
    assert!(body_text(catalog.into_body()).await.contains("library/mounted"));

    // Blob delete, then the registry's own JSON 404 passes through.
    let deleted = api.send(Method::DELETE, &format!("/v2/{other}/blobs/{chunked_digest}"), &[], empty()).await;
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    let gone = api.send(Method::GET, &format!("/v2/{other}/blobs/{chunked_digest}"), &[], empty()).await;
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    assert!(body_text(gone.into_body()).await.contains("BLOB_UNKNOWN"));

    // A digest that does not match the body is rejected by the registry, not hidden.
    let started = api.send(Method::POST, &format!("/v2/{repo}/blobs/uploads/"), &[], empty()).await;
    let wrong = sha256_digest(b"something else");
    let bad = api.send(Method::PUT, &format!("{}&digest={wrong}", location(&started)), &[], full(&b"data"[..])).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert!(body_text(bad.into_body()).await.contains("DIGEST_INVALID"));
}

#[tokio::test(flavor = "multi_thread")]
async fn api_flows_http1() {
    api_flows(Protocol::Http1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn api_flows_http2() {
    api_flows(Protocol::Http2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_registry_gives_json_502() {
    let dead_port = free_port();
    let gateway = Gateway::start(&format!("[upstreams]\nharbor_core = \"http://127.0.0.1:{dead_port}\"\n"));
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let api = Api::new(&gateway, protocol);
        let response = api.send(Method::GET, "/v2/", &[], empty()).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()["docker-distribution-api-version"], "registry/2.0");
        assert_eq!(response.headers()["content-type"], "application/json; charset=utf-8");
        let body = body_text(response.into_body()).await;
        assert!(body.starts_with(r#"{"errors":[{"code":"UNAVAILABLE","message":"upstream harbor_core is unreachable""#), "{body}");
    }

    // Outside /v2/ the same failure is plain text.
    let gateway = Gateway::start(&format!("[upstreams]\nrancher = \"http://127.0.0.1:{dead_port}\"\n"));
    let api = Api::new(&gateway, Protocol::Http1);
    let response = api.send(Method::GET, "/dashboard/", &[], empty()).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(response.headers()["content-type"], "text/plain; charset=utf-8");
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_reach_registry() {
    // The registry builds upload Locations from Host and X-Forwarded-Proto, so a public
    // https Location on the client's host:port proves both arrived.
    let registry = Registry::start();
    let gateway = Gateway::in_front_of(&registry);
    let api = Api::new(&gateway, Protocol::Http2);
    let started = api
        .send(
            Method::POST,
            "/v2/x/y/blobs/uploads/",
            &[("x-forwarded-proto", "http"), ("x-forwarded-host", "evil.example")],
            empty(),
        )
        .await;
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let location = location(&started);
    assert!(
        location.starts_with(&format!("https://localhost:{}/v2/x/y/blobs/uploads/", gateway.port)),
        "{location}"
    );
}
