//! A stand-in for Harbor core's token service (`GET /service/token`), since Harbor core
//! itself cannot run here.
//!
//! It follows the protocol that distribution documents for token authentication and that
//! Harbor implements: the client sends `service` and one or more `scope` parameters, with
//! Basic credentials or none, and gets back a JWT that lists the granted `access`. The JWT
//! is signed with ES256 by a key whose self-signed certificate the registry and
//! notary-server load as `rootcertbundle`. The header names the key by `kid` in libtrust
//! fingerprint form, which distribution's verifier (2.8 and the copy inside notary-server)
//! looks up among the keys of that bundle.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hyper::body::Incoming;
use hyper::{Request, Response};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use super::local_server::{respond, LocalServer, ServerBody};

/// Issuer name in tokens; the same default as Harbor's `harbor-token-issuer`.
pub const ISSUER: &str = "harbor-token-issuer";
/// Service names Harbor uses for the registry and for Notary.
pub const REGISTRY_SERVICE: &str = "harbor-registry";
pub const NOTARY_SERVICE: &str = "harbor-notary";
/// Token lifetime in seconds; Harbor's default is 30 minutes.
const TOKEN_LIFETIME: u64 = 1800;

/// A Harbor project: a repository `project/...` belongs to project `project`.
#[derive(Debug, Clone)]
pub struct Project {
    pub name: String,
    /// Anyone, signed in or not, may pull.
    pub public: bool,
    /// Users who may pull and push.
    pub members: Vec<String>,
}

/// Users and projects the service grants access by.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub users: BTreeMap<String, String>,
    pub projects: Vec<Project>,
}

impl Policy {
    pub fn user(mut self, name: &str, password: &str) -> Policy {
        self.users.insert(name.to_string(), password.to_string());
        self
    }

    pub fn project(mut self, name: &str, public: bool, members: &[&str]) -> Policy {
        self.projects.push(Project {
            name: name.to_string(),
            public,
            members: members.iter().map(|m| m.to_string()).collect(),
        });
        self
    }
}

/// One request the service received, for tests to check what reached it.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub path: String,
    pub service: Option<String>,
    pub scopes: Vec<String>,
    /// The user named in valid Basic credentials; `None` for anonymous or rejected ones.
    pub user: Option<String>,
    pub status: u16,
}

/// The running service and the certificate file that verifiers must trust.
pub struct TokenService {
    pub cert_path: PathBuf,
    requests: Arc<Mutex<Vec<TokenRequest>>>,
    server: LocalServer,
    _dir: tempfile::TempDir,
}

struct Issuer {
    key: EcdsaKeyPair,
    key_id: String,
    policy: Policy,
    requests: Arc<Mutex<Vec<TokenRequest>>>,
}

impl TokenService {
    pub fn start(policy: Policy) -> TokenService {
        let dir = tempfile::tempdir().unwrap();
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, ISSUER);
        let cert = params.self_signed(&key_pair).unwrap();
        let cert_path = dir.path().join("token-signing.crt");
        std::fs::write(&cert_path, cert.pem()).unwrap();

        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key_pair.serialize_der(), &SystemRandom::new())
            .expect("rcgen made a P-256 PKCS#8 key");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let issuer = Arc::new(Issuer {
            key,
            key_id: libtrust_key_id(&rcgen::PublicKeyData::subject_public_key_info(&key_pair)),
            policy,
            requests: requests.clone(),
        });

        let server = LocalServer::start(Arc::new(move |request| {
            let issuer = issuer.clone();
            Box::pin(async move { issuer.handle(request) })
        }));
        TokenService {
            cert_path,
            requests,
            server,
            _dir: dir,
        }
    }

    /// Returns the internal origin, for the gateway's `[upstreams]`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Returns the realm that verifiers put in their challenges: the internal URL, as Harbor's
    /// registry and Notary configurations do when the public URL is unknown to them.
    pub fn realm(&self) -> String {
        format!("{}/service/token", self.server.url())
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// Builds the `auth:` section of a distribution registry configuration that trusts this service.
    pub fn registry_auth_yaml(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {REGISTRY_SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {bundle}\n",
            realm = self.realm(),
            bundle = self.cert_path.display()
        )
    }
}

impl Issuer {
    fn handle(&self, request: Request<Incoming>) -> Response<ServerBody> {
        let path = request.uri().path().to_string();
        let query = parse_query(request.uri().query().unwrap_or(""));
        let service = query.iter().find(|(k, _)| k == "service").map(|(_, v)| v.clone());
        let scopes: Vec<String> = query.iter().filter(|(k, _)| k == "scope").map(|(_, v)| v.clone()).collect();
        let credentials = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(basic_credentials);

        let mut user = None;
        let response = if path != "/service/token" {
            respond(404, &[("content-type", "text/plain")], "not found")
        } else if !matches!(service.as_deref(), Some(REGISTRY_SERVICE | NOTARY_SERVICE)) {
            // Harbor rejects with 400 a service it has no token creator for.
            error_json(400, "BAD_REQUEST", &format!("Unable to handle service: {}", service.unwrap_or_default()))
        } else {
            match credentials {
                Some((name, password)) if self.policy.users.get(&name) != Some(&password) => {
                    error_json(401, "UNAUTHORIZED", "invalid user name or password")
                }
                credentials => {
                    user = credentials.map(|(name, _)| name);
                    let service = service.unwrap_or_default();
                    let access: Vec<serde_json::Value> = scopes
                        .iter()
                        .filter_map(|scope| self.grant(user.as_deref(), &service, scope))
                        .collect();
                    self.token_response(user.as_deref().unwrap_or(""), &service, access)
                }
            }
        };

        self.requests.lock().unwrap().push(TokenRequest {
            path,
            service: query.iter().find(|(k, _)| k == "service").map(|(_, v)| v.clone()),
            scopes,
            user,
            status: response.status().as_u16(),
        });
        response
    }

    /// Builds the access entry for one requested scope `type:name:actions`, with the actions this
    /// user may take. Like Harbor, a scope that grants nothing is kept with no actions.
    fn grant(&self, user: Option<&str>, service: &str, scope: &str) -> Option<serde_json::Value> {
        let (kind, rest) = scope.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        let mut granted: Vec<&str> = Vec::new();
        if kind == "repository" {
            // Notary GUNs start with the registry host (`gateway.test/project/repo`); Harbor
            // drops it before looking up the project.
            let repository = match service {
                NOTARY_SERVICE => name.split_once('/').map_or(name, |(_, rest)| rest),
                _ => name,
            };
            let project_name = repository.split('/').next().unwrap_or("");
            if let Some(project) = self.policy.projects.iter().find(|p| p.name == project_name) {
                let member = user.is_some_and(|u| project.members.iter().any(|m| m == u));
                for action in actions.split(',') {
                    let allowed = match action {
                        "pull" => member || project.public,
                        "push" | "delete" | "*" => member,
                        _ => false,
                    };
                    if allowed {
                        granted.push(action);
                    }
                }
            }
        }
        Some(serde_json::json!({"type": kind, "name": name, "actions": granted}))
    }

    fn token_response(&self, subject: &str, audience: &str, access: Vec<serde_json::Value>) -> Response<ServerBody> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut jti).unwrap();
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "kid": self.key_id});
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": subject,
            "aud": audience,
            "exp": now + TOKEN_LIFETIME,
            "nbf": now,
            "iat": now,
            "jti": hex::encode(jti),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        // ES256 in JWS is the fixed-width r || s form, which this ring algorithm produces.
        let signature = self.key.sign(&SystemRandom::new(), signing_input.as_bytes()).unwrap();
        let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()));
        let body = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_LIFETIME,
            "issued_at": rfc3339(now),
        });
        respond(200, &[("content-type", "application/json")], body.to_string())
    }
}

fn error_json(status: u16, code: &str, message: &str) -> Response<ServerBody> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
    respond(status, &[("content-type", "application/json")], body.to_string())
}

/// libtrust's key ID: the SHA-256 of the DER SubjectPublicKeyInfo, cut to 240 bits,
/// base32-encoded and split into twelve groups of four characters joined by `:`.
pub fn libtrust_key_id(spki_der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
    let encoded = base32(&digest.as_ref()[..30]);
    let groups: Vec<&str> = (0..encoded.len()).step_by(4).map(|i| &encoded[i..i + 4]).collect();
    groups.join(":")
}

/// RFC 4648 base32 without padding; 30 bytes give exactly 48 characters.
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let mut buffer = 0u32;
    let mut bits = 0;
    for &byte in data {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn basic_credentials(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (name, password) = decoded.split_once(':')?;
    Some((name.to_string(), password.to_string()))
}

/// Splits an `application/x-www-form-urlencoded` query into decoded pairs, in order.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, byte) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Seconds since the Unix epoch as an RFC 3339 UTC timestamp, as Harbor's `issued_at`.
fn rfc3339(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let time = seconds % 86_400;
    // Civil date from a day count (Howard Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        time / 3600,
        time % 3600 / 60,
        time % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn percent_decode_cases() {
        assert_eq!(percent_decode("repository%3Aa%2Fb%3Apull%2Cpush"), "repository:a/b:pull,push");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
