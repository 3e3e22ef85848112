//! `tollgate verify`: offline reconciliation of the kernel's evidence with
//! the gateway's audit, from the audit directory alone.
//!
//! - Every kernel-observed TCP connection to a protected target must be an
//!   upstream socket the gateway opened and audited: its socket cookie must
//!   equal the `upstream_socket_cookie` of an audit row. Anything else is a
//!   bypass, listed with process, cgroup, destination and time.
//! - The loss counters of every interval must be zero. A loss of the
//!   reserved ring buffer (connections and packets to protected targets)
//!   is reported apart from one of the general or the agents' ring
//!   buffer: only the first can hide a bypass.
//! - The protected targets come from the evidence stream's own `config`
//!   records, written at every start: no configuration file is needed.
//!   Each connection is judged against the targets of its time
//!   ([`super::in_force`]).
//!
//! The integrity of both streams (chain, segments, signed checkpoints) is
//! checked by the audit module's verification; see [`integrity`].

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use arrow_array::{Array, Int32Array, Int64Array, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

use super::{
    evidence_dir,
    in_force::{TargetChange, TargetsInForce},
    phase, ConfigSnapshot, LossReport, ProgramCounters, UserSpaceCounters,
};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("bad time {0:?}: give Unix milliseconds or YYYY-MM-DDTHH:MM:SSZ")]
    Time(String),
}

fn file_err(path: &Path, reason: impl ToString) -> VerifyError {
    VerifyError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The columns reconciliation reads from either stream.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub sequence: i64,
    pub phase: String,
    pub time: i64,
    pub pid: Option<i32>,
    pub process: String,
    pub cgroup_id: Option<i64>,
    pub dst_ip: String,
    pub dst_port: Option<i32>,
    pub cookie: Option<i64>,
    /// `connection_info_protocol_name`.
    pub protocol: String,
    pub unmapped: String,
    pub file: String,
}

/// Every `*.parquet` under `dir/records`, sorted by path.
fn segment_files(dir: &Path) -> Result<Vec<PathBuf>, VerifyError> {
    let files = crate::audit::verify::files_under_records(dir)
        .map_err(|e| file_err(&dir.join("records"), e))?;
    Ok(files
        .into_iter()
        .filter(|f| f.ends_with(".parquet"))
        .map(|f| dir.join(f))
        .collect())
}

fn col<'a, T: 'static>(
    batch: &'a RecordBatch,
    name: &str,
    path: &Path,
) -> Result<&'a T, VerifyError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| file_err(path, format!("column {name} missing")))?
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| file_err(path, format!("column {name} has an unexpected type")))
}

/// Reads the reconciliation columns of every closed segment of a stream.
pub fn read_rows(dir: &Path) -> Result<Vec<Row>, VerifyError> {
    read_rows_noting(dir, &mut Vec::new())
}

/// What identifies the bytes of a file as read: a file replaced after
/// its reading (renamed over, or rewritten in place) has another inode or
/// a later change time, and no user sets a change time back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileIdentity {
    fn of(meta: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The segment files read, each with what identified it as it was read.
type ReadFiles = Vec<(std::path::PathBuf, FileIdentity)>;

/// The segments of `read` that are no longer the files that were read:
/// replaced, changed or gone. Segments are never changed once written; a
/// segment that is another file now than when its rows were read may have
/// been swapped for the integrity checks, which read the directory again
/// by name, so they vouched for other bytes than the reconciliation used.
fn changed_since_read(read: &ReadFiles) -> Vec<String> {
    read.iter()
        .filter_map(|(path, then)| {
            let now = fs::symlink_metadata(path).map(|m| FileIdentity::of(&m));
            match now {
                Ok(now) if now == *then => None,
                Ok(_) => Some(format!(
                    "{}: the segment was replaced or changed while verify ran, after its rows \
                     were read: the integrity checks may not have read the bytes the \
                     reconciliation did; verify again, or verify a copy of the directory",
                    path.display()
                )),
                Err(err) => Some(format!(
                    "{}: the segment went while verify ran, after its rows were read ({err}): \
                     the integrity checks did not read the bytes the reconciliation did; verify \
                     again, or verify a copy of the directory",
                    path.display()
                )),
            }
        })
        .collect()
}

/// [`read_rows`], noting each segment file read in `read`.
fn read_rows_noting(dir: &Path, read: &mut ReadFiles) -> Result<Vec<Row>, VerifyError> {
    // The WAL is read before the segments are listed: a running daemon
    // deletes WAL files only once their records are in a manifested
    // segment, so a record moved meanwhile is found in one or the other
    // (in both, it counts once), never in neither.
    let wal_dir = dir.join("wal");
    let from_wal = wal_records_of(dir).map_err(|e| file_err(&wal_dir, e))?;
    let mut rows = Vec::new();
    for path in segment_files(dir)? {
        let file = fs::File::open(&path).map_err(|e| file_err(&path, e))?;
        // The identity of the open file: the bytes read are its bytes,
        // whatever the name points to later.
        let identity = file
            .metadata()
            .map(|m| FileIdentity::of(&m))
            .map_err(|e| file_err(&path, e))?;
        let decoded =
            crate::audit::decoding(|| read_file_rows(&path, file)).unwrap_or_else(|panic| {
                Err(file_err(
                    &path,
                    format!("the Parquet decoder failed on this file: {panic}"),
                ))
            });
        rows.extend(decoded?);
        read.push((path, identity));
    }
    // The records not yet in a segment: the last seconds of a running
    // daemon's, and after a kill (or a host that went down) everything
    // since its last cut, until a daemon starts again and replays them. A
    // bypass among them must not go unseen meanwhile.
    let in_segments: HashSet<i64> = rows.iter().map(|r| r.sequence).collect();
    let wal_file = wal_dir.display().to_string();
    for record in from_wal {
        let Ok(sequence) = i64::try_from(record.sequence) else {
            continue;
        };
        if in_segments.contains(&sequence) {
            continue;
        }
        rows.push(Row {
            sequence,
            phase: record.phase,
            time: record.time,
            pid: record.actor_process_pid,
            process: record.actor_process_name.to_string(),
            cgroup_id: record.actor_process_cgroup_id,
            dst_ip: record.dst_endpoint_ip.to_string(),
            dst_port: record.dst_endpoint_port,
            cookie: record.upstream_socket_cookie,
            protocol: record.connection_info_protocol_name.to_string(),
            unmapped: record.unmapped,
            file: wal_file.clone(),
        });
    }
    rows.sort_by_key(|r| r.sequence);
    Ok(rows)
}

/// The records of the WAL of the stream in `dir`. A file a running daemon
/// deletes between listing and reading (its records are in a segment by
/// then) makes the read start again.
fn wal_records_of(dir: &Path) -> std::io::Result<Vec<crate::audit::AuditRecord>> {
    let mut attempts = 0;
    loop {
        match crate::audit::wal_records(dir) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && attempts < 10 => {
                attempts += 1;
            }
            read => return read,
        }
    }
}

/// The rows of one segment file, read from `file`, opened at `path`.
fn read_file_rows(path: &Path, file: fs::File) -> Result<Vec<Row>, VerifyError> {
    let mut rows = Vec::new();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| file_err(path, e))?;
    for batch in reader {
        let batch = batch.map_err(|e| file_err(path, e))?;
        let sequence = col::<Int64Array>(&batch, "sequence", path)?;
        let phase = col::<StringArray>(&batch, "phase", path)?;
        let time = col::<Int64Array>(&batch, "time", path)?;
        let pid = col::<Int32Array>(&batch, "actor_process_pid", path)?;
        let process = col::<StringArray>(&batch, "actor_process_name", path)?;
        let cgroup = col::<Int64Array>(&batch, "actor_process_cgroup_id", path)?;
        let dst_ip = col::<StringArray>(&batch, "dst_endpoint_ip", path)?;
        let dst_port = col::<Int32Array>(&batch, "dst_endpoint_port", path)?;
        let cookie = col::<Int64Array>(&batch, "upstream_socket_cookie", path)?;
        let unmapped = col::<StringArray>(&batch, "unmapped", path)?;
        let protocol = col::<StringArray>(&batch, "connection_info_protocol_name", path)?;
        let opt32 = |a: &Int32Array, i| (!a.is_null(i)).then(|| a.value(i));
        let opt64 = |a: &Int64Array, i| (!a.is_null(i)).then(|| a.value(i));
        for i in 0..batch.num_rows() {
            rows.push(Row {
                sequence: sequence.value(i),
                phase: phase.value(i).to_owned(),
                time: time.value(i),
                pid: opt32(pid, i),
                process: process.value(i).to_owned(),
                cgroup_id: opt64(cgroup, i),
                dst_ip: dst_ip.value(i).to_owned(),
                dst_port: opt32(dst_port, i),
                cookie: opt64(cookie, i),
                protocol: protocol.value(i).to_owned(),
                unmapped: unmapped.value(i).to_owned(),
                file: path.display().to_string(),
            });
        }
    }
    Ok(rows)
}

/// A connection (or packet) the kernel saw that the audit does not account
/// for.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Bypass {
    /// `direct_from_agent_cgroup`, `gateway_upstream_not_audited`,
    /// `unaudited_connection_to_protected_target`,
    /// `non_tcp_packet_to_protected_target` or `open_before_watch`.
    pub finding: String,
    pub time_ms: i64,
    pub time: String,
    pub pid: Option<i32>,
    pub process: String,
    pub cgroup_id: Option<i64>,
    /// The agent cgroup's path when the cgroup is one.
    pub cgroup_path: Option<String>,
    pub destination: String,
    pub target: String,
    pub socket_cookie: Option<i64>,
    /// Packet findings: the IP protocol (`udp`, `tcp` from a raw socket,
    /// or the protocol number), the sending socket's type, and how many
    /// packets of that socket the record stands for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_type: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packets: Option<u64>,
    pub evidence_sequence: i64,
}

impl Bypass {
    /// The finding `finding` about the evidence row `row`: its when, who
    /// and where (`destination`, of protected target `target`); no packet
    /// details.
    fn of(
        row: &Row,
        finding: &str,
        destination: String,
        target: String,
        agent_cgroups: &HashMap<i64, String>,
    ) -> Self {
        Bypass {
            finding: finding.into(),
            time_ms: row.time,
            time: format_time(row.time),
            pid: row.pid,
            process: row.process.clone(),
            cgroup_id: row.cgroup_id,
            cgroup_path: row.cgroup_id.and_then(|c| agent_cgroups.get(&c).cloned()),
            destination,
            target,
            socket_cookie: row.cookie,
            protocol: None,
            socket_type: None,
            packets: None,
            evidence_sequence: row.sequence,
        }
    }
}

/// The time from a boot of the host to the daemon's first start in that
/// boot. The kernel programs and their pins do not outlive a reboot: until
/// the daemon starts again, agents' connections are neither redirected nor
/// recorded, and events the daemon had not read before the reboot are
/// gone. Only the host's service ordering (agents started after tollgate)
/// keeps agents from running then; the evidence cannot show what they did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UnwatchedWindow {
    pub boot_id: String,
    pub booted_at_ms: i64,
    pub booted_at: String,
    /// The daemon's start (its config record).
    pub watched_from_ms: i64,
    pub watched_from: String,
    pub seconds: f64,
}

/// The end of a boot after its last loss record: what the programs saw
/// then and the reader had not written when the host went down (a crash,
/// or a reboot with the daemon stopped while the pinned probe still ran)
/// went with the ring buffers, which do not outlive a reboot, and no
/// loss record counts it. Listed, not judged, as the window after a boot
/// is (see [`UnwatchedWindow`]).
#[derive(Debug, Clone, Serialize)]
pub struct UnjudgedBeforeReboot {
    pub boot_id: String,
    pub last_loss_record_ms: i64,
    pub last_loss_record: String,
    /// When the next boot began.
    pub rebooted_at_ms: i64,
    pub rebooted_at: String,
    pub seconds: f64,
}

/// A start of the daemon: when (its config record's time), the boot it
/// ran in (`boot_id`, empty when the record names none) and when that
/// boot began.
type Start = (i64, String, Option<i64>);

/// The starts, in time order, that are the first of their boot: the
/// first start, each start whose boot differs from the one before, and
/// every start whose record names no boot (it may follow a reboot).
fn first_starts_of_boots(starts: &[Start]) -> impl Iterator<Item = &Start> {
    let mut previous_boot: Option<&str> = None;
    starts.iter().filter(move |(_, boot, _)| {
        let new_boot = boot.is_empty() || previous_boot != Some(boot.as_str());
        previous_boot = Some(boot.as_str());
        new_boot
    })
}

/// The windows of [`UnwatchedWindow`] that overlap `[from, to]`, from the
/// first start of each boot ([`first_starts_of_boots`]).
fn unwatched_after_boot(
    boot_starts: &[&Start],
    from: Option<i64>,
    to: Option<i64>,
) -> Vec<UnwatchedWindow> {
    let mut windows = Vec::new();
    for (started, boot, booted_at) in boot_starts.iter().copied() {
        let Some(booted_at) = *booted_at else {
            continue;
        };
        let overlaps = from.is_none_or(|f| *started >= f) && to.is_none_or(|t| booted_at <= t);
        if overlaps {
            windows.push(UnwatchedWindow {
                boot_id: boot.clone(),
                booted_at_ms: booted_at,
                booted_at: format_time(booted_at),
                watched_from_ms: *started,
                watched_from: format_time(*started),
                seconds: (*started - booted_at).max(0) as f64 / 1000.0,
            });
        }
    }
    windows
}

/// A loss_counters record whose counters of the general ring buffer, or
/// of the agents' ring buffer, grew since the previous one: some of the
/// host's other connections, or some redirects and refusals of the agent
/// cgroups, may be missing from the evidence. Neither can hide a bypass.
/// (Recursion misses can: they are [`ReservedLoss`]es.)
#[derive(Debug, Clone, Serialize)]
pub struct Loss {
    pub time_ms: i64,
    pub evidence_sequence: i64,
    /// Of what was lost, the agent cgroups' redirects and refusals (their
    /// own ring buffer's): none was a connection that reached a target.
    pub agent_events_lost: u64,
    /// What was lost in this interval.
    pub delta: LossReport,
    /// The cumulative counters as recorded.
    pub report: serde_json::Value,
}

/// The problem a start reports that found the pins of its boot removed.
pub const PINS_REMOVED: &str = "pins_removed";

/// The finding of a [`ReservedLoss`].
pub const RESERVED_EVIDENCE_LOST: &str = "protected_target_evidence_lost";

/// A loss_counters record whose counters of events about protected
/// targets grew since the previous one: connections or packets to
/// protected targets were lost in the interval. Any of them may have been
/// a bypass, so the interval's verdict cannot exclude one, whatever else
/// it shows.
#[derive(Debug, Clone, Serialize)]
pub struct ReservedLoss {
    /// [`RESERVED_EVIDENCE_LOST`].
    pub finding: String,
    pub time_ms: i64,
    pub time: String,
    pub evidence_sequence: i64,
    /// Connections and packets to protected targets lost in the
    /// interval.
    pub events: u64,
    /// Of those, dropped by each program (only programs that dropped).
    pub dropped_by_program: BTreeMap<String, u64>,
    /// Of those, read from the ring buffer but malformed or unwritten.
    pub lost_in_user_space: u64,
}

impl ReservedLoss {
    fn of(time_ms: i64, evidence_sequence: i64, delta: &LossReport) -> Self {
        ReservedLoss {
            finding: RESERVED_EVIDENCE_LOST.into(),
            time_ms,
            time: format_time(time_ms),
            evidence_sequence,
            events: delta.reserved_lost(),
            dropped_by_program: delta
                .dropped_by_own_ring(true)
                .map(|(name, n)| (name.to_owned(), n))
                .collect(),
            lost_in_user_space: delta.reserved_lost_in_user_space(),
        }
    }
}

/// `cur - prev`, or `cur` when the counter went down (a counter map made
/// again within one boot started counting from zero: nothing in the
/// records names the map, so only the fall shows it).
fn grew(prev: u64, cur: u64) -> u64 {
    if cur >= prev {
        cur - prev
    } else {
        cur
    }
}

/// What one interval added to the counters. Kernel counters live in a
/// pinned map and accumulate across daemon restarts, not across reboots;
/// recursion misses belong to one program instance (compared only while
/// its id is the same); user-space counters restart with each daemon.
/// `prev` is the baseline: the caller leaves out what a daemon start or a
/// reboot since the previous record restarted (see [`reconcile`]).
pub fn interval_delta(prev: Option<&LossReport>, cur: &LossReport) -> LossReport {
    let mut out = LossReport {
        interval_ms: cur.interval_ms,
        ..LossReport::default()
    };
    for (name, c) in &cur.programs {
        let p = prev.and_then(|p| p.programs.get(name));
        let zero = ProgramCounters::default();
        let p_or = p.unwrap_or(&zero);
        let before = p.and_then(|p| p.program_id);
        let misses = match (before, c.program_id) {
            (Some(a), Some(b)) if a == b => grew(
                p_or.recursion_misses.unwrap_or(0),
                c.recursion_misses.unwrap_or(0),
            ),
            _ => c.recursion_misses.unwrap_or(0),
        };
        // The instance a start replaced (see `ProgramCounters::replaced`):
        // what it missed after the record before, or all it missed when no
        // record before is of it (its daemon wrote none).
        let replaced_misses = match c.replaced {
            Some(r) if c.program_id == Some(r.program_id) => 0,
            Some(r) if before == Some(r.program_id) => {
                grew(p_or.recursion_misses.unwrap_or(0), r.recursion_misses)
            }
            Some(r) => r.recursion_misses,
            None => 0,
        };
        let misses = misses.saturating_add(replaced_misses);
        out.programs.insert(
            name.clone(),
            ProgramCounters {
                seen: grew(p_or.seen, c.seen),
                emitted: grew(p_or.emitted, c.emitted),
                dropped: grew(p_or.dropped, c.dropped),
                emitted_reserved: grew(p_or.emitted_reserved, c.emitted_reserved),
                dropped_reserved: grew(p_or.dropped_reserved, c.dropped_reserved),
                suppressed: c
                    .suppressed
                    .map(|cur| grew(p_or.suppressed.unwrap_or(0), cur)),
                recursion_misses: (c.recursion_misses.is_some() || c.replaced.is_some())
                    .then_some(misses),
                program_id: c.program_id,
                replaced: None,
            },
        );
    }
    let pu = prev.map(|p| p.user_space).unwrap_or_default();
    out.user_space = UserSpaceCounters {
        received: grew(pu.received, cur.user_space.received),
        malformed: grew(pu.malformed, cur.user_space.malformed),
        write_failed: grew(pu.write_failed, cur.user_space.write_failed),
        write_retried: grew(pu.write_retried, cur.user_space.write_retried),
        reserved_received: grew(pu.reserved_received, cur.user_space.reserved_received),
        reserved_malformed: grew(pu.reserved_malformed, cur.user_space.reserved_malformed),
        reserved_write_failed: grew(
            pu.reserved_write_failed,
            cur.user_space.reserved_write_failed,
        ),
        agents_received: grew(pu.agents_received, cur.user_space.agents_received),
        agents_malformed: grew(pu.agents_malformed, cur.user_space.agents_malformed),
        agents_write_failed: grew(pu.agents_write_failed, cur.user_space.agents_write_failed),
    };
    out
}

/// What the integrity check of one stream found.
#[derive(Debug, Clone, Serialize)]
pub struct Integrity {
    pub checked: bool,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub dir: String,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub audit_integrity: Integrity,
    pub evidence_integrity: Integrity,
    pub config_records: usize,
    /// The targets in force at some moment of the window (`name
    /// address`; see [`TargetsInForce::during`]).
    pub protected_targets: Vec<String>,
    /// Targets added or removed by a start in the window: a connection is
    /// judged against the targets in force at its time.
    pub target_changes: Vec<TargetChange>,
    pub agent_cgroups: Vec<String>,
    /// TCP active opens the kernel saw in the window, host-wide.
    pub tcp_connections: usize,
    /// ... of which to a protected target.
    pub to_protected_targets: usize,
    /// ... of which matched an audited gateway upstream.
    pub audited_upstreams: usize,
    /// Connections from agent cgroups that the kernel redirected to tollgate
    /// (its `redirected` events, one per socket).
    pub redirected: usize,
    /// Attempts the kernel refused (UDP to a target, raw sockets, egress).
    pub refused: usize,
    /// TCP connections from agent cgroups to other destinations (allowed
    /// egress).
    pub agent_other_egress: usize,
    /// Packet records: packets to a protected target from a socket that
    /// is not a TCP stream socket (each one is also a bypass).
    pub non_tcp_packets: usize,
    pub loss_records: usize,
    /// From each boot of the host to the daemon's first start in it:
    /// nothing was redirected or recorded then (see [`UnwatchedWindow`]).
    pub unwatched_after_boot: Vec<UnwatchedWindow>,
    /// From each boot's last loss record to the next boot (see
    /// [`UnjudgedBeforeReboot`]).
    pub unjudged_before_reboot: Vec<UnjudgedBeforeReboot>,
    /// Starts whose list of the connections already open could not read
    /// every process (see `open_at_start`): said, not judged, as the
    /// unwatched windows are.
    pub open_at_start_unread: Vec<String>,
    pub bypasses: Vec<Bypass>,
    /// Intervals that lost events of the general ring buffer (or whose
    /// probe was skipped): other connections of the host; or of the
    /// agents' ring buffer: their redirects and refusals.
    pub losses: Vec<Loss>,
    /// Intervals that lost connections or packets to protected targets:
    /// a bypass in them cannot be excluded.
    pub reserved_losses: Vec<ReservedLoss>,
    pub problems: Vec<String>,
}

/// The integrity verification of one stream (hash chain, segment hashes,
/// Merkle roots, signed checkpoints, WAL): the audit module's own
/// `tollgate audit verify`, which prints its summary. Run in this process
/// and its report taken as returned: a report file in a shared temp
/// directory could be replaced between its writing and its reading.
pub mod integrity {
    use std::path::Path;

    use super::Integrity;
    use crate::audit::verify_and_summarise;

    pub fn verify_stream(
        dir: &Path,
        public_key: &Path,
        max_checkpoint_age_secs: Option<u64>,
    ) -> Integrity {
        let (ok, detail) =
            match verify_and_summarise(dir, public_key, max_checkpoint_age_secs, None) {
                Err(err) => (false, format!("{err:#}")),
                Ok(r) if r.ok => (true, format!("{} records", r.records)),
                Ok(r) => (
                    false,
                    format!(
                        "{} problems (`tollgate audit verify {}`)",
                        r.problems.len(),
                        dir.display()
                    ),
                ),
            };
        Integrity {
            checked: true,
            ok,
            detail,
        }
    }
}

/// Options of a verification run.
pub struct Options {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Check the integrity of both streams (off: reconciliation only, and
    /// the report says the streams were not checked).
    pub require_integrity: bool,
    /// Each stream's latest valid checkpoint must be at most this old
    /// (see `tollgate audit verify --max-checkpoint-age-secs`): on a
    /// directory just collected from a running daemon, which signs on a
    /// timer while idle, an older one means its newest part was cut off.
    pub max_checkpoint_age_secs: Option<u64>,
}

/// Parses `--from`/`--to`: Unix milliseconds or `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_time(text: &str) -> Result<i64, VerifyError> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let bad = || VerifyError::Time(text.to_owned());
    let t = text.strip_suffix('Z').ok_or_else(bad)?;
    let (date, clock) = t.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(|p| p.parse())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let c: Vec<i64> = clock
        .split(':')
        .map(|p| p.parse())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    if d.len() != 3 || c.len() != 3 {
        return Err(bad());
    }
    let month = time::Month::try_from(u8::try_from(d[1]).map_err(|_| bad())?).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(
        i32::try_from(d[0]).map_err(|_| bad())?,
        month,
        u8::try_from(d[2]).map_err(|_| bad())?,
    )
    .map_err(|_| bad())?;
    let clock = time::Time::from_hms(
        u8::try_from(c[0]).map_err(|_| bad())?,
        u8::try_from(c[1]).map_err(|_| bad())?,
        u8::try_from(c[2]).map_err(|_| bad())?,
    )
    .map_err(|_| bad())?;
    Ok(time::PrimitiveDateTime::new(date, clock)
        .assume_utc()
        .unix_timestamp()
        * 1000)
}

fn format_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

use crate::pin::normalise;

fn destination(row: &Row) -> Option<SocketAddr> {
    let port = u16::try_from(row.dst_port?).ok()?;
    Some(SocketAddr::new(destination_ip(row)?, port))
}

/// The row's destination address, IPv4-mapped shown as IPv4 (see
/// [`normalise`]).
fn destination_ip(row: &Row) -> Option<IpAddr> {
    let ip: IpAddr = row.dst_ip.parse().ok()?;
    Some(normalise(SocketAddr::new(ip, 0)).ip())
}

fn kind(row: &Row) -> String {
    serde_json::from_str::<serde_json::Value>(&row.unmapped)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

/// Reconciles the streams of `dir`.
pub fn verify(dir: &Path, public_key: &Path, opts: &Options) -> Result<Report, VerifyError> {
    let mut read = ReadFiles::new();
    let evidence = read_rows_noting(&evidence_dir(dir), &mut read)?;
    let audit = read_rows_noting(dir, &mut read)?;
    let check = |stream: &Path| {
        if opts.require_integrity {
            integrity::verify_stream(stream, public_key, opts.max_checkpoint_age_secs)
        } else {
            Integrity {
                checked: false,
                ok: false,
                detail: "skipped (--reconcile-only)".into(),
            }
        }
    };
    let (audit_integrity, evidence_integrity) = (check(dir), check(&evidence_dir(dir)));
    let mut report = reconcile(
        dir,
        &audit,
        &evidence,
        audit_integrity,
        evidence_integrity,
        opts,
    );
    // Only once the integrity checks are done: a segment swapped for them
    // and back would otherwise go unseen.
    let changed = changed_since_read(&read);
    if !changed.is_empty() {
        report.ok = false;
        report.problems.extend(changed);
    }
    Ok(report)
}

/// How far apart the kernel's record of a gateway connection and the audit
/// record naming its socket's cookie may be. The audit record follows the
/// connection by at most the upstream login's timeout; the rest is room for
/// the wall clock to be stepped between the two.
const COOKIE_WINDOW_MS: i64 = 10 * 60 * 1000;

/// How close in time two reports of one connection (by the old and the
/// new probe during a restart) are.
const DUPLICATE_WINDOW_MS: i64 = 5_000;

/// The problem of a window whose end no loss record covers.
pub const WINDOW_END_NOT_COVERED: &str = "window end not covered by a loss record";

/// The reconciliation itself, on rows already read.
pub fn reconcile(
    dir: &Path,
    audit: &[Row],
    evidence: &[Row],
    audit_integrity: Integrity,
    evidence_integrity: Integrity,
    opts: &Options,
) -> Report {
    let in_window =
        |t: i64| opts.from_ms.is_none_or(|f| t >= f) && opts.to_ms.is_none_or(|e| t <= e);
    let mut problems = Vec::new();

    // What was protected when: every config record counts, whatever the
    // window, since the record in force at the window's start may be
    // older than it.
    let mut snapshots: Vec<(i64, i64, ConfigSnapshot)> = Vec::new();
    let mut listeners: HashSet<SocketAddr> = HashSet::new();
    let mut agent_cgroups: HashMap<i64, String> = HashMap::new();
    let mut config_records = 0;
    let mut starts: Vec<Start> = Vec::new();
    for row in evidence.iter().filter(|r| r.phase == phase::CONFIG) {
        match serde_json::from_str::<ConfigSnapshot>(&row.unmapped) {
            Ok(snapshot) => {
                config_records += 1;
                starts.push((row.time, snapshot.boot_id.clone(), snapshot.booted_at_ms));
                for t in &snapshot.protected_targets {
                    listeners.insert(normalise(t.listen));
                }
                for c in &snapshot.agent_cgroups {
                    if let Ok(id) = i64::try_from(c.id) {
                        agent_cgroups.insert(id, c.path.clone());
                    }
                }
                snapshots.push((row.time, row.sequence, snapshot));
            }
            Err(err) => problems.push(format!(
                "evidence record {}: unreadable config record: {err}",
                row.sequence
            )),
        }
    }
    let targets = TargetsInForce::new(snapshots.iter().map(|(time, seq, s)| (*time, *seq, s)));
    // For naming: the kernel matched packets and the start's scan matched
    // open connections against the targets of their time.
    let ever_protected = targets.ever();
    if config_records == 0 {
        problems.push(
            "the evidence stream has no config record: the protected targets are unknown".into(),
        );
    }

    // Socket cookies are unique within one boot of the host and start again
    // at every boot: a connection counts as the gateway's only if a record
    // with its cookie was written around the time the kernel saw it (see
    // COOKIE_WINDOW_MS), so an old audited cookie cannot cover a later
    // bypass that happens to get the same number.
    let mut audited: HashMap<i64, Vec<i64>> = HashMap::new();
    for r in audit {
        if let Some(cookie) = r.cookie {
            audited.entry(cookie).or_default().push(r.time);
        }
    }
    // Every boot is followed by a start of the daemon, whose config record
    // names the boot: a connection and the record of its cookie must also
    // fall in the same boot, so a cookie numbered again after a reboot,
    // however soon, is not covered by one audited before it. (A start whose
    // record names no boot counts as a new one.)
    starts.sort_unstable();
    let boot_starts: Vec<&Start> = first_starts_of_boots(&starts).collect();
    // A boot begins at the boot itself, not at the daemon's config record:
    // the daemon attaches its probes before it writes that record, so the
    // first connections of a boot may carry earlier times than it, and
    // must not fall in the boot before.
    let mut boots: Vec<i64> = boot_starts
        .iter()
        .map(|(time, _, booted_at)| booted_at.map_or(*time, |b| b.min(*time)))
        .collect();
    boots.sort_unstable();
    let epoch = |time: i64| boots.partition_point(|&start| start <= time);
    let audited_at = |cookie: i64, time: i64| {
        audited.get(&cookie).is_some_and(|times| {
            times
                .iter()
                .any(|&t| (t - time).abs() <= COOKIE_WINDOW_MS && epoch(t) == epoch(time))
        })
    };
    let redirected: HashSet<i64> = evidence
        .iter()
        .filter(|r| r.phase == phase::EVIDENCE && kind(r) == "redirected")
        .filter_map(|r| r.cookie)
        .collect();
    // The daemon's process ids, one per start. (Its threads' comm is the
    // runtime's worker name, not "tollgate", so the pid is what tells.)
    // ... and their cgroups, with the boots each ran in. A gateway
    // upstream is the daemon's own connect: a cookie alone does not make
    // one. Cookies are counted per network namespace on older kernels, so
    // another namespace's socket may carry a number the gateway's had;
    // and an audit record only in the WAL, which no checkpoint signs yet,
    // could have been written by anyone who can write the directory,
    // naming any cookie. The daemon's pid as it wrote it is its own pid
    // namespace's, the kernel's the host's: a daemon in a container is
    // known by its cgroup, unless that is a cgroup everything may be in:
    // the root (id 1), or an agent cgroup (a daemon started inside one is
    // refused, but its record would vouch for every agent).
    // Events written before the stream's first config record that
    // retention left are those of a daemon whose own record it removed:
    // there the cookie alone must do, as it did before pids were checked.
    let mut gateway_pids: HashSet<i32> = HashSet::new();
    let mut gateway_runs: HashSet<(i32, usize)> = HashSet::new();
    let mut gateway_cgroups: HashSet<(i64, usize)> = HashSet::new();
    let mut first_config: Option<i64> = None;
    for r in evidence.iter().filter(|r| r.phase == phase::CONFIG) {
        first_config = Some(first_config.map_or(r.sequence, |first| first.min(r.sequence)));
        let run = epoch(r.time);
        if let Some(pid) = r.pid {
            gateway_pids.insert(pid);
            gateway_runs.insert((pid, run));
        }
        if let Some(cgroup) = r
            .cgroup_id
            .filter(|&c| c > 1 && !agent_cgroups.contains_key(&c))
        {
            gateway_cgroups.insert((cgroup, run));
        }
    }
    let made_by_gateway = |row: &Row| {
        let run = epoch(row.time);
        first_config.is_none_or(|first| row.sequence < first)
            || row.pid.is_some_and(|p| gateway_runs.contains(&(p, run)))
            || row
                .cgroup_id
                .is_some_and(|c| gateway_cgroups.contains(&(c, run)))
    };

    let mut report = Report {
        ok: false,
        dir: dir.display().to_string(),
        from_ms: opts.from_ms,
        to_ms: opts.to_ms,
        audit_integrity,
        evidence_integrity,
        config_records,
        protected_targets: targets
            .during(opts.from_ms, opts.to_ms)
            .iter()
            .map(|(a, n)| format!("{n} {a}"))
            .collect(),
        target_changes: targets.changes(in_window),
        agent_cgroups: agent_cgroups
            .iter()
            .map(|(id, p)| format!("{p} (id {id})"))
            .collect(),
        tcp_connections: 0,
        to_protected_targets: 0,
        audited_upstreams: 0,
        redirected: 0,
        refused: 0,
        agent_other_egress: 0,
        non_tcp_packets: 0,
        loss_records: 0,
        unwatched_after_boot: unwatched_after_boot(&boot_starts, opts.from_ms, opts.to_ms),
        unjudged_before_reboot: Vec::new(),
        open_at_start_unread: Vec::new(),
        bypasses: Vec::new(),
        losses: Vec::new(),
        reserved_losses: Vec::new(),
        problems: Vec::new(),
    };
    // (cookie, address, port) -> when it was last seen.
    let mut seen_connections: HashMap<(i64, String, Option<i32>), i64> = HashMap::new();
    // Redirects counted once per socket: a restart may report one twice.
    let mut redirects_seen: HashSet<i64> = HashSet::new();
    for row in evidence.iter().filter(|r| in_window(r.time)) {
        match (row.phase.as_str(), kind(row).as_str()) {
            (phase::EVIDENCE, "redirected")
                if row.cookie.is_none_or(|c| redirects_seen.insert(c)) =>
            {
                report.redirected += 1
            }
            (phase::EVIDENCE, "tcp_connect") => {
                // During a restart two probes may both report a connection:
                // the same socket to the same address at the same moment.
                // A socket that connects again elsewhere keeps its cookie,
                // and that is a connection of its own; so is a later one
                // with the same number (cookies restart at every boot).
                if let Some(cookie) = row.cookie {
                    let key = (cookie, row.dst_ip.clone(), row.dst_port);
                    match seen_connections.get(&key) {
                        Some(seen) if (row.time - seen).abs() <= DUPLICATE_WINDOW_MS => continue,
                        _ => {
                            seen_connections.insert(key, row.time);
                        }
                    }
                }
                report.tcp_connections += 1;
                let dst = destination(row);
                let from_agent = row
                    .cgroup_id
                    .is_some_and(|c| agent_cgroups.contains_key(&c));
                if let Some(target) = dst.and_then(|d| targets.at(row.time, row.sequence, d)) {
                    report.to_protected_targets += 1;
                    if made_by_gateway(row) && row.cookie.is_some_and(|c| audited_at(c, row.time)) {
                        report.audited_upstreams += 1;
                        continue;
                    }
                    let finding = if from_agent {
                        "direct_from_agent_cgroup"
                    } else if row.pid.is_some_and(|p| gateway_pids.contains(&p)) {
                        "gateway_upstream_not_audited"
                    } else {
                        "unaudited_connection_to_protected_target"
                    };
                    report.bypasses.push(Bypass::of(
                        row,
                        finding,
                        dst.map(|d| d.to_string()).unwrap_or_default(),
                        target.to_owned(),
                        &agent_cgroups,
                    ));
                } else if row.cookie.is_some_and(|c| redirected.contains(&c))
                    || dst.is_some_and(|d| listeners.contains(&d)) && from_agent
                {
                    // Counted from the `redirected` events themselves
                    // (above): those are in the agents' ring buffer, this
                    // connect to the listener in the general one, which a
                    // flood may have cut short.
                } else if from_agent {
                    report.agent_other_egress += 1;
                }
            }
            (phase::EVIDENCE, "packet_to_protected_target") => {
                // PostgreSQL, SSH and the Kubernetes API are TCP services
                // the gateway fronts; no legitimate path sends them UDP or
                // hand-made packets. Every such record is a finding, from
                // whatever cgroup (an agent's would have been refused, so
                // one from an agent cgroup means a socket made outside it).
                report.non_tcp_packets += 1;
                let dst = destination(row);
                let extra: serde_json::Value =
                    serde_json::from_str(&row.unmapped).unwrap_or_default();
                // A packet whose ports the kernel could not read was matched
                // by its address alone: it may be for any target there.
                let port_unread = extra.get("port_unread") == Some(&serde_json::Value::Bool(true));
                let (destination, target) = match dst {
                    Some(d) => (d.to_string(), ever_protected.get(&d).cloned()),
                    None if port_unread => {
                        let ip = destination_ip(row);
                        let names: Vec<&str> = ever_protected
                            .iter()
                            .filter(|(a, _)| Some(a.ip()) == ip)
                            .map(|(_, n)| n.as_str())
                            .collect();
                        (
                            format!("{} (port not readable)", row.dst_ip),
                            (!names.is_empty()).then(|| names.join(", ")),
                        )
                    }
                    None => (String::new(), None),
                };
                report.bypasses.push(Bypass {
                    protocol: Some(row.protocol.clone()),
                    socket_type: extra.get("socket_type").and_then(|v| v.as_u64()),
                    packets: extra.get("packets").and_then(|v| v.as_u64()),
                    ..Bypass::of(
                        row,
                        "non_tcp_packet_to_protected_target",
                        destination,
                        // The kernel matched it against the protected
                        // targets of its time; a target since removed has
                        // no name here.
                        target.unwrap_or_else(|| "(protected when sent)".into()),
                        &agent_cgroups,
                    )
                });
            }
            (phase::EVIDENCE, super::open_at_start::KIND) => {
                // Opened before the programs were attached, and still open
                // when the daemon started: no event names it, and it may
                // carry requests while tollgate runs.
                let dst = destination(row);
                let target = dst
                    .and_then(|d| ever_protected.get(&d).cloned())
                    .unwrap_or_else(|| "(protected at start)".into());
                report.bypasses.push(Bypass::of(
                    row,
                    "open_before_watch",
                    dst.map(|d| d.to_string()).unwrap_or_default(),
                    target,
                    &agent_cgroups,
                ));
            }
            (phase::EVIDENCE, super::open_at_start::SCAN_KIND) => {
                // Like the window before a boot's first start: what the
                // scan could not see is said, not judged.
                let scan: super::open_at_start::ScanSummary =
                    serde_json::from_str(&row.unmapped).unwrap_or_default();
                let unreadable = scan.unreadable;
                if unreadable > 0 {
                    let named = &scan.unreadable_processes;
                    report.open_at_start_unread.push(format!(
                        "the connections open at the start at {} could not be listed for {unreadable} \
                         process(es) ({}): one they held, opened before tollgate watched, would not \
                         be named",
                        format_time(row.time),
                        named.join(", ")
                    ));
                }
            }
            (phase::EVIDENCE, k) if k.starts_with("refused") => report.refused += 1,
            (phase::LOSS_COUNTERS, _) => {
                report.loss_records += 1;
            }
            _ => {}
        }
    }
    // Loss is judged per interval, from every loss record in order (those
    // before the window are the baseline of the first one in it). A record
    // written at T covers the interval up to T, so the first one after the
    // window's end is judged too: the window's last stretch is in it.
    let mut previous: Option<LossReport> = None;
    // Set by a config record (a start of the daemon): user-space counters
    // start again at zero with every daemon, so the first record after it
    // counts them in full. Compared with the last daemon's instead, a new
    // daemon's loss no larger than its predecessor's total would vanish.
    let mut new_daemon = false;
    // Set by a config record of a new boot: the kernel's counter maps do
    // not outlive a reboot, and counters that grew back past their old
    // values would otherwise hide what the new boot dropped.
    let mut new_boot = false;
    let mut last_boot: Option<String> = None;
    let mut boot_began = i64::MIN;
    // The time of the current boot's last loss record.
    let mut last_loss_of_boot: Option<i64> = None;
    let mut interval_ms: Option<u64> = None;
    let mut judged_past_end = false;
    // The window ends, in the stream's order, at its last loss record: a
    // record dated past the end but written before one dated inside (a
    // clock that ran ahead, then stepped back) is inside the window, and
    // the record that judges the end is the first one after it.
    // A later run (a start, a boot with its clock unset) dated inside the
    // window widens it too (a loss is not hidden for a clock's sake), but
    // is named as such.
    let first_past_end = opts.to_ms.and_then(|to| {
        evidence
            .iter()
            .filter(|r| r.phase == phase::LOSS_COUNTERS && r.time > to)
            .map(|r| r.sequence)
            .min()
    });
    let next_run = first_past_end.and_then(|past| {
        evidence
            .iter()
            .filter(|r| r.phase == phase::CONFIG && r.sequence > past)
            .map(|r| r.sequence)
            .min()
    });
    let loss_records_in_window = || {
        evidence
            .iter()
            .filter(|r| r.phase == phase::LOSS_COUNTERS && in_window(r.time))
            .map(|r| r.sequence)
    };
    let first_in_window = loss_records_in_window().min();
    let last_in_window = loss_records_in_window().max();
    let widened_by_a_later_run = matches!(
        (last_in_window, next_run),
        (Some(last), Some(next)) if last > next
    );
    for row in evidence
        .iter()
        .filter(|r| r.phase == phase::CONFIG || r.phase == phase::LOSS_COUNTERS)
    {
        if row.phase == phase::CONFIG {
            new_daemon = true;
            // An unreadable record (already a problem) or one naming no
            // boot may follow a reboot, as in `first_starts_of_boots`.
            let snapshot = serde_json::from_str::<ConfigSnapshot>(&row.unmapped).ok();
            let boot = snapshot
                .as_ref()
                .map(|s| s.boot_id.clone())
                .unwrap_or_default();
            if boot.is_empty() || last_boot.as_deref() != Some(boot.as_str()) {
                new_boot = true;
                // When the boot began, as the epochs of cookies count it.
                boot_began = snapshot.and_then(|s| s.booted_at_ms).unwrap_or(row.time);
                if let (Some(last), Some(previous)) = (last_loss_of_boot.take(), &last_boot) {
                    let overlaps = opts.from_ms.is_none_or(|f| boot_began >= f)
                        && opts.to_ms.is_none_or(|t| last <= t);
                    if overlaps {
                        report.unjudged_before_reboot.push(UnjudgedBeforeReboot {
                            boot_id: previous.clone(),
                            last_loss_record_ms: last,
                            last_loss_record: format_time(last),
                            rebooted_at_ms: boot_began,
                            rebooted_at: format_time(boot_began),
                            seconds: (boot_began - last).max(0) as f64 / 1000.0,
                        });
                    }
                }
            }
            last_boot = Some(boot);
            continue;
        }
        last_loss_of_boot = Some(row.time);
        let cumulative = match serde_json::from_str::<LossReport>(&row.unmapped) {
            Ok(c) => c,
            Err(err) => {
                problems.push(format!(
                    "evidence record {}: unreadable loss counters: {err}",
                    row.sequence
                ));
                continue;
            }
        };
        let dated_past_end = opts.to_ms.is_some_and(|to| row.time > to);
        let before_last_in_window = last_in_window.is_some_and(|last| row.sequence < last);
        let stepped_back = dated_past_end && before_last_in_window;
        if stepped_back {
            let why = match widened_by_a_later_run {
                true => "a later run of the daemon (its clock behind, as after a boot without a set clock) wrote records dated inside the window",
                false => "the clock stepped back",
            };
            problems.push(format!(
                "evidence record {} is dated after the window's end but was written before records \
                 dated inside it: {why}; the window is judged in the stream's order, up to them",
                row.sequence
            ));
        }
        // A clock stepped back inside the window dates the records after
        // the step before its start. Written after a record dated inside
        // it, such a record is in the window in the stream's order: judged,
        // and, after the last one dated inside, the record that judges the
        // window's end. Left out, it would only become the baseline of the
        // next, and a loss in its interval would vanish.
        let dated_before_start = opts.from_ms.is_some_and(|from| row.time < from);
        let after_first_in_window = first_in_window.is_some_and(|first| row.sequence > first);
        let stepped_back_before_start = dated_before_start && after_first_in_window;
        if stepped_back_before_start {
            problems.push(format!(
                "evidence record {} is dated before the window's start but was written after \
                 records dated inside it: the clock stepped back; the window is judged in the \
                 stream's order",
                row.sequence
            ));
        }
        let past_end = (dated_past_end || stepped_back_before_start) && !before_last_in_window;
        let baseline = previous.take().map(|mut p| {
            if new_daemon {
                p.user_space = UserSpaceCounters::default();
            }
            if new_boot {
                p.programs.clear();
            }
            p
        });
        // The first record of a new boot says nothing of the end of the
        // boot before: its counters started again at zero.
        let crossed_boot = new_boot;
        new_daemon = false;
        new_boot = false;
        let delta = interval_delta(baseline.as_ref(), &cumulative);
        if !past_end {
            interval_ms = Some(cumulative.interval_ms);
        }
        if in_window(row.time) || past_end || stepped_back || stepped_back_before_start {
            if delta.reserved_lost() > 0 {
                report
                    .reserved_losses
                    .push(ReservedLoss::of(row.time, row.sequence, &delta));
            }
            if !delta.general_lossless() || delta.agents_lost() > 0 {
                report.losses.push(Loss {
                    time_ms: row.time,
                    evidence_sequence: row.sequence,
                    agent_events_lost: delta.agents_lost(),
                    delta,
                    report: serde_json::from_str(&row.unmapped).unwrap_or_default(),
                });
            }
        }
        if past_end {
            // A record of the next boot does not cover the window's end
            // when the boot before it reached that end: its counters
            // started again at the boot.
            judged_past_end = !crossed_boot || opts.to_ms.is_some_and(|to| to >= boot_began);
            break;
        }
        previous = Some(cumulative);
    }
    // A start that found no probe pinned in a boot the daemon had run in
    // before: the pins were removed meanwhile (`tollgate unpin`, another
    // `bpffs_dir`), and with them the ring buffers and their counters.
    // What the programs recorded after the last loss record was destroyed
    // unread, and the new counters count none of it.
    // The records as read above, by their place in the stream.
    let snapshot_at: HashMap<i64, &ConfigSnapshot> =
        snapshots.iter().map(|(_, seq, s)| (*seq, s)).collect();
    let mut previous_boot: Option<&str> = None;
    let mut last_loss: Option<i64> = None;
    for row in evidence
        .iter()
        .filter(|r| r.phase == phase::CONFIG || r.phase == phase::LOSS_COUNTERS)
    {
        if row.phase == phase::LOSS_COUNTERS {
            last_loss = Some(row.time);
            continue;
        }
        let Some(snapshot) = snapshot_at.get(&row.sequence) else {
            continue;
        };
        let same_boot =
            !snapshot.boot_id.is_empty() && previous_boot == Some(snapshot.boot_id.as_str());
        if same_boot && snapshot.probe_was_pinned == Some(false) {
            let since = last_loss.unwrap_or(row.time);
            if opts.to_ms.is_none_or(|t| since <= t) && opts.from_ms.is_none_or(|f| row.time >= f) {
                problems.push(format!(
                    "{PINS_REMOVED}: the start at {} (evidence record {}) found no probe pinned, \
                     though the daemon ran before in this boot: the pins were removed \
                     (`tollgate unpin`, another bpffs_dir), and what the programs recorded after \
                     the last loss record ({}) was destroyed unread, counted by no record",
                    format_time(row.time),
                    row.sequence,
                    format_time(since)
                ));
            }
        }
        previous_boot = Some(snapshot.boot_id.as_str());
    }
    if report.loss_records == 0 {
        problems.push("no loss counters in the window: completeness cannot be shown".into());
    }
    let newest = evidence.iter().map(|r| r.time).max();
    // With no loss record after the window's end, its last stretch is
    // unjudged. That is expected while the stream has not yet run one
    // interval past the end (a window ending at the newest data); once it
    // has run on well past it (two intervals, for a late tick), the
    // daemon stopped without writing one (a kill), and a loss in that
    // stretch cannot be excluded.
    if let (Some(to), Some(interval), Some(newest), false) =
        (opts.to_ms, interval_ms, newest, judged_past_end)
    {
        let slack = i64::try_from(interval.saturating_mul(2)).unwrap_or(i64::MAX);
        if newest > to.saturating_add(slack) {
            problems.push(format!(
                "{WINDOW_END_NOT_COVERED}: no loss record follows the window's end ({}), though \
                 the evidence runs on to {}: a loss in the window's last interval cannot be \
                 excluded",
                format_time(to),
                format_time(newest)
            ));
        }
    }
    let integrity_ok = |i: &Integrity| i.ok || (!i.checked && !opts.require_integrity);
    report.ok = report.bypasses.is_empty()
        && report.losses.is_empty()
        && report.reserved_losses.is_empty()
        && problems.is_empty()
        && integrity_ok(&report.audit_integrity)
        && integrity_ok(&report.evidence_integrity);
    report.problems = problems;
    report
}

/// The human summary.
pub fn summary(r: &Report) -> String {
    let mut out = String::new();
    let integrity = |i: &Integrity| {
        if !i.checked {
            format!("NOT CHECKED ({})", i.detail)
        } else if i.ok {
            "ok".to_owned()
        } else {
            format!("FAILED: {}", i.detail)
        }
    };
    out.push_str(&format!("tollgate verify {}\n", r.dir));
    out.push_str(&format!(
        "  audit integrity:     {}\n",
        integrity(&r.audit_integrity)
    ));
    out.push_str(&format!(
        "  evidence integrity:  {}\n",
        integrity(&r.evidence_integrity)
    ));
    out.push_str(&format!(
        "  protected targets:   {}\n",
        r.protected_targets.join(", ")
    ));
    for c in &r.target_changes {
        let meaning = if c.change == "removed" {
            "connections to it after that are not judged"
        } else {
            "protected from then on"
        };
        out.push_str(&format!(
            "  {:<21}{}, by the start at {}: {meaning}\n",
            format!("target {}:", c.change),
            c.target,
            format_time(c.time_ms)
        ));
    }
    out.push_str(&format!(
        "  tcp connections:     {} seen by the kernel, {} to protected targets, {} audited gateway upstreams\n",
        r.tcp_connections, r.to_protected_targets, r.audited_upstreams
    ));
    out.push_str(&format!(
        "  agent cgroups:       {} redirected, {} refused, {} other egress\n",
        r.redirected, r.refused, r.agent_other_egress
    ));
    out.push_str(&format!(
        "  non-tcp packets:     {} records of packets to protected targets\n",
        r.non_tcp_packets
    ));
    out.push_str(&format!(
        "  loss:                {} interval records, {} with losses of other connections' or agents' events{}\n",
        r.loss_records,
        r.losses.len(),
        match r.losses.iter().map(|l| l.agent_events_lost).sum::<u64>() {
            0 => String::new(),
            agents => format!(" ({agents} agent events)"),
        }
    ));
    out.push_str(&format!(
        "  reserved loss:       {} intervals lost evidence of connections or packets to protected targets\n",
        r.reserved_losses.len()
    ));
    for l in &r.reserved_losses {
        let programs: Vec<String> = l
            .dropped_by_program
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        out.push_str(&format!(
            "    {} {}: {} event(s) lost (dropped: {}; lost in user space: {}): \
             a bypass in the interval ending then cannot be excluded\n",
            l.time,
            l.finding,
            l.events,
            if programs.is_empty() {
                "none".to_owned()
            } else {
                programs.join(", ")
            },
            l.lost_in_user_space,
        ));
    }
    for w in &r.unwatched_after_boot {
        out.push_str(&format!(
            "  unwatched:           the host booted at {} and tollgate started at {} ({:.1} s later): \
             connections in between were neither redirected nor recorded\n",
            w.booted_at, w.watched_from, w.seconds
        ));
    }
    for u in &r.unjudged_before_reboot {
        out.push_str(&format!(
            "  before reboot:       boot {}'s last loss record was at {} and the host booted again at {} \
             ({:.1} s later): what its programs saw in between and the stream did not get went with the \
             ring buffers, uncounted\n",
            u.boot_id, u.last_loss_record, u.rebooted_at, u.seconds
        ));
    }
    for unread in &r.open_at_start_unread {
        out.push_str(&format!("  open at start:       {unread}\n"));
    }
    out.push_str(&format!("  bypasses:            {}\n", r.bypasses.len()));
    for b in &r.bypasses {
        let packet = match (&b.protocol, b.packets) {
            (Some(protocol), packets) => format!(
                ", {protocol} from socket type {}, {} packet(s)",
                b.socket_type
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "?".into()),
                packets.unwrap_or(1)
            ),
            _ => String::new(),
        };
        out.push_str(&format!(
            "    {} {}: pid {} ({}) cgroup {}{} -> {} [{}], cookie {}{packet}\n",
            b.time,
            b.finding,
            b.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
            b.process,
            b.cgroup_id
                .map(|c| c.to_string())
                .unwrap_or_else(|| "?".into()),
            b.cgroup_path
                .as_ref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default(),
            b.destination,
            b.target,
            b.socket_cookie
                .map(|c| c.to_string())
                .unwrap_or_else(|| "?".into()),
        ));
    }
    for p in &r.problems {
        out.push_str(&format!("  problem: {p}\n"));
    }
    let unchecked = !r.audit_integrity.checked || !r.evidence_integrity.checked;
    out.push_str(match (r.ok, unchecked) {
        (true, false) => "RESULT: OK\n",
        (true, true) => "RESULT: OK (reconciliation only: integrity not checked)\n",
        (false, _) => "RESULT: FAILED\n",
    });
    out
}

/// Runs verification and writes the report; `Ok(true)` when it passed.
pub fn run(
    dir: &Path,
    public_key: &Path,
    opts: &Options,
    report_path: Option<&Path>,
) -> anyhow::Result<bool> {
    if !public_key.exists() {
        anyhow::bail!("public key {} does not exist", public_key.display());
    }
    let report = verify(dir, public_key, opts)?;
    print!("{}", summary(&report));
    if let Some(path) = report_path {
        let json = serde_json::to_vec_pretty(&report)?;
        fs::write(path, json).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(report.ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::AgentCgroupInfo;

    fn config_row(seq: i64) -> Row {
        let mut snapshot =
            crate::evidence::in_force::tests::snapshot(&[("orders-db", "10.0.0.5:5432")], None);
        snapshot.agent_cgroups = vec![AgentCgroupInfo {
            path: "/sys/fs/cgroup/agents".into(),
            id: 77,
        }];
        snapshot.gateway_pid = 10;
        snapshot.gateway_cgroup_id = 5;
        snapshot.boot_id = "boot-1".into();
        Row {
            sequence: seq,
            phase: "config".into(),
            pid: Some(10),
            cgroup_id: Some(5),
            unmapped: serde_json::to_string(&snapshot).unwrap(),
            ..Row::default()
        }
    }

    fn connect(seq: i64, cgroup: i64, process: &str, dst: &str, cookie: i64) -> Row {
        let (ip, port) = dst.rsplit_once(':').unwrap();
        Row {
            sequence: seq,
            phase: "evidence".into(),
            time: 1_700_000_000_000 + seq,
            pid: Some(100 + seq as i32),
            process: process.into(),
            cgroup_id: Some(cgroup),
            dst_ip: ip.trim_matches(['[', ']']).into(),
            dst_port: port.parse().ok(),
            cookie: Some(cookie),
            unmapped: r#"{"kind":"tcp_connect"}"#.into(),
            ..Row::default()
        }
    }

    fn loss(seq: i64, dropped: u64) -> Row {
        Row {
            sequence: seq,
            phase: "loss_counters".into(),
            unmapped: format!(
                r#"{{"programs":{{"tcp_state":{{"seen":9,"emitted":9,"dropped":{dropped},"recursion_misses":0}}}},"user_space":{{"received":9,"malformed":0,"write_failed":0}},"interval_ms":5000}}"#
            ),
            ..Row::default()
        }
    }

    fn checked() -> Integrity {
        Integrity {
            checked: true,
            ok: true,
            detail: String::new(),
        }
    }

    /// A connection open at start is a finding, with its holder; a scan
    /// that could not read every process is listed, not judged.
    #[test]
    fn a_connection_open_at_start_is_a_finding_and_an_incomplete_scan_is_listed() {
        let open = Row {
            sequence: 2,
            phase: "evidence".into(),
            time: 1_700_000_000_002,
            pid: Some(4242),
            process: "psql".into(),
            cgroup_id: Some(77),
            dst_ip: "10.0.0.5".into(),
            dst_port: Some(5432),
            unmapped: r#"{"kind":"open_at_start","state":1}"#.into(),
            ..Row::default()
        };
        // The scan's record as the daemon writes it.
        let scan = |unreadable: u64| {
            let scan = crate::evidence::open_at_start::Scan {
                unreadable: (1..=unreadable as u32)
                    .map(|pid| (pid, "init".into()))
                    .collect(),
                ..Default::default()
            };
            Row {
                sequence: 3,
                phase: "evidence".into(),
                time: 1_700_000_000_003,
                unmapped: crate::evidence::open_at_start::scan_record(&scan).unmapped,
                ..Row::default()
            }
        };
        let r = reconciled(&[], &[config_row(1), open.clone(), scan(0)]);
        assert!(!r.ok);
        assert_eq!(r.bypasses.len(), 1, "{:?}", r.bypasses);
        let b = &r.bypasses[0];
        assert_eq!(b.finding, "open_before_watch");
        assert_eq!((b.pid, b.target.as_str()), (Some(4242), "orders-db"));
        assert_eq!(b.cgroup_path.as_deref(), Some("/sys/fs/cgroup/agents"));
        assert!(r.open_at_start_unread.is_empty());

        let r = reconciled(&[], &[config_row(1), scan(1), loss(4, 0)]);
        assert!(r.ok, "{:?}", r.problems);
        assert_eq!(r.open_at_start_unread.len(), 1);
        assert!(r.open_at_start_unread[0].contains("1 init"));
    }

    /// A start that no longer protects orders-db: connections to it
    /// before that start are bypasses, those after it are not, and the
    /// report says when it was removed.
    #[test]
    fn a_connection_to_a_target_after_the_start_that_removed_it_is_not_a_bypass() {
        let removed_at = 1_700_000_000_050;
        let mut unprotected = config_row(50);
        let mut snapshot: ConfigSnapshot = serde_json::from_str(&unprotected.unmapped).unwrap();
        snapshot.protected_targets[0].address = "10.0.0.9:5432".parse().unwrap();
        snapshot.protected_targets[0].name = "billing-db".into();
        snapshot.installing_since_ms = Some(removed_at - 5);
        unprotected.unmapped = serde_json::to_string(&snapshot).unwrap();
        unprotected.time = removed_at;
        let before = connect(10, 9, "psql", "10.0.0.5:5432", 1);
        let after = connect(60, 9, "psql", "10.0.0.5:5432", 2);
        let r = reconciled(
            &[],
            &[
                config_row(1),
                unprotected.clone(),
                before,
                after.clone(),
                loss(99, 0),
            ],
        );
        let bypasses: Vec<i64> = r.bypasses.iter().map(|b| b.evidence_sequence).collect();
        assert_eq!(bypasses, [10], "{:?}", r.bypasses);
        assert_eq!(r.to_protected_targets, 1);
        assert_eq!(
            r.target_changes
                .iter()
                .map(|c| (c.change, c.target.as_str()))
                .collect::<Vec<_>>(),
            [
                ("added", "billing-db 10.0.0.9:5432"),
                ("removed", "orders-db 10.0.0.5:5432")
            ]
        );
        assert!(
            summary(&r).contains("target removed:      orders-db 10.0.0.5:5432, by the start at")
        );

        // While that start was still installing its targets, either set
        // may have been the kernel's: a connection to the added one counts.
        let mut to_added = connect(45, 9, "psql", "10.0.0.9:5432", 3);
        to_added.time = removed_at - 2;
        let r = reconciled(&[], &[config_row(1), unprotected, to_added, loss(99, 0)]);
        assert_eq!(r.bypasses.len(), 1, "{:?}", r.bypasses);
        assert_eq!(r.bypasses[0].target, "billing-db");
    }

    /// Both streams' integrity checked and good, no window.
    fn reconciled(audit: &[Row], evidence: &[Row]) -> Report {
        reconcile(
            Path::new("/a"),
            audit,
            evidence,
            checked(),
            checked(),
            &opts(),
        )
    }

    fn opts() -> Options {
        Options {
            from_ms: None,
            to_ms: None,
            require_integrity: true,
            max_checkpoint_age_secs: None,
        }
    }

    /// The audit record of a gateway connection, written when the
    /// evidence rows of [`connect`] are.
    fn audit_row(cookie: i64) -> Row {
        Row {
            phase: "request".into(),
            time: 1_700_000_000_000,
            cookie: Some(cookie),
            ..Row::default()
        }
    }

    /// A socket keeps its cookie when it connects again: a refused connect
    /// elsewhere first does not hide its connection to the target.
    #[test]
    fn a_socket_that_connects_again_to_a_target_is_judged_again() {
        let evidence = vec![
            config_row(1),
            connect(2, 3, "python3", "127.0.0.1:5432", 600),
            connect(3, 3, "python3", "10.0.0.5:5432", 600),
            // What two probes report of one connection during a restart.
            connect(4, 3, "python3", "10.0.0.5:5432", 600),
            loss(5, 0),
        ];
        let r = reconciled(&[], &evidence);
        assert!(!r.ok);
        assert_eq!(r.tcp_connections, 2);
        let findings: Vec<_> = r.bypasses.iter().map(|b| b.finding.as_str()).collect();
        assert_eq!(findings, ["unaudited_connection_to_protected_target"]);
    }

    /// Cookies start again at every boot: an audited cookie covers only a
    /// connection the kernel saw around the time of its record.
    #[test]
    fn an_audited_cookie_does_not_cover_a_later_connection_with_the_same_number() {
        let day = 86_400_000;
        // The gateway's connection with cookie 500, before the reboot.
        let before_reboot = Row {
            pid: Some(10),
            ..connect(2, 5, "tokio-runtime-w", "10.0.0.5:5432", 500)
        };
        let mut after_reboot = connect(2, 3, "python3", "10.0.0.5:5432", 500);
        after_reboot.time += day;
        let mut gateway = Row {
            pid: Some(10),
            ..connect(3, 5, "tokio-runtime-w", "10.0.0.5:5432", 501)
        };
        gateway.time += day;
        let mut gateway_record = audit_row(501);
        gateway_record.time += day + 20_000;
        let evidence = vec![
            config_row(1),
            before_reboot,
            after_reboot,
            gateway,
            loss(4, 0),
        ];
        let r = reconciled(&[audit_row(500), gateway_record], &evidence);
        assert!(!r.ok);
        assert_eq!(r.audited_upstreams, 2);
        let findings: Vec<_> = r.bypasses.iter().map(|b| b.finding.as_str()).collect();
        assert_eq!(findings, ["unaudited_connection_to_protected_target"]);
        assert_eq!(r.bypasses[0].socket_cookie, Some(500));
        assert_eq!(r.bypasses[0].process, "python3");
    }

    /// A gateway upstream is the daemon's own connect: another process's
    /// connection with a cookie an audit record names (another network
    /// namespace's number on a kernel that counts them per namespace, or
    /// an audit record written into the WAL by hand) is not one.
    #[test]
    fn an_audited_cookie_covers_only_a_connection_the_gateway_made() {
        let evidence = vec![
            config_row(1),
            connect(2, 3, "python3", "10.0.0.5:5432", 500),
            loss(3, 0),
        ];
        let r = reconciled(&[audit_row(500)], &evidence);
        assert_eq!(r.audited_upstreams, 0, "{}", summary(&r));
        let findings: Vec<_> = r.bypasses.iter().map(|b| b.finding.as_str()).collect();
        assert_eq!(findings, ["unaudited_connection_to_protected_target"]);
        // A pid the daemon had in an earlier boot is not the daemon now.
        let day = 86_400_000;
        let mut restart = config_row(3);
        restart.time += day;
        restart.pid = Some(11);
        restart.unmapped = restart.unmapped.replace("boot-1", "boot-2");
        let mut reused = Row {
            pid: Some(10),
            ..connect(4, 3, "python3", "10.0.0.5:5432", 501)
        };
        reused.time += day;
        let mut record = audit_row(501);
        record.time += day;
        let r = reconciled(&[record], &[config_row(1), restart, reused, loss(5, 0)]);
        assert_eq!(r.audited_upstreams, 0, "{}", summary(&r));
        assert_eq!(r.bypasses.len(), 1, "{}", summary(&r));
    }

    /// A start in the same boot that found no probe pinned: the pins, and
    /// the unread events in the rings, were removed in between.
    #[test]
    fn a_start_that_found_the_pins_of_its_boot_removed_fails() {
        let start = |seq: i64, pinned: Option<bool>| {
            let mut row = config_row(seq);
            row.time = 1_700_000_000_000 + seq * 1000;
            let mut snapshot: ConfigSnapshot =
                serde_json::from_str(&row.unmapped).expect("snapshot");
            snapshot.probe_was_pinned = pinned;
            row.unmapped = serde_json::to_string(&snapshot).expect("json");
            row
        };
        let run = |second: Option<bool>| {
            reconciled(
                &[],
                &[
                    start(1, Some(false)),
                    loss(2, 0),
                    start(3, second),
                    loss(4, 0),
                ],
            )
        };
        let removed = run(Some(false));
        assert!(!removed.ok);
        assert!(has_problem(&removed, PINS_REMOVED), "{}", summary(&removed));
        for kept in [Some(true), None] {
            let r = run(kept);
            assert!(!has_problem(&r, PINS_REMOVED), "{kept:?}: {}", summary(&r));
        }
    }

    /// The daemon is also known by its cgroup (its pid in a container is
    /// not the host's), and before the stream's first config record (the
    /// daemon's own removed by retention) its cookie alone covers it.
    #[test]
    fn a_gateway_upstream_is_known_by_its_cgroup_or_before_any_config_record_by_its_cookie() {
        // Another pid, the daemon's cgroup (5 in `config_row`).
        let in_container = Row {
            pid: Some(77_000),
            cgroup_id: Some(5),
            ..connect(2, 3, "tokio-runtime-w", "10.0.0.5:5432", 500)
        };
        let r = reconciled(
            &[audit_row(500)],
            &[config_row(1), in_container, loss(3, 0)],
        );
        assert!(r.bypasses.is_empty(), "{}", summary(&r));
        assert_eq!(r.audited_upstreams, 1, "{}", summary(&r));
        // Retention removed the record of the daemon that made it.
        let before_any_record = connect(1, 3, "tokio-runtime-w", "10.0.0.5:5432", 500);
        let r = reconciled(
            &[audit_row(500)],
            &[before_any_record, config_row(2), loss(3, 0)],
        );
        assert!(r.bypasses.is_empty(), "{}", summary(&r));
        assert_eq!(r.audited_upstreams, 1, "{}", summary(&r));
        // A daemon recorded in the root cgroup vouches for no one by it.
        let mut in_root = config_row(1);
        in_root.cgroup_id = Some(1);
        let other = Row {
            pid: Some(77_000),
            cgroup_id: Some(1),
            ..connect(2, 1, "psql", "10.0.0.5:5432", 500)
        };
        let r = reconciled(&[audit_row(500)], &[in_root, other, loss(3, 0)]);
        assert_eq!(r.audited_upstreams, 0, "{}", summary(&r));
        assert_eq!(r.bypasses.len(), 1, "{}", summary(&r));
    }

    /// A reboot within minutes: the daemon's start after it (its config
    /// record, naming the new boot) separates a cookie audited before it
    /// from the same number after it. A restart in the same boot does not.
    #[test]
    fn an_audited_cookie_does_not_cover_its_number_after_a_reboot() {
        let restart_in = |boot: &str| {
            let mut restart = config_row(3);
            restart.time = 1_700_000_060_000;
            restart.unmapped = restart.unmapped.replace("boot-1", boot);
            restart
        };
        let mut after = connect(4, 3, "python3", "10.0.0.5:5432", 500);
        after.time = 1_700_000_120_000;
        let evidence = |restart: Row, after: Row| {
            vec![
                config_row(1),
                Row {
                    pid: Some(10),
                    ..connect(2, 5, "tokio-runtime-w", "10.0.0.5:5432", 500)
                },
                restart,
                after,
                loss(5, 0),
            ]
        };
        // The same boot: the cookie is still the gateway's socket (its
        // record within minutes covers it), connecting again.
        let again = Row {
            pid: Some(10),
            ..after.clone()
        };
        let r = reconciled(&[audit_row(500)], &evidence(restart_in("boot-1"), again));
        assert!(r.bypasses.is_empty(), "{}", summary(&r));
        // Rebooted: the same number is someone else's.
        let restart = restart_in("boot-2");
        let r = reconciled(&[audit_row(500)], &evidence(restart, after.clone()));
        assert_eq!(r.audited_upstreams, 1, "{}", summary(&r));
        let findings: Vec<_> = r.bypasses.iter().map(|b| b.finding.as_str()).collect();
        assert_eq!(findings, ["unaudited_connection_to_protected_target"]);
    }

    /// Every boot leaves a window, from the boot to the daemon's first
    /// start in it, in which nothing was watched: the report names each
    /// one that overlaps the window verified, a restart within the same
    /// boot adds none, and a record without a boot time none.
    #[test]
    fn each_boot_until_the_daemon_starts_is_reported_unwatched() {
        let start = |seq: i64, time: i64, boot: &str, booted_at: Option<i64>| {
            let mut row = config_row(seq);
            row.time = time;
            let mut snapshot: ConfigSnapshot =
                serde_json::from_str(&row.unmapped).expect("snapshot");
            snapshot.boot_id = boot.into();
            snapshot.booted_at_ms = booted_at;
            row.unmapped = serde_json::to_string(&snapshot).expect("json");
            row
        };
        let t0 = 1_700_000_000_000;
        let evidence = vec![
            start(1, t0 + 12_000, "boot-1", Some(t0)),
            // A restart of the daemon in the same boot.
            start(2, t0 + 60_000, "boot-1", Some(t0)),
            Row {
                time: t0 + 70_000,
                ..loss(3, 0)
            },
            // The host rebooted at t0 + 100 s; the daemon started 8.5 s later.
            start(4, t0 + 108_500, "boot-2", Some(t0 + 100_000)),
            Row {
                time: t0 + 200_000,
                ..loss(5, 0)
            },
            // A record written before boot times were recorded.
            start(6, t0 + 300_000, "boot-3", None),
            loss(7, 0),
        ];
        let r = reconciled(&[], &evidence);
        let windows: Vec<_> = r
            .unwatched_after_boot
            .iter()
            .map(|w| {
                (
                    w.boot_id.as_str(),
                    w.booted_at_ms,
                    w.watched_from_ms,
                    w.seconds,
                )
            })
            .collect();
        assert_eq!(
            windows,
            [
                ("boot-1", t0, t0 + 12_000, 12.0),
                ("boot-2", t0 + 100_000, t0 + 108_500, 8.5)
            ]
        );
        assert!(summary(&r).contains("8.5 s later"), "{}", summary(&r));
        // The end of each boot after its last loss record went unjudged.
        let ends: Vec<_> = r
            .unjudged_before_reboot
            .iter()
            .map(|u| (u.boot_id.as_str(), u.last_loss_record_ms, u.rebooted_at_ms))
            .collect();
        assert_eq!(
            ends,
            [
                ("boot-1", t0 + 70_000, t0 + 100_000),
                ("boot-2", t0 + 200_000, t0 + 300_000)
            ]
        );
        assert!(summary(&r).contains("before reboot:"), "{}", summary(&r));
        // Only windows that overlap the one verified.
        let starts: [Start; 2] = [
            (t0 + 12_000, "boot-1".into(), Some(t0)),
            (t0 + 108_500, "boot-2".into(), Some(t0 + 100_000)),
        ];
        let only_second = unwatched_after_boot(
            &first_starts_of_boots(&starts).collect::<Vec<_>>(),
            Some(t0 + 50_000),
            None,
        );
        assert_eq!(only_second.len(), 1);
        assert_eq!(only_second[0].boot_id, "boot-2");
    }

    #[test]
    fn audited_upstreams_and_redirects_reconcile() {
        let mut redirect = connect(3, 77, "psql", "10.0.0.5:5432", 900);
        redirect.unmapped = r#"{"kind":"redirected"}"#.into();
        let evidence = vec![
            config_row(1),
            Row {
                pid: Some(10),
                ..connect(2, 5, "tokio-runtime-w", "10.0.0.5:5432", 500)
            },
            redirect,
            connect(4, 77, "psql", "127.0.0.1:15432", 900),
            connect(5, 77, "curl", "93.184.216.34:443", 901),
            loss(6, 0),
        ];
        let r = reconciled(&[audit_row(500)], &evidence);
        assert!(r.ok, "{}", summary(&r));
        assert_eq!(r.to_protected_targets, 1);
        assert_eq!(r.audited_upstreams, 1);
        assert_eq!(r.redirected, 1);
        assert_eq!(r.agent_other_egress, 1);

        // Redirects are counted from their own events: one whose connect to
        // the listener a flood of the general ring buffer cut out counts,
        // and one reported twice (across a restart) counts once.
        let mut again = redirect_row(7, 901);
        again.sequence = 8;
        let evidence = vec![
            config_row(1),
            redirect_row(3, 900),
            connect(4, 77, "psql", "127.0.0.1:15432", 900),
            redirect_row(7, 901),
            again,
            loss(9, 0),
        ];
        let r = reconciled(&[], &evidence);
        assert_eq!(r.redirected, 2, "{}", summary(&r));
        assert!(r.bypasses.is_empty(), "{}", summary(&r));
    }

    fn redirect_row(seq: i64, cookie: i64) -> Row {
        let mut redirect = connect(seq, 77, "psql", "10.0.0.5:5432", cookie);
        redirect.unmapped = r#"{"kind":"redirected"}"#.into();
        redirect
    }

    /// A target configured with an IPv6 scope id (a link-local address)
    /// is matched by its connections, which the kernel records without one.
    #[test]
    fn a_target_with_an_ipv6_scope_id_matches_its_connections() {
        let mut config = config_row(1);
        let mut snapshot: ConfigSnapshot = serde_json::from_str(&config.unmapped).unwrap();
        snapshot.protected_targets[0].address = "[fe80::5%2]:5432".parse().unwrap();
        config.unmapped = serde_json::to_string(&snapshot).unwrap();
        let evidence = vec![
            config,
            connect(2, 3, "psql", "[fe80::5]:5432", 602),
            loss(3, 0),
        ];
        let r = reconciled(&[audit_row(500)], &evidence);
        let findings: Vec<_> = r.bypasses.iter().map(|b| b.finding.as_str()).collect();
        assert_eq!(findings, ["unaudited_connection_to_protected_target"]);
    }

    #[test]
    fn each_kind_of_unaudited_connection_is_a_bypass() {
        let evidence = vec![
            config_row(1),
            connect(2, 77, "python3", "10.0.0.5:5432", 600),
            Row {
                pid: Some(10),
                ..connect(3, 5, "tokio-runtime-w", "10.0.0.5:5432", 601)
            },
            connect(4, 3, "psql", "[::ffff:10.0.0.5]:5432", 602),
            loss(5, 0),
        ];
        let r = reconciled(&[audit_row(500)], &evidence);
        assert!(!r.ok);
        let findings: Vec<_> = r.bypasses.iter().map(|b| b.finding.as_str()).collect();
        assert_eq!(
            findings,
            [
                "direct_from_agent_cgroup",
                "gateway_upstream_not_audited",
                "unaudited_connection_to_protected_target"
            ]
        );
        assert_eq!(
            r.bypasses[0].cgroup_path.as_deref(),
            Some("/sys/fs/cgroup/agents")
        );
        assert_eq!(r.bypasses[2].destination, "10.0.0.5:5432");
        assert!(summary(&r).contains("python3"));
    }

    #[test]
    fn every_non_tcp_packet_to_a_protected_target_is_a_bypass() {
        let mut udp = connect(2, 3, "", "10.0.0.5:5432", 700);
        udp.pid = None;
        udp.protocol = "udp".into();
        udp.unmapped =
            r#"{"kind":"packet_to_protected_target","socket_type":2,"packets":4}"#.into();
        let mut raw = connect(3, 77, "", "10.0.0.5:5432", 701);
        raw.pid = None;
        raw.protocol = "tcp".into();
        raw.unmapped =
            r#"{"kind":"packet_to_protected_target","socket_type":3,"packets":1}"#.into();
        let evidence = vec![config_row(1), udp, raw, loss(4, 0)];
        let r = reconciled(&[audit_row(700), audit_row(701)], &evidence);
        assert!(!r.ok, "{}", summary(&r));
        assert_eq!(r.non_tcp_packets, 2);
        assert_eq!(r.tcp_connections, 0, "packets are not connections");
        let findings: Vec<_> = r.bypasses.iter().map(|b| b.finding.as_str()).collect();
        assert_eq!(findings, ["non_tcp_packet_to_protected_target"; 2]);
        assert_eq!(r.bypasses[0].protocol.as_deref(), Some("udp"));
        assert_eq!(r.bypasses[0].packets, Some(4));
        assert_eq!(r.bypasses[0].target, "orders-db");
        assert_eq!(r.bypasses[1].socket_type, Some(3));
        assert_eq!(
            r.bypasses[1].cgroup_path.as_deref(),
            Some("/sys/fs/cgroup/agents")
        );
        assert!(summary(&r).contains("udp from socket type 2, 4 packet(s)"));
    }

    #[test]
    fn a_packet_whose_port_was_not_read_is_a_bypass_at_its_address() {
        let mut hidden = connect(2, 3, "", "10.0.0.5:5432", 700);
        hidden.pid = None;
        hidden.dst_port = None;
        hidden.protocol = "60".into();
        hidden.unmapped = r#"{"kind":"packet_to_protected_target","socket_type":3,"packets":1,"port_unread":true}"#.into();
        let evidence = vec![config_row(1), hidden, loss(3, 0)];
        let r = reconciled(&[audit_row(700)], &evidence);
        assert!(!r.ok, "{}", summary(&r));
        assert_eq!(r.non_tcp_packets, 1);
        assert_eq!(r.bypasses.len(), 1);
        assert_eq!(r.bypasses[0].finding, "non_tcp_packet_to_protected_target");
        assert_eq!(r.bypasses[0].destination, "10.0.0.5 (port not readable)");
        assert_eq!(r.bypasses[0].target, "orders-db");
    }

    #[test]
    fn a_drop_or_missing_counters_or_config_fails() {
        let r = reconcile(
            Path::new("/a"),
            &[],
            &[config_row(1), loss(2, 3)],
            checked(),
            checked(),
            &opts(),
        );
        assert!(!r.ok);
        assert_eq!(r.losses.len(), 1);
        let r = reconcile(
            Path::new("/a"),
            &[],
            &[config_row(1)],
            checked(),
            checked(),
            &opts(),
        );
        assert!(!r.ok, "no loss counters");
        let r = reconcile(
            Path::new("/a"),
            &[],
            &[loss(1, 0)],
            checked(),
            checked(),
            &opts(),
        );
        assert!(!r.ok, "no config");
    }

    /// A loss record of this version: `dropped` counts both ring buffers,
    /// `dropped_reserved` the reserved one's share.
    fn loss_of_rings(seq: i64, dropped: u64, dropped_reserved: u64) -> Row {
        Row {
            sequence: seq,
            time: 1_700_000_000_000 + seq,
            phase: "loss_counters".into(),
            unmapped: format!(
                r#"{{"programs":{{"tcp_state":{{"seen":9,"emitted":9,"dropped":{dropped},"emitted_reserved":2,"dropped_reserved":{dropped_reserved},"recursion_misses":0}}}},"user_space":{{"received":9,"malformed":0,"write_failed":0,"write_retried":0,"reserved_received":2,"reserved_malformed":0,"reserved_write_failed":0}},"interval_ms":5000}}"#
            ),
            ..Row::default()
        }
    }

    #[test]
    fn a_drop_of_the_reserved_ring_is_reported_apart_as_evidence_that_cannot_exclude_a_bypass() {
        let r = reconciled(&[], &[config_row(1), loss_of_rings(2, 4, 4)]);
        assert!(!r.ok, "{}", summary(&r));
        assert!(r.losses.is_empty(), "no general loss: {}", summary(&r));
        assert_eq!(r.reserved_losses.len(), 1, "{}", summary(&r));
        let lost = &r.reserved_losses[0];
        assert_eq!(lost.finding, RESERVED_EVIDENCE_LOST);
        assert_eq!(lost.events, 4);
        assert_eq!(
            lost.dropped_by_program,
            BTreeMap::from([("tcp_state".into(), 4)])
        );
        assert_eq!(lost.evidence_sequence, 2);
        let text = summary(&r);
        assert!(text.contains("reserved loss:       1 intervals"), "{text}");
        assert!(text.contains(RESERVED_EVIDENCE_LOST), "{text}");
        assert!(text.contains("cannot be excluded"), "{text}");
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(
            json["reserved_losses"][0]["finding"],
            RESERVED_EVIDENCE_LOST
        );
        assert_eq!(json["reserved_losses"][0]["events"], 4);
    }

    #[test]
    fn a_drop_of_the_general_ring_stays_a_loss_and_is_not_reserved() {
        let r = reconciled(&[], &[config_row(1), loss_of_rings(2, 7, 0)]);
        assert!(!r.ok, "{}", summary(&r));
        assert_eq!(r.losses.len(), 1, "{}", summary(&r));
        assert!(r.reserved_losses.is_empty(), "{}", summary(&r));
        assert_eq!(r.losses[0].delta.programs["tcp_state"].dropped, 7);
        assert!(summary(&r).contains("reserved loss:       0 intervals"));
        // Both rings in one interval: reported as both.
        let r = reconciled(&[], &[config_row(1), loss_of_rings(2, 7, 3)]);
        assert_eq!((r.losses.len(), r.reserved_losses.len()), (1, 1));
        assert_eq!(r.reserved_losses[0].events, 3);
        // Nothing dropped: neither.
        let r = reconciled(&[], &[config_row(1), loss_of_rings(2, 0, 0)]);
        assert!(r.ok, "{}", summary(&r));
    }

    /// The agents' ring buffer's drops (an agent's flood of refusals), and
    /// the same programs' drops in a record of a version with two ring
    /// buffers, are losses of agent events: not reserved losses, which
    /// only connections and packets to protected targets make.
    #[test]
    fn a_drop_of_agent_events_is_a_loss_that_hides_no_bypass() {
        let agents = |seq: i64, user: &str| Row {
            sequence: seq,
            time: 1_700_000_000_000 + seq,
            phase: "loss_counters".into(),
            unmapped: format!(
                r#"{{"programs":{{"sendmsg4":{{"seen":900,"emitted":20,"dropped":880,"emitted_reserved":20,"dropped_reserved":880}},"tcp_state":{{"seen":9,"emitted":9,"dropped":0,"emitted_reserved":2,"dropped_reserved":0,"recursion_misses":0}}}},"user_space":{{"received":29,"malformed":0,"write_failed":0{user}}},"interval_ms":5000}}"#
            ),
            ..Row::default()
        };
        let with_agents_ring = r#","reserved_received":2,"agents_received":20,"agents_malformed":0,"agents_write_failed":1"#;
        let r = reconciled(&[], &[config_row(1), agents(2, with_agents_ring)]);
        assert!(!r.ok, "{}", summary(&r));
        assert!(r.reserved_losses.is_empty(), "{}", summary(&r));
        assert_eq!(r.losses.len(), 1, "{}", summary(&r));
        assert_eq!(r.losses[0].agent_events_lost, 881);
        assert!(
            summary(&r).contains("(881 agent events)"),
            "{}",
            summary(&r)
        );
        // Written by a version whose agents' events shared the reserved
        // ring: sendmsg4 counted its own drops there all the same.
        let two_rings =
            r#","reserved_received":22,"reserved_malformed":0,"reserved_write_failed":0"#;
        let r = reconciled(&[], &[config_row(1), agents(2, two_rings)]);
        assert!(r.reserved_losses.is_empty(), "{}", summary(&r));
        assert_eq!(r.losses[0].agent_events_lost, 880);
    }

    #[test]
    fn reserved_events_lost_in_user_space_are_reserved_losses() {
        let mut row = loss_of_rings(2, 0, 0);
        row.unmapped = row
            .unmapped
            .replace(r#""write_failed":0"#, r#""write_failed":2"#)
            .replace(
                r#""reserved_write_failed":0"#,
                r#""reserved_write_failed":2"#,
            );
        let r = reconciled(&[], &[config_row(1), row]);
        assert!(r.losses.is_empty(), "{}", summary(&r));
        assert_eq!(r.reserved_losses.len(), 1, "{}", summary(&r));
        assert_eq!(r.reserved_losses[0].lost_in_user_space, 2);
        assert!(r.reserved_losses[0].dropped_by_program.is_empty());
    }

    /// Records written with one ring buffer have no reserved counters:
    /// they parse, and every drop in them is a loss, as it was.
    #[test]
    fn old_loss_records_without_reserved_counters_judge_as_before() {
        let old: LossReport = serde_json::from_str(&loss(2, 3).unmapped).expect("old record");
        assert_eq!(old.programs["tcp_state"].dropped_reserved, 0);
        assert_eq!(old.user_space.reserved_write_failed, 0);
        assert!(!old.general_lossless());
        assert_eq!(old.reserved_lost(), 0);
        let r = reconciled(&[], &[config_row(1), loss(2, 3)]);
        assert_eq!(r.losses.len(), 1, "{}", summary(&r));
        assert!(r.reserved_losses.is_empty(), "{}", summary(&r));
        assert!(!r.ok);
        // An old record followed by a new one of the same pinned counters:
        // only what grew in between counts.
        let mut newer = loss_of_rings(3, 4, 1);
        newer.time = 1_700_000_000_100;
        let r = reconciled(&[], &[config_row(1), loss(2, 3), newer]);
        assert_eq!(r.losses.len(), 1, "the old record's drop: {}", summary(&r));
        assert_eq!(r.losses[0].evidence_sequence, 2);
        assert_eq!(r.reserved_losses.len(), 1, "{}", summary(&r));
        assert_eq!(r.reserved_losses[0].evidence_sequence, 3);
        assert_eq!(r.reserved_losses[0].events, 1);
    }

    #[test]
    fn loss_is_judged_per_interval_from_cumulative_counters() {
        let mut late = loss(3, 3);
        late.time = 1_700_000_000_100;
        let mut later = loss(4, 3);
        later.time = 1_700_000_000_200;
        let evidence = vec![config_row(1), loss(2, 3), late, later];
        // Judged whole: the first interval lost 3 events.
        let r = reconciled(&[], &evidence);
        assert_eq!(r.losses.len(), 1, "{}", summary(&r));
        assert_eq!(r.losses[0].evidence_sequence, 2);
        assert_eq!(r.losses[0].delta.programs["tcp_state"].dropped, 3);
        // A window after that drop: the counters did not grow in it.
        let o = Options {
            from_ms: Some(1_700_000_000_050),
            to_ms: None,
            require_integrity: true,
            max_checkpoint_age_secs: None,
        };
        let r = reconcile(Path::new("/a"), &[], &evidence, checked(), checked(), &o);
        assert!(r.losses.is_empty(), "{}", summary(&r));
        assert!(r.ok, "{}", summary(&r));
    }

    #[test]
    fn counters_that_restart_from_zero_count_from_zero() {
        let before: LossReport = serde_json::from_str(
            r#"{"programs":{"tcp_state":{"seen":90,"emitted":90,"dropped":0,"recursion_misses":4,"program_id":7}},"user_space":{"received":90,"malformed":0,"write_failed":0},"interval_ms":5000}"#,
        )
        .unwrap();
        let after: LossReport = serde_json::from_str(
            r#"{"programs":{"tcp_state":{"seen":95,"emitted":95,"dropped":0,"recursion_misses":0,"program_id":8}},"user_space":{"received":5,"malformed":0,"write_failed":0},"interval_ms":5000}"#,
        )
        .unwrap();
        let delta = interval_delta(Some(&before), &after);
        assert_eq!(delta.programs["tcp_state"].seen, 5);
        assert_eq!(
            delta.programs["tcp_state"].recursion_misses,
            Some(0),
            "a new program"
        );
        assert_eq!(delta.user_space.received, 5, "a new daemon");
        assert!(delta.lossless());
    }

    /// The first record of a daemon carries the instance it replaced at
    /// its start: what that one missed after the record before is judged
    /// there, and all it missed when no record before is of it.
    #[test]
    fn recursion_misses_of_a_replaced_instance_are_judged_at_the_next_daemons_first_record() {
        let report = |json: &str| -> LossReport { serde_json::from_str(json).unwrap() };
        let before = report(
            r#"{"programs":{"tcp_state":{"seen":90,"emitted":90,"dropped":0,"recursion_misses":4,"program_id":7}},"user_space":{"received":90,"malformed":0,"write_failed":0},"interval_ms":5000}"#,
        );
        let after = |replaced_id: u32, replaced_misses: u64| {
            report(&format!(
                r#"{{"programs":{{"tcp_state":{{"seen":95,"emitted":95,"dropped":0,"recursion_misses":0,"program_id":8,"replaced":{{"program_id":{replaced_id},"recursion_misses":{replaced_misses}}}}}}},"user_space":{{"received":5,"malformed":0,"write_failed":0}},"interval_ms":5000}}"#
            ))
        };
        let misses = |prev: Option<&LossReport>, cur: &LossReport| {
            interval_delta(prev, cur).programs["tcp_state"].recursion_misses
        };
        // The instance of the record before, 2 misses after it.
        assert_eq!(misses(Some(&before), &after(7, 6)), Some(2));
        assert!(!interval_delta(Some(&before), &after(7, 6)).lossless());
        // None since: nothing lost.
        assert_eq!(misses(Some(&before), &after(7, 4)), Some(0));
        assert!(interval_delta(Some(&before), &after(7, 4)).lossless());
        // An instance no record before is of (its daemon wrote none): all
        // of its misses.
        assert_eq!(misses(Some(&before), &after(5, 3)), Some(3));
        assert_eq!(misses(None, &after(5, 3)), Some(3));
    }

    #[test]
    fn the_window_limits_what_is_judged() {
        let evidence = vec![
            config_row(1),
            connect(2, 77, "python3", "10.0.0.5:5432", 600),
            loss(3, 0),
        ];
        let o = Options {
            from_ms: Some(1_700_000_000_010),
            to_ms: None,
            require_integrity: true,
            max_checkpoint_age_secs: None,
        };
        let r = reconcile(Path::new("/a"), &[], &evidence, checked(), checked(), &o);
        assert!(r.bypasses.is_empty());
    }

    const T: i64 = 1_700_000_000_000;

    /// A start of the daemon at `time` in `boot`, booted at `booted_at`.
    fn start_at(seq: i64, time: i64, boot: &str, booted_at: Option<i64>) -> Row {
        let mut row = config_row(seq);
        row.time = time;
        let mut snapshot: ConfigSnapshot = serde_json::from_str(&row.unmapped).expect("snapshot");
        snapshot.boot_id = boot.into();
        snapshot.booted_at_ms = booted_at;
        row.unmapped = serde_json::to_string(&snapshot).expect("json");
        row
    }

    /// A loss record at `time` with these cumulative counters (`dropped`
    /// all of the reserved ring buffer).
    fn counters_at(
        seq: i64,
        time: i64,
        dropped_reserved: u64,
        write_failed: u64,
        reserved_write_failed: u64,
    ) -> Row {
        let mut row = loss_of_rings(seq, dropped_reserved, dropped_reserved);
        row.time = time;
        row.unmapped = row
            .unmapped
            .replace(
                r#""write_failed":0"#,
                &format!(r#""write_failed":{write_failed}"#),
            )
            .replace(
                r#""reserved_write_failed":0"#,
                &format!(r#""reserved_write_failed":{reserved_write_failed}"#),
            );
        row
    }

    fn window(from_ms: Option<i64>, to_ms: Option<i64>) -> Options {
        Options {
            from_ms,
            to_ms,
            require_integrity: true,
            max_checkpoint_age_secs: None,
        }
    }

    fn reconciled_in(evidence: &[Row], o: &Options) -> Report {
        reconcile(Path::new("/a"), &[], evidence, checked(), checked(), o)
    }

    /// Whether the report names a problem starting with `kind`.
    fn has_problem(r: &Report, kind: &str) -> bool {
        r.problems.iter().any(|p| p.starts_with(kind))
    }

    /// The reserved losses a report judged: (evidence sequence, events).
    fn reserved_losses_judged(r: &Report) -> Vec<(i64, u64)> {
        r.reserved_losses
            .iter()
            .map(|l| (l.evidence_sequence, l.events))
            .collect()
    }

    /// A record covers the interval up to its time: a drop just before the
    /// window's end is in the first record after it, which is judged (and
    /// none after that one).
    #[test]
    fn a_loss_just_before_the_window_end_is_judged_from_the_next_record() {
        let evidence = vec![
            start_at(1, T, "boot-1", None),
            counters_at(2, T + 5_000, 0, 0, 0),
            counters_at(3, T + 10_000, 1, 0, 0),
            counters_at(4, T + 15_000, 3, 0, 0),
        ];
        let r = reconciled_in(&evidence, &window(Some(T), Some(T + 9_000)));
        assert!(!r.ok, "{}", summary(&r));
        let judged = reserved_losses_judged(&r);
        assert_eq!(judged, [(3, 1)], "{}", summary(&r));
    }

    /// A clock that ran ahead, then stepped back: a loss record dated past
    /// the window's end but written before records dated inside it is part
    /// of the window, and the reserved drop in the record inside is judged
    /// (it was skipped when the first record dated past the end ended the
    /// window); the step is reported.
    #[test]
    fn a_record_dated_ahead_of_the_window_does_not_end_it_early() {
        let evidence = vec![
            start_at(1, T, "boot-1", None),
            // Two hours ahead, then the clock is corrected.
            counters_at(2, T + 7_200_000, 0, 0, 0),
            counters_at(3, T + 5_000, 2, 0, 0),
            counters_at(4, T + 10_000, 2, 0, 0),
        ];
        let r = reconciled_in(&evidence, &window(Some(T), Some(T + 3_600_000)));
        assert!(!r.ok, "{}", summary(&r));
        let judged = reserved_losses_judged(&r);
        assert_eq!(judged, [(3, 2)], "{}", summary(&r));
        assert!(
            summary(&r).contains("the clock stepped back"),
            "{}",
            summary(&r)
        );
    }

    /// A segment read for the reconciliation and then replaced, changed or
    /// removed (so that the integrity checks, which read by name later,
    /// saw other bytes) is reported; one left alone is not.
    #[test]
    fn a_segment_that_is_another_file_after_its_reading_is_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = |name: &str| dir.path().join(name);
        for name in [
            "kept.parquet",
            "swapped.parquet",
            "rewritten.parquet",
            "gone.parquet",
        ] {
            fs::write(path(name), b"segment bytes").expect("write");
        }
        let read: ReadFiles = [
            "kept.parquet",
            "swapped.parquet",
            "rewritten.parquet",
            "gone.parquet",
        ]
        .iter()
        .map(|name| {
            let meta = fs::metadata(path(name)).expect("stat");
            (path(name), FileIdentity::of(&meta))
        })
        .collect();
        // Renamed over: another inode, the same bytes.
        fs::write(path("forged"), b"segment bytes").expect("write");
        fs::rename(path("forged"), path("swapped.parquet")).expect("rename");
        // Rewritten in place: the same inode, a later change time.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(path("rewritten.parquet"), b"segment bytes").expect("rewrite");
        fs::remove_file(path("gone.parquet")).expect("remove");
        let changed = changed_since_read(&read);
        assert_eq!(changed.len(), 3, "{changed:#?}");
        for name in ["swapped.parquet", "rewritten.parquet", "gone.parquet"] {
            assert!(
                changed.iter().any(|c| c.contains(name)),
                "{name}: {changed:#?}"
            );
        }
        assert!(
            !changed.iter().any(|c| c.contains("kept.parquet")),
            "{changed:#?}"
        );
    }

    /// A clock stepped back inside the window dates the records after the
    /// step before its start: a loss in such a record's interval is judged
    /// with the window, whether records dated inside it follow or not.
    #[test]
    fn a_record_dated_before_the_window_but_written_inside_it_is_judged() {
        let window = window(Some(T), Some(T + 3_600_000));
        // Records dated inside the window follow the stepped-back one.
        let between = vec![
            start_at(1, T, "boot-1", None),
            counters_at(2, T + 5_000, 0, 0, 0),
            counters_at(3, T - 60_000, 2, 0, 0),
            counters_at(4, T + 20_000, 2, 0, 0),
        ];
        // None follows it: it is the record that judges the window's end.
        let at_the_end = vec![
            start_at(1, T, "boot-1", None),
            counters_at(2, T + 5_000, 0, 0, 0),
            counters_at(3, T - 60_000, 2, 0, 0),
            counters_at(4, T + 7_200_000, 2, 0, 0),
        ];
        for evidence in [between, at_the_end] {
            let r = reconciled_in(&evidence, &window);
            assert!(!r.ok, "{}", summary(&r));
            assert_eq!(reserved_losses_judged(&r), [(3, 2)], "{}", summary(&r));
            assert!(
                summary(&r).contains("dated before the window's start"),
                "{}",
                summary(&r)
            );
        }
        // Records dated before the window and written before it are its
        // baseline, as ever: no problem, no loss.
        let before = vec![
            start_at(1, T - 120_000, "boot-1", None),
            counters_at(2, T - 60_000, 2, 0, 0),
            counters_at(3, T + 5_000, 2, 0, 0),
            counters_at(4, T + 7_200_000, 2, 0, 0),
        ];
        let r = reconciled_in(&before, &window);
        assert!(r.ok, "{}", summary(&r));
    }

    /// A later run dated inside the window (a boot whose clock started far
    /// behind) widens it too, so that no loss between is hidden; the
    /// problem names the later run.
    #[test]
    fn a_later_run_dated_inside_the_window_widens_it_and_is_named() {
        let evidence = vec![
            start_at(1, T, "boot-1", None),
            // Two hours ahead; then a restart, and a loss.
            counters_at(2, T + 7_200_000, 0, 0, 0),
            start_at(3, T + 4_000, "boot-1", None),
            counters_at(4, T + 5_000, 2, 0, 0),
            counters_at(5, T + 10_000, 2, 0, 0),
        ];
        let r = reconciled_in(&evidence, &window(Some(T), Some(T + 3_600_000)));
        assert!(!r.ok, "{}", summary(&r));
        let judged = reserved_losses_judged(&r);
        assert_eq!(
            judged,
            [(4, 2)],
            "the loss after the restart: {}",
            summary(&r)
        );
        assert!(
            summary(&r).contains("a later run of the daemon"),
            "{}",
            summary(&r)
        );
    }

    /// No loss record after the window's end: a problem once the stream ran
    /// on well past it (the daemon stopped without one), none for a window
    /// that ends at the newest data.
    #[test]
    fn a_window_end_the_stream_ran_past_without_a_loss_record_is_a_problem() {
        let mut later = connect(3, 3, "curl", "93.184.216.34:443", 1);
        later.time = T + 30_000;
        let evidence = vec![
            start_at(1, T, "boot-1", None),
            counters_at(2, T + 5_000, 0, 0, 0),
            later,
        ];
        let r = reconciled_in(&evidence, &window(Some(T), Some(T + 10_000)));
        assert!(!r.ok, "{}", summary(&r));
        assert!(has_problem(&r, WINDOW_END_NOT_COVERED), "{}", summary(&r));
        let r = reconciled_in(&evidence, &window(Some(T), Some(T + 25_000)));
        assert!(r.ok, "{}", summary(&r));
        let r = reconciled_in(&evidence, &window(Some(T), None));
        assert!(r.ok, "{}", summary(&r));
    }

    /// The first loss record after a window's end covers it only if it is
    /// of the same boot: after a reboot its counters started again, and
    /// what the boot before lost at its end is not in them.
    #[test]
    fn a_window_end_followed_by_a_reboot_is_not_covered_by_the_next_boots_record() {
        let mut later = connect(6, 3, "curl", "93.184.216.34:443", 1);
        later.time = T + 60_000;
        let evidence = |second_boot: &str| {
            vec![
                start_at(1, T, "boot-1", None),
                counters_at(2, T + 5_000, 0, 0, 0),
                start_at(3, T + 20_000, second_boot, None),
                counters_at(4, T + 25_000, 0, 0, 0),
                later.clone(),
            ]
        };
        let end = window(Some(T), Some(T + 10_000));
        let r = reconciled_in(&evidence("boot-2"), &end);
        assert!(has_problem(&r, WINDOW_END_NOT_COVERED), "{}", summary(&r));
        // A daemon restarted within the boot: the kernel's counters went
        // on, and its first record covers the end.
        let r = reconciled_in(&evidence("boot-1"), &end);
        assert!(r.ok, "{}", summary(&r));
        // A window that ends once the next boot has begun: its first
        // record counted everything since, the end included.
        let r = reconciled_in(&evidence("boot-2"), &window(Some(T), Some(T + 22_000)));
        assert!(!has_problem(&r, WINDOW_END_NOT_COVERED), "{}", summary(&r));
    }

    /// A config record starts the user-space counters again: a new
    /// daemon's loss is counted in full, however its predecessor's totals
    /// compare with it.
    #[test]
    fn a_new_daemon_counts_its_user_space_counters_in_full() {
        let after_restart = window(Some(T + 5_500), None);
        let evidence = |before: (u64, u64), after: (u64, u64)| {
            vec![
                start_at(1, T, "boot-1", None),
                counters_at(2, T + 5_000, 0, before.0, before.1),
                start_at(3, T + 6_000, "boot-1", None),
                counters_at(4, T + 11_000, 0, after.0, after.1),
            ]
        };
        // The new daemon lost one reserved event; the old one had lost one.
        let r = reconciled_in(&evidence((1, 1), (1, 1)), &after_restart);
        assert_eq!(r.reserved_losses.len(), 1, "{}", summary(&r));
        assert_eq!(r.reserved_losses[0].evidence_sequence, 4);
        assert_eq!(r.reserved_losses[0].lost_in_user_space, 1);
        assert!(r.losses.is_empty(), "{}", summary(&r));
        // Three lost, two of them reserved: not a general loss of one.
        let r = reconciled_in(&evidence((2, 2), (3, 2)), &after_restart);
        assert_eq!(r.reserved_losses.len(), 1, "{}", summary(&r));
        assert_eq!(r.reserved_losses[0].events, 2);
        assert_eq!(r.losses.len(), 1, "{}", summary(&r));
        assert_eq!(r.losses[0].delta.user_space.write_failed, 3);
        // Within one daemon the counters stay cumulative.
        let mut same_daemon = evidence((1, 1), (1, 1));
        same_daemon.remove(2);
        let r = reconciled_in(&same_daemon, &after_restart);
        assert!(r.ok, "{}", summary(&r));
    }

    /// The kernel's counters do not outlive a reboot: after a config
    /// record of a new boot they count in full; a restart in the same
    /// boot keeps them.
    #[test]
    fn a_reboot_counts_the_kernel_counters_in_full() {
        let after_restart = window(Some(T + 5_500), None);
        let evidence = |boot: &str| {
            vec![
                start_at(1, T, "boot-1", None),
                counters_at(2, T + 5_000, 2, 0, 0),
                start_at(3, T + 6_000, boot, None),
                counters_at(4, T + 11_000, 2, 0, 0),
            ]
        };
        let r = reconciled_in(&evidence("boot-2"), &after_restart);
        assert_eq!(r.reserved_losses.len(), 1, "{}", summary(&r));
        assert_eq!(r.reserved_losses[0].evidence_sequence, 4);
        assert_eq!(r.reserved_losses[0].dropped_by_program["tcp_state"], 2);
        let r = reconciled_in(&evidence("boot-1"), &after_restart);
        assert!(r.ok, "{}", summary(&r));
    }

    /// Records not yet in a segment (in the WAL of a running or killed
    /// daemon) are reconciled with the rest: read after the segments' rows,
    /// each once.
    #[tokio::test]
    async fn rows_still_in_the_wal_are_read_with_the_segments() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut cfg = crate::audit::tests::config(tmp.path());
        cfg.segment_max_records = 2;
        cfg.segment_max_age_secs = 3600;
        let log = crate::audit::AuditLog::open(&cfg).await.expect("open");
        for i in 0..3 {
            log.append(crate::audit::tests::sample(i, T + i as i64))
                .await
                .expect("append");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while segment_files(&cfg.dir).expect("list").is_empty() {
            assert!(std::time::Instant::now() < deadline, "no segment was cut");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let crashed = tmp.path().join("crashed");
        crate::audit::tests::crash_copy(&cfg.dir, &crashed);
        log.shutdown().await;
        let rows = read_rows(&crashed).expect("read");
        let sequences: Vec<i64> = rows.iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, [1, 2, 3]);
        assert!(rows[0].file.ends_with(".parquet"), "{}", rows[0].file);
        assert!(rows[2].file.ends_with("wal"), "{}", rows[2].file);
        assert_eq!(rows[2].time, T + 2);
    }

    /// A boot begins when the host booted, not at the daemon's config
    /// record: a connection between the two is in the new boot, and an
    /// audited cookie of the boot before does not cover its number.
    #[test]
    fn a_connection_between_a_boot_and_the_daemon_start_is_in_the_new_boot() {
        let mut gateway = Row {
            pid: Some(10),
            ..connect(2, 5, "tokio-runtime-w", "10.0.0.5:5432", 500)
        };
        gateway.time = T + 50_000;
        let mut audited = audit_row(500);
        audited.time = T + 50_000;
        let mut early = connect(4, 3, "python3", "10.0.0.5:5432", 500);
        early.time = T + 105_000;
        let evidence = vec![
            start_at(1, T + 12_000, "boot-1", Some(T)),
            gateway,
            start_at(3, T + 108_500, "boot-2", Some(T + 100_000)),
            early,
            counters_at(5, T + 110_000, 0, 0, 0),
        ];
        let r = reconciled(&[audited], &evidence);
        assert_eq!(r.audited_upstreams, 1, "{}", summary(&r));
        let findings: Vec<_> = r.bypasses.iter().map(|b| b.finding.as_str()).collect();
        assert_eq!(
            findings,
            ["unaudited_connection_to_protected_target"],
            "{}",
            summary(&r)
        );
    }

    #[test]
    fn times_parse_as_milliseconds_or_utc() {
        assert_eq!(parse_time("1700000000000").ok(), Some(1_700_000_000_000));
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z").ok(),
            Some(1_700_000_000_000)
        );
        assert!(parse_time("yesterday").is_err());
    }
}
