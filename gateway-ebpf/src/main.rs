//! tollgate's kernel programs.
//!
//! Attached to each agent cgroup:
//! - `connect4`/`connect6` rewrite a connection to a protected destination
//!   so it reaches the tollgate listener for that target, and remember the
//!   original destination and the connecting task under the socket cookie;
//! - `getpeername4`/`getpeername6` give the agent back the address it asked
//!   for, so the redirect is invisible to it;
//! - `sock_ops` notes, once such a connection is established, which local
//!   port belongs to which cookie, so the proxy can name the process behind
//!   an accepted connection.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
};
use gateway_common::{
    v4_mapped, ClientPortKey, OriginalDestination, Redirect, TargetKey, REDIRECT_MAP_ENTRIES,
    SOCKET_MAP_ENTRIES,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Return value that lets the operation go on.
const ALLOW: i32 = 1;

#[map(name = "REDIRECTS")]
static REDIRECTS: HashMap<TargetKey, Redirect> =
    HashMap::with_max_entries(REDIRECT_MAP_ENTRIES, 0);

#[map(name = "ORIGINAL_DESTINATIONS")]
static ORIGINAL_DESTINATIONS: LruHashMap<u64, OriginalDestination> =
    LruHashMap::with_max_entries(SOCKET_MAP_ENTRIES, 0);

#[map(name = "CLIENT_PORTS")]
static CLIENT_PORTS: LruHashMap<ClientPortKey, u64> =
    LruHashMap::with_max_entries(SOCKET_MAP_ENTRIES, 0);

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

#[cgroup_sock_addr(connect4)]
pub fn tollgate_connect4(ctx: SockAddrContext) -> i32 {
    unsafe {
        let sa = ctx.sock_addr;
        let key = TargetKey {
            addr: v4_mapped((*sa).user_ip4),
            port: port_from_user((*sa).user_port),
        };
        if let Some(redirect) = REDIRECTS.get(&key) {
            remember(sa, &key, AF_INET);
            (*sa).user_ip4 = redirect.addr4;
            (*sa).user_port = port_to_user(redirect.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn tollgate_connect6(ctx: SockAddrContext) -> i32 {
    unsafe {
        let sa = ctx.sock_addr;
        let key = TargetKey {
            addr: read_ip6(sa),
            port: port_from_user((*sa).user_port),
        };
        if let Some(redirect) = REDIRECTS.get(&key) {
            remember(sa, &key, AF_INET6);
            // The listener is IPv4; an AF_INET6 socket reaches it through
            // the IPv4-mapped form of its address.
            write_ip6(sa, v4_mapped(redirect.addr4));
            (*sa).user_port = port_to_user(redirect.port);
        }
    }
    ALLOW
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
                let key = ClientPortKey {
                    port: ctx.local_port(),
                    _reserved: 0,
                };
                let _ = CLIENT_PORTS.insert(&key, &cookie, 0);
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
