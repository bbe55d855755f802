//! Checks shared by the cargo-fuzz targets in `fuzz_targets/` and by the corpus replay in
//! `tests/fuzz_corpus.rs`, which runs on a stable toolchain. Each check takes arbitrary
//! bytes and asserts the properties that the gateway relies on; a panic is a finding.

use std::path::Path;
use std::sync::OnceLock;

use harbor_gateway::config::Config;
use harbor_gateway::framing::{released_bytes, REJECTED_HEADER};
use harbor_gateway::rewrite::{InternalOrigins, RewriteContext};
use harbor_gateway::routing::{path_has_prefix, Action, MatchKind, RouteTable};
use harbor_gateway::sanitize::check_path;

const CONFIG: &str = r#"
[listen]
https = "127.0.0.1:8443"
[tls]
cert = "c.pem"
key = "k.pem"
[upstreams]
harbor_core = "http://harbor-core"
harbor_portal = "http://harbor-portal:8080"
notary = "https://notary:4443"
rancher = "https://rancher.cattle-system.svc"
"#;

struct Fixture {
    table: RouteTable,
    origins: InternalOrigins,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let config = Config::parse(Path::new("fuzz.toml"), CONFIG).expect("the fixed configuration is valid");
        Fixture {
            table: RouteTable::from_config(&config),
            origins: InternalOrigins::new(&config.upstreams),
        }
    })
}

/// Route matching on an arbitrary request target: a path that passes the path rule cannot contain a
/// dot-segment under any single percent-decoding, every absolute path finds a route at a
/// segment boundary, and stripping a prefix leaves an absolute path.
pub fn route_matcher(data: &[u8]) {
    // Only what the HTTP parser accepts as a request target reaches the router.
    let Ok(target) = http::uri::PathAndQuery::try_from(data) else { return };
    let path = target.path();
    let table = &fixture().table;

    if check_path(path).is_ok() {
        let decoded = percent_decode(path.as_bytes());
        for segment in decoded.split(|&b| b == b'/') {
            assert_ne!(segment, b".", "{path:?} passed with a `.` segment");
            assert_ne!(segment, b"..", "{path:?} passed with a `..` segment");
        }
        assert!(!decoded.contains(&b'\\'), "{path:?} passed with a backslash");
        assert!(!decoded.contains(&0), "{path:?} passed with NUL");
    }

    let Some(route) = table.find(path) else {
        assert!(!path.starts_with('/'), "{path:?} is absolute but matched no route");
        return;
    };
    match route.kind {
        MatchKind::Exact => assert_eq!(route.path, path),
        MatchKind::Prefix => assert!(path_has_prefix(path, &route.path), "{path:?} under {:?}", route.path),
    }
    if let Action::Proxy(_) = route.action {
        let sent = route.upstream_path(path);
        assert!(sent.starts_with('/'), "{path:?} is sent upstream as {sent:?}");
        // Routes to notary-server send the cleaned path, which need not be a suffix.
        if !route.clean_path {
            assert!(path.ends_with(&*sent) || sent == "/", "{path:?} is sent upstream as {sent:?}");
        }
    }
}

/// `Location` and `WWW-Authenticate` rewriting of arbitrary values for every route: no
/// panic, and a rewritten URL always points at the public host.
pub fn rewriters(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (host, value) = text.split_once('\n').unwrap_or(("gateway.test:8443", text));
    let Fixture { table, origins } = fixture();
    for route in table.routes() {
        let Action::Proxy(upstream) = route.action else { continue };
        let context = RewriteContext { table, origins, public_host: host, route, upstream };
        if let Some(url) = context.rewrite_url(value) {
            assert!(
                url.starts_with(&format!("https://{host}/")) || url.starts_with('/'),
                "{value:?} became {url:?}"
            );
        }
        let _ = context.rewrite_www_authenticate(value);
    }
}

/// Parses arbitrary text as a configuration: an invalid one must be an `Err`, not a panic,
/// and one that validates must also build its route table.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = Config::parse(Path::new("fuzz.toml"), text) {
        let table = RouteTable::from_config(&config);
        let _ = InternalOrigins::new(&config.upstreams);
        assert!(!table.routes().is_empty());
    }
}

/// Decodes every valid `%XX` escape once, as a server that decodes paths would.
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' && index + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[index + 1]), hex(bytes[index + 2])) {
                out.push(high << 4 | low);
                index += 3;
                continue;
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    out
}

/// Checks the HTTP/1.1 framing guard on arbitrary client bytes. What hyper receives must not
/// depend on how the bytes are split into reads. It must be a prefix of the input, or a
/// prefix followed by one stand-in request for a rejected head.
pub fn framing(data: &[u8]) {
    let whole = released_bytes(data, usize::MAX);
    for piece in [1, 2, 5, 13, 600] {
        assert_eq!(released_bytes(data, piece), whole, "reads of {piece} bytes changed the result");
    }
    if data.starts_with(&whole) {
        return;
    }
    // Otherwise the end is a stand-in request, after a part of the input.
    let text = String::from_utf8_lossy(&whole);
    let marker = format!("\r\n{REJECTED_HEADER}: ");
    let marker = marker.as_bytes();
    let at = whole
        .windows(marker.len())
        .rposition(|window| window == marker)
        .unwrap_or_else(|| panic!("released bytes differ from the input: {text:?}"));
    let start = whole[..at].iter().rposition(|&b| b == b'\n').map_or(0, |newline| newline + 1);
    assert!(data.starts_with(&whole[..start]), "the bytes before the stand-in differ from the input: {text:?}");
    assert!(whole.ends_with(b"\r\nconnection: close\r\n\r\n"), "{text:?}");
}
