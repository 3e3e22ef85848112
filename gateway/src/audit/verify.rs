//! `tollgate audit verify`: checks an audit directory offline, with only
//! the directory and the public key. docs/verification.md explains every
//! problem kind to the auditor.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    path::{Path, PathBuf},
};

use serde::Serialize;
use tracing::info;

use super::{
    checkpoint::{self, NoteError, Verifier},
    manifest::{Entry, Manifest, SegmentEntry},
    merkle, segment, wal, GENESIS_HASH,
};

/// What can be wrong. The names are stable: reports and docs use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    ManifestUnreadable,
    ManifestTruncated,
    ManifestUnsignedTail,
    ManifestMismatch,
    CheckpointMissing,
    CheckpointMalformed,
    CheckpointBadSignature,
    CheckpointMisnamed,
    CheckpointRootMismatch,
    CheckpointRegressed,
    CheckpointOriginMismatch,
    SegmentMissing,
    SegmentUnreadable,
    SegmentHashMismatch,
    SegmentUnlisted,
    MerkleRootMismatch,
    RecordHashMismatch,
    SequenceGap,
    ChainBroken,
    RetentionInvalid,
    WalCorrupt,
    WalChainBroken,
    WalUnreadable,
    CheckpointStale,
    SegmentUnsorted,
    RecordsSymlink,
    OriginOfAnotherStream,
    RolledBack,
}

impl Kind {
    pub fn as_str(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub kind: Kind,
    /// Path relative to the audit directory.
    pub file: String,
    /// Row in a Parquet file (from 0, file order, as DuckDB's
    /// `file_row_number`), line in the manifest (from 1), or frame in a
    /// WAL file (from 0).
    pub row: Option<u64>,
    pub sequence: Option<u64>,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Removal {
    /// When retention removed the segment (epoch ms).
    pub at: i64,
    pub retention_days: u32,
    pub path: String,
    pub first_seq: u64,
    pub last_seq: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckpointSummary {
    pub file: String,
    pub counter: u64,
    pub tree_size: u64,
    pub time_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub ok: bool,
    pub dir: String,
    pub public_key: String,
    pub segments: u64,
    pub segments_removed: u64,
    /// Records checked in segment files.
    pub records: u64,
    /// Records in the WAL not yet in a segment.
    pub wal_records: u64,
    pub first_sequence: Option<u64>,
    pub last_sequence: Option<u64>,
    pub first_time_ms: Option<i64>,
    pub last_time_ms: Option<i64>,
    pub manifest_entries: u64,
    pub checkpoints: u64,
    pub latest_checkpoint: Option<CheckpointSummary>,
    /// The origin line of the checkpoints (the stream's name).
    pub origin: Option<String>,
    pub removed_by_retention: Vec<Removal>,
    /// Things worth knowing that are not problems.
    pub notes: Vec<String>,
    pub problems: Vec<Problem>,
}

/// Problems kept in the report; beyond that only counted, so a badly
/// damaged directory still produces a readable report.
const MAX_PROBLEMS: usize = 10_000;

struct Ctx {
    report: Report,
    dropped: u64,
}

impl Ctx {
    fn problem(
        &mut self,
        kind: Kind,
        file: &str,
        row: Option<u64>,
        sequence: Option<u64>,
        detail: impl Into<String>,
    ) {
        if self.report.problems.len() >= MAX_PROBLEMS {
            self.dropped += 1;
            return;
        }
        self.report.problems.push(Problem {
            kind,
            file: file.to_string(),
            row,
            sequence,
            detail: detail.into(),
        });
    }
}

/// Where the chain is expected to continue.
struct Cursor {
    next_seq: u64,
    prev_hash: String,
}

/// Checks that need more than the directory.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Fail if the latest valid checkpoint is older than this (ms) at
    /// `now_ms`: the daemon signs one at least every
    /// `checkpoint_interval_secs`, so an old latest checkpoint on a
    /// directory collected from a running host means its tail was cut.
    pub max_checkpoint_age_ms: Option<i64>,
    pub now_ms: i64,
    /// A checkpoint of this directory kept elsewhere (shipped off the
    /// host, or from an earlier verify): the directory's history must
    /// extend the one it signs. Whoever can write the directory and
    /// restart the daemon can cut the history back to an older
    /// checkpoint and have it signed again; only a copy kept out of reach
    /// shows that.
    pub trusted_checkpoint: Option<TrustedCheckpoint>,
}

/// A checkpoint note given to verify from outside the directory.
#[derive(Debug, Clone)]
pub struct TrustedCheckpoint {
    /// Where it came from, for the report.
    pub file: String,
    pub text: String,
}

/// Verifies `dir` against the public key in the file `public_key` (as
/// written by `tollgate keygen`, `<key>.pub`).
pub fn verify_dir(dir: &Path, public_key: &Path, opts: &Options) -> anyhow::Result<Report> {
    let key = Verifier::load(public_key)?;
    Ok(verify_with(dir, &key, opts))
}

pub fn verify(dir: &Path, key: &Verifier) -> Report {
    verify_with(dir, key, &Options::default())
}

pub fn verify_with(dir: &Path, key: &Verifier, opts: &Options) -> Report {
    let mut cx = Ctx {
        report: Report {
            dir: dir.display().to_string(),
            public_key: key.text(),
            ..Default::default()
        },
        dropped: 0,
    };
    let manifest = match Manifest::read(dir) {
        Ok((m, bad)) => {
            if let Some(bad) = bad {
                cx.problem(
                    Kind::ManifestUnreadable,
                    super::manifest::FILE,
                    Some(bad.line as u64 + 1),
                    None,
                    bad.reason,
                );
            }
            m
        }
        Err(e) => {
            cx.problem(
                Kind::ManifestUnreadable,
                super::manifest::FILE,
                None,
                None,
                e.to_string(),
            );
            Manifest::default()
        }
    };
    cx.report.manifest_entries = manifest.lines.len() as u64;
    check_checkpoints(dir, key, &manifest, &mut cx);
    if let (Some(max), Some(cp)) = (opts.max_checkpoint_age_ms, &cx.report.latest_checkpoint) {
        let age = opts.now_ms - cp.time_ms.unwrap_or(i64::MIN / 2);
        if age > max {
            let file = cp.file.clone();
            cx.problem(
                Kind::CheckpointStale,
                &file,
                None,
                None,
                format!(
                    "latest checkpoint is {} s old, more than the allowed {} s",
                    age / 1000,
                    max / 1000
                ),
            );
        }
    }
    if let Some(trusted) = &opts.trusted_checkpoint {
        check_against_trusted(dir, key, &manifest, trusted, &mut cx);
    }
    // One walk of records/ serves the unlisted files and the set-aside ones.
    let records_files = files_under_records(dir);
    let cursor = check_segments(dir, &manifest, &records_files, &mut cx);
    check_wal(dir, cursor, &mut cx);
    note_set_aside(dir, records_files.as_deref().unwrap_or_default(), &mut cx);
    if cx.dropped > 0 {
        cx.report.notes.push(format!(
            "{} further problems not listed (limit {MAX_PROBLEMS})",
            cx.dropped
        ));
    }
    cx.report.ok = cx.report.problems.is_empty();
    cx.report
}

/// Manifest lines the daemon found unsigned at a start and set aside, with
/// the segment files they named (`*.parquet.unsigned-<ms>`, among
/// `records_files`): what a crash
/// between an entry and its checkpoint leaves, whose records the daemon
/// then wrote again from the WAL, or lines it did not write. Kept as
/// evidence, outside what the chain and the queries read.
fn note_set_aside(dir: &Path, records_files: &[String], cx: &mut Ctx) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("manifest.unsigned-"))
        .collect();
    files.sort();
    for name in files {
        let lines = count_lines(&dir.join(&name)).unwrap_or(0);
        cx.report.notes.push(format!(
            "{name}: {lines} manifest line(s) no checkpoint signed were set aside at a start \
             (a crash between an entry and its checkpoint, whose records were written again \
             from the WAL, or lines not written by the daemon)"
        ));
    }
    for file in records_files
        .iter()
        .filter(|f| f.contains(".parquet.unsigned-"))
    {
        cx.report.notes.push(format!(
            "{file}: a segment file an unsigned manifest line named, set aside at a start"
        ));
    }
}

/// Whether the directory's history extends the one `trusted` signs: its
/// manifest begins with the entries that checkpoint signs, its newest
/// checkpoint is no older, and a checkpoint it holds under the trusted
/// one's counter is that same checkpoint (a history cut back and signed
/// again reuses counters).
fn check_against_trusted(
    dir: &Path,
    key: &Verifier,
    manifest: &Manifest,
    trusted: &TrustedCheckpoint,
    cx: &mut Ctx,
) {
    let file = trusted.file.as_str();
    let cp = match checkpoint::open_note(&trusted.text, key) {
        Ok(cp) => cp,
        Err(NoteError::BadSignature) => {
            let detail = format!(
                "the trusted checkpoint has no valid signature by {}",
                key.name
            );
            cx.problem(Kind::CheckpointBadSignature, file, None, None, detail);
            return;
        }
        Err(NoteError::Malformed(m)) => {
            cx.problem(Kind::CheckpointMalformed, file, None, None, m);
            return;
        }
    };
    let mut found = Vec::new();
    if let Some(origin) = cx.report.origin.as_ref().filter(|o| **o != cp.origin) {
        found.push(format!(
            "it is a checkpoint of {:?}, and the directory's checkpoints are of {origin:?}",
            cp.origin
        ));
    }
    let lines = manifest.lines.len() as u64;
    if cp.size > lines {
        found.push(format!(
            "it signs {} manifest entries and the manifest has {lines}: entries it vouches for were removed",
            cp.size
        ));
    } else if manifest.prefix_roots(&[cp.size]).get(&cp.size) != Some(&cp.root) {
        found.push(format!(
            "the first {} manifest entries do not hash to the root it signs: the history it vouches for was rewritten",
            cp.size
        ));
    }
    match &cx.report.latest_checkpoint {
        Some(latest) if Some(latest.counter) < cp.counter || latest.time_ms < cp.time_ms => {
            found.push(format!(
                "the directory's newest checkpoint ({}: counter {}, time {:?}) is older than this one (counter {:?}, time {:?}): newer checkpoints were removed",
                latest.file, latest.counter, latest.time_ms, cp.counter, cp.time_ms
            ))
        }
        Some(_) => {}
        None => found.push("the directory has no valid checkpoint to compare with it".into()),
    }
    if let Some(counter) = cp.counter {
        let here = dir.join("checkpoints").join(checkpoint::file_name(counter));
        let same = checkpoint::read_note(&here)
            .ok()
            .and_then(|text| checkpoint::open_note(&text, key).ok());
        if same.is_some_and(|same| same != cp) {
            found.push(format!(
                "checkpoints/{} signs another history under the same counter: the counter was used again after the history was cut back",
                checkpoint::file_name(counter)
            ));
        }
    }
    for detail in found {
        cx.problem(Kind::RolledBack, file, None, None, detail);
    }
}

/// Whether the checkpoints' origin names the stream the directory holds.
/// A directory's two streams, its audit records and its evidence
/// (`{dir}/evidence`), are signed with one key: the evidence stream's
/// origin ends in `/evidence`, the audit stream's does not, so that one's
/// files put in place of the other's do not verify.
fn check_stream(cx: &mut Ctx, dir: &Path, file: &str, origin: &str) {
    let evidence_dir = dir.file_name().is_some_and(|name| name == "evidence")
        && dir
            .parent()
            .is_some_and(|parent| parent.join("wal").is_dir());
    let evidence_origin = origin.ends_with(super::EVIDENCE_ORIGIN_SUFFIX);
    if evidence_dir != evidence_origin {
        let (held, named) = match evidence_dir {
            true => ("an evidence stream", "not an evidence stream's"),
            false => ("an audit stream", "an evidence stream's"),
        };
        cx.problem(
            Kind::OriginOfAnotherStream,
            file,
            None,
            None,
            format!(
                "this directory holds {held}, but its checkpoints' origin {origin:?} is {named}"
            ),
        );
    }
}

fn check_checkpoints(dir: &Path, key: &Verifier, manifest: &Manifest, cx: &mut Ctx) {
    let cp_dir = dir.join("checkpoints");
    let files = match checkpoint::list(&cp_dir) {
        Ok(f) => f,
        Err(e) => {
            cx.problem(
                Kind::CheckpointMissing,
                "checkpoints",
                None,
                None,
                e.to_string(),
            );
            return;
        }
    };
    cx.report.checkpoints = files.len() as u64;
    let lines = manifest.lines.len() as u64;
    let mut origin: Option<String> = None;
    let mut last_valid: Option<CheckpointSummary> = None;
    let mut prev: Option<(u64, Option<i64>, String)> = None;
    // Signatures first, then the roots of every signed manifest prefix in
    // one pass over the manifest (thousands of checkpoints over millions
    // of lines must not mean thousands of passes).
    let mut opened = Vec::with_capacity(files.len());
    for (counter, path) in files {
        let rel = format!("checkpoints/{}", checkpoint::file_name(counter));
        let text = match checkpoint::read_note(&path) {
            Ok(t) => t,
            Err(e) => {
                cx.problem(Kind::CheckpointMalformed, &rel, None, None, e.to_string());
                continue;
            }
        };
        match checkpoint::open_note(&text, key) {
            Ok(cp) => opened.push((counter, rel, cp)),
            Err(NoteError::BadSignature) => cx.problem(
                Kind::CheckpointBadSignature,
                &rel,
                None,
                None,
                format!("no valid signature by {}", key.name),
            ),
            Err(NoteError::Malformed(m)) => {
                cx.problem(Kind::CheckpointMalformed, &rel, None, None, m)
            }
        }
    }
    let sizes: Vec<u64> = opened.iter().map(|(_, _, cp)| cp.size).collect();
    let roots: HashMap<u64, merkle::Hash> = manifest.prefix_roots(&sizes);
    for (counter, rel, cp) in opened {
        if cp.counter != Some(counter) {
            cx.problem(
                Kind::CheckpointMisnamed,
                &rel,
                None,
                None,
                format!(
                    "file is checkpoint {counter} but its signed body says {:?}: an older checkpoint put in its place?",
                    cp.counter
                ),
            );
            continue;
        }
        match &origin {
            None => {
                origin = Some(cp.origin.clone());
                cx.report.origin = Some(cp.origin.clone());
                check_stream(cx, dir, &rel, &cp.origin);
            }
            Some(o) if *o != cp.origin => cx.problem(
                Kind::CheckpointOriginMismatch,
                &rel,
                None,
                None,
                format!("origin {:?}, earlier checkpoints {:?}", cp.origin, o),
            ),
            Some(_) => {}
        }
        if cp.size > lines {
            cx.problem(
                Kind::ManifestTruncated,
                super::manifest::FILE,
                Some(lines + 1),
                None,
                format!(
                    "{rel} signs {} manifest entries, the manifest has {lines}",
                    cp.size
                ),
            );
        } else {
            if roots.get(&cp.size) != Some(&cp.root) {
                cx.problem(
                    Kind::CheckpointRootMismatch,
                    &rel,
                    None,
                    None,
                    format!(
                        "the first {} manifest entries do not hash to the signed root: an entry was changed",
                        cp.size
                    ),
                );
            }
        }
        if let Some((psize, ptime, pfile)) = &prev {
            if cp.size < *psize || cp.time_ms < *ptime {
                cx.problem(
                    Kind::CheckpointRegressed,
                    &rel,
                    None,
                    None,
                    format!(
                        "size {} time {:?} is behind {pfile} (size {psize} time {ptime:?})",
                        cp.size, cp.time_ms
                    ),
                );
            }
        }
        prev = Some((cp.size, cp.time_ms, rel.clone()));
        last_valid = Some(CheckpointSummary {
            file: rel,
            counter,
            tree_size: cp.size,
            time_ms: cp.time_ms,
        });
    }
    match &last_valid {
        None => cx.problem(
            Kind::CheckpointMissing,
            "checkpoints",
            None,
            None,
            "no valid checkpoint: nothing vouches for the manifest",
        ),
        Some(cp) if cp.tree_size < lines => cx.problem(
            Kind::ManifestUnsignedTail,
            super::manifest::FILE,
            Some(cp.tree_size + 1),
            None,
            format!(
                "entries {}..{lines} are not covered by the latest checkpoint {}",
                cp.tree_size + 1,
                cp.file
            ),
        ),
        Some(_) => {}
    }
    cx.report.latest_checkpoint = last_valid;
}

fn check_segments(
    dir: &Path,
    manifest: &Manifest,
    records_files: &io::Result<Vec<String>>,
    cx: &mut Ctx,
) -> Cursor {
    let mut cur = Cursor {
        next_seq: 1,
        prev_hash: GENESIS_HASH.to_string(),
    };
    // Which manifest lines retention removed, and when.
    let mut removed: HashMap<u64, (i64, u32)> = HashMap::new();
    for (i, e) in manifest.entries.iter().enumerate() {
        if let Entry::Retention(r) = e {
            for s in &r.removed {
                let target = manifest.entries.get(s.line as usize);
                let valid = s.line < i as u64
                    && matches!(target, Some(Entry::Segment(t)) if t.path == s.path && t.first_seq == s.first_seq && t.last_seq == s.last_seq);
                if !valid {
                    cx.problem(
                        Kind::RetentionInvalid,
                        super::manifest::FILE,
                        Some(i as u64 + 1),
                        None,
                        format!(
                            "removes line {} ({}), which is not that segment",
                            s.line + 1,
                            s.path
                        ),
                    );
                    continue;
                }
                // Saturating: these are signed, but a day count near the limit must
                // not wrap round into an early expiry.
                let expires = s
                    .last_time
                    .saturating_add(i64::from(r.retention_days).saturating_mul(86_400_000));
                if expires > r.at {
                    cx.problem(
                        Kind::RetentionInvalid,
                        super::manifest::FILE,
                        Some(i as u64 + 1),
                        Some(s.first_seq),
                        format!(
                            "removes {} before it expired ({} days after its newest record)",
                            s.path, r.retention_days
                        ),
                    );
                }
                removed.insert(s.line, (r.at, r.retention_days));
                cx.report.removed_by_retention.push(super::verify::Removal {
                    at: r.at,
                    retention_days: r.retention_days,
                    path: s.path.clone(),
                    first_seq: s.first_seq,
                    last_seq: s.last_seq,
                });
            }
        }
    }
    let mut listed: HashSet<String> = HashSet::new();
    let total = manifest.entries.len();
    for (i, e) in manifest.entries.iter().enumerate() {
        let Entry::Segment(s) = e else { continue };
        listed.insert(s.path.clone());
        if i > 0 && i % 100 == 0 {
            info!(entry = i, of = total, "verifying segments");
        }
        let line = i as u64 + 1;
        if cx.report.first_sequence.is_none() {
            cx.report.first_sequence = Some(s.first_seq);
        }
        // Continuity between segments is checked on the manifest's own
        // fields, so it holds across segments removed by retention.
        if s.first_seq != cur.next_seq {
            cx.problem(
                Kind::SequenceGap,
                super::manifest::FILE,
                Some(line),
                Some(s.first_seq),
                format!(
                    "{} starts at sequence {}, expected {}",
                    s.path, s.first_seq, cur.next_seq
                ),
            );
        } else if s.first_prev_hash != cur.prev_hash {
            cx.problem(
                Kind::ChainBroken,
                super::manifest::FILE,
                Some(line),
                Some(s.first_seq),
                format!("{} does not link to the segment before it", s.path),
            );
        }
        if removed.contains_key(&(i as u64)) {
            cx.report.segments_removed += 1;
            let left = dir.join(&s.path);
            if left.exists() {
                // Retention signs the removal, then deletes: a crash in
                // between leaves the file as it was. Anything else at that
                // path was put there, and queries over `records/` read it.
                match signed_size(&left, s).and_then(|()| segment::file_sha256(&left)) {
                    Ok(h) if h == s.sha256 => cx.report.notes.push(format!(
                        "{} was removed by retention but is still on disk (deletion pending)",
                        s.path
                    )),
                    // Deleted since it was seen (a live directory).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    _ => cx.problem(
                        Kind::SegmentHashMismatch,
                        &s.path,
                        None,
                        None,
                        "a file where retention removed a segment is not that segment",
                    ),
                }
            }
        } else {
            cx.report.segments += 1;
            check_segment_file(dir, s, cx);
        }
        cx.report.first_time_ms = Some(
            cx.report
                .first_time_ms
                .map_or(s.first_time, |t| t.min(s.first_time)),
        );
        cx.report.last_time_ms = Some(
            cx.report
                .last_time_ms
                .map_or(s.last_time, |t| t.max(s.last_time)),
        );
        cx.report.last_sequence = Some(s.last_seq);
        cur = Cursor {
            next_seq: s.last_seq.saturating_add(1),
            prev_hash: s.last_record_hash.clone(),
        };
    }
    match records_files {
        Ok(files) => {
            for f in files {
                let link = fs::symlink_metadata(dir.join(f)).is_ok_and(|m| m.is_symlink());
                if link {
                    cx.problem(
                        Kind::RecordsSymlink,
                        f,
                        None,
                        None,
                        "a symlink under records/: queries over records/**/*.parquet do not \
                         follow it, so whatever it leads to is not what analysts read",
                    );
                }
            }
            for f in files.iter().filter(|f| f.ends_with(".parquet")) {
                if !listed.contains(f) {
                    cx.problem(
                        Kind::SegmentUnlisted,
                        f,
                        None,
                        None,
                        "segment file that no manifest entry names",
                    );
                }
            }
        }
        Err(e) => cx.problem(
            Kind::SegmentUnreadable,
            "records",
            None,
            None,
            e.to_string(),
        ),
    }
    cur
}

/// The whole lines of a manifest file set aside, up to the first that is
/// longer than any the daemon writes or holds a zero byte (what follows is
/// not counted: a sparse file of terabytes would otherwise be read to its
/// end).
fn count_lines(path: &Path) -> io::Result<usize> {
    let mut reader = io::BufReader::new(super::fsutil::open_regular(path)?);
    let (mut lines, mut line) = (0, Vec::new());
    loop {
        line.clear();
        match super::manifest::read_line(&mut reader, &mut line, super::manifest::MAX_LINE_BYTES)? {
            super::manifest::LineEnd::Newline => lines += 1,
            _ => return Ok(lines),
        }
    }
}

/// Every file under `records/`, at any depth, as paths relative to `dir`:
/// the daemon writes one level of day directories, but the documented
/// queries read `records/**/*.parquet`, so a Parquet file anywhere there is
/// one an analyst would read.
pub(crate) fn files_under_records(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.join("records")];
    while let Some(folder) = todo.pop() {
        let entries = match fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                todo.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// How much longer than its entry says a listed segment may be and still
/// be read (to locate the rows an edit changed): a rewritten segment is
/// about as long as the original.
const SEGMENT_GROWTH_READ: u64 = 64 << 20;

/// Checks that `path`, a listed segment, is not far longer than its entry
/// says, before it is hashed or decoded: a file made huge (a sparse one
/// costs no disk) is reported at once instead of read for hours or into
/// all memory. A small difference is left to the checks that locate it.
fn signed_size(path: &Path, s: &SegmentEntry) -> io::Result<()> {
    let len = fs::metadata(path)?.len();
    if len
        > s.bytes
            .saturating_mul(2)
            .max(s.bytes.saturating_add(SEGMENT_GROWTH_READ))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the file is {len} bytes, the manifest says {}: not read",
                s.bytes
            ),
        ));
    }
    Ok(())
}

/// The first symlink on the way from `dir` to its listed file `relative`
/// (the file itself included), as a path relative to `dir`: the daemon
/// writes none, and DuckDB's `**` does not follow them, so a segment read
/// through one is not what analysts read.
fn symlink_on_the_way(dir: &Path, relative: &str) -> Option<String> {
    let mut at = dir.to_path_buf();
    let mut shown = PathBuf::new();
    for part in Path::new(relative).components() {
        at.push(part);
        shown.push(part);
        if fs::symlink_metadata(&at).is_ok_and(|m| m.is_symlink()) {
            return Some(shown.to_string_lossy().into_owned());
        }
    }
    None
}

fn check_segment_file(dir: &Path, s: &SegmentEntry, cx: &mut Ctx) {
    let path = dir.join(&s.path);
    if let Some(link) = symlink_on_the_way(dir, &s.path) {
        cx.problem(
            Kind::RecordsSymlink,
            &s.path,
            None,
            Some(s.first_seq),
            format!("reached through the symlink {link}: not read"),
        );
        return;
    }
    if !path.exists() {
        cx.problem(
            Kind::SegmentMissing,
            &s.path,
            None,
            Some(s.first_seq),
            format!(
                "records {}..{} are gone and were not removed by retention",
                s.first_seq, s.last_seq
            ),
        );
        return;
    }
    if let Err(e) = signed_size(&path, s) {
        cx.problem(
            Kind::SegmentHashMismatch,
            &s.path,
            None,
            None,
            format!("file bytes differ from the manifest: {e}"),
        );
        return;
    }
    let records = match segment::read_file(&path) {
        Ok(r) => r,
        Err(e) => {
            cx.problem(Kind::SegmentUnreadable, &s.path, None, None, e.to_string());
            if let Ok(h) = segment::file_sha256(&path) {
                if h != s.sha256 {
                    cx.problem(
                        Kind::SegmentHashMismatch,
                        &s.path,
                        None,
                        None,
                        "file bytes differ from the manifest",
                    );
                }
            }
            return;
        }
    };
    cx.report.records += records.len() as u64;
    // Rows are stored by time, ties by sequence: readers skip by the
    // file's zone maps and sorting columns, which assume it.
    if let Some(row) = records
        .windows(2)
        .position(|w| (w[0].time, w[0].sequence) >= (w[1].time, w[1].sequence))
    {
        let (before, after) = (&records[row], &records[row + 1]);
        cx.problem(
            Kind::SegmentUnsorted,
            &s.path,
            Some(row as u64 + 1),
            Some(after.sequence),
            format!(
                "rows are not in (time, sequence) order: time {} sequence {} after time {} sequence {}",
                after.time, after.sequence, before.time, before.sequence
            ),
        );
    }
    // The chain runs by sequence.
    let mut order: Vec<(usize, &super::AuditRecord)> = records.iter().enumerate().collect();
    order.sort_by_key(|(_, r)| r.sequence);
    let mut next = s.first_seq;
    let mut prev = s.first_prev_hash.clone();
    let mut leaves = Vec::with_capacity(order.len());
    for (row, r) in &order {
        let row = *row as u64;
        if r.compute_hash() != r.record_hash {
            cx.problem(
                Kind::RecordHashMismatch,
                &s.path,
                Some(row),
                Some(r.sequence),
                "the row's content does not match its record_hash: the row was altered",
            );
        }
        if r.sequence != next {
            cx.problem(
                Kind::SequenceGap,
                &s.path,
                Some(row),
                Some(r.sequence),
                format!("sequence {} where {next} was expected", r.sequence),
            );
        } else if r.prev_record_hash != prev {
            cx.problem(
                Kind::ChainBroken,
                &s.path,
                Some(row),
                Some(r.sequence),
                "prev_record_hash does not match the previous record",
            );
        }
        next = r.sequence.saturating_add(1);
        prev = r.record_hash.clone();
        let h: Option<[u8; 32]> = hex::decode(&r.record_hash)
            .ok()
            .and_then(|v| v.try_into().ok());
        leaves.push(merkle::leaf_hash(&h.unwrap_or([0u8; 32])));
    }
    let root = hex::encode(merkle::root_from_leaf_hashes(&leaves));
    if root != s.merkle_root {
        cx.problem(
            Kind::MerkleRootMismatch,
            &s.path,
            None,
            None,
            "the records' hashes do not give the manifest's Merkle root",
        );
    }
    let first_time = records.iter().map(|r| r.time).min();
    let last_time = records.iter().map(|r| r.time).max();
    let mut mismatches = Vec::new();
    if records.len() as u64 != s.record_count {
        mismatches.push(format!(
            "{} rows, manifest says {}",
            records.len(),
            s.record_count
        ));
    }
    if order.last().map(|(_, r)| r.sequence) != Some(s.last_seq) {
        mismatches.push(format!("last sequence is not {}", s.last_seq));
    }
    if order.last().map(|(_, r)| r.record_hash.as_str()) != Some(s.last_record_hash.as_str()) {
        mismatches.push("last record hash differs".into());
    }
    if first_time != Some(s.first_time) || last_time != Some(s.last_time) {
        mismatches.push("time range differs".into());
    }
    if !mismatches.is_empty() {
        cx.problem(
            Kind::ManifestMismatch,
            &s.path,
            None,
            None,
            mismatches.join("; "),
        );
    }
    // Checked last so that, for an altered row, the report's first problem
    // names the row.
    match segment::file_sha256(&path) {
        Ok(h) if h == s.sha256 => {}
        Ok(_) => cx.problem(
            Kind::SegmentHashMismatch,
            &s.path,
            None,
            None,
            "file bytes differ from the manifest",
        ),
        Err(e) => cx.problem(Kind::SegmentUnreadable, &s.path, None, None, e.to_string()),
    }
}

fn check_wal(dir: &Path, mut cur: Cursor, cx: &mut Ctx) {
    let wal_dir = dir.join("wal");
    let files = match wal::list(&wal_dir) {
        Ok(f) => f,
        Err(e) => {
            cx.problem(Kind::WalUnreadable, "wal", None, None, e.to_string());
            return;
        }
    };
    if let Ok(rd) = fs::read_dir(&wal_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.ends_with(".unsealed") {
                // A crash can cut a batch before its seal; so can a
                // forger, who cannot make one. Neither was replayed.
                cx.report.notes.push(format!(
                    "wal/{name}: set aside at recovery: it holds records no seal covers (a batch \
                     cut short by a crash, never acknowledged, or records tollgate did not \
                     write); they were not replayed"
                ));
            }
            if name.ends_with(".corrupt") {
                // Acknowledged records after the damage may be missing from
                // the chain: a problem, not a note.
                cx.problem(
                    Kind::WalCorrupt,
                    &format!("wal/{name}"),
                    None,
                    None,
                    "set aside at recovery: it did not continue the chain (corrupt frame or gap)",
                );
            }
        }
    }
    let mut merged: Vec<(String, u64, super::AuditRecord)> = Vec::new();
    for (_, first_seq, path) in files {
        let rel = format!(
            "wal/{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        let contents = match wal::read_file(&path) {
            Ok(c) => c,
            Err(e) => {
                cx.problem(Kind::WalUnreadable, &rel, None, None, e.to_string());
                continue;
            }
        };
        match &contents.tail {
            wal::Tail::Clean => {}
            wal::Tail::Torn { offset } => cx.report.notes.push(format!(
                "{rel} ends in an incomplete frame at byte {offset} (a write cut short; never acknowledged)"
            )),
            wal::Tail::Corrupt {
                offset,
                frame,
                reason,
            } => cx.problem(
                Kind::WalCorrupt,
                &rel,
                Some(*frame as u64),
                None,
                format!("{reason} at byte {offset}"),
            ),
        }
        // Same superseding rule as recovery (wal::read_all).
        merged.retain(|(_, _, r)| r.sequence < first_seq);
        for (i, r) in contents.records.into_iter().enumerate() {
            merged.push((rel.clone(), i as u64, r));
        }
    }
    for (file, frame, r) in merged {
        if r.sequence < cur.next_seq {
            continue; // already in a segment; the file awaits deletion
        }
        let ok = r.sequence == cur.next_seq
            && r.prev_record_hash == cur.prev_hash
            && r.compute_hash() == r.record_hash;
        if !ok {
            cx.problem(
                Kind::WalChainBroken,
                &file,
                Some(frame),
                Some(r.sequence),
                format!(
                    "WAL record does not continue the chain at sequence {}",
                    cur.next_seq
                ),
            );
        }
        cx.report.wal_records += 1;
        cx.report.last_sequence = Some(r.sequence);
        cx.report.first_time_ms = Some(cx.report.first_time_ms.map_or(r.time, |t| t.min(r.time)));
        cx.report.last_time_ms = Some(cx.report.last_time_ms.map_or(r.time, |t| t.max(r.time)));
        // From an unsigned WAL frame: any number, u64::MAX included.
        cur.next_seq = r.sequence.saturating_add(1);
        cur.prev_hash = r.record_hash;
    }
    if cx.report.wal_records > 0 {
        cx.report.notes.push(format!(
            "{} records are only in the WAL: their chain is checked here; the seals \
             that authenticate them need the daemon's secret key and are checked \
             when it next starts",
            cx.report.wal_records
        ));
    }
}

fn fmt_time(ms: Option<i64>) -> String {
    ms.and_then(|ms| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
    })
    .and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_else(|| "-".into())
}

/// The human summary `audit verify` prints.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    let status = if r.ok {
        "OK".to_string()
    } else {
        format!("FAILED ({} problems)", r.problems.len())
    };
    s.push_str(&format!("audit directory {}: {status}\n", shown(&r.dir)));
    s.push_str(&format!(
        "segments: {} ({} removed by retention), records: {} in segments + {} in WAL, sequences {}..{}\n",
        r.segments,
        r.segments_removed,
        r.records,
        r.wal_records,
        r.first_sequence.map_or("-".into(), |v| v.to_string()),
        r.last_sequence.map_or("-".into(), |v| v.to_string()),
    ));
    s.push_str(&format!(
        "time span: {} .. {}\n",
        fmt_time(r.first_time_ms),
        fmt_time(r.last_time_ms)
    ));
    if let Some(origin) = &r.origin {
        s.push_str(&format!("origin: {origin}\n"));
    }
    match &r.latest_checkpoint {
        Some(c) => s.push_str(&format!(
            "latest checkpoint: {} covers {} of {} manifest entries, signed {}\n",
            shown(&c.file),
            c.tree_size,
            r.manifest_entries,
            fmt_time(c.time_ms)
        )),
        None => s.push_str("latest checkpoint: none valid\n"),
    }
    for rm in &r.removed_by_retention {
        s.push_str(&format!(
            "removed by retention ({} days) at {}: {} (sequences {}..{})\n",
            rm.retention_days,
            fmt_time(Some(rm.at)),
            shown(&rm.path),
            rm.first_seq,
            rm.last_seq
        ));
    }
    for n in &r.notes {
        s.push_str(&format!("note: {}\n", shown(n)));
    }
    if let Some(p) = r.problems.first() {
        s.push_str(&format!(
            "first problem: {} in {}{}{}: {}\n",
            p.kind.as_str(),
            shown(&p.file),
            p.row.map_or(String::new(), |r| format!(" row {r}")),
            p.sequence
                .map_or(String::new(), |q| format!(" (sequence {q})")),
            shown(&p.detail)
        ));
    }
    s
}

/// `text` with its control characters escaped (`\u{1b}`): file names in
/// the audit directory are anyone's who could write it, and a terminal
/// would act on an escape sequence in one (move the cursor up, erase the
/// FAILED line, hide what follows). The JSON report escapes them anyway.
fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| match c.is_control() {
            true => c.escape_unicode().to_string(),
            false => c.to_string(),
        })
        .collect::<String>()
        .into()
}
