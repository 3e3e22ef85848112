//! File-system helpers: modes, group ownership and the fsyncs that make a
//! rename or a new file survive a crash.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// Mode of every file the store writes: the daemon writes, auditors read.
pub const FILE_MODE: u32 = 0o640;
/// Mode of every directory the store creates.
pub const DIR_MODE: u32 = 0o750;
/// Mode of a private signing key.
pub const KEY_MODE: u32 = 0o600;

/// How new files and directories are owned: the daemon user, and the
/// configured auditor group when there is one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Perms {
    pub gid: Option<u32>,
}

impl Perms {
    /// Resolves the auditor group by name; an unknown group is a
    /// configuration error, reported at start.
    pub fn for_group(group: Option<&str>) -> io::Result<Perms> {
        let Some(name) = group else {
            return Ok(Perms { gid: None });
        };
        let c = std::ffi::CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "group name contains NUL"))?;
        // SAFETY: getgrnam reads a NUL-terminated string and returns a
        // pointer into static storage, which is read before any other call.
        let gr = unsafe { libc::getgrnam(c.as_ptr()) };
        if gr.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("auditor_group {name:?} does not exist"),
            ));
        }
        // SAFETY: gr is non-null and points to a valid struct group.
        let gid = unsafe { (*gr).gr_gid };
        Ok(Perms { gid: Some(gid) })
    }

    fn chown(&self, path: &Path) -> io::Result<()> {
        if let Some(gid) = self.gid {
            std::os::unix::fs::chown(path, None, Some(gid))?;
        }
        Ok(())
    }

    /// Creates `path` and its missing parents with [`DIR_MODE`], fsyncing
    /// each parent so the new entries survive a crash.
    pub fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        if path.is_dir() {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                self.create_dir_all(parent)?;
            }
        }
        match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
            Ok(()) => self.settle_dir(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Gives the directory `path` [`DIR_MODE`] exactly (the umask may have
    /// removed bits) and the auditor group, and syncs its entry in its
    /// parent.
    fn settle_dir(&self, path: &Path) -> io::Result<()> {
        fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))?;
        self.chown(path)?;
        if let Some(parent) = path.parent() {
            fsync_dir(parent)?;
        }
        Ok(())
    }

    /// Creates `path`, a directory in an existing one, if it is missing,
    /// and either way gives it [`DIR_MODE`] and the auditor group and syncs
    /// its entry in its parent. For a directory made by an earlier attempt
    /// that failed after the `mkdir` (at its mode, group or sync), which
    /// [`Self::create_dir_all`] would take as done: records written into
    /// it would be unreadable to auditors, or its entry lost in a crash.
    pub fn create_settled_dir(&self, path: &Path) -> io::Result<()> {
        match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        // Its mode and group are set through its name: never through a
        // symlink put in its place.
        if !fs::symlink_metadata(path)?.file_type().is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", path.display()),
            ));
        }
        self.settle_dir(path)
    }

    /// Like [`Self::create_dir_all`], and also brings an existing directory
    /// (e.g. made by systemd or an installer) to [`DIR_MODE`] and the
    /// auditor group. Failing to do so is only a warning: the store still
    /// works, the files inside get the right modes.
    pub fn ensure_dir(&self, path: &Path) -> io::Result<()> {
        self.create_dir_all(path)?;
        let fixed = fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
            .and_then(|()| self.chown(path));
        if let Err(e) = fixed {
            tracing::warn!(dir = %path.display(), error = %e, "cannot set audit directory mode/group");
        }
        Ok(())
    }

    /// Creates a new file (failing if it exists) with [`FILE_MODE`].
    pub fn create_new(&self, path: &Path) -> io::Result<File> {
        self.create_with(path, FILE_MODE, true)
    }

    /// Creates or truncates a file with the given mode.
    pub fn create_with(&self, path: &Path, mode: u32, new: bool) -> io::Result<File> {
        let mut o = OpenOptions::new();
        o.write(true).mode(mode);
        if new {
            o.create_new(true);
        } else {
            o.create(true).truncate(true);
        }
        let f = o.open(path)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        self.chown(path)?;
        Ok(f)
    }

    /// Opens a file for appending, creating it with [`FILE_MODE`].
    pub fn open_append(&self, path: &Path) -> io::Result<File> {
        let existed = path.exists();
        let f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(FILE_MODE)
            .open(path)?;
        if !existed {
            f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
            self.chown(path)?;
            if let Some(parent) = path.parent() {
                fsync_dir(parent)?;
            }
        }
        Ok(f)
    }
}

/// fsync a directory, making creations, renames and removals in it durable.
pub fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Writes `bytes` to `path` atomically: `.tmp`, fsync, rename, fsync dir.
pub fn write_atomic(perms: &Perms, path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    let tmp = tmp_path(path);
    let mut f = perms.create_with(&tmp, mode, false)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// `name.ext` -> `name.ext.tmp`, the suffix that recovery removes.
pub fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    s.into()
}

/// Opens a file the store reads back (WAL, manifest, checkpoint, segment)
/// only if it is a regular file: a FIFO put in its place would block the
/// open, and a device (`/dev/zero` behind a symlink) would never end.
/// The open does not wait (`O_NONBLOCK`, which a regular file ignores).
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// The whole of a regular file of at most `max` bytes, as UTF-8 text: a
/// larger one is no file the store writes (a checkpoint), and is refused
/// rather than read into memory.
pub fn read_regular_text_within(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_regular_within(path, max)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.utf8_error()))
}

fn read_regular_within(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = open_regular(path)?;
    let len = file.metadata()?.len();
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes, more than the {max} such a file can hold"),
        ));
    }
    let mut bytes = Vec::new();
    // Bounded even if the file grows while it is read.
    file.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}
