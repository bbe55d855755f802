//! Gateway configuration: a TOML file loaded once, validated, then frozen.
//!
//! Every error names the file, the key and the value at fault, and gives the fix.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

/// Seconds to wait for a TCP connection to an upstream.
pub const DEFAULT_CONNECT_SECONDS: u64 = 10;
/// Idle seconds on registry routes: no byte in either direction for this long ends the request.
/// Large layer pushes and a registry committing a big upload can pause for minutes.
pub const DEFAULT_REGISTRY_IDLE_SECONDS: u64 = 900;
/// Idle seconds on every other route, Rancher's long-lived watches and WebSockets included.
pub const DEFAULT_IDLE_SECONDS: u64 = 1800;
/// Seconds a client has to finish the TLS handshake.
pub const DEFAULT_TLS_HANDSHAKE_SECONDS: u64 = 10;
/// Seconds a client has to send a complete HTTP/1.1 request header section.
pub const DEFAULT_HEADER_READ_SECONDS: u64 = 30;
/// Seconds that in-flight requests get to finish after SIGTERM before the process exits.
pub const DEFAULT_DRAIN_SECONDS: u64 = 60;
/// Seconds between checks of the configuration, certificate and key files for changes.
/// The kubelet updates a mounted Secret on its sync period (one minute by default) plus
/// its cache delay, so a few seconds more go unnoticed, and a check is a few `stat` calls.
pub const DEFAULT_WATCH_INTERVAL_SECONDS: u64 = 5;
/// Seconds a client connection may stay open with no request in flight. Above the 60 s that
/// many client pools wait before reusing a connection, below Go's 90 s `IdleConnTimeout`.
pub const DEFAULT_KEEP_ALIVE_SECONDS: u64 = 75;

/// Client connections served at once; further connections wait in the kernel's accept
/// queue until one closes. Each costs two tasks, TLS state and buffers of about 100 KiB.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Bytes of request header fields accepted (names, values and their separators). Registry
/// bearer tokens and Rancher session cookies are several KiB each; larger gets 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 << 10;
/// Bytes of request target (path and query) accepted; longer gets 414. Upload `_state`
/// query parameters are under 1 KiB.
pub const DEFAULT_MAX_URI_BYTES: usize = 8 << 10;
/// Concurrent HTTP/2 streams per client connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 250;
/// Whether the Harbor routes (`/v2/`, `/registry/`, the portal carve-outs) are served. When
/// false they respond with 503 saying the registry is disabled, and Rancher routes work as before.
pub const DEFAULT_HARBOR_ENABLED: bool = true;
/// Upper bound of `runtime.worker_threads`: a guard against a typo, far above any core count
/// the gateway could use.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The well-known upstream names that the default route table uses.
pub const HARBOR_CORE: &str = "harbor_core";
pub const HARBOR_PORTAL: &str = "harbor_portal";
pub const NOTARY: &str = "notary";
pub const RANCHER: &str = "rancher";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid configuration file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The configuration file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: RawListen,
    tls: RawTls,
    #[serde(default)]
    upstreams: BTreeMap<String, String>,
    #[serde(default)]
    upstream_tls: RawUpstreamTls,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    routes: Vec<RouteSpec>,
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    reload: RawReload,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    harbor: RawHarbor,
    #[serde(default)]
    runtime: RawRuntime,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    worker_threads: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    max_header_bytes: Option<usize>,
    max_uri_bytes: Option<usize>,
    max_concurrent_streams: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    https: String,
    admin: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    ca_bundle: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReload {
    watch_interval: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect: Option<u64>,
    registry_idle: Option<u64>,
    default_idle: Option<u64>,
    tls_handshake: Option<u64>,
    header_read: Option<u64>,
    drain: Option<u64>,
    keep_alive: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHarbor {
    enabled: Option<bool>,
}

/// One route entry from `[[routes]]`. It replaces the default route with the same match,
/// or adds a new one.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Matches this path and everything below it, at `/` segment boundaries.
    pub prefix: Option<String>,
    /// Matches this path only.
    pub exact: Option<String>,
    /// Name of the upstream in `[upstreams]`; absent together with `status` set means the
    /// gateway responds itself.
    pub upstream: Option<String>,
    /// Leading part of the path removed before forwarding, for example `/registry`.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Status the gateway responds with instead of proxying: 404 blocks a path.
    pub status: Option<u16>,
}

/// An upstream origin: scheme, host and port, from `[upstreams]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub name: String,
    pub uri: Uri,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub connect: Duration,
    pub registry_idle: Duration,
    pub default_idle: Duration,
    pub tls_handshake: Duration,
    pub header_read: Duration,
    pub drain: Duration,
    pub keep_alive: Duration,
}

/// Resource limits per gateway and per client connection.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    pub max_concurrent_streams: u32,
}

/// The validated, frozen configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub https_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub upstreams: Vec<UpstreamConfig>,
    pub upstream_ca_file: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub routes: Vec<RouteSpec>,
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// PEM CA bundle served at `/registry/ca.crt`; no such route when `None`.
    pub ca_bundle_path: Option<PathBuf>,
    /// How often to check the watched files for changes; `None` turns watching off.
    pub watch_interval: Option<Duration>,
    pub limits: Limits,
    /// `harbor.enabled`: false turns every default Harbor route into a 503.
    pub harbor_enabled: bool,
    /// `runtime.worker_threads`: threads that serve client connections; `None` means one
    /// per available CPU.
    pub worker_threads: Option<usize>,
    /// Settings that are valid but probably not meant, such as an upstream no route uses.
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads, parses and validates the configuration file at `path`.
    /// Relative file paths inside it are resolved against the process's working directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates configuration text; `path` is used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };

        let https_addr = parse_addr("listen.https", &raw.listen.https).map_err(invalid)?;
        let admin_addr = match &raw.listen.admin {
            Some(value) => Some(parse_addr("listen.admin", value).map_err(invalid)?),
            None => None,
        };

        let mut upstreams = Vec::new();
        for (name, value) in &raw.upstreams {
            let uri = parse_upstream_uri(name, value).map_err(invalid)?;
            upstreams.push(UpstreamConfig {
                name: name.clone(),
                uri,
            });
        }

        for (index, route) in raw.routes.iter().enumerate() {
            validate_route(index, route, &raw.upstreams).map_err(invalid)?;
        }
        let mut warnings = Vec::new();
        for name in raw.upstreams.keys() {
            let well_known = [HARBOR_CORE, HARBOR_PORTAL, NOTARY, RANCHER].contains(&name.as_str());
            let routed = raw.routes.iter().any(|route| route.upstream.as_deref() == Some(name.as_str()));
            if !well_known && !routed {
                warnings.push(format!(
                    "upstreams.{name}: no route uses this upstream; the default routes use \
                     {HARBOR_CORE}, {HARBOR_PORTAL}, {NOTARY} and {RANCHER}, and [[routes]] can name others"
                ));
            }
        }

        let trusted_proxies = raw
            .proxy
            .trusted_proxies
            .iter()
            .map(|value| {
                value.parse().map_err(|_| {
                    format!(
                        "proxy.trusted_proxies: {value:?} is not an IP address; \
                         list the addresses of proxies in front of the gateway, e.g. \"10.0.0.5\""
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;

        let seconds = |key: &str, value: Option<u64>, default: u64| -> Result<Duration, String> {
            match value.unwrap_or(default) {
                0 => Err(format!("timeouts.{key}: 0 is not allowed; give a number of seconds above 0")),
                n => Ok(Duration::from_secs(n)),
            }
        };
        let t = &raw.timeouts;
        let timeouts = Timeouts {
            connect: seconds("connect", t.connect, DEFAULT_CONNECT_SECONDS).map_err(invalid)?,
            registry_idle: seconds("registry_idle", t.registry_idle, DEFAULT_REGISTRY_IDLE_SECONDS)
                .map_err(invalid)?,
            default_idle: seconds("default_idle", t.default_idle, DEFAULT_IDLE_SECONDS)
                .map_err(invalid)?,
            tls_handshake: seconds("tls_handshake", t.tls_handshake, DEFAULT_TLS_HANDSHAKE_SECONDS)
                .map_err(invalid)?,
            header_read: seconds("header_read", t.header_read, DEFAULT_HEADER_READ_SECONDS)
                .map_err(invalid)?,
            drain: seconds("drain", t.drain, DEFAULT_DRAIN_SECONDS).map_err(invalid)?,
            keep_alive: seconds("keep_alive", t.keep_alive, DEFAULT_KEEP_ALIVE_SECONDS).map_err(invalid)?,
        };
        let limits = parse_limits(&raw.limits).map_err(invalid)?;
        let worker_threads = match raw.runtime.worker_threads {
            Some(n) if !(1..=MAX_WORKER_THREADS).contains(&n) => {
                return Err(invalid(format!(
                    "runtime.worker_threads: {n} is out of range; give 1 to {MAX_WORKER_THREADS}, \
                     or leave the key out for one thread per available CPU"
                )));
            }
            value => value,
        };

        Ok(Config {
            path: path.to_path_buf(),
            https_addr,
            admin_addr,
            cert_path: raw.tls.cert,
            key_path: raw.tls.key,
            ca_bundle_path: raw.tls.ca_bundle,
            watch_interval: match raw.reload.watch_interval.unwrap_or(DEFAULT_WATCH_INTERVAL_SECONDS) {
                0 => None,
                seconds => Some(Duration::from_secs(seconds)),
            },
            upstreams,
            upstream_ca_file: raw.upstream_tls.ca_file,
            timeouts,
            routes: raw.routes,
            trusted_proxies,
            limits,
            harbor_enabled: raw.harbor.enabled.unwrap_or(DEFAULT_HARBOR_ENABLED),
            worker_threads,
            warnings,
        })
    }

    /// Returns the number of worker threads to start: `runtime.worker_threads`, or one per
    /// CPU this process may run on.
    pub fn worker_count(&self) -> usize {
        self.worker_threads.unwrap_or_else(crate::workers::available_cpus)
    }

    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|upstream| upstream.name == name)
    }
}

fn parse_limits(raw: &RawLimits) -> Result<Limits, String> {
    let at_least = |key: &str, value: Option<usize>, default: usize, min: usize| match value {
        Some(n) if n < min => Err(format!("limits.{key}: {n} is below the minimum {min}")),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    Ok(Limits {
        max_connections: at_least("max_connections", raw.max_connections, DEFAULT_MAX_CONNECTIONS, 1)?,
        // Smaller header limits would reject ordinary registry tokens.
        max_header_bytes: at_least("max_header_bytes", raw.max_header_bytes, DEFAULT_MAX_HEADER_BYTES, 8 << 10)?,
        max_uri_bytes: at_least("max_uri_bytes", raw.max_uri_bytes, DEFAULT_MAX_URI_BYTES, 1 << 10)?,
        max_concurrent_streams: at_least(
            "max_concurrent_streams",
            raw.max_concurrent_streams.map(|n| n as usize),
            DEFAULT_MAX_CONCURRENT_STREAMS as usize,
            1,
        )? as u32,
    })
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        format!("{key}: {value:?} is not a socket address; write IP:PORT, e.g. \"0.0.0.0:8443\"")
    })
}

fn parse_upstream_uri(name: &str, value: &str) -> Result<Uri, String> {
    let uri: Uri = value.parse().map_err(|_| {
        format!("upstreams.{name}: {value:?} is not a URL; write e.g. \"http://harbor-core\"")
    })?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(format!(
                "upstreams.{name}: {value:?} must start with http:// or https://"
            ));
        }
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("upstreams.{name}: {value:?} has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "upstreams.{name}: {value:?} contains credentials; the gateway does not send them, \
             so remove the user part"
        ));
    }
    // `Uri` accepts any digits as a port; a port that is empty, zero or above 65535 would
    // otherwise fall back to the scheme's default port.
    let port_text = authority.as_str().rsplit_once(':').map(|(_, port)| port).filter(|_| !authority.as_str().ends_with(']'));
    if let Some(port_text) = port_text {
        if !matches!(port_text.parse::<u16>(), Ok(port) if port > 0) {
            return Err(format!(
                "upstreams.{name}: {value:?} has an invalid port {port_text:?}; give a port from 1 to 65535 or none"
            ));
        }
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "upstreams.{name}: {value:?} has a path or query; give only scheme, host and port, \
             because paths are forwarded as the client sent them"
        ));
    }
    Ok(uri)
}

fn validate_route(
    index: usize,
    route: &RouteSpec,
    upstreams: &BTreeMap<String, String>,
) -> Result<(), String> {
    let key = format!("routes[{index}]");
    let path = match (&route.prefix, &route.exact) {
        (Some(path), None) | (None, Some(path)) => path,
        _ => return Err(format!("{key}: set exactly one of `prefix` or `exact`")),
    };
    if !path.starts_with('/') {
        return Err(format!("{key}: path {path:?} must start with '/'"));
    }
    if path.len() > 1 && path.ends_with('/') {
        return Err(format!(
            "{key}: path {path:?} must not end with '/'; prefixes match at segment boundaries already"
        ));
    }
    match (&route.upstream, route.status) {
        (Some(name), None) => {
            if !upstreams.contains_key(name) {
                return Err(format!(
                    "{key}: upstream {name:?} is not defined; add it under [upstreams]"
                ));
            }
        }
        (None, Some(status)) => {
            if !(400..=599).contains(&status) {
                return Err(format!("{key}: status {status} must be an error status, 400 to 599"));
            }
        }
        _ => return Err(format!("{key}: set exactly one of `upstream` or `status`")),
    }
    if let Some(strip) = &route.strip_prefix {
        let starts_with_strip = path == strip
            || (path.starts_with(strip.as_str()) && path.as_bytes().get(strip.len()) == Some(&b'/'));
        if !strip.starts_with('/') || !starts_with_strip {
            return Err(format!(
                "{key}: strip_prefix {strip:?} must be a leading segment of the route path {path:?}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[listen]
https = "127.0.0.1:8443"
[tls]
cert = "c.pem"
key = "k.pem"
[upstreams]
harbor_core = "http://127.0.0.1:5000"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("gateway.toml"), text)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.timeouts.registry_idle, Duration::from_secs(900));
        assert_eq!(config.timeouts.default_idle, Duration::from_secs(1800));
        assert!(config.admin_addr.is_none());
        assert_eq!(config.limits.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(config.limits.max_header_bytes, 64 << 10);
        assert_eq!(config.timeouts.keep_alive, Duration::from_secs(DEFAULT_KEEP_ALIVE_SECONDS));
        assert_eq!(config.upstream(HARBOR_CORE).unwrap().uri, "http://127.0.0.1:5000");
        assert!(config.harbor_enabled);
    }

    #[test]
    fn harbor_can_be_disabled() {
        let config = parse(&format!("{MINIMAL}[harbor]\nenabled = false\n")).unwrap();
        assert!(!config.harbor_enabled);
        let error = parse(&format!("{MINIMAL}[harbor]\nenable = false\n")).unwrap_err();
        assert!(error.to_string().contains("unknown field `enable`"), "{error}");
    }

    #[test]
    fn worker_threads_default_to_cpus() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.worker_threads, None);
        assert_eq!(config.worker_count(), crate::workers::available_cpus());
        let config = parse(&format!("{MINIMAL}[runtime]\nworker_threads = 3\n")).unwrap();
        assert_eq!(config.worker_count(), 3);
        let error = parse(&format!("{MINIMAL}[runtime]\nthreads = 3\n")).unwrap_err();
        assert!(error.to_string().contains("unknown field `threads`"), "{error}");
    }

    #[test]
    fn unused_upstream_gives_warning() {
        let config = parse(&MINIMAL.replace("harbor_core =", "harbor_kore =")).unwrap();
        assert_eq!(config.warnings.len(), 1);
        assert!(config.warnings[0].contains("upstreams.harbor_kore"), "{:?}", config.warnings);
    }

    #[test]
    fn unknown_key_is_rejected() {
        let error = parse(&format!("{MINIMAL}\n[timeouts]\nidle = 3\n")).unwrap_err();
        assert!(error.to_string().contains("unknown field `idle`"), "{error}");
        assert!(error.to_string().contains("gateway.toml"), "{error}");
    }

    #[test]
    fn bad_values_name_key_and_fix() {
        let cases = [
            (MINIMAL.replace("127.0.0.1:8443", "localhost"), "listen.https"),
            (MINIMAL.replace("http://127.0.0.1:5000", "ftp://x"), "upstreams.harbor_core"),
            (MINIMAL.replace("http://127.0.0.1:5000", "http://x/v2"), "has a path"),
            (MINIMAL.replace("http://127.0.0.1:5000", "http://127.0.0.1:99999"), "invalid port"),
            (MINIMAL.replace("http://127.0.0.1:5000", "http://127.0.0.1:0"), "invalid port"),
            (MINIMAL.replace("http://127.0.0.1:5000", "http://127.0.0.1:"), "invalid port"),
            (MINIMAL.replace("http://127.0.0.1:5000", "http://user:pw@core"), "credentials"),
            (format!("{MINIMAL}[timeouts]\nconnect = 0\n"), "timeouts.connect"),
            (format!("{MINIMAL}[[routes]]\nprefix = \"/x\"\nupstream = \"nope\"\n"), "not defined"),
            (format!("{MINIMAL}[[routes]]\nprefix = \"/x/\"\nstatus = 404\n"), "must not end"),
            (
                format!("{MINIMAL}[[routes]]\nprefix = \"/a/b\"\nupstream = \"harbor_core\"\nstrip_prefix = \"/b\"\n"),
                "leading segment",
            ),
            (format!("{MINIMAL}[proxy]\ntrusted_proxies = [\"lb\"]\n"), "not an IP address"),
            (format!("{MINIMAL}[limits]\nmax_connections = 0\n"), "limits.max_connections"),
            (format!("{MINIMAL}[limits]\nmax_header_bytes = 100\n"), "limits.max_header_bytes"),
            (format!("{MINIMAL}[runtime]\nworker_threads = 0\n"), "runtime.worker_threads"),
            (format!("{MINIMAL}[runtime]\nworker_threads = 5000\n"), "runtime.worker_threads"),
        ];
        for (text, expected) in cases {
            let error = parse(&text).unwrap_err().to_string();
            assert!(error.contains(expected), "expected {expected:?} in {error:?}");
        }
    }
}
