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
    classify::{classify, token_bound},
    mask::{self, MaskSet, ResultMask},
};
use super::{
    fatal, send_all, send_counted_unless_stalled,
    upstream::Upstream,
    wire::{self, Frame, WireError},
    FATAL_WRITE_WAIT, SQLSTATE_AUDIT, SQLSTATE_IDENTITY, SQLSTATE_POLICY, SQLSTATE_PROTOCOL,
    SQLSTATE_UPSTREAM,
};
use crate::{
    audit::{record, AuditError, AuditRecord, Durable, SharedText},
    identity::Principal,
    policy::{Decision, Operation, RecordResults, Request, RunByName, StatementKind},
    proxy::budget::{Share, SharedBudget},
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
    /// Set once the session runs a statement that may create, replace or
    /// change relations (DDL, administration, privileges, text tollgate
    /// cannot parse): a temporary view can then stand under a listed
    /// table's name (`pg_temp` is searched first), so the catalog read at
    /// login no longer tells which relations run no code when read.
    pub relations_may_have_changed: std::sync::atomic::AtomicBool,
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
    /// A refused Bind or Execute, sent on as an Execute of a portal that cannot
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

impl Kind {
    /// A statement a copy the client ends may belong to. A refused one
    /// counts too: it starts no copy, and the server ignores copy messages
    /// outside one.
    fn may_start_a_copy(self) -> bool {
        matches!(
            self,
            Kind::Query | Kind::Execute | Kind::RefusedQuery | Kind::RefusedExecute
        )
    }
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
    /// For a refusal answered in place: what the client gets, and the
    /// stand-in's marker.
    refusal: Option<InPlaceRefusal>,
    /// A Query or Execute that may start a COPY FROM STDIN (a COPY FROM
    /// STDIN among its statements, or text tollgate could not parse): the
    /// only requests the server's CopyInResponse may answer.
    may_copy_in: bool,
    /// Likewise for COPY TO STDOUT and the server's CopyOutResponse.
    may_copy_out: bool,
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
    /// For an Execute: its statement provably only reads (see
    /// `provably_read_only`), so its answer is all it did.
    read_only: bool,
    /// For an Execute: its statement may begin, end or change its
    /// transaction (see `may_change_transaction`).
    may_change_transaction: bool,
    /// For a Query: the server finished one of its statements
    /// (CommandComplete, EmptyQueryResponse or an error), so its
    /// ReadyForQuery may come.
    completed: bool,
    /// For a Sync: how many copies the client ended (CopyDone or CopyFail)
    /// before it since the last Query or Execute. One sent before the end
    /// of the copy the server is in went into it, and the server ignored
    /// it (see `copies_started`).
    copies_ended_before: u32,
    /// For a Query or Execute: how many COPY FROM STDIN it has started
    /// (CopyInResponse), several for a multi-statement Query.
    copies_started: u32,
    /// For a Query or Execute: how many CopyDone or CopyFail the client
    /// sent behind it before the server answered with CopyInResponse (a
    /// client that does not wait for it). A COPY FROM STDIN of it that
    /// starts is then already over as far as the client is concerned.
    copies_ended_early: u32,
    /// Tells entries apart while the client waits for one to be answered.
    id: u64,
    /// The name generation it was sent in (see `InFlight::generation`).
    generation: u64,
    /// The portal generation it was sent in (see
    /// `InFlight::portal_generation`).
    portal_generation: u64,
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
    /// The bytes of statement text and parameters it holds, counted when
    /// it was queued (see [`Queue`]).
    held_bytes: usize,
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
        // Past the cap rows are only counted; a row whose values alone
        // would not fit is not built into JSON (the values are at most as
        // long as their JSON) only to be dropped.
        if self.dropped > 0 {
            return self.leave_out();
        }
        let Ok(values) = mask::data_row_values(row) else {
            return;
        };
        let at_least: usize = values.iter().map(|v| v.map_or(4, <[u8]>::len)).sum();
        if self.bytes + at_least > MAX_RECORDED_RESULT_BYTES {
            return self.leave_out();
        }
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
        if self.bytes + size > MAX_RECORDED_RESULT_BYTES {
            return self.leave_out();
        }
        self.bytes += size;
        self.rows.push(row);
    }

    /// Counts a row that is not kept.
    fn leave_out(&mut self) {
        self.dropped += 1;
    }

    fn into_json(mut self) -> String {
        if self.dropped > 0 {
            self.rows
                .push(serde_json::json!({ "truncated_rows": self.dropped }));
        }
        serde_json::Value::Array(self.rows).to_string()
    }
}

/// Whether a DataRow answering `head` (the oldest request in flight;
/// `None`: no request asked for it) is rewritten by masking: in a session
/// with masks, unless its result's description planned no masking (a row
/// without a plan, or without a request, is masked whole). The one rule
/// for holding a row to rewrite it and for passing one on as it arrives.
fn row_rewritten(head: Option<&Pending>, masks: &MaskSet) -> bool {
    !masks.is_empty()
        && head
            .and_then(|head| head.result_mask.as_ref())
            .is_none_or(ResultMask::masks_anything)
}

impl Pending {
    /// Counts a DataRow of `len` bytes (header included) in the answer.
    fn count_row(&mut self, len: usize) {
        self.rows += 1;
        self.bytes += len as i64;
    }

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
            copies_ended_before: 0,
            copies_started: 0,
            completed: false,
            may_copy_in: false,
            may_copy_out: false,
            read_only: false,
            may_change_transaction: false,
            copies_ended_early: 0,
            id: 0,
            generation: 0,
            portal_generation: 0,
            durable: None,
            withheld: None,
            answer_held: false,
            recording: None,
            held_bytes: 0,
        }
    }

    /// The text this request keeps while it waits for its answer: its
    /// statement and parameters (up to 8 MiB in a record), a Parse's
    /// statement (up to a client message, 64 MiB).
    fn text_bytes(&self) -> usize {
        let record = self.request.as_ref().map_or(0, |r| {
            r.query_info_query_string.len() + r.query_info_parameters.len()
        });
        let parsed = self.parse.as_ref().map_or(0, |(_, p)| p.text.len());
        let bound = self
            .bind
            .as_ref()
            .map_or(0, |(_, (_, params))| params.len());
        record + parsed + bound
    }
}

/// The requests in flight, oldest first, and the bytes of text they hold
/// (see [`MAX_IN_FLIGHT_BYTES`]). Reads go to the queue itself; what adds
/// or removes an entry goes through here, so that the count stays right.
#[derive(Default)]
struct Queue {
    entries: VecDeque<Pending>,
    held_bytes: usize,
}

impl Queue {
    fn push_back(&mut self, mut pending: Pending) {
        pending.held_bytes = pending.text_bytes();
        self.held_bytes += pending.held_bytes;
        self.entries.push_back(pending);
    }

    fn pop_front(&mut self) -> Option<Pending> {
        let pending = self.entries.pop_front()?;
        self.held_bytes -= pending.held_bytes;
        Some(pending)
    }

    fn remove(&mut self, index: usize) -> Option<Pending> {
        let pending = self.entries.remove(index)?;
        self.held_bytes -= pending.held_bytes;
        Some(pending)
    }

    fn drain(&mut self) -> impl Iterator<Item = Pending> + '_ {
        self.held_bytes = 0;
        self.entries.drain(..)
    }

    // Entries are changed in place (answers noted) through these; adding
    // and removing goes through the methods above, so that the count
    // stays right (no `DerefMut`: a `VecDeque` method would bypass it).
    fn front_mut(&mut self) -> Option<&mut Pending> {
        self.entries.front_mut()
    }

    fn back_mut(&mut self) -> Option<&mut Pending> {
        self.entries.back_mut()
    }

    fn get_mut(&mut self, index: usize) -> Option<&mut Pending> {
        self.entries.get_mut(index)
    }

    fn iter_mut(&mut self) -> std::collections::vec_deque::IterMut<'_, Pending> {
        self.entries.iter_mut()
    }
}

impl std::ops::Deref for Queue {
    type Target = VecDeque<Pending>;
    fn deref(&self) -> &Self::Target {
        &self.entries
    }
}

/// What a portal runs: the statement and its rendered parameters.
type Bound = (Arc<Prepared>, String);

/// Named statements, and named portals, a session may have at once as
/// far as tollgate keeps them (the unnamed one is always kept: a new one
/// replaces it).
pub(super) const MAX_NAMED: usize = 10_000;

/// Bytes of names, statement text and rendered parameters those may hold.
pub(super) const MAX_NAMED_BYTES: usize = 256 << 20;

/// Bytes the kept statements and portals of all sessions together may
/// hold: without it, each of a target's `max_connections` sessions (one
/// token can open them all) could keep its own 512 MiB.
pub const MAX_NAMED_BYTES_ALL_SESSIONS: usize = 1 << 30;

/// Bytes those of one identity's sessions together may hold: one token
/// must not take what all sessions share from everyone else.
pub const MAX_NAMED_BYTES_ONE_IDENTITY: usize = MAX_NAMED_BYTES_ALL_SESSIONS / 4;

/// What the kept statements and portals of all sessions hold, in bytes, in
/// all and by identity (see [`MAX_NAMED_BYTES_ALL_SESSIONS`],
/// [`MAX_NAMED_BYTES_ONE_IDENTITY`]).
#[derive(Debug, Default, Clone)]
pub struct NamedBudget(Arc<Mutex<NamedHeld>>);

#[derive(Debug, Default)]
struct NamedHeld {
    total: usize,
    by_identity: HashMap<Arc<str>, usize>,
}

impl NamedBudget {
    /// The share of the sessions of the identity `object_id`.
    pub(super) fn share(&self, object_id: &str) -> NamedShare {
        NamedShare {
            budget: self.clone(),
            identity: object_id.into(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NamedHeld> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What all sessions hold now.
    pub fn held(&self) -> usize {
        self.lock().total
    }
}

/// One session's handle on the [`NamedBudget`], as the identity it runs as.
#[derive(Debug, Default, Clone)]
pub(super) struct NamedShare {
    budget: NamedBudget,
    identity: Arc<str>,
}

impl NamedShare {
    /// Takes `bytes` if the identity's sessions, and all sessions, stay
    /// within their bounds.
    fn take(&self, bytes: usize) -> bool {
        let mut held = self.budget.lock();
        let mine = held.by_identity.get(&self.identity).copied().unwrap_or(0);
        if held.total + bytes > MAX_NAMED_BYTES_ALL_SESSIONS
            || mine + bytes > MAX_NAMED_BYTES_ONE_IDENTITY
        {
            return false;
        }
        held.total += bytes;
        *held.by_identity.entry(self.identity.clone()).or_default() += bytes;
        true
    }

    fn give_back(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut held = self.budget.lock();
        held.total = held.total.saturating_sub(bytes);
        if let Some(mine) = held.by_identity.get_mut(&self.identity) {
            *mine = mine.saturating_sub(bytes);
            if *mine == 0 {
                held.by_identity.remove(&self.identity);
            }
        }
    }

    /// What all sessions hold now.
    fn held(&self) -> usize {
        self.budget.held()
    }
}

/// The bytes of a kept statement or portal, besides its name.
trait KeptBytes {
    fn kept_bytes(&self) -> usize;
}

impl KeptBytes for Arc<Prepared> {
    fn kept_bytes(&self) -> usize {
        self.text.len()
    }
}

impl KeptBytes for Bound {
    // The statement's text too: a portal keeps it alive after the
    // statement is closed (a Parse, Bind, Close cycle inside a block would
    // otherwise keep any number of statements no bound counts). Counted
    // twice while the statement is kept too, which only bounds sooner.
    fn kept_bytes(&self) -> usize {
        self.0.text.len() + self.1.len()
    }
}

/// The statements (or portals) the server confirmed, by name, with the
/// generation they were defined in, and the bytes they hold. A client
/// may prepare as many as the server lets it, each up to a message's
/// 64 MiB, in memory that all sessions share: past [`MAX_NAMED`] or
/// [`MAX_NAMED_BYTES`] a new name is not kept, and so resolves as unknown
/// (an Execute of it is decided as not understood: nothing runs as a
/// statement tollgate did not keep). Lookups go to the map; what adds or
/// removes an entry goes through here, so that the count stays right.
struct Named<T: KeptBytes> {
    map: HashMap<String, (u64, T)>,
    bytes: usize,
    /// The daemon-wide budget the named ones' bytes are taken from.
    budget: NamedShare,
}

impl<T: KeptBytes> Default for Named<T> {
    fn default() -> Self {
        Named {
            map: HashMap::new(),
            bytes: 0,
            budget: NamedShare::default(),
        }
    }
}

impl<T: KeptBytes> Drop for Named<T> {
    fn drop(&mut self) {
        self.budget.give_back(self.charged());
    }
}

impl<T: KeptBytes> Named<T> {
    /// What the named ones hold of the daemon-wide budget: all but the
    /// unnamed one.
    fn charged(&self) -> usize {
        self.bytes - self.map.get("").map_or(0, |(_, e)| e.kept_bytes())
    }

    /// Keeps `entry` under `name`; false when it is past the bounds (the
    /// name is then not kept at all, not even an older definition).
    fn insert(&mut self, name: String, entry: (u64, T)) -> bool {
        self.remove(&name);
        let bytes = name.len() + entry.1.kept_bytes();
        let named = self.map.len() - usize::from(self.map.contains_key(""));
        if !name.is_empty() && (named >= MAX_NAMED || self.bytes + bytes > MAX_NAMED_BYTES) {
            warn!(
                kept = self.map.len(),
                bytes = self.bytes,
                "a prepared statement or portal past the session's bounds is not kept: it resolves as unknown"
            );
            return false;
        }
        // The unnamed one is always kept (it replaces the last): it is not
        // taken from the budget all sessions share, which it could then
        // fill for everyone else. One a session, it is bounded by the
        // message size.
        if !name.is_empty() && !self.budget.take(bytes) {
            warn!(
                all_sessions = self.budget.held(),
                "a prepared statement or portal past the bytes one identity's sessions, or all sessions, may keep is not kept: it resolves as unknown"
            );
            return false;
        }
        self.bytes += bytes;
        self.map.insert(name, entry);
        true
    }

    fn remove(&mut self, name: &str) -> Option<(u64, T)> {
        let entry = self.map.remove(name)?;
        let bytes = name.len() + entry.1.kept_bytes();
        self.bytes -= bytes;
        if !name.is_empty() {
            self.budget.give_back(bytes);
        }
        Some(entry)
    }

    fn clear(&mut self) {
        self.budget.give_back(self.charged());
        self.map.clear();
        self.bytes = 0;
    }
}

impl<T: KeptBytes> std::ops::Deref for Named<T> {
    type Target = HashMap<String, (u64, T)>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

#[derive(Default)]
struct InFlight {
    queue: Queue,
    /// Prepared statements the server has confirmed (ParseComplete), with
    /// the generation they were parsed in.
    statements: Named<Arc<Prepared>>,
    /// Portals the server has confirmed (BindComplete), likewise.
    portals: Named<Bound>,
    /// Bumped when a statement that may create or drop statements or
    /// portals in SQL (DECLARE, CLOSE, PREPARE, DEALLOCATE, DISCARD, or
    /// one tollgate could not parse) is sent: names defined before it are
    /// no longer trusted, and resolve as unknown until defined again.
    generation: u64,
    /// Bumped with `generation`, and when a statement that may end the
    /// transaction is sent (`Operation::ends_transaction`: COMMIT,
    /// ROLLBACK, ROLLBACK TO SAVEPOINT, a CALL that commits, ...; not
    /// BEGIN, SAVEPOINT or RELEASE): the server then drops the portals the
    /// protocol bound, and a later one of the same name (a function's
    /// `OPEN` of a cursor by that name) is another. Portals defined before
    /// it resolve as unknown; statements stay. (A Sync or a simple Query
    /// ends the transaction too, outside a block: see `resolve`.)
    portal_generation: u64,
    /// The server met an error in an extended-protocol pipeline and skips
    /// everything up to the client's next Sync: what the client sends
    /// meanwhile is dropped, not queued (it would get no answer).
    server_skipping: bool,
    /// The server is in COPY FROM STDIN: only copy messages (and the Flush
    /// it ignores) may follow until CopyDone or CopyFail.
    copy_in: bool,
    next_id: u64,
    /// The id of the latest Query or Execute (refused or not) queued: the
    /// statement a copy ended early belongs to (see `copy_ended_early`).
    latest_statement: Option<u64>,
    /// Why tollgate itself closed the session (the SQLSTATE and message
    /// of the FATAL the agent got): the reason requests still in flight
    /// never had their answers relayed, whether or not the server had
    /// answered them yet.
    closed_by: Option<(String, String)>,
    /// The implicit transaction of an extended-protocol pipeline (see
    /// [`ImplicitTransaction`]).
    implicit: ImplicitTransaction,
}

/// Outside a transaction block, what a pipeline runs before its Sync is
/// one implicit transaction: committed at the Sync, or rolled back, every
/// statement of it, by an error anywhere in it (a later Execute's, or the
/// commit's own at the Sync). The outcome of an Execute that may have
/// written is held here until the Sync says which, so that a statement
/// whose work was rolled back is not recorded as done.
#[derive(Default)]
struct ImplicitTransaction {
    /// Completed Executes waiting for their pipeline's Sync.
    held: Vec<Pending>,
    /// What `held` holds of statement text, parameters and recorded rows.
    held_bytes: usize,
    /// The first error met since the last ReadyForQuery.
    error: Option<(String, String)>,
    /// The last ReadyForQuery said a transaction block is open ('T' or
    /// 'E'): statements are in it, not in an implicit one.
    in_block: bool,
    /// A statement that may begin or end a transaction (or one tollgate
    /// could not parse) ran since the last ReadyForQuery: what follows is
    /// no longer known to share one implicit transaction.
    unknown: bool,
    /// More outcomes came since the last ReadyForQuery than are held for
    /// one (see [`MAX_HELD_OUTCOMES`]).
    overflowed: bool,
}

/// Most Execute outcomes held for one Sync, and the most they may hold of
/// statement text, parameters and recorded rows; past either, further
/// outcomes of the pipeline are written as they complete, with status
/// unknown (a pipeline that long without a Sync is not held in memory).
const MAX_HELD_OUTCOMES: usize = 8192;
const MAX_HELD_OUTCOME_BYTES: usize = 64 << 20;

impl ImplicitTransaction {
    /// Takes a completed Execute: held while what becomes of its work is
    /// decided by its pipeline's Sync, else finished at once.
    fn completed(&mut self, done: Pending, finished: &mut Finished) {
        // It may begin, end or change the transaction: what was held
        // before it can no longer be told committed or rolled back, and an
        // error after it says nothing sure about what came between.
        if done.may_change_transaction {
            self.may_have_changed(finished);
            finished.push((done, Outcome::Succeeded));
            return;
        }
        // A provable read's answer is what it did; inside a block that no
        // statement of the pipeline changed, what happens to the work is
        // its COMMIT's or ROLLBACK's, a row of its own.
        if done.read_only || (self.in_block && !self.unknown) {
            finished.push((done, Outcome::Succeeded));
            return;
        }
        // Its text and parameters, as the queue counted them.
        let size = done.held_bytes + done.recording.as_ref().map_or(0, |r| r.bytes);
        if self.overflowed
            || self.held.len() >= MAX_HELD_OUTCOMES
            || self.held_bytes + size > MAX_HELD_OUTCOME_BYTES
        {
            self.overflowed = true;
            let why = Outcome::not_known(
                "not held for its pipeline's Sync (too many statements waiting for it): it may have been rolled back with its pipeline's implicit transaction",
            );
            finished.push((done, why));
            return;
        }
        self.held_bytes += size;
        self.held.push(done);
    }

    /// A statement that may begin, end or change the transaction ran (an
    /// Execute of one, or a simple Query with one among its statements,
    /// which runs in the pipeline's implicit transaction): what was held
    /// before it can no longer be told committed or rolled back, nor what
    /// follows by an error.
    fn may_have_changed(&mut self, finished: &mut Finished) {
        self.unknown = true;
        if !self.held.is_empty() {
            self.release(finished, Self::not_known());
        }
    }

    fn not_known() -> Outcome {
        Outcome::not_known(
            "a statement of its pipeline may have begun or ended its transaction: not known whether it was committed",
        )
    }

    fn failed(&mut self, error: &(String, String)) {
        self.error.get_or_insert_with(|| error.clone());
    }

    /// A ReadyForQuery with transaction status `status`: the pipeline
    /// before it was committed, or rolled back if it met an error (not
    /// known, when a statement in it may have changed the transaction).
    fn ended(&mut self, status: Option<u8>, finished: &mut Finished) {
        let outcome = match self.error.take() {
            None => Outcome::Succeeded,
            Some((code, message)) if self.unknown => Outcome::not_known(format!(
                "its pipeline failed after a statement that may have changed its transaction: not known whether it was committed ({code}: {message})"
            )),
            Some((code, message)) => Outcome::Failed {
                code,
                message: format!("rolled back with its pipeline's implicit transaction: {message}"),
            },
        };
        self.release(finished, outcome);
        self.unknown = false;
        self.overflowed = false;
        self.in_block = status != Some(b'I');
    }

    fn release(&mut self, finished: &mut Finished, outcome: Outcome) {
        self.held_bytes = 0;
        for done in self.held.drain(..) {
            finished.push((done, outcome.clone()));
        }
    }
}

/// A refusal put in the place of the server's error to its stand-in.
#[derive(Debug)]
struct InPlaceRefusal {
    /// The SQLSTATE and message the client gets.
    code: String,
    message: String,
    /// The name of the portal the stand-in Execute runs, or the text the
    /// stand-in Query sends (see [`refusal_marker`]).
    marker: String,
}

/// A refusal's marker: the name of the portal a refused Execute is
/// replaced by, and the text a refused Query is replaced by. Random and
/// new for each refusal, so no statement or portal of the agent's can be
/// it (a stand-in Query's text shows in `pg_stat_activity`, where another
/// session could read it: by then it is spent); the server's error naming
/// it is known to be the refusal's and no other.
pub(super) fn refusal_marker() -> String {
    format!("tollgate_refused_{}", uuid::Uuid::new_v4().simple())
}

/// What a name (of a statement or a portal) stands for when the server
/// reaches the message that uses it.
enum Resolved<T> {
    Known(T),
    /// A Parse, Bind or Close of the name sent before the last Sync is
    /// still unanswered (whether it took effect decides what the server
    /// will use), or, for a portal, a Sync or simple Query sent after it
    /// (whether it ended the portal's transaction): the client's messages
    /// wait until that request is answered.
    WaitFor(u64),
}

impl InFlight {
    /// Queues `pending` for its answer; gives it back when the server will
    /// not answer it. After an error the server skips every message up to
    /// the next Sync, and a message queued once that error has come (the
    /// client's reader looked before it came, and then waited for a
    /// record or a name) would wait for an answer that never comes, with
    /// every later answer taken for the one before it.
    #[must_use = "a message given back is not to be sent: the server would ignore it"]
    fn push(&mut self, mut pending: Pending) -> Option<Pending> {
        if self.server_skipping && pending.kind != Kind::Sync {
            return Some(pending);
        }
        self.next_id += 1;
        pending.id = self.next_id;
        if pending.kind.may_start_a_copy() {
            self.latest_statement = Some(pending.id);
        }
        pending.generation = self.generation;
        pending.portal_generation = self.portal_generation;
        self.queue.push_back(pending);
        None
    }

    /// The client ended a copy (CopyDone or CopyFail) outside COPY FROM
    /// STDIN mode: it belongs to the latest Query or Execute, whose
    /// CopyInResponse has not come yet (if that is no COPY, the server
    /// ignores the message, and so does this count).
    ///
    /// Found by its id, which the queue holds in order, rather than by a
    /// walk back from the newest request: CopyDone is five bytes that wait
    /// for nothing, and a walk past thousands of queued Syncs for each would
    /// let one session keep a worker busy.
    fn copy_ended_early(&mut self) {
        let Some(id) = self.latest_statement else {
            return;
        };
        // Gone once answered, with everything before it.
        if let Ok(index) = self.queue.binary_search_by_key(&id, |p| p.id) {
            if let Some(statement) = self.queue.get_mut(index) {
                statement.copies_ended_early += 1;
            }
        }
    }

    /// What the server will find under a statement or portal name. The
    /// latest Parse/Bind/Close of it still in flight decides when it is in
    /// the current pipeline (no Sync since): if it fails, the server skips
    /// to Sync and never uses the name. One sent before a Sync may fail and
    /// leave the older definition in place: wait for its answer. Otherwise
    /// what the server confirmed.
    ///
    /// A portal (`portal`; else a statement) ends with its transaction: a Sync or a simple
    /// Query still unanswered may end it (outside a transaction block a
    /// Sync commits the implicit one, and a Query commits it when done, or
    /// aborts it with an error), so a portal defined before one is looked
    /// up once it is answered, when the server's ReadyForQuery has said
    /// whether the portals are gone.
    fn resolve<T: Clone>(
        &self,
        name: &str,
        portal: bool,
        defines: impl Fn(&Pending) -> Option<Option<T>>,
        confirmed: Option<&(u64, T)>,
    ) -> Resolved<Option<T>> {
        let unnamed = name.is_empty();
        // The generation names of this kind are trusted in.
        let (current, generation_of): (u64, fn(&Pending) -> u64) = match portal {
            true => (self.portal_generation, |p| p.portal_generation),
            false => (self.generation, |p| p.generation),
        };
        let mut synced_since = false;
        for pending in self.queue.iter().rev() {
            if generation_of(pending) != current {
                // Sent before names stopped being trusted.
                break;
            }
            if unnamed && matches!(pending.kind, Kind::Query | Kind::RefusedQuery) {
                // A simple Query drops the unnamed statement and portal
                // before it runs, whatever came before it.
                return Resolved::Known(None);
            }
            if portal && matches!(pending.kind, Kind::Sync | Kind::Query | Kind::RefusedQuery) {
                return Resolved::WaitFor(pending.id);
            }
            if pending.kind == Kind::Sync {
                synced_since = true;
                continue;
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
                .filter(|(generation, _)| *generation == current)
                .map(|(_, found)| found.clone()),
        )
    }

    /// After a statement that may create or drop statements or portals in
    /// SQL (or one not understood) is sent, names defined before it are no
    /// longer trusted.
    /// A statement that may end the transaction likewise ends the
    /// portals bound before it, and one that may reopen cursors
    /// (`may_reopen_cursors`, a call of the database's own code) makes
    /// them unknown, but for the portal it runs in (`executing`).
    fn note_renames(
        &mut self,
        operations: &Result<Vec<Operation>, String>,
        may_reopen_cursors: bool,
        executing: Option<&str>,
    ) {
        let (renames, ends_transaction) = match operations {
            Ok(ops) => (
                ops.iter().any(|op| op.renames_protocol_objects),
                ops.iter().any(|op| op.ends_transaction),
            ),
            Err(_) => (true, true),
        };
        if renames {
            self.generation += 1;
        }
        if renames || ends_transaction {
            self.portal_generation += 1;
        } else if may_reopen_cursors {
            self.note_cursors_reopened(executing);
        }
    }

    /// Code of the database's own may run next (a function's `CLOSE` and
    /// `OPEN` of a refcursor take any name): the portals bound before it
    /// are no longer trusted, but for `executing`, the portal it runs in,
    /// which PostgreSQL does not let it drop ("cannot drop active
    /// portal"), so that a client reading a portal in steps (JDBC with a
    /// fetch size) goes on. The portal is carried into the new generation,
    /// confirmed or still being bound; so is everything in flight but the
    /// Binds of other portals, which a lookup of `executing` may have to
    /// walk past. (Behind a Bind of another portal still in flight, it is
    /// not found, and refused as unknown.)
    fn note_cursors_reopened(&mut self, executing: Option<&str>) {
        let before = self.portal_generation;
        self.portal_generation += 1;
        let Some(executing) = executing else {
            return;
        };
        let now = self.portal_generation;
        // One pass: carry what may be walked past, and see whether the name
        // is defined again in flight (a Bind or Close of it not yet
        // answered), in which case the confirmed one is not what runs.
        let mut redefined = false;
        for pending in self.queue.iter_mut() {
            let bound = pending.bind.as_ref().map(|(name, _)| name.as_str());
            let closed = pending
                .close
                .as_ref()
                .filter(|(kind, _)| *kind == b'P')
                .map(|(_, name)| name.as_str());
            redefined |= bound == Some(executing) || closed == Some(executing);
            let binds_another = bound.is_some_and(|name| name != executing);
            if pending.portal_generation == before && !binds_another {
                pending.portal_generation = now;
            }
        }
        if let Some((generation, _)) = self.portals.map.get_mut(executing) {
            if *generation == before && !redefined {
                *generation = now;
            }
        }
    }

    fn statement(&self, name: &str) -> Resolved<Option<Arc<Prepared>>> {
        self.resolve(
            name,
            false,
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
            name,
            true,
            |p| match (&p.bind, &p.close) {
                (Some((bound, what)), _) if bound == name => Some(Some(what.clone())),
                (_, Some((b'P', closed))) if closed == name => Some(None),
                _ => None,
            },
            self.portals.get(name),
        )
    }
}

type ClientWriter = Arc<tokio::sync::Mutex<AgentWriter>>;

/// The agent's side of the connection, and whether it is inside a
/// message: a write of answers that has begun and not ended (abandoned
/// part-way when the session ended while it waited), or a message passed
/// on as it arrives. A FATAL written then would be read as the rest of
/// that message (see [`close_after_built_answers`]).
struct AgentWriter {
    io: WriteHalf<BoxedIo>,
    mid_message: bool,
}

impl AgentWriter {
    fn shared(io: WriteHalf<BoxedIo>) -> ClientWriter {
        Arc::new(tokio::sync::Mutex::new(AgentWriter {
            io,
            mid_message: false,
        }))
    }

    /// [`send_counted`] of whole messages: inside a message until all of
    /// them are written (and for good after an earlier write that was not).
    async fn send_counted(&mut self, bytes: &[u8], handed_over: &mut usize) -> std::io::Result<()> {
        self.send_counted_unless_stalled(bytes, handed_over, None)
            .await
            .map(|_| ())
    }

    /// [`Self::send_counted`], given up on (`Ok(false)`, still inside the
    /// message) when the agent takes nothing for `stall`.
    async fn send_counted_unless_stalled(
        &mut self,
        bytes: &[u8],
        handed_over: &mut usize,
        stall: Option<std::time::Duration>,
    ) -> std::io::Result<bool> {
        let before = self.mid_message;
        self.mid_message = true;
        let sent = send_counted_unless_stalled(&mut self.io, bytes, handed_over, stall).await?;
        if sent {
            self.mid_message = before;
        }
        Ok(sent)
    }
}
pub type ClientReader = ReadHalf<BoxedIo>;

mod admit;
mod from_client;
mod from_server;
use admit::*;
pub use admit::{intent_of_application_name, ParsingBudget};
use from_client::client_to_server;
pub use from_server::HeldWholeBudget;
use from_server::*;

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
    let mut in_flight = InFlight::default();
    let share = session
        .shared
        .postgres_named
        .share(&session.principal.object_id);
    in_flight.statements.budget = share.clone();
    in_flight.portals.budget = share;
    let in_flight = Arc::new(Mutex::new(in_flight));
    // Signalled whenever server answers have been taken off the queue.
    let answered = Arc::new(Notify::new());
    let client_wr = AgentWriter::shared(client_wr);
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
    // Writes the FATAL of a session ended from outside (token expiry, stop).
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
    // Whichever side ends first ends the session; so do the token's expiry
    // and the daemon's stop. Both relay halves are dropped before the
    // session is ended from outside: either may hold the agent's writer
    // while its write waits on an agent that stopped reading, and the
    // FATAL takes that writer (a half dropped mid-message leaves it
    // marked so, and the connection is closed without the FATAL).
    let ended = {
        let mut to_client = std::pin::pin!(to_client);
        tokio::select! {
            r = to_server => match r {
                // The target's connection broke under a request: its reader
                // sees the loss too, and tells the agent and the audit.
                Err(WireError::Io(err)) if wrote_to_a_lost_target(&err) => {
                    tokio::select! {
                        r = &mut to_client => Ended::Relayed(r),
                        () = tokio::time::sleep(UPSTREAM_LOSS_GRACE) => {
                            Ended::Relayed(Err(WireError::Io(err)))
                        }
                        // The daemon's stop does not wait for the grace.
                        () = session.shared.sessions.stopping() => {
                            Ended::Relayed(Err(WireError::Io(err)))
                        }
                    }
                }
                r => Ended::Relayed(r),
            },
            r = &mut to_client => Ended::Relayed(r),
            () = sleep_until_epoch(deadline) => Ended::TokenExpired,
            () = session.shared.sessions.stopping() => Ended::Stopping,
        }
    };
    let result = match ended {
        Ended::Relayed(r) => r,
        Ended::TokenExpired => {
            end_expired_session(&session, &expiry_writer, &in_flight).await;
            Ok(())
        }
        Ended::Stopping => {
            end_session_for_stop(&session, &expiry_writer, &in_flight).await;
            Ok(())
        }
    };
    record_unanswered(&session, &in_flight);
    result
}

/// How a session's relay ended.
enum Ended {
    /// One of its halves ended (the agent or the target closed, or an
    /// error).
    Relayed(Result<(), WireError>),
    TokenExpired,
    Stopping,
}

/// How long the reader of the target's side is given to notice a lost
/// connection that a write found first.
const UPSTREAM_LOSS_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

fn wrote_to_a_lost_target(err: &std::io::Error) -> bool {
    err.get_ref()
        .is_some_and(|inner| inner.is::<from_client::UpstreamWriteFailed>())
}

/// Writes the outcome records of the requests still in flight when the
/// session ends (see [`unanswered_outcomes`]).
fn record_unanswered(session: &Session, in_flight: &Mutex<InFlight>) {
    let (left, closed_by, held) = {
        let mut in_flight = lock(in_flight);
        let left: Vec<Pending> = in_flight.queue.drain().collect();
        let held = std::mem::take(&mut in_flight.implicit.held);
        (left, in_flight.closed_by.take(), held)
    };
    for outcome in uncommitted_outcomes(held) {
        submit_outcome(session, outcome);
    }
    for outcome in unanswered_outcomes(left, closed_by) {
        submit_outcome(session, outcome);
    }
}

/// The outcome records of Executes that completed in an implicit
/// transaction whose Sync the session ended before: whether their work
/// was committed is not known.
fn uncommitted_outcomes(held: Vec<Pending>) -> Vec<AuditRecord> {
    held.into_iter()
        .filter_map(|done| {
            let why = Outcome::not_known(
                "the session ended before its pipeline's Sync was answered: not known whether its implicit transaction was committed",
            );
            outcome_record(done, why, Delivery::Sent)
        })
        .collect()
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
                    SQLSTATE_UPSTREAM.to_string(),
                    "the session ended while the server's answer waited for the request's audit record to be durable".to_string(),
                ),
                (None, false) => match &closed_by {
                    Some((code, message)) => (
                        code.clone(),
                        format!("tollgate closed the session before the server's answer was relayed in full: {message}"),
                    ),
                    None if pending.rows > 0 || pending.bytes > 0 => (
                        SQLSTATE_UPSTREAM.to_string(),
                        "the session ended while the server's answer was coming: it was not relayed in full".to_string(),
                    ),
                    None => (
                        SQLSTATE_UPSTREAM.to_string(),
                        "the server had not answered".to_string(),
                    ),
                },
            };
            let (code, reason) = why;
            let why = Outcome::NotKnown {
                code: Some(code),
                reason,
            };
            let outcome = outcome_record(pending, why, Delivery::NotSent)?;
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
    end_session_because(
        session,
        client_wr,
        in_flight,
        "token_expired",
        &message,
        SQLSTATE_IDENTITY,
    )
    .await;
}

/// [`end_session`] of a session tollgate ends on its own between two of
/// the agent's messages (nothing of an answer handed over): the row's
/// `status_detail` is `reason: message`, and the agent gets `message`.
async fn end_session_because(
    session: &Session,
    client_wr: &ClientWriter,
    in_flight: &Mutex<InFlight>,
    reason: &str,
    message: &str,
    code: &str,
) {
    let detail = format!("{reason}: {message}");
    end_session(
        session,
        &mut 0,
        client_wr,
        in_flight,
        detail,
        code,
        Some(message),
    )
    .await;
}

/// Ends a session from outside the agent's requests (its token expired,
/// the daemon stopped, the target's connection was lost): first its
/// session row (who, where, `status_detail` saying why, `code` the error
/// the agent gets), then FATAL `code` `fatal` to the agent; `None` when
/// the server's own FATAL already reached it.
async fn end_session(
    session: &Session,
    handed_over: &mut usize,
    client_wr: &ClientWriter,
    in_flight: &Mutex<InFlight>,
    status_detail: String,
    code: &str,
    fatal: Option<&str>,
) {
    let mut record = session
        .connection
        .authentication_accepted(&session.principal);
    record.phase = "session".into();
    record.status_id = record::status::FAILURE;
    record.status_detail = status_detail;
    record.response_error_code = code.into();
    record.database_user = session.statement_record.database_user.clone();
    record.database_name = session.statement_record.database_name.clone();
    if let Err(err) = session.shared.audit.append(record).await {
        warn!(error = %err, code, "the end of a session could not be audited");
    }
    if let Some(message) = fatal {
        close_after_built_answers(&[], handed_over, client_wr, in_flight, code, message).await;
    }
}

/// SQLSTATE admin_shutdown.
const SQLSTATE_ADMIN_SHUTDOWN: &str = "57P01";

/// The daemon is stopping: the agent is told, in its protocol, as
/// PostgreSQL tells its clients at a fast shutdown, and the session row
/// says why it ended. Requests still in flight are then recorded as
/// unanswered, with this reason.
async fn end_session_for_stop(
    session: &Session,
    client_wr: &ClientWriter,
    in_flight: &Mutex<InFlight>,
) {
    let message =
        "tollgate is stopping (administrator command): the session is closed; reconnect once it is back";
    end_session_because(
        session,
        client_wr,
        in_flight,
        "daemon_stopping",
        message,
        SQLSTATE_ADMIN_SHUTDOWN,
    )
    .await;
}

fn lock(in_flight: &Mutex<InFlight>) -> std::sync::MutexGuard<'_, InFlight> {
    // A poisoned lock only means another task panicked mid-update; the
    // queue itself is still a queue.
    in_flight
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Ends the session with a FATAL error the client can read, and keeps
/// why for the records of requests still in flight. Holding the writer
/// lock puts it between two whole messages, unless the session ended in
/// the middle of one passed on as it arrived (see
/// [`close_after_built_answers`]).
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

/// A statement prepared with Parse, classified once.
struct Prepared {
    text: String,
    operations: Arc<Result<Vec<Operation>, String>>,
    parameter_types: Vec<u32>,
    /// What the session's grants and masks say about it (see [`judge`]).
    judged: Judged,
}

impl Prepared {
    /// A statement as a Parse gives it, classified and judged once.
    async fn new(session: &Session, text: String, parameter_types: Vec<u32>) -> Self {
        let operations = classify_within_limit(session, &text).await;
        Prepared {
            judged: judge(session, &operations),
            text,
            operations: Arc::new(operations),
            parameter_types,
        }
    }

    /// What an Execute of an unknown portal runs: nothing tollgate could
    /// understand, so only `allow_unparsed` lets it through.
    fn unknown(session: &Session) -> Self {
        let operations = Err("portal or statement not prepared through this session".into());
        Prepared {
            judged: judge(session, &operations),
            text: String::new(),
            operations: Arc::new(operations),
            parameter_types: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
