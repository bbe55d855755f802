//! Upstream fixtures that record what reaches them or fail on purpose, and raw TLS clients
//! that write exact bytes. Everything listens on or connects to 127.0.0.1 only.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

/// What an upstream fixture does after reading a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Reads the body, answers 200 with `upstream ok` and keeps the connection open.
    Ok,
    /// Reads the head and never answers.
    Hang,
    /// Resets the connection (RST) before sending anything.
    ResetBeforeResponse,
    /// Declares `Content-Length: 1000000`, sends 100000 bytes, then resets.
    ResetMidBody,
    /// Declares `Content-Length: 1000000`, sends 100000 bytes, then closes cleanly (FIN).
    ShortContentLength,
    /// Sends a chunked body of 100000 bytes without the last chunk, then closes cleanly.
    ShortChunked,
    /// Declares `Content-Length: 1000000`, sends 100000 bytes, then stalls.
    HangMidBody,
}

/// One request as the fixture read it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub head: String,
    pub body: Vec<u8>,
    /// The body was complete by its framing; false when the peer went away first.
    pub complete: bool,
}

impl Recorded {
    /// The request line: method, target and version.
    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    /// Every value of header `name`, compared case-insensitively.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .filter(|(key, _)| key.trim().eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim().to_string())
            .collect()
    }
}

/// An HTTP/1.1 upstream on 127.0.0.1 that records every request head and body it reads.
/// It runs on its own thread and runtime, so it works under any test runtime.
pub struct Upstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<Mutex<usize>>,
}

impl Upstream {
    pub fn start(behavior: Behavior) -> Upstream {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (recorded, connected) = (requests.clone(), connections.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    *connected.lock().unwrap() += 1;
                    tokio::spawn(serve_fixture(stream, behavior, recorded.clone()));
                }
            });
        });
        Upstream {
            addr: addr_rx.recv().unwrap(),
            requests,
            connections,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn connection_count(&self) -> usize {
        *self.connections.lock().unwrap()
    }
}

async fn serve_fixture(mut stream: TcpStream, behavior: Behavior, recorded: Arc<Mutex<Vec<Recorded>>>) {
    let mut buffer = Vec::new();
    loop {
        let Some(head_end) = read_until_head_end(&mut stream, &mut buffer).await else { return };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        buffer.drain(..head_end);
        let index = {
            let mut requests = recorded.lock().unwrap();
            requests.push(Recorded { head: head.clone(), body: Vec::new(), complete: false });
            requests.len() - 1
        };

        match behavior {
            Behavior::Hang => {
                // Keep reading so the peer's writes never block, and never answer.
                let mut sink = [0u8; 16 << 10];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            Behavior::ResetBeforeResponse => {
                reset(&stream);
                return;
            }
            _ => {}
        }

        let (body, complete) = read_body(&mut stream, &mut buffer, &head).await;
        {
            let mut requests = recorded.lock().unwrap();
            requests[index].body = body;
            requests[index].complete = complete;
        }
        if !complete {
            return;
        }

        let partial = vec![b'x'; 100_000];
        let written = match behavior {
            Behavior::Ok => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 11\r\n\r\nupstream ok")
                    .await
            }
            Behavior::ResetMidBody | Behavior::ShortContentLength | Behavior::HangMidBody => {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n").await;
                stream.write_all(&partial).await
            }
            Behavior::ShortChunked => {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await;
                let _ = stream.write_all(format!("{:x}\r\n", partial.len()).as_bytes()).await;
                let _ = stream.write_all(&partial).await;
                stream.write_all(b"\r\n").await
            }
            Behavior::Hang | Behavior::ResetBeforeResponse => unreachable!("handled above"),
        };
        let _ = stream.flush().await;
        match behavior {
            Behavior::Ok if written.is_ok() => continue,
            Behavior::ResetMidBody => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                reset(&stream);
            }
            Behavior::HangMidBody => tokio::time::sleep(Duration::from_secs(3600)).await,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
        return;
    }
}

/// Makes the coming close send RST instead of FIN. A zero linger does not block on drop,
/// which is what tokio's deprecation of `set_linger` warns about.
#[allow(deprecated)]
fn reset(stream: &TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
}

/// Reads until `buffer` holds a complete head; returns the head's length with its blank line.
async fn read_until_head_end(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(end) = find(buffer, b"\r\n\r\n") {
            return Some(end + 4);
        }
        let mut chunk = [0u8; 16 << 10];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads a request body framed by Content-Length or chunked encoding.
async fn read_body(stream: &mut TcpStream, buffer: &mut Vec<u8>, head: &str) -> (Vec<u8>, bool) {
    let lower = head.to_ascii_lowercase();
    let chunked = lower.contains("\r\ntransfer-encoding: chunked");
    let length: usize = lower
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);

    if !chunked {
        while buffer.len() < length {
            if !fill(stream, buffer).await {
                return (std::mem::take(buffer), false);
            }
        }
        let body = buffer.drain(..length).collect();
        return (body, true);
    }

    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(end) = find(buffer, b"\r\n") {
                break end;
            }
            if !fill(stream, buffer).await {
                return (body, false);
            }
        };
        let size_text = String::from_utf8_lossy(&buffer[..line_end]).into_owned();
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16) else {
            return (body, false);
        };
        buffer.drain(..line_end + 2);
        while buffer.len() < size + 2 {
            if !fill(stream, buffer).await {
                body.extend_from_slice(buffer);
                return (body, false);
            }
        }
        body.extend_from_slice(&buffer[..size]);
        buffer.drain(..size + 2);
        if size == 0 {
            return (body, true);
        }
    }
}

async fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 64 << 10];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buffer.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// An HTTPS upstream on 127.0.0.1 whose certificate comes from the test CA, which the
/// gateway does not trust unless `upstream_tls.ca_file` names it.
pub struct TlsUpstream {
    pub addr: SocketAddr,
}

impl TlsUpstream {
    pub fn start() -> TlsUpstream {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls_config()));
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Ok(mut tls) = acceptor.accept(stream).await {
                            // Closing with the request still unread would send a TCP reset,
                            // which can reach the gateway before the response does.
                            let mut head = Vec::new();
                            let mut chunk = [0u8; 4096];
                            while !head.windows(4).any(|window| window == b"\r\n\r\n") {
                                match tls.read(&mut chunk).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(read) => head.extend_from_slice(&chunk[..read]),
                                }
                            }
                            let _ = tls
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await;
                        }
                    });
                }
            });
        });
        TlsUpstream { addr: addr_rx.recv().unwrap() }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

fn server_tls_config() -> rustls::ServerConfig {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(super::repo_path("certs-test/tls.crt"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(super::repo_path("certs-test/tls.key")).unwrap();
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap()
}

pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Opens a TLS connection to the gateway that trusts the test CA and offers one ALPN
/// protocol (`http/1.1` or `h2`).
pub async fn tls_connect(port: u16, alpn: &str) -> TlsStream {
    let config = super::tls_client_config(true, &[alpn.as_bytes()]);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.expect("TLS handshake with the gateway")
}

/// Reads until the peer closes or `limit` passes; returns the bytes and whether it closed.
pub async fn read_to_close<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> (Vec<u8>, bool) {
    let mut data = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut chunk = [0u8; 16 << 10];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return (data, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (data, true),
            Ok(Ok(n)) => data.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends raw bytes on a new HTTP/1.1 TLS connection and returns what came back and whether
/// the gateway closed the connection within `limit`.
pub async fn raw_http1(port: u16, request: &[u8], limit: Duration) -> (String, bool) {
    let mut tls = tls_connect(port, "http/1.1").await;
    tls.write_all(request).await.unwrap();
    tls.flush().await.unwrap();
    let (data, closed) = read_to_close(&mut tls, limit).await;
    (String::from_utf8_lossy(&data).into_owned(), closed)
}

/// The status code of the first response in `text`, or 0.
pub fn status_of(text: &str) -> u16 {
    text.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
}

/// Writes a whole buffer, tolerating a peer that closes early.
pub async fn write_tolerant<S: AsyncWrite + Unpin>(stream: &mut S, data: &[u8]) -> bool {
    stream.write_all(data).await.is_ok() && stream.flush().await.is_ok()
}
