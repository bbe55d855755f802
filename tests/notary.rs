//! Notary through the gateway under `/registry/notary`: the real notary-server behind a
//! recording hop, token authentication by the Harbor token service stand-in, and the real
//! `notary` client.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use base64::Engine;
use http::{Method, Request, StatusCode};
use support::notary_server::NotaryServer;
use support::recorder::Recorder;
use support::token_service::{Policy, TokenService, NOTARY_SERVICE};
use support::*;

/// A GUN with slashes, in the form Docker Content Trust uses: registry host, project, repo.
const GUN: &str = "gateway.test/signed/app";

fn notary_gateway_config(notary: &str, tokens: &str) -> String {
    format!(
        "[upstreams]\nnotary = \"{notary}\"\ntoken = \"{tokens}\"\n\
         [[routes]]\nprefix = \"/service/token\"\nupstream = \"token\"\n"
    )
}

/// The `notary` CLI with its own trust directory, the test CA, and credentials for the
/// token service.
struct NotaryClient {
    home: tempfile::TempDir,
    credentials: String,
}

impl NotaryClient {
    fn new(user: &str, password: &str) -> NotaryClient {
        require_program("notary");
        NotaryClient {
            home: tempfile::tempdir().unwrap(),
            credentials: base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")),
        }
    }

    fn run(&self, server: &str, args: &[&str]) -> Output {
        let trust_dir = self.home.path().join("trust");
        Command::new("notary")
            .args(["-s", server, "-d", trust_dir.to_str().unwrap(), "--tlscacert", ca_file().to_str().unwrap()])
            .args(args)
            // HOME keeps ~/.notary/config.json of this machine out.
            .env("HOME", self.home.path())
            .env("NOTARY_ROOT_PASSPHRASE", "root-passphrase")
            .env("NOTARY_TARGETS_PASSPHRASE", "targets-passphrase")
            .env("NOTARY_SNAPSHOT_PASSPHRASE", "snapshot-passphrase")
            .env("NOTARY_DELEGATION_PASSPHRASE", "delegation-passphrase")
            .env("NOTARY_AUTH", &self.credentials)
            .stdin(Stdio::null())
            .output()
            .expect("run notary")
    }

    fn expect_success(&self, server: &str, args: &[&str]) -> String {
        let output = self.run(server, args);
        assert!(
            output.status.success(),
            "notary {args:?} failed with {}:\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

fn combined_output(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

async fn get(client: &HttpsClient, url: &str) -> (StatusCode, http::HeaderMap, String) {
    let request = Request::builder().method(Method::GET).uri(url).body(empty()).unwrap();
    let response = client.request(request).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body_text(body).await)
}

/// Fails when any exchange reached notary-server with the gateway prefix still on, or
/// came back as a redirect (which the gateway would have passed to the client).
fn assert_clean_exchanges(recorder: &Recorder, notary: &NotaryServer) {
    let exchanges = recorder.exchanges();
    assert!(!exchanges.is_empty());
    for exchange in &exchanges {
        assert!(
            exchange.target.starts_with('/') && !exchange.target.starts_with("/registry"),
            "the gateway prefix reached notary-server: {exchange:?}"
        );
        assert!(!(300..400).contains(&exchange.status), "redirect from notary-server: {exchange:?}");
    }
    for uri in notary.logged_request_uris() {
        assert!(!uri.starts_with("/registry"), "notary-server logged {uri}");
    }
}

fn write_target(dir: &Path) -> (std::path::PathBuf, String, usize) {
    let path = dir.join("target.bin");
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let digest = sha256_digest(&data);
    (path, digest.trim_start_matches("sha256:").to_string(), data.len())
}

#[test]
fn notary_cli_through_gateway() {
    let tokens = TokenService::start(
        Policy::default()
            .user("alice", "alice-password")
            .project("signed", false, &["alice"]),
    );
    let notary = NotaryServer::start(&tokens);
    let recorder = Recorder::start(&notary.url());
    let gateway = Gateway::start(&notary_gateway_config(&recorder.url(), &tokens.url()));
    let server = gateway.url("/registry/notary");
    let client = NotaryClient::new("alice", "alice-password");
    let (target, target_hex, target_size) = write_target(client.home.path());

    client.expect_success(&server, &["init", GUN]);
    client.expect_success(&server, &["add", GUN, "v1", target.to_str().unwrap()]);
    client.expect_success(&server, &["publish", GUN]);

    // A second client with an empty trust directory reads what the first published.
    let reader = NotaryClient::new("alice", "alice-password");
    let listed = reader.expect_success(&server, &["list", GUN]);
    assert!(listed.contains("v1"), "{listed}");
    assert!(listed.contains(&target_hex), "{listed}");
    assert!(listed.contains(&target_size.to_string()), "{listed}");
    let found = reader.expect_success(&server, &["lookup", GUN, "v1"]);
    assert!(found.contains(&target_hex), "{found}");
    assert!(found.contains(&target_size.to_string()), "{found}");

    // A server URL with a trailing slash makes the client request `…/notary//v2/…`. The
    // gateway sends notary-server the clean path, so the client sees no redirect (which it
    // would report as "unable to reach trust server"). The client still fails with 401:
    // it pings `…/notary/v2/` but looks up the token for a request by the request's own
    // `…/notary//v2/` prefix, finds none and sends the request without one.
    let slash_server = format!("{server}/");
    let slashed = NotaryClient::new("alice", "alice-password").run(&slash_server, &["lookup", GUN, "v1"]);
    let text = combined_output(&slashed);
    assert!(!text.contains("unable to reach trust server"), "{text}");
    assert!(text.contains("401"), "{text}");

    client.expect_success(&server, &["delete", GUN, "--remote"]);
    let gone = NotaryClient::new("alice", "alice-password").run(&server, &["list", GUN]);
    assert!(!gone.status.success(), "list after delete succeeded: {}", combined_output(&gone));
    assert!(combined_output(&gone).contains("does not have trust data"), "{}", combined_output(&gone));

    // Token requests for Notary came through the gateway's /service/token route.
    let requests = tokens.requests();
    assert!(requests.iter().any(|r| r.service.as_deref() == Some(NOTARY_SERVICE)
        && r.user.as_deref() == Some("alice")
        && r.scopes.iter().any(|s| s.starts_with(&format!("repository:{GUN}:")) && s.contains("push"))),
        "{requests:?}");
    assert!(requests.iter().all(|r| r.path == "/service/token"), "{requests:?}");

    assert_clean_exchanges(&recorder, &notary);
}

#[test]
fn notary_wrong_password_is_rejected() {
    let tokens = TokenService::start(Policy::default().user("alice", "alice-password").project("signed", false, &["alice"]));
    let notary = NotaryServer::start(&tokens);
    let recorder = Recorder::start(&notary.url());
    let gateway = Gateway::start(&notary_gateway_config(&recorder.url(), &tokens.url()));

    let client = NotaryClient::new("alice", "wrong");
    let output = client.run(&gateway.url("/registry/notary"), &["list", GUN]);
    assert!(!output.status.success(), "{}", combined_output(&output));
    let text = combined_output(&output);
    assert!(text.contains("401") || text.to_lowercase().contains("unauthorized"), "{text}");
    assert!(tokens.requests().iter().any(|r| r.status == 401));
    assert_clean_exchanges(&recorder, &notary);
}

#[tokio::test(flavor = "multi_thread")]
async fn notary_paths_never_redirect() {
    let tokens = TokenService::start(Policy::default());
    let notary = NotaryServer::start(&tokens);
    let recorder = Recorder::start(&notary.url());
    let gateway = Gateway::start(&notary_gateway_config(&recorder.url(), &tokens.url()));
    let client = https_client(Protocol::Http1);
    let public_realm = format!("https://localhost:{}/service/token", gateway.port);

    // (path, expected status). With token auth on, notary-server requests a token even
    // for paths it has no handler for.
    let cases = [
        ("/registry/notary", StatusCode::UNAUTHORIZED),
        ("/registry/notary/", StatusCode::UNAUTHORIZED),
        ("/registry/notary/v2/", StatusCode::UNAUTHORIZED),
        ("/registry/notary//v2/", StatusCode::UNAUTHORIZED),
        ("/registry/notary///v2//", StatusCode::UNAUTHORIZED),
        ("/registry/notary/./v2/", StatusCode::UNAUTHORIZED),
        ("/registry/notary//v2/gateway.test/signed/app/_trust/tuf/root.json", StatusCode::UNAUTHORIZED),
    ];
    for (path, expected) in cases {
        let (status, headers, body) = get(&client, &gateway.url(path)).await;
        assert!(!status.is_redirection(), "{path}: {status} {headers:?}");
        assert_eq!(status, expected, "{path}: {body}");
        if status == StatusCode::UNAUTHORIZED {
            let challenge = headers[http::header::WWW_AUTHENTICATE].to_str().unwrap();
            assert!(
                challenge.starts_with(&format!("Bearer realm=\"{public_realm}\",service=\"{NOTARY_SERVICE}\"")),
                "{path}: {challenge}"
            );
        }
    }
    assert_clean_exchanges(&recorder, &notary);
}

#[tokio::test(flavor = "multi_thread")]
async fn notary_disabled_answers_not_found() {
    let gateway = Gateway::start("[upstreams]\n");
    let client = https_client(Protocol::Http2);
    for path in ["/registry/notary", "/registry/notary/", "/registry/notary/v2/gateway.test/signed/app/_trust/tuf/root.json"] {
        let (status, _, body) = get(&client, &gateway.url(path)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(body.contains("Notary is not enabled"), "{path}: {body}");
    }
}
