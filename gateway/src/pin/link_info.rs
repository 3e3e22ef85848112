//! What a pinned link is, as the kernel sees it: its program, and the
//! cgroup and hook it is attached to. `pin status` judges by these, not by
//! the pin's file name: aya 0.14's `LinkInfo` gives a link's type and
//! program id but not its cgroup or attach type, so this makes the
//! syscalls itself, reading fields from their fixed offsets in the UAPI
//! structs (fields are only ever appended to them, so the offsets are
//! stable).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use gateway_common::program_names;

use super::HOST_LINK_SUFFIX;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `enum bpf_link_type`. A `tp_btf` program's link is a raw tracepoint's.
const BPF_LINK_TYPE_RAW_TRACEPOINT: u32 = 1;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// The tracepoint of the host-wide evidence program.
const TCP_STATE_TRACEPOINT: &str = "inet_sock_set_state";

/// `enum bpf_attach_type`, for the hooks tollgate's programs use.
const BPF_CGROUP_INET_EGRESS: u32 = 1;
const BPF_CGROUP_INET_SOCK_CREATE: u32 = 2;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_BIND: u32 = 8;
const BPF_CGROUP_INET6_BIND: u32 = 9;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;

/// Each of tollgate's cgroup programs and the hook it is attached at. Two
/// share cgroup_skb egress (the host-wide packet evidence and the agent
/// cgroups' source route refusal): there the kernel's name of the
/// program tells them apart, and no two at one hook share that.
const HOOKS: [(&str, u32); 12] = [
    (program_names::CONNECT4, BPF_CGROUP_INET4_CONNECT),
    (program_names::CONNECT6, BPF_CGROUP_INET6_CONNECT),
    (program_names::GETPEERNAME4, BPF_CGROUP_INET4_GETPEERNAME),
    (program_names::GETPEERNAME6, BPF_CGROUP_INET6_GETPEERNAME),
    (program_names::SENDMSG4, BPF_CGROUP_UDP4_SENDMSG),
    (program_names::SENDMSG6, BPF_CGROUP_UDP6_SENDMSG),
    (program_names::BIND4, BPF_CGROUP_INET4_BIND),
    (program_names::BIND6, BPF_CGROUP_INET6_BIND),
    (program_names::SOCK_CREATE, BPF_CGROUP_INET_SOCK_CREATE),
    (program_names::SOCK_OPS, BPF_CGROUP_SOCK_OPS),
    (program_names::PACKET_EGRESS, BPF_CGROUP_INET_EGRESS),
    (program_names::SOURCE_ROUTE, BPF_CGROUP_INET_EGRESS),
];

/// What the kernel keeps of a program's name: its first 15 bytes.
fn kept_name(program: &str) -> &[u8] {
    &program.as_bytes()[..program.len().min(BPF_OBJ_NAME_LEN - 1)]
}

/// The kernel keeps the first 15 bytes of a program's name.
const BPF_OBJ_NAME_LEN: usize = 16;

/// What the kernel says of one pinned link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    pub link_id: u32,
    pub program_id: u32,
    /// `enum bpf_link_type`.
    pub link_type: u32,
    /// For a cgroup link, the cgroup's id: 0 once the cgroup is gone.
    pub cgroup_id: Option<u64>,
    /// For a cgroup link, the hook.
    pub attach_type: Option<u32>,
    /// For a raw tracepoint link, the tracepoint.
    pub tracepoint: Option<String>,
    /// The program's name as the kernel keeps it (its first 15 bytes).
    pub program_name: String,
}

impl LinkFacts {
    /// Which of tollgate's programs this link runs, and where: a cgroup
    /// program at its own hook, named as the kernel names it, and the
    /// cgroup's id; or the host-wide evidence program on its tracepoint,
    /// and [`HOST_LINK_SUFFIX`]. `None` for a link that is none of
    /// tollgate's.
    pub fn tollgate_program(&self) -> Option<(&'static str, String)> {
        let named = |program: &str| kept_name(program) == self.program_name.as_bytes();
        match self.link_type {
            BPF_LINK_TYPE_CGROUP => {
                let (attach_type, id) = (self.attach_type?, self.cgroup_id?);
                let &(program, _) = HOOKS
                    .iter()
                    .find(|(program, hook)| *hook == attach_type && named(program))?;
                Some((program, id.to_string()))
            }
            BPF_LINK_TYPE_RAW_TRACEPOINT
                if self.tracepoint.as_deref() == Some(TCP_STATE_TRACEPOINT)
                    && named(program_names::TCP_STATE) =>
            {
                Some((program_names::TCP_STATE, HOST_LINK_SUFFIX.to_owned()))
            }
            _ => None,
        }
    }

    /// The link's type as `pin status` prints it.
    pub fn link_type_name(&self) -> String {
        match self.link_type {
            BPF_LINK_TYPE_RAW_TRACEPOINT => "RawTracePoint".to_owned(),
            BPF_LINK_TYPE_CGROUP => "Cgroup".to_owned(),
            other => format!("type {other}"),
        }
    }
}

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Calls bpf(2) with `attr`; returns its result.
fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid bpf_attr prefix for `command` (callers pass
    // the struct for their command), and any pointer in it is valid for
    // what the command reads or writes through it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// A new file descriptor from a bpf(2) command that returns one.
fn owned_fd(rc: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(rc).map_err(|_| io::Error::other("bpf returned no descriptor"))?;
    // SAFETY: the kernel just returned this descriptor to us, and nothing
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// BPF_OBJ_GET_INFO_BY_FD into `info`; returns how many bytes the kernel
/// filled. `info` must be zeroed past what the caller's kernel may know.
pub(crate) fn object_info(fd: &OwnedFd, info: &mut [u8]) -> io::Result<usize> {
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok((attr.info_len as usize).min(info.len()))
}

/// Reads the pinned link at `pin`.
pub fn read(pin: &Path) -> io::Result<LinkFacts> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let link = owned_fd(bpf(BPF_OBJ_GET, &mut get)?)?;
    // Larger than any bpf_link_info so far; zeroed, as the kernel wants
    // the part it does not know.
    let mut info = [0u8; 128];
    let filled = object_info(&link, &mut info)?;
    // The kernel's own byte order: these are its structs, read in place.
    let bytes_at = |at: usize, n: usize| (at + n <= filled).then(|| &info[at..at + n]);
    let u32_at = |at: usize| {
        bytes_at(at, 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    let u64_at = |at: usize| {
        bytes_at(at, 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    let short = || {
        io::Error::other(format!(
            "{}: the kernel's link info is too short",
            pin.display()
        ))
    };
    let link_type = u32_at(0).ok_or_else(short)?;
    let link_id = u32_at(4).ok_or_else(short)?;
    let program_id = u32_at(8).ok_or_else(short)?;
    // The union after the three ids starts at 16 (it holds u64s).
    let (cgroup_id, attach_type) = match link_type {
        BPF_LINK_TYPE_CGROUP => (Some(u64_at(16).ok_or_else(short)?), u32_at(24)),
        _ => (None, None),
    };
    let tracepoint = match link_type {
        BPF_LINK_TYPE_RAW_TRACEPOINT => Some(tracepoint_name(&link)?),
        _ => None,
    };
    Ok(LinkFacts {
        link_id,
        program_id,
        link_type,
        cgroup_id,
        attach_type,
        tracepoint,
        program_name: program_name(program_id)?,
    })
}

/// The tracepoint of a raw tracepoint link: the kernel copies its name
/// into a buffer the caller names in the info's union (`tp_name`, a
/// pointer at 16, and `tp_name_len` at 24).
fn tracepoint_name(link: &OwnedFd) -> io::Result<String> {
    let mut name = [0u8; 128];
    let mut info = [0u8; 128];
    info[16..24].copy_from_slice(&(name.as_mut_ptr() as u64).to_ne_bytes());
    info[24..28].copy_from_slice(&(name.len() as u32).to_ne_bytes());
    object_info(link, &mut info)?;
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// A descriptor of the loaded program `id`.
pub(crate) fn program_fd(id: u32) -> io::Result<OwnedFd> {
    let mut by_id = GetFdByIdAttr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    owned_fd(bpf(BPF_PROG_GET_FD_BY_ID, &mut by_id)?)
}

/// Byte offset of `name` in `struct bpf_prog_info`.
const PROG_NAME_OFFSET: usize = 64;

/// The name the kernel keeps for program `id`.
fn program_name(id: u32) -> io::Result<String> {
    let program = program_fd(id)?;
    let mut info = [0u8; 512];
    let filled = object_info(&program, &mut info)?;
    if filled < PROG_NAME_OFFSET + BPF_OBJ_NAME_LEN {
        return Err(io::Error::other("the kernel's program info has no name"));
    }
    let name = &info[PROG_NAME_OFFSET..PROG_NAME_OFFSET + BPF_OBJ_NAME_LEN];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cgroup_link(cgroup_id: u64, attach_type: u32, name: &str) -> LinkFacts {
        LinkFacts {
            link_id: 1,
            program_id: 2,
            link_type: BPF_LINK_TYPE_CGROUP,
            cgroup_id: Some(cgroup_id),
            attach_type: Some(attach_type),
            tracepoint: None,
            program_name: name.to_owned(),
        }
    }

    fn tracepoint_link(tracepoint: &str, name: &str) -> LinkFacts {
        LinkFacts {
            link_id: 1,
            program_id: 2,
            link_type: BPF_LINK_TYPE_RAW_TRACEPOINT,
            cgroup_id: None,
            attach_type: None,
            tracepoint: Some(tracepoint.to_owned()),
            program_name: name.to_owned(),
        }
    }

    #[test]
    fn every_cgroup_program_is_told_apart_by_its_hook_and_kept_name() {
        for program in super::super::AGENT_CGROUP_PROGRAMS
            .iter()
            .chain([&program_names::PACKET_EGRESS])
        {
            assert_eq!(
                HOOKS.iter().filter(|(p, _)| p == program).count(),
                1,
                "{program}"
            );
        }
        let mut told_apart: Vec<(u32, &[u8])> =
            HOOKS.iter().map(|(p, h)| (*h, kept_name(p))).collect();
        told_apart.sort_unstable();
        told_apart.dedup();
        assert_eq!(told_apart.len(), HOOKS.len());
    }

    #[test]
    fn the_two_egress_programs_are_named_by_their_kept_names() {
        let packet = cgroup_link(1, BPF_CGROUP_INET_EGRESS, "tollgate_packet");
        assert_eq!(
            packet.tollgate_program(),
            Some((program_names::PACKET_EGRESS, "1".to_owned()))
        );
        let source_route = cgroup_link(77, BPF_CGROUP_INET_EGRESS, "tollgate_source");
        assert_eq!(
            source_route.tollgate_program(),
            Some((program_names::SOURCE_ROUTE, "77".to_owned()))
        );
        // Another tool's egress program on the same cgroup is not ours.
        let other = cgroup_link(77, BPF_CGROUP_INET_EGRESS, "firewall");
        assert_eq!(other.tollgate_program(), None);
    }

    #[test]
    fn a_link_is_named_by_its_hook_program_and_cgroup_not_by_its_pin() {
        let connect4 = cgroup_link(77, BPF_CGROUP_INET4_CONNECT, "tollgate_connec");
        assert_eq!(
            connect4.tollgate_program(),
            Some((program_names::CONNECT4, "77".to_owned()))
        );
        // getpeername4 and getpeername6 share their kept 15 bytes: the
        // hook tells them apart.
        let getpeername6 = cgroup_link(77, BPF_CGROUP_INET6_GETPEERNAME, "tollgate_getpee");
        assert_eq!(
            getpeername6.tollgate_program(),
            Some((program_names::GETPEERNAME6, "77".to_owned()))
        );
        let tcp_state = tracepoint_link(TCP_STATE_TRACEPOINT, "tollgate_tcp_st");
        assert_eq!(
            tcp_state.tollgate_program(),
            Some((program_names::TCP_STATE, HOST_LINK_SUFFIX.to_owned()))
        );
        // A link whose cgroup is gone says cgroup 0.
        let detached = cgroup_link(0, BPF_CGROUP_SOCK_OPS, "tollgate_sock_o");
        assert_eq!(
            detached.tollgate_program(),
            Some((program_names::SOCK_OPS, "0".to_owned()))
        );
    }

    #[test]
    fn a_link_that_runs_none_of_tollgates_programs_where_it_puts_them_is_none() {
        for link in [
            // Someone else's program at one of tollgate's hooks.
            cgroup_link(77, BPF_CGROUP_INET4_CONNECT, "allow_all"),
            // tollgate's program at a hook it does not use (sysctl).
            cgroup_link(77, 18, "tollgate_connec"),
            // One of tollgate's programs at another of its hooks.
            cgroup_link(77, BPF_CGROUP_SOCK_OPS, "tollgate_connec"),
            // The evidence program on another tracepoint, or another
            // program on its tracepoint.
            tracepoint_link("sched_switch", "tollgate_tcp_st"),
            tracepoint_link(TCP_STATE_TRACEPOINT, "watcher"),
        ] {
            assert_eq!(link.tollgate_program(), None, "{link:?}");
        }
    }
}
