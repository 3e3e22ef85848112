//! Types shared by the kernel programs (`gateway-ebpf`) and the daemon
//! (`gateway`). Everything here is `#[repr(C)]`, plain old data and
//! `no_std`, because the same bytes are written by one side and read by the
//! other through BPF maps.
//!
//! Addresses are kept as IPv6 in network byte order; an IPv4 address is
//! stored IPv4-mapped (`::ffff:a.b.c.d`) so that a protected target is one
//! key whether an agent reaches it through an `AF_INET` or an `AF_INET6`
//! socket. Ports are kept in host byte order.
#![no_std]

/// Names of the maps in the kernel object. The daemon looks them up by name.
pub mod map_names {
    /// [`TargetKey`] -> [`Redirect`]: protected destinations and the listener
    /// that serves each.
    pub const REDIRECTS: &str = "REDIRECTS";
    /// socket cookie -> [`OriginalDestination`] for every redirected socket.
    pub const ORIGINAL_DESTINATIONS: &str = "ORIGINAL_DESTINATIONS";
    /// [`ClientEndpointKey`] -> socket cookie, written once a redirected
    /// connection is established, so the proxy can go from the peer address
    /// of an accepted connection to the socket that made it.
    pub const CLIENT_ENDPOINTS: &str = "CLIENT_ENDPOINTS";
    /// The map an older daemon kept in place of [`CLIENT_ENDPOINTS`],
    /// keyed by the agent's local port and the listener's, without the
    /// local address; its pin is removed.
    pub const CLIENT_PORTS_BEFORE: &str = "CLIENT_PORTS";
    /// Ring buffer of [`EvidenceEvent`]s, host-wide: every connect that
    /// goes to no protected target.
    pub const EVIDENCE: &str = "EVIDENCE";
    /// Ring buffer of the [`EvidenceEvent`]s a verdict on bypasses rests
    /// on: connections and packets to protected targets. Apart from the
    /// others so that a flood of other events (anyone's connects to
    /// anywhere, an agent's refused sends) cannot crowd them out: only a
    /// connection or packet to a protected target, each one itself a
    /// finding or an audited upstream, takes room in it. (Older daemons
    /// wrote the agent-cgroup programs' events here too.)
    pub const EVIDENCE_RESERVED: &str = "EVIDENCE_RESERVED";
    /// Ring buffer of the agent-cgroup programs' [`EvidenceEvent`]s:
    /// redirects and refusals. Apart from [`EVIDENCE`], so that no other
    /// process can crowd them out, and from [`EVIDENCE_RESERVED`], so that
    /// an agent flooding refusals cannot crowd out a bypass.
    pub const EVIDENCE_AGENTS: &str = "EVIDENCE_AGENTS";
    /// Per-CPU `u64` counters, indexed by [`counter_index`].
    pub const EVIDENCE_COUNTERS: &str = "EVIDENCE_COUNTERS";
    /// `u32` index -> [`EgressRule`]: what agent cgroups may reach besides
    /// the protected targets, when the default is deny.
    pub const EGRESS_RULES: &str = "EGRESS_RULES";
    /// `u32` index -> `u32`, see [`egress_setting`].
    pub const EGRESS_SETTINGS: &str = "EGRESS_SETTINGS";
    /// port (`u32`, host order) -> `u32` (1): the ports of tollgate's
    /// listeners and of every protected target, which no process in an
    /// agent cgroup may bind.
    pub const LISTENER_PORTS: &str = "LISTENER_PORTS";
    /// `[u32; 4]` address (as in [`TargetKey`]) -> `u32` (1): the addresses
    /// of the protected targets, for packets whose ports the packet program
    /// cannot read.
    pub const PROTECTED_ADDRESSES: &str = "PROTECTED_ADDRESSES";
}

/// Indexes of [`map_names::EGRESS_SETTINGS`].
pub mod egress_setting {
    /// 1: traffic from agent cgroups that is neither redirected nor allowed
    /// by a rule is refused (EPERM). 0: it is allowed.
    pub const DEFAULT_DENY: u32 = 0;
    /// Number of rules in use in EGRESS_RULES.
    pub const RULE_COUNT: u32 = 1;
    pub const ENTRIES: u32 = 4;
}

/// IP protocol numbers an [`EgressRule`] names.
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;

/// Maximum number of egress allow rules.
pub const EGRESS_RULE_ENTRIES: u32 = 64;

/// One egress allow rule: destination prefix, port range and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EgressRule {
    /// Network (IPv6 or IPv4-mapped, network order words), already masked.
    pub addr: [u32; 4],
    /// Mask words (network order), IPv4 prefixes counted from bit 96.
    pub mask: [u32; 4],
    /// Inclusive port range, host order.
    pub port_lo: u32,
    pub port_hi: u32,
    /// 6 TCP, 17 UDP, 0 either (and nothing else: see [`Self::allows`]).
    pub protocol: u32,
    pub _reserved: u32,
}

impl EgressRule {
    /// Does the rule allow `addr`:`port` over `protocol`?
    #[inline(always)]
    pub fn allows(&self, addr: &[u32; 4], port: u32, protocol: u32) -> bool {
        // 0 is what the configuration calls "any" and the documentation
        // "tcp and udp": a rule written for those must not also open the
        // destination to UDP-Lite, SCTP or whatever else reaches a hook.
        let protocol_allowed = match self.protocol {
            0 => protocol == IPPROTO_TCP || protocol == IPPROTO_UDP,
            only => only == protocol,
        };
        protocol_allowed
            && port >= self.port_lo
            && port <= self.port_hi
            && addr[0] & self.mask[0] == self.addr[0]
            && addr[1] & self.mask[1] == self.addr[1]
            && addr[2] & self.mask[2] == self.addr[2]
            && addr[3] & self.mask[3] == self.addr[3]
    }
}

/// Names of the globals (`.rodata`) the daemon sets at load time: the
/// offsets of the socket fields the evidence probe reads, taken from the
/// running kernel's BTF, because Rust eBPF has no CO-RE relocations.
pub mod global_names {
    pub const SKC_DADDR: &str = "SKC_DADDR_OFFSET";
    pub const SKC_DPORT: &str = "SKC_DPORT_OFFSET";
    pub const SKC_FAMILY: &str = "SKC_FAMILY_OFFSET";
    pub const SKC_V6_DADDR: &str = "SKC_V6_DADDR_OFFSET";
    pub const SK_PROTOCOL: &str = "SK_PROTOCOL_OFFSET";
    /// Non-zero once the offsets above are set: the probe records nothing
    /// (and counts it as dropped) rather than read at wrong offsets.
    pub const OFFSETS_SET: &str = "OFFSETS_SET";
}

/// Names of the programs in the kernel object.
pub mod program_names {
    pub const CONNECT4: &str = "tollgate_connect4";
    pub const CONNECT6: &str = "tollgate_connect6";
    pub const GETPEERNAME4: &str = "tollgate_getpeername4";
    pub const GETPEERNAME6: &str = "tollgate_getpeername6";
    pub const SOCK_OPS: &str = "tollgate_sock_ops";
    /// Host-wide evidence: every TCP active open (tp_btf/inet_sock_set_state).
    pub const TCP_STATE: &str = "tollgate_tcp_state";
    pub const SENDMSG4: &str = "tollgate_sendmsg4";
    pub const SENDMSG6: &str = "tollgate_sendmsg6";
    pub const SOCK_CREATE: &str = "tollgate_sock_create";
    /// Refuse binds to tollgate's listener ports (cgroup/bind4, bind6).
    pub const BIND4: &str = "tollgate_bind4";
    pub const BIND6: &str = "tollgate_bind6";
    /// Host-wide evidence at the cgroup v2 root (cgroup_skb/egress): packets
    /// to protected targets from anything but a TCP stream socket.
    pub const PACKET_EGRESS: &str = "tollgate_packet_egress";
    /// Drops the agent cgroups' source-routed packets (cgroup_skb/egress on
    /// each agent cgroup). Shares its hook with [`PACKET_EGRESS`]; the
    /// kernel keeps 15 bytes of a name, and those differ.
    pub const SOURCE_ROUTE: &str = "tollgate_source_route";
}

/// What an [`EvidenceEvent`] reports.
pub mod event_kind {
    /// A TCP active open (CLOSE -> SYN_SENT), anywhere on the host, seen in
    /// the connecting task's context.
    pub const TCP_CONNECT: u32 = 1;
    /// connect4/6 rewrote a connection to a protected target so it reaches
    /// the tollgate listener.
    pub const REDIRECTED: u32 = 2;
    /// A non-TCP packet or connection to a protected target (UDP connect or
    /// datagram) was refused.
    pub const REFUSED_DATAGRAM: u32 = 3;
    /// A socket was refused at creation in an agent cgroup: a raw or
    /// packet socket, or, with egress deny, a datagram socket of a
    /// protocol other than UDP (an ICMP "ping" socket, say), whose
    /// destinations no hook sees.
    pub const REFUSED_SOCKET: u32 = 4;
    /// A destination outside the egress allow list was refused.
    pub const REFUSED_EGRESS: u32 = 5;
    /// A packet left the host for a protected target from a socket that is
    /// not a TCP stream socket (UDP, a raw socket crafting packets, SCTP,
    /// ...), seen at the cgroup root's egress. Not refused: evidence only.
    pub const PACKET_TO_PROTECTED_TARGET: u32 = 6;
    /// A connection or datagram to an unspecified address (`0.0.0.0`,
    /// `::`) from a socket bound to a device was refused: the kernel would
    /// send it to the device's own address, whatever that is.
    pub const REFUSED_UNSPECIFIED_ON_DEVICE: u32 = 7;
    /// A packet from an agent cgroup that names its own route (an IPv4
    /// loose or strict source route option, an IPv6 routing header) was
    /// dropped: the kernel sends such a packet to the route's first hop,
    /// which no socket hook judged. Seen at the packet, without its task.
    pub const REFUSED_SOURCE_ROUTE: u32 = 8;
}

/// Programs that count into [`map_names::EVIDENCE_COUNTERS`].
pub mod counted_program {
    pub const TCP_STATE: u32 = 0;
    pub const CONNECT4: u32 = 1;
    pub const CONNECT6: u32 = 2;
    pub const SENDMSG4: u32 = 3;
    pub const SENDMSG6: u32 = 4;
    pub const SOCK_CREATE: u32 = 5;
    pub const PACKET_EGRESS: u32 = 6;
    pub const SOURCE_ROUTE: u32 = 7;
    /// Number of programs, for readers.
    pub const COUNT: u32 = 8;
    /// Names in the loss report, indexed by the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "tcp_state",
        "connect4",
        "connect6",
        "sendmsg4",
        "sendmsg6",
        "sock_create",
        "packet_egress",
        "source_route",
    ];
}

/// Which counter of a program.
pub mod counter {
    /// Events the program had to report.
    pub const SEEN: u32 = 0;
    /// Events written to the ring buffer.
    pub const EMITTED: u32 = 1;
    /// Events lost, from whichever ring buffer they were for: it was full,
    /// or the probe could not read the socket (offsets not set).
    pub const DROPPED: u32 = 2;
    /// Packets not written as records of their own because their socket
    /// had a record less than [`super::PACKET_RECORD_INTERVAL_NS`] before;
    /// the next record of that socket counts them (`packets`). Not a loss.
    pub const SUPPRESSED: u32 = 3;
    pub const PER_PROGRAM: u32 = 4;
}

/// Which counter of a program's events bound for its own ring buffer
/// ([`ring_for`]: [`map_names::EVIDENCE_RESERVED`] for the host-wide
/// programs' events about protected targets, [`map_names::EVIDENCE_AGENTS`]
/// for the agent-cgroup programs'). Each is also counted in the program's
/// [`counter`] of the same name (`EMITTED`, `DROPPED`): these say how many
/// of those were not the general ring's.
pub mod reserved_counter {
    /// Events written to the program's own ring buffer.
    pub const EMITTED: u32 = 0;
    /// Events for the program's own ring buffer that were lost: it was
    /// full, or the probe could not read the socket to tell where it was
    /// going.
    pub const DROPPED: u32 = 1;
    pub const PER_PROGRAM: u32 = 2;
}

/// Index of a counter in [`map_names::EVIDENCE_COUNTERS`].
#[inline(always)]
pub const fn counter_index(program: u32, which: u32) -> u32 {
    program * counter::PER_PROGRAM + which
}

/// Where the [`reserved_counter`]s start in the counter array: after
/// room for 12 programs' [`counter`]s, so the indexes of counters that
/// existed before do not move (the array is pinned, and a restarted
/// daemon keeps counting into the same one).
pub const RESERVED_COUNTER_BASE: u32 = 48;

/// Index of a [`reserved_counter`] in [`map_names::EVIDENCE_COUNTERS`].
#[inline(always)]
pub const fn reserved_counter_index(program: u32, which: u32) -> u32 {
    RESERVED_COUNTER_BASE + program * reserved_counter::PER_PROGRAM + which
}

/// Entries of the counter array. Not to be raised: a pinned array made by
/// an older daemon keeps its size, and a counter past its end would
/// silently count nothing. With eight counted programs it is full (the
/// asserts below stop the build otherwise): a ninth needs counters of its
/// own, in a map of its own.
pub const COUNTER_ENTRIES: u32 = 64;

const _: () = assert!(
    counter_index(counted_program::COUNT - 1, counter::PER_PROGRAM - 1) < RESERVED_COUNTER_BASE
);
const _: () = assert!(
    reserved_counter_index(
        counted_program::COUNT - 1,
        reserved_counter::PER_PROGRAM - 1
    ) < COUNTER_ENTRIES
);

/// The evidence ring buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvidenceRing {
    /// [`map_names::EVIDENCE`]: anyone can fill it.
    General,
    /// [`map_names::EVIDENCE_RESERVED`]: connections and packets to
    /// protected targets.
    Targets,
    /// [`map_names::EVIDENCE_AGENTS`]: the agent cgroups' redirects and
    /// refusals.
    Agents,
}

/// Which ring buffer an event of `program` about a connection or packet
/// to `destination` goes to.
///
/// A TCP connect seen host-wide goes to [`EvidenceRing::Targets`] when it
/// goes to a protected target (`is_protected`, the REDIRECTS lookup the
/// connect hooks make; both sides hold IPv4 IPv4-mapped, so an IPv6 socket
/// connecting to `::ffff:a.b.c.d` matches the IPv4 target): that is the
/// connection a bypass would be. So do the packet program's events, which
/// are packets to protected targets only. Every other connect on the host
/// goes to the general ring, which anyone can fill. The agent-cgroup
/// programs' events (redirects, refusals) go to their own ring: no other
/// process can crowd them out, and they cannot crowd out a bypass.
#[inline(always)]
pub fn ring_for(
    program: u32,
    destination: &TargetKey,
    is_protected: impl Fn(&TargetKey) -> bool,
) -> EvidenceRing {
    if program == counted_program::TCP_STATE && !is_protected(destination) {
        EvidenceRing::General
    } else {
        own_ring(program)
    }
}

/// The ring a program's events go to when not to the general one, which
/// its [`reserved_counter`]s count: the protected targets' for the
/// host-wide programs, the agents' for the agent-cgroup ones.
pub const fn own_ring(program: u32) -> EvidenceRing {
    match program {
        counted_program::TCP_STATE | counted_program::PACKET_EGRESS => EvidenceRing::Targets,
        _ => EvidenceRing::Agents,
    }
}

/// Does `program` write to the ring of protected targets' events rather
/// than the agents' ring (see [`own_ring`])? A loss there may hide a
/// bypass.
pub const fn reports_protected_targets(program: u32) -> bool {
    matches!(own_ring(program), EvidenceRing::Targets)
}
/// Size of the general evidence ring buffer in bytes (a power of two, a
/// multiple of the page size): room for about 10,000 events in flight.
pub const EVIDENCE_RING_BYTES: u32 = 1 << 20;
/// Size of the reserved evidence ring buffer
/// ([`map_names::EVIDENCE_RESERVED`]), the same.
pub const EVIDENCE_RESERVED_RING_BYTES: u32 = 1 << 20;
/// Size of the agents' evidence ring buffer
/// ([`map_names::EVIDENCE_AGENTS`]), the same.
pub const EVIDENCE_AGENTS_RING_BYTES: u32 = 1 << 20;

/// One kernel observation, written to the evidence ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvidenceEvent {
    /// One of [`event_kind`].
    pub kind: u32,
    /// `AF_INET` or `AF_INET6` (of the socket).
    pub family: u32,
    /// Socket cookie: the same number SO_COOKIE gives user space.
    pub cookie: u64,
    /// cgroup v2 id of the task that acted.
    pub cgroup_id: u64,
    /// CLOCK_BOOTTIME nanoseconds.
    pub boot_ns: u64,
    pub pid: u32,
    pub tid: u32,
    /// Destination (IPv6 or IPv4-mapped, network order words).
    pub daddr: [u32; 4],
    /// Destination port, host order.
    pub dport: u32,
    /// IP protocol number (6 TCP, 17 UDP), or the socket type for
    /// refused sockets.
    pub protocol: u32,
    /// Task name, NUL padded.
    pub comm: [u8; 16],
    /// `packet_to_protected_target` only: the sending socket's type
    /// (1 stream, 2 datagram, 3 raw, ...; 0 when the kernel gave no full
    /// socket). Zero for other kinds.
    pub socket_type: u32,
    /// `packet_to_protected_target` only: packets of this socket this record
    /// stands for (itself and those suppressed since the socket's previous
    /// record). Zero for other kinds.
    pub packets: u32,
}

/// Size of an [`EvidenceEvent`] before `socket_type` and `packets` were
/// added: the pinned ring buffer may still hold events written by the
/// programs of an older daemon, which the reader accepts (the two fields
/// read as zero).
pub const EVIDENCE_EVENT_V1_BYTES: usize = 80;

/// A socket sending packets to a protected target gets at most one record
/// per this interval (CLOCK_BOOTTIME ns); the packets in between are
/// counted, not recorded. Bounds the evidence volume of a datagram flood to
/// one record per second per socket.
pub const PACKET_RECORD_INTERVAL_NS: u64 = 1_000_000_000;

/// Per-socket state of the packet evidence rate limit (value of the
/// `PACKET_RATE` map, keyed by socket cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PacketRate {
    /// When the socket's last record was written (CLOCK_BOOTTIME ns).
    pub last_ns: u64,
    /// Packets suppressed since then.
    pub suppressed: u64,
}

/// Maximum entries of the per-socket maps (LRU, so stale entries age out).
pub const SOCKET_MAP_ENTRIES: u32 = 65_536;
/// Maximum number of protected destinations.
pub const REDIRECT_MAP_ENTRIES: u32 = 1_024;
/// Maximum number of guarded ports (see [`map_names::LISTENER_PORTS`]):
/// every target's listener and every target's own port, so two for each
/// protected destination the redirect map holds.
pub const LISTENER_PORT_ENTRIES: u32 = 2 * REDIRECT_MAP_ENTRIES;

/// The IPv4-mapped IPv6 form of an IPv4 address given in network byte order,
/// as four network-order words.
#[inline(always)]
pub const fn v4_mapped(addr_be: u32) -> [u32; 4] {
    [0, 0, u32::to_be(0x0000_ffff), addr_be]
}

/// 127.0.0.1 in network byte order.
pub const LOOPBACK4: u32 = u32::to_be(0x7f00_0001);
/// `::1` as four network-order words.
pub const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::to_be(1)];

/// Where the kernel may send a connection or datagram that a socket
/// addresses to `asked` (IPv6 or IPv4-mapped words, as in [`TargetKey`]):
/// the place it usually goes first, the other place it can go second
/// (the same address twice when there is only one).
///
/// The socket hooks run before the kernel resolves an unspecified
/// destination, so without this a connect to `0.0.0.0` would be judged as
/// a connect to nowhere while it reaches a local server. What the kernel
/// does (net/ipv4/route.c, tcp_v6_connect, ip6_datagram_connect,
/// udpv6_sendmsg):
/// - `0.0.0.0` (also `::ffff:0.0.0.0` on an IPv6 socket) goes to the
///   socket's IPv4 source address, or to 127.0.0.1 when it has none. A
///   socket bound to a multicast or broadcast address has no source
///   address although it is bound, and goes to 127.0.0.1; a program
///   cannot tell those from a local address (subnet broadcasts depend on
///   the interfaces), hence the second place.
/// - `::` goes to `::ffff:127.0.0.1` when the socket is bound to an
///   IPv4-mapped address, else to `::1`.
///
/// `source4` is the socket's IPv4 source (network order, 0 if none);
/// `source6` its bound IPv6 address (words, network order).
#[inline(always)]
pub fn possible_destinations(asked: [u32; 4], source4: u32, source6: &[u32; 4]) -> [[u32; 4]; 2] {
    let mapped_loopback = v4_mapped(LOOPBACK4);
    if same_address(&asked, &v4_mapped(0)) {
        if source4 == 0 {
            [mapped_loopback, mapped_loopback]
        } else {
            [v4_mapped(source4), mapped_loopback]
        }
    } else if same_address(&asked, &[0; 4]) {
        let loopback = if is_v4_mapped(source6) {
            mapped_loopback
        } else {
            LOOPBACK6
        };
        [loopback, loopback]
    } else {
        [asked, asked]
    }
}

/// Word by word: compared whole, `[u32; 4]` can become a 128-bit integer
/// the BPF backend cannot hold in registers.
#[inline(always)]
pub fn same_address(a: &[u32; 4], b: &[u32; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// Is `addr` (network-order words) an IPv4-mapped IPv6 address?
#[inline(always)]
pub fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::to_be(0x0000_ffff)
}

/// The destination the socket hooks judge for a connection or datagram to
/// `asked`:`port`: of the places the kernel may send it
/// ([`possible_destinations`]), a protected target if there is one (a
/// connection that may reach a protected target goes to tollgate, which
/// reaches only that target), else the place it usually goes.
#[inline(always)]
pub fn destination_key(
    asked: [u32; 4],
    port: u32,
    source4: u32,
    source6: &[u32; 4],
    is_protected: impl Fn(&TargetKey) -> bool,
) -> TargetKey {
    let [usual, other] = possible_destinations(asked, source4, source6);
    let key = TargetKey { addr: usual, port };
    if !same_address(&usual, &other) && !is_protected(&key) {
        let other = TargetKey { addr: other, port };
        if is_protected(&other) {
            return other;
        }
    }
    key
}

/// A protected destination: address (IPv6 or IPv4-mapped, network order
/// words) and port (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetKey {
    pub addr: [u32; 4],
    pub port: u32,
}

/// Where connections to a protected destination are sent instead: a
/// tollgate listener on IPv4 loopback.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// IPv4 address in network byte order.
    pub addr4: u32,
    /// Port in host byte order.
    pub port: u32,
}

/// What the kernel knew about a redirected socket when it connected.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDestination {
    /// The destination the agent asked for (IPv6 or IPv4-mapped).
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u32,
    /// `AF_INET` or `AF_INET6`: the family of the agent's socket.
    pub family: u32,
    /// Thread group id (the process id users see).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// cgroup v2 id of the connecting task.
    pub cgroup_id: u64,
    /// Task name, NUL padded.
    pub comm: [u8; 16],
}

/// Key of [`map_names::CLIENT_ENDPOINTS`]: the agent side of a
/// redirected connection as the proxy sees it from `accept()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientEndpointKey {
    /// Local address of the agent's socket: IPv6 words, IPv4 mapped, in
    /// network byte order (see [`v4_mapped`]). The port alone does not
    /// name one socket: a socket bound to another local address (say
    /// 127.0.0.2) may use the same port as another agent's, and keyed by
    /// port the second would be taken for the first.
    pub addr: [u32; 4],
    /// Local port of the agent's socket, host byte order.
    pub port: u32,
    /// The listener's port the socket connected to, host byte order: the
    /// kernel reuses a local port for connections to different
    /// destinations, so the agent's port alone could name another
    /// connection's process.
    pub listener_port: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are repr(C), Copy, and have no padding holes that
    // matter: every field is an integer or integer array.
    unsafe impl aya::Pod for super::TargetKey {}
    unsafe impl aya::Pod for super::Redirect {}
    unsafe impl aya::Pod for super::OriginalDestination {}
    unsafe impl aya::Pod for super::ClientEndpointKey {}
    unsafe impl aya::Pod for super::EvidenceEvent {}
    unsafe impl aya::Pod for super::EgressRule {}
    unsafe impl aya::Pod for super::PacketRate {}
}
