//! Every forged or malformed token of the identity suite, replayed over the
//! wire through the PostgreSQL adapter: each is refused with SQLSTATE 28000
//! and its reason, and each refusal is an Authentication row in the audit.
//! Also the startup phase's limits (one deadline, one request of each
//! encryption kind) and what a client is told when tollgate's own
//! credential is broken.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::{BufMut, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::Instant,
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
    startup_packet_with(&[("user", "agent"), ("database", "orders")])
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

/// What the sessions of a listener share, with an identity config of the
/// forged table.
async fn shared_for(keys: &Path, config: &str, audit: &AuditLog) -> Arc<Shared> {
    let verifier = Verifier::from_config(&file_config(keys, config))
        .await
        .expect("verifier");
    Arc::new(Shared {
        verifier,
        policy: Policy::default(),
        audit: audit.clone(),
        pinning: None,
        postgres_cancel_keys: Default::default(),
        postgres_held_whole: Default::default(),
        postgres_parsing: Default::default(),
        postgres_named: Default::default(),
        postgres_catalogs: Default::default(),
        refusals: Default::default(),
        sessions: Default::default(),
    })
}

/// The target "orders-db" served on `listen`, whose server is never
/// reached (every login of these tests fails before it).
pub(super) fn target_config(listen: SocketAddr) -> TargetConfig {
    TargetConfig {
        name: "orders-db".into(),
        protocol: Protocol::Postgres,
        address: "127.0.0.1:1".parse().expect("addr"),
        listen,
        credential: CredentialConfig {
            user: "gateway".into(),
            password: None,
            password_file: None,
        },
        databases: vec!["orders".into()],
        tls: None,
        upstream_tls: None,
        max_connections: 1000,
    }
}

/// A tollgate PostgreSQL listener for an identity config of the forged
/// table, with a target that is never reached.
async fn listen(keys: &Path, config: &str, audit: &AuditLog) -> (SocketAddr, Arc<Shared>) {
    let shared = shared_for(keys, config, audit).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let target = Arc::new(proxy::Target::new(target_config(addr)).expect("target"));
    tokio::spawn(proxy::serve(target, listener, shared.clone()));
    (addr, shared)
}

/// A listener for the target `configure` makes of [`target_config`], its
/// connections served with `startup_timeout` (production's is a minute).
async fn listen_with(
    shared: Arc<Shared>,
    startup_timeout: Duration,
    configure: impl FnOnce(&mut TargetConfig),
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut config = target_config(addr);
    configure(&mut config);
    let target = Arc::new(proxy::Target::new(config).expect("target"));
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let connection = proxy::Connection {
                session_uid: uuid::Uuid::new_v4().to_string(),
                target: target.clone(),
                peer,
                origin: None,
                login: None,
            };
            tokio::spawn(super::serve(
                connection,
                stream,
                shared.clone(),
                startup_timeout,
            ));
        }
    });
    addr
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

/// What sessions share with the forged table's keys and the baseline
/// identity config, and the key and audit directories (kept alive).
async fn baseline_shared() -> (tempfile::TempDir, tempfile::TempDir, Arc<Shared>) {
    let keys = tempfile::tempdir().expect("tempdir");
    forged_cases(keys.path());
    let audit_dir = tempfile::tempdir().expect("tempdir");
    let audit = AuditLog::open(&audit::tests::config(audit_dir.path()))
        .await
        .expect("audit");
    let shared = shared_for(keys.path(), "", &audit).await;
    (keys, audit_dir, shared)
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
async fn first_error<R: AsyncRead + Unpin>(stream: &mut R) -> Option<(String, String)> {
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

    // Stalls before its startup packet, then at the password prompt, each
    // for less than the timeout but together for more: one deadline for
    // the whole login, not one per phase. Its password, sent past the
    // deadline, is never read (per phase, it would have been, and the
    // token refused with 28000).
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    tokio::time::sleep(super::STARTUP_TIMEOUT - Duration::from_secs(10)).await;
    slow.write_all(&startup).await.expect("startup");
    tokio::time::sleep(Duration::from_secs(20)).await;
    let mut password = BytesMut::new();
    password.extend_from_slice(b"p");
    password.extend_from_slice(&(4 + 12i32).to_be_bytes());
    password.extend_from_slice(b"not-a-token\0");
    let _ = slow.write_all(&password).await;
    let (code, message) = first_error(&mut slow).await.expect("an error, then close");
    assert_eq!(code, "08P01", "{message}");
    assert!(message.contains("startup timeout"), "{message}");

    // The listener still serves: the next client gets its answer.
    let (code, _) = login(addr, "not-a-token").await;
    assert_eq!(code, "28000");
    audit.shutdown().await;

    // Both are on record: the silent one as a refused startup, the one
    // that stalled at the password prompt with the user it named.
    let silent = refusals_saying(
        audit_dir.path(),
        "protocol: no startup packet within the startup timeout",
    );
    assert_eq!(silent.len(), 1, "{silent:?}");
    let stalled = refusals_saying(audit_dir.path(), "no password within the startup timeout");
    assert_eq!(stalled.len(), 2, "{stalled:?}");
    assert_eq!(&*stalled[0].database_user, "agent");
}

#[tokio::test]
async fn connections_past_the_targets_limit_are_refused_with_53300_and_audited() {
    let (_keys, audit_dir, shared) = baseline_shared().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut config = target_config(addr);
    config.max_connections = 1;
    let target = Arc::new(proxy::Target::new(config).expect("target"));
    tokio::spawn(proxy::serve(target, listener, shared.clone()));

    // The only slot is taken by a connection that has sent nothing yet.
    let holder = TcpStream::connect(addr).await.expect("connect");
    let mut over = TcpStream::connect(addr).await.expect("connect");
    let over_port = over.local_addr().expect("addr").port();
    let (code, message) = first_error(&mut over).await.expect("an error, then close");
    assert_eq!(code, "53300", "{message}");
    assert!(message.contains("too many connections"), "{message}");

    // A CancelRequest still goes through at the limit (this one's key is
    // unknown, so, as PostgreSQL does, it is dropped without an answer).
    let mut cancel = TcpStream::connect(addr).await.expect("connect");
    let cancel_port = cancel.local_addr().expect("addr").port();
    let mut request = BytesMut::new();
    request.put_i32(16);
    request.put_i32(wire::CANCEL_REQUEST);
    request.put_i32(4242);
    request.put_i32(777);
    cancel.write_all(&request).await.expect("cancel request");
    let mut answer = Vec::new();
    cancel.read_to_end(&mut answer).await.expect("closed");
    assert!(answer.is_empty(), "a cancel got {answer:?}");

    // The slot comes back when its connection goes.
    drop(holder);
    let mut served = false;
    for _ in 0..50 {
        if login(addr, "not-a-token").await.0 == "28000" {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "the freed slot was not given to a new connection");
    shared.audit.shutdown().await;
    // The connection past the limit is on record; the cancel is not
    // refused. (A login retried above may be refused too, while the slot
    // is on its way back.)
    let refused = refusals_saying(audit_dir.path(), "too_many_connections: ");
    let port_of = |r: &record::AuditRecord| r.src_endpoint_port.and_then(|p| u16::try_from(p).ok());
    assert!(
        refused.iter().any(|r| port_of(r) == Some(over_port)),
        "{refused:?}"
    );
    assert!(
        refused.iter().all(|r| port_of(r) != Some(cancel_port)),
        "{refused:?}"
    );
}

/// A client that goes away part-way through its login is on record: one
/// that closes or resets the connection in the middle of its startup
/// packet, one that resets it at the password prompt. One that closes before sending a
/// byte (a health check, a port probe) had nothing to refuse.
#[tokio::test]
async fn a_client_gone_part_way_through_its_login_is_on_record() {
    let (_keys, audit_dir, audit, addr) = one_listener().await;
    drop(TcpStream::connect(addr).await.expect("connect"));
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(&startup_packet()[..6])
        .await
        .expect("part of a startup");
    drop(client);
    // Reset, not closed, part-way: once the daemon has read what came.
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(&startup_packet()[..6])
        .await
        .expect("part of a startup");
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.set_zero_linger().expect("linger");
    drop(client);
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.write_all(&startup_packet()).await.expect("startup");
    let mut buf = BytesMut::new();
    let frame = wire::read_frame(&mut client, &mut buf)
        .await
        .expect("the password prompt");
    assert_eq!(frame.tag, b'R');
    client.set_zero_linger().expect("linger");
    drop(client);
    // Nothing is sent back to a client that is gone: give the sessions a
    // moment to write their rows before the store closes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    audit.shutdown().await;
    let cut = refusals_saying(audit_dir.path(), "in the middle of its startup packet");
    assert_eq!(cut.len(), 1, "{cut:?}");
    let reset_early = refusals_saying(
        audit_dir.path(),
        "the connection failed in the middle of the startup packet",
    );
    assert_eq!(reset_early.len(), 1, "{reset_early:?}");
    let reset = refusals_saying(
        audit_dir.path(),
        "the connection failed at the password prompt",
    );
    assert_eq!(reset.len(), 1, "{reset:?}");
    let all = audit::tests::read_segments(&audit_dir.path().join("audit"));
    assert_eq!(
        all.iter().filter(|r| r.phase == "refusal").count(),
        3,
        "the connection that sent nothing has no row: {all:?}"
    );
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
            format!("tollgate: {}", reason.client_message())
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

/// An 8-byte negotiation request: SSLRequest or GSSENCRequest.
fn negotiation_request(code: i32) -> [u8; 8] {
    let mut packet = [0u8; 8];
    packet[..4].copy_from_slice(&8i32.to_be_bytes());
    packet[4..].copy_from_slice(&code.to_be_bytes());
    packet
}

/// Sends a negotiation request and returns the one-byte answer.
async fn negotiate<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: &mut S, code: i32) -> u8 {
    stream
        .write_all(&negotiation_request(code))
        .await
        .expect("request");
    stream.read_u8().await.expect("answer")
}

#[tokio::test]
async fn a_second_ssl_or_gssenc_request_is_refused_with_08p01() {
    let (_keys, audit_dir, shared) = baseline_shared().await;
    let audit = shared.audit.clone();
    // Long enough never to fire: these clients do not stall.
    let addr = listen_with(shared, Duration::from_secs(30), |_| {}).await;

    for (code, kind) in [
        (wire::SSL_REQUEST, "SSLRequest"),
        (wire::GSSENC_REQUEST, "GSSENCRequest"),
    ] {
        let mut client = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(negotiate(&mut client, code).await, b'N', "{kind}");
        client
            .write_all(&negotiation_request(code))
            .await
            .expect("again");
        let (sqlstate, message) = first_error(&mut client)
            .await
            .expect("an error, then close");
        assert_eq!(sqlstate, "08P01", "{message}");
        assert_eq!(
            message,
            format!("tollgate: second {kind} on one connection")
        );
    }

    // One of each is what PostgreSQL allows (libpq with gssencmode=prefer
    // asks for both): the startup goes on to the password prompt.
    let mut client = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(negotiate(&mut client, wire::GSSENC_REQUEST).await, b'N');
    assert_eq!(negotiate(&mut client, wire::SSL_REQUEST).await, b'N');
    client.write_all(&startup_packet()).await.expect("startup");
    let mut buf = BytesMut::new();
    let frame = wire::read_frame(&mut client, &mut buf)
        .await
        .expect("auth request");
    assert_eq!(frame.tag, b'R');
    drop(client);

    // Each refusal is on record, with who connected.
    audit.shutdown().await;
    for kind in ["SSLRequest", "GSSENCRequest"] {
        let refused = refusals_saying(
            audit_dir.path(),
            &format!("protocol: second {kind} on one connection"),
        );
        assert_eq!(refused.len(), 1, "{kind}: {refused:?}");
        assert_eq!(&*refused[0].src_endpoint_ip, "127.0.0.1");
    }
}

#[tokio::test]
async fn inside_tls_a_new_negotiation_request_is_refused_over_tls() {
    let (_keys, _audit_dir, shared) = baseline_shared().await;
    let pki = tempfile::tempdir().expect("tempdir");
    let tls = crate::proxy::tls::self_signed_cert(pki.path());
    let connector = crate::proxy::tls::connector(
        &crate::proxy::tls::UpstreamTlsConfig {
            ca_file: tls.cert.clone(),
            server_name: None,
        },
        "127.0.0.1".parse().expect("ip"),
    )
    .expect("connector");
    let addr = listen_with(shared, Duration::from_secs(30), |target| {
        target.tls = Some(tls)
    })
    .await;

    for (code, reason) in [
        (wire::SSL_REQUEST, "second SSLRequest on one connection"),
        (
            wire::GSSENC_REQUEST,
            "GSSENCRequest after TLS was established",
        ),
    ] {
        let mut client = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(negotiate(&mut client, wire::SSL_REQUEST).await, b'S');
        let mut client = connector
            .connector
            .connect(connector.server_name.clone(), client)
            .await
            .expect("TLS handshake");
        client
            .write_all(&negotiation_request(code))
            .await
            .expect("request inside TLS");
        client.flush().await.expect("flush");
        let (sqlstate, message) = first_error(&mut client)
            .await
            .expect("an error over TLS, then close");
        assert_eq!(sqlstate, "08P01", "{message}");
        assert_eq!(message, format!("tollgate: {reason}"));
    }
}

// Paused time, as above: the deadline is measured on tokio's clock.
#[tokio::test(start_paused = true)]
async fn one_deadline_covers_negotiation_and_startup_packet() {
    let (_keys, _audit_dir, shared) = baseline_shared().await;
    let deadline = Duration::from_secs(1);
    let addr = listen_with(shared, deadline, |_| {}).await;

    // Each request comes well within the deadline, but together they do
    // not: the deadline does not start again with each one.
    let started = Instant::now();
    let mut client = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(negotiate(&mut client, wire::SSL_REQUEST).await, b'N');
    tokio::time::sleep(deadline * 6 / 10).await;
    assert_eq!(negotiate(&mut client, wire::GSSENC_REQUEST).await, b'N');
    let (sqlstate, message) = first_error(&mut client)
        .await
        .expect("an error, then close");
    assert_eq!(sqlstate, "08P01", "{message}");
    assert!(message.contains("startup timeout"), "{message}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= deadline && elapsed < deadline * 15 / 10,
        "cut off after {elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stalls_in_the_tls_handshake_is_closed_at_the_deadline() {
    let (_keys, audit_dir, shared) = baseline_shared().await;
    let audit = shared.audit.clone();
    let pki = tempfile::tempdir().expect("tempdir");
    let tls = crate::proxy::tls::self_signed_cert(pki.path());
    let deadline = Duration::from_secs(1);
    let addr = listen_with(shared, deadline, |target| target.tls = Some(tls)).await;

    // Asks for TLS, is told yes, then sends no ClientHello.
    let started = Instant::now();
    let mut client = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(negotiate(&mut client, wire::SSL_REQUEST).await, b'S');
    let mut rest = Vec::new();
    tokio::time::timeout(deadline * 10, client.read_to_end(&mut rest))
        .await
        .expect("the connection is closed at the deadline")
        .expect("read");
    // Mid-handshake the client could not read an ErrorResponse: none is sent.
    assert!(rest.is_empty(), "{rest:?}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= deadline && elapsed < deadline * 2,
        "closed after {elapsed:?}"
    );

    // Answers the S with bytes that are no TLS: closed at once.
    let mut garbled = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(negotiate(&mut garbled, wire::SSL_REQUEST).await, b'S');
    garbled
        .write_all(b"this is not a ClientHello\r\n\r\n")
        .await
        .expect("garbage");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(deadline / 2, garbled.read_to_end(&mut rest))
        .await
        .expect("closed before the deadline");

    audit.shutdown().await;
    for why in [
        "protocol: no TLS handshake within the startup timeout",
        "protocol: the TLS handshake failed",
    ] {
        let refused = refusals_saying(audit_dir.path(), why);
        assert_eq!(refused.len(), 1, "{why}: {refused:?}");
    }
}

#[tokio::test]
async fn a_broken_password_file_is_not_shown_to_the_client() {
    let keys = tempfile::tempdir().expect("tempdir");
    let (controls, _) = forged_cases(keys.path());
    let (name, config, token) = &controls[0];
    assert_eq!((*name, *config), ("baseline", ""));
    let audit_dir = tempfile::tempdir().expect("tempdir");
    let audit = AuditLog::open(&audit::tests::config(audit_dir.path()))
        .await
        .expect("audit");
    let shared = shared_for(keys.path(), config, &audit).await;
    // A server that accepts, so the failure is the password file's alone.
    let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server_addr = server.local_addr().expect("addr");
    // Removed after the configuration was loaded (as a rotation gone wrong).
    let password_file = keys.path().join("gateway-password-gone");
    let password_path = password_file.display().to_string();
    let addr = listen_with(shared, super::STARTUP_TIMEOUT, |target| {
        target.address = server_addr;
        target.credential.password_file = Some(password_file);
    })
    .await;

    let (code, message) = login(addr, token).await;
    assert_eq!(code, "08006", "{message}");
    assert_eq!(message, "tollgate: tollgate could not log in to the target");
    drop(server);
    audit.shutdown().await;

    // The operator's record has the details the client was not given.
    let failed: Vec<_> = audit::tests::read_segments(&audit_dir.path().join("audit"))
        .into_iter()
        .filter(|r| r.status_detail.starts_with("upstream connection failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0].status_detail.contains(&password_path),
        "{}",
        failed[0].status_detail
    );
}

/// A startup packet with `params` (key, value pairs, repeats kept).
fn startup_packet_with(params: &[(&str, &str)]) -> BytesMut {
    let mut startup = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(params.iter().copied(), &mut startup)
        .expect("a startup message");
    startup
}

/// Policy names tables by schema and table, so a grant means them in the
/// target's databases: a session asking for another database (here by
/// name, and by leaving it out, which PostgreSQL reads as the user's
/// name) is refused with 42501 before the password prompt, and the
/// refusal is on record. A database given twice is refused as malformed:
/// PostgreSQL takes the last, a reader that took the first would audit
/// another database than the session opens.
#[tokio::test]
async fn a_database_the_target_does_not_open_to_agents_is_refused_and_audited() {
    let (_keys, audit_dir, audit, addr) = one_listener().await;
    for params in [
        vec![("user", "agent"), ("database", "hr")],
        vec![("user", "agent")],
    ] {
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client
            .write_all(&startup_packet_with(&params))
            .await
            .expect("startup");
        let (code, message) = first_error(&mut client).await.expect("an error");
        assert_eq!(code, "42501", "{params:?}: {message}");
        assert!(message.contains("is not open to agents"), "{message}");
    }
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(&startup_packet_with(&[
            ("user", "agent"),
            ("database", "orders"),
            ("database", "hr"),
        ]))
        .await
        .expect("startup");
    let (code, message) = first_error(&mut client).await.expect("an error");
    assert_eq!(code, "08P01", "{message}");
    assert!(message.contains("given twice"), "{message}");
    audit.shutdown().await;
    let refused = refusals_saying(audit_dir.path(), "is not one agents may open");
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(&*refused[0].database_name, "hr");
    assert_eq!(&*refused[1].database_name, "agent");
}
