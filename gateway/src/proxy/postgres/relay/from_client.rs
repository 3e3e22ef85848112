//! The agent's side of the relay: each frontend message is read, decided
//! (statements through [`admit`]) and queued in [`InFlight`] before it is
//! forwarded to the server. One method per message type.

use super::*;

/// Requests (statements, Syncs, Parse, Bind, ...) a session may have sent
/// and not yet had answered (see [`FromClient::wait_for_room_in_flight`]).
pub(super) const MAX_IN_FLIGHT: usize = 8192;

/// Bytes of statement text and parameters those requests may hold (a
/// request larger than this alone is still taken, and nothing after it
/// until it is answered).
pub(super) const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;

/// A Flush message: the server sends what answers it has buffered. Sent
/// when the client's messages wait for answers, since a server that has
/// not seen a Sync or Flush may keep its last answers (up to 8 KiB) to
/// itself while tollgate waits for them.
const FLUSH: &[u8] = b"H\0\0\0\x04";

/// Caps on what the audit keeps of bound parameters.
const MAX_PARAMETER_BYTES: usize = 256;
const MAX_PARAMETERS_BYTES: usize = 4096;

/// Reads the agent's messages until it terminates or the session breaks.
pub(super) async fn client_to_server(
    session: Arc<Session>,
    mut client_rd: ClientReader,
    mut buf: BytesMut,
    upstream_wr: WriteHalf<BoxedIo>,
    client_wr: ClientWriter,
    in_flight: Arc<Mutex<InFlight>>,
    answered: Arc<Notify>,
) -> Result<(), WireError> {
    let mut from_client = FromClient {
        session,
        upstream_wr,
        in_flight,
        answered,
        forward: BytesMut::new(),
        copies_ended: 0,
        skipping_to_sync: false,
        last_describe: None,
        answer_barrier: None,
        execute_may_change_settings_unseen: false,
        protocol_names: ProtocolNames::default(),
    };
    loop {
        match from_client.take_all(&mut buf).await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Terminated) => return Ok(()),
            Err(WireError::Malformed(reason)) => {
                from_client.end_on_malformed(&client_wr, &reason).await;
                return Err(WireError::Malformed(reason));
            }
            Err(err) => return Err(err),
        }
        // The forwarded messages share the read buffer's memory: they go
        // (and are let go) first, so the reserve below reuses that buffer
        // instead of allocating a fresh one for every read.
        from_client.send_admitted().await?;
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

/// What taking the client's messages so far leaves the session to do.
enum Flow {
    Continue,
    /// The client sent Terminate: the session is over.
    Terminated,
}

/// The state of the agent's side between messages. Prepared statements
/// are classified once, at Parse; statements and portals exist for
/// tollgate once the server confirms them (see [`InFlight::resolve`]).
struct FromClient {
    session: Arc<Session>,
    upstream_wr: WriteHalf<BoxedIo>,
    in_flight: Arc<Mutex<InFlight>>,
    /// Signalled whenever server answers have been taken off the queue.
    answered: Arc<Notify>,
    /// Messages admitted and not yet sent to the server.
    forward: BytesMut,
    /// Copies the client ended (CopyDone or CopyFail) since the last
    /// Execute or Query (a multi-statement Query may run several): a Sync
    /// counts them (see `Pending::copies_ended_before`). Copy data alone
    /// does not end one: a Sync behind it still goes into the copy.
    copies_ended: u32,
    /// After a refused Execute, the rest of the pipeline up to Sync is
    /// dropped, as PostgreSQL itself does after an error.
    skipping_to_sync: bool,
    /// The last Describe sent (kind 'S' or 'P', name), until an Execute.
    last_describe: Option<(u8, String)>,
    /// A request whose answer the client's next message waits for, so
    /// that the server reads that message as tollgate read it:
    /// - a Query, or the Sync after an Execute, that may change the client
    ///   encoding where tollgate cannot see it (a function it cannot look
    ///   into, text it cannot parse): the server would read the messages
    ///   pipelined behind it in the new encoding, before the server's
    ///   report of the change (which comes before the answer) ends the
    ///   session;
    /// - a Query or Execute of COPY FROM STDIN (or of text tollgate cannot
    ///   parse): until the server says it takes copy data (CopyInResponse)
    ///   or answers otherwise, a message behind it could be taken by the
    ///   server as copy data while tollgate takes it for a request, or
    ///   thrown away with an error (PostgreSQL 13 and older) while tollgate
    ///   waits for its answer: either way the answers would no longer
    ///   match tollgate's requests, and masking would be planned against
    ///   the wrong statement.
    answer_barrier: Option<u64>,
    /// A Bind or Execute since the last Sync may change settings unseen
    /// (the encoding, standard_conforming_strings; a Bind by what planning
    /// evaluates): the Sync becomes the barrier, since the server reports
    /// the change there.
    execute_may_change_settings_unseen: bool,
    /// The names of the portals and statements the client made through the
    /// protocol, which SQL's FETCH and EXECUTE could run.
    protocol_names: ProtocolNames,
}

/// Most names of each kind [`ProtocolNames`] keeps; past them, any SQL
/// FETCH or EXECUTE is refused, since its name may be one not kept.
const MAX_PROTOCOL_NAMES: usize = 10_000;

/// Names of portals and prepared statements made through the protocol in
/// a session (not forgotten when closed: a later SQL cursor of the same
/// name is refused too, which costs little).
#[derive(Default)]
struct ProtocolNames {
    portals: std::collections::HashSet<String>,
    statements: std::collections::HashSet<String>,
    overflowed: bool,
}

impl ProtocolNames {
    fn note(set: &mut std::collections::HashSet<String>, overflowed: &mut bool, name: &str) {
        if name.is_empty() || set.contains(name) {
            return;
        }
        if set.len() >= MAX_PROTOCOL_NAMES {
            *overflowed = true;
            return;
        }
        set.insert(name.to_owned());
    }

    fn note_portal(&mut self, name: &str) {
        Self::note(&mut self.portals, &mut self.overflowed, name);
    }

    fn note_statement(&mut self, name: &str) {
        Self::note(&mut self.statements, &mut self.overflowed, name);
    }

    /// What in `operations` SQL runs by a name the protocol may have used.
    /// Text tollgate cannot parse may run one too, once the protocol has
    /// made any.
    fn run_in<'a>(&self, operations: &'a Result<Vec<Operation>, String>) -> Option<RunOf<'a>> {
        let ops = match operations {
            Ok(ops) => ops,
            Err(_) => {
                // Text the parser cannot read may run one without saying
                // fetch (`cursor_to_xml('p', ...)`, a `DO` block, an escape
                // string spelling the word): once the protocol made any,
                // none of it goes.
                let made_any =
                    self.overflowed || !self.portals.is_empty() || !self.statements.is_empty();
                return made_any.then_some(RunOf::Unparsed);
            }
        };
        ops.iter()
            .flat_map(|op| &op.runs_by_name)
            .find(|run| {
                self.overflowed
                    || match run {
                        RunByName::Portal(name) => self.portals.contains(name),
                        RunByName::Statement(name) => self.statements.contains(name),
                    }
            })
            .map(RunOf::Named)
    }
}

impl FromClient {
    /// Takes every whole message in `buf`, in order. A malformed one ends
    /// the session (see [`FromClient::end_on_malformed`]), after what came
    /// before it.
    async fn take_all(&mut self, buf: &mut BytesMut) -> Result<Flow, WireError> {
        while let Some(frame) = wire::split_frame_limited(buf, wire::MAX_CLIENT_MESSAGE)? {
            self.wait_for_room_in_flight().await?;
            if let Some(id) = self.answer_barrier.take() {
                // Until its whole answer has come (or the server waits for
                // COPY data, which only the client can send). The server
                // keeps an Execute's answer until a Sync or Flush, which
                // the client may only send after what waits here.
                self.forward.extend_from_slice(FLUSH);
                self.resolve(|f| match f.copy_in || !f.queue.iter().any(|p| p.id == id) {
                    true => Resolved::Known(Some(())),
                    false => Resolved::WaitFor(id),
                })
                .await?;
            }
            if let Flow::Terminated = self.take(frame).await? {
                return Ok(Flow::Terminated);
            }
        }
        Ok(Flow::Continue)
    }

    /// Holds the client's next message while [`MAX_IN_FLIGHT`] requests
    /// wait for their answers, or while those hold [`MAX_IN_FLIGHT_BYTES`]
    /// of text: each holds its record, and a client that
    /// pipelines without reading its answers would otherwise grow the
    /// session's memory by a kilobyte or more for every few bytes it sends
    /// (a Sync is five), as far as the sockets' buffers let it. Unread
    /// client bytes stay in the client's socket: its sends block, as with
    /// the server itself.
    ///
    /// The queue drains while the client waits: messages taken so far go
    /// to the server first, with a Flush, so the server sends every answer
    /// it has (without one it keeps up to 8 KiB of them until a Sync,
    /// which the client may only send after what waits here). While the
    /// server skips to the next Sync after an error, or takes COPY data,
    /// what comes is not queued: nothing to wait for.
    async fn wait_for_room_in_flight(&mut self) -> Result<(), WireError> {
        // An empty queue always has room: there is no answer to wait for.
        let has_room = |f: &InFlight| {
            (f.queue.len() < MAX_IN_FLIGHT && f.queue.held_bytes < MAX_IN_FLIGHT_BYTES)
                || f.queue.is_empty()
                || f.server_skipping
                || f.copy_in
        };
        if has_room(&lock(&self.in_flight)) {
            return Ok(());
        }
        self.forward.extend_from_slice(FLUSH);
        self.resolve(|f| match has_room(f) {
            true => Resolved::Known(Some(())),
            false => Resolved::WaitFor(f.queue.front().map_or(0, |oldest| oldest.id)),
        })
        .await
        .map(|_| ())
    }

    async fn take(&mut self, frame: Frame) -> Result<Flow, WireError> {
        if self.skipping_to_sync && frame.tag != b'S' {
            return Ok(Flow::Continue);
        }
        // One look at the server's state per message.
        let (server_skipping, copy_in) = {
            let state = lock(&self.in_flight);
            (state.server_skipping, state.copy_in)
        };
        if frame.tag != b'S' && server_skipping {
            return Ok(Flow::Continue);
        }
        if copy_in {
            self.in_copy_in(frame)?;
            return Ok(Flow::Continue);
        }
        match frame.tag {
            b'Q' => self.query(frame).await?,
            b'F' => self.function_call(frame).await,
            b'P' => self.parse(frame).await?,
            b'B' => self.bind(frame).await?,
            b'E' => self.execute(frame).await?,
            b'S' => {
                no_body(&frame, "Sync")?;
                self.sync(frame)
            }
            b'C' => self.close(frame)?,
            b'D' => self.describe(frame).await?,
            b'X' => {
                self.forward.unsplit(frame.bytes);
                self.send_admitted().await?;
                let _ = self.upstream_wr.shutdown().await;
                return Ok(Flow::Terminated);
            }
            b'd' | b'c' | b'f' => self.copy_data(frame),
            // Flush carries no statement of its own.
            b'H' => {
                no_body(&frame, "Flush")?;
                self.forward.unsplit(frame.bytes)
            }
            // Anything else is not a frontend message of protocol 3.0 after
            // startup: the stream cannot be trusted to be in step.
            other => {
                return Err(WireError::Malformed(format!(
                    "unexpected message {:?} from the client",
                    other as char
                )));
            }
        }
        Ok(Flow::Continue)
    }

    /// While the server takes COPY FROM STDIN data, only the COPY
    /// sub-protocol (and Flush, Sync) may come.
    fn in_copy_in(&mut self, frame: Frame) -> Result<(), WireError> {
        match frame.tag {
            b'd' => {}
            b'H' => no_body(&frame, "Flush")?,
            // The server ignores a Sync in COPY FROM STDIN, but only while
            // it is still copying: one it reads after the copy failed (on
            // a bad row sent just before it, whose error is not yet seen
            // here) would get a ReadyForQuery nothing here waits for, and
            // every later answer would be taken for the request before its
            // own. Not sent on, then: where the server copies, it would
            // have ignored it; where the copy failed, the server takes the
            // client's next Sync, after its CopyDone or CopyFail, as it
            // would in any pipeline after an error.
            b'S' => return Ok(()),
            b'c' | b'f' => {
                self.copies_ended += 1;
                let mut in_flight = lock(&self.in_flight);
                in_flight.copy_in = false;
                // The request the copy belongs to may start another (a Query
                // of two COPY FROM STDIN): what the client sends next waits
                // again, for that one to start or for the request's end.
                self.answer_barrier = in_flight
                    .queue
                    .front()
                    .filter(|p| matches!(p.kind, Kind::Query | Kind::Execute))
                    .map(|p| p.id);
            }
            other => {
                return Err(WireError::Malformed(format!(
                    "message {:?} in the middle of COPY FROM STDIN",
                    other as char
                )));
            }
        }
        self.forward.unsplit(frame.bytes);
        Ok(())
    }

    /// A simple Query: decided here, as a whole.
    async fn query(&mut self, frame: Frame) -> Result<(), WireError> {
        // Like an Execute, a Query may start a COPY FROM STDIN: whether a
        // Sync behind it follows the copy's end counts from here.
        self.copies_ended = 0;
        let text = wire::query_text(&frame).map_err(in_message("Query"))?;
        // As for a Parse.
        let unsure = match self.execute_may_change_settings_unseen {
            true => refusal_while_reading_unsure(&self.session, &text).await,
            false => None,
        };
        if let Some(refusal) = unsure {
            self.refuse_in_place(Kind::RefusedQuery, refusal);
            return Ok(());
        }
        let operations = classify_within_limit(&self.session, &text).await;
        if let Some(run) = self.protocol_names.run_in(&operations) {
            let refusal = refusal_of_run_by_name(&self.session, &text, &operations, run).await;
            self.refuse_in_place(Kind::RefusedQuery, refusal);
            return Ok(());
        }
        let judged = judge(&self.session, &operations);
        match admit(&self.session, &text, &operations, &judged, String::new()).await {
            Ok(admitted) => {
                let pending = admitted.into_pending(Kind::Query, &judged);
                let mut guard = lock(&self.in_flight);
                if let Some(skipped) = guard.push(pending) {
                    drop(guard);
                    record_skipped(&self.session, skipped);
                    return Ok(());
                }
                guard.note_renames(&operations, judged.may_reopen_cursors, None);
                if judged.may_change_settings_unseen || judged.may_copy_in {
                    self.answer_barrier = guard.queue.back().map(|p| p.id);
                }
                drop(guard);
                self.forward.unsplit(frame.bytes);
            }
            Err(refusal) => self.refuse_in_place(Kind::RefusedQuery, refusal),
        }
        Ok(())
    }

    /// Refuses in place (see [`refusal_of_run_by_name`]) a prepared
    /// statement that runs by name a portal or statement the protocol made;
    /// whether it did. Checked at its Parse, Bind and Execute: the name may
    /// have been made since the Parse.
    async fn refused_as_run_by_name(&mut self, prepared: &Prepared) -> bool {
        // A portal or statement tollgate could not tie to what it saw has
        // no text: it is decided as not understood, on its own terms.
        if prepared.text.is_empty() {
            return false;
        }
        let Some(run) = self.protocol_names.run_in(&prepared.operations) else {
            return false;
        };
        let refusal =
            refusal_of_run_by_name(&self.session, &prepared.text, &prepared.operations, run).await;
        self.refuse_extended_in_place(refusal);
        true
    }

    /// FunctionCall runs a server function by OID with no SQL for the
    /// policy to read (lo_import, pg_read_file, ...): always refused.
    async fn function_call(&mut self, frame: Frame) {
        let refusal = refuse_function_call(&self.session, &frame).await;
        self.refuse_in_place(Kind::RefusedQuery, refusal);
    }

    /// A Parse is classified once; its statement is decided at each
    /// Execute of a portal bound to it. One policy denies whatever its
    /// parameters is refused here already: once parsed, the server would
    /// run it for SQL's `EXECUTE name` too (protocol and SQL prepared
    /// statements share one namespace), which is no Execute of tollgate's.
    async fn parse(&mut self, frame: Frame) -> Result<(), WireError> {
        let (name, text, parameter_types) =
            wire::parse_message(&frame).map_err(in_message("Parse"))?;
        // An Execute before it in the pipeline may have changed how the
        // server reads text (see `refusal_while_reading_unsure`).
        let unsure = match self.execute_may_change_settings_unseen {
            true => refusal_while_reading_unsure(&self.session, &text).await,
            false => None,
        };
        if let Some(refusal) = unsure {
            self.refuse_extended_in_place(refusal);
            return Ok(());
        }
        let prepared = Arc::new(Prepared::new(&self.session, text, parameter_types).await);
        if self.refused_as_run_by_name(&prepared).await {
            return Ok(());
        }
        if let Some(refusal) = refusal_before_execute(&self.session, &prepared, "").await {
            self.refuse_extended_in_place(refusal);
            return Ok(());
        }
        self.protocol_names.note_statement(&name);
        let mut parse = Pending::new(Kind::Parse, None);
        // Its errors may quote the statement's constants, as any of the
        // statement's own errors may.
        parse.reads_masked = prepared.judged.reads_masked;
        parse.parse = Some((name, prepared));
        self.forward_unless_skipped(parse, frame);
        Ok(())
    }

    async fn bind(&mut self, frame: Frame) -> Result<(), WireError> {
        let (portal, statement) = wire::bind_message(&frame).map_err(in_message("Bind"))?;
        // The portal runs the statement as the server will find it: a later
        // Parse of the same name does not change it.
        let prepared = self
            .resolve(|f| f.statement(&statement))
            .await?
            .unwrap_or_else(|| Arc::new(Prepared::unknown(&self.session)));
        let parameters = wire::bind_parameters_rendered(
            &frame,
            &prepared.parameter_types,
            MAX_PARAMETER_BYTES,
            MAX_PARAMETERS_BYTES,
        )
        .map_err(in_message("Bind"))?;
        // A portal or statement the protocol made since this statement's
        // Parse may be what it runs by name.
        if self.refused_as_run_by_name(&prepared).await {
            return Ok(());
        }
        if let Some(refusal) = refusal_before_execute(&self.session, &prepared, &parameters).await {
            self.refuse_extended_in_place(refusal);
            return Ok(());
        }
        let mut bind = Pending::new(Kind::Bind, None);
        // The server plans the statement at Bind, evaluating immutable
        // functions of constants: their errors and notices are the
        // statement's, and redacted as its own are.
        bind.reads_masked = prepared.judged.reads_masked;
        // Planning folds immutable functions of constants (and estimates
        // with stable ones): a Bind alone may change settings, as an
        // Execute may.
        self.execute_may_change_settings_unseen |= prepared.judged.may_change_settings_unseen;
        // A function may reopen cursors there too: the portals bound before
        // it are no longer trusted (this one is bound after).
        if prepared.judged.may_reopen_cursors_when_planned {
            lock(&self.in_flight).note_cursors_reopened(None);
        }
        self.protocol_names.note_portal(&portal);
        bind.bind = Some((portal, (prepared, parameters)));
        self.forward_unless_skipped(bind, frame);
        Ok(())
    }

    /// An Execute: the bound statement is decided here, with its
    /// parameters.
    async fn execute(&mut self, frame: Frame) -> Result<(), WireError> {
        let portal = wire::execute_portal(&frame).map_err(in_message("Execute"))?;
        self.copies_ended = 0;
        let (prepared, parameters) = self
            .resolve(|f| f.portal(&portal))
            .await?
            .unwrap_or_else(|| (Arc::new(Prepared::unknown(&self.session)), String::new()));
        // As at its Bind: a name may have been made since.
        if self.refused_as_run_by_name(&prepared).await {
            return Ok(());
        }
        let admitted = admit(
            &self.session,
            &prepared.text,
            &prepared.operations,
            &prepared.judged,
            parameters,
        )
        .await;
        let admitted = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => {
                self.refuse_extended_in_place(refusal);
                return Ok(());
            }
        };
        let pending = admitted.into_pending(Kind::Execute, &prepared.judged);
        let described = matches!(
            self.last_describe.take(),
            Some((b'P', described)) if described == portal
        );
        let mut guard = lock(&self.in_flight);
        // The RowDescription that plans this Execute's masking answers the
        // Describe just before it.
        if described {
            if let Some(describe) = guard.queue.back_mut().filter(|p| p.kind == Kind::Describe) {
                describe.describes_next_execute = true;
            }
        }
        if let Some(skipped) = guard.push(pending) {
            drop(guard);
            record_skipped(&self.session, skipped);
            return Ok(());
        }
        guard.note_renames(
            &prepared.operations,
            prepared.judged.may_reopen_cursors,
            Some(&portal),
        );
        if prepared.judged.may_copy_in {
            self.answer_barrier = guard.queue.back().map(|p| p.id);
        }
        drop(guard);
        self.execute_may_change_settings_unseen |= prepared.judged.may_change_settings_unseen;
        self.forward.unsplit(frame.bytes);
        Ok(())
    }

    fn sync(&mut self, frame: Frame) {
        self.skipping_to_sync = false;
        let mut sync = Pending::new(Kind::Sync, None);
        sync.copies_ended_before = self.copies_ended;
        let mut guard = lock(&self.in_flight);
        guard.server_skipping = false;
        // A Sync is always queued (see `InFlight::push`).
        let _ = guard.push(sync);
        // The server reports a changed encoding at the Sync.
        if std::mem::take(&mut self.execute_may_change_settings_unseen) {
            self.answer_barrier = guard.queue.back().map(|p| p.id);
        }
        drop(guard);
        self.forward.unsplit(frame.bytes);
    }

    fn close(&mut self, frame: Frame) -> Result<(), WireError> {
        let (kind, name) = wire::close_message(&frame).map_err(in_message("Close"))?;
        let mut close = Pending::new(Kind::Close, None);
        close.close = Some((kind, name));
        self.forward_unless_skipped(close, frame);
        Ok(())
    }

    async fn describe(&mut self, frame: Frame) -> Result<(), WireError> {
        let described = wire::close_message(&frame).map_err(in_message("Describe"))?;
        // A portal's Describe waits where an Execute of it would (behind a
        // Sync or Query that may end it: see `InFlight::resolve`), so that
        // the Execute right after it does not wait: a wait between the two
        // would let the Describe be answered before the Execute is queued,
        // and its RowDescription then plans nothing (the rows are masked
        // whole).
        if described.0 == b'P' {
            self.resolve(|f| f.portal(&described.1)).await?;
        }
        // Which result shape the next RowDescription belongs to: only a
        // Describe of the portal about to be executed may plan that
        // Execute's masking.
        self.last_describe = Some(described);
        self.forward_unless_skipped(Pending::new(Kind::Describe, None), frame);
        Ok(())
    }

    /// The COPY sub-protocol outside COPY FROM STDIN: the server ignores
    /// it, or it ends a COPY the server has not started yet.
    fn copy_data(&mut self, frame: Frame) {
        if frame.tag != b'd' {
            self.copies_ended += 1;
            lock(&self.in_flight).copy_ended_early();
        }
        self.forward.unsplit(frame.bytes);
    }

    /// Puts a refused request's refusal in its place: a stand-in named by
    /// the marker that the server rejects with an error there (for
    /// `RefusedQuery` a Query that cannot parse, answered by an error and
    /// ReadyForQuery; for `RefusedExecute` an Execute of a portal that
    /// cannot exist), everything sent before it answered first; tollgate
    /// puts its refusal in place of that error. Nothing waits, so a
    /// pipeline the client has not synced cannot hang the session.
    fn refuse_in_place(&mut self, kind: Kind, refusal: Refusal) {
        let mut pending = Pending::new(kind, None);
        let marker = refusal_marker();
        pending.refusal = Some(InPlaceRefusal {
            code: refusal.code,
            message: refusal.message,
            marker: marker.clone(),
        });
        // The refusal is recorded either way; a server skipping to Sync
        // would not have answered the request (see `InFlight::push`).
        if lock(&self.in_flight).push(pending).is_none() {
            match kind {
                Kind::RefusedExecute => wire::execute(&mut self.forward, &marker),
                _ => wire::query(&mut self.forward, &marker),
            }
        }
    }

    /// Puts a refused Bind or Execute's refusal in its place; the server
    /// then skips to Sync, as after any error.
    fn refuse_extended_in_place(&mut self, refusal: Refusal) {
        self.refuse_in_place(Kind::RefusedExecute, refusal);
        // The server skips to Sync after the marker's error; so does
        // tollgate, which neither decides nor audits what would be
        // skipped.
        self.skipping_to_sync = true;
    }

    /// Queues a message that carries no statement of its own (Parse, Bind,
    /// Describe, Close) and sends it on, unless the server, skipping to
    /// Sync, would ignore it (see `InFlight::push`).
    fn forward_unless_skipped(&mut self, pending: Pending, frame: Frame) {
        if lock(&self.in_flight).push(pending).is_none() {
            self.forward.unsplit(frame.bytes);
        }
    }

    /// Sends what was admitted and lets its memory go.
    async fn send_admitted(&mut self) -> Result<(), WireError> {
        let forward = std::mem::take(&mut self.forward);
        if !forward.is_empty() {
            send_all(&mut self.upstream_wr, &forward)
                .await
                .map_err(upstream_write_failed)?;
        }
        Ok(())
    }

    /// Resolves a statement or portal name (see [`InFlight::resolve`]).
    /// When an earlier pipeline's Parse, Bind or Close of it is unanswered,
    /// or (for a portal) a Sync or simple Query sent since, what is
    /// admitted goes to the server (a Sync follows that message, or it is
    /// one, or a Query: the server answers without a Flush) and the
    /// client's messages wait for that answer.
    async fn resolve<T>(
        &mut self,
        lookup: impl Fn(&InFlight) -> Resolved<Option<T>>,
    ) -> Result<Option<T>, WireError> {
        loop {
            let notified = self.answered.notified();
            let waiting_for = match lookup(&lock(&self.in_flight)) {
                Resolved::Known(found) => return Ok(found),
                Resolved::WaitFor(id) => id,
            };
            if !self.forward.is_empty() {
                send_all(&mut self.upstream_wr, &self.forward)
                    .await
                    .map_err(upstream_write_failed)?;
                self.forward.clear();
            }
            if lock(&self.in_flight)
                .queue
                .iter()
                .any(|p| p.id == waiting_for)
            {
                notified.await;
            }
        }
    }

    /// A message the client sent cannot be read as one of protocol 3.0
    /// (cut short, not UTF-8, too long, unknown, or out of place): the
    /// stream can no longer be trusted to be in step. What the client sent
    /// before it was admitted and goes on to the server, as the server
    /// itself would run it; the refusal is recorded (durably, before the
    /// client hears of it), and the session ends with FATAL 08P01. Requests
    /// still in flight are recorded with that reason when the session ends.
    async fn end_on_malformed(&mut self, client_wr: &ClientWriter, reason: &str) {
        let _ = self.send_admitted().await;
        let mut record = new_statement_record(&self.session, record::datastore_activity::QUERY);
        mark_refused(
            &mut record,
            "protocol:malformed",
            &format!("malformed message from the client: {reason}"),
        );
        if let Err(err) = self.session.shared.audit.append(record).await {
            warn!(error = %err, "the refusal of a malformed message could not be audited");
        }
        fatal_to_client(
            client_wr,
            &self.in_flight,
            SQLSTATE_PROTOCOL,
            &format!("tollgate: {reason}; the session is closed"),
        )
        .await;
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

/// A write to the target that failed: the connection to it is lost,
/// which the reader of the target's side tells the agent and puts on
/// record (see `relay::run`).
#[derive(Debug, thiserror::Error)]
#[error("writing to the target failed: {0}")]
pub(super) struct UpstreamWriteFailed(std::io::Error);

fn upstream_write_failed(err: std::io::Error) -> WireError {
    WireError::Io(std::io::Error::new(err.kind(), UpstreamWriteFailed(err)))
}

/// Records the outcome of an admitted Query or Execute that came after an
/// error the server skips to Sync from: it was not sent, as the server
/// would not have run it.
fn record_skipped(session: &Session, skipped: Pending) {
    if let Some(outcome) = outcome_record(skipped, not_executed(), Delivery::Sent) {
        submit_outcome(session, outcome);
    }
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

/// Refuses a message that has a body where protocol 3.0 gives it none.
/// The server answers such a Flush with an error, and in an extended-query
/// pipeline then skips to the next Sync: an error and a skip nothing here
/// expects, after which answers would be matched to the wrong requests
/// (and masked, or not, as those requests are).
fn no_body(frame: &Frame, name: &str) -> Result<(), WireError> {
    match frame.body().is_empty() {
        true => Ok(()),
        false => Err(WireError::Malformed(format!(
            "{name} message with a body ({} bytes): it has none",
            frame.body().len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What may change how the server reads later text without a call in
    /// its own text: a function call, and a FETCH, EXECUTE or CALL, which
    /// run code the text does not show.
    #[test]
    fn statements_that_run_unseen_code_may_change_the_encoding_unseen() {
        for sql in [
            "SELECT app.f()",
            "FETCH ALL FROM c",
            "EXECUTE s",
            "CALL p()",
            "EXPLAIN ANALYZE EXECUTE s",
        ] {
            assert!(may_change_settings_unseen(&classify(sql)), "{sql}");
        }
        for sql in ["SELECT 1", "SELECT id FROM customers", "BEGIN"] {
            assert!(!may_change_settings_unseen(&classify(sql)), "{sql}");
        }
    }

    /// Text the parser cannot read (MOVE, `cursor_to_xml('p', ...)`, a
    /// DO block) may run a portal the protocol made: once the protocol has
    /// made any, it counts as doing so.
    #[test]
    fn unparsed_text_counts_as_a_run_once_the_protocol_made_a_name() {
        let unparsed: Result<Vec<Operation>, String> = Err("not understood".into());
        let mut names = ProtocolNames::default();
        assert!(names.run_in(&unparsed).is_none(), "no name made yet");
        names.note_portal("p");
        assert!(names.run_in(&unparsed).is_some());
        // Parsed, a name is judged by what the statement names.
        assert!(names.run_in(&classify("FETCH ALL FROM p")).is_some());
        assert!(names.run_in(&classify("FETCH ALL FROM q")).is_none());
        assert!(names.run_in(&classify("SELECT 1")).is_none());
    }
}
