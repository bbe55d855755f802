//! skopeo, a real Docker registry client, pushes a multi-layer image with a 1 GiB layer
//! through the gateway into the real registry and pulls it back out.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

const LARGE_LAYER_BYTES: u64 = 1 << 30;

/// Writes an image in skopeo's `dir:` layout: one file per blob named by its hex digest,
/// `manifest.json` and `version`. Returns the digests of every blob.
fn write_image(dir: &Path) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("version"), "Directory Transport Version: 1.1\n").unwrap();

    let mut layers = Vec::new();
    for (index, size) in [4096u64, 1 << 20, 3 << 20, LARGE_LAYER_BYTES].into_iter().enumerate() {
        let temp = dir.join(format!("layer-{index}.tmp"));
        let digest = write_random_file(&temp, size, 0x5eed + index as u64);
        std::fs::rename(&temp, dir.join(digest.trim_start_matches("sha256:"))).unwrap();
        layers.push((digest, size));
    }

    let diff_ids: Vec<String> = layers.iter().map(|(d, _)| format!("\"{d}\"")).collect();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    let config_digest = sha256_digest(config.as_bytes());
    std::fs::write(dir.join(config_digest.trim_start_matches("sha256:")), &config).unwrap();

    let layer_entries: Vec<String> = layers
        .iter()
        .map(|(digest, size)| {
            format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{digest}","size":{size}}}"#)
        })
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
        config.len(),
        layer_entries.join(",")
    );
    std::fs::write(dir.join("manifest.json"), &manifest).unwrap();

    let mut digests: Vec<String> = layers.into_iter().map(|(d, _)| d).collect();
    digests.push(config_digest);
    digests.push(sha256_digest(manifest.as_bytes()));
    digests
}

#[test]
fn skopeo_round_trips_image() {
    let skopeo_found = Command::new("skopeo").arg("--version").output().is_ok();
    assert!(skopeo_found, "skopeo is not installed; run scripts/install-deps.sh first");

    let registry = Registry::start();
    let gateway = Gateway::in_front_of(&registry);
    let work = tempfile::tempdir().unwrap();

    // skopeo trusts the CA files in a certificate directory.
    let cert_dir = work.path().join("certs");
    std::fs::create_dir_all(&cert_dir).unwrap();
    std::fs::copy(ca_file(), cert_dir.join("ca.crt")).unwrap();

    let source = work.path().join("source");
    let digests = write_image(&source);
    let image = format!("docker://localhost:{}/library/big:v1", gateway.port);

    run(Command::new("skopeo")
        .args(["copy", "--preserve-digests", "--dest-cert-dir"])
        .arg(&cert_dir)
        .arg(format!("dir:{}", source.display()))
        .arg(&image));

    let pulled = work.path().join("pulled");
    run(Command::new("skopeo")
        .args(["copy", "--preserve-digests", "--src-cert-dir"])
        .arg(&cert_dir)
        .arg(&image)
        .arg(format!("dir:{}", pulled.display())));

    // Every blob came back under its digest, with content that hashes to it.
    let (manifest_digest, blob_digests) = digests.split_last().unwrap();
    for digest in blob_digests {
        let path = pulled.join(digest.trim_start_matches("sha256:"));
        assert!(path.exists(), "blob {digest} missing after pull");
        assert_eq!(&file_digest(&path), digest, "pulled blob content");
    }
    assert_eq!(&file_digest(&pulled.join("manifest.json")), manifest_digest);
    let large = pulled.join(blob_digests[3].trim_start_matches("sha256:"));
    assert_eq!(std::fs::metadata(large).unwrap().len(), LARGE_LAYER_BYTES);

    // skopeo's own view of the pushed image through the gateway agrees.
    let inspect = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--cert-dir"])
        .arg(&cert_dir)
        .arg(&image));
    assert_eq!(&sha256_digest(inspect.as_bytes()), manifest_digest);
}
