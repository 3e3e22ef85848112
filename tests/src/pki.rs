//! Test certificates, made with the openssl command line: EC P-256 keys,
//! two days of validity, for 127.0.0.1.

use std::{path::Path, process::Command};

/// Runs `openssl ARGS` in `dir`; panics with its stderr if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed certificate `<stem>.pem` and its key `<stem>.key` in `dir`,
/// with subject `/CN=<common_name>` and `extensions` (`-addext` values).
pub fn self_signed(dir: &Path, stem: &str, common_name: &str, extensions: &[&str]) {
    let (key, cert) = (format!("{stem}.key"), format!("{stem}.pem"));
    let subject = format!("/CN={common_name}");
    let mut args = vec![
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &subject,
        "-keyout",
        &key,
        "-out",
        &cert,
    ];
    for extension in extensions {
        args.extend(["-addext", extension]);
    }
    openssl(dir, &args);
}

/// A self-signed leaf certificate for 127.0.0.1 (`<stem>.pem`,
/// `<stem>.key`): not a CA, so rustls takes it as its own trust anchor.
pub fn self_signed_leaf(dir: &Path, stem: &str) {
    self_signed(
        dir,
        stem,
        "127.0.0.1",
        &[
            "basicConstraints=critical,CA:FALSE",
            "subjectAltName=IP:127.0.0.1",
        ],
    );
}
