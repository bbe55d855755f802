//! Gateway configuration: a TOML file loaded once, validated, then frozen.
//!
//! Every error names the file, the key and the value at fault, and says how to fix it.

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
/// Whether the Harbor routes (`/v2/`, `/registry/`, the portal carve-outs) are served. When
/// false they answer 503 saying the registry is disabled, and Rancher routes work as before.
pub const DEFAULT_HARBOR_ENABLED: bool = true;

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
    harbor: RawHarbor,
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
    /// gateway answers itself.
    pub upstream: Option<String>,
    /// Leading part of the path removed before forwarding, for example `/registry`.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Status the gateway answers with instead of proxying: 404 blocks a path.
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
    /// `harbor.enabled`: false turns every default Harbor route into a 503.
    pub harbor_enabled: bool,
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
        };

        Ok(Config {
            path: path.to_path_buf(),
            https_addr,
            admin_addr,
            cert_path: raw.tls.cert,
            key_path: raw.tls.key,
            upstreams,
            upstream_ca_file: raw.upstream_tls.ca_file,
            timeouts,
            routes: raw.routes,
            trusted_proxies,
            harbor_enabled: raw.harbor.enabled.unwrap_or(DEFAULT_HARBOR_ENABLED),
        })
    }

    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|upstream| upstream.name == name)
    }
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
    if uri.authority().is_none() {
        return Err(format!("upstreams.{name}: {value:?} has no host"));
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
            (format!("{MINIMAL}[timeouts]\nconnect = 0\n"), "timeouts.connect"),
            (format!("{MINIMAL}[[routes]]\nprefix = \"/x\"\nupstream = \"nope\"\n"), "not defined"),
            (format!("{MINIMAL}[[routes]]\nprefix = \"/x/\"\nstatus = 404\n"), "must not end"),
            (
                format!("{MINIMAL}[[routes]]\nprefix = \"/a/b\"\nupstream = \"harbor_core\"\nstrip_prefix = \"/b\"\n"),
                "leading segment",
            ),
            (format!("{MINIMAL}[proxy]\ntrusted_proxies = [\"lb\"]\n"), "not an IP address"),
        ];
        for (text, expected) in cases {
            let error = parse(&text).unwrap_err().to_string();
            assert!(error.contains(expected), "expected {expected:?} in {error:?}");
        }
    }
}
