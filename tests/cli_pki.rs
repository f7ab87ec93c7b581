//! `vkmigrate pki init` and `pki issue`: the files, their modes, refusals with a clear
//! message, and that the issued identity loads and is signed by the CA.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn vkm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vkmigrate"))
        .args(args)
        .env_remove("VKMIGRATE_STATE_DIR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("vkmigrate runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn init_writes_a_ca_and_refuses_to_overwrite_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = tmp.path().join("fleet-ca");
    let out = vkm(&["pki", "init", "--ca-dir", s(&ca)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(mode(&ca.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&ca), 0o700);
    let cert = std::fs::read_to_string(ca.join("ca.pem")).expect("ca.pem");
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
    let key_before = std::fs::read(ca.join("ca-key.pem")).expect("key");

    let again = vkm(&["pki", "init", "--ca-dir", s(&ca)]);
    assert_eq!(again.status.code(), Some(1));
    let err = text(&again.stderr);
    assert!(
        err.contains("already holds a CA") && err.contains("ca.pem"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(ca.join("ca-key.pem")).expect("key"),
        key_before,
        "the old key is untouched"
    );
}

#[test]
fn issue_writes_a_host_identity_signed_by_the_ca() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = tmp.path().join("ca");
    let tls = tmp.path().join("etc/tls");
    assert!(vkm(&["pki", "init", "--ca-dir", s(&ca)]).status.success());
    let out = vkm(&[
        "pki",
        "issue",
        "--ca-dir",
        s(&ca),
        "--name",
        "hostB",
        "--ip",
        "198.18.0.2",
        "--dns",
        "hostb.lan",
        "--out",
        s(&tls),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("DNS:hostB") && stdout.contains("IP:198.18.0.2"),
        "{stdout}"
    );
    assert_eq!(mode(&tls.join("key.pem")), 0o600);
    assert_eq!(mode(&tls), 0o700);
    assert_eq!(
        std::fs::read(tls.join("ca.pem")).expect("ca copy"),
        std::fs::read(ca.join("ca.pem")).expect("ca")
    );
    // Loads: the certificate chains to ca.pem and matches key.pem.
    vkm_transport::TlsDir::load(&tls).expect("a usable TLS dir");

    // No silent replacement; --force replaces.
    let key_before = std::fs::read(tls.join("key.pem")).expect("key");
    let again = vkm(&[
        "pki",
        "issue",
        "--ca-dir",
        s(&ca),
        "--name",
        "hostB",
        "--out",
        s(&tls),
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(std::fs::read(tls.join("key.pem")).expect("key"), key_before);
    let forced = vkm(&[
        "pki",
        "issue",
        "--ca-dir",
        s(&ca),
        "--name",
        "hostB",
        "--out",
        s(&tls),
        "--force",
    ]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert_ne!(std::fs::read(tls.join("key.pem")).expect("key"), key_before);
    assert_eq!(mode(&tls.join("key.pem")), 0o600);
    vkm_transport::TlsDir::load(&tls).expect("still usable");
}

#[test]
fn issue_without_a_ca_names_the_file_and_the_fix() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = tmp.path().join("no-ca");
    let out = vkm(&[
        "pki",
        "issue",
        "--ca-dir",
        s(&ca),
        "--name",
        "h",
        "--out",
        s(&tmp.path().join("o")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("ca.pem") && err.contains("vkmigrate pki init --ca-dir"),
        "{err}"
    );
    assert!(!tmp.path().join("o").exists(), "nothing written");
}

#[test]
fn issue_refuses_a_bad_host_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = tmp.path().join("ca");
    assert!(vkm(&["pki", "init", "--ca-dir", s(&ca)]).status.success());
    let out = vkm(&[
        "pki",
        "issue",
        "--ca-dir",
        s(&ca),
        "--name",
        "bad name é",
        "--out",
        s(&tmp.path().join("o")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Invalid host name"),
        "{}",
        text(&out.stderr)
    );
}
