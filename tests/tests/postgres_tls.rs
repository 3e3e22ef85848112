//! TLS on both legs: the agent's psql verifies tollgate's certificate
//! (sslmode=verify-full against the address it dialled), and tollgate
//! verifies PostgreSQL's certificate before presenting its credential.

use std::path::Path;

use tollgate_tests::{pki, postgres, privileged, Postgres, Stack};

/// A CA and one leaf certificate for 127.0.0.1 signed by it, and a
/// second, unrelated CA, made with the openssl command line.
fn make_pki(dir: &Path) {
    pki::self_signed(dir, "ca", "tollgate test CA", &[]);
    pki::openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName = IP:127.0.0.1\n").expect("write ext");
    pki::openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
    // A second, unrelated CA: trusting it must not be enough.
    pki::self_signed(dir, "other", "someone else", &[]);
}

/// PostgreSQL with TLS on; the directory holding its certificate lives as
/// long as the returned guard.
fn tls_postgres(pki: &Path) -> (Postgres, tempfile::TempDir) {
    let guard = tempfile::Builder::new()
        .prefix("tollgate-pg-tls-")
        .tempdir()
        .expect("tempdir");
    let pg_dir = guard.path().to_path_buf();
    for file in ["server.pem", "server.key"] {
        std::fs::copy(pki.join(file), pg_dir.join(file)).expect("copy");
        postgres::give(&pg_dir.join(file)).expect("chown");
    }
    postgres::give(&pg_dir).expect("chown dir");
    std::fs::set_permissions(&pg_dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let cert = pg_dir.join("server.pem").display().to_string();
    let key = pg_dir.join("server.key").display().to_string();
    let postgres = Postgres::start_with(&[
        ("ssl", "on"),
        ("ssl_cert_file", &cert),
        ("ssl_key_file", &key),
    ])
    .expect("start PostgreSQL with TLS");
    (postgres, guard)
}

#[test]
fn both_legs_are_tls_and_verified() {
    if !privileged("both_legs_are_tls_and_verified") {
        return;
    }
    let pki = tempfile::tempdir().expect("tempdir");
    make_pki(pki.path());
    let (postgres, _certs) = tls_postgres(pki.path());
    let target_tls = format!(
        "tls = {{ cert = \"{dir}/server.pem\", key = \"{dir}/server.key\", require = true }}\nupstream_tls = {{ ca_file = \"{dir}/ca.pem\" }}",
        dir = pki.path().display()
    );
    let stack = Stack::start_with(postgres, |config| config.target_extra = target_tls.clone())
        .expect("start the stack");
    let token = stack.idp.token("tls-agent-oid", &[]).expect("token");

    let conn = |mode: &str, root: &str| {
        format!(
            "host=127.0.0.1 port={} user=agent dbname=orders sslmode={mode} sslrootcert={}/{root}",
            stack.postgres.port,
            pki.path().display()
        )
    };
    // The agent verifies tollgate's certificate for the address it dialled;
    // upstream, PostgreSQL sees tollgate's session over TLS too.
    let out = tollgate_tests::AgentCgroup::command(&stack.gateway.config.agent_cgroup, "psql")
        .args(["-X", "-A", "-t", &conn("verify-full", "ca.pem")])
        .args([
            "-c",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ])
        .env("PGPASSWORD", &token)
        .output()
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "t",
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.gateway.log()
    );

    // An agent that trusts another CA refuses tollgate's certificate.
    let out = tollgate_tests::AgentCgroup::command(&stack.gateway.config.agent_cgroup, "psql")
        .args([
            "-X",
            "-A",
            "-t",
            &conn("verify-full", "other.pem"),
            "-c",
            "SELECT 1",
        ])
        .env("PGPASSWORD", &token)
        .output()
        .expect("psql");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("certificate verify failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // TLS is required on this target: a plain connection is refused.
    let out = tollgate_tests::AgentCgroup::command(&stack.gateway.config.agent_cgroup, "psql")
        .args(["-X", "-A", "-t"])
        .arg(format!(
            "host=127.0.0.1 port={} user=agent dbname=orders sslmode=disable",
            stack.postgres.port
        ))
        .args(["-c", "SELECT 1"])
        .env("PGPASSWORD", &token)
        .output()
        .expect("psql");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("requires TLS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The refused plain connection is on record, with its process.
    let refused = stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' AND status_detail LIKE 'tls_required:%'",
            1,
            std::time::Duration::from_secs(30),
        )
        .expect("the refusal's row");
    assert_eq!(refused[0]["database_name"], "orders", "{}", refused[0]);
    assert_eq!(refused[0]["actor_process_name"], "psql", "{}", refused[0]);

    // Bytes that are no TLS record, once TLS is up: refused, and on
    // record like any malformed startup.
    let garbage = format!(
        r#"
import os, socket, ssl, struct, time
s = socket.create_connection(("127.0.0.1", {port}), timeout=10)
s.sendall(struct.pack("!ii", 8, 80877103))
assert s.recv(1) == b"S"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
os.write(t.fileno(), b"not a TLS record\n" * 8)
time.sleep(1)
"#,
        port = stack.postgres.port
    );
    let out = tollgate_tests::AgentCgroup::command(
        &stack.gateway.config.agent_cgroup,
        &tollgate_tests::duckdb::python(),
    )
    .args(["-c", &garbage])
    .output()
    .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' AND status_detail LIKE '%unreadable TLS record%'",
            1,
            std::time::Duration::from_secs(30),
        )
        .expect("the unreadable record's refusal");
    assert!(
        refused[0]["actor_process_name"]
            .as_str()
            .is_some_and(|name| name.starts_with("python")),
        "{}",
        refused[0]
    );
}

#[test]
fn an_upstream_certificate_from_an_untrusted_ca_is_refused() {
    if !privileged("an_upstream_certificate_from_an_untrusted_ca_is_refused") {
        return;
    }
    let pki = tempfile::tempdir().expect("tempdir");
    make_pki(pki.path());
    let (postgres, _certs) = tls_postgres(pki.path());
    let target_tls = format!(
        "upstream_tls = {{ ca_file = \"{}/other.pem\" }}",
        pki.path().display()
    );
    let stack = Stack::start_with(postgres, |config| config.target_extra = target_tls.clone())
        .expect("start the stack");
    let token = stack.idp.token("tls-agent-oid", &[]).expect("token");
    let out = stack.agent_psql(&token, "SELECT 1").output().expect("psql");
    assert!(!out.status.success(), "tollgate used an unverified server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TLS to the target"), "{stderr}");
}
