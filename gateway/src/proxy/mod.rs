//! Protocol adapters and what they share.
//!
//! Every adapter has the same shape, so a reader who knows how a SQL
//! statement is decided knows where any other request is decided:
//!
//! 1. [`serve`] accepts a connection on the target's listener and asks the
//!    kernel maps which agent process made it ([`Connection`]);
//! 2. the adapter reads the credential its protocol already carries and
//!    calls [`Verifier::verify`](crate::identity::Verifier::verify);
//! 3. for each request it normalises the request, asks
//!    [`Policy::decide`](crate::policy::Policy::decide), makes the request
//!    record durable ([`AuditLog::append`]), forwards it with the gateway's
//!    own credential, and records the outcome.

pub mod budget;
pub mod logins;
pub mod postgres;
pub mod refusals;
pub mod tls;

use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::net::TcpListener;
use tracing::{info, warn, Instrument};

use crate::{
    audit::{record, AuditError, AuditLog, AuditRecord},
    config::{Protocol, TargetConfig},
    identity::{IdentityError, Principal, Verifier},
    pin::{ClientOrigin, Pinning},
    policy::Policy,
};

/// Stack of each runtime thread, which parses, walks and drops the syntax
/// trees of agents' statements. Parser recursion bounded by the parser's
/// own limit (50 levels of brackets) still takes more than the default
/// 2 MiB in a debug build (20 nested parenthesised JOINs overflowed it);
/// what can nest without such a limit is bounded before parsing
/// (`classify::nests_within_the_stack`). The stack is reserved, not
/// touched: threads only use what they reach.
pub const RUNTIME_THREAD_STACK_BYTES: usize = 16 << 20;

/// What every session of every target shares.
pub struct Shared {
    pub verifier: Verifier,
    pub policy: Policy,
    pub audit: AuditLog,
    /// Absent when running without the kernel redirect (tests of the
    /// adapter alone); then the client process is not known.
    pub pinning: Option<Mutex<Pinning>>,
    /// Backend keys tollgate handed to PostgreSQL clients, for CancelRequest.
    pub postgres_cancel_keys: Arc<postgres::CancelKeys>,
    /// Memory PostgreSQL server messages held whole may take, all
    /// sessions together.
    pub postgres_held_whole: postgres::HeldWholeBudget,
    /// Parsing work PostgreSQL sessions' heavy statements may take at
    /// once, all sessions together.
    pub postgres_parsing: postgres::ParsingBudget,
    /// Bytes the prepared statements and portals PostgreSQL sessions keep
    /// may take, all sessions together.
    pub postgres_named: postgres::NamedBudget,
    /// The relations PostgreSQL sessions of one database read without
    /// running code, shared for a few seconds by their logins.
    pub postgres_catalogs: postgres::CatalogCache,
    /// The sessions running, and whether the daemon is stopping them.
    pub sessions: Sessions,
    /// Which refusals of unauthenticated connections are written one by
    /// one, and the counts of the others.
    pub refusals: refusals::RefusalLimiter,
}

impl Shared {
    /// Counts a session as running until the returned guard is dropped.
    pub fn session_started(self: &Arc<Self>) -> RunningSession {
        self.sessions.live.send_modify(|n| *n += 1);
        RunningSession(self.clone())
    }

    /// Writes the refusal `record` with the next sync, unless it is of a
    /// connection nobody authenticated past its source's limit: then it is
    /// counted into the source's summary (see [`refusals`]).
    pub fn submit_refusal(&self, record: AuditRecord) {
        if self.refusals.admit(&record) {
            drop(self.audit.submit_lazy(record));
        }
    }

    /// Makes the refusal `record` durable, or counts it as
    /// [`Shared::submit_refusal`] does.
    pub async fn append_refusal(&self, record: AuditRecord) -> Result<(), AuditError> {
        if self.refusals.admit(&record) {
            self.audit.append(record).await?;
        }
        Ok(())
    }

    /// Writes the summaries of counted refusals every
    /// [`refusals::SUMMARY_EVERY`] until the daemon stops its sessions
    /// (it writes the last ones itself, once they have ended).
    pub async fn write_refusal_summaries(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(refusals::SUMMARY_EVERY) => self.flush_refusal_summaries(),
                () = self.sessions.stopping() => return,
            }
        }
    }

    /// Writes the summaries of the refusals counted so far.
    pub fn flush_refusal_summaries(&self) {
        self.write_summaries(self.refusals.take_summaries(now_millis()));
    }

    /// Writes the last summaries, as the daemon stops: refusals after them
    /// are written one by one.
    pub fn flush_last_refusal_summaries(&self) {
        self.write_summaries(self.refusals.take_last_summaries(now_millis()));
    }

    fn write_summaries(&self, summaries: Vec<AuditRecord>) {
        for summary in summaries {
            warn!(detail = %summary.status_detail, "refusals summarized");
            drop(self.audit.submit_lazy(summary));
        }
    }
}

/// The daemon's sessions as a whole: told to stop together, and counted
/// so that the daemon stops its audit store only once they have written
/// their last records.
#[derive(Debug)]
pub struct Sessions {
    stopping: tokio::sync::watch::Sender<bool>,
    live: tokio::sync::watch::Sender<usize>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            stopping: tokio::sync::watch::channel(false).0,
            live: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Sessions {
    /// Tells every listener to stop accepting and every session to end.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once [`Sessions::stop`] was called.
    pub async fn stopping(&self) {
        let mut stopping = self.stopping.subscribe();
        let _ = stopping.wait_for(|stopping| *stopping).await;
    }

    /// How many sessions run now.
    pub fn running(&self) -> usize {
        *self.live.borrow()
    }

    /// Resolves once no session runs.
    pub async fn ended(&self) {
        let mut live = self.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }
}

/// A running session; see [`Shared::session_started`].
pub struct RunningSession(Arc<Shared>);

impl Drop for RunningSession {
    fn drop(&mut self) {
        self.0
            .sessions
            .live
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A target as the proxy serves it: its configuration and its TLS
/// material, loaded once at start.
pub struct Target {
    pub config: TargetConfig,
    pub tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    pub upstream_tls: Option<tls::UpstreamTls>,
}

impl Target {
    /// Loads the TLS material; a bad file stops the daemon at start.
    pub fn new(config: TargetConfig) -> anyhow::Result<Self> {
        let tls_acceptor = match &config.tls {
            Some(tls) => Some(
                tls::acceptor(tls).map_err(|e| anyhow::anyhow!("target {}: {e:#}", config.name))?,
            ),
            None => None,
        };
        let upstream_tls = match &config.upstream_tls {
            Some(tls) => Some(
                tls::connector(tls, config.address.ip())
                    .map_err(|e| anyhow::anyhow!("target {}: {e:#}", config.name))?,
            ),
            None => None,
        };
        Ok(Target {
            config,
            tls_acceptor,
            upstream_tls,
        })
    }
}

impl std::ops::Deref for Target {
    type Target = TargetConfig;
    fn deref(&self) -> &TargetConfig {
        &self.config
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.config.fmt(f)
    }
}

/// One accepted client connection, before any protocol is spoken.
#[derive(Debug)]
pub struct Connection {
    pub session_uid: String,
    pub target: Arc<Target>,
    pub peer: SocketAddr,
    pub origin: Option<ClientOrigin>,
    /// Counted among its source's connections logging in until the
    /// caller is authenticated (see [`logins`]).
    pub login: Option<logins::LoginPermit>,
}

/// Accepts connections for one target until the daemon stops; then the
/// listener is closed, so that agents' connections are refused at once
/// instead of waiting on a daemon that no longer answers.
pub async fn serve(target: Arc<Target>, listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(target.config.max_connections));
    let logins = logins::LoginGate::for_target(target.config.max_connections);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shared.sessions.stopping() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: keep serving others.
                warn!(target = %target.name, error = %err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let origin = shared.pinning.as_ref().and_then(|pinning| {
            pinning
                .lock()
                .ok()?
                .client_origin(peer, target.config.listen)
        });
        let mut connection = Connection {
            session_uid: uuid::Uuid::new_v4().to_string(),
            target: target.clone(),
            peer,
            origin,
            login: None,
        };
        let span =
            tracing::info_span!("session", id = %connection.session_uid, target = %target.name);
        info!(parent: &span, peer = %peer, origin = ?connection.origin, "connection accepted");
        let running = shared.session_started();
        let shared = shared.clone();
        // Held for the connection's life.
        let slot = slots.clone().try_acquire_owned();
        let permit = slot.as_ref().ok().and_then(|_| {
            logins.enter(
                logins::LoginSource::of(&connection),
                slots.available_permits(),
            )
        });
        let per_source = logins.per_source();
        tokio::spawn(
            async move {
                let _running = running;
                let Ok(_slot) = slot else {
                    warn!(
                        max_connections = connection.target.config.max_connections,
                        "connection refused: the target's connection limit is reached"
                    );
                    return match connection.target.protocol {
                        Protocol::Postgres => {
                            postgres::refuse_over_limit(connection, stream, shared, None).await
                        }
                    };
                };
                let Some(permit) = permit else {
                    warn!(
                        per_source,
                        "connection refused: slots are short, and its source has as many connections logging in as it may"
                    );
                    // Its slot is for others while it is refused.
                    drop(_slot);
                    return match connection.target.protocol {
                        Protocol::Postgres => {
                            postgres::refuse_over_limit(connection, stream, shared, Some(per_source))
                                .await
                        }
                    };
                };
                connection.login = Some(permit);
                let _ = stream.set_nodelay(true);
                match connection.target.protocol {
                    Protocol::Postgres => {
                        postgres::serve_connection(connection, stream, shared).await
                    }
                }
            }
            .instrument(span),
        );
    }
}

impl Connection {
    /// The caller is authenticated: the connection no longer counts among
    /// its source's connections logging in.
    pub fn logged_in(&mut self) {
        self.login = None;
    }

    /// A record with the where and who of this connection filled in.
    pub fn record(&self, principal: Option<&Principal>) -> AuditRecord {
        let mut record = AuditRecord {
            time: now_millis(),
            session_uid: self.session_uid.as_str().into(),
            dst_endpoint_name: self.target.name.as_str().into(),
            connection_info_protocol_name: self.target.protocol.name().into(),
            src_endpoint_ip: self.peer.ip().to_string().into(),
            src_endpoint_port: Some(i32::from(self.peer.port())),
            ..AuditRecord::default()
        };
        // The address the agent asked for; without the redirect, the
        // configured target address is the best we know.
        let destination = self
            .origin
            .as_ref()
            .map(|o| o.original_destination)
            .unwrap_or(self.target.address);
        record.dst_endpoint_ip = destination.ip().to_string().into();
        record.dst_endpoint_port = Some(i32::from(destination.port()));
        if let Some(origin) = &self.origin {
            record.actor_process_pid = i32::try_from(origin.pid).ok();
            record.actor_process_name = origin.comm.as_str().into();
            record.actor_process_cgroup_id = i64::try_from(origin.cgroup_id).ok();
        }
        if let Some(p) = principal {
            record.actor_user_uid = p.object_id.as_str().into();
            record.actor_user_name = p.display_name.as_str().into();
            record.actor_user_org_uid = p.tenant_id.as_str().into();
            record.actor_app_uid = p.app_id.as_str().into();
            record.actor_user_groups = p.groups.as_slice().into();
            record.actor_user_roles = p.roles.as_slice().into();
            record.actor_tollgate_roles = p.tollgate_roles.as_slice().into();
            record.actor_session_credential_uid = p.token_id.as_str().into();
            record.actor_session_credential_fingerprint = p.token_fingerprint.as_str().into();
        }
        record
    }

    /// The Authentication record of a refused credential.
    pub fn authentication_refused(&self, error: &IdentityError) -> AuditRecord {
        self.login_refused(None, error.code(), &error.to_string())
    }

    /// The Authentication refusal record of a connection refused around
    /// its login (by `principal`, when the credential was accepted), for
    /// the reason `code: detail`.
    pub fn login_refused(
        &self,
        principal: Option<&Principal>,
        code: &str,
        detail: &str,
    ) -> AuditRecord {
        let mut record = self.record(principal);
        set_class(
            &mut record,
            record::CLASS_AUTHENTICATION,
            record::authentication_activity::LOGON,
        );
        record.phase = "refusal".into();
        record.status_id = record::status::FAILURE;
        // The stable code first, so analysts can group by it.
        record.status_detail = format!("{code}: {detail}");
        record.action_id = record::action::DENIED;
        record
    }

    /// The Authentication record of an accepted credential.
    pub fn authentication_accepted(&self, principal: &Principal) -> AuditRecord {
        let mut record = self.record(Some(principal));
        set_class(
            &mut record,
            record::CLASS_AUTHENTICATION,
            record::authentication_activity::LOGON,
        );
        record.phase = "session".into();
        record.status_id = record::status::SUCCESS;
        record.action_id = record::action::ALLOWED;
        record
    }
}

/// Sets class, activity and the derived type id together.
pub fn set_class(record: &mut AuditRecord, class_uid: i32, activity_id: i32) {
    record.class_uid = class_uid;
    record.activity_id = activity_id;
    record.type_uid = i64::from(class_uid) * 100 + i64::from(activity_id);
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The kernel's cookie of a socket the gateway opened upstream: the
/// evidence probes see the same cookie, which is how verification tells a
/// gateway connection from a bypass.
pub fn socket_cookie(socket: &impl AsRawFd) -> Option<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is a live socket; cookie and len are valid for writes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cookie)
}

/// A TCP socket for a connection upstream, and its cookie, known before
/// the connection is tried: the kernel records the attempt whether or not
/// it succeeds, so the audit names it either way.
pub fn upstream_socket(
    address: SocketAddr,
) -> std::io::Result<(tokio::net::TcpSocket, Option<u64>)> {
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    let cookie = socket_cookie(&socket);
    Ok((socket, cookie))
}
