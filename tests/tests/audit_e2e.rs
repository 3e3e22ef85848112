//! The audit log's promises, proven through the real daemon: agents in a
//! real cgroup, real PostgreSQL, `tollgate run` killed, starved of disk and
//! queried with DuckDB the way an analyst does.
//!
//! - a crash suite: tollgate is SIGKILLed at random moments while clients
//!   write; every statement a client saw succeed has its request row, and
//!   nothing reached PostgreSQL without one;
//! - a full disk: the audit directory on a tiny tmpfs is filled while
//!   sessions are open; statements are refused with SQLSTATE 58030,
//!   nothing acknowledged is lost, and service resumes with the space;
//! - the DuckDB cookbook: every query in docs/queries.md runs against an
//!   audit made here and gives the answers the traffic implies;
//! - a live directory: segments are readable while the daemon runs, and a
//!   copy of it with its tail cut off fails verification.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tollgate_tests::{duckdb, privileged, wait_for, AgentCgroup, Postgres, Stack};

const AUDIT_WAIT: Duration = Duration::from_secs(30);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

// ---------------------------------------------------------------------------
// Crash suite

/// xorshift64*: enough randomness for kill moments, reproducible by seed.
struct Prng(u64);

impl Prng {
    fn new(seed: u64) -> Self {
        Prng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One agent process writing `INSERT INTO crash_log VALUES (<client>, <n>)`
/// with n = 1, 2, 3, ... over psycopg (autocommit), printing n once the
/// server's answer arrived. Every attempt uses a new n, so a statement
/// whose answer was lost in a crash is never repeated. It reconnects after
/// any error, except while `pause` exists; it ends when `stop` exists.
/// It pauses 10 ms between statements: enough traffic for every kill to
/// land among statements, not so much that verifying 25 times takes long.
const CRASH_CLIENT: &str = r#"
import os, sys, time
import psycopg
port, token, client, work = sys.argv[1:5]
pause, stop = os.path.join(work, "pause"), os.path.join(work, "stop")
n, errors, conn = 0, 0, None
while not os.path.exists(stop):
    if conn is None:
        if os.path.exists(pause):
            time.sleep(0.01)
            continue
        try:
            conn = psycopg.connect(host="127.0.0.1", port=int(port), user="agent", dbname="orders",
                                   password=token, sslmode="disable", autocommit=True, connect_timeout=3)
        except psycopg.Error:
            errors += 1
            time.sleep(0.02)
            continue
    n += 1
    try:
        conn.execute(f"INSERT INTO crash_log VALUES ({client}, {n})")
    except psycopg.Error:
        errors += 1
        try:
            conn.close()
        except Exception:
            pass
        conn = None
        continue
    print(n, flush=True)
    time.sleep(0.01)
print(f"client {client}: {n} attempts, {errors} errors", file=sys.stderr, flush=True)
"#;

struct CrashClient {
    child: Child,
    acked: Arc<Mutex<Vec<u64>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl CrashClient {
    fn start(stack: &Stack, token: &str, client: u32, work: &Path) -> Result<Self> {
        let mut child = AgentCgroup::command(&stack.gateway.config.agent_cgroup, &duckdb::python())
            .args(["-c", CRASH_CLIENT])
            .arg(stack.postgres.port.to_string())
            .arg(token)
            .arg(client.to_string())
            .arg(work)
            .stdout(Stdio::piped())
            .spawn()
            .context("start a crash client")?;
        let stdout = child.stdout.take().context("client stdout")?;
        let acked = Arc::new(Mutex::new(Vec::new()));
        let sink = acked.clone();
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(n) = line.trim().parse::<u64>() {
                    sink.lock().expect("acked").push(n);
                }
            }
        });
        Ok(CrashClient {
            child,
            acked,
            reader: Some(reader),
        })
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().expect("acked").len()
    }

    /// Waits for the client to end (after `stop` exists) and returns what
    /// it saw acknowledged.
    fn finish(mut self) -> Result<Vec<u64>> {
        let exited = wait_for("a crash client to stop", Duration::from_secs(20), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if exited.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            bail!("a crash client did not stop");
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let acked = self.acked.lock().expect("acked").clone();
        Ok(acked)
    }
}

impl Drop for CrashClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `INSERT INTO <table> VALUES (<a>, <b>)` into (a, b).
fn insert_values(statement: &str) -> Option<(u64, u64)> {
    let inner = statement.split_once('(')?.1.split_once(')')?.0;
    let (a, b) = inner.split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

const CRASH_CLIENTS: u32 = 3;
const KILLS: u32 = 24;

#[test]
fn kill_9_at_random_moments_loses_no_acknowledged_statement() {
    if !privileged("kill_9_at_random_moments_loses_no_acknowledged_statement") {
        return;
    }
    let started = Instant::now();
    let seed = std::env::var("TOLLGATE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("crash suite seed {seed} (TOLLGATE_CRASH_SEED={seed} repeats the kill moments)");
    let mut rng = Prng::new(seed);

    // Segments close every second, so kills also land in segment closes.
    let mut stack = Stack::start_with(Postgres::start().expect("start PostgreSQL"), |config| {
        config.audit_extra = "segment_max_age_secs = 1".into();
    })
    .expect("start PostgreSQL, IdP and tollgate");
    stack
        .postgres
        .superuser_sql_ok("orders", "CREATE TABLE crash_log (client int, n int)")
        .expect("create crash_log");
    let token = stack
        .idp
        .token(
            "c4a5e000-0000-4000-8000-00000000c4a5",
            &["--name", "crash-agent"],
        )
        .expect("mint a token");
    let work = tempfile::tempdir().expect("work dir");
    let pause = work.path().join("pause");

    let clients: Vec<CrashClient> = (1..=CRASH_CLIENTS)
        .map(|c| CrashClient::start(&stack, &token, c, work.path()).expect("start client"))
        .collect();
    let progress = |clients: &[CrashClient]| -> Vec<usize> {
        clients.iter().map(CrashClient::acked_count).collect()
    };

    let deadline = started + Duration::from_secs(150);
    let mut kills = 0;
    let mut verified = 0;
    // Where the time goes: [resuming, kill moments, restarts, verifications].
    let mut spent = [Duration::ZERO; 4];
    while kills < KILLS {
        assert!(
            Instant::now() < deadline,
            "only {kills} kills in 150 s; gateway log:\n{}",
            stack.gateway.log()
        );
        // Every client gets statements through this daemon before it dies.
        let t = Instant::now();
        let before = progress(&clients);
        let _ = fs::remove_file(&pause);
        wait_for(
            "every client to get a statement through the (re)started daemon",
            Duration::from_secs(30),
            || {
                progress(&clients)
                    .iter()
                    .zip(&before)
                    .all(|(now, then)| now > then)
            },
        )
        .unwrap_or_else(|e| panic!("{e}; gateway log:\n{}", stack.gateway.log()));
        // The random moment: up to 1.5 s, a segment close included.
        spent[0] += t.elapsed();
        let moment = Duration::from_millis(rng.below(1500));
        thread::sleep(moment);
        spent[1] += moment;
        // Clients check `pause` only to reconnect, so they keep writing
        // until the kill; afterwards they wait, so that the recovered
        // directory can be verified while nothing writes to it.
        fs::write(&pause, b"").expect("pause file");
        stack.gateway.kill();
        kills += 1;
        let t = Instant::now();
        stack
            .gateway
            .restart()
            .expect("restart tollgate after kill -9");
        spent[2] += t.elapsed();
        let t = Instant::now();
        let (ok, report) = stack.gateway.verify_audit().expect("run audit verify");
        spent[3] += t.elapsed();
        assert!(
            ok,
            "audit verify failed after kill {kills} and restart:\n{report}"
        );
        verified += 1;
    }
    // Statements on the last daemon too, then a clean stop.
    let before = progress(&clients);
    let _ = fs::remove_file(&pause);
    wait_for(
        "clients to write after the last restart",
        AUDIT_WAIT,
        || {
            progress(&clients)
                .iter()
                .zip(&before)
                .all(|(now, then)| now > then)
        },
    )
    .expect("progress after the last restart");
    fs::write(work.path().join("stop"), b"").expect("stop file");
    let acked: BTreeSet<(u64, u64)> = clients
        .into_iter()
        .zip(1..)
        .flat_map(|(client, c)| {
            client
                .finish()
                .expect("client finished")
                .into_iter()
                .map(move |n| (c, n))
        })
        .collect();
    stack.gateway.stop();
    let (ok, report) = stack.gateway.verify_audit().expect("run audit verify");
    assert!(ok, "audit verify failed after the final stop:\n{report}");
    verified += 1;

    let rows = duckdb::query(
        stack.gateway.audit_dir(),
        "SELECT query_info_query_string AS q, count(*) AS n, min(actor_user_name) AS who, min(action_id) AS action \
         FROM audit WHERE phase = 'request' AND query_info_query_string LIKE 'INSERT INTO crash_log %' GROUP BY q",
    )
    .expect("query the audit");
    let mut audited = BTreeSet::new();
    for row in &rows {
        let q = row["q"].as_str().unwrap_or_default();
        let values = insert_values(q).unwrap_or_else(|| panic!("unexpected statement {q}"));
        assert_eq!(row["n"], 1, "one request row per statement: {row}");
        assert_eq!(row["who"], "crash-agent", "{row}");
        assert_eq!(row["action"], 1, "{row}");
        audited.insert(values);
    }
    let outcomes = duckdb::query(
        stack.gateway.audit_dir(),
        "SELECT count(*) AS n FROM audit WHERE phase = 'outcome' AND query_info_query_string LIKE 'INSERT INTO crash_log %'",
    )
    .expect("count outcomes")[0]["n"]
        .as_u64()
        .unwrap_or(0);
    let in_postgres: BTreeSet<(u64, u64)> = stack
        .postgres
        .superuser_sql_ok("orders", "SELECT client || ',' || n FROM crash_log")
        .expect("read crash_log")
        .lines()
        .filter_map(|l| insert_values(&format!("({l})")))
        .collect();

    let lost: Vec<_> = acked.difference(&audited).collect();
    let unaudited_in_postgres: Vec<_> = in_postgres.difference(&audited).collect();
    let acked_not_in_postgres: Vec<_> = acked.difference(&in_postgres).collect();
    eprintln!(
        "crash suite: {kills} kills, {verified} verifications passed, {} statements acknowledged, \
         {} request rows ({} more than acknowledged: in flight at a kill), {} rows in PostgreSQL, \
         {outcomes} outcome rows, {:.1} s (resuming {:.1} s, kill moments {:.1} s, restarts {:.1} s, \
         verifications {:.1} s)",
        acked.len(),
        audited.len(),
        audited.len() - acked.len().min(audited.len()),
        in_postgres.len(),
        started.elapsed().as_secs_f64(),
        spent[0].as_secs_f64(),
        spent[1].as_secs_f64(),
        spent[2].as_secs_f64(),
        spent[3].as_secs_f64(),
    );
    assert!(
        acked.len() >= 100,
        "too little traffic to prove anything: {} statements",
        acked.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged statements without a request row: {lost:?}"
    );
    assert!(
        unaudited_in_postgres.is_empty(),
        "statements that reached PostgreSQL without a request row: {unaudited_in_postgres:?}"
    );
    assert!(
        acked_not_in_postgres.is_empty(),
        "acknowledged but not in PostgreSQL: {acked_not_in_postgres:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(180),
        "the crash suite took {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Full disk

/// A tmpfs of a given size mounted on a fresh directory, unmounted when
/// dropped (also when a test fails).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-tmpfs-")
            .tempdir()?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()?;
        if !out.status.success() {
            bail!("mount tmpfs: {}", text(&out.stderr));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            // Something still holds a file open: detach it anyway.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Writes zeros to `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> Result<u64> {
    let mut file = fs::File::create(path)?;
    let mut total = 0u64;
    for chunk in [64 * 1024, 4096, 1] {
        let bytes = vec![0u8; chunk];
        loop {
            match file.write(&bytes) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    file.sync_all().ok();
    Ok(total)
}

fn assert_audit_refusal(answer: &Value, what: &str) {
    assert_eq!(answer["ok"], false, "{what}: {answer}");
    assert_eq!(answer["sqlstate"], "58030", "{what}: {answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("tollgate: "), "{what}: {message}");
}

#[test]
fn a_full_audit_disk_refuses_statements_loses_nothing_and_recovers() {
    if !privileged("a_full_audit_disk_refuses_statements_loses_nothing_and_recovers") {
        return;
    }
    full_audit_disk("read_parallel");
}

/// The same in `buffered` durability, where the session writes its own
/// records: a read's failed write is known before the read is sent, so the
/// read is refused too (and its session stays usable), instead of being
/// sent and its answer withheld.
#[test]
fn a_full_audit_disk_in_buffered_durability_refuses_statements_loses_nothing_and_recovers() {
    if !privileged(
        "a_full_audit_disk_in_buffered_durability_refuses_statements_loses_nothing_and_recovers",
    ) {
        return;
    }
    full_audit_disk("buffered");
}

/// Logins tried while the audit disk is full (see `full_audit_disk`).
const LATE_LOGINS: usize = 8;

fn full_audit_disk(durability: &str) {
    // Declared first, dropped last: unmounted after the daemon has stopped.
    let tmpfs = Tmpfs::mount("2m").expect("mount a 2 MiB tmpfs");
    let audit_dir = tmpfs.path().join("audit");
    let mut stack = Stack::start_with(Postgres::start().expect("start PostgreSQL"), |config| {
        config.audit_dir = audit_dir.clone();
        config.audit_extra = format!("segment_max_age_secs = 1\ndurability = \"{durability}\"");
    })
    .expect("start PostgreSQL, IdP and tollgate");
    stack
        .postgres
        .superuser_sql_ok("orders", "CREATE TABLE disk_log (n int)")
        .expect("create disk_log");
    // A view whose reading writes, through a function its readers' text
    // never names.
    stack
        .postgres
        .superuser_sql_ok(
            "orders",
            "CREATE TABLE read_log (n int); \
             CREATE FUNCTION note_read() RETURNS int VOLATILE LANGUAGE sql \
               AS 'INSERT INTO read_log VALUES (1) RETURNING 1'; \
             CREATE VIEW noted_customers AS SELECT name, note_read() AS noted FROM customers",
        )
        .expect("create a view that writes");
    let token = stack
        .idp
        .token(
            "d15c0000-0000-4000-8000-00000000d15c",
            &["--name", "disk-agent"],
        )
        .expect("mint a token");
    let insert = |n: u64| format!("INSERT INTO disk_log VALUES ({n})");

    let mut writer = stack.agent_session(&token).expect("writer session");
    let mut reader = stack.agent_session(&token).expect("reader session");
    assert_eq!(writer.login["ok"], true, "{}", writer.login);
    assert_eq!(reader.login["ok"], true, "{}", reader.login);
    let mut acked = Vec::new();
    let mut n = 0;
    for _ in 0..10 {
        n += 1;
        let answer = writer.run(&insert(n)).expect("insert");
        assert_eq!(answer["ok"], true, "{answer}");
        acked.push(n);
    }
    let acked_before_full = acked.len();
    // The outcome record of the last statement is made durable with the
    // next sync, at most 20 ms (the store's LAZY_WAIT) after the answer:
    // let that happen before the disk fills, so whether it survives does
    // not depend on how much room the last page of the WAL file has left.
    std::thread::sleep(Duration::from_millis(100));

    let filler = tmpfs.path().join("filler");
    let filled = fill(&filler).expect("fill the audit file system");

    // Slack in the last pages of open files may take a few more records;
    // then every statement is refused, and the session stays usable.
    let mut refused = Vec::new();
    for _ in 0..50 {
        n += 1;
        let answer = writer.run(&insert(n)).expect("insert");
        if answer["ok"] == true {
            acked.push(n);
            continue;
        }
        assert_audit_refusal(&answer, "a write on a full disk");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("was not sent because its audit record could not be written"),
            "{message}"
        );
        assert_eq!(answer["severity"], "ERROR", "{answer}");
        refused.push(n);
        break;
    }
    assert_eq!(
        refused.len(),
        1,
        "no refusal after 50 statements on a full disk; acknowledged {acked:?}"
    );
    let slipped_in = acked.len() - acked_before_full;
    for _ in 0..3 {
        n += 1;
        let answer = writer.run(&insert(n)).expect("insert");
        assert_audit_refusal(&answer, "another write on a full disk");
        refused.push(n);
    }
    // A read of that view calls no function in its text, yet it is not
    // provably read-only: it is not sent before its record is durable, so
    // it is refused like a write and its function never runs.
    let answer = reader
        .run("SELECT * FROM noted_customers")
        .expect("select from the view");
    assert_audit_refusal(&answer, "a read of a view that writes, on a full disk");
    assert_eq!(answer["severity"], "ERROR", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap_or_default()
            .contains("was not sent because its audit record could not be written"),
        "{answer}"
    );
    assert_eq!(
        stack
            .postgres
            .superuser_sql_ok("orders", "SELECT count(*) FROM read_log")
            .expect("read read_log")
            .trim(),
        "0",
        "the view's function ran though its read was refused"
    );
    let answer = reader
        .run("SELECT name FROM customers WHERE id = 1")
        .expect("select");
    assert_audit_refusal(&answer, "a read on a full disk");
    let message = answer["message"].as_str().unwrap_or_default();
    if durability == "buffered" {
        // Written by the session before the read goes out: refused like
        // a write, and the session goes on.
        assert_eq!(answer["severity"], "ERROR", "{answer}");
        assert!(
            message.contains("was not sent because its audit record could not be written"),
            "{message}"
        );
        let after = reader.run("SELECT 1").expect("select");
        assert_audit_refusal(&after, "the same session, still on a full disk");
        assert_eq!(after["severity"], "ERROR", "the session is usable: {after}");
    } else {
        // A provably read-only statement (no function calls) goes out
        // while its record syncs, but its answer is withheld when the
        // record fails, and the session is closed.
        assert_eq!(answer["severity"], "FATAL", "{answer}");
        assert!(message.contains("answer is withheld"), "{answer}");
        let after = reader.run("SELECT 1").expect("select");
        assert_eq!(after["ok"], false, "the session was closed: {after}");
    }
    // A new session cannot be audited, so it does not start (the raw
    // login shows the SQLSTATE, which libpq keeps to itself at login).
    // Several of them: the kernel's events of their connections go to the
    // evidence stream on the same full disk, more than the slack left in
    // the last page of its WAL file holds, so that some of those writes
    // fail too (checked below).
    for _ in 0..LATE_LOGINS {
        let late = stack.agent_login(&token).expect("late login");
        assert_eq!(late["outcome"], "error", "{late}");
        assert_eq!(late["sqlstate"], "58030", "{late}");
        assert!(
            late["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("tollgate: cannot audit this session"),
            "{late}"
        );
    }
    // Refused writes never reached the server.
    let in_postgres: BTreeSet<u64> = stack
        .postgres
        .superuser_sql_ok("orders", "SELECT n FROM disk_log")
        .expect("read disk_log")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for r in &refused {
        assert!(
            !in_postgres.contains(r),
            "refused statement {r} reached PostgreSQL"
        );
    }
    assert_eq!(in_postgres, acked.iter().copied().collect());

    // Space returns: the same session works again at once, so do new ones.
    fs::remove_file(&filler).expect("remove filler");
    for _ in 0..5 {
        n += 1;
        let answer = writer.run(&insert(n)).expect("insert");
        assert_eq!(answer["ok"], true, "service resumes with space: {answer}");
        acked.push(n);
    }
    let mut fresh = stack.agent_session(&token).expect("fresh session");
    assert_eq!(fresh.login["ok"], true, "{}", fresh.login);
    let answer = fresh.run("SELECT count(*) FROM disk_log").expect("count");
    assert_eq!(answer["rows"], json!([[acked.len()]]), "{answer}");
    drop(fresh);
    drop(writer);
    drop(reader);

    stack.gateway.stop();
    let (ok, report) = stack.gateway.verify_audit().expect("run audit verify");
    assert!(ok, "audit verify after the full disk:\n{report}");
    // The evidence stream shares the full disk: the kernel's events of
    // the connections made meanwhile (the late login's) were kept in the
    // ring buffer until their rows could be written, not taken and lost.
    let evidence = tollgate_tests::evidence::verify(
        &audit_dir,
        &stack.gateway.public_key(),
        stack.gateway.dir.path(),
    );
    assert_eq!(evidence.report["losses"], json!([]), "{}", evidence.summary);
    assert_eq!(
        evidence.report["reserved_losses"],
        json!([]),
        "{}",
        evidence.summary
    );
    let retried: u64 = tollgate_tests::evidence::rows(
        &audit_dir,
        "SELECT unmapped FROM audit WHERE phase = 'loss_counters'",
    )
    .iter()
    .filter_map(|r| serde_json::from_str::<Value>(r["unmapped"].as_str()?).ok())
    .filter_map(|c| c["user_space"]["write_retried"].as_u64())
    .max()
    .unwrap_or(0);
    assert!(
        retried > 0,
        "no evidence write failed on the full disk: the test did not test it\n{}",
        evidence.summary
    );
    let late_redirects = tollgate_tests::evidence::rows(
        &audit_dir,
        &format!(
            "SELECT * FROM audit WHERE phase = 'evidence' AND json_extract_string(unmapped, '$.kind') = 'redirected' AND dst_endpoint_port = {}",
            stack.postgres.port
        ),
    );
    // The writer's, the reader's, the late logins' and the fresh session's.
    assert!(
        late_redirects.len() >= 3 + LATE_LOGINS,
        "{}",
        evidence.summary
    );
    assert!(
        stack.gateway.log().contains("WAL write failed"),
        "the daemon logs the failed writes"
    );

    let rows = duckdb::query(
        &audit_dir,
        "SELECT phase, query_info_query_string AS q FROM audit WHERE query_info_query_string LIKE 'INSERT INTO disk_log %'",
    )
    .expect("query the audit");
    let with_phase = |phase: &str| -> BTreeSet<u64> {
        rows.iter()
            .filter(|r| r["phase"] == phase)
            .filter_map(|r| {
                r["q"]
                    .as_str()
                    .and_then(|q| q.rsplit_once('(')?.1.strip_suffix(')')?.parse().ok())
            })
            .collect()
    };
    let requests = with_phase("request");
    let missing: Vec<_> = acked.iter().filter(|a| !requests.contains(a)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not audited: {missing:?}"
    );
    // Outcome rows are written after the answer went back: those of the
    // statements around the full disk are there; one acknowledged while
    // the disk filled may have lost its outcome (the store logs the failed
    // WAL write; query 6 of docs/queries.md lists requests without an
    // outcome), never its request.
    let outcomes = with_phase("outcome");
    let around: Vec<_> = acked[..acked_before_full]
        .iter()
        .chain(&acked[acked.len() - 5..])
        .filter(|a| !outcomes.contains(a))
        .collect();
    assert!(around.is_empty(), "outcomes missing: {around:?}");
    // What the code does with a refusal for want of disk: the client is
    // told, the daemon logs it, and no audit row is made, neither then
    // (it could not be written) nor later.
    let all: BTreeSet<u64> = rows
        .iter()
        .filter_map(|r| {
            r["q"]
                .as_str()
                .and_then(|q| q.rsplit_once('(')?.1.strip_suffix(')')?.parse().ok())
        })
        .collect();
    for r in &refused {
        assert!(!all.contains(r), "refused statement {r} has an audit row");
    }
    eprintln!(
        "full disk ({durability}): filler {filled} bytes, {} acknowledged ({acked_before_full} before the disk filled, \
         {slipped_in} into page slack after, {} after space returned), {} refused with 58030, \
         {} request rows, {} outcome rows",
        acked.len(),
        5,
        refused.len(),
        requests.len(),
        with_phase("outcome").len()
    );
}

// ---------------------------------------------------------------------------
// The DuckDB cookbook

/// The sample identities of docs/queries.md, used here as real object ids.
const ANALYST: &str = "22222222-2222-4222-8222-222222222222";
const LOADER: &str = "33333333-3333-4333-8333-333333333333";
const DOC_AUDIT_DIR: &str = "/var/lib/tollgate/audit";
const DOC_SESSION: &str = "sess-0004";

/// Runs a list of statements on one DuckDB connection; answers one
/// `{"rows": [...]}` or `{"error": "..."}` per statement.
const COOKBOOK_RUNNER: &str = r#"
import datetime, decimal, json, sys
import duckdb
con = duckdb.connect()
def plain(v):
    if isinstance(v, (datetime.date, datetime.datetime, decimal.Decimal)):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", "replace")
    return v
answers = []
for sql in json.load(sys.stdin):
    try:
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description] if cur.description else []
        rows = cur.fetchall() if cur.description else []
        answers.append({"rows": [{c: plain(v) for c, v in zip(cols, r)} for r in rows]})
    except Exception as e:
        answers.append({"error": str(e)})
print(json.dumps(answers, default=str))
"#;

fn run_duckdb(statements: &[String]) -> Result<Vec<Value>> {
    let mut child = Command::new(duckdb::python())
        .args(["-c", COOKBOOK_RUNNER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(serde_json::to_string(statements)?.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("duckdb runner failed: {}", text(&out.stderr));
    }
    match serde_json::from_slice(&out.stdout)? {
        Value::Array(answers) => Ok(answers),
        other => bail!("unexpected runner output {other}"),
    }
}

/// The rows answered by the query under heading `n`.
fn answer_of<'a>(blocks: &[(u32, String)], answers: &'a [Value], n: u32) -> &'a Vec<Value> {
    let i = blocks
        .iter()
        .position(|(number, _)| *number == n)
        .unwrap_or_else(|| panic!("no query {n}"));
    rows(&answers[i])
}

fn rows(answer: &Value) -> &Vec<Value> {
    static EMPTY: Vec<Value> = Vec::new();
    answer["rows"].as_array().unwrap_or(&EMPTY)
}

fn strings(rows: &[Value], column: &str) -> Vec<String> {
    rows.iter()
        .map(|r| r[column].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn psql_ok(stack: &Stack, token: &str, statements: &[&str]) {
    let mut cmd = stack.agent_psql(token, statements[0]);
    for s in &statements[1..] {
        cmd.args(["-c", s]);
    }
    let out = cmd.output().expect("run psql");
    assert!(
        out.status.success(),
        "{statements:?}: {}\n{}",
        text(&out.stderr),
        stack.gateway.log()
    );
}

fn psql_denied(stack: &Stack, token: &str, statement: &str) {
    let out = stack
        .agent_psql(token, statement)
        .output()
        .expect("run psql");
    assert!(!out.status.success(), "{statement} was not refused");
    assert!(
        text(&out.stderr).contains("refused by policy rule"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn every_query_in_the_duckdb_cookbook_answers_from_a_real_audit() {
    if !privileged("every_query_in_the_duckdb_cookbook_answers_from_a_real_audit") {
        return;
    }
    // Customers' email addresses are masked, so that query 1 shows what an
    // agent did not get to see.
    let policy = format!(
        "{}\n[[policy.mask]]\nname = \"customer-email\"\ncolumns = [\"public.customers.email\"]\n",
        tollgate_tests::DEFAULT_POLICY
    );
    let mut stack = Stack::start_with_policy(&policy).expect("start PostgreSQL, IdP and tollgate");
    stack
        .postgres
        .superuser_sql_ok(
            "orders",
            "CREATE TABLE products (id int PRIMARY KEY, name text);
             INSERT INTO products VALUES (1, 'bolt'), (2, 'nut'), (3, 'screw');",
        )
        .expect("create products");
    // The analyst keeps one token for all its sessions; the loader gets a
    // fresh token per session.
    let analyst = stack
        .idp
        .token(ANALYST, &["--name", "analyst-a", "--groups", "support"])
        .expect("mint");
    let loader = || {
        stack
            .idp
            .token(LOADER, &["--name", "loader-b", "--groups", "etl"])
            .expect("mint")
    };
    let session_one = [
        "SELECT * FROM customers",
        "SELECT name FROM products WHERE id = 1",
        "SELECT count(*) FROM customers c JOIN products p ON p.id = c.id",
    ];
    psql_ok(&stack, &analyst, &session_one);
    psql_ok(
        &stack,
        &analyst,
        &["SELECT email FROM customers WHERE id = 2"],
    );
    psql_ok(
        &stack,
        &analyst,
        &["/* intent: restock widgets */ INSERT INTO products VALUES (10, 'widget')"],
    );
    psql_denied(&stack, &analyst, "SELECT * FROM secrets");
    psql_ok(&stack, &loader(), &["SELECT * FROM products"]);
    psql_denied(&stack, &loader(), "DELETE FROM products");
    psql_denied(&stack, &loader(), "SELECT * FROM secrets");
    psql_ok(
        &stack,
        &loader(),
        &["UPDATE products SET name = 'gadget' WHERE id = 10"],
    );
    let expired = stack
        .idp
        .token(
            "e0000000-0000-4000-8000-0000000000e0",
            &["--expires-in", "-3600"],
        )
        .expect("mint");
    let out = stack
        .agent_psql(&expired, "SELECT 1")
        .output()
        .expect("psql");
    assert!(!out.status.success());
    // Forwarded: 3 + 1 + 1 (analyst) and 1 + 1 (loader); refused: 1 + 2
    // by policy, 1 token.
    let forwarded = 7;
    let refused = 4;

    // Everything in closed segments, checked, before the analysis.
    stack.gateway.stop();
    let (ok, report) = stack.gateway.verify_audit().expect("verify");
    assert!(ok, "{report}");

    let dir = stack.gateway.audit_dir().display().to_string();
    let direct = |sql: &str| duckdb::query(stack.gateway.audit_dir(), sql).expect("duckdb");
    let session = direct("SELECT DISTINCT session_uid FROM audit WHERE query_info_query_string = 'SELECT * FROM customers'");
    assert_eq!(session.len(), 1, "{session:?}");
    let session_uid = session[0]["session_uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let loader_rows = direct(&format!(
        "SELECT count(*) AS n FROM audit WHERE actor_user_uid = '{LOADER}'"
    ))[0]["n"]
        .as_u64()
        .unwrap_or(0);
    let files = direct(&format!(
        "SELECT count(*) AS n FROM glob('{dir}/records/**/*.parquet')"
    ))[0]["n"]
        .as_u64()
        .unwrap_or(0);

    let blocks = tollgate_tests::duckdb::cookbook();
    let substitute = |sql: &str| {
        sql.replace(DOC_AUDIT_DIR, &dir)
            .replace(DOC_SESSION, &session_uid)
    };
    let statements: Vec<String> = blocks.iter().map(|(_, sql)| substitute(sql)).collect();
    let numbered: Vec<u32> = blocks.iter().map(|(n, _)| *n).filter(|n| *n > 0).collect();
    assert!(
        numbered.len() >= 8,
        "the cookbook has {} queries",
        numbered.len()
    );
    assert_eq!(blocks[0].0, 0, "the cookbook starts with its view");
    // The negative of query 1: the loader never read customers.
    let q1 = blocks.iter().position(|(n, _)| *n == 1).expect("query 1");
    let mut all = statements.clone();
    let q1_negative = all.len();
    all.push(statements[q1].replace(ANALYST, LOADER));
    // Positive controls of the queries that answer nothing on a whole,
    // cleanly stopped audit (6: requests without an outcome; 15: breaks in
    // the chain): the same queries over the audit with one outcome row
    // left out, with one row left out, and with one link changed.
    let numbered_sql = |n: u32| {
        let at = blocks.iter().position(|(m, _)| *m == n);
        statements[at.unwrap_or_else(|| panic!("query {n}"))].clone()
    };
    all.push(statements[0].replacen("VIEW audit AS", "VIEW audit_whole AS", 1));
    let first_outcome = "(SELECT request_uid FROM audit_whole WHERE phase = 'outcome' \
                         AND class_uid <> 3002 ORDER BY sequence LIMIT 1)";
    all.push(format!(
        "CREATE OR REPLACE VIEW audit AS SELECT * FROM audit_whole \
         WHERE NOT (phase = 'outcome' AND request_uid = {first_outcome})"
    ));
    let q6_control = all.len();
    all.push(numbered_sql(6));
    all.push(format!("SELECT {first_outcome} AS request_uid"));
    all.push(
        "CREATE OR REPLACE VIEW audit AS SELECT * FROM audit_whole \
         WHERE sequence <> (SELECT min(sequence) + 5 FROM audit_whole)"
            .to_owned(),
    );
    let q15_gap = all.len();
    all.push(numbered_sql(15));
    // A wrong link stored in one row.
    all.push(
        "CREATE OR REPLACE VIEW audit AS SELECT * REPLACE (CASE WHEN sequence = \
         (SELECT min(sequence) + 5 FROM audit_whole) THEN repeat('f', 64) \
         ELSE prev_record_hash END AS prev_record_hash) FROM audit_whole"
            .to_owned(),
    );
    let q15_link = all.len();
    all.push(numbered_sql(15));
    let answers = run_duckdb(&all).expect("run the cookbook");
    for (i, answer) in answers.iter().enumerate().skip(blocks.len()) {
        assert!(
            answer.get("error").is_none(),
            "control {i} fails: {}\n{}",
            answer["error"],
            all[i]
        );
    }
    let dropped = rows(&answers[q6_control + 1]);
    assert_eq!(
        strings(rows(&answers[q6_control]), "request_uid"),
        strings(dropped, "request_uid"),
        "query 6 finds the request whose outcome was left out"
    );
    let gaps = rows(&answers[q15_gap]);
    assert_eq!(gaps.len(), 1, "query 15 finds the row left out: {gaps:?}");
    assert_eq!(gaps[0]["step"], 2, "{gaps:?}");
    let links = rows(&answers[q15_link]);
    assert_eq!(links.len(), 1, "query 15 finds the changed link: {links:?}");
    assert_eq!(links[0]["prev_record_hash"], "f".repeat(64), "{links:?}");
    assert_eq!(links[0]["step"], 1, "{links:?}");
    for ((n, sql), answer) in blocks.iter().zip(&answers) {
        assert!(
            answer.get("error").is_none(),
            "query {n} fails: {}\n{sql}",
            answer["error"]
        );
    }

    let mut checked = BTreeSet::new();
    for &n in &numbered {
        let got = answer_of(&blocks, &answers, n);
        match n {
            // Did the analyst read customers in the last day: its three
            // statements that read it (a join included), not the refused one.
            1 => {
                let mut texts = strings(got, "query_info_query_string");
                texts.sort();
                let mut want = vec![
                    session_one[0].to_owned(),
                    session_one[2].to_owned(),
                    "SELECT email FROM customers WHERE id = 2".to_owned(),
                ];
                want.sort();
                assert_eq!(texts, want, "query 1: {got:?}");
                // What the agent did not get to see, from each outcome: the
                // email column wherever it was read, and the count
                // computed from the table that holds it.
                for r in got {
                    let text = r["query_info_query_string"].as_str().unwrap_or_default();
                    let masked = match text.contains("count(*)") {
                        true => json!(["count (computed from a table with masked columns)"]),
                        false => json!(["public.customers.email"]),
                    };
                    assert_eq!(r["masked_columns"], masked, "query 1: {r}");
                }
                assert!(got.iter().all(|r| r["actor_user_name"] == "analyst-a"));
                assert_eq!(
                    rows(&answers[q1_negative]).len(),
                    0,
                    "the loader never read customers"
                );
            }
            // Denied per identity: 1 for the analyst, 2 for the loader,
            // 1 unidentified (the expired token).
            2 => {
                let mut per: BTreeMap<String, u64> = BTreeMap::new();
                for r in got {
                    *per.entry(r["actor_user_uid"].as_str().unwrap_or_default().to_owned())
                        .or_default() += r["denied"].as_u64().unwrap_or(0);
                }
                let want: BTreeMap<String, u64> = [
                    (String::new(), 1),
                    (ANALYST.to_owned(), 1),
                    (LOADER.to_owned(), 2),
                ]
                .into_iter()
                .collect();
                assert_eq!(per, want, "query 2: {got:?}");
                let loader_rules: BTreeSet<String> = got
                    .iter()
                    .filter(|r| r["actor_user_uid"] == LOADER)
                    .map(|r| r["policy_uid"].as_str().unwrap_or_default().to_owned())
                    .collect();
                assert_eq!(
                    loader_rules,
                    [
                        "agents:dangerous:delete_without_where",
                        "agents:deny_tables"
                    ]
                    .map(String::from)
                    .into_iter()
                    .collect()
                );
            }
            // State-changing statements that ran: the insert and the update.
            3 => {
                assert_eq!(
                    strings(got, "query_info_query_string"),
                    [
                        "/* intent: restock widgets */ INSERT INTO products VALUES (10, 'widget')",
                        "UPDATE products SET name = 'gadget' WHERE id = 10"
                    ],
                    "query 3: {got:?}"
                );
                assert_eq!(strings(got, "actor_user_name"), ["analyst-a", "loader-b"]);
                assert!(got.iter().all(|r| r["approval_uid"] == ""
                    && r["query_info_tables_written"] == json!(["public.products"])));
            }
            // Sessions per target per hour: 8 agent sessions (the refused
            // login may count as one more), every request and refusal.
            4 => {
                let sum = |c: &str| got.iter().map(|r| r[c].as_u64().unwrap_or(0)).sum::<u64>();
                assert!(got.iter().all(|r| r["dst_endpoint_name"] == "orders-db"));
                assert!((8..=9).contains(&sum("sessions")), "query 4: {got:?}");
                assert_eq!(sum("requests"), forwarded + refused, "query 4: {got:?}");
                assert!(got.iter().any(|r| r["identities"].as_u64() >= Some(2)));
            }
            // The first session, in order: its login, then each statement's
            // request before its outcome.
            5 => {
                let sequences: Vec<u64> =
                    got.iter().filter_map(|r| r["sequence"].as_u64()).collect();
                assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
                assert_eq!(
                    got.first().map(|r| r["phase"].clone()),
                    Some(json!("session"))
                );
                let of_phase = |phase: &str| -> Vec<&Value> {
                    got.iter().filter(|r| r["phase"] == phase).collect()
                };
                let requests = of_phase("request");
                assert_eq!(
                    requests
                        .iter()
                        .map(|r| r["query_info_query_string"].as_str().unwrap_or_default())
                        .collect::<Vec<_>>(),
                    session_one,
                    "query 5: statements in the order they ran: {got:?}"
                );
                // Outcomes are written after the answer went back, so one
                // may follow the next request: each comes after its own.
                let outcomes = of_phase("outcome");
                assert_eq!(outcomes.len(), session_one.len(), "query 5: {got:?}");
                for request in &requests {
                    let outcome = outcomes
                        .iter()
                        .find(|o| o["request_uid"] == request["request_uid"])
                        .unwrap_or_else(|| panic!("no outcome for {request}"));
                    assert!(outcome["sequence"].as_u64() > request["sequence"].as_u64());
                    assert_eq!(
                        outcome["query_info_query_string"],
                        request["query_info_query_string"]
                    );
                }
            }
            // After a clean stop every forwarded request has its outcome.
            6 => assert!(got.is_empty(), "query 6: {got:?}"),
            // Rows returned: analyst 3+1+1+1 read + 1 inserted; loader 4 + 1.
            7 => {
                let per: BTreeMap<String, (u64, u64)> = got
                    .iter()
                    .map(|r| {
                        (
                            r["actor_user_name"].as_str().unwrap_or_default().to_owned(),
                            (
                                r["statements"].as_u64().unwrap_or(0),
                                r["rows_returned"].as_f64().unwrap_or(-1.0) as u64,
                            ),
                        )
                    })
                    .collect();
                let want: BTreeMap<String, (u64, u64)> = [
                    ("analyst-a".to_owned(), (5, 7)),
                    ("loader-b".to_owned(), (2, 5)),
                ]
                .into_iter()
                .collect();
                assert_eq!(per, want, "query 7: {got:?}");
                assert_eq!(got[0]["actor_user_name"], "analyst-a", "most rows first");
            }
            // Refused logins per source, summaries counted: the one
            // expired token, from the agent cgroup.
            8 if got.first().is_some_and(|r| r.get("refusals").is_some()) => {
                assert_eq!(got.len(), 1, "query 8, per source: {got:?}");
                assert_eq!(got[0]["refusals"], 1, "{got:?}");
                assert!(
                    got[0]["source"]
                        .as_str()
                        .is_some_and(|s| s.parse::<i64>().is_ok()),
                    "the source is the agent cgroup's id: {got:?}"
                );
            }
            // The expired token, with the process that presented it.
            8 => {
                assert_eq!(got.len(), 1, "query 8: {got:?}");
                assert_eq!(got[0]["actor_process_name"], "psql");
                assert!(got[0]["actor_process_pid"].as_i64().unwrap_or(0) > 0);
                assert!(
                    got[0]["status_detail"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("expired"),
                    "{got:?}"
                );
            }
            // One target, one outcome per forwarded statement.
            9 => {
                assert_eq!(got.len(), 1, "query 9: {got:?}");
                assert_eq!(got[0]["dst_endpoint_name"], "orders-db");
                assert_eq!(got[0]["statements"], forwarded);
                assert!(got[0]["max_us"].as_i64().unwrap_or(0) > 0);
            }
            // Members of `support`: the analyst only.
            10 => {
                assert_eq!(
                    strings(got, "actor_user_uid"),
                    [ANALYST],
                    "query 10: {got:?}"
                );
            }
            // The analyst's one token from four psql processes; the
            // loader's tokens were each used once.
            11 => {
                assert_eq!(got.len(), 1, "query 11: {got:?}");
                assert_eq!(got[0]["processes"], 4, "{got:?}");
                assert_eq!(got[0]["identities"], json!(["analyst-a"]));
            }
            // The loader's files hold all its rows.
            12 => {
                let total: u64 = got.iter().map(|r| r["rows"].as_u64().unwrap_or(0)).sum();
                assert_eq!(total, loader_rows, "query 12: {got:?}");
                assert!(got.iter().all(|r| r["filename"]
                    .as_str()
                    .is_some_and(|f| f.starts_with(&dir) && f.ends_with(".parquet"))));
            }
            // The same two, with the analyst's stated intent.
            13 => {
                assert_eq!(
                    strings(got, "actor_user_name"),
                    ["analyst-a", "loader-b"],
                    "query 13: {got:?}"
                );
                assert_eq!(
                    strings(got, "intent"),
                    ["restock widgets", ""],
                    "query 13: {got:?}"
                );
                assert!(got
                    .iter()
                    .all(|r| r["query_info_tables_written"] == json!(["public.products"])));
            }
            // Every file carries its schema version and sequence range.
            14 => {
                let versions = got.iter().filter(|r| r["key"] == "tollgate.schema_version");
                assert_eq!(versions.clone().count() as u64, files, "query 13: {got:?}");
                // One version across the files, a positive number.
                let distinct: BTreeSet<String> = versions
                    .map(|r| r["value"].as_str().unwrap_or_default().to_owned())
                    .collect();
                assert_eq!(distinct.len(), 1, "{distinct:?}");
                assert!(distinct
                    .iter()
                    .all(|v| v.parse::<u32>().is_ok_and(|v| v >= 1)));
                for key in ["tollgate.first_sequence", "tollgate.last_sequence"] {
                    assert_eq!(got.iter().filter(|r| r["key"] == key).count() as u64, files);
                }
            }
            // The chain is contiguous and linked.
            15 => assert!(got.is_empty(), "query 14: {got:?}"),
            // Tables written: products, once by each.
            16 => {
                let per: BTreeSet<(String, String, u64)> = got
                    .iter()
                    .map(|r| {
                        (
                            r["name"].as_str().unwrap_or_default().to_owned(),
                            r["table_name"].as_str().unwrap_or_default().to_owned(),
                            r["statements"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect();
                let want: BTreeSet<(String, String, u64)> = [
                    ("analyst-a".to_owned(), "public.products".to_owned(), 1),
                    ("loader-b".to_owned(), "public.products".to_owned(), 1),
                ]
                .into_iter()
                .collect();
                assert_eq!(per, want, "query 15: {got:?}");
            }
            other => panic!("query {other} of docs/queries.md has no check here: add one"),
        }
        checked.insert(n);
    }
    eprintln!(
        "cookbook: {} queries run and checked against {files} segment files",
        checked.len()
    );
}

// ---------------------------------------------------------------------------
// A live directory

/// `tollgate audit verify` on `dir` with the gateway's public key and
/// `extra` arguments: (success, JSON report, printed output).
fn verify_dir(stack: &Stack, dir: &Path, extra: &[&str]) -> Result<(bool, Value, String)> {
    let report = tempfile::NamedTempFile::new()?;
    let public_key = format!("{}.pub", stack.gateway.config.signing_key.display());
    let out = Command::new(tollgate_tests::tollgate_bin())
        .args(["audit", "verify"])
        .arg(dir)
        .args(["--public-key", &public_key, "--report"])
        .arg(report.path())
        .args(extra)
        .output()?;
    let printed = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let json = serde_json::from_slice(&fs::read(report.path())?).unwrap_or(Value::Null);
    Ok((out.status.success(), json, printed))
}

fn problem_kinds(report: &Value) -> BTreeSet<String> {
    report["problems"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| p["kind"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Copies a live audit directory in the order docs/verification.md gives:
/// the WAL first, then checkpoints, manifest and segments.
fn copy_live(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for part in ["wal", "checkpoints", "manifest.jsonl", "records"] {
        let out = Command::new("cp")
            .arg("-a")
            .arg(from.join(part))
            .arg(to)
            .output()?;
        if !out.status.success() {
            bail!("cp {part}: {}", text(&out.stderr));
        }
    }
    Ok(())
}

fn manifest_lines(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// (file, tree size) of each checkpoint note.
fn checkpoints(dir: &Path) -> Vec<(PathBuf, usize)> {
    let mut notes: Vec<(PathBuf, usize)> = fs::read_dir(dir.join("checkpoints"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter_map(|p| {
                    let size = fs::read_to_string(&p)
                        .ok()?
                        .lines()
                        .nth(1)?
                        .trim()
                        .parse()
                        .ok()?;
                    Some((p, size))
                })
                .collect()
        })
        .unwrap_or_default();
    notes.sort();
    notes
}

#[test]
fn a_live_audit_is_readable_and_a_copy_with_its_tail_cut_fails_verification() {
    if !privileged("a_live_audit_is_readable_and_a_copy_with_its_tail_cut_fails_verification") {
        return;
    }
    let stack = Stack::start_with(Postgres::start().expect("start PostgreSQL"), |config| {
        config.audit_extra = "segment_max_age_secs = 1\ncheckpoint_interval_secs = 1".into();
    })
    .expect("start PostgreSQL, IdP and tollgate");
    let token = stack
        .idp
        .token(
            "1f0e0000-0000-4000-8000-000000001f0e",
            &["--name", "live-agent"],
        )
        .expect("mint a token");
    let live = stack.gateway.audit_dir().to_path_buf();

    // Phase one: a statement, readable with DuckDB while the daemon runs
    // (its segment closed on the one-second timer).
    psql_ok(&stack, &token, &["SELECT 'phase one'"]);
    stack
        .audit_rows(
            "SELECT * FROM audit WHERE phase = 'outcome' AND query_info_query_string = 'SELECT ''phase one'''",
            1,
            AUDIT_WAIT,
        )
        .expect("phase one readable while the daemon runs");
    let kept = manifest_lines(&live).len();
    wait_for("a checkpoint over phase one", AUDIT_WAIT, || {
        checkpoints(&live).iter().any(|(_, size)| *size == kept)
    })
    .expect("checkpoint");

    // Phase two, for a few seconds: DuckDB reads the directory over and
    // over while segments close under it, and never fails or goes back.
    let phase_two = Instant::now();
    let mut statements = 0u64;
    let mut seen = Vec::new();
    while phase_two.elapsed() < Duration::from_secs(5) {
        statements += 1;
        psql_ok(
            &stack,
            &token,
            &[&format!("SELECT 'phase two {statements}'")],
        );
        let count = duckdb::query(
            &live,
            "SELECT count(*) AS n FROM audit WHERE query_info_query_string LIKE 'SELECT ''phase two %'",
        )
        .expect("a live read never fails")[0]["n"]
            .as_u64()
            .unwrap_or(0);
        seen.push(count);
    }
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "live counts went back: {seen:?}"
    );
    let last = format!("SELECT 'phase two {statements}'");
    stack
        .audit_rows(
            &format!(
                "SELECT * FROM audit WHERE phase = 'outcome' AND query_info_query_string = '{}'",
                last.replace('\'', "''")
            ),
            1,
            AUDIT_WAIT,
        )
        .expect("the last statement readable while the daemon runs");
    assert!(
        *seen.last().unwrap_or(&0) > 0,
        "segments closed during phase two: {seen:?}"
    );

    // A copy of the live directory verifies, recent checkpoint included
    // (a copy can catch a segment between its file and its checkpoint:
    // copy again then, as docs/verification.md says).
    let copies = tempfile::tempdir().expect("tempdir");
    let mut attempt = 0;
    let copy = loop {
        attempt += 1;
        let copy = copies.path().join(format!("copy-{attempt}"));
        copy_live(&live, &copy).expect("copy the live directory");
        let (ok, report, printed) =
            verify_dir(&stack, &copy, &["--max-checkpoint-age-secs", "3"]).expect("verify");
        if ok {
            break copy;
        }
        assert!(
            attempt < 3,
            "the live copy fails verification:\n{printed}\n{report}"
        );
    };

    // Cut the tail off the copy: phase two's segments, their manifest
    // lines, every checkpoint over them, and the WAL.
    let lines = manifest_lines(&copy);
    assert!(lines.len() > kept, "phase two closed segments");
    for line in &lines[kept..] {
        let entry: Value = serde_json::from_str(line).expect("manifest line");
        let path = entry["path"].as_str().expect("segment path");
        fs::remove_file(copy.join(path)).expect("remove a segment");
    }
    fs::write(copy.join("manifest.jsonl"), lines[..kept].join("\n") + "\n").expect("manifest");
    let mut newest_kept = 0u64;
    for (note, size) in checkpoints(&copy) {
        if size > kept {
            fs::remove_file(note).expect("remove a checkpoint");
        } else {
            let body = fs::read_to_string(&note).unwrap_or_default();
            newest_kept = body
                .lines()
                .find_map(|l| l.strip_prefix("tollgate-time "))
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0)
                .max(newest_kept);
        }
    }
    fs::remove_dir_all(copy.join("wal")).expect("remove the WAL");
    fs::create_dir(copy.join("wal")).expect("empty WAL dir");

    // Without an age limit the cut copy looks like a quiet log: that is
    // what --max-checkpoint-age-secs is for.
    let (ok, report, printed) = verify_dir(&stack, &copy, &[]).expect("verify");
    assert!(
        ok,
        "a consistent prefix verifies without an age limit:\n{printed}\n{report}"
    );
    let age_ms = now_ms() - newest_kept;
    assert!(
        age_ms > 3000,
        "the newest kept checkpoint is {age_ms} ms old"
    );
    let (ok, report, printed) =
        verify_dir(&stack, &copy, &["--max-checkpoint-age-secs", "3"]).expect("verify");
    assert!(!ok, "the cut copy verifies:\n{printed}");
    assert_eq!(
        problem_kinds(&report),
        ["checkpoint_stale".to_owned()].into_iter().collect(),
        "{printed}\n{report}"
    );
    assert!(printed.contains("checkpoint_stale"), "{printed}");
    eprintln!(
        "live: {statements} statements in phase two, {} live DuckDB reads (last count {}), \
         copy verified on attempt {attempt}, {} segments cut, newest kept checkpoint {age_ms} ms old",
        seen.len(),
        seen.last().unwrap_or(&0),
        lines.len() - kept
    );
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
