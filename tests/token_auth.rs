//! Harbor's token authentication through the gateway: the real `docker-registry` with
//! `auth: token`, a stand-in for Harbor's token service, and skopeo as the client.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine;
use http::{Method, Request, StatusCode};
use support::token_service::{Policy, TokenService, REGISTRY_SERVICE};
use support::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// alice may push and pull `private` and `public`; carol only `other`; `public` allows
/// anonymous pulls.
fn policy() -> Policy {
    Policy::default()
        .user("alice", "alice-password")
        .user("carol", "carol-password")
        .project("private", false, &["alice"])
        .project("public", true, &["alice"])
        .project("other", false, &["carol"])
}

/// Starts the registry trusting `tokens`, and the gateway in front of both, with the token
/// routes pointed at the stand-in as an operator would point them at Harbor core.
fn start_stack(tokens: &TokenService) -> (Registry, Gateway) {
    let registry = Registry::start_with(&tokens.registry_auth_yaml());
    let gateway = Gateway::start(&token_gateway_config(registry.url(), tokens.url()));
    (registry, gateway)
}

fn token_gateway_config(registry: String, tokens: String) -> String {
    format!(
        "[upstreams]\nharbor_core = \"{registry}\"\ntoken = \"{tokens}\"\n\
         [[routes]]\nprefix = \"/service/token\"\nupstream = \"token\"\n\
         [[routes]]\nprefix = \"/registry/service/token\"\nupstream = \"token\"\nstrip_prefix = \"/registry\"\n"
    )
}

/// Writes a one-layer OCI image layout to `dir` under `tag`; returns the manifest digest.
fn write_oci_image(dir: &Path, tag: &str, layer: &[u8]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put_blob = |data: &[u8]| {
        let digest = sha256_digest(data);
        std::fs::write(blobs.join(digest.trim_start_matches("sha256:")), data).unwrap();
        digest
    };
    let layer_digest = put_blob(layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#
    );
    let config_digest = put_blob(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let manifest_digest = put_blob(manifest.as_bytes());
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{manifest_digest}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"{tag}"}}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
    manifest_digest
}

/// Reads the manifest digest that an OCI layout's index lists first.
fn oci_manifest_digest(dir: &Path) -> String {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_string()
}

/// Runs skopeo with the test CA and no stored credentials from this machine.
struct Skopeo {
    cert_dir: tempfile::TempDir,
}

impl Skopeo {
    fn new() -> Skopeo {
        require_program("skopeo");
        let cert_dir = tempfile::tempdir().unwrap();
        std::fs::copy(ca_file(), cert_dir.path().join("ca.crt")).unwrap();
        Skopeo { cert_dir }
    }

    fn copy(&self, source: &str, destination: &str, extra: &[&str]) -> Output {
        let cert_dir = self.cert_dir.path().to_str().unwrap();
        let mut command = Command::new("skopeo");
        // --preserve-digests stops skopeo from compressing the uncompressed test layer, so
        // the pushed and pulled manifests can be compared by digest.
        command
            .arg("copy")
            .args(["--preserve-digests", "--src-cert-dir", cert_dir, "--dest-cert-dir", cert_dir])
            .args(extra)
            .args([source, destination])
            // An auth file that does not exist keeps credentials stored on this machine out.
            .env("REGISTRY_AUTH_FILE", self.cert_dir.path().join("no-auth.json"))
            .env("HOME", self.cert_dir.path());
        command.output().expect("run skopeo")
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed with {}:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        stderr(output)
    );
}

#[test]
fn skopeo_push_pull_with_token_auth() {
    let tokens = TokenService::start(policy());
    let (_registry, gateway) = start_stack(&tokens);
    let skopeo = Skopeo::new();
    let host = format!("localhost:{}", gateway.port);
    let work = tempfile::tempdir().unwrap();

    // Push to a private project with credentials, then pull it back: digests match.
    let layer: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let source = work.path().join("source");
    let manifest_digest = write_oci_image(&source, "v1", &layer);
    let digest_file = work.path().join("pushed.digest");
    let pushed = skopeo.copy(
        &format!("oci:{}:v1", source.display()),
        &format!("docker://{host}/private/app:v1"),
        &["--dest-creds", "alice:alice-password", "--digestfile", digest_file.to_str().unwrap()],
    );
    assert_success(&pushed, "push to private/app");
    assert_eq!(std::fs::read_to_string(&digest_file).unwrap().trim(), manifest_digest);

    let pulled_dir = work.path().join("pulled");
    let pulled = skopeo.copy(
        &format!("docker://{host}/private/app:v1"),
        &format!("oci:{}:v1", pulled_dir.display()),
        &["--src-creds", "alice:alice-password"],
    );
    assert_success(&pulled, "pull of private/app");
    assert_eq!(oci_manifest_digest(&pulled_dir), manifest_digest);
    let layer_digest = sha256_digest(&layer);
    let pulled_layer = pulled_dir.join("blobs/sha256").join(layer_digest.trim_start_matches("sha256:"));
    assert_eq!(file_digest(&pulled_layer), layer_digest);

    // Anonymous pull from a public project.
    let pushed = skopeo.copy(
        &format!("oci:{}:v1", source.display()),
        &format!("docker://{host}/public/base:v1"),
        &["--dest-creds", "alice:alice-password"],
    );
    assert_success(&pushed, "push to public/base");
    let anonymous_dir = work.path().join("anonymous");
    let pulled = skopeo.copy(
        &format!("docker://{host}/public/base:v1"),
        &format!("oci:{}:v1", anonymous_dir.display()),
        &["--src-no-creds"],
    );
    assert_success(&pulled, "anonymous pull of public/base");
    assert_eq!(oci_manifest_digest(&anonymous_dir), manifest_digest);

    // A wrong password gets a 401 from the token service, which skopeo reports as
    // "invalid username/password" with the service's message.
    let rejected = skopeo.copy(
        &format!("docker://{host}/private/app:v1"),
        &format!("oci:{}:v1", work.path().join("wrong-password").display()),
        &["--src-creds", "alice:wrong"],
    );
    assert!(!rejected.status.success(), "pull with a wrong password succeeded");
    let message = stderr(&rejected);
    assert!(message.contains("invalid username/password"), "{message}");
    assert!(message.contains("invalid user name or password"), "{message}");

    // Another project's member and an anonymous client are both denied by the registry.
    for (who, flag) in [("carol", vec!["--src-creds", "carol:carol-password"]), ("anonymous", vec!["--src-no-creds"])] {
        let denied = skopeo.copy(
            &format!("docker://{host}/private/app:v1"),
            &format!("oci:{}:v1", work.path().join(who).display()),
            &flag,
        );
        assert!(!denied.status.success(), "{who} pulled private/app");
        let message = stderr(&denied);
        assert!(
            message.contains("unauthorized") || message.contains("denied") || message.contains("authentication required"),
            "{who}: {message}"
        );
    }

    // Every token request reached the token service through the gateway, unprefixed.
    let requests = tokens.requests();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(request.path, "/service/token", "{request:?}");
        assert_eq!(request.service.as_deref(), Some(REGISTRY_SERVICE), "{request:?}");
    }
    assert!(
        requests
            .iter()
            .any(|r| r.user.as_deref() == Some("alice") && r.scopes.iter().any(|s| s == "repository:private/app:pull,push")),
        "{requests:?}"
    );
    assert!(requests.iter().any(|r| r.status == 401), "no rejected token request: {requests:?}");
}

async fn send(client: &HttpsClient, url: &str, headers: &[(&str, &str)]) -> (StatusCode, http::HeaderMap, String) {
    send_method(client, Method::GET, url, headers).await
}

async fn send_method(
    client: &HttpsClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, String) {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client.request(request.body(empty()).unwrap()).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body_text(body).await)
}

/// The same request straight to the registry over plain HTTP, to compare with what the
/// gateway returns.
async fn send_direct(
    registry: &Registry,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut request = Request::builder().method(method).uri(format!("{}{path}", registry.url()));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client.request(request.body(empty()).unwrap()).await.unwrap();
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body_text(body).await)
}

/// `challenge` with the actions in its `scope` sorted, because distribution lists the
/// actions of one scope in map order, which differs from one request to the next.
fn sort_scope_actions(challenge: &str) -> String {
    let Some(start) = challenge.find("scope=\"") else { return challenge.to_string() };
    let value_start = start + "scope=\"".len();
    let value_end = value_start + challenge[value_start..].find('"').unwrap();
    let scope = &challenge[value_start..value_end];
    let Some((resource, actions)) = scope.rsplit_once(':') else { return challenge.to_string() };
    let mut actions: Vec<&str> = actions.split(',').collect();
    actions.sort_unstable();
    format!("{}{resource}:{}{}", &challenge[..value_start], actions.join(","), &challenge[value_end..])
}

fn challenges(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::WWW_AUTHENTICATE)
        .iter()
        .map(|value| value.to_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn realm_rewrite_keeps_service_scope_and_port() {
    let tokens = TokenService::start(policy());
    let (registry, gateway) = start_stack(&tokens);
    let client = https_client(Protocol::Http1);
    let internal_realm = tokens.realm();

    // (method, path, scope the registry requests)
    let cases = [
        (Method::GET, "/v2/", None),
        (Method::GET, "/v2/private/app/manifests/v1", Some("repository:private/app:pull")),
        (Method::POST, "/v2/private/app/blobs/uploads/", Some("repository:private/app:pull,push")),
    ];
    for (host, public_realm) in [
        ("gateway.test:8443", "https://gateway.test:8443/service/token".to_string()),
        ("gateway.test", "https://gateway.test/service/token".to_string()),
        (&format!("localhost:{}", gateway.port), format!("https://localhost:{}/service/token", gateway.port)),
    ] {
        for (method, path, scope) in &cases {
            let direct = send_direct(&registry, method.clone(), path, &[]).await;
            let proxied = send_method(&client, method.clone(), &gateway.url(path), &[("host", host)]).await;
            assert_eq!(proxied.0, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert_eq!(proxied.0, direct.0, "{method} {path}: status");
            assert_eq!(proxied.2, direct.2, "{method} {path}: body");

            let direct_challenges = challenges(&direct.1);
            let proxied_challenges = challenges(&proxied.1);
            assert_eq!(direct_challenges.len(), 1, "{direct_challenges:?}");
            assert_eq!(proxied_challenges.len(), 1, "{proxied_challenges:?}");
            let expected = sort_scope_actions(&direct_challenges[0].replace(&internal_realm, &public_realm));
            assert_ne!(expected, direct_challenges[0], "the registry's realm is not {internal_realm}");
            assert_eq!(sort_scope_actions(&proxied_challenges[0]), expected, "{host} {method} {path}");
            assert!(expected.starts_with(&format!("Bearer realm=\"{public_realm}\",service=\"{REGISTRY_SERVICE}\"")), "{expected}");
            if let Some(scope) = scope {
                assert!(expected.ends_with(&format!(",scope=\"{scope}\"")), "{expected}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn denied_pull_passes_through_unchanged() {
    let tokens = TokenService::start(policy());
    let (registry, gateway) = start_stack(&tokens);
    let client = https_client(Protocol::Http2);

    // carol gets a token, through the gateway, that grants nothing on private/app.
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("carol:carol-password"));
    let token_url = gateway.url("/service/token?service=harbor-registry&scope=repository%3Aprivate%2Fapp%3Apull");
    let (status, _, body) = send(&client, &token_url, &[("authorization", &basic)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = json["token"].as_str().unwrap();
    assert_eq!(json["access_token"].as_str(), Some(token));
    assert!(json["expires_in"].as_u64().unwrap() > 0);
    assert!(json["issued_at"].as_str().unwrap().ends_with('Z'));

    let bearer = format!("Bearer {token}");
    let path = "/v2/private/app/manifests/v1";
    let direct = send_direct(&registry, Method::GET, path, &[("authorization", &bearer)]).await;
    let proxied = send(&client, &gateway.url(path), &[("authorization", &bearer)]).await;
    assert!(matches!(direct.0, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN), "{direct:?}");
    assert_eq!(proxied.0, direct.0);
    assert_eq!(proxied.2, direct.2);
    assert!(proxied.2.contains("UNAUTHORIZED") || proxied.2.contains("DENIED"), "{}", proxied.2);
    assert_eq!(proxied.1["docker-distribution-api-version"], "registry/2.0");
    let challenge = challenges(&proxied.1).join(" ");
    assert!(challenge.contains("error=\"insufficient_scope\""), "{challenge}");

    // The same registry accepts a token that grants the scope: the signature verifies.
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("alice:alice-password"));
    let (status, _, body) = send(&client, &token_url, &[("authorization", &basic)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let bearer = format!("Bearer {}", json["token"].as_str().unwrap());
    let (status, _, body) = send(&client, &gateway.url(path), &[("authorization", &bearer)]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("MANIFEST_UNKNOWN") || body.contains("NAME_UNKNOWN"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn prefixed_token_route_strips_prefix() {
    let tokens = TokenService::start(policy());
    let (_registry, gateway) = start_stack(&tokens);
    let client = https_client(Protocol::Http1);
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("alice:alice-password"));

    let url = gateway.url("/registry/service/token?service=harbor-registry&scope=repository%3Apublic%2Fbase%3Apull%2Cpush");
    let (status, _, body) = send(&client, &url, &[("authorization", &basic)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(json["token"].as_str().unwrap().split('.').count() == 3, "{body}");

    let requests = tokens.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].path, "/service/token");
    assert_eq!(requests[0].scopes, vec!["repository:public/base:pull,push".to_string()]);
    assert_eq!(requests[0].user.as_deref(), Some("alice"));

    // A wrong password is the token service's 401, passed through.
    let wrong = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("alice:wrong"));
    let (status, _, body) = send(&client, &url, &[("authorization", &wrong)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("UNAUTHORIZED"), "{body}");

    // Harbor's internal webhook endpoint is never exposed.
    for path in ["/service/notifications", "/service/notifications/events", "/registry/service/notifications"] {
        let (status, _, _) = send_method(&client, Method::POST, &gateway.url(path), &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(tokens.requests().len(), 2, "a notifications request reached the token service");
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_realm_is_untouched() {
    // A registry whose realm points at an origin that is no upstream of the gateway. The
    // name is under .invalid and nothing ever connects to it.
    let tokens = TokenService::start(policy());
    let foreign = "https://token.invalid/service/token";
    let auth = tokens.registry_auth_yaml().replace(&tokens.realm(), foreign);
    let registry = Registry::start_with(&auth);
    let gateway = Gateway::start(&token_gateway_config(registry.url(), tokens.url()));
    let client = https_client(Protocol::Http1);

    let path = "/v2/private/app/manifests/v1";
    let direct = send_direct(&registry, Method::GET, path, &[]).await;
    let proxied = send(&client, &gateway.url(path), &[("host", "gateway.test:8443")]).await;
    assert_eq!(proxied.0, StatusCode::UNAUTHORIZED);
    let direct_challenges = challenges(&direct.1);
    assert!(direct_challenges[0].contains(foreign), "{direct_challenges:?}");
    assert_eq!(challenges(&proxied.1), direct_challenges);
}
