//! Checks that every request passes before a route is chosen. A failed check is a client
//! error that never reaches an upstream.

use http::header::{self, HeaderMap};
use http::{Request, Version};

use crate::config::Limits;
use crate::error::ProxyError;
use crate::sanitize::check_path;

/// Runs the checks in order: sizes first, because the other checks read what they bound.
pub fn check_request<B>(request: &Request<B>, limits: &Limits) -> Result<(), ProxyError> {
    check_sizes(request, limits)?;
    check_path(request.uri().path()).map_err(|violation| ProxyError::BadRequest(violation.message().into()))?;
    check_authority(request)
}

fn check_sizes<B>(request: &Request<B>, limits: &Limits) -> Result<(), ProxyError> {
    let target = request.uri().path_and_query().map_or(0, |target| target.as_str().len());
    if target > limits.max_uri_bytes {
        return Err(ProxyError::UriTooLong {
            length: target,
            limit: limits.max_uri_bytes,
        });
    }

    let size = header_bytes(request.headers());
    if size > limits.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge {
            size,
            limit: limits.max_header_bytes,
        });
    }
    Ok(())
}

/// Size of the header fields as HTTP/1.1 writes them: `name: value` and CRLF per field.
/// HTTP/2 requests are measured the same way, so the limit does not depend on the protocol.
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// An HTTP/2 request whose `Host` header names another authority than `:authority` is
/// malformed (RFC 9113 §8.3.1). Rejecting it keeps the upstream from seeing one host while
/// the gateway's logs and rewrites used the other. HTTP/1.1 needs no check: there the
/// authority of an absolute-form target replaces `Host` (RFC 9112 §3.2.2).
fn check_authority<B>(request: &Request<B>) -> Result<(), ProxyError> {
    if request.version() != Version::HTTP_2 {
        return Ok(());
    }
    let (Some(authority), Some(host)) = (request.uri().authority(), request.headers().get(header::HOST)) else {
        return Ok(());
    };
    if host.as_bytes().eq_ignore_ascii_case(authority.as_str().as_bytes()) {
        Ok(())
    } else {
        Err(ProxyError::BadRequest("the Host header does not match :authority".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 10,
            max_header_bytes: 1000,
            max_uri_bytes: 100,
            max_concurrent_streams: 10,
        }
    }

    #[test]
    fn sizes_at_limit_pass() {
        let target = format!("/v2/{}", "a".repeat(96));
        let value = "b".repeat(1000 - "x-big".len() - 4);
        let request = Request::get(&target).header("x-big", &value).body(()).unwrap();
        assert!(check_request(&request, &limits()).is_ok());
    }

    #[test]
    fn sizes_over_limit_fail() {
        let long = Request::get(format!("/v2/{}", "a".repeat(97))).body(()).unwrap();
        assert!(matches!(check_request(&long, &limits()), Err(ProxyError::UriTooLong { length: 101, .. })));

        let value = "b".repeat(1000 - "x-big".len() - 3);
        let big = Request::get("/v2/").header("x-big", &value).body(()).unwrap();
        assert!(matches!(check_request(&big, &limits()), Err(ProxyError::HeadersTooLarge { size: 1001, .. })));
    }

    #[test]
    fn authority_mismatch_on_http2() {
        let request = |host: &str| {
            Request::get("https://gateway.test/v2/")
                .version(Version::HTTP_2)
                .header("host", host)
                .body(())
                .unwrap()
        };
        assert!(check_request(&request("gateway.test"), &limits()).is_ok());
        assert!(check_request(&request("GATEWAY.test"), &limits()).is_ok());
        assert!(matches!(check_request(&request("harbor-core"), &limits()), Err(ProxyError::BadRequest(_))));
    }
}
