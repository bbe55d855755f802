//! Start-up and shutdown: load and check everything, bind the listeners, serve until a
//! signal, then drain.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admin::{serve_admin, Health};
use crate::config::{Config, ConfigError};
use crate::listener::{serve_https, ConnectionSettings};
use crate::proxy::Gateway;
use crate::tls::{load_certified_key, server_config, CertificateStore, TlsError};
use crate::upstream::UpstreamTlsError;

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
    #[error("cannot install the signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// Everything loaded and checked from one configuration file, ready to serve.
pub struct Prepared {
    pub config: Config,
    pub certificates: Arc<CertificateStore>,
    pub gateway: Arc<Gateway>,
}

/// Loads the configuration and certificate files and builds the gateway, without binding
/// any socket. `check` stops here.
pub fn prepare(config_path: &Path) -> Result<Prepared, StartError> {
    let config = Config::load(config_path)?;
    let key = load_certified_key(&config.cert_path, &config.key_path)?;
    let certificates = Arc::new(CertificateStore::new(key));
    let gateway = Arc::new(Gateway::new(&config)?);
    Ok(Prepared { config, certificates, gateway })
}

/// Serves until SIGTERM or SIGINT, then stops accepting, lets in-flight requests finish for
/// up to the drain period, and returns.
pub async fn run(prepared: Prepared) -> Result<(), StartError> {
    let Prepared { config, certificates, gateway } = prepared;
    let acceptor = TlsAcceptor::from(server_config(certificates)?);

    let https = bind("https", config.https_addr).await?;
    let admin = match config.admin_addr {
        Some(addr) => Some(bind("admin", addr).await?),
        None => None,
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;

    let health = Arc::new(Health::default());
    if let Some(admin) = admin {
        tracing::info!(addr = %admin.local_addr().map_err(|source| StartError::Bind { key: "admin", addr: config.https_addr, source })?, "admin listener started");
        tokio::spawn(serve_admin(admin, health.clone()));
    }

    let graceful = Arc::new(GracefulShutdown::new());
    let (stop_accepting, shutdown) = watch::channel(false);
    let settings = ConnectionSettings {
        tls_handshake: config.timeouts.tls_handshake,
        header_read: config.timeouts.header_read,
    };
    tracing::info!(
        addr = %https.local_addr().map_err(|source| StartError::Bind { key: "https", addr: config.https_addr, source })?,
        routes = gateway.routes().routes().len(),
        "https listener started"
    );
    let accept_loop = tokio::spawn(serve_https(
        https,
        acceptor,
        gateway,
        settings,
        graceful.clone(),
        shutdown,
    ));
    health.set_ready(true);

    let signal_name = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    health.set_ready(false);
    let _ = stop_accepting.send(true);
    let _ = accept_loop.await;
    tracing::info!(signal = signal_name, open_connections = graceful.count(), drain = ?config.timeouts.drain, "draining");

    // The accept loop has ended and dropped its handle, so this is the last one.
    let graceful = Arc::into_inner(graceful).expect("the accept loop has ended");
    match tokio::time::timeout(config.timeouts.drain, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections closed; exiting"),
        Err(_) => tracing::warn!(drain = ?config.timeouts.drain, "drain period ended with connections still open; exiting"),
    }
    Ok(())
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}
