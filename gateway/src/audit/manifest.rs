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
}

#[derive(Debug)]
pub struct BadLine {
    pub line: usize,
    pub reason: String,
}

impl Manifest {
    /// Reads the manifest. Returns the good prefix and, if a line does not
    /// decode, where. An unterminated last line is a torn append.
    pub fn read(dir: &Path) -> io::Result<(Manifest, Option<BadLine>)> {
        let bytes = match fs::read(dir.join(FILE)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut m = Manifest::default();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let Some(nl) = rest.iter().position(|b| *b == b'\n') else {
                let n = m.lines.len();
                let bad = BadLine {
                    line: n,
                    reason: "unterminated last line".into(),
                };
                return Ok((m, Some(bad)));
            };
            let line = &rest[..nl];
            match serde_json::from_slice::<Entry>(line) {
                Ok(e) => m.push(line.to_vec(), e),
                Err(e) => {
                    let n = m.lines.len();
                    return Ok((
                        m,
                        Some(BadLine {
                            line: n,
                            reason: e.to_string(),
                        }),
                    ));
                }
            }
            rest = &rest[nl + 1..];
        }
        Ok((m, None))
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
        self.entries.iter().rev().find_map(|e| match e {
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
        let mut f = perms.open_append(&path)?;
        if let Err(e) = f.write_all(&buf).and_then(|()| f.sync_data()) {
            // Cut a partial line off so the next append starts clean.
            let _ = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(self.byte_len()));
            return Err(e);
        }
        self.push(line, entry);
        Ok(())
    }
}
