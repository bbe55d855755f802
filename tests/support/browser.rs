//! Headless Debian `chromium`, driven over the Chrome DevTools Protocol (CDP) with a small
//! client on tokio-tungstenite: one page, its network events, JavaScript evaluation and
//! screenshots.
//!
//! The browser resolves `gateway.test` to 127.0.0.1 and trusts exactly the gateway's test
//! key: `--ignore-certificate-errors-spki-list` pins the SHA-256 of the leaf certificate's
//! public key, so any other certificate still fails. Importing certs-test/ca.crt into an
//! NSS database would need `certutil` (libnss3-tools) and a fake home directory.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::{repo_path, Process};

/// Any single CDP command; page loads and polling loops have their own limits.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

pub struct Browser {
    process: Process,
    _profile: tempfile::TempDir,
    outgoing: mpsc::UnboundedSender<Message>,
    pending: Pending,
    next_id: AtomicU64,
    /// Every CDP event, in arrival order.
    pub events: Arc<Mutex<Vec<Value>>>,
}

fn require_chromium() {
    let found = Command::new("sh")
        .args(["-c", "command -v chromium"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(found, "chromium is not installed; run scripts/install-deps.sh first");
}

/// Base64 SHA-256 of the leaf certificate's SubjectPublicKeyInfo, as Chromium's SPKI
/// allow-list expects it.
fn leaf_spki_hash() -> String {
    let script = format!(
        "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
        repo_path("certs-test/tls.crt").display()
    );
    let output = Command::new("sh").args(["-c", &script]).output().expect("run openssl; run scripts/install-deps.sh");
    assert!(output.status.success(), "openssl failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

impl Browser {
    /// Starts chromium with `host` mapped to 127.0.0.1 and connects to its DevTools socket.
    pub async fn launch(host: &str) -> Browser {
        require_chromium();
        let profile = tempfile::tempdir().unwrap();
        let log = profile.path().join("chromium.log");
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--window-size=1280,800",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().join("profile").display()))
            .arg(format!("--host-resolver-rules=MAP {host} 127.0.0.1"))
            .arg(format!("--ignore-certificate-errors-spki-list={}", leaf_spki_hash()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium; run scripts/install-deps.sh");

        // Chromium prints the DevTools address on stderr; the rest of stderr goes to the log.
        let stderr = child.stderr.take().unwrap();
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let log_path = log.clone();
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(&log_path).unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = address_tx.send(url.trim().to_string());
                }
                let _ = std::io::Write::write_all(&mut log, format!("{line}\n").as_bytes());
            }
        });
        let process = Process { child, log };
        let url = tokio::task::spawn_blocking(move || address_rx.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .unwrap_or_else(|_| panic!("chromium printed no DevTools address in 30 s; log:\n{}", process.log_text()));

        let (socket, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect to chromium DevTools");
        let (mut sink, mut stream) = socket.split();
        let (outgoing, mut outgoing_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(message) = outgoing_rx.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
        });

        let pending = Pending::default();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (pending_reader, events_reader) = (pending.clone(), events.clone());
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Message::Text(text) = message else { continue };
                let Ok(value) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                match value.get("id").and_then(Value::as_u64) {
                    Some(id) => {
                        if let Some(reply) = pending_reader.lock().unwrap().remove(&id) {
                            let _ = reply.send(value);
                        }
                    }
                    None => events_reader.lock().unwrap().push(value),
                }
            }
        });

        Browser { process, _profile: profile, outgoing, pending, next_id: AtomicU64::new(1), events }
    }

    /// Sends one CDP command, to the browser or to a page session, and returns its result.
    pub async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, reply_tx);
        self.outgoing.send(Message::text(command.to_string())).expect("DevTools connection open");
        let reply = tokio::time::timeout(COMMAND_TIMEOUT, reply_rx)
            .await
            .unwrap_or_else(|_| panic!("{method}: no reply from chromium in 30 s; log:\n{}", self.process.log_text()))
            .expect("DevTools connection closed");
        if let Some(error) = reply.get("error") {
            panic!("{method} failed: {error}");
        }
        reply["result"].clone()
    }

    /// Opens a new page and returns its session id, with network and page events on.
    pub async fn new_page(&self) -> String {
        let target = self.call(None, "Target.createTarget", json!({ "url": "about:blank" })).await;
        let attached = self
            .call(None, "Target.attachToTarget", json!({ "targetId": target["targetId"], "flatten": true }))
            .await;
        let session = attached["sessionId"].as_str().unwrap().to_string();
        self.call(Some(&session), "Network.enable", json!({})).await;
        self.call(Some(&session), "Page.enable", json!({})).await;
        self.call(Some(&session), "Network.setCacheDisabled", json!({ "cacheDisabled": true })).await;
        session
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub async fn evaluate(&self, session: &str, expression: &str) -> Value {
        let result = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it returns true; panics with `describe`'s value on timeout.
    pub async fn wait_for(&self, session: &str, expression: &str, describe: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.evaluate(session, expression).await == json!(true) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let state = self.evaluate(session, describe).await;
                panic!("{expression} not true after {timeout:?}; page state: {state}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG screenshot of the page to `path`.
    pub async fn screenshot(&self, session: &str, path: &Path) {
        use base64::Engine;
        let shot = self.call(Some(session), "Page.captureScreenshot", json!({ "format": "png" })).await;
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Responses the page received: `(url, status, request id)`, in arrival order.
    pub fn responses(&self) -> Vec<(String, u64, String)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|event| event["method"] == "Network.responseReceived")
            .map(|event| {
                let params = &event["params"];
                (
                    params["response"]["url"].as_str().unwrap_or("").to_string(),
                    params["response"]["status"].as_u64().unwrap_or(0),
                    params["requestId"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Redirects the page followed: `(url, status, Location)`.
    pub fn redirects(&self) -> Vec<(String, u64, String)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|event| event["method"] == "Network.requestWillBeSent")
            .filter_map(|event| {
                let redirect = event["params"].get("redirectResponse")?;
                Some((
                    redirect["url"].as_str().unwrap_or("").to_string(),
                    redirect["status"].as_u64().unwrap_or(0),
                    redirect["headers"]["location"].as_str().or(redirect["headers"]["Location"].as_str()).unwrap_or("").to_string(),
                ))
            })
            .collect()
    }

    /// Requests that failed at the network level: `(url, Chromium's error text)`.
    pub fn failures(&self) -> Vec<(String, String)> {
        let events = self.events.lock().unwrap();
        let url_of = |id: &serde_json::Value| {
            events
                .iter()
                .filter(|event| event["method"] == "Network.requestWillBeSent" && event["params"]["requestId"] == *id)
                .filter_map(|event| event["params"]["request"]["url"].as_str())
                .last()
                .unwrap_or("?")
                .to_string()
        };
        events
            .iter()
            .filter(|event| event["method"] == "Network.loadingFailed")
            .map(|event| {
                let params = &event["params"];
                (url_of(&params["requestId"]), params["errorText"].as_str().unwrap_or("").to_string())
            })
            .collect()
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}
