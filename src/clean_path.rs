//! Canonical request paths for upstreams that redirect every other form.
//!
//! notary-server routes with gorilla/mux, which replies `301 Moved Permanently` to any path
//! that differs from Go's `path.Clean` of it (empty segments, `.` and `..`), keeping a
//! trailing `/`. The Notary client treats any 3xx as "server unreachable", and a server URL
//! with a trailing slash (`https://host/registry/notary/`) makes it request
//! `/registry/notary//v2/…`. Sending the clean form upstream avoids the redirect.

use std::borrow::Cow;

/// Returns `path` with empty, `.` and `..` segments removed the way Go's `path.Clean` does,
/// keeping a trailing `/` as gorilla/mux does. `..` never climbs above the root. Dot
/// segments written as `%2e` count too, because Go decodes the path before cleaning it.
///
/// NOTE: an empty segment made of an encoded slash (`a%2F%2Fb`) is left as it is, so
/// notary-server still redirects that rare form.
pub fn clean_path(path: &str) -> Cow<'_, str> {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        if segment.is_empty() || is_dot(segment) {
            continue;
        }
        if is_dot_dot(segment) {
            segments.pop();
            continue;
        }
        segments.push(segment);
    }

    let mut cleaned = String::with_capacity(path.len());
    for segment in &segments {
        cleaned.push('/');
        cleaned.push_str(segment);
    }
    if cleaned.is_empty() || path.ends_with('/') {
        cleaned.push('/');
    }

    if cleaned == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(cleaned)
    }
}

fn is_dot(segment: &str) -> bool {
    segment == "." || segment.eq_ignore_ascii_case("%2e")
}

fn is_dot_dot(segment: &str) -> bool {
    match segment.len() {
        2 => segment == "..",
        4 => segment.eq_ignore_ascii_case(".%2e") || segment.eq_ignore_ascii_case("%2e."),
        6 => segment.eq_ignore_ascii_case("%2e%2e"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_path_cases() {
        // (path, expected)
        let cases = [
            ("/", "/"),
            ("", "/"),
            ("//", "/"),
            ("/v2/", "/v2/"),
            ("//v2/", "/v2/"),
            ("///v2//a///b/_trust/tuf/root.json", "/v2/a/b/_trust/tuf/root.json"),
            ("/v2/a/b/_trust/tuf/", "/v2/a/b/_trust/tuf/"),
            ("/v2/./a", "/v2/a"),
            ("/v2/a/..", "/v2"),
            ("/v2/a/../", "/v2/"),
            ("/../../v2/x", "/v2/x"),
            ("/v2/%2e%2E/x", "/x"),
            ("/v2/.%2e/x", "/x"),
            ("/v2/%2E/x", "/v2/x"),
            ("/v2/a%2Fb/c", "/v2/a%2Fb/c"),
            ("/v2/...", "/v2/..."),
            ("/v2/.hidden/..x", "/v2/.hidden/..x"),
        ];
        for (path, expected) in cases {
            assert_eq!(clean_path(path), expected, "{path:?}");
        }
    }

    #[test]
    fn clean_path_borrows_when_unchanged() {
        assert!(matches!(clean_path("/v2/a/b/_trust/tuf/root.json"), Cow::Borrowed(_)));
        assert!(matches!(clean_path("//v2/"), Cow::Owned(_)));
    }
}
