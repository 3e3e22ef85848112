//! Writes a small, realistic audit directory for trying the DuckDB queries
//! in docs/queries.md: `cargo run -p gateway --example audit_sample -- DIR`.
//!
//! Three agents, two PostgreSQL targets, sessions with logons, request and
//! outcome rows, refusals by policy, approved privileged statements and a
//! refused token, spread over the last two hours.

use tollgate::audit::{
    action, authentication_activity, datastore_activity, status, AuditConfig, AuditLog,
    AuditRecord, CLASS_AUTHENTICATION, CLASS_DATASTORE_ACTIVITY,
};

struct Agent {
    oid: &'static str,
    name: &'static str,
    app: &'static str,
    groups: &'static [&'static str],
    pid: i32,
}

const AGENTS: &[Agent] = &[
    Agent {
        oid: "11111111-1111-4111-8111-111111111111",
        name: "billing-agent@contoso.example",
        app: "aaaaaaaa-0000-4000-8000-000000000001",
        groups: &["db-readers"],
        pid: 4101,
    },
    Agent {
        oid: "22222222-2222-4222-8222-222222222222",
        name: "support-agent@contoso.example",
        app: "aaaaaaaa-0000-4000-8000-000000000002",
        groups: &["db-readers", "support"],
        pid: 4202,
    },
    Agent {
        oid: "33333333-3333-4333-8333-333333333333",
        name: "ops-agent@contoso.example",
        app: "aaaaaaaa-0000-4000-8000-000000000003",
        groups: &["db-admins"],
        pid: 4303,
    },
];

/// (statement, kind, table)
const READS: &[(&str, &str, &str)] = &[
    (
        "SELECT id, status, total FROM orders WHERE customer_id = 42",
        "read",
        "public.orders",
    ),
    (
        "SELECT count(*) FROM orders WHERE created_at > now() - interval '1 day'",
        "read",
        "public.orders",
    ),
    (
        "SELECT name, email FROM customers WHERE id = 42",
        "read",
        "public.customers",
    ),
    (
        "SELECT * FROM invoices WHERE order_id = 1001",
        "read",
        "public.invoices",
    ),
];
const WRITES: &[(&str, &str, &str)] = &[
    (
        "UPDATE orders SET status = 'refunded' WHERE id = 1001",
        "write",
        "public.orders",
    ),
    (
        "DELETE FROM sessions WHERE expires_at < now()",
        "write",
        "public.sessions",
    ),
    (
        "ALTER TABLE orders ADD COLUMN note text",
        "ddl",
        "public.orders",
    ),
];

fn base(a: &Agent, target: &str, session: &str, time: i64) -> AuditRecord {
    AuditRecord {
        time,
        actor_user_uid: a.oid.into(),
        actor_user_name: a.name.into(),
        actor_user_org_uid: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
        actor_app_uid: a.app.into(),
        actor_user_groups: a.groups.iter().map(|s| s.to_string()).collect(),
        actor_session_credential_uid: format!("uti-{session}").into(),
        actor_session_credential_fingerprint: format!("{:064x}", time).into(),
        actor_process_pid: Some(a.pid),
        actor_process_name: "python3".into(),
        actor_process_cgroup_id: Some(7001),
        src_endpoint_ip: "127.0.0.1".into(),
        src_endpoint_port: Some(40000 + (time % 20000) as i32),
        dst_endpoint_ip: if target == "orders-db" {
            "10.0.3.17".into()
        } else {
            "10.0.3.18".into()
        },
        dst_endpoint_port: Some(5432),
        dst_endpoint_name: target.into(),
        connection_info_protocol_name: "postgres".into(),
        session_uid: session.into(),
        database_user: "app".into(),
        database_name: target.trim_end_matches("-db").into(),
        unmapped: "{}".into(),
        ..Default::default()
    }
}

fn class(r: &mut AuditRecord, class_uid: i32, activity: i32) {
    r.class_uid = class_uid;
    r.activity_id = activity;
    r.type_uid = i64::from(class_uid) * 100 + i64::from(activity);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: audit_sample DIR"))?;
    let log = AuditLog::open(&AuditConfig::new(&dir)).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let mut t = now - 2 * 3600 * 1000;
    let mut n = 0u64;
    for s in 0..24 {
        let a = &AGENTS[s % AGENTS.len()];
        let target = if s % 3 == 2 {
            "billing-db"
        } else {
            "orders-db"
        };
        let session = format!("sess-{s:04}");
        t += 4 * 60 * 1000;

        let mut logon = base(a, target, &session, t);
        class(
            &mut logon,
            CLASS_AUTHENTICATION,
            authentication_activity::LOGON,
        );
        logon.phase = "session".into();
        logon.status_id = status::SUCCESS;
        logon.action_id = action::ALLOWED;
        log.append(logon).await?;

        for k in 0..6 {
            t += 7_000;
            let write = a.oid.starts_with('3') && k % 3 == 2 || a.oid.starts_with('2') && k == 5;
            let (sql, kind, table) = if write {
                WRITES[(s + k) % WRITES.len()]
            } else {
                READS[(s + k) % READS.len()]
            };
            let request_uid = format!("req-{s:04}-{k}");
            let mut r = base(a, target, &session, t);
            class(
                &mut r,
                CLASS_DATASTORE_ACTIVITY,
                if write {
                    datastore_activity::UPDATE
                } else {
                    datastore_activity::QUERY
                },
            );
            r.request_uid = request_uid.clone();
            r.query_info_query_string = sql.into();
            r.query_info_kind = kind.into();
            if write {
                r.query_info_tables_written = vec![table.into()];
            } else {
                r.query_info_tables_read = vec![table.into()];
            }
            r.intent = format!("ticket-{}", 1000 + s);
            r.actor_tollgate_roles = [if a.oid.starts_with('3') {
                "operator".to_string()
            } else {
                "reader".to_string()
            }]
            .into();
            if write && !a.oid.starts_with('3') {
                // Support may not write: refused by policy.
                r.phase = "refusal".into();
                r.status_id = status::FAILURE;
                r.action_id = action::DENIED;
                r.policy_uid = "deny-writes-outside-ops".into();
                r.status_detail = "42501: writes are not allowed for this identity".into();
                log.append(r).await?;
                continue;
            }
            r.phase = "request".into();
            r.status_id = status::SUCCESS;
            r.action_id = action::ALLOWED;
            r.policy_uid = if write {
                "ops-writes-with-approval".into()
            } else {
                "readers-select".into()
            };
            if write {
                r.approval_uid = format!("appr-{s:04}-{k}");
                r.approver_user_uid = "99999999-9999-4999-8999-999999999999".into();
                r.approver_user_name = "dba-on-call@contoso.example".into();
            }
            log.append(r.clone()).await?;
            let mut o = r;
            o.phase = "outcome".into();
            o.time = t + 3;
            // Masking is known once the answer is: on the outcome row,
            // which then says the answer was modified.
            if sql.contains("email") {
                o.masked_columns = vec!["email".into()];
                o.action_id = action::MODIFIED;
            }
            o.response_rows = Some(if write { 1 } else { (n % 40) as i64 + 1 });
            o.response_bytes = Some(200 + (n % 5000) as i64);
            o.duration_us = Some(300 + (n % 900) as i64 * 7);
            log.append(o).await?;
            n += 1;
        }
    }
    // A token that did not verify.
    let mut refused = base(&AGENTS[1], "orders-db", "sess-9999", now - 60_000);
    class(
        &mut refused,
        CLASS_AUTHENTICATION,
        authentication_activity::LOGON,
    );
    refused.phase = "refusal".into();
    refused.status_id = status::FAILURE;
    refused.action_id = action::DENIED;
    refused.status_detail = "token_expired: the token has expired".into();
    refused.actor_user_uid = "".into();
    refused.actor_user_name = "".into();
    log.append(refused).await?;
    log.shutdown().await;
    println!("wrote {dir}");
    Ok(())
}
