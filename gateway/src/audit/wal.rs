//! The write-ahead log: the only place a record lives between `append`
//! returning and its segment being closed.
//!
//! Files are `{dir}/wal/wal-v2-<generation:010>-<first sequence:020>.log`.
//! Each frame is `len: u32 LE | crc32(len): u32 LE | crc32(payload): u32 LE
//! | payload | 0xFF padding to a multiple of 4 bytes` (so a frame, and its
//! length field, never starts in the last three bytes of a sector: see
//! [`header_unwritten`]), the payload being the record's canonical encoding (`AuditRecord::canonical_bytes`):
//! the exact bytes its `record_hash` is the SHA-256 of, so a record is
//! encoded once and hashed once on the way in, and replay gets the hash
//! from the payload without encoding anything again. The encoding is JSON,
//! which the record deserialises from directly. The length has a checksum
//! of its own: a damaged length would otherwise point past the written
//! part, and the frame would pass for one a crash cut short (see
//! [`read_file`]). Files named `wal-<generation>-<first sequence>.log`,
//! written before that checksum existed, have frames without it
//! (`len | crc32(payload) | payload`); they are still read.
//!
//! A file is usually preallocated: written full of zeros before it is
//! used (see [`prepare_spare`]), so appending a batch overwrites blocks
//! that already exist and fdatasync has no file size or extent change to
//! commit. The written part ends at the first zero length field. A batch
//! cut short by a crash leaves zeros where its unwritten sectors are; that
//! is how a torn frame is told from a corrupt one (see [`read_file`]).
//!
//! A new file is started when one is full and after every failed write, so
//! a failed batch never leaves garbage in front of acknowledged records: a
//! later file starting at sequence S supersedes whatever an earlier file
//! holds from S on (see [`read_all`]).
//!
//! Every batch ends in a seal frame: an HMAC-SHA256, under a key derived
//! from the audit signing key, of the batch's last sequence and record
//! hash. The chain is public (SHA-256 needs no key), so without the seal
//! anyone who can write the WAL could edit or append records with a valid
//! chain, and the daemon would put them into signed segments at its next
//! start. Replay takes only records a valid seal covers (see [`Seal`]).

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

use super::{fsutil::Perms, AuditRecord};

/// Largest payload: a longer length field is corrupt when reading, so the
/// store refuses to acknowledge a record whose encoding would be longer
/// (see [`PreparedFrame::fits`]).
pub const MAX_FRAME: u32 = 64 << 20;

/// Room left in [`MAX_FRAME`] for the chain members the writer splices in
/// (`,"prev_record_hash":"` 64 hex digits `"` and `,"sequence":` up to 20
/// digits: 118 bytes), with a margin.
const CHAIN_ROOM: usize = 256;

/// The longest encoding a record may have before its chain members are
/// added: what a WAL frame can hold and read back.
pub const MAX_PAYLOAD: usize = MAX_FRAME as usize - CHAIN_ROOM;

/// Size a preallocated WAL file is zero-filled to. A batch that does not
/// fit in what is left starts the next file.
pub const PREALLOC_BYTES: u64 = 16 << 20;

/// Files are only preallocated while the file system has at least this
/// much free space: on a nearly full disk, zero-filled space held in
/// reserve would let records be acknowledged after the disk is full (and
/// then have nowhere to go as segments), so the WAL falls back to plain
/// appends there and requests are refused as soon as the disk is full.
pub const PREALLOC_MIN_FREE: u64 = 1 << 30;

/// Granularity at which a crash may leave a write partly on disk: a
/// sector is either written or not.
const SECTOR: usize = 512;

/// Bytes in front of a frame's payload: length, its checksum, the
/// payload's checksum.
pub(crate) const HEADER: usize = 12;

/// How a file's frames are laid out, by its name (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `len | crc32(payload) | payload`: files of older versions.
    Unchecked,
    /// `len | crc32(len) | crc32(payload) | payload`.
    LengthChecked,
}

impl Format {
    fn header(self) -> usize {
        match self {
            Format::Unchecked => 8,
            Format::LengthChecked => HEADER,
        }
    }
}

/// The checksum of a length field: a frame's length is trusted only when
/// it holds.
fn length_check(len_field: [u8; 4]) -> u32 {
    crc32fast::hash(&len_field)
}

/// Bytes a frame of a `payload_len`-byte payload takes in a file: its
/// header, the payload, and the padding to a multiple of 4.
pub fn frame_len(payload_len: usize) -> usize {
    (HEADER + payload_len).next_multiple_of(4)
}

/// Pads the frame that starts at `start` in `out` to a multiple of 4
/// bytes. Frames of a file start at 0 and are each padded, so every frame
/// starts 4-aligned, never in the last three bytes of a sector.
fn pad_frame(out: &mut Vec<u8>, start: usize) {
    while !(out.len() - start).is_multiple_of(4) {
        out.push(PAD);
    }
}

/// What pads a frame: not zero, so padding is never read as the
/// unwritten rest of a file.
const PAD: u8 = 0xFF;

/// Writes the header of the frame at `start` in `out`.
fn write_header(out: &mut [u8], start: usize, len_field: u32, payload_crc: u32) {
    let len = len_field.to_le_bytes();
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + 8].copy_from_slice(&length_check(len).to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&payload_crc.to_le_bytes());
}

/// Appends the frame of `record` (canonical encoding as payload) to `out`
/// and returns the record's hash: SHA-256 of the payload.
pub fn encode_frame(record: &AuditRecord, out: &mut Vec<u8>) -> [u8; 32] {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    super::segment::canonical_into(record, out);
    let hash = seal_frame(out, start, Sha256::new(), 0);
    pad_frame(out, start);
    hash
}

/// Fills in the header of the frame starting at `start` in `out` (its
/// payload written after the [`HEADER`] bytes) and returns the payload's
/// SHA-256, finishing `hasher`, which has already taken the payload's first
/// `hasher_covers` bytes.
fn seal_frame(out: &mut [u8], start: usize, hasher: Sha256, hasher_covers: usize) -> [u8; 32] {
    let payload = &out[start + HEADER..];
    let mut hasher = hasher;
    hasher.update(&payload[hasher_covers..]);
    let hash: [u8; 32] = hasher.finalize().into();
    // Records are refused at submit unless they fit (`PreparedFrame::fits`).
    debug_assert!(payload.len() <= MAX_FRAME as usize);
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    write_header(out, start, len, crc);
    hash
}

/// Set in a frame's length field: the frame is a [`Seal`], not a record.
/// Record frames are at most [`MAX_FRAME`] (2^26) long, so the bit is
/// free.
const SEAL_FLAG: u32 = 1 << 31;

/// The seal that ends a batch: `mac` is the hex HMAC-SHA256 of the
/// sequence (8 bytes, little-endian) and the SHA-256 record hash of the
/// batch's last record, keyed with the WAL seal key
/// ([`super::checkpoint::Signer::wal_seal_key`]). Through the chain it
/// covers every record up to that one. Its frame payload is JSON, like a
/// record's, so a payload never holds a zero byte (see
/// [`has_unwritten_sector`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seal {
    pub sealed_sequence: u64,
    pub mac: String,
}

/// What a seal's HMAC is taken over: the sequence (little-endian), then
/// the record hash.
fn sealed_message(sequence: u64, record_hash: &[u8; 32]) -> [u8; 40] {
    let mut message = [0u8; 40];
    message[..8].copy_from_slice(&sequence.to_le_bytes());
    message[8..].copy_from_slice(record_hash);
    message
}

fn seal_tag(key: &ring::hmac::Key, sequence: u64, record_hash: &[u8; 32]) -> ring::hmac::Tag {
    ring::hmac::sign(key, &sealed_message(sequence, record_hash))
}

/// Appends the seal frame of a batch whose last record has `sequence` and
/// `record_hash`.
pub fn append_seal(
    out: &mut Vec<u8>,
    key: &ring::hmac::Key,
    sequence: u64,
    record_hash: &[u8; 32],
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    out.extend_from_slice(b"{\"mac\":\"");
    let mut digits = [0u8; 64];
    // 64 bytes are exactly room for a 32-byte tag in hex: it cannot fail.
    let _ = hex::encode_to_slice(seal_tag(key, sequence, record_hash), &mut digits);
    out.extend_from_slice(&digits);
    out.extend_from_slice(b"\",\"sealed_sequence\":");
    out.extend_from_slice(itoa::Buffer::new().format(sequence).as_bytes());
    out.push(b'}');
    let payload = &out[start + HEADER..];
    let len = payload.len() as u32 | SEAL_FLAG;
    let crc = seal_crc(payload);
    write_header(out, start, len, crc);
    pad_frame(out, start);
}

/// A seal frame's checksum also covers its kind: one flipped bit in the
/// length field must not turn a seal into a record frame whose checksum
/// still holds (nor a record into a seal).
fn seal_crc(payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(b"seal");
    crc.update(payload);
    crc.finalize()
}

impl Seal {
    /// Whether this seal was made with `key` for the record with
    /// `record_hash` (hex) at its sequence. Compared in constant time.
    pub fn covers(&self, key: &ring::hmac::Key, record_hash: &str) -> bool {
        let mut hash = [0u8; 32];
        let (Ok(mac), Ok(())) = (
            hex::decode(&self.mac),
            hex::decode_to_slice(record_hash, &mut hash),
        ) else {
            return false;
        };
        // Over what `append_seal` signs; ring compares in constant time.
        let message = sealed_message(self.sealed_sequence, &hash);
        ring::hmac::verify(key, &message, &mac).is_ok()
    }
}

/// Largest encoding buffer a thread keeps between records.
const SCRATCH_KEEP: usize = 64 << 10;

/// A record's frame, encoded and partly hashed before the record is
/// chained: everything but its two chain members, which only the writer
/// knows (see [`canonical_into_without_chain`]). Callers prepare their
/// records on their own threads; the writer, which must chain records one
/// at a time, then only splices the members in and hashes what follows
/// the first of them.
///
/// [`canonical_into_without_chain`]: super::segment::canonical_into_without_chain
pub struct PreparedFrame {
    payload: Vec<u8>,
    gaps: super::segment::ChainGaps,
    /// SHA-256 state over `payload[..gaps.prev_record_hash]`.
    head: Sha256,
}

impl PreparedFrame {
    pub fn new(record: &AuditRecord) -> Self {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        // Encoded into a buffer the thread keeps, then copied out at its
        // exact size: one allocation, not a growing one per record.
        let (payload, gaps) = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.clear();
            let gaps = super::segment::canonical_into_without_chain(record, &mut scratch);
            let payload = scratch.to_vec();
            // One huge statement must not pin its size on every thread.
            if scratch.capacity() > SCRATCH_KEEP {
                *scratch = Vec::new();
            }
            (payload, gaps)
        });
        let mut head = Sha256::new();
        head.update(&payload[..gaps.prev_record_hash]);
        PreparedFrame {
            payload,
            gaps,
            head,
        }
    }

    /// Whether the frame, once its chain members are spliced in, is short
    /// enough to be read back: a record that is not would be acknowledged
    /// and then lost, with everything after it, when the WAL is replayed.
    pub fn fits(&self) -> bool {
        self.payload.len() <= MAX_PAYLOAD
    }

    /// The length of the encoding so far, without the chain members.
    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }

    /// Appends the frame of `record` to `out` and returns its hash, as
    /// [`encode_frame`] does. `record` is the one this frame was prepared
    /// from, with its chain members now set.
    pub fn finish(self, record: &AuditRecord, out: &mut Vec<u8>) -> [u8; 32] {
        let link = record.prev_record_hash.as_bytes();
        // Splicing copies the link between quotes as it is: right for any
        // text JSON writes unescaped (a hex hash always is), but the
        // canonical encoding leaves an empty link out, and other text may
        // need escaping. Those are encoded whole instead. (The test runs
        // for every record on the writer thread: the vectorised escape
        // check, not a byte-at-a-time one.)
        if link.is_empty() || super::segment::needs_escape(link) {
            return encode_frame(record, out);
        }
        let start = out.len();
        let (head, rest) = self.payload.split_at(self.gaps.prev_record_hash);
        let (middle, tail) = rest.split_at(self.gaps.sequence - self.gaps.prev_record_hash);
        out.extend_from_slice(&[0u8; HEADER]);
        out.extend_from_slice(head);
        out.extend_from_slice(b"\"prev_record_hash\":\"");
        out.extend_from_slice(link);
        out.push(b'"');
        out.extend_from_slice(middle);
        out.extend_from_slice(b"\"sequence\":");
        out.extend_from_slice(itoa::Buffer::new().format(record.sequence).as_bytes());
        out.extend_from_slice(tail);
        let hash = seal_frame(out, start, self.head, head.len());
        pad_frame(out, start);
        debug_assert!(
            {
                let mut whole = Vec::new();
                encode_frame(record, &mut whole) == hash && whole == out[start..]
            },
            "a prepared frame was finished with a record other than its own"
        );
        hash
    }
}

pub fn file_name(generation: u64, first_seq: u64) -> String {
    format!("wal-v2-{generation:010}-{first_seq:020}.log")
}

/// (generation, first sequence) from a WAL file name.
pub fn parse_name(name: &str) -> Option<(u64, u64)> {
    parse_name_and_format(name).map(|(g, s, _)| (g, s))
}

/// (generation, first sequence, frame format) from a WAL file name.
fn parse_name_and_format(name: &str) -> Option<(u64, u64, Format)> {
    let rest = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    let (rest, format) = match rest.strip_prefix("v2-") {
        Some(rest) => (rest, Format::LengthChecked),
        None => (rest, Format::Unchecked),
    };
    let (g, s) = rest.split_once('-')?;
    Some((g.parse().ok()?, s.parse().ok()?, format))
}

/// Name of a spare (preallocated, not yet used) file. It ends in `.tmp`:
/// one left by a crash or a shutdown is removed at the next start.
pub fn spare_name(n: u64) -> String {
    format!("spare-{}-{n}.tmp", std::process::id())
}

/// Free bytes for an unprivileged writer on the file system of `dir`.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs reads a NUL-terminated path and fills the struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Size of each write that zero-fills a spare. The page cache keeps a
/// file's pages in folios sized by the writes that created them (ext4 on
/// recent kernels), and every later write into a folio walks all of the
/// folio's blocks: a 1.3 KB record written into a 1 MiB folio walks 256
/// of them. In 64 KiB folios a record's write(2) costs less than half the
/// CPU it does in 1 MiB ones (2.1 against 4.1-4.3 µs, and 1.4 against
/// 3.2-3.6 µs in a second set of runs; ext4, kernel 6.18), and
/// zero-filling 16 MiB still takes only 256 writes.
const ZERO_FILL_CHUNK: usize = 64 << 10;

/// Creates `path` and fills it with [`PREALLOC_BYTES`] of zeros, really
/// written (not fallocate'd: unwritten extents would have to be converted,
/// with a journal commit, by the fdatasync of the first batch that lands
/// in them), then fsyncs it so its size and blocks are on disk before any
/// record is. `stop` is checked between chunks so a shutdown does not wait
/// for the whole file. On any error the partial file is removed.
pub fn prepare_spare(
    perms: &Perms,
    path: &Path,
    stop: &std::sync::atomic::AtomicBool,
) -> io::Result<fs::File> {
    let result = (|| {
        let mut f = perms.create_new(path)?;
        let chunk = vec![0u8; ZERO_FILL_CHUNK];
        let mut left = PREALLOC_BYTES;
        while left > 0 {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "shutting down"));
            }
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        Ok(f)
    })();
    if result.is_err() {
        let _ = fs::remove_file(path);
    }
    result
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
    pub seals: Vec<Seal>,
    pub tail: Tail,
}

/// Does some sector that `[start, end)` overlaps hold only zeros within
/// that range? Then that part of the frame was never written: a batch cut
/// short by a crash, in a preallocated (zero-filled) file. A payload never
/// contains a zero byte (JSON text), and a single flipped bit cannot make
/// the overlap with a whole sector zero (the payload's first and last
/// bytes, `{` and `}`, are not one bit away from zero), so corruption is
/// not mistaken for a torn write.
fn has_unwritten_sector(bytes: &[u8], start: usize, end: usize) -> bool {
    let mut s = start - start % SECTOR;
    while s < end {
        let (a, b) = (s.max(start), (s + SECTOR).min(end));
        if a < b && bytes[a..b].iter().all(|&x| x == 0) {
            return true;
        }
        s += SECTOR;
    }
    false
}

/// Is the header of the frame at `off` cut short: does a sector it lies
/// in hold only zeros from the frame's start (or the sector's) to the
/// sector's end? In a later sector that range holds the start of the
/// payload, which has no zero byte when written. In the frame's first
/// sector it is judged only when it holds more than the length field
/// (frames are padded so that they start 4-aligned, see [`pad_frame`]):
/// a written length and its checksum are never both zero, but a length
/// alone may be (a damaged one, or one whose bytes in that sector are
/// zero), and damage is never taken for a crash's cut. (A header cut
/// short there, out of sector order, is reported as corrupt: loud, and
/// nothing acknowledged is lost.)
fn header_unwritten(bytes: &[u8], off: usize) -> bool {
    let mut s = off - off % SECTOR;
    while s < off + HEADER {
        let (a, b) = (s.max(off), (s + SECTOR).min(bytes.len()));
        let judged = s > off || b - a.min(b) > 4;
        if judged && a < b && bytes[a..b].iter().all(|&x| x == 0) {
            return true;
        }
        s += SECTOR;
    }
    false
}

/// The frame format of the WAL file at `path` (set aside or not), by its
/// name.
fn format_of(path: &Path) -> Format {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let name = name
        .strip_suffix(".unsealed")
        .or_else(|| name.strip_suffix(".corrupt"))
        .unwrap_or(name);
    parse_name_and_format(name).map_or(Format::LengthChecked, |(_, _, f)| f)
}

/// Reads the frames of one file up to the first bad one.
///
/// The written part of a file ends at its end or at a zero header (the
/// zero-filled rest of a preallocated file). A frame whose header or
/// payload runs past the end of the file, or whose header or payload fails
/// its checksum where some of its sectors are still zeros, is torn: a
/// write cut short, never acknowledged. A whole frame that fails a
/// checksum or does not decode is corrupt; so is a length that fails its
/// own checksum, which is why a damaged length cannot pass for a frame
/// that runs into the unwritten part.
///
/// The file is read only as far as its frames go, not whole: the rest of a
/// preallocated file is zeros, and a file made huge (a sparse one costs no
/// disk) would otherwise be read into all memory.
pub fn read_file(path: &Path) -> io::Result<WalFileContents> {
    let mut src = InHand::new(super::fsutil::open_regular(path)?);
    read_frames(&mut src, format_of(path))
}

/// The first bytes of a file, read as they are asked for.
struct InHand<R> {
    reader: R,
    bytes: Vec<u8>,
    at_end: bool,
}

/// Bytes read at a time beyond what is asked for: frames are small.
const READ_AHEAD: usize = 1 << 20;

impl<R: io::Read> InHand<R> {
    fn new(reader: R) -> Self {
        InHand {
            reader,
            bytes: Vec::new(),
            at_end: false,
        }
    }

    /// The file's first `n` bytes, or all of it when it is shorter (and
    /// perhaps a little more than `n`).
    fn upto(&mut self, n: usize) -> io::Result<&[u8]> {
        use io::Read;
        if self.bytes.len() < n && !self.at_end {
            let want = (n - self.bytes.len()).max(READ_AHEAD);
            let got = (&mut self.reader)
                .take(want as u64)
                .read_to_end(&mut self.bytes)?;
            self.at_end = got < want;
        }
        Ok(&self.bytes)
    }
}

fn read_frames<R: io::Read>(src: &mut InHand<R>, format: Format) -> io::Result<WalFileContents> {
    let header = format.header();
    let mut records = Vec::new();
    let mut seals = Vec::new();
    let mut off = 0usize;
    let tail = loop {
        // The header and the rest of the sector it ends in (see
        // `header_unwritten`).
        let bytes = src.upto((off + header).next_multiple_of(SECTOR))?;
        if off == bytes.len() {
            break Tail::Clean;
        }
        let rest = &bytes[off..];
        if rest.len() < header {
            if rest.iter().all(|&b| b == 0) {
                break Tail::Clean;
            }
            break Tail::Torn { offset: off as u64 };
        }
        let len_field = [rest[0], rest[1], rest[2], rest[3]];
        let len = u32::from_le_bytes(len_field);
        if format == Format::LengthChecked {
            let check = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
            if len == 0 && check == 0 {
                break Tail::Clean;
            }
            if check != length_check(len_field) {
                if header_unwritten(bytes, off) {
                    break Tail::Torn { offset: off as u64 };
                }
                break Tail::Corrupt {
                    offset: off as u64,
                    frame: records.len(),
                    reason: "frame length fails its checksum".into(),
                };
            }
        } else if len == 0 {
            break Tail::Clean;
        }
        let crc = u32::from_le_bytes([
            rest[header - 4],
            rest[header - 3],
            rest[header - 2],
            rest[header - 1],
        ]);
        let is_seal = len & SEAL_FLAG != 0;
        let len = len & !SEAL_FLAG;
        if len > MAX_FRAME {
            break Tail::Corrupt {
                offset: off as u64,
                frame: records.len(),
                reason: format!("frame length {len} is implausible"),
            };
        }
        let end = off + header + len as usize;
        let padded_end = match format {
            Format::LengthChecked => off + frame_len(len as usize),
            Format::Unchecked => end,
        };
        let bytes = src.upto(padded_end)?;
        if end > bytes.len() {
            break Tail::Torn { offset: off as u64 };
        }
        // Where the next frame starts: past this one's padding (a file of
        // an older version has none). A write cut off inside the padding
        // leaves nothing after it.
        let next = padded_end.min(bytes.len());
        let payload = &bytes[off + header..end];
        let computed = match is_seal {
            true => seal_crc(payload),
            false => crc32fast::hash(payload),
        };
        if computed != crc {
            if has_unwritten_sector(bytes, off + header, end) {
                break Tail::Torn { offset: off as u64 };
            }
            break Tail::Corrupt {
                offset: off as u64,
                frame: records.len(),
                reason: "CRC32 mismatch".into(),
            };
        }
        if is_seal {
            match serde_json::from_slice::<Seal>(payload) {
                Ok(seal) => seals.push(seal),
                Err(e) => {
                    break Tail::Corrupt {
                        offset: off as u64,
                        frame: records.len(),
                        reason: format!("undecodable seal: {e}"),
                    }
                }
            }
            off = next;
            continue;
        }
        match serde_json::from_slice::<AuditRecord>(payload) {
            // Every record has a sequence from 1: a frame that decodes
            // without one is not a record (missing fields default).
            Ok(r) if r.sequence == 0 => {
                break Tail::Corrupt {
                    offset: off as u64,
                    frame: records.len(),
                    reason: "a frame without a sequence number".into(),
                }
            }
            Ok(mut r) => {
                // Files written before the payload was the canonical
                // encoding carry the hash in the record itself.
                if r.record_hash.is_empty() {
                    r.record_hash = hex::encode(Sha256::digest(payload));
                }
                records.push(r)
            }
            Err(e) => {
                break Tail::Corrupt {
                    offset: off as u64,
                    frame: records.len(),
                    reason: format!("undecodable record: {e}"),
                }
            }
        }
        off = next;
    };
    Ok(WalFileContents {
        records,
        seals,
        tail,
    })
}

/// One file's part in the merged view.
pub struct WalFileReport {
    pub path: PathBuf,
    pub generation: u64,
    /// The sequence of the file's last record, if it has one.
    pub last_sequence: Option<u64>,
    pub tail: Tail,
}

/// The WAL's files merged (see [`read_all`]).
pub struct Merged {
    pub records: Vec<AuditRecord>,
    /// Seals by the sequence they were made for.
    pub seals: std::collections::HashMap<u64, Seal>,
    pub reports: Vec<WalFileReport>,
}

/// Reads all WAL files in generation order and merges them: a file whose
/// first sequence is S drops records (and seals) >= S gathered from
/// earlier files (they belonged to a failed, unacknowledged batch).
pub fn read_all(wal_dir: &Path) -> io::Result<Merged> {
    let mut records: Vec<AuditRecord> = Vec::new();
    let mut seals = std::collections::HashMap::new();
    let mut reports = Vec::new();
    for (generation, first_seq, path) in list(wal_dir)? {
        let contents = read_file(&path)?;
        records.retain(|r| r.sequence < first_seq);
        seals.retain(|sequence, _| *sequence < first_seq);
        let last_sequence = contents.records.last().map(|r| r.sequence);
        records.extend(contents.records);
        seals.extend(contents.seals.into_iter().map(|s| (s.sealed_sequence, s)));
        reports.push(WalFileReport {
            path,
            generation,
            last_sequence,
            tail: contents.tail,
        });
    }
    Ok(Merged {
        records,
        seals,
        reports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(n: usize) -> (Vec<u8>, Vec<AuditRecord>) {
        let mut bytes = Vec::new();
        let mut records = Vec::new();
        for i in 0..n {
            let mut r = super::super::tests::sample(i, 1_000 + i as i64);
            r.sequence = i as u64 + 1;
            r.record_hash = hex::encode(encode_frame(&r, &mut bytes));
            records.push(r);
        }
        (bytes, records)
    }

    /// A frame whose checksum holds but whose payload is not a record (no
    /// sequence: every field it lacks would default) is corrupt, not a
    /// record numbered 0 that replay would pass over.
    #[test]
    fn a_frame_without_a_sequence_is_corrupt() {
        let (mut bytes, _) = frames(1);
        let payload = b"{}";
        let start = bytes.len();
        bytes.extend_from_slice(&[0u8; HEADER]);
        bytes.extend_from_slice(payload);
        write_header(
            &mut bytes,
            start,
            payload.len() as u32,
            crc32fast::hash(payload),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(1, 1));
        fs::write(&path, &bytes).unwrap();
        let read = read_file(&path).unwrap();
        assert_eq!(read.records.len(), 1);
        assert!(
            matches!(&read.tail, Tail::Corrupt { frame: 1, reason, .. } if reason == "a frame without a sequence number"),
            "{:?}",
            read.tail
        );
    }

    /// One flipped bit in a seal's length field (its kind) must not make
    /// it read as a record, nor a record as a seal: either is corrupt.
    #[test]
    fn a_frame_whose_kind_bit_flips_is_corrupt() {
        let key = super::super::checkpoint::Signer::generate("t").wal_seal_key();
        let (mut bytes, records) = frames(2);
        let tip: [u8; 32] = hex::decode(&records[1].record_hash)
            .unwrap()
            .try_into()
            .unwrap();
        let seal_at = bytes.len();
        append_seal(&mut bytes, &key, 2, &tip);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(1, 1));

        fs::write(&path, &bytes).unwrap();
        let whole = read_file(&path).unwrap();
        assert_eq!((whole.records.len(), whole.seals.len()), (2, 1));
        assert_eq!(whole.tail, Tail::Clean);
        assert!(whole.seals[0].covers(&key, &records[1].record_hash));

        let mut seal_as_record = bytes.clone();
        seal_as_record[seal_at + 3] ^= 0x80;
        fs::write(&path, &seal_as_record).unwrap();
        let read = read_file(&path).unwrap();
        assert!(
            matches!(read.tail, Tail::Corrupt { frame: 2, .. }),
            "{:?}",
            read.tail
        );
        assert_eq!(read.records.len(), 2);

        let mut record_as_seal = bytes;
        record_as_seal[3] ^= 0x80;
        fs::write(&path, &record_as_seal).unwrap();
        let read = read_file(&path).unwrap();
        assert!(
            matches!(read.tail, Tail::Corrupt { frame: 0, .. }),
            "{:?}",
            read.tail
        );
    }

    /// A frame prepared before chaining and finished by the writer is the
    /// frame encoded whole, whatever is empty around the spliced members
    /// and whatever the link holds.
    #[test]
    fn a_prepared_frame_finishes_as_the_frame_encoded_whole() {
        let text = ["", "x", "quote \" and \\ and \n", "ünï ✓"];
        let links = [
            super::super::GENESIS_HASH.to_string(),
            hex::encode([0xabu8; 32]),
            "ABCDEF0123".to_string(),
            String::new(),
            "not \"hex\"".to_string(),
            // Spliced as they are: not hex, but nothing to escape.
            "zz".to_string(),
            "ünï ✓".to_string(),
            "\u{7f}".to_string(),
            "\u{2028}".to_string(),
            "g".repeat(31),
            "g".repeat(32),
            "g".repeat(33),
            // Encoded whole: a control character in the last partial block.
            format!("{}\u{1}", "g".repeat(32)),
        ];
        for i in 0..(40 * links.len()) {
            let t = |k: usize| text[(i / (k + 1)) % text.len()].to_string();
            let mut r = if i % 5 == 0 {
                AuditRecord::default()
            } else {
                super::super::tests::sample(i, i as i64 * 7)
            };
            // The members on either side of the two gaps, and the ends.
            r.policy_uid = t(0);
            r.phase = t(1);
            r.query_info_query_string = t(2);
            r.response_error_code = t(3);
            r.session_uid = t(4).into();
            r.unmapped = t(5);
            r.actor_user_groups = (0..i % 3).map(t).collect();
            r.response_rows = (i % 2 == 0).then_some(i as i64);
            let frame = PreparedFrame::new(&r);
            r.sequence = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            r.prev_record_hash = links[i % links.len()].clone();
            let (mut whole, mut spliced) = (vec![1u8, 2, 3], vec![1u8, 2, 3]);
            let whole_hash = encode_frame(&r, &mut whole);
            let spliced_hash = frame.finish(&r, &mut spliced);
            assert_eq!(
                String::from_utf8_lossy(&spliced),
                String::from_utf8_lossy(&whole),
                "record {i}"
            );
            assert_eq!(spliced_hash, whole_hash, "record {i}");
        }
    }

    /// The longest record the store accepts still reads back once the
    /// writer has spliced in the longest chain members (a 64-digit link and
    /// a 20-digit sequence); one byte more is refused before it is chained.
    #[test]
    fn the_longest_accepted_record_reads_back_with_its_chain_members() {
        let mut r = super::super::tests::sample(1, 1_000);
        r.query_info_query_string = "x".into();
        let one = PreparedFrame::new(&r).payload_len();
        r.query_info_query_string = "x".repeat(MAX_PAYLOAD - one + 1);
        let frame = PreparedFrame::new(&r);
        assert_eq!(frame.payload_len(), MAX_PAYLOAD);
        assert!(frame.fits());
        r.sequence = u64::MAX;
        r.prev_record_hash = hex::encode([0xabu8; 32]);
        let mut bytes = Vec::new();
        r.record_hash = hex::encode(frame.finish(&r, &mut bytes));
        let got = read(&bytes);
        assert_eq!(got.tail, Tail::Clean);
        assert_eq!(got.records.len(), 1);
        assert_eq!(got.records[0].record_hash, r.record_hash);
        assert_eq!(got.records[0].sequence, u64::MAX);
        // 64 MiB each: not held while the next one is built.
        drop((got, bytes));

        r.query_info_query_string = "x".repeat(MAX_PAYLOAD - one + 2);
        assert!(!PreparedFrame::new(&r).fits());
    }

    /// A spare is exactly [`PREALLOC_BYTES`] of zeros, every chunk of it,
    /// which replay reads as an empty log; one interrupted by a shutdown
    /// leaves no file behind.
    #[test]
    fn a_spare_is_the_whole_size_in_zeros_and_an_interrupted_one_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let perms = super::super::fsutil::Perms::default();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let path = tmp.path().join(spare_name(1));
        prepare_spare(&perms, &path, &stop).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, PREALLOC_BYTES);
        assert!(bytes.iter().all(|&b| b == 0));
        drop(bytes);
        let got = read_file(&path).unwrap();
        assert_eq!(got.tail, Tail::Clean);
        assert!(got.records.is_empty());

        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let path = tmp.path().join(spare_name(2));
        let err = prepare_spare(&perms, &path, &stop).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
        assert!(!path.exists());
    }

    fn read(bytes: &[u8]) -> WalFileContents {
        read_named(bytes, &file_name(1, 1))
    }

    fn read_named(bytes: &[u8], name: &str) -> WalFileContents {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(name);
        fs::write(&path, bytes).unwrap();
        read_file(&path).unwrap()
    }

    /// Frame starts, for placing damage.
    fn offsets(bytes: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut off = 0;
        while off + HEADER <= bytes.len() {
            let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) & !SEAL_FLAG;
            if len == 0 {
                break;
            }
            out.push(off);
            off += frame_len(len as usize);
        }
        out
    }

    /// A header starting in a sector's last bytes, where the written
    /// length's bytes are zeros, damaged in the next sector: corrupt, not
    /// a crash's torn write.
    #[test]
    fn a_damaged_header_whose_first_sector_holds_only_zero_length_bytes_is_corrupt() {
        for before_boundary in 1..4 {
            // A 12-byte header at SECTOR - before_boundary whose length's
            // first `before_boundary` bytes are zero: a length of 0x01000000
            // needs a payload of 16 MiB, so build the bytes by hand.
            let mut bytes = vec![b'x'; 2 * SECTOR];
            let off = SECTOR - before_boundary;
            let len: u32 = 1 << (8 * before_boundary as u32);
            let len_field = len.to_le_bytes();
            bytes[off..off + 4].copy_from_slice(&len_field);
            bytes[off + 4..off + 8].copy_from_slice(&length_check(len_field).to_le_bytes());
            bytes[off + 8..off + 12].copy_from_slice(&[1, 2, 3, 4]);
            assert!(bytes[off..SECTOR].iter().all(|&b| b == 0));
            // Damage in the second sector's part of the header.
            bytes[off + 6] ^= 0x01;
            assert!(!header_unwritten(&bytes, off), "{before_boundary}");
        }
        // A frame 4 bytes before a boundary whose length was zeroed: its
        // first sector holds only the length.
        let mut bytes = vec![b'x'; 2 * SECTOR];
        let off = SECTOR - 4;
        bytes[off..off + 4].fill(0);
        bytes[off + 4..off + 8].copy_from_slice(&length_check(1024u32.to_le_bytes()).to_le_bytes());
        assert!(!header_unwritten(&bytes, off));
    }

    /// Every frame starts 4-aligned: padded with bytes that are not zero.
    #[test]
    fn frames_are_padded_to_four_bytes_and_read_past_their_padding() {
        let key = super::super::checkpoint::Signer::generate("t").wal_seal_key();
        for n in 1..6 {
            let (mut bytes, records) = frames(n);
            let tip: [u8; 32] = hex::decode(&records[n - 1].record_hash)
                .unwrap()
                .try_into()
                .unwrap();
            append_seal(&mut bytes, &key, n as u64, &tip);
            let starts = offsets(&bytes);
            assert_eq!(starts.len(), n + 1);
            assert!(starts.iter().all(|s| s % 4 == 0), "{starts:?}");
            assert_eq!(bytes.len() % 4, 0);
            let got = read(&bytes);
            assert_eq!(got.tail, Tail::Clean);
            assert_eq!((got.records.len(), got.seals.len()), (n, 1));
        }
    }

    /// Every single-byte change to a frame's header is corrupt, whatever
    /// the bit and wherever the header falls against a sector boundary,
    /// in a preallocated file and in a plain one: a changed length must
    /// not send the reader into the zeros (or past the end) of the file,
    /// where the frame would pass for a write a crash cut short and the
    /// acknowledged records from it on would be dropped without a word.
    #[test]
    fn every_byte_changed_in_a_frame_header_is_corrupt_not_torn() {
        for pad in 0..SECTOR / 16 {
            let mut bytes = Vec::new();
            let mut r = super::super::tests::sample(0, 1_000);
            // Moves the next frames' headers across sector boundaries.
            r.query_info_query_string = "x".repeat(pad * 16 + 1);
            r.sequence = 1;
            encode_frame(&r, &mut bytes);
            for i in 1..4 {
                let mut r = super::super::tests::sample(i, 1_000);
                r.sequence = i as u64 + 1;
                encode_frame(&r, &mut bytes);
            }
            let starts = offsets(&bytes);
            let plain = bytes.clone();
            let mut preallocated = bytes;
            preallocated.resize(preallocated.len() + 4 * SECTOR, 0);
            for file in [&plain, &preallocated] {
                for frame in [1usize, 3] {
                    for at in 0..HEADER {
                        for bit in [0x01u8, 0x10, 0x80] {
                            let mut damaged = file.clone();
                            damaged[starts[frame] + at] ^= bit;
                            let got =
                                read_frames(&mut InHand::new(&damaged[..]), Format::LengthChecked)
                                    .unwrap();
                            assert!(
                                matches!(got.tail, Tail::Corrupt { frame: f, .. } if f == frame),
                                "pad {pad}, frame {frame}, header byte {at}, bit {bit:#x}: {:?}",
                                got.tail
                            );
                            assert_eq!(got.records.len(), frame);
                        }
                    }
                }
            }
        }
    }

    /// A header that straddles a sector boundary and whose second sector
    /// never reached the disk is a write cut short.
    #[test]
    fn header_cut_short_at_a_sector_boundary_is_torn() {
        let mut r = super::super::tests::sample(0, 1_000);
        r.sequence = 1;
        r.query_info_query_string = "x".into();
        let mut first = Vec::new();
        encode_frame(&r, &mut first);
        let unpadded = HEADER + u32::from_le_bytes(first[..4].try_into().unwrap()) as usize;
        // Lengthen the first record so that the second header starts 8
        // bytes before a sector boundary (frames start 4-aligned).
        let target = (unpadded / SECTOR + 1) * SECTOR - 8;
        r.query_info_query_string = "x".repeat(target - unpadded + 1);
        let mut bytes = Vec::new();
        encode_frame(&r, &mut bytes);
        assert_eq!(bytes.len(), target);
        let mut second = super::super::tests::sample(1, 1_000);
        second.sequence = 2;
        encode_frame(&second, &mut bytes);
        bytes.resize(bytes.len() + 4 * SECTOR, 0);
        bytes[target + 8..].fill(0);
        let got = read_frames(&mut InHand::new(&bytes[..]), Format::LengthChecked).unwrap();
        assert_eq!(
            got.tail,
            Tail::Torn {
                offset: target as u64
            }
        );
        assert_eq!(got.records.len(), 1);
    }

    #[test]
    fn payload_is_the_canonical_encoding_and_its_hash_is_the_record_hash() {
        let (bytes, records) = frames(3);
        let got = read(&bytes);
        assert_eq!(got.tail, Tail::Clean);
        assert_eq!(got.records, records);
        for r in &got.records {
            assert_eq!(r.compute_hash(), r.record_hash);
        }
        let len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
        assert_eq!(
            &bytes[HEADER..HEADER + len],
            records[0].canonical_bytes().as_slice()
        );
    }

    #[test]
    fn zero_filled_rest_of_a_preallocated_file_is_a_clean_end() {
        let (mut bytes, records) = frames(3);
        bytes.resize(bytes.len() + 100_000, 0);
        let got = read(&bytes);
        assert_eq!(got.tail, Tail::Clean);
        assert_eq!(got.records, records);
    }

    #[test]
    fn batch_cut_short_in_a_preallocated_file_is_torn_not_corrupt() {
        let (mut bytes, records) = frames(6);
        let starts = offsets(&bytes);
        bytes.resize(bytes.len() + 100_000, 0);
        // The sectors of the last frame from the first boundary inside its
        // payload on never reached the disk.
        let last = starts[5];
        let end =
            last + HEADER + u32::from_le_bytes(bytes[last..last + 4].try_into().unwrap()) as usize;
        let cut = (last + HEADER + SECTOR) / SECTOR * SECTOR;
        assert!(cut < end, "the sample frame spans a sector boundary");
        bytes[cut..end].fill(0);
        let got = read(&bytes);
        assert!(matches!(got.tail, Tail::Torn { .. }), "{:?}", got.tail);
        assert_eq!(got.records, records[..5]);
    }

    #[test]
    fn flipped_byte_in_a_preallocated_file_is_corrupt() {
        let (mut bytes, _) = frames(4);
        let starts = offsets(&bytes);
        bytes.resize(bytes.len() + 100_000, 0);
        for frame in [1usize, 3] {
            let mut damaged = bytes.clone();
            // Also the last frame, followed only by zeros.
            damaged[starts[frame] + HEADER + 20] ^= 0x01;
            let got = read(&damaged);
            assert!(
                matches!(got.tail, Tail::Corrupt { frame: f, .. } if f == frame),
                "{:?}",
                got.tail
            );
            assert_eq!(got.records.len(), frame);
        }
    }

    #[test]
    fn frame_running_past_the_end_of_a_plain_file_is_torn() {
        let (bytes, _) = frames(2);
        // Into the last payload, past its padding.
        let got = read(&bytes[..bytes.len() - 20]);
        assert!(matches!(got.tail, Tail::Torn { .. }), "{:?}", got.tail);
        assert_eq!(got.records.len(), 1);
    }

    /// Files of versions before the length had its checksum: read by
    /// their name's format.
    #[test]
    fn frames_from_before_the_canonical_payload_still_decode() {
        let mut r = super::super::tests::sample(0, 1_000);
        r.sequence = 1;
        r.prev_record_hash = super::super::GENESIS_HASH.into();
        r.record_hash = r.compute_hash();
        let payload = serde_json::to_vec(&r).unwrap();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let older_name = "wal-0000000001-00000000000000000001.log";
        assert_eq!(parse_name(older_name), Some((1, 1)));
        let got = read_named(&bytes, older_name);
        assert_eq!(got.tail, Tail::Clean);
        assert_eq!(got.records, vec![r.clone()]);
        // Set aside, it is still read in its format.
        let got = read_named(&bytes, &format!("{older_name}.corrupt"));
        assert_eq!(got.records, vec![r]);
    }
}
