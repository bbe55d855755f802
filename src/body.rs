//! Body types on the proxy path. Frames pass through as the peer sends them; nothing here
//! collects a body.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::portal::HtmlRewriteBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// No frame arrived from the peer for the idle period.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?}")]
pub struct IdleTimeoutError(pub Duration);

/// Wraps a body and fails it when no frame arrives for `idle`. The clock runs only while
/// the body is polled and has nothing, so a slow reader on the other side never trips it.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    /// The deadline counts from the first `Pending` after the last frame, not from the
    /// frame itself, so time spent waiting for the reader is not counted.
    armed: bool,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            armed: false,
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if !this.armed {
                    this.deadline.as_mut().reset(Instant::now() + this.idle);
                    this.armed = true;
                }
                ready!(this.deadline.as_mut().poll(cx));
                Poll::Ready(Some(Err(IdleTimeoutError(this.idle).into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body sent downstream: an upstream's streamed body or a small body that the
/// gateway made itself.
pub enum ProxyBody {
    Streaming(IdleTimeout<hyper::body::Incoming>),
    /// A portal HTML page, rewritten as it streams.
    Html(HtmlRewriteBody<IdleTimeout<hyper::body::Incoming>>),
    Full(Option<Bytes>),
}

impl ProxyBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(data.into()))
    }

    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Streaming(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Html(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Streaming(body) => body.is_end_stream(),
            ProxyBody::Html(body) => body.is_end_stream(),
            ProxyBody::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Streaming(body) => body.size_hint(),
            ProxyBody::Html(body) => body.size_hint(),
            ProxyBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
