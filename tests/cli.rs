//! Start-up checks of the binary: bad configuration or certificate files stop it at once
//! with a message that names the file and the fix.

mod support;

use std::process::Command;

use support::*;

fn write_config(dir: &std::path::Path, cert: &str, key: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]\nhttps = \"127.0.0.1:{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[upstreams]\nharbor_core = \"http://127.0.0.1:5000\"\n{extra}",
            free_port(),
            repo_path(cert).display(),
            repo_path(key).display(),
        ),
    )
    .unwrap();
    path
}

/// Runs the gateway binary; returns the exit code and stderr.
fn gateway(args: &[&str], config: &std::path::Path) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_harbor-gateway"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_valid_files() {
    let dir = tempfile::tempdir().unwrap();
    for (cert, key) in [
        ("certs-test/tls.crt", "certs-test/tls.key"),
        ("certs-test/tls.crt", "certs-test/tls-rsa-pkcs1.key"),
        ("certs-test/tls-ec.crt", "certs-test/tls-ec-sec1.key"),
    ] {
        let config = write_config(dir.path(), cert, key, "");
        let (code, stdout, stderr) = gateway(&["check"], &config);
        assert_eq!(code, 0, "{cert} + {key}: {stderr}");
        assert!(stdout.contains("valid"), "{stdout}");
    }
}

#[test]
fn example_config_is_valid() {
    let output = Command::new(env!("CARGO_BIN_EXE_harbor-gateway"))
        .current_dir(repo_path(""))
        .args(["check", "--config", "config/gateway.toml"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn bad_files_fail_with_named_file() {
    let dir = tempfile::tempdir().unwrap();
    // (cert, key, extra config, text the message must contain)
    let cases = [
        ("certs-test/tls.crt", "certs-test/other.key", "", "does not belong to the first certificate"),
        ("certs-test/tls.crt", "certs-test/other.key", "", "other.key"),
        ("certs-test/missing.crt", "certs-test/tls.key", "", "missing.crt"),
        ("certs-test/tls.crt", "certs-test/missing.key", "", "missing.key"),
        ("certs-test/tls.key", "certs-test/tls.key", "", "contains no CERTIFICATE block"),
        ("certs-test/tls.crt", "certs-test/tls.key", "[timeouts]\nidle = 5\n", "unknown field `idle`"),
        ("certs-test/tls.crt", "certs-test/tls.key", "[timeouts]\ndrain = 0\n", "timeouts.drain"),
    ];
    for (cert, key, extra, expected) in cases {
        let config = write_config(dir.path(), cert, key, extra);
        for args in [&["check"][..], &[][..]] {
            let (code, _, stderr) = gateway(args, &config);
            assert_eq!(code, 2, "{args:?} {cert} {key} {extra}: {stderr}");
            assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in {stderr:?}");
        }
    }
}

#[test]
fn busy_port_names_listen_key() {
    let dir = tempfile::tempdir().unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\nhttps = \"127.0.0.1:{port}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            repo_path("certs-test/tls.crt").display(),
            repo_path("certs-test/tls.key").display(),
        ),
    )
    .unwrap();
    let (code, _, stderr) = gateway(&[], &config);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("listen.https"), "{stderr}");
}

#[test]
fn help_documents_options() {
    let output = Command::new(env!("CARGO_BIN_EXE_harbor-gateway")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("--config"), "{help}");
    assert!(help.contains("--log-format"), "{help}");
    assert!(help.contains("check"), "{help}");
}
