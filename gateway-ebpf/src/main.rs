//! tollgate's kernel programs.
//!
//! Attached to each agent cgroup:
//! - `connect4`/`connect6` rewrite a connection to a protected destination
//!   so it reaches the tollgate listener for that target, and remember the
//!   original destination and the connecting task under the socket cookie;
//! - `getpeername4`/`getpeername6` give the agent back the address it asked
//!   for, so the redirect is invisible to it;
//! - `sock_ops` notes, once such a connection is established, which local
//!   address and port (and listener port) belong to which cookie, so the
//!   proxy can name the process behind an accepted connection.
//!
//! - `sendmsg4`/`sendmsg6` refuse UDP datagrams to protected targets, and
//!   `connect4`/`connect6` refuse non-stream sockets to them: the gateway
//!   speaks TCP only, so anything else would be a way around it;
//! - `sock_create` refuses raw inet sockets, which could craft packets to a
//!   protected target below every socket hook, and with egress deny the
//!   datagram sockets (ICMP "ping" ones, ...) that no sendmsg hook sees;
//! - all four apply the egress allow list when the default is deny;
//! - `source_route` (cgroup_skb/egress) drops packets that name their own
//!   route (IPv4 source route options, IPv6 routing headers): the kernel
//!   sends them to the route's first hop, which no socket hook judged;
//! - `bind4`/`bind6` refuse binds to tollgate's listener ports (and to
//!   protected targets' ports), so an agent cannot take a listener's
//!   port while tollgate is down and receive the connections (and tokens)
//!   the redirect sends there, nor a local database's and receive
//!   tollgate's own login.
//!
//! connect4/6 and sendmsg4/6 judge a connection to the unspecified address
//! (`0.0.0.0`, `::`) by where the kernel sends it after the hook, a local
//! address (gateway-common's `possible_destinations`).
//!
//! Host-wide, independent of the redirect (evidence):
//! - `tcp_state` (tp_btf/inet_sock_set_state) reports every TCP active open
//!   on the host, in the connecting task's context, with the socket cookie,
//!   so a connection that went around the redirect can be found offline.
//!
//! - `packet_egress` (cgroup_skb/egress at the cgroup v2 root) reports
//!   packets to protected targets from any socket that is not a TCP stream
//!   socket (UDP from outside the agent cgroups, raw sockets crafting
//!   packets, SCTP, ...), which the TCP probe cannot see. It never drops a
//!   packet: it is evidence, not enforcement.
//!
//! Evidence events go to three ring buffers: the reserved one takes those
//! a verdict on bypasses rests on (packets and TCP connects to protected
//! targets), the agents' one every event of the agent-cgroup programs,
//! the general one every other TCP connect on the host. Anyone on the
//! host can fill the general one with cheap connects, and an agent its
//! own with cheap refused sends; neither crowds out the reserved one's
//! events that way. Every event a program had to report is counted as
//! seen, and then as emitted or dropped (and, for a program's own ring,
//! also in its own counters), so a gap in the evidence is itself on
//! record, and so is which ring it was in.
#![no_std]
#![no_main]
// For atomic_xadd/atomic_xchg: see `atomic_add`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::{ffi::c_void, intrinsics::AtomicOrdering};

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_probe_read_kernel, bpf_sk_fullsock,
        bpf_skb_cgroup_id,
    },
    macros::{btf_tracepoint, cgroup_skb, cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use gateway_common::{
    counted_program, counter, counter_index, destination_key, egress_setting, event_kind,
    possible_destinations,
    reserved_counter, reserved_counter_index, ring_for, same_address, v4_mapped, IPPROTO_TCP,
    ClientEndpointKey, EgressRule, EvidenceEvent, OriginalDestination, PacketRate, Redirect,
    EvidenceRing, TargetKey, COUNTER_ENTRIES, EGRESS_RULE_ENTRIES, EVIDENCE_AGENTS_RING_BYTES,
    EVIDENCE_RESERVED_RING_BYTES,
    EVIDENCE_RING_BYTES, LISTENER_PORT_ENTRIES, PACKET_RECORD_INTERVAL_NS, REDIRECT_MAP_ENTRIES,
    SOCKET_MAP_ENTRIES,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Return value that lets the operation go on.
const ALLOW: i32 = 1;
/// Return value that makes the system call fail with EPERM.
const REFUSE: i32 = 0;
const AF_PACKET: u32 = 17;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;

#[map(name = "REDIRECTS")]
static REDIRECTS: HashMap<TargetKey, Redirect> = HashMap::with_max_entries(REDIRECT_MAP_ENTRIES, 0);

#[map(name = "ORIGINAL_DESTINATIONS")]
static ORIGINAL_DESTINATIONS: LruHashMap<u64, OriginalDestination> =
    LruHashMap::with_max_entries(SOCKET_MAP_ENTRIES, 0);

#[map(name = "CLIENT_ENDPOINTS")]
static CLIENT_ENDPOINTS: LruHashMap<ClientEndpointKey, u64> =
    LruHashMap::with_max_entries(SOCKET_MAP_ENTRIES, 0);

#[map(name = "EGRESS_RULES")]
static EGRESS_RULES: Array<EgressRule> = Array::with_max_entries(EGRESS_RULE_ENTRIES, 0);

#[map(name = "EGRESS_SETTINGS")]
static EGRESS_SETTINGS: Array<u32> = Array::with_max_entries(egress_setting::ENTRIES, 0);

#[map(name = "LISTENER_PORTS")]
static LISTENER_PORTS: HashMap<u32, u32> = HashMap::with_max_entries(LISTENER_PORT_ENTRIES, 0);

/// The addresses of the protected targets, whatever their ports: for
/// packets whose ports cannot be read (see [`TransportHeader::Hidden`]).
#[map(name = "PROTECTED_ADDRESSES")]
static PROTECTED_ADDRESSES: HashMap<[u32; 4], u32> =
    HashMap::with_max_entries(REDIRECT_MAP_ENTRIES, 0);

/// socket cookie -> rate limit state of the packet evidence.
#[map(name = "PACKET_RATE")]
static PACKET_RATE: LruHashMap<u64, PacketRate> =
    LruHashMap::with_max_entries(SOCKET_MAP_ENTRIES, 0);

#[map(name = "EVIDENCE")]
static EVIDENCE: RingBuf = RingBuf::with_byte_size(EVIDENCE_RING_BYTES, 0);

#[map(name = "EVIDENCE_RESERVED")]
static EVIDENCE_RESERVED: RingBuf = RingBuf::with_byte_size(EVIDENCE_RESERVED_RING_BYTES, 0);

#[map(name = "EVIDENCE_AGENTS")]
static EVIDENCE_AGENTS: RingBuf = RingBuf::with_byte_size(EVIDENCE_AGENTS_RING_BYTES, 0);

#[map(name = "EVIDENCE_COUNTERS")]
static EVIDENCE_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_ENTRIES, 0);

// Offsets into the kernel's struct sock, set by the daemon at load time from
// /sys/kernel/btf/vmlinux (gateway-common's global_names). Rust eBPF has no
// CO-RE relocations, so this is how one object serves several kernels.
// Read with read_volatile: the compiler must not fold the zero initialisers.
#[no_mangle]
static SKC_DADDR_OFFSET: u32 = 0;
#[no_mangle]
static SKC_DPORT_OFFSET: u32 = 0;
#[no_mangle]
static SKC_FAMILY_OFFSET: u32 = 0;
#[no_mangle]
static SKC_V6_DADDR_OFFSET: u32 = 0;
#[no_mangle]
static SK_PROTOCOL_OFFSET: u32 = 0;
#[no_mangle]
static OFFSETS_SET: u32 = 0;

const TCP_SYN_SENT: i32 = 2;
const TCP_CLOSE: i32 = 7;

/// Adds `n` to a counter that another run of a program may be adding to
/// at the same moment, without losing either addition.
///
/// A per-CPU slot is not enough on its own: the cgroup programs run with
/// migration disabled but preemptible, so another task on the same CPU can
/// run between the load and the store of a plain `+= 1` and one of the two
/// increments is lost; a shared map value (PACKET_RATE) is written from
/// every CPU. BPF has an atomic add (`lock *(u64 *)(rX + off) += rY`),
/// which the kernel accepts on any map value. `AtomicU64::fetch_add` is not
/// offered on this target (core leaves out every read-modify-write where
/// the target declares no compare-and-swap), so the intrinsic is called
/// directly; LLVM lowers it to that one instruction.
#[inline(always)]
unsafe fn atomic_add(slot: *mut u64, n: u64) {
    core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, n);
}

/// Sets `slot` to `value` and returns what it held, in one step, so that
/// an [`atomic_add`] from another CPU lands either before (and is
/// returned) or after (and stays).
#[inline(always)]
unsafe fn atomic_swap(slot: *mut u64, value: u64) -> u64 {
    core::intrinsics::atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(slot, value)
}

#[inline(always)]
fn count_at(index: u32) {
    if let Some(slot) = EVIDENCE_COUNTERS.get_ptr_mut(index) {
        unsafe { atomic_add(slot, 1) };
    }
}

#[inline(always)]
fn count(program: u32, which: u32) {
    count_at(counter_index(program, which));
}

/// Counts an event lost; `reserved` when it was bound for the program's
/// own ring (not the general one). The general counter first: the reader
/// reads the reserved one first, so it never sees more reserved drops
/// than drops.
#[inline(always)]
fn count_dropped(program: u32, reserved: bool) {
    count(program, counter::DROPPED);
    if reserved {
        count_at(reserved_counter_index(program, reserved_counter::DROPPED));
    }
}

/// Writes one event to the ring buffer [`ring_for`] chooses by its
/// program and destination, counting it as emitted, or as dropped when
/// that ring buffer is full. The caller has counted it as seen. One
/// literal call per ring, not one on a chosen map: each helper call then
/// names its map, as the verifier wants.
#[inline(always)]
fn emit(program: u32, event: &EvidenceEvent) {
    let destination = TargetKey {
        addr: event.daddr,
        port: event.dport,
    };
    // Only the host-wide connect probe looks its destination up.
    let ring = ring_for(program, &destination, |key| unsafe {
        REDIRECTS.get(key).is_some()
    });
    let reserved = ring != EvidenceRing::General;
    let entry = match ring {
        EvidenceRing::Targets => EVIDENCE_RESERVED.reserve::<EvidenceEvent>(0),
        EvidenceRing::Agents => EVIDENCE_AGENTS.reserve::<EvidenceEvent>(0),
        EvidenceRing::General => EVIDENCE.reserve::<EvidenceEvent>(0),
    };
    match entry {
        Some(mut entry) => {
            entry.write(*event);
            entry.submit(0);
            count(program, counter::EMITTED);
            if reserved {
                count_at(reserved_counter_index(program, reserved_counter::EMITTED));
            }
        }
        None => count_dropped(program, reserved),
    }
}

#[inline(always)]
fn current_task_event(kind: u32, family: u32, cookie: u64) -> EvidenceEvent {
    let pid_tgid = bpf_get_current_pid_tgid();
    EvidenceEvent {
        kind,
        family,
        cookie,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        daddr: [0; 4],
        dport: 0,
        protocol: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        socket_type: 0,
        packets: 0,
    }
}

#[inline(always)]
unsafe fn read_at<T>(base: *const u8, offset: u32) -> Option<T> {
    bpf_probe_read_kernel(base.add(offset as usize) as *const T).ok()
}

/// Every TCP active open on the host. At CLOSE -> SYN_SENT the kernel is
/// still in the connecting task's context (connect(), sendto(MSG_FASTOPEN),
/// io_uring), so pid, comm and cgroup are the caller's; the destination is
/// the one the SYN goes to (after any connect4/6 rewrite).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tollgate_tcp_state(ctx: BtfTracePointContext) -> i32 {
    let old_state: i32 = ctx.arg(1);
    let new_state: i32 = ctx.arg(2);
    if old_state != TCP_CLOSE || new_state != TCP_SYN_SENT {
        return 0;
    }
    let program = counted_program::TCP_STATE;
    count(program, counter::SEEN);
    let sk: *const u8 = ctx.arg(0);
    unsafe {
        if core::ptr::read_volatile(&OFFSETS_SET) == 0 {
            // Where it went is unknown, so it may have been a connection
            // to a protected target: counted as the reserved ring's too.
            count_dropped(program, true);
            return 0;
        }
        let cookie = bpf_get_socket_cookie(sk as *mut c_void);
        let family: u16 = read_at(sk, core::ptr::read_volatile(&SKC_FAMILY_OFFSET)).unwrap_or(0);
        let dport_be: u16 = read_at(sk, core::ptr::read_volatile(&SKC_DPORT_OFFSET)).unwrap_or(0);
        let protocol: u16 = read_at(sk, core::ptr::read_volatile(&SK_PROTOCOL_OFFSET)).unwrap_or(0);
        let daddr = if u32::from(family) == AF_INET6 {
            read_at::<[u32; 4]>(sk, core::ptr::read_volatile(&SKC_V6_DADDR_OFFSET))
                .unwrap_or([0; 4])
        } else {
            let v4: u32 = read_at(sk, core::ptr::read_volatile(&SKC_DADDR_OFFSET)).unwrap_or(0);
            v4_mapped(v4)
        };
        let mut event = current_task_event(event_kind::TCP_CONNECT, u32::from(family), cookie);
        event.daddr = daddr;
        event.dport = u32::from(u16::from_be(dport_be));
        event.protocol = u32::from(protocol);
        emit(program, &event);
    }
    0
}

/// `user_port` holds a 16-bit port in network byte order in its low bytes.
#[inline(always)]
fn port_from_user(user_port: u32) -> u32 {
    u16::from_be(user_port as u16) as u32
}

#[inline(always)]
fn port_to_user(port: u32) -> u32 {
    (port as u16).to_be() as u32
}

#[inline(always)]
unsafe fn remember(sa: *mut bpf_sock_addr, key: &TargetKey, family: u32) {
    let cookie = bpf_get_socket_cookie(sa as *mut _);
    let pid_tgid = bpf_get_current_pid_tgid();
    let original = OriginalDestination {
        addr: key.addr,
        port: key.port,
        family,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        cgroup_id: bpf_get_current_cgroup_id(),
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    // A full LRU map evicts the oldest entry; insert cannot fail for lack
    // of room, and if it fails otherwise the proxy only loses the process
    // name, never the redirect itself.
    let _ = ORIGINAL_DESTINATIONS.insert(&cookie, &original, 0);
}

/// Whether a tollgate program that ran before this one on the same connect
/// already sent the socket to the listener `key` now names: an agent
/// cgroup inside another one, or the old and the new programs attached
/// side by side while a restarted daemon takes over. The connection goes
/// on to the listener; judged again, the listener (not a protected
/// target) would be refused under `egress_default = "deny"`.
#[inline(always)]
unsafe fn redirected_here_already(sa: *mut bpf_sock_addr, key: &TargetKey) -> bool {
    let cookie = bpf_get_socket_cookie(sa as *mut _);
    let Some(original) = ORIGINAL_DESTINATIONS.get(&cookie) else {
        return false;
    };
    let asked_for = TargetKey {
        addr: original.addr,
        port: original.port,
    };
    match REDIRECTS.get(&asked_for) {
        Some(redirect) => key.addr == v4_mapped(redirect.addr4) && key.port == redirect.port,
        None => false,
    }
}

/// Evidence that connect4/6 sent this socket to tollgate: with it, the
/// verifier can tell a redirected connection (whose SYN goes to the
/// listener) from one that went direct.
#[inline(always)]
unsafe fn report_redirect(sa: *mut bpf_sock_addr, key: &TargetKey, family: u32, program: u32) {
    count(program, counter::SEEN);
    let cookie = bpf_get_socket_cookie(sa as *mut _);
    let mut event = current_task_event(event_kind::REDIRECTED, family, cookie);
    event.daddr = key.addr;
    event.dport = key.port;
    event.protocol = 6;
    emit(program, &event);
}

/// What the socket hooks decide for a destination.
enum Verdict {
    Redirect(Redirect),
    Allow,
    /// Refused; the event kind says why.
    Refuse(u32),
}

/// Is `egress_default = "deny"` in force?
#[inline(always)]
fn egress_denied_by_default() -> bool {
    matches!(EGRESS_SETTINGS.get(egress_setting::DEFAULT_DENY), Some(&deny) if deny != 0)
}

/// Is the egress allow list in force, and does it allow this?
#[inline(always)]
fn egress_allowed(addr: &[u32; 4], port: u32, protocol: u32) -> bool {
    if !egress_denied_by_default() {
        return true;
    }
    let count = EGRESS_SETTINGS
        .get(egress_setting::RULE_COUNT)
        .copied()
        .unwrap_or(0);
    let mut i = 0;
    // A constant bound the verifier can see; `count` only ends it early.
    while i < EGRESS_RULE_ENTRIES {
        if i >= count {
            break;
        }
        if let Some(rule) = EGRESS_RULES.get(i) {
            if rule.allows(addr, port, protocol) {
                return true;
            }
        }
        i += 1;
    }
    false
}

/// The decision for a connect or datagram from an agent cgroup.
#[inline(always)]
fn decide(key: &TargetKey, sock_type: u32, protocol: u32) -> Verdict {
    if let Some(redirect) = unsafe { REDIRECTS.get(key) } {
        // tollgate's listeners speak TCP: a datagram or any other socket
        // kind to a protected target can only be a way around them.
        return if sock_type == SOCK_STREAM {
            Verdict::Redirect(*redirect)
        } else {
            Verdict::Refuse(event_kind::REFUSED_DATAGRAM)
        };
    }
    let protocol = if sock_type == SOCK_STREAM {
        IPPROTO_TCP
    } else {
        protocol
    };
    if egress_allowed(&key.addr, key.port, protocol) {
        Verdict::Allow
    } else {
        Verdict::Refuse(event_kind::REFUSED_EGRESS)
    }
}

#[inline(always)]
unsafe fn report_refusal(
    sa: *mut bpf_sock_addr,
    key: &TargetKey,
    family: u32,
    kind: u32,
    program: u32,
) {
    count(program, counter::SEEN);
    let cookie = bpf_get_socket_cookie(sa as *mut _);
    let mut event = current_task_event(kind, family, cookie);
    event.daddr = key.addr;
    event.dport = key.port;
    event.protocol = (*sa).protocol;
    emit(program, &event);
}

/// What of the socket itself decides where the kernel sends an unspecified
/// destination: its IPv4 source (0 if none), its bound IPv6 address, and
/// the device it is bound to (0 if none).
struct SocketSources {
    source4: u32,
    source6: [u32; 4],
    bound_device: u32,
}

#[inline(always)]
unsafe fn socket_sources(sa: *mut bpf_sock_addr) -> SocketSources {
    // The verifier hands out ctx->sk only as an 8-byte load at its offset,
    // and never null in sock_addr programs.
    let sk: *mut bpf_sock = core::ptr::read_volatile(&(*sa).__bindgen_anon_1.sk);
    SocketSources {
        source4: core::ptr::read_volatile(&(*sk).src_ip4),
        source6: [
            core::ptr::read_volatile(&(*sk).src_ip6[0]),
            core::ptr::read_volatile(&(*sk).src_ip6[1]),
            core::ptr::read_volatile(&(*sk).src_ip6[2]),
            core::ptr::read_volatile(&(*sk).src_ip6[3]),
        ],
        bound_device: core::ptr::read_volatile(&(*sk).bound_dev_if),
    }
}

/// An unspecified destination (`0.0.0.0`, `::ffff:0.0.0.0`, `::`) that
/// may go out through a device: from a socket bound to one
/// (SO_BINDTODEVICE, which needs no privilege on an unbound socket), or
/// from any non-stream socket, which can name its device where no program
/// here sees it (IP_UNICAST_IF, IPV6_UNICAST_IF, an IP_PKTINFO message).
/// The kernel then takes the device's own address for both source and
/// destination (ip_route_output_key_hash_rcu), which may be a protected
/// target on this host that no program here can name in advance. Nothing
/// legitimate connects or sends so: it is refused.
#[inline(always)]
fn unspecified_on_device(asked: &[u32; 4], bound_device: u32, sock_type: u32) -> bool {
    (bound_device != 0 || sock_type != SOCK_STREAM)
        && (same_address(asked, &v4_mapped(0)) || same_address(asked, &[0; 4]))
}

/// Refuses a connect or datagram to the unspecified address that may go
/// out through a device ([`unspecified_on_device`]), and says so.
#[inline(always)]
unsafe fn refuse_unspecified(sa: *mut bpf_sock_addr, asked: &TargetKey, family: u32, program: u32) -> i32 {
    let kind = event_kind::REFUSED_UNSPECIFIED_ON_DEVICE;
    report_refusal(sa, asked, family, kind, program);
    REFUSE
}

/// The destination to judge for `asked`:`port` from a socket of
/// `sock_type` and `protocol`: where the kernel sends it, a protected
/// target first when it may go to one; else, when it may go to either of
/// two places ([`possible_destinations`]), one the allow list does not
/// allow if there is one. A socket bound to a broadcast or multicast
/// address that connects to 0.0.0.0 reaches 127.0.0.1, not the address it
/// is bound to: judged at the bound address alone, a rule allowing that
/// address would let it reach whatever listens on the loopback.
#[inline(always)]
fn judged_destination(
    asked: [u32; 4],
    port: u32,
    source4: u32,
    source6: &[u32; 4],
    sock_type: u32,
    protocol: u32,
) -> TargetKey {
    let key = destination_key(asked, port, source4, source6, |key| unsafe {
        REDIRECTS.get(key).is_some()
    });
    // Only a socket asking for the unspecified address may go to two
    // places, and only the allow list cares which: every other connect
    // (the hot path) is judged as before, without another map lookup.
    if !egress_denied_by_default() {
        return key;
    }
    let [_, other] = possible_destinations(asked, source4, source6);
    // `key` is `other` when that one is a protected target.
    if same_address(&other, &key.addr) || unsafe { REDIRECTS.get(&key).is_some() } {
        return key;
    }
    let protocol = if sock_type == SOCK_STREAM {
        IPPROTO_TCP
    } else {
        protocol
    };
    if !egress_allowed(&other, port, protocol) {
        return TargetKey { addr: other, port };
    }
    key
}

/// [`judged_destination`] of the address a connecting (or sending)
/// socket asked for, from the socket's own source addresses; `Err` with
/// the destination as asked when it is refused whatever it is
/// ([`unspecified_on_device`]).
#[inline(always)]
unsafe fn judged_socket_destination(
    sa: *mut bpf_sock_addr,
    asked: [u32; 4],
) -> Result<TargetKey, TargetKey> {
    let sources = socket_sources(sa);
    let port = port_from_user((*sa).user_port);
    if unspecified_on_device(&asked, sources.bound_device, (*sa).type_) {
        return Err(TargetKey { addr: asked, port });
    }
    Ok(judged_destination(
        asked,
        port,
        sources.source4,
        &sources.source6,
        (*sa).type_,
        (*sa).protocol,
    ))
}

#[cgroup_sock_addr(connect4)]
pub fn tollgate_connect4(ctx: SockAddrContext) -> i32 {
    unsafe {
        let sa = ctx.sock_addr;
        let key = match judged_socket_destination(sa, v4_mapped((*sa).user_ip4)) {
            Ok(key) => key,
            Err(asked) => return refuse_unspecified(sa, &asked, AF_INET, counted_program::CONNECT4),
        };
        if redirected_here_already(sa, &key) {
            return ALLOW;
        }
        match decide(&key, (*sa).type_, (*sa).protocol) {
            Verdict::Redirect(redirect) => {
                remember(sa, &key, AF_INET);
                report_redirect(sa, &key, AF_INET, counted_program::CONNECT4);
                (*sa).user_ip4 = redirect.addr4;
                (*sa).user_port = port_to_user(redirect.port);
            }
            Verdict::Allow => {}
            Verdict::Refuse(kind) => {
                report_refusal(sa, &key, AF_INET, kind, counted_program::CONNECT4);
                return REFUSE;
            }
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn tollgate_connect6(ctx: SockAddrContext) -> i32 {
    unsafe {
        let sa = ctx.sock_addr;
        let key = match judged_socket_destination(sa, read_ip6(sa)) {
            Ok(key) => key,
            Err(asked) => return refuse_unspecified(sa, &asked, AF_INET6, counted_program::CONNECT6),
        };
        if redirected_here_already(sa, &key) {
            return ALLOW;
        }
        match decide(&key, (*sa).type_, (*sa).protocol) {
            Verdict::Redirect(redirect) => {
                remember(sa, &key, AF_INET6);
                report_redirect(sa, &key, AF_INET6, counted_program::CONNECT6);
                // The listener is IPv4; an AF_INET6 socket reaches it through
                // the IPv4-mapped form of its address.
                write_ip6(sa, v4_mapped(redirect.addr4));
                (*sa).user_port = port_to_user(redirect.port);
            }
            Verdict::Allow => {}
            Verdict::Refuse(kind) => {
                report_refusal(sa, &key, AF_INET6, kind, counted_program::CONNECT6);
                return REFUSE;
            }
        }
    }
    ALLOW
}

/// Unconnected UDP: each datagram's destination is checked.
#[cgroup_sock_addr(sendmsg4)]
pub fn tollgate_sendmsg4(ctx: SockAddrContext) -> i32 {
    unsafe {
        let sa = ctx.sock_addr;
        // The datagram's own source (the socket's, or the one an IP_PKTINFO
        // message names) is the one the kernel routes from. An IPv4
        // destination is never `::`, so no IPv6 source is needed.
        let asked = v4_mapped((*sa).user_ip4);
        let port = port_from_user((*sa).user_port);
        if unspecified_on_device(&asked, socket_sources(sa).bound_device, (*sa).type_) {
            let asked = TargetKey { addr: asked, port };
            return refuse_unspecified(sa, &asked, AF_INET, counted_program::SENDMSG4);
        }
        let key = judged_destination(
            asked,
            port,
            (*sa).msg_src_ip4,
            &[0; 4],
            (*sa).type_,
            (*sa).protocol,
        );
        if let Verdict::Refuse(kind) = decide(&key, (*sa).type_, (*sa).protocol) {
            report_refusal(sa, &key, AF_INET, kind, counted_program::SENDMSG4);
            return REFUSE;
        }
    }
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tollgate_sendmsg6(ctx: SockAddrContext) -> i32 {
    unsafe {
        let sa = ctx.sock_addr;
        let key = match judged_socket_destination(sa, read_ip6(sa)) {
            Ok(key) => key,
            Err(asked) => return refuse_unspecified(sa, &asked, AF_INET6, counted_program::SENDMSG6),
        };
        if let Verdict::Refuse(kind) = decide(&key, (*sa).type_, (*sa).protocol) {
            report_refusal(sa, &key, AF_INET6, kind, counted_program::SENDMSG6);
            return REFUSE;
        }
    }
    ALLOW
}

/// A listener's port is tollgate's alone. While tollgate is down (a
/// restart, a crash) the pinned redirect still sends agents' connections
/// to the port; a process of an agent cgroup that bound it first would
/// receive them, tokens included, and the restarted tollgate could not
/// listen. The map also holds the port of every protected target: one on
/// this host, at whatever address, is where tollgate sends its own login.
/// The port alone decides: `0.0.0.0`, `::` and every local address share
/// it with tollgate's listener and with a local target. A bind to port 0
/// (any free port) is not seen with the port the kernel then picks:
/// docs/pinning.md says how to keep listener ports out of that range.
#[inline(always)]
unsafe fn bind_verdict(sa: *mut bpf_sock_addr) -> i32 {
    let port = port_from_user((*sa).user_port);
    if LISTENER_PORTS.get(&port).is_some() {
        REFUSE
    } else {
        ALLOW
    }
}

#[cgroup_sock_addr(bind4)]
pub fn tollgate_bind4(ctx: SockAddrContext) -> i32 {
    unsafe { bind_verdict(ctx.sock_addr) }
}

#[cgroup_sock_addr(bind6)]
pub fn tollgate_bind6(ctx: SockAddrContext) -> i32 {
    unsafe { bind_verdict(ctx.sock_addr) }
}

/// Is a datagram socket of `protocol` one whose every destination passes
/// sendmsg4/6 (or connect4/6)? Only UDP's: the kernel runs the connect
/// hooks for a datagram socket only when its protocol has a `pre_connect`
/// (UDP has, UDP-Lite has not), and the sendmsg hooks only for a datagram
/// sent without a connection, so a connected UDP-Lite socket sends where
/// no hook sees. Other inet datagram sockets (ICMP echo "ping" sockets,
/// which net.ipv4.ping_group_range opens to unprivileged users, L2TP/IP,
/// ...) send to any address without a hook seeing it either, so the allow
/// list cannot be applied to them. sock_create runs after the protocol is
/// resolved, so a socket asked for with protocol 0 shows UDP here; 0 is
/// accepted all the same, as it means UDP for an inet datagram socket.
#[inline(always)]
fn datagram_judged_by_the_hooks(protocol: u32) -> bool {
    protocol == 0 || protocol == u32::from(IPPROTO_UDP)
}

/// Raw sockets can put any packet on the wire, below every socket-address
/// hook: agents may not have them. (The kernel runs this hook for inet
/// sockets only; AF_PACKET sockets never reach it, which is why agents
/// must also run without CAP_NET_RAW: docs/pinning.md.) With egress deny,
/// neither may they have datagram sockets whose destinations no hook sees
/// ([`datagram_judged_by_the_hooks`]): a ping socket would otherwise
/// reach any host the allow list leaves out.
#[cgroup_sock(sock_create)]
pub fn tollgate_sock_create(ctx: SockContext) -> i32 {
    unsafe {
        let sk = ctx.sock;
        let family = (*sk).family;
        let sock_type = (*sk).type_;
        // Under deny, every socket whose destinations some hook judges:
        // TCP streams (connect4/6) and UDP datagrams (connect, sendmsg).
        // SCTP (one-to-many SEQPACKET sockets associate in sendmsg, on a
        // path no hook runs on), ping sockets and the like are not.
        let judged = match sock_type {
            SOCK_STREAM => (*sk).protocol == 0 || (*sk).protocol == IPPROTO_TCP,
            SOCK_DGRAM => datagram_judged_by_the_hooks((*sk).protocol),
            _ => false,
        };
        let unjudged = !judged && egress_denied_by_default();
        if family == AF_PACKET || sock_type == SOCK_RAW || unjudged {
            let program = counted_program::SOCK_CREATE;
            count(program, counter::SEEN);
            let mut event = current_task_event(event_kind::REFUSED_SOCKET, family, 0);
            event.protocol = (*sk).protocol;
            // The socket type, for the record (no destination yet).
            event.dport = sock_type;
            emit(program, &event);
            return REFUSE;
        }
    }
    ALLOW
}

const IPPROTO_TCP_U8: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_DCCP: u8 = 33;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
/// IPsec: the transport header follows an authentication header (walked),
/// and is encrypted behind an ESP one (see [`TransportHeader::NotJudged`]).
const IPPROTO_ESP: u8 = 50;
const IPPROTO_AH: u8 = 51;
/// IPv6 extension headers walked before giving up on finding the
/// transport header (a constant bound the verifier can see). A packet with
/// more is still recorded when its destination address is protected (see
/// [`TransportHeader::Hidden`]).
const IPV6_MAX_EXTENSION_HEADERS: usize = 8;
const TCP_FLAG_RST: u8 = 0x04;

/// Where a packet goes: enough to look it up in REDIRECTS.
struct PacketDestination {
    family: u32,
    key: TargetKey,
    /// IP protocol number of the transport header, or of the header the
    /// walk stopped at when it is [`TransportHeader::Hidden`].
    protocol: u8,
    transport: TransportHeader,
}

/// Where the transport header (and its ports) is.
enum TransportHeader {
    /// At this offset from the network header.
    At(usize),
    /// Not judged here: a fragment after the first (its first fragment
    /// carried the ports and was judged), or a packet encrypted behind ESP,
    /// the host's own IPsec (on a host that talks IPsec to a target's host
    /// every packet to it is ESP, and a hand-made ESP packet reaches a
    /// service there only with the security association's keys, which
    /// only the kernel holds).
    NotJudged,
    /// Somewhere this program does not read: behind more extension headers
    /// than it walks, or past the end of a packet made by hand (the kernel
    /// makes neither). Such a packet cannot be matched to a port, so it is
    /// recorded when its destination address is a protected target's:
    /// otherwise a raw socket could reach a target unrecorded by stacking
    /// headers.
    Hidden,
}

/// Do packets of this protocol carry a 16-bit destination port at offset 2
/// of their header, as TCP and UDP do?
#[inline(always)]
fn has_ports(protocol: u8) -> bool {
    matches!(
        protocol,
        IPPROTO_TCP_U8 | IPPROTO_UDP | IPPROTO_DCCP | IPPROTO_SCTP | IPPROTO_UDPLITE
    )
}

/// The authentication header (AH) at `offset`: the protocol after it and
/// where that starts (its length is in 4-byte units, less two).
#[inline(always)]
fn after_ah(ctx: &SkBuffContext, offset: usize) -> Option<(u8, usize)> {
    let header: [u8; 2] = ctx.load(offset).ok()?;
    Some((header[0], offset + (usize::from(header[1]) + 2) * 4))
}

/// Parses the IPv4 or IPv6 header at the start of the packet (cgroup_skb
/// programs see the packet from its network header on). Every read goes
/// through bpf_skb_load_bytes, which fails cleanly past the end.
#[inline(always)]
fn parse_destination(ctx: &SkBuffContext) -> Option<PacketDestination> {
    let first: u8 = ctx.load(0).ok()?;
    match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            let mut protocol: u8 = ctx.load(9).ok()?;
            // The 13-bit fragment offset: only the first fragment carries the
            // transport header.
            let fragment: u16 = u16::from_be(ctx.load(6).ok()?);
            let daddr: u32 = ctx.load(16).ok()?;
            let transport = if fragment & 0x1fff != 0 {
                TransportHeader::NotJudged
            } else if protocol == IPPROTO_AH {
                match after_ah(ctx, ihl) {
                    Some((next, offset)) => {
                        protocol = next;
                        match protocol {
                            IPPROTO_ESP => TransportHeader::NotJudged,
                            _ => TransportHeader::At(offset),
                        }
                    }
                    None => TransportHeader::Hidden,
                }
            } else if protocol == IPPROTO_ESP {
                TransportHeader::NotJudged
            } else {
                TransportHeader::At(ihl)
            };
            Some(PacketDestination {
                family: AF_INET,
                key: TargetKey {
                    addr: v4_mapped(daddr),
                    port: 0,
                },
                protocol,
                transport,
            })
        }
        6 => {
            let daddr: [u32; 4] = ctx.load(24).ok()?;
            let mut next: u8 = ctx.load(6).ok()?;
            let mut offset = 40usize;
            // Past the last pass with headers still to walk: hidden.
            let mut transport = TransportHeader::Hidden;
            // Extension headers could otherwise hide the transport header.
            // One pass per extension header, and one more to reach the
            // transport header after the last. A header that cannot be
            // read (a packet cut short by hand) leaves the ports hidden.
            for _ in 0..=IPV6_MAX_EXTENSION_HEADERS {
                match next {
                    IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                        let Ok(header) = ctx.load::<[u8; 2]>(offset) else {
                            break;
                        };
                        next = header[0];
                        offset += (usize::from(header[1]) + 1) * 8;
                    }
                    IPPROTO_AH => {
                        let Some((after, at)) = after_ah(ctx, offset) else {
                            break;
                        };
                        next = after;
                        offset = at;
                    }
                    IPV6_FRAGMENT => {
                        let Ok(header) = ctx.load::<[u8; 4]>(offset) else {
                            break;
                        };
                        next = header[0];
                        let fragment_offset = u16::from_be_bytes([header[2], header[3]]) & 0xfff8;
                        if fragment_offset != 0 {
                            transport = TransportHeader::NotJudged;
                            break;
                        }
                        offset += 8;
                    }
                    IPPROTO_ESP => {
                        transport = TransportHeader::NotJudged;
                        break;
                    }
                    _ => {
                        transport = TransportHeader::At(offset);
                        break;
                    }
                }
            }
            Some(PacketDestination {
                family: AF_INET6,
                key: TargetKey {
                    addr: daddr,
                    port: 0,
                },
                protocol: next,
                transport,
            })
        }
        _ => None,
    }
}

/// Packets to protected targets from anything but a TCP stream socket, on
/// the whole host (attached at the cgroup v2 root, so it runs for every
/// socket's cgroup). TCP stream sockets are the tcp_state probe's: it sees
/// their connects with the calling task. What only this program sees:
/// UDP (and other datagrams) from outside the agent cgroups, raw sockets
/// crafting packets (TCP ones too), SCTP, DCCP.
///
/// Always returns 1 (let the packet go): it records, it never refuses.
/// There is no task here (egress can run in softirq context), so the
/// record carries the socket's cgroup and cookie, not a pid.
#[cgroup_skb(egress)]
pub fn tollgate_packet_egress(ctx: SkBuffContext) -> i32 {
    if let Some(dst) = parse_destination(&ctx) {
        record_packet(&ctx, dst);
    }
    ALLOW
}

#[inline(always)]
fn record_packet(ctx: &SkBuffContext, mut dst: PacketDestination) {
    let port = match dst.transport {
        TransportHeader::NotJudged => return,
        // Protocols without ports (ICMP, ...) cannot reach a port-keyed
        // target.
        TransportHeader::At(_) if !has_ports(dst.protocol) => return,
        // A header made by hand may end before its ports.
        TransportHeader::At(l4) => ctx.load::<u16>(l4 + 2).ok().map(u16::from_be),
        TransportHeader::Hidden => None,
    };
    match port {
        Some(port) => {
            dst.key.port = u32::from(port);
            if unsafe { REDIRECTS.get(&dst.key) }.is_none() {
                return;
            }
        }
        // Port 0 in the record: not read.
        None => {
            if unsafe { PROTECTED_ADDRESSES.get(&dst.key.addr) }.is_none() {
                return;
            }
        }
    }
    let skb = ctx.skb.skb;
    // The socket's type: a TCP stream socket's packets are the tcp_state
    // probe's business.
    let socket_type = unsafe {
        let sk = core::ptr::read_volatile(&(*skb).__bindgen_anon_2.sk);
        if sk.is_null() {
            0
        } else {
            let full = bpf_sk_fullsock(sk);
            if full.is_null() {
                0
            } else {
                (*full).type_
            }
        }
    };
    // A stream socket's packets are the tcp_state probe's, whatever
    // headers the kernel put before their ports.
    if (dst.protocol == IPPROTO_TCP_U8 || port.is_none())
        && (socket_type == SOCK_STREAM || socket_type == 0)
    {
        return;
    }
    if let (IPPROTO_TCP_U8, TransportHeader::At(l4)) = (dst.protocol, &dst.transport) {
        // The kernel answers segments of unknown connections with a RST
        // from its own raw control socket. A RST opens nothing and carries
        // no request, so it is not recorded (a crafted SYN or data
        // segment is).
        match ctx.load::<u8>(*l4 + 13) {
            Ok(flags) if flags & TCP_FLAG_RST != 0 => return,
            _ => {}
        }
    }
    let cookie = unsafe { bpf_get_socket_cookie(skb as *mut c_void) };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let program = counted_program::PACKET_EGRESS;
    // At most one record per socket per interval; the packets in between
    // are counted and the next record says how many it stands for.
    let packets = match PACKET_RATE.get_ptr_mut(&cookie) {
        // The state is shared by every CPU sending on this socket: the
        // count of suppressed packets is added to and taken atomically, so
        // none is lost from the `packets` of the socket's next record.
        // (Two CPUs may both find the interval over and both record; each
        // record then stands for the packets it took.)
        Some(state) => unsafe {
            if now.wrapping_sub((*state).last_ns) < PACKET_RECORD_INTERVAL_NS {
                atomic_add(core::ptr::addr_of_mut!((*state).suppressed), 1);
                count(program, counter::SUPPRESSED);
                return;
            }
            (*state).last_ns = now;
            atomic_swap(core::ptr::addr_of_mut!((*state).suppressed), 0) + 1
        },
        None => {
            let state = PacketRate {
                last_ns: now,
                suppressed: 0,
            };
            // A full LRU map evicts its oldest socket: that socket's next
            // packet is then recorded again, never lost.
            let _ = PACKET_RATE.insert(&cookie, &state, 0);
            1
        }
    };
    count(program, counter::SEEN);
    let event = EvidenceEvent {
        kind: event_kind::PACKET_TO_PROTECTED_TARGET,
        family: dst.family,
        cookie,
        // The cgroup of the socket that sent it (fixed at its creation).
        cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
        boot_ns: now,
        pid: 0,
        tid: 0,
        daddr: dst.key.addr,
        dport: dst.key.port,
        protocol: u32::from(dst.protocol),
        comm: [0; 16],
        socket_type,
        packets: packets.min(u64::from(u32::MAX)) as u32,
    };
    // Only packets to protected targets get here.
    emit(program, &event);
}

/// IPv4 options (RFC 791) that route a packet through the addresses they
/// list: loose and strict source route. The kernel sends such a packet to
/// the first address listed, not to the destination the socket hooks
/// judged.
const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;
const IPOPT_LSRR: u8 = 131;
const IPOPT_SSRR: u8 = 137;
/// The options of an IPv4 header take at most 40 bytes, each at least one:
/// one pass per byte reads them all (a constant bound the verifier can
/// see).
const IPV4_MAX_OPTION_BYTES: usize = 40;

/// Whether a packet goes where its own headers route it rather than to
/// its destination address: an IPv4 header with a loose or strict source
/// route option, or an IPv6 packet with a routing header of any type
/// (segment routing, type 2, ...). A header that cannot be read whole, or
/// IPv6 extension headers past the walk, count as routed: the kernel
/// builds neither from the socket options an agent can set, so only a
/// packet made by hand has them, and refusing it is the safe side.
#[inline(always)]
fn source_routed(ctx: &SkBuffContext) -> bool {
    let Ok(first) = ctx.load::<u8>(0) else {
        return false;
    };
    match first >> 4 {
        4 => {
            let header_len = usize::from(first & 0x0f) * 4;
            let mut offset = 20usize;
            for _ in 0..IPV4_MAX_OPTION_BYTES {
                if offset >= header_len {
                    return false;
                }
                let Ok(option) = ctx.load::<u8>(offset) else {
                    return true;
                };
                match option {
                    IPOPT_END => return false,
                    IPOPT_NOOP => offset += 1,
                    IPOPT_LSRR | IPOPT_SSRR => return true,
                    _ => {
                        let Ok(len) = ctx.load::<u8>(offset + 1) else {
                            return true;
                        };
                        if len < 2 {
                            return true;
                        }
                        offset += usize::from(len);
                    }
                }
            }
            false
        }
        6 => {
            let Ok(mut next) = ctx.load::<u8>(6) else {
                return true;
            };
            let mut offset = 40usize;
            for _ in 0..=IPV6_MAX_EXTENSION_HEADERS {
                match next {
                    IPV6_ROUTING => return true,
                    IPV6_HOP_BY_HOP | IPV6_DEST_OPTS => {
                        let Ok(header) = ctx.load::<[u8; 2]>(offset) else {
                            return true;
                        };
                        next = header[0];
                        offset += (usize::from(header[1]) + 1) * 8;
                    }
                    IPPROTO_AH => {
                        let Some((after, at)) = after_ah(ctx, offset) else {
                            return true;
                        };
                        next = after;
                        offset = at;
                    }
                    // A routing header belongs before the fragment header
                    // (in the part every fragment repeats), and anything
                    // else ends the extension headers.
                    _ => return false,
                }
            }
            true
        }
        _ => false,
    }
}

/// Drops the agent cgroups' packets that name their own route (see
/// [`source_routed`]): an agent may set `IP_OPTIONS` or `IPV6_RTHDR` on
/// its socket, or pass them with one message, without any capability, and
/// the connect and sendmsg hooks only judged the destination it named.
/// Every other packet goes on. The refusal is on record, without a task
/// (egress can run in softirq context): the socket's cgroup and cookie,
/// and the first hop the packet was headed for.
#[cgroup_skb(egress)]
pub fn tollgate_source_route(ctx: SkBuffContext) -> i32 {
    if !source_routed(&ctx) {
        return ALLOW;
    }
    let program = counted_program::SOURCE_ROUTE;
    count(program, counter::SEEN);
    let (family, daddr, protocol, dport) = match parse_destination(&ctx) {
        Some(dst) => {
            let port = match dst.transport {
                TransportHeader::At(l4) if has_ports(dst.protocol) => ctx
                    .load::<u16>(l4 + 2)
                    .map(|p| u32::from(u16::from_be(p)))
                    .unwrap_or(0),
                _ => 0,
            };
            (dst.family, dst.key.addr, u32::from(dst.protocol), port)
        }
        None => (0, [0; 4], 0, 0),
    };
    let skb = ctx.skb.skb;
    let event = EvidenceEvent {
        kind: event_kind::REFUSED_SOURCE_ROUTE,
        family,
        cookie: unsafe { bpf_get_socket_cookie(skb as *mut c_void) },
        // The cgroup of the socket that sent it (fixed at its creation).
        cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        pid: 0,
        tid: 0,
        daddr,
        dport,
        protocol,
        comm: [0; 16],
        socket_type: 0,
        packets: 0,
    };
    emit(program, &event);
    REFUSE
}

// The verifier only accepts context accesses at a constant offset from the
// context pointer, one word at a time: an array copy would become a loop
// over a moved pointer and be rejected.
#[inline(always)]
unsafe fn read_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    [
        core::ptr::read_volatile(&(*sa).user_ip6[0]),
        core::ptr::read_volatile(&(*sa).user_ip6[1]),
        core::ptr::read_volatile(&(*sa).user_ip6[2]),
        core::ptr::read_volatile(&(*sa).user_ip6[3]),
    ]
}

#[inline(always)]
unsafe fn write_ip6(sa: *mut bpf_sock_addr, addr: [u32; 4]) {
    core::ptr::write_volatile(&mut (*sa).user_ip6[0], addr[0]);
    core::ptr::write_volatile(&mut (*sa).user_ip6[1], addr[1]);
    core::ptr::write_volatile(&mut (*sa).user_ip6[2], addr[2]);
    core::ptr::write_volatile(&mut (*sa).user_ip6[3], addr[3]);
}

#[inline(always)]
unsafe fn original_of(sa: *mut bpf_sock_addr) -> Option<&'static OriginalDestination> {
    let cookie = bpf_get_socket_cookie(sa as *mut _);
    ORIGINAL_DESTINATIONS.get(&cookie)
}

#[cgroup_sock_addr(getpeername4)]
pub fn tollgate_getpeername4(ctx: SockAddrContext) -> i32 {
    unsafe {
        let sa = ctx.sock_addr;
        if let Some(original) = original_of(sa) {
            (*sa).user_ip4 = original.addr[3];
            (*sa).user_port = port_to_user(original.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn tollgate_getpeername6(ctx: SockAddrContext) -> i32 {
    unsafe {
        let sa = ctx.sock_addr;
        if let Some(original) = original_of(sa) {
            write_ip6(sa, original.addr);
            (*sa).user_port = port_to_user(original.port);
        }
    }
    ALLOW
}

#[sock_ops]
pub fn tollgate_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        unsafe {
            let cookie = bpf_get_socket_cookie(ctx.ops as *mut _);
            if ORIGINAL_DESTINATIONS.get(&cookie).is_some() {
                // remote_port holds the port in network byte order in its
                // upper 16 bits; local_port is in host byte order.
                // An AF_INET6 socket that reached the (IPv4) listener
                // has an IPv4-mapped local address already. Each field is
                // read on its own, at its own constant offset: a load
                // the compiler merged across the branch would go through
                // a computed context pointer, which the verifier refuses.
                let ops = ctx.ops;
                let family = core::ptr::read_volatile(&(*ops).family);
                let local4 = core::ptr::read_volatile(&(*ops).local_ip4);
                let local6 = [
                    core::ptr::read_volatile(&(*ops).local_ip6[0]),
                    core::ptr::read_volatile(&(*ops).local_ip6[1]),
                    core::ptr::read_volatile(&(*ops).local_ip6[2]),
                    core::ptr::read_volatile(&(*ops).local_ip6[3]),
                ];
                let addr = if family == AF_INET6 {
                    local6
                } else {
                    v4_mapped(local4)
                };
                let key = ClientEndpointKey {
                    addr,
                    port: ctx.local_port(),
                    listener_port: u32::from_be(ctx.remote_port()),
                };
                let _ = CLIENT_ENDPOINTS.insert(&key, &cookie, 0);
            }
        }
    }
    ALLOW as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
