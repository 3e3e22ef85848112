//! The kernel's evidence, end to end: real connections from a real agent
//! cgroup and from outside it, the host-wide probe, the evidence stream
//! under the audit directory, and `tollgate verify` reconciling the two.

use std::time::Duration;

use serde_json::Value;
use tollgate_tests::{evidence, privileged, Stack};

const AGENT_OID: &str = "4f1c2b7e-0000-4000-8000-00000000e71d";

fn verify(stack: &Stack) -> (i32, String, Value) {
    let run = evidence::verify(
        stack.gateway.audit_dir(),
        &stack.gateway.public_key(),
        stack.gateway.dir.path(),
    );
    (run.code, run.summary, run.report)
}

fn evidence_rows(stack: &Stack, sql: &str) -> Vec<Value> {
    evidence::rows(stack.gateway.audit_dir(), sql)
}

#[test]
fn a_clean_run_of_agent_connections_verifies_with_no_bypass_and_no_loss() {
    if !privileged("a_clean_run_of_agent_connections_verifies_with_no_bypass_and_no_loss") {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let token = stack.idp.token(AGENT_OID, &[]).expect("mint a token");
    let connections = 200;
    for i in 0..connections {
        let out = stack
            .agent_psql(&token, &format!("SELECT {i}"))
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {i}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            stack.gateway.log()
        );
    }
    // A clean stop closes the open segments of both streams.
    stack.gateway.stop();

    let (code, summary, report) = verify(&stack);
    // Shown in CI logs: the numbers behind "zero bypasses, zero loss".
    eprintln!("{summary}");
    assert_eq!(code, 0, "{summary}");
    assert_eq!(report["bypasses"], serde_json::json!([]), "{summary}");
    assert_eq!(report["losses"], serde_json::json!([]), "{summary}");
    assert!(
        report["loss_records"].as_u64().unwrap_or(0) >= 1,
        "{summary}"
    );
    assert!(
        report["redirected"].as_u64().unwrap_or(0) >= connections,
        "{summary}"
    );
    assert!(
        report["audited_upstreams"].as_u64().unwrap_or(0) >= connections,
        "{summary}"
    );

    // The evidence names the agent process and its cgroup.
    let redirected = evidence_rows(
        &stack,
        &format!(
            "SELECT * FROM audit WHERE phase = 'evidence' AND json_extract_string(unmapped, '$.kind') = 'redirected' AND dst_endpoint_port = {}",
            stack.postgres.port
        ),
    );
    assert!(redirected.len() >= connections as usize);
    assert_eq!(redirected[0]["actor_process_name"], "psql");
    assert_eq!(redirected[0]["class_uid"], 4001);
    let loss = evidence_rows(
        &stack,
        "SELECT * FROM audit WHERE phase = 'loss_counters' ORDER BY sequence DESC LIMIT 1",
    );
    let counters: Value =
        serde_json::from_str(loss[0]["unmapped"].as_str().unwrap_or("{}")).expect("json");
    assert_eq!(
        counters["programs"]["tcp_state"]["dropped"], 0,
        "{counters}"
    );
    assert_eq!(
        counters["programs"]["tcp_state"]["recursion_misses"], 0,
        "{counters}"
    );
    assert!(
        counters["programs"]["tcp_state"]["seen"]
            .as_u64()
            .unwrap_or(0)
            >= connections
    );
}

#[test]
fn a_direct_connection_from_outside_the_agent_cgroups_is_an_unaudited_connection() {
    if !privileged("a_direct_connection_from_outside_the_agent_cgroups_is_an_unaudited_connection")
    {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let before = stack.postgres.connections_received();
    let direct = stack
        .postgres
        .superuser_sql_ok("orders", "SELECT count(*) FROM customers")
        .expect("direct psql");
    assert_eq!(direct, "3");
    assert!(stack.postgres.connections_received() > before);
    std::thread::sleep(Duration::from_millis(200));
    stack.gateway.stop();

    let (code, summary, report) = verify(&stack);
    assert_eq!(code, 1, "{summary}");
    let bypasses = report["bypasses"].as_array().cloned().unwrap_or_default();
    assert_eq!(bypasses.len(), 1, "{summary}");
    assert_eq!(
        bypasses[0]["finding"], "unaudited_connection_to_protected_target",
        "{summary}"
    );
    assert_eq!(bypasses[0]["process"], "psql");
    assert_eq!(
        bypasses[0]["destination"],
        format!("127.0.0.1:{}", stack.postgres.port)
    );
    assert!(summary.contains("unaudited_connection_to_protected_target"));
}

#[test]
fn a_session_that_sends_no_statement_is_still_an_audited_upstream() {
    if !privileged("a_session_that_sends_no_statement_is_still_an_audited_upstream") {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let token = stack.idp.token(AGENT_OID, &[]).expect("mint a token");
    // Log in and hang up: the gateway opened an upstream connection, and
    // no statement row will carry its cookie.
    let answer = stack.agent_login(&token).expect("raw login");
    assert_eq!(answer["outcome"], "ok", "{answer}");
    stack.gateway.stop();

    let rows = stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'session' AND class_uid = 6005 AND upstream_socket_cookie IS NOT NULL",
            1,
            Duration::from_secs(10),
        )
        .expect("the upstream connection's audit row");
    assert_eq!(rows[0]["actor_user_uid"], AGENT_OID);
    let (code, summary, report) = verify(&stack);
    assert_eq!(code, 0, "{summary}");
    assert_eq!(report["to_protected_targets"], 1, "{summary}");
    assert_eq!(report["audited_upstreams"], 1, "{summary}");
}
