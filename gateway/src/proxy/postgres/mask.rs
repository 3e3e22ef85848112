//! Masking: values of masked columns never leave tollgate.
//!
//! A result column is identified by the table OID and attribute number the
//! server puts in RowDescription, not by its name, so an alias does not
//! unmask it. At session start the masked columns are resolved once from
//! the catalog. A computed column (no table OID) in the result of a
//! statement that reads a table with masked columns is masked too, since it
//! may be derived from one (`upper(email)`). Rows whose shape tollgate did
//! not see described are masked whole: over-masking, never a leak.
//!
//! Masked text-like values become `****`; other types become NULL, which
//! every type accepts, so RowDescription stays true and drivers still parse
//! the row.

use std::{collections::HashMap, sync::Arc};

use bytes::{Buf, BufMut, BytesMut};

use super::wire::{self, Frame, WireError};
use crate::policy::Pattern;

/// The replacement for masked text-like values.
pub const MASK: &[u8] = b"****";

/// Type OIDs whose text and binary forms are both plain text.
const TEXT_LIKE: &[u32] = &[25, 1043, 1042, 19]; // text, varchar, bpchar, name

/// The masked columns of this session: (table OID, attnum) -> name.
#[derive(Debug, Default, Clone)]
pub struct MaskSet {
    columns: HashMap<(u32, i16), String>,
    patterns: Vec<Pattern>,
    /// Every user relation (table, view, ...) that existed when the masks
    /// were resolved: a column of any other was created since (a copy of
    /// a masked table, `CREATE TABLE AS`, a temporary table, a view) and
    /// is masked until a new session resolves it.
    known_relations: std::collections::HashSet<u32>,
    /// Names of the functions of the database's own (in any schema but
    /// the system's) when the masks were resolved: a statement that may
    /// run one under such a name (see `Operation::may_call_by_name`) may
    /// return a masked table's values as a column of no table.
    user_functions: std::collections::HashSet<String>,
    /// `schema.table` of the relations whose reading runs no code of the
    /// database's own (see [`RELATIONS_READ_WITHOUT_CODE_QUERY`]), when
    /// the session started (or up to [`CATALOG_REUSE`] before: shared by
    /// the sessions of one database, see [`CatalogCache`]). `None` when
    /// the catalog was not read: then no relation of the database's own
    /// is known to run no code when read.
    read_without_code: Option<Arc<std::collections::HashSet<String>>>,
}

/// OIDs below this are the system's own (PostgreSQL's
/// FirstNormalObjectId): catalogs, never created by a session.
const FIRST_USER_OID: u32 = 16384;

impl MaskSet {
    /// A set masking the one column `name` (`schema.table.column`) of the
    /// relation `oid`, attribute `attnum`, for tests elsewhere in the crate.
    #[cfg(test)]
    pub(crate) fn masking(oid: u32, attnum: i16, name: &str) -> Self {
        MaskSet {
            columns: HashMap::from([((oid, attnum), name.to_owned())]),
            patterns: vec![Pattern::from(name.to_owned())],
            known_relations: [oid].into(),
            user_functions: Default::default(),
            read_without_code: None,
        }
    }

    /// A set masking nothing that knows `relations` as read without
    /// running code, for tests elsewhere in the crate.
    #[cfg(test)]
    pub(crate) fn knowing_relations(relations: &[&str]) -> Self {
        MaskSet {
            read_without_code: Some(Arc::new(
                relations.iter().map(|r| (*r).to_owned()).collect(),
            )),
            ..Default::default()
        }
    }

    /// Whether reading `table` (`schema.table`) runs no code of the
    /// database's own: a system catalog or view, or a relation the
    /// catalog listed as such when the session started. A view runs its
    /// definition, a foreign table its wrapper, a table with row security
    /// its policies, a parent table its children's: any of them may call a
    /// function that writes. A relation created since is not known.
    pub fn read_runs_no_code(&self, table: &str) -> bool {
        self.read_without_code.as_ref().is_some_and(|listed| {
            SYSTEM_SCHEMAS
                .iter()
                .any(|schema| table.starts_with(schema))
                || listed.contains(table)
        })
    }

    /// Whether the database had a function of its own named `name` (last
    /// name part, folded) when the session started.
    pub fn is_user_function(&self, name: &str) -> bool {
        self.user_functions.contains(name)
    }

    /// Whether the database had operators, or casts run by functions, of
    /// its own when the session started. They run without a name in the
    /// text (`n || ''`, an implicit cast, the `=` of a `CASE`, a `USING`
    /// join, an `ORDER BY`): every statement may run one.
    pub fn has_own_operators_or_casts(&self) -> bool {
        self.user_functions.contains(OWN_OPERATORS_OR_CASTS)
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `table` (schema.table) may have masked columns.
    pub fn covers_table(&self, table: &str) -> bool {
        self.patterns.iter().any(|p| p.covers_table(table))
    }
}

// Operators named with their schema, and constants typed, where a
// better-fitting operator of the database's own (in `public`, searched
// after pg_catalog) would otherwise be chosen: the names the patterns
// are matched against must be the catalog's.
const CATALOG_QUERY: &str = "SELECT c.oid, a.attnum, \
     n.nspname::text OPERATOR(pg_catalog.||) '.'::text OPERATOR(pg_catalog.||) c.relname::text \
     OPERATOR(pg_catalog.||) '.'::text OPERATOR(pg_catalog.||) a.attname::text \
     FROM pg_catalog.pg_attribute a \
     JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'p', 'f', 'S') \
     AND (n.nspname NOT IN ('pg_catalog', 'information_schema') OR c.oid >= 16384::oid)";

/// The names of the functions (and procedures, aggregates) of the
/// database's own: in any schema but the system's, and not an extension's
/// owned by a superuser (as trusted as the built-ins; a trusted extension
/// a user installed is that user's, who could add functions to it); and
/// [`OWN_OPERATORS_OR_CASTS`] when it has operators, or casts run by
/// functions, of its own, also not an extension's.
const USER_FUNCTIONS_QUERY: &str = "SELECT DISTINCT p.proname FROM pg_catalog.pg_proc p \
     JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND NOT (EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_proc'::regclass::oid \
       AND d.objid = p.oid AND d.deptype = 'e') \
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.oid = p.proowner AND r.rolsuper)) \
     UNION SELECT '(operators or casts)' FROM pg_catalog.pg_operator o \
     JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace \
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND NOT (EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_operator'::regclass::oid \
       AND d.objid = o.oid AND d.deptype = 'e') \
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.oid = o.oprowner AND r.rolsuper)) \
     UNION SELECT '(operators or casts)' FROM pg_catalog.pg_cast c \
     JOIN pg_catalog.pg_proc p ON p.oid = c.castfunc \
     JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND NOT (EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_cast'::regclass::oid \
       AND d.objid = c.oid AND d.deptype = 'e') \
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.oid = p.proowner AND r.rolsuper))";

/// The relations of the database's own whose reading runs none of its
/// code: plain tables without row security and without children
/// (`relhassubclass`: an inheritance child or partition may be a foreign
/// table), materialized views, sequences. Two columns a row, the first
/// [`READ_WITHOUT_CODE`], so the rows are told apart from the other
/// queries'.
const RELATIONS_READ_WITHOUT_CODE_QUERY: &str = "SELECT 'read without code'::text, \
     n.nspname::text OPERATOR(pg_catalog.||) '.'::text OPERATOR(pg_catalog.||) c.relname::text \
     FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r', 'm', 'S') AND NOT c.relrowsecurity AND NOT c.relhassubclass \
     AND n.nspname NOT IN ('pg_catalog', 'information_schema')";

/// The first column of [`RELATIONS_READ_WITHOUT_CODE_QUERY`]'s rows.
const READ_WITHOUT_CODE: &[u8] = b"read without code";

/// How long the list of relations read without running code, read at one
/// session's login, serves the logins of other sessions of the same
/// target and database. One list per database rather than one per
/// session: on a database of a hundred thousand tables it takes megabytes.
/// A relation created since is not on it (its reads are durable first);
/// a listed one changed since is as unseen as a change made during a
/// session.
pub const CATALOG_REUSE: std::time::Duration = std::time::Duration::from_secs(10);

/// The relations read without running code, per target and database, as
/// the last login that read them found them (see [`CATALOG_REUSE`]).
#[derive(Debug, Default)]
pub struct CatalogCache {
    #[allow(clippy::type_complexity)]
    entries: std::sync::Mutex<
        HashMap<(String, String), (std::time::Instant, Arc<std::collections::HashSet<String>>)>,
    >,
}

impl CatalogCache {
    /// The list read for `target` and `database` less than
    /// [`CATALOG_REUSE`] ago, if any.
    pub fn fresh(
        &self,
        target: &str,
        database: &str,
    ) -> Option<Arc<std::collections::HashSet<String>>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&(target.to_owned(), database.to_owned()))
            .filter(|(read_at, _)| read_at.elapsed() < CATALOG_REUSE)
            .map(|(_, relations)| relations.clone())
    }

    /// Drops the list of `target` and `database`: a session there may
    /// have changed relations since it was read.
    pub fn forget(&self, target: &str, database: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&(target.to_owned(), database.to_owned()));
    }

    /// Keeps the list `set` read, unless it came from here.
    pub fn remember(&self, target: &str, database: &str, set: &MaskSet) {
        let Some(relations) = &set.read_without_code else {
            return;
        };
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // Stale entries of other databases go when the next is kept.
        entries.retain(|_, (read_at, _)| read_at.elapsed() < CATALOG_REUSE);
        entries.insert(
            (target.to_owned(), database.to_owned()),
            (std::time::Instant::now(), relations.clone()),
        );
    }
}

/// What [`USER_FUNCTIONS_QUERY`] answers when the database has operators
/// or function-run casts of its own: no function is named so.
const OWN_OPERATORS_OR_CASTS: &str = "(operators or casts)";

/// Schemas whose columns no mask pattern applies to. Their own relations
/// (OIDs below `FIRST_USER_OID`) are not listed by the catalog query, which
/// `plan` never masks anyway; only relations created in them later (an
/// extension's) are, so that they are known to the session.
const SYSTEM_SCHEMAS: &[&str] = &["pg_catalog.", "information_schema."];

/// Why a session's masked columns could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("the catalog lookup failed: {0}")]
    Wire(#[from] WireError),
    /// The server refused the catalog query (the role may not read the
    /// catalog, a timeout, ...).
    #[error("the server refused the catalog lookup: {code} {message}")]
    Refused { code: String, message: String },
    #[error("the server did not answer the catalog lookup within {} s", RESOLVE_TIMEOUT.as_secs())]
    TimedOut,
}

/// Longest the catalog lookup may take. It is part of the login, which
/// must not hold a session (and its connection slot) for as long as a
/// server that stalls (a lock on the catalog, a wedged backend) keeps it.
pub const RESOLVE_TIMEOUT: std::time::Duration = super::upstream::LOGIN_TIMEOUT;

/// Reads what the session needs to know of the catalog, in one round
/// trip on the session's own upstream connection, before any agent
/// message is relayed: the functions of the database's own and the
/// relations read without running code, for every session (they decide
/// what may be forwarded before its record is durable); and the columns
/// `patterns` name, when there are any.
///
/// `known`: the relations read without running code as another session
/// read them moments ago (see [`CatalogCache`]), taken instead of reading
/// them again.
pub async fn resolve(
    stream: &mut crate::proxy::tls::BoxedIo,
    buf: &mut BytesMut,
    patterns: Vec<Pattern>,
    known: Option<Arc<std::collections::HashSet<String>>>,
) -> Result<MaskSet, ResolveError> {
    tokio::time::timeout(RESOLVE_TIMEOUT, resolve_now(stream, buf, patterns, known))
        .await
        .map_err(|_| ResolveError::TimedOut)?
}

async fn resolve_now(
    stream: &mut crate::proxy::tls::BoxedIo,
    buf: &mut BytesMut,
    patterns: Vec<Pattern>,
    known: Option<Arc<std::collections::HashSet<String>>>,
) -> Result<MaskSet, ResolveError> {
    let mut out = BytesMut::new();
    // The lookups in one round trip: their rows differ in width (or, for
    // two columns, in the first).
    let mut queries = match patterns.is_empty() {
        true => USER_FUNCTIONS_QUERY.to_owned(),
        false => format!("{CATALOG_QUERY}; {USER_FUNCTIONS_QUERY}"),
    };
    if known.is_none() {
        queries.push_str("; ");
        queries.push_str(RELATIONS_READ_WITHOUT_CODE_QUERY);
    }
    postgres_protocol::message::frontend::query(&queries, &mut out).map_err(WireError::Io)?;
    super::send_all(stream, &out).await.map_err(WireError::Io)?;
    let mut set = MaskSet {
        columns: HashMap::new(),
        patterns,
        known_relations: std::collections::HashSet::new(),
        user_functions: std::collections::HashSet::new(),
        read_without_code: None,
    };
    let mut read_without_code = std::collections::HashSet::new();
    let mut refused = None;
    loop {
        let frame = wire::read_frame(stream, buf).await?;
        match frame.tag {
            b'D' => {
                let values = data_row_values(&frame)?;
                if let [Some(function)] = values.as_slice() {
                    set.user_functions
                        .insert(String::from_utf8_lossy(function).into_owned());
                    continue;
                }
                if let [Some(READ_WITHOUT_CODE), Some(relation)] = values.as_slice() {
                    read_without_code.insert(String::from_utf8_lossy(relation).into_owned());
                    continue;
                }
                let [Some(oid), Some(attnum), Some(name)] = values.as_slice() else {
                    continue;
                };
                let name = String::from_utf8_lossy(name).into_owned();
                let oid: u32 = String::from_utf8_lossy(oid).parse().unwrap_or(0);
                set.known_relations.insert(oid);
                let system = SYSTEM_SCHEMAS.iter().any(|schema| name.starts_with(schema));
                if !system && set.patterns.iter().any(|p| p.matches(&name)) {
                    let attnum: i16 = String::from_utf8_lossy(attnum).parse().unwrap_or(0);
                    set.columns.insert((oid, attnum), name);
                }
            }
            // Read on to the ReadyForQuery: a session without masks goes
            // on after a refused lookup, on a connection that is ready.
            b'E' => {
                let (code, message) = wire::error_fields(&frame);
                refused.get_or_insert(ResolveError::Refused { code, message });
            }
            b'Z' => {
                return match refused {
                    Some(refusal) => Err(refusal),
                    None => {
                        set.read_without_code =
                            Some(known.unwrap_or_else(|| Arc::new(read_without_code)));
                        Ok(set)
                    }
                };
            }
            _ => {}
        }
    }
}

/// What to do with each column of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultMask {
    /// Per column: None = pass, Some(text_like) = mask.
    columns: Vec<Option<bool>>,
    /// Names of the masked columns, for the audit.
    pub names: Vec<String>,
}

impl ResultMask {
    /// Mask every column: for rows whose description tollgate did not see.
    pub fn everything() -> Self {
        ResultMask {
            columns: Vec::new(),
            names: vec!["* (result shape not described)".into()],
        }
    }

    pub fn masks_anything(&self) -> bool {
        !self.names.is_empty()
    }
}

/// Plans the masking of a result from its RowDescription.
pub fn plan(
    row_description: &Frame,
    set: &MaskSet,
    reads_masked_table: bool,
) -> Result<ResultMask, WireError> {
    let mut body = row_description.body();
    let short = || WireError::Malformed("RowDescription too short".into());
    if body.len() < 2 {
        return Err(short());
    }
    let count = body.get_i16().max(0) as usize;
    let mut columns = Vec::with_capacity(count);
    let mut names = Vec::new();
    for _ in 0..count {
        let name = wire::take_cstr(&mut body)?;
        if body.len() < 18 {
            return Err(short());
        }
        let table_oid = body.get_u32();
        let attnum = body.get_i16();
        let type_oid = body.get_u32();
        body.advance(2 + 4 + 2); // typlen, typmod, format
        let text_like = TEXT_LIKE.contains(&type_oid);
        if let Some(column) = set.columns.get(&(table_oid, attnum)) {
            columns.push(Some(text_like));
            names.push(column.clone());
        } else if attnum <= 0
            && table_oid != 0
            && set.columns.keys().any(|(oid, _)| *oid == table_oid)
        {
            // A whole-row reference (`SELECT c FROM customers c`) carries
            // every column, the masked ones included.
            columns.push(Some(text_like));
            names.push(format!("{name} (whole row of a table with masked columns)"));
        } else if table_oid == 0 && reads_masked_table {
            columns.push(Some(text_like));
            names.push(format!(
                "{name} (computed from a table with masked columns)"
            ));
        } else if !set.is_empty()
            && table_oid >= FIRST_USER_OID
            && !set.known_relations.contains(&table_oid)
        {
            columns.push(Some(text_like));
            names.push(format!(
                "{name} (of a relation created after the session's masks were resolved)"
            ));
        } else {
            columns.push(None);
        }
    }
    Ok(ResultMask { columns, names })
}

/// Rewrites one DataRow with the masked values replaced.
pub fn apply(row: &Frame, mask: &ResultMask) -> Result<BytesMut, WireError> {
    let values = data_row_values(row)?;
    let mut out = BytesMut::with_capacity(row.bytes.len());
    out.put_u8(b'D');
    out.put_i32(0);
    out.put_i16(values.len() as i16);
    for (i, value) in values.iter().enumerate() {
        // An undescribed shape masks all, as NULL (fits every type).
        let action = if mask.columns.is_empty() {
            Some(false)
        } else {
            // A column the description did not announce is masked too.
            mask.columns.get(i).copied().unwrap_or(Some(false))
        };
        match (action, value) {
            (_, None) => out.put_i32(-1),
            (Some(true), Some(_)) => {
                out.put_i32(MASK.len() as i32);
                out.put_slice(MASK);
            }
            (Some(false), Some(_)) => out.put_i32(-1),
            (None, Some(bytes)) => {
                out.put_i32(bytes.len() as i32);
                out.put_slice(bytes);
            }
        }
    }
    let len = (out.len() - 1) as i32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// The values of a DataRow; None is SQL NULL.
pub(crate) fn data_row_values(row: &Frame) -> Result<Vec<Option<&[u8]>>, WireError> {
    let mut body = row.body();
    let short = || WireError::Malformed("DataRow too short".into());
    if body.len() < 2 {
        return Err(short());
    }
    let count = body.get_i16().max(0) as usize;
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        if body.len() < 4 {
            return Err(short());
        }
        let len = body.get_i32();
        if len < 0 {
            values.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return Err(short());
        }
        let (value, rest) = body.split_at(len);
        values.push(Some(value));
        body = rest;
    }
    Ok(values)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A connection to a server that reads one query and answers it with
    /// `answer`, then stays open; the query text, once read.
    fn answering(
        answer: BytesMut,
    ) -> (crate::proxy::tls::BoxedIo, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ours, mut server) = tokio::io::duplex(64 << 10);
        let asked = tokio::spawn(async move {
            let mut query = vec![0u8; 8192];
            let n = server.read(&mut query).await.expect("query");
            server.write_all(&answer).await.expect("answer");
            let text = String::from_utf8_lossy(&query[..n]).into_owned();
            // Kept open for what the client reads next.
            tokio::spawn(async move {
                std::future::pending::<()>().await;
                drop(server);
            });
            text
        });
        (Box::new(ours), asked)
    }

    /// A lookup the server refuses is read to its ReadyForQuery: a session
    /// without masks goes on from there, on a connection whose next answer
    /// is the next request's. One it answers lists what it read.
    #[tokio::test]
    async fn a_refused_catalog_lookup_is_read_to_its_end() {
        let mut out = BytesMut::new();
        wire::error_response(
            &mut out,
            "ERROR",
            "42501",
            "permission denied for table pg_class",
        );
        wire::ready_for_query(&mut out, b'I');
        // What the next request would get.
        wire::ready_for_query(&mut out, b'T');
        let (mut stream, _) = answering(out);
        let mut buf = BytesMut::new();
        let err = resolve(&mut stream, &mut buf, Vec::new(), None)
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, ResolveError::Refused { code, .. } if code == "42501"),
            "{err}"
        );
        let next = wire::read_frame(&mut stream, &mut buf).await.expect("next");
        assert_eq!((next.tag, next.body()), (b'Z', &b"T"[..]));

        let mut out = BytesMut::new();
        out.extend_from_slice(
            &data_row(&[Some(b"read without code"), Some(b"public.customers")]).bytes,
        );
        out.extend_from_slice(&data_row(&[Some(b"note_read")]).bytes);
        wire::ready_for_query(&mut out, b'I');
        let (mut stream, _) = answering(out);
        let set = resolve(&mut stream, &mut BytesMut::new(), Vec::new(), None)
            .await
            .expect("answered");
        assert!(set.read_runs_no_code("public.customers"));
        assert!(!set.read_runs_no_code("public.orders"));
        assert!(set.is_user_function("note_read"));
    }

    /// A list one login read serves the next logins of the same target and
    /// database (one copy, not one per session); a login given it does not
    /// ask the server for it again.
    #[tokio::test]
    async fn a_list_read_moments_ago_serves_the_next_logins_of_its_database() {
        let cache = CatalogCache::default();
        assert!(cache.fresh("orders-db", "orders").is_none());
        let read = MaskSet::knowing_relations(&["public.customers"]);
        cache.remember("orders-db", "orders", &read);
        let shared = cache.fresh("orders-db", "orders").expect("fresh");
        assert!(read
            .read_without_code
            .as_ref()
            .is_some_and(|own| Arc::ptr_eq(&shared, own)));
        assert!(cache.fresh("orders-db", "billing").is_none());
        assert!(cache.fresh("other-db", "orders").is_none());
        // Nothing read (a refused lookup) is nothing to share.
        cache.remember("orders-db", "billing", &MaskSet::default());
        assert!(cache.fresh("orders-db", "billing").is_none());

        let mut out = BytesMut::new();
        wire::ready_for_query(&mut out, b'I');
        let (mut stream, asked) = answering(out);
        let set = resolve(&mut stream, &mut BytesMut::new(), Vec::new(), Some(shared))
            .await
            .expect("answered");
        assert!(set.read_runs_no_code("public.customers"));
        let query = asked.await.expect("server");
        assert!(!query.contains("read without code"), "{query}");
    }

    /// A server that takes the catalog query and never answers does not
    /// hold the session: the lookup gives up at its timeout.
    #[tokio::test(start_paused = true)]
    async fn a_catalog_lookup_the_server_never_answers_is_given_up_on() {
        use tokio::io::AsyncReadExt;
        let (ours, mut server) = tokio::io::duplex(64 << 10);
        let mut stream: crate::proxy::tls::BoxedIo = Box::new(ours);
        let silent = tokio::spawn(async move {
            // Reads the query, answers nothing.
            let mut query = vec![0u8; 1024];
            let _ = server.read(&mut query).await;
            std::future::pending::<()>().await;
            drop(server);
        });
        let started = tokio::time::Instant::now();
        let err = resolve(
            &mut stream,
            &mut BytesMut::new(),
            vec![Pattern::from("public.customers.email".to_owned())],
            None,
        )
        .await
        .expect_err("no answer");
        silent.abort();
        assert!(matches!(err, ResolveError::TimedOut), "{err}");
        assert!(started.elapsed() >= RESOLVE_TIMEOUT);
    }

    /// A RowDescription of `(name, table oid, attribute number, type oid)`
    /// columns, in text format.
    pub(crate) fn row_description(columns: &[(&str, u32, i16, u32)]) -> Frame {
        let mut out = BytesMut::new();
        out.put_u8(b'T');
        out.put_i32(0);
        out.put_i16(columns.len() as i16);
        for (name, table, attnum, type_oid) in columns {
            out.put_slice(name.as_bytes());
            out.put_u8(0);
            out.put_u32(*table);
            out.put_i16(*attnum);
            out.put_u32(*type_oid);
            out.put_i16(-1);
            out.put_i32(-1);
            out.put_i16(0);
        }
        let len = (out.len() - 1) as i32;
        out[1..5].copy_from_slice(&len.to_be_bytes());
        wire::split_frame(&mut out).unwrap().unwrap()
    }

    fn data_row(values: &[Option<&[u8]>]) -> Frame {
        let mut out = BytesMut::new();
        out.put_u8(b'D');
        out.put_i32(0);
        out.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    out.put_i32(v.len() as i32);
                    out.put_slice(v);
                }
                None => out.put_i32(-1),
            }
        }
        let len = (out.len() - 1) as i32;
        out[1..5].copy_from_slice(&len.to_be_bytes());
        wire::split_frame(&mut out).unwrap().unwrap()
    }

    fn set() -> MaskSet {
        MaskSet {
            columns: HashMap::from([
                ((16384, 3), "public.customers.email".to_owned()),
                ((16384, 4), "public.customers.born".to_owned()),
            ]),
            patterns: vec![Pattern::from("public.customers.email".to_owned())],
            known_relations: [16384, 16390].into(),
            user_functions: Default::default(),
            read_without_code: Some(Arc::new(["public.customers".to_owned()].into())),
        }
    }

    /// Reading a system catalog runs no code of the database's own;
    /// reading one of its relations does not either when the catalog
    /// listed it so, and may otherwise (a view, a relation created since);
    /// with no catalog read, nothing of the database's own is known.
    #[test]
    fn only_relations_the_catalog_listed_are_read_without_code() {
        let set = set();
        assert!(set.read_runs_no_code("public.customers"));
        assert!(set.read_runs_no_code("pg_catalog.pg_class"));
        assert!(set.read_runs_no_code("information_schema.tables"));
        assert!(!set.read_runs_no_code("public.customer_view"));
        assert!(!set.read_runs_no_code("?"));
        let unread = MaskSet {
            read_without_code: None,
            ..set
        };
        assert!(!unread.read_runs_no_code("public.customers"));
        assert!(!unread.read_runs_no_code("pg_catalog.pg_class"));
    }

    /// A relation that did not exist when the masks were resolved (a copy
    /// made with `CREATE TABLE AS`, a temporary table) is masked; one that
    /// did, and the catalogs, are not; nothing is without masks.
    #[test]
    fn columns_of_relations_created_after_the_session_started_are_masked() {
        let rd = row_description(&[
            ("known", 16390, 1, 25),
            ("copied", 16500, 1, 25),
            ("relname", 1259, 2, 19),
        ]);
        let mask = plan(&rd, &set(), false).unwrap();
        assert_eq!(mask.columns, vec![None, Some(true), None]);
        assert!(mask.names[0].contains("created after"), "{:?}", mask.names);
        let unmasked = plan(&rd, &MaskSet::default(), false).unwrap();
        assert!(!unmasked.masks_anything());
    }

    #[test]
    fn masked_columns_are_found_by_table_and_attribute_not_by_name() {
        // `email AS contact`: the alias does not hide where it comes from.
        let rd = row_description(&[
            ("id", 16384, 1, 23),
            ("contact", 16384, 3, 25),
            ("born", 16384, 4, 1082),
        ]);
        let mask = plan(&rd, &set(), true).unwrap();
        assert_eq!(
            mask.names,
            vec!["public.customers.email", "public.customers.born"]
        );
        let masked = apply(
            &data_row(&[Some(b"1"), Some(b"ada@example.com"), Some(b"1815-12-10")]),
            &mask,
        )
        .unwrap();
        let mut frame_bytes = masked;
        let frame = wire::split_frame(&mut frame_bytes).unwrap().unwrap();
        assert_eq!(
            data_row_values(&frame).unwrap(),
            vec![Some(&b"1"[..]), Some(MASK), None]
        );
    }

    #[test]
    fn whole_row_references_and_unannounced_columns_are_masked() {
        let rd = row_description(&[("c", 16384, 0, 16385)]);
        let mask = plan(&rd, &set(), true).unwrap();
        assert!(mask.masks_anything(), "whole-row reference");
        // The description announced one column; a row with two masks the second.
        let rd = row_description(&[("id", 16384, 1, 23)]);
        let mask = plan(&rd, &set(), false).unwrap();
        let masked = apply(&data_row(&[Some(b"1"), Some(b"secret")]), &mask).unwrap();
        let mut bytes = masked;
        let frame = wire::split_frame(&mut bytes).unwrap().unwrap();
        assert_eq!(
            data_row_values(&frame).unwrap(),
            vec![Some(&b"1"[..]), None]
        );
    }

    #[test]
    fn computed_columns_over_masked_tables_are_masked() {
        let rd = row_description(&[("upper", 0, 0, 25)]);
        assert!(plan(&rd, &set(), true).unwrap().masks_anything());
        assert!(
            !plan(&rd, &set(), false).unwrap().masks_anything(),
            "SELECT upper('x') reads no table"
        );
    }

    #[test]
    fn an_undescribed_row_is_masked_whole() {
        let masked = apply(&data_row(&[Some(b"1"), None]), &ResultMask::everything()).unwrap();
        let mut bytes = masked;
        let frame = wire::split_frame(&mut bytes).unwrap().unwrap();
        assert_eq!(data_row_values(&frame).unwrap(), vec![None, None]);
    }

    #[test]
    fn a_short_data_row_is_malformed() {
        let mut out = BytesMut::from(&b"D\x00\x00\x00\x0a\x00\x01\x00\x00\x00\x09"[..]);
        let frame = wire::split_frame(&mut out).unwrap().unwrap();
        assert!(apply(&frame, &ResultMask::everything()).is_err());
    }
}
