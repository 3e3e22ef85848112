//! No way around the gateway: every way an agent process can try to reach a
//! protected PostgreSQL is redirected to tollgate or refused by the real
//! kernel programs in a real agent cgroup, never reaches the server
//! directly, and is on record in the evidence stream. The holes a cgroup
//! redirect cannot close (a socket made before joining the cgroup) are
//! found by `tollgate verify`.

use std::{
    net::{SocketAddr, TcpListener},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};
use tollgate_tests::{
    duckdb, evidence, free_port, privileged, skip_part, tollgate_bin, wait_for, AgentCgroup,
    Postgres, Stack,
};

const AGENT_OID: &str = "4f1c2b7e-0000-4000-8000-0000000e5ca9";

fn script() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python/escape.py")
        .display()
        .to_string()
}

fn parse(out: std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        json!({
            "outcome": "script-failed",
            "stderr": String::from_utf8_lossy(&out.stderr),
        })
    })
}

/// escape.py run as an agent: inside the agent cgroup from exec on.
fn as_agent(stack: &Stack, args: &[&str]) -> Value {
    let out = AgentCgroup::command(&stack.gateway.config.agent_cgroup, &duckdb::python())
        .arg(script())
        .args(args)
        .output()
        .expect("run escape.py");
    parse(out)
}

/// psql in `cgroup` as the agent, presenting `token`, running `sql`
/// against `host`:`port` (which the kernel redirects to tollgate).
fn psql_in(
    cgroup: &std::path::Path,
    host: &str,
    port: &str,
    token: &str,
    sql: &str,
) -> std::process::Output {
    AgentCgroup::command(cgroup, "psql")
        .args(["-X", "-A", "-t", "-c", sql])
        .arg(format!(
            "host={host} port={port} user=agent dbname=orders connect_timeout=5 sslmode=disable"
        ))
        .env("PGPASSWORD", token)
        .output()
        .expect("psql")
}

/// escape.py run outside every agent cgroup.
fn outside(args: &[&str]) -> Value {
    let out = Command::new(duckdb::python())
        .arg(script())
        .args(args)
        .output()
        .expect("run escape.py");
    parse(out)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn agent_cgroup_id(stack: &Stack) -> i64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(&stack.gateway.config.agent_cgroup)
        .map(|m| m.ino() as i64)
        .expect("agent cgroup")
}

/// The `redirected` evidence rows of the agent cgroup's connects to
/// `port`.
fn agent_redirects(stack: &Stack, port: &str) -> Vec<Value> {
    evidence::rows_of_kind(
        stack.gateway.audit_dir(),
        "redirected",
        &format!(
            "dst_endpoint_port = {port} AND actor_process_cgroup_id = {}",
            agent_cgroup_id(stack)
        ),
    )
}

/// `tollgate verify` over the stack's audit and evidence, which must pass.
fn verify_passes(stack: &Stack) -> evidence::VerifyRun {
    let run = evidence::verify(
        stack.gateway.audit_dir(),
        &stack.gateway.public_key(),
        stack.gateway.dir.path(),
    );
    assert_eq!(run.code, 0, "{}", run.summary);
    run
}

/// Runs each case (name, `escape.py` arguments, the peer the agent must
/// see) as an agent: each reaches tollgate, the redirect invisible to the
/// agent, and none reaches PostgreSQL (tollgate opens no upstream before
/// a valid token).
fn each_reaches_tollgate(stack: &Stack, cases: &[(&str, Vec<&str>, String)]) {
    let before = stack.postgres.connections_received();
    for (case, args, peer) in cases {
        let answer = as_agent(stack, args);
        assert_eq!(answer["outcome"], "tollgate", "{case}: {answer}");
        assert_eq!(answer["peer"], peer.as_str(), "{case}: {answer}");
    }
    assert_eq!(stack.postgres.connections_received(), before);
}

#[test]
fn tcp_connects_from_an_agent_cgroup_are_redirected_in_every_form() {
    if !privileged("tcp_connects_from_an_agent_cgroup_are_redirected_in_every_form") {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let port = stack.postgres.port.to_string();
    let cases: [(&str, Vec<&str>, String); 3] = [
        (
            "IPv4 connect",
            vec!["tcp", "127.0.0.1", &port],
            format!("127.0.0.1:{port}"),
        ),
        (
            "IPv4-mapped IPv6 connect",
            vec!["tcp", "::ffff:127.0.0.1", &port],
            format!("::ffff:127.0.0.1:{port}"),
        ),
        (
            "TCP Fast Open (sendto MSG_FASTOPEN)",
            vec!["tcp", "127.0.0.1", &port, "--fastopen"],
            format!("127.0.0.1:{port}"),
        ),
    ];
    each_reaches_tollgate(&stack, &cases);
    stack.gateway.stop();

    let audit = stack.gateway.audit_dir();
    let cgroup = agent_cgroup_id(&stack);
    let redirected = agent_redirects(&stack, &port);
    assert_eq!(redirected.len(), cases.len(), "{redirected:?}");
    let families: Vec<_> = redirected.iter().map(|r| r["family"].clone()).collect();
    assert_eq!(families, [json!("inet"), json!("inet6"), json!("inet")]);
    // The host-wide probe saw each connection (to the listener, by cookie).
    let connects = evidence::rows_of_kind(
        audit,
        "tcp_connect",
        &format!("actor_process_cgroup_id = {cgroup}"),
    );
    for r in &redirected {
        assert!(
            connects.iter().any(
                |c| c["upstream_socket_cookie"] == r["upstream_socket_cookie"]
                    && c["dst_endpoint_port"] == stack.gateway.config.listen.port()
            ),
            "no tcp_connect to the listener for {r}"
        );
    }
    let run = verify_passes(&stack);
    assert_eq!(run.report["redirected"], cases.len(), "{}", run.summary);
}

/// The kernel sends a connect to `0.0.0.0` to a local address after the
/// connect hooks ran: it must be judged, and redirected, as a connect to
/// that address.
#[test]
fn connects_to_the_unspecified_address_from_an_agent_cgroup_are_redirected_and_audited() {
    if !privileged(
        "connects_to_the_unspecified_address_from_an_agent_cgroup_are_redirected_and_audited",
    ) {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let port = stack.postgres.port.to_string();
    let cases: [(&str, Vec<&str>, String); 3] = [
        (
            "0.0.0.0",
            vec!["tcp", "0.0.0.0", &port],
            format!("127.0.0.1:{port}"),
        ),
        (
            "::ffff:0.0.0.0 on an IPv6 socket",
            vec!["tcp", "::ffff:0.0.0.0", &port],
            format!("::ffff:127.0.0.1:{port}"),
        ),
        // Bound to a multicast address a socket has no source address, and
        // the kernel sends `0.0.0.0` to 127.0.0.1 all the same.
        (
            "0.0.0.0 from a socket bound to a multicast address",
            vec!["tcp", "0.0.0.0", &port, "--source", "224.0.0.1"],
            format!("127.0.0.1:{port}"),
        ),
    ];
    each_reaches_tollgate(&stack, &cases);
    // A real client through `0.0.0.0`, end to end.
    let token = stack.idp.token(AGENT_OID, &[]).expect("token");
    let out = psql_in(
        &stack.gateway.config.agent_cgroup,
        "0.0.0.0",
        &port,
        &token,
        "SELECT 41 + 1",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42",
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.gateway.log()
    );
    assert!(
        !stack.postgres.log().contains("\"agent\""),
        "the agent's own login reached PostgreSQL:\n{}",
        stack.postgres.log()
    );
    stack.gateway.stop();

    let redirected = agent_redirects(&stack, &port);
    assert_eq!(redirected.len(), cases.len() + 1, "{redirected:?}");
    for row in &redirected {
        assert_eq!(row["dst_endpoint_ip"], "127.0.0.1", "{row}");
    }
    let run = verify_passes(&stack);
    assert_eq!(run.report["bypasses"], json!([]), "{}", run.summary);
    assert_eq!(run.report["redirected"], cases.len() + 1, "{}", run.summary);
    assert_eq!(run.report["audited_upstreams"], 1, "{}", run.summary);
}

/// `0.0.0.0` goes to the socket's own address when it is bound to one: a
/// target on a second loopback address is reached that way, and must be
/// redirected; from an unbound socket the same connect goes to 127.0.0.1,
/// which is not that target.
#[test]
fn a_connect_to_the_unspecified_address_is_judged_by_the_address_the_kernel_sends_it_to() {
    if !privileged(
        "a_connect_to_the_unspecified_address_is_judged_by_the_address_the_kernel_sends_it_to",
    ) {
        return;
    }
    let postgres = Postgres::start().expect("PostgreSQL on 127.0.0.1");
    let port = postgres.port;
    let alias = SocketAddr::from(([127, 0, 0, 2], port));
    let stack = Stack::start_with(postgres, |config| config.target_address = alias)
        .expect("start tollgate protecting 127.0.0.2");
    let port = port.to_string();

    let answer = as_agent(&stack, &["tcp", "0.0.0.0", &port, "--source", "127.0.0.2"]);
    assert_eq!(answer["outcome"], "tollgate", "{answer}");
    assert_eq!(answer["peer"], format!("127.0.0.2:{port}"), "{answer}");
    // Unbound, the kernel sends it to 127.0.0.1, where the unprotected
    // server listens: judged by where it goes, not by where it might.
    let answer = as_agent(&stack, &["tcp", "0.0.0.0", &port]);
    assert_eq!(answer["outcome"], "postgres", "{answer}");
}

/// This host's first IPv4 address of global scope and its device, as
/// `ip` lists them.
fn global_ipv4_and_device() -> (std::net::Ipv4Addr, String) {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .output()
        .expect("run ip");
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    // "4: eth0    inet 192.0.2.2/24 brd ... scope global eth0 ..."
    let found = listing.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        let device = words.get(1)?;
        let address = words.get(3)?.split('/').next()?.parse().ok()?;
        Some((address, device.to_string()))
    });
    found.unwrap_or_else(|| {
        panic!("this test needs an IPv4 address of global scope on some device; `ip` listed: {listing:?}")
    })
}

/// A socket bound to a device (SO_BINDTODEVICE, no privilege needed) that
/// connects to the unspecified address reaches the device's own address:
/// the kernel takes it for source and destination alike. When that is a
/// protected target's, the connection would go around tollgate; it is
/// refused, and on record.
#[test]
fn a_connect_to_the_unspecified_address_from_a_socket_bound_to_a_device_is_refused() {
    if !privileged(
        "a_connect_to_the_unspecified_address_from_a_socket_bound_to_a_device_is_refused",
    ) {
        return;
    }
    let (address, device) = global_ipv4_and_device();
    // A server on every address, protected at the device's address.
    let listener = TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 256];
            let _ = std::io::Read::read(&mut stream, &mut buf);
        }
    });
    let target = SocketAddr::from((address, port));
    let mut stack = Stack::start_with(Postgres::start().expect("postgres"), |config| {
        config.target_address = target
    })
    .expect("start tollgate protecting the device's address");
    let port = port.to_string();

    // Outside the agent cgroups the connection goes straight to the
    // protected address: what an agent would get without the refusal.
    let answer = outside(&["tcp", "0.0.0.0", &port, "--device", &device]);
    assert_eq!(answer["outcome"], "other", "{answer}");
    assert_eq!(answer["peer"], format!("{target}"), "{answer}");
    for asked in ["0.0.0.0", "::ffff:0.0.0.0"] {
        let answer = as_agent(&stack, &["tcp", asked, &port, "--device", &device]);
        assert_eq!(answer["outcome"], "denied", "{asked}: {answer}");
    }
    // Not bound to a device, the same connect goes to 127.0.0.1, which is
    // not protected here, and is let through.
    let answer = as_agent(&stack, &["tcp", "0.0.0.0", &port]);
    assert_eq!(answer["outcome"], "other", "{answer}");
    assert_eq!(answer["peer"], format!("127.0.0.1:{port}"), "{answer}");
    stack.gateway.stop();

    let refused = evidence::rows_of_kind(
        stack.gateway.audit_dir(),
        "refused_unspecified_on_device",
        "",
    );
    assert_eq!(refused.len(), 2, "{refused:?}");
    for row in &refused {
        assert_eq!(row["dst_endpoint_port"], port.parse::<u16>().unwrap_or(0));
        assert_eq!(row["actor_process_cgroup_id"], agent_cgroup_id(&stack));
    }
}

#[test]
fn an_ipv6_protected_target_is_redirected_and_its_upstream_audited() {
    if !privileged("an_ipv6_protected_target_is_redirected_and_its_upstream_audited") {
        return;
    }
    let postgres = Postgres::start_dual_stack().expect("PostgreSQL on 127.0.0.1 and ::1");
    let v6 = postgres.address_v6();
    let mut stack =
        Stack::start_with(postgres, |config| config.target_address = v6).expect("start");
    let port = stack.postgres.port.to_string();
    let before = stack.postgres.connections_received();

    // `::` is where the kernel sends it, `::1`: redirected the same.
    for host in ["::1", "::"] {
        let answer = as_agent(&stack, &["tcp", host, &port]);
        assert_eq!(answer["outcome"], "tollgate", "{host}: {answer}");
        assert_eq!(answer["peer"], format!("::1:{port}"), "{host}: {answer}");
    }
    assert_eq!(stack.postgres.connections_received(), before);

    // A whole session over IPv6: the agent's psql reaches PostgreSQL only
    // as the gateway's own upstream login.
    let token = stack.idp.token(AGENT_OID, &[]).expect("token");
    let out = psql_in(
        &stack.gateway.config.agent_cgroup,
        "::1",
        &port,
        &token,
        "SELECT current_user",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        stack.postgres.gateway_user,
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.gateway.log()
    );
    assert!(
        !stack.postgres.log().contains("\"agent\""),
        "the agent's own login reached PostgreSQL:\n{}",
        stack.postgres.log()
    );
    stack.gateway.stop();

    let audit = stack.gateway.audit_dir();
    let redirected = evidence::rows_of_kind(audit, "redirected", "dst_endpoint_ip = '::1'");
    assert_eq!(redirected.len(), 3, "{redirected:?}");
    let run = verify_passes(&stack);
    assert_eq!(run.report["to_protected_targets"], 1, "{}", run.summary);
    assert_eq!(run.report["audited_upstreams"], 1, "{}", run.summary);
}

#[test]
fn udp_datagrams_to_a_protected_target_are_refused() {
    if !privileged("udp_datagrams_to_a_protected_target_are_refused") {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let port = stack.postgres.port.to_string();
    let cases: [(&str, Vec<&str>); 5] = [
        ("IPv4 sendto", vec!["udp", "127.0.0.1", &port]),
        (
            "IPv4 connected UDP",
            vec!["udp", "127.0.0.1", &port, "--connect"],
        ),
        (
            "IPv4-mapped IPv6 sendto",
            vec!["udp", "::ffff:127.0.0.1", &port],
        ),
        // Refused as unspecified (whatever the port, though only the
        // protected one is tried here): a datagram socket can name a
        // device where no program sees it, and the kernel would then send
        // these to its address (without one, to 127.0.0.1).
        ("sendto 0.0.0.0", vec!["udp", "0.0.0.0", &port]),
        (
            "connected UDP to 0.0.0.0",
            vec!["udp", "0.0.0.0", &port, "--connect"],
        ),
    ];
    for (case, args) in &cases {
        let answer = as_agent(&stack, args);
        assert_eq!(answer["outcome"], "denied", "{case}: {answer}");
        assert_eq!(answer["errno"], libc::EPERM, "{case}: {answer}");
        // The same datagram from outside the agent cgroups goes out: the
        // refusal is the agent cgroup's program, not the host.
        let control = outside(args);
        assert_eq!(control["outcome"], "sent", "{case} outside: {control}");
    }
    stack.gateway.stop();
    let refused = evidence::rows_of_kind(
        stack.gateway.audit_dir(),
        "refused_datagram",
        &format!("dst_endpoint_port = {port}"),
    );
    assert_eq!(refused.len(), 3, "{refused:?}");
    let unspecified = evidence::rows_of_kind(
        stack.gateway.audit_dir(),
        "refused_unspecified_on_device",
        &format!("dst_endpoint_port = {port}"),
    );
    assert_eq!(unspecified.len(), 2, "{unspecified:?}");
    for row in &unspecified {
        assert_eq!(row["dst_endpoint_ip"], "0.0.0.0", "{row}");
    }
    for row in &refused {
        assert_eq!(row["activity_id"], 5, "OCSF Refuse: {row}");
        assert_eq!(row["connection_info_protocol_name"], "udp", "{row}");
        assert_eq!(row["dst_endpoint_ip"], "127.0.0.1", "{row}");
        assert!(row["actor_process_name"]
            .as_str()
            .unwrap_or("")
            .starts_with("python"));
    }
}

#[test]
fn raw_sockets_are_refused_in_an_agent_cgroup() {
    if !privileged("raw_sockets_are_refused_in_an_agent_cgroup") {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let answer = as_agent(&stack, &["raw"]);
    assert_eq!(answer["outcome"], "denied", "{answer}");
    assert_eq!(answer["errno"], libc::EPERM, "{answer}");
    let control = outside(&["raw"]);
    assert_eq!(
        control["outcome"], "created",
        "root outside a cgroup: {control}"
    );
    stack.gateway.stop();
    let refused = evidence::rows_of_kind(
        stack.gateway.audit_dir(),
        "refused_socket",
        &format!("actor_process_cgroup_id = {}", agent_cgroup_id(&stack)),
    );
    assert_eq!(refused.len(), 1, "{refused:?}");
    let unmapped: Value =
        serde_json::from_str(refused[0]["unmapped"].as_str().unwrap_or("{}")).expect("json");
    assert_eq!(unmapped["socket_type"], 3, "SOCK_RAW: {unmapped}");
}

/// Opens ICMP datagram ("ping") sockets to every group for as long as it
/// lives (the host's default, "1 0", opens them to none, root included),
/// then puts the host's setting back.
struct PingSocketsAllowed(String);

const PING_GROUP_RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";

impl PingSocketsAllowed {
    fn for_everyone() -> Self {
        let before = std::fs::read_to_string(PING_GROUP_RANGE).expect("read ping_group_range");
        std::fs::write(PING_GROUP_RANGE, "0 2147483647").expect("write ping_group_range");
        PingSocketsAllowed(before)
    }
}

impl Drop for PingSocketsAllowed {
    fn drop(&mut self) {
        if let Err(err) = std::fs::write(PING_GROUP_RANGE, self.0.trim()) {
            eprintln!(
                "could not restore {PING_GROUP_RANGE} to {:?}: {err}",
                self.0
            );
        }
    }
}

/// A ping socket sends where no sendmsg hook looks (they run for UDP
/// only): with egress deny an agent may not make one, even where an
/// allow rule for "any" protocol covers the address. Without deny it may.
#[test]
fn with_egress_default_deny_an_agent_cannot_open_sockets_no_hook_judges() {
    if !privileged("with_egress_default_deny_an_agent_cannot_open_sockets_no_hook_judges") {
        return;
    }
    let _ping = PingSocketsAllowed::for_everyone();
    let mut hosts = vec!["127.0.0.1"];
    if ipv6_available() {
        hosts.push("::1");
    } else {
        skip_part(
            "with_egress_default_deny_an_agent_cannot_open_sockets_no_hook_judges",
            "no IPv6 on this host: the ICMPv6 ping is not tried",
        );
    }
    for host in &hosts {
        let control = outside(&["ping", host]);
        assert_eq!(control["outcome"], "sent", "{host} outside: {control}");
    }
    let mut stack = Stack::start_with(Postgres::start().expect("postgres"), |config| {
        config.extra_pin_toml = "egress_default = \"deny\"\negress_allow = [{ cidr = \"127.0.0.0/8\" }, { cidr = \"::1/128\" }]".into();
    })
    .expect("start");
    for host in &hosts {
        let answer = as_agent(&stack, &["ping", host]);
        assert_eq!(answer["outcome"], "denied", "{host}: {answer}");
        assert_eq!(answer["errno"], libc::EPERM, "{host}: {answer}");
    }
    // "any" is TCP and UDP: the same rule lets a datagram through.
    let answer = as_agent(&stack, &["udp", "127.0.0.1", &free_port().to_string()]);
    assert_eq!(answer["outcome"], "sent", "udp under an any rule: {answer}");
    // Not UDP-Lite: a connected UDP-Lite socket passes no hook at all.
    let answer = as_agent(&stack, &["udplite", "127.0.0.1", &free_port().to_string()]);
    assert_eq!(answer["outcome"], "denied", "udplite: {answer}");
    assert_eq!(answer["errno"], libc::EPERM, "udplite: {answer}");
    // Nor may an agent make a stream socket of a protocol no connect hook
    // judges (Multipath TCP, where the kernel has it).
    let mptcp = outside(&["mptcp"])["outcome"] == "created";
    if mptcp {
        let answer = as_agent(&stack, &["mptcp"]);
        assert_eq!(answer["outcome"], "denied", "mptcp: {answer}");
    } else {
        skip_part(
            "with_egress_default_deny_an_agent_cannot_open_sockets_no_hook_judges",
            "no Multipath TCP in this kernel: its socket is not tried",
        );
    }
    stack.gateway.stop();
    let refused = evidence::rows_of_kind(
        stack.gateway.audit_dir(),
        "refused_socket",
        &format!("actor_process_cgroup_id = {}", agent_cgroup_id(&stack)),
    );
    assert_eq!(
        refused.len(),
        hosts.len() + 1 + usize::from(mptcp),
        "{refused:?}"
    );
    let unmapped: Vec<Value> = refused
        .iter()
        .map(|row| serde_json::from_str(row["unmapped"].as_str().unwrap_or("{}")).expect("json"))
        .collect();
    // The pings and the UDP-Lite socket: SOCK_DGRAM sockets of ICMP,
    // ICMPv6 or UDP-Lite.
    let datagrams: Vec<&Value> = unmapped.iter().filter(|u| u["socket_type"] == 2).collect();
    assert_eq!(datagrams.len(), hosts.len() + 1, "{unmapped:?}");
    for u in datagrams {
        let protocol = u["protocol"].as_u64().unwrap_or(0);
        assert!(
            protocol == 1 || protocol == 58 || protocol == 136,
            "ICMP(v6) or UDP-Lite: {u}"
        );
    }
    drop(stack);

    // Without deny the agent may ping: the refusal above is the egress
    // policy's, not every agent cgroup's.
    let stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    for host in &hosts {
        let answer = as_agent(&stack, &["ping", host]);
        assert_eq!(answer["outcome"], "sent", "{host} without deny: {answer}");
    }
    if mptcp {
        let answer = as_agent(&stack, &["mptcp"]);
        assert_eq!(answer["outcome"], "created", "mptcp without deny: {answer}");
    }
}

#[test]
fn a_socket_made_before_joining_the_agent_cgroup_goes_direct_and_verify_reports_the_bypass() {
    if !privileged(
        "a_socket_made_before_joining_the_agent_cgroup_goes_direct_and_verify_reports_the_bypass",
    ) {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let port = stack.postgres.port.to_string();
    let cgroup = stack.gateway.config.agent_cgroup.display().to_string();
    let before = stack.postgres.connections_received();
    // The hole: the cgroup hooks use the socket's cgroup, fixed at creation.
    let answer = outside(&["precreated", "127.0.0.1", &port, &cgroup]);
    assert_eq!(answer["outcome"], "postgres", "{answer}");
    assert!(stack.postgres.connections_received() > before);
    stack.gateway.stop();

    let run = evidence::verify(
        stack.gateway.audit_dir(),
        &stack.gateway.public_key(),
        stack.gateway.dir.path(),
    );
    assert_eq!(run.code, 1, "{}", run.summary);
    let bypasses = run.report["bypasses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(bypasses.len(), 1, "{}", run.summary);
    let bypass = &bypasses[0];
    assert_eq!(bypass["finding"], "direct_from_agent_cgroup", "{bypass}");
    assert_eq!(bypass["cgroup_path"], cgroup.as_str(), "{bypass}");
    assert_eq!(bypass["cgroup_id"], agent_cgroup_id(&stack), "{bypass}");
    assert_eq!(
        bypass["destination"],
        format!("127.0.0.1:{port}"),
        "{bypass}"
    );
    assert_eq!(bypass["target"], "orders-db", "{bypass}");
    assert!(bypass["process"]
        .as_str()
        .unwrap_or("")
        .starts_with("python"));
    assert!(
        run.summary.contains("direct_from_agent_cgroup"),
        "{}",
        run.summary
    );
}

/// A TCP server that reads what it is sent and closes without answering,
/// so a connect to it succeeds and escape.py reports "other".
fn accepting_listener() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 256];
            let _ = std::io::Read::read(&mut stream, &mut buf);
        }
    });
    addr
}

#[test]
fn with_egress_default_deny_only_the_allow_list_and_protected_targets_are_reachable() {
    if !privileged(
        "with_egress_default_deny_only_the_allow_list_and_protected_targets_are_reachable",
    ) {
        return;
    }
    let allowed = accepting_listener();
    let denied = accepting_listener();
    let stack = Stack::start_with(Postgres::start().expect("postgres"), |config| {
        config.extra_pin_toml = format!(
            "egress_default = \"deny\"\negress_allow = [{{ cidr = \"127.0.0.1/32\", ports = \"{}\", protocol = \"tcp\" }}, {{ cidr = \"224.0.0.0/4\", ports = \"{}\", protocol = \"tcp\" }}]",
            allowed.port(),
            denied.port()
        );
    })
    .expect("start");
    let mut stack = stack;
    let port = stack.postgres.port.to_string();

    let answer = as_agent(&stack, &["tcp", "127.0.0.1", &allowed.port().to_string()]);
    assert_eq!(answer["outcome"], "other", "allowed: {answer}");
    let answer = as_agent(&stack, &["tcp", "127.0.0.1", &denied.port().to_string()]);
    assert_eq!(answer["outcome"], "denied", "not on the list: {answer}");
    // A socket bound to a multicast address that connects to 0.0.0.0
    // reaches 127.0.0.1: the rule for the multicast range does not let it.
    let answer = as_agent(
        &stack,
        &[
            "tcp",
            "0.0.0.0",
            &denied.port().to_string(),
            "--source",
            "224.0.0.1",
        ],
    );
    assert_eq!(answer["outcome"], "denied", "bound to 224.0.0.1: {answer}");
    let answer = as_agent(&stack, &["udp", "127.0.0.1", &allowed.port().to_string()]);
    assert_eq!(
        answer["outcome"], "denied",
        "the rule is TCP only: {answer}"
    );
    let answer = as_agent(&stack, &["udp", "::1", &free_port().to_string()]);
    assert_eq!(answer["outcome"], "denied", "IPv6 too: {answer}");
    // Protected targets are still redirected, whatever the egress default.
    let answer = as_agent(&stack, &["tcp", "127.0.0.1", &port]);
    assert_eq!(answer["outcome"], "tollgate", "{answer}");
    stack.gateway.stop();

    let audit = stack.gateway.audit_dir();
    let refused = evidence::rows_of_kind(audit, "refused_egress", "");
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert_eq!(refused[0]["dst_endpoint_port"], denied.port());
    // The place the kernel would have sent it, not the address bound.
    assert_eq!(refused[1]["dst_endpoint_port"], denied.port());
    assert!(
        refused[1]["dst_endpoint_ip"]
            .as_str()
            .is_some_and(|ip| ip.ends_with("127.0.0.1")),
        "{}",
        refused[1]
    );
    let config = evidence::rows(audit, "SELECT unmapped FROM audit WHERE phase = 'config'");
    let snapshot: Value =
        serde_json::from_str(config[0]["unmapped"].as_str().unwrap_or("{}")).expect("json");
    assert_eq!(snapshot["egress_default_deny"], true);
}

/// A datagram that names its own route (an IPv4 loose source route option,
/// set on the socket or passed with the one datagram, or an IPv6 segment
/// routing header) goes to the route's first hop, while the sendmsg hook
/// judged the destination the agent named: under egress deny, a way to a
/// host the allow list denies, open to any process without a capability.
/// Such packets are dropped at the agent cgroup's egress, the sender gets
/// EPERM, and each drop is on record with the first hop; the same
/// datagram without a route still goes.
#[test]
fn source_routed_datagrams_from_an_agent_cgroup_are_dropped_and_on_record() {
    if !privileged("source_routed_datagrams_from_an_agent_cgroup_are_dropped_and_on_record") {
        return;
    }
    let allowed = free_port();
    let stack = Stack::start_with(Postgres::start().expect("postgres"), |config| {
        config.extra_pin_toml = format!(
            "egress_default = \"deny\"\negress_allow = [{{ cidr = \"127.0.0.1/32\", ports = \"{allowed}\", protocol = \"udp\" }}, {{ cidr = \"::1/128\", ports = \"{allowed}\", protocol = \"udp\" }}]"
        );
    })
    .expect("start");
    let mut stack = stack;
    let port = allowed.to_string();

    let answer = as_agent(&stack, &["udp", "127.0.0.1", &port]);
    assert_eq!(answer["outcome"], "sent", "no route named: {answer}");
    // An option that routes nothing goes as the datagram would.
    let answer = as_agent(&stack, &["udp", "127.0.0.1", &port, "--timestamp-option"]);
    assert_eq!(answer["outcome"], "sent", "a timestamp option: {answer}");
    // 127.0.0.2 is on no allow rule: it is where the packets would go.
    let routed: [&[&str]; 4] = [&[], &["--strict"], &["--per-message"], &["--connect"]];
    for extra in routed {
        let mut args = vec!["udp", "127.0.0.1", port.as_str(), "--via", "127.0.0.2"];
        args.extend_from_slice(extra);
        let answer = as_agent(&stack, &args);
        assert_eq!(answer["outcome"], "denied", "{args:?}: {answer}");
        assert_eq!(answer["errno"], libc::EPERM, "{args:?}: {answer}");
    }
    let ipv6 = ipv6_available();
    if ipv6 {
        let answer = as_agent(&stack, &["udp", "::1", &port]);
        assert_eq!(answer["outcome"], "sent", "IPv6, no route named: {answer}");
        // Only ::1 is sure to be routable here: the first hop is the
        // allowed host itself, and the packet is dropped all the same.
        let answer = as_agent(&stack, &["udp", "::1", &port, "--via", "::1"]);
        assert_eq!(answer["outcome"], "denied", "IPv6 routing header: {answer}");
        assert_eq!(answer["errno"], libc::EPERM, "{answer}");
    }
    stack.gateway.stop();

    let refused = evidence::rows_of_kind(stack.gateway.audit_dir(), "refused_source_route", "");
    assert_eq!(refused.len(), 4 + usize::from(ipv6), "{refused:?}");
    if ipv6 {
        assert_eq!(refused[4]["dst_endpoint_ip"], "::1", "{}", refused[4]);
        assert_eq!(refused[4]["dst_endpoint_port"], allowed, "{}", refused[4]);
        assert_eq!(refused[4]["family"], "inet6", "{}", refused[4]);
    }
    for row in &refused[..4] {
        assert!(
            row["dst_endpoint_ip"]
                .as_str()
                .is_some_and(|ip| ip.ends_with("127.0.0.2")),
            "the first hop: {row}"
        );
        assert_eq!(row["dst_endpoint_port"], allowed, "{row}");
        assert_eq!(
            row["actor_process_cgroup_id"],
            agent_cgroup_id(&stack),
            "{row}"
        );
        assert_eq!(row["action_id"], 2, "denied: {row}");
    }
    verify_passes(&stack);
}

/// The stack's agent cgroup inside its agent cgroup.
fn nested_cgroup(stack: &Stack) -> PathBuf {
    stack
        .gateway
        .config
        .nested_agent_cgroup
        .clone()
        .expect("nested cgroup")
}

/// An agent cgroup inside another runs both cgroups' programs on each
/// connect: the inner one redirects, and the outer one must let the
/// connection go on to the listener, not refuse it as egress.
#[test]
fn with_egress_default_deny_a_nested_agent_cgroup_still_reaches_tollgate() {
    if !privileged("with_egress_default_deny_a_nested_agent_cgroup_still_reaches_tollgate") {
        return;
    }
    let stack = Stack::start_with(Postgres::start().expect("postgres"), |config| {
        config.extra_pin_toml = "egress_default = \"deny\"".into();
        config.nested_agent_cgroup = Some(config.agent_cgroup.join("inner"));
    })
    .expect("start");
    let nested = nested_cgroup(&stack);
    let port = stack.postgres.port.to_string();
    let out = AgentCgroup::command(&nested, &duckdb::python())
        .arg(script())
        .args(["tcp", "127.0.0.1", &port])
        .output()
        .expect("run escape.py");
    let answer = parse(out);
    assert_eq!(answer["outcome"], "tollgate", "{answer}");
    // And a real client, end to end.
    let token = stack.idp.token(AGENT_OID, &[]).expect("token");
    let out = psql_in(&nested, "127.0.0.1", &port, &token, "SELECT 41 + 1");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_stopped_gateway_refuses_agents_and_a_restarted_one_adopts_the_pins_with_no_direct_connection_between(
) {
    if !privileged("a_stopped_gateway_refuses_agents_and_a_restarted_one_adopts_the_pins_with_no_direct_connection_between") {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let token = stack.idp.token(AGENT_OID, &[]).expect("token");
    let port = stack.postgres.port.to_string();
    let query = |stack: &Stack| {
        let out = stack
            .agent_psql(&token, "SELECT 41 + 1")
            .output()
            .expect("psql");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(query(&stack), "42");

    stack.gateway.stop();
    let stopped_at = now_ms();
    let before = stack.postgres.connections_received();
    for _ in 0..3 {
        let answer = as_agent(&stack, &["tcp", "127.0.0.1", &port]);
        assert_eq!(answer["outcome"], "refused", "fail closed: {answer}");
    }
    assert_eq!(stack.postgres.connections_received(), before);
    let restarted_at = now_ms();

    stack.gateway.restart().expect("restart tollgate");
    assert_eq!(query(&stack), "42");
    stack.gateway.stop();

    // The pinned probe kept recording while the daemon was down; the new
    // daemon read it from the pinned ring buffer.
    let audit = stack.gateway.audit_dir();
    let cgroup = agent_cgroup_id(&stack);
    // The attempts are the python ones; psql made the sessions before and after.
    let between = format!(
        "actor_process_cgroup_id = {cgroup} AND actor_process_name LIKE 'python%' \
         AND time BETWEEN {} AND {}",
        stopped_at - 1000,
        restarted_at + 1000
    );
    let attempts = evidence::rows_of_kind(audit, "tcp_connect", &between);
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    for attempt in &attempts {
        assert_eq!(
            attempt["dst_endpoint_port"],
            stack.gateway.config.listen.port(),
            "went to the (closed) listener, not to PostgreSQL: {attempt}"
        );
    }
    // Their redirects went to another pinned ring buffer, the agents'
    // one, which the new daemon adopted and read too.
    assert!(stack
        .gateway
        .config
        .bpffs_dir
        .join("maps/EVIDENCE_AGENTS")
        .exists());
    let redirects = evidence::rows_of_kind(audit, "redirected", &between);
    assert_eq!(redirects.len(), 3, "{redirects:?}");
    for attempt in &attempts {
        assert!(
            redirects
                .iter()
                .any(|r| r["upstream_socket_cookie"] == attempt["upstream_socket_cookie"]),
            "no redirected row for {attempt}: {redirects:?}"
        );
    }
    let run = verify_passes(&stack);
    assert_eq!(run.report["bypasses"], json!([]));
    assert_eq!(run.report["reserved_losses"], json!([]));
    assert!(
        run.report["redirected"].as_u64().unwrap_or(0) >= 5,
        "{}",
        run.summary
    );
    assert_eq!(run.report["audited_upstreams"], 2, "{}", run.summary);
}

/// escape.py's `listen` run as an agent, then outside every agent cgroup.
fn listen_as_agent_and_outside(stack: &Stack, host: &str, port: u16) -> (Value, Value) {
    let port = port.to_string();
    let args = ["listen", host, &port];
    (as_agent(stack, &args), outside(&args))
}

fn ipv6_available() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

/// While tollgate is down the pinned redirect still sends agents to its
/// listener's port: an agent that bound it would receive their
/// connections, tokens included, and the restarted tollgate could not
/// listen. The pinned bind programs refuse it on every address.
#[test]
fn an_agent_cannot_take_the_listener_port_and_the_restarted_gateway_listens_again() {
    if !privileged("an_agent_cannot_take_the_listener_port_and_the_restarted_gateway_listens_again")
    {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let listener = stack.gateway.config.listen.port();
    // While tollgate holds the port the kernel would say EADDRINUSE;
    // EPERM is the bind program's.
    let answer = as_agent(&stack, &["listen", "127.0.0.1", &listener.to_string()]);
    assert_eq!(answer["outcome"], "denied", "{answer}");
    assert_eq!(answer["errno"], libc::EPERM, "{answer}");
    // Nor the port of the protected target on this host, where tollgate
    // sends its own login (the server holds it now: EADDRINUSE otherwise).
    let target = stack.postgres.port.to_string();
    let answer = as_agent(&stack, &["listen", "0.0.0.0", &target]);
    assert_eq!(answer["outcome"], "denied", "{answer}");
    assert_eq!(answer["errno"], libc::EPERM, "{answer}");

    stack.gateway.stop();
    let mut hosts = vec!["127.0.0.1", "0.0.0.0", "127.0.0.2"];
    if ipv6_available() {
        hosts.extend(["::", "::1", "::ffff:127.0.0.1"]);
    } else {
        skip_part(
            "an_agent_cannot_take_the_listener_port_and_the_restarted_gateway_listens_again",
            "no IPv6 on this host: the [::] binds are not tried",
        );
    }
    for host in &hosts {
        let (agent, control) = listen_as_agent_and_outside(&stack, host, listener);
        assert_eq!(agent["outcome"], "denied", "{host}: {agent}");
        assert_eq!(agent["errno"], libc::EPERM, "{host}: {agent}");
        // The port is free: outside the agent cgroups the same bind works.
        assert_eq!(control["outcome"], "bound", "{host} outside: {control}");
    }
    // Other ports stay the agent's to use.
    let other = free_port();
    for host in ["127.0.0.1", "0.0.0.0"] {
        let (agent, _) = listen_as_agent_and_outside(&stack, host, other);
        assert_eq!(agent["outcome"], "bound", "{host}:{other}: {agent}");
    }

    stack
        .gateway
        .restart()
        .expect("restart tollgate on its listener port");
    agent_query_is_answered(&stack);
}

/// A protected target at one of this host's own addresses that is not
/// loopback (a LAN or bridge address) while its server is down: an agent
/// binding `0.0.0.0:PORT` would be where tollgate connects next, and be
/// handed tollgate's own login. Its port is refused to agents on every
/// address.
#[test]
fn an_agent_cannot_take_the_port_of_a_target_at_this_hosts_own_address() {
    if !privileged("an_agent_cannot_take_the_port_of_a_target_at_this_hosts_own_address") {
        return;
    }
    let (address, _) = global_ipv4_and_device();
    // Nothing listens there: the server is down.
    let port = free_port();
    let target = SocketAddr::from((address, port));
    let stack = Stack::start_with(Postgres::start().expect("postgres"), |config| {
        config.target_address = target
    })
    .expect("start tollgate protecting this host's own address");
    let own = address.to_string();
    let mut hosts = vec!["0.0.0.0", own.as_str(), "127.0.0.1"];
    if ipv6_available() {
        hosts.push("::");
    } else {
        skip_part(
            "an_agent_cannot_take_the_port_of_a_target_at_this_hosts_own_address",
            "no IPv6 on this host: the [::] bind is not tried",
        );
    }
    for host in &hosts {
        let (agent, control) = listen_as_agent_and_outside(&stack, host, port);
        assert_eq!(agent["outcome"], "denied", "{host}:{port}: {agent}");
        assert_eq!(agent["errno"], libc::EPERM, "{host}:{port}: {agent}");
        assert_eq!(control["outcome"], "bound", "{host} outside: {control}");
    }
    let other = free_port();
    let (agent, _) = listen_as_agent_and_outside(&stack, "0.0.0.0", other);
    assert_eq!(agent["outcome"], "bound", "0.0.0.0:{other}: {agent}");
}

/// The development IdP serves its keys over plain http on loopback: an
/// agent that took its port while it was down would answer tollgate's next
/// key fetch with keys of its own, and mint tokens for anyone. The key
/// source's port on this host is kept from agents as the listeners' is
/// (the IdP holds it now: EADDRINUSE otherwise, EPERM is the bind
/// program's).
#[test]
fn an_agent_cannot_take_the_port_of_the_identity_provider_on_this_host() {
    if !privileged("an_agent_cannot_take_the_port_of_the_identity_provider_on_this_host") {
        return;
    }
    let stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let port = stack.idp.listen.port().to_string();
    for host in ["127.0.0.1", "0.0.0.0"] {
        let answer = as_agent(&stack, &["listen", host, &port]);
        assert_eq!(answer["outcome"], "denied", "{host}:{port}: {answer}");
        assert_eq!(answer["errno"], libc::EPERM, "{host}:{port}: {answer}");
    }
}

/// An agent's `SELECT 41 + 1` through tollgate is answered: redirected,
/// logged in with a token, relayed.
fn agent_query_is_answered(stack: &Stack) {
    let token = stack.idp.token(AGENT_OID, &[]).expect("token");
    let out = stack
        .agent_psql(&token, "SELECT 41 + 1")
        .output()
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tollgate pin status --config FILE` (with `--json`), as run.
fn pin_status(config: &Path, json: bool) -> std::process::Output {
    let mut cmd = Command::new(tollgate_bin());
    cmd.args(["pin", "status", "--config"]).arg(config);
    if json {
        cmd.arg("--json");
    }
    cmd.output().expect("tollgate pin status")
}

/// The programs pinned for the stack's agent cgroup, from `tollgate pin
/// status`: none when it fails saying nothing is pinned there.
fn pinned_on_agent_cgroup(stack: &Stack) -> Vec<String> {
    let out = pin_status(&stack.gateway.config_path, true);
    let cgroup = stack.gateway.config.agent_cgroup.display().to_string();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{cgroup}: nothing pinned")),
            "{stderr}"
        );
        return Vec::new();
    }
    let programs: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    programs
        .iter()
        .filter(|p| p["cgroup_path"] == cgroup.as_str())
        .filter_map(|p| p["program"].as_str().map(str::to_owned))
        .collect()
}

/// Whoever may write the directory holding a link's pin may unlink it,
/// which detaches the program. A pin directory an agent made first (bpffs
/// lets anyone make one), open to all, is taken over: afterwards the
/// agent's user cannot remove a pin. A parent directory others may write
/// stops the start instead.
#[test]
fn a_pin_directory_an_agent_made_first_is_taken_over() {
    use std::os::unix::fs::MetadataExt;
    if !privileged("a_pin_directory_an_agent_made_first_is_taken_over") {
        return;
    }
    let nobody = |args: &[&str]| {
        Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .args(args)
            .output()
            .expect("runuser")
    };
    let unique = format!("tollgate-taken-{}", std::process::id());
    let made_first = std::path::PathBuf::from("/sys/fs/bpf").join(&unique);
    // As an agent makes them where bpffs is mounted 1777 (the kernel's
    // default): its user's, open to all. Made here as root and handed
    // over, so the test does not depend on how this host mounted bpffs.
    let make_as_nobody = |dirs: &[std::path::PathBuf]| {
        for dir in dirs {
            std::fs::create_dir(dir).expect("mkdir");
            std::os::unix::fs::chown(dir, Some(65534), Some(65534)).expect("chown");
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .expect("chmod");
        }
    };
    make_as_nobody(&[
        made_first.clone(),
        made_first.join("links"),
        made_first.join("maps"),
    ]);
    let dir = made_first.clone();
    let stack = Stack::start_with(Postgres::start().expect("postgres"), |config| {
        config.bpffs_dir = dir.clone()
    })
    .expect("start tollgate on a pin directory an agent made");
    for sub in ["", "links", "maps"] {
        let meta = std::fs::metadata(made_first.join(sub)).expect("stat");
        assert_eq!(meta.uid(), 0, "{sub}");
        assert_eq!(meta.mode() & 0o7777, 0o700, "{sub}");
    }
    let link = made_first
        .join("links")
        .join(format!("tollgate_connect4-{}", agent_cgroup_id(&stack)));
    assert!(link.exists(), "{}", link.display());
    let removed = nobody(&["rm", "-f", &link.display().to_string()]);
    assert!(!removed.status.success(), "the agent's user removed a pin");
    assert!(link.exists());
    assert!(
        stack.gateway.log().contains("taken over"),
        "{}",
        stack.gateway.log()
    );
    drop(stack);
    let _ = std::fs::remove_dir_all(&made_first);

    // One that holds something of its maker's is not taken over.
    make_as_nobody(&[made_first.clone(), made_first.join("junk")]);
    let dir = made_first.clone();
    let started = Stack::start_with(Postgres::start().expect("postgres"), |config| {
        config.bpffs_dir = dir.clone()
    });
    let _ = std::fs::remove_dir_all(&made_first);
    let err = format!("{:#}", started.err().expect("refused"));
    assert!(err.contains("is taken over only empty"), "{err}");

    // A parent others may write (not sticky): refused at start.
    let open_parent = std::path::PathBuf::from("/sys/fs/bpf").join(format!("{unique}-parent"));
    std::fs::create_dir(&open_parent).expect("mkdir");
    std::fs::set_permissions(
        &open_parent,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let below = open_parent.join("pins");
    let started = Stack::start_with(Postgres::start().expect("postgres"), |config| {
        config.bpffs_dir = below.clone()
    });
    let _ = std::fs::remove_dir_all(&open_parent);
    let err = format!("{:#}", started.err().expect("refused"));
    assert!(
        err.contains("whoever may write it may remove the pins"),
        "{err}"
    );
}

/// An agent cgroup under a delegated subtree (a `cgroup.procs` its user
/// may write, as under `user@UID.service`) lets the agent move itself out
/// of it: tollgate does not start on one, and says why.
#[test]
fn an_agent_cgroup_its_user_could_leave_is_refused_at_start() {
    if !privileged("an_agent_cgroup_its_user_could_leave_is_refused_at_start") {
        return;
    }
    let delegated = AgentCgroup::root().join(format!("tollgate-delegated-{}", std::process::id()));
    std::fs::create_dir(&delegated).expect("mkdir cgroup");
    let nobody = 65534;
    std::os::unix::fs::chown(delegated.join("cgroup.procs"), Some(nobody), Some(nobody))
        .expect("delegate cgroup.procs");
    let agents = delegated.join("agents");
    let started = Stack::start_with(Postgres::start().expect("postgres"), |config| {
        config.agent_cgroup = agents.clone()
    });
    let _ = std::fs::remove_dir(&agents);
    let _ = std::fs::remove_dir(&delegated);
    let err = format!("{:#}", started.err().expect("refused"));
    assert!(
        err.contains("can move itself out of the agent cgroup")
            && err.contains(&delegated.join("cgroup.procs").display().to_string()),
        "{err}"
    );
}

/// A configuration for tollgate on `bpffs_dir` and `agent_cgroup`, written
/// to a file, for a daemon the test starts itself (nothing it reaches is
/// started: these daemons stop before they would).
fn config_file(bpffs_dir: &Path, agent_cgroup: &Path) -> (tempfile::TempDir, PathBuf) {
    let (dir, mut config) = tollgate_tests::Gateway::config_for(
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        "app",
        "secret",
        "http://127.0.0.1:9/jwks".into(),
    )
    .expect("config");
    config.bpffs_dir = bpffs_dir.to_path_buf();
    config.agent_cgroup = agent_cgroup.to_path_buf();
    let path = dir.path().join("tollgate.toml");
    config.write(&path).expect("write the config and its key");
    (dir, path)
}

/// `bpffs_dir` names a directory `run` takes over and `unpin` removes:
/// one that is not below a bpffs mount (a typo naming the audit store,
/// say) is touched by neither, and a bpffs directory holding something
/// tollgate did not put there keeps it.
#[test]
fn unpin_and_run_touch_nothing_outside_a_pin_directory_of_their_own() {
    if !privileged("unpin_and_run_touch_nothing_outside_a_pin_directory_of_their_own") {
        return;
    }
    let unique = format!("tollgate-pin-guard-{}", std::process::id());
    let scratch = tempfile::tempdir().expect("tempdir");
    let victim = scratch.path().join("audit");
    std::fs::create_dir(&victim).expect("mkdir");
    std::fs::write(victim.join("manifest.jsonl"), "kept\n").expect("write");
    std::fs::set_permissions(&victim, std::os::unix::fs::PermissionsExt::from_mode(0o750))
        .expect("chmod");
    let cgroup = AgentCgroup::root().join(&unique);
    let (_config_dir, config) = config_file(&victim, &cgroup);

    let unpin = Command::new(tollgate_bin())
        .args(["unpin", "--config"])
        .arg(&config)
        .output()
        .expect("run tollgate unpin");
    let stderr = String::from_utf8_lossy(&unpin.stderr);
    assert!(
        !unpin.status.success(),
        "unpin of a plain directory succeeded"
    );
    assert!(
        stderr.contains("is not inside a bpf file system"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(victim.join("manifest.jsonl")).expect("the file is still there"),
        "kept\n"
    );

    let run = Command::new(tollgate_bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run tollgate run");
    let _ = std::fs::remove_dir(&cgroup);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "run on a plain directory started");
    assert!(
        stderr.contains("is not inside a bpf file system"),
        "{stderr}"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&victim).expect("stat").permissions(),
    );
    assert_eq!(mode & 0o7777, 0o750, "the directory was taken over");
    assert!(!victim.join("links").exists() && !victim.join("maps").exists());

    // Another tool's directory on bpffs: tollgate's two directories go,
    // what else it holds stays, and unpin says so.
    let theirs = PathBuf::from("/sys/fs/bpf").join(&unique);
    for sub in ["", "links", "maps", "their-pins"] {
        std::fs::create_dir_all(theirs.join(sub)).expect("mkdir on bpffs");
    }
    let (_config_dir, config) = config_file(&theirs, &cgroup);
    let unpin = Command::new(tollgate_bin())
        .args(["unpin", "--config"])
        .arg(&config)
        .output()
        .expect("run tollgate unpin");
    let left = theirs.join("their-pins").is_dir();
    let _ = std::fs::remove_dir_all(&theirs);
    let stderr = String::from_utf8_lossy(&unpin.stderr);
    assert!(!unpin.status.success(), "{stderr}");
    assert!(stderr.contains("holds something else"), "{stderr}");
    assert!(left, "unpin removed what another tool pinned");
}

/// The daemon in one of its own agent cgroups would send its upstream
/// connections to its own listeners: it does not start there, and says
/// why, before anything is pinned.
#[test]
fn a_daemon_inside_an_agent_cgroup_is_refused_at_start() {
    if !privileged("a_daemon_inside_an_agent_cgroup_is_refused_at_start") {
        return;
    }
    let unique = format!("tollgate-self-{}", std::process::id());
    let agents = AgentCgroup::root().join(&unique);
    std::fs::create_dir(&agents).expect("mkdir cgroup");
    let pins = PathBuf::from("/sys/fs/bpf").join(&unique);
    let (_config_dir, config) = config_file(&pins, &agents);
    let mut child = AgentCgroup::command(&agents, &tollgate_bin().display().to_string())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tollgate in the agent cgroup");
    // A daemon that started would run on: it is stopped, and the test
    // fails, rather than wait for it.
    let exited = wait_for("tollgate to stop", Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    })
    .is_ok();
    if !exited {
        let _ = child.kill();
    }
    let run = child.wait_with_output().expect("tollgate's output");
    let links: Vec<_> = std::fs::read_dir(pins.join("links"))
        .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let _ = Command::new(tollgate_bin())
        .args(["unpin", "--config"])
        .arg(&config)
        .output();
    let _ = std::fs::remove_dir_all(&pins);
    let _ = std::fs::remove_dir(&agents);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        exited && !run.status.success(),
        "tollgate started in its agent cgroup"
    );
    assert!(
        stderr.contains("tollgate itself runs in cgroup")
            && stderr.contains(&agents.display().to_string()),
        "{stderr}"
    );
    assert!(links.is_empty(), "pinned before refusing: {links:?}");
}

/// After a reboot nothing is pinned. If another process holds a
/// listener's port when tollgate starts, tollgate must not redirect
/// agents there: it binds its listeners before it installs the redirect,
/// and stops.
#[test]
fn a_gateway_that_cannot_listen_redirects_nobody_to_whoever_holds_the_port() {
    if !privileged("a_gateway_that_cannot_listen_redirects_nobody_to_whoever_holds_the_port") {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    stack.gateway.stop();
    stack.gateway.unpin().expect("unpin, as after a reboot");
    let squatter = TcpListener::bind(stack.gateway.config.listen).expect("take the listener port");
    squatter.set_nonblocking(true).expect("nonblocking");

    let started = stack.gateway.restart();
    assert!(
        started.is_err(),
        "tollgate started without its listener port"
    );
    assert!(
        stack.gateway.log().contains("listen on"),
        "{}",
        stack.gateway.log()
    );
    assert_eq!(pinned_on_agent_cgroup(&stack), Vec::<String>::new());
    let port = stack.postgres.port.to_string();
    // Nothing is pinned: the connection goes where it was sent.
    let answer = as_agent(&stack, &["tcp", "127.0.0.1", &port]);
    assert_eq!(answer["outcome"], "postgres", "{answer}");
    assert!(
        matches!(squatter.accept(), Err(err) if err.kind() == std::io::ErrorKind::WouldBlock),
        "an agent's connection reached the process holding the listener port"
    );

    drop(squatter);
    stack
        .gateway
        .restart()
        .expect("tollgate once the port is free");
    assert!(pinned_on_agent_cgroup(&stack).contains(&"tollgate_bind4".to_owned()));
}

/// A JWKS endpoint that accepts connections and never answers, so
/// tollgate's key fetch waits on it until its own timeout. Counts the
/// connections it accepted and those their client has since given up.
struct SilentServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    given_up: Arc<AtomicUsize>,
}

impl SilentServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let given_up = Arc::new(AtomicUsize::new(0));
        let (counter, ended) = (accepted.clone(), given_up.clone());
        thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                counter.fetch_add(1, Ordering::SeqCst);
                let ended = ended.clone();
                thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    // Reads the request and never answers; EOF or an error
                    // means the client stopped waiting.
                    while matches!(std::io::Read::read(&mut stream, &mut buf), Ok(n) if n > 0) {}
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        SilentServer {
            addr,
            accepted,
            given_up,
        }
    }

    /// Whether a client is connected and still waiting for an answer.
    fn someone_waits(&self) -> bool {
        self.accepted.load(Ordering::SeqCst) > self.given_up.load(Ordering::SeqCst)
    }
}

/// A daemon a test started by hand: resumed (should the test have stopped
/// it), killed and reaped when the test ends, however it ends.
struct Spawned(std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Spawned {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

/// Starts `tollgate run` on `config` (written under the gateway's
/// directory as `name`), with `env`, logging to `name`.log.
fn spawn_gateway(stack: &Stack, name: &str, env: &[(&str, &Path)]) -> Spawned {
    let dir = stack.gateway.dir.path();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, stack.gateway.config.toml()).expect("write the configuration");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    let mut cmd = Command::new(tollgate_bin());
    cmd.args(["run", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(dir.join(format!("{name}.ready")))
        .stdout(Stdio::null())
        .stderr(log);
    for (key, value) in env {
        cmd.env(key, value);
    }
    Spawned(cmd.spawn().expect("start tollgate run"))
}

/// The redirect is installed before tollgate waits on the network: while
/// the identity provider does not answer, agents already cannot reach the
/// protected server directly (a first start after a reboot, where nothing
/// was pinned before).
#[test]
fn the_redirect_is_in_place_while_the_gateway_still_waits_for_the_identity_provider() {
    if !privileged(
        "the_redirect_is_in_place_while_the_gateway_still_waits_for_the_identity_provider",
    ) {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    stack.gateway.stop();
    stack.gateway.unpin().expect("unpin, as after a reboot");
    let idp = SilentServer::start();
    stack.gateway.config.jwks_uri = format!("http://{}/jwks", idp.addr);
    let mut child = spawn_gateway(&stack, "slow-idp", &[]);

    let fetching = wait_for(
        "tollgate to wait on the identity provider",
        Duration::from_secs(20),
        || idp.someone_waits(),
    );
    let pinned = pinned_on_agent_cgroup(&stack);
    let before = stack.postgres.connections_received();
    let port = stack.postgres.port.to_string();
    let answer = as_agent(&stack, &["tcp", "127.0.0.1", &port, "--wait", "1"]);
    // Still inside the key fetch when the agent tried: the check above
    // was not made after it had ended.
    let still_fetching = idp.someone_waits();
    let _ = child.kill();
    let _ = child.wait();
    let log =
        std::fs::read_to_string(stack.gateway.dir.path().join("slow-idp.log")).unwrap_or_default();
    fetching.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert!(still_fetching, "the key fetch ended too early:\n{log}");
    assert!(
        pinned.iter().any(|p| p == "tollgate_connect4"),
        "no redirect while the key fetch waits: {pinned:?}\n{log}"
    );
    // The connection went to tollgate's listener, bound and not yet
    // serving, and not to PostgreSQL.
    assert_eq!(answer["outcome"], "no-answer", "{answer}");
    assert_eq!(stack.postgres.connections_received(), before);
}

/// Under systemd (`Type=notify`), tollgate says it is ready only once the
/// redirect is in place and its listeners serve: units ordered after it
/// (the agents) start then and not before.
#[test]
fn tollgate_tells_systemd_it_is_ready_once_the_redirect_is_in_place_and_it_serves() {
    if !privileged("tollgate_tells_systemd_it_is_ready_once_the_redirect_is_in_place_and_it_serves")
    {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    stack.gateway.stop();
    stack.gateway.unpin().expect("unpin, as after a reboot");
    let socket_path = stack.gateway.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&socket_path).expect("the notification socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let started = Instant::now();
    let mut child = spawn_gateway(&stack, "notify", &[("NOTIFY_SOCKET", &socket_path)]);
    let mut buf = [0u8; 256];
    // A signal to the test process (another test's child ending) may cut
    // the wait short: wait again.
    let received = loop {
        match notify.recv(&mut buf) {
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    // Stopped as soon as it says it is ready, so that what is pinned below
    // is what was pinned when it said so, not what it pinned since.
    let stopped = received.is_ok().then(|| stop(child.id()));
    // What an agent started on that signal finds.
    let pinned = pinned_on_agent_cgroup(&stack);
    drop(stopped);
    let token = stack.idp.token(AGENT_OID, &[]).expect("token");
    let out = stack
        .agent_psql(&token, "SELECT 41 + 1")
        .output()
        .expect("psql");
    let _ = child.kill();
    let _ = child.wait();
    let n = received.unwrap_or_else(|err| {
        panic!(
            "no notification after {:?}: {err}\n{}",
            started.elapsed(),
            std::fs::read_to_string(stack.gateway.dir.path().join("notify.log"))
                .unwrap_or_default()
        )
    });
    assert_eq!(&buf[..n], b"READY=1");
    for program in [
        "tollgate_connect4",
        "tollgate_bind4",
        "tollgate_sock_create",
    ] {
        assert!(pinned.iter().any(|p| p == program), "{program}: {pinned:?}");
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pin_status_lists_each_program_per_cgroup_with_program_ids() {
    if !privileged("pin_status_lists_each_program_per_cgroup_with_program_ids") {
        return;
    }
    let stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let status = |json: bool| {
        let out = pin_status(&stack.gateway.config_path, json);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let programs: Vec<Value> = serde_json::from_slice(&status(true)).expect("json");
    let cgroup = stack.gateway.config.agent_cgroup.display().to_string();
    let mut on_cgroup: Vec<&str> = programs
        .iter()
        .filter(|p| p["cgroup_path"] == cgroup.as_str())
        .map(|p| p["program"].as_str().unwrap_or(""))
        .collect();
    on_cgroup.sort_unstable();
    assert_eq!(
        on_cgroup,
        [
            "tollgate_bind4",
            "tollgate_bind6",
            "tollgate_connect4",
            "tollgate_connect6",
            "tollgate_getpeername4",
            "tollgate_getpeername6",
            "tollgate_sendmsg4",
            "tollgate_sendmsg6",
            "tollgate_sock_create",
            "tollgate_sock_ops",
            "tollgate_source_route",
        ],
        "{programs:?}"
    );
    let host: Vec<&Value> = programs
        .iter()
        .filter(|p| p["attached_to"] == "host")
        .collect();
    assert_eq!(host.len(), 1, "{programs:?}");
    assert_eq!(host[0]["program"], "tollgate_tcp_state");
    // The packet evidence sits at the root of the cgroup v2 hierarchy.
    let root = AgentCgroup::root();
    let root_id = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&root)
            .map(|m| m.ino().to_string())
            .expect("cgroup root")
    };
    let at_root: Vec<&Value> = programs
        .iter()
        .filter(|p| p["attached_to"] == root_id.as_str())
        .collect();
    assert_eq!(at_root.len(), 1, "{programs:?}");
    assert_eq!(at_root[0]["program"], "tollgate_packet_egress");
    assert_eq!(
        at_root[0]["cgroup_path"],
        format!("{} (root, host-wide)", root.display()),
        "{programs:?}"
    );
    for p in &programs {
        assert!(p["program_id"].as_u64().unwrap_or(0) > 0, "{p}");
        assert!(p["link_id"].as_u64().unwrap_or(0) > 0, "{p}");
    }
    let table = String::from_utf8_lossy(&status(false)).into_owned();
    assert!(table.contains(&cgroup), "{table}");
    assert!(table.contains("host (all sockets)"), "{table}");
    assert!(table.contains("tollgate_packet_egress"), "{table}");
}

/// A cgroup left with some of its programs pinned and not others (an
/// install that failed part-way) is not protected: without connect6 an
/// agent reaches the target at `::ffff:127.0.0.1` on an IPv6 socket.
/// `pin status` fails and names what is missing, so a launcher that waits
/// for it to succeed starts no agent there; a restarted tollgate pins the
/// whole set again.
#[test]
fn pin_status_fails_while_an_agent_cgroup_lacks_any_of_its_programs() {
    if !privileged("pin_status_fails_while_an_agent_cgroup_lacks_any_of_its_programs") {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let config_path = stack.gateway.config_path.clone();
    let status = |json: bool| pin_status(&config_path, json);
    let first = status(false);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    stack.gateway.stop();
    let connect6 = stack
        .gateway
        .config
        .bpffs_dir
        .join("links")
        .join(format!("tollgate_connect6-{}", agent_cgroup_id(&stack)));
    std::fs::remove_file(&connect6).expect("unpin connect6");
    let cgroup = stack.gateway.config.agent_cgroup.display().to_string();
    for json in [false, true] {
        let out = status(json);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "json {json}: {stderr}");
        assert!(
            stderr.contains(&format!("{cgroup}: INCOMPLETE, missing tollgate_connect6")),
            "json {json}: {stderr}"
        );
    }
    stack.gateway.restart().expect("restart tollgate");
    let out = status(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pinned_on_agent_cgroup(&stack).contains(&"tollgate_connect6".to_owned()));

    // Without the host-wide probe a connection around tollgate goes
    // unrecorded: status fails too, and names it.
    stack.gateway.stop();
    let probe = stack
        .gateway
        .config
        .bpffs_dir
        .join("links")
        .join("tollgate_tcp_state-host");
    std::fs::remove_file(&probe).expect("unpin the host-wide probe");
    let out = status(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("host-wide evidence: INCOMPLETE, missing tollgate_tcp_state"),
        "{stderr}"
    );
}

/// `pin status` judges a pinned link by what the kernel says it is, not
/// by its file's name: a second pin of the outer agent cgroup's connect6
/// link, named for the nested cgroup whose own connect6 was unpinned,
/// leaves the nested cgroup without connect6, and status says so.
#[test]
fn a_pin_named_for_another_cgroup_does_not_count_for_it() {
    if !privileged("a_pin_named_for_another_cgroup_does_not_count_for_it") {
        return;
    }
    let mut stack = Stack::start_with(Postgres::start().expect("postgres"), |config| {
        config.nested_agent_cgroup = Some(config.agent_cgroup.join("inner"));
    })
    .expect("start");
    let config_path = stack.gateway.config_path.clone();
    assert!(pin_status(&config_path, false).status.success());
    stack.gateway.stop();
    let nested = nested_cgroup(&stack);
    let nested_id = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&nested).expect("nested cgroup").ino()
    };
    let links = stack.gateway.config.bpffs_dir.join("links");
    let nested_pin = links.join(format!("tollgate_connect6-{nested_id}"));
    let outer_pin = links.join(format!("tollgate_connect6-{}", agent_cgroup_id(&stack)));
    std::fs::remove_file(&nested_pin).expect("unpin the nested cgroup's connect6");
    let pinned = Command::new("bpftool")
        .args(["link", "pin", "pinned"])
        .arg(&outer_pin)
        .arg(&nested_pin)
        .output()
        .expect("run bpftool (`cargo xtask setup` installs it)");
    assert!(
        pinned.status.success(),
        "{}",
        String::from_utf8_lossy(&pinned.stderr)
    );
    let out = pin_status(&config_path, true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: INCOMPLETE, missing tollgate_connect6",
            nested.display()
        )),
        "{stderr}"
    );
    // The outer cgroup has its connect6: it is not named.
    assert!(
        !stderr.contains(&format!(
            "{}: INCOMPLETE",
            stack.gateway.config.agent_cgroup.display()
        )),
        "{stderr}"
    );
}

/// Compiles tests/c/uring_connect.c (raw io_uring system calls, no
/// liburing) into `dir`.
fn uring_connect_binary(dir: &Path) -> String {
    tollgate_tests::compile_c_program("uring_connect", 1, dir)
}

#[test]
fn a_connect_through_io_uring_from_an_agent_cgroup_is_redirected_and_on_record() {
    if !privileged("a_connect_through_io_uring_from_an_agent_cgroup_is_redirected_and_on_record") {
        return;
    }
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_owned())
        // Kernels before 6.6 have no switch: io_uring is on.
        .unwrap_or_else(|_| "0".into());
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let binary = uring_connect_binary(stack.gateway.dir.path());
    let port = stack.postgres.port.to_string();
    let before = stack.postgres.connections_received();
    let run = |args: &[&str]| {
        let out = AgentCgroup::command(&stack.gateway.config.agent_cgroup, &binary)
            .args(args)
            .output()
            .expect("run uring_connect");
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or_else(|_| {
            json!({"outcome": "program-failed", "stderr": String::from_utf8_lossy(&out.stderr)})
        })
    };
    let inline = run(&["127.0.0.1", &port]);
    if inline["outcome"] == "uring-unavailable" {
        // The kernel forbids io_uring here, so there is no io_uring
        // connect to redirect: a skip (a failure where skips are
        // forbidden). Anything else that stops io_uring_setup is a failure.
        assert_ne!(
            disabled, "0",
            "io_uring_setup failed although io_uring_disabled is 0: {inline}"
        );
        assert_eq!(stack.postgres.connections_received(), before);
        skip_part(
            "a_connect_through_io_uring_from_an_agent_cgroup_is_redirected_and_on_record",
            &format!(
                "/proc/sys/kernel/io_uring_disabled is {disabled}, io_uring_setup failed with errno {}",
                inline["errno"]
            ),
        );
        return;
    }
    // Inline in io_uring_enter, and on an io-wq worker thread (IOSQE_ASYNC).
    let queued = run(&["127.0.0.1", &port, "--async"]);
    for (case, answer) in [("inline", &inline), ("io-wq worker", &queued)] {
        assert_eq!(answer["outcome"], "tollgate", "{case}: {answer}");
        // getpeername4 hides the redirect from io_uring users too.
        assert_eq!(
            answer["peer"],
            format!("127.0.0.1:{port}"),
            "{case}: {answer}"
        );
    }
    // Nothing reached PostgreSQL: tollgate opens no upstream before a token.
    assert_eq!(stack.postgres.connections_received(), before);
    stack.gateway.stop();

    let audit = stack.gateway.audit_dir();
    let cgroup = agent_cgroup_id(&stack);
    for answer in [&inline, &queued] {
        let cookie = answer["cookie"].as_u64().expect("the socket's cookie");
        let redirected = evidence::rows_of_kind(
            audit,
            "redirected",
            &format!("upstream_socket_cookie = {cookie}"),
        );
        assert_eq!(redirected.len(), 1, "{answer}: {redirected:?}");
        assert_eq!(redirected[0]["actor_process_cgroup_id"], cgroup);
        assert_eq!(redirected[0]["dst_endpoint_port"], stack.postgres.port);
        let connects = evidence::rows_of_kind(
            audit,
            "tcp_connect",
            &format!("upstream_socket_cookie = {cookie}"),
        );
        assert_eq!(connects.len(), 1, "{answer}: {connects:?}");
        assert_eq!(
            connects[0]["dst_endpoint_port"],
            stack.gateway.config.listen.port(),
            "the SYN went to the listener: {answer}"
        );
        assert_eq!(connects[0]["actor_process_cgroup_id"], cgroup);
    }
    let run = verify_passes(&stack);
    assert_eq!(run.report["redirected"], 2, "{}", run.summary);
    assert_eq!(run.report["bypasses"], json!([]), "{}", run.summary);
}

/// Stops process `pid` (SIGSTOP) until the guard it returns is dropped.
fn stop(pid: u32) -> Resume {
    // SAFETY: a signal to a process this test started.
    assert_eq!(
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) },
        0,
        "stop {pid}"
    );
    Resume(pid)
}

/// Sends SIGCONT to a stopped process when dropped, so that a failing
/// test does not leave tollgate stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: a signal to a process this test started.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// Two agent connections from the same local port, one from 127.0.0.1 and
/// one bound to 127.0.0.2 (an AF_INET socket, then an AF_INET6 one with
/// IPv4-mapped addresses), are each named by the task that made it: the
/// kernel keys a redirected socket by the agent's local address and port,
/// and tollgate looks it up by both. Keyed by the port alone, the second
/// connection, established while the first waited to be accepted, was
/// taken for the first (its process, its cgroup on the first's session).
#[test]
fn two_connections_from_one_local_port_are_each_attributed_to_the_task_that_made_it() {
    if !privileged(
        "two_connections_from_one_local_port_are_each_attributed_to_the_task_that_made_it",
    ) {
        return;
    }
    let stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    let token = stack.idp.token(AGENT_OID, &[]).expect("mint a token");
    let pid = stack.gateway.pid().expect("tollgate pid");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pg_same_port.py");
    for family in ["inet", "inet6"] {
        // Stopped, tollgate accepts nothing: both connections are
        // established (and keyed by the kernel) before either is looked
        // up.
        let resume = stop(pid);
        let mut client =
            AgentCgroup::command(&stack.gateway.config.agent_cgroup, &duckdb::python())
                .arg(&script)
                .args([
                    "127.0.0.1",
                    &stack.postgres.port.to_string(),
                    &token,
                    family,
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("run pg_same_port.py");
        let mut stdout = std::io::BufReader::new(client.stdout.take().expect("stdout"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).expect("the script's first line");
        assert_eq!(line.trim(), "connected", "{family}");
        drop(resume);
        std::io::Write::write_all(&mut client.stdin.take().expect("stdin"), b"go\n")
            .expect("tell the script to go on");
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).expect("the script's answers");
        assert!(client.wait().expect("python").success(), "{rest}");
        let answers: Value = serde_json::from_str(&rest).unwrap_or_else(|e| panic!("{e}: {rest}"));
        for (side, task) in [("first", "first-conn"), ("second", "second-conn")] {
            let word = format!("{side}-{family}");
            let rows: Vec<&Value> = answers[side]
                .as_array()
                .unwrap_or_else(|| panic!("{answers}"))
                .iter()
                .filter(|m| m["tag"] == "D")
                .collect();
            assert_eq!(rows.len(), 1, "{word}: {answers}");
            assert_eq!(rows[0]["values"], json!([word]), "{answers}");
            let sql = format!(
                "SELECT * FROM audit WHERE phase = 'request' AND query_info_query_string = 'SELECT ''{word}'''"
            );
            let rows = stack
                .audit_rows(&sql, 1, Duration::from_secs(30))
                .expect("audit rows");
            assert_eq!(rows.len(), 1, "{rows:?}");
            assert_eq!(rows[0]["actor_process_name"], task, "{word}: {}", rows[0]);
            assert_eq!(rows[0]["src_endpoint_port"], answers["port"], "{}", rows[0]);
        }
    }
}

/// A pin directory an older daemon left is taken over on restart: the
/// client port map it pinned (keyed by local and listener port without the
/// address, since replaced by
/// one keyed by the whole endpoint) is unpinned, and the reserved and
/// agents' evidence rings it did not have yet are made and pinned. Agents
/// are redirected and attributed, their redirects recorded in the new
/// ring, and verify passes.
#[test]
fn a_pin_directory_left_by_an_older_daemon_is_taken_over() {
    if !privileged("a_pin_directory_left_by_an_older_daemon_is_taken_over") {
        return;
    }
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    stack.gateway.stop();
    let maps = stack.gateway.config.bpffs_dir.join("maps");
    let old_client_ports = maps.join("CLIENT_PORTS");
    let reserved = maps.join("EVIDENCE_RESERVED");
    let agents_ring = maps.join("EVIDENCE_AGENTS");
    // As an older daemon left it: no reserved or agents' ring, a
    // port-keyed map.
    std::fs::remove_file(&reserved).expect("unpin the reserved ring");
    std::fs::remove_file(&agents_ring).expect("unpin the agents' ring");
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&old_client_ports)
        .args([
            "type",
            "hash",
            "key",
            "8",
            "value",
            "8",
            "entries",
            "64",
            "name",
            "CLIENT_PORTS",
        ])
        .output()
        .expect("run bpftool (`cargo xtask setup` installs it)");
    assert!(
        made.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    assert!(old_client_ports.exists() && !reserved.exists() && !agents_ring.exists());
    // And a map of guarded ports of an older size (1 024 entries, before
    // every target's port was guarded).
    let listener_ports = maps.join("LISTENER_PORTS");
    std::fs::remove_file(&listener_ports).expect("unpin the guarded ports");
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&listener_ports)
        .args([
            "type",
            "hash",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "1024",
            "name",
            "LISTENER_PORTS",
        ])
        .output()
        .expect("run bpftool");
    assert!(
        made.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let entries_of = |path: &Path| -> String {
        let out = Command::new("bpftool")
            .args(["--json", "map", "show", "pinned"])
            .arg(path)
            .output()
            .expect("run bpftool");
        let shown: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        shown["max_entries"].to_string()
    };
    assert_eq!(entries_of(&listener_ports), "1024");

    let restarted_at = now_ms();
    stack.gateway.restart().expect("restart tollgate");
    assert_eq!(
        entries_of(&listener_ports),
        "2048",
        "the guarded ports map keeps an older version's size"
    );
    assert!(
        stack
            .gateway
            .log()
            .contains("a pinned map of an older version's size is made again"),
        "{}",
        stack.gateway.log()
    );
    assert!(
        !old_client_ports.exists(),
        "the older daemon's client port map is still pinned"
    );
    assert!(reserved.exists(), "no reserved evidence ring pinned");
    assert!(agents_ring.exists(), "no agents' evidence ring pinned");
    assert!(
        stack
            .gateway
            .log()
            .contains("removed the pin of an older daemon's client port map"),
        "{}",
        stack.gateway.log()
    );
    agent_query_is_answered(&stack);
    stack.gateway.stop();
    // The session's statement is attributed to psql, found through the
    // new endpoint-keyed map (a miss there leaves the process fields
    // empty).
    let rows = stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'request' AND query_info_query_string = 'SELECT 41 + 1'",
            1,
            Duration::from_secs(30),
        )
        .expect("audit rows");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["actor_process_name"], "psql", "{}", rows[0]);
    // Its redirect is on record: connect4's events go to the agents' ring
    // only, which the old daemon's pin directory lacked and the new daemon
    // made and read.
    let audit = stack.gateway.audit_dir();
    let since = format!(
        "actor_process_cgroup_id = {} AND time >= {restarted_at}",
        agent_cgroup_id(&stack)
    );
    let redirects = evidence::rows_of_kind(audit, "redirected", &since);
    assert_eq!(redirects.len(), 1, "{redirects:?}");
    assert_eq!(redirects[0]["actor_process_name"], "psql", "{redirects:?}");
    let run = verify_passes(&stack);
    assert_eq!(run.report["bypasses"], json!([]));
    assert_eq!(run.report["reserved_losses"], json!([]));
}

/// A session holds two descriptors (the agent's connection and the
/// target's): tollgate raises its open-file limit to the hard limit at
/// start, and warns when even that is below what the targets'
/// `max_connections` may take (here the default 1 000, against a hard
/// limit of 1 024).
#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit_and_a_short_one_is_warned_about() {
    if !privileged(
        "the_open_file_limit_is_raised_to_the_hard_limit_and_a_short_one_is_warned_about",
    ) {
        return;
    }
    use std::os::unix::process::CommandExt;
    let mut stack = Stack::start().expect("start PostgreSQL, IdP and tollgate");
    stack.gateway.stop();
    let dir = stack.gateway.dir.path();
    let ready = dir.join("limits.ready");
    let log = dir.join("limits.log");
    let mut cmd = Command::new(tollgate_bin());
    cmd.args(["run", "--config"])
        .arg(&stack.gateway.config_path)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    // SAFETY: only setrlimit runs in the forked child before exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = Spawned(cmd.spawn().expect("start tollgate run"));
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("tollgate to be ready", Duration::from_secs(30), || {
        ready.exists()
    })
    .unwrap_or_else(|err| panic!("{err}\n{}", text()));
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", child.id())).expect("the limits");
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().skip(3).take(2).collect())
        .unwrap_or_default();
    assert_eq!(open_files, ["1024", "1024"], "{limits}");
    assert!(
        text().contains("the open-file limit is below what the targets' max_connections may take"),
        "{}",
        text()
    );
}
