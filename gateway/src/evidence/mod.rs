//! Independent evidence that nothing went around the gateway.
//!
//! The kernel probes (gateway-ebpf) write every TCP active open on the host,
//! and every redirect or refusal on the agent cgroups, to three ring
//! buffers: a reserved one for the events a verdict on bypasses rests on
//! (connections and packets to protected targets), one for the agent
//! cgroups' events, and a general one for the rest. This module reads
//! them all and writes each event as a record of a second
//! audit log at `{audit.dir}/evidence`: its own hash chain, WAL, Parquet
//! segments and signed checkpoints, in the same format as the request
//! audit. Per interval it also records the loss counters, so "nothing was
//! lost" can be checked from the files alone. [`verify`] reconciles the
//! two logs offline (docs/evidence.md).

pub mod in_force;
pub mod open_at_start;
mod prog_info;

pub use prog_info::{stats as program_stats, ProgStats};
pub mod verify;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use gateway_common::{
    counted_program, counter, counter_index, event_kind, reserved_counter, reserved_counter_index,
    EvidenceEvent, EvidenceRing,
};
use serde_json::json;
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{info, warn};

use crate::{
    audit::{AuditConfig, AuditLog, AuditRecord, DurabilityMode},
    pin::EvidenceHandles,
};

/// OCSF class: Network Activity.
pub const CLASS_NETWORK_ACTIVITY: i32 = 4001;
/// OCSF Network Activity ids.
pub mod network_activity {
    pub const OPEN: i32 = 1;
    /// Traffic: packets seen, no connection state (packet evidence).
    pub const TRAFFIC: i32 = 6;
    pub const REFUSE: i32 = 5;
    pub const OTHER: i32 = 99;
}

/// `phase` of the evidence stream's records.
pub mod phase {
    /// One kernel event.
    pub const EVIDENCE: &str = "evidence";
    /// The loss counters of an interval.
    pub const LOSS_COUNTERS: &str = "loss_counters";
    /// What was protected, written at every start, so verification needs
    /// nothing but the directory.
    pub const CONFIG: &str = "config";
}

/// The `kind` (in `unmapped`) of an evidence record.
pub fn kind_name(kind: u32) -> &'static str {
    match kind {
        event_kind::TCP_CONNECT => "tcp_connect",
        event_kind::REDIRECTED => "redirected",
        event_kind::REFUSED_DATAGRAM => "refused_datagram",
        event_kind::REFUSED_SOCKET => "refused_socket",
        event_kind::REFUSED_EGRESS => "refused_egress",
        event_kind::REFUSED_UNSPECIFIED_ON_DEVICE => "refused_unspecified_on_device",
        event_kind::PACKET_TO_PROTECTED_TARGET => "packet_to_protected_target",
        event_kind::REFUSED_SOURCE_ROUTE => "refused_source_route",
        _ => "unknown",
    }
}

/// Where the evidence stream of an audit directory lives.
pub fn evidence_dir(audit_dir: &Path) -> PathBuf {
    audit_dir.join("evidence")
}

/// The evidence log's settings: those of the audit log, in its own
/// directory, signed with the same key (so one public key verifies both).
pub fn evidence_config(audit: &AuditConfig) -> AuditConfig {
    let mut config = audit.clone();
    config.dir = evidence_dir(&audit.dir);
    config.signing_key = Some(
        audit
            .signing_key
            .clone()
            .unwrap_or_else(|| audit.dir.join("keys").join("checkpoint.key")),
    );
    // A distinct origin (the audit stream's, the key's name by default,
    // then `/evidence`), so that one stream cannot pass for the other's.
    config.evidence_stream = true;
    // Evidence never gates a request; the loss counters cover the rest.
    config.retention_days = audit.retention_days;
    // Written to the WAL by the reader itself, before it lets go of the
    // event in the ring buffer (see `drain`): the ring buffer is pinned and
    // keeps what was not taken for the next daemon, so a kill of this one
    // loses no event it took. Handed to a writer thread instead, an event
    // taken but still queued would be lost with the process. The sync
    // follows within `buffered_sync_interval_ms`; a crash of the whole
    // host loses the ring buffer's contents anyway.
    config.durability = DurabilityMode::Buffered;
    config
}

/// A protected target, as written into the config record.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ProtectedTarget {
    pub name: String,
    pub address: SocketAddr,
    pub listen: SocketAddr,
}

/// An agent cgroup, as written into the config record.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct AgentCgroupInfo {
    pub path: String,
    pub id: u64,
}

/// Everything the verifier needs to know about this daemon's configuration.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ConfigSnapshot {
    pub protected_targets: Vec<ProtectedTarget>,
    pub agent_cgroups: Vec<AgentCgroupInfo>,
    /// The daemon's own process: its upstream connections are the only
    /// legitimate direct ones, and each must match an audited session.
    pub gateway_pid: u32,
    pub gateway_cgroup_id: u64,
    /// Whether traffic from agent cgroups that is neither redirected nor
    /// on the allow list is refused.
    pub egress_default_deny: bool,
    /// The kernel's id of this boot (`/proc/sys/kernel/random/boot_id`):
    /// socket cookies are unique within one boot only. Empty in records
    /// written before it was recorded.
    #[serde(default)]
    pub boot_id: String,
    /// When the host booted (Unix ms). Until the daemon's first start in a
    /// boot nothing is redirected or recorded: verify reports that window.
    /// Absent in records written before it was recorded.
    #[serde(default)]
    pub booted_at_ms: Option<i64>,
    /// When this daemon began to install its protected targets in the
    /// kernel (Unix ms), before this record was written: from then until
    /// the record, the previous record's targets may still be the
    /// kernel's, and verify counts both. Absent in records written before
    /// it was recorded: verify then counts both from the previous record.
    #[serde(default)]
    pub installing_since_ms: Option<i64>,
    /// What the kernel's redirect map held when this start replaced it:
    /// normally the previous record's targets, but a start that installed
    /// its targets and failed before writing its record left its own, and
    /// verify counts them from the previous record on. Absent in records
    /// written before it was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaced_targets: Vec<SocketAddr>,
    /// Whether this start found the host-wide probe pinned (a restart)
    /// or pinned it anew (the first start of a boot, or one after the
    /// pins were removed: `tollgate unpin`, another `bpffs_dir`). Absent
    /// in records written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_was_pinned: Option<bool>,
}

/// When the running boot began, in Unix milliseconds.
pub fn booted_at_ms() -> Option<i64> {
    i64::try_from(boot_to_unix_offset_ns() / 1_000_000).ok()
}

/// The kernel's id of the running boot; empty if it cannot be read.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

/// The record written at start with the protected targets.
pub fn config_record(snapshot: &ConfigSnapshot) -> AuditRecord {
    let mut record = base_record(phase::CONFIG, network_activity::OTHER);
    record.status_id = crate::audit::status::SUCCESS;
    record.actor_process_pid = i32::try_from(snapshot.gateway_pid).ok();
    record.actor_process_name = "tollgate".into();
    record.actor_process_cgroup_id = i64::try_from(snapshot.gateway_cgroup_id).ok();
    record.unmapped = serde_json::to_string(snapshot).unwrap_or_default();
    record
}

fn base_record(phase: &str, activity_id: i32) -> AuditRecord {
    AuditRecord {
        phase: phase.into(),
        time: crate::proxy::now_millis(),
        class_uid: CLASS_NETWORK_ACTIVITY,
        activity_id,
        type_uid: i64::from(CLASS_NETWORK_ACTIVITY) * 100 + i64::from(activity_id),
        request_uid: uuid::Uuid::new_v4().to_string(),
        ..AuditRecord::default()
    }
}

/// Decodes one ring buffer item; `None` if it has the wrong size. An item
/// of the older, shorter layout (written by a previous daemon's programs
/// into the pinned ring buffer) decodes with the newer fields zero.
pub fn decode(bytes: &[u8]) -> Option<EvidenceEvent> {
    let size = std::mem::size_of::<EvidenceEvent>();
    let mut padded = [0u8; std::mem::size_of::<EvidenceEvent>()];
    let bytes = if bytes.len() >= size {
        bytes
    } else if bytes.len() >= gateway_common::EVIDENCE_EVENT_V1_BYTES {
        padded[..bytes.len()].copy_from_slice(bytes);
        &padded[..]
    } else {
        return None;
    };
    // SAFETY: at least `size` bytes; EvidenceEvent is plain integers, any
    // bit pattern is valid; read_unaligned needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<EvidenceEvent>()) })
}

/// Nanoseconds to add to CLOCK_BOOTTIME to get Unix time.
pub fn boot_to_unix_offset_ns() -> i128 {
    let now = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is valid for writes; the clocks exist on every Linux.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_BOOTTIME)
}

/// The evidence record of one kernel event.
pub fn event_record(event: &EvidenceEvent, boot_offset_ns: i128) -> AuditRecord {
    let activity = match event.kind {
        event_kind::TCP_CONNECT | event_kind::REDIRECTED => network_activity::OPEN,
        event_kind::PACKET_TO_PROTECTED_TARGET => network_activity::TRAFFIC,
        _ => network_activity::REFUSE,
    };
    let mut record = base_record(phase::EVIDENCE, activity);
    let unix_ns = i128::from(event.boot_ns) + boot_offset_ns;
    record.time = i64::try_from(unix_ns / 1_000_000).unwrap_or(record.time);
    record.status_id = crate::audit::status::SUCCESS;
    record.action_id = match event.kind {
        event_kind::REDIRECTED => crate::audit::action::MODIFIED,
        event_kind::TCP_CONNECT => 0,
        // Recorded, not stopped: the packet went out.
        event_kind::PACKET_TO_PROTECTED_TARGET => crate::audit::action::ALLOWED,
        _ => crate::audit::action::DENIED,
    };
    let packet = event.kind == event_kind::PACKET_TO_PROTECTED_TARGET;
    // A packet is seen without its task: no pid, no name (the cgroup is
    // the sending socket's).
    let seen_at_a_packet = packet || event.kind == event_kind::REFUSED_SOURCE_ROUTE;
    record.actor_process_pid = (!seen_at_a_packet)
        .then(|| i32::try_from(event.pid).ok())
        .flatten();
    record.actor_process_name = crate::pin::comm_to_string(&event.comm).into();
    record.actor_process_cgroup_id = i64::try_from(event.cgroup_id).ok();
    // A refused socket has no destination yet; its event carries the
    // socket type in place of the port. A packet's event has both.
    let socket_type = match event.kind {
        event_kind::REFUSED_SOCKET => Some(event.dport),
        event_kind::PACKET_TO_PROTECTED_TARGET => Some(event.socket_type),
        _ => None,
    };
    // A packet whose transport header the program could not read (behind
    // more extension headers than it walks, cut short) is recorded by its
    // address alone, port 0.
    let port_unread = seen_at_a_packet && event.dport == 0;
    if event.kind != event_kind::REFUSED_SOCKET {
        record.dst_endpoint_ip = crate::pin::ip_from_words(event.daddr).to_string().into();
        record.dst_endpoint_port = (!port_unread)
            .then(|| i32::try_from(event.dport).ok())
            .flatten();
    }
    record.connection_info_protocol_name = match event.protocol {
        6 => "tcp".into(),
        17 => "udp".into(),
        other => other.to_string().into(),
    };
    // The same conversion the proxy uses for its upstream cookie, so the
    // two columns compare equal.
    record.upstream_socket_cookie = i64::try_from(event.cookie).ok();
    record.unmapped = json!({
        "kind": kind_name(event.kind),
        "family": match event.family { 2 => "inet", 10 => "inet6", 17 => "packet", _ => "other" },
        "socket_type": socket_type,
        "protocol": event.protocol,
        "tid": event.tid,
        "boot_ns": event.boot_ns,
        "socket_cookie": event.cookie,
        // Packets of the socket this record stands for (rate limit).
        "packets": packet.then_some(event.packets),
        "port_unread": port_unread.then_some(true),
    })
    .to_string();
    record
}

/// Counts kept in user space, reported with the kernel's.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct UserSpaceCounters {
    /// Events read from the ring buffer.
    pub received: u64,
    /// Items too short to be an event.
    pub malformed: u64,
    /// Events lost between the ring buffer and the evidence log: let go of
    /// in the ring buffer, and then their rows failed to be made durable
    /// (the log's background sync failed).
    pub write_failed: u64,
    /// Writes of an event that failed at once (a full disk): the event was
    /// kept in the ring buffer and written by a later drain, so this is no
    /// loss. While such writes fail the ring buffer fills, and what the
    /// kernel cannot put in it then is counted in `dropped`, in the
    /// kernel's pinned counters, which outlive this daemon. Absent in
    /// records of older versions, whose `write_failed` counted these too.
    #[serde(default)]
    pub write_retried: u64,
    /// Of `received`, `malformed` and `write_failed`: those read from the
    /// reserved ring buffer (connections and packets to protected targets;
    /// in versions with two ring buffers, the agent cgroups' events too).
    /// Absent (zero) in records of versions without it.
    #[serde(default)]
    pub reserved_received: u64,
    #[serde(default)]
    pub reserved_malformed: u64,
    #[serde(default)]
    pub reserved_write_failed: u64,
    /// Of `received`, `malformed` and `write_failed`: those read from the
    /// agents' ring buffer (their redirects and refusals). Absent (zero)
    /// in records of versions without it.
    #[serde(default)]
    pub agents_received: u64,
    #[serde(default)]
    pub agents_malformed: u64,
    #[serde(default)]
    pub agents_write_failed: u64,
}

impl UserSpaceCounters {
    /// The counters of `ring`'s share: (received, malformed, write_failed).
    fn share(&mut self, ring: EvidenceRing) -> Option<(&mut u64, &mut u64, &mut u64)> {
        match ring {
            EvidenceRing::General => None,
            EvidenceRing::Targets => Some((
                &mut self.reserved_received,
                &mut self.reserved_malformed,
                &mut self.reserved_write_failed,
            )),
            EvidenceRing::Agents => Some((
                &mut self.agents_received,
                &mut self.agents_malformed,
                &mut self.agents_write_failed,
            )),
        }
    }

    /// Counts one item read from `ring`.
    fn received(&mut self, ring: EvidenceRing) {
        self.received += 1;
        if let Some((received, _, _)) = self.share(ring) {
            *received += 1;
        }
    }

    fn malformed(&mut self, ring: EvidenceRing) {
        self.malformed += 1;
        if let Some((_, malformed, _)) = self.share(ring) {
            *malformed += 1;
        }
    }

    fn write_failed(&mut self, ring: EvidenceRing) {
        self.write_failed += 1;
        if let Some((_, _, write_failed)) = self.share(ring) {
            *write_failed += 1;
        }
    }
}

/// One program's counters, summed over CPUs (cumulative since the pinned
/// counter map was created).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ProgramCounters {
    pub seen: u64,
    /// Written to a ring buffer.
    pub emitted: u64,
    /// Lost, from whichever ring buffer it was for.
    pub dropped: u64,
    /// Of `emitted`: written to the program's own ring buffer rather than
    /// the general one: the reserved one for `tcp_state` (connections to
    /// protected targets) and `packet_egress`, the agents' one for the
    /// agent-cgroup programs (the reserved one in versions with two ring
    /// buffers). Absent (zero) in records of versions without it, which had
    /// one ring buffer for everything.
    #[serde(default)]
    pub emitted_reserved: u64,
    /// Of `dropped`: lost from the program's own ring buffer. For
    /// `tcp_state` and `packet_egress` an event that may have been a
    /// bypass; for the agent-cgroup programs a redirect or refusal. Absent
    /// (zero) in records of versions without it.
    #[serde(default)]
    pub dropped_reserved: u64,
    /// Packets the packet evidence program counted into a later record of
    /// the same socket instead of recording them singly (rate limit; not
    /// a loss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
    /// Kernel's count of times the program was not run because it was
    /// already running on that CPU (tracing programs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recursion_misses: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_id: Option<u32>,
    /// In the first loss record of a daemon: the instance of this program
    /// the previous daemon left pinned, with its recursion misses as read
    /// just before this daemon replaced it. Its misses since the previous
    /// daemon's last loss record are on no other record (see
    /// `verify::interval_delta`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced: Option<ReplacedInstance>,
}

/// A program instance a daemon replaced at its start (see
/// [`ProgramCounters::replaced`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplacedInstance {
    pub program_id: u32,
    pub recursion_misses: u64,
}

/// The content of a loss_counters record.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct LossReport {
    pub programs: BTreeMap<String, ProgramCounters>,
    pub user_space: UserSpaceCounters,
    pub interval_ms: u64,
}

impl LossReport {
    /// Nothing was dropped by a program, missed by the kernel, or lost
    /// between a ring buffer and the log. (`seen` may run ahead of
    /// `emitted` by the events in flight on each CPU at the moment the
    /// counters are read; every one of those ends as emitted or dropped.)
    pub fn lossless(&self) -> bool {
        self.general_lossless() && self.reserved_lost() == 0 && self.agents_lost() == 0
    }

    /// Nothing was lost from the general ring buffer: no drop from it,
    /// nothing of it malformed or unwritten. The general ring holds the
    /// host's other connections; a record of a version with one ring
    /// buffer counts every drop here. (A recursion miss is a
    /// [`Self::reserved_lost`]: the connect it missed may have gone
    /// anywhere.)
    pub fn general_lossless(&self) -> bool {
        let user = &self.user_space;
        let own_rings = |reserved: u64, agents: u64| reserved.saturating_add(agents);
        user.malformed
            .saturating_sub(own_rings(user.reserved_malformed, user.agents_malformed))
            == 0
            && user.write_failed.saturating_sub(own_rings(
                user.reserved_write_failed,
                user.agents_write_failed,
            )) == 0
            && self.programs.iter().all(|(name, p)| {
                p.dropped.saturating_sub(p.dropped_reserved) == 0
                    && (reports_protected_targets_named(name)
                        || p.recursion_misses.unwrap_or(0) == 0)
            })
    }

    /// Events about protected targets lost: dropped by the kernel (counted
    /// by `tcp_state` and `packet_egress`), read from the reserved ring
    /// buffer and then malformed or unwritten, or missed: a run of those
    /// programs the kernel skipped (a recursion miss: another BPF program
    /// was running on that CPU), whose connect or packet nobody saw, to
    /// wherever it went. Each may have been a bypass.
    pub fn reserved_lost(&self) -> u64 {
        self.dropped_by_own_ring(true).map(|(_, n)| n).sum::<u64>()
            + self.missed_by_target_programs()
            + self.reserved_lost_in_user_space()
    }

    /// Recursion misses of the programs that report protected targets.
    fn missed_by_target_programs(&self) -> u64 {
        self.programs
            .iter()
            .filter(|(name, _)| reports_protected_targets_named(name))
            .map(|(_, p)| p.recursion_misses.unwrap_or(0))
            .sum()
    }

    /// Of [`Self::reserved_lost`], the events read from the reserved ring
    /// buffer but malformed or not written to the stream.
    pub fn reserved_lost_in_user_space(&self) -> u64 {
        self.user_space.reserved_malformed + self.user_space.reserved_write_failed
    }

    /// The agent cgroups' redirects and refusals lost: dropped by their
    /// programs, or read from the agents' ring buffer and then malformed
    /// or unwritten. None of them was a connection that reached a
    /// protected target. (In records of versions with two ring buffers the
    /// agents' events shared the reserved one; their programs' drops still
    /// count here, since each program counts its own events.)
    pub fn agents_lost(&self) -> u64 {
        self.dropped_by_own_ring(false).map(|(_, n)| n).sum::<u64>()
            + self.user_space.agents_malformed
            + self.user_space.agents_write_failed
    }

    /// (program, drops from its own ring) of the programs that report
    /// protected targets (`targets`) or of the agent-cgroup programs, for
    /// those that dropped.
    pub fn dropped_by_own_ring(&self, targets: bool) -> impl Iterator<Item = (&str, u64)> {
        self.programs
            .iter()
            .filter(move |(name, _)| reports_protected_targets_named(name) == targets)
            .filter(|(_, c)| c.dropped_reserved > 0)
            .map(|(name, c)| (name.as_str(), c.dropped_reserved))
    }
}

/// [`gateway_common::reports_protected_targets`] by the program's name in
/// a loss report. A name this version does not know counts as reporting
/// protected targets: its loss is then judged the graver way.
fn reports_protected_targets_named(name: &str) -> bool {
    counted_program::NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| u32::try_from(i).ok())
        .is_none_or(gateway_common::reports_protected_targets)
}

/// The record of one interval's counters.
pub fn loss_record(report: &LossReport) -> AuditRecord {
    let mut record = base_record(phase::LOSS_COUNTERS, network_activity::OTHER);
    record.status_id = if report.lossless() {
        crate::audit::status::SUCCESS
    } else {
        crate::audit::status::FAILURE
    };
    record.unmapped = serde_json::to_string(report).unwrap_or_default();
    record
}

/// Reads the kernel counters.
fn read_counters(
    counters: &PerCpuArray<MapData, u64>,
    tracing_programs: &[(String, OwnedFd)],
) -> BTreeMap<String, ProgramCounters> {
    let sum = |index: u32| -> u64 {
        counters
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    };
    let mut out = BTreeMap::new();
    for program in 0..counted_program::COUNT {
        let name = counted_program::NAMES[program as usize];
        // Each general counter before its reserved one, which the kernel
        // counts second: an event counted between the two reads shows in
        // the reserved count at once (the general one catches up in the
        // next record). Read the other way round, a reserved drop could
        // show first as a general one, and its reserved part only in the
        // next record, which a window ending in between never judges.
        // A reserved count may so run ahead of its total; readers take the
        // general share as the difference, at least zero.
        let seen = sum(counter_index(program, counter::SEEN));
        let emitted = sum(counter_index(program, counter::EMITTED));
        let dropped = sum(counter_index(program, counter::DROPPED));
        let mut c = ProgramCounters {
            seen,
            emitted,
            dropped,
            emitted_reserved: sum(reserved_counter_index(program, reserved_counter::EMITTED)),
            dropped_reserved: sum(reserved_counter_index(program, reserved_counter::DROPPED)),
            suppressed: (program == counted_program::PACKET_EGRESS)
                .then(|| sum(counter_index(program, counter::SUPPRESSED))),
            ..Default::default()
        };
        if let Some((_, fd)) = tracing_programs
            .iter()
            .find(|(n, _)| counted_name(n) == name)
        {
            match prog_info::stats(fd) {
                Ok(stats) => {
                    c.recursion_misses = Some(stats.recursion_misses);
                    c.program_id = Some(stats.id);
                }
                Err(err) => warn!(program = name, error = %err, "cannot read program info"),
            }
        }
        out.insert(name.to_owned(), c);
    }
    out
}

/// The running evidence reader.
pub struct Evidence {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    log: AuditLog,
}

impl Evidence {
    /// Opens the evidence log, writes the config record and starts reading
    /// the ring buffer.
    pub async fn start(
        audit: &AuditConfig,
        handles: EvidenceHandles,
        mut snapshot: ConfigSnapshot,
        interval: Duration,
    ) -> anyhow::Result<Self> {
        let EvidenceHandles {
            ring,
            reserved,
            agents,
            counters,
            tracing_programs,
            probe_was_pinned,
            replaced_programs,
        } = handles;
        // Registered here, not in the reader task: a ring buffer that
        // cannot be polled stops the daemon at start, instead of leaving
        // it serving with no evidence recorded.
        // SAFETY: the RingBuf owns its map fd, which stays open and the same
        // for as long as the AsyncFd holds it.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|err| anyhow::anyhow!("cannot poll the evidence ring buffer: {err}"))?;
        // SAFETY: as above.
        let reserved = unsafe { AsyncFd::register(reserved) }.map_err(|err| {
            anyhow::anyhow!("cannot poll the reserved evidence ring buffer: {err}")
        })?;
        // SAFETY: as above.
        let agents = unsafe { AsyncFd::register(agents) }.map_err(|err| {
            anyhow::anyhow!("cannot poll the agents' evidence ring buffer: {err}")
        })?;
        let log = AuditLog::open(&evidence_config(audit)).await?;
        snapshot.probe_was_pinned = Some(probe_was_pinned);
        log.append(config_record(&snapshot)).await?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(read_loop(
            Rings {
                ring,
                reserved,
                agents,
            },
            counters,
            Programs {
                tracing: tracing_programs,
                replaced: replaced_programs,
            },
            log.clone(),
            interval,
            stopped,
        ));
        info!(dir = %evidence_dir(&audit.dir).display(), "evidence stream started");
        let evidence = Evidence { stop, task, log };
        // After the programs are attached (a connection made from now on
        // is an event), and with the rings being read meanwhile: what was
        // opened before them and is still open. On a restart only to the
        // targets this start adds: the pinned probe watched while the
        // daemon was down, so every connection since it was pinned is an
        // event, judged against the targets in force when it was made.
        let targets = if probe_was_pinned {
            open_at_start::targets_newly_protected(&snapshot)
        } else {
            open_at_start::targets_of(&snapshot)
        };
        if !targets.is_empty() {
            if let Err(err) = record_open_at_start(&evidence.log, targets).await {
                evidence.shutdown().await;
                return Err(err);
            }
        }
        Ok(evidence)
    }

    /// Drains the ring buffers, writes a last loss_counters record and
    /// closes the evidence log.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.log.shutdown().await;
    }
}

/// Lists the connections to protected targets open at start and records
/// them, then the scan itself (see [`open_at_start`]).
async fn record_open_at_start(
    log: &AuditLog,
    targets: HashMap<SocketAddr, String>,
) -> anyhow::Result<()> {
    let scan = tokio::task::spawn_blocking(move || open_at_start::scan(&targets))
        .await
        .map_err(|err| anyhow::anyhow!("listing the connections open at start: {err}"))?;
    for connection in &scan.connections {
        tracing::warn!(
            target_name = %connection.target,
            destination = %connection.socket.remote,
            pid = ?connection.pid,
            process = %connection.comm,
            "a connection to a protected target was open before tollgate watched: recorded (open_at_start)"
        );
        log.append(open_at_start::record(connection)).await?;
    }
    if !scan.unreadable.is_empty() {
        tracing::warn!(
            unreadable = scan.unreadable.len(),
            "the connections open at start could not be listed for every process (tollgate lacks CAP_SYS_PTRACE, or they are not dumpable): recorded, and verify lists them"
        );
    }
    log.append(open_at_start::scan_record(&scan)).await?;
    Ok(())
}

/// The three evidence ring buffers, as the reader polls them.
struct Rings {
    ring: AsyncFd<RingBuf<MapData>>,
    reserved: AsyncFd<RingBuf<MapData>>,
    agents: AsyncFd<RingBuf<MapData>>,
}

impl Rings {
    /// Drains a batch of each, the reserved one first (its events are the
    /// ones a verdict on bypasses rests on), then the agents': how the
    /// drains ended, the worst of the three (a write that failed, then
    /// more events left). What remains is the readiness branches' work.
    async fn drain_batch(&mut self, log: &AuditLog, user: &mut UserSpaceCounters) -> Drained {
        let reserved = drain(self.reserved.get_mut(), EvidenceRing::Targets, log, user).await;
        let agents = drain(self.agents.get_mut(), EvidenceRing::Agents, log, user).await;
        let general = drain(self.ring.get_mut(), EvidenceRing::General, log, user).await;
        reserved.max(agents).max(general)
    }

    /// All three, until each is empty (or an event cannot be written), for at
    /// most [`STOP_DRAIN_WAIT`]: a host making connections faster than
    /// they are written would keep a stopping daemon here for good. What
    /// is left stays in the pinned rings for the next start.
    async fn drain_all(&mut self, log: &AuditLog, user: &mut UserSpaceCounters) {
        let deadline = tokio::time::Instant::now() + STOP_DRAIN_WAIT;
        for (ring, which) in [
            (&mut self.reserved, EvidenceRing::Targets),
            (&mut self.agents, EvidenceRing::Agents),
            (&mut self.ring, EvidenceRing::General),
        ] {
            while drain(ring.get_mut(), which, log, user).await == Drained::More {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(
                        ring = ?which,
                        "stopping with evidence events still in the ring buffer: they stay pinned for the next start"
                    );
                    break;
                }
            }
        }
    }
}

/// The longest a stopping daemon drains the evidence rings.
const STOP_DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How a drain ended, from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Drained {
    /// The ring buffer was empty.
    Done,
    /// A batch was written and more events may wait.
    More,
    /// An event could not be written and stays in the ring buffer for a
    /// later drain.
    WriteFailed,
}

/// How long the reader waits before it tries again to write an event whose
/// record could not be written (a full disk).
const RETRY_WRITE_AFTER: Duration = Duration::from_millis(250);

/// Events written per drain before the reader lets other tasks run. A
/// flood keeps a ring buffer from ever being empty: drained whole, it
/// would hold a runtime thread (and the sessions queued behind it)
/// indefinitely, and gather an unbounded batch of pending writes.
const DRAIN_BATCH: usize = 1024;

/// The host-wide evidence programs whose recursion misses the loss
/// records carry: this daemon's, and (until a loss record has carried
/// them) the instances it replaced at its start.
struct Programs {
    tracing: Vec<(String, std::os::fd::OwnedFd)>,
    replaced: Vec<(String, ProgStats)>,
}

async fn read_loop(
    mut rings: Rings,
    counters: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    mut programs: Programs,
    log: AuditLog,
    interval: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let counters = Arc::new(counters);
    let mut user = UserSpaceCounters::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    // When to drain again after an event could not be written: the kernel
    // wakes a reader only once it has caught up with a ring buffer, which
    // a reader holding back an event never does, so without this only the
    // ticker would drain, a batch an interval, and the kernel would drop
    // what a busy host sends meanwhile.
    let mut retry: Option<tokio::time::Instant> = None;
    loop {
        let retry_due = async {
            match retry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let stopping = tokio::select! {
            // In this order: the stop; a due retry and the ticker, which a
            // ring buffer kept readable by a flood would otherwise starve
            // (retries drain the reserved ring first, and the ticker
            // writes the loss records); then the reserved ring, the
            // agents' and the general one, so that the reserved ring's
            // events are written first and an agent's flood of refusals
            // never holds them back.
            biased;
            _ = stopped.changed() => true,
            () = retry_due => {
                retry = match rings.drain_batch(&log, &mut user).await {
                    Drained::WriteFailed => Some(tokio::time::Instant::now() + RETRY_WRITE_AFTER),
                    // More waits, and no wake-up comes for it.
                    Drained::More => Some(tokio::time::Instant::now()),
                    Drained::Done => None,
                };
                false
            }
            _ = ticker.tick() => {
                // Ring buffer notifications can be batched: drain on every
                // tick too, so counters and records line up.
                rings.drain_batch(&log, &mut user).await;
                write_loss(&log, &counters, &mut programs, user, interval).await;
                false
            }
            guard = rings.reserved.readable_mut() => {
                if drain_ready(guard, EvidenceRing::Targets, &log, &mut user).await == Drained::WriteFailed {
                    retry = Some(tokio::time::Instant::now() + RETRY_WRITE_AFTER);
                }
                false
            }
            guard = rings.agents.readable_mut() => {
                // An agent's flood keeps its ring readable, and this branch
                // comes first: a batch of the general ring after each one
                // of it, so the flood does not starve the host's other
                // connections.
                let mut drained = drain_ready(guard, EvidenceRing::Agents, &log, &mut user).await;
                if drained != Drained::WriteFailed {
                    drained = drain(rings.ring.get_mut(), EvidenceRing::General, &log, &mut user).await;
                }
                if drained == Drained::WriteFailed {
                    retry = Some(tokio::time::Instant::now() + RETRY_WRITE_AFTER);
                }
                false
            }
            guard = rings.ring.readable_mut() => {
                if drain_ready(guard, EvidenceRing::General, &log, &mut user).await == Drained::WriteFailed {
                    retry = Some(tokio::time::Instant::now() + RETRY_WRITE_AFTER);
                }
                false
            }
        };
        if stopping {
            rings.drain_all(&log, &mut user).await;
            write_loss(&log, &counters, &mut programs, user, interval).await;
            return;
        }
    }
}

/// A batch of a ring buffer the poll found readable. Readiness stays when
/// the batch was cut short, so that the reader's next turn drains on
/// without a wake-up (after letting other tasks run). When an event could
/// not be written, readiness is cleared (kept, the ring buffer would be
/// polled again at once, forever while the disk is full, and the stop and
/// the ticker never) and the caller retries on a timer.
async fn drain_ready(
    guard: std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, RingBuf<MapData>>>,
    which: EvidenceRing,
    log: &AuditLog,
    user: &mut UserSpaceCounters,
) -> Drained {
    match guard {
        Ok(mut guard) => {
            let drained = drain(guard.get_inner_mut(), which, log, user).await;
            match drained {
                Drained::Done | Drained::WriteFailed => guard.clear_ready(),
                Drained::More => tokio::task::yield_now().await,
            }
            drained
        }
        Err(err) => {
            warn!(error = %err, ring = ?which, "evidence ring buffer poll failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            Drained::Done
        }
    }
}

async fn write_loss(
    log: &AuditLog,
    counters: &PerCpuArray<MapData, u64>,
    programs: &mut Programs,
    user: UserSpaceCounters,
    interval: Duration,
) {
    let mut report = LossReport {
        programs: read_counters(counters, &programs.tracing),
        user_space: user,
        interval_ms: interval.as_millis() as u64,
    };
    note_replaced(&mut report, &programs.replaced);
    if !report.lossless() {
        warn!(?report, "evidence was lost");
    }
    match log.append(loss_record(&report)).await {
        // On record: the next ones need not carry the replaced instances.
        Ok(_) => programs.replaced.clear(),
        Err(err) => warn!(error = %err, "cannot write the loss counters"),
    }
}

/// The name a loss record counts program `program` (the kernel's name of
/// it, `tollgate_tcp_state`) under: `tcp_state`.
fn counted_name(program: &str) -> &str {
    program.trim_start_matches("tollgate_")
}

/// Puts each replaced instance on its program's counters.
fn note_replaced(report: &mut LossReport, replaced: &[(String, ProgStats)]) {
    for (name, stats) in replaced {
        if let Some(counters) = report.programs.get_mut(counted_name(name)) {
            counters.replaced = Some(ReplacedInstance {
                program_id: stats.id,
                recursion_misses: stats.recursion_misses,
            });
        }
    }
}

/// Reads the events in the ring buffer into the evidence log, at most
/// [`DRAIN_BATCH`] of them. Each record
/// is written (the log is `buffered`, see [`evidence_config`]) before its
/// event is let go of in the ring buffer, which is when the kernel may
/// reuse its space and a restarted daemon would no longer see it.
///
/// An event whose record cannot be written (a full disk) is not let go
/// of: the drain stops there and a later one (the next notification or
/// tick) writes it. Events must not be taken only to be counted lost in
/// this process's memory: the count would go with the daemon, and with
/// it any sign of the loss. Kept in the ring buffer, they are either
/// written later or, once it is full, dropped by the kernel and counted
/// in its pinned counters (`dropped`), which verify reports.
async fn drain(
    ring: &mut RingBuf<MapData>,
    which: EvidenceRing,
    log: &AuditLog,
    user: &mut UserSpaceCounters,
) -> Drained {
    // Read at each drain: the wall clock may have been stepped since.
    let boot_offset = boot_to_unix_offset_ns();
    let mut pending = Vec::new();
    // A full batch may have left events behind; an empty ring buffer or a
    // failed write ends the drain.
    let mut ended = Drained::More;
    for _ in 0..DRAIN_BATCH {
        let Some(item) = ring.next() else {
            ended = Drained::Done;
            break;
        };
        let Some(event) = decode(&item) else {
            user.received(which);
            user.malformed(which);
            continue;
        };
        let durable = log.submit(event_record(&event, boot_offset));
        if let Some(err) = durable.known_failure() {
            warn!(error = %err, "an evidence record could not be written; its event stays in the ring buffer for the next drain");
            user.write_retried += 1;
            // Dropping the item would let go of the event: forgetting it
            // leaves the ring buffer's consumer position where it is (the
            // item only borrows the ring buffer; nothing is leaked).
            std::mem::forget(item);
            ended = Drained::WriteFailed;
            break;
        }
        user.received(which);
        pending.push(durable);
    }
    for durable in pending {
        if let Err(err) = durable.await {
            user.write_failed(which);
            warn!(error = %err, "an evidence record could not be written");
        }
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u32) -> EvidenceEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"psql");
        EvidenceEvent {
            kind,
            family: 2,
            cookie: 4242,
            cgroup_id: 77,
            boot_ns: 5_000_000_000,
            pid: 1234,
            tid: 1235,
            daddr: gateway_common::v4_mapped(u32::from_ne_bytes([10, 0, 0, 5])),
            dport: 5432,
            protocol: 6,
            comm,
            socket_type: 0,
            packets: 0,
        }
    }

    #[test]
    fn a_tcp_connect_becomes_an_ocsf_network_open_record() {
        let bytes = {
            let e = event(event_kind::TCP_CONNECT);
            // SAFETY: reading the bytes of a plain-integer struct.
            unsafe {
                std::slice::from_raw_parts(
                    (&e as *const EvidenceEvent).cast::<u8>(),
                    std::mem::size_of::<EvidenceEvent>(),
                )
            }
            .to_vec()
        };
        let decoded = decode(&bytes).expect("decode");
        let record = event_record(&decoded, 1_700_000_000_000_000_000);
        assert_eq!(record.phase, "evidence");
        assert_eq!(record.class_uid, 4001);
        assert_eq!(record.activity_id, 1);
        assert_eq!(record.type_uid, 400101);
        assert_eq!(record.actor_process_pid, Some(1234));
        assert_eq!(&*record.actor_process_name, "psql");
        assert_eq!(record.actor_process_cgroup_id, Some(77));
        assert_eq!(&*record.dst_endpoint_ip, "10.0.0.5");
        assert_eq!(record.dst_endpoint_port, Some(5432));
        assert_eq!(record.upstream_socket_cookie, Some(4242));
        assert_eq!(record.time, 1_700_000_005_000);
        let unmapped: serde_json::Value = serde_json::from_str(&record.unmapped).expect("json");
        assert_eq!(unmapped["kind"], "tcp_connect");
        assert_eq!(unmapped["family"], "inet");
        assert!(decode(&bytes[..10]).is_none());
    }

    fn bytes_of(e: &EvidenceEvent) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-integer struct.
        unsafe {
            std::slice::from_raw_parts(
                (e as *const EvidenceEvent).cast::<u8>(),
                std::mem::size_of::<EvidenceEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn a_packet_to_a_protected_target_is_a_traffic_record_without_a_task() {
        let mut e = event(event_kind::PACKET_TO_PROTECTED_TARGET);
        e.pid = 0;
        e.tid = 0;
        e.comm = [0; 16];
        e.protocol = 17;
        e.socket_type = 2;
        e.packets = 3;
        let record = event_record(&e, 0);
        assert_eq!(record.activity_id, network_activity::TRAFFIC);
        assert_eq!(record.type_uid, 400106);
        assert_eq!(record.action_id, crate::audit::action::ALLOWED);
        assert_eq!(record.actor_process_pid, None, "no task in packet context");
        assert_eq!(record.actor_process_cgroup_id, Some(77));
        assert_eq!(&*record.dst_endpoint_ip, "10.0.0.5");
        assert_eq!(record.dst_endpoint_port, Some(5432));
        assert_eq!(&*record.connection_info_protocol_name, "udp");
        let unmapped: serde_json::Value = serde_json::from_str(&record.unmapped).expect("json");
        assert_eq!(unmapped["kind"], "packet_to_protected_target");
        assert_eq!(unmapped["socket_type"], 2);
        assert_eq!(unmapped["packets"], 3);
        assert_eq!(unmapped["port_unread"], serde_json::Value::Null);
    }

    #[test]
    fn a_dropped_source_routed_packet_is_a_refusal_without_a_task() {
        let mut e = event(event_kind::REFUSED_SOURCE_ROUTE);
        e.pid = 0;
        e.tid = 0;
        e.comm = [0; 16];
        e.protocol = 17;
        let record = event_record(&e, 0);
        assert_eq!(record.activity_id, network_activity::REFUSE);
        assert_eq!(record.action_id, crate::audit::action::DENIED);
        assert_eq!(record.actor_process_pid, None, "no task in packet context");
        assert_eq!(record.actor_process_cgroup_id, Some(77));
        assert_eq!(&*record.dst_endpoint_ip, "10.0.0.5");
        assert_eq!(record.dst_endpoint_port, Some(5432));
        let unmapped: serde_json::Value = serde_json::from_str(&record.unmapped).expect("json");
        assert_eq!(unmapped["kind"], "refused_source_route");
        assert_eq!(unmapped["packets"], serde_json::Value::Null);
        // A port behind headers the program did not walk is not port 0.
        e.dport = 0;
        let record = event_record(&e, 0);
        assert_eq!(record.dst_endpoint_port, None);
        let unmapped: serde_json::Value = serde_json::from_str(&record.unmapped).expect("json");
        assert_eq!(unmapped["port_unread"], true);
    }

    #[test]
    fn a_packet_whose_port_was_not_read_has_its_address_and_no_port() {
        let mut e = event(event_kind::PACKET_TO_PROTECTED_TARGET);
        e.dport = 0;
        // The walk stopped at a destination options header.
        e.protocol = 60;
        e.socket_type = 3;
        e.packets = 1;
        let record = event_record(&e, 0);
        assert_eq!(&*record.dst_endpoint_ip, "10.0.0.5");
        assert_eq!(record.dst_endpoint_port, None);
        assert_eq!(&*record.connection_info_protocol_name, "60");
        let unmapped: serde_json::Value = serde_json::from_str(&record.unmapped).expect("json");
        assert_eq!(unmapped["port_unread"], true);
    }

    #[test]
    fn events_of_the_older_shorter_layout_still_decode() {
        let e = event(event_kind::TCP_CONNECT);
        let bytes = bytes_of(&e);
        let old = &bytes[..gateway_common::EVIDENCE_EVENT_V1_BYTES];
        let decoded = decode(old).expect("older layout");
        assert_eq!(decoded, e, "the newer fields read as zero");
        assert!(decode(&bytes[..gateway_common::EVIDENCE_EVENT_V1_BYTES - 1]).is_none());
        assert_eq!(
            std::mem::offset_of!(EvidenceEvent, socket_type),
            gateway_common::EVIDENCE_EVENT_V1_BYTES,
            "new fields are appended after the old layout"
        );
    }

    #[test]
    fn loss_is_any_drop_miss_or_unwritten_event() {
        let clean = ProgramCounters {
            seen: 5,
            emitted: 5,
            recursion_misses: Some(0),
            ..Default::default()
        };
        let with = |program: ProgramCounters, user: UserSpaceCounters| LossReport {
            programs: BTreeMap::from([("tcp_state".to_owned(), program)]),
            user_space: user,
            interval_ms: 5000,
        };
        assert!(with(clean.clone(), UserSpaceCounters::default()).lossless());
        let dropped = ProgramCounters {
            dropped: 1,
            ..clean.clone()
        };
        assert!(!with(dropped, UserSpaceCounters::default()).lossless());
        let missed = ProgramCounters {
            recursion_misses: Some(2),
            ..clean.clone()
        };
        let missed = with(missed, UserSpaceCounters::default());
        assert!(!missed.lossless());
        // The connect a miss skipped may have been a bypass.
        assert_eq!(missed.reserved_lost(), 2);
        assert!(missed.general_lossless());
        let unwritten = UserSpaceCounters {
            write_failed: 1,
            ..Default::default()
        };
        let report = with(clean.clone(), unwritten);
        assert!(!report.lossless());
        assert_eq!(loss_record(&report).status_id, 2);
        // A write retried later lost nothing.
        let retried = UserSpaceCounters {
            write_retried: 3,
            ..Default::default()
        };
        assert!(with(clean, retried).lossless());
    }

    /// `dropped` counts both ring buffers and `dropped_reserved` the
    /// reserved one's share: a drop of either is a loss, and which ring it
    /// was in is told apart.
    #[test]
    fn drops_of_each_ring_buffer_are_told_apart() {
        let report = |dropped: u64, dropped_reserved: u64, user: UserSpaceCounters| LossReport {
            programs: BTreeMap::from([(
                "tcp_state".to_owned(),
                ProgramCounters {
                    seen: 10,
                    emitted: 10 - dropped,
                    dropped,
                    dropped_reserved,
                    recursion_misses: Some(0),
                    ..Default::default()
                },
            )]),
            user_space: user,
            interval_ms: 5000,
        };
        let none = UserSpaceCounters::default();
        let general = report(3, 0, none);
        assert!(!general.lossless());
        assert!(!general.general_lossless());
        assert_eq!(general.reserved_lost(), 0);
        let reserved = report(3, 3, none);
        assert!(!reserved.lossless());
        assert!(reserved.general_lossless());
        assert_eq!(reserved.reserved_lost(), 3);
        assert_eq!(loss_record(&reserved).status_id, 2);
        let both = report(3, 1, none);
        assert!(!both.general_lossless());
        assert_eq!(both.reserved_lost(), 1);
        let mut user = UserSpaceCounters::default();
        user.received(EvidenceRing::Targets);
        user.write_failed(EvidenceRing::Targets);
        user.received(EvidenceRing::General);
        user.malformed(EvidenceRing::General);
        assert_eq!((user.received, user.reserved_received), (2, 1));
        assert_eq!((user.write_failed, user.reserved_write_failed), (1, 1));
        assert_eq!((user.malformed, user.reserved_malformed), (1, 0));
        let in_user_space = report(0, 0, user);
        assert_eq!(
            in_user_space.reserved_lost(),
            1,
            "the unwritten reserved event"
        );
        assert!(
            !in_user_space.general_lossless(),
            "the malformed general item"
        );
    }

    /// The agents' redirects and refusals have a ring of their own: what
    /// it loses is a loss, but not of events about protected targets, so
    /// an agent flooding refusals cannot hide a bypass in the reserved
    /// ring's loss.
    #[test]
    fn drops_of_the_agents_ring_are_lost_agent_events_not_lost_target_events() {
        let counters = |dropped_reserved: u64| ProgramCounters {
            seen: 10,
            emitted: 10 - dropped_reserved,
            dropped: dropped_reserved,
            dropped_reserved,
            ..Default::default()
        };
        let report = LossReport {
            programs: BTreeMap::from([
                ("sendmsg4".to_owned(), counters(4)),
                ("tcp_state".to_owned(), counters(0)),
            ]),
            user_space: UserSpaceCounters::default(),
            interval_ms: 5000,
        };
        assert_eq!(report.agents_lost(), 4);
        assert_eq!(report.reserved_lost(), 0);
        assert!(report.general_lossless());
        assert!(!report.lossless());
        assert_eq!(loss_record(&report).status_id, 2);

        let mut user = UserSpaceCounters::default();
        user.received(EvidenceRing::Agents);
        user.malformed(EvidenceRing::Agents);
        user.received(EvidenceRing::Agents);
        user.write_failed(EvidenceRing::Agents);
        assert_eq!(
            (user.received, user.agents_received, user.reserved_received),
            (2, 2, 0)
        );
        let in_user_space = LossReport {
            user_space: user,
            ..LossReport::default()
        };
        assert_eq!(in_user_space.agents_lost(), 2);
        assert_eq!(in_user_space.reserved_lost(), 0);
        assert!(
            in_user_space.general_lossless(),
            "the agents' items are not the general ring's"
        );

        // A program this version does not know is judged the graver way.
        let unknown = LossReport {
            programs: BTreeMap::from([("later_probe".to_owned(), counters(1))]),
            ..LossReport::default()
        };
        assert_eq!(unknown.reserved_lost(), 1);
        assert_eq!(unknown.agents_lost(), 0);
    }

    #[test]
    fn reserved_counters_have_their_own_slots_and_the_old_ones_stay_put() {
        use gateway_common::{
            counted_program::{COUNT, PACKET_EGRESS, TCP_STATE},
            COUNTER_ENTRIES,
        };
        // Where a daemon without the reserved ring counted: a pinned
        // counter array keeps these meanings across the upgrade.
        assert_eq!(counter_index(TCP_STATE, counter::DROPPED), 2);
        assert_eq!(counter_index(PACKET_EGRESS, counter::SUPPRESSED), 27);
        let mut used = std::collections::BTreeSet::new();
        for program in 0..COUNT {
            for which in 0..counter::PER_PROGRAM {
                assert!(used.insert(counter_index(program, which)));
            }
            for which in 0..reserved_counter::PER_PROGRAM {
                assert!(
                    used.insert(reserved_counter_index(program, which)),
                    "program {program} reserved counter {which} overlaps another"
                );
            }
        }
        assert!(used.iter().all(|&i| i < COUNTER_ENTRIES), "{used:?}");
    }

    /// An event's record is in the WAL file when `submit` returns, before
    /// `drain` lets go of the event in the ring buffer, whatever the audit
    /// log's own durability: a daemon killed right after loses nothing it
    /// took from the kernel.
    #[tokio::test]
    async fn an_evidence_record_is_in_the_wal_before_its_event_is_let_go_of() {
        let tmp = tempfile::tempdir().unwrap();
        for durability in [DurabilityMode::ReadParallel, DurabilityMode::Strict] {
            let mut audit = AuditConfig::new(tmp.path().join(format!("{durability:?}")));
            audit.durability = durability;
            // As the daemon does: the audit log first, which makes the key.
            let audit_log = AuditLog::open(&audit).await.unwrap();
            let log = AuditLog::open(&evidence_config(&audit)).await.unwrap();
            let mut event = event(event_kind::TCP_CONNECT);
            event.comm = *b"taken-then-kill\0";
            let durable = log.submit(event_record(&event, 0));
            let wal = evidence_dir(&audit.dir).join("wal");
            let written = std::fs::read_dir(&wal).unwrap().flatten().any(|f| {
                let bytes = std::fs::read(f.path()).unwrap_or_default();
                bytes.windows(15).any(|w| w == b"taken-then-kill")
            });
            assert!(
                written,
                "{durability:?}: the record is not in {} yet",
                wal.display()
            );
            durable.await.unwrap();
            log.shutdown().await;
            audit_log.shutdown().await;
        }
    }

    #[test]
    fn the_evidence_log_is_signed_with_the_audit_key_in_its_own_directory() {
        let audit = AuditConfig::new("/var/lib/tollgate/audit");
        let evidence = evidence_config(&audit);
        assert_eq!(evidence.dir, Path::new("/var/lib/tollgate/audit/evidence"));
        assert_eq!(
            evidence.signing_key.as_deref(),
            Some(Path::new("/var/lib/tollgate/audit/keys/checkpoint.key"))
        );
    }
}
