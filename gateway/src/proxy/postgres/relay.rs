//! The relay of an authenticated session: every statement is decided and
//! made durable in the audit before it reaches the server, and its outcome
//! is recorded when the server has answered.
//!
//! Two tasks share the session: one reads the agent's messages and forwards
//! them, the other reads the server's answers and forwards them. The
//! requests in flight form a queue; the server answers them in order, which
//! is how an answer is tied to its statement, pipelining included.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Instant,
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf},
    sync::Notify,
};
use tracing::warn;

use super::{
    classify::classify,
    mask::{self, MaskSet, ResultMask},
};
use super::{
    send_all, send_counted,
    upstream::Upstream,
    wire::{self, Frame, WireError},
    SQLSTATE_AUDIT, SQLSTATE_POLICY,
};
use crate::{
    audit::{record, AuditError, AuditRecord, Durable, SharedText},
    identity::Principal,
    policy::{Decision, Operation, RecordResults, Request, StatementKind},
    proxy::tls::BoxedIo,
    proxy::{now_millis, set_class, Connection, Shared},
};

pub struct Session {
    pub connection: Connection,
    pub principal: Principal,
    /// Intent stated in application_name (`intent: ...`), if any. The
    /// server reports every change of application_name (ParameterStatus),
    /// whether set at startup or later with SET, and this follows it.
    pub intent: Mutex<String>,
    /// Columns masked for this caller; empty: nothing to mask.
    pub masks: MaskSet,
    pub shared: Arc<Shared>,
    /// What every statement record of the session shares (who, from
    /// where, which database user and database), built once by [`statement_record_base`]:
    /// a statement's record starts as a copy of it rather than being
    /// built (addresses formatted, identity copied) again per statement.
    pub statement_record: AuditRecord,
}

/// The fields every statement record of a session shares; the time is
/// set per record.
pub fn statement_record_base(
    connection: &Connection,
    principal: &Principal,
    database_user: SharedText,
    database_name: SharedText,
    upstream_socket_cookie: Option<u64>,
) -> AuditRecord {
    let mut record = connection.record(Some(principal));
    record.database_user = database_user;
    record.database_name = database_name;
    record.upstream_socket_cookie = upstream_socket_cookie.and_then(|c| i64::try_from(c).ok());
    record
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A simple-protocol Query: answered up to ReadyForQuery.
    Query,
    /// An extended-protocol Execute: answered by CommandComplete,
    /// EmptyQueryResponse, PortalSuspended or ErrorResponse.
    Execute,
    /// A Sync: answered by ReadyForQuery.
    Sync,
    /// A refused Execute, sent on as an Execute of a portal that cannot
    /// exist (the session's refusal marker): the server answers it with an
    /// error in its exact place in the pipeline, and skips to Sync as it
    /// does after any error; tollgate puts its refusal in that error's
    /// place.
    RefusedExecute,
    /// A refused simple Query or FunctionCall, sent on as a Query that
    /// cannot parse (the marker): answered by an error and ReadyForQuery.
    RefusedQuery,
    /// A Parse: the statement exists once ParseComplete confirms it; an
    /// error (or an earlier error in the pipeline) means it never did.
    Parse,
    /// A Bind: the portal exists once BindComplete confirms it.
    Bind,
    /// A Describe: answered by RowDescription or NoData (after a
    /// ParameterDescription for a statement), or an error.
    Describe,
    /// A Close: the statement or portal is gone once CloseComplete comes.
    Close,
}

struct Pending {
    kind: Kind,
    /// The durable request record, the outcome record starts from it.
    request: Option<AuditRecord>,
    started: Instant,
    rows: i64,
    bytes: i64,
    tag_rows: Option<i64>,
    error: Option<(String, String)>,
    /// For a refusal: the SQLSTATE and message the client gets.
    refusal: Option<(String, String)>,
    /// The statement reads a table with masked columns.
    reads_masked: bool,
    /// How to mask the rows of the current result set.
    result_mask: Option<ResultMask>,
    /// Columns masked in this request's results, for the audit.
    masked_columns: BTreeSet<String>,
    /// For a Parse: the statement's name and what it is.
    parse: Option<(String, Arc<Prepared>)>,
    /// For a Bind: the portal's name, the statement and the rendered
    /// parameters.
    bind: Option<(String, Bound)>,
    /// For a Close: 'S' or 'P', and the name.
    close: Option<(u8, String)>,
    /// For a Describe: it describes the portal the next Execute runs.
    describes_next_execute: bool,
    /// For a Sync: copy data was sent before it since the last Execute,
    /// so it was not sent into the start of a COPY FROM STDIN.
    after_copy_data: bool,
    /// For a Query or Execute: how many CopyDone or CopyFail the client
    /// sent behind it before the server answered with CopyInResponse (a
    /// client that does not wait for it). A COPY FROM STDIN of it that
    /// starts is then already over as far as the client is concerned.
    copies_ended_early: u32,
    /// Tells entries apart while the client waits for one to be answered.
    id: u64,
    /// The name generation it was sent in (see `InFlight::generation`).
    generation: u64,
    /// The request record while it is still syncing (read-only requests
    /// forwarded in parallel): awaited before any answer goes out.
    durable: Option<Durable>,
    /// Why the server's answer was withheld from the agent: its request
    /// record could not be written.
    withheld: Option<String>,
    /// The server's answer has come and waits for the request record to
    /// be durable.
    answer_held: bool,
    /// Rows kept for the audit when the grant records full results.
    recording: Option<ResultRecording>,
}

/// The rows of a request's results kept for the audit (after masking),
/// up to a size cap.
#[derive(Default)]
struct ResultRecording {
    rows: Vec<serde_json::Value>,
    bytes: usize,
    dropped: i64,
}

/// Per statement, what `record_results = "full"` keeps at most.
const MAX_RECORDED_RESULT_BYTES: usize = 64 * 1024;

impl ResultRecording {
    fn add(&mut self, row: &Frame) {
        let Ok(values) = mask::data_row_values(row) else {
            return;
        };
        let row: Vec<serde_json::Value> = values
            .into_iter()
            .map(|v| match v {
                None => serde_json::Value::Null,
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) => serde_json::Value::String(text.to_owned()),
                    Err(_) => serde_json::Value::String(format!("\\x{}", hex::encode(bytes))),
                },
            })
            .collect();
        let row = serde_json::Value::Array(row);
        let size = row.to_string().len();
        if self.dropped > 0 || self.bytes + size > MAX_RECORDED_RESULT_BYTES {
            self.dropped += 1;
            return;
        }
        self.bytes += size;
        self.rows.push(row);
    }

    fn into_json(mut self) -> String {
        if self.dropped > 0 {
            self.rows
                .push(serde_json::json!({ "truncated_rows": self.dropped }));
        }
        serde_json::Value::Array(self.rows).to_string()
    }
}

impl Pending {
    fn new(kind: Kind, request: Option<AuditRecord>) -> Self {
        Self {
            kind,
            request,
            started: Instant::now(),
            rows: 0,
            bytes: 0,
            tag_rows: None,
            error: None,
            refusal: None,
            reads_masked: false,
            result_mask: None,
            masked_columns: BTreeSet::new(),
            parse: None,
            bind: None,
            close: None,
            describes_next_execute: false,
            after_copy_data: false,
            copies_ended_early: 0,
            id: 0,
            generation: 0,
            durable: None,
            withheld: None,
            answer_held: false,
            recording: None,
        }
    }
}

/// What a portal runs: the statement and its rendered parameters.
type Bound = (Arc<Prepared>, String);

#[derive(Default)]
struct InFlight {
    queue: VecDeque<Pending>,
    /// Prepared statements the server has confirmed (ParseComplete), with
    /// the generation they were parsed in.
    statements: HashMap<String, (u64, Arc<Prepared>)>,
    /// Portals the server has confirmed (BindComplete), likewise.
    portals: HashMap<String, (u64, Bound)>,
    /// Bumped when a statement that may create or drop statements or
    /// portals in SQL (DECLARE, CLOSE, PREPARE, DEALLOCATE, DISCARD, or
    /// one tollgate could not parse) is sent: names defined before it are
    /// no longer trusted, and resolve as unknown until defined again.
    generation: u64,
    /// The server met an error in an extended-protocol pipeline and skips
    /// everything up to the client's next Sync: what the client sends
    /// meanwhile is dropped, not queued (it would get no answer).
    server_skipping: bool,
    /// The server is in COPY FROM STDIN: only copy messages (and the Flush
    /// and Sync it ignores) may follow until CopyDone or CopyFail.
    copy_in: bool,
    /// The session's refusal marker: the name of the portal a refused
    /// Execute is replaced by, and the text a refused Query is replaced by.
    /// Random, so no statement or portal of the agent's can be it; the
    /// server's error naming it is known to be the refusal's and no other.
    marker: String,
    next_id: u64,
    /// Why tollgate itself closed the session (the SQLSTATE and message
    /// of the FATAL the agent got): the reason requests still in flight
    /// never had their answers relayed, whether or not the server had
    /// answered them yet.
    closed_by: Option<(String, String)>,
}

fn refusal_marker() -> String {
    format!("tollgate_refused_{}", uuid::Uuid::new_v4().simple())
}

/// What a name (of a statement or a portal) stands for when the server
/// reaches the message that uses it.
enum Resolved<T> {
    Known(T),
    /// A Parse, Bind or Close of the name sent before the last Sync is
    /// still unanswered: whether it took effect decides what the server
    /// will use, so the client's messages wait until it is answered.
    WaitFor(u64),
}

impl InFlight {
    fn push(&mut self, mut pending: Pending) {
        self.next_id += 1;
        pending.id = self.next_id;
        pending.generation = self.generation;
        self.queue.push_back(pending);
    }

    /// The client ended a copy (CopyDone or CopyFail) outside COPY FROM
    /// STDIN mode: it belongs to the latest Query or Execute, whose
    /// CopyInResponse has not come yet (if that is no COPY, the server
    /// ignores the message, and so does this count).
    fn copy_ended_early(&mut self) {
        if let Some(statement) = self.queue.iter_mut().rev().find(|p| {
            // A refused one counts too: it starts no copy, and the
            // server ignores copy messages outside one.
            matches!(
                p.kind,
                Kind::Query | Kind::Execute | Kind::RefusedQuery | Kind::RefusedExecute
            )
        }) {
            statement.copies_ended_early += 1;
        }
    }

    /// What the server will find under a statement or portal name. The
    /// latest Parse/Bind/Close of it still in flight decides when it is in
    /// the current pipeline (no Sync since): if it fails, the server skips
    /// to Sync and never uses the name. One sent before a Sync may fail and
    /// leave the older definition in place: wait for its answer. Otherwise
    /// what the server confirmed.
    fn resolve<T: Clone>(
        &self,
        unnamed: bool,
        defines: impl Fn(&Pending) -> Option<Option<T>>,
        confirmed: Option<&(u64, T)>,
    ) -> Resolved<Option<T>> {
        let mut synced_since = false;
        for pending in self.queue.iter().rev() {
            if pending.generation != self.generation {
                // Sent before names stopped being trusted.
                break;
            }
            if pending.kind == Kind::Sync {
                synced_since = true;
                continue;
            }
            if unnamed && matches!(pending.kind, Kind::Query | Kind::RefusedQuery) {
                // A simple Query drops the unnamed statement and portal
                // before it runs, whatever came before it.
                return Resolved::Known(None);
            }
            if let Some(definition) = defines(pending) {
                return if synced_since {
                    Resolved::WaitFor(pending.id)
                } else {
                    Resolved::Known(definition)
                };
            }
        }
        Resolved::Known(
            confirmed
                .filter(|(generation, _)| *generation == self.generation)
                .map(|(_, found)| found.clone()),
        )
    }

    /// After a statement that may create or drop statements or portals in
    /// SQL (or one not understood) is sent, names defined before it are no
    /// longer trusted.
    fn note_renames(&mut self, operations: &Result<Vec<Operation>, String>) {
        let renames = match operations {
            Ok(ops) => ops.iter().any(|op| op.renames_protocol_objects),
            Err(_) => true,
        };
        if renames {
            self.generation += 1;
        }
    }

    fn statement(&self, name: &str) -> Resolved<Option<Arc<Prepared>>> {
        self.resolve(
            name.is_empty(),
            |p| match (&p.parse, &p.close) {
                (Some((parsed, prepared)), _) if parsed == name => Some(Some(prepared.clone())),
                (_, Some((b'S', closed))) if closed == name => Some(None),
                _ => None,
            },
            self.statements.get(name),
        )
    }

    fn portal(&self, name: &str) -> Resolved<Option<Bound>> {
        self.resolve(
            name.is_empty(),
            |p| match (&p.bind, &p.close) {
                (Some((bound, what)), _) if bound == name => Some(Some(what.clone())),
                (_, Some((b'P', closed))) if closed == name => Some(None),
                _ => None,
            },
            self.portals.get(name),
        )
    }
}

type ClientWriter = Arc<tokio::sync::Mutex<WriteHalf<BoxedIo>>>;
pub type ClientReader = ReadHalf<BoxedIo>;

/// Bytes a read may take at once, from either side.
const READ_CHUNK: usize = 16 * 1024;

pub async fn run(
    session: Session,
    client_rd: ClientReader,
    client_buf: BytesMut,
    client_wr: WriteHalf<BoxedIo>,
    upstream: Upstream,
) -> Result<(), WireError> {
    let session = Arc::new(session);
    let in_flight = Arc::new(Mutex::new(InFlight {
        marker: refusal_marker(),
        ..InFlight::default()
    }));
    // Signalled whenever server answers have been taken off the queue.
    let answered = Arc::new(Notify::new());
    let client_wr: ClientWriter = Arc::new(tokio::sync::Mutex::new(client_wr));
    let (upstream_rd, upstream_wr) = tokio::io::split(upstream.stream);

    let to_server = client_to_server(
        session.clone(),
        client_rd,
        client_buf,
        upstream_wr,
        client_wr.clone(),
        in_flight.clone(),
        answered.clone(),
    );
    let expiry_writer = client_wr.clone();
    let to_client = server_to_client(
        session.clone(),
        upstream_rd,
        upstream.buffered,
        client_wr,
        in_flight.clone(),
        answered,
    );
    let deadline = session.shared.verifier.session_deadline(&session.principal);
    // Whichever side ends first ends the session; so does the token's expiry.
    let result = tokio::select! {
        r = to_server => r,
        r = to_client => r,
        () = sleep_until_epoch(deadline) => {
            end_expired_session(&session, &expiry_writer, &in_flight).await;
            Ok(())
        }
    };
    record_unanswered(&session, &in_flight);
    result
}

/// Writes the outcome records of the requests still in flight when the
/// session ends (see [`unanswered_outcomes`]).
fn record_unanswered(session: &Session, in_flight: &Mutex<InFlight>) {
    let (left, closed_by) = {
        let mut in_flight = lock(in_flight);
        let left: Vec<Pending> = in_flight.queue.drain(..).collect();
        (left, in_flight.closed_by.take())
    };
    for outcome in unanswered_outcomes(left, closed_by) {
        submit_outcome(session, outcome);
    }
}

/// The outcome records of requests still in flight when the session ended:
/// the agent never got their answers. Each was sent to the server and may
/// have run (an UPDATE pipelined before the agent hung up commits), so its
/// status is unknown, not a failure an auditor could filter out.
/// `closed_by` is why tollgate closed the session, if it did (see
/// [`InFlight::closed_by`]).
fn unanswered_outcomes(
    left: Vec<Pending>,
    closed_by: Option<(String, String)>,
) -> Vec<AuditRecord> {
    left.into_iter()
        .filter_map(|mut pending| {
            // A read's request record that is known to have failed by now
            // is why its answer, had it come, was withheld.
            if let Some(err) = pending.durable.as_mut().and_then(Durable::failed_by_now) {
                pending.withheld.get_or_insert(err.to_string());
            }
            let why = match (pending.withheld.take(), pending.answer_held) {
                (Some(err), _) => (
                    SQLSTATE_AUDIT.to_string(),
                    format!("tollgate withheld the server's answer: the request's audit record could not be written ({err})"),
                ),
                (None, true) => (
                    super::SQLSTATE_UPSTREAM.to_string(),
                    "the session ended while the server's answer waited for the request's audit record to be durable".to_string(),
                ),
                (None, false) => match &closed_by {
                    Some((code, message)) => (
                        code.clone(),
                        format!("tollgate closed the session before the server's answer was relayed in full: {message}"),
                    ),
                    None => (
                        super::SQLSTATE_UPSTREAM.to_string(),
                        "the server had not answered".to_string(),
                    ),
                },
            };
            let mut outcome = outcome_record(pending, Some(why), Delivery::NotSent)?;
            outcome.status_id = record::status::UNKNOWN;
            Some(outcome)
        })
        .collect()
}

async fn sleep_until_epoch(deadline: Option<i64>) {
    match deadline {
        Some(at) => {
            let now = now_millis() / 1000;
            let left = u64::try_from(at.saturating_sub(now)).unwrap_or(0);
            tokio::time::sleep(std::time::Duration::from_secs(left)).await;
        }
        None => std::future::pending().await,
    }
}

/// The token behind the session expired: the agent is told, in its
/// protocol, and must come back with a fresh token.
async fn end_expired_session(
    session: &Session,
    client_wr: &ClientWriter,
    in_flight: &Mutex<InFlight>,
) {
    let message = format!(
        "tollgate: the session's token expired at {}; reconnect with a fresh token",
        session.principal.expires_at
    );
    let mut record = session
        .connection
        .authentication_accepted(&session.principal);
    record.phase = "session".into();
    record.status_id = record::status::FAILURE;
    record.status_detail = format!("token_expired: {message}");
    record.database_user = session.statement_record.database_user.clone();
    record.database_name = session.statement_record.database_name.clone();
    if let Err(err) = session.shared.audit.append(record).await {
        warn!(error = %err, "the end of an expired session could not be audited");
    }
    fatal_to_client(client_wr, in_flight, super::SQLSTATE_IDENTITY, &message).await;
}

fn lock(in_flight: &Mutex<InFlight>) -> std::sync::MutexGuard<'_, InFlight> {
    // A poisoned lock only means another task panicked mid-update; the
    // queue itself is still a queue.
    in_flight
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn client_to_server(
    session: Arc<Session>,
    mut client_rd: ClientReader,
    mut buf: BytesMut,
    mut upstream_wr: WriteHalf<BoxedIo>,
    client_wr: ClientWriter,
    in_flight: Arc<Mutex<InFlight>>,
    answered: Arc<Notify>,
) -> Result<(), WireError> {
    let marker = lock(&in_flight).marker.clone();
    // Prepared statements are classified once, at Parse; statements and
    // portals exist for tollgate once the server confirms them
    // (InFlight::statements, InFlight::portals; see InFlight::resolve).
    // Copy data sent since the last Execute or Query: a Sync after it was not sent
    // into the start of a COPY FROM STDIN (see `after_copy_data`).
    let mut copy_data_sent = false;
    // After a refused Execute, the rest of the pipeline up to Sync is
    // dropped, as PostgreSQL itself does after an error.
    let mut skipping_to_sync = false;
    // The last Describe sent (kind 'S' or 'P', name), until an Execute.
    let mut last_describe: Option<(u8, String)> = None;
    // A Query, or the Sync after an Execute, that may change the client
    // encoding where tollgate cannot see it (a function it cannot look
    // into, text it cannot parse): the server would read the messages
    // pipelined behind it in the new encoding, before the server's report
    // of the change ends the session. They wait for its answer (the report
    // comes before it), so only messages read as tollgate read them reach
    // the server.
    let mut encoding_barrier: Option<u64> = None;
    let mut execute_may_change_encoding = false;
    loop {
        let mut forward = BytesMut::new();
        // Messages are taken in order; a malformed one ends the session
        // (see `end_on_malformed`), after what came before it.
        let taken: Result<Flow, WireError> = async {
            while let Some(frame) = wire::split_frame_limited(&mut buf, wire::MAX_CLIENT_MESSAGE)? {
                if let Some(id) = encoding_barrier.take() {
                    // Until its whole answer has come (or the server waits
                    // for COPY data, which only the client can send).
                    resolve_waiting(&in_flight, &answered, &mut forward, &mut upstream_wr, |f| {
                        match f.copy_in || !f.queue.iter().any(|p| p.id == id) {
                            true => Resolved::Known(Some(())),
                            false => Resolved::WaitFor(id),
                        }
                    })
                    .await?;
                }
                if skipping_to_sync && frame.tag != b'S' {
                    continue;
                }
                // One look at the server's state per message.
                let (server_skipping, copy_in) = {
                    let state = lock(&in_flight);
                    (state.server_skipping, state.copy_in)
                };
                if frame.tag != b'S' && server_skipping {
                    continue;
                }
                if copy_in {
                    match frame.tag {
                        b'd' | b'H' => {}
                        // The server ignores a Sync in COPY FROM STDIN: it
                        // gets no ReadyForQuery of its own.
                        b'S' => {}
                        b'c' | b'f' => {
                            copy_data_sent = true;
                            lock(&in_flight).copy_in = false;
                        }
                        other => {
                            return Err(WireError::Malformed(format!(
                                "message {:?} in the middle of COPY FROM STDIN",
                                other as char
                            )));
                        }
                    }
                    forward.unsplit(frame.bytes);
                    continue;
                }
                match frame.tag {
                    b'Q' => {
                        // Like an Execute, a Query may start a COPY FROM STDIN:
                        // whether a Sync behind it follows copy data counts
                        // from here.
                        copy_data_sent = false;
                        let text = wire::query_text(&frame).map_err(in_message("Query"))?;
                        let operations = classify_within_limit(&text);
                        match admit(&session, &text, &operations, String::new()).await {
                            Ok(admitted) => {
                                let mut pending = admitted.into_pending(Kind::Query);
                                pending.reads_masked = reads_masked(&session.masks, &operations);
                                let mut guard = lock(&in_flight);
                                guard.push(pending);
                                guard.note_renames(&operations);
                                if may_change_encoding_unseen(&operations) {
                                    encoding_barrier = guard.queue.back().map(|p| p.id);
                                }
                                drop(guard);
                                forward.unsplit(frame.bytes);
                            }
                            Err(refusal) => {
                                refuse_in_place(&in_flight, refusal, &marker, &mut forward)
                            }
                        }
                    }
                    // FunctionCall runs a server function by OID with no SQL
                    // for the policy to read (lo_import, pg_read_file, ...):
                    // always refused.
                    b'F' => {
                        let refusal = refuse_function_call(&session, &frame).await;
                        refuse_in_place(&in_flight, refusal, &marker, &mut forward);
                    }
                    b'P' => {
                        let (name, text, parameter_types) =
                            wire::parse_message(&frame).map_err(in_message("Parse"))?;
                        let operations = Arc::new(classify_within_limit(&text));
                        let prepared = Arc::new(Prepared {
                            text,
                            operations,
                            parameter_types,
                        });
                        let mut parse = Pending::new(Kind::Parse, None);
                        parse.parse = Some((name, prepared));
                        lock(&in_flight).push(parse);
                        forward.unsplit(frame.bytes);
                    }
                    b'B' => {
                        let (portal, statement) =
                            wire::bind_message(&frame).map_err(in_message("Bind"))?;
                        // The portal runs the statement as the server will
                        // find it: a later Parse of the same name does not
                        // change it.
                        let prepared = resolve_waiting(
                            &in_flight,
                            &answered,
                            &mut forward,
                            &mut upstream_wr,
                            |f| f.statement(&statement),
                        )
                        .await?
                        .unwrap_or_else(|| Arc::new(Prepared::unknown()));
                        let parameters = wire::bind_parameters_rendered(
                            &frame,
                            &prepared.parameter_types,
                            MAX_PARAMETER_BYTES,
                            MAX_PARAMETERS_BYTES,
                        )
                        .map_err(in_message("Bind"))?;
                        let mut bind = Pending::new(Kind::Bind, None);
                        bind.bind = Some((portal, (prepared, parameters)));
                        lock(&in_flight).push(bind);
                        forward.unsplit(frame.bytes);
                    }
                    b'E' => {
                        let portal = wire::execute_portal(&frame).map_err(in_message("Execute"))?;
                        copy_data_sent = false;
                        let (prepared, parameters) = resolve_waiting(
                            &in_flight,
                            &answered,
                            &mut forward,
                            &mut upstream_wr,
                            |f| f.portal(&portal),
                        )
                        .await?
                        .unwrap_or_else(|| (Arc::new(Prepared::unknown()), String::new()));
                        match admit(&session, &prepared.text, &prepared.operations, parameters)
                            .await
                        {
                            Ok(admitted) => {
                                let mut pending = admitted.into_pending(Kind::Execute);
                                pending.reads_masked =
                                    reads_masked(&session.masks, &prepared.operations);
                                let described = matches!(
                                    last_describe.take(),
                                    Some((b'P', described)) if described == portal
                                );
                                let mut guard = lock(&in_flight);
                                // The RowDescription that plans this Execute's
                                // masking answers the Describe just before it.
                                if described {
                                    if let Some(describe) =
                                        guard.queue.back_mut().filter(|p| p.kind == Kind::Describe)
                                    {
                                        describe.describes_next_execute = true;
                                    }
                                }
                                guard.push(pending);
                                guard.note_renames(&prepared.operations);
                                drop(guard);
                                execute_may_change_encoding |=
                                    may_change_encoding_unseen(&prepared.operations);
                                forward.unsplit(frame.bytes);
                            }
                            Err(refusal) => {
                                let mut pending = Pending::new(Kind::RefusedExecute, None);
                                pending.refusal = Some((refusal.code, refusal.message));
                                lock(&in_flight).push(pending);
                                wire::execute(&mut forward, &marker);
                                // The server skips to Sync after the marker's
                                // error; so does tollgate, which neither
                                // decides nor audits what would be skipped.
                                skipping_to_sync = true;
                            }
                        }
                    }
                    b'S' => {
                        skipping_to_sync = false;
                        let mut sync = Pending::new(Kind::Sync, None);
                        sync.after_copy_data = copy_data_sent;
                        let mut guard = lock(&in_flight);
                        guard.server_skipping = false;
                        guard.push(sync);
                        // The server reports a changed encoding at the Sync.
                        if std::mem::take(&mut execute_may_change_encoding) {
                            encoding_barrier = guard.queue.back().map(|p| p.id);
                        }
                        drop(guard);
                        forward.unsplit(frame.bytes);
                    }
                    b'C' => {
                        let (kind, name) =
                            wire::close_message(&frame).map_err(in_message("Close"))?;
                        let mut close = Pending::new(Kind::Close, None);
                        close.close = Some((kind, name));
                        lock(&in_flight).push(close);
                        forward.unsplit(frame.bytes);
                    }
                    b'X' => {
                        forward.unsplit(frame.bytes);
                        send_all(&mut upstream_wr, &forward).await?;
                        let _ = upstream_wr.shutdown().await;
                        return Ok(Flow::Terminated);
                    }
                    // Describe, Flush and the COPY sub-protocol carry no
                    // statement of their own.
                    b'D' => {
                        // Which result shape the next RowDescription belongs to:
                        // only a Describe of the portal about to be executed
                        // may plan that Execute's masking.
                        last_describe =
                            Some(wire::close_message(&frame).map_err(in_message("Describe"))?);
                        lock(&in_flight).push(Pending::new(Kind::Describe, None));
                        forward.unsplit(frame.bytes);
                    }
                    b'd' | b'c' | b'f' => {
                        copy_data_sent = true;
                        if frame.tag != b'd' {
                            lock(&in_flight).copy_ended_early();
                        }
                        forward.unsplit(frame.bytes);
                    }
                    b'H' => forward.unsplit(frame.bytes),
                    // Anything else is not a frontend message of protocol 3.0
                    // after startup: the stream cannot be trusted to be in step.
                    other => {
                        return Err(WireError::Malformed(format!(
                            "unexpected message {:?} from the client",
                            other as char
                        )));
                    }
                }
            }
            Ok(Flow::Continue)
        }
        .await;
        match taken {
            Ok(Flow::Continue) => {}
            Ok(Flow::Terminated) => return Ok(()),
            Err(WireError::Malformed(reason)) => {
                end_on_malformed(
                    &session,
                    &client_wr,
                    &in_flight,
                    &mut upstream_wr,
                    &forward,
                    &reason,
                )
                .await;
                return Err(WireError::Malformed(reason));
            }
            Err(err) => return Err(err),
        }
        if !forward.is_empty() {
            send_all(&mut upstream_wr, &forward).await?;
        }
        // The forwarded messages share the read buffer's memory: let them
        // go first, so the reserve below reuses that buffer instead of
        // allocating a fresh one for every read.
        drop(forward);
        // Read whatever the client has sent, not just what fits the
        // buffer's spare bytes (64 when it has none): a pipeline read in
        // pieces goes to the server in pieces, and each piece costs the
        // server a wake-up and a flush of its answers so far.
        buf.reserve(READ_CHUNK);
        if client_rd.read_buf(&mut buf).await? == 0 {
            return Err(WireError::Closed);
        }
    }
}

/// Names the message a decoding error was found in, for the client and
/// the audit.
fn in_message(name: &'static str) -> impl Fn(WireError) -> WireError {
    move |err| match err {
        WireError::Malformed(reason) => WireError::Malformed(format!("{name} message: {reason}")),
        other => other,
    }
}

/// Whether a statement may change the client encoding out of tollgate's
/// sight: it calls a function tollgate cannot look into (one of the
/// agent's may call set_config), or its text could not be parsed. The
/// visible ways are refused by policy (`encoding:client_encoding`).
fn may_change_encoding_unseen(operations: &Result<Vec<Operation>, String>) -> bool {
    match operations {
        Ok(operations) => operations.iter().any(|op| op.calls_functions),
        Err(_) => true,
    }
}

/// What taking the client's messages so far leaves the session to do.
enum Flow {
    Continue,
    /// The client sent Terminate: the session is over.
    Terminated,
}

/// A message the client sent cannot be read as one of protocol 3.0 (cut
/// short, not UTF-8, too long, unknown, or out of place): the stream can
/// no longer be trusted to be in step. What the client sent before it was
/// admitted and goes on to the server, as the server itself would run it;
/// the refusal is recorded (durably, before the client hears of it), and
/// the session ends with FATAL 08P01. Requests still in flight are
/// recorded with that reason when the session ends.
async fn end_on_malformed(
    session: &Session,
    client_wr: &ClientWriter,
    in_flight: &Mutex<InFlight>,
    upstream_wr: &mut WriteHalf<BoxedIo>,
    admitted_before: &[u8],
    reason: &str,
) {
    if !admitted_before.is_empty() {
        let _ = send_all(upstream_wr, admitted_before).await;
    }
    let mut record = new_statement_record(session, record::datastore_activity::QUERY);
    mark_refused(
        &mut record,
        "protocol:malformed",
        &format!("malformed message from the client: {reason}"),
    );
    if let Err(err) = session.shared.audit.append(record).await {
        warn!(error = %err, "the refusal of a malformed message could not be audited");
    }
    fatal_to_client(
        client_wr,
        in_flight,
        super::SQLSTATE_PROTOCOL,
        &format!("tollgate: {reason}; the session is closed"),
    )
    .await;
}

/// A refused simple Query or FunctionCall goes on as the marker Query,
/// which cannot parse: the server answers it with an error and
/// ReadyForQuery in its exact place, after everything sent before it, and
/// tollgate puts its refusal in place of that error. Nothing waits, so a
/// pipeline the client has not synced cannot hang the session.
fn refuse_in_place(
    in_flight: &Mutex<InFlight>,
    refusal: Refusal,
    marker: &str,
    forward: &mut BytesMut,
) {
    let mut pending = Pending::new(Kind::RefusedQuery, None);
    pending.refusal = Some((refusal.code, refusal.message));
    lock(in_flight).push(pending);
    wire::query(forward, marker);
}

/// Resolves a statement or portal name (see [`InFlight::resolve`]). When
/// an earlier pipeline's Parse, Bind or Close of it is unanswered, what is
/// buffered goes to the server (a Sync follows that message, so the server
/// answers it) and the client's messages wait for that answer.
async fn resolve_waiting<T>(
    in_flight: &Mutex<InFlight>,
    answered: &Notify,
    forward: &mut BytesMut,
    upstream_wr: &mut WriteHalf<BoxedIo>,
    lookup: impl Fn(&InFlight) -> Resolved<Option<T>>,
) -> Result<Option<T>, WireError> {
    loop {
        let notified = answered.notified();
        let waiting_for = match lookup(&lock(in_flight)) {
            Resolved::Known(found) => return Ok(found),
            Resolved::WaitFor(id) => id,
        };
        if !forward.is_empty() {
            send_all(upstream_wr, forward).await?;
            forward.clear();
        }
        if lock(in_flight).queue.iter().any(|p| p.id == waiting_for) {
            notified.await;
        }
    }
}

/// Ends the session with a FATAL error the client can read, and keeps
/// why for the records of requests still in flight. Holding the writer
/// lock puts it between two whole messages.
async fn fatal_to_client(
    client_wr: &ClientWriter,
    in_flight: &Mutex<InFlight>,
    code: &str,
    message: &str,
) {
    close_after_built_answers(&[], &mut 0, client_wr, in_flight, code, message).await;
}

/// Makes `record` the refusal of its request by `rule`, for `detail`.
fn mark_refused(record: &mut AuditRecord, rule: &str, detail: &str) {
    record.phase = "refusal".into();
    record.status_id = record::status::FAILURE;
    record.action_id = record::action::DENIED;
    record.policy_uid = rule.into();
    record.status_detail = detail.into();
}

/// The refusal (and its audit row) of a FunctionCall message.
async fn refuse_function_call(session: &Session, frame: &Frame) -> Refusal {
    let oid = frame
        .body()
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0);
    let mut record = new_statement_record(session, record::datastore_activity::QUERY);
    record.query_info_query_string = format!("FunctionCall (function oid {oid})");
    record.query_info_kind = "unparsed".into();
    mark_refused(
        &mut record,
        "protocol:function_call",
        "the FunctionCall message runs a function with no SQL to decide on",
    );
    let message = match session.shared.audit.append(record).await {
        Ok(_) => "tollgate: refused by rule protocol:function_call: the FunctionCall message is not allowed; call the function in SQL".to_owned(),
        Err(err) => format!("tollgate: refused by rule protocol:function_call (and the refusal could not be audited: {err})"),
    };
    Refusal {
        code: SQLSTATE_POLICY.into(),
        message,
    }
}

/// Caps on what the audit keeps of bound parameters.
const MAX_PARAMETER_BYTES: usize = 256;
const MAX_PARAMETERS_BYTES: usize = 4096;

/// A statement prepared with Parse, classified once.
struct Prepared {
    text: String,
    operations: Arc<Result<Vec<Operation>, String>>,
    parameter_types: Vec<u32>,
}

impl Prepared {
    /// What an Execute of an unknown portal runs: nothing tollgate could
    /// understand, so only `allow_unparsed` lets it through.
    fn unknown() -> Self {
        Prepared {
            text: String::new(),
            operations: Arc::new(Err(
                "portal or statement not prepared through this session".into()
            )),
            parameter_types: Vec::new(),
        }
    }
}

struct Refusal {
    code: String,
    message: String,
}

/// Decides a statement and makes its request record durable (or, for a
/// provably read-only statement, starts making it durable: the returned
/// [`Durable`] must resolve before any of its answer reaches the agent).
/// `Ok` carries the record the outcome will complete; `Err` is what the
/// agent is told.
/// An admitted request: its durable (or syncing) request record, and
/// whether its results are recorded in full.
struct Admitted {
    record: AuditRecord,
    durable: Option<Durable>,
    record_full: bool,
}

impl Admitted {
    fn into_pending(self, kind: Kind) -> Pending {
        let mut pending = Pending::new(kind, Some(self.record));
        pending.durable = self.durable;
        if self.record_full {
            pending.recording = Some(ResultRecording::default());
        }
        pending
    }
}

/// Reads only, touches no dangerous feature and calls no function (a
/// function may write): nothing can change if it runs before its record
/// is durable.
fn provably_read_only(operations: &Result<Vec<Operation>, String>) -> bool {
    matches!(operations, Ok(ops) if !ops.is_empty() && ops.iter().all(|op| {
        op.kind == StatementKind::Read && op.dangers.is_empty() && !op.calls_functions && op.writes.is_empty()
    }))
}

/// A statement's record as it starts: the session's shared fields, the
/// time, the class of activity, a fresh request id.
fn new_statement_record(session: &Session, activity: i32) -> AuditRecord {
    let mut record = session.statement_record.clone();
    record.time = now_millis();
    set_class(&mut record, record::CLASS_DATASTORE_ACTIVITY, activity);
    record.request_uid = uuid::Uuid::new_v4().to_string();
    record
}

async fn admit(
    session: &Session,
    text: &str,
    operations: &Result<Vec<Operation>, String>,
    parameters: String,
) -> Result<Admitted, Refusal> {
    if text.len() > MAX_AUDITED_STATEMENT {
        return Err(refuse_oversized(session, text, operations, &over_the_statement_limit()).await);
    }
    let mut record = new_statement_record(session, activity_of(operations));
    record.query_info_query_string = text.to_owned();
    record.query_info_parameters = parameters;
    record.intent = intent_of(text).unwrap_or_else(|| {
        session
            .intent
            .lock()
            .map(|intent| intent.clone())
            .unwrap_or_default()
    });
    match operations {
        Ok(ops) => {
            record.query_info_kind = ops
                .iter()
                .map(|op| op.kind)
                .max()
                .unwrap_or_default()
                .as_str()
                .into();
            let reads: BTreeSet<&String> = ops.iter().flat_map(|op| &op.reads).collect();
            let writes: BTreeSet<&String> = ops.iter().flat_map(|op| &op.writes).collect();
            record.query_info_tables_read = reads.into_iter().cloned().collect();
            record.query_info_tables_written = writes.into_iter().cloned().collect();
        }
        Err(_) => record.query_info_kind = "unparsed".into(),
    }

    let request = Request {
        target: &session.connection.target.name,
        operations,
    };
    let decision = session.shared.policy.decide(&session.principal, &request);
    if let Decision::Deny { rule, reason } = decision {
        mark_refused(&mut record, &rule, &reason);
        let message = match session.shared.audit.append(record).await {
            Ok(_) => format!("tollgate: refused by policy rule {rule}: {reason}"),
            Err(AuditError::TooLarge { .. }) => {
                return Err(refuse_oversized(session, text, operations, RECORD_TOO_LARGE).await)
            }
            Err(err) => format!("tollgate: refused by policy rule {rule}: {reason} (and the refusal could not be audited: {err})"),
        };
        return Err(Refusal {
            code: SQLSTATE_POLICY.into(),
            message,
        });
    }

    let mut record_full = false;
    if let Decision::Allow {
        rule,
        record_results,
    } = decision
    {
        record.policy_uid = rule;
        record_full = record_results == RecordResults::Full;
    }
    record.phase = "request".into();
    record.action_id = record::action::ALLOWED;
    // A provably read-only statement goes out while its record syncs; its
    // answer is held until the record is durable (see server_to_client).
    let written = if session
        .shared
        .audit
        .durability()
        .may_forward_before_durable(provably_read_only(operations))
    {
        let durable = session.shared.audit.submit(record.clone());
        // A failure known at once (too large; a failed write in `buffered`)
        // refuses the statement before it is sent, like any other.
        match durable.known_failure() {
            Some(err) => Err(err.clone()),
            None => Ok(Some(durable)),
        }
    } else {
        session
            .shared
            .audit
            .append(record.clone())
            .await
            .map(|_| None)
    };
    match written {
        Ok(durable) => Ok(Admitted {
            record,
            durable,
            record_full,
        }),
        Err(AuditError::TooLarge { .. }) => {
            Err(refuse_oversized(session, text, operations, RECORD_TOO_LARGE).await)
        }
        Err(err) => {
            warn!(error = %err, "statement refused: audit unavailable");
            Err(Refusal {
                code: SQLSTATE_AUDIT.into(),
                message: format!("tollgate: the statement was not sent because its audit record could not be written: {err}"),
            })
        }
    }
}

/// [`classify`], unless the text is over [`MAX_AUDITED_STATEMENT`]: such a
/// statement is refused for its size whatever it says, so it is not
/// parsed (up to 64 MiB of SQL, for nothing).
fn classify_within_limit(text: &str) -> Result<Vec<Operation>, String> {
    if text.len() > MAX_AUDITED_STATEMENT {
        return Err(over_the_statement_limit());
    }
    classify(text)
}

/// Longest statement text tollgate sends on (a client message may be up to
/// 64 MiB). Escaped (six bytes for a control character) it fits a WAL
/// frame once, not necessarily again in the tables it names: a record the
/// store still refuses as too large refuses the statement too (see
/// `admit`).
pub const MAX_AUDITED_STATEMENT: usize = 8 << 20;

/// How much of an oversized statement its refusal record keeps.
const OVERSIZED_PREFIX: usize = 4096;

/// Refuses a statement too long to audit (SQLSTATE 54000). Its refusal
/// record keeps the statement's start, its length and its SHA-256, so an
/// investigator can match it against a copy.
async fn refuse_oversized(
    session: &Session,
    text: &str,
    operations: &Result<Vec<Operation>, String>,
    why: &str,
) -> Refusal {
    use sha2::{Digest, Sha256};
    // Built afresh from the session's base: nothing of the statement but
    // its start goes in, so this record always fits.
    let mut record = new_statement_record(session, activity_of(operations));
    let kept = prefix_at_char_boundary(text, OVERSIZED_PREFIX);
    record.query_info_query_string = kept.to_owned();
    record.query_info_kind = "unparsed".into();
    mark_refused(
        &mut record,
        RULE_STATEMENT_TOO_LARGE,
        &format!(
            "the statement is {} bytes: {why}; its first {} bytes are recorded; SHA-256 of the whole statement: {}",
            text.len(),
            kept.len(),
            hex::encode(Sha256::digest(text.as_bytes())),
        ),
    );
    record.response_error_code = SQLSTATE_TOO_LARGE.into();
    let message = format!("tollgate: the statement is {} bytes: {why}", text.len());
    let message = match session.shared.audit.append(record).await {
        Ok(_) => message,
        Err(err) => format!("{message} (and the refusal could not be audited: {err})"),
    };
    Refusal {
        code: SQLSTATE_TOO_LARGE.into(),
        message,
    }
}

/// Why a statement over [`MAX_AUDITED_STATEMENT`] is refused.
fn over_the_statement_limit() -> String {
    format!("more than the {MAX_AUDITED_STATEMENT} bytes an audited statement may have")
}

/// Why a statement whose record the store refused as too large is
/// refused: text that must be escaped (control characters) can make a
/// record several times the statement's size.
const RECORD_TOO_LARGE: &str =
    "its audit record would be larger than the audit log can hold (64 MiB)";

/// The longest start of `text` of at most `max` bytes that ends on a
/// character boundary.
fn prefix_at_char_boundary(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `program_limit_exceeded`: what PostgreSQL answers when a statement
/// exceeds one of its own limits.
const SQLSTATE_TOO_LARGE: &str = "54000";

/// The `policy_uid` of a refusal for length: a built-in limit, not a rule
/// of the config.
const RULE_STATEMENT_TOO_LARGE: &str = "tollgate:statement_too_large";

fn reads_masked(masks: &MaskSet, operations: &Result<Vec<Operation>, String>) -> bool {
    if masks.is_empty() {
        return false;
    }
    match operations {
        // A FETCH's rows come from a cursor declared earlier: assume they
        // may carry masked columns, computed ones included.
        Ok(ops) => {
            ops.iter().any(|op| op.opaque_result)
                || ops
                    .iter()
                    .flat_map(|op| &op.reads)
                    .any(|t| masks.covers_table(t))
        }
        // Not understood: assume the worst.
        Err(_) => true,
    }
}

/// The OCSF Datastore activity of a request: Read when every statement
/// only reads, Query otherwise (or when it was not understood).
fn activity_of(operations: &Result<Vec<Operation>, String>) -> i32 {
    match operations {
        Ok(ops) if !ops.is_empty() && ops.iter().all(|op| op.kind == StatementKind::Read) => {
            record::datastore_activity::READ
        }
        _ => record::datastore_activity::QUERY,
    }
}

/// The intent an application_name states: `intent: <why>`.
pub fn intent_of_application_name(application_name: &str) -> String {
    application_name
        .strip_prefix("intent:")
        .map(|intent| intent.trim().to_owned())
        .unwrap_or_default()
}

/// Longest intent recorded: a reason, not a document (the statement itself
/// is recorded whole).
const MAX_INTENT: usize = 4096;

/// `/* intent: ... */` leading a statement: why the agent says it acts,
/// its first [`MAX_INTENT`] bytes.
pub fn intent_of(text: &str) -> Option<String> {
    let rest = text.trim_start().strip_prefix("/*")?;
    let (comment, _) = rest.split_once("*/")?;
    let intent = comment.trim().strip_prefix("intent:")?.trim();
    (!intent.is_empty()).then(|| prefix_at_char_boundary(intent, MAX_INTENT).to_owned())
}

/// Holds the server's answer to the oldest request until that request's
/// record is durable (a read-only request is forwarded while its record
/// syncs). Marks the request while it waits, so a session that ends
/// meanwhile records why the agent never saw the answer, and keeps the
/// write's error as the reason the answer is withheld.
async fn hold_until_front_record_is_durable(in_flight: &Mutex<InFlight>) -> Result<(), AuditError> {
    let syncing = lock(in_flight).queue.front_mut().and_then(|p| {
        let durable = p.durable.take()?;
        p.answer_held = true;
        Some(durable)
    });
    let Some(durable) = syncing else {
        return Ok(());
    };
    let synced = durable.await;
    if let Some(front) = lock(in_flight).queue.front_mut() {
        front.answer_held = false;
        front.withheld = synced.as_ref().err().map(ToString::to_string);
    }
    synced.map(drop)
}

async fn server_to_client(
    session: Arc<Session>,
    mut upstream_rd: ReadHalf<BoxedIo>,
    mut buf: BytesMut,
    client_wr: ClientWriter,
    in_flight: Arc<Mutex<InFlight>>,
    answered: Arc<Notify>,
) -> Result<(), WireError> {
    let mut outcomes = Outcomes::new(|outcome| submit_outcome(&session, outcome));
    loop {
        let mut out = BytesMut::new();
        while let Some(frame) = wire::split_frame(&mut buf)? {
            if let Err(err) = hold_until_front_record_is_durable(&in_flight).await {
                // The answer exists but its request is not on record:
                // the agent must not see it. What came before it answers
                // requests on record, or Parse, Bind and Describe, which
                // have no record of their own (as on every other path):
                // it goes first.
                close_after_built_answers(
                    &out,
                    &mut outcomes.handed_over,
                    &client_wr,
                    &in_flight,
                    SQLSTATE_AUDIT,
                    &format!("tollgate: the statement's audit record could not be written ({err}); its answer is withheld and the session closed"),
                )
                .await;
                return Err(WireError::Closed);
            }
            if let Some(encoding) = (frame.tag == b'S')
                .then(|| wire::parameter_status(&frame, "client_encoding"))
                .flatten()
                .filter(|encoding| !encoding.eq_ignore_ascii_case("UTF8"))
            {
                // A statement policy let through changed the encoding (a
                // function of the agent's calling set_config): from now on
                // the server would read other statements than tollgate.
                close_after_built_answers(
                    &out,
                    &mut outcomes.handed_over,
                    &client_wr,
                    &in_flight,
                    super::SQLSTATE_POLICY,
                    &format!("tollgate: the server's client_encoding became {encoding} (rule encoding:client_encoding); tollgate reads statements as UTF-8 only, so the session is closed"),
                )
                .await;
                return Err(WireError::Closed);
            }
            if frame.tag == b'S' {
                if let Some(value) = wire::parameter_status(&frame, "application_name") {
                    if let Ok(mut intent) = session.intent.lock() {
                        *intent = intent_of_application_name(&value);
                    }
                }
            }
            let replacement = match track_answer(
                &session.masks,
                &in_flight,
                &frame,
                &mut outcomes.answered,
            ) {
                Ok(replacement) => replacement,
                Err(err) => {
                    close_after_built_answers(
                        &out,
                        &mut outcomes.handed_over,
                        &client_wr,
                        &in_flight,
                        super::SQLSTATE_PROTOCOL,
                        "tollgate: the server's answers are out of step with the requests; the session is closed",
                    )
                    .await;
                    return Err(err);
                }
            };
            match replacement {
                Some(row) => out.extend_from_slice(&row),
                None => out.unsplit(frame.bytes),
            }
            outcomes.answers_end_at(out.len());
        }
        if !out.is_empty() {
            // If this fails, or the session ends while it waits (the relay
            // is dropped), the answers the connection took in full are
            // recorded as handed over and the rest as not (on drop).
            send_counted(
                &mut *client_wr.lock().await,
                &out,
                &mut outcomes.handed_over,
            )
            .await?;
        }
        // As for the client's side: the sent answers must not keep the
        // read buffer shared, or the reserve below allocates a new one.
        drop(out);
        outcomes.sent();
        answered.notify_waiters();
        // As for the client's side: whole answers, not 64-byte pieces.
        buf.reserve(READ_CHUNK);
        if upstream_rd.read_buf(&mut buf).await? == 0 {
            return Err(WireError::Closed);
        }
    }
}

/// Ends the session from the server's side: the answers already built
/// (`out`, complete ones before the message that ends it) go to the agent
/// first, then the FATAL, under one hold of the writer. What of them the
/// agent took is counted in `handed_over`, so the outcomes record which
/// were delivered.
async fn close_after_built_answers(
    out: &[u8],
    handed_over: &mut usize,
    client_wr: &ClientWriter,
    in_flight: &Mutex<InFlight>,
    code: &str,
    message: &str,
) {
    let mut client = client_wr.lock().await;
    let _ = send_counted(&mut *client, out, handed_over).await;
    lock(in_flight).closed_by = Some((code.to_string(), message.to_string()));
    super::fatal(&mut *client, code, message).await;
}

type Finished = Vec<(Pending, Option<(String, String)>)>;

/// Outcome records of answered requests, written once the answers are on
/// their way to the agent: nothing waits on them, so they stay off the
/// latency. Whatever way the session ends, they are written (on drop);
/// answers still held then never reached the agent, and their records say
/// so. `submit` hands a record to the audit store.
struct Outcomes<F: FnMut(AuditRecord)> {
    answered: Finished,
    /// Where in the batch of answers being built each of `answered` ends
    /// (as many as have been added to the batch in full).
    ends: Vec<usize>,
    /// How much of the batch the agent's connection has taken.
    handed_over: usize,
    submit: F,
}

impl<F: FnMut(AuditRecord)> Outcomes<F> {
    fn new(submit: F) -> Self {
        Outcomes {
            answered: Finished::new(),
            ends: Vec::new(),
            handed_over: 0,
            submit,
        }
    }

    /// The answers finished so far are in the batch up to `end`.
    fn answers_end_at(&mut self, end: usize) {
        let unplaced = self.answered.len().saturating_sub(self.ends.len());
        self.ends.extend(std::iter::repeat_n(end, unplaced));
    }

    /// Records the held answers as handed to the agent's connection.
    fn sent(&mut self) {
        self.record(Delivery::Sent);
    }

    /// The connection took the batch's first `taken` bytes: the answers
    /// that end within them are recorded as handed to it; the others stay
    /// held (not delivered, if the session ends now).
    fn sent_up_to(&mut self, taken: usize) {
        let whole = self.ends.iter().take_while(|&&end| end <= taken).count();
        self.record_first(whole, Delivery::Sent);
    }

    /// Records every held answer; the next batch starts.
    fn record(&mut self, delivery: Delivery) {
        self.record_first(self.answered.len(), delivery);
        self.handed_over = 0;
    }

    fn record_first(&mut self, n: usize, delivery: Delivery) {
        self.ends.drain(..n.min(self.ends.len()));
        for (pending, error) in self.answered.drain(..n) {
            if let Some(outcome) = outcome_record(pending, error, delivery) {
                (self.submit)(outcome);
            }
        }
    }
}

impl<F: FnMut(AuditRecord)> Drop for Outcomes<F> {
    fn drop(&mut self) {
        self.sent_up_to(self.handed_over);
        self.record(Delivery::NotSent);
    }
}

/// Whether the server's answer to a request was handed to the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    Sent,
    /// The server answered, but the session ended (the agent's connection
    /// failed, a record could not be written, the session was torn down)
    /// before the answer was sent on: the statement ran, the agent did not
    /// see how.
    NotSent,
}

/// Longest server message an outcome row keeps (PostgreSQL echoes the
/// offending value in some errors, however long it is).
const MAX_SERVER_MESSAGE: usize = 64 * 1024;

/// Longest statement text an outcome row repeats (see `outcome_record`).
const MAX_OUTCOME_TEXT: usize = 1 << 20;

/// `text` cut to at most `max` bytes on a character boundary, saying so.
fn capped(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    format!(
        "{} … ({} bytes, cut)",
        prefix_at_char_boundary(&text, max),
        text.len()
    )
}

/// What `status_detail` of an outcome says when the agent never got the
/// whole answer (none of it, or only what was sent on before the session
/// ended: rows of an answer that had begun); an auditor can find these
/// rows by it.
pub const NOT_DELIVERED: &str = "the answer did not reach the agent: the session ended first";

/// Updates the queue for one server message; adds the requests it
/// completed to `finished`, and returns what the agent gets in place of
/// the message, if not the message itself: the masked form of a DataRow,
/// a withheld error, or tollgate's refusal in place of the marker's error.
/// `finished` is the caller's list, kept across messages: a pending
/// request is large (it holds its request record), and a fresh list per
/// message meant an allocation and copies of it for every statement.
fn track_answer(
    masks: &MaskSet,
    in_flight: &Mutex<InFlight>,
    frame: &Frame,
    finished: &mut Finished,
) -> Result<Option<BytesMut>, WireError> {
    let mut masked_row = None;
    let mut guard = lock(in_flight);
    let InFlight {
        queue,
        statements,
        portals,
        copy_in,
        marker,
        server_skipping,
        ..
    } = &mut *guard;
    let Some(head) = queue.front_mut() else {
        // ReadyForQuery answers a Query or a Sync: with none in flight, the
        // answers and the requests are out of step.
        if frame.tag == b'Z' {
            return Err(WireError::Malformed(
                "ReadyForQuery with no request in flight".into(),
            ));
        }
        if !masks.is_empty() && frame.tag == b'D' {
            // A row no request of ours asked for: show nothing of it.
            masked_row = Some(mask::apply(frame, &ResultMask::everything())?);
        }
        return Ok(masked_row);
    };
    match frame.tag {
        // A RowDescription plans the masking of the rows that follow only
        // when it describes them: a simple query's own result, or the
        // Describe of the very portal the next Execute runs. Any other (a
        // Describe of another statement) is not trusted; rows without a
        // trusted plan are masked whole.
        b'T' if head.kind == Kind::Describe => {
            let plans_next = queue.pop_front().is_some_and(|d| d.describes_next_execute);
            if let Some(next) = queue
                .front_mut()
                .filter(|p| plans_next && p.kind == Kind::Execute && !masks.is_empty())
            {
                next.result_mask = Some(mask::plan(frame, masks, next.reads_masked)?);
            }
        }
        b'n' if head.kind == Kind::Describe => {
            queue.pop_front();
        }
        b'T' if !masks.is_empty() && head.kind == Kind::Query => {
            head.result_mask = Some(mask::plan(frame, masks, head.reads_masked)?);
        }
        b'D' => {
            head.rows += 1;
            head.bytes += frame.bytes.len() as i64;
            if !masks.is_empty() {
                let plan = head.result_mask.get_or_insert_with(ResultMask::everything);
                if plan.masks_anything() {
                    masked_row = Some(mask::apply(frame, plan)?);
                    head.masked_columns.extend(plan.names.iter().cloned());
                }
            }
            if let Some(recording) = head.recording.as_mut() {
                // What the agent saw: the masked row when there is one.
                match &masked_row {
                    Some(bytes) => {
                        let mut bytes = bytes.clone();
                        if let Ok(Some(row)) = wire::split_frame(&mut bytes) {
                            recording.add(&row);
                        }
                    }
                    None => recording.add(frame),
                }
            }
        }
        b'C' | b'I' | b's' => {
            if frame.tag == b'C' {
                head.tag_rows = Some(
                    head.tag_rows.unwrap_or(0) + wire::command_complete_rows(frame).unwrap_or(0),
                );
            }
            if head.kind == Kind::Execute {
                if let Some(done) = queue.pop_front() {
                    finished.push((done, None));
                }
            }
        }
        b'1' if head.kind == Kind::Parse => {
            let generation = head.generation;
            if let Some((name, prepared)) = queue.pop_front().and_then(|p| p.parse) {
                statements.insert(name, (generation, prepared));
            }
        }
        b'2' if head.kind == Kind::Bind => {
            let generation = head.generation;
            if let Some((name, bound)) = queue.pop_front().and_then(|p| p.bind) {
                portals.insert(name, (generation, bound));
            }
        }
        b'3' if head.kind == Kind::Close => {
            if let Some((kind, name)) = queue.pop_front().and_then(|p| p.close) {
                match kind {
                    b'S' => drop(statements.remove(&name)),
                    _ => drop(portals.remove(&name)),
                }
            }
        }
        b'E' if matches!(head.kind, Kind::RefusedExecute | Kind::RefusedQuery) => {
            // Only the marker's own error may stand for the refusal: any
            // other means the answers and the queue disagree.
            let (_, message) = wire::error_fields(frame);
            if !message.contains(marker.as_str()) {
                return Err(WireError::Malformed(format!(
                    "expected the error of a refused request, the server sent: {message}"
                )));
            }
            let (code, refusal) = head
                .refusal
                .take()
                .unwrap_or_else(|| (SQLSTATE_POLICY.into(), "tollgate: refused".into()));
            let mut error = BytesMut::new();
            wire::error_response(&mut error, "ERROR", &code, &refusal);
            masked_row = Some(error);
            if head.kind == Kind::RefusedExecute {
                queue.pop_front();
                *server_skipping = !skip_to_sync(queue, finished);
            }
        }
        b'G' => {
            // Unless the client already ended this copy (it did not wait
            // for this message), the server now takes only copy messages.
            if head.copies_ended_early > 0 {
                head.copies_ended_early -= 1;
            } else {
                *copy_in = true;
            }
            // A Sync sent right behind the COPY FROM STDIN, before any copy
            // data, reached the server in copy mode, which ignores it: it
            // will get no ReadyForQuery.
            if queue
                .get(1)
                .is_some_and(|p| p.kind == Kind::Sync && !p.after_copy_data)
            {
                queue.remove(1);
            }
        }
        b'E' => {
            let error = wire::error_fields(frame);
            if !masks.is_empty() && head.reads_masked {
                masked_row = Some(wire::redacted(
                    frame,
                    &format!(
                        "tollgate: the server's message is withheld because the statement reads masked columns (SQLSTATE {})",
                        error.0
                    ),
                ));
            }
            // An error ends a COPY FROM STDIN as well.
            *copy_in = false;
            match head.kind {
                Kind::Query => head.error = Some(error),
                Kind::Execute | Kind::Parse | Kind::Bind | Kind::Describe | Kind::Close => {
                    // A failed Parse or Bind never made its statement or
                    // portal; a failed Execute is this error's request.
                    if let Some(done) = queue.pop_front() {
                        // The server drops the unnamed statement before it
                        // parses a new one: after a failed Parse of it,
                        // there is none.
                        if done.parse.as_ref().is_some_and(|(name, _)| name.is_empty()) {
                            statements.remove("");
                        }
                        if done.kind == Kind::Execute {
                            finished.push((done, Some(error)));
                        }
                    }
                    *server_skipping = !skip_to_sync(queue, finished);
                }
                Kind::Sync | Kind::RefusedExecute | Kind::RefusedQuery => {}
            }
        }
        b'Z' => {
            *copy_in = false;
            if !matches!(head.kind, Kind::Query | Kind::Sync | Kind::RefusedQuery) {
                return Err(WireError::Malformed(format!(
                    "ReadyForQuery while a {:?} is unanswered",
                    head.kind
                )));
            }
            if let Some(done) = queue.pop_front() {
                if matches!(done.kind, Kind::Query | Kind::RefusedQuery) {
                    // A simple Query drops the unnamed statement and portal
                    // before it runs (the refusal marker is a Query too).
                    statements.remove("");
                    portals.remove("");
                }
                let error = done.error.clone();
                if done.kind == Kind::Query {
                    finished.push((done, error));
                }
            }
        }
        b'N' if !masks.is_empty() && head.reads_masked => {
            masked_row = Some(wire::redacted(
                frame,
                "tollgate: the server's notice is withheld because the statement reads masked columns",
            ));
        }
        _ => {}
    }
    Ok(masked_row)
}

/// After an error in an extended-protocol pipeline the server skips every
/// message up to Sync: those Parses never happen, those Executes never run,
/// and a refusal's marker sent among them gets no answer (its refusal is
/// on record already).
/// Returns whether the client's Sync is already queued; if not, the server
/// goes on skipping what the client sends until it comes.
fn skip_to_sync(queue: &mut VecDeque<Pending>, finished: &mut Finished) -> bool {
    while queue.front().is_some_and(|p| p.kind != Kind::Sync) {
        if let Some(skipped) = queue.pop_front() {
            if matches!(skipped.kind, Kind::Execute | Kind::Query) {
                finished.push((
                    skipped,
                    Some((
                        "25P02".into(),
                        "not executed: an earlier message in the pipeline failed".into(),
                    )),
                ));
            }
        }
    }
    !queue.is_empty()
}

/// Writes the outcome record of a request. It follows the durable request
/// record, so the agent's answer does not wait for it.
fn submit_outcome(session: &Session, outcome: AuditRecord) {
    // Lazy: the answer is already out; the outcome rides with the next
    // sync instead of costing the session's next statement a sync of its own.
    // Nothing waits on it: a waiting task would be one more wake-up per
    // statement. A batch that cannot be written is logged by the store.
    drop(session.shared.audit.submit_lazy(outcome));
}

/// The outcome record of a request, from its request record (none for
/// requests that have no record of their own, such as a Sync).
fn outcome_record(
    pending: Pending,
    error: Option<(String, String)>,
    delivery: Delivery,
) -> Option<AuditRecord> {
    let mut outcome = pending.request?;
    outcome.phase = "outcome".into();
    outcome.time = now_millis();
    outcome.duration_us = i64::try_from(pending.started.elapsed().as_micros()).ok();
    outcome.response_rows = Some(pending.tag_rows.unwrap_or(pending.rows).max(pending.rows));
    outcome.response_bytes = Some(pending.bytes);
    outcome.masked_columns = pending.masked_columns.into_iter().collect();
    if let Some(recording) = pending.recording {
        outcome.response_data = recording.into_json();
    }
    if !outcome.masked_columns.is_empty() {
        outcome.action_id = record::action::MODIFIED;
    }
    // The status is the server's: a statement whose answer was lost still
    // ran (an UPDATE committed), which is what an auditor must not miss.
    match error {
        Some((code, message)) => {
            outcome.status_id = record::status::FAILURE;
            outcome.response_error_code = capped(code, 64);
            outcome.status_detail = capped(message, MAX_SERVER_MESSAGE);
        }
        None => outcome.status_id = record::status::SUCCESS,
    }
    // The request row holds the whole text; a very long one is not copied
    // again, so that the outcome (the request's record and the answer's
    // facts) always fits the audit log as the request did.
    if outcome.query_info_query_string.len() > MAX_OUTCOME_TEXT {
        let whole = outcome.query_info_query_string.len();
        outcome.query_info_query_string = format!(
            "{} … ({whole} bytes; the whole text is in the request row)",
            prefix_at_char_boundary(&outcome.query_info_query_string, MAX_OUTCOME_TEXT)
        );
    }
    if delivery == Delivery::NotSent {
        outcome.status_detail = if outcome.status_detail.is_empty() {
            NOT_DELIVERED.to_string()
        } else {
            format!("{NOT_DELIVERED} ({})", outcome.status_detail)
        };
    }
    Some(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Frame {
        let mut out = BytesMut::new();
        out.extend_from_slice(&[tag]);
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        wire::split_frame(&mut out)
            .expect("well formed")
            .expect("whole")
    }

    /// `track_answer` with nothing masked, the finished requests dropped.
    fn answer(in_flight: &Mutex<InFlight>, frame: &Frame) -> Result<Option<BytesMut>, WireError> {
        track_answer(&MaskSet::default(), in_flight, frame, &mut Finished::new())
    }

    fn queue_of(kinds: &[Kind]) -> Mutex<InFlight> {
        let mut in_flight = InFlight {
            marker: "tollgate_refused_test".into(),
            ..InFlight::default()
        };
        for kind in kinds {
            in_flight.push(Pending::new(*kind, None));
        }
        Mutex::new(in_flight)
    }

    #[test]
    fn ready_for_query_while_an_execute_is_unanswered_is_out_of_step() {
        let in_flight = queue_of(&[Kind::Execute, Kind::Sync]);
        let result = answer(&in_flight, &frame(b'Z', b"I"));
        assert!(matches!(result, Err(WireError::Malformed(_))));
        // With nothing in flight a ReadyForQuery is as out of step.
        let empty = queue_of(&[]);
        let result = answer(&empty, &frame(b'Z', b"I"));
        assert!(matches!(result, Err(WireError::Malformed(_))));
    }

    // A client that sends its copy data and CopyDone before the server's
    // CopyInResponse has ended that copy already: what it sends next is
    // not "in the middle of COPY FROM STDIN".
    #[test]
    fn a_copy_the_client_ended_before_it_started_is_not_copy_mode() {
        // The server's CopyInResponse: is the session in copy mode after it?
        let copy_starts = |in_flight: &Mutex<InFlight>| {
            answer(in_flight, &frame(b'G', &[0, 0, 0])).expect("in step");
            let copy_in = lock(in_flight).copy_in;
            copy_in
        };
        for ended_early in [false, true] {
            let in_flight = queue_of(&[Kind::Query]);
            if ended_early {
                lock(&in_flight).copy_ended_early();
            }
            assert_eq!(copy_starts(&in_flight), !ended_early);
        }

        // Two copies in one Query, the client ending only the first early:
        // the second is copy mode.
        let in_flight = queue_of(&[Kind::Query]);
        lock(&in_flight).copy_ended_early();
        assert!(!copy_starts(&in_flight));
        assert!(copy_starts(&in_flight));
    }

    fn prepared(text: &str) -> Arc<Prepared> {
        Arc::new(Prepared {
            text: text.into(),
            operations: Arc::new(Err("test".into())),
            parameter_types: Vec::new(),
        })
    }

    // PostgreSQL drops the unnamed statement and portal when a simple
    // Query runs, and the unnamed statement when a Parse of a new one
    // fails: a later Bind or Execute of "" must not be decided and audited
    // as the statement that is gone.
    #[test]
    fn a_simple_query_or_a_failed_unnamed_parse_forgets_the_unnamed_statement() {
        // Confirmed before, then a simple Query answered.
        let in_flight = queue_of(&[Kind::Query]);
        {
            let mut f = lock(&in_flight);
            f.statements.insert("".into(), (0, prepared("SELECT 1")));
            f.statements
                .insert("named".into(), (0, prepared("SELECT 2")));
            f.portals
                .insert("".into(), (0, (prepared("SELECT 1"), String::new())));
        }
        answer(&in_flight, &frame(b'Z', b"I")).expect("in step");
        let f = lock(&in_flight);
        assert!(matches!(f.statement(""), Resolved::Known(None)));
        assert!(matches!(f.portal(""), Resolved::Known(None)));
        assert!(matches!(f.statement("named"), Resolved::Known(Some(_))));
        drop(f);

        // A simple Query still in flight after a Parse of "": the name
        // resolves to nothing, even with a Sync between them.
        let in_flight = queue_of(&[]);
        {
            let mut f = lock(&in_flight);
            let mut parse = Pending::new(Kind::Parse, None);
            parse.parse = Some(("".into(), prepared("SELECT 1")));
            f.push(parse);
            f.push(Pending::new(Kind::Sync, None));
            f.push(Pending::new(Kind::Query, None));
            assert!(matches!(f.statement(""), Resolved::Known(None)));
        }

        // A failed Parse of "" leaves no unnamed statement behind.
        let in_flight = queue_of(&[]);
        {
            let mut f = lock(&in_flight);
            f.statements.insert("".into(), (0, prepared("SELECT 1")));
            let mut parse = Pending::new(Kind::Parse, None);
            parse.parse = Some(("".into(), prepared("SELEC oops")));
            f.push(parse);
            f.push(Pending::new(Kind::Sync, None));
        }
        let mut error = BytesMut::new();
        wire::error_response(&mut error, "ERROR", "42601", "syntax error");
        let error = wire::split_frame(&mut error)
            .expect("well formed")
            .expect("whole");
        answer(&in_flight, &error).expect("in step");
        assert!(matches!(
            lock(&in_flight).statement(""),
            Resolved::Known(None)
        ));
    }

    #[test]
    fn only_the_markers_own_error_stands_for_a_refusal() {
        let error = |message: &str| {
            let mut out = BytesMut::new();
            wire::error_response(&mut out, "ERROR", "34000", message);
            wire::split_frame(&mut out)
                .expect("well formed")
                .expect("whole")
        };
        let in_flight = queue_of(&[Kind::RefusedExecute, Kind::Sync]);
        let result = answer(&in_flight, &error("portal \"other\" does not exist"));
        assert!(matches!(result, Err(WireError::Malformed(_))));

        let in_flight = queue_of(&[Kind::RefusedExecute, Kind::Sync]);
        let replacement = answer(
            &in_flight,
            &error("portal \"tollgate_refused_test\" does not exist"),
        )
        .expect("in step");
        let mut replacement = replacement.expect("the refusal in its place");
        let refusal = wire::split_frame(&mut replacement)
            .expect("well formed")
            .expect("whole");
        assert_eq!(wire::error_fields(&refusal).0, SQLSTATE_POLICY);
        // The refused Execute is answered; the Sync waits for its ReadyForQuery.
        assert_eq!(
            lock(&in_flight).queue.front().map(|p| p.kind),
            Some(Kind::Sync)
        );
    }

    /// A Query whose request record carries `text`.
    fn query(text: &str) -> Pending {
        let request = AuditRecord {
            phase: "request".into(),
            query_info_query_string: text.into(),
            ..AuditRecord::default()
        };
        Pending::new(Kind::Query, Some(request))
    }

    #[test]
    fn answers_held_when_the_session_ends_are_recorded_as_not_delivered() {
        let mut submitted = Vec::new();
        let mut outcomes = Outcomes::new(|outcome: AuditRecord| submitted.push(outcome));
        outcomes.answered.push((query("select 1"), None));
        outcomes.sent();
        // Answered by the server, not yet sent on when the session ends.
        outcomes.answered.push((query("update t set a = 1"), None));
        outcomes.answered.push((
            query("select nope"),
            Some(("42703".into(), "column \"nope\" does not exist".into())),
        ));
        drop(outcomes);

        let by_text = |text: &str| {
            submitted
                .iter()
                .find(|r| r.query_info_query_string == text)
                .unwrap_or_else(|| panic!("no outcome for {text}"))
        };
        let delivered = by_text("select 1");
        assert_eq!(delivered.phase, "outcome");
        assert_eq!(delivered.status_id, record::status::SUCCESS);
        assert_eq!(delivered.status_detail, "");

        // The statement ran: its status stays the server's.
        let lost = by_text("update t set a = 1");
        assert_eq!(lost.status_id, record::status::SUCCESS);
        assert_eq!(lost.status_detail, NOT_DELIVERED);

        let lost_error = by_text("select nope");
        assert_eq!(lost_error.status_id, record::status::FAILURE);
        assert_eq!(lost_error.response_error_code, "42703");
        assert!(
            lost_error.status_detail.starts_with(NOT_DELIVERED)
                && lost_error.status_detail.contains("does not exist"),
            "{}",
            lost_error.status_detail
        );
        assert_eq!(submitted.len(), 3);
    }

    /// Takes `room` bytes, a few at a time as a full socket does, then
    /// fails as a reset connection does, or (`stalls`) waits forever as
    /// a socket the agent stopped reading does; or fails its flushes.
    struct Breaks {
        room: usize,
        flush_fails: bool,
        stalls: bool,
    }

    /// Never has anything to read: only its writing is of interest.
    impl tokio::io::AsyncRead for Breaks {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
    }

    impl tokio::io::AsyncWrite for Breaks {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if self.room == 0 {
                if self.stalls {
                    return std::task::Poll::Pending;
                }
                return std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
            }
            let n = buf.len().min(self.room).min(7);
            self.room -= n;
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(match self.flush_fails {
                true => Err(std::io::ErrorKind::BrokenPipe.into()),
                false => Ok(()),
            })
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Sends a batch of three answers (ending at bytes 20, 41 and 53; the
    /// second ends two requests, as a pipeline error skipping to Sync
    /// does) to `connection`, then ends the session as the relay does
    /// when the send fails, or, for a connection that stalls, while the
    /// send waits (its future dropped after 50 ms): which requests are
    /// recorded as not delivered?
    async fn not_delivered_after(mut connection: Breaks) -> Vec<&'static str> {
        let mut submitted = Vec::new();
        let mut outcomes = Outcomes::new(|outcome: AuditRecord| submitted.push(outcome));
        let mut batch = Vec::new();
        for (texts, answer) in [
            (&["select 1"][..], &b"first answer, 20 b.."[..]),
            (&["select 2", "select 2b"], b"second answer, 21 b.."),
            (&["select 3"], b"third answer"),
        ] {
            for text in texts {
                outcomes.answered.push((query(text), None));
            }
            batch.extend_from_slice(answer);
            outcomes.answers_end_at(batch.len());
        }
        let stalls = connection.stalls;
        let sent = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            send_counted(&mut connection, &batch, &mut outcomes.handed_over),
        )
        .await;
        match sent {
            Ok(sent) => assert!(!stalls && sent.is_err(), "the connection was to fail"),
            Err(_) => assert!(stalls, "the send was to fail, not wait"),
        }
        drop(outcomes);
        assert_eq!(submitted.len(), 4);
        ["select 1", "select 2", "select 2b", "select 3"]
            .into_iter()
            .filter(|text| {
                let outcome = submitted
                    .iter()
                    .find(|r| r.query_info_query_string == *text)
                    .unwrap_or_else(|| panic!("no outcome for {text}"));
                outcome.status_detail == NOT_DELIVERED
            })
            .collect()
    }

    /// A batch of answers cut off mid-write, by a connection that fails
    /// or by the session ending while the send waits on an agent that
    /// stopped reading: the answers the connection took in full were
    /// handed over, the one it took part of and those after it were not.
    #[tokio::test]
    async fn answers_taken_in_full_before_a_send_breaks_off_are_recorded_as_delivered() {
        let all = ["select 1", "select 2", "select 2b", "select 3"];
        for (room, not_delivered) in [
            // 5 bytes into the third answer.
            (46, &all[3..]),
            // Exactly at the end of the second.
            (41, &all[3..]),
            // One byte short of it.
            (40, &all[1..]),
            // Exactly at the end of the first.
            (20, &all[1..]),
            (0, &all[..]),
        ] {
            for stalls in [false, true] {
                let connection = Breaks {
                    room,
                    flush_fails: false,
                    stalls,
                };
                assert_eq!(
                    not_delivered_after(connection).await,
                    not_delivered,
                    "room {room}, stalls {stalls}"
                );
            }
        }
        // Bytes a writer took but could not flush (TLS with a full
        // socket) were not handed over.
        let unflushed = Breaks {
            room: 1000,
            flush_fails: true,
            stalls: false,
        };
        assert_eq!(
            not_delivered_after(unflushed).await,
            ["select 1", "select 2", "select 2b", "select 3"]
        );
    }

    /// A session of a principal with no claims to target "orders-db" (never
    /// reached), auditing to `audit_dir`; and the key directory its
    /// verifier reads, kept alive.
    async fn session_auditing_to(audit_dir: &std::path::Path) -> (tempfile::TempDir, Arc<Session>) {
        let keys = tempfile::tempdir().expect("tempdir");
        crate::dev::Keyring::open_or_create(keys.path()).expect("keyring");
        let verifier = crate::identity::Verifier::from_config(
            &crate::identity::tests::file_config(keys.path(), ""),
        )
        .await
        .expect("verifier");
        let audit = crate::audit::AuditLog::open(&crate::audit::tests::config(audit_dir))
            .await
            .expect("audit");
        let target = crate::proxy::Target::new(crate::config::TargetConfig {
            name: "orders-db".into(),
            protocol: crate::config::Protocol::Postgres,
            address: "127.0.0.1:1".parse().expect("addr"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            credential: crate::config::CredentialConfig {
                user: "gateway".into(),
                password: None,
                password_file: None,
            },
            tls: None,
            upstream_tls: None,
        })
        .expect("target");
        let connection = crate::proxy::Connection {
            session_uid: "session-1".into(),
            target: Arc::new(target),
            peer: "127.0.0.1:40000".parse().expect("addr"),
            origin: None,
        };
        let principal = crate::identity::Principal::default();
        let statement_record = statement_record_base(
            &connection,
            &principal,
            "agent".into(),
            "orders".into(),
            None,
        );
        let session = Arc::new(Session {
            connection,
            principal,
            intent: Mutex::new(String::new()),
            masks: MaskSet::default(),
            shared: Arc::new(crate::proxy::Shared {
                verifier,
                policy: Default::default(),
                audit,
                pinning: None,
                postgres_cancel_keys: Default::default(),
            }),
            statement_record,
        });
        (keys, session)
    }

    /// A session for the relay's tests, auditing to a fresh directory:
    /// that directory, the session's key directory (both kept alive), the
    /// session and its audit log.
    async fn relay_session() -> (
        tempfile::TempDir,
        tempfile::TempDir,
        Arc<Session>,
        crate::audit::AuditLog,
    ) {
        let audit_dir = tempfile::tempdir().expect("tempdir");
        let (keys, session) = session_auditing_to(audit_dir.path()).await;
        let audit = session.shared.audit.clone();
        (audit_dir, keys, session, audit)
    }

    /// The relay's own answer path, from the server's bytes to the audit:
    /// three queries answered in one batch, sent to an agent whose
    /// connection takes 46 bytes and then fails. The two answers it took
    /// in full are on record as delivered, the third as not.
    #[tokio::test]
    async fn the_relay_records_which_answers_of_a_cut_off_batch_reached_the_agent() {
        let (audit_dir, _keys, session, audit) = relay_session().await;
        // Each answer: CommandComplete "SELECT 1" (14 bytes) and
        // ReadyForQuery (6 bytes), 20 bytes in all.
        let mut answers = BytesMut::new();
        let mut in_flight = InFlight::default();
        for text in ["select 1", "select 2", "select 3"] {
            in_flight.queue.push_back(query(text));
            completed(&mut answers, "SELECT 1");
        }
        assert_eq!(answers.len(), 60);
        let (server, _server_side) = tokio::io::duplex(1024);
        let (upstream_rd, _) = tokio::io::split(Box::new(server) as BoxedIo);
        let agent = Breaks {
            room: 46,
            flush_fails: false,
            stalls: false,
        };
        let (_, client_wr) = tokio::io::split(Box::new(agent) as BoxedIo);
        let ended = server_to_client(
            session,
            upstream_rd,
            answers,
            Arc::new(tokio::sync::Mutex::new(client_wr)),
            Arc::new(Mutex::new(in_flight)),
            Arc::new(Notify::new()),
        )
        .await;
        assert!(ended.is_err(), "the agent's connection failed");
        audit.shutdown().await;

        let outcomes: Vec<(String, bool)> = outcome_rows(audit_dir.path())
            .into_iter()
            .map(|r| {
                let delivered = !r.status_detail.starts_with(NOT_DELIVERED);
                (r.query_info_query_string, delivered)
            })
            .collect();
        assert_eq!(
            outcomes,
            [
                ("select 1".to_string(), true),
                ("select 2".to_string(), true),
                ("select 3".to_string(), false),
            ]
        );
    }

    /// A server's whole answer to a query: CommandComplete with `tag`,
    /// then ReadyForQuery.
    fn completed(answers: &mut BytesMut, tag: &str) {
        use bytes::BufMut;
        answers.put_u8(b'C');
        answers.put_i32(4 + tag.len() as i32 + 1);
        answers.put_slice(tag.as_bytes());
        answers.put_u8(0);
        wire::ready_for_query(answers, b'I');
    }

    /// The outcome rows in the segments of the audit under `audit_dir`.
    fn outcome_rows(audit_dir: &std::path::Path) -> Vec<AuditRecord> {
        crate::audit::tests::read_segments(&audit_dir.join("audit"))
            .into_iter()
            .filter(|r| r.phase == "outcome")
            .collect()
    }

    /// Runs the relay's answer path on `answers` (the server's bytes) to
    /// an agent connection that takes everything; returns how it ended and
    /// what the agent got.
    async fn relay_to_agent(
        session: &Arc<Session>,
        in_flight: &Arc<Mutex<InFlight>>,
        answers: BytesMut,
    ) -> (Result<(), WireError>, String) {
        // The server sends nothing more: a relay that does not stop at
        // what it is given ends at the end of the stream, never waits.
        let (server, server_side) = tokio::io::duplex(1024);
        drop(server_side);
        let (upstream_rd, _) = tokio::io::split(Box::new(server) as BoxedIo);
        let (agent, mut agent_side) = tokio::io::duplex(64 * 1024);
        let (_, client_wr) = tokio::io::split(Box::new(agent) as BoxedIo);
        let ended = server_to_client(
            session.clone(),
            upstream_rd,
            answers,
            Arc::new(tokio::sync::Mutex::new(client_wr)),
            in_flight.clone(),
            Arc::new(Notify::new()),
        )
        .await;
        let mut got = Vec::new();
        // The relay has dropped its end: this reads to that end.
        tokio::io::AsyncReadExt::read_to_end(&mut agent_side, &mut got)
            .await
            .expect("read what the agent got");
        (ended, String::from_utf8_lossy(&got).into_owned())
    }

    /// A statement that changed client_encoding behind the policy's back
    /// (a function calling set_config): the server's report of it ends the
    /// session before the report, or any answer after it, reaches the
    /// agent, and every request in flight is on record with why.
    #[tokio::test]
    async fn a_changed_client_encoding_closes_the_session() {
        let (audit_dir, _keys, session, audit) = relay_session().await;
        use bytes::BufMut;
        let mut answers = BytesMut::new();
        let mut in_flight = InFlight::default();
        for text in ["select 1", "select f()", "select 3"] {
            in_flight.queue.push_back(query(text));
        }
        fn status(answers: &mut BytesMut, key: &str, value: &str) {
            answers.put_u8(b'S');
            answers.put_i32(4 + key.len() as i32 + 1 + value.len() as i32 + 1);
            for part in [key, value] {
                answers.put_slice(part.as_bytes());
                answers.put_u8(0);
            }
        }
        // Reported again unchanged: nothing happens.
        status(&mut answers, "client_encoding", "UTF8");
        completed(&mut answers, "SELECT 11");
        status(&mut answers, "client_encoding", "SJIS");
        completed(&mut answers, "SELECT 22");
        completed(&mut answers, "SELECT 33");
        let in_flight = Arc::new(Mutex::new(in_flight));
        let (ended, got) = relay_to_agent(&session, &in_flight, answers).await;
        assert!(matches!(ended, Err(WireError::Closed)), "{ended:?}");
        record_unanswered(&session, &in_flight);
        audit.shutdown().await;

        assert!(got.contains("SELECT 11"), "{got}");
        assert!(!got.contains("SJIS\0"), "the report is not relayed: {got}");
        assert!(
            !got.contains("SELECT 22") && !got.contains("SELECT 33"),
            "{got}"
        );
        assert!(
            got.contains("FATAL") && got.contains(super::super::SQLSTATE_POLICY),
            "{got}"
        );
        assert!(got.contains("client_encoding became SJIS"), "{got}");

        let outcomes: Vec<_> = outcome_rows(audit_dir.path())
            .into_iter()
            .map(|r| {
                (
                    r.query_info_query_string,
                    r.response_error_code,
                    r.status_detail,
                )
            })
            .collect();
        assert_eq!(outcomes.len(), 3, "{outcomes:#?}");
        assert_eq!(outcomes[0].0, "select 1");
        assert!(
            !outcomes[0].2.starts_with(NOT_DELIVERED),
            "{:?}",
            outcomes[0]
        );
        for (query, code, detail) in &outcomes[1..] {
            assert_eq!(code, super::super::SQLSTATE_POLICY, "{query}");
            assert!(detail.starts_with(NOT_DELIVERED), "{query}: {detail}");
            assert!(
                detail.contains("client_encoding became SJIS"),
                "{query}: {detail}"
            );
        }
    }

    /// The relay's answer path when a read's request record fails after
    /// the read was forwarded: the answer before it reaches the agent,
    /// its own answer is withheld and the session closed with FATAL 58030,
    /// and the answer after it, already in tollgate's buffer, never goes
    /// out either. The audit (which recovered: it is writable again) has
    /// an outcome row for each, and says why the last two were not
    /// relayed.
    #[tokio::test]
    async fn a_failed_record_withholds_its_answer_and_every_later_one() {
        let (audit_dir, _keys, session, audit) = relay_session().await;
        let mut answers = BytesMut::new();
        let mut in_flight = InFlight::default();
        for (text, tag, durable) in [
            ("select 1", "SELECT 11", Ok(1)),
            (
                "select 2",
                "SELECT 22",
                Err(AuditError::Wal("disk full".into())),
            ),
            ("select 3", "SELECT 33", Ok(3)),
        ] {
            let mut read = query(text);
            read.durable = Some(Durable::known(durable));
            in_flight.queue.push_back(read);
            completed(&mut answers, tag);
        }
        let in_flight = Arc::new(Mutex::new(in_flight));
        let (ended, got) = relay_to_agent(&session, &in_flight, answers).await;
        assert!(matches!(ended, Err(WireError::Closed)), "{ended:?}");
        record_unanswered(&session, &in_flight);
        audit.shutdown().await;

        assert!(got.contains("SELECT 11"), "{got}");
        assert!(!got.contains("SELECT 22"), "withheld: {got}");
        assert!(!got.contains("SELECT 33"), "never relayed: {got}");
        assert!(got.contains("FATAL"), "{got}");
        assert!(got.contains(SQLSTATE_AUDIT), "{got}");
        assert!(
            got.contains("its answer is withheld and the session closed"),
            "{got}"
        );

        let outcomes: Vec<_> = outcome_rows(audit_dir.path())
            .into_iter()
            .map(|r| {
                (
                    r.query_info_query_string,
                    r.status_id,
                    r.response_error_code,
                    r.status_detail,
                )
            })
            .collect();
        assert_eq!(outcomes.len(), 3, "{outcomes:#?}");
        assert_eq!(outcomes[0].0, "select 1");
        assert_eq!(outcomes[0].1, record::status::SUCCESS);
        assert!(
            !outcomes[0].3.starts_with(NOT_DELIVERED),
            "{:?}",
            outcomes[0]
        );
        for (i, text, why) in [
            (1, "select 2", "tollgate withheld the server's answer: the request's audit record could not be written (audit write failed: disk full)"),
            (2, "select 3", "tollgate closed the session before the server's answer was relayed in full: tollgate: the statement's audit record could not be written"),
        ] {
            let (query, status, code, detail) = &outcomes[i];
            assert_eq!(query, text);
            assert_eq!(*status, record::status::UNKNOWN, "{text}");
            assert_eq!(code, SQLSTATE_AUDIT, "{text}");
            assert!(detail.starts_with(NOT_DELIVERED), "{text}: {detail}");
            assert!(detail.contains(why), "{text}: {detail}");
        }
    }

    /// A statement's records share the session's fields (identity,
    /// addresses, database) instead of copying them, and its outcome
    /// shares its request's.
    #[tokio::test]
    async fn statement_records_share_the_session_fields() {
        let audit_dir = tempfile::tempdir().expect("tempdir");
        let (_keys, session) = session_auditing_to(audit_dir.path()).await;
        let base = &session.statement_record;
        let request = new_statement_record(&session, record::datastore_activity::QUERY);
        let outcome = outcome_record(
            Pending::new(Kind::Query, Some(request.clone())),
            None,
            Delivery::Sent,
        )
        .expect("a statement has an outcome");
        for record in [&request, &outcome] {
            assert!(Arc::ptr_eq(&record.session_uid, &base.session_uid));
            assert!(Arc::ptr_eq(&record.actor_user_uid, &base.actor_user_uid));
            assert!(Arc::ptr_eq(
                &record.actor_user_groups,
                &base.actor_user_groups
            ));
            assert!(Arc::ptr_eq(&record.src_endpoint_ip, &base.src_endpoint_ip));
            assert!(Arc::ptr_eq(&record.database_user, &base.database_user));
            assert!(Arc::ptr_eq(&record.database_name, &base.database_name));
        }
        session.shared.audit.shutdown().await;
    }

    /// Requests in flight when the session ends: each gets an outcome of
    /// unknown status (it may have run), saying why the agent never saw
    /// its answer: withheld (tollgate withheld it, or the record is known
    /// by now to have failed, as told at once or by the writer thread),
    /// held for a record still syncing, or not answered.
    #[test]
    fn requests_left_in_flight_are_recorded_unknown_with_the_reason() {
        let mut withheld = query("select 2");
        withheld.withheld = Some("audit write failed: disk full".into());
        let mut record_failed = query("select 3");
        record_failed.durable = Some(Durable::known(Err(AuditError::Wal("no space".into()))));
        // The writer thread's answer, already there when the session ends.
        let (writer, answer) = tokio::sync::oneshot::channel();
        let _ = writer.send(Err(AuditError::Wal("disk gone".into())));
        let mut writer_failed = query("select 4");
        writer_failed.durable = Some(Durable::waiting(answer));
        // Still syncing: nothing known yet.
        let (_syncing, answer) = tokio::sync::oneshot::channel();
        let mut still_syncing = query("select 5");
        still_syncing.durable = Some(Durable::waiting(answer));
        let mut held = query("select 6");
        held.answer_held = true;
        // Its answer had begun (rows had come) but not ended.
        let mut begun = query("select 7");
        begun.rows = 3;
        let outcomes = unanswered_outcomes(
            vec![
                withheld,
                query("update t set a = 1"),
                record_failed,
                writer_failed,
                still_syncing,
                held,
                begun,
            ],
            None,
        );
        assert_eq!(outcomes.len(), 7);
        assert_eq!(outcomes[6].response_rows, Some(3));
        for outcome in &outcomes {
            assert_eq!(outcome.phase, "outcome");
            assert_eq!(outcome.status_id, record::status::UNKNOWN);
            assert!(
                outcome.status_detail.starts_with(NOT_DELIVERED),
                "{}",
                outcome.status_detail
            );
        }
        let withheld_because = |i: usize, err: &str| {
            assert_eq!(outcomes[i].response_error_code, SQLSTATE_AUDIT);
            let want = format!("tollgate withheld the server's answer: the request's audit record could not be written ({err})");
            assert!(
                outcomes[i].status_detail.contains(&want),
                "{i}: {}",
                outcomes[i].status_detail
            );
        };
        withheld_because(0, "audit write failed: disk full");
        withheld_because(2, "audit write failed: no space");
        withheld_because(3, "audit write failed: disk gone");
        for (i, why) in [
            (1, "the server had not answered"),
            (4, "the server had not answered"),
            (5, "the session ended while the server's answer waited for the request's audit record to be durable"),
            (6, "the server had not answered"),
        ] {
            assert_eq!(
                outcomes[i].response_error_code,
                super::super::SQLSTATE_UPSTREAM
            );
            assert!(
                outcomes[i].status_detail.contains(why),
                "{i}: {}",
                outcomes[i].status_detail
            );
        }
    }

    /// The hold on an answer marks its request while the record syncs and
    /// keeps a failed write's error: the outcome of a request the session
    /// ended on says which of the two kept its answer from the agent.
    /// (That `server_to_client` holds answers at all, and closes the
    /// session with FATAL when a record fails, is shown by
    /// `a_failed_record_withholds_its_answer_and_every_later_one`, and end
    /// to end by
    /// `a_full_audit_disk_refuses_statements_loses_nothing_and_recovers`
    /// in tests/tests/audit_e2e.rs; a session ending while an answer is
    /// held has no end-to-end test.)
    #[tokio::test]
    async fn a_held_answer_leaves_its_reason_on_the_request() {
        // A request whose record the writer answers through the sender.
        let syncing = |text: &str| {
            let (writer, answer) = tokio::sync::oneshot::channel();
            let mut pending = query(text);
            pending.durable = Some(Durable::waiting(answer));
            let mut in_flight = InFlight::default();
            in_flight.queue.push_back(pending);
            (writer, Mutex::new(in_flight))
        };
        // The request after the hold, and the outcome a session ending
        // now would record for it: its SQLSTATE and detail.
        let left_after = |in_flight: Mutex<InFlight>, answer_held: bool, code: &str, why: &str| {
            let left: Vec<Pending> = lock(&in_flight).queue.drain(..).collect();
            assert_eq!(left[0].answer_held, answer_held, "{why}");
            assert!(left[0].durable.is_none(), "the record is awaited once");
            let outcomes = unanswered_outcomes(left, None);
            assert_eq!(outcomes.len(), 1);
            assert_eq!(outcomes[0].response_error_code, code, "{why}");
            let detail = &outcomes[0].status_detail;
            assert!(detail.contains(why), "{detail}");
        };

        // The writer fails the record: the answer is withheld for that reason.
        let (writer, failed) = syncing("select 1");
        let _ = writer.send(Err(AuditError::Wal("disk full".into())));
        let err = hold_until_front_record_is_durable(&failed)
            .await
            .expect_err("the record failed");
        assert_eq!(
            err.to_string(),
            AuditError::Wal("disk full".into()).to_string()
        );
        left_after(failed, false, SQLSTATE_AUDIT, &format!(
            "tollgate withheld the server's answer: the request's audit record could not be written ({err})"
        ));

        // The session ends while the record syncs.
        let (_writer, waiting) = syncing("select 2");
        let hold = hold_until_front_record_is_durable(&waiting);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), hold)
                .await
                .is_err(),
            "the answer waits for the record"
        );
        left_after(
            waiting,
            true,
            super::super::SQLSTATE_UPSTREAM,
            "the session ended while the server's answer waited for the request's audit record to be durable",
        );

        // The record is durable: nothing is left on the request.
        let (writer, durable) = syncing("select 3");
        let _ = writer.send(Ok(7));
        hold_until_front_record_is_durable(&durable)
            .await
            .expect("durable");
        left_after(
            durable,
            false,
            super::super::SQLSTATE_UPSTREAM,
            "the server had not answered",
        );
    }

    #[test]
    fn cuts_fall_on_character_boundaries_and_say_so() {
        // "é" is two bytes: a cut at 5 would split the third one.
        assert_eq!(prefix_at_char_boundary("ééé", 5), "éé");
        assert_eq!(prefix_at_char_boundary("ééé", 100), "ééé");
        assert_eq!(prefix_at_char_boundary("✓", 2), "");
        assert_eq!(capped("short".into(), 64), "short");
        assert_eq!(capped("ab✓cd".into(), 3), "ab … (7 bytes, cut)");
    }

    #[test]
    fn an_outcome_keeps_the_server_message_and_the_text_within_bounds() {
        let long_text = "x".repeat(MAX_OUTCOME_TEXT + 10);
        let echoed = "\u{1}".repeat(MAX_SERVER_MESSAGE * 2);
        let outcome = outcome_record(
            query(&long_text),
            Some(("22P02".into(), echoed)),
            Delivery::Sent,
        )
        .expect("a statement has an outcome");
        assert!(outcome.status_detail.len() < MAX_SERVER_MESSAGE + 64);
        assert!(outcome.status_detail.ends_with("bytes, cut)"));
        assert!(outcome.query_info_query_string.len() < MAX_OUTCOME_TEXT + 100);
        assert!(outcome
            .query_info_query_string
            .ends_with("bytes; the whole text is in the request row)"));
        // Short texts are repeated whole.
        let outcome = outcome_record(query("select 1"), None, Delivery::Sent).expect("outcome");
        assert_eq!(outcome.query_info_query_string, "select 1");
    }

    /// A writer that keeps what it is given until flushed (as TLS does
    /// when the socket is full): `send_all` must flush.
    #[tokio::test]
    async fn send_all_flushes_what_a_buffering_writer_holds() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut buffering = tokio::io::BufWriter::new(near);
        send_all(&mut buffering, b"ReadyForQuery")
            .await
            .expect("send");
        let mut got = [0u8; 13];
        tokio::time::timeout(std::time::Duration::from_secs(5), far.read_exact(&mut got))
            .await
            .expect("the bytes arrive without another write")
            .expect("read");
        assert_eq!(&got, b"ReadyForQuery");
    }

    #[test]
    fn an_intent_is_kept_up_to_its_limit() {
        let long = format!("/* intent: {} */ SELECT 1", "why ".repeat(2000));
        let intent = intent_of(&long).expect("an intent");
        assert_eq!(intent.len(), MAX_INTENT);
        assert_eq!(
            intent_of("/* intent: audit */ SELECT 1").as_deref(),
            Some("audit")
        );
    }
}
