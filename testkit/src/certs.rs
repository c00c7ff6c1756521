//! Certificates for TLS tests, made by the `openssl` command (Debian's `openssl`, which
//! `make test` installs): a CA and leaves it signs, ECDSA P-256, valid for days.

use std::path::Path;
use std::process::Command;

/// Runs `openssl args` in `dir`; fails the test with openssl's message.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl: run `make test`, which installs it");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA in `dir`: `ca.crt`, `ca.key`, valid 30 days.
pub fn ca(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=viking test CA",
        ],
    );
}

/// A leaf `<file>.crt`/`<file>.key` in `dir` for the DNS `names`, signed by its CA (see
/// [`ca`]), valid `days`.
pub fn leaf(dir: &Path, file: &str, names: &[&str], days: u32) {
    let san = names
        .iter()
        .map(|n| format!("DNS:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let (key, csr, crt, ext) = (
        format!("{file}.key"),
        format!("{file}.csr"),
        format!("{file}.crt"),
        format!("{file}.ext"),
    );
    std::fs::write(dir.join(&ext), format!("subjectAltName={san}\n")).expect("write ext");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={}", names[0]),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            &days.to_string(),
            "-extfile",
            &ext,
        ],
    );
}
