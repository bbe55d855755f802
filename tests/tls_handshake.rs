//! The downstream TLS handshake: full chain served, ALPN for both HTTP versions, TLS 1.2
//! and 1.3 accepted.

mod support;

use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use support::*;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Handshakes with the gateway and returns the negotiated ALPN protocol, TLS version and
/// number of certificates the server sent.
async fn handshake(
    port: u16,
    alpn: &[&[u8]],
    version: &'static rustls::SupportedProtocolVersion,
) -> (Option<Vec<u8>>, rustls::ProtocolVersion, usize) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    // Unlike the shared client configuration, this one pins a single TLS version.
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();

    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("gateway.test").unwrap(), tcp)
        .await
        .expect("handshake with the gateway");
    let (_, connection) = tls.get_ref();
    (
        connection.alpn_protocol().map(<[u8]>::to_vec),
        connection.protocol_version().unwrap(),
        connection.peer_certificates().map_or(0, <[_]>::len),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn handshake_alpn_versions_and_chain() {
    let gateway = Gateway::start("");
    let tls13 = &rustls::version::TLS13;
    let tls12 = &rustls::version::TLS12;

    let (alpn, version, chain) = handshake(gateway.port, &[b"h2", b"http/1.1"], tls13).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
    assert_eq!(chain, 2, "leaf and intermediate");

    let (alpn, _, _) = handshake(gateway.port, &[b"http/1.1"], tls13).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));

    let (alpn, version, chain) = handshake(gateway.port, &[b"h2"], tls12).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_2);
    assert_eq!(chain, 2, "leaf and intermediate over TLS 1.2");
}

#[test]
fn tls_1_1_is_rejected() {
    // openssl's client is the one at hand that still speaks TLS 1.1 when asked to.
    let gateway = Gateway::start("");
    let output = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{}", gateway.port), "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(!output.status.success(), "TLS 1.1 handshake succeeded:\n{text}");
    // rustls rejects a TLS 1.1 ClientHello with a handshake_failure alert (number 40).
    assert!(text.contains("alert handshake failure"), "{text}");
    assert!(!text.contains("BEGIN CERTIFICATE"), "the server sent its certificate:\n{text}");
}
