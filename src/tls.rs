//! TLS for the downstream listener: the Rancher certificate chain and key, read from PEM
//! files, served with ALPN `h2` and `http/1.1` over TLS 1.2 and 1.3.
//!
//! The certified key sits behind [`CertificateStore`] so that a reload swaps it for new
//! handshakes while connections that are already open keep the key they started with.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {path}: {source}; check that tls.cert names a readable PEM file")]
    ReadCert {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("certificate file {path} contains no CERTIFICATE block; it must be a PEM chain, leaf first")]
    NoCertificate { path: PathBuf },
    #[error("cannot read private key file {path}: {source}; check that tls.key names a readable PEM file")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("private key file {path} contains no PRIVATE KEY block; tls.key must name the PEM key of the leaf certificate")]
    NoKey { path: PathBuf },
    #[error("private key file {path} is not usable: {source}; use an RSA, ECDSA or Ed25519 key in PKCS#8, PKCS#1 or SEC1 PEM form")]
    UnsupportedKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("private key file {key} does not belong to the first certificate in {cert}; give the key of the leaf certificate")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("certificate file {path} is not valid: {source}")]
    InvalidCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error("the first certificate in {path} is not valid X.509: {message}")]
    UnparsableCertificate { path: PathBuf, message: String },
}

/// Loads the chain and key from `cert_path` and `key_path` and checks that they belong together.
pub fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCert {
            path: cert_path.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    }

    // `from_pem_file` takes the first PKCS#8, PKCS#1 or SEC1 key block in the file.
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path: key_path.to_path_buf() },
        source => TlsError::ReadKey { path: key_path.to_path_buf(), source },
    })?;

    let provider = crypto_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::UnsupportedKey {
            path: key_path.to_path_buf(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            })
        }
        // The provider could not derive a public key to compare; the handshake will
        // still fail if the pair does not match.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(source) => Err(TlsError::InvalidCertificate {
            path: cert_path.to_path_buf(),
            source,
        }),
    }
}

/// The facts about a leaf certificate that logs and metrics report.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    pub subject: String,
    /// `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
    /// `notAfter` as the certificate states it, e.g. `Jan 17 10:00:00 2125 +00:00`.
    pub not_after_text: String,
}

/// Reads subject and validity of the leaf certificate of `key`, loaded from `cert_path`.
pub fn leaf_info(cert_path: &Path, key: &CertifiedKey) -> Result<LeafInfo, TlsError> {
    let leaf = key.end_entity_cert().map_err(|source| TlsError::InvalidCertificate {
        path: cert_path.to_path_buf(),
        source,
    })?;
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|error| {
        TlsError::UnparsableCertificate {
            path: cert_path.to_path_buf(),
            message: error.to_string(),
        }
    })?;
    let not_after = certificate.validity().not_after;
    Ok(LeafInfo {
        subject: certificate.subject().to_string(),
        not_after: not_after.timestamp(),
        not_after_text: not_after.to_string(),
    })
}

pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certified key currently served, swappable at run time.
pub struct CertificateStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertificateStore {
    pub fn new(key: CertifiedKey) -> Self {
        Self {
            current: RwLock::new(Arc::new(key)),
        }
    }

    /// Replaces the served key; handshakes that start after this call use the new one.
    pub fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateStore").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Builds the server configuration: TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`.
pub fn server_config(store: Arc<CertificateStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-test").join(name)
    }

    #[test]
    fn loads_every_key_format() {
        for (cert, key) in [
            ("tls.crt", "tls.key"),
            ("tls.crt", "tls-rsa-pkcs1.key"),
            ("tls-ec.crt", "tls-ec-sec1.key"),
        ] {
            let loaded = load_certified_key(&certs(cert), &certs(key))
                .unwrap_or_else(|e| panic!("{cert} + {key}: {e}"));
            assert_eq!(loaded.cert.len(), 2, "{cert} should hold leaf and intermediate");
        }
    }

    #[test]
    fn leaf_info_reads_not_after() {
        let key = load_certified_key(&certs("tls.crt"), &certs("tls.key")).unwrap();
        let info = leaf_info(&certs("tls.crt"), &key).unwrap();
        assert_eq!(info.subject, "CN=gateway.test");
        // The test PKI is valid for 36500 days from its creation in 2025 or later.
        assert!(info.not_after > 4_000_000_000, "{info:?}");
    }

    #[test]
    fn mismatched_key_names_both_files() {
        let error = load_certified_key(&certs("tls.crt"), &certs("other.key")).unwrap_err();
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains("other.key"), "{message}");
        assert!(message.contains("tls.crt"), "{message}");
    }

    #[test]
    fn missing_file_names_the_file() {
        let error = load_certified_key(&certs("absent.crt"), &certs("tls.key")).unwrap_err();
        assert!(error.to_string().contains("absent.crt"), "{error}");

        let error = load_certified_key(&certs("tls.crt"), &certs("absent.key")).unwrap_err();
        assert!(error.to_string().contains("absent.key"), "{error}");
    }

    #[test]
    fn key_file_as_certificate_is_rejected() {
        let error = load_certified_key(&certs("tls.key"), &certs("tls.key")).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
    }

    #[test]
    fn certificate_file_as_key_is_rejected() {
        let error = load_certified_key(&certs("tls.crt"), &certs("tls.crt")).unwrap_err();
        assert!(matches!(error, TlsError::NoKey { .. }), "{error}");
        assert!(error.to_string().contains("tls.crt"), "{error}");
    }
}
