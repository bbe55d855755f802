//! The request handler: route, forward, stream back.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;

use crate::body::{IdleTimeout, ProxyBody};
use crate::config::{Config, Limits};
use crate::error::{error_response, ProxyError};
use crate::framing;
use crate::headers::{self, Downstream};
use crate::metrics::{Metrics, RouteMetrics, UpstreamMetrics, NO_ROUTE};
use crate::request_body::{BodyFailure, BodyProgress, ClientBody};
use crate::request_checks::check_request;
use crate::rewrite::{InternalOrigins, RewriteContext};
use crate::routing::{path_has_prefix, Action, Route, RouteTable, UpstreamId, PORTAL_ROUTE};
use crate::telemetry::{upstream_failure, ConnectionInfo, Exchange, ObservedBody};
use crate::upgrade::{self, UpgradeRequest};
use crate::portal;
use crate::upstream::{build_clients, UpstreamClient, UpstreamTlsError};

/// Scheme and authority of one upstream, ready to put into request URIs.
#[derive(Debug, Clone)]
struct UpstreamTarget {
    name: String,
    scheme: Scheme,
    authority: Authority,
}

/// Everything needed to serve requests; built from one configuration and then shared.
pub struct Gateway {
    table: RouteTable,
    targets: Vec<UpstreamTarget>,
    origins: InternalOrigins,
    /// One client per worker thread, indexed by [`crate::workers::current_worker`].
    clients: Vec<UpstreamClient>,
    registry_idle: Duration,
    default_idle: Duration,
    trusted_proxies: Vec<std::net::IpAddr>,
    metrics: Arc<Metrics>,
    /// Indexed like `table.routes()`.
    route_metrics: Vec<Arc<RouteMetrics>>,
    no_route_metrics: Arc<RouteMetrics>,
    /// Indexed by [`UpstreamId`].
    upstream_metrics: Vec<Arc<UpstreamMetrics>>,
    /// The PEM CA bundle served at `/registry/ca.crt`, when configured.
    ca_bundle: Option<Bytes>,
    limits: Limits,
}

impl Gateway {
    /// Builds a gateway with metrics of its own.
    pub fn new(config: &Config) -> Result<Gateway, UpstreamTlsError> {
        Self::with_metrics(config, Arc::new(Metrics::new()))
    }

    /// Builds a gateway that counts into `metrics`, so that a gateway built on reload
    /// continues the counts of the one it replaces.
    pub fn with_metrics(config: &Config, metrics: Arc<Metrics>) -> Result<Gateway, UpstreamTlsError> {
        let targets = config
            .upstreams
            .iter()
            .map(|upstream| UpstreamTarget {
                name: upstream.name.clone(),
                scheme: upstream.uri.scheme().cloned().expect("validated in config: scheme"),
                authority: upstream.uri.authority().cloned().expect("validated in config: host"),
            })
            .collect();
        let table = RouteTable::from_config(config);
        let route_metrics = table.routes().iter().map(|route| Arc::new(metrics.route(&route.name))).collect();
        let upstream_metrics = config
            .upstreams
            .iter()
            .map(|upstream| Arc::new(metrics.upstream(&upstream.name)))
            .collect();
        Ok(Gateway {
            no_route_metrics: Arc::new(metrics.route(NO_ROUTE)),
            route_metrics,
            upstream_metrics,
            metrics,
            ca_bundle: None,
            table,
            targets,
            origins: InternalOrigins::new(&config.upstreams),
            clients: build_clients(config.upstream_ca_file.as_deref(), config.timeouts.connect, config.worker_count())?,
            registry_idle: config.timeouts.registry_idle,
            default_idle: config.timeouts.default_idle,
            trusted_proxies: config.trusted_proxies.clone(),
            limits: config.limits.clone(),
        })
    }

    pub fn routes(&self) -> &RouteTable {
        &self.table
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Sets the CA bundle served at `/registry/ca.crt`; the route exists only when the
    /// configuration names a bundle.
    pub fn with_ca_bundle(mut self, bundle: Option<Bytes>) -> Gateway {
        self.ca_bundle = bundle;
        self
    }

    /// Returns the `host:port` of every upstream, for the readiness probe's name resolution.
    pub fn upstream_authorities(&self) -> impl Iterator<Item = (&str, String)> {
        self.targets.iter().map(|target| {
            let port = target.authority.port_u16().unwrap_or(if target.scheme == Scheme::HTTPS { 443 } else { 80 });
            (target.name.as_str(), format!("{}:{port}", target.authority.host()))
        })
    }

    /// Serves one request from a downstream client; every failure becomes a response.
    /// Metrics and the access log cover the request until its response body ends.
    pub async fn handle(&self, request: Request<Incoming>, connection: &Arc<ConnectionInfo>) -> Response<ObservedBody> {
        let route = self.table.find(request.uri().path());
        let mut exchange = Exchange::start(self.route_metrics(route), &request, connection.clone());
        let registry_path = is_registry_path(request.uri().path());

        let response = match self.dispatch(request, route, &mut exchange, connection).await {
            Ok(response) => response,
            Err(error) => {
                if let Some(failure) = upstream_failure(&error) {
                    exchange.upstream_failed(failure);
                }
                exchange.log_failure(&error);
                error.into_response(registry_path)
            }
        };
        exchange.respond(response)
    }

    fn route_metrics(&self, route: Option<&Route>) -> Arc<RouteMetrics> {
        let index = route.and_then(|route| self.table.routes().iter().position(|r| std::ptr::eq(r, route)));
        match index {
            Some(index) => self.route_metrics[index].clone(),
            None => self.no_route_metrics.clone(),
        }
    }

    async fn dispatch(
        &self,
        request: Request<Incoming>,
        route: Option<&Route>,
        exchange: &mut Exchange,
        connection: &ConnectionInfo,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if let Some(reason) = framing::rejected(&request) {
            return Err(ProxyError::BadRequest(reason.into()));
        }
        // Before the route check, because a CONNECT target has no path.
        let upgrade = upgrade::classify(&request)?;
        // Before the route is used: a path that an upstream would normalize elsewhere must
        // not reach the route it seems to match.
        check_request(&request, &self.limits)?;
        let route = route.ok_or(ProxyError::BadRequest("the request target is not an absolute path".into()))?;

        match &route.action {
            Action::Proxy(upstream) => {
                exchange.set_upstream(self.upstream_metrics[*upstream].clone());
                self.forward(request, connection, route, *upstream, upgrade, exchange).await
            }
            Action::Respond(status, message) => Err(ProxyError::RouteStatus {
                status: *status,
                message: message.clone(),
            }),
            Action::AddTrailingSlash => Ok(redirect_with_slash(request.uri())),
            Action::RegistryDisabled => Err(ProxyError::RegistryDisabled),
            Action::ServeCaBundle => Ok(ca_bundle_response(self.ca_bundle.as_ref())),
        }
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        connection: &ConnectionInfo,
        route: &Route,
        upstream: UpstreamId,
        upgrade: Option<UpgradeRequest>,
        exchange: &Exchange,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let mut request = request;
        let peer = connection.peer;
        let target = &self.targets[upstream];
        let idle = self.idle_timeout(request.uri().path());
        // The path is kept only for the tunnel's log lines.
        let tunnel_path = upgrade.as_ref().map(|_| request.uri().path().to_string());
        let downstream_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let method = parts.method.clone();

        // HTTP/2 clients send the host as :authority and usually no Host header; HTTP/1.1
        // clients in absolute form send both, and the request line wins (RFC 9112 3.2.2).
        let host = match parts.uri.authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str())
                .map_err(|_| ProxyError::BadRequest("invalid authority".into()))?,
            None => parts
                .headers
                .get(header::HOST)
                .cloned()
                .ok_or(ProxyError::BadRequest("missing Host header".into()))?,
        };
        if host.to_str().is_err() {
            return Err(ProxyError::BadRequest("Host header is not ASCII".into()));
        }
        let public_host = host.clone();

        headers::remove_hop_by_hop(&mut parts.headers);
        // The gateway already sent `100 Continue` for `Expect: 100-continue` to its client when it began
        // reading the body; the upstream gets the body right away.
        parts.headers.remove(header::EXPECT);
        let downstream = Downstream {
            peer: peer.ip(),
            trusted: self.trusted_proxies.contains(&peer.ip()),
        };
        headers::set_forwarding(&mut parts.headers, downstream, &host);
        parts.headers.insert(header::HOST, host);
        if let Some(upgrade) = &upgrade {
            upgrade.prepare_upstream(&mut parts.method, &mut parts.headers);
        }
        if route.name == PORTAL_ROUTE {
            portal::prepare_request(&mut parts.headers);
        }

        parts.uri = upstream_uri(&parts.uri, route, target)?;
        parts.version = http::Version::HTTP_11;
        let body = exchange.count_request_body(body);
        let progress = BodyProgress::new();
        let body = if upgrade.is_some() {
            // An upgrade's data flows through the tunnel after the response, so there is
            // no body to wait for here.
            ClientBody::new(body, idle, progress.clone())
        } else {
            ClientBody::read_first_frame(body, idle, progress.clone())
                .await
                .map_err(|source| client_body_error(progress.failure(), source, idle))?
        };
        let upstream_request = Request::from_parts(parts, body);

        let response = match self.send_upstream(upstream_request, &progress, idle).await {
            Some(Ok(response)) => response,
            Some(Err(error)) if progress.failure().is_some() => {
                return Err(client_body_error(progress.failure(), error.into(), idle));
            }
            Some(Err(error)) if error.is_connect() => {
                return Err(ProxyError::UpstreamConnect {
                    upstream: target.name.clone(),
                    source: error.into(),
                });
            }
            Some(Err(error)) => {
                return Err(ProxyError::UpstreamRequest {
                    upstream: target.name.clone(),
                    source: error.into(),
                });
            }
            None => {
                return Err(match progress.failure() {
                    Some(BodyFailure::Idle) => ProxyError::ClientBodyTimeout { timeout: idle },
                    Some(BodyFailure::Invalid) => ProxyError::ClientBody {
                        source: "the request body ended early or was malformed".into(),
                    },
                    None => ProxyError::UpstreamTimeout {
                        upstream: target.name.clone(),
                        timeout: idle,
                    },
                });
            }
        };

        let mut response = response;
        let switching = upgrade.is_some() && response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let upstream_upgrade = switching.then(|| hyper::upgrade::on(&mut response));
        let (mut parts, body) = response.into_parts();
        let upstream_protocol = parts.headers.get(header::UPGRADE).cloned();
        headers::remove_hop_by_hop(&mut parts.headers);
        if parts.headers.contains_key(header::LOCATION) || parts.headers.contains_key(header::WWW_AUTHENTICATE) {
            let context = RewriteContext {
                table: &self.table,
                origins: &self.origins,
                public_host: public_host.to_str().expect("checked to be ASCII above"),
                route,
                upstream,
            };
            rewrite_response_headers(&mut parts.headers, &context);
        }

        if let (Some(upgrade), Some(downstream), Some(upstream_side)) = (upgrade, downstream_upgrade, upstream_upgrade) {
            parts.status = upgrade.prepare_downstream(upstream_protocol, &mut parts.headers);
            let guard = connection.tunnels.open();
            upgrade::spawn_tunnel(downstream, upstream_side, guard, idle, target.name.clone(), tunnel_path.unwrap_or_default());
            return Ok(Response::from_parts(parts, ProxyBody::empty()));
        }

        let body = IdleTimeout::new(body, idle);
        let body = match &route.strip_prefix {
            Some(prefix) if route.name == PORTAL_ROUTE && portal::should_rewrite(&method, parts.status, &mut parts.headers) => {
                ProxyBody::Html(portal::HtmlRewriteBody::new(body, prefix))
            }
            _ => ProxyBody::Streaming(body),
        };
        Ok(Response::from_parts(parts, body))
    }

    /// Sends the request and waits for the response headers. The wait is an idle timeout
    /// that restarts with every request-body frame, so an upload that keeps moving is never
    /// cut. `None` means that the wait expired or the request body failed, and `progress`
    /// records which. Dropping the request future aborts the upstream request.
    async fn send_upstream(
        &self,
        request: Request<ClientBody>,
        progress: &BodyProgress,
        idle: Duration,
    ) -> Option<Result<Response<Incoming>, hyper_util::client::legacy::Error>> {
        let client = &self.clients[crate::workers::current_worker() % self.clients.len()];
        let response = client.request(request);
        let mut response = std::pin::pin!(response);
        loop {
            let deadline = progress.last_activity() + idle;
            tokio::select! {
                result = response.as_mut() => return Some(result),
                _ = tokio::time::sleep_until(deadline) => {
                    let expired = progress.last_activity() + idle <= tokio::time::Instant::now();
                    if expired && (!progress.waiting_on_client() || progress.failure().is_some()) {
                        return None;
                    }
                    if expired {
                        // The body's idle timer ends the request; check again shortly.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }

    fn idle_timeout(&self, path: &str) -> Duration {
        if is_registry_path(path) {
            self.registry_idle
        } else {
            self.default_idle
        }
    }
}

/// Builds the error for a request whose body failed on the client's side.
fn client_body_error(failure: Option<BodyFailure>, source: crate::body::BoxError, idle: Duration) -> ProxyError {
    match failure {
        Some(BodyFailure::Idle) => ProxyError::ClientBodyTimeout { timeout: idle },
        Some(BodyFailure::Invalid) | None => ProxyError::ClientBody { source },
    }
}

/// `/v2` and everything under it: the Docker Registry HTTP API V2.
pub fn is_registry_path(path: &str) -> bool {
    path_has_prefix(path, "/v2")
}

/// Builds the absolute URI the upstream client connects with. The path and query are the
/// client's bytes minus the route's strip prefix. Nothing is decoded, and only routes with
/// `clean_path` set (Notary) get a cleaned path.
fn upstream_uri(uri: &Uri, route: &Route, target: &UpstreamTarget) -> Result<Uri, ProxyError> {
    let path = uri.path();
    let upstream_path = route.upstream_path(path);
    let path_and_query = if upstream_path == path {
        uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"))
    } else {
        let joined = match uri.query() {
            Some(query) => format!("{upstream_path}?{query}"),
            None => upstream_path.to_string(),
        };
        PathAndQuery::try_from(joined)
            .map_err(|_| ProxyError::BadRequest("invalid request target".into()))?
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(target.scheme.clone());
    parts.authority = Some(target.authority.clone());
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target".into()))
}

fn rewrite_response_headers(headers: &mut http::HeaderMap, context: &RewriteContext<'_>) {
    if let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) {
        if let Some(rewritten) = context.rewrite_url(location) {
            if let Ok(value) = HeaderValue::from_str(&rewritten) {
                headers.insert(header::LOCATION, value);
            }
        }
    }

    if headers.contains_key(header::WWW_AUTHENTICATE) {
        let values: Vec<HeaderValue> = headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .map(|value| {
                value
                    .to_str()
                    .ok()
                    .and_then(|text| context.rewrite_www_authenticate(text))
                    .and_then(|text| HeaderValue::from_str(&text).ok())
                    .unwrap_or_else(|| value.clone())
            })
            .collect();
        headers.remove(header::WWW_AUTHENTICATE);
        for value in values {
            headers.append(header::WWW_AUTHENTICATE, value);
        }
    }
}

/// 308 from `/registry` to `/registry/`, keeping the query.
fn redirect_with_slash(uri: &Uri) -> Response<ProxyBody> {
    let location = match uri.query() {
        Some(query) => format!("{}/?{query}", uri.path()),
        None => format!("{}/", uri.path()),
    };
    match HeaderValue::from_str(&location) {
        Ok(value) => Response::builder()
            .status(StatusCode::PERMANENT_REDIRECT)
            .header(header::LOCATION, value)
            .body(ProxyBody::empty())
            .expect("valid redirect response"),
        Err(_) => error_response(StatusCode::BAD_REQUEST, "invalid request target", false),
    }
}

/// 200 with the PEM bundle, for node set-up scripts that fill
/// `/etc/docker/certs.d/<host>/ca.crt`.
fn ca_bundle_response(bundle: Option<&Bytes>) -> Response<ProxyBody> {
    match bundle {
        Some(bundle) => Response::builder()
            .header(header::CONTENT_TYPE, "application/x-pem-file")
            .body(ProxyBody::full(bundle.clone()))
            .expect("static header values are valid"),
        None => error_response(StatusCode::NOT_FOUND, "no CA bundle is configured on this gateway", false),
    }
}

/// Joins the error and its sources into one line for logs.
/// A cause whose text the message already contains is left out, because many errors here
/// print their source in their own message.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn notary_upstream_uri_is_clean() {
        let config = Config::parse(
            Path::new("t.toml"),
            "[listen]\nhttps = \"127.0.0.1:1\"\n[tls]\ncert = \"c\"\nkey = \"k\"\n[upstreams]\nnotary = \"http://notary:4443\"\n",
        )
        .unwrap();
        let gateway = Gateway::new(&config).unwrap();
        let uri: Uri = "/registry/notary//v2/x?a=b".parse().unwrap();
        let route = gateway.routes().find(uri.path()).unwrap();
        let target = &gateway.targets[0];
        let sent = upstream_uri(&uri, route, target).unwrap();
        assert_eq!(sent.to_string(), "http://notary:4443/v2/x?a=b");
    }
}
