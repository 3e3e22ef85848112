//! Where a statement is decided: classified, checked against the
//! session's grants, and its request record made durable (or started
//! syncing, for a provably read-only statement) before it may reach the
//! server.

use super::*;

pub(super) struct Refusal {
    pub(super) code: String,
    pub(super) message: String,
}

/// An admitted request: its durable (or syncing) request record, and
/// whether its results are recorded in full.
pub(super) struct Admitted {
    record: AuditRecord,
    durable: Option<Durable>,
    record_full: bool,
    /// Its judgement's `read_only`, as it stands when it runs (see
    /// [`admit`]).
    read_only: bool,
}

impl Admitted {
    /// Its place in the queue, with what its statement's judgement says
    /// about its answers and its outcome.
    pub(super) fn into_pending(self, kind: Kind, judged: &Judged) -> Pending {
        let mut pending = Pending::new(kind, Some(self.record));
        pending.durable = self.durable;
        pending.reads_masked = judged.reads_masked;
        pending.read_only = self.read_only;
        // Sent behind Executes not yet synced, a Query runs in their
        // implicit transaction, and may commit or roll it back.
        pending.may_change_transaction = judged.may_change_transaction;
        pending.may_copy_in = judged.may_copy_in;
        pending.may_copy_out = judged.may_copy_out;
        if self.record_full {
            pending.recording = Some(ResultRecording::default());
        }
        pending
    }
}

/// May begin, end or change the transaction it runs in: BEGIN, COMMIT,
/// ROLLBACK, SAVEPOINT; admin statements (CALL and DO may commit, SET ROLE
/// changes who commits); or a statement tollgate could not parse.
pub(super) fn may_change_transaction(operations: &Result<Vec<Operation>, String>) -> bool {
    match operations {
        Ok(ops) => ops
            .iter()
            .any(|op| matches!(op.kind, StatementKind::Transaction | StatementKind::Admin)),
        Err(_) => true,
    }
}

/// Reads only, touches no dangerous feature and calls no function (a
/// function may write), nor any name the session knows as a function of
/// the database's own: nothing can change if it runs before its record is
/// durable.
pub(super) fn provably_read_only(operations: &Result<Vec<Operation>, String>) -> bool {
    matches!(operations, Ok(ops) if !ops.is_empty() && ops.iter().all(|op| {
        op.kind == StatementKind::Read
            && op.dangers.is_empty()
            && !op.calls_functions
            && !op.calls_unknown_functions
            && op.writes.is_empty()
    }))
}

/// Whether every relation the statement reads runs no code of the
/// database's own when read (see [`MaskSet::read_runs_no_code`]): a read
/// of a view, a foreign table or a table with row security may call a
/// function that writes, though its text calls none. Known only until the
/// session runs a statement that may change relations (see
/// [`Session::relations_may_have_changed`]), which this notes.
pub(super) fn reads_run_no_code(
    session: &Session,
    operations: &Result<Vec<Operation>, String>,
) -> bool {
    use std::sync::atomic::Ordering;
    // A function of the database's own may run DDL too (`EXECUTE 'CREATE
    // TEMP VIEW ...'`).
    let may_change_relations = match operations {
        Ok(ops) => ops.iter().any(|op| {
            matches!(
                op.kind,
                StatementKind::Ddl | StatementKind::Admin | StatementKind::Dcl
            ) || op.moves_names
                || op.defines_routine
                || op.calls_unknown_functions
        }),
        Err(_) => true,
    };
    if may_change_relations {
        if !session
            .relations_may_have_changed
            .swap(true, Ordering::Relaxed)
        {
            // The next logins to this database read the catalog afresh
            // rather than take a list this session may have outdated.
            session.shared.postgres_catalogs.forget(
                &session.connection.target.name,
                &session.statement_record.database_name,
            );
        }
        return false;
    }
    !session.relations_may_have_changed.load(Ordering::Relaxed)
        && matches!(operations, Ok(ops) if ops
            .iter()
            .all(|op| op.reads.iter().all(|table| session.masks.read_runs_no_code(table))))
}

/// A statement's record as it starts: the session's shared fields, the
/// time, the class of activity, a fresh request id.
pub(super) fn new_statement_record(session: &Session, activity: i32) -> AuditRecord {
    let mut record = session.statement_record.clone();
    record.time = now_millis();
    set_class(&mut record, record::CLASS_DATASTORE_ACTIVITY, activity);
    record.request_uid = uuid::Uuid::new_v4().to_string();
    record
}

/// Decides a statement and makes its request record durable (or, for a
/// provably read-only statement, starts making it durable: the returned
/// [`Durable`] must resolve before any of its answer reaches the agent).
/// `Ok` carries the record the outcome will complete; `Err` is what the
/// agent is told.
pub(super) async fn admit(
    session: &Session,
    text: &str,
    operations: &Result<Vec<Operation>, String>,
    judged: &Judged,
    parameters: String,
) -> Result<Admitted, Refusal> {
    if text.len() > MAX_AUDITED_STATEMENT {
        return Err(refuse_oversized(session, text, operations, &over_the_statement_limit()).await);
    }
    let mut record = request_record(session, text, operations, parameters);
    let decision = judged.decision.clone();
    if let Decision::Deny { rule, reason } = decision {
        return Err(refuse_denied(session, record, text, operations, &rule, &reason).await);
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
    // A statement judged at its Parse runs later: if the session has since
    // run something that may have changed relations, what its name reads
    // may be a view now (PostgreSQL plans it again).
    let read_only = judged.read_only
        && !session
            .relations_may_have_changed
            .load(std::sync::atomic::Ordering::Relaxed);
    // A provably read-only statement goes out while its record syncs; its
    // answer is held until the record is durable (see server_to_client).
    let written = if session
        .shared
        .audit
        .durability()
        .may_forward_before_durable(read_only)
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
            read_only,
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

/// A statement's request record before the decision: its text,
/// parameters, intent, kind and tables.
fn request_record(
    session: &Session,
    text: &str,
    operations: &Result<Vec<Operation>, String>,
    parameters: String,
) -> AuditRecord {
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
    record
}

/// What the session's grants and masks say about a statement on its
/// target, and what its kind implies for its answers and its outcome row.
/// All of it depends only on the statement and the session: a prepared
/// statement is judged once, at its Parse, whatever number of Binds and
/// Executes follow.
#[derive(Debug, Clone)]
pub(super) struct Judged {
    pub(super) decision: Decision,
    /// Its answers may carry masked values (see [`reads_masked`]).
    pub(super) reads_masked: bool,
    /// See [`provably_read_only`].
    pub(super) read_only: bool,
    /// See [`may_change_transaction`].
    pub(super) may_change_transaction: bool,
    /// See [`may_change_settings_unseen`].
    pub(super) may_change_settings_unseen: bool,
    /// It may start a COPY FROM STDIN, a COPY TO STDOUT (see
    /// [`may_copy`]).
    pub(super) may_copy_in: bool,
    pub(super) may_copy_out: bool,
    /// See [`may_reopen_cursors`]: when it runs, for a caller with masks.
    pub(super) may_reopen_cursors: bool,
    /// The same already when the server plans it, at its Bind: it calls a
    /// function of the database's own (the server folds immutable ones of
    /// constants there). A FETCH, SQL EXECUTE or CALL runs nothing then.
    pub(super) may_reopen_cursors_when_planned: bool,
}

pub(super) fn judge(session: &Session, operations: &Result<Vec<Operation>, String>) -> Judged {
    // The text alone does not show every call of a function of the
    // database's own; the session knows their names (see
    // `may_call_user_function`): where one may run, the statement calls a
    // function tollgate cannot look into, for the policy (COPY) and for
    // the masking alike.
    let resolved;
    let operations = match operations {
        Ok(ops)
            if ops
                .iter()
                .any(|op| may_call_user_function(&session.masks, op)) =>
        {
            resolved = Ok(ops
                .iter()
                .map(|op| Operation {
                    calls_unknown_functions: op.calls_unknown_functions
                        || may_call_user_function(&session.masks, op),
                    ..op.clone()
                })
                .collect());
            &resolved
        }
        _ => operations,
    };
    let request = Request {
        target: &session.connection.target.name,
        operations,
    };
    let (may_copy_in, may_copy_out) = may_copy(operations);
    let masked = !session.masks.is_empty();
    // Before the rest: it notes a statement that may change relations,
    // which is never read-only itself.
    let reads_run_no_code = reads_run_no_code(session, operations);
    Judged {
        decision: session.shared.policy.decide(&session.principal, &request),
        reads_masked: reads_masked(&session.masks, operations),
        read_only: provably_read_only(operations) && reads_run_no_code,
        may_change_transaction: may_change_transaction(operations),
        may_change_settings_unseen: may_change_settings_unseen(operations),
        may_copy_in,
        may_copy_out,
        may_reopen_cursors: masked && may_reopen_cursors(operations),
        may_reopen_cursors_when_planned: masked && may_reopen_cursors_when_planned(operations),
    }
}

/// Whether a statement runs code of the database's own (a function
/// tollgate cannot look into, see `judge`; or a FETCH, SQL EXECUTE or CALL,
/// whose query is not in its text), which may close any portal of the
/// session and open a cursor under its name (PL/pgSQL's `CLOSE` and
/// `OPEN` of a refcursor take any name): a portal bound before it may then
/// run another query than the one tollgate saw bound, and its rows leave
/// masked as that one's would. Unparsed text is judged so already (see
/// `InFlight::note_renames`). It matters only where masks apply: without
/// them, the function could return those rows itself.
pub(super) fn may_reopen_cursors(operations: &Result<Vec<Operation>, String>) -> bool {
    may_reopen_cursors_when_planned(operations)
        || operations
            .as_ref()
            .is_ok_and(|ops| ops.iter().any(|op| op.opaque_result))
}

/// [`may_reopen_cursors`] already when the server plans the statement, at
/// its Bind: it calls a function of the database's own, which the server
/// runs there when it is immutable with constant arguments. A FETCH, SQL
/// EXECUTE or CALL runs nothing then.
pub(super) fn may_reopen_cursors_when_planned(operations: &Result<Vec<Operation>, String>) -> bool {
    operations
        .as_ref()
        .is_ok_and(|ops| ops.iter().any(|op| op.calls_unknown_functions))
}

/// Whether the statement may start a COPY FROM STDIN (the server then
/// takes copy data from the client), and a COPY TO STDOUT: only a COPY
/// statement of the session's own text does (a function cannot), and
/// text tollgate could not parse may be either.
fn may_copy(operations: &Result<Vec<Operation>, String>) -> (bool, bool) {
    match operations {
        Ok(operations) => (
            operations.iter().any(|op| op.takes_client_data),
            operations.iter().any(|op| op.streams_raw),
        ),
        Err(_) => (true, true),
    }
}

/// Records the refusal of a statement policy denies (durably, before the
/// agent hears of it) and says what the agent is told.
async fn refuse_denied(
    session: &Session,
    mut record: AuditRecord,
    text: &str,
    operations: &Result<Vec<Operation>, String>,
    rule: &str,
    reason: &str,
) -> Refusal {
    mark_refused(&mut record, rule, reason);
    let message = match session.shared.audit.append(record).await {
        Ok(_) => format!("tollgate: refused by policy rule {rule}: {reason}"),
        Err(AuditError::TooLarge { .. }) => {
            return refuse_oversized(session, text, operations, RECORD_TOO_LARGE).await
        }
        Err(err) => format!("tollgate: refused by policy rule {rule}: {reason} (and the refusal could not be audited: {err})"),
    };
    Refusal {
        code: SQLSTATE_POLICY.into(),
        message,
    }
}

/// The refusal of a statement at its Parse or Bind, when it would be
/// refused at its Execute whatever its parameters: policy denies it, or it
/// is too long to audit. A statement that may not run is not parsed by the
/// server (SQL's `EXECUTE name` would run it), nor planned (PostgreSQL
/// plans at Bind, evaluating immutable functions of its constants).
/// `None`: it is decided at its Execute.
pub(super) async fn refusal_before_execute(
    session: &Session,
    prepared: &Prepared,
    parameters: &str,
) -> Option<Refusal> {
    let (text, operations) = (&prepared.text, &*prepared.operations);
    if text.len() > MAX_AUDITED_STATEMENT {
        return Some(
            refuse_oversized(session, text, operations, &over_the_statement_limit()).await,
        );
    }
    match &prepared.judged.decision {
        Decision::Deny { rule, reason } => {
            let record = request_record(session, text, operations, parameters.to_owned());
            Some(refuse_denied(session, record, text, operations, rule, reason).await)
        }
        _ => None,
    }
}

/// The refusal of a statement the server may read otherwise than tollgate
/// did: it comes, in one pipeline, after a Bind or Execute of a statement
/// that calls a function tollgate cannot look into (planning at the Bind
/// evaluates immutable functions of constants), before that pipeline's
/// Sync. Such a function may change standard_conforming_strings or
/// client_encoding with `set_config`, which the server reports only at the
/// Sync (PostgreSQL 14 and later), after it has read what came between.
/// Only a backslash (in a plain string, with standard_conforming_strings
/// off) or a byte outside ASCII (the start of a character in another
/// encoding) reads differently under those settings; text without either
/// goes on. `None`: it goes on.
pub(super) async fn refusal_while_reading_unsure(session: &Session, text: &str) -> Option<Refusal> {
    if text.bytes().all(|b| b.is_ascii() && b != b'\\') {
        return None;
    }
    let operations = classify_within_limit(session, text).await;
    let record = request_record(session, text, &operations, String::new());
    Some(
        refuse_denied(
            session,
            record,
            text,
            &operations,
            "encoding:unsure",
            "a statement with a backslash or non-ASCII text may not follow, before a Sync, \
             a Bind or Execute of code tollgate cannot look into (a function, FETCH, EXECUTE, \
             CALL: it may change how the server reads text, which the server reports only at \
             the Sync): send a Sync first",
        )
        .await,
    )
}

/// What a statement may run by a name the protocol made.
#[derive(Debug, Clone, Copy)]
pub(super) enum RunOf<'a> {
    Named(&'a RunByName),
    /// Text tollgate cannot parse: it may run one without naming it in a
    /// way tollgate can read.
    Unparsed,
}

/// The refusal of a SQL `FETCH` or `EXECUTE` of a portal or prepared
/// statement the client made through the protocol: its statement was
/// decided at its Parse, but its record is made at a protocol Execute, so
/// run this way (a portal of a `DELETE ... RETURNING` by `FETCH ALL FROM
/// p`) it would run under a record that does not name it.
pub(super) async fn refusal_of_run_by_name(
    session: &Session,
    text: &str,
    operations: &Result<Vec<Operation>, String>,
    run: RunOf<'_>,
) -> Refusal {
    let record = request_record(session, text, operations, String::new());
    let named = match run {
        RunOf::Unparsed => "text tollgate cannot parse".to_owned(),
        RunOf::Named(RunByName::Portal(name)) => format!("portal {name:?}"),
        RunOf::Named(RunByName::Statement(name)) => format!("prepared statement {name:?}"),
    };
    let reason = format!(
        "{named} may run a portal or statement made through the protocol, whose statement is \
         recorded only when a protocol Execute runs it: run it with Bind and Execute, not from SQL"
    );
    refuse_denied(
        session,
        record,
        text,
        operations,
        "protocol:run_by_name",
        &reason,
    )
    .await
}

/// [`classify`], unless the text is over [`MAX_AUDITED_STATEMENT`]: such a
/// statement is refused for its size whatever it says, so it is not
/// parsed (up to 64 MiB of SQL, for nothing).
///
/// Parsing takes memory and time by the token, not by the byte: 8 MiB of
/// `1,1,1,...` took 7.5 GB and 23 s. So a text is first weighed by
/// [`token_bound`]. A light one is classified at once; a heavier one
/// takes its weight from the [`ParsingBudget`] every session shares (the
/// sessions of one identity a quarter of it at most) and is classified
/// off the runtime's threads; one heavier than the whole budget is not
/// classified (not understood, as text the parser refuses).
pub(super) async fn classify_within_limit(
    session: &Session,
    text: &str,
) -> Result<Vec<Operation>, String> {
    if text.len() > MAX_AUDITED_STATEMENT {
        return Err(over_the_statement_limit());
    }
    let weight = token_bound(text);
    if weight <= CLASSIFY_AT_ONCE {
        return classify(text);
    }
    let Some(units) = u32::try_from(weight)
        .ok()
        .filter(|&units| units as usize <= CLASSIFY_BUDGET)
    else {
        return Err(format!(
            "up to {weight} tokens: more than the {CLASSIFY_BUDGET} tollgate parses in one text"
        ));
    };
    let budget = &session.shared.postgres_parsing;
    let share = match tokio::time::timeout(
        CLASSIFY_WAIT,
        budget.take(units, &session.principal.object_id),
    )
    .await
    {
        Ok(Some(share)) => share,
        Ok(None) => return Err("the parsing budget is closed".into()),
        Err(_) => {
            return Err(format!(
                "up to {weight} tokens waited {} s for the parsing budget other statements hold: \
                 not parsed",
                CLASSIFY_WAIT.as_secs()
            ))
        }
    };
    let owned = text.to_owned();
    // The share goes with the parse: if this session ends meanwhile, the
    // parse runs on, and its memory stays counted until it is done.
    tokio::task::spawn_blocking(move || {
        let _share: Share = share;
        classify(&owned)
    })
    .await
    .unwrap_or_else(|err| Err(format!("parsing failed: {err}")))
}

/// Texts of at most this weight (see [`token_bound`]) are classified on
/// the session's own thread: at most about 10 MB and a few tens of
/// milliseconds each.
const CLASSIFY_AT_ONCE: usize = 16 * 1024;

/// The weight all sessions' heavier texts may be parsing at once, and the
/// most one text may weigh. The heaviest texts measured took about 0.6 KB
/// per unit of weight (`1,1,1,...`), so about 1.2 GB at most in all.
pub(super) const CLASSIFY_BUDGET: usize = 2_000_000;

/// How long a heavy text waits for its weight of the budget before it is
/// given up as not understood.
const CLASSIFY_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The parsing work heavy statements may take at once, all sessions
/// together (in [`crate::proxy::Shared`]): [`CLASSIFY_BUDGET`] units of
/// [`token_bound`] weight.
pub struct ParsingBudget(SharedBudget);

impl Default for ParsingBudget {
    fn default() -> Self {
        ParsingBudget(SharedBudget::new(CLASSIFY_BUDGET as u32))
    }
}

impl ParsingBudget {
    /// Waits for `weight` units for a text of a session of `identity`.
    async fn take(&self, weight: u32, identity: &str) -> Option<Share> {
        self.0.take(weight, identity).await
    }

    /// Units no parse holds.
    #[cfg(test)]
    pub(super) fn available(&self) -> usize {
        self.0.available()
    }
}

/// Longest statement text tollgate sends on (a client message may be up to
/// 64 MiB). Escaped (six bytes for a control character) it fits a WAL
/// frame once, not necessarily again in the tables it names: a record the
/// store still refuses as too large refuses the statement too (see
/// `admit`).
pub const MAX_AUDITED_STATEMENT: usize = 8 << 20;

/// How much of an oversized statement its refusal record keeps.
pub(super) const OVERSIZED_PREFIX: usize = 4096;

/// Refuses a statement too long to audit (SQLSTATE 54000). Its refusal
/// record keeps the statement's start, its length and its SHA-256, so an
/// investigator can match it against a copy.
pub(super) async fn refuse_oversized(
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
pub(super) fn over_the_statement_limit() -> String {
    format!("more than the {MAX_AUDITED_STATEMENT} bytes an audited statement may have")
}

/// Why a statement whose record the store refused as too large is
/// refused: text that must be escaped (control characters) can make a
/// record several times the statement's size.
pub(super) const RECORD_TOO_LARGE: &str =
    "its audit record would be larger than the audit log can hold (64 MiB)";

/// The longest start of `text` of at most `max` bytes that ends on a
/// character boundary.
pub(super) fn prefix_at_char_boundary(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `program_limit_exceeded`: what PostgreSQL answers when a statement
/// exceeds one of its own limits.
pub(super) const SQLSTATE_TOO_LARGE: &str = "54000";

/// The `policy_uid` of a refusal for length: a built-in limit, not a rule
/// of the config.
pub(super) const RULE_STATEMENT_TOO_LARGE: &str = "tollgate:statement_too_large";

/// Whether a statement may change the client encoding or
/// standard_conforming_strings out of tollgate's sight: it runs code
/// tollgate cannot look into (a function call; a FETCH, EXECUTE or CALL;
/// a name `judge` knows as a function of the database's own, which it
/// marks as such a call), or its text could not be parsed. The visible
/// ways are refused by policy (`encoding:client_encoding`,
/// `encoding:standard_conforming_strings`).
pub(super) fn may_change_settings_unseen(operations: &Result<Vec<Operation>, String>) -> bool {
    match operations {
        Ok(operations) => operations
            .iter()
            .any(|op| op.calls_functions || op.opaque_result || op.calls_unknown_functions),
        Err(_) => true,
    }
}

/// Whether `op` names a function of the database's own in a way its text
/// does not show as a call of one (see `Operation::may_call_by_name`).
fn may_call_user_function(masks: &MaskSet, op: &Operation) -> bool {
    masks.has_own_operators_or_casts()
        || op
            .may_call_by_name
            .iter()
            .any(|name| masks.is_user_function(name))
}

pub(super) fn reads_masked(masks: &MaskSet, operations: &Result<Vec<Operation>, String>) -> bool {
    if masks.is_empty() {
        return false;
    }
    match operations {
        // A FETCH's rows come from a cursor declared earlier: assume they
        // may carry masked columns, computed ones included.
        // A written table counts too: RETURNING hands back its rows,
        // computed columns included. So does a call of a function tollgate
        // cannot look into: `customer_by_id(1)` may return a masked
        // table's rows as columns of no table.
        // (`judge` counts a name under which a function of the database's
        // own may run unseen as such a call.)
        Ok(ops) => {
            ops.iter()
                .any(|op| op.opaque_result || op.calls_unknown_functions)
                || ops
                    .iter()
                    .flat_map(|op| {
                        let returned = op.writes.difference(&op.written_by_calls);
                        op.reads.iter().chain(returned)
                    })
                    .any(|t| masks.covers_table(t))
        }
        // Not understood: assume the worst.
        Err(_) => true,
    }
}

/// The OCSF Datastore activity of a request: Read when every statement
/// only reads, Query otherwise (or when it was not understood).
pub(super) fn activity_of(operations: &Result<Vec<Operation>, String>) -> i32 {
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
pub(super) const MAX_INTENT: usize = 4096;

/// `/* intent: ... */` leading a statement: why the agent says it acts,
/// its first [`MAX_INTENT`] bytes.
pub fn intent_of(text: &str) -> Option<String> {
    let rest = text.trim_start().strip_prefix("/*")?;
    let (comment, _) = rest.split_once("*/")?;
    let intent = comment.trim().strip_prefix("intent:")?.trim();
    (!intent.is_empty()).then(|| prefix_at_char_boundary(intent, MAX_INTENT).to_owned())
}
