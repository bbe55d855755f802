//! Prometheus metrics, served in the text format on the admin listener's `/metrics`.
//!
//! The gateway keeps its own [`Registry`] instead of the process-global default, so tests
//! and embedders can run several gateways in one process. Labels are bounded: route names
//! come from the route table, methods outside a fixed list become `other`, and nothing
//! client-controlled (repository, digest, path, address) ever becomes a label value.
//!
//! The request path never formats a label: [`RouteMetrics`] and [`UpstreamMetrics`] hold
//! handles resolved once per route and upstream when the gateway is built.

use std::sync::{Arc, OnceLock};

use http::{Method, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Request duration buckets, in seconds: from a 1 ms manifest HEAD to a 20-minute layer
/// push, roughly 2.5x apart.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1200.0,
];

/// Methods that get their own label value; the rest are counted as `other`.
const METHOD_LABELS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"];
const STATUS_CLASS_LABELS: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// Values of the `reason` label: the causes of failed TLS handshakes with clients.
pub const HANDSHAKE_FAILURE_REASONS: [&str; 7] = [
    "timeout",
    "connection_closed",
    "certificate_rejected",
    "alert",
    "incompatible",
    "protocol_error",
    "other",
];

/// The route label of requests that match no route (a request target that is not a path).
pub const NO_ROUTE: &str = "none";

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: IntCounterVec,
    response_bytes: IntCounterVec,
    in_flight: IntGaugeVec,
    connections: IntGaugeVec,
    upstream_failures: IntCounterVec,
    handshake_failures: IntCounterVec,
    certificate_expiry: IntGauge,
    reloads: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("harbor_gateway_requests_total", "Requests by route, method and status class, counted when the response body ends or is dropped."),
            &["route", "method", "status_class"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "harbor_gateway_request_duration_seconds",
                "Time from the request head arriving to the response body ending or being dropped.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route", "method"],
        )
        .expect("valid metric");
        let request_bytes = IntCounterVec::new(
            Opts::new("harbor_gateway_request_body_bytes_total", "Request body bytes received from clients."),
            &["route"],
        )
        .expect("valid metric");
        let response_bytes = IntCounterVec::new(
            Opts::new("harbor_gateway_response_body_bytes_total", "Response body bytes sent to clients."),
            &["route"],
        )
        .expect("valid metric");
        let in_flight = IntGaugeVec::new(
            Opts::new("harbor_gateway_requests_in_flight", "Requests whose response body has not yet ended."),
            &["route"],
        )
        .expect("valid metric");
        let connections = IntGaugeVec::new(
            Opts::new("harbor_gateway_open_connections", "Open client connections after the TLS handshake, by HTTP protocol."),
            &["protocol"],
        )
        .expect("valid metric");
        let upstream_failures = IntCounterVec::new(
            Opts::new(
                "harbor_gateway_upstream_failures_total",
                "Failed upstream exchanges: kind is connect (no connection), timeout (no data within the idle timeout) or reset (connection closed or broken mid-exchange).",
            ),
            &["upstream", "kind"],
        )
        .expect("valid metric");
        let handshake_failures = IntCounterVec::new(
            Opts::new("harbor_gateway_tls_handshake_failures_total", "Failed TLS handshakes with clients, by reason."),
            &["reason"],
        )
        .expect("valid metric");
        let certificate_expiry = IntGauge::new(
            "harbor_gateway_certificate_expiry_timestamp_seconds",
            "notAfter of the served leaf certificate, in seconds since the Unix epoch.",
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new("harbor_gateway_reloads_total", "Reloads of the configuration and certificate, by result (success or failure)."),
            &["result"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("harbor_gateway_build_info", "Always 1; the labels describe the running build."),
            &["version"],
        )
        .expect("valid metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        for reason in HANDSHAKE_FAILURE_REASONS {
            handshake_failures.with_label_values(&[reason]);
        }
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        for protocol in ["h1", "h2"] {
            connections.with_label_values(&[protocol]);
        }

        let collectors: [Box<dyn prometheus::core::Collector>; 11] = [
            Box::new(requests.clone()),
            Box::new(duration.clone()),
            Box::new(request_bytes.clone()),
            Box::new(response_bytes.clone()),
            Box::new(in_flight.clone()),
            Box::new(connections.clone()),
            Box::new(upstream_failures.clone()),
            Box::new(handshake_failures.clone()),
            Box::new(certificate_expiry.clone()),
            Box::new(reloads.clone()),
            Box::new(build_info),
        ];
        for collector in collectors {
            registry.register(collector).expect("metric names are unique");
        }

        Metrics {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            in_flight,
            connections,
            upstream_failures,
            handshake_failures,
            certificate_expiry,
            reloads,
        }
    }

    /// Resolves the handles of one route. Calling it again for the same name returns
    /// handles to the same series, so a reload keeps the counts.
    pub fn route(self: &Arc<Self>, name: &str) -> RouteMetrics {
        RouteMetrics {
            metrics: self.clone(),
            name: name.into(),
            in_flight: self.in_flight.with_label_values(&[name]),
            request_bytes: self.request_bytes.with_label_values(&[name]),
            response_bytes: self.response_bytes.with_label_values(&[name]),
            requests: Default::default(),
            durations: Default::default(),
        }
    }

    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            name: name.into(),
            connect: self.upstream_failures.with_label_values(&[name, "connect"]),
            timeout: self.upstream_failures.with_label_values(&[name, "timeout"]),
            reset: self.upstream_failures.with_label_values(&[name, "reset"]),
        }
    }

    /// Counts an open connection until the returned guard drops.
    pub fn connection_opened(&self, protocol: &str) -> ConnectionGuard {
        let gauge = self.connections.with_label_values(&[protocol]);
        gauge.inc();
        ConnectionGuard(gauge)
    }

    /// `reason` is one of [`HANDSHAKE_FAILURE_REASONS`].
    pub fn handshake_failed(&self, reason: &str) {
        self.handshake_failures.with_label_values(&[reason]).inc();
    }

    pub fn set_certificate_expiry(&self, not_after: i64) {
        self.certificate_expiry.set(not_after);
    }

    pub fn reload_finished(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.reloads.with_label_values(&[result]).inc();
    }

    /// Encodes every metric in the Prometheus text exposition format.
    pub fn encode_text(&self) -> Vec<u8> {
        let mut buffer = Vec::with_capacity(16 << 10);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("the text encoder writes to memory");
        buffer
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The content type of [`Metrics::encode_text`].
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Handles for one route. Series by method and status class are created on first use,
/// so routes and methods that see no traffic add no lines to a scrape.
pub struct RouteMetrics {
    metrics: Arc<Metrics>,
    name: Box<str>,
    pub in_flight: IntGauge,
    pub request_bytes: IntCounter,
    pub response_bytes: IntCounter,
    requests: [[OnceLock<IntCounter>; STATUS_CLASS_LABELS.len()]; METHOD_LABELS.len()],
    durations: [OnceLock<Histogram>; METHOD_LABELS.len()],
}

impl RouteMetrics {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts one finished request and its duration in seconds.
    pub fn request_finished(&self, method: &Method, status: StatusCode, seconds: f64) {
        let method = method_index(method);
        let class = status_class_index(status);
        self.requests[method][class]
            .get_or_init(|| {
                self.metrics
                    .requests
                    .with_label_values(&[&self.name, METHOD_LABELS[method], STATUS_CLASS_LABELS[class]])
            })
            .inc();
        self.durations[method]
            .get_or_init(|| self.metrics.duration.with_label_values(&[&self.name, METHOD_LABELS[method]]))
            .observe(seconds);
    }
}

/// Failure counters of one upstream.
pub struct UpstreamMetrics {
    name: Box<str>,
    pub connect: IntCounter,
    pub timeout: IntCounter,
    pub reset: IntCounter,
}

impl UpstreamMetrics {
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Decrements the open-connection gauge when the connection ends.
pub struct ConnectionGuard(IntGauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::PATCH => 4,
        Method::DELETE => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

fn status_class_index(status: StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        500..=599 => 4,
        _ => 5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(metrics: &Metrics) -> String {
        String::from_utf8(metrics.encode_text()).unwrap()
    }

    #[test]
    fn request_counts_by_route_method_and_class() {
        let metrics = Arc::new(Metrics::new());
        let route = metrics.route("registry");
        route.request_finished(&Method::GET, StatusCode::OK, 0.002);
        route.request_finished(&Method::GET, StatusCode::NO_CONTENT, 0.002);
        route.request_finished(&Method::from_bytes(b"PROPFIND").unwrap(), StatusCode::NOT_FOUND, 0.5);
        route.request_bytes.inc_by(10);

        let text = scrape(&metrics);
        assert!(text.contains(r#"harbor_gateway_requests_total{method="GET",route="registry",status_class="2xx"} 2"#), "{text}");
        assert!(text.contains(r#"harbor_gateway_requests_total{method="other",route="registry",status_class="4xx"} 1"#), "{text}");
        assert!(text.contains(r#"harbor_gateway_request_duration_seconds_bucket{method="GET",route="registry",le="0.0025"} 2"#), "{text}");
        assert!(text.contains(r#"harbor_gateway_request_body_bytes_total{route="registry"} 10"#), "{text}");
        assert!(text.contains(r#"harbor_gateway_build_info{version=""#), "{text}");
    }

    #[test]
    fn route_handles_survive_a_rebuild() {
        let metrics = Arc::new(Metrics::new());
        metrics.route("token").response_bytes.inc_by(5);
        metrics.route("token").response_bytes.inc_by(7);
        assert!(scrape(&metrics).contains(r#"harbor_gateway_response_body_bytes_total{route="token"} 12"#));
    }

    #[test]
    fn connection_guard_decrements() {
        let metrics = Metrics::new();
        let guard = metrics.connection_opened("h2");
        assert!(scrape(&metrics).contains(r#"harbor_gateway_open_connections{protocol="h2"} 1"#));
        drop(guard);
        assert!(scrape(&metrics).contains(r#"harbor_gateway_open_connections{protocol="h2"} 0"#));
    }
}
