//! The route table: built once from the configuration, matched on the raw request path.
//!
//! Prefixes match at `/` segment boundaries (`/v2` matches `/v2` and `/v2/…`, never `/v2x`),
//! the longest matching path wins, and an exact route beats a prefix route of the same
//! length. Paths are compared byte for byte as the client sent them, without decoding, so
//! `/v2/%2e%2e/` stays inside `/v2` and `//v2/` is not `/v2`.

use std::borrow::Cow;

use http::StatusCode;

use crate::clean_path::clean_path;

use crate::config::{Config, RouteSpec, HARBOR_CORE, HARBOR_PORTAL, NOTARY, RANCHER};

/// Index of an upstream in [`RouteTable::upstreams`].
pub type UpstreamId = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchKind {
    Prefix,
    Exact,
}

/// The gateway's action for a request that matched a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Proxy(UpstreamId),
    /// The gateway responds itself with this status and message.
    Respond(StatusCode, Cow<'static, str>),
    /// Permanent redirect (308) to the same path with a trailing `/`.
    AddTrailingSlash,
    /// The gateway responds with the CA bundle named by `tls.ca_bundle`.
    ServeCaBundle,
    /// A Harbor route while `harbor.enabled` is false: 503 saying the registry is disabled.
    RegistryDisabled,
}

/// Name of the route that serves the Harbor portal, whose HTML responses are rewritten.
pub const PORTAL_ROUTE: &str = "portal";
/// Name of the catch-all route to Rancher.
pub const RANCHER_ROUTE: &str = "rancher";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Short fixed name, safe as a metrics label and in logs.
    pub name: Cow<'static, str>,
    pub path: String,
    pub kind: MatchKind,
    pub action: Action,
    pub strip_prefix: Option<String>,
    /// Whether the upstream gets the canonical path (see [`clean_path`]), because it
    /// redirects every other form.
    pub clean_path: bool,
}

impl Route {
    fn match_len(&self, path: &str) -> Option<usize> {
        let matched = match self.kind {
            MatchKind::Exact => path == self.path,
            MatchKind::Prefix => path_has_prefix(path, &self.path),
        };
        matched.then_some(self.path.len())
    }

    /// Removes the route's strip prefix from `path`, giving the path sent upstream, cleaned
    /// when the route sets `clean_path`.
    pub fn upstream_path<'a>(&self, path: &'a str) -> Cow<'a, str> {
        let stripped = match &self.strip_prefix {
            Some(strip) if path_has_prefix(path, strip) => match &path[strip.len()..] {
                "" => "/",
                rest => rest,
            },
            _ => path,
        };
        if self.clean_path {
            clean_path(stripped)
        } else {
            Cow::Borrowed(stripped)
        }
    }
}

/// Tests whether `path` is `prefix` or lies below it at a `/` boundary. `/` is a prefix of
/// every absolute path.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    path.starts_with(prefix)
        && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
}

#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Upstream names, indexed by [`UpstreamId`].
    upstreams: Vec<String>,
}

/// Path at which the gateway serves `tls.ca_bundle`, inside the portal's prefix.
pub const CA_BUNDLE_PATH: &str = "/registry/ca.crt";

/// The default table, as Harbor's own front proxy lays out its paths, adapted to share the
/// host with Rancher: `(name, kind, path, upstream, strip_prefix)`.
const DEFAULT_ROUTES: &[(&str, MatchKind, &str, &str, Option<&str>)] = {
    use MatchKind::{Exact, Prefix};
    &[
        ("registry", Prefix, "/v2", HARBOR_CORE, None),
        ("token", Prefix, "/service/token", HARBOR_CORE, None),
        ("registry-token", Prefix, "/registry/service/token", HARBOR_CORE, Some("/registry")),
        ("notary", Prefix, "/registry/notary", NOTARY, Some("/registry/notary")),
        ("harbor-api", Prefix, "/registry/api", HARBOR_CORE, Some("/registry")),
        ("harbor-api", Prefix, "/registry/c", HARBOR_CORE, Some("/registry")),
        ("harbor-api", Prefix, "/registry/chartrepo", HARBOR_CORE, Some("/registry")),
        ("harbor-api", Prefix, "/api/v2.0", HARBOR_CORE, None),
        ("harbor-login", Exact, "/c/login", HARBOR_CORE, None),
        ("harbor-login", Exact, "/c/log_out", HARBOR_CORE, None),
        ("harbor-login", Exact, "/c/userExists", HARBOR_CORE, None),
        ("harbor-login", Prefix, "/c/oidc", HARBOR_CORE, None),
        ("harbor-login", Prefix, "/c/authproxy", HARBOR_CORE, None),
        (PORTAL_ROUTE, Prefix, "/registry", HARBOR_PORTAL, Some("/registry")),
        (RANCHER_ROUTE, Prefix, "/", RANCHER, None),
    ]
};

impl RouteTable {
    /// Builds the default table for the configured upstreams, then applies `[[routes]]`.
    /// With `harbor.enabled = false` every default route except Rancher's answers 503;
    /// routes from `[[routes]]` still apply as written, because the operator named them.
    pub fn from_config(config: &Config) -> RouteTable {
        let upstreams: Vec<String> = config.upstreams.iter().map(|u| u.name.clone()).collect();
        let upstream_id = |name: &str| upstreams.iter().position(|n| n == name);
        let mut routes = Vec::new();

        for &(name, kind, path, upstream, strip) in DEFAULT_ROUTES {
            let action = match upstream_id(upstream) {
                Some(id) => Action::Proxy(id),
                None => Action::Respond(StatusCode::NOT_FOUND, not_configured_message(upstream)),
            };
            routes.push(Route {
                name: Cow::Borrowed(name),
                path: path.to_string(),
                kind,
                action,
                strip_prefix: strip.map(str::to_string),
                clean_path: redirects_unclean_paths(upstream),
            });
        }
        routes.push(Route {
            name: Cow::Borrowed("notifications"),
            path: "/service/notifications".to_string(),
            kind: MatchKind::Prefix,
            action: Action::Respond(StatusCode::NOT_FOUND, Cow::Borrowed("not found")),
            strip_prefix: None,
            clean_path: false,
        });
        routes.push(Route {
            name: Cow::Borrowed("portal-redirect"),
            path: "/registry".to_string(),
            kind: MatchKind::Exact,
            action: Action::AddTrailingSlash,
            strip_prefix: None,
            clean_path: false,
        });

        if !config.harbor_enabled {
            for route in routes.iter_mut().filter(|r| r.name != RANCHER_ROUTE) {
                route.action = Action::RegistryDisabled;
            }
        }

        // The CA bundle is Rancher's, so it is served even while Harbor is disabled.
        if config.ca_bundle_path.is_some() {
            routes.push(Route {
                name: Cow::Borrowed("ca-bundle"),
                path: CA_BUNDLE_PATH.to_string(),
                kind: MatchKind::Exact,
                action: Action::ServeCaBundle,
                strip_prefix: None,
                clean_path: false,
            });
        }

        for spec in &config.routes {
            let route = route_from_spec(spec, &upstream_id);
            routes.retain(|r| !(r.path == route.path && r.kind == route.kind));
            routes.push(route);
        }

        RouteTable { routes, upstreams }
    }

    /// Finds the route for a raw request path.
    pub fn find(&self, path: &str) -> Option<&Route> {
        let mut best: Option<(&Route, usize)> = None;
        for route in &self.routes {
            let Some(len) = route.match_len(path) else { continue };
            let better = match best {
                None => true,
                Some((current, current_len)) => {
                    len > current_len
                        || (len == current_len
                            && route.kind == MatchKind::Exact
                            && current.kind == MatchKind::Prefix)
                }
            };
            if better {
                best = Some((route, len));
            }
        }
        best.map(|(route, _)| route)
    }

    pub fn upstream_name(&self, id: UpstreamId) -> &str {
        &self.upstreams[id]
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Maps a path on an upstream back to the public path that reaches it, for rewriting
    /// `Location` and token realms. `preferred` is tried first, usually the route that the
    /// current request took, then routes mounted at the root, then prefixed ones. Returns
    /// `None` when no route leads to that upstream path.
    pub fn public_path(
        &self,
        upstream: UpstreamId,
        upstream_path: &str,
        preferred: Option<&Route>,
    ) -> Option<String> {
        let unprefixed = self.routes.iter().filter(|r| r.strip_prefix.is_none());
        let prefixed = self.routes.iter().filter(|r| r.strip_prefix.is_some());
        let candidates = preferred.into_iter().chain(unprefixed).chain(prefixed);
        for route in candidates {
            if route.action != Action::Proxy(upstream) {
                continue;
            }
            let public = match &route.strip_prefix {
                Some(strip) => format!("{strip}{upstream_path}"),
                None => upstream_path.to_string(),
            };
            // The public path must route back to this same route, or the rewrite would
            // send the client somewhere else.
            if self.find(&public).is_some_and(|found| found == route) {
                return Some(public);
            }
        }
        None
    }
}

/// Tests whether the upstream redirects non-canonical paths. notary-server does, through
/// gorilla/mux.
fn redirects_unclean_paths(upstream: &str) -> bool {
    upstream == NOTARY
}

fn not_configured_message(upstream: &str) -> Cow<'static, str> {
    match upstream {
        NOTARY => Cow::Borrowed("Notary is not enabled on this gateway"),
        HARBOR_CORE => Cow::Borrowed("the Harbor registry is not configured on this gateway"),
        HARBOR_PORTAL => Cow::Borrowed("the Harbor portal is not configured on this gateway"),
        RANCHER => Cow::Borrowed("no upstream is configured for this path; set upstreams.rancher to serve it"),
        _ => Cow::Borrowed("no upstream is configured for this path"),
    }
}

fn route_from_spec(spec: &RouteSpec, upstream_id: &dyn Fn(&str) -> Option<usize>) -> Route {
    let (path, kind) = match (&spec.prefix, &spec.exact) {
        (Some(path), _) => (path.clone(), MatchKind::Prefix),
        (None, Some(path)) => (path.clone(), MatchKind::Exact),
        (None, None) => unreachable!("validated in config: prefix or exact is set"),
    };
    let action = match (&spec.upstream, spec.status) {
        (Some(name), _) => match upstream_id(name) {
            Some(id) => Action::Proxy(id),
            None => unreachable!("validated in config: upstream {name} exists"),
        },
        (None, Some(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::NOT_FOUND);
            Action::Respond(status, Cow::Owned(status.canonical_reason().unwrap_or("error").to_lowercase()))
        }
        (None, None) => unreachable!("validated in config: upstream or status is set"),
    };
    Route {
        name: Cow::Owned(format!("custom:{path}")),
        path,
        kind,
        action,
        strip_prefix: spec.strip_prefix.clone(),
        clean_path: spec.upstream.as_deref().is_some_and(redirects_unclean_paths),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn table(extra: &str) -> RouteTable {
        let text = format!(
            r#"
[listen]
https = "127.0.0.1:8443"
[tls]
cert = "c"
key = "k"
[upstreams]
harbor_core = "http://core"
harbor_portal = "http://portal"
notary = "http://notary:4443"
rancher = "https://rancher"
token = "http://token"
{extra}
"#
        );
        RouteTable::from_config(&Config::parse(Path::new("t.toml"), &text).unwrap())
    }

    /// `(request path, route name, upstream or "-", path sent upstream)`.
    const CASES: &[(&str, &str, &str, &str)] = &[
        ("/v2", "registry", "harbor_core", "/v2"),
        ("/v2/", "registry", "harbor_core", "/v2/"),
        ("/v2/library/alpine/manifests/latest", "registry", "harbor_core", "/v2/library/alpine/manifests/latest"),
        ("/v2/%2e%2e/", "registry", "harbor_core", "/v2/%2e%2e/"),
        ("/v2/a%2Fb/blobs/uploads/x", "registry", "harbor_core", "/v2/a%2Fb/blobs/uploads/x"),
        ("/v2x", "rancher", "rancher", "/v2x"),
        ("//v2/", "rancher", "rancher", "//v2/"),
        ("/V2/", "rancher", "rancher", "/V2/"),
        ("/service/token", "token", "harbor_core", "/service/token"),
        ("/service/tokens", "rancher", "rancher", "/service/tokens"),
        ("/service/notifications", "notifications", "-", ""),
        ("/service/notifications/events", "notifications", "-", ""),
        ("/registry/service/token", "registry-token", "harbor_core", "/service/token"),
        ("/registry/notary", "notary", "notary", "/"),
        ("/registry/notary/", "notary", "notary", "/"),
        ("/registry/notary/v2/a/b/c/_trust/tuf/root.json", "notary", "notary", "/v2/a/b/c/_trust/tuf/root.json"),
        ("/registry/notary//v2/", "notary", "notary", "/v2/"),
        ("/registry/notary///v2//a/b/_trust/tuf/root.json", "notary", "notary", "/v2/a/b/_trust/tuf/root.json"),
        ("/registry/notary/v2/a/../b/_trust/", "notary", "notary", "/v2/b/_trust/"),
        ("/registry/notary/../../v2/", "notary", "notary", "/v2/"),
        ("/registry//v2/", "portal", "harbor_portal", "//v2/"),
        ("/registry/notaryx", "portal", "harbor_portal", "/notaryx"),
        ("/registry/api/v2.0/projects", "harbor-api", "harbor_core", "/api/v2.0/projects"),
        ("/registry/c/login", "harbor-api", "harbor_core", "/c/login"),
        ("/registry/chartrepo/lib/index.yaml", "harbor-api", "harbor_core", "/chartrepo/lib/index.yaml"),
        ("/api/v2.0/projects", "harbor-api", "harbor_core", "/api/v2.0/projects"),
        ("/api/v2.0", "harbor-api", "harbor_core", "/api/v2.0"),
        ("/api/v1/namespaces", "rancher", "rancher", "/api/v1/namespaces"),
        ("/api/v2.00", "rancher", "rancher", "/api/v2.00"),
        ("/c/login", "harbor-login", "harbor_core", "/c/login"),
        ("/c/login/x", "rancher", "rancher", "/c/login/x"),
        ("/c/log_out", "harbor-login", "harbor_core", "/c/log_out"),
        ("/c/userExists", "harbor-login", "harbor_core", "/c/userExists"),
        ("/c/oidc/onboard", "harbor-login", "harbor_core", "/c/oidc/onboard"),
        ("/c/authproxy/redirect", "harbor-login", "harbor_core", "/c/authproxy/redirect"),
        ("/c/local/explorer", "rancher", "rancher", "/c/local/explorer"),
        ("/c/c-abc12/apps", "rancher", "rancher", "/c/c-abc12/apps"),
        ("/registry", "portal-redirect", "-", ""),
        ("/registry/", "portal", "harbor_portal", "/"),
        ("/registry/main.js", "portal", "harbor_portal", "/main.js"),
        ("/registry-x", "rancher", "rancher", "/registry-x"),
        ("/registry/../v1/x", "portal", "harbor_portal", "/../v1/x"),
        ("/", "rancher", "rancher", "/"),
        ("/v3/settings", "rancher", "rancher", "/v3/settings"),
        ("/k8s/clusters/local/api", "rancher", "rancher", "/k8s/clusters/local/api"),
    ];

    #[test]
    fn default_table_matches_cases() {
        let table = table("");
        for &(path, name, upstream, sent) in CASES {
            let route = table.find(path).unwrap_or_else(|| panic!("{path}: no route"));
            assert_eq!(route.name, name, "{path}: route");
            match &route.action {
                Action::Proxy(id) => {
                    assert_eq!(table.upstream_name(*id), upstream, "{path}: upstream");
                    assert_eq!(route.upstream_path(path), sent, "{path}: upstream path");
                }
                other => assert_eq!(upstream, "-", "{path}: expected a proxy route, got {other:?}"),
            }
        }
    }

    #[test]
    fn missing_upstream_answers_not_found() {
        let config = Config::parse(
            Path::new("t.toml"),
            "[listen]\nhttps = \"127.0.0.1:1\"\n[tls]\ncert = \"c\"\nkey = \"k\"\n[upstreams]\nharbor_core = \"http://core\"\n",
        )
        .unwrap();
        let table = RouteTable::from_config(&config);

        let notary = table.find("/registry/notary/v2/x").unwrap();
        assert_eq!(
            notary.action,
            Action::Respond(StatusCode::NOT_FOUND, Cow::Borrowed("Notary is not enabled on this gateway"))
        );
        let rancher = table.find("/dashboard").unwrap();
        assert!(matches!(rancher.action, Action::Respond(StatusCode::NOT_FOUND, _)));
    }

    #[test]
    fn disabled_harbor_keeps_rancher() {
        let table = table("[harbor]\nenabled = false\n");
        for path in ["/v2/", "/v2/a/manifests/b", "/service/token", "/registry", "/registry/", "/registry/main.js",
            "/registry/notary/v2/x", "/api/v2.0/projects", "/c/login", "/c/oidc/callback", "/service/notifications"]
        {
            assert_eq!(table.find(path).unwrap().action, Action::RegistryDisabled, "{path}");
        }
        for path in ["/", "/v3/settings", "/api/v1/namespaces", "/c/local/explorer", "/registry-x"] {
            let route = table.find(path).unwrap();
            assert!(
                matches!(route.action, Action::Proxy(id) if table.upstream_name(id) == "rancher"),
                "{path}: {route:?}"
            );
        }
    }

    #[test]
    fn configured_route_replaces_default() {
        let table = table("[[routes]]\nprefix = \"/service/token\"\nupstream = \"token\"\n");
        let route = table.find("/service/token").unwrap();
        assert!(matches!(route.action, Action::Proxy(id) if table.upstream_name(id) == "token"));
        assert_eq!(
            table.routes().iter().filter(|r| r.path == "/service/token").count(),
            1
        );
    }

    #[test]
    fn configured_notary_route_cleans_path() {
        let table = table("[[routes]]\nprefix = \"/notary\"\nupstream = \"notary\"\nstrip_prefix = \"/notary\"\n");
        let route = table.find("/notary//v2/").unwrap();
        assert_eq!(route.upstream_path("/notary//v2/"), "/v2/");
        let other = table.find("/registry//v2/").unwrap();
        assert_eq!(other.upstream_path("/registry//v2/"), "//v2/");
    }

    #[test]
    fn configured_status_route_blocks_path() {
        let table = table("[[routes]]\nprefix = \"/registry/chartrepo\"\nstatus = 404\n");
        let route = table.find("/registry/chartrepo/x").unwrap();
        assert!(matches!(route.action, Action::Respond(StatusCode::NOT_FOUND, _)));
    }

    #[test]
    fn public_path_reverses_routes() {
        let table = table("[[routes]]\nprefix = \"/service/token\"\nupstream = \"token\"\n");
        let core = 0;
        assert_eq!(table.upstream_name(core), "harbor_core");
        let token = (0..5).find(|&id| table.upstream_name(id) == "token").unwrap();
        let portal = (0..5).find(|&id| table.upstream_name(id) == "harbor_portal").unwrap();
        let notary = (0..5).find(|&id| table.upstream_name(id) == "notary").unwrap();

        assert_eq!(table.public_path(token, "/service/token", None).as_deref(), Some("/service/token"));
        assert_eq!(table.public_path(core, "/v2/x/blobs/uploads/1", None).as_deref(), Some("/v2/x/blobs/uploads/1"));
        assert_eq!(table.public_path(core, "/api/v2.0/projects", None).as_deref(), Some("/api/v2.0/projects"));
        assert_eq!(table.public_path(portal, "/", None).as_deref(), Some("/registry/"));
        assert_eq!(table.public_path(portal, "/index.html", None).as_deref(), Some("/registry/index.html"));
        assert_eq!(table.public_path(notary, "/v2/gun/_trust", None).as_deref(), Some("/registry/notary/v2/gun/_trust"));
        // The token upstream serves nothing else publicly.
        assert_eq!(table.public_path(token, "/other", None), None);
    }
}
