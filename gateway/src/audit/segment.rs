//! Parquet segments: one closed, immutable file per cut of the WAL.
//!
//! Every [`AuditRecord`] field is a typed top-level column of the same name
//! so DuckDB zone maps and bloom filters work on it. The column list below
//! is the single place that maps fields to columns; a test checks it
//! against the record's fields so a new field cannot be forgotten.

use std::{
    fs::File,
    io::{self, Write},
    path::Path,
    sync::Arc,
};

use arrow_array::{
    builder::{Int32Builder, Int64Builder, ListBuilder, StringBuilder},
    Array, ArrayRef, Int32Array, Int64Array, ListArray, RecordBatch, StringArray,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::{
    arrow::{arrow_reader::ParquetRecordBatchReaderBuilder, ArrowWriter},
    basic::{Compression, Encoding, ZstdLevel},
    file::{
        metadata::{KeyValue, SortingColumn},
        properties::{EnabledStatistics, WriterProperties},
    },
    schema::types::ColumnPath,
};
use sha2::{Digest, Sha256};

use std::borrow::Borrow;

use super::AuditRecord;

/// Version of the record hashing rules (and column conventions), stored as
/// Parquet key/value metadata. Adding a column does not change it (see
/// `AuditRecord::canonical_bytes`); changing how records hash does.
pub const SCHEMA_VERSION: &str = "3";

/// Columns with a bloom filter: the identity and target columns analysts
/// look up by equality.
pub const BLOOM_COLUMNS: &[&str] = &[
    "actor_user_uid",
    "actor_user_name",
    "actor_app_uid",
    "actor_session_credential_uid",
    "dst_endpoint_name",
    "dst_endpoint_ip",
    "session_uid",
    "request_uid",
    "database_name",
    "database_user",
    "policy_uid",
];

/// Whether a column gets min/max statistics: only numbers (times,
/// sequences, counts, codes), whose ranges analysts filter by. Text is
/// looked up by equality (the identity and target columns have bloom
/// filters) or by pattern, where a min/max skips nothing; computing them
/// costs a byte comparison per value, the largest single cost of encoding
/// a segment.
fn has_statistics(data_type: &arrow_schema::DataType) -> bool {
    data_type.is_numeric()
}

/// The Parquet leaf columns of the fields without statistics. A list's
/// values live in a leaf below its field (`name.list.item`), and that is
/// where the writer's settings apply.
/// Worked out once: the schema is fixed, and every segment asks.
fn columns_without_statistics() -> &'static [ColumnPath] {
    static COLUMNS: std::sync::OnceLock<Vec<ColumnPath>> = std::sync::OnceLock::new();
    COLUMNS.get_or_init(|| {
        let schema = schema();
        let Ok(parquet_schema) = parquet::arrow::ArrowSchemaConverter::new().convert(&schema)
        else {
            return Vec::new();
        };
        (0..parquet_schema.num_columns())
            .filter(|&i| {
                let root = parquet_schema.get_column_root(i).name();
                schema
                    .field_with_name(root)
                    .is_ok_and(|field| !has_statistics(field.data_type()))
            })
            .map(|i| parquet_schema.column(i).path().clone())
            .collect()
    })
}

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("column {column}: {reason}")]
    Column { column: String, reason: String },
    /// The decoder panicked instead of returning an error.
    #[error("the Parquet decoder failed on this file: {0}")]
    DecoderFailed(String),
}

fn col_err(column: &str, reason: impl Into<String>) -> SegmentError {
    SegmentError::Column {
        column: column.to_string(),
        reason: reason.into(),
    }
}

fn list_type() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true)))
}

// Column kinds: how a field type maps to Arrow.
macro_rules! kind_field {
    (seq, $n:expr) => {
        Field::new($n, DataType::Int64, false)
    };
    (str, $n:expr) => {
        Field::new($n, DataType::Utf8, false)
    };
    (i32, $n:expr) => {
        Field::new($n, DataType::Int32, false)
    };
    (i64, $n:expr) => {
        Field::new($n, DataType::Int64, false)
    };
    (oi32, $n:expr) => {
        Field::new($n, DataType::Int32, true)
    };
    (oi64, $n:expr) => {
        Field::new($n, DataType::Int64, true)
    };
    (strs, $n:expr) => {
        Field::new($n, list_type(), false)
    };
    (link, $n:expr) => {
        Field::new($n, DataType::Utf8, true)
    };
}

// Building a batch: one builder per column, filled a row at a time, so
// each record (a struct of pointers to strings spread over the heap, cold
// by the time its segment is written) is read once, rather than once per
// column.
macro_rules! kind_builder {
    (seq, $n:expr) => {
        Vec::<i64>::with_capacity($n)
    };
    // A guess at the bytes: the builder grows as needed.
    (str, $n:expr) => {
        StringBuilder::with_capacity($n, $n * 16)
    };
    // Usually one link a slice (see `links_to_keep`).
    (link, $n:expr) => {
        StringBuilder::with_capacity($n, 64)
    };
    (i32, $n:expr) => {
        Vec::<i32>::with_capacity($n)
    };
    (i64, $n:expr) => {
        Vec::<i64>::with_capacity($n)
    };
    (oi32, $n:expr) => {
        Int32Builder::with_capacity($n)
    };
    (oi64, $n:expr) => {
        Int64Builder::with_capacity($n)
    };
    (strs, $n:expr) => {
        ListBuilder::with_capacity(StringBuilder::new(), $n)
    };
}

macro_rules! kind_push {
    // The link is stored only where `keep` says (see `links_to_keep`).
    (link, $b:ident, $r:expr, $keep:expr) => {
        $b.append_option($keep.then_some($r.$b.as_str()))
    };
    (seq, $b:ident, $r:expr, $keep:expr) => {
        $b.push($r.$b as i64)
    };
    (str, $b:ident, $r:expr, $keep:expr) => {
        $b.append_value(&$r.$b)
    };
    (i32, $b:ident, $r:expr, $keep:expr) => {
        $b.push($r.$b)
    };
    (i64, $b:ident, $r:expr, $keep:expr) => {
        $b.push($r.$b)
    };
    (oi32, $b:ident, $r:expr, $keep:expr) => {
        $b.append_option($r.$b)
    };
    (oi64, $b:ident, $r:expr, $keep:expr) => {
        $b.append_option($r.$b)
    };
    (strs, $b:ident, $r:expr, $keep:expr) => {{
        for v in $r.$b.iter() {
            $b.values().append_value(v);
        }
        $b.append(true);
    }};
}

// The first cache line of a field's heap data (a string's bytes, a list's
// items), fetched ahead of the row that reads it; nothing for numbers, nor
// for an empty value, whose pointer points nowhere.
macro_rules! kind_prefetch {
    (str, $r:expr, $f:ident) => {
        if !$r.$f.is_empty() {
            prefetch($r.$f.as_ptr())
        }
    };
    (link, $r:expr, $f:ident) => {
        kind_prefetch!(str, $r, $f)
    };
    (strs, $r:expr, $f:ident) => {
        if !$r.$f.is_empty() {
            prefetch($r.$f.as_ptr().cast())
        }
    };
    ($k:ident, $r:expr, $f:ident) => {
        ()
    };
}

/// Starts loading the cache line at `p` without waiting for it.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint: it never faults and has no
    // effect a program can see, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Starts loading every cache line of a record's own struct.
#[inline(always)]
fn prefetch_record(r: &AuditRecord) {
    let base = (r as *const AuditRecord).cast::<u8>();
    for line in (0..std::mem::size_of::<AuditRecord>()).step_by(64) {
        prefetch(base.wrapping_add(line));
    }
}

/// How many rows ahead `to_batch` fetches: a record's struct this far
/// ahead, then, once that has arrived, the heap data it points to half as
/// far ahead.
const PREFETCH_ROWS: usize = 8;

macro_rules! kind_finish {
    (seq, $b:ident) => {
        Arc::new(Int64Array::from($b)) as ArrayRef
    };
    (i32, $b:ident) => {
        Arc::new(Int32Array::from($b)) as ArrayRef
    };
    (i64, $b:ident) => {
        Arc::new(Int64Array::from($b)) as ArrayRef
    };
    ($k:ident, $b:ident) => {
        Arc::new($b.finish()) as ArrayRef
    };
}

/// A column by name. `None` when the file predates the column: the field
/// keeps its empty default, which is also what the canonical encoding
/// assumes for records written before the field existed.
fn column<'a, T: 'static>(
    batch: &'a RecordBatch,
    name: &str,
) -> Result<Option<&'a T>, SegmentError> {
    let Some(c) = batch.column_by_name(name) else {
        return Ok(None);
    };
    c.as_any()
        .downcast_ref::<T>()
        .map(Some)
        .ok_or_else(|| col_err(name, "unexpected type"))
}

fn not_null(a: &dyn Array, name: &str, row: usize) -> Result<(), SegmentError> {
    if a.is_null(row) {
        return Err(col_err(name, format!("null in row {row}")));
    }
    Ok(())
}

macro_rules! kind_read {
    // The link is stored only where it cannot be restored from the row
    // before (see `to_batch`); NULL reads as empty and `read_file` fills it.
    (link, $b:expr, $out:expr, $f:ident) => {{
        if let Some(a) = column::<StringArray>($b, stringify!($f))? {
            for (i, r) in $out.iter_mut().enumerate() {
                if !a.is_null(i) {
                    r.$f = a.value(i).to_string();
                }
            }
        }
    }};
    (seq, $b:expr, $out:expr, $f:ident) => {{
        let n = stringify!($f);
        if let Some(a) = column::<Int64Array>($b, n)? {
            for (i, r) in $out.iter_mut().enumerate() {
                not_null(a, n, i)?;
                r.$f = u64::try_from(a.value(i)).map_err(|_| col_err(n, "negative"))?;
            }
        }
    }};
    (str, $b:expr, $out:expr, $f:ident) => {{
        let n = stringify!($f);
        if let Some(a) = column::<StringArray>($b, n)? {
            for (i, r) in $out.iter_mut().enumerate() {
                not_null(a, n, i)?;
                r.$f = a.value(i).into();
            }
        }
    }};
    (i32, $b:expr, $out:expr, $f:ident) => {{
        let n = stringify!($f);
        if let Some(a) = column::<Int32Array>($b, n)? {
            for (i, r) in $out.iter_mut().enumerate() {
                not_null(a, n, i)?;
                r.$f = a.value(i);
            }
        }
    }};
    (i64, $b:expr, $out:expr, $f:ident) => {{
        let n = stringify!($f);
        if let Some(a) = column::<Int64Array>($b, n)? {
            for (i, r) in $out.iter_mut().enumerate() {
                not_null(a, n, i)?;
                r.$f = a.value(i);
            }
        }
    }};
    (oi32, $b:expr, $out:expr, $f:ident) => {{
        if let Some(a) = column::<Int32Array>($b, stringify!($f))? {
            for (i, r) in $out.iter_mut().enumerate() {
                r.$f = (!a.is_null(i)).then(|| a.value(i));
            }
        }
    }};
    (oi64, $b:expr, $out:expr, $f:ident) => {{
        if let Some(a) = column::<Int64Array>($b, stringify!($f))? {
            for (i, r) in $out.iter_mut().enumerate() {
                r.$f = (!a.is_null(i)).then(|| a.value(i));
            }
        }
    }};
    (strs, $b:expr, $out:expr, $f:ident) => {{
        let n = stringify!($f);
        if let Some(a) = column::<ListArray>($b, n)? {
            for (i, r) in $out.iter_mut().enumerate() {
                not_null(a, n, i)?;
                let v = a.value(i);
                let s = v
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or_else(|| col_err(n, "list of non-strings"))?;
                r.$f = (0..s.len())
                    .map(|j| {
                        if s.is_null(j) {
                            Err(col_err(n, format!("null list item in row {i}")))
                        } else {
                            Ok(s.value(j).to_string())
                        }
                    })
                    .collect::<Result<_, _>>()?;
            }
        }
    }};
}

// Canonical JSON value of one field (see `AuditRecord::canonical_bytes`):
// writes it and returns true, or returns false for an empty field.
macro_rules! kind_canon {
    (seq, $v:expr, $out:expr) => {{
        canon_num($out, $v)
    }};
    (i32, $v:expr, $out:expr) => {{
        canon_num($out, $v)
    }};
    (i64, $v:expr, $out:expr) => {{
        canon_num($out, $v)
    }};
    (oi32, $v:expr, $out:expr) => {{
        $v.is_some_and(|n| canon_num($out, n))
    }};
    (oi64, $v:expr, $out:expr) => {{
        $v.is_some_and(|n| canon_num($out, n))
    }};
    (str, $v:expr, $out:expr) => {{
        !$v.is_empty() && canon_str($out, &$v)
    }};
    (link, $v:expr, $out:expr) => {{
        !$v.is_empty() && canon_str($out, &$v)
    }};
    (strs, $v:expr, $out:expr) => {{
        !$v.is_empty() && canon_strs($out, &$v)
    }};
}

/// Does JSON need any byte of `s` escaped? serde_json escapes exactly the
/// control characters (below 0x20), quote and backslash. Most values (ids,
/// names, SQL) need nothing, and this runs over every byte of every string
/// of every record: a block of 32 bytes is tested without an early exit
/// inside it, which the compiler turns into a few vector compares, where a
/// byte-at-a-time test with an exit after each byte cannot be vectorised.
pub(super) fn needs_escape(s: &[u8]) -> bool {
    fn special(b: u8) -> bool {
        (b < 0x20) | (b == b'"') | (b == b'\\')
    }
    // A string shorter than a block (most names, ids and numbers' text) is
    // tested whole in one pass: padding it into a block costs a copy to the
    // stack that the vector load then waits on, more than the test itself.
    let Some(last) = s.last_chunk::<32>() else {
        return s.iter().fold(false, |any, &b| any | special(b));
    };
    let any_special = |block: &[u8; 32]| block.iter().fold(false, |any, &b| any | special(b));
    // The bytes after the last whole block are tested as one more block,
    // the string's last 32 bytes, overlapping the block before.
    let (blocks, rest) = s.as_chunks::<32>();
    blocks.iter().any(any_special) || (!rest.is_empty() && any_special(last))
}

/// A JSON string, as serde_json writes it. Most values need no escaping:
/// those are copied whole instead of going through the escaper byte by
/// byte.
fn canon_str(out: &mut Vec<u8>, s: &str) -> bool {
    if needs_escape(s.as_bytes()) {
        serde_json::to_writer(&mut *out, s).is_ok()
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        true
    }
}

/// A JSON array of strings, as serde_json writes a `Vec<String>` (no
/// whitespace), each item through [`canon_str`].
fn canon_strs(out: &mut Vec<u8>, items: &[String]) -> bool {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if !canon_str(out, item) {
            return false;
        }
    }
    out.push(b']');
    true
}

/// A JSON number: the decimal integer, as serde_json writes it (itoa,
/// which serde_json uses too, rather than `Display` through the
/// formatting machinery).
fn canon_num(out: &mut Vec<u8>, n: impl itoa::Integer) -> bool {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    true
}

type CanonField = (&'static str, fn(&AuditRecord, &mut Vec<u8>) -> bool);

macro_rules! columns {
    ($($f:ident : $k:ident),* $(,)?) => {
        /// Column names in schema order.
        pub const COLUMN_NAMES: &[&str] = &[$(stringify!($f)),*];

        /// The Arrow schema of a segment.
        pub fn schema() -> SchemaRef {
            Arc::new(Schema::new(vec![$(kind_field!($k, stringify!($f))),*]))
        }

        /// Records -> one Arrow batch, rows in the given order; `keep[i]`
        /// says whether row i stores its `prev_record_hash` (decided over
        /// the whole segment, see [`links_to_keep`]).
        fn to_batch<R: Borrow<AuditRecord>>(
            records: &[R],
            keep: &[bool],
        ) -> Result<RecordBatch, SegmentError> {
            let n = records.len();
            if keep.len() != n {
                return Err(col_err(
                    "prev_record_hash",
                    format!("{n} records but {} link flags", keep.len()),
                ));
            }
            $(let mut $f = kind_builder!($k, n);)*
            // The records are cold by now (see `kind_builder`): without
            // fetching ahead, the loop waits on a cache miss for about
            // every record's struct and every string in it.
            for (i, (r, &keep)) in records.iter().zip(keep).enumerate() {
                if let Some(ahead) = records.get(i + PREFETCH_ROWS) {
                    prefetch_record(ahead.borrow());
                }
                if let Some(ahead) = records.get(i + PREFETCH_ROWS / 2) {
                    let ahead = ahead.borrow();
                    $(kind_prefetch!($k, ahead, $f);)*
                }
                let r = r.borrow();
                $(kind_push!($k, $f, r, keep);)*
            }
            let cols: Vec<ArrayRef> = vec![$(kind_finish!($k, $f)),*];
            Ok(RecordBatch::try_new(schema(), cols)?)
        }

        /// Fields in key (byte) order, each with its canonical writer.
        fn canonical_fields() -> &'static [CanonField] {
            static FIELDS: std::sync::OnceLock<Vec<CanonField>> = std::sync::OnceLock::new();
            FIELDS.get_or_init(|| {
                let mut v: Vec<CanonField> = vec![$((
                    stringify!($f),
                    |r: &AuditRecord, out: &mut Vec<u8>| kind_canon!($k, r.$f, out),
                )),*];
                v.sort_by_key(|(name, _)| *name);
                v
            })
        }

        /// Never called: it stops the build when AuditRecord gains a field
        /// that has no column here ("pattern does not mention field").
        #[allow(dead_code)]
        fn every_field_has_a_column(r: &AuditRecord) {
            let AuditRecord { $($f: _),* } = r;
        }

        /// One Arrow batch -> records, in row order.
        pub fn from_batch(batch: &RecordBatch) -> Result<Vec<AuditRecord>, SegmentError> {
            let mut out = vec![AuditRecord::default(); batch.num_rows()];
            $(kind_read!($k, batch, out, $f);)*
            Ok(out)
        }
    };
}

columns! {
    sequence: seq,
    prev_record_hash: link,
    record_hash: str,
    phase: str,
    request_uid: str,
    time: i64,
    class_uid: i32,
    activity_id: i32,
    type_uid: i64,
    status_id: i32,
    status_detail: str,
    action_id: i32,
    policy_uid: str,
    approval_uid: str,
    approver_user_uid: str,
    approver_user_name: str,
    actor_user_uid: str,
    actor_user_name: str,
    actor_user_org_uid: str,
    actor_app_uid: str,
    actor_user_groups: strs,
    actor_user_roles: strs,
    actor_session_credential_uid: str,
    actor_session_credential_fingerprint: str,
    actor_process_pid: oi32,
    actor_process_name: str,
    actor_process_cgroup_id: oi64,
    src_endpoint_ip: str,
    src_endpoint_port: oi32,
    dst_endpoint_ip: str,
    dst_endpoint_port: oi32,
    dst_endpoint_name: str,
    connection_info_protocol_name: str,
    session_uid: str,
    upstream_socket_cookie: oi64,
    database_user: str,
    database_name: str,
    query_info_query_string: str,
    response_rows: oi64,
    response_bytes: oi64,
    response_error_code: str,
    duration_us: oi64,
    query_info_kind: str,
    query_info_tables_read: strs,
    query_info_tables_written: strs,
    query_info_parameters: str,
    intent: str,
    actor_tollgate_roles: strs,
    masked_columns: strs,
    response_data: str,
    unmapped: str,
}

/// Which rows must store `prev_record_hash`: those where it is not the
/// `record_hash` of the row before in sequence order, which in a segment
/// is only the row with the lowest sequence. Everywhere else the column is
/// NULL: a hash of random bits does not compress, and storing every link
/// twice would cost 32 bytes a row. Readers restore it (`read_file`; in
/// SQL, `coalesce(prev_record_hash, lag(record_hash) OVER (ORDER BY
/// sequence))`), and the chain stays exactly as strong: every record hash
/// is still computed over its full link.
/// `order` is the rows' [`sequence_order`].
fn links_to_keep<R: Borrow<AuditRecord>>(records: &[R], order: &[usize]) -> Vec<bool> {
    let mut keep = vec![true; records.len()];
    for w in order.windows(2) {
        let (before, this) = (records[w[0]].borrow(), records[w[1]].borrow());
        keep[w[1]] = this.prev_record_hash != before.record_hash;
    }
    keep
}

/// Row indices in sequence order.
fn sequence_order<R: Borrow<AuditRecord>>(records: &[R]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by_key(|&i| records[i].borrow().sequence);
    order
}

/// Restores the links `links_to_keep` left out: a row whose link is NULL
/// (`left_out[row]`) gets the `record_hash` of the row before it in
/// sequence order (the first row in sequence order always stores its own).
fn restore_links(records: &mut [AuditRecord], left_out: &[bool]) {
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by_key(|&i| records[i].sequence);
    for w in order.windows(2) {
        if left_out.get(w[1]).copied().unwrap_or(false) {
            records[w[1]].prev_record_hash = records[w[0]].record_hash.clone();
        }
    }
}

/// The canonical encoding of a record (defined, and tested against a
/// reference implementation, in `AuditRecord::canonical_bytes`): written
/// field by field, without building a JSON tree, because it runs for every
/// record on the WAL path and for every row verify checks.
pub fn canonical_bytes(r: &AuditRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    canonical_into(r, &mut out);
    out
}

/// [`canonical_bytes`], appended to `out`: the WAL writes it straight into
/// the batch buffer, without an allocation per record.
pub fn canonical_into(r: &AuditRecord, out: &mut Vec<u8>) {
    write_canonical(r, out, None);
}

/// Where the two chain members go in an encoding written by
/// [`canonical_into_without_chain`]: byte offsets into it, each just after
/// the comma that leads the member (when one does).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainGaps {
    /// Offset of `"prev_record_hash":"<hex>"`.
    pub prev_record_hash: usize,
    /// Offset of `"sequence":<n>`.
    pub sequence: usize,
}

/// The canonical encoding of `r` without its two chain members
/// (`prev_record_hash`, `sequence`), with the offsets where they go.
/// Everything else in a record is known before it is chained, so callers
/// encode it on their own threads and the writer, which chains records one
/// after another, only splices the two members in.
///
/// Splicing gives exactly [`canonical_into`]'s bytes when the link is a
/// non-empty string that JSON writes unescaped (a hex hash always is): an
/// empty link is left out of the canonical encoding instead.
pub fn canonical_into_without_chain(r: &AuditRecord, out: &mut Vec<u8>) -> ChainGaps {
    let mut gaps = ChainGaps::default();
    write_canonical(r, out, Some(&mut gaps));
    gaps
}

/// What the encoder does with a member: the record's own hash is never
/// encoded, and the two chain members may be left for the writer to
/// splice in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Value,
    OwnHash,
    PrevRecordHash,
    Sequence,
}

/// One member of the canonical encoding.
struct Member {
    /// `,"name":`: what leads the member's value, comma included (left
    /// off for the first member written). Field names are plain
    /// identifiers: no JSON escaping needed.
    lead: Box<[u8]>,
    role: Role,
    write: fn(&AuditRecord, &mut Vec<u8>) -> bool,
}

/// The members in key (byte) order, with their leads and roles worked out
/// once: the encoder runs for every record and should only copy bytes,
/// not compare field names or build keys.
fn canonical_members() -> &'static [Member] {
    static MEMBERS: std::sync::OnceLock<Vec<Member>> = std::sync::OnceLock::new();
    MEMBERS.get_or_init(|| {
        canonical_fields()
            .iter()
            .map(|&(name, write)| Member {
                lead: format!(",\"{name}\":").into_bytes().into_boxed_slice(),
                role: match name {
                    "record_hash" => Role::OwnHash,
                    "prev_record_hash" => Role::PrevRecordHash,
                    "sequence" => Role::Sequence,
                    _ => Role::Value,
                },
                write,
            })
            .collect()
    })
}

fn write_canonical(r: &AuditRecord, out: &mut Vec<u8>, mut gaps: Option<&mut ChainGaps>) {
    let start = out.len();
    out.push(b'{');
    let mut empty = true;
    for member in canonical_members() {
        let gap = match (member.role, gaps.as_deref_mut()) {
            (Role::OwnHash, _) => continue,
            (Role::PrevRecordHash, Some(gaps)) => Some(&mut gaps.prev_record_hash),
            (Role::Sequence, Some(gaps)) => Some(&mut gaps.sequence),
            _ => None,
        };
        if let Some(gap) = gap {
            if !empty {
                out.push(b',');
            }
            *gap = out.len() - start;
            // The member spliced in later is never empty.
            empty = false;
            continue;
        }
        let mark = out.len();
        out.extend_from_slice(&member.lead[usize::from(empty)..]);
        if (member.write)(r, out) {
            empty = false;
        } else {
            out.truncate(mark);
        }
    }
    out.push(b'}');
}

/// A writer that hashes what passes through it, so the file's SHA-256 is
/// known at close without reading the file back.
struct HashingWriter {
    file: File,
    hasher: Sha256,
    bytes: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Rows converted to Arrow at a time when writing a segment.
const WRITE_SLICE: usize = 4096;

/// Text a write slice may carry, summed over its records' request and
/// answer text: an Arrow string column holds at most 2 GiB (32-bit
/// offsets), and past that building it panics. A record is at most 64 MiB
/// (`wal::MAX_FRAME`) and its other fields are bounded by the token's
/// size, so no column of a slice cut here reaches the limit.
const WRITE_SLICE_TEXT: usize = 1 << 30;

/// The request and answer text of a record: the fields an agent's
/// statement or a server's answer can make large.
fn text_bytes(r: &AuditRecord) -> usize {
    let lists = |l: &[String]| l.iter().map(String::len).sum::<usize>();
    r.query_info_query_string.len()
        + r.query_info_parameters.len()
        + r.response_data.len()
        + r.unmapped.len()
        + r.status_detail.len()
        + r.intent.len()
        + r.response_error_code.len()
        + r.database_user.len()
        + r.database_name.len()
        + lists(&r.query_info_tables_read)
        + lists(&r.query_info_tables_written)
        + lists(&r.masked_columns)
}

/// Where to cut `records` into write slices: at most `max_rows` rows and,
/// unless one record alone has more, `max_text` bytes of text each.
fn write_slices<R: Borrow<AuditRecord>>(
    records: &[R],
    max_rows: usize,
    max_text: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut slices = Vec::new();
    let (mut start, mut text) = (0, 0usize);
    for (i, r) in records.iter().enumerate() {
        let bytes = text_bytes(r.borrow());
        if i > start && (i - start == max_rows || text.saturating_add(bytes) > max_text) {
            slices.push(start..i);
            (start, text) = (i, 0);
        }
        text = text.saturating_add(bytes);
    }
    if start < records.len() {
        slices.push(start..records.len());
    }
    slices
}

pub struct Written {
    pub sha256: String,
    pub bytes: u64,
}

/// Writer settings for a segment of `rows` records whose sequences run
/// from `first` to `last`.
fn properties(first: u64, last: u64, rows: usize) -> WriterProperties {
    let time_idx = COLUMN_NAMES.iter().position(|c| *c == "time").unwrap_or(0) as i32;
    let seq_idx = COLUMN_NAMES
        .iter()
        .position(|c| *c == "sequence")
        .unwrap_or(0) as i32;
    let mut b = WriterProperties::builder()
        // Level 1, not 3: on the benchmark's statement records it costs
        // less CPU per record and the files come out smaller (47.1 against
        // 49.5 bytes per record). Negative (fast) levels nearly double
        // the size.
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap_or_default()))
        // Zone maps per page help DuckDB skip within a row group too.
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(1_000_000))
        .set_sorting_columns(Some(vec![
            SortingColumn {
                column_idx: time_idx,
                descending: false,
                nulls_first: false,
            },
            SortingColumn {
                column_idx: seq_idx,
                descending: false,
                nulls_first: false,
            },
        ]))
        .set_key_value_metadata(Some(vec![
            KeyValue::new("tollgate.schema_version".into(), SCHEMA_VERSION.to_string()),
            KeyValue::new("tollgate.first_sequence".into(), first.to_string()),
            KeyValue::new("tollgate.last_sequence".into(), last.to_string()),
        ]));
    // Rows are sorted by (time, sequence): both columns climb in small
    // steps, which delta encoding stores in a few bits a row, where
    // dictionary or plain encoding plus zstd spends bytes.
    for c in ["sequence", "time"] {
        b = b
            .set_column_dictionary_enabled(ColumnPath::from(c), false)
            .set_column_encoding(ColumnPath::from(c), Encoding::DELTA_BINARY_PACKED);
    }
    for leaf in columns_without_statistics() {
        b = b.set_column_statistics_enabled(leaf.clone(), EnabledStatistics::None);
    }
    // A hash never repeats: a dictionary would only grow until the writer
    // gives up on it, after hashing and comparing every value.
    for c in ["record_hash", "prev_record_hash"] {
        b = b.set_column_dictionary_enabled(ColumnPath::from(c), false);
    }
    for c in BLOOM_COLUMNS {
        b = b
            .set_column_bloom_filter_enabled(ColumnPath::from(*c), true)
            // parquet 60 folds each filter down to its target false-positive
            // rate after writing, so the file size does not depend on this;
            // it bounds the filter the writer allocates while encoding. The
            // row count bounds the distinct values without counting them
            // (counting cost more than the rest of the filter work).
            .set_column_bloom_filter_max_ndv(ColumnPath::from(*c), rows.max(16) as u64);
    }
    b.build()
}

/// Writes `records` (already sorted by time) to `tmp`, fsyncs it, and
/// returns the SHA-256 of the bytes written. The caller renames it.
pub fn write_file<R: Borrow<AuditRecord>>(
    perms: &super::fsutil::Perms,
    tmp: &Path,
    records: &[R],
) -> Result<Written, SegmentError> {
    let file = perms.create_with(tmp, super::fsutil::FILE_MODE, false)?;
    let sink = HashingWriter {
        file,
        hasher: Sha256::new(),
        bytes: 0,
    };
    // The sequence order gives both the links to keep and the first and
    // last sequence, without another pass over the (cold) records each.
    let order = sequence_order(records);
    let keep = links_to_keep(records, &order);
    let sequence_at = |i: Option<&usize>| i.map_or(0, |&i| records[i].borrow().sequence);
    let (first, last) = (sequence_at(order.first()), sequence_at(order.last()));
    let props = properties(first, last, records.len());
    let mut w = ArrowWriter::try_new(sink, schema(), Some(props))?;
    // The rows go to the writer a slice at a time: it encodes and
    // compresses each into its row group as it comes, so the Arrow form of
    // only one slice exists at once, and its buffers are reused for the
    // next instead of a whole segment's worth of fresh memory (page faults
    // and zeroing, on a thread that competes with the sessions for CPU).
    for slice in write_slices(records, WRITE_SLICE, WRITE_SLICE_TEXT) {
        w.write(&to_batch(&records[slice.clone()], &keep[slice])?)?;
    }
    let sink = w.into_inner()?;
    sink.file.sync_all()?;
    Ok(Written {
        sha256: hex::encode(sink.hasher.finalize()),
        bytes: sink.bytes,
    })
}

/// Reads every record of a segment, in file row order.
///
/// The parquet crate asserts on some malformed metadata (a negative column
/// offset, say) instead of returning an error. A damaged or crafted file is
/// an error here like any other, so that verify reports it and goes on
/// rather than ending without a report.
pub fn read_file(path: &Path) -> Result<Vec<AuditRecord>, SegmentError> {
    decoding(|| read_file_with(path, HUGE_COLUMN))
        .unwrap_or_else(|message| Err(SegmentError::DecoderFailed(message)))
}

/// Runs `decode` (a read of a Parquet file that may have been altered),
/// turning a panic of the decoder into the panic's message: every reader
/// of segments reports a crafted file instead of ending there.
pub fn decoding<T>(decode: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    std::panic::catch_unwind(decode).map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panicked".to_string())
    })
}

/// Uncompressed bytes of one column in one row group past which a file is
/// read a few rows at a time (see [`read_file_with`]).
const HUGE_COLUMN: i64 = 1 << 30;

fn read_file_with(path: &Path, huge_column: i64) -> Result<Vec<AuditRecord>, SegmentError> {
    let file = super::fsutil::open_regular(path)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    // An Arrow string column holds at most 2 GiB. Where a row group holds
    // over 1 GiB of one column (records of several MiB each), rows are
    // read 16 at a time: a record is at most 64 MiB (`wal::MAX_FRAME`).
    // Elsewhere a batch of the default size, which spans at most two row
    // groups, stays under the limit.
    let huge = builder.metadata().row_groups().iter().any(|group| {
        group
            .columns()
            .iter()
            .any(|column| column.uncompressed_size() > huge_column)
    });
    let reader = if huge {
        builder.with_batch_size(16).build()?
    } else {
        builder.build()?
    };
    let mut out = Vec::new();
    let mut left_out = Vec::new();
    for batch in reader {
        let batch = batch?;
        match batch.column_by_name("prev_record_hash") {
            Some(c) => left_out.extend((0..batch.num_rows()).map(|i| c.is_null(i))),
            None => left_out.extend(std::iter::repeat_n(false, batch.num_rows())),
        }
        out.extend(from_batch(&batch)?);
    }
    restore_links(&mut out, &left_out);
    Ok(out)
}

/// `YYYY-MM-DD` (UTC) of an epoch-milliseconds time: the hive partition.
pub fn day_of(time_ms: i64) -> String {
    let secs = time_ms.div_euclid(1000);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
        // Out of the representable range: keep such records findable.
        Err(_) => "0000-00-00".to_string(),
    }
}

/// The UTC day of `time_ms` as a number (days since the Unix epoch): two
/// times share a [`day_of`] partition when they share this, and comparing
/// it costs no formatting.
pub fn day_number(time_ms: i64) -> i64 {
    time_ms.div_euclid(86_400_000)
}

/// Relative path of a segment under the audit directory.
pub fn relative_path(day: &str, first_seq: u64, last_seq: u64) -> String {
    format!("records/date={day}/seg-{first_seq:020}-{last_seq:020}.parquet")
}

/// SHA-256 of a whole file (hex).
pub fn file_sha256(path: &Path) -> io::Result<String> {
    let mut f = super::fsutil::open_regular(path)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_list_names_every_record_field_in_order() {
        let v = serde_json::to_value(AuditRecord::default()).unwrap();
        // serde_json keeps declaration order only with preserve_order, so
        // compare sets, then the count.
        let mut fields: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        fields.sort();
        let mut cols: Vec<String> = COLUMN_NAMES.iter().map(|s| s.to_string()).collect();
        cols.sort();
        assert_eq!(fields, cols);
    }

    #[test]
    fn day_partition_is_utc_date() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(1_764_201_599_999), "2025-11-26");
        assert_eq!(day_of(1_764_201_600_000), "2025-11-27");
        for (a, b) in [
            (1_764_201_599_999, 1_764_201_600_000),
            (1_764_201_600_000, 1_764_287_999_999),
            (-1, 0),
            (-86_400_000, -1),
        ] {
            assert_eq!(
                day_number(a) == day_number(b),
                day_of(a) == day_of(b),
                "{a} {b}"
            );
        }
    }
}

#[cfg(test)]
mod canonical_tests {
    use proptest::prelude::*;

    use super::*;

    /// Strings made mostly of what matters to the escaper (quote,
    /// backslash, control characters, DEL, multi-byte characters) among
    /// plain bytes, of lengths around the escape check's 32-byte blocks.
    fn awkward_string() -> impl Strategy<Value = String> {
        let ch = prop_oneof![
            4 => Just('a'),
            1 => Just('"'),
            1 => Just('\\'),
            1 => (0u8..0x20).prop_map(char::from),
            1 => Just('\u{7f}'),
            1 => any::<char>(),
        ];
        proptest::collection::vec(ch, 0..100).prop_map(|v| v.into_iter().collect())
    }

    /// One special byte anywhere (short string, whole block, the overlapping
    /// tail) is found; plain strings of every length near a block pass.
    #[test]
    fn one_special_byte_anywhere_needs_escape() {
        for len in 0..100 {
            let plain = vec![b'a'; len];
            assert!(!needs_escape(&plain), "plain string of {len} bytes");
            for at in 0..len {
                for special in [0x00, 0x1f, b'"', b'\\'] {
                    let mut s = plain.clone();
                    s[at] = special;
                    assert!(needs_escape(&s), "{special:#x} at {at} of {len}");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(crate::proptest_config(4096))]

        /// The fast paths write exactly what serde_json writes.
        #[test]
        fn strings_and_lists_encode_as_serde_json_writes_them(
            s in awkward_string(),
            list in proptest::collection::vec(awkward_string(), 1..4),
        ) {
            let special = s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\');
            prop_assert_eq!(needs_escape(s.as_bytes()), special);
            let mut out = vec![b'x'];
            prop_assert!(canon_str(&mut out, &s));
            let want = serde_json::to_vec(&s).unwrap();
            prop_assert_eq!(&out[1..], want.as_slice());
            let mut out = Vec::new();
            prop_assert!(canon_strs(&mut out, &list));
            prop_assert_eq!(out, serde_json::to_vec(&list).unwrap());
        }

        /// Integers are their decimal text (what the hashing rules say,
        /// and what `Display` wrote before), extremes included.
        #[test]
        fn numbers_encode_as_their_decimal_text(
            a in prop_oneof![Just(i32::MIN), Just(i32::MAX), Just(0), Just(-1), any::<i32>()],
            b in prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(0), Just(-1), any::<i64>()],
            c in prop_oneof![Just(u64::MAX), Just(0), Just(1), any::<u64>()],
        ) {
            let mut out = Vec::new();
            canon_num(&mut out, a);
            out.push(b' ');
            canon_num(&mut out, b);
            out.push(b' ');
            canon_num(&mut out, c);
            prop_assert_eq!(String::from_utf8(out).unwrap(), format!("{a} {b} {c}"));
        }
    }
}

#[cfg(test)]
mod file_tests {
    use parquet::file::reader::{FileReader, SerializedFileReader};

    use super::*;

    /// A slice is cut by rows and by text, so that no Arrow string column
    /// of it can pass its 2 GiB limit; a record larger than the text limit
    /// on its own gets a slice of its own.
    #[test]
    fn write_slices_are_cut_by_rows_and_by_text() {
        let record = |text: usize| AuditRecord {
            query_info_query_string: "x".repeat(text),
            ..AuditRecord::default()
        };
        let records: Vec<AuditRecord> = [10, 10, 10, 10, 10, 35, 1, 1, 50, 1]
            .into_iter()
            .map(record)
            .collect();
        assert_eq!(
            write_slices(&records, 3, 30),
            [0..3, 3..5, 5..6, 6..8, 8..9, 9..10]
        );
        assert_eq!(write_slices(&records, 4, usize::MAX), [0..4, 4..8, 8..10]);
        assert!(write_slices::<AuditRecord>(&[], 4, 30).is_empty());
        // Every field an agent's request or a server's answer can fill
        // counts.
        let r = AuditRecord {
            query_info_parameters: "p".repeat(3),
            response_data: "d".repeat(5),
            query_info_tables_read: vec!["t".repeat(7)],
            masked_columns: vec!["m".repeat(11)],
            ..AuditRecord::default()
        };
        assert_eq!(text_bytes(&r), 26);
    }

    #[test]
    fn a_batch_with_fewer_link_flags_than_records_is_an_error() {
        let records: Vec<AuditRecord> = (0..3).map(|i| super::super::tests::sample(i, 1)).collect();
        assert!(to_batch(&records, &[true, false]).is_err());
    }

    #[test]
    fn only_numeric_columns_have_min_max_statistics_in_a_written_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.parquet");
        let records: Vec<AuditRecord> = (0..50)
            .map(|i| {
                let mut r = super::super::tests::sample(i as usize, 1000 + i as i64);
                r.sequence = i + 1;
                r.actor_user_groups = [format!("g{i}")].into();
                r.query_info_tables_read = vec![format!("public.t{i}")];
                r.response_rows = Some(i as i64);
                r
            })
            .collect();
        write_file(&super::super::fsutil::Perms::default(), &path, &records).unwrap();
        let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
        let row_group = reader.metadata().row_group(0);
        let schema = schema();
        let mut with_min_max = Vec::new();
        for column in row_group.columns() {
            let root = column.column_path().parts()[0].clone();
            let numeric = has_statistics(schema.field_with_name(&root).unwrap().data_type());
            if column
                .statistics()
                .is_some_and(|s| s.min_bytes_opt().is_some())
            {
                assert!(numeric, "{} has min/max", column.column_path());
                with_min_max.push(root);
            }
        }
        // (A numeric column that is NULL throughout has no min/max.)
        for name in ["time", "sequence", "response_rows"] {
            assert!(
                with_min_max.iter().any(|c| c == name),
                "{name} has no min/max"
            );
        }
    }

    #[test]
    fn files_are_zstd_sorted_with_bloom_filters_and_metadata() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.parquet");
        let records: Vec<AuditRecord> = (0..50)
            .map(|i| AuditRecord {
                sequence: i + 1,
                time: 1000 + i as i64,
                actor_user_uid: format!("u{}", i % 3).into(),
                ..Default::default()
            })
            .collect();
        write_file(&super::super::fsutil::Perms::default(), &path, &records).unwrap();
        let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
        let meta = reader.metadata();
        let kv = meta.file_metadata().key_value_metadata().unwrap();
        let get = |k: &str| kv.iter().find(|e| e.key == k).and_then(|e| e.value.clone());
        assert_eq!(get("tollgate.first_sequence").as_deref(), Some("1"));
        assert_eq!(get("tollgate.last_sequence").as_deref(), Some("50"));
        assert_eq!(
            get("tollgate.schema_version").as_deref(),
            Some(SCHEMA_VERSION)
        );
        let rg = meta.row_group(0);
        let sorting = rg.sorting_columns().unwrap();
        assert_eq!(
            COLUMN_NAMES[sorting[0].column_idx as usize], "time",
            "sorted by time first"
        );
        for (i, name) in COLUMN_NAMES.iter().enumerate() {
            let col = rg.column(i);
            assert!(
                matches!(col.compression(), Compression::ZSTD(_)),
                "{name} compressed with zstd"
            );
            assert_eq!(
                col.bloom_filter_offset().is_some(),
                BLOOM_COLUMNS.contains(name),
                "bloom filter on {name}"
            );
        }
        assert_eq!(read_file(&path).unwrap(), records);
    }

    #[test]
    fn every_kind_of_column_reads_back_across_write_slices() {
        // More rows than one write slice; lists empty and not, options
        // NULL and not, and a chain that breaks once, so that a link is
        // stored in a row other than the first.
        let n = WRITE_SLICE + 100;
        let mut prev = super::super::GENESIS_HASH.to_string();
        let records: Vec<AuditRecord> = (0..n)
            .map(|i| {
                let mut r = super::super::tests::sample(i, 1000 + (i / 3) as i64);
                r.sequence = i as u64 + 1;
                r.query_info_tables_read = (0..i % 3).map(|t| format!("public.t{t}")).collect();
                r.status_detail = if i % 2 == 0 {
                    String::new()
                } else {
                    "x".repeat(i % 40)
                };
                r.prev_record_hash = if i == WRITE_SLICE + 7 {
                    "f".repeat(64)
                } else {
                    prev.clone()
                };
                r.record_hash = r.compute_hash();
                prev = r.record_hash.clone();
                r
            })
            .collect();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.parquet");
        write_file(&super::super::fsutil::Perms::default(), &path, &records).unwrap();
        // Read as usual, and 16 rows at a time as a file with a column
        // over 1 GiB is (every column counts as huge here): the links kept
        // across batches must come back the same.
        for huge_column in [HUGE_COLUMN, 0] {
            let back = read_file_with(&path, huge_column).unwrap();
            assert_eq!(back.len(), records.len());
            for (a, b) in back.iter().zip(&records) {
                assert_eq!(a, b, "row {} (huge column {huge_column})", b.sequence);
            }
        }
    }

    #[test]
    fn file_from_before_a_column_existed_reads_and_keeps_its_hashes() {
        // Records written before `intent` and `masked_columns` existed have
        // them empty; their hashes were computed without them.
        let records: Vec<AuditRecord> = (0..5u64)
            .map(|i| {
                let mut r = AuditRecord {
                    sequence: i + 1,
                    time: 1000 + i as i64,
                    actor_user_uid: format!("u{i}").into(),
                    ..Default::default()
                };
                r.record_hash = r.compute_hash();
                r
            })
            .collect();
        let full = to_batch(
            &records,
            &links_to_keep(&records, &sequence_order(&records)),
        )
        .unwrap();
        let keep: Vec<usize> = COLUMN_NAMES
            .iter()
            .enumerate()
            .filter(|(_, c)| !matches!(**c, "intent" | "masked_columns"))
            .map(|(i, _)| i)
            .collect();
        let old = full.project(&keep).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("old.parquet");
        let mut w = ArrowWriter::try_new(File::create(&path).unwrap(), old.schema(), None).unwrap();
        w.write(&old).unwrap();
        w.close().unwrap();
        let back = read_file(&path).unwrap();
        assert_eq!(back, records);
        for r in &back {
            assert_eq!(r.compute_hash(), r.record_hash);
        }
    }
}
