//! A minimal HTTP/2 frame writer and reader for tests that send what a normal client never
//! would: connection-specific headers, resets right after HEADERS, endless CONTINUATION.
//! Header blocks use HPACK literals without indexing or Huffman coding (RFC 7541 §6.2.2).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::fixtures::{tls_connect, TlsStream};

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const CONTINUATION: u8 = 9;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let bytes = match self.kind {
            RST_STREAM => self.payload.get(0..4)?,
            GOAWAY => self.payload.get(4..8)?,
            _ => return None,
        };
        Some(u32::from_be_bytes(bytes.try_into().unwrap()))
    }

    /// `(identifier, value)` pairs of a SETTINGS frame.
    pub fn settings(&self) -> Vec<(u16, u32)> {
        self.payload
            .chunks_exact(6)
            .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
            .collect()
    }
}

pub fn encode_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = payload.len() as u32;
    let mut frame = Vec::with_capacity(9 + payload.len());
    frame.extend_from_slice(&length.to_be_bytes()[1..]);
    frame.push(kind);
    frame.push(flags);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn hpack_integer(out: &mut Vec<u8>, value: usize) {
    // 7-bit prefix with the Huffman bit clear.
    if value < 127 {
        out.push(value as u8);
        return;
    }
    out.push(127);
    let mut rest = value - 127;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// An HPACK header block of literal fields without indexing.
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        hpack_integer(&mut block, name.len());
        block.extend_from_slice(name.as_bytes());
        hpack_integer(&mut block, value.len());
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// The pseudo-header fields of a GET to the gateway, plus `extra`.
pub fn get_fields<'a>(path: &'a str, authority: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut fields = vec![(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", path)];
    fields.extend_from_slice(extra);
    fields
}

/// An HTTP/2 connection over TLS after the preface and the SETTINGS exchange.
pub struct H2Connection {
    pub stream: TlsStream,
    /// The gateway's first SETTINGS frame.
    pub server_settings: Frame,
    buffer: Vec<u8>,
}

impl H2Connection {
    pub async fn open(port: u16) -> H2Connection {
        let mut stream = tls_connect(port, "h2").await;
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "the gateway did not select h2");
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        stream.write_all(&encode_frame(SETTINGS, 0, 0, &[])).await.unwrap();
        let mut connection = H2Connection {
            stream,
            server_settings: Frame { kind: 0, flags: 0, stream: 0, payload: Vec::new() },
            buffer: Vec::new(),
        };
        let settings = connection.read_frame(Duration::from_secs(5)).await.expect("server SETTINGS");
        assert_eq!(settings.kind, SETTINGS);
        connection.send(&encode_frame(SETTINGS, 0x1, 0, &[])).await;
        connection.server_settings = settings;
        connection
    }

    /// Writes bytes; returns false when the gateway has already closed the connection.
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok() && self.stream.flush().await.is_ok()
    }

    /// Reads the next frame; `None` when the connection closed or `limit` passed.
    pub async fn read_frame(&mut self, limit: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.buffer.len() >= 9 {
                let length = u32::from_be_bytes([0, self.buffer[0], self.buffer[1], self.buffer[2]]) as usize;
                if self.buffer.len() >= 9 + length {
                    let frame = Frame {
                        kind: self.buffer[3],
                        flags: self.buffer[4],
                        stream: u32::from_be_bytes(self.buffer[5..9].try_into().unwrap()) & 0x7fff_ffff,
                        payload: self.buffer[9..9 + length].to_vec(),
                    };
                    self.buffer.drain(..9 + length);
                    return Some(frame);
                }
            }
            let mut chunk = [0u8; 16 << 10];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buffer.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Reads frames until the connection closes or `limit` passes, acknowledging PINGs as
    /// a real client does, because a graceful close waits for the PING acknowledgement.
    pub async fn read_frames(&mut self, limit: Duration) -> (Vec<Frame>, bool) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut frames = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return (frames, false);
            }
            match self.read_frame(remaining).await {
                Some(frame) => {
                    if frame.kind == PING && frame.flags & 0x1 == 0 {
                        let _ = self.send(&encode_frame(PING, 0x1, 0, &frame.payload)).await;
                    }
                    frames.push(frame);
                }
                None => return (frames, tokio::time::Instant::now() < deadline),
            }
        }
    }
}

/// The text of all DATA frames on `stream`.
pub fn data_text(frames: &[Frame], stream: u32) -> String {
    let bytes: Vec<u8> = frames
        .iter()
        .filter(|f| f.kind == DATA && f.stream == stream)
        .flat_map(|f| f.payload.clone())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
