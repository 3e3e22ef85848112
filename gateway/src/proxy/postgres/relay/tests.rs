use super::*;
use crate::proxy::postgres::send_counted;

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

/// Queues a request the way the reader does, where the server is not
/// skipping to Sync: it must be queued.
trait Queued {
    fn queued(&mut self, pending: Pending);
}

impl Queued for InFlight {
    fn queued(&mut self, pending: Pending) {
        assert!(self.push(pending).is_none(), "the request was queued");
    }
}

fn queue_of(kinds: &[Kind]) -> Mutex<InFlight> {
    let mut in_flight = InFlight::default();
    for kind in kinds {
        let mut pending = Pending::new(*kind, None);
        if matches!(kind, Kind::RefusedExecute | Kind::RefusedQuery) {
            pending.refusal = Some(InPlaceRefusal {
                code: SQLSTATE_POLICY.into(),
                message: "tollgate: refused".into(),
                marker: "tollgate_refused_test".into(),
            });
        }
        in_flight.queued(pending);
    }
    Mutex::new(in_flight)
}

/// Every answer is judged against the request it answers: one that cannot
/// answer the oldest request in flight means a request the server never
/// saw or ignored is queued, and every later answer would be masked,
/// counted and recorded against the wrong request. The session ends.
#[test]
fn an_answer_that_cannot_answer_the_oldest_request_is_out_of_step() {
    let out_of_step = [
        (Kind::Sync, b'T', frame(b'T', &0i16.to_be_bytes())),
        (Kind::Sync, b'D', frame(b'D', &0i16.to_be_bytes())),
        (Kind::Sync, b'C', frame(b'C', b"SELECT 1\0")),
        (Kind::Sync, b'1', frame(b'1', b"")),
        (Kind::Query, b'1', frame(b'1', b"")),
        (Kind::Parse, b'2', frame(b'2', b"")),
        (Kind::Bind, b'1', frame(b'1', b"")),
        (Kind::Execute, b'T', frame(b'T', &0i16.to_be_bytes())),
        (Kind::Describe, b'D', frame(b'D', &0i16.to_be_bytes())),
        (Kind::Close, b'n', frame(b'n', b"")),
        (Kind::Query, b's', frame(b's', b"")),
    ];
    for (kind, tag, message) in out_of_step {
        let in_flight = queue_of(&[kind]);
        assert!(
            matches!(answer(&in_flight, &message), Err(WireError::Malformed(_))),
            "{:?} answering a {kind:?}",
            tag as char
        );
    }
    // A Query's ReadyForQuery with no completion before it: the server
    // never ran that Query.
    let in_flight = queue_of(&[Kind::Query]);
    assert!(matches!(
        answer(&in_flight, &frame(b'Z', b"I")),
        Err(WireError::Malformed(_))
    ));
    // Nothing in flight: only what may come at any time passes.
    let in_flight = queue_of(&[]);
    assert!(matches!(
        answer(&in_flight, &frame(b'D', &0i16.to_be_bytes())),
        Err(WireError::Malformed(_))
    ));
    for tag in [b'E', b'N', b'S'] {
        assert!(
            answer(&in_flight, &frame(tag, b"")).is_ok(),
            "{}",
            tag as char
        );
    }
    // And what fits passes: a Query answered in full.
    let in_flight = queue_of(&[Kind::Query]);
    for message in [
        frame(b'T', &0i16.to_be_bytes()),
        frame(b'D', &0i16.to_be_bytes()),
        frame(b'C', b"SELECT 1\0"),
        frame(b'Z', b"I"),
    ] {
        answer(&in_flight, &message).expect("in step");
    }
    assert!(lock(&in_flight).queue.is_empty());
}

/// Once the server skips to Sync after an error, a request the reader
/// queues (it looked before the error came, then waited for a record or
/// a name) is given back: the server ignores it, and queued it would be
/// taken for the request the next answer belongs to.
#[test]
fn a_request_after_the_server_began_skipping_is_given_back_but_a_sync_is_queued() {
    let in_flight = queue_of(&[]);
    let mut f = lock(&in_flight);
    f.server_skipping = true;
    for kind in [
        Kind::Query,
        Kind::Execute,
        Kind::Parse,
        Kind::Bind,
        Kind::Describe,
        Kind::Close,
        Kind::RefusedQuery,
        Kind::RefusedExecute,
    ] {
        let given_back = f.push(Pending::new(kind, None));
        assert!(
            given_back.is_some_and(|p| p.kind == kind),
            "{kind:?} was queued"
        );
    }
    assert!(f.queue.is_empty());
    assert!(f.push(Pending::new(Kind::Sync, None)).is_none());
    assert_eq!(f.queue.len(), 1);
}

/// A Query of COPY FROM STDIN: one the server's CopyInResponse may answer.
fn copy_in_query() -> Pending {
    let mut query = Pending::new(Kind::Query, None);
    query.may_copy_in = true;
    query
}

/// A queue of a Query of COPY FROM STDIN, then `after`.
fn copy_in_then(after: &[Kind]) -> Mutex<InFlight> {
    let in_flight = queue_of(&[]);
    lock(&in_flight).queued(copy_in_query());
    for kind in after {
        lock(&in_flight).queued(Pending::new(*kind, None));
    }
    in_flight
}

/// A Sync sent behind a COPY FROM STDIN before the client ended the copy
/// goes into the copy, where the server ignores it; copy data does not end
/// it. Every such Sync is dropped when the copy starts; one sent after the
/// client's CopyDone is answered.
#[test]
fn syncs_sent_into_a_copy_are_dropped_when_it_starts() {
    let in_flight = copy_in_then(&[Kind::Sync, Kind::Sync, Kind::Sync]);
    {
        let mut f = lock(&in_flight);
        if let Some(last) = f.queue.iter_mut().last() {
            last.copies_ended_before = 1;
        }
    }
    answer(&in_flight, &frame(b'G', &[0, 0, 0])).expect("in step");
    let kinds = |in_flight: &Mutex<InFlight>| -> Vec<(Kind, u32)> {
        lock(in_flight)
            .queue
            .iter()
            .map(|p| (p.kind, p.copies_ended_before))
            .collect()
    };
    assert_eq!(kinds(&in_flight), [(Kind::Query, 0), (Kind::Sync, 1)]);

    // A Query running two copies: a Sync sent after the first copy's end
    // but inside the second goes into the second, and is dropped when it
    // starts; one sent after the second's end is answered.
    let sync_after = |ended: u32| {
        let mut sync = Pending::new(Kind::Sync, None);
        sync.copies_ended_before = ended;
        sync
    };
    let in_flight = pipeline([copy_in_query(), sync_after(1), sync_after(2)]);
    answer(&in_flight, &frame(b'G', &[0, 0, 0])).expect("first copy");
    assert_eq!(
        kinds(&in_flight),
        [(Kind::Query, 0), (Kind::Sync, 1), (Kind::Sync, 2)]
    );
    answer(&in_flight, &frame(b'C', b"COPY 1\0")).expect("first copy done");
    answer(&in_flight, &frame(b'G', &[0, 0, 0])).expect("second copy");
    assert_eq!(kinds(&in_flight), [(Kind::Query, 0), (Kind::Sync, 2)]);
}

/// A COPY starts only for a statement tollgate saw to be a COPY of that
/// direction (or could not parse): a CopyOutResponse to anything else
/// would stream rows past masking, a CopyInResponse would take client
/// messages as copy data that tollgate takes for requests. Either means
/// tollgate misread the statement: the session ends.
#[test]
fn a_copy_the_statement_does_not_start_is_out_of_step() {
    for (tag, direction) in [(b'G', "in"), (b'H', "out")] {
        let in_flight = queue_of(&[Kind::Query]);
        let result = answer(&in_flight, &frame(tag, &[0, 0, 0]));
        assert!(
            matches!(result, Err(WireError::Malformed(_))),
            "copy {direction} to a plain Query"
        );
        let in_flight = queue_of(&[]);
        let mut copy = Pending::new(Kind::Execute, None);
        (copy.may_copy_in, copy.may_copy_out) = (direction == "in", direction == "out");
        lock(&in_flight).queued(copy);
        answer(&in_flight, &frame(tag, &[0, 0, 0])).expect("in step");
    }
}

/// The server's report of a setting under which it reads statements
/// otherwise ends the session, naming the rule: the encoding settings,
/// and search_path (reported from PostgreSQL 18), under which an
/// unqualified name is another table than tollgate decided on. The values
/// tollgate asked for at login end nothing.
#[test]
fn a_reported_change_of_how_the_server_reads_statements_ends_the_session() {
    let status = |name: &str, value: &str| frame(b'S', format!("{name}\0{value}\0").as_bytes());
    for (name, value, rule) in [
        ("search_path", "hr, public", "names:search_path"),
        (
            "standard_conforming_strings",
            "off",
            "encoding:standard_conforming_strings",
        ),
        ("client_encoding", "SJIS", "encoding:client_encoding"),
    ] {
        let why = reads_text_otherwise(&status(name, value)).expect("the session ends");
        assert!(why.contains(&format!("(rule {rule})")), "{why}");
    }
    for (name, value) in [
        ("search_path", "public"),
        ("standard_conforming_strings", "on"),
        ("client_encoding", "UTF8"),
        ("application_name", "anything"),
    ] {
        assert_eq!(reads_text_otherwise(&status(name, value)), None, "{name}");
    }
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
        let in_flight = copy_in_then(&[]);
        if ended_early {
            lock(&in_flight).copy_ended_early();
        }
        assert_eq!(copy_starts(&in_flight), !ended_early);
    }

    // Two copies in one Query, the client ending only the first early:
    // the second is copy mode.
    let in_flight = copy_in_then(&[]);
    lock(&in_flight).copy_ended_early();
    assert!(!copy_starts(&in_flight));
    assert!(copy_starts(&in_flight));
}

/// A refused Query is answered by its stand-in's error, then
/// ReadyForQuery: a ReadyForQuery before that error is another request's,
/// and the session is out of step.
#[test]
fn ready_for_query_before_a_refused_querys_error_is_out_of_step() {
    let in_flight = queue_of(&[Kind::RefusedQuery]);
    let err = answer(&in_flight, &frame(b'Z', b"I")).expect_err("out of step");
    assert!(
        err.to_string().contains("before the error of its stand-in"),
        "{err}"
    );
    // In step: the marker's error, then ReadyForQuery.
    let in_flight = queue_of(&[Kind::RefusedQuery]);
    let mut error = BytesMut::new();
    wire::error_response(
        &mut error,
        "ERROR",
        "42601",
        "syntax error at tollgate_refused_test",
    );
    let error = Frame {
        tag: b'E',
        bytes: error,
    };
    answer(&in_flight, &error).expect("the stand-in's error");
    answer(&in_flight, &frame(b'Z', b"I")).expect("then ReadyForQuery");
    assert!(lock(&in_flight).queue.is_empty());
}

/// A copy the client ends early belongs to the latest Query or Execute,
/// however many Syncs are queued behind it, and to none once that one is
/// answered and gone.
#[test]
fn a_copy_ended_early_belongs_to_the_latest_statement_behind_any_number_of_syncs() {
    let mut kinds = vec![Kind::Query, Kind::Execute];
    kinds.extend(std::iter::repeat_n(Kind::Sync, 10_000));
    let in_flight = queue_of(&kinds);
    let mut guard = lock(&in_flight);
    guard.copy_ended_early();
    let counts: Vec<u32> = guard.queue.iter().map(|p| p.copies_ended_early).collect();
    assert_eq!(counts[..2], [0, 1]);
    assert!(counts[2..].iter().all(|&n| n == 0));
    guard.queue.pop_front();
    guard.queue.pop_front();
    guard.copy_ended_early();
    assert!(guard.queue.iter().all(|p| p.copies_ended_early == 0));
}

fn prepared(text: &str) -> Arc<Prepared> {
    Arc::new(Prepared {
        text: text.into(),
        operations: Arc::new(Err("test".into())),
        parameter_types: Vec::new(),
        judged: Judged {
            decision: crate::policy::Decision::Deny {
                rule: "test".into(),
                reason: "test".into(),
            },
            reads_masked: false,
            read_only: false,
            may_change_transaction: false,
            may_change_settings_unseen: true,
            may_copy_in: true,
            may_copy_out: true,
            may_reopen_cursors: true,
            may_reopen_cursors_when_planned: true,
        },
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
    answer(&in_flight, &frame(b'C', b"SELECT 1\0")).expect("in step");
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
        f.queued(parse);
        f.queued(Pending::new(Kind::Sync, None));
        f.queued(Pending::new(Kind::Query, None));
        assert!(matches!(f.statement(""), Resolved::Known(None)));
    }

    // A failed Parse of "" leaves no unnamed statement behind.
    let in_flight = queue_of(&[]);
    {
        let mut f = lock(&in_flight);
        f.statements.insert("".into(), (0, prepared("SELECT 1")));
        let mut parse = Pending::new(Kind::Parse, None);
        parse.parse = Some(("".into(), prepared("SELEC oops")));
        f.queued(parse);
        f.queued(Pending::new(Kind::Sync, None));
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

/// Each refusal has a marker of its own: one that was seen (a stand-in
/// Query's text shows in `pg_stat_activity`, where another session can
/// read it) cannot stand in for a later refusal, so a portal the agent
/// binds under a spent marker's name is never what a refusal's stand-in
/// Execute runs.
#[test]
fn a_spent_marker_cannot_stand_in_for_a_later_refusal() {
    assert_ne!(refusal_marker(), refusal_marker());
    let error = |message: String| {
        let mut out = BytesMut::new();
        wire::error_response(&mut out, "ERROR", "34000", &message);
        wire::split_frame(&mut out)
            .expect("well formed")
            .expect("whole")
    };
    let in_flight = Mutex::new(InFlight::default());
    let (first, second) = (refusal_marker(), refusal_marker());
    for marker in [&first, &second] {
        let mut refused = Pending::new(Kind::RefusedExecute, None);
        refused.refusal = Some(InPlaceRefusal {
            code: SQLSTATE_POLICY.into(),
            message: "tollgate: refused".into(),
            marker: marker.clone(),
        });
        lock(&in_flight).queued(refused);
        lock(&in_flight).queued(Pending::new(Kind::Sync, None));
    }
    let named = |marker: &str| error(format!("portal \"{marker}\" does not exist"));
    answer(&in_flight, &named(&first))
        .expect("in step")
        .expect("the first refusal in its place");
    answer(&in_flight, &frame(b'Z', b"I")).expect("in step");
    let result = answer(&in_flight, &named(&first));
    assert!(
        matches!(result, Err(WireError::Malformed(_))),
        "a spent marker stood in for a later refusal"
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
    outcomes
        .answered
        .push((query("select 1"), Outcome::Succeeded));
    outcomes.sent();
    // Answered by the server, not yet sent on when the session ends.
    outcomes
        .answered
        .push((query("update t set a = 1"), Outcome::Succeeded));
    outcomes.answered.push((
        query("select nope"),
        Outcome::failed(("42703".into(), "column \"nope\" does not exist".into())),
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
            outcomes.answered.push((query(text), Outcome::Succeeded));
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
    let verifier = crate::identity::Verifier::from_config(&crate::identity::tests::file_config(
        keys.path(),
        "",
    ))
    .await
    .expect("verifier");
    let audit = crate::audit::AuditLog::open(&crate::audit::tests::config(audit_dir))
        .await
        .expect("audit");
    let target = crate::proxy::Target::new(super::super::refusal_tests::target_config(
        "127.0.0.1:0".parse().expect("addr"),
    ))
    .expect("target");
    let connection = crate::proxy::Connection {
        session_uid: "session-1".into(),
        target: Arc::new(target),
        peer: "127.0.0.1:40000".parse().expect("addr"),
        origin: None,
        login: None,
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
        relations_may_have_changed: Default::default(),
        shared: Arc::new(crate::proxy::Shared {
            verifier,
            policy: Default::default(),
            audit,
            pinning: None,
            postgres_cancel_keys: Default::default(),
            postgres_held_whole: Default::default(),
            postgres_parsing: Default::default(),
            postgres_named: Default::default(),
            postgres_catalogs: Default::default(),
            refusals: Default::default(),
            sessions: Default::default(),
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
        AgentWriter::shared(client_wr),
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
    let (ended, got) = relay_to_agent_while(session, in_flight, answers, |side| async move {
        drop(side);
    })
    .await;
    (ended, String::from_utf8_lossy(&got).into_owned())
}

/// [`relay_to_agent`] with `server` sending what else the server sends
/// (on its end of the upstream connection) while the relay runs; the
/// agent reads as it goes.
async fn relay_to_agent_while<F, Served>(
    session: &Arc<Session>,
    in_flight: &Arc<Mutex<InFlight>>,
    answers: BytesMut,
    server: F,
) -> (Result<(), WireError>, Vec<u8>)
where
    F: FnOnce(tokio::io::DuplexStream) -> Served,
    Served: std::future::Future<Output = ()> + Send + 'static,
{
    let (upstream, server_side) = tokio::io::duplex(64 * 1024);
    let serving = tokio::spawn(server(server_side));
    let (upstream_rd, _) = tokio::io::split(Box::new(upstream) as BoxedIo);
    let (agent, mut agent_side) = tokio::io::duplex(64 * 1024);
    let (_, client_wr) = tokio::io::split(Box::new(agent) as BoxedIo);
    let reading = tokio::spawn(async move {
        let mut got = Vec::new();
        // Until the relay drops its end.
        tokio::io::AsyncReadExt::read_to_end(&mut agent_side, &mut got)
            .await
            .expect("read what the agent got");
        got
    });
    let ended = server_to_client(
        session.clone(),
        upstream_rd,
        answers,
        AgentWriter::shared(client_wr),
        in_flight.clone(),
        Arc::new(Notify::new()),
    )
    .await;
    serving.await.expect("the server's side");
    (ended, reading.await.expect("the agent's side"))
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
        Outcome::Succeeded,
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
/// held for a record still syncing, begun but not ended, or not answered.
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
        (6, "the session ended while the server's answer was coming: it was not relayed in full"),
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
        let left: Vec<Pending> = lock(&in_flight).queue.drain().collect();
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
        Outcome::Failed {
            code: "22P02".into(),
            message: echoed,
        },
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
    let outcome =
        outcome_record(query("select 1"), Outcome::Succeeded, Delivery::Sent).expect("outcome");
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

/// A DataRow of text values (NULL for `None`).
fn data_row(values: &[Option<&str>]) -> Frame {
    let mut body = (values.len() as i16).to_be_bytes().to_vec();
    for value in values {
        match value {
            Some(v) => {
                body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                body.extend_from_slice(v.as_bytes());
            }
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    frame(b'D', &body)
}

/// `record_results = "full"` keeps rows up to its cap, then counts the
/// rest, small ones after the cap included, in a last element.
#[test]
fn recorded_results_stop_at_the_cap_and_count_the_rows_left_out() {
    let mut recording = ResultRecording::default();
    let big = "x".repeat(MAX_RECORDED_RESULT_BYTES / 2);
    recording.add(&data_row(&[Some("1"), None]));
    recording.add(&data_row(&[Some(&big)]));
    // Its values alone are past what is left.
    recording.add(&data_row(&[Some(&big)]));
    recording.add(&data_row(&[Some("2"), None]));
    let kept: serde_json::Value = serde_json::from_str(&recording.into_json()).expect("JSON array");
    assert_eq!(
        kept,
        serde_json::json!([["1", null], [big], { "truncated_rows": 2 }])
    );
}

/// Portals the protocol bound live until the transaction ends: at a
/// ReadyForQuery that says idle every one is forgotten (a later portal of
/// the same name, say a function's `OPEN` of a cursor so named, is
/// another statement); inside a block ('T') or a failed one ('E', where
/// ROLLBACK TO SAVEPOINT brings back those bound before the savepoint)
/// they are kept. Prepared statements outlive transactions either way.
#[test]
fn portals_are_forgotten_when_the_session_is_idle_and_kept_inside_a_block() {
    for (status, kept) in [(b"T", true), (b"E", true), (b"I", false)] {
        let in_flight = queue_of(&[Kind::Sync]);
        {
            let mut f = lock(&in_flight);
            f.portals
                .insert("cursor".into(), (0, (prepared("SELECT 1"), String::new())));
            f.statements
                .insert("named".into(), (0, prepared("SELECT 2")));
        }
        answer(&in_flight, &frame(b'Z', status)).expect("in step");
        let f = lock(&in_flight);
        let status = status[0] as char;
        assert_eq!(
            matches!(f.portal("cursor"), Resolved::Known(Some(_))),
            kept,
            "portal after ReadyForQuery {status}"
        );
        assert!(
            matches!(f.statement("named"), Resolved::Known(Some(_))),
            "statement after ReadyForQuery {status}"
        );
    }
}

/// A notification can come with no request in flight (LISTEN, then idle):
/// it is no answer, leaves the queue as it is, and reaches an unmasked
/// caller whole; a caller with masks gets the channel without the payload
/// (a trigger's `pg_notify('c', email)` would carry a masked value).
#[test]
fn a_notification_is_no_answer_and_a_masked_caller_gets_no_payload() {
    let note = frame(b'A', b"\0\0\x30\x39orders\0alice@example.com\0");
    let idle = queue_of(&[]);
    assert!(answer(&idle, &note).expect("in step").is_none());
    assert!(lock(&idle).queue.is_empty());

    let masks = MaskSet::masking(16384, 3, "public.customers.email");
    let busy = queue_of(&[Kind::Query]);
    for in_flight in [&idle, &busy] {
        let replaced = track_answer(&masks, in_flight, &note, &mut Finished::new())
            .expect("in step")
            .expect("the payload is withheld");
        assert_eq!(
            &replaced[..],
            &frame(b'A', b"\0\0\x30\x39orders\0\0").bytes[..]
        );
    }
    assert_eq!(lock(&busy).queue.len(), 1, "a notification answers nothing");
}

/// A statement that names no masked column may still touch masked rows
/// through what it sets off (a cascade, a trigger, a deferred constraint):
/// in a session with masks, the server's error and notice fields that
/// quote row values never reach the agent, whatever the statement; the
/// message and SQLSTATE do.
#[test]
fn a_masked_caller_gets_no_row_values_in_errors_of_statements_that_name_no_masked_column() {
    let masks = MaskSet::masking(16384, 3, "public.customers.email");
    let error = frame(
        b'E',
        b"SERROR\0C23502\0Mnull value in column \"x\" violates not-null constraint\0\
          DFailing row contains (1, null, ada@example.com).\0\
          WSQL statement \"UPDATE customers SET x = NULL\"\0\0",
    );
    for tag in [b'E', b'N'] {
        let mut message = error.bytes.to_vec();
        message[0] = tag;
        let message = wire::split_frame(&mut BytesMut::from(&message[..]))
            .expect("well formed")
            .expect("whole");
        let in_flight = queue_of(&[Kind::Query]);
        let replaced = track_answer(&masks, &in_flight, &message, &mut Finished::new())
            .expect("in step")
            .expect("the values are withheld");
        let text = String::from_utf8_lossy(&replaced);
        assert!(!text.contains("ada@example.com"), "{text}");
        assert!(!text.contains("UPDATE customers"), "{text}");
        assert!(
            text.contains("C23502") && text.contains("violates not-null"),
            "{text}"
        );
        assert_eq!(replaced[0], tag);
        // Without masks, the server's message goes on as it is.
        let in_flight = queue_of(&[Kind::Query]);
        assert!(answer(&in_flight, &message).expect("in step").is_none());
    }
}

/// The bytes a session's requests hold are counted as they are queued and
/// given back exactly as they leave, whatever was changed in them
/// meanwhile (a request record taken for its outcome).
#[test]
fn text_held_in_flight_is_counted_in_and_out() {
    let query = |text: &str| {
        let record = AuditRecord {
            query_info_query_string: text.into(),
            query_info_parameters: "[1]".into(),
            ..AuditRecord::default()
        };
        Pending::new(Kind::Query, Some(record))
    };
    let mut parse = Pending::new(Kind::Parse, None);
    parse.parse = Some(("s".into(), prepared("SELECT 12345")));
    let mut queue = Queue::default();
    queue.push_back(query("select 1"));
    queue.push_back(parse);
    queue.push_back(Pending::new(Kind::Sync, None));
    queue.push_back(query("select 22"));
    assert_eq!(queue.held_bytes, (8 + 3) + 12 + (9 + 3));
    // Changed in place: what leaves is what came in.
    queue.front_mut().and_then(|p| p.request.take());
    assert!(queue.pop_front().is_some());
    assert_eq!(queue.held_bytes, 12 + 12);
    assert!(queue.remove(2).is_some());
    assert_eq!(queue.held_bytes, 12);
    assert_eq!(queue.drain().count(), 2);
    assert_eq!(queue.held_bytes, 0);
}

/// A portal lives as long as its transaction does on the server: one
/// confirmed before an unanswered Sync or simple Query is looked up once
/// that is answered (a ReadyForQuery outside a block drops it); a
/// statement that may end the transaction (COMMIT, ROLLBACK TO SAVEPOINT)
/// makes it unknown at once; BEGIN, SAVEPOINT and RELEASE keep it, as
/// drivers' cursors inside a transaction rely on (a fetch after a
/// savepoint).
#[test]
fn portals_end_with_their_transaction_and_not_before() {
    let confirmed = |in_flight: &Mutex<InFlight>| {
        let mut f = lock(in_flight);
        f.portals.clear();
        let generation = f.portal_generation;
        let bound = (prepared("SELECT 1"), String::new());
        assert!(f.portals.insert("p".into(), (generation, bound)));
    };
    let query = |in_flight: &Mutex<InFlight>, sql: &str| {
        let mut f = lock(in_flight);
        f.queued(Pending::new(Kind::Query, None));
        f.note_renames(&classify(sql), false, None);
    };
    let known = |in_flight: &Mutex<InFlight>| match lock(in_flight).portal("p") {
        Resolved::Known(found) => Some(found.is_some()),
        Resolved::WaitFor(_) => None,
    };
    let answered = |in_flight: &Mutex<InFlight>, status: &[u8]| {
        finish(
            in_flight,
            &[frame(b'C', b"SAVEPOINT\0"), frame(b'Z', status)],
        );
    };

    // Inside a block: a SAVEPOINT or RELEASE in a Query waits for its
    // answer, then the portal is still there.
    for sql in ["SAVEPOINT s", "RELEASE SAVEPOINT s", "BEGIN"] {
        let in_flight = queue_of(&[]);
        confirmed(&in_flight);
        query(&in_flight, sql);
        assert_eq!(known(&in_flight), None, "{sql}: waits for the Query");
        answered(&in_flight, b"T");
        assert_eq!(known(&in_flight), Some(true), "{sql}");
    }
    // Outside a block a Query ends the implicit transaction: gone.
    let in_flight = queue_of(&[]);
    confirmed(&in_flight);
    query(&in_flight, "SELECT 1");
    assert_eq!(known(&in_flight), None);
    answered(&in_flight, b"I");
    assert_eq!(known(&in_flight), Some(false));
    // So does a Sync, once answered outside a block.
    let in_flight = queue_of(&[]);
    confirmed(&in_flight);
    lock(&in_flight).queued(Pending::new(Kind::Sync, None));
    assert_eq!(known(&in_flight), None, "waits for the Sync");
    finish(&in_flight, &[frame(b'Z', b"T")]);
    assert_eq!(known(&in_flight), Some(true), "inside a block it stays");
    // A statement that may end the transaction, sent in the pipeline:
    // unknown at once, whatever the server later says.
    for sql in [
        "COMMIT",
        "ROLLBACK TO SAVEPOINT s",
        "CALL archive()",
        "not sql",
    ] {
        let in_flight = queue_of(&[]);
        confirmed(&in_flight);
        let mut f = lock(&in_flight);
        f.queued(Pending::new(Kind::Execute, None));
        f.note_renames(&classify(sql), false, None);
        drop(f);
        assert_eq!(known(&in_flight), Some(false), "{sql}");
    }
    // A call of the database's own code may close the portal and open a
    // cursor under its name, inside the transaction: unknown at once.
    let in_flight = queue_of(&[]);
    confirmed(&in_flight);
    let mut f = lock(&in_flight);
    f.queued(Pending::new(Kind::Execute, None));
    let sql = "SELECT reopen_cursor('p')";
    f.note_renames(&classify(sql), may_reopen_cursors(&classify(sql)), None);
    drop(f);
    assert_eq!(known(&in_flight), Some(false), "{sql}");
    // A Bind of portal `name` to `sql`, in flight.
    let bind_of = |name: &str, sql: &str| {
        let mut bind = Pending::new(Kind::Bind, None);
        bind.bind = Some((name.into(), (prepared(sql), String::new())));
        bind
    };
    // But not the portal it runs in, which the server keeps: a client
    // reading it in steps goes on, confirmed or still being bound.
    let in_flight = queue_of(&[]);
    confirmed(&in_flight);
    let mut f = lock(&in_flight);
    f.queued(Pending::new(Kind::Execute, None));
    f.note_renames(&classify(sql), true, Some("p"));
    drop(f);
    assert_eq!(known(&in_flight), Some(true), "the executing portal stays");
    let in_flight = queue_of(&[]);
    let mut f = lock(&in_flight);
    f.queued(bind_of("q", "SELECT 1"));
    f.queued(bind_of("r", "SELECT 2"));
    f.queued(Pending::new(Kind::Execute, None));
    f.note_renames(&classify(sql), true, Some("q"));
    // q is behind r's Bind, which is no longer trusted: unknown, as is r.
    assert!(matches!(f.portal("r"), Resolved::Known(None)));
    assert!(matches!(f.portal("q"), Resolved::Known(None)));
    drop(f);
    // Bound after r, q is carried and found.
    let in_flight = queue_of(&[]);
    let mut f = lock(&in_flight);
    f.queued(bind_of("r", "SELECT 2"));
    f.queued(bind_of("q", "SELECT 1"));
    f.queued(Pending::new(Kind::Execute, None));
    f.note_renames(&classify(sql), true, Some("q"));
    assert!(matches!(f.portal("q"), Resolved::Known(Some(_))));
    assert!(matches!(f.portal("r"), Resolved::Known(None)));
    drop(f);
    // A confirmed portal bound again in flight is not what runs: it is not
    // carried, even when the Bind of the new one is not found (here behind
    // another portal's Bind).
    let in_flight = queue_of(&[]);
    confirmed(&in_flight);
    let mut f = lock(&in_flight);
    f.queued(bind_of("p", "SELECT 3"));
    f.queued(bind_of("r", "SELECT 2"));
    f.queued(Pending::new(Kind::Execute, None));
    f.note_renames(&classify(sql), true, Some("p"));
    assert!(matches!(f.portal("p"), Resolved::Known(None)));
    drop(f);
    // A built-in function does not reopen cursors; a FETCH, a SQL EXECUTE
    // or a CALL may (what they run is not in their text).
    for sql in ["SELECT now()", "SELECT upper('x')"] {
        assert!(!may_reopen_cursors(&classify(sql)), "{sql}");
    }
    for sql in ["FETCH 1 FROM x", "EXECUTE s", "CALL p()"] {
        assert!(may_reopen_cursors(&classify(sql)), "{sql}");
        // ... when they run, not at their Bind.
        assert!(!may_reopen_cursors_when_planned(&classify(sql)), "{sql}");
    }
    let sql = "SELECT reopen_cursor('p')";
    assert!(may_reopen_cursors_when_planned(&classify(sql)), "{sql}");
}

/// A session's named statements are kept up to a count and a size: past
/// them a new name is not kept, so it resolves as unknown (decided as not
/// understood at Execute), while the unnamed statement is always kept and
/// closing one makes room again.
#[test]
fn named_statements_are_kept_up_to_the_sessions_bounds() {
    let in_flight = queue_of(&[]);
    let mut f = lock(&in_flight);
    for i in 0..MAX_NAMED {
        assert!(f
            .statements
            .insert(format!("s{i}"), (0, prepared("SELECT 1"))));
    }
    assert!(!f
        .statements
        .insert("one_more".into(), (0, prepared("SELECT 2"))));
    assert!(matches!(f.statement("one_more"), Resolved::Known(None)));
    assert!(f.statements.insert("".into(), (0, prepared("SELECT 3"))));
    assert!(f.statements.remove("s0").is_some());
    assert!(f
        .statements
        .insert("one_more".into(), (0, prepared("SELECT 2"))));
    assert!(matches!(f.statement("one_more"), Resolved::Known(Some(_))));

    // The size bound: a statement whose text would pass it is not kept,
    // nor is an older one of its name.
    f.statements.clear();
    let big = "x".repeat(MAX_NAMED_BYTES / 2);
    assert!(f.statements.insert("a".into(), (0, prepared(&big))));
    assert!(f.statements.insert("b".into(), (0, prepared("SELECT 1"))));
    assert!(!f.statements.insert("b".into(), (0, prepared(&big))));
    assert!(matches!(f.statement("b"), Resolved::Known(None)));
    assert_eq!(f.statements.bytes, 1 + big.len());
}

/// A portal keeps its statement's text alive after the statement is
/// closed: it counts that text, so Parse, Bind, Close cycles cannot keep
/// statements past the session's bounds.
#[test]
fn a_portal_counts_the_text_it_keeps_alive() {
    let in_flight = queue_of(&[]);
    let mut f = lock(&in_flight);
    let big = prepared(&"x".repeat(MAX_NAMED_BYTES / 4));
    let mut kept = 0;
    for i in 0..8 {
        if f.portals
            .insert(format!("p{i}"), (0, (big.clone(), String::new())))
        {
            kept += 1;
        }
    }
    assert_eq!(kept, 3, "the fourth would pass the session's bound");
    assert!(f.portals.bytes <= MAX_NAMED_BYTES);
}

/// The statements and portals all sessions keep share one budget, of
/// which one identity's sessions may take a quarter: one token (which may
/// open a target's every connection) cannot take it from everyone else.
/// The unnamed statement is always kept, and what a session kept is given
/// back when it ends.
#[test]
fn named_statements_of_all_sessions_share_one_budget() {
    let budget = NamedBudget::default();
    let session = |identity: &str| {
        let mut f = InFlight::default();
        f.statements.budget = budget.share(identity);
        f.portals.budget = budget.share(identity);
        f
    };
    // One text, counted by every session that keeps it (held once here).
    let big = prepared(&"x".repeat(MAX_NAMED_BYTES / 2 - 16));
    let size = 1 + big.text.len();
    let per_identity = MAX_NAMED_BYTES_ONE_IDENTITY / size;
    let mut sessions = Vec::new();
    for _ in 0..per_identity {
        let mut f = session("greedy");
        assert!(f.statements.insert("a".into(), (0, big.clone())));
        sessions.push(f);
    }
    let mut greedy = session("greedy");
    assert!(
        !greedy.statements.insert("a".into(), (0, big.clone())),
        "past what one identity's sessions may keep"
    );
    // The unnamed statement is always kept, and takes nothing from what
    // all sessions share.
    let before = budget.held();
    assert!(greedy.statements.insert("".into(), (0, big.clone())));
    assert_eq!(budget.held(), before);
    drop(greedy);
    // Others still keep theirs, up to what all sessions share.
    let mut identity = 0;
    while budget.held() + size <= MAX_NAMED_BYTES_ALL_SESSIONS {
        let mut f = session(&format!("other-{}", identity / per_identity));
        assert!(f.statements.insert("a".into(), (0, big.clone())));
        sessions.push(f);
        identity += 1;
    }
    let mut late = session("late");
    assert!(
        !late.statements.insert("a".into(), (0, big.clone())),
        "past what all sessions share"
    );
    drop(late);
    let held = budget.held();
    drop(sessions.pop());
    assert_eq!(budget.held(), held - size, "given back at the end");
    let mut next = session("late");
    assert!(next.statements.insert("a".into(), (0, big.clone())));
    next.statements.clear();
    drop(sessions);
    drop(next);
    assert_eq!(budget.held(), 0);
}

/// After an error in a pipeline the server skips to the Sync: the
/// requests it skips leave the queue, and the text they held is given
/// back (kept counted, it would stop the session for good once it
/// reached the session's bound).
#[test]
fn requests_skipped_after_an_error_give_back_their_text() {
    let in_flight = queue_of(&[]);
    {
        let mut f = lock(&in_flight);
        let record = AuditRecord {
            query_info_query_string: "SELECT 1/0".into(),
            ..AuditRecord::default()
        };
        f.queued(Pending::new(Kind::Execute, Some(record)));
        let mut parse = Pending::new(Kind::Parse, None);
        parse.parse = Some(("big".into(), prepared(&"x".repeat(1 << 20))));
        f.queued(parse);
        f.queued(Pending::new(Kind::Sync, None));
        assert_eq!(f.queue.held_bytes, 10 + (1 << 20));
    }
    let mut error = b"SERROR\0C22012\0Mdivision by zero\0".to_vec();
    error.push(0);
    answer(&in_flight, &frame(b'E', &error)).expect("in step");
    answer(&in_flight, &frame(b'Z', b"I")).expect("in step");
    let f = lock(&in_flight);
    assert!(f.queue.is_empty());
    assert_eq!(f.queue.held_bytes, 0);
}

/// The start of a server message: its tag, a length field for a body of
/// `body_len` bytes, and the first bytes of that body (`body_start`, all
/// of it or less).
fn message_start(tag: u8, body_len: usize, body_start: &[u8]) -> Vec<u8> {
    let mut bytes = vec![tag];
    bytes.extend_from_slice(&(4 + body_len as i32).to_be_bytes());
    bytes.extend_from_slice(body_start);
    bytes
}

/// Large DataRows and COPY data of a session without masks go on as they
/// arrive, and so do large DataRows of a result whose description planned
/// no masking in a session with masks; nothing else does. A row passed on
/// is counted for its request as a row held whole is, and a full
/// recording counts it as left out.
#[test]
fn large_rows_and_copy_data_go_on_as_they_arrive_unless_they_may_be_masked() {
    // The first bytes of a message of `total` bytes, tag included.
    let start_of = |tag: u8, total: usize| message_start(tag, total - 5, b"\0\x01");
    let large = PASS_ON_MESSAGES_ABOVE + 1;
    let none = MaskSet::default();
    let query = queue_of(&[Kind::Query]);
    let passed = |bytes: &[u8], masks: &MaskSet, in_flight: &Mutex<InFlight>| {
        message_passed_on_as_it_arrives(bytes, masks, in_flight)
    };
    assert_eq!(passed(&start_of(b'D', large), &none, &query), Some(large));
    assert_eq!(passed(&start_of(b'd', large), &none, &query), Some(large));
    assert_eq!(
        passed(&start_of(b'D', PASS_ON_MESSAGES_ABOVE), &none, &query),
        None
    );
    assert_eq!(passed(&start_of(b'E', large), &none, &query), None);
    assert_eq!(passed(&start_of(b'D', large)[..4], &none, &query), None);

    // With masks: no plan (masked whole), a plan that masks a column, and
    // one that masks none.
    let masks = MaskSet::masking(16384, 3, "public.customers.email");
    assert_eq!(passed(&start_of(b'D', large), &masks, &query), None);
    assert_eq!(passed(&start_of(b'd', large), &masks, &query), None);
    let description = |attnum: i16| mask::tests::row_description(&[("col", 16384, attnum, 25)]);
    for (attnum, passes) in [(3, false), (1, true)] {
        let plan = mask::plan(&description(attnum), &masks, false).expect("plan");
        lock(&query).queue.front_mut().expect("queued").result_mask = Some(plan);
        assert_eq!(
            passed(&start_of(b'D', large), &masks, &query).is_some(),
            passes,
            "column {attnum}"
        );
    }

    let in_flight = queue_of(&[Kind::Query]);
    lock(&in_flight)
        .queue
        .front_mut()
        .expect("queued")
        .recording = Some(ResultRecording::default());
    track_row_passed_on(&in_flight, large);
    let guard = lock(&in_flight);
    let head = guard.queue.front().expect("still in flight");
    assert_eq!((head.rows, head.bytes), (1, large as i64));
    let recording = head.recording.as_ref().expect("recording");
    assert!(recording.rows.is_empty());
    assert_eq!(recording.dropped, 1);
}

/// A large message passed on as it arrives reaches the agent byte for
/// byte, whatever pieces the server's bytes come in; what follows it stays
/// for the next message; and the session is marked inside a message only
/// while it passes.
#[tokio::test]
async fn a_message_passed_on_as_it_arrives_reaches_the_agent_whole_and_the_rest_stays() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body: Vec<u8> = (0..3 * PASS_ON_MESSAGES_ABOVE)
        .map(|i| (i % 251) as u8)
        .collect();
    let message = frame(b'D', &body).bytes.to_vec();
    let next = frame(b'C', b"SELECT 1\0").bytes;

    let (server, mut server_side) = tokio::io::duplex(64 * 1024);
    let (mut upstream_rd, _) = tokio::io::split(Box::new(server) as BoxedIo);
    let (agent, mut agent_side) = tokio::io::duplex(64 * 1024);
    let (_, client_wr) = tokio::io::split(Box::new(agent) as BoxedIo);
    let client_wr = AgentWriter::shared(client_wr);

    // The header and a little of the body are in the buffer already; the
    // rest comes in odd-sized pieces, then the next message.
    let mut buf = BytesMut::from(&message[..100]);
    let mut rest = message[100..].to_vec();
    rest.extend_from_slice(&next);
    let sender = tokio::spawn(async move {
        for piece in rest.chunks(7_777) {
            server_side.write_all(piece).await.expect("server writes");
        }
        server_side
    });
    let total = message.len();
    let receiver = tokio::spawn(async move {
        let mut got = vec![0u8; total];
        agent_side.read_exact(&mut got).await.expect("agent reads");
        got
    });
    pass_on_as_it_arrives(&mut upstream_rd, &mut buf, total, &client_wr)
        .await
        .expect("passed on");
    assert!(!client_wr.lock().await.mid_message);
    let got = receiver.await.expect("receiver");
    assert!(
        got == message,
        "the agent got other bytes than the server sent"
    );
    // What came after the message is left for the next one (as much of it
    // as was read with the message's last piece).
    let _server_side = sender.await.expect("sender");
    while buf.len() < next.len() {
        upstream_rd.read_buf(&mut buf).await.expect("read");
    }
    assert_eq!(&buf[..], &next[..]);
}

/// An agent's connection for the relay's writer: the writer, and the
/// agent's end, whose pipe holds `capacity` bytes the agent has not read.
fn agent_connection(capacity: usize) -> (ClientWriter, tokio::io::DuplexStream) {
    let (agent, agent_side) = tokio::io::duplex(capacity);
    let (_, client_wr) = tokio::io::split(Box::new(agent) as BoxedIo);
    (AgentWriter::shared(client_wr), agent_side)
}

/// Closes the session for its token's expiry, as the relay does, then
/// everything the agent received.
async fn received_when_closed_for_expiry(
    client_wr: ClientWriter,
    mut agent_side: tokio::io::DuplexStream,
    in_flight: &Mutex<InFlight>,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    close_after_built_answers(
        &[],
        &mut 0,
        &client_wr,
        in_flight,
        SQLSTATE_IDENTITY,
        "tollgate: the session's token expired",
    )
    .await;
    drop(client_wr);
    let mut got = Vec::new();
    agent_side.read_to_end(&mut got).await.expect("agent reads");
    got
}

/// A session closed while a message passed on as it arrives is inside
/// the agent's connection ends without a FATAL (it would be read as part
/// of the message); between messages the agent gets the FATAL. Both keep
/// why, for the records of the requests in flight.
#[tokio::test]
async fn a_session_closed_inside_a_message_passed_on_gets_no_fatal_in_it() {
    for mid_message in [true, false] {
        let (client_wr, agent_side) = agent_connection(64 * 1024);
        let in_flight = queue_of(&[Kind::Query]);
        client_wr.lock().await.mid_message = mid_message;
        let got = received_when_closed_for_expiry(client_wr, agent_side, &in_flight).await;
        if mid_message {
            assert!(got.is_empty(), "bytes after the message's start: {got:?}");
        } else {
            assert_eq!(got.first(), Some(&b'E'), "{got:?}");
            assert!(String::from_utf8_lossy(&got).contains("token expired"));
        }
        assert_eq!(
            lock(&in_flight)
                .closed_by
                .as_ref()
                .map(|(code, _)| code.as_str()),
            Some(SQLSTATE_IDENTITY)
        );
    }
}

/// A batch of answers whose write the session abandoned part-way (the
/// agent stopped reading, then the token expired and the relay was
/// dropped) leaves the agent's connection inside a message: the session
/// is closed without a FATAL after the bytes the agent already has.
#[tokio::test]
async fn a_session_closed_inside_an_abandoned_batch_gets_no_fatal_in_it() {
    let (client_wr, agent_side) = agent_connection(64);
    let batch = frame(b'C', b"SELECT 1\0").bytes.repeat(100);
    let mut handed_over = 0;
    {
        let mut writer = client_wr.lock().await;
        let write = writer.send_counted(&batch, &mut handed_over);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), write)
                .await
                .is_err(),
            "the agent reads nothing: the write waits"
        );
    }
    assert!(
        handed_over > 0 && handed_over < batch.len(),
        "{handed_over}"
    );
    let in_flight = queue_of(&[Kind::Query]);
    let got = received_when_closed_for_expiry(client_wr, agent_side, &in_flight).await;
    assert_eq!(got, batch[..handed_over], "bytes after the abandoned batch");
}

/// Large messages held whole take their share of a budget all sessions
/// share: one that would go past it waits until another is done, and one
/// larger than the whole budget takes all of it instead of waiting
/// forever.
#[tokio::test]
async fn messages_held_whole_wait_for_their_share_of_the_budget() {
    use std::time::Duration;
    let mib = 1 << 20;
    let budget = HeldWholeBudget::new(10);
    // 3 MiB held three times over: 9 of the 10 MiB.
    let first = budget.take(3 * mib, "agent-a").await.expect("share");
    assert_eq!(first.units(), 9);
    let second = budget.take(mib, "agent-b");
    tokio::pin!(second);
    assert!(
        tokio::time::timeout(Duration::from_millis(20), &mut second)
            .await
            .is_err(),
        "a share past the budget waits"
    );
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("taken once the first is done")
        .expect("share");
    assert_eq!(second.units(), 3);
    drop(second);
    let huge = tokio::time::timeout(Duration::from_secs(5), budget.take(100 * mib, "agent-a"))
        .await
        .expect("a message over the budget takes all of it")
        .expect("share");
    assert_eq!(huge.units(), 10);

    // Which messages are large: any tag, once its header is there.
    let header = |tag: u8, total: usize| message_start(tag, total - 5, b"");
    let large = PASS_ON_MESSAGES_ABOVE + 1;
    assert_eq!(large_message_ahead(&header(b'E', large)), Some(large));
    assert_eq!(large_message_ahead(&header(b'D', large)), Some(large));
    assert_eq!(
        large_message_ahead(&header(b'D', PASS_ON_MESSAGES_ABOVE)),
        None
    );
    assert_eq!(large_message_ahead(&header(b'D', large)[..4]), None);
}

/// A message held whole counts against its session's identity: past that
/// identity's quarter of the budget its next one waits, while another
/// identity's goes on.
#[tokio::test]
async fn one_identity_holds_at_most_a_quarter_of_the_held_whole_budget() {
    use std::time::Duration;
    let mib = 1 << 20;
    let budget = HeldWholeBudget::new(40);
    // 3 MiB held three times over: 9 of agent-a's 10.
    let _first = budget.take(3 * mib, "agent-a").await.expect("share");
    let more = budget.take(mib, "agent-a");
    tokio::pin!(more);
    assert!(
        tokio::time::timeout(Duration::from_millis(20), &mut more)
            .await
            .is_err(),
        "past its quarter, the identity waits"
    );
    tokio::time::timeout(Duration::from_secs(5), budget.take(mib, "agent-b"))
        .await
        .expect("another identity goes on")
        .expect("share");
}

/// The start of one DataRow of one value, [`LARGE_VALUE`] bytes long
/// (over [`PASS_ON_MESSAGES_ABOVE`]): its header and the value's first
/// bytes, `marker` 64 times.
fn start_of_large_row(marker: &[u8]) -> BytesMut {
    let mut body = 1i16.to_be_bytes().to_vec();
    body.extend_from_slice(&(LARGE_VALUE as i32).to_be_bytes());
    body.extend_from_slice(&marker.repeat(64));
    BytesMut::from(&message_start(b'D', 2 + 4 + LARGE_VALUE, &body)[..])
}

/// See [`start_of_large_row`].
const LARGE_VALUE: usize = 2 * PASS_ON_MESSAGES_ABOVE;

/// A large row that would go on as it arrives is held like any answer
/// until its request's record is durable: when that record fails, not a
/// byte of the row reaches the agent, the session is closed with the
/// reason, and the outcome says the answer was withheld.
#[tokio::test]
async fn a_large_row_is_not_passed_on_when_its_record_failed() {
    let (audit_dir, _keys, session, audit) = relay_session().await;
    let mut in_flight = InFlight::default();
    let mut read = query("select big");
    read.durable = Some(Durable::known(Err(AuditError::Wal("disk full".into()))));
    in_flight.queue.push_back(read);
    let in_flight = Arc::new(Mutex::new(in_flight));
    let answers = start_of_large_row(b"large-row-value-");
    let (ended, got) = relay_to_agent(&session, &in_flight, answers).await;
    assert!(matches!(ended, Err(WireError::Closed)), "{ended:?}");
    record_unanswered(&session, &in_flight);
    audit.shutdown().await;

    assert!(
        !got.contains("large-row-value"),
        "row bytes reached the agent: {got}"
    );
    assert!(got.starts_with('E'), "{got}");
    assert!(
        got.contains("FATAL") && got.contains(SQLSTATE_AUDIT),
        "{got}"
    );
    let outcomes = outcome_rows(audit_dir.path());
    assert_eq!(outcomes.len(), 1, "{outcomes:#?}");
    assert!(
        outcomes[0]
            .status_detail
            .contains("tollgate withheld the server's answer"),
        "{}",
        outcomes[0].status_detail
    );
}

/// A large row that must be held whole (a session with masks, no plan for
/// its result) waits for its share of the budget all sessions share; when
/// the share does not come in time, the session is closed with
/// `out_of_memory` and the reason, and not a byte of the row goes out.
/// Once the budget has room, a row is held, masked and relayed, and the
/// share is given back.
#[tokio::test(start_paused = true)]
async fn a_row_held_whole_waits_for_its_share_and_is_closed_when_none_comes() {
    let (_audit_dir, _keys, mut session, audit) = relay_session().await;
    Arc::get_mut(&mut session).expect("only reference").masks =
        MaskSet::masking(16384, 3, "public.customers.email");
    let large_row = || start_of_large_row(b"held-row-value-");

    // Every share is taken: the row waits, then the session is closed.
    let budget = &session.shared.postgres_held_whole;
    let all = budget
        .take(usize::MAX / 4, "another-identity")
        .await
        .expect("the whole budget");
    let in_flight = Arc::new(Mutex::new(InFlight::default()));
    lock(&in_flight).queue.push_back(query("select big"));
    let (ended, got) = relay_to_agent(&session, &in_flight, large_row()).await;
    assert!(matches!(ended, Err(WireError::Closed)), "{ended:?}");
    assert!(!got.contains("held-row-value"), "row bytes went out: {got}");
    assert!(got.contains(SQLSTATE_OUT_OF_MEMORY), "{got}");
    assert!(got.contains("waited 60 s for memory"), "{got}");
    assert_eq!(
        lock(&in_flight)
            .closed_by
            .as_ref()
            .map(|(code, _)| code.as_str()),
        Some(SQLSTATE_OUT_OF_MEMORY)
    );
    drop(all);

    // With room in the budget: the row's share is taken while it
    // arrives, the row is masked whole (no description planned it) and
    // relayed, and the share is given back.
    let before = budget.available_mib();
    let in_flight = Arc::new(Mutex::new(InFlight::default()));
    lock(&in_flight).queue.push_back(query("select big"));
    let row = large_row();
    let rest_len = LARGE_VALUE - (row.len() - 11);
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel();
    let (left_tx, left_rx) = tokio::sync::oneshot::channel();
    // The closure outlives this frame: it reads the budget through its
    // own handle on the daemon's shared state.
    let shared = session.shared.clone();
    let (ended, got) =
        relay_to_agent_while(&session, &in_flight, row, move |mut side| async move {
            use tokio::io::AsyncWriteExt;
            // Sent while the relay holds the row's share.
            tokio::task::yield_now().await;
            let _ = taken_tx.send(before - shared.postgres_held_whole.available_mib());
            side.write_all(&vec![b'v'; rest_len])
                .await
                .expect("the rest of the row");
            // Once the row went on, with the session still open: its
            // share is given back.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let _ = left_tx.send(before - shared.postgres_held_whole.available_mib());
            // Then the server goes away: the relay ends after the row.
        })
        .await;
    assert!(matches!(ended, Err(WireError::Closed)), "{ended:?}");
    let total = 11 + LARGE_VALUE;
    assert_eq!(
        taken_rx.await.expect("taken"),
        (3 * total).div_ceil(1 << 20)
    );
    assert_eq!(
        left_rx.await.expect("left"),
        0,
        "the share outlived its row"
    );
    assert_eq!(got.first(), Some(&b'D'), "the masked row went out");
    assert!(
        !String::from_utf8_lossy(&got).contains("held-row-value"),
        "the row went out unmasked"
    );
    assert_eq!(budget.available_mib(), before, "the share is given back");
    audit.shutdown().await;
}

/// Relays an ErrorResponse quoting a value of [`LARGE_VALUE`] bytes back
/// (held whole: it is over [`PASS_ON_MESSAGES_ABOVE`] and not passed on)
/// to an agent at the other end of `agent`. The server sends the rest of
/// it after the relay took its share, then keeps its connection open
/// (`server_stays`) or closes it. Returns how the relay ended; with
/// `server_stays`, it must end within 10 minutes of the paused clock.
/// (Without, no such bound: the session's end waits for the audit
/// store's thread, and the paused clock would jump to the bound.)
async fn relay_held_error_to(
    session: &Arc<Session>,
    in_flight: &Arc<Mutex<InFlight>>,
    agent: tokio::io::DuplexStream,
    server_stays: bool,
) -> Result<(), WireError> {
    lock(in_flight).queue.push_back(query("select big"));
    let fields = b"SERROR\0C22P02\0Minvalid input syntax for type integer: ";
    let error = BytesMut::from(&message_start(b'E', LARGE_VALUE, fields)[..]);
    let mut rest = vec![b'v'; LARGE_VALUE - fields.len() - 2];
    rest.extend_from_slice(b"\0\0");
    let (upstream, mut server_side) = tokio::io::duplex(64 * 1024);
    let serving = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        server_side
            .write_all(&rest)
            .await
            .expect("the rest of the error");
        server_stays.then_some(server_side)
    });
    let (upstream_rd, _) = tokio::io::split(Box::new(upstream) as BoxedIo);
    let (_, client_wr) = tokio::io::split(Box::new(agent) as BoxedIo);
    let relay = server_to_client(
        session.clone(),
        upstream_rd,
        error,
        AgentWriter::shared(client_wr),
        in_flight.clone(),
        Arc::new(Notify::new()),
    );
    let ended = match server_stays {
        true => tokio::time::timeout(std::time::Duration::from_secs(600), relay)
            .await
            .expect("the relay gives up on an agent that takes nothing"),
        false => relay.await,
    };
    drop(serving.await.expect("the server's side"));
    ended
}

/// A message held whole keeps its share of the budget until the agent
/// has taken it: an agent that never reads a large one (an error quoting
/// a huge value back) is given up on after the wait, its session closed
/// with `out_of_memory` and the reason, and the share is given back, so
/// that it does not hold others' large values back until its token
/// expires.
#[tokio::test(start_paused = true)]
async fn a_message_held_whole_that_the_agent_never_reads_gives_its_share_back() {
    let (_audit_dir, _keys, session, audit) = relay_session().await;
    let budget = &session.shared.postgres_held_whole;
    let before = budget.available_mib();
    let in_flight = Arc::new(Mutex::new(InFlight::default()));
    // The agent's end is kept open and never read.
    let (agent, _agent_side) = tokio::io::duplex(64 * 1024);
    let ended = relay_held_error_to(&session, &in_flight, agent, true).await;
    assert!(matches!(ended, Err(WireError::Closed)), "{ended:?}");
    let closed_by = lock(&in_flight).closed_by.clone();
    let (code, why) = closed_by.expect("closed with a reason");
    assert_eq!(code, SQLSTATE_OUT_OF_MEMORY);
    assert!(why.contains("took nothing of a value"), "{why}");
    assert_eq!(budget.available_mib(), before, "the share is given back");
    audit.shutdown().await;
}

/// An agent that reads a large message held whole slowly, but goes on
/// reading, is served however long the whole takes: only one that takes
/// nothing for the wait is given up on.
#[tokio::test(start_paused = true)]
async fn a_message_held_whole_that_the_agent_reads_slowly_is_served() {
    let (_audit_dir, _keys, session, audit) = relay_session().await;
    let in_flight = Arc::new(Mutex::new(InFlight::default()));
    let (agent, mut agent_side) = tokio::io::duplex(64 * 1024);
    // 64 KiB every 30 s: the 2 MiB message takes over 15 minutes.
    let reading = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            match agent_side.read(&mut chunk).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    });
    // The server closes after the message: the relay ends there.
    let ended = relay_held_error_to(&session, &in_flight, agent, false).await;
    assert!(matches!(ended, Err(WireError::Closed)), "{ended:?}");
    let got = reading.await.expect("the agent's side");
    assert!(
        got.len() >= 5 + LARGE_VALUE,
        "the agent got {} bytes",
        got.len()
    );
    assert_eq!(got[0], b'E');
    let closed_by = lock(&in_flight).closed_by.clone();
    assert!(
        closed_by
            .as_ref()
            .is_none_or(|(code, _)| code != SQLSTATE_OUT_OF_MEMORY),
        "{closed_by:?}"
    );
    audit.shutdown().await;
}

/// An Execute that writes, with the request record an outcome completes.
fn writing_execute() -> Pending {
    execute_of("INSERT INTO t VALUES (1)")
}

/// An Execute of `sql`, judged as the reader judges it.
fn execute_of(sql: &str) -> Pending {
    let operations = classify(sql);
    let mut execute = Pending::new(
        Kind::Execute,
        Some(AuditRecord {
            query_info_query_string: sql.into(),
            ..AuditRecord::default()
        }),
    );
    execute.read_only = provably_read_only(&operations);
    execute.may_change_transaction = may_change_transaction(&operations);
    execute
}

/// A queue of `requests`, in order.
fn pipeline<const N: usize>(requests: [Pending; N]) -> Mutex<InFlight> {
    let in_flight = queue_of(&[]);
    for p in requests {
        lock(&in_flight).queued(p);
    }
    in_flight
}

/// Feeds `answers` in order; what finished, as (kind, error code).
fn finish(in_flight: &Mutex<InFlight>, answers: &[Frame]) -> Vec<(Kind, Option<String>)> {
    let mut finished = Finished::new();
    for message in answers {
        track_answer(&MaskSet::default(), in_flight, message, &mut finished).expect("in step");
    }
    finished
        .into_iter()
        .map(|(p, ended)| {
            let code = match ended {
                Outcome::Succeeded => None,
                Outcome::Failed { code, .. } => Some(code),
                Outcome::NotKnown { .. } => Some(NOT_KNOWN.to_string()),
            };
            (p.kind, code)
        })
        .collect()
}

/// What [`finish`] gives in place of a SQLSTATE for an outcome not known.
const NOT_KNOWN: &str = "(not known)";

/// Outside a transaction block, a pipeline's statements are one implicit
/// transaction, committed at its Sync or rolled back by an error anywhere
/// in it: an Execute that completed before a later one failed (or before
/// the commit at the Sync failed) is recorded as rolled back, not done.
#[test]
fn executes_of_a_pipeline_that_fails_are_recorded_as_rolled_back() {
    let complete = || frame(b'C', b"INSERT 0 1\0");
    let error = |code: &[u8]| {
        let mut body = b"SERROR\0C".to_vec();
        body.extend_from_slice(code);
        body.extend_from_slice(b"\0Mfailed\0\0");
        frame(b'E', &body)
    };
    let idle = || frame(b'Z', b"I");

    // A later Execute fails: the first is rolled back with it.
    let in_flight = pipeline([
        writing_execute(),
        writing_execute(),
        Pending::new(Kind::Sync, None),
    ]);
    assert_eq!(finish(&in_flight, &[complete()]), [], "held until the Sync");
    assert_eq!(
        finish(&in_flight, &[error(b"23505"), idle()]),
        [
            (Kind::Execute, Some("23505".to_string())),
            (Kind::Execute, Some("23505".to_string()))
        ]
    );

    // All complete: done at the Sync.
    let in_flight = pipeline([
        writing_execute(),
        writing_execute(),
        Pending::new(Kind::Sync, None),
    ]);
    assert_eq!(
        finish(&in_flight, &[complete(), complete(), idle()]),
        [(Kind::Execute, None), (Kind::Execute, None)]
    );

    // The commit at the Sync fails (a deferred constraint).
    let in_flight = pipeline([writing_execute(), Pending::new(Kind::Sync, None)]);
    assert_eq!(
        finish(&in_flight, &[complete(), error(b"23503"), idle()]),
        [(Kind::Execute, Some("23503".to_string()))]
    );

    // Inside a transaction block nothing is committed at the Sync: each
    // Execute is recorded as it completes.
    let in_flight = queue_of(&[Kind::Sync]);
    assert_eq!(finish(&in_flight, &[frame(b'Z', b"T")]), []);
    for p in [writing_execute(), Pending::new(Kind::Sync, None)] {
        lock(&in_flight).queued(p);
    }
    assert_eq!(finish(&in_flight, &[complete()]), [(Kind::Execute, None)]);

    // A provable read stands whatever happens after it: recorded as it
    // completes. A "read" that calls functions may write: held.
    let in_flight = pipeline([execute_of("SELECT 1"), Pending::new(Kind::Sync, None)]);
    assert_eq!(finish(&in_flight, &[complete()]), [(Kind::Execute, None)]);
    let in_flight = pipeline([
        execute_of("SELECT next_invoice()"),
        Pending::new(Kind::Sync, None),
    ]);
    assert_eq!(finish(&in_flight, &[complete()]), []);

    // A statement that may begin, end or change the transaction (COMMIT,
    // BEGIN, a CALL, SET ROLE): what was held before it is not known, it
    // is recorded as it completes, and what follows it is held; an error
    // after it leaves that not known either, no error means done.
    for kind in [
        "COMMIT",
        "SET ROLE someone",
        "CALL archive()",
        "not sql at all",
    ] {
        for (end, expected) in [
            (vec![idle()], None),
            (vec![error(b"23505"), idle()], Some(NOT_KNOWN.to_string())),
        ] {
            let in_flight = pipeline([
                writing_execute(),
                execute_of(kind),
                writing_execute(),
                writing_execute(),
                Pending::new(Kind::Sync, None),
            ]);
            assert_eq!(
                finish(&in_flight, &[complete(), complete(), complete()]),
                [
                    (Kind::Execute, Some(NOT_KNOWN.to_string())),
                    (Kind::Execute, None)
                ],
                "{kind}"
            );
            let mut answers = vec![];
            if expected.is_none() {
                answers.push(complete());
            }
            answers.extend(end);
            let released = finish(&in_flight, &answers);
            let failed_one = expected.is_some();
            let mut want = vec![(Kind::Execute, expected.clone())];
            if failed_one {
                // The failing Execute itself, with its own error.
                want.insert(0, (Kind::Execute, Some("23505".to_string())));
            } else {
                want.push((Kind::Execute, None));
            }
            assert_eq!(released, want, "{kind}, {expected:?}");
        }
    }

    // A simple Query behind unsynced Executes runs in their implicit
    // transaction: its COMMIT commits them (a later error in it does not
    // roll them back), its ROLLBACK rolls them back, its BEGIN moves them
    // into a block. What was held before it is not known; one without
    // such a statement leaves them held, and its error rolls them back.
    let query_of = |sql: &str| {
        let mut query = Pending::new(
            Kind::Query,
            Some(AuditRecord {
                query_info_query_string: sql.into(),
                ..AuditRecord::default()
            }),
        );
        query.may_change_transaction = may_change_transaction(&classify(sql));
        query
    };
    for (sql, answers) in [
        (
            "COMMIT; SELECT 1/0",
            vec![complete(), error(b"22012"), idle()],
        ),
        ("ROLLBACK", vec![complete(), idle()]),
        ("BEGIN", vec![complete(), frame(b'Z', b"T")]),
    ] {
        let in_flight = pipeline([writing_execute(), query_of(sql)]);
        assert_eq!(finish(&in_flight, &[complete()]), [], "{sql}: held");
        let ended = finish(&in_flight, &answers);
        assert_eq!(
            ended.first(),
            Some(&(Kind::Execute, Some(NOT_KNOWN.to_string()))),
            "{sql}: {ended:?}"
        );
    }
    let in_flight = pipeline([writing_execute(), query_of("SELECT 1/0")]);
    assert_eq!(finish(&in_flight, &[complete()]), []);
    let ended = finish(&in_flight, &[error(b"22012"), idle()]);
    assert_eq!(
        ended.first(),
        Some(&(Kind::Execute, Some("22012".to_string()))),
        "{ended:?}"
    );

    // Inside a block a COMMIT starts an implicit transaction: a write
    // after it is held, and an error after it leaves it not known.
    let in_flight = queue_of(&[Kind::Sync]);
    assert_eq!(finish(&in_flight, &[frame(b'Z', b"T")]), []);
    let in_flight_after = pipeline([
        execute_of("COMMIT"),
        writing_execute(),
        writing_execute(),
        Pending::new(Kind::Sync, None),
    ]);
    lock(&in_flight_after).implicit.in_block = true;
    assert_eq!(
        finish(&in_flight_after, &[complete(), complete()]),
        [(Kind::Execute, None)]
    );
    assert_eq!(
        finish(&in_flight_after, &[error(b"22012"), idle()]),
        [
            (Kind::Execute, Some("22012".to_string())),
            (Kind::Execute, Some(NOT_KNOWN.to_string()))
        ]
    );
    drop(in_flight);

    // Past the cap on what waits for one Sync, outcomes are written as
    // they complete, not known.
    let in_flight = pipeline([writing_execute(), Pending::new(Kind::Sync, None)]);
    lock(&in_flight).implicit.held_bytes = MAX_HELD_OUTCOME_BYTES;
    assert_eq!(
        finish(&in_flight, &[complete()]),
        [(Kind::Execute, Some(NOT_KNOWN.to_string()))]
    );

    // After a failed Execute the server skips the rest up to the Sync:
    // an Execute among them did not run.
    let in_flight = pipeline([
        writing_execute(),
        writing_execute(),
        Pending::new(Kind::Sync, None),
    ]);
    assert_eq!(
        finish(&in_flight, &[error(b"22012")]),
        [
            (Kind::Execute, Some("22012".to_string())),
            (Kind::Execute, Some("25P02".to_string()))
        ]
    );

    // The session ends before the Sync is answered: not known.
    let in_flight = pipeline([writing_execute(), Pending::new(Kind::Sync, None)]);
    assert_eq!(finish(&in_flight, &[complete()]), []);
    let held = std::mem::take(&mut lock(&in_flight).implicit.held);
    let outcomes = uncommitted_outcomes(held);
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].status_id, record::status::UNKNOWN);
    assert!(
        outcomes[0].status_detail.contains("not known whether"),
        "{}",
        outcomes[0].status_detail
    );
}

/// A text heavier than the parsing budget is not parsed: it is not
/// understood, at once, whatever it says (8 MiB of `1,1,1,...` took
/// 7.5 GB and 23 s to parse, on a runtime thread). A text over the weight
/// parsed at once but within the budget is parsed off the runtime's
/// threads, as any other.
#[tokio::test]
async fn a_text_heavier_than_the_parsing_budget_is_not_parsed() {
    let (_audit_dir, _keys, session, audit) = relay_session().await;
    // Each `,1` weighs three: a comma, and a run that may be two tokens.
    let heavy = format!("SELECT 1{}", ",1".repeat(CLASSIFY_BUDGET / 2));
    assert!(heavy.len() <= MAX_AUDITED_STATEMENT);
    let err = classify_within_limit(&session, &heavy)
        .await
        .expect_err("too heavy to parse");
    assert!(err.contains("tokens"), "{err}");

    let medium = format!("SELECT 1{}", ",1".repeat(20_000));
    let operations = classify_within_limit(&session, &medium)
        .await
        .expect("parsed");
    assert_eq!(operations.len(), 1);
    assert_eq!(operations[0].kind, StatementKind::Read);
    audit.shutdown().await;
}

/// A heavy text's share of the parsing budget stays taken until its parse
/// is done, even when the session waiting for it ends first (the parse
/// cannot be stopped, and its memory is in use until it ends).
#[tokio::test]
async fn a_parse_keeps_its_share_after_its_session_ends() {
    use std::time::Duration;
    let (_audit_dir, _keys, session, audit) = relay_session().await;
    let budget = &session.shared.postgres_parsing;
    let text = format!("SELECT 1{}", ",1".repeat(100_000));
    // The share is taken and the parse started at the first poll.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(1),
        classify_within_limit(&session, &text),
    )
    .await;
    assert!(abandoned.is_err(), "the parse ended within a millisecond");
    assert!(
        budget.available() < CLASSIFY_BUDGET,
        "the share was given back while the parse ran"
    );
    let given_back = tokio::time::timeout(Duration::from_secs(120), async {
        while budget.available() < CLASSIFY_BUDGET {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(given_back.is_ok(), "the share was never given back");
    audit.shutdown().await;
}

/// A read that may call a name the session knows as a function of the
/// database's own (judge marks it so) is not forwarded before its record
/// is durable: the function may write.
#[test]
fn a_read_that_may_call_a_function_of_the_databases_own_is_not_read_only() {
    let read = Operation {
        kind: StatementKind::Read,
        ..Operation::default()
    };
    assert!(provably_read_only(&Ok(vec![read.clone()])));
    let calls = Operation {
        calls_unknown_functions: true,
        ..read
    };
    assert!(!provably_read_only(&Ok(vec![calls])));
}

/// Answers built before a session is closed from outside, which its agent
/// does not read, do not hold the close: given up after the wait, they
/// leave the connection inside a message, closed without the FATAL.
#[tokio::test(start_paused = true)]
async fn answers_an_agent_does_not_read_do_not_hold_the_close() {
    use std::time::Duration;
    let (client_wr, _agent_side) = agent_connection(64);
    let in_flight = queue_of(&[Kind::Query]);
    let out = frame(b'C', b"SELECT 1\0").bytes.repeat(100);
    let mut handed_over = 0;
    let closed = tokio::time::timeout(
        Duration::from_secs(60),
        close_after_built_answers(
            &out,
            &mut handed_over,
            &client_wr,
            &in_flight,
            SQLSTATE_IDENTITY,
            "tollgate: the session's token expired",
        ),
    )
    .await;
    assert!(closed.is_ok(), "the close waited on the agent");
    assert!(handed_over < out.len(), "{handed_over}");
    assert!(client_wr.lock().await.mid_message);
}

/// [`session_auditing_to`]'s session, knowing `relations` as read without
/// running code (as its catalog lookup at login would).
async fn session_knowing(
    audit_dir: &std::path::Path,
    relations: &[&str],
) -> (tempfile::TempDir, Session) {
    let (keys, session) = session_auditing_to(audit_dir).await;
    let Ok(session) = Arc::try_unwrap(session) else {
        panic!("the session has one owner");
    };
    let session = Session {
        masks: MaskSet::knowing_relations(relations),
        ..session
    };
    (keys, session)
}

/// A read goes out before its record is durable only when every relation
/// it reads was listed at login as read without running code, and only
/// until the session runs a statement that may change relations: a
/// temporary view can then stand under a listed table's name.
#[tokio::test]
async fn a_read_goes_out_early_only_while_the_session_has_changed_no_relation() {
    use crate::proxy::postgres::classify::classify;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_keys, session) = session_knowing(dir.path(), &["public.customers"]).await;
    let read = classify("SELECT name FROM customers WHERE id = 1");
    assert!(admit::judge(&session, &read).read_only);
    assert!(
        admit::judge(
            &session,
            &classify("SELECT relname FROM pg_catalog.pg_class")
        )
        .read_only
    );
    for other in ["SELECT * FROM customer_view", "SELECT * FROM orders"] {
        assert!(
            !admit::judge(&session, &classify(other)).read_only,
            "{other}"
        );
    }
    // Judged at its Parse, before the view (and allowed: the session's
    // principal has no grant here).
    let mut parsed = admit::judge(&session, &read);
    assert!(parsed.read_only);
    parsed.decision = crate::policy::Decision::Allow {
        rule: "readers".into(),
        record_results: Default::default(),
    };
    let cache_key = ("orders-db", "orders");
    session.shared.postgres_catalogs.remember(
        cache_key.0,
        cache_key.1,
        &MaskSet::knowing_relations(&["public.customers"]),
    );
    let view = classify("CREATE TEMP VIEW customers AS SELECT 1 AS name");
    assert!(!admit::judge(&session, &view).read_only);
    assert!(
        !admit::judge(&session, &read).read_only,
        "after the session may have put a view under the table's name"
    );
    // The statement parsed before runs after: no longer read-only.
    let admitted = admit::admit(
        &session,
        "SELECT name FROM customers WHERE id = 1",
        &read,
        &parsed,
        String::new(),
    )
    .await
    .unwrap_or_else(|_| panic!("admitted"));
    assert!(!admitted.into_pending(Kind::Execute, &parsed).read_only);
    // And the next logins to the database read its catalog afresh.
    assert!(session
        .shared
        .postgres_catalogs
        .fresh(cache_key.0, cache_key.1)
        .is_none());
}

/// A call of a function of the database's own may run DDL: the session's
/// later reads are durable first too.
#[tokio::test]
async fn a_call_of_the_databases_own_function_counts_as_changing_relations() {
    use crate::proxy::postgres::classify::classify;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_keys, session) = session_knowing(dir.path(), &["public.customers"]).await;
    let read = classify("SELECT name FROM customers");
    assert!(admit::judge(&session, &read).read_only);
    assert!(!admit::judge(&session, &classify("SELECT make_views()")).read_only);
    assert!(!admit::judge(&session, &read).read_only);
}

/// What a built-in call writes (the sequence `nextval` advances, a large
/// object) comes back as no row: a masked caller's `nextval` is not masked
/// for it, even under a pattern that covers every table; a written table
/// whose rows RETURNING hands back still is.
#[test]
fn values_of_sequence_and_large_object_calls_are_not_masked_for_what_they_write() {
    use crate::proxy::postgres::classify::classify;
    let masks = MaskSet::masking(16384, 3, "*.*.ssn");
    for sql in [
        "SELECT nextval('orders_id_seq')",
        "SELECT nextval(pg_get_serial_sequence('orders', 'id'))",
        "SELECT lo_create(0)",
    ] {
        assert!(!admit::reads_masked(&masks, &classify(sql)), "{sql}");
    }
    for sql in [
        "INSERT INTO people (name) VALUES ('x') RETURNING *",
        "INSERT INTO people (id) VALUES (nextval('people_id_seq')) RETURNING id",
        "SELECT nextval('s') FROM people",
    ] {
        assert!(admit::reads_masked(&masks, &classify(sql)), "{sql}");
    }
}
