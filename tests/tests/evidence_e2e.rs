//! The kernel's evidence, end to end: real connections from a real agent
//! cgroup and from outside it, the host-wide probe, the evidence stream
//! under the audit directory, and `tollgate verify` reconciling the two.

use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    process::{Command, Stdio},
    sync::{RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::Duration,
};

use serde_json::{json, Value};
use tollgate_tests::{duckdb, evidence, free_port, privileged, AgentCgroup, Postgres, Stack};

const AGENT_OID: &str = "4f1c2b7e-0000-4000-8000-00000000e71d";

/// The evidence programs are host-wide: every tollgate running on the host
/// sees every test's connects and packets. Tests that would show up in
/// others' evidence run alone: the flood test, which overflows every
/// tollgate's general ring buffer, and the test of packets recorded by
/// their destination address alone, which every tollgate protecting a
/// target at that address (`::1`) records.
static HOST_WIDE_PROBE: RwLock<()> = RwLock::new(());

fn sharing_the_probe() -> RwLockReadGuard<'static, ()> {
    HOST_WIDE_PROBE
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn probe_to_itself() -> RwLockWriteGuard<'static, ()> {
    HOST_WIDE_PROBE
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

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

fn escape_script() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python/escape.py")
        .display()
        .to_string()
}

fn parse(out: std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(
        |_| json!({"outcome": "script-failed", "stderr": String::from_utf8_lossy(&out.stderr)}),
    )
}

/// escape.py run by this test process's own cgroup: outside every agent cgroup.
fn outside(args: &[&str]) -> Value {
    parse(
        Command::new(duckdb::python())
            .arg(escape_script())
            .args(args)
            .output()
            .expect("run escape.py"),
    )
}

fn as_agent(stack: &Stack, args: &[&str]) -> Value {
    parse(
        AgentCgroup::command(&stack.gateway.config.agent_cgroup, &duckdb::python())
            .arg(escape_script())
            .args(args)
            .output()
            .expect("run escape.py"),
    )
}

/// The cgroup v2 id of this process (the cgroup escape.py runs in when
/// started outside the agent cgroups).
fn own_cgroup_id() -> u64 {
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    let path = AgentCgroup::root().join(rel.trim_start_matches('/'));
    std::fs::metadata(&path)
        .map(|m| m.ino())
        .expect("own cgroup directory")
}

fn packet_rows(stack: &Stack) -> Vec<Value> {
    evidence::rows_of_kind(stack.gateway.audit_dir(), "packet_to_protected_target", "")
}

fn last_loss_counters(stack: &Stack) -> Value {
    let loss = evidence_rows(
        stack,
        "SELECT * FROM audit WHERE phase = 'loss_counters' ORDER BY sequence DESC LIMIT 1",
    );
    serde_json::from_str(loss[0]["unmapped"].as_str().unwrap_or("{}")).expect("json")
}

#[test]
fn a_clean_run_of_agent_connections_verifies_with_no_bypass_and_no_loss() {
    if !privileged("a_clean_run_of_agent_connections_verifies_with_no_bypass_and_no_loss") {
        return;
    }
    let _probe = sharing_the_probe();
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
    // Both streams' chains and signed checkpoints verified, not skipped.
    for stream in ["audit_integrity", "evidence_integrity"] {
        assert_eq!(report[stream]["checked"], true, "{summary}");
        assert_eq!(report[stream]["ok"], true, "{summary}");
    }
    assert_eq!(report["bypasses"], serde_json::json!([]), "{summary}");
    assert_eq!(report["losses"], serde_json::json!([]), "{summary}");
    assert!(
        report["loss_records"].as_u64().unwrap_or(0) >= 1,
        "{summary}"
    );
    // A directory just collected must have fresh checkpoints in both
    // streams, or its tail may have been cut off: within an hour these
    // are; held to no age at all, neither is.
    let with_age = |secs: &str| {
        evidence::verify_with(
            stack.gateway.audit_dir(),
            &stack.gateway.public_key(),
            stack.gateway.dir.path(),
            &["--max-checkpoint-age-secs", secs],
        )
    };
    let fresh = with_age("3600");
    assert_eq!(fresh.code, 0, "{}", fresh.summary);
    std::thread::sleep(Duration::from_millis(1_100));
    let stale = with_age("0");
    assert_eq!(stale.code, 1, "{}", stale.summary);
    for stream in ["audit_integrity", "evidence_integrity"] {
        assert_eq!(stale.report[stream]["ok"], false, "{}", stale.summary);
    }
    assert_eq!(
        stale
            .summary
            .matches("first problem: checkpoint_stale")
            .count(),
        2,
        "both streams' checkpoints judged: {}",
        stale.summary
    );
    // From this host's boot to the daemon's start nothing was watched:
    // the report says so, for this boot.
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    let unwatched = report["unwatched_after_boot"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(unwatched.len(), 1, "{summary}");
    assert_eq!(unwatched[0]["boot_id"], boot_id.trim(), "{summary}");
    assert!(
        unwatched[0]["booted_at_ms"].as_i64() < unwatched[0]["watched_from_ms"].as_i64(),
        "{summary}"
    );
    assert!(summary.contains("unwatched:"), "{summary}");
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
    // The packet evidence ran and found nothing: TCP from stream sockets
    // is not its business.
    assert_eq!(report["non_tcp_packets"], 0, "{summary}");
    let packets = &counters["programs"]["packet_egress"];
    assert_eq!(packets["seen"], 0, "{counters}");
    assert_eq!(packets["dropped"], 0, "{counters}");
    assert!(
        packets["program_id"].as_u64().unwrap_or(0) > 0,
        "{counters}"
    );
}

/// A connection to a protected target opened while nothing watched (here
/// from outside the agent cgroups, after `tollgate unpin`, before the
/// next start) and still open when tollgate starts: no kernel event names
/// it, so the start lists it, and verify reports it (`open_before_watch`)
/// with the process that holds it.
#[test]
fn a_connection_open_before_tollgate_watched_is_a_finding() {
    if !privileged("a_connection_open_before_tollgate_watched_is_a_finding") {
        return;
    }
    let _probe = sharing_the_probe();
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    stack.gateway.stop();
    stack.gateway.unpin().expect("tollgate unpin");
    let target = format!("127.0.0.1:{}", stack.postgres.port);
    let held = std::net::TcpStream::connect(&target).expect("connect to the server directly");
    stack.gateway.restart().expect("restart tollgate");
    stack.gateway.stop();
    // A restart with the probe still pinned does not list it again: the
    // probe watched all along (a connection made meanwhile is an event).
    stack.gateway.restart().expect("restart tollgate again");
    stack.gateway.stop();
    drop(held);

    // Nothing else was found: the connection was made while no program
    // was attached, so no event of it exists.
    let summary = only_this_process_open_before_watch(&stack, &target);
    // And the unpin itself is on record: the start after it found no
    // probe pinned in a boot the daemon had run in.
    assert!(summary.contains("pins_removed"), "{summary}");
}

/// A connection made while its destination was not protected is judged
/// against that configuration: no bypass. When a restart then protects
/// the destination and the connection is still open (an agent's pooled
/// direct connection), the pinned probe has nothing more to say of it:
/// the restart lists the connections open to the targets it adds, and
/// verify reports this one (`open_before_watch`).
#[test]
fn a_connection_still_open_to_a_target_a_restart_adds_is_a_finding() {
    if !privileged("a_connection_still_open_to_a_target_a_restart_adds_is_a_finding") {
        return;
    }
    let _probe = sharing_the_probe();
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    stack.gateway.stop();
    let database = stack.gateway.config.target_address;
    // Fronting another server for a while (nothing listens there).
    let other = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    restart_fronting(&mut stack, other);
    let held = std::net::TcpStream::connect(database).expect("connect to the server directly");
    std::thread::sleep(Duration::from_millis(200));
    stack.gateway.stop();
    restart_fronting(&mut stack, database);
    stack.gateway.stop();
    drop(held);

    // Its connect was seen, while the database was not protected: no
    // finding of its own.
    only_this_process_open_before_watch(&stack, &database.to_string());
}

/// Restarts the stopped daemon with its target at `address` instead.
fn restart_fronting(stack: &mut Stack, address: std::net::SocketAddr) {
    stack.gateway.config.target_address = address;
    std::fs::write(&stack.gateway.config_path, stack.gateway.config.toml()).expect("config");
    stack
        .gateway
        .restart()
        .unwrap_or_else(|err| panic!("restart fronting {address}: {err:#}"));
}

/// Runs verify, which must fail with one bypass only: an
/// `open_before_watch` of this process's connection to `destination`.
/// Returns the summary.
fn only_this_process_open_before_watch(stack: &Stack, destination: &str) -> String {
    let (code, summary, report) = verify(stack);
    assert_eq!(code, 1, "{summary}");
    let bypasses = report["bypasses"].as_array().cloned().unwrap_or_default();
    assert_eq!(bypasses.len(), 1, "{summary}");
    assert_eq!(bypasses[0]["finding"], "open_before_watch", "{summary}");
    assert_eq!(bypasses[0]["pid"], std::process::id(), "{summary}");
    assert_eq!(bypasses[0]["destination"], destination, "{summary}");
    summary
}

/// A restart replaces the host-wide programs a previous daemon left
/// pinned, and the kernel counts recursion misses per program instance:
/// the new daemon's first loss record carries each instance it replaced
/// (its id, its misses just before), so that what it missed after its
/// daemon's last record is judged; later records do not repeat it.
#[test]
fn a_restart_puts_the_programs_it_replaced_on_its_first_loss_record() {
    if !privileged("a_restart_puts_the_programs_it_replaced_on_its_first_loss_record") {
        return;
    }
    let _probe = sharing_the_probe();
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    stack.gateway.stop();
    let before = last_loss_counters(&stack);
    stack.gateway.restart().expect("restart tollgate");
    stack.gateway.stop();
    let rows = evidence_rows(
        &stack,
        "SELECT * FROM audit WHERE phase IN ('config', 'loss_counters') ORDER BY sequence",
    );
    let last_start = rows
        .iter()
        .rposition(|r| r["phase"] == "config")
        .expect("the restart's config record");
    let after: Vec<Value> = rows[last_start + 1..]
        .iter()
        .map(|r| serde_json::from_str(r["unmapped"].as_str().unwrap_or("{}")).expect("json"))
        .collect();
    assert!(!after.is_empty(), "no loss record after the restart");
    for program in ["tcp_state", "packet_egress"] {
        let old_id = &before["programs"][program]["program_id"];
        assert!(old_id.is_u64(), "{program}: {before}");
        let first = &after[0]["programs"][program];
        assert_eq!(
            &first["replaced"]["program_id"], old_id,
            "{program}: {first}"
        );
        assert!(
            first["replaced"]["recursion_misses"].is_u64(),
            "{program}: {first}"
        );
        assert_ne!(&first["program_id"], old_id, "{program}: a new instance");
        for later in &after[1..] {
            assert!(
                later["programs"][program].get("replaced").is_none(),
                "{program}: {later}"
            );
        }
    }
    let (code, summary, _) = verify(&stack);
    assert_eq!(code, 0, "{summary}");
}

#[test]
fn non_tcp_packets_to_a_protected_target_are_evidence_and_each_socket_is_a_bypass() {
    if !privileged("non_tcp_packets_to_a_protected_target_are_evidence_and_each_socket_is_a_bypass")
    {
        return;
    }
    let _probe = sharing_the_probe();
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let port = stack.postgres.port.to_string();
    let before = stack.postgres.connections_received();
    // From outside the agent cgroups, where nothing refuses them: five
    // datagrams on one socket, one on a connected socket, and a TCP SYN
    // made by hand on a raw socket.
    let burst = outside(&["udp", "127.0.0.1", &port, "--count", "5"]);
    assert_eq!(burst["outcome"], "sent", "{burst}");
    let connected = outside(&["udp", "127.0.0.1", &port, "--connect"]);
    assert_eq!(connected["outcome"], "sent", "{connected}");
    let raw = outside(&["rawsend", "127.0.0.1", &port]);
    assert_eq!(raw["outcome"], "sent", "{raw}");
    // An agent's datagram is refused before it becomes a packet; so is
    // its raw socket.
    let agent = as_agent(&stack, &["udp", "127.0.0.1", &port]);
    assert_eq!(agent["outcome"], "denied", "{agent}");
    let agent_raw = as_agent(&stack, &["raw"]);
    assert_eq!(agent_raw["outcome"], "denied", "{agent_raw}");
    // A datagram to an unprotected port is nobody's business.
    let unprotected = outside(&["udp", "127.0.0.1", &free_port().to_string()]);
    assert_eq!(unprotected["outcome"], "sent", "{unprotected}");
    // None of it is a PostgreSQL connection.
    assert_eq!(stack.postgres.connections_received(), before);
    stack.gateway.stop();

    let rows = packet_rows(&stack);
    assert_eq!(rows.len(), 3, "one record per socket: {rows:?}");
    let own_cgroup = own_cgroup_id();
    let by_cookie = |answer: &Value| -> Value {
        rows.iter()
            .find(|r| r["upstream_socket_cookie"] == answer["cookie"])
            .cloned()
            .unwrap_or_else(|| panic!("no record for the socket of {answer}: {rows:?}"))
    };
    for (answer, protocol, socket_type, packets) in [
        (&burst, "udp", 2, 1),
        (&connected, "udp", 2, 1),
        (&raw, "tcp", 3, 1),
    ] {
        let row = by_cookie(answer);
        let unmapped: Value =
            serde_json::from_str(row["unmapped"].as_str().unwrap_or("{}")).expect("json");
        assert_eq!(row["connection_info_protocol_name"], protocol, "{row}");
        assert_eq!(unmapped["socket_type"], socket_type, "{row}");
        assert_eq!(unmapped["packets"], packets, "{row}");
        assert_eq!(row["dst_endpoint_ip"], "127.0.0.1", "{row}");
        assert_eq!(row["dst_endpoint_port"], stack.postgres.port, "{row}");
        assert_eq!(row["family"], "inet", "{row}");
        // The sending socket's cgroup: this test's, not an agent's.
        assert_eq!(row["actor_process_cgroup_id"], own_cgroup, "{row}");
        assert_eq!(row["activity_id"], 6, "OCSF Traffic: {row}");
        assert_eq!(row["actor_process_pid"], Value::Null, "{row}");
    }
    // The burst's other four datagrams were counted, not recorded.
    let counters = last_loss_counters(&stack);
    let packets = &counters["programs"]["packet_egress"];
    assert_eq!(packets["seen"], 3, "{counters}");
    assert_eq!(packets["emitted"], 3, "{counters}");
    assert_eq!(packets["dropped"], 0, "{counters}");
    assert_eq!(packets["suppressed"], 4, "{counters}");
    // Every one of these events is one a verdict rests on: each went to
    // the reserved ring buffer, which a flood of connects cannot fill.
    assert_eq!(packets["emitted_reserved"], 3, "{counters}");
    for program in ["sendmsg4", "sock_create"] {
        let refusals = &counters["programs"][program];
        assert!(
            refusals["emitted"].as_u64().unwrap_or(0) >= 1,
            "{program}: {counters}"
        );
        assert_eq!(
            refusals["emitted_reserved"], refusals["emitted"],
            "{program}: {counters}"
        );
    }

    let (code, summary, report) = verify(&stack);
    assert_eq!(code, 1, "{summary}");
    assert_eq!(report["non_tcp_packets"], 3, "{summary}");
    assert_eq!(report["losses"], json!([]), "{summary}");
    let bypasses = report["bypasses"].as_array().cloned().unwrap_or_default();
    assert_eq!(bypasses.len(), 3, "{summary}");
    for b in &bypasses {
        assert_eq!(b["finding"], "non_tcp_packet_to_protected_target", "{b}");
        assert_eq!(b["target"], "orders-db", "{b}");
        assert_eq!(b["destination"], format!("127.0.0.1:{port}"), "{b}");
    }
    assert!(
        summary.contains("non_tcp_packet_to_protected_target"),
        "{summary}"
    );
}

#[test]
fn a_datagram_to_an_ipv6_protected_target_is_evidence() {
    if !privileged("a_datagram_to_an_ipv6_protected_target_is_evidence") {
        return;
    }
    let _probe = sharing_the_probe();
    let postgres = Postgres::start_dual_stack().expect("PostgreSQL on 127.0.0.1 and ::1");
    let v6 = postgres.address_v6();
    let mut stack =
        Stack::start_with(postgres, |config| config.target_address = v6).expect("start");
    let port = stack.postgres.port.to_string();
    let sent = outside(&["udp", "::1", &port]);
    assert_eq!(sent["outcome"], "sent", "{sent}");
    // The IPv4 address of the same server is not the protected target.
    let v4 = outside(&["udp", "127.0.0.1", &port]);
    assert_eq!(v4["outcome"], "sent", "{v4}");
    stack.gateway.stop();

    let rows = packet_rows(&stack);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["family"], "inet6", "{rows:?}");
    assert_eq!(rows[0]["dst_endpoint_ip"], "::1", "{rows:?}");
    assert_eq!(
        rows[0]["upstream_socket_cookie"], sent["cookie"],
        "{rows:?}"
    );
    let (code, summary, report) = verify(&stack);
    assert_eq!(code, 1, "{summary}");
    assert_eq!(
        report["bypasses"][0]["finding"], "non_tcp_packet_to_protected_target",
        "{summary}"
    );
}

/// The packet program walks an IPsec authentication header over IPv4 too:
/// the UDP header behind it gives the port, and the packet is evidence of
/// a datagram to the protected target.
#[test]
fn an_ipv4_packet_behind_an_authentication_header_is_evidence_with_its_port() {
    if !privileged("an_ipv4_packet_behind_an_authentication_header_is_evidence_with_its_port") {
        return;
    }
    let _probe = probe_to_itself();
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let port = stack.postgres.port.to_string();
    let sent = outside(&["rawsend-ah", "127.0.0.1", &port]);
    assert_eq!(sent["outcome"], "sent", "{sent}");
    stack.gateway.stop();
    let rows = packet_rows(&stack);
    let row = rows
        .iter()
        .find(|r| r["upstream_socket_cookie"] == sent["cookie"])
        .unwrap_or_else(|| panic!("no record of the packet: {rows:?}"));
    assert_eq!(row["dst_endpoint_ip"], "127.0.0.1", "{row}");
    assert_eq!(row["dst_endpoint_port"], stack.postgres.port, "{row}");
    assert_eq!(row["connection_info_protocol_name"], "udp", "{row}");
}

#[test]
fn ipv6_packets_that_hide_their_ports_are_evidence_at_the_protected_address() {
    if !privileged("ipv6_packets_that_hide_their_ports_are_evidence_at_the_protected_address") {
        return;
    }
    let _probe = probe_to_itself();
    let postgres = Postgres::start_dual_stack().expect("PostgreSQL on 127.0.0.1 and ::1");
    let v6 = postgres.address_v6();
    let mut stack =
        Stack::start_with(postgres, |config| config.target_address = v6).expect("start");
    let port = stack.postgres.port.to_string();
    let send = |kind: &str, headers: &str| {
        let answer = outside(&["rawsend6", "::1", &port, kind, headers]);
        assert_eq!(answer["outcome"], "sent", "{kind} {headers}: {answer}");
        answer
    };
    // As many destination options headers as the packet program walks:
    // it reads the port. One more: it cannot, and records the packet by
    // its address. ESP is the host's own IPsec (its ports encrypted): not
    // recorded. A fragment after the first carries no ports; its first
    // fragment is what counts.
    let walked = send("options", "8");
    let stacked = send("options", "9");
    // An authentication header is walked to the ports behind it; a UDP
    // header cut short has no port to read.
    let authenticated = send("ah", "1");
    let cut_short = send("cut-short", "1");
    let encrypted = send("esp", "1");
    let fragment = send("later-fragment", "1");
    stack.gateway.stop();

    let rows = packet_rows(&stack);
    let row_of = |answer: &Value| {
        rows.iter()
            .find(|r| r["upstream_socket_cookie"] == answer["cookie"])
            .cloned()
    };
    assert!(row_of(&fragment).is_none(), "{rows:?}");
    assert!(row_of(&encrypted).is_none(), "{rows:?}");
    assert_eq!(rows.len(), 4, "{rows:?}");
    for (answer, what) in [(&walked, "8 headers"), (&authenticated, "AH")] {
        let row = row_of(answer).unwrap_or_else(|| panic!("no record for {what}: {rows:?}"));
        assert_eq!(
            row["dst_endpoint_port"], stack.postgres.port,
            "{what}: {row}"
        );
        assert_eq!(row["connection_info_protocol_name"], "udp", "{what}: {row}");
    }
    // The protocol is that of the header the walk stopped at.
    for answer in [&stacked, &cut_short] {
        let row = row_of(answer).unwrap_or_else(|| panic!("no record for {answer}: {rows:?}"));
        assert_eq!(row["dst_endpoint_ip"], "::1", "{row}");
        assert_eq!(row["dst_endpoint_port"], Value::Null, "{row}");
        assert_eq!(row["connection_info_protocol_name"], "udp", "{row}");
        let unmapped: Value =
            serde_json::from_str(row["unmapped"].as_str().unwrap_or("{}")).expect("json");
        assert_eq!(unmapped["port_unread"], true, "{row}");
        assert_eq!(unmapped["socket_type"], 3, "SOCK_RAW: {row}");
    }

    let (code, summary, report) = verify(&stack);
    assert_eq!(code, 1, "{summary}");
    assert_eq!(report["non_tcp_packets"], 4, "{summary}");
    let bypasses = report["bypasses"].as_array().cloned().unwrap_or_default();
    let destinations: Vec<&str> = bypasses
        .iter()
        .filter_map(|b| b["destination"].as_str())
        .collect();
    assert_eq!(
        destinations
            .iter()
            .filter(|d| **d == "::1 (port not readable)")
            .count(),
        2,
        "{summary}"
    );
    assert!(
        destinations.contains(&format!("[::1]:{port}").as_str()),
        "{summary}"
    );
    for b in &bypasses {
        assert_eq!(b["finding"], "non_tcp_packet_to_protected_target", "{b}");
        assert_eq!(b["target"], "orders-db", "{b}");
    }
}

#[test]
fn a_direct_connection_from_outside_the_agent_cgroups_is_an_unaudited_connection() {
    if !privileged("a_direct_connection_from_outside_the_agent_cgroups_is_an_unaudited_connection")
    {
        return;
    }
    let _probe = sharing_the_probe();
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

/// An operator stops protecting the database: the restart's config record
/// says so, and a direct connection after it is no longer judged, while
/// the one made while it was protected still is.
#[test]
fn a_direct_connection_after_a_restart_that_removed_the_target_is_not_a_bypass() {
    if !privileged("a_direct_connection_after_a_restart_that_removed_the_target_is_not_a_bypass") {
        return;
    }
    let _probe = sharing_the_probe();
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let direct = |stack: &Stack| {
        stack
            .postgres
            .superuser_sql_ok("orders", "SELECT count(*) FROM customers")
            .expect("direct psql")
    };
    assert_eq!(direct(&stack), "3");
    std::thread::sleep(Duration::from_millis(200));
    stack.gateway.stop();

    // The same daemon, now fronting another server (nothing listens
    // there: no session is made).
    let other = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    restart_fronting(&mut stack, other);
    assert_eq!(direct(&stack), "3");
    std::thread::sleep(Duration::from_millis(200));
    stack.gateway.stop();

    let (code, summary, report) = verify(&stack);
    assert_eq!(code, 1, "{summary}");
    let bypasses = report["bypasses"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        bypasses.len(),
        1,
        "only the connection made while protected: {summary}"
    );
    let removed_at = report["target_changes"]
        .as_array()
        .and_then(|changes| changes.iter().find(|c| c["change"] == "removed"))
        .and_then(|c| c["time_ms"].as_i64())
        .expect("the removal is reported");
    assert!(
        bypasses[0]["time_ms"].as_i64() < Some(removed_at),
        "{summary}"
    );
    assert_eq!(
        report["target_changes"],
        json!([
            {"time_ms": removed_at, "change": "added", "target": format!("orders-db {other}")},
            {"time_ms": removed_at, "change": "removed",
             "target": format!("orders-db 127.0.0.1:{}", stack.postgres.port)},
        ]),
        "{summary}"
    );
    assert!(
        summary.contains("target removed:"),
        "the summary names the removal: {summary}"
    );
    // Both direct connections reached the server and were seen.
    assert!(report["tcp_connections"].as_u64() >= Some(2), "{summary}");
    assert_eq!(report["to_protected_targets"], 1, "{summary}");
}

/// A start that installs its targets in the kernel and fails before it
/// writes its record (here: its evidence stream cannot be opened)
/// leaves them in force: the next start records what it found there, and
/// a direct connection made meanwhile to a target only the failed start
/// protected is a bypass.
#[test]
fn a_target_of_a_start_that_failed_before_its_record_is_still_judged() {
    if !privileged("a_target_of_a_start_that_failed_before_its_record_is_still_judged") {
        return;
    }
    let _probe = sharing_the_probe();
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    stack.gateway.stop();
    let good_address = stack.gateway.config.target_address;
    let other = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    stack.gateway.config.target_address = other;
    // A file where the evidence stream's directory should be.
    let evidence_dir = stack.gateway.audit_dir().join("evidence");
    let aside = stack.gateway.dir.path().join("evidence-aside");
    std::fs::rename(&evidence_dir, &aside).expect("move the evidence stream aside");
    std::fs::write(&evidence_dir, "in the way\n").expect("write");
    std::fs::write(&stack.gateway.config_path, stack.gateway.config.toml()).expect("config");
    assert!(
        stack.gateway.restart().is_err(),
        "tollgate started without its evidence stream"
    );
    // A direct connection to the failed start's target (nothing listens:
    // the connect itself is the event).
    let refused = std::net::TcpStream::connect_timeout(&other, Duration::from_secs(2));
    assert!(refused.is_err(), "nothing should listen on {other}");
    std::thread::sleep(Duration::from_millis(200));

    stack.gateway.config.target_address = good_address;
    std::fs::remove_file(&evidence_dir).expect("remove");
    std::fs::rename(&aside, &evidence_dir).expect("put the evidence stream back");
    std::fs::write(&stack.gateway.config_path, stack.gateway.config.toml()).expect("config");
    stack
        .gateway
        .restart()
        .expect("restart on the first configuration");
    stack.gateway.stop();

    let (code, summary, report) = verify(&stack);
    assert_eq!(code, 1, "{summary}");
    let bypasses = report["bypasses"].as_array().cloned().unwrap_or_default();
    assert_eq!(bypasses.len(), 1, "{summary}");
    assert_eq!(bypasses[0]["destination"], other.to_string(), "{summary}");
    assert_eq!(
        bypasses[0]["target"], "(protected by a start without a record)",
        "{summary}"
    );
    let replaced = evidence_rows(
        &stack,
        "SELECT unmapped FROM audit WHERE phase = 'config' ORDER BY sequence DESC LIMIT 1",
    );
    let snapshot: Value =
        serde_json::from_str(replaced[0]["unmapped"].as_str().unwrap_or("{}")).expect("json");
    assert_eq!(
        snapshot["replaced_targets"],
        json!([other.to_string()]),
        "{snapshot}"
    );
}

#[test]
fn a_session_that_sends_no_statement_is_still_an_audited_upstream() {
    if !privileged("a_session_that_sends_no_statement_is_still_an_audited_upstream") {
        return;
    }
    let _probe = sharing_the_probe();
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

/// Compiles tests/c/connect_flood.c into `dir`.
fn connect_flood_binary(dir: &Path) -> String {
    tollgate_tests::compile_c_program("connect_flood", 2, dir)
}

/// How long the flood lasts, and by how many processes: on two CPUs, about
/// 50,000 connects a second each, against a general ring buffer with room
/// for about 10,900 events.
const FLOOD_MS: u64 = 4_000;
const FLOODERS: usize = 2;

#[test]
fn a_flood_of_connects_from_outside_the_agent_cgroups_loses_no_evidence_of_agents() {
    if !privileged("a_flood_of_connects_from_outside_the_agent_cgroups_loses_no_evidence_of_agents")
    {
        return;
    }
    let _probe = probe_to_itself();
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let token = stack.idp.token(AGENT_OID, &[]).expect("mint a token");
    let flood = connect_flood_binary(stack.gateway.dir.path());
    let closed = free_port().to_string();
    // From this test's own cgroup: outside every agent cgroup, unprivileged
    // as far as the probe is concerned (a connect needs nothing).
    let mut flooders: Vec<_> = (0..FLOODERS)
        .map(|_| {
            Command::new(&flood)
                .args([closed.as_str(), &FLOOD_MS.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start connect_flood")
        })
        .collect();
    // Let the flood fill the general ring buffer before the agents connect.
    std::thread::sleep(Duration::from_millis(300));
    let connections = 10;
    let mut agent_pids = Vec::new();
    for i in 0..connections {
        let child = stack
            .agent_psql(&token, &format!("SELECT {i}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run psql");
        agent_pids.push(child.id());
        let out = child.wait_with_output().expect("psql output");
        assert!(
            out.status.success(),
            "psql {i}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            stack.gateway.log()
        );
    }
    // Every agent connection was made while the flood went on.
    for flooder in &mut flooders {
        assert!(
            flooder.try_wait().expect("poll connect_flood").is_none(),
            "the flood ended before the agents' connections did: make FLOOD_MS longer"
        );
    }
    let mut flooded = 0;
    for flooder in flooders {
        let answer = parse(flooder.wait_with_output().expect("connect_flood output"));
        assert_eq!(answer["outcome"], "done", "{answer}");
        assert_eq!(answer["other"], 0, "every connect refused: {answer}");
        flooded += answer["connects"].as_u64().unwrap_or(0);
    }
    stack.gateway.stop();

    let counters = last_loss_counters(&stack);
    let tcp = &counters["programs"]["tcp_state"];
    let count = |program: &Value, name: &str| program[name].as_u64().unwrap_or(0);
    eprintln!(
        "flood: {flooded} connects in {FLOOD_MS} ms by {FLOODERS} processes; tcp_state: {tcp}"
    );
    // The flood worked: the general ring buffer overflowed.
    assert!(
        count(tcp, "dropped") > count(tcp, "dropped_reserved"),
        "the general ring buffer did not overflow ({flooded} connects): {counters}"
    );
    // ... and the reserved and agents' ones lost nothing, of any program.
    let programs = counters["programs"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert!(programs.contains_key("connect4"), "{counters}");
    for (name, program) in &programs {
        assert_eq!(program["dropped_reserved"], 0, "{name}: {counters}");
    }
    assert_eq!(
        counters["user_space"]["reserved_malformed"], 0,
        "{counters}"
    );
    assert_eq!(
        counters["user_space"]["reserved_write_failed"], 0,
        "{counters}"
    );
    for name in ["agents_malformed", "agents_write_failed"] {
        assert_eq!(counters["user_space"][name], 0, "{name}: {counters}");
    }
    // The agents' redirects went to their ring buffer, the gateway's
    // upstream connections to the reserved one.
    assert!(
        count(&counters["programs"]["connect4"], "emitted_reserved") >= connections,
        "{counters}"
    );
    assert!(count(tcp, "emitted_reserved") >= connections, "{counters}");

    // Every agent connection's redirect is on record, with its process.
    let redirected = evidence::rows_of_kind(
        stack.gateway.audit_dir(),
        "redirected",
        &format!("dst_endpoint_port = {}", stack.postgres.port),
    );
    for pid in &agent_pids {
        assert!(
            redirected
                .iter()
                .any(|r| r["actor_process_pid"].as_u64() == Some(u64::from(*pid))),
            "no redirected row for psql pid {pid}: {} rows",
            redirected.len()
        );
    }

    let (code, summary, report) = verify(&stack);
    eprintln!("{summary}");
    // The general ring's drops fail verification, as losses of other
    // connections' evidence; none is of agents or protected targets, and
    // nothing went around the gateway.
    assert_eq!(code, 1, "{summary}");
    assert_eq!(report["bypasses"], json!([]), "{summary}");
    assert_eq!(report["reserved_losses"], json!([]), "{summary}");
    for loss in report["losses"].as_array().cloned().unwrap_or_default() {
        assert_eq!(loss["agent_events_lost"], 0, "{summary}");
    }
    assert!(
        !report["losses"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .is_empty(),
        "{summary}"
    );
    assert!(
        report["audited_upstreams"].as_u64().unwrap_or(0) >= connections,
        "{summary}"
    );
    assert!(
        summary.contains("reserved loss:       0 intervals"),
        "{summary}"
    );
}

/// Compiles tests/c/send_flood.c into `dir`.
fn send_flood_binary(dir: &Path) -> String {
    tollgate_tests::compile_c_program("send_flood", 2, dir)
}

/// How long an agent floods refused datagrams, and with how many
/// processes: each sends several hundred thousand a second, far more than
/// the reader writes, so the agents' ring buffer (about 10,900 events)
/// overflows within milliseconds.
const SEND_FLOOD_MS: u64 = 2_000;
const SEND_FLOODERS: usize = 2;

/// An agent floods refused datagrams at the target to overflow the ring
/// buffer its events go to, while a process outside the agent cgroups
/// connects to the target directly: the agent's flood is a loss of agent
/// events, and every direct connection is still on record as a bypass.
#[test]
fn an_agent_flooding_refusals_cannot_hide_a_bypass() {
    if !privileged("an_agent_flooding_refusals_cannot_hide_a_bypass") {
        return;
    }
    let _probe = probe_to_itself();
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let flood = send_flood_binary(stack.gateway.dir.path());
    let port = stack.postgres.port.to_string();
    let mut flooders: Vec<_> = (0..SEND_FLOODERS)
        .map(|_| {
            AgentCgroup::command(&stack.gateway.config.agent_cgroup, &flood)
                .args(["127.0.0.1", port.as_str(), &SEND_FLOOD_MS.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start send_flood in the agent cgroup")
        })
        .collect();
    // Let the flood fill the agents' ring buffer before the bypasses.
    std::thread::sleep(Duration::from_millis(300));
    let bypasses = 5;
    for _ in 0..bypasses {
        let direct = stack
            .postgres
            .superuser_sql_ok("orders", "SELECT count(*) FROM customers")
            .expect("direct psql");
        assert_eq!(direct, "3");
    }
    for flooder in &mut flooders {
        assert!(
            flooder.try_wait().expect("poll send_flood").is_none(),
            "the flood ended before the direct connections did: make SEND_FLOOD_MS longer"
        );
    }
    let mut sent = 0;
    for flooder in flooders {
        let answer = parse(flooder.wait_with_output().expect("send_flood output"));
        assert_eq!(answer["outcome"], "done", "{answer}");
        assert_eq!(answer["other"], 0, "every send refused: {answer}");
        sent += answer["sends"].as_u64().unwrap_or(0);
    }
    stack.gateway.stop();

    let counters = last_loss_counters(&stack);
    let count =
        |program: &str, name: &str| counters["programs"][program][name].as_u64().unwrap_or(0);
    eprintln!(
        "flood: {sent} refused sends in {SEND_FLOOD_MS} ms by {SEND_FLOODERS} processes; sendmsg4: {}; tcp_state: {}",
        counters["programs"]["sendmsg4"], counters["programs"]["tcp_state"]
    );
    // The flood worked: the agents' ring buffer overflowed ...
    assert!(
        count("sendmsg4", "dropped_reserved") > 0,
        "the agents' ring buffer did not overflow ({sent} sends): {counters}"
    );
    // ... and the ring of connections to protected targets lost nothing.
    for program in ["tcp_state", "packet_egress"] {
        assert_eq!(
            count(program, "dropped_reserved"),
            0,
            "{program}: {counters}"
        );
    }
    for name in ["reserved_malformed", "reserved_write_failed"] {
        assert_eq!(counters["user_space"][name], 0, "{name}: {counters}");
    }

    let (code, summary, report) = verify(&stack);
    eprintln!("{summary}");
    assert_eq!(code, 1, "{summary}");
    let found: Vec<&Value> = report["bypasses"]
        .as_array()
        .map(|b| b.iter().collect())
        .unwrap_or_default();
    assert_eq!(found.len(), bypasses, "{summary}");
    for bypass in found {
        assert_eq!(
            bypass["finding"], "unaudited_connection_to_protected_target",
            "{summary}"
        );
        assert_eq!(bypass["process"], "psql", "{summary}");
    }
    // The agent's flood is a loss, of agent events, and hides no bypass.
    assert_eq!(report["reserved_losses"], json!([]), "{summary}");
    let agent_events_lost: u64 = report["losses"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|l| l["agent_events_lost"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    assert!(agent_events_lost > 0, "{summary}");
    assert!(summary.contains("agent events)"), "{summary}");
}
