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
/// entries they decode to.
#[derive(Debug, Default)]
pub struct Manifest {
    pub lines: Vec<Vec<u8>>,
    pub entries: Vec<Entry>,
    /// Merkle frontier over `lines`, kept up to date on every push.
    frontier: merkle::Frontier,
    /// An append failed and the part of its line that reached the file
    /// could not be cut off: the file holds more than `lines`. The next
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
/// retention entry lists at most [`MAX_REMOVED_PER_ENTRY`] segments. A
/// longer line is damage, and reading it whole could take all memory (a
/// sparse file of terabytes costs no disk).
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// Most segments one retention entry lists, so that its line stays well
/// within [`MAX_LINE_BYTES`] (each is under 200 bytes): a larger removal
/// is written as several entries.
pub const MAX_REMOVED_PER_ENTRY: usize = 100_000;

impl Manifest {
    /// Reads the manifest. Returns the good prefix and, if a line does not
    /// decode, where. An unterminated last line is a torn append. Read a
    /// line at a time: memory holds the lines, never more than one line
    /// beyond them.
    pub fn read(dir: &Path) -> io::Result<(Manifest, Option<BadLine>)> {
        use std::io::{BufRead, Read};
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
            let n = (&mut reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut line)?;
            if n == 0 {
                return Ok((m, None));
            }
            let at = m.lines.len();
            let bad = |reason: String, torn: bool| BadLine {
                line: at,
                reason,
                torn,
            };
            if line.last() != Some(&b'\n') {
                let bad = match line.len() > MAX_LINE_BYTES {
                    true => bad(format!("a line longer than {MAX_LINE_BYTES} bytes"), false),
                    false => bad("unterminated last line".into(), true),
                };
                return Ok((m, Some(bad)));
            }
            line.pop();
            match serde_json::from_slice::<Entry>(&line) {
                Ok(e) => m.push(line.clone(), e),
                Err(e) => return Ok((m, Some(bad(e.to_string(), false)))),
            }
        }
    }

    /// Byte length of the good prefix (for truncating a torn append).
    pub fn byte_len(&self) -> u64 {
        self.lines.iter().map(|l| l.len() as u64 + 1).sum()
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

    /// Appends an entry and fsyncs the file.
    pub fn append(&mut self, dir: &Path, perms: &Perms, entry: Entry) -> io::Result<()> {
        let line = serde_json::to_vec(&entry).map_err(io::Error::other)?;
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
        self.push(line, entry);
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
        f.set_len(self.byte_len())?;
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
        let (mut m, _) = Manifest::read(dir.path()).expect("read");
        m.append(dir.path(), &perms, entry(1)).expect("first");
        let good = fs::read(dir.path().join(FILE)).expect("file");

        faults::fail_next_manifest_write(dir.path(), 7);
        faults::fail_next_manifest_cut(dir.path());
        m.append(dir.path(), &perms, entry(2))
            .expect_err("the planned failure");
        let on_disk = fs::read(dir.path().join(FILE)).expect("file");
        assert_eq!(on_disk.len(), good.len() + 7, "the partial line is there");

        // The cut fails again: nothing is written behind the partial line.
        faults::fail_next_manifest_cut(dir.path());
        m.append(dir.path(), &perms, entry(3))
            .expect_err("refused while the partial line is there");
        assert_eq!(fs::read(dir.path().join(FILE)).expect("file"), on_disk);

        m.append(dir.path(), &perms, entry(4))
            .expect("cut, then appended");
        let (read, bad) = Manifest::read(dir.path()).expect("read");
        assert!(bad.is_none(), "{:?}", bad.map(|b| b.reason));
        assert_eq!(read.entries, vec![entry(1), entry(4)]);
        assert_eq!(read.entries, m.entries);
    }
}
