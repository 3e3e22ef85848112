//! bpffs and tracefs are not mounted at boot on every host; the daemon
//! mounts them itself rather than asking the operator.

use std::{ffi::CString, path::Path};

use anyhow::{bail, Context, Result};
use tracing::info;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const TRACEFS_MAGIC: i64 = 0x7472_6163;

/// Mounts bpffs at /sys/fs/bpf and tracefs at /sys/kernel/tracing when
/// they are not already there.
pub fn ensure_mounts() -> Result<()> {
    ensure_mounted(Path::new("/sys/fs/bpf"), "bpf", BPF_FS_MAGIC)?;
    ensure_mounted(Path::new("/sys/kernel/tracing"), "tracefs", TRACEFS_MAGIC)?;
    Ok(())
}

fn ensure_mounted(path: &Path, fstype: &str, magic: i64) -> Result<()> {
    if fs_magic(path)? == Some(magic) {
        return Ok(());
    }
    std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
    let target = CString::new(path.as_os_str().as_encoded_bytes())?;
    let kind = CString::new(fstype)?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            kind.as_ptr(),
            target.as_ptr(),
            kind.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "mount {fstype} at {}: {err} (tollgate needs root or CAP_SYS_ADMIN)",
            path.display()
        );
    }
    info!(path = %path.display(), fstype, "mounted");
    Ok(())
}

/// Whether `path` is absolute and has no `.` or `..` in it: the directory
/// it names is the one its parent names, with one more name.
pub fn is_plain_absolute(path: &Path) -> bool {
    use std::path::Component;
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// Refuses a pin directory that is not inside a bpf file system, or that
/// is the root of one: `unpin` removes the directory, and `run` takes it
/// over (its owner and mode), so a `bpffs_dir` naming an ordinary
/// directory (the audit store, say) or bpffs's root (every other tool's
/// pins) must stop both before they touch anything. Checked on the
/// directory's parent: a directory below a bpffs root, made or not, has a
/// parent on bpffs, and the root's parent is not on one.
pub fn ensure_inside_bpffs(pin_dir: &Path) -> Result<()> {
    if !is_plain_absolute(pin_dir) {
        bail!(
            "bpffs_dir {} is not absolute or has `.` or `..` in it: give the directory's plain path",
            pin_dir.display()
        );
    }
    let parent = pin_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .with_context(|| format!("bpffs_dir {} has no parent directory", pin_dir.display()))?;
    // The nearest existing ancestor: a bpffs_dir two levels below a
    // mount point, neither made yet, is still inside it.
    let existing = parent.ancestors().find(|d| d.exists()).unwrap_or(parent);
    if fs_magic(existing)? != Some(BPF_FS_MAGIC) {
        bail!(
            "bpffs_dir {} is not inside a bpf file system ({} is not bpffs): tollgate pins, takes \
             over and on unpin removes that directory, so it must be a directory of its own below \
             a bpffs mount such as /sys/fs/bpf",
            pin_dir.display(),
            existing.display()
        );
    }
    Ok(())
}

fn fs_magic(path: &Path) -> Result<Option<i64>> {
    if !path.exists() {
        return Ok(None);
    }
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: statfs fills the zeroed struct; the path is a valid C string.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut buf) };
    if rc != 0 {
        return Ok(None);
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(Some(buf.f_type as i64))
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on a pure v2
/// host, `/sys/fs/cgroup/unified` on a hybrid one. The host-wide packet
/// evidence is attached at its root, so it runs for every socket.
pub fn cgroup2_root() -> Result<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    cgroup2_root_in(&mounts)
        .map(std::path::PathBuf::from)
        .context("no cgroup2 file system is mounted (tollgate needs cgroup v2)")
}

/// The first cgroup2 mount point in a mounts table (`/proc/self/mounts`
/// format: device, mount point, type, ...).
fn cgroup2_root_in(mounts: &str) -> Option<String> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let _device = fields.next()?;
        let mount_point = fields.next()?;
        let fstype = fields.next()?;
        // Mount points with spaces are octal-escaped; a cgroup root has none.
        (fstype == "cgroup2").then(|| mount_point.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bpffs's root is no pin directory of tollgate's (its parent is not
    /// bpffs, whether bpffs is mounted there or not), nor is a path that
    /// climbs back to it, nor an ordinary directory.
    #[test]
    fn the_bpffs_root_and_paths_outside_bpffs_are_no_pin_directory() {
        for dir in [
            "/sys/fs/bpf",
            "/sys/fs/bpf/tollgate/..",
            "/tmp/pins",
            "pins",
        ] {
            let err = ensure_inside_bpffs(Path::new(dir)).expect_err(dir);
            assert!(err.to_string().contains("bpffs_dir"), "{dir}: {err:#}");
        }
        assert!(is_plain_absolute(Path::new("/sys/fs/bpf/tollgate")));
        assert!(!is_plain_absolute(Path::new("/sys/fs/bpf/./tollgate/..")));
    }

    #[test]
    fn the_cgroup2_mount_is_found_on_hybrid_and_pure_v2_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n";
        assert_eq!(
            cgroup2_root_in(hybrid).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        let pure = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_root_in(pure).as_deref(), Some("/sys/fs/cgroup"));
        assert_eq!(cgroup2_root_in("proc /proc proc rw 0 0\n"), None);
    }
}
