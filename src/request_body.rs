//! The client's request body on its way upstream, and what the proxy learns from it.
//!
//! Two things on the request path depend on the body:
//! - The wait for the upstream's response headers is an idle timeout that counts from the
//!   last request-body frame, so a multi-gigabyte layer push that keeps moving is never cut,
//!   however long it takes in total.
//! - When the upstream request fails because the *client's* body failed (it stalled past
//!   the idle timeout, was malformed, or the client went away), the fault is the client's:
//!   408 or 400, not 502.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::{BoxError, IdleTimeout, IdleTimeoutError};
use crate::telemetry::CountedBody;

const NO_FAILURE: u8 = 0;
const FAILED_IDLE: u8 = 1;
const FAILED_INVALID: u8 = 2;

/// The way the client's request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFailure {
    /// No frame for the idle period.
    Idle,
    /// Malformed framing (a bad chunk size) or the client closed the connection.
    Invalid,
}

/// Progress of one request body, shared between the body and the proxy that waits for
/// the upstream's response.
#[derive(Debug)]
pub struct BodyProgress {
    start: Instant,
    /// Milliseconds since `start` when the body last made progress.
    last_activity_ms: AtomicU64,
    /// The body is polled and waiting for the client, so its own idle timer is running.
    waiting_on_client: AtomicBool,
    failure: AtomicU8,
}

impl BodyProgress {
    pub fn new() -> Arc<BodyProgress> {
        Arc::new(BodyProgress {
            start: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            waiting_on_client: AtomicBool::new(false),
            failure: AtomicU8::new(NO_FAILURE),
        })
    }

    fn touch(&self) {
        let elapsed = self.start.elapsed().as_millis() as u64;
        self.last_activity_ms.fetch_max(elapsed, Ordering::Relaxed);
    }

    /// When the body last made progress: a frame, its end, or the request's start.
    pub fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }

    /// Returns whether the upstream is reading the body while the client sends nothing.
    /// Then the body's idle timer, not the response timeout, ends the request, so that a
    /// stalled client gets 408 rather than 504.
    pub fn waiting_on_client(&self) -> bool {
        self.waiting_on_client.load(Ordering::Relaxed)
    }

    pub fn failure(&self) -> Option<BodyFailure> {
        match self.failure.load(Ordering::Relaxed) {
            FAILED_IDLE => Some(BodyFailure::Idle),
            FAILED_INVALID => Some(BodyFailure::Invalid),
            _ => None,
        }
    }

    fn fail(&self, error: &BoxError) {
        let kind = if error.is::<IdleTimeoutError>() { FAILED_IDLE } else { FAILED_INVALID };
        let _ = self.failure.compare_exchange(NO_FAILURE, kind, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// The request body sent upstream: the client's frames, under the idle timeout, reporting
/// progress and failure to a [`BodyProgress`].
pub struct ClientBody {
    inner: IdleTimeout<CountedBody<Incoming>>,
    /// A frame read before the upstream request started; sent first.
    first: Option<Frame<Bytes>>,
    ended: bool,
    progress: Arc<BodyProgress>,
}

impl ClientBody {
    /// Wraps the body without reading from it.
    pub fn new(body: CountedBody<Incoming>, idle: Duration, progress: Arc<BodyProgress>) -> ClientBody {
        ClientBody {
            ended: body.is_end_stream(),
            inner: IdleTimeout::new(body, idle),
            first: None,
            progress,
        }
    }

    /// Wraps the body and reads its first frame, so that a body that is malformed from its
    /// first byte (an invalid chunk size) or a client that never sends it fails here,
    /// before anything reaches an upstream. Bodies that are empty by their framing are not
    /// waited for.
    pub async fn read_first_frame(
        body: CountedBody<Incoming>,
        idle: Duration,
        progress: Arc<BodyProgress>,
    ) -> Result<ClientBody, BoxError> {
        let mut body = ClientBody::new(body, idle, progress);
        if body.ended {
            return Ok(body);
        }
        match body.inner.frame().await {
            Some(Ok(frame)) => body.first = Some(frame),
            Some(Err(error)) => {
                body.progress.fail(&error);
                return Err(error);
            }
            None => body.ended = true,
        }
        body.progress.touch();
        Ok(body)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(frame) = this.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        this.progress.waiting_on_client.store(polled.is_pending(), Ordering::Relaxed);
        match &polled {
            Poll::Ready(Some(Ok(_))) => this.progress.touch(),
            Poll::Ready(Some(Err(error))) => this.progress.fail(error),
            Poll::Ready(None) => {
                this.ended = true;
                this.progress.touch();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.inner.size_hint();
        let Some(data) = self.first.as_ref().and_then(Frame::data_ref) else {
            return rest;
        };
        // The inner hint covers only what is left after the frame held in `first`.
        let extra = data.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + extra);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + extra);
        }
        hint
    }
}
