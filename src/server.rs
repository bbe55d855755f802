//! Start-up and shutdown: load and check everything, bind the listeners, serve and reload
//! until a signal, then drain.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admin::{serve_admin, AdminState, Health};
use crate::ca_bundle::CaBundleError;
use crate::config::{Config, ConfigError};
use crate::listener::{serve_https, ConnectionSettings};
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::reload::{load, report_certificate, Loaded, Reloader, SharedGateway};
use crate::tls::{server_config, CertificateStore, LeafInfo, TlsError};
use crate::upstream::UpstreamTlsError;
use crate::workers::Workers;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    UpstreamTls(#[from] UpstreamTlsError),
    #[error("cannot listen on {addr} (listen.{key}): {source}; pick a free port or stop the process that holds it")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the address of listener listen.{key}: {source}")]
    LocalAddr {
        key: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    CaBundle(#[from] CaBundleError),
    #[error("cannot install the signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// Everything loaded and checked from one configuration file, ready to serve.
pub struct Prepared {
    pub config: Config,
    pub certificates: Arc<CertificateStore>,
    pub leaf: LeafInfo,
    pub gateway: Arc<Gateway>,
}

/// Loads the configuration and every file it names and builds the gateway, without
/// binding any socket. `check` stops here.
pub fn prepare(config_path: &Path) -> Result<Prepared, StartError> {
    let Loaded { config, key, leaf, gateway } = load(config_path, Arc::new(Metrics::new()))?;
    let certificates = Arc::new(CertificateStore::new(key));
    Ok(Prepared { config, certificates, leaf, gateway: Arc::new(gateway) })
}

/// Serves until SIGTERM or SIGINT, reloading on SIGHUP and on file changes. Client
/// connections run on `workers`; accepting, signals, reloads and the admin listener run on
/// the caller's runtime. After the signal it stops accepting, lets in-flight requests finish
/// for up to the drain period, and returns.
pub async fn run(prepared: Prepared, workers: Arc<Workers>) -> Result<(), StartError> {
    let Prepared { config, certificates, leaf, gateway } = prepared;
    let metrics = gateway.metrics().clone();
    let acceptor = TlsAcceptor::from(server_config(certificates.clone())?);

    let https = bind("https", config.https_addr).await?;
    let admin = match config.admin_addr {
        Some(addr) => Some(bind("admin", addr).await?),
        None => None,
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;
    report_certificate(&config, &leaf, &metrics);

    let gateway: SharedGateway = Arc::new(ArcSwap::new(gateway));
    let health = Arc::new(Health::default());
    if let Some(admin) = admin {
        tracing::info!(addr = %local_addr("admin", &admin)?, "admin listener started: /healthz, /readyz, /metrics");
        let state = Arc::new(AdminState { health: health.clone(), gateway: gateway.clone() });
        tokio::spawn(serve_admin(admin, state));
    }

    let graceful = Arc::new(GracefulShutdown::new());
    let (stop_accepting, shutdown) = watch::channel(false);
    let settings = ConnectionSettings {
        tls_handshake: config.timeouts.tls_handshake,
        header_read: config.timeouts.header_read,
        keep_alive: config.timeouts.keep_alive,
        limits: config.limits.clone(),
    };
    tracing::info!(
        addr = %local_addr("https", &https)?,
        routes = gateway.load().routes().routes().len(),
        worker_threads = workers.len(),
        "https listener started"
    );
    let accept_loop = tokio::spawn(serve_https(
        https,
        acceptor,
        gateway.clone(),
        settings,
        graceful.clone(),
        shutdown,
        workers,
    ));
    health.set_ready(true);

    let reloader = Arc::new(Reloader::new(config, metrics, certificates, gateway));
    let watcher = tokio::spawn(reloader.clone().watch_files());
    let signal_name = loop {
        tokio::select! {
            _ = terminate.recv() => break "SIGTERM",
            _ = interrupt.recv() => break "SIGINT",
            _ = hangup.recv() => {
                reloader.reload("SIGHUP").await;
            }
        }
    };
    watcher.abort();

    // Probes see the drain at once, so Kubernetes stops sending new connections while
    // the open ones finish.
    health.set_draining();
    let _ = stop_accepting.send(true);
    let _ = accept_loop.await;
    let drain = reloader.current().await.timeouts.drain;
    tracing::info!(signal = signal_name, open_connections = graceful.count(), drain_seconds = drain.as_secs(),
        "stopped accepting connections; draining");

    // The accept loop has ended and dropped its handle, so this is the last one.
    let graceful = Arc::into_inner(graceful).expect("the accept loop has ended");
    match tokio::time::timeout(drain, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections closed; exiting"),
        Err(_) => tracing::warn!(drain_seconds = drain.as_secs(), "drain period ended with connections still open; exiting"),
    }
    Ok(())
}

fn local_addr(key: &'static str, listener: &TcpListener) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::LocalAddr { key, source })
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}
