//! Test harness: real programs on ephemeral loopback ports, and an HTTPS client that trusts
//! the test CA. Every process is killed when its handle drops.

#![allow(dead_code)]

use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, TestBody>;

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

pub fn ca_file() -> PathBuf {
    repo_path("certs-test/ca.crt")
}

/// Picks a port that was free a moment ago, for programs that cannot listen on port 0 and
/// report it. A clash with another process is possible but rare.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_for_port(addr: SocketAddr, child: &mut Child, log: &Path) {
    if let Err(text) = try_wait_for_port(addr, child, log) {
        panic!("{text}");
    }
}

/// Waits until something listens on `addr`; returns the reason and the log if the process
/// exits first or nothing listens after 30 s.
pub fn try_wait_for_port(addr: SocketAddr, child: &mut Child, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!("process exited with {status} before listening on {addr}; log:\n{text}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing listens on {addr} after 30 s; log:\n{}", std::fs::read_to_string(log).unwrap_or_default()))
}

pub fn require_program(name: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(found, "{name} is not installed; run scripts/install-deps.sh first");
}

/// A child process that is killed on drop.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CNCF distribution registry (Debian's `docker-registry`), storing in a temp folder.
pub struct Registry {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub process: Process,
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_with("")
    }

    /// Starts the registry; `extra` is YAML appended to its configuration (e.g. an `auth:`
    /// section).
    pub fn start_with(extra: &str) -> Registry {
        require_program("docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{extra}",
                root = dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = dir.path().join("registry.log");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("registry.err")).unwrap())
            .spawn()
            .expect("start docker-registry");
        wait_for_port(addr, &mut child, &dir.path().join("registry.err"));
        Registry {
            addr,
            process: Process { child, log },
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The harbor-gateway binary under test, with its configuration in a temp folder.
pub struct Gateway {
    pub port: u16,
    pub admin_port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub process: Process,
}

impl Gateway {
    /// Starts the gateway with `body` appended to a configuration that already sets the
    /// listeners and the test certificate. `body` adds `[upstreams]` and anything else.
    pub fn start(body: &str) -> Gateway {
        Self::start_with(&repo_path("certs-test/tls.crt"), &repo_path("certs-test/tls.key"), body, &[])
    }

    /// Starts the gateway with the given certificate files and command-line arguments. Ports
    /// come from [`free_port`], so another process may take one before the gateway binds it:
    /// then the start is retried with new ports.
    pub fn start_with(cert: &Path, key: &Path, body: &str, args: &[&str]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("gateway.toml");
        for attempt in 1..=3 {
            let port = free_port();
            let admin_port = free_port();
            let config = format!(
                "[listen]\nhttps = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{admin_port}\"\n\
                 [tls]\ncert = \"{}\"\nkey = \"{}\"\n{body}",
                cert.display(),
                key.display(),
            );
            std::fs::write(&config_path, config).unwrap();
            let mut process = spawn_gateway(&config_path, dir.path(), args);
            let log = process.log.clone();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            match try_wait_for_port(addr, &mut process.child, &log) {
                Ok(()) => return Gateway { port, admin_port, dir, config_path, process },
                Err(text) if attempt < 3 && text.contains("Address already in use") => continue,
                Err(text) => panic!("{text}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts the gateway in front of `registry` as Harbor core.
    pub fn in_front_of(registry: &Registry) -> Gateway {
        Self::start(&format!("[upstreams]\nharbor_core = \"{}\"\n", registry.url()))
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// Peak resident set size (VmHWM) of the gateway process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.pid())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc status")
    }
}

pub fn spawn_gateway(config: &Path, dir: &Path, extra_args: &[&str]) -> Process {
    let log = dir.join("gateway.log");
    let child = Command::new(env!("CARGO_BIN_EXE_harbor-gateway"))
        .arg("--config")
        .arg(config)
        .args(extra_args)
        .env("RUST_LOG", "harbor_gateway=debug,info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start harbor-gateway");
    Process { child, log }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Builds a rustls client configuration that trusts the test CA (or, with
/// `trust_test_ca` false, no CA at all) and offers the `alpn` protocols.
pub fn tls_client_config(trust_test_ca: bool, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    if trust_test_ca {
        for cert in CertificateDer::pem_file_iter(ca_file()).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// Builds an HTTPS client that trusts the test CA and speaks only `protocol`.
pub fn https_client(protocol: Protocol) -> HttpsClient {
    let tls = tls_client_config(true, &[]);
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only();
    let mut client = Client::builder(TokioExecutor::new());
    match protocol {
        Protocol::Http1 => client.build(builder.enable_http1().build()),
        Protocol::Http2 => {
            client.http2_only(true);
            client.http2_initial_stream_window_size(4 << 20);
            client.http2_initial_connection_window_size(16 << 20);
            client.build(builder.enable_http2().build())
        }
    }
}

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> TestBody {
    full(Bytes::new())
}

/// Streams a file as a request body, 256 KiB at a time.
pub fn file_body(path: &Path) -> TestBody {
    let file = std::fs::File::open(path).unwrap();
    let reader = tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 256 << 10);
    let stream = futures_util::StreamExt::map(reader, |chunk| {
        chunk.map(hyper::body::Frame::data).map_err(|e| Box::new(e) as BoxError)
    });
    http_body_util::StreamBody::new(stream).boxed_unsync()
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Reads a response body to the end, hashing it; returns the digest and the length.
pub async fn hash_body(body: hyper::body::Incoming) -> Result<(String, u64), BoxError> {
    let mut body = body;
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            length += data.len() as u64;
            hasher.update(&data);
        }
    }
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), length))
}

pub async fn body_text(body: hyper::body::Incoming) -> String {
    let bytes = body.collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Writes `size` bytes of deterministic pseudo-random data to `path` and returns the digest.
pub fn write_random_file(path: &Path, size: u64, seed: u64) -> String {
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut hasher = Sha256::new();
    let mut state = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    let mut remaining = size;
    while remaining > 0 {
        for chunk in block.chunks_exact_mut(8) {
            // xorshift64: fast, and random enough that nothing on the path compresses it.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let n = remaining.min(block.len() as u64) as usize;
        file.write_all(&block[..n]).unwrap();
        hasher.update(&block[..n]);
        remaining -= n as u64;
    }
    file.flush().unwrap();
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// Hashes a file on disk.
pub fn file_digest(path: &Path) -> String {
    let mut file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path).unwrap());
    let mut hasher = Sha256::new();
    loop {
        let buffer = file.fill_buf().unwrap();
        if buffer.is_empty() {
            break;
        }
        hasher.update(buffer);
        let n = buffer.len();
        file.consume(n);
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// Runs a command, panicking with its output when it fails.
pub fn run(command: &mut Command) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{command:?} failed with {}:\n{stdout}\n{stderr}", output.status);
    stdout
}
pub mod fixtures;
pub mod h2raw;
pub mod browser;
pub mod portal;
pub mod rancher;
pub mod local_server;
pub mod recorder;
pub mod token_service;
pub mod notary_server;
pub mod ops;
pub mod websocket;
