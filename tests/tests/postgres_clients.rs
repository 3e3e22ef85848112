//! Real PostgreSQL clients through the pinned path: psql (policy refusals,
//! \copy, a cancelled query), pgbench in its three query modes, psycopg with
//! server-side binding and binary results, the JDBC driver, and a large
//! result streamed with bounded memory.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tollgate_tests::{duckdb, evidence, privileged, AgentCgroup, Stack};

const AGENT_OID: &str = "6b3f0c1e-7a55-4d7e-9a43-2f4a1c9d0b11";
const AUDIT_WAIT: Duration = Duration::from_secs(30);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

fn start(test: &str) -> Option<(Stack, String)> {
    if !privileged(test) {
        return None;
    }
    let stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let token = stack
        .idp
        .token(AGENT_OID, &["--name", "clients-agent"])
        .expect("mint a token");
    Some((stack, token))
}

/// Rows left in `customers`, read directly as the superuser.
fn customers_left(stack: &Stack) -> String {
    stack
        .postgres
        .superuser_sql_ok("orders", "SELECT count(*) FROM customers")
        .expect("count customers directly")
}

/// The messages of a raw-protocol script's `answers` with this tag.
fn tagged(answers: &Value, tag: &str) -> Vec<Value> {
    answers["answers"]
        .as_array()
        .map(|a| a.iter().filter(|m| m["tag"] == tag).cloned().collect())
        .unwrap_or_default()
}

/// Whether a raw-protocol script's answers hold an ErrorResponse with this
/// SQLSTATE whose message says `says`.
fn has_error(answers: &Value, sqlstate: &str, says: &str) -> bool {
    tagged(answers, "E").iter().any(|e| {
        e["sqlstate"] == sqlstate && e["message"].as_str().unwrap_or_default().contains(says)
    })
}

/// The first ErrorResponse among a raw-protocol script's answers (Null
/// when there is none).
fn first_error(answers: &Value) -> Value {
    answers
        .as_array()
        .and_then(|a| a.iter().find(|m| m["tag"] == "E"))
        .cloned()
        .unwrap_or_default()
}

/// Runs `script` with the test's Python (psycopg installed) in the agent
/// cgroup; what it printed, as JSON. It must succeed.
fn agent_python_json(stack: &Stack, script: &str) -> Value {
    let out = AgentCgroup::command(&stack.gateway.config.agent_cgroup, &duckdb::python())
        .args(["-c", script])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        stack.gateway.log()
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Starts `psql` (running `sql` as the agent) and waits until the server
/// runs the statement; the psql process and the server backend's pid.
fn agent_statement_running(
    stack: &Stack,
    mut psql: Command,
    sql: &str,
) -> (std::process::Child, String) {
    let child = psql
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
    let backend = || {
        stack
            .postgres
            .superuser_sql_ok(
                "postgres",
                &format!(
                    "SELECT pid FROM pg_stat_activity WHERE query = '{}'",
                    sql.replace('\'', "''")
                ),
            )
            .ok()
            .filter(|pid| !pid.trim().is_empty())
    };
    tollgate_tests::wait_for("the statement to run", Duration::from_secs(20), || {
        backend().is_some()
    })
    .expect("running");
    (child, backend().unwrap_or_default().trim().to_string())
}

fn outcome_of(stack: &Stack, statement: &str) -> Value {
    outcome_like(stack, statement)
}

/// The outcome row of the statement matching a LIKE pattern.
fn outcome_like(stack: &Stack, pattern: &str) -> Value {
    let sql = format!(
        "SELECT * FROM audit WHERE phase = 'outcome' AND query_info_query_string LIKE '{}'",
        pattern.replace('\'', "''")
    );
    stack
        .audit_rows(&sql, 1, AUDIT_WAIT)
        .expect("audit row")
        .remove(0)
}

/// psql as the agent, in the agent's cgroup, through tollgate: unaligned,
/// tuples only, errors with their SQLSTATE; add what it should run.
fn agent_psql(stack: &Stack, token: &str) -> Command {
    let mut psql = AgentCgroup::command(&stack.gateway.config.agent_cgroup, "psql");
    psql.args(["-X", "-A", "-t", "-v", "VERBOSITY=verbose"])
        .arg(format!(
            "host=127.0.0.1 port={} user=agent dbname=orders",
            stack.postgres.port
        ))
        .env("PGPASSWORD", token);
    psql
}

#[test]
fn policy_refusals_are_sqlstate_42501_and_the_session_stays_usable() {
    let Some((stack, token)) =
        start("policy_refusals_are_sqlstate_42501_and_the_session_stays_usable")
    else {
        return;
    };
    let mut psql = agent_psql(&stack, &token);
    psql.args([
        "-c",
        "DROP TABLE customers",
        "-c",
        "SELECT * FROM secrets",
        "-c",
        "DELETE FROM customers",
    ])
    .args(["-c", "SELECT count(*) FROM customers"]);
    let out = psql.output().expect("run psql");
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches("ERROR:  42501").count(), 3, "{stderr}");
    assert!(stderr.contains("agents:kind:ddl"), "{stderr}");
    assert!(stderr.contains("agents:deny_tables"), "{stderr}");
    assert!(
        stderr.contains("agents:dangerous:delete_without_where"),
        "{stderr}"
    );
    assert_eq!(
        text(&out.stdout),
        "3",
        "the table is intact and the session still answers"
    );
    assert_eq!(customers_left(&stack), "3");

    let rows = stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' AND class_uid = 6005 ORDER BY sequence",
            3,
            AUDIT_WAIT,
        )
        .expect("refusal rows");
    let rules: Vec<&str> = rows
        .iter()
        .map(|r| r["policy_uid"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        rules,
        [
            "agents:kind:ddl",
            "agents:deny_tables",
            "agents:dangerous:delete_without_where"
        ]
    );
    assert_eq!(rows[0]["query_info_kind"], "ddl");
    assert_eq!(
        rows[1]["query_info_tables_read"],
        serde_json::json!(["public.secrets"])
    );
    assert_eq!(
        rows[2]["query_info_tables_written"],
        serde_json::json!(["public.customers"])
    );
    assert!(rows
        .iter()
        .all(|r| r["action_id"] == 2 && r["actor_user_uid"] == AGENT_OID));
}

#[test]
fn a_statement_too_long_to_audit_is_refused_with_54000_and_its_refusal_recorded() {
    let Some((stack, token)) =
        start("a_statement_too_long_to_audit_is_refused_with_54000_and_its_refusal_recorded")
    else {
        return;
    };
    // 9 MiB of SQL: over the 8 MiB tollgate audits, under the 64 MiB a
    // client message may have.
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("long.sql");
    // And about 6 MiB of control characters in table names: under 8 MiB,
    // but each may be a token of its own, too many to parse: refused as
    // not understood, unparsed. (Parsed, its record, with each character
    // escaped as six bytes in the text and in the tables read, would have
    // passed the 64 MiB a record may have: no text light enough to parse
    // makes one that large.) 100 000 names of 63 bytes each (the most
    // PostgreSQL keeps of a name), all different.
    let names: Vec<String> = (0..100_000u32)
        .map(|i| {
            let mut name: String = (0..4)
                .map(|digit| char::from(1 + (i / 31u32.pow(digit) % 31) as u8))
                .collect();
            name.push_str(&"\u{1}".repeat(63 - name.len()));
            format!("\"{name}\"")
        })
        .collect();
    let long = format!(
        "SELECT length('{}') AS too_long;\nSELECT * FROM {};\nSELECT 41 + 1;\n",
        "x".repeat(9 << 20),
        names.join(", ")
    );
    std::fs::write(&script, long).expect("write the script");
    let mut psql = agent_psql(&stack, &token);
    psql.arg("-f").arg(&script);
    let out = psql.output().expect("run psql");
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches("ERROR:  54000").count(), 1, "{stderr}");
    assert!(stderr.contains("more than the 8388608 bytes"), "{stderr}");
    assert!(
        stderr.contains("ERROR:  42501")
            && stderr.contains("more than the 2000000 tollgate parses in one text"),
        "{stderr}"
    );
    assert_eq!(text(&out.stdout), "42", "the session still answers");

    let rows = stack
        .audit_rows(
            "SELECT policy_uid, response_error_code, status_detail, length(query_info_query_string) AS kept, \
             starts_with(query_info_query_string, 'SELECT length(''xxx') AS starts \
             FROM audit WHERE phase = 'refusal' AND class_uid = 6005 ORDER BY sequence",
            2,
            AUDIT_WAIT,
        )
        .expect("refusal rows");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1]["policy_uid"], "agents:unparsed");
    assert!(
        rows[1]["status_detail"]
            .as_str()
            .is_some_and(|d| d.contains("more than the 2000000 tollgate parses")),
        "{:?}",
        rows[1]["status_detail"]
    );
    let row = &rows[0];
    assert_eq!(row["policy_uid"], "tollgate:statement_too_large");
    assert_eq!(row["response_error_code"], "54000");
    assert_eq!(row["kept"], 4096);
    assert_eq!(row["starts"], true);
    let detail = row["status_detail"].as_str().unwrap_or_default();
    let digest = detail
        .rsplit("SHA-256 of the whole statement: ")
        .next()
        .unwrap_or_default();
    assert!(
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "{detail}"
    );
    // Nothing of it ran: no request or outcome row.
    let ran = stack
        .audit_rows(
            "SELECT count(*) AS n FROM audit WHERE phase IN ('request', 'outcome') \
             AND query_info_query_string LIKE '%too_long%'",
            1,
            AUDIT_WAIT,
        )
        .expect("count");
    assert_eq!(ran[0]["n"], 0);
}

/// The same limit in the extended protocol: a driver's Parse of 9 MiB of
/// SQL is refused with 54000 at its Parse, before the server parses it, its
/// refusal is recorded, and the session goes on.
#[test]
fn a_prepared_statement_too_long_to_audit_is_refused_with_54000_and_the_session_goes_on() {
    let Some((stack, token)) = start(
        "a_prepared_statement_too_long_to_audit_is_refused_with_54000_and_the_session_goes_on",
    ) else {
        return;
    };
    let script = format!(
        r#"
import json, psycopg
with psycopg.connect(host="127.0.0.1", port={port}, user="agent", dbname="orders", password={token:?},
                     sslmode="disable", autocommit=True) as conn:
    with conn.cursor() as cur:
        try:
            cur.execute("SELECT %s::int + length('" + "x" * (9 << 20) + "') AS too_long", (1,))
            refused = None
        except psycopg.Error as e:
            refused = {{"sqlstate": e.sqlstate, "message": str(e)}}
        cur.execute("SELECT %s::int + 41", (1,))
        after = cur.fetchone()[0]
print(json.dumps({{"refused": refused, "after": after}}))
"#,
        port = stack.postgres.port,
    );
    let answer = agent_python_json(&stack, &script);
    assert_eq!(answer["refused"]["sqlstate"], "54000", "{answer}");
    assert!(
        answer["refused"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("more than the 8388608 bytes"),
        "{answer}"
    );
    assert_eq!(answer["after"], 42, "the session still answers");

    let rows = stack
        .audit_rows(
            "SELECT policy_uid, response_error_code, length(query_info_query_string) AS kept \
             FROM audit WHERE phase = 'refusal' AND class_uid = 6005 ORDER BY sequence",
            1,
            AUDIT_WAIT,
        )
        .expect("refusal row");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["policy_uid"], "tollgate:statement_too_large");
    assert_eq!(rows[0]["response_error_code"], "54000");
    assert_eq!(rows[0]["kept"], 4096);
    let ran = stack
        .audit_rows(
            "SELECT count(*) AS n FROM audit WHERE phase IN ('request', 'outcome') \
             AND starts_with(query_info_query_string, 'SELECT $1::int + length(')",
            1,
            AUDIT_WAIT,
        )
        .expect("count");
    assert_eq!(ran[0]["n"], 0, "nothing of it ran");
}

#[test]
fn psycopg_with_server_side_binding_and_binary_results() {
    let Some((stack, token)) = start("psycopg_with_server_side_binding_and_binary_results") else {
        return;
    };
    let script = format!(
        r#"
import json, psycopg
with psycopg.connect(host="127.0.0.1", port={port}, user="agent", dbname="orders", password={token:?},
                     application_name="intent: reconcile invoices", sslmode="disable") as conn:
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT id, name FROM customers WHERE id = %s", (2,))
        rows = cur.fetchall()
        cur.execute("/* intent: tidy a name */ UPDATE customers SET name = %s WHERE id = %s", ("Grace H.", 2))
        updated = cur.rowcount
print(json.dumps({{"rows": rows, "updated": updated}}))
"#,
        port = stack.postgres.port,
    );
    let answer = agent_python_json(&stack, &script);
    assert_eq!(answer["rows"], serde_json::json!([[2, "Grace"]]));
    assert_eq!(answer["updated"], 1);

    let select = outcome_of(&stack, "SELECT id, name FROM customers WHERE id = $1");
    select_param(&select);
    assert_eq!(select["intent"], "reconcile invoices");
    assert_eq!(select["query_info_kind"], "read");
    assert_eq!(
        select["activity_id"], 1,
        "a pure read is OCSF activity Read"
    );
    assert_eq!(
        select["query_info_tables_read"],
        serde_json::json!(["public.customers"])
    );
    assert_eq!(select["response_rows"], 1);
    assert_eq!(
        select["actor_process_name"]
            .as_str()
            .map(|p| p.starts_with("python")),
        Some(true)
    );

    let update = outcome_of(
        &stack,
        "/* intent: tidy a name */ UPDATE customers SET name = $1 WHERE id = $2",
    );
    assert_eq!(
        update["intent"], "tidy a name",
        "a leading comment states the intent"
    );
    assert_eq!(update["query_info_kind"], "write");
    assert!(
        update["query_info_parameters"]
            .as_str()
            .unwrap_or_default()
            .contains("Grace H."),
        "{update}"
    );
    assert_eq!(update["response_rows"], 1);
}

/// psycopg sends the integer in binary with its type declared: the audit
/// shows it as the number it is.
fn select_param(row: &Value) {
    assert_eq!(row["query_info_parameters"], r#"["2"]"#, "{row}");
}

#[test]
fn pgbench_in_simple_extended_and_prepared_modes() {
    let Some((stack, token)) = start("pgbench_in_simple_extended_and_prepared_modes") else {
        return;
    };
    // Initialising creates tables (DDL): the operator does that directly.
    let init = Command::new("pgbench")
        .args([
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &stack.postgres.port.to_string(),
            "-U",
            "postgres",
            "orders",
        ])
        .env("PGPASSWORD", &stack.postgres.superuser_password)
        .output()
        .expect("pgbench -i");
    assert!(init.status.success(), "{}", text(&init.stderr));
    for mode in ["simple", "extended", "prepared"] {
        let out = AgentCgroup::command(&stack.gateway.config.agent_cgroup, "pgbench")
            .args(["-n", "-M", mode, "-c", "2", "-t", "20"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &stack.postgres.port.to_string(),
                "-U",
                "agent",
                "orders",
            ])
            .env("PGPASSWORD", &token)
            .output()
            .expect("pgbench");
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {}\n{stdout}\n{}",
            text(&out.stderr),
            stack.gateway.log()
        );
        assert!(
            stdout.contains("number of transactions actually processed: 40/40"),
            "{mode}: {stdout}"
        );
        assert!(
            stdout.contains("number of failed transactions: 0"),
            "{mode}: {stdout}"
        );
    }
    // Each TPC-B-like transaction is 7 statements; 3 modes x 40 transactions.
    let rows = stack
        .audit_rows(
            "SELECT count(*) AS n FROM audit WHERE phase = 'outcome' AND query_info_query_string LIKE 'UPDATE pgbench_accounts%'",
            1,
            AUDIT_WAIT,
        )
        .expect("count");
    let want = 120;
    let deadline = Instant::now() + AUDIT_WAIT;
    let mut n = rows[0]["n"].as_i64().unwrap_or(0);
    while n < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        n = duckdb::query(stack.gateway.audit_dir(), "SELECT count(*) AS n FROM audit WHERE phase = 'outcome' AND query_info_query_string LIKE 'UPDATE pgbench_accounts%'")
            .ok()
            .and_then(|r| r.first().and_then(|r| r["n"].as_i64()))
            .unwrap_or(0);
    }
    assert_eq!(n, want, "every UPDATE of every mode is audited");
}

#[test]
fn psql_copy_in_and_out_is_audited_with_rows() {
    let Some((stack, token)) = start("psql_copy_in_and_out_is_audited_with_rows") else {
        return;
    };
    let conn = format!(
        "host=127.0.0.1 port={} user=agent dbname=orders",
        stack.postgres.port
    );
    let out = stack
        .agent_psql(&token, "\\copy customers TO STDOUT")
        .output()
        .expect("psql");
    assert_eq!(
        text(&out.stdout).lines().count(),
        3,
        "{}",
        text(&out.stderr)
    );

    let mut child = AgentCgroup::command(&stack.gateway.config.agent_cgroup, "psql")
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            &conn,
            "-c",
            "\\copy customers FROM STDIN",
        ])
        .env("PGPASSWORD", &token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"10\tAlan\talan@example.com\n11\tBarbara\tbarbara@example.com\n")
        .expect("write rows");
    let out = child.wait_with_output().expect("psql");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(customers_left(&stack), "5");
    let copy_out = outcome_like(&stack, "COPY %customers%TO STDOUT%");
    assert_eq!(copy_out["query_info_kind"], "read");
    assert_eq!(copy_out["response_rows"], 3);
    let copy_in = outcome_like(&stack, "COPY %customers%FROM STDIN%");
    assert_eq!(copy_in["query_info_kind"], "write");
    assert_eq!(
        copy_in["query_info_tables_written"],
        serde_json::json!(["public.customers"])
    );
    assert_eq!(copy_in["response_rows"], 2);
}

/// A stopping daemon (SIGTERM) ends its sessions before it stops its
/// audit store: the agent is told why (FATAL 57P01, as PostgreSQL tells
/// its clients at a fast shutdown), the session row says so, and the
/// statement still running gets its outcome row (status unknown: the
/// agent never got its answer). The audit then verifies.
#[test]
fn a_stopping_daemon_ends_its_sessions_and_records_what_they_had_in_flight() {
    let Some((mut stack, token)) =
        start("a_stopping_daemon_ends_its_sessions_and_records_what_they_had_in_flight")
    else {
        return;
    };
    let sleep = "SELECT pg_sleep(60) AS interrupted";
    let mut psql = agent_psql(&stack, &token);
    psql.args(["-c", sleep]);
    let (child, _) = agent_statement_running(&stack, psql, sleep);
    stack.gateway.stop();
    let out = child.wait_with_output().expect("psql");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("FATAL:  57P01") && stderr.contains("tollgate is stopping"),
        "{stderr}\n{}",
        stack.gateway.log()
    );
    assert!(
        !stack.gateway.log().contains("sessions still running"),
        "the daemon had to give up waiting: {}",
        stack.gateway.log()
    );

    let audit = stack.gateway.audit_dir();
    let ended = duckdb::query(
        audit,
        "SELECT status_detail FROM audit WHERE phase = 'session' \
         AND starts_with(status_detail, 'daemon_stopping: ')",
    )
    .expect("query");
    assert_eq!(ended.len(), 1, "{ended:?}");
    let outcome = duckdb::query(
        audit,
        &format!(
            "SELECT status_id, status_detail, response_error_code FROM audit \
             WHERE phase = 'outcome' AND query_info_query_string = '{sleep}'"
        ),
    )
    .expect("query");
    assert_eq!(outcome.len(), 1, "{outcome:?}");
    assert_eq!(outcome[0]["status_id"], 0, "{outcome:?}");
    assert_eq!(outcome[0]["response_error_code"], "57P01", "{outcome:?}");
    assert!(
        outcome[0]["status_detail"]
            .as_str()
            .unwrap_or_default()
            .contains("tollgate is stopping"),
        "{outcome:?}"
    );
    let (ok, report) = stack.gateway.verify_audit().expect("verify");
    assert!(ok, "{report}");
}

/// The target's connection lost without a word (its backend killed): the
/// agent gets FATAL 08006 instead of a connection that just closes, the
/// session row says what happened, and the statement in flight gets its
/// outcome row (status unknown). When the server says why (an
/// administrator terminated the backend), the agent gets the server's own
/// FATAL and the session row carries it.
#[test]
fn a_lost_target_connection_is_told_to_the_agent_and_on_record() {
    let Some((stack, token)) = start("a_lost_target_connection_is_told_to_the_agent_and_on_record")
    else {
        return;
    };
    for (sleep, signal) in [
        ("SELECT pg_sleep(60) AS killed", "SIGKILL"),
        ("SELECT pg_sleep(60) AS terminated", "pg_terminate_backend"),
    ] {
        let mut psql = agent_psql(&stack, &token);
        psql.args(["-c", sleep]);
        let (child, pid) = agent_statement_running(&stack, psql, sleep);
        if signal == "SIGKILL" {
            let pid: i32 = pid.trim().parse().expect("a pid");
            // SAFETY: a signal to the test's own PostgreSQL backend.
            unsafe {
                libc_kill(pid, 9);
            }
        } else {
            stack
                .postgres
                .superuser_sql_ok("postgres", &format!("SELECT pg_terminate_backend({pid})"))
                .expect("terminate");
        }
        let out = child.wait_with_output().expect("psql");
        let stderr = text(&out.stderr);
        let wanted = match signal {
            "SIGKILL" => "FATAL:  08006",
            _ => "FATAL:  57P01",
        };
        assert!(stderr.contains(wanted), "{signal}: {stderr}");
        let outcome = outcome_of(&stack, sleep);
        assert_eq!(outcome["status_id"], 0, "{signal}: {outcome}");
        // The PostgreSQL server restarts its backends after one is killed.
        tollgate_tests::wait_for(
            "the server to take logins again",
            Duration::from_secs(30),
            || {
                stack
                    .postgres
                    .superuser_sql_ok("postgres", "SELECT 1")
                    .is_ok()
            },
        )
        .expect("server back");
    }
    let rows = stack
        .audit_rows(
            "SELECT status_detail, response_error_code FROM audit WHERE phase = 'session' \
             AND starts_with(status_detail, 'upstream_lost: ') ORDER BY sequence",
            2,
            AUDIT_WAIT,
        )
        .expect("session rows");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["response_error_code"], "08006", "{rows:?}");
    assert!(
        rows[0]["status_detail"]
            .as_str()
            .unwrap_or_default()
            .ends_with("without an error"),
        "{rows:?}"
    );
    assert_eq!(rows[1]["response_error_code"], "57P01", "{rows:?}");
}

#[test]
fn a_cancelled_query_is_cancelled_through_tollgate() {
    let Some((stack, token)) = start("a_cancelled_query_is_cancelled_through_tollgate") else {
        return;
    };
    // Once the server runs the statement, interrupt psql, which sends a
    // CancelRequest on a new connection (redirected to tollgate too).
    let sleep = "SELECT pg_sleep(60)";
    let (child, _) = agent_statement_running(&stack, stack.agent_psql(&token, sleep), sleep);
    let started = Instant::now();
    // SAFETY: signalling our own child by pid.
    unsafe {
        libc_kill(child.id() as i32, 2);
    }
    let out = child.wait_with_output().expect("psql");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the query was not cancelled"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}\n{}",
        stack.gateway.log()
    );
    let row = outcome_of(&stack, "SELECT pg_sleep(60)");
    assert_eq!(row["status_id"], 2);
    assert_eq!(row["response_error_code"], "57014");

    // The cancel's own connection to the server is tollgate's, on record
    // with its socket's cookie: verification counts it as an audited
    // gateway upstream, not a bypass. (The test's own superuser psql,
    // which watched for the sleep, is a bypass of its own.)
    let audit = stack.gateway.audit_dir();
    let mut run = None;
    let reconciled = tollgate_tests::wait_for(
        "the cancel's connection to be reconciled",
        Duration::from_secs(30),
        || {
            let r = evidence::verify(audit, &stack.gateway.public_key(), stack.gateway.dir.path());
            let done = r.report["audited_upstreams"].as_u64() >= Some(2);
            run = Some(r);
            done
        },
    );
    let run = run.expect("verify ran");
    assert!(reconciled.is_ok(), "{}", run.summary);
    let bypasses = run.report["bypasses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        bypasses.iter().all(|b| b["process"] == "psql"),
        "{}",
        run.summary
    );

    // A CancelRequest with a key no session has is dropped, as the
    // server would, and on record as refused.
    let guess = "import socket, struct\n\
                 s = socket.create_connection(('127.0.0.1', int(__import__('sys').argv[1])))\n\
                 s.sendall(struct.pack('!iiii', 16, 80877102, 4242, 123456))\n\
                 s.recv(1)\n";
    let out = AgentCgroup::command(&stack.gateway.config.agent_cgroup, &duckdb::python())
        .args(["-c", guess, &stack.postgres.port.to_string()])
        .output()
        .expect("python");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let refused = stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' AND status_detail LIKE 'cancel_unknown_key:%'",
            1,
            AUDIT_WAIT,
        )
        .expect("the refused cancel's record");
    assert_eq!(refused[0]["action_id"], 2, "{}", refused[0]);
    assert_eq!(refused[0]["actor_process_name"], "python", "{}", refused[0]);
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

#[test]
fn the_jdbc_driver_works_through_tollgate() {
    let Some((stack, token)) = start("the_jdbc_driver_works_through_tollgate") else {
        return;
    };
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("java/JdbcProbe.java");
    let out = AgentCgroup::command(&stack.gateway.config.agent_cgroup, "java")
        .args(["-cp", "/usr/share/java/postgresql.jar"])
        .arg(source)
        .args(["127.0.0.1", &stack.postgres.port.to_string(), &token, "3"])
        .output()
        .expect("run java (`cargo xtask setup` installs the JDBC driver)");
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        stack.gateway.log()
    );
    assert_eq!(text(&out.stdout), "Edsger");
    let row = outcome_of(&stack, "SELECT name FROM customers WHERE id = $1");
    assert_eq!(row["intent"], "jdbc probe");
    assert_eq!(row["actor_process_name"], "java");
    assert_eq!(row["query_info_parameters"], r#"["3"]"#, "{row}");
}

/// A client that pipelines millions of Syncs without reading its answers
/// does not grow tollgate's memory: past a bound on the requests waiting
/// for answers, tollgate stops reading from it (before, every Sync held a
/// queue entry of over a kilobyte, as many as the sockets' buffers held:
/// gigabytes). Once the client reads, every Sync is answered.
#[test]
fn a_client_that_never_reads_its_answers_does_not_grow_memory() {
    let Some((stack, token)) = start("a_client_that_never_reads_its_answers_does_not_grow_memory")
    else {
        return;
    };
    let pid = stack.gateway.pid().expect("tollgate pid");
    let before = rss_kib(pid);
    let syncs = 3_000_000;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pg_sync_flood.py");
    let mut client = AgentCgroup::command(&stack.gateway.config.agent_cgroup, &duckdb::python())
        .arg(script)
        .args(["127.0.0.1", &stack.postgres.port.to_string(), &token])
        .arg(syncs.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python");
    let mut stdout = std::io::BufReader::new(client.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("read the script's output");
    assert_eq!(line.trim(), "stalled");
    let stalled = rss_kib(pid);
    eprintln!(
        "tollgate RSS: {before} KiB before, {stalled} KiB with the client's Syncs unanswered"
    );
    client
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"read\n")
        .expect("tell the client to read");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("the script's result");
    assert!(client.wait().expect("python").success());
    let result: Value = serde_json::from_str(&rest).unwrap_or_else(|e| panic!("{e}: {rest}"));
    assert!(
        stalled.saturating_sub(before) < 48 * 1024,
        "tollgate grew by {} KiB while the client did not read",
        stalled.saturating_sub(before)
    );
    assert_eq!(result["ready"], syncs, "{result}");
    assert_eq!(result["other"], serde_json::json!([]), "{result}");
    assert_eq!(result["sent"], true, "{result}");
}

/// A session whose agent stopped reading a large answer is still closed
/// when its token expires. tollgate's write of the answer waits on the
/// agent; the close used to wait behind it for good, so the connection
/// stayed open with the server's backend and the slot, and the
/// statement's outcome was never written.
#[test]
fn a_session_whose_agent_stopped_reading_is_closed_when_its_token_expires() {
    let Some((stack, _)) =
        start("a_session_whose_agent_stopped_reading_is_closed_when_its_token_expires")
    else {
        return;
    };
    let token = stack
        .idp
        .token(AGENT_OID, &["--name", "clients-agent", "--expires-in", "5"])
        .expect("mint a short-lived token");
    // About 200 MB of answer: far more than every buffer on the way holds.
    let sql = "SELECT repeat('x', 1000) FROM generate_series(1, 200000)";
    let result = raw_protocol_json(&stack, "pg_stop_reading.py", &token, &[sql, "12"]);
    assert_eq!(
        result["closed"], true,
        "the connection stayed open: {result}"
    );
    let row = outcome_of(&stack, sql);
    assert!(
        row["status_detail"]
            .as_str()
            .is_some_and(|d| d.contains("token expired")),
        "{row}"
    );
    let rows = stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'session' AND status_detail LIKE 'token_expired%'",
            1,
            AUDIT_WAIT,
        )
        .expect("session end row");
    assert_eq!(rows[0]["actor_user_uid"], AGENT_OID);
}

/// More statement text in flight than tollgate holds for a session, and
/// no Sync until the end: tollgate waits for answers before it takes
/// more, and has the server flush the ones it keeps (a server that has
/// not seen a Sync keeps its last answers; waiting for them without a
/// Flush would stall the session for good). Every Parse is answered.
#[test]
fn more_text_in_flight_than_a_session_holds_is_answered_without_a_stall() {
    let Some((stack, token)) =
        start("more_text_in_flight_than_a_session_holds_is_answered_without_a_stall")
    else {
        return;
    };
    let (count, size) = (48, 2 << 20);
    let result = raw_protocol_json(
        &stack,
        "pg_big_parses.py",
        &token,
        &[&count.to_string(), &size.to_string()],
    );
    assert!(result.get("timeout").is_none(), "stalled: {result}");
    assert_eq!(result["parsed"], count, "{result}");
    assert_eq!(result["ready"], true, "{result}");
}

/// Requests in flight hold at most 64 MiB of text: past that tollgate
/// waits for answers before it takes more. One 1 MiB statement executed 80
/// times in a pipeline without Sync or Flush puts 80 MiB of text in the
/// Executes' records; PostgreSQL keeps its answers until asked, so the
/// client gets answers before its own Sync only because tollgate, out of
/// room, had the server flush them. Then every Execute completes.
#[test]
fn statement_text_in_flight_stops_at_its_bound_until_answers_come() {
    let Some((stack, token)) =
        start("statement_text_in_flight_stops_at_its_bound_until_answers_come")
    else {
        return;
    };
    let count = 80;
    let result = raw_protocol_json(
        &stack,
        "pg_unsynced_executes.py",
        &token,
        // Answers may take seconds to start on a loaded machine: the
        // script waits this long for the next before it sends the Sync.
        &[&count.to_string(), &(1 << 20).to_string(), "10"],
    );
    assert_eq!(result["errors"], serde_json::json!([]), "{result}");
    assert_eq!(result["ready"], true, "{result}");
    assert_eq!(result["completed"], count, "{result}");
    // The Executes that filled the bound (63 of 1 MiB and a little more
    // each) were answered before the Sync, and not all of them: the rest
    // waited for the Sync.
    let early = result["before_sync_completed"].as_u64().unwrap_or(0);
    assert!((56..count).contains(&early), "{result}");
}

/// VmRSS: the resident set size of a process now, in KiB.
fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

#[test]
fn a_five_million_row_select_streams_through_with_bounded_memory() {
    let Some((stack, token)) =
        start("a_five_million_row_select_streams_through_with_bounded_memory")
    else {
        return;
    };
    let pid = stack.gateway.pid().expect("tollgate pid");
    let before = peak_rss_kib(pid);
    let out = stack
        .agent_psql(
            &token,
            "SELECT g, 'row ' || g FROM generate_series(1, 5000000) g",
        )
        .stdout(Stdio::null())
        .output()
        .expect("psql");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let peak = peak_rss_kib(pid);
    eprintln!("tollgate peak RSS: before {before} KiB, after a 5M-row SELECT {peak} KiB");
    assert!(
        peak < 100 * 1024,
        "tollgate peak RSS {peak} KiB is not under 100 MB"
    );
    let row = outcome_of(
        &stack,
        "SELECT g, 'row ' || g FROM generate_series(1, 5000000) g",
    );
    assert_eq!(row["response_rows"], 5_000_000);
}

/// One value of 300 MB (a single DataRow: PostgreSQL sends a value of up
/// to 1 GB in one message), as a row and as a line of COPY TO STDOUT
/// (one CopyData message), goes on to the agent as it arrives: tollgate's
/// peak memory grows by far less than the value, the agent gets it whole,
/// and the outcome still counts the row and its bytes.
#[test]
fn a_row_of_hundreds_of_megabytes_streams_through_with_bounded_memory() {
    let Some((stack, token)) =
        start("a_row_of_hundreds_of_megabytes_streams_through_with_bounded_memory")
    else {
        return;
    };
    let pid = stack.gateway.pid().expect("tollgate pid");
    let before = peak_rss_kib(pid);
    // What psql printed for `sql`, once tollgate's peak memory is checked.
    let printed_through_tollgate = |sql: &str| {
        let printed = tempfile::NamedTempFile::new().expect("temp file");
        let out = stack
            .agent_psql(&token, sql)
            .arg("-o")
            .arg(printed.path())
            .output()
            .expect("psql");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let peak = peak_rss_kib(pid);
        eprintln!("tollgate peak RSS: before {before} KiB, after {sql}: {peak} KiB");
        assert!(
            peak.saturating_sub(before) < 64 * 1024,
            "tollgate's peak RSS grew by {} KiB for a 300 MB value",
            peak.saturating_sub(before)
        );
        std::fs::read(printed.path()).expect("psql's output")
    };

    let sql = "SELECT length(v), v FROM (SELECT repeat('tollgate', 37500000) AS v) s";
    let printed = printed_through_tollgate(sql);
    let value = printed
        .strip_prefix(b"300000000|")
        .and_then(|rest| rest.strip_suffix(b"\n"))
        .expect("psql printed the length, then the value");
    assert_eq!(value.len(), 300_000_000);
    assert!(
        value.chunks(8).all(|word| word == b"tollgate"),
        "the value arrived altered"
    );
    let row = outcome_of(&stack, sql);
    assert_eq!(row["response_rows"], 1, "{row}");
    let bytes = row["response_bytes"].as_i64().expect("response_bytes");
    assert!(bytes > 300_000_000, "{bytes} bytes counted");

    let copy = "COPY (SELECT repeat('tollgate', 37500000)) TO STDOUT";
    let copied = printed_through_tollgate(copy);
    assert_eq!(copied.len(), 300_000_001, "the line and its newline");
    assert!(copied[..300_000_000]
        .chunks(8)
        .all(|word| word == b"tollgate"));
    let row = outcome_of(&stack, copy);
    assert_eq!(row["status_id"], 1, "{row}");
    // Counted as COPY data always is: the server's `COPY 1`, and no bytes.
    assert_eq!(row["response_rows"], 1, "{row}");
    assert!(
        row["response_bytes"].as_i64().unwrap_or(0) < 300_000_000,
        "{row}"
    );
}

/// VmHWM: the peak resident set size of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// A size in KiB from /proc/PID/status.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc status"))
}

const MASKING_POLICY: &str = r#"
[identity.roles.pii-readers]
groups = ["g-pii"]

[[policy.grant]]
name = "agents"
roles = ["*"]
kinds = ["read", "write", "transaction", "utility"]
record_results = "full"

[[policy.mask]]
name = "customer-email"
columns = ["public.customers.email"]
except_roles = ["pii-readers"]
"#;

/// The tags of the messages a `pg_desync.py` scenario received, in order
/// ("closed" for the end of the connection).
fn answer_tags(answers: &Value) -> Vec<&str> {
    answers["answers"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["tag"].as_str()).collect())
        .unwrap_or_default()
}

/// The rows of a `pg_desync.py` scenario run by
/// [`copy_of_masked_column_after`]: `SELECT 1`'s, then the masked copy of
/// the email column, answered in step.
fn assert_one_then_masked(answers: &Value) {
    let rows = tagged(answers, "D");
    assert_eq!(rows.len(), 2, "{answers}");
    assert_eq!(rows[0]["values"][0], "1", "{answers}");
    assert_eq!(rows[1]["values"][0], "****", "{answers}");
}

/// The session was ended by tollgate's own FATAL for a message out of
/// place in the middle of COPY FROM STDIN.
fn assert_ended_in_the_middle_of_a_copy(answers: &Value) {
    let fatal = first_error(&answers["answers"]);
    assert_eq!(fatal["sqlstate"], "08P01", "{answers}");
    assert!(
        fatal["message"]
            .as_str()
            .unwrap_or_default()
            .contains("in the middle of COPY FROM STDIN"),
        "not tollgate's own refusal: {answers}"
    );
}

/// Rows of `orders_copy` whose text is `x`, as the server counts them.
fn copied_rows(stack: &Stack, x: &str) -> String {
    stack
        .postgres
        .superuser_sql_ok(
            "orders",
            &format!("SELECT count(*) FROM orders_copy WHERE x = '{x}'"),
        )
        .expect("count")
}

/// Runs `scenario` of `pg_desync.py` with `SELECT 1` first and a computed
/// copy of the masked email column second; asserts no email left tollgate.
fn copy_of_masked_column_after(stack: &Stack, agent: &str, scenario: &str) -> Value {
    let answers = raw_protocol_json(
        stack,
        "pg_desync.py",
        agent,
        &[
            scenario,
            "SELECT 1",
            "SELECT email || '' AS copy FROM customers WHERE id = 1",
        ],
    );
    assert!(
        !answers.to_string().contains("@example.com"),
        "a row leaked: {answers}"
    );
    answers
}

/// `sql`, a COPY TO run by the masked `agent`, is refused as a raw stream
/// of masked columns, and nothing of them came out.
fn assert_copy_refused_as_raw_stream(stack: &Stack, agent: &str, sql: &str) {
    let out = stack.agent_psql(agent, sql).output().expect("psql");
    assert!(!out.status.success(), "{sql} ran: {}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("mask:raw_stream"),
        "{sql}: {}",
        text(&out.stderr)
    );
    assert!(!text(&out.stdout).contains("@example.com"), "{sql}");
}

/// A function of the database's own that reads a masked table, run under
/// a name the statement's text does not show as a call of one: attribute
/// notation (`o.customer_email` for `customer_email(o)`), a built-in's
/// name it shares (`lower(o)`, `public.lower(notes)` fitting better than
/// `lower(text)`), or an operator of its own (`n || ''`). Its result is masked like any computed column of a
/// masked table, its errors' messages withheld, and COPY of it refused.
#[test]
fn functions_called_under_names_the_text_hides_are_masked() {
    if !privileged("functions_called_under_names_the_text_hides_are_masked") {
        return;
    }
    let stack = Stack::start_with_policy(MASKING_POLICY).expect("start the stack");
    let agent = stack.idp.token(AGENT_OID, &[]).expect("token");
    // An extension a superuser installed counts as built-in: its
    // functions (citext has a `replace`) and operators leave a masked
    // caller's computed columns alone.
    stack
        .postgres
        .superuser_sql_ok("orders", "CREATE EXTENSION citext")
        .expect("citext");
    let out = stack
        .agent_psql(&agent, "SELECT replace('ab', 'a', 'x'), 1 + 1")
        .output()
        .expect("psql");
    assert_eq!(text(&out.stdout), "xb|2", "{}", text(&out.stderr));
    stack
        .postgres
        .superuser_sql_ok(
            "orders",
            "CREATE TABLE notes (id int, customer int); INSERT INTO notes VALUES (1, 1);
             CREATE FUNCTION customer_email(n notes) RETURNS text LANGUAGE sql
               RETURN (SELECT email FROM customers WHERE id = n.customer);
             CREATE FUNCTION public.lower(n notes) RETURNS text LANGUAGE sql
               RETURN (SELECT email FROM customers WHERE id = n.customer);
             CREATE FUNCTION notes_concat(n notes, t text) RETURNS text LANGUAGE sql
               RETURN (SELECT email FROM customers WHERE id = n.customer) || t;
             CREATE OPERATOR || (leftarg = notes, rightarg = text, function = notes_concat);",
        )
        .expect("the functions");
    for sql in [
        "SELECT n.customer_email AS e FROM notes n",
        "SELECT (n).customer_email AS e FROM notes n",
        "SELECT lower(n) AS e FROM notes n",
        "SELECT n || '' AS e FROM notes n",
    ] {
        let out = stack.agent_psql(&agent, sql).output().expect("psql");
        assert_eq!(
            text(&out.stdout),
            "****",
            "{sql}: {}\n{}",
            text(&out.stderr),
            stack.gateway.log()
        );
    }
    // The function's value in an error's text.
    let out = stack
        .agent_psql(&agent, "SELECT n.customer_email::int FROM notes n")
        .output()
        .expect("psql");
    assert!(!out.status.success());
    assert!(
        !text(&out.stderr).contains("@example.com"),
        "{}",
        text(&out.stderr)
    );
    assert_copy_refused_as_raw_stream(
        &stack,
        &agent,
        "COPY (SELECT n.customer_email FROM notes n) TO STDOUT",
    );
}

/// A mask pattern whose `*` runs across the end of the table name
/// (`*email`: any column ending in "email", of any table) masks what an
/// exact one does: computed columns of the table, and COPY of it refused.
#[test]
fn a_mask_pattern_with_a_star_across_the_table_name_masks_computed_columns_and_copy() {
    if !privileged(
        "a_mask_pattern_with_a_star_across_the_table_name_masks_computed_columns_and_copy",
    ) {
        return;
    }
    let policy = MASKING_POLICY.replace(r#"["public.customers.email"]"#, r#"["*email"]"#);
    assert_ne!(policy, MASKING_POLICY, "the mask pattern was replaced");
    let stack = Stack::start_with_policy(&policy).expect("start the stack");
    let agent = stack.idp.token(AGENT_OID, &[]).expect("token");
    let sql = "SELECT id, email, email || '' AS copy, name FROM customers WHERE id = 1";
    let out = stack.agent_psql(&agent, sql).output().expect("psql");
    assert_eq!(
        text(&out.stdout),
        "1|****|****|Ada",
        "{}\n{}",
        text(&out.stderr),
        stack.gateway.log()
    );
    assert_copy_refused_as_raw_stream(&stack, &agent, "COPY customers TO STDOUT");
}

/// Masks are resolved against the catalog before any of the agent's
/// messages is relayed; when that fails, the session does not start
/// (fail closed), the agent is told why, and the refusal is on record.
#[test]
fn a_session_whose_masked_columns_cannot_be_resolved_does_not_start() {
    if !privileged("a_session_whose_masked_columns_cannot_be_resolved_does_not_start") {
        return;
    }
    let stack = Stack::start_with_policy(MASKING_POLICY).expect("start the stack");
    // tollgate's upstream role may no longer read the columns' catalog
    // (it is a superuser in the other tests, which reads anything).
    stack
        .postgres
        .superuser_sql_ok(
            "orders",
            &format!(
                "ALTER ROLE {} NOSUPERUSER; REVOKE SELECT ON pg_catalog.pg_attribute FROM PUBLIC",
                stack.postgres.gateway_user
            ),
        )
        .expect("revoke");
    let agent = stack.idp.token(AGENT_OID, &[]).expect("token");
    let out = agent_psql(&stack, &agent)
        .args(["-c", "SELECT email FROM customers WHERE id = 1"])
        .output()
        .expect("psql");
    assert!(!out.status.success(), "the session started");
    assert!(!text(&out.stdout).contains("@example.com"), "a row leaked");
    let err = text(&out.stderr);
    assert!(
        err.contains("masked columns could not be resolved")
            && err.contains("42501 permission denied for table pg_attribute"),
        "{err}"
    );
    let rows = stack
        .audit_rows(
            "SELECT status_detail FROM audit WHERE phase = 'refusal' AND class_uid = 3002 \
             AND starts_with(status_detail, 'masks_unresolved: ')",
            1,
            AUDIT_WAIT,
        )
        .expect("the refusal row");
    assert!(
        rows[0]["status_detail"]
            .as_str()
            .unwrap_or_default()
            .contains("permission denied"),
        "{rows:?}"
    );
    // Nothing of the agent's reached the server.
    let statements = stack
        .audit_rows(
            "SELECT count(*) AS n FROM audit WHERE query_info_query_string LIKE '%customers%'",
            1,
            AUDIT_WAIT,
        )
        .expect("count");
    assert_eq!(statements[0]["n"], 0, "{statements:?}");
}

#[test]
fn masked_columns_never_leave_tollgate_unless_the_role_may_see_them() {
    if !privileged("masked_columns_never_leave_tollgate_unless_the_role_may_see_them") {
        return;
    }
    let stack = Stack::start_with_policy(MASKING_POLICY).expect("start the stack");
    let agent = stack.idp.token(AGENT_OID, &[]).expect("token");
    let sql = "SELECT id, email, email AS contact, upper(email) AS shout, name FROM customers WHERE id = 1";
    let out = stack.agent_psql(&agent, sql).output().expect("psql");
    assert_eq!(
        text(&out.stdout),
        "1|****|****|****|Ada",
        "{}\n{}",
        text(&out.stderr),
        stack.gateway.log()
    );
    // A row over 1 MiB in a session with masks: held whole under the
    // budget all sessions share and masked like any other when its result
    // masks a column (a computed column is masked too, as it could be
    // derived from a masked one); passed on as it arrives, whole, when
    // none of its result's columns is masked.
    let big = "SELECT email, repeat('x', 5000000) AS big FROM customers WHERE id = 1";
    let out = stack.agent_psql(&agent, big).output().expect("psql");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "****|****");
    stack
        .postgres
        .superuser_sql_ok(
            "orders",
            "CREATE TABLE documents (id int, body text); \
             INSERT INTO documents VALUES (1, repeat('x', 5000000))",
        )
        .expect("a table with a large value");
    let big = "SELECT id, body FROM documents";
    let out = stack.agent_psql(&agent, big).output().expect("psql");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout) == format!("1|{}", "x".repeat(5_000_000)),
        "the large row came out altered: {} bytes, starting {:?}",
        out.stdout.len(),
        String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(40)])
    );

    // Binary results through psycopg: masked too, and the driver still parses the row.
    let script = format!(
        r#"
import json, psycopg
with psycopg.connect(host="127.0.0.1", port={port}, user="agent", dbname="orders", password={agent:?}, sslmode="disable") as conn:
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT id, email FROM customers WHERE id = %s", (2,))
        print(json.dumps(cur.fetchall()))
"#,
        port = stack.postgres.port
    );
    let out = AgentCgroup::command(&stack.gateway.config.agent_cgroup, &duckdb::python())
        .args(["-c", &script])
        .output()
        .expect("python");
    assert_eq!(
        text(&out.stdout),
        r#"[[2, "****"]]"#,
        "{}",
        text(&out.stderr)
    );

    // A computed copy of the column reached another way: the RETURNING
    // of a write, a CTE that shares the table's name while the query reads
    // the schema-qualified table, `TABLE customers`. Each is masked.
    for sql in [
        "UPDATE customers SET name = name WHERE id = 1 RETURNING upper(email) AS shout",
        "WITH customers AS (SELECT 1) SELECT lower(email) AS shout FROM public.customers WHERE id = 1",
        "SELECT upper(email) AS shout FROM (TABLE customers) c WHERE id = 1",
    ] {
        let out = stack.agent_psql(&agent, sql).output().expect("psql");
        assert!(out.status.success(), "{sql}: {}", text(&out.stderr));
        assert!(
            !text(&out.stdout).to_lowercase().contains("@example.com"),
            "{sql} leaked: {}",
            text(&out.stdout)
        );
        assert!(text(&out.stdout).contains("****"), "{sql}: {}", text(&out.stdout));
    }

    // Through a function of the database's own, whose result columns
    // belong to no table, and through a notification's payload.
    stack
        .postgres
        .superuser_sql_ok(
            "orders",
            "CREATE FUNCTION email_of(i int) RETURNS text LANGUAGE sql \
             AS $$ SELECT email FROM customers WHERE id = i $$",
        )
        .expect("create the function");
    stack
        .postgres
        .superuser_sql_ok(
            "orders",
            "CREATE FUNCTION listen_c() RETURNS void LANGUAGE plpgsql \
             AS $$ BEGIN EXECUTE 'LISTEN c'; END $$",
        )
        .expect("create the function");
    for sql in [
        &["SELECT email_of(1) AS e"][..],
        &[
            "SELECT listen_c()",
            "SELECT pg_notify('c', email) FROM customers WHERE id = 1",
            "SELECT 'after the notification'",
        ],
    ] {
        let mut psql = stack.agent_psql(&agent, sql[0]);
        for more in &sql[1..] {
            psql.args(["-c", more]);
        }
        let out = psql.output().expect("psql");
        assert!(out.status.success(), "{sql:?}: {}", text(&out.stderr));
        let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            !shown.to_lowercase().contains("@example.com"),
            "{sql:?} leaked: {shown}"
        );
        if sql.len() > 1 {
            // The notification itself still arrives, without its payload.
            assert!(shown.contains("Asynchronous notification \"c\""), "{shown}");
        }
    }
    // A copy made in the session (a table that did not exist when the
    // session's masks were resolved) is masked in that session.
    let out = stack
        .agent_psql(
            &agent,
            "SELECT email INTO TEMP copy_of_email FROM customers WHERE id = 1",
        )
        .args(["-c", "SELECT * FROM copy_of_email"])
        .output()
        .expect("psql");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stdout).contains("@example.com"),
        "the copy leaked: {}",
        text(&out.stdout)
    );
    assert!(text(&out.stdout).contains("****"), "{}", text(&out.stdout));

    // A whole-row reference carries the masked column too.
    let out = stack
        .agent_psql(&agent, "SELECT c FROM customers c WHERE id = 1")
        .output()
        .expect("psql");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stdout).contains("@example.com"),
        "whole row leaked: {}",
        text(&out.stdout)
    );

    // The server's error would quote the value: its text is withheld.
    let out = stack
        .agent_psql(&agent, "SELECT email::int FROM customers WHERE id = 1")
        .output()
        .expect("psql");
    assert!(!out.status.success());
    assert!(
        !text(&out.stderr).contains("@example.com"),
        "error leaked the value: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("withheld"),
        "{}",
        text(&out.stderr)
    );

    // A RowDescription of another statement cannot plan a portal's
    // masking: the rows come back masked whole rather than raw.
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pg_describe_other.py");
    let out = AgentCgroup::command(&stack.gateway.config.agent_cgroup, &duckdb::python())
        .arg(script)
        .args(["127.0.0.1", &stack.postgres.port.to_string(), &agent])
        .output()
        .expect("python");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(answer["rows"], serde_json::json!([[null]]), "{answer}");

    // COPY would stream the column raw: refused for a masked caller, of
    // the table or of a query calling a function of the database's own.
    for sql in [
        "COPY customers TO STDOUT",
        "COPY (SELECT email_of(1)) TO STDOUT",
    ] {
        assert_copy_refused_as_raw_stream(&stack, &agent, sql);
    }

    // An error from a Bind (to a statement that does not exist) makes the
    // server skip the Query behind it in the pipeline: tollgate must not
    // take the next statement's answers for that Query's, or a computed
    // column of a masked table would be planned as unmasked.
    let answers = copy_of_masked_column_after(&stack, &agent, "bind_error");
    let rows = tagged(&answers, "D");
    assert_eq!(rows.len(), 1, "{answers}");
    assert_eq!(rows[0]["values"][0], "****", "{answers}");

    // A Sync sent right behind a COPY FROM STDIN gets no answer (the
    // server ignores it in copy mode), also after an earlier COPY in the
    // session: otherwise the next Query's answers are taken for the
    // Sync's and every later statement is masked by the plan of the one
    // before it.
    stack
        .postgres
        .superuser_sql_ok("orders", "CREATE TABLE orders_copy (x text)")
        .expect("table");
    let answers = copy_of_masked_column_after(&stack, &agent, "copy_sync");
    assert_one_then_masked(&answers);
    // So does one sent behind copy data, before the copy ended: copy data
    // alone does not end a copy.
    let answers = copy_of_masked_column_after(&stack, &agent, "copy_data_sync");
    assert_one_then_masked(&answers);
    // And one sent behind a row that fails the copy: the server reads it
    // after the error, and would answer it with a ReadyForQuery that
    // nothing waits for, taken for the next Query's.
    let answers = copy_of_masked_column_after(&stack, &agent, "copy_error_sync");
    assert_one_then_masked(&answers);
    assert_eq!(
        first_error(&answers["answers"])["sqlstate"],
        "22P04",
        "{answers}"
    );
    assert_eq!(
        copied_rows(&stack, "copied"),
        "1",
        "the row of copy data went in"
    );
    // A Query sent right behind a COPY FROM STDIN, before the server
    // started the copy, waits for the server's answer to the COPY: in copy
    // mode it is out of place, and tollgate ends the session itself (the
    // server would have taken it as copy data or, up to PostgreSQL 13,
    // thrown it away with an error that left every later answer matched
    // against the wrong statement).
    let answers = copy_of_masked_column_after(&stack, &agent, "copy_query");
    let tags = answer_tags(&answers);
    assert_eq!(tags, ["G", "E", "closed"], "{answers}");
    assert_ended_in_the_middle_of_a_copy(&answers);
    stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' AND policy_uid = 'protocol:malformed' \
             AND contains(status_detail, 'in the middle of COPY FROM STDIN')",
            1,
            AUDIT_WAIT,
        )
        .expect("the refusal row");

    // One Query may start two copies in turn: each is relayed, and what
    // follows is answered and masked in step.
    let answers = copy_of_masked_column_after(&stack, &agent, "two_copies");
    let tags = answer_tags(&answers);
    assert_eq!(
        tags,
        ["G", "C", "G", "C", "Z", "T", "D", "C", "Z", "T", "D", "C", "Z"],
        "{answers}"
    );
    assert_one_then_masked(&answers);
    assert_eq!(
        copied_rows(&stack, "copied twice"),
        "2",
        "a row of copy data went in with each copy"
    );
    // A Query sent behind the first copy's end, before the second copy
    // started, waits for it as it would behind the Query of a copy: once
    // the second copy has started, it is out of place, and tollgate ends
    // the session (the server would have taken it for copy data).
    let answers = copy_of_masked_column_after(&stack, &agent, "second_copy_query");
    let tags = answer_tags(&answers);
    assert_eq!(tags, ["G", "C", "G", "E", "closed"], "{answers}");
    assert_ended_in_the_middle_of_a_copy(&answers);
    stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' AND policy_uid = 'protocol:malformed' \
             AND contains(status_detail, 'in the middle of COPY FROM STDIN')",
            2,
            AUDIT_WAIT,
        )
        .expect("the refusal rows of both sessions");

    // A portal name taken over in SQL (CLOSE, then DECLARE a cursor of
    // the same name) is no longer the portal tollgate saw bound: the
    // Execute is refused rather than decided as the old statement.
    let out = raw_protocol_script(
        &stack,
        "pg_desync.py",
        &agent,
        &[
            "cursor",
            "CLOSE c; DECLARE c CURSOR WITH HOLD FOR SELECT upper(email) AS x FROM customers WHERE id = 1",
            "",
        ],
    );
    assert!(
        !out.to_lowercase().contains("@example.com"),
        "a cursor under a reused portal name leaked: {out}"
    );
    assert!(out.contains("mask:unparsed"), "{out}");
    // So is a portal name the server dropped with its transaction (a
    // COMMIT in the pipeline) and a function then opened a cursor under.
    stack
        .postgres
        .superuser_sql_ok(
            "orders",
            "CREATE FUNCTION open_shouting_cursor(name refcursor) RETURNS refcursor \
             LANGUAGE plpgsql AS $$ BEGIN \
             OPEN name FOR SELECT upper(email) AS x FROM customers WHERE id = 1; \
             RETURN name; END $$",
        )
        .expect("create the function");
    // The transaction ended by a COMMIT in the pipeline, by a simple
    // Query (which commits the implicit transaction when done), or by a
    // Sync the server had not answered when the Execute came.
    for (scenario, second) in [
        ("commit_then_cursor", ""),
        ("query_then_cursor", "SELECT 1"),
        ("sync_then_cursor", ""),
    ] {
        let out = raw_protocol_script(
            &stack,
            "pg_desync.py",
            &agent,
            &[scenario, "SELECT open_shouting_cursor('c')", second],
        );
        assert!(
            !out.to_lowercase().contains("@example.com"),
            "{scenario}: a cursor under a portal name its transaction ended leaked: {out}"
        );
        assert!(out.contains("mask:unparsed"), "{scenario}: {out}");
    }
    // Within one transaction, a function of the database's own may close
    // the portal and open a cursor under its name: the Execute after it
    // is refused rather than decided as the statement bound. So it is
    // when an immutable function does so where the server plans the
    // statement, at its Bind, with no Execute of it.
    for (function, volatility, scenario) in [
        ("reopen_shouting_cursor", "VOLATILE", "function_then_cursor"),
        (
            "reopen_when_planned",
            "IMMUTABLE",
            "bind_function_then_cursor",
        ),
    ] {
        stack
            .postgres
            .superuser_sql_ok(
                "orders",
                &format!(
                    "CREATE FUNCTION {function}(name refcursor) RETURNS refcursor \
                     LANGUAGE plpgsql {volatility} AS $$ BEGIN CLOSE name; \
                     OPEN name FOR SELECT upper(email) AS x FROM customers WHERE id = 1; \
                     RETURN name; END $$"
                ),
            )
            .expect("create the function");
        let out = raw_protocol_script(
            &stack,
            "pg_desync.py",
            &agent,
            &[scenario, &format!("SELECT {function}('c')"), ""],
        );
        assert!(
            !out.to_lowercase().contains("@example.com"),
            "{scenario}: a cursor a function reopened under a portal's name leaked: {out}"
        );
        assert!(out.contains("mask:unparsed"), "{scenario}: {out}");
    }
    // A portal that calls such a function stays known to its own next
    // Execute: a client reading it in steps gets every step.
    let out = raw_protocol_script(
        &stack,
        "pg_desync.py",
        &agent,
        &[
            "steps",
            "SELECT open_shouting_cursor(('k' || id)::refcursor) FROM customers ORDER BY id",
            "",
        ],
    );
    let steps: Vec<&str> = out.matches(r#"{"tag": "s"}"#).collect();
    assert_eq!(steps.len(), 2, "two steps, each suspended: {out}");
    assert!(!out.contains(r#""tag": "E""#), "{out}");
    // A portal's Describe behind an unanswered Sync waits for it (the
    // portal may have ended there) before it is sent, so the Execute
    // behind it is queued when its RowDescription comes: that plans the
    // masking, and only the masked column is masked.
    let out = raw_protocol_script(
        &stack,
        "pg_desync.py",
        &agent,
        &[
            "describe_after_sync",
            "SELECT id, email FROM customers WHERE id = 1",
            "",
        ],
    );
    assert!(
        !out.to_lowercase().contains("@example.com"),
        "the masked column leaked: {out}"
    );
    assert!(
        out.contains(r#"{"tag": "D", "values": ["1", "#),
        "the id column was masked too: {out}"
    );

    // Rows fetched from a cursor: FETCH names no table, so its rows count
    // as reads of masked columns, computed ones included (each -c is its
    // own Query message, so the FETCH is decided on its own).
    let out = stack
        .agent_psql(&agent, "BEGIN")
        .args([
            "-c",
            "DECLARE c CURSOR FOR SELECT upper(email) AS shout FROM customers WHERE id = 1",
            "-c",
            "FETCH ALL FROM c",
            "-c",
            "COMMIT",
        ])
        .output()
        .expect("psql");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stdout).to_lowercase().contains("@example.com"),
        "a cursor leaked the value: {}",
        text(&out.stdout)
    );
    assert!(text(&out.stdout).contains("****"), "{}", text(&out.stdout));

    // A holder of the exempt role sees the real value.
    let reader = stack
        .idp
        .token("oid-pii-reader", &["--groups", "g-pii"])
        .expect("token");
    let out = stack
        .agent_psql(&reader, "SELECT email FROM customers WHERE id = 1")
        .output()
        .expect("psql");
    assert_eq!(
        text(&out.stdout),
        "ada@example.com",
        "{}",
        text(&out.stderr)
    );

    let row = outcome_of(&stack, sql);
    let masked: Vec<String> = serde_json::from_value(row["masked_columns"].clone()).expect("list");
    assert!(
        masked.contains(&"public.customers.email".to_owned()),
        "{masked:?}"
    );
    assert!(masked.iter().any(|c| c.starts_with("shout")), "{masked:?}");
    assert_eq!(
        row["action_id"], 4,
        "a masked answer is OCSF action Modified"
    );
    assert!(!row.to_string().contains("ada@example.com"));
}

#[test]
fn settings_that_change_how_sql_is_read_never_reach_the_server() {
    let Some((stack, token)) = start("settings_that_change_how_sql_is_read_never_reach_the_server")
    else {
        return;
    };
    // With standard_conforming_strings off, PostgreSQL would read this as a
    // SELECT followed by a DELETE, while a standard parser sees one SELECT.
    // tollgate does not pass the agent's `options` to the server.
    let out = stack
        .agent_psql(&token, r"SELECT 'a\' , '; DELETE FROM customers; --'")
        .env("PGOPTIONS", "-c standard_conforming_strings=off")
        .output()
        .expect("psql");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(customers_left(&stack), "3", "the hidden DELETE ran");
    // Turning it off is refused whatever the grant; changing role or
    // search_path in SQL is an admin statement, however the name is quoted.
    let out = stack
        .agent_psql(&token, "SET standard_conforming_strings = off")
        .output()
        .expect("psql");
    assert!(
        text(&out.stderr).contains("encoding:standard_conforming_strings"),
        "{}",
        text(&out.stderr)
    );
    for sql in [
        r#"SET "role" = 'postgres'"#,
        r#"SET "search_path" = pg_catalog"#,
        "EXECUTE some_statement",
    ] {
        let out = stack.agent_psql(&token, sql).output().expect("psql");
        assert!(
            text(&out.stderr).contains("agents:kind:admin"),
            "{sql}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_function_call_message_is_refused_and_the_session_goes_on() {
    let Some((stack, token)) = start("a_function_call_message_is_refused_and_the_session_goes_on")
    else {
        return;
    };
    // pg_read_file(text): what a FunctionCall would reach without SQL.
    let oid = stack
        .postgres
        .superuser_sql_ok("orders", "SELECT 'pg_read_file(text)'::regprocedure::oid")
        .expect("oid");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pg_function_call.py");
    let out = AgentCgroup::command(&stack.gateway.config.agent_cgroup, &duckdb::python())
        .arg(script)
        .args([
            "127.0.0.1",
            &stack.postgres.port.to_string(),
            &token,
            &oid,
            "/etc/hostname",
        ])
        .output()
        .expect("python");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(answer["call"]["sqlstate"], "42501", "{answer}");
    assert!(
        answer["call"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("protocol:function_call"),
        "{answer}"
    );
    assert!(
        answer["call"].get("result").is_none(),
        "the function ran: {answer}"
    );
    assert_eq!(
        answer["after"]["rows"], 1,
        "the session still answers: {answer}"
    );
    let rows = stack
        .audit_rows(
            "SELECT * FROM audit WHERE policy_uid = 'protocol:function_call'",
            1,
            AUDIT_WAIT,
        )
        .expect("refusal row");
    assert_eq!(
        rows[0]["query_info_query_string"],
        format!("FunctionCall (function oid {oid})")
    );
    assert_eq!(rows[0]["actor_user_uid"], AGENT_OID);
}

#[test]
fn a_statement_runs_as_the_server_prepared_it_not_as_last_sent() {
    let Some((stack, token)) = start("a_statement_runs_as_the_server_prepared_it_not_as_last_sent")
    else {
        return;
    };
    let out = raw_protocol_script(
        &stack,
        "pg_reparse.py",
        &token,
        &["DROP TABLE customers", "SELECT 1"],
    );
    let answers: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    // The DROP is refused at its Parse, so it never takes the name: the
    // second Parse finds it free, and the Execute runs what the server
    // prepared under it, the SELECT.
    assert!(
        answers.iter().any(|a| a["sqlstate"] == "42501"
            && a["message"]
                .as_str()
                .unwrap_or_default()
                .contains("kind:ddl")),
        "{answers:?}"
    );
    assert!(
        !answers.iter().any(|a| a["sqlstate"] == "42P05"),
        "the refused DROP took the name: {answers:?}"
    );
    assert_eq!(customers_left(&stack), "3");
}

/// Runs `tests/python/<script>` from the agent cgroup with the gateway's
/// host, port and `token` first; its standard output, once it succeeded.
fn raw_protocol_script(stack: &Stack, script: &str, token: &str, args: &[&str]) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let out = AgentCgroup::command(&stack.gateway.config.agent_cgroup, &duckdb::python())
        .arg(script)
        .args(["127.0.0.1", &stack.postgres.port.to_string(), token])
        .args(args)
        .output()
        .expect("python");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// A raw-protocol script that prints one JSON document.
fn raw_protocol_json(stack: &Stack, script: &str, token: &str, args: &[&str]) -> Value {
    let out = raw_protocol_script(stack, script, token, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{script} printed no JSON ({e}): {out}"))
}

/// Runs one scenario of `pg_unsynced.py`.
fn unsynced(stack: &Stack, token: &str, scenario: &str, refused: &str, allowed: &str) -> Value {
    let result = raw_protocol_json(
        stack,
        "pg_unsynced.py",
        token,
        &[scenario, refused, allowed],
    );
    // Every scenario owes the client its answers: none may hang.
    assert!(result.get("timeout").is_none(), "hung: {result}");
    result
}

fn tags(answers: &Value) -> Vec<String> {
    answers
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["tag"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn refusals_are_answered_in_place_even_when_the_client_has_not_synced() {
    let Some((stack, token)) =
        start("refusals_are_answered_in_place_even_when_the_client_has_not_synced")
    else {
        return;
    };

    // A refused statement's Parse, Bind and Execute followed by Flush: the
    // error is owed on the Flush, in place of the Parse (the statement is
    // refused before the server would parse it).
    let flush = unsynced(&stack, &token, "flush", "DROP TABLE customers", "");
    assert_eq!(tags(&flush["on_flush"]), ["E"], "{flush}");
    assert_eq!(flush["on_flush"][0]["sqlstate"], "42501", "{flush}");
    assert_eq!(tags(&flush["on_sync"]), ["Z"], "{flush}");
    assert_eq!(tags(&flush["after"]), ["T", "D", "C", "Z"], "{flush}");

    // A refused simple Query behind an Execute that was never synced: the
    // Execute's rows come first, then the refusal, then ReadyForQuery.
    let pending = unsynced(
        &stack,
        &token,
        "unsynced",
        "DROP TABLE customers",
        "SELECT id FROM customers ORDER BY id",
    );
    assert_eq!(
        tags(&pending["answers"]),
        ["1", "2", "D", "D", "D", "C", "E", "Z"],
        "{pending}"
    );
    assert_eq!(pending["answers"][6]["sqlstate"], "42501", "{pending}");
    assert_eq!(tags(&pending["after"]), ["T", "D", "C", "Z"], "{pending}");

    // A Query in the middle of COPY FROM STDIN is a protocol error: the
    // session ends with a clear FATAL instead of drifting out of step.
    let copy = unsynced(&stack, &token, "copy", "SELECT 1", "customers");
    assert_eq!(tags(&copy["copy"]), ["G"], "{copy}");
    let fatal = first_error(&copy["answers"]);
    assert_eq!(fatal["sqlstate"], "08P01", "{copy}");
    assert_eq!(fatal["severity"], "FATAL", "{copy}");
    assert_eq!(
        tags(&copy["answers"]).last().map(String::as_str),
        Some("closed"),
        "{copy}"
    );

    // In a transaction block a refusal fails the transaction, as an error
    // from the server would: the agent cannot commit half of what it meant.
    let txn = unsynced(&stack, &token, "transaction", "DROP TABLE customers", "");
    assert_eq!(txn["begin"][1]["status"], "T", "{txn}");
    assert_eq!(tags(&txn["refused"]), ["E", "Z"], "{txn}");
    assert_eq!(txn["refused"][0]["sqlstate"], "42501", "{txn}");
    assert_eq!(txn["refused"][1]["status"], "E", "{txn}");
    assert_eq!(txn["rollback"][1]["status"], "I", "{txn}");

    // Each refusal is on record, and the table is still there.
    let refusals = stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' AND query_info_query_string = 'DROP TABLE customers'",
            3,
            AUDIT_WAIT,
        )
        .expect("refusal rows");
    assert_eq!(refusals.len(), 3);
    assert_eq!(customers_left(&stack), "3");

    // A client that sends its copy data and CopyDone without waiting for
    // CopyInResponse: the copy completes and the session goes on.
    let early = unsynced(
        &stack,
        &token,
        "copy_early",
        "12\tCarol\tcarol@example.com",
        "customers",
    );
    assert_eq!(
        tags(&early["answers"]),
        ["G", "C", "Z", "T", "D", "C", "Z"],
        "{early}"
    );
    assert_eq!(
        early["answers"][4]["values"][0], "4",
        "the row was copied: {early}"
    );
    assert_eq!(tags(&early["after"]), ["T", "D", "C", "Z"], "{early}");
}

#[test]
fn a_statement_name_reused_across_pipelines_is_decided_as_the_server_runs_it() {
    let Some((stack, token)) =
        start("a_statement_name_reused_across_pipelines_is_decided_as_the_server_runs_it")
    else {
        return;
    };
    // `s` is prepared as a DELETE without WHERE, which is refused at its
    // Parse and so never takes the name; a second Parse of `s` as a
    // harmless SELECT, in a later pipeline, finds it free, and the Bind
    // and Execute run what the server prepared: the SELECT.
    let answers = raw_protocol_json(
        &stack,
        "pg_desync.py",
        &token,
        &["collision", "DELETE FROM customers", "SELECT 1"],
    );
    assert!(
        has_error(&answers, "42501", "delete_without_where"),
        "{answers}"
    );
    assert!(
        !tagged(&answers, "E")
            .iter()
            .any(|e| e["sqlstate"] == "42P05"),
        "the refused DELETE took the name: {answers}"
    );
    let rows = tagged(&answers, "D");
    assert_eq!(
        rows.last().map(|r| &r["values"][0]),
        Some(&Value::from("1")),
        "{answers}"
    );
    assert_eq!(customers_left(&stack), "3", "the DELETE ran");
}

/// A statement policy denies is refused at its Parse, with its refusal on
/// record: the server neither parses it (SQL's `EXECUTE name` would run a
/// statement parsed under that name) nor plans it at a Bind (evaluating
/// immutable functions of its constants); the session goes on.
#[test]
fn a_denied_statement_is_refused_at_its_parse() {
    let Some((stack, token)) = start("a_denied_statement_is_refused_at_its_parse") else {
        return;
    };
    let answers = raw_protocol_json(
        &stack,
        "pg_desync.py",
        &token,
        &["bind_only", "DELETE FROM customers", "SELECT 1"],
    );
    assert!(
        tagged(&answers, "1").is_empty(),
        "the Parse reached the server: {answers}"
    );
    assert!(
        tagged(&answers, "2").is_empty(),
        "the Bind reached the server: {answers}"
    );
    let errors = tagged(&answers, "E");
    assert_eq!(errors.len(), 1, "{answers}");
    assert_eq!(errors[0]["sqlstate"], "42501", "{answers}");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("delete_without_where"),
        "{answers}"
    );
    let rows = tagged(&answers, "D");
    assert_eq!(rows.len(), 1, "the session goes on: {answers}");
    assert_eq!(rows[0]["values"][0], "1", "{answers}");
    stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' AND query_info_query_string = 'DELETE FROM customers'",
            1,
            Duration::from_secs(10),
        )
        .expect("the refusal is on record");
    assert_eq!(customers_left(&stack), "3");
}

/// A portal bound through the protocol and run by SQL's `FETCH` would run
/// its statement (here an UPDATE ... RETURNING) under the FETCH's record,
/// which names no table: the FETCH is refused, with its refusal on record,
/// and the UPDATE never runs.
#[test]
fn a_protocol_portal_is_not_run_by_sql_fetch() {
    let Some((stack, token)) = start("a_protocol_portal_is_not_run_by_sql_fetch") else {
        return;
    };
    // As a Query; and parsed before the portal existed, then run by a
    // protocol Execute.
    for scenario in ["fetch_portal", "fetch_parsed_first"] {
        let answers = raw_protocol_json(
            &stack,
            "pg_desync.py",
            &token,
            &[
                scenario,
                "UPDATE customers SET name = 'fetched' WHERE id = 1 RETURNING id",
                "FETCH ALL FROM p",
            ],
        );
        assert!(
            has_error(&answers, "42501", "protocol:run_by_name"),
            "{scenario}: {answers}"
        );
        assert_eq!(
            stack
                .postgres
                .superuser_sql_ok(
                    "orders",
                    "SELECT count(*) FROM customers WHERE name = 'fetched'"
                )
                .expect("count"),
            "0",
            "{scenario}: the UPDATE ran: {answers}"
        );
    }
    stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' AND policy_uid = 'protocol:run_by_name'",
            1,
            Duration::from_secs(10),
        )
        .expect("the refusal is on record");
}

/// A pipeline outside a transaction block is one implicit transaction: an
/// INSERT that completed is rolled back when a later statement of the
/// pipeline fails, and its outcome says so instead of success.
#[test]
fn an_execute_rolled_back_with_its_pipeline_is_not_recorded_as_done() {
    let Some((stack, token)) =
        start("an_execute_rolled_back_with_its_pipeline_is_not_recorded_as_done")
    else {
        return;
    };
    let insert = "INSERT INTO customers (id, name, email) VALUES (77, 'Rolled', 'r@example.com')";
    let answers = raw_protocol_json(
        &stack,
        "pg_desync.py",
        &token,
        &["rollback", insert, "SELECT 1/0"],
    );
    // 1/0 of constants fails as the server plans it, at the Bind.
    assert_eq!(
        tags(&answers["answers"]),
        ["1", "2", "C", "1", "E", "Z"],
        "{answers}"
    );
    assert_eq!(
        stack
            .postgres
            .superuser_sql_ok("orders", "SELECT count(*) FROM customers WHERE id = 77")
            .expect("count"),
        "0",
        "the INSERT was rolled back"
    );
    let outcome = outcome_like(&stack, insert);
    assert_eq!(outcome["status_id"], 2, "{outcome}");
    assert_eq!(outcome["response_error_code"], "22012", "{outcome}");
    assert!(
        outcome["status_detail"]
            .as_str()
            .unwrap_or_default()
            .contains("rolled back with its pipeline's implicit transaction"),
        "{outcome}"
    );
}

/// An empty database in the startup means PostgreSQL's default, the
/// database named after the user: tollgate audits and checks that name
/// (here the agent's user "orders"), and asks the server for it by name,
/// not for the default of its own user, which has no database here.
#[test]
fn a_login_with_an_empty_database_opens_the_one_audited() {
    let Some((stack, token)) = start("a_login_with_an_empty_database_opens_the_one_audited") else {
        return;
    };
    let answer = stack.agent_login_as("orders", "", &token).expect("login");
    assert_eq!(answer["outcome"], "ok", "{answer}");
    let rows = stack
        .audit_rows(
            "SELECT database_name FROM audit WHERE phase = 'session'",
            1,
            AUDIT_WAIT,
        )
        .expect("the login's row");
    assert!(
        rows.iter().all(|r| r["database_name"] == "orders"),
        "{rows:?}"
    );
    let opened = format!(
        "connection authorized: user={} database=orders",
        stack.postgres.gateway_user
    );
    assert!(
        stack.postgres.log().contains(&opened),
        "the server did not open orders for tollgate:\n{}",
        stack.postgres.log()
    );
}

#[test]
fn a_pipeline_that_fails_before_its_sync_goes_on_after_the_sync() {
    let Some((stack, token)) =
        start("a_pipeline_that_fails_before_its_sync_goes_on_after_the_sync")
    else {
        return;
    };
    // libpq's pipeline pattern: flush, read the error, send more, then
    // Sync. The server skips what came after the error up to the Sync.
    let answers = raw_protocol_json(
        &stack,
        "pg_desync.py",
        &token,
        &["pipeline_error", "SELECT 1/0", "SELECT 2"],
    );
    assert!(
        tagged(&answers, "E")
            .iter()
            .any(|m| m["sqlstate"] == "22012"),
        "{answers}"
    );
    // The session is alive and in step: the last Query gets its row.
    let rows = tagged(&answers, "D");
    assert_eq!(rows.len(), 1, "{answers}");
    assert_eq!(rows[0]["values"][0], "2", "{answers}");
}

// In `buffered` durability the session writes its records itself, on its
// own thread. A pipeline larger than the sockets between client, tollgate
// and server hold keeps sends, answers and record writes in flight at
// once: every answer must come, and every statement must be on record,
// request and outcome.
#[test]
fn buffered_durability_answers_and_records_a_pipeline_larger_than_the_sockets() {
    let test = "buffered_durability_answers_and_records_a_pipeline_larger_than_the_sockets";
    if !privileged(test) {
        return;
    }
    let stack = Stack::start_with(
        tollgate_tests::Postgres::start().expect("start PostgreSQL"),
        |config| config.audit_extra = "durability = \"buffered\"".into(),
    )
    .expect("start PostgreSQL, IdP and tollgate");
    stack
        .postgres
        .superuser_sql_ok(
            "orders",
            "CREATE TABLE wide AS SELECT g AS id, repeat('x', 2000) AS filler FROM generate_series(1, 50) g",
        )
        .expect("create wide");
    let token = stack
        .idp
        .token(AGENT_OID, &["--name", "clients-agent"])
        .expect("mint a token");
    // 4 KB of statement text each: 2 000 of them are 8 MB of requests,
    // and 80 MB of answers.
    let statement = format!(
        "SELECT id, filler FROM wide WHERE id <= 20 /* {} */",
        "p".repeat(4000)
    );
    let statements = 2000;
    let result = raw_protocol_json(
        &stack,
        "pg_pipeline_flood.py",
        &token,
        &[&statements.to_string(), &statement],
    );
    assert_eq!(result["complete"], statements, "{result}");
    assert_eq!(result["errors"], serde_json::json!([]), "{result}");
    assert_eq!(result["ready"], true, "{result}");
    for phase in ["request", "outcome"] {
        let sql = format!(
            "SELECT sequence FROM audit WHERE phase = '{phase}' AND query_info_query_string LIKE 'SELECT id, filler FROM wide%'"
        );
        let rows = stack
            .audit_rows(&sql, statements, AUDIT_WAIT)
            .expect("audit rows");
        assert_eq!(rows.len(), statements, "{phase} rows");
    }
}

/// Gives tollgate's own database role a default for `setting`, as a DBA
/// might (`ALTER ROLE ... SET`), which tollgate's login must override.
fn set_gateway_role_default(stack: &Stack, setting: &str, value: &str) {
    let gateway_user = &stack.postgres.gateway_user;
    stack
        .postgres
        .superuser_sql_ok(
            "orders",
            &format!("ALTER ROLE {gateway_user} SET {setting} = {value}"),
        )
        .expect("role default");
}

/// Creates, as the superuser, `function()`: it sets `setting` to `value`
/// with set_config, where tollgate cannot see it (a function of the
/// agent's own).
fn create_setting_changer(stack: &Stack, function: &str, setting: &str, value: &str) {
    stack
        .postgres
        .superuser_sql_ok(
            "orders",
            &format!(
                "CREATE FUNCTION {function}() RETURNS text LANGUAGE sql \
                 AS $$ SELECT set_config('{setting}', '{value}', false) $$"
            ),
        )
        .expect("create the function");
}

/// standard_conforming_strings stays on: tollgate asks for it at login,
/// over a role default that turns it off, and a function of the agent's
/// that turns it off ends the session (FATAL 42501) before anything after
/// the server's report reaches the agent. With it off, a backslash in a
/// plain string would hide a quote, and the server would split statements
/// where tollgate does not.
#[test]
fn standard_conforming_strings_stays_on_behind_the_policy() {
    let Some((stack, token)) = start("standard_conforming_strings_stays_on_behind_the_policy")
    else {
        return;
    };
    set_gateway_role_default(&stack, "standard_conforming_strings", "off");
    create_setting_changer(
        &stack,
        "plain_backslashes",
        "standard_conforming_strings",
        "off",
    );
    let mut psql = agent_psql(&stack, &token);
    psql.args([
        "-c",
        "SHOW standard_conforming_strings",
        "-c",
        "SELECT plain_backslashes()",
        "-c",
        "SELECT 'never run'",
    ]);
    let out = psql.output().expect("run psql");
    let stderr = text(&out.stderr);
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("on"),
        "the login set it on: {stdout}\n{stderr}"
    );
    assert!(stderr.contains("FATAL:  42501"), "{stderr}");
    assert!(
        stderr.contains("standard_conforming_strings became off"),
        "{stderr}"
    );
    assert!(!stdout.contains("never run"), "{stdout}");
}

/// A function that turns standard_conforming_strings off, run by an
/// Execute, changes how the server reads what follows it in the pipeline
/// before the change is reported (at the Sync). A Query right behind it,
/// before any Sync, whose backslash would then hide a quote (a harmless
/// SELECT of two strings to tollgate, a SELECT and a CREATE TABLE to the
/// server) is refused, and its refusal recorded; the table never exists.
#[test]
fn text_behind_an_unsynced_settings_change_is_refused_when_it_could_read_otherwise() {
    let Some((stack, token)) =
        start("text_behind_an_unsynced_settings_change_is_refused_when_it_could_read_otherwise")
    else {
        return;
    };
    create_setting_changer(
        &stack,
        "plain_backslashes",
        "standard_conforming_strings",
        "off",
    );
    let hidden = r"SELECT 'a\', ' ; CREATE TABLE pwned (x int); --'";
    let answers = raw_protocol_json(
        &stack,
        "pg_pipeline.py",
        &token,
        &["--unsynced-first", "SELECT plain_backslashes()", hidden],
    );
    assert_eq!(
        stack
            .postgres
            .superuser_sql_ok("orders", "SELECT to_regclass('public.pwned') IS NULL")
            .expect("look for the table"),
        "t",
        "the server read a second statement out of the Query: {answers}"
    );
    assert!(has_error(&answers, "42501", "encoding:unsure"), "{answers}");
    stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' AND policy_uid = 'encoding:unsure'",
            1,
            Duration::from_secs(10),
        )
        .expect("the refusal is on record");
}

/// The server plans a statement at its Bind, and folds an immutable
/// function of constants then: one that turns standard_conforming_strings
/// off for the rest of the transaction (set_config's is_local, which the
/// server never reports) changes how the server reads a Query sent behind
/// a Parse and Bind with no Execute, before any Sync. That Query is
/// refused as after an Execute; the table never exists.
#[test]
fn text_behind_a_bind_that_may_change_settings_is_refused_when_it_could_read_otherwise() {
    let Some((stack, token)) = start(
        "text_behind_a_bind_that_may_change_settings_is_refused_when_it_could_read_otherwise",
    ) else {
        return;
    };
    stack
        .postgres
        .superuser_sql_ok(
            "orders",
            "CREATE FUNCTION plain_backslashes_when_planned() RETURNS text LANGUAGE sql IMMUTABLE \
             AS $$ SELECT set_config('standard_conforming_strings', 'off', true) $$",
        )
        .expect("create the function");
    let hidden = r"SELECT 'a\', ' ; CREATE TABLE pwned_at_bind (x int); --'";
    let answers = raw_protocol_json(
        &stack,
        "pg_pipeline.py",
        &token,
        &[
            "--bound-first",
            "SELECT plain_backslashes_when_planned()",
            hidden,
        ],
    );
    assert_eq!(
        stack
            .postgres
            .superuser_sql_ok(
                "orders",
                "SELECT to_regclass('public.pwned_at_bind') IS NULL"
            )
            .expect("look for the table"),
        "t",
        "the server read a second statement out of the Query: {answers}"
    );
    assert!(has_error(&answers, "42501", "encoding:unsure"), "{answers}");
}

/// Unqualified names are classified as `public.x`, so the server must
/// resolve them there: tollgate logs in with `search_path = public`, above
/// a role default that puts another schema first.
#[test]
fn the_login_resolves_unqualified_names_in_public_whatever_the_role_default() {
    let Some((stack, token)) =
        start("the_login_resolves_unqualified_names_in_public_whatever_the_role_default")
    else {
        return;
    };
    set_gateway_role_default(&stack, "search_path", "elsewhere, public");
    let out = stack
        .agent_psql(&token, "SHOW search_path")
        .output()
        .expect("run psql");
    assert_eq!(text(&out.stdout), "public", "{}", text(&out.stderr));
}

/// The client encoding stays UTF8: psql's SET NAMES and set_config of
/// client_encoding are refused with 42501 whatever the grant (the session
/// goes on), and when a function of the agent's changes it anyway the
/// session ends with FATAL 42501 before anything after the server's report
/// reaches the agent. Each is on record.
#[test]
fn the_client_encoding_cannot_be_changed_behind_the_policy() {
    let Some((stack, token)) = start("the_client_encoding_cannot_be_changed_behind_the_policy")
    else {
        return;
    };
    create_setting_changer(&stack, "sneaky", "client_encoding", "SJIS");
    let mut psql = agent_psql(&stack, &token);
    psql.args([
        "-c",
        "SET NAMES 'SJIS'",
        "-c",
        "SELECT set_config('client_encoding', 'BIG5', false)",
        "-c",
        "SHOW client_encoding",
        "-c",
        "SELECT sneaky()",
        "-c",
        "SELECT 'never run'",
    ]);
    let out = psql.output().expect("run psql");
    let stderr = text(&out.stderr);
    let stdout = text(&out.stdout);
    assert_eq!(stderr.matches("ERROR:  42501").count(), 2, "{stderr}");
    assert_eq!(
        stderr.matches("encoding:client_encoding").count(),
        3,
        "two refusals and the FATAL name the rule: {stderr}"
    );
    assert!(stderr.contains("FATAL:  42501"), "{stderr}");
    assert!(stderr.contains("client_encoding became SJIS"), "{stderr}");
    assert!(
        stdout.starts_with("UTF8"),
        "the refusals left UTF8: {stdout}"
    );
    assert!(!stdout.contains("never run"), "{stdout}");

    let refusals = stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' AND policy_uid = 'encoding:client_encoding' ORDER BY sequence",
            2,
            AUDIT_WAIT,
        )
        .expect("refusal rows");
    assert_eq!(refusals[0]["query_info_query_string"], "SET NAMES 'SJIS'");
    // Pipelined behind a statement that changes the encoding unseen, an
    // INSERT is held until that statement's answer (in the extended
    // protocol, its Sync's), whose report of the change ends the session:
    // the server never reads it (in SJIS).
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pg_pipeline.py");
    for protocol in ["--simple", "--extended"] {
        let mut pipeline =
            AgentCgroup::command(&stack.gateway.config.agent_cgroup, &duckdb::python());
        pipeline
            .arg(&script)
            .args(["127.0.0.1", &stack.postgres.port.to_string(), &token]);
        if protocol == "--extended" {
            pipeline.arg(protocol);
        }
        let out = pipeline
            .args([
                "SELECT sneaky()",
                "INSERT INTO customers (id, name, email) VALUES (901, 'after', 'a@example.com')",
            ])
            .output()
            .expect("python");
        assert!(out.status.success(), "{protocol}: {}", text(&out.stderr));
        let answer: Value = serde_json::from_slice(&out.stdout).expect("json");
        let fatal = first_error(&answer["answers"]);
        assert_eq!(fatal["sqlstate"], "42501", "{protocol}: {answer}");
        assert_eq!(
            stack
                .postgres
                .superuser_sql_ok("orders", "SELECT count(*) FROM customers WHERE id = 901")
                .expect("count"),
            "0",
            "{protocol}: the pipelined INSERT never reached the server: {answer}"
        );
    }

    let sneaky = outcome_of(&stack, "SELECT sneaky()");
    assert_eq!(sneaky["response_error_code"], "42501", "{sneaky}");
    assert!(
        sneaky["status_detail"]
            .as_str()
            .is_some_and(|d| d.contains("client_encoding became SJIS")),
        "{sneaky}"
    );
}

/// A message after login that is not one of protocol 3.0 (a Query that is
/// not UTF-8, a Parse cut short, an unknown type, a Flush or Sync with a
/// body): what the client sent
/// before it in the same write still runs, as the server itself would run
/// it; the client gets FATAL 08P01 saying what was wrong; the refusal is
/// on record; and the daemon goes on serving other sessions.
#[test]
fn a_malformed_message_ends_the_session_with_08p01_and_is_audited() {
    let Some((stack, token)) =
        start("a_malformed_message_ends_the_session_with_08p01_and_is_audited")
    else {
        return;
    };
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pg_malformed.py");
    for (kind, says) in [
        ("not-utf8", "Query message: string is not UTF-8"),
        ("cut-parse", "Parse message: string without terminator"),
        ("unknown", "unexpected message 'y'"),
        ("flush-with-body", "Flush message with a body (1 bytes)"),
        ("sync-with-body", "Sync message with a body (1 bytes)"),
    ] {
        stack
            .postgres
            .superuser_sql_ok("orders", "DELETE FROM customers WHERE id = 900")
            .expect("clean up");
        let out = AgentCgroup::command(&stack.gateway.config.agent_cgroup, &duckdb::python())
            .arg(&script)
            .args(["127.0.0.1", &stack.postgres.port.to_string(), &token, kind])
            .output()
            .expect("python");
        assert!(out.status.success(), "{kind}: {}", text(&out.stderr));
        let answer: Value = serde_json::from_slice(&out.stdout).expect("json");
        let answers = answer["answers"].as_array().cloned().unwrap_or_default();
        let fatal = first_error(&answer["answers"]);
        assert_eq!(fatal["severity"], "FATAL", "{kind}: {answer}");
        assert_eq!(fatal["sqlstate"], "08P01", "{kind}: {answer}");
        assert!(
            fatal["message"].as_str().is_some_and(|m| m.contains(says)),
            "{kind}: {answer}"
        );
        assert_eq!(
            answers.last().map(|m| m["tag"].clone()),
            Some(Value::from("closed")),
            "{kind}: {answer}"
        );
        assert_eq!(
            stack
                .postgres
                .superuser_sql_ok("orders", "SELECT count(*) FROM customers WHERE id = 900")
                .expect("count"),
            "1",
            "{kind}: the INSERT sent before the malformed message ran"
        );
    }
    let refusals = stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' AND policy_uid = 'protocol:malformed' ORDER BY sequence",
            5,
            AUDIT_WAIT,
        )
        .expect("a refusal row for each malformed message");
    for (row, says) in refusals.iter().zip([
        "Query message: string is not UTF-8",
        "Parse message: string without terminator",
        "unexpected message 'y'",
        "Flush message with a body",
        "Sync message with a body",
    ]) {
        assert!(
            row["status_detail"].as_str().is_some_and(|d| d
                .starts_with("malformed message from the client")
                && d.contains(says)),
            "{row}"
        );
    }
    // The daemon still serves.
    let out = agent_psql(&stack, &token)
        .args(["-c", "SELECT count(*) FROM customers WHERE id = 900"])
        .output()
        .expect("psql");
    assert_eq!(text(&out.stdout), "1", "{}", text(&out.stderr));
}
