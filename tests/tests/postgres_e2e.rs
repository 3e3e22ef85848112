//! One pinned, authenticated, audited PostgreSQL query, end to end: a real
//! PostgreSQL server, real psql in a real agent cgroup redirected by the real
//! kernel programs, the development IdP, and DuckDB over the audit Parquet.

use std::{process::Command, time::Duration};

use tollgate_tests::{idp, privileged, AgentCgroup, DevIdp, Stack};

const AGENT_OID: &str = "4f1c2b7e-0000-4000-8000-00000000a9e7";
const AUDIT_WAIT: Duration = Duration::from_secs(30);

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

/// The first line a helper script prints on its piped stdout, as JSON
/// (or `{"unreadable": line}`, so a failed assertion shows what came).
fn first_json_line(child: &mut std::process::Child) -> serde_json::Value {
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("its answer");
    serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({"unreadable": line}))
}

#[test]
fn an_agent_query_is_served_by_tollgate_and_audited_with_its_identity() {
    if !privileged("an_agent_query_is_served_by_tollgate_and_audited_with_its_identity") {
        return;
    }
    let stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let token = stack
        .idp
        .token(
            AGENT_OID,
            &["--name", "billing-agent", "--groups", "g-readers"],
        )
        .expect("mint a token");

    let out = stack
        .agent_psql(&token, "SELECT name FROM customers WHERE id = 2")
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql failed: {}\n{}",
        stderr(&out),
        stack.gateway.log()
    );
    assert_eq!(stdout(&out), "Grace");

    // PostgreSQL would refuse a JWT as the password of `agent` (no such
    // role): the session is the gateway's own, with its own credential.
    let out = stack
        .agent_psql(&token, "SELECT current_user")
        .output()
        .expect("run psql");
    assert_eq!(
        stdout(&out),
        stack.postgres.gateway_user,
        "{}",
        stderr(&out)
    );

    // The agent still sees the address it asked for.
    let peer = AgentCgroup::command(&stack.gateway.config.agent_cgroup, &tollgate_tests::duckdb::python())
        .args([
            "-c",
            "import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1]))); print('%s:%d' % s.getpeername())",
            &stack.postgres.port.to_string(),
        ])
        .output()
        .expect("run python");
    assert_eq!(
        stdout(&peer),
        format!("127.0.0.1:{}", stack.postgres.port),
        "{}",
        stderr(&peer)
    );

    let rows = stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'outcome' AND query_info_query_string = 'SELECT name FROM customers WHERE id = 2'",
            1,
            AUDIT_WAIT,
        )
        .expect("audit rows");
    let row = &rows[0];
    assert_eq!(row["actor_user_uid"], AGENT_OID);
    assert_eq!(row["actor_user_org_uid"], idp::TENANT);
    assert_eq!(row["actor_user_name"], "billing-agent");
    assert_eq!(row["actor_user_groups"], serde_json::json!(["g-readers"]));
    assert_eq!(row["dst_endpoint_name"], "orders-db");
    assert_eq!(row["dst_endpoint_port"], i64::from(stack.postgres.port));
    assert_eq!(row["actor_process_name"], "psql");
    assert!(
        row["actor_process_pid"].as_i64().unwrap_or(0) > 0,
        "pid recorded: {row}"
    );
    assert_eq!(row["status_id"], 1);
    assert_eq!(row["response_rows"], 1);
    assert!(row["duration_us"].as_i64().is_some());
    assert_eq!(row["database_name"], "orders");
    // The token itself is never stored, only its fingerprint.
    assert!(!row.to_string().contains(&token));
    assert_eq!(
        row["actor_session_credential_fingerprint"]
            .as_str()
            .map(str::len),
        Some(64)
    );

    let requests = stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'request' AND query_info_query_string = 'SELECT name FROM customers WHERE id = 2'",
            1,
            AUDIT_WAIT,
        )
        .expect("request rows");
    assert_eq!(requests[0]["request_uid"], row["request_uid"]);

    // The audit an auditor receives verifies offline with the public key.
    let mut stack = stack;
    stack.gateway.stop();
    let (ok, report) = stack
        .gateway
        .verify_audit()
        .expect("run tollgate audit verify");
    assert!(ok, "audit verify failed:\n{report}");
}

#[test]
fn refused_tokens_get_sqlstate_28000_and_each_refusal_is_audited() {
    if !privileged("refused_tokens_get_sqlstate_28000_and_each_refusal_is_audited") {
        return;
    }
    let stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let rogue = DevIdp::rogue_key_dir().expect("rogue key dir");
    let cases = [
        ("no token", String::new()),
        (
            "expired",
            stack
                .idp
                .token("oid-expired", &["--expires-in", "-3600"])
                .expect("mint"),
        ),
        (
            "wrong audience",
            stack
                .idp
                .token("oid-wrong-aud", &["--audience", "api://someone-else"])
                .expect("mint"),
        ),
        (
            "unknown key",
            idp::mint(rogue.path(), "oid-rogue", &[]).expect("mint"),
        ),
    ];
    for (case, token) in &cases {
        let answer = stack.agent_login(token).expect("raw login");
        assert_eq!(answer["outcome"], "error", "{case}: {answer}");
        assert_eq!(answer["sqlstate"], "28000", "{case}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("tollgate: "), "{case}: {message}");
    }
    // psql shows the reason too.
    let out = stack
        .agent_psql(&cases[1].1, "SELECT 1")
        .output()
        .expect("run psql");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("tollgate: "), "{}", stderr(&out));

    let rows = stack
        .audit_rows(
            "SELECT * FROM audit WHERE class_uid = 3002 AND status_id = 2 ORDER BY sequence",
            cases.len(),
            AUDIT_WAIT,
        )
        .expect("refusal rows");
    assert!(rows.len() >= cases.len());
    for row in &rows {
        assert_eq!(row["phase"], "refusal");
        assert_eq!(row["action_id"], 2);
        assert_eq!(row["connection_info_protocol_name"], "postgres");
        assert!(
            !row["status_detail"].as_str().unwrap_or_default().is_empty(),
            "reason recorded: {row}"
        );
    }
    // The raw logins came first, from python; each refusal says why, and
    // the four reasons differ. The psql refusal names psql.
    let raw: Vec<_> = rows.iter().take(cases.len()).collect();
    for row in &raw {
        let process = row["actor_process_name"].as_str().unwrap_or_default();
        assert!(
            process.starts_with("python"),
            "refusals name the process: {row}"
        );
    }
    let reasons: std::collections::HashSet<_> =
        raw.iter().map(|r| r["status_detail"].to_string()).collect();
    assert_eq!(reasons.len(), cases.len(), "{raw:?}");
    for (row, code) in raw
        .iter()
        .zip(["missing_token", "expired", "audience", "unknown_kid"])
    {
        let detail = row["status_detail"].as_str().unwrap_or_default();
        assert!(detail.contains(code), "expected {code} in {detail}");
    }
    let last = rows.last().map(|r| r["actor_process_name"].clone());
    assert_eq!(last, Some(serde_json::json!("psql")));
}

/// A loop of bad logins cannot fill the audit disk: past a source's
/// limit its refusals are counted into summary rows instead of written
/// one by one, every one of them is in a row or a count, each client is
/// still refused with its error, and an agent with a good token logs in
/// meanwhile.
#[test]
fn a_flood_of_refused_logins_is_counted_into_summaries_and_every_refusal_is_accounted_for() {
    if !privileged(
        "a_flood_of_refused_logins_is_counted_into_summaries_and_every_refusal_is_accounted_for",
    ) {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    // Well past one source's burst of refusals written one by one (100).
    let flood = 400;
    let answer = stack
        .agent_logins("not-a-token", flood)
        .expect("raw logins");
    assert_eq!(answer["outcomes"]["28000"], flood, "{answer}");
    let token = stack.idp.token(AGENT_OID, &[]).expect("mint a token");
    let out = stack
        .agent_psql(&token, "SELECT 41 + 1")
        .output()
        .expect("run psql");
    assert_eq!(stdout(&out), "42", "{}", stderr(&out));
    // Summaries are written every 10 s while the daemon runs ...
    stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' \
             AND status_detail LIKE 'refusals_summarized:%'",
            1,
            Duration::from_secs(25),
        )
        .expect("a summary written while the daemon runs");
    // ... and the last counts as it stops.
    stack.gateway.stop();

    let refusals = |condition: &str| {
        tollgate_tests::duckdb::query(
            stack.gateway.audit_dir(),
            &format!(
                "SELECT * FROM audit WHERE class_uid = 3002 AND phase = 'refusal' AND {condition}"
            ),
        )
        .expect("query the audit")
    };
    let one_by_one = refusals("status_detail LIKE 'malformed:%'");
    let summaries = refusals("status_detail LIKE 'refusals_summarized:%'");
    let counted: u64 = summaries
        .iter()
        .map(|row| {
            let unmapped: serde_json::Value =
                serde_json::from_str(row["unmapped"].as_str().unwrap_or_default())
                    .expect("a summary's unmapped is JSON");
            let counts = &unmapped["refusals_summarized"];
            assert_eq!(counts["by_code"]["malformed"], counts["count"], "{row}");
            counts["count"].as_u64().expect("a count")
        })
        .sum();
    // docs/queries.md's count of refused logins per source, summaries
    // included, finds them all.
    let (_, per_source) = tollgate_tests::duckdb::cookbook()
        .into_iter()
        .find(|(n, sql)| *n == 8 && sql.contains("refusals_summarized"))
        .expect("query 8 of docs/queries.md counts refusals per source");
    let per_source = tollgate_tests::duckdb::query(stack.gateway.audit_dir(), &per_source)
        .expect("query 8, per source");
    assert_eq!(per_source.len(), 1, "one source: {per_source:?}");
    assert_eq!(per_source[0]["refusals"], flood, "{per_source:?}");
    eprintln!(
        "{flood} refused logins: {} rows one by one, {counted} counted in {} summaries",
        one_by_one.len(),
        summaries.len()
    );
    assert!(!summaries.is_empty(), "no summary row");
    assert!(
        one_by_one.len() < flood,
        "all {flood} refusals written one by one"
    );
    assert_eq!(
        one_by_one.len() as u64 + counted,
        flood as u64,
        "{} rows and {counted} counted",
        one_by_one.len()
    );
    for row in &summaries {
        assert_eq!(row["action_id"], 2, "{row}");
        assert!(
            row["actor_process_cgroup_id"].as_i64().is_some(),
            "a summary names the source cgroup: {row}"
        );
    }
    let (ok, report) = stack.gateway.verify_audit().expect("run verify");
    assert!(ok, "{report}");
}

#[test]
fn with_tollgate_killed_agents_are_refused_and_never_reach_postgres_directly() {
    if !privileged("with_tollgate_killed_agents_are_refused_and_never_reach_postgres_directly") {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let token = stack.idp.token(AGENT_OID, &[]).expect("mint a token");
    let out = stack
        .agent_psql(&token, "SELECT 1")
        .output()
        .expect("run psql");
    assert_eq!(stdout(&out), "1", "{}", stderr(&out));

    stack.gateway.kill();
    let before = stack.postgres.connections_received();
    // Even the right password for the server does not get an agent through.
    let out = stack
        .agent_psql(&stack.postgres.superuser_password, "SELECT 1")
        .env("PGUSER", "postgres")
        .output()
        .expect("run psql");
    assert!(
        !out.status.success(),
        "agent connection succeeded with tollgate down"
    );
    assert!(stderr(&out).contains("refused"), "{}", stderr(&out));
    assert_eq!(
        stack.postgres.connections_received(),
        before,
        "the agent reached PostgreSQL directly"
    );

    // Outside the agent cgroup, the server is reached directly: the pinning is scoped.
    let direct = stack
        .postgres
        .superuser_sql_ok("orders", "SELECT count(*) FROM customers")
        .expect("direct psql");
    assert_eq!(direct, "3");
    assert_eq!(stack.postgres.connections_received(), before + 1);

    // A restarted daemon takes over the pinned redirect.
    stack.gateway.restart().expect("restart tollgate");
    let out = stack
        .agent_psql(&token, "SELECT 2")
        .output()
        .expect("run psql");
    assert_eq!(
        stdout(&out),
        "2",
        "{}\n{}",
        stderr(&out),
        stack.gateway.log()
    );
}

#[test]
fn unpin_removes_the_redirect() {
    if !privileged("unpin_removes_the_redirect") {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    stack.gateway.stop();
    stack.gateway.unpin().expect("tollgate unpin");
    assert!(!stack.gateway.config.bpffs_dir.exists());
    // With the redirect gone, the agent cgroup reaches the server itself.
    let out = AgentCgroup::command(&stack.gateway.config.agent_cgroup, "psql")
        .args(["-X", "-A", "-t"])
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=orders",
            stack.postgres.port
        ))
        .args(["-c", "SELECT current_user"])
        .env("PGPASSWORD", &stack.postgres.superuser_password)
        .output()
        .expect("run psql");
    assert_eq!(stdout(&out), "postgres", "{}", stderr(&out));
}

/// A second daemon started on the pins, an agent cgroup or the audit
/// directory of a running one (or on a cgroup above or below one of its
/// agent cgroups) stops before it changes anything: it pins nothing, the
/// running one's redirect still points at its own listeners, and its
/// agents are served. `unpin` refuses a running daemon's pins. (A second
/// daemon used to point the pinned redirect at its own ports, and replace
/// the first one's programs, before the audit directory's lock stopped
/// it, or run beside it with an audit directory of its own; one on the
/// same audit directory alone used to pin its own cgroups first.)
#[test]
fn a_second_daemon_on_the_same_pins_cgroups_or_audit_directory_stops_before_changing_anything() {
    if !privileged("a_second_daemon_on_the_same_pins_cgroups_or_audit_directory_stops_before_changing_anything") {
        return;
    }
    let stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let config = &stack.gateway.config;
    let text = std::fs::read_to_string(&stack.gateway.config_path).expect("config");
    let dir = tempfile::tempdir().expect("tempdir");
    let other_listen = format!("127.0.0.1:{}", tollgate_tests::free_port());
    let path_of = |p: &std::path::Path| p.display().to_string();
    let second = |p: &std::path::Path| std::path::PathBuf::from(format!("{}-second", p.display()));
    let (other_pins, other_cgroup, other_audit) = (
        second(&config.bpffs_dir),
        second(&config.agent_cgroup),
        dir.path().join("audit"),
    );
    let below = config.agent_cgroup.join("below");
    let variant =
        |name: &str, pins: &std::path::Path, cgroup: &std::path::Path, audit: &std::path::Path| {
            let path = dir.path().join(name);
            std::fs::write(
                &path,
                text.replace(&config.listen.to_string(), &other_listen)
                    .replace(&path_of(&config.bpffs_dir), &path_of(pins))
                    .replace(&path_of(&config.agent_cgroup), &path_of(cgroup))
                    .replace(&path_of(&config.audit_dir), &path_of(audit)),
            )
            .expect("write");
            path
        };
    for (path, refusal) in [
        (
            variant(
                "same-pins.toml",
                &config.bpffs_dir,
                &other_cgroup,
                &other_audit,
            ),
            &"another tollgate runs with this pin directory".to_owned(),
        ),
        (
            variant(
                "same-cgroup.toml",
                &other_pins,
                &config.agent_cgroup,
                &other_audit,
            ),
            &"another tollgate runs with this cgroup, or one below it, as an agent cgroup".to_owned(),
        ),
        (
            variant("below.toml", &other_pins, &below, &other_audit),
            &format!(
                "{}: another tollgate runs with this cgroup, above agent cgroup {}, as an agent cgroup",
                config.agent_cgroup.display(),
                below.display()
            ),
        ),
        (
            variant(
                "same-audit.toml",
                &other_pins,
                &other_cgroup,
                &config.audit_dir,
            ),
            &"audit directory is in use by another process".to_owned(),
        ),
    ] {
        let (started, err) = run_refused_keeping_pins(&path);
        // Refused at a lock, it changed nothing: its own pin directory
        // (never the running daemon's) holds no links.
        let pinned_own = std::fs::read_dir(other_pins.join("links"))
            .is_ok_and(|mut links| links.next().is_some());
        unpin_after_refusal(&path);
        assert!(!started, "a second daemon started");
        assert!(err.contains(refusal.as_str()), "{err}");
        assert!(!pinned_own, "{}: pinned before it was refused", path.display());
    }
    let _ = std::fs::remove_dir(&below);
    let _ = std::fs::remove_dir(&other_cgroup);

    let out = stack
        .gateway
        .unpin()
        .expect_err("unpin of a running daemon's pins");
    assert!(out.to_string().contains("another tollgate runs"), "{out}");
    assert!(config.bpffs_dir.join("links").exists());

    let token = stack
        .idp
        .token(AGENT_OID, &["--name", "first-daemon-agent"])
        .expect("mint a token");
    let out = stack
        .agent_psql(&token, "SELECT 41 + 1")
        .output()
        .expect("run psql");
    assert_eq!(
        stdout(&out),
        "42",
        "the running daemon no longer serves: {}",
        stderr(&out)
    );
}

/// `tollgate check-config --config path`, run to completion.
fn check_config(path: &std::path::Path) -> std::process::Output {
    Command::new(tollgate_tests::tollgate_bin())
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .expect("run tollgate")
}

/// `tollgate run --config path`, for a configuration it must refuse at
/// start: whether it exited in success, and its stderr. A `run` still
/// going after 30 s started on it: killed, and the test fails.
fn run_refused(path: &std::path::Path) -> (bool, String) {
    let refused = run_refused_keeping_pins(path);
    unpin_after_refusal(path);
    refused
}

/// [`run_refused`], leaving whatever it pinned before it stopped.
fn run_refused_keeping_pins(path: &std::path::Path) -> (bool, String) {
    let mut child = Command::new(tollgate_tests::tollgate_bin())
        .args(["run", "--config"])
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tollgate");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait for tollgate").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tollgate run started on {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("tollgate's output");
    (out.status.success(), stderr(&out))
}

/// A `run` that got as far as pinning before it stopped left its programs
/// pinned: removed (best effort; the callers' assertions report it).
fn unpin_after_refusal(path: &std::path::Path) {
    let _ = Command::new(tollgate_tests::tollgate_bin())
        .args(["unpin", "--config"])
        .arg(path)
        .output();
}

/// What `check-config` refused, `run` refuses at start, with the same
/// line (warnings before it, stamped with their time, aside).
fn run_refuses_as_check_config_does(path: &std::path::Path, check_config_err: &str) {
    let (ok, err) = run_refused(path);
    assert!(
        !ok,
        "run started on what check-config refused: {check_config_err}"
    );
    let refusal = check_config_err
        .lines()
        .rev()
        .find(|line| line.starts_with("tollgate: "))
        .unwrap_or_else(|| panic!("check-config said no refusal: {check_config_err}"));
    assert!(
        err.lines().any(|line| line == refusal),
        "run: {err}\ncheck-config: {check_config_err}"
    );
}

#[test]
fn a_broken_config_stops_tollgate_at_start_with_file_key_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        "[identity]\ntenants = []\naudiences = []\njwks_file = \"/nonexistent\"\n[audit]\ndir = \"/tmp/x\"\n[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:5432\"\nlisten = \"not-an-address\"\ncredential = { user = \"u\" }\n",
    )
    .expect("write config");
    let out = check_config(&path);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("broken.toml"), "{err}");
    assert!(err.contains("target[0].listen"), "{err}");
    assert!(err.contains("invalid socket address"), "{err}");
    run_refuses_as_check_config_does(&path, &err);
}

/// `check-config` refuses what `run` refuses at start, before any of it
/// runs (nothing pinned): an identity key file that does not load, a
/// target's TLS certificate that cannot be read, an audit signing key that
/// does not load, an auditor group that does not exist. Each refused file
/// is run too, and refused with the same line.
#[test]
fn check_config_refuses_what_run_would_refuse_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let check_with = |identity_keys: &str, target_tls: &str, audit: &str| {
        let path = dir.path().join("tollgate.toml");
        std::fs::write(
            &path,
            format!(
                "[pin]\nbpffs_dir = \"/sys/fs/bpf/tollgate-config-test\"\n\
                 [identity]\ntenants = [\"{}\"]\naudiences = [\"{}\"]\n{identity_keys}\n\
                 [audit]\ndir = \"{}\"\n{audit}\n\
                 [[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:5432\"\n\
                 listen = \"127.0.0.1:16432\"\ncredential = {{ user = \"u\" }}\ndatabases = [\"db\"]\n{target_tls}\n",
                idp::TENANT,
                idp::AUDIENCE,
                dir.path().join("audit").display(),
            ),
        )
        .expect("write config");
        let out = check_config(&path);
        let (ok, err) = (out.status.success(), stderr(&out));
        if !ok {
            run_refuses_as_check_config_does(&path, &err);
        }
        (ok, stdout(&out), err)
    };
    let check = |identity_keys: &str, target_tls: &str| check_with(identity_keys, target_tls, "");
    let jwks = dir.path().join("jwks.json");
    let missing_cert = dir.path().join("missing-cert.pem");
    let tls = format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}",
        missing_cert.display(),
        dir.path().join("missing-key.pem").display()
    );

    let (ok, _, err) = check("jwks_uri = \"http://idp.example/keys\"", "");
    assert!(!ok, "a plain-http jwks_uri passed");
    assert!(err.contains("jwks_uri http://idp.example/keys"), "{err}");

    let (ok, _, err) = check(&format!("jwks_file = \"{}\"", jwks.display()), "");
    assert!(!ok, "a missing jwks_file passed");
    assert!(
        err.contains("identity.jwks_file") && err.contains("jwks.json"),
        "{err}"
    );

    std::fs::write(&jwks, "not json").expect("write jwks");
    let (ok, _, err) = check(&format!("jwks_file = \"{}\"", jwks.display()), "");
    assert!(!ok, "a jwks_file that is not JSON passed");
    assert!(err.contains("identity.jwks_file"), "{err}");

    std::fs::write(&jwks, r#"{"keys": []}"#).expect("write jwks");
    let (ok, _, err) = check(&format!("jwks_file = \"{}\"", jwks.display()), &tls);
    assert!(!ok, "a missing TLS certificate passed");
    assert!(
        err.contains("target db") && err.contains("missing-cert.pem"),
        "{err}"
    );

    let keys = format!("jwks_file = \"{}\"", jwks.display());
    let (ok, _, err) = check_with(
        &keys,
        "",
        &format!(
            "signing_key = \"{}\"",
            dir.path().join("missing.key").display()
        ),
    );
    assert!(!ok, "a missing audit signing key passed");
    assert!(
        err.contains("audit.signing_key") && err.contains("missing.key"),
        "{err}"
    );
    let (ok, _, err) = check_with(&keys, "", "auditor_group = \"no-such-group-for-tollgate\"");
    assert!(!ok, "an auditor group that does not exist passed");
    assert!(err.contains("audit.auditor_group"), "{err}");

    let (ok, out, err) = check(&keys, "");
    assert!(ok, "{err}");
    assert!(out.ends_with(": ok"), "{out}");
}

/// SIGHUP (what many operators send to make a daemon re-read its file)
/// does not end tollgate, whose sessions go on: it says that it does not
/// reload, and keeps serving.
#[test]
fn sighup_is_answered_in_the_log_and_tollgate_goes_on_serving() {
    if !privileged("sighup_is_answered_in_the_log_and_tollgate_goes_on_serving") {
        return;
    }
    let stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let token = stack.idp.token(AGENT_OID, &[]).expect("token");
    let mut session = stack.agent_session(&token).expect("a session");
    assert_eq!(session.login["ok"], true, "{}", session.login);
    let pid = stack.gateway.pid().expect("tollgate runs");
    // SAFETY: a signal to the child process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    tollgate_tests::wait_for(
        "the SIGHUP answer in the log",
        Duration::from_secs(10),
        || {
            stack
                .gateway
                .log()
                .contains("SIGHUP: tollgate does not reload")
        },
    )
    .expect("logged");
    let answer = session.run("SELECT 1").expect("a statement after SIGHUP");
    assert_eq!(answer["ok"], true, "the session goes on: {answer}");
    let out = stack
        .agent_psql(&token, "SELECT 2")
        .output()
        .expect("run psql");
    assert_eq!(stdout(&out), "2", "a new session: {}", stderr(&out));
}

#[test]
fn a_session_ends_when_its_token_expires() {
    if !privileged("a_session_ends_when_its_token_expires") {
        return;
    }
    let stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let token = stack
        .idp
        .token(AGENT_OID, &["--expires-in", "4"])
        .expect("mint a short-lived token");
    let started = std::time::Instant::now();
    let out = stack
        .agent_psql(&token, "SELECT pg_sleep(30)")
        .output()
        .expect("run psql");
    let elapsed = started.elapsed();
    assert!(!out.status.success(), "the session outlived its token");
    assert!(elapsed < Duration::from_secs(25), "ended after {elapsed:?}");
    assert!(stderr(&out).contains("token expired"), "{}", stderr(&out));
    let rows = stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'session' AND status_id = 2",
            1,
            AUDIT_WAIT,
        )
        .expect("session end row");
    assert!(rows[0]["status_detail"]
        .as_str()
        .unwrap_or_default()
        .starts_with("token_expired"));
    assert_eq!(rows[0]["actor_user_uid"], AGENT_OID);
}

/// An agent that opens connections and never logs in cannot take the last
/// quarter of the target's slots: with `max_connections = 64`, it holds 48
/// stalled logins (with room, nobody is held back), and its 49th is
/// refused with 53300 and on record, while another source logs in into
/// that last quarter, and the agent itself again once its stalled
/// connections are gone.
#[test]
fn one_source_stalling_logins_cannot_take_every_connection_slot() {
    if !privileged("one_source_stalling_logins_cannot_take_every_connection_slot") {
        return;
    }
    let stack = tollgate_tests::Stack::start_with(
        tollgate_tests::Postgres::start().expect("PostgreSQL"),
        |config| config.target_extra = "max_connections = 64".into(),
    )
    .expect("start PostgreSQL, IdP and tollgate");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pg_stall_logins.py");
    let mut holder = AgentCgroup::command(
        &stack.gateway.config.agent_cgroup,
        &tollgate_tests::duckdb::python(),
    )
    .arg(&script)
    .args(["127.0.0.1", &stack.postgres.port.to_string(), "48", "30"])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("start pg_stall_logins.py");
    let answer = first_json_line(&mut holder);
    assert_eq!(answer["held"], 48, "{answer}");
    assert_eq!(answer["held_told"], 0, "the 48 were let in: {answer}");
    assert_eq!(answer["next"]["sqlstate"], "53300", "{answer}");
    assert!(
        answer["next"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("too many connections logging in from this source")),
        "{answer}"
    );
    // Another source (this test's own process, outside the agent
    // cgroups, connecting to the listener) still logs in.
    let token = stack.idp.token(AGENT_OID, &[]).expect("mint a token");
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(format!(
            "host=127.0.0.1 port={} user=agent dbname=orders connect_timeout=5 sslmode=disable",
            stack.gateway.config.listen.port()
        ))
        .args(["-c", "SELECT 41 + 1"])
        .env("PGPASSWORD", &token)
        .output()
        .expect("run psql");
    assert_eq!(stdout(&out), "42", "{}", stderr(&out));
    let _ = holder.kill();
    let _ = holder.wait();
    // Once tollgate has seen the stalled connections go, the source logs
    // in again.
    let mut last = String::new();
    let again =
        tollgate_tests::wait_for("the agent to log in again", Duration::from_secs(10), || {
            let out = stack
                .agent_psql(&token, "SELECT 41 + 1")
                .output()
                .expect("run psql");
            last = stderr(&out);
            stdout(&out) == "42"
        });
    assert!(again.is_ok(), "{last}");
    stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'refusal' \
             AND contains(status_detail, 'connections logging in to the target')",
            1,
            Duration::from_secs(10),
        )
        .expect("the refusal on record");
}

/// A connection stops counting among its source's logins once its caller
/// is authenticated: an agent whose pool holds more sessions than a
/// source may have logging in, on a target short of slots, still logs one
/// more in. (Were logged-in sessions still counted, the 49th login below,
/// with 15 of 64 slots free and 48 counted against a bound of 16, would be
/// refused as too many logging in from this source.)
#[test]
fn sessions_that_have_logged_in_do_not_count_against_the_source_login_bound() {
    if !privileged("sessions_that_have_logged_in_do_not_count_against_the_source_login_bound") {
        return;
    }
    let stack = tollgate_tests::Stack::start_with(
        tollgate_tests::Postgres::start().expect("PostgreSQL"),
        |config| config.target_extra = "max_connections = 64".into(),
    )
    .expect("start PostgreSQL, IdP and tollgate");
    let token = stack.idp.token(AGENT_OID, &[]).expect("mint a token");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pg_hold_sessions.py");
    let mut pool = AgentCgroup::command(
        &stack.gateway.config.agent_cgroup,
        &tollgate_tests::duckdb::python(),
    )
    .arg(&script)
    .args([
        "127.0.0.1",
        &stack.postgres.port.to_string(),
        "agent",
        "orders",
        "48",
        "30",
    ])
    .env("PGPASSWORD", &token)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("start pg_hold_sessions.py");
    let answer = first_json_line(&mut pool);
    let _ = pool.kill();
    let _ = pool.wait();
    assert_eq!(answer["held"], 48, "the pool's 48 sessions: {answer}");
    assert_eq!(answer["next"]["ok"], true, "the 49th login: {answer}");
    assert_eq!(answer["next"]["value"], 42, "{answer}");
}
