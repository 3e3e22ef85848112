//! The manifest: `{dir}/manifest.jsonl`, one JSON object per line, append
//! only. Line i (from 0) is leaf i of the Merkle tree that checkpoints sign;
//! the leaf data is the line's exact bytes without the newline.

use std::{
    fs,
    io::{self, Write},
    path::Path,
};

use serde::{Deserialize, Serialize};

use super::{fsutil::Perms, merkle};

pub const FILE: &str = "manifest.jsonl";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Entry {
    /// A closed segment.
    Segment(SegmentEntry),
    /// Segments deleted by retention.
    Retention(RetentionEntry),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentEntry {
    /// Path relative to the audit directory.
    pub path: String,
    /// SHA-256 of the file's bytes (hex).
    pub sha256: String,
    pub bytes: u64,
    /// RFC 6962 root over the records' 32-byte `record_hash`es in sequence
    /// order (hex).
    pub merkle_root: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub record_count: u64,
    /// Smallest and largest `time` in the segment (epoch ms).
    pub first_time: i64,
    pub last_time: i64,
    /// `prev_record_hash` of the first record: links to the segment before.
    pub first_prev_hash: String,
    /// `record_hash` of the last record.
    pub last_record_hash: String,
    /// When the segment was closed (epoch ms).
    pub closed_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionEntry {
    /// When the deletion was decided (epoch ms).
    pub at: i64,
    pub retention_days: u32,
    /// Manifest line numbers (from 0) of the removed segments.
    pub removed: Vec<RemovedSegment>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemovedSegment {
    pub line: u64,
    pub path: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_time: i64,
}

/// The manifest as read from disk: raw lines (the Merkle leaves) and the
/// entries they decode to. Verify and the store's start read it whole;
/// the running store keeps only a [`ManifestAppender`].
#[derive(Debug, Default)]
pub struct Manifest {
    pub lines: Vec<Vec<u8>>,
    pub entries: Vec<Entry>,
    /// Merkle frontier over `lines`, kept up to date on every push.
    frontier: merkle::Frontier,
}

/// What appending to the manifest and signing it need: the number of
/// lines, their length in bytes and the Merkle frontier over them, not the
/// lines. A daemon appends a line for every segment (one every few seconds
/// under load) for as long as it runs; the lines stay on disk, where
/// verify and the next start read them.
#[derive(Debug)]
pub struct ManifestAppender {
    byte_len: u64,
    frontier: merkle::Frontier,
    /// An append failed and the part of its line that reached the file
    /// could not be cut off: the file holds more than `byte_len`. The next
    /// append cuts it off first, or is refused, rather than write behind
    /// it (the two would read back as one damaged line).
    uncut: bool,
}

#[derive(Debug)]
pub struct BadLine {
    pub line: usize,
    pub reason: String,
    /// The bad line is the last and has no newline: an append a crash cut
    /// short, not damage.
    pub torn: bool,
}

/// Longest manifest line read. A segment entry is a few hundred bytes; a
/// retention entry lists at most [`MAX_REMOVED_PER_ENTRY`] segments (an
/// older version wrote one entry for all, which could pass 64 MiB). A
/// longer line is damage. The zeros of a file made huge without costing
/// disk (sparse) end a line long before this: see [`read_line`].
pub const MAX_LINE_BYTES: usize = 1 << 30;

/// Most segments one retention entry lists, so that its line stays well
/// within [`MAX_LINE_BYTES`] (each is under 200 bytes): a larger removal
/// is written as several entries.
#[cfg(not(test))]
pub const MAX_REMOVED_PER_ENTRY: usize = 100_000;
/// Small in tests, so that a removal of a few segments is split.
#[cfg(test)]
pub const MAX_REMOVED_PER_ENTRY: usize = 2;

/// How [`read_line`] stopped.
pub(crate) enum LineEnd {
    Newline,
    /// A zero byte (not kept in the line).
    Zero,
    /// The end of the file.
    End,
    TooLong,
}

/// Appends to `line` the bytes up to the next newline or zero byte (not
/// included), or the end of the file, or `cap` bytes.
pub(crate) fn read_line(
    reader: &mut impl io::BufRead,
    line: &mut Vec<u8>,
    cap: usize,
) -> io::Result<LineEnd> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(LineEnd::End);
        }
        match buf.iter().position(|&b| b == b'\n' || b == 0) {
            Some(i) => {
                let end = match buf[i] {
                    b'\n' => LineEnd::Newline,
                    _ => LineEnd::Zero,
                };
                line.extend_from_slice(&buf[..i]);
                reader.consume(i + 1);
                return Ok(end);
            }
            None => {
                let n = buf.len();
                line.extend_from_slice(buf);
                reader.consume(n);
                if line.len() > cap {
                    return Ok(LineEnd::TooLong);
                }
            }
        }
    }
}

/// Whether `file` holds only zeros from `from` to its end. Only its data
/// is read (SEEK_DATA, SEEK_HOLE): a hole reads as zeros, so a sparse file
/// of terabytes is judged at the cost of what it stores.
fn only_zeros_from(file: &std::fs::File, from: u64) -> io::Result<bool> {
    use std::os::{fd::AsRawFd, unix::fs::FileExt};
    let len = file.metadata()?.len();
    let seek = |at: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let at = i64::try_from(at).map_err(|_| io::Error::other("offset out of range"))?;
        // SAFETY: lseek on a descriptor this function borrows; it moves
        // only the file's offset, which the reads here do not use.
        let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
        match r {
            r if r >= 0 => Ok(Some(r as u64)),
            _ => match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e => Err(e),
            },
        }
    };
    let mut buf = vec![0u8; 1 << 16];
    let mut pos = from;
    while pos < len {
        let Some(data) = seek(pos, libc::SEEK_DATA)? else {
            return Ok(true);
        };
        let end = seek(data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut at = data;
        while at < end {
            let want = usize::try_from(end - at)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let n = file.read_at(&mut buf[..want], at)?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += n as u64;
        }
        pos = end.max(pos + 1);
    }
    Ok(true)
}

impl Manifest {
    /// Reads the manifest. Returns the good prefix and, if a line does not
    /// decode, where. An unterminated last line is a torn append. Read a
    /// line at a time: memory holds the lines, never more than one line
    /// beyond them.
    pub fn read(dir: &Path) -> io::Result<(Manifest, Option<BadLine>)> {
        let file = match super::fsutil::open_regular(&dir.join(FILE)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok((Manifest::default(), None))
            }
            Err(e) => return Err(e),
        };
        let mut reader = io::BufReader::new(file);
        let mut m = Manifest::default();
        let mut line = Vec::new();
        loop {
            line.clear();
            let end = read_line(&mut reader, &mut line, MAX_LINE_BYTES)?;
            let at = m.lines.len();
            let bad = |reason: String, torn: bool| BadLine {
                line: at,
                reason,
                torn,
            };
            match end {
                LineEnd::Newline => {}
                LineEnd::End if line.is_empty() => return Ok((m, None)),
                LineEnd::End => return Ok((m, Some(bad("unterminated last line".into(), true)))),
                LineEnd::TooLong => {
                    let reason = format!("a line longer than {MAX_LINE_BYTES} bytes");
                    return Ok((m, Some(bad(reason, false))));
                }
                // A crash can leave an append's blocks allocated and zero:
                // a torn append, when nothing but zeros follows. A zero byte
                // anywhere else is damage (JSON text has none).
                LineEnd::Zero => {
                    let zero_at = m.byte_len() + line.len() as u64;
                    let torn = only_zeros_from(reader.get_ref(), zero_at)?;
                    let reason = match torn {
                        true => "unterminated last line (zeros to the end of the file)".into(),
                        false => format!("a zero byte at offset {zero_at}"),
                    };
                    return Ok((m, Some(bad(reason, torn))));
                }
            }
            match serde_json::from_slice::<Entry>(&line) {
                Ok(e) => m.push(std::mem::take(&mut line), e),
                Err(e) => return Ok((m, Some(bad(e.to_string(), false)))),
            }
        }
    }

    /// Byte length of the good prefix (for truncating a torn append).
    pub fn byte_len(&self) -> u64 {
        self.lines.iter().map(|l| l.len() as u64 + 1).sum()
    }

    /// What the running store goes on appending with; the lines and
    /// entries are let go.
    pub fn into_appender(self) -> ManifestAppender {
        ManifestAppender {
            byte_len: self.byte_len(),
            frontier: self.frontier,
            uncut: false,
        }
    }

    fn push(&mut self, line: Vec<u8>, entry: Entry) {
        self.frontier.push(merkle::leaf_hash(&line));
        self.lines.push(line);
        self.entries.push(entry);
    }

    /// Root over every line: what a new checkpoint signs.
    pub fn root_all(&self) -> merkle::Hash {
        self.frontier.root()
    }

    /// Roots of the first `size` lines for each requested size (sizes
    /// beyond the manifest are left out), in one pass over the lines.
    pub fn prefix_roots(&self, sizes: &[u64]) -> std::collections::HashMap<u64, merkle::Hash> {
        let wanted: std::collections::HashSet<u64> = sizes.iter().copied().collect();
        let mut out = std::collections::HashMap::new();
        let mut f = merkle::Frontier::default();
        if wanted.contains(&0) {
            out.insert(0, f.root());
        }
        for line in &self.lines {
            f.push(merkle::leaf_hash(line));
            if wanted.contains(&f.size()) {
                out.insert(f.size(), f.root());
            }
        }
        out
    }

    /// The last segment entry (sequence-wise the end of the closed chain).
    pub fn last_segment(&self) -> Option<&SegmentEntry> {
        self.last_segment_in(self.entries.len())
    }

    /// The last segment entry among the first `lines` entries.
    pub fn last_segment_in(&self, lines: usize) -> Option<&SegmentEntry> {
        self.entries[..lines.min(self.entries.len())]
            .iter()
            .rev()
            .find_map(|e| match e {
                Entry::Segment(s) => Some(s),
                Entry::Retention(_) => None,
            })
    }
}

impl ManifestAppender {
    /// Lines in the manifest: the tree size a new checkpoint signs.
    pub fn size(&self) -> usize {
        self.frontier.size() as usize
    }

    /// Root over every line: what a new checkpoint signs.
    pub fn root(&self) -> merkle::Hash {
        self.frontier.root()
    }

    /// Appends an entry and fsyncs the file.
    pub fn append(&mut self, dir: &Path, perms: &Perms, entry: &Entry) -> io::Result<()> {
        let line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        let mut buf = line.clone();
        buf.push(b'\n');
        let path = dir.join(FILE);
        if self.uncut {
            self.cut(&path)?;
        }
        let mut f = perms.open_append(&path)?;
        #[cfg(test)]
        if let Some(partial) = super::store::faults::take_manifest_write(dir) {
            f.write_all(&buf[..partial.min(buf.len())])?;
            return self.failed(&path, io::Error::other("planned manifest write failure"));
        }
        if let Err(e) = f.write_all(&buf).and_then(|()| f.sync_data()) {
            return self.failed(&path, e);
        }
        self.byte_len += line.len() as u64 + 1;
        self.frontier.push(merkle::leaf_hash(&line));
        Ok(())
    }

    /// After a failed append: cuts the part of the line that reached the
    /// file off, so the next append starts clean, or notes that it is
    /// still there. Returns the append's error.
    fn failed(&mut self, path: &Path, err: io::Error) -> io::Result<()> {
        if let Err(cut_err) = self.cut(path) {
            tracing::error!(error = %cut_err, "a failed manifest append could not be cut off the file; the next append cuts it first");
            self.uncut = true;
        }
        Err(err)
    }

    /// Cuts the file back to the lines read or appended, synced.
    fn cut(&mut self, path: &Path) -> io::Result<()> {
        #[cfg(test)]
        if path
            .parent()
            .is_some_and(super::store::faults::take_manifest_cut)
        {
            return Err(io::Error::other("planned manifest cut failure"));
        }
        let f = fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(self.byte_len)?;
        f.sync_all()?;
        self.uncut = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::store::faults;

    fn entry(n: u64) -> Entry {
        Entry::Retention(RetentionEntry {
            at: n as i64,
            retention_days: 30,
            removed: Vec::new(),
        })
    }

    /// An append that fails part way, and whose partial line cannot be cut
    /// off at once, leaves no damage behind: the next append cuts it off
    /// first, and is refused while it cannot.
    #[test]
    fn a_failed_append_whose_line_could_not_be_cut_is_cut_before_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let perms = Perms::default();
        let mut m = Manifest::read(dir.path()).expect("read").0.into_appender();
        m.append(dir.path(), &perms, &entry(1)).expect("first");
        let good = fs::read(dir.path().join(FILE)).expect("file");

        faults::fail_next_manifest_write(dir.path(), 7);
        faults::fail_next_manifest_cut(dir.path());
        m.append(dir.path(), &perms, &entry(2))
            .expect_err("the planned failure");
        let on_disk = fs::read(dir.path().join(FILE)).expect("file");
        assert_eq!(on_disk.len(), good.len() + 7, "the partial line is there");

        // The cut fails again: nothing is written behind the partial line.
        faults::fail_next_manifest_cut(dir.path());
        m.append(dir.path(), &perms, &entry(3))
            .expect_err("refused while the partial line is there");
        assert_eq!(fs::read(dir.path().join(FILE)).expect("file"), on_disk);

        m.append(dir.path(), &perms, &entry(4))
            .expect("cut, then appended");
        let (read, bad) = Manifest::read(dir.path()).expect("read");
        assert!(bad.is_none(), "{:?}", bad.map(|b| b.reason));
        assert_eq!(read.entries, vec![entry(1), entry(4)]);
        // What the next checkpoint would sign is what is on disk.
        assert_eq!((m.size(), m.root()), (2, read.root_all()));
    }
}
