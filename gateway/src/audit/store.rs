//! The running store: a WAL writer thread (group commit) and a segment
//! thread (Parquet, manifest, checkpoints, retention).
//!
//! Both are OS threads rather than tokio tasks because all their work is
//! blocking file I/O (write, fdatasync, rename); async callers only wait on
//! a oneshot.

use std::{
    borrow::Borrow,
    fs, io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc::{self, RecvTimeoutError},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::{
    checkpoint::{self, Signer},
    fsutil::{self, Perms},
    manifest::{
        self, Entry, Manifest, ManifestAppender, RemovedSegment, RetentionEntry, SegmentEntry,
    },
    merkle, segment, wal, AuditConfig, AuditError, AuditRecord, GENESIS_HASH,
};

/// Most records one group commit takes; bounds the latency of the batch.
const MAX_BATCH: usize = 8192;
/// See [`Writer::write_durably`].
const PLAIN_SWITCH: u64 = 1 << 20;
/// How often the writer thread looks for a segment to cut on age while
/// inline writers (`buffered` durability) fill the buffer.
const INLINE_CUT_CHECK: Duration = Duration::from_millis(250);
/// How often a failed segment write is retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How far back the wall clock may step (NTP, a boot before the clock is
/// set) while checkpoints keep the last signed time (see
/// `SegState::last_checkpoint_ms`).
const MAX_CLOCK_STEP_BACK_MS: i64 = 3_600_000;
/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

// Records travel boxed from the caller to the segment: a record is over a
// kilobyte of fields, and moved by value it was copied at every hand-over
// (channel, batch, buffer), the largest cost of the writer thread.
pub(crate) enum Msg {
    Append(Pending, oneshot::Sender<Result<u64, AuditError>>),
    /// A record nobody waits on to act: it rides with the next sync
    /// instead of forcing one (see [`LAZY_WAIT`]).
    AppendLazy(Pending, oneshot::Sender<Result<u64, AuditError>>),
    Shutdown(oneshot::Sender<()>),
}

/// A record on its way to the WAL, already encoded by the caller (see
/// [`wal::PreparedFrame`]): the writer, which chains records one at a
/// time, is left with the least work per record.
pub(crate) struct Pending {
    record: Box<AuditRecord>,
    frame: wal::PreparedFrame,
}

impl Pending {
    /// Encodes `record`; refuses one too large for the WAL to read back.
    pub fn new(mut record: AuditRecord) -> Result<Self, AuditError> {
        let frame = wal::PreparedFrame::new(&record);
        if !frame.fits() {
            return Err(AuditError::TooLarge {
                bytes: frame.payload_len(),
                limit: wal::MAX_PAYLOAD,
            });
        }
        // The writer fills in both hashes (64 hex digits each): their
        // memory is allocated here, on the caller's thread, so that the
        // one thread all records pass through only copies into it.
        record.prev_record_hash = String::with_capacity(64);
        record.record_hash = String::with_capacity(64);
        Ok(Pending {
            record: Box::new(record),
            frame,
        })
    }
}

/// `s` becomes the lower-case hex of `hash`, in the memory `s` already
/// has (see [`Pending::new`]).
fn set_hex(s: &mut String, hash: &[u8; 32]) {
    let mut digits = [0u8; 64];
    // 64 bytes are exactly room for 32 bytes in hex: it cannot fail.
    let _ = hex::encode_to_slice(hash, &mut digits);
    s.clear();
    // Hex digits are ASCII: always UTF-8.
    s.push_str(std::str::from_utf8(&digits).unwrap_or_default());
}

/// How long a batch of only lazy records waits for an urgent one to share
/// its sync. An outcome record written right after an answer would
/// otherwise start a sync of its own, and the session's next request would
/// queue behind it: one extra fdatasync per statement.
const LAZY_WAIT: Duration = Duration::from_millis(20);

enum SegMsg {
    Batch {
        // Boxed on purpose: see `Msg`.
        #[allow(clippy::vec_box)]
        records: Vec<Box<AuditRecord>>,
        /// Their encoded size (see [`SegmentBacklog::bytes`]).
        bytes: usize,
        wal_files: Vec<PathBuf>,
    },
    Shutdown(Option<oneshot::Sender<()>>),
}

/// Records handed to the segment thread and not yet in a written segment,
/// and whether its last attempt failed. Shared by the writer, which
/// refuses records while segments fail and too many wait (see
/// [`Writer::segment_backlog_refusal`]), and the segment thread.
#[derive(Default)]
struct SegmentBacklog {
    records: AtomicUsize,
    /// The records' encoded size: a record may hold up to a statement's
    /// 8 MiB of text, so a count alone does not bound the memory.
    bytes: AtomicUsize,
    failing: AtomicBool,
    /// When the segment thread's current piece of work (a segment, a
    /// checkpoint, a retention pass) began, in Unix ms; 0 while it waits.
    busy_since_ms: std::sync::atomic::AtomicI64,
}

/// How long one piece of the segment thread's work may take before the
/// writer treats segments as failing (see
/// [`Writer::segment_backlog_refusal`]): a write that hangs (an fsync on
/// a stalled network file system) returns no error, and records would
/// otherwise wait in memory for it without bound.
#[cfg(not(test))]
const SEGMENT_STALL: Duration = Duration::from_secs(60);
#[cfg(test)]
const SEGMENT_STALL: Duration = Duration::from_secs(1);

impl SegmentBacklog {
    /// Whether the segment thread has been on one piece of work longer
    /// than [`SEGMENT_STALL`].
    fn stalled(&self) -> bool {
        let since = self.busy_since_ms.load(Ordering::Acquire);
        since != 0 && now_ms().saturating_sub(since) > SEGMENT_STALL.as_millis() as i64
    }

    /// Runs `work`, marked as the segment thread's current piece of work.
    fn busy<T>(&self, work: impl FnOnce() -> T) -> T {
        self.busy_since_ms.store(now_ms().max(1), Ordering::Release);
        let out = work();
        self.busy_since_ms.store(0, Ordering::Release);
        out
    }
}

/// While segments are behind (see [`Writer::segments_behind`]), the writer
/// thread takes no more records: the callers' records wait, unsynced and
/// unacknowledged, in the queue to it, as a server's clients wait when it
/// stops reading. The records in memory then stay at the bound, besides
/// those queued, which each session bounds by what it keeps in flight.
/// Segments cut on age meanwhile, so that the ones in memory go on to be
/// written. A segment thread that stalls or fails ends the wait, and the
/// records are refused as then (see [`Writer::segment_backlog_refusal`]).
fn wait_for_segments_to_catch_up(shared: &Mutex<Writer>) {
    loop {
        let mut w = lock(shared);
        if !w.segments_behind() {
            return;
        }
        w.maybe_cut();
        drop(w);
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Encoded bytes of records that may wait in memory for their segment:
/// at all times (past it, records are refused until segments catch up),
/// and while segments cannot be written (see [`BACKLOG_SEGMENTS`]). A
/// segment is cut at a quarter of it.
const BACKLOG_BYTES: usize = 1 << 30;

/// Records that may wait in memory for their segment while segments
/// cannot be written: this many times `segment_max_records`. A WAL keeps
/// them safe, but each waits in memory too (about a kilobyte), and a
/// segment thread that keeps failing (a directory it cannot write, a
/// broken manifest) would otherwise let that grow until the daemon runs
/// out of memory, with every request still accepted.
const BACKLOG_SEGMENTS: usize = 4;

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The audit directory's lock, taken on its own before the store starts
/// (see [`super::AuditLog::lock`]): makes the directory's folders and
/// holds `{dir}/.lock`; with the permissions its files get (the auditor
/// group looked up once).
pub(crate) fn lock_directory(cfg: &AuditConfig) -> anyhow::Result<(fs::File, Perms)> {
    let perms = Perms::for_group(cfg.auditor_group.as_deref())?;
    for d in ["", "wal", "records", "checkpoints"] {
        perms.ensure_dir(&cfg.dir.join(d))?;
    }
    Ok((lock_dir(&cfg.dir, &perms)?, perms))
}

/// Recovers the directory and starts both threads, holding `lock`, the
/// directory's lock (see [`lock_directory`]).
pub(crate) fn start(cfg: &AuditConfig, lock: fs::File, perms: Perms) -> anyhow::Result<Started> {
    let dir = cfg.dir.clone();
    let signer = Signer::load_or_generate(cfg, &perms)?;
    remove_tmp_files(&dir)?;

    // The manifest: a torn last line is an append cut short by a crash (its
    // records are still in the WAL: WAL files go only once their entry is
    // whole and signed). An append is torn only if its newline never
    // landed; a whole line that does not read is damage (bit rot, an
    // edit), and dropping it would delete the segment it lists and reuse
    // its sequence numbers. We refuse to write after damage.
    let (manifest, bad) = Manifest::read(&dir)?;
    if let Some(bad) = bad.as_ref().filter(|bad| !bad.torn) {
        anyhow::bail!(
            "{}: line {} is damaged ({}); run `tollgate audit verify`",
            dir.join(manifest::FILE).display(),
            bad.line + 1,
            bad.reason
        );
    }
    // A signed line was synced before it was signed: it is never a torn
    // append. So a torn tail is cut only past what the newest checkpoint
    // signs (this fails otherwise, and touches nothing: the file is the
    // evidence).
    let signed = signed_lines(&dir, &manifest, &signer, cfg.evidence_stream)?;
    if let Some(bad) = bad {
        let good = manifest.byte_len();
        warn!(line = bad.line + 1, reason = %bad.reason, "dropping torn last manifest line");
        let file = fs::OpenOptions::new()
            .write(true)
            .open(dir.join(manifest::FILE))?;
        file.set_len(good)?;
        // Else the torn line could come back after a power loss, behind
        // the entries appended from now on.
        file.sync_all()?;
    }
    let (
        reports,
        Replay {
            records: pending,
            unsealed_from,
            broken: replay_broken,
            next: (next_seq, prev_hash),
        },
    ) = replay_past_signed(&dir, &manifest, signed, &signer)?;
    for r in &reports {
        match &r.tail {
            wal::Tail::Clean => {}
            wal::Tail::Torn { offset } => {
                info!(file = %r.path.display(), offset, "WAL ends in a torn frame (never acknowledged)")
            }
            wal::Tail::Corrupt {
                offset,
                frame,
                reason,
            } => {
                error!(file = %r.path.display(), offset, frame, %reason, "WAL frame is corrupt; records after it cannot be recovered")
            }
        }
    }
    let seal_key = signer.wal_seal_key();
    let wal_dir = dir.join("wal");
    let manifest = set_aside_unsigned_tail(&dir, manifest, signed, &perms)?;
    remove_unlisted_segments(&dir, &manifest, &pending)?;

    let mut seg = SegState::new(cfg, Some(lock), perms, manifest, signer)?;
    if !pending.is_empty() {
        info!(records = pending.len(), "rebuilding segments from the WAL");
        seg.write_segments(&pending)?;
    }
    let corrupt: Vec<&PathBuf> = reports
        .iter()
        .filter(|r| matches!(r.tail, wal::Tail::Corrupt { .. }))
        .map(|r| &r.path)
        .collect();
    for r in &reports {
        let holds_unsealed = matches!(
            (unsealed_from, r.last_sequence),
            (Some(from), Some(last)) if last >= from
        );
        if replay_broken || corrupt.contains(&&r.path) {
            // Keep damaged WAL files as evidence, out of the replay path;
            // verify reports them.
            let mut to = r.path.as_os_str().to_owned();
            to.push(".corrupt");
            fs::rename(&r.path, &to)?;
        } else if holds_unsealed {
            let mut to = r.path.as_os_str().to_owned();
            to.push(".unsealed");
            fs::rename(&r.path, &to)?;
        } else {
            fs::remove_file(&r.path)?;
        }
    }
    fsutil::fsync_dir(&wal_dir)?;
    seg.checkpoint()?;
    seg.run_retention();

    // From the WAL files' names: a planted name with the largest number
    // must stop the start, not wrap the generations around.
    let generation = reports
        .iter()
        .map(|r| r.generation)
        .max()
        .unwrap_or(0)
        .checked_add(1)
        .ok_or_else(|| {
            anyhow::anyhow!("WAL generation exhausted: a WAL file name carries the largest number")
        })?;
    let (seg_tx, seg_rx) = mpsc::channel();
    let backlog = Arc::new(SegmentBacklog::default());
    let seg_backlog = backlog.clone();
    let (tx, rx) = mpsc::channel();
    // Rendezvous: the preparer holds at most one finished spare while the
    // writer has not taken it, so at most one file's worth of zeros waits.
    let (spare_tx, spare_rx) = mpsc::sync_channel(0);
    let stop = Arc::new(AtomicBool::new(false));
    let preparer = {
        let (wal_dir, stop) = (wal_dir.clone(), stop.clone());
        std::thread::Builder::new()
            .name("audit-wal-prep".into())
            .spawn(move || {
                lower_priority("audit-wal-prep");
                prepare_spares(&wal_dir, perms, &spare_tx, &stop)
            })?
    };
    #[cfg(test)]
    let backlog_bytes_limit = faults::backlog_bytes_limit(&wal_dir).unwrap_or(BACKLOG_BYTES);
    #[cfg(not(test))]
    let backlog_bytes_limit = BACKLOG_BYTES;
    let writer = Writer {
        backlog_bytes_limit,
        wal_dir,
        perms,
        file: None,
        spares: Some(spare_rx),
        spare: None,
        stop,
        preparer: Some(preparer),
        generation,
        next_seq,
        prev_hash,
        seal_key,
        closed_files: Vec::new(),
        buffer: Vec::new(),
        buffer_since: None,
        frames: Vec::new(),
        chained: Vec::new(),
        syncer: match cfg.durability {
            super::DurabilityMode::Buffered => Some(Syncer::start(Duration::from_millis(
                cfg.buffered_sync_interval_ms.max(1),
            ))?),
            _ => None,
        },
        closed: false,
        max_age: Duration::from_secs(cfg.segment_max_age_secs.max(1)),
        max_records: cfg.segment_max_records.max(1),
        seg_tx,
        backlog: backlog.clone(),
        buffer_bytes: 0,
    };
    std::thread::Builder::new()
        .name("audit-segments".into())
        .spawn(move || {
            lower_priority("audit-segments");
            seg.run(seg_rx, &seg_backlog)
        })?;
    let writer = Arc::new(Mutex::new(writer));
    let inline = (cfg.durability == super::DurabilityMode::Buffered).then(|| InlineWriter {
        writer: writer.clone(),
    });
    std::thread::Builder::new()
        .name("audit-wal".into())
        .spawn(move || Writer::run(&writer, rx))?;
    Ok(Started { tx, inline })
}

/// What [`start`] hands the [`super::AuditLog`].
pub(crate) struct Started {
    pub tx: mpsc::Sender<Msg>,
    /// In `buffered` durability, callers write their records themselves.
    pub inline: Option<InlineWriter>,
}

/// `buffered` durability: a record is acknowledged once written, so the
/// caller writes it to the WAL on its own thread, under the writer's lock,
/// instead of handing it to the writer thread and waiting to be woken (two
/// thread switches per record, the larger part of a record's cost on a
/// small host). The write goes to a preallocated file already in the page
/// cache; starting the next file (a rename and a directory sync, every
/// 16 MiB) is the longest a caller can be held.
#[derive(Clone)]
pub(crate) struct InlineWriter {
    writer: Arc<Mutex<Writer>>,
}

impl InlineWriter {
    pub fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        // Encoded before taking the lock, which other sessions wait on.
        let pending = Pending::new(record)?;
        let mut writer = lock(&self.writer);
        if writer.closed {
            return Err(AuditError::Unavailable("audit log is shut down".into()));
        }
        let first = writer.commit(std::iter::once(pending))?;
        writer.maybe_cut();
        Ok(first)
    }
}

/// Locks, ignoring poisoning. A panic while the writer is held cannot leave
/// it half-changed (its chain only advances after a successful write), nor
/// the syncer's state (single-field updates).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `buffered` durability: fdatasyncs the current WAL file behind the
/// writers, which acknowledge records once written. At most one sync per
/// `interval`, started as soon as the interval allows once something was
/// written: a sync costs the same CPU (virtio kicks, journal work) whether
/// it covers one record or a thousand, and back-to-back syncs on a small
/// host took as much CPU as the writers themselves.
struct Syncer {
    shared: Arc<SyncShared>,
}

struct SyncShared {
    /// Set by a writer after it wrote, cleared by the syncer just before
    /// it syncs: a write that lands after the clear sets it again, so
    /// nothing written is left unsynced.
    dirty: AtomicBool,
    /// A sync failed; the writer refuses the next batch. Mirrors
    /// `SyncState::failure` so that every write can check it without
    /// taking the lock.
    failed: AtomicBool,
    state: Mutex<SyncState>,
    wake: Condvar,
    interval: Duration,
    /// Syncs started, for tests of the spacing.
    #[cfg(test)]
    syncs: std::sync::atomic::AtomicU64,
    /// Held by a test to keep a started sync from finishing.
    #[cfg(test)]
    sync_gate: Mutex<()>,
}

impl SyncShared {
    /// Records a failed sync of the WAL (the background one, or the
    /// writer's own when it leaves a file): the writer refuses its next
    /// batch.
    fn fail(&self, failure: String) {
        lock(&self.state).failure = Some(failure);
        self.failed.store(true, Ordering::Release);
    }
}

#[derive(Default)]
struct SyncState {
    /// The WAL file being written.
    file: Option<Arc<fs::File>>,
    failure: Option<String>,
    stop: bool,
}

impl Syncer {
    fn start(interval: Duration) -> io::Result<Self> {
        let shared = Arc::new(SyncShared {
            dirty: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            state: Mutex::new(SyncState::default()),
            wake: Condvar::new(),
            interval,
            #[cfg(test)]
            syncs: Default::default(),
            #[cfg(test)]
            sync_gate: Mutex::new(()),
        });
        let for_thread = shared.clone();
        std::thread::Builder::new()
            .name("audit-wal-sync".into())
            .spawn(move || Self::run(&for_thread))?;
        Ok(Self { shared })
    }

    fn run(shared: &SyncShared) {
        let mut last_start: Option<Instant> = None;
        loop {
            {
                let mut s = lock(&shared.state);
                while !s.stop && !shared.dirty.load(Ordering::Acquire) {
                    s = shared
                        .wake
                        .wait(s)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                if s.stop {
                    return;
                }
            }
            if let Some(wait) = last_start.and_then(|t| shared.interval.checked_sub(t.elapsed())) {
                std::thread::sleep(wait);
            }
            last_start = Some(Instant::now());
            shared.dirty.store(false, Ordering::Release);
            let Some(file) = lock(&shared.state).file.clone() else {
                continue;
            };
            #[cfg(test)]
            let _held = {
                shared.syncs.fetch_add(1, Ordering::Relaxed);
                lock(&shared.sync_gate)
            };
            if let Err(e) = file.sync_data() {
                error!(error = %e, "WAL sync failed");
                shared.fail(e.to_string());
            }
        }
    }

    /// The writer moved to `file`; the one before was synced by the writer
    /// itself (`retire_file`).
    fn follow(&self, file: &Arc<fs::File>) {
        lock(&self.shared.state).file = Some(file.clone());
    }

    /// Something was written to the followed file. Wakes the syncer only
    /// when it was idle: at most one wake-up per sync.
    fn dirty(&self) {
        if !self.shared.dirty.swap(true, Ordering::AcqRel) {
            let _guard = lock(&self.shared.state);
            self.shared.wake.notify_one();
        }
    }

    fn take_failure(&self) -> Option<String> {
        if !self.shared.failed.swap(false, Ordering::AcqRel) {
            return None;
        }
        lock(&self.shared.state).failure.take()
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        let mut s = lock(&self.shared.state);
        // The last writes are synced before the thread leaves.
        if let Some(file) = &s.file {
            if let Err(e) = file.sync_data() {
                error!(error = %e, "WAL sync failed at shutdown");
            }
        }
        s.stop = true;
        self.shared.wake.notify_one();
    }
}

/// Background work (Parquet encoding, zero-filling spares) yields the CPU
/// to the WAL writer and the sessions waiting on it: a segment of 100 000
/// records is about a second of CPU, and on a small host it would
/// otherwise delay group commits by whole time slices. The records it
/// works on are already durable, so it only has to keep up on average.
fn lower_priority(thread: &str) {
    // SAFETY: gettid has no preconditions; setpriority on our own thread
    // id changes only this thread's nice value (Linux threads are tasks).
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10)
    };
    if rc != 0 {
        debug!(thread, error = %io::Error::last_os_error(), "cannot lower thread priority");
    }
}

/// Two processes appending to one chain would fork it: the first holds an
/// exclusive lock on `{dir}/.lock` for as long as it runs.
fn lock_dir(dir: &Path, perms: &Perms) -> anyhow::Result<fs::File> {
    use std::os::fd::AsRawFd;
    let path = dir.join(".lock");
    let f = perms.open_append(&path)?;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        anyhow::bail!(
            "{}: audit directory is in use by another process ({})",
            dir.display(),
            io::Error::last_os_error()
        );
    }
    Ok(f)
}

fn remove_tmp_files(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            if entry.file_name() != "keys" {
                remove_tmp_files(&path)?;
            }
        } else if path.extension().is_some_and(|e| e == "tmp") {
            warn!(file = %path.display(), "removing unfinished file");
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Every `*.parquet` under `records/`, as paths relative to `dir`.
pub(crate) fn list_segment_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let records = dir.join("records");
    let rd = match fs::read_dir(&records) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for day in rd {
        let day = day?;
        if !day.file_type()?.is_dir() {
            continue;
        }
        for f in fs::read_dir(day.path())? {
            let f = f?;
            let name = f.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".parquet") {
                out.push(format!(
                    "records/{}/{}",
                    day.file_name().to_string_lossy(),
                    name
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Makes the manifest one the daemon may sign. Every checkpoint signs the
/// whole manifest, so a line appended by someone who can write the
/// directory but has not the key would otherwise become as good as the
/// daemon's at the next one (a retention entry would have its segments
/// deleted, and verify would pass).
///
/// The WAL records that continue the chain from a point, as far as a
/// valid seal covers them (a batch is acknowledged only once its seal is
/// written with it).
struct Replay {
    records: Vec<AuditRecord>,
    /// The first record past the last valid seal: cut short by a crash,
    /// or never written by tollgate. Not replayed.
    unsealed_from: Option<u64>,
    /// A record does not continue the chain, or a seal does not match.
    broken: bool,
    /// The next sequence and previous hash after the replayed records.
    next: (u64, String),
}

impl Replay {
    fn of(
        records: Vec<AuditRecord>,
        seals: &std::collections::HashMap<u64, wal::Seal>,
        seal_key: &ring::hmac::Key,
        from: (u64, String),
    ) -> Replay {
        let mut pending = Vec::new();
        let mut broken = false;
        // How many of `pending` a valid seal covers: only those are replayed.
        let mut sealed = 0;
        let mut next = from.clone();
        let mut chain = from.clone();
        for r in records.into_iter().filter(|r| r.sequence >= from.0) {
            let hash = r.compute_hash();
            if r.sequence != chain.0 || r.prev_record_hash != chain.1 || r.record_hash != hash {
                error!(
                    sequence = r.sequence,
                    expected = chain.0,
                    "WAL record does not continue the chain; stopping replay here"
                );
                broken = true;
                break;
            }
            chain = (r.sequence + 1, r.record_hash.clone());
            let seal = seals.get(&r.sequence);
            pending.push(r);
            if let Some(seal) = seal {
                if !seal.covers(seal_key, &chain.1) {
                    error!(
                        sequence = chain.0 - 1,
                        "WAL seal does not match its records: they were not written by this \
                         daemon's key; stopping replay here"
                    );
                    broken = true;
                    break;
                }
                sealed = pending.len();
                next = chain.clone();
            }
        }
        // Records past the last seal are not replayed; their files are
        // kept, as evidence, where replay does not look.
        let unsealed_from = pending.get(sealed).map(|r| r.sequence);
        if let Some(from) = unsealed_from {
            warn!(
                records = pending.len() - sealed,
                from_sequence = from,
                "WAL records after the last seal are not replayed; their files are kept as *.log.unsealed"
            );
            pending.truncate(sealed);
        }
        Replay {
            records: pending,
            unsealed_from,
            broken,
            next,
        }
    }
}

/// What a start finds past the `signed` manifest lines (see
/// [`signed_lines`]), before it changes anything: the WAL files read, and
/// the records that replay would write again (from the WAL past the
/// signed lines: acknowledged records whose segment was never closed, or
/// whose segment's entry no checkpoint signs yet). Fails when a segment
/// entry no checkpoint signs has records the WAL no longer holds: setting
/// it aside would take them out of the chain for good, and the next
/// records would take their numbers.
fn replay_past_signed(
    dir: &Path,
    manifest: &Manifest,
    signed: usize,
    signer: &Signer,
) -> anyhow::Result<(Vec<wal::WalFileReport>, Replay)> {
    let wal::Merged {
        records,
        seals,
        reports,
    } = wal::read_all(&dir.join("wal"))?;
    let replay = Replay::of(
        records,
        &seals,
        &signer.wal_seal_key(),
        chain_end(manifest, signed),
    );
    unsigned_segments_are_in_the_wal(dir, manifest, signed, &replay.records, replay.next.0)?;
    Ok((reports, replay))
}

/// The next sequence and the previous record's hash after the first
/// `lines` manifest lines.
fn chain_end(manifest: &Manifest, lines: usize) -> (u64, String) {
    match manifest.last_segment_in(lines) {
        Some(s) => (s.last_seq + 1, s.last_record_hash.clone()),
        None => (1, GENESIS_HASH.to_string()),
    }
}

/// A crash between a segment's entry and its checkpoint leaves the entry
/// unsigned with its records still in the WAL (its files go only once the
/// entry is signed), and the replay writes them again. An unsigned entry
/// whose records the replay does not hold, the same to the last record's
/// hash, is something else: the checkpoints that signed it were removed,
/// or someone appended it. Setting it aside would drop those records from
/// the chain and give their numbers to new ones, so the daemon does not
/// start; nothing has been changed yet.
fn unsigned_segments_are_in_the_wal(
    dir: &Path,
    manifest: &Manifest,
    signed: usize,
    replayed: &[AuditRecord],
    next_seq: u64,
) -> anyhow::Result<()> {
    let replayed_hash = |seq: u64| {
        let first = replayed.first()?.sequence;
        let at = usize::try_from(seq.checked_sub(first)?).ok()?;
        replayed.get(at).map(|r| r.record_hash.as_str())
    };
    for (line, entry) in manifest.entries.iter().enumerate().skip(signed) {
        let Entry::Segment(s) = entry else {
            continue;
        };
        if s.last_seq < next_seq && replayed_hash(s.last_seq) == Some(s.last_record_hash.as_str()) {
            continue;
        }
        anyhow::bail!(
            "{}: line {} lists a segment of records {}-{} that no checkpoint signs, and the WAL \
             does not hold those records: the checkpoints that signed it were removed, the line \
             was not written by this daemon, or (in buffered durability, after a WAL sync \
             failed) the segment was their only copy when the host went down. Starting would \
             take the records out of the chain and give their numbers to new ones; nothing was \
             changed. Run `tollgate audit verify`. Restore removed checkpoints from a copy; to \
             give the records up instead, move the manifest lines from this one on, and the \
             segment files they name, out of the directory (keep them as evidence)",
            dir.join(manifest::FILE).display(),
            line + 1,
            s.first_seq,
            s.last_seq
        );
    }
    Ok(())
}

/// How many manifest lines the newest valid checkpoint signs. Those lines
/// must still hash to its root, or the daemon does not start.
///
/// The checkpoint must be this stream's, under its own name, as verify
/// requires: the other stream signs with the same key, and a start that
/// took its checkpoint would sign whatever history came with it (the
/// evidence stream's manifest and segments put in place of the audit
/// stream's) under this stream's origin.
fn signed_lines(
    dir: &Path,
    manifest: &Manifest,
    signer: &Signer,
    evidence_stream: bool,
) -> anyhow::Result<usize> {
    let (newest, any) = checkpoint::newest_valid(&dir.join("checkpoints"), &signer.public())?;
    Ok(match newest {
        Some((named, checkpoint)) => {
            let path = dir.join("checkpoints").join(checkpoint::file_name(named));
            if checkpoint.counter != Some(named) {
                anyhow::bail!(
                    "{}: it signs checkpoint {:?}, not the one its name says: it was copied or \
                     renamed. Run `tollgate audit verify`",
                    path.display(),
                    checkpoint.counter
                );
            }
            if checkpoint.origin.ends_with(super::EVIDENCE_ORIGIN_SUFFIX) != evidence_stream {
                anyhow::bail!(
                    "{}: its origin {:?} is the {} stream's, and this directory holds the {} \
                     stream: one stream's files were put in place of the other's. Run `tollgate \
                     audit verify`",
                    path.display(),
                    checkpoint.origin,
                    if evidence_stream { "audit" } else { "evidence" },
                    if evidence_stream { "evidence" } else { "audit" }
                );
            }
            let size = usize::try_from(checkpoint.size).unwrap_or(usize::MAX);
            if size > manifest.lines.len() {
                anyhow::bail!(
                    "{}: a checkpoint signs {size} lines and the manifest has {}: lines were removed. \
                     Run `tollgate audit verify`",
                    dir.join(manifest::FILE).display(),
                    manifest.lines.len()
                );
            }
            // Usually the whole manifest is signed: its root is the one the
            // reading already built; a prefix is hashed again only when not.
            let root = match size == manifest.lines.len() {
                true => Some(manifest.root_all()),
                false => manifest
                    .prefix_roots(&[checkpoint.size])
                    .remove(&checkpoint.size),
            };
            if root != Some(checkpoint.root) {
                anyhow::bail!(
                    "{}: its first {size} lines no longer hash to the root the newest checkpoint signs: \
                     a signed line was changed. Run `tollgate audit verify`",
                    dir.join(manifest::FILE).display()
                );
            }
            size
        }
        None if any => anyhow::bail!(
            "{}: no checkpoint verifies with this daemon's signing key (was the key changed?). \
             Run `tollgate audit verify` with the public key the checkpoints were signed with",
            dir.join("checkpoints").display()
        ),
        None => 0,
    })
}

/// Manifest lines past the `signed` ones (see [`signed_lines`]) are what a
/// crash between an entry and its checkpoint leaves: they are not taken.
/// They are set aside, with the segment files they name, as evidence
/// (`manifest.unsigned-<ms>.jsonl`, `*.parquet.unsigned`), and the
/// manifest ends where the checkpoint does. The records of a segment entry
/// set aside are still in the WAL (checked first, see
/// [`unsigned_segments_are_in_the_wal`]), so replay writes them again; a
/// retention set aside had deleted nothing yet, and runs again. Returns
/// the manifest to go on with.
fn set_aside_unsigned_tail(
    dir: &Path,
    manifest: Manifest,
    signed: usize,
    perms: &Perms,
) -> anyhow::Result<Manifest> {
    if signed == manifest.lines.len() {
        return Ok(manifest);
    }
    let stamp = now_ms();
    let aside = dir.join(format!("manifest.unsigned-{stamp}.jsonl"));
    let mut text = Vec::new();
    for line in &manifest.lines[signed..] {
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    {
        use std::io::Write;
        let mut file = perms.create_new(&aside)?;
        file.write_all(&text)?;
        file.sync_all()?;
    }
    // The evidence is on disk before anything else changes.
    fsutil::fsync_dir(dir)?;
    // The lines are someone's word, paths included: only a file where the
    // daemon would have put that segment, and that no signed line lists,
    // is moved (never over another file).
    let signed_paths: std::collections::HashSet<&str> = manifest.entries[..signed]
        .iter()
        .filter_map(|e| match e {
            Entry::Segment(s) => Some(s.path.as_str()),
            Entry::Retention(_) => None,
        })
        .collect();
    for entry in &manifest.entries[signed..] {
        let Entry::Segment(s) = entry else {
            continue;
        };
        let own_place =
            segment::relative_path(&segment::day_of(s.first_time), s.first_seq, s.last_seq);
        if s.path != own_place || signed_paths.contains(s.path.as_str()) {
            warn!(path = %s.path, "an unsigned manifest line names a file the daemon would not have written there; left where it is");
            continue;
        }
        let from = dir.join(&s.path);
        let mut to = from.as_os_str().to_owned();
        to.push(format!(".unsigned-{stamp}"));
        let to = PathBuf::from(to);
        if to.exists() {
            continue;
        }
        match fs::rename(&from, &to) {
            Ok(()) => {
                if let Some(folder) = from.parent() {
                    fsutil::fsync_dir(folder)?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    let keep: u64 = manifest.lines[..signed]
        .iter()
        .map(|l| l.len() as u64 + 1)
        .sum();
    let file = fs::OpenOptions::new()
        .write(true)
        .open(dir.join(manifest::FILE))?;
    file.set_len(keep)?;
    file.sync_all()?;
    fsutil::fsync_dir(dir)?;
    warn!(
        lines = manifest.lines.len() - signed,
        from_line = signed + 1,
        aside = %aside.display(),
        "manifest lines no checkpoint signs are set aside (a crash between an entry and its \
         checkpoint, or lines not written by this daemon); their records are replayed from the WAL"
    );
    let (manifest, bad) = Manifest::read(dir)?;
    if let Some(bad) = bad {
        anyhow::bail!("manifest line {} is damaged: {}", bad.line + 1, bad.reason);
    }
    Ok(manifest)
}

/// A segment renamed into place whose manifest entry was never written
/// (crash in between) is deleted: its records are still in the WAL and the
/// segment is rebuilt from there.
///
/// Such a file is what a crash between a segment's rename and its
/// manifest entry leaves, and its records are then still in the WAL
/// (`replayed`): WAL files go only once their records' entries are signed.
/// One whose records the WAL does not hold is something else: the
/// manifest's tail and the checkpoints that signed it were cut away. The
/// file is then the only trace of those records, and the start stops
/// rather than delete it and give their numbers to new records.
fn remove_unlisted_segments(
    dir: &Path,
    manifest: &Manifest,
    replayed: &[AuditRecord],
) -> anyhow::Result<()> {
    let listed: std::collections::HashSet<&str> = manifest
        .entries
        .iter()
        .filter_map(|e| match e {
            Entry::Segment(s) => Some(s.path.as_str()),
            Entry::Retention(_) => None,
        })
        .collect();
    let last = manifest.last_segment().map(|s| s.last_seq).unwrap_or(0);
    for rel in list_segment_files(dir)? {
        if listed.contains(rel.as_str()) {
            continue;
        }
        // Only files past the manifest's end are ours to rebuild; an
        // unlisted file inside the closed range is left for verify to flag.
        let Some((first, end)) = segment_file_sequences(&rel) else {
            continue;
        };
        if first <= last {
            continue;
        }
        // The replayed records run without a gap, in sequence order.
        let in_the_wal = match (replayed.first(), replayed.last()) {
            (Some(a), Some(b)) => a.sequence <= first && end <= b.sequence,
            _ => false,
        };
        if !in_the_wal {
            anyhow::bail!(
                "{}: a segment of records {first}-{end} past the manifest's end, and the WAL does \
                 not hold those records: the manifest's last lines and the checkpoints that \
                 signed them were removed. Starting would delete the only copy of those records \
                 and give their numbers to new ones; nothing was changed. Run `tollgate audit \
                 verify`, and restore the manifest and checkpoints from a copy",
                dir.join(&rel).display()
            );
        }
        warn!(file = %rel, "removing segment without manifest entry (rebuilt from WAL)");
        fs::remove_file(dir.join(&rel))?;
    }
    Ok(())
}

/// The first and last sequence a segment file's name gives
/// (`seg-<first>-<last>.parquet`, see [`segment::relative_path`]).
fn segment_file_sequences(rel: &str) -> Option<(u64, u64)> {
    let name = rel.rsplit('/').next()?.strip_prefix("seg-")?;
    let (first, last) = name.strip_suffix(".parquet")?.split_once('-')?;
    Some((first.parse().ok()?, last.parse().ok()?))
}

/// Keeps one preallocated WAL file ready for the writer (see
/// [`wal::prepare_spare`]), off the path of every sync. Only while the
/// file system has room to spare ([`wal::PREALLOC_MIN_FREE`]); otherwise
/// the writer appends to plain files, as it always can.
fn prepare_spares(
    wal_dir: &Path,
    perms: Perms,
    tx: &mpsc::SyncSender<(fs::File, PathBuf)>,
    stop: &AtomicBool,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let roomy = wal::free_space(wal_dir).is_ok_and(|free| free >= wal::PREALLOC_MIN_FREE);
        if roomy {
            n += 1;
            let path = wal_dir.join(wal::spare_name(n));
            match wal::prepare_spare(&perms, &path, stop) {
                Ok(f) => {
                    if tx.send((f, path.clone())).is_err() {
                        // The writer is gone: nobody will use it.
                        let _ = fs::remove_file(&path);
                        return;
                    }
                    continue;
                }
                Err(e) if stop.load(Ordering::Relaxed) => {
                    debug!(error = %e, "spare WAL file abandoned at shutdown");
                    return;
                }
                Err(e) => warn!(error = %e, "cannot preallocate a WAL file; appending instead"),
            }
        }
        // Look again in a while, waking early for a shutdown.
        for _ in 0..20 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The WAL file being written.
struct WalFile {
    /// Shared with the background syncer in `buffered` durability.
    file: Arc<fs::File>,
    path: PathBuf,
    /// Bytes of acknowledged frames: the next batch is written here.
    len: u64,
    /// True for a preallocated (zero-filled) file; false for a plain file
    /// that each batch extends.
    preallocated: bool,
}

/// Owns the WAL: assigns sequences, chains hashes, group-commits.
struct Writer {
    wal_dir: PathBuf,
    perms: Perms,
    file: Option<WalFile>,
    /// Preallocated files from the preparer; `None` once shut down.
    spares: Option<mpsc::Receiver<(fs::File, PathBuf)>>,
    /// A spare taken from the preparer and not yet used.
    spare: Option<(fs::File, PathBuf)>,
    stop: Arc<AtomicBool>,
    preparer: Option<std::thread::JoinHandle<()>>,
    generation: u64,
    next_seq: u64,
    prev_hash: String,
    /// Seals each batch (see [`wal::Seal`]).
    seal_key: ring::hmac::Key,
    /// WAL files no longer written to; deleted once their records are in
    /// manifested segments.
    closed_files: Vec<PathBuf>,
    /// Durable records not yet handed to a segment.
    // Boxed on purpose: see `Msg`.
    #[allow(clippy::vec_box)]
    buffer: Vec<Box<AuditRecord>>,
    buffer_since: Option<Instant>,
    /// The batch's frames; kept between batches for its capacity.
    frames: Vec<u8>,
    /// The batch's chained records until it is written; kept between
    /// batches for its capacity. Apart from `buffer` so that a batch that
    /// fails, or a panic in the middle of one, leaves nothing unwritten
    /// in `buffer`.
    #[allow(clippy::vec_box)]
    chained: Vec<Box<AuditRecord>>,
    /// In `buffered` durability: syncs the WAL behind the writers.
    syncer: Option<Syncer>,
    /// Shut down: inline appends are refused.
    closed: bool,
    max_age: Duration,
    max_records: usize,
    seg_tx: mpsc::Sender<SegMsg>,
    backlog: Arc<SegmentBacklog>,
    /// Encoded bytes of the records in `buffer`.
    buffer_bytes: usize,
    /// [`BACKLOG_BYTES`], lower in tests.
    backlog_bytes_limit: usize,
}

/// What the writer thread takes in before one commit. Records and their
/// waiters are in two lists from the start: the records go to `commit`
/// as they are, without being moved again to split them from their
/// waiters.
#[derive(Default)]
struct Batch {
    records: Vec<Pending>,
    waiters: Vec<oneshot::Sender<Result<u64, AuditError>>>,
    shutdown: Option<oneshot::Sender<()>>,
    /// Someone waits on a record of this batch to act: sync now.
    urgent: bool,
}

impl Batch {
    fn take(&mut self, message: Msg) {
        match message {
            Msg::Append(r, w) => {
                self.urgent = true;
                self.records.push(r);
                self.waiters.push(w);
            }
            Msg::AppendLazy(r, w) => {
                self.records.push(r);
                self.waiters.push(w);
            }
            Msg::Shutdown(w) => self.shutdown = Some(w),
        }
    }
}

impl Writer {
    fn run(shared: &Mutex<Writer>, rx: mpsc::Receiver<Msg>) {
        let inline = lock(shared).syncer.is_some();
        // Kept across batches for its lists' capacity.
        let mut batch = Batch::default();
        loop {
            let timeout = {
                let w = lock(shared);
                match w.buffer_since {
                    Some(t) => w.max_age.saturating_sub(t.elapsed()),
                    // Inline writers start buffers without telling this
                    // thread: look often enough to cut on age.
                    None if inline => INLINE_CUT_CHECK.min(w.max_age),
                    None => Duration::from_secs(3600),
                }
            };
            let first = match rx.recv_timeout(timeout) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    lock(shared).maybe_cut();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    lock(shared).close(None);
                    return;
                }
            };
            batch.take(first);
            // Lazy records wait for an urgent one at most LAZY_WAIT from the
            // first of them, however many more keep coming meanwhile.
            let mut lazy_deadline = None;
            // Group commit: take everything already waiting, one sync for all.
            loop {
                while batch.shutdown.is_none() && batch.records.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(m) => batch.take(m),
                        Err(_) => break,
                    }
                }
                if batch.urgent || batch.shutdown.is_some() || batch.records.len() >= MAX_BATCH {
                    break;
                }
                // Only lazy records so far: give an urgent one a moment to
                // join, then sync whatever there is.
                let deadline = *lazy_deadline.get_or_insert_with(|| Instant::now() + LAZY_WAIT);
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match rx.recv_timeout(left) {
                    Ok(m) => batch.take(m),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            batch.urgent = false;
            if !batch.records.is_empty() {
                wait_for_segments_to_catch_up(shared);
                let mut w = lock(shared);
                let result = w.commit(batch.records.drain(..));
                w.maybe_cut();
                drop(w);
                for (i, waiter) in batch.waiters.drain(..).enumerate() {
                    let _ = waiter.send(result.clone().map(|first| first + i as u64));
                }
            }
            if let Some(done) = batch.shutdown.take() {
                lock(shared).close(Some(done));
                return;
            }
        }
    }

    /// Stops writing: the last file is retired, buffered records go to a
    /// final segment, the segment thread is told to finish (and to answer
    /// `done` once it has).
    fn close(&mut self, done: Option<oneshot::Sender<()>>) {
        self.closed = true;
        self.stop_preparer();
        self.retire_file();
        self.cut();
        let _ = self.seg_tx.send(SegMsg::Shutdown(done));
    }

    /// Chains, writes and (unless a syncer follows) syncs `records` as one
    /// batch; returns the first one's sequence number.
    fn commit(&mut self, records: impl IntoIterator<Item = Pending>) -> Result<u64, AuditError> {
        if let Some(refusal) = self.segment_backlog_refusal() {
            return Err(refusal);
        }
        let first = self.next_seq;
        let mut seq = first;
        // The link to the next record, rewritten in place for each one.
        let mut prev = self.prev_hash.clone();
        let mut bytes = std::mem::take(&mut self.frames);
        bytes.clear();
        let mut chained = std::mem::take(&mut self.chained);
        chained.clear();
        let mut last_hash = None;
        for Pending {
            record: mut r,
            frame,
        } in records
        {
            r.sequence = seq;
            r.prev_record_hash.clear();
            r.prev_record_hash.push_str(&prev);
            // The frame's payload is the canonical encoding: one encoding
            // and one SHA-256 per record give both the WAL bytes and the hash.
            let hash = frame.finish(&r, &mut bytes);
            set_hex(&mut r.record_hash, &hash);
            last_hash = Some(hash);
            prev.clear();
            prev.push_str(&r.record_hash);
            chained.push(r);
            seq += 1;
        }
        // Written in the same write as the batch: no record is
        // acknowledged without the seal that lets replay take it.
        if let Some(hash) = last_hash {
            wal::append_seal(&mut bytes, &self.seal_key, seq - 1, &hash);
        }
        let written = self.write_durably(&bytes, first);
        let batch_bytes = bytes.len();
        // Both lists keep their capacity for the next batch.
        self.frames = bytes;
        let result = match written {
            Ok(()) => {
                self.next_seq = seq;
                self.prev_hash = prev;
                if self.buffer.is_empty() {
                    self.buffer_since = Some(Instant::now());
                }
                self.buffer.append(&mut chained);
                self.buffer_bytes += batch_bytes;
                Ok(first)
            }
            Err(e) => {
                // Nothing in this batch is acknowledged and the chain does not
                // advance: the same sequences are used by the next batch, in a
                // new WAL file that supersedes whatever part of this one
                // reached the disk.
                error!(error = %e, records = chained.len(), "WAL write failed; refusing the batch");
                chained.clear();
                Err(AuditError::Wal(e.to_string()))
            }
        };
        self.chained = chained;
        result
    }

    /// Encoded bytes of the records that wait for their segments: handed
    /// to the segment thread, and buffered here.
    fn waiting_bytes(&self) -> usize {
        self.backlog.bytes.load(Ordering::Acquire) + self.buffer_bytes
    }

    /// Whether records waiting for their segments hold
    /// [`BACKLOG_BYTES`] while the segment thread works (not failing, not
    /// stalled): taking more would only grow the daemon.
    fn segments_behind(&self) -> bool {
        self.waiting_bytes() >= self.backlog_bytes_limit
            && !self.backlog.failing.load(Ordering::Acquire)
            && !self.backlog.stalled()
    }

    /// Fail closed on a segment thread that cannot write: while its last
    /// attempt failed and [`BACKLOG_SEGMENTS`] segments' worth of records
    /// (or [`BACKLOG_BYTES`] of them) wait for it, no more are taken (see
    /// [`BACKLOG_SEGMENTS`]). As soon
    /// as a segment is written again, records are taken again.
    ///
    /// The bytes are bounded whatever the segment thread does: records
    /// holding statements of megabytes (denied ones among them, which any
    /// agent can send) can come faster than segments of them are written,
    /// and each waits in memory until its segment is. The writer thread
    /// waits for the segments then ([`wait_for_segments_to_catch_up`]),
    /// so this refuses only an inline (`buffered`) writer's records, which
    /// are written on the session's own thread.
    fn segment_backlog_refusal(&self) -> Option<AuditError> {
        let waiting_bytes = self.waiting_bytes();
        if !self.backlog.failing.load(Ordering::Acquire) && !self.backlog.stalled() {
            return (waiting_bytes >= self.backlog_bytes_limit).then(|| {
                AuditError::Unavailable(format!(
                    "audit segments are {waiting_bytes} bytes of records behind: no more are \
                     taken until they catch up"
                ))
            });
        }
        let waiting = self.backlog.records.load(Ordering::Acquire) + self.buffer.len();
        let limit = self.max_records.saturating_mul(BACKLOG_SEGMENTS);
        (waiting >= limit || waiting_bytes >= self.backlog_bytes_limit).then(|| {
            AuditError::Unavailable(format!(
                "audit segments cannot be written and {waiting} records wait in memory for \
                 them: no more are taken until a segment is written"
            ))
        })
    }

    /// The spare file from the preparer, if one is ready.
    fn spare_ready(&mut self) -> bool {
        if self.spare.is_none() {
            self.spare = self.spares.as_ref().and_then(|rx| rx.try_recv().ok());
        }
        self.spare.is_some()
    }

    /// Starts the next WAL file: a preallocated spare when one is ready,
    /// else a new plain file.
    fn open_file(&mut self, first_seq: u64) -> io::Result<()> {
        let path = self
            .wal_dir
            .join(wal::file_name(self.generation, first_seq));
        self.generation = self
            .generation
            .checked_add(1)
            .ok_or_else(|| io::Error::other("WAL generation exhausted"))?;
        let (file, preallocated) = match self.spare_ready().then(|| self.spare.take()).flatten() {
            Some((f, spare)) => {
                if let Err(e) = fs::rename(&spare, &path) {
                    let _ = fs::remove_file(&spare);
                    return Err(e);
                }
                (f, true)
            }
            None => (self.perms.create_new(&path)?, false),
        };
        // The file's name must survive a crash with its contents.
        fsutil::fsync_dir(&self.wal_dir)?;
        let file = Arc::new(file);
        if let Some(syncer) = &self.syncer {
            syncer.follow(&file);
        }
        self.file = Some(WalFile {
            file,
            path,
            len: 0,
            preallocated,
        });
        Ok(())
    }

    /// Stops writing to the current file; it is deleted once its records
    /// are in manifested segments.
    fn retire_file(&mut self) {
        if let Some(w) = self.file.take() {
            // The syncer follows only the current file: what it has not
            // covered of this one is synced now (once per file, not per
            // batch).
            self.catch_up_sync(&w);
            self.closed_files.push(w.path);
        }
    }

    /// In `buffered` durability, syncs what the syncer may not have covered
    /// of `w` yet. A failure is handled as a failed background sync: what it
    /// should have covered may be gone, so the next record is refused.
    fn catch_up_sync(&self, w: &WalFile) {
        let Some(syncer) = &self.syncer else {
            return;
        };
        #[cfg(test)]
        let synced = match faults::take_catch_up_sync(&self.wal_dir) {
            true => Err(io::Error::from_raw_os_error(libc::EIO)),
            false => w.file.sync_data(),
        };
        #[cfg(not(test))]
        let synced = w.file.sync_data();
        if let Err(e) = synced {
            error!(error = %e, path = %w.path.display(), "WAL sync failed");
            syncer.shared.fail(e.to_string());
        }
    }

    fn stop_preparer(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver fails the preparer's pending hand-over.
        self.spares = None;
        if let Some((_, path)) = self.spare.take() {
            let _ = fs::remove_file(path);
        }
        if let Some(h) = self.preparer.take() {
            let _ = h.join();
        }
    }

    fn write_durably(&mut self, bytes: &[u8], first_seq: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let n = bytes.len() as u64;
        let rotate = match &self.file {
            // A batch that does not fit what is left of the preallocated
            // space goes to the next file (an empty file takes any batch).
            // A plain file (the first one, written before the preparer had
            // a spare ready) is left for a preallocated one once it holds
            // PLAIN_SWITCH bytes: soon enough that its slower syncs do not
            // last, late enough that a trickle of records does not start a
            // file (a rename and a directory sync) every few batches.
            Some(w) => {
                w.len > 0
                    && (w.len + n > wal::PREALLOC_BYTES
                        || (!w.preallocated && w.len >= PLAIN_SWITCH && self.spare_ready()))
            }
            None => false,
        };
        if rotate {
            self.retire_file();
        }
        if self.file.is_none() {
            self.open_file(first_seq)?;
        }
        // A failed background sync: what it should have covered may be
        // gone from the page cache. Refuse this batch (fail closed) and
        // start a fresh file for the next one.
        if let Some(failure) = self.syncer.as_ref().and_then(Syncer::take_failure) {
            self.retire_file();
            return Err(io::Error::other(format!(
                "an earlier WAL sync failed: {failure}"
            )));
        }
        let sync_here = self.syncer.is_none();
        let Some(w) = self.file.as_mut() else {
            return Err(io::Error::other("no WAL file"));
        };
        #[cfg(test)]
        let written = match faults::take(&self.wal_dir) {
            Some(k) => w
                .file
                .write_all_at(&bytes[..k.min(bytes.len())], w.len)
                .and_then(|()| Err(io::Error::from_raw_os_error(libc::ENOSPC))),
            None => w.file.write_all_at(bytes, w.len),
        };
        #[cfg(not(test))]
        let written = w.file.write_all_at(bytes, w.len);
        #[cfg(test)]
        let sync_fails = faults::take_sync_after_whole_write(&self.wal_dir);
        #[cfg(not(test))]
        let sync_fails = false;
        let result = written.and_then(|()| match (sync_here, sync_fails) {
            (true, true) => Err(io::Error::from_raw_os_error(libc::EIO)),
            (true, false) => w.file.sync_data(),
            (false, _) => Ok(()),
        });
        match result {
            Ok(()) => {
                w.len += n;
                if let Some(syncer) = &self.syncer {
                    syncer.dirty();
                }
                Ok(())
            }
            Err(e) => {
                // Best effort: cut the partial batch off, then retire the file
                // so the next batch starts a fresh one. (The fault stands for
                // a truncation that a crash undid.)
                if !sync_fails {
                    let _ = w.file.set_len(w.len);
                }
                self.retire_file();
                // The refused batch may be on the disk whole, its seal
                // included: a sync can report failure for data that reached
                // the disk, and a crash can undo the truncation. Replay
                // would then take records whose callers were told they were
                // refused. A file starting at the batch's first sequence,
                // its name durable before the refusal is answered,
                // supersedes them (see `wal::read_all`), whether or not a
                // later batch comes before a crash.
                if let Err(next) = self.open_file(first_seq) {
                    warn!(error = %next, "cannot start the next WAL file after a failed write; the next batch tries again");
                }
                Err(e)
            }
        }
    }

    fn maybe_cut(&mut self) {
        let Some(since) = self.buffer_since else {
            return;
        };
        let day_changed = match (self.buffer.first(), self.buffer.last()) {
            (Some(a), Some(b)) => segment::day_number(a.time) != segment::day_number(b.time),
            _ => false,
        };
        // A segment holds at most a quarter of the backlog's bytes, so
        // that large records are handed over before they alone fill it.
        let full = self.buffer.len() >= self.max_records
            || self.buffer_bytes >= self.backlog_bytes_limit / BACKLOG_SEGMENTS;
        if full || since.elapsed() >= self.max_age || day_changed {
            self.cut();
        }
    }

    /// Hands the buffered records to the segment thread, with the WAL files
    /// retired since the last cut: every record in those is in this batch or
    /// an earlier one.
    ///
    /// A preallocated file goes on being written across cuts (starting one
    /// costs a file's worth of zeros); it is handed over once full. A plain
    /// file is retired at every cut, so the WAL on a small disk holds no
    /// more than the records not yet in segments.
    fn cut(&mut self) {
        if self.file.as_ref().is_some_and(|w| !w.preallocated) {
            self.retire_file();
        }
        if self.buffer.is_empty() && self.closed_files.is_empty() {
            return;
        }
        // Once a segment's manifest entry is appended, its records should be
        // durable in the WAL too: an entry no checkpoint signs yet is
        // rebuilt from the WAL at the next start (see
        // `set_aside_unsigned_tail`). In `buffered` durability the syncer
        // may still be behind the current file: sync it now (retired files
        // were synced when retired). If that fails the segment is cut all
        // the same: it is then the records' one durable copy, and not
        // cutting would leave them only in memory.
        if let Some(w) = &self.file {
            self.catch_up_sync(w);
        }
        self.buffer_since = None;
        let records = std::mem::take(&mut self.buffer);
        let bytes = std::mem::take(&mut self.buffer_bytes);
        let wal_files = std::mem::take(&mut self.closed_files);
        debug!(records = records.len(), "cutting segment");
        self.backlog
            .records
            .fetch_add(records.len(), Ordering::AcqRel);
        self.backlog.bytes.fetch_add(bytes, Ordering::AcqRel);
        if self
            .seg_tx
            .send(SegMsg::Batch {
                records,
                bytes,
                wal_files,
            })
            .is_err()
        {
            error!("segment thread is gone; records stay in the WAL until restart");
        }
    }
}

/// Owns everything after the WAL: segments, manifest, checkpoints.
struct SegState {
    /// Held while the store runs; released before shutdown is confirmed so
    /// the directory can be reopened at once.
    lock: Option<fs::File>,
    dir: PathBuf,
    perms: Perms,
    manifest: ManifestAppender,
    signer: Signer,
    origin: String,
    checkpoint_counter: u64,
    last_checkpoint: Instant,
    /// The time the last checkpoint signed. After the wall clock steps back
    /// (NTP, a host that boots before its clock is set) by up to
    /// [`MAX_CLOCK_STEP_BACK_MS`], a checkpoint signs this time again
    /// instead: verify would otherwise report a checkpoint that went back
    /// in time on a directory nobody touched.
    last_checkpoint_ms: i64,
    checkpoint_every: Duration,
    /// The last checkpoint if it was an idle one, with its tree size.
    idle_prev: Option<(PathBuf, usize)>,
    /// Manifest lines a checkpoint signs: those it started with (the
    /// unsigned rest set aside), then those the last checkpoint it wrote
    /// signs.
    signed_lines: usize,
    retention_days: Option<u32>,
    last_retention: Option<Instant>,
    /// With retention on, the listed segments no retention entry has
    /// removed, in manifest order, each as a retention entry would list
    /// it: what a retention pass chooses from. Retention bounds it; with
    /// retention off it stays empty.
    segments_kept: Vec<RemovedSegment>,
    /// `last_seq` of the last segment listed (0 before the first).
    manifested_to: u64,
    /// Segment files retention entries name that may still be on disk: at
    /// a start, those a crash left behind after their entry was written;
    /// then those of this run's entries until a pass has deleted them.
    deletions_due: Vec<String>,
}

impl SegState {
    fn run(mut self, rx: mpsc::Receiver<SegMsg>, backlog: &SegmentBacklog) {
        #[allow(clippy::type_complexity)]
        let mut queue: std::collections::VecDeque<(
            Vec<Box<AuditRecord>>,
            usize,
            Vec<PathBuf>,
        )> = Default::default();
        loop {
            let wait = if queue.is_empty() {
                self.checkpoint_every
                    .saturating_sub(self.last_checkpoint.elapsed())
            } else {
                RETRY_EVERY
            };
            let mut stop = None;
            match rx.recv_timeout(wait) {
                Ok(SegMsg::Batch {
                    records,
                    bytes,
                    wal_files,
                }) => queue.push_back((records, bytes, wal_files)),
                Ok(SegMsg::Shutdown(done)) => stop = Some(done),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = Some(None),
            }
            while let Some((records, bytes, wal_files)) = queue.front() {
                // The WAL files' removal is part of the work: a removal or
                // directory sync that hangs (a stalled network file
                // system) must show as a stall, or the writer, waiting for
                // these bytes to be given back, would wait for ever.
                let written = backlog.busy(|| {
                    self.write_segments(records)?;
                    // The records are in manifested, checkpointed
                    // segments: only now may their WAL files go.
                    for f in wal_files {
                        if let Err(e) = fs::remove_file(f) {
                            warn!(file = %f.display(), error = %e, "could not remove WAL file");
                        }
                    }
                    let _ = fsutil::fsync_dir(&self.dir.join("wal"));
                    anyhow::Ok(())
                });
                match written {
                    Ok(()) => {
                        backlog.records.fetch_sub(records.len(), Ordering::AcqRel);
                        backlog.bytes.fetch_sub(*bytes, Ordering::AcqRel);
                        backlog.failing.store(false, Ordering::Release);
                        queue.pop_front();
                    }
                    Err(e) => {
                        backlog.failing.store(true, Ordering::Release);
                        error!(error = %e, "closing segment failed; will retry (records are safe in the WAL)");
                        break;
                    }
                }
            }
            if self.last_checkpoint.elapsed() >= self.checkpoint_every {
                // Idle checkpoints carry a fresh time, so a truncated tail
                // cannot pass as a quiet period.
                if let Err(e) = backlog.busy(|| self.idle_checkpoint()) {
                    error!(error = %e, "writing checkpoint failed");
                }
            }
            if self
                .last_retention
                .is_none_or(|t| t.elapsed() >= RETENTION_EVERY)
            {
                backlog.busy(|| self.run_retention());
            }
            if let Some(done) = stop {
                if !queue.is_empty() {
                    error!(
                        batches = queue.len(),
                        "shutting down with unclosed segments; they are rebuilt from the WAL at next start"
                    );
                }
                self.lock = None;
                if let Some(done) = done {
                    let _ = done.send(());
                }
                return;
            }
        }
    }

    /// Writes the records (sequence order) as one segment per run of equal
    /// days, each followed by its manifest entry, then one checkpoint.
    /// Records already manifested (a retried batch) are skipped; a retried
    /// batch whose segments were all manifested before its checkpoint
    /// failed still owes that checkpoint: its WAL files go once this
    /// returns, and entries nothing signs are not to outlive the records'
    /// only other copy.
    fn write_segments<R: Borrow<AuditRecord>>(&mut self, records: &[R]) -> anyhow::Result<()> {
        #[cfg(test)]
        if let Some(ms) = faults::take_segment_stall(&self.dir) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let done = self.manifested_to;
        let todo: Vec<&AuditRecord> = records
            .iter()
            .map(|r| r.borrow())
            .filter(|r| r.sequence > done)
            .collect();
        let mut start = 0;
        for i in 1..=todo.len() {
            if i == todo.len()
                || segment::day_number(todo[i].time) != segment::day_number(todo[start].time)
            {
                self.write_segment(todo[start..i].to_vec())?;
                start = i;
            }
        }
        self.sign_pending()
    }

    /// Signs the manifest lines no checkpoint signs yet, if there are any.
    fn sign_pending(&mut self) -> anyhow::Result<()> {
        if self.signed_lines != self.manifest.size() {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn write_segment(&mut self, mut records: Vec<&AuditRecord>) -> anyhow::Result<()> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let (first_seq, last_seq) = (first.sequence, last.sequence);
        let first_prev_hash = first.prev_record_hash.clone();
        let last_record_hash = last.record_hash.clone();
        let day = segment::day_of(first.time);
        // One pass over the records for everything the segment needs to know
        // of them: each pass reads 100 000 records that are no longer in any
        // cache, and separate ones (leaves, first time, last time, the sort's
        // check for order) cost about 0.02 µs a record each.
        let mut leaves = Vec::with_capacity(records.len());
        let (mut first_time, mut last_time) = (first.time, first.time);
        let mut in_time_order = true;
        let mut key_before = (first.time, first.sequence);
        for (expected_seq, r) in (first_seq..).zip(&records) {
            // The leaves, the first and last sequence and the kept link all
            // take the records' order for sequence order: check it, rather
            // than write a manifest entry that verify would reject.
            if r.sequence != expected_seq {
                anyhow::bail!(
                    "segment records out of sequence: {} where {expected_seq} was due",
                    r.sequence
                );
            }
            let h = merkle::decode_hash(&r.record_hash)
                .ok_or_else(|| anyhow::anyhow!("record {} has a malformed hash", r.sequence))?;
            leaves.push(merkle::leaf_hash(&h));
            first_time = first_time.min(r.time);
            last_time = last_time.max(r.time);
            let key = (r.time, r.sequence);
            in_time_order &= key_before <= key;
            key_before = key;
        }
        let merkle_root = hex::encode(merkle::root_from_leaf_hashes(&leaves));
        // Rows sorted by time for zone maps; sequence breaks ties so the
        // order is deterministic. Records arrive in sequence order, which
        // is usually time order too.
        if !in_time_order {
            records.sort_by_key(|r| (r.time, r.sequence));
        }

        let rel = segment::relative_path(&day, first_seq, last_seq);
        let path = self.dir.join(&rel);
        let parent = path
            .parent()
            .ok_or_else(|| anyhow::anyhow!("segment path has no parent"))?;
        self.perms.create_dir_all(&self.dir.join("records"))?;
        // Analysts read `records/**/*.parquet`, which does not follow a
        // symlink: a segment written through one would be signed and
        // verified, yet missing from every query. (Checked before the
        // day's directory is settled: its mode is not set through one.)
        for d in [self.dir.join("records"), parent.to_path_buf()] {
            if fs::symlink_metadata(&d).is_ok_and(|m| m.file_type().is_symlink()) {
                anyhow::bail!(
                    "{} is a symlink: segments are not written through one (queries over \
                     records/ do not follow it)",
                    d.display()
                );
            }
        }
        // Every segment's, not only the day's first: a first attempt that
        // failed after making the directory leaves it for this one.
        self.perms.create_settled_dir(parent)?;
        let tmp = fsutil::tmp_path(&path);
        let written = segment::write_file(&self.perms, &tmp, &records)?;
        fs::rename(&tmp, &path)?;
        fsutil::fsync_dir(parent)?;
        let entry = SegmentEntry {
            path: rel.clone(),
            sha256: written.sha256,
            bytes: written.bytes,
            merkle_root,
            first_seq,
            last_seq,
            record_count: records.len() as u64,
            first_time,
            last_time,
            first_prev_hash,
            last_record_hash,
            closed_at: now_ms(),
        };
        let line = self.manifest.size() as u64;
        let entry = Entry::Segment(entry);
        self.manifest.append(&self.dir, &self.perms, &entry)?;
        self.manifested_to = last_seq;
        if let (Some(_), Entry::Segment(s)) = (self.retention_days, &entry) {
            self.segments_kept.push(listed(line, s));
        }
        info!(segment = %rel, records = records.len(), bytes = written.bytes, "segment closed");
        Ok(())
    }

    fn checkpoint(&mut self) -> anyhow::Result<()> {
        self.write_checkpoint()?;
        self.idle_prev = None;
        Ok(())
    }

    /// A checkpoint whose only news is its time. The previous one, if it
    /// was idle too and signs the same tree, is then removed: it proves
    /// nothing the new one does not, and a year of minutes would otherwise
    /// leave half a million files. The first checkpoint of each tree size
    /// is always kept.
    fn idle_checkpoint(&mut self) -> anyhow::Result<()> {
        let size = self.manifest.size();
        let prev = self.idle_prev.take();
        self.write_checkpoint()?;
        let this = self
            .dir
            .join("checkpoints")
            .join(checkpoint::file_name(self.checkpoint_counter));
        if let Some((prev_path, prev_size)) = prev {
            if prev_size == size {
                let _ = fs::remove_file(&prev_path);
            }
        }
        self.idle_prev = Some((this, size));
        Ok(())
    }

    /// `lock` is the directory's lock (see [`lock_dir`]), released before
    /// shutdown is confirmed.
    fn new(
        cfg: &AuditConfig,
        lock: Option<fs::File>,
        perms: Perms,
        manifest: Manifest,
        signer: Signer,
    ) -> io::Result<SegState> {
        let (checkpoint_counter, last_checkpoint_ms) =
            checkpoint::last_counter_and_time(&cfg.dir.join("checkpoints"), &signer.public())?;
        let signed_lines = manifest.lines.len();
        // A removal lists segments by their line: the lines of every
        // removal so far are the listed segments already gone.
        // Without retention nothing is chosen from, nor deleted.
        let (segments_kept, deletions_due) = match cfg.retention_days {
            None => (Vec::new(), Vec::new()),
            Some(_) => retention_state(&cfg.dir, &manifest),
        };
        let manifested_to = manifest.last_segment().map_or(0, |s| s.last_seq);
        let manifest_appender = manifest.into_appender();
        Ok(SegState {
            lock,
            dir: cfg.dir.clone(),
            perms,
            manifest: manifest_appender,
            origin: {
                let origin = cfg.origin.clone().unwrap_or_else(|| signer.name.clone());
                match cfg.evidence_stream {
                    true => format!("{origin}{}", super::EVIDENCE_ORIGIN_SUFFIX),
                    false => origin,
                }
            },
            checkpoint_counter,
            last_checkpoint: Instant::now(),
            last_checkpoint_ms: last_checkpoint_ms.unwrap_or(i64::MIN),
            signer,
            checkpoint_every: Duration::from_secs(cfg.checkpoint_interval_secs.max(1)),
            idle_prev: None,
            // Callers set aside what no checkpoint signs first (see
            // `set_aside_unsigned_tail`).
            signed_lines,
            retention_days: cfg.retention_days,
            last_retention: None,
            segments_kept,
            manifested_to,
            deletions_due,
        })
    }

    fn write_checkpoint(&mut self) -> anyhow::Result<()> {
        // The counter comes from the highest checkpoint file name: one
        // planted with the largest number would otherwise wrap it to 0,
        // and the next checkpoints would overwrite the oldest signed ones.
        self.checkpoint_counter = self.checkpoint_counter.checked_add(1).ok_or_else(|| {
            anyhow::anyhow!(
                "checkpoint counter exhausted: a checkpoint file is numbered {}; no checkpoint \
                 is written over an earlier one",
                self.checkpoint_counter
            )
        })?;
        let now = now_ms();
        let time = if now >= self.last_checkpoint_ms {
            now
        } else if self.last_checkpoint_ms - now <= MAX_CLOCK_STEP_BACK_MS {
            self.last_checkpoint_ms
        } else {
            // Further than a clock step: the last checkpoint was signed with
            // a clock far ahead. Holding its time would keep every later
            // checkpoint in the future (and `--max-checkpoint-age-secs`
            // from ever firing); the real time is signed, and verify shows
            // the regression.
            error!(
                last_checkpoint_ms = self.last_checkpoint_ms,
                now_ms = now,
                "the last checkpoint is dated ahead of the wall clock by more than a clock step; signing the current time"
            );
            now
        };
        checkpoint::write(
            &self.dir.join("checkpoints"),
            &self.perms,
            &self.signer,
            &self.origin,
            &self.manifest,
            self.checkpoint_counter,
            time,
        )?;
        self.last_checkpoint = Instant::now();
        self.last_checkpoint_ms = time;
        self.signed_lines = self.manifest.size();
        checkpoint::thin(
            &self.dir.join("checkpoints"),
            self.checkpoint_counter,
            checkpoint::KEEP_RECENT,
            checkpoint::KEEP_EVERY,
        );
        Ok(())
    }

    /// Deletes segments whose newest record is older than the retention
    /// period. The deletion is first written as a manifest entry and
    /// checkpointed, then the files are removed, so verify can tell a
    /// retention from a loss.
    fn run_retention(&mut self) {
        self.last_retention = Some(Instant::now());
        let Some(days) = self.retention_days else {
            return;
        };
        if let Err(e) = self.retain(days, now_ms()) {
            error!(error = %e, "retention failed");
        }
    }

    pub(crate) fn retain(&mut self, days: u32, now: i64) -> anyhow::Result<()> {
        let cutoff = now - i64::from(days) * 86_400_000;
        let expired: Vec<RemovedSegment> = self
            .segments_kept
            .iter()
            .filter(|s| s.last_time < cutoff)
            .cloned()
            .collect();
        // A line no reader would refuse: see `manifest::MAX_LINE_BYTES`.
        for removed in expired.chunks(manifest::MAX_REMOVED_PER_ENTRY) {
            self.manifest.append(
                &self.dir,
                &self.perms,
                &Entry::Retention(RetentionEntry {
                    at: now,
                    retention_days: days,
                    removed: removed.to_vec(),
                }),
            )?;
            let lines: std::collections::HashSet<u64> = removed.iter().map(|r| r.line).collect();
            self.segments_kept.retain(|s| !lines.contains(&s.line));
            for r in removed {
                info!(segment = %r.path, "retention: deleting segment");
                self.deletions_due.push(r.path.clone());
            }
        }
        // Only a removal a checkpoint signs is carried out (one whose
        // checkpoint failed would be set aside at a crash and restart, see
        // `set_aside_unsigned_tail`, with its segments gone): this also
        // signs one an earlier run appended when its checkpoint failed.
        self.sign_pending()?;
        // A file that cannot be deleted now stays due, for the next pass.
        while let Some(rel) = self.deletions_due.last() {
            let path = self.dir.join(rel);
            match fs::remove_file(&path) {
                Ok(()) => {
                    if let Some(p) = path.parent() {
                        let _ = fsutil::fsync_dir(p);
                        // Empty day directories go too; ignore "not empty".
                        let _ = fs::remove_dir(p);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            self.deletions_due.pop();
        }
        Ok(())
    }
}

/// What a retention pass works from, as of the manifest a store starts
/// with: the listed segments no removal names yet, and the files removals
/// name that are still on disk (a crash between an entry and its
/// deletions).
fn retention_state(dir: &Path, manifest: &Manifest) -> (Vec<RemovedSegment>, Vec<String>) {
    let removed: Vec<&RemovedSegment> = manifest
        .entries
        .iter()
        .filter_map(|e| match e {
            Entry::Retention(r) => Some(r.removed.iter()),
            Entry::Segment(_) => None,
        })
        .flatten()
        .collect();
    let removed_lines: std::collections::HashSet<u64> = removed.iter().map(|r| r.line).collect();
    let kept = (0u64..)
        .zip(&manifest.entries)
        .filter_map(|(line, e)| match e {
            Entry::Segment(s) if !removed_lines.contains(&line) => Some(listed(line, s)),
            _ => None,
        })
        .collect();
    let due = removed
        .iter()
        .filter(|r| fs::symlink_metadata(dir.join(&r.path)).is_ok())
        .map(|r| r.path.clone())
        .collect();
    (kept, due)
}

/// A listed segment as a retention entry lists it.
fn listed(line: u64, s: &SegmentEntry) -> RemovedSegment {
    RemovedSegment {
        line,
        path: s.path.clone(),
        first_seq: s.first_seq,
        last_seq: s.last_seq,
        last_time: s.last_time,
    }
}

/// The state a crash between a segment's manifest entry and its
/// checkpoint leaves: every record in the WAL of the stopped store at `cfg`
/// written as a segment with its entry, and no checkpoint.
#[cfg(test)]
pub(crate) fn segment_without_checkpoint(cfg: &AuditConfig) {
    let perms = Perms::default();
    let signer = Signer::load_or_generate(cfg, &perms).expect("key");
    let (manifest, _) = Manifest::read(&cfg.dir).expect("manifest");
    let mut seg = SegState::new(cfg, None, perms, manifest, signer).expect("segment state");
    let records = wal::read_all(&cfg.dir.join("wal")).expect("WAL").records;
    seg.write_segment(records.iter().collect())
        .expect("segment");
}

/// Runs retention once on a closed store directory, as of `now` (epoch ms).
/// The daemon runs it hourly; this runs one pass at once (tests).
pub fn apply_retention(cfg: &AuditConfig, days: u32, now: i64) -> anyhow::Result<()> {
    let perms = Perms::for_group(cfg.auditor_group.as_deref())?;
    let signer = Signer::load_or_generate(cfg, &perms)?;
    let (manifest, bad) = Manifest::read(&cfg.dir)?;
    if let Some(bad) = bad {
        anyhow::bail!("manifest line {} is damaged: {}", bad.line + 1, bad.reason);
    }
    let lock = lock_dir(&cfg.dir, &perms)?;
    let signed = signed_lines(&cfg.dir, &manifest, &signer, cfg.evidence_stream)?;
    // Fails, changing nothing, if unsigned lines list records the WAL no
    // longer holds.
    replay_past_signed(&cfg.dir, &manifest, signed, &signer)?;
    let manifest = set_aside_unsigned_tail(&cfg.dir, manifest, signed, &perms)?;
    let cfg = AuditConfig {
        retention_days: Some(days),
        ..cfg.clone()
    };
    let mut seg = SegState::new(&cfg, Some(lock), perms, manifest, signer)?;
    seg.retain(days, now)
}

/// Test-only settings of a store, by its WAL directory: faults to inject
/// (a WAL write that writes only n bytes, then fails as a full disk
/// would; a failing sync of a retired WAL file) and a smaller segment
/// backlog byte bound.
#[cfg(test)]
pub(crate) mod faults {
    use std::{
        path::{Path, PathBuf},
        sync::Mutex,
    };

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Fault {
        /// The next write writes this many bytes, then fails (full disk).
        Write { partial_bytes: usize },
        /// The next sync the writer makes of a WAL file in `buffered`
        /// durability (when it retires the file or cuts a segment) fails.
        CatchUpSync,
        /// The next batch's write goes in whole, then its sync fails, and
        /// the failed batch is not cut off the file: a sync that reported
        /// failure after the data reached the disk, then a crash before
        /// the truncation did.
        SyncAfterWholeWrite,
        /// The segment backlog's byte bound (see `BACKLOG_BYTES`) of the
        /// store, read when it opens: the real one, 1 GiB, is too much for
        /// a test to fill.
        BacklogBytes(usize),
        /// The next manifest append (keyed by the audit directory) writes
        /// this many bytes of its line, then fails.
        ManifestWrite { partial_bytes: usize },
        /// The next cut of the manifest back to its lines fails.
        ManifestCut,
        /// The next segment write (keyed by the audit directory) hangs
        /// this many milliseconds first.
        SegmentStall(u64),
    }

    /// Faults planned for the store whose WAL directory is the path.
    static PLANNED: Mutex<Vec<(PathBuf, Fault)>> = Mutex::new(Vec::new());

    fn plan(wal_dir: &Path, fault: Fault) {
        if let Ok(mut planned) = PLANNED.lock() {
            planned.push((wal_dir.to_path_buf(), fault));
        }
    }

    fn take_first(wal_dir: &Path, which: impl Fn(Fault) -> bool) -> Option<Fault> {
        let mut planned = PLANNED.lock().ok()?;
        let at = planned
            .iter()
            .position(|(dir, fault)| dir == wal_dir && which(*fault))?;
        Some(planned.remove(at).1)
    }

    pub fn fail_next_write(wal_dir: &Path, partial_bytes: usize) {
        plan(wal_dir, Fault::Write { partial_bytes });
    }

    /// The partial length of a planned write failure, if one is planned.
    pub fn take(wal_dir: &Path) -> Option<usize> {
        match take_first(wal_dir, |f| matches!(f, Fault::Write { .. }))? {
            Fault::Write { partial_bytes } => Some(partial_bytes),
            _ => None,
        }
    }

    /// The next sync the writer makes of a WAL file in `wal_dir` to catch
    /// up with the background syncer fails.
    pub fn fail_next_catch_up_sync(wal_dir: &Path) {
        plan(wal_dir, Fault::CatchUpSync);
    }

    pub fn take_catch_up_sync(wal_dir: &Path) -> bool {
        take_first(wal_dir, |f| f == Fault::CatchUpSync).is_some()
    }

    pub fn fail_next_sync_after_whole_write(wal_dir: &Path) {
        plan(wal_dir, Fault::SyncAfterWholeWrite);
    }

    pub fn take_sync_after_whole_write(wal_dir: &Path) -> bool {
        take_first(wal_dir, |f| f == Fault::SyncAfterWholeWrite).is_some()
    }

    /// The store in `wal_dir`, opened next, bounds its segment backlog at
    /// `bytes`.
    pub fn limit_backlog_bytes(wal_dir: &Path, bytes: usize) {
        plan(wal_dir, Fault::BacklogBytes(bytes));
    }

    pub fn backlog_bytes_limit(wal_dir: &Path) -> Option<usize> {
        match take_first(wal_dir, |f| matches!(f, Fault::BacklogBytes(_)))? {
            Fault::BacklogBytes(bytes) => Some(bytes),
            _ => None,
        }
    }

    pub fn fail_next_manifest_write(audit_dir: &Path, partial_bytes: usize) {
        plan(audit_dir, Fault::ManifestWrite { partial_bytes });
    }

    pub fn take_manifest_write(audit_dir: &Path) -> Option<usize> {
        match take_first(audit_dir, |f| matches!(f, Fault::ManifestWrite { .. }))? {
            Fault::ManifestWrite { partial_bytes } => Some(partial_bytes),
            _ => None,
        }
    }

    pub fn stall_next_segment(audit_dir: &Path, ms: u64) {
        plan(audit_dir, Fault::SegmentStall(ms));
    }

    pub fn take_segment_stall(audit_dir: &Path) -> Option<u64> {
        match take_first(audit_dir, |f| matches!(f, Fault::SegmentStall(_)))? {
            Fault::SegmentStall(ms) => Some(ms),
            _ => None,
        }
    }

    pub fn fail_next_manifest_cut(audit_dir: &Path) {
        plan(audit_dir, Fault::ManifestCut);
    }

    pub fn take_manifest_cut(audit_dir: &Path) -> bool {
        take_first(audit_dir, |f| f == Fault::ManifestCut).is_some()
    }
}

#[cfg(test)]
mod syncer_tests {
    use super::*;

    fn wal_file(dir: &tempfile::TempDir) -> Arc<fs::File> {
        Arc::new(fs::File::create(dir.path().join("wal")).expect("file"))
    }

    fn write(file: &fs::File, syncer: &Syncer) {
        use std::io::Write as _;
        (&*file).write_all(b"record").expect("write");
        syncer.dirty();
    }

    fn wait_for_syncs(syncer: &Syncer, n: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while syncer.shared.syncs.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_background_sync_runs_at_most_once_per_interval() {
        let interval = Duration::from_millis(50);
        let syncer = Syncer::start(interval).expect("syncer");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = wal_file(&dir);
        syncer.follow(&file);
        // A write every millisecond for 300 ms: back to back, that would be
        // a sync after nearly every write.
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(300) {
            write(&file, &syncer);
            std::thread::sleep(Duration::from_millis(1));
        }
        let writing = start.elapsed();
        let syncs = syncer.shared.syncs.load(Ordering::Relaxed);
        let most = writing.as_millis() as u64 / interval.as_millis() as u64 + 1;
        assert!(
            (1..=most).contains(&syncs),
            "{syncs} syncs in {writing:?} (at most {most} with a {interval:?} interval)"
        );
    }

    #[test]
    fn a_write_during_a_sync_gets_a_sync_of_its_own() {
        let syncer = Syncer::start(Duration::from_millis(1)).expect("syncer");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = wal_file(&dir);
        syncer.follow(&file);
        let gate = lock(&syncer.shared.sync_gate);
        write(&file, &syncer);
        wait_for_syncs(&syncer, 1, "the first write was never synced");
        // The first sync has started and cannot finish: this write may
        // have missed it.
        write(&file, &syncer);
        drop(gate);
        wait_for_syncs(&syncer, 2, "a write made during a sync was never synced");
    }

    // fdatasync of /dev/null fails (EINVAL): a stand-in for a disk that
    // fails its syncs. The writer refuses its next batch on this report.
    #[test]
    fn a_failed_background_sync_is_reported_once_to_the_writer() {
        let syncer = Syncer::start(Duration::from_millis(1)).expect("syncer");
        let device = Arc::new(fs::File::open("/dev/null").expect("/dev/null"));
        syncer.follow(&device);
        syncer.dirty();
        let deadline = Instant::now() + Duration::from_secs(10);
        let failure = loop {
            if let Some(failure) = syncer.take_failure() {
                break failure;
            }
            assert!(Instant::now() < deadline, "no sync failure reported");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(!failure.is_empty());
        assert!(syncer.take_failure().is_none(), "reported once");
    }
}

#[cfg(test)]
mod segment_order_tests {
    use super::*;

    /// With retention on (30 days), as most tests want.
    fn seg_state(dir: &Path) -> SegState {
        seg_state_with(dir, Some(30))
    }

    fn seg_state_with(dir: &Path, retention_days: Option<u32>) -> SegState {
        let cfg = AuditConfig {
            retention_days,
            ..AuditConfig::new(dir)
        };
        let perms = Perms::for_group(None).expect("perms");
        for d in ["", "wal", "records", "checkpoints"] {
            perms.ensure_dir(&dir.join(d)).expect("dir");
        }
        let signer = Signer::load_or_generate(&cfg, &perms).expect("key");
        let (manifest, _) = Manifest::read(dir).expect("manifest");
        SegState::new(&cfg, None, perms, manifest, signer).expect("segment state")
    }

    fn record(sequence: u64) -> AuditRecord {
        AuditRecord {
            sequence,
            time: 1_700_000_000_000 + sequence as i64,
            record_hash: format!("{sequence:064x}"),
            prev_record_hash: format!("{:064x}", sequence - 1),
            ..AuditRecord::default()
        }
    }

    /// The manifest entry takes the records' order for sequence order: a
    /// gap or a swap is refused before anything is written, instead of a
    /// segment and an entry that verify would reject.
    #[test]
    fn records_out_of_sequence_are_refused_and_nothing_is_written() {
        for sequences in [vec![1, 2, 4], vec![1, 3, 2]] {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut seg = seg_state(dir.path());
            let records: Vec<AuditRecord> = sequences.iter().map(|&s| record(s)).collect();
            let err = seg
                .write_segment(records.iter().collect())
                .expect_err("out of sequence");
            assert!(
                err.to_string().contains("out of sequence"),
                "{sequences:?}: {err}"
            );
            assert!(seg.manifested_to == 0, "{sequences:?}: manifest entry");
            assert!(
                list_segment_files(dir.path()).expect("list").is_empty(),
                "{sequences:?}: segment file"
            );
        }
        // In sequence, the same records make a segment.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = seg_state(dir.path());
        let records: Vec<AuditRecord> = (1..=3).map(record).collect();
        seg.write_segment(records.iter().collect())
            .expect("in sequence");
        assert_eq!(seg.manifested_to, 3);
    }

    /// A day directory someone made a symlink (before the day came, or
    /// after) is not written through: DuckDB's `**` does not follow it, so
    /// the day's records would be signed and missing from every query.
    #[test]
    fn segments_are_not_written_through_a_symlinked_day_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let mut seg = seg_state(dir.path());
        let day = segment::day_of(record(1).time);
        std::os::unix::fs::symlink(
            elsewhere.path(),
            dir.path().join("records").join(format!("date={day}")),
        )
        .expect("symlink");
        let records: Vec<AuditRecord> = (1..=3).map(record).collect();
        let err = seg
            .write_segment(records.iter().collect())
            .expect_err("through a symlink");
        assert!(err.to_string().contains("is a symlink"), "{err}");
        assert!(seg.manifested_to == 0);
        assert_eq!(
            fs::read_dir(elsewhere.path()).expect("read").count(),
            0,
            "nothing written where the symlink leads"
        );
    }

    /// A batch whose segment was manifested but whose checkpoint failed is
    /// retried (its WAL files are kept until it succeeds); the retry finds
    /// no record left to write and must still sign the entry before it
    /// reports success, upon which the WAL files are deleted.
    #[test]
    fn a_retried_batch_signs_the_entries_its_failed_checkpoint_left_unsigned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = seg_state(dir.path());
        let records: Vec<AuditRecord> = (1..=3).map(record).collect();
        // Checkpoints cannot be written: their directory is a file.
        let checkpoints = dir.path().join("checkpoints");
        fs::remove_dir(&checkpoints).expect("remove");
        fs::write(&checkpoints, b"").expect("a file in its place");
        seg.write_segments(&records)
            .expect_err("the checkpoint fails");
        assert_eq!(seg.manifest.size(), 1, "the entry was appended");

        fs::remove_file(&checkpoints).expect("remove");
        fs::create_dir(&checkpoints).expect("dir");
        seg.write_segments(&records).expect("the retry");
        assert_eq!(seg.manifest.size(), 1, "nothing written twice");
        let key = seg.signer.public();
        let (_, newest) = checkpoint::list(&checkpoints)
            .expect("list")
            .pop()
            .expect("a checkpoint");
        let text = fs::read_to_string(newest).expect("read");
        let signed = checkpoint::open_note(&text, &key).expect("verifies");
        assert_eq!(signed.size, 1, "the retry signed the entry");
    }

    /// A retention pass deletes what entries since the last pass name, not
    /// every segment any entry ever removed (after a year, millions of
    /// unlinks an hour on the segment thread); the first pass of a run
    /// goes over them all, for deletions a crash left undone.
    #[test]
    fn a_retention_pass_does_not_delete_again_what_an_earlier_pass_did() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = seg_state(dir.path());
        let records: Vec<AuditRecord> = (1..=3).map(record).collect();
        seg.write_segments(&records).expect("segment");
        let file = dir
            .path()
            .join(&list_segment_files(dir.path()).expect("list")[0]);
        let now = records[2].time + 40 * 86_400_000;
        seg.retain(30, now).expect("retention");
        assert!(!file.exists(), "the expired segment was deleted");
        // Something at the removed path again: this run's next pass leaves
        // it (verify reports it); a new run's first pass deletes it.
        fs::create_dir_all(file.parent().expect("day directory")).expect("mkdir");
        fs::write(&file, b"not a segment").expect("write");
        seg.retain(30, now).expect("retention");
        assert!(file.exists(), "deleted again by a later pass");
        let mut restarted = seg_state(dir.path());
        restarted.retain(30, now).expect("retention");
        assert!(
            !file.exists(),
            "the first pass of a run goes over every entry"
        );
    }

    /// A removal of more segments than one entry lists is written as
    /// several entries, each a line every reader takes, all signed before
    /// anything is deleted.
    #[test]
    fn a_large_removal_is_split_into_entries_of_at_most_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = seg_state(dir.path());
        let records: Vec<AuditRecord> = (1..=5).map(record).collect();
        for r in &records {
            seg.write_segments(std::slice::from_ref(r))
                .expect("segment");
        }
        let now = records[4].time + 40 * 86_400_000;
        seg.retain(30, now).expect("retention");
        let removed: Vec<usize> = Manifest::read(dir.path())
            .expect("manifest")
            .0
            .entries
            .iter()
            .filter_map(|e| match e {
                Entry::Retention(r) => Some(r.removed.len()),
                Entry::Segment(_) => None,
            })
            .collect();
        assert_eq!(removed, [2, 2, 1]);
        assert!(list_segment_files(dir.path()).expect("list").is_empty());
        assert_eq!(seg.signed_lines, seg.manifest.size(), "all signed");
    }

    /// The running store keeps no manifest line, and with retention off
    /// nothing per segment at all: a daemon that runs for months appends a
    /// line every few seconds. With retention on it keeps what a pass
    /// chooses from, the segments not yet removed.
    #[test]
    fn the_running_store_keeps_per_segment_state_only_for_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = seg_state_with(dir.path(), None);
        let records: Vec<AuditRecord> = (1..=3).map(record).collect();
        for r in &records {
            seg.write_segments(std::slice::from_ref(r))
                .expect("segment");
        }
        assert_eq!(seg.manifest.size(), 3);
        assert!(seg.segments_kept.is_empty(), "retention is off");

        let mut with_retention = seg_state(dir.path());
        let kept: Vec<(u64, u64)> = with_retention
            .segments_kept
            .iter()
            .map(|s| (s.line, s.last_seq))
            .collect();
        assert_eq!(kept, [(0, 1), (1, 2), (2, 3)]);
        let now = records[0].time + 40 * 86_400_000;
        with_retention.retain(30, now).expect("retention");
        assert!(with_retention.segments_kept.is_empty(), "all removed");
        assert_eq!(
            seg_state(dir.path()).segments_kept,
            [],
            "none after a start"
        );
    }

    /// Retention deletes a segment only once a checkpoint signs the entry
    /// that removes it: an entry left unsigned would be set aside at the
    /// next start, and the segment it names must then still be there.
    #[test]
    fn retention_deletes_a_segment_only_once_a_checkpoint_signs_its_removal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = seg_state(dir.path());
        let records: Vec<AuditRecord> = (1..=3).map(record).collect();
        seg.write_segments(&records).expect("segment");
        let files = list_segment_files(dir.path()).expect("list");
        assert_eq!(files.len(), 1);
        // Long after the records' time: the segment has expired.
        let now = records[2].time + 40 * 86_400_000;
        let checkpoints = dir.path().join("checkpoints");
        fs::rename(&checkpoints, dir.path().join("checkpoints.away")).expect("move away");
        fs::write(&checkpoints, b"").expect("a file in its place");
        seg.retain(30, now).expect_err("the checkpoint fails");
        assert_eq!(seg.manifest.size(), 2, "the removal was appended");
        assert_eq!(
            list_segment_files(dir.path()).expect("list"),
            files,
            "an unsigned removal deleted the segment"
        );

        fs::remove_file(&checkpoints).expect("remove");
        fs::rename(dir.path().join("checkpoints.away"), &checkpoints).expect("move back");
        seg.retain(30, now).expect("retention");
        assert_eq!(seg.manifest.size(), 2, "the removal is not appended twice");
        assert!(
            list_segment_files(dir.path()).expect("list").is_empty(),
            "the signed removal deleted the segment"
        );
    }
}
