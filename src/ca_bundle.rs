//! The CA bundle that the gateway can serve at `/registry/ca.crt`: Rancher's
//! `cacerts.pem`, for node set-up scripts that fill `/etc/docker/certs.d/<host>/ca.crt`.

use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// A CA bundle contains a handful of certificates, so anything larger is the wrong file.
const MAX_BUNDLE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CaBundleError {
    #[error("cannot read CA bundle {path}: {source}; check that tls.ca_bundle names a readable PEM file")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA bundle {path} is larger than {MAX_BUNDLE_BYTES} bytes; tls.ca_bundle must name a PEM file of CA certificates")]
    TooLarge { path: PathBuf },
    #[error("CA bundle {path} is not valid PEM: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA bundle {path} contains no CERTIFICATE block; tls.ca_bundle must name a PEM file of CA certificates")]
    Empty { path: PathBuf },
}

/// Reads the bundle at `path` and checks that it is PEM with at least one certificate.
/// The bytes are served exactly as read.
pub fn load_ca_bundle(path: &Path) -> Result<Bytes, CaBundleError> {
    let read_error = |source| CaBundleError::Read { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut data = Vec::new();
    file.take(MAX_BUNDLE_BYTES + 1).read_to_end(&mut data).map_err(read_error)?;
    if data.len() as u64 > MAX_BUNDLE_BYTES {
        return Err(CaBundleError::TooLarge { path: path.to_path_buf() });
    }

    let certificates = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CaBundleError::Invalid { path: path.to_path_buf(), source })?;
    if certificates.is_empty() {
        return Err(CaBundleError::Empty { path: path.to_path_buf() });
    }
    Ok(Bytes::from(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-test").join(name)
    }

    #[test]
    fn bundle_is_served_as_read() {
        let bundle = load_ca_bundle(&certs("ca.crt")).unwrap();
        assert_eq!(&bundle[..], &std::fs::read(certs("ca.crt")).unwrap()[..]);
    }

    #[test]
    fn key_file_is_rejected() {
        let error = load_ca_bundle(&certs("tls.key")).unwrap_err();
        assert!(matches!(error, CaBundleError::Empty { .. }), "{error}");
    }

    #[test]
    fn missing_file_names_the_file() {
        let error = load_ca_bundle(&certs("absent.pem")).unwrap_err();
        assert!(error.to_string().contains("absent.pem"), "{error}");
    }
}
