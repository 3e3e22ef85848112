//! The server's side of the relay: each answer is tied to the request it
//! answers, held until that request's record is durable, masked, and
//! forwarded; the request's outcome is recorded once its answer is
//! complete.

use super::*;
use crate::proxy::postgres::upstream::text_reading_changed;

/// Holds the server's answer to the oldest request until that request's
/// record is durable (a read-only request is forwarded while its record
/// syncs). Marks the request while it waits, so a session that ends
/// meanwhile records why the agent never saw the answer, and keeps the
/// write's error as the reason the answer is withheld.
pub(super) async fn hold_until_front_record_is_durable(
    in_flight: &Mutex<InFlight>,
) -> Result<(), AuditError> {
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

pub(super) async fn server_to_client(
    session: Arc<Session>,
    mut upstream_rd: ReadHalf<BoxedIo>,
    mut buf: BytesMut,
    client_wr: ClientWriter,
    in_flight: Arc<Mutex<InFlight>>,
    answered: Arc<Notify>,
) -> Result<(), WireError> {
    let mut outcomes = Outcomes::new(|outcome| submit_outcome(&session, outcome));
    // This session's share of the daemon's HeldWholeBudget while a large
    // message it cannot pass on arrives.
    let mut held_whole = None;
    // The last FATAL the server sent, if it sent one: it then said itself
    // why it closed the connection.
    let mut server_fatal = None;
    loop {
        let mut out = BytesMut::new();
        // Any message split off ends the one held whole, which was first.
        let mut split_any = false;
        while let Some(frame) = wire::split_frame(&mut buf)? {
            split_any = true;
            hold_or_close(&out, &mut outcomes.handed_over, &client_wr, &in_flight).await?;
            if let Some(why) = reads_text_otherwise(&frame) {
                // A statement policy let through changed how the server
                // reads SQL text (a function of the agent's calling
                // set_config): from now on it would read other statements
                // than tollgate.
                close_after_built_answers(
                    &out,
                    &mut outcomes.handed_over,
                    &client_wr,
                    &in_flight,
                    SQLSTATE_POLICY,
                    &why,
                )
                .await;
                return Err(WireError::Closed);
            }
            if frame.tag == b'E' && wire::is_fatal(&frame) {
                server_fatal = Some(wire::error_fields(&frame));
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
                        SQLSTATE_PROTOCOL,
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
        // What is left in `buf` is the start of a message. One too large
        // to hold whole goes on to the agent as it arrives, after the
        // answers before it.
        let pass_on = match message_passed_on_as_it_arrives(&buf, &session.masks, &in_flight) {
            Some(total) => {
                hold_or_close(&out, &mut outcomes.handed_over, &client_wr, &in_flight).await?;
                if buf[0] == b'D' {
                    track_row_passed_on(&in_flight, total);
                }
                Some(total)
            }
            None => None,
        };
        if !out.is_empty() {
            // If this fails, or the session ends while it waits (the relay
            // is dropped), the answers the connection took in full are
            // recorded as handed over and the rest as not (on drop).
            let mut client = client_wr.lock().await;
            // A message held whole keeps its share of the budget all
            // sessions share until the agent has taken it: an agent that
            // stops reading it is given up on once it has taken nothing
            // for the wait, or its share would be held, and others' large
            // values wait behind it, until its token expires. One that
            // reads slowly is served.
            let stall = held_whole.is_some().then_some(HELD_WHOLE_WAIT);
            let sent = client
                .send_counted_unless_stalled(&out, &mut outcomes.handed_over, stall)
                .await?;
            if !sent {
                let why = format!(
                    "tollgate: the agent took nothing of a value of {} bytes for {} s; the \
                     memory it held is given back",
                    out.len(),
                    HELD_WHOLE_WAIT.as_secs()
                );
                lock(&in_flight).closed_by = Some((SQLSTATE_OUT_OF_MEMORY.into(), why));
                let _ = tokio::time::timeout(FATAL_WRITE_WAIT, client.io.shutdown()).await;
                return Err(WireError::Closed);
            }
        }
        // As for the client's side: the sent answers must not keep the
        // read buffer shared, or the reserve below allocates a new one.
        drop(out);
        outcomes.sent();
        answered.notify_waiters();
        // The message held whole went on, its masked copy with it. The
        // buffer it arrived in keeps its size unless given back.
        if split_any && held_whole.take().is_some() && buf.capacity() > 4 * READ_CHUNK {
            let rest = buf.split();
            buf = BytesMut::with_capacity(READ_CHUNK.max(rest.len()));
            buf.extend_from_slice(&rest);
        }
        if let Some(total) = pass_on {
            pass_on_as_it_arrives(&mut upstream_rd, &mut buf, total, &client_wr).await?;
            continue;
        }
        // One that must be held whole (a masked row) takes its share of the
        // budget all sessions share before more of it is read: past the
        // budget this session waits, the daemon does not grow.
        if let (None, Some(total)) = (&held_whole, large_message_ahead(&buf)) {
            let budget = &session.shared.postgres_held_whole;
            let identity = &session.principal.object_id;
            match tokio::time::timeout(HELD_WHOLE_WAIT, budget.take(total, identity)).await {
                Ok(share) => held_whole = share,
                Err(_) => {
                    close_after_built_answers(
                        &[],
                        &mut outcomes.handed_over,
                        &client_wr,
                        &in_flight,
                        SQLSTATE_OUT_OF_MEMORY,
                        &format!(
                            "tollgate: a value of {total} bytes waited {} s for memory that other sessions' large values hold; the session is closed",
                            HELD_WHOLE_WAIT.as_secs()
                        ),
                    )
                    .await;
                    return Err(WireError::Closed);
                }
            }
        }
        // As for the client's side: whole answers, not 64-byte pieces.
        buf.reserve(READ_CHUNK);
        let lost = match upstream_rd.read_buf(&mut buf).await {
            Ok(0) => "the target closed the connection".to_string(),
            Ok(_) => continue,
            Err(err) => format!("reading from the target failed: {err}"),
        };
        end_on_upstream_loss(
            &session,
            &mut outcomes.handed_over,
            &client_wr,
            &in_flight,
            server_fatal.take(),
            &lost,
        )
        .await;
        return Err(WireError::Closed);
    }
}

/// The connection to the target ended without the agent asking: the
/// session row says how, and an agent the server did not tell itself
/// (a FATAL) gets FATAL 08006 instead of a connection that just closes.
/// Requests in flight are recorded as unanswered when the session ends.
async fn end_on_upstream_loss(
    session: &Session,
    handed_over: &mut usize,
    client_wr: &ClientWriter,
    in_flight: &Mutex<InFlight>,
    server_fatal: Option<(String, String)>,
    lost: &str,
) {
    // A FATAL from the server was relayed already.
    let (detail, code, fatal) = match &server_fatal {
        Some((code, message)) => (
            format!("{lost} after its FATAL {code}: {message}"),
            code.as_str(),
            None,
        ),
        None => (
            format!("{lost} without an error"),
            SQLSTATE_UPSTREAM,
            Some(format!(
                "tollgate: the connection to the target was lost ({lost}); the session is closed"
            )),
        ),
    };
    let detail = format!("upstream_lost: {detail}");
    end_session(
        session,
        handed_over,
        client_wr,
        in_flight,
        detail,
        code,
        fatal.as_deref(),
    )
    .await;
}

/// Waits, before the next server message goes towards the agent, until
/// the record of the request it answers is durable; if that record could
/// not be written, ends the session instead. The answer exists but its
/// request is not on record: the agent must not see it. What came before
/// it (`out`) answers requests on record, or Parse, Bind and Describe,
/// which have no record of their own (as on every other path): it goes
/// first.
async fn hold_or_close(
    out: &[u8],
    handed_over: &mut usize,
    client_wr: &ClientWriter,
    in_flight: &Mutex<InFlight>,
) -> Result<(), WireError> {
    let Err(err) = hold_until_front_record_is_durable(in_flight).await else {
        return Ok(());
    };
    close_after_built_answers(
        out,
        handed_over,
        client_wr,
        in_flight,
        SQLSTATE_AUDIT,
        &format!("tollgate: the statement's audit record could not be written ({err}); its answer is withheld and the session closed"),
    )
    .await;
    Err(WireError::Closed)
}

/// Server messages longer than this are passed on to the agent as they
/// arrive, when nothing needs them whole: a DataRow in a session without
/// masks, or one of a result whose description planned no masking (a
/// masked row is rewritten, so it is held whole), and COPY data in a
/// session without masks.
/// PostgreSQL sends a value of up to 1 GB in one message: held whole,
/// a few agents selecting large values would hold gigabytes.
pub(super) const PASS_ON_MESSAGES_ABOVE: usize = 1 << 20;

/// The length of the message that starts `buf` (one not yet whole), if
/// it is longer than [`PASS_ON_MESSAGES_ABOVE`].
pub(super) fn large_message_ahead(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..5)?;
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    // A length out of bounds was refused when the message was split.
    let total = usize::try_from(len).ok()?.checked_add(1)?;
    (total > PASS_ON_MESSAGES_ABOVE && total <= wire::MAX_MESSAGE + 1).then_some(total)
}

/// The length of the message that starts `buf` (one not yet whole), if
/// it is one to pass on as it arrives (see [`PASS_ON_MESSAGES_ABOVE`]).
/// `in_flight`'s oldest request is the one it answers.
pub(super) fn message_passed_on_as_it_arrives(
    buf: &[u8],
    masks: &MaskSet,
    in_flight: &Mutex<InFlight>,
) -> Option<usize> {
    let total = large_message_ahead(buf)?;
    let guard = lock(in_flight);
    let head = guard.queue.front();
    // One that answers no request in flight is held whole, to be refused
    // as out of step (see `track_answer`).
    if !head.is_some_and(|head| answers(head, buf[0])) {
        return None;
    }
    let unmasked = match buf[0] {
        b'D' => !row_rewritten(head, masks),
        b'd' => masks.is_empty(),
        _ => false,
    };
    unmasked.then_some(total)
}

/// Memory in MiB that large server messages held whole while they arrive
/// (rows of sessions with masks, which are rewritten; any other message
/// over [`PASS_ON_MESSAGES_ABOVE`]) may take, all of a daemon's sessions
/// together (see [`HeldWholeBudget`]). Room for one of the largest
/// message PostgreSQL sends (1 GiB) at its share (see
/// [`HeldWholeBudget::take`]) and then some.
const HELD_WHOLE_MIB: u32 = 4 << 10;

/// How long a session waits for its share of the [`HeldWholeBudget`] before it is
/// closed: a wait without end (others' shares held by agents that read
/// slowly, or not at all) would hold the agent without telling it why.
pub(super) const HELD_WHOLE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// PostgreSQL's `out_of_memory`: what an agent is told when its value
/// could not be given memory in time (see [`HELD_WHOLE_WAIT`]).
pub(super) const SQLSTATE_OUT_OF_MEMORY: &str = "53200";

/// The memory large server messages held whole may take, one per daemon
/// (in [`crate::proxy::Shared`]), [`HELD_WHOLE_MIB`] by default. A session
/// whose message would take more waits for its share before it reads the
/// rest, so that many agents selecting large masked values hold the
/// daemon at this size instead of growing it until it runs out of memory.
/// The sessions of one identity hold at most a quarter of it together
/// (see [`SharedBudget`]).
pub struct HeldWholeBudget(SharedBudget);

impl Default for HeldWholeBudget {
    fn default() -> Self {
        HeldWholeBudget::new(HELD_WHOLE_MIB)
    }
}

impl HeldWholeBudget {
    pub fn new(total_mib: u32) -> Self {
        HeldWholeBudget(SharedBudget::new(total_mib))
    }

    /// Waits for the share of a message of `total` bytes that a session of
    /// `identity` receives: three times its size (the buffer it arrives in
    /// grows to up to twice its size, and a masked row is a copy), at most
    /// the whole budget. `None` only if the budget were closed, which it
    /// never is.
    pub(super) async fn take(&self, total: usize, identity: &str) -> Option<Share> {
        let mib = u32::try_from(total.saturating_mul(3).div_ceil(1 << 20)).unwrap_or(u32::MAX);
        self.0.take(mib, identity).await
    }

    #[cfg(test)]
    pub(super) fn available_mib(&self) -> usize {
        self.0.available()
    }
}

/// Counts a DataRow passed on as it arrives for the request it answers,
/// as [`track_answer`] counts one held whole. It is larger than a
/// recording keeps in all (`MAX_RECORDED_RESULT_BYTES`): a recording
/// counts it as left out.
pub(super) fn track_row_passed_on(in_flight: &Mutex<InFlight>, total: usize) {
    let mut guard = lock(in_flight);
    if let Some(head) = guard.queue.front_mut() {
        head.count_row(total);
        if let Some(recording) = head.recording.as_mut() {
            recording.leave_out();
        }
    }
}

/// Sends the message of `total` bytes that starts `buf` to the agent as
/// its bytes come from the server, holding a read's worth of it at a
/// time; what follows it stays in `buf`. While it does, the session is
/// marked as inside a message (`AgentWriter::mid_message`).
pub(super) async fn pass_on_as_it_arrives(
    upstream_rd: &mut ReadHalf<BoxedIo>,
    buf: &mut BytesMut,
    total: usize,
    client_wr: &ClientWriter,
) -> Result<(), WireError> {
    let mut client = client_wr.lock().await;
    client.mid_message = true;
    let mut left = total;
    loop {
        let piece = buf.split_to(left.min(buf.len()));
        left -= piece.len();
        client.io.write_all(&piece).await?;
        if left == 0 {
            break;
        }
        // Sent: its memory is the buffer's again.
        drop(piece);
        buf.reserve(READ_CHUNK);
        if upstream_rd.read_buf(buf).await? == 0 {
            return Err(WireError::Closed);
        }
    }
    client.io.flush().await?;
    client.mid_message = false;
    Ok(())
}

/// If `frame` is the server's report that a setting under which it reads
/// SQL text as tollgate does changed, why the session must end.
pub(super) fn reads_text_otherwise(frame: &Frame) -> Option<String> {
    let (setting, value) = text_reading_changed(frame)?;
    let (name, expected, family) = (setting.name, setting.value, setting.family);
    Some(format!(
        "tollgate: the server's {name} became {value} (rule {family}:{name}); \
         tollgate reads statements with {name} {expected} only, so the session is closed"
    ))
}

/// Ends the session from the server's side: the answers already built
/// (`out`, complete ones before the message that ends it) go to the agent
/// first, then the FATAL, under one hold of the writer; when the session
/// ends inside a message passed on as it arrives, the connection is shut
/// down without the FATAL instead. What of them the agent took is counted
/// in `handed_over`, so the outcomes record which were delivered.
pub(super) async fn close_after_built_answers(
    out: &[u8],
    handed_over: &mut usize,
    client_wr: &ClientWriter,
    in_flight: &Mutex<InFlight>,
    code: &str,
    message: &str,
) {
    let mut client = client_wr.lock().await;
    // Answers an agent does not read would hold the session here for good:
    // given up after the wait, they leave the connection inside a message
    // (`mid_message` stays set), so it is closed without the FATAL.
    let _ = tokio::time::timeout(FATAL_WRITE_WAIT, client.send_counted(out, handed_over)).await;
    lock(in_flight).closed_by = Some((code.to_string(), message.to_string()));
    if client.mid_message {
        // The session ended (its token expired) while a message was on
        // its way to the agent: a FATAL now would be read as the rest of
        // it. The connection is closed without one; the records of the
        // requests in flight say why.
        let _ = tokio::time::timeout(FATAL_WRITE_WAIT, client.io.shutdown()).await;
    } else {
        fatal(&mut client.io, code, message).await;
    }
}

pub(super) type Finished = Vec<(Pending, Outcome)>;

/// Outcome records of answered requests, written once the answers are on
/// their way to the agent: nothing waits on them, so they stay off the
/// latency. Whatever way the session ends, they are written (on drop);
/// answers still held then never reached the agent, and their records say
/// so. `submit` hands a record to the audit store.
pub(super) struct Outcomes<F: FnMut(AuditRecord)> {
    pub(super) answered: Finished,
    /// Where in the batch of answers being built each of `answered` ends
    /// (as many as have been added to the batch in full).
    pub(super) ends: Vec<usize>,
    /// How much of the batch the agent's connection has taken.
    pub(super) handed_over: usize,
    pub(super) submit: F,
}

impl<F: FnMut(AuditRecord)> Outcomes<F> {
    pub(super) fn new(submit: F) -> Self {
        Outcomes {
            answered: Finished::new(),
            ends: Vec::new(),
            handed_over: 0,
            submit,
        }
    }

    /// The answers finished so far are in the batch up to `end`.
    pub(super) fn answers_end_at(&mut self, end: usize) {
        let unplaced = self.answered.len().saturating_sub(self.ends.len());
        self.ends.extend(std::iter::repeat_n(end, unplaced));
    }

    /// Records the held answers as handed to the agent's connection.
    pub(super) fn sent(&mut self) {
        self.record(Delivery::Sent);
    }

    /// The connection took the batch's first `taken` bytes: the answers
    /// that end within them are recorded as handed to it; the others stay
    /// held (not delivered, if the session ends now).
    pub(super) fn sent_up_to(&mut self, taken: usize) {
        let whole = self.ends.iter().take_while(|&&end| end <= taken).count();
        self.record_first(whole, Delivery::Sent);
    }

    /// Records every held answer; the next batch starts.
    pub(super) fn record(&mut self, delivery: Delivery) {
        self.record_first(self.answered.len(), delivery);
        self.handed_over = 0;
    }

    pub(super) fn record_first(&mut self, n: usize, delivery: Delivery) {
        self.ends.drain(..n.min(self.ends.len()));
        for (pending, ended) in self.answered.drain(..n) {
            if let Some(outcome) = outcome_record(pending, ended, delivery) {
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
pub(super) enum Delivery {
    Sent,
    /// The server answered, but the session ended (the agent's connection
    /// failed, a record could not be written, the session was torn down)
    /// before the answer was sent on: the statement ran, the agent did not
    /// see how.
    NotSent,
}

/// Longest server message an outcome row keeps (PostgreSQL echoes the
/// offending value in some errors, however long it is).
pub(super) const MAX_SERVER_MESSAGE: usize = 64 * 1024;

/// Longest statement text an outcome row repeats (see `outcome_record`).
pub(super) const MAX_OUTCOME_TEXT: usize = 1 << 20;

/// `text` cut to at most `max` bytes on a character boundary, saying so.
pub(super) fn capped(text: String, max: usize) -> String {
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
pub(super) fn track_answer(
    masks: &MaskSet,
    in_flight: &Mutex<InFlight>,
    frame: &Frame,
    finished: &mut Finished,
) -> Result<Option<BytesMut>, WireError> {
    // A notification's payload is whatever a trigger or another session
    // put there (`pg_notify('c', email)`): a masked caller gets the
    // channel, not the payload.
    if frame.tag == b'A' && !masks.is_empty() {
        return Ok(Some(wire::notification_without_payload(frame).ok_or_else(
            || WireError::Malformed("NotificationResponse without a channel".into()),
        )?));
    }
    let mut masked_row = None;
    let mut guard = lock(in_flight);
    let InFlight {
        queue,
        statements,
        portals,
        copy_in,
        server_skipping,
        implicit,
        ..
    } = &mut *guard;
    let Some(head) = queue.front_mut() else {
        // With no request in flight only what the server may send at any
        // time can come (an error that ends the session, a notice);
        // anything else means the answers and the requests are out of step.
        if !matches!(frame.tag, b'E' | b'N' | b'S' | b'A') {
            return Err(WireError::Malformed(format!(
                "the server sent {:?} with no request in flight",
                frame.tag as char
            )));
        }
        return Ok(None);
    };
    // Each answer is judged against the request it answers (masked,
    // counted, recorded): one that cannot answer the oldest request in
    // flight means the two are out of step, and every later answer would
    // be judged against the wrong request.
    if !answers(head, frame.tag) {
        return Err(WireError::Malformed(format!(
            "the server sent {:?} where it answers a {:?}",
            frame.tag as char, head.kind
        )));
    }
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
        b'n' => {
            queue.pop_front();
        }
        b'T' if !masks.is_empty() && head.kind == Kind::Query => {
            head.result_mask = Some(mask::plan(frame, masks, head.reads_masked)?);
        }
        b'D' => {
            head.count_row(frame.bytes.len());
            if row_rewritten(Some(head), masks) {
                let plan = head.result_mask.get_or_insert_with(ResultMask::everything);
                masked_row = Some(mask::apply(frame, plan)?);
                // Every row of a result names the same columns: copied
                // once, not per row.
                for name in &plan.names {
                    if !head.masked_columns.contains(name) {
                        head.masked_columns.insert(name.clone());
                    }
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
            head.completed = true;
            if frame.tag == b'C' {
                head.tag_rows = Some(
                    head.tag_rows.unwrap_or(0) + wire::command_complete_rows(frame).unwrap_or(0),
                );
            }
            if head.kind == Kind::Execute {
                if let Some(done) = queue.pop_front() {
                    implicit.completed(done, finished);
                }
            } else if head.kind == Kind::Query && head.may_change_transaction {
                implicit.may_have_changed(finished);
            }
        }
        b'1' => {
            let generation = head.generation;
            if let Some((name, prepared)) = queue.pop_front().and_then(|p| p.parse) {
                statements.insert(name, (generation, prepared));
            }
        }
        b'2' => {
            let generation = head.portal_generation;
            if let Some((name, bound)) = queue.pop_front().and_then(|p| p.bind) {
                portals.insert(name, (generation, bound));
            }
        }
        b'3' => {
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
            let (code, message) = wire::error_fields(frame);
            let Some(InPlaceRefusal {
                code,
                message: refusal,
                ..
            }) = head
                .refusal
                .take_if(|refusal| message.contains(refusal.marker.as_str()))
            else {
                // The SQLSTATE only: the message may quote values the
                // agent only sees masked, and this goes to the log.
                return Err(WireError::Malformed(format!(
                    "expected the error of a refused request, the server sent SQLSTATE {code}"
                )));
            };
            // An error at the server all the same: it ends the pipeline's
            // implicit transaction.
            implicit.failed(&(code.clone(), refusal.clone()));
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
            head.copies_started += 1;
            let started = head.copies_started;
            // A Sync sent behind the statement before the client ended
            // this copy (copy data does not end it; an earlier copy of a
            // multi-statement Query's ending does not either) reached the
            // server in copy mode, which ignores it: it will get no
            // ReadyForQuery. So does each such Sync after it.
            while queue
                .get(1)
                .is_some_and(|p| p.kind == Kind::Sync && p.copies_ended_before < started)
            {
                queue.remove(1);
            }
        }
        b'E' => {
            let error = wire::error_fields(frame);
            if !masks.is_empty() {
                masked_row = if head.reads_masked {
                    Some(wire::redacted(
                        frame,
                        &format!(
                            "tollgate: the server's message is withheld because the statement reads masked columns (SQLSTATE {})",
                            error.0
                        ),
                    ))
                } else {
                    wire::without_row_values(frame)
                };
            }
            // An error ends a COPY FROM STDIN as well, and aborts the
            // pipeline's implicit transaction, wherever it comes (at the
            // Sync: the commit failed).
            *copy_in = false;
            implicit.failed(&error);
            match head.kind {
                Kind::Query => {
                    head.error = Some(error);
                    head.completed = true;
                }
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
                            finished.push((done, Outcome::failed(error)));
                        }
                    }
                    *server_skipping = !skip_to_sync(queue, finished);
                }
                Kind::Sync | Kind::RefusedExecute | Kind::RefusedQuery => {}
            }
        }
        b'Z' => {
            *copy_in = false;
            // A Query the server ran got at least one completion or error
            // before this: one that got none was never seen by the server.
            if head.kind == Kind::Query && !head.completed {
                return Err(WireError::Malformed(
                    "ReadyForQuery for a Query the server did not answer".into(),
                ));
            }
            // Nor a refused one whose stand-in's error has not come: the
            // ReadyForQuery is another request's (one the server answered
            // that nothing here waits for), and every later answer would
            // be taken for the one before it.
            if head.kind == Kind::RefusedQuery && head.refusal.is_some() {
                return Err(WireError::Malformed(
                    "ReadyForQuery for a refused Query before the error of its stand-in".into(),
                ));
            }
            // Outside a transaction block (idle, or failed) every portal
            // the protocol bound is gone: a later one of the same name
            // (a function's `OPEN` of a cursor by that name) is another.
            // (Not in a failed block: a ROLLBACK TO SAVEPOINT brings back
            // the portals bound before the savepoint.)
            let status = frame.bytes.get(5).copied();
            if status == Some(b'I') {
                portals.clear();
            }
            implicit.ended(status, finished);
            if let Some(done) = queue.pop_front() {
                if matches!(done.kind, Kind::Query | Kind::RefusedQuery) {
                    // A simple Query drops the unnamed statement and portal
                    // before it runs (the refusal marker is a Query too).
                    statements.remove("");
                    portals.remove("");
                }
                if done.kind == Kind::Query {
                    let ended = done
                        .error
                        .clone()
                        .map_or(Outcome::Succeeded, Outcome::failed);
                    finished.push((done, ended));
                }
            }
        }
        b'N' if !masks.is_empty() => {
            masked_row = if head.reads_masked {
                Some(wire::redacted(
                    frame,
                    "tollgate: the server's notice is withheld because the statement reads masked columns",
                ))
            } else {
                wire::without_row_values(frame)
            };
        }
        _ => {}
    }
    Ok(masked_row)
}

/// Whether the server message `tag` can be (part of) the answer to the
/// request `head`. Errors, notices, parameter changes and notifications
/// may come at any time.
fn answers(head: &Pending, tag: u8) -> bool {
    let kind = head.kind;
    match tag {
        b'E' | b'N' | b'S' | b'A' => true,
        b'Z' => matches!(kind, Kind::Query | Kind::Sync | Kind::RefusedQuery),
        b'1' => kind == Kind::Parse,
        b'2' => kind == Kind::Bind,
        b'3' => kind == Kind::Close,
        // ParameterDescription and NoData answer only a Describe.
        b't' | b'n' => kind == Kind::Describe,
        b'T' => matches!(kind, Kind::Query | Kind::Describe),
        // A COPY starts only for a statement tollgate saw to be a COPY of
        // that direction: one it missed would stream rows past masking, or
        // take client data tollgate would take for requests.
        b'G' | b'W' => matches!(kind, Kind::Query | Kind::Execute) && head.may_copy_in,
        b'H' => matches!(kind, Kind::Query | Kind::Execute) && head.may_copy_out,
        // Rows, completions and copy data answer what runs a statement.
        b'D' | b'C' | b'I' | b'd' | b'c' => matches!(kind, Kind::Query | Kind::Execute),
        b's' => kind == Kind::Execute,
        _ => false,
    }
}

/// What became of a finished request, as its outcome record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    Succeeded,
    /// The server's error (or tollgate's in its place): SQLSTATE and message.
    Failed {
        code: String,
        message: String,
    },
    /// Whether it took effect is not known (status unknown), for `reason`:
    /// a statement whose answer was lost may still have run. `code` is
    /// the SQLSTATE of the error that ended it, if one did.
    NotKnown {
        code: Option<String>,
        reason: String,
    },
}

impl Outcome {
    /// A server error's (SQLSTATE, message).
    pub(super) fn failed((code, message): (String, String)) -> Self {
        Outcome::Failed { code, message }
    }

    pub(super) fn not_known(reason: impl Into<String>) -> Self {
        Outcome::NotKnown {
            code: None,
            reason: reason.into(),
        }
    }
}

/// The outcome of a request the server skipped after an earlier error.
pub(super) fn not_executed() -> Outcome {
    Outcome::Failed {
        code: "25P02".into(),
        message: "not executed: an earlier message in the pipeline failed".into(),
    }
}

/// After an error in an extended-protocol pipeline the server skips every
/// message up to Sync: those Parses never happen, those Executes never run,
/// and a refusal's marker sent among them gets no answer (its refusal is
/// on record already).
/// Returns whether the client's Sync is already queued; if not, the server
/// goes on skipping what the client sends until it comes.
pub(super) fn skip_to_sync(queue: &mut Queue, finished: &mut Finished) -> bool {
    while queue.front().is_some_and(|p| p.kind != Kind::Sync) {
        if let Some(skipped) = queue.pop_front() {
            if matches!(skipped.kind, Kind::Execute | Kind::Query) {
                finished.push((skipped, not_executed()));
            }
        }
    }
    !queue.is_empty()
}

/// Writes the outcome record of a request. It follows the durable request
/// record, so the agent's answer does not wait for it.
pub(super) fn submit_outcome(session: &Session, outcome: AuditRecord) {
    // Lazy: the answer is already out; the outcome rides with the next
    // sync instead of costing the session's next statement a sync of its own.
    // Nothing waits on it: a waiting task would be one more wake-up per
    // statement. A batch that cannot be written is logged by the store.
    drop(session.shared.audit.submit_lazy(outcome));
}

/// The outcome record of a request, from its request record (none for
/// requests that have no record of their own, such as a Sync).
pub(super) fn outcome_record(
    pending: Pending,
    ended: Outcome,
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
    match ended {
        Outcome::Succeeded => outcome.status_id = record::status::SUCCESS,
        Outcome::Failed { code, message } => {
            outcome.status_id = record::status::FAILURE;
            outcome.response_error_code = capped(code, 64);
            outcome.status_detail = capped(message, MAX_SERVER_MESSAGE);
        }
        Outcome::NotKnown { code, reason } => {
            outcome.status_id = record::status::UNKNOWN;
            if let Some(code) = code {
                outcome.response_error_code = capped(code, 64);
            }
            outcome.status_detail = capped(reason, MAX_SERVER_MESSAGE);
        }
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
