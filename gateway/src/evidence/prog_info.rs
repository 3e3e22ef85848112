//! A program's id and recursion misses, from BPF_OBJ_GET_INFO_BY_FD.
//! aya 0.14's `ProgramInfo` does not expose `recursion_misses`, so this
//! makes the syscall itself, reading the two fields from their fixed
//! offsets in the UAPI `struct bpf_prog_info` (fields are only ever
//! appended to it, so the offsets are stable).

use std::os::fd::OwnedFd;

/// Byte offset of `id` in `struct bpf_prog_info`.
const ID_OFFSET: usize = 4;
/// Byte offset of `recursion_misses` (Linux 5.12+).
const RECURSION_MISSES_OFFSET: usize = 208;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgStats {
    pub id: u32,
    pub recursion_misses: u64,
}

pub fn stats(fd: &OwnedFd) -> std::io::Result<ProgStats> {
    // Larger than any bpf_prog_info so far; the kernel fills what it knows
    // and reports how much.
    let mut info = [0u8; 512];
    let filled = crate::pin::link_info::object_info(fd, &mut info)?;
    if filled < RECURSION_MISSES_OFFSET + 8 {
        return Err(std::io::Error::other(
            "the kernel does not report recursion_misses (older than 5.12)",
        ));
    }
    let word = |at: usize, n: usize| -> u64 {
        let mut bytes = [0u8; 8];
        bytes[..n].copy_from_slice(&info[at..at + n]);
        u64::from_ne_bytes(bytes)
    };
    Ok(ProgStats {
        id: word(ID_OFFSET, 4) as u32,
        recursion_misses: word(RECURSION_MISSES_OFFSET, 8),
    })
}
