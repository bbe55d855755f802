//! Header hygiene between the downstream client and an upstream.
//!
//! Hop-by-hop headers follow RFC 9110 section 7.6.1: `Connection`, every header that it
//! names, and the fixed list below apply to one connection only and are never forwarded.
//! Forwarding headers follow the de-facto `X-Forwarded-*` convention and RFC 7239
//! `Forwarded`. Values from a peer that is not a configured trusted proxy are replaced,
//! because a client could otherwise claim any address or scheme.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers besides those that `Connection` lists.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Removes hop-by-hop headers, including every header that `Connection` names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Facts about the downstream connection that go into forwarding headers.
#[derive(Debug, Clone, Copy)]
pub struct Downstream {
    pub peer: IpAddr,
    /// The peer is a configured trusted proxy, so its forwarding headers are kept.
    pub trusted: bool,
}

/// Sets `X-Forwarded-Proto`, `-Host`, `-Port` and `-For` for a request that arrived over
/// TLS with the given `Host` value.
pub fn set_forwarding(headers: &mut HeaderMap, downstream: Downstream, host: &HeaderValue) {
    if !downstream.trusted {
        headers.remove(header::FORWARDED);
        headers.remove(X_FORWARDED_PROTO);
        headers.remove(X_FORWARDED_HOST);
        headers.remove(X_FORWARDED_PORT);
        headers.remove(X_REAL_IP);
    }

    let peer = downstream.peer.to_string();
    let forwarded_for = match headers.get(X_FORWARDED_FOR) {
        Some(existing) if downstream.trusted => {
            let mut joined = existing.as_bytes().to_vec();
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(peer.as_bytes());
            HeaderValue::from_bytes(&joined).ok()
        }
        _ => None,
    };
    let forwarded_for = forwarded_for
        .unwrap_or_else(|| HeaderValue::from_str(&peer).expect("an IP address is a valid header value"));
    headers.insert(X_FORWARDED_FOR, forwarded_for);

    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    }
    if !headers.contains_key(X_FORWARDED_HOST) {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    if !headers.contains_key(X_FORWARDED_PORT) {
        let port = host_port(host.as_bytes()).unwrap_or(b"443");
        let port = HeaderValue::from_bytes(port).expect("port digits are a valid header value");
        headers.insert(X_FORWARDED_PORT, port);
    }
}

/// Extracts the port of a `Host` value (`name:port`, `[v6]:port`), if it has one.
fn host_port(host: &[u8]) -> Option<&[u8]> {
    let colon = host.iter().rposition(|&b| b == b':')?;
    let port = &host[colon + 1..];
    let is_port = !port.is_empty() && port.iter().all(u8::is_ascii_digit);
    // In `[::1]` the last colon is inside the brackets.
    (is_port && !host[colon..].contains(&b']')).then_some(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn downstream(trusted: bool) -> Downstream {
        Downstream {
            peer: "192.0.2.7".parse().unwrap(),
            trusted,
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("proxy-connection", HeaderValue::from_static("close"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        headers.insert("docker-content-digest", HeaderValue::from_static("sha256:ab"));

        remove_hop_by_hop(&mut headers);

        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort();
        assert_eq!(names, ["content-length", "docker-content-digest"]);
    }

    #[test]
    fn untrusted_forwarding_is_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.9.9.9"));
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        headers.insert(X_FORWARDED_HOST, HeaderValue::from_static("evil.example"));
        headers.insert(header::FORWARDED, HeaderValue::from_static("for=10.9.9.9;proto=http"));

        set_forwarding(&mut headers, downstream(false), &HeaderValue::from_static("gateway.test:8443"));

        assert_eq!(headers[X_FORWARDED_FOR], "192.0.2.7");
        assert_eq!(headers[X_FORWARDED_PROTO], "https");
        assert_eq!(headers[X_FORWARDED_HOST], "gateway.test:8443");
        assert_eq!(headers[X_FORWARDED_PORT], "8443");
        assert!(headers.get(header::FORWARDED).is_none());
    }

    #[test]
    fn trusted_forwarding_is_extended() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.1"));
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));

        set_forwarding(&mut headers, downstream(true), &HeaderValue::from_static("gateway.test"));

        assert_eq!(headers[X_FORWARDED_FOR], "203.0.113.1, 192.0.2.7");
        assert_eq!(headers[X_FORWARDED_PORT], "443");
    }

    #[test]
    fn host_port_cases() {
        assert_eq!(host_port(b"gateway.test:8443"), Some(&b"8443"[..]));
        assert_eq!(host_port(b"gateway.test"), None);
        assert_eq!(host_port(b"[::1]:8443"), Some(&b"8443"[..]));
        assert_eq!(host_port(b"[::1]"), None);
        assert_eq!(host_port(b"host:"), None);
    }
}
