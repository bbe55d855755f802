//! The real notary-server (Debian's `notary` package) on a loopback port, with in-memory
//! storage, the local signing service instead of notary-signer, and token authentication
//! against a [`TokenService`].

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use super::token_service::{TokenService, ISSUER, NOTARY_SERVICE};
use super::{free_port, require_program, wait_for_port, Process};

pub struct NotaryServer {
    pub addr: SocketAddr,
    pub process: Process,
    _dir: tempfile::TempDir,
}

impl NotaryServer {
    pub fn start(tokens: &TokenService) -> NotaryServer {
        require_program("notary-server");
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        // Without TLS files notary-server serves plain HTTP, as Harbor runs it behind its
        // own proxy. The local trust service keeps signing keys in memory, which is
        // enough for one server process.
        let config = serde_json::json!({
            "server": {"http_addr": addr.to_string()},
            "trust_service": {"type": "local"},
            "storage": {"backend": "memory"},
            "logging": {"level": "info"},
            "auth": {
                "type": "token",
                "options": {
                    "realm": tokens.realm(),
                    "service": NOTARY_SERVICE,
                    "issuer": ISSUER,
                    "rootcertbundle": tokens.cert_path,
                },
            },
        });
        let config_path = dir.path().join("server.json");
        std::fs::write(&config_path, config.to_string()).unwrap();

        let log = dir.path().join("notary-server.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut child = Command::new("notary-server")
            .arg("-config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start notary-server");
        wait_for_port(addr, &mut child, &log);
        NotaryServer {
            addr,
            process: Process { child, log },
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Collects the request URIs from notary-server's own log, which records
    /// `http.request.uri` for every request that reaches its handlers. Redirects made by its
    /// router are not logged.
    pub fn logged_request_uris(&self) -> Vec<String> {
        self.process
            .log_text()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|entry| entry["http.request.uri"].as_str().map(str::to_string))
            .collect()
    }
}
