//! Audit store benchmark: `cargo run --release -p gateway --example
//! audit_bench [-- DIR]`.
//!
//! Measures
//! - append throughput: strict (each append awaited, many concurrent
//!   tasks) and batched (submit everything, then await);
//! - the two durability modes around a simulated statement: a loopback TCP
//!   round trip standing in for the upstream, with the record made durable
//!   before forwarding (strict) or in parallel with it (read_parallel);
//! - bytes per record on disk in closed segments.
//!
//! Prints a Markdown table for docs/benchmarks.md. `audit_bench DIR
//! batched` runs only the batched append, three times, with each thread's
//! CPU per record; `audit_bench DIR buffered` the same in `buffered`
//! durability, where the submitting thread writes each record itself.
//! `audit_bench DIR sustained` streams a million records through the
//! store confined to CPU 0 (records built on CPU 1, at most 4 096
//! unacknowledged), in turn with only its background threads moved to
//! CPU 1 and with the submitter (which encodes, as sessions do) moved to
//! CPU 1; `DUMP_FRAME=1 audit_bench DIR` prints one record's canonical
//! encoding and exits.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tollgate::audit::{
    action, datastore_activity, status, AuditConfig, AuditLog, AuditRecord, SharedList, SharedText,
    CLASS_DATASTORE_ACTIVITY,
};

/// A random-looking but reproducible id, shaped like the UUIDv4s the
/// proxy puts in `request_uid` and `session_uid` (random ids do not
/// compress: a sequential stand-in would flatter the bytes per record).
fn uid(kind: u64, n: usize) -> String {
    let mut x = (n as u64) ^ kind.rotate_left(32);
    let mut next = || {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let v = (u128::from(next()) << 64) | u128::from(next());
    uuid::Builder::from_random_bytes(v.to_le_bytes())
        .into_uuid()
        .to_string()
}

/// What the records of one session share, as the daemon's statement
/// records share their session's fields instead of copying them (records
/// `i / 100` form a session).
#[derive(Clone)]
struct SessionFields {
    session: usize,
    org: SharedText,
    app: SharedText,
    groups: SharedList,
    roles: SharedList,
    credential: SharedText,
    fingerprint: SharedText,
    process: SharedText,
    src_ip: SharedText,
    dst_ip: SharedText,
    dst_name: SharedText,
    protocol: SharedText,
    session_uid: SharedText,
    database_user: SharedText,
    database_name: SharedText,
}

impl SessionFields {
    fn of(session: usize) -> Self {
        SessionFields {
            session,
            org: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
            app: "a1b2c3d4-0000-4000-8000-000000000001".into(),
            groups: ["db-readers".to_string(), "agents".to_string()].into(),
            roles: ["Orders.Read".to_string()].into(),
            credential: uid(2, session)[..22].into(),
            fingerprint: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            process: "python3".into(),
            src_ip: "127.0.0.1".into(),
            dst_ip: "10.0.3.17".into(),
            dst_name: "orders-db".into(),
            protocol: "postgres".into(),
            session_uid: uid(3, session).into(),
            database_user: "app".into(),
            database_name: "orders".into(),
        }
    }

    /// The fields of record `i`'s session, shared with the records before
    /// it in the same session.
    fn for_record(i: usize) -> Self {
        thread_local! {
            static CURRENT: std::cell::RefCell<Option<SessionFields>> = const { std::cell::RefCell::new(None) };
        }
        CURRENT.with(|current| {
            let mut current = current.borrow_mut();
            match &*current {
                Some(fields) if fields.session == i / 100 => fields.clone(),
                _ => current.insert(SessionFields::of(i / 100)).clone(),
            }
        })
    }
}

fn record(i: usize) -> AuditRecord {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let session = SessionFields::for_record(i);
    AuditRecord {
        phase: "request".into(),
        // A request and its outcome share one.
        request_uid: uid(1, i / 2),
        time: now,
        class_uid: CLASS_DATASTORE_ACTIVITY,
        activity_id: datastore_activity::QUERY,
        type_uid: i64::from(CLASS_DATASTORE_ACTIVITY) * 100 + 4,
        status_id: status::SUCCESS,
        action_id: action::ALLOWED,
        policy_uid: "orders-read".into(),
        actor_user_uid: format!("3f1b8c52-0000-4000-8000-{:012}", i % 50).into(),
        actor_user_name: format!("agent-{}@contoso.example", i % 50).into(),
        actor_user_org_uid: session.org,
        actor_app_uid: session.app,
        actor_user_groups: session.groups,
        actor_user_roles: session.roles,
        actor_session_credential_uid: session.credential,
        actor_session_credential_fingerprint: session.fingerprint,
        actor_process_pid: Some(4242 + (i % 8) as i32),
        actor_process_name: session.process,
        actor_process_cgroup_id: Some(12345),
        src_endpoint_ip: session.src_ip,
        src_endpoint_port: Some(40000 + (i % 1000) as i32),
        dst_endpoint_ip: session.dst_ip,
        dst_endpoint_port: Some(5432),
        dst_endpoint_name: session.dst_name,
        connection_info_protocol_name: session.protocol,
        session_uid: session.session_uid,
        upstream_socket_cookie: Some(987654 + (i / 100) as i64),
        database_user: session.database_user,
        database_name: session.database_name,
        query_info_query_string: format!(
            "SELECT id, status, total FROM orders WHERE customer_id = {} ORDER BY created_at DESC LIMIT 20",
            i % 10_000
        ),
        unmapped: "{}".into(),
        ..Default::default()
    }
}

/// A typical record as the WAL holds it: chained (the first of its chain),
/// so with both chain members.
fn chained_record() -> AuditRecord {
    let mut r = record(1);
    r.sequence = 1;
    r.prev_record_hash = tollgate::audit::GENESIS_HASH.into();
    r
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

async fn open(dir: &std::path::Path, name: &str) -> (AuditLog, AuditConfig) {
    let cfg = AuditConfig::new(dir.join(name));
    (AuditLog::open(&cfg).await.expect("open audit store"), cfg)
}

/// Each of `tasks` tasks appends `per_task` records, awaiting each.
async fn strict(dir: &std::path::Path, tasks: usize, per_task: usize) -> (f64, Vec<Duration>) {
    let (log, _) = open(dir, &format!("strict-{tasks}")).await;
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let s = Instant::now();
                log.append(record(t * per_task + i)).await.expect("append");
                lat.push(s.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.await.expect("task"));
    }
    let rate = (tasks * per_task) as f64 / start.elapsed().as_secs_f64();
    log.shutdown().await;
    lat.sort();
    (rate, lat)
}

/// Name of the sampler's own thread, left out of what it reports.
const SAMPLER: &str = "cpu-sampler";

/// CPU time per thread name over an interval, threads that exit during it
/// included (their last reading counts): a sampler thread reads
/// `/proc/self/task/*/schedstat` every few milliseconds. Its own thread is
/// named, so that its reading is not counted as the submitter's.
struct ThreadCpu {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<std::collections::BTreeMap<String, Duration>>,
}

impl ThreadCpu {
    fn start() -> Self {
        fn read() -> Vec<(libc::pid_t, String, u64)> {
            threads()
                .into_iter()
                .filter_map(|(tid, comm)| {
                    let stat =
                        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
                    let ns = stat.split_whitespace().next()?.parse().ok()?;
                    Some((tid, comm, ns))
                })
                .collect()
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let sampler = std::thread::Builder::new()
            .name(SAMPLER.into())
            .spawn(move || {
                let mut first = std::collections::HashMap::new();
                let mut last = std::collections::HashMap::new();
                for (tid, comm, ns) in read() {
                    first.insert(tid, ns);
                    last.insert(tid, (comm, ns));
                }
                while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                    for (tid, comm, ns) in read() {
                        last.insert(tid, (comm, ns));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                let mut by_name = std::collections::BTreeMap::new();
                for (tid, (comm, ns)) in last.into_iter().filter(|(_, (comm, _))| comm != SAMPLER) {
                    let spent = ns - first.get(&tid).copied().unwrap_or(0).min(ns);
                    *by_name.entry(comm).or_insert(Duration::ZERO) += Duration::from_nanos(spent);
                }
                by_name
            });
        ThreadCpu {
            stop,
            sampler: sampler.expect("spawn the CPU sampler"),
        }
    }

    fn stop(self) -> std::collections::BTreeMap<String, Duration> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.sampler.join().unwrap_or_default()
    }
}

/// What one batched run measured.
struct Batched {
    /// Records made durable per second of wall time.
    rate: f64,
    /// Records per second of wall time until the store has shut down: the
    /// last segment written and manifested, so the segment thread's work
    /// counts too (a rate the store can sustain, not only absorb).
    rate_with_segments: f64,
    /// CPU time per record of each thread (by name), from the first
    /// submit until the last segment is written: the submitter (which
    /// prepares the records), the WAL writer, the segment thread, the WAL
    /// file preparer.
    cpu_per_record: std::collections::BTreeMap<String, Duration>,
}

impl Sustained {
    /// CPU per record of the threads the store starts, without the
    /// submitting thread's share (the encoding a session does).
    fn own_threads_per_record(&self) -> Duration {
        self.cpu_per_record
            .iter()
            .filter(|(name, _)| STORE_THREADS.contains(&name.as_str()))
            .map(|(_, d)| *d)
            .sum()
    }

    /// The store's CPU time over the run's wall time: at most 1 when all
    /// of it is on CPU 0, if the kernel's accounting is to be trusted.
    fn cores(&self) -> f64 {
        self.cpu_per_record.values().sum::<Duration>().as_secs_f64() * self.rate
    }
}

impl Batched {
    /// CPU time of the WAL writer thread per record: the serial part, what
    /// one core spends to chain, write and sync a record.
    fn writer_cpu_per_record(&self) -> Duration {
        self.cpu_per_record
            .get("audit-wal")
            .copied()
            .unwrap_or_default()
    }
}

/// CPU per record, in all and of each thread (by name) that spent any.
fn cpu_breakdown(cpu_per_record: &std::collections::BTreeMap<String, Duration>) -> String {
    let total: Duration = cpu_per_record.values().sum();
    let parts: Vec<String> = cpu_per_record
        .iter()
        .filter(|(_, d)| d.as_nanos() >= 10)
        .map(|(name, d)| format!("{name} {:.2}", d.as_secs_f64() * 1e6))
        .collect();
    format!(
        "{:.2} µs per record in all ({})",
        total.as_secs_f64() * 1e6,
        parts.join(", ")
    )
}

/// Submits `n` records (built beforehand: building them is the caller's
/// work, not the store's) without waiting, then waits for all.
async fn batched(dir: &std::path::Path, n: usize) -> Batched {
    batched_with(dir, n, tollgate::audit::DurabilityMode::ReadParallel).await
}

/// As [`batched`], in the given durability mode: in `buffered` the
/// submitter writes each record itself, as a session does.
async fn batched_with(
    dir: &std::path::Path,
    n: usize,
    durability: tollgate::audit::DurabilityMode,
) -> Batched {
    let mut cfg = AuditConfig::new(dir.join("batched"));
    cfg.durability = durability;
    let log = AuditLog::open(&cfg).await.expect("open audit store");
    let records: Vec<_> = (0..n).map(record).collect();
    let threads = ThreadCpu::start();
    let start = Instant::now();
    let tickets: Vec<_> = records.into_iter().map(|r| log.submit(r)).collect();
    for t in tickets {
        t.await.expect("durable");
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    log.shutdown().await;
    let rate_with_segments = n as f64 / start.elapsed().as_secs_f64();
    let cpu_per_record = threads
        .stop()
        .into_iter()
        .map(|(name, d)| (name, d / n as u32))
        .collect();
    Batched {
        rate,
        rate_with_segments,
        cpu_per_record,
    }
}

/// Pins the calling thread (and the threads it spawns from now on) to
/// one CPU. Returns whether the kernel took it.
fn pin_to_cpu(cpu: usize) -> bool {
    // Thread id 0 is the calling thread.
    pin_thread(0, cpu)
}

/// Pins thread `tid` of this process to one CPU. Returns whether the
/// kernel took it.
fn pin_thread(tid: libc::pid_t, cpu: usize) -> bool {
    // SAFETY: `set` is a plain bitmask on the stack, sized as the call
    // is told.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// This process's threads: (thread id, name).
fn threads() -> Vec<(libc::pid_t, String)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_string_lossy().parse().ok()?;
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            Some((tid, comm.trim_end().to_owned()))
        })
        .collect()
}

/// Pins the thread named `name` that is not among `before` (a thread of
/// this run's store, not one of an earlier run's on its way out) to
/// `cpu`, waiting up to a second for it to take its name (a thread
/// names itself once it runs). Returns whether it did.
fn pin_new_thread_named(before: &[(libc::pid_t, String)], name: &str, cpu: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        let new = threads()
            .into_iter()
            .find(|(tid, comm)| comm == name && !before.iter().any(|(old, _)| old == tid));
        if let Some((tid, _)) = new {
            return pin_thread(tid, cpu);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// The threads an audit store starts.
const STORE_THREADS: [&str; 3] = ["audit-wal", "audit-segments", "audit-wal-prep"];

/// Name of the thread that builds the records of a sustained run: the
/// callers' work, not the store's, kept off the store's core and out of
/// its CPU figures.
const RECORD_MAKER: &str = "record-maker";

/// Records a caller keeps submitted but not yet acknowledged in a
/// sustained run (it awaits the oldest before it submits one more): callers that never wait would grow without bound, as
/// no daemon's sessions do (each has a few statements in flight).
/// `AUDIT_BENCH_IN_FLIGHT=N` sets it, for experiments.
const SUSTAINED_IN_FLIGHT: usize = 4096;

/// What one sustained run measured.
struct Sustained {
    /// Records per second of wall time until the store has shut down
    /// (every segment written and manifested).
    rate: f64,
    /// CPU time per record of each thread of the store (the caller's
    /// record maker left out), from the first submit to the shutdown.
    cpu_per_record: std::collections::BTreeMap<String, Duration>,
    /// The record maker's CPU per record, on the other core.
    maker_per_record: Duration,
    /// The store's threads, each with the CPUs it was allowed, at the end
    /// of the run.
    placement: Vec<String>,
}

/// Where a sustained run puts the store's work. The record maker is on
/// CPU 1 in all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Everything the store does on CPU 0: the submitting thread, which
    /// encodes and half-hashes each record, and the store's own threads.
    WholeStore,
    /// The store's two background threads (the segment thread, which
    /// writes Parquet, and the WAL file preparer, which zero-fills spare
    /// files) on CPU 1: the path every record waits on (submit, chain,
    /// write, sync) keeps CPU 0 to itself, as on a host with a core to
    /// spare.
    BackgroundBeside,
    /// The submitting thread on CPU 1 beside the record maker, the store's
    /// own threads (WAL writer, segment thread, WAL file preparer) on CPU
    /// 0. In the daemon each session encodes and half-hashes its records
    /// on the core it runs on, as part of submitting them; this is what
    /// the store's own threads sustain on one core when that work is
    /// spread over the sessions' cores.
    SessionsBeside,
}

impl Placement {
    fn describe(self) -> &'static str {
        match self {
            Placement::WholeStore => "the store on CPU 0",
            Placement::BackgroundBeside => {
                "the store on CPU 0, its segment thread and WAL file preparer on CPU 1"
            }
            Placement::SessionsBeside => {
                "the store's own threads on CPU 0, the submitter (encoding, as sessions do) on CPU 1"
            }
        }
    }
}

/// `n` records into the store, the store confined to CPU 0: this thread
/// (which submits, and so encodes and half-hashes each record, as a
/// session does) and every thread the store starts. The records are built
/// on CPU 1 by another thread, a chunk at a time, as sessions build
/// theirs; at most [`SUSTAINED_IN_FLIGHT`] are unacknowledged at once.
/// Unlike the batched run, memory is recycled as it is in the daemon:
/// several segments' worth pass through, each freed once written.
///
/// `placement` says which of the store's threads share CPU 0 (see
/// [`Placement`]).
async fn sustained(dir: &std::path::Path, n: usize, placement: Placement) -> Sustained {
    const CHUNK: usize = 1024;
    let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel::<Vec<AuditRecord>>(16);
    let maker = std::thread::Builder::new()
        .name(RECORD_MAKER.into())
        .spawn(move || {
            assert!(pin_to_cpu(1), "pin the record maker to CPU 1");
            let mut i = 0;
            while i < n {
                let end = (i + CHUNK).min(n);
                if chunks_tx.send((i..end).map(record).collect()).is_err() {
                    return i;
                }
                i = end;
            }
            i
        })
        .expect("spawn the record maker");
    let submitter_cpu = match placement {
        Placement::SessionsBeside => 1,
        Placement::WholeStore | Placement::BackgroundBeside => 0,
    };
    assert!(
        pin_to_cpu(submitter_cpu),
        "pin the submitting thread to CPU {submitter_cpu}"
    );
    let mut cfg = AuditConfig::new(dir.join("sustained"));
    // For experiments: smaller segments are written while their records
    // are still in the CPU's caches.
    if let Some(records) = std::env::var("AUDIT_BENCH_SEGMENT_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.segment_max_records = records;
    }
    cfg.durability = tollgate::audit::DurabilityMode::ReadParallel;
    let before = threads();
    let log = AuditLog::open(&cfg).await.expect("open audit store");
    // Each of the store's threads is placed by its thread id: they are
    // started by a thread of tokio's blocking pool, which is not always
    // one made after this thread was pinned.
    for name in STORE_THREADS {
        let cpu = match (placement, name) {
            (Placement::BackgroundBeside, "audit-segments" | "audit-wal-prep") => 1,
            _ => 0,
        };
        assert!(
            pin_new_thread_named(&before, name, cpu),
            "move {name} to CPU {cpu}"
        );
    }
    // The sampler itself runs beside the maker, off the store's core.
    let sampler = {
        let on_cpu_1 = std::thread::spawn(|| {
            assert!(pin_to_cpu(1), "pin the CPU sampler to CPU 1");
            ThreadCpu::start()
        });
        on_cpu_1.join().expect("start the CPU sampler")
    };
    let start = Instant::now();
    let limit = std::env::var("AUDIT_BENCH_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SUSTAINED_IN_FLIGHT);
    let mut in_flight: std::collections::VecDeque<tollgate::audit::Durable> =
        std::collections::VecDeque::with_capacity(limit);
    while let Ok(chunk) = chunks_rx.recv() {
        for r in chunk {
            if in_flight.len() >= limit {
                if let Some(oldest) = in_flight.pop_front() {
                    oldest.await.expect("durable");
                }
            }
            in_flight.push_back(log.submit(r));
        }
    }
    for t in in_flight {
        t.await.expect("durable");
    }
    // A thread the store gained since this bench was written would run
    // unplaced: the figures would no longer be what they say.
    let unplaced: Vec<String> = threads()
        .into_iter()
        .filter(|(tid, name)| {
            name.starts_with("audit-")
                && !STORE_THREADS.contains(&name.as_str())
                && !before.iter().any(|(old, _)| old == tid)
        })
        .map(|(_, name)| name)
        .collect();
    assert!(
        unplaced.is_empty(),
        "the store started threads this bench does not place: {unplaced:?}"
    );
    // Where the store's threads were allowed to run, taken while they
    // still exist: a figure is only worth its placement.
    let placement: Vec<String> = threads()
        .into_iter()
        .filter(|(tid, name)| {
            STORE_THREADS.contains(&name.as_str()) && !before.iter().any(|(old, _)| old == tid)
        })
        .filter_map(|(tid, name)| {
            let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
                .trim()
                .to_owned();
            Some(format!("{name}/{tid}: {cpus}"))
        })
        .collect();
    log.shutdown().await;
    let elapsed = start.elapsed();
    let rate = n as f64 / elapsed.as_secs_f64();
    let made = maker.join().expect("the record maker");
    assert_eq!(made, n, "records made");
    let mut cpu_per_record: std::collections::BTreeMap<String, Duration> = sampler
        .stop()
        .into_iter()
        .map(|(name, d)| (name, d / n as u32))
        .collect();
    let maker_per_record = cpu_per_record.remove(RECORD_MAKER).unwrap_or_default();
    Sustained {
        placement,
        rate,
        cpu_per_record,
        maker_per_record,
    }
}

/// A loopback echo server standing in for the upstream database.
async fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = [0u8; 128];
                loop {
                    match s.read_exact(&mut buf).await {
                        Ok(_) => {
                            if s.write_all(&buf).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    addr
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// No audit at all: the floor.
    None,
    /// Record durable, then forward.
    Strict,
    /// Forward while the record syncs; answer once durable.
    ReadParallel,
}

async fn statements(
    dir: &std::path::Path,
    mode: Mode,
    clients: usize,
    per_client: usize,
) -> (f64, Vec<Duration>) {
    let addr = echo_server().await;
    let name = format!("stmt-{clients}-{}", mode as u8);
    let (log, _) = open(dir, &name).await;
    let start = Instant::now();
    let mut handles = Vec::new();
    for c in 0..clients {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            let mut buf = [0u8; 128];
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let t = Instant::now();
                let r = record(c * per_client + i);
                match mode {
                    Mode::None => {
                        s.write_all(&buf).await.expect("w");
                        s.read_exact(&mut buf).await.expect("r");
                    }
                    Mode::Strict => {
                        log.append(r).await.expect("append");
                        s.write_all(&buf).await.expect("w");
                        s.read_exact(&mut buf).await.expect("r");
                    }
                    Mode::ReadParallel => {
                        let durable = log.submit(r);
                        s.write_all(&buf).await.expect("w");
                        s.read_exact(&mut buf).await.expect("r");
                        durable.await.expect("durable");
                    }
                }
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.await.expect("task"));
    }
    let rate = (clients * per_client) as f64 / start.elapsed().as_secs_f64();
    log.shutdown().await;
    lat.sort();
    (rate, lat)
}

/// What the disk itself allows: one append and fdatasync at a time.
fn raw_fdatasync(dir: &std::path::Path, n: usize) -> Vec<Duration> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    let buf = [b'x'; 1500];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&buf).expect("write");
        f.sync_data().expect("fdatasync");
        lat.push(t.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    lat.sort();
    lat
}

fn disk_usage(dir: &std::path::Path) -> u64 {
    fn walk(p: &std::path::Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()),
                Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => 0,
            })
            .sum()
    }
    walk(dir)
}

#[tokio::main]
async fn main() {
    if std::env::var_os("DUMP_FRAME").is_some() {
        println!(
            "{}",
            String::from_utf8_lossy(&chained_record().canonical_bytes())
        );
        return;
    }
    let dir: PathBuf = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("audit-bench-{}", std::process::id()))
        });
    std::fs::create_dir_all(&dir).expect("bench dir");
    println!("audit directory: {}\n", dir.display());
    // `audit_bench DIR batched`: only the batched rate (for profiling);
    // `audit_bench DIR buffered`: the same in `buffered` durability.
    let only = std::env::args().nth(2);
    if only.as_deref() == Some("sustained") {
        use Placement::*;
        // `AUDIT_BENCH_PLACEMENT=whole|background|sessions` runs only that
        // placement (twice), for profiling one of them.
        let placements: Vec<Placement> = match std::env::var("AUDIT_BENCH_PLACEMENT").as_deref() {
            Ok("whole") => vec![WholeStore],
            Ok("background") => vec![BackgroundBeside],
            Ok("sessions") => vec![SessionsBeside],
            Ok(other) => {
                panic!("AUDIT_BENCH_PLACEMENT={other}: expected whole, background or sessions")
            }
            Err(_) => vec![WholeStore, BackgroundBeside, SessionsBeside],
        };
        for placement in placements.repeat(2) {
            let s = sustained(&dir, 1_000_000, placement).await;
            println!(
                "sustained, {}: {:.0} records/s until the last segment is written; store CPU {}, {:.2} cores' worth; the store's own threads {:.2} µs per record, {:.2} cores' worth; the record maker on CPU 1 {:.2}",
                placement.describe(),
                s.rate,
                cpu_breakdown(&s.cpu_per_record),
                s.cores(),
                s.own_threads_per_record().as_secs_f64() * 1e6,
                s.own_threads_per_record().as_secs_f64() * s.rate,
                s.maker_per_record.as_secs_f64() * 1e6
            );
            println!(
                "  the store's threads and the CPUs they may run on: {}",
                s.placement.join(", ")
            );
            let _ = std::fs::remove_dir_all(dir.join("sustained"));
        }
        return;
    }
    if let Some(durability) = match only.as_deref() {
        Some("batched") => Some(tollgate::audit::DurabilityMode::ReadParallel),
        Some("buffered") => Some(tollgate::audit::DurabilityMode::Buffered),
        _ => None,
    } {
        for _ in 0..3 {
            let b = batched_with(&dir, 200_000, durability).await;
            // In `buffered`, a record counts once written, not synced.
            let until = if durability == tollgate::audit::DurabilityMode::Buffered {
                "written"
            } else {
                "durable"
            };
            println!(
                "append batched: {:.0} records/s {until}, {:.0} records/s with segments; CPU {}",
                b.rate,
                b.rate_with_segments,
                cpu_breakdown(&b.cpu_per_record)
            );
            let _ = std::fs::remove_dir_all(dir.join("batched"));
        }
        return;
    }

    println!("| measurement | records/s | p50 µs | p99 µs |");
    println!("| --- | ---: | ---: | ---: |");
    let lat = raw_fdatasync(&dir, 300);
    println!(
        "| raw write + fdatasync of 1.5 KB, no gateway (disk floor) | {:.0} | {:.0} | {:.0} |",
        lat.len() as f64 / lat.iter().map(|d| d.as_secs_f64()).sum::<f64>(),
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
    for tasks in [1usize, 16, 64] {
        let per = if tasks == 1 { 5_000 } else { 100_000 / tasks };
        let (rate, lat) = strict(&dir, tasks, per).await;
        println!(
            "| append strict, {tasks} concurrent task(s) | {rate:.0} | {:.0} | {:.0} |",
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
    }
    let b = batched(&dir, 200_000).await;
    println!(
        "| append batched (submit 200k, then await) | {:.0} | - | - |",
        b.rate
    );
    println!(
        "| the same, until the last segment is written | {:.0} | - | - |",
        b.rate_with_segments
    );
    println!(
        "\nappend batched: the WAL writer thread (the serial part) spends {:.2} µs of CPU per record = {:.0} records per second of one core; CPU {}",
        b.writer_cpu_per_record().as_secs_f64() * 1e6,
        1.0 / b.writer_cpu_per_record().as_secs_f64().max(1e-12),
        cpu_breakdown(&b.cpu_per_record)
    );

    println!("\n| statement (loopback round trip) | clients | statements/s | p50 µs | p99 µs |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for clients in [1usize, 16] {
        let per = if clients == 1 { 5_000 } else { 2_000 };
        for (mode, name) in [
            (Mode::None, "no audit (floor)"),
            (Mode::Strict, "strict: durable, then forward"),
            (Mode::ReadParallel, "read_parallel: forward while syncing"),
        ] {
            let (rate, lat) = statements(&dir, mode, clients, per).await;
            println!(
                "| {name} | {clients} | {rate:.0} | {:.0} | {:.0} |",
                pct(&lat, 0.5),
                pct(&lat, 0.99)
            );
        }
    }

    // Bytes per record in closed segments (one file of 100k records, the
    // default segment size, and the small files a quiet 5 s cut produces).
    let (log, cfg) = open(&dir, "size").await;
    let n = 100_000;
    let tickets: Vec<_> = (0..n).map(|i| log.submit(record(i))).collect();
    for t in tickets {
        t.await.expect("durable");
    }
    log.shutdown().await;
    let seg_bytes = disk_usage(&cfg.dir.join("records"));
    println!(
        "\nbytes per record in segments: {:.1} ({} records, {} bytes, {} file(s))",
        seg_bytes as f64 / n as f64,
        n,
        seg_bytes,
        std::fs::read_dir(cfg.dir.join("records"))
            .map(|d| d
                .flatten()
                .map(|day| std::fs::read_dir(day.path())
                    .map(|f| f.count())
                    .unwrap_or(0))
                .sum::<usize>())
            .unwrap_or(0)
    );
    // A frame is a header, the canonical encoding (which leaves out the
    // record's own hash) and padding.
    let wal_frame = tollgate::audit::wal_frame_len(chained_record().canonical_bytes().len());
    println!("bytes per record in the WAL (transient): {wal_frame}");

    let t = Instant::now();
    let report = tollgate::audit::verify::verify_dir(
        &cfg.dir,
        &cfg.dir.join("keys/checkpoint.key.pub"),
        &Default::default(),
    )
    .expect("verify");
    assert!(report.ok, "{:?}", report.problems.first());
    println!(
        "verify: {} records in {:.2} s ({:.0} records/s)",
        report.records,
        t.elapsed().as_secs_f64(),
        report.records as f64 / t.elapsed().as_secs_f64()
    );
    if std::env::args().nth(1).is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
