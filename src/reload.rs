//! Reload of the configuration, certificate and CA bundle on SIGHUP or when the files change.
//!
//! A reload loads and validates everything first and swaps only when all of it is good:
//! new requests get the new [`Gateway`] (route table, upstream client), new TLS handshakes
//! get the new certificate, and open connections keep running. Anything invalid leaves
//! the previous state in force, is logged with the file at fault, and is counted in
//! `harbor_gateway_reloads_total{result="failure"}`.
//!
//! Files are watched by polling their metadata, following symlinks. Kubernetes updates a
//! mounted Secret or ConfigMap by pointing the `..data` symlink at a new directory, which
//! changes the inode behind `tls.crt`. Polling detects that, works on every file system, and
//! needs no inotify watch on a parent directory that the kubelet replaces.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use tokio::sync::Mutex;

use crate::ca_bundle::load_ca_bundle;
use crate::config::{Config, DEFAULT_WATCH_INTERVAL_SECONDS};
use crate::metrics::Metrics;
use crate::proxy::{error_chain, Gateway};
use crate::server::StartError;
use crate::tls::{leaf_info, load_certified_key, CertificateStore, LeafInfo};

/// The gateway that new requests use; a reload replaces it.
pub type SharedGateway = Arc<ArcSwap<Gateway>>;

/// A certificate closer than this to its `notAfter` is logged as a warning on every load.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Everything loaded and checked from one configuration file.
pub struct Loaded {
    pub config: Config,
    pub key: CertifiedKey,
    pub leaf: LeafInfo,
    pub gateway: Gateway,
}

/// Loads the configuration file and every file it names, and builds a gateway that counts
/// into `metrics`. Nothing is bound or swapped.
pub fn load(config_path: &Path, metrics: Arc<Metrics>) -> Result<Loaded, StartError> {
    let config = Config::load(config_path)?;
    for warning in &config.warnings {
        tracing::warn!(config = %config_path.display(), "{warning}");
    }
    let key = load_certified_key(&config.cert_path, &config.key_path)?;
    let leaf = leaf_info(&config.cert_path, &key)?;
    let ca_bundle = match &config.ca_bundle_path {
        Some(path) => Some(load_ca_bundle(path)?),
        None => None,
    };
    let gateway = Gateway::with_metrics(&config, metrics)?.with_ca_bundle(ca_bundle);
    Ok(Loaded { config, key, leaf, gateway })
}

/// Logs the served certificate and exports its expiry.
pub fn report_certificate(config: &Config, leaf: &LeafInfo, metrics: &Metrics) {
    metrics.set_certificate_expiry(leaf.not_after);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let remaining = leaf.not_after - now;
    if remaining <= 0 {
        tracing::warn!(file = %config.cert_path.display(), subject = %leaf.subject, not_after = %leaf.not_after_text,
            "the served certificate has expired; clients will reject it until tls.cert is renewed");
    } else if remaining < EXPIRY_WARNING.as_secs() as i64 {
        tracing::warn!(file = %config.cert_path.display(), subject = %leaf.subject, not_after = %leaf.not_after_text,
            days_left = remaining / 86_400, "the served certificate expires soon; renew tls.cert");
    } else {
        tracing::info!(file = %config.cert_path.display(), subject = %leaf.subject, not_after = %leaf.not_after_text,
            "certificate loaded");
    }
}

/// Applies reloads, one at a time.
pub struct Reloader {
    config_path: PathBuf,
    metrics: Arc<Metrics>,
    certificates: Arc<CertificateStore>,
    gateway: SharedGateway,
    /// The configuration in force. The lock also keeps two reloads from interleaving.
    current: Mutex<Config>,
    /// The addresses bound at start; a reload cannot move the listeners.
    https_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
}

impl Reloader {
    pub fn new(config: Config, metrics: Arc<Metrics>, certificates: Arc<CertificateStore>, gateway: SharedGateway) -> Reloader {
        Reloader {
            config_path: config.path.clone(),
            https_addr: config.https_addr,
            admin_addr: config.admin_addr,
            current: Mutex::new(config),
            metrics,
            certificates,
            gateway,
        }
    }

    /// Returns a copy of the configuration in force.
    pub async fn current(&self) -> Config {
        self.current.lock().await.clone()
    }

    /// Reloads everything from the configuration file; `trigger` names the cause in logs.
    /// Returns whether the new state is in force.
    pub async fn reload(&self, trigger: &'static str) -> bool {
        let mut current = self.current.lock().await;
        tracing::info!(trigger, config = %self.config_path.display(), "reloading");

        let path = self.config_path.clone();
        let metrics = self.metrics.clone();
        // Building the upstream client reads the system trust store, which can take a
        // while; keep that off the runtime's worker threads.
        let loaded = tokio::task::spawn_blocking(move || load(&path, metrics)).await;
        let loaded = match loaded {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(error)) => {
                tracing::error!(trigger, error = %one_line(&error_chain(&error)),
                    "reload failed; the previous configuration and certificate stay in force");
                self.metrics.reload_finished(false);
                return false;
            }
            Err(error) => {
                tracing::error!(trigger, %error, "reload failed; the previous configuration and certificate stay in force");
                self.metrics.reload_finished(false);
                return false;
            }
        };

        self.warn_about_fixed_settings(&current, &loaded.config);
        let Loaded { config, key, leaf, gateway } = loaded;
        self.certificates.replace(key);
        let routes = gateway.routes().routes().len();
        self.gateway.store(Arc::new(gateway));
        report_certificate(&config, &leaf, &self.metrics);
        *current = config;
        self.metrics.reload_finished(true);
        tracing::info!(trigger, routes, "reload succeeded; new requests and handshakes use the new configuration");
        true
    }

    /// Warns about changed settings that only a restart applies.
    fn warn_about_fixed_settings(&self, old: &Config, new: &Config) {
        if new.https_addr != self.https_addr || new.admin_addr != self.admin_addr {
            tracing::warn!(
                https = %new.https_addr,
                admin = ?new.admin_addr,
                bound_https = %self.https_addr,
                bound_admin = ?self.admin_addr,
                "listen addresses changed in the configuration; they take effect only after a restart"
            );
        }
        if new.timeouts.tls_handshake != old.timeouts.tls_handshake || new.timeouts.header_read != old.timeouts.header_read {
            tracing::warn!("timeouts.tls_handshake and timeouts.header_read changed; they take effect only after a restart");
        }
        if new.worker_threads != old.worker_threads {
            tracing::warn!(
                worker_threads = new.worker_count(),
                running = old.worker_count(),
                "runtime.worker_threads changed; it takes effect only after a restart"
            );
        }
    }

    /// Polls the configuration file and the files it names, and reloads when one changes.
    /// Runs until the process exits.
    pub async fn watch_files(self: Arc<Self>) {
        let (mut paths, mut interval) = self.watched().await;
        let mut seen = fingerprints(&paths);
        loop {
            tokio::time::sleep(interval.unwrap_or(Duration::from_secs(DEFAULT_WATCH_INTERVAL_SECONDS))).await;
            if interval.is_none() {
                // Watching is off; a reload by SIGHUP may turn it on.
                (paths, interval) = self.watched().await;
                seen = fingerprints(&paths);
                continue;
            }

            let now = fingerprints(&paths);
            if now == seen {
                continue;
            }
            let changed: Vec<String> = now
                .iter()
                .zip(&seen)
                .filter(|(a, b)| a != b)
                .map(|((path, _), _)| path.display().to_string())
                .collect();
            tracing::info!(files = ?changed, "watched files changed");
            seen = now;
            self.reload("file change").await;

            let (new_paths, new_interval) = self.watched().await;
            interval = new_interval;
            if new_paths != paths {
                paths = new_paths;
                seen = fingerprints(&paths);
            }
        }
    }

    async fn watched(&self) -> (Vec<PathBuf>, Option<Duration>) {
        let config = self.current.lock().await;
        let mut paths = vec![self.config_path.clone(), config.cert_path.clone(), config.key_path.clone()];
        paths.extend(config.ca_bundle_path.clone());
        (paths, config.watch_interval)
    }
}

/// Joins a multi-line message, such as a TOML parse error with its source excerpt, so
/// that it stays one log line.
fn one_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|line| !line.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Identity of one version of a file: the file behind the symlinks, its size and its
/// modification and change times. `None` while the file is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    device: u64,
    inode: u64,
    size: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

fn fingerprints(paths: &[PathBuf]) -> Vec<(PathBuf, Option<Fingerprint>)> {
    paths
        .iter()
        .map(|path| {
            let fingerprint = std::fs::metadata(path).ok().map(|meta| Fingerprint {
                device: meta.dev(),
                inode: meta.ino(),
                size: meta.size(),
                modified: (meta.mtime(), meta.mtime_nsec()),
                changed: (meta.ctime(), meta.ctime_nsec()),
            });
            (path.clone(), fingerprint)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlink_swap_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("..2025_01");
        let second = dir.path().join("..2025_02");
        std::fs::create_dir(&first).unwrap();
        std::fs::create_dir(&second).unwrap();
        // Same content and size in both versions: only the inode differs.
        std::fs::write(first.join("tls.crt"), "same").unwrap();
        std::fs::write(second.join("tls.crt"), "same").unwrap();
        symlink("..2025_01", dir.path().join("..data")).unwrap();
        symlink("..data/tls.crt", dir.path().join("tls.crt")).unwrap();

        let paths = vec![dir.path().join("tls.crt")];
        let before = fingerprints(&paths);
        assert!(before[0].1.is_some());

        symlink("..2025_02", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert_ne!(fingerprints(&paths), before);
    }

    #[test]
    fn missing_file_has_no_fingerprint() {
        let paths = vec![PathBuf::from("/nonexistent/harbor-gateway/tls.crt")];
        assert_eq!(fingerprints(&paths)[0].1, None);
    }
}
