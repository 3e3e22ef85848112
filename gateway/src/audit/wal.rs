//! The write-ahead log: the only place a record lives between `append`
//! returning and its segment being closed.
//!
//! Files are `{dir}/wal/wal-<generation:010>-<first sequence:020>.log`. Each
//! frame is `len: u32 LE | crc32(payload): u32 LE | payload`, the payload
//! being the serde_json encoding of the full record (including
//! `record_hash`). A new file is started after every segment cut and after
//! every failed write, so a failed batch never leaves garbage in front of
//! acknowledged records: a later file starting at sequence S supersedes
//! whatever an earlier file holds from S on (see [`read_all`]).

use std::{
    fs,
    io::{self, Read},
    path::{Path, PathBuf},
};

use super::AuditRecord;

/// Largest payload accepted when reading: a longer length field is corrupt.
const MAX_FRAME: u32 = 64 << 20;

pub fn encode_frame(record: &AuditRecord, out: &mut Vec<u8>) {
    let payload = serde_json::to_vec(record).unwrap_or_default();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

pub fn file_name(generation: u64, first_seq: u64) -> String {
    format!("wal-{generation:010}-{first_seq:020}.log")
}

/// (generation, first sequence) from a WAL file name.
pub fn parse_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    let (g, s) = rest.split_once('-')?;
    Some((g.parse().ok()?, s.parse().ok()?))
}

/// WAL files in generation order.
pub fn list(wal_dir: &Path) -> io::Result<Vec<(u64, u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(wal_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name();
        if let Some((g, s)) = name.to_str().and_then(parse_name) {
            out.push((g, s, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// How a WAL file ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Every byte belongs to a whole, valid frame.
    Clean,
    /// The file ends inside a frame: a write that was cut short by a crash
    /// or a full disk. It was never acknowledged.
    Torn { offset: u64 },
    /// A whole frame whose checksum or encoding is wrong: not something a
    /// crash produces.
    Corrupt {
        offset: u64,
        frame: usize,
        reason: String,
    },
}

pub struct WalFileContents {
    pub records: Vec<AuditRecord>,
    pub tail: Tail,
}

/// Reads the frames of one file up to the first bad one.
pub fn read_file(path: &Path) -> io::Result<WalFileContents> {
    let mut bytes = Vec::new();
    fs::File::open(path)?.read_to_end(&mut bytes)?;
    let mut records = Vec::new();
    let mut off = 0usize;
    let tail = loop {
        if off == bytes.len() {
            break Tail::Clean;
        }
        if bytes.len() - off < 8 {
            break Tail::Torn { offset: off as u64 };
        }
        let len = u32::from_le_bytes([bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]]);
        let crc = u32::from_le_bytes([
            bytes[off + 4],
            bytes[off + 5],
            bytes[off + 6],
            bytes[off + 7],
        ]);
        if len > MAX_FRAME {
            break Tail::Corrupt {
                offset: off as u64,
                frame: records.len(),
                reason: format!("frame length {len} is implausible"),
            };
        }
        let end = off + 8 + len as usize;
        if end > bytes.len() {
            break Tail::Torn { offset: off as u64 };
        }
        let payload = &bytes[off + 8..end];
        if crc32fast::hash(payload) != crc {
            break Tail::Corrupt {
                offset: off as u64,
                frame: records.len(),
                reason: "CRC32 mismatch".into(),
            };
        }
        match serde_json::from_slice::<AuditRecord>(payload) {
            Ok(r) => records.push(r),
            Err(e) => {
                break Tail::Corrupt {
                    offset: off as u64,
                    frame: records.len(),
                    reason: format!("undecodable record: {e}"),
                }
            }
        }
        off = end;
    };
    Ok(WalFileContents { records, tail })
}

/// One file's part in the merged view.
pub struct WalFileReport {
    pub path: PathBuf,
    pub generation: u64,
    pub tail: Tail,
}

/// Reads all WAL files in generation order and merges them: a file whose
/// first sequence is S drops records >= S gathered from earlier files
/// (they belonged to a failed, unacknowledged batch).
pub fn read_all(wal_dir: &Path) -> io::Result<(Vec<AuditRecord>, Vec<WalFileReport>)> {
    let mut merged: Vec<AuditRecord> = Vec::new();
    let mut reports = Vec::new();
    for (generation, first_seq, path) in list(wal_dir)? {
        let contents = read_file(&path)?;
        merged.retain(|r| r.sequence < first_seq);
        merged.extend(contents.records);
        reports.push(WalFileReport {
            path,
            generation,
            tail: contents.tail,
        });
    }
    Ok((merged, reports))
}
