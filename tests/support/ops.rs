//! Operations test helpers: admin endpoint requests, metric lookups in a scrape, raw TLS
//! handshakes, signals, and a certificate directory updated the way the kubelet updates a
//! mounted Secret.

use std::future::Future;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{repo_path, tls_client_config, Gateway};

/// Starts the gateway with the given certificate and key files and `--log-format` value;
/// `body` adds `[upstreams]` and anything else.
pub fn start_gateway_with_tls(cert: &Path, key: &Path, body: &str, log_format: &str) -> Gateway {
    Gateway::start_with(cert, key, body, &["--log-format", log_format])
}

/// Starts the gateway with the test certificate and the given log format.
pub fn start_gateway(body: &str, log_format: &str) -> Gateway {
    start_gateway_with_tls(&repo_path("certs-test/tls.crt"), &repo_path("certs-test/tls.key"), body, log_format)
}

/// `GET path` on the admin listener over plain HTTP/1.1; returns status and body.
pub async fn admin_get(gateway: &Gateway, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", gateway.admin_port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, decode_chunked(body))
}

/// The admin listener sends small bodies with a length, but hyper may choose chunked
/// encoding; this undoes it when the body starts with a chunk size line.
fn decode_chunked(body: &str) -> String {
    let mut rest = body;
    let mut decoded = String::new();
    while let Some((size_line, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size_line.trim(), 16) else {
            return body.to_string();
        };
        if size == 0 {
            return decoded;
        }
        decoded.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    body.to_string()
}

pub async fn scrape(gateway: &Gateway) -> String {
    let (status, text) = admin_get(gateway, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    text
}

/// Returns the value of the series `name` with exactly `labels`, from a text-format scrape.
pub fn metric(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut expected_labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    expected_labels.sort();
    scrape.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((series_name, rest)) => (series_name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            return None;
        }
        let mut found: Vec<String> = series_labels
            .split("\",")
            .filter(|pair| !pair.is_empty())
            .map(|pair| if pair.ends_with('"') { pair.to_string() } else { format!("{pair}\"") })
            .collect();
        found.sort();
        (found == expected_labels).then(|| value.parse().unwrap())
    })
}

/// Scrapes until the series has `expected`, or fails after 10 s with the last scrape.
pub async fn wait_for_metric(gateway: &Gateway, name: &str, labels: &[(&str, &str)], expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(gateway).await;
        let value = metric(&text, name, labels);
        if value == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} is {value:?}, expected {expected}, after 10 s; scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `condition` every 100 ms until it holds, failing with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, description: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {description}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}


/// Opens a fresh TLS connection to the gateway as `localhost`, offering `alpn`.
pub async fn tls_connect(port: u16, trust_test_ca: bool, alpn: &[&[u8]]) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let connector = TlsConnector::from(Arc::new(tls_client_config(trust_test_ca, alpn)));
    connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

/// Returns the DER of the leaf certificate that a fresh handshake gets.
pub async fn served_leaf(port: u16) -> Vec<u8> {
    let stream = tls_connect(port, true, &[b"http/1.1"]).await.unwrap();
    peer_leaf(&stream)
}

pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].as_ref().to_vec()
}

/// Returns the DER of the first certificate in a PEM file.
pub fn leaf_der(path: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path).unwrap().next().unwrap().unwrap().as_ref().to_vec()
}

/// `notAfter` of the first certificate in `path`, in seconds since the epoch, as openssl
/// and date read it.
pub fn openssl_not_after(path: &Path) -> i64 {
    require_program("openssl");
    let output = super::run(Command::new("openssl").args(["x509", "-noout", "-enddate", "-in"]).arg(path));
    let date = output.trim().strip_prefix("notAfter=").expect("openssl prints notAfter=");
    super::run(Command::new("date").args(["-u", "-d", date, "+%s"])).trim().parse().unwrap()
}

pub fn require_program(name: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(found, "{name} is not installed; run scripts/install-deps.sh first");
}

/// Sends `signal` (e.g. "TERM", "HUP") to the gateway process that this test started.
pub fn send_signal(gateway: &Gateway, signal: &str) {
    super::run(Command::new("kill").args(["-s", signal, &gateway.process.pid().to_string()]));
}

/// Waits up to `timeout` for the gateway process to exit.
pub fn wait_for_exit(gateway: &mut Gateway, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = gateway.process.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not exit within {timeout:?}; log:\n{}",
            gateway.process.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A directory laid out like a Kubernetes Secret volume: `tls.crt` and `tls.key` are
/// symlinks through `..data`, which points at a timestamped directory. An update writes a
/// new directory and renames a new `..data` symlink over the old one, as the kubelet does.
pub struct SecretDir {
    pub root: PathBuf,
    version: u32,
}

impl SecretDir {
    pub fn new(root: &Path, cert: &[u8], key: &[u8]) -> SecretDir {
        let mut secret = SecretDir { root: root.to_path_buf(), version: 0 };
        secret.update(cert, key);
        symlink("..data/tls.crt", root.join("tls.crt")).unwrap();
        symlink("..data/tls.key", root.join("tls.key")).unwrap();
        secret
    }

    pub fn cert(&self) -> PathBuf {
        self.root.join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.root.join("tls.key")
    }

    /// Swaps in a new version atomically and removes the old one.
    pub fn update(&mut self, cert: &[u8], key: &[u8]) {
        let old = format!("..version_{}", self.version);
        self.version += 1;
        let new = format!("..version_{}", self.version);
        std::fs::create_dir(self.root.join(&new)).unwrap();
        std::fs::write(self.root.join(&new).join("tls.crt"), cert).unwrap();
        std::fs::write(self.root.join(&new).join("tls.key"), key).unwrap();

        symlink(&new, self.root.join("..data_tmp")).unwrap();
        std::fs::rename(self.root.join("..data_tmp"), self.root.join("..data")).unwrap();
        let _ = std::fs::remove_dir_all(self.root.join(old));
    }
}
