//! May this request run? Every adapter normalises its request (a SQL
//! statement, an exec command, a Kubernetes verb and resource) into
//! [`Operation`]s and asks [`Policy::decide`]; this file is where every
//! request of every protocol is decided.
//!
//! Policy speaks only of tollgate roles (mapped from Entra groups, app roles
//! and app ids in `[identity.roles]`). With no grant at all, nothing is
//! allowed: access control is on by default.

mod pattern;

use std::collections::BTreeSet;

use serde::Deserialize;
use tracing::warn;

use crate::identity::Principal;
pub use pattern::Pattern;

/// What a statement does, coarsely. Ordered from least to most powerful, so
/// the strongest kind of a compound request is its maximum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatementKind {
    /// SELECT, COPY TO, ...
    #[default]
    Read,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT
    Transaction,
    /// SET (harmless settings), SHOW, PREPARE, DECLARE/FETCH, EXPLAIN
    Utility,
    /// INSERT, UPDATE, DELETE, MERGE, COPY FROM, SELECT INTO
    Write,
    /// CREATE, ALTER, DROP, TRUNCATE, COMMENT
    Ddl,
    /// GRANT, REVOKE, role management
    Dcl,
    /// everything else: VACUUM, SET ROLE, SET search_path, ...
    Admin,
}

impl StatementKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Read => "read",
            StatementKind::Transaction => "transaction",
            StatementKind::Utility => "utility",
            StatementKind::Write => "write",
            StatementKind::Ddl => "ddl",
            StatementKind::Dcl => "dcl",
            StatementKind::Admin => "admin",
        }
    }
}

/// Built-in dangerous-statement rules. All are enforced unless a grant
/// lists them in `allow_dangerous`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Danger {
    Drop,
    Truncate,
    Alter,
    GrantRevoke,
    DeleteWithoutWhere,
    UpdateWithoutWhere,
    CopyProgram,
    /// Functions or COPY forms that read or write server files, run
    /// programs, reach other servers or change settings.
    FileOrProgramFunction,
    /// SET ROLE, SET SESSION AUTHORIZATION
    SetRole,
    /// CREATE FUNCTION or PROCEDURE with a body given as a string (PL/pgSQL
    /// and the like): what it reads and writes when called is not seen.
    OpaqueRoutine,
}

impl Danger {
    pub fn as_str(self) -> &'static str {
        match self {
            Danger::Drop => "drop",
            Danger::Truncate => "truncate",
            Danger::Alter => "alter",
            Danger::GrantRevoke => "grant_revoke",
            Danger::DeleteWithoutWhere => "delete_without_where",
            Danger::UpdateWithoutWhere => "update_without_where",
            Danger::CopyProgram => "copy_program",
            Danger::FileOrProgramFunction => "file_or_program_function",
            Danger::SetRole => "set_role",
            Danger::OpaqueRoutine => "opaque_routine",
        }
    }
}

/// One normalised operation of a request (for SQL: one statement).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    pub kind: StatementKind,
    /// Objects read and written (for SQL: `schema.table`).
    pub reads: BTreeSet<String>,
    pub writes: BTreeSet<String>,
    /// Of `writes`, those only a built-in call writes (the sequence
    /// `nextval` advances, `pg_largeobject`): policy holds for them as for
    /// any write, but no row of theirs comes back (no RETURNING), so they
    /// do not make the result's computed columns masked.
    pub written_by_calls: BTreeSet<String>,
    pub dangers: BTreeSet<Danger>,
    /// The result leaves as raw data that masking cannot reach (COPY TO).
    pub streams_raw: bool,
    /// Changes rows (a data-modifying statement, SELECT INTO or row locks
    /// anywhere in it), whatever its kind: a grant must allow writes too.
    pub modifies_data: bool,
    /// The statement calls functions, which may have side effects.
    pub calls_functions: bool,
    /// Calls a function that is not a known built-in (a function of the
    /// database's own, or an unqualified name tollgate does not know):
    /// its result may carry a table's values as columns of no table.
    pub calls_unknown_functions: bool,
    /// The result comes from something decided earlier (FETCH from a
    /// cursor): which tables it reads is not in this statement's text.
    pub opaque_result: bool,
    /// May end the transaction it runs in: COMMIT, ROLLBACK (ROLLBACK TO
    /// SAVEPOINT too), CALL (a procedure may commit), administration
    /// statements. The server then drops the portals the protocol bound.
    /// Not BEGIN, SAVEPOINT or RELEASE, which keep them.
    pub ends_transaction: bool,
    /// Creates, replaces or drops prepared statements or portals by name
    /// in SQL (DECLARE, CLOSE, PREPARE, DEALLOCATE, DISCARD): protocol
    /// messages naming them can no longer be tied to what tollgate saw.
    pub renames_protocol_objects: bool,
    /// Cursors (portals) SQL's `FETCH` reads here, and prepared statements
    /// SQL's `EXECUTE` (`EXPLAIN ... EXECUTE` too) runs, by name as the
    /// server looks them up: a portal or statement made through the
    /// protocol may stand under such a name.
    pub runs_by_name: Vec<RunByName>,
    /// Changes, or may change, how the target decodes the bytes of later
    /// requests (PostgreSQL's client_encoding): tollgate would then read
    /// a different statement from the one the target runs.
    pub changes_text_encoding: bool,
    /// Turns standard_conforming_strings off: a backslash in a plain
    /// string would then hide a quote from tollgate's reading of later
    /// requests.
    pub turns_off_standard_strings: bool,
    /// Makes the target take data from the client (COPY FROM STDIN): once
    /// it does, the client's messages are that data, not requests.
    pub takes_client_data: bool,
    /// Names under which the statement could run a function of the
    /// database's own that its text does not show as one: a built-in's
    /// name called unqualified (a function of that name in a user schema
    /// wins when its argument types fit better) and the last part of an
    /// `a.b` reference (attribute notation: `b(a)` when `a` has no
    /// column `b`). Judged against the functions the database has.
    pub may_call_by_name: BTreeSet<String>,
    /// Defines a routine (function, procedure, operator, aggregate):
    /// called later, it may hand out a table's values under any name.
    pub defines_routine: bool,
    /// Renames or moves a schema, relation or column, redefines a view,
    /// or sets search_path or the role (`SET search_path`, any `ALTER
    /// SCHEMA`, `ALTER TABLE ... RENAME`, `CREATE OR REPLACE VIEW`, `ALTER
    /// VIEW`): afterwards a name may stand for what another name did.
    /// Masks are matched by name, once per session at its start.
    pub moves_names: bool,
    /// Sets a setting to a value computed by the statement (`set_config`
    /// of anything but a literal): a masked value copied into a setting
    /// would come back unmasked through `current_setting` or `SHOW`,
    /// which read no masked table.
    pub copies_into_settings: bool,
}

/// A request as the policy sees it, whatever the protocol.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub target: &'a str,
    /// The operations, or why the request could not be understood.
    pub operations: &'a Result<Vec<Operation>, String>,
}

/// What the policy decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the named grant, whose result recording applies.
    Allow {
        rule: String,
        record_results: RecordResults,
    },
    Deny {
        rule: String,
        reason: String,
    },
}

/// `[policy]` in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default, rename = "grant")]
    pub grants: Vec<Grant>,
    #[serde(default, rename = "mask")]
    pub masks: Vec<MaskRule>,
}

/// Values of these columns are masked in results, except for the listed
/// roles.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskRule {
    pub name: String,
    /// `schema.table.column` patterns, e.g. `public.customers.email`, `*.*.ssn`.
    pub columns: Vec<Pattern>,
    /// tollgate roles that see the real values.
    #[serde(default)]
    pub except_roles: Vec<String>,
    #[serde(default = "everything")]
    pub targets: Vec<Pattern>,
}

/// A portal or prepared statement a SQL statement runs by name (see
/// [`Operation::runs_by_name`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunByName {
    Portal(String),
    Statement(String),
}

/// What holders of some tollgate roles may do on some targets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Name used in audit rows and refusals.
    pub name: String,
    /// tollgate roles; "*" means any authenticated caller.
    pub roles: Vec<String>,
    /// Target names (patterns); default all.
    #[serde(default = "everything")]
    pub targets: Vec<Pattern>,
    /// Statement kinds allowed; default only reads.
    #[serde(default = "reads_only")]
    pub kinds: Vec<StatementKind>,
    /// Tables that may be read (patterns like `public.*`); default all.
    #[serde(default = "everything")]
    pub read_tables: Vec<Pattern>,
    /// Tables that may be written; default all (kinds still apply).
    #[serde(default = "everything")]
    pub write_tables: Vec<Pattern>,
    /// Tables that may be neither read nor written, whatever else says.
    #[serde(default)]
    pub deny_tables: Vec<Pattern>,
    /// Built-in dangerous-statement rules switched off for this grant.
    #[serde(default)]
    pub allow_dangerous: Vec<Danger>,
    /// Allow statements the SQL parser does not understand (then no table
    /// rule can apply to them). Off by default.
    #[serde(default)]
    pub allow_unparsed: bool,
    /// What the audit keeps of results: `metadata` (columns masked, row
    /// count, bytes) or `full` (also the rows, after masking, up to 64 KiB
    /// per statement: the relay's `MAX_RECORDED_RESULT_BYTES`).
    #[serde(default)]
    pub record_results: RecordResults,
}

/// See [`Grant::record_results`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordResults {
    #[default]
    Metadata,
    Full,
}

fn everything() -> Vec<Pattern> {
    vec![Pattern::any()]
}

fn reads_only() -> Vec<StatementKind> {
    vec![StatementKind::Read]
}

/// The policy for all targets.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    grants: Vec<Grant>,
    masks: Vec<MaskRule>,
}

impl Policy {
    pub fn new(config: &PolicyConfig) -> Self {
        if config.grants.is_empty() {
            warn!("no [[policy.grant]] configured: every statement will be refused");
        }
        Self {
            grants: config.grants.clone(),
            masks: config.masks.clone(),
        }
    }

    /// The column patterns masked for this caller on this target.
    pub fn masks_for(&self, who: &Principal, target: &str) -> Vec<Pattern> {
        self.masks
            .iter()
            .filter(|m| m.targets.iter().any(|t| t.matches(target)))
            .filter(|m| {
                !m.except_roles
                    .iter()
                    .any(|r| who.tollgate_roles.contains(r))
            })
            .flat_map(|m| m.columns.iter().cloned())
            .collect()
    }

    pub fn decide(&self, who: &Principal, request: &Request<'_>) -> Decision {
        // Raw result streams (COPY TO) bypass masking: a masked caller may
        // not stream a table that has masked columns.
        let masks = self.masks_for(who, request.target);
        if !masks.is_empty() && request.operations.is_err() {
            return Decision::Deny {
                rule: "mask:unparsed".into(),
                reason: "a statement tollgate cannot read could stream masked columns unmasked"
                    .into(),
            };
        }
        if let Ok(operations) = request.operations {
            // Not a grant's choice: every later decision rests on reading
            // the text as the target does.
            if operations.iter().any(|op| op.changes_text_encoding) {
                return Decision::Deny {
                    rule: "encoding:client_encoding".into(),
                    reason: "tollgate reads statements as UTF-8 and the session's client_encoding stays UTF8".into(),
                };
            }
            // Refused here, not only ended on when the server reports it:
            // a statement pipelined behind it would already have been read
            // by the server with the setting off.
            if operations.iter().any(|op| op.turns_off_standard_strings) {
                return Decision::Deny {
                    rule: "encoding:standard_conforming_strings".into(),
                    reason: "tollgate reads statements with standard_conforming_strings on, and it stays on".into(),
                };
            }
            // Masks follow names: a masked caller who could move what a
            // name stands for (rename the schema of a masked column, point
            // a view at it, put another schema first on search_path)
            // would read it, in this session and every later one, under a
            // name no mask pattern names.
            if !masks.is_empty() && operations.iter().any(|op| op.moves_names) {
                return Decision::Deny {
                    rule: "mask:names".into(),
                    reason: "a caller with masked columns may not rename or move schemas, tables, views or columns, redefine views, or change search_path or role: masks follow names".into(),
                };
            }
            if !masks.is_empty() && operations.iter().any(|op| op.copies_into_settings) {
                return Decision::Deny {
                    rule: "mask:settings".into(),
                    reason: "a caller with masked columns may not set a setting to a computed value: current_setting or SHOW would hand a masked value back unmasked".into(),
                };
            }
            // A routine a masked caller defines could hand out masked
            // values later under a name its calls do not show (see
            // `Operation::may_call_by_name`).
            if !masks.is_empty() && operations.iter().any(|op| op.defines_routine) {
                return Decision::Deny {
                    rule: "mask:routine".into(),
                    reason: "a caller with masked columns may not define routines: one could hand out their values unmasked".into(),
                };
            }
            for op in operations.iter().filter(|op| op.streams_raw) {
                if op.calls_unknown_functions && !masks.is_empty() {
                    return Decision::Deny {
                        rule: "mask:raw_stream".into(),
                        reason: "COPY of a query calling functions tollgate cannot look into could send masked columns unmasked".into(),
                    };
                }
                if let Some(table) = op
                    .reads
                    .iter()
                    .find(|t| masks.iter().any(|m| m.covers_table(t)))
                {
                    return Decision::Deny {
                        rule: "mask:raw_stream".into(),
                        reason: format!(
                            "{table} has masked columns and COPY would send them unmasked"
                        ),
                    };
                }
            }
        }
        let applicable: Vec<&Grant> = self
            .grants
            .iter()
            .filter(|g| {
                g.roles
                    .iter()
                    .any(|r| r == "*" || who.tollgate_roles.contains(r))
            })
            .filter(|g| g.targets.iter().any(|t| t.matches(request.target)))
            .collect();
        let Some(first) = applicable.first() else {
            return Decision::Deny {
                rule: "no-grant".into(),
                reason: format!(
                    "no grant gives roles [{}] access to target {}",
                    who.tollgate_roles.join(", "),
                    request.target
                ),
            };
        };
        let mut first_refusal = None;
        for grant in &applicable {
            match check(grant, request) {
                Ok(()) => {
                    if let Some((rule, reason)) = denied_by_any(&applicable, request) {
                        return Decision::Deny { rule, reason };
                    }
                    return Decision::Allow {
                        rule: grant.name.clone(),
                        record_results: grant.record_results,
                    };
                }
                Err((rule, reason)) => {
                    first_refusal.get_or_insert((format!("{}:{rule}", grant.name), reason));
                }
            }
        }
        let (rule, reason) =
            first_refusal.unwrap_or_else(|| (first.name.clone(), "refused".into()));
        Decision::Deny { rule, reason }
    }
}

/// A table that any applicable grant denies is refused, whichever grant
/// would allow the statement: `deny_tables` holds "whatever else says". A
/// statement that could not be parsed (let through by `allow_unparsed`)
/// cannot be shown to leave those tables alone, so it is refused too.
fn denied_by_any(applicable: &[&Grant], request: &Request<'_>) -> Option<(String, String)> {
    for grant in applicable.iter().filter(|g| !g.deny_tables.is_empty()) {
        let rule = format!("{}:deny_tables", grant.name);
        let Ok(operations) = request.operations else {
            return Some((
                rule,
                "the statement could not be parsed, so it cannot be shown to leave the denied tables alone".into(),
            ));
        };
        for op in operations {
            for table in op.reads.iter().chain(&op.writes) {
                if grant.deny_tables.iter().any(|p| may_name(p, table)) {
                    return Some((rule, format!("table {table} is denied")));
                }
            }
        }
    }
    None
}

/// A table list entry for tables a statement reaches without naming them
/// (a CASCADE's, a SELECT INTO target that cannot be named): only a
/// pattern that covers every table (`*`, `*.*`) allows it, and any
/// `deny_tables` refuses it.
pub const UNKNOWN_TABLES: &str = "?";

/// Whether a `deny_tables` pattern may name a table of a table list entry:
/// the table itself; `schema.*` stands for every table of the schema (a
/// schema renamed or dropped), and `?` for tables the text does not name
/// (a CASCADE's), which any pattern may be (see [`allows`] for the
/// other side).
fn may_name(pattern: &pattern::Pattern, table: &str) -> bool {
    if table == UNKNOWN_TABLES {
        return true;
    }
    match table.strip_suffix(".*") {
        Some(schema) => pattern.covers_table(schema),
        None => pattern.matches(table),
    }
}

/// Whether an allow pattern (`read_tables`, `write_tables`) covers a table
/// list entry: `schema.*` only if it matches every name of the schema
/// (plain matching of the entry does that), `?` only if it matches every
/// table (`*`, `*.*`).
fn allows(pattern: &pattern::Pattern, table: &str) -> bool {
    match table {
        UNKNOWN_TABLES => pattern.matches("*.*"),
        table => pattern.matches(table),
    }
}

/// `Err((rule, reason))` names the first thing the grant does not allow.
fn check(grant: &Grant, request: &Request<'_>) -> Result<(), (String, String)> {
    let operations = match request.operations {
        Ok(operations) => operations,
        Err(_) if grant.allow_unparsed => return Ok(()),
        Err(parse_error) => {
            return Err((
                "unparsed".into(),
                format!(
                    "the statement could not be parsed ({parse_error}) and raw SQL is not allowed"
                ),
            ))
        }
    };
    for op in operations {
        if !grant.kinds.contains(&op.kind) {
            return Err((
                format!("kind:{}", op.kind.as_str()),
                format!("{} statements are not allowed", op.kind.as_str()),
            ));
        }
        if op.modifies_data && !grant.kinds.contains(&StatementKind::Write) {
            return Err((
                "kind:write".into(),
                format!(
                    "this {} statement changes rows, and write statements are not allowed",
                    op.kind.as_str()
                ),
            ));
        }
        for danger in &op.dangers {
            if !grant.allow_dangerous.contains(danger) {
                return Err((
                    format!("dangerous:{}", danger.as_str()),
                    format!("dangerous statement ({}) is not allowed", danger.as_str()),
                ));
            }
        }
        for table in &op.reads {
            if !grant.read_tables.iter().any(|p| allows(p, table)) {
                return Err((
                    "read_tables".into(),
                    format!("reading {table} is not allowed"),
                ));
            }
        }
        for table in &op.writes {
            if !grant.write_tables.iter().any(|p| allows(p, table)) {
                return Err((
                    "write_tables".into(),
                    format!("writing {table} is not allowed"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
