//! The pooled HTTP client that talks to upstreams, over plain HTTP or TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::request_body::ClientBody;
use crate::tls::crypto_provider;

/// Request bodies go upstream frame by frame, counted, failing if the client stalls.
pub type UpstreamBody = ClientBody;
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// Idle pooled connections are closed after this long. Registries and Harbor core keep
/// connections open for longer than this, so the gateway closes first and never sends on a
/// connection that the upstream is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error("cannot read upstream CA file {path}: {source}; check upstream_tls.ca_file")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("upstream CA file {path} has no usable CA certificate: {source}")]
    InvalidCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("upstream CA file {path} contains no CERTIFICATE block")]
    EmptyCa { path: PathBuf },
    #[error("cannot build the upstream TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// Builds `count` clients with the same settings, each with a connection pool of its own.
/// Upstream certificates are verified against the system roots plus, when given, the CAs in
/// `ca_file` (for an https Rancher with its own CA). Each worker thread gets one client, so
/// that a pooled upstream connection, whose task runs on the thread that opened it, is used
/// only from that thread.
pub fn build_clients(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
    count: usize,
) -> Result<Vec<UpstreamClient>, UpstreamTlsError> {
    let mut roots = RootCertStore::empty();
    // Missing or unreadable system roots are not fatal: an https upstream with a private
    // CA works through `ca_file` alone.
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "skipped a system root certificate source");
    }
    roots.add_parsable_certificates(native.certs);

    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|source| UpstreamTlsError::ReadCa { path: path.to_path_buf(), source })?;
        if certs.is_empty() {
            return Err(UpstreamTlsError::EmptyCa { path: path.to_path_buf() });
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|source| UpstreamTlsError::InvalidCa { path: path.to_path_buf(), source })?;
        }
    }

    let tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(UpstreamTlsError::Config)?
        .with_root_certificates(Arc::new(roots))
        .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));

    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);

    let clients = (0..count.max(1))
        .map(|_| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .build(connector.clone())
        })
        .collect();
    Ok(clients)
}
