//! Strict HTTP/1.1 message framing on the downstream side.
//!
//! hyper's request parser is lenient where RFC 9112 allows it: it reads a request with both
//! `Content-Length` and `Transfer-Encoding` by the latter, takes a repeated identical
//! `Content-Length` as one, and accepts a bare LF as a line end. The gateway re-frames every
//! request it forwards, so none of these can smuggle a request past it, but a parser in
//! front of the gateway (a load balancer, a WAF) may read such a request differently. The
//! gateway therefore rejects them.
//!
//! [`FramingGuard`] sits between the TLS stream and hyper. It follows message boundaries
//! in the bytes the client sends and buffers each request head until the head is
//! complete. A head that breaks a rule never reaches hyper. Instead the guard hands hyper a
//! short stand-in request that carries [`REJECTED_HEADER`] and `Connection: close`, and the
//! handler finds it with [`rejected`] and responds 400 before anything else. The guard then
//! reads nothing more from the client. Inside a chunked body the request is already on its
//! way, so the guard leaves bad chunk lines to hyper's decoder, which fails the body.
//!
//! After an upgrade request, the guard reads nothing more until the response status is
//! written. After `101 Switching Protocols` (or 2xx to CONNECT) the bytes that follow are
//! tunnel data and pass unchecked. After any other status they are the next request.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use http::Request;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The header of the stand-in request that replaces a rejected head. A client that sends
/// it itself gets the same 400.
pub const REJECTED_HEADER: &str = "x-harbor-gateway-rejected-framing";

/// Maximum length of a request line or header line kept for inspection. Longer lines are
/// still tracked, and hyper's own limits reject them.
const MAX_LINE: usize = 16 << 10;
/// Maximum length of a chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 << 10;
/// Maximum length of a request target copied into the stand-in request.
const MAX_TARGET: usize = 8 << 10;
/// Bytes read at a time while a request head is incomplete.
const HEAD_READ: usize = 8 << 10;

/// A framing rule that a request broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    BothLengths,
    RepeatedLength,
    InvalidLength,
    UnsupportedCoding,
    BareLf,
    UpgradeWithBody,
    InvalidChunk,
}

const VIOLATIONS: [Violation; 7] = [
    Violation::BothLengths,
    Violation::RepeatedLength,
    Violation::InvalidLength,
    Violation::UnsupportedCoding,
    Violation::BareLf,
    Violation::UpgradeWithBody,
    Violation::InvalidChunk,
];

impl Violation {
    fn code(self) -> &'static str {
        match self {
            Violation::BothLengths => "both-lengths",
            Violation::RepeatedLength => "repeated-length",
            Violation::InvalidLength => "invalid-length",
            Violation::UnsupportedCoding => "unsupported-coding",
            Violation::BareLf => "bare-lf",
            Violation::UpgradeWithBody => "upgrade-with-body",
            Violation::InvalidChunk => "invalid-chunk",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Violation::BothLengths => "the request has both Content-Length and Transfer-Encoding",
            Violation::RepeatedLength => "the request has more than one Content-Length",
            Violation::InvalidLength => "the Content-Length is not a decimal number",
            Violation::UnsupportedCoding => "the request's Transfer-Encoding does not end with chunked, or is on HTTP/1.0",
            Violation::BareLf => "a line of the request ends with LF alone instead of CRLF",
            Violation::UpgradeWithBody => "a request that asks for an upgrade cannot have a body",
            Violation::InvalidChunk => "the chunked request body has an invalid chunk line",
        }
    }
}

/// Returns the broken rule if `request` is the stand-in for a rejected head, or if a
/// client sent the stand-in's header itself.
pub fn rejected<B>(request: &Request<B>) -> Option<&'static str> {
    let value = request.headers().get(REJECTED_HEADER)?;
    let found = VIOLATIONS.iter().find(|v| v.code().as_bytes() == value.as_bytes());
    Some(found.map_or("the request framing was rejected", |v| v.message()))
}

/// Result of one [`Tracker::feed`] call.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// Every byte was consumed.
    Consumed,
    /// A request head starts at the current position; nothing was consumed for it.
    HeadStart,
    /// A request head ended at the current position.
    HeadEnd(Result<(), Violation>),
    /// The bytes at the current position belong to a request body and break a rule.
    BodyError(Violation),
    /// An upgrade waits for its response; bytes from the current position must wait.
    Hold,
}

/// Position in the client's byte stream.
#[derive(Debug)]
enum State {
    Head(Head),
    Body(u64),
    Chunked(Chunk),
    AwaitingUpgrade { connect: bool },
    Passthrough,
}

/// Facts gathered from the request head being read.
#[derive(Debug, Default)]
struct Head {
    started: bool,
    request_line: Option<RequestLine>,
    lengths: u32,
    length: Option<u64>,
    invalid_length: bool,
    codings: u32,
    chunked_last: bool,
    upgrade: bool,
    connection_upgrade: bool,
    bare_lf: bool,
}

#[derive(Debug, Default)]
struct RequestLine {
    connect: bool,
    http10: bool,
    h2_preface: bool,
}

#[derive(Debug)]
enum Chunk {
    Size(Vec<u8>),
    Data(u64),
    DataCr,
    DataLf,
    Trailer(Vec<u8>),
}

/// Follows HTTP/1.1 message boundaries in the bytes a client sends.
#[derive(Debug)]
struct Tracker {
    state: State,
    /// The start of a head line that the previous read cut off; its capacity is reused.
    line: Vec<u8>,
    last_byte: u8,
}

impl Tracker {
    fn new(passthrough: bool) -> Tracker {
        let state = if passthrough { State::Passthrough } else { State::Head(Head::default()) };
        Tracker { state, line: Vec::new(), last_byte: 0 }
    }

    fn is_passthrough(&self) -> bool {
        matches!(self.state, State::Passthrough)
    }

    fn awaiting_upgrade(&self) -> bool {
        matches!(self.state, State::AwaitingUpgrade { .. })
    }

    /// Consumes bytes from the front of `data` until an event; returns how many.
    fn feed(&mut self, data: &[u8]) -> (usize, Event) {
        match &mut self.state {
            State::Passthrough => (data.len(), Event::Consumed),
            State::AwaitingUpgrade { .. } if data.is_empty() => (0, Event::Consumed),
            State::AwaitingUpgrade { .. } => (0, Event::Hold),
            State::Body(remaining) => {
                let take = usize::try_from(*remaining).map_or(data.len(), |r| r.min(data.len()));
                *remaining -= take as u64;
                if *remaining == 0 {
                    self.state = State::Head(Head::default());
                }
                (take, Event::Consumed)
            }
            State::Head(head) if !head.started && !data.is_empty() => {
                head.started = true;
                self.last_byte = 0;
                (0, Event::HeadStart)
            }
            State::Head(_) => self.feed_head(data),
            State::Chunked(_) => self.feed_chunked(data),
        }
    }

    fn feed_head(&mut self, data: &[u8]) -> (usize, Event) {
        let State::Head(head) = &mut self.state else { unreachable!("called in the head state") };
        let partial = &mut self.line;
        let mut used = 0;
        while let Some(offset) = memchr::memchr(b'\n', &data[used..]) {
            let end = used + offset;
            let previous = if end > used { data[end - 1] } else { self.last_byte };
            // A line that lies within `data` is read in place; only a line cut by the end
            // of a read is copied.
            let mut line = if partial.is_empty() {
                &data[used..end]
            } else {
                let room = MAX_LINE.saturating_sub(partial.len());
                partial.extend_from_slice(&data[used..end.min(used + room)]);
                &partial[..]
            };
            self.last_byte = b'\n';
            used = end + 1;
            if previous != b'\r' {
                head.bare_lf = true;
            } else if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            let ends_head = head.take_line(line);
            partial.clear();
            if ends_head {
                let head = std::mem::take(head);
                let verdict = self.finish_head(head);
                return (used, Event::HeadEnd(verdict));
            }
        }
        let room = MAX_LINE.saturating_sub(partial.len());
        partial.extend_from_slice(&data[used..data.len().min(used + room)]);
        if let Some(&last) = data.last() {
            self.last_byte = last;
        }
        (data.len(), Event::Consumed)
    }

    /// Decides what follows a complete head.
    fn finish_head(&mut self, head: Head) -> Result<(), Violation> {
        let line = head.request_line.unwrap_or_default();
        if line.h2_preface {
            self.state = State::Passthrough;
            return Ok(());
        }

        self.state = State::Head(Head::default());
        if head.bare_lf {
            return Err(Violation::BareLf);
        }
        if head.codings > 0 && head.lengths > 0 {
            return Err(Violation::BothLengths);
        }
        if head.lengths > 1 {
            return Err(Violation::RepeatedLength);
        }
        if head.invalid_length {
            return Err(Violation::InvalidLength);
        }
        if head.codings > 0 && (line.http10 || !head.chunked_last) {
            return Err(Violation::UnsupportedCoding);
        }

        let has_body = head.codings > 0 || head.length.unwrap_or(0) > 0;
        let connect = line.connect;
        // `Upgrade` counts only when `Connection` names it (RFC 9110 §7.8); the gateway
        // forwards any other `Upgrade` as an ordinary request, body and all. Without a
        // body, any `Upgrade` waits for the status, which is safe either way.
        let asks_upgrade = connect || (head.upgrade && head.connection_upgrade);
        if asks_upgrade && has_body {
            return Err(Violation::UpgradeWithBody);
        }
        if (head.upgrade || connect) && !has_body {
            self.state = State::AwaitingUpgrade { connect };
        } else if head.codings > 0 {
            self.state = State::Chunked(Chunk::Size(Vec::new()));
        } else if let Some(length) = head.length.filter(|&length| length > 0) {
            self.state = State::Body(length);
        }
        Ok(())
    }

    fn feed_chunked(&mut self, data: &[u8]) -> (usize, Event) {
        let mut used = 0;
        while used < data.len() {
            let State::Chunked(chunk) = &mut self.state else { break };
            match chunk {
                Chunk::Data(remaining) => {
                    let take = usize::try_from(*remaining).map_or(data.len() - used, |r| r.min(data.len() - used));
                    *remaining -= take as u64;
                    used += take;
                    if *remaining == 0 {
                        *chunk = Chunk::DataCr;
                    }
                }
                Chunk::DataCr | Chunk::DataLf => {
                    let expected = if matches!(chunk, Chunk::DataCr) { b'\r' } else { b'\n' };
                    if data[used] != expected {
                        return (used, Event::BodyError(Violation::InvalidChunk));
                    }
                    used += 1;
                    *chunk = if expected == b'\r' { Chunk::DataLf } else { Chunk::Size(Vec::new()) };
                }
                Chunk::Size(line) | Chunk::Trailer(line) => {
                    let Some(offset) = memchr::memchr(b'\n', &data[used..]) else {
                        line.extend_from_slice(&data[used..]);
                        if line.len() > MAX_CHUNK_LINE.max(MAX_LINE) {
                            return (data.len(), Event::BodyError(Violation::InvalidChunk));
                        }
                        return (data.len(), Event::Consumed);
                    };
                    line.extend_from_slice(&data[used..used + offset]);
                    used += offset + 1;
                    if line.pop() != Some(b'\r') {
                        return (used, Event::BodyError(Violation::BareLf));
                    }
                    let line = std::mem::take(line);
                    let is_size = matches!(chunk, Chunk::Size(_));
                    self.state = match (is_size, line.is_empty()) {
                        (true, _) => match parse_chunk_size(&line) {
                            Some(0) => State::Chunked(Chunk::Trailer(Vec::new())),
                            Some(size) => State::Chunked(Chunk::Data(size)),
                            None => return (used, Event::BodyError(Violation::InvalidChunk)),
                        },
                        (false, true) => State::Head(Head::default()),
                        (false, false) => State::Chunked(Chunk::Trailer(Vec::new())),
                    };
                }
            }
        }
        if let Some(&last) = data.last() {
            self.last_byte = last;
        }
        (used, Event::Consumed)
    }

    /// Reads the status of the response to an upgrade request from the first bytes the
    /// gateway writes; returns true once the tunnel-or-not question is settled.
    fn settle_upgrade(&mut self, written: &[u8]) -> bool {
        let State::AwaitingUpgrade { connect } = self.state else { return false };
        let Some(status) = written.get(9..12).filter(|_| written.starts_with(b"HTTP/1.")) else {
            return false;
        };
        let tunnel = status == b"101" || (connect && status[0] == b'2');
        if !tunnel && status[0] == b'1' {
            // An interim response such as 100 Continue; the final one follows.
            return false;
        }
        self.state = if tunnel { State::Passthrough } else { State::Head(Head::default()) };
        true
    }
}

impl Head {
    /// Takes one line without its line end; returns true at the empty line that ends the head.
    fn take_line(&mut self, line: &[u8]) -> bool {
        let Some(request_line) = &self.request_line else {
            // Empty lines before the request line are allowed (RFC 9112 §2.2).
            if !line.is_empty() {
                self.request_line = Some(RequestLine::parse(line));
            }
            return false;
        };
        if line.is_empty() {
            return true;
        }
        // The HTTP/2 preface reads as a request line and an empty line; the rest of it
        // is not a header field.
        if request_line.h2_preface {
            return false;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else { return false };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"content-length") {
            self.lengths += 1;
            match parse_decimal(value) {
                Some(length) => self.length = Some(length),
                None => self.invalid_length = true,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.codings += 1;
            let last = value.rsplit(|&b| b == b',').next().map(trim).unwrap_or_default();
            self.chunked_last = last.eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.upgrade = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            let mut options = value.split(|&b| b == b',').map(trim);
            self.connection_upgrade |= options.any(|option| option.eq_ignore_ascii_case(b"upgrade"));
        }
        false
    }
}

impl RequestLine {
    fn parse(line: &[u8]) -> RequestLine {
        if line == b"PRI * HTTP/2.0" {
            return RequestLine { h2_preface: true, ..RequestLine::default() };
        }
        let mut parts = line.split(|&b| b == b' ');
        let method = parts.next().unwrap_or_default();
        let version = parts.nth(1).unwrap_or_default();
        RequestLine {
            connect: method.eq_ignore_ascii_case(b"CONNECT"),
            http10: version == b"HTTP/1.0",
            h2_preface: false,
        }
    }
}

/// Builds the request that hyper reads in place of a rejected head. It keeps the method and
/// path where they are plain, so the error has the form the route's clients expect (JSON on
/// `/v2/`, no body for HEAD).
fn stand_in(request_line: &[u8], violation: Violation) -> Vec<u8> {
    let mut parts = request_line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let plain_method = (1..=16).contains(&method.len()) && method.iter().all(u8::is_ascii_uppercase) && method != b"CONNECT";
    let plain_target = target.starts_with(b"/") && target.len() <= MAX_TARGET && target.iter().all(|b| (0x21..0x7f).contains(b));
    let method = if plain_method { method } else { b"GET" };
    let target = if plain_target { target } else { b"/" };
    let code = violation.code();
    let mut request = Vec::with_capacity(method.len() + target.len() + 80);
    for part in [method, b" ", target, b" HTTP/1.1\r\n", REJECTED_HEADER.as_bytes(), b": ", code.as_bytes()] {
        request.extend_from_slice(part);
    }
    request.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
    request
}

fn trim(value: &[u8]) -> &[u8] {
    let start = value.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(value.len());
    let end = value.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |i| i + 1);
    &value[start..end]
}

fn parse_decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Parses a chunk size: 1 to 16 hex digits, then optional whitespace and extensions.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = trim(&line[digits..]);
    if !rest.is_empty() && rest[0] != b';' {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

/// Decision on a stretch of bytes after the tracker has read it.
enum Outcome {
    /// All bytes go to hyper.
    Release,
    /// Bytes before `keep` go to hyper; the rest wait for more input or an upgrade's status.
    Hold { keep: usize },
    /// Bytes before `keep` go to hyper, then the stand-in request, then nothing.
    Reject { keep: usize, stand_in: Vec<u8> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Reading,
    /// The stand-in request is queued; after it, reads never complete, so hyper responds to it
    /// and closes instead of seeing the client go away.
    Rejected,
}

/// The downstream connection as hyper reads it, with HTTP/1.1 framing checked. See the
/// module documentation.
pub struct FramingGuard<S> {
    inner: S,
    tracker: Tracker,
    /// Bytes not yet released to hyper: an incomplete request head, which then starts at
    /// offset 0, or the bytes after an upgrade request that waits for its response.
    unreleased: Vec<u8>,
    /// Released bytes that did not fit into hyper's buffer yet.
    out: Vec<u8>,
    out_pos: usize,
    phase: Phase,
    /// The unreleased bytes must be read again from the start, because an upgrade was refused.
    reread: bool,
    head_limit: usize,
    head_timeout: Option<Duration>,
    /// Deadline for the partly read head in `unreleased`.
    head_deadline: Option<Pin<Box<Sleep>>>,
    upgrade_waker: Option<Waker>,
}

impl<S> FramingGuard<S> {
    /// Wraps `inner`. `checked` is false on connections that ALPN made HTTP/2. A request
    /// head longer than `head_limit` is passed on unchecked, so that hyper responds 431;
    /// one that takes longer than `head_timeout` to arrive ends the connection.
    pub fn new(inner: S, checked: bool, head_limit: usize, head_timeout: Duration) -> FramingGuard<S> {
        FramingGuard {
            inner,
            tracker: Tracker::new(!checked),
            unreleased: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            phase: Phase::Reading,
            reread: false,
            head_limit,
            head_timeout: Some(head_timeout),
            head_deadline: None,
            upgrade_waker: None,
        }
    }

    fn process(&mut self, data: &[u8], mut head_start: Option<usize>, from: usize) -> Outcome {
        let mut at = from;
        loop {
            let (used, event) = self.tracker.feed(&data[at..]);
            at += used;
            match event {
                // Consumed stops early when a body or a chunked body ends inside `data`.
                Event::Consumed if at == data.len() => break,
                Event::Consumed => {}
                Event::HeadStart => head_start = Some(at),
                Event::HeadEnd(Ok(())) => head_start = None,
                Event::HeadEnd(Err(violation)) => {
                    let keep = head_start.unwrap_or(0);
                    tracing::info!(reason = violation.code(), "rejected a request with ambiguous framing");
                    let stand_in = stand_in(first_line(&data[keep..at]), violation);
                    return Outcome::Reject { keep, stand_in };
                }
                Event::BodyError(violation) => {
                    // hyper's chunked decoder rejects the same bytes and fails the body;
                    // the connection does not outlive that, so the guard steps aside.
                    tracing::debug!(reason = violation.code(), "chunked body framing is invalid");
                    self.tracker.state = State::Passthrough;
                    return Outcome::Release;
                }
                Event::Hold => return Outcome::Hold { keep: at },
            }
        }
        match head_start {
            Some(keep) => Outcome::Hold { keep },
            None => Outcome::Release,
        }
    }

    fn queue(&mut self, bytes: &[u8]) {
        self.out.drain(..self.out_pos);
        self.out_pos = 0;
        self.out.extend_from_slice(bytes);
    }

    /// Applies an outcome for bytes that sit in `unreleased`.
    fn settle_held(&mut self, outcome: Outcome) {
        let unreleased = std::mem::take(&mut self.unreleased);
        match outcome {
            Outcome::Release => self.queue(&unreleased),
            Outcome::Hold { keep } => {
                self.queue(&unreleased[..keep]);
                self.unreleased = unreleased[keep..].to_vec();
            }
            Outcome::Reject { keep, stand_in } => {
                self.queue(&unreleased[..keep]);
                self.queue(&stand_in);
                self.phase = Phase::Rejected;
            }
        }
    }
}

/// Returns the request line of a head, leading empty lines skipped.
fn first_line(head: &[u8]) -> &[u8] {
    head.split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .find(|line| !line.is_empty())
        .unwrap_or_default()
}

impl<S: AsyncRead + Unpin> AsyncRead for FramingGuard<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                return Poll::Ready(Ok(()));
            }
            match this.phase {
                Phase::Reading => {}
                Phase::Rejected => return Poll::Pending,
            }
            if this.unreleased.is_empty() {
                this.head_deadline = None;
            }
            if this.tracker.is_passthrough() {
                if this.unreleased.is_empty() {
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
                let unreleased = std::mem::take(&mut this.unreleased);
                this.queue(&unreleased);
                continue;
            }
            if this.tracker.awaiting_upgrade() {
                this.upgrade_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if this.reread {
                this.reread = false;
                let unreleased = std::mem::take(&mut this.unreleased);
                let outcome = this.process(&unreleased, None, 0);
                this.unreleased = unreleased;
                this.settle_held(outcome);
                continue;
            }

            if this.unreleased.is_empty() {
                // The usual case: no head is partly read, so bytes go straight into
                // hyper's buffer and only a head cut by the read's end is taken back.
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                let end = buf.filled().len();
                if end == before {
                    return Poll::Ready(Ok(()));
                }
                let outcome = this.process(&buf.filled()[before..end], None, 0);
                let released = match outcome {
                    Outcome::Release => end - before,
                    Outcome::Hold { keep } => {
                        this.unreleased.extend_from_slice(&buf.filled()[before + keep..end]);
                        keep
                    }
                    Outcome::Reject { keep, stand_in } => {
                        this.queue(&stand_in);
                        this.phase = Phase::Rejected;
                        keep
                    }
                };
                buf.set_filled(before + released);
                if released > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }

            // A head is partly read: collect it in `unreleased` until it ends.
            if this.unreleased.len() > this.head_limit {
                // Too long to be a request head: hyper responds 431 and closes.
                this.tracker.state = State::Passthrough;
                continue;
            }
            let start = this.unreleased.len();
            let mut scratch = [MaybeUninit::<u8>::uninit(); HEAD_READ];
            let mut read = ReadBuf::uninit(&mut scratch);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut read);
            let n = read.filled().len();
            this.unreleased.extend_from_slice(read.filled());
            if polled.is_pending() {
                let Some(timeout) = this.head_timeout else { return Poll::Pending };
                // hyper's header read timeout does not cover a head held here (on a new
                // connection hyper-util has not even chosen HTTP/1.1 yet), so the guard
                // applies the same limit to slow clients that never finish a head.
                let deadline = this.head_deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if deadline.as_mut().poll(cx).is_ready() {
                    let message = format!("timed out: the request head did not complete within {timeout:?}");
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, message)));
                }
                return Poll::Pending;
            }
            ready!(polled)?;
            if n == 0 {
                // The client closed within a head: hyper reads the partial head, then the end of input.
                let unreleased = std::mem::take(&mut this.unreleased);
                this.queue(&unreleased);
                this.tracker.state = State::Passthrough;
                continue;
            }
            let unreleased = std::mem::take(&mut this.unreleased);
            let outcome = this.process(&unreleased, Some(0), start);
            this.unreleased = unreleased;
            this.settle_held(outcome);
        }
    }
}

impl<S: AsyncWrite + Unpin> FramingGuard<S> {
    fn observe_write(&mut self, written: &[u8]) {
        if self.tracker.settle_upgrade(written) {
            self.reread = !self.unreleased.is_empty();
            if let Some(waker) = self.upgrade_waker.take() {
                waker.wake();
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramingGuard<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.tracker.awaiting_upgrade() {
            this.observe_write(buf);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.tracker.awaiting_upgrade() {
            if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
                this.observe_write(first);
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A client that delivers `data` at most `piece` bytes per read and then stays open.
struct Scripted<'a> {
    data: &'a [u8],
    pos: usize,
    piece: usize,
}

impl AsyncRead for Scripted<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = self.piece.min(self.data.len() - self.pos).min(buf.remaining());
        if n == 0 {
            return Poll::Pending;
        }
        buf.put_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Returns the bytes that hyper reads when a client sends `input` in reads of at most
/// `piece` bytes and then waits. The fuzz checks compare it across read sizes.
#[doc(hidden)]
pub fn released_bytes(input: &[u8], piece: usize) -> Vec<u8> {
    let client = Scripted { data: input, pos: 0, piece: piece.max(1) };
    let mut guard = FramingGuard::new(client, true, 64 << 10, Duration::ZERO);
    // No timer: this runs outside a Tokio runtime, and the scripted client never stalls.
    guard.head_timeout = None;
    let mut cx = Context::from_waker(Waker::noop());
    let mut released = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(&mut guard).poll_read(&mut cx, &mut read) {
            Poll::Ready(Ok(())) if !read.filled().is_empty() => released.extend_from_slice(read.filled()),
            _ => return released,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SECOND: Duration = Duration::from_secs(1);

    fn every_split(input: &[u8]) -> Vec<u8> {
        let whole = released_bytes(input, input.len());
        for piece in [1, 2, 3, 7, 64] {
            assert_eq!(released_bytes(input, piece), whole, "pieces of {piece}: {:?}", String::from_utf8_lossy(input));
        }
        whole
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    #[test]
    fn clean_requests_pass_unchanged() {
        let input = b"GET /v2/ HTTP/1.1\r\nhost: a\r\n\r\n\
            PUT /v2/x HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello\
            \r\nPATCH /v2/y HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\n\r\n5;ext=1\r\nGET /\r\n0\r\nx-trailer: 1\r\n\r\n\
            POST /v3/x HTTP/1.1\r\nupgrade: websocket\r\ncontent-length: 2\r\n\r\n{}\
            HEAD /v2/z HTTP/1.1\r\nhost: a\r\n\r\n";
        let seen = every_split(input);
        assert_eq!(text(&seen), text(input));
    }

    #[test]
    fn ambiguous_heads_become_the_stand_in() {
        let cases: &[(&[u8], Violation)] = &[
            (b"POST /v2/a HTTP/1.1\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n", Violation::BothLengths),
            (b"POST /v2/a HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n", Violation::BothLengths),
            (b"POST /v2/a HTTP/1.1\r\ncontent-length: 4\r\ncontent-length: 4\r\n\r\n", Violation::RepeatedLength),
            (b"POST /v2/a HTTP/1.1\r\ncontent-length: +4\r\n\r\n", Violation::InvalidLength),
            (b"POST /v2/a HTTP/1.1\r\ntransfer-encoding: chunked, gzip\r\n\r\n", Violation::UnsupportedCoding),
            (b"POST /v2/a HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n", Violation::UnsupportedCoding),
            (b"POST /v2/a HTTP/1.1\nhost: a\r\n\r\n", Violation::BareLf),
            (b"POST /v2/a HTTP/1.1\r\nhost: a\n\r\n", Violation::BareLf),
            (b"POST /v2/a HTTP/1.1\r\nhost: a\r\n\n", Violation::BareLf),
            (b"POST /v2/a HTTP/1.1\r\nupgrade: websocket\r\nconnection: keep-alive, Upgrade\r\ncontent-length: 3\r\n\r\n", Violation::UpgradeWithBody),
        ];
        for (head, violation) in cases {
            let mut input = b"GET /first HTTP/1.1\r\n\r\n".to_vec();
            input.extend_from_slice(head);
            input.extend_from_slice(b"GET /smuggled HTTP/1.1\r\n\r\n");
            let seen = every_split(&input);
            let expected = format!(
                "GET /first HTTP/1.1\r\n\r\nPOST /v2/a HTTP/1.1\r\n{REJECTED_HEADER}: {}\r\nconnection: close\r\n\r\n",
                violation.code()
            );
            assert_eq!(text(&seen), expected, "{}", text(head));
        }
    }

    #[test]
    fn stand_in_keeps_only_plain_method_and_path() {
        let seen = every_split(b"get http://x/v2/ HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n");
        assert!(text(&seen).starts_with("GET / HTTP/1.1\r\n"), "{}", text(&seen));
        let seen = every_split(b"CONNECT a:443 HTTP/1.1\nhost: a\n\n");
        assert!(text(&seen).starts_with("GET / HTTP/1.1\r\n"), "{}", text(&seen));
    }

    /// hyper's chunked decoder rejects these too; the guard passes them on untouched,
    /// stops checking, and hyper fails the body.
    #[test]
    fn broken_chunk_lines_pass_to_hyper() {
        for body in [&b"5\nhello\r\n0\r\n\r\n"[..], b"zz\r\n", b"5\r\nhelloXY", b"0\r\nx: 1\n\r\n", b"11111111111111111\r\n"] {
            let mut input = b"PUT /v2/a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            input.extend_from_slice(body);
            input.extend_from_slice(b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n");
            let seen = every_split(&input);
            assert_eq!(text(&seen), text(&input));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn slow_head_times_out() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut guard = FramingGuard::new(server, true, 64 << 10, SECOND);
        client.write_all(b"GET /v2/ HTTP/1.1\r\nx-slow: a").await.unwrap();
        let mut buf = [0u8; 256];
        let error = guard.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn http2_preface_passes() {
        let input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00\nfree\n\nbytes";
        let seen = every_split(input);
        assert_eq!(seen, input);
    }

    #[tokio::test]
    async fn head_is_held_until_complete() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut guard = FramingGuard::new(server, true, 64 << 10, SECOND);
        client.write_all(b"GET /v2/ HTTP/1.1\r\nhost: a\r\n").await.unwrap();
        let mut buf = [0u8; 256];
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), guard.read(&mut buf)).await;
        assert!(early.is_err(), "part of a head was released");
        client.write_all(b"\r\n").await.unwrap();
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET /v2/ HTTP/1.1\r\nhost: a\r\n\r\n");
    }

    /// After an upgrade request, the guard waits for the status: 101 makes the rest
    /// tunnel bytes, anything else makes it the next request.
    #[tokio::test]
    async fn upgrade_waits_for_the_status() {
        let upgrade = b"GET /ws HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n";
        let after = b"POST /x HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n";
        for (status, tunnel) in [(&b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..], true), (b"HTTP/1.1 400 Bad Request\r\n\r\n", false)] {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let mut guard = FramingGuard::new(server, true, 64 << 10, SECOND);
            client.write_all(upgrade).await.unwrap();
            client.write_all(after).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = guard.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], upgrade);
            let early = tokio::time::timeout(std::time::Duration::from_millis(50), guard.read(&mut buf)).await;
            assert!(early.is_err(), "bytes after an upgrade request passed before its status");
            guard.write_all(status).await.unwrap();
            let n = guard.read(&mut buf).await.unwrap();
            let seen = text(&buf[..n]);
            if tunnel {
                assert_eq!(seen, text(after));
            } else {
                assert!(seen.contains(REJECTED_HEADER), "{seen}");
            }
        }
    }

    #[tokio::test]
    async fn long_head_passes_to_hyper_unchecked() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guard = FramingGuard::new(server, true, 1000, SECOND);
        let head = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(5000));
        client.write_all(head.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while seen.len() < head.len() {
            let n = guard.read(&mut buf).await.unwrap();
            seen.extend_from_slice(&buf[..n]);
        }
        assert_eq!(text(&seen), head);
    }

    #[test]
    fn rejected_reads_the_code() {
        let request = Request::get("/").header(REJECTED_HEADER, "both-lengths").body(()).unwrap();
        assert_eq!(rejected(&request), Some(Violation::BothLengths.message()));
        let forged = Request::get("/").header(REJECTED_HEADER, "x").body(()).unwrap();
        assert!(rejected(&forged).is_some());
        assert_eq!(rejected(&Request::get("/").body(()).unwrap()), None);
    }
}
