//! Keep-alive idle tracking for client connections: a connection with no request in flight
//! for the keep-alive period is asked to close gracefully.
//!
//! A request counts as in flight from the moment the service gets it until its response
//! body has been sent or dropped, so a long blob download or a slow upload never looks idle.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::watch;

/// The number of requests in flight on one connection.
#[derive(Clone)]
pub struct InFlight {
    count: watch::Sender<usize>,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight { count: watch::Sender::new(0) }
    }
}

impl InFlight {
    /// Counts a request until the returned guard drops.
    pub fn start(&self) -> RequestGuard {
        self.count.send_modify(|count| *count += 1);
        RequestGuard { count: self.count.clone() }
    }

    /// Resolves as soon as no request is in flight.
    pub async fn none(&self) {
        let mut count = self.count.subscribe();
        // The sender lives in `self`, so the wait ends only by a change.
        let _ = count.wait_for(|n| *n == 0).await;
    }

    /// Resolves once no request has been in flight for `period`.
    pub async fn idle_for(&self, period: Duration) {
        let mut count = self.count.subscribe();
        loop {
            // The sender lives in `self`, so these waits end only by a change, never by a
            // closed channel.
            let _ = count.wait_for(|n| *n == 0).await;
            tokio::select! {
                _ = tokio::time::sleep(period) => return,
                _ = count.changed() => continue,
            }
        }
    }
}

/// Marks one request as in flight while it lives.
pub struct RequestGuard {
    count: watch::Sender<usize>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.count.send_modify(|count| *count -= 1);
    }
}

/// A response body that keeps its request's [`RequestGuard`] until it ends or drops.
pub struct Tracked<B> {
    inner: B,
    guard: Option<RequestGuard>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, guard: RequestGuard) -> Self {
        Tracked { inner, guard: Some(guard) }
    }
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = polled {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_requests_to_end() {
        let in_flight = InFlight::default();
        let guard = in_flight.start();
        let idle = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.idle_for(Duration::from_millis(300)).await }
        });

        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!idle.is_finished(), "a request in flight must keep the connection busy");

        drop(guard);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!idle.is_finished(), "idle for 100 ms of 300 ms");
        tokio::time::timeout(Duration::from_secs(2), idle)
            .await
            .expect("idle after the last request ended")
            .unwrap();
    }
}
