//! Rewriting of URLs that upstreams put in response headers.
//!
//! Upstreams only know their internal origin (`http://harbor-core`) and the path they
//! were sent. A `Location` or a Bearer `realm` that points at an internal origin becomes
//! the public origin (`https://` plus the client's `Host`) and the public path that routes
//! back to the same upstream. URLs on any other origin, such as object-storage redirects
//! with signed query strings, are left byte for byte.

use http::Uri;

use crate::config::UpstreamConfig;
use crate::routing::{Route, RouteTable, UpstreamId};

/// Scheme, lowercase host and port of an upstream, for comparing against response URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    pub fn of(uri: &Uri) -> Option<Origin> {
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        Some(Origin {
            host: uri.host()?.to_ascii_lowercase(),
            port: uri.port_u16().unwrap_or(default_port),
            scheme,
        })
    }
}

/// The internal origins of all configured upstreams, in [`UpstreamId`] order.
#[derive(Debug, Clone)]
pub struct InternalOrigins(Vec<Option<Origin>>);

impl InternalOrigins {
    pub fn new(upstreams: &[UpstreamConfig]) -> Self {
        Self(upstreams.iter().map(|u| Origin::of(&u.uri)).collect())
    }

    fn find(&self, origin: &Origin) -> Option<UpstreamId> {
        self.0.iter().position(|o| o.as_ref() == Some(origin))
    }
}

/// Everything a rewrite needs about the request in flight.
pub struct RewriteContext<'a> {
    pub table: &'a RouteTable,
    pub origins: &'a InternalOrigins,
    /// The `Host` the client used, port included.
    pub public_host: &'a str,
    pub route: &'a Route,
    pub upstream: UpstreamId,
}

impl RewriteContext<'_> {
    /// Returns the public form of `url`, or `None` when it must stay as it is.
    pub fn rewrite_url(&self, url: &str) -> Option<String> {
        if url.starts_with('/') && !url.starts_with("//") {
            return self.rewrite_relative(url);
        }
        let uri: Uri = url.parse().ok()?;
        let upstream = self.origins.find(&Origin::of(&uri)?)?;
        let preferred = (upstream == self.upstream).then_some(self.route);
        let public_path = self.table.public_path(upstream, uri.path(), preferred)?;
        Some(match uri.query() {
            Some(query) => format!("https://{}{public_path}?{query}", self.public_host),
            None => format!("https://{}{public_path}", self.public_host),
        })
    }

    /// Puts the mount prefix back on a relative path from an upstream mounted under one.
    fn rewrite_relative(&self, url: &str) -> Option<String> {
        self.route.strip_prefix.as_ref()?;
        let (path, query) = match url.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (url, None),
        };
        let public_path = self.table.public_path(self.upstream, path, Some(self.route))?;
        Some(match query {
            Some(query) => format!("{public_path}?{query}"),
            None => public_path,
        })
    }

    /// Rewrites the `realm` parameters of a `WWW-Authenticate` value, leaving every other
    /// byte, `service` and `scope` included, exactly as the upstream sent it.
    pub fn rewrite_www_authenticate(&self, value: &str) -> Option<String> {
        let mut rewritten = String::with_capacity(value.len() + 32);
        let mut copied_up_to = 0;
        for span in realm_spans(value) {
            let Some(public) = self.rewrite_url(&value[span.clone()]) else { continue };
            rewritten.push_str(&value[copied_up_to..span.start]);
            rewritten.push_str(&public);
            copied_up_to = span.end;
        }
        if copied_up_to == 0 {
            return None;
        }
        rewritten.push_str(&value[copied_up_to..]);
        Some(rewritten)
    }
}

/// Byte ranges of the values of `realm` parameters in a challenge list (RFC 9110 section
/// 11.6.1), inside the quotes when quoted. Realms that contain escapes are skipped, because
/// a URL never needs them.
fn realm_spans(value: &str) -> Vec<std::ops::Range<usize>> {
    let bytes = value.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        while i < bytes.len() && matches!(bytes[i], b' ' | b'\t' | b',') {
            i += 1;
        }
        let token_start = i;
        while i < bytes.len() && !matches!(bytes[i], b' ' | b'\t' | b',' | b'=') {
            i += 1;
        }
        let token = &value[token_start..i];
        let mut j = i;
        while j < bytes.len() && matches!(bytes[j], b' ' | b'\t') {
            j += 1;
        }
        if j >= bytes.len() || bytes[j] != b'=' {
            // An auth-scheme name, or a token68; parameters follow.
            continue;
        }
        j += 1;
        while j < bytes.len() && matches!(bytes[j], b' ' | b'\t') {
            j += 1;
        }
        let (span, escaped, end) = if bytes.get(j) == Some(&b'"') {
            let start = j + 1;
            let mut k = start;
            let mut escaped = false;
            while k < bytes.len() && bytes[k] != b'"' {
                if bytes[k] == b'\\' {
                    escaped = true;
                    k += 1;
                }
                k += 1;
            }
            let end = k.min(bytes.len());
            (start..end, escaped, (end + 1).min(bytes.len()))
        } else {
            let start = j;
            let mut k = start;
            while k < bytes.len() && !matches!(bytes[k], b' ' | b'\t' | b',') {
                k += 1;
            }
            (start..k, false, k)
        };
        if token.eq_ignore_ascii_case("realm") && !escaped {
            spans.push(span);
        }
        i = end;
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn config() -> Config {
        Config::parse(
            Path::new("t.toml"),
            r#"
[listen]
https = "127.0.0.1:8443"
[tls]
cert = "c"
key = "k"
[upstreams]
harbor_core = "http://harbor-core"
harbor_portal = "http://harbor-portal:8080"
token = "https://token.internal:9443"
[[routes]]
prefix = "/service/token"
upstream = "token"
"#,
        )
        .unwrap()
    }

    fn with_context<T>(path: &str, f: impl FnOnce(&RewriteContext) -> T) -> T {
        let config = config();
        let table = RouteTable::from_config(&config);
        let origins = InternalOrigins::new(&config.upstreams);
        let route = table.find(path).unwrap().clone();
        let upstream = match route.action {
            crate::routing::Action::Proxy(id) => id,
            _ => panic!("{path} is not a proxy route"),
        };
        let context = RewriteContext {
            table: &table,
            origins: &origins,
            public_host: "gateway.test:8443",
            route: &route,
            upstream,
        };
        f(&context)
    }

    #[test]
    fn location_cases() {
        // (request path, Location from upstream, expected public Location or None)
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("/v2/a/blobs/uploads/", "http://harbor-core/v2/a/blobs/uploads/u1?_state=x%3D",
                Some("https://gateway.test:8443/v2/a/blobs/uploads/u1?_state=x%3D")),
            ("/v2/a/blobs/uploads/", "http://HARBOR-CORE:80/v2/a/blobs/uploads/u1",
                Some("https://gateway.test:8443/v2/a/blobs/uploads/u1")),
            ("/v2/a/blobs/uploads/", "/v2/a/blobs/uploads/u1", None),
            ("/v2/a/blobs/sha256:ab", "https://s3.example.com/bucket/ab?X-Amz-Signature=abc%2F", None),
            ("/v2/a/blobs/uploads/", "http://harbor-core:8080/v2/a", None),
            ("/v2/a/blobs/uploads/", "https://harbor-core/v2/a", None),
            ("/registry/", "/account/sign-in?redirect_url=%2F", Some("/registry/account/sign-in?redirect_url=%2F")),
            ("/registry/", "http://harbor-portal:8080/index.html", Some("https://gateway.test:8443/registry/index.html")),
            ("/registry/api/v2.0/projects", "/api/v2.0/projects/7", Some("/registry/api/v2.0/projects/7")),
            ("/api/v2.0/projects", "/api/v2.0/projects/7", None),
            ("/v2/a/blobs/uploads/", "not a url", None),
        ];
        for &(path, location, expected) in cases {
            let actual = with_context(path, |c| c.rewrite_url(location));
            assert_eq!(actual.as_deref(), expected, "{path}: {location}");
        }
    }

    #[test]
    fn realm_rewrite_keeps_service_and_scope() {
        let challenge = r#"Bearer realm="https://token.internal:9443/service/token",service="harbor-registry",scope="repository:lib/a:pull,push""#;
        let rewritten = with_context("/v2/", |c| c.rewrite_www_authenticate(challenge));
        assert_eq!(
            rewritten.as_deref(),
            Some(r#"Bearer realm="https://gateway.test:8443/service/token",service="harbor-registry",scope="repository:lib/a:pull,push""#)
        );
    }

    #[test]
    fn realm_in_any_position_and_case() {
        let challenge = r#"Bearer service="harbor-registry", REALM = "https://token.internal:9443/service/token" ,scope="repository:x:pull""#;
        let rewritten = with_context("/v2/", |c| c.rewrite_www_authenticate(challenge)).unwrap();
        assert_eq!(
            rewritten,
            r#"Bearer service="harbor-registry", REALM = "https://gateway.test:8443/service/token" ,scope="repository:x:pull""#
        );
    }

    #[test]
    fn foreign_and_basic_realms_untouched() {
        for challenge in [
            r#"Bearer realm="https://auth.example.com/token",service="registry""#,
            r#"Basic realm="harbor""#,
            r#"Bearer realm="https://gateway.test:8443/service/token",service="harbor-registry""#,
            "Negotiate abc==",
            "",
            r#"Bearer realm=""#,
        ] {
            let rewritten = with_context("/v2/", |c| c.rewrite_www_authenticate(challenge));
            assert_eq!(rewritten, None, "{challenge}");
        }
    }

    #[test]
    fn unquoted_realm_is_rewritten() {
        let challenge = "Bearer realm=https://token.internal:9443/service/token,service=harbor-registry";
        let rewritten = with_context("/v2/", |c| c.rewrite_www_authenticate(challenge));
        assert_eq!(
            rewritten.as_deref(),
            Some("Bearer realm=https://gateway.test:8443/service/token,service=harbor-registry")
        );
    }
}
