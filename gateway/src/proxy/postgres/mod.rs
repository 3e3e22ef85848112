//! The PostgreSQL adapter.
//!
//! The agent's token arrives as the password (the convention Azure Database
//! for PostgreSQL uses): tollgate asks for a cleartext password, verifies
//! the token, then opens its own upstream connection with the credential
//! from the config and relays the session, deciding and auditing each
//! statement on the way ([`relay`]).
//!
//! Errors a client sees speak PostgreSQL: an ErrorResponse with SQLSTATE
//! 28000 for identity, 42501 for policy, 58030 when the audit cannot be
//! written (the statement is then not sent).

mod cancel;
pub mod classify;
#[cfg(test)]
mod fuzz_tests;
mod lexical;
pub(crate) mod mask;
#[cfg(test)]
mod refusal_tests;
mod relay;
mod upstream;
pub mod wire;

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::{info, warn};

pub use self::cancel::CancelKeys;
pub use self::mask::CatalogCache;
pub use self::relay::{HeldWholeBudget, NamedBudget, ParsingBudget};
use self::wire::{Startup, WireError};
use super::{tls::BoxedIo, Connection, Shared};
use crate::{
    audit::{AuditRecord, SharedText},
    identity::IdentityError,
};

/// How long an unauthenticated client may take, as PostgreSQL's
/// authentication_timeout: from connecting to its password message
/// (encryption negotiation, TLS handshake and startup message included).
/// One deadline for the whole login, not a timer per packet or per phase,
/// or a client could hold a connection (and one of the target's
/// `max_connections`) open longer by stalling in each phase in turn, or
/// trickling negotiation requests.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// SQLSTATE invalid_authorization_specification.
pub const SQLSTATE_IDENTITY: &str = "28000";
/// SQLSTATE insufficient_privilege.
pub const SQLSTATE_POLICY: &str = "42501";
/// SQLSTATE io_error: the audit record could not be written.
pub const SQLSTATE_AUDIT: &str = "58030";
/// SQLSTATE protocol_violation.
pub const SQLSTATE_PROTOCOL: &str = "08P01";
/// SQLSTATE connection_failure: the target could not be reached.
pub const SQLSTATE_UPSTREAM: &str = "08006";

/// A connection past the target's `max_connections`: refused before
/// anything is read from it, as PostgreSQL's postmaster refuses one it
/// cannot serve, and on record. A client that sent its startup packet
/// reads the message; libpq, whose first message is an SSLRequest,
/// reports an error response during the SSL exchange.
///
/// A CancelRequest that has arrived whole within [`CANCEL_PEEK`] is served
/// all the same: at the limit is when one is needed most, and it ends
/// soon (it is read whole, and forwarding it has a deadline). At most
/// [`PAST_LIMIT_AT_ONCE`] such connections are looked at together; the
/// others are refused at once.
///
/// With `logging_in_per_source`, slots are short and the connection is
/// past the number its source may then have logging in at once (see
/// `proxy::logins`): it is refused the same way, saying so.
pub async fn refuse_over_limit(
    connection: Connection,
    mut client: TcpStream,
    shared: Arc<Shared>,
    logging_in_per_source: Option<usize>,
) {
    static PAST_LIMIT: tokio::sync::Semaphore =
        tokio::sync::Semaphore::const_new(PAST_LIMIT_AT_ONCE);
    if let Ok(_looking) = PAST_LIMIT.try_acquire() {
        if is_whole_cancel_request(&client).await {
            return serve_connection(connection, client, shared).await;
        }
    }
    let (reason, message) = match logging_in_per_source {
        None => (
            format!(
                "the target's limit of {} connections at once was reached",
                connection.target.config.max_connections
            ),
            "tollgate: too many connections to this target; try again later",
        ),
        Some(per_source) => (
            format!(
                "fewer than {per_source} of the target's slots were free, and this source already had that many connections logging in to the target (a quarter of its max_connections, at least 16)"
            ),
            "tollgate: too many connections logging in from this source; try again later",
        ),
    };
    let record = connection.login_refused(None, "too_many_connections", &reason);
    shared.submit_refusal(record);
    fatal(&mut client, SQLSTATE_TOO_MANY_CONNECTIONS, message).await;
}

/// How long a connection past the limit is given to show it is a
/// CancelRequest (which its client sends as soon as it connects).
const CANCEL_PEEK: Duration = Duration::from_millis(50);

/// Connections past the limit looked at for a CancelRequest at once.
const PAST_LIMIT_AT_ONCE: usize = 64;

/// How long forwarding a CancelRequest may take (its audit record, the
/// connection to the server, the request).
const CANCEL_FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the client's first 16 bytes, already sent, are a CancelRequest
/// (looked at without reading them).
async fn is_whole_cancel_request(client: &TcpStream) -> bool {
    let mut first = [0u8; 16];
    let deadline = tokio::time::Instant::now() + CANCEL_PEEK;
    loop {
        match tokio::time::timeout_at(deadline, client.peek(&mut first)).await {
            Ok(Ok(16)) => break,
            // Part of it so far: look again shortly (peek returns at once
            // while anything is buffered).
            Ok(Ok(n)) if n > 0 => tokio::time::sleep(Duration::from_millis(5)).await,
            _ => return false,
        }
    }
    first[..4] == 16i32.to_be_bytes() && first[4..8] == wire::CANCEL_REQUEST.to_be_bytes()
}

/// SQLSTATE of a connection refused for the target's connection limit
/// (PostgreSQL's too_many_connections).
pub const SQLSTATE_TOO_MANY_CONNECTIONS: &str = "53300";

pub async fn serve_connection(connection: Connection, client: TcpStream, shared: Arc<Shared>) {
    match serve(connection, client, shared, STARTUP_TIMEOUT).await {
        Ok(()) | Err(WireError::Closed) => info!("session ended"),
        Err(err) => warn!(error = %err, "session ended with an error"),
    }
}

async fn serve(
    mut connection: Connection,
    client: TcpStream,
    shared: Arc<Shared>,
    startup_timeout: Duration,
) -> Result<(), WireError> {
    let deadline = tokio::time::Instant::now() + startup_timeout;
    let mut client: BoxedIo = Box::new(client);
    let mut negotiation = Negotiation::default();
    let params = loop {
        let startup = match tokio::time::timeout_at(deadline, wire::read_startup(&mut client))
            .await
            .unwrap_or(Err(WireError::Malformed(
                "no startup packet within the startup timeout".into(),
            )))
            .and_then(|startup| negotiation.admit(startup))
        {
            Ok(startup) => startup,
            Err(WireError::Malformed(reason)) => {
                // Nothing waits on this record (nothing was forwarded, and
                // the client is refused either way): it rides with the
                // next sync, and a store that cannot write it says so.
                let record = connection.login_refused(None, "protocol", &reason);
                shared.submit_refusal(record);
                fatal(
                    &mut client,
                    SQLSTATE_PROTOCOL,
                    &format!("tollgate: {reason}"),
                )
                .await;
                return Err(WireError::Malformed(reason));
            }
            // Once TLS is up, bytes that are no TLS record (rustls says
            // InvalidData) are malformed input like any other: on record.
            // The stream cannot carry an ErrorResponse any more.
            Err(WireError::Io(err))
                if negotiation.encrypted && err.kind() == std::io::ErrorKind::InvalidData =>
            {
                let reason = format!("an unreadable TLS record: {err}");
                let record = connection.login_refused(None, "protocol", &reason);
                shared.submit_refusal(record);
                return Err(WireError::Malformed(reason));
            }
            Err(err) => return Err(err),
        };
        match startup {
            Startup::Ssl => match &connection.target.tls_acceptor {
                // TLS with tollgate's certificate when the target has one.
                Some(acceptor) => {
                    client.write_all(b"S").await?;
                    // Mid-handshake the client cannot read an ErrorResponse:
                    // past the deadline the connection is only closed.
                    let reason =
                        match tokio::time::timeout_at(deadline, acceptor.accept(client)).await {
                            Ok(Ok(tls)) => {
                                client = Box::new(tls);
                                negotiation.encrypted = true;
                                continue;
                            }
                            Ok(Err(err)) => format!("the TLS handshake failed: {err}"),
                            Err(_) => "no TLS handshake within the startup timeout".to_string(),
                        };
                    // On record as any refused startup (see above).
                    let record = connection.login_refused(None, "protocol", &reason);
                    shared.submit_refusal(record);
                    return Err(WireError::Malformed(reason));
                }
                // Without a certificate TLS is declined; the client goes on
                // in the clear or stops, as its sslmode says.
                None => client.write_all(b"N").await?,
            },
            // GSS encryption is declined likewise.
            Startup::GssEnc => client.write_all(b"N").await?,
            Startup::Cancel {
                process_id,
                secret_key,
            } => {
                forward_cancel(&connection, &shared, process_id, secret_key).await;
                return Ok(());
            }
            Startup::Startup(params) => break params,
        }
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    // Shared by every record of the session (see `SharedText`).
    let database_user: SharedText = param("user").into();
    // PostgreSQL's default is a database named after the user: the agent's
    // user, as the agent asked for it (tollgate logs in as another, so it
    // asks for this one by name, see below).
    let database_name: SharedText = match param("database") {
        name if name.is_empty() => database_user.clone(),
        name => name.into(),
    };
    // Every record of the login names the database asked for, and as whom.
    let stamp = |mut record: AuditRecord| {
        record.database_user = database_user.clone();
        record.database_name = database_name.clone();
        record
    };
    if !connection
        .target
        .databases
        .iter()
        .any(|open| **open == *database_name)
    {
        let record = stamp(connection.login_refused(
            None,
            "database_not_open",
            &format!(
                "database {database_name:?} is not one agents may open on this target ({})",
                connection.target.databases.join(", ")
            ),
        ));
        refuse_login(
            &shared,
            &mut client,
            record,
            SQLSTATE_POLICY,
            &format!("tollgate: database {database_name:?} is not open to agents on this target"),
        )
        .await;
        return Ok(());
    }
    // The database asked for by name, always: left out or empty, the
    // server would open the one named after tollgate's own user, not the
    // audited one.
    let mut upstream_params = params.clone();
    upstream_params.retain(|(k, _)| k != "database");
    upstream_params.push(("database".into(), database_name.to_string()));
    if !negotiation.encrypted
        && connection
            .target
            .tls
            .as_ref()
            .is_some_and(|tls| tls.require)
    {
        let record = stamp(connection.login_refused(
            None,
            "tls_required",
            "the target requires TLS and the client connected without it",
        ));
        refuse_login(
            &shared,
            &mut client,
            record,
            SQLSTATE_IDENTITY,
            "tollgate: this target requires TLS (sslmode=require or stricter)",
        )
        .await;
        return Ok(());
    }
    let (mut client_rd, mut client_wr) = tokio::io::split(client);

    let mut out = BytesMut::new();
    wire::authentication_cleartext(&mut out);
    send_all(&mut client_wr, &out).await?;
    let mut client_buf = BytesMut::new();
    let password = tokio::time::timeout_at(
        deadline,
        wire::read_frame_limited(&mut client_rd, &mut client_buf, wire::MAX_PASSWORD_MESSAGE),
    )
    .await
    .unwrap_or(Err(WireError::Malformed(
        "no password within the startup timeout".into(),
    )));
    let token = match password.and_then(|frame| wire::password(&frame)) {
        Ok(token) => token,
        // A client that hangs up (or resets the connection) at the password
        // prompt had no token to give.
        Err(err @ (WireError::Closed | WireError::Io(_))) => {
            let mut record = connection.authentication_refused(&IdentityError::Missing);
            let how = match &err {
                WireError::Io(io) => format!("the connection failed at the password prompt: {io}"),
                _ => "the client closed the connection at the password prompt".into(),
            };
            record.status_detail.push_str(&format!(" ({how})"));
            if let Err(err) = shared.append_refusal(stamp(record)).await {
                warn!(error = %err, "a refused login could not be audited");
            }
            return Err(err);
        }
        // A password message too large or malformed, or none within the
        // startup timeout: the client is told, and the refusal is audited.
        Err(WireError::Malformed(reason)) => {
            let mut record = connection.authentication_refused(&IdentityError::Missing);
            record.status_detail.push_str(&format!(" ({reason})"));
            refuse_login(
                &shared,
                &mut client_wr,
                stamp(record),
                SQLSTATE_PROTOCOL,
                &format!("tollgate: {reason}"),
            )
            .await;
            return Err(WireError::Malformed(reason));
        }
    };

    let verified = shared.verifier.verify(token.trim()).await;
    let principal = match verified.and_then(|p| shared.verifier.session_may_start(p)) {
        Ok(principal) => {
            connection.logged_in();
            principal
        }
        Err(refusal) => {
            info!(reason = %refusal, "token refused");
            refuse_login(
                &shared,
                &mut client_wr,
                stamp(connection.authentication_refused(&refusal)),
                SQLSTATE_IDENTITY,
                &format!("tollgate: {}", refusal.client_message()),
            )
            .await;
            return Ok(());
        }
    };
    drop(token);

    let accepted = stamp(connection.authentication_accepted(&principal));
    if !audit_or_refuse(&shared, accepted, &mut client_wr).await {
        return Ok(());
    }
    info!(oid = %principal.object_id, tid = %principal.tenant_id, "authenticated");

    let mut upstream = match upstream::connect(&connection.target, &upstream_params).await {
        Ok(upstream) => upstream,
        Err(failure) => {
            warn!(error = %failure, "upstream connection failed");
            let mut failed = stamp(upstream_record(
                &connection,
                Some(&principal),
                failure.socket_cookie,
            ));
            failed.status_id = crate::audit::record::status::FAILURE;
            failed.status_detail = format!("upstream connection failed: {failure}");
            refuse_login(
                &shared,
                &mut client_wr,
                failed,
                SQLSTATE_UPSTREAM,
                &failure.client_message(),
            )
            .await;
            return Ok(());
        }
    };
    // The upstream socket's cookie goes on record before the session is
    // used, so `tollgate verify` can account for every connection the
    // gateway opens, including sessions that never send a statement.
    let opened = stamp(upstream_record(
        &connection,
        Some(&principal),
        upstream.socket_cookie,
    ));
    if !audit_or_refuse(&shared, opened, &mut client_wr).await {
        return Ok(());
    }
    // What the session needs of the catalog (masked columns, functions of
    // the database's own, relations read without running code) is read
    // before any agent message is relayed. If masked columns cannot be
    // resolved, the session does not start (fail closed); without masks,
    // a lookup the server refused leaves the session knowing nothing of
    // the catalog, so no statement of it is forwarded before its record is
    // durable.
    let mask_patterns = shared.policy.masks_for(&principal, &connection.target.name);
    let masked = !mask_patterns.is_empty();
    let known = shared
        .postgres_catalogs
        .fresh(&connection.target.name, &database_name);
    let reused = known.is_some();
    let masks = {
        match mask::resolve(
            &mut upstream.stream,
            &mut upstream.buffered,
            mask_patterns,
            known,
        )
        .await
        {
            Ok(masks) => {
                // A list taken from the cache is not put back: its age
                // stays the age of the lookup that read it.
                if !reused {
                    shared.postgres_catalogs.remember(
                        &connection.target.name,
                        &database_name,
                        &masks,
                    );
                }
                masks
            }
            Err(err @ mask::ResolveError::Refused { .. }) if !masked => {
                warn!(error = %err, "the catalog lookup was refused: every statement of this session is made durable before it is sent");
                mask::MaskSet::default()
            }
            Err(err) => {
                // The login was accepted (its record is written); the
                // session it would have started is refused, on record.
                // Without masks only a lookup the connection did not
                // survive (a timeout, a broken answer) gets here.
                let (rule, what) = match masked {
                    true => (
                        "masks_unresolved",
                        "its masked columns could not be resolved",
                    ),
                    false => ("catalog_unread", "its catalog lookup did not complete"),
                };
                warn!(error = %err, "the session's catalog lookup failed: {what}");
                let record = stamp(connection.login_refused(
                    Some(&principal),
                    rule,
                    &format!("the session was refused because {what} ({err})"),
                ));
                refuse_login(
                    &shared,
                    &mut client_wr,
                    record,
                    SQLSTATE_UPSTREAM,
                    &format!("tollgate: the session is refused because {what}: {err}"),
                )
                .await;
                return Ok(());
            }
        }
    };
    let mut greeting = upstream.greeting.clone();
    let _cancel_registration = shared.postgres_cancel_keys.substitute(
        &mut greeting,
        connection.target.address,
        &connection.target.name,
        &connection.session_uid,
    );
    out.clear();
    wire::authentication_ok(&mut out);
    out.extend_from_slice(&greeting);
    send_all(&mut client_wr, &out).await?;

    let statement_record = relay::statement_record_base(
        &connection,
        &principal,
        database_user,
        database_name,
        upstream.socket_cookie,
    );
    let session = relay::Session {
        statement_record,
        connection,
        principal,
        intent: std::sync::Mutex::new(relay::intent_of_application_name(&param(
            "application_name",
        ))),
        masks,
        relations_may_have_changed: Default::default(),
        shared,
    };
    relay::run(session, client_rd, client_buf, client_wr, upstream).await
}

/// Writes the refusal of a login durably, then tells the client why with a
/// FATAL: what the client hears of is on record first.
async fn refuse_login<W: tokio::io::AsyncWrite + Unpin>(
    shared: &Shared,
    client: &mut W,
    record: AuditRecord,
    sqlstate: &str,
    message: &str,
) {
    if let Err(err) = shared.append_refusal(record).await {
        warn!(error = %err, "a refused login could not be audited");
    }
    fatal(client, sqlstate, message).await;
}

/// The encryption requests a connection has made before its startup
/// message.
#[derive(Debug, Default)]
struct Negotiation {
    ssl_requested: bool,
    gss_requested: bool,
    /// TLS is established.
    encrypted: bool,
}

impl Negotiation {
    /// Lets `startup` through, or refuses it as PostgreSQL does: at most one
    /// SSLRequest and one GSSENCRequest per connection, and no
    /// GSSENCRequest once TLS is up (GSS encryption cannot run inside TLS).
    /// Without the limit the negotiation never has to end.
    fn admit(&mut self, startup: Startup) -> Result<Startup, WireError> {
        let refusal = match startup {
            Startup::Ssl if self.ssl_requested => "second SSLRequest on one connection",
            Startup::GssEnc if self.gss_requested => "second GSSENCRequest on one connection",
            Startup::GssEnc if self.encrypted => "GSSENCRequest after TLS was established",
            Startup::Ssl => {
                self.ssl_requested = true;
                return Ok(startup);
            }
            Startup::GssEnc => {
                self.gss_requested = true;
                return Ok(startup);
            }
            _ => return Ok(startup),
        };
        Err(WireError::Malformed(refusal.into()))
    }
}

/// A CancelRequest reaches the target too, on a connection of its own:
/// that connection is on record, with its socket's cookie (which the
/// kernel's evidence also sees), before it is made, or it is not made. An
/// unknown key is dropped, as PostgreSQL does, and on record as refused
/// (someone guessing keys shows in the audit), as is one whose session's
/// upstream socket cannot be named; a cancel whose connection, send or
/// answer then fails is only logged, after its record.
async fn forward_cancel(
    connection: &Connection,
    shared: &Shared,
    process_id: i32,
    secret_key: i32,
) {
    let Some(server) =
        shared
            .postgres_cancel_keys
            .server_of(&connection.target.name, process_id, secret_key)
    else {
        info!("cancel request with an unknown key dropped");
        refuse_cancel(
            connection,
            shared,
            "cancel_unknown_key",
            &format!("no session of this target has backend key {process_id}"),
        );
        return;
    };
    let (socket, socket_cookie) = match super::upstream_socket(server.address) {
        Ok(socket) => socket,
        Err(err) => {
            warn!(error = %err, "cancel request could not be forwarded");
            refuse_cancel(
                connection,
                shared,
                "cancel_not_forwarded",
                &format!("no socket to the server: {err}"),
            );
            return;
        }
    };
    // A CancelRequest carries no token: whose session it is, the key says.
    let mut cancel = upstream_record(connection, None, socket_cookie);
    cancel.status_detail = format!(
        "cancel request for server process {} of session {}: forwarding it",
        server.process_id, server.session_uid
    );
    // A cancel that does not reach the server after its row was written
    // gets a refusal row too: the first says it was being forwarded, not
    // that it arrived.
    let not_forwarded = |why: &str| {
        warn!(reason = why, "cancel request not forwarded");
        refuse_cancel(connection, shared, "cancel_not_forwarded", why);
    };
    match tokio::time::timeout(CANCEL_FORWARD_TIMEOUT, shared.audit.append(cancel)).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => {
            warn!(error = %err, "cancel request not forwarded: it could not be audited");
            return;
        }
        Err(_) => {
            not_forwarded("its audit record was not durable within the forward timeout");
            return;
        }
    }
    match tokio::time::timeout(
        CANCEL_FORWARD_TIMEOUT,
        server.send_cancel(socket, &connection.target),
    )
    .await
    {
        Ok(Ok(())) => info!("cancel request forwarded to the session's server"),
        Ok(Err(err)) => not_forwarded(&format!("sending it to the server failed: {err}")),
        Err(_) => not_forwarded("the server did not take it within the forward timeout"),
    }
}

/// Puts a CancelRequest not forwarded on record, for the reason
/// `code: detail` (nothing waits on the record: the cancel is dropped
/// either way).
fn refuse_cancel(connection: &Connection, shared: &Shared, code: &str, detail: &str) {
    let mut record = upstream_record(connection, None, None);
    record.phase = "refusal".into();
    record.status_id = crate::audit::record::status::FAILURE;
    record.action_id = crate::audit::record::action::DENIED;
    record.status_detail = format!("{code}: cancel request not forwarded: {detail}");
    shared.submit_refusal(record);
}

/// The Datastore Activity "connect" record of an upstream connection
/// (opened, failed, or a forwarded cancel's), carrying the socket's cookie
/// so verification can match it with the kernel's evidence.
fn upstream_record(
    connection: &Connection,
    principal: Option<&crate::identity::Principal>,
    socket_cookie: Option<u64>,
) -> crate::audit::AuditRecord {
    use crate::audit::record;
    let mut record = connection.record(principal);
    super::set_class(
        &mut record,
        record::CLASS_DATASTORE_ACTIVITY,
        record::datastore_activity::CONNECT,
    );
    record.phase = "session".into();
    record.status_id = record::status::SUCCESS;
    record.action_id = record::action::ALLOWED;
    record.status_detail = "upstream connection opened".into();
    record.upstream_socket_cookie = socket_cookie.and_then(|c| i64::try_from(c).ok());
    record
}

/// Fail closed: a session whose records cannot be written does not go on.
/// Appends `record`; when that fails, tells the client and returns false.
async fn audit_or_refuse<W: tokio::io::AsyncWrite + Unpin>(
    shared: &Shared,
    record: AuditRecord,
    client: &mut W,
) -> bool {
    match shared.audit.append(record).await {
        Ok(_) => true,
        Err(err) => {
            tracing::warn!(error = %err, "a session was refused: its record could not be audited");
            fatal(
                client,
                SQLSTATE_AUDIT,
                &format!("tollgate: cannot audit this session: {err}"),
            )
            .await;
            false
        }
    }
}

/// Writes `bytes` and flushes: over TLS, a write may leave the end of
/// what it was given in the TLS layer's buffer when the socket is full,
/// and without a flush it stays there (the peer waits on an answer that
/// never comes, and tollgate would record it as sent).
async fn send_all<W: tokio::io::AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    send_counted(w, bytes, &mut 0).await
}

/// [`send_all`], keeping in `handed_over` how many of the bytes the
/// connection has taken so far: handed to the kernel (each write is
/// flushed before it counts, so over TLS none still sit in the TLS layer).
/// A batch of answers cut off mid-write, or whose sending is abandoned,
/// reached the agent's connection up to there.
async fn send_counted<W: tokio::io::AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    bytes: &[u8],
    handed_over: &mut usize,
) -> std::io::Result<()> {
    send_counted_unless_stalled(w, bytes, handed_over, None)
        .await
        .map(|_| ())
}

/// [`send_counted`], given up on when the connection takes nothing for
/// `stall` (if given): `Ok(false)` then, with `handed_over` saying how far
/// it got. An agent that reads slowly is served; one that stopped is not
/// waited for.
async fn send_counted_unless_stalled<W: tokio::io::AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    bytes: &[u8],
    handed_over: &mut usize,
    stall: Option<std::time::Duration>,
) -> std::io::Result<bool> {
    async fn within<T>(
        stall: Option<std::time::Duration>,
        step: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        match stall {
            Some(stall) => tokio::time::timeout(stall, step).await.ok(),
            None => Some(step.await),
        }
    }
    let mut taken = 0;
    while taken < bytes.len() {
        let Some(wrote) = within(stall, w.write(&bytes[taken..])).await else {
            return Ok(false);
        };
        match wrote {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => taken += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let Some(flushed) = within(stall, w.flush()).await else {
            return Ok(false);
        };
        flushed?;
        *handed_over = taken;
    }
    Ok(true)
}

/// Sends a FATAL ErrorResponse; the connection is closed after it.
async fn fatal<W: tokio::io::AsyncWrite + Unpin>(client: &mut W, code: &str, message: &str) {
    let mut out = BytesMut::new();
    wire::error_response(&mut out, "FATAL", code, message);
    // A client that does not read would hold the session here for good;
    // it is closed without the FATAL when the wait is over.
    let _ = tokio::time::timeout(FATAL_WRITE_WAIT, async {
        let _ = client.write_all(&out).await;
        let _ = client.shutdown().await;
    })
    .await;
}

/// How long a FATAL (and the close after it) may wait on a client that
/// does not read.
pub(crate) const FATAL_WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
