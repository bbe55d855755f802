//! The request-target rule: which paths the gateway forwards byte for byte and which it
//! rejects with 400 before a route is chosen.
//!
//! Routes match on the raw path, but upstreams decode and normalize paths before their own
//! routers see them: Go's `path.Clean` in Harbor core and Rancher, gorilla/mux in
//! distribution (which decodes `%2F` and redirects to the cleaned path), `merge_slashes` and
//! `..` resolution in nginx for the portal. A path that normalizes to somewhere else could
//! then reach a part of an upstream that the route table never sends there, for example
//! `/v2/../service/notifications` (blocked with 404 here) reaching Harbor core's internal
//! webhook, or `/registry/../v1/…` landing on the portal instead of Rancher.
//!
//! The rule, applied to the path only (never the query):
//!
//! - **Rejected (400):** a dot-segment, `.` or `..`, where the dots may be literal or
//!   `%2e` in any case and the segment may be delimited by `/` or `%2f`; any
//!   backslash, literal or `%5c`, because some servers treat it as a separator; `%00`.
//!   No conforming client sends these: RFC 3986 §5.2.4 has clients remove dot-segments, and
//!   registry, Harbor and Rancher paths never contain a backslash.
//! - **Forwarded byte for byte within the matched route:** everything else, including
//!   `%2F` (distribution decodes `a%2Fb` to the same repository as `a/b`, still below
//!   `/v2/`), `%252F` (Harbor's API double-encodes repository names), `//` (an empty segment
//!   cannot climb out of a prefix, so `//v2/` stays Rancher's and `/v2//x` stays the
//!   registry's), and `%2e` inside a longer segment such as `v2.0` or `a%2eb`.
//! - **Not visible here:** a fragment (`#…`) is cut off by the HTTP parser before routing,
//!   so the path that chose the route is the path sent upstream. An absolute-form target
//!   (`GET https://host/path`) is routed on its path like any other.
//!
//! After this check no path segment can move the request to a parent of the route prefix
//! that matched, whatever decoding the upstream applies once.

/// Reason a path was rejected. The text goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathViolation {
    DotSegment,
    Backslash,
    EncodedNul,
}

impl PathViolation {
    pub fn message(self) -> &'static str {
        match self {
            PathViolation::DotSegment => "the request path contains a `.` or `..` segment",
            PathViolation::Backslash => "the request path contains a backslash",
            PathViolation::EncodedNul => "the request path contains %00",
        }
    }
}

/// Checks a raw request path against the rule in the module documentation.
pub fn check_path(path: &str) -> Result<(), PathViolation> {
    let bytes = path.as_bytes();
    if bytes.contains(&b'\\') {
        return Err(PathViolation::Backslash);
    }

    // Split into segments at `/` and `%2f`, then decode `%2e` within
    // each segment only as far as needed to see whether it is all dots.
    let mut segment_start = 0;
    let mut index = 0;
    while index <= bytes.len() {
        let separator_len = separator_at(bytes, index);
        if separator_len > 0 || index == bytes.len() {
            if is_dot_segment(&bytes[segment_start..index]) {
                return Err(PathViolation::DotSegment);
            }
            if index == bytes.len() {
                break;
            }
            index += separator_len;
            segment_start = index;
            continue;
        }
        match percent_byte_at(bytes, index) {
            Some(0) => return Err(PathViolation::EncodedNul),
            Some(b'\\') => return Err(PathViolation::Backslash),
            _ => {}
        }
        index += 1;
    }
    Ok(())
}

/// Length of the separator at `index`: 1 for `/`, 3 for `%2f`, 0 otherwise. Backslashes
/// are not separators here because any backslash is rejected.
fn separator_at(bytes: &[u8], index: usize) -> usize {
    match bytes.get(index) {
        Some(b'/') => 1,
        Some(b'%') => match percent_byte_at(bytes, index) {
            Some(b'/') => 3,
            _ => 0,
        },
        _ => 0,
    }
}

/// Decodes the `%XX` escape at `index` to its byte, if it is a valid escape.
fn percent_byte_at(bytes: &[u8], index: usize) -> Option<u8> {
    if bytes.get(index) != Some(&b'%') {
        return None;
    }
    let high = hex_value(*bytes.get(index + 1)?)?;
    let low = hex_value(*bytes.get(index + 2)?)?;
    Some(high << 4 | low)
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Tests whether a segment decodes to `.` or `..`.
fn is_dot_segment(segment: &[u8]) -> bool {
    let mut dots = 0;
    let mut index = 0;
    while index < segment.len() {
        if segment[index] == b'.' {
            index += 1;
        } else if percent_byte_at(segment, index) == Some(b'.') {
            index += 3;
        } else {
            return false;
        }
        dots += 1;
        if dots > 2 {
            return false;
        }
    }
    dots == 1 || dots == 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_paths() {
        let cases = [
            ("/registry/../v1/x", PathViolation::DotSegment),
            ("/registry/./api", PathViolation::DotSegment),
            ("/v2/..", PathViolation::DotSegment),
            ("/v2/.", PathViolation::DotSegment),
            ("/..", PathViolation::DotSegment),
            ("/v2/%2e%2e/service/notifications", PathViolation::DotSegment),
            ("/v2/%2E%2e/x", PathViolation::DotSegment),
            ("/v2/.%2e/x", PathViolation::DotSegment),
            ("/v2/%2e./x", PathViolation::DotSegment),
            ("/v2/%2e/x", PathViolation::DotSegment),
            ("/v2/..%2f..%2fregistry/api", PathViolation::DotSegment),
            ("/v2/x%2F..%2Fy", PathViolation::DotSegment),
            ("/v2/x%5c..%5cy", PathViolation::Backslash),
            ("/v2/x%5Cy", PathViolation::Backslash),
            ("/v2/x\\..\\y", PathViolation::Backslash),
            ("/v2\\x", PathViolation::Backslash),
            ("/v2/a%00b", PathViolation::EncodedNul),
        ];
        for (path, expected) in cases {
            assert_eq!(check_path(path), Err(expected), "{path}");
        }
    }

    #[test]
    fn forwarded_paths() {
        let cases = [
            "/",
            "/v2/",
            "/v2/library/alpine/manifests/latest",
            "/v2/a%2Fb/blobs/uploads/x",
            "/api/v2.0/projects/library/repositories/a%252Fb",
            "//v2/",
            "/v2//x",
            "/v2/...",
            "/v2/..a/x",
            "/v2/a..",
            "/v2/a%2eb",
            "/v2/%2e%2e%2e",
            "/v2/%2",
            "/v2/%zz",
            "/v2/x%5",
            "/registry/main.js",
            "/api/v2.0",
        ];
        for path in cases {
            assert_eq!(check_path(path), Ok(()), "{path}");
        }
    }
}
