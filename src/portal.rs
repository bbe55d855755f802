//! The Harbor portal under `/registry/`.
//!
//! Harbor's portal is a single-page app built to be served at `/`: its `index.html` has
//! `<base href="/">`, and every relative asset (`main.js`, `styles.css`, `i18n/…`,
//! `setting.json`) resolves against that base. Served under `/registry/`, the base must
//! say `/registry/`, so HTML responses of the portal route go through a streaming HTML
//! rewriter. Frames are rewritten as they arrive; the document is never collected.
//!
//! The rewriter needs the HTML uncompressed. The gateway asks the portal for identity
//! encoding on requests that accept HTML (browser navigations), so JavaScript and CSS keep
//! their compression. A compressed HTML response that arrives anyway passes through
//! unchanged, with a warning in the log.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use lol_html::send::{HtmlRewriter, Settings};
use lol_html::{element, MemorySettings};

use crate::body::BoxError;

/// Upper bound on the rewriter's internal buffers. The rewriter only buffers a tag that
/// spans two frames, so a real document stays far below it. Past it the rest of the
/// document passes through unchanged instead of failing.
const MAX_REWRITER_MEMORY: usize = 1 << 20;

/// Asks the portal for an uncompressed body when the request accepts HTML, so that the
/// response can be rewritten. Requests for other assets keep the client's `Accept-Encoding`.
pub fn prepare_request(headers: &mut HeaderMap) {
    if accepts_html(headers) {
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }
}

fn accepts_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| {
            let media = range.split(';').next().unwrap_or("").trim();
            media.eq_ignore_ascii_case("text/html")
        })
}

/// Decides whether a portal response gets its HTML rewritten, and if so removes the
/// headers that the rewrite makes wrong. `Content-Length` goes because the new base is
/// longer than the old one.
pub fn should_rewrite(method: &Method, status: StatusCode, headers: &mut HeaderMap) -> bool {
    if !is_html(headers) || status == StatusCode::PARTIAL_CONTENT {
        // NOTE: a 206 slice of HTML cannot be rewritten on its own, so it passes through;
        // browsers never request the portal's HTML by range.
        return false;
    }
    let encoding = headers.get(header::CONTENT_ENCODING).map(|value| value.as_bytes());
    if !matches!(encoding, None | Some(b"identity")) {
        tracing::warn!(
            content_encoding = ?headers.get(header::CONTENT_ENCODING),
            "the portal sent compressed HTML although the gateway asked for identity encoding; \
             passing it through without rewriting <base href>"
        );
        return false;
    }
    headers.remove(header::CONTENT_LENGTH);
    // A HEAD response or a 304 has no body to rewrite, but its headers must match a GET.
    *method != Method::HEAD && status != StatusCode::NOT_MODIFIED && status != StatusCode::NO_CONTENT
}

fn is_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("text/html"))
}

/// Rewrites a `<base href>` that is an absolute path so that it lies under `prefix`:
/// `/` becomes `/registry/`. Relative or full-URL bases are left alone.
fn prefixed_base(href: &str, prefix: &str) -> Option<String> {
    let is_absolute_path = href.starts_with('/') && !href.starts_with("//");
    let already_prefixed = href == prefix || href.starts_with(&format!("{prefix}/"));
    (is_absolute_path && !already_prefixed).then(|| format!("{prefix}{href}"))
}

/// Output of the rewriter for the frame being processed. The rewriter pushes into it from
/// inside `write`, and `poll_frame` takes it out right after, so it contains about one frame.
type SharedOutput = Arc<Mutex<Vec<u8>>>;

struct SinkToBuffer(SharedOutput);

impl lol_html::OutputSink for SinkToBuffer {
    fn handle_chunk(&mut self, chunk: &[u8]) {
        self.0.lock().expect("rewriter output lock").extend_from_slice(chunk);
    }
}

enum State {
    Rewriting(Box<HtmlRewriter<'static, SinkToBuffer>>),
    /// The rewriter gave up (memory limit); the remaining bytes pass unchanged.
    PassThrough,
    Done,
}

/// A response body whose HTML is rewritten frame by frame, as it streams.
pub struct HtmlRewriteBody<B> {
    inner: B,
    state: State,
    output: SharedOutput,
    /// Trailers that arrived before the rewriter was flushed; sent after the last data.
    trailers: Option<HeaderMap>,
}

impl<B> HtmlRewriteBody<B> {
    /// Wraps `inner`; `prefix` is the public mount point, for example `/registry`.
    pub fn new(inner: B, prefix: &str) -> Self {
        let output = SharedOutput::default();
        let prefix = prefix.to_string();
        let settings = Settings::new_send()
            .append_element_content_handler(element!("base[href]", move |base| {
                let href = base.get_attribute("href").unwrap_or_default();
                if let Some(rewritten) = prefixed_base(&href, &prefix) {
                    base.set_attribute("href", &rewritten)?;
                }
                Ok(())
            }))
            .with_memory_settings(
                MemorySettings::new()
                    .with_max_allowed_memory_usage(MAX_REWRITER_MEMORY)
                    .with_graceful_bail_out_on_memory_limit_exceeded(true),
            );
        let rewriter = HtmlRewriter::new(settings, SinkToBuffer(output.clone()));
        Self {
            inner,
            state: State::Rewriting(Box::new(rewriter)),
            output,
            trailers: None,
        }
    }

    fn take_output(&self) -> Option<Bytes> {
        let mut output = self.output.lock().expect("rewriter output lock");
        (!output.is_empty()).then(|| Bytes::from(std::mem::take(&mut *output)))
    }

    /// Feeds one input frame to the rewriter.
    fn write(&mut self, data: &[u8]) -> Result<(), BoxError> {
        let State::Rewriting(rewriter) = &mut self.state else {
            self.output.lock().expect("rewriter output lock").extend_from_slice(data);
            return Ok(());
        };
        match rewriter.write(data) {
            Ok(()) => Ok(()),
            Err(lol_html::errors::RewritingError::MemoryLimitExceeded(_)) => {
                // The graceful bail-out has flushed every byte received so far.
                tracing::warn!(limit = MAX_REWRITER_MEMORY, "portal HTML rewriter hit its memory limit; passing the rest through");
                self.state = State::PassThrough;
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Flushes what the rewriter still buffers at the end of the input.
    fn finish(&mut self) -> Result<(), BoxError> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Rewriting(rewriter) => rewriter.end().map_err(Into::into),
            State::PassThrough | State::Done => Ok(()),
        }
    }
}

impl<B> Body for HtmlRewriteBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if matches!(this.state, State::Done) {
                if let Some(data) = this.take_output() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }

            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
                Poll::Ready(None) => {
                    this.finish()?;
                    continue;
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    this.write(&data)?;
                    // A tag cut by the frame boundary yields no output yet; read on.
                    if let Some(output) = this.take_output() {
                        return Poll::Ready(Some(Ok(Frame::data(output))));
                    }
                }
                Err(frame) => {
                    this.trailers = frame.into_trailers().ok();
                    this.finish()?;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done) && self.trailers.is_none() && self.output.lock().is_ok_and(|o| o.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    /// Runs `chunks` through the rewriter as separate frames; returns the output frames.
    async fn rewrite(chunks: &[&str]) -> Vec<String> {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            chunks.iter().map(|c| Ok(Frame::data(Bytes::copy_from_slice(c.as_bytes())))).collect();
        let mut body = HtmlRewriteBody::new(StreamBody::new(futures_util::stream::iter(frames)), "/registry");
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            out.push(String::from_utf8(frame.unwrap().into_data().unwrap().to_vec()).unwrap());
        }
        out
    }

    #[tokio::test]
    async fn base_href_is_prefixed() {
        let out = rewrite(&["<!doctype html><html><head><base href=\"/\"><title>Harbor</title></head><body></body></html>"]).await;
        assert_eq!(
            out.concat(),
            "<!doctype html><html><head><base href=\"/registry/\"><title>Harbor</title></head><body></body></html>"
        );
    }

    #[tokio::test]
    async fn tag_split_across_frames() {
        let out = rewrite(&["<html><head><ba", "se hr", "ef=\"/\"></head>", "<body>x</body></html>"]).await;
        assert_eq!(out.concat(), "<html><head><base href=\"/registry/\"></head><body>x</body></html>");
        assert!(out.len() >= 2, "output came in one piece: {out:?}");
    }

    #[tokio::test]
    async fn frames_stream_before_end() {
        // The first frame must come out before the input ends, or the rewriter is buffering.
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
        let stream = futures_util::stream::unfold(receiver, |mut r| async move { r.recv().await.map(|f| (f, r)) });
        let mut body = HtmlRewriteBody::new(StreamBody::new(Box::pin(stream)), "/registry");
        sender.send(Ok(Frame::data(Bytes::from_static(b"<head><base href=\"/\"></head><body>")))).await.unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(String::from_utf8_lossy(&first).contains("/registry/"));
        sender.send(Ok(Frame::data(Bytes::from_static(b"</body>")))).await.unwrap();
        drop(sender);
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(&rest[..], b"</body>");
    }

    #[test]
    fn base_cases() {
        assert_eq!(prefixed_base("/", "/registry").as_deref(), Some("/registry/"));
        assert_eq!(prefixed_base("/app/", "/registry").as_deref(), Some("/registry/app/"));
        assert_eq!(prefixed_base("/registry/", "/registry"), None);
        assert_eq!(prefixed_base("//cdn.example/", "/registry"), None);
        assert_eq!(prefixed_base("https://x/", "/registry"), None);
        assert_eq!(prefixed_base("./", "/registry"), None);
    }

    #[test]
    fn rewrite_decision() {
        let html = |extra: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("120"));
            for (name, value) in extra {
                headers.insert(*name, HeaderValue::from_static(value));
            }
            headers
        };

        let mut headers = html(&[]);
        assert!(should_rewrite(&Method::GET, StatusCode::OK, &mut headers));
        assert!(headers.get(header::CONTENT_LENGTH).is_none());

        let mut headers = html(&[]);
        assert!(!should_rewrite(&Method::HEAD, StatusCode::OK, &mut headers));
        assert!(headers.get(header::CONTENT_LENGTH).is_none(), "HEAD must match GET");

        let mut headers = html(&[("content-encoding", "gzip")]);
        assert!(!should_rewrite(&Method::GET, StatusCode::OK, &mut headers));
        assert_eq!(headers[header::CONTENT_LENGTH], "120");

        let mut headers = html(&[]);
        assert!(!should_rewrite(&Method::GET, StatusCode::PARTIAL_CONTENT, &mut headers));

        let mut headers = html(&[("content-type", "application/javascript")]);
        assert!(!should_rewrite(&Method::GET, StatusCode::OK, &mut headers));
        assert_eq!(headers[header::CONTENT_LENGTH], "120");
    }

    #[test]
    fn identity_only_for_html_requests() {
        let mut navigation = HeaderMap::new();
        navigation.insert(header::ACCEPT, HeaderValue::from_static("text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"));
        navigation.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip, br"));
        prepare_request(&mut navigation);
        assert_eq!(navigation[header::ACCEPT_ENCODING], "identity");

        let mut script = HeaderMap::new();
        script.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        script.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip, br"));
        prepare_request(&mut script);
        assert_eq!(script[header::ACCEPT_ENCODING], "gzip, br");
    }
}
