//! TCP connections to protected targets that were already open when the
//! daemon started.
//!
//! The kernel programs see a connection when it is made. One made before
//! they were attached (agents started before tollgate after a reboot, the
//! first deployment onto running agents, a gap after `tollgate unpin`) can
//! stay open and be used while tollgate runs, and no event would ever name
//! it. So at a start that finds no probe pinned (on a restart the pinned
//! probe watched all along) the daemon lists the host's TCP sockets, in
//! the network namespace of every process and thread, connected (or
//! connecting, or half-closed by a process that still holds them) to a
//! protected target, and records each as an `open_at_start` evidence row,
//! with the process that holds it when one can be found, then one
//! `open_at_start_scan` row saying what the scan could not read.
//! `tollgate verify` reports each connection as a finding
//! (`open_before_watch`), and lists the processes a scan could not read.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt,
};

use serde_json::json;

use crate::audit::AuditRecord;

use super::{base_record, network_activity, phase, ConfigSnapshot};
use crate::pin::normalise;

/// The `kind` of an open-at-start record.
pub const KIND: &str = "open_at_start";
/// The `kind` of the record of the scan itself.
pub const SCAN_KIND: &str = "open_at_start_scan";
/// Unreadable processes named in the scan's record, at most.
const MAX_NAMED_UNREADABLE: usize = 20;

/// One socket in the kernel's TCP tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's state number (1 established, 2 SYN sent, 8 close wait).
    pub state: u8,
    pub uid: u32,
    pub inode: u64,
}

/// States in which a socket is connected or connecting: it can still
/// carry a request (established, SYN sent, close wait).
const OPEN_STATES: [u8; 3] = [1, 2, 8];
/// Half-closed by this side (FIN wait 1 and 2): it can still receive an
/// answer, when a process still holds it (one whose process is gone, a
/// killed client's, cannot).
const HALF_CLOSED_STATES: [u8; 2] = [4, 5];

/// Parses one `/proc/net/tcp` or `/proc/net/tcp6` table. Lines that do
/// not read are skipped (the header among them).
pub fn parse_table(text: &str) -> Vec<TcpSocket> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<TcpSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
    if fields.len() < 10 {
        return None;
    }
    Some(TcpSocket {
        local: parse_endpoint(fields[1])?,
        remote: parse_endpoint(fields[2])?,
        state: u8::from_str_radix(fields[3], 16).ok()?,
        uid: fields[7].parse().ok()?,
        inode: fields[9].parse().ok()?,
    })
}

/// `0100007F:1538` (IPv4) or 32 hex digits and a port (IPv6): the
/// address as the kernel's 32-bit words in host order, the port in hex.
fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok();
    let ip: IpAddr = match address.len() {
        8 => Ipv4Addr::from(word(address)?.to_ne_bytes()).into(),
        32 => {
            let mut words = [0u32; 4];
            for (i, w) in words.iter_mut().enumerate() {
                *w = word(address.get(i * 8..i * 8 + 8)?)?;
            }
            crate::pin::ip_from_words(words)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// An open socket to a protected target, with who holds it.
#[derive(Debug, Clone)]
pub struct OpenConnection {
    pub socket: TcpSocket,
    pub target: String,
    pub netns: u64,
    pub pid: Option<u32>,
    pub comm: String,
    pub cgroup_id: Option<u64>,
}

/// What a scan found, and what it could not read.
#[derive(Debug, Default)]
pub struct Scan {
    pub connections: Vec<OpenConnection>,
    /// Network namespaces whose tables were read.
    pub namespaces: usize,
    /// Processes whose namespace or open files the daemon may not read
    /// (EACCES, EPERM: it lacks CAP_SYS_PTRACE, see
    /// deploy/tollgate.service, or the process is not dumpable): a
    /// connection they held, or one of their namespace, may be missing.
    /// Processes that ended meanwhile do not count. By pid, with names.
    pub unreadable: BTreeMap<u32, String>,
}

/// Every TCP socket of the host, in the network namespace of any process
/// or thread, connected or connecting to one of `targets` (address to
/// name), or half-closed while a process still holds it.
pub fn scan(targets: &HashMap<SocketAddr, String>) -> Scan {
    let targets: HashMap<SocketAddr, &String> =
        targets.iter().map(|(a, n)| (normalise(*a), n)).collect();
    let mut result = Scan::default();
    // Listed once: a process started after this holds only sockets made
    // since the probe was attached, which are events anyway.
    let pids = pids();
    let (namespaces, mut unreadable) = one_task_per_network_namespace(&pids);
    for (netns, (pid, task)) in &namespaces {
        let mut read_any = false;
        for table in ["tcp", "tcp6"] {
            let text = match fs::read_to_string(format!("{task}/net/{table}")) {
                Ok(text) => text,
                Err(err) => {
                    if denied(&err) {
                        note_unreadable(&mut unreadable, *pid);
                    }
                    continue;
                }
            };
            read_any = true;
            for socket in parse_table(&text) {
                let open = OPEN_STATES.contains(&socket.state);
                if !open && !HALF_CLOSED_STATES.contains(&socket.state) {
                    continue;
                }
                if let Some(name) = targets.get(&normalise(socket.remote)) {
                    result.connections.push(OpenConnection {
                        socket,
                        target: (*name).clone(),
                        netns: *netns,
                        pid: None,
                        comm: String::new(),
                        cgroup_id: None,
                    });
                }
            }
        }
        result.namespaces += usize::from(read_any);
    }
    if !result.connections.is_empty() {
        attribute(&pids, &mut result.connections, &mut unreadable);
    }
    // Half-closed without a holder: a killed process's, which can carry
    // nothing more.
    result
        .connections
        .retain(|c| OPEN_STATES.contains(&c.socket.state) || c.pid.is_some());
    result.unreadable = unreadable;
    result
}

/// Whether `err` means the daemon may not read it (rather than that it
/// is gone).
fn denied(err: &std::io::Error) -> bool {
    // EACCES and EPERM alike.
    err.kind() == std::io::ErrorKind::PermissionDenied
}

/// A `/proc/PID/task/TID` of each network namespace (a thread may have
/// entered one of its own), with its pid: its `net` tables are that
/// namespace's. Also the processes whose namespaces could not be read.
fn one_task_per_network_namespace(
    pids: &[u32],
) -> (BTreeMap<u64, (u32, String)>, BTreeMap<u32, String>) {
    let mut namespaces = BTreeMap::new();
    let mut unreadable = BTreeMap::new();
    for &pid in pids {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let path = task.path();
            match fs::metadata(path.join("ns/net")) {
                Ok(meta) => {
                    namespaces
                        .entry(meta.ino())
                        .or_insert_with(|| (pid, path.display().to_string()));
                }
                Err(err) if denied(&err) => note_unreadable(&mut unreadable, pid),
                Err(_) => {}
            }
        }
    }
    (namespaces, unreadable)
}

/// Names `pid` among the processes that could not be read, once (its
/// threads and tables may each fail).
fn note_unreadable(unreadable: &mut BTreeMap<u32, String>, pid: u32) {
    unreadable.entry(pid).or_insert_with(|| comm_of(pid));
}

fn comm_of(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_default()
}

fn pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

/// Fills in which process holds each socket (the first found holding
/// it), its name and cgroup; adds the processes whose open files could
/// not be read to `unreadable`.
fn attribute(pids: &[u32], found: &mut [OpenConnection], unreadable: &mut BTreeMap<u32, String>) {
    let wanted: HashSet<u64> = found.iter().map(|c| c.socket.inode).collect();
    let mut holders: HashMap<u64, u32> = HashMap::new();
    for &pid in pids {
        let fds = match fs::read_dir(format!("/proc/{pid}/fd")) {
            Ok(fds) => fds,
            Err(err) => {
                if denied(&err) {
                    note_unreadable(unreadable, pid);
                }
                continue;
            }
        };
        for fd in fds.flatten() {
            let Ok(link) = fs::read_link(fd.path()) else {
                continue;
            };
            let inode = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(inode) = inode.filter(|i| wanted.contains(i)) {
                holders.entry(inode).or_insert(pid);
            }
        }
    }
    let root = crate::pin::cgroup2_root().ok();
    for connection in found.iter_mut() {
        let Some(&pid) = holders.get(&connection.socket.inode) else {
            continue;
        };
        connection.pid = Some(pid);
        connection.comm = comm_of(pid);
        connection.cgroup_id = root
            .as_deref()
            .and_then(|root| crate::pin::cgroup_id_of(root, &pid.to_string()));
    }
}

/// The protected targets of `snapshot`, by address.
pub fn targets_of(snapshot: &ConfigSnapshot) -> HashMap<SocketAddr, String> {
    snapshot
        .protected_targets
        .iter()
        .map(|t| (t.address, t.name.clone()))
        .collect()
}

/// The protected targets of `snapshot` that the kernel's map did not hold
/// before this start (`replaced_targets`): the ones this start protects
/// anew. On a restart, the pinned probe watched the connections to every
/// other target while no daemon ran, but a connection to one of these was
/// judged, when it was made, against a configuration that did not protect
/// its destination: if it is still open (an agent's pooled direct
/// connection), only a scan finds it.
pub fn targets_newly_protected(snapshot: &ConfigSnapshot) -> HashMap<SocketAddr, String> {
    let before: std::collections::HashSet<SocketAddr> = snapshot
        .replaced_targets
        .iter()
        .map(|a| normalise(*a))
        .collect();
    targets_of(snapshot)
        .into_iter()
        .filter(|(address, _)| !before.contains(&normalise(*address)))
        .collect()
}

/// The `unmapped` of the scan's record, as written and as verify reads it
/// (fields in the order the JSON object has always listed them).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ScanSummary {
    pub connections: usize,
    /// [`SCAN_KIND`].
    pub kind: String,
    pub namespaces: usize,
    pub unreadable: usize,
    /// The first [`MAX_NAMED_UNREADABLE`] of them by pid, `pid comm`.
    pub unreadable_processes: Vec<String>,
}

/// The record of the scan: how many namespaces it read, how many
/// connections it found, and how many processes it could not read.
pub fn scan_record(scan: &Scan) -> AuditRecord {
    let mut record = base_record(phase::EVIDENCE, network_activity::OTHER);
    record.status_id = match scan.unreadable.is_empty() {
        true => crate::audit::status::SUCCESS,
        false => crate::audit::status::FAILURE,
    };
    record.actor_process_name = "tollgate".into();
    // The first of them by pid, named: enough to tell a host's init or
    // supervisor from an agent.
    let summary = ScanSummary {
        connections: scan.connections.len(),
        kind: SCAN_KIND.into(),
        namespaces: scan.namespaces,
        unreadable: scan.unreadable.len(),
        unreadable_processes: scan
            .unreadable
            .iter()
            .take(MAX_NAMED_UNREADABLE)
            .map(|(pid, comm)| format!("{pid} {comm}"))
            .collect(),
    };
    record.unmapped = serde_json::to_string(&summary).unwrap_or_default();
    record
}

/// The evidence record of one connection open at start.
pub fn record(connection: &OpenConnection) -> AuditRecord {
    let mut record = base_record(phase::EVIDENCE, network_activity::OPEN);
    record.status_id = crate::audit::status::SUCCESS;
    record.actor_process_pid = connection.pid.and_then(|p| i32::try_from(p).ok());
    record.actor_process_name = connection.comm.as_str().into();
    record.actor_process_cgroup_id = connection.cgroup_id.and_then(|c| i64::try_from(c).ok());
    let remote = connection.socket.remote;
    record.dst_endpoint_ip = remote.ip().to_canonical().to_string().into();
    record.dst_endpoint_port = Some(i32::from(remote.port()));
    record.src_endpoint_ip = connection
        .socket
        .local
        .ip()
        .to_canonical()
        .to_string()
        .into();
    record.src_endpoint_port = Some(i32::from(connection.socket.local.port()));
    record.dst_endpoint_name = connection.target.as_str().into();
    record.connection_info_protocol_name = "tcp".into();
    record.unmapped = json!({
        "kind": KIND,
        "family": if remote.is_ipv4() { "inet" } else { "inet6" },
        "state": connection.socket.state,
        "uid": connection.socket.uid,
        "socket_inode": connection.socket.inode,
        "netns": connection.netns,
    })
    .to_string();
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as the kernel writes them (little-endian words on x86).
    #[test]
    fn the_kernels_tcp_tables_read() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                  0: 0100007F:D431 0100007F:1538 01 00000000:00000000 00:00000000 00000000  1000        0 123456 1 0000000000000000 20 4 30 10 -1\n   \
                  1: 00000000:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   105        0 2222 1 0000000000000000 100 0 0 10 0\n";
        let sockets = parse_table(v4);
        assert_eq!(sockets.len(), 2);
        if cfg!(target_endian = "little") {
            assert_eq!(sockets[0].local, "127.0.0.1:54321".parse().expect("addr"));
            assert_eq!(sockets[0].remote, "127.0.0.1:5432".parse().expect("addr"));
        }
        assert_eq!(
            (sockets[0].state, sockets[0].uid, sockets[0].inode),
            (1, 1000, 123456)
        );
        assert_eq!(sockets[1].state, 0x0A);

        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                  0: 00000000000000000000000001000000:D431 00000000000000000000000001000000:1538 01 00000000:00000000 00:00000000 00000000     0        0 7777 1 0000000000000000 20 4 30 10 -1\n   \
                  1: 0000000000000000FFFF00000100007F:D432 0000000000000000FFFF00000100007F:1538 02 00000000:00000000 00:00000000 00000000     0        0 7778 1 0000000000000000 20 4 30 10 -1\n";
        let sockets = parse_table(v6);
        assert_eq!(sockets.len(), 2);
        if cfg!(target_endian = "little") {
            assert_eq!(sockets[0].remote, "[::1]:5432".parse().expect("addr"));
            // IPv4-mapped: the same target as 127.0.0.1:5432.
            assert_eq!(
                sockets[1].remote.ip().to_canonical(),
                IpAddr::from([127, 0, 0, 1])
            );
        }
        assert_eq!(sockets[1].state, 2);
        assert!(parse_table("garbage\n1: zz:zz zz:zz 01").is_empty());
    }

    /// On a restart the scan covers the targets the kernel's map did not
    /// hold before, IPv4-mapped spellings of one address being the same.
    #[test]
    fn targets_newly_protected_are_those_the_map_did_not_hold() {
        let mut snapshot = super::super::in_force::tests::snapshot(
            &[
                ("orders", "10.0.0.5:5432"),
                ("billing", "10.0.0.6:5432"),
                ("ledger", "[fd00::7]:5432"),
            ],
            None,
        );
        // As the map's keys read back: IPv4 mapped.
        snapshot.replaced_targets = vec![
            "[::ffff:10.0.0.5]:5432".parse().expect("addr"),
            "[fd00::7]:5432".parse().expect("addr"),
            "10.0.0.9:5432".parse().expect("addr"),
        ];
        let new = targets_newly_protected(&snapshot);
        assert_eq!(
            new,
            HashMap::from([("10.0.0.6:5432".parse().expect("addr"), "billing".to_owned())])
        );
        assert_eq!(targets_of(&snapshot).len(), 3);
    }

    /// A connection of this process to a listener counts as open to it,
    /// with this process named as its holder; one to another port does
    /// not.
    #[test]
    fn an_open_connection_is_found_with_its_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr");
        let _client = std::net::TcpStream::connect(address).expect("connect");
        let targets = HashMap::from([(address, "db".to_owned())]);
        let scanned = scan(&targets);
        assert!(scanned.namespaces >= 1);
        let found = scanned.connections;
        let ours: Vec<_> = found
            .iter()
            .filter(|c| c.pid == Some(std::process::id()))
            .collect();
        assert_eq!(ours.len(), 1, "{found:?}");
        assert_eq!(ours[0].target, "db");
        assert_eq!(ours[0].socket.remote, address);
        let other = HashMap::from([(
            SocketAddr::new(address.ip(), address.port().wrapping_add(1)),
            "other".to_owned(),
        )]);
        assert!(
            scan(&other)
                .connections
                .iter()
                .all(|c| c.socket.remote != address),
            "only the target's port"
        );
        // Half-closed by a process that still holds it: it can still get
        // an answer, so it is listed too.
        let half_closed = std::net::TcpStream::connect(address).expect("connect");
        half_closed
            .shutdown(std::net::Shutdown::Write)
            .expect("shut down the writing side");
        let local = half_closed.local_addr().expect("local address");
        let found = scan(&targets).connections;
        let listed = found
            .iter()
            .find(|c| c.socket.local == local)
            .unwrap_or_else(|| panic!("the half-closed socket is not listed: {found:?}"));
        assert!(
            HALF_CLOSED_STATES.contains(&listed.socket.state),
            "{listed:?}"
        );
        assert_eq!(listed.pid, Some(std::process::id()));
        let row = record(ours[0]);
        assert_eq!(row.dst_endpoint_port, Some(i32::from(address.port())));
        assert!(row.unmapped.contains("\"kind\":\"open_at_start\""));
    }
}
