//! Every forged or malformed token of the identity suite, replayed over the
//! wire through the PostgreSQL adapter: each is refused with SQLSTATE 28000
//! and its reason, and each refusal is an Authentication row in the audit.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use bytes::{BufMut, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::wire;
use crate::{
    audit::{self, record, AuditLog},
    config::{CredentialConfig, Protocol, TargetConfig},
    identity::{forged_tests::forged_cases, tests::file_config, Verifier},
    policy::Policy,
    proxy::{self, Shared},
};

/// A protocol 3.0 StartupMessage for user agent, database orders.
fn startup_packet() -> BytesMut {
    let mut startup = BytesMut::new();
    startup.put_i32(0);
    startup.put_i32(wire::PROTOCOL_3_0);
    startup.put_slice(b"user\0agent\0database\0orders\0\0");
    let len = startup.len() as i32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    startup
}

/// Logs in with `token` as the password; returns the ErrorResponse's
/// SQLSTATE and message (or "ok" when authentication succeeded).
async fn login(addr: SocketAddr, token: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let startup = startup_packet();
    stream.write_all(&startup).await.expect("startup");
    let mut buf = BytesMut::new();
    let frame = wire::read_frame(&mut stream, &mut buf)
        .await
        .expect("auth request");
    assert_eq!(frame.tag, b'R');
    let mut password = BytesMut::new();
    password.put_u8(b'p');
    password.put_i32((4 + token.len() + 1) as i32);
    password.put_slice(token.as_bytes());
    password.put_u8(0);
    stream.write_all(&password).await.expect("password");
    let frame = wire::read_frame(&mut stream, &mut buf)
        .await
        .expect("answer");
    if frame.tag != b'E' {
        return ("ok".into(), String::new());
    }
    let answer = wire::error_fields(&frame);
    // The connection is closed after a FATAL error.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    answer
}

/// A tollgate PostgreSQL listener for an identity config of the forged
/// table, with a target that is never reached.
async fn listen(
    keys: &std::path::Path,
    config: &str,
    audit: &AuditLog,
) -> (SocketAddr, Arc<Shared>) {
    let verifier = Verifier::from_config(&file_config(keys, config))
        .await
        .expect("verifier");
    let shared = Arc::new(Shared {
        verifier,
        policy: Policy::default(),
        audit: audit.clone(),
        pinning: None,
        postgres_cancel_keys: Default::default(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let target = Arc::new(
        proxy::Target::new(TargetConfig {
            name: "orders-db".into(),
            protocol: Protocol::Postgres,
            // Never reached: every login here must fail before it.
            address: "127.0.0.1:1".parse().expect("addr"),
            listen: addr,
            credential: CredentialConfig {
                user: "gateway".into(),
                password: None,
                password_file: None,
            },
            tls: None,
            upstream_tls: None,
        })
        .expect("target"),
    );
    tokio::spawn(proxy::serve(target, listener, shared.clone()));
    (addr, shared)
}

/// One listener with the first identity config of the forged table: the
/// key and audit directories (kept alive), the audit log, the address.
async fn one_listener() -> (tempfile::TempDir, tempfile::TempDir, AuditLog, SocketAddr) {
    let keys = tempfile::tempdir().expect("tempdir");
    let (_, cases) = forged_cases(keys.path());
    let audit_dir = tempfile::tempdir().expect("tempdir");
    let audit = AuditLog::open(&audit::tests::config(audit_dir.path()))
        .await
        .expect("audit");
    let (addr, _shared) = listen(keys.path(), cases[0].config, &audit).await;
    (keys, audit_dir, audit, addr)
}

/// The refusal rows of the audit under `dir` whose detail contains `text`.
fn refusals_saying(dir: &std::path::Path, text: &str) -> Vec<record::AuditRecord> {
    audit::tests::read_segments(&dir.join("audit"))
        .into_iter()
        .filter(|r| r.phase == "refusal" && r.status_detail.contains(text))
        .collect()
}

/// Reads up to the end of the connection; the first ErrorResponse's
/// SQLSTATE and message, if any.
async fn first_error(stream: &mut TcpStream) -> Option<(String, String)> {
    let mut buf = BytesMut::new();
    loop {
        match wire::read_frame(stream, &mut buf).await {
            Ok(frame) if frame.tag == b'E' => return Some(wire::error_fields(&frame)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

// Time is paused: the runtime jumps to the next timer whenever every task
// waits, so the 60 seconds pass at once and are measured on tokio's clock.
#[tokio::test(start_paused = true)]
async fn a_client_that_stalls_during_startup_is_cut_off_and_others_are_served() {
    let (_keys, audit_dir, audit, addr) = one_listener().await;

    // Connects and sends nothing at all.
    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let (code, message) = first_error(&mut silent)
        .await
        .expect("an error, then close");
    assert_eq!(code, "08P01", "{message}");
    assert!(message.contains("startup timeout"), "{message}");
    assert!(started.elapsed() >= super::STARTUP_TIMEOUT);

    // Sends its startup packet, then never answers the password prompt.
    let started = tokio::time::Instant::now();
    let mut stalled = TcpStream::connect(addr).await.expect("connect");
    let startup = startup_packet();
    stalled.write_all(&startup).await.expect("startup");
    let (code, message) = first_error(&mut stalled)
        .await
        .expect("an error, then close");
    assert_eq!(code, "08P01", "{message}");
    assert!(message.contains("startup timeout"), "{message}");
    assert!(started.elapsed() >= super::STARTUP_TIMEOUT);

    // The listener still serves: the next client gets its answer.
    let (code, _) = login(addr, "not-a-token").await;
    assert_eq!(code, "28000");
    audit.shutdown().await;

    // The client that stalled at the password prompt is on record.
    let stalled = refusals_saying(audit_dir.path(), "startup timeout");
    assert_eq!(stalled.len(), 1, "{stalled:?}");
    assert_eq!(&*stalled[0].database_user, "agent");
}

#[tokio::test]
async fn a_malformed_password_message_gets_08p01_and_an_audit_row() {
    let (_keys, audit_dir, audit, addr) = one_listener().await;
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.write_all(&startup_packet()).await.expect("startup");
    // A Query where the password message belongs.
    let mut query = BytesMut::new();
    query.put_u8(b'Q');
    query.put_i32(4 + 9);
    query.put_slice(b"SELECT 1\0");
    client.write_all(&query).await.expect("query");
    let (code, message) = first_error(&mut client)
        .await
        .expect("an error, then close");
    assert_eq!(code, "08P01", "{message}");
    assert!(message.contains("expected a password message"), "{message}");
    audit.shutdown().await;
    let refused = refusals_saying(audit_dir.path(), "expected a password message");
    assert_eq!(refused.len(), 1, "{refused:?}");
}

#[tokio::test]
async fn every_forged_token_is_refused_over_the_wire_with_28000_and_audited() {
    let keys = tempfile::tempdir().expect("tempdir");
    let (_, cases) = forged_cases(keys.path());
    let audit_dir = tempfile::tempdir().expect("tempdir");
    let audit = AuditLog::open(&audit::tests::config(audit_dir.path()))
        .await
        .expect("audit");

    // One listener per distinct identity config of the table.
    let mut listeners: BTreeMap<&str, (SocketAddr, Arc<Shared>)> = BTreeMap::new();
    for case in &cases {
        if listeners.contains_key(case.config) {
            continue;
        }
        let (addr, shared) = listen(keys.path(), case.config, &audit).await;
        listeners.insert(case.config, (addr, shared));
    }

    for case in &cases {
        let (addr, shared) = &listeners[case.config];
        // Some reasons name the current second: the listener's check ran
        // between these two.
        let refused = || async {
            let reason = shared
                .verifier
                .verify(&case.token)
                .await
                .expect_err("refused");
            format!("tollgate: {reason}")
        };
        let before = refused().await;
        let (code, message) = login(*addr, &case.token).await;
        let after = refused().await;
        assert_eq!(code, "28000", "{}: {message}", case.name);
        assert!(
            message == before || message == after,
            "{}: {message:?} is neither {before:?} nor {after:?}",
            case.name
        );
    }

    audit.shutdown().await;
    let refusals: Vec<_> = audit::tests::read_segments(&audit_dir.path().join("audit"))
        .into_iter()
        .filter(|r| {
            r.class_uid == record::CLASS_AUTHENTICATION && r.status_id == record::status::FAILURE
        })
        .collect();
    assert_eq!(
        refusals.len(),
        cases.len(),
        "one Authentication failure row per refused token"
    );
    for (row, case) in refusals.iter().zip(&cases) {
        assert!(
            row.status_detail.starts_with(&format!("{}: ", case.code)),
            "{}: row says {:?}",
            case.name,
            row.status_detail
        );
        assert_eq!(row.action_id, record::action::DENIED);
        assert!(
            row.actor_user_uid.is_empty(),
            "a refused token names no one"
        );
    }
}
