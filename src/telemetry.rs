//! Request observation: metrics and the access log for each request, from the moment its
//! head arrives until its response body ends or is dropped.
//!
//! A blob pull is still running long after the response head went out, so an [`Exchange`]
//! travels with the response inside [`ObservedBody`] and finishes only when the body does.
//! Finishing decrements the in-flight gauge, records the duration and status, and writes
//! one event with target `access`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::body::{BoxError, IdleTimeoutError, ProxyBody};
use crate::error::ProxyError;
use crate::metrics::{RouteMetrics, UpstreamMetrics};
use crate::redact::LoggedTarget;

/// Status recorded for a request whose client went away before a response existed;
/// nginx logs the same case as 499.
const CLIENT_CLOSED: u16 = 499;

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);
static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// Returns a process-unique id for log lines about one client connection.
pub fn next_connection_id() -> u64 {
    NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed)
}

/// One client connection after its TLS handshake.
#[derive(Debug)]
pub struct ConnectionInfo {
    pub id: u64,
    pub peer: SocketAddr,
    /// `TLSv1.3` or `TLSv1.2`.
    pub tls_version: &'static str,
    /// The connection's span. Request tasks that hyper spawns for HTTP/2 streams do not
    /// inherit it, so request events enter it explicitly.
    pub span: tracing::Span,
    /// WebSocket and other upgraded tunnels opened on this connection.
    pub tunnels: crate::tunnels::Tunnels,
}

/// Outcome of a request, as the access log's `outcome` field reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The whole response went out.
    Complete,
    /// The client closed the connection or reset the stream first.
    ClientClosed,
    /// The upstream's response body failed midway.
    UpstreamFailed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ClientClosed => "client_closed",
            Outcome::UpstreamFailed => "upstream_failed",
        }
    }
}

/// The kind label of `harbor_gateway_upstream_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    Connect,
    Timeout,
    Reset,
}

/// Classifies a request error for the upstream failure counters; `None` when the
/// upstream is not at fault.
pub fn upstream_failure(error: &ProxyError) -> Option<UpstreamFailure> {
    match error {
        ProxyError::BadRequest(_)
        | ProxyError::UriTooLong { .. }
        | ProxyError::HeadersTooLarge { .. }
        | ProxyError::ClientBody { .. }
        | ProxyError::ClientBodyTimeout { .. }
        | ProxyError::RouteStatus { .. }
        | ProxyError::RegistryDisabled
        | ProxyError::NotImplemented(_) => None,
        ProxyError::UpstreamConnect { .. } => Some(UpstreamFailure::Connect),
        ProxyError::UpstreamTimeout { .. } => Some(UpstreamFailure::Timeout),
        ProxyError::UpstreamRequest { source, .. } if caused_by_request_body(source.as_ref()) => None,
        ProxyError::UpstreamRequest { .. } => Some(UpstreamFailure::Reset),
    }
}

/// Returns whether the client's request body broke the exchange. A stalled upload, or a
/// client that resets its stream midway, surfaces as a failed upstream request too.
fn caused_by_request_body(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<IdleTimeoutError>() {
            return true;
        }
        if error.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_user) {
            return true;
        }
        cause = error.source();
    }
    false
}

/// One request in progress. Dropping it before [`Exchange::respond`] means the client went
/// away while the gateway waited for the upstream.
pub struct Exchange {
    state: Option<ExchangeState>,
}

struct ExchangeState {
    id: u64,
    started: Instant,
    route: Arc<RouteMetrics>,
    upstream: Option<Arc<UpstreamMetrics>>,
    connection: Arc<ConnectionInfo>,
    method: Method,
    uri: Uri,
    version: Version,
    status: StatusCode,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
}

impl Exchange {
    /// Starts observing `request`; it counts as in flight from now on.
    pub fn start<B>(route: Arc<RouteMetrics>, request: &Request<B>, connection: Arc<ConnectionInfo>) -> Exchange {
        route.in_flight.inc();
        Exchange {
            state: Some(ExchangeState {
                id: NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed),
                started: Instant::now(),
                route,
                upstream: None,
                connection,
                method: request.method().clone(),
                uri: request.uri().clone(),
                version: request.version(),
                status: StatusCode::from_u16(CLIENT_CLOSED).expect("valid status"),
                request_bytes: Arc::new(AtomicU64::new(0)),
                response_bytes: 0,
            }),
        }
    }

    fn state(&self) -> &ExchangeState {
        self.state.as_ref().expect("an exchange is finished only by drop or respond")
    }

    /// Returns the process-unique request id that log lines about this request carry.
    pub fn id(&self) -> u64 {
        self.state().id
    }

    pub fn set_upstream(&mut self, upstream: Arc<UpstreamMetrics>) {
        if let Some(state) = self.state.as_mut() {
            state.upstream = Some(upstream);
        }
    }

    pub fn upstream_failed(&self, failure: UpstreamFailure) {
        if let Some(upstream) = &self.state().upstream {
            upstream.count(failure);
        }
    }

    /// Logs a request that failed before a response existed: at error level when the
    /// gateway or an upstream is at fault (5xx), at debug level when the client is.
    pub fn log_failure(&self, error: &ProxyError) {
        let state = self.state();
        let status = error.status();
        let upstream = state.upstream.as_ref().map_or("-", |upstream| upstream.name());
        let _entered = state.connection.span.enter();
        if status.is_server_error() {
            tracing::error!(
                request_id = state.id,
                method = %state.method,
                path = %LoggedTarget(&state.uri),
                route = state.route.name(),
                upstream,
                status = status.as_u16(),
                error = %crate::proxy::error_chain(error),
                "request failed"
            );
        } else {
            tracing::debug!(
                request_id = state.id,
                method = %state.method,
                path = %LoggedTarget(&state.uri),
                route = state.route.name(),
                status = status.as_u16(),
                error = %error,
                "request rejected"
            );
        }
    }

    /// Wraps the request body so that its bytes are counted as they go upstream.
    pub fn count_request_body<B>(&self, body: B) -> CountedBody<B> {
        let state = self.state();
        CountedBody {
            inner: body,
            total: state.request_bytes.clone(),
            counter: state.route.request_bytes.clone(),
        }
    }

    /// Hands the exchange over to the response body, which finishes it when it ends.
    pub fn respond(mut self, response: Response<ProxyBody>) -> Response<ObservedBody> {
        let mut state = self.state.take().expect("respond is called once");
        state.status = response.status();
        response.map(|inner| ObservedBody { inner, state: Some(state) })
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            state.finish(Outcome::ClientClosed);
        }
    }
}

impl UpstreamMetrics {
    fn count(&self, failure: UpstreamFailure) {
        match failure {
            UpstreamFailure::Connect => self.connect.inc(),
            UpstreamFailure::Timeout => self.timeout.inc(),
            UpstreamFailure::Reset => self.reset.inc(),
        }
    }
}

impl ExchangeState {
    fn finish(self, outcome: Outcome) {
        let elapsed = self.started.elapsed();
        self.route.in_flight.dec();
        self.route
            .request_finished(&self.method, self.status, elapsed.as_secs_f64());

        let _entered = self.connection.span.enter();
        tracing::info!(
            target: crate::log_buffer::ACCESS_TARGET,
            request_id = self.id,
            client_addr = %self.connection.peer,
            method = %self.method,
            path = %LoggedTarget(&self.uri),
            route = self.route.name(),
            upstream = self.upstream.as_ref().map_or("-", |upstream| upstream.name()),
            status = self.status.as_u16(),
            request_bytes = self.request_bytes.load(Ordering::Relaxed),
            response_bytes = self.response_bytes,
            duration_ms = elapsed.as_micros() as f64 / 1000.0,
            protocol = ?self.version,
            tls = self.connection.tls_version,
            outcome = outcome.as_str(),
        );
    }

    /// Returns whether the response has no body, so that hyper may drop it unread.
    fn bodiless(&self) -> bool {
        self.method == Method::HEAD
            || self.status.is_informational()
            || self.status == StatusCode::NO_CONTENT
            || self.status == StatusCode::NOT_MODIFIED
    }
}

/// The response body sent downstream, counting bytes and finishing the request's
/// [`Exchange`] when it ends, fails or is dropped.
pub struct ObservedBody {
    inner: ProxyBody,
    state: Option<ExchangeState>,
}

impl ObservedBody {
    fn finish(&mut self, outcome: Outcome) {
        if let Some(state) = self.state.take() {
            state.finish(outcome);
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let (Some(data), Some(state)) = (frame.data_ref(), this.state.as_mut()) {
                    let length = data.len() as u64;
                    state.response_bytes += length;
                    state.route.response_bytes.inc_by(length);
                }
            }
            Some(Err(error)) => {
                if let Some(state) = &this.state {
                    let failure = if error.is::<IdleTimeoutError>() {
                        UpstreamFailure::Timeout
                    } else {
                        UpstreamFailure::Reset
                    };
                    if let Some(upstream) = &state.upstream {
                        upstream.count(failure);
                    }
                    let _entered = state.connection.span.enter();
                    tracing::error!(
                        request_id = state.id,
                        route = state.route.name(),
                        upstream = state.upstream.as_ref().map_or("-", |upstream| upstream.name()),
                        sent_bytes = state.response_bytes,
                        error = %crate::proxy::error_chain(error.as_ref()),
                        "response body from the upstream failed; the client gets a truncated response"
                    );
                }
                this.finish(Outcome::UpstreamFailed);
            }
            None => this.finish(Outcome::Complete),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream() || self.state.as_ref().is_some_and(ExchangeState::bodiless);
        self.finish(if complete { Outcome::Complete } else { Outcome::ClientClosed });
    }
}

/// A request body that counts its bytes into the route's counter and the exchange's total.
pub struct CountedBody<B> {
    inner: B,
    total: Arc<AtomicU64>,
    counter: prometheus::IntCounter,
}

impl<B> Body for CountedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(data) = polled.as_ref().and_then(|frame| frame.as_ref().ok()).and_then(Frame::data_ref) {
            let length = data.len() as u64;
            this.total.fetch_add(length, Ordering::Relaxed);
            this.counter.inc_by(length);
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
